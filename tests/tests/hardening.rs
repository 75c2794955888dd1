//! Hardening layers against a real kernel: the BPF LSM socket-family filter, loopback-only
//! listeners, no_new_privs, the strict profile, and a sandbox that cannot change the daemon.

use std::{
    fs,
    io::{BufRead as _, BufReader},
    os::unix::fs::PermissionsExt as _,
    process::{Command, Stdio},
};

use egressd_tests::*;

fn decisions<'a>(
    records: &'a [serde_json::Value],
    hook: &'a str,
) -> impl Iterator<Item = &'a serde_json::Value> + 'a {
    records
        .iter()
        .filter(move |r| r["type"] == "decision" && r["hook"] == hook)
}

/// The daemon's layers (from `egressctl status --json`).
fn daemon_layers(d: &Daemon) -> Vec<String> {
    let status = d.ctl(0).args(["status", "--json"]).output().unwrap();
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    status["layers"]
        .as_array()
        .expect("layers in status")
        .iter()
        .map(|l| l.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn packet_vsock_and_xdp_sockets_are_refused() {
    let w = world_with("families", root_keeps_capabilities);
    let lsm = daemon_layers(&w.daemon).contains(&"lsm".to_string());
    let frame_target = format!("{}@{}:{PORT}", w.outside.host_if, w.outside.v4);
    // AF_PACKET needs CAP_NET_RAW: root inside the sandbox is the one who could use it.
    let out = attempt(&w, 0, "packet", &frame_target);
    assert_eq!(
        probe_code(&out),
        3,
        "AF_PACKET as root was not refused:\n{}",
        text(&out)
    );
    for kind in ["vsock", "xdp"] {
        let out = attempt(&w, NOBODY, kind, "-");
        assert_eq!(
            probe_code(&out),
            3,
            "{kind} socket was not refused:\n{}",
            text(&out)
        );
    }
    assert_eq!(
        w.outside.counts(),
        Counts::default(),
        "a frame reached the outside host"
    );
    // The same frame from outside any sandbox does arrive: the capture counts it.
    let direct = Command::new(probe())
        .args(["attempt", "packet", &frame_target])
        .output()
        .unwrap();
    assert_eq!(probe_code(&direct), 0, "{}", text(&direct));
    assert_eq!(w.outside.counts().wire, 1);
    let records = audit_records(&w.daemon);
    let starts: Vec<&serde_json::Value> = records
        .iter()
        .filter(|r| r["type"] == "session_start")
        .collect();
    assert!(!starts.is_empty());
    for s in &starts {
        let layers = s["layers"].as_array().expect("layers in session_start");
        assert!(layers.iter().any(|l| l == "seccomp"), "{s}");
        assert_eq!(layers.iter().any(|l| l == "lsm"), lsm, "{s}");
    }
    if lsm {
        // The LSM layer refuses them in the kernel and records each refusal.
        let refused: Vec<String> = decisions(&records, "lsm_socket_create")
            .filter(|r| r["verdict"] == "denied")
            .map(|r| r["reason"].as_str().unwrap_or("").to_string())
            .collect();
        for family in ["packet", "vsock", "xdp"] {
            assert!(
                refused.iter().any(|r| r.contains(family)),
                "no audit record of the refused {family} socket: {refused:?}"
            );
        }
    }
}

#[test]
fn a_sandbox_cannot_reach_into_a_same_uid_process_outside() {
    let w = world("ptrace");
    let mut victim = Command::new("setpriv")
        .args([
            &format!("--reuid={NOBODY}"),
            &format!("--regid={NOBODY}"),
            "--clear-groups",
            "--",
            "sleep",
            "30",
        ])
        .spawn()
        .unwrap();
    let pid = victim.id().to_string();
    wait_until("the victim to exec sleep", 5, || {
        fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "sleep")
    });
    // The same calls work from outside a sandbox (so the refusal below is the sandbox's).
    let control = Command::new("setpriv")
        .args([
            &format!("--reuid={NOBODY}"),
            &format!("--regid={NOBODY}"),
            "--clear-groups",
            "--",
        ])
        .arg(probe())
        .args(["attempt", "vm-read", &pid])
        .output()
        .unwrap();
    assert_eq!(probe_code(&control), 0, "{}", text(&control));
    for kind in ["ptrace", "vm-read"] {
        let out = attempt(&w, NOBODY, kind, &pid);
        assert_eq!(
            probe_code(&out),
            3,
            "{kind} of a same-uid process outside was not refused:\n{}",
            text(&out)
        );
    }
    let _ = victim.kill();
    let _ = victim.wait();
}

#[test]
fn sandbox_listeners_stay_on_loopback() {
    let w = world("bind");
    let port = 18081;
    let probe = probe();
    let mut listener = w
        .daemon
        .ctl(NOBODY)
        .args([
            "run",
            "--",
            probe.to_str().unwrap(),
            "attempt",
            "listen-for",
        ])
        .arg(format!("0.0.0.0:{port}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(listener.stdout.take().unwrap()).lines();
    let bound = lines.next().unwrap().unwrap();
    assert_eq!(
        bound,
        format!("bound 127.0.0.1:{port}"),
        "a wildcard bind was not kept on loopback"
    );
    // An outside peer cannot connect in through the host's address on the shared link...
    let host_side = w.outside.v4.replace(".2", ".1");
    let from_outside = Command::new("ip")
        .args(["netns", "exec", &w.outside.netns])
        .arg(&probe)
        .args(["attempt", "tcp", &format!("{host_side}:{port}")])
        .output()
        .unwrap();
    assert_ne!(
        probe_code(&from_outside),
        0,
        "an outside peer connected to a sandbox listener:\n{}",
        text(&from_outside)
    );
    // ...while the machine itself still can, on loopback.
    let local = Command::new(&probe)
        .args(["attempt", "tcp", &format!("127.0.0.1:{port}")])
        .output()
        .unwrap();
    assert_eq!(probe_code(&local), 0, "{}", text(&local));
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let _ = listener.wait();
    assert_eq!(rest.len(), 1, "expected exactly the local peer: {rest:?}");
    assert!(rest[0].starts_with("accepted 127.0.0.1:"), "{rest:?}");
    // A bind to a non-loopback address is refused and recorded.
    let out = attempt(&w, NOBODY, "listen-for", &format!("{host_side}:{port}"));
    assert_eq!(
        probe_code(&out),
        3,
        "bind to {host_side} allowed:\n{}",
        text(&out)
    );
    wait_until("the audit record of the refused bind", 5, || {
        decisions(&audit_records(&w.daemon), "bind4")
            .any(|r| r["verdict"] == "denied" && r["dest"] == host_side.as_str())
    });
}

#[test]
fn setuid_binaries_gain_nothing_in_a_sandbox() {
    let w = world("nnp");
    let suid = w.scratch.0.join("suid-probe");
    fs::copy(probe(), &suid).unwrap();
    fs::set_permissions(&suid, fs::Permissions::from_mode(0o4755)).unwrap();
    let suid = suid.display().to_string();
    // Outside a sandbox the setuid bit works (so the test means something)...
    let outside = Command::new("setpriv")
        .args([
            &format!("--reuid={NOBODY}"),
            &format!("--regid={NOBODY}"),
            "--clear-groups",
            "--",
            &suid,
            "ids",
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&outside.stdout).trim(),
        format!("uid={NOBODY} euid=0"),
        "{}",
        text(&outside)
    );
    // ...inside one, no_new_privs makes it nothing.
    let inside = w.daemon.run(NOBODY, &[&suid, "ids"]);
    assert_eq!(
        String::from_utf8_lossy(&inside.stdout).trim(),
        format!("uid={NOBODY} euid={NOBODY}"),
        "{}",
        text(&inside)
    );
}

#[test]
fn the_strict_profile_reaches_only_the_model_server_port() {
    let w = world("strict");
    let probe = probe();
    let run = |target: &str| {
        w.daemon
            .ctl(NOBODY)
            .args(["run", "--profile", "strict", "--"])
            .arg(&probe)
            .args(["attempt", "loopback-tcp", target])
            .output()
            .unwrap()
    };
    let model = run("127.0.0.1:11434");
    assert_eq!(probe_code(&model), 0, "{}", text(&model));
    let proxy = run("127.0.0.1:3128");
    assert_eq!(
        probe_code(&proxy),
        3,
        "strict reached a loopback proxy port:\n{}",
        text(&proxy)
    );
}

#[test]
fn a_sandbox_cannot_change_the_policy_even_as_root() {
    let w = world_with("ctl-from-inside", root_keeps_capabilities);
    let egressctl = bin("egressctl");
    let socket = w.daemon.socket.display().to_string();
    let out = w.daemon.run(
        0,
        &[
            egressctl.to_str().unwrap(),
            "--socket",
            &socket,
            "policy",
            "reload",
        ],
    );
    assert_ne!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("a sandbox may not change the policy"),
        "{}",
        text(&out)
    );
    // Root outside a sandbox may.
    let out = w.daemon.ctl(0).args(["policy", "reload"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
}

#[test]
fn egressctl_verify_finds_every_way_blocked() {
    let w = world("verify");
    let out = w.daemon.ctl(0).arg("verify").output().unwrap();
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let rows: Vec<&str> = table
        .lines()
        .skip(1)
        .take_while(|l| !l.is_empty())
        .collect();
    assert!(rows.len() >= 12, "{table}");
    for row in &rows {
        assert!(row.contains("  blocked  "), "not blocked: {row}\n{table}");
    }
    // Its throwaway sessions are in the audit log like any other.
    wait_until("verify's sessions in the audit log", 5, || {
        audit_records(&w.daemon)
            .iter()
            .filter(|r| r["type"] == "session_start")
            .count()
            >= rows.len()
    });
}

#[test]
fn outside_processes_memory_signals_and_abstract_sockets_are_out_of_reach() {
    let w = world("landlock");
    assert!(
        daemon_layers(&w.daemon).contains(&"landlock".to_string()),
        "this kernel has no Landlock ABI 6 (egressctl doctor)"
    );
    let probe = probe();
    let p = probe.to_str().unwrap();
    let name = format!("egressd-test-{}", std::process::id());
    let mut victim = as_nobody(&[p, "abstract-listen", &name, "30"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(victim.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "listening");
    let pid = victim.id().to_string();
    let ways: [(&str, &str); 4] = [
        ("proc-mem", &pid),
        ("signal", &pid),
        ("abstract", &name),
        ("ptrace", &pid),
    ];
    for (kind, target) in ways {
        // From outside a sandbox, the same uid can (so the refusal is the sandbox's)...
        let control = as_nobody(&[p, "attempt", kind, target]).output().unwrap();
        assert_eq!(
            probe_code(&control),
            0,
            "{kind} outside: {}",
            text(&control)
        );
        // ...from inside, it cannot.
        let out = attempt(&w, NOBODY, kind, target);
        assert_eq!(
            probe_code(&out),
            3,
            "{kind} of a same-uid process outside was not refused:\n{}",
            text(&out)
        );
    }
    // A debugger inside the sandbox still works on the sandbox's own processes.
    let out = attempt(&w, NOBODY, "ptrace-child", "-");
    assert_eq!(probe_code(&out), 0, "{}", text(&out));
    let _ = victim.kill();
    let _ = victim.wait();
}
