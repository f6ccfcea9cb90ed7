//! A typed client for [sessiond](../../README.md), and an axum/tower session layer over it.
//!
//! ```no_run
//! # async fn demo() -> Result<(), sessiond_client::Error> {
//! use sessiond_client::{NewSession, SessionClient};
//!
//! let client = SessionClient::connect("http://127.0.0.1:7420").await?;
//! let s = client.create(NewSession::default().attribute("cart:apple", "1")).await?;
//! let s = client.regenerate(&s.id, Some("alice")).await?; // login: new ID, old one dead
//! let s = client.update(&s.id, [("theme", "dark")], [] as [&str; 0], Some(s.version)).await?;
//! assert_eq!(s.user_id.as_deref(), Some("alice"));
//! # Ok(()) }
//! ```
//!
//! Retries are made only where they cannot duplicate anything: reads (`get`, `touch`,
//! `list_user_sessions`) are retried once on `UNAVAILABLE`; a `create` or `regenerate` is
//! never retried, since a lost reply could otherwise leave two sessions.
//!
//! [`layer`] holds [`SessiondLayer`] and the [`Session`](layer::Session) extractor for axum.

pub mod layer;

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Status};

pub use layer::SessiondLayer;

/// The generated protobuf types and client stub.
#[allow(missing_docs, clippy::all)]
pub mod pb {
    tonic::include_proto!("sessiond.v1");
}

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

impl From<Status> for Error {
    fn from(s: Status) -> Self {
        let message = s.message().to_string();
        match s.code() {
            Code::NotFound => Error::NotFound,
            Code::Aborted => Error::Conflict {
                current_version: message
                    .rsplit_once("session is at ")
                    .and_then(|(_, v)| v.trim().parse().ok())
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
    pub attributes: HashMap<String, Bytes>,
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
            .get(key)
            .and_then(|v| std::str::from_utf8(v).ok())
    }
}

fn time(t: Option<prost_types::Timestamp>) -> SystemTime {
    let t = t.unwrap_or_default();
    UNIX_EPOCH + Duration::new(t.seconds.max(0) as u64, t.nanos.max(0) as u32)
}

impl From<pb::Session> for Session {
    fn from(s: pb::Session) -> Self {
        let client = s.client.unwrap_or_default();
        Session {
            id: s.id,
            user_id: (!s.user_id.is_empty()).then_some(s.user_id),
            attributes: s.attributes,
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

/// TLS and credentials for [`SessionClient::connect_with`].
#[derive(Debug, Clone, Default)]
pub struct ClientOptions {
    /// A tenant's bearer token, sent as `authorization: Bearer ...`.
    pub token: Option<String>,
    /// PEM CA to verify sessiond's certificate with; set, the connection uses TLS.
    pub ca_pem: Option<Vec<u8>>,
    /// PEM certificate and key for mutual TLS.
    pub identity_pem: Option<(Vec<u8>, Vec<u8>)>,
    /// The name in sessiond's certificate, if not the address's host.
    pub domain: Option<String>,
    /// Per-call timeout (default 5 s).
    pub timeout: Option<Duration>,
}

/// Adds the bearer token to every call.
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Bearer {
    /// Sends `authorization: Bearer <token>` with every call, or nothing when `None`.
    pub fn new(token: Option<&str>) -> Result<Bearer, Error> {
        let value = match token {
            None => None,
            Some(t) => Some(
                format!("Bearer {t}")
                    .parse()
                    .map_err(|_| Error::InvalidArgument("token must be printable ASCII".into()))?,
            ),
        };
        Ok(Bearer(value))
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(token) = &self.0 {
            req.metadata_mut().insert("authorization", token.clone());
        }
        Ok(req)
    }
}

/// The generated stub with a [`Bearer`] on every call: for the calls and fields the typed
/// [`SessionClient`] leaves out (`DestroyAllSessions`, `drop_attributes`, ...).
pub type Stub = pb::session_store_client::SessionStoreClient<InterceptedService<Channel, Bearer>>;

/// Opens a connection to sessiond (`host:port`, `http://` or `https://`) with the TLS and
/// timeouts of `options`; the token is not part of it (see [`Bearer`]).
///
/// TLS is on with an `https://` address or a `ca_pem`. Besides `ca_pem`, it trusts the roots
/// of whichever of tonic's `tls-native-roots` and `tls-webpki-roots` features are enabled.
pub async fn channel(addr: &str, options: &ClientOptions) -> Result<Channel, Error> {
    let tls = options.ca_pem.is_some() || addr.starts_with("https://");
    let url = match addr.contains("://") {
        true => addr.to_string(),
        false if tls => format!("https://{addr}"),
        false => format!("http://{addr}"),
    };
    let timeout = options.timeout.unwrap_or(Duration::from_secs(5));
    let mut endpoint = Endpoint::from_shared(url)
        .map_err(|e| Error::InvalidArgument(e.to_string()))?
        .connect_timeout(timeout)
        .timeout(timeout)
        .tcp_nodelay(true);
    if tls {
        let mut config = ClientTlsConfig::new().with_enabled_roots();
        if let Some(ca) = &options.ca_pem {
            config = config.ca_certificate(Certificate::from_pem(ca));
        }
        if let Some((cert, key)) = &options.identity_pem {
            config = config.identity(Identity::from_pem(cert, key));
        }
        if let Some(domain) = &options.domain {
            config = config.domain_name(domain);
        }
        endpoint = endpoint.tls_config(config)?;
    }
    Ok(endpoint.connect().await?)
}

/// A handle to sessiond. Cheap to clone: clones share one HTTP/2 connection.
#[derive(Clone)]
pub struct SessionClient {
    stub: Stub,
}

impl SessionClient {
    /// Connects over plaintext (`http://host:port` or `host:port`).
    pub async fn connect(addr: &str) -> Result<Self, Error> {
        Self::connect_with(addr, ClientOptions::default()).await
    }

    /// Connects with TLS and a tenant token as `options` say.
    pub async fn connect_with(addr: &str, options: ClientOptions) -> Result<Self, Error> {
        let channel = channel(addr, &options).await?;
        let bearer = Bearer::new(options.token.as_deref())?;
        Ok(SessionClient {
            stub: pb::session_store_client::SessionStoreClient::with_interceptor(channel, bearer),
        })
    }

    /// Starts a session under a fresh server-generated ID. Never retried here; with an
    /// [`NewSession::idempotency_key`], the caller may send it again safely.
    pub async fn create(&self, new: NewSession) -> Result<Session, Error> {
        let req = pb::CreateRequest {
            user_id: new.user_id.unwrap_or_default(),
            attributes: new.attributes,
            idle_timeout: new.idle_timeout.map(duration),
            absolute_timeout: new.absolute_timeout.map(duration),
            client: Some(pb::ClientInfo {
                ip: new.ip,
                user_agent: new.user_agent,
            }),
            idempotency_key: new.idempotency_key.unwrap_or_default(),
        };
        Ok(self.stub.clone().create(req).await?.into_inner().into())
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
        let req = pb::GetRequest {
            id: id.to_string(),
            peek,
        };
        retry_read(|| {
            let (mut stub, req) = (self.stub.clone(), req.clone());
            async move { Ok(stub.get(req).await?.into_inner().into()) }
        })
        .await
    }

    /// Slides the idle deadline; returns the new one.
    pub async fn touch(&self, id: &str) -> Result<SystemTime, Error> {
        let req = pb::TouchRequest { id: id.to_string() };
        retry_read(|| {
            let (mut stub, req) = (self.stub.clone(), req.clone());
            async move { Ok(time(stub.touch(req).await?.into_inner().expires_at)) }
        })
        .await
    }

    /// Sets and removes attributes in one atomic step. With `expected_version`, only if the
    /// session is still at that version ([`Error::Conflict`] otherwise).
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
        let req = pb::UpdateRequest {
            id: id.to_string(),
            set: set.into_iter().map(|(k, v)| (k.into(), v.into())).collect(),
            remove: remove.into_iter().map(Into::into).collect(),
            expected_version,
            idempotency_key: String::new(),
        };
        Ok(self.stub.clone().update(req).await?.into_inner().into())
    }

    /// Moves the session to a fresh ID, keeping its data; with `user_id`, binds it (login).
    /// The old ID is dead when this returns. Never retried.
    pub async fn regenerate(&self, id: &str, user_id: Option<&str>) -> Result<Session, Error> {
        let req = pb::RegenerateRequest {
            id: id.to_string(),
            user_id: user_id.map(str::to_string),
            drop_attributes: false,
            idempotency_key: String::new(),
        };
        Ok(self.stub.clone().regenerate(req).await?.into_inner().into())
    }

    /// Ends one session; whether it existed.
    pub async fn destroy(&self, id: &str) -> Result<bool, Error> {
        let req = pb::DestroyRequest { id: id.to_string() };
        Ok(self.stub.clone().destroy(req).await?.into_inner().existed)
    }

    /// A user's live sessions ("active devices"), without their attributes.
    pub async fn list_user_sessions(&self, user_id: &str) -> Result<Vec<Session>, Error> {
        let req = pb::ListUserSessionsRequest {
            user_id: user_id.to_string(),
            include_attributes: false,
        };
        retry_read(|| {
            let (mut stub, req) = (self.stub.clone(), req.clone());
            async move {
                let r = stub.list_user_sessions(req).await?.into_inner();
                Ok(r.sessions.into_iter().map(Session::from).collect())
            }
        })
        .await
    }

    /// Ends every session of a user but `except` ("log out everywhere (else)"); how many.
    pub async fn destroy_user_sessions(
        &self,
        user_id: &str,
        except: Option<&str>,
    ) -> Result<u32, Error> {
        let req = pb::DestroyUserSessionsRequest {
            user_id: user_id.to_string(),
            except_id: except.unwrap_or_default().to_string(),
        };
        Ok(self
            .stub
            .clone()
            .destroy_user_sessions(req)
            .await?
            .into_inner()
            .destroyed)
    }
}

/// Runs a read, once more if sessiond was unavailable: safe, since reads change nothing
/// but the idle deadline.
async fn retry_read<T, F, Fut>(mut call: F) -> Result<T, Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Error>>,
{
    match call().await {
        Err(Error::Unavailable(_)) => call().await,
        other => other,
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
