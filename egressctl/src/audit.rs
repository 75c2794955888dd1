//! `egressctl audit`: read, filter, export and verify egressd's audit log.

use std::{
    collections::BTreeMap,
    fs,
    io::{self, BufRead as _, BufReader, Read as _, Seek as _, Write},
    net::IpAddr,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, SystemTime},
};

use anyhow::{bail, Context as _};
use clap::{Args, Subcommand, ValueEnum};
use egressd_common::{
    audit::{verify, Record},
    protocol::{Op, Reply},
    seal::{self, VerificationKey},
};
use ipnet::IpNet;

use crate::client::Client;

#[derive(Args)]
pub struct AuditArgs {
    /// The log to read (default: the one the running egressd writes, else /var/log/egressd/audit.jsonl).
    #[arg(long, global = true)]
    file: Option<PathBuf>,
    #[command(subcommand)]
    command: AuditCommand,
}

#[derive(Subcommand)]
enum AuditCommand {
    /// The latest records, as a table (or JSON lines).
    Tail {
        /// Keep printing new records as they are written.
        #[arg(short, long)]
        follow: bool,
        /// How many records to show first.
        #[arg(short = 'n', long, default_value_t = 20)]
        lines: usize,
        #[command(flatten)]
        filter: Filter,
        #[arg(long)]
        json: bool,
    },
    /// Records matching the filters, for a compliance report.
    Export {
        #[command(flatten)]
        filter: Filter,
        #[arg(long, value_enum, default_value_t = Format::Jsonl)]
        format: Format,
        /// Write here instead of standard output.
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Check the hash chain; names the first line that breaks it. Exit 1 if broken.
    Verify {
        /// Files in order, oldest first (default: the log and its rotated files).
        files: Vec<PathBuf>,
        /// The verification key `setup-keys` printed (`egressd-vk1:...`): also check every seal,
        /// and that none is missing. Repeat it for keys made anew with `--force`.
        #[arg(long = "key", value_name = "VERIFICATION_KEY")]
        keys: Vec<String>,
        /// With --key: the log is claimed to go on until this time (RFC 3339, or an age like 1h;
        /// e.g. when it was copied off the machine): seals must reach it within one interval.
        #[arg(long)]
        until: Option<String>,
    },
    /// Make the sealing key (root): prints the verification key, once, for the auditor to keep
    /// off this machine. egressd seals the log with it every `[audit] seal_interval`.
    SetupKeys {
        /// Make new keys even if the log has some (seals made with the old ones then verify only
        /// with the old verification key).
        #[arg(long)]
        force: bool,
        /// Policy file, for `[audit] path` and `seal_interval`.
        #[arg(long, default_value = egressd_common::policy::DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// Seal interval (overrides `[audit] seal_interval`): seconds, or 30s, 15min, 1h.
        #[arg(long)]
        interval: Option<String>,
        /// Do not draw the QR code.
        #[arg(long)]
        no_qr: bool,
    },
    /// Per session and per destination: allowed, denied, lost.
    Summary {
        /// RFC 3339 time, or an age such as 1h, 7d.
        #[arg(long)]
        since: Option<String>,
        #[arg(long)]
        until: Option<String>,
        /// Only this session.
        #[arg(long)]
        session: Option<String>,
    },
    /// A report for a person: one self-contained HTML file (or Markdown) with the machine, the
    /// period, the policy, the sessions, a chart of decisions over time, what was denied, what
    /// was lost, and whether the log verifies. Its figures are the summary's. Exit 1 if the log
    /// does not verify (the report is written all the same and says so).
    Report {
        /// RFC 3339 time, or an age such as 1h, 7d.
        #[arg(long)]
        since: Option<String>,
        #[arg(long)]
        until: Option<String>,
        /// Only this session.
        #[arg(long)]
        session: Option<String>,
        /// The verification key `setup-keys` printed: the report then says up to where the log
        /// is sealed. Repeatable.
        #[arg(long = "key", value_name = "VERIFICATION_KEY")]
        keys: Vec<String>,
        #[arg(long, value_enum, default_value_t = crate::report::ReportFormat::Html)]
        format: crate::report::ReportFormat,
        /// Write here instead of standard output.
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
}

#[derive(Args, Clone, Default)]
struct Filter {
    /// RFC 3339 time (2026-11-01, 2026-11-01T08:00:00Z) or an age (1h, 7d).
    #[arg(long)]
    since: Option<String>,
    #[arg(long)]
    until: Option<String>,
    #[arg(long)]
    session: Option<String>,
    #[arg(long, value_parser = ["allowed", "denied"])]
    verdict: Option<String>,
    /// Destination network, e.g. 10.0.0.0/8.
    #[arg(long)]
    dest: Option<IpNet>,
    /// Record type: decision, dns, session_start, session_end, lost, daemon, crash, log_continued, seal.
    #[arg(long = "type", value_name = "TYPE")]
    kind: Option<String>,
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum Format {
    Jsonl,
    Csv,
    /// OCSF 1.1 Network Activity (class 4001) events, one JSON object per line.
    Ocsf,
}

pub fn audit(socket: &Path, args: AuditArgs) -> anyhow::Result<ExitCode> {
    if let AuditCommand::SetupKeys {
        force,
        config,
        interval,
        no_qr,
    } = &args.command
    {
        return crate::seal::setup_keys(
            socket,
            args.file.as_deref(),
            config,
            interval.as_deref(),
            *force,
            !*no_qr,
        );
    }
    let log = match args.file {
        Some(f) => f,
        None => daemon_log(socket).unwrap_or_else(|| PathBuf::from("/var/log/egressd/audit.jsonl")),
    };
    match args.command {
        AuditCommand::SetupKeys { .. } => unreachable!(),
        AuditCommand::Verify { files, keys, until } => {
            verify_cmd(&log, files, &keys, until.as_deref())
        }
        AuditCommand::Tail {
            follow,
            lines,
            filter,
            json,
        } => {
            let m = Matcher::new(&filter)?;
            let records: Vec<Record> = read_all(&log)?
                .into_iter()
                .filter(|r| m.matches(r))
                .collect();
            let start = records.len().saturating_sub(lines);
            let mut out = io::stdout().lock();
            if !json {
                writeln!(out, "{}", table_header())?;
            }
            for r in &records[start..] {
                print_record(&mut out, r, json)?;
            }
            out.flush()?;
            if follow {
                follow_log(&log, &m, json)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Export {
            filter,
            format,
            output,
        } => {
            let m = Matcher::new(&filter)?;
            let lines = read_lines(&log)?;
            let whole = m.range_only();
            let records = if whole {
                let (range, note) = sealed_range(lines, &m);
                if let Some(note) = note {
                    eprintln!("egressctl: {note}");
                }
                range
            } else {
                eprintln!(
                    "egressctl: a filtered export (--session, --verdict, --dest, --type) is an extract: `egressctl audit verify` checks a whole one (--since/--until alone)"
                );
                lines.into_iter().filter(|(r, _)| m.matches(r)).collect()
            };
            let out: Box<dyn Write> = match &output {
                Some(p) => Box::new(
                    fs::File::create(p).with_context(|| format!("creating {}", p.display()))?,
                ),
                None => Box::new(io::stdout().lock()),
            };
            export(out, records.into_iter(), format, whole)?;
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Summary {
            since,
            until,
            session,
        } => {
            let m = Matcher::period(since, until, session)?;
            summary(
                read_all(&log)?
                    .into_iter()
                    .filter(|r| m.matches(r))
                    .collect(),
            );
            if let Ok(Reply::Status(s)) =
                Client::connect(socket).and_then(|mut c| c.call(Op::Status))
            {
                if let Some(h) = &s.audit {
                    println!();
                    for line in crate::health::lines(h, &s.audit_path) {
                        println!("log now: {line}");
                    }
                    println!("log now: {}", crate::health::sealing(h));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Report {
            since,
            until,
            session,
            keys,
            format,
            output,
        } => crate::report::report(
            &log,
            &crate::report::Options {
                since,
                until,
                session,
                keys,
                format,
                output,
            },
        ),
    }
}

pub fn daemon_log(socket: &Path) -> Option<PathBuf> {
    match Client::connect(socket).ok()?.call(Op::Status).ok()? {
        Reply::Status(s) => Some(PathBuf::from(s.audit_path)),
        _ => None,
    }
}

/// The log and its rotated files, oldest first.
pub(crate) fn log_files(log: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for n in (1..=1000).rev() {
        let mut p = log.as_os_str().to_owned();
        p.push(format!(".{n}"));
        let p = PathBuf::from(p);
        if p.exists() {
            files.push(p);
        }
    }
    files.push(log.to_owned());
    files
}

pub(crate) fn open(path: &Path) -> anyhow::Result<fs::File> {
    fs::File::open(path).with_context(|| {
        format!(
            "cannot read {}; reading the audit log needs root or the log's group (your own sessions' totals: `egressctl ps`)",
            path.display()
        )
    })
}

pub fn read_all(log: &Path) -> anyhow::Result<Vec<Record>> {
    Ok(read_lines(log)?.into_iter().map(|(r, _)| r).collect())
}

/// Each record with its line as logged: the bytes the chain hashes, which an export carries so
/// that `audit verify` can check it.
pub fn read_lines(log: &Path) -> anyhow::Result<Vec<(Record, Vec<u8>)>> {
    let mut out = Vec::new();
    for f in log_files(log) {
        if !f.exists() {
            continue;
        }
        for (i, line) in BufReader::new(open(&f)?).split(b'\n').enumerate() {
            let line = line?;
            if line.is_empty() {
                continue;
            }
            match serde_json::from_slice::<Record>(&line) {
                Ok(r) => out.push((r, line)),
                // A crash's torn line (which the next daemon records) must not hide the rest.
                Err(e) => eprintln!(
                    "egressctl: {} line {}: not an audit record ({e}); skipped (`egressctl audit verify` says whether egressd recorded it as a crash)",
                    f.display(),
                    i + 1
                ),
            }
        }
    }
    Ok(out)
}

fn verify_cmd(
    log: &Path,
    files: Vec<PathBuf>,
    keys: &[String],
    until: Option<&str>,
) -> anyhow::Result<ExitCode> {
    let keys = keys
        .iter()
        .map(|k| k.parse::<VerificationKey>().map_err(anyhow::Error::msg))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let until = match until {
        Some(t) => Some(
            parse_time(t)?
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64),
        ),
        None => None,
    };
    let files = if files.is_empty() {
        log_files(log)
    } else {
        files
    };
    let mut readers = Vec::new();
    for f in &files {
        match log_lines_of(f)? {
            Ok(r) => readers.push(r),
            Err(broken) => {
                println!("BROKEN: {broken}");
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    match verify(readers) {
        Ok(v) => {
            let n = v.checked;
            let last = v.head.as_ref().map(|h| h.seq).unwrap_or(0);
            let first = (last + 1).saturating_sub(n);
            println!(
                "ok: {n} records in {} file(s), hash chain intact (seq {first}..{last})",
                files.len()
            );
            if first > 1 {
                println!("note: the chain starts at seq {first}: the records before it are not in these files (rotated away, removed, or before an export's range)");
            }
            for note in &v.notes {
                println!("note: {note}");
            }
            if v.lost > 0 {
                println!(
                    "note: {} records were counted as lost (the `lost` records say when and why: `egressctl audit tail --type lost`)",
                    v.lost
                );
            }
            if keys.is_empty() {
                if !v.seals.is_empty() {
                    println!(
                        "note: {} seal records were not checked: give the verification key (`--key egressd-vk1:...`) to check them",
                        v.seals.len()
                    );
                }
                return Ok(ExitCode::SUCCESS);
            }
            match seal::check(&v, &keys, until) {
                Ok(r) => {
                    println!(
                        "ok: {} seals valid (epochs up to {}); sealed up to {} (seq {})",
                        r.seals, r.last_epoch, r.sealed_at, r.sealed_seq
                    );
                    for note in &r.notes {
                        println!("note: {note}");
                    }
                    if r.unsealed > 0 {
                        println!(
                            "UNSEALED: the last {} record(s) (after seq {}) are not sealed yet: written since the last seal by a running egressd, or the end of the log was cut (a stopping egressd seals its last record)",
                            r.unsealed,
                            r.sealed_seq + 1
                        );
                    } else if !r.ends_with_stop {
                        println!(
                            "OPEN END: the log ends with a seal of egressd's, not with its stop seal: egressd was running when the log was copied, or crashed, or the end of the log was cut after a seal (compare {} with when the log was copied; `--until` checks it)",
                            r.sealed_at
                        );
                    }
                    Ok(ExitCode::SUCCESS)
                }
                Err(b) if b.file.is_empty() => {
                    println!("BAD SEAL: {}", b.reason);
                    Ok(ExitCode::FAILURE)
                }
                Err(b) => {
                    println!("BAD SEAL: {} line {}: {}", b.file, b.line, b.reason);
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        Err(b) => {
            println!("BROKEN: {} line {}: {}", b.file, b.line, b.reason);
            Ok(ExitCode::FAILURE)
        }
    }
}

/// Parses `T` as RFC 3339 (date alone allowed) or as an age before now (1h, 7d, 30m).
pub(crate) fn parse_time(t: &str) -> anyhow::Result<SystemTime> {
    if let Ok(ts) = humantime::parse_rfc3339_weak(t) {
        return Ok(ts);
    }
    if let Ok(ts) = humantime::parse_rfc3339_weak(&format!("{t} 00:00:00")) {
        return Ok(ts);
    }
    if let Ok(age) = humantime::parse_duration(t) {
        return Ok(SystemTime::now() - age);
    }
    bail!("{t:?} is neither an RFC 3339 time (2026-11-01T08:00:00Z) nor an age (1h, 7d)")
}

pub(crate) struct Matcher {
    since: Option<SystemTime>,
    until: Option<SystemTime>,
    session: Option<String>,
    verdict: Option<String>,
    dest: Option<IpNet>,
    kind: Option<String>,
}

impl Matcher {
    fn new(f: &Filter) -> anyhow::Result<Matcher> {
        Ok(Matcher {
            since: f.since.as_deref().map(parse_time).transpose()?,
            until: f.until.as_deref().map(parse_time).transpose()?,
            session: f.session.clone(),
            verdict: f.verdict.clone(),
            dest: f.dest,
            kind: f.kind.clone(),
        })
    }

    /// Only a time range: the export is a contiguous part of the chain, which verifies.
    fn range_only(&self) -> bool {
        self.session.is_none()
            && self.verdict.is_none()
            && self.dest.is_none()
            && self.kind.is_none()
    }

    fn matches(&self, r: &Record) -> bool {
        if self.since.is_some() || self.until.is_some() {
            let Ok(t) = humantime::parse_rfc3339(&r.time) else {
                return false;
            };
            if self.since.is_some_and(|s| t < s) || self.until.is_some_and(|u| t > u) {
                return false;
            }
        }
        if self
            .session
            .as_ref()
            .is_some_and(|s| r.session.as_ref() != Some(s))
        {
            return false;
        }
        if self.verdict.is_some() && r.verdict != self.verdict {
            return false;
        }
        if self.kind.as_ref().is_some_and(|k| *k != r.kind) {
            return false;
        }
        if let Some(net) = self.dest {
            let ip: Option<IpAddr> = r.dest.as_deref().and_then(|d| d.parse().ok());
            if !ip.is_some_and(|ip| net.contains(&ip)) {
                return false;
            }
        }
        true
    }
}

fn table_header() -> String {
    format!(
        "{:<23} {:<8} {:>7} {:<15} {:<11} {:<30} {:<10} {:>5}  REASON",
        "TIME", "SESSION", "PID", "COMM", "HOOK", "DESTINATION", "VERDICT", "COUNT"
    )
}

fn short_time(t: &str) -> String {
    // 2026-11-22T14:48:02.299347354Z -> 2026-11-22 14:48:02.299
    let t = t.replace('T', " ");
    t.get(..23).unwrap_or(&t).to_string()
}

pub(crate) fn destination(r: &Record) -> String {
    match (&r.dest, r.port, &r.protocol) {
        (Some(d), Some(p), Some(proto)) if d.contains(':') => format!("[{d}]:{p}/{proto}"),
        (Some(d), Some(p), Some(proto)) => format!("{d}:{p}/{proto}"),
        (None, _, Some(proto)) => format!("({proto} socket)"),
        _ => String::new(),
    }
}

fn print_record(out: &mut impl Write, r: &Record, json: bool) -> io::Result<()> {
    if json {
        return writeln!(out, "{}", serde_json::to_string(r).unwrap_or_default());
    }
    let session = r.session.clone().unwrap_or_default();
    match r.kind.as_str() {
        "decision" => writeln!(
            out,
            "{:<23} {:<8} {:>7} {:<15} {:<11} {:<30} {:<10} {:>5}  {}",
            short_time(&r.time),
            session,
            r.pid.map(|p| p.to_string()).unwrap_or_default(),
            r.comm.clone().unwrap_or_default(),
            r.hook.clone().unwrap_or_default(),
            destination(r),
            r.verdict.clone().unwrap_or_default(),
            r.count.unwrap_or(1),
            r.reason.clone().unwrap_or_default()
        ),
        "dns" => writeln!(
            out,
            "{:<23} {:<8} {:>7} {:<15} {:<11} {:<30} {:<10} {:>5}  {} {} -> {}{}",
            short_time(&r.time),
            session,
            r.pid.map(|p| p.to_string()).unwrap_or_default(),
            r.comm.clone().unwrap_or_default(),
            "dns",
            destination(r),
            r.verdict.clone().unwrap_or_default(),
            r.count.unwrap_or(1),
            r.qname.clone().unwrap_or_default(),
            r.qtype.clone().unwrap_or_default(),
            r.rcode.clone().unwrap_or_default(),
            match (&r.answers, r.reason.as_deref()) {
                (Some(a), _) if !a.is_empty() => format!(" [{}]", a.join(", ")),
                (_, Some(why)) => format!(" ({why})"),
                _ => String::new(),
            }
        ),
        "session_start" => writeln!(
            out,
            "{:<23} {:<8} session start: profile {}, uid {}: {}",
            short_time(&r.time),
            session,
            r.profile.clone().unwrap_or_default(),
            r.uid.unwrap_or(0),
            shown_argv(r.argv.as_deref().unwrap_or_default())
        ),
        "session_end" => writeln!(
            out,
            "{:<23} {:<8} session end: {} allowed, {} denied, {} lost, {} s",
            short_time(&r.time),
            session,
            r.allowed.unwrap_or(0),
            r.denied.unwrap_or(0),
            r.lost.unwrap_or(0),
            r.duration_s.unwrap_or(0)
        ),
        "lost" => writeln!(
            out,
            "{:<23} {:<8} LOST {} records ({}; counted, not itemised){}",
            short_time(&r.time),
            session,
            r.count.unwrap_or(0),
            r.reason.as_deref().unwrap_or("ring buffer full"),
            match (&r.since, &r.until) {
                (Some(a), Some(b)) => format!(" from {} to {}", short_time(a), short_time(b)),
                _ => String::new(),
            }
        ),
        "seal" => writeln!(
            out,
            "{:<23} {:<8} sealed up to seq {} (epoch {}, {})",
            short_time(&r.time),
            session,
            r.sealed_seq.unwrap_or(0),
            r.epoch.unwrap_or(0),
            r.reason.as_deref().unwrap_or("interval")
        ),
        _ => writeln!(
            out,
            "{:<23} {:<8} {}",
            short_time(&r.time),
            session,
            r.message.clone().unwrap_or_else(|| r.kind.clone())
        ),
    }
}

/// A command line for one table row: arguments with spaces, quotes or control characters are quoted
/// and escaped, so a row stays one line and says exactly what ran.
pub(crate) fn shown_argv(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            if a.is_empty()
                || a.chars()
                    .any(|c| c.is_whitespace() || c.is_control() || c == '"' || c == '\'')
            {
                format!("{a:?}")
            } else {
                a.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Prints records appended after the current end, following rotation.
fn follow_log(log: &Path, m: &Matcher, json: bool) -> anyhow::Result<()> {
    let mut file = open(log)?;
    let mut inode = file.metadata()?.ino();
    let mut pos = file.seek(io::SeekFrom::End(0))?;
    let mut pending = String::new();
    loop {
        std::thread::sleep(Duration::from_millis(200));
        if let Ok(meta) = fs::metadata(log) {
            if meta.ino() != inode || meta.len() < pos {
                file = open(log)?;
                inode = meta.ino();
                pos = 0;
            }
        }
        file.seek(io::SeekFrom::Start(pos))?;
        let mut chunk = String::new();
        pos += file.read_to_string(&mut chunk)? as u64;
        pending.push_str(&chunk);
        let mut out = io::stdout().lock();
        while let Some(nl) = pending.find('\n') {
            let line: String = pending.drain(..=nl).collect();
            if let Ok(r) = serde_json::from_str::<Record>(line.trim_end()) {
                if m.matches(&r) {
                    print_record(&mut out, &r, json)?;
                }
            }
        }
        out.flush()?;
    }
}

const CSV_COLUMNS: [&str; 29] = [
    "time", "seq", "type", "session", "pid", "tgid", "uid", "comm", "exe", "hook", "family",
    "protocol", "dest", "port", "verdict", "reason", "policy", "count", "profile", "argv", "lost",
    "message", "qname", "qtype", "rcode", "answers", "ttl", "prev", "line",
];

/// The records of `m`'s time range as one piece of the chain (from the first record in the range
/// to the last), run on to the next seal when the range ends before one, so that the export
/// verifies as sealed; and a note saying so.
fn sealed_range(
    lines: Vec<(Record, Vec<u8>)>,
    m: &Matcher,
) -> (Vec<(Record, Vec<u8>)>, Option<String>) {
    let Some(first) = lines.iter().position(|(r, _)| m.matches(r)) else {
        return (Vec::new(), None);
    };
    let last = lines
        .iter()
        .rposition(|(r, _)| m.matches(r))
        .unwrap_or(first);
    let mut end = last;
    let mut note = None;
    if lines[last].0.kind != "seal" {
        if let Some(k) = lines[last + 1..].iter().position(|(r, _)| r.kind == "seal") {
            end = last + 1 + k;
            let seal = &lines[end].0;
            note = Some(format!(
                "the export runs on {} record(s) past the range, to the next seal (seq {}, {}), so that it verifies as sealed",
                end - last,
                seal.seq,
                seal.time
            ));
        }
    }
    let mut lines = lines;
    lines.truncate(end + 1);
    (lines.split_off(first), note)
}

fn export(
    out: Box<dyn Write>,
    records: impl Iterator<Item = (Record, Vec<u8>)>,
    format: Format,
    whole: bool,
) -> anyhow::Result<()> {
    match format {
        Format::Jsonl | Format::Ocsf => {
            let mut out = io::BufWriter::new(out);
            for (r, line) in records {
                if format == Format::Ocsf {
                    // A whole export keeps every record (the chain needs them); an extract only
                    // the network and DNS events.
                    match ocsf_of(&r, &line, whole) {
                        Some(v) => serde_json::to_writer(&mut out, &v)?,
                        None => continue,
                    }
                } else {
                    // The line as logged, byte for byte: what the chain hashes.
                    out.write_all(&line)?;
                }
                out.write_all(b"\n")?;
            }
            out.flush()?;
        }
        Format::Csv => {
            let mut w = csv::Writer::from_writer(out);
            w.write_record(CSV_COLUMNS)?;
            for (r, line) in records {
                w.write_record(csv_row(&r, &line))?;
            }
            w.flush()?;
        }
    }
    Ok(())
}

/// A file's name as verify reports it, and the log lines it holds.
type NamedLines = (String, Box<dyn io::BufRead>);

/// A record's CSV row; the last column is its line as logged.
fn csv_row(r: &Record, line: &[u8]) -> [String; CSV_COLUMNS.len()] {
    let s = |o: &Option<String>| o.clone().unwrap_or_default();
    let n = |o: Option<u64>| o.map(|v| v.to_string()).unwrap_or_default();
    [
        r.time.clone(),
        r.seq.to_string(),
        r.kind.clone(),
        s(&r.session),
        n(r.pid.map(u64::from)),
        n(r.tgid.map(u64::from)),
        n(r.uid.map(u64::from)),
        s(&r.comm),
        s(&r.exe),
        s(&r.hook),
        s(&r.family),
        s(&r.protocol),
        s(&r.dest),
        n(r.port.map(u64::from)),
        s(&r.verdict),
        s(&r.reason),
        s(&r.policy),
        n(r.count),
        s(&r.profile),
        r.argv.clone().map(|a| a.join(" ")).unwrap_or_default(),
        n(r.lost),
        s(&r.message),
        s(&r.qname),
        s(&r.qtype),
        s(&r.rcode),
        r.answers.clone().map(|a| a.join(" ")).unwrap_or_default(),
        n(r.ttl.map(u64::from)),
        r.prev.clone(),
        String::from_utf8_lossy(line).into_owned(),
    ]
}

/// A record's OCSF event (network, DNS, or a base event), carrying its line as logged.
fn ocsf_of(r: &Record, line: &[u8], whole: bool) -> Option<serde_json::Value> {
    let mut v = ocsf(r).or_else(|| whole.then(|| ocsf_base(r)))?;
    v["unmapped"]["egressd_line"] = serde_json::json!(String::from_utf8_lossy(line));
    Some(v)
}

/// The lines of the log a file holds, for `verify`: a log or a JSONL export as it is, a CSV
/// export's `line` column, an OCSF export's `unmapped.egressd_line`; and the name to report
/// (for an export, its line numbers count records). The columns of a CSV row and the fields of
/// an OCSF event must be what the line they carry gives, or the export was edited: that is the
/// inner error, said as a broken line.
fn log_lines_of(path: &Path) -> anyhow::Result<Result<NamedLines, String>> {
    let mut reader = BufReader::new(open(path)?);
    let mut first = Vec::new();
    reader.read_until(b'\n', &mut first)?;
    let name = path.display().to_string();
    if first.starts_with(b"time,seq,type,") {
        let mut rest = Vec::new();
        reader.read_to_end(&mut rest)?;
        first.extend_from_slice(&rest);
        let mut rdr = csv::Reader::from_reader(first.as_slice());
        let col = rdr.headers()?.iter().position(|h| h == "line").with_context(|| {
            format!("{name}: a CSV export without the `line` column (an older egressctl made it): it cannot be verified")
        })?;
        let headers: Vec<String> = rdr.headers()?.iter().map(String::from).collect();
        let mut lines = Vec::new();
        for (i, row) in rdr.records().enumerate() {
            let row = row?;
            let line = row.get(col).unwrap_or("");
            if let Ok(r) = serde_json::from_str::<Record>(line) {
                let expected = csv_row(&r, line.as_bytes());
                for (j, (got, want)) in row.iter().zip(expected.iter()).enumerate() {
                    if got != want {
                        return Ok(Err(format!(
                            "{name} row {}: column {} says {got:?} but the record it carries says {want:?}: the export was edited",
                            i + 1,
                            headers.get(j).map_or("?", String::as_str)
                        )));
                    }
                }
            }
            lines.extend_from_slice(line.as_bytes());
            lines.push(b'\n');
        }
        return Ok(Ok((
            format!("{name} (CSV export; line N is row N)"),
            Box::new(io::Cursor::new(lines)),
        )));
    }
    let event = serde_json::from_slice::<serde_json::Value>(&first).ok();
    if event.as_ref().is_some_and(|e| e.get("class_uid").is_some()) {
        let mut lines = Vec::new();
        for (i, l) in std::iter::once(Ok(first))
            .chain(reader.split(b'\n'))
            .enumerate()
        {
            let l = l?;
            if l.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let e: serde_json::Value = serde_json::from_slice(&l)
                .with_context(|| format!("{name} line {}: not an OCSF event", i + 1))?;
            let line = e["unmapped"]["egressd_line"].as_str().with_context(|| {
                format!("{name} line {}: no unmapped.egressd_line: an extract (exported with --session, --verdict, --dest or --type) or made by an older egressctl, which cannot be verified", i + 1)
            })?;
            if let Ok(r) = serde_json::from_str::<Record>(line) {
                if ocsf_of(&r, line.as_bytes(), true).as_ref() != Some(&e) {
                    return Ok(Err(format!(
                        "{name} line {}: the event's fields are not what the record it carries gives: the export was edited",
                        i + 1
                    )));
                }
            }
            lines.extend_from_slice(line.as_bytes());
            lines.push(b'\n');
        }
        return Ok(Ok((
            format!("{name} (OCSF export)"),
            Box::new(io::Cursor::new(lines)),
        )));
    }
    Ok(Ok((name, Box::new(io::Cursor::new(first).chain(reader)))))
}

/// An OCSF 1.1 Network Activity event (class 4001) for a decision record, a DNS Activity event
/// (class 4003) for a DNS record.
fn ocsf(r: &Record) -> Option<serde_json::Value> {
    match r.kind.as_str() {
        "decision" => {
            let mut event = ocsf_event(r, 4001)?;
            event["count"] = serde_json::json!(r.count.unwrap_or(1));
            event["actor"]["process"]["file"] =
                serde_json::json!(r.exe.as_ref().map(|p| serde_json::json!({ "path": p })));
            event["unmapped"] =
                serde_json::json!({ "hook": r.hook, "policy": r.policy, "egressd_seq": r.seq });
            Some(event)
        }
        "dns" => {
            let mut event = ocsf_event(r, 4003)?;
            event["count"] = serde_json::json!(r.count.unwrap_or(1));
            event["query"] = serde_json::json!({ "hostname": r.qname, "type": r.qtype });
            event["rcode"] = serde_json::json!(r.rcode);
            event["answers"] = r
                .answers
                .iter()
                .flatten()
                .map(|a| serde_json::json!({ "rdata": a, "ttl": r.ttl }))
                .collect();
            Some(event)
        }
        _ => None,
    }
}

/// What Network Activity (4001) and DNS Activity (4003) events share: class, outcome, time,
/// product, destination and process.
fn ocsf_event(r: &Record, class_uid: u32) -> Option<serde_json::Value> {
    let time_ms = humantime::parse_rfc3339(&r.time)
        .ok()?
        .duration_since(SystemTime::UNIX_EPOCH)
        .ok()?
        .as_millis() as u64;
    let denied = r.verdict.as_deref() == Some("denied");
    Some(serde_json::json!({
        "category_uid": 4,
        "class_uid": class_uid,
        "activity_id": 1,
        "type_uid": class_uid * 100 + 1,
        "severity_id": if denied { 3 } else { 1 },
        "status_id": if denied { 2 } else { 1 },
        "action_id": if denied { 2 } else { 1 },
        "disposition_id": if denied { 2 } else { 1 },
        "time": time_ms,
        "message": r.reason,
        "metadata": {
            "version": "1.1.0",
            "product": { "name": "egressd", "vendor_name": "egressd" },
            "sequence": r.seq,
            "correlation_uid": r.session,
        },
        "connection_info": { "direction_id": 2, "protocol_name": r.protocol },
        "dst_endpoint": { "ip": r.dest, "port": r.port },
        "actor": {
            "process": {
                "pid": r.tgid,
                "name": r.comm,
                "user": { "uid": r.uid.map(|u| u.to_string()) },
            }
        },
    }))
}

/// An OCSF Base Event (class 0) for a record that is not network or DNS activity (a session's
/// start or end, a seal, a lost count, the daemon's own), so that a whole export keeps the chain.
fn ocsf_base(r: &Record) -> serde_json::Value {
    let time_ms = humantime::parse_rfc3339(&r.time)
        .ok()
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as u64);
    serde_json::json!({
        "category_uid": 0,
        "class_uid": 0,
        "activity_id": 99,
        "type_uid": 99,
        "severity_id": if r.kind == "lost" || r.kind == "crash" { 3 } else { 1 },
        "time": time_ms,
        "message": r.message.clone().or_else(|| r.reason.clone()).unwrap_or_else(|| r.kind.clone()),
        "metadata": {
            "version": "1.1.0",
            "product": { "name": "egressd", "vendor_name": "egressd" },
            "sequence": r.seq,
            "correlation_uid": r.session,
        },
        "unmapped": { "egressd_type": r.kind },
    })
}

#[derive(Default)]
/// What `summary` prints and `report` shows: decisions (their `count`s) per session and per
/// destination, records lost per session and by reason, crashes and replaced files.
pub(crate) struct Summary {
    /// Per session id: its tally and its profile (from its `session_start`).
    pub sessions: BTreeMap<String, (Tally, Option<String>)>,
    /// Per destination (`destination()`): allowed and denied.
    pub dests: BTreeMap<String, Tally>,
    pub lost_by: BTreeMap<String, u64>,
    pub crashes: u64,
    pub continued: u64,
}

#[derive(Default, Clone, Copy)]
pub(crate) struct Tally {
    pub allowed: u64,
    pub denied: u64,
    pub lost: u64,
}

pub(crate) fn tally(records: &[Record]) -> Summary {
    let mut s = Summary::default();
    for r in records {
        let session = r.session.clone().unwrap_or_default();
        match r.kind.as_str() {
            "decision" => {
                let n = r.count.unwrap_or(1);
                let entry = &mut s.sessions.entry(session).or_default().0;
                let d = s.dests.entry(destination(r)).or_default();
                if r.verdict.as_deref() == Some("denied") {
                    entry.denied += n;
                    d.denied += n;
                } else {
                    entry.allowed += n;
                    d.allowed += n;
                }
            }
            "lost" => {
                s.sessions.entry(session).or_default().0.lost += r.count.unwrap_or(0);
                *s.lost_by
                    .entry(
                        r.reason
                            .clone()
                            .unwrap_or_else(|| "ring buffer full".into()),
                    )
                    .or_default() += r.count.unwrap_or(0);
            }
            "crash" => s.crashes += 1,
            "log_continued" => s.continued += 1,
            "session_start" => s.sessions.entry(session).or_default().1 = r.profile.clone(),
            _ => {}
        }
    }
    s
}

impl Matcher {
    /// The filters `summary` and `report` share: a period and a session.
    pub(crate) fn period(
        since: Option<String>,
        until: Option<String>,
        session: Option<String>,
    ) -> anyhow::Result<Matcher> {
        Matcher::new(&Filter {
            since,
            until,
            session,
            ..Default::default()
        })
    }

    pub(crate) fn keeps(&self, r: &Record) -> bool {
        self.matches(r)
    }
}

fn summary(records: Vec<Record>) {
    let Summary {
        sessions,
        dests,
        lost_by,
        crashes,
        continued,
    } = tally(&records);
    println!(
        "{:<10} {:<10} {:>9} {:>9} {:>7}",
        "SESSION", "PROFILE", "ALLOWED", "DENIED", "LOST"
    );
    for (id, (t, profile)) in &sessions {
        println!(
            "{:<10} {:<10} {:>9} {:>9} {:>7}",
            id,
            profile.clone().unwrap_or_default(),
            t.allowed,
            t.denied,
            t.lost
        );
    }
    println!();
    println!("{:<40} {:>9} {:>9}", "DESTINATION", "ALLOWED", "DENIED");
    for (d, t) in &dests {
        println!("{:<40} {:>9} {:>9}", d, t.allowed, t.denied);
    }
    println!();
    if lost_by.is_empty() {
        println!("lost:     none");
    }
    for (why, n) in &lost_by {
        println!("lost:     {n} records ({why})");
    }
    if crashes > 0 {
        println!("crashes:  {crashes} (egressd ended without closing the log; each recorded by the next start)");
    }
    if continued > 0 {
        println!("replaced: the log file was replaced or removed under egressd {continued} time(s); the chain continued");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(kind: &str) -> Record {
        Record {
            kind: kind.into(),
            time: "2026-11-22T15:04:56.364Z".into(),
            session: Some("e38b4bc8".into()),
            verdict: Some("denied".into()),
            dest: Some("198.18.0.2".into()),
            port: Some(443),
            tgid: Some(2539),
            comm: Some("python3".into()),
            uid: Some(1000),
            ..Default::default()
        }
    }

    #[test]
    fn ocsf_maps_decisions_and_dns_to_their_classes() {
        let mut d = record("decision");
        d.exe = Some("/usr/bin/python3".into());
        d.count = Some(3);
        d.hook = Some("connect4".into());
        let e = ocsf(&d).unwrap();
        assert_eq!(e["class_uid"], 4001);
        assert_eq!(e["type_uid"], 400101);
        assert_eq!(e["status_id"], 2);
        assert_eq!(e["time"], 1_795_359_896_364u64);
        assert_eq!(e["count"], 3);
        assert_eq!(e["dst_endpoint"]["port"], 443);
        assert_eq!(e["actor"]["process"]["name"], "python3");
        assert_eq!(e["actor"]["process"]["file"]["path"], "/usr/bin/python3");
        assert_eq!(e["actor"]["process"]["user"]["uid"], "1000");
        assert_eq!(e["unmapped"]["hook"], "connect4");

        let mut q = record("dns");
        q.verdict = Some("allowed".into());
        q.qname = Some("git.corp.example".into());
        q.answers = Some(vec!["198.18.0.7".into()]);
        q.ttl = Some(60);
        let e = ocsf(&q).unwrap();
        assert_eq!(e["class_uid"], 4003);
        assert_eq!(e["type_uid"], 400301);
        assert_eq!(e["status_id"], 1);
        assert_eq!(e["query"]["hostname"], "git.corp.example");
        assert_eq!(e["answers"][0]["rdata"], "198.18.0.7");
        assert_eq!(e["answers"][0]["ttl"], 60);
        assert_eq!(e["count"], 1);
        // A query's repeats, folded into one record, are one event with their count.
        q.count = Some(39);
        assert_eq!(ocsf(&q).unwrap()["count"], 39);

        assert!(ocsf(&record("session_start")).is_none());
    }
}
