//! The one owner of the loaded eBPF object: programs, links and maps. Other tasks talk to it over a
//! channel (`Handle`), so no map is ever written from two places at once.

use egressd_common::policy::{allow_key, CompiledProfile};
use std::{
    collections::BTreeMap,
    fs,
    os::{
        fd::{AsFd as _, BorrowedFd},
        unix::fs::MetadataExt as _,
    },
    path::{Path, PathBuf},
};

use aya::{
    maps::{
        lpm_trie::Key, Array, HashMap, LpmTrie, MapData, PerCpuArray, PerCpuHashMap, PerCpuValues,
        RingBuf,
    },
    programs::{
        links::{FdLink, PinnedLink},
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock, CgroupSockAddr,
    },
    util::nr_cpus,
    Ebpf, EbpfLoader,
};
use egressd_common::{
    maps, policy_slot,
    prog_query::{self, REQUIRED_ATTACH_TYPES},
    programs,
    protocol::HookStatus,
    AllowKey, AllowValue, Counters, DnsAllowKey, DnsOrigin, DnsPeerKey, FoldKey, FoldValue,
    Profile, SessionInfo, MAX_PROFILES, MAX_SESSIONS,
};
use tokio::sync::{mpsc, oneshot};

use crate::{audit::PolicyHashes, counter_slots::CounterSlots};

#[derive(Debug, thiserror::Error)]
pub enum EnforcerError {
    #[error("loading the eBPF programs: {0} (run `egressctl doctor` to check the kernel)")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source} (run `egressctl doctor` to check the kernel)")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("link of {name}: {source}")]
    Link {
        name: &'static str,
        source: aya::programs::links::LinkError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("map {name}: a batch write failed after {done} entries: {source}")]
    MapBatch {
        name: &'static str,
        done: usize,
        source: std::io::Error,
    },
    #[error("map {0} is missing from the eBPF object (a build problem)")]
    MissingMap(&'static str),
    #[error("pinning under {path}: {message}")]
    Pin { path: PathBuf, message: String },
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

type Result<T, E = EnforcerError> = std::result::Result<T, E>;

/// A batch's result; where the kernel has no batch op for the map, `each` does it one entry at a
/// time.
fn batch_or_each(
    name: &'static str,
    batch: Result<(), crate::map_batch::BatchError>,
    each: impl FnOnce() -> Result<()>,
) -> Result<()> {
    match batch {
        Ok(()) => Ok(()),
        Err(crate::map_batch::BatchError::Unsupported) => each(),
        Err(crate::map_batch::BatchError::Failed { done, error }) => Err(EnforcerError::MapBatch {
            name,
            done,
            source: error,
        }),
    }
}

/// The object built by build.rs from egressd-ebpf.
static PROGRAMS_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/egressd"));

/// The hooks, in attach order. The backstop goes first so that no packet is ever judged by the socket
/// hooks alone while the others are being attached.
const HOOKS: [(&str, &str, u32); 10] = [
    (
        programs::SKB_EGRESS,
        "cgroup_skb/egress",
        prog_query::ATTACH_INET_EGRESS,
    ),
    (
        programs::SOCK_CREATE,
        "cgroup/sock_create",
        prog_query::ATTACH_INET_SOCK_CREATE,
    ),
    (
        programs::CONNECT4,
        "cgroup/connect4",
        prog_query::ATTACH_INET4_CONNECT,
    ),
    (
        programs::CONNECT6,
        "cgroup/connect6",
        prog_query::ATTACH_INET6_CONNECT,
    ),
    (
        programs::SENDMSG4,
        "cgroup/sendmsg4",
        prog_query::ATTACH_UDP4_SENDMSG,
    ),
    (
        programs::SENDMSG6,
        "cgroup/sendmsg6",
        prog_query::ATTACH_UDP6_SENDMSG,
    ),
    (
        programs::RECVMSG4,
        "cgroup/recvmsg4",
        prog_query::ATTACH_UDP4_RECVMSG,
    ),
    (
        programs::RECVMSG6,
        "cgroup/recvmsg6",
        prog_query::ATTACH_UDP6_RECVMSG,
    ),
    (
        programs::BIND4,
        "cgroup/bind4",
        prog_query::ATTACH_INET4_BIND,
    ),
    (
        programs::BIND6,
        "cgroup/bind6",
        prog_query::ATTACH_INET6_BIND,
    ),
];

/// BPF LSM programs and their hooks. Optional: where BPF LSM is not active the cgroup layer
/// still enforces, and sessions whose profile requires "lsm" are refused.
const LSM_HOOKS: [(&str, &str); 1] = [(programs::LSM_SOCKET_CREATE, "socket_create")];

/// The unix backstop (Linux 6.7+). Optional like the LSM layer: without it egressd cannot make the
/// session's own unix connects safe to let through, so the unix layer is reported missing, and
/// sessions whose profile requires it are refused.
const UNIX_HOOKS: [(&str, &str, u32); 2] = [
    (
        programs::CONNECT_UNIX,
        "cgroup/connect_unix",
        prog_query::ATTACH_UNIX_CONNECT,
    ),
    (
        programs::SENDMSG_UNIX,
        "cgroup/sendmsg_unix",
        prog_query::ATTACH_UNIX_SENDMSG,
    ),
];

pub struct DnsMaps {
    pub peers: HashMap<MapData, DnsPeerKey, DnsOrigin>,
    pub allow: HashMap<MapData, DnsAllowKey, u64>,
}

/// The maps of repeated decisions, for the audit task: it alone reads the kernel's counts and
/// records what it has written of them.
pub struct FoldMaps {
    pub folds: PerCpuHashMap<MapData, FoldKey, FoldValue>,
    pub reported: HashMap<MapData, FoldKey, u64>,
}

pub struct Enforcer {
    ebpf: Ebpf,
    hooks: Vec<(HookStatus, u32)>,
    /// The LSM layer's programs, or why it is not in force.
    lsm: Result<Vec<HookStatus>, String>,
    /// The unix backstop's programs with their attach types, or why they are not attached.
    unix: Result<Vec<(HookStatus, u32)>, String>,
    /// Policy hash per generation, read by the audit task to label decisions.
    hashes: PolicyHashes,
    /// The allow-table entries each half of the double buffer holds, (prefix, key) and value,
    /// once this daemon has written that half: a reload then deletes only the entries the new
    /// policy drops and writes only those it adds or changes, instead of walking the whole trie.
    /// `None` after start or adoption.
    installed: [Option<BTreeMap<(u32, AllowKey), AllowValue>>; 2],
    /// The profile table of each half as written, so a reload writes only the slots that change.
    profiles_installed: [Option<Vec<Profile>>; 2],
    /// `SESSION_COUNTERS` slots no session holds; built from `SESSIONS` on first use (after a
    /// restart, the running sessions keep theirs).
    free_counters: Option<CounterSlots>,
}

/// Pin layout under bpffs: `<dir>/maps/<MAP>` and `<dir>/links/<program>`.
pub struct PinDir(pub PathBuf);

impl PinDir {
    pub fn maps(&self) -> PathBuf {
        self.0.join("maps")
    }
    pub fn links(&self) -> PathBuf {
        self.0.join("links")
    }
}

fn io_err<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> EnforcerError + 'a {
    move |source| EnforcerError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

/// The inode the kernel gives the initial pid namespace (PROC_PID_INIT_INO).
const INITIAL_PID_NAMESPACE: u64 = 0xEFFF_FFFC;

/// (device, inode) of egressd's pid namespace for the programs to number pids in, or (0, 0) in the
/// initial namespace, where the kernel's own numbering is already egressd's.
fn own_pid_namespace() -> Result<(u64, u64)> {
    let path = Path::new("/proc/self/ns/pid");
    let meta = fs::metadata(path).map_err(io_err("reading", path))?;
    Ok(if meta.ino() == INITIAL_PID_NAMESPACE {
        (0, 0)
    } else {
        (meta.dev(), meta.ino())
    })
}

impl Enforcer {
    /// Loads the programs (reusing pinned maps, so sessions of a previous daemon keep their state),
    /// attaches them to `parent` and pins the links. Links of a previous daemon are replaced only
    /// after the new ones are attached: there is no instant without enforcement, and no double attach
    /// is left behind.
    pub fn load(
        parent: &Path,
        dns_port: u16,
        ring_bytes: u32,
        fold: bool,
        pins: &PinDir,
        hashes: PolicyHashes,
    ) -> Result<Enforcer> {
        for dir in [pins.maps(), pins.links()] {
            fs::create_dir_all(&dir).map_err(io_err("creating", &dir))?;
        }
        let map_paths: Vec<(&str, PathBuf)> = maps::ALL
            .iter()
            .map(|n| (*n, pins.maps().join(n)))
            .collect();
        let dns_port = u32::from(dns_port);
        let mut loader = EbpfLoader::new();
        loader.override_global(programs::GLOBAL_DNS_PORT, &dns_port, true);
        let parent_id = fs::metadata(parent)
            .map_err(io_err("reading cgroup", parent))?
            .ino();
        loader.override_global(programs::GLOBAL_PARENT_ID, &parent_id, true);
        let (pidns_dev, pidns_ino) = own_pid_namespace()?;
        loader.override_global(programs::GLOBAL_PIDNS_DEV, &pidns_dev, true);
        loader.override_global(programs::GLOBAL_PIDNS_INO, &pidns_ino, true);
        let fold = u32::from(fold);
        loader.override_global(programs::GLOBAL_FOLD, &fold, true);
        loader.map_max_entries(maps::EVENTS, ring_bytes);
        let cpus = aya::util::nr_cpus().map_or(1, |n| n as u32);
        loader.map_max_entries(maps::FOLDS, egressd_common::fold_entries(cpus));
        for (name, path) in &map_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(PROGRAMS_OBJECT)?;
        let cgroup = fs::File::open(parent).map_err(io_err("opening cgroup", parent))?;

        let mut hooks = Vec::new();
        for (name, attach_name, attach_type) in HOOKS {
            let prog_err = |source| EnforcerError::Program { name, source };
            let program = ebpf.program_mut(name).ok_or(EnforcerError::Program {
                name,
                source: aya::programs::ProgramError::NotLoaded,
            })?;
            let pin = pins.links().join(name);
            let swapped = |fd: BorrowedFd<'_>| {
                crate::link_swap::swap_into_pinned(&pin, fd, parent_id, attach_type).is_ok()
            };
            let link: Option<FdLink> = match program {
                aya::programs::Program::CgroupSockAddr(p) => {
                    p.load().map_err(prog_err)?;
                    let fd = p.fd().map_err(prog_err)?.as_fd();
                    (!swapped(fd))
                        .then(|| attach_sock_addr(name, p, &cgroup))
                        .transpose()?
                }
                aya::programs::Program::CgroupSock(p) => {
                    p.load().map_err(prog_err)?;
                    let fd = p.fd().map_err(prog_err)?.as_fd();
                    (!swapped(fd))
                        .then(|| attach_sock(name, p, &cgroup))
                        .transpose()?
                }
                aya::programs::Program::CgroupSkb(p) => {
                    p.load().map_err(prog_err)?;
                    let fd = p.fd().map_err(prog_err)?.as_fd();
                    (!swapped(fd))
                        .then(|| attach_skb(name, p, &cgroup))
                        .transpose()?
                }
                _ => unreachable!("egressd-ebpf has only cgroup programs"),
            };
            let prog_id = program.info().map_err(prog_err)?.id();
            hooks.push((
                match link {
                    Some(link) => pin_hook(link, name, attach_name.to_string(), prog_id, pins)?,
                    None => described(&pin, name, attach_name.to_string(), prog_id),
                },
                attach_type,
            ));
        }
        let lsm = attach_lsm(&mut ebpf, pins);
        if let Err(why) = &lsm {
            tracing::warn!("BPF LSM layer not in force: {why}; the cgroup layer enforces alone");
        }
        let unix = attach_unix(&mut ebpf, &cgroup, parent_id, pins);
        if let Err(why) = &unix {
            tracing::warn!(
                "unix layer not in force: {why}; sessions can reach unix sockets outside them"
            );
        }
        Ok(Enforcer {
            ebpf,
            hooks,
            lsm,
            unix,
            hashes,
            installed: [None, None],
            profiles_installed: [None, None],
            free_counters: None,
        })
    }

    /// The layers in force: "cgroup" always, "landlock" when the kernel offers the Landlock scopes
    /// egressctl applies to each session, "lsm" when BPF LSM programs are attached and the kernel
    /// runs BPF LSM hooks.
    pub fn layers(&self) -> Vec<String> {
        let mut layers = vec!["cgroup".to_string()];
        if egressd_common::layers::landlock_abi()
            .is_some_and(|v| v >= egressd_common::layers::LANDLOCK_MIN_ABI)
        {
            layers.push("landlock".into());
        }
        if self.lsm.is_ok() {
            layers.push("lsm".into());
        }
        if self.unix.is_ok() {
            layers.push("unix".into());
        }
        layers
    }

    /// Why the unix layer is not in force (None: it is).
    pub fn unix_missing(&self) -> Option<String> {
        self.unix.as_ref().err().cloned()
    }

    /// The audit events ring buffer, for the task that drains it (the only map that leaves us).
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>> {
        let map = self
            .ebpf
            .take_map(maps::EVENTS)
            .ok_or(EnforcerError::MissingMap(maps::EVENTS))?;
        RingBuf::try_from(map).map_err(Self::map_err(maps::EVENTS))
    }

    /// The maps of the DNS filter, for the resolver: it alone reads who sent a query and opens the
    /// addresses of allowed answers.
    pub fn take_dns_maps(&mut self) -> Result<DnsMaps> {
        let mut take = |name: &'static str| {
            let map = self
                .ebpf
                .take_map(name)
                .ok_or(EnforcerError::MissingMap(name))?;
            Ok::<_, EnforcerError>((name, map))
        };
        let (n, peers) = take(maps::DNS_PEERS)?;
        let peers = HashMap::try_from(peers).map_err(Self::map_err(n))?;
        let (n, allow) = take(maps::DNS_ALLOW)?;
        let allow = HashMap::try_from(allow).map_err(Self::map_err(n))?;
        Ok(DnsMaps { peers, allow })
    }

    /// The maps of repeated decisions, for the audit task.
    pub fn take_fold_maps(&mut self) -> Result<FoldMaps> {
        let mut take = |name: &'static str| {
            self.ebpf
                .take_map(name)
                .ok_or(EnforcerError::MissingMap(name))
        };
        let folds =
            PerCpuHashMap::try_from(take(maps::FOLDS)?).map_err(Self::map_err(maps::FOLDS))?;
        let reported = HashMap::try_from(take(maps::FOLD_REPORTED)?)
            .map_err(Self::map_err(maps::FOLD_REPORTED))?;
        Ok(FoldMaps { folds, reported })
    }

    /// The aya-log ring buffer of the programs, for the task that bridges it into tracing.
    pub fn take_logger(&mut self) -> Option<aya_log::EbpfLogger<&'static dyn log::Log>> {
        match aya_log::EbpfLogger::init(&mut self.ebpf) {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::warn!("kernel program logs unavailable: {e}");
                None
            }
        }
    }

    fn map(&mut self, name: &'static str) -> Result<&mut aya::maps::Map> {
        self.ebpf
            .map_mut(name)
            .ok_or(EnforcerError::MissingMap(name))
    }

    fn map_err(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> EnforcerError {
        move |source| EnforcerError::Map { name, source }
    }

    pub fn hooks(&self) -> Vec<HookStatus> {
        let mut all: Vec<HookStatus> = self.hooks.iter().map(|(h, _)| h.clone()).collect();
        if let Ok(lsm) = &self.lsm {
            all.extend(lsm.iter().cloned());
        }
        if let Ok(unix) = &self.unix {
            all.extend(unix.iter().map(|(h, _)| h.clone()));
        }
        all
    }

    /// Writes the profiles into the half of the double-buffered policy that is not in force, then
    /// flips the generation: one 4-byte map write switches every session at once. Returns the
    /// generation now in force.
    pub fn install_policy(
        &mut self,
        profiles: &[(u32, CompiledProfile)],
        hash: String,
    ) -> Result<u32> {
        let generation = {
            let gen: Array<&mut MapData, u32> = Array::try_from(self.map(maps::POLICY_GEN)?)
                .map_err(Self::map_err(maps::POLICY_GEN))?;
            gen.get(&0, 0).map_err(Self::map_err(maps::POLICY_GEN))?
        };
        let next = generation ^ 1;
        // Known before the flip, so no decision under the new generation lacks its policy hash.
        if let Ok(mut h) = self.hashes.lock() {
            h.insert(next, hash);
        }
        let slots = policy_slot(next, 0)..policy_slot(next, 0) + MAX_PROFILES;
        let half = (next & 1) as usize;
        // This half is not in force, so nothing reads it meanwhile: only what differs from what
        // it holds (the policy of two reloads ago) is written.
        let table_wanted: Vec<Profile> = slots
            .clone()
            .map(|slot| {
                profiles
                    .iter()
                    .find(|(idx, _)| policy_slot(next, *idx) == slot)
                    .map(|(_, p)| p.profile)
                    .unwrap_or_default()
            })
            .collect();
        {
            let known = self.profiles_installed[half].take();
            let mut table: Array<&mut MapData, Profile> =
                Array::try_from(self.map(maps::PROFILES)?)
                    .map_err(Self::map_err(maps::PROFILES))?;
            for (i, (slot, value)) in slots.clone().zip(&table_wanted).enumerate() {
                if known.as_ref().is_some_and(|k| k[i] == *value) {
                    continue;
                }
                table
                    .set(slot, *value, 0)
                    .map_err(Self::map_err(maps::PROFILES))?;
            }
        }
        self.profiles_installed[half] = Some(table_wanted);
        let wanted: BTreeMap<(u32, AllowKey), AllowValue> = profiles
            .iter()
            .flat_map(|(idx, compiled)| {
                let slot = policy_slot(next, *idx);
                compiled
                    .allow
                    .iter()
                    .map(move |(prefix, addr, value)| ((*prefix, allow_key(slot, *addr)), *value))
            })
            .collect();
        let known = self.installed[half].take();
        {
            let mut allow: LpmTrie<&mut MapData, AllowKey, AllowValue> =
                LpmTrie::try_from(self.map(maps::ALLOW)?).map_err(Self::map_err(maps::ALLOW))?;
            // Entries of this half that the new policy does not have. Updates overwrite the rest
            // in place (this half is not in force, so nothing reads it meanwhile).
            let stale: Vec<(u32, AllowKey)> = match &known {
                Some(known) => known
                    .keys()
                    .filter(|k| !wanted.contains_key(k))
                    .copied()
                    .collect(),
                None => allow
                    .keys()
                    .filter_map(|k| k.ok())
                    .filter(|k| slots.contains(&u32::from_be_bytes(k.data().slot)))
                    .map(|k| (k.prefix_len(), k.data()))
                    .filter(|k| !wanted.contains_key(k))
                    .collect(),
            };
            let stale: Vec<Key<AllowKey>> =
                stale.into_iter().map(|(p, k)| Key::new(p, k)).collect();
            let (changed_keys, changed_values): (Vec<Key<AllowKey>>, Vec<AllowValue>) = wanted
                .iter()
                .filter(|(k, v)| known.as_ref().is_none_or(|known| known.get(k) != Some(*v)))
                .map(|((prefix, key), value)| (Key::new(*prefix, *key), *value))
                .unzip();
            // One system call for all of them where the kernel has batch ops (5.6+), else one each.
            use aya::maps::IterableMap as _;
            let deleted = crate::map_batch::delete(allow.map(), &stale);
            batch_or_each(maps::ALLOW, deleted, || {
                for key in &stale {
                    allow.remove(key).map_err(Self::map_err(maps::ALLOW))?;
                }
                Ok(())
            })?;
            let written = crate::map_batch::update(allow.map(), &changed_keys, &changed_values);
            batch_or_each(maps::ALLOW, written, || {
                for (key, value) in changed_keys.iter().zip(&changed_values) {
                    allow
                        .insert(key, value, 0)
                        .map_err(Self::map_err(maps::ALLOW))?;
                }
                Ok(())
            })?;
        }
        self.installed[half] = Some(wanted);
        let mut gen: Array<&mut MapData, u32> = Array::try_from(self.map(maps::POLICY_GEN)?)
            .map_err(Self::map_err(maps::POLICY_GEN))?;
        gen.set(0, next, 0)
            .map_err(Self::map_err(maps::POLICY_GEN))?;
        Ok(next)
    }

    /// Registers a session. A cgroup already registered (a restarted daemon adopting it) keeps
    /// its counters; a new one gets a zeroed `SESSION_COUNTERS` slot.
    pub fn add_session(&mut self, cgroup_id: u64, profile: u32) -> Result<()> {
        let known = {
            let sessions: HashMap<&mut MapData, u64, SessionInfo> =
                HashMap::try_from(self.map(maps::SESSIONS)?)
                    .map_err(Self::map_err(maps::SESSIONS))?;
            match sessions.get(&cgroup_id, 0) {
                Ok(info) => Some(info),
                Err(aya::maps::MapError::KeyNotFound) => None,
                Err(e) => return Err(Self::map_err(maps::SESSIONS)(e)),
            }
        };
        let counters = match known {
            // Registered before (by this daemon or one before it): its counts go on where they are.
            Some(info) => info.counters,
            None => match self.take_counter_slot()? {
                Some(slot) => {
                    let zeros = self.zero_counters()?;
                    let mut array: PerCpuArray<&mut MapData, Counters> =
                        PerCpuArray::try_from(self.map(maps::SESSION_COUNTERS)?)
                            .map_err(Self::map_err(maps::SESSION_COUNTERS))?;
                    array
                        .set(slot, zeros, 0)
                        .map_err(Self::map_err(maps::SESSION_COUNTERS))?;
                    slot
                }
                // Every slot taken (cannot happen while SESSIONS has room for as many sessions
                // as there are slots): counted by cgroup id, as sessions were before the slots.
                None => 0,
            },
        };
        if counters == 0 {
            let zeros = self.zero_counters()?;
            let mut by_id: PerCpuHashMap<&mut MapData, u64, Counters> =
                PerCpuHashMap::try_from(self.map(maps::COUNTERS)?)
                    .map_err(Self::map_err(maps::COUNTERS))?;
            // BPF_NOEXIST: a session already counted keeps its counts.
            const BPF_NOEXIST: u64 = 1;
            match by_id.insert(cgroup_id, zeros, BPF_NOEXIST) {
                Ok(()) => {}
                Err(aya::maps::MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => return Err(Self::map_err(maps::COUNTERS)(e)),
            }
        }
        let mut sessions: HashMap<&mut MapData, u64, SessionInfo> =
            HashMap::try_from(self.map(maps::SESSIONS)?).map_err(Self::map_err(maps::SESSIONS))?;
        let written = sessions
            .insert(cgroup_id, SessionInfo { profile, counters }, 0)
            .map_err(Self::map_err(maps::SESSIONS));
        if written.is_err() && known.is_none() {
            if let Some(free) = self.free_counters.as_mut() {
                free.give_back(counters);
            }
        }
        written
    }

    fn zero_counters(&self) -> Result<PerCpuValues<Counters>> {
        let cpus = nr_cpus().map_err(|(path, e)| io_err("reading", Path::new(path))(e))?;
        PerCpuValues::try_from(vec![Counters::default(); cpus]).map_err(io_err(
            "sizing per-CPU counters for",
            Path::new(maps::SESSION_COUNTERS),
        ))
    }

    /// A `SESSION_COUNTERS` slot no session holds (see `CounterSlots`).
    fn take_counter_slot(&mut self) -> Result<Option<u32>> {
        if self.free_counters.is_none() {
            let sessions: HashMap<&mut MapData, u64, SessionInfo> =
                HashMap::try_from(self.map(maps::SESSIONS)?)
                    .map_err(Self::map_err(maps::SESSIONS))?;
            let mut held = Vec::new();
            for entry in sessions.iter() {
                let (_, info) = entry.map_err(Self::map_err(maps::SESSIONS))?;
                held.push(info.counters);
            }
            self.free_counters = Some(CounterSlots::new(MAX_SESSIONS, held));
        }
        Ok(self.free_counters.as_mut().and_then(CounterSlots::take))
    }

    /// Forgets a session and returns its final counters.
    pub fn remove_session(&mut self, cgroup_id: u64) -> Result<Counters> {
        let (totals, slot) = self.counters_and_slot(cgroup_id)?;
        {
            let mut sessions: HashMap<&mut MapData, u64, SessionInfo> =
                HashMap::try_from(self.map(maps::SESSIONS)?)
                    .map_err(Self::map_err(maps::SESSIONS))?;
            let _ = sessions.remove(&cgroup_id);
        }
        let mut by_id: PerCpuHashMap<&mut MapData, u64, Counters> =
            PerCpuHashMap::try_from(self.map(maps::COUNTERS)?)
                .map_err(Self::map_err(maps::COUNTERS))?;
        let _ = by_id.remove(&cgroup_id);
        if let Some(free) = self.free_counters.as_mut() {
            free.give_back(slot);
        }
        Ok(totals)
    }

    /// Session ids registered in the kernel with their profile index (for adoption after a restart).
    pub fn registered_sessions(&mut self) -> Result<Vec<(u64, u32)>> {
        let sessions: HashMap<&mut MapData, u64, SessionInfo> =
            HashMap::try_from(self.map(maps::SESSIONS)?).map_err(Self::map_err(maps::SESSIONS))?;
        Ok(sessions
            .iter()
            .filter_map(|r| r.ok())
            .map(|(k, v)| (k, v.profile))
            .collect())
    }

    pub fn counters(&mut self, cgroup_id: u64) -> Result<Counters> {
        self.counters_and_slot(cgroup_id).map(|(c, _)| c)
    }

    /// A session's counts: its `SESSION_COUNTERS` slot's, plus what `COUNTERS` holds under its
    /// cgroup id (a session registered by an egressd before the slots).
    fn counters_and_slot(&mut self, cgroup_id: u64) -> Result<(Counters, u32)> {
        let slot = {
            let sessions: HashMap<&mut MapData, u64, SessionInfo> =
                HashMap::try_from(self.map(maps::SESSIONS)?)
                    .map_err(Self::map_err(maps::SESSIONS))?;
            match sessions.get(&cgroup_id, 0) {
                Ok(info) => info.counters,
                Err(aya::maps::MapError::KeyNotFound) => 0,
                Err(e) => return Err(Self::map_err(maps::SESSIONS)(e)),
            }
        };
        let mut total = Counters::default();
        if slot != 0 {
            let array: PerCpuArray<&mut MapData, Counters> =
                PerCpuArray::try_from(self.map(maps::SESSION_COUNTERS)?)
                    .map_err(Self::map_err(maps::SESSION_COUNTERS))?;
            let per_cpu = array
                .get(&slot, 0)
                .map_err(Self::map_err(maps::SESSION_COUNTERS))?;
            per_cpu.iter().for_each(|c| total.add(c));
        }
        let by_id: PerCpuHashMap<&mut MapData, u64, Counters> =
            PerCpuHashMap::try_from(self.map(maps::COUNTERS)?)
                .map_err(Self::map_err(maps::COUNTERS))?;
        match by_id.get(&cgroup_id, 0) {
            Ok(per_cpu) => per_cpu.iter().for_each(|c| total.add(c)),
            Err(aya::maps::MapError::KeyNotFound) => {}
            Err(e) => return Err(Self::map_err(maps::COUNTERS)(e)),
        }
        Ok((total, slot))
    }

    /// Attach types for which none of our programs is effective on `cgroup` (empty: enforced).
    pub fn missing_on(&self, cgroup: &Path) -> Result<Vec<String>> {
        let dir = fs::File::open(cgroup).map_err(io_err("opening cgroup", cgroup))?;
        let mut missing = Vec::new();
        let unix = self.unix.as_deref().unwrap_or(&[]);
        for (hook, attach_type) in self.hooks.iter().chain(unix) {
            let ids = prog_query::effective_programs(&dir, *attach_type)
                .map_err(io_err("querying programs of", cgroup))?;
            if !ids.contains(&hook.prog_id) {
                missing.push(hook.attach_type.clone());
            }
        }
        debug_assert_eq!(self.hooks.len(), REQUIRED_ATTACH_TYPES.len());
        Ok(missing)
    }
}

/// Loads and attaches the LSM programs, pinning their links, when the kernel runs BPF LSM hooks
/// (attaching works even where it does not, and would then enforce nothing).
fn attach_lsm(ebpf: &mut Ebpf, pins: &PinDir) -> Result<Vec<HookStatus>, String> {
    match egressd_common::layers::bpf_lsm_listed() {
        Ok(true) => {}
        Ok(false) => {
            return Err("the kernel's LSM list has no \"bpf\" (boot with lsm=...,bpf)".into())
        }
        Err(e) => return Err(e),
    }
    let btf = aya::Btf::from_sys_fs().map_err(|e| format!("kernel BTF: {e}"))?;
    let mut out = Vec::new();
    for (name, hook) in LSM_HOOKS {
        let p: &mut aya::programs::Lsm = ebpf
            .program_mut(name)
            .ok_or_else(|| format!("program {name} missing"))?
            .try_into()
            .map_err(|e| format!("{name}: {e}"))?;
        p.load(hook, &btf)
            .map_err(|e| format!("loading {name}: {e}"))?;
        let id = p.attach().map_err(|e| format!("attaching {name}: {e}"))?;
        let link: FdLink = p.take_link(id).map_err(|e| format!("{name}: {e}"))?.into();
        let prog_id = p.info().map_err(|e| format!("{name}: {e}"))?.id();
        out.push(
            pin_hook(link, name, format!("lsm/{hook}"), prog_id, pins)
                .map_err(|e| e.to_string())?,
        );
    }
    Ok(out)
}

/// Attaches the unix backstop to `cgroup`, pinning its links. Kernels before 6.7 have no such
/// attach types: loading fails there, and the daemon says which layer is missing.
fn attach_unix(
    ebpf: &mut Ebpf,
    cgroup: &fs::File,
    cgroup_id: u64,
    pins: &PinDir,
) -> Result<Vec<(HookStatus, u32)>, String> {
    let mut out = Vec::new();
    for (name, attach_name, attach_type) in UNIX_HOOKS {
        let p: &mut CgroupSockAddr = ebpf
            .program_mut(name)
            .ok_or_else(|| format!("program {name} missing"))?
            .try_into()
            .map_err(|e| format!("{name}: {e}"))?;
        let unsupported = |e: String| format!("{e} (cgroup unix hooks need Linux 6.7 or later)");
        p.load()
            .map_err(|e| unsupported(format!("loading {name}: {e}")))?;
        let pin = pins.links().join(name);
        let fd = p.fd().map_err(|e| format!("{name}: {e}"))?.as_fd();
        let swapped = crate::link_swap::swap_into_pinned(&pin, fd, cgroup_id, attach_type).is_ok();
        let prog_id = p.info().map_err(|e| format!("{name}: {e}"))?.id();
        let hook = if swapped {
            described(&pin, name, attach_name.to_string(), prog_id)
        } else {
            let link = attach_sock_addr(name, p, cgroup).map_err(|e| unsupported(e.to_string()))?;
            pin_hook(link, name, attach_name.to_string(), prog_id, pins)
                .map_err(|e| e.to_string())?
        };
        out.push((hook, attach_type));
    }
    Ok(out)
}

/// A hook whose pinned link now runs our program (swapped in place): described for `status`.
fn described(pin: &Path, name: &str, attach_type: String, prog_id: u32) -> HookStatus {
    HookStatus {
        name: name.to_string(),
        attach_type,
        prog_id,
        pinned: pin.display().to_string(),
    }
}

/// Pins `link` under the links directory by the program's name (replacing a previous daemon's)
/// and describes the hook for `status`.
fn pin_hook(
    link: FdLink,
    name: &str,
    attach_type: String,
    prog_id: u32,
    pins: &PinDir,
) -> Result<HookStatus> {
    let pin_path = pins.links().join(name);
    replace_pinned_link(link, &pin_path)?;
    Ok(HookStatus {
        name: name.to_string(),
        attach_type,
        prog_id,
        pinned: pin_path.display().to_string(),
    })
}

// `Single` means "no flags": the kernel refuses flags on cgroup bpf_link_create and always attaches
// links in multi mode, so other tools' programs on the same cgroup keep running and so do ours.
fn attach_sock_addr(
    name: &'static str,
    p: &mut CgroupSockAddr,
    cgroup: &fs::File,
) -> Result<FdLink> {
    let prog_err = |source| EnforcerError::Program { name, source };
    let id = p
        .attach(cgroup.as_fd(), CgroupAttachMode::Single)
        .map_err(prog_err)?;
    let link = p.take_link(id).map_err(prog_err)?;
    link.try_into()
        .map_err(|source| EnforcerError::Link { name, source })
}

fn attach_sock(name: &'static str, p: &mut CgroupSock, cgroup: &fs::File) -> Result<FdLink> {
    let prog_err = |source| EnforcerError::Program { name, source };
    let id = p
        .attach(cgroup.as_fd(), CgroupAttachMode::Single)
        .map_err(prog_err)?;
    let link = p.take_link(id).map_err(prog_err)?;
    link.try_into()
        .map_err(|source| EnforcerError::Link { name, source })
}

fn attach_skb(name: &'static str, p: &mut CgroupSkb, cgroup: &fs::File) -> Result<FdLink> {
    let prog_err = |source| EnforcerError::Program { name, source };
    let id = p
        .attach(
            cgroup.as_fd(),
            CgroupSkbAttachType::Egress,
            CgroupAttachMode::Single,
        )
        .map_err(prog_err)?;
    let link = p.take_link(id).map_err(prog_err)?;
    link.try_into()
        .map_err(|source| EnforcerError::Link { name, source })
}

/// Pins `link` at `path`, replacing (and so detaching) a link a previous daemon pinned there. The new
/// link is pinned first under a temporary name, so a crash in between leaves both attached, never none.
fn replace_pinned_link(link: FdLink, path: &Path) -> Result<()> {
    let pin_err = |message: String| EnforcerError::Pin {
        path: path.to_owned(),
        message,
    };
    // bpffs refuses names with dots.
    let mut staging = path.as_os_str().to_owned();
    staging.push("_new");
    let staging = PathBuf::from(staging);
    let _ = fs::remove_file(&staging);
    link.pin(&staging).map_err(|e| pin_err(e.to_string()))?;
    if path.exists() {
        match PinnedLink::from_pin(path) {
            // Dropping the unpinned link closes its last reference and detaches it.
            Ok(old) => drop(old.unpin().map_err(|e| pin_err(e.to_string()))?),
            Err(e) => {
                tracing::warn!("removing unreadable pin {}: {e}", path.display());
                fs::remove_file(path).map_err(|e| pin_err(e.to_string()))?;
            }
        }
    }
    fs::rename(&staging, path).map_err(|e| pin_err(e.to_string()))
}

/// Detaches and unpins everything under `pins` (for `egressd cleanup`).
pub fn unpin_all(pins: &PinDir) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    for dir in [pins.links(), pins.maps()] {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.filter_map(|e| e.ok()) {
            let path = e.path();
            fs::remove_file(&path).map_err(io_err("unpinning", &path))?;
            removed.push(path);
        }
        let _ = fs::remove_dir(&dir);
    }
    let _ = fs::remove_dir(&pins.0);
    Ok(removed)
}

/// Requests to the enforcer task.
pub enum Command {
    InstallPolicy(
        Vec<(u32, CompiledProfile)>,
        String,
        oneshot::Sender<Result<u32>>,
    ),
    AddSession(u64, u32, oneshot::Sender<Result<()>>),
    RemoveSession(u64, oneshot::Sender<Result<Counters>>),
    Counters(u64, oneshot::Sender<Result<Counters>>),
    Registered(oneshot::Sender<Result<Vec<(u64, u32)>>>),
    Hooks(oneshot::Sender<Vec<HookStatus>>),
    MissingOn(PathBuf, oneshot::Sender<Result<Vec<String>>>),
}

/// A cheap, cloneable way to talk to the enforcer task.
#[derive(Clone)]
pub struct Handle(mpsc::Sender<Command>);

#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    #[error("the enforcer task has stopped")]
    Gone,
    #[error(transparent)]
    Enforcer(#[from] EnforcerError),
}

impl Handle {
    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, HandleError> {
        let (tx, rx) = oneshot::channel();
        self.0.send(make(tx)).await.map_err(|_| HandleError::Gone)?;
        rx.await.map_err(|_| HandleError::Gone)
    }

    pub async fn install_policy(
        &self,
        p: Vec<(u32, CompiledProfile)>,
        hash: String,
    ) -> Result<u32, HandleError> {
        Ok(self.ask(|tx| Command::InstallPolicy(p, hash, tx)).await??)
    }
    pub async fn add_session(&self, cgroup_id: u64, profile: u32) -> Result<(), HandleError> {
        Ok(self
            .ask(|tx| Command::AddSession(cgroup_id, profile, tx))
            .await??)
    }
    pub async fn remove_session(&self, cgroup_id: u64) -> Result<Counters, HandleError> {
        Ok(self
            .ask(|tx| Command::RemoveSession(cgroup_id, tx))
            .await??)
    }
    pub async fn counters(&self, cgroup_id: u64) -> Result<Counters, HandleError> {
        Ok(self.ask(|tx| Command::Counters(cgroup_id, tx)).await??)
    }
    pub async fn registered(&self) -> Result<Vec<(u64, u32)>, HandleError> {
        Ok(self.ask(Command::Registered).await??)
    }
    pub async fn hooks(&self) -> Result<Vec<HookStatus>, HandleError> {
        self.ask(Command::Hooks).await
    }
    pub async fn missing_on(&self, cgroup: PathBuf) -> Result<Vec<String>, HandleError> {
        Ok(self.ask(|tx| Command::MissingOn(cgroup, tx)).await??)
    }
}

/// Runs the enforcer: the only code that touches the eBPF object after loading.
pub fn spawn(mut enforcer: Enforcer) -> Handle {
    let (tx, mut rx) = mpsc::channel(64);
    tokio::spawn(async move {
        while let Some(cmd) = rx.recv().await {
            // Replies are best effort: a caller that went away does not stop the enforcer.
            match cmd {
                Command::InstallPolicy(p, h, r) => drop(r.send(enforcer.install_policy(&p, h))),
                Command::AddSession(id, prof, r) => drop(r.send(enforcer.add_session(id, prof))),
                Command::RemoveSession(id, r) => drop(r.send(enforcer.remove_session(id))),
                Command::Counters(id, r) => drop(r.send(enforcer.counters(id))),
                Command::Registered(r) => drop(r.send(enforcer.registered_sessions())),
                Command::Hooks(r) => drop(r.send(enforcer.hooks())),
                Command::MissingOn(path, r) => drop(r.send(enforcer.missing_on(&path))),
            }
        }
    });
    Handle(tx)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names user space looks maps and programs up by are the ones in the object.
    #[test]
    fn every_name_user_space_uses_is_in_the_object() {
        let obj = aya_obj::Object::parse(PROGRAMS_OBJECT).expect("the built eBPF object parses");
        for name in maps::ALL {
            assert!(obj.maps.contains_key(name), "map {name} missing");
        }
        for (name, _, _) in HOOKS.iter().chain(&UNIX_HOOKS) {
            assert!(obj.programs.contains_key(*name), "program {name} missing");
        }
        // Globals are set with `must_exist`, so a renamed one fails every load (and every test).
        assert_eq!(HOOKS.len(), REQUIRED_ATTACH_TYPES.len());
    }
}
