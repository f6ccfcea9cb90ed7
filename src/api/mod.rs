//! The gRPC edge: thin handlers that convert the request, call the Store, and map the result.
//! No session rule lives here.

pub mod convert;
pub mod guessing;
pub mod status;

use std::net::IpAddr;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use self::guessing::GuessWatch;
use crate::persist::log::{FsyncPolicy, Log};
use crate::store::{Store, StoreError};

/// The generated protobuf types and service stubs.
#[allow(missing_docs, clippy::all)]
pub mod pb {
    tonic::include_proto!("sessiond.v1");
}

/// The encoded descriptor set of the public API, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/sessiond_descriptor.bin"));

/// The `sessiond.v1.SessionStore` service.
#[derive(Clone)]
pub struct SessionStoreService {
    store: Store,
    guesses: Arc<GuessWatch>,
    log: Option<Arc<Log>>,
}

impl SessionStoreService {
    /// Serves `store`, reporting lookups of unknown IDs to `guesses`. With a `log` under
    /// `fsync = always`, mutations reply only once their record is on disk.
    pub fn new(store: Store, guesses: Arc<GuessWatch>, log: Option<Arc<Log>>) -> Self {
        let log = log.filter(|l| l.policy() == FsyncPolicy::Always);
        SessionStoreService {
            store,
            guesses,
            log,
        }
    }

    /// Waits until every change made so far, this call's included, is durable.
    async fn durable(&self) -> Result<(), Status> {
        match &self.log {
            Some(log) => Ok(log.wait_durable(log.appended()).await?),
            None => Ok(()),
        }
    }

    /// Maps a Store result for an ID lookup, counting a miss against the peer.
    fn lookup<T>(&self, peer: Option<IpAddr>, result: Result<T, StoreError>) -> Result<T, Status> {
        if matches!(result, Err(StoreError::NotFound)) {
            self.guesses.miss(peer);
        }
        result.map_err(Status::from)
    }
}

fn peer<T>(req: &Request<T>) -> Option<IpAddr> {
    req.remote_addr().map(|a| a.ip())
}

type Reply<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl pb::session_store_server::SessionStore for SessionStoreService {
    async fn create(&self, req: Request<pb::CreateRequest>) -> Reply<pb::Session> {
        let new = convert::new_session(req.into_inner())?;
        let s = self.store.create(new)?;
        self.durable().await?;
        Ok(Response::new(convert::session(s)))
    }

    async fn get(&self, req: Request<pb::GetRequest>) -> Reply<pb::Session> {
        let peer = peer(&req);
        let r = req.into_inner();
        let s = self.lookup(peer, self.store.get(&r.id, r.peek))?;
        Ok(Response::new(convert::session(s)))
    }

    async fn touch(&self, req: Request<pb::TouchRequest>) -> Reply<pb::TouchResponse> {
        let peer = peer(&req);
        let expires_at = self.lookup(peer, self.store.touch(&req.into_inner().id))?;
        Ok(Response::new(pb::TouchResponse {
            expires_at: Some(convert::timestamp(expires_at)),
        }))
    }

    async fn update(&self, req: Request<pb::UpdateRequest>) -> Reply<pb::Session> {
        let peer = peer(&req);
        let mut r = req.into_inner();
        let id = std::mem::take(&mut r.id);
        let s = self.lookup(peer, self.store.update(&id, convert::change(r)))?;
        self.durable().await?;
        Ok(Response::new(convert::session(s)))
    }

    async fn regenerate(&self, req: Request<pb::RegenerateRequest>) -> Reply<pb::Session> {
        let peer = peer(&req);
        let r = req.into_inner();
        let s = self.lookup(peer, self.store.regenerate(&r.id, convert::rotation(&r)))?;
        self.durable().await?;
        Ok(Response::new(convert::session(s)))
    }

    async fn destroy(&self, req: Request<pb::DestroyRequest>) -> Reply<pb::DestroyResponse> {
        let peer = peer(&req);
        let existed = self.store.destroy(&req.into_inner().id)?;
        if !existed {
            self.guesses.miss(peer);
        }
        self.durable().await?;
        Ok(Response::new(pb::DestroyResponse { existed }))
    }

    async fn list_user_sessions(
        &self,
        req: Request<pb::ListUserSessionsRequest>,
    ) -> Reply<pb::ListUserSessionsResponse> {
        let r = req.into_inner();
        let sessions = self.store.list_user(&r.user_id, r.include_attributes)?;
        Ok(Response::new(pb::ListUserSessionsResponse {
            sessions: sessions.into_iter().map(convert::session).collect(),
        }))
    }

    async fn destroy_user_sessions(
        &self,
        req: Request<pb::DestroyUserSessionsRequest>,
    ) -> Reply<pb::DestroyUserSessionsResponse> {
        let r = req.into_inner();
        let except = (!r.except_id.is_empty()).then_some(r.except_id.as_str());
        let destroyed = self.store.destroy_user(&r.user_id, except)?;
        self.durable().await?;
        Ok(Response::new(pb::DestroyUserSessionsResponse { destroyed }))
    }
}
