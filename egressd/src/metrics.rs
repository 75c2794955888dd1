//! The metrics egressd serves at `GET /metrics` (`[metrics] listen`): counters kept where the
//! events happen, rendered as OpenMetrics or the Prometheus text format.
//!
//! Decisions and DNS queries are counted by the audit task as it queues their records (a record
//! it cannot write is counted as lost, not dropped), so these counters agree with the audit log:
//! the sum of the `count` fields of its `decision` records per hook and verdict.

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    sync::{LazyLock, Mutex, MutexGuard},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use egressd_common::{audit::Record, policy::MetricsListen};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The daemon's metrics.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::default);

#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

#[derive(Default, Clone)]
struct Inner {
    /// (profile, hook, verdict) -> decisions.
    decisions: BTreeMap<(String, String, String), u64>,
    /// verdict -> queries.
    dns: BTreeMap<String, u64>,
    /// Profile of each running session, by session id.
    profiles: HashMap<String, String>,
    sessions_active: u64,
    sessions_started: u64,
    audit_lost: u64,
    ring_lost: u64,
    audit_failing: bool,
    audit_bytes: u64,
    /// "ok"/"error" -> reloads.
    reloads: BTreeMap<&'static str, u64>,
    /// The last reload: whether it succeeded, and when (seconds since the epoch).
    last_reload: Option<(bool, f64)>,
}

impl Metrics {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A session's records will carry this profile (before any of its events can exist).
    pub fn name_session(&self, id: &str, profile: &str) {
        self.lock().profiles.insert(id.into(), profile.into());
    }

    /// A `session_start` record was queued.
    pub fn session_started(&self) {
        let mut m = self.lock();
        m.sessions_started += 1;
        m.sessions_active += 1;
    }

    /// A `session_end` record was queued: the session adds nothing more.
    pub fn session_ended(&self, id: &str) {
        let mut m = self.lock();
        m.sessions_active = m.sessions_active.saturating_sub(1);
        m.profiles.remove(id);
    }

    /// A record was queued for the audit log (written, or counted as lost if it cannot be).
    pub fn record(&self, rec: &Record) {
        let count = rec.count.unwrap_or(1);
        let verdict = rec.verdict.clone().unwrap_or_default();
        let mut m = self.lock();
        match rec.kind.as_str() {
            "decision" => {
                let profile = rec
                    .session
                    .as_ref()
                    .and_then(|s| m.profiles.get(s).cloned())
                    .unwrap_or_else(|| "unknown".into());
                let hook = rec.hook.clone().unwrap_or_default();
                *m.decisions.entry((profile, hook, verdict)).or_default() += count;
            }
            "dns" => *m.dns.entry(verdict).or_default() += count,
            _ => {}
        }
    }

    /// The kernel's ring buffer was full: `n` more events counted, not itemised.
    pub fn ring_lost(&self, n: u64) {
        self.lock().ring_lost += n;
    }

    /// After each flush of the audit log.
    pub fn audit_flushed(&self, bytes: u64, lost_total: u64, failing: bool) {
        let mut m = self.lock();
        m.audit_bytes += bytes;
        m.audit_lost = lost_total;
        m.audit_failing = failing;
    }

    /// A policy reload (SIGHUP, `egressctl policy reload`) ended.
    pub fn reloaded(&self, ok: bool) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        let mut m = self.lock();
        *m.reloads
            .entry(if ok { "ok" } else { "error" })
            .or_default() += 1;
        m.last_reload = Some((ok, now));
    }

    /// The metrics as text: OpenMetrics 1.0 (ending with `# EOF`) or Prometheus 0.0.4.
    pub fn render(&self, openmetrics: bool) -> String {
        let m = self.lock().clone();
        let mut out = String::new();
        let mut family = |name: &str, kind: &str, help: &str, samples: Vec<(String, String)>| {
            // OpenMetrics names a counter's family without `_total`; its samples carry it.
            let family = match (openmetrics, kind) {
                (true, "counter") => name.trim_end_matches("_total"),
                _ => name,
            };
            let _ = writeln!(out, "# HELP {family} {help}");
            let _ = writeln!(out, "# TYPE {family} {kind}");
            for (labels, value) in samples {
                let _ = writeln!(out, "{name}{labels} {value}");
            }
        };
        let one = |v: u64| vec![(String::new(), v.to_string())];
        family(
            "egressd_decisions_total",
            "counter",
            "Decisions of the kernel hooks and the unix supervisor, as the audit log records them (the sum of its decision records' count).",
            m.decisions
                .iter()
                .map(|((p, h, v), n)| {
                    (
                        labels(&[("profile", p), ("hook", h), ("verdict", v)]),
                        n.to_string(),
                    )
                })
                .collect(),
        );
        family(
            "egressd_dns_queries_total",
            "counter",
            "DNS queries from sessions answered by egressd's resolver, by verdict.",
            m.dns
                .iter()
                .map(|(v, n)| (labels(&[("verdict", v)]), n.to_string()))
                .collect(),
        );
        family(
            "egressd_sessions_active",
            "gauge",
            "Sessions running now.",
            one(m.sessions_active),
        );
        family(
            "egressd_sessions_started_total",
            "counter",
            "Sessions started (or adopted from a previous egressd) since egressd started: its session_start records.",
            one(m.sessions_started),
        );
        family(
            "egressd_audit_records_lost_total",
            "counter",
            "Audit records that could not be written (disk full, I/O error...), counted in lost records.",
            one(m.audit_lost),
        );
        family(
            "egressd_ring_buffer_events_lost_total",
            "counter",
            "Kernel events that found the ring buffer full (enforced and counted, written as lost records).",
            one(m.ring_lost),
        );
        family(
            "egressd_audit_log_writing",
            "gauge",
            "1 while the audit log is being written, 0 while writing it fails.",
            one(u64::from(!m.audit_failing)),
        );
        family(
            "egressd_audit_log_bytes_written_total",
            "counter",
            "Bytes written to the audit log since egressd started.",
            one(m.audit_bytes),
        );
        family(
            "egressd_policy_reloads_total",
            "counter",
            "Policy reloads (SIGHUP, egressctl policy reload), by result.",
            ["ok", "error"]
                .iter()
                .map(|r| {
                    (
                        labels(&[("result", r)]),
                        m.reloads.get(r).copied().unwrap_or(0).to_string(),
                    )
                })
                .collect(),
        );
        if let Some((ok, at)) = m.last_reload {
            family(
                "egressd_policy_last_reload_success",
                "gauge",
                "1 if the last policy reload succeeded, 0 if it was refused.",
                one(u64::from(ok)),
            );
            family(
                "egressd_policy_last_reload_timestamp_seconds",
                "gauge",
                "When the last policy reload ended (seconds since the epoch).",
                vec![(String::new(), format!("{at:.3}"))],
            );
        }
        if openmetrics {
            out.push_str("# EOF\n");
        }
        out
    }
}

fn labels(pairs: &[(&str, &str)]) -> String {
    let mut s = String::from("{");
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        let _ = write!(s, "{k}=\"");
        for c in v.chars() {
            match c {
                '\\' => s.push_str("\\\\"),
                '"' => s.push_str("\\\""),
                '\n' => s.push_str("\\n"),
                c => s.push(c),
            }
        }
        s.push('"');
    }
    s.push('}');
    s
}

pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
pub const PROMETHEUS: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A request's head is at most this long; more is refused (431).
const MAX_HEAD: usize = 8 * 1024;
/// A client has this long to send its request and take the answer.
const TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 16;

/// The answer to a request head: status line, content type, body.
pub fn respond(head: &[u8], metrics: &Metrics) -> (&'static str, &'static str, String) {
    let text = String::from_utf8_lossy(head);
    let mut lines = text.split("\r\n");
    let mut first = lines.next().unwrap_or("").split(' ');
    let (method, target, version) = (first.next(), first.next(), first.next());
    if !matches!(version, Some(v) if v.starts_with("HTTP/1.")) || first.next().is_some() {
        return ("400 Bad Request", "text/plain", "bad request\n".into());
    }
    let path = target.unwrap_or("").split('?').next().unwrap_or("");
    if path != "/metrics" {
        return (
            "404 Not Found",
            "text/plain",
            "only /metrics is here\n".into(),
        );
    }
    if !matches!(method, Some("GET") | Some("HEAD")) {
        return (
            "405 Method Not Allowed",
            "text/plain",
            "only GET /metrics\n".into(),
        );
    }
    let openmetrics = lines.any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("accept")
                && v.to_ascii_lowercase()
                    .contains("application/openmetrics-text")
        })
    });
    let kind = if openmetrics { OPENMETRICS } else { PROMETHEUS };
    ("200 OK", kind, metrics.render(openmetrics))
}

/// Serves one connection: one request, one answer, closed.
async fn serve<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, timeout: Duration) {
    let work = async {
        let mut head = Vec::with_capacity(1024);
        let mut buf = [0u8; 1024];
        let answer = loop {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                return Ok::<(), std::io::Error>(());
            }
            head.extend_from_slice(&buf[..n]);
            if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                head.truncate(end);
                break respond(&head, &METRICS);
            }
            if head.len() > MAX_HEAD {
                break (
                    "431 Request Header Fields Too Large",
                    "text/plain",
                    "request too large\n".into(),
                );
            }
        };
        let (status, kind, body) = answer;
        let head_only = head.starts_with(b"HEAD ");
        let mut out = format!(
            "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n",
            body.len()
        );
        if status.starts_with("405") {
            out.push_str("Allow: GET, HEAD\r\n");
        }
        out.push_str("\r\n");
        if !head_only {
            out.push_str(&body);
        }
        stream.write_all(out.as_bytes()).await?;
        stream.shutdown().await
    };
    let _ = tokio::time::timeout(timeout, work).await;
}

/// The endpoint's socket.
enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

impl Listener {
    /// Accepts one connection and serves it on a task of its own, which holds `permit`.
    async fn serve_next(&self, permit: tokio::sync::OwnedSemaphorePermit) -> std::io::Result<()> {
        match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept().await?;
                tokio::spawn(async move {
                    serve(s, TIMEOUT).await;
                    drop(permit);
                });
            }
            Listener::Unix(l) => {
                let (s, _) = l.accept().await?;
                tokio::spawn(async move {
                    serve(s, TIMEOUT).await;
                    drop(permit);
                });
            }
        }
        Ok(())
    }
}

/// Listens at `listen` and serves `GET /metrics` until the daemon stops.
pub async fn listen(listen: MetricsListen) -> std::io::Result<()> {
    let listener = match listen {
        MetricsListen::Tcp(addr) => {
            let l = tokio::net::TcpListener::bind(addr).await?;
            tracing::info!(%addr, "metrics: serving GET /metrics");
            Listener::Tcp(l)
        }
        MetricsListen::Unix(path) => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            // A socket left by a previous egressd is replaced; anything else there is an error.
            use std::os::unix::fs::{FileTypeExt, PermissionsExt};
            if let Ok(meta) = std::fs::symlink_metadata(&path) {
                if meta.file_type().is_socket() {
                    std::fs::remove_file(&path)?;
                }
            }
            let l = tokio::net::UnixListener::bind(&path)?;
            // Like the control socket without socket_group: anyone may read the counters.
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666))?;
            tracing::info!(path = %path.display(), "metrics: serving GET /metrics");
            Listener::Unix(l)
        }
    };
    let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let Ok(permit) = permits.clone().acquire_owned().await else {
                return;
            };
            if let Err(e) = listener.serve_next(permit).await {
                tracing::warn!("metrics: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(kind: &str, session: &str, hook: &str, verdict: &str, count: u64) -> Record {
        Record {
            kind: kind.into(),
            session: Some(session.into()),
            hook: (!hook.is_empty()).then(|| hook.into()),
            verdict: Some(verdict.into()),
            count: Some(count),
            ..Default::default()
        }
    }

    fn sample() -> Metrics {
        let m = Metrics::default();
        m.name_session("s1", "airgap");
        m.session_started();
        m.record(&rec("decision", "s1", "connect4", "denied", 1));
        m.record(&rec("decision", "s1", "connect4", "denied", 41));
        m.record(&rec("decision", "s1", "connect4", "allowed", 1));
        m.record(&rec("decision", "s9", "sendmsg4", "denied", 2));
        m.record(&rec("dns", "s1", "", "denied", 1));
        // A query's repeats, folded into one record.
        m.record(&rec("dns", "s1", "", "denied", 4));
        m.record(&rec("session_end", "s1", "", "", 1));
        m.session_ended("s1");
        m.ring_lost(3);
        m.audit_flushed(1000, 7, false);
        m.audit_flushed(24, 7, true);
        m
    }

    #[test]
    fn prometheus_text_sums_counts_by_profile_hook_and_verdict() {
        let text = sample().render(false);
        for line in [
            "# TYPE egressd_decisions_total counter",
            "egressd_decisions_total{profile=\"airgap\",hook=\"connect4\",verdict=\"allowed\"} 1",
            "egressd_decisions_total{profile=\"airgap\",hook=\"connect4\",verdict=\"denied\"} 42",
            "egressd_decisions_total{profile=\"unknown\",hook=\"sendmsg4\",verdict=\"denied\"} 2",
            "egressd_dns_queries_total{verdict=\"denied\"} 5",
            "egressd_sessions_active 0",
            "egressd_sessions_started_total 1",
            "egressd_audit_records_lost_total 7",
            "egressd_ring_buffer_events_lost_total 3",
            "egressd_audit_log_writing 0",
            "egressd_audit_log_bytes_written_total 1024",
            "egressd_policy_reloads_total{result=\"ok\"} 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing in\n{text}"
            );
        }
        assert!(!text.contains("# EOF"));
        assert!(!text.contains("last_reload"), "no reload yet: {text}");
    }

    #[test]
    fn openmetrics_names_counter_families_without_total_and_ends_with_eof() {
        let m = sample();
        m.reloaded(false);
        m.reloaded(true);
        let text = m.render(true);
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert!(
            text.contains("# TYPE egressd_decisions counter\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE egressd_sessions_active gauge\n"),
            "{text}"
        );
        assert!(text.contains("egressd_policy_reloads_total{result=\"error\"} 1\n"));
        assert!(text.contains("egressd_policy_last_reload_success 1\n"));
        assert!(text.contains("egressd_policy_last_reload_timestamp_seconds "));
        // Every sample line is `name{labels} value` with a number for a value.
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            let (_, v) = l.rsplit_once(' ').unwrap();
            assert!(v.parse::<f64>().is_ok(), "{l}");
        }
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(
            labels(&[("profile", "a\"b\\c\nd")]),
            "{profile=\"a\\\"b\\\\c\\nd\"}"
        );
    }

    #[test]
    fn only_get_metrics_is_answered() {
        let m = sample();
        let (s, kind, body) = respond(b"GET /metrics HTTP/1.1\r\nHost: x", &m);
        assert_eq!((s, kind), ("200 OK", PROMETHEUS));
        assert!(body.contains("egressd_decisions_total"));
        let (s, kind, body) = respond(
            b"GET /metrics HTTP/1.1\r\naccept: application/openmetrics-text;version=1.0.0,text/plain;q=0.5",
            &m,
        );
        assert_eq!((s, kind), ("200 OK", OPENMETRICS));
        assert!(body.ends_with("# EOF\n"));
        assert_eq!(respond(b"GET / HTTP/1.1", &m).0, "404 Not Found");
        assert_eq!(
            respond(b"POST /metrics HTTP/1.1", &m).0,
            "405 Method Not Allowed"
        );
        assert_eq!(respond(b"garbage", &m).0, "400 Bad Request");
    }

    #[tokio::test]
    async fn a_slow_or_oversized_request_is_cut_off() {
        // Oversized: answered 431 without reading it all.
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let task = tokio::spawn(serve(server, TIMEOUT));
        client
            .write_all(&vec![b'a'; MAX_HEAD + 2048])
            .await
            .unwrap();
        let mut reply = String::new();
        client.read_to_string(&mut reply).await.unwrap();
        assert!(reply.starts_with("HTTP/1.1 431"), "{reply}");
        task.await.unwrap();
        // Slow: the connection is dropped after the timeout.
        let (mut client, server) = tokio::io::duplex(1024);
        let task = tokio::spawn(serve(server, Duration::from_millis(100)));
        client.write_all(b"GET /metr").await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("a slow client is cut off")
            .unwrap();
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).await.unwrap();
        assert!(reply.is_empty());
    }

    #[tokio::test]
    async fn a_unix_socket_path_is_served_and_a_stale_socket_replaced() {
        let dir = std::env::temp_dir().join(format!("egressd-metrics-{}", std::process::id()));
        let path = dir.join("sub").join("metrics.sock");
        for _ in 0..2 {
            // The second round finds the first one's socket file and takes its place.
            listen(MetricsListen::Unix(path.clone())).await.unwrap();
        }
        let mut s = tokio::net::UnixStream::connect(&path).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text\r\n\r\n")
            .await
            .unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).await.unwrap();
        assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");
        assert!(
            reply.contains(OPENMETRICS) && reply.ends_with("# EOF\n"),
            "{reply}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
