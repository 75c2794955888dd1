//! The unix layer: a session talks only to itself. Its processes may connect to a unix socket
//! (pathname or abstract; stream, seqpacket or datagram) only when the server is inside the same
//! session, or the profile names the socket. Everything else (a tmux server, `systemd --user`, the
//! session bus, a container engine, a running IDE's IPC socket, a command runner in the user's
//! home) is refused before anything reaches the server, and audited.
//!
//! How, on kernels without Landlock's unix right (ABI 9) or a loadable BPF LSM:
//! - egressctl installs a seccomp filter that turns every connect(2) of the session into a user
//!   notification, and hands the listener to the daemon before it execs CMD.
//! - The supervisor (one thread per session, here) reads the address. Anything but AF_UNIX goes
//!   on to the kernel unchanged (the cgroup connect4/6 programs judge it, as without this layer).
//! - For AF_UNIX it resolves the address as the caller would (a thread in the caller's
//!   namespaces, root, working directory and credentials), finds the bound socket with
//!   sock_diag, and looks for it among the descriptors of the session's processes. If it is the
//!   session's (or allowed), the supervisor connects the caller's own socket itself, through the
//!   resolved file (so a path swapped after the check cannot redirect it), and checks the peer's
//!   cgroup once more; otherwise connect(2) fails with EACCES.
//! - The cgroup `connect_unix`/`sendmsg_unix` programs refuse every unix connect and addressed
//!   datagram a session task makes itself: what did not come through here (io_uring, `sendto`
//!   with a unix address, an address rewritten after it was read) never reaches a server.

pub mod bus;
mod caller;
mod diag;
mod fds;
mod judge;
mod notify;
mod record;
mod stop;

pub use fds::{take_fd, take_listener};
use judge::decide;
pub use judge::name_and_server;
use notify::{respond, unix_address, Answer};
pub use stop::stop_all;

use std::{
    collections::{HashMap, HashSet},
    fs, io,
    mem::MaybeUninit,
    os::{
        fd::{AsRawFd as _, OwnedFd},
        unix::fs::{FileTypeExt as _, MetadataExt as _},
    },
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use tokio::sync::mpsc;

use crate::audit;
pub use caller::Creds;

/// Unix connects per session (cgroup id) decided here: (allowed, refused). The kernel's counters
/// do not see them; the summary and the session_end record add them in.
#[derive(Clone, Default)]
pub struct Counts(Arc<Mutex<HashMap<u64, (u64, u64)>>>);

impl Counts {
    fn add(&self, session: u64, allowed: bool) {
        if let Ok(mut m) = self.0.lock() {
            let e = m.entry(session).or_default();
            if allowed {
                e.0 += 1;
            } else {
                e.1 += 1;
            }
        }
    }

    pub fn get(&self, session: u64) -> (u64, u64) {
        self.0
            .lock()
            .ok()
            .and_then(|m| m.get(&session).copied())
            .unwrap_or_default()
    }

    pub fn take(&self, session: u64) -> (u64, u64) {
        self.0
            .lock()
            .ok()
            .and_then(|mut m| m.remove(&session))
            .unwrap_or_default()
    }
}

/// What the supervisor of one session knows.
pub struct Watch {
    pub session: String,
    pub cgroup_id: u64,
    /// The session's cgroup directory (whose cgroup.procs lists its processes).
    pub cgroup_dir: PathBuf,
    /// The session's cgroup as /proc/PID/cgroup names it.
    pub cgroup: String,
    /// The parent of every session, as /proc/PID/cgroup names it (to tell another session).
    pub parent: String,
    /// The profile's unix allow list: paths, and `@name` for abstract names ($UID expanded).
    pub allow: Vec<String>,
    /// Audit mode: what would be refused is connected, and recorded as audit_denied.
    pub audit_only: bool,
    /// egressd's own control socket, which a session may use (status, its own summary).
    pub control_socket: PathBuf,
    pub audit: mpsc::Sender<audit::Message>,
    pub counts: Counts,
}

/// The allow list resolved in the caller's view when supervision starts: socket files by (inode,
/// encoded device), and abstract names. A file replaced later is a different inode, not allowed.
#[derive(Default)]
struct Allowed {
    files: HashSet<(u32, u32)>,
    names: HashSet<Vec<u8>>,
}

/// A session's allow list as resolved by `resolve`.
pub struct Resolved(Arc<Allowed>);

/// The session's allow list resolved in `caller_pid`'s view (its mount and network namespaces,
/// root and credentials), with egressd's control socket. Done before the session's command may
/// run, so nothing of the session can race it.
pub fn resolve(allow: &[String], control_socket: &Path, caller_pid: u32) -> io::Result<Resolved> {
    let creds = Creds::of(caller_pid)?;
    let mut entries: Vec<String> = allow
        .iter()
        .filter(|e| !e.starts_with('@'))
        .cloned()
        .collect();
    let mut names: HashSet<Vec<u8>> = allow
        .iter()
        .filter_map(|e| e.strip_prefix('@'))
        .map(|n| {
            let mut v = vec![0u8];
            v.extend_from_slice(n.as_bytes());
            v
        })
        .collect();
    names.shrink_to_fit();
    let mut files = caller::as_caller(caller_pid, &creds, move |_| {
        Ok(entries
            .drain(..)
            .filter_map(|p| fs::metadata(&p).ok())
            .filter(|m| m.file_type().is_socket())
            .map(|m| (m.ino() as u32, diag::encode_dev(m.dev())))
            .collect::<HashSet<_>>())
    })?;
    if let Ok(m) = fs::metadata(control_socket) {
        files.insert((m.ino() as u32, diag::encode_dev(m.dev())));
    }
    Ok(Resolved(Arc::new(Allowed { files, names })))
}

/// Starts supervising the session's connects through `listener` (a seccomp notification fd
/// taken from `caller_pid`, egressctl before it execs CMD), with the allow list resolved for it
/// (`resolve`), or resolved now.
pub fn supervise(
    listener: OwnedFd,
    watch: Watch,
    caller_pid: u32,
    resolved: Option<Resolved>,
) -> io::Result<()> {
    let allowed = match resolved {
        Some(Resolved(allowed)) => allowed,
        None => resolve(&watch.allow, &watch.control_socket, caller_pid)?.0,
    };
    let watch = Arc::new(watch);
    std::thread::Builder::new()
        .name(format!("egressd-unix-{}", watch.session))
        .spawn(move || serve(listener, watch, allowed))?;
    Ok(())
}

const SYNC_WAKE_UP: u64 = 1;

fn serve(listener: OwnedFd, watch: Arc<Watch>, allowed: Arc<Allowed>) {
    let _busy = stop::Busy::supervisor();
    let fd = listener.as_raw_fd();
    // Wake the supervisor on the notifying CPU (Linux 6.6+): a connect waits less for its answer.
    // The same kernels wake a NOTIF_RECV blocked on a filter whose tasks are all gone, so there the
    // supervisor waits in NOTIF_RECV itself, a system call less per connect than poll + NOTIF_RECV;
    // older kernels would leave it blocked after the session ends, so it polls.
    // SAFETY: an ioctl with an integer argument on our own descriptor.
    let sync = unsafe { libc::ioctl(fd, libc::SECCOMP_IOCTL_NOTIF_SET_FLAGS, SYNC_WAKE_UP) } == 0;
    let listener = Arc::new(listener);
    // POLLIN, or POLLHUP once every task of the filter is gone and the session has ended.
    let wait = |timeout: i32| -> Option<libc::c_short> {
        loop {
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one pollfd of our own descriptor.
            let rc = unsafe { libc::poll(&mut pfd, 1, timeout) };
            if rc >= 0 {
                return Some(pfd.revents);
            }
            if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted || stop::stopping() {
                return None;
            }
        }
    };
    // A received notification is always answered before the loop looks at `stopping` again.
    while !stop::stopping() {
        if !sync {
            match wait(-1) {
                Some(revents) if revents & libc::POLLIN != 0 => {}
                _ => break,
            }
        }
        // SAFETY: the kernel requires a zeroed struct and fills it.
        let mut n: libc::seccomp_notif = unsafe { MaybeUninit::zeroed().assume_init() };
        // SAFETY: NOTIF_RECV into a struct of the type the ioctl names.
        if unsafe { libc::ioctl(fd, libc::SECCOMP_IOCTL_NOTIF_RECV, &mut n) } < 0 {
            match io::Error::last_os_error().raw_os_error() {
                Some(libc::EINTR) => continue,
                // The caller was interrupted by a signal, another reader took it, or (blocked in
                // NOTIF_RECV) the session's last task is gone: POLLHUP says which.
                Some(libc::ENOENT) => {
                    if sync && wait(0).is_none_or(|r| r & libc::POLLHUP != 0) {
                        break;
                    }
                    continue;
                }
                _ => break,
            }
        }
        match unix_address(fd, &n) {
            None => respond(fd, n.id, Answer::Continue),
            Some(addr) => {
                // Resolving and connecting may block (a full backlog): never the whole session.
                let (listener, watch, allowed) = (listener.clone(), watch.clone(), allowed.clone());
                let busy = stop::Busy::decision();
                let spawned = std::thread::Builder::new()
                    .name("egressd-unix-connect".into())
                    .spawn(move || {
                        let _busy = busy;
                        let (answer, record) = decide(&watch, &allowed, &n, &addr);
                        respond(listener.as_raw_fd(), n.id, answer);
                        if let Some(record) = record {
                            record::send(&watch, record);
                        }
                    });
                if spawned.is_err() {
                    respond(fd, n.id, Answer::Errno(libc::EAGAIN));
                }
            }
        }
    }
    tracing::debug!(session = %watch.session, "unix supervision ended");
}
