//! The DNS part of the policy: the `[dns]` table and the `dns_allow` name patterns of a profile.

use std::{
    format,
    net::{IpAddr, SocketAddr},
    string::String,
    vec::Vec,
};

use serde::{Deserialize, Serialize};

/// Default port of egressd's resolver on 127.0.0.1 and ::1 (below the ephemeral port range).
pub const DEFAULT_RESOLVER_PORT: u16 = 10053;

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DnsConfig {
    /// Redirect every DNS query of every sandbox to egressd's resolver (default true). When false,
    /// port 53 is judged like any other port, and the local stub resolver (on loopback) forwards
    /// any name off the machine.
    pub enabled: Option<bool>,
    /// Port of the resolver on 127.0.0.1 and ::1 (default 10053).
    pub port: Option<u16>,
    /// Servers allowed names are resolved through, `IP` or `IP:PORT` (`[IPv6]:PORT`); default:
    /// the `nameserver` lines of /etc/resolv.conf as the daemon reads them at start.
    pub upstream: Option<Vec<String>>,
    /// Answer to a name no pattern allows: "nxdomain" (default) or "refused".
    pub deny_answer: Option<DenyAnswer>,
    /// An allowed answer's addresses stay open for its TTL, but at least this long (default 5 s)...
    pub ttl_min_secs: Option<u32>,
    /// ...and at most this long (default 3600 s).
    pub ttl_max_secs: Option<u32>,
    /// How long to wait for an upstream answer (default 2000 ms); SERVFAIL after that.
    pub timeout_ms: Option<u64>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DenyAnswer {
    #[default]
    Nxdomain,
    Refused,
}

impl DnsConfig {
    pub fn enabled(&self) -> bool {
        self.enabled.unwrap_or(true)
    }
    pub fn port(&self) -> u16 {
        self.port.unwrap_or(DEFAULT_RESOLVER_PORT)
    }
    pub fn deny_answer(&self) -> DenyAnswer {
        self.deny_answer.unwrap_or_default()
    }
    pub fn ttl_bounds(&self) -> (u32, u32) {
        (
            self.ttl_min_secs.unwrap_or(5),
            self.ttl_max_secs.unwrap_or(3600),
        )
    }
    pub fn timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.timeout_ms.unwrap_or(2000))
    }

    /// The configured upstream servers, or those of `resolv_conf` (the text of /etc/resolv.conf).
    pub fn upstreams(&self, resolv_conf: &str) -> Result<Vec<SocketAddr>, String> {
        match &self.upstream {
            Some(list) => list.iter().map(|s| parse_server(s)).collect(),
            None => Ok(resolv_conf
                .lines()
                .filter_map(|l| {
                    let mut f = l.split_whitespace();
                    (f.next() == Some("nameserver")).then(|| f.next()).flatten()
                })
                .filter_map(|a| a.split('%').next()?.parse::<IpAddr>().ok())
                .map(|ip| SocketAddr::new(ip, 53))
                .collect()),
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.port() == 0 || self.port() == crate::DNS_PORT {
            return Err(format!(
                "dns.port = {}: pick a free port other than 0 and 53 (the default is {DEFAULT_RESOLVER_PORT})",
                self.port()
            ));
        }
        if let Some(list) = &self.upstream {
            for s in list {
                parse_server(s).map_err(|e| format!("dns.upstream: {e}"))?;
            }
        }
        let (lo, hi) = self.ttl_bounds();
        if lo > hi {
            return Err(format!(
                "dns.ttl_min_secs = {lo} is above dns.ttl_max_secs = {hi}"
            ));
        }
        Ok(())
    }
}

fn parse_server(s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    s.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, 53))
        .map_err(|_| format!("{s:?} is not an address: write IP, IP:PORT or [IPv6]:PORT"))
}

/// A name as compared: lower case, without the root's trailing dot.
pub fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// Checks one `dns_allow` pattern: `name.example` (that name only) or `*.example` (every name
/// under it, not `example` itself).
pub fn check_pattern(p: &str) -> Result<(), String> {
    let name = p.strip_prefix("*.").unwrap_or(p);
    let why = if name.is_empty() || name == "*" {
        Some(
            "a pattern must name a domain; \"*\" alone would let any name, and any data in it, out",
        )
    } else if name.contains('*') {
        Some("\"*\" may only stand first, as in \"*.corp.example\"")
    } else if name.len() > 253 {
        Some("longer than 253 characters")
    } else if name.trim_end_matches('.').split('.').any(|l| {
        l.is_empty()
            || l.len() > 63
            || !l
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    }) {
        Some("labels are 1 to 63 letters, digits, '-' or '_', separated by single dots")
    } else {
        None
    };
    match why {
        Some(w) => Err(format!("dns_allow pattern {p:?}: {w}")),
        None => Ok(()),
    }
}

/// Whether `name` matches one of `patterns` (both compared case-insensitively).
pub fn name_allowed(patterns: &[String], name: &str) -> bool {
    let name = normalize(name);
    patterns.iter().any(|p| {
        let p = normalize(p);
        match p.strip_prefix("*.") {
            Some(suffix) => name.len() > suffix.len() + 1 && name.ends_with(&format!(".{suffix}")),
            None => name == p,
        }
    })
}

/// A hosts file (/etc/hosts format), read once: each name's addresses, in the file's order.
/// (Looking a name up in the text on every query was 2% of the resolver's CPU.)
#[derive(Debug, Default)]
pub struct Hosts(std::collections::HashMap<String, Vec<IpAddr>>);

impl Hosts {
    pub fn parse(text: &str) -> Hosts {
        let mut names: std::collections::HashMap<String, Vec<IpAddr>> = Default::default();
        for line in text.lines() {
            let mut f = line.split('#').next().unwrap_or("").split_whitespace();
            let Some(Ok(ip)) = f.next().map(str::parse::<IpAddr>) else {
                continue;
            };
            for name in f.map(normalize) {
                let addrs = names.entry(name).or_default();
                // A name listed twice on one line has that line's address once.
                if addrs.last() != Some(&ip) {
                    addrs.push(ip);
                }
            }
        }
        Hosts(names)
    }

    /// The addresses of `name` (any case, with or without the final dot).
    pub fn lookup(&self, name: &str) -> &[IpAddr] {
        self.0.get(&normalize(name)).map_or(&[], Vec::as_slice)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{borrow::ToOwned, vec};

    #[test]
    fn patterns_match_exact_names_and_strict_subdomains() {
        let p = vec!["git.corp.example".to_owned(), "*.llm.internal".to_owned()];
        assert!(name_allowed(&p, "git.corp.example"));
        assert!(name_allowed(&p, "GIT.corp.example."));
        assert!(!name_allowed(&p, "x.git.corp.example"));
        assert!(!name_allowed(&p, "corp.example"));
        assert!(name_allowed(&p, "a.llm.internal"));
        assert!(name_allowed(&p, "b.a.llm.internal"));
        assert!(!name_allowed(&p, "llm.internal"));
        assert!(!name_allowed(&p, "evilllm.internal"));
        assert!(!name_allowed(&p, "llm.internal.evil"));
    }

    #[test]
    fn bad_patterns_are_refused_with_a_reason() {
        for bad in ["*", "*.", "", "a.*.b", "a..b", "exa mple.com", "*.*.x"] {
            assert!(check_pattern(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["x", "git.corp.example", "*.llm.internal", "_srv.example."] {
            check_pattern(good).unwrap();
        }
    }

    #[test]
    fn upstreams_come_from_config_or_resolv_conf() {
        let c = DnsConfig::default();
        let r = "# c\nnameserver 127.0.0.53\nnameserver fe80::1%eth0\nsearch x\n";
        assert_eq!(
            c.upstreams(r).unwrap(),
            vec![
                "127.0.0.53:53".parse().unwrap(),
                "[fe80::1]:53".parse().unwrap()
            ]
        );
        let c = DnsConfig {
            upstream: Some(vec!["198.18.3.2".into(), "[fd00::1]:5300".into()]),
            ..Default::default()
        };
        assert_eq!(
            c.upstreams(r).unwrap(),
            vec![
                "198.18.3.2:53".parse().unwrap(),
                "[fd00::1]:5300".parse().unwrap()
            ]
        );
        assert!(DnsConfig {
            upstream: Some(vec!["resolver.example".into()]),
            ..Default::default()
        }
        .validate()
        .is_err());
    }

    #[test]
    fn hosts_file_names_resolve_locally() {
        let hosts = Hosts::parse(
            "127.0.0.1 localhost\n::1 localhost ip6-localhost\n10.1.2.3 build.lan # x y\n\
             bad line\n10.9.9.9 twice TWICE\n10.1.2.4 build.lan\n",
        );
        let ips = |v: &[&str]| {
            v.iter()
                .map(|a| a.parse::<IpAddr>().unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(hosts.lookup("LOCALHOST."), ips(&["127.0.0.1", "::1"]));
        assert_eq!(hosts.lookup("build.lan"), ips(&["10.1.2.3", "10.1.2.4"]));
        assert_eq!(hosts.lookup("twice"), ips(&["10.9.9.9"]));
        for absent in ["x", "y", "line", "bad"] {
            assert!(hosts.lookup(absent).is_empty(), "{absent}");
        }
    }
}
