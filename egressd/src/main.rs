//! egressd: the root daemon. Loads and pins the kernel programs, creates one cgroup per sandbox,
//! owns the policy and answers `egressctl` on a unix socket.

mod audit;
mod bpf_sys;
mod cgroup;
mod control;
mod counter_slots;
mod daemon;
mod dns;
mod enforcer;
mod handoff;
mod link_swap;
mod map_batch;
mod metrics;
mod notices;
mod sessions;
mod systemd;

/// The async runtime's worker threads (the resolver runs a UDP receiving task for each).
pub const WORKERS: usize = 2;

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{bail, Context as _};
use clap::{CommandFactory as _, Parser, Subcommand};
use egressd_common::protocol::{DEFAULT_SOCKET, SOCKET_ENV};
use tokio::{
    net::UnixListener,
    signal::unix::{signal, SignalKind},
};

use egressd_common::policy::{Config, DEFAULT_CONFIG_PATH};

use crate::{
    cgroup::{Backend, BackendChoice, Layout},
    daemon::State,
    enforcer::{Enforcer, PinDir},
    sessions::StateDir,
};

/// Kernel-enforced network air gap for AI coding tools: the daemon (run as root).
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Policy file; the built-in default (profile `airgap`, loopback only) when it does not exist.
    #[arg(long, global = true, default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    /// Control socket.
    #[arg(long, global = true, env = SOCKET_ENV, default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Name of the cgroup (under the cgroup2 mount) that holds every session, with the direct
    /// backend. The systemd backend always uses egressd.slice.
    #[arg(long, global = true, env = "EGRESSD_CGROUP", default_value = "egressd")]
    cgroup: String,
    /// Who creates session cgroups: `systemd` (transient scopes in egressd.slice, through
    /// systemd's D-Bus API), `direct` (egressd itself, under --cgroup), or `auto` (systemd when it
    /// is init, i.e. /run/systemd/system exists).
    #[arg(
        long,
        global = true,
        env = "EGRESSD_CGROUP_BACKEND",
        value_enum,
        default_value_t = BackendChoice::Auto
    )]
    cgroup_backend: BackendChoice,
    /// Where programs' links and maps are pinned (bpffs).
    #[arg(
        long,
        global = true,
        env = "EGRESSD_BPFFS",
        default_value = "/sys/fs/bpf/egressd"
    )]
    bpffs: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Detach and unpin every program, remove empty session cgroups (for uninstall). Running
    /// sandboxes lose their enforcement.
    Cleanup,
    /// Validate a policy file and exit (no root needed).
    Check { file: Option<PathBuf> },
    /// Internal: write egressd's man pages (egressd.8, egressd-SUBCOMMAND.8) into DIR.
    #[command(hide = true)]
    Man { dir: PathBuf },
}

fn main() -> std::process::ExitCode {
    match real_main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("egressd: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn real_main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("EGRESSD_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Check { file }) => {
            let path = file.unwrap_or(cli.config);
            let (config, source) = Config::load(&path)?;
            println!(
                "{source}: ok, profiles: {}",
                config
                    .profiles
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            Ok(())
        }
        Some(Command::Cleanup) => {
            require_root()?;
            cleanup(&cli)
        }
        Some(Command::Man { dir }) => write_man_pages(&dir),
        None => {
            require_root()?;
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(WORKERS)
                .enable_all()
                .build()?
                .block_on(run(cli))
        }
    }
}

fn write_man_pages(dir: &Path) -> anyhow::Result<()> {
    use egressd_common::{man, policy::DEFAULT_AUDIT_PATH};
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let files = [
        (
            DEFAULT_CONFIG_PATH,
            "The policy (--config); the built-in default when it does not exist. See egressd.toml(5).",
        ),
        (DEFAULT_SOCKET, "The control socket egressctl talks to (--socket)."),
        (DEFAULT_AUDIT_PATH, "The audit log (hash-chained JSON lines; [audit] path)."),
        (
            "/sys/fs/bpf/egressd",
            "Pinned programs and maps (--bpffs); egressd cleanup removes them.",
        ),
    ];
    let extra = man::Extra {
        files: &files,
        see_also: &man::PAGES,
    };
    for page in man::write_pages(Cli::command(), "8", &extra, dir)
        .with_context(|| format!("writing man pages into {}", dir.display()))?
    {
        println!("{}", page.display());
    }
    Ok(())
}

fn require_root() -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("egressd must run as root (it loads eBPF programs and creates cgroups); try `sudo egressd`");
    }
    Ok(())
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let (config, source, compiled) = Config::load_compiled(&cli.config)?;
    ensure_bpffs(&cli.bpffs)?;
    ensure_securityfs();
    let layout = layout_for(&cli)?;
    // The parent must exist before the programs are attached to it, and the programs before any
    // session exists.
    let systemd = match layout.backend {
        Backend::Direct => {
            if Path::new(cgroup::SYSTEMD_MARKER).exists() {
                tracing::warn!(
                    "systemd is init but --cgroup-backend=direct: sessions are created under {} behind systemd's back",
                    layout.parent.display()
                );
            }
            layout.ensure_parent()?;
            None
        }
        Backend::Systemd => {
            if cli.cgroup != "egressd" {
                tracing::warn!(
                    "--cgroup {} is ignored: the systemd backend keeps sessions in {}",
                    cli.cgroup,
                    systemd::SLICE
                );
            }
            let systemd = systemd::Systemd::connect_system().await.context(
                "the systemd cgroup backend (use --cgroup-backend=direct without systemd)",
            )?;
            systemd
                .ensure_slice(systemd::SLICE)
                .await
                .with_context(|| format!("starting {}", systemd::SLICE))?;
            if !layout.parent.is_dir() {
                bail!(
                    "{} is active but its cgroup {} does not exist; is {} systemd's cgroup2 hierarchy?",
                    systemd::SLICE,
                    layout.parent.display(),
                    layout.mount.display()
                );
            }
            Some(systemd)
        }
    };
    let socket = bind_socket(&cli.socket, config.socket_group.as_deref())?;

    let audit_path = config.audit.path();
    let audit_gid = match &config.audit.group {
        Some(name) => Some(
            nix::unistd::Group::from_name(name)?
                .with_context(|| format!("audit.group {name:?} does not exist"))?
                .gid
                .as_raw(),
        ),
        None => None,
    };
    // A log that cannot be written does not stop the daemon: enforcement matters more, and the
    // first flush says what is wrong (health, `lost` records once it can write).
    let writer = audit::Writer::open(
        &audit_path,
        config.audit.max_bytes(),
        config.audit.keep(),
        audit_gid,
    );
    let health_view = audit::SharedHealth::default();
    let audit_lost = audit::LostBySession::default();

    let pins = PinDir(cli.bpffs.clone());
    let hashes = audit::PolicyHashes::default();
    // The resolver's sockets and settings come first: a port in use or a bad upstream must stop
    // the start before any program redirects queries to a resolver that is not there.
    let dns = if config.dns.enabled() {
        let port = config.dns.port();
        let listeners = dns::bind(port).await.with_context(|| {
            format!("binding the DNS resolver on 127.0.0.1:{port}; pick another with dns.port")
        })?;
        let settings = dns::Settings::from_config(&config.dns).map_err(anyhow::Error::msg)?;
        if settings.upstreams.is_empty() {
            tracing::warn!("dns: no upstream server (dns.upstream, /etc/resolv.conf): allowed names will get SERVFAIL");
        }
        Some((port, listeners, settings))
    } else {
        tracing::warn!("dns.enabled = false: DNS queries are judged like other traffic, and the local stub resolver forwards any name off the machine");
        None
    };
    // Like the resolver's: an address in use stops the start, before anything is attached.
    if let Some(listen) = &config.metrics.listen {
        metrics::listen(listen.clone())
            .await
            .with_context(|| format!("serving metrics at {listen} ([metrics] listen)"))?;
    }
    let mut enforcer = Enforcer::load(
        &layout.parent,
        dns.as_ref().map(|(port, _, _)| *port).unwrap_or(0),
        config.audit.ring_buffer_bytes(),
        !config.audit.fold_window().is_zero(),
        &pins,
        hashes.clone(),
    )
    .context("attaching the kernel programs")?;
    // Loading parsed the object and the kernel's BTF: hand the freed heap back (idle RSS).
    // A fixed mmap threshold: glibc otherwise raises it to the largest block freed so far, and a
    // flood's batch buffers (a megabyte or more) would then come from the heap and stay resident.
    // SAFETY: malloc_trim only releases free memory; mallopt changes a tunable.
    unsafe {
        libc::malloc_trim(0);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
    }
    let hooks = enforcer.hooks();
    let layers = enforcer.layers();
    let unix_missing = enforcer.unix_missing();
    if let Some(logger) = enforcer.take_logger() {
        tokio::spawn(daemon::kernel_logs(logger));
    }
    let events = enforcer.take_events()?;
    let dns_maps = enforcer.take_dns_maps()?;
    let fold_maps = enforcer.take_fold_maps()?;
    let handle = enforcer::spawn(enforcer);
    // Large enough that adopting every session of a crashed daemon never waits on the audit task,
    // which starts only after adoption.
    let (audit_tx, audit_rx) =
        tokio::sync::mpsc::channel(egressd_common::MAX_SESSIONS as usize + 64);
    let tuning = audit::Tuning {
        fold_window: config.audit.fold_window(),
    };
    let names = audit::SessionNames::default();
    let syslog = match &config.audit.syslog {
        Some(path) => Some(
            audit::Syslog::new(path)
                .with_context(|| format!("audit syslog socket {}", path.display()))?,
        ),
        None => None,
    };
    let recent = audit::RecentDenials::default();
    let dns_folds = audit::DnsFolds::new(tuning.fold_window);
    let shared = audit::Shared {
        dns_folds: dns_folds.clone(),
        hashes,
        names: names.clone(),
        syslog,
        health: audit::Health::new(&config.audit, health_view.clone()),
        lost: audit_lost.clone(),
        recent: recent.clone(),
    };
    let state = Arc::new(State::new(
        layout,
        handle.clone(),
        daemon::Wiring {
            state_dir: StateDir(sessions::state_dir_for(&cli.socket)),
            config_path: cli.config.clone(),
            audit: audit_tx,
            audit_path,
            names,
            layers: layers.clone(),
            systemd,
            unix_missing,
            socket_path: cli.socket.clone(),
            audit_health: health_view,
            audit_refuses: [
                config.audit.disk_full_action,
                config.audit.disk_error_action,
            ]
            .contains(&Some(egressd_common::policy::DiskAction::Refuse)),
            audit_lost,
            recent,
        },
        config.clone(),
        source.clone(),
    )?);
    state
        .audit(audit::Message::Record(Box::new(
            egressd_common::audit::Record {
                time: audit::now_rfc3339(),
                kind: "daemon".into(),
                message: Some(format!(
                    "egressd {} started (pid {}), policy: {source}",
                    env!("CARGO_PKG_VERSION"),
                    std::process::id()
                )),
                host: nix::unistd::gethostname()
                    .ok()
                    .map(|h| h.to_string_lossy().into_owned()),
                machine_id: std::fs::read_to_string("/etc/machine-id")
                    .ok()
                    .map(|m| m.trim().to_string())
                    .filter(|m| !m.is_empty()),
                ..Default::default()
            },
        )))
        .await;
    if let Some((_, listeners, settings)) = dns {
        let resolver = Arc::new(dns::Resolver::new(
            state.clone(),
            dns_maps,
            settings,
            dns_folds,
        ));
        listeners.serve(resolver.clone());
        tokio::spawn(dns::sweeper(resolver));
    }
    // Sessions are named before the audit task drains the pinned ring buffer, which may hold
    // events taken while no daemon was running.
    state.adopt_sessions().await;
    tokio::spawn(notices::run(state.clone()));
    let audit_task = tokio::spawn(audit::run(
        events, fold_maps, writer, handle, shared, tuning, audit_rx,
    ));
    state
        .apply_policy(config, source.clone(), compiled)
        .await
        .map_err(anyhow::Error::msg)
        .context("installing the policy")?;
    tracing::info!(
        policy = %source,
        cgroup = %state.layout.parent.display(),
        backend = state.layout.backend.name(),
        hooks = %hooks.iter().map(|h| h.attach_type.as_str()).collect::<Vec<_>>().join(","),
        layers = %layers.join(","),
        socket = %cli.socket.display(),
        "egressd ready"
    );
    notify_systemd_ready();

    // Sessions that emptied while no daemon ran end now.
    state.reap().await;
    tokio::spawn(daemon::reaper(state.clone()));
    tokio::spawn(control::serve(state.clone(), socket));

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = hup.recv() => { let _ = state.reload().await; }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    // Links and maps stay pinned: stopping the daemon never opens a sandbox.
    let _ = std::fs::remove_file(&cli.socket);
    // Connects already received are answered, later ones wait for egressctl (see handoff::stop).
    let busy = tokio::task::block_in_place(|| handoff::stop_all(std::time::Duration::from_secs(5)));
    if busy > 0 {
        tracing::warn!(
            "{busy} unix supervisors did not finish within 5 s; a connect one of them received may stay unanswered"
        );
    }
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        sessions::records_written(),
    )
    .await;
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    state.audit(audit::Message::Stop(done_tx)).await;
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), done_rx).await;
    audit_task.abort();
    tracing::info!("egressd stopping; enforcement stays pinned in the kernel");
    Ok(())
}

/// Mounts securityfs when it is not, so the daemon can tell whether the kernel runs BPF LSM hooks.
fn ensure_securityfs() {
    let list = Path::new(egressd_common::layers::LSM_LIST);
    if list.exists() {
        return;
    }
    let at = Path::new("/sys/kernel/security");
    if let Err(e) = nix::mount::mount(
        Some("securityfs"),
        at,
        Some("securityfs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    ) {
        tracing::warn!(
            "mounting securityfs at {}: {e}; the BPF LSM layer cannot be checked and stays off",
            at.display()
        );
    }
}

/// Mounts bpffs at /sys/fs/bpf when nothing is mounted there (it is not by default on some machines).
fn ensure_bpffs(pin_dir: &Path) -> anyhow::Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    let mounted = mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        matches!((f.next(), f.next(), f.next()), (Some(_), Some(dir), Some("bpf")) if pin_dir.starts_with(dir))
    });
    if mounted {
        return Ok(());
    }
    let at = Path::new("/sys/fs/bpf");
    if !pin_dir.starts_with(at) {
        bail!("{} is not on a bpffs; mount one there (`mount -t bpf bpf DIR`) or use the default /sys/fs/bpf/egressd", pin_dir.display());
    }
    std::fs::create_dir_all(at)?;
    nix::mount::mount(Some("bpf"), at, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>)
        .context("mounting bpffs at /sys/fs/bpf (needed to pin programs so enforcement survives a daemon restart)")?;
    tracing::info!("mounted bpffs at /sys/fs/bpf");
    Ok(())
}

fn bind_socket(path: &Path, group: Option<&str>) -> anyhow::Result<UnixListener> {
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        bail!(
            "another egressd is already serving {}; stop it first",
            path.display()
        );
    }
    let _ = std::fs::remove_file(path);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    let mode = match group {
        Some(name) => {
            let g = nix::unistd::Group::from_name(name)?
                .with_context(|| format!("socket_group {name:?} does not exist"))?;
            nix::unistd::chown(path, None, Some(g.gid))?;
            0o660
        }
        None => 0o666,
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(listener)
}

/// `Type=notify` support without a dependency: one datagram to $NOTIFY_SOCKET.
fn notify_systemd_ready() {
    if let Some(path) = std::env::var_os("NOTIFY_SOCKET") {
        let sock = std::os::unix::net::UnixDatagram::unbound();
        if let Err(e) = sock.and_then(|s| s.send_to(b"READY=1", &path).map(|_| ())) {
            tracing::warn!("telling systemd we are ready: {e}");
        }
    }
}

/// The session layout of `--cgroup-backend`.
fn layout_for(cli: &Cli) -> anyhow::Result<Layout> {
    Ok(
        match cli
            .cgroup_backend
            .resolve(Path::new(cgroup::SYSTEMD_MARKER))
        {
            Backend::Direct => Layout::new(&cli.cgroup)?,
            Backend::Systemd => Layout::systemd(systemd::SLICE)?,
        },
    )
}

fn cleanup(cli: &Cli) -> anyhow::Result<()> {
    let pins = PinDir(cli.bpffs.clone());
    let removed = enforcer::unpin_all(&pins)?;
    for p in &removed {
        println!("unpinned {}", p.display());
    }
    let layout = layout_for(cli)?;
    for id in layout.existing_sessions() {
        let dir = layout.session_dir(&id);
        if cgroup::populated(&dir) {
            println!(
                "session {id} still has processes; left {} in place (now unenforced)",
                dir.display()
            );
        } else if !layout.removes_session_cgroups() {
            // An empty scope stops by itself and systemd removes its cgroup; nothing to do.
        } else if cgroup::remove(&dir).is_ok() {
            println!("removed {}", dir.display());
        }
    }
    if layout.backend == Backend::Systemd {
        // Stopping egressd.slice would kill whatever still runs in its scopes; an empty slice
        // costs nothing, and a package purge removes its unit file.
        println!("left {} to systemd", systemd::SLICE);
    } else {
        match std::fs::remove_dir(&layout.parent) {
            Ok(()) => println!("removed {}", layout.parent.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => println!("left {}: {e}", layout.parent.display()),
        }
    }
    let _ = std::fs::remove_dir_all(sessions::state_dir_for(&cli.socket));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn man_pages_are_section_8_and_skip_the_hidden_man_command() {
        let dir = std::env::temp_dir().join(format!("egressd-man-{}", std::process::id()));
        write_man_pages(&dir).unwrap();
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["egressd-check.8", "egressd-cleanup.8", "egressd.8"]);
        let top = std::fs::read_to_string(dir.join("egressd.8")).unwrap();
        assert!(
            top.starts_with(".ie") && top.contains(".TH egressd 8"),
            "{top}"
        );
        assert!(top.contains("\\-\\-cgroup\\-backend"), "{top}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
