//! Types shared by the eBPF programs and the agent: one definition, both sides.
//!
//! Every type here is `#[repr(C)]` with explicit padding and a compile-time size check, so the
//! kernel and userspace agree on the layout byte for byte.
#![no_std]

pub mod can;
pub mod hist;
pub mod latency;
pub mod udp_forward;

/// Passes every frame; see `xdp_pass.rs`.
pub const XDP_PASS_PROGRAM: &str = "xdp_pass";

/// Asserts a type's size at compile time. Both sides must agree on it.
#[macro_export]
macro_rules! assert_size {
    ($t:ty, $n:expr) => {
        const _: () = assert!(core::mem::size_of::<$t>() == $n);
    };
}

/// Marks types as plain old data for aya's map APIs (userspace only).
#[macro_export]
macro_rules! pod {
    ($($t:ty),+ $(,)?) => {
        $(
            #[cfg(feature = "user")]
            // SAFETY: repr(C), explicit padding, no pointers: any bit pattern is valid.
            unsafe impl aya::Pod for $t {}
        )+
    };
}
