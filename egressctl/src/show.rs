//! `egressctl status` and `egressctl ps`.

use std::{
    path::Path,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::bail;
use egressd_common::protocol::{Op, Reply};

use crate::client::Client;

pub fn status(socket: &Path, json: bool) -> anyhow::Result<()> {
    let mut client = Client::connect(socket)?;
    let Reply::Status(s) = client.call(Op::Status)? else {
        bail!("unexpected reply from egressd");
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    println!(
        "egressd {} running (pid {}), socket {}",
        s.version,
        s.pid,
        socket.display()
    );
    println!(
        "policy:   {} (default profile {}; profiles: {})",
        s.policy_source,
        s.default_profile,
        s.profiles.join(", ")
    );
    println!("cgroup:   {}", s.cgroup_parent);
    println!(
        "layers:   {}, and seccomp in every session",
        s.layers.join(", ")
    );
    match &s.unix_missing {
        None => println!(
            "unix:     sessions reach only their own unix servers and their profile's unix_allow (supervisor + cgroup/connect_unix)"
        ),
        Some(why) => println!(
            "unix:     NOT confined ({why}): sessions can ask tmux, systemd --user, the session bus or docker to act for them"
        ),
    }
    println!("hooks:    {} attached and pinned", s.hooks.len());
    for h in &s.hooks {
        println!("  {:<20} prog {:<6} {}", h.attach_type, h.prog_id, h.pinned);
    }
    println!("sessions: {}", s.sessions);
    if let Some(h) = &s.audit {
        for (i, line) in crate::health::lines(h, &s.audit_path).iter().enumerate() {
            println!("{}{line}", if i == 0 { "audit:    " } else { "          " });
        }
        println!("sealing:  {}", crate::health::sealing(h));
    }
    Ok(())
}

pub fn ps(socket: &Path, json: bool) -> anyhow::Result<()> {
    let mut client = Client::connect(socket)?;
    let Reply::Sessions(sessions) = client.call(Op::Ps)? else {
        bail!("unexpected reply from egressd");
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&sessions)?);
        return Ok(());
    }
    if sessions.is_empty() {
        println!("no sessions");
        return Ok(());
    }
    println!(
        "{:<9} {:<10} {:>6} {:<16} {:>9} {:>8} {:>7} {:>8}  COMMAND",
        "SESSION", "PROFILE", "UID", "PIDS", "STARTED", "ALLOWED", "DENIED", "DNS-DENY"
    );
    for s in sessions {
        let pids = s
            .pids
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(",");
        println!(
            "{:<9} {:<10} {:>6} {:<16} {:>9} {:>8} {:>7} {:>8}  {}",
            s.id,
            s.profile,
            s.uid,
            truncate(&pids, 16),
            ago(s.started),
            s.counters.allowed,
            s.counters.denied + s.counters.sockets_refused,
            s.dns_names_denied,
            s.argv.join(" ")
        );
    }
    Ok(())
}

fn truncate(s: &str, n: usize) -> String {
    if s.len() <= n {
        s.to_string()
    } else {
        format!("{}…", &s[..n - 1])
    }
}

fn ago(started: u64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs();
    let d = now.saturating_sub(started);
    match d {
        0..=59 => format!("{d}s ago"),
        60..=3599 => format!("{}m ago", d / 60),
        3600..=86399 => format!("{}h ago", d / 3600),
        _ => format!("{}d ago", d / 86400),
    }
}
