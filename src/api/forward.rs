//! Routing without a smart client: in a replicated group, any node accepts any call of the
//! session store, and a node that does not lead passes it to the one that does.
//!
//! The call goes on as it came, over one long-lived HTTP/2 connection per leader to the
//! leader's **peer port** (its address as the membership records it, dialled as Raft dials
//! it: through `cluster.dial_overrides`, over peer mutual TLS when that is on): same path,
//! same metadata (so the leader authenticates it again and applies its deadline), and the
//! body streamed both ways, so a Pipeline stream is forwarded whole. The client port is not
//! used between members: it may have TLS that a member has no client certificate for, and
//! its address may be one only clients can reach.
//!
//! Every reply carries the leader's client address (`cluster.advertise_client`) in
//! [`LEADER_HEADER`], so a client that wants to can go there directly next time. A call
//! that reaches a node that does not lead, after a forward already, is refused rather than
//! forwarded again: two nodes that disagree for a moment about who leads must not pass a
//! call back and forth.
//!
//! On the peer port ([`ForwardLayer::peer_port`]), the session store serves only forwarded
//! calls: a call without [`FORWARDED_HEADER`] is refused, so a client pointed at the peer
//! port by mistake learns it at once instead of being served past the client port's
//! settings (its TLS, its connection limits). The header is no credential: whoever can talk
//! to the peer port is a member anyway (see SECURITY.md).
//!
//! Credentials travel as metadata only: on the peer port the TLS client certificate is the
//! forwarding member's, not the client's, so a tenant known by its certificate
//! (`client_subject`) could not be recognised there. A group serves the default tenant only
//! today; tenants in a group will need the client's verified subject carried along.
//!
//! Health, reflection and the admin calls are never forwarded: they describe this node.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures_util::future::BoxFuture;
use http::{HeaderValue, Request, Response};
use tonic::body::Body;
use tonic::transport::Channel;
use tonic::Status;
use tower::{Layer, Service, ServiceExt as _};

use crate::lock;
use crate::proto::SERVICE_NAME;

/// Response metadata naming the leader's client address (`host:port`), on every reply of the
/// session store in a group.
pub const LEADER_HEADER: &str = "sessiond-leader";

/// Request metadata a node adds to a call it forwards.
pub const FORWARDED_HEADER: &str = "sessiond-forwarded";

/// Where a call of the session store is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// This node leads: serve it here. Carries this node's client address.
    Here(Arc<str>),
    /// Another node leads: forward it there.
    Leader {
        /// The leader's peer address, as the membership records it.
        peer_addr: String,
        /// The leader's client address, for [`LEADER_HEADER`].
        client_addr: String,
    },
    /// No leader is known: the group is electing one, or this node cannot reach a quorum.
    NoLeader,
}

/// Who leads now, as this node sees it, and how to reach it.
pub trait Leadership: Send + Sync + 'static {
    /// The route for a call arriving now.
    fn route(&self) -> Route;

    /// A channel to the peer port of the member the membership records at `peer_addr`,
    /// connected on first use; or why there can be none.
    fn dial(&self, peer_addr: &str) -> Result<Channel, String>;
}

/// Forwards the session store's calls to the leader (see the module docs).
#[derive(Clone)]
pub struct ForwardLayer {
    shared: Arc<Shared>,
}

struct Shared {
    leadership: Arc<dyn Leadership>,
    /// One lazily connected channel per leader peer address.
    channels: Mutex<HashMap<String, Channel>>,
    /// The path prefix of the calls this layer routes.
    prefix: String,
    /// On the peer port: only forwarded calls are served, and none is forwarded again.
    peer_port: bool,
}

impl ForwardLayer {
    /// Routes by what `leadership` says at each call, on the client port.
    pub fn new(leadership: Arc<dyn Leadership>) -> Self {
        Self::with(leadership, false)
    }

    /// Serves the calls other members forward, on the peer port: a call without
    /// [`FORWARDED_HEADER`] is refused, and one that finds this node no longer leading is
    /// refused rather than forwarded again.
    pub fn peer_port(leadership: Arc<dyn Leadership>) -> Self {
        Self::with(leadership, true)
    }

    fn with(leadership: Arc<dyn Leadership>, peer_port: bool) -> Self {
        ForwardLayer {
            shared: Arc::new(Shared {
                leadership,
                channels: Mutex::new(HashMap::new()),
                prefix: format!("/{SERVICE_NAME}/"),
                peer_port,
            }),
        }
    }
}

impl<S> Layer<S> for ForwardLayer {
    type Service = Forward<S>;

    fn layer(&self, inner: S) -> Forward<S> {
        Forward {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// The service [`ForwardLayer`] makes.
#[derive(Clone)]
pub struct Forward<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl Shared {
    fn channel(&self, leader: &str) -> Result<Channel, Status> {
        let mut channels = lock(&self.channels);
        if let Some(c) = channels.get(leader) {
            return Ok(c.clone());
        }
        let channel = self.leadership.dial(leader).map_err(|e| {
            Status::unavailable(format!(
                "this node does not lead the group and cannot dial the leader: {e}"
            ))
        })?;
        channels.insert(leader.to_owned(), channel.clone());
        Ok(channel)
    }
}

impl<S, E> Service<Request<Body>> for Forward<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = E> + Clone + Send + 'static,
    S::Future: Send + 'static,
    E: Send + 'static,
{
    type Response = Response<Body>;
    type Error = E;
    type Future = BoxFuture<'static, Result<Response<Body>, E>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), E>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        if !req.uri().path().starts_with(&self.shared.prefix) {
            return Box::pin(self.inner.call(req));
        }
        let forwarded = req.headers().contains_key(FORWARDED_HEADER);
        if self.shared.peer_port && !forwarded {
            return refused(Status::permission_denied(
                "this is a cluster member's peer port: it serves the session store only for \
                 calls forwarded by another member; send calls to the client port (listen)",
            ));
        }
        let (peer_addr, client_addr) = match self.shared.leadership.route() {
            Route::Here(me) => {
                let served = self.inner.call(req);
                return Box::pin(async move { Ok(with_leader(served.await?, &me)) });
            }
            Route::Leader {
                peer_addr,
                client_addr,
            } => (peer_addr, client_addr),
            Route::NoLeader => return refused(no_leader()),
        };
        if forwarded {
            return refused(Status::unavailable(format!(
                "this node does not lead the group and the call was already forwarded once; \
                 the leader is {client_addr}: retry there or shortly"
            )));
        }
        let channel = match self.shared.channel(&peer_addr) {
            Ok(c) => c,
            Err(status) => return refused(status),
        };
        req.headers_mut()
            .insert(FORWARDED_HEADER, HeaderValue::from_static("1"));
        Box::pin(async move {
            let forwarded = match channel.oneshot(req).await {
                Ok(response) => response,
                Err(e) => Status::unavailable(format!(
                    "this node does not lead the group and could not reach the leader at \
                     {peer_addr}: {e}"
                ))
                .into_http(),
            };
            // The leader names itself; a reply it never sent names the leader this node
            // knows of.
            if forwarded.headers().contains_key(LEADER_HEADER) {
                return Ok(forwarded);
            }
            Ok(with_leader(forwarded, &client_addr))
        })
    }
}

/// The status of a call no node can serve now.
fn no_leader() -> Status {
    Status::unavailable(
        "no leader: the group is electing one or this node cannot reach a quorum; retry shortly",
    )
}

/// A refusal, as the reply to the call.
fn refused<E: Send + 'static>(status: Status) -> BoxFuture<'static, Result<Response<Body>, E>> {
    Box::pin(std::future::ready(Ok(status.into_http())))
}

/// Adds the leader's address to a reply's metadata.
fn with_leader(mut response: Response<Body>, leader: &str) -> Response<Body> {
    if let Ok(v) = HeaderValue::from_str(leader) {
        response.headers_mut().insert(LEADER_HEADER, v);
    }
    response
}
