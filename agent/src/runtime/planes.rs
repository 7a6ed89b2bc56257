//! Which engine runs what: the kernel path (eBPF programs, can-gw) where the config asks for it,
//! the userspace engine where it asks for `userspace`, and, in `auto`, the userspace engine
//! when the kernel path can't run (its programs don't load, or an attach is refused).

use std::{path::Path, sync::Arc};

use anyhow::{Context as _, bail};
use prometheus_client::collector::Collector;
use tracing::warn;

use crate::{
    can::{router::CanRouterError, stats::UserspaceCanCollector},
    config::{CanMode, Config, Problem, UdpMode},
    host::stats::HostCollector,
    kernel::state::AgentRecord,
    runtime::status::AttachedProgram,
    runtime::{dataplane::Dataplane, prepare::Prepared, views::Views},
    udp_forward::{UdpForwardError, stats::UdpCollector},
    userspace::{CanUserspace, UdpUserspace},
};

/// Which parts run in userspace.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Split {
    udp: bool,
    can: bool,
}

pub struct Planes {
    /// None when the kernel path is not loaded: nothing asked for it, or `auto` fell back.
    kernel: Option<Dataplane>,
    udp: UdpUserspace,
    can: CanUserspace,
    views: Views,
    /// Parts that `auto` moved to userspace because the kernel path refused them.
    fell_back: Split,
}

impl Planes {
    /// Loads the kernel path if the config may use it. In `auto` a load failure is logged and
    /// the rules run in userspace; with an explicit kernel mode it is an error.
    pub fn load(config: &Config, bpffs: &Path, agent: AgentRecord) -> anyhow::Result<Self> {
        let views = Views::default();
        let maybe_kernel =
            config.udp.mode != UdpMode::Userspace || config.can.mode != CanMode::Userspace;
        let (kernel, fell_back) = if maybe_kernel {
            match Dataplane::load(bpffs, agent, views.clone()) {
                Ok(k) => (Some(k), Split::default()),
                Err(e) if auto_only(config) => {
                    warn!(
                        "the kernel path can't run ({e:#}); mode = \"auto\": the UDP rules run in \
                         the userspace engine ({}) and the CAN routes on CAN_RAW sockets",
                        config.udp.engine.label()
                    );
                    (
                        None,
                        Split {
                            udp: true,
                            can: true,
                        },
                    )
                }
                Err(e) => return Err(e),
            }
        } else {
            (None, Split::default())
        };
        Ok(Self {
            kernel,
            udp: UdpUserspace::new(Arc::clone(&views.userspace)),
            can: CanUserspace::new(Arc::clone(&views.userspace)),
            views,
            fell_back,
        })
    }

    pub fn views(&self) -> Views {
        self.views.clone()
    }

    /// The slow-event stream of the kernel path.
    pub fn events(
        &self,
    ) -> Option<tokio::sync::broadcast::Sender<Arc<crate::latency::events::Event>>> {
        self.kernel.as_ref().map(Dataplane::events)
    }

    /// The kernel programs attached now (none while everything runs in userspace).
    pub fn attached_programs(&self) -> Vec<AttachedProgram> {
        self.kernel
            .as_ref()
            .map_or_else(Vec::new, Dataplane::attached_programs)
    }

    /// Collectors for /metrics: the kernel path's (with the userspace rows in their families),
    /// or the userspace rows alone; and the host metrics of the configured interfaces, which
    /// need no eBPF.
    pub fn collectors(&self) -> Vec<Box<dyn Collector>> {
        let mut collectors: Vec<Box<dyn Collector>> = match &self.kernel {
            Some(k) => k.collectors(),
            None => vec![
                Box::new(UdpCollector {
                    stats: None,
                    view: Arc::clone(&self.views.udp),
                    userspace: Arc::clone(&self.views.userspace),
                }),
                Box::new(UserspaceCanCollector {
                    userspace: Arc::clone(&self.views.userspace),
                }),
            ],
        };
        collectors.push(Box::new(HostCollector {
            interfaces: Arc::clone(&self.views.interfaces),
        }));
        collectors
    }

    /// Makes `p` the running configuration. On an error the previous one keeps running.
    pub async fn apply(&mut self, p: &Prepared, previous: Option<&Prepared>) -> anyhow::Result<()> {
        let result = self.apply_falling_back(p, previous).await;
        // The host metrics cover the interfaces of the configuration that runs now, whichever
        // engine runs its rules.
        let running = if result.is_ok() { Some(p) } else { previous };
        *self.views.interfaces.write().expect("lock") =
            running.map_or_else(Vec::new, |r| r.config.interfaces());
        result
    }

    async fn apply_falling_back(
        &mut self,
        p: &Prepared,
        previous: Option<&Prepared>,
    ) -> anyhow::Result<()> {
        let mut split = self.split(&p.config);
        loop {
            match self.apply_split(p, previous, split).await {
                Err(e)
                    if p.config.udp.mode == UdpMode::Auto
                        && !split.udp
                        && refused::<UdpForwardError>(&e) =>
                {
                    warn!(
                        "{e:#}; mode = \"auto\": the UDP rules run in the userspace engine ({}) instead",
                        p.config.udp.engine.label()
                    );
                    self.fell_back.udp = true;
                }
                Err(e)
                    if p.config.can.mode == CanMode::Auto
                        && !split.can
                        && refused::<CanRouterError>(&e) =>
                {
                    warn!("{e:#}; mode = \"auto\": the CAN routes run on CAN_RAW sockets instead");
                    self.fell_back.can = true;
                }
                other => return other,
            }
            split = self.split(&p.config);
        }
    }

    async fn apply_split(
        &mut self,
        p: &Prepared,
        previous: Option<&Prepared>,
        split: Split,
    ) -> anyhow::Result<()> {
        let c = &p.config;
        let mut problems = Vec::new();
        if split.udp && c.udp.mode != UdpMode::Userspace {
            c.udp.userspace_problems(&mut problems);
            c.udp
                .userspace_host_problems(&crate::host::ThisHost, &mut problems);
        }
        if split.can && c.can.mode != CanMode::Userspace {
            c.can.userspace_problems(&mut problems);
        }
        if !problems.is_empty() {
            bail!(
                "the kernel path is unavailable and the userspace engine can't run this config:\n{}",
                list(&problems)
            );
        }
        if self.kernel.is_none()
            && (!split.udp && c.udp.wants_kernel() || !split.can && c.can.wants_kernel())
        {
            bail!(
                "the kernel path was not loaded at start (udp.mode and can.mode were \"userspace\"): \
                 restart the agent to use it"
            );
        }
        let udp_rules = if split.udp { p.udp_rules() } else { Vec::new() };
        self.udp
            .apply(c.udp.engine, &udp_rules)
            .context("starting the userspace UDP engine")?;
        self.can
            .apply(if split.can { p.can_routes() } else { &[] })
            .context("starting the userspace CAN routes")?;
        let Some(kernel) = &mut self.kernel else {
            return Ok(());
        };
        let kernel_part = p.without(split.udp, split.can);
        let previous = previous.map(|prev| prev.without(split.udp, split.can));
        let result = kernel.apply(&kernel_part, previous.as_ref()).await;
        if result.is_err()
            && let Some(prev) = &previous
        {
            // The kernel kept (or restored) the previous config: so does userspace.
            let c = &prev.config;
            if let Err(e) = self
                .udp
                .apply(c.udp.engine, if split.udp { &c.udp.forward } else { &[] })
            {
                warn!("restoring the previous userspace UDP rules failed: {e}");
            }
            if let Err(e) = self
                .can
                .apply(if split.can { prev.can_routes() } else { &[] })
            {
                warn!("restoring the previous userspace CAN routes failed: {e}");
            }
        }
        result
    }

    /// Which parts run in userspace for `config`.
    fn split(&self, config: &Config) -> Split {
        Split {
            udp: config.udp.mode == UdpMode::Userspace
                || config.udp.mode == UdpMode::Auto && self.fell_back.udp,
            can: config.can.mode == CanMode::Userspace
                || config.can.mode == CanMode::Auto && self.fell_back.can,
        }
    }

    /// Stops the userspace engines; the kernel path keeps running, pinned (see
    /// [`Dataplane::leave_running`]).
    pub fn leave_running(mut self) {
        self.udp.shutdown();
        self.can.shutdown();
        if let Some(k) = self.kernel {
            k.leave_running();
        }
    }

    /// Stops the userspace engines and removes the kernel path.
    pub fn shutdown(mut self) {
        self.udp.shutdown();
        self.can.shutdown();
        if let Some(k) = self.kernel {
            k.shutdown();
        }
    }

    /// Whether nothing runs in the kernel (the userspace engines stop with the agent anyway).
    pub fn is_idle(&self) -> bool {
        self.kernel.as_ref().is_none_or(Dataplane::is_idle)
    }
}

/// Whether every part that could use the kernel path may fall back to userspace.
fn auto_only(config: &Config) -> bool {
    let udp_ok = config.udp.mode == UdpMode::Auto || !config.udp.wants_kernel();
    let can_ok = config.can.mode == CanMode::Auto || !config.can.wants_kernel();
    udp_ok && can_ok
}

/// Whether the kernel refused to attach a program for `E`'s subsystem.
fn refused<E: std::error::Error + Send + Sync + 'static + AttachFailure>(
    e: &anyhow::Error,
) -> bool {
    e.chain()
        .any(|c| c.downcast_ref::<E>().is_some_and(AttachFailure::is_attach))
}

/// Errors that may be an attach the kernel refused.
trait AttachFailure {
    fn is_attach(&self) -> bool;
}

impl AttachFailure for UdpForwardError {
    fn is_attach(&self) -> bool {
        matches!(self, Self::Attach(_) | Self::Egress { .. })
    }
}

impl AttachFailure for CanRouterError {
    fn is_attach(&self) -> bool {
        matches!(self, Self::Attach(_))
    }
}

fn list(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("  - {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}
