//! `latency_xdp_flush` on the raw tracepoint `xdp_devmap_xmit`: XDP-redirected frames wait in a
//! per-CPU bulk queue per egress until the end of the driver's poll (or 16 frames) and then go
//! to the egress driver together; this ends the forwarding latency of those frames. A raw
//! tracepoint is attached by name and gets the tracepoint's arguments (`from_dev, to_dev, sent,
//! drops, err` on 5.8 and later), so the agent needs no tracefs, which only root may read.

use aya_ebpf::{helpers::bpf_ktime_get_ns, macros::raw_tracepoint, programs::RawTracePointContext};
use edgeplane_common::latency::XDP_BULK;

use crate::latency::{self, FORWARD_UDP};

#[raw_tracepoint(tracepoint = "xdp_devmap_xmit")]
pub fn latency_xdp_flush(ctx: RawTracePointContext) -> u32 {
    let _ = try_latency_xdp_flush(&ctx);
    0
}

fn try_latency_xdp_flush(ctx: &RawTracePointContext) -> Option<()> {
    let cfg = latency::forwarding()?;
    let to_dev: u64 = ctx.arg(1);
    // The ints arrive in 64-bit slots: the low half is the value.
    let sent = ctx.arg::<u64>(2) as i32;
    let drops = ctx.arg::<u64>(3) as i32;
    let to: i32 = latency::field(to_dev, cfg.offsets.netdev_ifindex)?;
    let p = latency::take_pending(to as u32)?;
    // SAFETY: plain helper call; `p` is this CPU's value.
    unsafe {
        let now = bpf_ktime_get_ns();
        let n = latency::flushed((*p).count, sent, drops);
        for i in 0..XDP_BULK {
            if i >= n {
                break;
            }
            let f = &(*p).frames[i];
            latency::forwarded(cfg, FORWARD_UDP, f.slot, 0, f.hook_ns, now, &f.flow);
        }
        // A full bulk was flushed to make room for the frame noted last: it waits for the
        // next flush, first in line.
        if (*p).count as usize == XDP_BULK + 1 && n == XDP_BULK {
            (*p).frames[0] = (*p).frames[XDP_BULK];
            (*p).count = 1;
        } else {
            (*p).count = 0;
        }
    }
    Some(())
}
