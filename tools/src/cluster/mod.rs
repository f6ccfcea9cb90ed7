//! `sessionctl cluster`: the admin calls of a node's peer service (`Cluster` in
//! `proto/sessiond/cluster/v1/cluster.proto`), and the steps that string them together.
//!
//! Each command is one function here, so the tests run them against real in-process nodes;
//! `render` turns their answers into JSON and into the text an operator reads.
//!
//! Membership changes and leadership moves are made on the leader. Every command that needs
//! it finds the leader from the `Status` of the node it is pointed at, following that node's
//! word for who leads: the operator can name any member, or several (`a:7422,b:7422`), tried
//! in turn until one is a member, so a script need not know which node is up.
//!
//! A peer port with mutual TLS is reached with [`Options::tls`]: the cluster CA, and a
//! certificate it signed (the peer port asks every dialler for one). The leader a node names
//! is dialled the same way, by the peer address its membership records.
//!
//! A deployment forms its cluster with `init_once` and `add`, both safe to repeat: a node of
//! the group already in a cluster means "formed", never "start another" (a node that lost its
//! data would otherwise found a second cluster beside the first).

pub mod render;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::time::{Duration, Instant};

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Response};

use self::pb::cluster_client::ClusterClient;

/// The generated peer protocol: its messages and the client stub.
#[allow(missing_docs, clippy::all)]
pub mod pb {
    tonic::include_proto!("sessiond.cluster.v1");
}

/// The daemon's default `cluster.peer_listen`.
pub const DEFAULT_PEER: &str = "127.0.0.1:7422";

/// How often a wait re-reads a node's status.
const POLL: Duration = Duration::from_millis(100);

/// How many times a search for the leader follows a node's word for who leads: a leader
/// that moves while we look is followed, a loop is not.
const LEADER_HOPS: usize = 3;

/// The role a node's `Status` reports when it leads.
pub const LEADER: &str = "leader";

/// How long the calls may take, and how the peer port is reached.
#[derive(Debug, Clone)]
pub struct Options {
    /// Connecting, and each `Status`.
    pub timeout: Duration,
    /// A membership change, a new node's catching up, a leadership move, and a new
    /// cluster's first election.
    pub wait: Duration,
    /// Peer TLS (the cluster's `cluster.tls_*`); `None`: plaintext.
    pub tls: Option<PeerTls>,
}

/// Mutual TLS to the peer port: the cluster CA, and a certificate it signed.
#[derive(Debug, Clone)]
pub struct PeerTls {
    /// PEM bundle of the cluster CA (the nodes' `cluster.tls_ca`).
    pub ca_pem: Vec<u8>,
    /// PEM certificate and key from the cluster CA: the peer port asks every dialler for one.
    pub identity_pem: Option<(Vec<u8>, Vec<u8>)>,
    /// The name node certificates are verified against (the nodes'
    /// `cluster.tls_server_name`); `None`: the host of the address dialled.
    pub server_name: Option<String>,
}

/// Why a cluster command failed; each message says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The address is not one a connection can be made to.
    #[error("{addr:?} is not a peer address (host:port): {why}")]
    BadAddress {
        /// The address given.
        addr: String,
        /// Why it cannot be used.
        why: String,
    },
    /// Nothing answered on the peer port.
    #[error(
        "cannot reach the peer port at {addr}{whose}: {why} (is sessiond running there with a \
         [cluster] section, and is this its cluster.peer_listen?)"
    )]
    Unreachable {
        /// The address.
        addr: String,
        /// Whose address it is, when not the operator's (", the leader (node N)").
        whose: String,
        /// What the connection attempt said.
        why: String,
    },
    /// A node answered a call with an error (its message says why).
    #[error("{call} on {addr}: {}", .status.message())]
    Refused {
        /// The node's address.
        addr: String,
        /// The call.
        call: &'static str,
        /// Its answer.
        status: tonic::Status,
    },
    /// The node belongs to no cluster yet.
    #[error(
        "node {id} at {addr} is not part of a cluster yet: start one with `sessionctl cluster \
         init --peer {addr}`, or point --peer at a member of the cluster"
    )]
    NotInitialized {
        /// The node's ID.
        id: u64,
        /// Its address.
        addr: String,
    },
    /// No node leads, as far as the node asked knows.
    #[error(
        "no leader: node {id} at {addr} knows of none; an election may be under way, or fewer \
         than a majority of the voters are up ({voters} voters); retry shortly, and check \
         `sessionctl cluster status` on each member"
    )]
    NoLeader {
        /// The node asked.
        id: u64,
        /// Its address.
        addr: String,
        /// How many voters its membership has.
        voters: usize,
    },
    /// `init` on a node that is already part of a cluster.
    #[error(
        "node {id} at {addr} is already part of a cluster (members: {members}); init starts a \
         new cluster and is run once, on its first node; to grow a cluster use `sessionctl \
         cluster add`"
    )]
    AlreadyInitialized {
        /// The node's ID.
        id: u64,
        /// Its address.
        addr: String,
        /// The members it knows of.
        members: String,
    },
    /// `add` of a node that belongs to another cluster.
    #[error(
        "node {id} at {addr} already belongs to another cluster (members: {members}); a node \
         joins only from an empty data directory: stop it, move its data directory away, and \
         start it again (it draws a new ID)"
    )]
    InAnotherCluster {
        /// The node's ID.
        id: u64,
        /// Its address.
        addr: String,
        /// The members it knows of.
        members: String,
    },
    /// `add` of a node at an address that another member still holds: the node it replaced.
    #[error(
        "node {old} is still a member at {addr}, where node {id} answers now: {old} is the node \
         this one replaced (its data directory was lost). Remove it first with `sessionctl \
         cluster remove --id {old}`, then add {addr} again"
    )]
    AddressTaken {
        /// The node at the address now.
        id: u64,
        /// The member recorded at that address.
        old: u64,
        /// The address.
        addr: String,
    },
    /// The node ID is not a member (or not a voter, where one is needed).
    #[error("node {id} is not {what} of the cluster (members: {members})")]
    NotAMember {
        /// The ID given.
        id: u64,
        /// "a member", "a voter".
        what: &'static str,
        /// The members there are.
        members: String,
    },
    /// The node does not report its own addresses (a sessiond from before `Status.node`).
    #[error("node {id} at {addr} does not report its own addresses; upgrade it first")]
    NoAddresses {
        /// The node's ID.
        id: u64,
        /// Its address.
        addr: String,
    },
    /// A call or a wait took longer than allowed.
    #[error("{what}: not done after {}; {next}", humantime::format_duration(*.after))]
    TimedOut {
        /// What was waited for.
        what: String,
        /// How long.
        after: Duration,
        /// What state that leaves, and what to do.
        next: String,
    },
}

impl ClusterError {
    /// The gRPC code the error maps to: sessionctl's exit code.
    pub fn code(&self) -> Code {
        match self {
            ClusterError::BadAddress { .. } => Code::InvalidArgument,
            ClusterError::Unreachable { .. } | ClusterError::NoLeader { .. } => Code::Unavailable,
            ClusterError::Refused { status, .. } => status.code(),
            ClusterError::NotInitialized { .. }
            | ClusterError::AlreadyInitialized { .. }
            | ClusterError::InAnotherCluster { .. }
            | ClusterError::AddressTaken { .. }
            | ClusterError::NoAddresses { .. } => Code::FailedPrecondition,
            ClusterError::NotAMember { .. } => Code::NotFound,
            ClusterError::TimedOut { .. } => Code::DeadlineExceeded,
        }
    }
}

/// A connection to one node's peer service (a cheap handle).
#[derive(Clone)]
pub struct Peer {
    addr: String,
    client: ClusterClient<Channel>,
    timeout: Duration,
}

impl Peer {
    /// Connects to the peer service at `addr` (host:port, or http(s)://host:port), over
    /// mutual TLS with `o.tls` if set.
    pub async fn connect(addr: &str, o: &Options) -> Result<Peer, ClusterError> {
        Self::connect_to(addr, "", o).await
    }

    async fn connect_to(addr: &str, whose: &str, o: &Options) -> Result<Peer, ClusterError> {
        if addr.contains(',') {
            return Err(ClusterError::BadAddress {
                addr: addr.into(),
                why: "this command asks one node; a list is taken where any member will do \
                      (add, remove, transfer-leader)"
                    .into(),
            });
        }
        let timeout = o.timeout;
        let scheme = if o.tls.is_some() { "https" } else { "http" };
        let uri = match addr.contains("://") {
            true => addr.to_string(),
            false => format!("{scheme}://{addr}"),
        };
        let bad = |why: String| ClusterError::BadAddress {
            addr: addr.into(),
            why,
        };
        let mut endpoint = Endpoint::from_shared(uri)
            .map_err(|e| bad(chain(&e)))?
            .connect_timeout(timeout);
        if let Some(tls) = &o.tls {
            let mut config =
                ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&tls.ca_pem));
            if let Some((cert, key)) = &tls.identity_pem {
                config = config.identity(Identity::from_pem(cert, key));
            }
            if let Some(name) = &tls.server_name {
                config = config.domain_name(name);
            }
            endpoint = endpoint.tls_config(config).map_err(|e| bad(chain(&e)))?;
        }
        let unreachable = |why: String| ClusterError::Unreachable {
            addr: addr.into(),
            whose: whose.into(),
            why,
        };
        let channel = tokio::time::timeout(timeout, endpoint.connect())
            .await
            .map_err(|_| {
                unreachable(format!(
                    "no answer in {}",
                    humantime::format_duration(timeout)
                ))
            })?
            .map_err(|e| unreachable(chain(&e)))?;
        Ok(Peer {
            addr: addr.into(),
            client: ClusterClient::new(channel),
            timeout,
        })
    }

    /// The address this connection was made to.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The node's view of the cluster.
    pub async fn status(&self) -> Result<pb::StatusResponse, ClusterError> {
        let mut c = self.client.clone();
        self.call("Status", self.timeout, c.status(pb::StatusRequest {}))
            .await
    }

    /// Makes `call` within `limit`; a node's error becomes [`ClusterError::Refused`].
    async fn call<T>(
        &self,
        call: &'static str,
        limit: Duration,
        f: impl Future<Output = Result<Response<T>, tonic::Status>>,
    ) -> Result<T, ClusterError> {
        match tokio::time::timeout(limit, f).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(status)) => Err(ClusterError::Refused {
                addr: self.addr.clone(),
                call,
                status,
            }),
            Err(_) => Err(ClusterError::TimedOut {
                what: format!("{call} on {}", self.addr),
                after: limit,
                next: "the node may still complete it; check `sessionctl cluster status`".into(),
            }),
        }
    }
}

/// The status of the node at `addr`.
pub async fn status(addr: &str, o: &Options) -> Result<pb::StatusResponse, ClusterError> {
    Peer::connect(addr, o).await?.status().await
}

/// Starts a new cluster with the node at `addr` as its only voter, and returns its status
/// once it leads.
pub async fn init(addr: &str, o: &Options) -> Result<pb::StatusResponse, ClusterError> {
    let peer = Peer::connect(addr, o).await?;
    let s = peer.status().await?;
    let members = members(&s);
    if !members.is_empty() {
        return Err(ClusterError::AlreadyInitialized {
            id: s.node_id,
            addr: addr.into(),
            members: list(members.keys()),
        });
    }
    let node = own_node(&s, addr)?;
    let mut c = peer.client.clone();
    let req = pb::InitRequest {
        members: BTreeMap::from([(s.node_id, node)]),
    };
    peer.call("Init", o.wait, c.init(req)).await?;
    wait_for(&peer, o, "the new cluster to elect its leader", |s| {
        s.role == LEADER
    })
    .await
}

/// What `init_once` did.
#[derive(Debug)]
pub enum InitOnce {
    /// No node of the group was in a cluster: a new one was started. Its first node's status.
    Started(pb::StatusResponse),
    /// The node at `addr` is in a cluster already, so none was started. Its status.
    Exists {
        /// The node found in a cluster.
        addr: String,
        /// Its status.
        status: pb::StatusResponse,
    },
}

/// `init` made safe to repeat, for a deployment's one-shot job: starts a new cluster on the
/// node at `addr` only if neither it nor any node of `group` (the other nodes meant to form
/// it) is in a cluster yet. A node that cannot be reached is waited for up to `o.wait`, and
/// past that stops it, since that node may be in a cluster.
pub async fn init_once(
    addr: &str,
    group: &[String],
    o: &Options,
) -> Result<InitOnce, ClusterError> {
    let deadline = Instant::now() + o.wait;
    for a in std::iter::once(addr).chain(group.iter().map(String::as_str)) {
        let s = loop {
            match status(a, o).await {
                Err(ClusterError::Unreachable { .. }) if Instant::now() < deadline => {
                    tokio::time::sleep(POLL).await
                }
                other => break other?,
            }
        };
        // A node being added knows its leader before the membership reaches it.
        if !members(&s).is_empty() || s.leader_id != 0 {
            return Ok(InitOnce::Exists {
                addr: a.into(),
                status: s,
            });
        }
    }
    init(addr, o).await.map(InitOnce::Started)
}

/// What `add` did.
#[derive(Debug)]
pub struct Added {
    /// The new voter.
    pub node_id: u64,
    /// It was a voter already: nothing was changed.
    pub already_voter: bool,
    /// The leader's status afterwards.
    pub status: pb::StatusResponse,
}

/// Adds the node whose peer service is at `node_addr` to the cluster `peer_addr` belongs to:
/// as a learner on the leader, returning once it has caught up, then as a voter.
pub async fn add(peer_addr: &str, node_addr: &str, o: &Options) -> Result<Added, ClusterError> {
    let new = Peer::connect(node_addr, o).await?;
    let ns = new.status().await?;
    let id = ns.node_id;
    let node = own_node(&ns, node_addr)?;
    let (leader, ls) = find_leader(peer_addr, o).await?;
    let ours = members(&ls);
    if voters(&ls).contains(&id) {
        return Ok(Added {
            node_id: id,
            already_voter: true,
            status: ls,
        });
    }
    let theirs = members(&ns);
    if !ours.contains_key(&id) && !theirs.is_empty() {
        return Err(ClusterError::InAnotherCluster {
            id,
            addr: node_addr.into(),
            members: list(theirs.keys()),
        });
    }
    let held = ours
        .iter()
        .find(|(other, n)| **other != id && n.peer_addr == node.peer_addr);
    if let Some((old, _)) = held {
        return Err(ClusterError::AddressTaken {
            id,
            old: *old,
            addr: node.peer_addr.clone(),
        });
    }
    let mut c = leader.client.clone();
    let req = pb::AddLearnerRequest {
        node_id: id,
        node: Some(node),
    };
    leader
        .call("AddLearner", o.wait, c.add_learner(req))
        .await
        .map_err(|e| match e {
            ClusterError::TimedOut { what, after, .. } => ClusterError::TimedOut {
                what: format!("{what} (node {id} catching up with the leader's log)"),
                after,
                next: "it is a learner now and keeps catching up; run the same command again \
                       (with a longer --wait) to make it a voter"
                    .into(),
            },
            other => other,
        })?;
    // The voters as they are now, plus the new one; the leader makes the change in two steps
    // (joint consensus) and answers once both are committed.
    let mut voters = voters(&leader.status().await?);
    voters.insert(id);
    let req = pb::ChangeMembershipRequest {
        voters: voters.into_iter().collect(),
        retain: false,
    };
    leader
        .call("ChangeMembership", o.wait, c.change_membership(req))
        .await?;
    Ok(Added {
        node_id: id,
        already_voter: false,
        status: leader.status().await?,
    })
}

/// Removes member `id`, voter or learner, on the leader of `peer_addr`'s cluster. Returns the
/// status of the node that led when the change was made.
pub async fn remove(
    peer_addr: &str,
    id: u64,
    o: &Options,
) -> Result<pb::StatusResponse, ClusterError> {
    let (leader, ls) = find_leader(peer_addr, o).await?;
    let members = members(&ls);
    if !members.contains_key(&id) {
        return Err(ClusterError::NotAMember {
            id,
            what: "a member",
            members: list(members.keys()),
        });
    }
    let mut c = leader.client.clone();
    let req = pb::RemoveMemberRequest { node_id: id };
    leader
        .call("RemoveMember", o.wait, c.remove_member(req))
        .await?;
    leader.status().await
}

/// What `transfer_leader` did.
#[derive(Debug)]
pub struct Moved {
    /// The node that led before.
    pub from: u64,
    /// The voter asked to lead.
    pub to: u64,
    /// The node that leads now: `to`, unless another voter won the election.
    pub leader_id: u64,
}

/// Hands leadership of `peer_addr`'s cluster to voter `to`; returns once another node leads.
pub async fn transfer_leader(peer_addr: &str, to: u64, o: &Options) -> Result<Moved, ClusterError> {
    let (leader, ls) = find_leader(peer_addr, o).await?;
    let voters = voters(&ls);
    if !voters.contains(&to) {
        return Err(ClusterError::NotAMember {
            id: to,
            what: "a voter",
            members: list(voters.iter()),
        });
    }
    let mut c = leader.client.clone();
    let req = pb::MoveLeaderRequest { to_node_id: to };
    let r = leader
        .call("MoveLeader", o.wait, c.move_leader(req))
        .await?;
    Ok(Moved {
        from: ls.node_id,
        to,
        leader_id: r.leader_id,
    })
}

/// The leader of the cluster the node at `addrs` belongs to, and its status: that node, if it
/// leads, else the leader it names. An election under way is waited out for up to
/// `o.timeout`. `addrs` may list several nodes, comma-separated: each is asked in turn until
/// one that can be reached is in a cluster (a node with no leader is passed over too, in
/// case another knows one).
pub async fn find_leader(
    addrs: &str,
    o: &Options,
) -> Result<(Peer, pb::StatusResponse), ClusterError> {
    let mut failed: Option<ClusterError> = None;
    for addr in addrs.split(',').map(str::trim).filter(|a| !a.is_empty()) {
        match find_leader_from(addr, o).await {
            Err(
                e @ (ClusterError::Unreachable { .. }
                | ClusterError::NotInitialized { .. }
                | ClusterError::NoLeader { .. }),
            ) => {
                // Of several failures, "no leader" says the most about the cluster.
                if !matches!(failed, Some(ClusterError::NoLeader { .. })) {
                    failed = Some(e);
                }
            }
            found => return found,
        }
    }
    Err(failed.unwrap_or_else(|| ClusterError::BadAddress {
        addr: addrs.into(),
        why: "no address given".into(),
    }))
}

/// [`find_leader`] from one node.
async fn find_leader_from(
    addr: &str,
    o: &Options,
) -> Result<(Peer, pb::StatusResponse), ClusterError> {
    let first = Peer::connect(addr, o).await?;
    let deadline = Instant::now() + o.timeout;
    loop {
        match leader_from(&first, o).await {
            Err(ClusterError::NoLeader { .. }) if Instant::now() < deadline => {
                tokio::time::sleep(POLL).await
            }
            found => return found,
        }
    }
}

/// One search for the leader, from `first`.
async fn leader_from(
    first: &Peer,
    o: &Options,
) -> Result<(Peer, pb::StatusResponse), ClusterError> {
    let mut peer = first.clone();
    let mut status = peer.status().await?;
    for _ in 0..LEADER_HOPS {
        if status.role == LEADER {
            return Ok((peer, status));
        }
        // A node that knows a leader is joining (or the leader's membership has yet to reach
        // it): follow the leader all the same.
        if members(&status).is_empty() && status.leader_id == 0 {
            return Err(ClusterError::NotInitialized {
                id: status.node_id,
                addr: peer.addr.clone(),
            });
        }
        let leader = match (status.leader_id, &status.leader) {
            (0, _) | (_, None) => None,
            (_, Some(node)) if node.peer_addr.is_empty() => None,
            (id, Some(node)) => Some((id, node.peer_addr.clone())),
        };
        let Some((id, leader_addr)) = leader else {
            break;
        };
        let whose = format!(
            ", the leader (node {id}) as node {} reports it",
            status.node_id
        );
        peer = Peer::connect_to(&leader_addr, &whose, o).await?;
        status = peer.status().await?;
    }
    Err(ClusterError::NoLeader {
        id: status.node_id,
        addr: peer.addr.clone(),
        voters: voters(&status).len(),
    })
}

/// Re-reads `peer`'s status until `done` holds, for at most `o.wait`.
async fn wait_for(
    peer: &Peer,
    o: &Options,
    what: &str,
    done: impl Fn(&pb::StatusResponse) -> bool,
) -> Result<pb::StatusResponse, ClusterError> {
    let deadline = Instant::now() + o.wait;
    loop {
        let s = peer.status().await?;
        if done(&s) {
            return Ok(s);
        }
        if Instant::now() >= deadline {
            return Err(ClusterError::TimedOut {
                what: format!("waiting for {what}"),
                after: o.wait,
                next: format!("check `sessionctl cluster status --peer {}`", peer.addr),
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Every member a node's status names, voter or learner, with its addresses.
pub fn members(s: &pb::StatusResponse) -> BTreeMap<u64, pb::Node> {
    s.membership.clone().unwrap_or_default().nodes
}

/// The voters a node's status names: during a membership change, those of the new set.
pub fn voters(s: &pb::StatusResponse) -> BTreeSet<u64> {
    let configs = s.membership.as_ref().map_or(&[][..], |m| &m.configs[..]);
    configs
        .last()
        .map(|c| c.ids.iter().copied().collect())
        .unwrap_or_default()
}

/// The node's own addresses, from its status.
fn own_node(s: &pb::StatusResponse, addr: &str) -> Result<pb::Node, ClusterError> {
    s.node
        .clone()
        .filter(|n| !n.peer_addr.is_empty())
        .ok_or_else(|| ClusterError::NoAddresses {
            id: s.node_id,
            addr: addr.into(),
        })
}

/// IDs, comma-separated; "none" for none.
fn list<'a>(ids: impl Iterator<Item = &'a u64>) -> String {
    let ids: Vec<String> = ids.map(u64::to_string).collect();
    match ids.is_empty() {
        true => "none".into(),
        false => ids.join(", "),
    }
}

/// An error and its sources: tonic's transport errors say little at the top.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        // hyper and tonic repeat a cause in each layer's words: once is enough.
        let s_text = s.to_string();
        if parts.last() != Some(&s_text) {
            parts.push(s_text);
        }
        source = s.source();
    }
    parts.join(": ")
}
