//! Wiring and lifecycle: store -> reaper -> servers -> ordered shutdown.
//!
//! `main` and the tests start the daemon the same way, through [`Daemon::start`], so the
//! tests exercise exactly what runs in production.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;
use tonic_health::ServingStatus;

use crate::api::pb::session_store_server::SessionStoreServer;
use crate::api::{SessionStoreService, FILE_DESCRIPTOR_SET};
use crate::clock::Clock;
use crate::config::Config;
use crate::observe::Telemetry;
use crate::persist::log::Log;
use crate::persist::Persistence;
use crate::store::events::{EventSink, Fanout};
use crate::store::{reaper, Store};
use crate::tls::{ReloadableTls, TlsError};

/// The gRPC service name, as health checks and reflection know it.
pub const SERVICE_NAME: &str = "sessiond.v1.SessionStore";

/// A running daemon.
pub struct Daemon {
    /// Where gRPC listens (the real port when the config asked for port 0).
    pub grpc_addr: SocketAddr,
    /// Where the admin HTTP endpoint listens.
    pub admin_addr: SocketAddr,
    /// The store, for tests that drive the reaper or read stats directly.
    pub store: Store,
    signals: mpsc::Sender<()>,
    tls: Option<Arc<ReloadableTls>>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Daemon {
    /// Binds both listeners, builds the store and starts serving.
    pub async fn start(config: Config, clock: Clock) -> anyhow::Result<Daemon> {
        config.validate()?;
        let tls = config
            .tls()
            .map(ReloadableTls::load)
            .transpose()?
            .map(Arc::new);
        let grpc = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {} (setting listen)", config.listen))?;
        let admin = TcpListener::bind(config.admin_listen)
            .await
            .with_context(|| {
                format!(
                    "cannot listen on {} (setting admin_listen)",
                    config.admin_listen
                )
            })?;
        let grpc_addr = grpc.local_addr()?;
        let admin_addr = admin.local_addr()?;
        let telemetry = Telemetry::new();
        let mut sinks: Vec<Box<dyn EventSink>> = vec![Box::new(telemetry.session_sink())];
        let (persistence, recovered) = if config.persist {
            let (p, r) = Persistence::open(
                &config.data_dir,
                clock.now(),
                config.fsync,
                telemetry.log_metrics(),
            )?;
            sinks.push(Box::new(p.log.clone()));
            (Some(p), Some(r))
        } else {
            (None, None)
        };
        let capacity = recovered.as_ref().map_or(0, |r| r.sessions.len());
        let store = Store::with_capacity(
            config.limits(),
            config.shards,
            clock,
            Box::new(Fanout(sinks)),
            capacity,
        );
        if let Some(r) = recovered {
            let sessions = r.sessions.len();
            store.restore(r.sessions);
            telemetry.recovered(sessions);
            tracing::info!(
                sessions,
                from_snapshot = r.from_snapshot,
                records_replayed = r.records,
                took_ms = r.took.as_millis() as u64,
                data_dir = %config.data_dir.display(),
                "recovered"
            );
        }
        let (signals, rx) = mpsc::channel(4);
        let task = tokio::spawn(run(
            Serving {
                grpc,
                admin,
                store: store.clone(),
                telemetry,
                config,
                tls: tls.clone(),
                persistence,
            },
            rx,
        ));
        tracing::info!(grpc = %grpc_addr, admin = %admin_addr, tls = tls.is_some(), "sessiond serving");
        Ok(Daemon {
            grpc_addr,
            admin_addr,
            store,
            signals,
            tls,
            task,
        })
    }

    /// The live TLS configuration, for a SIGHUP handler; `None` without TLS.
    pub fn tls_handle(&self) -> Option<Arc<ReloadableTls>> {
        self.tls.clone()
    }

    /// Reloads the TLS certificate files now (what SIGHUP does). Without TLS, does nothing.
    pub fn reload_tls(&self) -> Result<(), TlsError> {
        match &self.tls {
            Some(tls) => tls.reload(),
            None => Ok(()),
        }
    }

    /// A handle that starts the shutdown (a second call skips `shutdown_delay`).
    pub fn shutdown_handle(&self) -> mpsc::Sender<()> {
        self.signals.clone()
    }

    /// Waits until the daemon has shut down (after a signal through the handle).
    pub async fn wait(self) -> anyhow::Result<()> {
        drop(self.signals);
        self.task.await.context("the server task failed")?
    }

    /// Signals shutdown and waits for it to finish.
    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.signals.send(()).await;
        self.wait().await
    }
}

/// Everything `run` serves.
struct Serving {
    grpc: TcpListener,
    admin: TcpListener,
    store: Store,
    telemetry: Telemetry,
    config: Config,
    tls: Option<Arc<ReloadableTls>>,
    persistence: Option<Persistence>,
}

/// Serves until the first message (or the closing) of `signals`, then shuts down in order:
/// not-ready, `shutdown_delay`, stop accepting and drain within `shutdown_grace`, stop the
/// reaper, stop the admin endpoint.
async fn run(serving: Serving, mut signals: mpsc::Receiver<()>) -> anyhow::Result<()> {
    let Serving {
        grpc,
        admin,
        store,
        telemetry,
        config,
        tls,
        persistence,
    } = serving;
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status(SERVICE_NAME, ServingStatus::Serving)
        .await;
    let ready = Arc::new(AtomicBool::new(true));
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("cannot build the reflection service")?;

    let (stop_serving, serving) = watch::channel(false);
    let (stop_admin, admin_running) = watch::channel(false);
    let reaper = tokio::spawn(reaper::run(
        store.clone(),
        config.reaper_interval,
        config.reaper_batch,
        telemetry.reaper_observer(),
        serving.clone(),
    ));
    let admin = tokio::spawn(crate::admin::serve(
        admin,
        telemetry.clone(),
        store.clone(),
        ready.clone(),
        admin_running,
    ));

    let guesses = Arc::new(telemetry.guess_watch(config.guess_threshold, config.guess_window));
    let log = persistence.as_ref().map(|p| p.log.clone());
    let snapshots = persistence.as_ref().map(|p| {
        tokio::spawn(snapshot_loop(
            p.dir.clone(),
            p.log.clone(),
            store.clone(),
            config.snapshot_log_bytes,
            config.snapshot_interval,
            telemetry.snapshot_metrics(),
            serving.clone(),
        ))
    });
    let service = SessionStoreServer::new(SessionStoreService::new(
        store,
        guesses,
        log,
        config.max_batch_ids,
    ))
    .max_decoding_message_size(config.max_message_bytes)
    .max_encoding_message_size(config.max_message_bytes);
    let mut drained = serving.clone();
    let until_drained = async move {
        let _ = drained.wait_for(|s| *s).await;
    };
    let router = Server::builder()
        .timeout(config.request_timeout)
        .load_shed(true)
        .max_concurrent_streams(config.max_concurrent_streams)
        .http2_max_header_list_size(config.max_header_list_bytes)
        .http2_keepalive_interval(Some(config.keepalive_interval))
        .http2_keepalive_timeout(Some(config.keepalive_timeout))
        .layer(telemetry.grpc_layer())
        // One budget for the whole daemon; with load shedding above, a full budget answers
        // RESOURCE_EXHAUSTED at once instead of queueing.
        .layer(tower::limit::GlobalConcurrencyLimitLayer::new(
            config.max_concurrent_requests,
        ))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(service);
    let mut grpc_server = match &tls {
        Some(tls) => {
            tokio::spawn(watch_tls(
                tls.clone(),
                config.tls_watch_interval,
                serving.clone(),
            ));
            tokio::spawn(router.serve_with_incoming_shutdown(
                crate::tls::incoming(grpc, tls.clone()),
                until_drained,
            ))
        }
        None => tokio::spawn(router.serve_with_incoming_shutdown(
            TcpIncoming::from(grpc).with_nodelay(Some(true)),
            until_drained,
        )),
    };

    tokio::select! {
        _ = signals.recv() => {}
        // The server only ends by itself on a fatal error: report it.
        result = &mut grpc_server => {
            let _ = stop_serving.send(true);
            let _ = stop_admin.send(true);
            return match result {
                Ok(Ok(())) => Err(anyhow::anyhow!("the gRPC server stopped unexpectedly")),
                Ok(Err(e)) => Err(e).context("the gRPC server failed"),
                Err(e) => Err(e).context("the gRPC server task failed"),
            };
        }
    }

    tracing::info!("shutdown: reporting NOT_SERVING on health and /readyz");
    ready.store(false, Ordering::Release);
    health
        .set_service_status("", ServingStatus::NotServing)
        .await;
    health
        .set_service_status(SERVICE_NAME, ServingStatus::NotServing)
        .await;
    if !config.shutdown_delay.is_zero() {
        tracing::info!(delay = ?config.shutdown_delay, "shutdown: still serving while load balancers catch up");
        let _ = tokio::time::timeout(config.shutdown_delay, signals.recv()).await;
    }

    tracing::info!(grace = ?config.shutdown_grace, "shutdown: draining in-flight requests");
    let _ = stop_serving.send(true);
    match tokio::time::timeout(config.shutdown_grace, &mut grpc_server).await {
        Ok(Ok(Ok(()))) => tracing::info!("shutdown: gRPC drained"),
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "shutdown: gRPC server ended with an error"),
        Ok(Err(e)) => tracing::warn!(error = %e, "shutdown: gRPC server task failed"),
        Err(_) => {
            grpc_server.abort();
            tracing::warn!("shutdown: drain deadline passed; cutting remaining connections");
        }
    }
    if let Err(e) = reaper.await {
        tracing::warn!(error = %e, "shutdown: reaper task failed");
    }
    tracing::info!("shutdown: reaper stopped");
    if let Some(task) = snapshots {
        let _ = task.await;
    }
    if let Some(p) = &persistence {
        let log = p.log.clone();
        let _ = tokio::task::spawn_blocking(move || log.close()).await;
        tracing::info!("shutdown: log flushed and synced");
    }
    let _ = stop_admin.send(true);
    match admin.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "shutdown: admin endpoint failed"),
        Err(e) => tracing::warn!(error = %e, "shutdown: admin task failed"),
    }
    tracing::info!("shutdown: complete");
    Ok(())
}

/// Reloads the TLS files when they change, until `stop` turns true.
async fn watch_tls(
    tls: Arc<ReloadableTls>,
    every: std::time::Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        match tls.reload_if_changed() {
            Some(Ok(())) => tracing::info!("TLS files changed: reloaded"),
            Some(Err(e)) => {
                tracing::error!(error = %e, "TLS files changed but cannot be loaded; keeping the previous certificate")
            }
            None => {}
        }
    }
}

/// Takes a snapshot when the log segment reaches `max_bytes` or `every` has passed with
/// changes, one at a time, off the async threads; stops when `stop` turns true.
async fn snapshot_loop(
    dir: std::path::PathBuf,
    log: Arc<Log>,
    store: Store,
    max_bytes: u64,
    every: std::time::Duration,
    (written, age): (metrics::Counter, metrics::Gauge),
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = std::time::Instant::now();
    let mut appended_at_last = log.appended();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        age.set(last.elapsed().as_secs_f64());
        let changed = log.appended() != appended_at_last;
        if !(log.segment_bytes() >= max_bytes || (changed && last.elapsed() >= every)) {
            continue;
        }
        let (dir, log2, store) = (dir.clone(), log.clone(), store.clone());
        let started = std::time::Instant::now();
        appended_at_last = log.appended();
        match tokio::task::spawn_blocking(move || crate::persist::snapshot(&dir, &log2, &store))
            .await
        {
            Ok(Ok(s)) => {
                written.increment(1);
                last = std::time::Instant::now();
                tracing::info!(
                    seq = s.seq,
                    sessions = s.sessions,
                    bytes = s.bytes,
                    took_ms = started.elapsed().as_millis() as u64,
                    "snapshot written"
                );
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "snapshot failed; the log keeps growing until one succeeds")
            }
            Err(e) => tracing::error!(error = %e, "snapshot task failed"),
        }
    }
}
