//! The Landlock layer: egressctl confines CMD to a Landlock domain of its own before exec. The
//! domain scopes what crosses its border: no ptrace, process_vm_*, pidfd_getfd or /proc/PID/mem of
//! a process outside (Landlock's ptrace rule), no signals to processes outside, and no connect to
//! abstract unix sockets made outside (the session D-Bus on many systems, the X server's abstract
//! socket). Inside the domain all of these still work, so a debugger in the sandbox does.
//!
//! For a root session without capabilities the domain also restricts writes: root owns every
//! cgroup.procs and every pin, so file permissions alone would let it move itself out of the
//! session or unpin the programs. Landlock only grants, so "everything but these" is built as
//! grants on every sibling along the way down to each protected path.

use std::{
    fs,
    path::{Path, PathBuf},
};

use landlock::{
    path_beneath_rules, AccessFs, CompatLevel, Compatible as _, Ruleset, RulesetAttr as _,
    RulesetCreatedAttr as _, RulesetStatus, Scope, ABI,
};

/// `protect`: directories no file may be written, made, removed or renamed under (besides
/// /sys and the cgroup and bpffs mounts, which are always added); None: no file rules at all.
pub fn restrict_self(protect: Option<&[String]>) -> Result<(), String> {
    let scoped = Ruleset::default()
        .set_compatibility(CompatLevel::HardRequirement)
        .scope(Scope::AbstractUnixSocket | Scope::Signal);
    let status = match protect {
        None => scoped
            .and_then(|r| r.create())
            .and_then(|r| r.restrict_self()),
        Some(extra) => {
            let write = AccessFs::from_write(ABI::V3);
            let grants = grants_outside(&protected_dirs(extra));
            scoped
                .and_then(|r| r.handle_access(write))
                .and_then(|r| r.create())
                .and_then(|r| r.add_rules(path_beneath_rules(&grants, write)))
                .and_then(|r| r.restrict_self())
        }
    }
    .map_err(|e| format!("Landlock: {e}"))?;
    match status.ruleset {
        RulesetStatus::FullyEnforced => Ok(()),
        other => Err(format!("Landlock enforced only {other:?}")),
    }
}

/// /sys (every cgroup.procs of a v1 or v2 hierarchy, bpffs), the cgroup and bpffs mounts wherever
/// they are, and `extra`; as real paths, so a symlink cannot lead around them.
fn protected_dirs(extra: &[String]) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = vec![PathBuf::from("/sys")];
    dirs.extend(egressd_common::host::mounts_of(&[
        "cgroup", "cgroup2", "bpf",
    ]));
    dirs.extend(extra.iter().map(PathBuf::from));
    let mut dirs: Vec<PathBuf> = dirs
        .into_iter()
        .map(|d| fs::canonicalize(&d).unwrap_or(d))
        .collect();
    dirs.sort();
    dirs.dedup();
    dirs
}

/// The paths whose hierarchies together hold everything except `protected`: walking down from /
/// through the directories that contain a protected path, every other entry met.
fn grants_outside(protected: &[PathBuf]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    walk(Path::new("/"), protected, &mut out);
    out
}

fn walk(dir: &Path, protected: &[PathBuf], out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        // A rule follows a symlink to its target: judge the target (/lib -> usr/lib).
        let Ok(real) = fs::canonicalize(&path) else {
            continue;
        };
        if protected.iter().any(|p| real.starts_with(p)) {
            continue;
        }
        if protected.iter().any(|p| p.starts_with(&real)) {
            // A symlink to a directory on the way down is walked where it really is.
            if real == path {
                walk(&path, protected, out);
            }
            continue;
        }
        out.push(path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_cover_everything_but_the_protected_directories() {
        let root = std::env::temp_dir().join(format!("egressctl-ll-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        for d in ["a/keep", "a/prot/inner", "b", "c/deep/prot2"] {
            fs::create_dir_all(root.join(d)).unwrap();
        }
        fs::write(root.join("a/file"), b"x").unwrap();
        std::os::unix::fs::symlink(root.join("a/prot"), root.join("b/link-to-prot")).unwrap();
        std::os::unix::fs::symlink(root.join("a"), root.join("b/link-to-a")).unwrap();
        let root = fs::canonicalize(&root).unwrap();
        let protected = vec![root.join("a/prot"), root.join("c/deep/prot2")];
        let mut got = Vec::new();
        walk(&root, &protected, &mut got);
        got.sort();
        let want: Vec<PathBuf> = ["a/file", "a/keep", "b"]
            .iter()
            .map(|p| root.join(p))
            .collect();
        fs::remove_dir_all(&root).unwrap();
        // "b" holds a link to a protected directory; the walk does not descend into links, so b
        // is granted as a whole, and the rule for b does not reach through its links (Landlock
        // judges the real path).
        assert_eq!(got, want);
    }
}
