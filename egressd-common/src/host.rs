//! Facts about the running system that the daemon, the CLI and the tests all read the same way.

use std::{
    ffi::OsString, fs, os::unix::ffi::OsStringExt as _, path::PathBuf, string::String, vec::Vec,
};

/// The first cgroup2 mount in /proc/self/mounts (`/sys/fs/cgroup` on most machines,
/// `/sys/fs/cgroup/unified` on hybrid layouts).
pub fn cgroup2_mount() -> Option<PathBuf> {
    mounts_of(&["cgroup2"]).into_iter().next()
}

/// The cgroup2 mount's own options (`nsdelegate`, `memory_recursiveprot`, `favordynmods`, ...), as
/// /proc/self/mountinfo lists them after the source.
pub fn cgroup2_options(mount: &std::path::Path) -> Option<Vec<String>> {
    let table = fs::read_to_string("/proc/self/mountinfo").ok()?;
    table.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        let dir = pre.split_whitespace().nth(4)?;
        let mut post = post.split_whitespace();
        if post.next()? != "cgroup2" || unescape_mount_path(dir) != mount {
            return None;
        }
        let opts = post.nth(1)?;
        Some(
            opts.split(',')
                .filter(|o| *o != "rw" && *o != "ro")
                .map(String::from)
                .collect(),
        )
    })
}

/// Whether cgroup2 favours moving tasks over forking them (`favordynmods`, Linux 6.0+): without
/// it, each write to `cgroup.procs` waits for an RCU grace period (about 10-20 ms), which is most
/// of what starting a session costs.
pub fn favordynmods(mount: &std::path::Path) -> Option<bool> {
    cgroup2_options(mount).map(|o| o.iter().any(|o| o == "favordynmods"))
}

/// Turns `favordynmods` on or off on the cgroup2 mount, keeping its other options (mount(8)'s
/// remount merges the old options back in, so it can add the option but not take it away).
pub fn set_favordynmods(mount: &std::path::Path, on: bool) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt as _;
    let mut opts: Vec<String> = cgroup2_options(mount)
        .ok_or_else(|| std::io::Error::other("not a cgroup2 mount"))?
        .into_iter()
        .filter(|o| o != "favordynmods")
        .collect();
    if on {
        opts.push("favordynmods".into());
    }
    let target =
        std::ffi::CString::new(mount.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    let data = std::ffi::CString::new(opts.join(",")).map_err(std::io::Error::other)?;
    // SAFETY: NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            c"none".as_ptr(),
            target.as_ptr(),
            c"cgroup2".as_ptr(),
            libc::MS_REMOUNT,
            data.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Where file systems of these types are mounted, in /proc/self/mounts order.
pub fn mounts_of(fstypes: &[&str]) -> Vec<PathBuf> {
    let Ok(table) = fs::read_to_string("/proc/self/mounts") else {
        return Vec::new();
    };
    table
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_dev, dir, fstype) = (f.next()?, f.next()?, f.next()?);
            fstypes.contains(&fstype).then(|| unescape_mount_path(dir))
        })
        .collect()
}

/// /proc/mounts writes space, tab, newline and backslash as a backslash and three octal digits.
fn unescape_mount_path(s: &str) -> PathBuf {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], octal) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    PathBuf::from(OsString::from_vec(out))
}

/// The credentials a connected unix socket names for its peer (`SO_PEERCRED`), when it names a
/// process.
pub fn peer_cred(sock: &impl std::os::fd::AsRawFd) -> Option<libc::ucred> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = core::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED into a ucred of the length passed.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (rc == 0 && cred.pid > 0).then_some(cred)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescapes_mount_paths() {
        assert_eq!(unescape_mount_path("/a\\040b"), PathBuf::from("/a b"));
        assert_eq!(
            unescape_mount_path("/sys/fs/cgroup"),
            PathBuf::from("/sys/fs/cgroup")
        );
        assert_eq!(unescape_mount_path("/end\\040"), PathBuf::from("/end "));
        assert_eq!(unescape_mount_path("/x\\04"), PathBuf::from("/x\\04"));
        assert_eq!(
            unescape_mount_path("/caf\u{e9}"),
            PathBuf::from("/caf\u{e9}")
        );
    }
}
