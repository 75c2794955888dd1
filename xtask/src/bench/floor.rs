//! The kernel's floor: programs that do (almost) nothing, attached with bpf(2) to a cgroup of
//! their own on the hooks the network workloads go through (sock_create, connect4, sendmsg4,
//! skb egress). What any cgroup BPF design pays on this kernel before its first instruction of
//! policy: the hook's dispatch, the sockaddr copy, the socket lock sendmsg4 takes, and (with
//! `kernel.bpf_stats_enabled`) the statistics' clock reads. The "one lookup" set adds a helper
//! call and one hash map lookup, the unit egressd's programs are built from.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use anyhow::Context;

use super::{fixture::Cgroup, stats::bpf};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Body {
    /// `return 1`.
    Empty,
    /// `key = bpf_get_current_cgroup_id(); bpf_map_lookup_elem(&hash, &key); return 1`.
    OneLookup,
}

/// Programs attached through bpf links: closing the links (drop, or the bench dying) detaches.
pub struct Floor {
    // Fields drop in order: the links (detaching the programs) before the cgroup is removed.
    _links: Vec<OwnedFd>,
    _map: Option<OwnedFd>,
    pub programs: Vec<(String, u32)>,
    pub cg: Cgroup,
}

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_CREATE: libc::c_long = 28;

const BPF_MAP_TYPE_HASH: u32 = 1;
const PROG_CGROUP_SKB: u32 = 8;
const PROG_CGROUP_SOCK: u32 = 9;
const PROG_CGROUP_SOCK_ADDR: u32 = 18;
const ATTACH_INET_EGRESS: u32 = 1;
const ATTACH_INET_SOCK_CREATE: u32 = 2;
const ATTACH_INET4_CONNECT: u32 = 10;
const ATTACH_UDP4_SENDMSG: u32 = 14;

/// The hooks, named as egressd's status names its own, so the rows line up.
const HOOKS: [(&str, u32, u32); 4] = [
    (
        "cgroup/sock_create",
        PROG_CGROUP_SOCK,
        ATTACH_INET_SOCK_CREATE,
    ),
    (
        "cgroup/connect4",
        PROG_CGROUP_SOCK_ADDR,
        ATTACH_INET4_CONNECT,
    ),
    (
        "cgroup/sendmsg4",
        PROG_CGROUP_SOCK_ADDR,
        ATTACH_UDP4_SENDMSG,
    ),
    ("cgroup_skb/egress", PROG_CGROUP_SKB, ATTACH_INET_EGRESS),
];

fn owned(fd: i32) -> OwnedFd {
    // SAFETY: a descriptor bpf(2) just returned to us, owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// One struct bpf_insn: opcode, dst and src registers, offset, immediate.
fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    u64::from(code)
        | (u64::from(dst & 0xf) << 8)
        | (u64::from(src & 0xf) << 12)
        | (u64::from(off as u16) << 16)
        | (u64::from(imm as u32) << 32)
}

fn program(body: Body, map_fd: i32) -> Vec<u64> {
    const MOV64_K: u8 = 0xb7;
    const MOV64_X: u8 = 0xbf;
    const ADD64_K: u8 = 0x07;
    const STX_DW: u8 = 0x7b;
    const LD_IMM64: u8 = 0x18;
    const CALL: u8 = 0x85;
    const EXIT: u8 = 0x95;
    const PSEUDO_MAP_FD: u8 = 1;
    const GET_CURRENT_CGROUP_ID: i32 = 80;
    const MAP_LOOKUP_ELEM: i32 = 1;
    let mut p = Vec::new();
    if body == Body::OneLookup {
        p.extend([
            insn(CALL, 0, 0, 0, GET_CURRENT_CGROUP_ID),
            insn(STX_DW, 10, 0, -8, 0),
            insn(MOV64_X, 2, 10, 0, 0),
            insn(ADD64_K, 2, 0, 0, -8),
            insn(LD_IMM64, 1, PSEUDO_MAP_FD, 0, map_fd),
            insn(0, 0, 0, 0, 0),
            insn(CALL, 0, 0, 0, MAP_LOOKUP_ELEM),
        ]);
    }
    p.extend([insn(MOV64_K, 0, 0, 0, 1), insn(EXIT, 0, 0, 0, 0)]);
    p
}

fn prog_id(fd: &OwnedFd) -> anyhow::Result<u32> {
    // struct bpf_prog_info starts with type (u32), id (u32).
    let mut info = [0u32; 2];
    let mut attr = [0u64; 16];
    attr[0] = (fd.as_raw_fd() as u64) | ((std::mem::size_of_val(&info) as u64) << 32);
    attr[1] = info.as_mut_ptr() as u64;
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr, "BPF_OBJ_GET_INFO_BY_FD")?;
    Ok(info[1])
}

impl Floor {
    pub fn attach(tag: &str, body: Body) -> anyhow::Result<Floor> {
        let cg = Cgroup::new(tag)?;
        let map = if body == Body::OneLookup {
            let mut attr = [0u64; 16];
            // map_type, key_size | value_size, max_entries
            attr[0] = u64::from(BPF_MAP_TYPE_HASH) | (8 << 32);
            attr[1] = 8 | (1024 << 32);
            Some(owned(bpf(BPF_MAP_CREATE, &mut attr, "BPF_MAP_CREATE")?))
        } else {
            None
        };
        let map_fd = map.as_ref().map_or(-1, |m| m.as_raw_fd());
        let dir = std::fs::File::open(&cg.dir)
            .with_context(|| format!("opening {}", cg.dir.display()))?;
        let license = c"GPL";
        let mut links = Vec::new();
        let mut programs = Vec::new();
        for (name, prog_type, attach_type) in HOOKS {
            let insns = program(body, map_fd);
            let mut attr = [0u64; 16];
            // prog_type, insn_cnt; insns; license; log_level, log_size; log_buf;
            // kern_version, prog_flags; prog_name[16]; prog_ifindex, expected_attach_type
            attr[0] = u64::from(prog_type) | ((insns.len() as u64) << 32);
            attr[1] = insns.as_ptr() as u64;
            attr[2] = license.as_ptr() as u64;
            attr[8] = u64::from(attach_type) << 32;
            let prog = owned(
                bpf(
                    BPF_PROG_LOAD,
                    &mut attr,
                    &format!("loading the {name} floor"),
                )
                .context("the kernel floor needs root and a kernel with cgroup BPF links")?,
            );
            let mut attr = [0u64; 16];
            // prog_fd, target_fd; attach_type, flags
            attr[0] = (prog.as_raw_fd() as u64) | ((dir.as_raw_fd() as u64) << 32);
            attr[1] = u64::from(attach_type);
            let link = owned(bpf(
                BPF_LINK_CREATE,
                &mut attr,
                &format!("attaching the {name} floor"),
            )?);
            programs.push((name.to_string(), prog_id(&prog)?));
            links.push(link);
        }
        Ok(Floor {
            cg,
            programs,
            _links: links,
            _map: map,
        })
    }
}
