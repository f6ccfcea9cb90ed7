//! The peer service: the server side of the Raft RPCs, and the admin calls.
//!
//! Handlers only convert the request, call openraft, and map the result; a malformed request
//! is refused with `INVALID_ARGUMENT` before it reaches the engine. An `AppendStream` hands
//! its requests to openraft's pipelined `stream_append` and sends back each answer in order; a
//! malformed request ends it, after the answers to those before. A snapshot arrives as a
//! stream of chunks: it is written to a temporary file in the Raft directory, every frame's
//! checksum is verified, and only then is it handed to openraft to install, so a transfer cut
//! short or damaged on the way is refused instead of stopping the node.
//!
//! The admin calls (`Init`, `AddLearner`, `ChangeMembership`, `RemoveMember`, `MoveLeader`,
//! `Status`, `Digest`) are what `sessionctl cluster` and the tests use; they act on this
//! node, and membership changes and leadership moves must be made on the leader (a follower
//! answers `FAILED_PRECONDITION`, naming the leader). `Digest` hashes this node's sessions,
//! so tests and operators can tell whether the replicas agree.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use openraft::async_runtime::WatchReceiver;
use openraft::raft::TransferLeaderRequest;
use openraft::storage::Snapshot;
use openraft::ServerState;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use super::admin::{self, ProposeError};
use super::lease::Lease;
use super::network::TARGET_HEADER;
use super::pb::cluster_server::Cluster;
use super::pb_impl::{check_vote, Malformed};
use super::state_machine::{temp_file, verify_snapshot, SnapshotFile};
use super::{lock, Role};
use super::{pb, Node, Raft};
use crate::session::Session;
use crate::store::Store;

/// The peer service of one node.
pub struct PeerService {
    raft: Raft,
    /// The lease its reads check, which a leadership transfer gives up.
    lease: Arc<Lease>,
    /// This node's advertised addresses, which `Status` reports.
    node: Node,
    /// The Raft directory: where incoming snapshots are received.
    dir: PathBuf,
    /// The Store committed entries are applied to: what `Digest` hashes.
    store: Store,
    /// Cancelled when the node stops: the replication streams served end then, instead of
    /// holding the server's shutdown open.
    stopping: CancellationToken,
}

impl PeerService {
    /// The service for `raft`, advertised as `node`, receiving snapshots into `dir`; `store`
    /// is its state machine's.
    pub(crate) fn new(
        raft: Raft,
        lease: Arc<Lease>,
        node: Node,
        dir: PathBuf,
        store: Store,
        stopping: CancellationToken,
    ) -> Self {
        PeerService {
            raft,
            lease,
            node,
            dir,
            store,
            stopping,
        }
    }
}

impl PeerService {
    /// Refuses a Raft RPC meant for another node ID (see [`TARGET_HEADER`]): this node may
    /// have replaced, at the same address, the member the sender means.
    fn check_target<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let me = self.raft.metrics().borrow_watched().id;
        let target = request
            .metadata()
            .get(TARGET_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        match target {
            Some(t) if t == me => Ok(()),
            Some(t) => Err(Status::failed_precondition(format!(
                "this is node {me}, not node {t}: the member at this address was replaced"
            ))),
            None => Err(Status::invalid_argument(format!(
                "a Raft call must name the node it is meant for in {TARGET_HEADER}"
            ))),
        }
    }
}

/// openraft stopped on this node: nothing it can answer.
fn stopped(e: impl std::fmt::Display) -> Status {
    Status::unavailable(format!("this node's Raft has stopped: {e}"))
}

#[tonic::async_trait]
impl Cluster for PeerService {
    async fn vote(
        &self,
        request: Request<pb::VoteRequest>,
    ) -> Result<Response<pb::VoteResponse>, Status> {
        self.check_target(&request)?;
        let req = request.into_inner();
        let pre_vote = req.pre_vote;
        let req = req.try_into()?;
        let resp = match pre_vote {
            true => self.raft.pre_vote(req).await,
            false => self.raft.vote(req).await,
        }
        .map_err(stopped)?;
        Ok(Response::new(resp.into()))
    }

    type AppendStreamStream = BoxStream<'static, Result<pb::AppendStreamResponse, Status>>;

    async fn append_stream(
        &self,
        request: Request<Streaming<pb::AppendEntriesRequest>>,
    ) -> Result<Response<Self::AppendStreamStream>, Status> {
        self.check_target(&request)?;
        // A malformed request or a broken stream ends the input there; the engine answers what
        // came before it, and then the stream ends with why.
        let broken = Arc::new(std::sync::Mutex::new(None::<Status>));
        // Both directions end when the node stops: the engine's reader then drops the request
        // stream, and with both halves gone the stream is reset, so the server's shutdown does
        // not wait on a leader that keeps it open.
        let input = {
            let broken = broken.clone();
            let requests = request.into_inner();
            let requests = requests.take_until(self.stopping.clone().cancelled_owned());
            requests.scan((), move |(), next| {
                let request = next.and_then(|r| Ok(r.try_into()?));
                std::future::ready(match request {
                    Ok(request) => Some(request),
                    Err(status) => {
                        *lock(&broken) = Some(status);
                        None
                    }
                })
            })
        };
        let answers = self.raft.stream_append(input).map(|answer| match answer {
            Ok(result) => Ok(pb::AppendStreamResponse::from(result)),
            Err(fatal) => Err(stopped(fatal)),
        });
        let end = futures_util::stream::once(async move { lock(&broken).take() })
            .filter_map(|status| std::future::ready(status.map(Err)));
        let answers = answers
            .chain(end)
            .take_until(self.stopping.clone().cancelled_owned());
        Ok(Response::new(answers.boxed()))
    }

    async fn append_entries(
        &self,
        request: Request<pb::AppendEntriesRequest>,
    ) -> Result<Response<pb::AppendEntriesResponse>, Status> {
        self.check_target(&request)?;
        let req = request.into_inner().try_into()?;
        let resp = self.raft.append_entries(req).await.map_err(stopped)?;
        Ok(Response::new(resp.into()))
    }

    async fn snapshot(
        &self,
        request: Request<Streaming<pb::SnapshotChunk>>,
    ) -> Result<Response<pb::SnapshotResponse>, Status> {
        self.check_target(&request)?;
        let mut stream = request.into_inner();
        let vote = match stream.next().await {
            Some(Ok(pb::SnapshotChunk {
                payload: Some(pb::snapshot_chunk::Payload::Vote(v)),
            })) => check_vote(Some(v))?,
            Some(Err(s)) => return Err(s),
            _ => {
                return Err(Malformed("snapshot stream: the first message must be the vote").into())
            }
        };
        let (file, path) = temp_file(&self.dir, "incoming")
            .map_err(|e| Status::internal(format!("cannot receive a snapshot: {e}")))?;
        let received = receive(&mut stream, file).await;
        let result = match received {
            Ok(()) => self.install(vote, path.clone()).await,
            Err(s) => Err(s),
        };
        // Installed, it was renamed away; otherwise it is of no use.
        let _ = std::fs::remove_file(&path);
        result
    }

    async fn transfer_leader(
        &self,
        request: Request<pb::TransferLeaderRequest>,
    ) -> Result<Response<pb::TransferLeaderResponse>, Status> {
        self.check_target(&request)?;
        let req: TransferLeaderRequest<_> = request.into_inner().try_into()?;
        let resp = self
            .raft
            .handle_transfer_leader(req)
            .await
            .map_err(stopped)?;
        use openraft::raft::TransferLeaderError as E;
        let mut out = pb::TransferLeaderResponse::default();
        match resp {
            Ok(()) => {}
            Err(E::VoteChanged { expected, actual }) => {
                out.vote_changed = Some(pb::VoteChanged {
                    expected: Some(expected),
                    actual: Some(actual),
                })
            }
            Err(E::LogNotFlushed { expected, actual }) => {
                out.log_not_flushed = Some(pb::LogNotFlushed {
                    expected: expected.map(Into::into),
                    actual: actual.map(Into::into),
                })
            }
        }
        Ok(Response::new(out))
    }

    async fn init(
        &self,
        request: Request<pb::InitRequest>,
    ) -> Result<Response<pb::InitResponse>, Status> {
        let members: BTreeMap<_, _> = request.into_inner().members;
        if members.is_empty() {
            return Err(Status::invalid_argument("Init needs at least one member"));
        }
        admin::initialize(&self.raft, members).await?;
        Ok(Response::new(pb::InitResponse {}))
    }

    async fn add_learner(
        &self,
        request: Request<pb::AddLearnerRequest>,
    ) -> Result<Response<pb::AddLearnerResponse>, Status> {
        let req = request.into_inner();
        let node = req
            .node
            .ok_or_else(|| Status::invalid_argument("AddLearner needs the node's addresses"))?;
        self.raft
            .add_learner(req.node_id, node, true)
            .await
            .map_err(ProposeError::from)?;
        Ok(Response::new(pb::AddLearnerResponse {}))
    }

    async fn change_membership(
        &self,
        request: Request<pb::ChangeMembershipRequest>,
    ) -> Result<Response<pb::ChangeMembershipResponse>, Status> {
        let req = request.into_inner();
        let voters: BTreeSet<u64> = req.voters.into_iter().collect();
        if voters.is_empty() {
            return Err(Status::invalid_argument(
                "ChangeMembership needs at least one voter",
            ));
        }
        self.raft
            .change_membership(voters, req.retain)
            .await
            .map_err(ProposeError::from)?;
        Ok(Response::new(pb::ChangeMembershipResponse {}))
    }

    async fn remove_member(
        &self,
        request: Request<pb::RemoveMemberRequest>,
    ) -> Result<Response<pb::RemoveMemberResponse>, Status> {
        admin::remove_member(&self.raft, request.into_inner().node_id).await?;
        Ok(Response::new(pb::RemoveMemberResponse {}))
    }

    async fn move_leader(
        &self,
        request: Request<pb::MoveLeaderRequest>,
    ) -> Result<Response<pb::MoveLeaderResponse>, Status> {
        let to = request.into_inner().to_node_id;
        // As long as a graceful shutdown waits for its transfer: a few election timeouts.
        let timeout = Duration::from_millis(self.raft.config().election_timeout_max * 3);
        let leader_id = admin::move_leader(&self.raft, &self.lease, to, timeout).await?;
        Ok(Response::new(pb::MoveLeaderResponse { leader_id }))
    }

    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        Ok(Response::new(status(&self.raft, &self.node)))
    }

    async fn digest(
        &self,
        _request: Request<pb::DigestRequest>,
    ) -> Result<Response<pb::DigestResponse>, Status> {
        let applied_index = status(&self.raft, &self.node).applied_index;
        let store = self.store.clone();
        // Every session is copied and hashed: off the runtime's threads.
        let (sessions, sha256) = tokio::task::spawn_blocking(move || digest(&store))
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(pb::DigestResponse {
            applied_index,
            sessions,
            sha256: sha256.to_vec().into(),
        }))
    }
}

impl PeerService {
    async fn install(
        &self,
        vote: pb::Vote,
        path: PathBuf,
    ) -> Result<Response<pb::SnapshotResponse>, Status> {
        let check = path.clone();
        let meta = tokio::task::spawn_blocking(move || verify_snapshot(&check))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::data_loss(format!("snapshot refused: {e}")))?;
        let file = SnapshotFile::open(path)
            .map_err(|e| Status::internal(format!("cannot reopen a received snapshot: {e}")))?;
        let resp = self
            .raft
            .install_full_snapshot(
                vote,
                Snapshot {
                    meta,
                    snapshot: file,
                },
            )
            .await
            .map_err(stopped)?;
        Ok(Response::new(pb::SnapshotResponse {
            vote: Some(resp.vote),
        }))
    }
}

/// Writes the chunks of a snapshot stream to `file`, and fsyncs it.
async fn receive(
    stream: &mut Streaming<pb::SnapshotChunk>,
    file: std::fs::File,
) -> Result<(), Status> {
    let write_err =
        |e: std::io::Error| Status::internal(format!("cannot write a received snapshot: {e}"));
    let mut file = Some(file);
    while let Some(msg) = stream.next().await {
        let data = match msg?.payload {
            Some(pb::snapshot_chunk::Payload::Data(d)) => d,
            _ => return Err(Malformed("snapshot stream: a later message must be data").into()),
        };
        let mut f = file.take().expect("put back after every write");
        let f = tokio::task::spawn_blocking(move || f.write_all(&data).map(|()| f))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(write_err)?;
        file = Some(f);
    }
    let f = file.take().expect("put back after every write");
    tokio::task::spawn_blocking(move || f.sync_all())
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(write_err)
}

/// This node's view of the cluster, from openraft's metrics; `node` is its own addresses.
pub(crate) fn status(raft: &Raft, node: &Node) -> pb::StatusResponse {
    let m = raft.metrics().borrow_watched().clone();
    let membership = m.membership_config.membership();
    let leader = m
        .current_leader
        .and_then(|id| membership.get_node(&id).cloned());
    pb::StatusResponse {
        node_id: m.id,
        role: Role::from(m.state).as_str().into(),
        term: m.current_term,
        leader_id: m.current_leader.unwrap_or(0),
        leader,
        committed_index: m.local_committed.map_or(0, |c| c.index),
        applied_index: m.last_applied.map_or(0, |c| c.index),
        last_log_index: m.last_log_index.unwrap_or(0),
        membership: Some(membership.into()),
        matched_index: m
            .replication
            .iter()
            .flatten()
            // None: nothing acknowledged yet (a new replication stream), so nothing known.
            .filter_map(|(id, matched)| Some((*id, matched.as_ref()?.index)))
            .collect(),
        node: Some(node.clone()),
    }
}

/// How many sessions `store` holds, and a SHA-256 over them sorted by ID: what replicas that
/// applied the same entries agree on. Every field is length-prefixed or fixed-width, so no two
/// different stores hash the same bytes. `last_access_at` is left out: the leader slides it in
/// memory between throttled touches (see `member`), so replicas differ there by design.
pub(crate) fn digest(store: &Store) -> (u64, [u8; 32]) {
    let mut sessions: Vec<Session> = Vec::new();
    store.for_each_session(|s| sessions.push(s));
    sessions.sort_unstable_by_key(|s| *s.key.as_bytes());
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut bytes = |b: &[u8]| {
        ctx.update(&(b.len() as u64).to_le_bytes());
        ctx.update(b);
    };
    for s in &sessions {
        bytes(s.key.as_bytes());
        bytes(&s.version.to_le_bytes());
        bytes(s.user.as_deref().unwrap_or("").as_bytes());
        bytes(&[u8::from(s.user.is_some())]);
        let mut attrs: Vec<_> = s.attributes.slices().collect();
        attrs.sort_unstable_by_key(|(k, _)| *k);
        bytes(&(attrs.len() as u64).to_le_bytes());
        for (k, v) in attrs {
            bytes(k.as_bytes());
            bytes(v);
        }
        bytes(&s.created_at.to_le_bytes());
        bytes(&s.idle_timeout.to_le_bytes());
        bytes(&s.absolute_expires_at.to_le_bytes());
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    (sessions.len() as u64, out)
}

impl From<ServerState> for Role {
    fn from(s: ServerState) -> Role {
        match s {
            ServerState::Leader => Role::Leader,
            ServerState::Follower => Role::Follower,
            ServerState::Candidate => Role::Candidate,
            ServerState::Learner => Role::Learner,
            ServerState::Shutdown => Role::Shutdown,
        }
    }
}
