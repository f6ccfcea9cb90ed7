//! The calls on the Raft handle that both [`super::node::ClusterNode`] and the peer service's
//! admin calls make (initialize, remove a member, move the leadership), and why a proposal,
//! a read or such a call did not go through.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use openraft::errors::{ClientWriteError, InitializeError, LinearizableReadError, RaftError};
use openraft::{ChangeMembers, ServerState};

use super::lease::Lease;
use super::{Metrics, Node, NodeId, Raft, TypeConfig};
use crate::api::status::GroupFailure;
use crate::observe::ProposalResult;

/// Why a proposal, a read or a membership change did not go through. Each message says what
/// an operator (or a client library) should do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProposeError {
    /// Another node leads: send the request there.
    #[error("this node is not the leader: node {leader_id} is (peer {}, clients {}); send the request there", leader.peer_addr, leader.client_addr)]
    ForwardToLeader {
        /// The leader's ID.
        leader_id: NodeId,
        /// Where it is reached.
        leader: Node,
    },
    /// No leader is known, or the leader cannot reach a quorum (an election, a partition, or
    /// too few members up). Nothing was applied; retry once a leader is elected.
    #[error("no leader with a quorum right now: {0}; nothing was applied, retry shortly")]
    Unavailable(String),
    /// The leader changed before the proposal committed: it may or may not have been applied.
    #[error("the leader changed while the write was in flight: {0}; it may or may not have been applied")]
    Indeterminate(String),
    /// The request was refused as it stands (a membership change while another is in
    /// progress, an unknown learner, a node that is already initialized).
    #[error("refused: {0}")]
    Rejected(String),
    /// This node's Raft has stopped (shut down, or its storage failed): it serves nothing.
    #[error("this node's Raft has stopped: {0}")]
    Fatal(String),
}

impl From<ProposeError> for tonic::Status {
    fn from(e: ProposeError) -> Self {
        let message = e.to_string();
        match e {
            ProposeError::ForwardToLeader { .. }
            | ProposeError::Unavailable(_)
            | ProposeError::Fatal(_) => GroupFailure::Unavailable(message),
            ProposeError::Indeterminate(_) => GroupFailure::Indeterminate(message),
            ProposeError::Rejected(_) => GroupFailure::Rejected(message),
        }
        .into()
    }
}

impl ProposeError {
    /// How the metrics count a proposal that ended with `result`.
    pub(crate) fn counted<T>(result: &Result<T, ProposeError>) -> ProposalResult {
        match result {
            Ok(_) => ProposalResult::Ok,
            Err(ProposeError::ForwardToLeader { .. }) => ProposalResult::Stale,
            Err(ProposeError::Unavailable(_)) => ProposalResult::Unavailable,
            Err(ProposeError::Indeterminate(_)) => ProposalResult::Indeterminate,
            Err(ProposeError::Rejected(_)) => ProposalResult::Rejected,
            Err(ProposeError::Fatal(_)) => ProposalResult::Fatal,
        }
    }

    fn forward(f: &openraft::errors::ForwardToLeader<TypeConfig>) -> ProposeError {
        if f.reason == openraft::errors::ForwardReason::LeaseExpired {
            return ProposeError::Unavailable(
                "this node leads, but no quorum has acknowledged it within its lease (it was \
                 just elected, or it is cut off from the others)"
                    .into(),
            );
        }
        match (f.leader_id, &f.leader_node) {
            (Some(leader_id), Some(leader)) => ProposeError::ForwardToLeader {
                leader_id,
                leader: leader.clone(),
            },
            (Some(id), None) => {
                ProposeError::Unavailable(format!("node {id} leads, but its address is unknown"))
            }
            _ => ProposeError::Unavailable("no leader is known (an election is under way?)".into()),
        }
    }
}

impl From<RaftError<TypeConfig, ClientWriteError<TypeConfig>>> for ProposeError {
    fn from(e: RaftError<TypeConfig, ClientWriteError<TypeConfig>>) -> Self {
        match e {
            RaftError::Fatal(f) => ProposeError::Fatal(f.to_string()),
            RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => ProposeError::forward(&f),
            RaftError::APIError(ClientWriteError::LogEntryDiscarded(f)) => {
                ProposeError::Indeterminate(f.to_string())
            }
            RaftError::APIError(e) => ProposeError::Rejected(e.to_string()),
        }
    }
}

impl From<RaftError<TypeConfig, LinearizableReadError<TypeConfig>>> for ProposeError {
    fn from(e: RaftError<TypeConfig, LinearizableReadError<TypeConfig>>) -> Self {
        match e {
            RaftError::Fatal(f) => ProposeError::Fatal(f.to_string()),
            RaftError::APIError(LinearizableReadError::ForwardToLeader(f)) => {
                ProposeError::forward(&f)
            }
            RaftError::APIError(LinearizableReadError::QuorumNotEnough(q)) => {
                ProposeError::Unavailable(q.to_string())
            }
        }
    }
}

/// Initializes a new cluster of `members` on `raft`.
pub(crate) async fn initialize(
    raft: &Raft,
    members: BTreeMap<NodeId, Node>,
) -> Result<(), ProposeError> {
    raft.initialize(members).await.map_err(|e| match e {
        RaftError::Fatal(f) => ProposeError::Fatal(f.to_string()),
        RaftError::APIError(e @ InitializeError::NotAllowed(_)) => {
            ProposeError::Rejected(format!("this node is already part of a cluster ({e})"))
        }
        RaftError::APIError(e @ InitializeError::NotInMembers(_)) => {
            ProposeError::Rejected(format!("the members must include this node ({e})"))
        }
    })
}

/// Removes `id` from `raft`'s cluster, voter or learner. Only the leader can.
pub(crate) async fn remove_member(raft: &Raft, id: NodeId) -> Result<(), ProposeError> {
    let membership = raft.metrics().borrow_watched().membership_config.clone();
    if membership.get_node(&id).is_none() {
        return Err(ProposeError::Rejected(format!(
            "node {id} is not a member of this node's cluster"
        )));
    }
    let change = match membership.voter_ids().any(|v| v == id) {
        true => ChangeMembers::RemoveVoters(BTreeSet::from([id])),
        false => ChangeMembers::RemoveNodes(BTreeSet::from([id])),
    };
    raft.change_membership(change, false).await?;
    Ok(())
}

/// Hands the leadership of `raft`'s cluster to voter `to`. Returns the node that leads once
/// another does (`to`, unless another voter won the election), or `Unavailable` when none does
/// within `timeout`. Only the leader can: openraft would ignore the request on a follower.
pub(crate) async fn move_leader(
    raft: &Raft,
    lease: &Lease,
    to: NodeId,
    timeout: Duration,
) -> Result<NodeId, ProposeError> {
    let m = raft.metrics().borrow_watched().clone();
    if m.state != ServerState::Leader {
        return Err(not_the_leader(&m));
    }
    if !m.membership_config.voter_ids().any(|v| v == to) {
        return Err(ProposeError::Rejected(format!(
            "node {to} is not a voter of this cluster; leadership goes to voters only"
        )));
    }
    if to == m.id {
        return Ok(to);
    }
    // From here on this node may lose its leadership before its lease runs out.
    lease
        .give_up()
        .await
        .map_err(|e| ProposeError::Fatal(e.to_string()))?;
    raft.trigger()
        .transfer_leader(to)
        .await
        .map_err(|e| ProposeError::Fatal(e.to_string()))?;
    let me = m.id;
    let m = raft
        .wait(Some(timeout))
        .metrics(
            |m| m.current_leader.is_some_and(|l| l != me),
            "leadership transfer",
        )
        .await
        .map_err(|e| ProposeError::Unavailable(format!("leadership transfer to node {to}: {e}")))?;
    Ok(m.current_leader.unwrap_or(to))
}

/// The refusal of a leader's request on a node that does not lead, naming the leader.
fn not_the_leader(m: &Metrics) -> ProposeError {
    let leader = m
        .current_leader
        .and_then(|id| Some((id, m.membership_config.get_node(&id)?.clone())));
    match leader {
        Some((leader_id, leader)) if leader_id != m.id => {
            ProposeError::ForwardToLeader { leader_id, leader }
        }
        _ => ProposeError::Unavailable("no leader is known (an election is under way?)".into()),
    }
}
