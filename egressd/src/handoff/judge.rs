//! Who serves a unix address, and the connect egressd makes for a session when the server may be
//! reached: the lookup and the connect run as the caller, the judging as the daemon.

use std::{
    fs, io,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::fs::MetadataExt as _,
    },
    sync::Arc,
};

use egressd_common::audit::Record;

use super::{
    caller::{self, Creds},
    diag,
    fds::{peer_in, peer_pid, socket_int, take_socket},
    notify::Answer,
    record::record,
    Allowed, Watch,
};

/// Who serves an address, as far as the session is concerned.
pub(super) enum Server {
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
    pub(super) fn allowed(&self) -> bool {
        matches!(self, Server::Allowed | Server::Session)
    }

    pub(super) fn reason(&self) -> &'static str {
        match self {
            Server::Allowed => "allowed unix socket (unix_allow)",
            Server::Session => "server inside the session",
            Server::Outside { other: Some(_), .. } => "server in another session",
            Server::Outside { .. } => "server outside the session",
            Server::None => "no server bound in the caller's view",
        }
    }
}

/// A `sun_path` as the kernel reads it (a path up to its NUL, or a NUL and an abstract name of
/// the address's length), as people read it (`@name` for an abstract one), and which it is.
fn unix_name(path: &[u8]) -> (Vec<u8>, String, bool) {
    if path.first() == Some(&0) {
        let shown = format!("@{}", String::from_utf8_lossy(&path[1..]));
        return (path.to_vec(), shown, true);
    }
    let end = path.iter().position(|b| *b == 0).unwrap_or(path.len());
    let name = path[..end].to_vec();
    let shown = String::from_utf8_lossy(&name).into_owned();
    (name, shown, false)
}

/// The answer to a unix connect, and its audit record (None when nothing was decided), which the
/// caller sends only after answering: a stalled audit disk never holds a connect.
pub(super) fn decide(
    watch: &Watch,
    allowed: &Allowed,
    n: &libc::seccomp_notif,
    addr: &[u8],
) -> (Answer, Option<Record>) {
    let pid = n.pid;
    let sock_fd = n.data.args[0] as i32;
    let path = &addr[2..];
    let (name, shown, abstract_name) = unix_name(path);
    if path.is_empty() {
        // An unnamed address: the kernel refuses it (or the backstop does).
        return (Answer::Continue, None);
    }
    let creds = match Creds::of(pid) {
        Ok(c) => c,
        Err(_) => return (Answer::Errno(libc::ESRCH), None),
    };
    let sock = match take_socket(pid, sock_fd) {
        Ok(s) => s,
        Err(e) => return (Answer::Errno(e.raw_os_error().unwrap_or(libc::EBADF)), None),
    };
    if socket_int(&sock, libc::SO_DOMAIN) != Some(libc::AF_UNIX) {
        // A unix address on another kind of socket: the kernel gives the error it always gives.
        return (Answer::Continue, None);
    }
    let kind = socket_int(&sock, libc::SO_TYPE).unwrap_or(0);
    let sock = Arc::new(sock);
    let (answer, server, verdict) =
        match connect_for(watch, allowed, pid, &creds, sock, name, abstract_name, kind) {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(session = %watch.session, "unix connect to {shown}: {e}");
                (Answer::Errno(libc::EACCES), Server::None, "denied")
            }
        };
    let record = record(watch, n, &creds, &shown, kind, &server, verdict);
    if record.is_some() {
        watch.counts.add(watch.cgroup_id, verdict == "allowed");
    }
    (answer, record)
}

pub(super) type Outcome = (Answer, Server, &'static str);

/// What the caller's address names, as the caller sees it.
pub(super) enum Lookup {
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
pub(super) fn connect_for(
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
pub(super) fn lookup(name: &[u8], abstract_name: bool, kind: i32) -> io::Result<Lookup> {
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
pub(super) fn connect_to(sock: &OwnedFd, name: &[u8]) -> io::Result<()> {
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
pub(super) fn classify(watch: &Watch, ino: u32) -> Server {
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
    let (name, shown, abstract_name) = unix_name(path);
    let name = name.as_slice();
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

pub(super) fn holds(pid: u32, needle: &str) -> bool {
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
pub(super) fn holder(needle: &str) -> Option<u32> {
    let dir = fs::read_dir("/proc").ok()?;
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .take(8192)
        .find(|pid| holds(*pid, needle))
}
