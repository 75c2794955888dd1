//! Acting as a session's caller: a short-lived thread that enters the caller's mount and network
//! namespaces, root and working directory, and takes its uid, gids and groups, so that a path is
//! resolved exactly as the caller's own connect(2) would resolve it (symlinks, `..`, permissions,
//! a private /tmp), and the server sees the caller's credentials. Namespaces, root, working
//! directory and credentials are per thread here (unshare(CLONE_FS), raw setres*id calls rather
//! than libc's, which would change every thread of the daemon), and end with the thread.
//! A root caller's thread drops every capability, as the session did.

use std::{
    ffi::CString,
    fs, io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

/// Who the caller is, read from /proc/PID/status.
#[derive(Debug, Clone)]
pub struct Creds {
    pub uid: u32,
    pub euid: u32,
    pub gid: u32,
    pub egid: u32,
    pub groups: Vec<u32>,
}

impl Creds {
    pub fn of(pid: u32) -> io::Result<Creds> {
        let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
        let ids = |key: &str| -> Vec<u32> {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|rest| {
                    rest.split_whitespace()
                        .filter_map(|n| n.parse().ok())
                        .collect()
                })
                .unwrap_or_default()
        };
        let (uid, gid) = (ids("Uid:"), ids("Gid:"));
        if uid.len() < 4 || gid.len() < 4 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "unreadable Uid/Gid in /proc/PID/status",
            ));
        }
        // The file-system ids decide path permissions; the effective ones are what a server sees.
        Ok(Creds {
            uid: uid[0],
            euid: uid[3],
            gid: gid[0],
            egid: gid[3],
            groups: ids("Groups:"),
        })
    }
}

fn check(rc: libc::c_long, what: &str) -> io::Result<()> {
    if rc < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(())
}

fn open_path(path: &str, flags: i32) -> io::Result<OwnedFd> {
    let c = CString::new(path).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: a NUL-terminated path; the descriptor is owned below.
    let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Makes the calling thread the caller `pid` as far as paths and credentials go. Only for a
/// thread of its own that ends afterwards: nothing here is undone. Returns a descriptor of the
/// daemon's own /proc/PID/fd directory, opened before the thread left the daemon's namespaces,
/// through which a descriptor can be named by a path.
pub fn become_caller(pid: u32, creds: &Creds) -> io::Result<OwnedFd> {
    let own_fds = open_path("/proc/self/fd", libc::O_PATH | libc::O_DIRECTORY)?;
    let mnt = open_path(&format!("/proc/{pid}/ns/mnt"), libc::O_RDONLY)?;
    let net = open_path(&format!("/proc/{pid}/ns/net"), libc::O_RDONLY)?;
    let root = open_path(
        &format!("/proc/{pid}/root"),
        libc::O_PATH | libc::O_DIRECTORY,
    )?;
    let cwd = open_path(
        &format!("/proc/{pid}/cwd"),
        libc::O_PATH | libc::O_DIRECTORY,
    )?;
    // SAFETY: these calls change only this thread (its fs struct is unshared first) and take
    // descriptors owned above.
    unsafe {
        check(libc::unshare(libc::CLONE_FS) as _, "unshare(CLONE_FS)")?;
        check(
            libc::setns(mnt.as_raw_fd(), libc::CLONE_NEWNS) as _,
            "entering the caller's mount namespace",
        )?;
        check(
            libc::setns(net.as_raw_fd(), libc::CLONE_NEWNET) as _,
            "entering the caller's network namespace",
        )?;
        check(libc::fchdir(root.as_raw_fd()) as _, "fchdir(root)")?;
        check(libc::chroot(c".".as_ptr()) as _, "chroot")?;
        check(libc::fchdir(cwd.as_raw_fd()) as _, "fchdir(cwd)")?;
        check(
            libc::syscall(
                libc::SYS_setgroups,
                creds.groups.len(),
                creds.groups.as_ptr(),
            ),
            "setgroups",
        )?;
        check(
            libc::syscall(libc::SYS_setresgid, creds.gid, creds.egid, creds.egid),
            "setresgid",
        )?;
        check(
            libc::syscall(libc::SYS_setresuid, creds.uid, creds.euid, creds.euid),
            "setresuid",
        )?;
    }
    if creds.euid == 0 {
        // A root caller runs without capabilities (drop-capabilities): so does this thread, or
        // it could open what the caller cannot.
        drop_capabilities()?;
    }
    Ok(own_fds)
}

/// Runs `f` on a new thread that has become the caller, and waits for it.
pub fn as_caller<T: Send + 'static>(
    pid: u32,
    creds: &Creds,
    f: impl FnOnce(&OwnedFd) -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    let creds = creds.clone();
    std::thread::Builder::new()
        .name("egressd-as-caller".into())
        .spawn(move || become_caller(pid, &creds).and_then(|fds| f(&fds)))?
        .join()
        .map_err(|_| io::Error::other("the caller thread panicked"))?
}

/// Empties this thread's capability sets (capset(2) changes the calling thread only).
fn drop_capabilities() -> io::Result<()> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    let header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let data = [Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: capset with a version 3 header and its two data words.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) };
    check(rc, "dropping capabilities")
}
