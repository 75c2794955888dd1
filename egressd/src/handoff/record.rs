//! The audit record of a supervisor decision.

use std::fs;

use egressd_common::audit::Record;

use super::{caller::Creds, fds::tgid_of, judge::Server, Watch};
use crate::audit;

pub(super) fn kind_name(kind: i32) -> &'static str {
    match kind {
        libc::SOCK_STREAM => "stream",
        libc::SOCK_DGRAM => "dgram",
        libc::SOCK_SEQPACKET => "seqpacket",
        _ => "unknown",
    }
}

/// The decision's audit record; None when nothing was decided (the path did not resolve: the
/// caller got the error its own connect would have).
pub(super) fn record(
    watch: &Watch,
    n: &libc::seccomp_notif,
    creds: &Creds,
    dest: &str,
    kind: i32,
    server: &Server,
    verdict: &str,
) -> Option<Record> {
    if verdict.is_empty() {
        return None;
    }
    let (peer, peer_pid) = match server {
        Server::Allowed => ("allowed".to_string(), None),
        Server::Session => (watch.session.clone(), None),
        Server::Outside {
            pid,
            other: Some(c),
        } => (format!("session {c}"), *pid),
        Server::Outside { pid, other: None } => ("outside".to_string(), *pid),
        Server::None => ("none".to_string(), None),
    };
    let comm = fs::read_to_string(format!("/proc/{}/comm", n.pid))
        .map(|c| c.trim_end().to_string())
        .ok();
    let tgid = Some(tgid_of(n.pid));
    Some(Record {
        time: audit::now_rfc3339(),
        kind: "decision".into(),
        session: Some(watch.session.clone()),
        pid: Some(n.pid),
        tgid,
        uid: Some(creds.uid),
        comm,
        exe: fs::read_link(format!("/proc/{}/exe", n.pid))
            .ok()
            .map(|p| p.display().to_string()),
        hook: Some("connect_unix".into()),
        family: Some("unix".into()),
        protocol: Some(kind_name(kind).into()),
        dest: Some(dest.to_string()),
        verdict: Some(verdict.to_string()),
        reason: Some(server.reason().to_string()),
        peer: Some(peer),
        peer_pid,
        ..Default::default()
    })
}

pub(super) fn send(watch: &Watch, record: Record) {
    if watch
        .audit
        .blocking_send(audit::Message::Record(Box::new(record)))
        .is_err()
    {
        tracing::error!("audit task has stopped: unix decisions are not being written");
    }
}
