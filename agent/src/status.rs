//! Readiness: which configured components are up, as /readyz reports it.

use serde::Serialize;

use crate::{attach::Hook, can::CanView, udp_forward::UdpView};

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Attached,
    Detached,
    /// The registry: registered, lease alive.
    Up,
    /// The registry: not registered now (the error says why); the data plane is unaffected.
    Degraded,
}

#[derive(Debug, Clone, Serialize)]
pub struct Component {
    /// `udp_forward/<iface>` or `can_route/<iface>`.
    pub name: String,
    pub state: State,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hook: Option<Hook>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A program attached in the kernel, with the kernel's identity of it: what the fleet registry
/// publishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachedProgram {
    pub name: String,
    pub kind: Hook,
    /// The interface.
    pub attach_point: String,
    /// Kernel program id and tag (0 when the kernel would not tell).
    pub id: u32,
    pub tag: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Readiness {
    /// True when every configured program is attached.
    pub ready: bool,
    pub components: Vec<Component>,
}

impl Readiness {
    pub fn of(udp: &UdpView, can: &CanView) -> Self {
        let mut wanted: Vec<&str> = udp.rules.iter().map(|r| r.ingress.as_str()).collect();
        wanted.sort_unstable();
        wanted.dedup();
        let mut components: Vec<Component> = wanted
            .into_iter()
            .map(|iface| {
                let hook = udp
                    .ingress
                    .iter()
                    .find(|i| i.iface == iface)
                    .map(|i| i.hook);
                Component {
                    name: format!("udp_forward/{iface}"),
                    state: if hook.is_some() {
                        State::Attached
                    } else {
                        State::Detached
                    },
                    hook,
                    error: None,
                }
            })
            .collect();
        components.extend(can.wanted.iter().map(|iface| {
            let attached = can.ingress.iter().any(|i| i.iface == *iface);
            Component {
                name: format!("can_route/{iface}"),
                state: if attached {
                    State::Attached
                } else {
                    State::Detached
                },
                hook: attached.then_some(Hook::Tc),
                error: None,
            }
        }));
        Self {
            ready: components.iter().all(|c| c.state == State::Attached),
            components,
        }
    }
}
