//! What the data plane and the engines publish for the HTTP side (status, readiness, `top`).

use std::sync::{Arc, RwLock};

use crate::{
    can::CanView, runtime::status::Readiness, udp_forward::UdpView, userspace::SharedUserspaceView,
};

use super::prepare::{Unresolved, Waiting};

/// Views shared with the HTTP side.
#[derive(Clone, Default)]
pub struct Views {
    pub udp: Arc<RwLock<UdpView>>,
    pub can: Arc<RwLock<CanView>>,
    pub waiting: Arc<RwLock<Vec<Waiting>>>,
    /// Tunnel routes waiting for their peer's name to resolve.
    pub unresolved: Arc<RwLock<Vec<Unresolved>>>,
    /// Interfaces the running config names (kernel and userspace parts), for the host
    /// metrics; [`crate::runtime::planes::Planes::apply`] sets it.
    pub interfaces: Arc<RwLock<Vec<String>>>,
    /// Rules and routes the userspace engine runs.
    pub userspace: SharedUserspaceView,
}

impl Views {
    pub fn readiness(&self) -> Readiness {
        Readiness::of(
            &self.udp.read().expect("lock"),
            &self.can.read().expect("lock"),
            &self.waiting.read().expect("lock"),
        )
        .with_unresolved(&self.unresolved.read().expect("lock"))
        .with_userspace(&self.userspace.read().expect("lock"))
    }
}
