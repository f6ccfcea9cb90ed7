//! One request's session: the [`Session`] extractor, its lazy load, the writes it collects and
//! their write-back after the handler, and what the response does to the cookie.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::FromRequestParts;
use bytes::Bytes;
use http::StatusCode;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::Mutex;

use super::codec::{Codec, Json};
use super::error::SessionError;
use super::Shared;
use crate::{Attributes, Error, NewSession, SessionClient};

/// Compare-and-set attempts [`Session::modify`] makes before giving up with the conflict.
const MAX_CAS_ATTEMPTS: usize = 32;

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

/// One request's session. Take it as an extractor in handlers under
/// [`SessiondLayer`](super::SessiondLayer); `C` is the layer's [`Codec`]. Clones share the
/// request's state.
///
/// Without the layer on the route (or with another codec), extracting it is a 500 that says
/// so.
///
/// ```no_run
/// use sessiond_client::layer::{Session, SessionError};
///
/// async fn visits(session: Session) -> Result<String, SessionError> {
///     let n = session.get::<u64>("visits").await?.unwrap_or(0) + 1;
///     session.insert("visits", &n).await?;
///     Ok(format!("visit {n}"))
/// }
/// ```
pub struct Session<C = Json> {
    shared: Arc<Shared<C>>,
    state: Arc<Mutex<State>>,
}

/// Prints nothing of the session: its ID is the user's credential.
impl<C> std::fmt::Debug for Session<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").finish_non_exhaustive()
    }
}

impl<C> Clone for Session<C> {
    fn clone(&self) -> Self {
        Session {
            shared: self.shared.clone(),
            state: self.state.clone(),
        }
    }
}

impl<S: Send + Sync, C: Codec> FromRequestParts<S> for Session<C> {
    type Rejection = (StatusCode, &'static str);

    async fn from_request_parts(
        parts: &mut http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        parts.extensions.get::<Session<C>>().cloned().ok_or((
            StatusCode::INTERNAL_SERVER_ERROR,
            "SessiondLayer with this codec is not installed on this route",
        ))
    }
}

impl<C: Codec> Session<C> {
    pub(super) fn new(
        shared: Arc<Shared<C>>,
        cookie_id: Option<String>,
        ip: String,
        user_agent: String,
    ) -> Self {
        Session {
            shared,
            state: Arc::new(Mutex::new(State {
                cookie_id,
                ip,
                user_agent,
                ..State::default()
            })),
        }
    }

    /// The client the layer uses, for calls beyond this session (listing a user's devices).
    ///
    /// ```no_run
    /// # async fn f(session: sessiond_client::layer::Session) -> Result<(), sessiond_client::Error> {
    /// if let Some(user) = session.user().await? {
    ///     let devices = session.client().list_user_sessions(&user).await?;
    /// }
    /// # Ok(()) }
    /// ```
    pub fn client(&self) -> &SessionClient {
        &self.shared.client
    }

    /// Loads the cookie's session once (a sliding `Get`). A cookie that is not a well-formed
    /// ID (sessiond answers INVALID_ARGUMENT: a cookie from another app under the same name,
    /// or tampered with) names no session, like a dead one; as an error it would fail every
    /// request of that browser until the cookie expired.
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
                Err(Error::NotFound | Error::InvalidArgument(_)) => st.gone = true,
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
    ///
    /// ```no_run
    /// # async fn f(session: sessiond_client::layer::Session) -> Result<(), sessiond_client::Error> {
    /// if session.is_gone().await? {
    ///     // answer 401: "your session has expired"
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn is_gone(&self) -> Result<bool, Error> {
        let mut st = self.state.lock().await;
        self.load(&mut st).await?;
        Ok(st.gone && st.current.is_none())
    }

    /// The session's ID, if it has one.
    /// The session's ID, if it has one. Never log it: it is the user's credential.
    ///
    /// ```no_run
    /// # async fn f(session: sessiond_client::layer::Session) -> Result<(), sessiond_client::Error> {
    /// let me = session.id().await?; // to mark "this device" in a list of sessions
    /// # Ok(()) }
    /// ```
    pub async fn id(&self) -> Result<Option<String>, Error> {
        let mut st = self.state.lock().await;
        self.load(&mut st).await?;
        Ok(st.current.as_ref().map(|s| s.id.clone()))
    }

    /// The logged-in user, if any.
    ///
    /// ```no_run
    /// # async fn f(session: sessiond_client::layer::Session) -> Result<(), sessiond_client::Error> {
    /// let who = session.user().await?.unwrap_or_else(|| "guest".into());
    /// # Ok(()) }
    /// ```
    pub async fn user(&self) -> Result<Option<String>, Error> {
        let mut st = self.state.lock().await;
        self.load(&mut st).await?;
        Ok(st.current.as_ref().and_then(|s| s.user_id.clone()))
    }

    /// Every attribute, this request's unsent writes included.
    ///
    /// ```no_run
    /// # async fn f(session: sessiond_client::layer::Session) -> Result<(), sessiond_client::Error> {
    /// let keys: Vec<String> = session.attributes().await?.keys().map(String::from).collect();
    /// # Ok(()) }
    /// ```
    pub async fn attributes(&self) -> Result<Attributes, Error> {
        let mut st = self.state.lock().await;
        self.load(&mut st).await?;
        let stored = st
            .current
            .as_ref()
            .map(|s| s.attributes.clone())
            .unwrap_or_default();
        if st.set.is_empty() && st.remove.is_empty() {
            return Ok(stored);
        }
        let kept = stored
            .slices()
            .filter(|(k, _)| !st.remove.contains(*k) && !st.set.contains_key(*k));
        let written = st.set.iter().map(|(k, v)| (k.as_str(), v.as_ref()));
        Ok(kept.chain(written).collect())
    }

    /// The value of `key`, decoded with the layer's codec; `None` when the session has no
    /// such key (or there is no session). A value that does not decode as `T` is
    /// [`SessionError::Decode`], naming the key.
    ///
    /// ```no_run
    /// # async fn f(session: sessiond_client::layer::Session) -> Result<(), sessiond_client::layer::SessionError> {
    /// #[derive(serde::Deserialize)]
    /// struct Cart { items: Vec<String> }
    ///
    /// let cart: Option<Cart> = session.get("cart").await?;
    /// # Ok(()) }
    /// ```
    pub async fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, SessionError> {
        match self.get_raw(key).await? {
            None => Ok(None),
            Some(bytes) => self
                .shared
                .codec
                .decode(&bytes)
                .map(Some)
                .map_err(|source| SessionError::Decode {
                    key: key.to_string(),
                    type_name: std::any::type_name::<T>(),
                    source,
                }),
        }
    }

    /// Sets `key` to `value`, encoded with the layer's codec now and written back after the
    /// handler, with the request's other changes. A value the codec cannot encode is
    /// [`SessionError::Encode`], and nothing is set.
    ///
    /// ```no_run
    /// # async fn f(session: sessiond_client::layer::Session) -> Result<(), sessiond_client::layer::SessionError> {
    /// #[derive(serde::Serialize)]
    /// struct Cart { items: Vec<String> }
    ///
    /// session.insert("cart", &Cart { items: vec!["apple".into()] }).await?;
    /// # Ok(()) }
    /// ```
    pub async fn insert<T: Serialize + ?Sized>(
        &self,
        key: impl Into<String>,
        value: &T,
    ) -> Result<(), SessionError> {
        let key = key.into();
        match self.shared.codec.encode(value) {
            Ok(bytes) => {
                self.insert_raw(key, bytes).await;
                Ok(())
            }
            Err(source) => Err(SessionError::Encode {
                key,
                type_name: std::any::type_name::<T>(),
                source,
            }),
        }
    }

    /// The bytes of `key` as stored, without the codec.
    ///
    /// ```no_run
    /// # async fn f(session: sessiond_client::layer::Session) -> Result<(), sessiond_client::Error> {
    /// let theme = session.get_raw("theme").await?; // Option<Bytes>
    /// # Ok(()) }
    /// ```
    pub async fn get_raw(&self, key: &str) -> Result<Option<Bytes>, Error> {
        let mut st = self.state.lock().await;
        if let Some(v) = st.set.get(key) {
            return Ok(Some(v.clone()));
        }
        if st.remove.contains(key) {
            return Ok(None);
        }
        self.load(&mut st).await?;
        Ok(st.current.as_ref().and_then(|s| s.attributes.get(key)))
    }

    /// Sets `key` to these bytes as they are, without the codec; written back after the
    /// handler.
    ///
    /// ```no_run
    /// # async fn f(session: sessiond_client::layer::Session) {
    /// session.insert_raw("theme", "dark").await;
    /// # }
    /// ```
    pub async fn insert_raw(&self, key: impl Into<String>, value: impl Into<Bytes>) {
        let mut st = self.state.lock().await;
        let key = key.into();
        st.remove.remove(&key);
        st.set.insert(key, value.into());
    }

    /// Removes an attribute; written back after the handler.
    ///
    /// ```no_run
    /// # async fn f(session: sessiond_client::layer::Session) {
    /// session.remove("cart").await;
    /// # }
    /// ```
    pub async fn remove(&self, key: &str) {
        let mut st = self.state.lock().await;
        st.set.remove(key);
        st.remove.insert(key.to_string());
    }

    /// Changes attributes now, atomically against concurrent requests: `f` sees the current
    /// attributes and returns what to set and remove; it is re-run on a fresh read whenever
    /// another request changed the session in between (compare-and-set on its version).
    /// Creates the session first if there is none.
    ///
    /// ```no_run
    /// # async fn f(session: sessiond_client::layer::Session) -> Result<(), sessiond_client::Error> {
    /// use bytes::Bytes;
    /// // Two tabs adding at once both count: a lost race re-runs the closure.
    /// let s = session
    ///     .modify(|now| {
    ///         let n: u64 = now
    ///             .get_ref("cart:apple")
    ///             .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok())
    ///             .unwrap_or(0);
    ///         (vec![("cart:apple".to_string(), Bytes::from((n + 1).to_string()))], vec![])
    ///     })
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn modify<F>(&self, f: F) -> Result<crate::Session, Error>
    where
        F: Fn(&Attributes) -> (Vec<(String, Bytes)>, Vec<String>),
    {
        let Ok(s) = self.cas(|now| Ok::<_, Infallible>(f(now))).await?;
        Ok(s)
    }

    /// Changes the value of `key` now, atomically against concurrent requests, through the
    /// layer's codec: `f` gets the current value (`None` when absent) and returns the new one
    /// (`None` removes the key). Like [`modify`](Session::modify), it is re-run on a fresh
    /// read whenever another request changed the session in between, so two tabs adding to
    /// one cart at once both count. Returns what `f` returned last. A current value that does
    /// not decode is [`SessionError::Decode`], and nothing is written.
    ///
    /// ```no_run
    /// # async fn f(session: sessiond_client::layer::Session) -> Result<(), sessiond_client::layer::SessionError> {
    /// let cart = session
    ///     .modify_value("cart", |cart: Option<Vec<String>>| {
    ///         let mut cart = cart.unwrap_or_default();
    ///         cart.push("apple".into());
    ///         Some(cart)
    ///     })
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn modify_value<T, F>(&self, key: &str, f: F) -> Result<Option<T>, SessionError>
    where
        T: Serialize + DeserializeOwned,
        F: Fn(Option<T>) -> Option<T>,
    {
        let codec = &self.shared.codec;
        let mut last = None;
        let outcome = self
            .cas(|now| {
                let current = match now.get_ref(key).map(|v| codec.decode::<T>(v)).transpose() {
                    Ok(v) => v,
                    Err(source) => {
                        return Err(SessionError::Decode {
                            key: key.to_string(),
                            type_name: std::any::type_name::<T>(),
                            source,
                        })
                    }
                };
                last = f(current);
                match &last {
                    None => Ok((vec![], vec![key.to_string()])),
                    Some(v) => match codec.encode(v) {
                        Ok(bytes) => Ok((vec![(key.to_string(), bytes)], vec![])),
                        Err(source) => Err(SessionError::Encode {
                            key: key.to_string(),
                            type_name: std::any::type_name::<T>(),
                            source,
                        }),
                    },
                }
            })
            .await?;
        outcome.map(|_| last)
    }

    /// The compare-and-set loop of [`modify`](Session::modify): `f` may refuse (its error is
    /// returned inside, and nothing is written).
    async fn cas<E, F>(&self, mut f: F) -> Result<Result<crate::Session, E>, Error>
    where
        F: FnMut(&Attributes) -> Result<(Vec<(String, Bytes)>, Vec<String>), E>,
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
                Ok(now) => match f(&now.attributes) {
                    Ok((set, remove)) => {
                        self.client()
                            .update(&id, set, remove, Some(now.version))
                            .await
                    }
                    Err(refused) => return Ok(Err(refused)),
                },
                Err(e) => Err(e),
            };
            match attempt {
                Ok(s) => {
                    st.current = Some(s.clone());
                    return Ok(Ok(s));
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
            absolute_timeout: self.shared.absolute_timeout,
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
    ///
    /// ```no_run
    /// # async fn f(session: sessiond_client::layer::Session) -> Result<(), sessiond_client::Error> {
    /// // After checking the credentials:
    /// let s = session.regenerate(Some("alice")).await?;
    /// assert_eq!(s.user_id.as_deref(), Some("alice"));
    /// # Ok(()) }
    /// ```
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
    ///
    /// ```no_run
    /// # async fn f(session: sessiond_client::layer::Session) -> Result<(), sessiond_client::Error> {
    /// session.destroy().await?;
    /// # Ok(()) }
    /// ```
    pub async fn destroy(&self) -> Result<(), Error> {
        let mut st = self.state.lock().await;
        let target = match &st.current {
            Some(s) => Some((s.id.clone(), st.from_cookie)),
            None if !st.loaded => st.cookie_id.clone().map(|id| (id, true)),
            None => None,
        };
        if let Some((id, from_cookie)) = target {
            match self.client().destroy(&id).await {
                Ok(existed) => st.clear_cookie = existed && from_cookie,
                // A malformed cookie (see `load`): there is nothing to end.
                Err(Error::InvalidArgument(_)) if !st.loaded => {}
                Err(e) => return Err(e),
            }
        }
        st.end();
        Ok(())
    }

    /// "Log out all my devices": ends every session of this session's user, this one
    /// included; `None` when nobody is logged in.
    ///
    /// ```no_run
    /// # async fn f(session: sessiond_client::layer::Session) -> Result<(), sessiond_client::Error> {
    /// if let Some(n) = session.destroy_all_for_user().await? {
    ///     println!("ended {n} sessions");
    /// }
    /// # Ok(()) }
    /// ```
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
    pub(super) async fn finish(&self) -> Result<Option<String>, Error> {
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
        let cookie = &self.shared.cookie;
        Ok(match &st.current {
            // A new ID, or (persistent) the live session this request used and slid: every
            // call that sets `current` (Get, Update, Regenerate, Create) moved its expiry.
            Some(s) if st.new_id || cookie.persistent => {
                let max_age = cookie.persistent.then(|| {
                    s.expires_at
                        .duration_since(s.last_access_at)
                        .unwrap_or_default()
                });
                Some(cookie.set(&s.id, max_age))
            }
            None if st.clear_cookie => Some(cookie.clear()),
            _ => None,
        })
    }
}
