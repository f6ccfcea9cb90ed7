//! A replicated group of real `sessiond` processes on loopback, every peer link through a
//! [`Mesh`] of fault proxies.
//!
//! Each node advertises a name (`nI.test:7422`) as its peer address, and dials every other
//! node's name through its own proxy (`cluster.dial_overrides`), so a test can cut, delay or
//! reset any directed link. The real peer ports are ephemeral; the proxies learn them when
//! the nodes report them.
//!
//! [`Cluster::start_tls`] turns on peer mutual TLS (a cluster CA, each node's certificate
//! naming its advertised peer host, which the proxies pass through untouched) and TLS on
//! the client ports.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sessiond::api::pb::session_store_client::SessionStoreClient;
use sessiond::cluster::pb::cluster_client::ClusterClient;
use sessiond::cluster::pb::{self as cpb};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::certs::{self, Ca};
use super::faultproxy::Mesh;
use super::proc::{self, Proc};

/// How long a cluster may take to agree on something before a test gives up.
pub const AGREE: Duration = Duration::from_secs(30);

/// How long one admin call may take: a paused (SIGSTOPped) node accepts connections and never
/// answers.
const ADMIN_CALL: Duration = Duration::from_secs(2);

/// One node: its process (when running), and where it is.
pub struct Node {
    pub proc: Option<Proc>,
    /// Its real peer address (the proxies' upstream).
    pub peer: SocketAddr,
    /// Its ID, from `data_dir/node-id`.
    pub id: u64,
    /// Its client address, kept across restarts: the group's membership names it.
    pub grpc: String,
    /// Stopped with SIGSTOP ([`Cluster::pause`]) and not yet resumed.
    pub paused: bool,
}

/// A group of `n` nodes.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub nodes: Vec<Node>,
    pub mesh: Mesh,
    n: usize,
    fsync: &'static str,
    /// Peer and client-port TLS, when on.
    pub tls: Option<Tls>,
}

/// The certificates of a cluster with TLS on.
pub struct Tls {
    /// The cluster CA: every node's peer certificate, and [`Tls::admin`].
    pub cluster_ca: Ca,
    /// A peer certificate and key of the tests' own, for the admin calls.
    pub admin: (String, String),
    /// The CA of the client ports' certificates (issued for `localhost`).
    pub client_ca: Ca,
}

impl Tls {
    fn new() -> Tls {
        let cluster_ca = Ca::new("cluster ca");
        let admin = cluster_ca.issue("sessionctl");
        Tls {
            cluster_ca,
            admin,
            client_ca: Ca::new("client port ca"),
        }
    }

    /// TLS to node `i`'s peer port with `identity`, verified against the cluster CA under
    /// its advertised name.
    pub fn peer_config(&self, i: usize, identity: Option<&(String, String)>) -> ClientTlsConfig {
        let config = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.cluster_ca.pem))
            .domain_name(peer_host(i));
        match identity {
            Some((cert, key)) => config.identity(Identity::from_pem(cert, key)),
            None => config,
        }
    }
}

/// The host of [`peer_name`].
pub fn peer_host(i: usize) -> String {
    format!("n{i}.test")
}

/// The name node `i` advertises as its peer address.
pub fn peer_name(i: usize) -> String {
    format!("n{i}.test:7422")
}

impl Cluster {
    /// Starts `n` nodes under `fsync`: node 0 bootstraps the group, the others are added
    /// one by one, and the call returns once every node knows the same leader.
    pub async fn start(n: usize, fsync: &'static str) -> Cluster {
        Self::start_with(n, fsync, None).await
    }

    /// Like [`Cluster::start`], with peer mutual TLS and TLS on the client ports.
    pub async fn start_tls(n: usize, fsync: &'static str) -> Cluster {
        Self::start_with(n, fsync, Some(Tls::new())).await
    }

    async fn start_with(n: usize, fsync: &'static str, tls: Option<Tls>) -> Cluster {
        let placeholder: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let mesh = Mesh::start(&vec![placeholder; n]).await;
        let dir = tempfile::tempdir().unwrap();
        let mut cluster = Cluster {
            dir,
            nodes: Vec::new(),
            mesh,
            n,
            fsync,
            tls,
        };
        for i in 0..n {
            cluster.write_config(i);
            let node = cluster.spawn(i, i == 0, None);
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
        let (mut client_tls, mut peer_tls) = (String::new(), String::new());
        if let Some(tls) = &self.tls {
            let (cert, key) = tls.client_ca.issue("localhost");
            client_tls = format!(
                "tls_cert = {:?}\ntls_key = {:?}\n",
                certs::write(&dir, "client-port.pem", &cert),
                certs::write(&dir, "client-port.key", &key),
            );
            let (cert, key) = tls.cluster_ca.issue(&peer_host(i));
            peer_tls = format!(
                "tls_cert = {:?}\ntls_key = {:?}\ntls_ca = {:?}\n",
                certs::write(&dir, "peer.pem", &cert),
                certs::write(&dir, "peer.key", &key),
                certs::write(&dir, "cluster-ca.pem", &tls.cluster_ca.pem),
            );
        }
        let config = format!(
            "data_dir = {data:?}\nfsync = \"{fsync}\"\n{client_tls}\n[cluster]\npeer_listen = \"127.0.0.1:0\"\n\
             advertise_peer = \"{name}\"\ndial_overrides = {{ {overrides} }}\n{peer_tls}",
            data = dir.join("data"),
            fsync = self.fsync,
            name = peer_name(i),
            overrides = overrides.join(", "),
        );
        std::fs::write(dir.join("sessiond.toml"), config).unwrap();
    }

    /// Starts node `i`'s process (again, after a kill: with its data intact), with gRPC on
    /// `grpc` if given (a restart), else on an ephemeral port.
    fn spawn(&self, i: usize, bootstrap: bool, grpc: Option<&str>) -> Node {
        let dir = self.node_dir(i);
        let config = dir.join("sessiond.toml");
        let mut args = vec!["--config", config.to_str().unwrap()];
        if bootstrap {
            args.push("--bootstrap");
        }
        let env = [("RUST_LOG", "info,openraft=warn")];
        let listen = grpc.unwrap_or("127.0.0.1:0");
        let proc = proc::spawn_listening(&dir, listen, &args, &env)
            .unwrap_or_else(|out| panic!("node {i} did not start:\n{out}"));
        let peer = reported_peer(&proc.output());
        self.mesh.set_upstream(i, peer);
        let id = node_id(&dir.join("data"));
        Node {
            grpc: proc.grpc.clone(),
            proc: Some(proc),
            peer,
            id,
            paused: false,
        }
    }

    /// Starts node `i` again after [`Cluster::kill`], on its data directory and its client
    /// address: the membership records that address, and followers forward to it.
    pub fn restart(&mut self, i: usize) {
        assert!(self.nodes[i].proc.is_none(), "node {i} is running");
        let grpc = self.nodes[i].grpc.clone();
        self.nodes[i] = self.spawn(i, false, Some(&grpc));
    }

    /// `kill -9` of node `i` (paused or not).
    pub fn kill(&mut self, i: usize) {
        if let Some(p) = self.nodes[i].proc.take() {
            p.kill();
        }
        self.nodes[i].paused = false;
    }

    /// SIGSTOP of node `i`: it holds its sockets open and answers nothing until
    /// [`Cluster::resume`].
    pub fn pause(&mut self, i: usize) {
        self.nodes[i].proc.as_ref().expect("running").pause();
        self.nodes[i].paused = true;
    }

    /// SIGCONT of node `i` after [`Cluster::pause`].
    pub fn resume(&mut self, i: usize) {
        self.nodes[i].proc.as_ref().expect("running").resume();
        self.nodes[i].paused = false;
    }

    /// Whether node `i` runs and is not paused.
    pub fn up(&self, i: usize) -> bool {
        self.nodes[i].proc.is_some() && !self.nodes[i].paused
    }

    /// Node `i` lost its disk: it is killed, its data directory is deleted, and it starts
    /// empty under a fresh ID (never reuse an ID). Through the leader's peer service, the old
    /// ID is removed from the group and the new one added as a learner, then made a voter.
    /// Each step is retried while the group elects or is busy with another change, until
    /// [`AGREE`] runs out; returns the new ID.
    pub async fn wipe_and_rejoin(&mut self, i: usize) -> u64 {
        self.kill(i);
        let old = self.nodes[i].id;
        std::fs::remove_dir_all(self.node_dir(i).join("data")).unwrap();
        let grpc = self.nodes[i].grpc.clone();
        self.nodes[i] = self.spawn(i, false, Some(&grpc));
        let new = self.nodes[i].id;
        assert_ne!(new, old, "a wiped node drew its old ID again");
        let others: Vec<usize> = (0..self.n).filter(|&j| j != i).collect();
        let deadline = Instant::now() + AGREE;
        loop {
            let leader = self.wait_for_leader(&others).await;
            match self.swap_member(leader, old, new, i).await {
                Ok(()) => return new,
                Err(e) => assert!(
                    Instant::now() < deadline,
                    "node {i} could not rejoin as {new} within {AGREE:?}: {e}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Through node `leader`: voters without `old`, then `new` (node `i`) as a learner, then
    /// as a voter. Every step is idempotent, so a failed attempt can be repeated whole.
    async fn swap_member(
        &self,
        leader: usize,
        old: u64,
        new: u64,
        i: usize,
    ) -> Result<(), tonic::Status> {
        let mut admin = self
            .try_admin(leader)
            .await
            .ok_or_else(|| tonic::Status::unavailable("the leader does not answer"))?;
        let voters = |s: &cpb::StatusResponse| -> Vec<u64> {
            s.membership
                .as_ref()
                .and_then(|m| m.configs.last().map(|c| c.ids.clone()))
                .unwrap_or_default()
        };
        let status = admin.status(cpb::StatusRequest {}).await?.into_inner();
        let without_old: Vec<u64> = voters(&status)
            .into_iter()
            .filter(|&v| v != old && v != new)
            .collect();
        admin
            .change_membership(cpb::ChangeMembershipRequest {
                voters: without_old.clone(),
                retain: false,
            })
            .await?;
        admin
            .add_learner(cpb::AddLearnerRequest {
                node_id: new,
                node: Some(cpb::Node {
                    peer_addr: peer_name(i),
                    client_addr: self.nodes[i].grpc.clone(),
                }),
            })
            .await?;
        let mut all = without_old;
        all.push(new);
        admin
            .change_membership(cpb::ChangeMembershipRequest {
                voters: all,
                retain: false,
            })
            .await?;
        Ok(())
    }

    /// SIGTERM to node `i`, and its exit status and output once it has shut down.
    pub fn terminate(&mut self, i: usize) -> (std::process::ExitStatus, String) {
        self.nodes[i].proc.take().expect("running").terminate()
    }

    /// What node `i` has logged so far (empty once it is killed).
    pub fn output(&self, i: usize) -> String {
        self.nodes[i]
            .proc
            .as_ref()
            .map(|p| p.output())
            .unwrap_or_default()
    }

    /// A client of node `i`'s session store.
    pub async fn client(&self, i: usize) -> SessionStoreClient<Channel> {
        let proc = self.nodes[i].proc.as_ref().expect("running");
        match &self.tls {
            None => super::connect(proc.url()).await,
            Some(tls) => {
                let addr = proc.grpc.parse().unwrap();
                SessionStoreClient::new(certs::channel(addr, &tls.client_ca, None).await.unwrap())
            }
        }
    }

    /// Node `i`'s peer port, over TLS with the tests' own peer certificate when TLS is on.
    pub fn peer_endpoint(&self, i: usize) -> Endpoint {
        let endpoint = match &self.tls {
            None => Endpoint::from_shared(format!("http://{}", self.nodes[i].peer)).unwrap(),
            Some(tls) => Endpoint::from_shared(format!("https://{}", self.nodes[i].peer))
                .unwrap()
                .tls_config(tls.peer_config(i, Some(&tls.admin)))
                .unwrap(),
        };
        endpoint.connect_timeout(AGREE)
    }

    /// A client of node `i`'s peer service.
    pub async fn admin(&self, i: usize) -> ClusterClient<Channel> {
        ClusterClient::new(self.peer_endpoint(i).connect().await.unwrap())
    }

    /// A client of node `i`'s peer service whose calls give up after [`ADMIN_CALL`]; `None`
    /// if it cannot be reached.
    pub async fn try_admin(&self, i: usize) -> Option<ClusterClient<Channel>> {
        let endpoint = self
            .peer_endpoint(i)
            .connect_timeout(ADMIN_CALL)
            .timeout(ADMIN_CALL);
        let channel = tokio::time::timeout(ADMIN_CALL, endpoint.connect())
            .await
            .ok()?
            .ok()?;
        Some(ClusterClient::new(channel))
    }

    /// Node `i`'s status; `None` if it does not answer within [`ADMIN_CALL`].
    pub async fn status(&self, i: usize) -> Option<cpb::StatusResponse> {
        let mut admin = self.try_admin(i).await?;
        let call = admin.status(cpb::StatusRequest {});
        match tokio::time::timeout(ADMIN_CALL, call).await {
            Ok(Ok(r)) => Some(r.into_inner()),
            _ => None,
        }
    }

    /// Node `i`'s digest of its sessions; `None` if it does not answer within [`ADMIN_CALL`].
    pub async fn digest(&self, i: usize) -> Option<cpb::DigestResponse> {
        let mut admin = self.try_admin(i).await?;
        let call = admin.digest(cpb::DigestRequest {});
        match tokio::time::timeout(ADMIN_CALL, call).await {
            Ok(Ok(r)) => Some(r.into_inner()),
            _ => None,
        }
    }

    /// Waits until every node reports the same applied index twice in a row, then returns
    /// each node's digest. Call it with every node up and the clients stopped. Panics if they
    /// do not settle within [`AGREE`].
    pub async fn settled_digests(&self) -> Vec<cpb::DigestResponse> {
        let deadline = Instant::now() + AGREE;
        let mut last: Option<Vec<cpb::DigestResponse>> = None;
        loop {
            let mut now = Vec::new();
            for i in 0..self.n {
                if let Some(d) = self.digest(i).await {
                    now.push(d);
                }
            }
            let agreed = now.len() == self.n
                && now.iter().all(|d| d.applied_index == now[0].applied_index)
                && last.as_ref().is_some_and(|l| {
                    l.len() == self.n && l.iter().all(|d| d.applied_index == now[0].applied_index)
                });
            if agreed {
                return now;
            }
            assert!(
                Instant::now() < deadline,
                "applied indexes did not settle within {AGREE:?}: {:?}",
                now.iter().map(|d| d.applied_index).collect::<Vec<_>>()
            );
            last = Some(now);
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// Waits until every node of `among` that runs reports the same leader, a member of the
    /// group; returns its index.
    pub async fn wait_for_leader(&self, among: &[usize]) -> usize {
        self.wait_for_leader_but(among, None).await
    }

    /// Like [`Cluster::wait_for_leader`], for a leader other than node `not`: the group has
    /// moved on from it.
    pub async fn wait_for_new_leader(&self, among: &[usize], not: usize) -> usize {
        self.wait_for_leader_but(among, Some(not)).await
    }

    async fn wait_for_leader_but(&self, among: &[usize], not: Option<usize>) -> usize {
        let deadline = Instant::now() + AGREE;
        loop {
            let mut leaders = Vec::new();
            for &i in among {
                if self.up(i) {
                    leaders.push(self.status(i).await.map(|s| s.leader_id));
                }
            }
            if let Some(Some(l)) = leaders.first().copied() {
                if l != 0 && leaders.iter().all(|x| *x == Some(l)) {
                    match self.nodes.iter().position(|n| n.id == l) {
                        Some(i) if Some(i) != not => return i,
                        _ => {}
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "no agreed leader among {among:?} within {AGREE:?}: {leaders:?} (node IDs {:?})",
                self.nodes.iter().map(|n| n.id).collect::<Vec<_>>()
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
                // SIGKILL works on a stopped process too.
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
