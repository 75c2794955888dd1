//! Issue #2: the systemd cgroup backend under a live systemd. These machines have no systemd as
//! PID 1, so the test boots one: systemd-nspawn runs the host's own /usr (read-only) and an overlay
//! of /etc in a throwaway root, sharing the host's network namespace so a sandbox inside can try the
//! test's outside host. egressd runs there as a systemd service with `--cgroup-backend systemd`.

use std::{
    fs,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use egressd_tests::*;

/// A booted container; powered off and its cgroups removed when dropped.
struct Container {
    nspawn: Child,
    leader: u32,
    root: PathBuf,
}

/// The container boots only to this target: the system bus and what it needs, no gettys, no
/// network configuration (it shares the host's network namespace), no timers (apt-daily would
/// reach for the network).
const TARGET: &str = "[Unit]\nDescription=egressd live-systemd test\nRequires=basic.target dbus.socket\nAfter=basic.target dbus.socket\n";

impl Container {
    fn boot(scratch: &Scratch) -> Container {
        let root = scratch.0.join("root");
        for d in [
            "usr/lib",
            "etc",
            "var",
            "tmp",
            "run",
            "proc",
            "sys",
            "dev",
            "root",
            "bin-egressd",
            "scratch",
        ] {
            fs::create_dir_all(root.join(d)).unwrap();
        }
        for l in ["bin", "sbin", "lib", "lib64"] {
            if Path::new("/").join(l).is_symlink() {
                std::os::unix::fs::symlink(format!("usr/{l}"), root.join(l)).unwrap();
            }
        }
        // nspawn looks for it before /usr is mounted over.
        fs::copy("/usr/lib/os-release", root.join("usr/lib/os-release")).unwrap();
        let target = scratch.0.join("egtest.target");
        fs::write(&target, TARGET).unwrap();
        let log = fs::File::create(scratch.0.join("nspawn.log")).unwrap();
        let nspawn = Command::new("systemd-nspawn")
            // The host is hybrid (v1 controllers plus cgroup2 at /sys/fs/cgroup/unified); the
            // container gets a pure cgroup2 tree, as systemd machines have today.
            .env("SYSTEMD_NSPAWN_UNIFIED_HIERARCHY", "1")
            .arg("--directory")
            .arg(&root)
            .args([
                "--register=no",
                "--keep-unit",
                "--capability=all",
                // nspawn's own seccomp filter refuses bpf(2) unless asked, and the calls the
                // unix supervisor makes to take a session's listener and socket and read its
                // connect address (pidfd_getfd, process_vm_readv) and enter its namespaces.
                "--system-call-filter=bpf pidfd_open pidfd_getfd process_vm_readv setns",
                "--resolv-conf=off",
                "--timezone=off",
                "--link-journal=no",
                &format!("--machine=egt{}", std::process::id()),
                "--bind-ro=/usr",
                "--overlay=/etc::/etc",
                "--bind-ro=/dev/null:/etc/systemd/system/timers.target",
            ])
            .arg(format!("--bind-ro={}:/bin-egressd", bin_dir().display()))
            .arg(format!("--bind={}:/scratch", scratch.0.display()))
            .arg(format!(
                "--bind-ro={}:/run/systemd/system/egtest.target",
                target.display()
            ))
            .args(["--boot", "systemd.unit=egtest.target"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("systemd-nspawn (apt package systemd-container; `cargo xtask bootstrap` installs it)");
        let mut c = Container {
            leader: 0,
            nspawn,
            root,
        };
        let children = format!("/proc/{}/task/{}/children", c.nspawn.id(), c.nspawn.id());
        wait_until("the container's systemd", 20, || {
            c.leader = fs::read_to_string(&children)
                .ok()
                .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse().ok()))
                .unwrap_or(0);
            c.leader != 0
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        while !c
            .sh("systemctl is-active egtest.target dbus.socket")
            .status
            .success()
        {
            if Instant::now() > deadline {
                // What the boot waits on, for the next person to see (once, in a full run).
                let state = c.sh("systemctl list-jobs --no-pager; systemctl --failed --no-pager");
                panic!(
                    "timed out waiting for the container to reach egtest.target\n{}{}\nnspawn log:\n{}",
                    String::from_utf8_lossy(&state.stdout),
                    String::from_utf8_lossy(&state.stderr),
                    fs::read_to_string(scratch.0.join("nspawn.log")).unwrap_or_default()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
        c
    }

    /// Runs `cmd` with sh in every namespace of the container, as root.
    fn sh(&self, cmd: &str) -> Output {
        self.as_uid(0, &["sh", "-c", cmd])
    }

    fn as_uid(&self, uid: u32, argv: &[&str]) -> Output {
        self.command(uid, argv).output().unwrap()
    }

    fn command(&self, uid: u32, argv: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.args(["-t", &self.leader.to_string(), "-a"]);
        if uid != 0 {
            c.args(["-S", &uid.to_string(), "-G", &uid.to_string()]);
        }
        c.arg("--").args(argv);
        c
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        // SIGTERM asks nspawn to power the container off (SIGRTMIN+3 to its systemd).
        // SAFETY: kill(2) with a pid we spawned.
        unsafe { libc::kill(self.nspawn.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.nspawn.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = self.nspawn.kill();
                let _ = self.nspawn.wait();
                break;
            }
            thread::sleep(Duration::from_millis(50));
        }
        // nspawn (without systemd on the host) leaves its empty cgroups behind in each hierarchy.
        if let Ok(hierarchies) = fs::read_dir("/sys/fs/cgroup") {
            for h in hierarchies.flatten() {
                for d in ["payload", "supervisor"] {
                    remove_cgroup_tree(&h.path().join(d));
                }
            }
        }
        let _ = fs::remove_dir_all(&self.root);
    }
}

fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_cgroup_tree(&e.path());
            }
        }
        let _ = fs::remove_dir(dir);
    }
}

fn scope_units(c: &Container) -> String {
    let out = c.sh("systemctl list-units --all --plain --no-legend 'egressd-*.scope'");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn sessions_are_transient_scopes_of_a_live_systemd_and_outlive_the_service() {
    require_root();
    let scratch = Scratch::new("live");
    let outside = Outside::new(&scratch);
    let c = Container::boot(&scratch);
    fs::write(
        scratch.0.join("egressd.toml"),
        format!(
            "[dns]\nport = {}\nupstream = []\n[audit]\npath = \"/scratch/audit.jsonl\"\n[profiles.airgap]\n[profiles.lan]\nallow = [\"{}/32:{PORT}/tcp\"]\n",
            dns_port(),
            outside.v4
        ),
    )
    .unwrap();
    // The packaged unit's confinement (capabilities, namespaces, address families...), so what
    // the daemon needs is what the unit grants; its paths are the scratch dir's here.
    let started = c.sh(&format!(
        "systemd-run --unit=egressd-live -p Type=notify {} /bin-egressd/egressd --config /scratch/egressd.toml --socket /scratch/egressd.sock --cgroup-backend systemd",
        packaged_confinement()
    ));
    let daemon_log = || {
        String::from_utf8_lossy(&c.sh("journalctl -u egressd-live --no-pager -o cat").stdout)
            .into_owned()
    };
    assert!(
        started.status.success(),
        "{}\n{}",
        text(&started),
        daemon_log()
    );
    let active = c.sh("systemctl is-active egressd-live.service egressd.slice");
    assert!(
        active.status.success(),
        "{}\n{}",
        text(&active),
        daemon_log()
    );
    // The programs sit on the slice's cgroup.
    let status = c.as_uid(
        0,
        &[
            "/bin-egressd/egressctl",
            "--socket",
            "/scratch/egressd.sock",
            "status",
            "--json",
        ],
    );
    assert!(status.status.success(), "{}", text(&status));
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert!(
        status.to_string().contains("egressd.slice"),
        "status does not name egressd.slice: {status}"
    );

    // `egressctl run [RUN_ARGS] -- ARGS` as `uid`.
    let ctl_with = |uid: u32, run_args: &[&str], args: &[&str]| -> Output {
        let mut argv = vec![
            "/bin-egressd/egressctl",
            "--socket",
            "/scratch/egressd.sock",
            "run",
        ];
        argv.extend_from_slice(run_args);
        argv.push("--");
        argv.extend_from_slice(args);
        c.as_uid(uid, &argv)
    };
    let ctl = |uid: u32, args: &[&str]| ctl_with(uid, &[], args);
    let probe = "/bin-egressd/egressd-probe";

    // The session is a transient scope in egressd.slice.
    let out = ctl(NOBODY, &["cat", "/proc/self/cgroup"]);
    assert!(out.status.success(), "{}\n{}", text(&out), daemon_log());
    let id = session_id(&out);
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains(&format!("/egressd.slice/egressd-{id}.scope")),
        "the session is not the scope egressd-{id}.scope:\n{}",
        text(&out)
    );

    // Outside: refused, nothing received. Loopback: works.
    let before = outside.counts();
    let out = ctl(NOBODY, &[probe, "attempt", "tcp", &outside.tcp4()]);
    assert_eq!(probe_code(&out), 3, "{}", text(&out));
    let denied_session = session_id(&out);
    let denied_pid = probe_pid(&out);
    // The session's counters are found by its cgroup at the level the programs found.
    assert_eq!(summary(&out), Some((0, 1)), "{}", text(&out));
    assert_eq!(
        outside.counts(),
        before,
        "the outside host received something"
    );
    // A profile's allow rule applies to the session's cgroup, found at its real level.
    let before_allowed = outside.counts();
    let out = ctl_with(
        NOBODY,
        &["--profile", "lan"],
        &[probe, "attempt", "tcp", &outside.tcp4()],
    );
    assert_eq!(probe_code(&out), 0, "{}\n{}", text(&out), daemon_log());
    assert_eq!(summary(&out), Some((1, 0)), "{}", text(&out));
    assert_eq!(
        outside.counts().tcp,
        before_allowed.tcp + 1,
        "the allowed connection did not arrive"
    );
    let before = outside.counts();
    let local = TcpListener::bind("127.0.0.1:0").unwrap();
    let lo = format!("127.0.0.1:{}", local.local_addr().unwrap().port());
    let out = ctl(NOBODY, &[probe, "attempt", "tcp", &lo]);
    assert_eq!(probe_code(&out), 0, "{}", text(&out));
    let allowed_session = session_id(&out);
    let (allowed, denied) = summary(&out).expect("summary line");
    assert!(allowed >= 1 && denied == 0, "{}", text(&out));

    // Both in the audit log, and each session's end.
    let records = || -> Vec<serde_json::Value> {
        fs::read_to_string(scratch.0.join("audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    };
    // egressd runs in the container's cgroup namespace, where egressd.slice looks like level 1
    // while the kernel counts it from the real root: attributing each decision to its session
    // (not to "unknown-cgroup-N") shows the programs found the real level.
    let complete = |r: &[serde_json::Value]| {
        let decided = |session: &str, verdict: &str, dest: &str| {
            r.iter().any(|x| {
                x["type"] == "decision"
                    && x["session"] == session
                    && x["verdict"] == verdict
                    && x["dest"] == dest
            })
        };
        let ended = |session: &str| {
            r.iter()
                .any(|x| x["type"] == "session_end" && x["session"] == session)
        };
        decided(&denied_session, "denied", &outside.v4)
            && decided(&allowed_session, "allowed", "127.0.0.1")
            && ended(&denied_session)
            && ended(&allowed_session)
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !complete(&records()) {
        assert!(
            Instant::now() < deadline,
            "no denied decision and session end of {denied_session}, or no allowed decision and session end of {allowed_session}, in:\n{}",
            records()
                .iter()
                .map(|r| r.to_string())
                .collect::<Vec<_>>()
                .join("\n")
        );
        thread::sleep(Duration::from_millis(100));
    }
    // egressd has its own pid namespace here: the log names the probe by the pid it has there.
    let logged_pid = records()
        .iter()
        .find(|x| x["type"] == "decision" && x["session"] == denied_session.as_str())
        .map(|x| x["pid"].clone());
    assert_eq!(
        logged_pid,
        Some(serde_json::json!(denied_pid)),
        "the denied decision does not name the probe's pid {denied_pid}"
    );
    // A task in a pid namespace of its own has no pid in egressd's: logged without one, but with
    // its uid and comm, and still refused.
    let out = ctl(
        NOBODY,
        &[
            "unshare",
            "--user",
            "--map-root-user",
            "--pid",
            "--fork",
            "--",
            probe,
            "attempt",
            "tcp",
            &outside.tcp4(),
        ],
    );
    assert_eq!(probe_code(&out), 3, "{}", text(&out));
    assert_eq!(probe_pid(&out), 1, "{}", text(&out));
    let nested_session = session_id(&out);
    wait_until("the nested task's decision", 10, || {
        records()
            .iter()
            .any(|x| x["type"] == "decision" && x["session"] == nested_session.as_str())
    });
    let nested = records()
        .into_iter()
        .find(|x| x["type"] == "decision" && x["session"] == nested_session.as_str())
        .unwrap();
    assert_eq!(nested["verdict"], "denied", "{nested}");
    assert!(nested.get("pid").is_none(), "{nested}");
    assert_eq!(nested["uid"], NOBODY, "{nested}");
    assert_eq!(nested["comm"], "egressd-probe", "{nested}");
    // systemd collects the scopes once they are empty.
    wait_until("the session scopes to be gone", 10, || {
        scope_units(&c).is_empty()
    });

    // Stopping the service neither kills a running sandbox nor opens it.
    let gate = scratch.0.join("gate");
    let mut sleeper = c
        .command(
            NOBODY,
            &[
                "/bin-egressd/egressctl",
                "--socket",
                "/scratch/egressd.sock",
                "run",
                "--",
                probe,
                "wait-attempt",
                "/scratch/gate",
                "tcp",
                &outside.tcp4(),
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("the sleeper's scope", 10, || !scope_units(&c).is_empty());
    // Running, not only set up: egressctl hands its child's connect listener to egressd before
    // the probe is exec'd, and a sandbox whose setup egressd could not finish runs nothing.
    wait_until("the probe running in its scope", 10, || {
        c.sh("pgrep -x egressd-probe").status.success()
    });
    let stop = c.sh("systemctl stop egressd-live.service");
    assert!(stop.status.success(), "{}", text(&stop));
    assert!(
        sleeper.try_wait().unwrap().is_none(),
        "stopping egressd ended a running sandbox"
    );
    assert!(
        scope_units(&c).contains("active"),
        "the scope went with the service: {}",
        scope_units(&c)
    );
    fs::write(&gate, b"go").unwrap();
    let out = sleeper.wait_with_output().unwrap();
    // The probe's own verdict: refused by the programs still pinned and attached.
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("denied"),
        "the sandbox got out after egressd stopped:\n{}",
        text(&out)
    );
    assert_eq!(
        outside.counts(),
        before,
        "the outside host received something"
    );
}

/// `-p KEY=VALUE` for the packaged egressd.service's confinement settings that neither name paths
/// (they differ in the container) nor give the service a mount namespace of its own: bpffs is not
/// mounted in the container, and a bpffs the daemon mounted in a namespace of its own would go,
/// pins and all, with the service (on a systemd host, systemd mounts /sys/fs/bpf at boot).
fn packaged_confinement() -> String {
    const KEYS: [&str; 10] = [
        "CapabilityBoundingSet",
        "AmbientCapabilities",
        "NoNewPrivileges",
        "RestrictNamespaces",
        "RestrictAddressFamilies",
        "RestrictRealtime",
        "RestrictSUIDSGID",
        "LockPersonality",
        "MemoryDenyWriteExecute",
        "SystemCallArchitectures",
    ];
    let unit = fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/egressd.service"),
    )
    .expect("packaging/egressd.service");
    let props: Vec<String> = unit
        .lines()
        .filter_map(|l| l.split_once('='))
        .filter(|(k, _)| KEYS.contains(k))
        .map(|(k, v)| format!("-p \"{k}={v}\""))
        .collect();
    assert!(
        props.iter().any(|p| p.contains("CapabilityBoundingSet")),
        "no confinement found in the unit"
    );
    props.join(" ")
}
