//! What a receiver lets onto its bus of the frames an accepted datagram carries: frame kinds,
//! IDs (`accept`), and a rate (a token bucket of `max_burst` frames filling at
//! `max_frame_rate` per second).

use std::time::Instant;

use edgeplane_common::can::{CAN_ERR_FLAG, CAN_RTR_FLAG};

use super::{codec::TunnelFrame, metrics::DropReason};
use crate::config::CanReceive;

pub struct FramePolicy {
    config: CanReceive,
    tokens: f64,
    filled: Instant,
}

impl FramePolicy {
    pub fn new(config: CanReceive, now: Instant) -> Self {
        Self {
            tokens: f64::from(config.max_burst),
            config,
            filled: now,
        }
    }

    /// Whether `f` may be written now; a frame that may takes a token. Frames the rules
    /// refuse take none, so a peer's unwanted frames can't starve its wanted ones.
    pub fn admit(&mut self, f: &TunnelFrame, now: Instant) -> Result<(), DropReason> {
        let c = &self.config;
        let id = f.frame.can_id;
        if id & CAN_ERR_FLAG != 0 && !c.accept_error_frames {
            return Err(DropReason::ErrorFrame);
        }
        if id & CAN_RTR_FLAG != 0 && !c.accept_remote_frames {
            return Err(DropReason::RemoteFrame);
        }
        if f.fd && !c.accept_fd_frames {
            return Err(DropReason::FdFrame);
        }
        if !c.accepts_id(id) {
            return Err(DropReason::Filter);
        }
        let elapsed = now.saturating_duration_since(self.filled).as_secs_f64();
        self.filled = now;
        self.tokens =
            (self.tokens + elapsed * f64::from(c.max_frame_rate)).min(f64::from(c.max_burst));
        if self.tokens < 1.0 {
            return Err(DropReason::RateLimit);
        }
        self.tokens -= 1.0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use edgeplane_common::can::{CAN_EFF_FLAG, CanFrame};

    use super::*;

    fn receiver(extra: &str) -> CanReceive {
        let text = format!(
            "[[can.receive]]\nname = \"r\"\nlisten = \"0.0.0.0:1\"\niface = \"can0\"\npeer = \"any\"\n{extra}"
        );
        crate::config::Config::parse(&text, std::path::Path::new("t"))
            .unwrap()
            .can
            .receive
            .remove(0)
    }

    fn frame(can_id: u32, fd: bool) -> TunnelFrame {
        TunnelFrame {
            frame: CanFrame {
                can_id,
                ..CanFrame::default()
            },
            fd,
        }
    }

    #[test]
    fn kinds_and_ids_are_checked_before_the_rate() {
        let t = Instant::now();
        let mut p = FramePolicy::new(
            receiver(
                "accept = [\"100:80000700\"]\naccept_remote_frames = false\naccept_fd_frames = false\nmax_burst = 1\nmax_frame_rate = 1",
            ),
            t,
        );
        assert_eq!(
            p.admit(&frame(0x100 | CAN_ERR_FLAG, false), t),
            Err(DropReason::ErrorFrame)
        );
        assert_eq!(
            p.admit(&frame(0x100 | CAN_RTR_FLAG, false), t),
            Err(DropReason::RemoteFrame)
        );
        assert_eq!(p.admit(&frame(0x100, true), t), Err(DropReason::FdFrame));
        assert_eq!(p.admit(&frame(0x200, false), t), Err(DropReason::Filter));
        assert_eq!(
            p.admit(&frame(0x100 | CAN_EFF_FLAG, false), t),
            Err(DropReason::Filter)
        );
        assert_eq!(p.admit(&frame(0x1ff, false), t), Ok(()));
        assert_eq!(p.admit(&frame(0x1ff, false), t), Err(DropReason::RateLimit));

        let mut p = FramePolicy::new(receiver("accept_error_frames = true"), t);
        assert_eq!(p.admit(&frame(0x04 | CAN_ERR_FLAG, false), t), Ok(()));
        assert_eq!(p.admit(&frame(0x7ff | CAN_RTR_FLAG, false), t), Ok(()));
    }

    #[test]
    fn the_rate_allows_a_burst_then_refills() {
        let t = Instant::now();
        let mut p = FramePolicy::new(receiver("max_burst = 20\nmax_frame_rate = 100"), t);
        let admitted = (0..50)
            .filter(|_| p.admit(&frame(1, false), t).is_ok())
            .count();
        assert_eq!(admitted, 20);
        let later = t + Duration::from_millis(100); // 10 tokens
        let admitted = (0..50)
            .filter(|_| p.admit(&frame(1, false), later).is_ok())
            .count();
        assert_eq!(admitted, 10);
        let much_later = later + Duration::from_secs(60); // never over the burst
        let admitted = (0..50)
            .filter(|_| p.admit(&frame(1, false), much_later).is_ok())
            .count();
        assert_eq!(admitted, 20);
    }
}
