//! openraft's traits on the protobuf messages, and the conversions between openraft's request
//! types and the wire.
//!
//! An [`pb::Entry`] is openraft's log entry itself: the leader builds it once from a
//! [`Proposal`] (encoding each effect as a `persist::records` record), and the same message is
//! sent to the peers and written to every log. Messages from the wire are checked here for the
//! fields openraft cannot do without, so a malformed request is refused at the edge instead of
//! reaching the engine.

use std::cmp::Ordering;
use std::collections::BTreeSet;
use std::fmt;

use bytes::Bytes;
use openraft::entry::RaftEntry;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, StreamAppendError, StreamAppendResult,
    TransferLeaderRequest, VoteRequest, VoteResponse,
};
use openraft::vote::{LeaderIdCompare, RaftLeaderId, RaftVote};
use openraft::EntryPayload;

use super::{pb, LogId, Membership, NodeId, Proposal, TypeConfig};
use crate::api::status::GroupFailure;
use crate::persist::records;
use crate::store::Effect;

/// A message from the wire or the disk lacks a field it cannot do without, or holds a value
/// that makes no sense. The text names what.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed {0}")]
pub struct Malformed(pub &'static str);

impl From<Malformed> for tonic::Status {
    fn from(e: Malformed) -> Self {
        GroupFailure::Malformed(e.to_string()).into()
    }
}

// ---- LeaderId -------------------------------------------------------------------------------

/// Standard Raft: at most one leader per term, so two leader IDs of one term are ordered only
/// when they are the same.
impl PartialOrd for pb::LeaderId {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        LeaderIdCompare::std(self, other)
    }
}

/// A leader ID and a committed leader ID (a term) are never equal; they compare by term.
impl PartialEq<u64> for pb::LeaderId {
    fn eq(&self, _other: &u64) -> bool {
        false
    }
}

impl PartialOrd<u64> for pb::LeaderId {
    fn partial_cmp(&self, other: &u64) -> Option<Ordering> {
        self.term.partial_cmp(other)
    }
}

impl fmt::Display for pb::LeaderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "T{}-N{}", self.term, self.node_id)
    }
}

impl RaftLeaderId for pb::LeaderId {
    type Term = u64;
    type NodeId = NodeId;
    type Committed = u64;

    fn new(term: u64, node_id: NodeId) -> Self {
        pb::LeaderId { term, node_id }
    }

    fn term(&self) -> u64 {
        self.term
    }

    fn node_id(&self) -> &NodeId {
        &self.node_id
    }

    fn to_committed(&self) -> u64 {
        self.term
    }
}

// ---- Vote -----------------------------------------------------------------------------------

/// What a vote without a leader ID reads as. Votes from the wire and the disk are checked for
/// one ([`check_vote`]), so this only keeps `leader_id()` total.
static NO_LEADER: pb::LeaderId = pb::LeaderId {
    term: 0,
    node_id: 0,
};

impl RaftVote for pb::Vote {
    type LeaderId = pb::LeaderId;

    fn from_leader_id(leader_id: pb::LeaderId, committed: bool) -> Self {
        pb::Vote {
            leader_id: Some(leader_id),
            committed,
        }
    }

    fn leader_id(&self) -> &pb::LeaderId {
        self.leader_id.as_ref().unwrap_or(&NO_LEADER)
    }

    fn is_committed(&self) -> bool {
        self.committed
    }
}

impl fmt::Display for pb::Vote {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = if self.committed { "Q" } else { "-" };
        write!(f, "<{}:{state}>", self.leader_id())
    }
}

/// A vote from the wire or the disk: it must name a leader.
pub(crate) fn check_vote(v: Option<pb::Vote>) -> Result<pb::Vote, Malformed> {
    match v {
        Some(v) if v.leader_id.is_some() => Ok(v),
        _ => Err(Malformed("vote")),
    }
}

// ---- LogId and Membership -------------------------------------------------------------------

impl From<LogId> for pb::LogId {
    fn from(id: LogId) -> Self {
        pb::LogId {
            term: id.leader_id,
            index: id.index,
        }
    }
}

impl From<&LogId> for pb::LogId {
    fn from(id: &LogId) -> Self {
        pb::LogId::from(*id)
    }
}

impl From<pb::LogId> for LogId {
    fn from(id: pb::LogId) -> Self {
        LogId::new(id.term, id.index)
    }
}

impl From<&Membership> for pb::Membership {
    fn from(m: &Membership) -> Self {
        pb::Membership {
            configs: m
                .get_joint_config()
                .iter()
                .map(|c| pb::NodeIdSet {
                    ids: c.iter().copied().collect(),
                })
                .collect(),
            nodes: m.nodes().map(|(id, n)| (*id, n.clone())).collect(),
        }
    }
}

impl From<pb::Membership> for Membership {
    /// A voter the node map lacks gets an empty address rather than failing: the entry was
    /// valid when its leader made it, and the membership must stay readable.
    fn from(m: pb::Membership) -> Self {
        let configs: Vec<BTreeSet<NodeId>> = m
            .configs
            .into_iter()
            .map(|c| c.ids.into_iter().collect())
            .collect();
        let mut nodes = m.nodes;
        for id in configs.iter().flatten() {
            nodes.entry(*id).or_default();
        }
        Membership::new(configs.clone(), nodes)
            .unwrap_or_else(|_| Membership::new_with_defaults(configs, []))
    }
}

// ---- Entry ----------------------------------------------------------------------------------

impl fmt::Display for pb::Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.payload {
            None => "blank",
            Some(pb::entry::Payload::Effects(_)) => "effects",
            Some(pb::entry::Payload::Membership(_)) => "membership",
        };
        write!(f, "Entry{{T{}-{}: {kind}}}", self.term, self.index)
    }
}

impl RaftEntry for pb::Entry {
    type CommittedLeaderId = u64;
    type Payload = EntryPayload<Proposal, NodeId, pb::Node>;

    fn new(log_id: LogId, payload: Self::Payload) -> Self {
        let payload = match payload {
            EntryPayload::Blank => None,
            EntryPayload::Normal(proposal) => Some(pb::entry::Payload::Effects(pb::Effects {
                records: proposal
                    .0
                    .iter()
                    .map(|e| Bytes::from(records::encode(e)))
                    .collect(),
            })),
            EntryPayload::Membership(m) => Some(pb::entry::Payload::Membership((&m).into())),
        };
        pb::Entry {
            term: log_id.leader_id,
            index: log_id.index,
            payload,
        }
    }

    fn log_id_parts(&self) -> (&u64, u64) {
        (&self.term, self.index)
    }

    fn set_log_id(&mut self, new: LogId) {
        self.term = new.leader_id;
        self.index = new.index;
    }

    fn get_membership(&self) -> Option<Membership> {
        match &self.payload {
            Some(pb::entry::Payload::Membership(m)) => Some(m.clone().into()),
            _ => None,
        }
    }
}

/// The effects an entry carries, decoded, in order; none for a blank or membership entry.
pub(crate) fn effects(entry: &pb::Entry) -> Result<Vec<Effect>, Malformed> {
    match &entry.payload {
        Some(pb::entry::Payload::Effects(e)) => e
            .records
            .iter()
            .map(|r| records::decode(r.clone()).ok_or(Malformed("effect record")))
            .collect(),
        _ => Ok(Vec::new()),
    }
}

// ---- Requests and responses -----------------------------------------------------------------

impl From<VoteRequest<TypeConfig>> for pb::VoteRequest {
    fn from(r: VoteRequest<TypeConfig>) -> Self {
        pb::VoteRequest {
            vote: Some(r.vote),
            last_log_id: r.last_log_id.map(Into::into),
            leadership_transfer: r.leadership_transfer,
            pre_vote: false,
        }
    }
}

impl TryFrom<pb::VoteRequest> for VoteRequest<TypeConfig> {
    type Error = Malformed;

    fn try_from(r: pb::VoteRequest) -> Result<Self, Malformed> {
        Ok(VoteRequest {
            vote: check_vote(r.vote)?,
            last_log_id: r.last_log_id.map(Into::into),
            leadership_transfer: r.leadership_transfer,
        })
    }
}

impl From<VoteResponse<TypeConfig>> for pb::VoteResponse {
    fn from(r: VoteResponse<TypeConfig>) -> Self {
        pb::VoteResponse {
            vote: Some(r.vote),
            vote_granted: r.vote_granted,
            last_log_id: r.last_log_id.map(Into::into),
        }
    }
}

impl TryFrom<pb::VoteResponse> for VoteResponse<TypeConfig> {
    type Error = Malformed;

    fn try_from(r: pb::VoteResponse) -> Result<Self, Malformed> {
        Ok(VoteResponse::new(
            check_vote(r.vote)?,
            r.last_log_id.map(Into::into),
            r.vote_granted,
        ))
    }
}

impl From<AppendEntriesRequest<TypeConfig>> for pb::AppendEntriesRequest {
    fn from(r: AppendEntriesRequest<TypeConfig>) -> Self {
        pb::AppendEntriesRequest {
            vote: Some(r.vote),
            prev_log_id: r.prev_log_id.map(Into::into),
            entries: r.entries,
            leader_commit: r.leader_commit.map(Into::into),
        }
    }
}

impl TryFrom<pb::AppendEntriesRequest> for AppendEntriesRequest<TypeConfig> {
    type Error = Malformed;

    fn try_from(r: pb::AppendEntriesRequest) -> Result<Self, Malformed> {
        Ok(AppendEntriesRequest {
            vote: check_vote(r.vote)?,
            prev_log_id: r.prev_log_id.map(Into::into),
            entries: r.entries,
            leader_commit: r.leader_commit.map(Into::into),
        })
    }
}

impl From<AppendEntriesResponse<TypeConfig>> for pb::AppendEntriesResponse {
    fn from(r: AppendEntriesResponse<TypeConfig>) -> Self {
        let mut out = pb::AppendEntriesResponse::default();
        match r {
            AppendEntriesResponse::Success => {}
            AppendEntriesResponse::PartialSuccess(Some(upto)) => {
                out.partial_success = Some(upto.into());
            }
            AppendEntriesResponse::PartialSuccess(None) => out.accepted_none = true,
            AppendEntriesResponse::Conflict => out.conflict = true,
            AppendEntriesResponse::HigherVote(v) => out.rejected_by = Some(v),
        }
        out
    }
}

impl TryFrom<pb::AppendEntriesResponse> for AppendEntriesResponse<TypeConfig> {
    type Error = Malformed;

    fn try_from(r: pb::AppendEntriesResponse) -> Result<Self, Malformed> {
        if let Some(v) = r.rejected_by {
            return Ok(AppendEntriesResponse::HigherVote(check_vote(Some(v))?));
        }
        if r.conflict {
            return Ok(AppendEntriesResponse::Conflict);
        }
        Ok(match (r.partial_success, r.accepted_none) {
            (Some(id), _) => AppendEntriesResponse::PartialSuccess(Some(id.into())),
            (None, true) => AppendEntriesResponse::PartialSuccess(None),
            (None, false) => AppendEntriesResponse::Success,
        })
    }
}

impl From<StreamAppendResult<TypeConfig>> for pb::AppendStreamResponse {
    fn from(r: StreamAppendResult<TypeConfig>) -> Self {
        let mut out = pb::AppendStreamResponse::default();
        match r {
            Ok(matched) => out.matched = matched.map(Into::into),
            Err(StreamAppendError::Conflict(id)) => out.conflict = Some(id.into()),
            Err(StreamAppendError::HigherVote(v)) => out.higher_vote = Some(v),
        }
        out
    }
}

/// An AppendStream answer as openraft's result.
pub(crate) fn stream_append_result(
    r: pb::AppendStreamResponse,
) -> Result<StreamAppendResult<TypeConfig>, Malformed> {
    if let Some(v) = r.higher_vote {
        return Ok(Err(StreamAppendError::HigherVote(check_vote(Some(v))?)));
    }
    if let Some(id) = r.conflict {
        return Ok(Err(StreamAppendError::Conflict(id.into())));
    }
    Ok(Ok(r.matched.map(Into::into)))
}

impl From<TransferLeaderRequest<TypeConfig>> for pb::TransferLeaderRequest {
    fn from(r: TransferLeaderRequest<TypeConfig>) -> Self {
        pb::TransferLeaderRequest {
            from_leader: Some(*r.from_leader()),
            to_node_id: *r.to_node_id(),
            last_log_id: r.last_log_id().map(Into::into),
        }
    }
}

impl TryFrom<pb::TransferLeaderRequest> for TransferLeaderRequest<TypeConfig> {
    type Error = Malformed;

    fn try_from(r: pb::TransferLeaderRequest) -> Result<Self, Malformed> {
        Ok(TransferLeaderRequest::new(
            check_vote(r.from_leader)?,
            r.to_node_id,
            r.last_log_id.map(Into::into),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::{ClientInfo, Session, SessionKey};

    #[test]
    fn an_entry_carries_its_effects_through_the_wire_encoding() {
        use prost::Message;
        let session = Session {
            key: SessionKey::from_bytes([7; crate::session::ID_BYTES]),
            user: Some("ann".into()),
            attributes: Default::default(),
            version: 1,
            created_at: 10,
            last_access_at: 10,
            idle_timeout: 1000,
            absolute_expires_at: 100_000,
            client: ClientInfo::default(),
        };
        let effects = vec![
            Effect::Create {
                session: session.clone(),
                idempotency: Some("retry-1".into()),
            },
            Effect::Touch {
                key: session.key,
                at: 20,
            },
        ];
        let entry = pb::Entry::new(
            LogId::new(3, 9),
            EntryPayload::Normal(Proposal(effects.clone())),
        );
        let back = pb::Entry::decode(entry.encode_to_vec().as_slice()).unwrap();
        assert_eq!(back.log_id(), LogId::new(3, 9));
        assert_eq!(effects_of(&back), effects);
        assert!(back.get_membership().is_none());
    }

    fn effects_of(e: &pb::Entry) -> Vec<Effect> {
        effects(e).unwrap()
    }

    #[test]
    fn a_membership_survives_the_round_trip() {
        let node = |p: &str| pb::Node {
            peer_addr: p.into(),
            client_addr: String::new(),
        };
        let m = Membership::new(
            vec![[1, 2].into(), [2, 3].into()],
            [
                (1, node("a")),
                (2, node("b")),
                (3, node("c")),
                (4, node("d")),
            ]
            .into_iter()
            .collect::<std::collections::BTreeMap<_, _>>(),
        )
        .unwrap();
        let back: Membership = pb::Membership::from(&m).into();
        assert_eq!(back, m);
    }

    #[test]
    fn requests_without_a_vote_are_refused() {
        let err = VoteRequest::<TypeConfig>::try_from(pb::VoteRequest::default()).unwrap_err();
        assert_eq!(err.to_string(), "malformed vote");
        let no_leader = pb::AppendEntriesRequest {
            vote: Some(pb::Vote::default()),
            ..Default::default()
        };
        assert!(AppendEntriesRequest::<TypeConfig>::try_from(no_leader).is_err());
    }

    #[test]
    fn append_responses_round_trip() {
        let vote = pb::Vote::from_leader_id(pb::LeaderId::new(4, 2), true);
        for r in [
            AppendEntriesResponse::<TypeConfig>::Success,
            AppendEntriesResponse::PartialSuccess(None),
            AppendEntriesResponse::PartialSuccess(Some(LogId::new(2, 5))),
            AppendEntriesResponse::Conflict,
            AppendEntriesResponse::HigherVote(vote),
        ] {
            let wire = pb::AppendEntriesResponse::from(r.clone());
            assert_eq!(AppendEntriesResponse::try_from(wire).unwrap(), r);
        }
    }
}
