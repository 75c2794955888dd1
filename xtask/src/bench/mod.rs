//! `cargo xtask bench [--quick]`: the performance of egressd, measured in one run against the
//! alternatives (no enforcement, nftables, bwrap), variants interleaved round by round. Output: a
//! table (each target met or missed), target/bench/bench.json and target/bench/ratios.svg.
//! `--quick` runs every part with short iterations, to prove the bench works (CI); its figures
//! are not meant to be compared.

mod audit;
mod dns;
mod fixture;
mod floor;
mod launch;
mod net;
mod reload;
mod report;
mod stats;

use std::{fs, thread, time::Duration};

use anyhow::Context as _;
use serde_json::json;

use fixture::{sweep, Bins, Cgroup, Daemon, Outside, Scratch, Sinks};
use report::Report;
use stats::{cpu_share, sample, Spread};

pub struct Plan {
    pub quick: bool,
    pub rounds: usize,
}

impl Plan {
    /// Seconds for one measurement: `full` normally, a fifth of it (at least 0.2 s) in quick mode.
    pub fn secs(&self, full: f64) -> f64 {
        if self.quick {
            (full / 5.0).max(0.2)
        } else {
            full
        }
    }
}

const NET_POLICY: &str = "default_profile = \"enforce\"\n[profiles.enforce]\nmode = \"enforce\"\nloopback = true\n[profiles.watch]\nmode = \"audit\"\nloopback = true\n[profiles.kernel]\nmode = \"enforce\"\nloopback = true\nunix = \"open\"\n";

pub fn run(quick: bool, only: Option<&str>) -> anyhow::Result<()> {
    let wants = |part: char| only.is_none_or(|o| o.contains(part));
    crate::check(
        crate::cargo().args([
            "build",
            "--release",
            "-p",
            "egressd",
            "-p",
            "egressctl",
            "-p",
            "egressd-tests",
            "--bins",
        ]),
        "building the release binaries",
    )?;
    let plan = Plan {
        quick,
        rounds: if quick { 2 } else { 5 },
    };
    let bins = Bins::new();
    let probe = bins.probe.display().to_string();
    sweep(&bins);
    let started = std::time::Instant::now();
    let mut report = Report::default();
    let scratch = Scratch::new()?;
    let _outside = Outside::new().context("creating the outside host")?;
    let plain = Cgroup::new("plain")?;
    let nft_cg = Cgroup::new("nft")?;
    let nft_ok = which_nft();

    // (e) idle, then (a) and (b) against one daemon.
    if wants('a') || wants('b') || wants('e') {
        let d = Daemon::start(&bins, &scratch, "net", NET_POLICY, "", "")?;
        if wants('e') {
            idle(&d, &plan, &mut report);
        }
        let sinks = Sinks::start()?;
        let floor = floor::Floor::attach("floor", floor::Body::Empty)?;
        let floor_lookup = floor::Floor::attach("floor1", floor::Body::OneLookup)?;
        let n = net::Net {
            floor: &floor,
            floor_lookup: &floor_lookup,
            daemon: &d,
            plain: &plain,
            nft_cg: &nft_cg,
            sinks: &sinks,
            probe: probe.clone(),
        };
        if !nft_ok {
            anyhow::bail!("nft is not installed: `cargo xtask bootstrap` installs nftables");
        }
        if wants('a') || wants('b') {
            net::run(&n, &plan, &mut report)?;
        }
    }
    // A daemon of its own: after (a) and (b) the first one is still writing millions of records,
    // and a launch then measures that backlog, not what a user waits for.
    if wants('g') {
        let d = Daemon::start(&bins, &scratch, "launch", NET_POLICY, "", "")?;
        launch::run(&d, &plan, &mut report)?;
    }
    if wants('c') {
        let d = Daemon::start(&bins, &scratch, "audit", audit::POLICY, "", audit::AUDIT)?;
        audit::run(&d, &probe, &plan, &mut report)?;
    }
    if wants('d') {
        let up = dns::Upstream::start(&probe)?;
        let d = Daemon::start(
            &bins,
            &scratch,
            "dns",
            dns::POLICY,
            &format!("upstream = [\"{}\"]\n", up.addr),
            "fold_window_ms = 1000\n",
        );
        match d {
            Ok(d) => dns::run(&d, &plain, &up, &probe, &plan, &mut report)?,
            Err(e) => report.not_measured(
                'd',
                "DNS filter",
                format!("egressd with a [dns] table did not start: {e}"),
            ),
        }
    }
    if wants('f') {
        let d = Daemon::start(&bins, &scratch, "reload", reload::INITIAL, "", "")?;
        reload::run(&d, &probe, &plan, &mut report)?;
    }

    report.rows.sort_by_key(|r| r.part);
    let table = report.table();
    let machine = machine();
    println!(
        "\negressd bench{} on {machine}\n",
        if quick {
            " --quick (short iterations; figures not comparable)"
        } else {
            ""
        }
    );
    println!("{table}");
    // A run of some parts only does not replace the last whole run's files.
    let out = match only {
        None => crate::workspace_root().join("target/bench"),
        Some(parts) => crate::workspace_root().join(format!("target/bench/only-{parts}")),
    };
    fs::create_dir_all(&out)?;
    let meta = json!({
        "machine": machine,
        "quick": quick,
        "only": only,
        "rounds": plan.rounds,
        "date": chrono_like_now(),
        "seconds": started.elapsed().as_secs_f64(),
    });
    fs::write(
        out.join("bench.json"),
        serde_json::to_string_pretty(&report.json(meta))?,
    )?;
    fs::write(out.join("bench.txt"), format!("{machine}\n\n{table}"))?;
    report.write_svg(
        &out.join("ratios.svg"),
        &format!("egressd bench, {machine}"),
    )?;
    eprintln!(
        "bench: {:.0} s; wrote {o}/bench.json, {o}/bench.txt and {o}/ratios.svg",
        started.elapsed().as_secs_f64(),
        o = out.display()
    );
    Ok(())
}

fn which_nft() -> bool {
    fixture::sh("command -v nft").status.success()
}

/// (e) at idle: RSS, CPU and wakeups (context switches of all threads) of a daemon with no sessions.
fn idle(d: &Daemon, plan: &Plan, report: &mut Report) {
    // Let start-up settle first.
    thread::sleep(Duration::from_secs(if plan.quick { 1 } else { 3 }));
    let secs = if plan.quick { 3.0 } else { 20.0 };
    let a = sample(d.pid());
    thread::sleep(Duration::from_secs_f64(secs));
    let b = sample(d.pid());
    let rss = b.rss as f64 / (1 << 20) as f64;
    let cpu = 100.0 * cpu_share(&a, &b);
    let wake = (b.switches - a.switches) as f64 / (b.at - a.at).as_secs_f64();
    report.row_note(
        'e',
        "egressd RSS at idle",
        "MiB",
        Spread::of(&[rss]),
        format!("{secs} s, no sessions"),
    );
    report.row('e', "egressd CPU at idle", "%core", Spread::of(&[cpu]));
    report.row(
        'e',
        "egressd wakeups at idle (context switches)",
        "/s",
        Spread::of(&[wake]),
    );
    report.target("idle RSS", Some(rss), 15.0, false, " MiB");
    report.target("idle CPU", Some(cpu), 0.1, false, " %");
}

fn machine() -> String {
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|s| s.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default();
    let cores = thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    format!(
        "Linux {}, {cores} cores ({cpu}), {}",
        kernel.trim(),
        chrono_like_now()
    )
}

/// Today's date (UTC), YYYY-MM-DD.
fn chrono_like_now() -> String {
    let days = stats::now_ns() / 1_000_000_000 / 86400;
    // Civil from days (Howard Hinnant's algorithm).
    let z = days as i64 + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}
