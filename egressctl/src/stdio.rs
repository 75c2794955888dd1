//! Standard descriptors that are sockets. A socket on fd 0, 1 or 2 was made outside the sandbox:
//! the cgroup programs judge a socket by the cgroup it was made in, so it would carry anything
//! past them, and a unix one can bring in more descriptors (SCM_RIGHTS) or talk to the service
//! at its other end. CMD gets a pipe instead, and egressctl relays bytes one way: into stdin,
//! out of stdout and stderr. No descriptor, credential or reply crosses a pipe.

use std::{
    fs::File,
    io,
    mem::ManuallyDrop,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    thread::JoinHandle,
};

/// Whether `fd` is an open socket.
pub fn is_socket(fd: i32) -> bool {
    // SAFETY: fstat into a zeroed stat of our own; a closed fd just fails.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    (unsafe { libc::fstat(fd, &mut st) } == 0) && st.st_mode & libc::S_IFMT == libc::S_IFSOCK
}

/// A pipe standing in for a socket on a standard descriptor.
pub struct Relay {
    pub fd: i32,
    /// The pipe end CMD gets (read end for stdin, write end for stdout/stderr).
    child: OwnedFd,
    /// The end egressctl keeps and copies through.
    parent: OwnedFd,
}

/// A relay for each of fds 0-2 that is a socket.
pub fn socket_stdio() -> io::Result<Vec<Relay>> {
    let mut out = Vec::new();
    for fd in 0..=2 {
        if !is_socket(fd) {
            continue;
        }
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let (child, parent) = if fd == 0 {
            (read, write)
        } else {
            (write, read)
        };
        out.push(Relay { fd, child, parent });
    }
    Ok(out)
}

impl Relay {
    /// In the forked child: the pipe takes the socket's place.
    pub fn install_in_child(&self) -> io::Result<()> {
        // SAFETY: dup2 onto a standard descriptor of this (single-threaded) child.
        if unsafe { libc::dup2(self.child.as_raw_fd(), self.fd) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// In the parent: starts copying. Returns the output relays, to be joined once CMD is gone (they
/// end when every writer has closed the pipe); the input relay ends with egressctl.
pub fn start(relays: Vec<Relay>) -> Vec<JoinHandle<()>> {
    let mut outputs = Vec::new();
    for Relay { fd, child, parent } in relays {
        drop(child);
        let handle = std::thread::spawn(move || {
            // SAFETY: fd is one of this process's standard descriptors, open for its whole life;
            // ManuallyDrop keeps it from being closed here.
            let socket = ManuallyDrop::new(unsafe { File::from_raw_fd(fd) });
            let mut pipe = File::from(parent);
            let mut socket: &File = &socket;
            let _ = if fd == 0 {
                copy(&mut socket, &mut pipe)
            } else {
                copy(&mut pipe, &mut socket)
            };
        });
        if fd != 0 {
            outputs.push(handle);
        }
    }
    outputs
}

fn copy(from: &mut impl io::Read, to: &mut impl io::Write) -> io::Result<()> {
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&buf[..n])?;
    }
}
