//! Entry points for the fuzz targets in `fuzz/` (feature `fuzzing`, off in every other build):
//! the parsers of outside input that are private to their modules, called as the agent calls
//! them. Everything else the targets use is the library's ordinary API.

use std::io;

use crate::{
    NetlinkError,
    can::gateway::{self, GatewayError, Job, JobCounters},
    host::link_events::{self, LinkEvent},
    host::stats::{self as host_stats, HostStatsError, Link},
    registry::Push,
};

/// One read of an RTM_GETLINK dump (host metrics): whether it completes the dump, and every
/// interface in it.
pub fn host_stats_batch(batch: &[u8]) -> Result<(bool, Vec<Link>), HostStatsError> {
    let mut links = Vec::new();
    let done = host_stats::parse_batch(batch, &|_: &str| true, &mut links)?;
    Ok((done, links))
}

/// One read of a can-gw job dump: whether it completes the dump, and every job in it.
pub fn can_gw_dump(batch: &[u8]) -> Result<(bool, Vec<(JobCounters, Job)>), GatewayError> {
    let mut jobs = Vec::new();
    let done = gateway::parse_dump(batch, &mut jobs)?;
    Ok((done, jobs))
}

/// The request that adds `job`, which can-gw's dump repeats (with counters added).
pub fn can_gw_add_request(job: &Job) -> Vec<u8> {
    gateway::job_message(libc::RTM_NEWROUTE, 0, 1, job)
}

/// can-gw's answer to adding or removing a job.
pub fn can_gw_ack(answer: &[u8]) -> io::Result<()> {
    gateway::parse_ack(answer)
}

/// One datagram of link notifications.
pub fn link_events(datagram: &[u8]) -> Result<Vec<LinkEvent>, NetlinkError> {
    link_events::parse(datagram)
}

/// A rule set pushed to the vehicle's `rules` key, as the registry hands it to the agent.
pub fn push(key: &[u8], revision: i64, value: Vec<u8>) -> Push {
    Push::new(key, revision, value)
}
