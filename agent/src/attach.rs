//! Attaching programs to interfaces at XDP or tc ingress, and detaching them.

use std::fmt;

use aya::{
    Ebpf,
    programs::{
        ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode,
        tc::{self, SchedClassifierLinkId, TcError},
        xdp::XdpLinkId,
    },
};

/// The hook a program runs at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Hook {
    /// XDP in driver (native) mode.
    Xdp,
    /// tc clsact ingress.
    Tc,
}

impl fmt::Display for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Xdp => "xdp",
            Self::Tc => "tc",
        })
    }
}

#[derive(Debug)]
enum Link {
    Xdp(XdpLinkId),
    Tc(SchedClassifierLinkId),
}

/// A program attached to an interface; detach it with [`detach`].
#[derive(Debug)]
pub struct Attachment {
    pub program: &'static str,
    pub iface: String,
    pub ifindex: u32,
    pub hook: Hook,
    link: Link,
}

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("program `{0}` is not in the loaded object")]
    MissingProgram(&'static str),
    #[error(
        "attaching `{program}` to {iface} at XDP (driver mode) failed: {source}; the driver may lack \
         native XDP, or another XDP program is attached: use mode = \"tc\", or \"auto\" to fall back"
    )]
    Xdp {
        program: &'static str,
        iface: String,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("adding the clsact qdisc to {iface} failed: {source}")]
    Clsact {
        iface: String,
        #[source]
        source: TcError,
    },
    #[error("attaching `{program}` to {iface} at tc ingress failed: {source}")]
    Tc {
        program: &'static str,
        iface: String,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("detaching `{program}` from {iface} failed: {source}")]
    Detach {
        program: &'static str,
        iface: String,
        #[source]
        source: Box<ProgramError>,
    },
}

pub fn attach(
    ebpf: &mut Ebpf,
    program: &'static str,
    hook: Hook,
    iface: &str,
    ifindex: u32,
) -> Result<Attachment, AttachError> {
    let prog = ebpf
        .program_mut(program)
        .ok_or(AttachError::MissingProgram(program))?;
    let link = match hook {
        Hook::Xdp => {
            let xdp: &mut Xdp = prog.try_into().map_err(|source| AttachError::Xdp {
                program,
                iface: iface.to_owned(),
                source: Box::new(source),
            })?;
            let id = xdp
                .attach_to_if_index(ifindex, XdpMode::Driver)
                .map_err(|source| AttachError::Xdp {
                    program,
                    iface: iface.to_owned(),
                    source: Box::new(source),
                })?;
            Link::Xdp(id)
        }
        Hook::Tc => {
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
            let cls: &mut SchedClassifier = prog.try_into().map_err(|source| AttachError::Tc {
                program,
                iface: iface.to_owned(),
                source: Box::new(source),
            })?;
            let id =
                cls.attach(iface, TcAttachType::Ingress)
                    .map_err(|source| AttachError::Tc {
                        program,
                        iface: iface.to_owned(),
                        source: Box::new(source),
                    })?;
            Link::Tc(id)
        }
    };
    Ok(Attachment {
        program,
        iface: iface.to_owned(),
        ifindex,
        hook,
        link,
    })
}

pub fn detach(ebpf: &mut Ebpf, a: Attachment) -> Result<(), AttachError> {
    let Attachment {
        program,
        iface,
        link,
        ..
    } = a;
    let prog = ebpf
        .program_mut(program)
        .ok_or(AttachError::MissingProgram(program))?;
    let result = match link {
        Link::Xdp(id) => <&mut Xdp>::try_from(prog).and_then(|p| p.detach(id)),
        Link::Tc(id) => <&mut SchedClassifier>::try_from(prog).and_then(|p| p.detach(id)),
    };
    result.map_err(|source| AttachError::Detach {
        program,
        iface,
        source: Box::new(source),
    })
}
