//! Wiring and lifecycle: tenants (store, log, reaper, snapshots) -> servers -> ordered
//! shutdown.
//!
//! `main` and the tests start the daemon the same way, through [`Daemon::start`], so the
//! tests exercise exactly what runs in production.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tonic::transport::Server;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use crate::api::budget::Budget;
use crate::api::forward::{ForwardLayer, Leadership};
use crate::api::{Group, SessionStoreService, Settings, FILE_DESCRIPTOR_SET};
use crate::clock::Clock;
use crate::cluster::member;
use crate::config::{Config, TenantConfig};
use crate::observe::{ReaperMetrics, SnapshotMetrics, Telemetry};
use crate::persist::{snapshotter, Persistence};
use crate::proto::serve::session_store_server::SessionStoreServer;
use crate::store::events::{EventSink, Fanout};
use crate::store::{reaper, MemoryPool, Store};
use crate::tenant::guessing::GuessWatch;
use crate::tenant::{
    memory_pool, parse_token_sha256, tenant_limits, Credential, Tenant, Tenants, DEFAULT_TENANT,
};
use crate::tls::{Port, ReloadableTls, TlsError};
use crate::transport::{Accept, AuthLayer, Connections};

mod membership;

use self::membership::{start_member, MemberTasks, Membership};
pub use crate::proto::SERVICE_NAME;

/// How long shutdown waits for cut connections to be gone. A cut connection fails at its
/// task's next poll, which the cut itself triggers, so this is only a backstop.
const CUT_DEADLINE: std::time::Duration = std::time::Duration::from_secs(5);

/// A running daemon.
pub struct Daemon {
    /// Where gRPC listens (the real port when the config asked for port 0).
    pub grpc_addr: SocketAddr,
    /// Where the admin HTTP endpoint listens.
    pub admin_addr: SocketAddr,
    /// The first tenant's store (the only one in single-tenant mode), for tests that drive
    /// the reaper or read stats directly.
    pub store: Store,
    /// Every tenant.
    pub tenants: Arc<Tenants>,
    signals: mpsc::Sender<()>,
    tls: Option<Arc<ReloadableTls>>,
    /// The peer port's TLS, on a cluster member with peer TLS.
    peer_tls: Option<Arc<ReloadableTls>>,
    task: JoinHandle<anyhow::Result<()>>,
}

/// One tenant as started: its share of the daemon and its background work's inputs.
struct Started {
    tenant: Arc<Tenant>,
    credentials: Vec<Credential>,
    persistence: Option<Persistence>,
    background: BackgroundMetrics,
}

/// What one tenant's background tasks record through: its parts of the tenant's metrics.
struct BackgroundMetrics {
    reaper: ReaperMetrics,
    snapshots: SnapshotMetrics,
}

/// Recovers and builds one tenant's store, with its metrics made in one call and handed out
/// by part: to the store, the log and the guess watch here, to the reaper and the snapshot
/// task when [`start_background`] starts them.
fn start_tenant(
    config: &Config,
    telemetry: &Telemetry,
    clock: &Clock,
    pool: &Arc<MemoryPool>,
    tenant: Option<&TenantConfig>,
) -> anyhow::Result<Started> {
    let (name, limits, dir) = match tenant {
        None => (
            DEFAULT_TENANT,
            config.limits.clone(),
            config.data_dir.clone(),
        ),
        Some(t) => (
            t.name.as_str(),
            tenant_limits(config, t),
            config.data_dir.join("tenants").join(&t.name),
        ),
    };
    let metrics = telemetry.tenant(name, config.persist);
    let mut sinks: Vec<Box<dyn EventSink>> = vec![Box::new(metrics.sessions)];
    let (persistence, recovery) = if config.persist {
        let (p, r) = Persistence::open(&dir, config.fsync, metrics.log)?;
        sinks.push(Box::new(p.log.clone()));
        (Some(p), Some(r))
    } else {
        (None, None)
    };
    let build = |capacity| {
        Store::in_pool(
            limits,
            config.shards,
            clock.clone(),
            Box::new(Fanout(sinks)),
            capacity,
            pool.clone(),
        )
    };
    let store = match recovery {
        None => build(0),
        Some(recovery) => {
            let r = recovery.replay(false, build)?;
            // Sessions that died while the daemon was down end now, as the reaper would end
            // them, so the counts and the memory start true.
            let expired = r.store.reap(usize::MAX).expired;
            let sessions = r.store.stats().sessions;
            telemetry.recovered(name, sessions);
            tracing::info!(
                tenant = name,
                sessions,
                expired_while_down = expired,
                from_snapshot = r.from_snapshot,
                records_replayed = r.records,
                took_ms = r.took.as_millis() as u64,
                data_dir = %dir.display(),
                "recovered"
            );
            r.store
        }
    };
    let guesses = GuessWatch::new(config.guess_threshold, config.guess_window, metrics.guesses);
    let log = persistence.as_ref().map(|p| p.log.clone());
    let credentials = tenant.map_or_else(Vec::new, |t| {
        let mut c = Vec::new();
        if let Some(hash) = parse_token_sha256(&t.token_sha256) {
            c.push(Credential::TokenSha256(hash));
        }
        if !t.client_subject.is_empty() {
            c.push(Credential::ClientSubject(t.client_subject.clone()));
        }
        c
    });
    Ok(Started {
        tenant: Tenant::new(name, store, guesses, log),
        credentials,
        persistence,
        background: BackgroundMetrics {
            reaper: metrics.reaper,
            snapshots: metrics.snapshots,
        },
    })
}

impl Daemon {
    /// Binds both listeners, builds the stores and starts serving.
    pub async fn start(config: Config, clock: Clock) -> anyhow::Result<Daemon> {
        config.validate()?;
        let protected = config.tls().is_some()
            && (!config.tls_client_ca.as_os_str().is_empty() || !config.tenants.is_empty());
        if config.insecure_listen && !config.listen.ip().is_loopback() && !protected {
            tracing::warn!(
                listen = %config.listen,
                "insecure_listen: serving beyond loopback WITHOUT TLS and client \
                 authentication; anyone who can reach the port can read and forge every \
                 session. Set tls_cert, tls_key and tls_client_ca or [[tenants]] unless every \
                 host on that network is trusted"
            );
        }
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
        let pool = memory_pool(&config);
        let mut membership = None;
        let started = if let Some(cluster) = &config.cluster {
            let (started, m) =
                start_member(&config, cluster, &telemetry, &clock, &pool, grpc_addr).await?;
            membership = Some(m);
            vec![started]
        } else if config.tenants.is_empty() {
            vec![start_tenant(&config, &telemetry, &clock, &pool, None)?]
        } else {
            config
                .tenants
                .iter()
                .map(|t| start_tenant(&config, &telemetry, &clock, &pool, Some(t)))
                .collect::<anyhow::Result<_>>()?
        };
        let (tenants, (persistence, background)): (Vec<_>, (Vec<_>, Vec<_>)) = started
            .into_iter()
            .map(|s| ((s.tenant, s.credentials), (s.persistence, s.background)))
            .unzip();
        // The default tenant has no credentials, which is what makes single-tenant mode open;
        // configured tenants always have some (the config requires it).
        let tenants = Arc::new(Tenants::with_credentials(tenants));
        let store = tenants.all()[0].store.clone();
        let peer_tls = membership.as_ref().and_then(|m| m.node.peer_tls());
        let (signals, rx) = mpsc::channel(4);
        let task = tokio::spawn(run(
            Listeners { grpc, admin },
            Serving {
                tenants: tenants.clone(),
                telemetry,
                config,
                tls: tls.clone(),
                persistence,
                membership,
            },
            background,
            rx,
        ));
        tracing::info!(grpc = %grpc_addr, admin = %admin_addr, tls = tls.is_some(), tenants = tenants.all().len(), "sessiond serving");
        Ok(Daemon {
            grpc_addr,
            admin_addr,
            store,
            tenants,
            signals,
            tls,
            peer_tls,
            task,
        })
    }

    /// The live TLS configurations (the client port's, the peer port's), for a SIGHUP
    /// handler; empty without TLS.
    pub fn tls_handles(&self) -> Vec<Arc<ReloadableTls>> {
        self.tls.iter().chain(&self.peer_tls).cloned().collect()
    }

    /// Reloads the TLS certificate files now (what SIGHUP does): the client port's, then the
    /// peer port's. Without TLS, does nothing.
    pub fn reload_tls(&self) -> Result<(), TlsError> {
        for tls in self.tls_handles() {
            tls.reload()?;
        }
        Ok(())
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

/// The two bound ports.
struct Listeners {
    grpc: TcpListener,
    admin: TcpListener,
}

/// Everything `run` serves.
struct Serving {
    tenants: Arc<Tenants>,
    telemetry: Telemetry,
    config: Config,
    tls: Option<Arc<ReloadableTls>>,
    /// Each tenant's, in the order of `tenants`.
    persistence: Vec<Option<Persistence>>,
    /// This node's part in a replicated group; `None` on a single node.
    membership: Option<Membership>,
}

/// Serves until the first message (or the closing) of `signals`, then shuts down in order
/// (see [`shut_down`]). A gRPC server that ends by itself has failed: everything else is
/// told to stop and the failure is returned. `background` is each tenant's, in the order
/// of `serving.tenants`.
async fn run(
    listeners: Listeners,
    serving: Serving,
    background: Vec<BackgroundMetrics>,
    mut signals: mpsc::Receiver<()>,
) -> anyhow::Result<()> {
    let servers = build_servers(listeners, &serving).await?;
    let background = start_background(&serving, background, servers.stop_serving.subscribe());
    let member_tasks = serving
        .membership
        .as_ref()
        .map(|m| MemberTasks::start(m, &servers));
    let mut running = servers.serve();
    tokio::select! {
        _ = signals.recv() => {}
        result = &mut running.grpc => {
            let _ = running.stop_serving.send(true);
            let _ = running.stop_admin.send(true);
            running.connections.cut();
            return match result {
                Ok(Ok(())) => Err(anyhow::anyhow!("the gRPC server stopped unexpectedly")),
                Ok(Err(e)) => Err(e).context("the gRPC server failed"),
                Err(e) => Err(e).context("the gRPC server task failed"),
            };
        }
    }
    shut_down(running, background, member_tasks, signals, &serving).await;
    Ok(())
}

/// What the gRPC server's task returns.
type GrpcResult = Result<(), tonic::transport::Error>;

/// The gRPC and admin servers, built but not yet serving: building can fail, and nothing
/// should start (no accept loop, no background task) for a daemon that cannot serve.
struct Servers {
    health: HealthReporter,
    /// What `/readyz` reports.
    ready: Arc<AtomicBool>,
    /// Every gRPC connection, for shutdown to cut.
    connections: Connections,
    /// Turns true when the drain starts: the gRPC server stops accepting, Pipeline streams
    /// end, and the background tasks stop.
    stop_serving: watch::Sender<bool>,
    /// Turns true at the last step of shutdown, when the admin endpoint stops.
    stop_admin: watch::Sender<bool>,
    grpc: Pin<Box<dyn Future<Output = GrpcResult> + Send>>,
    admin: Pin<Box<dyn Future<Output = std::io::Result<()>> + Send>>,
}

/// The servers, serving: what shutdown stops, in order.
struct Running {
    health: HealthReporter,
    ready: Arc<AtomicBool>,
    connections: Connections,
    stop_serving: watch::Sender<bool>,
    stop_admin: watch::Sender<bool>,
    grpc: JoinHandle<GrpcResult>,
    admin: JoinHandle<std::io::Result<()>>,
}

impl Servers {
    /// Starts both servers.
    fn serve(self) -> Running {
        Running {
            health: self.health,
            ready: self.ready,
            connections: self.connections,
            stop_serving: self.stop_serving,
            stop_admin: self.stop_admin,
            grpc: tokio::spawn(self.grpc),
            admin: tokio::spawn(self.admin),
        }
    }
}

/// Builds the gRPC server (health and reflection beside the session store, behind the
/// metrics, budget and authentication layers) and the admin endpoint, in one place so the
/// ports' limits are read from the config side by side, and so the unary budget layer and
/// the Pipeline service share one [`Budget`].
async fn build_servers(listeners: Listeners, serving: &Serving) -> anyhow::Result<Servers> {
    let Serving {
        tenants,
        telemetry,
        config,
        tls,
        persistence,
        membership,
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
    let (stop_serving, stopping) = watch::channel(false);
    let (stop_admin, admin_stopping) = watch::channel(false);

    let admin_tls = tls
        .clone()
        .filter(|_| config.admin_tls)
        .map(|t| (t, Port::Admin));
    let admin = crate::admin::serve(
        listeners.admin,
        crate::admin::Limits {
            tls: admin_tls,
            max_connections: config.admin_max_connections,
            handshake_timeout: config.handshake_timeout,
            header_read_timeout: config.admin_header_read_timeout,
        },
        telemetry.clone(),
        tenants.clone(),
        ready.clone(),
        admin_stopping,
    );

    // One budget of requests in flight: unary requests take a permit in the layer below,
    // each pipelined operation takes its own in the service.
    let budget = Budget::new(config.max_concurrent_requests);
    let edge_metrics = Arc::new(telemetry.edge_metrics());
    let service = SessionStoreService::with(Settings {
        max_batch_ids: config.max_batch_ids,
        max_message_bytes: config.max_message_bytes,
        request_timeout: Some(config.request_timeout),
        budget: Some(budget.clone()),
        metrics: Some(edge_metrics.clone()),
        shutdown: Some(stopping.clone()),
        logs: tenants
            .all()
            .iter()
            .zip(persistence)
            .filter_map(|(t, p)| Some((t.name.clone(), p.as_ref()?.log.clone())))
            .collect(),
        group: membership
            .as_ref()
            .map(|m| m.member.clone() as Arc<dyn Group>),
    });
    let service = SessionStoreServer::new(service)
        .max_decoding_message_size(config.max_message_bytes)
        .max_encoding_message_size(config.max_message_bytes);
    let conn_metrics = telemetry.conn_metrics();
    let auth = AuthLayer::new(
        tenants.clone(),
        config.unauthenticated_requests,
        config.max_unauthenticated_message_bytes,
        conn_metrics.clone(),
    );
    if let Some(m) = membership {
        m.serve_forwarded(
            budget.layer(edge_metrics.clone()),
            auth.clone(),
            service.clone(),
        );
    }
    let mut drained = stopping;
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
        // One budget for the whole daemon: a full budget answers RESOURCE_EXHAUSTED at once
        // instead of queueing.
        .layer(budget.layer(edge_metrics))
        .layer(auth)
        // In a group, after authentication: a call is forwarded to the leader only once
        // this node has checked who makes it.
        .layer(tower::util::option_layer(membership.as_ref().map(|m| {
            ForwardLayer::new(m.member.clone() as Arc<dyn Leadership>)
        })))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(service);
    let connections = Connections::new();
    let accept = Accept {
        tls: tls.clone().map(|t| (t, Port::Grpc)),
        max_connections: config.max_connections,
        handshake_timeout: config.handshake_timeout,
        http2_preface: true,
        metrics: conn_metrics,
    };
    let (listener, tracked) = (listeners.grpc, connections.clone());
    // The accept loop starts when the server does.
    let grpc = async move {
        let incoming = crate::transport::incoming(listener, accept, tracked);
        router
            .serve_with_incoming_shutdown(incoming, until_drained)
            .await
    };
    Ok(Servers {
        health,
        ready,
        connections,
        stop_serving,
        stop_admin,
        grpc: Box::pin(grpc),
        admin: Box::pin(admin),
    })
}

/// Starts each tenant's reaper and snapshotter, and the TLS watch, all stopping when `stop`
/// turns true. They start here, not inside the tenants, because shutdown must stop them in
/// its order: after the drain (a draining request may still end sessions and log), before
/// the logs they write to are closed. Returns the tasks shutdown waits for; the TLS watch
/// writes nothing, so nothing waits for it.
fn start_background(
    serving: &Serving,
    metrics: Vec<BackgroundMetrics>,
    stop: watch::Receiver<bool>,
) -> Vec<JoinHandle<()>> {
    let Serving {
        tenants,
        telemetry,
        config,
        tls,
        persistence,
        membership,
    } = serving;
    let mut background = Vec::new();
    if let Some(m) = membership {
        background.push(tokio::spawn(
            m.node.observe(telemetry.cluster(), stop.clone()),
        ));
        // A member's expiry is the leader's proposal; its snapshots are its own Raft
        // snapshots, by the single node's rule (not the single node's snapshotter below).
        let (node, stopped) = (m.node.clone(), stop.clone());
        let (min_bytes, percent) = (config.snapshot_log_bytes, config.snapshot_log_percent);
        let interval = config.snapshot_interval;
        background.push(tokio::spawn(async move {
            member::snapshots(&node, min_bytes, percent, interval, stopped).await;
        }));
        background.push(tokio::spawn(member::reaper(
            m.node.clone(),
            tenants.all()[0].store.clone(),
            config.reaper_interval,
            config.reaper_batch,
            stop.clone(),
        )));
    }
    for ((tenant, p), metrics) in tenants
        .all()
        .iter()
        .zip(persistence)
        .zip(metrics)
        .filter(|_| membership.is_none())
    {
        background.push(tokio::spawn(reaper::run(
            tenant.store.clone(),
            config.reaper_interval,
            config.reaper_batch,
            metrics.reaper,
            stop.clone(),
        )));
        if let Some(p) = p {
            background.push(tokio::spawn(snapshotter::run(
                p.dir.clone(),
                p.log.clone(),
                tenant.store.clone(),
                config.snapshot_log_bytes,
                config.snapshot_log_percent,
                config.snapshot_interval,
                metrics.snapshots,
                stop.clone(),
            )));
        }
    }
    let peer_tls = membership.as_ref().and_then(|m| m.node.peer_tls());
    for tls in tls.iter().chain(&peer_tls) {
        tokio::spawn(tls.clone().watch(config.tls_watch_interval, stop.clone()));
    }
    background
}

/// Shuts down in order, one log line a step, each step making the next one safe:
/// not-ready first, so load balancers stop sending before anything is refused;
/// `shutdown_delay` for them to notice (a second signal skips it); stop accepting and drain
/// in-flight requests within `shutdown_grace`; cut every gRPC connection still open and
/// wait until they are gone, so no request is answered after the logs close; stop the
/// reapers and snapshots, which write to the logs; flush, fsync and close the logs; and
/// only then stop the admin endpoint, so probes and metrics see the whole shutdown.
async fn shut_down(
    running: Running,
    background: Vec<JoinHandle<()>>,
    member_tasks: Option<MemberTasks>,
    mut signals: mpsc::Receiver<()>,
    serving: &Serving,
) {
    let Running {
        health,
        ready,
        connections,
        stop_serving,
        stop_admin,
        mut grpc,
        admin,
    } = running;
    let config = &serving.config;
    if let Some(tasks) = &member_tasks {
        // From here on, shutdown alone says whether this node is ready.
        tasks.readiness.abort();
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

    if let (Some(tasks), Some(m)) = (member_tasks, &serving.membership) {
        // Touches first, so the next leader has them; then leadership, so the group does
        // not wait out an election. This node still serves meanwhile, forwarding to the new
        // leader once there is one.
        let _ = tasks.stop_touches.send(true);
        if tokio::time::timeout(config.shutdown_grace, tasks.touches)
            .await
            .is_err()
        {
            tracing::warn!("shutdown: touches not flushed within shutdown_grace");
        }
        tracing::info!("shutdown: touches flushed; handing leadership over if this node leads");
        m.node.hand_over().await;
    }
    tracing::info!(grace = ?config.shutdown_grace, "shutdown: draining in-flight requests");
    let _ = stop_serving.send(true);
    match tokio::time::timeout(config.shutdown_grace, &mut grpc).await {
        Ok(Ok(Ok(()))) => tracing::info!("shutdown: gRPC drained"),
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "shutdown: gRPC server ended with an error"),
        Ok(Err(e)) => tracing::warn!(error = %e, "shutdown: gRPC server task failed"),
        Err(_) => {
            grpc.abort();
            tracing::warn!("shutdown: drain deadline passed; cutting remaining connections");
        }
    }
    // Stopping the server stops only its accept loop: each established connection is served
    // by its own task. Cut them all, and wait until they are gone, so that no request is
    // answered after the logs close.
    let cut = connections.cut();
    match tokio::time::timeout(CUT_DEADLINE, connections.closed()).await {
        Ok(()) => tracing::info!(cut, "shutdown: gRPC connections closed"),
        Err(_) => tracing::warn!(
            still_open = connections.open(),
            "shutdown: gRPC connections still open after being cut"
        ),
    }
    for task in background {
        if let Err(e) = task.await {
            tracing::warn!(error = %e, "shutdown: a reaper or snapshot task failed");
        }
    }
    tracing::info!("shutdown: reapers and snapshots stopped");
    if let Some(m) = &serving.membership {
        m.node.shutdown().await;
        tracing::info!("shutdown: cluster node stopped, Raft log flushed and synced");
    }
    for p in serving.persistence.iter().flatten() {
        let log = p.log.clone();
        let _ = tokio::task::spawn_blocking(move || log.close()).await;
        tracing::info!(data_dir = %p.dir.display(), "shutdown: log flushed and synced");
    }
    let _ = stop_admin.send(true);
    match admin.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "shutdown: admin endpoint failed"),
        Err(e) => tracing::warn!(error = %e, "shutdown: admin task failed"),
    }
    tracing::info!("shutdown: complete");
}
