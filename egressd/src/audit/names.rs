//! Names for the kernel's numbers in audit records.

use egressd_common::{
    HOOK_BIND4, HOOK_BIND6, HOOK_CONNECT4, HOOK_CONNECT6, HOOK_CONNECT_UNIX,
    HOOK_LSM_SOCKET_CREATE, HOOK_SENDMSG4, HOOK_SENDMSG6, HOOK_SENDMSG_UNIX, HOOK_SKB_EGRESS,
    HOOK_SOCK_CREATE, REASON_ALLOW_RULE, REASON_BIND, REASON_DEFAULT_DENY, REASON_DNS_ANSWER,
    REASON_DNS_REDIRECT, REASON_FORBIDDEN_SOCKET, REASON_LOOPBACK, REASON_LOOPBACK_PORT,
    REASON_OFF_LOOPBACK, REASON_UNIX_UNVETTED,
};

/// The reason of the unix backstop's decisions (told apart from the supervisor's by it).
pub const UNVETTED: &str =
    "unix socket used without egressd's supervisor (io_uring, sendto with a unix address)";

pub fn comm(raw: &[u8; 16]) -> String {
    let end = raw.iter().position(|b| *b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

pub fn hook_name(h: u8) -> &'static str {
    match h {
        HOOK_CONNECT4 => "connect4",
        HOOK_CONNECT6 => "connect6",
        HOOK_SENDMSG4 => "sendmsg4",
        HOOK_SENDMSG6 => "sendmsg6",
        HOOK_SOCK_CREATE => "sock_create",
        HOOK_SKB_EGRESS => "skb_egress",
        HOOK_LSM_SOCKET_CREATE => "lsm_socket_create",
        HOOK_BIND4 => "bind4",
        HOOK_BIND6 => "bind6",
        HOOK_CONNECT_UNIX => "connect_unix",
        HOOK_SENDMSG_UNIX => "sendmsg_unix",
        _ => "unknown",
    }
}

pub fn reason_name(r: u8) -> &'static str {
    match r {
        REASON_LOOPBACK => "loopback",
        REASON_ALLOW_RULE => "allow rule",
        REASON_DEFAULT_DENY => "default deny",
        REASON_LOOPBACK_PORT => "loopback port not allowed",
        REASON_FORBIDDEN_SOCKET => "raw or ping socket",
        REASON_OFF_LOOPBACK => "loopback address off the lo device",
        REASON_DNS_REDIRECT => "dns query, answered by egressd's resolver",
        REASON_DNS_ANSWER => "address of an allowed name (dns_allow)",
        REASON_BIND => "bind to a non-loopback address",
        REASON_UNIX_UNVETTED => UNVETTED,
        _ => "unknown",
    }
}

pub fn proto_name(p: u8) -> String {
    match p {
        6 => "tcp".into(),
        17 => "udp".into(),
        1 => "icmp".into(),
        58 => "icmpv6".into(),
        n => format!("ip-proto-{n}"),
    }
}
