//! The eBPF side as the agent holds it: loading the object, its maps, attaching programs to
//! hooks, pins in bpffs, rule slots and the state record that lets a restarted agent take over
//! what the kernel runs. Feature folders (udp_forward, can, latency) fill maps through here.

pub mod attach;
pub mod link_detach;
pub mod loader;
pub(crate) mod maps;
pub mod pinned;
pub mod pins;
pub mod slots;
pub mod state;
