//! egressctl: start tools in a sandbox whose network is cut off in the kernel, and ask egressd
//! what it enforces.

mod audit;
mod capabilities;
mod client;
mod doctor;
mod health;
mod landlock_scope;
mod policy;
mod run;
mod seal;
mod seccomp;
mod show;
mod stdio;
mod unix_fallback;
mod verify;

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use egressd_common::protocol::{DEFAULT_SOCKET, SOCKET_ENV};

#[derive(Parser)]
#[command(
    version,
    about = "Run tools with every non-loopback connection denied by the kernel, and inspect egressd"
)]
struct Cli {
    /// egressd's control socket.
    #[arg(long, global = true, env = SOCKET_ENV, default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run CMD sandboxed: it and every process it starts can reach loopback only (or what the
    /// profile allows). Exits with CMD's exit status.
    Run {
        /// Profile from egressd's policy (default: the policy's default profile).
        #[arg(long)]
        profile: Option<String>,
        /// Keep this inherited descriptor open (every other one above 2 is closed: a socket made
        /// outside the sandbox would not be judged by it). Repeatable.
        #[arg(long = "keep-fd", value_name = "N")]
        keep_fd: Vec<i32>,
        /// The command and its arguments.
        #[arg(
            required = true,
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "CMD"
        )]
        command: Vec<String>,
    },
    /// Is egressd up, which hooks are attached, which policy is in force.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Running sessions (yours; all of them for root).
    Ps {
        #[arg(long)]
        json: bool,
    },
    /// Check that this kernel has what egressd needs, and say what is missing.
    Doctor,
    /// Self-test (root): a throwaway session tries the ways out against a test host in a network
    /// namespace; prints what was blocked and by which layer.
    Verify,
    /// Internal: the test host of `verify`.
    #[command(name = "__verify-listen", hide = true)]
    VerifyListen { counts: std::path::PathBuf },
    /// Internal: one attempt of `verify`, inside the sandbox.
    #[command(name = "__verify-attempt", hide = true)]
    VerifyAttempt { kind: String, target: String },
    /// Read, export and verify the audit log.
    Audit(audit::AuditArgs),
    /// Check, show and reload the policy.
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Commands that only print end quietly when their reader goes (`egressctl audit tail | head`),
    // as other CLIs do; `run` keeps SIGPIPE ignored, as its relays must see EPIPE.
    if !matches!(
        cli.command,
        Command::Run { .. } | Command::VerifyAttempt { .. }
    ) {
        // SAFETY: restoring the default disposition of one signal before any thread starts.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let result = match cli.command {
        Command::Run {
            profile,
            keep_fd,
            command,
        } => run::run(&cli.socket, profile, &keep_fd, command),
        Command::Status { json } => show::status(&cli.socket, json).map(|()| ExitCode::SUCCESS),
        Command::Ps { json } => show::ps(&cli.socket, json).map(|()| ExitCode::SUCCESS),
        Command::Doctor => Ok(doctor::doctor(&cli.socket)),
        Command::Verify => verify::verify(&cli.socket),
        Command::VerifyListen { counts } => verify::listen(&counts),
        Command::VerifyAttempt { kind, target } => verify::attempt(&kind, &target),
        Command::Audit(args) => audit::audit(&cli.socket, args),
        Command::Policy(cmd) => policy::policy(&cli.socket, cmd),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("egressctl: {e:#}");
            ExitCode::from(125)
        }
    }
}
