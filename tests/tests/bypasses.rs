//! Issue #6, ways 7 and 9: the less common ways out of a sandbox, each tried from inside (as an
//! unprivileged uid, and as root where the way needs privilege) against an outside host whose own
//! wire capture must see nothing, with the attempt found in the audit log. Every way also runs once
//! outside any sandbox as a control: there it must reach the outside host, or the test proves nothing.

use std::{
    fs,
    net::TcpListener,
    process::{Command, Output},
};

use egressd_tests::*;

/// The way, run as root outside any sandbox.
fn unsandboxed(kind: &str, target: &str) -> Output {
    Command::new(probe())
        .args(["attempt", kind, target])
        .output()
        .unwrap()
}

/// Waits for a record of `session` that denied (or, from the backstop, dropped) a packet to `dest`.
fn assert_audited(d: &Daemon, session: &str, dest: &str, hook: Option<&str>, way: &str) {
    let mut records = Vec::new();
    let found = (0..50).any(|_| {
        records = audit_records(d);
        let hit = records.iter().any(|r| {
            r["type"] == "decision"
                && r["session"] == session
                && r["verdict"] == "denied"
                && r["dest"] == dest
                && hook.is_none_or(|h| r["hook"] == h)
        });
        if !hit {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        hit
    });
    assert!(
        found,
        "{way}: no denied record for {dest} (hook {hook:?}) in session {session}; session records:\n{}",
        records
            .iter()
            .filter(|r| r["session"] == session)
            .map(|r| r.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// Tries `kind` from a sandbox as `uid`: refused, nothing on the outside wire, audited as a denial
/// of `dest`; then the same way outside the sandbox must put something on the outside wire.
fn blocked(w: &World, uid: u32, kind: &str, target: &str, dest: &str, hook: Option<&str>) {
    let way = format!("{kind} {target} as uid {uid}");
    let before = w.outside.counts();
    let out = attempt(w, uid, kind, target);
    assert_ne!(probe_code(&out), 0, "{way} went through:\n{}", text(&out));
    let after = w.outside.counts();
    assert_eq!(after, before, "{way}: the outside host received something");
    assert_audited(
        &w.daemon,
        &session_id(&out),
        dest,
        hook,
        &format!("{way} ({})", text(&out).trim()),
    );

    let control = unsandboxed(kind, target);
    let reached = w.outside.counts();
    assert!(
        reached.wire > after.wire,
        "{way}: outside a sandbox this way does not reach the outside host either, so the test proves nothing:\n{}",
        text(&control)
    );
}

#[test]
fn broadcast_multicast_and_link_local_never_reach_the_wire() {
    let w = world_with("bcast", root_keeps_capabilities);
    let o = &w.outside;
    let subnet_bcast = format!("198.18.{}.255", o.n);
    blocked(
        &w,
        NOBODY,
        "udp-broadcast",
        &format!("{subnet_bcast}:{PORT}"),
        &subnet_bcast,
        Some("sendmsg4"),
    );
    // The limited broadcast needs a device (SO_BINDTODEVICE: root); without one it would follow the
    // default route, off the test network.
    blocked(
        &w,
        0,
        "udp-broadcast-dev",
        &format!("{}@255.255.255.255:{PORT}", o.host_if),
        "255.255.255.255",
        Some("sendmsg4"),
    );
    blocked(
        &w,
        NOBODY,
        "udp-multicast",
        &format!("{}@239.255.0.1:{PORT}", o.host_if),
        "239.255.0.1",
        Some("sendmsg4"),
    );
    blocked(
        &w,
        NOBODY,
        "udp-multicast",
        &format!("{}@[ff02::1]:{PORT}", o.host_if),
        "ff02::1",
        Some("sendmsg6"),
    );
    let link_local = o.link_local();
    blocked(
        &w,
        NOBODY,
        "tcp-link-local",
        &format!("{}@[{link_local}]:{PORT}", o.host_if),
        &link_local,
        Some("connect6"),
    );
}

#[test]
fn fast_open_io_uring_and_sendmmsg_meet_the_same_hooks() {
    let w = world("syscalls");
    let (tcp4, tcp6) = (w.outside.tcp4(), w.outside.tcp6());
    let (v4, v6) = (w.outside.v4.clone(), w.outside.v6.clone());
    blocked(&w, NOBODY, "tcp-fastopen", &tcp4, &v4, Some("connect4"));
    blocked(&w, NOBODY, "tcp-fastopen", &tcp6, &v6, Some("connect6"));
    blocked(&w, NOBODY, "uring-connect", &tcp4, &v4, Some("connect4"));
    blocked(&w, NOBODY, "uring-connect", &tcp6, &v6, Some("connect6"));
    blocked(&w, NOBODY, "uring-sendmsg", &tcp4, &v4, Some("sendmsg4"));
    blocked(&w, NOBODY, "uring-sendmsg", &tcp6, &v6, Some("sendmsg6"));
    blocked(&w, NOBODY, "sendmmsg", &tcp4, &v4, Some("sendmsg4"));
    blocked(&w, NOBODY, "sendmmsg", &tcp6, &v6, Some("sendmsg6"));
}

/// An nftables table and a sysctl set for one test, undone on drop (also when the test fails).
struct LoopbackDnat {
    table: String,
}

impl LoopbackDnat {
    /// DNAT of `from` (a 127.x address) to the outside host, as a port-forwarding tool would set up:
    /// route_localnet on the host end of the veth, and masquerade so the outside host can answer.
    fn new(o: &Outside, from: &str) -> LoopbackDnat {
        let table = format!("egressd_test_dnat_{}", o.n);
        let d = LoopbackDnat {
            table: table.clone(),
        };
        let script = format!(
            "table ip {table} {{\n\
               chain out {{ type nat hook output priority -100; ip daddr {from} tcp dport {PORT} dnat to {v4}; }}\n\
               chain post {{ type nat hook postrouting priority 100; oifname \"{ifc}\" ip daddr {v4} masquerade; }}\n\
             }}\n",
            v4 = o.v4,
            ifc = o.host_if,
        );
        let mut nft = Command::new("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("nft (installed by `cargo xtask bootstrap`)");
        use std::io::Write as _;
        nft.stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        assert!(nft.wait().unwrap().success(), "nft -f:\n{script}");
        let sysctl = format!("net.ipv4.conf.{}.route_localnet=1", o.host_if);
        let out = Command::new("sysctl")
            .args(["-w", &sysctl])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        d
    }
}

impl Drop for LoopbackDnat {
    fn drop(&mut self) {
        // route_localnet was set on the veth only: it goes with the veth.
        let _ = Command::new("nft")
            .args(["delete", "table", "ip", &self.table])
            .output();
    }
}

#[test]
fn source_routes_and_dnat_of_loopback_are_dropped_by_the_backstop() {
    let w = world_with("lsrr", root_keeps_capabilities);
    let v4 = w.outside.v4.clone();
    // The socket hooks see 127.0.0.1; the packet's first hop is the outside host. Setting source
    // route options needs CAP_NET_RAW on this kernel (setsockopt gives an unprivileged uid EPERM),
    // so the way is root's.
    let lsrr = format!("{v4}@127.0.0.1:{PORT}");
    let before = w.outside.counts();
    let out = attempt(&w, NOBODY, "udp-lsrr", &lsrr);
    assert_eq!(probe_code(&out), 3, "{}", text(&out));
    assert_eq!(w.outside.counts(), before);
    blocked(&w, 0, "udp-lsrr", &lsrr, &v4, Some("skb_egress"));
    let from = format!("127.0.{}.9", w.outside.n);
    let _dnat = LoopbackDnat::new(&w.outside, &from);
    blocked(
        &w,
        NOBODY,
        "tcp",
        &format!("{from}:{PORT}"),
        &v4,
        Some("skb_egress"),
    );
}

#[test]
fn unspecified_and_other_loopback_addresses_follow_the_loopback_port_rules() {
    // A host service on every address (dual-stack): what a sandbox reaches through 0.0.0.0, ::,
    // 127.0.0.2 and ::ffff:127.0.0.2 must follow the same loopback port rules as 127.0.0.1.
    let service = TcpListener::bind("[::]:0").unwrap();
    service.set_nonblocking(true).unwrap();
    let port = service.local_addr().unwrap().port();
    let w = world_with("unspec", |_| {
        Some(format!(
            "default_profile = \"tight\"\n[profiles.tight]\nloopback = [{other}]\n[profiles.open]\n",
            other = if port == 1 { 2 } else { 1 }
        ))
    });
    let targets = [
        format!("0.0.0.0:{port}"),
        format!("[::]:{port}"),
        format!("127.0.0.2:{port}"),
        format!("[::ffff:127.0.0.2]:{port}"),
    ];
    let accepted = || {
        let mut n = 0;
        while service.accept().is_ok() {
            n += 1;
        }
        n
    };
    for t in &targets {
        let out = attempt(&w, NOBODY, "tcp", t);
        assert_eq!(
            probe_code(&out),
            3,
            "{t} reached a loopback port the profile does not allow:\n{}",
            text(&out)
        );
        let dest = t.rsplit_once(':').unwrap().0.trim_matches(['[', ']']);
        assert_audited(&w.daemon, &session_id(&out), dest, None, t);
    }
    assert_eq!(
        accepted(),
        0,
        "the host service accepted a sandboxed connection"
    );
    for t in &targets {
        let out = w
            .daemon
            .ctl(NOBODY)
            .args(["run", "--profile", "open", "--"])
            .arg(probe())
            .args(["attempt", "tcp", t])
            .output()
            .unwrap();
        assert_eq!(
            probe_code(&out),
            0,
            "{t} with loopback = true:\n{}",
            text(&out)
        );
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(
        accepted(),
        targets.len(),
        "every allowed connection arrives"
    );
}

#[test]
fn leaving_the_session_by_cgroup_or_namespace_changes_nothing() {
    let w = world_with("leave", root_keeps_capabilities);
    let (tcp4, v4) = (w.outside.tcp4(), w.outside.v4.clone());
    // As nobody: the session cgroup is root's; no child cgroup can be made.
    let out = attempt(&w, NOBODY, "subcgroup-tcp", &tcp4);
    assert_eq!(
        probe_code(&out),
        3,
        "an unprivileged sandbox made a child cgroup:\n{}",
        text(&out)
    );
    // As root: a child cgroup is made and entered, and the session (found by ancestry) follows.
    let before = w.outside.counts();
    let out = attempt(&w, 0, "subcgroup-tcp", &tcp4);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("moved into"),
        "{}",
        text(&out)
    );
    assert_eq!(probe_code(&out), 3, "{}", text(&out));
    assert_eq!(w.outside.counts(), before);
    let session = session_id(&out);
    assert_audited(&w.daemon, &session, &v4, Some("connect4"), "sub-cgroup");
    // The session ends, child cgroup and all.
    records_after_end(&w.daemon, &session);
    wait_until("the session cgroups to be removed", 10, || {
        session_dirs(&w.daemon).is_empty()
    });

    // A new user and network namespace (unprivileged): the hooks go by cgroup, not by namespace.
    let out = w
        .daemon
        .ctl(NOBODY)
        .args([
            "run",
            "--",
            "unshare",
            "--user",
            "--map-root-user",
            "--net",
            "--",
        ])
        .arg(probe())
        .args(["attempt", "tcp", &tcp4])
        .output()
        .unwrap();
    // The probe itself runs (unshare succeeds) and its connect is refused by connect4.
    assert_eq!(probe_code(&out), 3, "{}", text(&out));
    assert_eq!(w.outside.counts(), before);
    assert_audited(
        &w.daemon,
        &session_id(&out),
        &v4,
        Some("connect4"),
        "unshare",
    );

    // As root, entering the outside host's own network namespace: still the sandbox's cgroup.
    let netns = format!("/run/netns/{}", w.outside.netns);
    let out = w
        .daemon
        .ctl(0)
        .args(["run", "--", "nsenter", &format!("--net={netns}"), "--"])
        .arg(probe())
        .args(["attempt", "tcp", &tcp4])
        .output()
        .unwrap();
    assert_eq!(probe_code(&out), 3, "{}", text(&out));
    assert_eq!(
        w.outside.counts(),
        before,
        "nsenter into the outside host's namespace got through"
    );
    assert_audited(&w.daemon, &session_id(&out), &v4, Some("connect4"), "setns");
    // Control: the same from outside a sandbox reaches the outside listener.
    let control = Command::new("nsenter")
        .arg(format!("--net={netns}"))
        .arg("--")
        .arg(probe())
        .args(["attempt", "tcp", &tcp4])
        .output()
        .unwrap();
    assert_eq!(probe_code(&control), 0, "{}", text(&control));
    assert_eq!(w.outside.counts().tcp, before.tcp + 1);
}

#[test]
fn root_is_held_without_capabilities_or_refused_a_session() {
    // airgap refuses root; admin has the default, root without capabilities.
    let w = world_with("root", |_| {
        Some("[profiles.airgap]\nroot = \"refuse\"\n[profiles.admin]\n".into())
    });
    let tcp4 = w.outside.tcp4();
    let marker = w.scratch.0.join("ran");
    // root = "refuse": no session for root, nothing run, no cgroup left behind.
    let out = w.daemon.run(
        0,
        &[probe().to_str().unwrap(), "touch", marker.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(125), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("refuses sessions for root"),
        "{}",
        text(&out)
    );
    assert!(!marker.exists(), "a refused root session ran its command");
    assert!(session_dirs(&w.daemon).is_empty());
    // Unprivileged users are not affected.
    let out = w.daemon.run(NOBODY, &[probe().to_str().unwrap(), "ids"]);
    assert!(out.status.success(), "{}", text(&out));

    // The default, root = "drop-capabilities": every way out that root has is refused, and the
    // connect after them is still the session's and denied.
    let links = fs::read_dir(format!("/sys/fs/bpf/{}/links", w.daemon.name))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect::<Vec<_>>();
    let pin = links.first().expect("egressd pins its links").clone();
    let audit_len = fs::metadata(&w.daemon.audit).map(|m| m.len()).unwrap_or(0);
    let before = w.outside.counts();
    let script = r#""$0" root-escape "$1" "$2" "$3" && exec "$0" attempt tcp "$4""#;
    let out = w
        .daemon
        .ctl(0)
        .args(["run", "--profile", "admin", "--", "sh", "-c", script])
        .arg(probe())
        .arg(cgroup2_mount())
        .arg(&pin)
        .arg(&w.daemon.audit)
        .arg(&tcp4)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert!(
            stdout.contains(&format!("{set}: 0000000000000000")),
            "{set} is not empty in a root session without capabilities:\n{}",
            text(&out)
        );
    }
    for way in [
        "move-to-root-cgroup",
        "child-cgroup",
        "unpin",
        "rename-pin",
        "bpf-obj-get",
        "truncate-audit-log",
        "remove-audit-log",
        "mount-cgroup2",
    ] {
        assert!(
            stdout.contains(&format!("{way}: refused")),
            "root in the session: {way} was not refused:\n{}",
            text(&out)
        );
    }
    assert_eq!(probe_code(&out), 3, "{}", text(&out));
    assert_eq!(
        w.outside.counts(),
        before,
        "the outside host received something"
    );
    assert_audited(
        &w.daemon,
        &session_id(&out),
        &w.outside.v4,
        Some("connect4"),
        "root",
    );
    assert!(pin.exists(), "the pin is gone");
    assert!(
        fs::metadata(&w.daemon.audit).unwrap().len() >= audit_len,
        "the audit log shrank"
    );
    // The same profile's sessions still work for root where nothing is forbidden: loopback.
    let local = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = local.local_addr().unwrap().port();
    let out = w
        .daemon
        .ctl(0)
        .args(["run", "--profile", "admin", "--"])
        .arg(probe())
        .args(["attempt", "tcp", &format!("127.0.0.1:{port}")])
        .output()
        .unwrap();
    assert_eq!(probe_code(&out), 0, "{}", text(&out));
}
