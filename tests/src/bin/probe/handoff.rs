//! Hand-off: same-user services outside a sandbox that act for whoever connects to their unix
//! socket (a command runner, as a tmux server, systemd --user or a container engine is for its
//! caller; a service that passes out connected sockets over SCM_RIGHTS), the clients that try them
//! from inside, and the local IPC that must keep working (an echo server, a single-instance app).
//!
//! PATH is a filesystem path, or `@name` for an abstract socket. Servers print `listening` once
//! they can be reached, and exit by themselves after two minutes if nobody kills them.

use std::{
    fs,
    io::{self, IoSlice, IoSliceMut, Write as _},
    net::{SocketAddr, TcpStream},
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
    process::{exit, Command, Stdio},
    thread,
    time::Duration,
};

use nix::{
    errno::Errno,
    sys::{
        socket::{
            self as sock, sockopt, AddressFamily, Backlog, ControlMessage, ControlMessageOwned,
            MsgFlags, SockFlag, SockType, UnixAddr,
        },
        time::TimeVal,
    },
};

use super::{report, PAYLOAD};

const LIFETIME: Duration = Duration::from_secs(120);

fn addr(path: &str) -> UnixAddr {
    match path.strip_prefix('@') {
        Some(name) => UnixAddr::new_abstract(name.as_bytes()).expect("abstract name"),
        None => UnixAddr::new(path).expect("socket path"),
    }
}

fn sock_type(kind: &str) -> SockType {
    match kind {
        "stream" => SockType::Stream,
        "seqpacket" => SockType::SeqPacket,
        "dgram" | "dgram-sendto" => SockType::Datagram,
        other => {
            eprintln!("unknown socket type {other} (stream, seqpacket, dgram, dgram-sendto)");
            exit(2)
        }
    }
}

fn unix_socket(ty: SockType) -> io::Result<OwnedFd> {
    Ok(sock::socket(
        AddressFamily::Unix,
        ty,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?)
}

fn bind(path: &str, ty: SockType) -> io::Result<OwnedFd> {
    let fd = unix_socket(ty)?;
    sock::bind(fd.as_raw_fd(), &addr(path))?;
    if ty != SockType::Datagram {
        sock::listen(&fd, Backlog::new(16).unwrap())?;
    }
    Ok(fd)
}

/// Binds PATH (replacing a stale socket file of ours), says so and arms the lifetime limit.
fn serve(path: &str, ty: SockType) -> OwnedFd {
    if !path.starts_with('@') {
        let _ = fs::remove_file(path);
    }
    let fd = bind(path, ty).unwrap_or_else(|e| {
        eprintln!("bind {path}: {e}");
        exit(4)
    });
    println!("listening");
    io::stdout().flush().unwrap();
    thread::spawn(|| {
        thread::sleep(LIFETIME);
        exit(0)
    });
    fd
}

fn accept(l: &OwnedFd) -> io::Result<OwnedFd> {
    let fd = sock::accept(l.as_raw_fd())?;
    // SAFETY: accept returned a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// One line from a connection, without the newline; None if the peer closed before sending a
/// whole line (a connection that never asked for anything).
fn read_line(fd: &OwnedFd) -> io::Result<Option<String>> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.contains(&b'\n') {
        let n = sock::recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty())?;
        if n == 0 || got.len() > 65536 {
            return Ok(None);
        }
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    Ok(Some(text.lines().next().unwrap_or("").to_string()))
}

fn send_all(fd: &OwnedFd, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        let n = sock::send(fd.as_raw_fd(), data, MsgFlags::MSG_NOSIGNAL)?;
        data = &data[n..];
    }
    Ok(())
}

/// Runs LINE with `sh -c`, not waiting for it (a reaper thread does, and says how it ended). Its
/// output goes to the runner's stderr, never to the stdout the caller reads `listening` from.
fn run_line(line: &str) {
    if line.is_empty() {
        return;
    }
    eprintln!("runner: running {line}");
    let to_stderr = || {
        io::stderr()
            .as_fd()
            .try_clone_to_owned()
            .map(Stdio::from)
            .unwrap_or_else(|_| Stdio::null())
    };
    match Command::new("sh")
        .args(["-c", line])
        .stdin(Stdio::null())
        .stdout(to_stderr())
        .stderr(to_stderr())
        .spawn()
    {
        Ok(mut child) => {
            let line = line.to_string();
            thread::spawn(move || {
                if let Ok(status) = child.wait() {
                    eprintln!("runner: {line}: {status}");
                }
            });
        }
        Err(e) => eprintln!("runner: sh: {e}"),
    }
}

/// `runner PATH [stream|seqpacket|dgram]`: runs one line per connection (or datagram).
pub fn runner(path: &str, kind: &str) {
    let ty = sock_type(kind);
    let l = serve(path, ty);
    if ty == SockType::Datagram {
        let mut buf = [0u8; 65536];
        loop {
            match sock::recv(l.as_raw_fd(), &mut buf, MsgFlags::empty()) {
                Ok(n) => {
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    run_line(text.lines().next().unwrap_or(""));
                }
                Err(e) => eprintln!("runner: recv: {e}"),
            }
        }
    }
    loop {
        match accept(&l) {
            Ok(c) => {
                thread::spawn(move || match read_line(&c) {
                    Ok(Some(line)) => run_line(&line),
                    Ok(None) => eprintln!("runner: a connection closed without a command"),
                    Err(e) => eprintln!("runner: read: {e}"),
                });
            }
            Err(e) => eprintln!("runner: accept: {e}"),
        }
    }
}

/// `unix-run PATH CMD [stream|seqpacket|dgram|dgram-sendto]`: hands CMD to a runner.
pub fn unix_run(path: &str, cmd: &str, kind: &str) -> i32 {
    let ty = sock_type(kind);
    let line = format!("{cmd}\n");
    report((|| -> io::Result<()> {
        let fd = unix_socket(ty)?;
        if kind == "dgram-sendto" {
            sock::sendto(
                fd.as_raw_fd(),
                line.as_bytes(),
                &addr(path),
                MsgFlags::empty(),
            )?;
        } else {
            sock::connect(fd.as_raw_fd(), &addr(path))?;
            send_all(&fd, line.as_bytes())?;
        }
        Ok(())
    })())
}

fn send_fd(conn: &OwnedFd, fd: RawFd) -> io::Result<()> {
    let fds = [fd];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    sock::sendmsg::<()>(
        conn.as_raw_fd(),
        &[IoSlice::new(b"fd")],
        &cmsg,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )?;
    Ok(())
}

/// One descriptor over SCM_RIGHTS from `fd` (waits up to 3 s).
fn recv_fd(fd: BorrowedFd) -> io::Result<OwnedFd> {
    sock::setsockopt(&fd, sockopt::ReceiveTimeout, &TimeVal::new(3, 0))?;
    let mut buf = [0u8; 64];
    let mut iov = [IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!([RawFd; 4]);
    let msg = sock::recvmsg::<()>(
        fd.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut got = None;
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            for f in fds {
                // SAFETY: the kernel installed these descriptors for us.
                let owned = unsafe { OwnedFd::from_raw_fd(f) };
                got.get_or_insert(owned);
            }
        }
    }
    got.ok_or_else(|| io::Error::other("a message without a descriptor"))
}

/// `fd-passer PATH HOSTPORT`: for every connection that asks (one line), connects to HOSTPORT and
/// passes the connected TCP socket to the client. A connection that never asks gets nothing, so
/// the outside host sees a connection only when a client really requested one.
pub fn fd_passer(path: &str, hostport: &str) {
    let target: SocketAddr = hostport.parse().expect("HOSTPORT must be IP:port");
    let l = serve(path, SockType::Stream);
    loop {
        let c = match accept(&l) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("fd-passer: accept: {e}");
                continue;
            }
        };
        thread::spawn(move || {
            match read_line(&c) {
                Ok(Some(_)) => {}
                Ok(None) => {
                    eprintln!("fd-passer: a connection closed without asking");
                    return;
                }
                Err(e) => {
                    eprintln!("fd-passer: read: {e}");
                    return;
                }
            }
            match TcpStream::connect_timeout(&target, Duration::from_secs(2)) {
                Ok(tcp) => {
                    if let Err(e) = send_fd(&c, tcp.as_raw_fd()) {
                        eprintln!("fd-passer: sendmsg: {e}");
                    }
                }
                Err(e) => eprintln!("fd-passer: connect {target}: {e}"),
            }
        });
    }
}

/// `fd-take PATH`: asks an fd-passer for a socket and writes the payload on it.
pub fn fd_take(path: &str) -> i32 {
    report((|| -> io::Result<()> {
        let fd = unix_socket(SockType::Stream)?;
        sock::connect(fd.as_raw_fd(), &addr(path))?;
        send_all(&fd, b"fd\n")?;
        let got = recv_fd(fd.as_fd())?;
        fs::File::from(got).write_all(PAYLOAD)
    })())
}

/// `fd-take-stdin [LINE]`: fd 0 is a unix socket connected outside the sandbox (inherited). Writes
/// LINE (default `fd`, an fd-passer's request; a command line for a runner) to it, then tries to
/// receive a descriptor over it and write the payload into that. Exit 0 if anything got through
/// (the line was written, or the payload went out on a received socket), 1 if nothing did.
pub fn fd_take_stdin(line: &str) -> i32 {
    // SAFETY: fd 0 is open for the life of the process; we only borrow it.
    let stdin = unsafe { BorrowedFd::borrow_raw(0) };
    let mut through = false;
    let data = format!("{line}\n");
    match nix::unistd::write(stdin, data.as_bytes()) {
        Ok(n) => {
            println!("wrote {n} bytes into fd 0");
            through = true;
        }
        Err(e) => println!("write to fd 0: {e}"),
    }
    match recv_fd(stdin) {
        Ok(fd) => match fs::File::from(fd).write_all(PAYLOAD) {
            Ok(()) => {
                println!("sent the payload on a descriptor received over fd 0");
                through = true;
            }
            Err(e) => println!("received a descriptor over fd 0, write failed: {e}"),
        },
        Err(e) => println!("no descriptor over fd 0: {e}"),
    }
    if through {
        println!("through pid={}", std::process::id());
        0
    } else {
        println!("nothing through pid={}", std::process::id());
        1
    }
}

/// `echo-server PATH`: prints `connection` for every client and `received LINE` for every line,
/// and sends each line back.
pub fn echo_server(path: &str) {
    let l = serve(path, SockType::Stream);
    loop {
        let c = match accept(&l) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("echo-server: accept: {e}");
                continue;
            }
        };
        println!("connection");
        thread::spawn(move || {
            let mut pending = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                let n = match sock::recv(c.as_raw_fd(), &mut buf, MsgFlags::empty()) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                pending.extend_from_slice(&buf[..n]);
                while let Some(i) = pending.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=i).collect();
                    println!("received {}", String::from_utf8_lossy(&line).trim_end());
                    if send_all(&c, &line).is_err() {
                        return;
                    }
                }
            }
        });
    }
}

/// `single-instance PATH`: as VS Code's single-instance IPC. If an instance answers at PATH the
/// request is handed to it; otherwise this one starts its own (listening for a second, at PATH or,
/// when PATH is someone else's socket, next to it) and exits 0 either way.
pub fn single_instance(path: &str) -> i32 {
    let connected = unix_socket(SockType::Stream).and_then(|fd| {
        sock::connect(fd.as_raw_fd(), &addr(path))
            .map(|()| fd)
            .map_err(Into::into)
    });
    match connected {
        Ok(fd) => match send_all(&fd, b"open\n") {
            Ok(()) => {
                println!("handed to running instance");
                0
            }
            Err(e) => {
                println!("connected, but the hand-off failed: {e}");
                4
            }
        },
        Err(e) => {
            println!("started own instance (connect {path}: {e})");
            let own = match bind(path, SockType::Stream) {
                Err(e) if e.raw_os_error() == Some(Errno::EADDRINUSE as i32) => {
                    // Never remove another instance's socket: listen beside it.
                    let beside = format!("{path}.{}", std::process::id());
                    bind(&beside, SockType::Stream).map(|fd| (fd, beside))
                }
                r => r.map(|fd| (fd, path.to_string())),
            };
            match own {
                Ok((_fd, at)) => {
                    println!("listening at {at}");
                    io::stdout().flush().unwrap();
                    thread::sleep(Duration::from_secs(1));
                    if !at.starts_with('@') {
                        let _ = fs::remove_file(&at);
                    }
                }
                Err(e) => println!("could not listen: {e}"),
            }
            0
        }
    }
}
