//! `egressctl policy`: check a file, show the policy in force, reload it.

use std::{
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
        PolicyCommand::Reload => {
            let view = expect_policy(Client::connect(socket)?.call(Op::Reload)?)?;
            println!("reloaded {} (hash {})", view.source, view.hash);
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn expect_policy(reply: Reply) -> anyhow::Result<PolicyView> {
    match reply {
        Reply::Policy(v) => Ok(v),
        other => bail!("unexpected reply from egressd: {other:?}"),
    }
}
