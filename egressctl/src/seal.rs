//! `egressctl audit setup-keys`: makes the sealing key egressd seals the log with, and prints the
//! verification key, once, for the auditor (text and a QR code, like `journalctl --setup-keys`).

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, UNIX_EPOCH},
};

use anyhow::{bail, Context as _};
use egressd_common::{
    policy::{Config, SealInterval},
    seal::{self, Sealer},
};

pub fn setup_keys(
    socket: &Path,
    file: Option<&Path>,
    config: &Path,
    interval: Option<&str>,
    force: bool,
    qr: bool,
) -> anyhow::Result<ExitCode> {
    if !nix::unistd::geteuid().is_root() {
        bail!("setup-keys needs root: the sealing state lives in egressd's log directory, readable by root only");
    }
    let (config, _) = Config::load(config)?;
    let log: PathBuf = match file {
        Some(f) => std::path::absolute(f).unwrap_or_else(|_| f.to_owned()),
        None => crate::audit::daemon_log(socket).unwrap_or_else(|| config.audit.path()),
    };
    let interval = match interval {
        Some(t) => t.parse::<SealInterval>().map_err(anyhow::Error::msg)?.0,
        None => config.audit.seal_interval(),
    };
    let state = seal::state_path(&log);
    let (sealer, vk) = Sealer::create(&state, interval, force)
        .with_context(|| format!("making the sealing keys at {}", state.display()))?;
    let start = humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(vk.start));
    let text = vk.to_string();
    println!(
        "New sealing keys for {} (key {}).",
        log.display(),
        sealer.id
    );
    println!(
        "The sealing state is in {} (mode 0600); egressd seals the log every {} s with it, and",
        state.display(),
        interval
    );
    println!("overwrites it with the next epoch's key each interval (a running egressd takes it within seconds).");
    println!();
    println!(
        "The VERIFICATION KEY is shown only this once. Keep it off this machine (write it down, or"
    );
    println!("scan the QR code): with it an auditor checks every seal; without it nobody can.");
    println!();
    println!("    {text}");
    println!();
    println!("Epoch 0 began at {start}; one epoch every {interval} s.");
    if qr {
        match qrcode::QrCode::new(text.as_bytes()) {
            Ok(code) => {
                let image = code
                    .render::<qrcode::render::unicode::Dense1x2>()
                    .dark_color(qrcode::render::unicode::Dense1x2::Light)
                    .light_color(qrcode::render::unicode::Dense1x2::Dark)
                    .build();
                println!();
                println!("{image}");
            }
            Err(e) => eprintln!("egressctl: no QR code ({e})"),
        }
    }
    println!();
    println!("Check the log with:  egressctl audit verify --key {text}");
    Ok(ExitCode::SUCCESS)
}
