//! Asking the upstream servers, for names a profile allows. The query goes out as the client sent
//! it, under a random id that no other query in flight on that socket has. Each server has a few
//! long-lived connected UDP sockets (so a query costs no socket, bind or connect), each read by one
//! task that hands every answer to the query waiting for its id; the kernel drops datagrams from
//! any other source. A socket is replaced after a few hundred queries, so a spoofer must guess the
//! id and a source port that keeps moving. Truncated answers are asked again over TCP.

use std::{
    collections::HashMap,
    hash::{BuildHasher as _, Hasher as _},
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpStream, UdpSocket},
    sync::oneshot,
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

/// Sockets per server: queries in flight spread over them.
const SOCKETS: usize = 4;
/// Queries a socket carries before it is replaced by one on a new port.
const QUERIES_PER_SOCKET: usize = 512;
/// A query not answered by then is sent again (same id, same socket).
const RESEND_AFTER: Duration = Duration::from_millis(600);

/// Queries waiting on a socket, by id: each with the serial number of its registration, so that a
/// query ending takes out its own entry and never that of a later query given the same id.
type Waiting = Arc<Mutex<HashMap<u16, (u64, oneshot::Sender<Vec<u8>>)>>>;

/// Serial numbers of registrations.
static NEXT_SERIAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// One connected socket to a server and the queries waiting on it.
struct Channel {
    sock: Arc<UdpSocket>,
    waiting: Waiting,
    used: AtomicUsize,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Channel {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Channel {
    async fn open(server: SocketAddr) -> std::io::Result<Arc<Channel>> {
        let bind: SocketAddr = if server.is_ipv4() {
            "0.0.0.0:0".parse().expect("literal")
        } else {
            "[::]:0".parse().expect("literal")
        };
        let sock = Arc::new(UdpSocket::bind(bind).await?);
        sock.connect(server).await?;
        let waiting: Waiting = Arc::default();
        let reader = tokio::spawn(read_answers(sock.clone(), waiting.clone()));
        Ok(Arc::new(Channel {
            sock,
            waiting,
            used: AtomicUsize::new(0),
            reader,
        }))
    }
}

/// Hands each answer to the query waiting for its id; an answer nobody waits for (late, or
/// forged) is dropped.
async fn read_answers(sock: Arc<UdpSocket>, waiting: Waiting) {
    let mut buf = vec![0u8; 65535];
    loop {
        let Ok(n) = sock.recv(&mut buf).await else {
            // ECONNREFUSED from an ICMP error: the queries waiting time out.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let Some(id) = wire::id_of(&buf[..n]) else {
            continue;
        };
        let tx = waiting.lock().ok().and_then(|mut w| w.remove(&id));
        if let Some((_, tx)) = tx {
            let _ = tx.send(buf[..n].to_vec());
        }
    }
}

/// The upstream sockets, made as queries need them.
#[derive(Default)]
pub struct Pool {
    channels: Mutex<HashMap<(SocketAddr, usize), Arc<Channel>>>,
    next: AtomicUsize,
}

/// Takes its id back from the socket's table when the query ends, answered or not. Once the
/// answer has arrived the reader has taken the entry out, and the id may already belong to
/// another query: only an entry of this registration's own serial is removed.
struct Registration {
    waiting: Waiting,
    id: u16,
    serial: u64,
}

impl Registration {
    /// Enters a query under a free id of `waiting`; an error when 64 random ids were all taken.
    fn new(waiting: &Waiting, tx: oneshot::Sender<Vec<u8>>) -> std::io::Result<Registration> {
        let mut w = waiting
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?;
        let id = (0..64)
            .map(|_| random_id())
            .find(|id| !w.contains_key(id))
            .ok_or_else(|| std::io::Error::other("no free query id"))?;
        let serial = NEXT_SERIAL.fetch_add(1, Ordering::Relaxed);
        w.insert(id, (serial, tx));
        Ok(Registration {
            waiting: waiting.clone(),
            id,
            serial,
        })
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Ok(mut w) = self.waiting.lock() {
            if w.get(&self.id)
                .is_some_and(|(serial, _)| *serial == self.serial)
            {
                w.remove(&self.id);
            }
        }
    }
}

impl Pool {
    async fn channel(&self, server: SocketAddr) -> std::io::Result<Arc<Channel>> {
        let slot = self.next.fetch_add(1, Ordering::Relaxed) % SOCKETS;
        let key = (server, slot);
        let current = self.channels.lock().ok().and_then(|c| c.get(&key).cloned());
        if let Some(c) = current {
            if c.used.fetch_add(1, Ordering::Relaxed) < QUERIES_PER_SOCKET {
                return Ok(c);
            }
        }
        let fresh = Channel::open(server).await?;
        fresh.used.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut c) = self.channels.lock() {
            // Queries still waiting on the old socket keep it (and its reader) alive.
            c.insert(key, fresh.clone());
        }
        Ok(fresh)
    }

    async fn udp(&self, server: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
        let channel = self.channel(server).await?;
        let (tx, rx) = oneshot::channel();
        let registered = Registration::new(&channel.waiting, tx)?;
        let id = registered.id;
        let mut q = query.to_vec();
        wire::set_id(&mut q, id);
        channel.sock.send(&q).await?;
        // A datagram lost on the way (either way) is sent again, as stub resolvers do, rather
        // than leaving the client to its own retry seconds later; `ask`'s timeout bounds it all.
        let mut rx = std::pin::pin!(rx);
        let answer = loop {
            match timeout(RESEND_AFTER, rx.as_mut()).await {
                Ok(answer) => break answer,
                Err(_) => {
                    channel.sock.send(&q).await?;
                }
            }
        };
        let mut answer =
            answer.map_err(|_| std::io::Error::other("the socket's reader stopped"))?;
        if answer.len() > 2 && answer[2] & 0x02 != 0 {
            answer = tcp(server, &q, id).await?;
        }
        Ok(answer)
    }
}

fn random_id() -> u16 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0);
    h.finish() as u16
}

/// The first answer of the servers, tried in order; over TCP again when the UDP answer is truncated.
/// The answer carries the client's id.
pub async fn ask(
    pool: &Pool,
    servers: &[SocketAddr],
    query: &[u8],
    wait: Duration,
) -> Result<Vec<u8>, UpstreamError> {
    let client_id = wire::id_of(query).unwrap_or(0);
    let mut last = UpstreamError::NoneConfigured;
    for server in servers {
        match timeout(wait, pool.udp(*server, query)).await {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A loopback server that holds each batch of queries and answers them in reverse order,
    /// each answer naming its query in its last byte.
    async fn reversing_server(batch: usize) -> SocketAddr {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = sock.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            loop {
                let mut held = Vec::new();
                while held.len() < batch {
                    let (n, peer) = sock.recv_from(&mut buf).await.unwrap();
                    held.push((buf[..n].to_vec(), peer));
                }
                for (q, peer) in held.into_iter().rev() {
                    let mut a = q.clone();
                    a[2] |= 0x80;
                    sock.send_to(&a, peer).await.unwrap();
                }
            }
        });
        addr
    }

    /// A query whose first datagram is lost is sent again and answered within the timeout; the
    /// control, a server that answers nothing, times out.
    #[tokio::test]
    async fn a_lost_query_is_sent_again() {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let server = sock.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            let mut seen = std::collections::HashSet::new();
            loop {
                let (n, peer) = sock.recv_from(&mut buf).await.unwrap();
                // The first copy of each id is "lost".
                if seen.insert(wire::id_of(&buf[..n])) {
                    continue;
                }
                let mut a = buf[..n].to_vec();
                a[2] |= 0x80;
                sock.send_to(&a, peer).await.unwrap();
            }
        });
        let pool = Pool::default();
        let q = [0x12, 0x34, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7];
        let a = ask(&pool, &[server], &q, Duration::from_secs(2))
            .await
            .expect("answered after the resend");
        assert_eq!(wire::id_of(&a), Some(0x1234));
        let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let r = ask(
            &pool,
            &[silent.local_addr().unwrap()],
            &q,
            Duration::from_secs(1),
        )
        .await;
        assert!(matches!(r, Err(UpstreamError::Timeout { .. })), "{r:?}");
    }

    #[test]
    fn a_finished_query_leaves_a_later_query_under_the_same_id_waiting() {
        let waiting: Waiting = Arc::default();
        let (tx_a, _rx_a) = oneshot::channel();
        let a = Registration::new(&waiting, tx_a).unwrap();
        // The reader takes A's entry out as A's answer arrives; before A's registration is dropped
        // another query is given the same id (ids are random: any free one may come).
        let (_, answered) = waiting.lock().unwrap().remove(&a.id).unwrap();
        let _ = answered.send(vec![1]);
        let (tx_b, mut rx_b) = oneshot::channel();
        let serial_b = NEXT_SERIAL.fetch_add(1, Ordering::Relaxed);
        waiting.lock().unwrap().insert(a.id, (serial_b, tx_b));
        let id = a.id;
        drop(a);
        let (serial, tx) = waiting
            .lock()
            .unwrap()
            .remove(&id)
            .expect("B still waits under the id A had");
        assert_eq!(serial, serial_b);
        tx.send(vec![2]).unwrap();
        assert_eq!(rx_b.try_recv().unwrap(), vec![2], "B gets its answer");
    }

    #[test]
    fn a_query_that_ends_unanswered_gives_its_id_back() {
        let waiting: Waiting = Arc::default();
        let (tx, _rx) = oneshot::channel();
        let r = Registration::new(&waiting, tx).unwrap();
        assert_eq!(waiting.lock().unwrap().len(), 1);
        drop(r);
        assert!(waiting.lock().unwrap().is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn answers_reach_their_own_queries_when_many_are_in_flight() {
        let server = reversing_server(64).await;
        let pool = Arc::new(Pool::default());
        let mut tasks = Vec::new();
        for i in 0..64u16 {
            let pool = pool.clone();
            tasks.push(tokio::spawn(async move {
                // Header: the client's id, flags, one question; a payload byte names the query.
                let mut q = vec![0u8; 12];
                q[..2].copy_from_slice(&(1000 + i).to_be_bytes());
                q.push(i as u8);
                let a = ask(&pool, &[server], &q, Duration::from_secs(5))
                    .await
                    .unwrap();
                assert_eq!(
                    wire::id_of(&a),
                    Some(1000 + i),
                    "the client's id comes back"
                );
                assert_eq!(*a.last().unwrap(), i as u8, "the answer to this query");
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let open = pool.channels.lock().unwrap().len();
        assert!(open <= SOCKETS, "{open} sockets for 64 queries");
    }
}
