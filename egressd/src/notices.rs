//! Notices: a session's user is told what was blocked while the tool runs, each newly denied
//! destination or DNS name once (`egressd: blocked curl -> 198.18.6.2:8080 (default deny)`), as a
//! desktop notification on the user's session bus or on the terminal egressctl ran in.
//!
//! egressd sends them itself, from outside every session: no process of the session takes part.
//! What egressctl hands over is checked so that no notice can become a way out: the terminal must
//! be a terminal (writing to it gives the session nothing it could not write itself), and the bus
//! must be a unix socket owned by the session's user (never a TCP address a sandbox could name),
//! which a `gdbus call` egressd starts as that user, outside the session, sends the notice to.
//! The text carries names the session chose (a DNS name): control characters are removed, each
//! name is said once, and a session gets at most `MAX_NOTICES` notices; the README names what a
//! notification daemon that forwards notices off the machine would carry.

use std::{
    collections::{HashMap, HashSet},
    os::fd::OwnedFd,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use egressd_common::protocol::Denial;

use crate::daemon::State;

/// Notices one session gets; the last one says where to see the rest.
const MAX_NOTICES: u32 = 20;

/// Where a session's notices go.
pub struct Target {
    pub tty: Option<Arc<OwnedFd>>,
    pub bus: Option<PathBuf>,
    /// The session's user: the desktop notice is sent as them.
    pub uid: u32,
    seen: HashSet<String>,
    sent: u32,
}

impl Target {
    pub fn new(tty: Option<OwnedFd>, bus: Option<PathBuf>, uid: u32) -> Target {
        Target {
            tty: tty.map(Arc::new),
            bus,
            uid,
            seen: HashSet::new(),
            sent: 0,
        }
    }
}

/// Sessions that asked for notices, by session id.
#[derive(Clone, Default)]
pub struct Notices(Arc<Mutex<HashMap<String, Target>>>);

impl Notices {
    pub fn add(&self, session: &str, target: Target) {
        if let Ok(mut m) = self.0.lock() {
            m.insert(session.to_string(), target);
        }
    }

    pub fn forget(&self, session: &str) {
        if let Ok(mut m) = self.0.lock() {
            m.remove(session);
        }
    }

    /// The notice for a denial, once per destination or name and session; None when already
    /// said, or the session has no target.
    #[allow(clippy::type_complexity)]
    fn due(&self, d: &Denial) -> Option<(String, Option<Arc<OwnedFd>>, Option<PathBuf>, u32)> {
        let mut m = self.0.lock().ok()?;
        let t = m.get_mut(&d.session)?;
        if t.sent > MAX_NOTICES || !t.seen.insert(d.what.clone()) {
            return None;
        }
        t.sent += 1;
        let text = if t.sent > MAX_NOTICES {
            format!(
                "egressd: session {} was denied more; `egressctl top` shows every denial",
                d.session
            )
        } else {
            notice_text(d)
        };
        Some((text, t.tty.clone(), t.bus.clone(), t.uid))
    }
}

/// `egressd: blocked curl -> 198.18.6.2:8080 (default deny)`, without control characters.
pub fn notice_text(d: &Denial) -> String {
    let what = if d.hook == "dns" {
        format!("DNS name {}", d.what)
    } else {
        d.what.clone()
    };
    let text = format!(
        "egressd: blocked {} -> {what} ({})",
        d.comm.as_deref().unwrap_or("?"),
        d.reason
    );
    text.chars().filter(|c| !c.is_control()).take(300).collect()
}

/// Follows the latest denials and sends each due notice, off the audit and control paths.
pub async fn run(state: Arc<State>) {
    let mut after = 0;
    loop {
        state.recent.added().await;
        for d in state.recent.after(after, |_| true) {
            after = after.max(d.id);
            let Some((text, tty, bus, uid)) = state.notices.due(&d) else {
                continue;
            };
            let delivered = match bus {
                Some(path) => desktop(&path, uid, &text).await,
                None => false,
            };
            if !delivered {
                if let Some(tty) = tty {
                    terminal(&tty, &text).await;
                }
            }
        }
    }
}

/// Where `gdbus` is: the notification is sent by a short-lived `gdbus call` as the user (a session
/// bus admits its own user only, not root), from egressd's cgroup, outside every session.
const GDBUS: &str = "/usr/bin/gdbus";

/// A desktop notification (org.freedesktop.Notifications.Notify) on the user's session bus.
async fn desktop(path: &std::path::Path, uid: u32, text: &str) -> bool {
    if !std::path::Path::new(GDBUS).exists() {
        return false;
    }
    let gid = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map_or(uid, |u| u.gid.as_raw());
    let quoted = |s: &str| format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"));
    let mut cmd = tokio::process::Command::new(GDBUS);
    cmd.args([
        "call",
        "--session",
        "--dest",
        "org.freedesktop.Notifications",
        "--object-path",
        "/org/freedesktop/Notifications",
        "--method",
        "org.freedesktop.Notifications.Notify",
        "egressd",
        "0",
        "network-error",
        "egressd: connection blocked",
        &quoted(text),
        "[]",
        "{}",
        "8000",
    ])
    .env_clear()
    .env(
        "DBUS_SESSION_BUS_ADDRESS",
        format!("unix:path={}", path.display()),
    )
    .env("PATH", "/usr/bin:/bin")
    .uid(uid)
    .gid(gid)
    .stdin(std::process::Stdio::null())
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null())
    .kill_on_drop(true);
    match tokio::time::timeout(Duration::from_secs(3), cmd.status()).await {
        Ok(Ok(status)) => status.success(),
        Ok(Err(e)) => {
            tracing::debug!("notice: {GDBUS}: {e}");
            false
        }
        Err(_) => false,
    }
}

/// A description of its own for the terminal egressctl handed over, opened non-blocking, so that
/// a notice to a stopped terminal (^S, a full pty nobody reads) is dropped instead of holding a
/// thread of egressd; the handed description itself is shared with the session and stays as it is.
/// Only a terminal device (a pty's slave side, a console) is reopened: a pty master would open a
/// new pty.
pub fn reopen_nonblocking(fd: &OwnedFd) -> Result<OwnedFd, String> {
    use std::os::fd::AsRawFd as _;
    use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _, OpenOptionsExt as _};
    let path = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map_err(|e| format!("the terminal's name: {e}"))?;
    let handed = std::fs::File::from(fd.try_clone().map_err(|e| e.to_string())?)
        .metadata()
        .map_err(|e| e.to_string())?;
    let is_ptmx = path.as_os_str() == "/dev/ptmx" || path.as_os_str() == "/dev/pts/ptmx";
    if is_ptmx || !handed.file_type().is_char_device() {
        return Err(format!(
            "{} is not a terminal egressctl runs on",
            path.display()
        ));
    }
    let file = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(&path)
        .map_err(|e| format!("opening {}: {e}", path.display()))?;
    // The same device, not whatever now has that name.
    let reopened = file.metadata().map_err(|e| e.to_string())?;
    if reopened.rdev() != handed.rdev() || !reopened.file_type().is_char_device() {
        return Err(format!(
            "{} is not the terminal handed over",
            path.display()
        ));
    }
    Ok(OwnedFd::from(file))
}

/// On the terminal: a line of its own while the terminal is line by line (a shell running a
/// command, a command printing); a full-screen program (raw or cbreak mode) keeps its screen, and
/// the notice goes to the window title (OSC 2) instead. The write does not wait: a terminal that
/// cannot take it now loses this notice, and the daemon log says so.
/// Writes the notice to the session's terminal without ever blocking on it. A write that finds the
/// terminal busy (EAGAIN: another writer holds it, as the session's own program does while it
/// prints, or its output queue is full) is tried again for a while; a terminal that stays busy
/// (frozen with ^S) loses the notice, which the daemon log says.
async fn terminal(tty: &OwnedFd, text: &str) {
    const TRIES: u32 = 20;
    let line_mode = nix::sys::termios::tcgetattr(tty)
        .map(|t| {
            t.local_flags
                .contains(nix::sys::termios::LocalFlags::ICANON)
        })
        .unwrap_or(false);
    let bytes = if line_mode {
        format!("\r\n{text}\r\n")
    } else {
        format!("\x1b]2;{text}\x07")
    };
    let mut rest = bytes.as_bytes();
    for _ in 0..TRIES {
        match nix::unistd::write(tty, rest) {
            Ok(n) if n == rest.len() => return,
            Ok(n) => rest = &rest[n..],
            Err(nix::errno::Errno::EAGAIN) => {}
            Err(e) => {
                tracing::info!("notice not shown: the terminal did not take it ({e})");
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tracing::info!(
        "notice not shown in full: the terminal stayed busy for {} ms ({} of {} bytes left)",
        TRIES * 5,
        rest.len(),
        bytes.len()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_notice_says_who_what_and_why_without_control_characters() {
        let d = Denial {
            id: 1,
            time: String::new(),
            session: "s".into(),
            comm: Some("cu\x1b]2;x\x07rl".into()),
            hook: "dns".into(),
            what: "api.example.test".into(),
            reason: "name not in dns_allow".into(),
            count: 1,
        };
        assert_eq!(
            notice_text(&d),
            "egressd: blocked cu]2;xrl -> DNS name api.example.test (name not in dns_allow)"
        );
    }

    #[test]
    fn each_destination_once_and_a_bounded_number_per_session() {
        let n = Notices::default();
        n.add("s", Target::new(None, None, 0));
        let d = |what: &str| Denial {
            session: "s".into(),
            hook: "connect4".into(),
            what: what.into(),
            ..Default::default()
        };
        assert!(n.due(&d("a:1")).is_some());
        assert!(n.due(&d("a:1")).is_none());
        assert!(n
            .due(&Denial {
                session: "other".into(),
                ..d("b:1")
            })
            .is_none());
        let said: Vec<String> = (0..40)
            .filter_map(|i| n.due(&d(&format!("h{i}:1"))).map(|x| x.0))
            .collect();
        assert_eq!(said.len() as u32, MAX_NOTICES);
        assert!(said.last().unwrap().contains("egressctl top"));
    }
}
