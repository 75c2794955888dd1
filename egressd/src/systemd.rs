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

#[cfg(test)]
mod tests {
    use std::{
        os::unix::net::UnixStream,
        sync::{Arc, Mutex},
    };

    use zbus::{connection::Builder, object_server::SignalEmitter, Guid, OwnedVariant};

    use super::*;

    fn signature(v: &Variant<'_>) -> String {
        v.value_signature().to_string()
    }

    #[test]
    fn scope_properties_have_the_types_systemd_expects() {
        let props = scope_properties("0a1b2c3d", 4242, SLICE);
        let types: Vec<(&str, String)> = props.iter().map(|(k, v)| (*k, signature(v))).collect();
        assert_eq!(
            types,
            [
                ("Description", "s".to_string()),
                ("Slice", "s".to_string()),
                ("PIDs", "au".to_string()),
                ("CollectMode", "s".to_string()),
            ]
        );
        let get = |name: &str| props.iter().find(|(k, _)| *k == name).unwrap().1.clone();
        assert_eq!(String::try_from(get("Slice")).unwrap(), "egressd.slice");
        assert_eq!(Vec::<u32>::try_from(get("PIDs")).unwrap(), [4242]);
        assert_eq!(
            String::try_from(get("CollectMode")).unwrap(),
            "inactive-or-failed"
        );
        assert!(!props.iter().any(|(k, _)| *k == "Delegate"));
    }

    /// One call the stand-in received.
    #[derive(Debug)]
    struct Call {
        method: &'static str,
        name: String,
        mode: String,
        properties: Vec<(String, OwnedVariant)>,
    }

    /// A STAND-IN FOR SYSTEMD, not systemd: it serves the few org.freedesktop.systemd1.Manager
    /// methods egressd calls, records each call, and ends every job at once with `result`. No unit
    /// is started and no process is moved. It emits the job's JobRemoved before its method reply
    /// (systemd may too, when a job completes quickly), preceded by another job's JobRemoved, so
    /// the client must have subscribed before calling and must pick out its own job.
    struct StandInSystemd {
        calls: Arc<Mutex<Vec<Call>>>,
        result: &'static str,
        next_job: u32,
        /// Unit names StartUnit answers with NoSuchUnit (a unit file not installed).
        missing: Vec<String>,
    }

    impl StandInSystemd {
        async fn job(
            &mut self,
            emitter: &SignalEmitter<'_>,
            method: &'static str,
            name: String,
            mode: String,
            properties: Vec<(String, OwnedVariant)>,
        ) -> zbus::fdo::Result<OwnedObjectPath> {
            self.next_job += 2;
            let id = self.next_job;
            let job = OwnedObjectPath::try_from(format!("/org/freedesktop/systemd1/job/{id}"))
                .map_err(|e| zbus::fdo::Error::Failed(e.to_string()))?;
            let other = ObjectPath::try_from(format!("/org/freedesktop/systemd1/job/{}", id - 1))
                .map_err(|e| zbus::fdo::Error::Failed(e.to_string()))?;
            Self::job_removed(emitter, id - 1, other, "unrelated.service", "failed").await?;
            Self::job_removed(emitter, id, job.as_ref(), &name, self.result).await?;
            self.calls.lock().unwrap().push(Call {
                method,
                name,
                mode,
                properties,
            });
            Ok(job)
        }
    }

    #[zbus::interface(name = "org.freedesktop.systemd1.Manager")]
    impl StandInSystemd {
        async fn subscribe(&self) {}

        async fn start_transient_unit(
            &mut self,
            #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
            name: String,
            mode: String,
            properties: Vec<(String, OwnedVariant)>,
            _aux: Vec<(String, Vec<(String, OwnedVariant)>)>,
        ) -> zbus::fdo::Result<OwnedObjectPath> {
            self.job(&emitter, "StartTransientUnit", name, mode, properties)
                .await
        }

        async fn start_unit(
            &mut self,
            #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
            name: String,
            mode: String,
        ) -> Result<OwnedObjectPath, NoSuchUnit> {
            if self.missing.contains(&name) {
                return Err(NoSuchUnit::NoSuchUnit(format!("Unit {name} not found.")));
            }
            self.job(&emitter, "StartUnit", name, mode, Vec::new())
                .await
                .map_err(|e| NoSuchUnit::ZBus(e.into()))
        }

        #[zbus(signal)]
        async fn job_removed(
            emitter: &SignalEmitter<'_>,
            id: u32,
            job: ObjectPath<'_>,
            unit: &str,
            result: &str,
        ) -> zbus::Result<()>;
    }

    /// The error systemd sends for a unit it cannot find.
    #[derive(Debug, zbus::DBusError)]
    #[zbus(prefix = "org.freedesktop.systemd1")]
    enum NoSuchUnit {
        #[zbus(error)]
        ZBus(zbus::Error),
        NoSuchUnit(String),
    }

    /// A client [`Systemd`] talking to a stand-in over a socketpair (no bus, no systemd, no root).
    async fn client_and_stand_in(
        result: &'static str,
        missing: &[&str],
    ) -> (Systemd, Arc<Mutex<Vec<Call>>>, zbus::Connection) {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let stand_in = StandInSystemd {
            calls: calls.clone(),
            result,
            next_job: 100,
            missing: missing.iter().map(|s| s.to_string()).collect(),
        };
        let (ours, theirs) = UnixStream::pair().unwrap();
        let server = Builder::unix_stream(theirs)
            .server(Guid::generate())
            .p2p()
            .serve_at("/org/freedesktop/systemd1", stand_in)
            .build();
        let client = Builder::unix_stream(ours).p2p().build();
        let (server, client) = tokio::try_join!(server, client).unwrap();
        (Systemd::on(&client).await.unwrap(), calls, server)
    }

    #[tokio::test]
    async fn start_scope_sends_start_transient_unit_and_waits_for_done() {
        let (systemd, calls, _server) = client_and_stand_in("done", &[]).await;
        systemd
            .start_scope("egressd-0a1b2c3d.scope", "0a1b2c3d", 4242, SLICE)
            .await
            .expect("a job that ends \"done\" starts the scope");
        let calls = calls.lock().unwrap();
        assert_eq!(calls.len(), 1);
        let call = &calls[0];
        assert_eq!(call.method, "StartTransientUnit");
        assert_eq!(call.name, "egressd-0a1b2c3d.scope");
        assert_eq!(call.mode, "fail");
        let got: Vec<(&str, String)> = call
            .properties
            .iter()
            .map(|(k, v)| (k.as_str(), signature(v)))
            .collect();
        assert_eq!(
            got,
            [
                ("Description", "s".to_string()),
                ("Slice", "s".to_string()),
                ("PIDs", "au".to_string()),
                ("CollectMode", "s".to_string()),
            ]
        );
        let pids = call.properties.iter().find(|(k, _)| k == "PIDs").unwrap();
        assert_eq!(
            Vec::<u32>::try_from(pids.1.try_clone().unwrap()).unwrap(),
            [4242]
        );
    }

    #[tokio::test]
    async fn a_failed_job_is_a_clear_error() {
        let (systemd, _calls, _server) = client_and_stand_in("failed", &[]).await;
        let err = systemd
            .start_scope("egressd-0a1b2c3d.scope", "0a1b2c3d", 4242, SLICE)
            .await
            .expect_err("a job that ends \"failed\" is an error");
        assert!(
            matches!(&err, SystemdError::JobFailed { unit, result } if unit == "egressd-0a1b2c3d.scope" && result == "failed"),
            "{err:?}"
        );
        let message = err.to_string();
        assert!(message.contains("egressd-0a1b2c3d.scope"), "{message}");
        assert!(message.contains("\"failed\""), "{message}");
    }

    #[tokio::test]
    async fn the_slice_is_started_by_name_or_else_as_a_transient_unit() {
        let (systemd, calls, _server) = client_and_stand_in("done", &[]).await;
        systemd.ensure_slice(SLICE).await.unwrap();
        {
            let calls = calls.lock().unwrap();
            assert_eq!(calls.len(), 1);
            assert_eq!(
                (calls[0].method, calls[0].name.as_str()),
                ("StartUnit", SLICE)
            );
        }

        let (systemd, calls, _server) = client_and_stand_in("done", &[SLICE]).await;
        systemd.ensure_slice(SLICE).await.unwrap();
        let calls = calls.lock().unwrap();
        assert_eq!(calls.len(), 1);
        assert_eq!(
            (calls[0].method, calls[0].name.as_str()),
            ("StartTransientUnit", SLICE)
        );
    }
}
