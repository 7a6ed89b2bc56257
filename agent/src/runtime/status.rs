//! Readiness: which configured components are up, as /readyz reports it.

use serde::Serialize;

use crate::{
    can::CanView,
    kernel::attach::Hook,
    runtime::prepare::{Unresolved, Waiting},
    udp_forward::UdpView,
    userspace::UserspaceView,
};

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Attached,
    Detached,
    /// The registry: registered, lease alive.
    Up,
    /// The registry: not registered now (the error says why); the data plane is unaffected.
    Degraded,
    /// Its interface does not exist (now): it is attached again when it appears.
    InterfaceMissing,
    /// A tunnel route whose peer's name did not resolve: resolved again, with backoff.
    PeerUnresolved,
}

#[derive(Debug, Clone, Serialize)]
pub struct Component {
    /// `udp_forward/<iface>`, `can_route/<iface>`, `can_watch/<iface>`, `can_receive/<iface>`,
    /// or `userspace/<rule>` for a rule the userspace engine runs.
    pub name: String,
    pub state: State,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hook: Option<Hook>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
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
    pub fn of(udp: &UdpView, can: &CanView, waiting: &[Waiting]) -> Self {
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
                    detail: None,
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
                detail: None,
            }
        }));
        let mut missing: Vec<(String, Vec<&str>)> = Vec::new();
        for w in waiting {
            let name = format!("{}/{}", w.kind, w.iface);
            match missing.iter_mut().find(|(n, _)| *n == name) {
                Some((_, rules)) => rules.push(&w.name),
                None => missing.push((name, vec![&w.name])),
            }
        }
        components.extend(missing.into_iter().map(|(name, rules)| Component {
            name,
            state: State::InterfaceMissing,
            hook: None,
            detail: Some(format!("waiting: {}", rules.join(", "))),
        }));
        Self {
            ready: components.iter().all(|c| c.state == State::Attached),
            components,
        }
    }

    /// Adds the tunnel routes waiting for their peer's name to resolve.
    pub fn with_unresolved(mut self, unresolved: &[Unresolved]) -> Self {
        self.components.extend(unresolved.iter().map(|u| Component {
            name: format!("can_tunnel/{}", u.route),
            state: State::PeerUnresolved,
            hook: None,
            detail: Some(format!("{}; resolving again", u.error)),
        }));
        self.ready &= unresolved.is_empty();
        self
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
                detail: Some(format!("userspace engine {engine}")),
            }));
        self
    }
}

/// `edgeplane_rules_waiting{iface}`: how many rules wait for a missing interface.
#[derive(Debug)]
pub struct WaitingCollector(pub std::sync::Arc<std::sync::RwLock<Vec<Waiting>>>);

impl prometheus_client::collector::Collector for WaitingCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::{
            encoding::EncodeMetric as _,
            metrics::{MetricType, gauge::ConstGauge},
        };
        let mut per_iface: std::collections::BTreeMap<&str, i64> = Default::default();
        let waiting = self.0.read().expect("lock");
        for w in waiting.iter() {
            *per_iface.entry(&w.iface).or_default() += 1;
        }
        let mut family = encoder.encode_descriptor(
            "rules_waiting",
            "Rules (UDP forwards, CAN routes, watches and tunnel receivers) waiting for their interface to appear",
            None,
            MetricType::Gauge,
        )?;
        for (iface, n) in per_iface {
            ConstGauge::new(n).encode(family.encode_family(&[("iface", iface)])?)?;
        }
        Ok(())
    }
}
