//! A replicated group of three real sessiond processes on loopback: replication, routing
//! through any node, and failover when the leader dies or shuts down.
//!
//! Failover times are printed, not asserted: this machine is shared, and the figures belong
//! in the chaos suite's report.

mod common;

use std::time::{Duration, Instant};

use common::cluster::Cluster;
use sessiond::api::forward::LEADER_HEADER;
use sessiond::api::pb;
use sessiond::api::pb::session_store_client::SessionStoreClient;
use sessiond::cluster::pb as cpb;
use sessiond::cluster::pb::cluster_client::ClusterClient;
use tonic::Code;

/// Creates a session through node `via`, retrying while the group has no leader (UNAVAILABLE)
/// for at most `within`; returns it and how long the first success took.
async fn create_until_served(
    cluster: &Cluster,
    via: usize,
    user: &str,
    within: Duration,
) -> (pb::Session, Duration) {
    let started = Instant::now();
    let mut client = cluster.client(via).await;
    loop {
        let req = pb::CreateRequest {
            user_id: user.into(),
            attributes: common::attrs(&[("cart", "apple")]),
            ..Default::default()
        };
        match client.create(req).await {
            Ok(r) => return (r.into_inner(), started.elapsed()),
            Err(s) if s.code() == Code::Unavailable && started.elapsed() < within => {
                tokio::task::yield_now().await;
            }
            Err(s) => panic!(
                "create through node {via} after {:?}: {s}",
                started.elapsed()
            ),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_node_serves_any_call_and_acknowledged_writes_survive_the_leaders_death() {
    let mut cluster = Cluster::start(3, "always").await;
    let leader = cluster.wait_for_leader(&[0, 1, 2]).await;
    let followers: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    let leader_client_addr = cluster.nodes[leader].proc.as_ref().unwrap().grpc.clone();

    // A write through a follower is forwarded, and the reply names the leader.
    let mut via_follower = cluster.client(followers[0]).await;
    let created = via_follower
        .create(pb::CreateRequest {
            user_id: "alice".into(),
            attributes: common::attrs(&[("cart", "apple")]),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        created
            .metadata()
            .get(LEADER_HEADER)
            .unwrap()
            .to_str()
            .unwrap(),
        leader_client_addr
    );
    let id = created.into_inner().id;

    // An update through the other follower, a read through each node: one state.
    let mut other = cluster.client(followers[1]).await;
    let updated = other
        .update(pb::UpdateRequest {
            id: id.clone(),
            set: common::attrs(&[("theme", "dark")]),
            expected_version: Some(1),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(updated.version, 2);
    for i in 0..3 {
        let got = cluster
            .client(i)
            .await
            .get(pb::GetRequest {
                id: id.clone(),
                peek: true,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(got.version, 2, "node {i}");
        assert_eq!(got.attributes.len(), 2, "node {i}");
    }

    // Acknowledged writes, then the leader dies without a word.
    let mut acknowledged = vec![id];
    for n in 0..20 {
        let (s, _) = create_until_served(&cluster, followers[n % 2], "bob", Duration::ZERO).await;
        acknowledged.push(s.id);
    }
    cluster.kill(leader);
    let (after, took) =
        create_until_served(&cluster, followers[0], "carol", Duration::from_secs(20)).await;
    println!("unplanned failover (kill -9 of the leader until a write succeeds): {took:?}");
    acknowledged.push(after.id);

    let new_leader = cluster.wait_for_leader(&followers).await;
    assert_ne!(new_leader, leader);
    let mut client = cluster.client(followers[1]).await;
    for id in &acknowledged {
        let got = client
            .get(pb::GetRequest {
                id: id.clone(),
                peek: true,
            })
            .await;
        assert!(got.is_ok(), "an acknowledged session is gone: {got:?}");
    }
    let bob = client
        .list_user_sessions(pb::ListUserSessionsRequest {
            user_id: "bob".into(),
            include_attributes: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(bob.sessions.len(), 20);

    // The dead node comes back on its data and catches up with the group.
    cluster.restart(leader);
    let commit = cluster.status(new_leader).await.unwrap().committed_index;
    cluster.wait_applied(leader, commit).await;
    assert_eq!(cluster.wait_for_leader(&[0, 1, 2]).await, new_leader);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_shuts_down_hands_over_and_no_write_is_refused_for_long() {
    let mut cluster = Cluster::start(3, "always").await;
    let leader = cluster.wait_for_leader(&[0, 1, 2]).await;
    let follower = (0..3).find(|&i| i != leader).unwrap();
    let (s, _) = create_until_served(&cluster, follower, "dave", Duration::ZERO).await;

    let (status, output) = cluster.terminate(leader);
    assert!(status.success(), "{output}");
    assert!(output.contains("handed leadership over"), "{output}");
    let (_, took) = create_until_served(&cluster, follower, "erin", Duration::from_secs(10)).await;
    println!("planned leader transfer (SIGTERM of the leader until a write succeeds): {took:?}");
    let mut client = cluster.client(follower).await;
    let got = client
        .get(pb::GetRequest {
            id: s.id,
            peek: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.user_id, "dave");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_through_a_follower_keeps_its_order_while_its_writes_commit_together() {
    use pb::pipeline_request::Op;
    use pb::pipeline_response::Result as Res;
    use tokio_stream::StreamExt as _;

    let cluster = Cluster::start(3, "always").await;
    let leader = cluster.wait_for_leader(&[0, 1, 2]).await;
    let follower = (0..3).find(|&i| i != leader).unwrap();
    let mut ids = Vec::new();
    for _ in 0..20 {
        let (s, _) = create_until_served(&cluster, follower, "fay", Duration::ZERO).await;
        ids.push(s.id);
    }
    let mut client = cluster.client(follower).await;
    // Every operation is sent before any reply is read: each session's second update is a
    // compare-and-set on the version its first update makes, and the read must see both.
    let mut requests = Vec::new();
    for (n, id) in ids.iter().enumerate() {
        let n = n as u64 * 3;
        requests.push(pb::PipelineRequest {
            id: n,
            op: Some(Op::Update(pb::UpdateRequest {
                id: id.clone(),
                set: common::attrs(&[("step", "one")]),
                ..Default::default()
            })),
        });
        requests.push(pb::PipelineRequest {
            id: n + 1,
            op: Some(Op::Update(pb::UpdateRequest {
                id: id.clone(),
                set: common::attrs(&[("theme", "dark")]),
                expected_version: Some(2),
                ..Default::default()
            })),
        });
        requests.push(pb::PipelineRequest {
            id: n + 2,
            op: Some(Op::Get(pb::GetRequest {
                id: id.clone(),
                peek: true,
            })),
        });
    }
    let sent = requests.len();
    let mut responses = client
        .pipeline(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    let mut seen = 0;
    while let Some(r) = responses.next().await {
        let r = r.unwrap();
        assert_eq!(r.id, seen as u64, "replies come in the stream's order");
        match (r.id % 3, r.result) {
            (0, Some(Res::Session(s))) => assert_eq!(s.version, 2),
            (1, Some(Res::Session(s))) => assert_eq!(s.version, 3),
            (2, Some(Res::Session(s))) => {
                assert_eq!(s.version, 3);
                assert_eq!(s.attributes.len(), 3, "{:?}", s.attributes.keys());
            }
            (_, other) => panic!("reply {}: {other:?}", r.id),
        }
        seen += 1;
    }
    assert_eq!(seen, sent);
    // Pipelined writes are routine: not one of them is worth a warning in any node's log.
    for i in 0..3 {
        let output = cluster.output(i);
        assert!(!output.contains(" WARN "), "node {i} warned:\n{output}");
    }
}

/// A group's Pipeline answers a read that none of the stream's earlier writes still in
/// flight changes without waiting for them, but a read still sees every earlier write of the
/// stream to what it reads: a Get after an Update of its session, a Get after a
/// DestroyUserSessions of its user, a ListUserSessions after a Create for its user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipelined_read_sees_the_streams_earlier_writes_to_what_it_reads() {
    use pb::pipeline_request::Op;
    use pb::pipeline_response::Result as Res;
    use tokio_stream::StreamExt as _;

    let cluster = Cluster::start(3, "always").await;
    let leader = cluster.wait_for_leader(&[0, 1, 2]).await;
    const ROUNDS: u64 = 10;
    let mut requests = Vec::new();
    for n in 0..ROUNDS {
        let (a, _) = create_until_served(&cluster, leader, "ann", Duration::ZERO).await;
        let (b, _) = create_until_served(&cluster, leader, "bob", Duration::ZERO).await;
        let gone = format!("gone-{n}");
        let (c, _) = create_until_served(&cluster, leader, &gone, Duration::ZERO).await;
        let base = n * 10;
        let get = |id: &str| {
            Op::Get(pb::GetRequest {
                id: id.into(),
                peek: true,
            })
        };
        let ops = [
            Op::Update(pb::UpdateRequest {
                id: a.id.clone(),
                set: common::attrs(&[("step", "one")]),
                ..Default::default()
            }),
            get(&b.id),
            get(&a.id),
            Op::DestroyUserSessions(pb::DestroyUserSessionsRequest {
                user_id: gone,
                except_id: String::new(),
            }),
            get(&c.id),
            Op::Create(pb::CreateRequest {
                user_id: format!("new-{n}"),
                ..Default::default()
            }),
            Op::ListUserSessions(pb::ListUserSessionsRequest {
                user_id: format!("new-{n}"),
                include_attributes: false,
            }),
        ];
        for (k, op) in ops.into_iter().enumerate() {
            requests.push(pb::PipelineRequest {
                id: base + k as u64,
                op: Some(op),
            });
        }
    }
    let sent = requests.len();
    let mut client = cluster.client(leader).await;
    let mut responses = client
        .pipeline(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    let mut seen = std::collections::HashSet::new();
    while let Some(r) = responses.next().await {
        let r = r.unwrap();
        assert!(seen.insert(r.id), "reply {} came twice", r.id);
        match (r.id % 10, r.result) {
            (0, Some(Res::Session(s))) => assert_eq!(s.version, 2),
            (1, Some(Res::Session(s))) => assert_eq!(s.version, 1, "b is untouched"),
            (2, Some(Res::Session(s))) => {
                assert_eq!(s.version, 2, "the Get sees the Update before it");
                assert!(s.attributes.contains_key("step"));
            }
            (3, Some(Res::DestroyUserSessions(d))) => assert_eq!(d.destroyed, 1),
            (4, Some(Res::Error(e))) => assert_eq!(
                e.code,
                Code::NotFound as i32,
                "the Get sees the DestroyUserSessions before it: {}",
                e.message
            ),
            (5, Some(Res::Session(s))) => assert_eq!(s.version, 1),
            (6, Some(Res::ListUserSessions(l))) => {
                assert_eq!(l.sessions.len(), 1, "the list sees the Create before it")
            }
            (_, other) => panic!("reply {}: {other:?}", r.id),
        }
    }
    assert_eq!(seen.len(), sent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_replica_reports_the_same_digest_and_a_write_changes_it_a_read_does_not() {
    let cluster = Cluster::start(3, "always").await;
    let leader = cluster.wait_for_leader(&[0, 1, 2]).await;
    let mut client = cluster.client(leader).await;
    let mut ids = Vec::new();
    for user in ["ann", "ben", "cy"] {
        let s = common::create(
            &mut client,
            pb::CreateRequest {
                user_id: user.into(),
                attributes: common::attrs(&[("cart", user)]),
                ..Default::default()
            },
        )
        .await;
        ids.push(s.id);
    }
    let before = cluster.settled_digests().await;
    assert_eq!(before[0].sessions, 3);
    assert_eq!(before[0].sha256.len(), 32);
    assert!(
        before.iter().all(|d| d.sha256 == before[0].sha256),
        "{before:?}"
    );

    // A sliding read moves last_access_at (on the leader at once, on the others through a
    // touch): not part of the digest.
    client
        .get(pb::GetRequest {
            id: ids[0].clone(),
            peek: false,
        })
        .await
        .unwrap();
    let read = cluster.settled_digests().await;
    assert!(
        read.iter().all(|d| d.sha256 == before[0].sha256),
        "{read:?}"
    );

    client
        .update(pb::UpdateRequest {
            id: ids[1].clone(),
            set: common::attrs(&[("theme", "dark")]),
            ..Default::default()
        })
        .await
        .unwrap();
    let written = cluster.settled_digests().await;
    assert!(
        written.iter().all(|d| d.sha256 == written[0].sha256),
        "{written:?}"
    );
    assert_ne!(written[0].sha256, before[0].sha256);
    assert!(written[0].applied_index > before[0].applied_index);
}

/// A leader cut off from the others keeps believing it leads for a while. Writes it plans
/// against its old state must not be answered from that state: a Destroy or an Update of a
/// session the new leader created is refused (UNAVAILABLE), never answered "not found".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deposed_leader_answers_no_write_from_its_old_state() {
    let cluster = Cluster::start(3, "always").await;
    let old = cluster.wait_for_leader(&[0, 1, 2]).await;
    let others: Vec<usize> = (0..3).filter(|&i| i != old).collect();
    let mut via_old = cluster.client(old).await;
    cluster
        .mesh
        .partition(&common::faultproxy::Partition::isolate(old));
    cluster.wait_for_new_leader(&others, old).await;
    let (s, _) = create_until_served(&cluster, others[0], "fay", Duration::from_secs(20)).await;
    let status = cluster.status(old).await.unwrap();
    println!("the isolated node's role: {}", status.role);

    let destroyed = via_old
        .destroy(pb::DestroyRequest { id: s.id.clone() })
        .await;
    assert_eq!(
        destroyed.as_ref().map_err(|e| e.code()).err(),
        Some(Code::Unavailable),
        "a Destroy through the deposed leader: {destroyed:?}"
    );
    let updated = via_old
        .update(pb::UpdateRequest {
            id: s.id.clone(),
            set: common::attrs(&[("theme", "dark")]),
            expected_version: Some(1),
            ..Default::default()
        })
        .await;
    assert_eq!(
        updated.as_ref().map_err(|e| e.code()).err(),
        Some(Code::Unavailable),
        "an Update through the deposed leader: {updated:?}"
    );
    let gone = via_old
        .destroy_user_sessions(pb::DestroyUserSessionsRequest {
            user_id: "fay".into(),
            except_id: String::new(),
        })
        .await;
    assert_eq!(
        gone.as_ref().map_err(|e| e.code()).err(),
        Some(Code::Unavailable),
        "a DestroyUserSessions through the deposed leader: {gone:?}"
    );

    cluster.mesh.heal();
    let mut client = cluster.client(others[1]).await;
    let got = client
        .get(pb::GetRequest {
            id: s.id,
            peek: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.version, 1);
}

/// Two Regenerates of one session at once: at most one may move it. Found by the chaos suite:
/// both are planned at the same version, the first applied moves the session, and applying
/// the second finds neither its old ID nor its new one, which `Store::apply` takes for a
/// replay over a fuzzy snapshot and so creates the new session a second time. One old ID
/// then lives on as two sessions. Ignored until the fix (see the report of h-chaos).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_regenerates_of_one_session_at_once_move_it_once() {
    let cluster = Cluster::start(3, "always").await;
    let leader = cluster.wait_for_leader(&[0, 1, 2]).await;
    let (mut a, mut b) = (cluster.client(leader).await, cluster.client(leader).await);
    let mut both = 0;
    for _ in 0..20 {
        let (s, _) = create_until_served(&cluster, leader, "gus", Duration::ZERO).await;
        let req = || pb::RegenerateRequest {
            id: s.id.clone(),
            ..Default::default()
        };
        let (x, y) = tokio::join!(a.regenerate(req()), b.regenerate(req()));
        both += usize::from(x.is_ok() && y.is_ok());
    }
    assert_eq!(both, 0, "both Regenerates succeeded {both} times in 20");
}

/// Peer mutual TLS, and TLS on the client ports: the group elects and replicates over the
/// peer port, and a follower forwards a write to the leader's peer port (it could not reach
/// the leader's client port without trusting its CA). The peer port takes only diallers
/// with a certificate from the cluster CA, and serves the session store only to calls
/// another member forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_peer_mutual_tls_the_group_replicates_and_followers_forward_over_the_peer_port() {
    let cluster = Cluster::start_tls(3, "no").await;
    let leader = cluster.wait_for_leader(&[0, 1, 2]).await;
    let followers: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    let leader_client_addr = cluster.nodes[leader].proc.as_ref().unwrap().grpc.clone();

    let mut via_follower = cluster.client(followers[0]).await;
    let created = via_follower
        .create(pb::CreateRequest {
            user_id: "alice".into(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|s| panic!("a write through a follower: {s}"));
    let named = created.metadata().get(LEADER_HEADER).unwrap().to_str();
    assert_eq!(named.unwrap(), leader_client_addr);
    let id = created.into_inner().id;
    let digests = cluster.settled_digests().await;
    assert!(digests
        .iter()
        .all(|d| d.sessions == 1 && d.sha256 == digests[0].sha256));
    let mut other = cluster.client(followers[1]).await;
    let got = other
        .get(pb::GetRequest {
            id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.user_id, "alice");

    // Diallers of the peer port: only a certificate from the cluster CA gets an answer.
    let tls = cluster.tls.as_ref().unwrap();
    let peer = cluster.nodes[leader].peer;
    let status = |config: Option<tonic::transport::ClientTlsConfig>| async move {
        let scheme = if config.is_some() { "https" } else { "http" };
        let mut endpoint = tonic::transport::Endpoint::from_shared(format!("{scheme}://{peer}"))
            .unwrap()
            .connect_timeout(Duration::from_secs(10));
        if let Some(c) = config {
            endpoint = endpoint.tls_config(c).unwrap();
        }
        let channel = endpoint.connect().await.map_err(|e| format!("{e:?}"))?;
        ClusterClient::new(channel)
            .status(cpb::StatusRequest {})
            .await
            .map(|r| r.into_inner().node_id)
            .map_err(|s| s.to_string())
    };
    assert_eq!(
        status(Some(tls.peer_config(leader, Some(&tls.admin)))).await,
        Ok(cluster.nodes[leader].id)
    );
    let refused = [
        ("no client certificate", Some(tls.peer_config(leader, None))),
        (
            "a certificate from another CA",
            Some(tls.peer_config(
                leader,
                Some(&common::certs::Ca::new("rogue").issue("sessionctl")),
            )),
        ),
        ("plaintext", None),
    ];
    for (what, config) in refused {
        let answer = status(config).await;
        assert!(answer.is_err(), "{what}: answered {answer:?}");
    }

    // A member's peer port is no client port: a call that no member forwarded is refused.
    let channel = cluster.peer_endpoint(leader).connect().await.unwrap();
    let err = SessionStoreClient::new(channel)
        .get(pb::GetRequest {
            id,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    assert!(err.message().contains("peer port"), "{err}");
}

/// Protected mode on the peer port: a plaintext peer port beyond loopback is refused at
/// start, naming the settings that would secure it, unless `insecure_listen` says the
/// network is trusted, which starts with a warning. And `advertise_client` may be a DNS
/// name: it is only ever named to clients.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plaintext_peer_port_beyond_loopback_needs_insecure_listen() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("sessiond.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\n[cluster]\npeer_listen = \"0.0.0.0:0\"\n\
             advertise_client = \"sessiond.test:7420\"\n",
            dir.path().join("data")
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let (status, out) = common::proc::run_to_exit(dir.path(), &["--config", config]);
    assert!(!status.success(), "{out}");
    for named in [
        "cluster.peer_listen",
        "cluster.tls_cert",
        "cluster.tls_key",
        "cluster.tls_ca",
        "insecure_listen",
    ] {
        assert!(out.contains(named), "{named} not named:\n{out}");
    }
    let proc = common::proc::spawn(
        dir.path(),
        &["--config", config, "--insecure-listen", "--bootstrap"],
        &[],
    )
    .unwrap_or_else(|out| panic!("did not start with --insecure-listen:\n{out}"));
    let out = proc.output();
    assert!(out.contains("WITHOUT TLS"), "no warning:\n{out}");
    let mut client = common::connect(proc.url()).await;
    let started = Instant::now();
    let created = loop {
        match client.create(pb::CreateRequest::default()).await {
            Ok(r) => break r,
            // The new cluster of one may still be electing itself.
            Err(s)
                if s.code() == Code::Unavailable && started.elapsed() < Duration::from_secs(30) =>
            {
                tokio::task::yield_now().await
            }
            Err(s) => panic!("create: {s}"),
        }
    };
    let named = created.metadata().get(LEADER_HEADER).unwrap().to_str();
    assert_eq!(named.unwrap(), "sessiond.test:7420");
    proc.kill();
}
