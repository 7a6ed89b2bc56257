//! What the fuzz targets share: the made-up host configs are checked against, and made-up
//! CAN frames.

use arbitrary::{Arbitrary, Unstructured};
use edgeplane::host::{FakeHost, FakeKind};
use edgeplane_common::can::CanFrame;

/// A frame with every field and data byte made up (the reserved bytes stay 0).
pub fn frame(u: &mut Unstructured<'_>) -> arbitrary::Result<CanFrame> {
    let mut f = CanFrame {
        can_id: u32::arbitrary(u)?,
        len: u8::arbitrary(u)?,
        flags: u8::arbitrary(u)?,
        ..CanFrame::default()
    };
    u.fill_buffer(&mut f.data)?;
    Ok(f)
}

/// Interfaces and addresses the seed configs (configs/edgeplane.toml, the tests') name, so
/// valid configs get past the host checks into rule compilation; other names don't exist.
pub fn host() -> FakeHost {
    FakeHost {
        interfaces: vec![
            ("lo", 1, FakeKind::Ethernet),
            ("eth0", 2, FakeKind::Ethernet),
            ("eth1", 3, FakeKind::Ethernet),
            ("eth2", 4, FakeKind::Ethernet),
            ("can0", 5, FakeKind::Can),
            ("can1", 6, FakeKind::CanFd),
            ("vcan0", 7, FakeKind::Can),
        ],
        addresses: ["127.0.0.1", "::1", "192.0.2.1", "2001:db8:1::1"]
            .iter()
            .map(|a| a.parse().expect("a literal address"))
            .collect(),
    }
}
