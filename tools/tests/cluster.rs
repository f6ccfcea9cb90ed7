//! `sessionctl cluster` against real nodes: three `ClusterNode`s of the `sessiond` library,
//! in-process, each with its own data directory and Store, their peer services on ephemeral
//! loopback ports. The commands' library functions drive them (and the binary, once, for its
//! exit code and output); they are also the first tests of the peer service's admin calls.
//!
//! The tests take turns ([`ONE_AT_A_TIME`]): two clusters side by side on a two-core machine
//! starve each other's heartbeats into elections. Nothing sleeps to let things settle: every wait polls a
//! node's status up to [`WAIT`].

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use sessiond::clock::Clock;
use sessiond::cluster::node::ClusterNode;
use sessiond::config::ClusterConfig;
use sessiond::persist::log::FsyncPolicy;
use sessiond::store::{events, Limits, Store};
use sessiond_tools::cluster::{self, pb, render, ClusterError, Options};
use tonic::Code;

/// One cluster at a time (see the module docs).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The longest any wait may take: generous, for a loaded two-core machine.
const WAIT: Duration = Duration::from_secs(30);

const OPTIONS: Options = Options {
    timeout: Duration::from_secs(5),
    wait: WAIT,
    tls: None,
};

fn config() -> ClusterConfig {
    ClusterConfig {
        peer_listen: "127.0.0.1:0".parse().unwrap(),
        heartbeat_interval: Duration::from_millis(100),
        election_timeout_min: Duration::from_millis(1000),
        election_timeout_max: Duration::from_millis(2000),
        fsync: Some(FsyncPolicy::No),
        ..ClusterConfig::default()
    }
}

fn store() -> Store {
    Store::new(
        Limits::default(),
        8,
        Clock::manual(1_700_000_000_000),
        Box::new(events::Discard),
    )
}

/// The status of the node at `addr`, once `done` holds.
async fn status_when(
    addr: &str,
    what: &str,
    done: impl Fn(&pb::StatusResponse) -> bool,
) -> pb::StatusResponse {
    let deadline = Instant::now() + WAIT;
    loop {
        let s = cluster::status(addr, &OPTIONS).await.unwrap();
        if done(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "{addr}: {what}: {s:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs the sessionctl binary; its exit code, stdout and stderr.
async fn sessionctl(args: &[&str]) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sessionctl"));
    cmd.args(args);
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ids(s: &pb::StatusResponse) -> BTreeSet<u64> {
    cluster::members(s).into_keys().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_add_transfer_and_remove_through_the_admin_calls() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let root = tempfile::tempdir().unwrap();
    let mut nodes = Vec::new();
    for i in 0..3 {
        let dir = root.path().join(format!("n{i}"));
        nodes.push(ClusterNode::start(&config(), &dir, store()).await.unwrap());
    }
    let addr: Vec<String> = nodes.iter().map(|n| n.peer_addr().to_string()).collect();
    let id: Vec<u64> = nodes.iter().map(ClusterNode::id).collect();

    // A fresh node: its own ID and addresses, no members, no leader, and a warning that says
    // how to start.
    let s = cluster::status(&addr[0], &OPTIONS).await.unwrap();
    assert_eq!(s.node_id, id[0]);
    assert_eq!(s.node.as_ref().unwrap().peer_addr, addr[0]);
    assert_eq!(s.leader_id, 0);
    assert!(ids(&s).is_empty());
    let text = render::status_text(&s);
    assert!(text.contains("not part of a cluster yet"), "{text}");
    let json = render::status_json(&s);
    assert_eq!(json["node_id"], id[0].to_string());
    assert_eq!(json["leader"], serde_json::Value::Null);

    // Nothing to lead yet.
    let e = cluster::add(&addr[0], &addr[1], &OPTIONS)
        .await
        .unwrap_err();
    assert!(matches!(e, ClusterError::NotInitialized { .. }), "{e}");
    assert_eq!(e.code(), Code::FailedPrecondition);

    // init --group waits for a node it cannot reach, then fails, starting nothing: that node
    // may be in a cluster already.
    let short = Options {
        timeout: Duration::from_secs(1),
        wait: Duration::from_millis(300),
        tls: None,
    };
    let e = cluster::init_once(&addr[1], &["127.0.0.1:1".to_string()], &short)
        .await
        .unwrap_err();
    assert!(matches!(e, ClusterError::Unreachable { .. }), "{e}");
    assert!(ids(&cluster::status(&addr[1], &OPTIONS).await.unwrap()).is_empty());
    // A list where one address is wanted is refused, not half-parsed.
    let e = cluster::status(&format!("{},{}", addr[0], addr[1]), &OPTIONS)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");

    // init: node 0 leads a cluster of one.
    let s = cluster::init(&addr[0], &OPTIONS).await.unwrap();
    assert_eq!(s.role, cluster::LEADER);
    assert_eq!(s.leader_id, id[0]);
    assert_eq!(cluster::voters(&s), BTreeSet::from([id[0]]));
    let e = cluster::init(&addr[0], &OPTIONS).await.unwrap_err();
    assert!(matches!(e, ClusterError::AlreadyInitialized { .. }), "{e}");
    // With its group, init repeats harmlessly, and never founds a second cluster on a node
    // that is not a member yet (one whose data was lost) while another node of the group is.
    let again = [addr[1].clone(), addr[2].clone()];
    let i = cluster::init_once(&addr[0], &again, &OPTIONS)
        .await
        .unwrap();
    assert!(
        matches!(&i, cluster::InitOnce::Exists { addr: a, .. } if *a == addr[0]),
        "{i:?}"
    );
    let group = [addr[0].clone(), addr[2].clone()];
    let i = cluster::init_once(&addr[1], &group, &OPTIONS)
        .await
        .unwrap();
    assert!(
        matches!(&i, cluster::InitOnce::Exists { addr: a, .. } if *a == addr[0]),
        "{i:?}"
    );
    assert!(ids(&cluster::status(&addr[1], &OPTIONS).await.unwrap()).is_empty());

    // add, once on the leader and once through a follower: both become voters. Several --peer
    // addresses are tried in turn: node 1, not a member yet, is passed over.
    let peers = format!("{},{}", addr[1], addr[0]);
    let a = cluster::add(&peers, &addr[1], &OPTIONS).await.unwrap();
    assert_eq!((a.node_id, a.already_voter), (id[1], false));
    assert_eq!(cluster::voters(&a.status), BTreeSet::from([id[0], id[1]]));
    // Node 1 knows the group once its leader's membership entries have reached it.
    status_when(&addr[1], "node 1 follows node 0", |s| s.leader_id == id[0]).await;
    let a = match cluster::add(&addr[1], &addr[2], &OPTIONS).await {
        Ok(a) => a,
        Err(e) => panic!(
            "{e}; node 1 now: {:?}",
            cluster::status(&addr[1], &OPTIONS).await
        ),
    };
    assert_eq!((a.node_id, a.already_voter), (id[2], false));
    let all = BTreeSet::from_iter(id.iter().copied());
    assert_eq!(cluster::voters(&a.status), all);
    let again = cluster::add(&addr[2], &addr[2], &OPTIONS).await.unwrap();
    assert!(again.already_voter);

    // The leader's status: three voters, no learner, one leader, everyone's progress.
    let s = status_when(&addr[0], "every follower's progress known", |s| {
        ids(s)
            .iter()
            .all(|i| *i == s.node_id || s.matched_index.contains_key(i))
    })
    .await;
    let json = render::status_json(&s);
    assert_eq!(json["voters"].as_array().unwrap().len(), 3, "{json}");
    assert!(json["learners"].as_array().unwrap().is_empty());
    let members = json["members"].as_array().unwrap();
    let leaders: Vec<_> = members.iter().filter(|m| m["role"] == "leader").collect();
    assert_eq!(leaders.len(), 1, "{json}");
    assert_eq!(leaders[0]["node_id"], id[0].to_string());
    assert!(
        members.iter().all(|m| m["matched_index"].is_u64()),
        "{json}"
    );
    let text = render::status_text(&s);
    assert!(text.contains("3 voters, 0 learners"), "{text}");
    // Every member agrees on the leader.
    for a in &addr {
        status_when(a, "node 0 leads, three voters", |s| {
            s.leader_id == id[0] && cluster::voters(s) == all
        })
        .await;
    }

    // The binary: --json status through a follower, and init refused with its exit code.
    let (code, out, err) = sessionctl(&["--json", "cluster", "status", "--peer", &addr[1]]).await;
    assert_eq!(code, 0, "{err}");
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["leader"]["node_id"], id[0].to_string());
    let (code, out, err) = sessionctl(&["cluster", "status", "--peer", &addr[1]]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("<- this node"), "{out}");
    let (code, _, err) = sessionctl(&["cluster", "init", "--peer", &addr[2]]).await;
    assert_eq!(code, Code::FailedPrecondition as i32, "{err}");
    assert!(err.contains("already part of a cluster"), "{err}");
    // What a deployment's one-shot job runs, run again: init with its group, and add of
    // every node through any member; both succeed and change nothing.
    let (p0, others) = (&addr[0], format!("{},{}", addr[1], addr[2]));
    let (code, out, err) = sessionctl(&["cluster", "init", "--peer", p0, "--group", &others]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("no new cluster started"), "{out}");
    let all_addrs = addr.join(",");
    let (code, out, err) = sessionctl(&[
        "--json", "cluster", "add", "--peer", &all_addrs, "--node", &all_addrs,
    ])
    .await;
    assert_eq!(code, 0, "{err}");
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    let answers = json["nodes"].as_array().unwrap();
    assert_eq!(answers.len(), 3, "{json}");
    assert!(answers.iter().all(|n| n["already_voter"] == true), "{json}");

    // transfer-leader, asked of a follower: node 1 leads.
    let m = cluster::transfer_leader(&addr[2], id[1], &OPTIONS)
        .await
        .unwrap();
    assert_eq!((m.from, m.to, m.leader_id), (id[0], id[1], id[1]));
    for a in &addr {
        status_when(a, "node 1 leads", |s| s.leader_id == id[1]).await;
    }
    let e = cluster::transfer_leader(&addr[0], 42, &OPTIONS)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e}");

    // Node 2 loses its data and comes back at the same address under a new ID: add refuses
    // it while the member it replaced still holds the address.
    nodes.pop().unwrap().shutdown().await;
    let fresh = ClusterConfig {
        peer_listen: addr[2].parse().unwrap(),
        ..config()
    };
    nodes.push(
        ClusterNode::start(&fresh, &root.path().join("n2-new"), store())
            .await
            .unwrap(),
    );
    let new_id = nodes[2].id();
    assert_ne!(new_id, id[2]);
    let e = cluster::add(&addr[0], &addr[2], &OPTIONS)
        .await
        .unwrap_err();
    assert!(
        matches!(e, ClusterError::AddressTaken { id: now, old, .. } if now == new_id && old == id[2]),
        "{e}"
    );
    assert_eq!(e.code(), Code::FailedPrecondition);

    // remove node 2, asked of node 0 (a follower now): two members remain.
    let s = cluster::remove(&addr[0], id[2], &OPTIONS).await.unwrap();
    assert_eq!(s.node_id, id[1]);
    assert_eq!(ids(&s), BTreeSet::from([id[0], id[1]]));
    for a in &addr[..2] {
        status_when(a, "node 2 gone", |s| {
            ids(s) == BTreeSet::from([id[0], id[1]])
        })
        .await;
    }
    let e = cluster::remove(&addr[0], id[2], &OPTIONS)
        .await
        .unwrap_err();
    assert!(matches!(e, ClusterError::NotAMember { .. }), "{e}");
    // Now the new node 2 joins under its new ID.
    let a = cluster::add(&addr[0], &addr[2], &OPTIONS).await.unwrap();
    assert_eq!((a.node_id, a.already_voter), (new_id, false));
    assert_eq!(
        cluster::voters(&a.status),
        BTreeSet::from([id[0], id[1], new_id])
    );

    // The leader first: it hands over to node 0 rather than waiting on a stopped successor.
    for i in [1, 0, 2] {
        nodes[i].shutdown().await;
    }

    // Nobody home: unreachable, exit code UNAVAILABLE.
    let e = cluster::status(&addr[0], &OPTIONS).await.unwrap_err();
    assert!(matches!(e, ClusterError::Unreachable { .. }), "{e}");
    let (code, _, err) = sessionctl(&["cluster", "status", "--peer", &addr[0]]).await;
    assert_eq!(code, Code::Unavailable as i32, "{err}");
    assert!(err.contains("cannot reach the peer port"), "{err}");
}

/// With peer TLS, the cluster commands speak mutual TLS to the peer port (--peer-ca,
/// --peer-cert, --peer-key); without a certificate from the cluster CA they get no answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_commands_speak_mutual_tls_to_a_peer_port_with_tls() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let root = tempfile::tempdir().unwrap();
    let ca = common::certs::Ca::new("cluster ca");
    let write = |name: &str, pem: &str| common::certs::write(root.path(), name, pem);
    let (cert, key) = ca.issue("127.0.0.1");
    let tls_config = ClusterConfig {
        tls_cert: write("node.pem", &cert),
        tls_key: write("node.key", &key),
        tls_ca: write("ca.pem", &ca.pem),
        ..config()
    };
    let node = ClusterNode::start(&tls_config, &root.path().join("n0"), store())
        .await
        .unwrap();
    let addr = node.peer_addr().to_string();
    let (admin_cert, admin_key) = ca.issue("sessionctl");
    let (admin_cert_file, admin_key_file) = (
        write("admin.pem", &admin_cert),
        write("admin.key", &admin_key),
    );
    let tls = Options {
        tls: Some(cluster::PeerTls {
            ca_pem: ca.pem.clone().into_bytes(),
            identity_pem: Some((admin_cert.into_bytes(), admin_key.into_bytes())),
            server_name: None,
        }),
        ..OPTIONS
    };
    let s = cluster::init(&addr, &tls).await.unwrap();
    assert_eq!(s.role, cluster::LEADER);
    assert!(
        cluster::status(&addr, &OPTIONS).await.is_err(),
        "plaintext answered"
    );

    let ca_file = root.path().join("ca.pem");
    let flags = |with_cert: bool| {
        let mut args = vec![
            "--json".to_string(),
            "cluster".into(),
            "status".into(),
            "--peer".into(),
            addr.clone(),
            "--peer-ca".into(),
            ca_file.display().to_string(),
        ];
        if with_cert {
            args.extend([
                "--peer-cert".into(),
                admin_cert_file.display().to_string(),
                "--peer-key".into(),
                admin_key_file.display().to_string(),
            ]);
        }
        args
    };
    let args = flags(true);
    let (code, out, err) = sessionctl(&args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&node.id().to_string()), "{out}");
    let args = flags(false);
    let (code, _, err) = sessionctl(&args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    assert_ne!(code, 0, "answered a dialler without a certificate: {err}");
    node.shutdown().await;
}
