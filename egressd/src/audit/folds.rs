//! Repeated decisions the kernel counted in `FOLDS`. The first occurrence of each key came through
//! the ring and is in the log already; what this reads are the repeats, written once per fold
//! window as one record with their exact count.
//!
//! What is already in the log is kept in `FOLD_REPORTED` (pinned like `FOLDS`), updated *before*
//! the record is queued: a daemon killed in between leaves a record unwritten, never written twice,
//! and the session's end finds the gap in the kernel's counters and writes it as `lost`. A
//! restarted daemon reads it back and goes on from there.

use std::{
    collections::{HashMap, HashSet},
    io,
    os::fd::{AsFd as _, AsRawFd as _},
};

use aya::maps::{HashMap as BpfHashMap, IterableMap as _, MapData, PerCpuHashMap};
use egressd_common::{Event, FoldKey, FoldValue};

use crate::{
    bpf_sys::{bpf, BatchAttr, BPF_MAP_LOOKUP_BATCH},
    enforcer::FoldMaps,
};

/// Keys read per BPF_MAP_LOOKUP_BATCH call.
const BATCH: usize = 1024;

/// Dates the kernel's repeats: `FoldValue::last_ns` is CLOCK_MONOTONIC_COARSE, the records' time
/// CLOCK_BOOTTIME. The two differ by the time spent suspended, so the last repeat of a window in
/// which the machine suspended, if it came before the suspend, is dated late by the time suspended
/// (and never later than the read).
struct RepeatClock {
    offset: u64,
    boot_now: u64,
}

impl RepeatClock {
    fn now() -> RepeatClock {
        use nix::time::{clock_gettime, ClockId};
        let ns = |c| {
            clock_gettime(c)
                .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
                .unwrap_or(0)
        };
        let mono = ns(ClockId::CLOCK_MONOTONIC);
        let boot_now = ns(ClockId::CLOCK_BOOTTIME);
        RepeatClock {
            offset: boot_now.saturating_sub(mono),
            boot_now,
        }
    }

    /// Never later than now: a value an older egressd wrote in boot time (before an upgrade) is
    /// dated now rather than in the future.
    fn boot_ns(&self, mono_ns: u64) -> u64 {
        mono_ns.saturating_add(self.offset).min(self.boot_now)
    }
}

/// Repeats of one key not yet in the log.
pub struct Repeats {
    /// The first occurrence's task fields, the key's destination and verdict, the latest repeat's
    /// time: what the record says.
    pub event: Event,
    pub count: u64,
}

pub struct KernelFolds {
    folds: PerCpuHashMap<MapData, FoldKey, FoldValue>,
    /// Possible CPUs: the number of values per key the kernel copies out.
    cpus: usize,
    /// `read_all`'s buffers, kept: allocating and freeing half a megabyte each window made the
    /// allocator raise its mmap threshold, and a flood's buffers then stayed resident.
    key_buf: Vec<FoldKey>,
    value_buf: Vec<FoldValue>,
    reported: BpfHashMap<MapData, FoldKey, u64>,
    /// `FOLD_REPORTED` as last written.
    written: HashMap<FoldKey, u64>,
    /// Keys whose first event has been taken from the ring (or that a previous daemon found):
    /// repeats of a key whose first event still waits in the ring are left for the next turn, so
    /// the first record comes first in the log.
    seen: HashSet<FoldKey>,
}

impl KernelFolds {
    pub fn new(maps: FoldMaps) -> KernelFolds {
        let written: HashMap<FoldKey, u64> = maps.reported.iter().filter_map(Result::ok).collect();
        // Keys a previous daemon left had their first event taken by it, or wait in the pinned
        // ring, which this daemon drains before it reads repeats.
        let seen = maps.folds.keys().filter_map(Result::ok).collect();
        let cpus = aya::util::nr_cpus().unwrap_or(1);
        KernelFolds {
            cpus,
            key_buf: vec![FoldKey::default(); BATCH],
            value_buf: vec![FoldValue::default(); BATCH * cpus],
            folds: maps.folds,
            reported: maps.reported,
            written,
            seen,
        }
    }

    /// The first event of a key was taken from the ring.
    pub fn first_taken(&mut self, key: FoldKey) {
        self.seen.insert(key);
    }

    /// The repeats counted since the last call, of one session or of all, marked as reported.
    /// Keys of processes that have exited, with nothing left to report, are removed: a new
    /// process of the session gets another tgid (pids wrap only after pid_max others).
    pub fn take(&mut self, session: Option<u64>) -> Vec<Repeats> {
        let entries = match self.read_all() {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!("audit: cannot read FOLDS: {e}; repeats wait for the next turn");
                return Vec::new();
            }
        };
        let mut out = Vec::new();
        let mut gone_tgids: HashMap<u32, bool> = HashMap::new();
        let clock = RepeatClock::now();
        for (key, values) in entries {
            if session.is_some_and(|s| key.session != s) || !self.seen.contains(&key) {
                continue;
            }
            let mut total = 0u64;
            let mut last_ns = 0u64;
            let mut first = FoldValue::default();
            for v in &values {
                total += v.count;
                last_ns = last_ns.max(v.last_ns);
                if v.pid_tgid != 0 || v.comm[0] != 0 {
                    first = *v;
                }
            }
            let before = self.written.get(&key).copied().unwrap_or(0);
            if total <= before {
                if session.is_none()
                    && *gone_tgids.entry(key.tgid).or_insert_with(|| gone(key.tgid))
                {
                    self.forget(&key);
                }
                continue;
            }
            if self.reported.insert(key, total, 0).is_err() {
                // Not recorded as reported: leave it for the next turn rather than risk writing
                // it twice after a restart.
                tracing::warn!(
                    "audit: cannot update FOLD_REPORTED; repeats wait for the next turn"
                );
                continue;
            }
            self.written.insert(key, total);
            out.push(Repeats {
                event: Event {
                    boot_ns: clock.boot_ns(last_ns),
                    session: key.session,
                    pid_tgid: first.pid_tgid,
                    uid_gid: first.uid_gid,
                    addr: key.addr,
                    port: key.port,
                    hook: key.hook,
                    verdict: key.verdict,
                    reason: key.reason,
                    proto: key.proto,
                    family: key.family,
                    flags: 0,
                    policy_gen: first.policy_gen,
                    comm: first.comm,
                    _pad2: [0; 4],
                },
                count: total - before,
            });
        }
        out.sort_by_key(|r| r.event.boot_ns);
        out
    }

    /// Every key with its per-CPU values, a few thousand per system call (BPF_MAP_LOOKUP_BATCH):
    /// read once per fold window, where a lookup per key would cost two system calls each.
    fn read_all(&mut self) -> io::Result<Vec<(FoldKey, Vec<FoldValue>)>> {
        let fd = self.folds.map().fd().as_fd().as_raw_fd();
        let (keys, values) = (&mut self.key_buf, &mut self.value_buf);
        // Hash maps take a bucket index as the batch token; room for more costs nothing.
        let (mut token_in, mut token_out) = ([0u64; 2], [0u64; 2]);
        let mut out = Vec::new();
        let mut first = true;
        loop {
            let mut attr = BatchAttr {
                in_batch: if first {
                    0
                } else {
                    token_in.as_mut_ptr() as u64
                },
                out_batch: token_out.as_mut_ptr() as u64,
                keys: keys.as_mut_ptr() as u64,
                values: values.as_mut_ptr() as u64,
                count: BATCH as u32,
                map_fd: fd as u32,
                ..Default::default()
            };
            // The buffers hold `count` keys and `count * cpus` values of the map's sizes (checked
            // at load: the map's key and value sizes are these types'), and live across the call.
            let err = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr).err();
            let n = attr.count as usize;
            for (i, key) in keys.iter().take(n).enumerate() {
                out.push((*key, values[i * self.cpus..(i + 1) * self.cpus].to_vec()));
            }
            match err {
                None => {}
                Some(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
                Some(e) => return Err(e),
            }
            token_in = token_out;
            first = false;
        }
    }

    /// Removes an ended session's keys, once `take` has written their last repeats.
    pub fn end_session(&mut self, session: u64) {
        let keys: Vec<FoldKey> = self
            .folds
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.session == session)
            .chain(
                self.written
                    .keys()
                    .filter(|k| k.session == session)
                    .copied(),
            )
            .collect();
        for key in keys {
            self.forget(&key);
        }
    }

    fn forget(&mut self, key: &FoldKey) {
        let _ = self.folds.remove(key);
        let _ = self.reported.remove(key);
        self.written.remove(key);
        self.seen.remove(key);
    }
}

/// The process has exited (the backstop's tgid 0 never is).
fn gone(tgid: u32) -> bool {
    tgid != 0 && !std::path::Path::new(&format!("/proc/{tgid}")).exists()
}
