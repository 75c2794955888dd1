//! The seccomp layer: a filter egressctl installs on CMD just before exec (after no_new_privs, which
//! it needs). It cannot be removed by anything CMD runs, and it closes what cgroup hooks do not
//! see on kernels without BPF LSM: sockets of other families (AF_VSOCK, AF_PACKET, AF_XDP...),
//! reaching into processes outside the sandbox (ptrace, process_vm_readv/writev, pidfd_getfd,
//! which would also steal their sockets), and bpf(2).

use std::os::fd::{FromRawFd as _, OwnedFd};

use libc::{sock_filter, sock_fprog};

// Classic BPF opcodes (linux/filter.h).
const LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
const JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
const JGE_K: u16 = 0x35; // BPF_JMP | BPF_JGE | BPF_K
const RET_K: u16 = 0x06; // BPF_RET | BPF_K

// struct seccomp_data offsets.
const NR: u32 = 0;
const ARCH: u32 = 4;
/// Low 32 bits of args[0] (little endian).
const ARG0_LO: u32 = 16;

#[cfg(target_arch = "x86_64")]
const NATIVE_ARCH: u32 = 0xc000_003e; // AUDIT_ARCH_X86_64
#[cfg(target_arch = "aarch64")]
const NATIVE_ARCH: u32 = 0xc000_00b7; // AUDIT_ARCH_AARCH64
/// x32 system calls arrive with this bit set in the number, under the x86_64 arch.
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

const RET_ALLOW: u32 = libc::SECCOMP_RET_ALLOW;
const RET_EPERM: u32 = libc::SECCOMP_RET_ERRNO | libc::EPERM as u32;
/// Other ABIs (32-bit x86's socketcall multiplexer would bypass the family check): refused.
const RET_ENOSYS: u32 = libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32;

fn stmt(code: u16, k: u32) -> sock_filter {
    sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

/// The filter for a sandbox whose sockets may be of `families` (AF_* numbers); with
/// `deny_ptrace`, the calls that reach into other processes are refused too. bpf(2) always is.
pub fn filter(families: &[u32], deny_ptrace: bool) -> Vec<sock_filter> {
    // bpf(2): nothing in a sandbox needs it, and with it a privileged task could detach or
    // unpin the programs that hold it.
    let mut denied_calls: Vec<u32> = vec![libc::SYS_bpf as u32];
    if deny_ptrace {
        denied_calls.extend([
            libc::SYS_ptrace as u32,
            libc::SYS_process_vm_readv as u32,
            libc::SYS_process_vm_writev as u32,
            libc::SYS_pidfd_getfd as u32,
        ]);
    }
    let socket_calls = [libc::SYS_socket as u32, libc::SYS_socketpair as u32];
    let mut p = vec![
        stmt(LD_W_ABS, ARCH),
        jump(JEQ_K, NATIVE_ARCH, 1, 0),
        stmt(RET_K, RET_ENOSYS),
        stmt(LD_W_ABS, NR),
        jump(JGE_K, X32_SYSCALL_BIT, 0, 1),
        stmt(RET_K, RET_ENOSYS),
    ];
    // Socket calls jump to the family check, which follows the "allow" at the end of this list.
    let n_checks = socket_calls.len() + denied_calls.len();
    for (i, nr) in socket_calls.iter().enumerate() {
        // Distance from the instruction after this one to the family check.
        let to_family = (n_checks - i - 1) + 1;
        p.push(jump(JEQ_K, *nr, to_family as u8, 0));
    }
    for (i, nr) in denied_calls.iter().enumerate() {
        let left = denied_calls.len() - i - 1;
        // Past the remaining checks and the allow, to the EPERM after the family checks.
        let to_eperm = left + 1 + 1 + families.len();
        p.push(jump(JEQ_K, *nr, to_eperm as u8, 0));
    }
    p.push(stmt(RET_K, RET_ALLOW));
    p.push(stmt(LD_W_ABS, ARG0_LO));
    for (i, family) in families.iter().enumerate() {
        let left = families.len() - i - 1;
        // To the allow that follows the EPERM.
        p.push(jump(JEQ_K, *family, (left + 1) as u8, 0));
    }
    p.push(stmt(RET_K, RET_EPERM));
    p.push(stmt(RET_K, RET_ALLOW));
    p
}

const RET_USER_NOTIF: u32 = libc::SECCOMP_RET_USER_NOTIF;

/// The unix layer's filter: every connect(2) becomes a notification egressd's supervisor answers
/// (it lets inet connects go on to the kernel's cgroup programs, and connects unix sockets itself
/// when their server is the session's). Other architectures are refused by [`filter`] already.
pub fn connect_filter() -> Vec<sock_filter> {
    vec![
        stmt(LD_W_ABS, ARCH),
        jump(JEQ_K, NATIVE_ARCH, 1, 0),
        stmt(RET_K, RET_ALLOW),
        stmt(LD_W_ABS, NR),
        jump(JEQ_K, libc::SYS_connect as u32, 0, 1),
        stmt(RET_K, RET_USER_NOTIF),
        stmt(RET_K, RET_ALLOW),
    ]
}

/// Installs `filter` and returns its notification listener (close-on-exec).
pub fn install_with_listener(filter: &[sock_filter]) -> std::io::Result<OwnedFd> {
    let fd = set_filter(filter, libc::SECCOMP_FILTER_FLAG_NEW_LISTENER)?;
    // SAFETY: with NEW_LISTENER the kernel returns a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Installs `filter` on the calling thread (and what it execs). no_new_privs must be set.
pub fn install(filter: &[sock_filter]) -> std::io::Result<()> {
    set_filter(filter, 0).map(drop)
}

/// seccomp(SECCOMP_SET_MODE_FILTER, flags, filter): its return value.
fn set_filter(filter: &[sock_filter], flags: libc::c_ulong) -> std::io::Result<libc::c_long> {
    let prog = sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr() as *mut sock_filter,
    };
    // SAFETY: `prog` points at `filter`, which outlives the call; the kernel copies it.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            flags,
            &prog as *const sock_fprog,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(rc)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny interpreter for the instructions used here, to check the jump arithmetic.
    fn run(p: &[sock_filter], arch: u32, nr: u32, arg0: u32) -> u32 {
        let (mut pc, mut acc) = (0usize, 0u32);
        loop {
            let i = &p[pc];
            match i.code {
                LD_W_ABS => {
                    acc = match i.k {
                        NR => nr,
                        ARCH => arch,
                        ARG0_LO => arg0,
                        _ => panic!("load {}", i.k),
                    };
                    pc += 1;
                }
                JEQ_K | JGE_K => {
                    let hit = if i.code == JEQ_K {
                        acc == i.k
                    } else {
                        acc >= i.k
                    };
                    pc += 1 + if hit { i.jt as usize } else { i.jf as usize };
                }
                RET_K => return i.k,
                c => panic!("opcode {c:#x}"),
            }
        }
    }

    #[test]
    fn the_filter_allows_listed_families_and_refuses_the_rest() {
        let p = filter(&[1, 2, 10, 16], true);
        let socket = libc::SYS_socket as u32;
        let pair = libc::SYS_socketpair as u32;
        for fam in [1, 2, 10, 16] {
            assert_eq!(run(&p, NATIVE_ARCH, socket, fam), RET_ALLOW, "family {fam}");
            assert_eq!(run(&p, NATIVE_ARCH, pair, fam), RET_ALLOW);
        }
        for fam in [17, 40, 44, 0, 3] {
            assert_eq!(run(&p, NATIVE_ARCH, socket, fam), RET_EPERM, "family {fam}");
        }
        for nr in [
            libc::SYS_ptrace,
            libc::SYS_process_vm_writev,
            libc::SYS_process_vm_readv,
            libc::SYS_pidfd_getfd,
        ] {
            assert_eq!(run(&p, NATIVE_ARCH, nr as u32, 0), RET_EPERM);
        }
        assert_eq!(run(&p, NATIVE_ARCH, libc::SYS_read as u32, 17), RET_ALLOW);
        assert_eq!(run(&p, NATIVE_ARCH, libc::SYS_bpf as u32, 0), RET_EPERM);
        assert_eq!(run(&p, 0x4000_0003, 102, 17), RET_ENOSYS);
        assert_eq!(run(&p, NATIVE_ARCH, X32_SYSCALL_BIT | 41, 17), RET_ENOSYS);
        let p = filter(&[1, 2], false);
        assert_eq!(run(&p, NATIVE_ARCH, libc::SYS_ptrace as u32, 0), RET_ALLOW);
        assert_eq!(run(&p, NATIVE_ARCH, socket, 10), RET_EPERM);
        assert_eq!(run(&p, NATIVE_ARCH, libc::SYS_bpf as u32, 0), RET_EPERM);
        assert_eq!(run(&p, NATIVE_ARCH, libc::SYS_connect as u32, 0), RET_ALLOW);
    }

    #[test]
    fn the_connect_filter_notifies_connect_only() {
        let p = connect_filter();
        assert_eq!(
            run(&p, NATIVE_ARCH, libc::SYS_connect as u32, 0),
            RET_USER_NOTIF
        );
        for nr in [libc::SYS_sendto, libc::SYS_socket, libc::SYS_read] {
            assert_eq!(run(&p, NATIVE_ARCH, nr as u32, 0), RET_ALLOW);
        }
    }
}
