//! `egressctl top` as a person uses it: in a real terminal (tmux), as the unprivileged user whose
//! session it is. A session's row and its denial appear while the tool runs; another user sees
//! neither; `q` quits; without a terminal it prints a plain table.

use std::{
    fs,
    io::{BufRead as _, BufReader},
    os::unix::fs::PermissionsExt as _,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use egressd_tests::*;

/// Another unprivileged user, to show that `top` shows a user only their own sessions.
const OTHER: u32 = 65533;

/// A tmux server of its own (root's, with the client command run as a given user), killed when
/// dropped.
struct Pane {
    sock: String,
}

impl Pane {
    fn start(sock: &str, uid: u32, cmd: &str) -> Pane {
        let out = Command::new("tmux")
            .args([
                "-f",
                "/dev/null",
                "-S",
                sock,
                "new-session",
                "-d",
                "-x",
                "200",
                "-y",
                "50",
            ])
            .arg(format!(
                "setpriv --reuid={uid} --regid={uid} --clear-groups -- {cmd}; sleep 30"
            ))
            .env("TERM", "xterm-256color")
            .output()
            .unwrap();
        assert!(out.status.success(), "tmux new-session: {}", text(&out));
        Pane {
            sock: sock.to_string(),
        }
    }

    fn text(&self) -> String {
        let out = Command::new("tmux")
            .args(["-S", &self.sock, "capture-pane", "-p"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn keys(&self, keys: &str) {
        let out = Command::new("tmux")
            .args(["-S", &self.sock, "send-keys", keys])
            .output()
            .unwrap();
        assert!(out.status.success(), "send-keys: {}", text(&out));
    }

    /// Waits up to `secs` for `needle` on screen; how long it took.
    fn wait_for(&self, needle: &str, secs: f64) -> Result<Duration, String> {
        let start = Instant::now();
        loop {
            let screen = self.text();
            if screen.contains(needle) {
                return Ok(start.elapsed());
            }
            if start.elapsed().as_secs_f64() > secs {
                return Err(screen);
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Pane {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-S", &self.sock, "kill-server"])
            .output();
    }
}

#[test]
fn top_shows_a_session_and_its_denial_as_it_happens_to_its_user_only() {
    let w = world("top");
    let dir = w.scratch.0.join("top");
    fs::create_dir_all(&dir).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
    let go = dir.join("go");
    let target = w.outside.tcp4();
    // The session makes one denied connect when told, then stays (its row stays on screen).
    let script = format!(
        "{} wait-attempt {} tcp {target}; sleep 20",
        probe().display(),
        go.display()
    );
    let mut session = w
        .daemon
        .ctl(NOBODY)
        .args(["run", "--", "sh", "-c", &script])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(session.stderr.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    let id = first
        .strip_prefix("egressd: session ")
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no session line: {first}"))
        .to_string();
    let ctl = bin("egressctl");
    let top = format!(
        "{} --socket {} top --interval 100",
        ctl.display(),
        w.daemon.socket.display()
    );
    let mine = Pane::start(&dir.join("tmux-mine").display().to_string(), NOBODY, &top);
    let other = Pane::start(&dir.join("tmux-other").display().to_string(), OTHER, &top);
    mine.wait_for(&id, 5.0)
        .unwrap_or_else(|s| panic!("the session's row never appeared:\n{s}"));
    assert!(mine.text().contains("sh -c"), "{}", mine.text());

    fs::write(&go, b"go").unwrap();
    let done = dir.join("go.done");
    wait_until("the denied connect", 10, || done.exists());
    let denial = format!("-> {target} (connect4, default deny)");
    let took = mine
        .wait_for(&denial, 1.0)
        .unwrap_or_else(|s| panic!("no denial on screen within a second of the connect:\n{s}"));
    eprintln!("top: denial on screen {took:?} after the connect returned");
    let row = mine
        .text()
        .lines()
        .find(|l| l.contains(&id) && l.contains("sh -c"))
        .map(String::from)
        .unwrap();
    assert!(
        row.split_whitespace().any(|w| w == "1"),
        "the row counts the denial: {row}"
    );
    // The same connect really was refused: the outside host got nothing.
    assert_eq!(w.outside.counts(), Counts::default());

    // Another user's top shows neither the session nor its denial (its own top works: it runs).
    let theirs = other.text();
    assert!(theirs.contains("egressd top: 0 session(s)"), "{theirs}");
    assert!(
        !theirs.contains(&id) && !theirs.contains(&denial),
        "{theirs}"
    );

    // Without a terminal: a plain table, here as root (who sees every session).
    let plain = w
        .daemon
        .ctl(0)
        .args(["top", "--rounds", "1"])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&plain.stdout);
    assert!(plain.status.success(), "{}", text(&plain));
    assert!(
        table.starts_with("SESSION") && table.contains(&id),
        "{table}"
    );
    assert!(
        table.contains("denied: ") && table.contains(&denial),
        "{table}"
    );

    // q quits: the pane's shell goes on to its `sleep`, and the screen is given back.
    mine.keys("q");
    let gone = (0..100).any(|_| {
        thread::sleep(Duration::from_millis(20));
        !mine.text().contains("egressd top:")
    });
    assert!(gone, "q did not quit:\n{}", mine.text());

    let _ = session.kill();
    let _ = session.wait();
}
