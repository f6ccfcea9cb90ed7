//! TLS and mutual TLS over real connections, with certificates made in the test by rcgen.

mod common;

use common::certs::{channel, tls_config, Ca};
use sessiond::api::pb;
use sessiond::api::pb::session_store_client::SessionStoreClient;
use sessiond::config::Config;
use tonic::transport::Channel;

/// Creates a session over `channel`; the error if the connection or call fails.
async fn create(channel: Result<Channel, tonic::transport::Error>) -> Result<String, String> {
    let channel = channel.map_err(|e| format!("connect: {e}"))?;
    SessionStoreClient::new(channel)
        .create(pb::CreateRequest::default())
        .await
        .map(|r| r.into_inner().id)
        .map_err(|e| format!("call: {e}"))
}

#[tokio::test]
async fn tls_serves_only_clients_that_speak_tls() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("server ca");
    let srv = common::TestServer::with_config(tls_config(dir.path(), &ca, None)).await;
    let addr = srv.daemon.grpc_addr;

    create(channel(addr, &ca, None).await).await.unwrap();
    // A plaintext client gets nowhere.
    let plain = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await;
    assert!(create(plain).await.is_err());
    // A client that trusts another CA refuses the server.
    assert!(create(channel(addr, &Ca::new("other"), None).await)
        .await
        .is_err());
    srv.stop().await;
}

#[tokio::test]
async fn mutual_tls_refuses_missing_and_foreign_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let server_ca = Ca::new("server ca");
    let client_ca = Ca::new("client ca");
    let srv =
        common::TestServer::with_config(tls_config(dir.path(), &server_ca, Some(&client_ca))).await;
    let addr = srv.daemon.grpc_addr;

    let good = client_ca.issue("app-server-1");
    create(channel(addr, &server_ca, Some(&good)).await)
        .await
        .unwrap();
    assert!(create(channel(addr, &server_ca, None).await).await.is_err());
    let rogue = Ca::new("rogue").issue("app-server-1");
    assert!(create(channel(addr, &server_ca, Some(&rogue)).await)
        .await
        .is_err());
    // The refused handshakes did not hurt anyone else.
    create(channel(addr, &server_ca, Some(&good)).await)
        .await
        .unwrap();
    srv.stop().await;
}

#[tokio::test]
async fn certificates_reload_without_dropping_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let old_ca = Ca::new("old ca");
    let config = tls_config(dir.path(), &old_ca, None);
    let (cert_path, key_path) = (config.tls_cert.clone(), config.tls_key.clone());
    let srv = common::TestServer::with_config(config).await;
    let addr = srv.daemon.grpc_addr;
    let id = create(channel(addr, &old_ca, None).await).await.unwrap();

    // A broken rotation is refused and the old certificate stays in service.
    std::fs::write(&key_path, "not a key").unwrap();
    let err = srv.daemon.reload_tls().unwrap_err();
    assert!(err.to_string().contains("tls_key"), "{err}");
    create(channel(addr, &old_ca, None).await).await.unwrap();

    let new_ca = Ca::new("new ca");
    let (cert, key) = new_ca.issue("localhost");
    std::fs::write(&cert_path, cert).unwrap();
    std::fs::write(&key_path, key).unwrap();
    srv.daemon.reload_tls().unwrap();

    let fresh = channel(addr, &new_ca, None).await.unwrap();
    let got = SessionStoreClient::new(fresh)
        .get(pb::GetRequest {
            id: id.clone(),
            peek: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.id, id, "the session survived the reload");
    assert!(create(channel(addr, &old_ca, None).await).await.is_err());
    srv.stop().await;
}

#[tokio::test]
async fn unreadable_certificate_files_stop_start_up_naming_the_file() {
    let config = Config {
        tls_cert: "/nonexistent/cert.pem".into(),
        tls_key: "/nonexistent/key.pem".into(),
        ..common::test_config()
    };
    let err = sessiond::server::Daemon::start(config, sessiond::clock::Clock::system())
        .await
        .err()
        .expect("start-up should fail");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("tls_cert") && msg.contains("/nonexistent/cert.pem"),
        "{msg}"
    );
}
