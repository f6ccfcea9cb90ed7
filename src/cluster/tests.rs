//! In-process cluster tests: real nodes on real tonic servers on 127.0.0.1 ephemeral ports,
//! each with its own data directory. Nothing sleeps to let things settle: every wait is on
//! openraft's metrics, bounded by [`WAIT`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use openraft::ServerState;

use super::testing::{create, sessions, store, update};
use super::{ClusterNode, Metrics, NodeId, ProposeError};
use crate::config::ClusterConfig;
use crate::persist::log::FsyncPolicy;
use crate::store::Effect;

/// The longest any wait may take: generous, for a loaded two-core machine.
const WAIT: Duration = Duration::from_secs(30);

fn config() -> ClusterConfig {
    ClusterConfig {
        peer_listen: "127.0.0.1:0".parse().unwrap(),
        heartbeat_interval: Duration::from_millis(100),
        election_timeout_min: Duration::from_millis(1000),
        election_timeout_max: Duration::from_millis(2000),
        snapshot_timeout: Duration::from_secs(20),
        fsync: Some(FsyncPolicy::No),
        ..ClusterConfig::default()
    }
}

struct Member {
    node: ClusterNode,
    dir: PathBuf,
}

/// One in-process cluster at a time: three nodes of a debug build on a two-core machine are
/// busy enough that two clusters side by side starve each other's heartbeats into elections.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Cluster {
    _root: tempfile::TempDir,
    _turn: tokio::sync::MutexGuard<'static, ()>,
    config: ClusterConfig,
    members: Vec<Option<Member>>,
    /// The highest log index a write through [`Cluster::propose`] was applied at.
    written: std::sync::Mutex<u64>,
}

impl Cluster {
    /// Three nodes, initialized as one group, with a leader.
    async fn start(config: ClusterConfig) -> Cluster {
        let turn = ONE_AT_A_TIME.lock().await;
        let root = tempfile::tempdir().unwrap();
        let mut members = Vec::new();
        for i in 0..3 {
            let dir = root.path().join(format!("n{i}"));
            let node = ClusterNode::start(&config, &dir, store()).await.unwrap();
            members.push(Some(Member { node, dir }));
        }
        let cluster = Cluster {
            _root: root,
            _turn: turn,
            config,
            members,
            written: std::sync::Mutex::new(0),
        };
        let all: BTreeMap<NodeId, super::Node> = cluster
            .up()
            .map(|m| (m.node.id(), m.node.node().clone()))
            .collect();
        cluster.nth(0).initialize(all).await.unwrap();
        cluster.leader().await;
        cluster
    }

    fn up(&self) -> impl Iterator<Item = &Member> {
        self.members.iter().flatten()
    }

    fn nth(&self, i: usize) -> &ClusterNode {
        &self.members[i].as_ref().expect("up").node
    }

    /// The leader every running node agrees on.
    async fn leader(&self) -> usize {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            if let Some(i) = self.agreed_leader().await {
                return i;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the running nodes agree on no leader within {WAIT:?}"
            );
        }
    }

    /// The leader that the first running node names, once it says it leads and every running
    /// node follows it in its term; `None` if that does not happen within a short wait (a
    /// node just restarted names the leader of its saved vote, who may lead no longer).
    async fn agreed_leader(&self) -> Option<usize> {
        let first = &self.up().next().unwrap().node;
        let named = briefly(first, "a leader", |m| m.current_leader.is_some()).await?;
        let id = named.current_leader?;
        let i = self
            .members
            .iter()
            .position(|m| m.as_ref().is_some_and(|m| m.node.id() == id))?;
        let leads = briefly(self.nth(i), "to lead", |m| m.state == ServerState::Leader).await?;
        let term = leads.current_term;
        for member in self.up() {
            briefly(&member.node, "to follow the leader", move |m| {
                m.current_leader == Some(id) && m.current_term == term
            })
            .await?;
        }
        Some(i)
    }

    /// Waits until every running member has applied every write made through
    /// [`Cluster::propose`]; returns the leader.
    async fn converge(&self) -> usize {
        let leader = self.leader().await;
        let index = Some(*self.written.lock().unwrap());
        for member in self.up() {
            member
                .node
                .raft()
                .wait(Some(WAIT))
                .applied_index_at_least(index, "catch up with the leader")
                .await
                .unwrap();
        }
        leader
    }

    /// Stops member `i` gracefully; returns its data directory and peer address.
    async fn stop(&mut self, i: usize) -> (PathBuf, std::net::SocketAddr) {
        let m = self.members[i].take().expect("up");
        let addr = m.node.peer_addr();
        m.node.shutdown().await;
        (m.dir, addr)
    }

    /// Starts member `i` again from `dir`, at its old peer address, with an empty Store.
    async fn restart(&mut self, i: usize, dir: &Path, addr: std::net::SocketAddr) {
        let config = ClusterConfig {
            peer_listen: addr,
            ..self.config.clone()
        };
        let node = ClusterNode::start(&config, dir, store()).await.unwrap();
        self.members[i] = Some(Member {
            node,
            dir: dir.to_owned(),
        });
    }

    async fn shutdown(mut self) {
        for i in 0..self.members.len() {
            if self.members[i].is_some() {
                self.stop(i).await;
            }
        }
    }
}

/// [`wait_for`] within a short bound: `None` if `f` does not hold by then.
async fn briefly(
    node: &ClusterNode,
    what: &str,
    f: impl Fn(&Metrics) -> bool + Send,
) -> Option<Metrics> {
    let step = Duration::from_secs(2);
    node.raft().wait(Some(step)).metrics(f, what).await.ok()
}

async fn wait_for(node: &ClusterNode, what: &str, f: impl Fn(&Metrics) -> bool + Send) -> Metrics {
    node.raft()
        .wait(Some(WAIT))
        .metrics(f, what)
        .await
        .unwrap_or_else(|e| panic!("node {}: waiting for {what}: {e}", node.id()))
}

impl Cluster {
    /// Proposes `effects` on whichever node leads, as a client would: an election that is
    /// still settling (a leader stepping down for a higher term) is waited out on the metrics
    /// and the write retried, a bounded number of times. The effects are idempotent, so a
    /// retry after an indeterminate answer is safe.
    async fn propose(&self, effects: Vec<Effect>) -> super::Applied {
        for _ in 0..20 {
            let l = self.leader().await;
            let raft = self.nth(l).raft();
            match raft.client_write(super::Proposal(effects.clone())).await {
                Ok(resp) => {
                    let mut written = self.written.lock().unwrap();
                    *written = (*written).max(resp.log_id.index);
                    return resp.data;
                }
                Err(e) => match ProposeError::from(e) {
                    e @ (ProposeError::ForwardToLeader { .. }
                    | ProposeError::Unavailable(_)
                    | ProposeError::Indeterminate(_)) => {
                        // A new leader's lease starts with a quorum's acknowledgement; a
                        // deposed one learns of its successor. Wait for either, not a clock.
                        let acked = raft.metrics().borrow_watched().last_quorum_acked;
                        eprintln!("write retried after: {e}");
                        wait_for(self.nth(l), "a quorum acknowledgement or a new role", |m| {
                            m.last_quorum_acked != acked || m.state != ServerState::Leader
                        })
                        .await;
                    }
                    e => panic!("write failed: {e}"),
                },
            }
        }
        panic!("no write went through in 20 tries");
    }

    /// Creates sessions `range` through [`Cluster::propose`], one entry each.
    async fn write(&self, range: std::ops::Range<u32>) {
        for n in range {
            self.propose(vec![create(n)]).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_on_the_leader_reaches_every_store_and_followers_forward() {
    let c = Cluster::start(config()).await;
    let applied = c
        .propose(vec![create(1), create(2), update(1, 2, "cart")])
        .await;
    assert_eq!(applied.0.len(), 3, "one outcome per effect");
    c.write(3..6).await;
    let l = c.converge().await;
    let leader = c.nth(l);
    let want = sessions(leader.store());
    assert_eq!(want.len(), 5);
    // ClusterNode::propose itself, on the leader: one outcome per effect.
    assert_eq!(
        leader
            .propose(vec![create(1), create(2)])
            .await
            .unwrap()
            .0
            .len(),
        2
    );
    for m in c.up() {
        assert_eq!(sessions(m.node.store()), want, "node {}", m.node.id());
    }
    leader.lease_read().await.unwrap();

    let f = (l + 1) % 3;
    let follower = c.nth(f);
    let err = follower.propose(vec![create(9)]).await.unwrap_err();
    match &err {
        ProposeError::ForwardToLeader {
            leader_id,
            leader: node,
        } => {
            assert_eq!(*leader_id, leader.id());
            assert_eq!(node.peer_addr, leader.peer_addr().to_string());
        }
        other => panic!("expected ForwardToLeader, got {other:?}"),
    }
    assert!(err.to_string().contains(&leader.id().to_string()), "{err}");
    assert!(matches!(
        follower.lease_read().await,
        Err(ProposeError::ForwardToLeader { .. })
    ));
    assert_eq!(follower.leader().map(|(id, _)| id), Some(leader.id()));
    // The refused write changed nothing anywhere.
    assert!(!sessions(follower.store())
        .iter()
        .any(|s| s.key == super::testing::session(9).key));
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_leader_dies_another_is_elected_and_two_nodes_commit() {
    let mut c = Cluster::start(config()).await;
    let l = c.leader().await;
    c.write(0..3).await;
    // A crash, not a shutdown: no leadership transfer, and peers get only errors from it.
    let dead = c.members[l].take().unwrap();
    let old_id = dead.node.id();
    dead.node.raft().shutdown().await.unwrap();
    let first = c.up().next().unwrap();
    wait_for(&first.node, "a new leader", |m| {
        m.current_leader.is_some_and(|id| id != old_id)
    })
    .await;
    c.write(3..6).await;
    let l2 = c.converge().await;
    assert_ne!(c.nth(l2).id(), old_id);
    let want = sessions(c.nth(l2).store());
    assert_eq!(want.len(), 6);
    for m in c.up() {
        assert_eq!(sessions(m.node.store()), want);
    }
    dead.node.shutdown().await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_of_the_leader_hands_leadership_over() {
    let mut c = Cluster::start(config()).await;
    let l = c.leader().await;
    let old_id = c.nth(l).id();
    c.write(0..2).await;
    c.stop(l).await;
    // Shutdown returned only after the transfer: another node leads already, with no
    // election timeout waited out (nothing here waits at all).
    let leaders: Vec<NodeId> = c
        .up()
        .filter(|m| m.node.metrics().borrow_watched().state == ServerState::Leader)
        .map(|m| m.node.id())
        .collect();
    assert_eq!(leaders.len(), 1, "one new leader at once: {leaders:?}");
    assert_ne!(leaders[0], old_id);
    c.write(2..4).await;
    let l2 = c.converge().await;
    assert_eq!(sessions(c.nth(l2).store()).len(), 4);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_reads_on_its_lease_until_it_gives_leadership_up_for_the_term() {
    use openraft::type_config::TypeConfigExt;
    let c = Cluster::start(config()).await;
    c.write(0..1).await;
    let l = c.leader().await;
    let leader = c.nth(l);
    wait_for(
        leader,
        "a quorum acknowledgement and an entry of the term applied",
        |m| {
            m.last_quorum_acked.is_some()
                && m.last_applied
                    .is_some_and(|a| a.leader_id == m.current_term)
        },
    )
    .await;
    let now = super::TypeConfig::now();
    assert!(
        leader.lease().holds(now),
        "the leader's metrics show its lease"
    );
    for f in (0..3).filter(|&i| i != l) {
        assert!(!c.nth(f).lease().holds(now), "node {f} follows: no lease");
    }

    // Asking to hand over ends reads from the metrics for the term; the engine still answers
    // them while it leads, and writes go on.
    leader.lease().give_up().await.unwrap();
    assert!(!leader.lease().holds(super::TypeConfig::now()));
    leader.lease_read().await.unwrap();
    c.write(1..2).await;

    // Leadership moves away and back: a new term, read from the metrics again.
    let other = c.nth((l + 1) % 3).id();
    leader.transfer_leader(other).await.unwrap();
    assert!(!leader.lease().holds(super::TypeConfig::now()));
    let successor = c.leader().await;
    c.nth(successor).transfer_leader(leader.id()).await.unwrap();
    c.write(2..3).await;
    wait_for(leader, "a lease in the new term", |m| {
        m.state == ServerState::Leader
            && m.last_quorum_acked.is_some()
            && m.last_applied
                .is_some_and(|a| a.leader_id == m.current_term)
    })
    .await;
    assert!(leader.lease().holds(super::TypeConfig::now()));
    assert_eq!(sessions(leader.store()).len(), 3);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_recovers_from_its_data_dir_and_catches_up() {
    let mut c = Cluster::start(config()).await;
    c.write(0..5).await;
    let l = c.converge().await;
    let f = (l + 1) % 3;
    let id = c.nth(f).id();
    let (dir, addr) = c.stop(f).await;
    c.write(5..10).await;
    c.propose(vec![
        update(2, 2, "late"),
        Effect::End {
            key: super::testing::session(3).key,
            cause: crate::store::events::EndCause::Destroyed,
            at: super::testing::T0 + 5,
        },
    ])
    .await;
    c.restart(f, &dir, addr).await;
    assert_eq!(c.nth(f).id(), id, "the node keeps its ID");
    let l = c.converge().await;
    let want = sessions(c.nth(l).store());
    assert_eq!(want.len(), 9);
    assert_eq!(sessions(c.nth(f).store()), want);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_far_behind_is_sent_a_snapshot() {
    let config = ClusterConfig {
        snapshot_every_entries: 5,
        keep_entries_after_snapshot: 0,
        ..config()
    };
    let mut c = Cluster::start(config).await;
    c.write(0..3).await;
    let l = c.converge().await;
    let f = (l + 1) % 3;
    let behind = c.nth(f).metrics().borrow_watched().last_log_index;
    let (dir, addr) = c.stop(f).await;
    c.write(3..40).await;
    let l = c.leader().await;
    // The leader has purged past the stopped node's last entry: the log alone cannot bring it
    // back, only a snapshot can.
    let purged = wait_for(c.nth(l), "a purge past the stopped node", |m| {
        m.purged.map(|p| p.index) > behind
    })
    .await
    .purged;
    assert!(purged.map(|p| p.index) > behind);
    c.restart(f, &dir, addr).await;
    let l = c.converge().await;
    let want = sessions(c.nth(l).store());
    assert_eq!(want.len(), 40);
    assert_eq!(sessions(c.nth(f).store()), want);
    let snap = c.nth(f).metrics().borrow_watched().snapshot;
    assert!(
        snap.map(|s| s.index) > behind,
        "installed a snapshot: {snap:?}"
    );
    c.shutdown().await;
}

/// The snapshot trigger by size: once the log since the last snapshot reaches
/// `snapshot_log_bytes`, the node snapshots and purges the log the snapshot covers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_grown_to_the_snapshot_size_is_snapshotted_and_purged() {
    let config = ClusterConfig {
        keep_entries_after_snapshot: 0,
        ..config()
    };
    assert_eq!(config.snapshot_every_entries, 0, "by size alone");
    let c = Cluster::start(config).await;
    c.write(0..10).await;
    let l = c.converge().await;
    let leader = c.nth(l);
    let before = leader.metrics().borrow_watched().clone();
    assert_eq!(before.snapshot, None);
    assert_eq!(leader.snapshot_bytes(), 0);
    let log = leader.log_since_snapshot();
    assert!(log > 0, "ten creates are in the log");

    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let hour = Duration::from_secs(3600);
    let trigger = super::member::snapshots(leader, log, 0, hour, stop);
    let snapshotted = wait_for(leader, "a snapshot and a purge", |m| {
        m.snapshot >= before.last_applied && m.purged == m.snapshot
    });
    let m = tokio::select! {
        () = trigger => panic!("the trigger stopped by itself"),
        m = snapshotted => m,
    };
    drop(stop_tx);
    assert!(m.snapshot >= before.last_applied, "{m:?}");
    assert!(leader.snapshot_bytes() > 0);
    assert_eq!(
        leader.log_since_snapshot(),
        0,
        "what the snapshot covers is purged"
    );
    c.shutdown().await;
}

/// A CA made in the test (rcgen), and a certificate and key it signed for `name`, as PEM.
fn ca_and_cert(name: &str) -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, "cluster ca");
    let ca_key = KeyPair::generate().unwrap();
    let ca_pem = params.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(params, ca_key);
    let leaf = CertificateParams::new(vec![name.to_string()]).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    (ca_pem, cert.pem(), key.serialize_pem())
}

/// Peer mutual TLS, every node on one shared certificate checked under
/// `cluster.tls_server_name`: the group elects and replicates as in
/// plaintext.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_with_peer_mutual_tls_elects_and_replicates() {
    let files = tempfile::tempdir().unwrap();
    let (ca, cert, key) = ca_and_cert("peers.test");
    let write = |name: &str, pem: &str| {
        let path = files.path().join(name);
        std::fs::write(&path, pem).unwrap();
        path
    };
    let config = ClusterConfig {
        tls_cert: write("peer.pem", &cert),
        tls_key: write("peer.key", &key),
        tls_ca: write("ca.pem", &ca),
        tls_server_name: "peers.test".into(),
        ..config()
    };
    let c = Cluster::start(config).await;
    assert!(c.nth(0).peer_tls().is_some());
    c.write(0..5).await;
    let l = c.converge().await;
    let want = sessions(c.nth(l).store());
    assert_eq!(want.len(), 5);
    for m in c.up() {
        assert_eq!(sessions(m.node.store()), want, "node {}", m.node.id());
    }
    c.shutdown().await;
}

#[tokio::test]
async fn a_plaintext_peer_port_beyond_loopback_is_refused_unless_insecure_listen() {
    let dir = tempfile::tempdir().unwrap();
    let config = ClusterConfig {
        peer_listen: "0.0.0.0:0".parse().unwrap(),
        ..config()
    };
    let err = ClusterNode::start(&config, dir.path(), store())
        .await
        .err()
        .expect("refused");
    let msg = err.to_string();
    for named in [
        "cluster.peer_listen",
        "cluster.tls_cert",
        "cluster.tls_key",
        "cluster.tls_ca",
        "insecure_listen",
    ] {
        assert!(msg.contains(named), "{msg} lacks {named}");
    }
    let port = super::node::PeerPort {
        insecure_listen: true,
        ..Default::default()
    };
    let node = ClusterNode::open(&config, dir.path(), store(), port)
        .await
        .unwrap();
    assert!(node.peer_addr().ip().is_unspecified());
    node.shutdown().await;
}

#[tokio::test]
async fn a_node_keeps_its_random_id_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let a = ClusterNode::start(&config(), dir.path(), store())
        .await
        .unwrap();
    let id = a.id();
    assert_ne!(id, 0);
    a.shutdown().await;
    let b = ClusterNode::start(&config(), dir.path(), store())
        .await
        .unwrap();
    assert_eq!(b.id(), id);
    b.shutdown().await;
    let other = tempfile::tempdir().unwrap();
    let c = ClusterNode::start(&config(), other.path(), store())
        .await
        .unwrap();
    assert_ne!(c.id(), id, "a new data directory is a new node");
    c.shutdown().await;
}

/// A node of its own, not yet initialized, in a directory of its own (kept while it runs),
/// holding the turn of in-process clusters.
async fn lone_node() -> (
    tokio::sync::MutexGuard<'static, ()>,
    tempfile::TempDir,
    ClusterNode,
) {
    let turn = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let node = ClusterNode::start(&config(), dir.path(), store())
        .await
        .unwrap();
    (turn, dir, node)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_leader_reports_itself_and_its_proposals_in_the_metrics() {
    use crate::observe::exposition::sample;
    use crate::observe::Telemetry;

    let (_turn, _dir, node) = lone_node().await;
    let telemetry = Telemetry::new();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(node.observe(telemetry.cluster(), stopped));

    let refused = node.propose(vec![create(1)]).await;
    assert!(
        matches!(refused, Err(ProposeError::Unavailable(_))),
        "{refused:?}"
    );
    let me = node.id();
    node.initialize(BTreeMap::from([(me, node.node().clone())]))
        .await
        .unwrap();
    wait_for(&node, "leading", |m| m.state == ServerState::Leader).await;
    node.propose(vec![create(1)]).await.unwrap();
    let m = wait_for(&node, "the write applied", |m| {
        let applied = m.last_applied.map(|l| l.index);
        applied == m.last_log_index && applied == m.local_committed.map(|l| l.index)
    })
    .await;

    // Stopping records the latest state: nothing is left to chance between the two tasks.
    stop.send(true).unwrap();
    task.await.unwrap();
    let text = telemetry.render(std::iter::empty());
    let get = |series: &str| sample(&text, series);
    assert_eq!(
        get(r#"sessiond_cluster_role{role="leader"}"#),
        Some(1.0),
        "{text}"
    );
    assert_eq!(get(r#"sessiond_cluster_role{role="learner"}"#), Some(0.0));
    assert_eq!(get("sessiond_cluster_term"), Some(m.current_term as f64));
    assert!(m.current_term >= 1);
    assert_eq!(
        get(&format!(r#"sessiond_cluster_leader{{node_id="{me}"}}"#)),
        Some(1.0)
    );
    assert_eq!(
        get(&format!(r#"sessiond_cluster_node_info{{node_id="{me}"}}"#)),
        Some(1.0)
    );
    let applied = m.last_applied.unwrap().index as f64;
    assert!(applied >= 1.0);
    assert_eq!(get("sessiond_cluster_applied_index"), Some(applied));
    assert_eq!(get("sessiond_cluster_commit_index"), Some(applied));
    assert_eq!(get("sessiond_cluster_last_log_index"), Some(applied));
    assert_eq!(get(r#"sessiond_cluster_members{kind="voter"}"#), Some(1.0));
    assert_eq!(
        get("sessiond_cluster_replication_lag_entries"),
        None,
        "no followers"
    );
    assert_eq!(get("sessiond_cluster_leader_changes_total"), Some(1.0));
    assert_eq!(
        get(r#"sessiond_cluster_proposals_total{result="ok"}"#),
        Some(1.0)
    );
    assert_eq!(
        get(r#"sessiond_cluster_proposals_total{result="unavailable"}"#),
        Some(1.0)
    );
    assert_eq!(get("sessiond_cluster_proposal_seconds_count"), Some(1.0));
    assert_eq!(get("sessiond_cluster_write_entries_total"), Some(1.0));
    node.shutdown().await;
}

/// Writes submitted while the engine is busy go as fewer entries than writes, and each write
/// still hears its own outcomes, in its own order: a stale one among them is stale alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_submitted_together_share_entries_and_each_gets_its_own_outcomes() {
    use crate::store::Applied as Outcome;

    let (_turn, _dir, node) = lone_node().await;
    let me = node.id();
    node.initialize(BTreeMap::from([(me, node.node().clone())]))
        .await
        .unwrap();
    let before = wait_for(&node, "leading", |m| m.state == ServerState::Leader)
        .await
        .last_log_index
        .unwrap_or(0);

    const WRITES: u32 = 200;
    // Every tenth write updates a session that does not exist (overtaken, on its own); the
    // odd ones create a session and update it; the others create one.
    let write = |n: u32| match (n % 10, n % 2) {
        (0, _) => (vec![update(10_000 + n, 2, "cart")], vec![Outcome::Stale]),
        (_, 1) => (
            vec![create(n), update(n, 2, "cart")],
            vec![Outcome::Done, Outcome::Done],
        ),
        _ => (vec![create(n)], vec![Outcome::Done]),
    };
    let mut pending = Vec::new();
    for n in 0..WRITES {
        pending.push(node.submit(write(n).0).await.unwrap());
    }
    for (n, p) in pending.into_iter().enumerate() {
        let applied = p.await.unwrap();
        assert_eq!(applied.0, write(n as u32).1, "write {n}");
    }
    let after = node
        .raft()
        .metrics()
        .borrow_watched()
        .last_log_index
        .unwrap();
    assert!(
        after - before < u64::from(WRITES),
        "{WRITES} writes took {} entries",
        after - before
    );
    let stored = sessions(node.store());
    assert_eq!(stored.len(), (WRITES - WRITES / 10) as usize);
    assert!(stored.iter().any(|s| s.attributes.contains_key("cart")));
    node.shutdown().await;
    // A stopped engine refuses the write outright: nothing was applied, and it says so.
    let refused = node.propose(vec![create(WRITES + 1)]).await;
    assert!(
        matches!(refused, Err(ProposeError::Fatal(_))),
        "{refused:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_restarted_whole_elects_a_leader_in_a_new_term() {
    let mut c = Cluster::start(config()).await;
    c.write(0..3).await;
    c.converge().await;
    // The last node to stop may still lead in its term (nobody is left to hand over to).
    let mut last_term = 0;
    let mut stopped = Vec::new();
    for i in 0..3 {
        last_term = last_term.max(c.nth(i).metrics().borrow_watched().current_term);
        stopped.push(c.stop(i).await);
    }
    for (i, (dir, addr)) in stopped.iter().enumerate() {
        c.restart(i, dir, *addr).await;
    }
    let l = c.converge().await;
    // Restored at once in its old term, a leader would count as committed only what it saved
    // as committed, and would propose no new first entry for its reads to wait on.
    let term = c.nth(l).metrics().borrow_watched().current_term;
    assert!(
        term > last_term,
        "leads in term {term}, as before the restart ({last_term})"
    );
    assert_eq!(sessions(c.nth(l).store()).len(), 3);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replication_stream_answers_each_request_and_ends_at_a_malformed_one() {
    use super::network::TARGET_HEADER;
    use super::pb::{self, cluster_client::ClusterClient};

    let c = Cluster::start(config()).await;
    let l = c.leader().await;
    let leader_vote = c.nth(l).metrics().borrow_watched().vote;
    let follower = c.nth((l + 1) % 3);
    let mut client = ClusterClient::connect(format!("http://{}", follower.peer_addr()))
        .await
        .unwrap();
    let stream_to = |target: NodeId, requests: Vec<pb::AppendEntriesRequest>| {
        let mut request = tonic::Request::new(tokio_stream::iter(requests));
        request
            .metadata_mut()
            .insert(TARGET_HEADER, target.to_string().parse().unwrap());
        request
    };
    let heartbeat = pb::AppendEntriesRequest {
        vote: Some(leader_vote),
        ..Default::default()
    };
    let malformed = pb::AppendEntriesRequest::default();

    let mut answers = client
        .append_stream(stream_to(follower.id(), vec![heartbeat.clone(), malformed]))
        .await
        .unwrap()
        .into_inner();
    let first = answers.message().await.unwrap().expect("an answer");
    assert_eq!(
        first,
        pb::AppendStreamResponse::default(),
        "the leader's own vote, nothing to append: accepted, matching up to no entry"
    );
    let end = answers.message().await.unwrap_err();
    assert_eq!(end.code(), tonic::Code::InvalidArgument);
    assert!(end.message().contains("vote"), "{end}");

    let wrong = client
        .append_stream(stream_to(follower.id() ^ 1, vec![heartbeat]))
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), tonic::Code::FailedPrecondition, "{wrong}");
    c.shutdown().await;
}
