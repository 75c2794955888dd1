//! egressd's resolver: the kernel redirects every DNS query of every sandbox here. Names the
//! session's profile allows (`dns_allow`) are resolved upstream and their addresses opened for the
//! session until the TTL ends; `localhost` and /etc/hosts names are answered here; every other name
//! is answered NXDOMAIN (or REFUSED) and never leaves the machine. Every query is audited.

mod cache;
mod listen;
mod upstream;
mod wire;

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use egressd_common::{
    audit::Record,
    dns_policy::{self, DenyAnswer, DnsConfig},
    policy::Mode,
    DnsAllowKey, DnsOrigin, DnsPeerKey,
};
use hickory_proto::op::ResponseCode;
use nix::time::{clock_gettime, ClockId};

pub use listen::bind;

use crate::{audit, daemon::State, enforcer::DnsMaps};

/// What the resolver reads from the policy: fixed at start, like the port and upstreams.
pub struct Settings {
    pub upstreams: Vec<SocketAddr>,
    pub deny: DenyAnswer,
    pub ttl_min: u32,
    pub ttl_max: u32,
    pub timeout: Duration,
}

impl Settings {
    pub fn from_config(c: &DnsConfig) -> Result<Settings, String> {
        let resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        let (ttl_min, ttl_max) = c.ttl_bounds();
        Ok(Settings {
            upstreams: c.upstreams(&resolv)?,
            deny: c.deny_answer(),
            ttl_min,
            ttl_max,
            timeout: c.timeout(),
        })
    }
}

pub struct Resolver {
    state: Arc<State>,
    maps: Mutex<Maps>,
    settings: Settings,
    /// Bounds the upstream queries in flight: a sandbox flooding allowed names gets SERVFAIL, not
    /// a daemon out of sockets.
    inflight: tokio::sync::Semaphore,
    /// /etc/hosts: when its mtime was last looked at, the mtime, and its names, read again only
    /// when the mtime changes.
    hosts: Mutex<HostsFile>,
    /// Upstream sockets, kept between queries.
    pool: upstream::Pool,
    /// Upstream answers, kept for their TTL.
    cache: cache::Cache,
    /// Repeated queries, counted rather than each written (the audit task writes their counts).
    folds: audit::DnsFolds,
}

const MAX_INFLIGHT: usize = 256;

/// The kernel's DNS maps, and what this resolver wrote into `DNS_ALLOW`.
struct Maps {
    kernel: DnsMaps,
    /// The expiry of each `DNS_ALLOW` entry as last written here, so that an answer asked again
    /// (from the cache) costs no lookup in the kernel to learn it is open already. Trusted only
    /// while the map is far from full: `DNS_ALLOW` is an LRU map, which drops entries only then.
    opened: HashMap<DnsAllowKey, u64>,
    /// Entries in `DNS_ALLOW` at the last sweep (those of an earlier egressd included).
    kernel_len: usize,
}

impl Maps {
    /// Up to this many entries, the LRU map drops none (its free lists are per CPU, so it may
    /// drop some before it is quite full).
    const TRUSTED: usize = egressd_common::MAX_DNS_ALLOW as usize / 4;

    /// When `key` expires in the kernel (0: not open).
    fn expiry(&mut self, key: &DnsAllowKey) -> u64 {
        let trusted = self.kernel_len.max(self.opened.len()) < Self::TRUSTED;
        if trusted {
            if let Some(e) = self.opened.get(key) {
                return *e;
            }
        }
        let e = self.kernel.allow.get(key, 0).unwrap_or(0);
        if trusted && e != 0 {
            // An entry an earlier egressd wrote.
            self.opened.insert(*key, e);
        }
        e
    }
}

/// The decision on one query, as audited.
struct Outcome {
    answer: Vec<u8>,
    verdict: &'static str,
    reason: String,
    rcode: ResponseCode,
    opened: Vec<String>,
    ttl: Option<u32>,
}

fn boot_ns() -> u64 {
    clock_gettime(ClockId::CLOCK_BOOTTIME)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

fn mapped(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

impl Resolver {
    pub fn new(
        state: Arc<State>,
        maps: DnsMaps,
        settings: Settings,
        folds: audit::DnsFolds,
    ) -> Resolver {
        Resolver {
            folds,
            state,
            maps: Mutex::new(Maps {
                // What an earlier egressd left open counts until the first sweep.
                kernel_len: maps.allow.keys().count(),
                kernel: maps,
                opened: HashMap::new(),
            }),
            settings,
            inflight: tokio::sync::Semaphore::new(MAX_INFLIGHT),
            hosts: Mutex::new(HostsFile::default()),
            pool: upstream::Pool::default(),
            cache: cache::Cache::default(),
        }
    }

    /// Who sent the query arriving from `peer`, as the kernel's backstop recorded it.
    fn origin(&self, peer: SocketAddr, proto: u8) -> Option<DnsOrigin> {
        let key = DnsPeerKey {
            port: peer.port(),
            proto,
            family: if peer.is_ipv4() { 4 } else { 6 },
        };
        let maps = self.maps.lock().ok()?;
        maps.kernel.peers.get(&key, 0).ok()
    }

    /// Opens `addrs` to the session until their TTL (bounded by the config) runs out. Returns the
    /// longest TTL applied.
    fn open(&self, session: u64, addrs: &[(IpAddr, u32)], from_cache: bool) -> u32 {
        let now = boot_ns();
        let mut longest = 0;
        let Ok(mut maps) = self.maps.lock() else {
            return 0;
        };
        for (ip, ttl) in addrs {
            let ttl = (*ttl).clamp(self.settings.ttl_min, self.settings.ttl_max);
            longest = longest.max(ttl);
            let key = DnsAllowKey {
                session,
                addr: mapped(*ip),
            };
            let expiry = now + u64::from(ttl) * 1_000_000_000;
            let current = maps.expiry(&key);
            // An entry that lasts as long is left as it is. A cached answer's TTLs are counted
            // down in whole seconds, so its expiry comes out up to a second past the one its
            // first asking wrote: within that second it opens nothing longer (and costs no write).
            let slack = if from_cache { 1_000_000_000 } else { 0 };
            if current.saturating_add(slack) >= expiry {
                continue;
            }
            match maps.kernel.allow.insert(key, expiry, 0) {
                Ok(()) => {
                    maps.opened.insert(key, expiry);
                }
                Err(e) => {
                    maps.opened.remove(&key);
                    tracing::warn!(%ip, "dns: opening an answer's address: {e}; connections to it stay denied");
                }
            }
        }
        longest
    }

    /// Forgets opened addresses whose TTL has run out.
    pub fn sweep(&self) {
        let now = boot_ns();
        let Ok(mut maps) = self.maps.lock() else {
            return;
        };
        let mut seen = 0;
        let expired: Vec<DnsAllowKey> = maps
            .kernel
            .allow
            .iter()
            .filter_map(|r| r.ok())
            .filter(|(_, expiry)| {
                seen += 1;
                *expiry <= now
            })
            .map(|(k, _)| k)
            .collect();
        maps.kernel_len = seen - expired.len();
        for k in expired {
            let _ = maps.kernel.allow.remove(&k);
        }
        maps.opened.retain(|_, expiry| *expiry > now);
    }

    /// Answers one query from `peer` (`proto` 6 or 17); `None` when there is nothing to answer.
    pub async fn answer(&self, query: &[u8], peer: SocketAddr, proto: u8) -> Option<Vec<u8>> {
        let origin = self.origin(peer, proto);
        let session = match origin {
            Some(o) => self.session_of(o.session).await,
            None => None,
        };
        let (outcome, qname, qtype) = match wire::parse_query(query) {
            Err(wire::Malformed::Unanswerable) => {
                self.audit(
                    origin,
                    session.as_ref(),
                    proto,
                    None,
                    None,
                    Outcome {
                        answer: Vec::new(),
                        verdict: "denied",
                        reason: format!("malformed query ({} bytes): not answered", query.len()),
                        rcode: ResponseCode::FormErr,
                        opened: Vec::new(),
                        ttl: None,
                    },
                );
                return None;
            }
            Err(wire::Malformed::Answer(id, rcode, why)) => (
                Outcome {
                    answer: wire::error_answer(id, rcode),
                    verdict: "denied",
                    reason: format!("malformed query: {why}"),
                    rcode,
                    opened: Vec::new(),
                    ttl: None,
                },
                None,
                None,
            ),
            Ok(q) => {
                let o = self.decide(&q, origin, session.as_ref(), query).await;
                (o, Some(q.asked), Some(q.qtype.to_string()))
            }
        };
        let answer = outcome.answer.clone();
        self.audit(origin, session.as_ref(), proto, qname, qtype, outcome);
        Some(answer)
    }

    async fn decide(
        &self,
        q: &wire::Question,
        origin: Option<DnsOrigin>,
        session: Option<&SessionRef>,
        raw: &[u8],
    ) -> Outcome {
        let refuse = |reason: String, rcode: ResponseCode| Outcome {
            answer: wire::refusal(q, rcode),
            verdict: "denied",
            reason,
            rcode,
            opened: Vec::new(),
            ttl: None,
        };
        let Some(session) = session else {
            return refuse(
                "the query comes from no sandbox session egressd knows".into(),
                ResponseCode::Refused,
            );
        };
        if let Some(addrs) = self.local_addresses(&q.name) {
            let shown = addrs.iter().map(|a| a.to_string()).collect();
            return Outcome {
                answer: wire::local_answer(q, &addrs),
                verdict: "allowed",
                reason: "answered locally (localhost or /etc/hosts); no address opened".into(),
                rcode: ResponseCode::NoError,
                opened: shown,
                ttl: None,
            };
        }
        let allowed = dns_policy::name_allowed(&session.dns_allow, &q.name);
        if !allowed && !session.audit_mode {
            let rcode = match self.settings.deny {
                DenyAnswer::Nxdomain => ResponseCode::NXDomain,
                DenyAnswer::Refused => ResponseCode::Refused,
            };
            return refuse("name not in dns_allow".into(), rcode);
        }
        let cached = self.cache.get(session.uid, raw);
        let from_cache = cached.is_some();
        let answer = match cached {
            Some(a) => a,
            None => {
                let Ok(_permit) = self.inflight.try_acquire() else {
                    return refuse(
                        format!("more than {MAX_INFLIGHT} upstream queries in flight"),
                        ResponseCode::ServFail,
                    );
                };
                match upstream::ask(
                    &self.pool,
                    &self.settings.upstreams,
                    raw,
                    self.settings.timeout,
                )
                .await
                {
                    Ok(a) => {
                        self.cache.put(session.uid, raw, &a, self.settings.ttl_max);
                        a
                    }
                    Err(e) => {
                        tracing::warn!(name = %q.name, "dns: upstream failed: {e}");
                        return refuse(format!("upstream failed: {e}"), ResponseCode::ServFail);
                    }
                }
            }
        };
        let Some(read) = wire::read_answer(&answer, &q.name) else {
            return refuse("upstream answer undecodable".into(), ResponseCode::ServFail);
        };
        // Audit mode resolves every name but opens nothing: connections stay "would deny".
        let (ttl, mut reason) = if allowed {
            let origin_session = origin.map(|o| o.session).unwrap_or(0);
            let ttl = self.open(origin_session, &read.addrs, from_cache);
            (
                (!read.addrs.is_empty()).then_some(ttl),
                "dns_allow".to_string(),
            )
        } else {
            (
                None,
                "audit mode: would deny (name not in dns_allow)".into(),
            )
        };
        if from_cache {
            reason.push_str("; answered from egressd's cache (upstream not asked)");
        }
        Outcome {
            answer,
            verdict: "allowed",
            reason,
            rcode: read.rcode,
            opened: read.addrs.iter().map(|(a, _)| a.to_string()).collect(),
            ttl,
        }
    }

    async fn session_of(&self, cgroup_id: u64) -> Option<SessionRef> {
        let (id, profile, uid) = {
            let reg = self.state.registry.lock().await;
            let s = reg.all().find(|s| s.cgroup_id == cgroup_id)?;
            (s.id.clone(), s.profile.clone(), s.uid)
        };
        let policy = self.state.policy.read().await;
        let p = policy.config.profiles.get(&profile);
        Some(SessionRef {
            id,
            uid,
            dns_allow: p.map(|p| p.dns_allow.clone()).unwrap_or_default(),
            audit_mode: p.is_some_and(|p| p.mode == Mode::Audit),
        })
    }

    /// Queues the query's record; the answer does not wait for it (the record is written with the
    /// next batch, in the order queued).
    fn audit(
        &self,
        origin: Option<DnsOrigin>,
        session: Option<&SessionRef>,
        proto: u8,
        qname: Option<String>,
        qtype: Option<String>,
        o: Outcome,
    ) {
        if let (Some(_), Some(from)) = (session, origin) {
            self.state
                .dns
                .add(from.session, o.verdict == "allowed", qname.as_deref());
        }
        let task = origin.filter(|o| o.redirected == 1);
        let key = audit::DnsKey {
            session: (origin.map_or(0, |o| o.session), session.is_some()),
            task: task.map(|t| (t.pid_tgid, t.uid_gid, t.comm, t.addr, t.port)),
            proto,
            verdict: o.verdict,
            reason: o.reason,
            qname,
            qtype,
            rcode: u16::from(o.rcode),
            answers: o.opened,
        };
        // A repeat of a query already in the log is counted; its record is never built.
        let record = |k: audit::DnsKey| {
            // 0: a task in a pid namespace below egressd's, with no pid egressd could name.
            let pid_tgid = task.map(|t| t.pid_tgid).filter(|&p| p != 0);
            Record {
                time: audit::now_rfc3339(),
                kind: "dns".into(),
                session: Some(match (session, origin) {
                    (Some(s), _) => s.id.clone(),
                    (None, Some(o)) => format!("unknown-cgroup-{}", o.session),
                    (None, None) => "none".into(),
                }),
                pid: pid_tgid.map(|p| p as u32),
                tgid: pid_tgid.map(|p| (p >> 32) as u32),
                uid: task.map(|t| t.uid_gid as u32),
                comm: task.map(|t| {
                    let end = t.comm.iter().position(|b| *b == 0).unwrap_or(16);
                    String::from_utf8_lossy(&t.comm[..end]).into_owned()
                }),
                protocol: Some(if proto == 6 { "tcp" } else { "udp" }.into()),
                dest: task.map(|t| ipv6_or_4(t.addr).to_string()),
                port: task.map(|t| t.port),
                verdict: Some(k.verdict.into()),
                reason: Some(k.reason),
                qname: k.qname,
                qtype: k.qtype,
                rcode: Some(o.rcode.to_string()),
                answers: (!k.answers.is_empty()).then_some(k.answers),
                ttl: o.ttl,
                ..Default::default()
            }
        };
        let Some(rec) = self.folds.admit(key, o.ttl, record) else {
            return;
        };
        if let Err(e) = self
            .state
            .audit
            .try_send(audit::Message::Record(Box::new(rec)))
        {
            // Full or closed: wait for room on a task of its own rather than drop the record.
            let tx = self.state.audit.clone();
            let msg = match e {
                tokio::sync::mpsc::error::TrySendError::Full(m)
                | tokio::sync::mpsc::error::TrySendError::Closed(m) => m,
            };
            tokio::spawn(async move {
                if tx.send(msg).await.is_err() {
                    tracing::error!("audit task has stopped: DNS records are not being written");
                }
            });
        }
    }
}

/// What the resolver needs of a session.
/// The DNS decisions of each running session, by cgroup id: what `ps` and the end of
/// `egressctl run` show next to the connections.
#[derive(Clone, Default)]
pub struct Counts(Arc<std::sync::Mutex<HashMap<u64, Tally>>>);

#[derive(Default, Clone)]
pub struct Tally {
    pub allowed: u64,
    pub denied: u64,
    /// Distinct names refused (up to `MAX_NAMES`; past it, only counted if already there).
    pub names_denied: std::collections::HashSet<String>,
}

/// Distinct refused names remembered per session: a tunnel trying a million names is counted in
/// `denied`, not kept.
const MAX_NAMES: usize = 4096;

impl Counts {
    fn add(&self, session: u64, allowed: bool, name: Option<&str>) {
        let Ok(mut m) = self.0.lock() else { return };
        let t = m.entry(session).or_default();
        if allowed {
            t.allowed += 1;
        } else {
            t.denied += 1;
            if let Some(name) = name {
                if t.names_denied.len() < MAX_NAMES && !t.names_denied.contains(name) {
                    t.names_denied.insert(name.to_string());
                }
            }
        }
    }

    /// (allowed, denied, distinct names denied) of a session.
    pub fn get(&self, session: u64) -> (u64, u64, u64) {
        self.0
            .lock()
            .ok()
            .and_then(|m| {
                m.get(&session)
                    .map(|t| (t.allowed, t.denied, t.names_denied.len() as u64))
            })
            .unwrap_or_default()
    }

    pub fn forget(&self, session: u64) {
        if let Ok(mut m) = self.0.lock() {
            m.remove(&session);
        }
    }
}

struct SessionRef {
    id: String,
    /// The session's owner: cached answers are kept per user.
    uid: u32,
    dns_allow: Vec<String>,
    audit_mode: bool,
}

fn ipv6_or_4(addr: [u8; 16]) -> IpAddr {
    let v6 = std::net::Ipv6Addr::from(addr);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

impl Resolver {
    /// `localhost` (and names under it) and /etc/hosts names, answered without asking anyone.
    fn local_addresses(&self, name: &str) -> Option<Vec<IpAddr>> {
        if name == "localhost" || name.ends_with(".localhost") {
            return Some(vec![
                IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
                IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
            ]);
        }
        const HOSTS: &str = "/etc/hosts";
        // Looked at once a second at most: a stat per query was 5% of the resolver's CPU.
        const RECHECK: Duration = Duration::from_secs(1);
        let mut hosts = self.hosts.lock().ok()?;
        if hosts.checked.is_none_or(|t| t.elapsed() >= RECHECK) {
            hosts.checked = Some(std::time::Instant::now());
            let mtime = std::fs::metadata(HOSTS).and_then(|m| m.modified()).ok();
            if hosts.mtime != mtime || mtime.is_none() {
                hosts.mtime = mtime;
                hosts.names =
                    dns_policy::Hosts::parse(&std::fs::read_to_string(HOSTS).unwrap_or_default());
            }
        }
        let found = hosts.names.lookup(name);
        (!found.is_empty()).then(|| found.to_vec())
    }
}

#[derive(Default)]
struct HostsFile {
    checked: Option<std::time::Instant>,
    mtime: Option<std::time::SystemTime>,
    names: dns_policy::Hosts,
}

/// Forgets expired answers now and then; the kernel already ignores them once expired.
pub async fn sweeper(resolver: Arc<Resolver>) {
    loop {
        tokio::time::sleep(Duration::from_secs(10)).await;
        resolver.sweep();
        resolver.cache.sweep();
    }
}
