//! Sessions for axum (any tower service over `http`), kept in sessiond.
//!
//! [`SessiondLayer`] reads the session cookie of each request and puts a [`Session`] handle in
//! its extensions; handlers take it as an extractor. The session is loaded lazily, on the
//! first read, with a sliding `Get`: a request that only reads needs no write-back. Changed
//! keys are collected during the request and written back after the handler as one partial
//! `Update` (never the whole session). A write-back that fails turns the response into a 503,
//! so no handler's "done" is a lie; writes whose session has ended meanwhile start a new
//! session that carries them, as a request without a session does.
//!
//! Values are typed: [`Session::get`] and [`Session::insert`] take anything serde handles,
//! one attribute per key, through a [`Codec`] ([`Json`] unless [`Builder::codec`] says
//! otherwise); [`Session::get_raw`] and [`Session::insert_raw`] keep the bytes as they are.
//!
//! The cookie (name, `SameSite`, `Domain`, `Path`, `Secure`, persistence: see [`Builder`]) is
//! touched only when this response knows better than the browser:
//! - a new ID (a session created for the request's writes, or regenerated) is sent;
//! - a session the cookie named, live when this request used it, that the handler ended
//!   (`destroy`, `destroy_all_for_user`) is cleared;
//! - a cookie that names a dead session is left alone. Such a request is often a late one
//!   from before a login in another tab, and the browser may already hold that login's new
//!   cookie: clearing or replacing "the" cookie would delete it and log the user out;
//! - a [persistent](Builder::persistent) cookie is also sent again with a fresh `Max-Age`
//!   whenever the request used its live session.
//!
//! The ergonomics follow tower-sessions. Its `SessionStore` trait cannot be implemented
//! faithfully on sessiond: its IDs are client-generated `i128`s, and sessiond never accepts an
//! ID it did not generate (that is what makes session fixation through the store impossible).
//!
//! ```no_run
//! use axum::{http::StatusCode, routing::post, Router};
//! use sessiond_client::layer::{Session, SessionError};
//! use sessiond_client::{SessionClient, SessiondLayer};
//!
//! async fn login(session: Session) -> Result<&'static str, SessionError> {
//!     // A new ID bound to the user, the old one dead, the cookie replaced, the cart kept.
//!     session.regenerate(Some("alice")).await?;
//!     session.insert("theme", "dark").await?;
//!     Ok("welcome")
//! }
//!
//! # async fn app() -> Result<(), sessiond_client::Error> {
//! let client = SessionClient::connect("http://127.0.0.1:7420").await?;
//! let app: Router = Router::new()
//!     .route("/login", post(login))
//!     .layer(SessiondLayer::new(client));
//! # Ok(()) }
//! ```
//!
//! `examples/login.rs` shows a whole login flow, with an extractor that answers 401 to
//! anonymous requests.

mod codec;
mod config;
mod error;
mod session;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::ConnectInfo;
use cookie::Cookie;
use http::{header, HeaderValue, Request, Response, StatusCode};
use tower::{Layer, Service};

pub use codec::{Codec, CodecError, Json};
pub use config::{Builder, ConfigError};
/// The cookie's `SameSite` attribute, for [`Builder::same_site`].
pub use cookie::SameSite;
pub use error::SessionError;
pub use session::Session;

use crate::SessionClient;

/// The default cookie name: `__Host-` pins the cookie to this host, `Path=/` and `Secure`.
///
/// ```
/// use sessiond_client::layer::DEFAULT_COOKIE;
/// // What a test client sends to name a session:
/// let header = format!("{DEFAULT_COOKIE}=ID");
/// assert!(header.starts_with("__Host-sid="));
/// ```
pub const DEFAULT_COOKIE: &str = "__Host-sid";

/// Sessions in sessiond for every request under it: see the module docs.
///
/// ```no_run
/// use axum::{routing::get, Router};
/// use sessiond_client::{SessionClient, SessiondLayer};
///
/// # async fn app() -> Result<(), Box<dyn std::error::Error>> {
/// let client = SessionClient::connect("http://127.0.0.1:7420").await?;
/// let app: Router = Router::new()
///     .route("/", get(|| async { "hello" }))
///     .layer(SessiondLayer::builder(client).persistent(true).build()?);
/// # Ok(()) }
/// ```
pub struct SessiondLayer<C = Json> {
    shared: Arc<Shared<C>>,
}

impl<C> std::fmt::Debug for SessiondLayer<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.shared.fmt_fields(&mut f.debug_struct("SessiondLayer"))
    }
}

impl<C> Clone for SessiondLayer<C> {
    fn clone(&self) -> Self {
        SessiondLayer {
            shared: self.shared.clone(),
        }
    }
}

/// What every request's [`Session`] shares.
struct Shared<C> {
    client: SessionClient,
    codec: C,
    cookie: config::CookieConfig,
    /// The timeouts new sessions ask for (the server's defaults when `None`).
    idle_timeout: Option<Duration>,
    absolute_timeout: Option<Duration>,
}

impl<C> Shared<C> {
    /// The settings, for `Debug` (the client and codec print nothing useful).
    fn fmt_fields(&self, d: &mut std::fmt::DebugStruct<'_, '_>) -> std::fmt::Result {
        d.field("cookie", &self.cookie)
            .field("idle_timeout", &self.idle_timeout)
            .field("absolute_timeout", &self.absolute_timeout)
            .finish_non_exhaustive()
    }
}

impl SessiondLayer<Json> {
    /// Sessions in sessiond through `client`, with the defaults: the cookie
    /// `__Host-sid` (`HttpOnly; Secure; SameSite=Lax; Path=/`, ending with the browser
    /// session), JSON values, the server's timeouts.
    ///
    /// ```no_run
    /// # async fn f(client: sessiond_client::SessionClient) {
    /// let layer = sessiond_client::SessiondLayer::new(client);
    /// # }
    /// ```
    pub fn new(client: SessionClient) -> Self {
        Self::builder(client)
            .build()
            .expect("the defaults are a valid configuration")
    }

    /// Settings other than the defaults: the cookie's attributes, persistence, per-session
    /// timeouts, the codec. See [`Builder`].
    ///
    /// ```no_run
    /// # async fn f(client: sessiond_client::SessionClient) -> Result<(), sessiond_client::layer::ConfigError> {
    /// use std::time::Duration;
    /// let layer = sessiond_client::SessiondLayer::builder(client)
    ///     .idle_timeout(Duration::from_secs(600))
    ///     .build()?;
    /// # Ok(()) }
    /// ```
    pub fn builder(client: SessionClient) -> Builder<Json> {
        Builder::new(client)
    }
}

impl<S, C: Codec> Layer<S> for SessiondLayer<C> {
    type Service = SessiondService<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        SessiondService {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// The service [`SessiondLayer`] wraps around the app; made by the layer, never by hand.
///
/// ```no_run
/// use axum::Router;
/// use sessiond_client::{layer::SessiondService, SessionClient, SessiondLayer};
/// use tower::Layer;
///
/// # async fn f(client: SessionClient) {
/// let service: SessiondService<Router> = SessiondLayer::new(client).layer(Router::new());
/// # }
/// ```
pub struct SessiondService<S, C = Json> {
    inner: S,
    shared: Arc<Shared<C>>,
}

impl<S, C> std::fmt::Debug for SessiondService<S, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.shared
            .fmt_fields(&mut f.debug_struct("SessiondService"))
    }
}

impl<S: Clone, C> Clone for SessiondService<S, C> {
    fn clone(&self) -> Self {
        SessiondService {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S, C, B, ResBody> Service<Request<B>> for SessiondService<S, C>
where
    S: Service<Request<B>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    C: Codec,
    B: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let shared = self.shared.clone();
        let cookie_id = req
            .headers()
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(Cookie::split_parse)
            .filter_map(Result::ok)
            .find(|c| c.name() == shared.cookie.name)
            .map(|c| c.value().to_string())
            .filter(|v| !v.is_empty());
        let ip = req
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip().to_string())
            .unwrap_or_default();
        let user_agent = req
            .headers()
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let session = Session::new(shared, cookie_id, ip, user_agent);
        req.extensions_mut().insert(session.clone());
        // The usual tower dance: the clone that was polled ready is the one that is called.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let mut res = inner.call(req).await?;
            match session.finish().await {
                Ok(Some(cookie)) => {
                    if let Ok(v) = HeaderValue::from_str(&cookie) {
                        res.headers_mut().append(header::SET_COOKIE, v);
                    }
                }
                Ok(None) => {}
                Err(_) => {
                    // The handler's changes did not reach the store: say so.
                    let mut failed = Response::new(ResBody::default());
                    *failed.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                    return Ok(failed);
                }
            }
            Ok(res)
        })
    }
}
