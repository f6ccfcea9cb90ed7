//! GetMany and the Pipeline stream, over real gRPC.

mod common;

use common::{attrs, create, TestServer};
use sessiond::api::pb;
use sessiond::api::pb::pipeline_request::Op;
use sessiond::api::pb::pipeline_response::Result as Res;
use tokio_stream::StreamExt;
use tonic::Code;

#[tokio::test]
async fn get_many_answers_each_id_in_order() {
    let mut config = common::test_config();
    config.max_batch_ids = 4;
    let srv = TestServer::with_config(config).await;
    let mut c = srv.client().await;
    let a = create(
        &mut c,
        pb::CreateRequest {
            attributes: attrs(&[("k", "a")]),
            ..Default::default()
        },
    )
    .await;
    let unknown = "A".repeat(43);
    let r = c
        .get_many(pb::GetManyRequest {
            ids: vec![a.id.clone(), unknown, "bad".into(), a.id.clone()],
            peek: true,
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    let codes: Vec<Option<i32>> = r
        .iter()
        .map(|g| match g.result.as_ref().unwrap() {
            pb::get_result::Result::Session(s) => {
                assert_eq!(s.id, a.id);
                None
            }
            pb::get_result::Result::Error(e) => Some(e.code),
        })
        .collect();
    assert_eq!(
        codes,
        vec![
            None,
            Some(Code::NotFound as i32),
            Some(Code::InvalidArgument as i32),
            None
        ]
    );
    let e = c
        .get_many(pb::GetManyRequest {
            ids: vec![a.id.clone(); 5],
            peek: true,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("max_batch_ids"), "{}", e.message());
    srv.stop().await;
}

#[tokio::test]
async fn a_pipeline_carries_every_operation_and_keeps_going_after_errors() {
    let srv = TestServer::start().await;
    let mut c = srv.client().await;
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let mut responses = c
        .pipeline(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let ask = |id: u64, op: Op| {
        let tx = tx.clone();
        async move {
            tx.send(pb::PipelineRequest { id, op: Some(op) })
                .await
                .unwrap();
        }
    };

    ask(
        1,
        Op::Create(pb::CreateRequest {
            user_id: "ann".into(),
            attributes: attrs(&[("cart", "1")]),
            ..Default::default()
        }),
    )
    .await;
    let r = responses.next().await.unwrap().unwrap();
    assert_eq!(r.id, 1);
    let Some(Res::Session(s)) = r.result else {
        panic!("{r:?}")
    };

    ask(
        2,
        Op::Get(pb::GetRequest {
            id: "nope".into(),
            peek: false,
        }),
    )
    .await;
    ask(
        3,
        Op::Update(pb::UpdateRequest {
            id: s.id.clone(),
            set: attrs(&[("cart", "2")]),
            expected_version: Some(1),
            ..Default::default()
        }),
    )
    .await;
    ask(4, Op::Touch(pb::TouchRequest { id: s.id.clone() })).await;
    ask(
        5,
        Op::ListUserSessions(pb::ListUserSessionsRequest {
            user_id: "ann".into(),
            include_attributes: true,
        }),
    )
    .await;
    ask(
        6,
        Op::Regenerate(pb::RegenerateRequest {
            id: s.id.clone(),
            ..Default::default()
        }),
    )
    .await;
    ask(
        7,
        Op::Get(pb::GetRequest {
            id: s.id.clone(),
            peek: true,
        }),
    )
    .await;
    ask(
        8,
        pb::pipeline_request::Op::DestroyUserSessions(pb::DestroyUserSessionsRequest {
            user_id: "ann".into(),
            except_id: String::new(),
        }),
    )
    .await;
    tx.send(pb::PipelineRequest { id: 9, op: None })
        .await
        .unwrap();
    drop(tx);

    let mut got = Vec::new();
    while let Some(r) = responses.next().await {
        got.push(r.unwrap());
    }
    assert_eq!(
        got.iter().map(|r| r.id).collect::<Vec<_>>(),
        (2..=9).collect::<Vec<_>>()
    );
    let result = |i: usize| got[i].result.clone().unwrap();
    assert!(matches!(result(0), Res::Error(e) if e.code == Code::InvalidArgument as i32));
    assert!(
        matches!(result(1), Res::Session(u) if u.version == 2 && u.attributes["cart"] == "2".as_bytes())
    );
    assert!(matches!(result(2), Res::Touch(_)));
    assert!(matches!(result(3), Res::ListUserSessions(l) if l.sessions.len() == 1));
    let Res::Session(rotated) = result(4) else {
        panic!()
    };
    assert_ne!(rotated.id, s.id);
    assert!(
        matches!(result(5), Res::Error(e) if e.code == Code::NotFound as i32 && !e.message.contains(&s.id))
    );
    assert!(matches!(result(6), Res::DestroyUserSessions(d) if d.destroyed == 1));
    assert!(matches!(result(7), Res::Error(e) if e.code == Code::InvalidArgument as i32));
    assert_eq!(
        srv.metric(r#"sessiond_grpc_requests_total{method="Pipeline",code="OK"}"#)
            .await,
        1.0
    );
    // Each operation is counted under its own method, apart from unary calls.
    for (series, n) in [
        (r#"{method="Create",code="OK",via="pipeline"}"#, 1.0),
        (
            r#"{method="Get",code="InvalidArgument",via="pipeline"}"#,
            1.0,
        ),
        (r#"{method="Get",code="NotFound",via="pipeline"}"#, 1.0),
        (r#"{method="Update",code="OK",via="pipeline"}"#, 1.0),
        (r#"{method="Regenerate",code="OK",via="pipeline"}"#, 1.0),
        (
            r#"{method="none",code="InvalidArgument",via="pipeline"}"#,
            1.0,
        ),
        (r#"{method="Get",code="OK"}"#, 0.0),
    ] {
        let name = format!("sessiond_grpc_requests_total{series}");
        assert_eq!(srv.metric(&name).await, n, "{name}");
    }
    srv.stop().await;
}

/// A session of about 900 KB: 14 attributes of 64 KiB.
fn big_session(user: &str) -> pb::CreateRequest {
    let value = bytes::Bytes::from(vec![b'x'; 64 * 1024]);
    pb::CreateRequest {
        user_id: user.into(),
        attributes: (0..14).map(|i| (format!("a{i}"), value.clone())).collect(),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_get_many_past_max_message_bytes_is_refused_naming_it() {
    let srv = TestServer::start().await;
    let mut c = srv.client().await;
    let s = create(&mut c, big_session("")).await;
    let e = c
        .get_many(pb::GetManyRequest {
            ids: vec![s.id.clone(); 1000],
            peek: true,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("max_message_bytes"), "{}", e.message());
    assert!(!e.message().contains(&s.id));
    // Four copies fit in the default 4 MiB, each answered from the one lookup.
    let r = c
        .get_many(pb::GetManyRequest {
            ids: vec![s.id.clone(); 4],
            peek: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.results.len(), 4);
    for g in &r.results {
        let Some(pb::get_result::Result::Session(got)) = &g.result else {
            panic!("{g:?}")
        };
        assert_eq!(got.attributes.len(), 14);
    }
    // The server still serves.
    c.get(pb::GetRequest {
        id: s.id.clone(),
        peek: true,
    })
    .await
    .unwrap();
    srv.stop().await;
}

#[tokio::test]
async fn a_listing_with_attributes_past_max_message_bytes_is_refused_naming_it() {
    let srv = TestServer::start().await;
    let mut c = srv.client().await;
    for _ in 0..6 {
        create(&mut c, big_session("big")).await;
    }
    let list = |include_attributes| pb::ListUserSessionsRequest {
        user_id: "big".into(),
        include_attributes,
    };
    let e = c.list_user_sessions(list(true)).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("max_message_bytes"), "{}", e.message());
    // Without attributes the listing is small, and served.
    let r = c
        .list_user_sessions(list(false))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.sessions.len(), 6);
    assert!(r.sessions.iter().all(|s| s.attributes.is_empty()));
    // The same bound holds inside a pipeline, and the stream goes on.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut responses = c
        .pipeline(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    for (id, attrs) in [(1, true), (2, false)] {
        tx.send(pb::PipelineRequest {
            id,
            op: Some(Op::ListUserSessions(list(attrs))),
        })
        .await
        .unwrap();
    }
    drop(tx);
    let first = responses.next().await.unwrap().unwrap();
    assert!(
        matches!(&first.result, Some(Res::Error(e)) if e.code == Code::ResourceExhausted as i32 && e.message.contains("max_message_bytes")),
        "{first:?}"
    );
    let second = responses.next().await.unwrap().unwrap();
    assert!(matches!(&second.result, Some(Res::ListUserSessions(l)) if l.sessions.len() == 6));
    srv.stop().await;
}

/// Opens a unary Get whose request message never comes: its handler waits for it, holding
/// a permit of `max_concurrent_requests` until the call is dropped. If the call is shed
/// (another call held the permit at that moment), it tries again: a held call never returns.
fn hold_a_permit(channel: tonic::transport::Channel) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut grpc = tonic::client::Grpc::new(channel);
        loop {
            grpc.ready().await.unwrap();
            let codec = tonic_prost::ProstCodec::<pb::GetRequest, pb::Session>::default();
            let path = format!("/{}/Get", sessiond::server::SERVICE_NAME);
            let never = tokio_stream::pending::<pb::GetRequest>();
            let r = grpc
                .client_streaming(tonic::Request::new(never), path.parse().unwrap(), codec)
                .await;
            match r {
                Err(e) if e.code() == Code::ResourceExhausted => tokio::task::yield_now().await,
                _ => return,
            }
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_operations_take_permits_from_the_same_budget_as_unary_calls() {
    let mut config = common::test_config();
    config.max_concurrent_requests = 1;
    let srv = TestServer::with_config(config).await;
    let mut c = srv.client().await;
    let s = create(&mut c, pb::CreateRequest::default()).await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut responses = c
        .pipeline(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let get = |id: u64| pb::PipelineRequest {
        id,
        op: Some(Op::Get(pb::GetRequest {
            id: s.id.clone(),
            peek: true,
        })),
    };

    // Spend the one permit on a unary call that never ends; wait until it is held.
    let held = hold_a_permit(srv.channel().await);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let r = c
            .get(pb::GetRequest {
                id: s.id.clone(),
                peek: true,
            })
            .await;
        match r {
            Err(e) if e.code() == Code::ResourceExhausted => break,
            _ => assert!(
                tokio::time::Instant::now() < deadline,
                "the permit was never held"
            ),
        }
        tokio::task::yield_now().await;
    }

    // A pipelined operation finds no permit either: shed, and the stream goes on.
    tx.send(get(1)).await.unwrap();
    let r = responses.next().await.unwrap().unwrap();
    assert!(
        matches!(&r.result, Some(Res::Error(e)) if e.code == Code::ResourceExhausted as i32 && e.message.contains("max_concurrent_requests")),
        "{r:?}"
    );
    assert!(
        srv.metric(r#"sessiond_requests_shed_total{method="Get",via="pipeline"}"#)
            .await
            >= 1.0
    );
    assert!(
        srv.metric(r#"sessiond_requests_shed_total{method="Get",via="unary"}"#)
            .await
            >= 1.0
    );

    // Once the permit is back, the same stream is served again.
    held.abort();
    let _ = held.await;
    let mut next = 2;
    loop {
        tx.send(get(next)).await.unwrap();
        let r = responses.next().await.unwrap().unwrap();
        assert_eq!(r.id, next);
        match &r.result {
            Some(Res::Session(got)) => {
                assert_eq!(got.id, s.id);
                break;
            }
            Some(Res::Error(e)) if e.code == Code::ResourceExhausted as i32 => {
                assert!(
                    tokio::time::Instant::now() < deadline + std::time::Duration::from_secs(10),
                    "the permit never came back"
                );
            }
            other => panic!("{other:?}"),
        }
        next += 1;
        tokio::task::yield_now().await;
    }
    drop(tx);
    srv.stop().await;
}

/// Sends SIGTERM to a child process.
fn sigterm(p: &common::proc::Proc) {
    let pid = p.child.id().to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_shutdown_a_pipeline_ends_with_unavailable_and_every_acknowledged_create_survives() {
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let args = ["--data-dir", data.to_str().unwrap(), "--fsync", "always"];
    // A drain deadline far longer than the test waits: the stream must not hold it.
    let env = [
        ("SESSIOND_SHUTDOWN_GRACE", "60s"),
        ("SESSIOND_SHUTDOWN_DELAY", "0s"),
    ];
    let p = common::proc::spawn(dir.path(), &args, &env)
        .unwrap_or_else(|out| panic!("sessiond did not start:\n{out}"));
    let mut c = common::connect(p.url()).await;
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let mut responses = c
        .pipeline(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    // Creates, one after another, for as long as the stream takes them.
    let sender = tokio::spawn(async move {
        for id in 0u64.. {
            let op = Op::Create(pb::CreateRequest {
                attributes: attrs(&[("n", &id.to_string())]),
                ..Default::default()
            });
            if tx
                .send(pb::PipelineRequest { id, op: Some(op) })
                .await
                .is_err()
            {
                return;
            }
        }
    });

    let mut acked = Vec::new();
    let mut signalled = false;
    let end = loop {
        match tokio::time::timeout(Duration::from_secs(30), responses.next()).await {
            Err(_) => panic!("the stream neither answered nor ended within 30 s"),
            Ok(None) => panic!("the stream ended without a status"),
            Ok(Some(Err(status))) => break status,
            Ok(Some(Ok(r))) => match r.result {
                Some(Res::Session(s)) => acked.push(s.id),
                other => panic!("{other:?}"),
            },
        }
        if !signalled && acked.len() >= 200 {
            sigterm(&p);
            signalled = true;
        }
    };
    assert!(signalled, "the stream ended before SIGTERM: {end:?}");
    assert_eq!(end.code(), Code::Unavailable, "{end:?}");
    assert_eq!(end.message(), "shutting down");
    sender.abort();
    drop(c);

    // The daemon exits well before shutdown_grace runs out.
    let output = p.output.clone();
    let status = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::task::spawn_blocking(move || {
            let mut p = p;
            p.child.wait()
        }),
    )
    .await
    .unwrap_or_else(|_| {
        panic!(
            "sessiond still running 30 s after SIGTERM:\n{}",
            output.lock().unwrap()
        )
    })
    .unwrap()
    .unwrap();
    assert!(status.success(), "{status:?}\n{}", output.lock().unwrap());

    // Every acknowledged session is there after a restart.
    let p = common::proc::spawn(dir.path(), &args, &[])
        .unwrap_or_else(|out| panic!("sessiond did not restart:\n{out}"));
    let mut c = common::connect(p.url()).await;
    for chunk in acked.chunks(500) {
        let r = c
            .get_many(pb::GetManyRequest {
                ids: chunk.to_vec(),
                peek: true,
            })
            .await
            .unwrap()
            .into_inner();
        for (id, g) in chunk.iter().zip(&r.results) {
            assert!(
                matches!(&g.result, Some(pb::get_result::Result::Session(s)) if &s.id == id),
                "an acknowledged session is missing after the restart"
            );
        }
    }
    p.kill();
}

/// Under `fsync = always`, a pipelined write whose record does not reach the disk is
/// answered `DEADLINE_EXCEEDED` when its own `request_timeout` runs out, while the stream
/// goes on: a read behind it is answered, and once the disk answers again so is a write.
///
/// The disk hangs for real: the daemon's log thread is stopped (ptrace) while it waits for
/// records, so the write's record is appended but never written or fsynced, exactly as
/// when a write or fsync system call does not return.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipelined_write_stuck_on_the_disk_times_out_on_its_own_and_the_stream_goes_on() {
    use std::time::Duration;
    // Long enough for an fsync on a busy machine; every second of it is waited once, below.
    const REQUEST_TIMEOUT: &str = "5s";
    // How long the test waits for the stuck write's answer before it calls the timeout
    // unenforced: far past `REQUEST_TIMEOUT`, so only a missing timeout gets there.
    const NO_ANSWER: Duration = Duration::from_secs(60);

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let args = ["--data-dir", data.to_str().unwrap(), "--fsync", "always"];
    let env = [("SESSIOND_REQUEST_TIMEOUT", REQUEST_TIMEOUT)];
    let p = common::proc::spawn(dir.path(), &args, &env)
        .unwrap_or_else(|out| panic!("sessiond did not start:\n{out}"));
    let mut c = common::connect(p.url()).await;
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let mut responses = c
        .pipeline(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut next = async |what: &str| {
        tokio::time::timeout(NO_ANSWER, responses.next())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{what}: no answer within {NO_ANSWER:?}, though request_timeout is \
                     {REQUEST_TIMEOUT}: the timeout is not enforced"
                )
            })
            .expect("the stream ended")
            .expect("the stream failed")
    };

    // The disk works: a create is answered once durable.
    let create = |id| pb::PipelineRequest {
        id,
        op: Some(Op::Create(pb::CreateRequest::default())),
    };
    tx.send(create(1)).await.unwrap();
    let r = next("the first create").await;
    let Some(Res::Session(s)) = r.result else {
        panic!("{r:?}")
    };

    // The disk hangs: an update is applied but cannot become durable; a read behind it
    // needs no disk.
    let frozen = p.freeze_waiting_thread("sessiond-log");
    tx.send(pb::PipelineRequest {
        id: 2,
        op: Some(Op::Update(pb::UpdateRequest {
            id: s.id.clone(),
            set: attrs(&[("k", "v")]),
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    tx.send(pb::PipelineRequest {
        id: 3,
        op: Some(Op::Get(pb::GetRequest {
            id: s.id.clone(),
            peek: true,
        })),
    })
    .await
    .unwrap();
    let r = next("the update stuck on the disk").await;
    assert_eq!(r.id, 2);
    assert!(
        matches!(&r.result, Some(Res::Error(e)) if e.code == Code::DeadlineExceeded as i32 && e.message.contains("request_timeout")),
        "{r:?}"
    );
    // The timed-out update is in memory (its outcome is unknown to the client, as the
    // README says): the read sees it.
    let r = next("the read behind the stuck update").await;
    assert_eq!(r.id, 3);
    assert!(
        matches!(&r.result, Some(Res::Session(got)) if got.version == 2 && got.attributes["k"] == "v".as_bytes()),
        "{r:?}"
    );

    // The disk answers again: the same stream takes writes.
    drop(frozen);
    tx.send(create(4)).await.unwrap();
    let r = next("the create after the disk came back").await;
    assert_eq!(r.id, 4);
    assert!(matches!(&r.result, Some(Res::Session(_))), "{r:?}");
    drop(tx);
    drop(c);
    tokio::task::spawn_blocking(move || p.kill()).await.unwrap();
}
