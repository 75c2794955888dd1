//! Load generators for `cargo xtask bench`: each runs where xtask puts it (a plain cgroup, an
//! nftables-matched cgroup, or an egressd session) and prints one JSON line with what it measured.
//! They only ever address loopback or the benchmark's own outside host.

use std::{
    io::{self, BufRead as _, Write as _},
    mem,
    net::{SocketAddr, UdpSocket},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
    process::exit,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

pub fn main(args: &[&str]) -> ! {
    match args {
        ["tcp-connect", addr, secs] => tcp_connect(addr, secs.parse().unwrap()),
        ["tcp-denied", addr, secs] => tcp_denied(addr, secs.parse().unwrap()),
        ["udp", addr, secs, mode] => udp(addr, secs.parse().unwrap(), mode == &"connected"),
        ["flood", addr, secs, rate, threads, ports] => flood(
            addr,
            secs.parse().unwrap(),
            rate.parse().unwrap(),
            threads.parse().unwrap(),
            ports.parse().unwrap(),
        ),
        ["verdicts", addr] => verdicts(addr),
        ["storm", allowed, denied, stop] => storm(allowed, denied, stop),
        ["dns", server, conc, secs, names @ ..] => {
            dns(server, conc.parse().unwrap(), secs.parse().unwrap(), names)
        }
        ["dns-server", addr, answer] => dns_server(addr, answer),
        _ => {
            eprintln!("usage: egressd-probe bench tcp-connect|tcp-denied|udp|flood|verdicts|storm|dns|dns-server ...");
            exit(2)
        }
    }
}

fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid timespec pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn sockaddr(a: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    let s2 = nix::sys::socket::SockaddrStorage::from(*a);
    // SAFETY: SockaddrStorage is a union no larger than sockaddr_storage; we copy its bytes.
    let mut ss: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let len = nix::sys::socket::SockaddrLike::len(&s2);
    // SAFETY: both pointers valid for `len` bytes.
    unsafe {
        std::ptr::copy_nonoverlapping(
            nix::sys::socket::SockaddrLike::as_ptr(&s2).cast::<u8>(),
            (&mut ss as *mut libc::sockaddr_storage).cast::<u8>(),
            len as usize,
        )
    };
    (ss, len)
}

fn socket(a: &SocketAddr, ty: i32) -> OwnedFd {
    let fam = if a.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket(2); owned right away.
    let fd = unsafe { libc::socket(fam, ty | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0, "socket: {}", io::Error::last_os_error());
    // SAFETY: fresh descriptor.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn connect(fd: &OwnedFd, sa: &(libc::sockaddr_storage, libc::socklen_t)) -> i32 {
    // SAFETY: valid sockaddr for the call.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&sa.0 as *const libc::sockaddr_storage).cast(),
            sa.1,
        )
    };
    if rc == 0 {
        0
    } else {
        io::Error::last_os_error().raw_os_error().unwrap_or(-1)
    }
}

/// p-th percentile (0..=100) of sorted samples.
fn pct(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// TCP connect + close (with SO_LINGER 0: an RST, so no TIME_WAIT piles up) to a loopback
/// listener, as fast as possible; connect() is timed on its own.
fn tcp_connect(addr: &str, secs: f64) -> ! {
    let a: SocketAddr = addr.parse().unwrap();
    let sa = sockaddr(&a);
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    let mut lat = Vec::with_capacity(1 << 20);
    let mut errors = 0u64;
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    while Instant::now() < end {
        let fd = socket(&a, libc::SOCK_STREAM);
        // SAFETY: valid option buffer.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                mem::size_of::<libc::linger>() as u32,
            )
        };
        let t0 = mono_ns();
        let rc = connect(&fd, &sa);
        let t1 = mono_ns();
        if rc == 0 {
            lat.push(t1 - t0);
        } else {
            errors += 1;
        }
        drop(fd);
    }
    let secs = start.elapsed().as_secs_f64();
    let ops = lat.len() as u64;
    lat.sort_unstable();
    println!(
        "{{\"ops\":{ops},\"secs\":{secs},\"rate\":{},\"p50_ns\":{},\"p99_ns\":{},\"errors\":{errors}}}",
        ops as f64 / secs,
        pct(&lat, 50.0),
        pct(&lat, 99.0)
    );
    exit(0)
}

/// socket + denied connect + close vs socket + close, alternating in 10 slices; ns per iteration.
fn tcp_denied(addr: &str, secs: f64) -> ! {
    let a: SocketAddr = addr.parse().unwrap();
    let sa = sockaddr(&a);
    let slice = Duration::from_secs_f64(secs / 20.0);
    let (mut den_n, mut den_t, mut base_n, mut base_t, mut not_denied) =
        (0u64, 0f64, 0u64, 0f64, 0u64);
    for _ in 0..10 {
        let t = Instant::now();
        while t.elapsed() < slice {
            for _ in 0..64 {
                let fd = socket(&a, libc::SOCK_STREAM);
                let rc = connect(&fd, &sa);
                if rc != libc::EPERM {
                    not_denied += 1;
                }
            }
            den_n += 64;
        }
        den_t += t.elapsed().as_secs_f64();
        let t = Instant::now();
        while t.elapsed() < slice {
            for _ in 0..64 {
                drop(socket(&a, libc::SOCK_STREAM));
            }
            base_n += 64;
        }
        base_t += t.elapsed().as_secs_f64();
    }
    println!(
        "{{\"denied_ns\":{},\"baseline_ns\":{},\"denied_ops\":{den_n},\"not_denied\":{not_denied}}}",
        den_t * 1e9 / den_n as f64,
        base_t * 1e9 / base_n as f64
    );
    exit(0)
}

/// 64-byte UDP datagrams to a loopback sink, unconnected (sendto) or connected (send).
fn udp(addr: &str, secs: f64, connected: bool) -> ! {
    let a: SocketAddr = addr.parse().unwrap();
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    if connected {
        s.connect(a).unwrap();
    }
    let buf = [0x5au8; 64];
    let (mut ok, mut errors) = (0u64, 0u64);
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    while Instant::now() < end {
        for _ in 0..256 {
            let r = if connected {
                s.send(&buf)
            } else {
                s.send_to(&buf, a)
            };
            if r.is_ok() {
                ok += 1;
            } else {
                errors += 1;
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{{\"ops\":{ok},\"secs\":{secs},\"rate\":{},\"errors\":{errors}}}",
        ok as f64 / secs
    );
    exit(0)
}

/// Denied UDP sends from `threads` threads, `rate` per second in total (0: as fast as possible),
/// for `secs`. Every send is a decision the audit pipeline must write or count as lost. `ports`
/// destination ports in turn from the target's: 1 is one decision repeated (an agent retrying),
/// thousands make each send within the flood a decision of its own.
fn flood(addr: &str, secs: f64, rate: f64, threads: usize, ports: u16) -> ! {
    let a: SocketAddr = addr.parse().unwrap();
    let ports = ports.max(1);
    let sent = Arc::new(AtomicU64::new(0));
    let passed = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (sent, passed) = (sent.clone(), passed.clone());
            thread::spawn(move || {
                let s = UdpSocket::bind("0.0.0.0:0").unwrap();
                let per = rate / threads as f64;
                let end = start + Duration::from_secs_f64(secs);
                let mut n = 0u64;
                let mut ok = 0u64;
                loop {
                    let now = Instant::now();
                    if now >= end {
                        break;
                    }
                    if per > 0.0 {
                        let due = (now - start).as_secs_f64() * per;
                        if (n as f64) >= due {
                            // Sleep until the next batch is due: a sender spinning on one of two
                            // cores would measure the scheduler, not egressd.
                            let next = start + Duration::from_secs_f64(n as f64 / per);
                            if next > now + Duration::from_micros(100) {
                                thread::sleep(next - now);
                            } else {
                                std::hint::spin_loop();
                            }
                            continue;
                        }
                    }
                    for i in 0..16 {
                        let mut to = a;
                        to.set_port(a.port().wrapping_add(((n + i) % u64::from(ports)) as u16));
                        if s.send_to(b"egressd-bench", to).is_ok() {
                            ok += 1;
                        }
                    }
                    n += 16;
                }
                sent.fetch_add(n, Ordering::Relaxed);
                passed.fetch_add(ok, Ordering::Relaxed);
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    let n = sent.load(Ordering::Relaxed);
    println!(
        "{{\"offered\":{n},\"secs\":{secs},\"rate\":{},\"not_denied\":{}}}",
        n as f64 / secs,
        passed.load(Ordering::Relaxed)
    );
    exit(0)
}

fn udp_verdict(a: &SocketAddr, sa: &(libc::sockaddr_storage, libc::socklen_t)) -> bool {
    // connect(2) on a UDP socket runs the connect hook and sends nothing.
    let fd = socket(a, libc::SOCK_DGRAM);
    connect(&fd, sa) == 0
}

/// Reads `allowed` / `denied` lines on stdin; for each, loops until a UDP connect to `addr` gets
/// that verdict and prints the CLOCK_MONOTONIC time (ns) it first did. Prints `ready` first.
fn verdicts(addr: &str) -> ! {
    let a: SocketAddr = addr.parse().unwrap();
    let sa = sockaddr(&a);
    println!("ready");
    io::stdout().flush().unwrap();
    for line in io::stdin().lock().lines() {
        let want = line.unwrap().trim() == "allowed";
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if udp_verdict(&a, &sa) == want {
                println!("{}", mono_ns());
                break;
            }
            if Instant::now() > deadline {
                println!("timeout");
                break;
            }
        }
        io::stdout().flush().unwrap();
    }
    exit(0)
}

/// UDP connects alternating between an allowed and a denied destination until `stop` exists;
/// prints how many verdicts were taken and how many were wrong.
fn storm(allowed: &str, denied: &str, stop: &str) -> ! {
    let (a, d): (SocketAddr, SocketAddr) = (allowed.parse().unwrap(), denied.parse().unwrap());
    let (sa, sd) = (sockaddr(&a), sockaddr(&d));
    let (mut n, mut allowed_refused, mut denied_passed) = (0u64, 0u64, 0u64);
    println!("ready");
    io::stdout().flush().unwrap();
    loop {
        for _ in 0..256 {
            if !udp_verdict(&a, &sa) {
                allowed_refused += 1;
            }
            if udp_verdict(&d, &sd) {
                denied_passed += 1;
            }
            n += 2;
        }
        if Path::new(stop).exists() {
            break;
        }
    }
    println!("{{\"verdicts\":{n},\"allowed_refused\":{allowed_refused},\"denied_passed\":{denied_passed}}}");
    exit(0)
}

/// A DNS query for `name`, type A, id `id`, recursion desired.
fn dns_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = Vec::with_capacity(64);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// `conc` threads, each with its own UDP socket, asking `server` for the names in turn (closed
/// loop: one query in flight per thread) for `secs`; latency of every answered query.
fn dns(server: &str, conc: usize, secs: f64, names: &[&str]) -> ! {
    let server: SocketAddr = server.parse().unwrap();
    let names: Arc<Vec<String>> = Arc::new(names.iter().map(|s| s.to_string()).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let nonce = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0)
    );
    let handles: Vec<_> = (0..conc)
        .map(|t| {
            let (names, stop, nonce) = (names.clone(), stop.clone(), nonce.clone());
            thread::spawn(move || {
                let s = UdpSocket::bind(if server.is_ipv4() {
                    "0.0.0.0:0"
                } else {
                    "[::]:0"
                })
                .unwrap();
                s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                let (mut lat, mut timeouts, mut nx, mut other) = (Vec::new(), 0u64, 0u64, 0u64);
                let mut buf = [0u8; 1500];
                let mut i = t;
                while !stop.load(Ordering::Relaxed) {
                    let id = (i as u16).wrapping_mul(31).wrapping_add(t as u16);
                    let name = &names[i % names.len()];
                    // `{n}` in a name: a name never asked before (a cache cannot answer it).
                    let q = if name.contains("{n}") {
                        dns_query(id, &name.replace("{n}", &format!("{nonce}-{t}-{i}")))
                    } else {
                        dns_query(id, name)
                    };
                    i += 1;
                    let t0 = Instant::now();
                    if s.send_to(&q, server).is_err() {
                        other += 1;
                        continue;
                    }
                    loop {
                        match s.recv(&mut buf) {
                            Ok(n) if n >= 12 && buf[..2] == id.to_be_bytes() => {
                                lat.push(t0.elapsed().as_nanos() as u64);
                                match buf[3] & 0x0f {
                                    0 => {}
                                    3 => nx += 1,
                                    _ => other += 1,
                                }
                                break;
                            }
                            Ok(_) => continue,
                            Err(_) => {
                                timeouts += 1;
                                break;
                            }
                        }
                    }
                }
                (lat, timeouts, nx, other)
            })
        })
        .collect();
    thread::sleep(Duration::from_secs_f64(secs));
    stop.store(true, Ordering::Relaxed);
    let (mut lat, mut timeouts, mut nx, mut other) = (Vec::new(), 0, 0, 0);
    for h in handles {
        let (l, t, n, o) = h.join().unwrap();
        lat.extend(l);
        timeouts += t;
        nx += n;
        other += o;
    }
    let secs = start.elapsed().as_secs_f64();
    lat.sort_unstable();
    println!(
        "{{\"queries\":{},\"secs\":{secs},\"qps\":{},\"p50_ns\":{},\"p99_ns\":{},\"timeouts\":{timeouts},\"nxdomain\":{nx},\"other_rcode\":{other}}}",
        lat.len(),
        lat.len() as f64 / secs,
        pct(&lat, 50.0),
        pct(&lat, 99.0)
    );
    exit(0)
}

/// A loopback DNS server that answers every A query with `answer` (TTL 300), everything else
/// with an empty NOERROR. Prints `ready` once bound.
fn dns_server(addr: &str, answer: &str) -> ! {
    let ip: std::net::Ipv4Addr = answer.parse().unwrap();
    let s = UdpSocket::bind(addr).unwrap();
    println!("ready");
    io::stdout().flush().unwrap();
    let mut buf = [0u8; 1500];
    loop {
        let Ok((n, peer)) = s.recv_from(&mut buf) else {
            continue;
        };
        if n < 17 {
            continue;
        }
        // End of the question: the name, then type and class.
        let mut i = 12;
        while i < n && buf[i] != 0 {
            i += buf[i] as usize + 1;
        }
        if i + 5 > n {
            continue;
        }
        let qtype = u16::from_be_bytes([buf[i + 1], buf[i + 2]]);
        let mut r = buf[..i + 5].to_vec();
        r[2] = 0x81 | (buf[2] & 0x01);
        r[3] = 0x80;
        r[6..12].copy_from_slice(&[0, 0, 0, 0, 0, 0]);
        if qtype == 1 {
            r[7] = 1;
            r.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 1, 0x2c, 0, 4]);
            r.extend_from_slice(&ip.octets());
        }
        let _ = s.send_to(&r, peer);
    }
}
