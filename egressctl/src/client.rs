//! A blocking client for egressd's control socket.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, Context as _};
use egressd_common::protocol::{Op, Reply, Request, Response, MAX_MESSAGE_BYTES};
use std::io::Read as _;

/// How long a command waits for each of egressd's replies.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Client {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    timeout: Duration,
}

impl Client {
    pub fn connect(path: &Path) -> anyhow::Result<Client> {
        Self::connect_timeout(path, REPLY_TIMEOUT)
    }

    /// Like [`Client::connect`], waiting at most `timeout` for each reply (and each request's send).
    pub fn connect_timeout(path: &Path, timeout: Duration) -> anyhow::Result<Client> {
        let stream = UnixStream::connect(path).with_context(|| {
            format!(
                "cannot reach egressd at {}; start it (`systemctl start egressd`, or `sudo egressd`) or point --socket / EGRESSD_SOCKET at it",
                path.display()
            )
        })?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        Ok(Client {
            path: path.to_owned(),
            reader: BufReader::new(stream),
            timeout,
        })
    }

    /// egressd's pid (SO_PEERCRED of the connection).
    pub fn peer_pid(&self) -> Option<i32> {
        egressd_common::host::peer_cred(self.reader.get_ref()).map(|c| c.pid)
    }

    /// Sends one request; an error reply from the daemon becomes an `Err` with its message.
    pub fn call(&mut self, op: Op) -> anyhow::Result<Reply> {
        let mut line = serde_json::to_vec(&Request::new(op))?;
        line.push(b'\n');
        self.reader
            .get_mut()
            .write_all(&line)
            .map_err(|e| self.io_error(e, "sending a request to egressd"))?;
        let mut buf = String::new();
        let n = (&mut self.reader)
            .take(MAX_MESSAGE_BYTES as u64 * 16)
            .read_line(&mut buf)
            .map_err(|e| self.io_error(e, "reading egressd's reply"))?;
        if n == 0 {
            bail!(
                "egressd closed the connection on {} without replying",
                self.path.display()
            );
        }
        let response: Response = serde_json::from_str(&buf).with_context(|| {
            format!(
                "egressd sent a reply this egressctl cannot read: {}",
                buf.trim()
            )
        })?;
        match response.reply {
            Reply::Error { message } => bail!("egressd: {message}"),
            reply => Ok(reply),
        }
    }

    /// A timed-out read or write (the socket's timeout gives EAGAIN, "Resource temporarily
    /// unavailable") says that egressd did not answer and what to check; other errors say what
    /// was being done.
    fn io_error(&self, e: std::io::Error, doing: &str) -> anyhow::Error {
        if matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ) {
            no_answer(self.peer_pid(), &self.path, self.timeout)
        } else {
            anyhow::Error::new(e).context(format!("{doing} on {}", self.path.display()))
        }
    }
}

/// egressd accepted the connection but did not answer in time (stopped, or overloaded).
#[derive(Debug)]
pub struct NoAnswer(String);

impl std::fmt::Display for NoAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NoAnswer {}

fn no_answer(pid: Option<i32>, path: &Path, timeout: Duration) -> anyhow::Error {
    let who = match pid {
        Some(pid) if pid > 0 => format!("egressd (pid {pid})"),
        _ => "egressd".to_string(),
    };
    let within = if timeout.subsec_millis() == 0 {
        format!("{} s", timeout.as_secs())
    } else {
        format!("{} ms", timeout.as_millis())
    };
    anyhow::Error::new(NoAnswer(format!(
        "{who} did not answer within {within} on {}: is it stopped (SIGSTOP, a debugger) or overloaded? Check `systemctl status egressd` or its log (`journalctl -u egressd`, or /var/log/egressd/egressd.log)",
        path.display()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn a_daemon_that_never_answers_is_named_with_the_timeout() {
        let dir = std::env::temp_dir().join(format!("egressctl-client-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("egressd.sock");
        let listener = UnixListener::bind(&path).unwrap();
        // Accepts, reads nothing and never answers, until the test is done.
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let server = std::thread::spawn(move || {
            let (_stream, _) = listener.accept().unwrap();
            let _ = done_rx.recv();
        });

        let started = std::time::Instant::now();
        let mut client = Client::connect_timeout(&path, Duration::from_millis(200)).unwrap();
        let err = client.call(Op::Status).unwrap_err();
        let waited = started.elapsed();
        done_tx.send(()).unwrap();
        server.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);

        let msg = format!("{err:#}");
        assert!(
            msg.starts_with(&format!(
                "egressd (pid {}) did not answer within 200 ms on {}: ",
                std::process::id(),
                path.display()
            )),
            "{msg}"
        );
        assert!(msg.contains("systemctl status egressd"), "{msg}");
        assert!(!msg.contains("os error"), "{msg}");
        assert!(err.is::<NoAnswer>());
        assert!(waited >= Duration::from_millis(200), "{waited:?}");
        assert!(waited < Duration::from_secs(10), "{waited:?}");
    }

    #[test]
    fn the_timeout_is_said_in_seconds_when_it_is_whole() {
        let msg = no_answer(None, Path::new("/run/egressd.sock"), REPLY_TIMEOUT).to_string();
        assert!(
            msg.starts_with("egressd did not answer within 30 s on /run/egressd.sock: "),
            "{msg}"
        );
    }
}
