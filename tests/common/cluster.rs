//! A replicated group of real `sessiond` processes on loopback, every peer link through a
//! [`Mesh`] of fault proxies.
//!
//! Each node advertises a name (`nI.test:7422`) as its peer address, and dials every other
//! node's name through its own proxy (`cluster.dial_overrides`), so a test can cut, delay or
//! reset any directed link. The real peer ports are ephemeral; the proxies learn them when
//! the nodes report them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sessiond::api::pb::session_store_client::SessionStoreClient;
use sessiond::cluster::pb::cluster_client::ClusterClient;
use sessiond::cluster::pb::{self as cpb};
use tonic::transport::Channel;

use super::faultproxy::Mesh;
use super::proc::{self, Proc};

/// How long a cluster may take to agree on something before a test gives up.
pub const AGREE: Duration = Duration::from_secs(30);

/// One node: its process (when running), and where it is.
pub struct Node {
    pub proc: Option<Proc>,
    /// Its real peer address (the proxies' upstream).
    pub peer: SocketAddr,
    /// Its ID, from `data_dir/node-id`.
    pub id: u64,
}

/// A group of `n` nodes.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub nodes: Vec<Node>,
    pub mesh: Mesh,
    n: usize,
    fsync: &'static str,
}

/// The name node `i` advertises as its peer address.
pub fn peer_name(i: usize) -> String {
    format!("n{i}.test:7422")
}

impl Cluster {
    /// Starts `n` nodes under `fsync`: node 0 bootstraps the group, the others are added
    /// one by one, and the call returns once every node knows the same leader.
    pub async fn start(n: usize, fsync: &'static str) -> Cluster {
        let placeholder: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let mesh = Mesh::start(&vec![placeholder; n]).await;
        let dir = tempfile::tempdir().unwrap();
        let mut cluster = Cluster {
            dir,
            nodes: Vec::new(),
            mesh,
            n,
            fsync,
        };
        for i in 0..n {
            cluster.write_config(i);
            let node = cluster.spawn(i, i == 0);
            cluster.nodes.push(node);
        }
        cluster.wait_for_leader(&[0]).await;
        let leader = cluster.admin(0).await;
        for i in 1..n {
            add(leader.clone(), cluster.nodes[i].id, i, &cluster).await;
        }
        let all: Vec<usize> = (0..n).collect();
        cluster.wait_for_leader(&all).await;
        cluster
    }

    fn node_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("n{i}"))
    }

    fn write_config(&self, i: usize) {
        let dir = self.node_dir(i);
        std::fs::create_dir_all(&dir).unwrap();
        let n = self.n;
        let overrides: Vec<String> = (0..n)
            .filter(|&j| j != i)
            .map(|j| format!("\"{}\" = \"{}\"", peer_name(j), self.mesh.addr(i, j)))
            .collect();
        let config = format!(
            "data_dir = {data:?}\nfsync = \"{fsync}\"\n\n[cluster]\npeer_listen = \"127.0.0.1:0\"\n\
             advertise_peer = \"{name}\"\nheartbeat_interval = \"150ms\"\nelection_timeout_min = \"500ms\"\nelection_timeout_max = \"1s\"\ndial_overrides = {{ {overrides} }}\n",
            data = dir.join("data"),
            fsync = self.fsync,
            name = peer_name(i),
            overrides = overrides.join(", "),
        );
        std::fs::write(dir.join("sessiond.toml"), config).unwrap();
    }

    /// Starts node `i`'s process (again, after a kill: with its data intact).
    fn spawn(&self, i: usize, bootstrap: bool) -> Node {
        let dir = self.node_dir(i);
        let config = dir.join("sessiond.toml");
        let mut args = vec!["--config", config.to_str().unwrap()];
        if bootstrap {
            args.push("--bootstrap");
        }
        let proc = proc::spawn(&dir, &args, &[("RUST_LOG", "info,openraft=warn")])
            .unwrap_or_else(|out| panic!("node {i} did not start:\n{out}"));
        let peer = reported_peer(&proc.output());
        self.mesh.set_upstream(i, peer);
        let id = node_id(&dir.join("data"));
        Node {
            proc: Some(proc),
            peer,
            id,
        }
    }

    /// Starts node `i` again after [`Cluster::kill`], on its data directory.
    pub fn restart(&mut self, i: usize) {
        assert!(self.nodes[i].proc.is_none(), "node {i} is running");
        self.nodes[i] = self.spawn(i, false);
    }

    /// `kill -9` of node `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(p) = self.nodes[i].proc.take() {
            p.kill();
        }
    }

    /// SIGTERM to node `i`, and its exit status and output once it has shut down.
    pub fn terminate(&mut self, i: usize) -> (std::process::ExitStatus, String) {
        self.nodes[i].proc.take().expect("running").terminate()
    }

    /// A client of node `i`'s session store.
    pub async fn client(&self, i: usize) -> SessionStoreClient<Channel> {
        super::connect(self.nodes[i].proc.as_ref().expect("running").url()).await
    }

    /// A client of node `i`'s peer service.
    pub async fn admin(&self, i: usize) -> ClusterClient<Channel> {
        let url = format!("http://{}", self.nodes[i].peer);
        ClusterClient::new(super::channel(url).await)
    }

    /// Node `i`'s status.
    pub async fn status(&self, i: usize) -> Option<cpb::StatusResponse> {
        let mut admin = self.admin(i).await;
        admin
            .status(cpb::StatusRequest {})
            .await
            .ok()
            .map(|r| r.into_inner())
    }

    /// Waits until every node of `among` that runs reports the same leader, a member of the
    /// group; returns its index.
    pub async fn wait_for_leader(&self, among: &[usize]) -> usize {
        let deadline = Instant::now() + AGREE;
        loop {
            let mut leaders = Vec::new();
            for &i in among {
                if self.nodes[i].proc.is_some() {
                    leaders.push(self.status(i).await.map(|s| s.leader_id));
                }
            }
            if let Some(Some(l)) = leaders.first().copied() {
                if l != 0 && leaders.iter().all(|x| *x == Some(l)) {
                    if let Some(i) = self.nodes.iter().position(|n| n.id == l) {
                        return i;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "no agreed leader among {among:?} within {AGREE:?}: {leaders:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until node `i` has applied at least `index`.
    pub async fn wait_applied(&self, i: usize, index: u64) {
        let deadline = Instant::now() + AGREE;
        loop {
            let applied = self.status(i).await.map_or(0, |s| s.applied_index);
            if applied >= index {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "node {i} applied {applied}, not {index}, within {AGREE:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(p) = n.proc.take() {
                p.kill();
            }
        }
    }
}

/// Adds node `i` (ID `id`) to the group through the leader's peer service.
async fn add(mut leader: ClusterClient<Channel>, id: u64, i: usize, cluster: &Cluster) {
    let client_addr = cluster.nodes[i].proc.as_ref().unwrap().grpc.clone();
    leader
        .add_learner(cpb::AddLearnerRequest {
            node_id: id,
            node: Some(cpb::Node {
                peer_addr: peer_name(i),
                client_addr,
            }),
        })
        .await
        .unwrap_or_else(|e| panic!("adding node {i} as a learner: {e}"));
    let status = leader
        .status(cpb::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    let mut voters: Vec<u64> = status
        .membership
        .map(|m| m.configs.last().map(|c| c.ids.clone()))
        .unwrap_or_default()
        .unwrap_or_default();
    voters.push(id);
    leader
        .change_membership(cpb::ChangeMembershipRequest {
            voters,
            retain: false,
        })
        .await
        .unwrap_or_else(|e| panic!("making node {i} a voter: {e}"));
}

/// The peer address a node's start-up log reports.
fn reported_peer(output: &str) -> SocketAddr {
    output
        .lines()
        .find(|l| l.contains("cluster node started"))
        .and_then(|l| l.split("peer=").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no peer address in the start-up log:\n{output}"))
}

/// The node ID kept in `data_dir/node-id`.
fn node_id(data_dir: &Path) -> u64 {
    std::fs::read_to_string(data_dir.join("node-id"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}
