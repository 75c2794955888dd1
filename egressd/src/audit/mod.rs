//! The audit pipeline: drains the kernel's ring buffer on its own task, folds repeated identical
//! decisions, and hands hash-chained JSON lines to the writer, which appends them whole and
//! rotates by size. Nothing is lost silently: events the kernel could not queue (ring full) are
//! counted per session in the kernel; records the file could not take (full disk, read-only or
//! failing file system, removed directory) are counted per session by the writer; decisions a
//! previous daemon took and never wrote (kill -9, a crash) are found at the session's end from
//! the kernel's counters. Each goes into a `lost` record, so written + lost = decisions taken.

mod dns_folds;
mod folds;
mod health;
pub mod names;
mod recent;
mod scan;
mod syslog;
mod writer;

use std::{
    collections::{HashMap, HashSet},
    fs,
    net::{Ipv4Addr, Ipv6Addr},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use aya::maps::{MapData, RingBuf};
use egressd_common::{
    audit::Record, Counters, Event, FoldKey, UnixEvent, EVENT_FOLDED, HOOK_CONNECT_UNIX,
    HOOK_LSM_SOCKET_CREATE, HOOK_SENDMSG_UNIX, HOOK_SOCK_CREATE, REASON_FAMILY, VERDICT_ALLOWED,
    VERDICT_AUDIT_DENIED, VERDICT_REDIRECTED,
};
use tokio::sync::{mpsc, oneshot};

pub use dns_folds::{DnsFolds, DnsKey};
pub use health::{Health, SharedHealth};
pub use recent::RecentDenials;
pub use syslog::Syslog;
pub use writer::{Writer, STOP_MESSAGE};

use crate::{
    enforcer::{FoldMaps, Handle},
    metrics::METRICS,
    sessions::Session,
};
use names::{comm, hook_name, proto_name, reason_name};
use writer::Meta;

/// How an adopted session's start record says so (and how the scan tells it from the original).
pub const ADOPTED: &str = "adopted by a restarted egressd";

pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_nanos(SystemTime::now()).to_string()
}

/// What other tasks tell the audit task.
pub enum Message {
    /// A session, the hash of the policy in force, `true` when adopted after a restart, and the
    /// enforcement layers in force.
    SessionStart(Session, String, bool, Vec<String>),
    /// A session ended: the kernel's counters, and the unix supervisor's (allowed, refused).
    SessionEnd(Session, Counters, (u64, u64)),
    Note(String),
    /// A record made elsewhere (the DNS resolver's, the supervisor's); time, seq and chain are
    /// filled in here.
    Record(Box<Record>),
    /// May a session start now? (`disk_full_action`/`disk_error_action` = "refuse")
    Admit(oneshot::Sender<Result<(), String>>),
    /// Daemon shutdown: write every repeat counted and what was lost, then the stop record (the
    /// last before the stop seal, so the next start finds a clean end), and confirm.
    Stop(oneshot::Sender<()>),
    /// Take what the ring holds, try writing it, and confirm (a session's summary).
    Settle(u64, oneshot::Sender<()>),
}

/// Records each running session lost to the log so far, by session id (for `ps` and the line
/// `egressctl run` prints at the end).
pub type LostBySession = Arc<Mutex<HashMap<String, u64>>>;

/// Short hashes of the policy of each generation (the kernel alternates two).
pub type PolicyHashes = Arc<Mutex<HashMap<u32, String>>>;

/// Session ids by cgroup id. Written by the control task before a caller enters its cgroup, so no
/// event can arrive for a session the audit task cannot name; removed by the audit task once the
/// session's last events are written.
pub type SessionNames = Arc<Mutex<HashMap<u64, String>>>;

#[derive(Clone, Copy)]
pub struct Tuning {
    pub fold_window: Duration,
}

/// Decisions folded here (not in the kernel) held for their window at most; beyond, all are written.
/// A held record takes about a kilobyte: this bounds the memory a flood of distinct decisions
/// costs when the kernel's map is full.
const MAX_PENDING_FOLDS: usize = 2048;

/// Events taken from the ring per drain. A drain's records are built, serialized and written in one
/// batch of about 3 KiB each: the bound is also what a flood costs in memory.
const DRAIN_BOUND: usize = 4096;

/// While events come, how soon the next drain follows one that found some.
const DRAIN_AGAIN: Duration = Duration::from_millis(3);

/// How often the audit task looks at what is not event-driven: folds whose window ended, ring
/// losses, seals, the disk's health, syncing what was written since.
const TICK: Duration = Duration::from_millis(200);

/// The tick with no session running and nothing to write, sync or fold: an idle daemon wakes once
/// a second for it rather than five times.
const IDLE_TICK: Duration = Duration::from_secs(1);

/// Lines written between ticks reach the file at once, and the disk (fdatasync, on a thread of
/// its own) with the tick.
const SYNC_EVERY: Duration = Duration::from_millis(200);

/// A decision folded here: its first occurrence (written), with the latest repeat's time, and the
/// repeats since.
struct Pending {
    event: Event,
    repeats: u64,
    first: Instant,
}

struct Live {
    id: String,
    /// Ring losses (the kernel's `events_lost`) already in `lost` records.
    ring_lost_reported: u64,
    /// Kernel decisions accounted for: queued for the file (written or counted lost by the
    /// writer), or in a `lost` record; by this daemon and, for an adopted session, before it.
    accounted: u64,
    adopted: bool,
}

struct Pipeline {
    writer: Writer,
    health: Health,
    syslog: Option<Syslog>,
    enforcer: Handle,
    hashes: PolicyHashes,
    names: SessionNames,
    lost_by_session: LostBySession,
    recent: RecentDenials,
    dns_folds: DnsFolds,
    tuning: Tuning,
    sessions: HashMap<u64, Live>,
    /// What a previous daemon accounted for, per adopted session id (read from the log at start).
    before: HashMap<String, scan::Accounted>,
    /// Decisions folded here: those the kernel sent one by one (folding off in the kernel, or its
    /// map full).
    folds: HashMap<FoldKey, Pending>,
    /// Decisions folded in the kernel.
    kernel_folds: folds::KernelFolds,
    last_kernel_folds: Instant,
    exe_cache: HashMap<u32, Option<String>>,
    /// CLOCK_REALTIME - CLOCK_BOOTTIME, to turn kernel timestamps into wall time.
    boot_offset_ns: i128,
    last_sync: Instant,
    /// Records written since the heap was last handed back (see `tick_trim`).
    written_since_trim: usize,
}

pub struct Shared {
    pub hashes: PolicyHashes,
    pub names: SessionNames,
    pub syslog: Option<Syslog>,
    pub health: Health,
    pub lost: LostBySession,
    pub recent: RecentDenials,
    /// DNS records the resolver counted as repeats, written here once per fold window.
    pub dns_folds: DnsFolds,
}

/// Runs the pipeline until the channel closes.
pub async fn run(
    ring: RingBuf<MapData>,
    fold_maps: FoldMaps,
    writer: Writer,
    enforcer: Handle,
    shared: Shared,
    tuning: Tuning,
    mut rx: mpsc::Receiver<Message>,
) {
    let mut ring = match crate::daemon::readable_fd(ring) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("audit: cannot poll the ring buffer: {e}; decisions are not logged");
            return;
        }
    };
    // Sessions a previous daemon left are named before this task starts: read what it wrote.
    let adopted: HashSet<String> = shared
        .names
        .lock()
        .map(|n| n.values().cloned().collect())
        .unwrap_or_default();
    let files = writer.files();
    let before = tokio::task::spawn_blocking(move || scan::accounted(&files, &adopted))
        .await
        .unwrap_or_default();
    let mut p = Pipeline {
        writer,
        health: shared.health,
        syslog: shared.syslog,
        enforcer,
        hashes: shared.hashes,
        names: shared.names,
        lost_by_session: shared.lost,
        recent: shared.recent,
        dns_folds: shared.dns_folds,
        tuning,
        sessions: HashMap::new(),
        before,
        folds: HashMap::new(),
        kernel_folds: folds::KernelFolds::new(fold_maps),
        last_kernel_folds: Instant::now(),
        exe_cache: HashMap::new(),
        boot_offset_ns: boot_offset_ns(),
        last_sync: Instant::now(),
        written_since_trim: 0,
    };
    p.flush();
    // The kernel wakes us for the first event into an empty ring (and at a quarter full), not for
    // each: while events come, we drain again every few milliseconds (`soon`), which takes the rest
    // with no wakeup each; once a drain finds nothing, only the kernel's next wakeup or the tick
    // (folds, ring losses, a backstop) brings us back. Idle costs one wakeup per tick, and with no
    // session and nothing to write the tick slows down (`IDLE_TICK`) until something happens.
    let tick = tokio::time::sleep(TICK);
    tokio::pin!(tick);
    let mut soon: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
    loop {
        let woke = async {
            match &mut soon {
                Some(s) => s.as_mut().await,
                None => std::future::pending().await,
            }
        };
        // Whether something other than the tick woke us.
        let mut active = true;
        tokio::select! {
            guard = ring.readable_mut() => {
                if let Ok(mut guard) = guard {
                    let taken = p.drain(guard.get_inner_mut());
                    guard.clear_ready();
                    if taken > 0 {
                        p.write_out();
                        soon.get_or_insert_with(|| Box::pin(tokio::time::sleep(again(taken))));
                    }
                }
            }
            _ = woke => {
                let taken = p.drain(ring.get_mut());
                if taken > 0 {
                    p.write_out();
                    soon = Some(Box::pin(tokio::time::sleep(again(taken))));
                } else {
                    soon = None;
                }
            }
            _ = &mut tick => {
                p.drain(ring.get_mut());
                p.writer.tick_seal();
                p.flush_folds(false, None);
                p.dns_repeats(false, None);
                if p.last_kernel_folds.elapsed() >= p.tuning.fold_window {
                    p.kernel_repeats(None);
                }
                p.report_lost().await;
                p.flush();
                p.trim();
                let period = if p.idle() { IDLE_TICK } else { TICK };
                tick.as_mut().reset(tokio::time::Instant::now() + period);
                active = false;
            }
            msg = rx.recv() => {
                let Some(msg) = msg else { break };
                // DNS and supervisor records come one per query: they are written with the next
                // tick's batch, so a query never waits for the disk.
                let sync_now = !matches!(msg, Message::Record(_));
                if matches!(msg, Message::SessionEnd(..) | Message::Stop(_) | Message::Settle(..)) {
                    p.drain_all(ring.get_mut());
                } else {
                    p.drain(ring.get_mut());
                }
                p.handle(msg).await;
                if sync_now {
                    p.flush();
                }
            }
        }
        // Anything that happened brings a slowed tick back to its pace.
        if active {
            let due = tokio::time::Instant::now() + TICK;
            if tick.deadline() > due {
                tick.as_mut().reset(due);
            }
        }
    }
    p.drain_all(ring.get_mut());
    p.flush_folds(true, None);
    p.kernel_repeats(None);
    p.dns_repeats(true, None);
    p.flush_with(writer::Sync::Now);
}

/// When to drain again after a drain that took `taken` events: at once when it stopped at the
/// bound (the ring holds more), else a little later, so the events in between need no wakeup.
fn again(taken: usize) -> Duration {
    if taken >= DRAIN_BOUND {
        Duration::ZERO
    } else {
        DRAIN_AGAIN
    }
}

fn boot_offset_ns() -> i128 {
    use nix::time::{clock_gettime, ClockId};
    let ns = |c| {
        clock_gettime(c)
            .map(|t| t.tv_sec() as i128 * 1_000_000_000 + t.tv_nsec() as i128)
            .unwrap_or(0)
    };
    ns(ClockId::CLOCK_REALTIME) - ns(ClockId::CLOCK_BOOTTIME)
}

impl Pipeline {
    fn write(&mut self, rec: Record) {
        self.recent.note(&rec);
        METRICS.record(&rec);
        self.writer.queue(rec, Meta::default());
    }

    /// Queues a decision taken from the kernel's ring, accounting for it.
    fn write_kernel(&mut self, cgroup_id: u64, rec: Record) {
        if let Some(live) = self.live(cgroup_id) {
            live.accounted += rec.count.unwrap_or(1);
        }
        self.recent.note(&rec);
        METRICS.record(&rec);
        self.writer.queue(
            rec,
            Meta {
                kernel: true,
                base_lost: None,
            },
        );
    }

    /// The session of a cgroup, also before its start record arrives (its first events can come
    /// first: the caller enters the cgroup before the control task queues the record).
    fn live(&mut self, cgroup_id: u64) -> Option<&mut Live> {
        if !self.sessions.contains_key(&cgroup_id) {
            let id = self.names.lock().ok()?.get(&cgroup_id)?.clone();
            self.sessions.insert(
                cgroup_id,
                Live {
                    id,
                    ring_lost_reported: 0,
                    accounted: 0,
                    adopted: false,
                },
            );
        }
        self.sessions.get_mut(&cgroup_id)
    }

    fn note(&mut self, message: String) {
        self.write(Record {
            time: now_rfc3339(),
            kind: "daemon".into(),
            message: Some(message),
            ..Default::default()
        });
    }

    /// Writes what a drain between ticks queued, unsynced unless the last sync is a tick old.
    fn write_out(&mut self) {
        if self.last_sync.elapsed() >= SYNC_EVERY {
            self.flush();
        } else {
            self.flush_with(writer::Sync::No);
        }
    }

    fn flush(&mut self) {
        self.last_sync = Instant::now();
        self.flush_with(writer::Sync::Background);
    }

    fn flush_with(&mut self, sync: writer::Sync) {
        if let Some(note) = self.health.check_space() {
            self.note(note);
        }
        // Writing (and a synchronous fdatasync) blocks: let the runtime move the resolver and
        // control tasks off this worker. With nothing to write or sync (an idle tick) the hand-off
        // would only wake another thread.
        let flushed = if self.writer.would_block(sync) {
            tokio::task::block_in_place(|| self.writer.flush(sync))
        } else {
            self.writer.flush(sync)
        };
        self.written_since_trim += flushed.written.len();

        if flushed.lost > 0 {
            if let Ok(mut l) = self.lost_by_session.lock() {
                for live in self.sessions.values() {
                    let n = self.writer.lost_of(&live.id);
                    if n > 0 {
                        l.insert(live.id.clone(), n);
                    }
                }
            }
        }
        if let Some(syslog) = &mut self.syslog {
            for w in &flushed.written {
                syslog.send(&w.kind, w.denied, &w.line);
            }
        }
        let mut note = self.health.after_flush(&flushed, self.writer.lost_total);
        if note.is_none()
            && flushed.error.is_none()
            && self.health.is_failing()
            && !self.writer.has_pending()
            && self.writer.probe().is_ok()
        {
            note = self.health.recovered(self.writer.lost_total);
        }
        if let Some(note) = note {
            self.note(note);
        }
        METRICS.audit_flushed(
            flushed.bytes,
            self.writer.lost_total,
            self.health.is_failing(),
        );
        self.publish();
    }

    /// After a burst (a flood writes a few thousand records per drain, a few KiB each while being
    /// built and serialized), hands the freed heap back: without it, the allocator's per-thread
    /// arenas keep a flood's peak (100-200 MiB) resident for good.
    /// Nothing for the tick to do soon: no session, and nothing held to write, sync or fold.
    fn idle(&self) -> bool {
        self.sessions.is_empty()
            && self.folds.is_empty()
            && self.dns_folds.is_empty()
            && !self.writer.has_pending()
            && !self.writer.unsynced()
    }

    fn trim(&mut self) {
        if self.written_since_trim >= 20_000 {
            self.written_since_trim = 0;
            // SAFETY: malloc_trim only releases free memory.
            unsafe { libc::malloc_trim(0) };
        }
    }

    fn publish(&self) {
        self.health.publish(
            self.writer.lost_total,
            self.writer.lost_pending(),
            self.syslog.as_ref().map(|s| (&s.failing, s.dropped)),
            self.writer.sealing(),
        );
    }

    /// Takes what the ring holds, up to a bound: under a flood faster than the disk, messages
    /// (session starts and ends, status) still get their turn, and the rest waits in the ring,
    /// where what does not fit is counted by the kernel.
    fn drain(&mut self, ring: &mut RingBuf<MapData>) -> usize {
        self.boot_offset_ns = boot_offset_ns();
        let mut taken = 0;
        while taken < DRAIN_BOUND {
            let Some(item) = ring.next() else { break };
            taken += 1;
            if item.len() < std::mem::size_of::<Event>() {
                continue;
            }
            if item.len() >= std::mem::size_of::<UnixEvent>() {
                // SAFETY: the kernel wrote a whole `UnixEvent` (same repr(C) type).
                let ev: UnixEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
                drop(item);
                self.unix_decision(&ev);
                continue;
            }
            // SAFETY: the kernel wrote a whole `Event` (same repr(C) type); read unaligned.
            let ev: Event = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            drop(item);
            self.fold(ev);
        }
        if self.folds.len() > MAX_PENDING_FOLDS {
            self.flush_folds(true, None);
        }
        taken
    }

    /// Everything the ring holds: before a session's end is reconciled with the kernel's counters,
    /// and at shutdown. An ended session adds nothing more, and what the ring held when this began
    /// is at most its size in events (a million for a 64 MiB ring): bounded, though other sessions
    /// keep adding.
    fn drain_all(&mut self, ring: &mut RingBuf<MapData>) {
        for _ in 0..256 {
            if self.drain(ring) < DRAIN_BOUND {
                break;
            }
        }
    }

    /// A unix backstop decision: written at once (they are rare), with the address the task gave
    /// and, best effort, who serves it.
    fn unix_decision(&mut self, ev: &UnixEvent) {
        let mut rec = self.decision(&ev.event);
        let path = &ev.path[..(ev.path_len as usize).min(ev.path.len())];
        let (dest, server) =
            crate::handoff::name_and_server(path, (ev.event.pid_tgid >> 32) as u32);
        rec.dest = Some(dest);
        rec.peer = Some(server.1);
        rec.peer_pid = server.0;
        self.write_kernel(ev.event.session, rec);
    }

    fn fold(&mut self, ev: Event) {
        let key = FoldKey::of(&ev);
        if ev.flags & EVENT_FOLDED != 0 {
            // The kernel counts this key's repeats: the first occurrence is written at once.
            self.kernel_folds.first_taken(key);
            let record = self.decision(&ev);
            self.write_kernel(ev.session, record);
            return;
        }
        // Folded here the way the kernel folds: the first occurrence is written at once, its
        // repeats within the window as one record with their count.
        if !self.tuning.fold_window.is_zero() {
            if let Some(p) = self.folds.get_mut(&key) {
                p.repeats += 1;
                p.event.boot_ns = ev.boot_ns;
                return;
            }
            self.folds.insert(
                key,
                Pending {
                    event: ev,
                    repeats: 0,
                    first: Instant::now(),
                },
            );
        }
        let record = self.decision(&ev);
        self.write_kernel(ev.session, record);
    }

    /// Writes the repeats folded here whose window has passed (or all, or all of one session),
    /// oldest first.
    fn flush_folds(&mut self, all: bool, session: Option<u64>) {
        let window = self.tuning.fold_window;
        let mut due: Vec<FoldKey> = self
            .folds
            .iter()
            .filter(|(k, p)| all || session == Some(k.session) || p.first.elapsed() >= window)
            .map(|(k, _)| *k)
            .collect();
        due.sort_by_key(|k| self.folds[k].event.boot_ns);
        for k in due {
            let Some(p) = self.folds.remove(&k) else {
                continue;
            };
            if p.repeats > 0 {
                let mut record = self.decision(&p.event);
                record.count = Some(p.repeats);
                self.write_kernel(k.session, record);
            }
        }
    }

    /// Writes the DNS queries the resolver counted as repeats: of keys whose window has passed, or
    /// all, or all of one session.
    fn dns_repeats(&mut self, all: bool, session: Option<&str>) {
        for r in self.dns_folds.take(all, session) {
            self.write(r);
        }
    }

    /// Writes the repeats the kernel counted (of one session, or all) as one record per key.
    fn kernel_repeats(&mut self, session: Option<u64>) {
        if session.is_none() {
            self.last_kernel_folds = Instant::now();
        }
        for r in self.kernel_folds.take(session) {
            let mut record = self.decision(&r.event);
            record.count = Some(r.count);
            self.write_kernel(r.event.session, record);
        }
    }

    fn exe(&mut self, tgid: u32) -> Option<String> {
        if tgid == 0 {
            return None;
        }
        if self.exe_cache.len() > 4096 {
            self.exe_cache.clear();
        }
        self.exe_cache
            .entry(tgid)
            .or_insert_with(|| {
                fs::read_link(format!("/proc/{tgid}/exe"))
                    .ok()
                    .map(|p| p.display().to_string())
            })
            .clone()
    }

    fn decision(&mut self, ev: &Event) -> Record {
        let wall_ns = self.boot_offset_ns + ev.boot_ns as i128;
        let time = SystemTime::UNIX_EPOCH + Duration::from_nanos(wall_ns.max(0) as u64);
        let tgid = (ev.pid_tgid >> 32) as u32;
        // The backstop runs in softirq context, with no task: no pid and no comm. A task in a pid
        // namespace below egressd's has no pid egressd could name (0), but its uid and comm.
        let pid_known = ev.pid_tgid != 0;
        let task = pid_known || ev.comm[0] != 0;
        let audit_mode = ev.verdict == VERDICT_AUDIT_DENIED;
        let reason = if ev.reason == REASON_FAMILY {
            format!(
                "socket family {} not in the profile's families",
                egressd_common::policy::family_name(u32::from(ev.port))
            )
        } else {
            reason_name(ev.reason).to_string()
        };
        let dest = match ev.family {
            4 => {
                Some(Ipv4Addr::new(ev.addr[12], ev.addr[13], ev.addr[14], ev.addr[15]).to_string())
            }
            6 => Some(Ipv6Addr::from(ev.addr).to_string()),
            _ => None,
        };
        // Socket creation and the unix backstop carry no destination (the unix programs cannot
        // read the path; the supervisor's own records name it).
        let sock_create = ev.hook == HOOK_SOCK_CREATE
            || ev.hook == HOOK_LSM_SOCKET_CREATE
            || ev.hook == HOOK_CONNECT_UNIX
            || ev.hook == HOOK_SENDMSG_UNIX;
        Record {
            time: humantime::format_rfc3339_nanos(time).to_string(),
            kind: "decision".into(),
            session: Some(self.session_id(ev.session)),
            pid: pid_known.then_some(ev.pid_tgid as u32),
            tgid: pid_known.then_some(tgid),
            uid: task.then_some(ev.uid_gid as u32),
            comm: task.then(|| comm(&ev.comm)),
            exe: self.exe(tgid),
            hook: Some(hook_name(ev.hook).into()),
            family: match ev.family {
                4 => Some("ipv4".into()),
                6 => Some("ipv6".into()),
                1 => Some("unix".into()),
                _ => None,
            },
            protocol: (ev.family != 1).then(|| proto_name(ev.proto)),
            dest: if sock_create { None } else { dest },
            port: (!sock_create).then_some(ev.port),
            verdict: Some(
                match ev.verdict {
                    VERDICT_REDIRECTED => "redirected",
                    VERDICT_ALLOWED | VERDICT_AUDIT_DENIED => "allowed",
                    _ => "denied",
                }
                .into(),
            ),
            reason: Some(if audit_mode {
                format!("audit mode: would deny ({reason})")
            } else {
                reason
            }),
            policy: self
                .hashes
                .lock()
                .ok()
                .and_then(|h| h.get(&ev.policy_gen).cloned()),
            count: Some(1),
            ..Default::default()
        }
    }

    fn session_id(&self, cgroup_id: u64) -> String {
        self.names
            .lock()
            .ok()
            .and_then(|n| n.get(&cgroup_id).cloned())
            .unwrap_or_else(|| format!("unknown-cgroup-{cgroup_id}"))
    }

    async fn report_lost(&mut self) {
        let ids: Vec<u64> = self.sessions.keys().copied().collect();
        for id in ids {
            if let Ok(c) = self.enforcer.counters(id).await {
                self.ring_lost(id, c.events_lost);
            }
        }
    }

    /// Writes what the kernel counted as lost (ring full) since the last report.
    fn ring_lost(&mut self, cgroup_id: u64, total_lost: u64) {
        let Some(live) = self.sessions.get_mut(&cgroup_id) else {
            return;
        };
        if total_lost <= live.ring_lost_reported {
            return;
        }
        let delta = total_lost - live.ring_lost_reported;
        live.ring_lost_reported = total_lost;
        live.accounted += delta;
        METRICS.ring_lost(delta);
        let session = live.id.clone();
        tracing::warn!(%session, lost = delta, "audit: the kernel's ring buffer was full; events lost (counted)");
        self.write(Record {
            time: now_rfc3339(),
            kind: "lost".into(),
            session: Some(session),
            count: Some(delta),
            decisions: Some(delta),
            reason: Some(scan::RING_FULL.into()),
            message: Some("ring buffer full: these decisions were taken and counted, but not recorded one by one".into()),
            ..Default::default()
        });
    }

    /// At a session's end: the kernel counted `taken` decisions; what no record accounts for was
    /// taken from the ring by a daemon that stopped before writing it.
    fn reconcile(&mut self, cgroup_id: u64, taken: u64) -> u64 {
        let Some(live) = self.sessions.get_mut(&cgroup_id) else {
            return 0;
        };
        if live.accounted >= taken {
            if live.accounted > taken {
                tracing::warn!(session = %live.id, taken, accounted = live.accounted, "audit: more decisions recorded than the kernel counted");
            }
            return 0;
        }
        let gap = taken - live.accounted;
        live.accounted = taken;
        let session = live.id.clone();
        let (reason, message) = if live.adopted {
            (
                "egressd stopped before writing them",
                "a previous egressd took these decisions from the kernel and ended (kill -9, a crash) before writing them; the kernel counted them",
            )
        } else {
            tracing::error!(%session, gap, "audit: decisions the kernel counted that no record accounts for");
            (
                "unaccounted",
                "the kernel counted these decisions but no record accounts for them (a bug in egressd: please report it)",
            )
        };
        self.write(Record {
            time: now_rfc3339(),
            kind: "lost".into(),
            session: Some(session),
            count: Some(gap),
            decisions: Some(gap),
            reason: Some(reason.into()),
            message: Some(message.into()),
            ..Default::default()
        });
        gap
    }

    async fn handle(&mut self, msg: Message) {
        match msg {
            Message::SessionStart(s, policy, adopted, layers) => {
                let before = if adopted {
                    self.before.remove(&s.id).unwrap_or_default()
                } else {
                    scan::Accounted::default()
                };
                let live = self.sessions.entry(s.cgroup_id).or_insert(Live {
                    id: s.id.clone(),
                    ring_lost_reported: 0,
                    accounted: 0,
                    adopted,
                });
                live.id = s.id.clone();
                live.adopted = adopted;
                live.accounted += before.kernel;
                live.ring_lost_reported = live.ring_lost_reported.max(before.ring_lost);
                // Said plainly where the unix layer is missing: a reader of the log must not take
                // "cgroup" alone for a session that could not reach tmux or the session bus.
                let notes: Vec<&str> = [
                    adopted.then_some(ADOPTED),
                    (!layers.iter().any(|l| l == "unix")).then_some(
                        "unix layer not in force: this session's unix sockets could reach servers outside it (egressctl doctor says why)",
                    ),
                ]
                .into_iter()
                .flatten()
                .collect();
                METRICS.session_started();
                self.write(Record {
                    time: now_rfc3339(),
                    kind: "session_start".into(),
                    session: Some(s.id),
                    uid: Some(s.uid),
                    profile: Some(s.profile),
                    argv: Some(s.argv),
                    policy: Some(policy),
                    layers: Some(layers),
                    message: (!notes.is_empty()).then(|| notes.join("; ")),
                    ..Default::default()
                });
            }
            Message::SessionEnd(s, kernel, (unix_allowed, unix_refused)) => {
                self.flush_folds(false, Some(s.cgroup_id));
                self.kernel_repeats(Some(s.cgroup_id));
                self.dns_repeats(false, Some(&s.id));
                self.kernel_folds.end_session(s.cgroup_id);
                self.ring_lost(s.cgroup_id, kernel.events_lost);
                let taken = kernel.allowed
                    + kernel.denied
                    + kernel.sockets_refused
                    + kernel.backstop_dropped;
                let gap = self.reconcile(s.cgroup_id, taken);
                self.sessions.remove(&s.cgroup_id);
                if let Ok(mut n) = self.names.lock() {
                    n.remove(&s.cgroup_id);
                }
                if let Ok(mut l) = self.lost_by_session.lock() {
                    l.remove(&s.id);
                }
                METRICS.session_ended(&s.id);
                self.writer.queue(
                    Record {
                        time: now_rfc3339(),
                        kind: "session_end".into(),
                        session: Some(s.id),
                        uid: Some(s.uid),
                        profile: Some(s.profile),
                        allowed: Some(kernel.allowed + unix_allowed),
                        denied: Some(
                            kernel.denied
                                + kernel.sockets_refused
                                + kernel.backstop_dropped
                                + unix_refused,
                        ),
                        duration_s: Some(crate::sessions::now_secs().saturating_sub(s.started)),
                        ..Default::default()
                    },
                    Meta {
                        kernel: false,
                        base_lost: Some(kernel.events_lost + gap),
                    },
                );
            }
            Message::Admit(reply) => {
                self.flush();
                let probe = self.writer.probe();
                let _ = reply.send(self.health.admit(probe));
            }
            Message::Stop(done) => {
                self.flush_folds(true, None);
                self.kernel_repeats(None);
                self.dns_repeats(true, None);
                let ids: Vec<u64> = self.sessions.keys().copied().collect();
                for id in ids {
                    if let Ok(c) = self.enforcer.counters(id).await {
                        self.ring_lost(id, c.events_lost);
                    }
                }
                self.note(STOP_MESSAGE.into());
                // The stop seal covers the log up to the stop record.
                self.writer.queue_seal("stop");
                self.flush_with(writer::Sync::Now);
                let _ = done.send(());
            }
            Message::Settle(cgroup_id, done) => {
                self.flush_folds(false, Some(cgroup_id));
                self.kernel_repeats(Some(cgroup_id));
                if let Some(id) = self.sessions.get(&cgroup_id).map(|l| l.id.clone()) {
                    self.dns_repeats(false, Some(&id));
                }
                self.write_out();
                let _ = done.send(());
            }
            Message::Record(rec) => self.write(*rec),
            Message::Note(message) => self.note(message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use egressd_common::audit::{verify, Verified};
    use std::{io, path::PathBuf};

    fn rec(kind: &str, session: &str) -> Record {
        Record {
            time: now_rfc3339(),
            kind: kind.into(),
            session: Some(session.into()),
            count: Some(1),
            ..Default::default()
        }
    }

    fn dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("egressd-audit-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    fn check(files: &[PathBuf]) -> Result<Verified, String> {
        let readers = files.iter().map(|f| {
            (
                f.display().to_string(),
                io::BufReader::new(fs::File::open(f).unwrap()),
            )
        });
        verify(readers).map_err(|b| format!("{}:{}: {}", b.file, b.line, b.reason))
    }

    fn write_n(w: &mut Writer, n: usize) {
        for _ in 0..n {
            w.queue(rec("decision", "s1"), Meta::default());
        }
        let f = w.flush(writer::Sync::Now);
        assert!(f.error.is_none(), "{:?}", f.error);
    }

    #[test]
    fn chain_verifies_and_continues_across_reopen_and_rotation() {
        let dir = dir("rotate");
        let path = dir.join("audit.jsonl");
        let mut w = Writer::open(&path, 600, 3, None);
        write_n(&mut w, 3);
        w.queue(rec("daemon", "s1"), Meta::default());
        let mut stop = rec("daemon", "s1");
        stop.message = Some(STOP_MESSAGE.into());
        w.queue(stop, Meta::default());
        w.flush(writer::Sync::Now);
        let mut w = Writer::open(&path, 600, 3, None);
        write_n(&mut w, 3);
        assert!(
            writer::files(&path, 3).len() > 1,
            "600 bytes should have rotated"
        );
        let v = check(&writer::files(&path, 3)).unwrap();
        assert!(
            v.notes.is_empty(),
            "a clean stop leaves nothing to say: {:?}",
            v.notes
        );

        let text = fs::read_to_string(&path).unwrap();
        let edited = text.replacen("decision", "decisioN", 1);
        if edited != text {
            fs::write(&path, edited).unwrap();
            assert!(check(&writer::files(&path, 3)).is_err());
        }
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_writer_seals_at_start_rotation_and_stop_and_says_what_a_crash_left_unsealed() {
        use egressd_common::seal::{self, Sealer};
        let dir = dir("seal");
        let path = dir.join("audit.jsonl");
        fs::create_dir_all(&dir).unwrap();
        let (_, vk) = Sealer::create(&seal::state_path(&path), 60, false).unwrap();
        let mut w = Writer::open(&path, 900, 20, None);
        while writer::files(&path, 20).len() < 3 {
            write_n(&mut w, 2);
        }
        // A crash: records after the last seal, no stop seal.
        while fs::read_to_string(&path)
            .unwrap()
            .lines()
            .last()
            .is_none_or(|l| l.contains("\"type\":\"seal\""))
        {
            write_n(&mut w, 1);
        }
        drop(w);
        let mut w = Writer::open(&path, 900, 20, None);
        w.flush(writer::Sync::Now);
        let files = writer::files(&path, 20);
        let all: Vec<Record> = files
            .iter()
            .flat_map(|f| {
                fs::read_to_string(f)
                    .unwrap()
                    .lines()
                    .map(|l| serde_json::from_str(l).unwrap())
                    .collect::<Vec<Record>>()
            })
            .collect();
        let reasons: Vec<&str> = all
            .iter()
            .filter(|r| r.kind == "seal")
            .map(|r| r.reason.as_deref().unwrap())
            .collect();
        assert_eq!(reasons.first(), Some(&"start"));
        assert!(reasons.contains(&"rotation"), "{reasons:?}");
        for f in &files[..files.len() - 1] {
            let last = fs::read_to_string(f)
                .unwrap()
                .lines()
                .last()
                .unwrap()
                .to_string();
            assert!(
                last.contains("\"reason\":\"rotation\""),
                "{f:?} ends with {last}"
            );
        }
        let note = all
            .iter()
            .find(|r| {
                r.kind == "daemon"
                    && r.message
                        .as_deref()
                        .is_some_and(|m| m.contains("were not sealed"))
            })
            .expect("a record saying what the crash left unsealed");
        assert!(
            note.message.as_ref().unwrap().contains("records (seq"),
            "{note:?}"
        );
        // A clean stop: the stop record, then the stop seal, last.
        let mut stop = rec("daemon", "s1");
        stop.message = Some(STOP_MESSAGE.into());
        w.queue(stop, Meta::default());
        w.queue_seal("stop");
        w.flush(writer::Sync::Now);
        let files = writer::files(&path, 20);
        let v = check(&files).unwrap();
        let r = seal::check(&v, &[vk], None).unwrap();
        assert!(r.ends_with_stop && r.unsealed == 0, "{r:?}");
        assert_eq!(r.seals, v.seals.len());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_torn_last_line_is_recorded_and_verifies_but_an_edit_of_it_does_not() {
        let dir = dir("torn");
        let path = dir.join("audit.jsonl");
        let mut w = Writer::open(&path, 1 << 20, 3, None);
        write_n(&mut w, 3);
        // A crash mid-write: half a line, no newline.
        let whole = fs::read(&path).unwrap();
        let mut f = fs::OpenOptions::new().append(true).open(&path).unwrap();
        io::Write::write_all(&mut f, b"{\"time\":\"2026-12-02T00:00:00Z\",\"seq\":4,\"ty").unwrap();
        drop(f);
        let mut w = Writer::open(&path, 1 << 20, 3, None);
        write_n(&mut w, 2);
        let v = check(std::slice::from_ref(&path)).unwrap();
        assert_eq!(v.checked, 6, "3 + the crash record + 2: {v:?}");
        assert!(
            v.notes
                .iter()
                .any(|n| n.contains(&format!("at byte {}", whole.len()))),
            "{:?}",
            v.notes
        );
        // The torn bytes changed afterwards: no longer what the crash record names.
        let text = fs::read_to_string(&path)
            .unwrap()
            .replacen("\"ty\n", "\"tz\n", 1);
        fs::write(&path, text).unwrap();
        assert!(check(std::slice::from_ref(&path)).is_err());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_unclean_stop_without_a_torn_line_is_said() {
        let dir = dir("unclean");
        let path = dir.join("audit.jsonl");
        let mut w = Writer::open(&path, 1 << 20, 3, None);
        write_n(&mut w, 2);
        drop(w);
        let mut w = Writer::open(&path, 1 << 20, 3, None);
        write_n(&mut w, 1);
        let v = check(std::slice::from_ref(&path)).unwrap();
        assert!(
            v.notes.iter().any(|n| n.contains("ended without closing")),
            "{:?}",
            v.notes
        );
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_log_removed_renamed_or_truncated_continues_the_chain_and_says_so() {
        let dir = dir("replaced");
        let path = dir.join("audit.jsonl");
        let mut w = Writer::open(&path, 1 << 20, 3, None);
        write_n(&mut w, 2);
        // Renamed away: the old file and the new one make one chain.
        let away = dir.join("away.jsonl");
        fs::rename(&path, &away).unwrap();
        write_n(&mut w, 2);
        let v = check(&[away.clone(), path.clone()]).unwrap();
        assert_eq!(v.checked, 5);
        assert!(
            v.notes.iter().any(|n| n.contains("removed")),
            "{:?}",
            v.notes
        );
        // Checked alone, the new file says where it starts.
        let v = check(std::slice::from_ref(&path)).unwrap();
        assert!(
            v.notes
                .iter()
                .any(|n| n.contains("not among those checked")),
            "{:?}",
            v.notes
        );
        // Deleted, then truncated: each noticed, the chain goes on.
        fs::remove_file(&path).unwrap();
        write_n(&mut w, 1);
        fs::write(&path, b"").unwrap();
        write_n(&mut w, 1);
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.contains("truncated under egressd"), "{text}");
        check(std::slice::from_ref(&path)).unwrap();
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn records_the_file_cannot_take_are_counted_and_session_records_wait() {
        let dir = dir("fail");
        let path = dir.join("audit.jsonl");
        let mut w = Writer::open(&path, 1 << 20, 3, None);
        write_n(&mut w, 1);
        // The path becomes a directory: every open fails, as on a broken file system.
        fs::remove_file(&path).unwrap();
        fs::create_dir(&path).unwrap();
        for _ in 0..5 {
            w.queue(
                rec("decision", "s1"),
                Meta {
                    kernel: true,
                    base_lost: None,
                },
            );
        }
        w.queue(
            rec("session_end", "s1"),
            Meta {
                kernel: false,
                base_lost: Some(0),
            },
        );
        w.queue(rec("decision", "s2"), Meta::default());
        let f = w.flush(writer::Sync::Now);
        assert!(f.error.is_some());
        assert_eq!((f.lost, w.lost_total, w.lost_pending()), (6, 6, 6));
        fs::remove_dir(&path).unwrap();
        let f = w.flush(writer::Sync::Now);
        assert!(f.error.is_none(), "{:?}", f.error);
        let lines: Vec<Record> = fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let kinds: Vec<&str> = lines.iter().map(|r| r.kind.as_str()).collect();
        assert_eq!(kinds, ["log_continued", "lost", "session_end", "lost"]);
        assert_eq!((lines[1].count, lines[1].decisions), (Some(5), Some(5)));
        assert_eq!(
            lines[2].lost,
            Some(5),
            "session_end counts what the log lost"
        );
        assert_eq!(lines[3].session.as_deref(), Some("s2"));
        assert_eq!(w.lost_pending(), 0);
        let _ = fs::remove_dir_all(&dir);
    }
}
