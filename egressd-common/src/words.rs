//! Addresses and fold keys as 64-bit words, for the kernel programs' hot path. Built byte by byte,
//! LLVM's BPF backend fills the gaps of a struct with calls to a byte-loop `memset` (a twentieth of
//! a verdict's cost); as words they are a handful of register moves. Kept here, next to the layouts
//! they depend on, so that the host's tests check them against the byte forms.
//!
//! Little-endian only (the BPF programs are built for `bpfel`): byte 0 of an address is the low
//! byte of word 0.

use crate::FoldKey;

const _: () = assert!(cfg!(target_endian = "little"));

/// `::ffff:a.b.c.d` for an IPv4 address as the kernel hands it over (network order read as a native
/// u32), as two words.
#[inline(always)]
pub const fn mapped4(ip: u32) -> [u64; 2] {
    [0, 0xffff_u64 << 16 | (ip as u64) << 32]
}

/// 127.0.0.0/8, 0.0.0.0 (IPv4-mapped), ::1 or ::, for an address as two words.
#[inline(always)]
pub const fn is_local(w: [u64; 2]) -> bool {
    let [hi, lo] = w;
    // Bytes 0-9 zero.
    if hi != 0 || lo & 0xffff != 0 {
        return false;
    }
    if (lo >> 16) & 0xffff == 0xffff {
        let v4 = lo >> 32;
        return v4 & 0xff == 127 || v4 == 0;
    }
    // Bytes 10-14 zero, byte 15 0 or 1.
    lo >> 16 == 0 || lo >> 16 == 1 << 40
}

/// An IPv6 address as the kernel hands it over (four words in network order, each read as a native
/// u32), as two words.
#[inline(always)]
pub const fn of_u32s(ip: [u32; 4]) -> [u64; 2] {
    [
        ip[0] as u64 | (ip[1] as u64) << 32,
        ip[2] as u64 | (ip[3] as u64) << 32,
    ]
}

/// The bytes of an address as two words.
#[inline(always)]
pub const fn of_bytes(addr: [u8; 16]) -> [u64; 2] {
    // SAFETY: 16 plain bytes reinterpreted as two words.
    unsafe { core::mem::transmute::<[u8; 16], [u64; 2]>(addr) }
}

/// Two words as the bytes of an address.
#[inline(always)]
pub const fn to_bytes(w: [u64; 2]) -> [u8; 16] {
    // SAFETY: two plain words reinterpreted as 16 bytes.
    unsafe { core::mem::transmute::<[u64; 2], [u8; 16]>(w) }
}

impl FoldKey {
    /// The key built as five words (see the module's doc); equal to the struct built field by
    /// field.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    pub const fn pack(
        session: u64,
        tgid: u32,
        port: u16,
        hook: u8,
        verdict: u8,
        addr: [u64; 2],
        reason: u8,
        proto: u8,
        family: u8,
    ) -> FoldKey {
        let w = [
            session,
            tgid as u64 | (port as u64) << 32 | (hook as u64) << 48 | (verdict as u64) << 56,
            addr[0],
            addr[1],
            reason as u64 | (proto as u64) << 8 | (family as u64) << 16,
        ];
        // SAFETY: FoldKey is repr(C), 40 bytes of integer fields with no padding the words do not
        // fill (checked against the field-by-field form in the tests).
        unsafe { core::mem::transmute::<[u64; 5], FoldKey>(w) }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn v4(s: &str) -> [u64; 2] {
        let ip: Ipv4Addr = s.parse().unwrap();
        mapped4(u32::from_ne_bytes(ip.octets()))
    }

    fn v6(s: &str) -> [u64; 2] {
        of_bytes(s.parse::<Ipv6Addr>().unwrap().octets())
    }

    #[test]
    fn mapped4_is_the_ipv4_mapped_address() {
        for s in [
            "0.0.0.0",
            "127.0.0.1",
            "198.18.0.1",
            "255.255.255.255",
            "1.2.3.4",
        ] {
            let want = s.parse::<Ipv4Addr>().unwrap().to_ipv6_mapped().octets();
            assert_eq!(to_bytes(v4(s)), want, "{s}");
        }
    }

    #[test]
    fn the_kernel_s_ipv6_words_are_the_address() {
        let a: Ipv6Addr = "2001:db8:1:2:3:4:5:6".parse().unwrap();
        let o = a.octets();
        let ip: [u32; 4] = core::array::from_fn(|i| {
            u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
        });
        assert_eq!(to_bytes(of_u32s(ip)), o);
    }

    #[test]
    fn local_is_loopback_or_unspecified_in_either_family() {
        for s in ["127.0.0.1", "127.255.0.9", "0.0.0.0"] {
            assert!(is_local(v4(s)), "{s}");
        }
        for s in ["::1", "::", "::ffff:127.0.0.1", "::ffff:0.0.0.0"] {
            assert!(is_local(v6(s)), "{s}");
        }
        for s in [
            "128.0.0.1",
            "10.0.0.127",
            "198.18.0.1",
            "0.0.0.1",
            "1.0.0.127",
        ] {
            assert!(!is_local(v4(s)), "{s}");
        }
        for s in [
            "::2",
            "::100",
            "::1:1",
            "::1:0:0:1",
            "1::1",
            "fe80::1",
            "::fffe:7f00:1",
            "::7fff:7f00:1",
            "::ffff:1:7f00:1",
            "2001:db8::1",
            "::127.0.0.1",
        ] {
            assert!(!is_local(v6(s)), "{s}");
        }
    }

    #[test]
    fn a_packed_fold_key_equals_the_key_built_field_by_field() {
        let addr = "2001:db8::ffff:1".parse::<Ipv6Addr>().unwrap().octets();
        let want = FoldKey {
            session: 0x0102_0304_0506_0708,
            tgid: 0xa1b2_c3d4,
            port: 0xbeef,
            hook: 0x11,
            verdict: 0x22,
            addr,
            reason: 0x33,
            proto: 0x44,
            family: 0x55,
            _pad: [0; 5],
        };
        let got = FoldKey::pack(
            want.session,
            want.tgid,
            want.port,
            want.hook,
            want.verdict,
            of_bytes(addr),
            want.reason,
            want.proto,
            want.family,
        );
        assert_eq!(got, want);
    }
}
