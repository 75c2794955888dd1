//! Descriptors and credentials of other processes: a session's sockets and listener (taken with
//! pidfd_getfd), and what a connected socket says of its peer.

use std::{
    fs, io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

/// The seccomp listener `fd` of the caller (egressctl's child), checked to be one.
pub fn take_listener(pid: u32, fd: i32) -> io::Result<OwnedFd> {
    let listener = take_socket(pid, fd)?;
    let what = fs::read_link(format!("/proc/self/fd/{}", listener.as_raw_fd()))?;
    if what.as_os_str() != "anon_inode:seccomp notify" {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "descriptor {fd} is {}, not a seccomp listener",
                what.display()
            ),
        ));
    }
    Ok(listener)
}

pub(super) fn peer_cred(sock: &OwnedFd) -> Option<libc::ucred> {
    egressd_common::host::peer_cred(sock)
}

pub(super) fn peer_pid(sock: &OwnedFd) -> Option<u32> {
    peer_cred(sock).map(|c| c.pid as u32)
}

pub(super) fn peer_in(sock: &OwnedFd, cgroup: &str) -> bool {
    peer_pid(sock)
        .and_then(crate::sessions::cgroup_of)
        .is_some_and(|c| c == cgroup)
}

pub(super) fn socket_int(sock: &OwnedFd, opt: i32) -> Option<i32> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: an int option of the length passed.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(v)
}

/// The thread group (process) of thread `tid`: pidfd_open takes a process, and a notification
/// names the thread that made the call.
pub(super) fn tgid_of(tid: u32) -> u32 {
    fs::read_to_string(format!("/proc/{tid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Tgid:"))
                .and_then(|t| t.trim().parse().ok())
        })
        .unwrap_or(tid)
}

/// The descriptor `fd` of thread `tid`'s process (the same open socket, not a copy of it).
/// A descriptor of another process (pidfd_getfd), for the caller to check what it is.
pub fn take_fd(pid: u32, fd: i32) -> io::Result<OwnedFd> {
    take_socket(pid, fd)
}

pub(super) fn take_socket(tid: u32, fd: i32) -> io::Result<OwnedFd> {
    let pid = tgid_of(tid);
    // SAFETY: pidfd_open and pidfd_getfd with integer arguments; the descriptors are owned.
    unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, pid, 0);
        if pidfd < 0 {
            return Err(io::Error::last_os_error());
        }
        let pidfd = OwnedFd::from_raw_fd(pidfd as i32);
        let got = libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0);
        if got < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(got as i32))
    }
}
