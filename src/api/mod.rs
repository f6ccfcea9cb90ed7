//! The gRPC edge: thin handlers that convert the request, call the Store, and map the result.
//! No session rule lives here.

pub mod convert;
pub mod guessing;
pub mod status;

use std::net::IpAddr;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::store::StoreError;
use crate::tenant::Tenant;
use crate::transport::ConnInfo;

/// The generated protobuf types and service stubs.
#[allow(missing_docs, clippy::all)]
pub mod pb {
    tonic::include_proto!("sessiond.v1");
}

/// The encoded descriptor set of the public API, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/sessiond_descriptor.bin"));

/// The `sessiond.v1.SessionStore` service. Each request runs as its [`Caller`]: the tenant
/// the transport's [`AuthLayer`](crate::transport::AuthLayer) found for it, and its peer.
#[derive(Clone)]
pub struct SessionStoreService {
    max_batch_ids: usize,
}

impl SessionStoreService {
    /// The service, with GetMany calls of at most `max_batch_ids` IDs.
    pub fn new(max_batch_ids: usize) -> Self {
        SessionStoreService { max_batch_ids }
    }
}

/// Who a request is: its tenant, and the peer it came from.
#[derive(Clone)]
struct Caller {
    tenant: Arc<Tenant>,
    peer: Option<IpAddr>,
}

impl Caller {
    fn of<T>(req: &Request<T>) -> Result<Caller, Status> {
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
        Ok(Caller { tenant, peer })
    }

    /// Waits until every change made so far, this call's included, is durable.
    async fn durable(&self) -> Result<(), Status> {
        self.durable_up_to(self.log_position()).await
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

    /// Runs one operation against the Store: the body of every RPC, unary or pipelined.
    /// Says whether it changed anything (and so must be durable before the reply).
    fn apply(&self, op: Op) -> (Result<Outcome, Status>, bool) {
        let store = &self.tenant.store;
        match op {
            Op::Create(r) => (
                convert::new_session(r)
                    .and_then(|new| Ok(store.create(new)?))
                    .map(|s| Outcome::Session(convert::session(s))),
                true,
            ),
            Op::Get(r) => (
                self.lookup(store.get(&r.id, r.peek))
                    .map(|s| Outcome::Session(convert::session(s))),
                false,
            ),
            Op::Touch(r) => (
                self.lookup(store.touch(&r.id)).map(|at| {
                    Outcome::Touch(pb::TouchResponse {
                        expires_at: Some(convert::timestamp(at)),
                    })
                }),
                false,
            ),
            Op::Update(mut r) => {
                let id = std::mem::take(&mut r.id);
                (
                    self.lookup(store.update(&id, convert::change(r)))
                        .map(|s| Outcome::Session(convert::session(s))),
                    true,
                )
            }
            Op::Regenerate(r) => (
                self.lookup(store.regenerate(&r.id, convert::rotation(&r)))
                    .map(|s| Outcome::Session(convert::session(s))),
                true,
            ),
            Op::Destroy(r) => {
                let result = store.destroy(&r.id).map_err(Status::from);
                if let Ok(false) = result {
                    self.tenant.guesses.miss(self.peer);
                }
                (
                    result.map(|existed| Outcome::Destroy(pb::DestroyResponse { existed })),
                    true,
                )
            }
            Op::ListUserSessions(r) => (
                store
                    .list_user(&r.user_id, r.include_attributes)
                    .map_err(Status::from)
                    .map(|sessions| {
                        Outcome::ListUserSessions(pb::ListUserSessionsResponse {
                            sessions: sessions.into_iter().map(convert::session).collect(),
                        })
                    }),
                false,
            ),
            Op::DestroyUserSessions(r) => {
                let except = (!r.except_id.is_empty()).then_some(r.except_id.as_str());
                (
                    store
                        .destroy_user(&r.user_id, except)
                        .map_err(Status::from)
                        .map(|destroyed| {
                            Outcome::DestroyUserSessions(pb::DestroyUserSessionsResponse {
                                destroyed,
                            })
                        }),
                    true,
                )
            }
        }
    }

    /// `apply`, then the durability wait a mutation owes before its reply.
    /// Applies one pipelined request; its response, and the log position the response must
    /// wait for if it changed anything.
    fn pipelined(&self, request: pb::PipelineRequest) -> (pb::PipelineResponse, Option<u64>) {
        let (result, position) = match request.op {
            Some(op) => {
                let (result, mutated) = self.apply(op);
                let position = if mutated { self.log_position() } else { None };
                (
                    result.unwrap_or_else(|e| Outcome::Error(status::error(&e))),
                    position,
                )
            }
            None => (
                Outcome::Error(status::error(&status::invalid("op", "is missing"))),
                None,
            ),
        };
        let response = pb::PipelineResponse {
            id: request.id,
            result: Some(result),
        };
        (response, position)
    }

    /// Spawns the task that applies a Pipeline stream's requests in order, sending
    /// `wrap(response, log position)` for each (a broken stream's error too, with no
    /// position). It stops at the stream's end, after its first error, or when `tx` closes
    /// (the client went away).
    fn apply_stream<T: Send + 'static>(
        self,
        mut requests: tonic::Streaming<pb::PipelineRequest>,
        tx: mpsc::Sender<T>,
        wrap: fn(Result<pb::PipelineResponse, Status>, Option<u64>) -> T,
    ) {
        tokio::spawn(async move {
            loop {
                let (response, position) = match requests.message().await {
                    Ok(Some(request)) => {
                        let (response, position) = self.pipelined(request);
                        (Ok(response), position)
                    }
                    Ok(None) => return,
                    Err(e) => (Err(e), None),
                };
                let failed = response.is_err();
                if tx.send(wrap(response, position)).await.is_err() || failed {
                    return;
                }
            }
        });
    }

    async fn call(&self, op: Op) -> Result<Outcome, Status> {
        let (result, mutated) = self.apply(op);
        let outcome = result?;
        if mutated {
            self.durable().await?;
        }
        Ok(outcome)
    }
}

use pb::pipeline_request::Op;
use pb::pipeline_response::Result as Outcome;

type Reply<T> = Result<Response<T>, Status>;

/// Responses a pipeline may have ready before the client reads them; past it, the server
/// stops reading requests from that stream (backpressure instead of an unbounded queue).
pub const PIPELINE_WINDOW: usize = 256;

/// Unwraps the outcome a unary RPC expects; any other is a bug in `apply`.
macro_rules! expect {
    ($outcome:expr, $variant:ident) => {
        match $outcome? {
            Outcome::$variant(v) => Ok(Response::new(v)),
            _ => Err(Status::internal(concat!(
                "unexpected result for ",
                stringify!($variant)
            ))),
        }
    };
}

#[tonic::async_trait]
impl pb::session_store_server::SessionStore for SessionStoreService {
    async fn create(&self, req: Request<pb::CreateRequest>) -> Reply<pb::Session> {
        expect!(
            Caller::of(&req)?.call(Op::Create(req.into_inner())).await,
            Session
        )
    }

    async fn get(&self, req: Request<pb::GetRequest>) -> Reply<pb::Session> {
        expect!(
            Caller::of(&req)?.call(Op::Get(req.into_inner())).await,
            Session
        )
    }

    async fn touch(&self, req: Request<pb::TouchRequest>) -> Reply<pb::TouchResponse> {
        expect!(
            Caller::of(&req)?.call(Op::Touch(req.into_inner())).await,
            Touch
        )
    }

    async fn update(&self, req: Request<pb::UpdateRequest>) -> Reply<pb::Session> {
        expect!(
            Caller::of(&req)?.call(Op::Update(req.into_inner())).await,
            Session
        )
    }

    async fn regenerate(&self, req: Request<pb::RegenerateRequest>) -> Reply<pb::Session> {
        expect!(
            Caller::of(&req)?
                .call(Op::Regenerate(req.into_inner()))
                .await,
            Session
        )
    }

    async fn destroy(&self, req: Request<pb::DestroyRequest>) -> Reply<pb::DestroyResponse> {
        expect!(
            Caller::of(&req)?.call(Op::Destroy(req.into_inner())).await,
            Destroy
        )
    }

    async fn list_user_sessions(
        &self,
        req: Request<pb::ListUserSessionsRequest>,
    ) -> Reply<pb::ListUserSessionsResponse> {
        let caller = Caller::of(&req)?;
        let op = Op::ListUserSessions(req.into_inner());
        expect!(caller.call(op).await, ListUserSessions)
    }

    async fn destroy_user_sessions(
        &self,
        req: Request<pb::DestroyUserSessionsRequest>,
    ) -> Reply<pb::DestroyUserSessionsResponse> {
        let caller = Caller::of(&req)?;
        let op = Op::DestroyUserSessions(req.into_inner());
        expect!(caller.call(op).await, DestroyUserSessions)
    }

    async fn get_many(&self, req: Request<pb::GetManyRequest>) -> Reply<pb::GetManyResponse> {
        let caller = Caller::of(&req)?;
        let r = req.into_inner();
        if r.ids.len() > self.max_batch_ids {
            return Err(status::invalid(
                "ids",
                &format!(
                    "has {} entries, over max_batch_ids ({})",
                    r.ids.len(),
                    self.max_batch_ids
                ),
            ));
        }
        let results = r
            .ids
            .into_iter()
            .map(|id| {
                let result = match caller.apply(Op::Get(pb::GetRequest { id, peek: r.peek })).0 {
                    Ok(Outcome::Session(s)) => pb::get_result::Result::Session(s),
                    Ok(_) => pb::get_result::Result::Error(status::error(&Status::internal(
                        "unexpected result",
                    ))),
                    Err(e) => pb::get_result::Result::Error(status::error(&e)),
                };
                pb::GetResult {
                    result: Some(result),
                }
            })
            .collect();
        Ok(Response::new(pb::GetManyResponse { results }))
    }

    type PipelineStream = ReceiverStream<Result<pb::PipelineResponse, Status>>;

    async fn pipeline(
        &self,
        req: Request<tonic::Streaming<pb::PipelineRequest>>,
    ) -> Reply<Self::PipelineStream> {
        let caller = Caller::of(&req)?;
        let requests = req.into_inner();
        let (tx, rx) = mpsc::channel(PIPELINE_WINDOW);
        if caller.tenant.durable_log.is_none() {
            // Replies need not wait for the disk: one task applies each request in order and
            // sends its reply.
            caller.apply_stream(requests, tx, |response, _| response);
            return Ok(Response::new(ReceiverStream::new(rx)));
        }
        // Two stages, so a stream does not stop at every fsync: the first applies requests in
        // order, the second holds each reply until its change is durable (one fsync covers
        // everything applied meanwhile) and sends it. Both channels are bounded.
        let (applied_tx, mut applied) = mpsc::channel(PIPELINE_WINDOW);
        caller
            .clone()
            .apply_stream(requests, applied_tx, |response, position| {
                (response, position)
            });
        let svc = caller;
        tokio::spawn(async move {
            while let Some((response, position)) = applied.recv().await {
                let response = match svc.durable_up_to(position).await {
                    Ok(()) => response,
                    Err(e) => response.map(|r| pb::PipelineResponse {
                        result: Some(Outcome::Error(status::error(&e))),
                        ..r
                    }),
                };
                // A failed send means the client went away: stop quietly.
                if tx.send(response).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
