//! A cluster node: its ID, log, state machine, peer server and openraft, started together.
//!
//! Files under `data_dir`:
//! - `node-id`: this node's ID, a random u64 drawn on first start. Never derived from an
//!   address or a pod ordinal, and never reused: a node whose data is lost comes back under a
//!   fresh ID and is swapped in by a membership change (openraft's FAQ, "reuse node id").
//! - `raft/`: the Raft log (`log.sdl`, see [`super::log_store`]), the current snapshot
//!   (`snapshot.sds`, see [`super::state_machine`]) and the lock that keeps a second node out.
//!
//! The peer port is bound at start and served by [`ClusterNode::serve_peer`], with whatever
//! the daemon mounts beside the peer service (the session store, for forwarded calls), which
//! it can build only once the node exists. [`ClusterNode::start`] does both at once.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use openraft::async_runtime::WatchReceiver;
use openraft::type_config::TypeConfigExt;
use openraft::{ChangeMembers, ServerState, SnapshotPolicy};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use super::admin::ProposeError;
use super::admin::{initialize, move_leader, remove_member};
use super::coalesce::Coalescer;
use super::lease::Lease;
use super::log_store::{LogCloser, LogOptions, LogSize, LogStore, OpenError};
use super::network::{Dialer, PeerNetwork};
use super::pb::cluster_server::ClusterServer;
use super::peer_service::PeerService;
use super::state_machine::StateMachine;
use super::{lock, Applied, Metrics, Node, NodeId, Raft, TypeConfig};
use crate::config::{ClusterConfig, ConfigError};
use crate::observe::ClusterMetrics;
use crate::observe::ConnMetrics;
use crate::persist::format::FormatError;
use crate::persist::log::FsyncPolicy;
use crate::store::{Effect, Store};
use crate::tls::{Port, ReloadableTls};
use crate::transport::{Accept, Connections};

/// The file in `data_dir` that keeps this node's ID.
pub const NODE_ID_FILE: &str = "node-id";

/// The directory in `data_dir` that holds the Raft log and snapshot.
pub const RAFT_DIR: &str = "raft";

/// The largest peer message, in bytes: an append of `max_entries_per_append` large writes, or a
/// snapshot chunk. The client API's own limit caps each write far below.
pub const MAX_PEER_MESSAGE_BYTES: usize = 64 << 20;

/// Why a node could not start. Each variant names the setting or file at fault.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A `[cluster]` setting is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The node ID file cannot be read or written, or holds no ID.
    #[error("{}: {why}", path.display())]
    NodeId {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The Raft log cannot be opened.
    #[error(transparent)]
    Log(#[from] OpenError),
    /// The snapshot cannot be read.
    #[error(transparent)]
    Snapshot(#[from] FormatError),
    /// The peer TLS files cannot be loaded (the message names the setting and file).
    #[error("peer TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    /// The peer address cannot be bound.
    #[error("cluster.peer_listen {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: io::Error,
    },
    /// openraft refused to start.
    #[error("cannot start Raft: {0}")]
    Raft(String),
}

/// How the peer port is served, beyond the `[cluster]` section: the daemon's settings that
/// apply to it as to the client port.
#[derive(Debug, Clone)]
pub struct PeerPort {
    /// The daemon's `insecure_listen`: a plaintext peer port beyond loopback is allowed.
    pub insecure_listen: bool,
    /// Connections open at once (the daemon's `max_connections`).
    pub max_connections: usize,
    /// The time a new connection has to finish its TLS handshake and send the HTTP/2
    /// preface (the daemon's `handshake_timeout`).
    pub handshake_timeout: Duration,
}

impl Default for PeerPort {
    fn default() -> Self {
        PeerPort {
            insecure_listen: false,
            max_connections: 10_000,
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// The peer server: bound, then serving, then stopped.
enum PeerServer {
    /// Bound by [`ClusterNode::open`], not yet served.
    Bound(Box<(tokio::net::TcpListener, ClusterServer<PeerService>, Accept)>),
    /// Served by [`ClusterNode::serve_peer`].
    Serving {
        task: JoinHandle<()>,
        connections: Connections,
    },
    /// Stopped by [`ClusterNode::shutdown`].
    Stopped,
}

/// A running cluster node. Dropping it does not stop it: call [`ClusterNode::shutdown`].
pub struct ClusterNode {
    id: NodeId,
    raft: Raft,
    node: Node,
    peer_addr: SocketAddr,
    store: Store,
    /// How long a leadership transfer may take before shutdown goes on without it.
    transfer_timeout: Duration,
    server: Mutex<PeerServer>,
    /// How peers are dialled: by Raft, and by the forwarding of client calls.
    dialer: Dialer,
    /// Peer TLS, when on: for the daemon's reload on SIGHUP and file changes.
    tls: Option<Arc<ReloadableTls>>,
    log: LogCloser,
    log_size: LogSize,
    /// `data_dir/raft`: the log and the snapshot.
    raft_dir: PathBuf,
    /// Where proposals are recorded, once [`ClusterNode::observe`] was called.
    recorder: Arc<OnceLock<ClusterMetrics>>,
    /// Where writes are proposed: together, when several wait.
    coalescer: Coalescer,
    /// Where reads check the lease.
    lease: Arc<Lease>,
    /// Cancelled when the node stops: the peer server stops taking calls, and the replication
    /// streams it serves end.
    stopping: CancellationToken,
}

impl ClusterNode {
    /// Starts the node: its ID (drawn on first start), log and snapshot from
    /// `data_dir/raft`, openraft, and the peer server on `config.peer_listen`. `store` is the
    /// node's one Store (a cheap handle): committed writes are applied to it.
    ///
    /// A node that has never been part of a cluster waits to be initialized
    /// ([`ClusterNode::initialize`]) or added by a leader ([`ClusterNode::add_member`]).
    pub async fn start(
        config: &ClusterConfig,
        data_dir: &Path,
        store: Store,
    ) -> Result<ClusterNode, StartError> {
        let node = Self::open(config, data_dir, store, PeerPort::default()).await?;
        node.serve_peer(tonic::service::Routes::default());
        Ok(node)
    }

    /// Starts the node as [`ClusterNode::start`] does, with the peer port bound but not yet
    /// served: [`ClusterNode::serve_peer`] serves it.
    pub async fn open(
        config: &ClusterConfig,
        data_dir: &Path,
        store: Store,
        port: PeerPort,
    ) -> Result<ClusterNode, StartError> {
        config.validate()?;
        config.validate_protected_mode(port.insecure_listen)?;
        let raft_config = raft_config(config)?;
        let tls = config
            .tls()
            .map(ReloadableTls::load)
            .transpose()?
            .map(Arc::new);
        let dialer = Dialer::new(
            config.dial_overrides.clone(),
            tls.clone(),
            &config.tls_server_name,
        )
        .map_err(ConfigError::new)?;
        let id = node_id(data_dir)?;
        let dir = data_dir.join(RAFT_DIR);
        let options = LogOptions::new(config.fsync.unwrap_or(FsyncPolicy::Always));
        let log = LogStore::open(&dir, options)?;
        let closer = log.closer();
        let log_size = log.size();
        let sm = match StateMachine::open(&dir, store.clone()) {
            Ok(sm) => sm,
            Err(e) => {
                closer.close();
                return Err(e.into());
            }
        };
        let listener = match tokio::net::TcpListener::bind(config.peer_listen).await {
            Ok(l) => l,
            Err(source) => {
                closer.close();
                return Err(StartError::Bind {
                    addr: config.peer_listen,
                    source,
                });
            }
        };
        let peer_addr = listener.local_addr().map_err(|source| StartError::Bind {
            addr: config.peer_listen,
            source,
        })?;
        let node = Node {
            peer_addr: match config.advertise_peer.is_empty() {
                true => peer_addr.to_string(),
                false => config.advertise_peer.clone(),
            },
            client_addr: config.advertise_client.clone(),
        };
        let network = PeerNetwork::with_dialer(dialer.clone());
        let raft = match Raft::new(id, Arc::new(raft_config), network, log, sm).await {
            Ok(r) => r,
            Err(e) => {
                closer.close();
                return Err(StartError::Raft(e.to_string()));
            }
        };
        let lease = Arc::new(Lease::new(raft.clone()));
        let stopping = CancellationToken::new();
        let service = ClusterServer::new(PeerService::new(
            raft.clone(),
            lease.clone(),
            node.clone(),
            dir.clone(),
            store.clone(),
            stopping.clone(),
        ))
        .max_decoding_message_size(MAX_PEER_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_PEER_MESSAGE_BYTES);
        let accept = Accept {
            tls: tls.clone().map(|t| (t, Port::Grpc)),
            max_connections: port.max_connections,
            handshake_timeout: port.handshake_timeout,
            http2_preface: true,
            metrics: ConnMetrics::noop(),
        };
        let recorder = Arc::new(OnceLock::new());
        let (coalescer, coalescing) = Coalescer::new(raft.clone(), recorder.clone());
        tokio::spawn(coalescing);
        tracing::info!(node_id = id, peer = %peer_addr, tls = tls.is_some(), "cluster node started");
        Ok(ClusterNode {
            id,
            raft,
            node,
            peer_addr,
            store,
            transfer_timeout: config.election_timeout_max * 3,
            server: Mutex::new(PeerServer::Bound(Box::new((listener, service, accept)))),
            dialer,
            tls,
            log: closer,
            log_size,
            raft_dir: dir,
            recorder,
            coalescer,
            lease,
            stopping,
        })
    }

    /// Serves the peer port: the peer service, and `beside` it (the daemon mounts the
    /// session store there, for the calls other members forward). Only the first call
    /// serves; later ones do nothing.
    pub fn serve_peer(&self, beside: tonic::service::Routes) {
        let mut server = lock(&self.server);
        let PeerServer::Bound(bound) = std::mem::replace(&mut *server, PeerServer::Stopped) else {
            return;
        };
        let (listener, service, accept) = *bound;
        let stopping = self.stopping.clone();
        let connections = Connections::new();
        let incoming = crate::transport::incoming(listener, accept, connections.clone());
        let routes = beside.add_service(service);
        let task = tokio::spawn(async move {
            let served = tonic::transport::Server::builder()
                .add_routes(routes)
                .serve_with_incoming_shutdown(incoming, stopping.cancelled_owned())
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "the cluster peer server failed");
            }
        });
        *server = PeerServer::Serving { task, connections };
    }

    /// How this node dials its peers.
    pub fn dialer(&self) -> &Dialer {
        &self.dialer
    }

    /// Peer TLS, when on: what the daemon reloads on SIGHUP and watches for changes.
    pub fn peer_tls(&self) -> Option<Arc<ReloadableTls>> {
        self.tls.clone()
    }

    /// This node's ID.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// The openraft handle.
    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    /// This node as a membership records it: its advertised addresses.
    pub fn node(&self) -> &Node {
        &self.node
    }

    /// The address the peer server is bound to (the port, when `peer_listen` asked for 0).
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer_addr
    }

    /// The Store committed writes are applied to.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Proposes `effects`, and returns once a majority has them and this node has applied
    /// them, with one outcome per effect. Only the leader takes proposals.
    ///
    /// Each proposal is recorded in the metrics given to `ClusterNode::observe`, if any
    /// (one whose caller goes away before it returns is not).
    pub async fn propose(&self, effects: Vec<Effect>) -> Result<Applied, ProposeError> {
        self.submit(effects).await?.await
    }

    /// Reports this node in `metrics`: from now on every [`ClusterNode::propose`] is recorded
    /// there, and the returned task (spawn it) follows openraft's metrics into them until
    /// `stop` turns true or Raft stops. Call it once; a second call's metrics get only the
    /// watch, the proposals stay with the first.
    pub(crate) fn observe(
        &self,
        metrics: ClusterMetrics,
        stop: watch::Receiver<bool>,
    ) -> impl Future<Output = ()> + Send + 'static {
        let _ = self.recorder.set(metrics.clone());
        super::metrics_watch::watch(self.metrics(), metrics, stop)
    }

    /// Submits `effects` behind every write submitted before it, and returns once it is
    /// queued: the returned future answers as [`ClusterNode::propose`] does. A Pipeline stream
    /// submits its writes this way, so they commit in the stream's order without waiting for
    /// each other. Writes that wait together are proposed as one entry (see
    /// [`super::coalesce`]).
    pub async fn submit(
        &self,
        effects: Vec<Effect>,
    ) -> Result<
        impl std::future::Future<Output = Result<Applied, ProposeError>> + Send + 'static,
        ProposeError,
    > {
        let started = Instant::now();
        let recorder = self.recorder.get().cloned();
        let reply = self.coalescer.submit(effects).await?;
        Ok(async move {
            let result = reply.await.unwrap_or_else(|_| {
                Err(ProposeError::Indeterminate(
                    "this node's Raft stopped before answering".into(),
                ))
            });
            if let Some(m) = recorder {
                m.proposal(ProposeError::counted(&result), started.elapsed());
            }
            result
        })
    }

    /// Returns once a read of this node's Store is linearizable: this node leads, its lease
    /// (renewed by a quorum's heartbeat acknowledgements) holds, and it has applied every
    /// entry committed before the call. A stale lease fails at once with `Unavailable`.
    pub async fn lease_read(&self) -> Result<(), ProposeError> {
        Ok(self.lease.read().await?)
    }

    /// Whether a read of this node's Store is linearizable now, by the lease alone: what
    /// [`ClusterNode::lease_read`] checks before it asks the engine.
    pub fn lease_holds(&self) -> bool {
        self.lease.holds(TypeConfig::now())
    }

    /// The encoded bytes of the log entries after this node's last snapshot: what a new
    /// snapshot would make redundant.
    pub fn log_since_snapshot(&self) -> u64 {
        let snapshot = self.raft.metrics().borrow_watched().snapshot;
        self.log_size.bytes_after(snapshot.map(|s| s.index))
    }

    /// The size of this node's last snapshot; 0 if it has none.
    pub fn snapshot_bytes(&self) -> u64 {
        super::state_machine::snapshot_bytes(&self.raft_dir)
    }

    /// Starts building a snapshot of the applied state, unless one is being built; the log
    /// it covers is purged once it is written.
    pub async fn snapshot_now(&self) -> Result<(), ProposeError> {
        self.raft
            .trigger()
            .snapshot()
            .await
            .map_err(|f| ProposeError::Fatal(f.to_string()))
    }

    /// Where this node's reads check the lease.
    #[cfg(test)]
    pub(crate) fn lease(&self) -> &Lease {
        &self.lease
    }

    /// The leader this node knows of, and where it is reached.
    pub fn leader(&self) -> Option<(NodeId, Node)> {
        let m = self.raft.metrics();
        let m = m.borrow_watched();
        let id = m.current_leader?;
        let node = m.membership_config.get_node(&id)?.clone();
        Some((id, node))
    }

    /// openraft's metrics: role, term, leader, log indexes, membership, replication.
    pub fn metrics(&self) -> openraft::type_config::alias::WatchReceiverOf<TypeConfig, Metrics> {
        self.raft.metrics()
    }

    /// Makes a new cluster of `members` (this node among them). Call it on one node only, once.
    pub async fn initialize(&self, members: BTreeMap<NodeId, Node>) -> Result<(), ProposeError> {
        initialize(&self.raft, members).await
    }

    /// Adds `id` as a voter: first as a learner, returning once it has caught up, then by a
    /// membership change. Call it on the leader.
    pub async fn add_member(&self, id: NodeId, node: Node) -> Result<(), ProposeError> {
        self.raft.add_learner(id, node, true).await?;
        self.raft
            .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
            .await?;
        Ok(())
    }

    /// Removes `id` from the cluster, voter or learner. Call it on the leader.
    pub async fn remove_member(&self, id: NodeId) -> Result<(), ProposeError> {
        remove_member(&self.raft, id).await
    }

    /// Hands leadership to voter `to` and returns once another node leads (or the transfer
    /// timed out: then `Unavailable`). Call it on the leader.
    pub async fn transfer_leader(&self, to: NodeId) -> Result<(), ProposeError> {
        move_leader(&self.raft, &self.lease, to, self.transfer_timeout).await?;
        Ok(())
    }

    /// Stops the node. A leader first hands leadership to the most up-to-date other voter, so
    /// the cluster does not wait out an election timeout; then openraft stops, then the peer
    /// server, and the log is written, fsynced and closed.
    pub async fn shutdown(&self) {
        self.hand_over().await;
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(error = %e, "Raft shutdown");
        }
        let server = std::mem::replace(&mut *lock(&self.server), PeerServer::Stopped);
        self.stopping.cancel();
        if let PeerServer::Serving { task, connections } = server {
            // The server stops accepting and lets its connections finish their calls; a
            // peer that keeps its connection open is cut.
            if tokio::time::timeout(self.transfer_timeout, task)
                .await
                .is_err()
            {
                tracing::warn!(
                    node_id = self.id,
                    "peer server: connections still open; cutting them"
                );
            }
            connections.cut();
        }
        let log = self.log.clone();
        let _ = tokio::task::spawn_blocking(move || log.close()).await;
        tracing::info!(node_id = self.id, "cluster node stopped");
    }

    /// If this node leads, hands leadership to the most up-to-date other voter and waits
    /// until another node leads (or the transfer times out: then it logs and returns).
    pub async fn hand_over(&self) {
        if let Some(to) = self.successor() {
            match self.transfer_leader(to).await {
                Ok(()) => tracing::info!(node_id = self.id, to, "handed leadership over"),
                Err(e) => {
                    tracing::warn!(node_id = self.id, to, error = %e, "leadership transfer failed; shutting down anyway")
                }
            }
        }
    }

    /// Whether this node has ever been part of a cluster (initialized, or added by a leader).
    pub fn is_member(&self) -> bool {
        self.raft
            .metrics()
            .borrow_watched()
            .membership_config
            .voter_ids()
            .next()
            .is_some()
    }

    /// If this node leads: the other voter that holds the most of the log.
    fn successor(&self) -> Option<NodeId> {
        let m = self.raft.metrics().borrow_watched().clone();
        if m.state != ServerState::Leader {
            return None;
        }
        let replication = m.replication.unwrap_or_default();
        m.membership_config
            .voter_ids()
            .filter(|v| *v != self.id)
            .max_by_key(|v| replication.get(v).cloned().flatten().map(|l| l.index))
    }
}

/// openraft's settings from the `[cluster]` section.
fn raft_config(c: &ClusterConfig) -> Result<openraft::Config, ConfigError> {
    let ms = |d: Duration| d.as_millis() as u64;
    openraft::Config {
        cluster_name: "sessiond".into(),
        heartbeat_interval: ms(c.heartbeat_interval),
        election_timeout_min: ms(c.election_timeout_min),
        election_timeout_max: ms(c.election_timeout_max),
        install_snapshot_timeout: ms(c.snapshot_timeout),
        max_payload_entries: c.max_entries_per_append,
        // Snapshots by size are `member::snapshots`'s.
        snapshot_policy: match c.snapshot_every_entries {
            0 => SnapshotPolicy::Never,
            n => SnapshotPolicy::LogsSinceLast(n),
        },
        max_in_snapshot_log_to_keep: c.keep_entries_after_snapshot,
        // A leader that restarts stands for election like any other node. Restored at once in
        // its old term (openraft's default), it would count the log committed only up to the
        // committed ID it last saved, which may be behind what its clients were told (the ID
        // is saved lazily, see `log_store`), and it proposes no new first entry: a read or a
        // plan right after the restart could miss acknowledged writes. A new term starts with
        // a blank entry, and once that is applied so is everything committed before it, which
        // is what `lease` and the engine's reads check.
        enable_leader_restore: Some(false),
        ..openraft::Config::default()
    }
    .validate()
    .map_err(|e| ConfigError::new(format!("cluster: {e}")))
}

/// This node's ID from `data_dir/node-id`, drawn at random and written there on first start.
fn node_id(data_dir: &Path) -> Result<NodeId, StartError> {
    let path = data_dir.join(NODE_ID_FILE);
    let err = |why: String| StartError::NodeId {
        path: path.clone(),
        why,
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => match text.trim().parse::<NodeId>() {
            Ok(id) if id != 0 => Ok(id),
            _ => Err(err(format!(
                "holds {:?}, not a node ID; restore the file, or move the data directory away \
                 to join as a new node (never reuse an ID)",
                text.trim()
            ))),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            std::fs::create_dir_all(data_dir).map_err(|e| err(e.to_string()))?;
            // 0 is no node: Status reports it for "no leader".
            let id = loop {
                let id = rand::random::<NodeId>();
                if id != 0 {
                    break id;
                }
            };
            write_node_id(data_dir, &path, id).map_err(|e| err(e.to_string()))?;
            tracing::info!(node_id = id, "drew a new node ID");
            Ok(id)
        }
        Err(e) => Err(err(e.to_string())),
    }
}

fn write_node_id(dir: &Path, path: &Path, id: NodeId) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = dir.join(format!("{NODE_ID_FILE}.tmp"));
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&tmp)?;
    writeln!(f, "{id}")?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}
