//! The control socket: newline-delimited JSON, one request per line, the caller identified by
//! SO_PEERCRED only. A bad message gets an error reply and never harms the daemon or other clients.

use egressd_common::policy::{describe, RootSessions};
use std::{
    os::fd::{AsRawFd, FromRawFd as _, OwnedFd},
    sync::Arc,
    time::Duration,
};

use egressd_common::protocol::{
    DaemonStatus, EnforcementCheck, Op, PolicyView, Reply, Request, Response, SessionStarted,
    SessionView, MAX_MESSAGE_BYTES, PROTOCOL_VERSION,
};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
};

use crate::{
    cgroup,
    daemon::State,
    sessions::{self, Session},
};

/// A client that sends nothing for this long is disconnected.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

pub async fn serve(state: Arc<State>, listener: UnixListener) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let state = state.clone();
                tokio::spawn(async move {
                    if let Err(e) = connection(state, stream).await {
                        tracing::debug!("control connection ended: {e}");
                    }
                });
            }
            Err(e) => {
                tracing::warn!("accepting on the control socket: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Who is calling, from the kernel (SO_PEERCRED), never from the message.
pub struct Caller {
    pub uid: u32,
    pub pid: Option<u32>,
    /// The calling process itself (SO_PEERPIDFD, Linux 6.5+), which no later process can be
    /// mistaken for: `pid` is only a number, and a number can be reused once its process is gone.
    pub pidfd: Option<OwnedFd>,
}

impl Caller {
    /// Whether `pid` still names the caller: true until the caller has exited and been reaped,
    /// which is what frees its pid for reuse. Then `pid` has named it, and nothing else, from the
    /// moment it connected until now. Without SO_PEERPIDFD there is nothing to ask: true.
    pub fn pid_still_names_it(&self) -> bool {
        self.pidfd.as_ref().is_none_or(|fd| {
            // SAFETY: pidfd_send_signal with signal 0 only checks that the process exists.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    fd.as_raw_fd(),
                    0,
                    std::ptr::null::<libc::siginfo_t>(),
                    0,
                )
            };
            r == 0
        })
    }
}

/// A pidfd of the peer as it was when it connected; None on kernels without SO_PEERPIDFD.
fn peer_pidfd(stream: &impl AsRawFd) -> Option<OwnedFd> {
    let mut fd: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: the option value is a c_int of the length passed.
    let r = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERPIDFD,
            (&mut fd as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    // SAFETY: on success the kernel installed a new descriptor that nothing else owns.
    (r == 0 && fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
}

async fn connection(state: Arc<State>, stream: UnixStream) -> std::io::Result<()> {
    let cred = stream.peer_cred()?;
    // The unix supervisor connects a session's sockets itself, so a session's connection to this
    // socket names this process as its peer. Such a caller is a sandbox whose pid is unknown:
    // never taken for the daemon, never moved, never allowed to change anything.
    let via_supervisor = cred.pid() == Some(std::process::id() as i32);
    let caller = Caller {
        uid: cred.uid(),
        pid: cred
            .pid()
            .and_then(|p| u32::try_from(p).ok())
            .filter(|_| !via_supervisor),
        pidfd: if via_supervisor {
            None
        } else {
            peer_pidfd(&stream)
        },
    };
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut line = Vec::new();
    // The connection that started a session is egressctl's for the session's life: a session
    // task cannot connect anew without the supervisor, and its summary comes back on it.
    let mut lifeline = false;
    loop {
        line.clear();
        let mut limited = (&mut reader).take(MAX_MESSAGE_BYTES as u64 + 1);
        let read = limited.read_until(b'\n', &mut line);
        let n = if lifeline {
            read.await?
        } else {
            tokio::time::timeout(IDLE_TIMEOUT, read)
                .await
                .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "idle client"))??
        };
        if n == 0 {
            return Ok(());
        }
        let oversized = line.len() > MAX_MESSAGE_BYTES;
        let response = if oversized {
            Response::error(format!(
                "request longer than {MAX_MESSAGE_BYTES} bytes; connection closed"
            ))
        } else {
            match serde_json::from_slice::<Request>(&line) {
                Err(e) => Response::error(format!("malformed request: {e}")),
                Ok(req) if req.v != PROTOCOL_VERSION => Response::error(format!(
                    "protocol version {} is not supported (this egressd speaks {PROTOCOL_VERSION}); use an egressctl of the same version",
                    req.v
                )),
                Ok(req) => {
                    let reply = handle(&state, &caller, req.op).await;
                    lifeline |= matches!(reply, Reply::Started(_));
                    Response::new(reply)
                }
            }
        };
        let mut out = serde_json::to_vec(&response).map_err(std::io::Error::other)?;
        out.push(b'\n');
        write.write_all(&out).await?;
        if oversized {
            return Ok(());
        }
    }
}

fn error(message: impl Into<String>) -> Reply {
    Reply::Error {
        message: message.into(),
    }
}

/// The layers of a session: the daemon's, and egressctl's seccomp filter (which needs
/// no_new_privs). The unix layer needs both the kernel's unix hooks and that filter (its
/// supervisor hears of every connect through it), and a profile that confines unix sockets.
fn session_layers(daemon: &[String], no_new_privs: bool, unix_open: bool) -> Vec<String> {
    let mut layers = daemon.to_vec();
    if no_new_privs {
        layers.insert(1, "seccomp".into());
    } else {
        // Landlock, like seccomp, needs no_new_privs in an unprivileged process.
        layers.retain(|l| l != "landlock" && l != "unix");
    }
    if unix_open {
        layers.retain(|l| l != "unix");
    }
    layers
}

/// Why a session of this profile has no unix layer, in words for the person starting it.
fn unix_missing(state: &State, no_new_privs: bool, unix_open: bool) -> Option<String> {
    if unix_open {
        return Some("the profile sets unix = \"open\"".into());
    }
    if !no_new_privs {
        return Some("the profile sets no_new_privs = false, which seccomp needs".into());
    }
    state.unix_missing.clone()
}

/// The directories of egressd's own files (audit log, policy, control socket and session records)
/// a root sandbox must not write.
fn protected_paths(state: &State) -> Vec<String> {
    let mut dirs: Vec<String> = [
        state.audit_path.parent(),
        state.config_path.parent(),
        state.state_dir.0.parent(),
    ]
    .into_iter()
    .flatten()
    .filter(|d| !d.as_os_str().is_empty())
    .map(|d| d.display().to_string())
    .collect();
    dirs.sort();
    dirs.dedup();
    dirs
}

/// Whether `pid` runs inside a sandbox: such a caller may read, never change, the daemon's state.
fn sandboxed(state: &State, pid: Option<u32>) -> bool {
    let parent_rel = state.layout.relative(&state.layout.parent);
    match pid.and_then(sessions::cgroup_of) {
        Some(cgroup) => sessions::is_under(&cgroup, &parent_rel),
        // Unknown: treat as sandboxed, the safe side for a request that changes things.
        None => true,
    }
}

async fn handle(state: &State, caller: &Caller, op: Op) -> Reply {
    if matches!(op, Op::Reload) && sandboxed(state, caller.pid) {
        return error("refused: the caller runs inside a sandbox, and a sandbox may not change the policy (even as root)");
    }
    match op {
        Op::Run { profile, argv } => match start_session(state, caller, profile, argv).await {
            Ok(started) => Reply::Started(started),
            Err(message) => error(message),
        },
        Op::Status => status(state).await,
        Op::Ps => {
            let visible: Vec<Session> = state
                .registry
                .lock()
                .await
                .all()
                .filter(|s| caller.uid == 0 || s.uid == caller.uid)
                .cloned()
                .collect();
            let mut views = Vec::new();
            for s in visible {
                views.push(view(state, &s).await);
            }
            Reply::Sessions(views)
        }
        Op::Denials { after } => {
            let mine: std::collections::HashSet<String> = state
                .registry
                .lock()
                .await
                .all()
                .filter(|s| s.uid == caller.uid)
                .map(|s| s.id.clone())
                .collect();
            // Root sees every denial, ended sessions' included; others those of their running
            // sessions.
            Reply::Denials(
                state
                    .recent
                    .after(after, |s| caller.uid == 0 || mine.contains(s)),
            )
        }
        Op::Summary { id } => match owned_session(state, caller, &id).await {
            Ok(s) => {
                let mut v = view(state, &s).await;
                let c = &v.counters;
                if c.allowed + c.denied + c.sockets_refused + c.backstop_dropped > 0 {
                    // The session's last decisions may still be on their way to the file: let the
                    // audit task try them first, so what it says it lost is the whole of it.
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    state
                        .audit(crate::audit::Message::Settle(s.cgroup_id, tx))
                        .await;
                    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), rx).await;
                    v = view(state, &s).await;
                }
                Reply::Session(v)
            }
            Err(m) => error(m),
        },
        Op::PolicyShow { profile } => {
            let policy = state.policy.read().await;
            let mut value = match serde_json::to_value(&policy.config) {
                Ok(v) => v,
                Err(e) => return error(e.to_string()),
            };
            if let Some(name) = profile {
                let Some(p) = value["profiles"].get(&name).cloned() else {
                    return error(format!("no profile {name:?}"));
                };
                value["profiles"] = serde_json::json!({ name: p });
            }
            Reply::Policy(PolicyView {
                source: policy.source.clone(),
                hash: policy.hash.clone(),
                policy: value,
            })
        }
        Op::Reload if caller.uid != 0 => error("only root may reload the policy"),
        Op::Reload => match state.reload().await {
            Ok(()) => {
                let policy = state.policy.read().await;
                Reply::Policy(PolicyView {
                    source: policy.source.clone(),
                    hash: policy.hash.clone(),
                    policy: serde_json::to_value(&policy.config).unwrap_or_default(),
                })
            }
            Err(e) => error(e),
        },
        Op::Notices { id, tty, bus } => match notices(state, caller, &id, tty, bus).await {
            Ok(()) => Reply::Noticing,
            Err(m) => error(m),
        },
        Op::Supervise { id, fd } => match supervise(state, caller, &id, fd).await {
            Ok(()) => Reply::Supervised,
            Err(m) => error(m),
        },
        Op::CheckEnforced { id } => match owned_session(state, caller, &id).await {
            Ok(s) => match state.enforcer.missing_on(s.dir.clone()).await {
                Ok(missing) => Reply::Enforced(EnforcementCheck { missing }),
                Err(e) => error(format!("checking the session's programs: {e}")),
            },
            Err(m) => error(m),
        },
    }
}

async fn view(state: &State, s: &Session) -> SessionView {
    let mut counters = state
        .enforcer
        .counters(s.cgroup_id)
        .await
        .unwrap_or_default();
    let (unix_allowed, unix_refused) = state.handoff.get(s.cgroup_id);
    counters.allowed += unix_allowed;
    counters.denied += unix_refused;
    let mut view = s.view(counters);
    (view.dns_allowed, view.dns_denied, view.dns_names_denied) = state.dns.get(s.cgroup_id);
    view.audit_lost = state
        .audit_lost
        .lock()
        .ok()
        .and_then(|l| l.get(&s.id).copied())
        .unwrap_or(0);
    view
}

/// Takes the session's seccomp listener from egressctl (the caller, inside the session since the
/// move) and starts the supervisor on it.
async fn supervise(state: &State, caller: &Caller, id: &str, fd: i32) -> Result<(), String> {
    // Only the egressctl that started the session hands its listener over, and only once:
    // nothing else can make the daemon answer for the session's connects.
    let (session, pid) = caller_in_session(state, caller, id).await?;
    if !state.supervised.lock().await.insert(id.to_string()) {
        return Err(format!("session {id} is supervised already"));
    }
    let listener = crate::handoff::take_listener(pid, fd)
        .map_err(|e| format!("taking the session's seccomp listener: {e}"))?;
    // The command runs once this reply is in: the session's record (written since Run) is on
    // disk first. The listener's, saved below, may trail it by a write; a daemon killed in that
    // moment restarts with the session's profile but cannot supervise its unix connects again:
    // egressctl lets them on to the kernel's backstop, which refuses them.
    sessions::records_written().await;
    state.start_supervision(&session, listener, pid).await?;
    let mut session = session;
    session.listener = Some((pid, fd));
    state
        .state_dir
        .save_soon(&session, "a restarted daemon could not supervise it");
    state.registry.lock().await.insert(session);
    Ok(())
}

/// Takes what the session's notices go to from egressctl (inside the session since the move):
/// a terminal, and the user's session bus as a unix socket of theirs. Anything else is refused:
/// a notice must never become a way out (a socket to elsewhere, a bus at a TCP address).
async fn notices(
    state: &State,
    caller: &Caller,
    id: &str,
    tty: Option<i32>,
    bus: Option<String>,
) -> Result<(), String> {
    let (session, pid) = caller_in_session(state, caller, id).await?;
    let tty = match tty {
        Some(fd) => {
            let fd = crate::handoff::take_fd(pid, fd)
                .map_err(|e| format!("taking the terminal: {e}"))?;
            if !nix::unistd::isatty(fd.as_raw_fd()).unwrap_or(false) {
                return Err(format!("descriptor of {pid} is not a terminal"));
            }
            Some(crate::notices::reopen_nonblocking(&fd)?)
        }
        None => None,
    };
    let bus = bus.map(|b| user_bus(&b, session.uid)).transpose()?;
    state
        .notices
        .add(id, crate::notices::Target::new(tty, bus, session.uid));
    Ok(())
}

/// The path of a session bus address that is a unix socket the user owns (`unix:path=P`, the
/// first address of a list), or why not.
fn user_bus(address: &str, uid: u32) -> Result<std::path::PathBuf, String> {
    use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
    let first = address.split(';').next().unwrap_or("");
    let path = first
        .strip_prefix("unix:")
        .and_then(|rest| rest.split(',').find_map(|kv| kv.strip_prefix("path=")))
        .ok_or_else(|| {
            format!("session bus {first:?}: only a unix:path= address is used for notices")
        })?;
    let meta = std::fs::metadata(path).map_err(|e| format!("session bus {path}: {e}"))?;
    if !meta.file_type().is_socket() || meta.uid() != uid {
        return Err(format!(
            "session bus {path}: not a socket of uid {uid}; no desktop notices"
        ));
    }
    Ok(std::path::PathBuf::from(path))
}

/// The caller's session and pid, when the caller is a process inside that session (egressctl
/// after the move): what may hand egressd a descriptor of the session's.
async fn caller_in_session(
    state: &State,
    caller: &Caller,
    id: &str,
) -> Result<(Session, u32), String> {
    let session = owned_session(state, caller, id).await?;
    let pid = caller
        .pid
        .ok_or("the kernel did not report the caller's pid")?;
    if sessions::cgroup_of(pid).as_deref() != Some(session.cgroup.as_str()) {
        return Err(format!("pid {pid} is not in session {id}"));
    }
    Ok((session, pid))
}

async fn owned_session(state: &State, caller: &Caller, id: &str) -> Result<Session, String> {
    let registry = state.registry.lock().await;
    match registry.get(id) {
        // Same answer for "not yours" and "absent": ids of other users' sessions are not disclosed.
        Some(s) if caller.uid == 0 || s.uid == caller.uid => Ok(s.clone()),
        _ => Err(format!("no session {id} of yours")),
    }
}

async fn status(state: &State) -> Reply {
    let hooks = match state.enforcer.hooks().await {
        Ok(h) => h,
        Err(e) => return error(e.to_string()),
    };
    let policy = state.policy.read().await;
    Reply::Status(DaemonStatus {
        version: env!("CARGO_PKG_VERSION").to_string(),
        pid: std::process::id(),
        cgroup_parent: state.layout.parent.display().to_string(),
        hooks,
        policy_source: policy.source.clone(),
        default_profile: policy.config.default_profile.clone(),
        profiles: policy.config.profiles.keys().cloned().collect(),
        sessions: state.registry.lock().await.len(),
        audit_path: state.audit_path.display().to_string(),
        layers: state.layers.clone(),
        unix_missing: state.unix_missing.clone(),
        audit: state.audit_health.lock().ok().map(|h| h.clone()),
    })
}

/// Where the audit log's `disk_full_action`/`disk_error_action` is "refuse", a session starts only
/// while the log can take its records: the audit task answers after trying the file.
async fn admit(state: &State) -> Result<(), String> {
    // Read at start, like the rest of [audit]: the audit task judges with the settings it has.
    if !state.audit_refuses {
        return Ok(());
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    state.audit(crate::audit::Message::Admit(tx)).await;
    match tokio::time::timeout(std::time::Duration::from_secs(10), rx).await {
        Ok(Ok(answer)) => answer,
        _ => Err("the audit task did not say within 10 s whether the audit log can be written, and [audit] refuses sessions it cannot record: see `egressctl status` and egressd's log".into()),
    }
}

async fn start_session(
    state: &State,
    caller: &Caller,
    profile: Option<String>,
    argv: Vec<String>,
) -> Result<SessionStarted, String> {
    let pid = caller.pid.ok_or(
        "the caller is already sandboxed (it reached egressd through the session's unix supervisor), or the kernel did not report its pid; sessions cannot be nested or changed from inside",
    )?;
    // A sandboxed process must not be able to trade its session for a more permissive one.
    let parent_rel = state.layout.relative(&state.layout.parent);
    match sessions::cgroup_of(pid) {
        Some(current) if sessions::is_under(&current, &parent_rel) => {
            return Err(format!(
                "the caller is already sandboxed (cgroup {current}); sessions cannot be nested or changed from inside"
            ));
        }
        Some(_) => {}
        None => return Err(format!("cannot read the cgroup of pid {pid}")),
    }
    let (profile, index, allows, no_new_privs, families, ptrace, drop_capabilities, unix_open) = {
        let policy = state.policy.read().await;
        let name = profile.unwrap_or_else(|| policy.config.default_profile.clone());
        let Some(p) = policy.config.profiles.get(&name) else {
            return Err(format!(
                "no profile {name:?}; profiles: {}",
                policy
                    .config
                    .profiles
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        };
        // The user and group databases only when the grant depends on them (an [access] table
        // that names users or groups): each lookup reads the NSS files on the launch path.
        let granted = policy.config.may_use(&name, caller.uid, None, &[]) || {
            let (user, groups) = user_and_groups(caller.uid);
            policy
                .config
                .may_use(&name, caller.uid, user.as_deref(), &groups)
        };
        if !granted {
            return Err(format!(
                "profile {name:?} is not granted to uid {} (see [access] in {})",
                caller.uid, policy.source
            ));
        }
        let drop_capabilities = match (caller.uid, p.root) {
            (0, RootSessions::Refuse) => {
                return Err(format!(
                    "profile {name:?} refuses sessions for root (root = \"refuse\" in {}): run egressctl as your own user, not with sudo",
                    policy.source
                ))
            }
            (0, RootSessions::DropCapabilities) => {
                if !state.layers.iter().any(|l| l == "landlock") {
                    return Err(format!(
                        "profile {name:?} runs root without capabilities, which needs Landlock to keep it from writing cgroup.procs, and this kernel has none; run egressctl as your own user"
                    ));
                }
                true
            }
            _ => false,
        };
        let unix_open = p.unix == egressd_common::policy::UnixSockets::Open;
        let layers = session_layers(&state.layers, p.no_new_privs.unwrap_or(true), unix_open);
        if let Some(missing) = p.require.iter().find(|l| !layers.contains(l)) {
            return Err(format!(
                "profile {name:?} requires the {missing:?} enforcement layer, which is not in force on this machine (in force: {}); `egressctl doctor` says why",
                layers.join(", ")
            ));
        }
        let index = policy.index_of(&name).ok_or("profile index missing")?;
        let families = egressd_common::policy::family_numbers(p)?;
        (
            name,
            index,
            describe(p),
            p.no_new_privs.unwrap_or(true),
            families,
            p.ptrace.unwrap_or(false),
            drop_capabilities,
            unix_open,
        )
    };

    admit(state).await?;
    let id = sessions::new_id();
    let dir = state.layout.session_dir(&id);
    let cgroup_id = match &state.systemd {
        None => cgroup::create(&dir).map_err(|e| e.to_string())?,
        Some(systemd) => {
            // systemd moves the caller into the scope as it starts it, so here (unlike the direct
            // path) the caller is in the session's cgroup before the session is registered below.
            // That window is safe: the caller is egressctl, blocked on this reply before it execs
            // anything, and the programs give a cgroup under the slice with no registered session
            // the strictest policy (loopback only, `current_session` in egressd-ebpf), so whatever
            // ran there would be held tighter, never looser. The session is registered before we
            // reply, so CMD only ever runs under its profile.
            let unit = state.layout.session_name(&id);
            systemd
                .start_scope(&unit, &id, pid, crate::systemd::SLICE)
                .await
                .map_err(|e| format!("creating the session's scope: {e}"))?;
            // The programs sit on the slice's cgroup as it was when egressd started. A slice that
            // was stopped and started again since is a new cgroup without them: refuse rather than
            // hand out a sandbox with nothing in it.
            let missing = state
                .enforcer
                .missing_on(dir.clone())
                .await
                .map_err(|e| format!("checking the session's programs: {e}"))?;
            if !missing.is_empty() {
                return Err(format!(
                    "egressd's programs ({}) are not in force on {}: was {} stopped and started again since egressd started? Restart egressd",
                    missing.join(", "),
                    dir.display(),
                    crate::systemd::SLICE
                ));
            }
            cgroup::id_of(&dir).map_err(|e| e.to_string())?
        }
    };
    let session = Session {
        id: id.clone(),
        profile: profile.clone(),
        profile_index: index,
        uid: caller.uid,
        cgroup: state.layout.relative(&dir),
        dir: dir.clone(),
        cgroup_id,
        started: sessions::now_secs(),
        argv,
        listener: None,
    };
    // The policy is in the kernel, and the audit task knows the session, before the caller enters.
    state.name(&session);
    let setup = async {
        state
            .enforcer
            .add_session(cgroup_id, index)
            .await
            .map_err(|e| e.to_string())?;
        if state.systemd.is_none() {
            cgroup::move_process(&dir, pid).map_err(|e| e.to_string())?;
        }
        // Checked after the move: a caller that still runs now ran throughout, so the pid moved
        // was its own. One that exited may have had its pid reused by another process, which the
        // move then put into this cgroup (held to loopback, never let out): refuse the session.
        if !caller.pid_still_names_it() {
            return Err(format!(
                "the caller (pid {pid}) exited while its session was set up; nothing was run"
            ));
        }
        state.watch(&session);
        state.state_dir.save_soon(
            &session,
            "a restarted daemon will treat it as loopback-only",
        );
        Ok::<_, String>(())
    };
    // The enforcement check egressctl would otherwise ask for in a second round trip, made while
    // the session is set up (it reads only the cgroup's effective programs; a failed query is not
    // an answer: egressctl then asks itself).
    let (setup, missing) = tokio::join!(setup, state.enforcer.missing_on(dir.clone()));
    if let Err(e) = setup {
        let _ = state.enforcer.remove_session(cgroup_id).await;
        // A failed scope is left to systemd: it stops once egressctl, refused, exits.
        if state.layout.removes_session_cgroups() {
            let _ = cgroup::remove(&dir);
        }
        return Err(format!("setting up the sandbox failed: {e}"));
    }
    tracing::info!(
        session = %id, uid = caller.uid, pid, profile = %profile, argv = ?session.argv,
        "session started"
    );
    let hash = state.policy.read().await.hash.clone();
    state
        .audit(crate::audit::Message::SessionStart(
            session.clone(),
            hash,
            false,
            session_layers(&state.layers, no_new_privs, unix_open),
        ))
        .await;
    let bus = if unix_missing(state, no_new_privs, unix_open).is_none() {
        let bus = state.start_bus(&session).await;
        // Resolved while egressctl forks and sets up its filters; the supervisor takes it when
        // the listener comes.
        state.prepare_supervision(&session, pid).await;
        bus
    } else {
        // No supervision step: the command runs as soon as egressctl has this reply, so its
        // record is on disk first.
        sessions::records_written().await;
        None
    };
    let cgroup = session.cgroup.clone();
    let missing = missing.ok();
    state.registry.lock().await.insert(session);
    Ok(SessionStarted {
        missing,
        id,
        profile,
        cgroup,
        allows,
        no_new_privs,
        layers: session_layers(&state.layers, no_new_privs, unix_open),
        unix: unix_missing(state, no_new_privs, unix_open).is_none(),
        unix_missing: unix_missing(state, no_new_privs, unix_open),
        bus,
        families,
        ptrace,
        landlock: no_new_privs && state.layers.iter().any(|l| l == "landlock"),
        drop_capabilities,
        protected: if drop_capabilities {
            protected_paths(state)
        } else {
            Vec::new()
        },
    })
}

/// The caller's user name and group names, from the user and group databases.
fn user_and_groups(uid: u32) -> (Option<String>, Vec<String>) {
    use nix::unistd::{getgrouplist, Group, Uid, User};
    let Ok(Some(user)) = User::from_uid(Uid::from_raw(uid)) else {
        return (None, Vec::new());
    };
    let name = std::ffi::CString::new(user.name.clone()).unwrap_or_default();
    let groups = getgrouplist(&name, user.gid)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|gid| Group::from_gid(gid).ok().flatten().map(|g| g.name))
        .collect();
    (Some(user.name), groups)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{fs, os::unix::net::UnixStream as StdStream, process::Command};

    fn caller_with(pidfd: Option<OwnedFd>) -> Caller {
        Caller {
            uid: 0,
            pid: None,
            pidfd,
        }
    }

    fn pid_of(pidfd: &OwnedFd) -> String {
        let info = fs::read_to_string(format!("/proc/self/fdinfo/{}", pidfd.as_raw_fd())).unwrap();
        info.lines()
            .find_map(|l| l.strip_prefix("Pid:"))
            .unwrap()
            .trim()
            .to_string()
    }

    #[test]
    fn the_peer_pidfd_is_the_connecting_process() {
        let (ours, _theirs) = StdStream::pair().unwrap();
        let pidfd = peer_pidfd(&ours).expect("SO_PEERPIDFD (Linux 6.5+)");
        assert_eq!(pid_of(&pidfd), std::process::id().to_string());
        assert!(caller_with(Some(pidfd)).pid_still_names_it());
    }

    #[test]
    fn a_reaped_caller_no_longer_owns_its_pid() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        // SAFETY: pidfd_open of our own unreaped child; the result is a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, child.id(), 0) };
        assert!(fd >= 0, "pidfd_open: {}", std::io::Error::last_os_error());
        // SAFETY: a new descriptor nothing else owns.
        let caller = caller_with(Some(unsafe { OwnedFd::from_raw_fd(fd as i32) }));
        assert!(caller.pid_still_names_it());
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(!caller.pid_still_names_it());
        // Without a pidfd there is nothing to ask.
        assert!(caller_with(None).pid_still_names_it());
    }
}
