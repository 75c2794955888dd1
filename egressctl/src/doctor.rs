//! `egressctl doctor`: checks the kernel for everything egressd needs, by asking the kernel itself
//! (a trivial program of each type is loaded and dropped), and says what to do about what is missing.

use std::{fs, path::Path, process::ExitCode};

use egressd_common::protocol::{Op, Reply};

use crate::client::Client;

#[derive(PartialEq)]
enum Level {
    Ok,
    Info,
    Warn,
    Fail,
}

struct Report {
    failed: bool,
}

impl Report {
    fn line(&mut self, level: Level, what: &str, detail: impl AsRef<str>) {
        let tag = match level {
            Level::Ok => "ok  ",
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Fail => "FAIL",
        };
        if level == Level::Fail {
            self.failed = true;
        }
        println!("[{tag}] {what:<22} {}", detail.as_ref());
    }
}

pub fn doctor(socket: &Path) -> ExitCode {
    let mut r = Report { failed: false };
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    r.line(Level::Info, "kernel", release.trim());

    match egressd_common::host::cgroup2_mount() {
        Some(m) => {
            r.line(Level::Ok, "cgroup v2", format!("mounted at {}", m.display()));
            match egressd_common::host::favordynmods(&m) {
                Some(true) => r.line(
                    Level::Info,
                    "session start",
                    "cgroup2 favordynmods is on: task moves between cgroups are cheaper, forks and exits dearer; egressd does not need it (on 6.18, `egressctl run` measured slower with it: see the README's Performance section)",
                ),
                Some(false) => r.line(
                    Level::Ok,
                    "session start",
                    "cgroup2 favordynmods is off (the default): nothing to change; egressd's launch figures are measured this way (see the README's Performance section)",
                ),
                None => {}
            }
        }
        None => r.line(
            Level::Fail,
            "cgroup v2",
            "not mounted; mount it (`mount -t cgroup2 none /sys/fs/cgroup`) or boot with systemd.unified_cgroup_hierarchy=1",
        ),
    }

    if Path::new("/sys/kernel/btf/vmlinux").exists() {
        r.line(Level::Ok, "BTF", "/sys/kernel/btf/vmlinux");
    } else {
        r.line(Level::Warn, "BTF", "no /sys/kernel/btf/vmlinux (CONFIG_DEBUG_INFO_BTF); egressd's programs do not need it today");
    }

    if nix::unistd::geteuid().is_root() {
        for (prog_type, attach_type, name) in PROBES {
            match probe_load(prog_type, attach_type) {
                Ok(()) => r.line(Level::Ok, name, "program loads"),
                Err(e) => r.line(
                    Level::Fail,
                    name,
                    format!("cannot load a program ({e}); the kernel needs CONFIG_BPF_SYSCALL and CONFIG_CGROUP_BPF"),
                ),
            }
        }
        // The unix layer's backstop: optional, like BPF LSM, but without it the unix layer is off.
        match probe_load(BPF_PROG_TYPE_CGROUP_SOCK_ADDR, 49) {
            Ok(()) => r.line(
                Level::Ok,
                "cgroup/connect_unix",
                "program loads (unix layer: a session reaches only its own unix servers and the sockets its profile allows)",
            ),
            Err(e) => r.line(
                Level::Warn,
                "cgroup/connect_unix",
                format!("cannot load a program ({e}): the unix layer is off, and a session can ask a process outside it (tmux, systemd --user, the session bus, docker) to act for it; cgroup unix hooks need Linux 6.7+"),
            ),
        }
    } else {
        r.line(
            Level::Info,
            "attach types",
            "skipped: loading test programs needs root (run `sudo egressctl doctor`)",
        );
    }
    match egressd_common::layers::landlock_abi() {
        Some(v) if v >= 9 => r.line(
            Level::Info,
            "landlock unix",
            format!("ABI {v}: the kernel can scope pathname unix sockets itself (LANDLOCK_ACCESS_FS_RESOLVE_UNIX); egressd uses its supervisor on every kernel today"),
        ),
        _ => {}
    }

    let bpffs = fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(2) == Some("bpf"));
    if bpffs {
        r.line(
            Level::Ok,
            "bpffs",
            "mounted (programs stay pinned if egressd stops)",
        );
    } else {
        r.line(
            Level::Info,
            "bpffs",
            "not mounted; egressd mounts it at /sys/fs/bpf when it starts",
        );
    }

    match fs::read_to_string("/sys/kernel/security/lsm") {
        Err(e) => r.line(
            Level::Info,
            "BPF LSM",
            format!("unknown: cannot read /sys/kernel/security/lsm ({e}); is securityfs mounted?"),
        ),
        Ok(lsm) if lsm.split(',').any(|m| m.trim() == "bpf") => r.line(
            Level::Ok,
            "BPF LSM",
            format!(
                "listed ({}); whether the kernel lets egressd load LSM programs shows in its layers below",
                lsm.trim()
            ),
        ),
        Ok(_) => r.line(
            Level::Info,
            "BPF LSM",
            "not active: the LSM layer is off, the cgroup and seccomp layers enforce (add `lsm=...,bpf` to the kernel command line to add it)",
        ),
    }

    match egressd_common::layers::landlock_abi() {
        Some(v) if v >= egressd_common::layers::LANDLOCK_MIN_ABI => r.line(
            Level::Ok,
            "Landlock",
            format!("ABI {v}: sessions are confined to their own domain (ptrace, /proc/PID/mem, signals, abstract unix sockets)"),
        ),
        Some(v) => r.line(
            Level::Info,
            "Landlock",
            format!("ABI {v} (6 needed, kernel 6.12+): the landlock layer is off; seccomp refuses ptrace instead, /proc/PID/mem and abstract unix sockets stay open"),
        ),
        None => r.line(
            Level::Info,
            "Landlock",
            "off (boot with lsm=...,landlock): the landlock layer is off; seccomp refuses ptrace instead",
        ),
    }

    match Client::connect(socket).and_then(|mut c| c.call(Op::Status)) {
        Ok(Reply::Status(s)) => {
            r.line(
                Level::Ok,
                "egressd",
                format!("running (pid {}), {} hooks attached", s.pid, s.hooks.len()),
            );
            let unix = s.layers.iter().any(|l| l == "unix");
            r.line(
                if unix { Level::Ok } else { Level::Warn },
                "unix layer",
                if unix {
                    "in force: a session's unix sockets reach only servers inside it and its profile's unix_allow (supervisor + cgroup/connect_unix)".to_string()
                } else {
                    format!(
                        "NOT in force ({}): sessions can reach unix sockets outside them; profiles with require = [\"unix\"] refuse to start",
                        s.unix_missing.as_deref().unwrap_or("egressd's log says why")
                    )
                },
            );
            if let Some(h) = &s.audit {
                let bad = h.failing_since.is_some() || crate::health::low(h);
                r.line(
                    if bad { Level::Warn } else { Level::Ok },
                    "audit log",
                    crate::health::lines(h, &s.audit_path).join("; "),
                );
                r.line(
                    if h.sealing.is_some() {
                        Level::Ok
                    } else {
                        Level::Info
                    },
                    "sealing",
                    crate::health::sealing(h),
                );
            }
            let lsm = s.layers.iter().any(|l| l == "lsm");
            r.line(
                if lsm { Level::Ok } else { Level::Info },
                "layers",
                format!(
                    "{} (and seccomp in every session){}",
                    s.layers.join(", "),
                    if lsm {
                        ""
                    } else {
                        "; BPF LSM programs are not loaded (egressd's log says why), so socket families are filtered by seccomp and refusals are not itemised in the audit log"
                    }
                ),
            )
        }
        Ok(_) => r.line(Level::Warn, "egressd", "answered oddly"),
        Err(e) => r.line(Level::Warn, "egressd", format!("{e:#}")),
    }

    if r.failed {
        println!(
            "\nSome checks failed: egressd cannot enforce on this kernel until they are fixed."
        );
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

const BPF_PROG_TYPE_CGROUP_SKB: u32 = 8;
const BPF_PROG_TYPE_CGROUP_SOCK: u32 = 9;
const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;

const PROBES: [(u32, u32, &str); 6] = [
    (BPF_PROG_TYPE_CGROUP_SKB, 1, "cgroup_skb/egress"),
    (BPF_PROG_TYPE_CGROUP_SOCK, 2, "cgroup/sock_create"),
    (BPF_PROG_TYPE_CGROUP_SOCK_ADDR, 10, "cgroup/connect4"),
    (BPF_PROG_TYPE_CGROUP_SOCK_ADDR, 11, "cgroup/connect6"),
    (BPF_PROG_TYPE_CGROUP_SOCK_ADDR, 14, "cgroup/sendmsg4"),
    (BPF_PROG_TYPE_CGROUP_SOCK_ADDR, 15, "cgroup/sendmsg6"),
];

/// The prefix of `union bpf_attr` used by BPF_PROG_LOAD, up to `expected_attach_type`.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// Loads `r0 = 1; exit` as the given program type and drops it.
fn probe_load(prog_type: u32, expected_attach_type: u32) -> std::io::Result<()> {
    const BPF_PROG_LOAD: libc::c_long = 5;
    let insns: [u64; 2] = [
        // mov64 r0, 1
        u64::from_le_bytes([0xb7, 0x00, 0, 0, 1, 0, 0, 0]),
        // exit
        u64::from_le_bytes([0x95, 0x00, 0, 0, 0, 0, 0, 0]),
    ];
    let license = b"GPL\0";
    let attr = ProgLoadAttr {
        prog_type,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        expected_attach_type,
        ..Default::default()
    };
    // SAFETY: attr is a valid BPF_PROG_LOAD prefix of the size passed; the pointers it holds refer to
    // locals that outlive the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            &attr as *const ProgLoadAttr,
            std::mem::size_of::<ProgLoadAttr>() as u32,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a program fd we own.
    unsafe { libc::close(fd as i32) };
    Ok(())
}
