//! The policy file (TOML), shared by egressd (which enforces it) and egressctl (which checks and
//! shows it), and its translation into the kernel's map values.

use std::{
    borrow::ToOwned,
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt, format,
    net::IpAddr,
    path::{Path, PathBuf},
    str::FromStr,
    string::{String, ToString},
    vec::Vec,
};

pub use crate::dns_policy::DnsConfig;
use crate::{
    AllowKey, AllowValue, PortRange, Profile as KernelProfile, MAX_LOOPBACK_PORTS, MAX_PORT_RANGES,
    PROFILE_AUDIT_MODE, PROFILE_LOOPBACK_ALL, PROFILE_PRESENT, PROTO_ANY, PROTO_TCP, PROTO_UDP,
};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub const DEFAULT_CONFIG_PATH: &str = "/etc/egressd/egressd.toml";
pub const BUILTIN_PROFILE: &str = "airgap";

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// toml's message already names the line and column and shows the offending text.
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_profile_name")]
    pub default_profile: String,
    /// Group allowed to use the control socket (mode 0660). Without it the socket is 0666: anyone may
    /// start a session for themselves, which is safe because the daemon trusts only SO_PEERCRED.
    #[serde(default)]
    pub socket_group: Option<String>,
    #[serde(default)]
    pub audit: AuditConfig,
    #[serde(default)]
    pub dns: DnsConfig,
    /// The metrics endpoint (off without it). Read when egressd starts, like `[audit]`.
    #[serde(default, skip_serializing_if = "MetricsConfig::is_off")]
    pub metrics: MetricsConfig,
    /// The file's profiles plus the built-in ones it does not redefine (see [`Config::parse`]).
    #[serde(default = "builtin_profiles")]
    pub profiles: BTreeMap<String, ProfileConfig>,
    /// Who may use which profile. Without this table every user may use every profile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access: Option<Access>,
}

/// The profiles of a policy as validating it compiled them, so that putting the policy in force
/// does not compile them again (at 1k rules, a sixth of a reload's CPU).
#[derive(Default)]
pub struct Compiled(BTreeMap<String, CompiledProfile>);

impl Compiled {
    /// Profile `name` of `config` compiled for the kernel: as validation left it (taken, so
    /// once), or compiled now.
    pub fn take(&mut self, config: &Config, name: &str) -> Result<CompiledProfile, String> {
        match self.0.remove(name) {
            Some(c) => Ok(c),
            None => compile_profile(
                config
                    .profiles
                    .get(name)
                    .ok_or_else(|| format!("no profile {name:?}"))?,
            ),
        }
    }
}

/// Profiles users may start sessions with. root may use any profile.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Access {
    /// Profiles every user may use (default: the default profile only).
    #[serde(default)]
    pub everyone: Option<Vec<String>>,
    /// Extra profiles per user name.
    #[serde(default)]
    pub users: BTreeMap<String, Vec<String>>,
    /// Extra profiles per group name (the user's groups from the group database).
    #[serde(default)]
    pub groups: BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// Default /var/log/egressd/audit.jsonl.
    pub path: Option<PathBuf>,
    /// Rotate when the file reaches this size (default 64 MiB).
    pub max_bytes: Option<u64>,
    /// Rotated files kept (default 10).
    pub keep: Option<u32>,
    /// Size of the kernel's event ring buffer: a power of two, at least 4096 (default 1 MiB).
    pub ring_buffer_bytes: Option<u32>,
    /// Identical decisions (connections and DNS queries) within this window are written once with a
    /// count (default 1000; 0 off).
    pub fold_window_ms: Option<u64>,
    /// Group that may read the log (files are 0640 root:GROUP); root only when absent.
    pub group: Option<String>,
    /// Also send every record to syslog (RFC 5424) at this socket, e.g. "/dev/log".
    pub syslog: Option<PathBuf>,
    /// Warn (daemon log, status, doctor, a record) when the log's file system has less free space
    /// than this: bytes, "64MiB", "2GB" or "5%" (default 64MiB).
    pub space_left: Option<SpaceLeft>,
    /// When the log cannot be written because its file system is full: "count" keeps enforcing and
    /// counts what it could not write (default); "refuse" also refuses new sessions until it can.
    pub disk_full_action: Option<DiskAction>,
    /// The same for every other write failure (read-only file system, I/O error, removed directory).
    pub disk_error_action: Option<DiskAction>,
    /// How often egressd seals the log once `egressctl audit setup-keys` made keys: seconds, or
    /// "30s", "15min", "1h" (default 15min). `setup-keys` puts it in the keys; the daemon seals
    /// at the interval of the keys it holds.
    pub seal_interval: Option<SealInterval>,
}

/// A seal interval in whole seconds (at least 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(into = "u64")]
pub struct SealInterval(pub u64);

impl From<SealInterval> for u64 {
    fn from(s: SealInterval) -> u64 {
        s.0
    }
}

impl FromStr for SealInterval {
    type Err = String;
    fn from_str(t: &str) -> Result<Self, String> {
        let t = t.trim();
        let bad = || {
            format!("seal_interval {t:?}: expected seconds or a duration (\"30s\", \"15min\", \"1h\"), at least 1 s")
        };
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (n, unit) = t.split_at(split);
        let n: u64 = n.parse().map_err(|_| bad())?;
        let mult: u64 = match unit.trim() {
            "" | "s" | "sec" => 1,
            "m" | "min" => 60,
            "h" => 3600,
            "d" => 86_400,
            _ => return Err(bad()),
        };
        match n.checked_mul(mult) {
            Some(s) if s >= 1 => Ok(SealInterval(s)),
            _ => Err(bad()),
        }
    }
}

impl<'de> Deserialize<'de> for SealInterval {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => n.to_string().parse().map_err(serde::de::Error::custom),
            Raw::S(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// `[metrics]`: where egressd serves `GET /metrics` (OpenMetrics / Prometheus text).
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// "127.0.0.1:9469" (TCP) or "/run/egressd/metrics.sock" (an absolute path: a unix socket).
    pub listen: Option<MetricsListen>,
}

impl MetricsConfig {
    pub fn is_off(&self) -> bool {
        self.listen.is_none()
    }
}

/// Where the metrics endpoint listens.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub enum MetricsListen {
    Tcp(std::net::SocketAddr),
    Unix(PathBuf),
}

impl TryFrom<String> for MetricsListen {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        if s.starts_with('/') {
            return Ok(MetricsListen::Unix(PathBuf::from(s)));
        }
        s.parse().map(MetricsListen::Tcp).map_err(|_| {
            format!(
                "metrics listen address {s:?}: expected IP:PORT (e.g. \"127.0.0.1:9469\", \"[::1]:9469\") or an absolute unix socket path (e.g. \"/run/egressd/metrics.sock\")"
            )
        })
    }
}

impl From<MetricsListen> for String {
    fn from(l: MetricsListen) -> String {
        l.to_string()
    }
}

impl fmt::Display for MetricsListen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MetricsListen::Tcp(a) => write!(f, "{a}"),
            MetricsListen::Unix(p) => write!(f, "{}", p.display()),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DiskAction {
    #[default]
    Count,
    Refuse,
}

/// A free-space threshold: bytes, or a share of the file system.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(into = "String")]
pub enum SpaceLeft {
    Bytes(u64),
    Percent(f64),
}

impl SpaceLeft {
    pub fn bytes(self, total: u64) -> u64 {
        match self {
            SpaceLeft::Bytes(b) => b,
            SpaceLeft::Percent(p) => (total as f64 * p / 100.0) as u64,
        }
    }
}

impl From<SpaceLeft> for String {
    fn from(s: SpaceLeft) -> String {
        match s {
            SpaceLeft::Bytes(b) => b.to_string(),
            SpaceLeft::Percent(p) => format!("{p}%"),
        }
    }
}

impl FromStr for SpaceLeft {
    type Err = String;
    fn from_str(t: &str) -> Result<Self, String> {
        let t = t.trim();
        let bad = || {
            format!(
                "space_left {t:?}: expected bytes, a size (\"64MiB\", \"2GB\") or a share (\"5%\")"
            )
        };
        if let Some(p) = t.strip_suffix('%') {
            let p: f64 = p.trim().parse().map_err(|_| bad())?;
            if !(0.0..=100.0).contains(&p) {
                return Err(bad());
            }
            return Ok(SpaceLeft::Percent(p));
        }
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (n, unit) = t.split_at(split);
        let n: u64 = n.parse().map_err(|_| bad())?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "K" | "KiB" => 1 << 10,
            "M" | "MiB" => 1 << 20,
            "G" | "GiB" => 1 << 30,
            "KB" => 1000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            _ => return Err(bad()),
        };
        n.checked_mul(mult).map(SpaceLeft::Bytes).ok_or_else(bad)
    }
}

impl<'de> Deserialize<'de> for SpaceLeft {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(SpaceLeft::Bytes(n)),
            Raw::S(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

pub const DEFAULT_AUDIT_PATH: &str = "/var/log/egressd/audit.jsonl";

impl AuditConfig {
    pub fn path(&self) -> PathBuf {
        self.path
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_AUDIT_PATH))
    }
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes.unwrap_or(64 << 20)
    }
    pub fn keep(&self) -> u32 {
        self.keep.unwrap_or(10)
    }
    pub fn ring_buffer_bytes(&self) -> u32 {
        self.ring_buffer_bytes.unwrap_or(crate::DEFAULT_RING_BYTES)
    }
    pub fn fold_window(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.fold_window_ms.unwrap_or(1000))
    }
    pub fn space_left(&self) -> SpaceLeft {
        self.space_left.unwrap_or(SpaceLeft::Bytes(64 << 20))
    }
    /// Seconds between seals (default 900).
    pub fn seal_interval(&self) -> u64 {
        self.seal_interval.map_or(900, |s| s.0)
    }
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Enforce,
    Audit,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Bind {
    #[default]
    Loopback,
    Any,
}

/// Which unix sockets a session may connect to.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum UnixSockets {
    /// Only servers inside the session, the sockets `unix_allow` names (Wayland, PipeWire and
    /// PulseAudio by default) and egressd's own control socket: nothing outside the session can be
    /// asked to act for it (tmux, `systemd --user`, the session bus, docker, a running IDE).
    #[default]
    Session,
    /// Any unix socket the uid may open (the behaviour before the unix layer): an open way out.
    Open,
}

/// The user's session bus in a session.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SessionBus {
    /// Through a filtering proxy of the session's own (xdg-dbus-proxy) that talks only to
    /// notifications and the secret service: no systemd1, no portals, nothing that starts
    /// processes. Where the user has a bus and xdg-dbus-proxy is installed.
    #[default]
    Filtered,
    /// No bus at all.
    None,
}

/// The unix sockets outside a session a desktop IDE or an agent CLI needs: the Wayland display
/// and the sound servers. `$UID` is the caller's uid.
pub const DEFAULT_UNIX_ALLOW: [&str; 5] = [
    "/run/user/$UID/wayland-0",
    "/run/user/$UID/wayland-1",
    "/run/user/$UID/pipewire-0",
    "/run/user/$UID/pulse/native",
    "/run/user/$UID/pipewire-0-manager",
];

/// The X server's sockets, allowed only with `x11 = true`: any X client can type into any window
/// (XTEST), which is an open way out, named in the README.
pub const X11_SOCKETS: [&str; 4] = [
    "/tmp/.X11-unix/X0",
    "/tmp/.X11-unix/X1",
    "@/tmp/.X11-unix/X0",
    "@/tmp/.X11-unix/X1",
];

/// What a session started by root (uid 0) gets. With its capabilities, root can leave any sandbox
/// a cgroup program draws (move itself to another cgroup, unpin the programs); without them it
/// still owns the files that root runs outside the sandbox (cron, units).
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum RootSessions {
    /// No session: run egressctl as your own user.
    Refuse,
    /// uid 0 with no capabilities, no bpf(2), and no writes under /sys, the cgroup and bpffs
    /// mounts or egressd's own files: it cannot leave the session or undo enforcement, but it can
    /// still write other files that root runs outside the sandbox.
    #[default]
    DropCapabilities,
    /// Full root: egressd cannot hold it in.
    KeepCapabilities,
}

/// Socket address families by the names people know them by (AF_*), as in linux/socket.h.
pub const FAMILIES: [(&str, u32); 20] = [
    ("unix", 1),
    ("inet", 2),
    ("ax25", 3),
    ("ipx", 4),
    ("appletalk", 5),
    ("x25", 9),
    ("inet6", 10),
    ("key", 15),
    ("netlink", 16),
    ("packet", 17),
    ("rds", 21),
    ("llc", 26),
    ("can", 29),
    ("tipc", 30),
    ("bluetooth", 31),
    ("alg", 38),
    ("vsock", 40),
    ("kcm", 41),
    ("qipcrtr", 42),
    ("xdp", 44),
];

pub fn family_name(n: u32) -> String {
    FAMILIES
        .iter()
        .find(|(_, v)| *v == n)
        .map(|(name, _)| name.to_string())
        .unwrap_or_else(|| format!("family {n}"))
}

/// The bit mask of `names`, or an error naming the unknown one.
pub fn family_mask(names: &[String]) -> Result<u64, String> {
    let mut mask = 0u64;
    for n in names {
        let v = FAMILIES
            .iter()
            .find(|(name, _)| name == n)
            .map(|(_, v)| *v)
            .ok_or_else(|| {
                format!(
                    "families: unknown family {n:?}; known: {}",
                    FAMILIES
                        .iter()
                        .map(|(n, _)| *n)
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })?;
        mask |= 1 << v;
    }
    Ok(mask)
}

/// Layers a profile may `require`.
pub const LAYERS: [&str; 5] = ["cgroup", "seccomp", "lsm", "landlock", "unix"];

/// The AF_* numbers of a profile's `families` (default unix, inet, inet6, netlink).
pub fn family_numbers(p: &ProfileConfig) -> Result<Vec<u32>, String> {
    let mask = match &p.families {
        Some(names) => family_mask(names)?,
        None => crate::DEFAULT_FAMILIES,
    };
    Ok((0..64).filter(|n| mask & (1 << n) != 0).collect())
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum Loopback {
    All(bool),
    Ports(Vec<u16>),
}

impl Default for Loopback {
    fn default() -> Self {
        Loopback::All(true)
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProfileConfig {
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub mode: Mode,
    #[serde(default)]
    pub loopback: Loopback,
    #[serde(default)]
    pub allow: Vec<AllowRule>,
    /// Socket address families the sandbox may create (BPF LSM layer); default unix, inet, inet6,
    /// netlink. Raw and ICMP ping sockets stay refused whatever this says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub families: Option<Vec<String>>,
    /// Addresses sandbox sockets may bind: "loopback" (default: 0.0.0.0 and :: become 127.0.0.1
    /// and ::1, other addresses are refused) or "any".
    #[serde(default)]
    pub bind: Bind,
    /// Run the sandbox with no_new_privs (default true): setuid and file-capability binaries
    /// (ping, crontab, at, sudo) gain nothing inside it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub no_new_privs: Option<bool>,
    /// Let the sandbox ptrace, process_vm_readv/writev and pidfd_getfd (default false: a debugger
    /// inside the sandbox needs this; without it a sandboxed task cannot reach into a same-uid
    /// process outside, nor steal its sockets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ptrace: Option<bool>,
    /// Sessions asked for by root: "drop-capabilities" (default), "refuse" or
    /// "keep-capabilities" (see [`RootSessions`]).
    #[serde(default)]
    pub root: RootSessions,
    /// Layers the profile needs; a session is refused when one is missing. "lsm": BPF LSM (socket
    /// families).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub require: Vec<String>,
    /// Names this profile may resolve: `name.example` or `*.example` (every name under it). Their
    /// answers' addresses may be reached until the TTL ends. Every other name gets NXDOMAIN.
    #[serde(default)]
    pub dns_allow: Vec<String>,
    /// Unix sockets: "session" (default) or "open" (see [`UnixSockets`]).
    #[serde(default)]
    pub unix: UnixSockets,
    /// Unix sockets outside the session that the session may use, by exact path (`$UID` is the
    /// caller's uid) or `@name` for an abstract name; default [`DEFAULT_UNIX_ALLOW`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unix_allow: Option<Vec<String>>,
    /// Allow the X server's sockets (default false; see [`X11_SOCKETS`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x11: Option<bool>,
    /// The user's session bus: "filtered" (default) or "none" (see [`SessionBus`]).
    #[serde(default)]
    pub session_bus: SessionBus,
}

impl ProfileConfig {
    /// The unix sockets outside the session a session of `uid` may use, `$UID` expanded.
    pub fn unix_allowed(&self, uid: u32) -> Vec<String> {
        let mut out: Vec<String> = match &self.unix_allow {
            Some(list) => list.clone(),
            None => DEFAULT_UNIX_ALLOW.iter().map(|s| s.to_string()).collect(),
        };
        if self.x11 == Some(true) {
            out.extend(X11_SOCKETS.iter().map(|s| s.to_string()));
        }
        out.iter()
            .map(|e| e.replace("$UID", &uid.to_string()))
            .collect()
    }
}

/// `CIDR[:port[-port]][/tcp|/udp]`; an IPv6 CIDR with a port is written in brackets:
/// `[fd00:20::5]/128:8000`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct AllowRule {
    pub net: IpNet,
    pub ports: Option<(u16, u16)>,
    pub proto: u8,
}

fn default_profile_name() -> String {
    BUILTIN_PROFILE.to_string()
}

/// The built-in profile that also closes loopback services that forward off the machine (sshd,
/// proxies, port forwards): only the local model server's port is reachable.
pub const STRICT_PROFILE: &str = "strict";
/// Ollama's default port, the local model server most tools talk to.
pub const MODEL_SERVER_PORT: u16 = 11434;

fn builtin_profiles() -> BTreeMap<String, ProfileConfig> {
    BTreeMap::from([
        (
            BUILTIN_PROFILE.to_string(),
            ProfileConfig {
                description: Some("loopback only: every non-loopback connection is denied".into()),
                ..Default::default()
            },
        ),
        (
            STRICT_PROFILE.to_string(),
            ProfileConfig {
                description: Some(format!(
                    "loopback port {MODEL_SERVER_PORT} only (the local model server): no loopback proxy, sshd or port forward"
                )),
                loopback: Loopback::Ports(std::vec![MODEL_SERVER_PORT]),
                ..Default::default()
            },
        ),
    ])
}

impl Default for Config {
    fn default() -> Self {
        Config {
            default_profile: default_profile_name(),
            socket_group: None,
            audit: AuditConfig::default(),
            dns: DnsConfig::default(),
            metrics: MetricsConfig::default(),
            profiles: builtin_profiles(),
            access: None,
        }
    }
}

impl FromStr for AllowRule {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let bad = |why: &str| {
            format!("allow rule {text:?}: {why} (expected CIDR[:port[-port]][/tcp|/udp], e.g. \"10.20.0.5/32:8000/tcp\")")
        };
        let (rest, proto) = if let Some(r) = text.strip_suffix("/tcp") {
            (r, PROTO_TCP)
        } else if let Some(r) = text.strip_suffix("/udp") {
            (r, PROTO_UDP)
        } else {
            (text, PROTO_ANY)
        };
        let (addr, prefix, ports) = if let Some(inner) = rest.strip_prefix('[') {
            let (addr, after) = inner.split_once(']').ok_or_else(|| bad("missing ']'"))?;
            let (prefix, ports) = match after.split_once(':') {
                Some((p, ports)) => (p, Some(ports)),
                None => (after, None),
            };
            (addr, prefix.strip_prefix('/'), ports)
        } else if rest.contains('.') {
            let (net, ports) = match rest.split_once(':') {
                Some((n, p)) => (n, Some(p)),
                None => (rest, None),
            };
            match net.split_once('/') {
                Some((a, p)) => (a, Some(p), ports),
                None => (net, None, ports),
            }
        } else {
            match rest.split_once('/') {
                Some((a, p)) => (a, Some(p), None),
                None => (rest, None, None),
            }
        };
        let ip: IpAddr = addr.parse().map_err(|_| bad("not an IP address"))?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let prefix: u8 = match prefix {
            Some(p) => p.parse().map_err(|_| bad("bad prefix length"))?,
            None => max,
        };
        let net = IpNet::new(ip, prefix).map_err(|_| bad("prefix length too long"))?;
        if net.trunc() != net {
            return Err(bad(&format!(
                "host bits set; did you mean {}?",
                net.trunc()
            )));
        }
        let ports = match ports {
            None => None,
            Some(p) => {
                let (lo, hi) = match p.split_once('-') {
                    Some((lo, hi)) => (lo, hi),
                    None => (p, p),
                };
                let lo: u16 = lo.parse().map_err(|_| bad("bad port"))?;
                let hi: u16 = hi.parse().map_err(|_| bad("bad port"))?;
                if lo == 0 || lo > hi {
                    return Err(bad("port range must be 1-65535, low to high"));
                }
                Some((lo, hi))
            }
        };
        Ok(AllowRule { net, ports, proto })
    }
}

impl TryFrom<String> for AllowRule {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl fmt::Display for AllowRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.net, self.ports) {
            (IpNet::V6(n), Some(_)) => write!(f, "[{}]/{}", n.addr(), n.prefix_len())?,
            (net, _) => write!(f, "{net}")?,
        }
        match self.ports {
            Some((lo, hi)) if lo == hi => write!(f, ":{lo}")?,
            Some((lo, hi)) => write!(f, ":{lo}-{hi}")?,
            None => {}
        }
        match self.proto {
            PROTO_TCP => write!(f, "/tcp"),
            PROTO_UDP => write!(f, "/udp"),
            _ => Ok(()),
        }
    }
}

impl From<AllowRule> for String {
    fn from(r: AllowRule) -> String {
        r.to_string()
    }
}

impl Config {
    /// The file at `path`, or the built-in default when it does not exist.
    pub fn load(path: &Path) -> Result<(Config, String), PolicyError> {
        Self::load_compiled(path).map(|(config, source, _)| (config, source))
    }

    /// `load`, with the profiles as validation compiled them (none for the built-in default).
    pub fn load_compiled(path: &Path) -> Result<(Config, String, Compiled), PolicyError> {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let (config, compiled) = Self::parse_compiled(path, &text)?;
                Ok((config, path.display().to_string(), compiled))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok((
                Config::default(),
                "built-in default".to_string(),
                Compiled::default(),
            )),
            Err(source) => Err(PolicyError::Read {
                path: path.to_owned(),
                source,
            }),
        }
    }

    /// A policy file's text. The built-in profiles (`airgap`, `strict`) stay available next to the
    /// file's own: a file that defines only `[profiles.lan]` keeps `default_profile = "airgap"`
    /// working. A file's `[profiles.airgap]` replaces the built-in one.
    pub fn parse(path: &Path, text: &str) -> Result<Config, PolicyError> {
        Self::parse_compiled(path, text).map(|(config, _)| config)
    }

    /// `parse`, with the profiles as validation compiled them.
    pub fn parse_compiled(path: &Path, text: &str) -> Result<(Config, Compiled), PolicyError> {
        let mut config: Config = toml::from_str(text).map_err(|e| PolicyError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_string(),
        })?;
        for (name, builtin) in builtin_profiles() {
            config.profiles.entry(name).or_insert(builtin);
        }
        let compiled = config.validate().map_err(|message| PolicyError::Invalid {
            path: path.to_owned(),
            message,
        })?;
        Ok((config, compiled))
    }

    /// Checks everything, and returns the profiles compiled on the way.
    fn validate(&self) -> Result<Compiled, String> {
        if !self.profiles.contains_key(&self.default_profile) {
            return Err(format!(
                "default_profile = {:?} names no profile; define [profiles.{}] or pick one of: {}",
                self.default_profile,
                self.default_profile,
                self.profiles.keys().cloned().collect::<Vec<_>>().join(", ")
            ));
        }
        let ring = self.audit.ring_buffer_bytes();
        if !ring.is_power_of_two() || ring < 4096 {
            return Err(format!(
                "audit.ring_buffer_bytes = {ring}: must be a power of two and at least 4096"
            ));
        }
        if self.profiles.len() > crate::MAX_PROFILES as usize {
            return Err(format!(
                "{} profiles (the built-in ones included); at most {} are supported",
                self.profiles.len(),
                crate::MAX_PROFILES
            ));
        }
        self.dns.validate()?;
        let mut entries = 0;
        let mut compiled = BTreeMap::new();
        for (name, p) in &self.profiles {
            let c = compile_profile(p).map_err(|e| format!("profile {name:?}: {e}"))?;
            entries += c.allow.len();
            compiled.insert(name.clone(), c);
            for pattern in &p.dns_allow {
                crate::dns_policy::check_pattern(pattern)
                    .map_err(|e| format!("profile {name:?}: {e}"))?;
            }
        }
        let limit = crate::MAX_ALLOW_ENTRIES as usize / 2;
        if entries > limit {
            return Err(format!(
                "{entries} distinct allow prefixes across all profiles; at most {limit} fit (the kernel table holds the policy in force and the next one): merge rules into wider CIDRs"
            ));
        }
        if let Some(access) = &self.access {
            let named = access
                .everyone
                .iter()
                .flatten()
                .map(|p| ("access.everyone", p))
                .chain(access.users.values().flatten().map(|p| ("access.users", p)))
                .chain(
                    access
                        .groups
                        .values()
                        .flatten()
                        .map(|p| ("access.groups", p)),
                );
            for (table, p) in named {
                if !self.profiles.contains_key(p) {
                    return Err(format!("{table} names profile {p:?}, which is not defined"));
                }
            }
        }
        Ok(Compiled(compiled))
    }

    /// Whether a caller may start a session with `profile`: root always; others as `[access]` says.
    pub fn may_use(&self, profile: &str, uid: u32, user: Option<&str>, groups: &[String]) -> bool {
        if uid == 0 {
            return true;
        }
        let Some(access) = &self.access else {
            return true;
        };
        let named = |list: &Vec<String>| list.iter().any(|p| p == profile);
        let everyone = match &access.everyone {
            Some(list) => named(list),
            None => profile == self.default_profile,
        };
        everyone
            || user.and_then(|u| access.users.get(u)).is_some_and(named)
            || groups
                .iter()
                .any(|g| access.groups.get(g).is_some_and(named))
    }
}

/// One profile as the kernel sees it.
pub struct CompiledProfile {
    pub profile: KernelProfile,
    /// (prefix length over the whole key, key) and value, for the `ALLOW` trie; slot filled in later.
    pub allow: Vec<(u32, [u8; 16], AllowValue)>,
}

/// Turns rules into LPM entries. LPM returns only the longest matching prefix, so each entry also
/// carries the port ranges of every less specific rule that covers it.
pub fn compile_profile(p: &ProfileConfig) -> Result<CompiledProfile, String> {
    let mut flags = PROFILE_PRESENT;
    if p.mode == Mode::Audit {
        flags |= PROFILE_AUDIT_MODE;
    }
    if p.bind == Bind::Any {
        flags |= crate::PROFILE_BIND_ANY;
    }
    if p.unix == UnixSockets::Open {
        flags |= crate::PROFILE_UNIX_OPEN;
    }
    for entry in p.unix_allow.iter().flatten() {
        if !(entry.starts_with('/') || entry.starts_with('@')) || entry.len() > 107 {
            return Err(format!(
                "unix_allow: {entry:?} is neither an absolute path nor an @abstract name of at most 107 bytes"
            ));
        }
    }
    for layer in &p.require {
        if !LAYERS.contains(&layer.as_str()) {
            return Err(format!(
                "require: unknown layer {layer:?}; known: {}",
                LAYERS.join(", ")
            ));
        }
    }
    if p.root == RootSessions::DropCapabilities && p.no_new_privs == Some(false) {
        return Err(
            "root = \"drop-capabilities\" needs no_new_privs (seccomp and Landlock are what hold root in); remove no_new_privs = false or choose another root setting".into(),
        );
    }
    let mut profile = KernelProfile {
        flags,
        families: match &p.families {
            Some(names) => family_mask(names)?,
            None => crate::DEFAULT_FAMILIES,
        },
        ..Default::default()
    };
    match &p.loopback {
        Loopback::All(true) => profile.flags |= PROFILE_LOOPBACK_ALL,
        Loopback::All(false) => {}
        Loopback::Ports(ports) => {
            if ports.len() > MAX_LOOPBACK_PORTS {
                return Err(format!(
                    "loopback lists {} ports; at most {MAX_LOOPBACK_PORTS}",
                    ports.len()
                ));
            }
            for (i, port) in ports.iter().enumerate() {
                profile.loopback_ports[i] = *port;
            }
            profile.n_loopback_ports = ports.len() as u32;
        }
    }
    // Rules by their (truncated) network, so the rules covering a prefix are found by looking up
    // its shorter prefixes: linear in rules, where comparing every pair made a 10k-rule reload
    // take seconds. Only the prefix lengths some rule of the family has are looked up (a policy
    // has a few; trying all 33 or 129 was most of a 1k-rule reload).
    let mut by_net: HashMap<IpNet, Vec<usize>> = HashMap::new();
    let (mut lens_v4, mut lens_v6) = (BTreeSet::new(), BTreeSet::new());
    for (i, rule) in p.allow.iter().enumerate() {
        by_net.entry(rule.net.trunc()).or_default().push(i);
        match rule.net {
            IpNet::V4(n) => lens_v4.insert(n.prefix_len()),
            IpNet::V6(n) => lens_v6.insert(n.prefix_len()),
        };
    }
    let mut seen = BTreeSet::new();
    let mut allow = Vec::new();
    for (i, rule) in p.allow.iter().enumerate() {
        let (prefix, addr) = mapped(rule.net);
        if !seen.insert((prefix, addr)) {
            continue;
        }
        let mut value = AllowValue {
            rule: i as u32,
            ..Default::default()
        };
        let lens = match rule.net {
            IpNet::V4(_) => &lens_v4,
            IpNet::V6(_) => &lens_v6,
        };
        let mut covering: Vec<usize> = lens
            .range(..=rule.net.prefix_len())
            .filter_map(|&len| IpNet::new(rule.net.addr(), len).ok())
            .filter_map(|net| by_net.get(&net.trunc()))
            .flatten()
            .copied()
            .collect();
        covering.sort_unstable();
        for covering in covering.iter().map(|&j| &p.allow[j]) {
            let n = value.n_ranges as usize;
            if n == MAX_PORT_RANGES {
                return Err(format!(
                    "more than {MAX_PORT_RANGES} port ranges apply to {}; merge some rules",
                    rule.net
                ));
            }
            let (lo, hi) = covering.ports.unwrap_or((0, u16::MAX));
            value.ranges[n] = PortRange {
                lo,
                hi,
                proto: covering.proto,
                _pad: [0; 3],
            };
            value.n_ranges += 1;
        }
        allow.push((prefix, addr, value));
    }
    Ok(CompiledProfile { profile, allow })
}

/// IPv4 as IPv4-mapped IPv6, with the prefix length counted over the whole key (32-bit slot first).
fn mapped(net: IpNet) -> (u32, [u8; 16]) {
    match net {
        IpNet::V4(n) => (
            32 + 96 + n.prefix_len() as u32,
            n.addr().to_ipv6_mapped().octets(),
        ),
        IpNet::V6(n) => (32 + n.prefix_len() as u32, n.addr().octets()),
    }
}

/// Key of the `ALLOW` trie for a compiled entry under a profile slot.
pub fn allow_key(slot: u32, addr: [u8; 16]) -> AllowKey {
    AllowKey {
        slot: slot.to_be_bytes(),
        addr,
    }
}

/// Short hash of a policy, carried in audit records so a decision can be tied to the rules in force.
pub fn policy_hash(config: &Config) -> String {
    use sha2::Digest as _;

    // JSON, not TOML: the same content either way, and at 1k rules serializing TOML took a
    // millisecond of every reload.
    let text = serde_json::to_vec(config).unwrap_or_default();
    hex::encode(sha2::Sha256::digest(&text))[..16].to_string()
}

/// One line for a person: what a session under this profile may reach.
pub fn describe(p: &ProfileConfig) -> String {
    let mode = match p.mode {
        Mode::Enforce => "enforce",
        Mode::Audit => "audit only, nothing blocked",
    };
    let loopback = match &p.loopback {
        Loopback::All(true) => "loopback (all ports)".to_string(),
        Loopback::All(false) => "no loopback".to_string(),
        Loopback::Ports(ports) => format!(
            "loopback ports {}",
            ports
                .iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(",")
        ),
    };
    let mut allow: Vec<String> = p.allow.iter().map(|r| r.to_string()).collect();
    if !p.dns_allow.is_empty() {
        allow.push(format!("names {}", p.dns_allow.join(", ")));
    }
    let allow = if allow.is_empty() {
        "nothing else".to_string()
    } else {
        allow.join(", ")
    };
    format!("{mode}; allows {loopback}; {allow}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rule_forms() {
        let r: AllowRule = "10.20.0.5/32:8000/tcp".parse().unwrap();
        assert_eq!(r.net.to_string(), "10.20.0.5/32");
        assert_eq!(r.ports, Some((8000, 8000)));
        assert_eq!(r.proto, PROTO_TCP);
        let r: AllowRule = "[fd00:20::5]/128:8000".parse().unwrap();
        assert_eq!(r.net.to_string(), "fd00:20::5/128");
        assert_eq!(r.proto, PROTO_ANY);
        let r: AllowRule = "fd00::/8".parse().unwrap();
        assert_eq!(r.ports, None);
        let r: AllowRule = "198.18.0.0/15:1000-2000/udp".parse().unwrap();
        assert_eq!(r.ports, Some((1000, 2000)));
        assert_eq!(r.to_string(), "198.18.0.0/15:1000-2000/udp");
        let r: AllowRule = "192.0.2.7".parse().unwrap();
        assert_eq!(r.net.prefix_len(), 32);
    }

    #[test]
    fn refuses_bad_rules_with_a_reason() {
        for (text, why) in [
            ("10.0.0.1/8", "host bits set"),
            ("10.0.0.0/33", "prefix length too long"),
            ("nonsense", "not an IP address"),
            ("10.0.0.0/8:0", "port range"),
            ("10.0.0.0/8:9-3", "port range"),
            ("[fd00::1/128", "missing ']'"),
        ] {
            let err = text.parse::<AllowRule>().unwrap_err();
            assert!(err.contains(why), "{text}: {err}");
        }
    }

    #[test]
    fn root_sessions_drop_capabilities_unless_a_profile_says_otherwise() {
        let c = Config::default();
        assert!(c
            .profiles
            .values()
            .all(|p| p.root == RootSessions::DropCapabilities));
        let path = Path::new("p.toml");
        let c = Config::parse(path, "[profiles.airgap]\nroot = \"refuse\"\n").unwrap();
        assert_eq!(c.profiles["airgap"].root, RootSessions::Refuse);
        let err = Config::parse(path, "[profiles.airgap]\nroot = \"yes\"\n").unwrap_err();
        assert!(err.to_string().contains("keep-capabilities"), "{err}");
        let err = Config::parse(
            path,
            "[profiles.airgap]\nroot = \"drop-capabilities\"\nno_new_privs = false\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("needs no_new_privs"), "{err}");
    }

    #[test]
    fn built_in_default_is_loopback_only_enforce() {
        let c = Config::default();
        assert_eq!(c.default_profile, "airgap");
        let p = compile_profile(&c.profiles["airgap"]).unwrap();
        assert_eq!(p.profile.flags, PROFILE_PRESENT | PROFILE_LOOPBACK_ALL);
        assert!(p.allow.is_empty());
    }

    #[test]
    fn validation_compiles_each_profile_once() {
        let (c, mut compiled) = Config::parse_compiled(
            Path::new("x.toml"),
            "[profiles.lan]\nallow = [\"10.20.0.0/16:8000/tcp\", \"10.20.0.5/32:22/tcp\"]\n",
        )
        .unwrap();
        let fresh = compile_profile(&c.profiles["lan"]).unwrap();
        let kept = compiled.take(&c, "lan").unwrap();
        assert_eq!(kept.allow, fresh.allow);
        assert_eq!(kept.profile, fresh.profile);
        // Taken once; asked again, it is compiled from the profile.
        assert_eq!(compiled.take(&c, "lan").unwrap().allow, fresh.allow);
        assert!(compiled.take(&c, "nope").is_err());
    }

    #[test]
    fn a_file_with_its_own_profiles_keeps_the_built_in_ones() {
        let c = Config::parse(
            Path::new("x.toml"),
            "[profiles.lan]\nallow = [\"10.20.0.5/32:8000/tcp\"]\n",
        )
        .unwrap();
        assert_eq!(c.default_profile, BUILTIN_PROFILE);
        assert_eq!(
            c.profiles.keys().map(String::as_str).collect::<Vec<_>>(),
            ["airgap", "lan", "strict"]
        );
        assert_eq!(c.profiles["airgap"], Config::default().profiles["airgap"]);
        assert_eq!(c.profiles["lan"].allow.len(), 1);

        let c = Config::parse(
            Path::new("x.toml"),
            "default_profile = \"strict\"\n[profiles.lan]\n",
        )
        .unwrap();
        assert_eq!(c.profiles["strict"], Config::default().profiles["strict"]);
    }

    #[test]
    fn a_file_that_redefines_a_built_in_profile_uses_its_own() {
        let text =
            "[profiles.airgap]\ndescription = \"mine\"\nmode = \"audit\"\nloopback = [8080]\n";
        let c = Config::parse(Path::new("x.toml"), text).unwrap();
        let airgap = &c.profiles["airgap"];
        assert_eq!(airgap.description.as_deref(), Some("mine"));
        assert_eq!(airgap.mode, Mode::Audit);
        assert_eq!(airgap.loopback, Loopback::Ports(std::vec![8080]));
        assert_eq!(c.profiles["strict"], Config::default().profiles["strict"]);
        assert_eq!(c.profiles.len(), 2);
    }

    #[test]
    fn errors_name_file_line_and_column() {
        let text = "default_profile = \"airgap\"\n[profiles.airgap]\nmode = \"enforce\"\nallow = [\"10.0.0.1/8\"]\n";
        let err = Config::parse(Path::new("/etc/egressd/egressd.toml"), text).unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("/etc/egressd/egressd.toml: "), "{msg}");
        assert!(msg.contains("line 4"), "{msg}");
        assert!(msg.contains("host bits set"), "{msg}");

        let err =
            Config::parse(Path::new("x.toml"), "[profiles.a]\nmoed = \"audit\"\n").unwrap_err();
        assert!(err.to_string().contains("line 2"), "{err}");
        assert!(err.to_string().contains("unknown field"), "{err}");

        let err = Config::parse(Path::new("x.toml"), "default_profile = \"nope\"\n").unwrap_err();
        assert!(err.to_string().contains("names no profile"), "{err}");
    }

    #[test]
    fn unix_sockets_are_confined_by_default_and_allow_lists_expand_the_uid() {
        let c = Config::default();
        let airgap = &c.profiles["airgap"];
        assert_eq!(airgap.unix, UnixSockets::Session);
        let allowed = airgap.unix_allowed(1000);
        assert!(allowed.contains(&"/run/user/1000/wayland-0".to_string()));
        assert!(allowed.contains(&"/run/user/1000/pulse/native".to_string()));
        assert!(!allowed
            .iter()
            .any(|a| a.contains("X11") || a.ends_with("/bus")));
        assert_eq!(
            compile_profile(airgap).unwrap().profile.flags & crate::PROFILE_UNIX_OPEN,
            0
        );

        let text = "default_profile = \"x\"\n[profiles.x]\nunix_allow = [\"/run/user/$UID/app.sock\", \"@name\"]\nx11 = true\n[profiles.open]\nunix = \"open\"\n";
        let c = Config::parse(Path::new("x.toml"), text).unwrap();
        let x = c.profiles["x"].unix_allowed(65534);
        assert_eq!(&x[..2], ["/run/user/65534/app.sock", "@name"]);
        assert!(x.contains(&"/tmp/.X11-unix/X0".to_string()));
        let open = compile_profile(&c.profiles["open"]).unwrap();
        assert_ne!(open.profile.flags & crate::PROFILE_UNIX_OPEN, 0);

        let err = Config::parse(
            Path::new("x.toml"),
            "default_profile = \"x\"\n[profiles.x]\nunix_allow = [\"tmux.sock\"]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("neither an absolute path"), "{err}");
        let err = Config::parse(
            Path::new("x.toml"),
            "default_profile = \"x\"\n[profiles.x]\nunix = \"some\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("line 3"), "{err}");
    }

    #[test]
    fn access_grants_profiles_by_user_and_group() {
        let text = "default_profile = \"airgap\"\n[profiles.airgap]\n[profiles.lan]\n[profiles.ops]\n[access]\nusers = { alice = [\"lan\"] }\ngroups = { sre = [\"ops\"] }\n";
        let c = Config::parse(Path::new("x.toml"), text).unwrap();
        assert!(c.may_use("airgap", 1000, Some("bob"), &[]));
        assert!(!c.may_use("lan", 1000, Some("bob"), &[]));
        assert!(c.may_use("lan", 1001, Some("alice"), &[]));
        assert!(c.may_use("ops", 1000, Some("bob"), &["sre".to_string()]));
        assert!(c.may_use("ops", 0, None, &[]));
        let bad = "[profiles.airgap]\n[access]\neveryone = [\"nope\"]\n";
        let err = Config::parse(Path::new("x.toml"), bad)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("access.everyone names profile \"nope\""),
            "{err}"
        );
    }

    #[test]
    fn longest_match_keeps_wider_rules_ports() {
        let p = ProfileConfig {
            allow: std::vec![
                "10.0.0.0/8:443/tcp".parse().unwrap(),
                "10.1.0.0/16:8000".parse().unwrap(),
            ],
            ..Default::default()
        };
        let c = compile_profile(&p).unwrap();
        let narrow = c
            .allow
            .iter()
            .find(|(len, _, _)| *len == 32 + 96 + 16)
            .unwrap();
        assert_eq!(
            narrow.2.n_ranges, 2,
            "the /16 entry must also allow the /8's port 443"
        );
        let wide = c
            .allow
            .iter()
            .find(|(len, _, _)| *len == 32 + 96 + 8)
            .unwrap();
        assert_eq!(wide.2.n_ranges, 1);
    }

    #[test]
    fn covering_rules_match_a_pairwise_comparison() {
        // Nested, duplicate, sibling and IPv6 rules, in an order that is not by prefix.
        let texts = [
            "10.1.2.0/24:22/tcp",
            "10.0.0.0/8:443/tcp",
            "10.1.0.0/16",
            "10.1.2.3/32:53/udp",
            "10.2.0.0/16:80",
            "10.1.0.0/16:8080/tcp",
            "0.0.0.0/0:9/udp",
            "[fd00::]/8:443",
            "fd00:1::/32",
            "[fd00:1::5]/128:22/tcp",
            "fe80::/10",
        ];
        let rules: std::vec::Vec<AllowRule> = texts.iter().map(|t| t.parse().unwrap()).collect();
        let c = compile_profile(&ProfileConfig {
            allow: rules.clone(),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(c.allow.len(), texts.len() - 1, "one duplicate prefix");
        for (_, _, value) in &c.allow {
            let rule = &rules[value.rule as usize];
            let expected: std::vec::Vec<(u16, u16, u8)> = rules
                .iter()
                .filter(|r| r.net.contains(&rule.net))
                .map(|r| {
                    let (lo, hi) = r.ports.unwrap_or((0, u16::MAX));
                    (lo, hi, r.proto)
                })
                .collect();
            let got: std::vec::Vec<(u16, u16, u8)> = value.ranges[..value.n_ranges as usize]
                .iter()
                .map(|r| (r.lo, r.hi, r.proto))
                .collect();
            assert_eq!(got, expected, "{}", rule.net);
        }
    }

    #[test]
    fn seal_interval_parses_and_a_bad_one_names_its_line() {
        let c = Config::parse(Path::new("t.toml"), "[audit]\n").unwrap();
        assert_eq!(c.audit.seal_interval(), 900);
        for (t, want) in [
            ("1", 1),
            ("\"30s\"", 30),
            ("\"15min\"", 900),
            ("\"2h\"", 7200),
        ] {
            let c = Config::parse(
                Path::new("t.toml"),
                &format!("[audit]\nseal_interval = {t}\n"),
            )
            .unwrap();
            assert_eq!(c.audit.seal_interval(), want, "{t}");
        }
        for t in ["0", "\"soon\"", "\"5 fortnights\""] {
            let err = Config::parse(
                Path::new("t.toml"),
                &format!("[audit]\n\nseal_interval = {t}\n"),
            )
            .unwrap_err()
            .to_string();
            assert!(
                err.contains("line 3") && err.contains("seal_interval"),
                "{t}: {err}"
            );
        }
        let err = Config::parse(Path::new("t.toml"), "[audit]\nseal_intervall = 5\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn audit_fault_settings_parse_and_a_bad_space_left_names_its_line() {
        let text = "[audit]\nspace_left = \"5%\"\ndisk_full_action = \"refuse\"\n";
        let c = Config::parse(Path::new("t.toml"), text).unwrap();
        assert_eq!(c.audit.space_left(), SpaceLeft::Percent(5.0));
        assert_eq!(c.audit.space_left().bytes(1000), 50);
        assert_eq!(c.audit.disk_full_action, Some(DiskAction::Refuse));
        assert_eq!(c.audit.disk_error_action, None);
        for (t, want) in [
            ("1048576", 1u64 << 20),
            ("\"64MiB\"", 64 << 20),
            ("\"2GB\"", 2_000_000_000),
        ] {
            let c = Config::parse(Path::new("t.toml"), &format!("[audit]\nspace_left = {t}\n"))
                .unwrap();
            assert_eq!(c.audit.space_left(), SpaceLeft::Bytes(want), "{t}");
        }
        let err = Config::parse(Path::new("t.toml"), "[audit]\n\nspace_left = \"lots\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("line 3") && err.contains("space_left"),
            "{err}"
        );
        let err = Config::parse(
            Path::new("t.toml"),
            "[audit]\ndisk_full_action = \"halt\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn metrics_listen_is_tcp_or_a_unix_path_and_off_by_default() {
        let c = Config::parse(Path::new("t.toml"), "").unwrap();
        assert_eq!(c.metrics.listen, None);
        let c = Config::parse(
            Path::new("t.toml"),
            "[metrics]\nlisten = \"127.0.0.1:9469\"\n",
        )
        .unwrap();
        assert_eq!(
            c.metrics.listen,
            Some(MetricsListen::Tcp("127.0.0.1:9469".parse().unwrap()))
        );
        let c = Config::parse(
            Path::new("t.toml"),
            "[metrics]\nlisten = \"/run/egressd/metrics.sock\"\n",
        )
        .unwrap();
        assert_eq!(
            c.metrics.listen,
            Some(MetricsListen::Unix("/run/egressd/metrics.sock".into()))
        );
        for bad in [
            "[metrics]\n\nlisten = \"localhost\"\n",
            "[metrics]\n\nport = 9469\n",
        ] {
            let err = Config::parse(Path::new("t.toml"), bad)
                .unwrap_err()
                .to_string();
            assert!(err.contains("t.toml") && err.contains("line 3"), "{err}");
        }
    }
}
