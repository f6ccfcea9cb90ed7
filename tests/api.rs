//! Black-box tests of the gRPC API: a real server on an ephemeral port, the generated client,
//! and a manual clock for expiry.

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{attrs, bearer, create, regenerate, token_tenant, TestServer, T0};
use sessiond::api::pb;
use tonic::Code;

const MIN: Duration = Duration::from_secs(60);

fn create_req(user: &str, pairs: &[(&str, &str)]) -> pb::CreateRequest {
    pb::CreateRequest {
        user_id: user.into(),
        attributes: attrs(pairs),
        client: Some(pb::ClientInfo {
            ip: "203.0.113.7".into(),
            user_agent: "test-agent/1.0".into(),
        }),
        ..Default::default()
    }
}

fn get(id: &str, peek: bool) -> pb::GetRequest {
    pb::GetRequest {
        id: id.into(),
        peek,
    }
}

fn list(user: &str, include_attributes: bool) -> pb::ListUserSessionsRequest {
    pb::ListUserSessionsRequest {
        user_id: user.into(),
        include_attributes,
    }
}

fn set(id: &str, pairs: &[(&str, &str)]) -> pb::UpdateRequest {
    pb::UpdateRequest {
        id: id.into(),
        set: attrs(pairs),
        ..Default::default()
    }
}

#[tokio::test]
async fn every_rpc_round_trips() {
    let srv = TestServer::start().await;
    let mut c = srv.client().await;

    let s = create(&mut c, create_req("", &[("cart", "apple")])).await;
    assert_eq!(s.id.len(), 43);
    assert_eq!(s.version, 1);
    assert_eq!(s.user_id, "");
    assert_eq!(s.created_at.unwrap().seconds, (T0 / 1000) as i64);
    assert_eq!(s.expires_at.unwrap().seconds, (T0 / 1000) as i64 + 30 * 60);
    assert_eq!(
        s.absolute_expires_at.unwrap().seconds,
        (T0 / 1000) as i64 + 24 * 3600
    );
    assert_eq!(s.idle_timeout.unwrap().seconds, 30 * 60);
    assert_eq!(s.client.as_ref().unwrap().user_agent, "test-agent/1.0");

    let got = c.get(get(&s.id, false)).await.unwrap().into_inner();
    assert_eq!(got.attributes["cart"], "apple".as_bytes());

    srv.advance(MIN);
    let t = c
        .touch(pb::TouchRequest { id: s.id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(t.expires_at.unwrap().seconds, (T0 / 1000) as i64 + 31 * 60);

    let u = c
        .update(pb::UpdateRequest {
            id: s.id.clone(),
            set: attrs(&[("theme", "dark")]),
            remove: vec!["cart".into()],
            expected_version: Some(1),
            idempotency_key: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(u.version, 2);
    assert_eq!(u.attributes.len(), 1);

    let r = c
        .regenerate(pb::RegenerateRequest {
            id: s.id.clone(),
            user_id: Some("alice".into()),
            drop_attributes: false,
            idempotency_key: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(r.id, s.id);
    assert_eq!(r.user_id, "alice");
    assert_eq!(r.version, 3);
    assert_eq!(r.attributes["theme"], "dark".as_bytes());
    let err = c.get(get(&s.id, true)).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    let listed = c
        .list_user_sessions(list("alice", false))
        .await
        .unwrap()
        .into_inner()
        .sessions;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, r.id);
    assert!(listed[0].attributes.is_empty());

    let d = c
        .destroy(pb::DestroyRequest { id: r.id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert!(d.existed);
    let d = c
        .destroy(pb::DestroyRequest { id: r.id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert!(!d.existed);
    let n = c
        .destroy_user_sessions(pb::DestroyUserSessionsRequest {
            user_id: "alice".into(),
            except_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(n.destroyed, 0);
    srv.stop().await;
}

#[tokio::test]
async fn idle_and_absolute_expiry_follow_the_test_clock() {
    let srv = TestServer::start().await;
    let mut c = srv.client().await;
    let s = create(&mut c, create_req("", &[])).await;

    // Peek does not slide: 20 + 11 minutes after the last sliding access, it is dead.
    srv.advance(20 * MIN);
    c.get(get(&s.id, true)).await.unwrap();
    srv.advance(11 * MIN);
    assert_eq!(
        c.get(get(&s.id, false)).await.unwrap_err().code(),
        Code::NotFound
    );
    assert_eq!(
        c.touch(pb::TouchRequest { id: s.id.clone() })
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );

    // Sliding keeps it alive, but never past the absolute deadline.
    let s = create(
        &mut c,
        pb::CreateRequest {
            idle_timeout: Some(prost_types::Duration {
                seconds: 600,
                nanos: 0,
            }),
            absolute_timeout: Some(prost_types::Duration {
                seconds: 1500,
                nanos: 0,
            }),
            ..Default::default()
        },
    )
    .await;
    for _ in 0..2 {
        srv.advance(9 * MIN);
        c.update(set(&s.id, &[("k", "v")])).await.unwrap();
    }
    let live = c.get(get(&s.id, false)).await.unwrap().into_inner();
    assert_eq!(live.expires_at, live.absolute_expires_at);
    srv.advance(7 * MIN);
    assert_eq!(
        c.get(get(&s.id, false)).await.unwrap_err().code(),
        Code::NotFound
    );

    // The reaper frees what reads already refuse.
    assert_eq!(srv.daemon.store.stats().sessions, 2);
    srv.daemon.store.reap(100);
    assert_eq!(srv.daemon.store.stats().sessions, 0);
    srv.stop().await;
}

#[tokio::test]
async fn concurrent_partial_writes_never_lose_each_other() {
    let srv = TestServer::start().await;
    let mut c = srv.client().await;
    let s = create(&mut c, create_req("", &[])).await;
    let mut tasks = Vec::new();
    for t in 0..10 {
        let mut c = c.clone();
        let id = s.id.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..20 {
                let key = format!("item-{t}-{i}");
                c.update(set(&id, &[(&key, "1")])).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let end = c.get(get(&s.id, true)).await.unwrap().into_inner();
    assert_eq!(end.attributes.len(), 200);
    assert_eq!(end.version, 201);
    srv.stop().await;
}

#[tokio::test]
async fn a_cas_counter_raced_by_many_tasks_ends_exact() {
    let srv = TestServer::start().await;
    let mut c = srv.client().await;
    let s = create(&mut c, create_req("", &[("n", "0")])).await;
    let conflicts = Arc::new(Mutex::new(0u32));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (mut c, id, conflicts) = (c.clone(), s.id.clone(), conflicts.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..25 {
                loop {
                    let cur = c.get(get(&id, true)).await.unwrap().into_inner();
                    let n: u32 = std::str::from_utf8(&cur.attributes["n"])
                        .unwrap()
                        .parse()
                        .unwrap();
                    let next = (n + 1).to_string();
                    let req = pb::UpdateRequest {
                        expected_version: Some(cur.version),
                        ..set(&id, &[("n", &next)])
                    };
                    match c.update(req).await {
                        Ok(_) => break,
                        Err(e) if e.code() == Code::Aborted => {
                            assert!(e.message().contains("version mismatch"));
                            *conflicts.lock().unwrap() += 1;
                        }
                        Err(e) => panic!("{e}"),
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let end = c.get(get(&s.id, true)).await.unwrap().into_inner();
    assert_eq!(end.attributes["n"], "200".as_bytes());
    assert_eq!(end.version, 201);
    srv.stop().await;
}

#[tokio::test]
async fn a_lost_compare_and_set_carries_the_current_version_in_metadata_and_pipeline_errors() {
    use sessiond::api::pb::pipeline_response::Result as Res;
    use tokio_stream::StreamExt;

    let srv = TestServer::start().await;
    let mut c = srv.client().await;
    let s = create(&mut c, create_req("", &[("n", "0")])).await;
    c.update(set(&s.id, &[("n", "1")])).await.unwrap(); // version 2
    c.update(set(&s.id, &[("n", "2")])).await.unwrap(); // version 3
    let stale = pb::UpdateRequest {
        expected_version: Some(1),
        ..set(&s.id, &[("n", "9")])
    };

    let e = c.update(stale.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::Aborted);
    let header = e.metadata().get("sessiond-current-version");
    assert_eq!(header.map(|v| v.to_str().unwrap()), Some("3"), "{e:?}");
    // Other errors carry no version.
    let e = c
        .update(set(&"A".repeat(43), &[("n", "1")]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(e.metadata().get("sessiond-current-version").is_none());

    // The same mismatch in a Pipeline: a structured field of its Error.
    let ops = [
        pb::PipelineRequest {
            id: 1,
            op: Some(pb::pipeline_request::Op::Update(stale)),
        },
        pb::PipelineRequest {
            id: 2,
            op: Some(pb::pipeline_request::Op::Get(get("bad", true))),
        },
    ];
    let mut responses = c
        .pipeline(tokio_stream::iter(ops))
        .await
        .unwrap()
        .into_inner();
    let mut errors = Vec::new();
    while let Some(r) = responses.next().await {
        let r = r.unwrap();
        let Some(Res::Error(e)) = r.result else {
            panic!("{r:?}")
        };
        errors.push((r.id, e.code, e.current_version));
    }
    errors.sort();
    assert_eq!(
        errors,
        vec![
            (1, Code::Aborted as i32, Some(3)),
            (2, Code::InvalidArgument as i32, None)
        ]
    );
    let after = c.get(get(&s.id, true)).await.unwrap().into_inner();
    assert_eq!((after.version, &after.attributes["n"][..]), (3, &b"2"[..]));
    srv.stop().await;
}

#[tokio::test]
async fn regenerate_raced_by_writers_keeps_every_acknowledged_write() {
    let mut config = common::test_config();
    config.limits.max_attributes = 100_000;
    config.limits.max_session_bytes = 64 * 1024 * 1024;
    let srv = TestServer::with_config(config).await;
    let mut c = srv.client().await;
    let s = create(&mut c, create_req("bob", &[("cart", "x")])).await;
    let acked = Arc::new(Mutex::new(Vec::new()));
    let mut writers = Vec::new();
    for t in 0..6 {
        let (mut c, id, acked) = (c.clone(), s.id.clone(), acked.clone());
        writers.push(tokio::spawn(async move {
            for i in 0.. {
                let key = format!("w{t}-{i}");
                match c.update(set(&id, &[(&key, "1")])).await {
                    Ok(_) => acked.lock().unwrap().push(key),
                    Err(e) if e.code() == Code::NotFound => return,
                    Err(e) => panic!("{e}"),
                }
            }
        }));
    }
    // Regenerate once the writers are demonstrably mid-flight.
    while acked.lock().unwrap().len() < 50 {
        tokio::task::yield_now().await;
    }
    let r = regenerate(&mut c, &s.id).await;
    for w in writers {
        w.await.unwrap();
    }
    let after = c.get(get(&r.id, true)).await.unwrap().into_inner();
    let acked = acked.lock().unwrap().clone();
    for key in &acked {
        assert!(
            after.attributes.contains_key(key),
            "lost acknowledged write {key}"
        );
    }
    assert_eq!(after.attributes.len(), acked.len() + 1);
    assert_eq!(after.absolute_expires_at, s.absolute_expires_at);
    assert_eq!(
        c.get(get(&s.id, true)).await.unwrap_err().code(),
        Code::NotFound
    );
    srv.stop().await;
}

#[tokio::test]
async fn logout_everywhere_spares_only_the_callers_session() {
    let srv = TestServer::start().await;
    let mut c = srv.client().await;
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(
            create(&mut c, create_req("carol", &[("secret", "s")]))
                .await
                .id,
        );
    }
    let other = create(&mut c, create_req("dave", &[])).await;
    let listed = c
        .list_user_sessions(list("carol", true))
        .await
        .unwrap()
        .into_inner()
        .sessions;
    assert_eq!(
        listed.iter().map(|s| s.id.clone()).collect::<HashSet<_>>(),
        ids.iter().cloned().collect::<HashSet<_>>()
    );
    assert!(listed
        .iter()
        .all(|s| s.attributes["secret"] == "s".as_bytes()));

    let n = c
        .destroy_user_sessions(pb::DestroyUserSessionsRequest {
            user_id: "carol".into(),
            except_id: ids[0].clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .destroyed;
    assert_eq!(n, 3);
    c.get(get(&ids[0], true)).await.unwrap();
    for id in &ids[1..] {
        assert_eq!(
            c.get(get(id, true)).await.unwrap_err().code(),
            Code::NotFound
        );
    }
    c.get(get(&other.id, true)).await.unwrap();
    let listed = c
        .list_user_sessions(list("carol", false))
        .await
        .unwrap()
        .into_inner()
        .sessions;
    assert_eq!(listed.len(), 1);
    srv.stop().await;
}

#[tokio::test]
async fn malformed_ids_are_invalid_argument_and_never_echoed() {
    let srv = TestServer::start().await;
    let mut c = srv.client().await;
    let good = create(&mut c, create_req("", &[])).await.id;
    let huge = "A".repeat(1 << 20);
    let wrong_alphabet = format!("{}+", &good[..42]);
    let non_ascii = format!("{}é", &good[..41]);
    for bad in ["", "short", huge.as_str(), &wrong_alphabet, &non_ascii] {
        let e = c.get(get(bad, false)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{bad:.20}");
        assert!(e.message().contains("session id"), "{}", e.message());
        if bad.len() > 8 {
            assert!(!e.message().contains(&bad[..8]), "message echoes the id");
        }
        let e = c
            .destroy(pb::DestroyRequest { id: bad.into() })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
    }
    // A well-formed but unknown ID is NOT_FOUND, and says nothing more than a dead one does.
    let unknown = "A".repeat(43);
    let e1 = c.get(get(&unknown, false)).await.unwrap_err();
    c.destroy(pb::DestroyRequest { id: good.clone() })
        .await
        .unwrap();
    let e2 = c.get(get(&good, false)).await.unwrap_err();
    assert_eq!((e1.code(), e1.message()), (e2.code(), e2.message()));
    let e = c
        .destroy_user_sessions(pb::DestroyUserSessionsRequest {
            user_id: "x".into(),
            except_id: "bad".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    srv.stop().await;
}

#[tokio::test]
async fn limits_are_named_and_nothing_is_half_applied() {
    let mut config = common::test_config();
    config.limits.max_value_bytes = 1024;
    config.limits.max_attributes = 4;
    config.limits.max_sessions_per_user = 2;
    config.max_message_bytes = 64 * 1024;
    let srv = TestServer::with_config(config).await;
    let mut c = srv.client().await;
    let s = create(&mut c, create_req("erin", &[("a", "1")])).await;

    let big = "x".repeat(2000);
    let e = c
        .update(pb::UpdateRequest {
            remove: vec!["a".into()],
            ..set(&s.id, &[("b", "2"), ("c", &big)])
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("max_value_bytes"), "{}", e.message());
    let e = c
        .update(set(
            &s.id,
            &[("b", "2"), ("c", "3"), ("d", "4"), ("e", "5")],
        ))
        .await
        .unwrap_err();
    assert!(e.message().contains("max_attributes"), "{}", e.message());
    let now = c.get(get(&s.id, true)).await.unwrap().into_inner();
    assert_eq!(now.version, 1);
    assert_eq!(now.attributes.keys().collect::<Vec<_>>(), vec!["a"]);

    create(&mut c, create_req("erin", &[])).await;
    let e = c.create(create_req("erin", &[])).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(
        e.message().contains("max_sessions_per_user"),
        "{}",
        e.message()
    );

    let e = c
        .create(pb::CreateRequest {
            idle_timeout: Some(prost_types::Duration {
                seconds: -5,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("idle_timeout"), "{}", e.message());

    // A message over max_message_bytes is refused without taking the server down.
    let huge = "y".repeat(200 * 1024);
    let e = c.update(set(&s.id, &[("z", &huge)])).await.unwrap_err();
    assert!(
        matches!(e.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{e:?}"
    );
    c.get(get(&s.id, true)).await.unwrap();
    let mut fresh = srv.client().await;
    fresh.get(get(&s.id, true)).await.unwrap();
    srv.stop().await;
}

#[tokio::test]
async fn health_and_reflection_are_served() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;

    let srv = TestServer::start().await;
    let mut h = HealthClient::new(srv.channel().await);
    for service in ["", "sessiond.v1.SessionStore"] {
        let r = h
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.status(), ServingStatus::Serving);
    }

    use tokio_stream::StreamExt;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let mut r = ServerReflectionClient::new(srv.channel().await);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = r
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let reply = stream.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("unexpected reflection reply");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"sessiond.v1.SessionStore".to_string()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.health.v1.Health".to_string()),
        "{names:?}"
    );
    drop(stream);
    srv.stop().await;
}

#[tokio::test]
async fn metrics_move_with_sessions() {
    let srv = TestServer::start().await;
    let mut c = srv.client().await;
    let a = create(&mut c, create_req("m", &[])).await;
    let b = create(&mut c, create_req("", &[])).await;
    create(&mut c, create_req("", &[])).await;
    assert_eq!(srv.metric("sessiond_sessions_created_total").await, 3.0);
    assert_eq!(srv.metric("sessiond_sessions_active").await, 3.0);
    assert_eq!(srv.metric("sessiond_users_with_sessions").await, 1.0);
    assert!(srv.metric("sessiond_session_bytes").await > 0.0);

    regenerate(&mut c, &b.id).await;
    c.destroy(pb::DestroyRequest { id: a.id.clone() })
        .await
        .unwrap();
    let _ = c.get(get(&a.id, false)).await.unwrap_err();
    assert_eq!(srv.metric("sessiond_sessions_regenerated_total").await, 1.0);
    assert_eq!(srv.metric("sessiond_sessions_destroyed_total").await, 1.0);
    assert_eq!(srv.metric("sessiond_sessions_active").await, 2.0);
    assert_eq!(srv.metric("sessiond_users_with_sessions").await, 0.0);
    assert_eq!(
        srv.metric(r#"sessiond_grpc_requests_total{method="Get",code="NotFound"}"#)
            .await,
        1.0
    );
    assert_eq!(
        srv.metric(r#"sessiond_grpc_requests_total{method="Create",code="OK"}"#)
            .await,
        3.0
    );
    assert_eq!(
        srv.metric(r#"sessiond_grpc_request_duration_seconds_count{method="Create"}"#)
            .await,
        3.0
    );

    srv.advance(31 * MIN);
    srv.daemon.store.reap(100);
    assert_eq!(srv.metric("sessiond_sessions_expired_total").await, 2.0);
    assert_eq!(srv.metric("sessiond_sessions_active").await, 0.0);
    assert_eq!(srv.metric("sessiond_session_bytes").await, 0.0);
    assert_eq!(
        srv.metric("sessiond_session_lifetime_seconds_count").await,
        3.0
    );
    let (_, body) = srv.admin_get("/metrics").await;
    for name in [
        "sessiond_build_info{version=",
        "sessiond_process_resident_memory_bytes",
        "sessiond_process_open_fds",
        "sessiond_uptime_seconds",
        "sessiond_reaper_runs_total",
        "sessiond_reaper_lag_seconds",
        "# HELP sessiond_sessions_active",
    ] {
        assert!(body.contains(name), "{name} missing from /metrics");
    }
    srv.stop().await;
}

#[tokio::test]
async fn readiness_flips_at_shutdown_while_requests_still_drain() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;

    let mut config = common::test_config();
    config.shutdown_delay = Duration::from_secs(3600);
    let srv = TestServer::with_config(config).await;
    let mut c = srv.client().await;
    let mut h = HealthClient::new(srv.channel().await);
    let s = create(&mut c, create_req("", &[])).await;
    assert_eq!(srv.admin_get("/readyz").await.0, 200);
    assert_eq!(srv.admin_get("/healthz").await.0, 200);

    let signal = srv.daemon.shutdown_handle();
    signal.send(()).await.unwrap();
    // Wait for the flip: a condition, not a sleep.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while srv.admin_get("/readyz").await.0 != 503 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "/readyz never flipped"
        );
        tokio::task::yield_now().await;
    }
    let status = h
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .status();
    assert_eq!(status, ServingStatus::NotServing);
    // Still serving during the delay, so in-flight traffic drains cleanly.
    c.get(get(&s.id, true)).await.unwrap();
    assert_eq!(srv.admin_get("/healthz").await.0, 200);

    // The second signal skips the delay, and the daemon exits cleanly.
    signal.send(()).await.unwrap();
    let addr = srv.daemon.grpc_addr;
    tokio::time::timeout(Duration::from_secs(30), srv.daemon.wait())
        .await
        .expect("shutdown hung")
        .unwrap();
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_flood_is_shed_fast_and_the_server_stays_up() {
    let mut config = common::test_config();
    config.max_concurrent_requests = 2;
    let srv = TestServer::with_config(config).await;
    let mut c = srv.client().await;
    let s = create(&mut c, create_req("", &[("k", "v")])).await;
    let mut calls = Vec::new();
    for _ in 0..8 {
        let c = srv.client().await;
        for _ in 0..50 {
            let (mut c, id) = (c.clone(), s.id.clone());
            calls.push(tokio::spawn(async move { c.get(get(&id, true)).await }));
        }
    }
    let (mut ok, mut shed) = (0, 0);
    for call in calls {
        match call.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) if e.code() == Code::ResourceExhausted => shed += 1,
            Err(e) => panic!("a flooded server answered {e:?}"),
        }
    }
    assert_eq!(ok + shed, 400);
    assert!(ok > 0);
    // Whatever was shed, the server still serves a newcomer.
    let mut fresh = srv.client().await;
    fresh.get(get(&s.id, true)).await.unwrap();
    srv.stop().await;
}

#[tokio::test]
async fn lookups_of_unknown_ids_are_counted_and_a_guessing_peer_is_flagged() {
    let mut config = common::test_config();
    config.guess_threshold = 5;
    let srv = TestServer::with_config(config).await;
    let mut c = srv.client().await;
    for i in 0..7 {
        let unknown = format!("{}{}", "B".repeat(42), ["A", "Q", "g", "w"][i % 4]);
        assert_eq!(
            c.get(get(&unknown, false)).await.unwrap_err().code(),
            Code::NotFound
        );
    }
    // Malformed IDs are rejected before lookup and are not misses.
    let _ = c.get(get("junk", false)).await.unwrap_err();
    let d = c
        .destroy(pb::DestroyRequest {
            id: format!("{}A", "C".repeat(42)),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!d.existed);
    assert_eq!(srv.metric("sessiond_session_id_misses_total").await, 8.0);
    assert_eq!(
        srv.metric("sessiond_guessing_peers_flagged_total").await,
        1.0
    );
    srv.stop().await;
}

#[tokio::test]
async fn destroy_all_sessions_ends_only_the_callers_tenant_and_needs_confirmation() {
    let srv = TestServer::with_config(sessiond::config::Config {
        tenants: vec![
            token_tenant("shop", "shop-token"),
            token_tenant("blog", "blog-token"),
        ],
        ..common::test_config()
    })
    .await;
    let mut c = srv.client().await;
    let mut shop = Vec::new();
    for i in 0..5 {
        let user = if i % 2 == 0 { "ann" } else { "" };
        let s = create(&mut c, bearer("shop-token", create_req(user, &[]))).await;
        shop.push(s.id);
    }
    let blog = create(&mut c, bearer("blog-token", create_req("ann", &[]))).await;

    for confirm in ["", "yes", "destroy all"] {
        let e = c
            .destroy_all_sessions(bearer(
                "shop-token",
                pb::DestroyAllSessionsRequest {
                    confirm: confirm.into(),
                },
            ))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().contains("confirm"), "{}", e.message());
        assert!(
            e.message().contains("destroy all sessions"),
            "{}",
            e.message()
        );
    }
    // Refused: nothing ended.
    c.get(bearer("shop-token", get(&shop[0], true)))
        .await
        .unwrap();

    let r = c
        .destroy_all_sessions(bearer(
            "shop-token",
            pb::DestroyAllSessionsRequest {
                confirm: "destroy all sessions".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.destroyed, 5);
    for id in &shop {
        let e = c
            .get(bearer("shop-token", get(id, true)))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
    }
    let listed = c
        .list_user_sessions(bearer("shop-token", list("ann", false)))
        .await
        .unwrap()
        .into_inner();
    assert!(listed.sessions.is_empty());
    // The other tenant keeps its sessions.
    c.get(bearer("blog-token", get(&blog.id, true)))
        .await
        .unwrap();
    assert_eq!(
        srv.metric(r#"sessiond_sessions_destroyed_total{tenant="shop"}"#)
            .await,
        5.0
    );
    srv.stop().await;
}

#[tokio::test]
async fn a_write_retried_with_its_idempotency_key_gets_the_original_result() {
    let srv = TestServer::start().await;
    let mut c = srv.client().await;
    let keyed = pb::CreateRequest {
        idempotency_key: "create-7f3a".into(),
        ..create_req("bob", &[("cart", "apple")])
    };
    let first = create(&mut c, keyed.clone()).await;
    srv.advance(MIN);
    let again = create(&mut c, keyed.clone()).await;
    assert_eq!(again.id, first.id);
    assert_eq!(srv.metric("sessiond_sessions_created_total").await, 1.0);
    assert_eq!(srv.metric("sessiond_sessions_active").await, 1.0);
    assert_eq!(
        c.list_user_sessions(list("bob", false))
            .await
            .unwrap()
            .into_inner()
            .sessions
            .len(),
        1
    );

    let cas = pb::UpdateRequest {
        expected_version: Some(1),
        idempotency_key: "update-91c2".into(),
        ..set(&first.id, &[("cart", "pear")])
    };
    let updated = c.update(cas.clone()).await.unwrap().into_inner();
    let retried = c.update(cas.clone()).await.unwrap().into_inner();
    assert_eq!((updated.version, retried.version), (2, 2));
    assert_eq!(
        c.get(get(&first.id, true))
            .await
            .unwrap()
            .into_inner()
            .version,
        2
    );

    // A key used for another request is refused, naming no session.
    let err = c
        .update(pb::UpdateRequest {
            idempotency_key: "create-7f3a".into(),
            ..set(&first.id, &[("cart", "fig")])
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("different request"),
        "{}",
        err.message()
    );
    assert!(!err.message().contains(&first.id));
    let err = c
        .create(pb::CreateRequest {
            idempotency_key: "k".repeat(129),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("max_idempotency_key_bytes"),
        "{}",
        err.message()
    );

    // Inside a Pipeline the same fields work the same.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut responses = c
        .pipeline(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    for id in [1, 2] {
        let op = pb::pipeline_request::Op::Regenerate(pb::RegenerateRequest {
            id: first.id.clone(),
            idempotency_key: "login-44d0".into(),
            ..Default::default()
        });
        tx.send(pb::PipelineRequest { id, op: Some(op) })
            .await
            .unwrap();
    }
    let mut moved = Vec::new();
    for _ in 0..2 {
        let r = responses.message().await.unwrap().unwrap();
        match r.result {
            Some(pb::pipeline_response::Result::Session(s)) => moved.push(s),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(moved[0].id, moved[1].id);
    assert_ne!(moved[0].id, first.id);
    assert_eq!(moved[0].version, 3);
    assert_eq!(srv.metric("sessiond_sessions_regenerated_total").await, 1.0);

    // Once the session is gone, a retry says so instead of starting another.
    c.destroy(pb::DestroyRequest {
        id: moved[0].id.clone(),
    })
    .await
    .unwrap();
    let err = c.create(keyed).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("has ended"), "{}", err.message());
    assert_eq!(srv.metric("sessiond_sessions_active").await, 0.0);
    drop(tx);
    srv.stop().await;
}
