//! The sessiond backend: its operations over unary RPCs or, with `--pipeline`, one Pipeline
//! stream per connection; server CPU and RSS from the admin endpoint.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use sessiond_client::pb;
use sessiond_client::pb::session_store_client::SessionStoreClient;
use tonic::transport::{Channel, Endpoint};

use crate::workload::{Op, OpResult, Slot};

/// One connection to sessiond: unary RPCs, or one Pipeline stream.
#[derive(Clone)]
enum GrpcConn {
    Unary(SessionStoreClient<Channel>),
    Pipe(Arc<PipeConn>),
}

/// Callers waiting for pipeline responses, by request id.
type Waiting =
    Arc<Mutex<HashMap<u64, tokio::sync::oneshot::Sender<pb::pipeline_response::Result>>>>;

/// A Pipeline stream: requests go in with fresh ids; a reader task hands each response to
/// the caller waiting on that id.
struct PipeConn {
    tx: tokio::sync::mpsc::Sender<pb::PipelineRequest>,
    waiting: Waiting,
    next: std::sync::atomic::AtomicU64,
}

impl PipeConn {
    async fn open(mut client: SessionStoreClient<Channel>) -> Result<PipeConn, String> {
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        let mut responses = client
            .pipeline(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .map_err(|e| format!("pipeline: {e}"))?
            .into_inner();
        let waiting: Waiting = Arc::default();
        let routes = waiting.clone();
        tokio::spawn(async move {
            while let Ok(Some(r)) = responses.message().await {
                let waiter = routes.lock().unwrap().remove(&r.id);
                if let (Some(w), Some(result)) = (waiter, r.result) {
                    let _ = w.send(result);
                }
            }
        });
        Ok(PipeConn {
            tx,
            waiting,
            next: std::sync::atomic::AtomicU64::new(0),
        })
    }
}

impl GrpcConn {
    /// Runs one operation, unary or pipelined, as the pipeline's result type.
    async fn call(
        &self,
        op: pb::pipeline_request::Op,
    ) -> Result<pb::pipeline_response::Result, String> {
        use pb::pipeline_request::Op as Req;
        use pb::pipeline_response::Result as Res;
        let code = |e: tonic::Status| format!("{:?}", e.code());
        let result = match self {
            GrpcConn::Pipe(p) => {
                let id = p.next.fetch_add(1, Ordering::Relaxed);
                let (tx, rx) = tokio::sync::oneshot::channel();
                p.waiting.lock().unwrap().insert(id, tx);
                p.tx.send(pb::PipelineRequest { id, op: Some(op) })
                    .await
                    .map_err(|_| "pipeline closed".to_string())?;
                rx.await.map_err(|_| "pipeline closed".to_string())?
            }
            GrpcConn::Unary(c) => {
                let mut c = c.clone();
                match op {
                    Req::Create(r) => Res::Session(c.create(r).await.map_err(code)?.into_inner()),
                    Req::Get(r) => Res::Session(c.get(r).await.map_err(code)?.into_inner()),
                    Req::Touch(r) => Res::Touch(c.touch(r).await.map_err(code)?.into_inner()),
                    Req::Update(r) => Res::Session(c.update(r).await.map_err(code)?.into_inner()),
                    Req::Regenerate(r) => {
                        Res::Session(c.regenerate(r).await.map_err(code)?.into_inner())
                    }
                    Req::Destroy(r) => Res::Destroy(c.destroy(r).await.map_err(code)?.into_inner()),
                    Req::ListUserSessions(r) => Res::ListUserSessions(
                        c.list_user_sessions(r).await.map_err(code)?.into_inner(),
                    ),
                    Req::DestroyUserSessions(r) => Res::DestroyUserSessions(
                        c.destroy_user_sessions(r).await.map_err(code)?.into_inner(),
                    ),
                }
            }
        };
        match result {
            Res::Error(e) => Err(format!("{:?}", tonic::Code::from_i32(e.code))),
            ok => Ok(ok),
        }
    }
}

/// sessiond's connections, shared by the workers.
#[derive(Clone)]
pub(crate) struct Grpc {
    conns: Vec<GrpcConn>,
}

impl Grpc {
    /// `connections` connections to `addr` (plaintext), each with its Pipeline stream if
    /// `pipeline`.
    pub(crate) async fn connect(
        addr: &str,
        connections: usize,
        pipeline: bool,
    ) -> Result<Grpc, String> {
        let mut conns = Vec::new();
        for _ in 0..connections.max(1) {
            let ch = Endpoint::from_shared(format!("http://{addr}"))
                .map_err(|e| e.to_string())?
                .tcp_nodelay(true)
                .connect()
                .await
                .map_err(|e| format!("cannot connect to sessiond at {addr}: {e}"))?;
            let client = SessionStoreClient::new(ch);
            conns.push(if pipeline {
                GrpcConn::Pipe(Arc::new(PipeConn::open(client).await?))
            } else {
                GrpcConn::Unary(client)
            });
        }
        Ok(Grpc { conns })
    }

    fn conn(&self, conn: usize) -> &GrpcConn {
        &self.conns[conn % self.conns.len()]
    }

    /// Creates a session for `user`; returns its ID.
    pub(crate) async fn create(
        &self,
        conn: usize,
        user: usize,
        attrs: Vec<(String, Bytes)>,
    ) -> Result<String, String> {
        let req = pb::CreateRequest {
            user_id: format!("user{user}"),
            attributes: attrs.into_iter().collect(),
            ..Default::default()
        };
        match self
            .conn(conn)
            .call(pb::pipeline_request::Op::Create(req))
            .await?
        {
            pb::pipeline_response::Result::Session(s) => Ok(s.id),
            _ => Err("unexpected result".into()),
        }
    }

    /// Runs a Get, Update, Destroy or Regenerate on session `id`.
    pub(crate) async fn apply(
        &self,
        op: Op,
        conn: usize,
        id: String,
        value_bytes: usize,
    ) -> Result<Slot, String> {
        use pb::pipeline_request::Op as Req;
        let c = self.conn(conn);
        match op {
            Op::Get => c
                .call(Req::Get(pb::GetRequest { id, peek: false }))
                .await
                .map(|_| Slot::Kept),
            Op::Update => {
                let req = pb::UpdateRequest {
                    id,
                    set: [("attr3".to_string(), Bytes::from(vec![b'u'; value_bytes]))].into(),
                    ..Default::default()
                };
                c.call(Req::Update(req)).await.map(|_| Slot::Kept)
            }
            Op::Destroy => {
                c.call(Req::Destroy(pb::DestroyRequest { id })).await?;
                Ok(Slot::Ended)
            }
            Op::Regenerate => {
                let req = pb::RegenerateRequest {
                    id,
                    ..Default::default()
                };
                match c.call(Req::Regenerate(req)).await? {
                    pb::pipeline_response::Result::Session(s) => Ok(Slot::Moved(s.id)),
                    _ => Ok(Slot::Kept),
                }
            }
            Op::Create | Op::List => unreachable!("not an operation on one session"),
        }
    }

    /// Lists `user`'s sessions, without attributes.
    pub(crate) async fn list(&self, conn: usize, user: usize) -> OpResult {
        let req = pb::ListUserSessionsRequest {
            user_id: format!("user{user}"),
            include_attributes: false,
        };
        self.conn(conn)
            .call(pb::pipeline_request::Op::ListUserSessions(req))
            .await
            .map(drop)
    }

    /// Server CPU seconds and RSS bytes, from the admin endpoint at `admin_addr`.
    pub(crate) async fn server_stats(&self, admin_addr: &str) -> Option<(f64, f64)> {
        let body = sessiond_tools::admin::fetch(admin_addr, "/metrics", Duration::from_secs(5))
            .await
            .ok()?;
        Some((
            sessiond_tools::admin::sample(&body, "sessiond_process_cpu_seconds_total")?,
            sessiond_tools::admin::sample(&body, "sessiond_process_resident_memory_bytes")?,
        ))
    }
}
