//! Coalescing: the writes this node proposes while the engine is busy go to the group as one
//! log entry.
//!
//! Each write is planned on its own and submitted here as its effects. One task takes the
//! writes in the order they were submitted and proposes those that are waiting together, up to
//! [`MAX_WRITES`] writes or [`MAX_BYTES`] of effects (a write larger than that goes alone, so
//! an entry is never larger than the largest single write), as one [`Proposal`]. Applying an
//! entry applies its effects one by one, in order, each with its own [`Outcome`], exactly as
//! if each write had been its own entry: the reply to each write is its own slice of the
//! outcomes. What the group pays per entry (the engine's bookkeeping, a log frame and its CRC,
//! a place in an append, a responder) is paid once for the whole batch.
//!
//! Under a light load the task finds one write waiting and proposes it at once: coalescing
//! never holds a write back to wait for company.

use std::sync::{Arc, Mutex, OnceLock};

use openraft::errors::RaftError;
use openraft::raft::responder::Responder;
use openraft::raft::ClientWriteResult;
use tokio::sync::{mpsc, oneshot};

use super::admin::ProposeError;
use super::{lock, Applied, Proposal, Raft, TypeConfig};
use crate::observe::ClusterMetrics;
use crate::store::{attribute_bytes, size_of, Effect};

/// The most writes one entry carries.
pub const MAX_WRITES: usize = 256;

/// The most effect bytes (approximately, see [`weight`]) one entry carries, unless its one
/// write is larger.
pub const MAX_BYTES: usize = 64 * 1024;

/// Writes waiting for the task; past it, submitting waits.
const QUEUE: usize = 4 * 1024;

/// What a submitted write resolves to: its outcomes, once applied on this node.
pub(crate) type Reply = oneshot::Receiver<Result<Applied, ProposeError>>;

/// A write waiting to be proposed.
struct Waiting {
    effects: Vec<Effect>,
    weight: usize,
    reply: oneshot::Sender<Result<Applied, ProposeError>>,
}

/// The submitting side. Dropping it ends the task once the writes queued are proposed.
#[derive(Clone)]
pub(crate) struct Coalescer(mpsc::Sender<Waiting>);

impl Coalescer {
    /// The coalescer of `raft`'s proposals, and the task (spawn it) that proposes them,
    /// counting each entry that commits in `recorder`'s metrics once they are set.
    pub(crate) fn new(
        raft: Raft,
        recorder: Arc<OnceLock<ClusterMetrics>>,
    ) -> (Coalescer, impl std::future::Future<Output = ()> + Send) {
        let (tx, rx) = mpsc::channel(QUEUE);
        (Coalescer(tx), run(raft, rx, recorder))
    }

    /// Queues `effects` behind every write submitted before; the reply answers once they are
    /// applied on this node (one outcome per effect), or with why they were not.
    pub(crate) async fn submit(&self, effects: Vec<Effect>) -> Result<Reply, ProposeError> {
        let (reply, rx) = oneshot::channel();
        let weight = effects.iter().map(weight).sum();
        self.0
            .send(Waiting {
                effects,
                weight,
                reply,
            })
            .await
            .map_err(|_| ProposeError::Fatal("this node is shutting down".into()))?;
        Ok(rx)
    }
}

/// Proposes what waits, batch after batch, until every [`Coalescer`] is dropped.
async fn run(
    raft: Raft,
    mut queue: mpsc::Receiver<Waiting>,
    recorder: Arc<OnceLock<ClusterMetrics>>,
) {
    let mut carried: Option<Waiting> = None;
    loop {
        let first = match carried.take() {
            Some(w) => w,
            None => match queue.recv().await {
                Some(w) => w,
                None => return,
            },
        };
        let mut weight = first.weight;
        let mut effects = first.effects;
        let mut replies = vec![(effects.len(), first.reply)];
        while replies.len() < MAX_WRITES {
            let Ok(next) = queue.try_recv() else { break };
            if weight + next.weight > MAX_BYTES {
                carried = Some(next);
                break;
            }
            weight += next.weight;
            replies.push((next.effects.len(), next.reply));
            effects.extend(next.effects);
        }
        // The replies go to whichever answers first: the responder, or a refusal of the
        // proposal itself (a stopped engine: nothing was applied).
        let replies = Arc::new(Mutex::new(Some(replies)));
        let theirs = replies.clone();
        let recorder = recorder.clone();
        let respond = Fanout(Box::new(move |result: ClientWriteResult<TypeConfig>| {
            if let (Ok(_), Some(m)) = (&result, recorder.get()) {
                m.entry_committed();
            }
            if let Some(replies) = take(&theirs) {
                fan_out(result, replies);
            }
        }));
        if let Err(fatal) = raft.client_write_ff(Proposal(effects), Some(respond)).await {
            let refused = ProposeError::Fatal(fatal.to_string());
            for (_, reply) in take(&replies).into_iter().flatten() {
                let _ = reply.send(Err(refused.clone()));
            }
        }
        // A Raft that stops after taking the proposal drops the responder unanswered: each
        // waiter then hears that it stopped before answering (see `ClusterNode::submit`).
    }
}

/// The replies of one entry, each waiting for its slice of the outcomes.
type Replies = Vec<(usize, oneshot::Sender<Result<Applied, ProposeError>>)>;

/// Takes the replies out of `slot`, once.
fn take(slot: &Mutex<Option<Replies>>) -> Option<Replies> {
    lock(slot).take()
}

/// Gives each write its slice of the entry's outcomes, or each the entry's failure.
fn fan_out(result: ClientWriteResult<TypeConfig>, replies: Replies) {
    match result {
        Ok(response) => {
            let mut outcomes = response.data.0.into_iter();
            for (n, reply) in replies {
                let _ = reply.send(Ok(Applied(outcomes.by_ref().take(n).collect())));
            }
        }
        Err(e) => {
            let e = ProposeError::from(RaftError::APIError(e));
            for (_, reply) in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}

/// openraft's responder for a proposal: a function of its result. Any `T`, as openraft's type
/// configuration asks; only write results are ever given one.
pub struct Fanout<T>(Box<dyn FnOnce(T) + Send>);

impl<T: Send + 'static> Responder<TypeConfig, T> for Fanout<T> {
    fn on_complete(self, result: T) {
        (self.0)(result)
    }
}

/// About how many bytes `effect` takes in an entry, by the store's own measure of sessions
/// and attributes, and a fixed part for the rest.
fn weight(effect: &Effect) -> usize {
    const FIXED: usize = 64;
    FIXED
        + match effect {
            Effect::Create { session, .. } | Effect::Regenerate { session, .. } => size_of(session),
            Effect::Update { set, remove, .. } => {
                set.iter()
                    .map(|(k, v)| attribute_bytes(k, v.len()))
                    .sum::<usize>()
                    + remove.iter().map(String::len).sum::<usize>()
            }
            Effect::Touch { .. } | Effect::End { .. } => 0,
        }
}
