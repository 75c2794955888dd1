//! The audit log's health: whether records reach the file, since when they do not and why, free
//! space against `space_left`, and what the configured action does about it. Every change of state
//! is said once (daemon log, and a record in the audit log once it can be written); while a
//! failure lasts, a summary once a minute; never once per flush.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use egressd_common::{
    policy::{AuditConfig, DiskAction, SpaceLeft},
    protocol::{human_bytes, AuditHealth, SealingView},
};

use super::writer::{Flushed, Reason};

/// What status and the control task read.
pub type SharedHealth = Arc<Mutex<AuditHealth>>;

const SUMMARY_EVERY: Duration = Duration::from_secs(60);
const SPACE_EVERY: Duration = Duration::from_secs(1);

struct Failing {
    since: SystemTime,
    reason: Reason,
    error: String,
    lost_at_start: u64,
    last_said: Instant,
}

pub struct Health {
    shared: SharedHealth,
    path: PathBuf,
    space_left: SpaceLeft,
    full_action: DiskAction,
    error_action: DiskAction,
    failing: Option<Failing>,
    low: bool,
    space_checked: Option<Instant>,
    free: Option<u64>,
    threshold: u64,
    bytes_written: u64,
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// The directory that holds the log.
fn log_dir(path: &Path) -> &Path {
    path.parent().unwrap_or(Path::new("/"))
}

/// Free and total bytes of the file system holding `path`'s directory.
pub fn space(path: &Path) -> Option<(u64, u64)> {
    let dir = log_dir(path);
    let s = nix::sys::statvfs::statvfs(dir).ok()?;
    let frsize = s.fragment_size() as u64;
    Some((
        s.blocks_available() as u64 * frsize,
        s.blocks() as u64 * frsize,
    ))
}

impl Health {
    pub fn new(config: &AuditConfig, shared: SharedHealth) -> Health {
        Health {
            shared,
            path: config.path(),
            space_left: config.space_left(),
            full_action: config.disk_full_action.unwrap_or_default(),
            error_action: config.disk_error_action.unwrap_or_default(),
            failing: None,
            low: false,
            space_checked: None,
            free: None,
            threshold: 0,
            bytes_written: 0,
        }
    }

    fn action(&self, reason: Reason) -> DiskAction {
        if reason == Reason::DiskFull {
            self.full_action
        } else {
            self.error_action
        }
    }

    fn action_key(reason: Reason) -> &'static str {
        if reason == Reason::DiskFull {
            "disk_full_action"
        } else {
            "disk_error_action"
        }
    }

    pub fn refusing(&self) -> Option<String> {
        let f = self.failing.as_ref()?;
        (self.action(f.reason) == DiskAction::Refuse)
            .then(|| self.refusal(f.reason, &f.error, f.since))
    }

    fn refusal(&self, reason: Reason, error: &str, since: SystemTime) -> String {
        let dir = log_dir(&self.path).display().to_string();
        let what = match reason {
            Reason::DiskFull => format!("free space on {dir}"),
            Reason::ReadOnly => format!("remount {dir} read-write"),
            Reason::Missing => format!("recreate {dir}"),
            _ => format!("check the file system of {dir} (dmesg)"),
        };
        format!(
            "the audit log {} cannot be written since {} ({}: {error}), and [audit] {} = \"refuse\" refuses new sessions until it can: {what}, then run again (running sessions stay enforced; `egressctl status` shows the log's state)",
            self.path.display(),
            rfc3339(since),
            reason.name(),
            Self::action_key(reason),
        )
    }

    /// Whether a session may start now, in refuse mode: the log is writable and has room for its
    /// record. `probe` opens the file as a write would.
    pub fn admit(&self, probe: Result<(), (Reason, std::io::Error)>) -> Result<(), String> {
        if let Some(why) = self.refusing() {
            return Err(why);
        }
        match probe {
            Err((reason, e)) if self.action(reason) == DiskAction::Refuse => {
                Err(self.refusal(reason, &e.to_string(), SystemTime::now()))
            }
            _ => match space(&self.path) {
                Some((free, _)) if free < 4096 && self.full_action == DiskAction::Refuse => {
                    Err(self.refusal(
                        Reason::DiskFull,
                        &format!("{free} bytes free"),
                        SystemTime::now(),
                    ))
                }
                _ => Ok(()),
            },
        }
    }

    /// Takes in what a flush did. Returns the words for a `daemon` record when the state changed.
    pub fn after_flush(&mut self, f: &Flushed, lost_total: u64) -> Option<String> {
        self.bytes_written += f.bytes;
        if f.error.is_some() {
            // A failed write is when free space matters: look again at the next flush.
            self.space_checked = None;
        }
        match (&f.error, &mut self.failing) {
            (None, None) => None,
            (None, Some(_)) if f.written.is_empty() => None,
            (None, Some(_)) => self.recovered(lost_total),
            (Some((reason, e)), None) => {
                let refuse = self.action(*reason) == DiskAction::Refuse;
                tracing::error!(
                    "audit: cannot write {}: {} ({e}); enforcement goes on; records are counted as lost until the log can be written, then written as `lost` records{}",
                    self.path.display(),
                    reason.name(),
                    if refuse { "; new sessions are refused meanwhile" } else { "" }
                );
                self.failing = Some(Failing {
                    since: SystemTime::now(),
                    reason: *reason,
                    error: e.to_string(),
                    lost_at_start: lost_total - f.lost,
                    last_said: Instant::now(),
                });
                None
            }
            (Some((reason, e)), Some(failing)) => {
                if failing.reason != *reason {
                    tracing::error!(
                        "audit: {} still cannot be written, now: {} ({e})",
                        self.path.display(),
                        reason.name()
                    );
                    failing.reason = *reason;
                    failing.last_said = Instant::now();
                } else if failing.last_said.elapsed() >= SUMMARY_EVERY {
                    tracing::warn!(
                        "audit: {} cannot be written since {} ({}): {} records lost so far, counted",
                        self.path.display(),
                        rfc3339(failing.since),
                        reason.name(),
                        lost_total - failing.lost_at_start
                    );
                    failing.last_said = Instant::now();
                }
                failing.error = e.to_string();
                None
            }
        }
    }

    /// The log is writable again (a probe succeeded with nothing left to write).
    pub fn recovered(&mut self, lost_total: u64) -> Option<String> {
        let f = self.failing.take()?;
        let lost = lost_total - f.lost_at_start;
        let took = SystemTime::now()
            .duration_since(f.since)
            .unwrap_or_default();
        tracing::info!(
            "audit: {} is written again after {} ({}); {lost} records lost, written as `lost` records",
            self.path.display(),
            humantime::format_duration(Duration::from_secs(took.as_secs())),
            f.reason.name()
        );
        Some(format!(
            "the audit log could not be written from {} to {} ({}: {}): {lost} records lost, counted in the `lost` records before this one",
            rfc3339(f.since),
            rfc3339(SystemTime::now()),
            f.reason.name(),
            f.error
        ))
    }

    pub fn is_failing(&self) -> bool {
        self.failing.is_some()
    }

    /// Looks at free space (at most once a second). Returns the words for a `daemon` record when
    /// it crossed `space_left`.
    pub fn check_space(&mut self) -> Option<String> {
        if self
            .space_checked
            .is_some_and(|t| t.elapsed() < SPACE_EVERY)
        {
            return None;
        }
        self.space_checked = Some(Instant::now());
        let (free, total) = space(&self.path)?;
        self.free = Some(free);
        self.threshold = self.space_left.bytes(total);
        let dir = log_dir(&self.path).display().to_string();
        if free < self.threshold && !self.low {
            self.low = true;
            tracing::warn!(
                "audit: free space on {dir} is {}, below space_left ({}): free space, or the log will stop being written (then: [audit] disk_full_action)",
                human_bytes(free),
                human_bytes(self.threshold)
            );
            return Some(format!(
                "free space on the audit log's file system ({dir}) is {}, below space_left ({})",
                human_bytes(free),
                human_bytes(self.threshold)
            ));
        }
        if free >= self.threshold && self.low {
            self.low = false;
            tracing::info!(
                "audit: free space on {dir} is {}, above space_left again",
                human_bytes(free)
            );
            return Some(format!(
                "free space on the audit log's file system ({dir}) is {}, above space_left ({}) again",
                human_bytes(free),
                human_bytes(self.threshold)
            ));
        }
        None
    }

    /// Publishes the state for status and the control task.
    pub fn publish(
        &self,
        lost: u64,
        lost_pending: u64,
        syslog: Option<(&Option<String>, u64)>,
        sealing: Option<SealingView>,
    ) {
        let view = AuditHealth {
            failing_since: self.failing.as_ref().map(|f| rfc3339(f.since)),
            reason: self.failing.as_ref().map(|f| f.reason.name().to_string()),
            error: self.failing.as_ref().map(|f| f.error.clone()),
            lost,
            lost_pending,
            bytes_written: self.bytes_written,
            free_bytes: self.free,
            space_left: self.threshold,
            refusing_sessions: self.refusing().is_some(),
            syslog_error: syslog.and_then(|(e, _)| e.clone()),
            syslog_dropped: syslog.map_or(0, |(_, n)| n),
            sealing,
        };
        if let Ok(mut s) = self.shared.lock() {
            *s = view;
        }
    }
}
