//! The seccomp notifications of a session's connect(2) calls: reading the address a call names,
//! and answering it.

use std::os::fd::RawFd;

pub(super) enum Answer {
    /// Let the kernel do the call as asked.
    Continue,
    /// The call returns 0 (the supervisor connected the socket).
    Done,
    Errno(i32),
}

pub(super) fn respond(fd: RawFd, id: u64, answer: Answer) {
    let (error, flags) = match answer {
        Answer::Continue => (0, libc::SECCOMP_USER_NOTIF_FLAG_CONTINUE as u32),
        Answer::Done => (0, 0),
        Answer::Errno(e) => (-e, 0),
    };
    let mut resp = libc::seccomp_notif_resp {
        id,
        val: 0,
        error,
        flags,
    };
    // SAFETY: NOTIF_SEND with a struct of the type the ioctl names. ENOENT (the caller went away
    // or was interrupted) needs nothing more.
    unsafe { libc::ioctl(fd, libc::SECCOMP_IOCTL_NOTIF_SEND, &mut resp) };
}

/// The unix address of a connect(2), read from the caller's memory; None for any other call or
/// family, which the kernel handles as usual. (Reading the memory races with the caller's other
/// threads; that is why the supervisor never lets a unix connect continue on what it read.)
pub(super) fn unix_address(listener: RawFd, n: &libc::seccomp_notif) -> Option<Vec<u8>> {
    if n.data.nr as libc::c_long != libc::SYS_connect {
        return None;
    }
    let (ptr, len) = (n.data.args[1], n.data.args[2] as usize);
    if ptr == 0 || len < 2 {
        return None;
    }
    let len = len.min(std::mem::size_of::<libc::sockaddr_un>());
    let mut buf = vec![0u8; len];
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: len,
    };
    let remote = libc::iovec {
        iov_base: ptr as *mut libc::c_void,
        iov_len: len,
    };
    // SAFETY: reads into our buffer of the length given.
    let got = unsafe { libc::process_vm_readv(n.pid as i32, &local, 1, &remote, 1, 0) };
    if got < 2 {
        return None;
    }
    buf.truncate(got as usize);
    if u16::from_ne_bytes([buf[0], buf[1]]) != libc::AF_UNIX as u16 {
        return None;
    }
    // The pid read from must still be the notifying task.
    let mut id = n.id;
    // SAFETY: NOTIF_ID_VALID takes a pointer to the id.
    if unsafe { libc::ioctl(listener, libc::SECCOMP_IOCTL_NOTIF_ID_VALID, &mut id) } != 0 {
        return None;
    }
    Some(buf)
}
