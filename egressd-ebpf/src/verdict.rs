//! The verdict for one destination under one profile, shared by every hook.

use aya_ebpf::{
    helpers::bpf_ktime_get_boot_ns,
    maps::{lpm_trie::Key, LpmTrie, LruHashMap},
    programs::SkBuffContext,
};
use egressd_common::{
    words, AllowKey, AllowValue, DnsAllowKey, DnsPeerKey, Profile, MAX_LOOPBACK_PORTS,
    MAX_PORT_RANGES, PROFILE_AUDIT_MODE, PROFILE_LOOPBACK_ALL, PROFILE_PRESENT, PROTO_ANY,
    REASON_ALLOW_RULE, REASON_DEFAULT_DENY, REASON_DNS_ANSWER, REASON_LOOPBACK,
    REASON_LOOPBACK_PORT, REASON_OFF_LOOPBACK,
};

/// A destination in IPv6 form: IPv4 is stored IPv4-mapped, so `::ffff:a.b.c.d` and `a.b.c.d` are
/// the same destination by construction. Word-aligned, with the address first, so that it is built,
/// tested and copied into map keys as two 64-bit words (see `egressd_common::words`).
#[derive(Clone, Copy)]
#[repr(C, align(8))]
pub struct Dest {
    pub addr: [u8; 16],
    pub port: u16,
    /// 4 or 6: the family of the hook or packet (the address is always stored as IPv6).
    pub family: u8,
    pub proto: u8,
    /// No implicit padding: the verifier refuses copies of uninitialised stack bytes.
    pub _pad: u32,
}

impl Dest {
    /// `ip` and `port` as the kernel hands them over in `bpf_sock_addr`: network byte order.
    #[inline(always)]
    pub fn v4(ip: u32, port: u32, proto: u32) -> Self {
        Dest {
            family: 4,
            addr: words::to_bytes(words::mapped4(ip)),
            port: u16::from_be(port as u16),
            proto: proto as u8,
            _pad: 0,
        }
    }

    /// The address as two words (byte 0 lowest).
    #[inline(always)]
    pub fn words(&self) -> [u64; 2] {
        words::of_bytes(self.addr)
    }

    #[inline(always)]
    pub fn v6(ip: [u32; 4], port: u32, proto: u32) -> Self {
        Dest {
            family: 6,
            addr: words::to_bytes(words::of_u32s(ip)),
            port: u16::from_be(port as u16),
            proto: proto as u8,
            _pad: 0,
        }
    }

    /// Loopback or unspecified: 127.0.0.0/8, 0.0.0.0, ::1, :: (the kernel delivers the last ones
    /// locally too). IPv4-mapped forms are covered because IPv4 is stored mapped.
    #[inline(always)]
    pub fn is_local(&self) -> bool {
        words::is_local(self.words())
    }
}

pub struct Decision {
    pub allowed: bool,
    pub reason: u8,
}

#[inline(always)]
pub fn audit_only(profile: &Profile) -> bool {
    profile.flags & PROFILE_PRESENT != 0 && profile.flags & PROFILE_AUDIT_MODE != 0
}

/// The maps a verdict reads besides the profile.
pub struct Tables<'a> {
    pub allow: &'a LpmTrie<AllowKey, AllowValue>,
    pub dns_allow: &'a LruHashMap<DnsAllowKey, u64>,
}

/// `on_wire` is set by the skb backstop: there a loopback address is never fine, because the packet
/// is already known to leave through a device other than `lo`.
#[inline(always)]
pub fn decide(
    tables: &Tables,
    session: u64,
    slot: u32,
    profile: &Profile,
    dest: &Dest,
    on_wire: bool,
) -> Decision {
    if dest.is_local() {
        if on_wire {
            return Decision {
                allowed: false,
                reason: REASON_OFF_LOOPBACK,
            };
        }
        return loopback(profile, dest.port);
    }
    if slot != u32::MAX {
        let key = Key::new(
            (4 + 16) * 8,
            AllowKey {
                slot: slot.to_be_bytes(),
                addr: dest.addr,
            },
        );
        if let Some(v) = tables.allow.get(&key) {
            if ranges_match(v, dest) {
                return Decision {
                    allowed: true,
                    reason: REASON_ALLOW_RULE,
                };
            }
        }
    }
    let key = DnsAllowKey {
        session,
        addr: dest.addr,
    };
    // SAFETY: the value is a plain u64 copied out immediately.
    if let Some(expiry) = unsafe { tables.dns_allow.get(&key) }.copied() {
        // SAFETY: helper without arguments.
        if expiry > unsafe { bpf_ktime_get_boot_ns() } {
            return Decision {
                allowed: true,
                reason: REASON_DNS_ANSWER,
            };
        }
    }
    Decision {
        allowed: false,
        reason: REASON_DEFAULT_DENY,
    }
}

#[inline(always)]
fn loopback(profile: &Profile, port: u16) -> Decision {
    // No profile (unknown session, removed profile) means the strictest policy: loopback only.
    if profile.flags & PROFILE_PRESENT == 0 || profile.flags & PROFILE_LOOPBACK_ALL != 0 {
        return Decision {
            allowed: true,
            reason: REASON_LOOPBACK,
        };
    }
    let n = profile.n_loopback_ports as usize;
    let mut i = 0;
    while i < MAX_LOOPBACK_PORTS {
        if i < n && profile.loopback_ports[i] == port {
            return Decision {
                allowed: true,
                reason: REASON_LOOPBACK,
            };
        }
        i += 1;
    }
    Decision {
        allowed: false,
        reason: REASON_LOOPBACK_PORT,
    }
}

#[inline(always)]
fn ranges_match(v: &AllowValue, dest: &Dest) -> bool {
    let n = v.n_ranges as usize;
    let mut i = 0;
    while i < MAX_PORT_RANGES {
        if i < n {
            let r = &v.ranges[i];
            if (r.proto == PROTO_ANY || r.proto == dest.proto)
                && r.lo <= dest.port
                && dest.port <= r.hi
            {
                return true;
            }
        }
        i += 1;
    }
    false
}

const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

/// Destination of an outgoing packet; `cgroup_skb` data starts at the network header.
#[inline(always)]
pub fn packet_dest(ctx: &SkBuffContext) -> Option<Dest> {
    let first: u8 = ctx.load(0).ok()?;
    match first >> 4 {
        4 => {
            let proto: u8 = ctx.load(9).ok()?;
            let dst: u32 = ctx.load(16).ok()?;
            let ihl = ((first & 0x0f) as usize) * 4;
            let port = l4_port(ctx, proto, ihl);
            Some(Dest {
                family: 4,
                addr: words::to_bytes(words::mapped4(dst)),
                port,
                proto,
                _pad: 0,
            })
        }
        6 => {
            let proto: u8 = ctx.load(6).ok()?;
            let addr: [u8; 16] = ctx.load(24).ok()?;
            let port = l4_port(ctx, proto, 40);
            Some(Dest {
                family: 6,
                addr,
                port,
                proto,
                _pad: 0,
            })
        }
        _ => None,
    }
}

/// Destination port of a TCP or UDP header at `offset`; 0 otherwise (matches no port-limited rule).
#[inline(always)]
fn l4_port(ctx: &SkBuffContext, proto: u8, offset: usize) -> u16 {
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP || offset > 60 {
        return 0;
    }
    ctx.load::<u16>(offset + 2).map(u16::from_be).unwrap_or(0)
}

/// For a TCP or UDP packet to 127.0.0.1 or ::1: the client's key as the resolver sees it (source
/// port, protocol, wire family) and the destination port. One load of the headers (every loopback
/// packet of a session passes here, so a helper call per field was most of the backstop's cost).
#[inline(always)]
pub fn loopback_ports(ctx: &SkBuffContext) -> Option<(DnsPeerKey, u16)> {
    let first: u8 = ctx.load(0).ok()?;
    let (family, proto, ports) = match first >> 4 {
        4 => {
            // The 20-byte header without options and the ports; with options, read them apart.
            let h: [u8; 24] = ctx.load(0).ok()?;
            if h[16..20] != [127, 0, 0, 1] {
                return None;
            }
            let ihl = ((first & 0x0f) as usize) * 4;
            let ports: [u8; 4] = if ihl == 20 {
                [h[20], h[21], h[22], h[23]]
            } else if ihl <= 60 {
                ctx.load(ihl).ok()?
            } else {
                return None;
            };
            (4u8, h[9], ports)
        }
        6 => {
            let h: [u8; 44] = ctx.load(0).ok()?;
            if h[24..40] != [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1] {
                return None;
            }
            (6u8, h[6], [h[40], h[41], h[42], h[43]])
        }
        _ => return None,
    };
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return None;
    }
    Some((
        DnsPeerKey {
            port: u16::from_be_bytes([ports[0], ports[1]]),
            proto,
            family,
        },
        u16::from_be_bytes([ports[2], ports[3]]),
    ))
}
