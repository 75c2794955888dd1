//! Repeated decisions the kernel counted in `FOLDS`. The first occurrence of each key came through
//! the ring and is in the log already; what this reads are the repeats, written once per fold
//! window as one record with their exact count.
//!
//! What is already in the log is kept in `FOLD_REPORTED` (pinned like `FOLDS`), updated *before*
//! the record is queued: a daemon killed in between leaves a record unwritten, never written twice,
//! and the session's end finds the gap in the kernel's counters and writes it as `lost`. A
//! restarted daemon reads it back and goes on from there.

use std::collections::{HashMap, HashSet};

use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuHashMap};
use egressd_common::{Event, FoldKey, FoldValue};

use crate::enforcer::FoldMaps;

/// Repeats of one key not yet in the log.
pub struct Repeats {
    /// The first occurrence's task fields, the key's destination and verdict, the latest repeat's
    /// time: what the record says.
    pub event: Event,
    pub count: u64,
}

pub struct KernelFolds {
    folds: PerCpuHashMap<MapData, FoldKey, FoldValue>,
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
        KernelFolds {
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
        let keys: Vec<FoldKey> = self
            .folds
            .keys()
            .filter_map(Result::ok)
            .filter(|k| session.is_none_or(|s| k.session == s))
            .collect();
        let mut out = Vec::new();
        for key in keys {
            if !self.seen.contains(&key) {
                continue;
            }
            let Ok(values) = self.folds.get(&key, 0) else {
                continue;
            };
            let mut total = 0u64;
            let mut last_ns = 0u64;
            let mut first = FoldValue::default();
            for v in values.iter() {
                total += v.count;
                last_ns = last_ns.max(v.last_ns);
                if v.pid_tgid != 0 || v.comm[0] != 0 {
                    first = *v;
                }
            }
            let before = self.written.get(&key).copied().unwrap_or(0);
            if total <= before {
                if session.is_none() && gone(key.tgid) {
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
                    boot_ns: last_ns,
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
