//! Policy reload, access control on the socket, and uninstall, against a real kernel.

use std::{fs, process::Command};

use egressd_tests::*;

fn allow_outside(o: &Outside, extra: &str) -> String {
    format!(
        "default_profile = \"lan\"\n[profiles.lan]\nallow = [\"{}/32:{PORT}/tcp\"{extra}]\n",
        o.v4
    )
}

#[test]
fn reload_is_root_only_and_a_broken_file_changes_nothing() {
    let w = world_with("reload", |o| Some(allow_outside(o, "")));
    let out = w
        .daemon
        .ctl(NOBODY)
        .args(["policy", "reload"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("only root may reload"),
        "{}",
        text(&out)
    );

    w.daemon
        .write_policy("[profiles.lan]\nallow = [\"10.0.0.1/8\"]\n");
    let out = w.daemon.ctl(0).args(["policy", "reload"]).output().unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("line 2")
            && err.contains("host bits set")
            && err.contains("previous policy stays"),
        "{err}"
    );
    let still = attempt(&w, NOBODY, "tcp", &w.outside.tcp4());
    assert_eq!(
        probe_code(&still),
        0,
        "the old policy did not stay in force:\n{}",
        text(&still)
    );

    w.daemon
        .write_policy("default_profile = \"lan\"\n[profiles.lan]\n");
    let out = w.daemon.ctl(0).args(["policy", "reload"]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let now = attempt(&w, NOBODY, "tcp", &w.outside.tcp4());
    assert_eq!(
        probe_code(&now),
        3,
        "the new policy is not in force:\n{}",
        text(&now)
    );
    // From the third reload on, each half of the double buffer is rewritten from what the daemon
    // knows it holds. Two reloads with the rule put it in both halves; dropping it then must
    // really delete it from the half that comes into force.
    let no_rule = "default_profile = \"lan\"\n[profiles.lan]\n".to_string();
    let with_rule = allow_outside(&w.outside, "");
    for (step, (policy, expected)) in [
        (&with_rule, 0),
        (&with_rule, 0),
        (&no_rule, 3),
        (&no_rule, 3),
        (&with_rule, 0),
    ]
    .into_iter()
    .enumerate()
    {
        w.daemon.write_policy(policy);
        let out = w.daemon.ctl(0).args(["policy", "reload"]).output().unwrap();
        assert!(out.status.success(), "{}", text(&out));
        let now = attempt(&w, NOBODY, "tcp", &w.outside.tcp4());
        assert_eq!(
            probe_code(&now),
            expected,
            "reload {step}: the reloaded policy is not what is in force:\n{}",
            text(&now)
        );
    }

    let show = w
        .daemon
        .ctl(NOBODY)
        .args(["policy", "show", "--json"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    assert_eq!(
        v["policy"]["profiles"]["lan"]["mode"], "enforce",
        "defaults filled in: {v}"
    );
    assert_eq!(v["policy"]["profiles"]["lan"]["loopback"], true);
}

#[test]
fn reloads_during_a_connect_storm_never_leave_a_gap() {
    let w = world_with("storm", |o| Some(allow_outside(o, "")));
    const N: u64 = 1500;
    let storm = format!("{},{}:{},{N}", w.outside.tcp4(), w.outside.v4, PORT + 1);
    let sandbox = w.daemon.spawn_probe(NOBODY, &["attempt", "storm", &storm]);
    wait_for_running_session(&w.daemon);
    // Alternate between two policies that agree on both destinations and differ elsewhere, so
    // every reload writes the other half of the maps and flips.
    let mut reloads = 0;
    while !session_dirs(&w.daemon).is_empty() || reloads == 0 {
        let extra = if reloads % 2 == 0 {
            ", \"192.0.2.0/24\""
        } else {
            ""
        };
        w.daemon.write_policy(&allow_outside(&w.outside, extra));
        let out = w.daemon.ctl(0).args(["policy", "reload"]).output().unwrap();
        assert!(out.status.success(), "{}", text(&out));
        reloads += 1;
        if reloads > 2000 {
            break;
        }
    }
    let out = sandbox.wait_with_output().unwrap();
    let so = String::from_utf8_lossy(&out.stdout);
    assert!(
        so.contains(&format!("allowed_fail=0 denied_ok=0 of {N}")),
        "a reload let a verdict slip ({reloads} reloads):\n{}",
        text(&out)
    );
    assert!(
        reloads >= 5,
        "the storm ended before the reloads ran ({reloads})"
    );
    assert_eq!(
        w.outside.counts().tcp,
        N,
        "the outside host saw a different number of connections"
    );
}

#[test]
fn users_get_only_granted_profiles_and_their_own_sessions() {
    let w = world_with("access", |o| {
        Some(format!(
            "{}[profiles.airgap]\n[access]\neveryone = [\"airgap\"]\n",
            allow_outside(o, "")
                .replace("default_profile = \"lan\"", "default_profile = \"airgap\"")
        ))
    });
    let marker = w.scratch.0.join("ran");
    let out = w
        .daemon
        .ctl(NOBODY)
        .args(["run", "--profile", "lan", "--"])
        .arg(probe())
        .args(["touch", marker.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not granted"),
        "{}",
        text(&out)
    );
    assert!(!marker.exists());
    let root = w
        .daemon
        .ctl(0)
        .args(["run", "--profile", "lan", "--"])
        .arg(probe())
        .args(["attempt", "tcp", &w.outside.tcp4()])
        .output()
        .unwrap();
    assert_eq!(
        probe_code(&root),
        0,
        "root may use any profile:\n{}",
        text(&root)
    );

    // A root session is invisible to another user, and its id gives them nothing.
    let mut sleeper = w
        .daemon
        .ctl(0)
        .args(["run", "--", "sleep", "30"])
        .spawn()
        .unwrap();
    wait_for_running_session(&w.daemon);
    let ps = w
        .daemon
        .ctl(NOBODY)
        .args(["ps", "--json"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&ps.stdout).trim(),
        "[]",
        "{}",
        text(&ps)
    );
    let ps = w.daemon.ctl(0).args(["ps", "--json"]).output().unwrap();
    let sessions: serde_json::Value = serde_json::from_slice(&ps.stdout).unwrap();
    assert_eq!(sessions.as_array().unwrap().len(), 1, "{sessions}");
    // The session's processes are ended by the fixture (cgroup.kill) when the daemon is dropped.
    let _ = sleeper.kill();
    let _ = sleeper.wait();
}

#[test]
fn cleanup_detaches_and_unpins_everything() {
    let mut w = world("cleanup");
    let out = attempt(&w, NOBODY, "tcp", &w.outside.tcp4());
    assert_eq!(probe_code(&out), 3);
    w.daemon.kill9();
    let pins = format!("/sys/fs/bpf/{}", w.daemon.name);
    assert!(fs::metadata(&pins).is_ok());
    let out = Command::new(bin("egressd"))
        .args(w.daemon.args())
        .arg("cleanup")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(fs::metadata(&pins).is_err(), "pins left behind");
    assert!(!w.daemon.cgroup_dir().exists(), "parent cgroup left behind");
    // Nothing is attached any more: the same connect now leaves the machine.
    let direct = Command::new(probe())
        .args(["attempt", "tcp", &w.outside.tcp4()])
        .output()
        .unwrap();
    assert_eq!(probe_code(&direct), 0);
}

#[test]
fn learn_writes_a_profile_allowing_exactly_what_an_audit_session_did() {
    let w = world_with("learn", |_| {
        Some("default_profile = \"watch\"\n[profiles.watch]\nmode = \"audit\"\n".to_string())
    });
    let out = attempt(&w, NOBODY, "tcp", &w.outside.tcp4());
    assert_eq!(
        probe_code(&out),
        0,
        "audit mode blocks nothing:\n{}",
        text(&out)
    );
    let udp = format!("[{}]:{PORT}", w.outside.v6);
    let out6 = attempt(&w, NOBODY, "udp-sendto", &udp);
    assert_eq!(probe_code(&out6), 0, "{}", text(&out6));
    let session = session_id(&out);
    records_after_end(&w.daemon, &session);
    records_after_end(&w.daemon, &session_id(&out6));

    let learned = w
        .daemon
        .ctl(0)
        .args(["policy", "learn", "--session", &session, "--name", "tool"])
        .output()
        .unwrap();
    assert!(learned.status.success(), "{}", text(&learned));
    let profile = String::from_utf8(learned.stdout).unwrap();
    assert!(
        profile.contains(&format!("\"{}/32:{PORT}/tcp\"", w.outside.v4)),
        "{profile}"
    );

    // Adopted as the default profile, it allows that and nothing else.
    w.daemon
        .write_policy(&format!("default_profile = \"tool\"\n{profile}"));
    let reload = w.daemon.ctl(0).args(["policy", "reload"]).output().unwrap();
    assert!(reload.status.success(), "{}", text(&reload));
    let again = attempt(&w, NOBODY, "tcp", &w.outside.tcp4());
    assert_eq!(probe_code(&again), 0, "{}", text(&again));
    let other = attempt(&w, NOBODY, "udp-sendto", &udp);
    assert_eq!(
        probe_code(&other),
        3,
        "a destination of another session was allowed:\n{}",
        text(&other)
    );
}

#[test]
fn stopping_the_daemon_leaves_running_sandboxes_enforced() {
    let mut w = world("sigterm");
    let markers = w.scratch.shared_dir("markers");
    let go = markers.join("go");
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
    w.daemon.signal(libc::SIGTERM);
    wait_until("egressd to exit", 10, || !w.daemon.socket.exists());
    fs::write(&go, b"go").unwrap();
    let out = sandbox.wait_with_output().unwrap();
    assert_eq!(
        probe_code(&out),
        3,
        "a connect after `systemctl stop` got through:\n{}",
        text(&out)
    );
    assert_eq!(w.outside.counts(), Counts::default());
    w.daemon.kill9();
}

/// A connect the supervisor has received when egressd stops is answered before egressd exits:
/// no one else can answer it (egressctl holds the same listener, so the kernel does not fail it),
/// and the sandbox would wait in connect(2) for ever. A tight loop of loopback connects has one in
/// the supervisor's hands at almost any moment; it must run to its end after the stop, with every
/// connect through (answered by egressctl once egressd is gone, judged by the kernel's programs).
#[test]
fn connects_in_flight_when_the_daemon_stops_are_answered() {
    let mut w = world("stopflight");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for c in listener.incoming() {
            drop(c);
        }
    });
    let mut sandbox = w
        .daemon
        .spawn_probe(NOBODY, &["bench", "tcp-connect", &addr, "3"]);
    wait_for_running_session(&w.daemon);
    std::thread::sleep(std::time::Duration::from_millis(500));
    w.daemon.signal(libc::SIGTERM);
    wait_until("egressd to exit", 10, || !w.daemon.socket.exists());
    // The loop runs 3 s; give it ten times that before calling it stuck.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while sandbox.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = sandbox.kill();
            let out = sandbox.wait_with_output().unwrap();
            w.daemon.kill9();
            panic!(
                "a connect stayed unanswered after egressd stopped:\n{}",
                text(&out)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = sandbox.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let r: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!("the probe's result ({e}):\n{}", text(&out));
    });
    assert!(r["ops"].as_f64().unwrap_or(0.0) > 0.0, "{}", text(&out));
    assert_eq!(r["errors"].as_f64(), Some(0.0), "{}", text(&out));
    w.daemon.kill9();
}

#[test]
fn a_session_whose_profile_is_removed_falls_back_to_loopback_only() {
    let w = world_with("removed", |o| Some(allow_outside(o, "")));
    let markers = w.scratch.shared_dir("markers");
    let go = markers.join("go");
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
    w.daemon
        .write_policy("default_profile = \"other\"\n[profiles.other]\n");
    let reload = w.daemon.ctl(0).args(["policy", "reload"]).output().unwrap();
    assert!(reload.status.success(), "{}", text(&reload));
    fs::write(&go, b"go").unwrap();
    let out = sandbox.wait_with_output().unwrap();
    assert_eq!(
        probe_code(&out),
        3,
        "the removed profile's allow rule still applied:\n{}",
        text(&out)
    );
    assert_eq!(w.outside.counts(), Counts::default());
}

/// The unix layer across a daemon restart: while no egressd runs, egressctl lets a session's
/// connects go on to the kernel alone (unix ones refused by the backstop); a restarted egressd
/// takes the session's listener back from egressctl and supervises again, so the session's own
/// unix servers work once more and outside ones stay refused.
#[test]
fn a_restarted_daemon_supervises_a_running_sessions_unix_sockets_again() {
    let mut w = world("unix-restart");
    let dir = w.scratch.0.join("sockets");
    fs::create_dir_all(&dir).unwrap();
    std::os::unix::fs::chown(&dir, Some(NOBODY), Some(NOBODY)).unwrap();
    let probe = probe().display().to_string();
    let outside_sock = dir.join("outside.sock").display().to_string();
    let inside_sock = dir.join("inside.sock").display().to_string();
    // A same-uid command runner outside any session, and its control: from outside it runs a
    // connect to the outside host.
    let mut runner = as_nobody(&[&probe, "runner", &outside_sock])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap();
    wait_until("the runner's socket", 10, || {
        std::path::Path::new(&outside_sock).exists()
    });
    let attempt = format!("{probe} attempt tcp {}", w.outside.tcp4());
    let (gate1, gate2) = (w.scratch.0.join("gate1"), w.scratch.0.join("gate2"));
    let script = format!(
        "{probe} echo-server {inside_sock} >/dev/null 2>&1 & es=$!; \
         while [ ! -S {inside_sock} ]; do sleep 0.05; done; \
         {probe} unix-run {inside_sock} hello >/dev/null; echo up-inside=$?; \
         while [ ! -e {g1} ]; do sleep 0.05; done; \
         {probe} unix-run {inside_sock} hello >/dev/null; echo down-inside=$?; \
         {probe} unix-run {outside_sock} '{attempt}' >/dev/null; echo down-outside=$?; \
         while [ ! -e {g2} ]; do sleep 0.05; done; \
         {probe} unix-run {inside_sock} hello >/dev/null; echo back-inside=$?; \
         {probe} unix-run {outside_sock} '{attempt}' >/dev/null; echo back-outside=$?; \
         kill $es",
        g1 = gate1.display(),
        g2 = gate2.display(),
    );
    let before = w.outside.counts();
    let session = w.daemon.spawn_run(NOBODY, &["sh", "-c", &script]);
    wait_for_running_session(&w.daemon);
    std::thread::sleep(std::time::Duration::from_millis(500));
    w.daemon.kill9();
    fs::write(&gate1, b"").unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    w.daemon.spawn();
    // The socket is bound before the programs load: wait for the adoption itself (a loaded
    // machine takes more than a second to load them in a debug build), then a little more for
    // the listener to be taken back.
    wait_until("the restarted egressd adopting the session", 30, || {
        w.daemon.log_text().contains("adopted running session")
    });
    std::thread::sleep(std::time::Duration::from_millis(500));
    fs::write(&gate2, b"").unwrap();
    let out = session.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    for (phase, code) in [
        // Supervised: the session's own server is reached.
        ("up-inside", 0),
        // No egressd: the backstop refuses every unix connect (EPERM), its own server's included.
        ("down-inside", 3),
        ("down-outside", 3),
        // The restarted egressd supervises again.
        ("back-inside", 0),
        ("back-outside", 3),
    ] {
        assert!(
            stdout.contains(&format!("{phase}={code}\n")),
            "{phase} should exit {code}:\n{}",
            text(&out)
        );
    }
    std::thread::sleep(std::time::Duration::from_millis(700));
    assert_eq!(
        w.outside.counts(),
        before,
        "the runner outside connected for the session"
    );
    // Control: the same runner, asked from outside any session, reaches the outside host.
    let control = as_nobody(&[&probe, "unix-run", &outside_sock, &attempt])
        .output()
        .unwrap();
    assert_eq!(probe_code(&control), 0, "{}", text(&control));
    wait_until("the control's connect on the outside host", 5, || {
        w.outside.counts().tcp > before.tcp
    });
    let _ = runner.kill();
    let _ = runner.wait();
}

/// A stopped egressd (SIGSTOP) answers no connect notification: egressctl sees it stopped and lets
/// the session's connects go on to the kernel's programs, which still judge them (loopback works,
/// the outside host is refused and receives nothing), instead of leaving them waiting.
#[test]
fn a_stopped_daemon_leaves_no_connect_waiting_and_nothing_unjudged() {
    let w = world("stopped-daemon");
    let probe = probe().display().to_string();
    let gate = w.scratch.0.join("gate");
    let results = w.scratch.0.join("results");
    fs::write(&results, b"").unwrap();
    std::os::unix::fs::chown(&results, Some(NOBODY), Some(NOBODY)).unwrap();
    let script = format!(
        "while [ ! -e {gate} ]; do sleep 0.05; done; \
         {probe} attempt loopback-tcp 127.0.0.1:0 >/dev/null; echo loopback=$? >> {res}; \
         {probe} attempt tcp {out} >/dev/null; echo outside=$? >> {res}",
        gate = gate.display(),
        res = results.display(),
        out = w.outside.tcp4(),
    );
    let before = w.outside.counts();
    let session = w.daemon.spawn_run(NOBODY, &["sh", "-c", &script]);
    wait_for_running_session(&w.daemon);
    w.daemon.signal(libc::SIGSTOP);
    fs::write(&gate, b"").unwrap();
    let done = || fs::read_to_string(&results).unwrap_or_default();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !done().contains("outside=") && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let got = done();
    w.daemon.signal(libc::SIGCONT);
    assert!(
        got.contains("loopback=0\n") && got.contains("outside=3\n"),
        "with egressd stopped, the session's connects waited or were misjudged: {got:?}"
    );
    let out = session.wait_with_output().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(700));
    assert_eq!(
        w.outside.counts(),
        before,
        "the outside host received traffic:\n{}",
        text(&out)
    );
    // The kernel's verdict is recorded once egressd runs again.
    let records = records_after_end(&w.daemon, &session_id(&out));
    assert!(
        records.iter().any(|r| r["type"] == "decision"
            && r["verdict"] == "denied"
            && r["dest"] == w.outside.v4.as_str()),
        "no denied decision for the outside host: {records:?}"
    );
}
