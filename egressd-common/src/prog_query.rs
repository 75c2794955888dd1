//! `BPF_PROG_QUERY` with `BPF_F_QUERY_EFFECTIVE` on a cgroup: which programs the kernel will really
//! run for tasks in it, inherited ones included. aya 0.14 has no public call for this.

use std::{io, os::fd::AsRawFd, vec::Vec};

/// The attach types egressd needs on every session, with the names people see.
pub const REQUIRED_ATTACH_TYPES: [(u32, &str); 10] = [
    (ATTACH_INET_EGRESS, "cgroup_skb/egress"),
    (ATTACH_INET_SOCK_CREATE, "cgroup/sock_create"),
    (ATTACH_INET4_CONNECT, "cgroup/connect4"),
    (ATTACH_INET6_CONNECT, "cgroup/connect6"),
    (ATTACH_UDP4_SENDMSG, "cgroup/sendmsg4"),
    (ATTACH_UDP6_SENDMSG, "cgroup/sendmsg6"),
    (ATTACH_UDP4_RECVMSG, "cgroup/recvmsg4"),
    (ATTACH_UDP6_RECVMSG, "cgroup/recvmsg6"),
    (ATTACH_INET4_BIND, "cgroup/bind4"),
    (ATTACH_INET6_BIND, "cgroup/bind6"),
];

pub const ATTACH_INET_EGRESS: u32 = 1;
pub const ATTACH_INET_SOCK_CREATE: u32 = 2;
pub const ATTACH_INET4_BIND: u32 = 8;
pub const ATTACH_INET6_BIND: u32 = 9;
pub const ATTACH_INET4_CONNECT: u32 = 10;
pub const ATTACH_INET6_CONNECT: u32 = 11;
pub const ATTACH_UDP4_SENDMSG: u32 = 14;
pub const ATTACH_UDP6_SENDMSG: u32 = 15;
pub const ATTACH_UDP4_RECVMSG: u32 = 19;
pub const ATTACH_UDP6_RECVMSG: u32 = 20;
/// The unix backstop (Linux 6.7+; optional, like BPF LSM).
pub const ATTACH_UNIX_CONNECT: u32 = 49;
pub const ATTACH_UNIX_SENDMSG: u32 = 50;

const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_F_QUERY_EFFECTIVE: u32 = 1;

/// The `query` member of `union bpf_attr`, as in linux/bpf.h.
#[repr(C)]
#[derive(Default)]
struct QueryAttr {
    target_fd: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: u32,
    prog_attach_flags: u64,
    link_ids: u64,
    link_attach_flags: u64,
    revision: u64,
}

/// Program ids effective on `cgroup` for `attach_type`. Needs CAP_NET_ADMIN or CAP_SYS_ADMIN.
pub fn effective_programs(cgroup: &impl AsRawFd, attach_type: u32) -> io::Result<Vec<u32>> {
    let mut ids = [0u32; 64];
    let mut attr = QueryAttr {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_type,
        query_flags: BPF_F_QUERY_EFFECTIVE,
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: ids.len() as u32,
        ..Default::default()
    };
    // SAFETY: attr is a valid bpf_attr prefix of the size we pass; prog_ids points at `ids`, which
    // holds prog_cnt entries and outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_QUERY,
            &mut attr as *mut QueryAttr,
            core::mem::size_of::<QueryAttr>() as u32,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = (attr.prog_cnt as usize).min(ids.len());
    Ok(ids[..n].to_vec())
}
