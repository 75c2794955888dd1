//! The audit log's record format and its hash chain, shared by the writer (egressd) and the readers
//! (`egressctl audit`).
//!
//! One JSON object per line. Every line carries `prev`, the SHA-256 (hex) of the previous line's
//! exact bytes (without its newline), and `seq`, one more than the previous line's; the first line
//! ever has `prev` = 64 zeros and `seq` 1. The chain continues across rotated files, so a deleted,
//! reordered or edited line breaks it at the next line.

use std::{
    format,
    io::{self, BufRead},
    string::{String, ToString},
    vec::Vec,
};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Every field a record may have. Decision records fill the connection fields; session records the
/// session fields. Absent fields are omitted from the line.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Record {
    /// RFC 3339, UTC, nanoseconds.
    pub time: String,
    pub seq: u64,
    /// `decision`, `dns`, `session_start`, `session_end`, `lost`, `daemon`, `crash` (the previous
    /// egressd ended without closing the log), `log_continued` (the file was replaced under egressd).
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tgid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comm: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exe: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hook: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub family: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dest: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Short hash of the policy in force.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// How many identical decisions this record stands for (folded within a short window), or how
    /// many events were lost for a `lost` record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub argv: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub denied: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_s: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// egressd's start record: the machine that writes the log (host name and
    /// /etc/machine-id), sealed with the rest, so an export says where it was written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_id: Option<String>,
    /// DNS records: the name asked, its type, and for an allowed name the addresses it opened
    /// (after CNAMEs) and for how long.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qtype: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rcode: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answers: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<u32>,
    /// Unix-socket decisions: who serves the address (a session id, "outside", "allowed" for a
    /// socket the profile allows, "none" when nothing is bound there) and the server's pid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_pid: Option<u32>,
    /// Session records: the enforcement layers in force for the session ("cgroup", "lsm").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layers: Option<Vec<String>>,
    /// `lost` records: the time of the first and the last record lost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
    /// `lost` records: how many of `count` were the kernel's decisions (the rest: DNS and unix
    /// supervisor records), which is what reconciles the log with the kernel's counters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decisions: Option<u64>,
    /// `crash` records: the byte offset, length and SHA-256 of the torn line a crash left, in this
    /// file; `log_continued` records: the size the replaced file had (`bytes`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub torn: Option<String>,
    /// `seal` records: the epoch whose key made the seal, the seal (HMAC-SHA256, hex, of the
    /// chain head: the hash of the line before, `sealed_seq`, `epoch`), the seq of the last record
    /// it covers (the one before it), and the id of the verification key (`seal::key_id`).
    /// `reason` says why it was written: `interval`, `start`, `stop`, `rotation`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seal: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed_seq: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    pub prev: String,
}

/// The message of the record a clean stop writes (before its `stop` seal); any other end of the
/// log means the previous daemon ended without closing it.
pub const STOP_MESSAGE: &str = "egressd stopping; enforcement stays pinned";

/// A `seal` record as `verify` found it, for `seal::check`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SealLine {
    pub file: String,
    pub line: usize,
    pub seq: u64,
    pub time: String,
    pub reason: String,
    pub epoch: Option<u64>,
    pub seal: Option<String>,
    pub sealed_seq: Option<u64>,
    pub key: Option<String>,
    /// The chain head it seals: the `prev` of the seal record.
    pub head: String,
}

pub fn line_hash(line: &[u8]) -> String {
    hex::encode(Sha256::digest(line))
}

/// Where the chain ends: what the next line must carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainHead {
    pub seq: u64,
    pub hash: String,
}

impl ChainHead {
    pub fn genesis() -> Self {
        ChainHead {
            seq: 0,
            hash: GENESIS.to_string(),
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub struct Broken {
    pub file: String,
    /// 1-based line number within `file`.
    pub line: usize,
    pub reason: String,
}

/// What a passing check found besides an intact chain: faults egressd recorded (a crash's torn
/// line, a file replaced under it, records it could not write), each said in words.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Verified {
    pub checked: u64,
    pub head: Option<ChainHead>,
    pub notes: Vec<String>,
    /// Records counted as lost (the sum of `count` over `lost` records).
    pub lost: u64,
    /// Every `seal` record, in order (checked by `seal::check` with a verification key).
    pub seals: Vec<SealLine>,
    /// Seqs of `crash` records (a crash may leave up to one interval unsealed).
    pub crashes: Vec<u64>,
    /// Seqs of clean-stop records.
    pub stops: Vec<u64>,
    /// The first and the last record checked: seq and time.
    pub first: Option<(u64, String)>,
    pub last: Option<(u64, String)>,
}

/// A line that did not parse, held until the next line says whether egressd recorded it as a
/// crash's torn line.
struct Torn {
    line: usize,
    offset: u64,
    bytes: u64,
    hash: String,
    error: String,
}

/// Checks the chain over `files` (oldest first). When the first file does not start at the genesis
/// (older files were rotated away), its first line is taken as the anchor. A line that is not a
/// record passes only when the very next line is egressd's `crash` record naming its offset,
/// length and hash, chained to the line before it: the torn line a crash left, recorded by the
/// next daemon. Returns what was checked, or the first line that breaks the chain.
pub fn verify<R: BufRead>(
    files: impl IntoIterator<Item = (String, R)>,
) -> Result<Verified, Broken> {
    let mut out = Verified::default();
    let mut head: Option<ChainHead> = None;
    for (name, reader) in files {
        let mut offset = 0u64;
        let mut torn: Option<Torn> = None;
        for (i, line) in reader.split(b'\n').enumerate() {
            let broken = |line: usize, reason: String| Broken {
                file: name.clone(),
                line,
                reason,
            };
            let line = line.map_err(|e| broken(i + 1, format!("unreadable: {e}")))?;
            let at = offset;
            offset += line.len() as u64 + 1;
            if line.is_empty() {
                continue;
            }
            let rec: Record = match serde_json::from_slice(&line) {
                Ok(r) => r,
                Err(e) => {
                    if let Some(t) = torn {
                        return Err(broken(t.line, t.error));
                    }
                    torn = Some(Torn {
                        line: i + 1,
                        offset: at,
                        bytes: line.len() as u64,
                        hash: line_hash(&line),
                        error: format!(
                            "not an audit record ({e}): the line was edited or is not from egressd"
                        ),
                    });
                    continue;
                }
            };
            if let Some(t) = torn.take() {
                let recorded = rec.kind == "crash"
                    && rec.offset == Some(t.offset)
                    && rec.bytes == Some(t.bytes)
                    && rec.torn.as_deref() == Some(t.hash.as_str());
                if !recorded {
                    return Err(broken(t.line, t.error));
                }
                out.notes.push(format!(
                    "{name} line {}: a torn line ({} bytes at byte {}) left by a crash, recorded by the next egressd at seq {}",
                    t.line, t.bytes, t.offset, rec.seq
                ));
            }
            if let Some(h) = &head {
                if rec.prev != h.hash {
                    return Err(broken(i + 1, format!(
                        "chain broken: `prev` does not match the line before (seq {}); that line was edited, or lines between were deleted or reordered",
                        h.seq
                    )));
                }
                if rec.seq != h.seq + 1 {
                    return Err(broken(
                        i + 1,
                        format!(
                            "sequence jumps from {} to {}: lines were deleted or reordered",
                            h.seq, rec.seq
                        ),
                    ));
                }
            } else if rec.prev == GENESIS && rec.seq != 1 {
                return Err(broken(
                    i + 1,
                    format!("the first record has seq {} instead of 1", rec.seq),
                ));
            } else if rec.kind == "log_continued" {
                out.notes.push(format!(
                    "{name} starts where a replaced or removed file ended (seq {}); that file was not among those checked",
                    rec.seq.saturating_sub(1)
                ));
            }
            match rec.kind.as_str() {
                "crash" if rec.torn.is_none() => out.notes.push(format!(
                    "seq {}: {}",
                    rec.seq,
                    rec.message
                        .as_deref()
                        .unwrap_or("the previous egressd ended without closing the log")
                )),
                "log_continued" if head.is_some() => out.notes.push(format!(
                    "seq {}: {}",
                    rec.seq,
                    rec.message
                        .as_deref()
                        .unwrap_or("the log continued after the file was replaced")
                )),
                "lost" => out.lost += rec.count.unwrap_or(0),
                "seal" => out.seals.push(SealLine {
                    file: name.clone(),
                    line: i + 1,
                    seq: rec.seq,
                    time: rec.time.clone(),
                    reason: rec.reason.clone().unwrap_or_default(),
                    epoch: rec.epoch,
                    seal: rec.seal.clone(),
                    sealed_seq: rec.sealed_seq,
                    key: rec.key.clone(),
                    head: rec.prev.clone(),
                }),
                "daemon" if rec.message.as_deref() == Some(STOP_MESSAGE) => out.stops.push(rec.seq),
                _ => {}
            }
            if rec.kind == "crash" {
                out.crashes.push(rec.seq);
            }
            if out.first.is_none() {
                out.first = Some((rec.seq, rec.time.clone()));
            }
            out.last = Some((rec.seq, rec.time.clone()));
            head = Some(ChainHead {
                seq: rec.seq,
                hash: line_hash(&line),
            });
            out.checked += 1;
        }
        if let Some(t) = torn {
            return Err(Broken {
                file: name.clone(),
                line: t.line,
                reason: format!(
                    "the last line is incomplete ({} bytes at byte {}): egressd stopped mid-write (a crash, kill -9 or power loss) and has not started since to record it, or the file was cut",
                    t.bytes, t.offset
                ),
            });
        }
    }
    out.head = head;
    Ok(out)
}

/// The head of an existing log: the last line of the last file.
pub fn head_of(text: &[u8]) -> io::Result<Option<ChainHead>> {
    let Some(last) = text.split(|b| *b == b'\n').rev().find(|l| !l.is_empty()) else {
        return Ok(None);
    };
    let rec: Record = serde_json::from_slice(last).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("last line is not an audit record: {e}"),
        )
    })?;
    Ok(Some(ChainHead {
        seq: rec.seq,
        hash: line_hash(last),
    }))
}
