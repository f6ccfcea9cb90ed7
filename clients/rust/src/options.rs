//! How a client connects and calls: the transport, TLS, token, timeouts and limits
//! ([`ClientOptions`]), the token's interceptor ([`Bearer`]), and a raw [`channel`] for the
//! generated [`Stub`].

use std::time::Duration;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::Channel;
use tonic::Status;

use crate::connection::{self, DEFAULT_TIMEOUT};
#[cfg(doc)]
use crate::SessionClient;
use crate::{pb, Error};

/// How calls travel to sessiond.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Transport {
    /// Every call goes over its connection's one long-lived `Pipeline` stream, tagged with
    /// an id and matched to its response: concurrent calls from any number of tasks share
    /// a few streams, as redis-rs's multiplexed connection does. In the README's
    /// benchmark, Pipeline streams carry over three times the operations per second of
    /// unary calls on the same server.
    #[default]
    Pipelined,
    /// One unary RPC per call (HTTP/2 multiplexes them on the connection).
    Unary,
}

/// Transport, TLS, credentials and timeouts for [`SessionClient::connect_with`] and
/// [`SessionClient::with_seeds`]. Every `None` is the documented default.
///
/// ```
/// use std::time::Duration;
/// use sessiond_client::{ClientOptions, Transport};
///
/// let options = ClientOptions {
///     token: Some("shop-token".into()),
///     connections: Some(4),
///     timeout: Some(Duration::from_secs(2)),
///     ..ClientOptions::default()
/// };
/// assert_eq!(options.transport, Transport::Pipelined);
/// ```
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
    /// Per-call deadline, covering any connecting, waiting for a place in a stream and
    /// retrying (default 5 s). A call past it fails with [`Error::Other`]
    /// `{ code: DeadlineExceeded, .. }`, and its late reply is dropped.
    pub timeout: Option<Duration>,
    /// How long connecting to one address, and opening its stream, may take (default 1 s,
    /// or `timeout` if shorter; for [`channel`], `timeout`).
    pub connect_timeout: Option<Duration>,
    /// Pipelined (the default) or unary calls.
    pub transport: Transport,
    /// How many connections (each with its one stream, when pipelined) the client spreads
    /// its calls over, round-robin (default 2). The server applies one stream's
    /// operations in order, so more connections use more of its cores.
    pub connections: Option<usize>,
    /// The most calls in flight on one stream (default 256); past it, a call waits for a
    /// place within its deadline.
    pub max_in_flight: Option<usize>,
    /// The first wait before connecting again after a failed attempt (default 50 ms); it
    /// doubles with each failure in a row, up to `reconnect_max`, with jitter.
    pub reconnect_min: Option<Duration>,
    /// The longest wait between connection attempts (default 2 s). While a connection
    /// waits, its calls fail at once with [`Error::Unavailable`].
    pub reconnect_max: Option<Duration>,
    /// Whether calls move to the leader that a reply names (default `true`). `false` keeps
    /// every call on the given addresses, which forward to the leader when they are
    /// followers: for a client that must talk to one node (measuring forwarding, or a
    /// node-local sidecar). [`SessionClient::leader`] then stays `None`.
    pub follow_leader: Option<bool>,
}

impl ClientOptions {
    pub(crate) fn connections(&self) -> usize {
        self.connections.unwrap_or(DEFAULT_CONNECTIONS)
    }

    pub(crate) fn max_in_flight(&self) -> usize {
        self.max_in_flight.unwrap_or(DEFAULT_MAX_IN_FLIGHT)
    }

    /// Names the first setting that cannot work.
    pub(crate) fn validate(&self) -> Result<(), Error> {
        let invalid = |m: &str| Err(Error::InvalidArgument(m.into()));
        if self.connections() == 0 {
            return invalid("ClientOptions.connections must be at least 1");
        }
        if self.max_in_flight() == 0 {
            return invalid("ClientOptions.max_in_flight must be at least 1");
        }
        if self.max_in_flight() > tokio::sync::Semaphore::MAX_PERMITS {
            return invalid("ClientOptions.max_in_flight is too large");
        }
        if self.timeout == Some(Duration::ZERO) {
            return invalid("ClientOptions.timeout must be more than zero");
        }
        if self.connect_timeout == Some(Duration::ZERO) {
            return invalid("ClientOptions.connect_timeout must be more than zero");
        }
        Ok(())
    }
}

/// Connections per client, by default.
pub const DEFAULT_CONNECTIONS: usize = 2;

/// Calls in flight per stream, by default: the server's own window per stream.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 256;

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
/// timeouts of `options`, now; the token is not part of it (see [`Bearer`]). For the raw
/// [`Stub`]: [`SessionClient`] makes its own connections.
///
/// TLS is on with an `https://` address or a `ca_pem`. Besides `ca_pem`, it trusts the roots
/// of whichever of tonic's `tls-native-roots` and `tls-webpki-roots` features are enabled.
pub async fn channel(addr: &str, options: &ClientOptions) -> Result<Channel, Error> {
    let url = connection::url(addr, options.ca_pem.is_some())?;
    let timeout = options.timeout.unwrap_or(DEFAULT_TIMEOUT);
    Ok(connection::endpoint(&url, options)?
        .connect_timeout(options.connect_timeout.unwrap_or(timeout))
        .timeout(timeout)
        .connect()
        .await?)
}
