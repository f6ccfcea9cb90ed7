//! Lease reads: a leader whose lease holds serves a read without a trip through the engine.
//!
//! openraft answers `ensure_linearizable(ReadPolicy::LeaseRead)` in its core task: this node
//! leads, a quorum acknowledged one of its messages sent less than a lease ago (no other node
//! can win an election before that lease runs out), and the state machine has applied the
//! log up to the later of the commit index and this term's first entry. Asking the core costs
//! a message, a wake-up of the core task and a reply per read, queued behind the appends the
//! core is busy with.
//!
//! [`Lease::read`] checks the same conditions on the engine's metrics first, which the core
//! publishes after every step:
//! - this node leads, in `current_term`;
//! - `now` is before the quorum-acknowledged send time plus the lease (`election_timeout_max`,
//!   the lease openraft gives a leader). The metrics' time is never later than the core's, so
//!   the lease the metrics show ends no later than the one the core holds;
//! - the last applied entry is of the current term: this term's first entry is applied, so
//!   everything committed before the term is too. A write committed in this term is
//!   acknowledged only once it is applied here, so every write acknowledged before the read
//!   is in the Store it reads; one not yet applied was not acknowledged, and is ordered after
//!   the read;
//! - no leadership transfer was asked for in this term. A transfer lets the chosen voter win
//!   an election at once, lease or not, so the leader stops serving from the moment it asks
//!   (openraft refuses reads on a leader that is handing over, too). [`Lease::give_up`]
//!   records the term; a later term of this node's leadership serves from metrics again.
//!
//! When any of them does not hold, the read asks the core, as before: the metrics may only be
//! behind, and the core answers with the state as it is (or waits for what is not applied
//! yet, or refuses).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use openraft::errors::{Fatal, LinearizableReadError, RaftError};
use openraft::type_config::alias::{InstantOf, WatchReceiverOf};
use openraft::type_config::TypeConfigExt;
use openraft::{ReadPolicy, ServerState};

use super::{Metrics, Raft, TypeConfig};

/// A node's lease reads.
pub(crate) struct Lease {
    raft: Raft,
    metrics: WatchReceiverOf<TypeConfig, Metrics>,
    /// How long a quorum's acknowledgement keeps the lease: openraft's leader lease.
    lease: Duration,
    /// The last term in which this node asked to hand its leadership over (0: never).
    handed_over_in: AtomicU64,
}

impl Lease {
    /// The lease reads of `raft`.
    pub(crate) fn new(raft: Raft) -> Lease {
        let lease = Duration::from_millis(raft.config().election_timeout_max);
        Lease {
            metrics: raft.metrics(),
            raft,
            lease,
            handed_over_in: AtomicU64::new(0),
        }
    }

    /// Returns once a read of this node's Store is linearizable: this node leads, its lease
    /// holds, and it has applied every entry a client was told of. A stale lease fails at
    /// once with `Unavailable`.
    pub(crate) async fn read(
        &self,
    ) -> Result<(), RaftError<TypeConfig, LinearizableReadError<TypeConfig>>> {
        if self.holds(TypeConfig::now()) {
            return Ok(());
        }
        self.raft.ensure_linearizable(ReadPolicy::LeaseRead).await?;
        Ok(())
    }

    /// Whether the metrics show a lease that holds at `now` (see the module docs).
    pub(super) fn holds(&self, now: InstantOf<TypeConfig>) -> bool {
        let m = self.metrics.borrow_watched();
        m.state == ServerState::Leader
            && m.current_leader == Some(m.id)
            && m.current_term > self.handed_over_in.load(Ordering::Acquire)
            && m.last_applied
                .is_some_and(|applied| applied.leader_id == m.current_term)
            && m.last_quorum_acked
                .as_ref()
                .is_some_and(|acked| now < **acked + self.lease)
    }

    /// Stops serving reads from the metrics for the rest of this node's current term: call it
    /// before asking the engine to transfer leadership.
    pub(crate) async fn give_up(&self) -> Result<(), Fatal<TypeConfig>> {
        let term = self
            .raft
            .with_raft_state(|st| st.vote_ref().leader_id.as_ref().map_or(0, |l| l.term))
            .await?;
        self.handed_over_in.fetch_max(term, Ordering::AcqRel);
        Ok(())
    }
}
