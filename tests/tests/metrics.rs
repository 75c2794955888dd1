//! The metrics endpoint against a real kernel: its counters agree with the audit log, and a real
//! Prometheus (when installed) scrapes them.

use std::{
    collections::BTreeMap,
    fs,
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    process::{Child, Command, Stdio},
    time::Duration,
};

use egressd_tests::*;
use serde_json::Value;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One HTTP/1.1 request over loopback: the status line and the body.
fn http(port: u16, request: &str) -> (String, String, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    let (head, body) = reply.split_once("\r\n\r\n").unwrap_or((&reply, ""));
    let status = head.lines().next().unwrap_or("").to_string();
    (status, head.to_string(), body.to_string())
}

/// `name{labels} value` lines of family `name`: (labels, value).
fn samples(text: &str, name: &str) -> Vec<(BTreeMap<String, String>, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            (n == name).then(|| {
                let labels = labels
                    .split(',')
                    .filter_map(|kv| kv.split_once('='))
                    .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
                    .collect();
                (labels, value.parse().unwrap())
            })
        })
        .collect()
}

/// The audit log's decision records: sum of `count` per (hook, verdict).
fn log_decisions(records: &[Value]) -> BTreeMap<(String, String), u64> {
    let mut sums = BTreeMap::new();
    for r in records.iter().filter(|r| r["type"] == "decision") {
        let key = (
            r["hook"].as_str().unwrap().to_string(),
            r["verdict"].as_str().unwrap().to_string(),
        );
        *sums.entry(key).or_default() += r["count"].as_u64().unwrap_or(1);
    }
    sums
}

fn by_hook_verdict(s: &[(BTreeMap<String, String>, f64)]) -> BTreeMap<(String, String), u64> {
    let mut sums = BTreeMap::new();
    for (labels, v) in s {
        let key = (labels["hook"].clone(), labels["verdict"].clone());
        *sums.entry(key).or_default() += *v as u64;
    }
    sums.retain(|_, v| *v > 0);
    sums
}

/// A Prometheus server, killed when dropped (a failing test too).
struct Prometheus(Child);

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn metrics_agree_with_the_audit_log_and_prometheus_scrapes_them() {
    let port = free_port();
    let w = world_with("metrics", |_| {
        Some(format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n"))
    });
    let lo = attempt(&w, NOBODY, "loopback-tcp", "127.0.0.1:0");
    assert_eq!(probe_code(&lo), 0, "{}", text(&lo));
    let out = attempt(&w, NOBODY, "tcp", &w.outside.tcp4());
    assert_eq!(probe_code(&out), 3, "{}", text(&out));
    records_after_end(&w.daemon, &session_id(&lo));
    let records = records_after_end(&w.daemon, &session_id(&out));
    let reload = w.daemon.ctl(0).args(["policy", "reload"]).output().unwrap();
    assert!(reload.status.success(), "{}", text(&reload));

    let want = log_decisions(&records);
    assert!(
        want.contains_key(&("connect4".into(), "denied".into()))
            && want.contains_key(&("connect4".into(), "allowed".into())),
        "{want:?}"
    );
    let starts = records
        .iter()
        .filter(|r| r["type"] == "session_start")
        .count() as f64;
    let dns = records.iter().filter(|r| r["type"] == "dns").count() as f64;

    // Prometheus text, then OpenMetrics when asked for.
    let (status, head, body) = http(port, "GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 200 OK", "{head}");
    assert!(
        head.contains("Content-Type: text/plain; version=0.0.4"),
        "{head}"
    );
    assert!(!body.contains("# EOF"), "{body}");
    let (status, head, body) = http(
        port,
        "GET /metrics HTTP/1.1\r\nHost: t\r\nAccept: application/openmetrics-text;version=1.0.0,text/plain;q=0.5\r\n\r\n",
    );
    assert_eq!(status, "HTTP/1.1 200 OK", "{head}");
    assert!(
        head.contains("Content-Type: application/openmetrics-text; version=1.0.0; charset=utf-8"),
        "{head}"
    );
    assert!(body.ends_with("# EOF\n"), "{body}");
    eprintln!("scrape:\n{body}");

    let decisions = samples(&body, "egressd_decisions_total");
    assert_eq!(by_hook_verdict(&decisions), want, "{body}");
    assert!(
        decisions.iter().all(|(l, _)| l["profile"] == "airgap"),
        "{body}"
    );
    assert_eq!(
        samples(&body, "egressd_sessions_started_total")[0].1,
        starts,
        "{body}"
    );
    assert_eq!(samples(&body, "egressd_sessions_active")[0].1, 0.0);
    let dns_metric: f64 = samples(&body, "egressd_dns_queries_total")
        .iter()
        .map(|s| s.1)
        .sum();
    assert_eq!(dns_metric, dns, "{body}");
    assert_eq!(samples(&body, "egressd_audit_log_writing")[0].1, 1.0);
    assert_eq!(samples(&body, "egressd_audit_records_lost_total")[0].1, 0.0);
    assert_eq!(
        samples(&body, "egressd_ring_buffer_events_lost_total")[0].1,
        0.0
    );
    assert!(samples(&body, "egressd_audit_log_bytes_written_total")[0].1 > 0.0);
    let reloads = samples(&body, "egressd_policy_reloads_total");
    assert!(
        reloads
            .iter()
            .any(|(l, v)| l["result"] == "ok" && *v == 1.0),
        "{body}"
    );
    assert_eq!(
        samples(&body, "egressd_policy_last_reload_success")[0].1,
        1.0
    );

    // Anything else is refused.
    assert!(http(port, "GET / HTTP/1.1\r\n\r\n").0.contains(" 404 "));
    assert!(http(port, "POST /metrics HTTP/1.1\r\n\r\n")
        .0
        .contains(" 405 "));

    // `cargo xtask bootstrap` installs it (the TEST packages): a missing one is a failure, not a
    // skipped check.
    let prom = std::path::Path::new("/usr/bin/prometheus");
    assert!(
        prom.exists(),
        "/usr/bin/prometheus is missing: run `cargo xtask bootstrap test`"
    );
    let web = free_port();
    let config = w.scratch.0.join("prometheus.yml");
    fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: egressd\n    scrape_interval: 1s\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n"
        ),
    )
    .unwrap();
    let log = fs::File::create(w.scratch.0.join("prometheus.log")).unwrap();
    let _prometheus = Prometheus(
        Command::new(prom)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                w.scratch.0.join("prometheus").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{web}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let mut seen = BTreeMap::new();
    let query = |q: &str| -> Option<Value> {
        let mut s = TcpStream::connect(("127.0.0.1", web)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(
            s,
            "GET /api/v1/query?query={q} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut reply = String::new();
        s.read_to_string(&mut reply).ok()?;
        let body = reply.split_once("\r\n\r\n")?.1;
        // Chunked or not, the JSON object is the text between the outer braces.
        let json = &body[body.find('{')?..=body.rfind('}')?];
        serde_json::from_str(json).ok()
    };
    let prometheus_log = || fs::read_to_string(w.scratch.0.join("prometheus.log")).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(v) = query("egressd_decisions_total") {
            seen = v["data"]["result"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|r| {
                    let key = (
                        r["metric"]["hook"].as_str().unwrap_or("").to_string(),
                        r["metric"]["verdict"].as_str().unwrap_or("").to_string(),
                    );
                    let n: u64 = r["value"][1].as_str().unwrap_or("0").parse().unwrap_or(0);
                    (key, n)
                })
                .filter(|(_, n)| *n > 0)
                .collect();
            if seen == want {
                break;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "Prometheus did not report the audit log's decisions {want:?} (last: {seen:?}):\n{}",
            prometheus_log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let started = query("egressd_sessions_started_total").unwrap();
    assert_eq!(
        started["data"]["result"][0]["value"][1].as_str(),
        Some(starts.to_string().as_str()),
        "{started}"
    );
    eprintln!("prometheus: egressd_decisions_total by (hook, verdict) = {seen:?}");
}
