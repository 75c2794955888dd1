//! The daemon's shared state and its long-running tasks: policy (re)load, session adoption and
//! the reaper that ends sessions whose cgroup has emptied.

use egressd_common::policy::{Compiled, Config};
use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use std::os::fd::{AsFd as _, AsRawFd, RawFd};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tokio::{
    io::{unix::AsyncFd, Interest},
    sync::{Mutex, RwLock},
};

use crate::{
    audit,
    cgroup::{self, Layout},
    enforcer::Handle,
    sessions::{Registry, Session, StateDir},
    systemd::Systemd,
};

/// A session's allow list being resolved: the result, with the list and the caller it is for.
type PendingAllow =
    tokio::task::JoinHandle<std::io::Result<(crate::handoff::Resolved, Vec<String>, u32)>>;

/// nix's Inotify offers only `AsFd`; tokio's `AsyncFd` wants `AsRawFd`.
pub struct Watcher(Inotify);

impl AsRawFd for Watcher {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// Registers an fd-owning value with the tokio reactor for readability.
pub fn readable_fd<T: AsRawFd>(inner: T) -> std::io::Result<AsyncFd<T>> {
    // SAFETY: `inner` owns its fd and the AsyncFd owns `inner`, so the fd stays open for as long as
    // it is registered and is deregistered before it is closed.
    unsafe { AsyncFd::register_with_interest(inner, Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
}

/// The policy in force and the stable index of each profile in the kernel's tables. Indices
/// survive reloads, so a running session follows its profile's new rules by name.
pub struct PolicyState {
    pub config: Config,
    pub source: String,
    /// Short hash of `config`, carried in audit records.
    pub hash: String,
    indices: BTreeMap<String, u32>,
}

impl PolicyState {
    pub fn index_of(&self, name: &str) -> Option<u32> {
        self.indices.get(name).copied()
    }

    /// Indices for `config`: names seen before keep theirs; new names take free ones that no
    /// running session still uses (a session whose profile was removed keeps an empty slot, which
    /// the kernel reads as the strictest policy: loopback only).
    fn assign(
        config: &Config,
        previous: &BTreeMap<String, u32>,
        in_use: &BTreeSet<u32>,
    ) -> Result<BTreeMap<String, u32>, String> {
        let mut taken: BTreeSet<u32> = in_use.clone();
        let mut out = BTreeMap::new();
        for name in config.profiles.keys() {
            if let Some(i) = previous.get(name) {
                out.insert(name.clone(), *i);
                taken.insert(*i);
            }
        }
        let new: Vec<&String> = config
            .profiles
            .keys()
            .filter(|n| !out.contains_key(*n))
            .collect();
        for name in new {
            let free = (0..egressd_common::MAX_PROFILES)
                .find(|i| !taken.contains(i))
                .ok_or("no free profile slot: too many profiles in use; end some sessions or drop profiles")?;
            taken.insert(free);
            out.insert(name.clone(), free);
        }
        Ok(out)
    }
}

pub struct State {
    pub layout: Layout,
    pub enforcer: Handle,
    pub policy: RwLock<PolicyState>,
    pub registry: Mutex<Registry>,
    pub state_dir: StateDir,
    pub config_path: PathBuf,
    pub audit: tokio::sync::mpsc::Sender<audit::Message>,
    pub audit_path: PathBuf,
    pub names: audit::SessionNames,
    /// The audit log's health, published by the audit task.
    pub audit_health: audit::SharedHealth,
    /// `[audit] disk_full_action` or `disk_error_action` is "refuse" (as at start).
    pub audit_refuses: bool,
    /// Records each running session lost to the audit log, published by the audit task.
    pub audit_lost: audit::LostBySession,
    /// The latest denials, published by the audit task (`egressctl top`).
    pub recent: audit::RecentDenials,
    /// Enforcement layers in force ("cgroup", "lsm"), fixed at start.
    pub layers: Vec<String>,
    /// The connection to systemd, with the systemd backend (made once at start and kept).
    pub systemd: Option<Systemd>,
    /// Why the unix layer is not in force (None: it is), fixed at start.
    pub unix_missing: Option<String>,
    /// egressd's control socket, which sessions may use.
    pub socket_path: PathBuf,
    /// Unix connects decided by the supervisor, per session.
    pub handoff: crate::handoff::Counts,
    /// DNS queries decided by the resolver, per session.
    pub dns: crate::dns::Counts,
    /// Where each session's notices of what was blocked go.
    pub notices: crate::notices::Notices,
    /// Sessions whose connects are supervised (a session hands its listener over once).
    pub supervised: Mutex<std::collections::HashSet<String>>,
    /// Allow lists being resolved for sessions whose egressctl has not handed its listener over
    /// yet (started at Run, so the resolution overlaps egressctl's fork and filter set-up).
    resolving: std::sync::Mutex<std::collections::HashMap<String, PendingAllow>>,
    /// Each session's filtering proxy of the user's session bus, stopped when the session ends.
    pub buses: Mutex<BTreeMap<String, crate::handoff::bus::BusProxy>>,
    watcher: AsyncFd<Watcher>,
}

/// What the daemon needs besides the enforcer to build its state.
pub struct Wiring {
    pub state_dir: StateDir,
    pub config_path: PathBuf,
    pub audit: tokio::sync::mpsc::Sender<audit::Message>,
    pub audit_path: PathBuf,
    pub names: audit::SessionNames,
    pub layers: Vec<String>,
    pub systemd: Option<Systemd>,
    pub unix_missing: Option<String>,
    pub socket_path: PathBuf,
    pub audit_health: audit::SharedHealth,
    pub audit_refuses: bool,
    pub audit_lost: audit::LostBySession,
    pub recent: audit::RecentDenials,
}

impl State {
    pub fn new(
        layout: Layout,
        enforcer: Handle,
        wiring: Wiring,
        config: Config,
        source: String,
    ) -> std::io::Result<State> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        Ok(State {
            layout,
            enforcer,
            policy: RwLock::new(PolicyState {
                hash: egressd_common::policy::policy_hash(&config),
                config,
                source,
                indices: BTreeMap::new(),
            }),
            registry: Mutex::new(Registry::default()),
            state_dir: wiring.state_dir,
            config_path: wiring.config_path,
            audit: wiring.audit,
            audit_path: wiring.audit_path,
            names: wiring.names,
            layers: wiring.layers,
            systemd: wiring.systemd,
            unix_missing: wiring.unix_missing,
            audit_health: wiring.audit_health,
            audit_refuses: wiring.audit_refuses,
            audit_lost: wiring.audit_lost,
            recent: wiring.recent,
            socket_path: wiring.socket_path,
            handoff: Default::default(),
            dns: Default::default(),
            notices: Default::default(),
            supervised: Default::default(),
            resolving: Default::default(),
            buses: Default::default(),
            watcher: readable_fd(Watcher(inotify))?,
        })
    }

    /// Hands a record to the audit task. The channel is bounded: a stalled disk slows session
    /// setup rather than dropping session records.
    pub async fn audit(&self, msg: audit::Message) {
        if self.audit.send(msg).await.is_err() {
            tracing::error!("audit task has stopped: session records are not being written");
        }
    }

    /// Lets the audit task name the session's events (before any can exist).
    pub fn name(&self, s: &Session) {
        crate::metrics::METRICS.name_session(&s.id, &s.profile);
        if let Ok(mut n) = self.names.lock() {
            n.insert(s.cgroup_id, s.id.clone());
        }
    }

    /// Wake the reaper when the session's cgroup.events changes (it does when the cgroup empties).
    pub fn watch(&self, s: &Session) {
        if let Err(e) = self
            .watcher
            .get_ref()
            .0
            .add_watch(&s.dir.join("cgroup.events"), AddWatchFlags::IN_MODIFY)
        {
            tracing::warn!(
                "watching session {}: {e}; it will be noticed by the periodic sweep",
                s.id
            );
        }
    }

    /// Puts `config` in force atomically, with its profiles as validation `compiled` them (what is
    /// not there is compiled now). On any error nothing changes.
    pub async fn apply_policy(
        &self,
        config: Config,
        source: String,
        mut compiled: Compiled,
    ) -> Result<(), String> {
        let in_use: BTreeSet<u32> = self
            .registry
            .lock()
            .await
            .all()
            .map(|s| s.profile_index)
            .collect();
        let mut policy = self.policy.write().await;
        let indices = PolicyState::assign(&config, &policy.indices, &in_use)?;
        let mut profiles = Vec::new();
        for (name, index) in &indices {
            let p = compiled
                .take(&config, name)
                .map_err(|e| format!("profile {name:?}: {e}"))?;
            profiles.push((*index, p));
        }
        let hash = egressd_common::policy::policy_hash(&config);
        self.enforcer
            .install_policy(profiles, hash.clone())
            .await
            .map_err(|e| e.to_string())?;
        *policy = PolicyState {
            config,
            source,
            hash,
            indices,
        };
        Ok(())
    }

    /// Re-reads the config file (SIGHUP, `egressctl policy reload`). A file that does not validate
    /// changes nothing.
    pub async fn reload(&self) -> Result<(), String> {
        let result = match Config::load_compiled(&self.config_path) {
            Ok((config, source, compiled)) => self.apply_policy(config, source, compiled).await,
            Err(e) => Err(e.to_string()),
        };
        crate::metrics::METRICS.reloaded(result.is_ok());
        match &result {
            Ok(()) => {
                let (source, hash) = {
                    let p = self.policy.read().await;
                    (p.source.clone(), p.hash.clone())
                };
                tracing::info!(%source, %hash, "policy reloaded");
                self.audit(audit::Message::Note(format!(
                    "policy reloaded from {source} ({hash})"
                )))
                .await;
            }
            Err(e) => {
                tracing::error!("policy reload refused, the previous policy stays in force: {e}");
                self.audit(audit::Message::Note(format!("policy reload refused: {e}")))
                    .await;
            }
        }
        result.map_err(|e| format!("reload refused, the previous policy stays in force: {e}"))
    }

    /// Takes over the sessions a previous daemon left running (their cgroups and pinned map entries).
    pub async fn adopt_sessions(&self) {
        let registered: BTreeMap<u64, u32> = match self.enforcer.registered().await {
            Ok(v) => v.into_iter().collect(),
            Err(e) => {
                tracing::warn!("reading the sessions registered in the kernel: {e}; registering every session found again");
                BTreeMap::new()
            }
        };
        let mut kept = BTreeSet::new();
        for id in self.layout.existing_sessions() {
            let dir = self.layout.session_dir(&id);
            let cgroup_id = cgroup::id_of(&dir).ok();
            let session = match self.state_dir.load(&id) {
                Some(s) if Some(s.cgroup_id) == cgroup_id => s,
                _ => {
                    tracing::warn!(session = %id, "session cgroup without a record: it stays loopback-only until it ends");
                    Session {
                        id: id.clone(),
                        profile: "unknown".into(),
                        profile_index: u32::MAX,
                        uid: 0,
                        cgroup: self.layout.relative(&dir),
                        dir: dir.clone(),
                        cgroup_id: cgroup_id.unwrap_or(0),
                        started: 0,
                        argv: Vec::new(),
                        listener: None,
                    }
                }
            };
            if session.profile_index != u32::MAX && !registered.contains_key(&session.cgroup_id) {
                if let Err(e) = self
                    .enforcer
                    .add_session(session.cgroup_id, session.profile_index)
                    .await
                {
                    tracing::warn!(session = %id, "re-registering adopted session: {e}");
                }
            }
            kept.insert(session.cgroup_id);
            self.watch(&session);
            tracing::info!(
                session = %id, profile = %session.profile,
                registered = registered.contains_key(&session.cgroup_id),
                "adopted running session"
            );
            self.adopt(session).await;
        }
        if !self.layout.removes_session_cgroups() {
            // systemd removed the scopes that emptied while no daemon ran: their records are all
            // that is left. They are adopted as they are, and the first reap ends them with their
            // final counters (still in the pinned maps) and a session-end record.
            let present: BTreeSet<String> = self.layout.existing_sessions().into_iter().collect();
            for id in self.state_dir.ids() {
                if present.contains(&id) {
                    continue;
                }
                let Some(session) = self.state_dir.load(&id) else {
                    continue;
                };
                kept.insert(session.cgroup_id);
                tracing::info!(session = %id, "session ended while no daemon ran");
                self.adopt(session).await;
            }
        }
        for cgroup_id in registered.keys().filter(|id| !kept.contains(id)) {
            let _ = self.enforcer.remove_session(*cgroup_id).await;
        }
    }

    /// The unix sockets `session` may reach outside itself (its profile's list and its bus
    /// proxy), and whether its profile only audits.
    async fn unix_allow(&self, session: &Session) -> (Vec<String>, bool) {
        let (mut allow, audit_only) = {
            let policy = self.policy.read().await;
            let p = policy.config.profiles.get(&session.profile);
            (
                p.map(|p| p.unix_allowed(session.uid)).unwrap_or_default(),
                p.is_some_and(|p| p.mode == egressd_common::policy::Mode::Audit),
            )
        };
        if let Some(bus) = self.buses.lock().await.get(&session.id) {
            allow.push(bus.socket.display().to_string());
        }
        (allow, audit_only)
    }

    /// Starts resolving `session`'s allow list in the view of `pid` (its egressctl, before
    /// anything of the session runs), for `start_supervision` to take.
    pub async fn prepare_supervision(&self, session: &Session, pid: u32) {
        let (allow, _) = self.unix_allow(session).await;
        let socket = self.socket_path.clone();
        let task = tokio::task::spawn_blocking(move || {
            crate::handoff::resolve(&allow, &socket, pid).map(|r| (r, allow, pid))
        });
        if let Ok(mut r) = self.resolving.lock() {
            r.insert(session.id.clone(), task);
        }
    }

    /// Forgets a resolution no listener came for.
    fn drop_pending_supervision(&self, id: &str) {
        if let Ok(mut r) = self.resolving.lock() {
            if let Some(task) = r.remove(id) {
                task.abort();
            }
        }
    }

    /// Starts the unix supervisor of `session` on its seccomp listener, taken from `pid`.
    pub async fn start_supervision(
        &self,
        session: &Session,
        listener: std::os::fd::OwnedFd,
        pid: u32,
    ) -> Result<(), String> {
        let (allow, audit_only) = self.unix_allow(session).await;
        let pending = self
            .resolving
            .lock()
            .ok()
            .and_then(|mut r| r.remove(&session.id));
        // The resolution made at Run stands for the same caller and the same list; otherwise
        // (a restarted daemon taking an adopted session over) it is made now.
        let resolved = match pending {
            Some(task) => match task.await.map_err(std::io::Error::other).and_then(|r| r) {
                Ok((resolved, for_allow, for_pid)) if for_allow == allow && for_pid == pid => {
                    Some(resolved)
                }
                Ok(_) => None,
                Err(e) => return Err(format!("starting the unix supervisor: {e}")),
            },
            None => None,
        };
        let watch = crate::handoff::Watch {
            session: session.id.clone(),
            cgroup_id: session.cgroup_id,
            cgroup_dir: session.dir.clone(),
            cgroup: session.cgroup.clone(),
            parent: self.layout.relative(&self.layout.parent),
            allow,
            audit_only,
            control_socket: self.socket_path.clone(),
            audit: self.audit.clone(),
            counts: self.handoff.clone(),
        };
        // Resolving blocks (a thread in the caller's namespaces); with it done, what is left is
        // starting the supervisor's thread, not worth handing this worker's tasks off for.
        let started = if resolved.is_some() {
            crate::handoff::supervise(listener, watch, pid, resolved)
        } else {
            tokio::task::block_in_place(|| crate::handoff::supervise(listener, watch, pid, None))
        };
        started.map_err(|e| format!("starting the unix supervisor: {e}"))
    }

    /// Starts the session's filtered session bus when its profile and the user have one. Returns
    /// its address, or None (no bus for the session; why is logged).
    pub async fn start_bus(&self, session: &Session) -> Option<String> {
        let wanted = {
            let policy = self.policy.read().await;
            policy
                .config
                .profiles
                .get(&session.profile)
                .is_some_and(|p| p.session_bus == egressd_common::policy::SessionBus::Filtered)
        };
        // No bus, no proxy: known without the user database and a blocking thread (bus::start
        // looks again, for a bus that goes away meanwhile).
        if !wanted || crate::handoff::bus::user_bus(session.uid).is_none() {
            return None;
        }
        let gid = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(session.uid))
            .ok()
            .flatten()
            .map_or(session.uid, |u| u.gid.as_raw());
        let (id, uid) = (session.id.clone(), session.uid);
        match tokio::task::spawn_blocking(move || crate::handoff::bus::start(&id, uid, gid)).await {
            Ok(Ok(Some(proxy))) => {
                let address = proxy.address();
                self.buses.lock().await.insert(session.id.clone(), proxy);
                Some(address)
            }
            Ok(Ok(None)) => None,
            Ok(Err(e)) => {
                tracing::warn!(session = %session.id, "{e}");
                None
            }
            Err(e) => {
                tracing::warn!(session = %session.id, "starting the bus proxy: {e}");
                None
            }
        }
    }

    /// Supervises an adopted session's connects again, with the listener its egressctl keeps.
    /// Until then egressctl let them go on to the kernel's programs alone (unix ones refused by
    /// the backstop). Without it (egressctl gone), every connect of the session fails (ENOSYS).
    async fn resupervise(&self, session: &Session) {
        let Some((pid, fd)) = session.listener else {
            return;
        };
        let taken = crate::handoff::take_listener(pid, fd)
            .map_err(|e| e.to_string())
            .and_then(|l| {
                // The pid must still be that session's egressctl, not a reused number.
                if crate::sessions::cgroup_of(pid).as_deref() == Some(session.cgroup.as_str()) {
                    Ok(l)
                } else {
                    Err(format!("pid {pid} is no longer in the session"))
                }
            });
        let result = match taken {
            Ok(l) => self.start_supervision(session, l, pid).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => {
                self.supervised.lock().await.insert(session.id.clone());
                // egressctl answered for the session while no egressd ran: it stops now.
                // SAFETY: kill(2) with integer arguments.
                unsafe { libc::kill(pid as i32, egressd_common::protocol::resumed_signal()) };
            }
            Err(e) => tracing::warn!(
                session = %session.id,
                "cannot supervise the adopted session's unix connects again ({e}); its connects fail until it ends"
            ),
        }
    }

    /// Makes a previous daemon's session ours: named for the audit task, a session_start record
    /// marked adopted, registered for ps and the reaper.
    async fn adopt(&self, session: Session) {
        self.name(&session);
        // The proxy died with the previous daemon (or lingers, unknown to us): the session's
        // DBUS_SESSION_BUS_ADDRESS names this path, so a new proxy takes it over.
        self.start_bus(&session).await;
        self.resupervise(&session).await;
        let hash = self.policy.read().await.hash.clone();
        self.audit(audit::Message::SessionStart(
            session.clone(),
            hash,
            true,
            self.layers.clone(),
        ))
        .await;
        self.registry.lock().await.insert(session);
    }

    /// Ends every session whose cgroup has emptied: final counters, cgroup removed, record written.
    pub async fn reap(&self) {
        let empty = self.registry.lock().await.empty();
        for id in empty {
            let Some(s) = self.registry.lock().await.remove(&id) else {
                continue;
            };
            let kernel = match self.enforcer.remove_session(s.cgroup_id).await {
                Ok(k) => k,
                Err(e) => {
                    tracing::warn!(session = %id, "reading the session's final counters: {e}; its end record counts none");
                    Default::default()
                }
            };
            let (unix_allowed, unix_refused) = self.handoff.take(s.cgroup_id);
            self.dns.forget(s.cgroup_id);
            self.notices.forget(&id);
            let mut totals = kernel;
            totals.allowed += unix_allowed;
            totals.denied += unix_refused;
            self.supervised.lock().await.remove(&id);
            self.drop_pending_supervision(&id);
            self.buses.lock().await.remove(&id);
            // Under systemd the directory is gone or about to go (the scope stopped as it
            // emptied): the session still ends here, record and all.
            if self.layout.removes_session_cgroups() {
                if let Err(e) = cgroup::remove(&s.dir) {
                    tracing::warn!(session = %id, "removing cgroup: {e}");
                }
            }
            self.state_dir.forget_soon(&id);
            self.audit(audit::Message::SessionEnd(
                s.clone(),
                kernel,
                (unix_allowed, unix_refused),
            ))
            .await;
            tracing::info!(
                session = %id, profile = %s.profile, uid = s.uid,
                allowed = totals.allowed, denied = totals.denied,
                backstop_dropped = totals.backstop_dropped, sockets_refused = totals.sockets_refused,
                duration_s = crate::sessions::now_secs().saturating_sub(s.started),
                "session ended"
            );
        }
    }
}

/// Ends sessions as soon as their cgroup empties (inotify on cgroup.events), with a slow periodic
/// sweep as a safety net.
pub async fn reaper(state: Arc<State>) {
    const SWEEP: Duration = Duration::from_secs(30);
    loop {
        tokio::select! {
            guard = state.watcher.readable() => match guard {
                Ok(mut guard) => {
                    // Drain the events; their content does not matter, only that something changed.
                    while state.watcher.get_ref().0.read_events().is_ok() {}
                    guard.clear_ready();
                }
                Err(e) => {
                    tracing::warn!("inotify: {e}");
                    tokio::time::sleep(SWEEP).await;
                }
            },
            _ = tokio::time::sleep(SWEEP) => {}
        }
        state.reap().await;
    }
}

/// Bridges the kernel programs' aya-log records into tracing (via the `log` facade).
pub async fn kernel_logs(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    let mut fd = match readable_fd(logger) {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!("kernel program logs unavailable: cannot poll the log ring buffer: {e}");
            return;
        }
    };
    loop {
        match fd.readable_mut().await {
            Ok(mut guard) => {
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
            Err(e) => {
                tracing::warn!("kernel program logs: {e}");
                return;
            }
        }
    }
}
