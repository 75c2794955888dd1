//! Hand-off protection against a real kernel: a sandboxed process may not have a same-user process
//! outside its session act for it over a unix socket (a command runner, a tmux server, D-Bus
//! activation, a container engine's socket, a TCP socket passed over SCM_RIGHTS, a unix socket
//! inherited on stdin), while unix IPC inside one session and the allow-listed desktop sockets
//! keep working.
//!
//! Everything runs as nobody, inside and outside. A refusal is judged by what the outside host
//! received, and each one has a control: the same way, tried from outside any sandbox, reaches the
//! outside host, so a test fails if the protection is missing.

use std::{
    fs,
    io::{BufRead as _, BufReader, Lines},
    os::{
        fd::OwnedFd,
        unix::{fs::PermissionsExt as _, net::UnixStream},
    },
    path::{Path, PathBuf},
    process::{Child, ChildStdout, Command, Output, Stdio},
    sync::{Mutex, MutexGuard},
    thread,
    time::{Duration, Instant},
};

use egressd_tests::*;

/// How long a refused hand-off gets to show up at the outside host anyway (a runner starts its
/// command asynchronously) before "nothing arrived" is believed.
const SETTLE: Duration = Duration::from_millis(700);

const CONNECT_HOOK: &[&str] = &["connect_unix"];
/// An unconnected datagram with an explicit address: the refusal may be recorded by either hook.
const SENDTO_HOOKS: &[&str] = &["connect_unix", "sendmsg_unix"];

fn nobody_cmd(program: &str) -> Command {
    as_nobody(&[program])
}

fn probe_path() -> String {
    probe().display().to_string()
}

/// `out` is a command egressctl really ran in a session (not egressctl giving up before it).
fn ran_in_session(out: &Output) -> String {
    let session = session_id(out);
    assert_ne!(
        out.status.code(),
        Some(125),
        "egressctl did not run the command:\n{}",
        text(out)
    );
    session
}

/// The client's own report of a refused connect (EACCES, or EPERM).
fn says_refused(out: &Output) -> bool {
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    all.contains("Permission denied") || all.contains("Operation not permitted")
}

/// A directory owned by nobody, removed with everything in it when dropped.
struct NobodyDir(PathBuf);

impl NobodyDir {
    fn new(path: impl Into<PathBuf>, mode: u32) -> NobodyDir {
        let path = path.into();
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap();
        std::os::unix::fs::chown(&path, Some(NOBODY), Some(NOBODY)).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        NobodyDir(path)
    }

    /// A directory under /tmp (not the scratch directory), as a user's own would be.
    fn in_tmp(tag: &str) -> NobodyDir {
        NobodyDir::new(
            format!("/tmp/egressd-handoff-{}-{tag}", std::process::id()),
            0o755,
        )
    }

    fn path(&self, name: &str) -> String {
        self.0.join(name).display().to_string()
    }
}

impl Drop for NobodyDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Tests that use /run/user/65534 take turns.
static RUN_USER: Mutex<()> = Mutex::new(());

/// nobody's /run/user/65534 (XDG_RUNTIME_DIR), made 0700 and owned by nobody if missing. Removes
/// what it created: the files handed out, the directories it made.
struct RunUser {
    dir: PathBuf,
    made_dirs: Vec<PathBuf>,
    files: Vec<PathBuf>,
    _turn: MutexGuard<'static, ()>,
}

impl RunUser {
    fn new() -> RunUser {
        let turn = RUN_USER.lock().unwrap_or_else(|e| e.into_inner());
        let mut made_dirs = Vec::new();
        let run_user = PathBuf::from("/run/user");
        if !run_user.exists() {
            fs::create_dir(&run_user).unwrap();
            fs::set_permissions(&run_user, fs::Permissions::from_mode(0o755)).unwrap();
            made_dirs.push(run_user.clone());
        }
        let dir = run_user.join(NOBODY.to_string());
        if !dir.exists() {
            fs::create_dir(&dir).unwrap();
            std::os::unix::fs::chown(&dir, Some(NOBODY), Some(NOBODY)).unwrap();
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
            made_dirs.push(dir.clone());
        }
        RunUser {
            dir,
            made_dirs,
            files: Vec::new(),
            _turn: turn,
        }
    }

    /// A socket path under the runtime directory that nothing uses (never someone's real one),
    /// with its parent directories made as nobody's.
    fn file(&mut self, name: &str) -> String {
        let path = self.dir.join(name);
        assert!(
            !path.exists(),
            "{} already exists: a real session of uid {NOBODY} seems to use it; the test will not touch it",
            path.display()
        );
        let mut parent = path.parent().unwrap().to_path_buf();
        let mut missing = Vec::new();
        while !parent.exists() {
            missing.push(parent.clone());
            parent = parent.parent().unwrap().to_path_buf();
        }
        for d in missing.into_iter().rev() {
            fs::create_dir(&d).unwrap();
            std::os::unix::fs::chown(&d, Some(NOBODY), Some(NOBODY)).unwrap();
            fs::set_permissions(&d, fs::Permissions::from_mode(0o700)).unwrap();
            self.made_dirs.push(d);
        }
        self.files.push(path.clone());
        path.display().to_string()
    }
}

impl Drop for RunUser {
    fn drop(&mut self) {
        for f in &self.files {
            let _ = fs::remove_file(f);
        }
        for d in self.made_dirs.iter().rev() {
            let _ = fs::remove_dir_all(d);
        }
    }
}

/// A server process outside any sandbox, killed when dropped.
struct Server {
    child: Child,
    out: Option<Lines<BufReader<ChildStdout>>>,
}

impl Server {
    /// Spawns `cmd` with its stdout piped and returns it with the first line it printed.
    fn spawn(what: &str, mut cmd: Command) -> (Server, String) {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut s = Server { child, out: None };
        let first = match out.next() {
            Some(Ok(l)) => l,
            _ => {
                let status = s.child.wait().unwrap();
                panic!("{what} did not start ({status}); its stderr is above");
            }
        };
        s.out = Some(out);
        (s, first)
    }

    /// `egressd-probe ARGS` as nobody outside any sandbox, once it printed `listening`.
    fn probe(args: &[&str]) -> Server {
        let p = probe_path();
        let what = format!("egressd-probe {}", args.join(" "));
        let mut cmd = nobody_cmd(&p);
        cmd.args(args);
        let (s, first) = Server::spawn(&what, cmd);
        assert_eq!(first, "listening", "{what}");
        s
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops the server (after giving what its clients sent time to be printed) and returns
    /// every line it printed after its first one.
    fn finish(&mut self) -> Vec<String> {
        thread::sleep(Duration::from_millis(500));
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.out
            .take()
            .map(|l| l.map_while(Result::ok).collect())
            .unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The outside host's counts once they stopped moving (teardown of earlier connections included).
fn settled(w: &World) -> Counts {
    let mut a = w.outside.counts();
    loop {
        let b = w.outside.counts();
        if a == b {
            return b;
        }
        a = b;
    }
}

/// The refusal half: nothing reached the outside host.
fn assert_nothing_reached(w: &World, before: Counts, what: &str, out: &Output) {
    thread::sleep(SETTLE);
    let now = w.outside.counts();
    assert_eq!(
        now,
        before,
        "{what}: the outside host received traffic after the sandboxed try, so the hand-off to a \
         process outside the session went through ({before:?} -> {now:?}); the sandboxed command:\n{}",
        text(out)
    );
}

/// The control half: from outside any sandbox, the same way reaches the outside host.
fn assert_reached(w: &World, before: Counts, what: &str, out: &Output) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = w.outside.counts();
        if now.tcp > before.tcp {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "control: {what} from outside any sandbox never reached the outside host within 5 s \
             ({before:?} -> {now:?}), so the refusal inside would prove nothing:\n{}",
            text(out)
        );
    }
}

/// The refusal's audit record: a denied unix decision of this session for `dest`, naming the
/// server outside (`peer_pid`: that server's pid, where the test knows it).
fn assert_audited(w: &World, out: &Output, dest: &str, peer_pid: Option<u32>, hooks: &[&str]) {
    let session = session_id(out);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let records = audit_records(&w.daemon);
        let hit = records.iter().find(|r| {
            r["type"] == "decision"
                && hooks.iter().any(|h| r["hook"] == *h)
                && r["dest"] == dest
                && r["session"] == session.as_str()
        });
        if let Some(r) = hit {
            assert_eq!(r["family"], "unix", "audit record of the hand-off: {r}");
            assert_eq!(r["verdict"], "denied", "audit record of the hand-off: {r}");
            assert_eq!(r["peer"], "outside", "audit record of the hand-off: {r}");
            match peer_pid {
                Some(pid) => assert_eq!(
                    r["peer_pid"].as_u64(),
                    Some(u64::from(pid)),
                    "audit record of the hand-off names the wrong server (pid {pid} serves {dest}): {r}"
                ),
                None => assert!(
                    r["peer_pid"].is_u64(),
                    "audit record of the hand-off has no peer_pid: {r}"
                ),
            }
            return;
        }
        if Instant::now() >= deadline {
            let unix: Vec<String> = records
                .iter()
                .filter(|r| r["family"] == "unix" || r["session"] == session.as_str())
                .map(|r| r.to_string())
                .collect();
            panic!(
                "no audit record of the refused hand-off: want type=decision hook={} family=unix \
                 dest={dest} verdict=denied session={session} peer=outside; records of the session \
                 or family unix:\n{}",
                hooks.join("|"),
                unix.join("\n")
            );
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// A command runner as nobody outside any sandbox at `path` (`kind`: stream, seqpacket, dgram or
/// dgram-sendto); the sandbox asks it to connect to the outside host, then the control does.
fn runner_case(w: &World, path: &str, kind: &str) {
    let p = probe_path();
    let server_kind = if kind == "dgram-sendto" {
        "dgram"
    } else {
        kind
    };
    let runner = Server::probe(&["runner", path, server_kind]);
    let cmd = format!("{p} attempt tcp {}", w.outside.tcp4());
    let what = format!("a {kind} command runner outside at {path}");

    let before = settled(w);
    let inside = w.daemon.run(NOBODY, &[&p, "unix-run", path, &cmd, kind]);
    assert_nothing_reached(w, before, &what, &inside);
    assert_eq!(
        probe_code(&inside),
        3,
        "{what}: the sandbox's {} was not refused with EACCES/EPERM (exit 3):\n{}",
        if kind == "dgram-sendto" {
            "sendto"
        } else {
            "connect"
        },
        text(&inside)
    );

    let before = settled(w);
    let control = as_nobody(&[&p, "unix-run", path, &cmd, kind])
        .output()
        .unwrap();
    assert_eq!(
        probe_code(&control),
        0,
        "control: {what}: {}",
        text(&control)
    );
    assert_reached(w, before, &what, &control);

    // An unconnected datagram names no server socket up front: the record need not name its pid.
    let bound = kind != "dgram-sendto";
    assert_audited(
        w,
        &inside,
        path,
        bound.then(|| runner.pid()),
        if kind == "dgram-sendto" {
            SENDTO_HOOKS
        } else {
            CONNECT_HOOK
        },
    );
}

#[test]
fn a_runner_outside_in_tmp_is_refused_for_every_socket_type() {
    let w = world("handoff-tmp");
    let dir = NobodyDir::in_tmp("runner");
    for kind in ["stream", "seqpacket", "dgram", "dgram-sendto"] {
        runner_case(&w, &dir.path(&format!("runner-{kind}.sock")), kind);
    }
}

#[test]
fn a_runner_outside_in_run_user_is_refused() {
    let w = world("handoff-xdg");
    let mut run_user = RunUser::new();
    let path = run_user.file(&format!("egressd-runner-{}.sock", std::process::id()));
    runner_case(&w, &path, "stream");
}

#[test]
fn a_runner_outside_in_home_is_refused() {
    let w = world("handoff-home");
    let home = NobodyDir::new(w.scratch.0.join("home-nobody"), 0o700);
    let cache = NobodyDir::new(home.0.join(".cache"), 0o700);
    runner_case(&w, &cache.path("runner.sock"), "stream");
}

#[test]
fn an_abstract_runner_outside_is_refused() {
    let w = world("handoff-abstract");
    runner_case(
        &w,
        &format!("@egressd-handoff-runner-{}", std::process::id()),
        "stream",
    );
}

#[test]
fn a_docker_like_socket_is_refused() {
    let w = world("handoff-docker");
    let run = NobodyDir::new(w.scratch.0.join("run"), 0o755);
    let path = run.path("docker.sock");
    // An engine's socket is group-writable for its users; the runner is the engine here.
    let p = probe_path();
    let engine = Server::probe(&["runner", &path, "stream"]);
    fs::set_permissions(&path, fs::Permissions::from_mode(0o660)).unwrap();
    let cmd = format!("{p} attempt tcp {}", w.outside.tcp4());
    let what = format!("a container-engine-like socket at {path}");

    let before = settled(&w);
    let inside = w.daemon.run(NOBODY, &[&p, "unix-run", &path, &cmd]);
    assert_nothing_reached(&w, before, &what, &inside);
    assert_eq!(
        probe_code(&inside),
        3,
        "{what}: the sandbox's connect was not refused with EACCES/EPERM (exit 3):\n{}",
        text(&inside)
    );

    let before = settled(&w);
    let control = as_nobody(&[&p, "unix-run", &path, &cmd]).output().unwrap();
    assert_eq!(
        probe_code(&control),
        0,
        "control: {what}: {}",
        text(&control)
    );
    assert_reached(&w, before, &what, &control);

    assert_audited(&w, &inside, &path, Some(engine.pid()), CONNECT_HOOK);
}

/// A tmux server as nobody, killed (`kill-server`, then by pid) when dropped.
struct Tmux {
    sock: String,
    pid: Option<u32>,
}

impl Tmux {
    fn start(sock: &str) -> Tmux {
        let out = as_nobody(&["tmux", "-f", "/dev/null", "-S", sock])
            .args(["new-session", "-d", "-s", "t"])
            // Windows run `default-shell -c CMD`; nobody's login shell is nologin.
            .env("SHELL", "/bin/sh")
            .output()
            .unwrap();
        let mut t = Tmux {
            sock: sock.to_string(),
            pid: None,
        };
        assert!(out.status.success(), "tmux new-session: {}", text(&out));
        let pid = as_nobody(&["tmux", "-S", sock, "display-message", "-p", "#{pid}"])
            .output()
            .unwrap();
        t.pid = String::from_utf8_lossy(&pid.stdout).trim().parse().ok();
        assert!(t.pid.is_some(), "tmux server pid: {}", text(&pid));
        t
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = as_nobody(&["tmux", "-S", &self.sock, "kill-server"]).output();
        if let Some(pid) = self.pid {
            // SAFETY: kill(2) of the tmux server this test started (gone already, normally).
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
}

#[test]
fn a_tmux_server_outside_runs_nothing_for_the_sandbox() {
    let w = world("handoff-tmux");
    let dir = NobodyDir::new(w.scratch.0.join("tmux"), 0o700);
    let sock = dir.path("tmux.sock");
    let tmux = Tmux::start(&sock);
    let cmd = format!("{} attempt tcp {}", probe_path(), w.outside.tcp4());
    let what = format!("a tmux server outside at {sock} (new-window)");

    let before = settled(&w);
    let inside = w
        .daemon
        .run(NOBODY, &["tmux", "-S", &sock, "new-window", &cmd]);
    assert_nothing_reached(&w, before, &what, &inside);
    ran_in_session(&inside);
    assert!(
        !inside.status.success() && says_refused(&inside),
        "{what}: tmux new-window from inside the sandbox was not refused its connect:\n{}",
        text(&inside)
    );

    let before = settled(&w);
    let control = as_nobody(&["tmux", "-S", &sock, "new-window", &cmd])
        .output()
        .unwrap();
    assert!(
        control.status.success(),
        "control: {what}: {}",
        text(&control)
    );
    assert_reached(&w, before, &what, &control);

    assert_audited(&w, &inside, &sock, tmux.pid, CONNECT_HOOK);
}

#[test]
fn d_bus_activation_outside_runs_nothing_for_the_sandbox() {
    let w = world("handoff-dbus");
    let dir = NobodyDir::new(w.scratch.0.join("dbus"), 0o755);
    let services = NobodyDir::new(dir.0.join("services"), 0o755);
    let bus = dir.path("bus");
    let config = dir.path("session.conf");
    fs::write(
        &config,
        format!(
            r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <keep_umask/>
  <listen>unix:path={bus}</listen>
  <auth>EXTERNAL</auth>
  <servicedir>{services}</servicedir>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"#,
            services = services.0.display()
        ),
    )
    .unwrap();
    // Bus activation: the bus runs Exec (outside any sandbox) for whoever calls the name.
    fs::write(
        services.0.join("org.egressd.Test.service"),
        format!(
            "[D-BUS Service]\nName=org.egressd.Test\nExec={} attempt tcp {}\n",
            probe_path(),
            w.outside.tcp4()
        ),
    )
    .unwrap();
    let mut daemon = nobody_cmd("dbus-daemon");
    daemon.args([
        &format!("--config-file={config}"),
        "--nofork",
        &format!("--address=unix:path={bus}"),
        "--print-address",
    ]);
    let (dbus, address) = Server::spawn("dbus-daemon", daemon);
    assert!(address.contains(&bus), "dbus-daemon address: {address}");
    let send = |inside: bool| {
        let args = [
            "dbus-send",
            &format!("--bus=unix:path={bus}"),
            "--dest=org.egressd.Test",
            "--print-reply",
            "--reply-timeout=5000",
            "/",
            "org.egressd.Test.Run",
        ];
        if inside {
            w.daemon.run(NOBODY, &args)
        } else {
            as_nobody(&args).output().unwrap()
        }
    };
    let what = format!("D-Bus activation through a session bus outside at {bus}");

    let before = settled(&w);
    let inside = send(true);
    assert_nothing_reached(&w, before, &what, &inside);
    ran_in_session(&inside);
    assert!(
        !inside.status.success() && says_refused(&inside),
        "{what}: dbus-send from inside the sandbox was not refused its connect to the bus:\n{}",
        text(&inside)
    );

    // The activated probe exits without taking the name, so dbus-send reports an error; what
    // matters is that the bus ran it.
    let before = settled(&w);
    let control = send(false);
    assert_reached(&w, before, &what, &control);

    assert_audited(&w, &inside, &bus, Some(dbus.pid()), CONNECT_HOOK);
}

#[test]
fn a_tcp_socket_passed_over_scm_rights_is_refused() {
    let w = world("handoff-scm");
    let dir = NobodyDir::new(w.scratch.0.join("pass"), 0o755);
    let path = dir.path("passer.sock");
    let passer = Server::probe(&["fd-passer", &path, &w.outside.tcp4()]);
    let p = probe_path();
    let what = format!("a TCP socket to the outside host passed over SCM_RIGHTS from {path}");

    let before = settled(&w);
    let inside = w.daemon.run(NOBODY, &[&p, "fd-take", &path]);
    assert_nothing_reached(&w, before, &what, &inside);
    assert_eq!(
        probe_code(&inside),
        3,
        "{what}: the sandbox's connect to the fd passer was not refused with EACCES/EPERM (exit 3):\n{}",
        text(&inside)
    );

    let before = settled(&w);
    let control = as_nobody(&[&p, "fd-take", &path]).output().unwrap();
    assert_eq!(
        probe_code(&control),
        0,
        "control: {what}: {}",
        text(&control)
    );
    assert_reached(&w, before, &what, &control);

    assert_audited(&w, &inside, &path, Some(passer.pid()), CONNECT_HOOK);
}

/// `egressd-probe fd-take-stdin LINE` with a fresh connection to `path` (made by the test, outside
/// any sandbox) as its stdin: through `egressctl run` or straight.
fn with_socket_on_stdin(w: &World, path: &str, line: &str, sandboxed: bool) -> Output {
    let conn = UnixStream::connect(path).unwrap_or_else(|e| panic!("connect {path}: {e}"));
    let stdin = Stdio::from(OwnedFd::from(conn));
    let p = probe_path();
    let mut cmd = if sandboxed {
        let mut c = w.daemon.ctl(NOBODY);
        c.args(["run", "--", &p]);
        c
    } else {
        nobody_cmd(&p)
    };
    cmd.args(["fd-take-stdin", line])
        .stdin(stdin)
        .output()
        .unwrap()
}

fn stdin_case(w: &World, path: &str, line: &str, what: &str) {
    let before = settled(w);
    let inside = with_socket_on_stdin(w, path, line, true);
    assert_nothing_reached(w, before, what, &inside);
    ran_in_session(&inside);
    assert!(
        String::from_utf8_lossy(&inside.stdout).contains("nothing through pid="),
        "{what}: the sandboxed probe got data through its inherited stdin socket:\n{}",
        text(&inside)
    );

    let before = settled(w);
    let control = with_socket_on_stdin(w, path, line, false);
    assert_eq!(
        probe_code(&control),
        0,
        "control: {what}: {}",
        text(&control)
    );
    assert_reached(w, before, what, &control);
}

#[test]
fn an_inherited_fd_passer_connection_on_stdin_passes_nothing_in() {
    let w = world("handoff-stdin-fd");
    let dir = NobodyDir::new(w.scratch.0.join("pass"), 0o755);
    let path = dir.path("passer.sock");
    let _passer = Server::probe(&["fd-passer", &path, &w.outside.tcp4()]);
    stdin_case(
        &w,
        &path,
        "fd",
        &format!("a connection to the fd passer at {path} inherited on stdin"),
    );
}

#[test]
fn an_inherited_runner_connection_on_stdin_runs_nothing() {
    let w = world("handoff-stdin-run");
    let dir = NobodyDir::new(w.scratch.0.join("runner"), 0o755);
    let path = dir.path("runner.sock");
    let _runner = Server::probe(&["runner", &path, "stream"]);
    let cmd = format!("{} attempt tcp {}", probe_path(), w.outside.tcp4());
    stdin_case(
        &w,
        &path,
        &cmd,
        &format!("a connection to the command runner at {path} inherited on stdin"),
    );
}

/// `sh -c SAME_SESSION sh PROBE SOCK LOG SERVER-ARGS...`, inside one session: starts
/// `PROBE SERVER-ARGS` (its output in LOG), waits for it to listen, hands `$CLIENT_LINE` to SOCK
/// with `PROBE unix-run` ($CLIENT_KIND), waits for `$WAIT_FOR` in LOG or for `$WAIT_FILE`, stops
/// the server, prints LOG and exits with the client's code.
const SAME_SESSION: &str = r#"
P=$1; S=$2; L=$3; shift 3
"$P" "$@" > "$L" 2>&1 &
server=$!
n=0
until grep -q '^listening' "$L"; do
  n=$((n+1)); if [ $n -gt 200 ]; then echo "server did not start"; cat "$L"; kill $server; exit 9; fi
  sleep 0.05
done
"$P" unix-run "$S" "$CLIENT_LINE" $CLIENT_KIND
rc=$?
n=0
until grep -q "$WAIT_FOR" "$L" || [ -e "$WAIT_FILE" ]; do
  n=$((n+1)); [ $n -gt 60 ] && break
  sleep 0.05
done
kill $server
cat "$L"
exit $rc
"#;

#[test]
fn unix_ipc_inside_one_session_still_works() {
    let w = world("handoff-legit");
    let tmp = NobodyDir::in_tmp("legit");
    let project = NobodyDir::new(w.scratch.0.join("project"), 0o755);
    let logs = NobodyDir::new(w.scratch.0.join("legit-logs"), 0o755);
    let p = probe_path();
    let run = |n: usize, sock: &str, server: &[&str], line: &str, kind: &str, wait_file: &str| {
        let log = logs.path(&format!("server-{n}.log"));
        let wait_for = if wait_file.is_empty() {
            "^received "
        } else {
            "^never$"
        };
        let mut args = vec![
            "sh",
            "-c",
            SAME_SESSION,
            "sh",
            p.as_str(),
            sock,
            log.as_str(),
        ];
        args.extend_from_slice(server);
        // The client's line and kind travel in the environment (egressctl run passes it on).
        w.daemon
            .ctl(NOBODY)
            .env("CLIENT_LINE", line)
            .env("CLIENT_KIND", kind)
            .env("WAIT_FOR", wait_for)
            .env(
                "WAIT_FILE",
                if wait_file.is_empty() {
                    "/nonexistent"
                } else {
                    wait_file
                },
            )
            .arg("run")
            .arg("--")
            .args(&args)
            .output()
            .unwrap()
    };
    let abstract_name = format!("@egressd-handoff-legit-{}", std::process::id());
    let echo_at = [
        tmp.path("echo.sock"),
        project.path(".ipc/echo.sock"),
        abstract_name,
    ];
    fs::create_dir_all(project.0.join(".ipc")).unwrap();
    std::os::unix::fs::chown(project.0.join(".ipc"), Some(NOBODY), Some(NOBODY)).unwrap();
    for (n, sock) in echo_at.iter().enumerate() {
        let out = run(n, sock, &["echo-server", sock], "hello", "stream", "");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            probe_code(&out),
            0,
            "a client and an echo server in one session at {sock}: the connect failed:\n{}",
            text(&out)
        );
        assert!(
            stdout.contains("allowed pid=") && stdout.contains("received hello"),
            "the echo server in the session at {sock} did not get the client's line:\n{}",
            text(&out)
        );
    }
    // A runner in the session is the session's own business, for every socket type.
    for (n, kind) in ["seqpacket", "dgram"].into_iter().enumerate() {
        let sock = tmp.path(&format!("runner-{kind}.sock"));
        let done = logs.path(&format!("ran-{kind}"));
        let line = format!("{p} touch {done}");
        let out = run(10 + n, &sock, &["runner", &sock, kind], &line, kind, &done);
        assert_eq!(
            probe_code(&out),
            0,
            "a {kind} client and runner in one session: the hand-off failed:\n{}",
            text(&out)
        );
        assert!(
            Path::new(&done).exists(),
            "the {kind} runner in the session did not run the client's line:\n{}",
            text(&out)
        );
    }
}

#[test]
fn allow_listed_desktop_sockets_stay_reachable() {
    let w = world("handoff-wayland");
    let mut run_user = RunUser::new();
    let p = probe_path();
    for name in ["wayland-0", "pulse/native"] {
        let path = run_user.file(name);
        let mut server = Server::probe(&["echo-server", &path]);
        let out = w.daemon.run(NOBODY, &[&p, "unix-run", &path, "hello"]);
        assert_eq!(
            probe_code(&out),
            0,
            "{path} is on the default allow-list, but the sandbox could not connect to the server outside:\n{}",
            text(&out)
        );
        let got = server.finish();
        assert!(
            got.iter().any(|l| l == "received hello"),
            "the {name} server outside did not get the sandbox's line: {got:?}"
        );
    }
    // The control: the same server under a name not on the list is refused, so the allow-list
    // is what let the ones above through.
    let path = run_user.file("egressd-unlisted.sock");
    let server = Server::probe(&["echo-server", &path]);
    let out = w.daemon.run(NOBODY, &[&p, "unix-run", &path, "hello"]);
    assert_eq!(
        probe_code(&out),
        3,
        "{path} is not on the allow-list, but the sandbox reached the server outside:\n{}",
        text(&out)
    );
    assert_audited(&w, &out, &path, Some(server.pid()), CONNECT_HOOK);
}

#[test]
fn a_single_instance_app_starts_its_own_instance_inside() {
    let w = world("handoff-single");
    let mut run_user = RunUser::new();
    let path = run_user.file("app.sock");
    let mut instance = Server::probe(&["echo-server", &path]);
    let p = probe_path();

    let inside = w.daemon.run(NOBODY, &[&p, "single-instance", &path]);
    let said = String::from_utf8_lossy(&inside.stdout).into_owned();
    assert!(
        !said.contains("handed to running instance"),
        "the sandboxed app handed its request to the instance outside at {path}:\n{}",
        text(&inside)
    );
    assert!(
        said.contains("started own instance") && inside.status.success(),
        "the sandboxed app did not start its own instance:\n{}",
        text(&inside)
    );

    // The control: outside any sandbox, the app hands off to the running instance.
    let control = as_nobody(&[&p, "single-instance", &path]).output().unwrap();
    assert!(
        String::from_utf8_lossy(&control.stdout).contains("handed to running instance"),
        "control: {}",
        text(&control)
    );
    let pid = instance.pid();
    let got = instance.finish();
    assert_eq!(
        got,
        ["connection", "received open"],
        "the instance outside should have heard from the control only (one connection, one \
         request), not from the sandbox"
    );
    assert_audited(&w, &inside, &path, Some(pid), CONNECT_HOOK);
}

/// A stand-in for two services on the user's session bus: notifications (harmless, on the
/// filter's list) and a command runner (what the filter must hide). It logs every call to the
/// file named by its argument and prints `ready` once it owns both names.
const BUS_STAND_IN: &str = r#"
import dbus, dbus.service, dbus.mainloop.glib, sys, subprocess
from gi.repository import GLib
dbus.mainloop.glib.DBusGMainLoop(set_as_default=True)
bus = dbus.SessionBus()
log = open(sys.argv[1], "a", buffering=1)
class Notif(dbus.service.Object):
    @dbus.service.method("org.freedesktop.Notifications", in_signature="susssasa{sv}i", out_signature="u")
    def Notify(self, app, rid, icon, summary, body, actions, hints, timeout):
        log.write("notify %s\n" % summary); return 1
class Runner(dbus.service.Object):
    @dbus.service.method("org.egressd.Runner", in_signature="s", out_signature="")
    def Run(self, cmd):
        log.write("run %s\n" % cmd); subprocess.Popen(["sh", "-c", cmd])
n1 = dbus.service.BusName("org.freedesktop.Notifications", bus); Notif(bus, "/org/freedesktop/Notifications")
n2 = dbus.service.BusName("org.egressd.Runner", bus); Runner(bus, "/org/egressd/Runner")
print("ready", flush=True)
GLib.MainLoop().run()
"#;

/// `sh -c IN_SESSION sh CMD...`: prints the session's bus address and whether its socket is
/// there, then runs CMD.
const BUS_IN_SESSION: &str = r#"
echo "bus address: $DBUS_SESSION_BUS_ADDRESS"
sock=${DBUS_SESSION_BUS_ADDRESS#unix:path=}
[ -S "$sock" ] && echo "proxy socket present"
exec "$@"
"#;

/// The pids of the xdg-dbus-proxy processes serving `socket`.
fn bus_proxy_pids(socket: &str) -> Vec<i32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            args[0].ends_with(b"xdg-dbus-proxy") && args.contains(&socket.as_bytes())
        })
        .collect()
}

/// The proxy sockets of the test's sessions: on drop, a proxy the daemon left running (a failed
/// test) is killed by its pid and its socket removed.
#[derive(Default)]
struct BusProxies(Vec<String>);

impl Drop for BusProxies {
    fn drop(&mut self) {
        for socket in &self.0 {
            for pid in bus_proxy_pids(socket) {
                // SAFETY: kill(2) of a proxy the daemon started for this test's session.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            let _ = fs::remove_file(socket);
        }
    }
}

#[test]
fn the_session_bus_is_reached_only_through_its_filter() {
    let w = world("handoff-bus");
    let mut run_user = RunUser::new();
    let bus = run_user.file("bus");
    let real = format!("unix:path={bus}");
    let dir = NobodyDir::new(w.scratch.0.join("bus"), 0o755);
    let log = dir.path("services.log");
    let script = dir.path("services.py");
    fs::write(&script, BUS_STAND_IN).unwrap();
    let mut proxies = BusProxies::default();

    // The user's session bus, and the services on it, as nobody outside any sandbox.
    let mut daemon = nobody_cmd("dbus-daemon");
    daemon.args([
        "--session",
        "--nofork",
        &format!("--address={real}"),
        "--print-address",
    ]);
    let (dbus, address) = Server::spawn("dbus-daemon --session", daemon);
    assert!(address.contains(&bus), "dbus-daemon address: {address}");
    let mut services = nobody_cmd("/usr/bin/python3");
    services
        .args([&script, &log])
        .env("DBUS_SESSION_BUS_ADDRESS", &real);
    let (_services, ready) = Server::spawn("the stand-in session services", services);
    assert_eq!(ready, "ready", "the stand-in session services");
    let logged = || fs::read_to_string(&log).unwrap_or_default();

    let cmd = format!("{} attempt tcp {}", probe_path(), w.outside.tcp4());
    let run_call = |bus_flag: &str| -> Vec<String> {
        [
            "gdbus",
            "call",
            bus_flag,
            "--dest",
            "org.egressd.Runner",
            "--object-path",
            "/org/egressd/Runner",
            "--method",
            "org.egressd.Runner.Run",
            &format!("'{cmd}'"),
        ]
        .map(String::from)
        .to_vec()
    };
    // CMD in a session, through BUS_IN_SESSION: the session's id and the output, once the
    // session's bus address named its own proxy, whose socket was there during the session and
    // is gone (its proxy stopped) within 5 s after.
    let mut in_session = |args: &[String]| -> (String, Output) {
        let mut argv = vec!["sh", "-c", BUS_IN_SESSION, "sh"];
        argv.extend(args.iter().map(String::as_str));
        let out = w.daemon.run(NOBODY, &argv);
        let id = ran_in_session(&out);
        let socket = format!("/run/user/{NOBODY}/egressd-bus-{id}");
        proxies.0.push(socket.clone());
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            stdout
                .lines()
                .any(|l| l == format!("bus address: unix:path={socket}")),
            "session {id} was not given its own filtered bus (DBUS_SESSION_BUS_ADDRESS \
             unix:path={socket}):\n{}",
            text(&out)
        );
        assert!(
            stdout.contains("proxy socket present"),
            "session {id}: the proxy socket {socket} was not there during the session:\n{}",
            text(&out)
        );
        wait_until(
            &format!("the bus proxy of session {id} to stop after the session ended ({socket} gone, no xdg-dbus-proxy serving it)"),
            5,
            || !Path::new(&socket).exists() && bus_proxy_pids(&socket).is_empty(),
        );
        (id, out)
    };

    // Notifications go through the filter.
    let notify: Vec<String> = [
        "gdbus",
        "call",
        "--session",
        "--dest",
        "org.freedesktop.Notifications",
        "--object-path",
        "/org/freedesktop/Notifications",
        "--method",
        "org.freedesktop.Notifications.Notify",
        "app",
        "0",
        "i",
        "hello-from-the-session",
        "body",
        "[]",
        "{}",
        "1000",
    ]
    .map(String::from)
    .to_vec();
    let (_, out) = in_session(&notify);
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("(uint32 1,)"),
        "a notification from the session through its filtered bus failed:\n{}",
        text(&out)
    );
    assert!(
        logged().contains("notify hello-from-the-session"),
        "the notification service did not get the session's call; its log:\n{}",
        logged()
    );

    // The runner is hidden by the filter.
    let what = format!("a command-running service on the session bus at {bus}");
    let before = settled(&w);
    let (_, out) = in_session(&run_call("--session"));
    assert_nothing_reached(&w, before, &what, &out);
    assert!(
        !out.status.success()
            && String::from_utf8_lossy(&out.stderr)
                .contains("org.freedesktop.DBus.Error.ServiceUnknown"),
        "{what}: the session's filtered bus did not hide org.egressd.Runner (want ServiceUnknown):\n{}",
        text(&out)
    );

    // The real bus is a server outside the session: refused.
    let what = format!("the real session bus at {bus}, addressed directly");
    let before = settled(&w);
    let (_, direct) = in_session(&run_call(&format!("--address={real}")));
    assert_nothing_reached(&w, before, &what, &direct);
    assert!(
        !direct.status.success() && says_refused(&direct),
        "{what}: the session's connect to the bus was not refused:\n{}",
        text(&direct)
    );
    assert!(
        !logged().contains("run "),
        "the runner service ran something for the session; its log:\n{}",
        logged()
    );

    // The control: outside any sandbox, the runner on the bus reaches the outside host.
    let before = settled(&w);
    let args = run_call("--session");
    let control = as_nobody(&args.iter().map(String::as_str).collect::<Vec<_>>())
        .env("DBUS_SESSION_BUS_ADDRESS", &real)
        .output()
        .unwrap();
    assert!(
        control.status.success(),
        "control: Run on the bus outside any sandbox: {}",
        text(&control)
    );
    assert_reached(
        &w,
        before,
        "Run on the session bus's runner service",
        &control,
    );
    assert!(
        logged().contains(&format!("run {cmd}")),
        "control: the runner service's log does not show the run:\n{}",
        logged()
    );

    assert_audited(&w, &direct, &bus, Some(dbus.pid()), CONNECT_HOOK);
}

/// The strict profile (loopback port 11434 only) confines unix sockets the same way.
#[test]
fn the_strict_profile_refuses_a_runner_outside_too() {
    let w = world("handoff-strict");
    let dir = NobodyDir::in_tmp("strict");
    let path = dir.path("runner.sock");
    let p = probe_path();
    let runner = Server::probe(&["runner", &path, "stream"]);
    let cmd = format!("{p} attempt tcp {}", w.outside.tcp4());
    let what = format!("a command runner outside at {path}, under --profile strict");

    let before = settled(&w);
    let inside = w
        .daemon
        .ctl(NOBODY)
        .args([
            "run",
            "--profile",
            "strict",
            "--",
            &p,
            "unix-run",
            &path,
            &cmd,
        ])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&inside.stderr).contains("(profile strict)"),
        "the session did not run under strict:\n{}",
        text(&inside)
    );
    assert_nothing_reached(&w, before, &what, &inside);
    assert_eq!(
        probe_code(&inside),
        3,
        "{what}: the connect was not refused:\n{}",
        text(&inside)
    );
    assert_audited(&w, &inside, &path, Some(runner.pid()), CONNECT_HOOK);

    let before = settled(&w);
    let control = as_nobody(&[&p, "unix-run", &path, &cmd]).output().unwrap();
    assert_eq!(
        probe_code(&control),
        0,
        "control: {what}: {}",
        text(&control)
    );
    assert_reached(&w, before, &what, &control);
}

/// `unix = "open"` is the old behaviour, and says so: egressctl warns, the session_start record
/// names the missing layer, and a profile that requires the unix layer is refused instead.
#[test]
fn a_profile_without_the_unix_layer_says_so_and_require_refuses_it() {
    let w = world_with("handoff-open", |_| {
        Some("default_profile = \"open\"\n[profiles.open]\nunix = \"open\"\n[profiles.must]\nunix = \"open\"\nrequire = [\"unix\"]\n".into())
    });
    let dir = NobodyDir::in_tmp("open");
    let path = dir.path("runner.sock");
    let p = probe_path();
    let _runner = Server::probe(&["runner", &path, "stream"]);
    let cmd = format!("{p} attempt tcp {}", w.outside.tcp4());

    let before = settled(&w);
    let open = w
        .daemon
        .ctl(NOBODY)
        .args([
            "run",
            "--profile",
            "open",
            "--",
            &p,
            "unix-run",
            &path,
            &cmd,
        ])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&open.stderr).contains("are NOT confined"),
        "no warning for a session without the unix layer:\n{}",
        text(&open)
    );
    // Open means open: the runner outside is reached (this is the way the layer closes).
    assert_eq!(probe_code(&open), 0, "{}", text(&open));
    assert_reached(&w, before, "a runner under unix = \"open\"", &open);
    let id = session_id(&open);
    let records = audit_records(&w.daemon);
    let start = records
        .iter()
        .find(|r| r["type"] == "session_start" && r["session"] == id.as_str())
        .expect("a session_start record");
    assert!(
        start["message"]
            .as_str()
            .is_some_and(|m| m.contains("unix layer not in force")),
        "the session_start record does not say the unix layer is missing: {start}"
    );
    assert!(!start["layers"]
        .as_array()
        .unwrap()
        .iter()
        .any(|l| l == "unix"));

    let must = w
        .daemon
        .ctl(NOBODY)
        .args(["run", "--profile", "must", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(must.status.code(), Some(125), "{}", text(&must));
    assert!(
        String::from_utf8_lossy(&must.stderr).contains("requires the \"unix\" enforcement layer"),
        "{}",
        text(&must)
    );
}
