//! Installs the eBPF build chain and the tools the tests use, idempotently. Every step checks first
//! and acts only when something is missing; a failing step says what to do.

use std::{path::PathBuf, process::Command};

use anyhow::{bail, Context as _};

use crate::check;

const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn run() -> anyhow::Result<()> {
    let sysroot = nightly_sysroot()?;
    rust_src()?;
    bpf_linker(&sysroot)?;
    debian_tools()?;
    Ok(())
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn nightly_sysroot() -> anyhow::Result<PathBuf> {
    let sysroot = output(Command::new("rustup").args(["run", "nightly", "rustc", "--print", "sysroot"]))
        .context(
            "no nightly Rust toolchain: the eBPF programs are built with nightly (`-Z build-std=core`); install it with `rustup toolchain install nightly`",
        )?;
    Ok(PathBuf::from(sysroot.trim()))
}

fn rust_src() -> anyhow::Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .unwrap_or_default();
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(());
    }
    eprintln!("bootstrap: installing nightly's rust-src (needed by -Z build-std=core)");
    check(
        Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]),
        "rustup component add rust-src --toolchain nightly",
    )
}

/// The LLVM major version nightly rustc is built with; bpf-linker must use the same one.
fn nightly_llvm_major() -> anyhow::Result<String> {
    let vv = output(Command::new("rustup").args(["run", "nightly", "rustc", "-vV"]))
        .context("running nightly rustc -vV")?;
    vv.lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .map(str::to_string)
        .context("nightly rustc -vV does not report its LLVM version")
}

fn bpf_linker(sysroot: &std::path::Path) -> anyhow::Result<()> {
    if let Some(v) = output(Command::new("bpf-linker").arg("--version")) {
        if v.contains(BPF_LINKER_VERSION) {
            return Ok(());
        }
        eprintln!(
            "bootstrap: found {} ; installing bpf-linker {BPF_LINKER_VERSION}",
            v.trim()
        );
    }
    let llvm = nightly_llvm_major()?;
    // bpf-linker links against the libLLVM that nightly rustc ships; its build looks for the
    // unversioned name, which rustup does not install.
    let lib = sysroot.join("lib");
    let shipped = std::fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so."))
        .with_context(|| {
            format!(
                "nightly ships no libLLVM.so.* in {}; cannot build bpf-linker",
                lib.display()
            )
        })?;
    let link = lib.join("libLLVM.so");
    if !link.exists() {
        std::os::unix::fs::symlink(&shipped, &link)
            .with_context(|| format!("linking {} -> {shipped}", link.display()))?;
    }
    eprintln!("bootstrap: building bpf-linker {BPF_LINKER_VERSION} against nightly's LLVM {llvm} (takes a minute or two)");
    let feature = format!("llvm-{llvm}");
    let status = Command::new("cargo")
        .env("LLVM_PREFIX", sysroot)
        .args([
            "+stable",
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
            "--no-default-features",
            "--features",
            &feature,
        ])
        .status()
        .context("running cargo install bpf-linker")?;
    if !status.success() {
        bail!(
            "installing bpf-linker failed ({status}). It needs nightly's LLVM {llvm} (LLVM_PREFIX={}) and the crate registry; see shared/TOOLCHAIN.md",
            sysroot.display()
        );
    }
    Ok(())
}

/// iproute2 (`ip netns`, veth) and util-linux (`setpriv`) for the kernel tests, systemd-container
/// (`systemd-nspawn`) for the test under a live systemd; tmux, dbus (dbus-daemon, dbus-send),
/// gdbus, python3-dbus and python3-gi (a stand-in bus service) for the hand-off tests, and
/// xdg-dbus-proxy, which egressd runs as each session's filter of the session bus; nftables and
/// bubblewrap, the alternatives the bench compares egressd with.
fn debian_tools() -> anyhow::Result<()> {
    let has = |bin: &str| format!("command -v {bin}");
    let missing: Vec<&str> = [
        (has("ip"), "iproute2"),
        (has("setpriv"), "util-linux"),
        (has("nft"), "nftables"),
        (has("bwrap"), "bubblewrap"),
        (has("systemd-nspawn"), "systemd-container"),
        (has("dbus-daemon"), "dbus"),
        (has("dbus-send"), "dbus-bin"),
        (has("tmux"), "tmux"),
        (has("gdbus"), "libglib2.0-bin"),
        (has("xdg-dbus-proxy"), "xdg-dbus-proxy"),
        (
            "/usr/bin/python3 -c 'import dbus, gi' 2>/dev/null && echo yes".to_string(),
            "python3-dbus python3-gi",
        ),
    ]
    .into_iter()
    .filter(|(check, _)| output(Command::new("sh").args(["-c", check])).is_none())
    .flat_map(|(_, pkg)| pkg.split(' '))
    .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("bootstrap: installing {} with apt-get", missing.join(" "));
    check(Command::new("apt-get").arg("update"), "apt-get update")?;
    check(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing),
        "apt-get install",
    )
}
