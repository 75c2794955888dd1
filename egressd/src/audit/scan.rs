//! What a previous daemon wrote of the sessions this one adopts, read back from the log: the
//! kernel decisions it accounted for (written, or counted as lost). At the session's end the
//! kernel's counters say how many decisions there were; the difference is what that daemon took
//! from the ring and never wrote (it was killed, or crashed), and goes into a `lost` record.

use std::{
    collections::{HashMap, HashSet},
    fs,
    io::{BufRead as _, BufReader},
    path::PathBuf,
};

use egressd_common::audit::Record;

/// Per session: kernel decisions accounted for, and ring losses already reported.
#[derive(Default, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Accounted {
    pub kernel: u64,
    pub ring_lost: u64,
}

pub const RING_FULL: &str = "ring buffer full";

/// Whether a decision record came from the kernel's ring (the supervisor's unix decisions do not,
/// and the kernel does not count them).
pub fn from_kernel(rec: &Record) -> bool {
    rec.kind == "decision"
        && (rec.hook.as_deref() != Some("connect_unix")
            || rec
                .reason
                .as_deref()
                .is_some_and(|r| r.contains(super::names::UNVETTED)))
}

/// Reads `files` (oldest first) newest first, until the original `session_start` of every
/// session in `ids` is found.
pub fn accounted(files: &[PathBuf], ids: &HashSet<String>) -> HashMap<String, Accounted> {
    let mut out: HashMap<String, Accounted> = HashMap::new();
    if ids.is_empty() {
        return out;
    }
    let mut started: HashSet<&str> = HashSet::new();
    let needles: Vec<(String, &String)> = ids
        .iter()
        .map(|id| (format!("\"session\":\"{id}\""), id))
        .collect();
    for file in files.iter().rev() {
        let Ok(f) = fs::File::open(file) else {
            continue;
        };
        for line in BufReader::new(f).split(b'\n').map_while(Result::ok) {
            let Some((_, id)) = needles
                .iter()
                .find(|(n, _)| memchr::memmem::find(&line, n.as_bytes()).is_some())
            else {
                continue;
            };
            let Ok(rec) = serde_json::from_slice::<Record>(&line) else {
                continue;
            };
            let a = out.entry((*id).clone()).or_default();
            match rec.kind.as_str() {
                "lost" => {
                    let n = rec.decisions.unwrap_or(rec.count.unwrap_or(0));
                    a.kernel += n;
                    if rec.reason.as_deref() == Some(RING_FULL) {
                        a.ring_lost += n;
                    }
                }
                "session_start"
                    if !rec
                        .message
                        .as_deref()
                        .is_some_and(|m| m.contains(super::ADOPTED)) =>
                {
                    started.insert(id.as_str());
                }
                _ if from_kernel(&rec) => a.kernel += rec.count.unwrap_or(1),
                _ => {}
            }
        }
        if started.len() == ids.len() {
            break;
        }
    }
    out
}
