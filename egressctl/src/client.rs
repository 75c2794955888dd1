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

pub struct Client {
    path: PathBuf,
    reader: BufReader<UnixStream>,
}

impl Client {
    pub fn connect(path: &Path) -> anyhow::Result<Client> {
        let stream = UnixStream::connect(path).with_context(|| {
            format!(
                "cannot reach egressd at {}; start it (`systemctl start egressd`, or `sudo egressd`) or point --socket / EGRESSD_SOCKET at it",
                path.display()
            )
        })?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(Client {
            path: path.to_owned(),
            reader: BufReader::new(stream),
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
        self.reader.get_mut().write_all(&line)?;
        let mut buf = String::new();
        let n = (&mut self.reader)
            .take(MAX_MESSAGE_BYTES as u64 * 16)
            .read_line(&mut buf)
            .with_context(|| format!("reading egressd's reply on {}", self.path.display()))?;
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
}
