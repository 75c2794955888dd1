//! `egressctl policy`: check a file, show the policy in force, reload it.

use std::{
    collections::BTreeSet,
    net::IpAddr,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::bail;
use clap::Subcommand;
use egressd_common::{
    policy::{Config, DEFAULT_CONFIG_PATH},
    protocol::{Op, PolicyView, Reply},
};

use crate::client::Client;

#[derive(Subcommand)]
pub enum PolicyCommand {
    /// Validate a policy file; errors name the file, line, column and reason.
    Check {
        #[arg(default_value = DEFAULT_CONFIG_PATH)]
        file: PathBuf,
    },
    /// The policy in force, defaults filled in (TOML, or JSON).
    Show {
        #[arg(long)]
        profile: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Re-read the policy file (root only; same as SIGHUP to egressd). A bad file changes nothing.
    Reload,
    /// Print a profile (TOML) allowing exactly the destinations a session used, from the audit log:
    /// run a tool once under an audit-mode profile, then review and adopt what it needed.
    Learn {
        #[arg(long)]
        session: String,
        /// Name of the new profile.
        #[arg(long, default_value = "learned")]
        name: String,
        /// The audit log (default: the running daemon's).
        #[arg(long)]
        file: Option<PathBuf>,
    },
}

pub fn policy(socket: &Path, cmd: PolicyCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        PolicyCommand::Check { file } => match Config::load(&file) {
            Ok((config, source)) => {
                println!(
                    "{source}: ok; default profile {}; profiles: {}",
                    config.default_profile,
                    config
                        .profiles
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("{e}");
                Ok(ExitCode::FAILURE)
            }
        },
        PolicyCommand::Show { profile, json } => {
            let view = expect_policy(Client::connect(socket)?.call(Op::PolicyShow { profile })?)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&view)?);
            } else {
                println!("# source: {}\n# hash:   {}", view.source, view.hash);
                print!("{}", toml::to_string_pretty(&view.policy)?);
            }
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Learn {
            session,
            name,
            file,
        } => {
            print!("{}", learn(socket, &session, &name, file)?);
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Reload => {
            let view = expect_policy(Client::connect(socket)?.call(Op::Reload)?)?;
            println!("reloaded {} (hash {})", view.source, view.hash);
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn learn(
    socket: &Path,
    session: &str,
    name: &str,
    file: Option<PathBuf>,
) -> anyhow::Result<String> {
    let log = file
        .or_else(|| crate::audit::daemon_log(socket))
        .unwrap_or_else(|| PathBuf::from("/var/log/egressd/audit.jsonl"));
    let records = crate::audit::read_all(&log)?;
    let mine: Vec<_> = records
        .iter()
        .filter(|r| r.session.as_deref() == Some(session))
        .collect();
    let Some(start) = mine.iter().find(|r| r.kind == "session_start") else {
        bail!("no session {session} in {}", log.display());
    };
    let mut loopback = BTreeSet::new();
    let mut allow = BTreeSet::new();
    let mut decisions = 0u64;
    for r in mine.iter().filter(|r| r.kind == "decision") {
        let (Some(dest), Some(port), Some(proto)) = (&r.dest, r.port, &r.protocol) else {
            continue;
        };
        decisions += r.count.unwrap_or(1);
        let Ok(ip) = dest.parse::<IpAddr>() else {
            continue;
        };
        if ip.is_loopback() || ip.is_unspecified() {
            loopback.insert(port);
        } else if matches!(proto.as_str(), "tcp" | "udp") {
            allow.insert(match ip {
                IpAddr::V4(v4) => format!("{v4}/32:{port}/{proto}"),
                IpAddr::V6(v6) => format!("[{v6}]/128:{port}/{proto}"),
            });
        }
    }
    let quote = |items: Vec<String>| {
        items
            .iter()
            .map(|i| format!("{i:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut out = format!(
        "# Learned from session {session} (profile {}, {decisions} decisions, started {}).\n# Review every rule before adopting it.\n[profiles.{name}]\ndescription = \"learned from session {session}\"\nmode = \"enforce\"\n",
        start.profile.as_deref().unwrap_or("?"),
        start.time
    );
    if loopback.len() > egressd_common::MAX_LOOPBACK_PORTS {
        out.push_str("loopback = true  # more ports than a list can hold\n");
    } else {
        let ports: Vec<String> = loopback.iter().map(u16::to_string).collect();
        out.push_str(&format!("loopback = [{}]\n", ports.join(", ")));
    }
    out.push_str(&format!(
        "allow = [{}]\n",
        quote(allow.into_iter().collect())
    ));
    Ok(out)
}

fn expect_policy(reply: Reply) -> anyhow::Result<PolicyView> {
    match reply {
        Reply::Policy(v) => Ok(v),
        other => bail!("unexpected reply from egressd: {other:?}"),
    }
}
