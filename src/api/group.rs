//! The edge in a replicated group: what it needs of the group, and the one loop every write
//! takes through it.
//!
//! On a single node a write is evaluated and applied at once. In a group, the leader plans
//! it (the Store's `plan_*`: the same rules, nothing changed), proposes the effects, and
//! replies once a majority has them and they are applied here. A plan that a newer write
//! overtook comes back [`Applied::Stale`] and is planned again against the newer state.
//! Reads wait for the leader's lease, so a deposed leader never answers from old state.
//! Writes wait for it too, before they plan: a plan may reply without proposing anything
//! (not found, a version mismatch, a retry's replay), and such a reply is a read of this
//! node's state. Without the lease, a leader cut off from the group would answer "not found"
//! for a session the new leader created.
//!
//! The edge knows the group only through [`Group`]; `crate::cluster` implements it on the
//! Raft engine.

use tonic::Status;

use crate::store::{Applied, Effect, Plan, StoreError};

/// A replicated group, as the edge uses it.
#[tonic::async_trait]
pub trait Group: Send + Sync + 'static {
    /// Proposes `effects` as one entry; answers with what applying each did on this node,
    /// once the group has committed the entry and this node has applied it. Fails with
    /// UNAVAILABLE when this node cannot lead the write (no leader, no quorum, not the
    /// leader), saying which.
    async fn propose(&self, effects: Vec<Effect>) -> Result<Vec<Applied>, Status>;

    /// Returns once this node may serve a linearizable read: it leads, and its lease holds.
    async fn lease_read(&self) -> Result<(), Status>;
}

/// How many times a write is planned again after newer writes overtook it, before the
/// caller is told to retry.
const REPLANS: usize = 8;

/// Waits for the lease (see the module docs), plans with `plan`, proposes, and replies once
/// applied; plans again while the first effect comes back stale. An empty plan (a retry
/// answered from the record of an earlier write, say) replies at once.
pub(super) async fn write<T>(
    group: &dyn Group,
    mut plan: impl FnMut() -> Result<Plan<T>, StoreError>,
) -> Result<T, Status> {
    // Once is enough: a replan follows an apply on this node, which is newer still.
    group.lease_read().await?;
    for _ in 0..REPLANS {
        let Plan { effects, reply } = plan()?;
        if effects.is_empty() {
            return Ok(reply);
        }
        let applied = group.propose(effects).await?;
        if applied.first() == Some(&Applied::Done) {
            return Ok(reply);
        }
    }
    Err(Status::aborted(
        "the session kept changing under this write; read it again and retry",
    ))
}
