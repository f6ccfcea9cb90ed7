//! The peer client: openraft's [`RaftNetworkFactory`] and [`RaftNetworkV2`] over tonic.
//!
//! One HTTP/2 channel per peer, connected lazily on first use and reused by every client
//! openraft makes for that peer (replication, heartbeats, snapshots: HTTP/2 multiplexes them, so
//! a snapshot in flight does not hold heartbeats back). Each RPC carries the deadline openraft
//! gives it ([`RPCOption::soft_ttl`]). A peer that cannot be reached is reported as
//! `Unreachable`, which makes openraft back off before it tries again.
//!
//! Replication goes over one `AppendStream` per follower and session of openraft's
//! replication: appends are messages on a long-lived bidirectional stream, each sent once the
//! one before is answered ([`APPEND_WINDOW`]) and each answer due within the deadline. A peer
//! of an earlier version, which answers `UNIMPLEMENTED`, is sent unary `AppendEntries` calls.
//!
//! A peer is dialled at the address its membership records, or at the one
//! `cluster.dial_overrides` puts in its place, through a [`Dialer`]: over mutual TLS with the
//! cluster CA when peer TLS is on. The follower's forwarding of client calls to the leader
//! dials through the same [`Dialer`], on channels of its own.
//!
//! A snapshot is streamed from its file, chunk by chunk, by a blocking reader thread, behind one
//! message with the leader's vote; the peer rebuilds the file and installs it
//! ([`super::peer_service`]).

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::io::Read;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use http::Uri;
use hyper_util::rt::TokioIo;
use openraft::base::{BoxFuture, BoxStream};
use openraft::network::stream_append_sequential;
use openraft::raft::StreamAppendResult;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_rustls::client::TlsStream;
use tokio_util::sync::CancellationToken;

use openraft::errors::{
    NetworkError, RPCError, ReplicationClosed, StreamingError, Timeout, Unreachable,
};
use openraft::network::{RPCOption, RPCTypes};
use openraft::raft::TransferLeaderError;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::storage::Snapshot;
use openraft::{AnyError, RaftNetworkFactory, RaftNetworkV2};
use tonic::transport::{Channel, Endpoint};

use super::pb::cluster_client::ClusterClient;
use super::pb_impl::{check_vote, stream_append_result, Malformed};
use super::state_machine::SnapshotFile;
use super::{lock, pb, NodeId, TypeConfig};
use crate::tls::ReloadableTls;

/// A snapshot is sent in chunks of at most this many bytes (openraft may ask for fewer): well
/// under tonic's default 4 MiB message limit.
const MAX_CHUNK_BYTES: usize = 1 << 20;

/// How long a connection attempt to a peer may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// How this node dials its peers (see the module docs). A cheap handle.
#[derive(Clone, Default)]
pub struct Dialer {
    /// Peer addresses as the membership records them -> the address this node dials
    /// instead (`cluster.dial_overrides`).
    overrides: Arc<BTreeMap<String, String>>,
    /// Peer TLS: the live configs, and the name to verify every peer's certificate against
    /// (`cluster.tls_server_name`) instead of the host of its recorded address.
    tls: Option<(Arc<ReloadableTls>, Option<ServerName<'static>>)>,
}

impl Dialer {
    /// Dials the addresses in `overrides` instead of the recorded ones, over `tls` if given
    /// (whose client config must be the cluster's: [`crate::tls::Section::Cluster`]),
    /// verifying certificates against `server_name` if not empty.
    pub fn new(
        overrides: BTreeMap<String, String>,
        tls: Option<Arc<ReloadableTls>>,
        server_name: &str,
    ) -> Result<Self, String> {
        let name = match server_name {
            "" => None,
            n => Some(ServerName::try_from(n.to_string()).map_err(|e| {
                format!("cluster.tls_server_name {n:?} is not a DNS name or IP address: {e}")
            })?),
        };
        Ok(Dialer {
            overrides: Arc::new(overrides),
            tls: tls.map(|t| (t, name)),
        })
    }

    /// A channel to the peer the membership records at `addr`, connected on first use (and
    /// again after a failure).
    pub fn channel(&self, addr: &str) -> Result<Channel, String> {
        let target = self.overrides.get(addr).map_or(addr, String::as_str);
        // The scheme says HTTP: with peer TLS, the connector below wraps the connection.
        let endpoint = Endpoint::from_shared(format!("http://{target}"))
            .map_err(|e| format!("bad peer address {target:?}: {e}"))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true);
        let Some((tls, name)) = &self.tls else {
            return Ok(endpoint.connect_lazy());
        };
        let name = match name {
            Some(n) => n.clone(),
            None => server_name(addr)?,
        };
        Ok(endpoint.connect_with_connector_lazy(TlsConnector {
            tls: tls.clone(),
            name,
        }))
    }
}

/// The name a peer recorded at `addr` (`host:port`) must have in its certificate: its host.
fn server_name(addr: &str) -> Result<ServerName<'static>, String> {
    let host = addr
        .rsplit_once(':')
        .map_or(addr, |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']');
    ServerName::try_from(host.to_string()).map_err(|e| {
        format!(
            "peer address {addr:?}: {host:?} cannot be checked against a certificate ({e}); \
             set cluster.tls_server_name"
        )
    })
}

/// Connects to a peer over TCP, then TLS with the current peer client config: a renewed
/// certificate is used from the next connection on.
#[derive(Clone)]
struct TlsConnector {
    tls: Arc<ReloadableTls>,
    name: ServerName<'static>,
}

impl tower::Service<Uri> for TlsConnector {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = std::io::Error;
    type Future =
        Pin<Box<dyn Future<Output = Result<Self::Response, std::io::Error>> + Send + 'static>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let (tls, name) = (self.tls.clone(), self.name.clone());
        Box::pin(async move {
            let invalid = |why: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, why);
            let authority = uri
                .authority()
                .ok_or_else(|| invalid(format!("no host:port in {uri}")))?;
            let config = tls
                .dial_config()
                .ok_or_else(|| invalid("no peer client TLS config".into()))?;
            let tcp = TcpStream::connect(authority.as_str()).await?;
            let _ = tcp.set_nodelay(true);
            let stream = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await?;
            Ok(TokioIo::new(stream))
        })
    }
}

/// Makes the clients openraft sends RPCs through, one channel per peer.
#[derive(Clone, Default)]
pub struct PeerNetwork {
    /// The channel of each peer, with the address it was made for.
    channels: Arc<Mutex<HashMap<NodeId, (String, Channel)>>>,
    dialer: Dialer,
}

impl PeerNetwork {
    /// A network with no channels yet, dialling each peer at its recorded address in
    /// plaintext.
    pub fn new() -> Self {
        Self::default()
    }

    /// A network that dials its peers through `dialer`.
    pub fn with_dialer(dialer: Dialer) -> Self {
        PeerNetwork {
            dialer,
            ..Self::default()
        }
    }

    /// The channel to `target` recorded at `addr`: the one made before, unless the address
    /// changed.
    fn channel(&self, target: NodeId, addr: &str) -> Result<Channel, String> {
        let mut channels = lock(&self.channels);
        if let Some((known, ch)) = channels.get(&target) {
            if known == addr {
                return Ok(ch.clone());
            }
        }
        let ch = self
            .dialer
            .channel(addr)
            .map_err(|e| format!("node {target}: {e}"))?;
        channels.insert(target, (addr.to_owned(), ch.clone()));
        Ok(ch)
    }
}

impl RaftNetworkFactory<TypeConfig> for PeerNetwork {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &pb::Node) -> PeerClient {
        PeerClient {
            target,
            streams: true,
            client: self
                .channel(target, &node.peer_addr)
                .map(ClusterClient::new),
        }
    }
}

/// Sends one peer its RPCs.
pub struct PeerClient {
    target: NodeId,
    /// Whether replication goes over an AppendStream; `false` once the peer answered
    /// UNIMPLEMENTED (an earlier version, during a rolling upgrade): one AppendEntries call
    /// per batch then, each waiting for the one before.
    streams: bool,
    /// The client, or why there is none (an address that does not parse).
    client: Result<ClusterClient<Channel>, String>,
}

/// A status from the peer as openraft's error: unreachable when the peer could not be reached
/// (so openraft backs off), a timeout when the deadline passed, a network error otherwise.
fn rpc_error(
    target: NodeId,
    action: RPCTypes,
    option: &RPCOption,
    s: tonic::Status,
) -> RPCError<TypeConfig> {
    match s.code() {
        tonic::Code::Unavailable => RPCError::Unreachable(Unreachable::new(&s)),
        tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => RPCError::Timeout(Timeout {
            action,
            id: target,
            target,
            timeout: option.soft_ttl(),
        }),
        _ => RPCError::Network(NetworkError::new(&s)),
    }
}

fn malformed(e: Malformed) -> RPCError<TypeConfig> {
    RPCError::Network(NetworkError::new(&e))
}

impl PeerClient {
    fn client(&self) -> Result<ClusterClient<Channel>, RPCError<TypeConfig>> {
        self.client
            .clone()
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&AnyError::error(e))))
    }
}

/// Request metadata naming the node a Raft RPC is meant for. A node refuses an RPC meant
/// for another ID: a member wiped and restarted at the same address under a new ID must not
/// answer (vote, acknowledge appends) for the member it replaced, or it could lend two
/// leaders a quorum.
pub const TARGET_HEADER: &str = "sessiond-raft-target";

/// A request for `target` with openraft's deadline.
fn request<T>(target: NodeId, msg: T, option: &RPCOption) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.set_timeout(option.soft_ttl());
    req.metadata_mut().insert(TARGET_HEADER, target.into());
    req
}

/// How many requests of an AppendStream may wait for their answers. openraft builds each
/// request when the stream asks for it, from every entry not yet sent: while requests wait,
/// the entries proposed meanwhile gather into the next one, as they did behind each unary call.
const APPEND_WINDOW: u64 = 1;

/// The requests an AppendStream has sent, and the answers that came back.
#[derive(Default)]
struct Sent {
    count: AtomicU64,
    answered: AtomicU64,
    /// Wakes the reader of answers when a request goes out while it waits without a deadline.
    more: Notify,
    /// Wakes the sender when an answer leaves room in the window.
    room: Notify,
    /// Cancelled when the stream of answers is dropped.
    dropped: CancellationToken,
}

impl Sent {
    fn unanswered(&self) -> u64 {
        self.count.load(Ordering::Acquire) - self.answered.load(Ordering::Acquire)
    }
}

/// What openraft's replication reads from an AppendStream: each request's answer, in order.
type Answers<'s> = BoxStream<'s, Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>>;

fn timed_out(target: NodeId, option: &RPCOption) -> RPCError<TypeConfig> {
    RPCError::Timeout(Timeout {
        action: RPCTypes::AppendEntries,
        id: target,
        target,
        timeout: option.soft_ttl(),
    })
}

impl PeerClient {
    /// Opens an AppendStream that carries `input` to the peer; the stream of its answers.
    /// While requests are unanswered, each answer must come within openraft's deadline
    /// ([`RPCOption::soft_ttl`]), as each unary call's must: a peer that stops answering
    /// (paused, cut off without a reset) ends the stream with a timeout. An idle stream, with
    /// every request answered, waits for the next without one.
    async fn open_stream<S>(
        &mut self,
        input: S,
        option: RPCOption,
    ) -> Result<Answers<'static>, RPCError<TypeConfig>>
    where
        S: Stream<Item = AppendEntriesRequest<TypeConfig>> + Send + Unpin + 'static,
    {
        let target = self.target;
        let ttl = option.soft_ttl();
        let sent = Arc::new(Sent::default());
        let requests =
            futures_util::stream::unfold((input, sent.clone()), |(mut input, sent)| async move {
                let next = async {
                    while sent.unanswered() >= APPEND_WINDOW {
                        sent.room.notified().await;
                    }
                    input.next().await
                };
                // Once the answers are dropped (openraft ended the session, or stopped), the
                // requests end too, so the stream closes instead of waiting on an answer nobody
                // reads.
                let next = tokio::select! {
                    next = next => next?,
                    _ = sent.dropped.cancelled() => return None,
                };
                sent.count.fetch_add(1, Ordering::AcqRel);
                sent.more.notify_one();
                Some((pb::AppendEntriesRequest::from(next), (input, sent)))
            });
        let mut request = tonic::Request::new(requests);
        request.metadata_mut().insert(TARGET_HEADER, target.into());
        let mut client = self.client()?;
        let answers = match tokio::time::timeout(ttl, client.append_stream(request)).await {
            Err(_) => return Err(timed_out(target, &option)),
            Ok(Err(s)) if s.code() == tonic::Code::Unimplemented => {
                self.streams = false;
                return Err(RPCError::Network(NetworkError::new(&s)));
            }
            Ok(Err(s)) => return Err(rpc_error(target, RPCTypes::AppendEntries, &option, s)),
            Ok(Ok(response)) => response.into_inner(),
        };
        let dropped = sent.dropped.clone().drop_guard();
        let answers = futures_util::stream::unfold(Some((answers, dropped)), move |state| {
            let (sent, option) = (sent.clone(), option.clone());
            async move {
                let (mut answers, dropped) = state?;
                let next = loop {
                    if sent.unanswered() > 0 {
                        match tokio::time::timeout(ttl, answers.message()).await {
                            Ok(next) => break next,
                            Err(_) => return Some((Err(timed_out(target, &option)), None)),
                        }
                    }
                    // `message` keeps what it has read across a cancel.
                    tokio::select! {
                        next = answers.message() => break next,
                        _ = sent.more.notified() => {}
                    }
                };
                match next {
                    Ok(Some(answer)) => match stream_append_result(answer) {
                        Ok(result) => {
                            sent.answered.fetch_add(1, Ordering::AcqRel);
                            sent.room.notify_one();
                            Some((Ok(result), Some((answers, dropped))))
                        }
                        Err(e) => Some((Err(malformed(e)), None)),
                    },
                    Ok(None) => None,
                    Err(s) => Some((
                        Err(rpc_error(target, RPCTypes::AppendEntries, &option, s)),
                        None,
                    )),
                }
            }
        });
        Ok(Box::pin(answers))
    }
}

impl RaftNetworkV2<TypeConfig> for PeerClient {
    type SnapshotData = SnapshotFile;

    fn stream_append<'s, S>(
        &'s mut self,
        input: S,
        option: RPCOption,
    ) -> BoxFuture<'s, Result<Answers<'s>, RPCError<TypeConfig>>>
    where
        S: Stream<Item = AppendEntriesRequest<TypeConfig>> + Send + Unpin + 'static,
    {
        if !self.streams {
            return stream_append_sequential(self, input, option);
        }
        Box::pin(async move {
            let answers: Answers<'s> = self.open_stream(input, option).await?;
            Ok(answers)
        })
    }

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        let resp = self
            .client()?
            .append_entries(request(
                self.target,
                pb::AppendEntriesRequest::from(rpc),
                &option,
            ))
            .await
            .map_err(|s| rpc_error(self.target, RPCTypes::AppendEntries, &option, s))?;
        resp.into_inner().try_into().map_err(malformed)
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.send_vote(rpc, false, option).await
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.send_vote(rpc, true, option).await
    }

    async fn full_snapshot(
        &mut self,
        vote: pb::Vote,
        snapshot: Snapshot<u64, u64, pb::Node, SnapshotFile>,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let mut client = self.client()?;
        let chunk = option
            .snapshot_chunk_size()
            .unwrap_or(MAX_CHUNK_BYTES)
            .clamp(4096, MAX_CHUNK_BYTES);
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let first = pb::SnapshotChunk {
            payload: Some(pb::snapshot_chunk::Payload::Vote(vote)),
        };
        // The channel holds 4: the first message never waits.
        let _ = tx.try_send(first);
        let mut file = snapshot.snapshot.file;
        let reader = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            loop {
                let mut buf = vec![0u8; chunk];
                let n = read_full(&mut file, &mut buf)?;
                if n == 0 {
                    return Ok(());
                }
                buf.truncate(n);
                let msg = pb::SnapshotChunk {
                    payload: Some(pb::snapshot_chunk::Payload::Data(buf.into())),
                };
                if tx.blocking_send(msg).is_err() {
                    // The RPC ended (failed or cancelled): stop reading.
                    return Ok(());
                }
            }
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        let call = async { client.snapshot(request(self.target, stream, &option)).await };
        let resp = tokio::select! {
            r = call => r,
            closed = cancel => return Err(StreamingError::Closed(closed)),
        };
        match reader.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                return Err(StreamingError::Network(NetworkError::new(&e)));
            }
            Err(e) => return Err(StreamingError::Network(NetworkError::new(&e))),
        }
        let resp = resp.map_err(|s| {
            match rpc_error(self.target, RPCTypes::InstallSnapshot, &option, s) {
                RPCError::Timeout(t) => StreamingError::Timeout(t),
                RPCError::Unreachable(u) => StreamingError::Unreachable(u),
                RPCError::Network(n) => StreamingError::Network(n),
                RPCError::RemoteError(r) => StreamingError::Network(NetworkError::new(&r)),
            }
        })?;
        let vote = check_vote(resp.into_inner().vote)
            .map_err(|e| StreamingError::Network(NetworkError::new(&e)))?;
        Ok(SnapshotResponse::new(vote))
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        let resp = self
            .client()?
            .transfer_leader(request(
                self.target,
                pb::TransferLeaderRequest::from(req),
                &option,
            ))
            .await
            .map_err(|s| rpc_error(self.target, RPCTypes::TransferLeader, &option, s))?
            .into_inner();
        if let Some(v) = resp.vote_changed {
            return Ok(Err(TransferLeaderError::VoteChanged {
                expected: check_vote(v.expected).map_err(malformed)?,
                actual: check_vote(v.actual).map_err(malformed)?,
            }));
        }
        if let Some(l) = resp.log_not_flushed {
            return Ok(Err(TransferLeaderError::LogNotFlushed {
                expected: l.expected.map(Into::into),
                actual: l.actual.map(Into::into),
            }));
        }
        Ok(Ok(()))
    }
}

impl PeerClient {
    async fn send_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        pre_vote: bool,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        let mut msg = pb::VoteRequest::from(rpc);
        msg.pre_vote = pre_vote;
        let resp = self
            .client()?
            .vote(request(self.target, msg, &option))
            .await
            .map_err(|s| rpc_error(self.target, RPCTypes::Vote, &option, s))?;
        resp.into_inner().try_into().map_err(malformed)
    }
}

/// Reads until `buf` is full or the file ends; returns how much was read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_peer_that_does_not_know_append_stream_is_sent_unary_calls() {
        // A server with no services answers every call UNIMPLEMENTED, as a member of an
        // earlier version answers AppendStream.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_routes(tonic::service::Routes::default())
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let channel = Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_lazy();
        let mut peer = PeerClient {
            target: 7,
            streams: true,
            client: Ok(ClusterClient::new(channel)),
        };
        let heartbeat = || {
            futures_util::stream::iter(vec![AppendEntriesRequest {
                vote: pb::Vote::default(),
                prev_log_id: None,
                entries: Vec::new(),
                leader_commit: None,
            }])
        };
        let option = RPCOption::new(Duration::from_secs(5));

        let refused = matches!(
            peer.stream_append(heartbeat(), option.clone()).await,
            Err(RPCError::Network(_))
        );
        assert!(refused, "refused");
        assert!(!peer.streams, "the peer is sent unary calls from now on");

        // The next session is one AppendEntries call per request: this peer knows none.
        let mut answers = peer
            .stream_append(heartbeat(), option)
            .await
            .unwrap_or_else(|_| panic!("a session of unary calls opens without calling"));
        let answer = answers.next().await.expect("one answer");
        match answer {
            Err(RPCError::Network(e)) => assert!(e.to_string().contains("not implemented"), "{e}"),
            other => panic!("expected the unary call's refusal, got {other:?}"),
        }
    }
}
