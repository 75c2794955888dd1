//! What root inside a "drop-capabilities" session tries in order to leave it or undo enforcement.
//! Prints one line per way, `NAME: through` or `NAME: refused (why)`, and the capability sets.

use std::{ffi::CString, fs, io, io::Write as _, path::Path};

fn line(name: &str, r: io::Result<()>) {
    match r {
        Ok(()) => println!("{name}: through"),
        Err(e) => println!("{name}: refused ({e})"),
    }
}

fn errno(rc: libc::c_long) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `cgroup2`: the cgroup2 mount; `pin`: a pinned link of egressd's; `log`: egressd's audit log.
pub fn main(cgroup2: &str, pin: &str, log: &str) {
    for l in fs::read_to_string("/proc/self/status").unwrap().lines() {
        if l.starts_with("Cap") {
            println!("{}", l.replace('\t', " "));
        }
    }
    let pid = std::process::id().to_string();
    line(
        "move-to-root-cgroup",
        fs::OpenOptions::new()
            .write(true)
            .open(Path::new(cgroup2).join("cgroup.procs"))
            .and_then(|mut f| f.write_all(pid.as_bytes())),
    );
    let own = fs::read_to_string("/proc/self/cgroup").unwrap();
    let own = own.lines().find_map(|l| l.strip_prefix("0::/")).unwrap();
    line(
        "child-cgroup",
        fs::create_dir(Path::new(cgroup2).join(own).join("elsewhere")),
    );
    line("unpin", fs::remove_file(pin));
    line("rename-pin", fs::rename(pin, format!("{pin}.moved")));
    let cpin = CString::new(pin).unwrap();
    let mut attr = [0u64; 4]; // union bpf_attr for BPF_OBJ_GET: pathname, bpf_fd, file_flags
    attr[0] = cpin.as_ptr() as u64;
    // SAFETY: BPF_OBJ_GET reads the path through the pointer, which outlives the call.
    line(
        "bpf-obj-get",
        errno(unsafe {
            libc::syscall(
                libc::SYS_bpf,
                7,
                attr.as_mut_ptr(),
                std::mem::size_of_val(&attr),
            )
        }),
    );
    line(
        "truncate-audit-log",
        fs::OpenOptions::new().write(true).open(log).map(drop),
    );
    line("remove-audit-log", fs::remove_file(log));
    // A private mount namespace first, so that nothing could change for anyone else if it worked.
    // SAFETY: unshare and mount with valid C strings.
    line(
        "mount-cgroup2",
        errno(unsafe { libc::unshare(libc::CLONE_NEWNS) } as libc::c_long).and_then(|()| {
            let (src, dst, fstype) = (c"none", c"/mnt", c"cgroup2");
            errno(unsafe {
                libc::mount(
                    src.as_ptr(),
                    dst.as_ptr(),
                    fstype.as_ptr(),
                    0,
                    std::ptr::null(),
                )
            } as libc::c_long)
        }),
    );
}
