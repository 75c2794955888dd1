//! Medians and spread across rounds, percentiles, and the process and BPF counters the parts read.

use std::{
    fs,
    os::fd::{AsRawFd as _, FromRawFd as _},
    time::Instant,
};

/// Median and range of one quantity across rounds.
#[derive(Clone, Copy, Debug)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

impl Spread {
    pub fn of(xs: &[f64]) -> Option<Spread> {
        let mut v: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(|a, b| a.total_cmp(b));
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Spread {
            median,
            min: v[0],
            max: v[n - 1],
            n,
        })
    }
}

/// p-th percentile (0..=100), nearest rank, of unsorted samples.
pub fn percentile(xs: &[f64], p: f64) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// CPU time (s) summed over a process's threads, resident memory (bytes) and context switches.
#[derive(Clone, Copy, Debug)]
pub struct ProcSample {
    pub at: Instant,
    pub cpu_s: f64,
    pub rss: u64,
    pub switches: u64,
}

pub fn sample(pid: u32) -> ProcSample {
    let at = Instant::now();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields after the comm: state is [0]; utime is field 14 of stat, [11] here; stime [12].
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|i| f.get(*i)?.parse::<f64>().ok())
        .sum();
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024;
    let mut switches = 0;
    for t in fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let s = fs::read_to_string(t.path().join("status")).unwrap_or_default();
        for l in s.lines() {
            if let Some(v) = l
                .strip_prefix("voluntary_ctxt_switches:")
                .or_else(|| l.strip_prefix("nonvoluntary_ctxt_switches:"))
            {
                switches += v.trim().parse::<u64>().unwrap_or(0);
            }
        }
    }
    ProcSample {
        at,
        cpu_s: ticks / hz,
        rss,
        switches,
    }
}

/// CPU use between two samples, as a fraction of one core.
pub fn cpu_share(a: &ProcSample, b: &ProcSample) -> f64 {
    let wall = (b.at - a.at).as_secs_f64();
    (b.cpu_s - a.cpu_s) / wall
}

/// bpf(2) with a union bpf_attr of 128 bytes, zeroed but for the fields a command reads; `what`
/// names the call in the error.
pub fn bpf(cmd: libc::c_long, attr: &mut [u64; 16], what: &str) -> anyhow::Result<i32> {
    // SAFETY: bpf(2) with a union bpf_attr big enough for the commands used here; any pointers in
    // it point at buffers that outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of_val(attr),
        )
    };
    if rc < 0 {
        anyhow::bail!("{what}: {}", std::io::Error::last_os_error());
    }
    Ok(rc as i32)
}

/// `run_time_ns` and `run_cnt` of a BPF program (kernel.bpf_stats_enabled must be on for them to
/// move), read with BPF_PROG_GET_FD_BY_ID and BPF_OBJ_GET_INFO_BY_FD.
pub fn prog_stats(id: u32) -> anyhow::Result<(u64, u64)> {
    const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    let mut attr = [0u64; 16];
    attr[0] = u64::from(id);
    let fd = bpf(
        BPF_PROG_GET_FD_BY_ID,
        &mut attr,
        &format!("BPF_PROG_GET_FD_BY_ID {id}"),
    )?;
    // SAFETY: a descriptor bpf(2) just returned, owned by nobody else.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    // struct bpf_prog_info up to recursion_misses: run_time_ns at byte 192, run_cnt at 200.
    let mut info = [0u64; 28];
    let mut attr = [0u64; 16];
    // info.bpf_fd (u32), info_len (u32), info (u64 pointer)
    attr[0] = (fd.as_raw_fd() as u64) | ((std::mem::size_of_val(&info) as u64) << 32);
    attr[1] = info.as_mut_ptr() as u64;
    bpf(
        BPF_OBJ_GET_INFO_BY_FD,
        &mut attr,
        &format!("BPF_OBJ_GET_INFO_BY_FD {id}"),
    )?;
    Ok((info[24], info[25]))
}

/// Wall clock (ns since the epoch) of an RFC 3339 UTC time as the audit log writes it
/// (`2026-11-22T15:04:56.364998693Z`).
pub fn rfc3339_ns(s: &str) -> Option<i128> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let d: Vec<i64> = date
        .split('-')
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let t: Vec<i64> = hms
        .split(':')
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    let (y, m, day) = (d[0], d[1], d[2]);
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    let mut frac_ns: i128 = frac.parse().ok()?;
    for _ in frac.len()..9 {
        frac_ns *= 10;
    }
    Some(
        (days as i128 * 86400 + t[0] as i128 * 3600 + t[1] as i128 * 60 + t[2] as i128)
            * 1_000_000_000
            + frac_ns,
    )
}

pub fn now_ns() -> i128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0)
}

pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid timespec pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_and_percentiles() {
        let s = Spread::of(&[3.0, 1.0, 2.0, 10.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (2.5, 1.0, 10.0, 4));
        let xs: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&xs, 50.0), 50.0);
        assert_eq!(percentile(&xs, 99.0), 99.0);
    }

    #[test]
    fn audit_times() {
        assert_eq!(rfc3339_ns("1970-01-01T00:00:01.5Z"), Some(1_500_000_000));
        assert_eq!(
            rfc3339_ns("2026-11-22T15:04:56.364998693Z"),
            Some(1_795_359_896_364_998_693)
        );
    }
}
