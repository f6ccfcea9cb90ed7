//! The edge in a replicated group: what it needs of the group, and the one loop every write
//! takes through it.
//!
//! On a single node a write is evaluated and applied at once. In a group, the leader plans
//! it (the Store's `plan_*`: the same rules, nothing changed), proposes the effects, and
//! replies once a majority has them and they are applied here. A plan that a newer write
//! overtook comes back [`Applied::Stale`] and is planned again against the newer state.
//! Reads wait for the leader's lease, so a deposed leader never answers from old state.
//! So does a write whose plan replies without proposing anything (not found, a version
//! mismatch, a retry's replay): such a reply is a read of this node's state. Without the
//! lease, a leader cut off from the group would answer "not found" for a session the new
//! leader created. A plan that proposes takes no lease round: its effects are checked again
//! when the entry is applied, in log order (a stale plan comes back overtaken), an entry of a
//! deposed leader never commits, and the engine refuses a proposal at once (UNAVAILABLE) on a
//! leader whose lease has lapsed, as a leader cut off from the others is.
//!
//! The edge knows the group only through [`Group`]; `crate::cluster` implements it on the
//! Raft engine.

use futures_util::future::BoxFuture;
use tonic::Status;

use crate::store::{Applied, Effect, Plan};

/// A write submitted to the group: resolves as [`Group::propose`] does.
pub type Pending = BoxFuture<'static, Result<Vec<Applied>, Status>>;

/// A replicated group, as the edge uses it.
#[tonic::async_trait]
pub trait Group: Send + Sync + 'static {
    /// Proposes `effects` (in one entry, perhaps with other writes' effects: each effect is
    /// applied on its own all the same); answers with what applying each did on this node,
    /// once the group has committed the entry and this node has applied it. Fails with
    /// UNAVAILABLE when this node cannot lead the write (no leader, no quorum, not the
    /// leader), saying which.
    async fn propose(&self, effects: Vec<Effect>) -> Result<Vec<Applied>, Status>;

    /// Submits `effects` behind every write this node submitted before, and
    /// returns once it is queued; the [`Pending`] answers as [`Group::propose`] does. A
    /// Pipeline stream's writes go this way, so they commit in the stream's order.
    async fn submit(&self, effects: Vec<Effect>) -> Result<Pending, Status>;

    /// Returns once this node may serve a linearizable read: it leads, and its lease holds.
    async fn lease_read(&self) -> Result<(), Status>;

    /// Whether this node may serve a linearizable read now, without waiting: what
    /// [`Group::lease_read`] checks first. `false` asks nothing of the group.
    fn lease_holds(&self) -> bool;
}

/// How many times a write is planned again after newer writes overtook it, before the
/// caller is told to retry.
const REPLANS: usize = 8;

/// Plans with `plan`, proposes, and replies once applied; plans again while the first
/// effect comes back stale. A plan that replies without proposing (an error, or a retry
/// answered from the record of an earlier write, say) is planned again under the lease (see
/// the module docs), and that plan's reply stands.
pub(super) async fn write<T>(
    group: &dyn Group,
    mut plan: impl FnMut() -> Result<Plan<T>, Status>,
) -> Result<T, Status> {
    // Once is enough: a replan follows an apply on this node, which is newer still.
    let mut leased = false;
    for _ in 0..REPLANS {
        match plan() {
            Ok(Plan { effects, reply }) if !effects.is_empty() => {
                let applied = group.propose(effects).await?;
                if applied.first() == Some(&Applied::Done) {
                    return Ok(reply);
                }
            }
            planned if leased => return planned.map(|p| p.reply),
            _ => {
                group.lease_read().await?;
                leased = true;
            }
        }
    }
    Err(overtaken())
}

/// The failure of a write that newer writes overtook every time it was planned.
pub(super) fn overtaken() -> Status {
    Status::aborted("the session kept changing under this write; read it again and retry")
}
