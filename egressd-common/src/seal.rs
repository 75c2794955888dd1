//! Forward-secure sealing of the audit log (like journald's FSS).
//!
//! `egressctl audit setup-keys` draws a random 32-byte key, key_0, and gives it to the auditor as
//! the verification key (with the start time and the epoch length). Time is cut into epochs of
//! `interval` seconds from `start`; epoch n's key is key_n = SHA-256("egressd-seal-evolve" ||
//! key_{n-1}), a one-way step. egressd holds only the current epoch's key (in the sealing state
//! file, mode 0600, rewritten at each step) and writes a `seal` record every interval, at every
//! stop and rotation: HMAC-SHA256(key_epoch, chain head hash || sealed_seq || epoch). The auditor
//! derives every epoch's key from key_0 and checks each seal. Whoever takes the machine at epoch N
//! finds key_N only, and can make no seal of an earlier epoch: every record before the last seal of
//! epoch N-1 stays as it was, or verification fails.

use std::{
    borrow::ToOwned,
    fmt, format,
    fs::{self, OpenOptions},
    io::{self, Write as _},
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    string::{String, ToString},
    vec::Vec,
};

use hmac::{Hmac, KeyInit as _, Mac as _};

use crate::audit::{Broken, SealLine, Verified};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

pub const VK_PREFIX: &str = "egressd-vk1:";
const EVOLVE: &[u8] = b"egressd-seal-evolve";
const ID: &[u8] = b"egressd-seal-id";

/// A 32-byte key, overwritten when dropped.
pub struct Key(pub [u8; 32]);

impl Key {
    /// The next epoch's key. The old one stays until dropped (which zeroizes it).
    pub fn evolve(&self) -> Key {
        let mut h = Sha256::new();
        h.update(EVOLVE);
        h.update(self.0);
        Key(h.finalize().into())
    }

    pub fn zeroize(&mut self) {
        for b in self.0.iter_mut() {
            // SAFETY: a valid, aligned byte of our own array.
            unsafe { std::ptr::write_volatile(b, 0) };
        }
        std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
    }

    /// HMAC-SHA256(key, head hash (32 bytes) || seq (u64 BE) || epoch (u64 BE)), hex.
    pub fn seal(&self, head_hash: &str, seq: u64, epoch: u64) -> String {
        let mut mac = <Hmac<Sha256>>::new_from_slice(&self.0).expect("any key length");
        match hex::decode(head_hash) {
            Ok(b) => mac.update(&b),
            Err(_) => mac.update(head_hash.as_bytes()),
        }
        mac.update(&seq.to_be_bytes());
        mac.update(&epoch.to_be_bytes());
        hex::encode(mac.finalize().into_bytes())
    }
}

impl Drop for Key {
    fn drop(&mut self) {
        self.zeroize();
    }
}

impl Clone for Key {
    fn clone(&self) -> Key {
        Key(self.0)
    }
}

/// A short public name of key_0 (not a key of any epoch), carried by every seal so a verifier can
/// tell which verification key it needs.
pub fn key_id(key0: &Key) -> String {
    let mut h = Sha256::new();
    h.update(ID);
    h.update(key0.0);
    hex::encode(&h.finalize()[..8])
}

/// What the auditor keeps: key_0, the start time (Unix seconds) and the epoch length (seconds).
/// Text form: `egressd-vk1:<64 hex>/<start>/<interval>`.
#[derive(Clone)]
pub struct VerificationKey {
    pub key0: Key,
    pub start: u64,
    pub interval: u64,
}

impl fmt::Display for VerificationKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{VK_PREFIX}{}/{}/{}",
            hex::encode(self.key0.0),
            self.start,
            self.interval
        )
    }
}

impl std::str::FromStr for VerificationKey {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!("not a verification key (expected {VK_PREFIX}<64 hex digits>/<start>/<interval>, as `egressctl audit setup-keys` printed it)")
        };
        let rest = s.trim().strip_prefix(VK_PREFIX).ok_or_else(bad)?;
        let mut parts = rest.split('/');
        let (Some(k), Some(start), Some(interval), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        let k = hex::decode(k).map_err(|_| bad())?;
        let key0: [u8; 32] = k.try_into().map_err(|_| bad())?;
        let start = start.parse().map_err(|_| bad())?;
        let interval: u64 = interval.parse().map_err(|_| bad())?;
        if interval == 0 {
            return Err(bad());
        }
        Ok(VerificationKey {
            key0: Key(key0),
            start,
            interval,
        })
    }
}

impl VerificationKey {
    pub fn id(&self) -> String {
        key_id(&self.key0)
    }
    /// The key of `epoch` (epoch steps from key_0).
    pub fn key_at(&self, epoch: u64) -> Key {
        let mut k = self.key0.clone();
        for _ in 0..epoch {
            k = k.evolve();
        }
        k
    }
    pub fn epoch_start(&self, epoch: u64) -> u64 {
        self.start
            .saturating_add(epoch.saturating_mul(self.interval))
    }
}

/// The sealing state file, as egressd keeps it (mode 0600).
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    version: u32,
    /// `key_id` of key_0.
    id: String,
    epoch: u64,
    /// The current epoch's key, hex.
    key: String,
    start: u64,
    interval: u64,
}

/// Where the sealing state of the log at `log` lives: next to it (`audit.jsonl` ->
/// `audit.seal`), on the log's persistent file system, in egressd's directory (0750 root, and
/// out of every sandbox's reach), like journald's `fss` file next to the journal.
pub fn state_path(log: &Path) -> PathBuf {
    log.with_extension("seal")
}

/// The daemon's side: the current epoch's key, and where to keep it.
pub struct Sealer {
    pub path: PathBuf,
    pub id: String,
    pub epoch: u64,
    pub start: u64,
    pub interval: u64,
    key: Key,
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// 32 random bytes from the kernel (getrandom(2), blocking until the pool is ready).
pub fn random_key() -> io::Result<Key> {
    let mut k = [0u8; 32];
    let mut done = 0;
    while done < k.len() {
        // SAFETY: writes at most the remaining bytes of `k`.
        let n = unsafe { libc::getrandom(k[done..].as_mut_ptr().cast(), k.len() - done, 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
    }
    Ok(Key(k))
}

impl Sealer {
    /// Makes new keys at `path` (refused if a state exists there, unless `force`): the sealer at
    /// epoch 0, and the verification key to give the auditor.
    pub fn create(
        path: &Path,
        interval: u64,
        force: bool,
    ) -> io::Result<(Sealer, VerificationKey)> {
        if interval == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the seal interval must be at least 1 s",
            ));
        }
        if !force && fs::symlink_metadata(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "{} exists: the log already has sealing keys; `--force` makes new ones (seals made with the old key then verify only with the old verification key)",
                    path.display()
                ),
            ));
        }
        let key0 = random_key()?;
        let start = now_secs();
        let s = Sealer {
            path: path.to_owned(),
            id: key_id(&key0),
            epoch: 0,
            start,
            interval,
            key: key0.clone(),
        };
        s.save()?;
        Ok((
            s,
            VerificationKey {
                key0,
                start,
                interval,
            },
        ))
    }

    /// Reads the state at `path`; `None` when there is none (the log is not sealed).
    pub fn load(path: &Path) -> io::Result<Option<Sealer>> {
        let text = match fs::read(path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let bad = |why: String| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: not a sealing state: {why}", path.display()),
            )
        };
        let f: StateFile = serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
        let mut k = hex::decode(&f.key).map_err(|e| bad(e.to_string()))?;
        let key: Result<[u8; 32], _> = k.as_slice().try_into();
        let key = key.map_err(|_| bad("the key is not 32 bytes".into()))?;
        k.iter_mut().for_each(|b| *b = 0);
        if f.interval == 0 {
            return Err(bad("interval 0".into()));
        }
        Ok(Some(Sealer {
            path: path.to_owned(),
            id: f.id,
            epoch: f.epoch,
            start: f.start,
            interval: f.interval,
            key: Key(key),
        }))
    }

    /// Writes the state: a temporary file (0600), fsync, rename over the old one, fsync of the
    /// directory. The old key is gone from the disk once the rename is durable.
    pub fn save(&self) -> io::Result<()> {
        // A bare file name has the parent "", which cannot be opened for the fsync below.
        let dir = match self.path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        fs::create_dir_all(dir)?;
        let mut tmp = self.path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let _ = fs::remove_file(&tmp);
        let mut text = serde_json::to_vec(&StateFile {
            version: 1,
            id: self.id.clone(),
            epoch: self.epoch,
            key: hex::encode(self.key.0),
            start: self.start,
            interval: self.interval,
        })
        .map_err(io::Error::other)?;
        text.push(b'\n');
        let written = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
                .open(&tmp)?;
            f.set_permissions(fs::Permissions::from_mode(0o600))?;
            f.write_all(&text)?;
            f.sync_all()
        })();
        text.iter_mut().for_each(|b| *b = 0);
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        fs::rename(&tmp, &self.path)?;
        fs::File::open(dir)?.sync_all()
    }

    /// The epoch `now` (Unix seconds) falls in.
    pub fn epoch_at(&self, now: u64) -> u64 {
        now.saturating_sub(self.start) / self.interval
    }

    /// When the current epoch ends (Unix seconds).
    pub fn epoch_end(&self) -> u64 {
        self.start + (self.epoch + 1) * self.interval
    }

    /// The seal of the chain head (`hash` of the line at `seq`) with the current epoch's key.
    pub fn seal(&self, head_hash: &str, seq: u64) -> String {
        self.key.seal(head_hash, seq, self.epoch)
    }

    /// Steps the key forward to `epoch` (nothing when it is not ahead), zeroizing each old key,
    /// and saves the state. On a failed save the key in memory has still moved on.
    pub fn advance_to(&mut self, epoch: u64) -> io::Result<bool> {
        if epoch <= self.epoch {
            return Ok(false);
        }
        while self.epoch < epoch {
            let next = self.key.evolve();
            self.key.zeroize();
            self.key = next;
            self.epoch += 1;
        }
        self.save()?;
        Ok(true)
    }

    /// The key of the current epoch (for tests, and to show what a thief would hold).
    pub fn current_key(&self) -> &Key {
        &self.key
    }
}

/// Seconds since the Unix epoch of an RFC 3339 UTC time (`2026-11-22T15:04:56.157Z`, the form
/// records carry; an offset other than Z/+00:00 is applied), fractions dropped.
pub fn rfc3339_secs(t: &str) -> Option<i64> {
    let b = t.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !(b[10] == b'T' || b[10] == b' ') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> { t.get(r)?.parse().ok() };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, s) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let mut rest = &t[19..];
    if let Some(r) = rest.strip_prefix('.') {
        rest = r.trim_start_matches(|c: char| c.is_ascii_digit());
    }
    let offset = match rest {
        "Z" | "z" | "+00:00" => 0,
        o if o.len() == 6 => {
            let sign = if o.starts_with('-') { -1 } else { 1 };
            sign * (o.get(1..3)?.parse::<i64>().ok()? * 3600
                + o.get(4..6)?.parse::<i64>().ok()? * 60)
        }
        _ => return None,
    };
    // Days from civil (Howard Hinnant's algorithm).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + h * 3600 + mi * 60 + s - offset)
}

/// How much later than every interval a seal may come before it counts as missing.
pub fn slack(interval: u64) -> u64 {
    2 + interval / 2
}

/// What the seals say, when they all hold.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SealReport {
    pub seals: usize,
    /// The last valid seal: its seq, time and epoch, and the seq it covers.
    pub sealed_seq: u64,
    pub sealed_at: String,
    pub last_epoch: u64,
    /// Records after the last seal (written since, by a running egressd; or a cut tail).
    pub unsealed: u64,
    /// The log ends with egressd's stop seal (a stopped egressd's log ends so; any other end is
    /// a running egressd's, a crash's, or a cut).
    pub ends_with_stop: bool,
    pub notes: Vec<String>,
}

fn broken_at(s: &SealLine, reason: String) -> Broken {
    Broken {
        file: s.file.clone(),
        line: s.line,
        reason,
    }
}

fn human(secs: u64) -> String {
    match secs {
        s if s % 86_400 == 0 && s >= 86_400 => format!("{} d", s / 86_400),
        s if s % 3600 == 0 && s >= 3600 => format!("{} h", s / 3600),
        s if s % 60 == 0 && s >= 60 => format!("{} min", s / 60),
        s => format!("{s} s"),
    }
}

/// Checks every seal `verify` found against the verification keys (each seal names its key's
/// id), and that no seal is missing: consecutive seals at most one interval (plus `slack`) apart
/// except across a clean stop or a crash, the records after the last seal within one interval of
/// it and without a stop record among them, and, with `until` (Unix seconds: when the log is
/// claimed to end, e.g. when it was exported), a last seal within one interval of it. The first
/// seal must also be of an epoch no later than the one after the first record's: a log made whole
/// with a later epoch's key (a replaced file) claims records older than its first seal's epoch.
pub fn check(
    v: &Verified,
    keys: &[VerificationKey],
    until: Option<i64>,
) -> Result<SealReport, Broken> {
    let mut out = SealReport::default();
    let Some(first_seal) = v.seals.first() else {
        return Err(Broken {
            file: String::new(),
            line: 0,
            reason: "no seal records: this log was not sealed (`egressctl audit setup-keys`), or every seal was removed".into(),
        });
    };
    // Keys of the epochs met so far, per verification key (epochs only grow in a good log).
    let mut cache: Vec<(u64, Key)> = keys.iter().map(|k| (0, k.key0.clone())).collect();
    let mut prev: Option<(&SealLine, i64, u64)> = None;
    for s in &v.seals {
        let (Some(epoch), Some(mac), Some(sealed_seq)) = (s.epoch, &s.seal, s.sealed_seq) else {
            return Err(broken_at(
                s,
                format!(
                    "seal at seq {}: a field is missing (epoch, seal, sealed_seq)",
                    s.seq
                ),
            ));
        };
        let ki = match &s.key {
            Some(id) => keys.iter().position(|k| &k.id() == id),
            None => (!keys.is_empty()).then_some(0),
        };
        let Some(ki) = ki else {
            return Err(broken_at(s, format!(
                "seal at seq {} ({}) was made with another key (id {}) than the verification key(s) given ({}): keys made anew with `setup-keys --force` need their own verification key, or the seal is forged",
                s.seq, s.time, s.key.as_deref().unwrap_or("?"),
                keys.iter().map(|k| k.id()).collect::<Vec<_>>().join(", ")
            )));
        };
        let vk = &keys[ki];
        let Some(t) = rfc3339_secs(&s.time) else {
            return Err(broken_at(
                s,
                format!("seal at seq {}: unreadable time {:?}", s.seq, s.time),
            ));
        };
        if sealed_seq + 1 != s.seq {
            return Err(broken_at(
                s,
                format!(
                    "seal at seq {} claims to cover seq {sealed_seq}, not the record before it",
                    s.seq
                ),
            ));
        }
        if (t as i128) < vk.epoch_start(epoch) as i128 {
            return Err(broken_at(s, format!(
                "seal at seq {} ({}) is of epoch {epoch}, which begins only at {}: a seal dated before its epoch is forged",
                s.seq, s.time, vk.epoch_start(epoch)
            )));
        }
        if let Some((p, _, pe)) = prev {
            if epoch < pe && p.key == s.key {
                return Err(broken_at(s, format!(
                    "seal at seq {} is of epoch {epoch}, before the epoch of the seal at seq {} ({pe}): seals were reordered or forged",
                    s.seq, p.seq
                )));
            }
        }
        let (at, key) = &mut cache[ki];
        if epoch < *at {
            *at = 0;
            *key = vk.key0.clone();
        }
        while *at < epoch {
            *key = key.evolve();
            *at += 1;
        }
        if key.seal(&s.head, sealed_seq, epoch) != *mac {
            return Err(broken_at(s, format!(
                "seal at seq {} ({}, epoch {epoch}) does not match the records it covers: a record up to seq {sealed_seq} was changed or removed after it was sealed (and the chain recomputed), or the seal is forged",
                s.seq, s.time
            )));
        }
        if let Some((p, pt, _)) = prev {
            let gap = t - pt;
            let excused = p.reason == "stop" || v.crashes.iter().any(|c| *c > p.seq && *c < s.seq);
            if !excused && gap > (vk.interval + slack(vk.interval)) as i64 {
                return Err(broken_at(s, format!(
                    "missing seals: none between seq {} ({}) and seq {} ({}), {} apart, while egressd seals every {}: records were removed between them",
                    p.seq, p.time, s.seq, s.time, human(gap as u64), human(vk.interval)
                )));
            }
            if p.reason != "stop"
                && v.crashes.iter().any(|c| *c > p.seq && *c < s.seq)
                && gap > (vk.interval + slack(vk.interval)) as i64
            {
                out.notes.push(format!(
                    "seq {}..{} were sealed only at seq {} ({}): egressd crashed before sealing them (a crash leaves up to one interval unsealed)",
                    p.seq + 1, s.seq - 1, s.seq, s.time
                ));
            }
        } else if let Some((fseq, ftime)) = &v.first {
            // The first seal: records before it must not be older than its epoch allows.
            if let Some(ft) = rfc3339_secs(ftime) {
                let earliest =
                    vk.epoch_start(epoch) as i64 - (vk.interval + slack(vk.interval)) as i64;
                if epoch > 0 && ft < earliest {
                    return Err(broken_at(s, format!(
                        "seal at seq {} ({}) is the first, of epoch {epoch}, but the records it covers go back to seq {fseq} ({ftime}), epochs earlier: they were sealed with a later epoch's key (the file was replaced, or its seals removed)",
                        s.seq, s.time
                    )));
                }
            }
        }
        prev = Some((s, t, epoch));
        out.seals += 1;
        out.sealed_seq = sealed_seq;
        out.sealed_at = s.time.clone();
        out.last_epoch = epoch;
    }
    let (last, lt, _) = prev.expect("at least one seal");
    let vk = &keys[last
        .key
        .as_ref()
        .and_then(|id| keys.iter().position(|k| &k.id() == id))
        .unwrap_or(0)];
    let limit = (vk.interval + slack(vk.interval)) as i64;
    if let Some((seq, time)) = &v.last {
        out.unsealed = seq.saturating_sub(last.seq);
        if let Some(stop) = v.stops.iter().find(|s| **s > last.seq) {
            return Err(Broken {
                file: last.file.clone(),
                line: last.line,
                reason: format!(
                    "the log is sealed only up to seq {} ({}): egressd's stop record at seq {stop} has no seal after it, though a stopping egressd seals its last record: the end of the log was cut",
                    last.seq, last.time
                ),
            });
        }
        if let Some(t) = rfc3339_secs(time) {
            if t - lt > limit {
                return Err(Broken {
                    file: last.file.clone(),
                    line: last.line,
                    reason: format!(
                        "missing seals: the last seal is at seq {} ({}), but records go on until seq {seq} ({time}), {} later, while egressd seals every {}: the seals after it were removed",
                        last.seq, last.time, human((t - lt) as u64), human(vk.interval)
                    ),
                });
            }
        }
    }
    if let Some(u) = until {
        if u - lt > limit {
            return Err(Broken {
                file: last.file.clone(),
                line: last.line,
                reason: format!(
                    "missing seals: the last seal is at seq {} ({}), {} before the end claimed (--until), while egressd seals every {}: the end of the log was cut",
                    last.seq, last.time, human((u - lt) as u64), human(vk.interval)
                ),
            });
        }
    }
    let _ = first_seal;
    out.ends_with_stop = out.unsealed == 0 && last.reason == "stop";
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{line_hash, verify, Record, GENESIS};
    use std::{io::Cursor, vec};

    const START: u64 = 1_800_000_000;
    const IV: u64 = 60;

    /// RFC 3339 of Unix seconds (civil from days, Howard Hinnant).
    fn rfc(secs: u64) -> String {
        let days = (secs / 86_400) as i64;
        let rem = secs % 86_400;
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let d = doy - (153 * mp + 2) / 5 + 1;
        let m = if mp < 10 { mp + 3 } else { mp - 9 };
        let y = yoe + era * 400 + i64::from(m <= 2);
        format!(
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.000000000Z",
            rem / 3600,
            rem / 60 % 60,
            rem % 60
        )
    }

    #[test]
    fn times_round_trip() {
        for s in [0, START, START + 86_399, 951_782_400 /* 2000-02-29 */] {
            assert_eq!(rfc3339_secs(&rfc(s)), Some(s as i64), "{}", rfc(s));
        }
        assert_eq!(rfc3339_secs("2026-11-22T15:04:56Z"), Some(1_795_359_896));
    }

    /// A log as egressd writes it, with the sealer's key in a state file.
    struct Log {
        lines: Vec<String>,
        seq: u64,
        head: String,
        sealer: Sealer,
        vk: VerificationKey,
        dir: PathBuf,
    }

    impl Log {
        fn new(tag: &str) -> Log {
            let dir =
                std::env::temp_dir().join(format!("egressd-seal-{tag}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            let (mut sealer, mut vk) =
                Sealer::create(&state_path(&dir.join("audit.jsonl")), IV, false).unwrap();
            sealer.start = START;
            vk.start = START;
            sealer.save().unwrap();
            Log {
                lines: vec![],
                seq: 0,
                head: GENESIS.into(),
                sealer,
                vk,
                dir,
            }
        }
        fn push(&mut self, mut rec: Record) {
            self.seq += 1;
            rec.seq = self.seq;
            rec.prev = std::mem::take(&mut self.head);
            let line = serde_json::to_string(&rec).unwrap();
            self.head = line_hash(line.as_bytes());
            self.lines.push(line);
        }
        fn record(&mut self, t: u64, kind: &str, message: &str) {
            self.push(Record {
                time: rfc(t),
                kind: kind.into(),
                message: (!message.is_empty()).then(|| message.into()),
                ..Default::default()
            });
        }
        /// A seal at `t` by the daemon's sealer, then the step to `t`'s epoch, as egressd does.
        fn seal(&mut self, t: u64, reason: &str) {
            let (head, seq) = (self.head.clone(), self.seq);
            let rec = Record {
                time: rfc(t),
                kind: "seal".into(),
                reason: Some(reason.into()),
                epoch: Some(self.sealer.epoch),
                seal: Some(self.sealer.seal(&head, seq)),
                sealed_seq: Some(seq),
                key: Some(self.sealer.id.clone()),
                ..Default::default()
            };
            self.push(rec);
            let e = self.sealer.epoch_at(t);
            self.sealer.advance_to(e).unwrap();
        }
        /// Three epochs of records, a seal at each boundary, and a clean stop.
        fn sample(tag: &str) -> Log {
            let mut l = Log::new(tag);
            l.record(START + 1, "daemon", "egressd started");
            for e in 0..3 {
                for i in 0..4 {
                    l.record(START + e * IV + 10 + i * 10, "decision", "");
                }
                l.seal(START + (e + 1) * IV + 1, "interval");
            }
            l.record(START + 3 * IV + 20, "decision", "");
            l.record(START + 3 * IV + 30, "daemon", crate::audit::STOP_MESSAGE);
            l.seal(START + 3 * IV + 30, "stop");
            l
        }
        fn check(&self, lines: &[String], until: Option<i64>) -> Result<SealReport, Broken> {
            let text = lines.join("\n") + "\n";
            let v = verify([("audit.jsonl".to_string(), Cursor::new(text.into_bytes()))])?;
            check(&v, std::slice::from_ref(&self.vk), until)
        }
    }

    impl Drop for Log {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }

    /// The line index (0-based) of each seal record.
    fn seal_lines(lines: &[String]) -> Vec<usize> {
        lines
            .iter()
            .enumerate()
            .filter(|(_, l)| l.contains("\"type\":\"seal\""))
            .map(|(i, _)| i)
            .collect()
    }

    #[test]
    fn the_verification_key_round_trips_and_names_its_key() {
        let l = Log::new("vk");
        let text = l.vk.to_string();
        assert!(
            text.starts_with("egressd-vk1:") && text.ends_with(&format!("/{START}/{IV}")),
            "{text}"
        );
        let back: VerificationKey = text.parse().unwrap();
        assert_eq!(back.id(), l.sealer.id);
        assert!("egressd-vk1:abcd/1/2".parse::<VerificationKey>().is_err());
        assert!(format!("egressd-vk1:{}/1/0", "00".repeat(32))
            .parse::<VerificationKey>()
            .is_err());
    }

    #[test]
    fn the_state_file_is_0600_refused_without_force_and_holds_only_the_current_key() {
        let mut l = Log::new("state");
        let path = l.sealer.path.clone();
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let again = Sealer::create(&path, IV, false).err().unwrap();
        assert_eq!(again.kind(), io::ErrorKind::AlreadyExists, "{again}");
        l.sealer.advance_to(3).unwrap();
        let text = fs::read_to_string(&path).unwrap();
        assert!(
            !text.contains(&hex::encode(l.vk.key0.0)),
            "key_0 left the state file"
        );
        assert!(text.contains(&hex::encode(l.vk.key_at(3).0)));
        let loaded = Sealer::load(&path).unwrap().unwrap();
        assert_eq!(
            (loaded.epoch, loaded.start, loaded.interval),
            (3, START, IV)
        );
        assert_eq!(loaded.current_key().0, l.vk.key_at(3).0);
        let (_, vk2) = Sealer::create(&path, IV, true).unwrap();
        assert_ne!(vk2.id(), l.vk.id(), "--force makes a new key");
    }

    #[test]
    fn a_log_sealed_over_several_epochs_verifies_with_the_key() {
        let l = Log::sample("good");
        let r = l.check(&l.lines, None).unwrap();
        assert_eq!(r.seals, 4);
        assert_eq!(r.last_epoch, 3);
        assert_eq!(r.unsealed, 0);
        assert!(r.ends_with_stop);
        assert_eq!(r.sealed_seq as usize, l.lines.len() - 1);
        assert_eq!(r.sealed_at, rfc(START + 3 * IV + 30));
        // The claimed end right after the last seal passes too.
        assert!(l
            .check(&l.lines, Some((START + 3 * IV + 40) as i64))
            .is_ok());
    }

    #[test]
    fn an_edited_line_or_deleted_lines_fail() {
        let l = Log::sample("edit");
        let mut edited = l.lines.clone();
        edited[3] = edited[3].replace("\"decision\"", "\"dns\"");
        let e = l.check(&edited, None).unwrap_err();
        assert_eq!(e.line, 5, "{e:?}");
        let mut deleted = l.lines.clone();
        deleted.drain(2..4);
        assert!(l
            .check(&deleted, None)
            .unwrap_err()
            .reason
            .contains("chain broken"));
    }

    #[test]
    fn a_cut_tail_is_reported_unsealed_or_as_missing_seals() {
        let l = Log::sample("tail");
        let n = l.lines.len();
        // Only the stop seal cut: the stop record is left unsealed.
        let e = l.check(&l.lines[..n - 1], None).unwrap_err();
        assert!(
            e.reason.contains("stop record") && e.reason.contains("cut"),
            "{e:?}"
        );
        // The last seal and what came after an earlier seal cut: a running daemon's tail.
        let seals = seal_lines(&l.lines);
        let cut = &l.lines[..seals[2] + 2];
        let r = l.check(cut, None).unwrap();
        assert_eq!(r.unsealed, 1);
        assert!(!r.ends_with_stop);
        // Cut right after an interval seal: nothing unsealed, but no stop seal at the end.
        let r = l.check(&l.lines[..=seals[2]], None).unwrap();
        assert_eq!((r.unsealed, r.ends_with_stop), (0, false));
        // ... but not when the log is claimed to go on until later.
        let e = l
            .check(cut, Some((START + 3 * IV + 30) as i64 + 2 * IV as i64))
            .unwrap_err();
        assert!(
            e.reason.contains("missing seals") && e.reason.contains("--until"),
            "{e:?}"
        );
        // A tail that goes on long after its last seal lost the seals in between.
        let mut cut = cut.to_vec();
        let mut late: Record = serde_json::from_str(cut.last().unwrap()).unwrap();
        late.time = rfc(START + 10 * IV);
        cut.push(serde_json::to_string(&late).unwrap());
        let e = l.check(&rechain(&cut, None), None).unwrap_err();
        assert!(
            e.reason.contains("missing seals") && e.reason.contains("seals every 1 min"),
            "{e:?}"
        );
    }

    #[test]
    fn a_removed_span_between_seals_is_a_gap() {
        let mut l = Log::new("gap");
        l.record(START + 1, "daemon", "egressd started");
        for e in 0..5 {
            l.record(START + e * IV + 30, "decision", "");
            l.seal(START + (e + 1) * IV + 1, "interval");
        }
        // Remove epochs 1..3 (their records and seals), then re-chain what follows, as root with
        // the current key would: the seals after the cut no longer match their heads.
        let seals = seal_lines(&l.lines);
        let mut kept: Vec<String> = l.lines[..=seals[0]].to_vec();
        kept.extend(l.lines[seals[3] + 1..].iter().cloned());
        let rechained = rechain(&kept, None);
        let e = l.check(&rechained, None).unwrap_err();
        assert!(e.reason.contains("does not match"), "{e:?}");
        // With the seals recomputed too (possible only for epochs >= the thief's), the gap remains.
        let thief = Key(l.vk.key_at(4).0);
        let resealed = rechain(&kept, Some((&thief, 4)));
        let e = l.check(&resealed, None).unwrap_err();
        assert!(
            e.reason.contains("missing seals") || e.reason.contains("does not match"),
            "{e:?}"
        );
    }

    /// Recomputes `prev`/`seq` of every line (and, with a key, every seal of an epoch >= its
    /// epoch), as someone with root and the current key would after changing the log.
    fn rechain(lines: &[String], key: Option<(&Key, u64)>) -> Vec<String> {
        let mut head = GENESIS.to_string();
        let mut out = vec![];
        for (i, l) in lines.iter().enumerate() {
            let mut r: Record = serde_json::from_str(l).unwrap();
            r.seq = i as u64 + 1;
            r.prev = head.clone();
            if r.kind == "seal" {
                r.sealed_seq = Some(r.seq - 1);
                if let Some((k, n)) = key {
                    if r.epoch.unwrap() >= n {
                        let mut kk = k.clone();
                        for _ in n..r.epoch.unwrap() {
                            kk = kk.evolve();
                        }
                        r.seal = Some(kk.seal(&r.prev, r.seq - 1, r.epoch.unwrap()));
                    }
                }
            }
            let line = serde_json::to_string(&r).unwrap();
            head = line_hash(line.as_bytes());
            out.push(line);
        }
        out
    }

    #[test]
    fn an_edit_with_the_chain_recomputed_fails_at_the_first_seal_after_it() {
        let l = Log::sample("rechain");
        // Root at epoch 3 (holding key_3 only) turns a decision of epoch 0 around, recomputes
        // the chain, and reseals what it can: the epoch 0..2 seals no longer match.
        let mut lines = l.lines.clone();
        lines[2] = lines[2].replace("\"decision\"", "\"dns\"");
        let key3 = Key(l.sealer.current_key().0);
        assert_eq!(l.sealer.epoch, 3);
        let forged = rechain(&lines, Some((&key3, 3)));
        assert!(
            verify([("a".to_string(), Cursor::new(forged.join("\n").into_bytes()))]).is_ok(),
            "the chain itself holds"
        );
        let e = l.check(&forged, None).unwrap_err();
        let first = seal_lines(&forged)[0];
        assert_eq!(e.line, first + 1, "{e:?}");
        assert!(
            e.reason.contains("epoch 0") && e.reason.contains("does not match"),
            "{e:?}"
        );
    }

    #[test]
    fn a_key_of_epoch_n_cannot_seal_an_earlier_epoch() {
        let l = Log::sample("forward");
        let n = l.sealer.epoch;
        let stolen = Key(l.sealer.current_key().0);
        // Every earlier seal, remade with key_N but labeled with its own (earlier) epoch.
        let mut lines = l.lines.clone();
        for i in seal_lines(&lines) {
            let mut r: Record = serde_json::from_str(&lines[i]).unwrap();
            if r.epoch.unwrap() < n {
                r.seal = Some(stolen.seal(&r.prev, r.seq - 1, r.epoch.unwrap()));
                lines[i] = serde_json::to_string(&r).unwrap();
                let e = l.check(&rechain(&lines, None), None).unwrap_err();
                assert!(e.reason.contains("does not match"), "{e:?}");
                break;
            }
        }
        // Labeled epoch N but dated in an earlier epoch: refused by its date.
        let mut lines = l.lines.clone();
        let i = seal_lines(&lines)[0];
        let mut r: Record = serde_json::from_str(&lines[i]).unwrap();
        r.epoch = Some(n);
        r.seal = Some(stolen.seal(&r.prev, r.seq - 1, n));
        lines[i] = serde_json::to_string(&r).unwrap();
        let e = l.check(&rechain(&lines, None), None).unwrap_err();
        assert!(e.reason.contains("begins only at"), "{e:?}");
    }

    #[test]
    fn a_whole_file_replaced_with_a_later_key_fails() {
        let l = Log::sample("replace");
        // A new log from the genesis, with the original's times, sealed with key_3 throughout.
        let key3 = Key(l.sealer.current_key().0);
        let mut fake = Log::new("replace-fake");
        fake.record(START + 1, "daemon", "egressd started");
        fake.record(START + 20, "decision", "");
        let head = fake.head.clone();
        let seq = fake.seq;
        let t = START + 3 * IV + 30;
        fake.push(Record {
            time: rfc(t),
            kind: "seal".into(),
            reason: Some("stop".into()),
            epoch: Some(3),
            seal: Some(key3.seal(&head, seq, 3)),
            sealed_seq: Some(seq),
            key: Some(l.sealer.id.clone()),
            ..Default::default()
        });
        let e = l.check(&fake.lines, None).unwrap_err();
        assert!(
            e.reason.contains("the first") && e.reason.contains("later epoch"),
            "{e:?}"
        );
        // And a log with no seal at all.
        let e = l.check(&fake.lines[..2], None).unwrap_err();
        assert!(e.reason.contains("no seal records"), "{e:?}");
    }

    #[test]
    fn a_crash_gap_is_a_note_and_a_stop_gap_is_nothing() {
        let mut l = Log::new("crash");
        l.record(START + 1, "daemon", "egressd started");
        l.seal(START + IV + 1, "interval");
        l.record(START + IV + 10, "decision", "");
        l.record(START + 5 * IV, "crash", "");
        l.seal(START + 5 * IV, "start");
        l.record(START + 5 * IV + 1, "daemon", crate::audit::STOP_MESSAGE);
        l.seal(START + 5 * IV + 1, "stop");
        l.record(START + 9 * IV, "daemon", "egressd started");
        l.seal(START + 9 * IV, "start");
        let r = l.check(&l.lines, None).unwrap();
        assert_eq!(r.notes.len(), 1, "{:?}", r.notes);
        assert!(r.notes[0].contains("crashed"));
    }
}
