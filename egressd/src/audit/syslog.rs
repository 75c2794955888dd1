//! A copy of every record to syslog (RFC 5424 over the local datagram socket, which journald also
//! serves), so fleets can ship the log with what they already run. The file stays the record of
//! truth: the copy is sent without blocking, and a copy the socket does not take (no listener, a
//! full journal) is dropped and counted, reported when it starts and when it ends, at most once a
//! minute each (a journal that is just full takes some copies and drops others).

use std::{
    io,
    os::unix::net::UnixDatagram,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

const SAY_EVERY: Duration = Duration::from_secs(60);

fn due(last: &mut Option<Instant>) -> bool {
    if last.is_some_and(|t| t.elapsed() < SAY_EVERY) {
        return false;
    }
    *last = Some(Instant::now());
    true
}

pub struct Syslog {
    sock: UnixDatagram,
    path: PathBuf,
    host: String,
    /// The error since which copies are dropped.
    pub failing: Option<String>,
    pub dropped: u64,
    dropped_at_start: u64,
    said_failing: Option<Instant>,
    said_working: Option<Instant>,
}

impl Syslog {
    pub fn new(path: &Path) -> io::Result<Syslog> {
        let sock = UnixDatagram::unbound()?;
        sock.set_nonblocking(true)?;
        let host = nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "-".into());
        Ok(Syslog {
            sock,
            path: path.to_owned(),
            host,
            failing: None,
            dropped: 0,
            dropped_at_start: 0,
            said_failing: None,
            said_working: None,
        })
    }

    pub fn send(&mut self, rec_kind: &str, denied: bool, line: &[u8]) {
        // Facility 13 (log audit); warning for denials, info otherwise.
        let pri = 13 * 8 + if denied { 4 } else { 6 };
        let mut msg = format!(
            "<{pri}>1 {} {} egressd {} {rec_kind} - ",
            super::now_rfc3339(),
            self.host,
            std::process::id()
        )
        .into_bytes();
        msg.extend_from_slice(line);
        match self.sock.send_to(&msg, &self.path) {
            Ok(_) => {
                if self.failing.take().is_some() && due(&mut self.said_working) {
                    tracing::info!(
                        "audit: the syslog copy to {} works again ({} copies were dropped)",
                        self.path.display(),
                        self.dropped - self.dropped_at_start
                    );
                }
            }
            Err(e) => {
                self.dropped += 1;
                if self.failing.is_none() {
                    if due(&mut self.said_failing) {
                        tracing::warn!(
                            "audit: the syslog copy to {} fails: {e}; copies are dropped and counted until it works (the audit file is unaffected; `egressctl status` counts them)",
                            self.path.display()
                        );
                        self.dropped_at_start = self.dropped - 1;
                    }
                    self.failing = Some(e.to_string());
                }
            }
        }
    }
}
