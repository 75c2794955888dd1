//! `cargo xtask package [--check]`: the .deb, and a real install of it.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

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
    generate_docs(&release_dir()?)?;
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

/// The completion scripts: (shell, file under target/release/packaging/completions, where the
/// package installs it).
const COMPLETIONS: [(&str, &str, &str); 3] = [
    (
        "bash",
        "egressctl.bash",
        "/usr/share/bash-completion/completions/egressctl",
    ),
    (
        "zsh",
        "_egressctl",
        "/usr/share/zsh/vendor-completions/_egressctl",
    ),
    (
        "fish",
        "egressctl.fish",
        "/usr/share/fish/vendor_completions.d/egressctl.fish",
    ),
];

/// `target/release` of cargo's target directory (which CARGO_TARGET_DIR or a config may move),
/// where the binaries are and where cargo-deb looks for the `target/release/` assets.
fn release_dir() -> anyhow::Result<PathBuf> {
    let out = cargo()
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .output()
        .context("running cargo metadata")?;
    if !out.status.success() {
        bail!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let dir = meta["target_directory"]
        .as_str()
        .context("cargo metadata names no target_directory")?;
    Ok(Path::new(dir).join("release"))
}

/// Runs one of the built binaries, and returns its standard output.
fn output_of(cmd: &mut Command, what: &str) -> anyhow::Result<Vec<u8>> {
    let out = cmd
        .output()
        .with_context(|| format!("{what}: cannot start {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim_end()
        );
    }
    Ok(out.stdout)
}

/// The man pages and completion scripts, written by the binaries about to be packaged from their
/// own clap definitions (`egressd man`, `egressctl man`, `egressctl completions`), into
/// target/release/packaging/, where the package's assets take them from. The pages are gzipped
/// here, as Debian wants them: cargo-deb compresses only pages that are not build products
/// (egressd.toml(5), written by hand, is packaged from packaging/ and compressed by cargo-deb).
fn generate_docs(release: &Path) -> anyhow::Result<()> {
    let out = release.join("packaging");
    if out.exists() {
        std::fs::remove_dir_all(&out).with_context(|| format!("removing {}", out.display()))?;
    }
    let mut pages = Vec::new();
    for (bin, section) in [("egressd", "8"), ("egressctl", "1")] {
        let dir = out.join(format!("man/man{section}"));
        let written = output_of(
            Command::new(release.join(bin)).arg("man").arg(&dir),
            &format!("{bin} man"),
        )?;
        pages.extend(String::from_utf8(written)?.lines().map(PathBuf::from));
    }
    for page in &pages {
        check(
            Command::new("gzip").args(["-9", "-n", "-f"]).arg(page),
            "gzip",
        )?;
    }
    let dir = out.join("completions");
    std::fs::create_dir_all(&dir)?;
    for (shell, file, _) in COMPLETIONS {
        let script = output_of(
            Command::new(release.join("egressctl")).args(["completions", shell]),
            &format!("egressctl completions {shell}"),
        )?;
        std::fs::write(dir.join(file), script)?;
    }
    println!(
        "package: {} man pages and completions for bash, zsh and fish in {}",
        pages.len(),
        out.display()
    );
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
        check_man_pages()?;
        check_completions()?;
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
    println!("package: installed, verified (systemd-analyze, packaged config, --help, man pages, completions) and purged");
    Ok(())
}

/// The installed man pages: each of the three top pages where it belongs, where `man -w` finds
/// it, every page of the package gzipped, and groff without a warning about any (as lintian runs
/// it).
fn check_man_pages() -> anyhow::Result<()> {
    let top = [
        ("egressd", "/usr/share/man/man8/egressd.8.gz"),
        ("egressctl", "/usr/share/man/man1/egressctl.1.gz"),
        ("egressd.toml", "/usr/share/man/man5/egressd.toml.5.gz"),
    ];
    for (_, path) in top {
        if !Path::new(path).is_file() {
            bail!(
                "the package did not install {path} (a `path-exclude /usr/share/man/*` in \
                 /etc/dpkg/dpkg.cfg.d drops every man page)"
            );
        }
    }
    let listed = output_of(
        Command::new("dpkg").args(["-L", "egressd"]),
        "dpkg -L egressd",
    )?;
    let pages: Vec<String> = String::from_utf8(listed)?
        .lines()
        .filter(|l| l.starts_with("/usr/share/man/man") && Path::new(l).is_file())
        .map(str::to_string)
        .collect();
    if let Some(plain) = pages.iter().find(|p| !p.ends_with(".gz")) {
        bail!("{plain} is not gzipped");
    }
    // man-db: the tool people will use, and groff's warnings. Without it, the files are checked.
    if Command::new("man").arg("--version").output().is_err() {
        println!(
            "package: {} man pages installed (man is not installed: `man -w` and groff's warnings not checked)",
            pages.len()
        );
        return Ok(());
    }
    for (name, path) in top {
        let found = output_of(
            Command::new("man").args(["-w", name]),
            &format!("man -w {name}"),
        )?;
        let found = String::from_utf8(found)?;
        if found.trim() != path {
            bail!("man -w {name} finds {:?}, not {path}", found.trim());
        }
    }
    for page in &pages {
        let out = Command::new("man")
            .args(["--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z"])
            .arg(page)
            .env("LC_ALL", "C.UTF-8")
            .env("MANROFFSEQ", "")
            .env("MANWIDTH", "80")
            .output()
            .context("running man")?;
        let warnings = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() || !warnings.trim().is_empty() {
            bail!("groff on {page}: {}", warnings.trim_end());
        }
    }
    println!(
        "package: {} man pages installed, gzipped, found by man -w and clean under groff --warnings",
        pages.len()
    );
    Ok(())
}

/// The installed completion scripts: each there and not empty; bash's loads and completes
/// `egressctl pol<TAB>` to `policy`; zsh's and fish's parse, where those shells are installed.
fn check_completions() -> anyhow::Result<()> {
    for (_, _, path) in COMPLETIONS {
        let len = std::fs::metadata(path)
            .with_context(|| format!("the package did not install {path}"))?
            .len();
        if len == 0 {
            bail!("{path} is empty");
        }
    }
    let bash = COMPLETIONS[0].2;
    let script = format!(
        "source {bash} && complete -p egressctl >/dev/null && COMP_WORDS=(egressctl pol) && \
         COMP_CWORD=1 && _egressctl egressctl pol egressctl && printf '%s\\n' \"${{COMPREPLY[@]}}\""
    );
    let offered = output_of(
        Command::new("bash").args(["--norc", "--noprofile", "-c", &script]),
        &format!("loading {bash} in bash"),
    )?;
    let offered = String::from_utf8(offered)?;
    if offered.lines().collect::<Vec<_>>() != ["policy"] {
        bail!("bash completes `egressctl pol` to {offered:?}, not `policy`");
    }
    let mut parsed = vec!["bash"];
    for (shell, args, path) in [
        ("zsh", &["-n"][..], COMPLETIONS[1].2),
        ("fish", &["--no-execute"][..], COMPLETIONS[2].2),
    ] {
        match Command::new(shell).args(args).arg(path).output() {
            Err(_) => {}
            Ok(out) if out.status.success() => parsed.push(shell),
            Ok(out) => bail!(
                "{shell} cannot parse {path}: {}",
                String::from_utf8_lossy(&out.stderr).trim_end()
            ),
        }
    }
    println!(
        "package: completions installed for bash, zsh and fish; checked with {}",
        parsed.join(", ")
    );
    Ok(())
}
