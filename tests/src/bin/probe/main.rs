//! The tests' hands: `listen` runs on an outside host and counts what reaches it (sockets and the
//! wire, through an AF_PACKET capture); `attempt` tries one way out from inside a sandbox.
//!
//! `attempt` exit codes: 0 the action went through, 3 refused with EPERM/EACCES, 4 other error.

use std::{
    fs,
    io::{self, Read as _, Write as _},
    net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    process::{exit, Command},
    time::{Duration, Instant},
};

mod bench;
mod dns;
mod handoff;
mod root;
mod ways;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    match a.as_slice() {
        ["listen", v4, v6, port, iface, counts] => {
            listen(v4, v6, port.parse().unwrap(), iface, counts)
        }
        ["attempt", kind, target] => exit(attempt(kind, target)),
        ["wait-attempt", file, kind, target] => {
            let deadline = Instant::now() + Duration::from_secs(30);
            while !fs::exists(file).unwrap_or(false) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let code = attempt(kind, target);
            // Best effort: only tests that made the directory writable wait for it.
            let _ = fs::write(format!("{file}.done"), b"done");
            exit(code)
        }
        // Floods in phases the test paces: for each phase k, waits for DIR/goK, sends N datagrams
        // to TARGET (PAUSE_US between sends), and writes DIR/goK.done with how many were refused.
        ["flood-phases", dir, target, n, phases, pause_us] => {
            let a: SocketAddr = target.parse().unwrap();
            let (n, phases): (u64, u32) = (n.parse().unwrap(), phases.parse().unwrap());
            let pause = Duration::from_micros(pause_us.parse().unwrap());
            let s = udp_for(&a).unwrap();
            let mut total = 0;
            for k in 1..=phases {
                let go = format!("{dir}/go{k}");
                let deadline = Instant::now() + Duration::from_secs(300);
                while !fs::exists(&go).unwrap_or(false) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
                let mut refused = 0;
                for _ in 0..n {
                    if s.send_to(PAYLOAD, a).is_err() {
                        refused += 1;
                    }
                    if !pause.is_zero() {
                        std::thread::sleep(pause);
                    }
                }
                total += refused;
                fs::write(format!("{go}.done"), refused.to_string()).unwrap();
            }
            println!("refused={total} of {}", n * u64::from(phases));
        }
        ["fds"] => {
            let mut fds: Vec<String> = fs::read_dir("/proc/self/fd")
                .unwrap()
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            fds.sort();
            println!("{}", fds.join(" "));
        }
        ["escape", procs] => exit(report(
            fs::OpenOptions::new()
                .write(true)
                .open(procs)
                .and_then(|mut f| f.write_all(std::process::id().to_string().as_bytes())),
        )),
        ["dns-server", v4, v6, log, records @ ..] => dns::server(v4, v6, log, records),
        ["dns-query", mode, server, name] => exit(dns::query(mode, server, name, "A")),
        ["dns-query", mode, server, name, qtype] => exit(dns::query(mode, server, name, qtype)),
        ["dns-query", mode, server, name, qtype, times] => exit(
            (0..times.parse::<u32>().expect("a number of times"))
                .map(|_| dns::query(mode, server, name, qtype))
                .max()
                .unwrap_or(0),
        ),
        ["dns-raw", server, hex] => exit(dns::raw(server, hex)),
        ["resolve", name] => exit(dns::resolve(name)),
        ["abstract-listen", name, secs] => {
            use std::os::linux::net::SocketAddrExt as _;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
            let _l = std::os::unix::net::UnixListener::bind_addr(&addr).unwrap();
            println!("listening");
            io::stdout().flush().unwrap();
            std::thread::sleep(Duration::from_secs(secs.parse().unwrap()));
        }
        ["root-escape", cgroup2, pin, log] => root::main(cgroup2, pin, log),
        ["ids"] => {
            // SAFETY: getters without arguments.
            let (uid, euid) = unsafe { (libc::getuid(), libc::geteuid()) };
            println!("uid={uid} euid={euid}");
        }
        ["bench", rest @ ..] => bench::main(rest),
        ["touch", file] => {
            fs::write(file, b"ran").unwrap();
        }
        ["runner", path] => handoff::runner(path, "stream"),
        ["runner", path, kind] => handoff::runner(path, kind),
        ["unix-run", path, cmd] => exit(handoff::unix_run(path, cmd, "stream")),
        ["unix-run", path, cmd, kind] => exit(handoff::unix_run(path, cmd, kind)),
        ["fd-passer", path, hostport] => handoff::fd_passer(path, hostport),
        ["fd-take", path] => exit(handoff::fd_take(path)),
        ["fd-take-stdin"] => exit(handoff::fd_take_stdin("fd")),
        ["fd-take-stdin", line] => exit(handoff::fd_take_stdin(line)),
        ["echo-server", path] => handoff::echo_server(path),
        ["single-instance", path] => exit(handoff::single_instance(path)),
        _ => {
            eprintln!("usage: egressd-probe listen|attempt|wait-attempt|fds|escape|root-escape|touch|bench|dns-server|dns-query|dns-raw|resolve ...");
            exit(2);
        }
    }
}

fn report<T>(r: io::Result<T>) -> i32 {
    match r {
        Ok(_) => {
            println!("allowed pid={}", std::process::id());
            0
        }
        Err(e) if matches!(e.raw_os_error(), Some(libc::EPERM) | Some(libc::EACCES)) => {
            println!("denied pid={}: {e}", std::process::id());
            3
        }
        Err(e) => {
            println!("error: {e}");
            4
        }
    }
}

const PAYLOAD: &[u8] = b"egressd-probe";

fn attempt(kind: &str, target: &str) -> i32 {
    if let Some(code) = ways::attempt(kind, target) {
        return code;
    }
    let addr = || -> SocketAddr { target.parse().expect("target must be IP:port") };
    let timeout = Duration::from_secs(2);
    match kind {
        "tcp" => report(
            TcpStream::connect_timeout(&addr(), timeout).and_then(|mut s| s.write_all(PAYLOAD)),
        ),
        "tcp-v4mapped" => {
            // An IPv6 socket to ::ffff:a.b.c.d: the kernel sends IPv4.
            let a = addr();
            let IpAddr::V4(v4) = a.ip() else {
                panic!("tcp-v4mapped takes an IPv4 target")
            };
            let mapped = SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), a.port());
            report(TcpStream::connect_timeout(&mapped, timeout))
        }
        "udp-sendto" => report(udp_for(&addr()).and_then(|s| s.send_to(PAYLOAD, addr()))),
        "udp-sendmsg" => report(udp_sendmsg(&addr())),
        "udp-connected" => report(udp_for(&addr()).and_then(|s| {
            s.connect(addr())?;
            s.send(PAYLOAD)
        })),
        "grandchild-tcp" => {
            // Two levels down: sh, then this probe again.
            let me = std::env::current_exe().unwrap();
            let status = Command::new("sh")
                .args(["-c", &format!("{} attempt tcp {target}", me.display())])
                .status()
                .unwrap();
            status.code().unwrap_or(4)
        }
        "raw" => report(
            raw_socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_UDP)
                .and_then(|fd| raw_send(&fd, &addr())),
        ),
        "ping" => report(
            raw_socket(libc::AF_INET, libc::SOCK_DGRAM, libc::IPPROTO_ICMP)
                .and_then(|fd| raw_send(&fd, &addr())),
        ),
        "flood-udp" => {
            // TARGET,N: N unconnected sends as fast as possible; prints how many were refused.
            let (t, n) = target.split_once(',').expect("flood-udp takes IP:port,N");
            let a: SocketAddr = t.parse().unwrap();
            let n: u64 = n.parse().unwrap();
            let s = udp_for(&a).unwrap();
            let refused = (0..n).filter(|_| s.send_to(PAYLOAD, a).is_err()).count();
            println!("refused={refused} of {n}");
            0
        }
        "storm" => {
            // ALLOWED,DENIED,N: N connects to each, alternating; prints the outcome counts.
            let parts: Vec<&str> = target.split(',').collect();
            let (ok_to, no_to): (SocketAddr, SocketAddr) =
                (parts[0].parse().unwrap(), parts[1].parse().unwrap());
            let n: u64 = parts[2].parse().unwrap();
            let (mut allowed_fail, mut denied_ok) = (0, 0);
            for _ in 0..n {
                if TcpStream::connect_timeout(&ok_to, timeout).is_err() {
                    allowed_fail += 1;
                }
                if TcpStream::connect_timeout(&no_to, timeout).is_ok() {
                    denied_ok += 1;
                }
            }
            println!("allowed_fail={allowed_fail} denied_ok={denied_ok} of {n}");
            0
        }
        // `IFACE@IP:PORT`: an AF_PACKET socket writing an IPv4/UDP frame straight onto IFACE.
        "packet" => {
            let (iface, dest) = target.split_once('@').expect("IFACE@IP:PORT");
            report(packet_send(iface, dest.parse().expect("IP:PORT")))
        }
        // TARGET is a pid outside the sandbox.
        "ptrace" => {
            let pid: i32 = target.parse().expect("a pid");
            // SAFETY: PTRACE_ATTACH with a pid; no pointers.
            let rc = unsafe { libc::ptrace(libc::PTRACE_ATTACH, pid, 0, 0) };
            report(if rc == 0 {
                // SAFETY: as above.
                unsafe { libc::ptrace(libc::PTRACE_DETACH, pid, 0, 0) };
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            })
        }
        "vm-read" => {
            let pid: i32 = target.parse().expect("a pid");
            let mut buf = [0u8; 8];
            let local = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            };
            // Any address: EPERM (refused) and EFAULT (let through, bad address) differ.
            let remote = libc::iovec {
                iov_base: 0x1000 as *mut libc::c_void,
                iov_len: buf.len(),
            };
            // SAFETY: valid iovecs for the call's duration.
            let n = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
            report(if n >= 0 {
                Ok(())
            } else {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EFAULT) {
                    Ok(())
                } else {
                    Err(e)
                }
            })
        }
        "proc-mem" => report(
            fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(format!("/proc/{target}/mem")),
        ),
        "signal" => {
            let pid: i32 = target.parse().expect("a pid");
            // SAFETY: kill(2) with signal 0 only checks permission.
            report(if unsafe { libc::kill(pid, 0) } == 0 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            })
        }
        // TARGET: the name of an abstract unix socket (without the leading NUL).
        "abstract" => {
            use std::os::linux::net::SocketAddrExt as _;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(target.as_bytes())
                .expect("a name");
            report(std::os::unix::net::UnixStream::connect_addr(&addr))
        }
        // A debugger inside the sandbox: attach to our own child.
        "ptrace-child" => {
            let mut child = Command::new("sleep").arg("5").spawn().unwrap();
            let pid = child.id() as i32;
            // SAFETY: PTRACE_ATTACH with a pid; no pointers.
            let rc = unsafe { libc::ptrace(libc::PTRACE_ATTACH, pid, 0, 0) };
            let r = if rc == 0 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            };
            let _ = child.kill();
            let _ = child.wait();
            report(r)
        }
        "vsock" => report(raw_socket(libc::AF_VSOCK, libc::SOCK_STREAM, 0)),
        "xdp" => report(raw_socket(libc::AF_XDP, libc::SOCK_RAW, 0)),
        // Binds a TCP listener to TARGET and serves it for 3 s, printing where it is bound and
        // every peer that connected.
        "listen-for" => {
            let l = match TcpListener::bind(target) {
                Ok(l) => l,
                Err(e) => return report::<()>(Err(e)),
            };
            println!("bound {}", l.local_addr().unwrap());
            io::stdout().flush().unwrap();
            l.set_nonblocking(true).unwrap();
            let end = Instant::now() + Duration::from_secs(3);
            while Instant::now() < end {
                match l.accept() {
                    Ok((_, peer)) => println!("accepted {peer}"),
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
            0
        }
        "loopback-tcp" => {
            let l = TcpListener::bind(target).unwrap();
            report(
                TcpStream::connect_timeout(&l.local_addr().unwrap(), timeout).and_then(|mut s| {
                    s.write_all(PAYLOAD)?;
                    let (mut c, _) = l.accept()?;
                    let mut buf = [0u8; PAYLOAD.len()];
                    c.read_exact(&mut buf)
                }),
            )
        }
        "loopback-udp" => {
            let r = UdpSocket::bind(target).unwrap();
            r.set_read_timeout(Some(timeout)).unwrap();
            report(udp_for(&r.local_addr().unwrap()).and_then(|s| {
                s.send_to(PAYLOAD, r.local_addr()?)?;
                let mut buf = [0u8; 64];
                r.recv(&mut buf)
            }))
        }
        _ => {
            eprintln!("unknown attempt {kind}");
            2
        }
    }
}

fn udp_for(a: &SocketAddr) -> io::Result<UdpSocket> {
    if a.is_ipv4() {
        UdpSocket::bind("0.0.0.0:0")
    } else {
        UdpSocket::bind("[::]:0")
    }
}

/// sendmsg(2) with a destination in msg_name, the path libraries use for unconnected UDP.
fn udp_sendmsg(a: &SocketAddr) -> io::Result<usize> {
    use nix::sys::socket::{sendmsg, MsgFlags, SockaddrStorage};
    let s = udp_for(a)?;
    let dest = SockaddrStorage::from(*a);
    let iov = [io::IoSlice::new(PAYLOAD)];
    sendmsg(s.as_raw_fd(), &iov, &[], MsgFlags::empty(), Some(&dest)).map_err(io::Error::from)
}

fn raw_socket(family: i32, ty: i32, proto: i32) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned right away.
    let fd = unsafe { libc::socket(family, ty, proto) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// For raw UDP: a UDP header to the target port; for ping: an echo request.
fn raw_send(fd: &OwnedFd, a: &SocketAddr) -> io::Result<usize> {
    let SocketAddr::V4(v4) = a else {
        panic!("raw attempts are IPv4")
    };
    let port = v4.port().to_be_bytes();
    let mut pkt = vec![
        0x30,
        0x39,
        port[0],
        port[1],
        0,
        8 + PAYLOAD.len() as u8,
        0,
        0,
    ];
    pkt.extend_from_slice(PAYLOAD);
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(v4.ip().octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: valid buffer and sockaddr_in for the call's duration.
    let n = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            pkt.as_ptr().cast(),
            pkt.len(),
            0,
            (&sin as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Counts, until killed (or 120 s), TCP connections and UDP datagrams received on `port`, and every
/// IPv4/IPv6 frame on `iface` addressed to `port` or carrying ICMP echo (the wire capture).
fn listen(v4: &str, v6: &str, port: u16, iface: &str, counts: &str) {
    let tcp4 = TcpListener::bind((v4, port)).expect("bind tcp4");
    let tcp6 = TcpListener::bind((v6.parse::<Ipv6Addr>().unwrap(), port)).expect("bind tcp6");
    let udp4 = UdpSocket::bind((v4, port)).expect("bind udp4");
    let udp6 = UdpSocket::bind((v6.parse::<Ipv6Addr>().unwrap(), port)).expect("bind udp6");
    // SAFETY: socket(2) for an AF_PACKET capture; owned right away.
    let cap = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_DGRAM,
            (libc::ETH_P_ALL as u16).to_be() as i32,
        )
    };
    assert!(cap >= 0, "AF_PACKET socket: {}", io::Error::last_os_error());
    // SAFETY: fresh fd.
    let cap = unsafe { OwnedFd::from_raw_fd(cap) };
    let ifindex = nix::net::if_::if_nametoindex(iface).expect("capture interface");
    let sll = libc::sockaddr_ll {
        sll_family: libc::AF_PACKET as u16,
        sll_protocol: (libc::ETH_P_ALL as u16).to_be(),
        sll_ifindex: ifindex as i32,
        sll_hatype: 0,
        sll_pkttype: 0,
        sll_halen: 0,
        sll_addr: [0; 8],
    };
    // SAFETY: valid sockaddr_ll for the call.
    let rc = unsafe {
        libc::bind(
            cap.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(rc, 0, "bind capture: {}", io::Error::last_os_error());
    for l in [&tcp4, &tcp6] {
        l.set_nonblocking(true).unwrap();
    }
    for u in [&udp4, &udp6] {
        u.set_nonblocking(true).unwrap();
    }
    let (mut tcp, mut udp, mut wire) = (0u64, 0u64, 0u64);
    let write = |tcp: u64, udp: u64, wire: u64| {
        let tmp = format!("{counts}.tmp");
        fs::write(&tmp, format!("tcp={tcp} udp={udp} wire={wire}\n")).unwrap();
        fs::rename(&tmp, counts).unwrap();
    };
    write(0, 0, 0);
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut buf = [0u8; 2048];
    while Instant::now() < deadline {
        let mut fds = [
            libc::pollfd {
                fd: tcp4.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: tcp6.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: udp4.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: udp6.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: cap.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: fds is a valid array of pollfd.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as u64, 200) };
        let before = (tcp, udp, wire);
        for l in [&tcp4, &tcp6] {
            while l.accept().is_ok() {
                tcp += 1;
            }
        }
        for u in [&udp4, &udp6] {
            while u.recv(&mut buf).is_ok() {
                udp += 1;
            }
        }
        loop {
            // SAFETY: buf is valid for its length.
            let n = unsafe {
                libc::recv(
                    cap.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n <= 0 {
                break;
            }
            if frame_matters(&buf[..n as usize], port) {
                wire += 1;
            }
        }
        if (tcp, udp, wire) != before {
            write(tcp, udp, wire);
        }
    }
}

/// An IP packet (SOCK_DGRAM capture: no link header) to `port` over TCP/UDP, or any ICMP echo request.
fn frame_matters(p: &[u8], port: u16) -> bool {
    let (proto, l4) = match p.first().map(|b| b >> 4) {
        Some(4) if p.len() >= 20 => (p[9], ((p[0] & 0x0f) as usize) * 4),
        Some(6) if p.len() >= 40 => (p[6], 40),
        _ => return false,
    };
    match proto {
        6 | 17 => p.len() >= l4 + 4 && u16::from_be_bytes([p[l4 + 2], p[l4 + 3]]) == port,
        1 => p.get(l4) == Some(&8),
        58 => p.get(l4) == Some(&128),
        _ => false,
    }
}

/// An Ethernet broadcast frame carrying IPv4/UDP to `dest`, sent on `iface` with AF_PACKET: no IP
/// stack, no socket hook on the way.
fn packet_send(iface: &str, dest: SocketAddr) -> io::Result<usize> {
    let SocketAddr::V4(v4) = dest else {
        panic!("packet attempts are IPv4")
    };
    let fd = raw_socket(
        libc::AF_PACKET,
        libc::SOCK_RAW,
        i32::from((libc::ETH_P_IP as u16).to_be()),
    )?;
    let name = std::ffi::CString::new(iface).unwrap();
    // SAFETY: a valid NUL-terminated name.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        return Err(io::Error::last_os_error());
    }
    let udp_len = 8 + PAYLOAD.len();
    let total = 20 + udp_len;
    let mut f = vec![0xffu8; 6];
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 1, 0x08, 0x00]);
    let mut ip = vec![
        0x45,
        0,
        (total >> 8) as u8,
        total as u8,
        0,
        0,
        0x40,
        0,
        64,
        17,
        0,
        0,
    ];
    ip.extend_from_slice(&[198, 18, 0, 1]);
    ip.extend_from_slice(&v4.ip().octets());
    let mut sum: u32 = ip
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let csum = !(sum as u16);
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&0x3039u16.to_be_bytes());
    f.extend_from_slice(&v4.port().to_be_bytes());
    f.extend_from_slice(&(udp_len as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(PAYLOAD);
    // SAFETY: zeroed sockaddr_ll is a valid starting value.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_ifindex = ifindex as i32;
    sll.sll_halen = 6;
    sll.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    // SAFETY: valid buffer and sockaddr_ll for the call's duration.
    let n = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            f.as_ptr().cast(),
            f.len(),
            0,
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}
