//! Part (f): policy reload. A session probes a destination with UDP connect() (the connect hook
//! judges it; nothing is sent) in a loop; the policy is rewritten to allow, then deny, it and
//! reloaded over the control socket; the time from the request to the first new verdict the
//! session sees. Then 1k reloads while a session takes verdicts on an allowed and a denied
//! destination, and every wrong verdict is counted.

use std::{
    fmt::Write as _,
    fs,
    io::{BufRead as _, BufReader, Write as _},
    process::Stdio,
    thread,
    time::Duration,
};

use anyhow::{bail, Context as _};

use super::{
    fixture::{Daemon, OUTSIDE},
    report::Report,
    stats::{mono_ns, percentile, Spread},
    Plan,
};

/// The session's profile keeps `unix = "open"`: every check of the verdict probe is a connect(2),
/// which the unix layer would send through egressd's supervisor, so the probe's loop would keep
/// egressd busy answering it during the very reload it times.
pub const INITIAL: &str =
    "default_profile = \"r\"\n[profiles.r]\nloopback = true\nunix = \"open\"\n";

/// A profile `r` with `n` allow rules; the probe's destination among them when `open`; `salt`
/// changes the filler rules so every reload really rewrites the tables.
fn policy(n: usize, open: bool, salt: usize) -> String {
    let mut s = String::from(INITIAL);
    s.push_str("allow = [\n");
    let fillers = if open { n - 1 } else { n };
    for i in 0..fillers {
        let k = i + salt * 7;
        let _ = writeln!(
            s,
            "  \"10.{}.{}.{}/32:443/tcp\",",
            (k >> 16) & 255,
            (k >> 8) & 255,
            k & 255
        );
    }
    if open {
        let _ = writeln!(s, "  \"{OUTSIDE}/32:9/udp\",");
    }
    s.push_str("]\n");
    s
}

pub fn run(d: &Daemon, probe: &str, plan: &Plan, report: &mut Report) -> anyhow::Result<()> {
    let target = format!("{OUTSIDE}:9");
    let mut child = d
        .run_cmd(Some("r"), &[probe, "bench", "verdicts", &target])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut to = child.stdin.take().unwrap();
    let mut from = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    from.read_line(&mut line)?;
    if line.trim() != "ready" {
        bail!("verdict probe did not start: {line}");
    }
    let sizes = [10usize, 1000, 10000];
    let flips = if plan.quick { 3 } else { 10 };
    let mut lat: Vec<Vec<f64>> = vec![Vec::new(); sizes.len()];
    let mut failed: Vec<Option<String>> = vec![None; sizes.len()];
    for round in 0..plan.rounds {
        eprintln!("bench: (f) reload, round {}/{}", round + 1, plan.rounds);
        for (i, &n) in sizes.iter().enumerate() {
            if failed[i].is_some() {
                continue;
            }
            for flip in 0..2 * flips {
                let open = flip % 2 == 0;
                d.write_policy(&policy(n, open, flip))?;
                // The probe watches for the new verdict from before the request, so what is
                // timed is the request to the first verdict the session sees (not also the
                // reply, which egressd sends after the switch, and its parsing here).
                writeln!(to, "{}", if open { "allowed" } else { "denied" })?;
                let t0 = mono_ns();
                if let Err(e) = d.request("reload") {
                    failed[i] = Some(e.to_string());
                    break;
                }
                line.clear();
                from.read_line(&mut line)?;
                let seen: u64 = line
                    .trim()
                    .parse()
                    .with_context(|| format!("verdict probe: {line}"))?;
                lat[i].push(seen.saturating_sub(t0) as f64 / 1e6);
            }
        }
    }
    drop(to);
    let _ = child.kill();
    let _ = child.wait();
    for (i, &n) in sizes.iter().enumerate() {
        let what = format!("reload to new verdict, {n} rules");
        match &failed[i] {
            Some(e) => report.not_measured('f', what, format!("reload failed: {e}")),
            None => {
                report.row_note(
                    'f',
                    format!("{what}: p50"),
                    "ms",
                    Spread::of(&[percentile(&lat[i], 50.0)]),
                    format!("{} reloads", lat[i].len()),
                );
                report.row(
                    'f',
                    format!("{what}: p99"),
                    "ms",
                    Spread::of(&[percentile(&lat[i], 99.0)]),
                );
            }
        }
    }
    let p99_1k = failed[1].is_none().then(|| percentile(&lat[1], 99.0));
    report.target(
        "reload p99 at 1k rules (request to new verdict)",
        p99_1k,
        1.0,
        false,
        " ms",
    );

    // Verdicts during many reloads.
    let reloads = if plan.quick { 100 } else { 1000 };
    eprintln!("bench: (f) {reloads} reloads of 1k rules during a verdict storm");
    d.write_policy(&policy(1000, true, 0))?;
    d.request("reload")?;
    let stop = d.config.with_file_name("storm.stop");
    let _ = fs::remove_file(&stop);
    let denied = "198.18.200.3:9";
    let mut storm = d
        .run_cmd(
            Some("r"),
            &[
                probe,
                "bench",
                "storm",
                &target,
                denied,
                &stop.display().to_string(),
            ],
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut out = BufReader::new(storm.stdout.take().unwrap());
    line.clear();
    out.read_line(&mut line)?;
    let t = std::time::Instant::now();
    let mut errors = 0;
    for k in 0..reloads {
        d.write_policy(&policy(1000, true, k + 1))?;
        if d.request("reload").is_err() {
            errors += 1;
        }
    }
    let secs = t.elapsed().as_secs_f64();
    fs::write(&stop, b"")?;
    line.clear();
    out.read_line(&mut line)?;
    let _ = storm.wait();
    thread::sleep(Duration::from_millis(10));
    let r: serde_json::Value =
        serde_json::from_str(line.trim()).with_context(|| format!("storm: {line}"))?;
    let wrong =
        r["allowed_refused"].as_u64().unwrap_or(0) + r["denied_passed"].as_u64().unwrap_or(0);
    report.row_note(
        'f',
        format!("verdicts during {reloads} reloads (1k rules)"),
        "",
        Spread::of(&[r["verdicts"].as_f64().unwrap_or(f64::NAN)]),
        format!(
            "{wrong} wrong; {errors} reloads failed; {:.0} reloads/s",
            reloads as f64 / secs
        ),
    );
    report.target_bool(
        format!("no wrong verdict during {reloads} reloads"),
        "0 wrong",
        Some(wrong == 0 && errors == 0),
        format!("{wrong} wrong"),
    );
    Ok(())
}
