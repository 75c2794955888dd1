//! egressctl: start tools in a sandbox whose network is cut off in the kernel, and ask egressd
//! what it enforces.

mod audit;
mod capabilities;
mod client;
mod doctor;
mod health;
mod landlock_scope;
mod policy;
mod report;
mod run;
mod seal;
mod seccomp;
mod show;
mod stdio;
mod top;
mod unix_fallback;
mod verify;

use std::{path::PathBuf, process::ExitCode};

use clap::{CommandFactory as _, Parser, Subcommand};
use egressd_common::{
    man,
    policy::{DEFAULT_AUDIT_PATH, DEFAULT_CONFIG_PATH},
    protocol::{DEFAULT_SOCKET, SOCKET_ENV},
};

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
        /// No notices of what is blocked while CMD runs (desktop notifications, or lines on
        /// this terminal); the start and end lines stay.
        #[arg(long, short)]
        quiet: bool,
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
    /// Live view of sessions and what they were denied, as it happens (yours; all for root).
    /// Full screen on a terminal (q quits, s sorts, ↑↓ and f/Enter pick one session); a plain
    /// table every interval otherwise.
    Top {
        /// Only this session.
        #[arg(long)]
        session: Option<String>,
        /// Refresh every MS milliseconds.
        #[arg(long, value_name = "MS", default_value_t = 250)]
        interval: u64,
        /// Without a terminal: print this many tables, then exit (default: until interrupted).
        #[arg(long, value_name = "N")]
        rounds: Option<u64>,
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
    /// Print a completion script for SHELL, e.g. `egressctl completions bash >
    /// ~/.local/share/bash-completion/completions/egressctl` (the Debian package installs them).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Internal: write egressctl's man pages (egressctl.1, egressctl-SUBCOMMAND.1) into DIR.
    #[command(hide = true)]
    Man { dir: PathBuf },
}

/// The CLI as completion scripts offer it: without the hidden subcommands (internal helpers such
/// as `__verify-attempt`), which clap_complete does not skip by itself. Only the top level has
/// hidden subcommands; a test checks that stays so.
fn completion_command() -> clap::Command {
    let cli = Cli::command();
    clap::Command::new("egressctl")
        .version(env!("CARGO_PKG_VERSION"))
        .args(cli.get_arguments().cloned())
        .subcommands(cli.get_subcommands().filter(|s| !s.is_hide_set()).cloned())
}

fn write_man_pages(dir: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context as _;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let files = [
        (DEFAULT_SOCKET, "egressd's control socket (--socket, $EGRESSD_SOCKET)."),
        (
            DEFAULT_CONFIG_PATH,
            "The policy egressd enforces, which egressctl policy check validates by default; see egressd.toml(5).",
        ),
        (
            DEFAULT_AUDIT_PATH,
            "The audit log egressctl audit reads when egressd is not running.",
        ),
    ];
    let extra = man::Extra {
        files: &files,
        see_also: &man::PAGES,
    };
    for page in man::write_pages(Cli::command(), "1", &extra, dir)
        .with_context(|| format!("writing man pages into {}", dir.display()))?
    {
        println!("{}", page.display());
    }
    Ok(())
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
            quiet,
            command,
        } => run::run(&cli.socket, profile, &keep_fd, quiet, command),
        Command::Status { json } => show::status(&cli.socket, json).map(|()| ExitCode::SUCCESS),
        Command::Ps { json } => show::ps(&cli.socket, json).map(|()| ExitCode::SUCCESS),
        Command::Top {
            session,
            interval,
            rounds,
        } => top::top(&cli.socket, session, interval, rounds).map(|()| ExitCode::SUCCESS),
        Command::Doctor => Ok(doctor::doctor(&cli.socket)),
        Command::Verify => verify::verify(&cli.socket),
        Command::VerifyListen { counts } => verify::listen(&counts),
        Command::VerifyAttempt { kind, target } => verify::attempt(&kind, &target),
        Command::Audit(args) => audit::audit(&cli.socket, args),
        Command::Policy(cmd) => policy::policy(&cli.socket, cmd),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut completion_command(),
                "egressctl",
                &mut std::io::stdout(),
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Man { dir } => write_man_pages(&dir).map(|()| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("egressctl: {e:#}");
            ExitCode::from(125)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hidden(cmd: &clap::Command, path: &str, out: &mut Vec<String>) {
        for sub in cmd.get_subcommands() {
            let name = format!("{path} {}", sub.get_name());
            if sub.is_hide_set() {
                out.push(name.clone());
            }
            hidden(sub, &name, out);
        }
    }

    #[test]
    fn completions_offer_no_hidden_subcommand() {
        let mut found = Vec::new();
        hidden(&completion_command(), "egressctl", &mut found);
        assert!(found.is_empty(), "hidden subcommands offered: {found:?}");
        // ... while every visible one is, with its arguments.
        let full = Cli::command();
        let visible: Vec<&str> = full
            .get_subcommands()
            .filter(|s| !s.is_hide_set())
            .map(|s| s.get_name())
            .collect();
        let completion = completion_command();
        let offered: Vec<&str> = completion.get_subcommands().map(|s| s.get_name()).collect();
        assert_eq!(offered, visible);
        // Only the top level hides subcommands, so rebuilding the top level is enough.
        for sub in full.get_subcommands().filter(|s| !s.is_hide_set()) {
            let mut nested = Vec::new();
            hidden(sub, sub.get_name(), &mut nested);
            assert!(nested.is_empty(), "nested hidden subcommands: {nested:?}");
        }
        let mut bash = Vec::new();
        clap_complete::generate(
            clap_complete::Shell::Bash,
            &mut completion_command(),
            "egressctl",
            &mut bash,
        );
        let bash = String::from_utf8(bash).unwrap();
        assert!(bash.contains("complete -F _egressctl"), "{bash}");
        assert!(!bash.contains("__verify-"), "{bash}");
        assert!(!bash.contains("egressctl,man)"), "{bash}");
    }

    #[test]
    fn man_pages_cover_every_visible_subcommand() {
        let dir = std::env::temp_dir().join(format!("egressctl-man-{}", std::process::id()));
        write_man_pages(&dir).unwrap();
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        for expected in [
            "egressctl.1",
            "egressctl-run.1",
            "egressctl-completions.1",
            "egressctl-audit-tail.1",
            "egressctl-audit-report.1",
            "egressctl-policy-check.1",
        ] {
            assert!(names.iter().any(|n| n == expected), "{expected}: {names:?}");
        }
        assert!(
            !names
                .iter()
                .any(|n| n.contains("verify-") || n.contains("-man.")),
            "{names:?}"
        );
        let top = std::fs::read_to_string(dir.join("egressctl.1")).unwrap();
        assert!(top.contains("egressd.toml\\fR(5)"), "{top}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
