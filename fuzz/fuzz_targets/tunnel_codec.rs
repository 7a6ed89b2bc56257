//! The CAN tunnel's datagrams (cannelloni v2) from the network: every datagram decodes to frames
//! or a rejection, decoded frames encode back to the same bytes, and frames the encoder packs
//! decode to what the wire carries of them.

#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use edgeplane::can::tunnel::codec::{DecodeError, Encoder, HEADER_LEN, TunnelFrame, decode};
use edgeplane_common::can::{CAN_MAX_DLEN, CAN_RTR_FLAG, CANFD_MAX_DLEN, CanFrame};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(frames) = decode(data, u16::MAX) {
        let mut e = Encoder::new(data.len());
        for f in &frames {
            assert!(e.push(f), "a decoded frame did not fit its own datagram");
        }
        assert_eq!(
            e.finish(data[2]),
            data,
            "decode then encode changed the datagram"
        );
    }
    let _ = encode_then_decode(&mut Unstructured::new(data));
});

/// Packs arbitrary frames into a datagram of an arbitrary maximum size and decodes it.
fn encode_then_decode(u: &mut Unstructured<'_>) -> arbitrary::Result<()> {
    // The sizes config validation allows (can.max_datagram).
    let max = u.int_in_range(75..=65507)?;
    let seq = u8::arbitrary(u)?;
    let mut e = Encoder::new(max);
    let mut pushed = Vec::new();
    while !u.is_empty() {
        let f = TunnelFrame {
            frame: edgeplane_fuzz::frame(u)?,
            fd: bool::arbitrary(u)?,
        };
        if !e.push(&f) {
            break;
        }
        pushed.push(on_the_wire(f));
    }
    let d = e.finish(seq);
    assert!(
        d.len() <= max.max(HEADER_LEN),
        "{} bytes over {max}",
        d.len()
    );
    // Frames no bus carries as they are (a padded CAN FD length, unknown flags, an 11-bit ID
    // over 0x7FF, a remote CAN FD frame) are the receiver's to reject; the kernel hands the
    // sender none of them.
    match decode(&d, u16::MAX) {
        Ok(frames) => assert_eq!(frames, pushed, "encode then decode changed the frames"),
        Err(
            DecodeError::BadLength(_)
            | DecodeError::BadFlags(_)
            | DecodeError::BadId(_)
            | DecodeError::FdRemote,
        ) => {}
        Err(e) => panic!("a datagram the encoder built was rejected: {e}"),
    }
    Ok(())
}

/// What of a frame the format carries: the length clamped to its kind's maximum, flags for
/// CAN FD only, data up to the length and none for remote frames.
fn on_the_wire(f: TunnelFrame) -> TunnelFrame {
    let len = f
        .frame
        .len
        .min(if f.fd { CANFD_MAX_DLEN } else { CAN_MAX_DLEN });
    let mut frame = CanFrame {
        can_id: f.frame.can_id,
        len,
        flags: if f.fd { f.frame.flags } else { 0 },
        ..CanFrame::default()
    };
    if f.frame.can_id & CAN_RTR_FLAG == 0 {
        let n = usize::from(len);
        frame.data[..n].copy_from_slice(&f.frame.data[..n]);
    }
    TunnelFrame { frame, fd: f.fd }
}
