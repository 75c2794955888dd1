//! Builds the kernel programs (egressd-ebpf) for the BPF target with aya-build, so the daemon embeds
//! the exact object it was compiled with. Needs nightly's rust-src and bpf-linker: `cargo xtask
//! bootstrap` installs both.
fn main() -> anyhow::Result<()> {
    let package = aya_build::Package {
        name: "egressd-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../egressd-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::default())
}
