//! Types shared by the kernel programs (`egressd-ebpf`) and user space (`egressd`, `egressctl`).
//!
//! Everything here is `#[repr(C)]` with explicit padding, and every struct has a compile-time size
//! assertion: the kernel and user space read the same bytes, so a silent layout change would turn
//! into wrong verdicts rather than a build error.
#![no_std]

#[cfg(feature = "user")]
extern crate std;

#[cfg(feature = "user")]
pub mod audit;
#[cfg(feature = "user")]
pub mod dns_policy;
#[cfg(feature = "user")]
pub mod host;
#[cfg(feature = "user")]
pub mod layers;
#[cfg(feature = "man")]
pub mod man;
#[cfg(feature = "user")]
pub mod policy;
#[cfg(all(test, feature = "user"))]
mod policy_man_page;
#[cfg(feature = "user")]
pub mod prog_query;
#[cfg(feature = "user")]
pub mod protocol;
#[cfg(feature = "user")]
pub mod seal;
pub mod words;

/// Names of the maps in the eBPF object. The eBPF crate names its statics exactly like this; a test in
/// `egressd` parses the built object and checks each name exists, so the two cannot drift apart.
pub mod maps {
    /// `HashMap<u64 session cgroup id, SessionInfo>`: which cgroups are sessions, and their profile slot.
    pub const SESSIONS: &str = "SESSIONS";
    /// `Array<Profile>`: per-profile flags and loopback ports, indexed by `policy_slot()`.
    pub const PROFILES: &str = "PROFILES";
    /// `LpmTrie<AllowKey, AllowValue>`: allowed non-loopback destinations per profile slot.
    pub const ALLOW: &str = "ALLOW";
    /// `Array<u32>` with one element: which half of the double-buffered policy is in force.
    pub const POLICY_GEN: &str = "POLICY_GEN";
    /// `PerCpuHashMap<u64 session cgroup id, Counters>`: verdict counters of sessions registered
    /// without a `SESSION_COUNTERS` slot (by an egressd before it, still running after an upgrade).
    pub const COUNTERS: &str = "COUNTERS";
    /// `PerCpuArray<Counters>` indexed by `SessionInfo::counters`: verdict counters per session. An
    /// array, because the kernel inlines its lookup: a hash lookup fewer on every verdict.
    pub const SESSION_COUNTERS: &str = "SESSION_COUNTERS";
    /// `RingBuf` of `Event`s: every verdict, for the audit log.
    pub const EVENTS: &str = "EVENTS";
    /// `LruHashMap<u64 socket cookie, DnsOrigin>`: where a redirected DNS socket really sent its
    /// query, so `recvmsg` can give the answer that source back.
    pub const DNS_ORIG: &str = "DNS_ORIG";
    /// `LruHashMap<DnsPeerKey, DnsOrigin>`: who sent the packets that arrive at egressd's resolver,
    /// keyed by the client's source port, written by the backstop as they leave the sandbox.
    pub const DNS_PEERS: &str = "DNS_PEERS";
    /// `LruHashMap<DnsAllowKey, u64 expiry>`: addresses a session may reach because an allowed name
    /// resolved to them, until CLOCK_BOOTTIME passes the expiry (ns).
    pub const DNS_ALLOW: &str = "DNS_ALLOW";
    /// `PerCpuHashMap<FoldKey, FoldValue>`: decisions that repeat, counted in the kernel. The first
    /// occurrence of a key goes through `EVENTS` at once; the repeats only add to this CPU's count,
    /// and egressd writes them as one record per fold window with their exact count.
    pub const FOLDS: &str = "FOLDS";
    /// `HashMap<FoldKey, u64>`, written by egressd only: the repeats of each key already in the log
    /// (or counted lost). Pinned with `FOLDS`, so a restarted egressd neither repeats nor skips them.
    pub const FOLD_REPORTED: &str = "FOLD_REPORTED";
    /// All map names, for checks that walk them.
    pub const ALL: [&str; 12] = [
        SESSIONS,
        PROFILES,
        ALLOW,
        POLICY_GEN,
        COUNTERS,
        SESSION_COUNTERS,
        EVENTS,
        DNS_ORIG,
        DNS_PEERS,
        DNS_ALLOW,
        FOLDS,
        FOLD_REPORTED,
    ];
}

/// Names of the programs in the eBPF object, and the globals user space sets at load time.
pub mod programs {
    pub const CONNECT4: &str = "egressd_connect4";
    pub const CONNECT6: &str = "egressd_connect6";
    pub const SENDMSG4: &str = "egressd_sendmsg4";
    pub const SENDMSG6: &str = "egressd_sendmsg6";
    pub const RECVMSG4: &str = "egressd_recvmsg4";
    pub const RECVMSG6: &str = "egressd_recvmsg6";
    pub const BIND4: &str = "egressd_bind4";
    pub const BIND6: &str = "egressd_bind6";
    /// BPF LSM programs: global, they find the session from the calling task's cgroup.
    pub const LSM_SOCKET_CREATE: &str = "egressd_lsm_socket_create";
    pub const SOCK_CREATE: &str = "egressd_sock_create";
    pub const SKB_EGRESS: &str = "egressd_skb_egress";
    pub const CONNECT_UNIX: &str = "egressd_connect_unix";
    pub const SENDMSG_UNIX: &str = "egressd_sendmsg_unix";
    /// Global: the port of egressd's resolver on 127.0.0.1 and ::1 (0: DNS is not redirected).
    pub const GLOBAL_DNS_PORT: &str = "DNS_PORT";
    /// Global: the cgroup id of the parent of every session. The programs find the level of
    /// session cgroups by meeting it among a cgroup's ancestors, and the LSM layer, which runs
    /// for every task on the machine, tells sessions from other tasks by it.
    pub const GLOBAL_PARENT_ID: &str = "PARENT_ID";
    /// Globals: device and inode of egressd's pid namespace, 0 in the initial one.
    pub const GLOBAL_PIDNS_DEV: &str = "PIDNS_DEV";
    pub const GLOBAL_PIDNS_INO: &str = "PIDNS_INO";
    /// Global: 1 when repeated decisions are counted in the kernel (`FOLDS`), 0 when every decision
    /// is an event of its own (`fold_window_ms = 0`).
    pub const GLOBAL_FOLD: &str = "FOLD";
}

/// Sizes of the maps. Profiles are double-buffered: slot = generation * MAX_PROFILES + profile index.
pub const MAX_PROFILES: u32 = 64;
pub const MAX_SESSIONS: u32 = 4096;
/// Both halves of the double-buffered policy share the trie: a policy may use half of it.
pub const MAX_ALLOW_ENTRIES: u32 = 65536;
pub const MAX_LOOPBACK_PORTS: usize = 16;
pub const MAX_PORT_RANGES: usize = 8;
pub const MAX_DNS_SOCKETS: u32 = 16384;
pub const MAX_DNS_ALLOW: u32 = 65536;
/// Keys of `FOLDS` and `FOLD_REPORTED`. When it is full, a new key's decisions are each an event of
/// their own again: slower, never inexact. `FOLDS` is preallocated with a value per CPU, so on large
/// machines it holds fewer keys: see `fold_entries`.
pub const MAX_FOLDS: u32 = 16384;

/// Keys of `FOLDS` on a machine with `cpus` possible CPUs: at most `MAX_FOLDS`, and at most 256k
/// per-CPU values in all (about 14 MiB of kernel memory), but never fewer than 1024 keys.
pub const fn fold_entries(cpus: u32) -> u32 {
    let by_memory = (256 * 1024) / if cpus == 0 { 1 } else { cpus };
    let n = if by_memory < MAX_FOLDS {
        by_memory
    } else {
        MAX_FOLDS
    };
    if n < 1024 {
        1024
    } else {
        n
    }
}
/// The port every DNS query is redirected from, whatever its destination address.
pub const DNS_PORT: u16 = 53;

/// Index into `PROFILES` and the profile part of an `AllowKey` for a profile under a policy generation.
#[inline(always)]
pub const fn policy_slot(generation: u32, profile: u32) -> u32 {
    (generation & 1) * MAX_PROFILES + (profile % MAX_PROFILES)
}

/// The value of `SESSIONS`: a session cgroup and the profile it runs under.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SessionInfo {
    /// Stable profile index (the slot's low part); survives reloads.
    pub profile: u32,
    /// The session's index in `SESSION_COUNTERS` (1..=MAX_SESSIONS); 0 for a session counted in
    /// `COUNTERS` by its cgroup id.
    pub counters: u32,
}
const _: () = assert!(core::mem::size_of::<SessionInfo>() == 8);

/// Profile flag: log verdicts but block nothing.
pub const PROFILE_AUDIT_MODE: u32 = 1 << 0;
/// Profile flag: every loopback port is allowed (otherwise only `loopback_ports`).
pub const PROFILE_LOOPBACK_ALL: u32 = 1 << 1;
/// Profile flag: the slot holds a real profile. An empty slot (all zero) means loopback-only... with no
/// ports, i.e. the strictest policy, which is what a session whose profile vanished must get.
pub const PROFILE_PRESENT: u32 = 1 << 2;

/// Profile flag: sandbox sockets may bind any address (otherwise only loopback; 0.0.0.0 and :: are
/// bound as 127.0.0.1 and ::1, so no outside peer can connect in).
pub const PROFILE_BIND_ANY: u32 = 1 << 3;
/// `unix = "open"`: unix sockets of the session are not confined to the session (the old
/// behaviour; named an open way in the README).
pub const PROFILE_UNIX_OPEN: u32 = 1 << 4;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Profile {
    pub flags: u32,
    pub n_loopback_ports: u32,
    pub loopback_ports: [u16; MAX_LOOPBACK_PORTS],
    /// Bit N set: sockets of address family N may be created (checked by the LSM layer).
    pub families: u64,
}
const _: () = assert!(core::mem::size_of::<Profile>() == 48);

/// Families a session without a profile (or with the default list) may create sockets of:
/// unix, inet, inet6, netlink.
pub const DEFAULT_FAMILIES: u64 = (1 << 1) | (1 << 2) | (1 << 10) | (1 << 16);

/// The data part of an LPM key (aya adds the prefix length in front). IPv4 is stored as IPv4-mapped
/// IPv6 (`::ffff:a.b.c.d`) so one trie serves both families and a mapped address is judged as IPv4.
/// The prefix length always covers the 32 bits of `slot`, so entries of different profiles never match.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct AllowKey {
    /// Big-endian profile slot, so LPM's bit order matches it first.
    pub slot: [u8; 4],
    pub addr: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<AllowKey>() == 20);

pub const PROTO_ANY: u8 = 0;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortRange {
    /// Inclusive; `0..=65535` means every port.
    pub lo: u16,
    pub hi: u16,
    /// `PROTO_ANY`, `PROTO_TCP` or `PROTO_UDP`.
    pub proto: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<PortRange>() == 8);

/// The value of `ALLOW`: the port ranges allowed for destinations under this prefix. User space folds
/// every less specific rule that covers the prefix into it, because LPM returns only the longest match.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllowValue {
    pub n_ranges: u32,
    /// Index of the first rule (in the profile's `allow` list) that contributed, for audit reasons.
    pub rule: u32,
    pub ranges: [PortRange; MAX_PORT_RANGES],
}
const _: () = assert!(core::mem::size_of::<AllowValue>() == 72);

/// Per-CPU verdict counters of one session.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(serde::Serialize, serde::Deserialize))]
pub struct Counters {
    pub allowed: u64,
    pub denied: u64,
    /// Packets the `cgroup_skb/egress` backstop dropped (a socket hook should have caught them first).
    pub backstop_dropped: u64,
    /// Sockets refused at creation (raw, ICMP ping).
    pub sockets_refused: u64,
    /// Audit events that found the ring buffer full: counted here, written to the log as `lost`.
    pub events_lost: u64,
}
const _: () = assert!(core::mem::size_of::<Counters>() == 40);

impl Counters {
    pub fn add(&mut self, other: &Counters) {
        self.allowed += other.allowed;
        self.denied += other.denied;
        self.backstop_dropped += other.backstop_dropped;
        self.sockets_refused += other.sockets_refused;
        self.events_lost += other.events_lost;
    }
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: all of these are repr(C), Copy, and have no implicit padding (checked by the size asserts).
    unsafe impl aya::Pod for SessionInfo {}
    unsafe impl aya::Pod for Profile {}
    unsafe impl aya::Pod for AllowKey {}
    unsafe impl aya::Pod for AllowValue {}
    unsafe impl aya::Pod for Counters {}
    unsafe impl aya::Pod for Event {}
    unsafe impl aya::Pod for UnixEvent {}
    unsafe impl aya::Pod for DnsOrigin {}
    unsafe impl aya::Pod for DnsPeerKey {}
    unsafe impl aya::Pod for DnsAllowKey {}
    unsafe impl aya::Pod for FoldKey {}
    unsafe impl aya::Pod for FoldValue {}
}

/// Why a verdict was reached; carried in audit events and shown to users.
pub const REASON_LOOPBACK: u8 = 1;
pub const REASON_ALLOW_RULE: u8 = 2;
pub const REASON_DEFAULT_DENY: u8 = 3;
pub const REASON_LOOPBACK_PORT: u8 = 4;
pub const REASON_FORBIDDEN_SOCKET: u8 = 5;
/// A DNS query (port 53) sent to egressd's resolver instead of where it was addressed.
pub const REASON_DNS_REDIRECT: u8 = 7;
/// The destination is an address an allowed name resolved to, within its TTL.
pub const REASON_DNS_ANSWER: u8 = 8;
/// A socket of an address family the profile does not list (the family is in the event's `port`).
pub const REASON_FAMILY: u8 = 9;
/// A bind to a non-loopback address.
pub const REASON_BIND: u8 = 10;
/// A unix-socket connect or addressed send that did not come through egressd's unix supervisor
/// (io_uring, a datagram `sendto` with an address, a raced address): refused in the kernel.
pub const REASON_UNIX_UNVETTED: u8 = 11;

/// Default size of the `EVENTS` ring buffer (bytes; a power of two, a multiple of the page size).
pub const DEFAULT_RING_BYTES: u32 = 1 << 20;

/// Which hook decided.
pub const HOOK_CONNECT4: u8 = 1;
pub const HOOK_CONNECT6: u8 = 2;
pub const HOOK_SENDMSG4: u8 = 3;
pub const HOOK_SENDMSG6: u8 = 4;
pub const HOOK_SOCK_CREATE: u8 = 5;
pub const HOOK_SKB_EGRESS: u8 = 6;
pub const HOOK_LSM_SOCKET_CREATE: u8 = 7;
pub const HOOK_BIND4: u8 = 8;
pub const HOOK_BIND6: u8 = 9;
pub const HOOK_CONNECT_UNIX: u8 = 10;
pub const HOOK_SENDMSG_UNIX: u8 = 11;

pub const VERDICT_ALLOWED: u8 = 1;
pub const VERDICT_DENIED: u8 = 2;
/// Audit mode: the policy would deny, the packet was let through.
pub const VERDICT_AUDIT_DENIED: u8 = 3;
/// A DNS query sent to egressd's resolver, which decides on the name.
pub const VERDICT_REDIRECTED: u8 = 4;

/// One decision, as the kernel reports it through `EVENTS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// CLOCK_BOOTTIME in ns (`bpf_ktime_get_boot_ns`), converted to wall time by user space.
    pub boot_ns: u64,
    /// Session cgroup id.
    pub session: u64,
    /// `bpf_get_current_pid_tgid`: tgid in the high half, thread id in the low. 0 for the backstop.
    pub pid_tgid: u64,
    /// `bpf_get_current_uid_gid`: gid high, uid low.
    pub uid_gid: u64,
    /// Destination, IPv4 as IPv4-mapped IPv6 (family says which).
    pub addr: [u8; 16],
    pub port: u16,
    pub hook: u8,
    pub verdict: u8,
    pub reason: u8,
    /// IPPROTO_TCP/UDP/ICMP...; for sock_create, the refused socket's protocol.
    pub proto: u8,
    /// 4 or 6.
    pub family: u8,
    /// `EVENT_FOLDED` or 0.
    pub flags: u8,
    /// Policy generation in force when the decision was taken.
    pub policy_gen: u32,
    pub comm: [u8; 16],
    pub _pad2: [u8; 4],
}
const _: () = assert!(core::mem::size_of::<Event>() == 80);

/// `Event::flags`: this is the first occurrence of its `FoldKey`, which is now in `FOLDS`; the
/// repeats are counted there, not sent as events.
pub const EVENT_FOLDED: u8 = 1;

/// A decision that repeats: the same session, process (tgid), hook, destination and verdict.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FoldKey {
    pub session: u64,
    /// 0 for the backstop (softirq, no task).
    pub tgid: u32,
    /// Host byte order (for a refused socket family: the family).
    pub port: u16,
    pub hook: u8,
    pub verdict: u8,
    /// IPv4 as IPv4-mapped IPv6, like `Event::addr`.
    pub addr: [u8; 16],
    pub reason: u8,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 5],
}
const _: () = assert!(core::mem::size_of::<FoldKey>() == 40);

impl FoldKey {
    /// The key of an event: what user space and the kernel fold on.
    pub const fn of(ev: &Event) -> FoldKey {
        FoldKey {
            session: ev.session,
            tgid: (ev.pid_tgid >> 32) as u32,
            port: ev.port,
            hook: ev.hook,
            verdict: ev.verdict,
            addr: ev.addr,
            reason: ev.reason,
            proto: ev.proto,
            family: ev.family,
            _pad: [0; 5],
        }
    }
}

/// One CPU's part of a `FOLDS` entry. The CPU that inserted the key also holds the first
/// occurrence's task fields (the other CPUs' are zero), so a restarted egressd can still name the
/// process of a repeat it never saw the first event of.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FoldValue {
    /// Repeats counted on this CPU (the first occurrence, sent as an event, is not among them).
    pub count: u64,
    /// CLOCK_MONOTONIC_COARSE (ns) of this CPU's latest repeat, or of the first occurrence on the
    /// CPU that inserted the key (user space adds the boot clock's offset to date it).
    pub last_ns: u64,
    pub pid_tgid: u64,
    pub uid_gid: u64,
    pub comm: [u8; 16],
    pub policy_gen: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<FoldValue>() == 56);
/// A decision of the unix backstop: the event, and the address the task gave (read from the
/// kernel's copy of it), which the 16 address bytes of `Event` cannot hold.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnixEvent {
    pub event: Event,
    /// Bytes of `path` the address held (its length less the family).
    pub path_len: u32,
    pub _pad: u32,
    /// `sun_path`: a path, or a NUL and an abstract name.
    pub path: [u8; 112],
}
const _: () = assert!(core::mem::size_of::<UnixEvent>() == 200);

/// Offsets in the kernel's `struct bpf_sock_addr_kern` (Linux 6.7+), the context a sock_addr
/// program really runs on: `uaddr` (the kernel's copy of the address) and `uaddrlen`.
pub const SOCK_ADDR_KERN_UADDR: usize = 8;
pub const SOCK_ADDR_KERN_UADDRLEN: usize = 32;

/// A loopback address in a packet leaving through a device other than `lo` (source routing, DNAT).
pub const REASON_OFF_LOOPBACK: u8 = 6;

/// Where a redirected DNS query was addressed, and who sent it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DnsOrigin {
    /// Session cgroup id (in `DNS_PEERS`: of the socket the packet came from, read by the backstop).
    pub session: u64,
    pub pid_tgid: u64,
    pub uid_gid: u64,
    /// The address the query was sent to: `user_ip6` as given, or IPv4 stored IPv4-mapped.
    pub addr: [u8; 16],
    /// Host byte order.
    pub port: u16,
    /// 4 or 6: the hook's family (how to write `addr` back).
    pub family: u8,
    pub proto: u8,
    /// 1 when the origin was recorded by a redirect; 0 when the packet came to the resolver directly.
    pub redirected: u8,
    pub _pad: [u8; 3],
    pub comm: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<DnsOrigin>() == 64);

/// A client of the resolver as the resolver sees it: its source port, protocol and wire family.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DnsPeerKey {
    /// Host byte order.
    pub port: u16,
    pub proto: u8,
    pub family: u8,
}
const _: () = assert!(core::mem::size_of::<DnsPeerKey>() == 4);

/// An address a session may reach because of a DNS answer (IPv4 stored IPv4-mapped).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DnsAllowKey {
    pub session: u64,
    pub addr: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<DnsAllowKey>() == 24);
