//! rtnetlink as the agent speaks it: a socket, requests, and readers of the kernel's replies.
//!
//! Replies are untrusted bytes: a message or attribute that is cut short, claims more bytes
//! than there are, or lacks a field the reader needs is a [`NetlinkError`], never a panic or a
//! read past the buffer. Padding (to 4 bytes) after the last message or attribute may be
//! missing; anything else left over is an error.

use std::{
    borrow::Cow,
    io,
    os::fd::{AsFd, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
};

// linux/netlink.h; libc has the flags as c_int, the message types carry u16.
pub const NLMSG_ERROR: u16 = libc::NLMSG_ERROR as u16;
pub const NLMSG_DONE: u16 = libc::NLMSG_DONE as u16;
pub const NLM_F_REQUEST: u16 = libc::NLM_F_REQUEST as u16;
pub const NLM_F_ACK: u16 = libc::NLM_F_ACK as u16;
pub const NLM_F_DUMP: u16 = libc::NLM_F_DUMP as u16;
/// Marks a nested attribute; readers mask it off (requests here nest none, tests do).
#[cfg(test)]
pub const NLA_F_NESTED: u16 = libc::NLA_F_NESTED as u16;
/// Attribute type bits below the NLA_F_NESTED and NLA_F_NET_BYTEORDER flags.
const NLA_TYPE_MASK: u16 = libc::NLA_TYPE_MASK as u16;

/// struct nlmsghdr: length, type, flags, sequence number, port id.
pub const HEADER_LEN: usize = size_of::<libc::nlmsghdr>();
/// struct nlattr: length, type.
pub const ATTR_HEADER_LEN: usize = size_of::<libc::nlattr>();

/// NLMSG_ALIGN and NLA_ALIGN: messages and attributes start at multiples of 4.
pub const fn align(n: usize) -> usize {
    (n + 3) & !3
}

/// What is wrong with a reply from the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NetlinkError {
    #[error("{left} byte(s) after the last message, fewer than a {HEADER_LEN}-byte header")]
    ShortHeader { left: usize },
    #[error("a message of type {ty} claims {len} bytes, less than its own header")]
    LengthBelowHeader { ty: u16, len: usize },
    #[error("a message of type {ty} claims {len} bytes where {left} are left")]
    LengthPastEnd { ty: u16, len: usize, left: usize },
    #[error("{left} byte(s) after the last attribute, fewer than an attribute header")]
    ShortAttrHeader { left: usize },
    #[error("attribute {ty} claims {len} bytes, less than its own header")]
    AttrLengthBelowHeader { ty: u16, len: usize },
    #[error("attribute {ty} claims {len} bytes where {left} are left")]
    AttrLengthPastEnd { ty: u16, len: usize, left: usize },
    #[error("{what} has {len} bytes, {need} needed")]
    Short {
        what: &'static str,
        len: usize,
        need: usize,
    },
    #[error("attribute {ty} has {len} bytes, {need} needed")]
    ShortAttr { ty: u16, len: usize, need: usize },
    #[error("{0} is missing")]
    Missing(&'static str),
}

/// The first `N` bytes at `at`, if there are that many.
fn bytes_at<const N: usize>(b: &[u8], at: usize) -> Option<[u8; N]> {
    b.get(at..)?.first_chunk::<N>().copied()
}

/// One message: its header's fields and the body after the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Message<'a> {
    pub ty: u16,
    pub flags: u16,
    pub seq: u32,
    pub body: &'a [u8],
}

impl<'a> Message<'a> {
    /// Splits the body into its fixed part of `N` bytes (struct ifinfomsg, rtcanmsg, ...),
    /// named `what` in errors, and the attributes after it.
    pub fn split<const N: usize>(
        &self,
        what: &'static str,
    ) -> Result<(&'a [u8; N], Attrs<'a>), NetlinkError> {
        let (fixed, rest) = self
            .body
            .split_first_chunk::<N>()
            .ok_or(NetlinkError::Short {
                what,
                len: self.body.len(),
                need: N,
            })?;
        Ok((fixed, attrs(rest.get(align(N) - N..).unwrap_or_default())))
    }

    /// The errno an NLMSG_ERROR message reports (struct nlmsgerr's negated `error`): 0
    /// acknowledges a request.
    pub fn errno(&self) -> Result<i32, NetlinkError> {
        bytes_at::<4>(self.body, 0)
            .map(|b| i32::from_ne_bytes(b).wrapping_neg())
            .ok_or(NetlinkError::Short {
                what: "NLMSG_ERROR's struct nlmsgerr",
                len: self.body.len(),
                need: 4,
            })
    }
}

/// The messages in one datagram from a netlink socket.
pub fn messages(datagram: &[u8]) -> Messages<'_> {
    Messages(datagram)
}

/// Reads one datagram of a dump's reply: each message other than NLMSG_DONE and NLMSG_ERROR
/// goes to `each`. True once NLMSG_DONE ends the dump; an NLMSG_ERROR is `refused` with its
/// errno.
pub fn read_dump<E: From<NetlinkError>>(
    datagram: &[u8],
    refused: impl FnOnce(io::Error) -> E,
    mut each: impl FnMut(&Message<'_>) -> Result<(), E>,
) -> Result<bool, E> {
    for msg in messages(datagram) {
        let msg = msg?;
        match msg.ty {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => return Err(refused(io::Error::from_raw_os_error(msg.errno()?))),
            _ => each(&msg)?,
        }
    }
    Ok(false)
}

/// Yields each message, or the error that ends the datagram.
pub struct Messages<'a>(&'a [u8]);

impl<'a> Iterator for Messages<'a> {
    type Item = Result<Message<'a>, NetlinkError>;

    fn next(&mut self) -> Option<Self::Item> {
        let b = std::mem::take(&mut self.0);
        if b.is_empty() {
            return None;
        }
        let Some(h) = b.first_chunk::<HEADER_LEN>() else {
            return Some(Err(NetlinkError::ShortHeader { left: b.len() }));
        };
        let len = u32::from_ne_bytes([h[0], h[1], h[2], h[3]]) as usize;
        let ty = u16::from_ne_bytes([h[4], h[5]]);
        if len < HEADER_LEN {
            return Some(Err(NetlinkError::LengthBelowHeader { ty, len }));
        }
        let Some(body) = b.get(HEADER_LEN..len) else {
            return Some(Err(NetlinkError::LengthPastEnd {
                ty,
                len,
                left: b.len(),
            }));
        };
        self.0 = b.get(align(len)..).unwrap_or_default();
        Some(Ok(Message {
            ty,
            flags: u16::from_ne_bytes([h[6], h[7]]),
            seq: u32::from_ne_bytes([h[8], h[9], h[10], h[11]]),
            body,
        }))
    }
}

/// Attributes (struct nlattr and payload, each 4-byte aligned) in `b`.
pub fn attrs(b: &[u8]) -> Attrs<'_> {
    Attrs(b)
}

/// Yields each attribute, or the error that ends them.
#[derive(Clone)]
pub struct Attrs<'a>(&'a [u8]);

impl<'a> Attrs<'a> {
    /// The first attribute of type `ty`, reading no further than it.
    pub fn first(self, ty: u16) -> Result<Option<Attr<'a>>, NetlinkError> {
        for a in self {
            let a = a?;
            if a.ty == ty {
                return Ok(Some(a));
            }
        }
        Ok(None)
    }
}

impl<'a> Iterator for Attrs<'a> {
    type Item = Result<Attr<'a>, NetlinkError>;

    fn next(&mut self) -> Option<Self::Item> {
        let b = std::mem::take(&mut self.0);
        if b.is_empty() {
            return None;
        }
        let Some(h) = b.first_chunk::<ATTR_HEADER_LEN>() else {
            return Some(Err(NetlinkError::ShortAttrHeader { left: b.len() }));
        };
        let (len, ty) = (
            u16::from_ne_bytes([h[0], h[1]]),
            u16::from_ne_bytes([h[2], h[3]]),
        );
        let (len, ty) = (usize::from(len), ty & NLA_TYPE_MASK);
        if len < ATTR_HEADER_LEN {
            return Some(Err(NetlinkError::AttrLengthBelowHeader { ty, len }));
        }
        let Some(payload) = b.get(ATTR_HEADER_LEN..len) else {
            return Some(Err(NetlinkError::AttrLengthPastEnd {
                ty,
                len,
                left: b.len(),
            }));
        };
        self.0 = b.get(align(len)..).unwrap_or_default();
        Some(Ok(Attr { ty, payload }))
    }
}

/// One attribute: its type (without the nested and byte-order flags) and payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr<'a> {
    pub ty: u16,
    pub payload: &'a [u8],
}

impl<'a> Attr<'a> {
    /// The payload's first `N` bytes (a fixed-size payload may grow at its end in newer
    /// kernels, so more is fine).
    pub fn array<const N: usize>(&self) -> Result<[u8; N], NetlinkError> {
        self.field(0)
    }

    /// The `i`th `N`-byte field of a payload that is a struct of such fields.
    fn field<const N: usize>(&self, i: usize) -> Result<[u8; N], NetlinkError> {
        let at = i.saturating_mul(N);
        bytes_at(self.payload, at).ok_or(NetlinkError::ShortAttr {
            ty: self.ty,
            len: self.payload.len(),
            need: at.saturating_add(N),
        })
    }

    /// The payload's first `n` bytes.
    pub fn bytes(&self, n: usize) -> Result<&'a [u8], NetlinkError> {
        self.payload.get(..n).ok_or(NetlinkError::ShortAttr {
            ty: self.ty,
            len: self.payload.len(),
            need: n,
        })
    }

    pub fn u8(&self) -> Result<u8, NetlinkError> {
        self.u8_at(0)
    }

    /// The payload's `i`th byte.
    pub fn u8_at(&self, i: usize) -> Result<u8, NetlinkError> {
        self.field(i).map(|[b]| b)
    }

    pub fn u32(&self) -> Result<u32, NetlinkError> {
        self.u32_at(0)
    }

    /// The `i`th u32 of a payload that is a struct of u32s.
    pub fn u32_at(&self, i: usize) -> Result<u32, NetlinkError> {
        self.field(i).map(u32::from_ne_bytes)
    }

    /// The `i`th u64 of a payload that is a struct of u64s.
    pub fn u64_at(&self, i: usize) -> Result<u64, NetlinkError> {
        self.field(i).map(u64::from_ne_bytes)
    }

    /// A string payload up to its NUL (or its end), with invalid UTF-8 replaced.
    pub fn string(&self) -> Cow<'a, str> {
        let s = self.payload.split(|&b| b == 0).next().unwrap_or_default();
        String::from_utf8_lossy(s)
    }

    /// The attributes nested in this one.
    pub fn nested(&self) -> Attrs<'a> {
        attrs(self.payload)
    }
}

/// Appends an attribute with its padding to `buf` (a request, or a nested attribute's payload).
pub fn put_attr(buf: &mut Vec<u8>, ty: u16, payload: &[u8]) {
    // Our payloads are small structs and names, far below the 64 KiB an nlattr can describe.
    debug_assert!(ATTR_HEADER_LEN + payload.len() <= usize::from(u16::MAX));
    buf.extend_from_slice(&((ATTR_HEADER_LEN + payload.len()) as u16).to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(payload);
    buf.resize(align(buf.len()), 0);
}

/// A message being built: the header, then the fixed part and attributes.
pub struct Request(Vec<u8>);

impl Request {
    pub fn new(ty: u16, flags: u16, seq: u32) -> Self {
        let mut m = Vec::with_capacity(512);
        m.extend_from_slice(&0u32.to_ne_bytes()); // length, set by finish()
        m.extend_from_slice(&ty.to_ne_bytes());
        m.extend_from_slice(&flags.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
        Self(m)
    }

    /// Appends the fixed part of the body (struct ifinfomsg, rtcanmsg, ...).
    pub fn fixed(mut self, bytes: &[u8]) -> Self {
        self.0.extend_from_slice(bytes);
        self
    }

    pub fn attr(mut self, ty: u16, payload: &[u8]) -> Self {
        put_attr(&mut self.0, ty, payload);
        self
    }

    /// The message, with its length set.
    pub fn finish(mut self) -> Vec<u8> {
        let len = self.0.len() as u32;
        self.0[..4].copy_from_slice(&len.to_ne_bytes());
        self.0
    }
}

/// Why a datagram could not be received whole.
#[derive(Debug, thiserror::Error)]
pub enum RecvError {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("a datagram of {len} bytes did not fit the {buffer}-byte buffer")]
    Truncated { len: usize, buffer: usize },
}

/// A NETLINK_ROUTE socket.
#[derive(Debug)]
pub struct Socket {
    fd: OwnedFd,
}

impl Socket {
    /// A blocking socket for requests and their replies.
    pub fn route() -> io::Result<Self> {
        Self::open(0)
    }

    /// A non-blocking socket that receives the notifications of the multicast `groups`
    /// (RTMGRP_* bits).
    pub fn subscribe(groups: u32) -> io::Result<Self> {
        let s = Self::open(libc::SOCK_NONBLOCK)?;
        let mut addr = kernel_address();
        addr.nl_groups = groups;
        // SAFETY: a valid sockaddr_nl of the size passed.
        let rc = unsafe {
            libc::bind(
                s.fd.as_raw_fd(),
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(s)
    }

    fn open(flags: libc::c_int) -> io::Result<Self> {
        // SAFETY: plain socket(2); the fd is owned right after.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | flags,
                libc::NETLINK_ROUTE,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor nothing else owns.
        Ok(Self {
            fd: unsafe { OwnedFd::from_raw_fd(raw) },
        })
    }

    /// Sends one message to the kernel.
    pub fn send(&self, msg: &[u8]) -> io::Result<()> {
        let kernel = kernel_address();
        // SAFETY: valid buffer and address for the duration of the call.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&raw const kernel).cast(),
                size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Receives one datagram into `buf`; one longer than `buf` is an error, not cut short.
    pub fn recv<'b>(&self, buf: &'b mut [u8]) -> Result<&'b [u8], RecvError> {
        // MSG_TRUNC: the return value is the datagram's full length even when it is longer.
        // SAFETY: writes at most buf.len() bytes into buf.
        let n = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_TRUNC,
            )
        };
        let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
        let buffer = buf.len();
        buf.get(..n).ok_or(RecvError::Truncated { len: n, buffer })
    }
}

impl AsFd for Socket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl std::os::fd::AsRawFd for Socket {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

/// The kernel's address (port id 0, no groups).
fn kernel_address() -> libc::sockaddr_nl {
    // SAFETY: all-zero is a valid sockaddr_nl.
    let mut a: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    a.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An RTM_NEWLINK message as the kernel writes it for loopback (trimmed to three
    /// attributes; `ip -d link show lo` over `strace -e recvmsg -X raw`), then NLMSG_DONE.
    fn loopback_dump() -> Vec<u8> {
        let ifinfomsg = [
            0, 0, // AF_UNSPEC, pad
            0x04, 0x03, // ARPHRD_LOOPBACK (772)
            1, 0, 0, 0, // index 1
            0x49, 0, 1, 0, // IFF_UP | IFF_LOOPBACK | IFF_RUNNING | IFF_LOWER_UP
            0, 0, 0, 0, // change
        ];
        let mut dump = Request::new(libc::RTM_NEWLINK, 0x2, 7) // NLM_F_MULTI
            .fixed(&ifinfomsg)
            .attr(libc::IFLA_IFNAME, b"lo\0")
            .attr(libc::IFLA_TXQLEN, &1000u32.to_ne_bytes())
            .attr(libc::IFLA_OPERSTATE, &[0])
            .finish();
        dump.extend(
            Request::new(NLMSG_DONE, 0x2, 7)
                .fixed(&0i32.to_ne_bytes())
                .finish(),
        );
        dump
    }

    #[test]
    fn a_kernel_dump_reads_message_by_message_and_attribute_by_attribute() {
        let dump = loopback_dump();
        let msgs: Vec<_> = messages(&dump).collect::<Result<_, _>>().unwrap();
        assert_eq!(msgs.len(), 2);
        assert_eq!(
            (msgs[0].ty, msgs[0].flags, msgs[0].seq),
            (libc::RTM_NEWLINK, 2, 7)
        );
        let (fixed, attrs) = msgs[0].split::<16>("ifinfomsg").unwrap();
        assert_eq!(fixed[4], 1);
        let attrs: Vec<_> = attrs.collect::<Result<_, _>>().unwrap();
        assert_eq!(attrs.len(), 3);
        assert_eq!(
            (attrs[0].ty, attrs[0].string()),
            (libc::IFLA_IFNAME, "lo".into())
        );
        assert_eq!(attrs[1].u32(), Ok(1000));
        assert_eq!(attrs[2].u8(), Ok(0));
        assert_eq!(msgs[1].ty, NLMSG_DONE);
        assert_eq!(msgs[1].errno(), Ok(0));
    }

    #[test]
    fn nested_attributes_lose_their_flag_bits() {
        let mut inner = Vec::new();
        put_attr(&mut inner, 1, b"can\0");
        let mut outer = Vec::new();
        put_attr(&mut outer, libc::IFLA_LINKINFO | NLA_F_NESTED, &inner);
        let a = attrs(&outer).next().unwrap().unwrap();
        assert_eq!(a.ty, libc::IFLA_LINKINFO);
        let kind = a.nested().first(1).unwrap().unwrap();
        assert_eq!(kind.string(), "can");
    }

    #[test]
    fn every_cut_of_a_dump_is_an_error_or_a_shorter_dump() {
        let dump = loopback_dump();
        for cut in 0..dump.len() {
            // Reading everything may succeed only where the cut falls between messages.
            let read: Result<Vec<_>, _> = messages(&dump[..cut]).collect();
            if let Ok(msgs) = read {
                assert!(cut == 0 || msgs.len() == 1, "cut {cut}: {msgs:?}");
            }
        }
    }

    #[test]
    fn malformed_messages_are_typed_errors() {
        let dump = loopback_dump();
        fn first(b: &[u8]) -> Result<Message<'_>, NetlinkError> {
            messages(b).next().unwrap()
        }
        assert_eq!(
            first(&dump[..10]),
            Err(NetlinkError::ShortHeader { left: 10 })
        );
        let mut v = dump.clone();
        v[..4].copy_from_slice(&8u32.to_ne_bytes());
        assert_eq!(
            first(&v),
            Err(NetlinkError::LengthBelowHeader {
                ty: libc::RTM_NEWLINK,
                len: 8
            })
        );
        let mut v = dump.clone();
        v[..4].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert!(matches!(first(&v), Err(NetlinkError::LengthPastEnd { .. })));
        // Bytes after the last message that are not a header.
        let mut v = dump.clone();
        v.extend_from_slice(&[0; 5]);
        assert_eq!(
            messages(&v).last(),
            Some(Err(NetlinkError::ShortHeader { left: 5 }))
        );
        // An error ends the iteration.
        let mut it = messages(&dump[..20]);
        assert!(it.next().unwrap().is_err());
        assert_eq!(it.next(), None);
        // NLMSG_ERROR without its error code.
        let short_error = Request::new(NLMSG_ERROR, 0, 0).finish();
        assert!(matches!(
            first(&short_error).unwrap().errno(),
            Err(NetlinkError::Short { need: 4, .. })
        ));
        // i32::MIN negated does not overflow.
        let min = Request::new(NLMSG_ERROR, 0, 0)
            .fixed(&i32::MIN.to_ne_bytes())
            .finish();
        assert_eq!(first(&min).unwrap().errno(), Ok(i32::MIN));
        // A body shorter than its fixed part.
        assert!(matches!(
            first(&dump).unwrap().split::<64>("ifinfomsg"),
            Err(NetlinkError::Short {
                len: 40,
                need: 64,
                ..
            })
        ));
    }

    #[test]
    fn malformed_attributes_are_typed_errors() {
        fn next(b: &[u8]) -> Result<Attr<'_>, NetlinkError> {
            attrs(b).next().unwrap()
        }
        assert_eq!(
            next(&[8, 0, 3]),
            Err(NetlinkError::ShortAttrHeader { left: 3 })
        );
        assert_eq!(
            next(&[2, 0, 3, 0]),
            Err(NetlinkError::AttrLengthBelowHeader { ty: 3, len: 2 })
        );
        assert_eq!(
            next(&[9, 0, 3, 0, b'l', b'o']),
            Err(NetlinkError::AttrLengthPastEnd {
                ty: 3,
                len: 9,
                left: 6
            })
        );
        let mut b = Vec::new();
        put_attr(&mut b, 13, &[1, 0]);
        let a = next(&b).unwrap();
        assert_eq!(
            a.u32(),
            Err(NetlinkError::ShortAttr {
                ty: 13,
                len: 2,
                need: 4
            })
        );
        assert_eq!(a.array(), Ok([1, 0]));
        assert!(a.u64_at(0).is_err());
        assert!(a.u32_at(usize::MAX / 4).is_err());
        assert!(a.u64_at(usize::MAX).is_err());
        // Missing padding after the last attribute is fine.
        assert_eq!(next(&[6, 0, 3, 0, b'l', b'o']).unwrap().string(), "lo");
        // A string without its NUL, and one with invalid UTF-8.
        assert_eq!(next(&[5, 0, 3, 0, 0xff]).unwrap().string(), "\u{fffd}");
    }
}
