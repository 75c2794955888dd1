//! egressd's kernel programs. They are attached once, to the cgroup that holds every session, and
//! decide every verdict in the kernel: no round trip to user space on the hot path.
//!
//! Layers, from first to last line of defence:
//! - `cgroup/sock_create`: no raw sockets and no ICMP ping sockets (a ping socket's `sendto()` has no
//!   cgroup hook at all, so it must be stopped at creation).
//! - `cgroup/connect4|6`, `cgroup/sendmsg4|6`: the verdict per destination (TCP connect, connected and
//!   unconnected UDP). IPv4-mapped IPv6 is judged as IPv4.
//! - DNS: every query to port 53 (UDP or TCP, any address) is redirected by connect/sendmsg to
//!   egressd's resolver on loopback, and `cgroup/recvmsg4|6` give the answer the address the client
//!   asked; the resolver allows names, and their answers open `DNS_ALLOW` until the TTL ends.
//! - `cgroup_skb/egress`: the backstop. A packet of a session that leaves through any device but `lo`
//!   must go to an allowed destination, or it is dropped; loopback addresses leaving through another
//!   device (source routing, DNAT of 127.x) are dropped too.
#![no_std]
#![no_main]
// Atomic adds on map values: the BPF target's core has no atomic types with fetch_add.
#![allow(internal_features)]
#![feature(core_intrinsics)]

mod verdict;

use aya_ebpf::{
    bindings::{
        bpf_pidns_info, bpf_sock, bpf_sock_addr, BPF_F_NO_PREALLOC, BPF_NOEXIST, BPF_RB_AVAIL_DATA,
        BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP, BPF_RB_RING_SIZE,
    },
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_current_uid_gid, bpf_get_ns_current_pid_tgid, bpf_get_socket_cookie,
        bpf_ktime_get_boot_ns, bpf_ktime_get_coarse_ns, bpf_probe_read_kernel,
        bpf_probe_read_kernel_buf, bpf_skb_ancestor_cgroup_id,
    },
    macros::{cgroup_skb, cgroup_sock, cgroup_sock_addr, lsm, map},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{LsmContext, SkBuffContext, SockAddrContext, SockContext},
};
use aya_log_ebpf::warn;
use egressd_common::{
    AllowKey, AllowValue, Counters, DnsAllowKey, DnsOrigin, DnsPeerKey, Event, FoldKey, FoldValue,
    Profile, SessionInfo, UnixEvent, DEFAULT_RING_BYTES, DNS_PORT as DNS_QUERY_PORT, EVENT_FOLDED,
    HOOK_BIND4, HOOK_BIND6, HOOK_CONNECT4, HOOK_CONNECT6, HOOK_CONNECT_UNIX,
    HOOK_LSM_SOCKET_CREATE, HOOK_SENDMSG4, HOOK_SENDMSG6, HOOK_SENDMSG_UNIX, HOOK_SKB_EGRESS,
    HOOK_SOCK_CREATE, MAX_ALLOW_ENTRIES, MAX_DNS_ALLOW, MAX_DNS_SOCKETS, MAX_FOLDS, MAX_PROFILES,
    MAX_SESSIONS, PROFILE_BIND_ANY, PROFILE_UNIX_OPEN, REASON_BIND, REASON_DEFAULT_DENY,
    REASON_DNS_REDIRECT, REASON_FAMILY, REASON_FORBIDDEN_SOCKET, REASON_UNIX_UNVETTED,
    SOCK_ADDR_KERN_UADDR, SOCK_ADDR_KERN_UADDRLEN, VERDICT_ALLOWED, VERDICT_AUDIT_DENIED,
    VERDICT_DENIED, VERDICT_REDIRECTED,
};

use crate::verdict::{Dest, Tables};

/// The cgroup level of session cgroups (the parent's level + 1) as the kernel counts it, from its
/// real root; 0 until a program run has found PARENT_ID among its ancestors. Found here rather
/// than told by user space: egressd in a container sees the tree from its cgroup namespace's root,
/// which can be any number of levels below the real one, and the ancestor helpers ignore namespaces.
/// Cgroup ids are never reused, so only the parent's real level can match: nothing a sandbox does
/// can store a wrong value, and concurrent runs store the same one.
static mut SESSION_LEVEL: u32 = 0;

/// The deepest level searched for the parent: deeper trees than this are not supported.
const MAX_PARENT_LEVEL: i32 = 32;

/// Set by user space at load time: the port of egressd's resolver on 127.0.0.1 and ::1; 0 when DNS
/// queries are not redirected.
#[no_mangle]
static DNS_PORT: u32 = 0;

/// Set by user space at load time: the cgroup id of the parent of every session.
#[no_mangle]
static PARENT_ID: u64 = 0;

/// Set by user space at load time: the device and inode of egressd's pid namespace when it is not
/// the initial one (egressd in a container), so that the audit log names pids as egressd, `ps` and
/// the people reading the log see them. 0 in the initial namespace: that branch is then dead code
/// the verifier never visits, and kernels without the helper for cgroup programs load as before.
#[no_mangle]
static PIDNS_DEV: u64 = 0;
#[no_mangle]
static PIDNS_INO: u64 = 0;

/// Set by user space at load time: 1 when repeated decisions are counted in `FOLDS` instead of
/// each sent as an event (`fold_window_ms` > 0).
#[no_mangle]
static FOLD: u32 = 0;

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
/// Slot 0 is never given out (it means "counted in COUNTERS").
#[map]
static SESSION_COUNTERS: PerCpuArray<Counters> = PerCpuArray::pinned(MAX_SESSIONS + 1, 0);
#[map]
static EVENTS: RingBuf = RingBuf::pinned(DEFAULT_RING_BYTES, 0);
#[map]
static DNS_ORIG: LruHashMap<u64, DnsOrigin> = LruHashMap::pinned(MAX_DNS_SOCKETS, 0);
#[map]
static DNS_PEERS: LruHashMap<DnsPeerKey, DnsOrigin> = LruHashMap::pinned(MAX_DNS_SOCKETS, 0);
#[map]
static DNS_ALLOW: LruHashMap<DnsAllowKey, u64> = LruHashMap::pinned(MAX_DNS_ALLOW, 0);
/// Preallocated: a per-CPU value allocated at insert (BPF_F_NO_PREALLOC) goes through the per-CPU
/// allocator, which made each new key cost about 20 us. User space sizes it by the CPU count.
#[map]
static FOLDS: PerCpuHashMap<FoldKey, FoldValue> = PerCpuHashMap::pinned(MAX_FOLDS, 0);
/// Written by user space only; declared here so that it is created and pinned with the rest.
#[map]
static FOLD_REPORTED: HashMap<FoldKey, u64> = HashMap::pinned(MAX_FOLDS, BPF_F_NO_PREALLOC);

const ALLOW_VERDICT: i32 = 1;
const DENY_VERDICT: i32 = 0;

const SOCK_DGRAM: u32 = 2;
const SOCK_RAW: u32 = 3;
const SOCK_PACKET: u32 = 10;
const IPPROTO_ICMP: u32 = 1;
const IPPROTO_ICMPV6: u32 = 58;
const LOOPBACK_IFINDEX: u32 = 1;
const AF_INET6: u32 = 10;
/// `Dest::family` of a unix-socket decision (AF_UNIX).
const AF_UNIX: u8 = 1;
const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;
/// 127.0.0.1 as the kernel stores it (network byte order read as a native u32).
const LOOPBACK4: u32 = u32::from_ne_bytes([127, 0, 0, 1]);

#[inline(always)]
fn tables() -> Tables<'static> {
    Tables {
        allow: &ALLOW,
        dns_allow: &DNS_ALLOW,
    }
}

#[inline(always)]
fn dns_port() -> u16 {
    // SAFETY: a plain read of a global that user space set before load; volatile so the compiler
    // does not fold the default value in.
    unsafe { core::ptr::read_volatile(&DNS_PORT) as u16 }
}

/// The level of session cgroups, searched for in `ancestor` (a cgroup's ancestor id at a level, 0
/// past its own level) on the first runs and remembered from then on. None while no run has met
/// the parent and this one is not under it either.
#[inline(always)]
fn session_level(ancestor: impl Fn(i32) -> u64) -> Option<i32> {
    // SAFETY: a plain read of a global of the program's own .bss.
    let known = unsafe { core::ptr::read_volatile(core::ptr::addr_of!(SESSION_LEVEL)) };
    if known != 0 {
        return Some(known as i32);
    }
    // SAFETY: a plain read of a global that user space set before load.
    let parent = unsafe { core::ptr::read_volatile(&PARENT_ID) };
    if parent == 0 {
        return None;
    }
    let mut level = 0;
    while level < MAX_PARENT_LEVEL {
        let id = ancestor(level);
        if id == parent {
            // SAFETY: a plain write of a global of the program's own .bss (see SESSION_LEVEL).
            unsafe {
                core::ptr::write_volatile(core::ptr::addr_of_mut!(SESSION_LEVEL), level as u32 + 1)
            };
            return Some(level + 1);
        }
        if id == 0 {
            return None;
        }
        level += 1;
    }
    None
}

/// `bpf_get_current_pid_tgid` as egressd's pid namespace numbers it; 0 for a task in a pid
/// namespace below egressd's, which has no pid there the helper can give.
#[inline(always)]
fn current_pid_tgid() -> u64 {
    // SAFETY: plain reads of globals user space set before load.
    let (dev, ino) = unsafe {
        (
            core::ptr::read_volatile(&PIDNS_DEV),
            core::ptr::read_volatile(&PIDNS_INO),
        )
    };
    if ino == 0 {
        return bpf_get_current_pid_tgid();
    }
    let mut info = bpf_pidns_info { pid: 0, tgid: 0 };
    let size = core::mem::size_of::<bpf_pidns_info>() as u32;
    // SAFETY: `info` is a stack value of the size passed.
    if unsafe { bpf_get_ns_current_pid_tgid(dev, ino, &mut info, size) } != 0 {
        return 0;
    }
    (u64::from(info.tgid) << 32) | u64::from(info.pid)
}

#[inline(always)]
fn current_ancestor(level: i32) -> u64 {
    // SAFETY: helper with no pointer arguments.
    unsafe { bpf_get_current_ancestor_cgroup_id(level) }
}

/// A session cgroup and what `SESSIONS` holds for it. Kept as plain fields (zero when not
/// registered) rather than an `Option<SessionInfo>`: copies of a `None` carry an uninitialised
/// payload, which the verifier refuses to read.
#[derive(Clone, Copy)]
struct Session {
    id: u64,
    registered: bool,
    entry: SessionInfo,
}

impl Session {
    #[inline(always)]
    fn of(id: u64) -> Session {
        // SAFETY: the value is plain old data copied out immediately.
        match unsafe { SESSIONS.get(&id) } {
            Some(v) => Session {
                id,
                registered: true,
                entry: *v,
            },
            None => Session::unknown(id),
        }
    }

    #[inline(always)]
    fn unknown(id: u64) -> Session {
        Session {
            id,
            registered: false,
            entry: SessionInfo {
                profile: 0,
                counters: 0,
            },
        }
    }

    #[inline(always)]
    fn info(&self) -> Option<SessionInfo> {
        self.registered.then_some(self.entry)
    }
}

/// The session of the current task: the ancestor cgroup at the session level. A task under the
/// parent cgroup with no registered session gets the strictest policy (loopback only).
#[inline(always)]
fn current_session() -> Session {
    let Some(level) = session_level(current_ancestor) else {
        return Session::unknown(0);
    };
    Session::of(current_ancestor(level))
}

#[inline(always)]
fn policy_generation() -> u32 {
    POLICY_GEN.get(0).copied().unwrap_or(0)
}

#[inline(always)]
fn profile_for(info: Option<SessionInfo>, generation: u32) -> Option<(u32, &'static Profile)> {
    let info = info?;
    let slot = egressd_common::policy_slot(generation, info.profile);
    // By reference: a copy of the 48-byte profile was a dozen stack spills on every verdict.
    PROFILES.get(slot).map(|p| (slot, p))
}

/// What a task without a profile is judged by: all zero, i.e. loopback only.
static NO_PROFILE: Profile = Profile {
    flags: 0,
    n_loopback_ports: 0,
    loopback_ports: [0; egressd_common::MAX_LOOPBACK_PORTS],
    families: 0,
};

/// Bytes one `Event` takes in the ring (an 8-byte header, the record rounded up to 8).
const ONE_EVENT: u64 = (core::mem::size_of::<Event>() as u64 + 8 + 7) & !7;

const EEXIST: i32 = 17;

#[inline(always)]
fn folding() -> bool {
    // SAFETY: a plain read of a global that user space set before load.
    unsafe { core::ptr::read_volatile(&FOLD) != 0 }
}

/// Reports a decision to user space. A decision that repeats one already reported (same session,
/// process, hook, destination, verdict) only adds one to this CPU's count in `FOLDS`: a lookup and
/// an atomic add, no ring reservation. The first occurrence goes through the ring at once, and its
/// key enters `FOLDS` only once its event is reserved, so every key user space finds there has had
/// its first event sent. A full `FOLDS` (or folding off) sends every decision as an event.
#[inline(always)]
fn report(
    sess: &Session,
    dest: &Dest,
    hook: u8,
    verdict: u8,
    reason: u8,
    generation: u32,
    task: bool,
) {
    let session = sess.id;
    let pid_tgid = if task { current_pid_tgid() } else { 0 };
    let fold = folding();
    let key = FoldKey::pack(
        session,
        (pid_tgid >> 32) as u32,
        dest.port,
        hook,
        verdict,
        dest.words(),
        reason,
        dest.proto,
        dest.family,
    );
    if fold && count_repeat(&key) {
        return;
    }
    let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
        count(sess, |c| &mut c.events_lost);
        return;
    };
    // SAFETY: helpers without pointer arguments.
    let (uid_gid, boot_ns) = unsafe {
        (
            if task { bpf_get_current_uid_gid() } else { 0 },
            bpf_ktime_get_boot_ns(),
        )
    };
    let comm = if task {
        bpf_get_current_comm().unwrap_or([0; 16])
    } else {
        [0; 16]
    };
    let mut flags = 0;
    if fold {
        let first = FoldValue {
            count: 0,
            last_ns: coarse_ns(),
            pid_tgid,
            uid_gid,
            comm,
            policy_gen: generation,
            _pad: 0,
        };
        match FOLDS.insert(&key, &first, BPF_NOEXIST as u64) {
            Ok(()) => flags = EVENT_FOLDED,
            // Another CPU's first occurrence won the insert (and sends the event): a repeat.
            Err(e) if e == -EEXIST && count_repeat(&key) => {
                entry.discard(0);
                return;
            }
            // Full: this decision is an event of its own, like every one before folding.
            Err(_) => {}
        }
    }
    entry.write(Event {
        boot_ns,
        session,
        pid_tgid,
        uid_gid,
        addr: dest.addr,
        port: dest.port,
        hook,
        verdict,
        reason,
        proto: dest.proto,
        family: dest.family,
        flags,
        policy_gen: generation,
        comm,
        _pad2: [0; 4],
    });
    let avail = EVENTS.query(BPF_RB_AVAIL_DATA as u64);
    let size = EVENTS.query(BPF_RB_RING_SIZE as u64);
    // The first event into an empty ring wakes the reader (so a lone decision reaches the disk in
    // milliseconds, and an idle daemon sleeps), and so does a ring a quarter full; the events in
    // between ride along with the reader's next drain, without a wakeup each.
    let flags = if avail <= ONE_EVENT || avail > size / 4 {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    entry.submit(flags as u64);
}

/// Adds a repeat of `key` to this CPU's count; false when the key is not folded yet.
#[inline(always)]
fn count_repeat(key: &FoldKey) -> bool {
    let Some(v) = FOLDS.get_ptr_mut(key) else {
        return false;
    };
    // SAFETY: `v` is this CPU's value of a live element. The add is atomic because a program can
    // be preempted by another task's run of it on the same CPU; user space only reads.
    unsafe {
        add_one(core::ptr::addr_of_mut!((*v).count));
        (*v).last_ns = coarse_ns();
    }
    true
}

/// CLOCK_MONOTONIC_COARSE, for the time of a fold's last repeat (user space adds the boot offset):
/// a read of the timekeeper's last tick, where the boot clock reads the TSC, which cost a sixth of
/// a repeated verdict. Good to the tick (1-4 ms), which is finer than the fold window it dates.
#[inline(always)]
fn coarse_ns() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// One atomic add (BPF_ATOMIC | BPF_ADD; the result is not used, so no fetch).
#[inline(always)]
unsafe fn add_one(p: *mut u64) {
    // SAFETY: the caller passes a pointer into a live map value.
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            p, 1,
        );
    }
}

/// Adds one to a counter of the session on this CPU (atomically: see `count_repeat`).
#[inline(always)]
fn count(session: &Session, field: impl FnOnce(&mut Counters) -> &mut u64) {
    let c = if session.entry.counters != 0 {
        SESSION_COUNTERS.get_ptr_mut(session.entry.counters)
    } else {
        COUNTERS.get_ptr_mut(&session.id)
    };
    if let Some(c) = c {
        // SAFETY: per-CPU value of this CPU, live for the run.
        unsafe {
            add_one(field(&mut *c));
        }
    }
}

/// Sends a DNS query to egressd's resolver instead of where it was addressed, remembering the
/// original destination for `recvmsg` and the resolver. Every query is redirected, the local stub
/// resolver's included: the stub would forward any name off the machine.
#[inline(always)]
fn redirect_dns(ctx: &SockAddrContext, dest: &Dest, session: u64) -> bool {
    let port = dns_port();
    let sa = sock_addr(ctx);
    if port == 0
        || dest.port != DNS_QUERY_PORT
        || (sa.protocol != IPPROTO_UDP && sa.protocol != IPPROTO_TCP)
    {
        return false;
    }
    // SAFETY: the context is a valid bpf_sock_addr for the whole run.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let (pid_tgid, uid_gid) = (current_pid_tgid(), bpf_get_current_uid_gid());
    let origin = DnsOrigin {
        session,
        pid_tgid,
        uid_gid,
        addr: dest.addr,
        port: dest.port,
        family: dest.family,
        proto: dest.proto,
        redirected: 1,
        _pad: [0; 3],
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
    };
    // Without the origin the answer could not be given back its source: better no query at all.
    if DNS_ORIG.insert(&cookie, &origin, 0).is_err() {
        return false;
    }
    let sa = ctx.sock_addr;
    // SAFETY: connect and sendmsg programs may write the destination; the pointer is valid.
    unsafe {
        if dest.family == 4 {
            (*sa).user_ip4 = LOOPBACK4;
        } else if is_mapped(&dest.addr) {
            (*sa).user_ip6 = [0, 0, u32::to_be(0xffff), LOOPBACK4];
        } else {
            (*sa).user_ip6 = [0, 0, 0, u32::to_be(1)];
        }
        (*sa).user_port = u32::from(port.to_be());
    }
    true
}

#[inline(always)]
fn is_mapped(a: &[u8; 16]) -> bool {
    a[0] | a[1] | a[2] | a[3] | a[4] | a[5] | a[6] | a[7] | a[8] | a[9] == 0
        && a[10] == 0xff
        && a[11] == 0xff
}

/// Decides a socket-address hook and counts it. Returns the hook's return value.
#[inline(always)]
fn judge_sock_addr(ctx: &SockAddrContext, dest: Dest, hook: u8) -> i32 {
    let sess = current_session();
    let (session, info) = (sess.id, sess.info());
    let generation = policy_generation();
    if redirect_dns(ctx, &dest, session) {
        // Counted like every decision, so the kernel's counters equal the records taken.
        count(&sess, |c| &mut c.allowed);
        report(
            &sess,
            &dest,
            hook,
            VERDICT_REDIRECTED,
            REASON_DNS_REDIRECT,
            generation,
            true,
        );
        return ALLOW_VERDICT;
    }
    let (slot, profile) = match profile_for(info, generation) {
        Some(p) => p,
        None => {
            if info.is_none() {
                warn!(
                    ctx,
                    "egressd: task in no known session (cgroup {}): loopback only", session
                );
            }
            (u32::MAX, &NO_PROFILE)
        }
    };
    let decision = verdict::decide(&tables(), session, slot, profile, &dest, false);
    let (ret, verdict) = if decision.allowed {
        count(&sess, |c| &mut c.allowed);
        (ALLOW_VERDICT, VERDICT_ALLOWED)
    } else {
        count(&sess, |c| &mut c.denied);
        if verdict::audit_only(profile) {
            (ALLOW_VERDICT, VERDICT_AUDIT_DENIED)
        } else {
            (DENY_VERDICT, VERDICT_DENIED)
        }
    };
    report(
        &sess,
        &dest,
        hook,
        verdict,
        decision.reason,
        generation,
        true,
    );
    ret
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
    judge_sock_addr(&ctx, dest4(&ctx), HOOK_CONNECT4)
}

#[cgroup_sock_addr(connect6)]
pub fn egressd_connect6(ctx: SockAddrContext) -> i32 {
    judge_sock_addr(&ctx, dest6(&ctx), HOOK_CONNECT6)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn egressd_sendmsg4(ctx: SockAddrContext) -> i32 {
    judge_sock_addr(&ctx, dest4(&ctx), HOOK_SENDMSG4)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn egressd_sendmsg6(ctx: SockAddrContext) -> i32 {
    judge_sock_addr(&ctx, dest6(&ctx), HOOK_SENDMSG6)
}

/// Gives a redirected DNS answer the source the client sent its query to: resolvers (glibc's
/// included) drop answers from any other address.
#[inline(always)]
fn restore_dns_source(ctx: &SockAddrContext, v6: bool) -> i32 {
    let port = dns_port();
    let sa = ctx.sock_addr;
    // SAFETY: the context pointer is valid for the whole program run.
    let (user_port, ip4, ip6) = unsafe { ((*sa).user_port, (*sa).user_ip4, (*sa).user_ip6) };
    if port == 0 || u16::from_be(user_port as u16) != port {
        return ALLOW_VERDICT;
    }
    let from_resolver = if v6 {
        ip6 == [0, 0, 0, u32::to_be(1)] || ip6 == [0, 0, u32::to_be(0xffff), LOOPBACK4]
    } else {
        ip4 == LOOPBACK4
    };
    if !from_resolver {
        return ALLOW_VERDICT;
    }
    // SAFETY: as in redirect_dns.
    let cookie = unsafe { bpf_get_socket_cookie(sa.cast()) };
    // SAFETY: the value is plain old data copied out immediately.
    let Some(o) = (unsafe { DNS_ORIG.get(&cookie) }).copied() else {
        return ALLOW_VERDICT;
    };
    let a = o.addr;
    let w = |i: usize| u32::from_ne_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]]);
    // SAFETY: recvmsg programs may write the source address; the pointer is valid.
    unsafe {
        if v6 {
            (*sa).user_ip6 = [w(0), w(4), w(8), w(12)];
        } else {
            (*sa).user_ip4 = w(12);
        }
        (*sa).user_port = u32::from(o.port.to_be());
    }
    ALLOW_VERDICT
}

#[cgroup_sock_addr(recvmsg4)]
pub fn egressd_recvmsg4(ctx: SockAddrContext) -> i32 {
    restore_dns_source(&ctx, false)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn egressd_recvmsg6(ctx: SockAddrContext) -> i32 {
    restore_dns_source(&ctx, true)
}

/// Keeps sandbox TCP listeners on loopback: a wildcard bind becomes a loopback bind (so no outside
/// peer can connect in and carry data out on the reply), any other address is refused.
#[inline(always)]
fn judge_bind(ctx: &SockAddrContext, v6: bool) -> i32 {
    let sess = current_session();
    let info = sess.info();
    let generation = policy_generation();
    let profile = profile_for(info, generation).map_or(&NO_PROFILE, |(_, p)| p);
    let sa = ctx.sock_addr;
    // SAFETY: the context pointer is valid for the whole program run.
    let (ip4, ip6, port, proto) = unsafe {
        (
            (*sa).user_ip4,
            (*sa).user_ip6,
            (*sa).user_port,
            (*sa).protocol,
        )
    };
    // Only TCP listeners on a chosen port are the concern: a UDP socket or a TCP client bound to
    // an ephemeral port (0) cannot send to a peer the policy denies anyway (sendmsg, connect and
    // the backstop judge every packet it sends, a SYN-ACK included).
    if profile.flags & PROFILE_BIND_ANY != 0 || proto != IPPROTO_TCP || port == 0 {
        return ALLOW_VERDICT;
    }
    let dest = if v6 {
        Dest::v6(ip6, port, 0)
    } else {
        Dest::v4(ip4, port, 0)
    };
    let a = &dest.addr;
    let wildcard = a[..10].iter().all(|b| *b == 0)
        && (a[10] | a[11] == 0 || a[10] & a[11] == 0xff)
        && a[12..].iter().all(|b| *b == 0);
    if dest.is_local() && !wildcard {
        return ALLOW_VERDICT;
    }
    let hook = if v6 { HOOK_BIND6 } else { HOOK_BIND4 };
    if verdict::audit_only(profile) {
        count(&sess, |c| &mut c.denied);
        report(
            &sess,
            &dest,
            hook,
            VERDICT_AUDIT_DENIED,
            REASON_BIND,
            generation,
            true,
        );
        return ALLOW_VERDICT;
    }
    if wildcard {
        // SAFETY: bind programs may write the address; the pointer is valid.
        unsafe {
            if !v6 {
                (*sa).user_ip4 = LOOPBACK4;
            } else if is_mapped(a) {
                (*sa).user_ip6 = [0, 0, u32::to_be(0xffff), LOOPBACK4];
            } else {
                (*sa).user_ip6 = [0, 0, 0, u32::to_be(1)];
            }
        }
        return ALLOW_VERDICT;
    }
    count(&sess, |c| &mut c.denied);
    report(
        &sess,
        &dest,
        hook,
        VERDICT_DENIED,
        REASON_BIND,
        generation,
        true,
    );
    DENY_VERDICT
}

#[cgroup_sock_addr(bind4)]
pub fn egressd_bind4(ctx: SockAddrContext) -> i32 {
    judge_bind(&ctx, false)
}

#[cgroup_sock_addr(bind6)]
pub fn egressd_bind6(ctx: SockAddrContext) -> i32 {
    judge_bind(&ctx, true)
}

const EPERM: i32 = 1;

/// The session of the calling task when it is in one (the LSM layer runs for every task).
#[inline(always)]
fn lsm_session() -> Option<Session> {
    let level = session_level(current_ancestor)?;
    // SAFETY: read of a global user space set before load.
    let parent = unsafe { core::ptr::read_volatile(&PARENT_ID) };
    if current_ancestor(level - 1) != parent {
        return None;
    }
    Some(current_session())
}

/// Socket families outside the profile's list (AF_PACKET, AF_VSOCK, AF_XDP...): the cgroup
/// sock_create hook sees only inet sockets, this LSM hook sees every socket(2).
#[lsm(hook = "socket_create")]
pub fn egressd_lsm_socket_create(ctx: LsmContext) -> i32 {
    // SAFETY: socket_create(int family, int type, int protocol, int kern) and the previous
    // program's return value: plain integers.
    let (family, kern, prev): (i32, i32, i32) = (ctx.arg(0), ctx.arg(3), ctx.arg(4));
    if prev != 0 {
        return prev;
    }
    if kern != 0 {
        return 0;
    }
    let Some(sess) = lsm_session() else {
        return 0;
    };
    let info = sess.info();
    let generation = policy_generation();
    let profile = profile_for(info, generation).map(|(_, p)| p);
    let families = match profile {
        Some(p) if p.families != 0 => p.families,
        _ => egressd_common::DEFAULT_FAMILIES,
    };
    if (0..64).contains(&family) && families & (1u64 << family) != 0 {
        return 0;
    }
    count(&sess, |c| &mut c.sockets_refused);
    let audit = profile.is_some_and(|p| verdict::audit_only(p));
    let dest = Dest {
        family: 0,
        addr: [0; 16],
        port: family as u16,
        proto: 0,
        _pad: 0,
    };
    let verdict = if audit {
        VERDICT_AUDIT_DENIED
    } else {
        VERDICT_DENIED
    };
    report(
        &sess,
        &dest,
        HOOK_LSM_SOCKET_CREATE,
        verdict,
        REASON_FAMILY,
        generation,
        true,
    );
    if audit {
        0
    } else {
        -EPERM
    }
}

/// The unix backstop. A session's unix connects are made by egressd's supervisor (seccomp user
/// notification on connect(2)), which looks up the server and connects the session's socket
/// itself, from a thread outside every session, when the server is inside the session or allowed.
/// Any unix connect or addressed datagram a session task makes itself did not come through it
/// (io_uring, `sendto` with a unix address, an address rewritten after the supervisor read it):
/// refused here. The program cannot read the path, so it judges the caller, not the address.
#[inline(always)]
fn judge_unix(ctx: *mut bpf_sock_addr, hook: u8) -> i32 {
    let Some(sess) = lsm_session() else {
        return ALLOW_VERDICT;
    };
    let info = sess.info();
    let generation = policy_generation();
    let profile = profile_for(info, generation).map(|(_, p)| p);
    if profile.is_some_and(|p| p.flags & PROFILE_UNIX_OPEN != 0) {
        return ALLOW_VERDICT;
    }
    count(&sess, |c| &mut c.denied);
    let audit = profile.is_some_and(|p| verdict::audit_only(p));
    let dest = Dest {
        family: AF_UNIX,
        addr: [0; 16],
        port: 0,
        proto: 0,
        _pad: 0,
    };
    let verdict = if audit {
        VERDICT_AUDIT_DENIED
    } else {
        VERDICT_DENIED
    };
    report_unix(ctx, &sess, &dest, hook, verdict, generation);
    if audit {
        ALLOW_VERDICT
    } else {
        DENY_VERDICT
    }
}

/// Reports a unix backstop decision with the address the task gave. The program's context is
/// really the kernel's `bpf_sock_addr_kern`, whose `uaddr` points at the kernel's copy of the
/// address: read with bpf_probe_read_kernel (root-loaded programs may pass the context's address
/// to it), since the ctx fields cannot reach `sun_path` and the kfunc that can is out of reach of
/// Rust programs today. A failed read leaves the path empty; the verdict does not depend on it.
#[inline(always)]
fn report_unix(
    ctx: *mut bpf_sock_addr,
    sess: &Session,
    dest: &Dest,
    hook: u8,
    verdict: u8,
    generation: u32,
) {
    let session = sess.id;
    let Some(mut entry) = EVENTS.reserve::<UnixEvent>(0) else {
        count(sess, |c| &mut c.events_lost);
        return;
    };
    let base = ctx as *const u8;
    // SAFETY: probe reads of kernel memory; failures are handled.
    let (uaddr, len) = unsafe {
        (
            bpf_probe_read_kernel(base.add(SOCK_ADDR_KERN_UADDR) as *const u64).unwrap_or(0),
            bpf_probe_read_kernel(base.add(SOCK_ADDR_KERN_UADDRLEN) as *const u32).unwrap_or(0),
        )
    };
    // SAFETY: helpers without pointer arguments.
    let (pid_tgid, uid_gid, boot_ns) = unsafe {
        (
            current_pid_tgid(),
            bpf_get_current_uid_gid(),
            bpf_ktime_get_boot_ns(),
        )
    };
    let e = entry.as_mut_ptr();
    // SAFETY: `e` points at the reserved record, written field by field before submit.
    unsafe {
        (*e).event = Event {
            boot_ns,
            session,
            pid_tgid,
            uid_gid,
            addr: dest.addr,
            port: 0,
            hook,
            verdict,
            reason: REASON_UNIX_UNVETTED,
            proto: 0,
            family: dest.family,
            flags: 0,
            policy_gen: generation,
            comm: bpf_get_current_comm().unwrap_or([0; 16]),
            _pad2: [0; 4],
        };
        (*e).path_len = len.saturating_sub(2).min(108);
        (*e)._pad = 0;
        (*e).path = [0; 112];
        if uaddr != 0 {
            let path = &mut (*e).path;
            let _ = bpf_probe_read_kernel_buf((uaddr + 2) as *const u8, &mut path[..108]);
        }
    }
    entry.submit(BPF_RB_FORCE_WAKEUP as u64);
}

/// `cgroup/connect_unix` (Linux 6.7+). Written out by hand: aya-ebpf 0.2's macro knows no unix
/// attach types (the section is what the vendored aya-obj parses).
#[no_mangle]
#[link_section = "cgroup/connect_unix"]
pub fn egressd_connect_unix(ctx: *mut bpf_sock_addr) -> i32 {
    judge_unix(ctx, HOOK_CONNECT_UNIX)
}

/// `cgroup/sendmsg_unix` (Linux 6.7+): a datagram sent with a unix address.
#[no_mangle]
#[link_section = "cgroup/sendmsg_unix"]
pub fn egressd_sendmsg_unix(ctx: *mut bpf_sock_addr) -> i32 {
    judge_unix(ctx, HOOK_SENDMSG_UNIX)
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
    let sess = current_session();
    let info = sess.info();
    let generation = policy_generation();
    count(&sess, |c| &mut c.sockets_refused);
    let (ret, verdict) = match profile_for(info, generation) {
        Some((_, p)) if verdict::audit_only(p) => (ALLOW_VERDICT, VERDICT_AUDIT_DENIED),
        _ => (DENY_VERDICT, VERDICT_DENIED),
    };
    let dest = Dest {
        family: if sk.family == AF_INET6 { 6 } else { 4 },
        addr: [0; 16],
        port: 0,
        proto: proto as u8,
        _pad: 0,
    };
    report(
        &sess,
        &dest,
        HOOK_SOCK_CREATE,
        verdict,
        REASON_FORBIDDEN_SOCKET,
        generation,
        true,
    );
    ret
}

#[cgroup_skb(egress)]
pub fn egressd_skb_egress(ctx: SkBuffContext) -> i32 {
    // SAFETY: the context pointer is valid for the whole program run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: helper reads the skb's socket cgroup; the context is valid for the whole run.
    let ancestor = |level| unsafe { bpf_skb_ancestor_cgroup_id(ctx.skb.skb.cast(), level) };
    if ifindex == LOOPBACK_IFINDEX {
        note_dns_client(&ctx, ancestor);
        return ALLOW_VERDICT;
    }
    let sess = Session::of(session_level(ancestor).map_or(0, ancestor));
    let (session, info) = (sess.id, sess.info());
    let generation = policy_generation();
    let (slot, profile) = profile_for(info, generation).unwrap_or((u32::MAX, &NO_PROFILE));
    // A packet whose header cannot be read is nothing a socket hook could have allowed: drop it.
    let (dest, reason) = match verdict::packet_dest(&ctx) {
        Some(d) => {
            let decision = verdict::decide(&tables(), session, slot, profile, &d, true);
            if decision.allowed {
                return ALLOW_VERDICT;
            }
            (d, decision.reason)
        }
        None => (
            Dest {
                family: 0,
                addr: [0; 16],
                port: 0,
                proto: 0,
                _pad: 0,
            },
            REASON_DEFAULT_DENY,
        ),
    };
    count(&sess, |c| &mut c.backstop_dropped);
    let (ret, verdict) = if verdict::audit_only(profile) {
        (ALLOW_VERDICT, VERDICT_AUDIT_DENIED)
    } else {
        (DENY_VERDICT, VERDICT_DENIED)
    };
    // Softirq context is possible here (retransmits): no task fields.
    report(
        &sess,
        &dest,
        HOOK_SKB_EGRESS,
        verdict,
        reason,
        generation,
        false,
    );
    ret
}

/// Tells the resolver which session a query comes from: for a packet to the resolver's port on
/// loopback, the session of the socket that sent it (read here, from the packet's socket, so a
/// sandbox cannot claim another session's rights), with the origin its redirect recorded.
#[inline(always)]
fn note_dns_client(ctx: &SkBuffContext, ancestor: impl Fn(i32) -> u64) {
    let port = dns_port();
    if port == 0 {
        return;
    }
    let Some((key, dst_port)) = verdict::loopback_ports(ctx) else {
        return;
    };
    if dst_port != port {
        return;
    }
    let session = session_level(&ancestor).map_or(0, &ancestor);
    // SAFETY: the context is a valid skb for the whole run.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    // SAFETY: the value is plain old data copied out immediately.
    let mut origin = unsafe { DNS_ORIG.get(&cookie) }
        .copied()
        .unwrap_or_default();
    origin.session = session;
    let _ = DNS_PEERS.insert(&key, &origin, 0);
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 4] = *b"GPL\0";
