//! A typed client for sessiond, the session-store daemon, and an axum/tower session layer.
//!
//! ```no_run
//! # async fn demo() -> Result<(), sessiond_client::Error> {
//! use sessiond_client::{NewSession, SessionClient};
//!
//! // Lazy: nothing is connected until the first call.
//! let client = SessionClient::connect("http://127.0.0.1:7420").await?;
//! let s = client.create(NewSession::default().attribute("cart:apple", "1")).await?;
//! let s = client.regenerate(&s.id, Some("alice")).await?; // login: new ID, old one dead
//! let s = client.update(&s.id, [("theme", "dark")], [] as [&str; 0], Some(s.version)).await?;
//! assert_eq!(s.user_id.as_deref(), Some("alice"));
//! # Ok(()) }
//! ```
//!
//! Calls from any number of tasks are pipelined over a few long-lived streams (see
//! [`Transport`]); each is still a plain `async fn` with its own deadline and typed result.
//! Retries are made only where they cannot duplicate anything: reads, and writes that carry
//! an idempotency key ([`NewSession::idempotency_key`], [`SessionClient::update_with_key`],
//! [`SessionClient::regenerate_with_key`]).
//!
//! # Layout
//!
//! - this file: the typed API ([`SessionClient`], [`Session`], [`Error`]);
//! - [`attributes`]: [`Attributes`], a session's data packed into one buffer;
//! - `reply`: the `Session` message as the client decodes it (attributes packed), and
//!   `wire`, the client's own copy of the generated messages that use it;
//! - `options`: [`ClientOptions`], [`Transport`], [`Bearer`] and a raw [`channel`];
//! - `call`: one call's deadline, transport and retry rules;
//! - `connection`: seeds, the leader, lazy connections and their backoff;
//! - `pipeline`: one Pipeline stream shared by many calls, matched by id;
//! - [`layer`]: [`SessiondLayer`] and the [`Session`](layer::Session) extractor for axum.

pub mod attributes;
mod call;
mod connection;
pub mod layer;
mod options;
mod pipeline;
mod reply;

use std::collections::HashMap;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tonic::{Code, Status};

use connection::{Router, Shared, Slot};
pub use connection::{
    DEFAULT_CONNECT_TIMEOUT, DEFAULT_RECONNECT_MAX, DEFAULT_RECONNECT_MIN, DEFAULT_TIMEOUT,
};
pub use options::{
    channel, Bearer, ClientOptions, Stub, Transport, DEFAULT_CONNECTIONS, DEFAULT_MAX_IN_FLIGHT,
};
use wire::pipeline_request::Op;
use wire::pipeline_response::Result as Outcome;

pub use attributes::Attributes;
pub use layer::SessiondLayer;

/// The generated protobuf types and client stub.
#[allow(missing_docs, clippy::all)]
pub mod pb {
    tonic::include_proto!("sessiond.v1");
}

/// The typed client's copy of the generated messages and stub: the same wire format as
/// [`pb`]'s, but a `Session` decodes its attributes into one packed buffer
/// ([`reply::Session`]) instead of a hash map.
#[allow(missing_docs, clippy::all)]
mod wire {
    include!(concat!(env!("OUT_DIR"), "/wire/sessiond.v1.rs"));
}

/// The typed client's stub: [`Stub`]'s calls over [`wire`]'s messages.
type WireStub = wire::session_store_client::SessionStoreClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>,
>;

/// What `DestroyAllSessions`'s `confirm` must say, word for word: the daemon refuses to end
/// every session of a tenant on anything less deliberate.
pub const DESTROY_ALL_CONFIRMATION: &str = "destroy all sessions";

/// What can go wrong, by what the caller does about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// No live session has this ID (never existed, expired or destroyed: indistinguishable).
    #[error("session not found")]
    NotFound,
    /// A compare-and-set update found another version; nothing was changed.
    #[error("version conflict: the session is at version {current_version}")]
    Conflict {
        /// The session's version now: re-read and retry.
        current_version: u64,
    },
    /// The request was malformed or over a size limit; the message names which.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A quota or limit was reached (sessions per user, creation rate, memory, load).
    #[error("resource exhausted: {0}")]
    ResourceExhausted(String),
    /// Missing or wrong tenant credentials.
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// sessiond could not be reached, or a durable write failed.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// Anything else.
    #[error("{code:?}: {message}")]
    Other {
        /// The gRPC code.
        code: Code,
        /// Its message.
        message: String,
    },
}

/// Response metadata naming the leader's client address (`host:port`): on every reply of a
/// node in a replicated group (for a Pipeline stream, in the stream's response headers).
pub const LEADER_HEADER: &str = "sessiond-leader";

/// Metadata of an `ABORTED` version mismatch: the session's version now, in ASCII decimal
/// (a pipelined reply carries it in its error's `current_version`). Without it (an older
/// server), the version is read from the status message.
pub const CURRENT_VERSION_HEADER: &str = "sessiond-current-version";

impl From<Status> for Error {
    fn from(s: Status) -> Self {
        let message = s.message().to_string();
        match s.code() {
            Code::NotFound => Error::NotFound,
            Code::Aborted => Error::Conflict {
                current_version: s
                    .metadata()
                    .get(CURRENT_VERSION_HEADER)
                    .and_then(|v| v.to_str().ok()?.trim().parse().ok())
                    .or_else(|| {
                        let (_, v) = message.rsplit_once("session is at ")?;
                        v.trim().parse().ok()
                    })
                    .unwrap_or(0),
            },
            Code::InvalidArgument => Error::InvalidArgument(message),
            Code::ResourceExhausted => Error::ResourceExhausted(message),
            Code::Unauthenticated => Error::Unauthenticated(message),
            Code::Unavailable => Error::Unavailable(message),
            code => Error::Other { code, message },
        }
    }
}

impl From<tonic::transport::Error> for Error {
    fn from(e: tonic::transport::Error) -> Self {
        Error::Unavailable(e.to_string())
    }
}

/// A session as sessiond returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// The opaque ID for the cookie.
    pub id: String,
    /// The bound user, `None` when anonymous.
    pub user_id: Option<String>,
    /// The data.
    pub attributes: Attributes,
    /// 1 at creation, +1 per change: the `expected_version` of a compare-and-set.
    pub version: u64,
    /// When it was created (or bound to its user).
    pub created_at: SystemTime,
    /// The last access that slid its idle deadline.
    pub last_access_at: SystemTime,
    /// When it dies unless used again.
    pub expires_at: SystemTime,
    /// The client's IP, as the app server reported it at creation.
    pub ip: String,
    /// The client's User-Agent, as reported at creation.
    pub user_agent: String,
}

impl Session {
    /// An attribute as text, if present and UTF-8.
    pub fn text(&self, key: &str) -> Option<&str> {
        self.attributes
            .get_ref(key)
            .and_then(|v| std::str::from_utf8(v).ok())
    }
}

fn time(t: Option<prost_types::Timestamp>) -> SystemTime {
    let t = t.unwrap_or_default();
    UNIX_EPOCH + Duration::new(t.seconds.max(0) as u64, t.nanos.max(0) as u32)
}

/// A session the raw stub ([`pb`]) returned.
impl From<pb::Session> for Session {
    fn from(s: pb::Session) -> Self {
        reply::Session::from(s).into()
    }
}

impl From<reply::Session> for Session {
    fn from(s: reply::Session) -> Self {
        let client = s.client.unwrap_or_default();
        Session {
            id: s.id,
            user_id: (!s.user_id.is_empty()).then_some(s.user_id),
            attributes: s.attributes.finish(),
            version: s.version,
            created_at: time(s.created_at),
            last_access_at: time(s.last_access_at),
            expires_at: time(s.expires_at),
            ip: client.ip,
            user_agent: client.user_agent,
        }
    }
}

/// What a new session starts with.
#[derive(Debug, Clone, Default)]
pub struct NewSession {
    /// Bind it to a user at once (`None`: anonymous).
    pub user_id: Option<String>,
    /// Initial attributes.
    pub attributes: HashMap<String, Bytes>,
    /// Idle timeout; the server's default when `None`.
    pub idle_timeout: Option<Duration>,
    /// Absolute timeout; the server's default when `None`.
    pub absolute_timeout: Option<Duration>,
    /// The client's IP, for "active devices".
    pub ip: String,
    /// The client's User-Agent, for "active devices".
    pub user_agent: String,
    /// Makes a retry safe: a Create sent again with the same key (within the server's
    /// `idempotency_window`, 10 min by default) returns the session the first one created,
    /// never a second one. Use a fresh unique key (a UUID) per session you mean to start.
    pub idempotency_key: Option<String>,
}

impl NewSession {
    /// Sets the idempotency key, so the Create can be sent again safely after a timeout or
    /// a lost connection.
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    /// Adds an initial attribute.
    pub fn attribute(mut self, key: impl Into<String>, value: impl Into<Bytes>) -> Self {
        self.attributes.insert(key.into(), value.into());
        self
    }
}

fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

/// A handle to sessiond. Cheap to clone: clones share the connections.
///
/// It connects lazily: making one never fails because sessiond is down, the first call
/// connects, and a connection that breaks is made again (after a bounded, jittered backoff
/// when attempts fail), so an app can start before sessiond and recovers when it returns.
/// Calls from any number of tasks share a few connections
/// ([`connections`](ClientOptions#structfield.connections)); see [`Transport`] for how
/// they travel.
///
/// Given several addresses, it tries them in turn until one answers. In a replicated group,
/// every reply names the leader (`sessiond-leader`); from then on the client connects to
/// the leader, and follows it when a new connection learns it has changed.
///
/// When a connection breaks, only the calls in flight on it fail, and only where a retry
/// could change something twice: reads (`get`, `peek`, `touch`, `list_user_sessions`,
/// `get_many`) and writes that carry an idempotency key are sent again on a fresh
/// connection within their deadline. So are all calls of a stream that the server ended
/// on shutdown, since it applied none of them. Other writes fail with
/// [`Error::Unavailable`] saying they may or may not have been applied.
#[derive(Clone)]
pub struct SessionClient {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Shared,
    slots: Box<[Slot]>,
    next: AtomicUsize,
}

impl SessionClient {
    /// A client of sessiond at `addr` (`host:port`, `http://host:port`, or several,
    /// comma-separated), pipelined, over plaintext. It connects on its first call: this
    /// fails only on a malformed address.
    pub async fn connect(addr: &str) -> Result<Self, Error> {
        Self::connect_with(addr, ClientOptions::default()).await
    }

    /// A client of sessiond at `addr` (one address or several, comma-separated) with the
    /// transport, TLS and token of `options`. It connects on its first call: this fails
    /// only on a malformed address or option, naming it.
    pub async fn connect_with(addr: &str, options: ClientOptions) -> Result<Self, Error> {
        Self::with_seeds(addr.split(','), options)
    }

    /// A client that starts from these seed addresses, tried in turn until one answers
    /// (then the leader, once a reply names it). Nothing is connected until the first call.
    ///
    /// ```
    /// use sessiond_client::{ClientOptions, SessionClient};
    ///
    /// // Never fails because the nodes are down: the first call connects.
    /// let client = SessionClient::with_seeds(
    ///     ["10.0.0.1:7420", "10.0.0.2:7420", "10.0.0.3:7420"],
    ///     ClientOptions::default(),
    /// )?;
    /// # Ok::<(), sessiond_client::Error>(())
    /// ```
    pub fn with_seeds<I, S>(seeds: I, options: ClientOptions) -> Result<Self, Error>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        options.validate()?;
        let tls = options.ca_pem.is_some();
        let seeds = seeds
            .into_iter()
            .map(|s| connection::url(s.as_ref(), tls))
            .collect::<Result<Vec<_>, _>>()?;
        if seeds.is_empty() {
            return Err(Error::InvalidArgument(
                "no sessiond address given: expected at least one host:port".into(),
            ));
        }
        for seed in &seeds {
            connection::endpoint(seed, &options)?;
        }
        let tls = tls || seeds.iter().any(|s| s.starts_with("https://"));
        let bearer = Bearer::new(options.token.as_deref())?;
        let slots = (0..options.connections())
            .map(|_| Slot::default())
            .collect();
        Ok(SessionClient {
            inner: Arc::new(Inner {
                shared: Shared {
                    bearer,
                    router: Router::new(seeds, tls, options.follow_leader.unwrap_or(true)),
                    options,
                    connects: Default::default(),
                },
                slots,
                next: AtomicUsize::new(0),
            }),
        })
    }

    /// The leader's address, once a reply has named one (in a replicated group).
    pub fn leader(&self) -> Option<String> {
        self.inner.shared.router.leader()
    }

    /// Starts a session under a fresh server-generated ID. Sent again after a broken
    /// connection only with a [`NewSession::idempotency_key`], which makes that safe.
    pub async fn create(&self, new: NewSession) -> Result<Session, Error> {
        let req = wire::CreateRequest {
            user_id: new.user_id.unwrap_or_default(),
            attributes: new.attributes,
            idle_timeout: new.idle_timeout.map(duration),
            absolute_timeout: new.absolute_timeout.map(duration),
            client: Some(wire::ClientInfo {
                ip: new.ip,
                user_agent: new.user_agent,
            }),
            idempotency_key: new.idempotency_key.unwrap_or_default(),
        };
        session(self.call(Op::Create(req)).await?)
    }

    /// Reads a session and slides its idle deadline.
    pub async fn get(&self, id: &str) -> Result<Session, Error> {
        self.read(id, false).await
    }

    /// Reads a session without sliding its deadline.
    pub async fn peek(&self, id: &str) -> Result<Session, Error> {
        self.read(id, true).await
    }

    async fn read(&self, id: &str, peek: bool) -> Result<Session, Error> {
        let req = wire::GetRequest {
            id: id.to_string(),
            peek,
        };
        session(self.call(Op::Get(req)).await?)
    }

    /// Reads many sessions in one unary call (Pipeline does not carry it): one result per
    /// ID, in the order asked. With `peek`, the idle deadlines do not slide.
    ///
    /// ```no_run
    /// # async fn demo(client: sessiond_client::SessionClient) -> Result<(), sessiond_client::Error> {
    /// for (id, result) in ["a", "b"].iter().zip(client.get_many(&["a", "b"], true).await?) {
    ///     match result {
    ///         Ok(session) => println!("{} is at version {}", session.id, session.version),
    ///         Err(e) => println!("no session: {e}"),
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn get_many(
        &self,
        ids: &[&str],
        peek: bool,
    ) -> Result<Vec<Result<Session, Error>>, Error> {
        let req = wire::GetManyRequest {
            ids: ids.iter().map(|s| s.to_string()).collect(),
            peek,
        };
        let results = self.get_many_call(req).await?;
        Ok(results
            .into_iter()
            .map(|r| match r.result {
                Some(wire::get_result::Result::Session(s)) => Ok(s.into()),
                Some(wire::get_result::Result::Error(e)) => Err(call::pb_error(e)),
                None => Err(Error::Other {
                    code: Code::Internal,
                    message: "a GetMany result without a session or an error".into(),
                }),
            })
            .collect())
    }

    /// Slides the idle deadline; returns the new one.
    pub async fn touch(&self, id: &str) -> Result<SystemTime, Error> {
        let req = wire::TouchRequest { id: id.to_string() };
        match self.call(Op::Touch(req)).await? {
            Outcome::Touch(t) => Ok(time(t.expires_at)),
            other => Err(call::unexpected(other)),
        }
    }

    /// Sets and removes attributes in one atomic step. With `expected_version`, only if the
    /// session is still at that version ([`Error::Conflict`] otherwise). Not sent again after
    /// a broken connection: see [`update_with_key`](Self::update_with_key).
    pub async fn update<K, V, R>(
        &self,
        id: &str,
        set: impl IntoIterator<Item = (K, V)>,
        remove: impl IntoIterator<Item = R>,
        expected_version: Option<u64>,
    ) -> Result<Session, Error>
    where
        K: Into<String>,
        V: Into<Bytes>,
        R: Into<String>,
    {
        self.update_with_key(id, set, remove, expected_version, "")
            .await
    }

    /// [`update`](Self::update) with an idempotency key (a fresh UUID per change): sent
    /// again after a broken connection or a timeout, it is applied once, and a
    /// compare-and-set that already succeeded returns that success. `""` is no key.
    pub async fn update_with_key<K, V, R>(
        &self,
        id: &str,
        set: impl IntoIterator<Item = (K, V)>,
        remove: impl IntoIterator<Item = R>,
        expected_version: Option<u64>,
        idempotency_key: &str,
    ) -> Result<Session, Error>
    where
        K: Into<String>,
        V: Into<Bytes>,
        R: Into<String>,
    {
        let req = wire::UpdateRequest {
            id: id.to_string(),
            set: set.into_iter().map(|(k, v)| (k.into(), v.into())).collect(),
            remove: remove.into_iter().map(Into::into).collect(),
            expected_version,
            idempotency_key: idempotency_key.to_string(),
        };
        session(self.call(Op::Update(req)).await?)
    }

    /// Moves the session to a fresh ID, keeping its data; with `user_id`, binds it (login).
    /// The old ID is dead when this returns. Not sent again after a broken connection: see
    /// [`regenerate_with_key`](Self::regenerate_with_key).
    pub async fn regenerate(&self, id: &str, user_id: Option<&str>) -> Result<Session, Error> {
        self.regenerate_with_key(id, user_id, "").await
    }

    /// [`regenerate`](Self::regenerate) with an idempotency key (a fresh UUID per login):
    /// sent again after a broken connection or a timeout, it returns the session the first
    /// one moved to, never a second move. `""` is no key.
    pub async fn regenerate_with_key(
        &self,
        id: &str,
        user_id: Option<&str>,
        idempotency_key: &str,
    ) -> Result<Session, Error> {
        let req = wire::RegenerateRequest {
            id: id.to_string(),
            user_id: user_id.map(str::to_string),
            drop_attributes: false,
            idempotency_key: idempotency_key.to_string(),
        };
        session(self.call(Op::Regenerate(req)).await?)
    }

    /// Ends one session; whether it existed.
    pub async fn destroy(&self, id: &str) -> Result<bool, Error> {
        let req = wire::DestroyRequest { id: id.to_string() };
        match self.call(Op::Destroy(req)).await? {
            Outcome::Destroy(d) => Ok(d.existed),
            other => Err(call::unexpected(other)),
        }
    }

    /// A user's live sessions ("active devices"), without their attributes.
    pub async fn list_user_sessions(&self, user_id: &str) -> Result<Vec<Session>, Error> {
        let req = wire::ListUserSessionsRequest {
            user_id: user_id.to_string(),
            include_attributes: false,
        };
        match self.call(Op::ListUserSessions(req)).await? {
            Outcome::ListUserSessions(r) => Ok(r.sessions.into_iter().map(Session::from).collect()),
            other => Err(call::unexpected(other)),
        }
    }

    /// Ends every session of a user but `except` ("log out everywhere (else)"); how many.
    pub async fn destroy_user_sessions(
        &self,
        user_id: &str,
        except: Option<&str>,
    ) -> Result<u32, Error> {
        let req = wire::DestroyUserSessionsRequest {
            user_id: user_id.to_string(),
            except_id: except.unwrap_or_default().to_string(),
        };
        match self.call(Op::DestroyUserSessions(req)).await? {
            Outcome::DestroyUserSessions(r) => Ok(r.destroyed),
            other => Err(call::unexpected(other)),
        }
    }
}

/// The session a Create, Get, Update or Regenerate answered.
fn session(outcome: Outcome) -> Result<Session, Error> {
    match outcome {
        Outcome::Session(s) => Ok(s.into()),
        other => Err(call::unexpected(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_typed_errors() {
        let conflict = Status::aborted("version mismatch: expected 3, session is at 5");
        assert_eq!(
            Error::from(conflict),
            Error::Conflict { current_version: 5 }
        );
        // The structured version wins over the text, which may not carry one.
        let mut metadata = tonic::metadata::MetadataMap::new();
        metadata.insert(CURRENT_VERSION_HEADER, "7".parse().unwrap());
        let structured = Status::with_metadata(Code::Aborted, "version mismatch", metadata);
        assert_eq!(
            Error::from(structured),
            Error::Conflict { current_version: 7 }
        );
        // Metadata that is no number falls back to the text.
        let mut metadata = tonic::metadata::MetadataMap::new();
        metadata.insert(CURRENT_VERSION_HEADER, "x".parse().unwrap());
        let text = Status::with_metadata(Code::Aborted, "session is at 4", metadata);
        assert_eq!(Error::from(text), Error::Conflict { current_version: 4 });
        assert_eq!(
            Error::from(Status::not_found("session not found")),
            Error::NotFound
        );
        assert!(matches!(
            Error::from(Status::resource_exhausted("create_rate reached")),
            Error::ResourceExhausted(m) if m.contains("create_rate")
        ));
        assert!(matches!(
            Error::from(Status::unauthenticated("no")),
            Error::Unauthenticated(_)
        ));
    }
}
