//! Project chores: `cargo xtask bootstrap | build | run | test | bench`.

mod bench;
mod bootstrap;
mod fuzz;
mod package;

use std::{
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "egressd's build, run and test chores")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what a command needs (idempotent): with no argument, everything (the eBPF build
    /// chain, what egressd needs to run, and the tools of the tests and the bench).
    Bootstrap {
        #[arg(value_enum, value_name = "FOR")]
        need: Option<bootstrap::Need>,
    },
    /// Bootstrap, then build egressd and egressctl (release).
    Build,
    /// Bootstrap, build, start egressd with its default policy if none is running, and run CMD in a
    /// sandbox. Needs root.
    Run {
        /// Profile for the session.
        #[arg(long)]
        profile: Option<String>,
        #[arg(
            required = true,
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "CMD"
        )]
        command: Vec<String>,
    },
    /// Build the Debian package (target/debian/egressd_*.deb), man pages and completions included;
    /// with --check, also install it with dpkg, verify the unit with systemd-analyze, run the
    /// installed binaries, check the man pages and completions, and purge it.
    Package {
        #[arg(long)]
        check: bool,
    },
    /// Run the fuzz targets (policy parser, control protocol decoder) for a while each.
    Fuzz {
        #[arg(long, default_value_t = 60)]
        seconds: u32,
    },
    /// Bootstrap, build, and run every test: the fuzz targets briefly, unit tests, and the kernel
    /// tests (needs root).
    Test {
        /// Extra arguments for `cargo test` (after `--`), e.g. a test name filter.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Bootstrap, build (release), and measure egressd against no enforcement, nftables and bwrap
    /// (needs root): a table, target/bench/bench.json and target/bench/ratios.svg.
    Bench {
        /// Every part with short iterations (a minute or two): proves the bench works; the
        /// figures are not for comparison.
        #[arg(long)]
        quick: bool,
        /// Only these parts (letters of the table's PART column, e.g. `cg`); the report then
        /// covers only them.
        #[arg(long, value_name = "PARTS")]
        only: Option<String>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Task::Bootstrap { need } => bootstrap::run(need.unwrap_or(bootstrap::Need::All)),
        Task::Build => {
            bootstrap::run(bootstrap::Need::Build)?;
            build_release()
        }
        Task::Run { profile, command } => {
            bootstrap::run(bootstrap::Need::Run)?;
            build_release()?;
            run(profile, command)
        }
        Task::Package { check } => {
            bootstrap::run(bootstrap::Need::Build)?;
            build_release()?;
            package::run(check)
        }
        Task::Fuzz { seconds } => {
            bootstrap::run(bootstrap::Need::Build)?;
            fuzz::run(seconds)
        }
        Task::Test { args } => {
            bootstrap::run(bootstrap::Need::Test)?;
            test(&args)
        }
        Task::Bench { quick, only } => {
            if !is_root() {
                bail!("the bench loads eBPF programs, creates cgroups, network namespaces and nftables rules: run `sudo cargo xtask bench`");
            }
            bootstrap::run(bootstrap::Need::Bench)?;
            bench::run(quick, only.as_deref())
        }
    }
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(workspace_root());
    c
}

pub fn check(cmd: &mut Command, what: &str) -> anyhow::Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("{what}: cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{what} failed ({status}): {cmd:?}");
    }
    Ok(())
}

fn build_release() -> anyhow::Result<()> {
    check(
        cargo().args(["build", "--release", "-p", "egressd", "-p", "egressctl"]),
        "building egressd and egressctl",
    )
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

const SOCKET: &str = "/run/egressd/egressd.sock";

fn run(profile: Option<String>, command: Vec<String>) -> anyhow::Result<()> {
    let release = workspace_root().join("target/release");
    let socket = std::env::var("EGRESSD_SOCKET").unwrap_or_else(|_| SOCKET.into());
    if std::os::unix::net::UnixStream::connect(&socket).is_err() {
        if !is_root() {
            bail!("egressd is not running and starting it needs root: run `sudo cargo xtask run -- ...`");
        }
        let log = Path::new("/var/log/egressd");
        std::fs::create_dir_all(log)?;
        let log_file = std::fs::File::create(log.join("egressd.log"))?;
        eprintln!(
            "xtask: starting egressd (built-in default policy unless /etc/egressd/egressd.toml exists); log: {}",
            log.join("egressd.log").display()
        );
        let mut daemon = Command::new(release.join("egressd"));
        daemon
            .args(["--socket", &socket])
            .stdin(std::process::Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .process_group(0);
        daemon.spawn().context("starting egressd")?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            if Instant::now() > deadline {
                bail!("egressd did not come up within 20 s; see /var/log/egressd/egressd.log");
            }
            thread::sleep(Duration::from_millis(50));
        }
        eprintln!("xtask: egressd is running; stop it with `pkill -x egressd` (enforcement stays pinned; `egressd cleanup` removes it)");
    }
    let mut ctl = Command::new(release.join("egressctl"));
    as_sudo_user(&mut ctl)?;
    ctl.args(["--socket", &socket, "run"]);
    if let Some(p) = profile {
        ctl.args(["--profile", &p]);
    }
    ctl.arg("--").args(&command);
    Err(ctl.exec()).context("running egressctl")
}

/// Under sudo, CMD runs as the user who asked for it (their files, their home), not as root:
/// egressctl needs no privilege, and root in a sandbox is only held without its capabilities.
fn as_sudo_user(cmd: &mut Command) -> anyhow::Result<()> {
    use nix::unistd::{Uid, User};
    let Some(uid) = std::env::var("SUDO_UID")
        .ok()
        .and_then(|u| u.parse::<u32>().ok())
    else {
        return Ok(());
    };
    if uid == 0 || !is_root() {
        return Ok(());
    }
    let user = User::from_uid(Uid::from_raw(uid))
        .context("reading the user database")?
        .with_context(|| format!("SUDO_UID={uid} names no user"))?;
    let name = std::ffi::CString::new(user.name.as_bytes())?;
    let gid = user.gid;
    cmd.env("HOME", &user.dir)
        .env("USER", &user.name)
        .env("LOGNAME", &user.name);
    // SAFETY: only async-signal-safe-enough calls between fork and exec (initgroups reads the
    // group database, as sudo itself does at this point).
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::initgroups(&name, gid)?;
            nix::unistd::setgid(gid)?;
            nix::unistd::setuid(Uid::from_raw(uid))?;
            Ok(())
        });
    }
    Ok(())
}

fn test(args: &[String]) -> anyhow::Result<()> {
    if !is_root() {
        bail!("the kernel tests load eBPF programs and create cgroups and network namespaces: run `sudo cargo xtask test`");
    }
    // Build everything first so the tests find current egressd and egressctl binaries.
    check(cargo().arg("build"), "building the workspace")?;
    if args.is_empty() {
        fuzz::run(15)?;
    }
    // Unit tests first, the kernel tests last, so the run ends on their summary.
    check(
        cargo()
            .args(["test", "--lib", "--bins"])
            .args(args_after(args)),
        "the unit tests",
    )?;
    check(
        cargo()
            .args(["test", "-p", "egressd-tests", "--test", "*"])
            .args(args_after(args)),
        "the kernel tests",
    )
}

fn args_after(args: &[String]) -> Vec<String> {
    if args.is_empty() {
        Vec::new()
    } else {
        std::iter::once("--".to_string())
            .chain(args.iter().cloned())
            .collect()
    }
}
