//! How `status`, `doctor` and `audit summary` say the audit log's health.

use egressd_common::protocol::{human_bytes, AuditHealth};

/// Whether and how the log is sealed, in one line.
pub fn sealing(h: &AuditHealth) -> String {
    match &h.sealing {
        None => "not sealed: `egressctl audit setup-keys` makes keys, so an auditor can check the log off this machine".into(),
        Some(s) => format!(
            "sealed every {} (key {}, epoch {}){}",
            humantime::format_duration(std::time::Duration::from_secs(s.interval_s)),
            s.key,
            s.epoch,
            match (&s.last_seal, s.sealed_seq) {
                (Some(t), Some(q)) => format!("; last seal {t} (up to seq {q})"),
                _ => "; no seal written yet".into(),
            }
        ),
    }
}

/// Whether free space is below `space_left`.
pub fn low(h: &AuditHealth) -> bool {
    h.free_bytes.is_some_and(|f| f < h.space_left)
}

/// Lines for the log itself, and one for the syslog copy when it fails.
pub fn lines(h: &AuditHealth, path: &str) -> Vec<String> {
    let space = match h.free_bytes {
        Some(free) if low(h) => format!(
            "LOW ON SPACE: {} free, below space_left ({})",
            human_bytes(free),
            human_bytes(h.space_left)
        ),
        Some(free) => format!(
            "{} free, space_left {}",
            human_bytes(free),
            human_bytes(h.space_left)
        ),
        None => "free space unknown".into(),
    };
    let mut out = match &h.failing_since {
        None => vec![
            format!("writing {path}"),
            format!(
                "{space}; {} records lost since egressd started{}",
                h.lost,
                if h.lost > 0 {
                    " (each in a `lost` record)"
                } else {
                    ""
                }
            ),
        ],
        Some(since) => vec![
            format!(
                "FAILING since {since}: {} ({})",
                h.reason.as_deref().unwrap_or("error"),
                h.error.as_deref().unwrap_or("?")
            ),
            format!(
                "{} records lost so far, counted ({} wait for their `lost` records, written once the log can be written)",
                h.lost, h.lost_pending
            ),
            format!(
                "{}; {space}",
                if h.refusing_sessions {
                    "NEW SESSIONS ARE REFUSED until then; running sessions stay enforced"
                } else {
                    "enforcement goes on"
                }
            ),
        ],
    };
    if let Some(e) = &h.syslog_error {
        out.push(format!(
            "syslog copy failing ({e}): {} copies dropped (the audit file is unaffected)",
            h.syslog_dropped
        ));
    }
    out
}
