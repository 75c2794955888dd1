//! The unix sockets of a network namespace as `sock_diag` (NETLINK_SOCK_DIAG, UNIX_DIAG) lists
//! them: which socket is bound to a file (by the file's device and inode) or to an abstract name.
//! This is how the supervisor finds a server before anything connects to it: an outside server is
//! never touched, not even by a connection that would be closed at once.

use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 0x01;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const UDIAG_SHOW_NAME: u32 = 0x01;
const UDIAG_SHOW_VFS: u32 = 0x02;
const UNIX_DIAG_NAME: u16 = 0;
const UNIX_DIAG_VFS: u16 = 1;

/// `struct unix_diag_req` after its `nlmsghdr`.
#[repr(C)]
struct Request {
    len: u32,
    kind: u16,
    flags: u16,
    seq: u32,
    pid: u32,
    family: u8,
    protocol: u8,
    _pad: u16,
    states: u32,
    ino: u32,
    show: u32,
    cookie: [u32; 2],
}

/// A bound unix socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bound {
    /// The socket's own inode (`socket:[N]` in /proc/PID/fd).
    pub ino: u32,
    /// SOCK_STREAM, SOCK_DGRAM or SOCK_SEQPACKET.
    pub kind: u8,
    /// The bound name: a path, or a NUL and an abstract name.
    pub name: Vec<u8>,
    /// The socket file's inode and device ([`encode_dev`]), for a pathname socket.
    pub vfs: Option<(u32, u32)>,
}

/// Every bound unix socket of the calling thread's network namespace.
pub fn bound_sockets() -> io::Result<Vec<Bound>> {
    // SAFETY: plain socket(2); the descriptor is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let req = Request {
        len: std::mem::size_of::<Request>() as u32,
        kind: SOCK_DIAG_BY_FAMILY,
        flags: NLM_F_REQUEST | NLM_F_DUMP,
        seq: 1,
        pid: 0,
        family: libc::AF_UNIX as u8,
        protocol: 0,
        _pad: 0,
        states: u32::MAX,
        ino: 0,
        show: UDIAG_SHOW_NAME | UDIAG_SHOW_VFS,
        cookie: [u32::MAX; 2],
    };
    // SAFETY: `req` is a plain struct of the length passed.
    let sent = unsafe {
        libc::send(
            sock.as_raw_fd(),
            (&req as *const Request).cast(),
            req.len as usize,
            0,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: receiving into a buffer of the length passed.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if parse(&buf[..n as usize], &mut out)? {
            return Ok(out);
        }
    }
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Parses one datagram of the dump into `out`; true at NLMSG_DONE.
fn parse(mut b: &[u8], out: &mut Vec<Bound>) -> io::Result<bool> {
    const HDR: usize = 16;
    // struct unix_diag_msg: family, type, state, pad (u8 each), ino (u32), cookie (2 x u32).
    const MSG: usize = 16;
    while b.len() >= HDR {
        let len = u32_at(b, 0) as usize;
        let kind = u16_at(b, 4);
        if len < HDR || len > b.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "sock_diag: truncated message",
            ));
        }
        match kind {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                let errno = if len >= HDR + 4 {
                    -(u32_at(b, HDR) as i32)
                } else {
                    libc::EIO
                };
                return Err(io::Error::from_raw_os_error(errno));
            }
            SOCK_DIAG_BY_FAMILY if len >= HDR + MSG => {
                let m = &b[HDR..len];
                let mut sock = Bound {
                    kind: m[1],
                    ino: u32_at(m, 4),
                    name: Vec::new(),
                    vfs: None,
                };
                let mut attrs = &m[MSG..];
                while attrs.len() >= 4 {
                    let alen = u16_at(attrs, 0) as usize;
                    let akind = u16_at(attrs, 2);
                    if alen < 4 || alen > attrs.len() {
                        break;
                    }
                    let data = &attrs[4..alen];
                    match akind {
                        UNIX_DIAG_NAME => sock.name = data.to_vec(),
                        UNIX_DIAG_VFS if data.len() >= 8 => {
                            sock.vfs = Some((u32_at(data, 0), u32_at(data, 4)))
                        }
                        _ => {}
                    }
                    let step = (alen + 3) & !3;
                    attrs = &attrs[step.min(attrs.len())..];
                }
                if !sock.name.is_empty() {
                    out.push(sock);
                }
            }
            _ => {}
        }
        let step = (len + 3) & !3;
        b = &b[step.min(b.len())..];
    }
    Ok(false)
}

/// A device as UNIX_DIAG_VFS reports it: the kernel's own `dev_t` (MKDEV: 12 bits of major
/// above 20 bits of minor), not the encoding stat(2) uses.
pub fn encode_dev(dev: u64) -> u32 {
    (libc::major(dev) << 20) | (libc::minor(dev) & 0xf_ffff)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::{linux::net::SocketAddrExt as _, unix::fs::MetadataExt as _};

    #[test]
    fn a_bound_path_and_an_abstract_name_are_listed_with_their_inodes() {
        let dir = std::env::temp_dir().join(format!("egressd-diag-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let _l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let name = format!("egressd-diag-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let _a = std::os::unix::net::UnixListener::bind_addr(&addr).unwrap();
        let all = bound_sockets().unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        let by_path = all
            .iter()
            .find(|b| b.vfs == Some((meta.ino() as u32, encode_dev(meta.dev()))))
            .expect("the pathname socket, found by its file's inode");
        // The name as bound, with the NUL the address carried.
        assert_eq!(
            by_path.name.strip_suffix(&[0]).unwrap_or(&by_path.name),
            path.as_os_str().as_encoded_bytes()
        );
        assert_eq!(by_path.kind as i32, libc::SOCK_STREAM);
        let mut abstract_name = vec![0u8];
        abstract_name.extend_from_slice(name.as_bytes());
        let by_name = all
            .iter()
            .find(|b| b.name == abstract_name)
            .expect("the abstract socket, found by its name");
        assert!(by_name.vfs.is_none());
        assert_ne!(by_name.ino, by_path.ino);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
