//! The resolver's sockets: UDP and TCP on 127.0.0.1 and ::1, where the kernel sends the queries.

use std::{
    future::Future as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    task::{Context, Waker},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream, UdpSocket},
};

use super::Resolver;

pub struct Listeners {
    udp: Vec<UdpSocket>,
    tcp: Vec<TcpListener>,
}

/// Binds every socket before the daemon says it is ready, so a port in use is a start-up error.
/// IPv6 is optional: without ::1 (IPv6 off), IPv6 queries fail closed.
pub async fn bind(port: u16) -> std::io::Result<Listeners> {
    let mut l = Listeners {
        udp: Vec::new(),
        tcp: Vec::new(),
    };
    let v4 = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
    l.udp.push(UdpSocket::bind(v4).await?);
    l.tcp.push(TcpListener::bind(v4).await?);
    let v6 = SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), port);
    match (UdpSocket::bind(v6).await, TcpListener::bind(v6).await) {
        (Ok(u), Ok(t)) => {
            l.udp.push(u);
            l.tcp.push(t);
        }
        (Err(e), _) | (_, Err(e)) => {
            tracing::warn!("dns: cannot listen on [::1]:{port} ({e}); IPv6 DNS queries from sandboxes will fail")
        }
    }
    Ok(l)
}

/// Receiving tasks per UDP socket: one per runtime worker, so that answers given on the receiving
/// task still spread over every worker.
const UDP_RECEIVERS: usize = crate::WORKERS;

impl Listeners {
    pub fn serve(self, resolver: Arc<Resolver>) {
        for sock in self.udp {
            let sock = Arc::new(sock);
            for _ in 0..UDP_RECEIVERS {
                tokio::spawn(udp(sock.clone(), resolver.clone()));
            }
        }
        for listener in self.tcp {
            tokio::spawn(tcp(listener, resolver.clone()));
        }
    }
}

async fn udp(sock: Arc<UdpSocket>, resolver: Arc<Resolver>) {
    let mut buf = vec![0u8; 65535];
    loop {
        let (n, peer) = match sock.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("dns: udp receive: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let query = buf[..n].to_vec();
        let (sock, resolver) = (sock.clone(), resolver.clone());
        let mut reply = Box::pin(async move {
            if let Some(answer) = resolver.answer(&query, peer, 17).await {
                if let Err(e) = sock.send_to(&answer, peer).await {
                    tracing::debug!(%peer, "dns: udp send: {e}");
                }
            }
        });
        // Answered at once when nothing has to be waited for (a cached answer, a refusal, a local
        // name): no task of its own, no hand-over between threads. A query that waits (for the
        // upstream) goes on in a task of its own, so it holds up no other query.
        let mut cx = Context::from_waker(Waker::noop());
        if reply.as_mut().poll(&mut cx).is_pending() {
            tokio::spawn(reply);
        }
    }
}

async fn tcp(listener: TcpListener, resolver: Arc<Resolver>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                tokio::spawn(tcp_client(stream, peer, resolver.clone()));
            }
            Err(e) => {
                tracing::warn!("dns: tcp accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// RFC 7766 framing: a two-byte length before each message; idle connections are closed.
async fn tcp_client(mut stream: TcpStream, peer: SocketAddr, resolver: Arc<Resolver>) {
    const IDLE: Duration = Duration::from_secs(10);
    loop {
        let len = match tokio::time::timeout(IDLE, stream.read_u16()).await {
            Ok(Ok(n)) => n as usize,
            _ => return,
        };
        let mut query = vec![0u8; len];
        if !matches!(
            tokio::time::timeout(IDLE, stream.read_exact(&mut query)).await,
            Ok(Ok(_))
        ) {
            return;
        }
        let Some(answer) = resolver.answer(&query, peer, 6).await else {
            return;
        };
        let Ok(n) = u16::try_from(answer.len()) else {
            return;
        };
        if stream.write_all(&n.to_be_bytes()).await.is_err()
            || stream.write_all(&answer).await.is_err()
        {
            return;
        }
    }
}
