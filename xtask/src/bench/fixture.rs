//! What the benchmark sets up, each piece removed when dropped (also when a part fails or panics):
//! a scratch directory, private egressd daemons (own cgroup, pins, socket, resolver port), plain
//! cgroups for the comparison variants, an nftables table, an "outside" host in a network
//! namespace (198.18.200.0/24), loopback sinks, and the BPF statistics switch.
//! Leftovers of a killed run (everything is named `egbench*`) are swept at the start.

use std::{
    fs,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{TcpListener, UdpSocket},
    os::unix::{fs::PermissionsExt as _, net::UnixStream},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};

static NEXT: AtomicU32 = AtomicU32::new(1);

pub const OUTSIDE_HOST: &str = "198.18.200.1";
pub const OUTSIDE: &str = "198.18.200.2";

pub fn sh(cmd: &str) -> Output {
    Command::new("sh")
        .args(["-c", cmd])
        .output()
        .expect("running sh")
}

fn must(cmd: &str) -> anyhow::Result<()> {
    let out = sh(cmd);
    if !out.status.success() {
        bail!("{cmd}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

pub fn cgroup2_mount() -> anyhow::Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mounts")?;
    mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
        })
        .context("no cgroup2 mount in /proc/self/mounts")
}

/// The release binaries the benchmark runs.
pub struct Bins {
    pub egressd: PathBuf,
    pub egressctl: PathBuf,
    pub probe: PathBuf,
}

impl Bins {
    pub fn new() -> Bins {
        let dir = crate::workspace_root().join("target/release");
        Bins {
            egressd: dir.join("egressd"),
            egressctl: dir.join("egressctl"),
            probe: dir.join("egressd-probe"),
        }
    }
}

/// Removes what a killed earlier run left: its daemons, network namespaces, cgroups, pins,
/// nftables tables and scratch directories.
pub fn sweep(bins: &Bins) {
    for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let argv = fs::read(e.path().join("cmdline")).unwrap_or_default();
        let argv: Vec<&[u8]> = argv.split(|b| *b == 0).collect();
        let ours = argv.first().is_some_and(|a| a.ends_with(b"/egressd"))
            && argv
                .windows(2)
                .any(|w| w[0] == b"--cgroup" && w[1].starts_with(b"egbench-"));
        if ours {
            // SAFETY: kill(2) of a benchmark daemon an earlier run started and left behind.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    for e in fs::read_dir(std::env::temp_dir())
        .into_iter()
        .flatten()
        .flatten()
    {
        if e.file_name().to_string_lossy().starts_with("egbench-") {
            let _ = fs::remove_dir_all(e.path());
        }
    }
    let out = sh("ip netns list 2>/dev/null");
    for l in String::from_utf8_lossy(&out.stdout).lines() {
        if let Some(name) = l
            .split_whitespace()
            .next()
            .filter(|n| n.starts_with("egbench"))
        {
            let _ = sh(&format!("ip netns del {name}"));
        }
    }
    let out = sh("nft list tables 2>/dev/null");
    for l in String::from_utf8_lossy(&out.stdout).lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() == 3 && f[2].starts_with("egbench") {
            let _ = sh(&format!("nft delete table {} {}", f[1], f[2]));
        }
    }
    if let Ok(cg) = cgroup2_mount() {
        for e in fs::read_dir(&cg).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("egbench") {
                let _ = Command::new(&bins.egressd)
                    .args(["--cgroup", &name, "--cgroup-backend", "direct"])
                    .args(["--bpffs", &format!("/sys/fs/bpf/{name}")])
                    .arg("cleanup")
                    .output();
                remove_cgroup(&e.path());
            }
        }
    }
    for e in fs::read_dir("/sys/fs/bpf").into_iter().flatten().flatten() {
        if e.file_name().to_string_lossy().starts_with("egbench") {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

fn populated(dir: &Path) -> bool {
    fs::read_to_string(dir.join("cgroup.events"))
        .map(|s| s.lines().any(|l| l == "populated 1"))
        .unwrap_or(false)
}

/// Kills everything in a cgroup tree and removes it, children first.
pub fn remove_cgroup(dir: &Path) {
    if fs::write(dir.join("cgroup.kill"), "1").is_ok() {
        let deadline = Instant::now() + Duration::from_secs(5);
        while populated(dir) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
    }
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.path().is_dir() {
            remove_cgroup(&e.path());
        }
    }
    let _ = fs::remove_dir(dir);
}

pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new() -> anyhow::Result<Scratch> {
        let dir = std::env::temp_dir().join(format!("egbench-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))?;
        Ok(Scratch(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A cgroup at the top of the cgroup2 tree, for the variants egressd does not run.
pub struct Cgroup {
    pub dir: PathBuf,
    pub name: String,
}

impl Cgroup {
    pub fn new(tag: &str) -> anyhow::Result<Cgroup> {
        let name = format!("egbench-{}-{tag}", std::process::id());
        let dir = cgroup2_mount()?.join(&name);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Cgroup { dir, name })
    }

    /// `argv` started inside this cgroup (the shell moves itself in, then execs).
    pub fn command(&self, argv: &[&str]) -> Command {
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg(format!(
                "echo $$ > {}/cgroup.procs && exec \"$@\"",
                self.dir.display()
            ))
            .arg("sh")
            .args(argv);
        c
    }

    /// The path nft's `socket cgroupv2` takes: relative to /sys/fs/cgroup.
    pub fn nft_path(&self) -> String {
        self.dir
            .strip_prefix("/sys/fs/cgroup")
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| self.name.clone())
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        remove_cgroup(&self.dir);
    }
}

/// The nftables rules a user would write instead of egressd: loopback allowed, everything else
/// from the tool's cgroup rejected. Loaded only while its variant runs.
pub struct Nft {
    table: String,
}

impl Nft {
    pub fn load(cg: &Cgroup) -> anyhow::Result<Nft> {
        let table = format!("egbench{}", std::process::id());
        let rules = format!(
            "table inet {table} {{\n  chain out {{\n    type filter hook output priority 0; policy accept;\n    oif \"lo\" accept\n    socket cgroupv2 level 1 \"{}\" reject with icmpx admin-prohibited\n  }}\n}}\n",
            cg.nft_path()
        );
        let mut child = Command::new("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running nft (apt-get install nftables)")?;
        child.stdin.take().unwrap().write_all(rules.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!("nft -f: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(Nft { table })
    }
}

impl Drop for Nft {
    fn drop(&mut self) {
        let _ = sh(&format!("nft delete table inet {}", self.table));
    }
}

/// An "outside" host: a network namespace behind a veth pair, 198.18.200.2 (this side .1). Nothing
/// listens there; denied traffic must never reach it, and nothing else is addressed.
pub struct Outside {
    netns: String,
    host_if: String,
}

impl Outside {
    pub fn new() -> anyhow::Result<Outside> {
        let tag = std::process::id() % 100000;
        let o = Outside {
            netns: format!("egbench{tag}"),
            host_if: format!("egbh{tag}"),
        };
        let out_if = format!("egbo{tag}");
        let _ = sh(&format!(
            "ip netns del {} 2>/dev/null; ip link del {} 2>/dev/null",
            o.netns, o.host_if
        ));
        must(&format!("ip netns add {}", o.netns))?;
        must(&format!(
            "ip link add {} type veth peer name {out_if}",
            o.host_if
        ))?;
        must(&format!("ip link set {out_if} netns {}", o.netns))?;
        must(&format!("ip addr add {OUTSIDE_HOST}/24 dev {}", o.host_if))?;
        must(&format!("ip link set {} up", o.host_if))?;
        must(&format!(
            "ip -n {} addr add {OUTSIDE}/24 dev {out_if}",
            o.netns
        ))?;
        must(&format!("ip -n {} link set {out_if} up", o.netns))?;
        Ok(o)
    }
}

impl Drop for Outside {
    fn drop(&mut self) {
        let _ = sh(&format!(
            "ip netns del {}; ip link del {} 2>/dev/null",
            self.netns, self.host_if
        ));
    }
}

/// A port nothing on loopback uses right now (TCP and UDP).
pub fn free_port() -> u16 {
    loop {
        let t = TcpListener::bind("127.0.0.1:0").unwrap();
        let p = t.local_addr().unwrap().port();
        if UdpSocket::bind(("127.0.0.1", p)).is_ok() && UdpSocket::bind(("::1", p)).is_ok() {
            return p;
        }
    }
}

/// A private egressd, like the tests' fixture.
pub struct Daemon {
    pub name: String,
    pub socket: PathBuf,
    pub config: PathBuf,
    pub audit: PathBuf,
    pub log: PathBuf,
    dns_table: String,
    audit_table: String,
    egressd: PathBuf,
    egressctl: PathBuf,
    child: Option<Child>,
}

impl Daemon {
    /// `policy`: profiles (and `default_profile`); `dns`: the body of the `[dns]` table (port and
    /// upstream are set here unless given); `audit`: extra lines of the `[audit]` table.
    pub fn start(
        bins: &Bins,
        scratch: &Scratch,
        tag: &str,
        policy: &str,
        dns: &str,
        audit: &str,
    ) -> anyhow::Result<Daemon> {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("egbench-{}-d{n}-{tag}", std::process::id());
        let dir = scratch.0.join(&name);
        fs::create_dir_all(&dir)?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))?;
        let dns_port = free_port();
        let mut dns_table = format!("[dns]\nport = {dns_port}\n{dns}\n");
        if !dns.contains("upstream") {
            // Never the machine's own resolver.
            dns_table.push_str("upstream = []\n");
        }
        let audit_path = dir.join("audit.jsonl");
        let audit_table = format!("[audit]\npath = \"{}\"\n{audit}\n", audit_path.display());
        let mut d = Daemon {
            socket: dir.join("egressd.sock"),
            config: dir.join("egressd.toml"),
            log: dir.join("egressd.log"),
            audit: audit_path,
            name,
            dns_table,
            audit_table,
            egressd: bins.egressd.clone(),
            egressctl: bins.egressctl.clone(),
            child: None,
        };
        d.write_policy(policy)?;
        let log = fs::File::create(&d.log)?;
        d.child = Some(
            Command::new(&d.egressd)
                .args(d.args())
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("starting egressd")?,
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while UnixStream::connect(&d.socket).is_err() {
            if let Some(st) = d.child.as_mut().unwrap().try_wait()? {
                bail!(
                    "egressd exited ({st}): {}",
                    fs::read_to_string(&d.log).unwrap_or_default()
                );
            }
            if Instant::now() > deadline {
                bail!("egressd did not come up in 30 s");
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(d)
    }

    pub fn write_policy(&self, policy: &str) -> anyhow::Result<()> {
        fs::write(
            &self.config,
            format!("{policy}\n{}\n{}", self.dns_table, self.audit_table),
        )?;
        Ok(())
    }

    fn args(&self) -> Vec<String> {
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

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn cgroup_dir(&self) -> PathBuf {
        cgroup2_mount().unwrap().join(&self.name)
    }

    /// `egressctl run [--profile P] -- argv` against this daemon.
    pub fn run_cmd(&self, profile: Option<&str>, argv: &[&str]) -> Command {
        let mut c = Command::new(&self.egressctl);
        c.arg("--socket").arg(&self.socket).arg("run");
        if let Some(p) = profile {
            c.args(["--profile", p]);
        }
        c.arg("--").args(argv);
        c
    }

    /// One request on the control socket; the reply as JSON.
    pub fn request(&self, op: &str) -> anyhow::Result<serde_json::Value> {
        let mut s = UnixStream::connect(&self.socket)?;
        s.write_all(format!("{{\"v\":1,\"op\":\"{op}\"}}\n").as_bytes())?;
        let mut line = String::new();
        BufReader::new(&mut s).read_line(&mut line)?;
        let v: serde_json::Value = serde_json::from_str(&line)?;
        if let Some(e) = v["reply"]["error"]["message"].as_str() {
            bail!("egressd: {e}");
        }
        Ok(v)
    }

    /// (program name, id) of every hook.
    pub fn programs(&self) -> anyhow::Result<Vec<(String, u32)>> {
        let v = self.request("status")?;
        Ok(v["reply"]["status"]["hooks"]
            .as_array()
            .context("no hooks in the status reply")?
            .iter()
            .map(|h| {
                (
                    h["attach_type"].as_str().unwrap_or("?").to_string(),
                    h["prog_id"].as_u64().unwrap_or(0) as u32,
                )
            })
            .collect())
    }

    /// Number of session cgroups right now.
    pub fn session_count(&self) -> usize {
        fs::read_dir(self.cgroup_dir())
            .map(|r| r.flatten().filter(|e| e.path().is_dir()).count())
            .unwrap_or(0)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        remove_cgroup(&self.cgroup_dir());
        let _ = Command::new(&self.egressd)
            .args(self.args())
            .arg("cleanup")
            .output();
        let _ = fs::remove_dir_all(format!("/sys/fs/bpf/{}", self.name));
        remove_cgroup(&self.cgroup_dir());
    }
}

/// `kernel.bpf_stats_enabled` on while this lives; the old value back after.
pub struct BpfStats {
    old: String,
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    pub fn enable() -> anyhow::Result<BpfStats> {
        let old = fs::read_to_string(BPF_STATS)
            .context("reading kernel.bpf_stats_enabled")?
            .trim()
            .to_string();
        fs::write(BPF_STATS, "1").context("setting kernel.bpf_stats_enabled=1")?;
        Ok(BpfStats { old })
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = fs::write(BPF_STATS, &self.old);
    }
}

/// Loopback receivers the load generators talk to, outside every sandbox (like a local model
/// server): a TCP listener that accepts and closes, and a UDP socket that drains.
pub struct Sinks {
    pub tcp: String,
    pub udp: String,
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Sinks {
    pub fn start() -> anyhow::Result<Sinks> {
        let stop = Arc::new(AtomicBool::new(false));
        let l = TcpListener::bind("127.0.0.1:0")?;
        // A deep accept queue: a burst of connects must not hit SYN drops (1 s retransmits).
        // SAFETY: listen(2) again on our own socket only raises the backlog.
        unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&l), 4096) };
        let tcp = l.local_addr()?.to_string();
        let u = UdpSocket::bind("127.0.0.1:0")?;
        u.set_read_timeout(Some(Duration::from_millis(100)))?;
        let udp = u.local_addr()?.to_string();
        let mut threads = Vec::new();
        let s = stop.clone();
        l.set_nonblocking(true)?;
        threads.push(thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((c, _)) => drop(c),
                    Err(_) => thread::sleep(Duration::from_micros(200)),
                }
            }
        }));
        let s = stop.clone();
        threads.push(thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !s.load(Ordering::Relaxed) {
                let _ = u.recv(&mut buf);
            }
        }));
        Ok(Sinks {
            tcp,
            udp,
            stop,
            threads,
        })
    }
}

impl Drop for Sinks {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Runs a command to completion and parses the last line of its stdout as JSON.
pub fn json_of(cmd: &mut Command) -> anyhow::Result<serde_json::Value> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or("");
    serde_json::from_str(last).with_context(|| {
        format!(
            "{cmd:?} ({}) printed no JSON: {stdout} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Reads what has been appended to a file since `offset`.
pub fn read_from(path: &Path, offset: &mut u64) -> String {
    use std::io::Seek as _;
    let Ok(mut f) = fs::File::open(path) else {
        return String::new();
    };
    if f.seek(std::io::SeekFrom::Start(*offset)).is_err() {
        return String::new();
    }
    let mut s = String::new();
    let _ = f.read_to_string(&mut s);
    // Only whole lines.
    let keep = s.rfind('\n').map(|i| i + 1).unwrap_or(0);
    s.truncate(keep);
    *offset += keep as u64;
    s
}
