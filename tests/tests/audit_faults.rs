//! The audit log under faults, against a real kernel and real file systems: a tmpfs that fills up
//! and grows again, a file system remounted read-only and back, the log deleted and renamed while
//! written, kill -9 mid-flood (and a power loss's torn line), no syslog listener, and a policy that
//! refuses sessions it cannot record. Each floods denied sends with folding off and ends with
//! `egressctl audit verify` passing and, for the session, written + lost = attempts exactly; each
//! log, edited in one line, then fails verify.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use egressd_tests::*;
use serde_json::Value;

/// A tmpfs of its own for the log, unmounted on drop (after the daemon, before the scratch dir).
struct LogFs(PathBuf);

impl LogFs {
    fn new(scratch: &Scratch, size: &str) -> LogFs {
        let dir = scratch.0.join("logfs");
        fs::create_dir_all(&dir).unwrap();
        mount(
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ],
            &dir,
        );
        LogFs(dir)
    }

    fn log(&self) -> PathBuf {
        self.0.join("audit.jsonl")
    }

    /// Remounts with `opts`. A remount to read-only fails (EBUSY) while a file on it is open for
    /// writing, which the daemon does only for the moment of a flush: retried until it falls
    /// between two.
    fn remount(&self, opts: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = Command::new("mount")
                .args(["-o", &format!("remount,{opts}")])
                .arg(&self.0)
                .output()
                .unwrap();
            if out.status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "remount,{opts}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for LogFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn mount(args: &[&str], dir: &Path) {
    let out = Command::new("mount").args(args).arg(dir).output().unwrap();
    assert!(
        out.status.success(),
        "mount {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A sandboxed flood the test paces: `phases` phases of `n` denied UDP sends each.
struct Flood {
    child: Option<Child>,
    dir: PathBuf,
    n: u64,
    phases: u32,
}

impl Flood {
    fn start(
        d: &Daemon,
        scratch: &Scratch,
        target: &str,
        n: u64,
        phases: u32,
        pause_us: u32,
    ) -> Flood {
        let dir = scratch.0.join("flood");
        fs::create_dir_all(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
        let child = d
            .ctl(NOBODY)
            .args(["run", "--"])
            .arg(probe())
            .args([
                "flood-phases",
                dir.to_str().unwrap(),
                target,
                &n.to_string(),
                &phases.to_string(),
                &pause_us.to_string(),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_for_running_session(d);
        Flood {
            child: Some(child),
            dir,
            n,
            phases,
        }
    }

    /// Lets phase `k` go, without waiting for it.
    fn go(&self, k: u32) {
        fs::write(self.dir.join(format!("go{k}")), b"go").unwrap();
    }

    /// Waits for phase `k`; every send of it was refused.
    fn wait(&self, k: u32) {
        let done = self.dir.join(format!("go{k}.done"));
        wait_until(&format!("flood phase {k}"), 120, || done.exists());
        thread::sleep(Duration::from_millis(50));
        assert_eq!(
            fs::read_to_string(&done).unwrap(),
            self.n.to_string(),
            "every send of phase {k} must be refused"
        );
    }

    fn phase(&self, k: u32) {
        self.go(k);
        self.wait(k);
    }

    /// Waits for the session to end; returns its id.
    fn finish(self) -> String {
        self.finish_with_output().0
    }

    /// Waits for the session to end; returns its id and what egressctl printed.
    fn finish_with_output(mut self) -> (String, String) {
        let out = self.child.take().unwrap().wait_with_output().unwrap();
        let total = self.n * u64::from(self.phases);
        assert!(
            String::from_utf8_lossy(&out.stdout).contains(&format!("refused={total} of {total}")),
            "{}",
            text(&out)
        );
        (session_id(&out), text(&out))
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            for k in 1..=self.phases {
                let _ = fs::write(self.dir.join(format!("go{k}")), b"go");
            }
            let _ = c.wait();
        }
    }
}

fn status(d: &Daemon) -> String {
    text(&d.ctl(0).arg("status").output().unwrap())
}

fn wait_status(d: &Daemon, what: &str, needle: &str) -> String {
    let mut last = String::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        last = status(d);
        if last.contains(needle) {
            return last;
        }
        thread::sleep(Duration::from_millis(50));
    }
    panic!("{what}: status never said {needle:?}:\n{last}");
}

fn count(r: &Value) -> u64 {
    r["count"].as_u64().unwrap_or(1)
}

/// The session's decisions are all its refused sends, and written + lost = `attempts` exactly;
/// its `session_end` says the same. Returns the number lost.
fn assert_exact(records: &[Value], session: &str, attempts: u64) -> u64 {
    let of = |kind: &str| {
        records
            .iter()
            .filter(|r| r["session"] == session && r["type"] == kind)
            .collect::<Vec<_>>()
    };
    let decisions = of("decision");
    for d in &decisions {
        assert!(
            d["hook"] == "sendmsg4" && d["verdict"] == "denied",
            "only the flood's sends: {d}"
        );
    }
    let written: u64 = decisions.iter().map(|r| count(r)).sum();
    let lost: u64 = of("lost").iter().map(|r| count(r)).sum();
    assert_eq!(
        written + lost,
        attempts,
        "written {written} + lost {lost} must be the {attempts} attempts; lost records: {:?}; end: {:?}",
        of("lost"),
        of("session_end")
    );
    let end = of("session_end");
    assert_eq!(end.len(), 1, "one session_end, never lost: {end:?}");
    assert_eq!(end[0]["denied"], attempts, "{}", end[0]);
    assert_eq!(end[0]["lost"], lost, "{}", end[0]);
    let original = of("session_start")
        .into_iter()
        .filter(|r| !r["message"].as_str().is_some_and(|m| m.contains("adopted")))
        .count();
    assert_eq!(original, 1, "the session's start, never lost");
    lost
}

fn verify(files: &[PathBuf]) -> Output {
    Command::new(bin("egressctl"))
        .args([
            "audit",
            "--file",
            files.last().unwrap().to_str().unwrap(),
            "verify",
        ])
        .args(files)
        .output()
        .unwrap()
}

fn assert_verifies(files: &[PathBuf]) -> String {
    let v = verify(files);
    assert!(v.status.success(), "{}", text(&v));
    let out = String::from_utf8_lossy(&v.stdout).into_owned();
    assert!(!out.contains("BROKEN"), "{out}");
    out
}

/// Copies of `files` with one line edited (its time) in the middle of the last one: verify fails.
fn assert_an_edit_breaks(scratch: &Scratch, files: &[PathBuf]) {
    let dir = scratch.0.join("edited");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    let copies: Vec<PathBuf> = files
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let c = dir.join(format!("{i}.jsonl"));
            fs::copy(f, &c).unwrap();
            c
        })
        .collect();
    let last = copies.last().unwrap();
    let text = fs::read_to_string(last).unwrap();
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    let mid = lines.len() / 2;
    assert!(lines.len() >= 3, "{text}");
    let edited = lines[mid].replacen("\"time\":\"20", "\"time\":\"19", 1);
    assert_ne!(edited, lines[mid]);
    lines[mid] = edited;
    fs::write(last, lines.join("\n") + "\n").unwrap();
    let v = verify(&copies);
    assert_eq!(
        v.status.code(),
        Some(1),
        "an edited line must fail verify: {}",
        text_of(&v)
    );
    assert!(String::from_utf8_lossy(&v.stdout).contains("BROKEN"));
}

fn text_of(o: &Output) -> String {
    text(o)
}

fn occurrences(haystack: &str, needle: &str) -> usize {
    haystack.matches(needle).count()
}

#[test]
fn a_full_disk_loses_no_record_silently_and_the_chain_stays_intact() {
    require_root();
    let scratch = Scratch::new("fault-full");
    let outside = Outside::new(&scratch);
    let logfs = LogFs::new(&scratch, "256k");
    let d = Daemon::start_logging_to(
        &scratch,
        None,
        &logfs.log(),
        "fold_window_ms = 0\nspace_left = \"128KiB\"",
    );
    // Control: the same flood outside the sandbox reaches the outside host.
    let before = outside.counts();
    let control = as_nobody(&[
        probe().to_str().unwrap(),
        "attempt",
        "flood-udp",
        &format!("{},100", outside.tcp4()),
    ])
    .output()
    .unwrap();
    assert!(
        text(&control).contains("refused=0 of 100"),
        "{}",
        text(&control)
    );
    let reached = outside.counts();
    assert!(
        reached.udp >= before.udp + 90,
        "the control flood did not arrive: {reached:?}"
    );

    let flood = Flood::start(&d, &scratch, &outside.tcp4(), 5000, 3, 0);
    // 5000 records (~1.7 MB) cannot fit in 256 KiB.
    flood.phase(1);
    let failing = wait_status(&d, "disk full", "FAILING since");
    assert!(failing.contains("disk full"), "{failing}");
    assert!(failing.contains("records lost so far"), "{failing}");
    wait_status(&d, "low space", "LOW ON SPACE");
    flood.phase(2);
    logfs.remount("size=64m");
    let writing = wait_status(&d, "space back", "audit:    writing");
    assert!(!writing.contains("FAILING"), "{writing}");
    flood.phase(3);
    let (session, said) = flood.finish_with_output();
    let records = records_after_end(&d, &session);
    let lost = assert_exact(&records, &session, 15_000);
    assert!(lost > 0, "a full disk must have lost records (counted)");
    // The person at the terminal is told too.
    assert!(
        said.contains(&format!(
            "; {lost} of its records could not be written to the audit log"
        )),
        "{said}"
    );
    assert_eq!(
        outside.counts().udp,
        reached.udp,
        "the sandbox's sends reached the outside host"
    );

    let lost_records: Vec<&Value> = records
        .iter()
        .filter(|r| r["type"] == "lost" && r["session"] == session.as_str())
        .collect();
    assert!(
        lost_records.iter().all(|r| r["reason"] == "disk full"
            && r["since"].is_string()
            && r["until"].is_string()),
        "{lost_records:?}"
    );
    assert!(
        records.iter().any(|r| r["type"] == "daemon"
            && r["message"]
                .as_str()
                .is_some_and(|m| m.contains("below space_left"))),
        "the space_left warning is a record"
    );
    assert!(
        records.iter().any(|r| r["type"] == "daemon"
            && r["message"]
                .as_str()
                .is_some_and(|m| m.contains("could not be written from"))),
        "the recovery is a record"
    );
    // Said once when it began, not once per drain.
    let log = d.log_text();
    assert_eq!(occurrences(&log, "audit: cannot write"), 1, "{log}");
    assert_eq!(occurrences(&log, "is written again after"), 1, "{log}");

    let v = assert_verifies(&[logfs.log()]);
    assert!(v.contains("counted as lost"), "{v}");
    let summary = text(
        &d.ctl(0)
            .args(["audit", "--file", logfs.log().to_str().unwrap(), "summary"])
            .output()
            .unwrap(),
    );
    assert!(
        summary.contains(&format!("lost:     {lost} records (disk full)")),
        "{summary}"
    );
    assert!(summary.contains("log now: writing"), "{summary}");
    assert_an_edit_breaks(&scratch, &[logfs.log()]);
    drop(d);
}

#[test]
fn a_file_system_remounted_read_only_and_back_loses_nothing_silently() {
    require_root();
    let scratch = Scratch::new("fault-ro");
    let outside = Outside::new(&scratch);
    let logfs = LogFs::new(&scratch, "16m");
    let d = Daemon::start_logging_to(&scratch, None, &logfs.log(), "fold_window_ms = 0");
    let flood = Flood::start(&d, &scratch, &outside.tcp4(), 3000, 3, 0);
    flood.phase(1);
    logfs.remount("ro");
    flood.phase(2);
    let failing = wait_status(&d, "read-only", "FAILING since");
    assert!(failing.contains("read-only file system"), "{failing}");
    logfs.remount("rw");
    wait_status(&d, "read-write again", "audit:    writing");
    flood.phase(3);
    let session = flood.finish();
    let records = records_after_end(&d, &session);
    let lost = assert_exact(&records, &session, 9000);
    assert!(lost > 0, "a read-only log must have lost records (counted)");
    assert!(records
        .iter()
        .filter(|r| r["type"] == "lost")
        .all(|r| r["reason"] == "read-only file system"));
    assert_eq!(outside.counts().udp, 0);
    assert_verifies(&[logfs.log()]);
    assert_an_edit_breaks(&scratch, &[logfs.log()]);
    drop(d);
}

#[test]
fn a_log_deleted_and_renamed_while_written_continues_the_chain_and_says_so() {
    let w = world_audit("fault-replaced", |_| None, "fold_window_ms = 0");
    let log = w.daemon.audit.clone();
    let saved = w.scratch.0.join("deleted-but-linked.jsonl");
    let renamed = w.scratch.0.join("renamed.jsonl");
    let flood = Flood::start(&w.daemon, &w.scratch, &w.outside.tcp4(), 3000, 3, 0);
    flood.phase(1);
    // Deleted: a hard link keeps what was written before for the count (the path is gone all the
    // same, as after `rm`).
    fs::hard_link(&log, &saved).unwrap();
    fs::remove_file(&log).unwrap();
    flood.phase(2);
    wait_until("a new log file", 10, || log.exists());
    fs::rename(&log, &renamed).unwrap();
    flood.phase(3);
    let session = flood.finish();
    wait_until("the session's end", 15, || {
        records_in(std::slice::from_ref(&log))
            .iter()
            .any(|r| r["type"] == "session_end" && r["session"] == session.as_str())
    });
    let files = [saved.clone(), renamed.clone(), log.clone()];
    let records = records_in(&files);
    assert_eq!(
        assert_exact(&records, &session, 9000),
        0,
        "nothing was lost"
    );
    let continued: Vec<&Value> = records
        .iter()
        .filter(|r| r["type"] == "log_continued")
        .collect();
    assert_eq!(continued.len(), 2, "{continued:?}");
    let v = assert_verifies(&files);
    assert_eq!(occurrences(&v, "removed or renamed away"), 2, "{v}");
    // The current file alone verifies too, and says it starts where another file ended; a
    // deletion inside the chain does not verify.
    let v = assert_verifies(std::slice::from_ref(&log));
    assert!(v.contains("not among those checked"), "{v}");
    let v = verify(&[saved.clone(), log.clone()]);
    assert_eq!(
        v.status.code(),
        Some(1),
        "the renamed file's lines are missing: {}",
        text(&v)
    );
    assert_an_edit_breaks(&w.scratch, &files);
}

#[test]
fn kill_9_mid_flood_and_a_torn_line_are_recorded_and_every_decision_accounted_for() {
    let mut w = world_audit("fault-kill9", |_| None, "fold_window_ms = 0");
    let log = w.daemon.audit.clone();
    let flood = Flood::start(&w.daemon, &w.scratch, &w.outside.tcp4(), 20_000, 2, 20);
    flood.go(1);
    // Killed mid-flood: once the flood's decisions are being written.
    wait_until("the flood's first decisions in the log", 20, || {
        fs::read_to_string(&log).is_ok_and(|t| t.contains("\"hook\":\"sendmsg4\""))
    });
    thread::sleep(Duration::from_millis(200));
    w.daemon.kill9();
    // What a power loss leaves: the last line cut in half.
    let text = fs::read(&log).unwrap();
    let start = text[..text.len() - 1]
        .iter()
        .rposition(|b| *b == b'\n')
        .map_or(0, |p| p + 1);
    assert!(
        String::from_utf8_lossy(&text[start..]).contains("\"type\":\"decision\""),
        "the line cut is one of the flood's decisions"
    );
    let cut = start + (text.len() - 1 - start) / 2;
    fs::write(&log, &text[..cut]).unwrap();
    thread::sleep(Duration::from_millis(300));
    w.daemon.spawn();
    flood.wait(1);
    flood.phase(2);
    let session = flood.finish();
    let records = records_after_end(&w.daemon, &session);
    let lost = assert_exact(&records, &session, 40_000);
    assert!(lost > 0, "at least the cut line is lost (counted)");
    let crash: Vec<&Value> = records.iter().filter(|r| r["type"] == "crash").collect();
    assert_eq!(crash.len(), 1, "{crash:?}");
    assert_eq!(crash[0]["offset"], start as u64, "{}", crash[0]);
    assert!(records.iter().any(|r| r["type"] == "lost"
        && r["session"] == session.as_str()
        && r["reason"] == "egressd stopped before writing them"));
    let v = assert_verifies(std::slice::from_ref(&log));
    assert!(
        v.contains("a torn line") && v.contains("left by a crash"),
        "{v}"
    );
    assert_an_edit_breaks(&w.scratch, std::slice::from_ref(&log));
}

/// The same identical sends as the tiny-ring test in audit.rs (which, with folding off, loses
/// events: its control), with folding on: the kernel counts the repeats, so a stopped reader and
/// a 4 KiB ring lose none, and a graceful restart and a kill -9 neither repeat nor skip a count.
#[test]
fn repeats_counted_in_the_kernel_are_exact_through_a_stopped_reader_and_restarts() {
    let mut w = world_audit("fold-kernel", |_| None, "ring_buffer_bytes = 4096");
    let flood = Flood::start(&w.daemon, &w.scratch, &w.outside.tcp4(), 20_000, 3, 0);
    // Phase 1 with egressd stopped: nothing drains the ring, which holds 46 events.
    w.daemon.signal(libc::SIGSTOP);
    flood.go(1);
    let waited = std::panic::catch_unwind(|| flood.wait(1));
    w.daemon.signal(libc::SIGCONT);
    waited.unwrap();
    // Phase 2 after a graceful restart, phase 3 after kill -9 (with repeats not yet written).
    w.daemon.stop();
    w.daemon.spawn();
    flood.phase(2);
    thread::sleep(Duration::from_millis(1500));
    flood.go(3);
    thread::sleep(Duration::from_millis(20));
    w.daemon.kill9();
    w.daemon.spawn();
    flood.wait(3);
    let session = flood.finish();
    let records = std::panic::catch_unwind(|| records_after_end(&w.daemon, &session))
        .unwrap_or_else(|_| panic!("no session_end; egressd's log:\n{}", w.daemon.log_text()));
    let lost = std::panic::catch_unwind(|| assert_exact(&records, &session, 60_000))
        .unwrap_or_else(|e| {
            eprintln!("egressd's log:\n{}", w.daemon.log_text());
            std::panic::resume_unwind(e)
        });
    let ring_lost = records
        .iter()
        .filter(|r| r["type"] == "lost" && r["session"] == session.as_str())
        .filter(|r| r["reason"] != "egressd stopped before writing them")
        .count();
    assert_eq!(ring_lost, 0, "no event lost to the ring: {records:?}");
    let decisions: Vec<&Value> = records
        .iter()
        .filter(|r| r["type"] == "decision" && r["session"] == session.as_str())
        .collect();
    assert_eq!(
        decisions[0]["count"], 1,
        "the first occurrence: {}",
        decisions[0]
    );
    assert!(
        decisions.len() < 200,
        "60,000 identical sends are a few records with counts, not {}",
        decisions.len()
    );
    eprintln!(
        "folded: {} records for 60000 sends, {lost} counted lost after kill -9",
        decisions.len()
    );
    assert_eq!(w.outside.counts(), Counts::default());
    assert_verifies(std::slice::from_ref(&w.daemon.audit));
}

#[test]
fn no_syslog_listener_never_costs_a_record() {
    require_root();
    let scratch = Scratch::new("fault-syslog");
    let outside = Outside::new(&scratch);
    let dev_log = scratch.0.join("dev-log");
    let d = Daemon::start_with(
        &scratch,
        None,
        &format!("fold_window_ms = 0\nsyslog = \"{}\"", dev_log.display()),
    );
    // Paced (20 us between sends): what this test is about is the syslog copy, not whether an
    // unpaced flood outruns the 1 MiB ring on a loaded machine (counted, but another test's topic).
    let flood = Flood::start(&d, &scratch, &outside.tcp4(), 10_000, 2, 20);
    flood.phase(1);
    let s = wait_status(&d, "syslog", "syslog copy failing");
    assert!(s.contains("audit:    writing"), "{s}");
    // Control: with a listener the copies arrive.
    let listener = std::os::unix::net::UnixDatagram::bind(&dev_log).unwrap();
    listener
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let reader = thread::spawn(move || {
        let mut buf = vec![0u8; 8192];
        let mut got = 0u64;
        while let Ok(n) = listener.recv(&mut buf) {
            if String::from_utf8_lossy(&buf[..n]).contains("\"sendmsg4\"") {
                got += 1;
            }
            if got >= 100 {
                break;
            }
        }
        got
    });
    flood.phase(2);
    let session = flood.finish();
    let records = records_after_end(&d, &session);
    assert_eq!(
        assert_exact(&records, &session, 20_000),
        0,
        "nothing lost to a missing syslog"
    );
    assert_eq!(
        reader.join().unwrap(),
        100,
        "the syslog copy works once there is a listener"
    );
    let log = d.log_text();
    assert_eq!(
        occurrences(&log, "fails: No such file"),
        1,
        "said once, not per copy: {log}"
    );
    assert_verifies(std::slice::from_ref(&d.audit));
    assert_an_edit_breaks(&scratch, std::slice::from_ref(&d.audit));
    drop(d);
}

#[test]
fn refuse_mode_refuses_new_sessions_while_the_disk_is_full_and_keeps_enforcing() {
    require_root();
    let scratch = Scratch::new("fault-refuse");
    let outside = Outside::new(&scratch);
    let logfs = LogFs::new(&scratch, "256k");
    let d = Daemon::start_logging_to(
        &scratch,
        None,
        &logfs.log(),
        "fold_window_ms = 0\ndisk_full_action = \"refuse\"",
    );
    let marks = scratch.0.join("marks");
    fs::create_dir_all(&marks).unwrap();
    fs::set_permissions(&marks, fs::Permissions::from_mode(0o777)).unwrap();
    let ran = marks.join("ran");
    let flood = Flood::start(&d, &scratch, &outside.tcp4(), 200, 1, 0);
    // Fill the file system from outside, as another program would.
    let filler = logfs.0.join("filler");
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=4k"])
        .arg(format!("of={}", filler.display()))
        .stderr(Stdio::null())
        .status();
    let refused = d.run(NOBODY, &["touch", ran.to_str().unwrap()]);
    assert!(!refused.status.success(), "{}", text(&refused));
    let why = text(&refused);
    assert!(
        why.contains("disk_full_action") && why.contains("free space"),
        "{why}"
    );
    assert!(!ran.exists(), "a refused session ran its command");
    // The running session stays enforced.
    flood.phase(1);
    fs::remove_file(&filler).unwrap();
    let ok = d.run(NOBODY, &["touch", ran.to_str().unwrap()]);
    assert!(ok.status.success(), "{}", text(&ok));
    assert!(ran.exists());
    let session = flood.finish();
    let records = records_after_end(&d, &session);
    assert_exact(&records, &session, 200);
    assert_eq!(outside.counts().udp, 0);
    assert_verifies(&[logfs.log()]);
    assert_an_edit_breaks(&scratch, &[logfs.log()]);
    drop(d);
}
