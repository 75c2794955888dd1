//! `egressctl audit report`: the audit log as a person reads it. One self-contained HTML file (no
//! fetch of any kind: inline CSS, inline SVG, and a Content-Security-Policy that forbids the rest)
//! or the same as Markdown: the machine, the period, the policy in force, the sessions, a chart of
//! decisions over time, what was denied, what was lost, and whether the log verifies.
//!
//! Its figures come from `audit::tally`, which `egressctl audit summary` prints: for the same
//! period and session they are the same numbers. Every string from the log (argv, comm, DNS
//! names, messages) comes from a sandboxed, untrusted process or passes through one, and is
//! escaped for HTML (or Markdown) where it is written.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    fs,
    io::{self, BufReader, Write as _},
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use clap::ValueEnum;
use egressd_common::{
    audit::{verify, Record},
    seal::{self, rfc3339_secs, VerificationKey},
};

use crate::audit::{self, Matcher, Summary, Tally};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ReportFormat {
    /// One self-contained HTML file (inline CSS and SVG, nothing fetched).
    Html,
    /// Markdown, for a ticket or a wiki.
    Md,
}

pub struct Options {
    pub since: Option<String>,
    pub until: Option<String>,
    pub session: Option<String>,
    pub keys: Vec<String>,
    pub format: ReportFormat,
    pub output: Option<PathBuf>,
}

pub fn report(log: &Path, o: &Options) -> anyhow::Result<ExitCode> {
    let keys = o
        .keys
        .iter()
        .map(|k| k.parse::<VerificationKey>().map_err(anyhow::Error::msg))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let in_period = Matcher::period(o.since.clone(), o.until.clone(), o.session.clone())?;
    let in_time = Matcher::period(o.since.clone(), o.until.clone(), None)?;
    let all = audit::read_all(log)?;
    let check = check_log(log, &keys)?;
    let data = Data::build(log, o, &all, &in_period, &in_time, check)?;
    let text = match o.format {
        ReportFormat::Html => html(&data),
        ReportFormat::Md => markdown(&data),
    };
    match &o.output {
        Some(p) => fs::write(p, text).with_context(|| format!("writing {}", p.display()))?,
        None => {
            let mut out = io::stdout().lock();
            out.write_all(text.as_bytes())?;
            out.flush()?;
        }
    }
    Ok(if data.check.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// How a verification sentence reads: fine, worth a look, or a failure.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Level {
    Good,
    Info,
    Warn,
    Bad,
}

impl Level {
    fn class(self) -> &'static str {
        match self {
            Level::Good => "good",
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Bad => "bad",
        }
    }
}

/// The verification result, in sentences: the same checks as `egressctl audit verify [--key]`,
/// over every file of the log (not only the period).
struct Check {
    ok: bool,
    lines: Vec<(Level, String)>,
}

impl Check {
    /// The worst level said, for the banner.
    fn level(&self) -> Level {
        let has = |l| self.lines.iter().any(|(x, _)| *x == l);
        if has(Level::Bad) {
            Level::Bad
        } else if has(Level::Warn) {
            Level::Warn
        } else {
            Level::Good
        }
    }
}

fn check_log(log: &Path, keys: &[VerificationKey]) -> anyhow::Result<Check> {
    let files: Vec<PathBuf> = audit::log_files(log)
        .into_iter()
        .filter(|f| f.exists())
        .collect();
    if files.is_empty() {
        return Ok(Check {
            ok: false,
            lines: vec![(
                Level::Bad,
                format!("BROKEN: there is no log at {}.", log.display()),
            )],
        });
    }
    let mut readers = Vec::new();
    for f in &files {
        readers.push((f.display().to_string(), BufReader::new(audit::open(f)?)));
    }
    let mut lines = Vec::new();
    let v = match verify(readers) {
        Ok(v) => v,
        Err(b) => {
            return Ok(Check {
                ok: false,
                lines: vec![(
                    Level::Bad,
                    format!("BROKEN: {} line {}: {}", b.file, b.line, b.reason),
                )],
            })
        }
    };
    let last = v.head.as_ref().map(|h| h.seq).unwrap_or(0);
    let first = (last + 1).saturating_sub(v.checked);
    lines.push((
        Level::Good,
        format!(
            "The hash chain is intact: {} records (seq {first}..{last}) in {} {}.",
            num(v.checked),
            files.len(),
            if files.len() == 1 { "file" } else { "files" }
        ),
    ));
    if first > 1 {
        lines.push((
            Level::Info,
            format!("The chain starts at seq {first}: older files were rotated away (retention) or removed."),
        ));
    }
    for note in &v.notes {
        lines.push((Level::Warn, format!("Note: {note}.")));
    }
    if v.lost > 0 {
        lines.push((
            Level::Warn,
            format!(
                "{} records were counted as lost (not itemised; see Lost records).",
                num(v.lost)
            ),
        ));
    }
    if keys.is_empty() {
        lines.push((
            Level::Warn,
            format!(
                "Seals were not checked: no verification key was given (--key). {}",
                match v.seals.len() {
                    0 => "The log holds no seal records.".to_string(),
                    1 => "The log holds 1 seal record.".to_string(),
                    n => format!("The log holds {} seal records.", num(n as u64)),
                }
            ),
        ));
        return Ok(Check { ok: true, lines });
    }
    match seal::check(&v, keys, None) {
        Ok(r) => {
            let id = v
                .seals
                .iter()
                .rev()
                .find_map(|s| s.key.clone())
                .unwrap_or_else(|| keys[0].id());
            lines.push((
                Level::Good,
                format!(
                    "Sealed up to {} (seq {}) with verification key id {id}: {} seals valid (epochs up to {}).",
                    r.sealed_at,
                    r.sealed_seq,
                    num(r.seals as u64),
                    r.last_epoch
                ),
            ));
            for note in &r.notes {
                lines.push((Level::Info, format!("Note: {note}.")));
            }
            if r.unsealed > 0 {
                lines.push((
                    Level::Warn,
                    format!(
                        "{} {} after the last seal {} unsealed: written since the last seal by a running egressd, or the end of the log was cut.",
                        num(r.unsealed),
                        if r.unsealed == 1 { "record" } else { "records" },
                        if r.unsealed == 1 { "is" } else { "are" }
                    ),
                ));
            } else if !r.ends_with_stop {
                lines.push((
                    Level::Warn,
                    "The log ends with a seal of egressd's, not with its stop seal: egressd was running when the log was copied, or crashed, or the end of the log was cut after a seal (`egressctl audit verify --until` checks it).".into(),
                ));
            } else {
                lines.push((
                    Level::Good,
                    "Every record is sealed: the log ends with egressd's stop seal.".into(),
                ));
            }
            Ok(Check { ok: true, lines })
        }
        Err(b) => {
            lines.push((
                Level::Bad,
                if b.file.is_empty() {
                    format!("BAD SEAL: {}", b.reason)
                } else {
                    format!("BAD SEAL: {} line {}: {}", b.file, b.line, b.reason)
                },
            ));
            Ok(Check { ok: false, lines })
        }
    }
}

struct SessionRow {
    id: String,
    argv: Option<Vec<String>>,
    uid: Option<u32>,
    user: Option<String>,
    profile: Option<String>,
    start: Option<String>,
    duration: Option<u64>,
    ended: bool,
    tally: Tally,
    names_denied: u64,
    names: BTreeSet<String>,
}

/// A denied destination or DNS name: how often, by which sessions and processes, when.
#[derive(Default)]
struct Denied {
    count: u64,
    sessions: BTreeSet<String>,
    comms: BTreeSet<String>,
    first: String,
    last: String,
}

impl Denied {
    fn add(&mut self, r: &Record, n: u64) {
        self.count += n;
        self.sessions.insert(r.session.clone().unwrap_or_default());
        if let Some(c) = &r.comm {
            self.comms.insert(c.clone());
        }
        if self.first.is_empty() {
            self.first = r.time.clone();
        }
        self.last = r.time.clone();
    }
}

struct PolicyRow {
    hash: String,
    source: Option<String>,
    first: String,
    last: String,
    sessions: u64,
    records: u64,
}

struct Chart {
    step: i64,
    start: i64,
    /// allowed, denied per bucket.
    buckets: Vec<(u64, u64)>,
}

struct Data {
    host: String,
    /// The machine as egressd's start record names it (host, machine-id), when the log has one.
    machine: Option<(String, Option<String>)>,
    made: String,
    log: String,
    since: Option<(String, String)>,
    until: Option<(String, String)>,
    session: Option<String>,
    first: Option<String>,
    last: Option<String>,
    records: usize,
    summary: Summary,
    sessions: Vec<SessionRow>,
    policies: Vec<PolicyRow>,
    chart: Option<Chart>,
    denied_dests: BTreeMap<String, Denied>,
    denied_names: BTreeMap<String, Denied>,
    daemon: Vec<(String, String, String)>,
    check: Check,
}

impl Data {
    fn build(
        log: &Path,
        o: &Options,
        all: &[Record],
        in_period: &Matcher,
        in_time: &Matcher,
        check: Check,
    ) -> anyhow::Result<Data> {
        let records: Vec<Record> = all.iter().filter(|r| in_period.keeps(r)).cloned().collect();
        let summary = audit::tally(&records);
        let users = passwd();
        let resolved = |t: &Option<String>| -> anyhow::Result<Option<(String, String)>> {
            Ok(match t {
                Some(t) => Some((
                    t.clone(),
                    humantime::format_rfc3339_seconds(audit::parse_time(t)?).to_string(),
                )),
                None => None,
            })
        };

        // What each session was, from its records anywhere in the log (its start may be before
        // the period); its figures are the summary's.
        let mut starts: BTreeMap<&str, &Record> = BTreeMap::new();
        let mut ends: BTreeMap<&str, &Record> = BTreeMap::new();
        for r in all {
            if let Some(s) = r.session.as_deref() {
                match r.kind.as_str() {
                    "session_start" => {
                        starts.entry(s).or_insert(r);
                    }
                    "session_end" => {
                        ends.insert(s, r);
                    }
                    _ => {}
                }
            }
        }
        let mut denied_dests: BTreeMap<String, Denied> = BTreeMap::new();
        let mut denied_names: BTreeMap<String, Denied> = BTreeMap::new();
        let mut names_by_session: BTreeMap<String, (u64, BTreeSet<String>)> = BTreeMap::new();
        for r in &records {
            let denied = r.verdict.as_deref() == Some("denied");
            match r.kind.as_str() {
                "decision" if denied => denied_dests
                    .entry(audit::destination(r))
                    .or_default()
                    .add(r, r.count.unwrap_or(1)),
                "dns" if denied => {
                    let name = r.qname.clone().unwrap_or_default();
                    let n = r.count.unwrap_or(1);
                    denied_names.entry(name.clone()).or_default().add(r, n);
                    let e = names_by_session
                        .entry(r.session.clone().unwrap_or_default())
                        .or_default();
                    e.0 += n;
                    e.1.insert(name);
                }
                _ => {}
            }
        }
        let mut sessions: Vec<SessionRow> = summary
            .sessions
            .iter()
            .map(|(id, (tally, profile))| {
                let start = starts.get(id.as_str());
                let end = ends.get(id.as_str());
                let uid = start.and_then(|r| r.uid);
                let (names_denied, names) = names_by_session.remove(id).unwrap_or_default();
                SessionRow {
                    id: id.clone(),
                    argv: start.and_then(|r| r.argv.clone()),
                    uid,
                    user: uid.and_then(|u| users.get(&u).cloned()),
                    profile: profile
                        .clone()
                        .or_else(|| start.and_then(|r| r.profile.clone())),
                    start: start.map(|r| r.time.clone()),
                    duration: end.and_then(|r| r.duration_s),
                    ended: end.is_some(),
                    tally: *tally,
                    names_denied,
                    names,
                }
            })
            .collect();
        sessions.sort_by(|a, b| {
            (a.start.is_none(), &a.start, &a.id).cmp(&(b.start.is_none(), &b.start, &b.id))
        });

        // The policies in force: every distinct hash the records carry, and where it came from
        // (egressd's start and reload records name the file).
        let mut sources: BTreeMap<String, String> = BTreeMap::new();
        let mut pending: Option<String> = None;
        for r in all {
            if r.kind == "daemon" {
                let m = r.message.as_deref().unwrap_or_default();
                if let Some(rest) = m.strip_prefix("policy reloaded from ") {
                    if let Some((src, hash)) = rest.rsplit_once(" (") {
                        sources
                            .entry(hash.trim_end_matches(')').to_string())
                            .or_insert_with(|| src.to_string());
                    }
                } else if m.starts_with("egressd ") && m.contains(" started (pid ") {
                    pending = m.split_once(", policy: ").map(|(_, s)| s.to_string());
                }
            } else if let Some(h) = &r.policy {
                if let Some(src) = pending.take() {
                    sources.entry(h.clone()).or_insert(src);
                }
            }
        }
        let mut policies: Vec<PolicyRow> = Vec::new();
        for r in &records {
            let Some(h) = &r.policy else { continue };
            let i = match policies.iter().position(|p| &p.hash == h) {
                Some(i) => i,
                None => {
                    policies.push(PolicyRow {
                        hash: h.clone(),
                        source: sources.get(h).cloned(),
                        first: r.time.clone(),
                        last: r.time.clone(),
                        sessions: 0,
                        records: 0,
                    });
                    policies.len() - 1
                }
            };
            let p = &mut policies[i];
            p.last = r.time.clone();
            p.records += 1;
            if r.kind == "session_start" {
                p.sessions += 1;
            }
        }

        let daemon = all
            .iter()
            .filter(|r| in_time.keeps(r))
            .filter(|r| matches!(r.kind.as_str(), "daemon" | "crash" | "log_continued"))
            .map(|r| {
                (
                    r.time.clone(),
                    r.kind.clone(),
                    r.message.clone().unwrap_or_default(),
                )
            })
            .collect();

        Ok(Data {
            host: hostname(),
            machine: all
                .iter()
                .filter(|r| r.kind == "daemon")
                // The machine as of the period's end (RFC 3339 UTC times compare as text).
                .filter(|r| {
                    records
                        .last()
                        .is_none_or(|l| r.time.as_str() <= l.time.as_str())
                })
                .rev()
                .find_map(|r| Some((r.host.clone()?, r.machine_id.clone()))),
            made: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            log: log.display().to_string(),
            since: resolved(&o.since)?,
            until: resolved(&o.until)?,
            session: o.session.clone(),
            first: records.first().map(|r| r.time.clone()),
            last: records.last().map(|r| r.time.clone()),
            records: records.len(),
            chart: chart(&records),
            summary,
            sessions,
            policies,
            denied_dests,
            denied_names,
            daemon,
            check,
        })
    }

    fn totals(&self) -> Tally {
        let mut t = Tally::default();
        for (s, _) in self.summary.sessions.values() {
            t.allowed += s.allowed;
            t.denied += s.denied;
            t.lost += s.lost;
        }
        t
    }

    fn names_denied(&self) -> u64 {
        self.denied_names.values().map(|d| d.count).sum()
    }

    fn period(&self) -> String {
        match (&self.first, &self.last) {
            (Some(a), Some(b)) => {
                let span = match (rfc3339_secs(a), rfc3339_secs(b)) {
                    (Some(x), Some(y)) => format!(" ({})", duration((y - x).max(0) as u64)),
                    _ => String::new(),
                };
                format!("{} to {}{span}", when(a), when(b))
            }
            _ => "no records".into(),
        }
    }

    fn requested(&self) -> String {
        let mut parts = Vec::new();
        match &self.since {
            Some((given, at)) if given != at => parts.push(format!("since {given} ({})", when(at))),
            Some((_, at)) => parts.push(format!("since {}", when(at))),
            None => parts.push("from the start of the log".into()),
        }
        match &self.until {
            Some((given, at)) if given != at => parts.push(format!("until {given} ({})", when(at))),
            Some((_, at)) => parts.push(format!("until {}", when(at))),
            None => parts.push("to its end".into()),
        }
        if let Some(s) = &self.session {
            parts.push(format!("session {s} only"));
        }
        parts.join(", ")
    }
}

/// Decisions per bucket (their `count`s, as the summary adds them), allowed and denied, over the
/// period; the bucket is the smallest round step that makes at most 60 of them.
fn chart(records: &[Record]) -> Option<Chart> {
    let times: Vec<i64> = records
        .iter()
        .filter_map(|r| rfc3339_secs(&r.time))
        .collect();
    let (lo, hi) = (*times.iter().min()?, *times.iter().max()?);
    if !records.iter().any(|r| r.kind == "decision") {
        return None;
    }
    const STEPS: [i64; 21] = [
        1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400,
        172_800, 604_800, 2_592_000,
    ];
    let step = STEPS
        .iter()
        .copied()
        .find(|s| hi.div_euclid(*s) - lo.div_euclid(*s) < 60)
        .unwrap_or(STEPS[STEPS.len() - 1]);
    let start = lo.div_euclid(step) * step;
    let n = (hi.div_euclid(step) - lo.div_euclid(step) + 1) as usize;
    let mut buckets = vec![(0u64, 0u64); n];
    for r in records.iter().filter(|r| r.kind == "decision") {
        let Some(t) = rfc3339_secs(&r.time) else {
            continue;
        };
        let i = ((t - start) / step) as usize;
        let n = r.count.unwrap_or(1);
        if let Some(b) = buckets.get_mut(i) {
            if r.verdict.as_deref() == Some("denied") {
                b.1 += n;
            } else {
                b.0 += n;
            }
        }
    }
    Some(Chart {
        step,
        start,
        buckets,
    })
}

impl Chart {
    fn label(&self, i: usize) -> String {
        let t = self.start + i as i64 * self.step;
        let s =
            humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(t.max(0) as u64))
                .to_string();
        let span = self.step * self.buckets.len() as i64;
        if self.step >= 86_400 {
            s[..10].to_string()
        } else if span > 86_400 {
            format!("{} {}", &s[5..10], &s[11..16])
        } else if self.step >= 60 {
            s[11..16].to_string()
        } else {
            s[11..19].to_string()
        }
    }

    fn step_words(&self) -> String {
        duration(self.step as u64)
    }
}

impl Data {
    /// The machine that wrote the log, else the one the report is made on.
    fn machine_name(&self) -> String {
        self.machine
            .as_ref()
            .map_or_else(|| self.host.clone(), |(h, _)| h.clone())
    }

    fn machine_words(&self) -> String {
        match &self.machine {
            Some((_, Some(id))) => format!("machine-id {id}, from egressd's start record"),
            Some((_, None)) => "from egressd's start record".into(),
            None => "the host this report was made on; the log does not name its machine".into(),
        }
    }
}

fn hostname() -> String {
    fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| {
            nix::unistd::gethostname()
                .ok()
                .map(|h| h.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "(unknown)".into())
}

/// uid -> user name, from /etc/passwd.
fn passwd() -> BTreeMap<u32, String> {
    fs::read_to_string("/etc/passwd")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?;
            let uid = f.nth(1)?.parse().ok()?;
            Some((uid, name.to_string()))
        })
        .collect()
}

/// 1234567 -> "1,234,567".
fn num(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn duration(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s} s"),
        s if s < 3600 => match s % 60 {
            0 => format!("{} min", s / 60),
            r => format!("{} min {r} s", s / 60),
        },
        s if s < 86_400 => match (s % 3600) / 60 {
            0 => format!("{} h", s / 3600),
            m => format!("{} h {m} min", s / 3600),
        },
        s => match (s % 86_400) / 3600 {
            0 => format!("{} d", s / 86_400),
            h => format!("{} d {h} h", s / 86_400),
        },
    }
}

/// 2026-11-22T15:04:56.157Z -> 2026-11-22 15:04:56 UTC.
fn when(t: &str) -> String {
    match t.get(..19) {
        Some(s) if t.ends_with('Z') => format!("{} UTC", s.replace('T', " ")),
        _ => t.to_string(),
    }
}

/// The same in a column whose heading says UTC.
fn when_utc(t: &str) -> String {
    let w = when(t);
    w.strip_suffix(" UTC").map(str::to_string).unwrap_or(w)
}

/// A string from the log made visible: control characters and the bidirectional overrides that
/// could make text read other than it is are written as escapes.
fn visible(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control()
            || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
        {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// For HTML text and attribute values.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in visible(s).chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// For Markdown text (in a table cell, or after a line's own prefix): every character that could
/// start inline markup, inline HTML, an entity or end a cell is backslash-escaped.
fn md(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in visible(s).chars() {
        if "\\`*_[]<>|~#&".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn session_label(id: &str) -> &str {
    if id.is_empty() {
        "(no session)"
    } else {
        id
    }
}

fn user_words(s: &SessionRow) -> String {
    match (s.uid, &s.user) {
        (Some(u), Some(name)) => format!("{name} ({u})"),
        (Some(u), None) => u.to_string(),
        _ => String::new(),
    }
}

fn duration_words(s: &SessionRow) -> String {
    match (s.duration, s.ended) {
        (Some(d), _) => duration(d),
        (None, true) => String::new(),
        (None, false) => "no end recorded".into(),
    }
}

fn join_set(set: &BTreeSet<String>, max: usize) -> String {
    let mut v: Vec<&str> = set.iter().map(|s| session_label(s)).take(max).collect();
    let more;
    if set.len() > max {
        more = format!("and {} more", set.len() - max);
        v.push(&more);
    }
    v.join(", ")
}

const CSS: &str = r#"
:root { color-scheme: light; --ok: #2e7d32; --deny: #c62828; --warn: #b26a00; --ink: #1d2329; --mute: #5f6b76; --line: #dde3e8; }
* { box-sizing: border-box; }
body { margin: 0; background: #f4f6f8; color: var(--ink); font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1060px; margin: 0 auto; padding: 28px 32px 40px; background: #fff; min-height: 100vh; }
h1 { font-size: 24px; margin: 0 0 2px; }
h2 { font-size: 17px; margin: 30px 0 10px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
.sub { color: var(--mute); margin: 0 0 18px; }
.banner { border-radius: 6px; padding: 12px 16px; margin: 14px 0 6px; border-left: 6px solid; }
.banner.good { background: #edf7ee; border-color: var(--ok); }
.banner.warn { background: #fff6e5; border-color: var(--warn); }
.banner.bad { background: #fdecec; border-color: var(--deny); }
.banner p { margin: 3px 0; }
.banner .bad { color: var(--deny); font-weight: 600; }
.banner .warn { color: #7a4a00; }
.banner .info { color: var(--mute); }
.cards { display: flex; gap: 12px; margin: 16px 0 4px; flex-wrap: wrap; }
.card { flex: 1 1 140px; border: 1px solid var(--line); border-radius: 6px; padding: 10px 14px; }
.card .v { font-size: 24px; font-weight: 650; font-variant-numeric: tabular-nums; }
.card .k { color: var(--mute); font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
.card.allowed .v { color: var(--ok); } .card.denied .v, .card.names .v { color: var(--deny); }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 4px 18px; margin: 0; }
dl.facts dt { color: var(--mute); } dl.facts dd { margin: 0; }
table { border-collapse: collapse; width: 100%; margin: 4px 0 8px; }
th, td { text-align: left; padding: 5px 8px; border-bottom: 1px solid var(--line); vertical-align: top; }
th { font-size: 12px; color: var(--mute); font-weight: 600; text-transform: uppercase; letter-spacing: .03em; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.denied:not(.zero) { color: var(--deny); font-weight: 600; }
td.zero { color: #9aa5ae; }
code, .mono { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, "Liberation Mono", monospace; font-size: 12.5px; }
td.argv { min-width: 200px; max-width: 320px; overflow-wrap: anywhere; }
td.when { white-space: nowrap; }
td.names { min-width: 110px; overflow-wrap: anywhere; }
#sessions { font-size: 13px; } #sessions td, #sessions th { padding: 5px 6px; }
.none { color: var(--mute); font-style: italic; }
svg text { font: 11px system-ui, sans-serif; fill: #44505a; }
footer { margin-top: 34px; color: var(--mute); font-size: 12px; }
@media print { body { background: #fff; } main { padding: 0; } }
"#;

fn html(d: &Data) -> String {
    let mut h = String::new();
    let t = d.totals();
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; img-src data:\">\n\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
<meta name=\"generator\" content=\"egressctl {}\">\n<title>egressd audit report: {} ({})</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n",
        env!("CARGO_PKG_VERSION"),
        esc(&d.host),
        esc(&d.period())
    );
    let _ = write!(
        h,
        "<h1>egressd audit report</h1>\n<p class=\"sub\">{} &middot; {}</p>\n",
        esc(&d.host),
        esc(&d.period())
    );

    // Verification first: it says whether the rest can be trusted.
    let _ = writeln!(
        h,
        "<section id=\"verification\" class=\"banner {}\">",
        d.check.level().class()
    );
    for (level, line) in &d.check.lines {
        let _ = writeln!(h, "<p class=\"{}\">{}</p>", level.class(), esc(line));
    }
    h.push_str("</section>\n");

    let card = |h: &mut String, id: &str, class: &str, v: u64, k: &str| {
        let _ = writeln!(
            h,
            "<div class=\"card {class}\"><div class=\"v\" id=\"{id}\">{}</div><div class=\"k\">{k}</div></div>",
            num(v)
        );
    };
    h.push_str("<div class=\"cards\">\n");
    card(
        &mut h,
        "total-sessions",
        "",
        d.summary.sessions.len() as u64,
        "sessions",
    );
    card(
        &mut h,
        "total-allowed",
        "allowed",
        t.allowed,
        "connections allowed",
    );
    card(
        &mut h,
        "total-denied",
        "denied",
        t.denied,
        "connections denied",
    );
    card(
        &mut h,
        "total-names-denied",
        "names",
        d.names_denied(),
        "DNS names denied",
    );
    card(&mut h, "total-lost", "", t.lost, "records lost");
    h.push_str("</div>\n");

    // Machine and period.
    h.push_str("<h2>Machine and period</h2>\n<dl class=\"facts\">\n");
    let fact = |h: &mut String, k: &str, v: &str| {
        let _ = writeln!(h, "<dt>{k}</dt><dd>{v}</dd>");
    };
    fact(
        &mut h,
        "Machine",
        &format!(
            "{} <span class=\"none\">({})</span>",
            esc(&d.machine_name()),
            esc(&d.machine_words())
        ),
    );
    fact(&mut h, "Log", &format!("<code>{}</code>", esc(&d.log)));
    fact(&mut h, "Period", &esc(&d.period()));
    fact(&mut h, "Requested", &esc(&d.requested()));
    fact(&mut h, "Records", &num(d.records as u64));
    fact(&mut h, "Report made", &esc(&when(&d.made)));
    h.push_str("</dl>\n");

    // Policy.
    h.push_str("<h2>Policy in force</h2>\n");
    if d.policies.is_empty() {
        h.push_str("<p class=\"none\">No record in the period names a policy.</p>\n");
    } else {
        h.push_str("<table id=\"policies\"><thead><tr><th>Policy hash</th><th>Source</th><th>In force (first to last record)</th><th class=\"num\">Sessions started</th><th class=\"num\">Records</th></tr></thead><tbody>\n");
        for p in &d.policies {
            let _ = writeln!(
                h,
                "<tr><td><code>{}</code></td><td>{}</td><td>{} to {}</td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
                esc(&p.hash),
                p.source.as_deref().map(esc).unwrap_or_default(),
                esc(&when(&p.first)),
                esc(&when(&p.last)),
                num(p.sessions),
                num(p.records)
            );
        }
        h.push_str("</tbody></table>\n");
    }

    // Chart.
    h.push_str("<h2>Decisions over time</h2>\n");
    match &d.chart {
        Some(c) => h.push_str(&svg(c)),
        None => h.push_str("<p class=\"none\">No decisions in the period.</p>\n"),
    }

    // Sessions.
    h.push_str("<h2>Sessions</h2>\n");
    if d.sessions.is_empty() {
        h.push_str("<p class=\"none\">No sessions in the period.</p>\n");
    } else {
        h.push_str("<table id=\"sessions\"><thead><tr><th>Session</th><th>Command</th><th>User</th><th>Profile</th><th>Started (UTC)</th><th class=\"num\">Duration</th><th class=\"num\">Allowed</th><th class=\"num\">Denied</th><th class=\"num\">Lost</th><th>DNS names denied</th></tr></thead><tbody>\n");
        for s in &d.sessions {
            let n = |class: &str, v: u64| {
                format!(
                    "<td class=\"num {class}{}\">{}</td>",
                    if v == 0 { " zero" } else { "" },
                    num(v)
                )
            };
            let names = if s.names_denied == 0 {
                String::new()
            } else {
                format!(
                    "{}: <span class=\"mono\">{}</span>",
                    num(s.names_denied),
                    esc(&join_set(&s.names, 5))
                )
            };
            let _ = writeln!(
                h,
                "<tr id=\"session-{}\"><td><code>{}</code></td><td class=\"argv mono\">{}</td><td>{}</td><td>{}</td><td class=\"when\">{}</td><td class=\"num\">{}</td>{}{}{}<td class=\"names\">{names}</td></tr>",
                esc(&s.id),
                esc(session_label(&s.id)),
                s.argv.as_deref().map(|a| esc(&audit::shown_argv(a))).unwrap_or_default(),
                esc(&user_words(s)),
                s.profile.as_deref().map(esc).unwrap_or_default(),
                s.start.as_deref().map(|t| esc(&when_utc(t))).unwrap_or_default(),
                esc(&duration_words(s)),
                n("allowed", s.tally.allowed),
                n("denied", s.tally.denied),
                n("lost", s.tally.lost),
            );
        }
        h.push_str("</tbody></table>\n");
    }

    // Denied destinations and names.
    h.push_str("<h2>Denied destinations</h2>\n");
    denied_table(
        &mut h,
        "denied-destinations",
        "Destination",
        &d.denied_dests,
    );
    h.push_str("<h2>Denied DNS names</h2>\n");
    denied_table(&mut h, "denied-names", "Name", &d.denied_names);

    // Allowed destinations: what the sessions did reach.
    let allowed: Vec<(&String, &Tally)> = d
        .summary
        .dests
        .iter()
        .filter(|(_, t)| t.allowed > 0)
        .collect();
    h.push_str("<h2>Allowed destinations</h2>\n");
    if allowed.is_empty() {
        h.push_str("<p class=\"none\">None.</p>\n");
    } else {
        h.push_str("<table id=\"allowed-destinations\"><thead><tr><th>Destination</th><th class=\"num\">Allowed</th></tr></thead><tbody>\n");
        for (dest, t) in allowed {
            let _ = writeln!(
                h,
                "<tr><td><code>{}</code></td><td class=\"num\">{}</td></tr>",
                esc(dest),
                num(t.allowed)
            );
        }
        h.push_str("</tbody></table>\n");
    }

    // Lost records.
    h.push_str("<h2>Lost records</h2>\n");
    if d.summary.lost_by.is_empty() {
        h.push_str("<p id=\"lost\">None: every decision in the period is in the log.</p>\n");
    } else {
        h.push_str("<table id=\"lost\"><thead><tr><th>Reason</th><th class=\"num\">Records</th></tr></thead><tbody>\n");
        for (why, n) in &d.summary.lost_by {
            let _ = writeln!(
                h,
                "<tr><td>{}</td><td class=\"num\">{}</td></tr>",
                esc(why),
                num(*n)
            );
        }
        let _ = writeln!(
            h,
            "<tr><th>Total</th><th class=\"num\">{}</th></tr>",
            num(d.summary.lost_by.values().sum())
        );
        h.push_str("</tbody></table>\n<p>Lost records were counted, not itemised: the log says how many and when, not what they were.</p>\n");
    }
    if d.summary.crashes > 0 {
        let _ = writeln!(
            h,
            "<p>Crashes: {} (egressd ended without closing the log; each recorded by the next start).</p>",
            num(d.summary.crashes)
        );
    }
    if d.summary.continued > 0 {
        let _ = writeln!(
            h,
            "<p>The log file was replaced or removed under egressd {} time(s); the chain continued.</p>",
            num(d.summary.continued)
        );
    }

    // The daemon's own records.
    h.push_str("<h2>egressd events</h2>\n");
    if d.daemon.is_empty() {
        h.push_str("<p class=\"none\">None in the period.</p>\n");
    } else {
        h.push_str(
            "<table id=\"daemon\"><thead><tr><th>Time</th><th>Event</th></tr></thead><tbody>\n",
        );
        for (t, kind, m) in &d.daemon {
            let what = if kind == "daemon" {
                esc(m)
            } else {
                format!("{}: {}", esc(kind), esc(m))
            };
            let _ = writeln!(h, "<tr><td>{}</td><td>{what}</td></tr>", esc(&when(t)));
        }
        h.push_str("</tbody></table>\n");
    }

    let _ = write!(
        h,
        "<footer>Made by egressctl {} on {} at {} from <code>{}</code>. The figures are those of <code>egressctl audit summary</code> for the same period; connections count every decision a record stands for (its <code>count</code>). The verification covers every file of the log, not only the period.</footer>\n</main>\n</body>\n</html>\n",
        env!("CARGO_PKG_VERSION"),
        esc(&d.host),
        esc(&when(&d.made)),
        esc(&d.log)
    );
    h
}

fn denied_table(h: &mut String, id: &str, what: &str, rows: &BTreeMap<String, Denied>) {
    if rows.is_empty() {
        let _ = writeln!(h, "<p id=\"{id}\" class=\"none\">None.</p>");
        return;
    }
    let mut rows: Vec<(&String, &Denied)> = rows.iter().collect();
    rows.sort_by(|a, b| b.1.count.cmp(&a.1.count).then(a.0.cmp(b.0)));
    let _ = writeln!(
        h,
        "<table id=\"{id}\"><thead><tr><th>{what}</th><th class=\"num\">Denied</th><th>Sessions</th><th>Processes</th><th>First (UTC)</th><th>Last (UTC)</th></tr></thead><tbody>"
    );
    for (name, d) in rows {
        let _ = writeln!(
            h,
            "<tr><td class=\"mono\">{}</td><td class=\"num denied\">{}</td><td class=\"mono\">{}</td><td class=\"mono\">{}</td><td class=\"when\">{}</td><td class=\"when\">{}</td></tr>",
            esc(name),
            num(d.count),
            esc(&join_set(&d.sessions, 6)),
            esc(&join_set(&d.comms, 6)),
            esc(&when_utc(&d.first)),
            esc(&when_utc(&d.last))
        );
    }
    h.push_str("</tbody></table>\n");
}

/// The smallest of 1, 2, 5 x 10^k at or above `v`.
fn nice(v: u64) -> u64 {
    let mut p = 1u64;
    loop {
        for m in [1, 2, 5] {
            if m * p >= v {
                return m * p;
            }
        }
        p = p.saturating_mul(10);
    }
}

/// A stacked bar chart (allowed below, denied above) with axes, labels and a legend.
fn svg(c: &Chart) -> String {
    let (w, hgt) = (980.0f64, 280.0f64);
    let (left, right, top, bottom) = (56.0, 16.0, 30.0, 48.0);
    let (pw, ph) = (w - left - right, hgt - top - bottom);
    let max = c
        .buckets
        .iter()
        .map(|(a, d)| a + d)
        .max()
        .unwrap_or(0)
        .max(1);
    let tick = nice(max.div_ceil(4));
    let ymax = max.div_ceil(tick) * tick;
    let n = c.buckets.len();
    let slot = pw / n as f64;
    let bar = (slot * 0.78).max(1.0);
    let y = |v: u64| top + ph - ph * v as f64 / ymax as f64;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "<svg id=\"chart\" xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {w} {hgt}\" width=\"100%\" role=\"img\" aria-label=\"Decisions per {} over the period, allowed and denied\">",
        c.step_words()
    );
    // Grid and y axis.
    let mut v = 0;
    while v <= ymax {
        let yy = y(v);
        let _ = writeln!(
            s,
            "<line x1=\"{left}\" x2=\"{}\" y1=\"{yy:.1}\" y2=\"{yy:.1}\" stroke=\"#e3e8ec\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            left + pw,
            left - 6.0,
            yy + 4.0,
            num(v)
        );
        v += tick;
    }
    let _ = writeln!(
        s,
        "<text transform=\"translate(14 {:.1}) rotate(-90)\" text-anchor=\"middle\">decisions per {}</text>",
        top + ph / 2.0,
        c.step_words()
    );
    // Bars.
    for (i, (a, d)) in c.buckets.iter().enumerate() {
        let x = left + slot * i as f64 + (slot - bar) / 2.0;
        let label = c.label(i);
        if *a > 0 {
            let _ = writeln!(
                s,
                "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{bar:.1}\" height=\"{:.1}\" fill=\"#2e7d32\"><title>{label}: {} allowed</title></rect>",
                y(*a),
                top + ph - y(*a),
                num(*a)
            );
        }
        if *d > 0 {
            let _ = writeln!(
                s,
                "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{bar:.1}\" height=\"{:.1}\" fill=\"#c62828\"><title>{label}: {} denied</title></rect>",
                y(a + d),
                y(*a) - y(a + d),
                num(*d)
            );
        }
    }
    // X axis: a label every few buckets.
    let _ = writeln!(
        s,
        "<line x1=\"{left}\" x2=\"{}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#8a96a0\"/>",
        left + pw,
        top + ph,
        top + ph
    );
    let every = n.div_ceil(8).max(1);
    for i in (0..n).step_by(every) {
        let x = left + slot * i as f64 + slot / 2.0;
        let _ = writeln!(
            s,
            "<line x1=\"{x:.1}\" x2=\"{x:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#8a96a0\"/><text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            top + ph,
            top + ph + 4.0,
            top + ph + 17.0,
            c.label(i)
        );
    }
    let _ = writeln!(
        s,
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">time (UTC), one bar per {}</text>",
        left + pw / 2.0,
        hgt - 8.0,
        c.step_words()
    );
    // Legend.
    let lx = left + pw - 170.0;
    let _ = writeln!(
        s,
        "<rect x=\"{lx:.1}\" y=\"8\" width=\"12\" height=\"12\" fill=\"#2e7d32\"/><text x=\"{:.1}\" y=\"18\">allowed</text><rect x=\"{:.1}\" y=\"8\" width=\"12\" height=\"12\" fill=\"#c62828\"/><text x=\"{:.1}\" y=\"18\">denied</text>",
        lx + 17.0,
        lx + 85.0,
        lx + 102.0
    );
    s.push_str("</svg>\n");
    s
}

fn markdown(d: &Data) -> String {
    let mut m = String::new();
    let t = d.totals();
    let _ = writeln!(m, "# egressd audit report: {}\n", md(&d.host));
    let _ = writeln!(m, "## Verification\n");
    for (_, line) in &d.check.lines {
        let _ = writeln!(m, "- {}", md(line));
    }
    let _ = writeln!(m, "\n## Machine and period\n");
    let _ = writeln!(
        m,
        "- Machine: {} ({})",
        md(&d.machine_name()),
        md(&d.machine_words())
    );
    let _ = writeln!(m, "- Log: {}", md(&d.log));
    let _ = writeln!(m, "- Period: {}", md(&d.period()));
    let _ = writeln!(m, "- Requested: {}", md(&d.requested()));
    let _ = writeln!(
        m,
        "- Totals: {} sessions, {} connections allowed, {} denied, {} DNS names denied, {} records lost ({} records)",
        num(d.summary.sessions.len() as u64),
        num(t.allowed),
        num(t.denied),
        num(d.names_denied()),
        num(t.lost),
        num(d.records as u64)
    );
    let _ = writeln!(m, "\n## Policy in force\n");
    if d.policies.is_empty() {
        let _ = writeln!(m, "No record in the period names a policy.");
    } else {
        let _ = writeln!(
            m,
            "| Policy hash | Source | In force | Sessions started | Records |\n| --- | --- | --- | ---: | ---: |"
        );
        for p in &d.policies {
            let _ = writeln!(
                m,
                "| {} | {} | {} to {} | {} | {} |",
                md(&p.hash),
                p.source.as_deref().map(md).unwrap_or_default(),
                md(&when(&p.first)),
                md(&when(&p.last)),
                num(p.sessions),
                num(p.records)
            );
        }
    }
    let _ = writeln!(m, "\n## Decisions over time\n");
    match &d.chart {
        Some(c) => {
            let _ = writeln!(
                m,
                "One row per {} with decisions (UTC).\n\n| From | Allowed | Denied | |\n| --- | ---: | ---: | --- |",
                c.step_words()
            );
            let max = c
                .buckets
                .iter()
                .map(|(a, d)| a + d)
                .max()
                .unwrap_or(1)
                .max(1);
            for (i, (a, dn)) in c.buckets.iter().enumerate() {
                if a + dn == 0 {
                    continue;
                }
                let width = |v: u64| ((v * 30).div_ceil(max)) as usize;
                let _ = writeln!(
                    m,
                    "| {} | {} | {} | `{}{}` |",
                    md(&c.label(i)),
                    num(*a),
                    num(*dn),
                    "+".repeat(if *a > 0 { width(*a) } else { 0 }),
                    "x".repeat(if *dn > 0 { width(*dn) } else { 0 })
                );
            }
        }
        None => {
            let _ = writeln!(m, "No decisions in the period.");
        }
    }
    let _ = writeln!(m, "\n## Sessions\n");
    if d.sessions.is_empty() {
        let _ = writeln!(m, "No sessions in the period.");
    } else {
        let _ = writeln!(
            m,
            "| Session | Command | User | Profile | Started | Duration | Allowed | Denied | Lost | DNS names denied |\n| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | --- |"
        );
        for s in &d.sessions {
            let _ = writeln!(
                m,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                md(session_label(&s.id)),
                s.argv
                    .as_deref()
                    .map(|a| md(&audit::shown_argv(a)))
                    .unwrap_or_default(),
                md(&user_words(s)),
                s.profile.as_deref().map(md).unwrap_or_default(),
                s.start.as_deref().map(|t| md(&when(t))).unwrap_or_default(),
                md(&duration_words(s)),
                num(s.tally.allowed),
                num(s.tally.denied),
                num(s.tally.lost),
                if s.names_denied == 0 {
                    String::new()
                } else {
                    format!("{}: {}", num(s.names_denied), md(&join_set(&s.names, 5)))
                }
            );
        }
    }
    for (title, what, rows) in [
        ("Denied destinations", "Destination", &d.denied_dests),
        ("Denied DNS names", "Name", &d.denied_names),
    ] {
        let _ = writeln!(m, "\n## {title}\n");
        if rows.is_empty() {
            let _ = writeln!(m, "None.");
            continue;
        }
        let mut rows: Vec<(&String, &Denied)> = rows.iter().collect();
        rows.sort_by(|a, b| b.1.count.cmp(&a.1.count).then(a.0.cmp(b.0)));
        let _ = writeln!(
            m,
            "| {what} | Denied | Sessions | Processes | First | Last |\n| --- | ---: | --- | --- | --- | --- |"
        );
        for (name, x) in rows {
            let _ = writeln!(
                m,
                "| {} | {} | {} | {} | {} | {} |",
                md(name),
                num(x.count),
                md(&join_set(&x.sessions, 6)),
                md(&join_set(&x.comms, 6)),
                md(&when(&x.first)),
                md(&when(&x.last))
            );
        }
    }
    let _ = writeln!(m, "\n## Lost records\n");
    if d.summary.lost_by.is_empty() {
        let _ = writeln!(m, "None: every decision in the period is in the log.");
    } else {
        let _ = writeln!(m, "| Reason | Records |\n| --- | ---: |");
        for (why, n) in &d.summary.lost_by {
            let _ = writeln!(m, "| {} | {} |", md(why), num(*n));
        }
        let _ = writeln!(
            m,
            "| **Total** | **{}** |",
            num(d.summary.lost_by.values().sum())
        );
    }
    if d.summary.crashes > 0 {
        let _ = writeln!(
            m,
            "\nCrashes: {} (egressd ended without closing the log; each recorded by the next start).",
            num(d.summary.crashes)
        );
    }
    if d.summary.continued > 0 {
        let _ = writeln!(
            m,
            "\nThe log file was replaced or removed under egressd {} time(s); the chain continued.",
            num(d.summary.continued)
        );
    }
    let _ = writeln!(
        m,
        "\n_Made by egressctl {} on {} at {}. The figures are those of `egressctl audit summary` for the same period; the verification covers every file of the log._",
        env!("CARGO_PKG_VERSION"),
        md(&d.host),
        md(&when(&d.made))
    );
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(kind: &str, time: &str, session: &str) -> Record {
        Record {
            kind: kind.into(),
            time: time.into(),
            session: Some(session.into()),
            ..Default::default()
        }
    }

    #[test]
    fn log_strings_are_escaped_for_html_and_markdown() {
        let evil = "<script>alert('x')</script>&\u{202e}\n";
        let e = esc(evil);
        assert!(
            !e.contains('<') && !e.contains('>') && !e.contains('\''),
            "{e}"
        );
        assert!(e.contains("&lt;script&gt;") && e.contains("&amp;"), "{e}");
        assert!(e.contains("\\u{202e}") && e.contains("\\n"), "{e}");
        let m = md("a|b <img src=x> `c` [l](u)");
        assert_eq!(m, "a\\|b \\<img src=x\\> \\`c\\` \\[l\\](u)");
    }

    #[test]
    fn numbers_durations_and_buckets() {
        assert_eq!(num(0), "0");
        assert_eq!(num(999), "999");
        assert_eq!(num(1234), "1,234");
        assert_eq!(num(1_234_567), "1,234,567");
        assert_eq!(duration(59), "59 s");
        assert_eq!(duration(125), "2 min 5 s");
        assert_eq!(duration(7200), "2 h");
        assert_eq!(duration(90_000), "1 d 1 h");
        assert_eq!(nice(1), 1);
        assert_eq!(nice(3), 5);
        assert_eq!(nice(11), 20);

        let mut a = rec("decision", "2026-11-22T15:00:01.5Z", "s1");
        a.verdict = Some("allowed".into());
        a.count = Some(3);
        let mut d = rec("decision", "2026-11-22T15:20:00Z", "s1");
        d.verdict = Some("denied".into());
        let c = chart(&[a, d]).unwrap();
        // 20 minutes: 30-second bars, at most 60 of them.
        assert_eq!(c.step, 30);
        assert_eq!(c.buckets.len(), 41);
        assert_eq!(c.buckets[0], (3, 0));
        assert_eq!(c.buckets[40], (0, 1));
        assert_eq!(c.label(0), "15:00:00");
        assert!(svg(&c).contains("<title>15:20:00: 1 denied</title>"));
    }

    #[test]
    fn the_report_shows_the_summary_figures_and_escapes_the_log() {
        let mut start = rec("session_start", "2026-11-22T15:00:00Z", "e38b4bc8");
        start.argv = Some(vec!["sh".into(), "-c".into(), "<script>x</script>".into()]);
        start.uid = Some(0);
        start.profile = Some("airgap".into());
        start.policy = Some("22b68e2a3a956119".into());
        let mut allowed = rec("decision", "2026-11-22T15:00:01Z", "e38b4bc8");
        allowed.verdict = Some("allowed".into());
        allowed.dest = Some("127.0.0.1".into());
        allowed.port = Some(11434);
        allowed.protocol = Some("tcp".into());
        allowed.count = Some(2);
        let mut denied = allowed.clone();
        denied.verdict = Some("denied".into());
        denied.dest = Some("198.18.0.2".into());
        denied.count = Some(1);
        denied.comm = Some("<b>curl".into());
        let mut q = rec("dns", "2026-11-22T15:00:02Z", "e38b4bc8");
        q.verdict = Some("denied".into());
        q.qname = Some("x<img>.attacker.test".into());
        let mut lost = rec("lost", "2026-11-22T15:00:03Z", "e38b4bc8");
        lost.count = Some(4);
        let mut end = rec("session_end", "2026-11-22T15:00:04Z", "e38b4bc8");
        end.duration_s = Some(4);
        let all = vec![start, allowed, denied, q, lost, end];
        let m = Matcher::period(None, None, None).unwrap();
        let o = Options {
            since: None,
            until: None,
            session: None,
            keys: vec![],
            format: ReportFormat::Html,
            output: None,
        };
        let check = Check {
            ok: true,
            lines: vec![(Level::Good, "The hash chain is intact.".into())],
        };
        let d = Data::build(Path::new("/x/audit.jsonl"), &o, &all, &m, &m, check).unwrap();
        let h = html(&d);
        assert!(!h.contains("<script>") && !h.contains("<b>") && !h.contains("<img>"));
        assert!(h.contains("&lt;script&gt;x&lt;/script&gt;"), "{h}");
        assert!(h.contains("x&lt;img&gt;.attacker.test"));
        assert!(h.contains("img-src data:"));
        assert!(
            !h.contains("http://") || h.matches("http://").count() == 1,
            "only the SVG namespace"
        );
        let row = h.split("<tr id=\"session-e38b4bc8\">").nth(1).unwrap();
        let row = row.split("</tr>").next().unwrap();
        assert!(row.contains("<td class=\"num allowed\">2</td>"), "{row}");
        assert!(row.contains("<td class=\"num denied\">1</td>"), "{row}");
        assert!(row.contains("<td class=\"num lost\">4</td>"), "{row}");
        assert!(row.contains("root (0)"), "{row}");
        assert!(h.contains("<td class=\"mono\">198.18.0.2:11434/tcp</td>"));
        assert!(h.contains("22b68e2a3a956119"));

        let md_text = markdown(&d);
        assert!(!md_text.contains("<script>") && !md_text.contains("<img>"));
        assert!(md_text.contains("| e38b4bc8 |"), "{md_text}");
        assert!(md_text.contains("| 2 | 1 | 4 |"), "{md_text}");
    }
}
