//! The systemd backend: sessions are transient scopes in `egressd.slice`, created through systemd's
//! D-Bus API the way `systemd-run --scope` does, so that systemd knows every cgroup in its tree and
//! the sessions are not part of egressd.service (stopping or restarting the service neither kills
//! the tools nor opens their sandboxes).

use std::time::Duration;

use futures_util::StreamExt as _;
use zbus::{Connection, ObjectPath, OwnedObjectPath, Variant};

/// The slice that holds every session and carries the programs. Shipped as packaging/egressd.slice;
/// the daemon also works when that file is not installed (see [`Systemd::ensure_slice`]).
pub const SLICE: &str = "egressd.slice";

/// How long a start job may take. Starting a scope is a handful of cgroup writes; a job still
/// pending after this long means systemd is stuck, and a caller blocked on us should hear so.
const JOB_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum SystemdError {
    #[error("connecting to the system bus (is dbus running, and /run/dbus reachable from egressd's unit?): {0}")]
    Connect(#[source] zbus::Error),
    #[error("systemd refused {method} for {unit}: {source}")]
    Call {
        method: &'static str,
        unit: String,
        #[source]
        source: zbus::Error,
    },
    #[error("systemd's job for {unit} ended with result {result:?}, not \"done\" (see `journalctl -u {unit}` and `systemctl status {unit}`)")]
    JobFailed { unit: String, result: String },
    #[error("systemd's job for {unit} did not finish within {}s", JOB_TIMEOUT.as_secs())]
    JobTimeout { unit: String },
    #[error("the connection to systemd closed while waiting for the job of {unit}")]
    Disconnected { unit: String },
    #[error("listening for systemd's job signals: {0}")]
    Signals(#[source] zbus::Error),
}

/// The part of org.freedesktop.systemd1.Manager egressd uses.
#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Manager",
    default_service = "org.freedesktop.systemd1",
    default_path = "/org/freedesktop/systemd1"
)]
pub trait Manager {
    /// `StartTransientUnit(in s name, in s mode, in a(sv) properties, in a(sa(sv)) aux, out o job)`.
    fn start_transient_unit(
        &self,
        name: &str,
        mode: &str,
        properties: &[(&str, Variant<'_>)],
        aux: &[(&str, &[(&str, Variant<'_>)])],
    ) -> zbus::Result<OwnedObjectPath>;

    /// `StartUnit(in s name, in s mode, out o job)`.
    fn start_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;

    /// Asks systemd to emit job and unit signals on the bus: without a subscriber it may not
    /// send JobRemoved at all.
    fn subscribe(&self) -> zbus::Result<()>;

    #[zbus(signal)]
    fn job_removed(
        &self,
        id: u32,
        job: ObjectPath<'_>,
        unit: &str,
        result: &str,
    ) -> zbus::Result<()>;
}

/// The properties of a session's scope, with the D-Bus types systemd expects (a wrong type is
/// refused by systemd with "Invalid argument"): what `systemd-run --scope --slice=egressd.slice
/// --collect --description=...` sends.
pub fn scope_properties(id: &str, pid: u32, slice: &str) -> Vec<(&'static str, Variant<'static>)> {
    vec![
        (
            "Description",
            Variant::from(format!("egressd sandbox session {id}")),
        ),
        ("Slice", Variant::from(slice.to_string())),
        // `au`. PIDFDs (`ah`, systemd 253+) would close the pid-reuse window between
        // SO_PEERCRED and the move, but PIDs works on every systemd; the caller is blocked on our
        // reply and cannot exit without the move failing visibly (the job fails).
        ("PIDs", Variant::from(vec![pid])),
        // Unload the unit as soon as it is inactive or failed: scopes must not pile up, and a
        // failed one must not block the reuse of its name.
        (
            "CollectMode",
            Variant::from("inactive-or-failed".to_string()),
        ),
        // No `Delegate`: the scope's cgroup stays owned by root, so nothing inside can write its
        // cgroup.procs (or create child cgroups) and leave the sandbox.
    ]
}

/// A connection to systemd's manager, made once and kept.
#[derive(Clone)]
pub struct Systemd {
    manager: ManagerProxy<'static>,
}

impl Systemd {
    /// Connects to the system bus.
    pub async fn connect_system() -> Result<Systemd, SystemdError> {
        let conn = Connection::system().await.map_err(SystemdError::Connect)?;
        Systemd::on(&conn).await
    }

    /// Uses `conn` (the system bus, or in tests a peer-to-peer connection to a stand-in).
    pub async fn on(conn: &Connection) -> Result<Systemd, SystemdError> {
        let manager = ManagerProxy::new(conn)
            .await
            .map_err(SystemdError::Connect)?;
        manager
            .subscribe()
            .await
            .map_err(|source| SystemdError::Call {
                method: "Subscribe",
                unit: "the manager".into(),
                source,
            })?;
        Ok(Systemd { manager })
    }

    /// Makes sure `egressd.slice` is active, so its cgroup exists before the programs are
    /// attached to it. systemd would create the slice implicitly with the first scope, but the
    /// programs must be on the slice before any session exists, so the daemon starts it itself.
    /// StartUnit first: it honours the packaged unit file and any drop-in an administrator added;
    /// only when no unit file is installed (a bare binary) is the slice created as a transient unit.
    pub async fn ensure_slice(&self, slice: &str) -> Result<(), SystemdError> {
        match self
            .run_job(slice, "StartUnit", || {
                self.manager.start_unit(slice, "fail")
            })
            .await
        {
            Err(SystemdError::Call { source, .. }) if no_such_unit(&source) => {
                tracing::info!("{slice} is not installed; creating it as a transient unit");
                let props = [(
                    "Description",
                    Variant::from("egressd sandbox sessions".to_string()),
                )];
                self.run_job(slice, "StartTransientUnit", || {
                    self.manager
                        .start_transient_unit(slice, "fail", &props, &[])
                })
                .await
            }
            other => other,
        }
    }

    /// Starts `unit`, the scope of session `id`, in `slice` with `pid` in it. When this returns
    /// Ok, systemd has moved `pid` into the scope's cgroup.
    pub async fn start_scope(
        &self,
        unit: &str,
        id: &str,
        pid: u32,
        slice: &str,
    ) -> Result<(), SystemdError> {
        let props = scope_properties(id, pid, slice);
        self.run_job(unit, "StartTransientUnit", || {
            self.manager.start_transient_unit(unit, "fail", &props, &[])
        })
        .await
    }

    /// Calls a method that queues a job and waits for the job's JobRemoved signal.
    async fn run_job<F, Fut>(
        &self,
        unit: &str,
        method: &'static str,
        call: F,
    ) -> Result<(), SystemdError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = zbus::Result<OwnedObjectPath>>,
    {
        // The match is in place before the call: a job can finish before its reply reaches us,
        // and a JobRemoved sent before we listen would be lost.
        let mut removed = self
            .manager
            .receive_job_removed()
            .await
            .map_err(SystemdError::Signals)?;
        let job = call().await.map_err(|source| SystemdError::Call {
            method,
            unit: unit.to_string(),
            source,
        })?;
        let wait = async {
            while let Some(signal) = removed.next().await {
                let Ok(args) = signal.args() else { continue };
                if args.job.as_str() == job.as_str() {
                    return if args.result == "done" {
                        Ok(())
                    } else {
                        Err(SystemdError::JobFailed {
                            unit: unit.to_string(),
                            result: args.result.to_string(),
                        })
                    };
                }
            }
            Err(SystemdError::Disconnected {
                unit: unit.to_string(),
            })
        };
        tokio::time::timeout(JOB_TIMEOUT, wait)
            .await
            .unwrap_or_else(|_| {
                Err(SystemdError::JobTimeout {
                    unit: unit.to_string(),
                })
            })
    }
}

fn no_such_unit(e: &zbus::Error) -> bool {
    matches!(e, zbus::Error::MethodError(name, _, _) if name.as_str() == "org.freedesktop.systemd1.NoSuchUnit")
}
