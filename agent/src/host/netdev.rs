//! Network interfaces: names, indexes, drivers, forwarding sysctls.

use std::{ffi::CString, io, path::Path};

use crate::config::Family;

/// Linux interface names: 1 to 15 bytes, no `/`, whitespace or NUL (see dev_valid_name()).
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 15 {
        return Err(format!("interface name `{name}` must be 1 to 15 bytes"));
    }
    if name == "."
        || name == ".."
        || name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace())
    {
        return Err(format!("`{name}` is not a valid interface name"));
    }
    Ok(())
}

/// The interface's index, or `None` when there is no such interface.
pub fn index(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    // SAFETY: `c` is a valid NUL-terminated string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (idx != 0).then_some(idx)
}

/// The name of the interface with index `ifindex`, or `None` when there is none.
/// Every interface of this network namespace: (ifindex, name).
pub fn all() -> Vec<(u32, String)> {
    let mut out = Vec::new();
    // SAFETY: if_nameindex returns an array ended by a zero entry, or null; freed below.
    let list = unsafe { libc::if_nameindex() };
    if list.is_null() {
        return out;
    }
    let mut p = list;
    // SAFETY: p walks the array up to its zero entry; names are NUL-terminated.
    unsafe {
        while (*p).if_index != 0 {
            let name = std::ffi::CStr::from_ptr((*p).if_name)
                .to_string_lossy()
                .into_owned();
            out.push(((*p).if_index, name));
            p = p.add(1);
        }
        libc::if_freenameindex(list);
    }
    out
}

pub fn name(ifindex: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `buf` has the IF_NAMESIZE bytes if_indextoname writes at most.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: if_indextoname wrote a NUL-terminated name into `buf`.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

/// The interface's driver name as ethtool reports it (`veth`, `virtio_net`, `ixgbe`, ...).
pub fn driver(name: &str) -> io::Result<String> {
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        version: [u8; 32],
        fw_version: [u8; 32],
        bus_info: [u8; 32],
        erom_version: [u8; 32],
        reserved2: [u8; 12],
        n_priv_flags: u32,
        n_stats: u32,
        testinfo_len: u32,
        eedump_len: u32,
        regdump_len: u32,
    }
    const ETHTOOL_GDRVINFO: u32 = 0x3;
    const SIOCETHTOOL: libc::c_ulong = 0x8946;

    if name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "interface name too long",
        ));
    }
    // SAFETY: all-zero is valid for both plain-data structs.
    let mut info: DrvInfo = unsafe { std::mem::zeroed() };
    info.cmd = ETHTOOL_GDRVINFO;
    // SAFETY: as above.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    req.ifr_ifru.ifru_data = (&raw mut info).cast();
    // SAFETY: plain socket; the ioctl writes only into `info`, which outlives the call.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let rc = libc::ioctl(fd, SIOCETHTOOL, &mut req);
        let err = io::Error::last_os_error();
        libc::close(fd);
        if rc < 0 {
            return Err(err);
        }
    }
    let len = info
        .driver
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(info.driver.len());
    Ok(String::from_utf8_lossy(&info.driver[..len]).into_owned())
}

/// Whether the interface is a veth: XDP redirects into one reach its peer only when the peer
/// runs XDP too (or has GRO on, 5.13+), and local senders leave partial checksums.
pub fn is_veth(name: &str) -> bool {
    driver(name).is_ok_and(|d| d == "veth")
}

/// Whether the interface is a CAN netdev (ARPHRD_CAN).
pub fn is_can(name: &str) -> bool {
    const ARPHRD_CAN: &str = "280";
    std::fs::read_to_string(format!("/sys/class/net/{name}/type"))
        .is_ok_and(|t| t.trim() == ARPHRD_CAN)
}

/// The interface's MTU; a CAN netdev's is 16 (classic CAN) or 72 (CAN FD).
pub fn mtu(name: &str) -> io::Result<u32> {
    std::fs::read_to_string(format!("/sys/class/net/{name}/mtu"))?
        .trim()
        .parse()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Whether the kernel forwards `family` packets on this interface (the FIB lookup requires it).
pub fn forwarding_enabled(name: &str, family: Family) -> io::Result<bool> {
    let path = match family {
        Family::V4 => format!("/proc/sys/net/ipv4/conf/{name}/forwarding"),
        Family::V6 => format!("/proc/sys/net/ipv6/conf/{name}/forwarding"),
    };
    Ok(std::fs::read_to_string(Path::new(&path))?.trim() != "0")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_exists_and_bogus_does_not() {
        assert_eq!(index("lo"), Some(1));
        assert_eq!(index("no-such-if0"), None);
        assert_eq!(index("bad\0name"), None);
    }

    #[test]
    fn names_are_checked_like_the_kernel_does() {
        assert!(check_name("eth0").is_ok());
        assert!(check_name("can-fd.1").is_ok());
        for bad in ["", "sixteen-bytes-xx", "a/b", "a b", ".", "a:b"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn loopback_driver_is_not_veth() {
        // lo answers GDRVINFO with an empty driver on some kernels and EOPNOTSUPP on others.
        assert!(!is_veth("lo"));
    }
}
