//! Readiness: which configured components are up, as /readyz reports it.

use serde::Serialize;

use crate::{attach::Hook, can::CanView, udp_forward::UdpView, userspace::UserspaceView};

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Attached,
    Detached,
}

#[derive(Debug, Clone, Serialize)]
pub struct Component {
    /// `udp_forward/<iface>`, `can_route/<iface>`, or `userspace/<rule>` for a rule the
    /// userspace engine runs.
    pub name: String,
    pub state: State,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hook: Option<Hook>,
    /// The userspace engine (`tokio`, `tokio-uring`, `socketcan`) running it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub engine: Option<&'static str>,
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
                    engine: None,
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
                engine: None,
            }
        }));
        Self {
            ready: components.iter().all(|c| c.state == State::Attached),
            components,
        }
    }

    /// Adds the userspace engine's rules and routes: they run once their sockets are bound,
    /// which is when they appear in the view.
    pub fn with_userspace(mut self, user: &UserspaceView) -> Self {
        let udp = user.udp.iter().map(|u| (u.rule.as_str(), u.engine));
        let can = user.can.iter().map(|c| (c.route.as_str(), "socketcan"));
        self.components
            .extend(udp.chain(can).map(|(name, engine)| Component {
                name: format!("userspace/{name}"),
                state: State::Attached,
                hook: None,
                engine: Some(engine),
            }));
        self
    }
}
