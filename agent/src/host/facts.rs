//! What checking and compiling a config asks of the machine: interfaces, addresses and files
//! (tunnel peers' names are resolved apart, see [`crate::host::resolve`]). One trait, so unit tests and fuzz targets can answer instead of the host.

use std::{io, net::IpAddr, path::Path};

use edgeplane_common::can::CANFD_MTU;

use super::netdev;

pub trait Host {
    /// The interface's index, `None` when there is no such interface.
    fn ifindex(&self, iface: &str) -> Option<u32>;
    /// Whether the interface is a CAN netdev.
    fn is_can(&self, iface: &str) -> bool;
    /// Whether the interface carries CAN FD (MTU 72).
    fn is_can_fd(&self, iface: &str) -> bool;
    /// Binds a UDP socket to `ip` and drops it: fails unless `ip` is an address of this host.
    fn bind_udp(&self, ip: IpAddr) -> io::Result<()>;
    /// Whether a file the config names is there (its metadata can be read).
    fn file_exists(&self, path: &Path) -> io::Result<()>;
}

/// The machine the agent runs on.
pub struct ThisHost;

impl Host for ThisHost {
    fn ifindex(&self, iface: &str) -> Option<u32> {
        netdev::index(iface)
    }
    fn is_can(&self, iface: &str) -> bool {
        netdev::is_can(iface)
    }
    fn is_can_fd(&self, iface: &str) -> bool {
        netdev::mtu(iface).is_ok_and(|m| m == CANFD_MTU as u32)
    }
    fn bind_udp(&self, ip: IpAddr) -> io::Result<()> {
        std::net::UdpSocket::bind((ip, 0)).map(drop)
    }
    fn file_exists(&self, path: &Path) -> io::Result<()> {
        std::fs::metadata(path).map(drop)
    }
}

/// A host made up for tests and fuzz targets: the interfaces listed, the addresses listed,
/// every file there.
#[cfg(any(test, feature = "fuzzing"))]
pub struct FakeHost {
    /// Name, index and kind of each interface.
    pub interfaces: Vec<(&'static str, u32, FakeKind)>,
    pub addresses: Vec<IpAddr>,
}

#[cfg(any(test, feature = "fuzzing"))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FakeKind {
    Ethernet,
    Can,
    CanFd,
}

#[cfg(any(test, feature = "fuzzing"))]
impl FakeHost {
    fn interface(&self, iface: &str) -> Option<(u32, FakeKind)> {
        self.interfaces
            .iter()
            .find(|(name, ..)| *name == iface)
            .map(|&(_, index, kind)| (index, kind))
    }
}

#[cfg(any(test, feature = "fuzzing"))]
impl Host for FakeHost {
    fn ifindex(&self, iface: &str) -> Option<u32> {
        self.interface(iface).map(|(index, _)| index)
    }
    fn is_can(&self, iface: &str) -> bool {
        matches!(
            self.interface(iface),
            Some((_, FakeKind::Can | FakeKind::CanFd))
        )
    }
    fn is_can_fd(&self, iface: &str) -> bool {
        matches!(self.interface(iface), Some((_, FakeKind::CanFd)))
    }
    fn bind_udp(&self, ip: IpAddr) -> io::Result<()> {
        if self.addresses.contains(&ip) {
            Ok(())
        } else {
            Err(io::Error::from(io::ErrorKind::AddrNotAvailable))
        }
    }
    fn file_exists(&self, _: &Path) -> io::Result<()> {
        Ok(())
    }
}
