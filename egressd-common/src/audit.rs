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
    /// `decision`, `dns`, `session_start`, `session_end`, `lost`, `daemon`.
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
    pub prev: String,
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

/// Checks the chain over `files` (oldest first). When the first file does not start at the genesis
/// (older files were rotated away), its first line is taken as the anchor. Returns the number of
/// lines checked and the head, or the first line that breaks the chain.
pub fn verify<R: BufRead>(
    files: impl IntoIterator<Item = (String, R)>,
) -> Result<(u64, Option<ChainHead>), Broken> {
    let mut head: Option<ChainHead> = None;
    let mut checked = 0;
    for (name, reader) in files {
        for (i, line) in reader.split(b'\n').enumerate() {
            let broken = |reason: String| Broken {
                file: name.clone(),
                line: i + 1,
                reason,
            };
            let line = line.map_err(|e| broken(format!("unreadable: {e}")))?;
            if line.is_empty() {
                continue;
            }
            let rec: Record = serde_json::from_slice(&line).map_err(|e| {
                broken(format!(
                    "not an audit record ({e}): the line was edited or is not from egressd"
                ))
            })?;
            if let Some(h) = &head {
                if rec.prev != h.hash {
                    return Err(broken(format!(
                        "chain broken: `prev` does not match the line before (seq {}); that line was edited, or lines between were deleted or reordered",
                        h.seq
                    )));
                }
                if rec.seq != h.seq + 1 {
                    return Err(broken(format!(
                        "sequence jumps from {} to {}: lines were deleted or reordered",
                        h.seq, rec.seq
                    )));
                }
            } else if rec.prev == GENESIS && rec.seq != 1 {
                return Err(broken(format!(
                    "the first record has seq {} instead of 1",
                    rec.seq
                )));
            }
            head = Some(ChainHead {
                seq: rec.seq,
                hash: line_hash(&line),
            });
            checked += 1;
        }
    }
    Ok((checked, head))
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
