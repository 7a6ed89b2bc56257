//! `latency_xdp_flush` on the `xdp:xdp_devmap_xmit` tracepoint: XDP-redirected frames wait in a
//! per-CPU bulk queue per egress until the end of the driver's poll (or 16 frames) and then go
//! to the egress driver together; this ends the forwarding latency of those frames. The
//! tracepoint's field offsets come from its format file, read by the agent.

use aya_ebpf::{helpers::bpf_ktime_get_ns, macros::tracepoint, programs::TracePointContext};
use edgeplane_common::latency::XDP_BULK;

use crate::latency::{self, FORWARD_UDP};

#[tracepoint]
pub fn latency_xdp_flush(ctx: TracePointContext) -> u32 {
    let _ = try_latency_xdp_flush(&ctx);
    0
}

fn try_latency_xdp_flush(ctx: &TracePointContext) -> Option<()> {
    let cfg = latency::forwarding()?;
    let o = &cfg.offsets;
    // SAFETY: offsets of int fields in this tracepoint's record, from its format file.
    let (to, sent, drops) = unsafe {
        (
            ctx.read_at::<i32>(o.devmap_to_ifindex as usize).ok()?,
            ctx.read_at::<i32>(o.devmap_sent as usize).ok()?,
            ctx.read_at::<i32>(o.devmap_drops as usize).ok()?,
        )
    };
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
