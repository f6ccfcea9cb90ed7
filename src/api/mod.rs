//! The gRPC edge: thin handlers that convert the request, call the Store, and map the result.
//! No session rule lives here.
//!
//! The edge bounds what one request may cost: a permit of the daemon's [`budget::Budget`]
//! for every request and every pipelined operation, `request_timeout` for each, and
//! responses whose encoded size is counted while they are built, so a GetMany or a
//! ListUserSessions that would pass `max_message_bytes` stops early instead of building a
//! response tonic would refuse to send.

pub(crate) mod budget;
pub mod convert;
pub mod forward;
pub mod group;
mod pipeline;
pub(crate) mod status;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use self::budget::Budget;
pub use self::group::Group;
use crate::observe::grpc::EdgeMetrics;
use crate::persist::log::Log;
use crate::store::{Plan, StoreError};
use crate::tenant::Tenant;
use crate::transport::ConnInfo;

pub use crate::proto::pb;
pub use crate::proto::reply;
pub use crate::proto::serve;

/// The encoded descriptor set of the public API, served by gRPC reflection.
pub(crate) const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/sessiond_descriptor.bin"));

/// What `DestroyAllSessionsRequest.confirm` must say: a phrase, not a flag, so that no
/// default value, copied field or stray `true` can end every session of a tenant.
pub const DESTROY_ALL_CONFIRMATION: &str = "destroy all sessions";

/// The `sessiond.v1.SessionStore` service. Each request runs as its [`Caller`]: the tenant
/// the transport's [`AuthLayer`](crate::transport::AuthLayer) found for it, and its peer.
#[derive(Clone)]
pub struct SessionStoreService {
    edge: Arc<Edge>,
}

/// How the service bounds and reports the requests it serves. `Default` is a service with
/// the default limits, no concurrency budget, no timeout and no shutdown signal (fuzzing).
pub(crate) struct Settings {
    /// IDs in one GetMany (`max_batch_ids`).
    pub(crate) max_batch_ids: usize,
    /// The largest response a GetMany or ListUserSessions may build (`max_message_bytes`).
    pub(crate) max_message_bytes: usize,
    /// How long one pipelined operation may wait for the disk (`request_timeout`).
    pub(crate) request_timeout: Option<Duration>,
    /// The budget each pipelined operation takes a permit of (`max_concurrent_requests`).
    pub(crate) budget: Option<Budget>,
    /// Pipelined operations and shed counts.
    pub(crate) metrics: Option<Arc<EdgeMetrics>>,
    /// Turns true when the daemon starts draining: Pipeline streams then stop taking new
    /// operations, finish the ones in flight and end with UNAVAILABLE.
    pub(crate) shutdown: Option<watch::Receiver<bool>>,
    /// Each tenant's log, by tenant name (under every fsync policy), for the calls that
    /// must force their effect to disk before they reply.
    pub(crate) logs: HashMap<Arc<str>, Arc<Log>>,
    /// The replicated group this node serves in; `None` on a single node.
    pub(crate) group: Option<Arc<dyn Group>>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            max_batch_ids: 1000,
            max_message_bytes: 4 * 1024 * 1024,
            request_timeout: None,
            budget: None,
            metrics: None,
            shutdown: None,
            logs: HashMap::new(),
            group: None,
        }
    }
}

/// The service's settings, shared by every request.
struct Edge {
    max_batch_ids: usize,
    max_message_bytes: usize,
    request_timeout: Option<Duration>,
    budget: Option<Budget>,
    metrics: Arc<EdgeMetrics>,
    shutdown: Option<watch::Receiver<bool>>,
    logs: HashMap<Arc<str>, Arc<Log>>,
    group: Option<Arc<dyn Group>>,
}

impl SessionStoreService {
    /// The service, with GetMany calls of at most `max_batch_ids` IDs and every other
    /// setting at its default.
    pub fn new(max_batch_ids: usize) -> Self {
        Self::with(Settings {
            max_batch_ids,
            ..Settings::default()
        })
    }

    /// The service with these settings.
    pub(crate) fn with(settings: Settings) -> Self {
        let Settings {
            max_batch_ids,
            max_message_bytes,
            request_timeout,
            budget,
            metrics,
            shutdown,
            logs,
            group,
        } = settings;
        SessionStoreService {
            edge: Arc::new(Edge {
                max_batch_ids,
                max_message_bytes,
                request_timeout,
                budget,
                metrics: metrics.unwrap_or_else(|| Arc::new(EdgeMetrics::noop())),
                shutdown,
                logs,
                group,
            }),
        }
    }

    fn caller<T>(&self, req: &Request<T>) -> Result<Caller, Status> {
        Caller::of(req, &self.edge)
    }
}

/// A response under construction whose encoded size is counted as its entries are added.
struct Bounded<T> {
    items: Vec<T>,
    bytes: usize,
    max: usize,
}

impl<T: prost::Message> Bounded<T> {
    fn new(max: usize, capacity: usize) -> Self {
        Bounded {
            items: Vec::with_capacity(capacity),
            bytes: 0,
            max,
        }
    }

    /// Adds `item` as an entry of a repeated field; refuses it, naming `max_message_bytes`,
    /// if the response would then be larger than that.
    fn push(&mut self, item: T) -> Result<(), Status> {
        // The field number's size is the same (one byte) for every field used here.
        self.bytes += prost::encoding::message::encoded_len(1, &item);
        if self.bytes > self.max {
            return Err(status::too_large(self.max));
        }
        self.items.push(item);
        Ok(())
    }
}

/// Who a request is: its tenant, and the peer it came from. Every operation runs as one, so
/// a miss is counted against its peer and a change waits for its tenant's log.
#[derive(Clone)]
struct Caller {
    tenant: Arc<Tenant>,
    peer: Option<IpAddr>,
    edge: Arc<Edge>,
}

impl Caller {
    fn of<T>(req: &Request<T>, edge: &Arc<Edge>) -> Result<Caller, Status> {
        let tenant = req
            .extensions()
            .get::<Arc<Tenant>>()
            .cloned()
            // Only a server built without the AuthLayer gets here: a wiring bug.
            .ok_or_else(|| Status::internal("no tenant for this request"))?;
        let peer = req
            .extensions()
            .get::<ConnInfo>()
            .and_then(|c| c.remote)
            .map(|a| a.ip());
        Ok(Caller {
            tenant,
            peer,
            edge: edge.clone(),
        })
    }

    /// The reply to a unary call that changes something, once every change made so far,
    /// this call's included, is durable. A call that failed replies at once.
    async fn durable_reply<T>(&self, result: Result<T, Status>) -> Reply<T> {
        let reply = result?;
        self.durable_up_to(self.log_position()).await?;
        Ok(Response::new(reply))
    }

    /// Where the log is now, if replies must wait for it: the position a change just made
    /// must reach on disk before its reply.
    fn log_position(&self) -> Option<u64> {
        self.tenant.durable_log.as_ref().map(|l| l.appended())
    }

    /// Waits until the log is durable up to `position`.
    async fn durable_up_to(&self, position: Option<u64>) -> Result<(), Status> {
        match (&self.tenant.durable_log, position) {
            (Some(log), Some(seq)) => Ok(log.wait_durable(seq).await?),
            _ => Ok(()),
        }
    }

    /// Maps a Store result for an ID lookup, counting a miss against the peer.
    fn lookup<T>(&self, result: Result<T, StoreError>) -> Result<T, Status> {
        if matches!(result, Err(StoreError::NotFound)) {
            self.tenant.guesses.miss(self.peer);
        }
        result.map_err(Status::from)
    }

    // One function per operation, the body of its RPC: the unary handlers and the Pipeline
    // call the same ones. Those that change something (create, update, regenerate, destroy,
    // destroy_user) owe a durability wait before their reply, which each caller takes its own
    // way: a unary call in `durable_reply`, a pipelined one in `finish`, within its own
    // `request_timeout`.

    async fn create(&self, r: pb::CreateRequest) -> Result<serve::Session, Status> {
        match self.group() {
            None => {
                let new = convert::new_session(r)?;
                Ok(serve::Session::from(self.tenant.store.create(new)?))
            }
            Some(group) => group::write(group, || self.plan_create(&r)).await,
        }
    }

    async fn get(&self, id: &str, peek: bool) -> Result<serve::Session, Status> {
        self.read_lease().await?;
        self.get_leased(id, peek)
    }

    /// `get` once the caller holds the lease (see `read_lease`).
    fn get_leased(&self, id: &str, peek: bool) -> Result<serve::Session, Status> {
        self.lookup(self.tenant.store.get(id, peek))
            .map(serve::Session::from)
    }

    async fn touch(&self, r: &pb::TouchRequest) -> Result<pb::TouchResponse, Status> {
        self.read_lease().await?;
        self.touch_leased(r)
    }

    /// `touch` once the caller holds the lease.
    fn touch_leased(&self, r: &pb::TouchRequest) -> Result<pb::TouchResponse, Status> {
        let at = self.lookup(self.tenant.store.touch(&r.id))?;
        Ok(pb::TouchResponse {
            expires_at: Some(reply::timestamp(at)),
        })
    }

    async fn update(&self, mut r: pb::UpdateRequest) -> Result<serve::Session, Status> {
        match self.group() {
            None => {
                let id = std::mem::take(&mut r.id);
                let updated = self.tenant.store.update(&id, convert::change(r));
                self.lookup(updated).map(serve::Session::from)
            }
            Some(group) => group::write(group, || self.plan_update(&r)).await,
        }
    }

    async fn regenerate(&self, r: &pb::RegenerateRequest) -> Result<serve::Session, Status> {
        match self.group() {
            None => {
                let moved = self.tenant.store.regenerate(&r.id, convert::rotation(r));
                self.lookup(moved).map(serve::Session::from)
            }
            Some(group) => group::write(group, || self.plan_regenerate(r)).await,
        }
    }

    async fn destroy(&self, r: &pb::DestroyRequest) -> Result<pb::DestroyResponse, Status> {
        match self.group() {
            None => {
                let existed = self.tenant.store.destroy(&r.id)?;
                if !existed {
                    self.tenant.guesses.miss(self.peer);
                }
                Ok(pb::DestroyResponse { existed })
            }
            Some(group) => group::write(group, || self.plan_destroy(r)).await,
        }
    }

    // The plans of the writes in a group: the same checks as a single node's, the effects
    // to propose and the reply once they are applied. A unary call and a Pipeline stream
    // take the same ones.

    fn plan_create(&self, r: &pb::CreateRequest) -> Result<Plan<serve::Session>, Status> {
        let new = convert::new_session(r.clone())?;
        Ok(self
            .tenant
            .store
            .plan_create(new)?
            .map(serve::Session::from))
    }

    fn plan_update(&self, r: &pb::UpdateRequest) -> Result<Plan<serve::Session>, Status> {
        let mut r = r.clone();
        let id = std::mem::take(&mut r.id);
        let planned = self.tenant.store.plan_update(&id, convert::change(r));
        Ok(self.lookup(planned)?.map(serve::Session::from))
    }

    fn plan_regenerate(&self, r: &pb::RegenerateRequest) -> Result<Plan<serve::Session>, Status> {
        let planned = self
            .tenant
            .store
            .plan_regenerate(&r.id, convert::rotation(r));
        Ok(self.lookup(planned)?.map(serve::Session::from))
    }

    fn plan_destroy(&self, r: &pb::DestroyRequest) -> Result<Plan<pb::DestroyResponse>, Status> {
        let plan = self.tenant.store.plan_destroy(&r.id)?;
        if !plan.reply {
            self.tenant.guesses.miss(self.peer);
        }
        Ok(plan.map(|existed| pb::DestroyResponse { existed }))
    }

    fn plan_destroy_user(
        &self,
        r: &pb::DestroyUserSessionsRequest,
    ) -> Result<Plan<pb::DestroyUserSessionsResponse>, Status> {
        let except = (!r.except_id.is_empty()).then_some(r.except_id.as_str());
        let plan = self.tenant.store.plan_destroy_user(&r.user_id, except)?;
        Ok(plan.map(|destroyed| pb::DestroyUserSessionsResponse { destroyed }))
    }

    /// The replicated group this node serves in, if any.
    fn group(&self) -> Option<&dyn Group> {
        self.edge.group.as_deref()
    }

    /// Whether a read may be served now without waiting: always on a single node; in a group,
    /// while this node's lease holds.
    fn lease_holds(&self) -> bool {
        self.group().is_none_or(|group| group.lease_holds())
    }

    /// In a group, waits until this node may serve a linearizable read.
    async fn read_lease(&self) -> Result<(), Status> {
        // The lease is checked here first: asking the group costs a boxed future.
        match self.group() {
            Some(group) if !group.lease_holds() => group.lease_read().await,
            _ => Ok(()),
        }
    }

    /// A user's sessions, oldest first. With attributes, each session is read on its own and
    /// the response's size is counted as it grows, so a user with many large sessions costs
    /// at most `max_message_bytes` before the call is refused.
    async fn list_user(
        &self,
        r: &pb::ListUserSessionsRequest,
    ) -> Result<serve::ListUserSessionsResponse, Status> {
        self.read_lease().await?;
        self.list_user_leased(r)
    }

    /// `list_user` once the caller holds the lease.
    fn list_user_leased(
        &self,
        r: &pb::ListUserSessionsRequest,
    ) -> Result<serve::ListUserSessionsResponse, Status> {
        let store = &self.tenant.store;
        let listed = store.list_user(&r.user_id, false)?;
        let mut out = Bounded::new(self.edge.max_message_bytes, listed.len());
        for s in listed {
            let s = if r.include_attributes {
                match store.get(&s.key.encode(), true) {
                    Ok(full) => full,
                    // Ended since it was listed.
                    Err(StoreError::NotFound) => continue,
                    Err(e) => return Err(e.into()),
                }
            } else {
                s
            };
            out.push(serve::Session::from(s))?;
        }
        Ok(serve::ListUserSessionsResponse {
            sessions: out.items,
        })
    }

    async fn destroy_user(
        &self,
        r: &pb::DestroyUserSessionsRequest,
    ) -> Result<pb::DestroyUserSessionsResponse, Status> {
        match self.group() {
            None => {
                let except = (!r.except_id.is_empty()).then_some(r.except_id.as_str());
                let destroyed = self.tenant.store.destroy_user(&r.user_id, except)?;
                Ok(pb::DestroyUserSessionsResponse { destroyed })
            }
            Some(group) => {
                // The plan lists the user's sessions: a read, so under the lease (see
                // `group`). Ends overtaken by another write ended their session anyway: no
                // replan.
                group.lease_read().await?;
                let plan = self.plan_destroy_user(r)?;
                if !plan.effects.is_empty() {
                    group.propose(plan.effects).await?;
                }
                Ok(plan.reply)
            }
        }
    }

    /// Makes every change of this tenant so far durable under any fsync policy: the log
    /// writes and fsyncs what it holds, whatever `fsync` says. Without persistence there is
    /// nothing to do.
    async fn sync_log(&self) -> Result<(), Status> {
        let Some(log) = self.edge.logs.get(&self.tenant.name).cloned() else {
            return Ok(());
        };
        let position = log.appended();
        // `Log::rotate` is the durable barrier the log has: before it answers, the flusher
        // writes and fsyncs everything appended so far into the old segment. A dedicated
        // sync call in the log would be cheaper (no new segment).
        let barrier = log.clone();
        let rotated = tokio::task::spawn_blocking(move || barrier.rotate())
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        if let Err(e) = rotated {
            return Err(Status::unavailable(format!(
                "the durable log could not be synced: {e}"
            )));
        }
        Ok(log.wait_durable(position).await?)
    }
}

type Reply<T> = Result<Response<T>, Status>;

/// Responses a pipeline may have ready before the client reads them; past it, the server
/// stops reading requests from that stream (backpressure instead of an unbounded queue).
pub(crate) const PIPELINE_WINDOW: usize = 256;

#[tonic::async_trait]
impl serve::session_store_server::SessionStore for SessionStoreService {
    async fn create(&self, req: Request<pb::CreateRequest>) -> Reply<serve::Session> {
        let caller = self.caller(&req)?;
        let created = caller.create(req.into_inner()).await;
        caller.durable_reply(created).await
    }

    async fn get(&self, req: Request<pb::GetRequest>) -> Reply<serve::Session> {
        let r = req.get_ref();
        let session = self.caller(&req)?.get(&r.id, r.peek).await?;
        Ok(Response::new(session))
    }

    async fn touch(&self, req: Request<pb::TouchRequest>) -> Reply<pb::TouchResponse> {
        Ok(Response::new(
            self.caller(&req)?.touch(req.get_ref()).await?,
        ))
    }

    async fn update(&self, req: Request<pb::UpdateRequest>) -> Reply<serve::Session> {
        let caller = self.caller(&req)?;
        let updated = caller.update(req.into_inner()).await;
        caller.durable_reply(updated).await
    }

    async fn regenerate(&self, req: Request<pb::RegenerateRequest>) -> Reply<serve::Session> {
        let caller = self.caller(&req)?;
        let moved = caller.regenerate(req.get_ref()).await;
        caller.durable_reply(moved).await
    }

    async fn destroy(&self, req: Request<pb::DestroyRequest>) -> Reply<pb::DestroyResponse> {
        let caller = self.caller(&req)?;
        let destroyed = caller.destroy(req.get_ref()).await;
        caller.durable_reply(destroyed).await
    }

    async fn list_user_sessions(
        &self,
        req: Request<pb::ListUserSessionsRequest>,
    ) -> Reply<serve::ListUserSessionsResponse> {
        Ok(Response::new(
            self.caller(&req)?.list_user(req.get_ref()).await?,
        ))
    }

    async fn destroy_user_sessions(
        &self,
        req: Request<pb::DestroyUserSessionsRequest>,
    ) -> Reply<pb::DestroyUserSessionsResponse> {
        let caller = self.caller(&req)?;
        let destroyed = caller.destroy_user(req.get_ref()).await;
        caller.durable_reply(destroyed).await
    }

    async fn get_many(&self, req: Request<pb::GetManyRequest>) -> Reply<serve::GetManyResponse> {
        let caller = self.caller(&req)?;
        let r = req.into_inner();
        if r.ids.len() > self.edge.max_batch_ids {
            return Err(status::invalid(
                "ids",
                &format!(
                    "has {} entries, over max_batch_ids ({})",
                    r.ids.len(),
                    self.edge.max_batch_ids
                ),
            ));
        }
        let mut out: Bounded<serve::GetResult> =
            Bounded::new(self.edge.max_message_bytes, r.ids.len());
        // A repeated ID is looked up once: later positions repeat the first answer, whose
        // attribute values are shared, not copied.
        let mut first: HashMap<&str, usize> = HashMap::new();
        for (i, id) in r.ids.iter().enumerate() {
            if let Some(&j) = first.get(id.as_str()) {
                let again = out.items[j].clone();
                out.push(again)?;
                continue;
            }
            first.insert(id, i);
            let result = match caller.get(id, r.peek).await {
                Ok(s) => serve::get_result::Result::Session(s),
                Err(e) => serve::get_result::Result::Error(status::error(&e)),
            };
            out.push(serve::GetResult {
                result: Some(result),
            })?;
        }
        Ok(Response::new(serve::GetManyResponse { results: out.items }))
    }

    type PipelineStream = ReceiverStream<Result<serve::PipelineResponse, Status>>;

    async fn pipeline(
        &self,
        req: Request<tonic::Streaming<pb::PipelineRequest>>,
    ) -> Reply<Self::PipelineStream> {
        let caller = self.caller(&req)?;
        Ok(Response::new(caller.serve_pipeline(req.into_inner())))
    }

    async fn destroy_all_sessions(
        &self,
        req: Request<pb::DestroyAllSessionsRequest>,
    ) -> Reply<pb::DestroyAllSessionsResponse> {
        let caller = self.caller(&req)?;
        if req.get_ref().confirm != DESTROY_ALL_CONFIRMATION {
            return Err(status::invalid(
                "confirm",
                &format!(
                    "must be {DESTROY_ALL_CONFIRMATION:?} to end every session of this tenant"
                ),
            ));
        }
        let destroyed = caller.tenant.store.destroy_all()?;
        caller.sync_log().await?;
        tracing::warn!(
            tenant = %caller.tenant.name,
            destroyed,
            "every session of the tenant destroyed (DestroyAllSessions)"
        );
        Ok(Response::new(pb::DestroyAllSessionsResponse { destroyed }))
    }
}
