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

use std::{
    collections::{HashMap, HashSet},
    fs, io,
    mem::MaybeUninit,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
        unix::fs::{FileTypeExt as _, MetadataExt as _},
    },
    path::PathBuf,
    sync::{Arc, Mutex},
};

use egressd_common::audit::Record;
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

/// The seccomp listener `fd` of the caller (egressctl's child), checked to be one.
pub fn take_listener(pid: u32, fd: i32) -> io::Result<OwnedFd> {
    let listener = take_socket(pid, fd)?;
    let what = fs::read_link(format!("/proc/self/fd/{}", listener.as_raw_fd()))?;
    if what.as_os_str() != "anon_inode:seccomp notify" {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "descriptor {fd} is {}, not a seccomp listener",
                what.display()
            ),
        ));
    }
    Ok(listener)
}

/// Starts supervising the session's connects through `listener` (a seccomp notification fd
/// taken from `caller_pid`, egressctl before it execs CMD).
pub fn supervise(listener: OwnedFd, watch: Watch, caller_pid: u32) -> io::Result<()> {
    let creds = Creds::of(caller_pid)?;
    let mut entries: Vec<String> = watch
        .allow
        .iter()
        .filter(|e| !e.starts_with('@'))
        .cloned()
        .collect();
    let mut names: HashSet<Vec<u8>> = watch
        .allow
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
    if let Ok(m) = fs::metadata(&watch.control_socket) {
        files.insert((m.ino() as u32, diag::encode_dev(m.dev())));
    }
    let allowed = Arc::new(Allowed { files, names });
    let watch = Arc::new(watch);
    std::thread::Builder::new()
        .name(format!("egressd-unix-{}", watch.session))
        .spawn(move || serve(listener, watch, allowed))?;
    Ok(())
}

const SYNC_WAKE_UP: u64 = 1;

fn serve(listener: OwnedFd, watch: Arc<Watch>, allowed: Arc<Allowed>) {
    let fd = listener.as_raw_fd();
    // Wake the supervisor on the notifying CPU (Linux 6.6+): a connect waits less for its answer.
    // SAFETY: an ioctl with an integer argument on our own descriptor.
    unsafe { libc::ioctl(fd, libc::SECCOMP_IOCTL_NOTIF_SET_FLAGS, SYNC_WAKE_UP) };
    let listener = Arc::new(listener);
    loop {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd of our own descriptor.
        let rc = unsafe { libc::poll(&mut pfd, 1, -1) };
        if rc < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            break;
        }
        if pfd.revents & libc::POLLIN == 0 {
            // POLLHUP: every task of the filter is gone, the session has ended.
            break;
        }
        // SAFETY: the kernel requires a zeroed struct and fills it.
        let mut n: libc::seccomp_notif = unsafe { MaybeUninit::zeroed().assume_init() };
        // SAFETY: NOTIF_RECV into a struct of the type the ioctl names.
        if unsafe { libc::ioctl(fd, libc::SECCOMP_IOCTL_NOTIF_RECV, &mut n) } < 0 {
            match io::Error::last_os_error().raw_os_error() {
                // The caller was interrupted by a signal, or another reader took it.
                Some(libc::ENOENT) | Some(libc::EINTR) => continue,
                _ => break,
            }
        }
        match unix_address(fd, &n) {
            None => respond(fd, n.id, Answer::Continue),
            Some(addr) => {
                // Resolving and connecting may block (a full backlog): never the whole session.
                let (listener, watch, allowed) = (listener.clone(), watch.clone(), allowed.clone());
                let spawned = std::thread::Builder::new()
                    .name("egressd-unix-connect".into())
                    .spawn(move || {
                        let answer = decide(&watch, &allowed, &n, &addr);
                        respond(listener.as_raw_fd(), n.id, answer);
                    });
                if spawned.is_err() {
                    respond(fd, n.id, Answer::Errno(libc::EAGAIN));
                }
            }
        }
    }
    tracing::debug!(session = %watch.session, "unix supervision ended");
}

enum Answer {
    /// Let the kernel do the call as asked.
    Continue,
    /// The call returns 0 (the supervisor connected the socket).
    Done,
    Errno(i32),
}

fn respond(fd: RawFd, id: u64, answer: Answer) {
    let (error, flags) = match answer {
        Answer::Continue => (0, libc::SECCOMP_USER_NOTIF_FLAG_CONTINUE as u32),
        Answer::Done => (0, 0),
        Answer::Errno(e) => (-e, 0),
    };
    let mut resp = libc::seccomp_notif_resp {
        id,
        val: 0,
        error,
        flags,
    };
    // SAFETY: NOTIF_SEND with a struct of the type the ioctl names. ENOENT (the caller went away
    // or was interrupted) needs nothing more.
    unsafe { libc::ioctl(fd, libc::SECCOMP_IOCTL_NOTIF_SEND, &mut resp) };
}

/// The unix address of a connect(2), read from the caller's memory; None for any other call or
/// family, which the kernel handles as usual. (Reading the memory races with the caller's other
/// threads; that is why the supervisor never lets a unix connect continue on what it read.)
fn unix_address(listener: RawFd, n: &libc::seccomp_notif) -> Option<Vec<u8>> {
    if n.data.nr as libc::c_long != libc::SYS_connect {
        return None;
    }
    let (ptr, len) = (n.data.args[1], n.data.args[2] as usize);
    if ptr == 0 || len < 2 {
        return None;
    }
    let len = len.min(std::mem::size_of::<libc::sockaddr_un>());
    let mut buf = vec![0u8; len];
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: len,
    };
    let remote = libc::iovec {
        iov_base: ptr as *mut libc::c_void,
        iov_len: len,
    };
    // SAFETY: reads into our buffer of the length given.
    let got = unsafe { libc::process_vm_readv(n.pid as i32, &local, 1, &remote, 1, 0) };
    if got < 2 {
        return None;
    }
    buf.truncate(got as usize);
    if u16::from_ne_bytes([buf[0], buf[1]]) != libc::AF_UNIX as u16 {
        return None;
    }
    // The pid read from must still be the notifying task.
    let mut id = n.id;
    // SAFETY: NOTIF_ID_VALID takes a pointer to the id.
    if unsafe { libc::ioctl(listener, libc::SECCOMP_IOCTL_NOTIF_ID_VALID, &mut id) } != 0 {
        return None;
    }
    Some(buf)
}

/// Who serves an address, as far as the session is concerned.
enum Server {
    /// In the profile's allow list, or egressd's control socket.
    Allowed,
    /// Bound by a process of this session.
    Session,
    /// Bound by a process outside the session: its pid when found, and its session if it is in
    /// another one.
    Outside {
        pid: Option<u32>,
        other: Option<String>,
    },
    /// No bound socket of that name in the caller's network namespace.
    None,
}

impl Server {
    fn allowed(&self) -> bool {
        matches!(self, Server::Allowed | Server::Session)
    }

    fn reason(&self) -> &'static str {
        match self {
            Server::Allowed => "allowed unix socket (unix_allow)",
            Server::Session => "server inside the session",
            Server::Outside { other: Some(_), .. } => "server in another session",
            Server::Outside { .. } => "server outside the session",
            Server::None => "no server bound in the caller's view",
        }
    }
}

fn decide(watch: &Watch, allowed: &Allowed, n: &libc::seccomp_notif, addr: &[u8]) -> Answer {
    let pid = n.pid;
    let sock_fd = n.data.args[0] as i32;
    let path = &addr[2..];
    let abstract_name = path.first() == Some(&0);
    let shown = if abstract_name {
        format!("@{}", String::from_utf8_lossy(&path[1..]))
    } else {
        let end = path.iter().position(|b| *b == 0).unwrap_or(path.len());
        String::from_utf8_lossy(&path[..end]).into_owned()
    };
    if path.is_empty() {
        // An unnamed address: the kernel refuses it (or the backstop does).
        return Answer::Continue;
    }
    let creds = match Creds::of(pid) {
        Ok(c) => c,
        Err(_) => return Answer::Errno(libc::ESRCH),
    };
    let sock = match take_socket(pid, sock_fd) {
        Ok(s) => s,
        Err(e) => return Answer::Errno(e.raw_os_error().unwrap_or(libc::EBADF)),
    };
    if socket_int(&sock, libc::SO_DOMAIN) != Some(libc::AF_UNIX) {
        // A unix address on another kind of socket: the kernel gives the error it always gives.
        return Answer::Continue;
    }
    let kind = socket_int(&sock, libc::SO_TYPE).unwrap_or(0);
    let name = if abstract_name {
        path.to_vec()
    } else {
        let end = path.iter().position(|b| *b == 0).unwrap_or(path.len());
        path[..end].to_vec()
    };
    let sock = Arc::new(sock);
    let (answer, server, verdict) =
        match connect_for(watch, allowed, pid, &creds, sock, name, abstract_name, kind) {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(session = %watch.session, "unix connect to {shown}: {e}");
                (Answer::Errno(libc::EACCES), Server::None, "denied")
            }
        };
    if let Some(record) = record(watch, n, &creds, &shown, kind, &server, verdict) {
        watch.counts.add(watch.cgroup_id, verdict == "allowed");
        send(watch, record);
    }
    answer
}

type Outcome = (Answer, Server, &'static str);

/// What the caller's address names, as the caller sees it.
enum Lookup {
    /// The error the caller's own connect would have met (ENOENT, EACCES, ELOOP, ECONNREFUSED
    /// for a file that is no socket...): nothing to decide.
    Errno(i32),
    /// The socket file (a descriptor of it, so it cannot be swapped) and the bound socket's
    /// inode, when one is bound to it.
    Path {
        file: OwnedFd,
        vfs: (u32, u32),
        ino: Option<u32>,
    },
    /// The abstract socket's inode, when one is bound to the name.
    Abstract { ino: Option<u32> },
}

/// Decides and, when the server may be reached, connects the caller's socket itself: the lookup
/// and the connect run as the caller (its namespaces, root, directory, credentials), the judging
/// runs here as the daemon.
#[allow(clippy::too_many_arguments)]
fn connect_for(
    watch: &Watch,
    allowed: &Allowed,
    pid: u32,
    creds: &Creds,
    sock: Arc<OwnedFd>,
    name: Vec<u8>,
    abstract_name: bool,
    kind: i32,
) -> io::Result<Outcome> {
    let lookup_name = name.clone();
    let found = caller::as_caller(pid, creds, move |_| {
        lookup(&lookup_name, abstract_name, kind)
    })?;
    let (server, target) = match found {
        Lookup::Errno(e) => return Ok((Answer::Errno(e), Server::None, "")),
        Lookup::Path { file, vfs, ino } => {
            let server = if allowed.files.contains(&vfs) {
                Server::Allowed
            } else {
                ino.map_or(Server::None, |ino| classify(watch, ino))
            };
            (server, Some(file))
        }
        Lookup::Abstract { ino } => {
            let server = if allowed.names.contains(&name) {
                Server::Allowed
            } else {
                ino.map_or(Server::None, |ino| classify(watch, ino))
            };
            (server, None)
        }
    };
    if matches!(server, Server::None) {
        // A socket file nothing is bound to (stale, or bound in another network namespace): what
        // the kernel would answer, so apps that clean up stale sockets still do.
        return Ok((Answer::Errno(libc::ECONNREFUSED), server, "denied"));
    }
    if !server.allowed() && !watch.audit_only {
        return Ok((Answer::Errno(libc::EACCES), server, "denied"));
    }
    let verdict = if server.allowed() {
        "allowed"
    } else {
        "audit_denied"
    };
    let connected = sock.clone();
    let rc = caller::as_caller(pid, creds, move |own_fds| {
        match &target {
            // Through the file resolved above (its descriptor, named by a path in the daemon's
            // /proc), so what is connected is what was judged.
            Some(file) => {
                // SAFETY: fchdir to a directory descriptor of ours, on this thread's fs struct.
                if unsafe { libc::fchdir(own_fds.as_raw_fd()) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                connect_to(&connected, file.as_raw_fd().to_string().as_bytes())
            }
            None => connect_to(&connected, &name),
        }
    });
    if let Err(e) = rc {
        return Ok((
            Answer::Errno(e.raw_os_error().unwrap_or(libc::ECONNREFUSED)),
            server,
            verdict,
        ));
    }
    // A connected stream names the process that listens: it must still be the session's (an
    // abstract name can be bound again between the lookup and the connect).
    if matches!(server, Server::Session)
        && kind != libc::SOCK_DGRAM
        && !watch.audit_only
        && !peer_in(&sock, &watch.cgroup)
    {
        // SAFETY: shutdown of a socket we hold.
        unsafe { libc::shutdown(sock.as_raw_fd(), libc::SHUT_RDWR) };
        let pid = peer_pid(&sock);
        return Ok((
            Answer::Errno(libc::EACCES),
            Server::Outside { pid, other: None },
            "denied",
        ));
    }
    Ok((Answer::Done, server, verdict))
}

/// On the caller's thread: what `name` is bound to, found with sock_diag in the caller's network
/// namespace (a server in another namespace is not found: refused).
fn lookup(name: &[u8], abstract_name: bool, kind: i32) -> io::Result<Lookup> {
    let bound = diag::bound_sockets()?;
    if abstract_name {
        let ino = bound
            .iter()
            .find(|b| b.name == name && i32::from(b.kind) == kind)
            .map(|b| b.ino);
        return Ok(Lookup::Abstract { ino });
    }
    let c = std::ffi::CString::new(name.to_vec())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: a NUL-terminated path; the descriptor is owned below.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
    if fd < 0 {
        let e = io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::ENOENT);
        return Ok(Lookup::Errno(e));
    }
    // SAFETY: a new descriptor nothing else owns.
    let file = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: fstat into a zeroed stat of our own.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(file.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Ok(Lookup::Errno(libc::ECONNREFUSED));
    }
    let vfs = (st.st_ino as u32, diag::encode_dev(st.st_dev));
    let ino = bound.iter().find(|b| b.vfs == Some(vfs)).map(|b| b.ino);
    Ok(Lookup::Path { file, vfs, ino })
}

/// connect(2) of `sock` to the unix address `name` (a path, or NUL and an abstract name).
fn connect_to(sock: &OwnedFd, name: &[u8]) -> io::Result<()> {
    // SAFETY: sockaddr_un is plain old data; zeroed is a valid value.
    let mut sa: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if name.len() > sa.sun_path.len() {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    sa.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in sa.sun_path.iter_mut().zip(name) {
        *d = *s as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + name.len();
    loop {
        // SAFETY: connect with a sockaddr_un of the length passed.
        let rc = unsafe {
            libc::connect(
                sock.as_raw_fd(),
                (&sa as *const libc::sockaddr_un).cast(),
                len as libc::socklen_t,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Whether the socket inode `ino` is held by a process of the session, else who holds it.
fn classify(watch: &Watch, ino: u32) -> Server {
    let needle = format!("socket:[{ino}]");
    let procs = fs::read_to_string(watch.cgroup_dir.join("cgroup.procs")).unwrap_or_default();
    for pid in procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
        if holds(pid, &needle) {
            return Server::Session;
        }
    }
    let pid = holder(&needle);
    let other = pid
        .and_then(crate::sessions::cgroup_of)
        .filter(|c| crate::sessions::is_under(c, &watch.parent) && *c != watch.cgroup);
    Server::Outside { pid, other }
}

/// For a backstop record: the address as people read it (a path, or `@name`), and who serves it
/// (the server's pid, and "outside", a session's cgroup, or "none"), looked up after the fact in
/// the view of `pid` (the sender, when it still runs) and the daemon's network namespace.
pub fn name_and_server(path: &[u8], pid: u32) -> (String, (Option<u32>, String)) {
    let abstract_name = path.first() == Some(&0);
    let end = if abstract_name {
        path.len()
    } else {
        path.iter().position(|b| *b == 0).unwrap_or(path.len())
    };
    let name = &path[..end];
    let shown = if abstract_name {
        format!("@{}", String::from_utf8_lossy(&name[1..]))
    } else {
        String::from_utf8_lossy(name).into_owned()
    };
    let Ok(bound) = diag::bound_sockets() else {
        return (shown, (None, "unknown".into()));
    };
    let ino = if abstract_name {
        bound.iter().find(|b| b.name == name).map(|b| b.ino)
    } else {
        let seen = if shown.starts_with('/') && pid != 0 {
            format!("/proc/{pid}/root{shown}")
        } else {
            shown.clone()
        };
        fs::metadata(&seen)
            .or_else(|_| fs::metadata(&shown))
            .ok()
            .and_then(|m| {
                let vfs = (m.ino() as u32, diag::encode_dev(m.dev()));
                bound.iter().find(|b| b.vfs == Some(vfs)).map(|b| b.ino)
            })
    };
    let Some(ino) = ino else {
        return (shown, (None, "none".into()));
    };
    let holder = holder(&format!("socket:[{ino}]"));
    let peer = match holder.and_then(crate::sessions::cgroup_of) {
        Some(c) if pid != 0 && crate::sessions::cgroup_of(pid).as_deref() == Some(c.as_str()) => {
            "session".to_string()
        }
        _ => "outside".to_string(),
    };
    (shown, (holder, peer))
}

fn holds(pid: u32, needle: &str) -> bool {
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    dir.flatten().any(|e| {
        fs::read_link(e.path())
            .map(|t| t.as_os_str().as_encoded_bytes() == needle.as_bytes())
            .unwrap_or(false)
    })
}

/// The first process (of at most a few thousand) holding `needle`, for the audit record only.
fn holder(needle: &str) -> Option<u32> {
    let dir = fs::read_dir("/proc").ok()?;
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .take(8192)
        .find(|pid| holds(*pid, needle))
}

fn peer_cred(sock: &OwnedFd) -> Option<libc::ucred> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED into a ucred of the length passed.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (rc == 0 && cred.pid > 0).then_some(cred)
}

fn peer_pid(sock: &OwnedFd) -> Option<u32> {
    peer_cred(sock).map(|c| c.pid as u32)
}

fn peer_in(sock: &OwnedFd, cgroup: &str) -> bool {
    peer_pid(sock)
        .and_then(crate::sessions::cgroup_of)
        .is_some_and(|c| c == cgroup)
}

fn socket_int(sock: &OwnedFd, opt: i32) -> Option<i32> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: an int option of the length passed.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(v)
}

/// The thread group (process) of thread `tid`: pidfd_open takes a process, and a notification
/// names the thread that made the call.
fn tgid_of(tid: u32) -> u32 {
    fs::read_to_string(format!("/proc/{tid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Tgid:"))
                .and_then(|t| t.trim().parse().ok())
        })
        .unwrap_or(tid)
}

/// The descriptor `fd` of thread `tid`'s process (the same open socket, not a copy of it).
fn take_socket(tid: u32, fd: i32) -> io::Result<OwnedFd> {
    let pid = tgid_of(tid);
    // SAFETY: pidfd_open and pidfd_getfd with integer arguments; the descriptors are owned.
    unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, pid, 0);
        if pidfd < 0 {
            return Err(io::Error::last_os_error());
        }
        let pidfd = OwnedFd::from_raw_fd(pidfd as i32);
        let got = libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0);
        if got < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(got as i32))
    }
}

fn kind_name(kind: i32) -> &'static str {
    match kind {
        libc::SOCK_STREAM => "stream",
        libc::SOCK_DGRAM => "dgram",
        libc::SOCK_SEQPACKET => "seqpacket",
        _ => "unknown",
    }
}

/// The decision's audit record; None when nothing was decided (the path did not resolve: the
/// caller got the error its own connect would have).
fn record(
    watch: &Watch,
    n: &libc::seccomp_notif,
    creds: &Creds,
    dest: &str,
    kind: i32,
    server: &Server,
    verdict: &str,
) -> Option<Record> {
    if verdict.is_empty() {
        return None;
    }
    let (peer, peer_pid) = match server {
        Server::Allowed => ("allowed".to_string(), None),
        Server::Session => (watch.session.clone(), None),
        Server::Outside {
            pid,
            other: Some(c),
        } => (format!("session {c}"), *pid),
        Server::Outside { pid, other: None } => ("outside".to_string(), *pid),
        Server::None => ("none".to_string(), None),
    };
    let comm = fs::read_to_string(format!("/proc/{}/comm", n.pid))
        .map(|c| c.trim_end().to_string())
        .ok();
    let tgid = Some(tgid_of(n.pid));
    Some(Record {
        time: audit::now_rfc3339(),
        kind: "decision".into(),
        session: Some(watch.session.clone()),
        pid: Some(n.pid),
        tgid,
        uid: Some(creds.uid),
        comm,
        exe: fs::read_link(format!("/proc/{}/exe", n.pid))
            .ok()
            .map(|p| p.display().to_string()),
        hook: Some("connect_unix".into()),
        family: Some("unix".into()),
        protocol: Some(kind_name(kind).into()),
        dest: Some(dest.to_string()),
        verdict: Some(verdict.to_string()),
        reason: Some(server.reason().to_string()),
        peer: Some(peer),
        peer_pid,
        ..Default::default()
    })
}

fn send(watch: &Watch, record: Record) {
    if watch
        .audit
        .blocking_send(audit::Message::Record(Box::new(record)))
        .is_err()
    {
        tracing::error!("audit task has stopped: unix decisions are not being written");
    }
}
