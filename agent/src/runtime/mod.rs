//! The running agent: the run loop, preparing a config (validation, resolution, compiling
//! rules), choosing the engines, the kernel plane, status and the HTTP endpoints.

pub mod dataplane;
pub mod http;
pub mod planes;
pub mod prepare;
pub mod run;
pub mod status;
pub mod supervise;
pub mod views;
