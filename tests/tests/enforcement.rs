//! Enforcement against a real kernel: the programs are loaded and attached, connections from a
//! sandbox are really refused, and "blocked" is judged by what the outside host received.

use std::{
    fs,
    process::Command,
    time::{Duration, Instant},
};

use egressd_common::prog_query;
use egressd_tests::*;

#[test]
fn every_way_out_is_refused_and_nothing_reaches_the_outside_host() {
    let w = world_with("ways", root_keeps_capabilities);
    let (v4, v6) = (w.outside.tcp4(), w.outside.tcp6());
    let ways: [(&str, &str); 10] = [
        ("tcp", &v4),
        ("tcp", &v6),
        ("tcp-v4mapped", &v4),
        ("udp-sendto", &v4),
        ("udp-sendto", &v6),
        ("udp-sendmsg", &v4),
        ("udp-sendmsg", &v6),
        ("udp-connected", &v4),
        ("udp-connected", &v6),
        ("grandchild-tcp", &v4),
    ];
    for (kind, target) in ways {
        let out = attempt(&w, NOBODY, kind, target);
        assert_eq!(
            probe_code(&out),
            3,
            "{kind} to {target} was not refused with EPERM:\n{}",
            text(&out)
        );
        assert_eq!(
            w.outside.counts(),
            Counts::default(),
            "{kind} to {target} reached the outside host"
        );
    }
    // Root inside a sandbox has CAP_NET_RAW; the sock_create hook is what stops it.
    for kind in ["raw", "ping"] {
        let out = with_ping_allowed(|| attempt(&w, 0, kind, &v4));
        assert_eq!(
            probe_code(&out),
            3,
            "{kind} socket as root was not refused:\n{}",
            text(&out)
        );
        assert_eq!(
            w.outside.counts(),
            Counts::default(),
            "{kind} reached the outside host"
        );
    }
    // The same host is reachable from outside any sandbox: the listener and capture really count.
    let direct = Command::new(probe())
        .args(["attempt", "tcp", &v4])
        .output()
        .unwrap();
    assert_eq!(
        probe_code(&direct),
        0,
        "unsandboxed connect failed:\n{}",
        text(&direct)
    );
    let direct = Command::new(probe())
        .args(["attempt", "udp-sendto", &v6])
        .output()
        .unwrap();
    assert_eq!(
        probe_code(&direct),
        0,
        "unsandboxed send failed:\n{}",
        text(&direct)
    );
    // The control's traffic may still be on its way on a busy machine: wait for it a while.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut c = w.outside.counts();
    while (c.tcp, c.udp) != (1, 1) && Instant::now() < deadline {
        c = w.outside.counts();
    }
    assert_eq!(
        (c.tcp, c.udp),
        (1, 1),
        "the outside host did not see the unsandboxed traffic: {c:?}"
    );
    assert!(c.wire >= 2, "the wire capture saw nothing: {c:?}");
}

/// ICMP ping sockets need the caller's group in net.ipv4.ping_group_range; open it for the attempt so
/// that only egressd can be what refuses, and restore it afterwards.
fn with_ping_allowed<T>(f: impl FnOnce() -> T) -> T {
    let path = "/proc/sys/net/ipv4/ping_group_range";
    let old = fs::read_to_string(path).unwrap();
    fs::write(path, "0 2147483647").unwrap();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    fs::write(path, old.trim()).unwrap();
    r.unwrap_or_else(|e| std::panic::resume_unwind(e))
}

#[test]
fn loopback_keeps_working_and_is_counted() {
    let w = world("loopback");
    for (kind, bind) in [
        ("loopback-tcp", "127.0.0.1:0"),
        ("loopback-tcp", "[::1]:0"),
        ("loopback-udp", "127.0.0.1:0"),
        ("loopback-udp", "[::1]:0"),
    ] {
        let out = attempt(&w, NOBODY, kind, bind);
        assert_eq!(
            probe_code(&out),
            0,
            "{kind} on {bind} failed in the sandbox:\n{}",
            text(&out)
        );
        let (allowed, denied) = summary(&out).expect("summary line");
        assert!(
            allowed >= 1 && denied == 0,
            "{kind}: summary {allowed}/{denied}\n{}",
            text(&out)
        );
    }
}

#[test]
fn a_denied_connect_is_counted_in_the_summary() {
    let w = world("summary");
    let out = attempt(&w, NOBODY, "tcp", &w.outside.tcp4());
    assert_eq!(probe_code(&out), 3, "{}", text(&out));
    assert_eq!(summary(&out), Some((0, 1)), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("(profile airgap): enforce; allows loopback (all ports); nothing else"),
        "{err}"
    );
}

#[test]
fn allow_rules_open_exactly_the_port_and_protocol_they_name() {
    let w = world_with("allow", |o| {
        Some(format!(
            "default_profile = \"lan\"\n[profiles.lan]\nallow = [\"{}/32:{PORT}/tcp\"]\n",
            o.v4
        ))
    });
    let out = attempt(&w, NOBODY, "tcp", &w.outside.tcp4());
    assert_eq!(
        probe_code(&out),
        0,
        "allowed tcp was refused:\n{}",
        text(&out)
    );
    let out = attempt(&w, NOBODY, "udp-sendto", &w.outside.tcp4());
    assert_eq!(
        probe_code(&out),
        3,
        "udp to a tcp-only rule got through:\n{}",
        text(&out)
    );
    let out = attempt(&w, NOBODY, "tcp", &format!("{}:{}", w.outside.v4, PORT + 1));
    assert_eq!(
        probe_code(&out),
        3,
        "another port got through:\n{}",
        text(&out)
    );
    let out = attempt(&w, NOBODY, "tcp", &w.outside.tcp6());
    assert_eq!(
        probe_code(&out),
        3,
        "IPv6 got through an IPv4 rule:\n{}",
        text(&out)
    );
    let c = w.outside.counts();
    assert_eq!((c.tcp, c.udp), (1, 0), "{c:?}");
}

#[test]
fn audit_mode_lets_traffic_through_but_counts_it_as_denied() {
    let w = world_with("auditmode", |_| {
        Some("default_profile = \"watch\"\n[profiles.watch]\nmode = \"audit\"\n".to_string())
    });
    let out = attempt(&w, NOBODY, "tcp", &w.outside.tcp4());
    assert_eq!(probe_code(&out), 0, "{}", text(&out));
    assert_eq!(summary(&out), Some((0, 1)), "{}", text(&out));
    assert_eq!(w.outside.counts().tcp, 1);
}

#[test]
fn enforcement_survives_kill_9_and_new_runs_fail_closed() {
    let mut w = world("kill9");
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
    let parent = fs::File::open(w.daemon.cgroup_dir()).unwrap();
    let before = prog_query::effective_programs(&parent, prog_query::ATTACH_INET4_CONNECT).unwrap();
    w.daemon.kill9();
    fs::write(&go, b"go").unwrap();
    let out = sandbox.wait_with_output().unwrap();
    assert_eq!(
        probe_code(&out),
        3,
        "connect after kill -9 was not refused:\n{}",
        text(&out)
    );
    assert_eq!(w.outside.counts(), Counts::default());

    let marker = w.scratch.0.join("ran");
    let out = w.daemon.run(
        NOBODY,
        &[probe().to_str().unwrap(), "touch", marker.to_str().unwrap()],
    );
    assert_ne!(
        out.status.code(),
        Some(0),
        "egressctl run succeeded without a daemon"
    );
    assert!(!marker.exists(), "the command ran without a sandbox");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot reach egressd"),
        "{}",
        text(&out)
    );

    // A restarted daemon replaces the pinned links instead of adding a second set.
    w.daemon.spawn();
    let after = prog_query::effective_programs(&parent, prog_query::ATTACH_INET4_CONNECT).unwrap();
    assert_eq!(
        before.len(),
        after.len(),
        "restart changed the number of attached programs: {before:?} -> {after:?}"
    );
    let out = attempt(&w, NOBODY, "tcp", &w.outside.tcp4());
    assert_eq!(probe_code(&out), 3, "{}", text(&out));
}

#[test]
fn sessions_are_removed_when_their_processes_exit() {
    let w = world("reap");
    let out = w.daemon.run(NOBODY, &["true"]);
    assert!(out.status.success(), "{}", text(&out));
    wait_until("session cgroups to go", 10, || {
        session_dirs(&w.daemon).is_empty()
    });
    let ps = w.daemon.ctl(0).args(["ps", "--json"]).output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&ps.stdout).trim(),
        "[]",
        "{}",
        text(&ps)
    );
}

#[test]
fn exit_status_environment_and_inherited_descriptors() {
    let w = world("exec");
    let out = w.daemon.run(NOBODY, &["sh", "-c", "exit 7"]);
    assert_eq!(out.status.code(), Some(7), "{}", text(&out));
    let out = w
        .daemon
        .run(NOBODY, &["sh", "-c", "echo \"$EGRESSD_SESSION\""]);
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(id.len(), 8, "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!("session {id} (profile airgap)")),
        "{}",
        text(&out)
    );

    // A descriptor opened outside the sandbox (fd 7 here) must not reach the command.
    let ctl = w.daemon.ctl(NOBODY);
    let mut inner: Vec<String> = std::iter::once(ctl.get_program().to_string_lossy().into_owned())
        .chain(ctl.get_args().map(|a| format!("'{}'", a.to_string_lossy())))
        .collect();
    inner.extend([
        "run".into(),
        "--".into(),
        probe().display().to_string(),
        "fds".into(),
    ]);
    let out = Command::new("sh")
        .args(["-c", &format!("exec 7</dev/null; {}", inner.join(" "))])
        .output()
        .unwrap();
    let fds = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(
        fds,
        "0 1 2 3",
        "descriptors left open in the sandbox (3 is the listing's own):\n{}",
        text(&out)
    );
}

#[test]
fn a_sandboxed_process_cannot_leave_or_nest() {
    let w = world("escape");
    let root_procs = cgroup2_mount().join("cgroup.procs");
    let out = w.daemon.run(
        NOBODY,
        &[
            probe().to_str().unwrap(),
            "escape",
            root_procs.to_str().unwrap(),
        ],
    );
    assert_eq!(
        probe_code(&out),
        3,
        "moving to the root cgroup was not refused:\n{}",
        text(&out)
    );
    let parent_procs = w.daemon.cgroup_dir().join("cgroup.procs");
    let out = w.daemon.run(
        NOBODY,
        &[
            probe().to_str().unwrap(),
            "escape",
            parent_procs.to_str().unwrap(),
        ],
    );
    assert_eq!(
        probe_code(&out),
        3,
        "moving to the parent cgroup was not refused:\n{}",
        text(&out)
    );

    // A sandboxed process asking for a new (maybe more open) session is refused.
    let marker = w.scratch.0.join("nested");
    let ctl = w.daemon.ctl(0);
    let mut args: Vec<String> = ctl
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    args.extend([
        "run".into(),
        "--".into(),
        probe().display().to_string(),
        "touch".into(),
        marker.display().to_string(),
    ]);
    let mut nested = vec![bin("egressctl").display().to_string()];
    nested.extend(args);
    let refs: Vec<&str> = nested.iter().map(String::as_str).collect();
    let out = w.daemon.run(NOBODY, &refs);
    assert_ne!(out.status.code(), Some(0), "{}", text(&out));
    assert!(!marker.exists(), "the nested command ran");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already sandboxed"),
        "{}",
        text(&out)
    );
}

#[test]
fn without_a_daemon_nothing_runs() {
    require_root();
    let scratch = Scratch::new("nodaemon");
    let marker = scratch.0.join("ran");
    let out = Command::new(bin("egressctl"))
        .args([
            "--socket",
            scratch.0.join("none.sock").to_str().unwrap(),
            "run",
            "--",
        ])
        .arg(probe())
        .args(["touch", marker.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125), "{}", text(&out));
    assert!(!marker.exists());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nothing was run"),
        "{}",
        text(&out)
    );
}

#[test]
fn a_broken_policy_file_is_refused_with_file_line_and_reason() {
    require_root();
    let scratch = Scratch::new("badpolicy");
    let path = scratch.0.join("bad.toml");
    fs::write(&path, "[profiles.airgap]\nallow = [\"10.0.0.1/8\"]\n").unwrap();
    let out = Command::new(bin("egressd"))
        .args(["check", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(path.to_str().unwrap())
            && err.contains("line 2")
            && err.contains("host bits set"),
        "{err}"
    );
}

#[test]
fn garbage_on_the_control_socket_gets_an_error_and_harms_nothing() {
    use std::io::{BufRead as _, BufReader, Write as _};
    let w = world("garbage");
    for junk in [
        &b"not json\n"[..],
        b"{\"v\":1,\"op\":\"reboot\"}\n",
        b"{\"v\":99,\"op\":\"status\"}\n",
        &[0xff, 0xfe, b'\n'],
    ] {
        let mut s = std::os::unix::net::UnixStream::connect(&w.daemon.socket).unwrap();
        s.write_all(junk).unwrap();
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line).unwrap();
        assert!(line.contains("\"error\""), "{line}");
    }
    let mut s = std::os::unix::net::UnixStream::connect(&w.daemon.socket).unwrap();
    let _ = s.write_all(&vec![b'x'; 200 * 1024]);
    let status = w.daemon.ctl(NOBODY).arg("status").output().unwrap();
    assert!(status.status.success(), "daemon harmed: {}", text(&status));
}

#[test]
fn a_missing_hook_is_caught_by_the_backstop_and_refused_by_run() {
    let w = world("backstop");
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
    // Unpinning the connect4 link detaches it (egressd holds no other reference).
    fs::remove_file(format!(
        "/sys/fs/bpf/{}/links/egressd_connect4",
        w.daemon.name
    ))
    .unwrap();
    fs::write(&go, b"go").unwrap();
    let out = sandbox.wait_with_output().unwrap();
    assert_ne!(
        probe_code(&out),
        0,
        "the connect went through without its hook:\n{}",
        text(&out)
    );
    assert_eq!(
        w.outside.counts(),
        Counts::default(),
        "the backstop let a packet out"
    );

    let marker = w.scratch.0.join("ran");
    let out = w.daemon.run(
        NOBODY,
        &[probe().to_str().unwrap(), "touch", marker.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(125), "{}", text(&out));
    assert!(
        !marker.exists(),
        "run started a command in a cgroup without connect4"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not effective here: cgroup/connect4"),
        "{}",
        text(&out)
    );
}
