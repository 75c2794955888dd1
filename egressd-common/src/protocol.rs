//! The control protocol between `egressctl` and `egressd`: one JSON object per line, versioned,
//! with a size limit. The caller's identity never travels in a message: the daemon takes it from
//! `SO_PEERCRED`.

use std::{format, string::String, vec::Vec};

use serde::{Deserialize, Serialize};

use crate::Counters;

pub const PROTOCOL_VERSION: u32 = 1;
/// A request or reply line longer than this is refused (and the connection closed).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;
pub const DEFAULT_SOCKET: &str = "/run/egressd/egressd.sock";
/// Environment variable naming the socket, for both binaries.
pub const SOCKET_ENV: &str = "EGRESSD_SOCKET";
/// Set in a sandboxed command's environment to its session id.
pub const SESSION_ENV: &str = "EGRESSD_SESSION";

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub v: u32,
    pub op: Op,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Op {
    /// Create a session for the caller and move the caller into it.
    Run {
        profile: Option<String>,
        argv: Vec<String>,
    },
    Status,
    Ps,
    /// Counters of one session (the caller's own, or any for root).
    Summary {
        id: String,
    },
    /// Check that every required program is effective on the session's cgroup.
    CheckEnforced {
        id: String,
    },
    /// The policy in force, defaults filled in (one profile, or all).
    PolicyShow {
        profile: Option<String>,
    },
    /// Re-read the policy file (root only; same as SIGHUP).
    Reload,
    /// From egressctl, once, before its child execs CMD: the seccomp notification descriptor of
    /// the child's connect filter (its number in egressctl, which keeps it for a restarted
    /// egressd) through which egressd's supervisor answers the session's connect(2) calls.
    /// egressd takes the descriptor itself (pidfd_getfd).
    Supervise {
        id: String,
        fd: i32,
    },
    /// The most recent denials (of the caller's sessions; all for root) with an id above `after`,
    /// oldest first: what `egressctl top` shows as they happen.
    Denials {
        after: u64,
    },
    /// From egressctl, once: tell the session's user what is blocked while it runs, on the
    /// terminal egressctl runs on (its descriptor number `tty`, which egressd takes itself) and/or
    /// as desktop notifications on the user's session bus (`bus`, a D-Bus address).
    Notices {
        id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tty: Option<i32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        bus: Option<String>,
    },
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Response {
    pub v: u32,
    pub reply: Reply,
}

// A reply is made once per request and serialized at once: its size in memory does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Reply {
    Started(SessionStarted),
    Status(DaemonStatus),
    Sessions(Vec<SessionView>),
    Session(SessionView),
    Enforced(EnforcementCheck),
    Policy(PolicyView),
    /// The session's connects are supervised from now on.
    Supervised,
    Denials(Vec<Denial>),
    /// Notices are on for the session.
    Noticing,
    Error {
        message: String,
    },
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct PolicyView {
    /// The file it came from, or "built-in default".
    pub source: String,
    /// Short hash, as in audit records.
    pub hash: String,
    /// The policy (the shape of the TOML file), with defaults filled in.
    pub policy: serde_json::Value,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct SessionStarted {
    pub id: String,
    pub profile: String,
    /// The session cgroup, relative to the cgroup2 mount (as in /proc/PID/cgroup).
    pub cgroup: String,
    /// One line for a person: what this session may reach.
    pub allows: String,
    /// Whether CMD runs with no_new_privs (setuid and file capabilities give it nothing).
    #[serde(default = "yes")]
    pub no_new_privs: bool,
    /// Enforcement layers in force for the session.
    #[serde(default)]
    pub layers: Vec<String>,
    /// Socket families (AF_* numbers) CMD may create: egressctl's seccomp filter enforces them.
    #[serde(default)]
    pub families: Vec<u32>,
    /// Whether CMD may ptrace, process_vm_readv/writev or pidfd_getfd (seccomp; only where the
    /// Landlock layer is missing: Landlock already confines these to the sandbox).
    #[serde(default)]
    pub ptrace: bool,
    /// Whether egressctl must confine CMD to a Landlock domain (the kernel has Landlock ABI >= 6).
    #[serde(default)]
    pub landlock: bool,
    /// A root session of a "drop-capabilities" profile: egressctl drops every capability and its
    /// Landlock domain forbids writes under /sys, the cgroup and bpffs mounts and `protected`.
    #[serde(default)]
    pub drop_capabilities: bool,
    /// egressd's own files (audit log, policy, state), kept from a root sandbox's writes.
    #[serde(default)]
    pub protected: Vec<String>,
    /// Whether egressctl must hand egressd a seccomp listener for connect(2) (the unix layer):
    /// the session's unix sockets then reach only servers inside it and those the profile allows.
    #[serde(default)]
    pub unix: bool,
    /// Why the unix layer is not in force for this session, for the person starting it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unix_missing: Option<String>,
    /// The session's filtered session bus (`DBUS_SESSION_BUS_ADDRESS` for CMD), when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bus: Option<String>,
    /// The hooks whose egressd program is not effective on the session's cgroup, as egressd found
    /// them after moving the caller in (what `CheckEnforced` answers, without the round trip);
    /// None from an egressd that does not say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub missing: Option<Vec<String>>,
}

fn yes() -> bool {
    true
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct HookStatus {
    pub name: String,
    pub attach_type: String,
    pub prog_id: u32,
    pub pinned: String,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct DaemonStatus {
    pub version: String,
    pub pid: u32,
    pub cgroup_parent: String,
    pub hooks: Vec<HookStatus>,
    pub policy_source: String,
    pub default_profile: String,
    pub profiles: Vec<String>,
    pub sessions: usize,
    /// The audit log egressd writes (readers need root or the log's group).
    pub audit_path: String,
    /// Enforcement layers in force: "cgroup", and "lsm" where BPF LSM runs.
    #[serde(default)]
    pub layers: Vec<String>,
    /// Why the unix layer is not in force (absent: it is).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unix_missing: Option<String>,
    /// Whether the audit log is being written, and what it lost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit: Option<AuditHealth>,
}

/// The audit log's health as the daemon sees it.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
pub struct AuditHealth {
    /// Failing since (RFC 3339), absent while records are written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failing_since: Option<String>,
    /// Why: "disk full", "read-only file system", "I/O error", "log directory removed", ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The last error, as the kernel said it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Records lost since egressd started: written as `lost` records, or waiting to be.
    pub lost: u64,
    /// Of `lost`, those counted while the log cannot be written (their `lost` record is pending).
    pub lost_pending: u64,
    /// Bytes appended since egressd started.
    pub bytes_written: u64,
    /// Free space on the log's file system, and the `space_left` threshold, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free_bytes: Option<u64>,
    pub space_left: u64,
    /// New sessions are refused (`disk_full_action`/`disk_error_action` = "refuse").
    pub refusing_sessions: bool,
    /// Why the syslog copy fails, and how many copies were not sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub syslog_error: Option<String>,
    pub syslog_dropped: u64,
    /// Forward-secure sealing, once `egressctl audit setup-keys` made keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealing: Option<SealingView>,
}

/// How the log is sealed: with which key, how often, and the last seal that reached the file.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct SealingView {
    /// The key id (what `setup-keys` printed next to the verification key).
    pub key: String,
    pub interval_s: u64,
    /// The epoch of the key in use: keys of earlier epochs are erased.
    pub epoch: u64,
    /// When the last seal was written, and the last record it covers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seal: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed_seq: Option<u64>,
}

/// A size as a person reads it: "63.8 MiB".
pub fn human_bytes(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct SessionView {
    pub id: String,
    pub profile: String,
    pub uid: u32,
    pub pids: Vec<u32>,
    /// Seconds since the Unix epoch.
    pub started: u64,
    pub argv: Vec<String>,
    pub counters: Counters,
    /// Records of this session the audit log could not take (full disk, ...), so far: each is
    /// counted in a `lost` record.
    #[serde(default)]
    pub audit_lost: u64,
    /// DNS queries of this session the resolver answered, and refused (NXDOMAIN, REFUSED,
    /// malformed); `dns_names_denied` counts the distinct names refused.
    #[serde(default)]
    pub dns_allowed: u64,
    #[serde(default)]
    pub dns_denied: u64,
    #[serde(default)]
    pub dns_names_denied: u64,
}

/// One denial as the audit log recorded it, for a person watching (`egressctl top`).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct Denial {
    /// Increasing: ask for those after the last one seen.
    pub id: u64,
    /// RFC 3339, as in the record.
    pub time: String,
    pub session: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comm: Option<String>,
    /// `connect4`, `sendmsg6`, `dns`, `unix`...
    pub hook: String,
    /// `198.18.6.2:8080`, a DNS name, a unix socket path, a socket family.
    pub what: String,
    pub reason: String,
    /// Decisions the record stands for (repeats are folded).
    pub count: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct EnforcementCheck {
    /// Attach types with none of egressd's programs effective on the cgroup; empty when enforced.
    pub missing: Vec<String>,
}

impl Request {
    pub fn new(op: Op) -> Self {
        Request {
            v: PROTOCOL_VERSION,
            op,
        }
    }
}

impl Response {
    pub fn new(reply: Reply) -> Self {
        Response {
            v: PROTOCOL_VERSION,
            reply,
        }
    }

    pub fn error(message: impl Into<String>) -> Self {
        Self::new(Reply::Error {
            message: message.into(),
        })
    }
}

/// The signal a restarted egressd sends the egressctl of an adopted session once it supervises
/// that session's connects again (egressctl answered them while no egressd ran).
pub fn resumed_signal() -> i32 {
    libc::SIGRTMIN() + 3
}
