//! The audit pipeline: drains the kernel's ring buffer on its own task, folds repeated identical
//! decisions, and appends hash-chained JSON lines to the log, rotating by size. Events the kernel
//! could not queue (ring full) are counted per session in the kernel and written as `lost` records,
//! so written + lost = offered, exactly.

use std::{
    collections::HashMap,
    fs,
    io::{self, BufWriter, Write as _},
    net::{Ipv4Addr, Ipv6Addr},
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use aya::maps::{MapData, RingBuf};
use egressd_common::{
    audit::{head_of, line_hash, ChainHead, Record},
    Counters, Event, UnixEvent, HOOK_BIND4, HOOK_BIND6, HOOK_CONNECT4, HOOK_CONNECT6,
    HOOK_CONNECT_UNIX, HOOK_LSM_SOCKET_CREATE, HOOK_SENDMSG4, HOOK_SENDMSG6, HOOK_SENDMSG_UNIX,
    HOOK_SKB_EGRESS, HOOK_SOCK_CREATE, REASON_ALLOW_RULE, REASON_BIND, REASON_DEFAULT_DENY,
    REASON_DNS_ANSWER, REASON_DNS_REDIRECT, REASON_FAMILY, REASON_FORBIDDEN_SOCKET,
    REASON_LOOPBACK, REASON_LOOPBACK_PORT, REASON_OFF_LOOPBACK, REASON_UNIX_UNVETTED,
    VERDICT_ALLOWED, VERDICT_AUDIT_DENIED, VERDICT_REDIRECTED,
};
use tokio::sync::mpsc;

use crate::{enforcer::Handle, sessions::Session};

/// Appends records to the log with the hash chain, rotating by size.
pub struct Writer {
    path: PathBuf,
    gid: Option<u32>,
    file: BufWriter<fs::File>,
    size: u64,
    head: ChainHead,
    max_bytes: u64,
    keep: u32,
}

fn open_log(path: &Path, gid: Option<u32>) -> io::Result<fs::File> {
    let f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)?;
    f.set_permissions(fs::Permissions::from_mode(0o640))?;
    if let Some(gid) = gid {
        std::os::unix::fs::fchown(&f, Some(0), Some(gid))?;
    }
    Ok(f)
}

fn rotated(path: &Path, n: u32) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(format!(".{n}"));
    PathBuf::from(p)
}

impl Writer {
    /// Opens the log and finds where its chain ends (in the current file, or the newest rotated
    /// one), so a restarted daemon continues the chain.
    pub fn open(path: &Path, max_bytes: u64, keep: u32, gid: Option<u32>) -> io::Result<Writer> {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        let mut head = None;
        for candidate in [path.to_owned(), rotated(path, 1)] {
            if let Ok(text) = fs::read(&candidate) {
                match head_of(&text) {
                    Ok(h @ Some(_)) => {
                        head = h;
                        break;
                    }
                    Ok(None) => continue,
                    Err(e) => {
                        // A torn last line (crash mid-write): continue after it; `verify` will
                        // point at it, which is the truth.
                        tracing::warn!(
                            "{}: {e}; the chain continues after it",
                            candidate.display()
                        );
                        let last = text
                            .split(|b| *b == b'\n')
                            .rev()
                            .find(|l| !l.is_empty())
                            .unwrap_or(&[]);
                        head = Some(ChainHead {
                            seq: 0,
                            hash: line_hash(last),
                        });
                        break;
                    }
                }
            }
        }
        let file = open_log(path, gid)?;
        let size = file.metadata()?.len();
        if size > 0 && !fs::read(path)?.ends_with(b"\n") {
            // Never glue a new record onto a torn line.
            file.try_clone()?.write_all(b"\n")?;
        }
        Ok(Writer {
            path: path.to_owned(),
            gid,
            file: BufWriter::new(file),
            size,
            head: head.unwrap_or_else(ChainHead::genesis),
            max_bytes,
            keep: keep.max(1),
        })
    }

    /// Appends one record and returns the line as written (without its newline).
    pub fn append(&mut self, mut rec: Record) -> io::Result<Vec<u8>> {
        rec.seq = self.head.seq + 1;
        rec.prev = std::mem::take(&mut self.head.hash);
        let line = serde_json::to_vec(&rec).map_err(io::Error::other)?;
        self.head = ChainHead {
            seq: rec.seq,
            hash: line_hash(&line),
        };
        self.file.write_all(&line)?;
        self.file.write_all(b"\n")?;
        self.size += line.len() as u64 + 1;
        if self.size >= self.max_bytes {
            self.rotate()?;
        }
        Ok(line)
    }

    /// Pushes buffered lines to the file and to disk: what a crash can lose is what came after.
    pub fn flush(&mut self) -> io::Result<()> {
        self.file.flush()?;
        self.file.get_ref().sync_data()
    }

    fn rotate(&mut self) -> io::Result<()> {
        self.flush()?;
        for n in (1..self.keep).rev() {
            let from = rotated(&self.path, n);
            if from.exists() {
                fs::rename(&from, rotated(&self.path, n + 1))?;
            }
        }
        fs::rename(&self.path, rotated(&self.path, 1))?;
        self.file = BufWriter::new(open_log(&self.path, self.gid)?);
        self.size = 0;
        Ok(())
    }
}

pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_nanos(SystemTime::now()).to_string()
}

/// What other tasks tell the audit task.
pub enum Message {
    /// A session, the hash of the policy in force, `true` when adopted after a restart, and the
    /// enforcement layers in force.
    SessionStart(Session, String, bool, Vec<String>),
    SessionEnd(Session, Counters),
    Note(String),
    /// A record made elsewhere (the DNS resolver's); time, seq and chain are filled in here.
    Record(Box<Record>),
    /// Write everything pending and confirm (daemon shutdown).
    Flush(tokio::sync::oneshot::Sender<()>),
}

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

/// A copy of every record to syslog (RFC 5424 over the local datagram socket, which journald also
/// serves), so fleets can ship the log with what they already run. The file stays the record of
/// truth: a syslog failure is reported once and never stops the file.
pub struct Syslog {
    sock: std::os::unix::net::UnixDatagram,
    path: PathBuf,
    host: String,
    warned: bool,
}

impl Syslog {
    pub fn new(path: &Path) -> io::Result<Syslog> {
        let sock = std::os::unix::net::UnixDatagram::unbound()?;
        sock.set_nonblocking(true)?;
        let host = nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "-".into());
        Ok(Syslog {
            sock,
            path: path.to_owned(),
            host,
            warned: false,
        })
    }

    fn send(&mut self, rec_kind: &str, denied: bool, line: &[u8]) {
        // Facility 13 (log audit); warning for denials, info otherwise.
        let pri = 13 * 8 + if denied { 4 } else { 6 };
        let mut msg = format!(
            "<{pri}>1 {} {} egressd {} {rec_kind} - ",
            now_rfc3339(),
            self.host,
            std::process::id()
        )
        .into_bytes();
        msg.extend_from_slice(line);
        if let Err(e) = self.sock.send_to(&msg, &self.path) {
            if !self.warned {
                tracing::warn!(
                    "audit: syslog copy to {} failed: {e} (the audit file is unaffected)",
                    self.path.display()
                );
                self.warned = true;
            }
        }
    }
}

#[derive(Hash, PartialEq, Eq, Clone)]
struct FoldKey {
    session: u64,
    tgid: u32,
    hook: u8,
    verdict: u8,
    reason: u8,
    proto: u8,
    addr: [u8; 16],
    port: u16,
}

struct Pending {
    record: Record,
    first: Instant,
}

struct Live {
    id: String,
    lost_reported: u64,
}

struct Pipeline {
    writer: Writer,
    syslog: Option<Syslog>,
    enforcer: Handle,
    hashes: PolicyHashes,
    names: SessionNames,
    tuning: Tuning,
    sessions: HashMap<u64, Live>,
    folds: HashMap<FoldKey, Pending>,
    exe_cache: HashMap<u32, Option<String>>,
    /// CLOCK_REALTIME - CLOCK_BOOTTIME, to turn kernel timestamps into wall time.
    boot_offset_ns: i128,
}

/// Runs the pipeline until the channel closes.
pub struct Shared {
    pub hashes: PolicyHashes,
    pub names: SessionNames,
    pub syslog: Option<Syslog>,
}

pub async fn run(
    ring: RingBuf<MapData>,
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
    let mut p = Pipeline {
        writer,
        syslog: shared.syslog,
        enforcer,
        hashes: shared.hashes,
        names: shared.names,
        tuning,
        sessions: HashMap::new(),
        folds: HashMap::new(),
        exe_cache: HashMap::new(),
        boot_offset_ns: boot_offset_ns(),
    };
    // The kernel does not wake us per event; this tick bounds how long an event waits.
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                if let Ok(mut guard) = guard {
                    p.drain(guard.get_inner_mut());
                    guard.clear_ready();
                }
            }
            _ = tick.tick() => {
                p.drain(ring.get_mut());
                p.flush_folds(false, None);
                p.report_lost().await;
                p.flush();
            }
            msg = rx.recv() => {
                let Some(msg) = msg else { break };
                // DNS records come one per query: they are written now and synced with the next
                // tick's batch, so a query never waits for the disk.
                let sync_now = !matches!(msg, Message::Record(_));
                p.drain(ring.get_mut());
                p.handle(msg).await;
                if sync_now {
                    p.flush();
                }
            }
        }
    }
    p.drain(ring.get_mut());
    p.flush_folds(true, None);
    p.flush();
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
        let kind = rec.kind.clone();
        let denied = rec.verdict.as_deref() == Some("denied") || rec.kind == "lost";
        match self.writer.append(rec) {
            Ok(line) => {
                if let Some(syslog) = &mut self.syslog {
                    syslog.send(&kind, denied, &line);
                }
            }
            Err(e) => tracing::error!("audit: writing {}: {e}", self.writer.path.display()),
        }
    }

    fn flush(&mut self) {
        // fdatasync blocks: let the runtime move the resolver and control tasks off this worker.
        if let Err(e) = tokio::task::block_in_place(|| self.writer.flush()) {
            tracing::error!("audit: flushing {}: {e}", self.writer.path.display());
        }
    }

    fn drain(&mut self, ring: &mut RingBuf<MapData>) {
        self.boot_offset_ns = boot_offset_ns();
        while let Some(item) = ring.next() {
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
        if self.folds.len() > 10_000 {
            self.flush_folds(true, None);
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
        self.write(rec);
    }

    fn fold(&mut self, ev: Event) {
        let key = FoldKey {
            session: ev.session,
            tgid: (ev.pid_tgid >> 32) as u32,
            hook: ev.hook,
            verdict: ev.verdict,
            reason: ev.reason,
            proto: ev.proto,
            addr: ev.addr,
            port: ev.port,
        };
        if !self.tuning.fold_window.is_zero() {
            if let Some(p) = self.folds.get_mut(&key) {
                *p.record.count.get_or_insert(1) += 1;
                return;
            }
        }
        let record = self.decision(&ev);
        if self.tuning.fold_window.is_zero() {
            self.write(record);
        } else {
            self.folds.insert(
                key,
                Pending {
                    record,
                    first: Instant::now(),
                },
            );
        }
    }

    /// Writes folded records whose window has passed (or all, or all of one session), oldest first.
    fn flush_folds(&mut self, all: bool, session: Option<u64>) {
        let window = self.tuning.fold_window;
        let mut due: Vec<FoldKey> = self
            .folds
            .iter()
            .filter(|(k, p)| all || session == Some(k.session) || p.first.elapsed() >= window)
            .map(|(k, _)| k.clone())
            .collect();
        due.sort_by(|a, b| self.folds[a].record.time.cmp(&self.folds[b].record.time));
        for k in due {
            if let Some(p) = self.folds.remove(&k) {
                self.write(p.record);
            }
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
                self.lost_record(id, c.events_lost);
            }
        }
    }

    fn lost_record(&mut self, cgroup_id: u64, total_lost: u64) {
        let Some(live) = self.sessions.get_mut(&cgroup_id) else {
            return;
        };
        if total_lost <= live.lost_reported {
            return;
        }
        let delta = total_lost - live.lost_reported;
        live.lost_reported = total_lost;
        let session = live.id.clone();
        tracing::warn!(%session, lost = delta, "audit: the kernel's ring buffer was full; events lost (counted)");
        self.write(Record {
            time: now_rfc3339(),
            kind: "lost".into(),
            session: Some(session),
            count: Some(delta),
            message: Some("ring buffer full: these decisions were taken and counted, but not recorded one by one".into()),
            ..Default::default()
        });
    }

    async fn handle(&mut self, msg: Message) {
        match msg {
            Message::SessionStart(s, policy, adopted, layers) => {
                self.sessions.insert(
                    s.cgroup_id,
                    Live {
                        id: s.id.clone(),
                        lost_reported: 0,
                    },
                );
                // Said plainly where the unix layer is missing: a reader of the log must not take
                // "cgroup" alone for a session that could not reach tmux or the session bus.
                let notes: Vec<&str> = [
                    adopted.then_some("adopted by a restarted egressd"),
                    (!layers.iter().any(|l| l == "unix")).then_some(
                        "unix layer not in force: this session's unix sockets could reach servers outside it (egressctl doctor says why)",
                    ),
                ]
                .into_iter()
                .flatten()
                .collect();
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
            Message::SessionEnd(s, totals) => {
                self.flush_folds(false, Some(s.cgroup_id));
                self.lost_record(s.cgroup_id, totals.events_lost);
                self.sessions.remove(&s.cgroup_id);
                if let Ok(mut n) = self.names.lock() {
                    n.remove(&s.cgroup_id);
                }
                self.write(Record {
                    time: now_rfc3339(),
                    kind: "session_end".into(),
                    session: Some(s.id),
                    uid: Some(s.uid),
                    profile: Some(s.profile),
                    allowed: Some(totals.allowed),
                    denied: Some(totals.denied + totals.sockets_refused + totals.backstop_dropped),
                    lost: Some(totals.events_lost),
                    duration_s: Some(crate::sessions::now_secs().saturating_sub(s.started)),
                    ..Default::default()
                });
            }
            Message::Flush(done) => {
                self.flush_folds(true, None);
                let ids: Vec<u64> = self.sessions.keys().copied().collect();
                for id in ids {
                    if let Ok(c) = self.enforcer.counters(id).await {
                        self.lost_record(id, c.events_lost);
                    }
                }
                self.flush();
                let _ = done.send(());
            }
            Message::Record(rec) => self.write(*rec),
            Message::Note(message) => self.write(Record {
                time: now_rfc3339(),
                kind: "daemon".into(),
                message: Some(message),
                ..Default::default()
            }),
        }
    }
}

fn comm(raw: &[u8; 16]) -> String {
    let end = raw.iter().position(|b| *b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

fn hook_name(h: u8) -> &'static str {
    match h {
        HOOK_CONNECT4 => "connect4",
        HOOK_CONNECT6 => "connect6",
        HOOK_SENDMSG4 => "sendmsg4",
        HOOK_SENDMSG6 => "sendmsg6",
        HOOK_SOCK_CREATE => "sock_create",
        HOOK_SKB_EGRESS => "skb_egress",
        HOOK_LSM_SOCKET_CREATE => "lsm_socket_create",
        HOOK_BIND4 => "bind4",
        HOOK_BIND6 => "bind6",
        HOOK_CONNECT_UNIX => "connect_unix",
        HOOK_SENDMSG_UNIX => "sendmsg_unix",
        _ => "unknown",
    }
}

fn reason_name(r: u8) -> &'static str {
    match r {
        REASON_LOOPBACK => "loopback",
        REASON_ALLOW_RULE => "allow rule",
        REASON_DEFAULT_DENY => "default deny",
        REASON_LOOPBACK_PORT => "loopback port not allowed",
        REASON_FORBIDDEN_SOCKET => "raw or ping socket",
        REASON_OFF_LOOPBACK => "loopback address off the lo device",
        REASON_DNS_REDIRECT => "dns query, answered by egressd's resolver",
        REASON_DNS_ANSWER => "address of an allowed name (dns_allow)",
        REASON_BIND => "bind to a non-loopback address",
        REASON_UNIX_UNVETTED => {
            "unix socket used without egressd's supervisor (io_uring, sendto with a unix address)"
        }
        _ => "unknown",
    }
}

fn proto_name(p: u8) -> String {
    match p {
        6 => "tcp".into(),
        17 => "udp".into(),
        1 => "icmp".into(),
        58 => "icmpv6".into(),
        n => format!("ip-proto-{n}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use egressd_common::audit::verify;

    fn rec(kind: &str) -> Record {
        Record {
            time: now_rfc3339(),
            kind: kind.into(),
            ..Default::default()
        }
    }

    fn lines(path: &Path) -> Vec<String> {
        fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(String::from)
            .collect()
    }

    fn check(files: &[PathBuf]) -> Result<u64, String> {
        let readers = files.iter().map(|f| {
            (
                f.display().to_string(),
                io::BufReader::new(fs::File::open(f).unwrap()),
            )
        });
        verify(readers)
            .map(|(n, _)| n)
            .map_err(|b| format!("{}:{}: {}", b.file, b.line, b.reason))
    }

    #[test]
    fn chain_verifies_and_continues_across_reopen_and_rotation() {
        let dir = std::env::temp_dir().join(format!("egressd-audit-unit-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let path = dir.join("audit.jsonl");
        let mut w = Writer::open(&path, 600, 3, None).unwrap();
        for _ in 0..3 {
            w.append(rec("decision")).unwrap();
        }
        w.flush().unwrap();
        drop(w);
        let mut w = Writer::open(&path, 600, 3, None).unwrap();
        for _ in 0..3 {
            w.append(rec("decision")).unwrap();
        }
        w.flush().unwrap();
        assert!(rotated(&path, 1).exists(), "600 bytes should have rotated");
        let mut files: Vec<PathBuf> = (1..=3)
            .rev()
            .map(|n| rotated(&path, n))
            .filter(|p| p.exists())
            .collect();
        files.push(path.clone());
        assert_eq!(check(&files), Ok(6));

        // Edit, delete, reorder: each is caught, at the line after the damage.
        let current = lines(&path);
        if current.len() >= 2 {
            let mut edited = current.clone();
            edited[0] = edited[0].replace("decision", "decisioN");
            fs::write(&path, edited.join("\n") + "\n").unwrap();
            assert!(check(&files).is_err());
        }
        let _ = fs::remove_dir_all(&dir);
    }
}
