//! Session cgroups on the cgroup v2 hierarchy.
//!
//! Two backends place sessions. `Direct` (no systemd as init): every session is a root-owned child
//! `s-<id>` of `<cgroup2 mount>/<name>` (default name `egressd`), created by egressd itself.
//! `Systemd`: every session is a transient scope `egressd-<id>.scope` in `egressd.slice`, created
//! by systemd at egressd's request (see `systemd.rs`), so that nothing in systemd's tree is made
//! behind its back. Either way the programs are attached once, to the parent.

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

/// The cgroup2 mount, or an error that says how to get one.
pub fn cgroup2_mount() -> Result<PathBuf, CgroupError> {
    egressd_common::host::cgroup2_mount().ok_or(CgroupError::NoCgroup2)
}

/// What exists when systemd runs as init (sd_booted(3) checks the same path).
pub const SYSTEMD_MARKER: &str = "/run/systemd/system";

/// `--cgroup-backend`: who creates session cgroups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendChoice {
    /// `systemd` when systemd is init, `direct` otherwise.
    Auto,
    /// egressd creates session cgroups itself under `<cgroup2 mount>/<--cgroup>`.
    Direct,
    /// Sessions are transient scopes in egressd.slice, created through systemd's D-Bus API.
    Systemd,
}

impl BackendChoice {
    /// The backend to use; `marker` is [`SYSTEMD_MARKER`] outside tests.
    pub fn resolve(self, marker: &Path) -> Backend {
        match self {
            BackendChoice::Direct => Backend::Direct,
            BackendChoice::Systemd => Backend::Systemd,
            BackendChoice::Auto if marker.exists() => Backend::Systemd,
            BackendChoice::Auto => Backend::Direct,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Direct,
    Systemd,
}

impl Backend {
    /// A session's cgroup (and, under systemd, unit) name is `<prefix><id><suffix>`.
    fn affixes(self) -> (&'static str, &'static str) {
        match self {
            Backend::Direct => ("s-", ""),
            Backend::Systemd => ("egressd-", ".scope"),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Backend::Direct => "direct",
            Backend::Systemd => "systemd",
        }
    }
}

/// Where sessions live.
#[derive(Debug, Clone)]
pub struct Layout {
    pub mount: PathBuf,
    /// Absolute path of the parent cgroup that holds every session and carries the programs.
    pub parent: PathBuf,
    pub backend: Backend,
}

impl Layout {
    /// The `Direct` layout: sessions under `<mount>/<parent_name>`.
    pub fn new(parent_name: &str) -> Result<Layout, CgroupError> {
        Ok(Layout::at(
            cgroup2_mount()?,
            Backend::Direct,
            Path::new(parent_name.trim_start_matches('/')),
        ))
    }

    /// The `Systemd` layout: sessions in the slice `slice` (e.g. `egressd.slice`).
    pub fn systemd(slice: &str) -> Result<Layout, CgroupError> {
        Ok(Layout::at(
            cgroup2_mount()?,
            Backend::Systemd,
            &slice_path(slice),
        ))
    }

    /// The layout with the parent at `relative` (to the cgroup2 mount). Session cgroups sit one
    /// level below the parent; the programs find that level themselves (the parent's depth seen
    /// from here is not the kernel's when egressd runs in a cgroup namespace).
    pub fn at(mount: PathBuf, backend: Backend, relative: &Path) -> Layout {
        Layout {
            parent: mount.join(relative),
            mount,
            backend,
        }
    }

    pub fn ensure_parent(&self) -> Result<(), CgroupError> {
        fs::create_dir_all(&self.parent).map_err(io_err("creating cgroup", &self.parent))
    }

    /// The cgroup directory name of session `id`; under systemd also its scope's unit name.
    pub fn session_name(&self, id: &str) -> String {
        let (prefix, suffix) = self.backend.affixes();
        format!("{prefix}{id}{suffix}")
    }

    /// The session id a cgroup directory name stands for, if it is a session's.
    pub fn session_id<'a>(&self, name: &'a str) -> Option<&'a str> {
        let (prefix, suffix) = self.backend.affixes();
        let id = name.strip_prefix(prefix)?.strip_suffix(suffix)?;
        match self.backend {
            Backend::Direct => Some(id),
            // Only our own ids (hex) in unit names: anything else in the slice is not a session.
            Backend::Systemd => {
                (!id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric())).then_some(id)
            }
        }
    }

    /// Whether egressd removes a session's cgroup once it has emptied. Under systemd the scope
    /// stops when it empties and systemd removes its cgroup: removing it ourselves would be
    /// changing systemd's tree behind its back.
    pub fn removes_session_cgroups(&self) -> bool {
        self.backend == Backend::Direct
    }

    pub fn session_dir(&self, id: &str) -> PathBuf {
        self.parent.join(self.session_name(id))
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
            .filter_map(|e| self.session_id(e.file_name().to_str()?).map(String::from))
            .collect()
    }
}

/// Where systemd puts a slice's cgroup, relative to the cgroup2 mount: a dash in a slice name is
/// nesting (`a-b.slice` is `a.slice/a-b.slice`), and `-.slice` is the root.
pub fn slice_path(slice: &str) -> PathBuf {
    let stem = slice.strip_suffix(".slice").unwrap_or(slice);
    let mut path = PathBuf::new();
    if stem == "-" || stem.is_empty() {
        return path;
    }
    let mut prefix = String::new();
    for part in stem.split('-') {
        if !prefix.is_empty() {
            prefix.push('-');
        }
        prefix.push_str(part);
        path.push(format!("{prefix}.slice"));
    }
    path
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
    fn backend_follows_the_systemd_marker_unless_forced() {
        let dir = std::env::temp_dir().join(format!("egressd-marker-{}", std::process::id()));
        let _ = fs::remove_dir(&dir);
        assert_eq!(BackendChoice::Auto.resolve(&dir), Backend::Direct);
        assert_eq!(BackendChoice::Systemd.resolve(&dir), Backend::Systemd);
        fs::create_dir(&dir).unwrap();
        assert_eq!(BackendChoice::Auto.resolve(&dir), Backend::Systemd);
        assert_eq!(BackendChoice::Direct.resolve(&dir), Backend::Direct);
        fs::remove_dir(&dir).unwrap();
    }

    fn systemd_layout(mount: &str) -> Layout {
        Layout::at(mount.into(), Backend::Systemd, &slice_path("egressd.slice"))
    }

    #[test]
    fn direct_layout_is_unchanged() {
        let l = Layout::at(
            "/sys/fs/cgroup".into(),
            Backend::Direct,
            Path::new("egressd"),
        );
        assert_eq!(l.parent, Path::new("/sys/fs/cgroup/egressd"));
        assert_eq!(
            l.session_dir("0a1b2c3d"),
            Path::new("/sys/fs/cgroup/egressd/s-0a1b2c3d")
        );
        assert_eq!(l.session_id("s-0a1b2c3d"), Some("0a1b2c3d"));
        assert_eq!(l.session_id("egressd-0a1b2c3d.scope"), None);
        assert!(l.removes_session_cgroups());
    }

    #[test]
    fn scopes_are_named_and_parsed_back() {
        let l = systemd_layout("/sys/fs/cgroup");
        assert_eq!(l.session_name("0a1b2c3d"), "egressd-0a1b2c3d.scope");
        assert_eq!(
            l.session_dir("0a1b2c3d"),
            Path::new("/sys/fs/cgroup/egressd.slice/egressd-0a1b2c3d.scope")
        );
        assert_eq!(l.session_id("egressd-0a1b2c3d.scope"), Some("0a1b2c3d"));
        for other in [
            "s-0a1b2c3d",
            "egressd-.scope",
            "egressd-0a1b2c3d.service",
            "egressd-0a-1b.scope",
            "other-0a1b2c3d.scope",
        ] {
            assert_eq!(l.session_id(other), None, "{other}");
        }
        assert!(!l.removes_session_cgroups());
    }

    #[test]
    fn slices_nest_by_their_dashes() {
        let l = systemd_layout("/sys/fs/cgroup/unified");
        assert_eq!(l.parent, Path::new("/sys/fs/cgroup/unified/egressd.slice"));
        assert_eq!(
            slice_path("a-b-c.slice"),
            Path::new("a.slice/a-b.slice/a-b-c.slice")
        );
        assert_eq!(slice_path("-.slice"), Path::new(""));
    }
}
