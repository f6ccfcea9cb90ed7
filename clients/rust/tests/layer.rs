//! `SessiondLayer` in an axum app against a real sessiond on an ephemeral loopback port: what
//! it does to the cookie, and that no handler's write is dropped when its session is gone.

use std::collections::BTreeMap;

use axum::body::{to_bytes, Body};
use axum::extract::Path;
use axum::http::{header, Request, StatusCode};
use axum::routing::{get, post};
use axum::Router;
use sessiond::clock::Clock;
use sessiond::config::Config;
use sessiond::server::Daemon;
use sessiond_client::layer::{Session, DEFAULT_COOKIE};
use sessiond_client::{Error, SessionClient, SessiondLayer};
use tower::ServiceExt;

async fn daemon() -> Daemon {
    let config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_listen: "127.0.0.1:0".parse().unwrap(),
        persist: false,
        ..Config::default()
    };
    Daemon::start(config, Clock::manual(1_750_000_000_000))
        .await
        .unwrap()
}

fn failed(e: Error) -> (StatusCode, String) {
    (StatusCode::SERVICE_UNAVAILABLE, e.to_string())
}

/// Ends the request's session behind the handler's back, as another request (a login in
/// another tab, "log out everywhere") does while this one runs.
async fn end_it_elsewhere(session: &Session) {
    let id = session.id().await.unwrap().expect("a live session");
    assert!(session.client().destroy(&id).await.unwrap());
}

fn app(client: SessionClient) -> Router {
    Router::new()
        .route(
            "/read",
            get(|session: Session| async move {
                // `gone=<bool>` and the attributes, `key=value` a line, in key order.
                let all: BTreeMap<String, String> = session
                    .attributes()
                    .await
                    .map_err(failed)?
                    .into_iter()
                    .map(|(k, v)| (k, String::from_utf8_lossy(&v).into_owned()))
                    .collect();
                let gone = session.is_gone().await.map_err(failed)?;
                let mut text = format!("gone={gone}\n");
                for (k, v) in all {
                    text.push_str(&format!("{k}={v}\n"));
                }
                Ok::<_, (StatusCode, String)>(text)
            }),
        )
        .route(
            "/set/{key}/{value}",
            post(
                |session: Session, Path((key, value)): Path<(String, String)>| async move {
                    session.insert(key, value).await;
                    StatusCode::OK
                },
            ),
        )
        .route(
            "/read-end-set/{key}/{value}",
            post(
                |session: Session, Path((key, value)): Path<(String, String)>| async move {
                    end_it_elsewhere(&session).await;
                    session.insert(key, value).await;
                    StatusCode::OK
                },
            ),
        )
        .route(
            "/login/{user}",
            post(|session: Session, Path(user): Path<String>| async move {
                session.insert("pending", "from-login").await;
                session
                    .regenerate(Some(&user))
                    .await
                    .map(|_| StatusCode::OK)
                    .map_err(failed)
            }),
        )
        .route(
            "/read-end-login/{user}",
            post(|session: Session, Path(user): Path<String>| async move {
                end_it_elsewhere(&session).await;
                session.insert("pending", "from-login").await;
                session
                    .regenerate(Some(&user))
                    .await
                    .map(|_| StatusCode::OK)
                    .map_err(failed)
            }),
        )
        .route(
            "/logout",
            post(|session: Session| async move {
                session
                    .destroy()
                    .await
                    .map(|_| StatusCode::OK)
                    .map_err(failed)
            }),
        )
        .layer(SessiondLayer::new(client))
}

/// What a response did to the cookie.
#[derive(Debug, PartialEq)]
enum CookieChange {
    /// No `Set-Cookie` at all.
    Untouched,
    /// Set to this ID.
    Set(String),
    /// Cleared.
    Cleared,
}

struct Answer {
    status: StatusCode,
    body: String,
    cookie: CookieChange,
}

async fn call(app: &Router, method: &str, path: &str, cookie: Option<&str>) -> Answer {
    let mut req = Request::builder().method(method).uri(path);
    if let Some(id) = cookie {
        req = req.header(header::COOKIE, format!("{DEFAULT_COOKIE}={id}"));
    }
    let res = app
        .clone()
        .oneshot(req.body(Body::empty()).unwrap())
        .await
        .unwrap();
    let set: Vec<String> = res
        .headers()
        .get_all(header::SET_COOKIE)
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect();
    assert!(set.len() <= 1, "{set:?}");
    let cookie = match set.first() {
        None => CookieChange::Untouched,
        Some(v) => {
            let value = v
                .strip_prefix(&format!("{DEFAULT_COOKIE}="))
                .unwrap_or_else(|| panic!("{v}"))
                .split(';')
                .next()
                .unwrap();
            if value.is_empty() || v.contains("Max-Age=0") {
                CookieChange::Cleared
            } else {
                CookieChange::Set(value.to_string())
            }
        }
    };
    let status = res.status();
    let body = to_bytes(res.into_body(), usize::MAX).await.unwrap();
    Answer {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
        cookie,
    }
}

/// A session made through the app: its ID.
async fn started(app: &Router) -> String {
    let r = call(app, "POST", "/set/cart:apple/1", None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    match r.cookie {
        CookieChange::Set(id) => id,
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_late_request_with_the_pre_login_cookie_leaves_the_new_one_alone() {
    let d = daemon().await;
    let client = SessionClient::connect(&d.grpc_addr.to_string())
        .await
        .unwrap();
    let app = app(client.clone());

    // A cart (cookie A), then a login with A (cookie B, A dead).
    let a = started(&app).await;
    let r = call(&app, "POST", "/login/alice", Some(&a)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let CookieChange::Set(b) = r.cookie else {
        panic!("{:?}", r.cookie)
    };
    assert_ne!(a, b);

    // A request sent with A before the browser learned B answers after it: whatever it
    // says, it must not clear or replace the cookie, which by now holds B.
    let r = call(&app, "GET", "/read", Some(&a)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body, "gone=true\n");
    assert_eq!(r.cookie, CookieChange::Untouched);
    let r = call(&app, "POST", "/logout", Some(&a)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.cookie, CookieChange::Untouched, "A was already dead");

    // B is live and holds the cart and the login's write.
    let s = client.peek(&b).await.unwrap();
    assert_eq!(s.user_id.as_deref(), Some("alice"));
    assert_eq!(s.text("cart:apple"), Some("1"));
    assert_eq!(s.text("pending"), Some("from-login"));

    // Logging out with B, live, does clear it.
    let r = call(&app, "POST", "/logout", Some(&b)).await;
    assert_eq!(r.cookie, CookieChange::Cleared);
    assert_eq!(client.peek(&b).await, Err(Error::NotFound));
    d.stop().await.unwrap();
}

#[tokio::test]
async fn writes_through_a_dead_cookie_start_a_new_session_that_carries_them() {
    let d = daemon().await;
    let client = SessionClient::connect(&d.grpc_addr.to_string())
        .await
        .unwrap();
    let app = app(client.clone());
    let dead = started(&app).await;
    assert!(client.destroy(&dead).await.unwrap());

    let r = call(&app, "POST", "/set/theme/dark", Some(&dead)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let CookieChange::Set(new) = r.cookie else {
        panic!("the write was dropped: {:?}", r.cookie)
    };
    assert_ne!(new, dead);
    let s = client.peek(&new).await.unwrap();
    assert_eq!(s.text("theme"), Some("dark"));
    assert_eq!(
        s.text("cart:apple"),
        None,
        "nothing of the dead session comes back"
    );
    assert_eq!(s.user_id, None);
    d.stop().await.unwrap();
}

#[tokio::test]
async fn writes_to_a_session_ended_during_the_request_start_a_new_session() {
    let d = daemon().await;
    let client = SessionClient::connect(&d.grpc_addr.to_string())
        .await
        .unwrap();
    let app = app(client.clone());
    let id = started(&app).await;

    // The handler reads the session, it ends elsewhere, then the handler writes: the
    // write-back meets NOT_FOUND.
    let r = call(&app, "POST", "/read-end-set/theme/dark", Some(&id)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let CookieChange::Set(new) = r.cookie else {
        panic!("the write was dropped: {:?}", r.cookie)
    };
    assert_ne!(new, id);
    assert_eq!(client.peek(&new).await.unwrap().text("theme"), Some("dark"));
    d.stop().await.unwrap();
}

#[tokio::test]
async fn a_login_whose_session_ended_during_the_request_starts_one_for_the_user() {
    let d = daemon().await;
    let client = SessionClient::connect(&d.grpc_addr.to_string())
        .await
        .unwrap();
    let app = app(client.clone());
    let id = started(&app).await;

    let r = call(&app, "POST", "/read-end-login/bob", Some(&id)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let CookieChange::Set(new) = r.cookie else {
        panic!("{:?}", r.cookie)
    };
    let s = client.peek(&new).await.unwrap();
    assert_eq!(s.user_id.as_deref(), Some("bob"));
    assert_eq!(s.text("pending"), Some("from-login"));
    d.stop().await.unwrap();
}
