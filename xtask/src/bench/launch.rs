//! Part (g): wall time of `egressctl run -- true` against `true` alone and against
//! `bwrap --unshare-net --dev-bind / / true` (what a user would pick instead), interleaved, each
//! started as an unprivileged user (uid 65534, through setpriv, the same for all three) the way a
//! developer runs them; and the session's teardown: from egressctl's exit until the daemon has
//! removed the session's cgroup. (Run as root, egressctl also builds a Landlock file domain that
//! keeps root without capabilities off cgroup.procs and the pins: a heavier path users need not take.)

use std::{
    ffi::CString,
    fs,
    os::unix::{ffi::OsStrExt as _, process::CommandExt as _},
    path::Path,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use super::{fixture::Daemon, report::Report, stats::Spread, Plan};

/// `cmd` started as uid/gid 65534 with no groups.
fn as_user(cmd: &Command) -> Command {
    let mut c = Command::new("setpriv");
    c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"]);
    c.arg(cmd.get_program()).args(cmd.get_args());
    c
}

fn wall_ms(cmd: &mut Command) -> anyhow::Result<f64> {
    let t = Instant::now();
    let st = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    if !st.success() {
        anyhow::bail!("{cmd:?}: {st}");
    }
    Ok(ms)
}

/// The median of a round's launches (each list has `per_round` of them).
fn median(v: &[f64]) -> f64 {
    Spread::of(v).map_or(f64::NAN, |s| s.median)
}

/// `true` spawned and waited for, optionally moving itself (between fork and exec) into a cgroup
/// made for it just before: the part of a launch the kernel's cgroup move costs, apart from any
/// sandbox's own work. The cgroup is removed after the clock stops.
fn cgroup_floor_ms(truth: &str, cgroup: Option<&Path>) -> anyhow::Result<f64> {
    let mut cmd = Command::new(truth);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let t = Instant::now();
    if let Some(dir) = cgroup {
        fs::create_dir(dir)?;
        let procs = CString::new(dir.join("cgroup.procs").as_os_str().as_bytes())?;
        // SAFETY: only open/write/close between fork and exec, on a path made before the fork.
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(fd);
                Ok(())
            });
        }
    }
    let st = cmd.status()?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    if let Some(dir) = cgroup {
        super::fixture::remove_cgroup(dir);
    }
    if !st.success() {
        anyhow::bail!("{truth} in a fresh cgroup: {st}");
    }
    Ok(ms)
}

pub fn run(d: &Daemon, plan: &Plan, report: &mut Report) -> anyhow::Result<()> {
    let truth = which("true").unwrap_or_else(|| "/bin/true".into());
    let bwrap = which("bwrap");
    let bwrap_cmd = |b: &str| {
        let mut c = Command::new(b);
        c.args(["--unshare-net", "--dev-bind", "/", "/", &truth]);
        as_user(&c)
    };
    let bwrap_ok = bwrap.as_ref().is_some_and(|b| {
        bwrap_cmd(b)
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    });
    let per_round = if plan.quick { 5 } else { 20 };
    // The same launches with cgroup2's favordynmods on (a system setting; restored after each
    // use): it makes moving a task cheaper and forks and exits dearer, for every launcher alike, so
    // `true`, egressctl and bwrap are all measured under it and compared with one another.
    let mount = super::fixture::cgroup2_mount()?;
    let dynmods_before = egressd_common::host::favordynmods(&mount);
    let dynmods = |on: bool| egressd_common::host::set_favordynmods(&mount, on).is_ok();
    let dynmods_ok =
        dynmods_before.is_some() && dynmods(true) && dynmods(dynmods_before == Some(true));
    let (mut t_dyn, mut add_dyn) = (Vec::new(), Vec::new());
    let (mut t_true_dyn, mut t_bwrap_dyn, mut add_bwrap_dyn) = (Vec::new(), Vec::new(), Vec::new());
    let (mut t_true, mut t_ctl, mut t_bwrap, mut teardown) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut add_ctl, mut add_bwrap) = (Vec::new(), Vec::new());
    let (mut t_spawn, mut t_moved, mut add_moved) = (Vec::new(), Vec::new(), Vec::new());
    let floor_cg = mount.join(format!("egbench-{}-launchfloor", std::process::id()));
    for round in 0..plan.rounds {
        eprintln!("bench: (g) launch, round {}/{}", round + 1, plan.rounds);
        let (mut a, mut b, mut c, mut e) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut f, mut g) = (Vec::new(), Vec::new());
        let (mut a_dyn, mut c_dyn) = (Vec::new(), Vec::new());
        for _ in 0..per_round {
            a.push(wall_ms(&mut as_user(&Command::new(&truth)))?);
            b.push(wall_ms(&mut as_user(&d.run_cmd(None, &[&truth])))?);
            let t = Instant::now();
            while d.session_count() > 0 && t.elapsed() < Duration::from_secs(5) {
                thread::sleep(Duration::from_micros(100));
            }
            teardown.push(t.elapsed().as_secs_f64() * 1e3);
            if dynmods_ok {
                dynmods(true);
                let alone = wall_ms(&mut as_user(&Command::new(&truth)));
                let ms = wall_ms(&mut as_user(&d.run_cmd(None, &[&truth])));
                let bw = bwrap_ok.then(|| wall_ms(&mut bwrap_cmd(bwrap.as_ref().unwrap())));
                dynmods(dynmods_before == Some(true));
                a_dyn.push(alone?);
                e.push(ms?);
                if let Some(bw) = bw {
                    c_dyn.push(bw?);
                }
                let t = Instant::now();
                while d.session_count() > 0 && t.elapsed() < Duration::from_secs(5) {
                    thread::sleep(Duration::from_micros(100));
                }
            }
            if bwrap_ok {
                c.push(wall_ms(&mut bwrap_cmd(bwrap.as_ref().unwrap()))?);
            }
            f.push(cgroup_floor_ms(&truth, None)?);
            g.push(cgroup_floor_ms(&truth, Some(&floor_cg))?);
        }
        let (mf, mg) = (median(&f), median(&g));
        t_spawn.push(mf);
        t_moved.push(mg);
        add_moved.push(mg - mf);
        let (ma, mb) = (median(&a), median(&b));
        t_true.push(ma);
        t_ctl.push(mb);
        add_ctl.push(mb - ma);
        if let Some(mc) = Spread::of(&c) {
            t_bwrap.push(mc.median);
            add_bwrap.push(mc.median - ma);
        }
        if let (Some(me), Some(ma_dyn)) = (Spread::of(&e), Spread::of(&a_dyn)) {
            t_true_dyn.push(ma_dyn.median);
            t_dyn.push(me.median);
            add_dyn.push(me.median - ma_dyn.median);
            if let Some(mc) = Spread::of(&c_dyn) {
                t_bwrap_dyn.push(mc.median);
                add_bwrap_dyn.push(mc.median - ma_dyn.median);
            }
        }
    }
    rows_ms(
        report,
        &[
            ("launch: `true` alone", &t_true),
            ("launch: `egressctl run -- true`", &t_ctl),
            ("launch: added by egressctl run", &add_ctl),
        ],
    );
    if dynmods_ok {
        rows_ms(
            report,
            &[
                ("launch: `true` alone, cgroup2 favordynmods", &t_true_dyn),
                (
                    "launch: `egressctl run -- true`, cgroup2 favordynmods",
                    &t_dyn,
                ),
                ("launch: added by egressctl run, favordynmods", &add_dyn),
            ],
        );
        if bwrap_ok {
            rows_ms(
                report,
                &[
                    (
                        "launch: `bwrap --unshare-net --dev-bind / / true`, favordynmods",
                        &t_bwrap_dyn,
                    ),
                    ("launch: added by bwrap, favordynmods", &add_bwrap_dyn),
                ],
            );
        }
    } else {
        report.not_measured(
            'g',
            "launch: favordynmods",
            "cgroup2 here takes no favordynmods (Linux 6.0+)",
        );
    }
    if bwrap_ok {
        rows_ms(
            report,
            &[
                (
                    "launch: `bwrap --unshare-net --dev-bind / / true`",
                    &t_bwrap,
                ),
                ("launch: added by bwrap", &add_bwrap),
            ],
        );
    } else {
        report.not_measured(
            'g',
            "launch: bwrap",
            if bwrap.is_none() {
                "bwrap not installed (Debian: bubblewrap)"
            } else {
                "bwrap --unshare-net does not run here as an unprivileged user"
            },
        );
    }
    rows_ms(
        report,
        &[
            ("launch floor: `true` spawned by the bench (root)", &t_spawn),
            (
                "launch floor: the same, moved into a cgroup made for it",
                &t_moved,
            ),
            (
                "launch floor: added by the cgroup (mkdir + move)",
                &add_moved,
            ),
        ],
    );
    report.row_note(
        'g',
        "session teardown (egressctl exit to cgroup removed)",
        "ms",
        Spread::of(&teardown),
        format!("{} sessions", teardown.len()),
    );
    for (what, added, bwrap_added) in [
        ("launch adds less than bwrap does", &add_ctl, &add_bwrap),
        (
            "launch adds less than bwrap does, both under favordynmods",
            &add_dyn,
            &add_bwrap_dyn,
        ),
    ] {
        let bw = Spread::of(bwrap_added).map(|s| s.median);
        match (Spread::of(added).map(|s| s.median), bw) {
            (Some(c), Some(b)) => report.target_bool(
                what,
                &format!("< bwrap's {} ms", super::report::num(b)),
                Some(c < b),
                format!("{} ms", super::report::num(c)),
            ),
            _ => report.target_bool(what, "< bwrap", None, "not measured".into()),
        }
    }
    Ok(())
}

/// The first executable file named `bin` on PATH (not a shell builtin).
fn which(bin: &str) -> Option<String> {
    use std::os::unix::fs::PermissionsExt as _;
    std::env::var("PATH")
        .unwrap_or_else(|_| "/usr/bin:/bin".into())
        .split(':')
        .map(|d| std::path::Path::new(d).join(bin))
        .find(|p| {
            std::fs::metadata(p)
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
        .map(|p| p.display().to_string())
}

/// One part (g) row in milliseconds for each (measurement, per-round medians).
fn rows_ms(report: &mut Report, rows: &[(&str, &Vec<f64>)]) {
    for (what, values) in rows {
        report.row('g', *what, "ms", Spread::of(values));
    }
}
