//! Part (d): the DNS filter. A DNS server on loopback answers every name; the baseline asks it
//! directly (no sandbox), the filtered variant asks a stub address on port 53 from inside a session
//! and the kernel redirects the query to egressd's resolver, which resolves allowed names through
//! that same loopback server and answers denied names itself (NXDOMAIN). Latency per query at
//! concurrency 1, 16 and 64; queries per second per core of egressd. The allowed names repeat (so
//! egressd's answer cache serves them after their first query); a third variant asks a new name
//! every time, so each query is forwarded.

use std::{
    io::{BufRead as _, BufReader},
    process::{Child, Command, Stdio},
};

use anyhow::bail;
use serde_json::Value;

use super::{
    fixture::{free_port, json_of, Cgroup, Daemon, OUTSIDE},
    report::Report,
    stats::{cpu_share, sample, Spread},
    Plan,
};

pub const POLICY: &str = "default_profile = \"dns\"\n[profiles.dns]\nloopback = true\ndns_allow = [\"*.allowed.bench\"]\n";

/// A loopback address like a stub resolver's, where nothing listens: should the redirect ever
/// fail, the query goes nowhere (a timeout), never to this machine's resolver.
const STUB: &str = "127.0.0.153:53";

pub struct Upstream {
    pub addr: String,
    child: Child,
}

impl Upstream {
    pub fn start(probe: &str) -> anyhow::Result<Upstream> {
        let addr = format!("127.0.0.1:{}", free_port());
        let mut child = Command::new(probe)
            .args(["bench", "dns-server", &addr, OUTSIDE])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line)?;
        if line.trim() != "ready" {
            bail!("loopback DNS server did not start");
        }
        Ok(Upstream { addr, child })
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn names(kind: &str) -> Vec<String> {
    (0..64).map(|i| format!("h{i}.{kind}.bench")).collect()
}

fn f(v: &Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or(f64::NAN)
}

pub fn run(
    d: &Daemon,
    plain: &Cgroup,
    up: &Upstream,
    probe: &str,
    plan: &Plan,
    report: &mut Report,
) -> anyhow::Result<()> {
    let secs = plan.secs(1.0).to_string();
    let concs = [1usize, 16, 64];
    let (allowed, denied) = (names("allowed"), names("denied"));
    // Every query a name never asked before: the upstream is asked each time (no cache answers).
    let fresh = vec!["q{n}.allowed.bench".to_string()];
    // [conc] -> (direct p50, p99, qps, per core), (allowed ...), (denied ...), (allowed fresh ...)
    type S = Vec<f64>;
    let mut m: Vec<[(S, S, S, S); 4]> = (0..concs.len()).map(|_| Default::default()).collect();
    let mut problems = Vec::new();
    for round in 0..plan.rounds {
        eprintln!("bench: (d) DNS, round {}/{}", round + 1, plan.rounds);
        for (ci, conc) in concs.iter().enumerate() {
            let c = conc.to_string();
            for (k, (server, list, sandboxed)) in [
                (up.addr.as_str(), &allowed, false),
                (STUB, &allowed, true),
                (STUB, &denied, true),
                (STUB, &fresh, true),
            ]
            .into_iter()
            .enumerate()
            {
                let mut argv: Vec<&str> = vec![probe, "bench", "dns", server, &c, &secs];
                argv.extend(list.iter().map(String::as_str));
                let s0 = sample(d.pid());
                let r = if sandboxed {
                    json_of(&mut d.run_cmd(Some("dns"), &argv))?
                } else {
                    json_of(&mut plain.command(&argv))?
                };
                let s1 = sample(d.pid());
                let bad = f(&r, "timeouts")
                    + f(&r, "other_rcode")
                    + if k == 2 { 0.0 } else { f(&r, "nxdomain") };
                if bad > 0.0 {
                    problems.push(format!(
                        "c={conc} {}: {bad} failed",
                        ["direct", "allowed", "denied", "allowed fresh"][k]
                    ));
                }
                let e = &mut m[ci][k];
                e.0.push(f(&r, "p50_ns") / 1e3);
                e.1.push(f(&r, "p99_ns") / 1e3);
                e.2.push(f(&r, "qps"));
                e.3.push(f(&r, "qps") / cpu_share(&s0, &s1).max(1e-9));
            }
        }
    }
    // (conc, worst p50 added, worst p99 added, worst per-core queries/s over the server's)
    let mut worst: Vec<(usize, f64, f64, f64)> = Vec::new();
    for (ci, conc) in concs.iter().enumerate() {
        let [direct, al, de, fr] = &m[ci];
        report.row(
            'd',
            format!("DNS c={conc} direct to loopback server: p50"),
            "us",
            Spread::of(&direct.0),
        );
        report.row(
            'd',
            format!("DNS c={conc} direct to loopback server: p99"),
            "us",
            Spread::of(&direct.1),
        );
        report.row(
            'd',
            format!("DNS c={conc} direct: queries/s"),
            "/s",
            Spread::of(&direct.2),
        );
        let (mut w50, mut w99, mut wq) = (f64::MIN, f64::MIN, f64::MAX);
        let direct_qps = Spread::of(&direct.2).map_or(f64::NAN, |s| s.median);
        for (label, e) in [
            ("allowed", al),
            ("denied", de),
            ("allowed, each name new", fr),
        ] {
            let add = |a: &S, b: &S| -> Vec<f64> { a.iter().zip(b).map(|(x, y)| x - y).collect() };
            let (a50, a99) = (
                Spread::of(&add(&e.0, &direct.0)),
                Spread::of(&add(&e.1, &direct.1)),
            );
            report.row(
                'd',
                format!("DNS c={conc} via egressd, {label}: p50 added"),
                "us",
                a50,
            );
            report.row(
                'd',
                format!("DNS c={conc} via egressd, {label}: p99 added"),
                "us",
                a99,
            );
            report.row(
                'd',
                format!("DNS c={conc} via egressd, {label}: queries/s"),
                "/s",
                Spread::of(&e.2),
            );
            report.row(
                'd',
                format!("DNS c={conc} via egressd, {label}: queries/s per egressd core"),
                "/s",
                Spread::of(&e.3),
            );
            // The targets are on the bench's workload (64 names asked over and over); the
            // fresh-name rows show the forwarding path a first lookup takes.
            if label != "allowed, each name new" {
                wq = wq.min(Spread::of(&e.3).map_or(f64::NAN, |s| s.median) / direct_qps);
                w50 = w50.max(a50.map_or(f64::NAN, |s| s.median));
                w99 = w99.max(a99.map_or(f64::NAN, |s| s.median));
            }
        }
        worst.push((*conc, w50, w99, wq));
    }
    if !problems.is_empty() {
        report.row_note(
            'd',
            "DNS queries without the expected answer",
            "",
            None,
            problems.join("; "),
        );
    }
    // The targets: latency added at one query in flight; under concurrency, throughput
    // per egressd core within 2x of the loopback server's.
    for (conc, w50, w99, wq) in worst {
        if conc > 1 {
            report.target(
                format!("DNS c={conc}: queries/s per egressd core / server's queries/s (worst)"),
                Some(wq),
                0.5,
                true,
                " x",
            );
            continue;
        }
        report.target(
            format!("DNS p50 added, c={conc} (worst of allowed/denied)"),
            Some(w50),
            20.0,
            false,
            " us",
        );
        report.target(
            format!("DNS p99 added, c={conc} (worst of allowed/denied)"),
            Some(w99),
            50.0,
            false,
            " us",
        );
    }
    Ok(())
}
