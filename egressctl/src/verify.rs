//! `egressctl verify`: the "check it from the OS" step, built in. A throwaway test host in a
//! network namespace (198.18.254.2, fd00:e9:fe::2) listens and counts; a throwaway session (as
//! uid 65534) tries the ways out; the table says what was blocked, by which layer, and whether
//! anything reached the host. Only the test host and loopback are ever contacted.

use std::{
    fs,
    io::Write,
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::{FromRawFd as _, OwnedFd},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitCode, Stdio},
    time::Duration,
};

use anyhow::{bail, Context as _};

const NETNS: &str = "egressd-verify";
const HOST_IF: &str = "egv-h";
const PEER_IF: &str = "egv-o";
const HOST_V4: &str = "198.18.254.1";
const PEER_V4: &str = "198.18.254.2";
const HOST_V6: &str = "fd00:e9:fe::1";
const PEER_V6: &str = "fd00:e9:fe::2";
const PORT: u16 = 8080;
const NOBODY: u32 = 65534;

/// One way out: what is tried, and the layer meant to stop it.
struct Way {
    name: &'static str,
    attempt: &'static str,
    target: String,
    layer: &'static str,
}

fn ways() -> Vec<Way> {
    let v4 = format!("{PEER_V4}:{PORT}");
    let v6 = format!("[{PEER_V6}]:{PORT}");
    let w = |name, attempt, target: &str, layer| Way {
        name,
        attempt,
        target: target.to_string(),
        layer,
    };
    vec![
        w("TCP connect, IPv4", "tcp", &v4, "cgroup/connect4"),
        w("TCP connect, IPv6", "tcp", &v6, "cgroup/connect6"),
        w(
            "TCP to IPv4-mapped IPv6",
            "tcp",
            &format!("[::ffff:{PEER_V4}]:{PORT}"),
            "cgroup/connect6",
        ),
        w("UDP sendto, IPv4", "udp", &v4, "cgroup/sendmsg4"),
        w("UDP sendto, IPv6", "udp", &v6, "cgroup/sendmsg6"),
        w("connected UDP", "udp-connected", &v4, "cgroup/connect4"),
        w(
            "DNS query for an unlisted name",
            "dns",
            &format!("{PEER_V4}:53"),
            "DNS redirect (NXDOMAIN)",
        ),
        w(
            "raw socket",
            "raw",
            "-",
            "capabilities + cgroup/sock_create",
        ),
        w(
            "ICMP ping socket",
            "ping",
            "-",
            "ping_group_range + cgroup/sock_create",
        ),
        w("AF_PACKET socket", "packet", "-", "seccomp (families)"),
        w("AF_VSOCK socket", "vsock", "-", "seccomp (families)"),
        w(
            "ptrace of a same-uid process outside",
            "ptrace",
            "-",
            "landlock (seccomp without it)",
        ),
        w(
            "unix socket of a service outside (tmux, systemd --user, docker)",
            "unix",
            "PATH",
            "unix supervisor",
        ),
        w(
            "abstract unix socket of a service outside",
            "unix-abstract",
            "ABSTRACT",
            "unix supervisor + landlock",
        ),
        w(
            "unix datagram sendto a service outside",
            "unix-sendto",
            "DGRAM",
            "cgroup/sendmsg_unix",
        ),
        w(
            "listener on 0.0.0.0 for an outside peer",
            "listen",
            &format!("0.0.0.0:{}", PORT + 1),
            "cgroup/bind4 (kept on loopback)",
        ),
    ]
}

/// Unix services outside any session, as a tmux server or `systemd --user` would be: a stream
/// socket in a directory everyone may enter, an abstract one, and a datagram one. They count what
/// reaches them, and go with the value.
struct UnixServices {
    dir: PathBuf,
    stream: PathBuf,
    dgram: PathBuf,
    abstract_name: String,
    received: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl UnixServices {
    fn start() -> anyhow::Result<UnixServices> {
        use std::os::linux::net::SocketAddrExt as _;
        use std::os::unix::fs::PermissionsExt as _;
        use std::os::unix::net::{SocketAddr as UnixAddr, UnixDatagram, UnixListener};
        use std::sync::atomic::Ordering;
        let dir = std::env::temp_dir().join(format!("egressd-verify-unix-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))?;
        let stream = dir.join("service.sock");
        let dgram = dir.join("datagram.sock");
        let abstract_name = format!("egressd-verify-{}", std::process::id());
        let received = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let listeners = [
            UnixListener::bind(&stream)?,
            UnixListener::bind_addr(&UnixAddr::from_abstract_name(abstract_name.as_bytes())?)?,
        ];
        let datagram = UnixDatagram::bind(&dgram)?;
        for p in [&stream, &dgram] {
            fs::set_permissions(p, fs::Permissions::from_mode(0o777))?;
        }
        for l in listeners {
            let received = received.clone();
            std::thread::spawn(move || {
                for c in l.incoming().flatten() {
                    received.fetch_add(1, Ordering::Relaxed);
                    drop(c);
                }
            });
        }
        let got = received.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while datagram.recv(&mut buf).is_ok() {
                got.fetch_add(1, Ordering::Relaxed);
            }
        });
        Ok(UnixServices {
            dir,
            stream,
            dgram,
            abstract_name,
            received,
        })
    }

    fn take_received(&self) -> u64 {
        self.received.swap(0, std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for UnixServices {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Removes the test host on every exit path.
struct TestHost {
    listener: Option<Child>,
    counts: PathBuf,
}

impl Drop for TestHost {
    fn drop(&mut self) {
        if let Some(mut c) = self.listener.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("ip").args(["netns", "del", NETNS]).status();
        let _ = Command::new("ip")
            .args(["link", "del", HOST_IF])
            .stderr(Stdio::null())
            .status();
        let _ = fs::remove_file(&self.counts);
    }
}

fn ip(args: &str) -> anyhow::Result<()> {
    let st = Command::new("ip")
        .args(args.split_whitespace())
        .status()
        .context("running ip(8) (package iproute2)")?;
    if !st.success() {
        bail!("ip {args} failed");
    }
    Ok(())
}

fn test_host(me: &Path) -> anyhow::Result<TestHost> {
    let _ = Command::new("ip")
        .args(["netns", "del", NETNS])
        .stderr(Stdio::null())
        .status();
    let counts = std::env::temp_dir().join(format!("egressd-verify-{}", std::process::id()));
    let mut host = TestHost {
        listener: None,
        counts: counts.clone(),
    };
    ip(&format!("netns add {NETNS}"))?;
    ip(&format!("link add {HOST_IF} type veth peer name {PEER_IF}"))?;
    ip(&format!("link set {PEER_IF} netns {NETNS}"))?;
    ip(&format!("addr add {HOST_V4}/24 dev {HOST_IF}"))?;
    ip(&format!("-6 addr add {HOST_V6}/64 dev {HOST_IF} nodad"))?;
    ip(&format!("link set {HOST_IF} up"))?;
    ip(&format!("-n {NETNS} addr add {PEER_V4}/24 dev {PEER_IF}"))?;
    ip(&format!(
        "-n {NETNS} -6 addr add {PEER_V6}/64 dev {PEER_IF} nodad"
    ))?;
    ip(&format!("-n {NETNS} link set {PEER_IF} up"))?;
    ip(&format!("-n {NETNS} link set lo up"))?;
    let child = Command::new("ip")
        .args(["netns", "exec", NETNS])
        .arg(me)
        .arg("__verify-listen")
        .arg(&counts)
        .stdin(Stdio::null())
        .spawn()
        .context("starting the test host's listener")?;
    host.listener = Some(child);
    for _ in 0..200 {
        if counts.exists() {
            return Ok(host);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    bail!("the test host's listener did not start")
}

/// The test host: counts TCP connections, UDP datagrams (8080) and DNS queries (53) it receives.
pub fn listen(counts: &Path) -> anyhow::Result<ExitCode> {
    let total = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let bump = {
        let (total, counts) = (total.clone(), counts.to_owned());
        move || {
            let n = total.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            let _ = fs::write(&counts, n.to_string());
        }
    };
    let mut handles = Vec::new();
    for ip in [PEER_V4, PEER_V6] {
        let ip: std::net::IpAddr = ip.parse()?;
        for port in [PORT, PORT + 1] {
            let tcp = TcpListener::bind(SocketAddr::new(ip, port))?;
            let b = bump.clone();
            handles.push(std::thread::spawn(move || {
                for _ in tcp.incoming().flatten() {
                    b();
                }
            }));
        }
        for port in [PORT, 53] {
            let udp = UdpSocket::bind(SocketAddr::new(ip, port))?;
            let b = bump.clone();
            handles.push(std::thread::spawn(move || {
                let mut buf = [0u8; 512];
                while udp.recv(&mut buf).is_ok() {
                    b();
                }
            }));
        }
    }
    fs::write(counts, "0")?;
    for h in handles {
        let _ = h.join();
    }
    Ok(ExitCode::SUCCESS)
}

fn received(host: &TestHost) -> u64 {
    std::thread::sleep(Duration::from_millis(300));
    fs::read_to_string(&host.counts)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// One attempt from inside the sandbox. Prints `blocked <why>` or `through <what>`.
pub fn attempt(kind: &str, target: &str) -> anyhow::Result<ExitCode> {
    let t = Duration::from_secs(2);
    let addr = || -> SocketAddr { target.parse().expect("IP:PORT") };
    let result: std::io::Result<String> = match kind {
        "tcp" => TcpStream::connect_timeout(&addr(), t).map(|_| "connected".into()),
        "udp" => UdpSocket::bind(if addr().is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        })
        .and_then(|s| s.send_to(b"egressd-verify", addr()))
        .map(|_| "sent".into()),
        "udp-connected" => UdpSocket::bind("0.0.0.0:0")
            .and_then(|s| {
                s.connect(addr())?;
                s.send(b"egressd-verify")
            })
            .map(|_| "sent".into()),
        "dns" => dns_query(addr()),
        "raw" => socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_UDP),
        "ping" => socket(libc::AF_INET, libc::SOCK_DGRAM, libc::IPPROTO_ICMP),
        "packet" => socket(libc::AF_PACKET, libc::SOCK_RAW, 0x0300),
        "vsock" => socket(libc::AF_VSOCK, libc::SOCK_STREAM, 0),
        "ptrace" => {
            let pid: i32 = target.parse().expect("a pid");
            // SAFETY: PTRACE_ATTACH with a pid; no pointers.
            if unsafe { libc::ptrace(libc::PTRACE_ATTACH, pid, 0, 0) } == 0 {
                // SAFETY: as above.
                unsafe { libc::ptrace(libc::PTRACE_DETACH, pid, 0, 0) };
                Ok("attached".into())
            } else {
                Err(std::io::Error::last_os_error())
            }
        }
        "unix" => std::os::unix::net::UnixStream::connect(target).map(|_| "connected".into()),
        "unix-abstract" => {
            use std::os::linux::net::SocketAddrExt as _;
            std::os::unix::net::SocketAddr::from_abstract_name(target.as_bytes())
                .and_then(|a| std::os::unix::net::UnixStream::connect_addr(&a))
                .map(|_| "connected".into())
        }
        "unix-sendto" => std::os::unix::net::UnixDatagram::unbound()
            .and_then(|s| s.send_to(b"egressd-verify", target))
            .map(|_| "sent".into()),
        "listen" => TcpListener::bind(target).map(|l| {
            l.local_addr()
                .map(|a| format!("bound {a}"))
                .unwrap_or_default()
        }),
        other => bail!("unknown attempt {other}"),
    };
    match result {
        Ok(what) => println!("through {what}"),
        Err(e) => println!("blocked {e}"),
    }
    Ok(ExitCode::SUCCESS)
}

fn socket(family: i32, ty: i32, proto: i32) -> std::io::Result<String> {
    // SAFETY: plain socket(2); the fd is owned right away.
    let fd = unsafe { libc::socket(family, ty, proto) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor we own.
    drop(unsafe { OwnedFd::from_raw_fd(fd) });
    Ok("socket created".into())
}

/// A query for a name no profile lists; prints the answer's rcode.
fn dns_query(server: SocketAddr) -> std::io::Result<String> {
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in ["egressd-verify", "invalid"] {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    let s = UdpSocket::bind("0.0.0.0:0")?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.send_to(&q, server)?;
    let mut buf = [0u8; 512];
    let (n, from) = s.recv_from(&mut buf)?;
    let rcode = if n > 3 { buf[3] & 0x0f } else { 255 };
    Ok(format!("answer rcode {rcode} from {from}"))
}

pub fn verify(socket: &Path) -> anyhow::Result<ExitCode> {
    if !nix::unistd::geteuid().is_root() {
        bail!("egressctl verify needs root (it creates a network namespace for its test host); try `sudo egressctl verify`");
    }
    let me = std::env::current_exe().context("locating egressctl")?;
    let host = test_host(&me)?;
    // A process of the same uid outside the sandbox, for the ptrace row.
    let mut victim = Command::new("sleep")
        .arg("60")
        .uid(NOBODY)
        .gid(NOBODY)
        .spawn()
        .context("starting sleep(1) for the ptrace check")?;
    let victim_pid = victim.id().to_string();
    let services = UnixServices::start().context("starting the outside unix services")?;
    let mut rows = Vec::new();
    let mut failed = false;
    for way in ways() {
        let before = received(&host);
        let target = match way.attempt {
            "ptrace" => victim_pid.clone(),
            "unix" => services.stream.display().to_string(),
            "unix-abstract" => services.abstract_name.clone(),
            "unix-sendto" => services.dgram.display().to_string(),
            _ => way.target.clone(),
        };
        let out = Command::new(&me)
            .arg("--socket")
            .arg(socket)
            .args(["run", "--", &me.display().to_string(), "__verify-attempt"])
            .args([way.attempt, &target])
            .stdin(Stdio::null())
            .process_group(0)
            .uid(NOBODY)
            .gid(NOBODY)
            .output()
            .context("starting a throwaway session")?;
        if out.status.code() == Some(125) {
            bail!(
                "egressctl run failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let got = received(&host) - before + services.take_received();
        let (status, detail) = judge(&way, &line, got);
        failed |= status != "blocked";
        rows.push((way.name, status, way.layer, detail));
    }
    let _ = victim.kill();
    let _ = victim.wait();
    drop(host);
    report(&mut std::io::stdout().lock(), &rows, failed)?;
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// The table, then one line about the test host (and one more when a way was not blocked).
fn report(
    out: &mut impl Write,
    rows: &[(&str, &str, &str, String)],
    failed: bool,
) -> std::io::Result<()> {
    let w0 = rows.iter().map(|r| r.0.len()).max().unwrap_or(10);
    let w2 = rows.iter().map(|r| r.2.len()).max().unwrap_or(10);
    writeln!(
        out,
        "{:<w0$}  {:<8}  {:<w2$}  DETAIL",
        "WAY", "RESULT", "LAYER"
    )?;
    for (name, status, layer, detail) in rows {
        writeln!(out, "{name:<w0$}  {status:<8}  {layer:<w2$}  {detail}")?;
    }
    writeln!(
        out,
        "\ntest host {PEER_V4} / {PEER_V6} in network namespace {NETNS} (removed); attempts ran as uid {NOBODY} in throwaway sessions of the default profile"
    )?;
    if failed {
        writeln!(out, "SOME WAYS WERE NOT BLOCKED: see the rows above")?;
    }
    Ok(())
}

/// blocked: refused (or answered locally) and nothing reached the test host.
fn judge(way: &Way, line: &str, received: u64) -> (&'static str, String) {
    if received > 0 {
        return ("REACHED", format!("test host received {received}: {line}"));
    }
    match (way.attempt, line) {
        ("dns", l) if l.starts_with("through answer rcode 3") => (
            "blocked",
            "NXDOMAIN from egressd's resolver; nothing reached the host".into(),
        ),
        ("listen", l) if l.starts_with("through bound 127.0.0.1:") => (
            "blocked",
            format!("{}: no outside peer can connect", &l["through ".len()..]),
        ),
        (_, l) if l.starts_with("blocked ") => ("blocked", l["blocked ".len()..].to_string()),
        (_, l) => ("OPEN", l.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The README's `egressctl verify` sample, as printed (the 4-space indent removed).
    fn readme_sample() -> String {
        let readme = include_str!("../../README.md");
        let start = readme
            .find("    $ sudo egressctl verify\n")
            .expect("README has the verify sample");
        readme[start..]
            .lines()
            .skip(1)
            .take_while(|l| l.is_empty() || l.starts_with("    "))
            .map(|l| l.strip_prefix("    ").unwrap_or(l))
            .collect::<Vec<_>>()
            .join("\n")
            .trim_end()
            .to_string()
            + "\n"
    }

    #[test]
    fn the_report_ends_with_one_test_host_line() {
        let rows = [
            (
                "TCP connect, IPv4",
                "blocked",
                "cgroup/connect4",
                "refused".to_string(),
            ),
            ("raw socket", "OPEN", "capabilities", "created".to_string()),
        ];
        for failed in [false, true] {
            let mut out = Vec::new();
            report(&mut out, &rows, failed).unwrap();
            let text = String::from_utf8(out).unwrap();
            assert_eq!(text.matches("test host ").count(), 1, "{text}");
            let last = text.lines().last().unwrap();
            if failed {
                assert!(last.starts_with("SOME WAYS WERE NOT BLOCKED"), "{text}");
                assert_eq!(text.matches("SOME WAYS").count(), 1, "{text}");
            } else {
                assert!(last.starts_with("test host "), "{text}");
            }
        }
    }

    /// The README's sample is what `report` prints for its rows: same columns, one last line.
    #[test]
    fn the_readme_sample_is_what_the_report_prints() {
        let sample = readme_sample();
        let lines: Vec<&str> = sample.lines().collect();
        let rows: Vec<(&str, &str, &str, String)> = lines[1..]
            .iter()
            .take_while(|l| !l.is_empty())
            .map(|l| {
                let cols: Vec<&str> = l
                    .split("  ")
                    .map(str::trim)
                    .filter(|c| !c.is_empty())
                    .collect();
                assert_eq!(cols.len(), 4, "{l}");
                (cols[0], cols[1], cols[2], cols[3].to_string())
            })
            .collect();
        assert_eq!(rows.len(), ways().len());
        for (row, way) in rows.iter().zip(ways()) {
            assert_eq!((row.0, row.2), (way.name, way.layer));
        }
        let mut out = Vec::new();
        report(&mut out, &rows, false).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), sample);
    }
}
