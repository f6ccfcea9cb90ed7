//! The typed client against a real sessiond on an ephemeral loopback port.

use sessiond::clock::Clock;
use sessiond::config::{Config, TenantConfig};
use sessiond::server::Daemon;
use sessiond_client::{ClientOptions, Error, NewSession, SessionClient, Transport};

async fn daemon(tenants: Vec<TenantConfig>) -> Daemon {
    let config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_listen: "127.0.0.1:0".parse().unwrap(),
        persist: false,
        tenants,
        ..Config::default()
    };
    Daemon::start(config, Clock::manual(1_750_000_000_000))
        .await
        .unwrap()
}

#[tokio::test]
async fn every_call_and_its_typed_errors_pipelined() {
    every_call_and_its_typed_errors(Transport::Pipelined).await;
}

#[tokio::test]
async fn every_call_and_its_typed_errors_unary() {
    every_call_and_its_typed_errors(Transport::Unary).await;
}

async fn every_call_and_its_typed_errors(transport: Transport) {
    let d = daemon(vec![]).await;
    let c = SessionClient::connect_with(
        &d.grpc_addr.to_string(),
        ClientOptions {
            transport,
            ..ClientOptions::default()
        },
    )
    .await
    .unwrap();
    let s = c
        .create(NewSession {
            ip: "10.0.0.1".into(),
            user_agent: "test".into(),
            ..NewSession::default().attribute("cart:apple", "1")
        })
        .await
        .unwrap();
    assert_eq!(s.text("cart:apple"), Some("1"));
    assert_eq!(s.user_id, None);
    assert_eq!(c.get(&s.id).await.unwrap().version, 1);

    // Compare-and-set: the right version wins, a stale one is a typed conflict.
    let s2 = c
        .update(&s.id, [("theme", "dark")], ["cart:apple"], Some(1))
        .await
        .unwrap();
    assert_eq!(s2.version, 2);
    assert!(!s2.attributes.contains_key("cart:apple"));
    let stale = c
        .update(&s.id, [("x", "y")], [] as [&str; 0], Some(1))
        .await;
    assert_eq!(stale, Err(Error::Conflict { current_version: 2 }));

    // Login: a new ID for the user, the old one NOT_FOUND.
    let logged = c.regenerate(&s.id, Some("alice")).await.unwrap();
    assert_ne!(logged.id, s.id);
    assert_eq!(logged.user_id.as_deref(), Some("alice"));
    assert_eq!(c.peek(&s.id).await, Err(Error::NotFound));
    assert_eq!(logged.text("theme"), Some("dark"));

    let phone = c
        .create(NewSession {
            user_id: Some("alice".into()),
            ..NewSession::default()
        })
        .await
        .unwrap();
    let devices = c.list_user_sessions("alice").await.unwrap();
    assert_eq!(devices.len(), 2);
    assert!(devices
        .iter()
        .any(|d| d.ip == "10.0.0.1" && d.user_agent == "test"));
    assert_eq!(
        c.destroy_user_sessions("alice", Some(&phone.id)).await,
        Ok(1)
    );
    assert!(c.touch(&phone.id).await.is_ok());
    let many = c
        .get_many(&[&phone.id, &s.id, "not-an-id"], true)
        .await
        .unwrap();
    assert_eq!(
        many[0].as_ref().map(|s| s.id.as_str()),
        Ok(phone.id.as_str())
    );
    assert_eq!(many[1], Err(Error::NotFound));
    assert!(matches!(&many[2], Err(Error::InvalidArgument(_))));
    assert_eq!(c.destroy(&phone.id).await, Ok(true));
    assert_eq!(c.destroy(&phone.id).await, Ok(false));
    assert!(matches!(
        c.get("not-an-id").await,
        Err(Error::InvalidArgument(m)) if m.contains("session id must be 43 characters")
    ));
    d.stop().await.unwrap();
}

#[tokio::test]
async fn a_tenant_token_is_sent_and_a_missing_one_is_a_typed_error() {
    let hex: String = ring::digest::digest(&ring::digest::SHA256, b"shop-token")
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let d = daemon(vec![TenantConfig {
        name: "shop".into(),
        token_sha256: hex,
        ..TenantConfig::default()
    }])
    .await;
    let addr = d.grpc_addr.to_string();
    let with = SessionClient::connect_with(
        &addr,
        ClientOptions {
            token: Some("shop-token".into()),
            ..ClientOptions::default()
        },
    )
    .await
    .unwrap();
    with.create(NewSession::default()).await.unwrap();
    for transport in [Transport::Pipelined, Transport::Unary] {
        let options = ClientOptions {
            transport,
            ..ClientOptions::default()
        };
        let without = SessionClient::connect_with(&addr, options).await.unwrap();
        assert!(
            matches!(
                without.create(NewSession::default()).await,
                Err(Error::Unauthenticated(_))
            ),
            "{transport:?}"
        );
    }
    d.stop().await.unwrap();
}

#[tokio::test]
async fn destroy_all_sessions_with_the_confirmation_ends_every_session() {
    let d = daemon(vec![]).await;
    let c = SessionClient::connect(&d.grpc_addr.to_string())
        .await
        .unwrap();
    let s = c.create(NewSession::default()).await.unwrap();
    let r = sessiond_client::pb::session_store_client::SessionStoreClient::with_interceptor(
        sessiond_client::channel(&d.grpc_addr.to_string(), &ClientOptions::default())
            .await
            .unwrap(),
        sessiond_client::Bearer::new(None).unwrap(),
    )
    .destroy_all_sessions(sessiond_client::pb::DestroyAllSessionsRequest {
        confirm: sessiond_client::DESTROY_ALL_CONFIRMATION.into(),
    })
    .await
    .unwrap();
    assert_eq!(r.into_inner().destroyed, 1);
    assert_eq!(c.peek(&s.id).await, Err(Error::NotFound));
    d.stop().await.unwrap();
}

#[tokio::test]
async fn a_create_sent_again_with_its_idempotency_key_returns_the_same_session() {
    let d = daemon(vec![]).await;
    let c = SessionClient::connect(&d.grpc_addr.to_string())
        .await
        .unwrap();
    let new = NewSession::default()
        .attribute("cart", "apple")
        .idempotency_key("checkout-5d1e");
    let first = c.create(new.clone()).await.unwrap();
    let again = c.create(new).await.unwrap();
    assert_eq!(again.id, first.id);
    let other = c.create(NewSession::default()).await.unwrap();
    assert_ne!(other.id, first.id);
    d.stop().await.unwrap();
}
