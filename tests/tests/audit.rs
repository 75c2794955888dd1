//! The audit log against a real kernel: every decision recorded with who, what and why; the hash
//! chain catches edits; rotation and restarts keep the chain; nothing is lost silently.

use std::{fs, process::Command};

use egressd_tests::*;
use serde_json::Value;

fn of_session<'a>(records: &'a [Value], session: &str, kind: &str) -> Vec<&'a Value> {
    records
        .iter()
        .filter(|r| r["session"] == session && r["type"] == kind)
        .collect()
}

fn verify(d: &Daemon, files: &[&std::path::Path]) -> std::process::Output {
    let mut c = Command::new(bin("egressctl"));
    c.args(["audit", "--file", d.audit.to_str().unwrap(), "verify"]);
    c.args(files);
    c.output().unwrap()
}

#[test]
fn allowed_and_denied_decisions_and_sessions_are_recorded() {
    let w = world("audit-records");
    let lo = attempt(&w, NOBODY, "loopback-tcp", "127.0.0.1:0");
    assert_eq!(probe_code(&lo), 0, "{}", text(&lo));
    let out = attempt(&w, NOBODY, "tcp", &w.outside.tcp4());
    assert_eq!(probe_code(&out), 3, "{}", text(&out));
    let (lo_session, out_session) = (session_id(&lo), session_id(&out));
    records_after_end(&w.daemon, &lo_session);
    let records = records_after_end(&w.daemon, &out_session);

    let allowed = of_session(&records, &lo_session, "decision");
    let a = allowed
        .iter()
        .find(|r| r["dest"] == "127.0.0.1" && r["hook"] == "connect4")
        .unwrap_or_else(|| panic!("no loopback decision in {allowed:?}"));
    assert_eq!(a["verdict"], "allowed");
    assert_eq!(a["reason"], "loopback");
    assert_eq!(a["pid"], probe_pid(&lo));
    assert_eq!(a["tgid"], probe_pid(&lo));
    assert_eq!(a["uid"], NOBODY);
    assert_eq!(a["comm"], "egressd-probe");
    assert_eq!(a["protocol"], "tcp");
    assert!(a["policy"].as_str().is_some_and(|p| p.len() == 16), "{a}");

    let denied = of_session(&records, &out_session, "decision");
    assert_eq!(denied.len(), 1, "{denied:?}");
    let d = denied[0];
    assert_eq!(d["verdict"], "denied");
    assert_eq!(d["reason"], "default deny");
    assert_eq!(d["dest"], w.outside.v4.as_str());
    assert_eq!(d["port"], PORT);
    assert_eq!(d["hook"], "connect4");
    assert_eq!(d["pid"], probe_pid(&out));
    assert_eq!(d["count"], 1);

    let start = of_session(&records, &out_session, "session_start");
    assert_eq!(start.len(), 1);
    assert_eq!(start[0]["profile"], "airgap");
    assert_eq!(start[0]["uid"], NOBODY);
    assert_eq!(start[0]["argv"][1], "attempt");
    let end = of_session(&records, &out_session, "session_end");
    assert_eq!(
        (
            end[0]["allowed"].clone(),
            end[0]["denied"].clone(),
            end[0]["lost"].clone()
        ),
        (0.into(), 1.into(), 0.into())
    );

    let v = verify(&w.daemon, &[]);
    assert!(v.status.success(), "{}", text(&v));
}

#[test]
fn verify_names_the_line_after_an_edit_a_deletion_or_a_reordering() {
    let w = world("audit-verify");
    for _ in 0..2 {
        let out = attempt(&w, NOBODY, "tcp", &w.outside.tcp4());
        records_after_end(&w.daemon, &session_id(&out));
    }
    let good = fs::read_to_string(&w.daemon.audit).unwrap();
    let lines: Vec<&str> = good.lines().collect();
    assert!(lines.len() >= 6, "{good}");
    let copy = w.scratch.0.join("copy.jsonl");
    let check = |content: String, expect_line: Option<usize>| {
        fs::write(&copy, content).unwrap();
        let out = verify(&w.daemon, &[&copy]);
        match expect_line {
            None => assert!(out.status.success(), "{}", text(&out)),
            Some(n) => {
                assert_eq!(out.status.code(), Some(1), "{}", text(&out));
                let so = String::from_utf8_lossy(&out.stdout);
                assert!(
                    so.contains(&format!("line {n}:")),
                    "expected line {n}: {so}"
                );
            }
        }
    };
    check(good.clone(), None);
    let mut edited: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    edited[2] = edited[2].replacen("\"uid\":", "\"uid\":1", 1);
    check(edited.join("\n") + "\n", Some(4));
    let mut deleted: Vec<&str> = lines.clone();
    deleted.remove(2);
    check(deleted.join("\n") + "\n", Some(3));
    let mut swapped: Vec<&str> = lines.clone();
    swapped.swap(1, 2);
    check(swapped.join("\n") + "\n", Some(2));
}

#[test]
fn rotation_and_restarts_keep_one_chain() {
    let mut w = world_audit("audit-rotate", |_| None, "max_bytes = 800\nkeep = 50");
    for _ in 0..3 {
        let out = attempt(&w, NOBODY, "tcp", &w.outside.tcp4());
        records_after_end(&w.daemon, &session_id(&out));
    }
    w.daemon.kill9();
    w.daemon.spawn();
    let out = attempt(&w, NOBODY, "tcp", &w.outside.tcp4());
    records_after_end(&w.daemon, &session_id(&out));
    let rotated = |n: u32| std::path::PathBuf::from(format!("{}.{n}", w.daemon.audit.display()));
    assert!(rotated(3).exists(), "expected at least three rotated files");
    let v = verify(&w.daemon, &[]);
    assert!(v.status.success(), "{}", text(&v));
    let seqs: Vec<u64> = audit_records(&w.daemon)
        .iter()
        .map(|r| r["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(
        seqs,
        (1..=seqs.len() as u64).collect::<Vec<_>>(),
        "seq must run 1..n across files and restarts"
    );

    // Removing a file from the middle of the chain is caught.
    fs::remove_file(rotated(2)).unwrap();
    let v = verify(&w.daemon, &[]);
    assert_eq!(v.status.code(), Some(1), "{}", text(&v));
}

#[test]
fn export_filters_and_quotes_csv() {
    let w = world("audit-export");
    let lo = attempt(&w, NOBODY, "loopback-tcp", "127.0.0.1:0");
    let out = attempt(&w, NOBODY, "tcp", &w.outside.tcp4());
    let tricky = w
        .daemon
        .run(NOBODY, &["sh", "-c", "echo \"a,b\" > /dev/null"]);
    for o in [&lo, &out, &tricky] {
        records_after_end(&w.daemon, &session_id(o));
    }
    let export = |args: &[&str]| -> String {
        let o = Command::new(bin("egressctl"))
            .args([
                "audit",
                "--file",
                w.daemon.audit.to_str().unwrap(),
                "export",
            ])
            .args(args)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", text(&o));
        String::from_utf8(o.stdout).unwrap()
    };
    let denied = export(&["--verdict", "denied"]);
    let denied: Vec<Value> = denied
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(!denied.is_empty());
    assert!(
        denied.iter().all(|r| r["verdict"] == "denied"),
        "{denied:?}"
    );
    let outside = export(&["--dest", "198.18.0.0/15"]);
    assert!(
        outside.lines().count() >= 1 && !outside.contains("127.0.0.1"),
        "{outside}"
    );
    let one = export(&["--session", &session_id(&lo)]);
    assert!(one.lines().all(|l| l.contains(&session_id(&lo))), "{one}");
    assert!(export(&["--since", "1h"]).lines().count() >= 6);
    assert_eq!(export(&["--until", "2020-01-01"]), "");

    let csv_text = export(&["--format", "csv", "--session", &session_id(&tricky)]);
    let mut rdr = csv::Reader::from_reader(csv_text.as_bytes());
    let headers = rdr.headers().unwrap().clone();
    let argv_col = headers.iter().position(|h| h == "argv").unwrap();
    let rows: Vec<csv::StringRecord> = rdr.records().map(|r| r.unwrap()).collect();
    assert!(
        rows.iter()
            .any(|r| &r[argv_col] == "sh -c echo \"a,b\" > /dev/null"),
        "argv with a comma and quotes did not survive CSV: {csv_text}"
    );
    assert!(
        csv_text.contains("\"sh -c echo \"\"a,b\"\" > /dev/null\""),
        "{csv_text}"
    );

    let ocsf = export(&["--format", "ocsf", "--verdict", "denied"]);
    let first: Value = serde_json::from_str(ocsf.lines().next().unwrap()).unwrap();
    assert_eq!(first["class_uid"], 4001);
    assert_eq!(first["dst_endpoint"]["ip"], w.outside.v4.as_str());
}

#[test]
fn a_flood_through_a_tiny_ring_buffer_is_accounted_for_exactly() {
    // Folding off: every decision is an event of its own, as for decisions that do not repeat.
    let w = world_audit(
        "audit-flood",
        |_| None,
        "ring_buffer_bytes = 4096\nfold_window_ms = 0",
    );
    const N: u64 = 20_000;
    // The sandboxed probe (uid 65534) writes `go.done` next to `go`.
    let markers = w.scratch.shared_dir("markers");
    let go = markers.join("go");
    let flood = format!("{},{N}", w.outside.tcp4());
    let sandbox = w.daemon.spawn_probe(
        NOBODY,
        &["wait-attempt", go.to_str().unwrap(), "flood-udp", &flood],
    );
    wait_for_running_session(&w.daemon);
    // With the daemon stopped nothing drains the 4 KiB ring (46 events): loss is certain, and
    // every lost event must still be counted.
    w.daemon.signal(libc::SIGSTOP);
    fs::write(&go, b"go").unwrap();
    let done = markers.join("go.done");
    let waited = std::panic::catch_unwind(|| wait_until("the flood", 60, || done.exists()));
    w.daemon.signal(libc::SIGCONT);
    waited.unwrap();
    let out = sandbox.wait_with_output().unwrap();
    assert_eq!(probe_code(&out), 0, "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("refused={N} of {N}")),
        "{}",
        text(&out)
    );
    let session = session_id(&out);
    let records = records_after_end(&w.daemon, &session);
    let written: u64 = of_session(&records, &session, "decision")
        .iter()
        .filter(|r| r["hook"] == "sendmsg4" && r["verdict"] == "denied")
        .map(|r| r["count"].as_u64().unwrap())
        .sum();
    let lost: u64 = of_session(&records, &session, "lost")
        .iter()
        .map(|r| r["count"].as_u64().unwrap())
        .sum();
    eprintln!("flood: offered {N}, written {written}, lost {lost}");
    assert!(
        lost > 0,
        "a stopped reader and a 4 KiB ring must lose events (written {written})"
    );
    assert_eq!(
        written + lost,
        N,
        "written {written} + lost {lost} != offered {N}"
    );
    let end = &of_session(&records, &session, "session_end")[0];
    assert_eq!(end["lost"], lost);
    assert_eq!(end["denied"], N);
    assert_eq!(w.outside.counts(), Counts::default());
}

#[test]
fn decisions_taken_while_the_daemon_is_down_are_written_after_restart() {
    let mut w = world("audit-restart");
    let go = w.scratch.0.join("go");
    let sandbox = w.daemon.spawn_probe(
        NOBODY,
        &[
            "wait-attempt",
            go.to_str().unwrap(),
            "tcp",
            &w.outside.tcp4(),
        ],
    );
    wait_for_running_session(&w.daemon);
    w.daemon.kill9();
    fs::write(&go, b"go").unwrap();
    let out = sandbox.wait_with_output().unwrap();
    assert_eq!(probe_code(&out), 3, "{}", text(&out));
    let session = session_id(&out);
    // The event waits in the pinned ring buffer; the restarted daemon adopts the session, drains
    // the ring, and ends the (now empty) session.
    w.daemon.spawn();
    let records = records_after_end(&w.daemon, &session);
    let denied = of_session(&records, &session, "decision");
    assert_eq!(denied.len(), 1, "{records:?}");
    assert_eq!(denied[0]["pid"], probe_pid(&out));
    assert_eq!(denied[0]["verdict"], "denied");
    let v = verify(&w.daemon, &[]);
    assert!(v.status.success(), "{}", text(&v));
}

#[test]
fn records_are_copied_to_syslog_in_rfc5424() {
    require_root();
    let scratch = Scratch::new("audit-syslog");
    let sock_path = scratch.0.join("syslog.sock");
    let sink = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sink.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let outside = Outside::new(&scratch);
    let daemon = Daemon::start_with(
        &scratch,
        None,
        &format!("syslog = \"{}\"", sock_path.display()),
    );
    let out = daemon.run(
        NOBODY,
        &[probe().to_str().unwrap(), "attempt", "tcp", &outside.tcp4()],
    );
    assert_eq!(probe_code(&out), 3, "{}", text(&out));
    let session = session_id(&out);
    let mut buf = vec![0u8; 65536];
    let mut seen_denial = false;
    for _ in 0..20 {
        let Ok(n) = sink.recv(&mut buf) else { break };
        let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
        assert!(
            msg.starts_with('<') && msg.contains(">1 "),
            "not RFC 5424: {msg}"
        );
        if msg.contains(&session) && msg.contains("\"verdict\":\"denied\"") {
            assert!(
                msg.starts_with("<108>1 "),
                "a denial is facility log-audit, severity warning: {msg}"
            );
            seen_denial = true;
            break;
        }
    }
    assert!(seen_denial, "the denial never reached syslog");
    drop(daemon);
    drop(outside);
}

/// `egressctl audit verify --key VK FILES`.
fn verify_key(d: &Daemon, vk: &str, files: &[&std::path::Path]) -> std::process::Output {
    let mut c = Command::new(bin("egressctl"));
    c.args([
        "audit",
        "--file",
        d.audit.to_str().unwrap(),
        "verify",
        "--key",
        vk,
    ]);
    c.args(files);
    c.output().unwrap()
}

#[test]
fn a_sealed_log_verifies_with_the_key_and_a_cut_or_an_edit_does_not() {
    let mut w = world_audit("audit-seal", |_| None, "seal_interval = 1");
    let setup = Command::new(bin("egressctl"))
        .args([
            "audit",
            "--file",
            w.daemon.audit.to_str().unwrap(),
            "setup-keys",
        ])
        .args(["--config", w.daemon.config.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(setup.status.success(), "{}", text(&setup));
    let out = String::from_utf8_lossy(&setup.stdout).to_string();
    let vk = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("egressd-vk1:"))
        .map(|k| format!("egressd-vk1:{k}"))
        .unwrap_or_else(|| panic!("no verification key in {out}"));
    assert!(vk.ends_with("/1"), "interval 1 s: {vk}");
    assert!(out.contains('█'), "a QR code: {out}");
    let state = w.daemon.audit.with_extension("seal");
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        fs::metadata(&state).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // Keys are not made twice without --force.
    let again = Command::new(bin("egressctl"))
        .args([
            "audit",
            "--file",
            w.daemon.audit.to_str().unwrap(),
            "setup-keys",
        ])
        .args(["--config", w.daemon.config.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        !again.status.success() && text(&again).contains("--force"),
        "{}",
        text(&again)
    );

    // The running daemon takes the keys up; sessions, then a few intervals.
    for _ in 0..3 {
        let a = attempt(&w, NOBODY, "tcp", &w.outside.tcp4());
        records_after_end(&w.daemon, &session_id(&a));
        std::thread::sleep(std::time::Duration::from_millis(700));
    }
    std::thread::sleep(std::time::Duration::from_millis(2500));
    // status says how the log is sealed.
    let status = w.daemon.ctl(0).arg("status").output().unwrap();
    let st = text(&status);
    assert!(
        st.contains("sealing:  sealed every 1s (key ") && st.contains("; last seal "),
        "{st}"
    );
    w.daemon.stop();
    let records = audit_records(&w.daemon);
    let seals: Vec<&Value> = records.iter().filter(|r| r["type"] == "seal").collect();
    assert!(
        seals.len() >= 4,
        "start, intervals and stop seals: {seals:?}"
    );
    assert_eq!(seals.last().unwrap()["reason"], "stop");
    assert_eq!(records.last().unwrap()["type"], "seal");
    let epochs: Vec<u64> = seals.iter().map(|s| s["epoch"].as_u64().unwrap()).collect();
    assert!(
        epochs.windows(2).all(|e| e[0] <= e[1]) && epochs.last() > epochs.first(),
        "{epochs:?}"
    );
    // The state holds a later epoch's key, not key_0.
    let st = fs::read_to_string(&state).unwrap();
    let key0 = vk
        .trim_start_matches("egressd-vk1:")
        .split('/')
        .next()
        .unwrap();
    assert!(!st.contains(key0), "key_0 is still in {st}");

    let v = verify_key(&w.daemon, &vk, &[]);
    let t = text(&v);
    assert!(v.status.success(), "{t}");
    assert!(
        t.contains("seals valid") && t.contains("sealed up to"),
        "{t}"
    );
    assert!(!t.contains("UNSEALED") && !t.contains("OPEN END"), "{t}");
    // Without the key: the chain only, and it says the seals were not checked.
    let v = verify(&w.daemon, &[]);
    assert!(
        v.status.success() && text(&v).contains("not checked"),
        "{}",
        text(&v)
    );

    let lines: Vec<String> = fs::read_to_string(&w.daemon.audit)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    let copy = w.scratch.0.join("copy.jsonl");
    // The last three lines deleted (the stop record and its seal among them).
    fs::write(&copy, lines[..lines.len() - 3].join("\n") + "\n").unwrap();
    let v = verify_key(&w.daemon, &vk, &[&copy]);
    let t = text(&v);
    assert!(
        t.contains("UNSEALED") || t.contains("OPEN END") || t.contains("missing seals"),
        "a cut tail must be reported: {t}\n{}",
        lines.join("\n")
    );
    // A line in the middle edited.
    let mut edited = lines.clone();
    let mid = edited.len() / 2;
    edited[mid] = edited[mid].replacen("\"time\":\"2", "\"time\":\"1", 1);
    fs::write(&copy, edited.join("\n") + "\n").unwrap();
    let v = verify_key(&w.daemon, &vk, &[&copy]);
    assert_eq!(v.status.code(), Some(1), "{}", text(&v));
    // A wrong key fails at the first seal.
    let other = format!(
        "egressd-vk1:{}/{}",
        "11".repeat(32),
        vk.split_once('/').unwrap().1
    );
    let v = verify_key(&w.daemon, &other, &[]);
    assert_eq!(v.status.code(), Some(1), "{}", text(&v));
    assert!(text(&v).contains("BAD SEAL"), "{}", text(&v));

    // Exports of a time range, in each format, verify with the key off the machine: from the
    // second session's start (mid-chain) to the end.
    let since = records
        .iter()
        .filter(|r| r["type"] == "session_start")
        .nth(1)
        .expect("a second session")["time"]
        .as_str()
        .unwrap()
        .to_string();
    let export = |format: &str, extra: &[&str]| -> std::path::PathBuf {
        let path = w.scratch.0.join(format!("export-{format}{}", extra.len()));
        let o = Command::new(bin("egressctl"))
            .args([
                "audit",
                "--file",
                w.daemon.audit.to_str().unwrap(),
                "export",
            ])
            .args(["--format", format, "--since", &since, "--output"])
            .arg(&path)
            .args(extra)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", text(&o));
        path
    };
    for format in ["jsonl", "csv", "ocsf"] {
        let file = export(format, &[]);
        let v = verify_key(&w.daemon, &vk, &[&file]);
        let t = text(&v);
        assert!(v.status.success(), "{format}: {t}");
        assert!(
            t.contains("seals valid") && t.contains("the chain starts at seq"),
            "{format}: {t}"
        );
        // An edit inside the export is found: a denied connect shown as allowed.
        let body = fs::read_to_string(&file).unwrap();
        let needle = match format {
            "jsonl" => "\"verdict\":\"denied\"",
            "csv" => "\"\"verdict\"\":\"\"denied\"\"",
            _ => "\\\"verdict\\\":\\\"denied\\\"",
        };
        assert!(body.contains(needle), "{format}: no {needle} in {body}");
        let edited = w.scratch.0.join(format!("edited-{format}"));
        fs::write(
            &edited,
            body.replacen(needle, &needle.replace("denied", "allowed"), 1),
        )
        .unwrap();
        let v = verify_key(&w.daemon, &vk, &[&edited]);
        assert_eq!(
            v.status.code(),
            Some(1),
            "{format}: an edit passed: {}",
            text(&v)
        );
        // And an edit of what a reader of the CSV or the SIEM sees, beside the line it carries.
        let shown = match format {
            "csv" => Some((",denied,", ",allowed,")),
            "ocsf" => Some(("\"status_id\":2", "\"status_id\":1")),
            _ => None,
        };
        if let Some((from, to)) = shown {
            assert!(body.contains(from), "{format}: no {from} in {body}");
            fs::write(&edited, body.replacen(from, to, 1)).unwrap();
            let v = verify_key(&w.daemon, &vk, &[&edited]);
            assert_eq!(v.status.code(), Some(1), "{format}: {}", text(&v));
            assert!(text(&v).contains("the export was edited"), "{}", text(&v));
        }
    }
    // An extract (one verdict) is not a piece of the chain: verify refuses it.
    let extract = export("jsonl", &["--verdict", "denied"]);
    let v = verify_key(&w.daemon, &vk, &[&extract]);
    assert_ne!(v.status.code(), Some(0), "{}", text(&v));
}
