//! `egressctl run`: enter a new session, check the kernel enforces it, run the command, report.

use std::{
    ffi::CString,
    fs,
    path::{Path, PathBuf},
    process::ExitCode,
    sync::atomic::{AtomicI32, Ordering},
};

use anyhow::{bail, Context as _};
use egressd_common::{
    prog_query,
    protocol::{Op, Reply, SessionStarted, SESSION_ENV},
};
use nix::{
    sys::{
        signal::{self, SigHandler, Signal},
        wait::{waitpid, WaitStatus},
    },
    unistd::{execvp, fork, ForkResult, Pid},
};

use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

use crate::client::{Client, NoAnswer};

pub fn run(
    socket: &Path,
    profile: Option<String>,
    keep_fds: &[i32],
    quiet: bool,
    argv: Vec<String>,
) -> anyhow::Result<ExitCode> {
    if let Some(bad) = keep_fds.iter().find(|fd| **fd <= 2) {
        bail!("--keep-fd {bad}: descriptors 0, 1 and 2 are always kept; name one above 2");
    }
    if let Some(bad) = keep_fds.iter().find(|fd| crate::stdio::is_socket(**fd)) {
        bail!("--keep-fd {bad}: it is a socket, and a socket made outside the sandbox would take the sandbox's traffic past every check; pass a pipe or a file instead. Nothing was run");
    }
    let mut client = Client::connect(socket).context("nothing was run")?;
    let started = match client.call(Op::Run {
        profile,
        argv: argv.clone(),
    }) {
        Ok(Reply::Started(s)) => s,
        Ok(other) => bail!("unexpected reply from egressd: {other:?}; nothing was run"),
        Err(e) => {
            return Err(not_run(
                e,
                "the sandbox could not be set up; nothing was run",
            ))
        }
    };
    verify_enforced(&mut client, &started).map_err(|e| {
        not_run(e, "the kernel does not enforce this sandbox; nothing was run (check `egressctl status` and `egressctl doctor`)")
    })?;
    // The connection stays open: it was made before the move, and a session task cannot make a
    // new unix connect without the supervisor (egressd keeps it for the session's life). The child
    // hands egressd its seccomp listener on it, and the summary comes back on it.
    say(format!(
        "egressd: session {} (profile {}): {}{}",
        started.id,
        started.profile,
        started.allows,
        if started.drop_capabilities {
            "; runs as root without capabilities"
        } else {
            ""
        }
    ));
    if let Some(why) = &started.unix_missing {
        eprintln!(
            "egressd: warning: unix sockets outside the session (tmux, the session bus, systemd --user, docker) are NOT confined: {why}"
        );
    }
    if started.families.is_empty() {
        bail!("egressd sent no socket family list (an older egressd?); nothing was run");
    }
    if !quiet {
        ask_for_notices(&mut client, &started.id);
    }

    let status = spawn_and_wait(&started, keep_fds, &argv, &mut client)?;

    match client.call(Op::Summary {
        id: started.id.clone(),
    }) {
        Ok(Reply::Session(s)) => say(format!(
            "egressd: session {} {}: {} allowed, {} denied{}{}",
            s.id,
            exit_words(status),
            s.counters.allowed,
            s.counters.denied + s.counters.sockets_refused,
            dns_words(&s),
            if s.audit_lost > 0 {
                format!(
                    "; {} of its records could not be written to the audit log (counted as lost; `egressctl status` says why)",
                    s.audit_lost
                )
            } else {
                String::new()
            }
        )),
        Ok(_) | Err(_) => say(format!(
            "egressd: session {} {}; summary unavailable: egressd stopped or restarted during the session (`egressctl audit` has its records)",
            started.id,
            exit_words(status)
        )),
    }
    Ok(ExitCode::from(status))
}

/// `e` with `context`, except when egressd did not answer: that message already says what to
/// check, so it only gets "nothing was run".
fn not_run(e: anyhow::Error, context: &'static str) -> anyhow::Error {
    if e.is::<NoAnswer>() {
        anyhow::anyhow!("{e}; nothing was run")
    } else {
        e.context(context)
    }
}

/// Asks egressd to tell the user what is blocked while CMD runs: as desktop notifications on the
/// user's session bus, or on this terminal. egressd sends them itself, from outside the session;
/// a failure here costs the notices, never the session.
fn ask_for_notices(client: &mut Client, id: &str) {
    use std::io::IsTerminal as _;
    let tty = if std::io::stderr().is_terminal() {
        Some(2)
    } else if std::io::stdout().is_terminal() {
        Some(1)
    } else {
        None
    };
    let bus = std::env::var("DBUS_SESSION_BUS_ADDRESS").ok();
    if tty.is_none() && bus.is_none() {
        return;
    }
    match client.call(Op::Notices {
        id: id.to_string(),
        tty,
        bus,
    }) {
        Ok(Reply::Noticing) => {}
        Ok(Reply::Error { message }) => {
            eprintln!("egressd: no notices of what is blocked: {message}")
        }
        Ok(other) => {
            eprintln!("egressd: no notices of what is blocked: unexpected reply {other:?}")
        }
        Err(e) => eprintln!("egressd: no notices of what is blocked: {e:#}"),
    }
}

/// From inside the new cgroup: we really are in the session's cgroup, and every hook egressd needs
/// has egressd's program effective there (BPF_PROG_QUERY with BPF_F_QUERY_EFFECTIVE). No test
/// traffic is sent.
fn verify_enforced(client: &mut Client, started: &SessionStarted) -> anyhow::Result<()> {
    let own = fs::read_to_string("/proc/self/cgroup").context("reading /proc/self/cgroup")?;
    let current = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or("")
        .trim();
    if current != started.cgroup {
        bail!(
            "egressd said the session is {} but this process is in {current:?}",
            started.cgroup
        );
    }
    // Querying needs CAP_NET_ADMIN. Root checks itself against the daemon's program ids; anyone
    // else has the daemon run the same query on the cgroup we just confirmed we are in.
    if nix::unistd::geteuid().is_root() {
        let Reply::Status(status) = client.call(Op::Status)? else {
            bail!("unexpected reply to status");
        };
        let dir = cgroup_dir(&started.cgroup)?;
        let dir = fs::File::open(&dir).with_context(|| format!("opening {}", dir.display()))?;
        let mut missing = Vec::new();
        for (attach_type, name) in prog_query::REQUIRED_ATTACH_TYPES {
            let effective = prog_query::effective_programs(&dir, attach_type)
                .with_context(|| format!("BPF_PROG_QUERY {name}"))?;
            let ours = status.hooks.iter().find(|h| h.attach_type == name);
            if !ours.is_some_and(|h| effective.contains(&h.prog_id)) {
                missing.push(name);
            }
        }
        if !missing.is_empty() {
            bail!("not effective here: {}", missing.join(", "));
        }
    } else if let Some(missing) = &started.missing {
        // egressd ran the query on this cgroup after moving us in, which we have just confirmed.
        if !missing.is_empty() {
            bail!("not effective here: {}", missing.join(", "));
        }
    } else {
        match client.call(Op::CheckEnforced {
            id: started.id.clone(),
        })? {
            Reply::Enforced(check) if check.missing.is_empty() => {}
            Reply::Enforced(check) => bail!("not effective here: {}", check.missing.join(", ")),
            other => bail!("unexpected reply to the enforcement check: {other:?}"),
        }
    }
    Ok(())
}

/// The cgroup2 mount joined with a path from /proc/self/cgroup.
fn cgroup_dir(relative: &str) -> anyhow::Result<PathBuf> {
    let mount = egressd_common::host::cgroup2_mount().context("no cgroup2 mount")?;
    Ok(mount.join(relative.trim_start_matches('/')))
}

/// The session's refused DNS names, for the end line: a name alone can carry data out, and an
/// agent's telemetry often stops at its lookup.
fn dns_words(s: &egressd_common::protocol::SessionView) -> String {
    match (s.dns_names_denied, s.dns_denied) {
        (_, 0) => String::new(),
        (1, 1) => ", 1 DNS name denied".into(),
        (n, q) if n == q => format!(", {n} DNS names denied"),
        (n, q) => format!(
            ", {n} DNS name{} denied ({q} queries)",
            if n == 1 { "" } else { "s" }
        ),
    }
}

static CHILD: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward(sig: libc::c_int) {
    let child = CHILD.load(Ordering::Relaxed);
    if child > 0 {
        // SAFETY: kill is async-signal-safe.
        unsafe { libc::kill(child, sig) };
    }
}

/// Forks; the child closes every inherited descriptor above 2 (a socket opened outside the sandbox
/// is judged by the cgroup it was created in and would slip past every hook) and execs CMD. Returns
/// the exit code to pass on: CMD's, or 128 + signal.
fn spawn_and_wait(
    started: &SessionStarted,
    keep: &[i32],
    argv: &[String],
    client: &mut Client,
) -> anyhow::Result<u8> {
    let args: Vec<CString> = argv
        .iter()
        .map(|a| CString::new(a.as_bytes()))
        .collect::<Result<_, _>>()
        .context("an argument contains a NUL byte")?;
    let relays =
        crate::stdio::socket_stdio().context("replacing socket standard descriptors by pipes")?;
    // The child's connect filter's listener comes to us over this pair; we hand it to egressd,
    // keep it (a restarted egressd takes it from us), and tell the child to go on.
    let (to_parent, to_child) = if started.unix {
        let (a, b) = nix::sys::socket::socketpair(
            nix::sys::socket::AddressFamily::Unix,
            nix::sys::socket::SockType::SeqPacket,
            None,
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        )
        .context("socketpair")?;
        (Some(a), Some(b))
    } else {
        (None, None)
    };
    // SAFETY: egressctl is single-threaded here, so the child may run arbitrary code before exec.
    match unsafe { fork() }.context("fork")? {
        ForkResult::Child => {
            std::env::set_var(SESSION_ENV, &started.id);
            // The user's bus is outside the session: CMD gets its filtered proxy, or no bus.
            match &started.bus {
                Some(address) => std::env::set_var("DBUS_SESSION_BUS_ADDRESS", address),
                None if started.unix => std::env::remove_var("DBUS_SESSION_BUS_ADDRESS"),
                None => {}
            }
            let refuse = |why: String| -> ! {
                eprintln!("egressctl: {why}; not running {}", argv[0]);
                // SAFETY: leaving the forked child without running destructors.
                unsafe { libc::_exit(125) }
            };
            for r in &relays {
                if let Err(e) = r.install_in_child() {
                    refuse(format!(
                        "cannot replace descriptor {} by a pipe ({e})",
                        r.fd
                    ));
                }
            }
            drop(to_child);
            let mut kept = keep.to_vec();
            kept.extend(to_parent.as_ref().map(|fd| fd.as_raw_fd()));
            if let Err(why) = close_inherited(&kept) {
                refuse(why);
            }
            if started.drop_capabilities {
                // The daemon checks this too; without Landlock's file rules root could write
                // cgroup.procs and leave.
                if !(started.no_new_privs && started.landlock) {
                    refuse(
                        "a root session without capabilities needs no_new_privs and Landlock"
                            .into(),
                    );
                }
                // First, while CAP_SETPCAP is still there to do it.
                if let Err(e) = crate::capabilities::drop_bounding_and_ambient() {
                    refuse(e);
                }
            }
            if started.no_new_privs {
                // Irrevocable and inherited: nothing the tool runs can gain privileges by exec.
                // SAFETY: prctl with integer arguments only.
                if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
                    refuse(format!(
                        "cannot set no_new_privs ({})",
                        std::io::Error::last_os_error()
                    ));
                }
                if started.landlock {
                    let protect = started
                        .drop_capabilities
                        .then_some(started.protected.as_slice());
                    if let Err(e) = crate::landlock_scope::restrict_self(protect) {
                        refuse(e);
                    }
                }
                // With Landlock, ptrace and friends are confined to the sandbox already (and a
                // debugger inside keeps working); without it, seccomp refuses them outright.
                let deny_ptrace = !started.ptrace && !started.landlock;
                let filter = crate::seccomp::filter(&started.families, deny_ptrace);
                if let Err(e) = crate::seccomp::install(&filter) {
                    refuse(format!("cannot install the seccomp filter ({e})"));
                }
                if let Some(pair) = &to_parent {
                    if let Err(e) = hand_over_connects(pair) {
                        refuse(format!("the unix layer could not start ({e:#})"));
                    }
                }
            }
            drop(to_parent);
            if started.drop_capabilities {
                if let Err(e) = crate::capabilities::drop_the_rest() {
                    refuse(e);
                }
            }
            let err = execvp(&args[0], &args).unwrap_err();
            eprintln!("egressctl: cannot run {}: {err}", argv[0]);
            // SAFETY: as above. 127 is the shell's "command not found".
            unsafe {
                libc::_exit(if err == nix::errno::Errno::ENOENT {
                    127
                } else {
                    126
                })
            };
        }
        ForkResult::Parent { child } => {
            CHILD.store(child.as_raw(), Ordering::Relaxed);
            drop(to_parent);
            if let Some(pair) = &to_child {
                // On failure the child is told why, says so and exits 125: wait for it.
                if let Ok(listener) = supervise_child(pair, client, &started.id) {
                    // Kept for the session's life: a restarted egressd takes it from here, and
                    // while none runs, egressctl answers for it.
                    crate::unix_fallback::start(listener, client.peer_pid().unwrap_or(0));
                }
            }
            drop(to_child);
            let outputs = crate::stdio::start(relays);
            // Terminal signals reach the child directly (same process group); the rest we pass on.
            // SAFETY: installing plain handlers; `forward` is async-signal-safe.
            unsafe {
                let _ = signal::signal(Signal::SIGINT, SigHandler::SigIgn);
                let _ = signal::signal(Signal::SIGQUIT, SigHandler::SigIgn);
                for sig in [
                    Signal::SIGTERM,
                    Signal::SIGHUP,
                    Signal::SIGUSR1,
                    Signal::SIGUSR2,
                ] {
                    let _ = signal::signal(sig, SigHandler::Handler(forward));
                }
            }
            let status = wait_for(child);
            for relay in outputs {
                let _ = relay.join();
            }
            status
        }
    }
}

/// In the child: installs the unix layer's connect filter, sends its listener to egressctl,
/// and waits for egressctl to say egressd has it. From here on every connect(2) of the session
/// waits for egressd's supervisor.
fn hand_over_connects(pair: &OwnedFd) -> anyhow::Result<()> {
    let listener = crate::seccomp::install_with_listener(&crate::seccomp::connect_filter())
        .context("installing the connect filter")?;
    let fds = [listener.as_raw_fd()];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    sendmsg::<()>(
        pair.as_raw_fd(),
        &[std::io::IoSlice::new(b"L")],
        &cmsg,
        MsgFlags::empty(),
        None,
    )
    .context("passing the listener to egressctl")?;
    drop(listener);
    let mut answer = [0u8; 512];
    let n = nix::unistd::read(pair.as_raw_fd(), &mut answer).context("waiting for egressctl")?;
    match &answer[..n] {
        b"go" => Ok(()),
        other => bail!("{}", String::from_utf8_lossy(other)),
    }
}

/// In egressctl: takes the child's listener, hands it to egressd, and lets the child go on (or
/// tells it why not). Returns the listener, which egressctl keeps.
fn supervise_child(pair: &OwnedFd, client: &mut Client, id: &str) -> anyhow::Result<OwnedFd> {
    let result = (|| -> anyhow::Result<OwnedFd> {
        let mut byte = [0u8; 1];
        let mut iov = [std::io::IoSliceMut::new(&mut byte)];
        let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
        let msg = recvmsg::<()>(
            pair.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .context("receiving the child's listener")?;
        let fd = msg
            .cmsgs()?
            .find_map(|c| match c {
                ControlMessageOwned::ScmRights(fds) => fds.first().copied(),
                _ => None,
            })
            .context("the child sent no listener")?;
        // SAFETY: the descriptor just arrived and nothing else owns it.
        let listener = unsafe { OwnedFd::from_raw_fd(fd) };
        match client.call(Op::Supervise {
            id: id.to_string(),
            fd: listener.as_raw_fd(),
        })? {
            Reply::Supervised => Ok(listener),
            other => bail!("unexpected reply from egressd: {other:?}"),
        }
    })();
    let answer = match &result {
        Ok(_) => "go".to_string(),
        Err(e) => format!("{e:#}"),
    };
    let _ = nix::unistd::write(pair, answer.as_bytes());
    result
}

/// Closes every descriptor above 2 except `keep`, with close_range(2) over the gaps.
fn close_inherited(keep: &[i32]) -> Result<(), String> {
    let mut keep: Vec<u32> = keep.iter().map(|fd| *fd as u32).collect();
    keep.sort_unstable();
    keep.dedup();
    let mut from = 3u32;
    for k in keep.iter().copied().chain(std::iter::once(u32::MAX)) {
        if k > from {
            let to = if k == u32::MAX { u32::MAX } else { k - 1 };
            // SAFETY: closes descriptors only; close_range(2) with flags 0.
            let rc = unsafe { libc::syscall(libc::SYS_close_range, from, to, 0u32) };
            if rc != 0 {
                return Err(format!(
                    "cannot close inherited descriptors: {}",
                    std::io::Error::last_os_error()
                ));
            }
        }
        from = k.saturating_add(1);
    }
    Ok(())
}

fn wait_for(child: Pid) -> anyhow::Result<u8> {
    loop {
        match waitpid(child, None) {
            Ok(WaitStatus::Exited(_, code)) => return Ok(code as u8),
            Ok(WaitStatus::Signaled(_, sig, _)) => return Ok(128 + sig as u8),
            Ok(_) => continue,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => bail!("waiting for the command: {e}"),
        }
    }
}

/// One line on stderr in one write(2), not one per formatted piece as `eprintln!` makes on the
/// unbuffered stderr: these lines are on every launch, and a reader of a shared terminal or log
/// never sees them interleaved.
fn say(mut line: String) {
    use std::io::Write as _;
    line.push('\n');
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

fn exit_words(code: u8) -> String {
    match code {
        0 => "ended (exit 0)".to_string(),
        c if c > 128 => format!("ended (killed by signal {})", c - 128),
        c => format!("ended (exit {c})"),
    }
}
