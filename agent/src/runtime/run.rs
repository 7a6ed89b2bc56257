//! The agent's run loop: load (taking over a pinned data plane), attach, serve metrics, reload
//! on SIGHUP, and on SIGTERM exit leaving the data plane running (or removing it).

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    pin::Pin,
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{oneshot, watch},
    task::JoinHandle,
    time::Sleep,
};
use tracing::{error, info, warn};

use crate::{
    config::Overrides,
    export::RemoteWrite,
    host::link_events::LinkEvents,
    host::resolve::{Backoff, Peers, RESOLVE_TIMEOUT, ResolveError, resolve_all},
    host::systemd::Notifier,
    kernel::state::AgentRecord,
    metrics::{self, AgentMetrics},
    registry::{self, Registry},
    runtime::http::{self, HttpState},
    runtime::planes::Planes,
    runtime::prepare::{Prepared, prepare, prepare_for_present, prepare_text},
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
    // The overrides apply to every config this agent runs: at start, on SIGHUP, and to rule
    // sets pushed through the registry.
    let overrides = &options.overrides;
    let mut current = prepare(&config_path, overrides, &Peers::new()).await?;
    let registration = registry::Settings::from_config(&current.config)?;
    let mut remote_write =
        RemoteWrite::open(&current.config).context("starting [export.remote_write]")?;
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
    collectors.extend(remote_write.as_ref().map(RemoteWrite::collector));
    let agent_metrics = Arc::new(AgentMetrics::default());
    let registry = Arc::new(metrics::registry(&agent_metrics, collectors));
    if let Some(rw) = &mut remote_write {
        rw.start(registry.clone());
    }
    http::server::raise_fd_limit(current.config.http.max_connections);
    let (http_config, http_config_rx) = watch::channel(current.config.http.clone());
    let (stop_http, http_stopped) = oneshot::channel::<()>();
    let mut http = tokio::spawn(http::serve(
        listener,
        HttpState {
            registry,
            views: dataplane.views(),
            fleet: fleet.as_ref().map(Registry::health),
            export: remote_write.as_ref().map(RemoteWrite::health),
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
    // What loading needed (the kernel's BTF above all) is freed by now.
    crate::sys::memory::release_free_heap();
    notifier.ready(&status_line(&current));
    let watchdog = notifier.spawn_watchdog();

    // Tunnel peers that did not resolve are tried again, with backoff, until they do.
    let mut backoff = Backoff::default();
    let mut retry_at: Option<Pin<Box<Sleep>>> = None;
    let mut resolving: Option<JoinHandle<BTreeMap<String, Result<SocketAddr, ResolveError>>>> =
        None;
    schedule_resolution(&current, &mut retry_at, &mut backoff);
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
                let next = prepare(&config_path, overrides, current.peers()).await;
                let _ = reload(next, &mut current, &mut dataplane, &agent_metrics).await;
                programs.send_replace(dataplane.attached_programs());
                http_config.send_if_modified(|c| replace_if_changed(c, &current.config.http));
                notifier.ready(&status_line(&current));
            }
            Some(push) = next_push(&mut fleet) => {
                info!(origin = %push.origin.display(), "rule set pushed: reloading");
                notifier.reloading();
                let next = match push.text() {
                    Ok(text) => prepare_text(text, &push.origin, overrides, current.peers()).await,
                    Err(e) => Err(e),
                };
                // A pushed rule set says nothing of who this agent is: that stays.
                let next = next.map(|mut p| {
                    p.config.agent.clone_from(&current.config.agent);
                    p.config.registry.clone_from(&current.config.registry);
                    p.config.export.clone_from(&current.config.export);
                    p
                });
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
                match prepare_for_present(&current) {
                    Ok(next) => match follow(next, &current, &mut dataplane).await {
                        Ok(Some(next)) => current = next,
                        Ok(None) => {}
                        Err(e) => error!("{e:#}"),
                    },
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
            _ = sleep_opt(&mut retry_at) => {
                retry_at = None;
                let peers: Vec<String> =
                    current.unresolved_peers().into_iter().map(str::to_owned).collect();
                // On a task: the loop goes on following interfaces and signals meanwhile.
                resolving = Some(tokio::spawn(async move {
                    resolve_all(peers.iter().map(String::as_str), RESOLVE_TIMEOUT).await
                }));
            }
            r = join_opt(&mut resolving) => {
                resolving = None;
                match r.map_err(anyhow::Error::from).and_then(|resolved| current.with_resolved(resolved)) {
                    Ok(next) => match follow(next, &current, &mut dataplane).await {
                        Ok(Some(next)) => current = next,
                        Ok(None) => {}
                        Err(e) => error!("{e:#}"),
                    },
                    Err(e) => error!("resolving tunnel peers: {e:#}"),
                }
                programs.send_replace(dataplane.attached_programs());
            }
            _ = term.recv() => { info!("SIGTERM: exiting"); break; }
            _ = int.recv() => { info!("SIGINT: exiting"); break; }
        }
        if resolving.is_none() {
            schedule_resolution(&current, &mut retry_at, &mut backoff);
        }
        // A reload's buffers (the config, compiled rules, netlink dumps) are freed by now.
        crate::sys::memory::release_free_heap();
    }
    if let Some(r) = resolving {
        r.abort();
    }
    // No keep-alives while stopping: TimeoutStopSec= bounds the rest.
    if let Some(w) = watchdog {
        w.abort();
    }
    notifier.stopping();
    if let Some(f) = fleet {
        f.shutdown().await;
    }
    if let Some(rw) = remote_write {
        rw.shutdown().await;
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

/// Applies `next`, the running config compiled again (for the interfaces there are now, or
/// with fresh peer addresses), if that changes anything: rules whose interface went wait for
/// it, the others keep running; rules whose interface came back (with a new index), or whose
/// tunnel peer resolved, are installed.
async fn follow(
    next: Prepared,
    current: &Prepared,
    dataplane: &mut Planes,
) -> anyhow::Result<Option<Prepared>> {
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
    for u in &current.unresolved {
        if !next.unresolved.iter().any(|n| n.route == u.route) {
            info!(
                route = u.route,
                peer = u.peer,
                "tunnel peer resolved: the route runs"
            );
        }
    }
    dataplane
        .apply(&next, Some(current))
        .await
        .context("following interface changes")?;
    Ok(Some(next))
}

/// Arms the retry of the tunnel peers that did not resolve (logging them), or disarms it when
/// every peer has.
fn schedule_resolution(
    current: &Prepared,
    retry_at: &mut Option<Pin<Box<Sleep>>>,
    backoff: &mut Backoff,
) {
    if current.unresolved.is_empty() {
        *retry_at = None;
        *backoff = Backoff::default();
        return;
    }
    if retry_at.is_some() {
        return;
    }
    let pause = backoff.next_pause();
    for u in &current.unresolved {
        warn!(
            route = u.route,
            "tunnel route waits for its peer: {}; resolving again in {} s, the other rules run",
            u.error,
            pause.as_secs()
        );
    }
    *retry_at = Some(Box::pin(tokio::time::sleep(pause)));
}

async fn sleep_opt(s: &mut Option<Pin<Box<Sleep>>>) {
    match s {
        Some(s) => s.as_mut().await,
        None => std::future::pending().await,
    }
}

async fn join_opt<T>(h: &mut Option<JoinHandle<T>>) -> Result<T, tokio::task::JoinError> {
    match h {
        Some(h) => h.await,
        None => std::future::pending().await,
    }
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
    if (
        &next.config.agent,
        &next.config.registry,
        &next.config.export,
    ) != (
        &current.config.agent,
        &current.config.registry,
        &current.config.export,
    ) {
        warn!("[agent], [registry] or [export] changed: that takes effect on restart");
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
