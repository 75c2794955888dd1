//! The DNS filter against a real kernel: every query of a sandbox is redirected to egressd's
//! resolver, names outside `dns_allow` never reach the upstream (a DNS server on an outside host,
//! which logs what it gets), and allowed answers open their addresses until the TTL ends.

use std::{fs, process::Command};

use egressd_tests::*;

/// A loopback address like a local stub resolver's (127.0.0.53), on which nothing listens here:
/// should a redirect ever fail, the query goes nowhere rather than to this machine's resolver.
const STUB: &str = "127.0.0.153:53";

struct DnsWorld {
    server: DnsServer,
    w: World,
}

fn dns_world(tag: &str) -> DnsWorld {
    dns_world_with(tag, &[])
}

/// `dns_world` whose upstream also has the records `extra` (the dns-server's syntax).
fn dns_world_with(tag: &str, extra: &[String]) -> DnsWorld {
    dns_world_audit(tag, extra, "")
}

/// `dns_world_with` whose daemon's `[audit]` table gets `audit_extra`.
fn dns_world_audit(tag: &str, extra: &[String], audit_extra: &str) -> DnsWorld {
    let w = world_audit(
        tag,
        |o| {
            Some(format!(
                r#"default_profile = "dev"
[profiles.dev]
dns_allow = ["git.corp.test", "*.llm.internal"]
[dns]
port = {}
upstream = ["{}:53"]
ttl_min_secs = 1
"#,
                dns_port(),
                o.v4
            ))
        },
        audit_extra,
    );
    let server = DnsServer::start(
        &w.outside,
        &w.scratch,
        &[
            format!("git.corp.test={}/2", w.outside.v4),
            format!("model.llm.internal={}/60", w.outside.v6),
            format!("secret.attacker.test={}/60", w.outside.v4),
        ]
        .into_iter()
        .chain(extra.iter().cloned())
        .collect::<Vec<_>>(),
    );
    DnsWorld { server, w }
}

/// Runs `script` in a session as nobody; what it printed, which must be `want` lines.
fn session_lines(d: &Daemon, script: &str, want: usize) -> (std::process::Output, Vec<String>) {
    let out = d.run(NOBODY, &["sh", "-c", script]);
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(lines.len(), want, "{}", text(&out));
    (out, lines)
}

fn dns_records(d: &Daemon) -> Vec<serde_json::Value> {
    audit_records(d)
        .into_iter()
        .filter(|r| r["type"] == "dns")
        .collect()
}

#[test]
fn names_outside_dns_allow_never_leave_the_machine() {
    let DnsWorld { server, w } = dns_world("dns-deny");
    let (v4, v6) = (w.outside.v4.clone(), w.outside.v6.clone());
    let ways: Vec<(&str, String)> = vec![
        ("udp", STUB.into()),
        ("udp-connected", STUB.into()),
        ("tcp", STUB.into()),
        ("udp", "[::ffff:127.0.0.153]:53".into()),
        ("udp", format!("{v4}:53")),
        ("udp-connected", format!("{v4}:53")),
        ("tcp", format!("{v4}:53")),
        ("udp", format!("[{v6}]:53")),
        ("tcp", format!("[{v6}]:53")),
    ];
    let probe = probe();
    for (i, (mode, server_addr)) in ways.iter().enumerate() {
        let name = format!("leak{i}.secret.attacker.test");
        let out = w.daemon.run(
            NOBODY,
            &[
                probe.to_str().unwrap(),
                "dns-query",
                mode,
                server_addr,
                &name,
            ],
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains("rcode=NXDomain answers= "),
            "{mode} to {server_addr}: not answered NXDOMAIN:\n{}",
            text(&out)
        );
        // The person at the terminal is told, at the session's end, next to the connections.
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(" denied, 1 DNS name denied"),
            "{mode} to {server_addr}: the end line does not count the denied name:\n{}",
            text(&out)
        );
        if mode.starts_with("udp") {
            assert!(
                stdout.contains(&format!("from={server_addr}")),
                "{mode} to {server_addr}: the answer did not come from the server asked:\n{}",
                text(&out)
            );
        }
    }
    assert_eq!(
        server.queries(),
        Vec::<String>::new(),
        "a denied name reached the upstream server"
    );
    let records = dns_records(&w.daemon);
    for (i, (mode, server_addr)) in ways.iter().enumerate() {
        let name = format!("leak{i}.secret.attacker.test");
        let r = records
            .iter()
            .find(|r| r["qname"] == name.as_str())
            .unwrap_or_else(|| panic!("no dns record for {name} ({mode} to {server_addr})"));
        assert_eq!(r["verdict"], "denied", "{r}");
        assert_eq!(r["reason"], "name not in dns_allow", "{r}");
        assert_eq!(r["qtype"], "A", "{r}");
        assert_eq!(r["uid"], NOBODY, "{r}");
        assert_eq!(r["comm"], "egressd-probe", "{r}");
        let asked: std::net::SocketAddr = server_addr.parse().unwrap();
        let asked_ip = match asked.ip() {
            std::net::IpAddr::V6(v6) => v6
                .to_ipv4_mapped()
                .map(std::net::IpAddr::V4)
                .unwrap_or(std::net::IpAddr::V6(v6)),
            ip => ip,
        };
        assert_eq!(r["dest"], asked_ip.to_string(), "{r}");
        assert_eq!(
            r["protocol"],
            if *mode == "tcp" { "tcp" } else { "udp" },
            "{r}"
        );
    }
    // The redirect itself is a decision of its own in the log.
    assert!(audit_records(&w.daemon)
        .iter()
        .any(|r| r["type"] == "decision" && r["verdict"] == "redirected" && r["port"] == 53));
}

#[test]
fn an_allowed_name_opens_its_addresses_until_the_ttl_ends() {
    let DnsWorld { server, w } = dns_world("dns-allow");
    let probe = probe();
    let p = probe.display();
    let (v4, v6) = (&w.outside.v4, &w.outside.v6);
    // One session: resolve (TTL 2 s), connect, try an address no answer gave, wait out the TTL,
    // connect again.
    let script = format!(
        "{p} dns-query udp {STUB} git.corp.test A; \
         {p} attempt tcp {v4}:{PORT}; \
         {p} attempt tcp [{v6}]:{PORT}; \
         sleep 3.5; \
         {p} attempt tcp {v4}:{PORT}"
    );
    let (out, lines) = session_lines(&w.daemon, &script, 4);
    // The control for the denied-name count: an allowed name is not counted as denied.
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("DNS name"),
        "{}",
        text(&out)
    );
    assert_eq!(
        lines[0],
        format!("rcode=NoError answers={v4} from={STUB}"),
        "{}",
        text(&out)
    );
    assert!(
        lines[1].starts_with("allowed"),
        "the answer's address was not opened:\n{}",
        text(&out)
    );
    assert!(
        lines[2].starts_with("denied"),
        "an address no answer gave was reachable:\n{}",
        text(&out)
    );
    assert!(
        lines[3].starts_with("denied"),
        "the address stayed open after its TTL:\n{}",
        text(&out)
    );
    assert_eq!(
        w.outside.counts().tcp,
        1,
        "the outside host must see exactly the one connection made within the TTL"
    );
    // A second session does not inherit the first one's answers; over TCP, an AAAA record under
    // a wildcard pattern opens its IPv6 address for this session only (egressd asks upstream over
    // UDP, whatever the client used).
    let script = format!(
        "{p} attempt tcp [{v6}]:{PORT}; \
         {p} dns-query tcp [{v6}]:53 model.llm.internal AAAA; \
         {p} attempt tcp [{v6}]:{PORT}; \
         {p} attempt tcp {v4}:{PORT}"
    );
    let (out, lines) = session_lines(&w.daemon, &script, 4);
    assert!(lines[0].starts_with("denied"), "{}", text(&out));
    assert_eq!(lines[1], format!("rcode=NoError answers={v6} from=-"));
    assert!(lines[2].starts_with("allowed"), "{}", text(&out));
    assert!(lines[3].starts_with("denied"), "{}", text(&out));
    assert_eq!(w.outside.counts().tcp, 2);
    assert_eq!(
        server.queries(),
        vec![
            "udp git.corp.test A".to_string(),
            "udp model.llm.internal AAAA".to_string()
        ]
    );
    let records = dns_records(&w.daemon);
    let git = records
        .iter()
        .find(|r| r["qname"] == "git.corp.test")
        .expect("dns record of git.corp.test");
    assert_eq!(git["verdict"], "allowed");
    assert_eq!(git["answers"], serde_json::json!([v4]));
    assert_eq!(git["ttl"], 2);
    let opened = audit_records(&w.daemon);
    assert!(
        opened.iter().any(|r| r["type"] == "decision"
            && r["dest"] == v4.as_str()
            && r["verdict"] == "allowed"
            && r["reason"] == "address of an allowed name (dns_allow)"),
        "no allowed decision naming the DNS answer"
    );
}

/// An allowed name asked again within its TTL is answered from egressd's cache: the upstream
/// server is asked once, yet every asking session (the control: a session that has not asked is
/// still refused) gets the address opened and a record saying where the answer came from. Past
/// the TTL the upstream is asked again.
#[test]
fn an_allowed_name_asked_again_is_answered_from_the_cache_until_its_ttl_ends() {
    let DnsWorld { server, w } = dns_world("dns-cache");
    let probe = probe();
    let p = probe.display();
    let v6 = &w.outside.v6;
    let first = w.daemon.run(
        NOBODY,
        &[
            "sh",
            "-c",
            &format!("{p} dns-query udp {STUB} model.llm.internal AAAA"),
        ],
    );
    assert_eq!(
        String::from_utf8_lossy(&first.stdout).trim(),
        format!("rcode=NoError answers={v6} from={STUB}"),
        "{}",
        text(&first)
    );
    // A second session: refused before it asks, opened by the cached answer.
    let script = format!(
        "{p} attempt tcp [{v6}]:{PORT}; \
         {p} dns-query udp {STUB} model.llm.internal AAAA; \
         {p} attempt tcp [{v6}]:{PORT}"
    );
    let (out, lines) = session_lines(&w.daemon, &script, 3);
    assert!(lines[0].starts_with("denied"), "{}", text(&out));
    assert_eq!(lines[1], format!("rcode=NoError answers={v6} from={STUB}"));
    assert!(lines[2].starts_with("allowed"), "{}", text(&out));
    assert_eq!(w.outside.counts().tcp, 1);
    // git.corp.test has a TTL of 2 s: asked twice at once, then after the TTL.
    let script = format!(
        "{p} dns-query udp {STUB} git.corp.test A; \
         {p} dns-query udp {STUB} git.corp.test A; \
         sleep 2.5; \
         {p} dns-query udp {STUB} git.corp.test A"
    );
    let out = w.daemon.run(NOBODY, &["sh", "-c", &script]);
    let v4 = &w.outside.v4;
    let want = format!("rcode=NoError answers={v4} from={STUB}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .collect::<Vec<_>>(),
        vec![want.as_str(); 3],
        "{}",
        text(&out)
    );
    assert_eq!(
        server.queries(),
        vec![
            "udp model.llm.internal AAAA".to_string(),
            "udp git.corp.test A".to_string(),
            "udp git.corp.test A".to_string(),
        ],
        "the upstream is asked once per TTL"
    );
    let records = dns_records(&w.daemon);
    let reasons = |name: &str| -> Vec<String> {
        records
            .iter()
            .filter(|r| r["qname"] == name)
            .map(|r| {
                assert_eq!(r["verdict"], "allowed", "{r}");
                r["reason"].as_str().unwrap_or_default().to_string()
            })
            .collect()
    };
    let cached = "dns_allow; answered from egressd's cache (upstream not asked)";
    assert_eq!(reasons("model.llm.internal"), ["dns_allow", cached]);
    assert_eq!(reasons("git.corp.test"), ["dns_allow", cached, "dns_allow"]);
    // The cached answer's TTL is what is left of the upstream's 60 s.
    let model: Vec<&serde_json::Value> = records
        .iter()
        .filter(|r| r["qname"] == "model.llm.internal")
        .collect();
    assert_eq!(model[0]["ttl"], 60, "{}", model[0]);
    assert!(
        model[1]["ttl"]
            .as_u64()
            .is_some_and(|t| (50..=60).contains(&t)),
        "{}",
        model[1]
    );
}

#[test]
fn an_empty_or_nxdomain_answer_with_an_soa_is_kept_for_its_minimum() {
    // The upstream gives llm.internal's negative answers an SOA with MINIMUM 2 s; corp.test's
    // come without one (the control: never kept, so asked every time).
    let DnsWorld { server, w } = dns_world_with("dns-negcache", &["soa=llm.internal/2".into()]);
    let probe = probe();
    let p = probe.display();
    let ask = |name: &str, ty: &str| format!("{p} dns-query udp {STUB} {name} {ty}");
    let script = [
        // model.llm.internal has only an AAAA record: its A question gets NODATA.
        ask("model.llm.internal", "A"),
        ask("model.llm.internal", "A"),
        ask("gone.llm.internal", "A"),
        ask("gone.llm.internal", "A"),
        ask("git.corp.test", "AAAA"),
        ask("git.corp.test", "AAAA"),
        "sleep 2.5".into(),
        ask("model.llm.internal", "A"),
    ]
    .join("; ");
    let (out, lines) = session_lines(&w.daemon, &script, 7);
    let (nodata, nx) = (
        format!("rcode=NoError answers= from={STUB}"),
        format!("rcode=NXDomain answers= from={STUB}"),
    );
    assert_eq!(
        lines,
        [&nodata, &nodata, &nx, &nx, &nodata, &nodata, &nodata].map(String::clone),
        "{}",
        text(&out)
    );
    assert_eq!(
        server.queries(),
        [
            "udp model.llm.internal A",
            "udp gone.llm.internal A",
            "udp git.corp.test AAAA",
            "udp git.corp.test AAAA",
            "udp model.llm.internal A",
        ],
        "negative answers with an SOA are asked once per MINIMUM; without one, every time"
    );
    let records = dns_records(&w.daemon);
    let reasons = |name: &str, ty: &str| -> Vec<String> {
        records
            .iter()
            .filter(|r| r["qname"] == name && r["qtype"] == ty)
            .map(|r| r["reason"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    let cached = "dns_allow; answered from egressd's cache (upstream not asked)";
    assert_eq!(
        reasons("model.llm.internal", "A"),
        ["dns_allow", cached, "dns_allow"]
    );
    assert_eq!(reasons("gone.llm.internal", "A"), ["dns_allow", cached]);
    assert_eq!(reasons("git.corp.test", "AAAA"), ["dns_allow", "dns_allow"]);
    assert_eq!(w.outside.counts().tcp, 0, "a negative answer opens nothing");
}

#[test]
fn a_name_asked_over_and_over_is_written_once_with_its_count() {
    const TIMES: u64 = 40;
    let probe = probe();
    let p = probe.display();
    // One process asks a denied name and an allowed one TIMES each, then the session ends, before
    // the fold window (1 s by default) has passed.
    let script = format!(
        "{p} dns-query udp {STUB} x.secret.attacker.test A {TIMES}; \
         {p} dns-query udp {STUB} model.llm.internal AAAA {TIMES}"
    );
    let asked = |tag: &str, audit: &str| {
        let DnsWorld { server, w } = dns_world_audit(tag, &[], audit);
        let (out, lines) = session_lines(&w.daemon, &script, 2 * TIMES as usize);
        let (denied, allowed) = lines.split_at(TIMES as usize);
        assert!(
            denied
                .iter()
                .all(|l| l.starts_with("rcode=NXDomain answers= ")),
            "{}",
            text(&out)
        );
        let v6 = &w.outside.v6;
        let want = format!("rcode=NoError answers={v6} from={STUB}");
        assert!(allowed.iter().all(|l| *l == want), "{}", text(&out));
        assert_eq!(
            server.queries(),
            ["udp model.llm.internal AAAA"],
            "the denied name never leaves; the allowed one is asked once"
        );
        let records = audit_records(&w.daemon);
        let end = records
            .iter()
            .position(|r| r["type"] == "session_end")
            .expect("a session_end record");
        // Every query is in the log, before the session's end: (lines, queries they stand for).
        let of = |name: &str| -> (usize, u64) {
            let lines: Vec<(usize, &serde_json::Value)> = records
                .iter()
                .enumerate()
                .filter(|(_, r)| r["type"] == "dns" && r["qname"] == name)
                .collect();
            assert!(
                lines.iter().all(|(i, _)| *i < end),
                "{name}: after session_end"
            );
            let pids: std::collections::HashSet<String> =
                lines.iter().map(|(_, r)| r["pid"].to_string()).collect();
            assert_eq!(pids.len(), 1, "{name}: one process asked");
            let n = lines
                .iter()
                .map(|(_, r)| r["count"].as_u64().unwrap_or(1))
                .sum();
            (lines.len(), n)
        };
        let counts = (of("x.secret.attacker.test"), of("model.llm.internal"));
        // What the person at the terminal is told counts every query too.
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            stderr.contains(&format!("1 DNS name denied ({TIMES} queries)")),
            "{stderr}"
        );
        counts
    };
    // Folded (the default window): the first asking is a line at once, the repeats one line with
    // their count (the allowed name: its upstream answer, then its first cached answer, then the
    // cached repeats).
    let ((denied_lines, denied), (allowed_lines, allowed)) = asked("dns-fold", "");
    assert_eq!((denied, allowed), (TIMES, TIMES), "a query left uncounted");
    assert_eq!((denied_lines, allowed_lines), (2, 3));
    // The control: with folding off, a line per query.
    let ((denied_lines, denied), (allowed_lines, allowed)) =
        asked("dns-nofold", "fold_window_ms = 0\n");
    assert_eq!((denied, allowed), (TIMES, TIMES));
    assert_eq!(
        (denied_lines, allowed_lines),
        (TIMES as usize, TIMES as usize)
    );
}

/// Repeats counted but not yet written when egressd stops (SIGTERM, as systemd stops it) are
/// written before it exits, ahead of its stop record, while the session asking them runs on; the
/// stop record ends the log, so the next start reads a clean stop, not a crash.
#[test]
fn repeats_counted_when_the_daemon_stops_are_written_before_it_exits() {
    const TIMES: u64 = 30;
    let DnsWorld { server, mut w } = dns_world("dns-fold-stop");
    let markers = w.scratch.shared_dir("markers");
    let asked = markers.join("asked");
    let probe = probe();
    let script = format!(
        "{} dns-query udp {STUB} z.secret.attacker.test A {TIMES} > /dev/null; touch {}; sleep 60",
        probe.display(),
        asked.display()
    );
    let mut sandbox = w
        .daemon
        .ctl(NOBODY)
        .args(["run", "--", "sh", "-c", &script])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_until("the session to have asked", 15, || asked.exists());
    w.daemon.stop();
    let records = audit_records(&w.daemon);
    let _ = sandbox.kill();
    let _ = sandbox.wait();
    let stop = records
        .iter()
        .position(|r| r["type"] == "daemon" && r["message"] == egressd_common::audit::STOP_MESSAGE)
        .expect("the daemon's stop record");
    let asked: Vec<(usize, &serde_json::Value)> = records
        .iter()
        .enumerate()
        .filter(|(_, r)| r["type"] == "dns" && r["qname"] == "z.secret.attacker.test")
        .collect();
    assert!(
        asked.iter().all(|(i, _)| *i < stop),
        "a record after the stop"
    );
    let counted: u64 = asked
        .iter()
        .map(|(_, r)| r["count"].as_u64().unwrap_or(1))
        .sum();
    assert_eq!(counted, TIMES, "queries left unwritten at the stop");
    assert_eq!(
        asked.len(),
        2,
        "the first asking, then the repeats in one record"
    );
    assert!(
        server.queries().is_empty(),
        "a denied name reached the upstream"
    );
    // A record written after the stop record used to make the next egressd write a `crash`.
    w.daemon.spawn();
    // A session after the start: its records come after anything the start wrote.
    let out = w.daemon.run(NOBODY, &["true"]);
    records_after_end(&w.daemon, &session_id(&out));
    let crashes: Vec<serde_json::Value> = audit_records(&w.daemon)
        .into_iter()
        .filter(|r| r["type"] == "crash")
        .collect();
    assert!(
        crashes.is_empty(),
        "a clean stop read as a crash: {crashes:?}"
    );
    w.daemon.stop();
}

#[test]
fn getaddrinfo_in_a_sandbox_resolves_allowed_names_only() {
    let DnsWorld { server, w } = dns_world("dns-gai");
    // The sandbox sees a resolv.conf naming a loopback stub, as on a desktop with
    // systemd-resolved; a private mount namespace keeps the machine's own files untouched.
    let resolv = w.scratch.0.join("resolv.conf");
    fs::write(
        &resolv,
        "nameserver 127.0.0.153\noptions timeout:2 attempts:1\n",
    )
    .unwrap();
    let nss = w.scratch.0.join("nsswitch.conf");
    fs::write(&nss, "hosts: files dns\n").unwrap();
    let resolve = |name: &str| {
        let inner = format!(
            "mount --bind {} /etc/resolv.conf && mount --bind {} /etc/nsswitch.conf && \
             exec setpriv --reuid={NOBODY} --regid={NOBODY} --clear-groups -- \
             {} --socket {} run -- {} resolve {name}",
            resolv.display(),
            nss.display(),
            bin("egressctl").display(),
            w.daemon.socket.display(),
            probe().display()
        );
        Command::new("unshare")
            .args(["-m", "sh", "-c", &inner])
            .output()
            .unwrap()
    };
    let out = resolve("git.corp.test");
    assert_eq!(
        probe_code(&out),
        0,
        "{}\n{:?}",
        text(&out),
        dns_records(&w.daemon)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&w.outside.v4),
        "{}",
        text(&out)
    );
    let out = resolve("secret.attacker.test");
    assert_eq!(
        probe_code(&out),
        3,
        "a name outside dns_allow resolved:\n{}",
        text(&out)
    );
    let out = resolve("localhost");
    assert_eq!(probe_code(&out), 0, "{}", text(&out));
    let queries = server.queries();
    assert!(
        !queries.is_empty() && queries.iter().all(|q| q.contains(" git.corp.test ")),
        "the upstream saw other names than the allowed one: {queries:?}"
    );
    assert!(dns_records(&w.daemon)
        .iter()
        .any(|r| r["qname"] == "secret.attacker.test" && r["verdict"] == "denied"));
}

#[test]
fn a_malformed_query_gets_formerr_is_audited_and_harms_nothing() {
    let DnsWorld { server, w } = dns_world("dns-garbage");
    let probe = probe();
    let garbage = format!("abcd{}", "ff".repeat(24));
    let out = w.daemon.run(
        NOBODY,
        &[probe.to_str().unwrap(), "dns-raw", STUB, &garbage],
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("rcode=FormErr id=abcd from={STUB}"),
        "{}",
        text(&out)
    );
    // The resolver still answers.
    let out = w.daemon.run(
        NOBODY,
        &[
            probe.to_str().unwrap(),
            "dns-query",
            "udp",
            STUB,
            "after.attacker.test",
        ],
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("rcode=NXDomain"),
        "{}",
        text(&out)
    );
    assert!(server.queries().is_empty());
    let records = dns_records(&w.daemon);
    assert!(
        records.iter().any(|r| r["verdict"] == "denied"
            && r["rcode"] == "Form Error"
            && r["reason"]
                .as_str()
                .unwrap_or("")
                .starts_with("malformed query")),
        "no record of the malformed query: {records:?}"
    );
}
