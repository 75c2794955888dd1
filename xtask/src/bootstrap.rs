//! Installs what a command needs, idempotently: the eBPF build chain for every command that builds,
//! what running egressd needs, and the tools only the tests or the bench use for those. Every step
//! checks first and acts only when something is missing; a failing step says what to do.

use std::{path::PathBuf, process::Command};

use anyhow::{bail, Context as _};

use crate::check;

const BPF_LINKER_VERSION: &str = "0.13.0";

/// What a command needs installed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Need {
    /// The eBPF build chain: nightly's rust-src, bpf-linker and the libLLVM link it builds against.
    Build,
    /// The build chain and what running egressd needs (`cargo xtask run`).
    Run,
    /// Run's, and the tools the kernel tests use (`cargo xtask test`).
    Test,
    /// Run's, and the alternatives the bench compares egressd with (`cargo xtask bench`).
    Bench,
    /// Everything (`cargo xtask bootstrap` with no argument; CI runs it before the tests).
    All,
}

/// A Debian package, and the shell check that says it is there (what it provides rather than
/// dpkg's database: the tool may come from elsewhere).
#[derive(Debug, PartialEq, Eq)]
pub struct Package {
    pub name: &'static str,
    pub present: &'static str,
}

const fn pkg(name: &'static str, present: &'static str) -> Package {
    Package { name, present }
}

/// What running egressd needs besides its build: xdg-dbus-proxy, which egressd runs as each
/// session's filter of the session bus (`session_bus = "filtered"`, the default; without it a
/// session gets no bus at all). The Debian package recommends it too.
pub const RUN: &[Package] = &[pkg("xdg-dbus-proxy", "command -v xdg-dbus-proxy")];

/// The kernel tests: iproute2 (`ip netns`, veth) and util-linux (`setpriv`), systemd-container
/// (`systemd-nspawn`) for the test under a live systemd; tmux, dbus (dbus-daemon, dbus-send),
/// gdbus, python3-dbus and python3-gi (a stand-in bus service) for the hand-off tests; prometheus
/// (the binary only: the metrics test runs its own on loopback and stops it) for the metrics test;
/// chromium (headless, offline) renders `audit report` for the report test.
pub const TEST: &[Package] = &[
    pkg("iproute2", "command -v ip"),
    pkg("util-linux", "command -v setpriv"),
    pkg("systemd-container", "command -v systemd-nspawn"),
    pkg("dbus", "command -v dbus-daemon"),
    pkg("dbus-bin", "command -v dbus-send"),
    pkg("tmux", "command -v tmux"),
    pkg("libglib2.0-bin", "command -v gdbus"),
    pkg(
        "python3-dbus",
        "/usr/bin/python3 -c 'import dbus' 2>/dev/null",
    ),
    pkg("python3-gi", "/usr/bin/python3 -c 'import gi' 2>/dev/null"),
    pkg("prometheus", "test -x /usr/bin/prometheus"),
    pkg("chromium", "command -v chromium"),
];

/// The bench: nftables and bubblewrap, the alternatives it compares egressd with; iproute2 (its
/// outside host) and util-linux (`setpriv`: launches as an unprivileged user).
pub const BENCH: &[Package] = &[
    pkg("nftables", "command -v nft"),
    pkg("bubblewrap", "command -v bwrap"),
    pkg("iproute2", "command -v ip"),
    pkg("util-linux", "command -v setpriv"),
];

impl Need {
    /// The Debian packages this need takes, each once.
    pub fn packages(self) -> Vec<&'static Package> {
        let lists: &[&'static [Package]] = match self {
            Need::Build => &[],
            Need::Run => &[RUN],
            Need::Test => &[RUN, TEST],
            Need::Bench => &[RUN, BENCH],
            Need::All => &[RUN, TEST, BENCH],
        };
        let mut out: Vec<&'static Package> = Vec::new();
        for p in lists.iter().flat_map(|l| l.iter()) {
            if !out.iter().any(|o| o.name == p.name) {
                out.push(p);
            }
        }
        out
    }

    fn name(self) -> &'static str {
        match self {
            Need::Build => "build",
            Need::Run => "run",
            Need::Test => "test",
            Need::Bench => "bench",
            Need::All => "everything",
        }
    }
}

/// Installs what `need` takes and is missing, then says in one line what it installed.
pub fn run(need: Need) -> anyhow::Result<()> {
    let mut installed = Vec::new();
    let sysroot = nightly_sysroot()?;
    if rust_src()? {
        installed.push(String::from("nightly rust-src"));
    }
    if bpf_linker(&sysroot)? {
        installed.push(format!("bpf-linker {BPF_LINKER_VERSION}"));
    }
    let missing: Vec<&str> = need
        .packages()
        .into_iter()
        .filter(|p| output(Command::new("sh").args(["-c", p.present])).is_none())
        .map(|p| p.name)
        .collect();
    apt_install(&missing)?;
    installed.extend(missing.iter().map(|m| m.to_string()));
    if installed.is_empty() {
        eprintln!("bootstrap ({}): nothing missing", need.name());
    } else {
        eprintln!(
            "bootstrap ({}): installed {}",
            need.name(),
            installed.join(", ")
        );
    }
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

/// Whether it installed it.
fn rust_src() -> anyhow::Result<bool> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .unwrap_or_default();
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(false);
    }
    eprintln!("bootstrap: installing nightly's rust-src (needed by -Z build-std=core)");
    check(
        Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]),
        "rustup component add rust-src --toolchain nightly",
    )?;
    Ok(true)
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

/// Whether it installed it.
fn bpf_linker(sysroot: &std::path::Path) -> anyhow::Result<bool> {
    if let Some(v) = output(Command::new("bpf-linker").arg("--version")) {
        if v.contains(BPF_LINKER_VERSION) {
            return Ok(false);
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
    Ok(true)
}

/// `apt-get install` of `missing` (nothing when it is empty), quietly: apt's output is shown only
/// when it fails.
fn apt_install(missing: &[&str]) -> anyhow::Result<()> {
    if missing.is_empty() {
        return Ok(());
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "missing Debian packages: {list}; install them (`sudo apt-get install --no-install-recommends {list}`) or run this command as root",
            list = missing.join(" ")
        );
    }
    eprintln!("bootstrap: installing {} with apt-get", missing.join(" "));
    quiet(
        Command::new("apt-get").args(["-qq", "update"]),
        "apt-get update",
    )?;
    quiet(
        Command::new("apt-get")
            .args(["-qq", "install", "-y", "--no-install-recommends"])
            .args(missing),
        "apt-get install",
    )?;
    // Debian's prometheus starts a service on :9090 where systemd runs; the tests want the binary
    // only (best effort: no systemd, no service).
    if missing.contains(&"prometheus") {
        let _ = Command::new("systemctl")
            .args(["disable", "--now", "prometheus"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
    Ok(())
}

/// Runs `cmd` with its output captured; on failure the error carries that output.
fn quiet(cmd: &mut Command, what: &str) -> anyhow::Result<()> {
    let out = cmd
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(std::process::Stdio::null())
        .output()
        .with_context(|| format!("{what}: cannot start {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {cmd:?}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr).trim_end()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(need: Need) -> Vec<&'static str> {
        need.packages().iter().map(|p| p.name).collect()
    }

    #[test]
    fn each_command_takes_only_what_it_needs() {
        assert!(names(Need::Build).is_empty());
        assert_eq!(names(Need::Run), ["xdg-dbus-proxy"]);
        let test = names(Need::Test);
        let bench = names(Need::Bench);
        for only_tests in ["systemd-container", "tmux", "dbus", "python3-gi"] {
            assert!(test.contains(&only_tests), "{only_tests}");
            assert!(!bench.contains(&only_tests), "{only_tests}");
        }
        for only_bench in ["nftables", "bubblewrap"] {
            assert!(bench.contains(&only_bench), "{only_bench}");
            assert!(!test.contains(&only_bench), "{only_bench}");
        }
        for need in [Need::Test, Need::Bench, Need::All] {
            for p in names(Need::Run) {
                assert!(names(need).contains(&p), "{need:?} lacks {p}");
            }
        }
    }

    #[test]
    fn a_quiet_command_shows_its_output_only_when_it_fails() {
        quiet(Command::new("sh").args(["-c", "echo chatter"]), "ok").unwrap();
        let err = quiet(
            Command::new("sh").args([
                "-c",
                "echo progress; echo 'E: no such package' >&2; exit 100",
            ]),
            "apt-get install",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("apt-get install failed (exit status: 100)"),
            "{err}"
        );
        assert!(err.contains("progress\nE: no such package"), "{err}");
    }

    #[test]
    fn bootstrap_with_no_argument_installs_everything_once() {
        let all = names(Need::All);
        for need in [Need::Build, Need::Run, Need::Test, Need::Bench] {
            for p in names(need) {
                assert!(all.contains(&p), "{p} of {need:?}");
            }
        }
        // What it installed before it took the command into account.
        for p in [
            "iproute2",
            "util-linux",
            "nftables",
            "bubblewrap",
            "systemd-container",
            "dbus",
            "dbus-bin",
            "tmux",
            "libglib2.0-bin",
            "xdg-dbus-proxy",
            "python3-dbus",
            "python3-gi",
            "prometheus",
            "chromium",
        ] {
            assert!(all.contains(&p), "{p}");
        }
        let mut unique = all.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), all.len(), "{all:?}");
        assert!(all.iter().all(|p| !p.is_empty() && !p.contains(' ')));
    }
}
