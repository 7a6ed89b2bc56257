//! The agent's run loop: load, attach, serve metrics, reload on SIGHUP, detach on SIGTERM.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
};

use anyhow::Context as _;
use aya::Ebpf;
use edgeplane_common::udp_forward::{TC_PROGRAM, XDP_PROGRAM};
use tokio::{
    io::unix::AsyncFd,
    net::TcpListener,
    signal::unix::{SignalKind, signal},
    sync::oneshot,
};
use tracing::{error, info, warn};

use crate::{
    config::Config,
    http::{self, HttpState},
    loader,
    metrics::{self, AgentMetrics},
    netdev,
    udp_forward::{
        UdpForwarder, UdpView,
        rules::{self, CompiledRule},
        stats::UdpCollector,
    },
};

/// Reads, validates and host-checks a config, and compiles its rules.
pub fn prepare(path: &Path) -> anyhow::Result<(Config, Vec<CompiledRule>)> {
    let config = Config::load(path)?;
    config.check_host(path)?;
    let compiled = config
        .udp
        .forward
        .iter()
        .map(|r| rules::compile(r, &netdev::index))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((config, compiled))
}

pub async fn run(config_path: PathBuf) -> anyhow::Result<()> {
    // Everything that can be checked is checked before the data plane is touched.
    let (config, compiled) = prepare(&config_path)?;
    let listen = config.http.listen;
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen} (http.listen)"))?;

    let mut ebpf = loader::load(&[XDP_PROGRAM, TC_PROGRAM])?;
    forward_kernel_logs(&mut ebpf);
    let mut udp = UdpForwarder::new(&mut ebpf)?;
    if let Err(e) = udp.apply(&mut ebpf, config.udp.mode, compiled) {
        udp.shutdown(&mut ebpf);
        return Err(e).context("installing the UDP rules");
    }
    let view = Arc::new(RwLock::new(udp.view()));

    let agent_metrics = Arc::new(AgentMetrics::default());
    let registry = Arc::new(metrics::registry(
        &agent_metrics,
        vec![Box::new(UdpCollector {
            stats: udp.stats(),
            view: Arc::clone(&view),
        })],
    ));
    let (stop_http, http_stopped) = oneshot::channel::<()>();
    let http = tokio::spawn(http::serve(
        listener,
        HttpState {
            registry,
            udp: Arc::clone(&view),
        },
        async {
            let _ = http_stopped.await;
        },
    ));
    info!(
        version = env!("CARGO_PKG_VERSION"),
        rules = config.udp.forward.len(),
        "edgeplane running; metrics on http://{listen}/metrics"
    );

    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            _ = hup.recv() => {
                let ok = reload(&config_path, listen, &mut ebpf, &mut udp, &view);
                agent_metrics.reloaded(ok);
            }
            _ = term.recv() => { info!("SIGTERM: detaching and exiting"); break; }
            _ = int.recv() => { info!("SIGINT: detaching and exiting"); break; }
        }
    }
    udp.shutdown(&mut ebpf);
    let _ = stop_http.send(());
    match http.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e).context("HTTP server failed"),
        Err(e) => Err(e).context("HTTP server task failed"),
    }
}

/// Applies the config file again; on any error the running rules stay as they were.
fn reload(
    path: &Path,
    listen: std::net::SocketAddr,
    ebpf: &mut Ebpf,
    udp: &mut UdpForwarder,
    view: &RwLock<UdpView>,
) -> bool {
    info!(config = %path.display(), "SIGHUP: reloading");
    let result = prepare(path).and_then(|(config, compiled)| {
        if config.http.listen != listen {
            warn!(
                "http.listen changed to {}: that takes effect on restart",
                config.http.listen
            );
        }
        let n = compiled.len();
        udp.apply(ebpf, config.udp.mode, compiled)?;
        Ok(n)
    });
    *view.write().expect("view lock") = udp.view();
    match result {
        Ok(n) => {
            info!(rules = n, "reload applied");
            true
        }
        Err(e) => {
            error!("reload rejected, previous rules keep running: {e:#}");
            false
        }
    }
}

/// Relays aya-log records from the programs into the agent's log.
fn forward_kernel_logs(ebpf: &mut Ebpf) {
    let logger = match aya_log::EbpfLogger::init(ebpf) {
        Ok(l) => l,
        Err(e) => {
            warn!("kernel program logs unavailable: {e}");
            return;
        }
    };
    // SAFETY: the AsyncFd owns the logger, so the fd stays open for as long as it is registered.
    let registered =
        unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            warn!("kernel program logs unavailable: {e}");
            return;
        }
    };
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}
