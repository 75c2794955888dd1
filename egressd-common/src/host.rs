//! Facts about the running system that the daemon, the CLI and the tests all read the same way.

use std::{ffi::OsString, fs, os::unix::ffi::OsStringExt as _, path::PathBuf, vec::Vec};

/// The first cgroup2 mount in /proc/self/mounts (`/sys/fs/cgroup` on most machines,
/// `/sys/fs/cgroup/unified` on hybrid layouts).
pub fn cgroup2_mount() -> Option<PathBuf> {
    mounts_of(&["cgroup2"]).into_iter().next()
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
