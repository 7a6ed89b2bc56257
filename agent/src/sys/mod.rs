//! The system calls the agent makes itself, where aya and the standard library have no
//! wrapper: the `bpf()` commands aya doesn't offer, rtnetlink, and glibc's `malloc_trim`. Everything `unsafe` about
//! them stays here, behind safe functions; what the kernel answers is parsed as untrusted.

pub mod bpf;
pub mod memory;
pub mod netlink;
