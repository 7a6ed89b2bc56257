//! One CPU for the forwarder, the other for the traffic: the UDP suite measures what one core
//! forwards, not what the machine does.
//!
//! On veth the kernel forwards in the softirq of whoever raised it: the sender's, so the
//! forwarding stage would share the sender's CPU. With threaded NAPI each veth queue is polled
//! by a kthread of its own (`napi/<dev>-<id>`), which can be pinned like any thread. A veth has
//! NAPI only with XDP attached or GRO on, and its sender hands a datagram to that NAPI (rather
//! than to the local CPU's backlog) only when the sending device has no TSO (see
//! `veth_skb_is_eligible_for_gro`): so GRO goes on at g0 and r0, and TSO off at s0 and g1.
//!
//! Placement: the gateway's ingress poll (`napi/g0-*`, where XDP, tc, the kernel's forwarding
//! and nftables, and the userspace engines' socket receive run) and the forwarding process on
//! the forwarding CPU; the sender, the receiver's poll (`napi/r0-*`) and the receiver on the
//! traffic CPU.

use anyhow::{Context as _, bail};
use edgeplane_testbed::netns::{Line, Netns};

/// Which CPU forwards and which sends and receives.
#[derive(Debug, Clone, Copy)]
pub struct Cpus {
    pub forwarding: usize,
    pub traffic: usize,
}

impl Cpus {
    /// The last CPU this process may run on forwards, the first sends and receives.
    pub fn pick() -> anyhow::Result<Self> {
        let allowed = allowed_cpus()?;
        if allowed.len() < 2 {
            bail!(
                "the UDP suite needs 2 CPUs (one forwards, one sends and receives); this process may run on {allowed:?}"
            );
        }
        Ok(Self {
            forwarding: allowed[allowed.len() - 1],
            traffic: allowed[0],
        })
    }
}

fn allowed_cpus() -> anyhow::Result<Vec<usize>> {
    // SAFETY: all-zero is a valid cpu_set_t; sched_getaffinity fills it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: a valid out pointer of the size given.
    if unsafe { libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set) } != 0 {
        bail!("sched_getaffinity: {}", std::io::Error::last_os_error());
    }
    Ok((0..libc::CPU_SETSIZE as usize)
        // SAFETY: `cpu` is below CPU_SETSIZE.
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect())
}

/// Pins thread `tid` (0: the calling one) to `cpu`.
pub fn pin(tid: i32, cpu: usize) -> anyhow::Result<()> {
    // SAFETY: all-zero is a valid cpu_set_t.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` is a CPU number below CPU_SETSIZE (from sched_getaffinity).
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: a valid cpu_set_t of the size given.
    if unsafe { libc::sched_setaffinity(tid, size_of::<libc::cpu_set_t>(), &set) } != 0 {
        bail!(
            "pinning thread {tid} to CPU {cpu}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Nice value of the benchmark's threads at saturation (sender, NAPI kthreads, forwarder):
/// pinning does not keep other work off a CPU, and on this shared machine the forwarding
/// kthread got a quarter of its CPU at nice 0. At -20 its scheduler weight is 87 times a
/// nice-0 task's (or session's, see [`set_autogroup_nice`]); other work still runs (a
/// real-time policy would starve it).
pub const SATURATION_NICE: i32 = -20;

/// Sets the nice value of this process's autogroup (/proc/self/autogroup): with autogroups on,
/// the scheduler first shares a CPU between sessions, and a thread's nice value counts only
/// inside its own. The agent, started by this process, is in the same autogroup; kthreads are
/// in none. Without autogroups there is no file and nothing to do.
pub fn set_autogroup_nice(nice: i32) {
    let _ = std::fs::write("/proc/self/autogroup", nice.to_string());
}

/// Sets the nice value of thread `tid` (0: the calling one); a failure changes nothing.
pub fn set_nice(tid: i32, nice: i32) {
    // SAFETY: setpriority has no memory-safety preconditions; on Linux PRIO_PROCESS names a
    // thread.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) };
}

/// Sets the nice value of every thread of process `pid`.
pub fn set_process_nice(pid: u32, nice: i32) {
    for tid in tasks(pid).unwrap_or_default() {
        set_nice(tid, nice);
    }
}

/// Pins every thread of process `pid` to `cpu` (threads it starts later inherit it).
pub fn pin_process(pid: u32, cpu: usize) -> anyhow::Result<()> {
    for tid in tasks(pid)? {
        pin(tid, cpu)?;
    }
    Ok(())
}

fn tasks(pid: u32) -> anyhow::Result<Vec<i32>> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/task"))
        .with_context(|| format!("listing the threads of {pid}"))?
        .filter_map(|t| t.ok()?.file_name().to_str()?.parse().ok())
        .collect())
}

/// The CPU a task last ran on (field 39 of /proc/<pid>/stat).
pub fn last_cpu(pid: i32) -> Option<usize> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ")?
        .1
        .split_whitespace()
        .nth(36)?
        .parse()
        .ok()
}

/// The CPUs the threads of process `pid` last ran on, e.g. `1` or `0,1`.
pub fn last_cpus(pid: u32) -> String {
    let mut cpus: Vec<usize> = tasks(pid)
        .unwrap_or_default()
        .into_iter()
        .filter_map(last_cpu)
        .collect();
    cpus.sort_unstable();
    cpus.dedup();
    cpus.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// The NAPI kthreads of one veth, found as the ones that appeared when threaded NAPI was
/// turned on (their names, `napi/<dev>-<id>`, are not unique across namespaces).
#[derive(Debug)]
pub struct NapiThreads {
    pub dev: String,
    pub pids: Vec<i32>,
}

/// Threaded NAPI on the line's veths, each poll kthread pinned where it belongs.
pub struct Placement {
    /// `napi/g0-*`: the gateway's ingress, on the forwarding CPU.
    pub gateway_in: NapiThreads,
    /// `napi/r0-*`: the receiver's ingress, on the traffic CPU.
    pub receiver_in: NapiThreads,
}

/// Prepares the veths for NAPI on every hop (for every engine alike): full checksums and no
/// TSO from the sender (XDP needs the former, NAPI the latter), no TSO out of the gateway,
/// GRO (hence NAPI) on the gateway's and the receiver's ingress.
pub fn prepare_veths(line: &Line) -> anyhow::Result<()> {
    line.sender.exec(&["ethtool", "-K", "s0", "tx", "off"])?;
    line.gateway.exec(&["ethtool", "-K", "g1", "tso", "off"])?;
    line.gateway.exec(&["ethtool", "-K", "g0", "gro", "on"])?;
    line.receiver.exec(&["ethtool", "-K", "r0", "gro", "on"])?;
    Ok(())
}

/// Turns threaded NAPI on at g0 and r0 and pins their kthreads. Call after the forwarder
/// started: attaching XDP or toggling GRO may re-create a veth's NAPI and its kthread.
pub fn place(line: &Line, cpus: Cpus) -> anyhow::Result<Placement> {
    let gateway_in = threaded(&line.gateway, "g0")?;
    let receiver_in = threaded(&line.receiver, "r0")?;
    for &pid in &gateway_in.pids {
        pin(pid, cpus.forwarding)?;
    }
    for &pid in &receiver_in.pids {
        pin(pid, cpus.traffic)?;
    }
    Ok(Placement {
        gateway_in,
        receiver_in,
    })
}

fn threaded(ns: &Netns, dev: &str) -> anyhow::Result<NapiThreads> {
    let before = napi_kthreads(dev);
    // /sys shows the namespace of whoever mounted it: `ip netns exec` mounts the netns's own.
    ns.exec(&[
        "sh",
        "-c",
        &format!("echo 1 > /sys/class/net/{dev}/threaded"),
    ])
    .with_context(|| format!("threaded NAPI on {dev} (it needs NAPI: GRO or XDP on)"))?;
    let pids: Vec<i32> = napi_kthreads(dev)
        .into_iter()
        .filter(|p| !before.contains(p))
        .collect();
    if pids.is_empty() {
        bail!("no napi/{dev}-* kthread appeared after turning threaded NAPI on");
    }
    Ok(NapiThreads {
        dev: dev.into(),
        pids,
    })
}

fn napi_kthreads(dev: &str) -> Vec<i32> {
    let prefix = format!("napi/{dev}-");
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim_end().starts_with(&prefix))
        })
        .collect()
}

impl NapiThreads {
    /// CPU time (scheduler ns) of these kthreads.
    pub fn cpu_ns(&self) -> u64 {
        self.pids.iter().map(|&p| task_cpu_ns(p)).sum()
    }

    pub fn set_policy(&self, policy: i32, priority: i32) {
        for &p in &self.pids {
            crate::traffic::set_policy(p, policy, priority);
        }
    }

    pub fn set_nice(&self, nice: i32) {
        for &p in &self.pids {
            set_nice(p, nice);
        }
    }

    /// Where they ran last, e.g. `napi/g0 on CPU 1`.
    pub fn describe(&self) -> String {
        let cpus: Vec<String> = self
            .pids
            .iter()
            .map(|&p| last_cpu(p).map_or("?".into(), |c| c.to_string()))
            .collect();
        format!("napi/{} on CPU {}", self.dev, cpus.join(","))
    }
}

/// Scheduler CPU time (ns) of one task, thread or kthread.
fn task_cpu_ns(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// One CPU's time from /proc/stat, in ns.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuTime {
    pub user: u64,
    pub system: u64,
    pub softirq: u64,
    /// irq and steal.
    pub other: u64,
}

impl CpuTime {
    pub fn busy(&self) -> u64 {
        self.user + self.system + self.softirq + self.other
    }

    pub fn since(&self, earlier: &Self) -> Self {
        Self {
            user: self.user - earlier.user,
            system: self.system - earlier.system,
            softirq: self.softirq - earlier.softirq,
            other: self.other - earlier.other,
        }
    }
}

/// `cpu`'s time so far.
pub fn cpu_time(cpu: usize) -> anyhow::Result<CpuTime> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let name = format!("cpu{cpu}");
    let line = stat
        .lines()
        .find(|l| l.split_whitespace().next() == Some(&name))
        .with_context(|| format!("no {name} in /proc/stat"))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    // SAFETY: sysconf has no preconditions.
    let tick = 1_000_000_000 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    // user nice system idle iowait irq softirq steal
    let at = |i: usize| v.get(i).copied().unwrap_or(0) * tick;
    Ok(CpuTime {
        user: at(0) + at(1),
        system: at(2),
        softirq: at(6),
        other: at(5) + at(7),
    })
}
