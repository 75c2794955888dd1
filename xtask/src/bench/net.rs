//! Parts (a) and (b): loopback TCP connect+close and 64-byte UDP sends, with no enforcement, under
//! egressd (enforce and audit-mode profiles), and under the nftables rule a user would write
//! instead; denied connects to the outside host against socket+close alone; in-kernel ns per
//! program run from the kernel's BPF statistics.

use std::collections::BTreeMap;

use serde_json::Value;

use super::{
    fixture::{json_of, BpfStats, Cgroup, Daemon, Nft, Sinks, OUTSIDE},
    floor::Floor,
    report::Report,
    stats::{prog_stats, Spread},
    Plan,
};

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub enum Variant {
    None,
    Egressd,
    Audit,
    /// egressd's kernel programs alone: a profile with `unix = "open"`, so no connect(2) goes
    /// through the unix supervisor. What the programs cost, apart from the unix layer.
    KernelOnly,
    Nft,
    /// Programs that only `return 1` on the same hooks: what the kernel costs before any policy.
    Floor,
    /// Programs that make one helper call and one hash lookup: in the statistics pass only.
    FloorLookup,
}

/// The variants of the rate and latency rows.
pub const VARIANTS: [Variant; 6] = [
    Variant::None,
    Variant::Egressd,
    Variant::Audit,
    Variant::KernelOnly,
    Variant::Nft,
    Variant::Floor,
];

impl Variant {
    pub fn label(self) -> &'static str {
        match self {
            Variant::None => "no enforcement",
            Variant::Egressd => "egressd (enforce)",
            Variant::Audit => "egressd (audit mode)",
            Variant::KernelOnly => "egressd, unix layer off",
            Variant::Nft => "nftables (cgroup match)",
            Variant::Floor => "empty programs (kernel floor)",
            Variant::FloorLookup => "one-lookup programs",
        }
    }
}

pub struct Net<'a> {
    pub daemon: &'a Daemon,
    pub plain: &'a Cgroup,
    pub nft_cg: &'a Cgroup,
    pub sinks: &'a Sinks,
    pub probe: String,
    pub floor: &'a Floor,
    pub floor_lookup: &'a Floor,
}

impl Net<'_> {
    fn run(&self, v: Variant, args: &[&str]) -> anyhow::Result<Value> {
        let mut argv = vec![self.probe.as_str(), "bench"];
        argv.extend_from_slice(args);
        match v {
            Variant::None => json_of(&mut self.plain.command(&argv)),
            Variant::Nft => {
                let _rules = Nft::load(self.nft_cg)?;
                json_of(&mut self.nft_cg.command(&argv))
            }
            Variant::Egressd => json_of(&mut self.daemon.run_cmd(Some("enforce"), &argv)),
            Variant::Audit => json_of(&mut self.daemon.run_cmd(Some("watch"), &argv)),
            Variant::KernelOnly => json_of(&mut self.daemon.run_cmd(Some("kernel"), &argv)),
            Variant::Floor => json_of(&mut self.floor.cg.command(&argv)),
            Variant::FloorLookup => json_of(&mut self.floor_lookup.cg.command(&argv)),
        }
    }
}

fn f(v: &Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or(f64::NAN)
}

/// Per variant, one value per round.
type Series = BTreeMap<Variant, Vec<f64>>;

fn push(s: &mut Series, v: Variant, x: f64) {
    s.entry(v).or_default().push(x);
}

/// Per-round ratio of `v` to the baseline.
fn ratios(s: &Series, v: Variant) -> Vec<f64> {
    let (Some(a), Some(b)) = (s.get(&v), s.get(&Variant::None)) else {
        return Vec::new();
    };
    a.iter().zip(b).map(|(x, y)| x / y).collect()
}

fn deltas(s: &Series, v: Variant) -> Vec<f64> {
    let (Some(a), Some(b)) = (s.get(&v), s.get(&Variant::None)) else {
        return Vec::new();
    };
    a.iter().zip(b).map(|(x, y)| x - y).collect()
}

fn spread(s: &Series, v: Variant) -> Option<Spread> {
    s.get(&v).and_then(|x| Spread::of(x))
}

/// ns per run of each program (by attach type) over one workload.
fn per_run(
    before: &[(String, u64, u64)],
    after: &[(String, u64, u64)],
) -> BTreeMap<String, (f64, u64)> {
    before
        .iter()
        .zip(after)
        .filter(|(b, a)| a.2 > b.2)
        .map(|(b, a)| {
            let runs = a.2 - b.2;
            (b.0.clone(), ((a.1 - b.1) as f64 / runs as f64, runs))
        })
        .collect()
}

fn snapshot(progs: &[(String, u32)]) -> anyhow::Result<Vec<(String, u64, u64)>> {
    progs
        .iter()
        .map(|(n, id)| prog_stats(*id).map(|(t, c)| (n.clone(), t, c)))
        .collect()
}

pub fn run(net: &Net, plan: &Plan, report: &mut Report) -> anyhow::Result<()> {
    let (tcp_s, udp_s, den_s, stat_s) = (
        plan.secs(2.0).to_string(),
        plan.secs(1.5).to_string(),
        plan.secs(1.5).to_string(),
        plan.secs(0.7).to_string(),
    );
    let denied_to = format!("{OUTSIDE}:443");
    let (mut rate, mut p50, mut p99, mut uu, mut uc) = (
        Series::new(),
        Series::new(),
        Series::new(),
        Series::new(),
        Series::new(),
    );
    let (mut den_cost, mut den_ratio, mut den_errors) = (Vec::new(), Vec::new(), 0.0);
    // (variant, workload, program) -> ns per run and runs, per round.
    type NsAndRuns = (Vec<f64>, Vec<f64>);
    let mut prog_ns: BTreeMap<(Variant, &str, String), NsAndRuns> = BTreeMap::new();
    let progs = net.daemon.programs()?;
    for round in 0..plan.rounds {
        eprintln!("bench: (a,b) network, round {}/{}", round + 1, plan.rounds);
        // Rotate the order each round, so no variant always runs first or last.
        let n = VARIANTS.len();
        let order: Vec<Variant> = (0..n).map(|i| VARIANTS[(i + round) % n]).collect();
        for &v in &order {
            let r = net.run(v, &["tcp-connect", &net.sinks.tcp, &tcp_s])?;
            if f(&r, "errors") > 0.0 {
                eprintln!("bench: {} tcp: {} failed connects", v.label(), r["errors"]);
            }
            push(&mut rate, v, f(&r, "rate"));
            push(&mut p50, v, f(&r, "p50_ns") / 1000.0);
            push(&mut p99, v, f(&r, "p99_ns") / 1000.0);
        }
        for &v in &order {
            let r = net.run(v, &["udp", &net.sinks.udp, &udp_s, "unconnected"])?;
            push(&mut uu, v, f(&r, "rate"));
            let r = net.run(v, &["udp", &net.sinks.udp, &udp_s, "connected"])?;
            push(&mut uc, v, f(&r, "rate"));
        }
        let r = net.run(Variant::Egressd, &["tcp-denied", &denied_to, &den_s])?;
        den_cost.push(f(&r, "denied_ns") - f(&r, "baseline_ns"));
        den_ratio.push(f(&r, "denied_ns") / f(&r, "baseline_ns"));
        den_errors += f(&r, "not_denied");
        // The statistics cost two clock reads per program run: on only for this pass.
        let _stats = BpfStats::enable()?;
        for v in [
            Variant::Egressd,
            Variant::Audit,
            Variant::Floor,
            Variant::FloorLookup,
        ] {
            let progs = match v {
                Variant::Floor => &net.floor.programs,
                Variant::FloorLookup => &net.floor_lookup.programs,
                _ => &progs,
            };
            for (work, args) in [
                ("TCP connect", vec!["tcp-connect", &net.sinks.tcp, &stat_s]),
                (
                    "UDP sendto",
                    vec!["udp", &net.sinks.udp, &stat_s, "unconnected"],
                ),
                (
                    "UDP send (connected)",
                    vec!["udp", &net.sinks.udp, &stat_s, "connected"],
                ),
                ("denied connect", vec!["tcp-denied", &denied_to, &stat_s]),
            ] {
                // The floor allows everything: a "denied" connect would be a real one.
                if work == "denied connect" && matches!(v, Variant::Floor | Variant::FloorLookup) {
                    continue;
                }
                let a = snapshot(progs)?;
                net.run(v, &args)?;
                let b = snapshot(progs)?;
                for (prog, (ns, runs)) in per_run(&a, &b) {
                    let e = prog_ns.entry((v, work, prog)).or_default();
                    e.0.push(ns);
                    e.1.push(runs as f64);
                }
            }
        }
    }

    for v in VARIANTS {
        report.row(
            'a',
            format!("TCP connect+close rate, {}", v.label()),
            "/s",
            spread(&rate, v),
        );
    }
    for v in VARIANTS {
        report.row(
            'a',
            format!("connect() p50, {}", v.label()),
            "us",
            spread(&p50, v),
        );
        report.row(
            'a',
            format!("connect() p99, {}", v.label()),
            "us",
            spread(&p99, v),
        );
    }
    for v in &VARIANTS[1..] {
        let r = Spread::of(&ratios(&rate, *v));
        report.row(
            'a',
            format!("connect rate ratio, {} / none", v.label()),
            "x",
            r,
        );
        report.ratio(format!("TCP connect rate, {}", v.label()), r, Some(0.97));
        report.row(
            'a',
            format!("connect() p50 added, {}", v.label()),
            "us",
            Spread::of(&deltas(&p50, *v)),
        );
    }
    let den = Spread::of(&den_cost);
    report.row_note(
        'a',
        "denied connect to outside host: added ns vs socket+close",
        "ns",
        den,
        if den_errors > 0.0 {
            format!("{den_errors} connects NOT denied")
        } else {
            String::new()
        },
    );
    report.row(
        'a',
        "denied connect: (socket+connect+close) / (socket+close)",
        "x",
        Spread::of(&den_ratio),
    );
    for v in VARIANTS {
        report.row(
            'b',
            format!("UDP 64 B sendto rate, {}", v.label()),
            "/s",
            spread(&uu, v),
        );
    }
    for v in VARIANTS {
        report.row(
            'b',
            format!("UDP 64 B send (connected) rate, {}", v.label()),
            "/s",
            spread(&uc, v),
        );
    }
    for v in &VARIANTS[1..] {
        let r = Spread::of(&ratios(&uu, *v));
        report.row(
            'b',
            format!("UDP sendto ratio, {} / none", v.label()),
            "x",
            r,
        );
        report.ratio(format!("UDP sendto rate, {}", v.label()), r, Some(0.95));
        let r = Spread::of(&ratios(&uc, *v));
        report.row(
            'b',
            format!("UDP connected ratio, {} / none", v.label()),
            "x",
            r,
        );
        report.ratio(format!("UDP connected rate, {}", v.label()), r, Some(0.95));
    }
    // The worst program cost on the allowed path (loopback connects and sends) and on the denied
    // path (a connect to the outside host), over both egressd variants: every decision is audited.
    let mut worst_allowed: Option<(f64, String)> = None;
    let mut worst_denied: Option<(f64, String)> = None;
    for ((v, work, prog), (xs, runs)) in &prog_ns {
        // A program that ran a handful of times in a workload (the one socket()/connect() of a
        // UDP sender) is a cold-cache outlier, not that workload's cost.
        let runs = Spread::of(runs).map_or(0.0, |r| r.median);
        if runs < 1000.0 {
            continue;
        }
        let s = Spread::of(xs);
        report.row_note(
            'a',
            format!("ns/run {prog} during {work}, {}", v.label()),
            "ns",
            s,
            format!("{runs:.0} runs"),
        );
        if !matches!(v, Variant::Egressd | Variant::Audit) {
            continue;
        }
        let worst = if *work == "denied connect" {
            &mut worst_denied
        } else {
            &mut worst_allowed
        };
        if let Some(s) = s {
            if worst.as_ref().is_none_or(|(w, _)| s.median > *w) {
                *worst = Some((s.median, format!("{prog} during {work}, {}", v.label())));
            }
        }
    }

    // Targets: the egressd variant (enforce); audit mode is shown in the rows.
    let r = Spread::of(&ratios(&rate, Variant::Egressd)).map(|s| s.median);
    report.target("TCP connect rate ratio, egressd / none", r, 0.97, true, "");
    let d = Spread::of(&deltas(&p50, Variant::Egressd)).map(|s| s.median);
    report.target("connect() p50 added by egressd", d, 0.5, false, " us");
    let u = Spread::of(&ratios(&uu, Variant::Egressd)).map(|s| s.median);
    report.target("UDP sendto rate ratio, egressd / none", u, 0.95, true, "");
    let u = Spread::of(&ratios(&uc, Variant::Egressd)).map(|s| s.median);
    report.target(
        "UDP connected send rate ratio, egressd / none",
        u,
        0.95,
        true,
        "",
    );
    for (path, worst, limit) in [
        ("allowed", worst_allowed, 150.0),
        ("denied", worst_denied, 300.0),
    ] {
        report.target(
            format!(
                "ns per program run on the {path} path (worst: {})",
                worst.as_ref().map(|w| w.1.as_str()).unwrap_or("-")
            ),
            worst.map(|w| w.0),
            limit,
            false,
            " ns",
        );
    }
    // Ahead of the nftables rule a user could write instead, on every UDP row.
    for (what, s) in [("sendto", &uu), ("connected send", &uc)] {
        let ours = Spread::of(&ratios(s, Variant::Egressd)).map(|s| s.median);
        let nft = Spread::of(&ratios(s, Variant::Nft)).map(|s| s.median);
        let ahead = ours.zip(nft).map(|(o, n)| o >= n);
        report.target_bool(
            format!("UDP {what}: egressd ratio at least the nftables rule's"),
            "ahead",
            ahead,
            match ours.zip(nft) {
                Some((o, n)) => format!("{o:.3} vs {n:.3}"),
                None => "not measured".into(),
            },
        );
    }
    Ok(())
}
