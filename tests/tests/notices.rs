//! Notices of what was blocked, while the tool runs: to a desktop notification server on the
//! user's session bus (a private dbus-daemon and a stand-in server, as the user), and on the
//! terminal egressctl runs on (a pty). Each destination or name once; `--quiet` turns them off.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    process::{Child, Stdio},
    thread,
    time::Duration,
};

use egressd_tests::*;

/// A session bus of the user's own (dbus-daemon) with a stand-in org.freedesktop.Notifications
/// that appends each notice's body to a file; both as NOBODY, killed when dropped.
struct Desktop {
    bus: String,
    received: std::path::PathBuf,
    children: Vec<Child>,
}

const SERVER: &str = r#"
import sys, dbus, dbus.service
from dbus.mainloop.glib import DBusGMainLoop
from gi.repository import GLib
DBusGMainLoop(set_as_default=True)
bus = dbus.bus.BusConnection(sys.argv[1])
name = dbus.service.BusName("org.freedesktop.Notifications", bus)
class Server(dbus.service.Object):
    @dbus.service.method("org.freedesktop.Notifications", in_signature="susssasa{sv}i", out_signature="u")
    def Notify(self, app, replaces, icon, summary, body, actions, hints, timeout):
        with open(sys.argv[2], "a") as f:
            f.write(app + "|" + summary + "|" + body + "\n")
        return 1
Server(bus, "/org/freedesktop/Notifications")
open(sys.argv[2] + ".ready", "w").close()
GLib.MainLoop().run()
"#;

impl Desktop {
    fn start(dir: &std::path::Path) -> Desktop {
        let path = dir.join("bus");
        let bus = format!("unix:path={}", path.display());
        let received = dir.join("notices.txt");
        // Built first, so that its drop kills what started even when a wait below fails.
        let mut desktop = Desktop {
            bus: bus.clone(),
            received: received.clone(),
            children: Vec::new(),
        };
        desktop.children.push(
            as_nobody(&[
                "dbus-daemon",
                "--session",
                "--nofork",
                &format!("--address={bus}"),
            ])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
        );
        wait_until("the session bus", 10, || path.exists());
        fs::write(dir.join("server.py"), SERVER).unwrap();
        desktop.children.push(
            // The system's python3 (with python3-dbus), not one a PATH for root would find.
            as_nobody(&[
                "/usr/bin/python3",
                &dir.join("server.py").display().to_string(),
                &bus,
                &received.display().to_string(),
            ])
            .spawn()
            .unwrap(),
        );
        let ready = dir.join("notices.txt.ready");
        wait_until("the notification server", 10, || ready.exists());
        desktop
    }

    fn notices(&self) -> Vec<String> {
        fs::read_to_string(&self.received)
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect()
    }
}

impl Drop for Desktop {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn shared_dir(w: &World, name: &str) -> std::path::PathBuf {
    let dir = w.scratch.0.join(name);
    fs::create_dir_all(&dir).unwrap();
    std::os::unix::fs::chown(&dir, Some(NOBODY), Some(NOBODY)).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// Two denied connects to the same destination and one denied DNS name.
fn script(w: &World) -> String {
    let p = probe().display().to_string();
    let target = w.outside.tcp4();
    format!(
        "{p} attempt tcp {target}; {p} attempt tcp {target}; \
         {p} dns-query udp 127.0.0.153:53 secret.example.test A; sleep 0.5"
    )
}

#[test]
fn a_desktop_notice_for_a_denied_connect_and_a_denied_name_each_once() {
    let w = world("notices-desktop");
    let dir = shared_dir(&w, "desktop");
    let desktop = Desktop::start(&dir);
    let out = w
        .daemon
        .ctl(NOBODY)
        .env("DBUS_SESSION_BUS_ADDRESS", &desktop.bus)
        .args(["run", "--", "sh", "-c", &script(&w)])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let target = w.outside.tcp4();
    let connect = format!("egressd: blocked egressd-probe -> {target} (default deny)");
    let name = "egressd: blocked egressd-probe -> DNS name secret.example.test";
    wait_until("both notices", 5, || {
        let n = desktop.notices();
        n.iter().any(|l| l.contains(&connect)) && n.iter().any(|l| l.contains(name))
    });
    thread::sleep(Duration::from_millis(500));
    let notices = desktop.notices();
    assert_eq!(
        notices.iter().filter(|l| l.contains(&connect)).count(),
        1,
        "one notice for two connects to one destination: {notices:?}"
    );
    assert!(
        notices[0].starts_with("egressd|egressd: connection blocked|"),
        "{notices:?}"
    );
    // Delivered on the desktop, so not also on the terminal.
    assert!(!String::from_utf8_lossy(&out.stderr).contains("egressd: blocked"));
    assert_eq!(w.outside.counts(), Counts::default());

    // A bus that is not the user's own socket is refused: no notice through it.
    let refused = w
        .daemon
        .ctl(NOBODY)
        .env(
            "DBUS_SESSION_BUS_ADDRESS",
            format!("tcp:host={},port=53", w.outside.v4),
        )
        .args(["run", "--", "true"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("only a unix:path= address"),
        "{}",
        text(&refused)
    );
}

/// egressctl on a pty (`script`), as a user runs it in a terminal; `sandboxed` is what the session
/// runs (a shell command).
fn on_a_pty(w: &World, quiet: bool, sandboxed: &str) -> String {
    let cmd = format!(
        "{} --socket {} run {}-- sh -c '{}'",
        bin("egressctl").display(),
        w.daemon.socket.display(),
        if quiet { "--quiet " } else { "" },
        sandboxed
    );
    let out = as_nobody(&["script", "-qfec", &cmd, "/dev/null"])
        .env_remove("DBUS_SESSION_BUS_ADDRESS")
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn on_the_terminal_each_destination_once_and_quiet_turns_it_off() {
    let w = world("notices-tty");
    let target = w.outside.tcp4();
    let connect = format!("egressd: blocked egressd-probe -> {target} (default deny)");
    let pty = on_a_pty(&w, false, &script(&w));
    assert_eq!(pty.matches(&connect).count(), 1, "{pty}");
    assert!(
        pty.contains("\r\negressd: blocked egressd-probe -> DNS name secret.example.test"),
        "{pty}"
    );
    // The control: the same session with --quiet says nothing while it runs.
    let quiet = on_a_pty(&w, true, &script(&w));
    assert!(quiet.contains("egressd: session "), "{quiet}");
    assert!(!quiet.contains("egressd: blocked"), "{quiet}");
    assert_eq!(w.outside.counts(), Counts::default());
}

#[test]
fn a_full_screen_program_keeps_its_screen_the_notice_goes_to_the_title() {
    let w = world("notices-raw");
    let target = w.outside.tcp4();
    // As a full-screen program does: the terminal in raw mode while it runs.
    let raw = format!("stty raw -echo; {}; stty sane", script(&w));
    let pty = on_a_pty(&w, false, &raw);
    let title = format!("\x1b]2;egressd: blocked egressd-probe -> {target} (default deny)\x07");
    assert_eq!(pty.matches(&title).count(), 1, "{pty:?}");
    assert!(
        !pty.contains(&format!("\negressd: blocked egressd-probe -> {target}")),
        "no line written into the program's screen: {pty:?}"
    );
    assert_eq!(w.outside.counts(), Counts::default());
}
