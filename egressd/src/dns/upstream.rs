//! Asking the upstream servers, for names a profile allows. The query goes out as the client sent
//! it, under a fresh random id from a fresh socket (so a spoofed answer must guess both).

use std::{
    hash::{BuildHasher as _, Hasher as _},
    net::SocketAddr,
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpStream, UdpSocket},
    time::timeout,
};

use super::wire;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("no upstream DNS server is configured (set dns.upstream, or nameserver lines in /etc/resolv.conf)")]
    NoneConfigured,
    #[error("{server}: no answer within {ms} ms")]
    Timeout { server: SocketAddr, ms: u128 },
    #[error("{server}: {source}")]
    Io {
        server: SocketAddr,
        source: std::io::Error,
    },
}

fn random_id() -> u16 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0);
    h.finish() as u16
}

/// The first answer of the servers, tried in order; over TCP again when the UDP answer is truncated.
/// The answer carries the client's id.
pub async fn ask(
    servers: &[SocketAddr],
    query: &[u8],
    wait: Duration,
) -> Result<Vec<u8>, UpstreamError> {
    let client_id = wire::id_of(query).unwrap_or(0);
    let mut last = UpstreamError::NoneConfigured;
    for server in servers {
        let id = random_id();
        let mut q = query.to_vec();
        wire::set_id(&mut q, id);
        let attempt = async {
            let mut answer = udp(*server, &q, id).await?;
            if answer.len() > 2 && answer[2] & 0x02 != 0 {
                answer = tcp(*server, &q, id).await?;
            }
            Ok::<_, std::io::Error>(answer)
        };
        match timeout(wait, attempt).await {
            Ok(Ok(mut answer)) => {
                wire::set_id(&mut answer, client_id);
                return Ok(answer);
            }
            Ok(Err(source)) => {
                last = UpstreamError::Io {
                    server: *server,
                    source,
                }
            }
            Err(_) => {
                last = UpstreamError::Timeout {
                    server: *server,
                    ms: wait.as_millis(),
                }
            }
        }
    }
    Err(last)
}

async fn udp(server: SocketAddr, q: &[u8], id: u16) -> std::io::Result<Vec<u8>> {
    let bind: SocketAddr = if server.is_ipv4() {
        "0.0.0.0:0".parse().expect("literal")
    } else {
        "[::]:0".parse().expect("literal")
    };
    let sock = UdpSocket::bind(bind).await?;
    sock.connect(server).await?;
    sock.send(q).await?;
    let mut buf = vec![0u8; 65535];
    loop {
        let n = sock.recv(&mut buf).await?;
        // Anything else on this socket is stale or forged: keep waiting for ours.
        if wire::id_of(&buf[..n]) == Some(id) {
            buf.truncate(n);
            return Ok(buf);
        }
    }
}

async fn tcp(server: SocketAddr, q: &[u8], id: u16) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(server).await?;
    let len = u16::try_from(q.len()).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    s.write_all(&len.to_be_bytes()).await?;
    s.write_all(q).await?;
    let n = s.read_u16().await? as usize;
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf).await?;
    if wire::id_of(&buf) != Some(id) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "answer with another id",
        ));
    }
    Ok(buf)
}
