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
//! The cookie is touched only when this response knows better than the browser:
//! - a new ID (a session created for the request's writes, or regenerated) is sent;
//! - a session the cookie named, live when this request used it, that the handler ended
//!   (`destroy`, `destroy_all_for_user`) is cleared;
//! - a cookie that names a dead session is left alone. Such a request is often a late one
//!   from before a login in another tab, and the browser may already hold that login's new
//!   cookie: clearing or replacing "the" cookie would delete it and log the user out.
//!
//! The ergonomics follow tower-sessions. Its `SessionStore` trait cannot be implemented
//! faithfully on sessiond: its IDs are client-generated `i128`s, and sessiond never accepts an
//! ID it did not generate (that is what makes session fixation through the store impossible).
//!
//! ```no_run
//! use axum::{http::StatusCode, routing::post, Router};
//! use sessiond_client::{layer::Session, SessionClient, SessiondLayer};
//!
//! async fn login(session: Session) -> Result<&'static str, StatusCode> {
//!     // A new ID bound to the user, the old one dead, the cookie replaced, the cart kept.
//!     session
//!         .regenerate(Some("alice"))
//!         .await
//!         .map_err(|_| StatusCode::SERVICE_UNAVAILABLE)?;
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

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::{ConnectInfo, FromRequestParts};
use bytes::Bytes;
use cookie::{Cookie, SameSite};
use http::{header, HeaderValue, Request, Response, StatusCode};
use tokio::sync::Mutex;
use tower::{Layer, Service};

use crate::{Error, NewSession, SessionClient};

/// The default cookie: `__Host-` pins it to this host, path `/` and `Secure`.
pub const DEFAULT_COOKIE: &str = "__Host-sid";

/// Compare-and-set attempts [`Session::modify`] makes before giving up with the conflict.
const MAX_CAS_ATTEMPTS: usize = 32;

/// The layer. See the module docs.
#[derive(Clone)]
pub struct SessiondLayer {
    shared: Arc<Shared>,
}

#[derive(Clone)]
struct Shared {
    client: SessionClient,
    cookie_name: String,
    secure: bool,
    idle_timeout: Option<Duration>,
}

impl SessiondLayer {
    /// Sessions in sessiond through `client`, in the cookie [`DEFAULT_COOKIE`].
    pub fn new(client: SessionClient) -> Self {
        SessiondLayer {
            shared: Arc::new(Shared {
                client,
                cookie_name: DEFAULT_COOKIE.into(),
                secure: true,
                idle_timeout: None,
            }),
        }
    }

    fn with(self, f: impl FnOnce(&mut Shared)) -> Self {
        let mut shared = Arc::unwrap_or_clone(self.shared);
        f(&mut shared);
        SessiondLayer {
            shared: Arc::new(shared),
        }
    }

    /// Another cookie name (a `__Host-` name needs `secure`).
    pub fn with_cookie_name(self, name: impl Into<String>) -> Self {
        let name = name.into();
        self.with(|s| s.cookie_name = name)
    }

    /// Whether the cookie is `Secure` (default true; turn off only for plain-HTTP development,
    /// with a cookie name without the `__Host-` prefix).
    pub fn with_secure(self, secure: bool) -> Self {
        self.with(|s| s.secure = secure)
    }

    /// The idle timeout new sessions ask for (the server's default otherwise).
    pub fn with_idle_timeout(self, idle: Duration) -> Self {
        self.with(|s| s.idle_timeout = Some(idle))
    }
}

impl<S> Layer<S> for SessiondLayer {
    type Service = SessiondService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        SessiondService {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// The service [`SessiondLayer`] wraps.
#[derive(Clone)]
pub struct SessiondService<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S, B, ResBody> Service<Request<B>> for SessiondService<S>
where
    S: Service<Request<B>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
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
            .find(|c| c.name() == shared.cookie_name)
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
        let session = Session {
            shared: shared.clone(),
            state: Arc::new(Mutex::new(State {
                cookie_id,
                ip,
                user_agent,
                ..State::default()
            })),
        };
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

#[derive(Default)]
struct State {
    /// The ID the request's cookie carried.
    cookie_id: Option<String>,
    ip: String,
    user_agent: String,
    /// Whether the cookie's session has been looked up.
    loaded: bool,
    /// The live session, once loaded, created or regenerated.
    current: Option<crate::Session>,
    /// `current` is the session the cookie named, or a regeneration of it: the one the
    /// browser's cookie stands for.
    from_cookie: bool,
    /// The cookie named a session that no longer exists.
    gone: bool,
    /// Writes not yet sent.
    set: HashMap<String, Bytes>,
    remove: HashSet<String>,
    /// The session has a new ID the browser must learn.
    new_id: bool,
    /// The handler ended the session the cookie stands for: clear the cookie.
    clear_cookie: bool,
}

impl State {
    /// The handler ended the session: nothing is live, pending writes go with it, and a
    /// write after this starts a new session.
    fn end(&mut self) {
        self.loaded = true;
        self.current = None;
        self.from_cookie = false;
        self.new_id = false;
        self.set.clear();
        self.remove.clear();
    }
}

/// One request's session. Take it as an extractor in handlers under [`SessiondLayer`].
#[derive(Clone)]
pub struct Session {
    shared: Arc<Shared>,
    state: Arc<Mutex<State>>,
}

impl<S: Send + Sync> FromRequestParts<S> for Session {
    type Rejection = (StatusCode, &'static str);

    async fn from_request_parts(
        parts: &mut http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        parts.extensions.get::<Session>().cloned().ok_or((
            StatusCode::INTERNAL_SERVER_ERROR,
            "SessiondLayer is not installed on this route",
        ))
    }
}

impl Session {
    /// The client the layer uses, for calls beyond this session (listing a user's devices).
    pub fn client(&self) -> &SessionClient {
        &self.shared.client
    }

    /// Loads the cookie's session once (a sliding `Get`).
    async fn load(&self, st: &mut State) -> Result<(), Error> {
        if st.loaded {
            return Ok(());
        }
        st.loaded = true;
        if let Some(id) = st.cookie_id.clone() {
            match self.client().get(&id).await {
                Ok(s) => {
                    st.current = Some(s);
                    st.from_cookie = true;
                }
                Err(Error::NotFound) => st.gone = true,
                Err(e) => {
                    st.loaded = false;
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Whether the request's cookie named a session that has expired or been ended: the
    /// answer to give is 401. The layer leaves the cookie alone (see the module docs); a
    /// handler that writes anyway gets a new session and its cookie.
    pub async fn is_gone(&self) -> Result<bool, Error> {
        let mut st = self.state.lock().await;
        self.load(&mut st).await?;
        Ok(st.gone && st.current.is_none())
    }

    /// The session's ID, if it has one.
    pub async fn id(&self) -> Result<Option<String>, Error> {
        let mut st = self.state.lock().await;
        self.load(&mut st).await?;
        Ok(st.current.as_ref().map(|s| s.id.clone()))
    }

    /// The logged-in user, if any.
    pub async fn user(&self) -> Result<Option<String>, Error> {
        let mut st = self.state.lock().await;
        self.load(&mut st).await?;
        Ok(st.current.as_ref().and_then(|s| s.user_id.clone()))
    }

    /// Every attribute, this request's unsent writes included.
    pub async fn attributes(&self) -> Result<HashMap<String, Bytes>, Error> {
        let mut st = self.state.lock().await;
        self.load(&mut st).await?;
        let mut all = st
            .current
            .as_ref()
            .map(|s| s.attributes.clone())
            .unwrap_or_default();
        all.retain(|k, _| !st.remove.contains(k));
        all.extend(st.set.iter().map(|(k, v)| (k.clone(), v.clone())));
        Ok(all)
    }

    /// One attribute.
    pub async fn get(&self, key: &str) -> Result<Option<Bytes>, Error> {
        Ok(self.attributes().await?.remove(key))
    }

    /// Sets an attribute; written back after the handler, with the request's other changes.
    pub async fn insert(&self, key: impl Into<String>, value: impl Into<Bytes>) {
        let mut st = self.state.lock().await;
        let key = key.into();
        st.remove.remove(&key);
        st.set.insert(key, value.into());
    }

    /// Removes an attribute; written back after the handler.
    pub async fn remove(&self, key: &str) {
        let mut st = self.state.lock().await;
        st.set.remove(key);
        st.remove.insert(key.to_string());
    }

    /// Changes attributes now, atomically against concurrent requests: `f` sees the current
    /// attributes and returns what to set and remove; it is re-run on a fresh read whenever
    /// another request changed the session in between (compare-and-set on its version).
    /// Creates the session first if there is none.
    pub async fn modify<F>(&self, f: F) -> Result<crate::Session, Error>
    where
        F: Fn(&HashMap<String, Bytes>) -> (Vec<(String, Bytes)>, Vec<String>),
    {
        let mut st = self.state.lock().await;
        self.load(&mut st).await?;
        let id = match &st.current {
            Some(s) => s.id.clone(),
            None => self.create(&mut st, None).await?.id.clone(),
        };
        let mut conflict = Error::Conflict { current_version: 0 };
        for _ in 0..MAX_CAS_ATTEMPTS {
            let attempt = match self.client().peek(&id).await {
                Ok(now) => {
                    let (set, remove) = f(&now.attributes);
                    self.client()
                        .update(&id, set, remove, Some(now.version))
                        .await
                }
                Err(e) => Err(e),
            };
            match attempt {
                Ok(s) => {
                    st.current = Some(s.clone());
                    return Ok(s);
                }
                Err(e @ Error::Conflict { .. }) => conflict = e,
                Err(Error::NotFound) => {
                    // Ended meanwhile: the handler hears it, and nothing written is lost.
                    st.current = None;
                    st.from_cookie = false;
                    return Err(Error::NotFound);
                }
                Err(e) => return Err(e),
            }
        }
        Err(conflict)
    }

    /// Starts a session with this request's pending writes (and `user`); the cookie will
    /// carry it.
    async fn create<'a>(
        &self,
        st: &'a mut State,
        user: Option<&str>,
    ) -> Result<&'a crate::Session, Error> {
        let new = NewSession {
            user_id: user.map(str::to_string),
            attributes: st.set.clone(),
            idle_timeout: self.shared.idle_timeout,
            ip: st.ip.clone(),
            user_agent: st.user_agent.clone(),
            ..NewSession::default()
        };
        let s = self.client().create(new).await?;
        st.set.clear();
        st.remove.clear();
        st.new_id = true;
        st.from_cookie = false;
        st.gone = false;
        Ok(st.current.insert(s))
    }

    /// Login or privilege change: moves the session to a fresh ID (the old one is dead at
    /// once), bound to `user`, keeping its data and this request's writes; the cookie is
    /// replaced. Without a live session (none, or one that ended meanwhile), starts one for
    /// `user` with this request's writes.
    pub async fn regenerate(&self, user: Option<&str>) -> Result<crate::Session, Error> {
        let mut st = self.state.lock().await;
        self.load(&mut st).await?;
        if let Some(id) = st.current.as_ref().map(|s| s.id.clone()) {
            let regenerated = match self.flush(&mut st, &id).await {
                Ok(()) => self.client().regenerate(&id, user).await,
                Err(e) => Err(e),
            };
            match regenerated {
                Ok(s) => {
                    st.new_id = true;
                    return Ok(st.current.insert(s).clone());
                }
                Err(Error::NotFound) => {
                    st.current = None;
                    st.from_cookie = false;
                }
                Err(e) => return Err(e),
            }
        }
        self.create(&mut st, user).await.cloned()
    }

    /// Logout: ends this session. The cookie is cleared if it named the session and the
    /// session was still live; a cookie that already named a dead session is left alone.
    pub async fn destroy(&self) -> Result<(), Error> {
        let mut st = self.state.lock().await;
        let target = match &st.current {
            Some(s) => Some((s.id.clone(), st.from_cookie)),
            None if !st.loaded => st.cookie_id.clone().map(|id| (id, true)),
            None => None,
        };
        if let Some((id, from_cookie)) = target {
            if self.client().destroy(&id).await? && from_cookie {
                st.clear_cookie = true;
            }
        }
        st.end();
        Ok(())
    }

    /// "Log out all my devices": ends every session of this session's user, this one
    /// included; `None` when nobody is logged in.
    pub async fn destroy_all_for_user(&self) -> Result<Option<u32>, Error> {
        let mut st = self.state.lock().await;
        self.load(&mut st).await?;
        let Some(user) = st.current.as_ref().and_then(|s| s.user_id.clone()) else {
            return Ok(None);
        };
        let n = self.client().destroy_user_sessions(&user, None).await?;
        if st.from_cookie {
            st.clear_cookie = true;
        }
        st.end();
        Ok(Some(n))
    }

    /// Sends pending writes to session `id` as one partial update. They stay pending if it
    /// fails, so a caller can still carry them into a new session.
    async fn flush(&self, st: &mut State, id: &str) -> Result<(), Error> {
        if st.set.is_empty() && st.remove.is_empty() {
            return Ok(());
        }
        let remove: Vec<String> = st.remove.iter().cloned().collect();
        let s = self
            .client()
            .update(id, st.set.clone(), remove, None)
            .await?;
        st.set.clear();
        st.remove.clear();
        st.current = Some(s);
        Ok(())
    }

    /// After the handler: writes back, and says what `Set-Cookie` to send, if any.
    async fn finish(&self) -> Result<Option<String>, Error> {
        let mut st = self.state.lock().await;
        if !st.set.is_empty() || !st.remove.is_empty() {
            self.load(&mut st).await?;
            if let Some(id) = st.current.as_ref().map(|s| s.id.clone()) {
                match self.flush(&mut st, &id).await {
                    Ok(()) => {}
                    // Ended since it was read: the writes start a new session below.
                    Err(Error::NotFound) => {
                        st.current = None;
                        st.from_cookie = false;
                    }
                    Err(e) => return Err(e),
                }
            }
            // No live session (none, dead, ended, destroyed) and something to keep: a new
            // one carries it (removals from a session that is gone have nothing to do).
            if st.current.is_none() && !st.set.is_empty() {
                self.create(&mut st, None).await?;
            }
        }
        Ok(match &st.current {
            Some(s) if st.new_id => Some(self.cookie(Some(&s.id))),
            None if st.clear_cookie => Some(self.cookie(None)),
            _ => None,
        })
    }

    /// The `Set-Cookie` value carrying `id`, or clearing the cookie.
    fn cookie(&self, id: Option<&str>) -> String {
        let mut c = Cookie::build((
            self.shared.cookie_name.clone(),
            id.unwrap_or_default().to_string(),
        ))
        .path("/")
        .http_only(true)
        .secure(self.shared.secure)
        .same_site(SameSite::Lax)
        .build();
        if id.is_none() {
            c.make_removal();
        }
        c.to_string()
    }
}
