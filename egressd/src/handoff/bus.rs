//! The session bus, filtered. A desktop IDE wants the user's session bus for notifications and
//! the secret service, but the bus also carries `org.freedesktop.systemd1` (start any command
//! outside), portals that act for the caller (OpenURI opens a URL in the user's browser), and
//! every service that runs commands. As Flatpak does, each session gets its own
//! `xdg-dbus-proxy`, run as the user outside the session: it talks only to the names listed, and
//! hides the rest. The session reaches the proxy (an allowed unix socket), never the bus itself
//! (a server outside the session).

use std::{
    os::fd::{AsRawFd as _, OwnedFd},
    os::unix::{fs::FileTypeExt as _, net::UnixStream, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// The names a session may talk to on the filtered bus: they notify or keep secrets, and start
/// nothing on the caller's behalf.
pub const TALK: [&str; 2] = ["org.freedesktop.Notifications", "org.freedesktop.secrets"];

/// The proxy's end of its lifeline, as it sees it.
const LIFELINE_FD: i32 = 3;

/// A running proxy; killed with the value.
pub struct BusProxy {
    pub socket: PathBuf,
    child: Child,
    /// Our end of the proxy's `--fd`: the proxy stops when it closes, so a killed egressd leaves
    /// no proxy behind.
    _lifeline: UnixStream,
}

impl BusProxy {
    /// The address for `DBUS_SESSION_BUS_ADDRESS`.
    pub fn address(&self) -> String {
        format!("unix:path={}", self.socket.display())
    }
}

impl Drop for BusProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// The user's session bus socket, when the user has one.
pub fn user_bus(uid: u32) -> Option<PathBuf> {
    let bus = PathBuf::from(format!("/run/user/{uid}/bus"));
    std::fs::symlink_metadata(&bus)
        .ok()
        .filter(|m| m.file_type().is_socket())
        .map(|_| bus)
}

/// Starts a filtering proxy of `bus` for session `id` of `uid`/`gid`, its socket next to the
/// bus (in the user's runtime directory). None when the user has no bus; an error when the bus
/// is there but the proxy cannot run (then the session gets no bus at all).
pub fn start(id: &str, uid: u32, gid: u32) -> Result<Option<BusProxy>, String> {
    let Some(bus) = user_bus(uid) else {
        return Ok(None);
    };
    let program = which::which("xdg-dbus-proxy").map_err(|_| {
        "the session bus is not offered: xdg-dbus-proxy is not installed (apt-get install xdg-dbus-proxy)".to_string()
    })?;
    let dir = bus.parent().unwrap_or(Path::new("/run"));
    let socket = dir.join(format!("egressd-bus-{id}"));
    let _ = std::fs::remove_file(&socket);
    let (ours, theirs) = UnixStream::pair().map_err(|e| format!("socketpair: {e}"))?;
    let theirs = OwnedFd::from(theirs);
    let mut cmd = Command::new(program);
    cmd.arg(format!("--fd={LIFELINE_FD}"))
        .arg(format!("unix:path={}", bus.display()))
        .arg(&socket)
        .arg("--filter");
    for name in TALK {
        cmd.arg(format!("--talk={name}"));
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .uid(uid)
        .gid(gid);
    let raw = theirs.as_raw_fd();
    // SAFETY: only dup2/fcntl between fork and exec (async-signal-safe); both leave the
    // lifeline open across exec.
    unsafe {
        cmd.pre_exec(move || {
            let rc = if raw == LIFELINE_FD {
                libc::fcntl(raw, libc::F_SETFD, 0)
            } else {
                libc::dup2(raw, LIFELINE_FD)
            };
            if rc < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| format!("starting xdg-dbus-proxy: {e}"))?;
    drop(theirs);
    let mut proxy = BusProxy {
        socket,
        child,
        _lifeline: ours,
    };
    let deadline = Instant::now() + Duration::from_secs(3);
    while !proxy.socket.exists() {
        if let Ok(Some(status)) = proxy.child.try_wait() {
            return Err(format!("xdg-dbus-proxy exited ({status})"));
        }
        if Instant::now() > deadline {
            return Err("xdg-dbus-proxy did not make its socket within 3 s".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(Some(proxy))
}
