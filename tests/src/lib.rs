//! Shared pieces of edgeplane's integration tests and benchmarks.

pub mod auth_proxy;
pub mod can;
pub mod capture;
pub mod etcd;
pub mod state_record;
pub mod udp_program;
pub mod xdp_pass;
pub mod xmit_trace;

/// Whether UDP frees what `recvmsg` copied out through `consume_skb`, which latency capture's
/// read stage traces: up to 6.9; later kernels defer most frees to the allocating CPU, without
/// it.
pub fn udp_reads_are_traced() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut v = release
        .trim()
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    (v.next().unwrap_or(0), v.next().unwrap_or(0)) < (6, 10)
}
