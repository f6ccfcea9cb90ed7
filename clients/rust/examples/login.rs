//! Logins on `SessiondLayer`, in the style of axum-login: a login handler that checks the
//! credentials and regenerates the session bound to the user, and an [`AuthUser`] extractor
//! that answers 401 to anonymous requests, so a protected handler cannot forget the check.
//!
//! ```sh
//! cargo run --release --bin sessiond &                          # the store, on 127.0.0.1:7420
//! cargo run -p sessiond-client --example login                  # this app, on 127.0.0.1:3000
//! curl -si -X POST localhost:3000/cart/apple                    # anonymous cart: note the cookie
//! curl -si localhost:3000/me -H 'cookie: __Host-sid=ID'         # 401: not logged in
//! curl -si -X POST localhost:3000/login -H 'cookie: __Host-sid=ID' \
//!   -H 'content-type: application/json' -d '{"user":"alice","password":"wonderland"}'
//! curl -si localhost:3000/me -H 'cookie: __Host-sid=NEW_ID'     # alice, with the cart
//! ```
//!
//! Environment: `SESSIOND_ADDR` (default `127.0.0.1:7420`), `PORT` (default 3000).

use axum::extract::{FromRequestParts, Path};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use sessiond_client::layer::{Session, SessionError};
use sessiond_client::{SessionClient, SessiondLayer};

/// The users this demo knows, with their passwords. A real app looks the user up in its
/// database and verifies a password hash (argon2, in constant time).
const USERS: &[(&str, &str)] = &[("alice", "wonderland"), ("bob", "builder")];

/// The logged-in user of a request. As an extractor it rejects a request without one (no
/// session, an anonymous one, or one that has ended) with 401, before the handler runs.
pub struct AuthUser {
    /// Who is logged in.
    pub name: String,
    /// The request's session, for the handler's reads and writes.
    pub session: Session,
}

impl<S: Send + Sync> FromRequestParts<S> for AuthUser {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Response> {
        let session = Session::from_request_parts(parts, state)
            .await
            .map_err(IntoResponse::into_response)?;
        match session.user().await {
            Ok(Some(name)) => Ok(AuthUser { name, session }),
            Ok(None) => Err((StatusCode::UNAUTHORIZED, "log in first").into_response()),
            Err(e) => Err(SessionError::from(e).into_response()),
        }
    }
}

/// The cart: one typed session value (JSON in sessiond).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Cart {
    /// What is in it.
    pub items: Vec<String>,
}

#[derive(Deserialize)]
struct Credentials {
    user: String,
    password: String,
}

/// Anyone may fill a cart; it is carried into the account at login. A compare-and-set on
/// the cart (`modify_value`), so two tabs adding at once both count; a value only this
/// request writes would take `get` and `insert`.
async fn add_to_cart(
    session: Session,
    Path(item): Path<String>,
) -> Result<Json<Cart>, SessionError> {
    let cart = session
        .modify_value("cart", |cart: Option<Cart>| {
            let mut cart = cart.unwrap_or_default();
            cart.items.push(item.clone());
            Some(cart)
        })
        .await?;
    Ok(Json(cart.unwrap_or_default()))
}

/// Checks the credentials, then regenerates: the pre-login ID dies at once (so an ID planted
/// or seen before the login is worth nothing: session fixation), the new one is bound to the
/// user, and the cookie is replaced.
async fn login(session: Session, Json(c): Json<Credentials>) -> Result<Response, SessionError> {
    let known = USERS
        .iter()
        .any(|(user, password)| *user == c.user && *password == c.password);
    if !known {
        return Ok((StatusCode::UNAUTHORIZED, "wrong user or password").into_response());
    }
    session.regenerate(Some(&c.user)).await?;
    Ok(format!("welcome, {}", c.user).into_response())
}

#[derive(Serialize)]
struct Me {
    user: String,
    cart: Cart,
}

/// Only for a logged-in user: [`AuthUser`] has said 401 to everyone else.
async fn me(user: AuthUser) -> Result<Json<Me>, SessionError> {
    let cart = user.session.get("cart").await?.unwrap_or_default();
    Ok(Json(Me {
        user: user.name,
        cart,
    }))
}

/// Ends the session; the layer clears the cookie.
async fn logout(user: AuthUser) -> Result<StatusCode, SessionError> {
    user.session.destroy().await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The routes, with sessions in sessiond through `client`.
pub fn app(client: SessionClient) -> Router {
    Router::new()
        .route("/cart/{item}", post(add_to_cart))
        .route("/login", post(login))
        .route("/me", get(me))
        .route("/logout", post(logout))
        .layer(SessiondLayer::new(client))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let addr = env("SESSIOND_ADDR").unwrap_or_else(|| "127.0.0.1:7420".into());
    let port: u16 = env("PORT").map_or(Ok(3000), |p| p.parse())?;
    let client = SessionClient::connect(&addr).await?;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app(client)).await?;
    Ok(())
}
