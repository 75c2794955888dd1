//! Session cgroups on the cgroup v2 hierarchy.
//!
//! Without systemd as init, every session is a root-owned child of `<cgroup2 mount>/<name>` (default
//! name `egressd`), and the programs are attached to that parent once.

use std::{
    fs,
    io::{self, Write as _},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup v2 hierarchy is mounted (looked in /proc/self/mounts); egressd needs cgroup2: mount it with `mount -t cgroup2 none /sys/fs/cgroup` or boot with systemd.unified_cgroup_hierarchy=1")]
    NoCgroup2,
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

/// The first cgroup2 mount in /proc/self/mounts (`/sys/fs/cgroup` on most machines,
/// `/sys/fs/cgroup/unified` on hybrid layouts).
pub fn cgroup2_mount() -> Result<PathBuf, CgroupError> {
    let mounts = fs::read_to_string("/proc/self/mounts")
        .map_err(io_err("reading", Path::new("/proc/self/mounts")))?;
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_dev, dir, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(unescape_mount_path(dir)))
        })
        .next()
        .ok_or(CgroupError::NoCgroup2)
}

/// /proc/mounts escapes space, tab, newline and backslash as octal.
fn unescape_mount_path(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v as char);
            i += 4;
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

/// Where sessions live.
#[derive(Debug, Clone)]
pub struct Layout {
    pub mount: PathBuf,
    /// Absolute path of the parent cgroup that holds every session and carries the programs.
    pub parent: PathBuf,
    /// The cgroup v2 level of session cgroups (root is 0).
    pub session_level: u32,
}

impl Layout {
    pub fn new(parent_name: &str) -> Result<Layout, CgroupError> {
        let mount = cgroup2_mount()?;
        let parent = mount.join(parent_name.trim_start_matches('/'));
        let depth = Path::new(parent_name.trim_start_matches('/'))
            .components()
            .count() as u32;
        Ok(Layout {
            mount,
            parent,
            session_level: depth + 1,
        })
    }

    pub fn ensure_parent(&self) -> Result<(), CgroupError> {
        fs::create_dir_all(&self.parent).map_err(io_err("creating cgroup", &self.parent))
    }

    pub fn session_dir(&self, id: &str) -> PathBuf {
        self.parent.join(format!("s-{id}"))
    }

    /// The path as /proc/PID/cgroup shows it: relative to the mount, with a leading slash.
    pub fn relative(&self, path: &Path) -> String {
        format!(
            "/{}",
            path.strip_prefix(&self.mount).unwrap_or(path).display()
        )
    }

    /// Session ids of every session cgroup present, ours or a previous daemon's.
    pub fn existing_sessions(&self) -> Vec<String> {
        let Ok(dir) = fs::read_dir(&self.parent) else {
            return Vec::new();
        };
        dir.filter_map(|e| e.ok())
            .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
            .filter_map(|e| e.file_name().to_str()?.strip_prefix("s-").map(String::from))
            .collect()
    }
}

/// Creates a session cgroup (owned by root, so its members cannot write its `cgroup.procs` or any
/// other) and returns its cgroup id.
pub fn create(dir: &Path) -> Result<u64, CgroupError> {
    fs::create_dir(dir).map_err(io_err("creating cgroup", dir))?;
    id_of(dir)
}

/// The cgroup id is the inode number of its directory on cgroup2 (kernfs node id).
pub fn id_of(dir: &Path) -> Result<u64, CgroupError> {
    Ok(fs::metadata(dir).map_err(io_err("reading", dir))?.ino())
}

pub fn move_process(dir: &Path, pid: u32) -> Result<(), CgroupError> {
    let procs = dir.join("cgroup.procs");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .open(&procs)
        .map_err(io_err("opening", &procs))?;
    f.write_all(pid.to_string().as_bytes())
        .map_err(io_err("moving a process into", &procs))
}

pub fn pids(dir: &Path) -> Vec<u32> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// Whether any process is left in the cgroup or below it (`cgroup.events`).
pub fn populated(dir: &Path) -> bool {
    match fs::read_to_string(dir.join("cgroup.events")) {
        Ok(s) => s.lines().any(|l| l.trim() == "populated 1"),
        Err(_) => false,
    }
}

/// Removes an empty session cgroup, and any (empty) child cgroups below it first.
pub fn remove(dir: &Path) -> Result<(), CgroupError> {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.filter_map(|e| e.ok()) {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove(&e.path())?;
            }
        }
    }
    match fs::remove_dir(dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err("removing cgroup", dir)(e)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescapes_mount_paths() {
        assert_eq!(unescape_mount_path("/a\\040b"), "/a b");
        assert_eq!(unescape_mount_path("/sys/fs/cgroup"), "/sys/fs/cgroup");
    }
}
