//! This node's part in a replicated group: the default tenant started as a member, the
//! calls other members forward to it, and the member's tasks that shutdown stops first.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{BackgroundMetrics, Servers, Started, SERVICE_NAME};
use crate::api::budget::BudgetLayer;
use crate::api::forward::{ForwardLayer, Leadership};
use crate::api::SessionStoreService;
use crate::clock::Clock;
use crate::cluster::member::{self, touch_queue, Member, TouchQueue};
use crate::cluster::node::{ClusterNode, PeerPort};
use crate::config::{ClusterConfig, Config};
use crate::lock;
use crate::observe::Telemetry;
use crate::proto::serve::session_store_server::SessionStoreServer;
use crate::store::events::{EventSink, Fanout};
use crate::store::{MemoryPool, Store};
use crate::tenant::guessing::GuessWatch;
use crate::tenant::{Tenant, DEFAULT_TENANT};
use crate::transport::AuthLayer;

/// This node's part in a replicated group, as started.
pub(super) struct Membership {
    pub(super) node: Arc<ClusterNode>,
    pub(super) member: Arc<Member>,
    /// The touches the store's sliding reads queue, until the task that proposes them starts.
    touches: std::sync::Mutex<Option<TouchQueue>>,
}

/// Starts the default tenant as a member of a replicated group: its store fed by the
/// group's committed log instead of a single-node log, and the node's Raft.
pub(super) async fn start_member(
    config: &Config,
    cluster: &ClusterConfig,
    telemetry: &Telemetry,
    clock: &Clock,
    pool: &Arc<MemoryPool>,
    grpc_addr: SocketAddr,
) -> anyhow::Result<(Started, Membership)> {
    if !config.tenants.is_empty() {
        anyhow::bail!(
            "a cluster member serves the default tenant only for now: remove [[tenants]] or [cluster]"
        );
    }
    if !config.persist {
        anyhow::bail!(
            "a cluster member keeps its Raft log in data_dir: it cannot run with persist = false"
        );
    }
    let mut cluster = cluster.clone();
    if cluster.advertise_client.is_empty() {
        if grpc_addr.ip().is_unspecified() {
            anyhow::bail!(
                "listen is {grpc_addr}: set cluster.advertise_client to the address clients reach this node at"
            );
        }
        cluster.advertise_client = grpc_addr.to_string();
    }
    if cluster.fsync.is_none() {
        cluster.fsync = Some(config.fsync);
    }
    let metrics = telemetry.tenant(DEFAULT_TENANT, false);
    let (touch_sink, touches) = touch_queue();
    let sinks: Vec<Box<dyn EventSink>> = vec![Box::new(metrics.sessions), Box::new(touch_sink)];
    let store = Store::in_pool(
        config.limits.clone(),
        config.shards,
        clock.clone(),
        Box::new(Fanout(sinks)),
        0,
        pool.clone(),
    );
    let port = PeerPort {
        insecure_listen: config.insecure_listen,
        max_connections: config.max_connections,
        handshake_timeout: config.handshake_timeout,
    };
    if config.insecure_listen && !cluster.peer_listen.ip().is_loopback() && cluster.tls().is_none()
    {
        tracing::warn!(
            peer_listen = %cluster.peer_listen,
            "insecure_listen: serving the peer port beyond loopback WITHOUT TLS; anyone who can \
             reach it can rewrite every session. Set cluster.tls_cert, cluster.tls_key and \
             cluster.tls_ca unless every host on that network is trusted"
        );
    }
    // Served once the daemon's session store service, which needs the node, is built.
    let node = ClusterNode::open(&cluster, &config.data_dir, store.clone(), port)
        .await
        .context("cannot start the cluster node")?;
    let node = Arc::new(node);
    if cluster.bootstrap && !node.is_member() {
        let me = std::collections::BTreeMap::from([(node.id(), node.node().clone())]);
        node.initialize(me)
            .await
            .context("cannot bootstrap a new cluster")?;
        tracing::info!(node_id = node.id(), "bootstrapped a new cluster of one");
    }
    let member = Arc::new(Member::new(node.clone(), &cluster.advertise_client));
    let guesses = GuessWatch::new(config.guess_threshold, config.guess_window, metrics.guesses);
    let started = Started {
        tenant: Tenant::new(DEFAULT_TENANT, store, guesses, None),
        credentials: Vec::new(),
        persistence: None,
        background: BackgroundMetrics {
            reaper: metrics.reaper,
            snapshots: metrics.snapshots,
        },
    };
    Ok((
        started,
        Membership {
            node,
            member,
            touches: std::sync::Mutex::new(Some(touches)),
        },
    ))
}

impl Membership {
    /// Serves, on the peer port beside the Raft calls, the calls other members forward: the
    /// same service under the same budget and authentication (the call carries its client's
    /// metadata), not counted in the gRPC metrics again (the member that took the call
    /// counted it).
    pub(super) fn serve_forwarded(
        &self,
        budget: BudgetLayer,
        auth: AuthLayer,
        service: SessionStoreServer<SessionStoreService>,
    ) {
        let forwarded = tower::ServiceBuilder::new()
            .layer(budget)
            .layer(auth)
            .layer(ForwardLayer::peer_port(
                self.member.clone() as Arc<dyn Leadership>
            ))
            .service(service);
        self.node
            .serve_peer(tonic::service::Routes::new(SessionStoreOnPeerPort(
                forwarded,
            )));
    }
}

/// A member's tasks that shutdown stops on their own schedule, before the drain: touches
/// are flushed and leadership handed over while the node still serves and forwards.
pub(super) struct MemberTasks {
    pub(super) stop_touches: watch::Sender<bool>,
    pub(super) touches: JoinHandle<()>,
    pub(super) readiness: JoinHandle<()>,
}

impl MemberTasks {
    pub(super) fn start(m: &Membership, servers: &Servers) -> MemberTasks {
        let (stop_touches, stop) = watch::channel(false);
        let queue = lock(&m.touches)
            .take()
            .expect("a member's tasks start once");
        MemberTasks {
            stop_touches,
            touches: tokio::spawn(member::touches(m.node.clone(), queue, stop)),
            readiness: tokio::spawn(member::readiness(
                m.node.clone(),
                servers.ready.clone(),
                servers.health.clone(),
            )),
        }
    }
}

/// The session store's stack for forwarded calls, under the session store's service name,
/// so the peer server routes its calls to it beside the peer service.
#[derive(Clone)]
struct SessionStoreOnPeerPort<S>(S);

impl<S> tonic::server::NamedService for SessionStoreOnPeerPort<S> {
    const NAME: &'static str = SERVICE_NAME;
}

impl<S, B> tower::Service<http::Request<B>> for SessionStoreOnPeerPort<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        self.0.call(req)
    }
}
