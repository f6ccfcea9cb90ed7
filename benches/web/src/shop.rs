//! The storefront's session-shaped routes, written once over [`ShopSession`], and served two
//! ways: on sessiond through `SessiondLayer`, and on tower-sessions with its Redis store.
//!
//! The HTTP contract is the storefront demo's (`examples/storefront`) for these routes:
//!
//! | Route | Does |
//! |---|---|
//! | `GET /cart` | `{"cart": {sku: qty}, "user": ...}` |
//! | `POST /cart/items {"sku","qty"}` | adds `qty` to the cart line of `sku`, starting a session if there is none; answers the cart |
//! | `POST /login {"user"}` | moves the session to a fresh ID bound to the user, keeping the cart |
//!
//! Each side does what its store does idiomatically. On sessiond, a cart line is an
//! attribute (`cart:<sku>`) and an add writes back that one key as a partial `Update` after
//! the handler; login is a `Regenerate`. On tower-sessions, the cart is one typed value under
//! `cart`, the whole record is saved after a handler that changed it (its Redis store `SET`s
//! the whole record), and login is `cycle_id` plus the user inserted, as axum-login does.
//! Neither side slides the idle timeout on a read beyond what it does by default: sessiond's
//! `Get` slides; tower-sessions, without `always_save`, saves only a changed session.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use axum::extract::FromRequestParts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Value};
use sessiond_client::{SessionClient, SessiondLayer};
use tower_sessions::{Expiry, SessionManagerLayer};
use tower_sessions_redis_store::fred::prelude::Pool;
use tower_sessions_redis_store::RedisStore;

/// The cookie both apps use. Plain (no `__Host-` prefix, not `Secure`): the load runs over
/// plain HTTP on loopback.
pub const COOKIE: &str = "sid";

/// The idle timeout both apps give their sessions: far beyond any run, so nothing expires
/// under load.
pub const IDLE: Duration = Duration::from_secs(30 * 60);

/// The prefix of cart lines among a sessiond session's attributes (as in the storefront).
pub const CART_PREFIX: &str = "cart:";

/// The key of the cart, one typed value, in a tower-sessions session.
const CART_KEY: &str = "cart";

/// The key of the logged-in user in a tower-sessions session.
const USER_KEY: &str = "user";

/// The longest SKU a request may name, in bytes (the storefront's limit).
const MAX_SKU: usize = 64;

/// The most one add may put in a cart line (the storefront's limit).
const MAX_QTY: u64 = 1000;

/// A cart: quantity per SKU.
pub type Cart = BTreeMap<String, u64>;

/// A handler's failure, as an HTTP answer.
#[derive(Debug)]
pub enum Failure {
    /// A bad request body: 400 with the reason.
    Bad(&'static str),
    /// The session store refused or failed: 503 with its message (which never holds a
    /// session ID).
    Store(String),
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let (status, error) = match self {
            Failure::Bad(why) => (StatusCode::BAD_REQUEST, why.to_string()),
            Failure::Store(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
        };
        (status, Json(json!({ "error": error }))).into_response()
    }
}

impl From<sessiond_client::Error> for Failure {
    fn from(e: sessiond_client::Error) -> Self {
        Failure::Store(e.to_string())
    }
}

impl From<tower_sessions::session::Error> for Failure {
    fn from(e: tower_sessions::session::Error) -> Self {
        Failure::Store(e.to_string())
    }
}

/// What the handlers need of a request's session; implemented by both layers' extractors.
pub trait ShopSession: FromRequestParts<()> + Send + Sync + 'static {
    /// The logged-in user, if any.
    fn user(&self) -> impl Future<Output = Result<Option<String>, Failure>> + Send;
    /// The whole cart (empty without a session), this request's changes included.
    fn cart(&self) -> impl Future<Output = Result<Cart, Failure>> + Send;
    /// The quantity of one cart line (0 if absent).
    fn line(&self, sku: &str) -> impl Future<Output = Result<u64, Failure>> + Send;
    /// Sets one cart line; stored after the handler, as the layer does.
    fn set_line(&self, sku: &str, qty: u64) -> impl Future<Output = Result<(), Failure>> + Send;
    /// Login: a fresh session ID bound to `user`, the cart kept.
    fn login(&self, user: &str) -> impl Future<Output = Result<(), Failure>> + Send;
}

impl ShopSession for sessiond_client::layer::Session {
    async fn user(&self) -> Result<Option<String>, Failure> {
        Ok(sessiond_client::layer::Session::user(self).await?)
    }

    async fn cart(&self) -> Result<Cart, Failure> {
        Ok(self
            .attributes()
            .await?
            .slices()
            .filter_map(|(k, v)| {
                let sku = k.strip_prefix(CART_PREFIX)?;
                Some((sku.to_string(), parse_qty(v)?))
            })
            .collect())
    }

    async fn line(&self, sku: &str) -> Result<u64, Failure> {
        let value = self.get_raw(&format!("{CART_PREFIX}{sku}")).await?;
        Ok(value.as_deref().and_then(parse_qty).unwrap_or(0))
    }

    async fn set_line(&self, sku: &str, qty: u64) -> Result<(), Failure> {
        self.insert_raw(format!("{CART_PREFIX}{sku}"), Bytes::from(qty.to_string()))
            .await;
        Ok(())
    }

    async fn login(&self, user: &str) -> Result<(), Failure> {
        self.regenerate(Some(user)).await?;
        Ok(())
    }
}

impl ShopSession for tower_sessions::Session {
    async fn user(&self) -> Result<Option<String>, Failure> {
        Ok(self.get(USER_KEY).await?)
    }

    async fn cart(&self) -> Result<Cart, Failure> {
        Ok(self.get(CART_KEY).await?.unwrap_or_default())
    }

    async fn line(&self, sku: &str) -> Result<u64, Failure> {
        Ok(ShopSession::cart(self)
            .await?
            .get(sku)
            .copied()
            .unwrap_or(0))
    }

    async fn set_line(&self, sku: &str, qty: u64) -> Result<(), Failure> {
        let mut cart = ShopSession::cart(self).await?;
        cart.insert(sku.to_string(), qty);
        Ok(self.insert(CART_KEY, cart).await?)
    }

    async fn login(&self, user: &str) -> Result<(), Failure> {
        self.cycle_id().await?;
        Ok(self.insert(USER_KEY, user).await?)
    }
}

/// A cart line's stored quantity, if it is one.
fn parse_qty(v: &[u8]) -> Option<u64> {
    std::str::from_utf8(v).ok()?.parse().ok()
}

type Reply = Result<Json<Value>, Failure>;

async fn view_cart<S: ShopSession>(session: S) -> Reply {
    Ok(Json(json!({
        "cart": session.cart().await?,
        "user": session.user().await?,
    })))
}

#[derive(Deserialize)]
struct AddItem {
    sku: String,
    qty: u64,
}

async fn add_to_cart<S: ShopSession>(session: S, Json(item): Json<AddItem>) -> Reply {
    if item.sku.is_empty() || item.sku.len() > MAX_SKU || item.qty == 0 || item.qty > MAX_QTY {
        return Err(Failure::Bad("sku must be 1-64 bytes and qty 1-1000"));
    }
    let now = session.line(&item.sku).await?;
    session
        .set_line(&item.sku, now.saturating_add(item.qty))
        .await?;
    Ok(Json(json!({ "cart": session.cart().await? })))
}

#[derive(Deserialize)]
struct Login {
    user: String,
}

async fn login<S: ShopSession>(session: S, Json(body): Json<Login>) -> Reply {
    if body.user.is_empty() {
        return Err(Failure::Bad("user must not be empty"));
    }
    session.login(&body.user).await?;
    Ok(Json(
        json!({ "user": body.user, "cart": session.cart().await? }),
    ))
}

/// The routes, over the session type `S`; the caller adds the layer that provides it.
fn routes<S: ShopSession>() -> Router {
    Router::new()
        .route("/cart", get(view_cart::<S>))
        .route("/cart/items", post(add_to_cart::<S>))
        .route("/login", post(login::<S>))
}

/// The app on sessiond: `SessiondLayer` over `client`.
pub fn sessiond_app(client: SessionClient) -> Result<Router, sessiond_client::layer::ConfigError> {
    let layer = SessiondLayer::builder(client)
        .cookie_name(COOKIE)
        .secure(false)
        .idle_timeout(IDLE)
        .build()?;
    Ok(routes::<sessiond_client::layer::Session>().layer(layer))
}

/// The app on Redis: tower-sessions with `tower-sessions-redis-store` over `pool`.
pub fn redis_app(pool: Pool) -> Router {
    let idle = time::Duration::seconds(IDLE.as_secs() as i64);
    routes::<tower_sessions::Session>().layer(
        SessionManagerLayer::new(RedisStore::new(pool))
            .with_name(COOKIE)
            .with_secure(false)
            .with_expiry(Expiry::OnInactivity(idle)),
    )
}
