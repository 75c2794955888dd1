//! `cargo xtask fuzz`: the cargo-fuzz targets (policy parser, control protocol decoder), run for a
//! bounded time. `cargo xtask test` runs them briefly.

use std::{path::Path, process::Command};

use anyhow::bail;

use crate::{check, workspace_root};

const CARGO_FUZZ_VERSION: &str = "0.13.2";
pub const TARGETS: [&str; 2] = ["policy_parse", "protocol_decode"];

pub fn run(seconds: u32) -> anyhow::Result<()> {
    let installed = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !installed {
        eprintln!("fuzz: installing cargo-fuzz {CARGO_FUZZ_VERSION}");
        check(
            Command::new("cargo").args([
                "install",
                "cargo-fuzz",
                "--version",
                CARGO_FUZZ_VERSION,
                "--locked",
            ]),
            "cargo install cargo-fuzz",
        )?;
    }
    let root = workspace_root();
    for target in TARGETS {
        // New inputs go to a scratch corpus; the committed seeds are read only.
        let scratch = root.join("target/fuzz-corpus").join(target);
        std::fs::create_dir_all(&scratch)?;
        let seeds = Path::new("fuzz/corpus").join(target);
        eprintln!("fuzz: {target} for {seconds} s");
        let out = Command::new("rustup")
            .current_dir(&root)
            .args(["run", "nightly", "cargo", "fuzz", "run", target])
            .arg(&scratch)
            .arg(&seeds)
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .arg("-max_len=4096")
            .output()?;
        // libFuzzer is chatty; keep its log, show it only when something went wrong.
        let log = root.join(format!("target/fuzz-{target}.log"));
        std::fs::write(
            &log,
            [out.stdout.as_slice(), out.stderr.as_slice()].concat(),
        )?;
        let text = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            eprintln!("{text}");
            bail!(
                "fuzzing {target} failed ({}); the crashing input is under fuzz/artifacts/{target}, the log in {}",
                out.status,
                log.display()
            );
        }
        let done = text
            .lines()
            .rev()
            .find(|l| l.starts_with("Done "))
            .unwrap_or("done");
        eprintln!("fuzz: {target}: {done}, no crash");
    }
    Ok(())
}
