//! The less common ways out (issue #6, ways 7 and 9): broadcast, multicast, IPv6 link-local, TCP
//! Fast Open, io_uring, sendmmsg, IP source routing, and nesting a cgroup. Each returns the
//! `attempt` exit code (0 through, 3 refused, 4 other error).
//!
//! Targets that need an interface are written `IFACE@ADDR:PORT`; every address a test passes is a
//! test host's or a group scoped to the test's own veth, so nothing here can reach a real network.

use std::{
    fs,
    io::{self, Write as _},
    mem::size_of,
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV6, TcpStream, UdpSocket},
    os::fd::{AsRawFd, RawFd},
    time::Duration,
};

use nix::sys::socket::{setsockopt, sockopt, SockaddrLike as _, SockaddrStorage};

use super::{report, udp_for, PAYLOAD};

fn split_iface(target: &str) -> (&str, SocketAddr) {
    let (iface, addr) = target
        .split_once('@')
        .expect("target must be IFACE@ADDR:PORT");
    (iface, addr.parse().expect("ADDR:PORT"))
}

fn ifindex(iface: &str) -> u32 {
    nix::net::if_::if_nametoindex(iface).expect("no such interface")
}

fn setopt<T>(fd: RawFd, level: i32, name: i32, v: &T) -> io::Result<()> {
    // SAFETY: v points to a live T of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (v as *const T).cast(),
            size_of::<T>() as u32,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

pub fn attempt(kind: &str, target: &str) -> Option<i32> {
    Some(match kind {
        // A directed broadcast (198.18.N.255) routes through the test veth like any other address.
        "udp-broadcast" => report((|| {
            let a: SocketAddr = target.parse().expect("ADDR:PORT");
            let s = udp_for(&a)?;
            s.set_broadcast(true)?;
            s.send_to(PAYLOAD, a)
        })()),
        // The limited broadcast 255.255.255.255 pinned to the test veth (SO_BINDTODEVICE: root).
        "udp-broadcast-dev" => report((|| {
            let (iface, a) = split_iface(target);
            let s = udp_for(&a)?;
            s.set_broadcast(true)?;
            setsockopt(&s, sockopt::BindToDevice, &std::ffi::OsString::from(iface))?;
            s.send_to(PAYLOAD, a)
        })()),
        // A multicast group, sent out of the test veth (IP_MULTICAST_IF / IPV6_MULTICAST_IF).
        "udp-multicast" => report((|| {
            let (iface, a) = split_iface(target);
            let s = udp_for(&a)?;
            let index = ifindex(iface);
            match a {
                SocketAddr::V4(_) => {
                    let mreq = libc::ip_mreqn {
                        imr_multiaddr: libc::in_addr { s_addr: 0 },
                        imr_address: libc::in_addr { s_addr: 0 },
                        imr_ifindex: index as i32,
                    };
                    setopt(
                        s.as_raw_fd(),
                        libc::IPPROTO_IP,
                        libc::IP_MULTICAST_IF,
                        &mreq,
                    )?
                }
                SocketAddr::V6(_) => setopt(
                    s.as_raw_fd(),
                    libc::IPPROTO_IPV6,
                    libc::IPV6_MULTICAST_IF,
                    &(index as i32),
                )?,
            }
            s.send_to(PAYLOAD, a)
        })()),
        // TCP to an IPv6 link-local address (fe80::/10) of the test host, scoped to the veth.
        "tcp-link-local" => {
            let (iface, a) = split_iface(target);
            let SocketAddr::V6(v6) = a else {
                panic!("tcp-link-local takes an IPv6 address")
            };
            let scoped = SocketAddrV6::new(*v6.ip(), v6.port(), 0, ifindex(iface));
            report(TcpStream::connect_timeout(
                &scoped.into(),
                Duration::from_secs(2),
            ))
        }
        // TCP Fast Open: the SYN leaves from sendto(MSG_FASTOPEN), with no connect() call.
        "tcp-fastopen" => report((|| {
            let a: SocketAddr = target.parse().expect("ADDR:PORT");
            let family = if a.is_ipv4() {
                libc::AF_INET
            } else {
                libc::AF_INET6
            };
            let fd = super::raw_socket(family, libc::SOCK_STREAM, 0)?;
            let dest = SockaddrStorage::from(a);
            nix::sys::socket::sendto(
                fd.as_raw_fd(),
                PAYLOAD,
                &dest,
                nix::sys::socket::MsgFlags::from_bits_retain(libc::MSG_FASTOPEN),
            )
            .map_err(io::Error::from)
        })()),
        // connect and sendmsg submitted through io_uring instead of the syscalls.
        "uring-connect" => report(uring(target, true)),
        "uring-sendmsg" => report(uring(target, false)),
        // sendmmsg(2): several datagrams, one syscall.
        "sendmmsg" => report((|| {
            let a: SocketAddr = target.parse().expect("ADDR:PORT");
            let s = udp_for(&a)?;
            let dest = SockaddrStorage::from(a);
            let mut iov = payload_iov();
            let hdr = |iov: &mut [libc::iovec; 1]| libc::mmsghdr {
                msg_hdr: payload_msg(&dest, iov),
                msg_len: 0,
            };
            let mut msgs = [hdr(&mut iov), hdr(&mut iov)];
            // SAFETY: msgs, their names and iovecs outlive the call.
            let n = unsafe { libc::sendmmsg(s.as_raw_fd(), msgs.as_mut_ptr(), 2, 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(n)
        })()),
        // A datagram to 127.0.0.1 with a loose source route whose first hop is the test host: the
        // socket hooks see a loopback destination, the packet would leave by the veth.
        "udp-lsrr" => report((|| {
            let (hop, a) = target.split_once('@').expect("HOP@127.x:PORT");
            let hop: Ipv4Addr = hop.parse().expect("hop address");
            let a: SocketAddr = a.parse().expect("ADDR:PORT");
            let s = UdpSocket::bind("0.0.0.0:0")?;
            // NOP, then LSRR (type 0x83, length 7, pointer 4, one hop): 8 bytes, a multiple of 4.
            let mut opt = vec![1u8, 0x83, 7, 4];
            opt.extend_from_slice(&hop.octets());
            // SAFETY: opt is valid for its length.
            let rc = unsafe {
                libc::setsockopt(
                    s.as_raw_fd(),
                    libc::IPPROTO_IP,
                    libc::IP_OPTIONS,
                    opt.as_ptr().cast(),
                    opt.len() as u32,
                )
            };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            s.send_to(PAYLOAD, a)
        })()),
        // Make a child cgroup below the caller's own, move into it, then connect: the session must
        // follow (programs and session lookup go by ancestry). Refused outright for non-root.
        "subcgroup-tcp" => {
            let own = fs::read_to_string("/proc/self/cgroup").unwrap();
            let rel = own
                .lines()
                .find_map(|l| l.strip_prefix("0::"))
                .expect("cgroup v2 line")
                .trim()
                .to_string();
            let mount = egressd_common::host::cgroup2_mount().expect("a cgroup2 mount");
            let child = mount
                .join(rel.trim_start_matches('/'))
                .join(format!("nested-{}", std::process::id()));
            if let Err(e) = fs::create_dir(&child) {
                return Some(report::<()>(Err(e)));
            }
            let moved = fs::OpenOptions::new()
                .write(true)
                .open(child.join("cgroup.procs"))
                .and_then(|mut f| f.write_all(std::process::id().to_string().as_bytes()));
            if let Err(e) = moved {
                return Some(report::<()>(Err(e)));
            }
            println!("moved into {}", child.display());
            let a: SocketAddr = target.parse().expect("ADDR:PORT");
            report(TcpStream::connect_timeout(&a, Duration::from_secs(2)))
        }
        _ => return None,
    })
}

fn payload_iov() -> [libc::iovec; 1] {
    [libc::iovec {
        iov_base: PAYLOAD.as_ptr() as *mut _,
        iov_len: PAYLOAD.len(),
    }]
}

/// A message carrying `iov` to `dest`; both must outlive its use.
fn payload_msg(dest: &SockaddrStorage, iov: &mut [libc::iovec; 1]) -> libc::msghdr {
    libc::msghdr {
        msg_name: dest.as_ptr() as *mut _,
        msg_namelen: dest.len(),
        msg_iov: iov.as_mut_ptr(),
        msg_iovlen: 1,
        msg_control: std::ptr::null_mut(),
        msg_controllen: 0,
        msg_flags: 0,
    }
}

/// One connect (TCP) or sendmsg (UDP) through an io_uring submission queue.
fn uring(target: &str, connect: bool) -> io::Result<usize> {
    use io_uring::{opcode, types::Fd, IoUring};
    let a: SocketAddr = target.parse().expect("ADDR:PORT");
    let family = match a.ip() {
        IpAddr::V4(_) => libc::AF_INET,
        IpAddr::V6(_) => libc::AF_INET6,
    };
    let ty = if connect {
        libc::SOCK_STREAM
    } else {
        libc::SOCK_DGRAM
    };
    let fd = super::raw_socket(family, ty, 0)?;
    let dest = SockaddrStorage::from(a);
    let mut iov = payload_iov();
    let msg = payload_msg(&dest, &mut iov);
    let mut ring = IoUring::new(4)?;
    let entry = if connect {
        opcode::Connect::new(Fd(fd.as_raw_fd()), dest.as_ptr(), dest.len()).build()
    } else {
        opcode::SendMsg::new(Fd(fd.as_raw_fd()), &msg).build()
    };
    // SAFETY: the address, message and iovec outlive the submission, which completes below.
    unsafe { ring.submission().push(&entry) }
        .map_err(|_| io::Error::other("submission queue full"))?;
    ring.submit_and_wait(1)?;
    let cqe = ring
        .completion()
        .next()
        .ok_or_else(|| io::Error::other("no completion"))?;
    if cqe.result() < 0 {
        return Err(io::Error::from_raw_os_error(-cqe.result()));
    }
    Ok(cqe.result() as usize)
}
