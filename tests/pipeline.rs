//! GetMany and the Pipeline stream, over real gRPC.

mod common;

use common::{attrs, TestServer};
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
    let a = c
        .create(pb::CreateRequest {
            attributes: attrs(&[("k", "a")]),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
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
    srv.stop().await;
}
