//! Tenants, quotas and hostile clients, over real TLS and mutual TLS with certificates made
//! here by rcgen.

mod common;

use std::time::Duration;

use common::certs::{channel, tls_config, Ca};
use common::{bearer, create, token_tenant};
use sessiond::api::pb;
use sessiond::api::pb::session_store_client::SessionStoreClient;
use sessiond::config::{Config, TenantConfig};
use sessiond::store::{LimitOverrides, PerUserPolicy};
use tonic::transport::Channel;
use tonic::Code;

fn create_for(user: &str) -> pb::CreateRequest {
    pb::CreateRequest {
        user_id: user.into(),
        ..Default::default()
    }
}

async fn tls_client(addr: std::net::SocketAddr, ca: &Ca) -> SessionStoreClient<Channel> {
    SessionStoreClient::new(channel(addr, ca, None).await.unwrap())
}

#[tokio::test]
async fn tenants_by_token_never_see_each_others_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("server ca");
    let srv = common::TestServer::with_config(Config {
        tenants: vec![
            token_tenant("shop", "shop-token"),
            token_tenant("blog", "blog-token"),
        ],
        ..tls_config(dir.path(), &ca, None)
    })
    .await;
    let mut c = tls_client(srv.daemon.grpc_addr, &ca).await;

    let a = create(&mut c, bearer("shop-token", create_for("alice"))).await;
    // The same ID is unknown to the other tenant, for every kind of call.
    let get = |t: &str| {
        bearer(
            t,
            pb::GetRequest {
                id: a.id.clone(),
                peek: true,
            },
        )
    };
    assert_eq!(
        c.get(get("blog-token")).await.unwrap_err().code(),
        Code::NotFound
    );
    let destroyed = c
        .destroy(bearer(
            "blog-token",
            pb::DestroyRequest { id: a.id.clone() },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(!destroyed.existed);
    c.get(get("shop-token")).await.unwrap();
    // Same user name in both tenants: two separate user indexes.
    create(&mut c, bearer("blog-token", create_for("alice"))).await;
    let list = |t: &str| {
        bearer(
            t,
            pb::ListUserSessionsRequest {
                user_id: "alice".into(),
                include_attributes: false,
            },
        )
    };
    let shop = c.list_user_sessions(list("shop-token")).await.unwrap();
    assert_eq!(shop.into_inner().sessions.len(), 1);
    let killed = c
        .destroy_user_sessions(bearer(
            "blog-token",
            pb::DestroyUserSessionsRequest {
                user_id: "alice".into(),
                except_id: String::new(),
            },
        ))
        .await
        .unwrap();
    assert_eq!(killed.into_inner().destroyed, 1);
    c.get(get("shop-token")).await.unwrap();

    // No token, a wrong one, or a malformed header: UNAUTHENTICATED, saying what is wrong.
    let e = c.create(create_for("x")).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(
        e.message().contains("credentials required"),
        "{}",
        e.message()
    );
    let e = c
        .create(bearer("shop-tokem", create_for("x")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(!e.message().contains("shop-tokem"), "{}", e.message());

    // Per-tenant metrics.
    let created = |t: &str| format!("sessiond_sessions_created_total{{tenant=\"{t}\"}}");
    assert_eq!(srv.metric(&created("shop")).await, 1.0);
    assert_eq!(srv.metric(&created("blog")).await, 1.0);
    assert_eq!(
        srv.metric("sessiond_unauthenticated_requests_total").await,
        2.0
    );
    srv.stop().await;
}

#[tokio::test]
async fn a_client_certificate_subject_picks_the_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let server_ca = Ca::new("server ca");
    let client_ca = Ca::new("client ca");
    let srv = common::TestServer::with_config(Config {
        tenants: vec![
            TenantConfig {
                name: "shop".into(),
                client_subject: "CN=shop-app".into(),
                ..TenantConfig::default()
            },
            TenantConfig {
                name: "blog".into(),
                client_subject: "blog-app".into(),
                ..TenantConfig::default()
            },
        ],
        ..tls_config(dir.path(), &server_ca, Some(&client_ca))
    })
    .await;
    let addr = srv.daemon.grpc_addr;
    let as_app = |name: &str| client_ca.issue(name);
    let shop_id = {
        let ch = channel(addr, &server_ca, Some(&as_app("shop-app")))
            .await
            .unwrap();
        let mut shop = SessionStoreClient::new(ch);
        create(&mut shop, create_for("alice")).await.id
    };
    let ch = channel(addr, &server_ca, Some(&as_app("blog-app")))
        .await
        .unwrap();
    let mut blog = SessionStoreClient::new(ch);
    let e = blog
        .get(pb::GetRequest {
            id: shop_id,
            peek: true,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    // A valid certificate of no tenant passes the handshake but reaches no store.
    let ch = channel(addr, &server_ca, Some(&as_app("stranger")))
        .await
        .unwrap();
    let e = SessionStoreClient::new(ch)
        .create(create_for("x"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("certificate"), "{}", e.message());
    srv.stop().await;
}

#[tokio::test]
async fn tenant_quotas_per_user_limit_under_both_policies_and_create_rate() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("server ca");
    let srv = common::TestServer::with_config(Config {
        tenants: vec![
            TenantConfig {
                limits: LimitOverrides {
                    max_sessions_per_user: Some(2),
                    per_user_policy: Some(PerUserPolicy::Deny),
                    ..LimitOverrides::default()
                },
                ..token_tenant("strict", "strict-token")
            },
            TenantConfig {
                limits: LimitOverrides {
                    max_sessions_per_user: Some(2),
                    per_user_policy: Some(PerUserPolicy::EvictOldest),
                    create_rate: Some(1),
                    create_burst: Some(4),
                    ..LimitOverrides::default()
                },
                ..token_tenant("lenient", "lenient-token")
            },
        ],
        ..tls_config(dir.path(), &ca, None)
    })
    .await;
    let mut c = tls_client(srv.daemon.grpc_addr, &ca).await;

    // deny: the third session of a user is refused, naming the setting.
    for _ in 0..2 {
        create(&mut c, bearer("strict-token", create_for("u"))).await;
    }
    let e = c
        .create(bearer("strict-token", create_for("u")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(
        e.message().contains("max_sessions_per_user"),
        "{}",
        e.message()
    );

    // evict-oldest: the third ends the first.
    let mut ids = Vec::new();
    for _ in 0..3 {
        let s = create(&mut c, bearer("lenient-token", create_for("u"))).await;
        ids.push(s.id);
        srv.advance(Duration::from_millis(1));
    }
    let gone = c
        .get(bearer(
            "lenient-token",
            pb::GetRequest {
                id: ids[0].clone(),
                peek: true,
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);

    // create_rate 1/s with a burst of 4: the fifth create within the same instant is refused.
    create(&mut c, bearer("lenient-token", create_for("v"))).await;
    let e = c
        .create(bearer("lenient-token", create_for("v")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(e.message().contains("create_rate"), "{}", e.message());
    // The other tenant's bucket is its own.
    create(&mut c, bearer("strict-token", create_for("w"))).await;
    // A second on the test clock refills one token.
    srv.advance(Duration::from_secs(1));
    create(&mut c, bearer("lenient-token", create_for("v"))).await;
    srv.stop().await;
}

#[tokio::test]
async fn the_memory_cap_evicts_anonymous_sessions_first() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("server ca");
    let mut config = tls_config(dir.path(), &ca, None);
    config.limits.max_memory_bytes = 3 * 1024;
    let srv = common::TestServer::with_config(config).await;
    let mut c = tls_client(srv.daemon.grpc_addr, &ca).await;
    let big = |user: &str| pb::CreateRequest {
        user_id: user.into(),
        attributes: [("blob".to_string(), vec![b'v'; 500].into())].into(),
        ..Default::default()
    };
    let mut made = Vec::new();
    for user in ["alice", "", "bob", ""] {
        made.push(create(&mut c, big(user)).await.id);
        srv.advance(Duration::from_secs(1));
    }
    create(&mut c, big("carol")).await;
    let alive = |id: &String| pb::GetRequest {
        id: id.clone(),
        peek: true,
    };
    // The older anonymous session went; every authenticated one stayed.
    assert_eq!(
        c.get(alive(&made[1])).await.unwrap_err().code(),
        Code::NotFound
    );
    for id in [&made[0], &made[2], &made[3]] {
        c.get(alive(id)).await.unwrap();
    }
    assert_eq!(srv.metric("sessiond_sessions_evicted_total").await, 1.0);
    srv.stop().await;
}

#[tokio::test]
async fn a_connection_without_credentials_gets_a_small_budget_then_is_closed() {
    let srv = common::TestServer::with_config(Config {
        tenants: vec![token_tenant("shop", "shop-token")],
        unauthenticated_requests: 3,
        ..common::test_config()
    })
    .await;
    let mut c = srv.client().await;
    // Health checks are free: a load balancer's checker is never cut off.
    let mut health = tonic_health::pb::health_client::HealthClient::new(srv.channel().await);
    for _ in 0..10 {
        health
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .unwrap();
    }
    for _ in 0..3 {
        let e = c.create(create_for("x")).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated);
    }
    // The fourth is answered by closing the connection.
    c.create(create_for("x")).await.unwrap_err();
    assert_eq!(
        srv.metric("sessiond_connections_closed_unauthenticated_total")
            .await,
        1.0
    );
    // A client with credentials is served throughout.
    let mut good = srv.client().await;
    create(&mut good, bearer("shop-token", create_for("y"))).await;
    srv.stop().await;
}

#[tokio::test]
async fn connections_past_max_connections_are_closed_at_once() {
    use tokio::io::AsyncReadExt;
    let srv = common::TestServer::with_config(Config {
        max_connections: 2,
        ..common::test_config()
    })
    .await;
    let addr = srv.daemon.grpc_addr;
    let mut first = srv.client().await;
    create(&mut first, create_for("a")).await;
    let idle = tokio::net::TcpStream::connect(addr).await.unwrap();
    // The third connection is accepted and closed: its first read is the end of the stream.
    let mut third = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(10), third.read(&mut buf))
        .await
        .expect("the refused connection is closed, not left hanging")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert_eq!(srv.metric("sessiond_connections_refused_total").await, 1.0);
    // The open ones are still served.
    create(&mut first, create_for("b")).await;
    drop(idle);
    srv.stop().await;
}

#[tokio::test]
async fn the_admin_port_speaks_tls_when_asked() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("server ca");
    let srv = common::TestServer::with_config(Config {
        admin_tls: true,
        ..tls_config(dir.path(), &ca, None)
    })
    .await;
    let connector = tls_connector(&ca);
    let tcp = tokio::net::TcpStream::connect(srv.daemon.admin_addr)
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    tls.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    let _ = tls.read_to_string(&mut body).await;
    assert!(body.starts_with("HTTP/1.0 200"), "{body}");
    assert!(body.contains("sessiond_sessions_active"), "{body}");
    // Plain HTTP gets no metrics from a TLS port.
    let mut plain = tokio::net::TcpStream::connect(srv.daemon.admin_addr)
        .await
        .unwrap();
    plain
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), plain.read_to_end(&mut reply)).await;
    assert!(!String::from_utf8_lossy(&reply).contains("sessiond_"));
    srv.stop().await;
}

#[tokio::test]
async fn over_mutual_tls_oversized_messages_and_stream_floods_leave_others_served() {
    let dir = tempfile::tempdir().unwrap();
    let server_ca = Ca::new("server ca");
    let client_ca = Ca::new("client ca");
    let srv = common::TestServer::with_config(Config {
        max_message_bytes: 64 * 1024,
        max_concurrent_streams: 16,
        max_concurrent_requests: 8,
        ..tls_config(dir.path(), &server_ca, Some(&client_ca))
    })
    .await;
    let addr = srv.daemon.grpc_addr;
    let identity = client_ca.issue("app-server");
    let connect = || async {
        SessionStoreClient::new(channel(addr, &server_ca, Some(&identity)).await.unwrap())
    };
    let mut c = connect().await;
    let s = create(&mut c, create_for("")).await;

    // One message past max_message_bytes: refused, and the connection goes on.
    let huge = pb::UpdateRequest {
        id: s.id.clone(),
        set: [("blob".to_string(), vec![b'x'; 200 * 1024].into())].into(),
        ..Default::default()
    };
    let e = c.update(huge).await.unwrap_err();
    assert!(
        matches!(e.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{e:?}"
    );
    let get = || pb::GetRequest {
        id: s.id.clone(),
        peek: true,
    };
    c.get(get()).await.unwrap();

    // 400 concurrent calls over 4 connections, past the stream and in-flight caps: each is
    // served, shed with RESOURCE_EXHAUSTED, or refused by HTTP/2 (REFUSED_STREAM, past
    // max_concurrent_streams, safe to retry); none hangs or breaks the server.
    let mut calls = Vec::new();
    for _ in 0..4 {
        let c = connect().await;
        for _ in 0..100 {
            let (mut c, req) = (c.clone(), get());
            calls.push(tokio::spawn(async move { c.get(req).await }));
        }
    }
    let (mut ok, mut shed) = (0, 0);
    for call in calls {
        match call.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) if e.code() == Code::ResourceExhausted => shed += 1,
            Err(e) if format!("{e:?}").contains("REFUSED_STREAM") => shed += 1,
            Err(e) => panic!("a flooded server answered {e:?}"),
        }
    }
    assert_eq!(ok + shed, 400);
    assert!(ok > 0);
    connect().await.get(get()).await.unwrap();
    srv.stop().await;
}

/// Waits until the server has closed `conn`: a read gives end-of-stream or an error (a TLS
/// stream closed without close_notify, or a reset). Panics if it stays open for `within`.
async fn closed_by_server<S: tokio::io::AsyncRead + Unpin>(conn: &mut S, within: Duration) {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 64];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, conn.read(&mut buf)).await {
            Err(_) => panic!("the server left the connection open"),
            Ok(Ok(0)) | Ok(Err(_)) => return,
            // Whatever the server said before closing (a TLS alert, an HTTP error): read on.
            Ok(Ok(_)) => continue,
        }
    }
}

/// Retries `attempt` (each on a fresh connection, each bounded) until it succeeds, panicking
/// with the last error if `within` passes first.
async fn served_within<F, Fut>(within: Duration, mut attempt: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let last = match tokio::time::timeout(Duration::from_secs(5), attempt()).await {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e,
            Err(_) => "timed out".to_string(),
        };
        assert!(
            tokio::time::Instant::now() < deadline,
            "a real client is still locked out: {last}"
        );
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn connections_that_never_speak_cannot_hold_max_connections() {
    let srv = common::TestServer::with_config(Config {
        max_connections: 8,
        handshake_timeout: Duration::from_millis(300),
        ..common::test_config()
    })
    .await;
    let addr = srv.daemon.grpc_addr;
    // Eight connections that never send a byte take every slot; one that sends half the
    // HTTP/2 preface and stops is among them.
    let mut silent = Vec::new();
    for _ in 0..7 {
        silent.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    let mut half = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut half, b"PRI * HTTP/2.0\r\n")
        .await
        .unwrap();
    silent.push(half);
    // The server closes each of them once handshake_timeout passes...
    for conn in &mut silent {
        closed_by_server(conn, Duration::from_secs(20)).await;
    }
    // ...and a real client is served again.
    let url = srv.url();
    served_within(Duration::from_secs(20), || {
        let url = url.clone();
        async move {
            let channel = Channel::from_shared(url)
                .unwrap()
                .connect()
                .await
                .map_err(|e| format!("connect: {e}"))?;
            SessionStoreClient::new(channel)
                .create(create_for("after"))
                .await
                .map(drop)
                .map_err(|e| format!("call: {e}"))
        }
    })
    .await;
    srv.stop().await;
}

#[tokio::test]
async fn over_tls_connections_that_stall_in_or_after_the_handshake_are_closed() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("server ca");
    let srv = common::TestServer::with_config(Config {
        max_connections: 8,
        handshake_timeout: Duration::from_millis(300),
        ..tls_config(dir.path(), &ca, None)
    })
    .await;
    let addr = srv.daemon.grpc_addr;
    // Four never start TLS; four finish the TLS handshake and then never send the HTTP/2
    // preface.
    let mut raw = Vec::new();
    for _ in 0..4 {
        raw.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    let connector = tls_connector(&ca);
    let mut stalled = Vec::new();
    for _ in 0..4 {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        stalled.push(connector.connect(name, tcp).await.unwrap());
    }
    for conn in &mut raw {
        closed_by_server(conn, Duration::from_secs(20)).await;
    }
    for conn in &mut stalled {
        closed_by_server(conn, Duration::from_secs(20)).await;
    }
    served_within(Duration::from_secs(20), || async {
        let channel = channel(addr, &ca, None)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        SessionStoreClient::new(channel)
            .create(create_for("after"))
            .await
            .map(drop)
            .map_err(|e| format!("call: {e}"))
    })
    .await;
    srv.stop().await;
}

/// A rustls client that trusts `ca`.
fn tls_connector(ca: &Ca) -> tokio_rustls::TlsConnector {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from_pem_slice(ca.pem.as_bytes()).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
}

/// GET `path` on the admin port: the status, or `None` if the connection was refused or cut.
async fn admin_status(addr: std::net::SocketAddr, path: &str) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut reply = Vec::new();
    s.read_to_end(&mut reply).await.ok()?;
    String::from_utf8_lossy(&reply)
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

#[tokio::test]
async fn idle_admin_connections_are_capped_and_timed_out_so_metrics_keeps_answering() {
    use tokio::io::AsyncWriteExt;
    let srv = common::TestServer::with_config(Config {
        admin_max_connections: 4,
        admin_header_read_timeout: Duration::from_millis(300),
        ..common::test_config()
    })
    .await;
    let addr = srv.daemon.admin_addr;
    // Three sockets that never send a byte and one that never finishes its headers fill the
    // cap.
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n")
        .await
        .unwrap();
    idle.push(slow);
    // Past the cap, more sockets are closed instead of piling up.
    let mut extra = Vec::new();
    for _ in 0..8 {
        extra.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    for conn in extra.iter_mut().chain(&mut idle) {
        closed_by_server(conn, Duration::from_secs(20)).await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while admin_status(addr, "/metrics").await != Some(200) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "/metrics does not answer"
        );
        tokio::task::yield_now().await;
    }
    srv.stop().await;
}
