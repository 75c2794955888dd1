//! DNS records folded the way the kernel folds decisions: a query that repeats one already in the
//! log (same session, process, protocol, name, type, verdict, reason, rcode and answers) within
//! `fold_window_ms` is counted, not written; the audit task writes the repeats once per window as
//! one record with their exact count (its `time` and `ttl` the latest repeat's). The first
//! occurrence is written at once, as before. An agent asking for one name in a loop costs the log
//! a line a second, and the resolver no audit record per query (a quarter of its CPU).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use egressd_common::audit::Record;

/// Names folded at once at most: past it, records are written one by one until a flush frees
/// room (it bounds the memory a stream of distinct names costs).
const MAX_KEYS: usize = 2048;

/// The asking task as the redirect recorded it: pid_tgid, uid_gid, comm, and the address and port
/// the query was sent to.
pub type Asker = (u64, u64, [u8; 16], [u8; 16], u16);

/// What makes two DNS queries the same decision: everything their records say but the time and
/// the TTL (which counts down in cached answers), as the resolver has it before it builds a record
/// (so a repeat costs no record).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct DnsKey {
    /// The asking socket's session cgroup (0: unknown), and whether egressd knows the session
    /// (a cgroup id is never reused, so it names the session).
    pub session: (u64, bool),
    pub task: Option<Asker>,
    pub proto: u8,
    pub verdict: &'static str,
    pub reason: String,
    pub qname: Option<String>,
    pub qtype: Option<String>,
    pub rcode: u16,
    pub answers: Vec<String>,
}

/// Shared by the resolver (which admits each query) and the audit task (which writes the
/// repeats).
#[derive(Clone)]
pub struct DnsFolds(Arc<Inner>);

struct Inner {
    window: Duration,
    slots: Mutex<HashMap<DnsKey, Slot>>,
}

struct Slot {
    /// The first occurrence, as written.
    first: Record,
    repeats: u64,
    latest: SystemTime,
    latest_ttl: Option<u32>,
    since: Instant,
}

impl DnsFolds {
    /// `window` zero: folding off, every query is a record of its own.
    pub fn new(window: Duration) -> DnsFolds {
        DnsFolds(Arc::new(Inner {
            window,
            slots: Mutex::new(HashMap::new()),
        }))
    }

    /// The record to write now (a first occurrence, or one that cannot be held), built by
    /// `record`; or None for a repeat, counted here until the audit task takes it.
    pub fn admit(
        &self,
        key: DnsKey,
        ttl: Option<u32>,
        record: impl FnOnce(DnsKey) -> Record,
    ) -> Option<Record> {
        let inner = &self.0;
        if inner.window.is_zero() {
            return Some(record(key));
        }
        let Ok(mut slots) = inner.slots.lock() else {
            return Some(record(key));
        };
        if let Some(s) = slots.get_mut(&key) {
            s.repeats += 1;
            s.latest = SystemTime::now();
            s.latest_ttl = ttl;
            return None;
        }
        if slots.len() >= MAX_KEYS {
            drop(slots);
            return Some(record(key));
        }
        let rec = record(key.clone());
        slots.insert(
            key,
            Slot {
                first: rec.clone(),
                repeats: 0,
                latest: SystemTime::now(),
                latest_ttl: ttl,
                since: Instant::now(),
            },
        );
        Some(rec)
    }

    /// No query held.
    pub fn is_empty(&self) -> bool {
        self.0.slots.lock().map_or(true, |s| s.is_empty())
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
        let mut taken: Vec<Slot> = slots
            .extract_if(|_, s| {
                all || s.since.elapsed() >= window
                    || (session.is_some() && s.first.session.as_deref() == session)
            })
            .map(|(_, s)| s)
            .collect();
        drop(slots);
        taken.sort_by_key(|s| s.since);
        taken
            .into_iter()
            .filter(|s| s.repeats > 0)
            .map(|s| Record {
                time: humantime::format_rfc3339_nanos(s.latest).to_string(),
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

    fn key(session: u64, pid: u64, name: &str, answer: &str) -> DnsKey {
        DnsKey {
            session: (session, true),
            task: Some((pid, 65534, [0; 16], [0; 16], 53)),
            proto: 17,
            verdict: "allowed",
            reason: "dns_allow".into(),
            qname: Some(name.into()),
            qtype: Some("A".into()),
            rcode: 0,
            answers: vec![answer.into()],
        }
    }

    /// The record the resolver would build for `k`.
    fn record(k: DnsKey) -> Record {
        Record {
            time: "first".into(),
            kind: "dns".into(),
            session: Some(format!("s{}", k.session.0)),
            pid: k.task.map(|t| t.0 as u32),
            qname: k.qname,
            answers: Some(k.answers),
            ..Default::default()
        }
    }

    fn ask(f: &DnsFolds, k: DnsKey, ttl: u32) -> Option<Record> {
        f.admit(k, Some(ttl), record)
    }

    #[test]
    fn repeats_within_the_window_are_one_record_with_their_count() {
        let f = DnsFolds::new(Duration::from_secs(3600));
        let first = ask(&f, key(1, 7, "a.test", "198.18.0.9"), 60).unwrap();
        assert_eq!((first.time.as_str(), first.count), ("first", None));
        let before = SystemTime::now();
        for ttl in [59, 58, 57] {
            assert!(ask(&f, key(1, 7, "a.test", "198.18.0.9"), ttl).is_none());
        }
        // Another process, name, session or answer is a decision of its own.
        assert!(ask(&f, key(1, 8, "a.test", "198.18.0.9"), 60).is_some());
        assert!(ask(&f, key(1, 7, "b.test", "198.18.0.9"), 60).is_some());
        assert!(ask(&f, key(2, 7, "a.test", "198.18.0.9"), 60).is_some());
        assert!(ask(&f, key(1, 7, "a.test", "198.18.0.10"), 60).is_some());
        // Nothing is due before its window ends.
        assert!(f.take(false, None).is_empty());
        // A session's keys are taken when it ends, each with the repeats' count.
        assert!(
            f.take(false, Some("s2")).is_empty(),
            "s2's key had no repeats"
        );
        let all = f.take(true, None);
        assert_eq!(all.len(), 1, "only a.test of pid 7 repeated");
        let r = &all[0];
        assert_eq!(r.count, Some(3));
        assert_eq!(r.ttl, Some(57), "the latest repeat's");
        let time: SystemTime = humantime::parse_rfc3339(&r.time).unwrap();
        assert!(time >= before, "the latest repeat's time: {}", r.time);
        assert_eq!((r.pid, r.qname.as_deref()), (Some(7), Some("a.test")));
        // Taken keys are forgotten: the next occurrence is written at once again.
        assert!(f.take(true, None).is_empty());
        assert!(ask(&f, key(1, 7, "a.test", "198.18.0.9"), 50).is_some());
    }

    #[test]
    fn keys_whose_window_passed_are_taken_and_a_zero_window_folds_nothing() {
        let f = DnsFolds::new(Duration::from_millis(20));
        ask(&f, key(1, 7, "a.test", "x"), 60).unwrap();
        assert!(ask(&f, key(1, 7, "a.test", "x"), 60).is_none());
        std::thread::sleep(Duration::from_millis(30));
        let due = f.take(false, None);
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].count, Some(1));

        let off = DnsFolds::new(Duration::ZERO);
        for _ in 0..3 {
            assert!(ask(&off, key(1, 7, "a.test", "x"), 60).is_some());
        }
        assert!(off.take(true, None).is_empty());
    }

    #[test]
    fn past_the_bound_every_new_name_is_written() {
        let f = DnsFolds::new(Duration::from_secs(3600));
        for i in 0..MAX_KEYS {
            assert!(ask(&f, key(1, 7, &format!("n{i}.test"), "x"), 60).is_some());
        }
        assert!(ask(&f, key(1, 7, "extra.test", "x"), 60).is_some());
        assert!(
            ask(&f, key(1, 7, "extra.test", "x"), 60).is_some(),
            "not held: written again"
        );
        assert!(ask(&f, key(1, 7, "n0.test", "x"), 60).is_none());
    }
}
