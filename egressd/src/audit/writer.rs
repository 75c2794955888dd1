//! Appends records to the log with the hash chain, whole lines only, rotating by size.
//!
//! Records wait in memory until the next flush, where they are numbered, chained and written in
//! one go. The chain head moves only past lines that reached the file whole: a short or failed
//! write is cut back to the last complete line, and what did not fit is counted per session and
//! written later as one `lost` record, in the place where the loss began. Records a reader cannot
//! do without (session start and end, `lost`, daemon notes) are never counted as lost: they wait
//! and are written once the file takes them.
//!
//! The file is opened by path at every flush, so a log removed, renamed or truncated under the
//! daemon is noticed at once; the chain continues in the new file after a `log_continued` record.
//! A torn last line (a crash mid-write) found at start is left as it is, and a `crash` record
//! after it names its offset, length and hash, which `egressctl audit verify` checks.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    fs,
    io::{self, Write as _},
    os::unix::fs::{FileExt as _, MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use egressd_common::{
    audit::{line_hash, ChainHead, Record},
    protocol::SealingView,
    seal::{self, Sealer},
};

pub use egressd_common::audit::STOP_MESSAGE;

/// Records kept in memory while the log cannot be written, beyond which even session records are
/// counted as lost rather than exhaust memory.
const MAX_WAITING: usize = 100_000;

/// Why a write failed, as a person would say it (and as `lost` records and status name it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    DiskFull,
    ReadOnly,
    Io,
    Missing,
    Permission,
    Other,
}

impl Reason {
    pub fn of(e: &io::Error) -> Reason {
        match e.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => Reason::DiskFull,
            Some(libc::EROFS) => Reason::ReadOnly,
            Some(libc::EIO) => Reason::Io,
            Some(libc::ENOENT) | Some(libc::ENOTDIR) => Reason::Missing,
            Some(libc::EACCES) | Some(libc::EPERM) => Reason::Permission,
            _ => Reason::Other,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Reason::DiskFull => "disk full",
            Reason::ReadOnly => "read-only file system",
            Reason::Io => "I/O error",
            Reason::Missing => "log directory missing",
            Reason::Permission => "permission denied",
            Reason::Other => "write error",
        }
    }
}

/// How a record is accounted for.
#[derive(Clone, Copy, Default)]
pub struct Meta {
    /// A decision taken from the kernel's ring (what reconciles with the kernel's counters).
    pub kernel: bool,
    /// `session_end`: its `lost` is this plus what the log lost of the session, filled in when
    /// the record is written.
    pub base_lost: Option<u64>,
}

enum Entry {
    Record(Box<Record>, Meta),
    /// Where a session's `lost` record goes (None: records of no session).
    Lost(Option<String>),
}

/// What the log could not take of one session, while it could not.
#[derive(Clone)]
struct LostSpan {
    count: u64,
    decisions: u64,
    since: String,
    until: String,
    reasons: Vec<Reason>,
}

/// The file as this writer left it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct FileId {
    dev: u64,
    ino: u64,
    size: u64,
}

enum Expect {
    /// The file we wrote last, as we left it.
    Same(FileId),
    /// A new file: after our rotation, or at first start.
    Fresh,
}

/// The file opened for a flush, its size, and what a `log_continued` record must say (and the
/// size the file we left had) when it is not the file we left.
type Reopened = (fs::File, u64, Option<(String, u64)>);

/// When a flush makes its lines durable.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Sync {
    /// Not now (a later flush does).
    No,
    /// fdatasync on the writer's own thread, which keeps draining meanwhile: a slow disk delays
    /// durability, never the next events. An error is reported by the next flush.
    Background,
    /// fdatasync before returning (shutdown).
    Now,
}

/// The thread that runs background fdatasyncs, one file at a time.
struct Syncer {
    tx: std::sync::mpsc::Sender<fs::File>,
    failed: std::sync::Arc<std::sync::Mutex<Option<io::Error>>>,
}

impl Syncer {
    fn spawn() -> Option<Syncer> {
        let (tx, rx) = std::sync::mpsc::channel::<fs::File>();
        let failed: std::sync::Arc<std::sync::Mutex<Option<io::Error>>> = Default::default();
        let report = failed.clone();
        std::thread::Builder::new()
            .name("egressd-audit-sync".into())
            .spawn(move || {
                while let Ok(mut file) = rx.recv() {
                    // Syncs queued meanwhile are of the same file or an older one: one does.
                    while let Ok(newer) = rx.try_recv() {
                        file = newer;
                    }
                    if let Err(e) = file.sync_data() {
                        if let Ok(mut f) = report.lock() {
                            *f = Some(e);
                        }
                    }
                }
            })
            .ok()?;
        Some(Syncer { tx, failed })
    }
}

/// A line as written, for the syslog copy.
pub struct Written {
    pub kind: String,
    pub denied: bool,
    pub line: Vec<u8>,
}

#[derive(Default)]
pub struct Flushed {
    pub written: Vec<Written>,
    pub bytes: u64,
    /// The write failed: why, and the error. What did not fit is counted or waits.
    pub error: Option<(Reason, io::Error)>,
    /// Records newly counted as lost in this flush.
    pub lost: u64,
}

pub struct Writer {
    path: PathBuf,
    gid: Option<u32>,
    max_bytes: u64,
    keep: u32,
    head: ChainHead,
    expect: Expect,
    /// The last flush left bytes after the last whole line it could not cut (ftruncate failed).
    dirty: bool,
    /// Lines were written since the last fdatasync.
    unsynced: bool,
    syncer: Option<Syncer>,
    pending: VecDeque<Entry>,
    lost: HashMap<Option<String>, LostSpan>,
    /// Why the last flush failed: what records counted while the queue is full are lost to.
    last_reason: Option<Reason>,
    /// Records lost per session so far (for `session_end`), and in all.
    lost_by_session: HashMap<String, u64>,
    pub lost_total: u64,
    /// The sealing key of the current epoch, once `egressctl audit setup-keys` made keys.
    sealer: Option<Sealer>,
    /// When the next `interval` seal is due (Unix seconds).
    next_seal: u64,
    /// When to look for keys made while egressd runs (Unix seconds).
    next_key_look: u64,
    /// The last seal in the file: when, and the last record it covers (for status).
    last_sealed: Option<(String, u64)>,
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The last seal record of `text`, if any.
fn last_seal(text: &[u8]) -> Option<Record> {
    text.split(|b| *b == b'\n')
        .rev()
        .filter(|l| {
            let needle = b"\"type\":\"seal\"";
            l.windows(needle.len()).any(|w| w == needle)
        })
        .find_map(|l| {
            serde_json::from_slice::<Record>(l)
                .ok()
                .filter(|r| r.kind == "seal")
        })
}

fn rotated(path: &Path, n: u32) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(format!(".{n}"));
    PathBuf::from(p)
}

/// The log's files, oldest first (rotated ones, then the current one).
pub fn files(path: &Path, keep: u32) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = (1..=keep.max(1))
        .rev()
        .map(|n| rotated(path, n))
        .filter(|p| p.exists())
        .collect();
    files.push(path.to_owned());
    files
}

/// A torn end of the current file: where it starts, and its bytes.
struct TornTail {
    offset: u64,
    bytes: Vec<u8>,
}

/// The last complete record of `text` (its head and the record), and a torn tail after it.
fn scan_tail(text: &[u8]) -> (Option<(ChainHead, Record)>, Option<TornTail>) {
    let mut torn = None;
    let mut body = text;
    if !text.is_empty() && !text.ends_with(b"\n") {
        let start = text.iter().rposition(|b| *b == b'\n').map_or(0, |p| p + 1);
        torn = Some(TornTail {
            offset: start as u64,
            bytes: text[start..].to_vec(),
        });
        body = &text[..start];
    }
    let mut end = body.len();
    while end > 0 {
        let line_end = end - 1; // the newline
        let start = body[..line_end]
            .iter()
            .rposition(|b| *b == b'\n')
            .map_or(0, |p| p + 1);
        let line = &body[start..line_end];
        end = start;
        if line.is_empty() {
            continue;
        }
        match serde_json::from_slice::<Record>(line) {
            Ok(rec) => {
                let head = ChainHead {
                    seq: rec.seq,
                    hash: line_hash(line),
                };
                // A torn line from an unterminated tail that happens to parse is whole after all.
                return (Some((head, rec)), torn);
            }
            Err(_) if torn.is_none() => {
                // A complete line that is not a record, last in the file: what power loss can
                // leave (a block of zeros), treated like a torn line.
                torn = Some(TornTail {
                    offset: start as u64,
                    bytes: line.to_vec(),
                });
            }
            Err(_) => return (None, torn),
        }
    }
    (None, torn)
}

fn open_existing(path: &Path, gid: Option<u32>, create: bool) -> io::Result<fs::File> {
    // Read too: the last byte tells whether the file ends mid-line.
    let f = fs::OpenOptions::new()
        .create(create)
        .read(true)
        .append(true)
        .mode(0o640)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)?;
    if create {
        f.set_permissions(fs::Permissions::from_mode(0o640))?;
        if let Some(gid) = gid {
            std::os::unix::fs::fchown(&f, Some(0), Some(gid))?;
        }
    }
    Ok(f)
}

impl Writer {
    /// Finds where the log's chain ends (in the current file, or the newest rotated one), so a
    /// restarted daemon continues it, and what the previous daemon left unsaid: a torn last line,
    /// or no stop record. Reading never stops the daemon: a log that cannot be read or written is
    /// reported by the first flush, and enforcement goes on.
    pub fn open(path: &Path, max_bytes: u64, keep: u32, gid: Option<u32>) -> Writer {
        let mut w = Writer {
            path: path.to_owned(),
            gid,
            max_bytes,
            keep: keep.max(1),
            head: ChainHead::genesis(),
            expect: Expect::Fresh,
            dirty: false,
            unsynced: false,
            syncer: Syncer::spawn(),
            last_reason: None,
            pending: VecDeque::new(),
            lost: HashMap::new(),
            lost_by_session: HashMap::new(),
            lost_total: 0,
            sealer: None,
            next_seal: 0,
            last_sealed: None,
            next_key_look: 0,
        };
        let current = fs::read(path).ok();
        if let (Some(text), Ok(meta)) = (&current, fs::metadata(path)) {
            w.expect = Expect::Same(FileId {
                dev: meta.dev(),
                ino: meta.ino(),
                size: text.len() as u64,
            });
        }
        let (mut last, torn) = current.as_deref().map(scan_tail).unwrap_or((None, None));
        if last.is_none() {
            if let Ok(text) = fs::read(rotated(path, 1)) {
                last = scan_tail(&text).0;
            }
        }
        if let Some((head, _)) = &last {
            w.head = head.clone();
        }
        let unclean = last.as_ref().is_some_and(|(_, rec)| {
            rec.message.as_deref() != Some(STOP_MESSAGE)
                && !(rec.kind == "seal" && rec.reason.as_deref() == Some("stop"))
        });
        let last_seal = current.as_deref().and_then(last_seal).or_else(|| {
            fs::read(rotated(path, 1))
                .ok()
                .as_deref()
                .and_then(last_seal)
        });
        if let Some(t) = torn {
            tracing::warn!(
                "{}: the previous egressd ended mid-write: a torn line of {} bytes at byte {}; it is recorded and the chain continues after it",
                path.display(),
                t.bytes.len(),
                t.offset
            );
            w.queue(
                Record {
                    time: super::now_rfc3339(),
                    kind: "crash".into(),
                    offset: Some(t.offset),
                    bytes: Some(t.bytes.len() as u64),
                    torn: Some(line_hash(&t.bytes)),
                    message: Some(format!(
                        "the previous egressd ended without closing the log (a crash, kill -9 or power loss) while writing the line at byte {} ({} bytes, kept as it is); the chain continues from seq {}; decisions it had not written are counted as lost when their sessions end",
                        t.offset,
                        t.bytes.len(),
                        w.head.seq
                    )),
                    ..Default::default()
                },
                Meta::default(),
            );
        } else if unclean {
            w.queue(
                Record {
                    time: super::now_rfc3339(),
                    kind: "crash".into(),
                    message: Some(format!(
                        "the previous egressd ended without closing the log after seq {} (a crash, kill -9 or power loss); decisions it had not written are counted as lost when their sessions end",
                        w.head.seq
                    )),
                    ..Default::default()
                },
                Meta::default(),
            );
        }
        w.start_sealing(last_seal);
        w
    }

    /// Loads the sealing state, if there is one, says what the previous egressd left unsealed,
    /// and queues the `start` seal (with the state's key: it covers what a crash left unsealed).
    fn start_sealing(&mut self, last_seal: Option<Record>) {
        let state = seal::state_path(&self.path);
        let mut sealer = match Sealer::load(&state) {
            Ok(Some(s)) => s,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!("audit: {e}; the log is not sealed until `egressctl audit setup-keys --force` makes new keys");
                return;
            }
        };
        let now = now_secs();
        self.last_sealed = last_seal.as_ref().map(|l| {
            (
                l.time.clone(),
                l.sealed_seq.unwrap_or(l.seq.saturating_sub(1)),
            )
        });
        if let Some(last) = &last_seal {
            let same_key = last.key.as_deref() == Some(sealer.id.as_str());
            let last_epoch = last.epoch.unwrap_or(0);
            if same_key && sealer.epoch < last_epoch {
                tracing::warn!(
                    "audit: the sealing state {} (epoch {}) is behind the log's last seal (seq {}, epoch {last_epoch}): it was restored from an older copy; moving on to epoch {last_epoch}",
                    state.display(),
                    sealer.epoch,
                    last.seq
                );
                if let Err(e) = sealer.advance_to(last_epoch) {
                    tracing::warn!("audit: saving the sealing state: {e}");
                }
            }
            let unsealed = self.head.seq.saturating_sub(last.seq);
            let age =
                seal::rfc3339_secs(&last.time).map_or(0, |t| now.saturating_sub(t.max(0) as u64));
            if unsealed > 0 {
                let message = format!(
                    "{unsealed} records (seq {}..{}) after the last seal (seq {}, {}, {} s ago) were not sealed by the previous egressd (it ended without its stop seal); the start seal after this record covers them with the key of epoch {}",
                    last.seq + 1,
                    self.head.seq,
                    last.seq,
                    last.time,
                    age,
                    sealer.epoch
                );
                tracing::warn!("audit: {message}");
                self.queue(
                    Record {
                        time: super::now_rfc3339(),
                        kind: "daemon".into(),
                        message: Some(message),
                        ..Default::default()
                    },
                    Meta::default(),
                );
            } else if age > sealer.interval && last.reason.as_deref() != Some("stop") {
                tracing::warn!(
                    "audit: the log's last seal (seq {}, {}) is {age} s old and was not a stop seal",
                    last.seq,
                    last.time
                );
            }
        }
        tracing::info!(
            "audit: sealing the log every {} s (key {}, epoch {})",
            sealer.interval,
            sealer.id,
            sealer.epoch
        );
        self.next_seal = sealer.epoch_end().max(now + 1);
        self.sealer = Some(sealer);
        self.queue_seal("start");
    }

    /// Queues a seal (written at the next flush, of the chain head then) when keys exist.
    pub fn queue_seal(&mut self, reason: &str) {
        if self.sealer.is_some() {
            self.queue(
                Record {
                    time: super::now_rfc3339(),
                    kind: "seal".into(),
                    reason: Some(reason.into()),
                    ..Default::default()
                },
                Meta::default(),
            );
        }
    }

    /// Called every tick: queues the `interval` seal when its time has come; without keys, looks
    /// now and then for keys `egressctl audit setup-keys` made meanwhile.
    pub fn tick_seal(&mut self) {
        let now = now_secs();
        if self.sealer.is_none() {
            if now >= self.next_key_look {
                self.next_key_look = now + 2;
                if seal::state_path(&self.path).exists() {
                    self.start_sealing(None);
                }
            }
            return;
        }
        if now >= self.next_seal {
            // Keys made anew (`setup-keys --force`) replace ours from this seal on.
            if let (Some(s), Ok(Some(new))) =
                (&self.sealer, Sealer::load(&seal::state_path(&self.path)))
            {
                if new.id != s.id {
                    tracing::warn!("audit: new sealing keys ({}); sealing with them", new.id);
                    self.sealer = Some(new);
                }
            }
            self.queue_seal("interval");
            let iv = self.sealer.as_ref().map_or(1, |s| s.interval);
            self.next_seal = self.next_seal.max(now - (now - self.next_seal) % iv) + iv;
        }
    }

    /// After a seal reached the file: the key moves on to the current epoch (the old one is
    /// zeroized and the state file overwritten).
    fn after_seal(&mut self) {
        let Some(s) = &mut self.sealer else { return };
        let epoch = s.epoch_at(now_secs());
        if let Err(e) = s.advance_to(epoch) {
            tracing::warn!(
                "audit: saving the sealing state {}: {e}; the key moved on in memory",
                s.path.display()
            );
        }
        self.next_seal = self.next_seal.max(s.epoch_end());
    }

    /// How the log is sealed, for status; None without keys.
    pub fn sealing(&self) -> Option<SealingView> {
        let s = self.sealer.as_ref()?;
        Some(SealingView {
            key: s.id.clone(),
            interval_s: s.interval,
            epoch: s.epoch,
            last_seal: self.last_sealed.as_ref().map(|(t, _)| t.clone()),
            sealed_seq: self.last_sealed.as_ref().map(|(_, q)| *q),
        })
    }

    /// Seal fields for a seal record at `head` (the line before it).
    fn fill_seal(sealer: Option<&Sealer>, rec: &mut Record, head: &ChainHead) {
        if let Some(s) = sealer {
            rec.epoch = Some(s.epoch);
            rec.sealed_seq = Some(head.seq);
            rec.seal = Some(s.seal(&head.hash, head.seq));
            rec.key = Some(s.id.clone());
        }
    }

    pub fn files(&self) -> Vec<PathBuf> {
        files(&self.path, self.keep)
    }

    /// Records lost so far of `session`.
    pub fn lost_of(&self, session: &str) -> u64 {
        self.lost_by_session.get(session).copied().unwrap_or(0)
    }

    /// Counted as lost while the log cannot be written, not yet in a `lost` record.
    pub fn lost_pending(&self) -> u64 {
        self.lost.values().map(|l| l.count).sum()
    }

    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Lines were written since the last sync.
    pub fn unsynced(&self) -> bool {
        self.unsynced
    }

    /// Queues a record for the next flush.
    pub fn queue(&mut self, rec: Record, meta: Meta) {
        if self.pending.len() >= MAX_WAITING {
            if self.count_lost(&rec, meta, self.last_reason.unwrap_or(Reason::Other)) {
                self.pending.push_back(Entry::Lost(rec.session.clone()));
            }
            return;
        }
        self.pending.push_back(Entry::Record(Box::new(rec), meta));
    }

    fn count_lost(&mut self, rec: &Record, meta: Meta, reason: Reason) -> bool {
        let n = rec.count.unwrap_or(1).max(1);
        let key = rec.session.clone();
        if let Some(s) = &key {
            *self.lost_by_session.entry(s.clone()).or_default() += n;
        }
        self.lost_total += n;
        let fresh = !self.lost.contains_key(&key);
        let span = self.lost.entry(key).or_insert_with(|| LostSpan {
            count: 0,
            decisions: 0,
            since: rec.time.clone(),
            until: rec.time.clone(),
            reasons: Vec::new(),
        });
        span.count += n;
        if meta.kernel {
            span.decisions += n;
        }
        if rec.time < span.since {
            span.since = rec.time.clone();
        }
        if rec.time > span.until {
            span.until = rec.time.clone();
        }
        if !span.reasons.contains(&reason) {
            span.reasons.push(reason);
        }
        fresh
    }

    fn lost_record(&self, session: &Option<String>) -> Option<Record> {
        let span = self.lost.get(session)?;
        let reasons: Vec<&str> = span.reasons.iter().map(|r| r.name()).collect();
        Some(Record {
            time: super::now_rfc3339(),
            kind: "lost".into(),
            session: session.clone(),
            count: Some(span.count),
            decisions: Some(span.decisions),
            reason: Some(reasons.join(", ")),
            since: Some(span.since.clone()),
            until: Some(span.until.clone()),
            message: Some(format!(
                "the audit log could not be written ({}): these records were taken and counted, but not written one by one",
                reasons.join(", ")
            )),
            ..Default::default()
        })
    }

    /// Opens the file by path and says how it differs from the file we left: None when it is the
    /// same, or the words for a `log_continued` record.
    fn reopen(&mut self) -> io::Result<Reopened> {
        if let Some(dir) = self.path.parent() {
            if !dir.exists() {
                fs::create_dir_all(dir)?;
            }
        }
        let existed = open_existing(&self.path, self.gid, false);
        let (file, created) = match existed {
            Ok(f) => (f, false),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                (open_existing(&self.path, self.gid, true)?, true)
            }
            Err(e) => return Err(e),
        };
        let meta = file.metadata()?;
        let now = FileId {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.len(),
        };
        let change = match &self.expect {
            Expect::Fresh => None,
            Expect::Same(id) if id.dev == now.dev && id.ino == now.ino => {
                if now.size < id.size {
                    Some((
                        format!(
                            "the log file {} was truncated under egressd from {} to {} bytes (logrotate's copytruncate, or by hand)",
                            self.path.display(),
                            id.size,
                            now.size
                        ),
                        id.size,
                    ))
                } else {
                    if now.size > id.size && self.dirty {
                        file.set_len(id.size)?;
                        self.dirty = false;
                        return Ok((file, id.size, None));
                    }
                    if now.size > id.size {
                        tracing::warn!(
                            "audit: {} grew by {} bytes egressd did not write; `egressctl audit verify` will point at them",
                            self.path.display(),
                            now.size - id.size
                        );
                    }
                    None
                }
            }
            Expect::Same(id) => Some((
                format!(
                    "the log file {} was {} under egressd (logrotate, or by hand): the previous file ended at seq {} ({} bytes) and this one continues the chain",
                    self.path.display(),
                    if created {
                        "removed or renamed away"
                    } else {
                        "replaced by another file"
                    },
                    self.head.seq,
                    id.size
                ),
                id.size,
            )),
        };
        Ok((file, now.size, change))
    }

    /// Whether `flush(sync)` would touch the file system (and so may block).
    pub fn would_block(&self, sync: Sync) -> bool {
        !self.pending.is_empty() || (sync != Sync::No && self.unsynced)
    }

    /// Writes what is queued, whole lines only, and with `sync` makes it durable (fdatasync). Never
    /// loses a record silently: what does not reach the file is counted (or waits, for records
    /// that must not be lost).
    pub fn flush(&mut self, sync: Sync) -> Flushed {
        let mut out = Flushed::default();
        let failed = self
            .syncer
            .as_ref()
            .and_then(|s| s.failed.lock().ok().and_then(|mut f| f.take()));
        if let Some(e) = failed {
            out.error = Some((Reason::of(&e), e));
        }
        if self.pending.is_empty() {
            if sync != Sync::No && self.unsynced {
                // Lines written unsynced since the last sync reach the disk now.
                match open_existing(&self.path, self.gid, false) {
                    Ok(f) => self.sync(f, sync, &mut out),
                    // Removed meanwhile: the next write notices it and says so.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => out.error = Some((Reason::of(&e), e)),
                }
            }
            return out;
        }
        let (mut file, size0, change) = match self.reopen() {
            Ok(v) => v,
            Err(e) => {
                out.lost = self.fail(Reason::of(&e));
                out.error = Some((Reason::of(&e), e));
                return out;
            }
        };
        if let Some((what, _)) = &change {
            tracing::warn!("audit: {what}");
        }
        // A marker always has its span; one without (never expected) must not hold the queue.
        let spans = &self.lost;
        self.pending
            .retain(|e| !matches!(e, Entry::Lost(s) if !spans.contains_key(s)));
        // Lines in order, each with the head after it and where it came from.
        let mut buf = Vec::with_capacity(self.pending.len() * 320);
        // Never glue a record onto a torn line (a crash's, or bytes someone else appended).
        if size0 > 0 && !ends_with_newline(&file, size0) {
            buf.push(b'\n');
        }
        let mut items: Vec<(usize, ChainHead, Option<usize>, Written)> = Vec::new();
        let mut head = self.head.clone();
        let sealer = self.sealer.as_ref();
        // Queued records are numbered and chained in place (no copy per line): a record that is not
        // written this time is numbered again at the next flush.
        let mut push = |buf: &mut Vec<u8>, rec: &mut Record, from: Option<usize>| {
            if rec.kind == "seal" {
                Self::fill_seal(sealer, rec, &head);
            }
            rec.seq = head.seq + 1;
            rec.prev = std::mem::take(&mut head.hash);
            let line = serde_json::to_vec(&*rec).unwrap_or_default();
            head = ChainHead {
                seq: rec.seq,
                hash: line_hash(&line),
            };
            buf.extend_from_slice(&line);
            buf.push(b'\n');
            let denied = rec.verdict.as_deref() == Some("denied") || rec.kind == "lost";
            items.push((
                buf.len(),
                head.clone(),
                from,
                Written {
                    kind: rec.kind.clone(),
                    denied,
                    line,
                },
            ));
        };
        let continued = change.is_some();
        if let Some((message, bytes)) = change {
            push(
                &mut buf,
                &mut Record {
                    time: super::now_rfc3339(),
                    kind: "log_continued".into(),
                    bytes: Some(bytes),
                    message: Some(message),
                    ..Default::default()
                },
                None,
            );
        }
        let mut pending = std::mem::take(&mut self.pending);
        for (i, entry) in pending.iter_mut().enumerate() {
            match entry {
                Entry::Lost(session) => {
                    if let Some(mut rec) = self.lost_record(session) {
                        push(&mut buf, &mut rec, Some(i));
                    }
                }
                Entry::Record(rec, meta) => {
                    if let (Some(base), Some(s)) = (meta.base_lost, &rec.session) {
                        rec.lost = Some(base + self.lost_of(s));
                    }
                    push(&mut buf, rec, Some(i));
                }
            }
        }
        self.pending = pending;
        let (done, err) = write_some(&mut file, &buf);
        // The whole lines that reached the file; a partial one after them is cut back.
        let whole = items.iter().take_while(|(end, ..)| *end <= done).count();
        let boundary = if whole == 0 { 0 } else { items[whole - 1].0 };
        if done > boundary && file.set_len(size0 + boundary as u64).is_err() {
            self.dirty = true;
        }
        let mut consumed = 0;
        let mut sealed = false;
        for (_, h, from, written) in items.drain(..whole) {
            if written.kind == "seal" {
                sealed = true;
                self.last_sealed = Some((super::now_rfc3339(), h.seq.saturating_sub(1)));
            }
            self.head = h;
            if let Some(i) = from {
                consumed = i + 1;
            }
            out.written.push(written);
        }
        // Entries whose lines were written leave the queue; a written `lost` record closes its span.
        for entry in self.pending.drain(..consumed) {
            if let Entry::Lost(session) = entry {
                self.lost.remove(&session);
            }
        }
        out.bytes = boundary as u64;
        // A file found replaced counts as ours once the record saying so is in it.
        if !continued || whole > 0 {
            if let Ok(m) = file.metadata() {
                self.expect = Expect::Same(FileId {
                    dev: m.dev(),
                    ino: m.ino(),
                    size: size0 + boundary as u64,
                });
            }
        }
        if sealed {
            self.after_seal();
        }
        if let Some(e) = err {
            out.lost = self.fail(Reason::of(&e));
            out.error = Some((Reason::of(&e), e));
            return out;
        }
        self.unsynced = true;
        let mut size = size0 + boundary as u64;
        if size >= self.max_bytes && self.sealer.is_some() {
            // The file ends with a seal of its last record.
            let mut rec = Record {
                time: super::now_rfc3339(),
                kind: "seal".into(),
                reason: Some("rotation".into()),
                ..Default::default()
            };
            Self::fill_seal(self.sealer.as_ref(), &mut rec, &self.head);
            rec.seq = self.head.seq + 1;
            rec.prev = self.head.hash.clone();
            let mut line = serde_json::to_vec(&rec).unwrap_or_default();
            let hash = line_hash(&line);
            let n = line.len();
            line.push(b'\n');
            match write_some(&mut file, &line) {
                (done, None) if done == line.len() => {
                    self.last_sealed = Some((rec.time.clone(), self.head.seq));
                    self.head = ChainHead { seq: rec.seq, hash };
                    size += line.len() as u64;
                    out.bytes += line.len() as u64;
                    line.truncate(n);
                    out.written.push(Written {
                        kind: "seal".into(),
                        denied: false,
                        line,
                    });
                    self.after_seal();
                }
                (done, e) => {
                    if done > 0 && file.set_len(size).is_err() {
                        self.dirty = true;
                    }
                    let e = e.unwrap_or_else(|| io::ErrorKind::WriteZero.into());
                    out.error = Some((Reason::of(&e), e));
                    return out;
                }
            }
            if let Ok(m) = file.metadata() {
                self.expect = Expect::Same(FileId {
                    dev: m.dev(),
                    ino: m.ino(),
                    size,
                });
            }
        }
        self.sync(file, sync, &mut out);
        if out.error.is_none() && size >= self.max_bytes {
            if let Err(e) = self.rotate() {
                out.error = Some((Reason::of(&e), e));
            }
        }
        out
    }

    fn sync(&mut self, file: fs::File, sync: Sync, out: &mut Flushed) {
        let file = match (&self.syncer, sync) {
            (_, Sync::No) => return,
            (Some(syncer), Sync::Background) => match syncer.tx.send(file) {
                Ok(()) => {
                    self.unsynced = false;
                    return;
                }
                // The syncer is gone: sync here.
                Err(std::sync::mpsc::SendError(file)) => file,
            },
            _ => file,
        };
        match file.sync_data() {
            Ok(()) => self.unsynced = false,
            Err(e) => out.error = Some((Reason::of(&e), e)),
        }
    }

    /// The queue could not be written: records that must not be lost stay
    /// queued, the others are counted into their session's `lost` record, which takes the place
    /// of the first of them. Returns how many were newly counted.
    fn fail(&mut self, reason: Reason) -> u64 {
        self.last_reason = Some(reason);
        let rest: Vec<Entry> = self.pending.drain(..).collect();
        let mut marked: HashSet<Option<String>> = HashSet::new();
        let mut newly = 0;
        for entry in rest {
            match entry {
                Entry::Record(rec, meta) if !must_keep(&rec.kind) => {
                    newly += rec.count.unwrap_or(1).max(1);
                    self.count_lost(&rec, meta, reason);
                    if marked.insert(rec.session.clone()) {
                        self.pending.push_back(Entry::Lost(rec.session.clone()));
                    }
                }
                Entry::Lost(session) => {
                    if marked.insert(session.clone()) {
                        self.pending.push_back(Entry::Lost(session));
                    }
                }
                keep => self.pending.push_back(keep),
            }
        }
        newly
    }

    fn rotate(&mut self) -> io::Result<()> {
        for n in (1..self.keep).rev() {
            let from = rotated(&self.path, n);
            if from.exists() {
                fs::rename(&from, rotated(&self.path, n + 1))?;
            }
        }
        fs::rename(&self.path, rotated(&self.path, 1))?;
        self.expect = Expect::Fresh;
        // The new file exists from now on (readers look for it), empty until the next flush.
        if let Ok(f) = open_existing(&self.path, self.gid, true) {
            if let Ok(m) = f.metadata() {
                self.expect = Expect::Same(FileId {
                    dev: m.dev(),
                    ino: m.ino(),
                    size: 0,
                });
            }
        }
        Ok(())
    }
}

fn must_keep(kind: &str) -> bool {
    matches!(
        kind,
        "session_start" | "session_end" | "lost" | "daemon" | "crash" | "log_continued" | "seal"
    )
}

fn ends_with_newline(file: &fs::File, size: u64) -> bool {
    let mut b = [0u8; 1];
    // Unreadable: assume whole, rather than add an empty line.
    file.read_at(&mut b, size - 1)
        .map_or(true, |n| n == 1 && b[0] == b'\n')
}

/// Writes as much of `buf` as the file takes: the bytes written, and the error that stopped it.
fn write_some(file: &mut fs::File, buf: &[u8]) -> (usize, Option<io::Error>) {
    let mut done = 0;
    while done < buf.len() {
        match file.write(&buf[done..]) {
            Ok(0) => return (done, Some(io::ErrorKind::WriteZero.into())),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return (done, Some(e)),
        }
    }
    (done, None)
}

impl Writer {
    /// Whether the log could take a record now, without writing one.
    pub fn probe(&mut self) -> Result<(), (Reason, io::Error)> {
        self.reopen().map(|_| ()).map_err(|e| (Reason::of(&e), e))
    }
}
