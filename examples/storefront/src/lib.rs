//! The storefront demo: a shopping cart whose sessions live in sessiond, so any number of
//! instances behind a load balancer (in Rust or, through the Python client, Flask) serve the
//! same visitors.
//!
//! HTTP contract (JSON), shared with `examples/storefront-flask`:
//!
//! | Route | Does |
//! |---|---|
//! | `POST /cart/items {"sku","qty"}` | adds to the cart line `cart:<sku>` with compare-and-set (no lost adds); starts an anonymous session if there is none |
//! | `GET /cart` | `{"cart": {...}, "user": ...}` |
//! | `POST /login {"user"}` | regenerates the session ID bound to the user, carrying the cart |
//! | `POST /logout` | ends this session |
//! | `POST /logout-all` | ends every session of the user ("log out all my devices") |
//! | `GET /devices` | the user's sessions: IP, user agent, last seen |
//!
//! A cookie whose session has expired or ended gets 401 `{"error": "session expired"}` and no
//! `Set-Cookie`: the request may be a late one from before a login in another tab, and
//! clearing the cookie would delete the new one. The cookie is `__Host-sid`,
//! `HttpOnly; Secure; SameSite=Lax; Path=/`.

use std::collections::BTreeMap;
use std::time::{Duration, UNIX_EPOCH};

use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Value};
use sessiond_client::layer::{ConfigError, Session};
use sessiond_client::{Attributes, Error, SessionClient, SessiondLayer};

/// The prefix of cart lines among the session's attributes.
pub const CART_PREFIX: &str = "cart:";

/// The storefront's routes over `client`; new sessions ask for `idle_timeout` if given (a
/// zero one is refused).
pub fn app(client: SessionClient, idle_timeout: Option<Duration>) -> Result<Router, ConfigError> {
    let mut layer = SessiondLayer::builder(client);
    if let Some(idle) = idle_timeout {
        layer = layer.idle_timeout(idle);
    }
    let layer = layer.build()?;
    Ok(Router::new()
        .route("/cart", get(view_cart))
        .route("/cart/items", post(add_to_cart))
        .route("/login", post(login))
        .route("/logout", post(logout))
        .route("/logout-all", post(logout_all))
        .route("/devices", get(devices))
        .layer(layer))
}

/// A handler's failure, as an HTTP answer.
pub enum Failure {
    /// The cookie's session is gone.
    Expired,
    /// The route needs a logged-in user.
    NotLoggedIn,
    /// A bad request body.
    Bad(&'static str),
    /// sessiond said no.
    Store(Error),
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure::Store(e)
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let (status, error) = match self {
            Failure::Expired => (StatusCode::UNAUTHORIZED, "session expired".to_string()),
            Failure::NotLoggedIn => (StatusCode::UNAUTHORIZED, "not logged in".to_string()),
            Failure::Bad(why) => (StatusCode::BAD_REQUEST, why.to_string()),
            Failure::Store(Error::ResourceExhausted(m)) => (StatusCode::TOO_MANY_REQUESTS, m),
            Failure::Store(e) => (StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        };
        (status, Json(json!({ "error": error }))).into_response()
    }
}

type Reply = Result<Json<Value>, Failure>;

/// Refuses a request whose cookie names a dead session.
async fn live(session: &Session) -> Result<(), Failure> {
    match session.is_gone().await? {
        true => Err(Failure::Expired),
        false => Ok(()),
    }
}

fn cart_of(attributes: &Attributes) -> BTreeMap<String, u64> {
    attributes
        .slices()
        .filter_map(|(k, v)| {
            let sku = k.strip_prefix(CART_PREFIX)?;
            let qty = std::str::from_utf8(v).ok()?.parse().ok()?;
            Some((sku.to_string(), qty))
        })
        .collect()
}

async fn view_cart(session: Session) -> Reply {
    live(&session).await?;
    let attributes = session.attributes().await?;
    Ok(Json(json!({
        "cart": cart_of(&attributes),
        "user": session.user().await?,
    })))
}

/// A request body as `T`, if it is a JSON object of that shape (serde would also take an
/// array of the fields in order, which the contract does not allow).
fn object<T: serde::de::DeserializeOwned>(body: Result<Json<Value>, JsonRejection>) -> Option<T> {
    match body {
        Ok(Json(v @ Value::Object(_))) => serde_json::from_value(v).ok(),
        _ => None,
    }
}

#[derive(Deserialize)]
struct AddItem {
    sku: String,
    qty: u64,
}

async fn add_to_cart(session: Session, body: Result<Json<Value>, JsonRejection>) -> Reply {
    live(&session).await?;
    // A body of the wrong shape is the client's mistake like any other: 400 with the contract's
    // JSON error, not the extractor's 415/422 in plain text.
    let Some(item) = object::<AddItem>(body) else {
        return Err(Failure::Bad(
            "expected a JSON object {\"sku\": string, \"qty\": integer}",
        ));
    };
    if item.sku.is_empty() || item.sku.len() > 64 || item.qty == 0 || item.qty > 1000 {
        return Err(Failure::Bad("sku must be 1-64 bytes and qty 1-1000"));
    }
    let key = format!("{CART_PREFIX}{}", item.sku);
    let s = session
        .modify(|attributes| {
            let now: u64 = attributes
                .get_ref(&key)
                .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok())
                .unwrap_or(0);
            let next = (now + item.qty).to_string();
            (vec![(key.clone(), Bytes::from(next))], vec![])
        })
        .await?;
    Ok(Json(json!({ "cart": cart_of(&s.attributes) })))
}

#[derive(Deserialize)]
struct Login {
    user: String,
}

async fn login(session: Session, body: Result<Json<Value>, JsonRejection>) -> Reply {
    live(&session).await?;
    let Some(body) = object::<Login>(body) else {
        return Err(Failure::Bad("expected a JSON object {\"user\": string}"));
    };
    if body.user.is_empty() {
        return Err(Failure::Bad("user must not be empty"));
    }
    let s = session.regenerate(Some(&body.user)).await?;
    Ok(Json(
        json!({ "user": body.user, "cart": cart_of(&s.attributes) }),
    ))
}

async fn logout(session: Session) -> Reply {
    live(&session).await?;
    session.destroy().await?;
    Ok(Json(json!({ "ok": true })))
}

async fn logout_all(session: Session) -> Reply {
    live(&session).await?;
    match session.destroy_all_for_user().await? {
        Some(n) => Ok(Json(json!({ "destroyed": n }))),
        None => Err(Failure::NotLoggedIn),
    }
}

async fn devices(session: Session) -> Reply {
    live(&session).await?;
    let (Some(user), Some(me)) = (session.user().await?, session.id().await?) else {
        return Err(Failure::NotLoggedIn);
    };
    let list = session.client().list_user_sessions(&user).await?;
    let devices: Vec<Value> = list
        .iter()
        .map(|s| {
            json!({
                "ip": s.ip,
                "user_agent": s.user_agent,
                "last_seen": s.last_access_at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
                "current": s.id == me,
            })
        })
        .collect();
    Ok(Json(json!({ "devices": devices })))
}
