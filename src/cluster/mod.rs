//! The replicated sessiond: a group of nodes on the openraft engine.
//!
//! # What is ours and what is openraft's
//!
//! openraft does the consensus: elections, log replication, commit, membership changes (joint
//! consensus), leader leases, leadership transfer, and when to snapshot and purge. No election,
//! replication or membership logic is written here. This room supplies what the engine asks of an
//! application, and nothing else:
//!
//! - `pb_impl` (crate-private): openraft's traits on our protobuf messages, so the
//!   leader encodes an entry once, and the same bytes go to the peers and into every log. The
//!   entry payload is a [`Proposal`]: the [`Effect`]s of one or more writes, each encoded as the
//!   single-node log already encodes it (`persist::records`).
//! - [`log_store`]: the durable Raft log ([`openraft::storage::RaftLogStorage`]), one
//!   append-only file in the framed, checksummed format of `persist::format`, written by one
//!   ordered writer thread with group commit under the daemon's fsync policy.
//! - [`state_machine`]: the node's one [`Store`], driven by committed entries through
//!   `Store::apply`, the code recovery uses; snapshots in the single-node snapshot format, with
//!   the Raft metadata as the first frame.
//! - [`network`] and [`peer_service`]: the Raft RPCs over tonic (HTTP/2, mutual TLS when
//!   configured), client and server,
//!   and the admin calls `sessionctl cluster` and the tests make (`Init`, `AddLearner`,
//!   `ChangeMembership`, `RemoveMember`, `MoveLeader`, `Status`, `Digest`).
//! - [`coalesce`]: the writes waiting to be proposed go to the group as one entry.
//! - `lease` (crate-private): lease reads checked on the engine's metrics, without a trip
//!   through its core task while the lease holds.
//! - [`node`]: [`ClusterNode`], which starts all of the above from a `[cluster]` config section
//!   and offers what the daemon needs: propose, lease reads, leader, membership, shutdown.
//! - [`metrics_watch`]: the task that follows openraft's metrics into the daemon's
//!   (`observe::ClusterMetrics`), so no engine type reaches the metrics room.
//!
//! # Why openraft 0.10.0-alpha.37
//!
//! The stable 0.9 line lacks what the design needs: lease reads (`ReadPolicy::LeaseRead`, a
//! leader serving reads locally while its lease holds) and leadership transfer (used on graceful
//! shutdown, so a rolling restart costs no election timeout). The 0.10 line has both and is the
//! one Databend's meta-service runs in production. It is an alpha, so the version is pinned
//! exactly (`=0.10.0-alpha.37`) and every bump must pass this module's tests, openraft's storage
//! suite among them, before it lands. The engine stays behind this module: an upgrade that
//! changes its traits touches this room only.
//!
//! raft-rs (TiKV's core) was the alternative engine: proven, but it leaves the driving loop,
//! transport and snapshot transfer to the application, pulls protobuf 2.x (RUSTSEC-2024-0437)
//! and logs through slog. An outside coordinator (etcd) would leave fencing, choosing the most
//! up-to-date replica and rewinding a deposed primary to us, and adds a cluster to run.
//!
//! # The peer port
//!
//! One port (`cluster.peer_listen`) carries everything between members: the Raft RPCs, the
//! session store calls a follower forwards to the leader (`api::forward`: the leader's peer
//! address is what the membership records, so `advertise_client` may be any name clients
//! resolve, and the client port's TLS is no member's business), and `sessionctl cluster`.
//! Whoever can talk to it can rewrite every session, so:
//!
//! - With `cluster.tls_cert`, `cluster.tls_key` and `cluster.tls_ca`, it speaks mutual TLS:
//!   the server asks every dialler for a certificate that chains to the cluster CA, and a
//!   node dials its peers with its own certificate, checking theirs against the same CA and
//!   the host of their recorded address (or `cluster.tls_server_name`). The server side is
//!   the client port's `tls::ReloadableTls`, loaded from the `[cluster]` files, so the files
//!   are reloaded the same way (`tls_watch_interval`, SIGHUP); the client side's rustls config
//!   is rebuilt with it, and each new connection takes the current one.
//! - Protected mode: without peer TLS, the port is refused beyond loopback
//!   ([`crate::config::ClusterConfig::validate_protected_mode`]) unless the daemon's
//!   `insecure_listen` says every host that can reach it is trusted.
//! - A peer certificate is a membership card, not a narrower right: its holder can send
//!   votes, appends and snapshots. The cluster CA must be dedicated to the cluster.
//! - The session store on the peer port serves only calls that carry the forwarded header;
//!   the header proves nothing (a member could set it), it keeps a client pointed at the
//!   wrong port from being served past the client port's own TLS and limits. A forwarded
//!   call is authenticated again from the metadata it carries.
//!
//! [`Effect`]: crate::store::Effect
//! [`Store`]: crate::store::Store

pub mod admin;
pub mod coalesce;
mod lease;
pub mod log_store;
pub mod member;
pub mod metrics_watch;
pub mod network;
pub mod node;
mod pb_impl;
pub mod peer_service;
pub mod state_machine;

#[cfg(test)]
mod testing;
#[cfg(test)]
mod tests;

use std::fmt;

use crate::lock;
use crate::store::Effect;

pub use self::node::{ClusterNode, ProposeError, StartError};
pub use self::pb_impl::Malformed;
pub use crate::observe::Role;

/// The generated peer protocol and on-disk records (`proto/sessiond/cluster/v1/cluster.proto`).
#[allow(missing_docs, clippy::all)]
pub mod pb {
    tonic::include_proto!("sessiond.cluster.v1");
}

/// A node's ID in the cluster: random, kept in `data_dir/node-id`, never reused.
pub type NodeId = u64;

/// A member of the cluster as the membership records it: where peers and clients reach it.
pub type Node = pb::Node;

/// What applying one effect did: changed the store, or was overtaken (see `store::plan`).
pub type Outcome = crate::store::Applied;

/// The effects of one or more writes (see [`coalesce`]), proposed as one log entry and applied
/// in order, each on its own.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Proposal(pub Vec<Effect>);

impl fmt::Display for Proposal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Proposal({} effects)", self.0.len())
    }
}

/// What applying a [`Proposal`] yielded: one [`Outcome`] per effect, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied(pub Vec<Outcome>);

/// sessiond's choice of openraft's types: protobuf messages for everything that is stored or
/// sent, so no serde format sits between the engine and the disk, and the responder of
/// coalesced writes. (Written out rather than with `declare_raft_types!`, which takes no
/// generic responder.)
#[derive(Debug, Clone, Copy, Default, Eq, PartialEq, Ord, PartialOrd)]
pub struct TypeConfig {}

impl openraft::RaftTypeConfig for TypeConfig {
    type D = Proposal;
    type R = Applied;
    type NodeId = NodeId;
    type Node = Node;
    type Term = u64;
    type LeaderId = pb::LeaderId;
    type Vote = pb::Vote;
    type Payload = openraft::EntryPayload<Proposal, NodeId, Node>;
    type Entry = pb::Entry;
    type Responder<T>
        = coalesce::Fanout<T>
    where
        T: openraft::OptionalSend + 'static;
    type Batch<T>
        = openraft::impls::InlineBatch<T>
    where
        T: openraft::OptionalSend + 'static;
    type AsyncRuntime = openraft::impls::TokioRuntime;
    type ErrorSource = openraft::impls::BoxedErrorSource;
}

/// The openraft handle of a node.
pub type Raft = openraft::Raft<TypeConfig, state_machine::StateMachine>;

/// A log position.
pub type LogId = openraft::LogId<u64>;

/// A membership as openraft holds it.
pub type Membership = openraft::Membership<NodeId, Node>;

/// A membership and the entry that set it.
pub type StoredMembership = openraft::StoredMembership<u64, NodeId, Node>;

/// A snapshot's metadata.
pub type SnapshotMeta = openraft::SnapshotMeta<u64, NodeId, Node>;

/// What openraft's metrics watch carries.
pub type Metrics = openraft::RaftMetrics<TypeConfig>;
