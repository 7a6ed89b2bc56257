//! Shared pieces of edgeplane's integration tests and benchmarks.

pub mod can;
pub mod capture;
pub mod etcd;
pub mod state_record;
pub mod udp_program;
pub mod xdp_pass;
pub mod xmit_trace;
