//! CPU time and memory of the machine and of a process, from /proc, for the benchmarks.

use anyhow::Context as _;

/// ns per clock tick of /proc/stat and /proc/<pid>/stat.
fn tick_ns() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    1_000_000_000 / hz.max(1) as u64
}

/// CPU time (ns) all CPUs spent busy (not idle or waiting for I/O) since boot.
pub fn machine_busy_ns() -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let cpu = stat.lines().next().context("empty /proc/stat")?;
    let v: Vec<u64> = cpu
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    // user nice system idle iowait irq softirq steal ...
    let busy = v[0] + v[1] + v[2] + v[5] + v[6] + v.get(7).copied().unwrap_or(0);
    Ok(busy * tick_ns())
}

/// CPU time (ns) a process spent, user and system.
pub fn process_cpu_ns(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start at ") ".
    let rest = stat
        .rsplit_once(") ")
        .context("malformed /proc/<pid>/stat")?
        .1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15, i.e. 11 and 12 after the state field.
    let utime: u64 = f[11].parse()?;
    let stime: u64 = f[12].parse()?;
    Ok((utime + stime) * tick_ns())
}

/// Peak resident set size of a process in bytes (VmHWM).
pub fn peak_rss(pid: u32) -> anyhow::Result<u64> {
    status_bytes(pid, "VmHWM:")
}

/// Resident set size of a process in bytes now (VmRSS).
pub fn rss(pid: u32) -> anyhow::Result<u64> {
    status_bytes(pid, "VmRSS:")
}

/// A `kB` field of /proc/<pid>/status, in bytes.
fn status_bytes(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .with_context(|| format!("no {field} in /proc/{pid}/status"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kb * 1024)
}

/// CPU time (ns) of every thread of a process, from the scheduler's own accounting
/// (/proc/<pid>/task/*/schedstat): nanoseconds, where /proc/<pid>/stat counts 10 ms ticks,
/// too coarse for an idle process.
pub fn threads_cpu_ns(pid: u32) -> anyhow::Result<u64> {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let path = task?.path().join("schedstat");
        // A thread that ended meanwhile has no file any more; its time is gone with it.
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let on_cpu: u64 = text
            .split_whitespace()
            .next()
            .with_context(|| format!("empty {}", path.display()))?
            .parse()?;
        total += on_cpu;
    }
    Ok(total)
}

/// CPU time (ns) of this process, all threads, user and system.
pub fn self_cpu_ns() -> u64 {
    // SAFETY: all-zero is a valid rusage; getrusage fills it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid out pointer.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let ns = |t: libc::timeval| t.tv_sec as u64 * 1_000_000_000 + t.tv_usec as u64 * 1000;
    ns(ru.ru_utime) + ns(ru.ru_stime)
}

/// CPU time (ns) of the ksoftirqd threads: the network receive work the kernel defers to
/// them instead of running it in the context of the task that raised it.
pub fn ksoftirqd_cpu_ns() -> anyhow::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir("/proc")? {
        let name = entry?.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.starts_with("ksoftirqd/") {
            total += process_cpu_ns(pid).unwrap_or(0);
        }
    }
    Ok(total)
}
