//! `cargo xtask package [--check]`: the .deb, and a real install of it.

use std::{path::PathBuf, process::Command};

use anyhow::{bail, Context as _};

use crate::{cargo, check, workspace_root};

const CARGO_DEB_VERSION: &str = "3.8.0";

pub fn run(verify: bool) -> anyhow::Result<()> {
    let has_cargo_deb = Command::new("cargo")
        .args(["deb", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !has_cargo_deb {
        eprintln!("package: installing cargo-deb {CARGO_DEB_VERSION}");
        check(
            Command::new("cargo").args([
                "install",
                "cargo-deb",
                "--version",
                CARGO_DEB_VERSION,
                "--locked",
            ]),
            "cargo install cargo-deb",
        )?;
    }
    let out_dir = workspace_root().join("target/debian");
    check(
        cargo()
            .args([
                "deb",
                "-p",
                "egressd",
                "--no-build",
                "--no-strip",
                "--output",
            ])
            .arg(&out_dir),
        "cargo deb",
    )?;
    let deb = newest_deb(&out_dir)?;
    println!("package: {}", deb.display());
    if verify {
        install_and_check(&deb)?;
    }
    Ok(())
}

fn newest_deb(dir: &std::path::Path) -> anyhow::Result<PathBuf> {
    std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "deb"))
        .max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok())
        .with_context(|| format!("no .deb in {}", dir.display()))
}

/// Installs the package for real, checks what it put on the system, and removes it again.
fn install_and_check(deb: &std::path::Path) -> anyhow::Result<()> {
    check(Command::new("dpkg").arg("-i").arg(deb), "dpkg -i")?;
    let result = (|| -> anyhow::Result<()> {
        for path in [
            "/usr/bin/egressd",
            "/usr/bin/egressctl",
            "/lib/systemd/system/egressd.service",
            "/lib/systemd/system/egressd.slice",
            "/usr/lib/tmpfiles.d/egressd.conf",
            "/etc/egressd/egressd.toml",
        ] {
            if !std::path::Path::new(path).exists() {
                bail!("the package did not install {path}");
            }
        }
        check(
            Command::new("systemd-analyze").args([
                "verify",
                "/lib/systemd/system/egressd.service",
                "/lib/systemd/system/egressd.slice",
            ]),
            "systemd-analyze verify egressd.service egressd.slice",
        )?;
        check(
            Command::new("/usr/bin/egressctl").args([
                "policy",
                "check",
                "/etc/egressd/egressd.toml",
            ]),
            "checking the packaged config",
        )?;
        check(
            Command::new("/usr/bin/egressd").arg("--help"),
            "egressd --help",
        )?;
        check(
            Command::new("/usr/bin/egressctl").arg("--help"),
            "egressctl --help",
        )?;
        Ok(())
    })();
    check(
        Command::new("dpkg").args(["--purge", "egressd"]),
        "dpkg --purge egressd",
    )?;
    result?;
    if std::path::Path::new("/usr/bin/egressd").exists() {
        bail!("dpkg --purge left /usr/bin/egressd behind");
    }
    println!("package: installed, verified (systemd-analyze, packaged config, --help) and purged");
    Ok(())
}
