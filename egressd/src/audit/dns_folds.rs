//! DNS records folded the way the kernel folds decisions: a query that repeats one already in the
//! log (same session, process, protocol, name, type, verdict, reason, rcode and answers) within
//! `fold_window_ms` is counted, not written; the audit task writes the repeats once per window as
//! one record with their exact count (its `time` and `ttl` the latest repeat's). The first
//! occurrence is written at once, as before. An agent asking for one name in a loop costs the log
//! a line a second, and the resolver no audit record per query (a quarter of its CPU).

use std::{
    collections::HashMap,
    hash::BuildHasher as _,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use egressd_common::audit::Record;

/// Names folded at once at most: past it, records are written one by one until a flush frees
/// room (it bounds the memory a stream of distinct names costs).
const MAX_KEYS: usize = 2048;

/// Shared by the resolver (which admits each record) and the audit task (which writes the
/// repeats).
#[derive(Clone)]
pub struct DnsFolds(Arc<Inner>);

struct Inner {
    window: Duration,
    hasher: std::collections::hash_map::RandomState,
    slots: Mutex<HashMap<u64, Slot>>,
}

struct Slot {
    /// The first occurrence, as written.
    first: Record,
    repeats: u64,
    latest_time: String,
    latest_ttl: Option<u32>,
    since: Instant,
}

/// What makes two DNS records the same decision: every field the resolver sets but the time and
/// the TTL (which counts down in cached answers).
#[allow(clippy::type_complexity)]
fn identity(
    r: &Record,
) -> (
    (
        &str,
        &Option<String>,
        Option<u32>,
        Option<u32>,
        Option<u32>,
        &Option<String>,
    ),
    (
        &Option<String>,
        &Option<String>,
        Option<u16>,
        &Option<String>,
        &Option<String>,
    ),
    (
        &Option<String>,
        &Option<String>,
        &Option<String>,
        &Option<Vec<String>>,
    ),
) {
    (
        (&r.kind, &r.session, r.pid, r.tgid, r.uid, &r.comm),
        (&r.protocol, &r.dest, r.port, &r.verdict, &r.reason),
        (&r.qname, &r.qtype, &r.rcode, &r.answers),
    )
}

impl DnsFolds {
    /// `window` zero: folding off, every query is a record of its own.
    pub fn new(window: Duration) -> DnsFolds {
        DnsFolds(Arc::new(Inner {
            window,
            hasher: Default::default(),
            slots: Mutex::new(HashMap::new()),
        }))
    }

    /// The record to write now (a first occurrence, or one that cannot be folded), or None for a
    /// repeat, counted here until the audit task takes it.
    pub fn admit(&self, rec: Record) -> Option<Record> {
        let inner = &self.0;
        if inner.window.is_zero() {
            return Some(rec);
        }
        let key = inner.hasher.hash_one(identity(&rec));
        let Ok(mut slots) = inner.slots.lock() else {
            return Some(rec);
        };
        let full = slots.len() >= MAX_KEYS;
        match slots.get_mut(&key) {
            Some(s) if identity(&s.first) == identity(&rec) => {
                s.repeats += 1;
                s.latest_time = rec.time;
                s.latest_ttl = rec.ttl;
                None
            }
            // Another record with the same hash: written on its own.
            Some(_) => Some(rec),
            None if full => Some(rec),
            None => {
                slots.insert(
                    key,
                    Slot {
                        first: rec.clone(),
                        repeats: 0,
                        latest_time: rec.time.clone(),
                        latest_ttl: rec.ttl,
                        since: Instant::now(),
                    },
                );
                Some(rec)
            }
        }
    }

    /// The repeats to write, oldest key first, each as one record with its `count`: of the keys
    /// whose window has passed, or of every key (`all`), or of every key of one `session`. The
    /// keys taken are forgotten, so the next occurrence is written at once.
    pub fn take(&self, all: bool, session: Option<&str>) -> Vec<Record> {
        let window = self.0.window;
        let Ok(mut slots) = self.0.slots.lock() else {
            return Vec::new();
        };
        if slots.is_empty() {
            return Vec::new();
        }
        let due: Vec<u64> = slots
            .iter()
            .filter(|(_, s)| {
                all || s.since.elapsed() >= window
                    || (session.is_some() && s.first.session.as_deref() == session)
            })
            .map(|(k, _)| *k)
            .collect();
        let mut taken: Vec<Slot> = due.iter().filter_map(|k| slots.remove(k)).collect();
        drop(slots);
        taken.sort_by_key(|s| s.since);
        taken
            .into_iter()
            .filter(|s| s.repeats > 0)
            .map(|s| Record {
                time: s.latest_time,
                ttl: s.latest_ttl,
                count: Some(s.repeats),
                ..s.first
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(session: &str, pid: u32, name: &str, time: &str, ttl: u32) -> Record {
        Record {
            time: time.into(),
            kind: "dns".into(),
            session: Some(session.into()),
            pid: Some(pid),
            qname: Some(name.into()),
            qtype: Some("A".into()),
            verdict: Some("allowed".into()),
            reason: Some("dns_allow".into()),
            rcode: Some("No Error".into()),
            answers: Some(vec!["198.18.0.9".into()]),
            ttl: Some(ttl),
            ..Default::default()
        }
    }

    #[test]
    fn repeats_within_the_window_are_one_record_with_their_count() {
        let f = DnsFolds::new(Duration::from_secs(3600));
        let first = f.admit(query("s1", 7, "a.test", "t1", 60)).unwrap();
        assert_eq!((first.time.as_str(), first.count), ("t1", None));
        for (t, ttl) in [("t2", 59), ("t3", 58), ("t4", 57)] {
            assert!(f.admit(query("s1", 7, "a.test", t, ttl)).is_none());
        }
        // Another process, name, session or answer is a decision of its own.
        assert!(f.admit(query("s1", 8, "a.test", "t5", 60)).is_some());
        assert!(f.admit(query("s1", 7, "b.test", "t5", 60)).is_some());
        assert!(f.admit(query("s2", 7, "a.test", "t5", 60)).is_some());
        let mut other = query("s1", 7, "a.test", "t5", 60);
        other.answers = Some(vec!["198.18.0.10".into()]);
        assert!(f.admit(other).is_some());
        // Nothing is due before its window ends.
        assert!(f.take(false, None).is_empty());
        // A session's keys are taken when it ends, each with the repeats' count.
        let s2 = f.take(false, Some("s2"));
        assert!(s2.is_empty(), "s2's only key had no repeats");
        let all = f.take(true, None);
        assert_eq!(all.len(), 1, "only a.test of pid 7 repeated");
        let r = &all[0];
        assert_eq!(r.count, Some(3));
        assert_eq!((r.time.as_str(), r.ttl), ("t4", Some(57)));
        assert_eq!((r.pid, r.qname.as_deref()), (Some(7), Some("a.test")));
        // Taken keys are forgotten: the next occurrence is written at once again.
        assert!(f.take(true, None).is_empty());
        assert!(f.admit(query("s1", 7, "a.test", "t6", 50)).is_some());
    }

    #[test]
    fn keys_whose_window_passed_are_taken_and_a_zero_window_folds_nothing() {
        let f = DnsFolds::new(Duration::from_millis(20));
        f.admit(query("s1", 7, "a.test", "t1", 60)).unwrap();
        assert!(f.admit(query("s1", 7, "a.test", "t2", 60)).is_none());
        std::thread::sleep(Duration::from_millis(30));
        let due = f.take(false, None);
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].count, Some(1));

        let off = DnsFolds::new(Duration::ZERO);
        for t in ["t1", "t2", "t3"] {
            assert!(off.admit(query("s1", 7, "a.test", t, 60)).is_some());
        }
        assert!(off.take(true, None).is_empty());
    }

    #[test]
    fn past_the_bound_every_new_name_is_written() {
        let f = DnsFolds::new(Duration::from_secs(3600));
        for i in 0..MAX_KEYS {
            assert!(f
                .admit(query("s1", 7, &format!("n{i}.test"), "t", 60))
                .is_some());
        }
        let extra = "extra.test";
        assert!(f.admit(query("s1", 7, extra, "t", 60)).is_some());
        assert!(
            f.admit(query("s1", 7, extra, "t", 60)).is_some(),
            "not held: written again"
        );
        assert!(f.admit(query("s1", 7, "n0.test", "t", 60)).is_none());
    }
}
