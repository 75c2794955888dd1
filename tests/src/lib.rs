//! Fixtures for the kernel tests: a private egressd (its own cgroup, pins and socket), an "outside"
//! host in a network namespace with a counting listener, and helpers to run things sandboxed.
//! Every fixture removes what it created when dropped, also when a test panics.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

static NEXT: AtomicU32 = AtomicU32::new(1);

/// The unprivileged identity sandboxed commands run as.
pub const NOBODY: u32 = 65534;
pub const PORT: u16 = 8080;

pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the kernel tests need root (they load eBPF programs, create cgroups and network namespaces): run `sudo cargo xtask test`"
    );
}

/// target/debug (or release), from the path of the running test binary (target/*/deps/...).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_owned()
}

pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is not built; run `cargo xtask test`",
        p.display()
    );
    p
}

pub fn probe() -> PathBuf {
    bin("egressd-probe")
}

fn sh(cmd: &str) -> Output {
    Command::new("sh").args(["-c", cmd]).output().unwrap()
}

fn must(cmd: &str) {
    let out = sh(cmd);
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A resolver port for a test daemon: distinct per daemon of this process, and spread by pid so
/// test binaries and benchmarks running side by side rarely meet.
pub fn dns_port() -> u16 {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    11000 + ((std::process::id() * 53 + n * 7) % 20000) as u16
}

/// A scratch directory every user can traverse (the socket lives in it).
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("egressd-test-{}-{tag}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        Scratch(dir)
    }

    /// A directory in the scratch directory that every user may write (markers a sandboxed
    /// command and the test pass each other).
    pub fn shared_dir(&self, name: &str) -> PathBuf {
        let dir = self.0.join(name);
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
        dir
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A private egressd: its own cgroup parent, bpffs pin directory and socket, so tests never touch a
/// system egressd and can run side by side.
pub struct Daemon {
    /// The `[dns]` table the fixture added (kept when the policy is rewritten).
    dns: String,
    pub audit: PathBuf,
    pub name: String,
    pub socket: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Daemon {
    pub fn start(scratch: &Scratch, config: Option<&str>) -> Daemon {
        Self::start_with(scratch, config, "")
    }

    /// `config` is the policy (profiles); the audit log always goes to the scratch directory, with
    /// `audit_extra` (TOML lines) added to the `[audit]` table.
    pub fn start_with(scratch: &Scratch, config: Option<&str>, audit_extra: &str) -> Daemon {
        Self::start_logging_to(scratch, config, &scratch.0.join("audit.jsonl"), audit_extra)
    }

    /// Like `start_with`, with the audit log at `audit` (a small or faulty file system).
    pub fn start_logging_to(
        scratch: &Scratch,
        config: Option<&str>,
        audit: &Path,
        audit_extra: &str,
    ) -> Daemon {
        let config = config.unwrap_or("");
        // Every daemon has its own resolver port; one that is not about DNS never asks anyone.
        let dns = if config.contains("[dns]") {
            String::new()
        } else {
            format!("[dns]\nport = {}\nupstream = []\n", dns_port())
        };
        let config = format!("{config}\n{dns}");
        let name = format!(
            "egressd-t{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let config_path = scratch.0.join("egressd.toml");
        let audit = audit.to_owned();
        fs::write(
            &config_path,
            format!(
                "{config}\n[audit]\npath = \"{}\"\n{audit_extra}\n",
                audit.display()
            ),
        )
        .unwrap();
        let mut d = Daemon {
            dns,
            audit,
            socket: scratch.0.join("egressd.sock"),
            config: config_path,
            log: scratch.0.join("egressd.log"),
            name,
            child: None,
        };
        d.spawn();
        d
    }

    /// Rewrites the policy file (keeping the audit log where it is), without reloading.
    pub fn write_policy(&self, policy: &str) {
        fs::write(
            &self.config,
            format!(
                "{policy}\n{}\n[audit]\npath = \"{}\"\n",
                self.dns,
                self.audit.display()
            ),
        )
        .unwrap();
    }

    pub fn args(&self) -> Vec<String> {
        vec![
            "--config".into(),
            self.config.display().to_string(),
            "--socket".into(),
            self.socket.display().to_string(),
            "--cgroup".into(),
            self.name.clone(),
            // Private daemons side by side need private parent cgroups, which only the direct
            // backend gives (under systemd, auto would put them all in egressd.slice).
            "--cgroup-backend".into(),
            "direct".into(),
            "--bpffs".into(),
            format!("/sys/fs/bpf/{}", self.name),
        ]
    }

    pub fn spawn(&mut self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(bin("egressd"))
            .args(self.args())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "egressd exited ({status}): {}",
                    fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "egressd did not come up: {}",
                self.log_text()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops (SIGSTOP) or resumes (SIGCONT) the daemon process.
    pub fn signal(&self, sig: i32) {
        let pid = self.child.as_ref().expect("daemon running").id();
        // SAFETY: kill(2) on our own child.
        assert_eq!(unsafe { libc::kill(pid as i32, sig) }, 0);
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stops the daemon as systemd would (SIGTERM) and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn cgroup_dir(&self) -> PathBuf {
        cgroup2_mount().join(&self.name)
    }

    /// `egressctl` against this daemon, as `uid`.
    pub fn ctl(&self, uid: u32) -> Command {
        let mut c = if uid == 0 {
            Command::new(bin("egressctl"))
        } else {
            let mut c = Command::new("setpriv");
            c.args([
                format!("--reuid={uid}"),
                format!("--regid={uid}"),
                "--clear-groups".into(),
                "--".into(),
                bin("egressctl").display().to_string(),
            ]);
            c
        };
        c.arg("--socket").arg(&self.socket);
        c
    }

    /// `egressctl run -- ARGS` as `uid`, started with its output piped (for a test that acts on the
    /// session while it runs).
    pub fn spawn_run(&self, uid: u32, args: &[&str]) -> Child {
        self.ctl(uid)
            .arg("run")
            .arg("--")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// `spawn_run` of the probe with `args`.
    pub fn spawn_probe(&self, uid: u32, args: &[&str]) -> Child {
        let probe = probe();
        let mut all = vec![probe.to_str().unwrap()];
        all.extend_from_slice(args);
        self.spawn_run(uid, &all)
    }

    /// `egressctl run -- ARGS` as `uid`, waited for.
    pub fn run(&self, uid: u32, args: &[&str]) -> Output {
        self.ctl(uid)
            .arg("run")
            .arg("--")
            .args(args)
            .output()
            .unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
        // End whatever a failed test left running in its sessions, so the cgroups can go.
        let parent = self.cgroup_dir();
        if fs::write(parent.join("cgroup.kill"), "1").is_ok() {
            let deadline = Instant::now() + Duration::from_secs(5);
            while crate::populated(&parent) && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = Command::new(bin("egressd"))
            .args(self.args())
            .arg("cleanup")
            .output();
        let _ = fs::remove_dir_all(cgroup2_mount().join(&self.name));
    }
}

fn populated(dir: &std::path::Path) -> bool {
    fs::read_to_string(dir.join("cgroup.events"))
        .map(|s| s.lines().any(|l| l == "populated 1"))
        .unwrap_or(false)
}

pub fn cgroup2_mount() -> PathBuf {
    egressd_common::host::cgroup2_mount().expect("cgroup2 mount")
}

/// Removes the outside hosts of test runs that were killed before their cleanup (their netns
/// names carry the run's pid modulo 10000): their routes would take a new host's subnet.
fn sweep_leftover_hosts() {
    static SWEPT: std::sync::Once = std::sync::Once::new();
    SWEPT.call_once(|| {
        let live: std::collections::HashSet<u32> = fs::read_dir("/proc")
            .map(|d| {
                d.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
                    .map(|pid| pid % 10000)
                    .collect()
            })
            .unwrap_or_default();
        let list = sh("ip netns list");
        for line in String::from_utf8_lossy(&list.stdout).lines() {
            let Some(name) = line.split_whitespace().next() else {
                continue;
            };
            let Some(tag) = name.strip_prefix("egt") else {
                continue;
            };
            let owner = tag.split('x').next().and_then(|p| p.parse::<u32>().ok());
            if owner.is_some_and(|pid| !live.contains(&pid)) {
                let _ = sh(&format!(
                    "ip netns del {name}; ip link del egh{tag} 2>/dev/null"
                ));
            }
        }
    });
}

/// An "outside" host: a network namespace behind a veth pair, with addresses from 198.18.0.0/15
/// and an IPv6 ULA, running a listener that counts what it receives on sockets and on the wire.
pub struct Outside {
    pub netns: String,
    pub host_if: String,
    /// The outside end of the veth, inside `netns`.
    pub out_if: String,
    /// The third octet of the test subnet 198.18.N.0/24.
    pub n: u32,
    pub v4: String,
    pub v6: String,
    counts: PathBuf,
    listener: Option<Child>,
}

#[derive(Debug, PartialEq, Eq, Clone, Copy, Default)]
pub struct Counts {
    pub tcp: u64,
    pub udp: u64,
    pub wire: u64,
}

impl Outside {
    pub fn new(scratch: &Scratch) -> Outside {
        // The subnet is chosen and its address added under one lock, so that no two hosts of
        // this process share it; one another process (or a killed run's leftover) already routes
        // is skipped: the route would take this host's traffic elsewhere.
        static CHOOSING: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let choosing = CHOOSING.lock().unwrap_or_else(|e| e.into_inner());
        sweep_leftover_hosts();
        // Spread by pid: test binaries run side by side start on different subnets.
        let start = NEXT.fetch_add(1, Ordering::Relaxed) + std::process::id() * 37;
        let n = (0..250)
            .map(|i| (start + i) % 250 + 1)
            .find(|n| {
                let routed = sh(&format!("ip -o -4 route show to match 198.18.{n}.2"));
                !String::from_utf8_lossy(&routed.stdout).contains(&format!("198.18.{n}.0/24"))
            })
            .expect("a free 198.18.N.0/24 test subnet");
        let tag = format!("{}x{n}", std::process::id() % 10000);
        let (netns, host_if, out_if) = (
            format!("egt{tag}"),
            format!("egh{tag}"),
            format!("ego{tag}"),
        );
        let (v4h, v4) = (format!("198.18.{n}.1"), format!("198.18.{n}.2"));
        let (v6h, v6) = (format!("fd00:e9:{n:x}::1"), format!("fd00:e9:{n:x}::2"));
        let _ = sh(&format!(
            "ip netns del {netns} 2>/dev/null; ip link del {host_if} 2>/dev/null"
        ));
        let mut o = Outside {
            netns: netns.clone(),
            host_if: host_if.clone(),
            out_if: out_if.clone(),
            n,
            v4: v4.clone(),
            v6: v6.clone(),
            counts: scratch.0.join(format!("counts-{tag}")),
            listener: None,
        };
        must(&format!("ip netns add {netns}"));
        must(&format!(
            "ip link add {host_if} type veth peer name {out_if}"
        ));
        must(&format!("ip link set {out_if} netns {netns}"));
        must(&format!("ip addr add {v4h}/24 dev {host_if}"));
        must(&format!("ip -6 addr add {v6h}/64 dev {host_if} nodad"));
        must(&format!("ip link set {host_if} up"));
        drop(choosing);
        must(&format!("ip -n {netns} addr add {v4}/24 dev {out_if}"));
        must(&format!(
            "ip -n {netns} -6 addr add {v6}/64 dev {out_if} nodad"
        ));
        must(&format!("ip -n {netns} link set {out_if} up"));
        must(&format!("ip -n {netns} link set lo up"));
        let child = Command::new("ip")
            .args(["netns", "exec", &netns])
            .arg(probe())
            .args(["listen", &v4, &v6, &PORT.to_string(), &out_if])
            .arg(&o.counts)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        o.listener = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !o.counts.exists() {
            assert!(Instant::now() < deadline, "outside listener did not start");
            thread::sleep(Duration::from_millis(20));
        }
        o
    }

    pub fn tcp4(&self) -> String {
        format!("{}:{PORT}", self.v4)
    }
    pub fn tcp6(&self) -> String {
        format!("[{}]:{PORT}", self.v6)
    }

    /// The outside end's IPv6 link-local address, once duplicate address detection is over on both
    /// ends (the host end needs one too, as the source).
    pub fn link_local(&self) -> String {
        let show = |ns: Option<&str>, dev: &str| {
            let mut cmd = Command::new("ip");
            if let Some(ns) = ns {
                cmd.args(["-n", ns]);
            }
            let out = cmd
                .args(["-6", "-o", "addr", "show", "dev", dev, "scope", "link"])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let mut addr = String::new();
        wait_until("IPv6 link-local addresses on the test veth", 10, || {
            let (outside, host) = (
                show(Some(&self.netns), &self.out_if),
                show(None, &self.host_if),
            );
            let ready = |s: &str| s.contains("fe80::") && !s.contains("tentative");
            if !(ready(&outside) && ready(&host)) {
                return false;
            }
            addr = outside
                .split_whitespace()
                .find_map(|w| {
                    w.strip_prefix("fe80::")
                        .map(|r| format!("fe80::{}", r.split('/').next().unwrap()))
                })
                .unwrap();
            true
        });
        addr
    }

    /// What the outside host has received so far, after letting stragglers arrive.
    pub fn counts(&self) -> Counts {
        thread::sleep(Duration::from_millis(300));
        let text = fs::read_to_string(&self.counts).unwrap();
        let mut c = Counts::default();
        for kv in text.split_whitespace() {
            let (k, v) = kv.split_once('=').unwrap();
            let v = v.parse().unwrap();
            match k {
                "tcp" => c.tcp = v,
                "udp" => c.udp = v,
                "wire" => c.wire = v,
                _ => {}
            }
        }
        c
    }
}

impl Drop for Outside {
    fn drop(&mut self) {
        if let Some(mut c) = self.listener.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = sh(&format!(
            "ip netns del {}; ip link del {} 2>/dev/null",
            self.netns, self.host_if
        ));
    }
}

/// Result code of `egressd-probe attempt`.
pub fn probe_code(out: &Output) -> i32 {
    out.status.code().unwrap_or(-1)
}

pub fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `(allowed, denied)` from egressctl's closing summary line on stderr.
pub fn summary(out: &Output) -> Option<(u64, u64)> {
    let err = String::from_utf8_lossy(&out.stderr);
    let line = err.lines().find(|l| l.contains(" allowed, "))?;
    // "...: N allowed, M denied[, K DNS names denied ...]"
    let (before, after) = line.split_once(" allowed, ")?;
    let allowed = before.rsplit(' ').next()?.parse().ok()?;
    let denied = after.split(' ').next()?.parse().ok()?;
    Some((allowed, denied))
}

pub fn wait_until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(50));
    }
}

pub fn session_dirs(d: &Daemon) -> Vec<PathBuf> {
    fs::read_dir(d.cgroup_dir())
        .map(|r| {
            r.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .collect()
        })
        .unwrap_or_default()
}

/// Drop order matters: the outside host and the daemon go before their scratch directory.
pub struct World {
    pub outside: Outside,
    pub daemon: Daemon,
    pub scratch: Scratch,
}

pub fn world(tag: &str) -> World {
    world_with(tag, |_| None)
}

pub fn world_with(tag: &str, config: impl FnOnce(&Outside) -> Option<String>) -> World {
    world_audit(tag, config, "")
}

/// A world whose daemon's `[audit]` table gets `audit_extra`.
pub fn world_audit(
    tag: &str,
    config: impl FnOnce(&Outside) -> Option<String>,
    audit_extra: &str,
) -> World {
    require_root();
    let scratch = Scratch::new(tag);
    let outside = Outside::new(&scratch);
    let config = config(&outside);
    let daemon = Daemon::start_with(&scratch, config.as_deref(), audit_extra);
    World {
        outside,
        daemon,
        scratch,
    }
}

/// The built-in default profile, except that root keeps its capabilities in a session: for the
/// ways only a privileged task can try (raw, packet and bound-to-device sockets, IP options,
/// nsenter, child cgroups). By default a root session runs without capabilities.
pub fn root_keeps_capabilities(_: &Outside) -> Option<String> {
    Some("[profiles.airgap]\nroot = \"keep-capabilities\"\n".into())
}

/// `args` run as nobody, outside any sandbox (the controls, and services outside).
pub fn as_nobody(args: &[&str]) -> Command {
    let mut c = Command::new("setpriv");
    c.args([
        &format!("--reuid={NOBODY}"),
        &format!("--regid={NOBODY}"),
        "--clear-groups",
        "--",
    ]);
    c.args(args);
    c
}

pub fn attempt(w: &World, uid: u32, kind: &str, target: &str) -> std::process::Output {
    let probe = probe();
    w.daemon
        .run(uid, &[probe.to_str().unwrap(), "attempt", kind, target])
}

/// The session id from egressctl's start line (`egressd: session ID (profile ...`).
pub fn session_id(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr);
    err.lines()
        .find_map(|l| l.strip_prefix("egressd: session "))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no session line in egressctl's output:\n{}", text(out)))
        .to_string()
}

/// The pid the probe printed (`allowed pid=N` / `denied pid=N: ...`).
pub fn probe_pid(out: &Output) -> u32 {
    let s = String::from_utf8_lossy(&out.stdout);
    s.split("pid=")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no pid in the probe's output:\n{}", text(out)))
}

/// Every record of the daemon's audit log (all files, oldest first), as JSON values.
pub fn audit_records(d: &Daemon) -> Vec<serde_json::Value> {
    let mut files: Vec<PathBuf> = (1..100)
        .rev()
        .map(|n| PathBuf::from(format!("{}.{n}", d.audit.display())))
        .filter(|p| p.exists())
        .collect();
    files.push(d.audit.clone());
    records_in(&files)
}

/// Every record of `files` (in order), as JSON values; a missing file has none, and a line that
/// is not a record (a crash's torn line) is `verify`'s to judge.
pub fn records_in(files: &[PathBuf]) -> Vec<serde_json::Value> {
    files
        .iter()
        .flat_map(|f| {
            fs::read_to_string(f)
                .unwrap_or_default()
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Waits for a session's `session_end` record and returns all records.
pub fn records_after_end(d: &Daemon, session: &str) -> Vec<serde_json::Value> {
    let mut records = Vec::new();
    wait_until(&format!("the session_end record of {session}"), 15, || {
        records = audit_records(d);
        records
            .iter()
            .any(|r| r["type"] == "session_end" && r["session"] == session)
    });
    records
}

/// Waits until a sandboxed command is really running: the session cgroup holds egressctl and its
/// child, so setup and the enforcement check are over.
pub fn wait_for_running_session(d: &Daemon) {
    // egressctl and its child, which has exec'd CMD: before the exec the child may still be
    // handing its connect listener to egressd, and a daemon stopped then leaves nothing running.
    wait_until("a running session", 15, || {
        session_dirs(d).iter().any(|dir| {
            let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
            let pids: Vec<&str> = procs.lines().collect();
            pids.len() >= 2
                && pids.iter().any(|pid| {
                    fs::read_to_string(format!("/proc/{pid}/comm"))
                        .is_ok_and(|c| c.trim_end() != "egressctl")
                })
        })
    });
}

/// An upstream DNS server on an outside host (port 53 on both its addresses), answering from a
/// fixed table and logging every query it receives.
pub struct DnsServer {
    pub log: PathBuf,
    child: Child,
}

impl DnsServer {
    /// `records`: `NAME=IP/TTL`.
    pub fn start(outside: &Outside, scratch: &Scratch, records: &[String]) -> DnsServer {
        let log = scratch.0.join(format!("dns-{}.log", outside.netns));
        let _ = fs::remove_file(&log);
        let ready = PathBuf::from(format!("{}.ready", log.display()));
        let _ = fs::remove_file(&ready);
        let child = Command::new("ip")
            .args(["netns", "exec", &outside.netns])
            .arg(probe())
            .args(["dns-server", &outside.v4, &outside.v6])
            .arg(&log)
            .args(records)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let s = DnsServer { log, child };
        wait_until("the outside DNS server", 10, || ready.exists());
        s
    }

    /// Every query the server received: `proto name type` lines.
    pub fn queries(&self) -> Vec<String> {
        thread::sleep(Duration::from_millis(200));
        fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
