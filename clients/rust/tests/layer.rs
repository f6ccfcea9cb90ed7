//! `SessiondLayer` in an axum app against a real sessiond on an ephemeral loopback port: what
//! it does to the cookie (and each cookie option's `Set-Cookie`), that no handler's write is
//! dropped when its session is gone, typed values, per-session timeouts, and the login example.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use axum::body::{to_bytes, Body};
use axum::extract::Path;
use axum::http::{header, Request, StatusCode};
use axum::routing::{get, post};
use axum::Router;
use cookie::Cookie;
use serde::{Deserialize, Serialize};
use sessiond::clock::Clock;
use sessiond::config::Config;
use sessiond::server::Daemon;
use sessiond_client::layer::{
    Codec, CodecError, ConfigError, SameSite, Session, SessionError, DEFAULT_COOKIE,
};
use sessiond_client::{Error, SessionClient, SessiondLayer};
use tower::ServiceExt;

async fn daemon() -> Daemon {
    daemon_on(Clock::manual(1_750_000_000_000)).await
}

/// A daemon on `clock`, which the test keeps a clone of to move time.
async fn daemon_on(clock: Clock) -> Daemon {
    let config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_listen: "127.0.0.1:0".parse().unwrap(),
        persist: false,
        ..Config::default()
    };
    Daemon::start(config, clock).await.unwrap()
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
    routes().layer(SessiondLayer::new(client))
}

/// The routes of [`app`], for another layer.
fn routes() -> Router {
    Router::new()
        .route(
            "/read",
            get(|session: Session| async move {
                // `gone=<bool>` and the attributes, `key=value` a line, in key order.
                let all: BTreeMap<String, String> = session
                    .attributes()
                    .await
                    .map_err(failed)?
                    .iter()
                    .map(|(k, v)| (k.to_owned(), String::from_utf8_lossy(&v).into_owned()))
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
                    session.insert_raw(key, value).await;
                    StatusCode::OK
                },
            ),
        )
        .route(
            "/swap",
            // Writes, then reads every attribute in the same request: `key=value` lines in
            // key order, the unsent writes included.
            post(|session: Session| async move {
                session.insert_raw("theme", "dark").await;
                session.insert_raw("cart:apple", "2").await;
                session.remove("cart:pear").await;
                let all = session.attributes().await.map_err(failed)?;
                let mut lines: Vec<String> = all
                    .slices()
                    .map(|(k, v)| format!("{k}={}", String::from_utf8_lossy(v)))
                    .collect();
                lines.sort();
                Ok::<_, (StatusCode, String)>(lines.join("\n"))
            }),
        )
        .route(
            "/read-end-set/{key}/{value}",
            post(
                |session: Session, Path((key, value)): Path<(String, String)>| async move {
                    end_it_elsewhere(&session).await;
                    session.insert_raw(key, value).await;
                    StatusCode::OK
                },
            ),
        )
        .route(
            "/login/{user}",
            post(|session: Session, Path(user): Path<String>| async move {
                session.insert_raw("pending", "from-login").await;
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
                session.insert_raw("pending", "from-login").await;
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
async fn attributes_include_the_requests_unsent_writes_and_removals() {
    let d = daemon().await;
    let client = SessionClient::connect(&d.grpc_addr.to_string())
        .await
        .unwrap();
    let app = app(client.clone());
    let id = started(&app).await; // cart:apple=1
    let r = call(&app, "POST", "/set/cart:pear/3", Some(&id)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);

    let r = call(&app, "POST", "/swap", Some(&id)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body, "cart:apple=2\ntheme=dark");
    // And that is what was written back.
    let stored = client.peek(&id).await.unwrap();
    assert_eq!(
        stored.attributes,
        [("cart:apple", "2"), ("theme", "dark")]
            .into_iter()
            .collect()
    );
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

/// The login example itself (its `main` is not used here).
#[path = "../examples/login.rs"]
#[allow(dead_code)]
mod login;

/// A response's status, `Set-Cookie` values and body.
struct Reply {
    status: StatusCode,
    set_cookie: Vec<String>,
    body: String,
}

/// Sends a request with an optional `Cookie` header and JSON body.
async fn send(
    app: &Router,
    method: &str,
    path: &str,
    cookie: Option<String>,
    json: Option<&str>,
) -> Reply {
    let mut req = Request::builder().method(method).uri(path);
    if let Some(c) = cookie {
        req = req.header(header::COOKIE, c);
    }
    let body = match json {
        Some(j) => {
            req = req.header(header::CONTENT_TYPE, "application/json");
            Body::from(j.to_string())
        }
        None => Body::empty(),
    };
    let res = app.clone().oneshot(req.body(body).unwrap()).await.unwrap();
    let set_cookie = res
        .headers()
        .get_all(header::SET_COOKIE)
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect();
    let status = res.status();
    let body = to_bytes(res.into_body(), usize::MAX).await.unwrap();
    Reply {
        status,
        set_cookie,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// The one `Set-Cookie` of a reply, parsed.
fn only_cookie(r: &Reply) -> Cookie<'static> {
    assert_eq!(r.set_cookie.len(), 1, "{:?} {}", r.set_cookie, r.body);
    Cookie::parse(r.set_cookie[0].clone()).unwrap()
}

#[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
struct Cart {
    items: Vec<String>,
    total_cents: u64,
}

fn typed_app(client: SessionClient) -> Router {
    Router::new()
        .route(
            "/add/{item}",
            post(|s: Session, Path(item): Path<String>| async move {
                let mut cart: Cart = s.get("cart").await?.unwrap_or_default();
                cart.items.push(item);
                cart.total_cents += 150;
                s.insert("cart", &cart).await?;
                // The request reads its own unsent write back through the codec.
                let again: Option<Cart> = s.get("cart").await?;
                Ok::<_, SessionError>(format!("{again:?}"))
            }),
        )
        .route(
            "/cart",
            get(|s: Session| async move {
                match s.get::<Cart>("cart").await {
                    Ok(cart) => (StatusCode::OK, format!("{cart:?}")),
                    Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
                }
            }),
        )
        .route(
            "/raw/{key}/{value}",
            post(
                |s: Session, Path((key, value)): Path<(String, String)>| async move {
                    s.insert_raw(key, value).await;
                    StatusCode::OK
                },
            ),
        )
        .route(
            "/debug",
            get(|s: Session| async move {
                let _ = s.id().await; // loaded, so the ID is in there to leak
                format!("{s:?}")
            }),
        )
        .route(
            "/unencodable",
            post(|s: Session| async move {
                // JSON map keys must be strings.
                let value = HashMap::from([((1u8, 2u8), 3u8)]);
                match s.insert("pairs", &value).await {
                    Ok(()) => (StatusCode::OK, String::new()),
                    Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
                }
            }),
        )
        .layer(SessiondLayer::new(client))
}

#[tokio::test]
async fn typed_values_round_trip_as_json() {
    let d = daemon().await;
    let client = SessionClient::connect(&d.grpc_addr.to_string())
        .await
        .unwrap();
    let app = typed_app(client.clone());

    let r = send(&app, "POST", "/add/apple", None, None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let id = only_cookie(&r).value().to_string();
    let jar = Some(format!("{DEFAULT_COOKIE}={id}"));
    let r = send(&app, "POST", "/add/pear", jar.clone(), None).await;
    let want = Cart {
        items: vec!["apple".into(), "pear".into()],
        total_cents: 300,
    };
    assert_eq!(r.body, format!("{:?}", Some(&want)));

    // Stored as JSON, one attribute.
    let stored = client.peek(&id).await.unwrap();
    let json: Cart = serde_json::from_slice(&stored.attributes["cart"]).unwrap();
    assert_eq!(json, want);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&stored.attributes["cart"]).unwrap(),
        serde_json::json!({"items": ["apple", "pear"], "total_cents": 300})
    );

    let r = send(&app, "GET", "/cart", jar.clone(), None).await;
    assert_eq!(r.body, format!("{:?}", Some(&want)));
    // Debug output names nothing of the session.
    let r = send(&app, "GET", "/debug", jar.clone(), None).await;
    assert_eq!(r.body, "Session { .. }");

    // A key the session does not have is None, not an error.
    let r = send(&app, "GET", "/cart", None, None).await;
    assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "None"));
    d.stop().await.unwrap();
}

#[tokio::test]
async fn a_value_that_does_not_decode_or_encode_is_an_error_naming_the_key() {
    let d = daemon().await;
    let client = SessionClient::connect(&d.grpc_addr.to_string())
        .await
        .unwrap();
    let app = typed_app(client.clone());

    let r = send(&app, "POST", "/raw/cart/not-json", None, None).await;
    let id = only_cookie(&r).value().to_string();
    let r = send(
        &app,
        "GET",
        "/cart",
        Some(format!("{DEFAULT_COOKIE}={id}")),
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(
        r.body,
        r#"session value "cart" does not decode as layer::Cart"#
    );
    assert!(!r.body.contains(&id), "the session ID leaked: {}", r.body);

    // Nor the value: a type mismatch that serde's message would quote.
    let secret = "alice-at-example";
    let r = send(
        &app,
        "POST",
        &format!("/raw/cart/%22{secret}%22"),
        Some(format!("{DEFAULT_COOKIE}={id}")),
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = send(
        &app,
        "GET",
        "/cart",
        Some(format!("{DEFAULT_COOKIE}={id}")),
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(!r.body.contains(secret), "the value leaked: {}", r.body);

    // Nothing is set, so no session is started for it.
    let r = send(&app, "POST", "/unencodable", None, None).await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(
        r.body
            .starts_with(r#"session value "pairs" does not encode as "#),
        "{}",
        r.body
    );
    assert!(r.set_cookie.is_empty(), "{:?}", r.set_cookie);
    d.stop().await.unwrap();
}

#[tokio::test]
async fn the_default_cookie_is_host_only_secure_http_only_lax_and_ends_with_the_browser() {
    let d = daemon().await;
    let client = SessionClient::connect(&d.grpc_addr.to_string())
        .await
        .unwrap();
    let app = app(client);
    let r = send(&app, "POST", "/set/a/1", None, None).await;
    let c = only_cookie(&r);
    assert_eq!(c.name(), DEFAULT_COOKIE);
    assert_eq!(c.value().len(), 43);
    assert_eq!(c.path(), Some("/"));
    assert_eq!(c.domain(), None);
    assert_eq!(c.secure(), Some(true));
    assert_eq!(c.http_only(), Some(true));
    assert_eq!(c.same_site(), Some(SameSite::Lax));
    assert_eq!(c.max_age(), None);
    assert_eq!(c.partitioned(), None);
    d.stop().await.unwrap();
}

#[tokio::test]
async fn each_cookie_option_shows_in_set_cookie_and_in_its_removal() {
    let d = daemon().await;
    let client = SessionClient::connect(&d.grpc_addr.to_string())
        .await
        .unwrap();
    let layer = SessiondLayer::builder(client.clone())
        .cookie_name("shop")
        .same_site(SameSite::Strict)
        .domain("example.com")
        .path("/shop")
        .secure(false)
        .http_only(false)
        .build()
        .unwrap();
    let app = routes().layer(layer);

    let r = send(&app, "POST", "/set/a/1", None, None).await;
    let c = only_cookie(&r);
    assert_eq!(c.name(), "shop");
    assert_eq!(c.same_site(), Some(SameSite::Strict));
    assert_eq!(c.domain(), Some("example.com"));
    assert_eq!(c.path(), Some("/shop"));
    assert_eq!(c.secure(), None);
    assert_eq!(c.http_only(), None);
    let id = c.value().to_string();

    // The layer reads its own cookie name, and ignores another cookie of the default name.
    let jar = Some(format!("{DEFAULT_COOKIE}=nonsense; shop={id}"));
    let r = send(&app, "GET", "/read", jar.clone(), None).await;
    assert_eq!(r.body, "gone=false\na=1\n");

    // Logout clears it with the same Domain and Path, or the browser would keep it.
    let r = send(&app, "POST", "/logout", jar, None).await;
    let c = only_cookie(&r);
    assert_eq!(
        (c.name(), c.value(), c.domain(), c.path()),
        ("shop", "", Some("example.com"), Some("/shop"))
    );
    assert_eq!(c.max_age(), Some(cookie::time::Duration::ZERO));

    // A cookie for embedding: SameSite=None, Partitioned, under the __Secure- prefix.
    let layer = SessiondLayer::builder(client.clone())
        .cookie_name("__Secure-embed")
        .same_site(SameSite::None)
        .partitioned(true)
        .build()
        .unwrap();
    let r = send(&routes().layer(layer), "POST", "/set/a/1", None, None).await;
    let c = only_cookie(&r);
    assert_eq!(c.name(), "__Secure-embed");
    assert_eq!(c.same_site(), Some(SameSite::None));
    assert_eq!(c.partitioned(), Some(true));
    assert_eq!(c.secure(), Some(true));
    d.stop().await.unwrap();
}

#[tokio::test]
async fn combinations_browsers_reject_are_refused_when_the_layer_is_built() {
    let d = daemon().await;
    let client = SessionClient::connect(&d.grpc_addr.to_string())
        .await
        .unwrap();
    let b = || SessiondLayer::builder(client.clone());
    let ok = b().cookie_name("sid").persistent(true).build().unwrap();
    let debug = format!("{ok:?}");
    assert!(
        debug.contains(r#"name: "sid""#) && debug.contains("persistent: true"),
        "{debug}"
    );
    let err = b().domain("example.com").build().err().unwrap();
    assert!(matches!(err, ConfigError::HostPrefix { .. }), "{err}");
    assert_eq!(
        err.to_string(),
        r#"cookie "__Host-sid": a __Host- cookie needs Secure, Path=/ and no Domain (a Domain is set)"#
    );
    assert!(matches!(
        b().path("/app").build(),
        Err(ConfigError::HostPrefix { .. })
    ));
    assert!(matches!(
        b().secure(false).build(),
        Err(ConfigError::HostPrefix { .. })
    ));
    assert!(matches!(
        b().cookie_name("__Secure-sid").secure(false).build(),
        Err(ConfigError::SecurePrefix(_))
    ));
    assert!(matches!(
        b().cookie_name("sid")
            .secure(false)
            .same_site(SameSite::None)
            .build(),
        Err(ConfigError::SameSiteNone)
    ));
    assert!(matches!(
        b().cookie_name("bad name").build(),
        Err(ConfigError::CookieName(_))
    ));
    assert_eq!(
        b().idle_timeout(Duration::ZERO).build().err(),
        Some(ConfigError::ZeroTimeout("idle_timeout"))
    );
    d.stop().await.unwrap();
}

#[tokio::test]
async fn a_persistent_cookie_max_age_follows_the_session_expiry() {
    let clock = Clock::manual(1_750_000_000_000);
    let d = daemon_on(clock.clone()).await;
    let client = SessionClient::connect(&d.grpc_addr.to_string())
        .await
        .unwrap();
    let layer = SessiondLayer::builder(client.clone())
        .persistent(true)
        .idle_timeout(Duration::from_secs(600))
        .absolute_timeout(Duration::from_secs(900))
        .build()
        .unwrap();
    let app = routes().layer(layer);
    let max_age = |r: &Reply| only_cookie(r).max_age().map(|d| d.whole_seconds());

    let r = send(&app, "POST", "/set/a/1", None, None).await;
    assert_eq!(max_age(&r), Some(600), "the idle timeout");
    let id = only_cookie(&r).value().to_string();
    let jar = Some(format!("{DEFAULT_COOKIE}={id}"));

    // Each request that uses the session slides its expiry, and the cookie follows.
    clock.advance(Duration::from_secs(100));
    let r = send(&app, "GET", "/read", jar.clone(), None).await;
    assert_eq!(only_cookie(&r).value(), id);
    assert_eq!(max_age(&r), Some(600));
    // Until the absolute deadline, 900 s after creation, comes first.
    clock.advance(Duration::from_secs(300));
    let r = send(&app, "GET", "/read", jar.clone(), None).await;
    assert_eq!(max_age(&r), Some(500));
    assert_eq!(
        client.peek(&id).await.unwrap().expires_at,
        std::time::UNIX_EPOCH + Duration::from_millis(1_750_000_000_000 + 900_000)
    );

    // A dead session's cookie is still left alone.
    clock.advance(Duration::from_secs(500));
    let r = send(&app, "GET", "/read", jar, None).await;
    assert_eq!(r.body, "gone=true\n");
    assert!(r.set_cookie.is_empty(), "{:?}", r.set_cookie);
    d.stop().await.unwrap();
}

#[tokio::test]
async fn per_session_timeouts_reach_the_server() {
    let d = daemon().await;
    let client = SessionClient::connect(&d.grpc_addr.to_string())
        .await
        .unwrap();
    let layer = SessiondLayer::builder(client)
        .idle_timeout(Duration::from_secs(7 * 60))
        .absolute_timeout(Duration::from_secs(2 * 3600))
        .build()
        .unwrap();
    let r = send(&routes().layer(layer), "POST", "/set/a/1", None, None).await;
    let id = only_cookie(&r).value().to_string();

    // The typed client does not expose the timeouts; the generated stub does.
    let mut stub = sessiond_client::pb::session_store_client::SessionStoreClient::connect(format!(
        "http://{}",
        d.grpc_addr
    ))
    .await
    .unwrap();
    let s = stub
        .get(sessiond_client::pb::GetRequest { id, peek: true })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        s.idle_timeout,
        Some(prost_types::Duration {
            seconds: 420,
            nanos: 0
        })
    );
    let lifetime = s.absolute_expires_at.unwrap().seconds - s.created_at.unwrap().seconds;
    assert_eq!(lifetime, 7200);
    d.stop().await.unwrap();
}

#[tokio::test]
async fn the_login_example_regenerates_binds_and_rejects_anonymous_requests() {
    let d = daemon().await;
    let client = SessionClient::connect(&d.grpc_addr.to_string())
        .await
        .unwrap();
    let app = login::app(client.clone());
    let jar = |id: &str| Some(format!("{DEFAULT_COOKIE}={id}"));
    let alice = Some(r#"{"user":"alice","password":"wonderland"}"#);

    // No session, then an anonymous one: 401 from the extractor.
    let r = send(&app, "GET", "/me", None, None).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = send(&app, "POST", "/cart/apple", None, None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let anon = only_cookie(&r).value().to_string();
    let r = send(&app, "GET", "/me", jar(&anon), None).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(r.set_cookie.is_empty());
    let r = send(&app, "POST", "/logout", jar(&anon), None).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(client.peek(&anon).await.is_ok(), "logout needs a login");

    // Wrong password: nothing changes.
    let wrong = Some(r#"{"user":"alice","password":"nope"}"#);
    let r = send(&app, "POST", "/login", jar(&anon), wrong).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(r.set_cookie.is_empty());
    assert_eq!(client.peek(&anon).await.unwrap().user_id, None);

    // Login: a new ID bound to alice, the old one dead, the cart carried.
    let r = send(&app, "POST", "/login", jar(&anon), alice).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let id = only_cookie(&r).value().to_string();
    assert_ne!(id, anon);
    assert_eq!(client.peek(&anon).await, Err(Error::NotFound));
    assert_eq!(
        client.peek(&id).await.unwrap().user_id.as_deref(),
        Some("alice")
    );
    let r = send(&app, "GET", "/me", jar(&id), None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body, r#"{"user":"alice","cart":{"items":["apple"]}}"#);
    let r = send(&app, "GET", "/me", jar(&anon), None).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "the pre-login ID");

    // Logout: the session ends, the cookie is cleared, and /me is 401 again.
    let r = send(&app, "POST", "/logout", jar(&id), None).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert_eq!(only_cookie(&r).value(), "");
    let r = send(&app, "GET", "/me", jar(&id), None).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    d.stop().await.unwrap();
}

#[tokio::test]
async fn concurrent_typed_modifies_lose_no_add() {
    let d = daemon().await;
    let client = SessionClient::connect(&d.grpc_addr.to_string())
        .await
        .unwrap();
    let app = login::app(client.clone());
    let r = send(&app, "POST", "/cart/first", None, None).await;
    let id = only_cookie(&r).value().to_string();

    // Eight tabs add at once; each add is a compare-and-set on the typed cart.
    let mut tabs = tokio::task::JoinSet::new();
    for tab in 0..8 {
        let (app, jar) = (app.clone(), Some(format!("{DEFAULT_COOKIE}={id}")));
        tabs.spawn(async move {
            send(&app, "POST", &format!("/cart/tab{tab}"), jar, None)
                .await
                .status
        });
    }
    while let Some(status) = tabs.join_next().await {
        assert_eq!(status.unwrap(), StatusCode::OK);
    }
    let stored = client.peek(&id).await.unwrap();
    let cart: login::Cart = serde_json::from_slice(&stored.attributes["cart"]).unwrap();
    let mut items = cart.items;
    items.sort();
    let mut want: Vec<String> = (0..8).map(|t| format!("tab{t}")).collect();
    want.insert(0, "first".into());
    want.sort();
    assert_eq!(items, want);

    // A value that does not decode stops the change before anything is written.
    let before = client.peek(&id).await.unwrap().version;
    client
        .update(&id, [("cart", "not json")], [] as [&str; 0], None)
        .await
        .unwrap();
    let r = send(
        &app,
        "POST",
        "/cart/more",
        Some(format!("{DEFAULT_COOKIE}={id}")),
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(client.peek(&id).await.unwrap().version, before + 1);
    d.stop().await.unwrap();
}

#[tokio::test]
async fn a_malformed_cookie_names_no_session_instead_of_failing_every_request() {
    let d = daemon().await;
    let client = SessionClient::connect(&d.grpc_addr.to_string())
        .await
        .unwrap();
    let app = app(client.clone());
    for garbage in ["garbage", "a%20b", &"x".repeat(43)] {
        let r = call(&app, "GET", "/read", Some(garbage)).await;
        assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "gone=true\n"));
        assert_eq!(r.cookie, CookieChange::Untouched);
        let r = call(&app, "POST", "/logout", Some(garbage)).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        assert_eq!(r.cookie, CookieChange::Untouched);
        // A write starts a session and replaces the cookie.
        let r = call(&app, "POST", "/set/theme/dark", Some(garbage)).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        let CookieChange::Set(id) = r.cookie else {
            panic!("{:?}", r.cookie)
        };
        assert_eq!(client.peek(&id).await.unwrap().text("theme"), Some("dark"));
    }
    d.stop().await.unwrap();
}

/// A codec of our own: JSON behind a version tag, as an app that may change formats would.
#[derive(Clone, Default)]
struct Tagged;

impl Codec for Tagged {
    fn encode<T: Serialize + ?Sized>(&self, value: &T) -> Result<bytes::Bytes, CodecError> {
        let mut out = b"v1:".to_vec();
        out.extend(serde_json::to_vec(value)?);
        Ok(out.into())
    }

    fn decode<T: serde::de::DeserializeOwned>(&self, bytes: &[u8]) -> Result<T, CodecError> {
        let json = bytes.strip_prefix(b"v1:").ok_or("no v1: tag")?;
        Ok(serde_json::from_slice(json)?)
    }
}

#[tokio::test]
async fn a_codec_of_our_own_stores_the_values_and_types_the_extractor() {
    let d = daemon().await;
    let client = SessionClient::connect(&d.grpc_addr.to_string())
        .await
        .unwrap();
    let layer = SessiondLayer::builder(client.clone())
        .codec(Tagged)
        .build()
        .unwrap();
    let app = Router::new()
        .route(
            "/count",
            post(|s: Session<Tagged>| async move {
                let n = s.get::<u32>("n").await?.unwrap_or(0) + 1;
                s.insert("n", &n).await?;
                Ok::<_, SessionError>(n.to_string())
            }),
        )
        // The default-codec extractor under a Tagged layer is a mistake the app hears of.
        .route("/json", get(|_: Session| async { "unreachable" }))
        .layer(layer);

    let r = send(&app, "POST", "/count", None, None).await;
    let id = only_cookie(&r).value().to_string();
    let r = send(
        &app,
        "POST",
        "/count",
        Some(format!("{DEFAULT_COOKIE}={id}")),
        None,
    )
    .await;
    assert_eq!(r.body, "2");
    assert_eq!(client.peek(&id).await.unwrap().text("n"), Some("v1:2"));

    let r = send(&app, "GET", "/json", None, None).await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(r.body.contains("SessiondLayer"), "{}", r.body);
    d.stop().await.unwrap();
}
