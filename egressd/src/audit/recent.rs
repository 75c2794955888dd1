//! The most recent denials, for a person watching (`egressctl top`, notices): the audit task adds
//! each denial as it queues its record; the control task hands them out by id, and the notices task
//! is woken for them (rather than polling, which would cost an idle daemon wakeups).

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
};

use egressd_common::{audit::Record, protocol::Denial};

/// Denials kept: enough for a screen refreshed four times a second under a flood.
const KEEP: usize = 1024;

#[derive(Clone, Default)]
pub struct RecentDenials(Arc<Shared>);

#[derive(Default)]
struct Shared {
    recent: Mutex<Recent>,
    added: tokio::sync::Notify,
}

#[derive(Default)]
struct Recent {
    next: u64,
    items: VecDeque<Denial>,
}

impl RecentDenials {
    /// Keeps `rec` if it is a denial (or an audit-mode "would deny").
    pub fn note(&self, rec: &Record) {
        let Some(mut d) = denial_of(rec) else {
            return;
        };
        {
            let Ok(mut r) = self.0.recent.lock() else {
                return;
            };
            r.next += 1;
            d.id = r.next;
            if r.items.len() == KEEP {
                r.items.pop_front();
            }
            r.items.push_back(d);
        }
        // One waiter (the notices task); a wakeup given while it is busy is kept for its next wait.
        self.0.added.notify_one();
    }

    /// Returns once a denial has been added since the last return (at once if one was added
    /// meanwhile).
    pub async fn added(&self) {
        self.0.added.notified().await;
    }

    /// Those after `after` whose session `visible` accepts, oldest first.
    pub fn after(&self, after: u64, visible: impl Fn(&str) -> bool) -> Vec<Denial> {
        let Ok(r) = self.0.recent.lock() else {
            return Vec::new();
        };
        r.items
            .iter()
            .filter(|d| d.id > after && visible(&d.session))
            .cloned()
            .collect()
    }
}

fn denial_of(rec: &Record) -> Option<Denial> {
    let would = rec
        .reason
        .as_deref()
        .is_some_and(|r| r.starts_with("audit mode: would deny"));
    if !(rec.verdict.as_deref() == Some("denied") || would) {
        return None;
    }
    if rec.kind != "decision" && rec.kind != "dns" {
        return None;
    }
    let what = match (&rec.qname, &rec.dest, rec.port) {
        (Some(name), _, _) => name.clone(),
        (None, Some(dest), Some(port)) if port != 0 && rec.family.as_deref() != Some("unix") => {
            if dest.contains(':') {
                format!("[{dest}]:{port}")
            } else {
                format!("{dest}:{port}")
            }
        }
        (None, Some(dest), _) => dest.clone(),
        (None, None, _) => "a socket".into(),
    };
    Some(Denial {
        id: 0,
        time: rec.time.clone(),
        session: rec.session.clone().unwrap_or_default(),
        comm: rec.comm.clone(),
        hook: if rec.kind == "dns" {
            "dns".into()
        } else {
            rec.hook.clone().unwrap_or_default()
        },
        what,
        reason: rec.reason.clone().unwrap_or_default(),
        count: rec.count.unwrap_or(1),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(kind: &str, verdict: &str) -> Record {
        Record {
            time: "2026-12-06T05:00:00Z".into(),
            kind: kind.into(),
            session: Some("s1".into()),
            verdict: Some(verdict.into()),
            reason: Some("default deny".into()),
            hook: Some("connect4".into()),
            dest: Some("198.18.6.2".into()),
            port: Some(8080),
            ..Default::default()
        }
    }

    #[test]
    fn keeps_denials_only_and_hands_them_out_by_id_and_session() {
        let r = RecentDenials::default();
        r.note(&rec("decision", "allowed"));
        r.note(&rec("decision", "denied"));
        let mut dns = rec("dns", "denied");
        dns.qname = Some("api.example.test".into());
        r.note(&dns);
        r.note(&rec("session_end", "denied"));
        let all = r.after(0, |_| true);
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].what, "198.18.6.2:8080");
        assert_eq!(
            (all[1].hook.as_str(), all[1].what.as_str()),
            ("dns", "api.example.test")
        );
        assert_eq!(r.after(all[0].id, |_| true).len(), 1);
        assert!(r.after(0, |s| s != "s1").is_empty());
    }
}
