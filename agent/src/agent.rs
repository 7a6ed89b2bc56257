//! The agent's run loop: load (taking over a pinned data plane), attach, serve metrics, reload
//! on SIGHUP, and on SIGTERM exit leaving the data plane running (or removing it).

use std::{
    path::PathBuf,
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{oneshot, watch},
};
use tracing::{error, info, warn};

use crate::{
    config::Overrides,
    dataplane::{Prepared, prepare, prepare_for_present, prepare_text},
    http::{self, HttpState},
    link_events::LinkEvents,
    metrics::{self, AgentMetrics},
    planes::Planes,
    registry::{self, Registry},
    state::AgentRecord,
    systemd::Notifier,
};

/// How `edgeplane run` was asked to run.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Overrides `[agent] bpffs`.
    pub bpffs: Option<PathBuf>,
    /// Remove the data plane on exit instead of leaving it running.
    pub detach_on_exit: bool,
    /// `--service-name`, `--vin`, `--spiffe-id`, `--etcd-endpoints`.
    pub overrides: Overrides,
}

pub async fn run(config_path: PathBuf, options: RunOptions) -> anyhow::Result<()> {
    // Everything that can be checked is checked before the data plane is touched.
    let mut current = prepare(&config_path)?;
    current
        .config
        .apply_overrides(&options.overrides, &config_path)?;
    let registration = registry::Settings::from_config(&current.config)?;
    let notifier = Arc::new(Notifier::from_env());
    let listen = current.config.http.listen;
    let listener = http::server::bind(listen)
        .with_context(|| format!("cannot listen on {listen} (http.listen)"))?;

    let bpffs = options
        .bpffs
        .clone()
        .unwrap_or_else(|| current.config.agent.bpffs.clone());
    let record = AgentRecord {
        pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        started_at: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        config: std::path::absolute(&config_path).unwrap_or_else(|_| config_path.clone()),
        http: listen,
    };
    let mut dataplane = Planes::load(&current.config, &bpffs, record)?;
    if let Err(e) = dataplane.apply(&current, None).await {
        if dataplane.is_idle() {
            dataplane.shutdown();
        } else {
            dataplane.leave_running();
        }
        return Err(e);
    }
    let (programs, programs_rx) = watch::channel(dataplane.attached_programs());
    let mut fleet = registration.map(|s| Registry::spawn(s, programs_rx));
    let mut collectors = dataplane.collectors();
    collectors.extend(fleet.as_ref().map(Registry::collector));
    let agent_metrics = Arc::new(AgentMetrics::default());
    let registry = Arc::new(metrics::registry(&agent_metrics, collectors));
    http::server::raise_fd_limit(current.config.http.max_connections);
    let (http_config, http_config_rx) = watch::channel(current.config.http.clone());
    let (stop_http, http_stopped) = oneshot::channel::<()>();
    let mut http = tokio::spawn(http::serve(
        listener,
        HttpState {
            registry,
            views: dataplane.views(),
            fleet: fleet.as_ref().map(Registry::health),
            events: dataplane.events(),
        },
        http_config_rx,
        agent_metrics.http.clone(),
        async {
            let _ = http_stopped.await;
        },
    ));
    info!(
        version = env!("CARGO_PKG_VERSION"),
        udp_rules = current.config.udp.forward.len(),
        can_routes = current.config.can.route.len(),
        "edgeplane running; metrics on http://{listen}/metrics"
    );
    notifier.ready(&status_line(&current));
    let watchdog = notifier.spawn_watchdog();

    let mut links = LinkEvents::open().context("subscribing to interface events (rtnetlink)")?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut http_failure = None;
    loop {
        tokio::select! {
            _ = hup.recv() => {
                info!(config = %config_path.display(), "SIGHUP: reloading");
                notifier.reloading();
                let _ = reload(prepare(&config_path), &mut current, &mut dataplane, &agent_metrics).await;
                programs.send_replace(dataplane.attached_programs());
                http_config.send_if_modified(|c| replace_if_changed(c, &current.config.http));
                notifier.ready(&status_line(&current));
            }
            Some(push) = next_push(&mut fleet) => {
                info!(origin = %push.origin.display(), "rule set pushed: reloading");
                notifier.reloading();
                let next = push.text().and_then(|text| prepare_text(text, &push.origin));
                let result = reload(next, &mut current, &mut dataplane, &agent_metrics).await;
                programs.send_replace(dataplane.attached_programs());
                http_config.send_if_modified(|c| replace_if_changed(c, &current.config.http));
                if let Some(f) = &fleet {
                    f.report(&push, result);
                }
                notifier.ready(&status_line(&current));
            }
            r = links.changed() => {
                if let Err(e) = r {
                    warn!("interface events: {e}");
                    continue;
                }
                match follow_interfaces(&current, &mut dataplane).await {
                    Ok(Some(next)) => current = next,
                    Ok(None) => {}
                    Err(e) => error!("{e:#}"),
                }
                programs.send_replace(dataplane.attached_programs());
            }
            // It only ends when told to: anything else is a bug, and an agent whose
            // endpoints are gone should be restarted (the data plane stays).
            ended = &mut http => {
                error!("the HTTP server stopped unexpectedly: exiting");
                http_failure = Some(match ended {
                    Ok(()) => anyhow::anyhow!("the HTTP server stopped unexpectedly"),
                    Err(e) => anyhow::Error::new(e).context("the HTTP server task failed"),
                });
                break;
            }
            _ = term.recv() => { info!("SIGTERM: exiting"); break; }
            _ = int.recv() => { info!("SIGINT: exiting"); break; }
        }
    }
    // No keep-alives while stopping: TimeoutStopSec= bounds the rest.
    if let Some(w) = watchdog {
        w.abort();
    }
    notifier.stopping();
    if let Some(f) = fleet {
        f.shutdown().await;
    }
    if options.detach_on_exit {
        info!("detaching the data plane (--detach-on-exit)");
        dataplane.shutdown();
    } else {
        dataplane.leave_running();
    }
    if let Some(e) = http_failure {
        return Err(e);
    }
    let _ = stop_http.send(());
    http.await.context("the HTTP server task failed")
}

/// The HTTP limits apply on reload (`listen` does not: see [`apply`]).
fn replace_if_changed(
    running: &mut crate::config::HttpConfig,
    new: &crate::config::HttpConfig,
) -> bool {
    if running == new {
        return false;
    }
    running.clone_from(new);
    true
}

/// Compiles the running config again for the interfaces there are now and applies it if that
/// changes anything: rules whose interface went wait for it, the others keep running; rules
/// whose interface came back (with a new index) are attached again.
async fn follow_interfaces(
    current: &Prepared,
    dataplane: &mut Planes,
) -> anyhow::Result<Option<Prepared>> {
    let next = prepare_for_present(current.config.clone())?;
    if next == *current {
        return Ok(None);
    }
    for w in &next.waiting {
        if !current.waiting.contains(w) {
            warn!(
                iface = w.iface,
                rule = w.name,
                kind = w.kind,
                "interface missing: the rule waits for it, the others keep running"
            );
        }
    }
    for w in &current.waiting {
        if !next.waiting.contains(w) {
            info!(
                iface = w.iface,
                rule = w.name,
                kind = w.kind,
                "interface back: attaching again"
            );
        }
    }
    dataplane
        .apply(&next, Some(current))
        .await
        .context("following interface changes")?;
    Ok(Some(next))
}

/// Applies a new configuration (the file again on SIGHUP, or a rule set pushed through the
/// registry: one path for both) and counts the outcome; on any error the running
/// configuration stays. Returns the rejection text for the registry record.
async fn reload(
    next: anyhow::Result<Prepared>,
    current: &mut Prepared,
    dataplane: &mut Planes,
    agent_metrics: &AgentMetrics,
) -> Result<(), String> {
    let result = apply(next, current, dataplane).await;
    agent_metrics.reloaded(result.is_ok());
    match result {
        Ok(next) => {
            *current = next;
            Ok(())
        }
        Err(e) => {
            error!("reload rejected, previous rules keep running: {e:#}");
            Err(format!("{e:#}"))
        }
    }
}

async fn apply(
    next: anyhow::Result<Prepared>,
    current: &Prepared,
    dataplane: &mut Planes,
) -> anyhow::Result<Prepared> {
    let next = next?;
    if next.config.http.listen != current.config.http.listen {
        warn!(
            "http.listen changed to {}: that takes effect on restart",
            next.config.http.listen
        );
    }
    dataplane.apply(&next, Some(current)).await?;
    info!(
        udp_rules = next.config.udp.forward.len(),
        can_routes = next.config.can.route.len(),
        "reload applied"
    );
    Ok(next)
}

/// The next pushed rule set; never, without registration.
async fn next_push(fleet: &mut Option<Registry>) -> Option<registry::Push> {
    match fleet {
        Some(f) => f.next_push().await,
        None => std::future::pending().await,
    }
}

/// systemd's STATUS= line.
fn status_line(p: &Prepared) -> String {
    format!(
        "forwarding: {} UDP rules, {} CAN routes",
        p.config.udp.forward.len(),
        p.config.can.route.len()
    )
}
