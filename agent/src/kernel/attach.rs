//! Attaching programs to interfaces at XDP or tc ingress so that they outlive the agent, taking
//! over what a previous agent left attached, and detaching.
//!
//! XDP attachments are bpf_links pinned in the bpffs directory. tc attachments are cls_bpf
//! filters in the clsact qdisc at a fixed priority and handle (kernels before 6.6 have no tc
//! links), which stay in the qdisc until removed. Either way a new agent replaces the program in
//! place, atomically: no packet meets an interface without a program.

use std::{fmt, io, path::PathBuf};

use aya::programs::{
    Link as _, ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode,
    links::FdLink,
    links::PinnedLink,
    tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcError, TcHandle},
    xdp::XdpLink,
};
use aya::{Ebpf, programs::Program};
use serde::{Deserialize, Serialize};
use tracing::debug;

use crate::{kernel::pins::PinDir, kernel::state::AttachmentRecord};

/// Our filters' place in the clsact qdisc: ahead of filters added without a priority (the
/// kernel gives those 49152 and up), with a handle of our own to find them again.
pub const TC_PRIORITY: u16 = 1;
pub const TC_HANDLE: TcHandle = TcHandle::new(0, 0xed6e);

/// The hook a program runs at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Hook {
    /// XDP in driver (native) mode.
    Xdp,
    /// tc clsact ingress.
    Tc,
    /// tc clsact egress.
    TcEgress,
}

impl Hook {
    fn tc_attach_type(self) -> TcAttachType {
        if self == Self::TcEgress {
            TcAttachType::Egress
        } else {
            TcAttachType::Ingress
        }
    }
}

impl fmt::Display for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Xdp => "xdp",
            Self::Tc => "tc",
            Self::TcEgress => "tc_egress",
        })
    }
}

#[derive(Debug)]
enum Held {
    /// A bpf_link, pinned at `pin`.
    Xdp { link: FdLink, pin: PathBuf },
    /// A cls_bpf filter at [`TC_PRIORITY`] and [`TC_HANDLE`].
    Tc(SchedClassifierLink),
}

/// A program attached to an interface. Dropping it leaves the program attached, for a next
/// agent to take over; [`detach`] removes it.
#[derive(Debug)]
pub struct Attachment {
    pub program: String,
    pub iface: String,
    pub ifindex: u32,
    pub hook: Hook,
    /// Kernel id and tag of the program running there; 0 while it is a previous agent's.
    pub prog_id: u32,
    pub tag: u64,
    /// Always `Some` until [`detach`] or drop take it.
    link: Option<Held>,
}

impl Drop for Attachment {
    fn drop(&mut self) {
        if let Some(held) = self.link.take() {
            debug!(iface = self.iface, program = self.program, "left attached");
            match held {
                // The pin holds the link.
                Held::Xdp { link, .. } => drop(link),
                // Dropping the handle would remove the filter.
                Held::Tc(link) => std::mem::forget(link),
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("program `{0}` is not in the loaded object")]
    MissingProgram(String),
    #[error(
        "attaching `{program}` to {iface} at XDP (driver mode) failed: {source}; the driver may lack \
         native XDP, or another XDP program is attached: use mode = \"tc\", or \"auto\" to fall back"
    )]
    Xdp {
        program: String,
        iface: String,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("pinning the XDP link of {iface} at {path}: {source}")]
    Pin {
        iface: String,
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("adding the clsact qdisc to {iface} failed: {source}")]
    Clsact {
        iface: String,
        #[source]
        source: TcError,
    },
    #[error("attaching `{program}` to {iface} at tc failed: {source}")]
    Tc {
        program: String,
        iface: String,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("detaching `{program}` from {iface} failed: {source}")]
    Detach {
        program: String,
        iface: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Attaches `program` to `iface`, or, where one of ours is attached already (left by a
/// previous agent), replaces the program it runs in place.
pub fn attach(
    ebpf: &mut Ebpf,
    pins: &PinDir,
    program: &str,
    hook: Hook,
    iface: &str,
    ifindex: u32,
) -> Result<Attachment, AttachError> {
    let prog = ebpf
        .program_mut(program)
        .ok_or_else(|| AttachError::MissingProgram(program.to_owned()))?;
    attach_program(prog, pins, program, hook, iface, ifindex)
}

/// [`attach`] for a program that is not part of a loaded object (a pinned one).
pub fn attach_program(
    prog: &mut Program,
    pins: &PinDir,
    program: &str,
    hook: Hook,
    iface: &str,
    ifindex: u32,
) -> Result<Attachment, AttachError> {
    let link = match hook {
        Hook::Xdp => {
            let pin = pins.link(program, iface);
            let xdp = xdp_program(prog, program, iface)?;
            let taken_over = PinnedLink::from_pin(&pin)
                .ok()
                .and_then(|p| XdpLink::try_from(FdLink::from(p)).ok())
                .and_then(|old| xdp.attach_to_link(old).ok());
            let fresh = taken_over.is_none();
            let id = match taken_over {
                Some(id) => id,
                None => {
                    // A link of an interface that is gone, or none at all.
                    let _ = std::fs::remove_file(&pin);
                    xdp.attach_to_if_index(ifindex, XdpMode::Driver)
                        .map_err(|e| xdp_err(program, iface, e))?
                }
            };
            let link = xdp.take_link(id).map_err(|e| xdp_err(program, iface, e))?;
            let link = FdLink::try_from(link).map_err(|e| pin_err(iface, &pin, e))?;
            if fresh {
                let pinned = link.pin(&pin).map_err(|e| pin_err(iface, &pin, e))?;
                Held::Xdp {
                    link: pinned.into(),
                    pin,
                }
            } else {
                Held::Xdp { link, pin }
            }
        }
        Hook::Tc | Hook::TcEgress => {
            // Kernels before 6.6 (no tcx) attach through the clsact qdisc; it may already exist.
            match tc::qdisc_add_clsact(iface) {
                Ok(()) => {}
                Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
                Err(source) => {
                    return Err(AttachError::Clsact {
                        iface: iface.to_owned(),
                        source,
                    });
                }
            }
            let cls = tc_program(prog, program, iface)?;
            let options = TcAttachOptions::Netlink(NlOptions {
                priority: TC_PRIORITY,
                handle: TC_HANDLE,
                ..NlOptions::default()
            });
            let id = match cls.attach_with_options(iface, hook.tc_attach_type(), options) {
                Err(e) if is_eexist(&e) => {
                    // Ours from a previous agent: swap the program in the filter.
                    let old = existing_tc_filter(iface, hook)
                        .map_err(|e| tc_err(program, iface, e.into()))?;
                    cls.attach_to_link(old)
                }
                other => other,
            }
            .map_err(|e| tc_err(program, iface, e))?;
            Held::Tc(cls.take_link(id).map_err(|e| tc_err(program, iface, e))?)
        }
    };
    let info = prog.info().ok();
    Ok(Attachment {
        program: program.to_owned(),
        iface: iface.to_owned(),
        ifindex,
        hook,
        prog_id: info.as_ref().map_or(0, |i| i.id()),
        tag: info.as_ref().map_or(0, |i| i.tag()),
        link: Some(link),
    })
}

/// An attachment a previous agent recorded, still running its program, so that it can be
/// detached; `None` when it is gone (its interface was removed).
pub fn recorded(pins: &PinDir, r: &AttachmentRecord) -> Option<Attachment> {
    let link = match r.hook {
        Hook::Xdp => {
            let pin = pins.link(&r.program, &r.iface);
            let link = PinnedLink::from_pin(&pin).ok()?;
            Held::Xdp {
                link: link.into(),
                pin,
            }
        }
        Hook::Tc | Hook::TcEgress => {
            if crate::host::netdev::index(&r.iface) != Some(r.ifindex) {
                return None;
            }
            Held::Tc(existing_tc_filter(&r.iface, r.hook).ok()?)
        }
    };
    Some(Attachment {
        program: r.program.clone(),
        iface: r.iface.clone(),
        ifindex: r.ifindex,
        hook: r.hook,
        prog_id: 0,
        tag: 0,
        link: Some(link),
    })
}

/// Our attachments as the kernel has them, for when the state record is unreadable: the XDP
/// links pinned under `links/`, and the tc filters with our priority and handle at ingress
/// (`can_route` on CAN netdevs, `udp_forward_tc` elsewhere). `latency_egress` is not recorded
/// anyway: latency capture attaches it afresh (replacing ours in place).
pub fn find_ours(pins: &PinDir) -> Vec<AttachmentRecord> {
    let mut found = Vec::new();
    if let Ok(entries) = std::fs::read_dir(pins.root().join("links")) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some((program, iface)) = name.split_once('@') else {
                continue;
            };
            let Some(ifindex) = crate::host::netdev::index(iface) else {
                continue;
            };
            found.push(AttachmentRecord {
                program: program.to_owned(),
                iface: iface.to_owned(),
                ifindex,
                hook: Hook::Xdp,
            });
        }
    }
    for (ifindex, iface) in crate::host::netdev::all() {
        if has_our_tc_filter(ifindex, Hook::Tc).unwrap_or(false) {
            let program = if crate::host::netdev::is_can(&iface) {
                edgeplane_common::can::PROGRAM
            } else {
                edgeplane_common::udp_forward::TC_PROGRAM
            };
            found.push(AttachmentRecord {
                program: program.to_owned(),
                iface,
                ifindex,
                hook: Hook::Tc,
            });
        }
    }
    found.sort_by(|a, b| (&a.iface, a.hook as u8).cmp(&(&b.iface, b.hook as u8)));
    found
}

impl Attachment {
    pub fn record(&self) -> AttachmentRecord {
        AttachmentRecord {
            program: self.program.clone(),
            iface: self.iface.clone(),
            ifindex: self.ifindex,
            hook: self.hook,
        }
    }
}

/// Removes the attachment from its interface.
pub fn detach(mut a: Attachment) -> Result<(), AttachError> {
    let err = |source: Box<dyn std::error::Error + Send + Sync>| AttachError::Detach {
        program: a.program.clone(),
        iface: a.iface.clone(),
        source,
    };
    match a.link.take().expect("attached") {
        Held::Xdp { link, pin } => {
            // The pin path may hold a newer link by now (the interface came back and was
            // attached again); ours is then detached already. Otherwise detach it explicitly:
            // the link object itself only goes some time after its pin and our fd.
            let pinned = PinnedLink::from_pin(&pin)
                .ok()
                .and_then(|p| FdLink::from(p).info().ok());
            if pinned.is_some_and(|p| link.info().is_ok_and(|ours| ours.id() == p.id())) {
                crate::kernel::link_detach::detach_pinned(&pin).map_err(|e| err(e.into()))?;
                match std::fs::remove_file(&pin) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(err(e.into())),
                    _ => {}
                }
            }
            drop(link);
            Ok(())
        }
        // The interface, and its qdisc with our filter, is gone already.
        Held::Tc(link) if crate::host::netdev::name(a.ifindex).is_none() => {
            std::mem::forget(link);
            Ok(())
        }
        Held::Tc(link) => match link.detach() {
            // The interface, and its qdisc with our filter, is gone already.
            Err(ProgramError::TcError(TcError::NetlinkError(e)))
                if matches!(e.raw_os_error(), Some(libc::ENODEV | libc::ENOENT)) =>
            {
                Ok(())
            }
            other => other.map_err(|e| err(e.into())),
        },
    }
}

/// Whether `ifindex`'s clsact ingress (or egress) has a filter at our priority and handle:
/// one RTM_GETTFILTER request, answered with the filter or an error (no qdisc, no such
/// filter).
fn has_our_tc_filter(ifindex: u32, hook: Hook) -> io::Result<bool> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    const RTM_NEWTFILTER: u16 = 44;
    const RTM_GETTFILTER: u16 = 46;
    // TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS / TC_H_MIN_EGRESS).
    let parent: u32 = if hook == Hook::TcEgress {
        0xffff_fff3
    } else {
        0xffff_fff2
    };
    // Priority in the upper half, protocol ETH_P_ALL (network order) in the lower: as attached.
    let info = (u32::from(TC_PRIORITY) << 16) | u32::from((libc::ETH_P_ALL as u16).to_be());
    let handle = u32::from(TC_HANDLE);
    let mut req = [0u8; 36];
    req[0..4].copy_from_slice(&36u32.to_ne_bytes());
    req[4..6].copy_from_slice(&RTM_GETTFILTER.to_ne_bytes());
    req[6..8].copy_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
    req[8..12].copy_from_slice(&1u32.to_ne_bytes());
    // tcmsg: family, padding, ifindex, handle, parent, info.
    req[20..24].copy_from_slice(&(ifindex as i32).to_ne_bytes());
    req[24..28].copy_from_slice(&handle.to_ne_bytes());
    req[28..32].copy_from_slice(&parent.to_ne_bytes());
    req[32..36].copy_from_slice(&info.to_ne_bytes());
    // SAFETY: plain socket(2); the fd is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sends `req`, a buffer of its length, to the kernel (the default address).
    if unsafe { libc::send(fd.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut reply = [0u8; 8192];
    // SAFETY: receives into `reply`, at most its length.
    let n = unsafe { libc::recv(fd.as_raw_fd(), reply.as_mut_ptr().cast(), reply.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if n < 16 {
        return Err(io::Error::other("short netlink reply"));
    }
    let kind = u16::from_ne_bytes([reply[4], reply[5]]);
    Ok(kind == RTM_NEWTFILTER)
}

/// A handle on our filter in `iface`'s clsact ingress or egress.
fn existing_tc_filter(iface: &str, hook: Hook) -> io::Result<SchedClassifierLink> {
    SchedClassifierLink::attached(iface, hook.tc_attach_type(), TC_PRIORITY, TC_HANDLE, None)
}

fn is_eexist(e: &ProgramError) -> bool {
    matches!(e, ProgramError::TcError(TcError::NetlinkError(n)) if n.raw_os_error() == Some(libc::EEXIST))
}

fn xdp_program<'a>(
    prog: &'a mut Program,
    program: &str,
    iface: &str,
) -> Result<&'a mut Xdp, AttachError> {
    match prog {
        Program::Xdp(p) => Ok(p),
        _ => Err(xdp_err(program, iface, ProgramError::UnexpectedProgramType)),
    }
}

fn tc_program<'a>(
    prog: &'a mut Program,
    program: &str,
    iface: &str,
) -> Result<&'a mut SchedClassifier, AttachError> {
    match prog {
        Program::SchedClassifier(p) => Ok(p),
        _ => Err(tc_err(program, iface, ProgramError::UnexpectedProgramType)),
    }
}

fn xdp_err(program: &str, iface: &str, e: ProgramError) -> AttachError {
    AttachError::Xdp {
        program: program.to_owned(),
        iface: iface.to_owned(),
        source: Box::new(e),
    }
}

fn tc_err(program: &str, iface: &str, e: ProgramError) -> AttachError {
    AttachError::Tc {
        program: program.to_owned(),
        iface: iface.to_owned(),
        source: Box::new(e),
    }
}

fn pin_err(
    iface: &str,
    pin: &std::path::Path,
    e: impl Into<Box<dyn std::error::Error + Send + Sync>>,
) -> AttachError {
    AttachError::Pin {
        iface: iface.to_owned(),
        path: pin.to_owned(),
        source: e.into(),
    }
}
