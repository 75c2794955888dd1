//! Live sessions: creation for a caller, adoption after a restart, and removal once their cgroup
//! has emptied.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use egressd_common::protocol::SessionView;
use serde::{Deserialize, Serialize};

use crate::cgroup;

/// What the daemon remembers of a session. Also written to `<state dir>/<id>.json` so that a
/// restarted daemon can adopt the session.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Session {
    pub id: String,
    pub profile: String,
    pub profile_index: u32,
    pub uid: u32,
    pub dir: PathBuf,
    pub cgroup: String,
    pub cgroup_id: u64,
    pub started: u64,
    pub argv: Vec<String>,
    /// Where the session's seccomp listener lives besides this daemon: egressctl's pid and its
    /// descriptor number. A restarted daemon takes it from there and supervises again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listener: Option<(u32, i32)>,
}

impl Session {
    pub fn view(&self, counters: egressd_common::Counters) -> SessionView {
        SessionView {
            id: self.id.clone(),
            profile: self.profile.clone(),
            uid: self.uid,
            pids: cgroup::pids(&self.dir),
            started: self.started,
            argv: self.argv.clone(),
            counters,
            audit_lost: 0,
            dns_allowed: 0,
            dns_denied: 0,
            dns_names_denied: 0,
        }
    }
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A short random session id (8 hex digits), unguessable enough that ids are not enumerable.
pub fn new_id() -> String {
    let mut b = [0u8; 4];
    let read =
        fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b));
    if let Err(e) = read {
        tracing::warn!("getrandom failed ({e}); falling back to time-based id");
        b = (SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0)
            ^ std::process::id())
        .to_le_bytes();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Session records on disk, so a restarted daemon knows each session's owner and profile.
pub struct StateDir(pub PathBuf);

impl StateDir {
    fn path(&self, id: &str) -> PathBuf {
        self.0.join(format!("{id}.json"))
    }

    pub fn save(&self, s: &Session) -> std::io::Result<()> {
        fs::create_dir_all(&self.0)?;
        let tmp = self.0.join(format!(".{}.tmp", s.id));
        fs::write(&tmp, serde_json::to_vec(s).map_err(std::io::Error::other)?)?;
        fs::rename(tmp, self.path(&s.id))
    }

    pub fn load(&self, id: &str) -> Option<Session> {
        let bytes = fs::read(self.path(id)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Ids of every session record on disk.
    pub fn ids(&self) -> Vec<String> {
        let Ok(dir) = fs::read_dir(&self.0) else {
            return Vec::new();
        };
        dir.filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                // `.<id>.tmp` files are half-written records.
                (!name.starts_with('.'))
                    .then(|| name.strip_suffix(".json").map(String::from))
                    .flatten()
            })
            .collect()
    }

    pub fn forget(&self, id: &str) {
        let _ = fs::remove_file(self.path(id));
    }

    /// Saves `s` on the record writer's thread, after every save and forget asked before it, so
    /// the Run reply does not wait for the file system (a create and a rename cost 0.1 ms or more
    /// on a disk-backed /run). Whoever lets the session's command run first waits for it
    /// (`records_written`): a daemon killed before that loses a session nothing has run in yet.
    /// `what` names what a restarted daemon could not do without the record.
    pub fn save_soon(&self, s: &Session, what: &'static str) {
        record_writer().send(Job::Save(self.0.clone(), Box::new(s.clone()), what));
    }

    /// `forget` on the record writer's thread, in order with the saves.
    pub fn forget_soon(&self, id: &str) {
        record_writer().send(Job::Forget(self.0.clone(), id.to_string()));
    }
}

enum Job {
    Save(PathBuf, Box<Session>, &'static str),
    Forget(PathBuf, String),
    Written(tokio::sync::oneshot::Sender<()>),
}

/// Record writes (saves and forgets) asked for, and done, so far.
static ASKED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static DONE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Returns once every record write asked so far is done (or failed, which is logged): before a
/// session's command may run, and before the daemon stops, so a restart finds the session. At
/// once when the writer has caught up already (the usual case at a hand-over).
pub async fn records_written() {
    use std::sync::atomic::Ordering;
    if DONE.load(Ordering::Acquire) >= ASKED.load(Ordering::Acquire) {
        return;
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    record_writer().send(Job::Written(tx));
    let _ = rx.await;
}

struct RecordWriter(std::sync::mpsc::Sender<Job>);

impl RecordWriter {
    fn send(&self, job: Job) {
        if !matches!(job, Job::Written(_)) {
            ASKED.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        }
        // Without the thread (it could not be started), do it here.
        if let Err(std::sync::mpsc::SendError(job)) = self.0.send(job) {
            run_job(job);
        }
    }
}

fn run_job(job: Job) {
    match job {
        Job::Save(dir, s, what) => {
            if let Err(e) = StateDir(dir).save(&s) {
                tracing::warn!(session = %s.id, "saving session state: {e} ({what})");
            }
        }
        Job::Forget(dir, id) => StateDir(dir).forget(&id),
        Job::Written(done) => {
            let _ = done.send(());
            return;
        }
    }
    DONE.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
}

/// One thread for every record write, so they happen in the order asked.
fn record_writer() -> &'static RecordWriter {
    static WRITER: std::sync::OnceLock<RecordWriter> = std::sync::OnceLock::new();
    WRITER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let spawned = std::thread::Builder::new()
            .name("egressd-records".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    run_job(job);
                }
            });
        if let Err(e) = spawned {
            tracing::warn!("session records are written inline: no thread for them ({e})");
        }
        RecordWriter(tx)
    })
}

#[derive(Default)]
pub struct Registry {
    sessions: BTreeMap<String, Session>,
}

impl Registry {
    pub fn insert(&mut self, s: Session) {
        self.sessions.insert(s.id.clone(), s);
    }
    pub fn get(&self, id: &str) -> Option<&Session> {
        self.sessions.get(id)
    }
    pub fn remove(&mut self, id: &str) -> Option<Session> {
        self.sessions.remove(id)
    }
    pub fn len(&self) -> usize {
        self.sessions.len()
    }
    pub fn all(&self) -> impl Iterator<Item = &Session> {
        self.sessions.values()
    }
    /// Sessions whose cgroup has emptied.
    pub fn empty(&self) -> Vec<String> {
        self.sessions
            .values()
            .filter(|s| !cgroup::populated(&s.dir))
            .map(|s| s.id.clone())
            .collect()
    }
}

/// The cgroup v2 path of a process, as /proc/PID/cgroup shows it (`0::/path`).
pub fn cgroup_of(pid: u32) -> Option<String> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim().to_string())
}

/// Whether a cgroup path lies inside the parent of all sessions.
pub fn is_under(cgroup_path: &str, parent_rel: &str) -> bool {
    cgroup_path == parent_rel || cgroup_path.starts_with(&format!("{parent_rel}/"))
}

pub fn state_dir_for(socket: &Path) -> PathBuf {
    socket
        .parent()
        .unwrap_or(Path::new("/run/egressd"))
        .join("sessions")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nesting_is_detected_by_path_prefix() {
        assert!(is_under("/egressd/s-1", "/egressd"));
        assert!(is_under("/egressd", "/egressd"));
        assert!(!is_under("/egressd-other/s-1", "/egressd"));
        assert!(!is_under("/user.slice", "/egressd"));
    }

    #[test]
    fn state_dir_lists_whole_records_only() {
        let dir = std::env::temp_dir().join(format!("egressd-state-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let state = StateDir(dir.clone());
        assert!(state.ids().is_empty(), "a missing directory has no records");
        fs::create_dir_all(&dir).unwrap();
        for name in ["0a1b2c3d.json", ".11111111.tmp", "notes.txt"] {
            fs::write(dir.join(name), b"{}").unwrap();
        }
        assert_eq!(state.ids(), ["0a1b2c3d"]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn ids_are_hex_and_differ() {
        let (a, b) = (new_id(), new_id());
        assert_eq!(a.len(), 8);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
