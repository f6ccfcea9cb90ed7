//! Tests of the real `sessiond` binary as a child process: start-up, configuration errors,
//! SIGTERM, and that no session ID or token ever reaches the logs.

mod common;

use std::process::Command;

use common::proc::{spawn as spawn_in, Proc};
use common::{bearer, channel, create, regenerate, token_tenant};
use sessiond::api::pb;
use sessiond::api::pb::session_store_client::SessionStoreClient;

/// Starts the binary in an empty working directory (its data lands there), keeping the
/// directory alive as long as the process.
fn spawn(env: &[(&str, &str)]) -> (Proc, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let p = spawn_in(dir.path(), &[], env)
        .unwrap_or_else(|out| panic!("sessiond did not start:\n{out}"));
    (p, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_shuts_down_cleanly_with_exit_0() {
    let (p, _dir) = spawn(&[]);
    let mut c = common::connect(p.url()).await;
    create(&mut c, pb::CreateRequest::default()).await;
    // `terminate` blocks this thread; the client must not hold a connection the server
    // would wait for.
    drop(c);
    let (status, out) = p.terminate();
    assert!(status.success(), "exit {status:?}\n{out}");
    for step in [
        "NOT_SERVING",
        "draining",
        "gRPC drained",
        "gRPC connections closed",
        "reapers and snapshots stopped",
        "shutdown: complete",
    ] {
        assert!(out.contains(step), "missing {step:?} in\n{out}");
    }
}

#[test]
fn a_bad_setting_exits_non_zero_naming_it() {
    for (var, value, named) in [
        ("SESSIOND_SHARDS", "3", "shards"),
        ("SESSIOND_IDLE_TIMEOUT", "forever", "IDLE_TIMEOUT"),
        ("SESSIOND_MAX_ATTRIBUTES", "0", "max_attributes"),
        // Protected mode: a public plaintext listener needs an explicit opt-in.
        (
            "SESSIOND_LISTEN",
            "0.0.0.0:0",
            "refusing to listen on 0.0.0.0:0 without TLS",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_sessiond"))
            .env(var, value)
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(!out.status.success(), "{var}={value} was accepted");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(named), "{var}: {stderr}");
    }
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sessiond"))
        .args(["--config", "nope.toml"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope.toml"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_session_id_or_token_reaches_the_logs_even_at_trace_level() {
    // One tenant, so requests carry a bearer token the logs must not show either.
    const TOKEN: &str = "tok-SECRET-1234567890";
    let dir = tempfile::tempdir().unwrap();
    let hash = common::sha256_hex(TOKEN);
    let config = dir.path().join("tenants.toml");
    std::fs::write(
        &config,
        format!("[[tenants]]\nname = \"shop\"\ntoken_sha256 = \"{hash}\"\n"),
    )
    .unwrap();
    let p = spawn_in(
        dir.path(),
        &["--config", config.to_str().unwrap()],
        &[("RUST_LOG", "trace")],
    )
    .unwrap_or_else(|out| panic!("sessiond did not start:\n{out}"));
    let channel = channel(p.url()).await;
    let bearer: tonic::metadata::MetadataValue<_> = format!("Bearer {TOKEN}").parse().unwrap();
    let mut c =
        SessionStoreClient::with_interceptor(channel.clone(), move |mut r: tonic::Request<()>| {
            r.metadata_mut().insert("authorization", bearer.clone());
            Ok(r)
        });
    // A wrong token is refused, and not logged either.
    let wrong: tonic::metadata::MetadataValue<_> = "Bearer tok-WRONG-0987654321".parse().unwrap();
    let mut w = SessionStoreClient::with_interceptor(channel, move |mut r: tonic::Request<()>| {
        r.metadata_mut().insert("authorization", wrong.clone());
        Ok(r)
    });
    let e = w.create(pb::CreateRequest::default()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    let mut ids = Vec::new();
    for i in 0..5 {
        let s = create(
            &mut c,
            pb::CreateRequest {
                user_id: "u".into(),
                attributes: [(
                    "secret".to_string(),
                    bytes::Bytes::from(format!("value-{i}")),
                )]
                .into(),
                ..Default::default()
            },
        )
        .await;
        c.get(pb::GetRequest {
            id: s.id.clone(),
            peek: false,
        })
        .await
        .unwrap();
        let r = regenerate(&mut c, &s.id).await;
        let _ = c
            .get(pb::GetRequest {
                id: s.id.clone(),
                peek: false,
            })
            .await;
        c.destroy(pb::DestroyRequest { id: r.id.clone() })
            .await
            .unwrap();
        ids.push(s.id);
        ids.push(r.id);
    }
    drop((c, w));
    let (status, out) = p.terminate();
    assert!(status.success());
    assert!(out.len() > 1000, "trace logging produced almost nothing");
    for id in &ids {
        assert!(!out.contains(id.as_str()), "a session ID is in the logs");
    }
    assert!(!out.contains("value-"), "an attribute value is in the logs");
    assert!(!out.contains("tok-"), "a bearer token is in the logs");
    assert!(!out.contains(&hash), "a token hash is in the logs");
}

/// Starts a Create whose request body never ends, so the server holds it in flight until the
/// connection goes away; the task ends with the call's outcome. A call shed because a probe
/// held the one slot at that moment is sent again.
async fn hold_a_request(
    channel: tonic::transport::Channel,
) -> tokio::task::JoinHandle<Result<pb::Session, tonic::Status>> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    tokio::spawn(async move {
        let path = format!("/{}/Create", sessiond::server::SERVICE_NAME);
        loop {
            let r = grpc
                .client_streaming(
                    tonic::Request::new(tokio_stream::pending::<pb::CreateRequest>()),
                    path.parse().unwrap(),
                    tonic_prost::ProstCodec::<pb::CreateRequest, pb::Session>::default(),
                )
                .await
                .map(|r| r.into_inner());
            match r {
                Err(e) if e.code() == tonic::Code::ResourceExhausted => {
                    tokio::task::yield_now().await;
                    if grpc.ready().await.is_err() {
                        return Err(e);
                    }
                }
                other => return other,
            }
        }
    })
}

/// Waits until the one request slot (`max_concurrent_requests = 1`) is taken, which proves
/// the held request reached the server: a health check is then shed.
async fn until_the_slot_is_taken(url: String) {
    use tonic_health::pb::health_client::HealthClient;
    let mut health = HealthClient::new(channel(url).await);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let shed = health
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .is_err_and(|e| e.code() == tonic::Code::ResourceExhausted);
        if shed {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the held request never arrived"
        );
        tokio::task::yield_now().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_still_busy_after_the_drain_are_closed_before_shutdown_ends() {
    use std::time::Duration;
    let srv = common::TestServer::with_config(sessiond::config::Config {
        shutdown_grace: Duration::from_millis(200),
        request_timeout: Duration::from_secs(600),
        max_concurrent_requests: 1,
        ..common::test_config()
    })
    .await;
    let held = hold_a_request(srv.channel().await).await;
    until_the_slot_is_taken(srv.url()).await;
    // The drain cannot finish; past shutdown_grace the connection must be cut, and shutdown
    // (which closes the logs) returns only once it is gone.
    srv.daemon.stop().await.unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(10), held)
        .await
        .expect("the connection outlived the shutdown")
        .unwrap();
    assert!(outcome.is_err(), "{outcome:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_cuts_busy_connections_before_the_log_closes_and_exits() {
    let (p, _dir) = spawn(&[
        ("SESSIOND_SHUTDOWN_GRACE", "200ms"),
        ("SESSIOND_REQUEST_TIMEOUT", "10m"),
        ("SESSIOND_MAX_CONCURRENT_REQUESTS", "1"),
    ]);
    let held = hold_a_request(channel(p.url()).await).await;
    until_the_slot_is_taken(p.url()).await;
    // `terminate` blocks this thread; the held call runs on the other worker.
    let (status, out) = p.terminate();
    assert!(status.success(), "exit {status:?}\n{out}");
    let outcome = tokio::time::timeout(std::time::Duration::from_secs(10), held)
        .await
        .expect("the client never saw its connection close")
        .unwrap();
    assert!(outcome.is_err(), "{outcome:?}");
    let at = |step: &str| {
        out.find(step)
            .unwrap_or_else(|| panic!("missing {step:?} in\n{out}"))
    };
    assert!(
        at("drain deadline passed") < at("gRPC connections closed")
            && at("gRPC connections closed") < at("log flushed and synced"),
        "connections must be closed after the drain and before the log:\n{out}"
    );
}

/// Runs the binary with `env` (and its own `--admin-listen`) until it exits; (success, stderr).
fn start_up(dir: &std::path::Path, env: &[(&str, &str)]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sessiond"))
        .args(["--admin-listen", "127.0.0.1:0"])
        .envs(env.iter().copied())
        .current_dir(dir)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn protected_mode_refuses_a_public_listener_naming_what_is_missing() {
    use common::certs::{write, Ca};
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = Ca::new("server ca").issue("localhost");
    let cert = write(dir.path(), "server.pem", &cert);
    let key = write(dir.path(), "server.key", &key);
    let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let tenants = dir.path().join("tenants.toml");
    std::fs::write(
        &tenants,
        format!(
            "[[tenants]]\nname = \"shop\"\ntoken_sha256 = \"{}\"\n",
            common::sha256_hex("t")
        ),
    )
    .unwrap();
    let public = ("SESSIOND_LISTEN", "0.0.0.0:0");

    // TLS without client authentication: encrypted, but open to anyone who connects.
    let (ok, err) = start_up(
        dir.path(),
        &[
            public,
            ("SESSIOND_TLS_CERT", cert),
            ("SESSIOND_TLS_KEY", key),
        ],
    );
    assert!(!ok, "TLS alone was accepted");
    assert!(err.contains("without client authentication"), "{err}");
    assert!(
        err.contains("tls_client_ca") && err.contains("[[tenants]]"),
        "{err}"
    );

    // Neither.
    let (ok, err) = start_up(dir.path(), &[public]);
    assert!(!ok, "a public plaintext listener was accepted");
    assert!(
        err.contains("without TLS or client authentication"),
        "{err}"
    );
    assert!(
        err.contains("tls_cert") && err.contains("tls_client_ca"),
        "{err}"
    );

    // Tenant tokens without TLS: they would cross the network in clear.
    let out = Command::new(env!("CARGO_BIN_EXE_sessiond"))
        .args(["--admin-listen", "127.0.0.1:0", "--config"])
        .arg(&tenants)
        .env(public.0, public.1)
        .current_dir(dir.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "tokens over plaintext were accepted");
    assert!(err.contains("without TLS:"), "{err}");
    assert!(err.contains("tls_cert and tls_key"), "{err}");
}

#[tokio::test]
async fn protected_mode_accepts_a_public_listener_with_tls_and_client_authentication() {
    use common::certs::{channel, tls_config, Ca};
    use sessiond::config::Config;
    let dir = tempfile::tempdir().unwrap();
    let server_ca = Ca::new("server ca");
    let client_ca = Ca::new("client ca");
    let public = |c: Config| Config {
        listen: "0.0.0.0:0".parse().unwrap(),
        ..c
    };
    let local = |srv: &common::TestServer| {
        std::net::SocketAddr::from(([127, 0, 0, 1], srv.daemon.grpc_addr.port()))
    };

    // TLS with a client CA: mutual TLS.
    let srv = common::TestServer::with_config(public(tls_config(
        dir.path(),
        &server_ca,
        Some(&client_ca),
    )))
    .await;
    let identity = client_ca.issue("app");
    SessionStoreClient::new(
        channel(local(&srv), &server_ca, Some(&identity))
            .await
            .unwrap(),
    )
    .create(pb::CreateRequest::default())
    .await
    .unwrap();
    srv.stop().await;

    // TLS with tenants that present tokens.
    let srv = common::TestServer::with_config(public(Config {
        tenants: vec![token_tenant("shop", "shop-token")],
        ..tls_config(dir.path(), &server_ca, None)
    }))
    .await;
    let req = bearer("shop-token", pb::CreateRequest::default());
    SessionStoreClient::new(channel(local(&srv), &server_ca, None).await.unwrap())
        .create(req)
        .await
        .unwrap();
    srv.stop().await;

    // Neither, with the explicit opt-out.
    let srv = common::TestServer::with_config(public(Config {
        insecure_listen: true,
        ..common::test_config()
    }))
    .await;
    common::connect(format!("http://{}", local(&srv)))
        .await
        .create(pb::CreateRequest::default())
        .await
        .unwrap();
    srv.stop().await;
}
