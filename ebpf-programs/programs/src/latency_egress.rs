//! `latency_egress` at tc (clsact egress) of every interface forwarded frames leave by: ends the
//! forwarding latency of the frame the ingress program on this CPU just handed over. The
//! kernel sends a tc-redirected skb, and a can-gw clone, to the egress device synchronously on
//! the same CPU, so the handoff is this frame's (the length, or the egress, must match too).

use aya_ebpf::{
    bindings::TC_ACT_UNSPEC, helpers::bpf_ktime_get_ns, macros::classifier, programs::TcContext,
};
use edgeplane_common::latency::{HANDOFF_CAN, HANDOFF_NONE, HANDOFF_ROUTES, HANDOFF_UDP};

use crate::latency::{self, FORWARD_CAN, FORWARD_UDP, LATENCY_HANDOFF};

#[classifier]
pub fn latency_egress(ctx: TcContext) -> i32 {
    let _ = try_latency_egress(&ctx);
    // Never a verdict of its own: the frame goes on as if nothing ran.
    TC_ACT_UNSPEC
}

fn try_latency_egress(ctx: &TcContext) -> Option<()> {
    let h = LATENCY_HANDOFF.get_ptr_mut(0)?;
    // SAFETY: per-CPU value written by this CPU's ingress program for this frame.
    unsafe {
        if (*h).kind == HANDOFF_NONE {
            return None;
        }
        let cfg = latency::forwarding()?;
        let ifindex = (*ctx.skb.skb).ifindex;
        let rx_ns = if (*h).start_ns < (*h).hook_ns {
            (*h).start_ns
        } else {
            0
        };
        match (*h).kind {
            HANDOFF_UDP => {
                if (*h).egress[0] != ifindex || (*h).len != ctx.len() {
                    return None;
                }
                (*h).kind = HANDOFF_NONE;
                let now = bpf_ktime_get_ns();
                latency::forwarded(
                    cfg,
                    FORWARD_UDP,
                    (*h).slot[0],
                    rx_ns,
                    (*h).hook_ns,
                    now,
                    &(*h).flow,
                );
            }
            HANDOFF_CAN => {
                // can-gw sends one clone per route; each route's egress takes its own.
                for i in 0..HANDOFF_ROUTES {
                    if i >= (*h).routes as usize {
                        break;
                    }
                    if (*h).egress[i] == ifindex {
                        (*h).egress[i] = 0;
                        let now = bpf_ktime_get_ns();
                        latency::forwarded(
                            cfg,
                            FORWARD_CAN,
                            (*h).slot[i],
                            rx_ns,
                            (*h).hook_ns,
                            now,
                            &(*h).flow,
                        );
                        break;
                    }
                }
            }
            _ => {}
        }
    }
    Some(())
}
