//! egressd's kernel programs. They are attached once, to the cgroup that holds every session, and
//! decide every verdict in the kernel: no round trip to user space on the hot path.
//!
//! Layers, from first to last line of defence:
//! - `cgroup/sock_create`: no raw sockets and no ICMP ping sockets (a ping socket's `sendto()` has no
//!   cgroup hook at all, so it must be stopped at creation).
//! - `cgroup/connect4|6`, `cgroup/sendmsg4|6`: the verdict per destination (TCP connect, connected and
//!   unconnected UDP). IPv4-mapped IPv6 is judged as IPv4.
//! - `cgroup_skb/egress`: the backstop. A packet of a session that leaves through any device but `lo`
//!   must go to an allowed destination, or it is dropped; loopback addresses leaving through another
//!   device (source routing, DNAT of 127.x) are dropped too.
#![no_std]
#![no_main]

mod verdict;

use aya_ebpf::{
    bindings::{bpf_sock, bpf_sock_addr},
    helpers::{bpf_get_current_ancestor_cgroup_id, bpf_skb_ancestor_cgroup_id},
    macros::{cgroup_skb, cgroup_sock, cgroup_sock_addr, map},
    maps::{Array, HashMap, LpmTrie, PerCpuHashMap},
    programs::{SkBuffContext, SockAddrContext, SockContext},
};
use aya_log_ebpf::warn;
use egressd_common::{
    AllowKey, AllowValue, Counters, Profile, SessionInfo, MAX_ALLOW_ENTRIES, MAX_PROFILES,
    MAX_SESSIONS,
};

use crate::verdict::{Decision, Dest};

/// Set by user space at load time: the cgroup level of session cgroups.
#[no_mangle]
static SESSION_LEVEL: u32 = 2;

// Map statics are named like the constants in `egressd_common::maps` (checked by a test in egressd).
// Pinned by name, so a restarted daemon reuses them and running sessions keep their state.
#[map]
static SESSIONS: HashMap<u64, SessionInfo> = HashMap::pinned(MAX_SESSIONS, 0);
#[map]
static PROFILES: Array<Profile> = Array::pinned(2 * MAX_PROFILES, 0);
#[map]
static ALLOW: LpmTrie<AllowKey, AllowValue> = LpmTrie::pinned(MAX_ALLOW_ENTRIES, 0);
#[map]
static POLICY_GEN: Array<u32> = Array::pinned(1, 0);
#[map]
static COUNTERS: PerCpuHashMap<u64, Counters> = PerCpuHashMap::pinned(MAX_SESSIONS, 0);

const ALLOW_VERDICT: i32 = 1;
const DENY_VERDICT: i32 = 0;

const SOCK_DGRAM: u32 = 2;
const SOCK_RAW: u32 = 3;
const SOCK_PACKET: u32 = 10;
const IPPROTO_ICMP: u32 = 1;
const IPPROTO_ICMPV6: u32 = 58;
const LOOPBACK_IFINDEX: u32 = 1;

#[inline(always)]
fn session_level() -> u32 {
    // SAFETY: a plain read of a global that user space set before load; volatile so the compiler
    // does not fold the default value in.
    unsafe { core::ptr::read_volatile(&SESSION_LEVEL) }
}

/// The session of the current task: the ancestor cgroup at the session level. A task under the
/// parent cgroup with no registered session gets the strictest policy (loopback only).
#[inline(always)]
fn current_session() -> (u64, Option<SessionInfo>) {
    // SAFETY: helper with no pointer arguments.
    let id = unsafe { bpf_get_current_ancestor_cgroup_id(session_level() as i32) };
    // SAFETY: the value is plain old data copied out immediately.
    let info = unsafe { SESSIONS.get(&id) }.copied();
    (id, info)
}

#[inline(always)]
fn profile_for(info: Option<SessionInfo>) -> Option<(u32, Profile)> {
    let info = info?;
    let generation = POLICY_GEN.get(0).copied().unwrap_or(0);
    let slot = egressd_common::policy_slot(generation, info.profile);
    PROFILES.get(slot).map(|p| (slot, *p))
}

#[inline(always)]
fn count(session: u64, f: impl FnOnce(&mut Counters)) {
    if let Some(c) = COUNTERS.get_ptr_mut(&session) {
        // SAFETY: per-CPU value of this CPU; programs do not migrate mid-run.
        f(unsafe { &mut *c });
    }
}

/// Decides a socket-address hook and counts it. Returns the hook's return value.
#[inline(always)]
fn judge_sock_addr(ctx: &SockAddrContext, dest: Dest) -> i32 {
    let (session, info) = current_session();
    let (slot, profile) = match profile_for(info) {
        Some(p) => p,
        None => {
            if info.is_none() {
                warn!(
                    ctx,
                    "egressd: task in no known session (cgroup {}): loopback only", session
                );
            }
            (u32::MAX, Profile::default())
        }
    };
    let decision = verdict::decide(&ALLOW, slot, &profile, &dest, false);
    finish(session, &profile, decision)
}

#[inline(always)]
fn finish(session: u64, profile: &Profile, decision: Decision) -> i32 {
    if decision.allowed {
        count(session, |c| c.allowed += 1);
        ALLOW_VERDICT
    } else {
        count(session, |c| c.denied += 1);
        if verdict::audit_only(profile) {
            ALLOW_VERDICT
        } else {
            DENY_VERDICT
        }
    }
}

#[inline(always)]
fn sock_addr(ctx: &SockAddrContext) -> &bpf_sock_addr {
    // SAFETY: the context pointer is valid for the whole program run.
    unsafe { &*ctx.sock_addr }
}

fn dest4(ctx: &SockAddrContext) -> Dest {
    let sa = sock_addr(ctx);
    Dest::v4(sa.user_ip4, sa.user_port, sa.protocol)
}

fn dest6(ctx: &SockAddrContext) -> Dest {
    let sa = sock_addr(ctx);
    let ip = [
        sa.user_ip6[0],
        sa.user_ip6[1],
        sa.user_ip6[2],
        sa.user_ip6[3],
    ];
    Dest::v6(ip, sa.user_port, sa.protocol)
}

#[cgroup_sock_addr(connect4)]
pub fn egressd_connect4(ctx: SockAddrContext) -> i32 {
    judge_sock_addr(&ctx, dest4(&ctx))
}

#[cgroup_sock_addr(connect6)]
pub fn egressd_connect6(ctx: SockAddrContext) -> i32 {
    judge_sock_addr(&ctx, dest6(&ctx))
}

#[cgroup_sock_addr(sendmsg4)]
pub fn egressd_sendmsg4(ctx: SockAddrContext) -> i32 {
    judge_sock_addr(&ctx, dest4(&ctx))
}

#[cgroup_sock_addr(sendmsg6)]
pub fn egressd_sendmsg6(ctx: SockAddrContext) -> i32 {
    judge_sock_addr(&ctx, dest6(&ctx))
}

#[cgroup_sock(sock_create)]
pub fn egressd_sock_create(ctx: SockContext) -> i32 {
    // SAFETY: the context pointer is valid for the whole program run.
    let sk: &bpf_sock = unsafe { &*ctx.sock };
    let (ty, proto) = (sk.type_, sk.protocol);
    let forbidden = ty == SOCK_RAW
        || ty == SOCK_PACKET
        || (ty == SOCK_DGRAM && (proto == IPPROTO_ICMP || proto == IPPROTO_ICMPV6));
    if !forbidden {
        return ALLOW_VERDICT;
    }
    let (session, info) = current_session();
    count(session, |c| c.sockets_refused += 1);
    match profile_for(info) {
        Some((_, p)) if verdict::audit_only(&p) => ALLOW_VERDICT,
        _ => DENY_VERDICT,
    }
}

#[cgroup_skb(egress)]
pub fn egressd_skb_egress(ctx: SkBuffContext) -> i32 {
    // SAFETY: the context pointer is valid for the whole program run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    if ifindex == LOOPBACK_IFINDEX {
        return ALLOW_VERDICT;
    }
    // SAFETY: helper reads the skb's socket cgroup; the context is valid.
    let session = unsafe { bpf_skb_ancestor_cgroup_id(ctx.skb.skb.cast(), session_level() as i32) };
    // SAFETY: the value is plain old data copied out immediately.
    let info = unsafe { SESSIONS.get(&session) }.copied();
    let (slot, profile) = profile_for(info).unwrap_or((u32::MAX, Profile::default()));
    // A packet whose header cannot be read is nothing a socket hook could have allowed: drop it.
    if let Some(dest) = verdict::packet_dest(&ctx) {
        if verdict::decide(&ALLOW, slot, &profile, &dest, true).allowed {
            return ALLOW_VERDICT;
        }
    }
    count(session, |c| c.backstop_dropped += 1);
    if verdict::audit_only(&profile) {
        ALLOW_VERDICT
    } else {
        DENY_VERDICT
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 4] = *b"GPL\0";
