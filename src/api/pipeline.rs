//! The Pipeline stream: many operations in flight on one bidirectional stream.
//!
//! Each operation is applied in order, takes its own permit of `max_concurrent_requests`
//! (shed with RESOURCE_EXHAUSTED when there is none) and waits for the disk within its own
//! `request_timeout`. When the daemon starts draining, a stream reads no further request,
//! answers the ones it took and ends with UNAVAILABLE "shutting down", so an open stream
//! never holds the drain until `shutdown_grace` runs out.
//!
//! In a group, a write's reply waits for its commit, a round trip to the other members.
//! Replies then go two ways: the ordered lane answers, in the stream's order, each write and
//! each read of something a write still in that lane changes; a read that nothing in the lane
//! changes (a Get of another session) is answered at once, under the lease, instead of
//! waiting behind writes it cannot observe. Every read still sees each earlier write of the
//! stream to what it reads; replies carry their request's id, and may come out of order.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status};

use super::group::Pending;
use super::{pb, status, Caller, PIPELINE_WINDOW};
use crate::lock;
use crate::proto::serve;
use pb::pipeline_request::Op;
use serve::pipeline_response::Result as Outcome;

/// One pipelined operation, applied, on its way to its reply.
struct Applied {
    response: serve::PipelineResponse,
    /// What its reply waits for.
    wait: Wait,
    /// Its name as a metrics label.
    op: &'static str,
    /// When its `request_timeout` runs out.
    deadline: Option<Instant>,
    /// Its share of `max_concurrent_requests`, held until its reply is ready.
    permit: Option<OwnedSemaphorePermit>,
    /// In a group: what it changes, or for a read what it depends on.
    touches: Touches,
}

/// The sessions an operation changes, or for a read the sessions it depends on: what
/// decides whether a read may be answered before the stream's earlier writes settle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Touches {
    /// No session anyone holds an ID of yet (a Create), or nothing at all.
    Nothing,
    /// One session, by a hash of its ID (no copy of the ID per operation). Two IDs that share
    /// a hash only make a read wait in the lane when it need not have: never the other way.
    One(u64),
    /// Any session: DestroyUserSessions, whose sessions are not known up front; for
    /// ListUserSessions, every change.
    All,
}

impl Touches {
    fn of(op: &Op) -> Touches {
        match op {
            Op::Create(_) => Touches::Nothing,
            Op::Get(r) => Touches::one(&r.id),
            Op::Touch(r) => Touches::one(&r.id),
            Op::Update(r) => Touches::one(&r.id),
            Op::Regenerate(r) => Touches::one(&r.id),
            Op::Destroy(r) => Touches::one(&r.id),
            Op::ListUserSessions(_) | Op::DestroyUserSessions(_) => Touches::All,
        }
    }

    fn one(id: &str) -> Touches {
        let mut hasher = DefaultHasher::new();
        id.hash(&mut hasher);
        Touches::One(hasher.finish())
    }
}

/// What a group's Pipeline stream has in its ordered lane: operations whose replies wait,
/// in the stream's order, for their writes (or the writes before them) to settle.
#[derive(Default)]
struct Lane {
    /// Operations in the lane.
    queued: usize,
    /// Of those, the ones that may change any session.
    all: usize,
    /// The sessions the others change (by [`Touches::One`]'s hash), with how many of them
    /// change each.
    sessions: HashMap<u64, usize>,
}

impl Lane {
    /// Whether a read that depends on `touches` sees everything the stream asked for before
    /// it without waiting for the lane: no operation in the lane changes what it reads.
    fn clear_for(&self, touches: &Touches) -> bool {
        match touches {
            Touches::Nothing => true,
            Touches::One(id) => self.all == 0 && !self.sessions.contains_key(id),
            Touches::All => self.queued == 0,
        }
    }

    fn hold(&mut self, touches: &Touches) {
        self.queued += 1;
        match touches {
            Touches::Nothing => {}
            Touches::One(id) => *self.sessions.entry(*id).or_default() += 1,
            Touches::All => self.all += 1,
        }
    }

    fn release(&mut self, touches: &Touches) {
        self.queued -= 1;
        match touches {
            Touches::Nothing => {}
            Touches::One(id) => {
                if let Some(n) = self.sessions.get_mut(id) {
                    *n -= 1;
                    if *n == 0 {
                        self.sessions.remove(id);
                    }
                }
            }
            Touches::All => self.all -= 1,
        }
    }
}

impl Applied {
    /// Whether it is a read waiting for the lease.
    fn is_read(&self) -> bool {
        matches!(self.wait, Wait::Read(_))
    }
}

/// What an applied operation's reply waits for before it is sent.
enum Wait {
    /// Nothing: the reply is ready.
    Nothing,
    /// The single-node log, durable up to this position.
    Log(u64),
    /// In a group: the commit of a write submitted in the stream's order. `op` is planned
    /// again if the write comes back overtaken.
    Group { pending: Pending, op: Op },
    /// In a group: a write run through the unary path once every earlier operation of the
    /// stream has its reply, so it sees the stream's own writes: one whose plan proposed
    /// nothing (failed, or replied from this node's state), which may be an update of a
    /// session the stream has just created, say; and DestroyUserSessions, planned under the
    /// lease.
    Later(Op),
    /// In a group: a read (Get, Touch, ListUserSessions), served under a lease taken after
    /// it arrived, once every earlier write of the stream to what it reads has its reply (at
    /// once if there is none: see the module docs). A run of reads served together takes
    /// one lease for all of them.
    Read(Op),
}

// Nearly every step is a reply: boxing it would cost an allocation per operation to save
// channel slots.
/// What the applying stage of a Pipeline stream hands on: a reply, or the stream's end.
#[allow(clippy::large_enum_variant)]
enum Step {
    Reply(Applied),
    End(Status),
}

/// Where the applying stage sends its steps: straight to the client when replies need not
/// wait for the disk, to the stage that waits for it, or in a group to the ordered lane,
/// unless the step is a read that may be answered at once.
enum Sink {
    Direct(mpsc::Sender<Result<serve::PipelineResponse, Status>>),
    Staged(mpsc::Sender<Step>),
    Group {
        /// The ordered lane: steps whose replies wait, in the stream's order.
        ordered: mpsc::Sender<Step>,
        /// The client: where reads answered at once go.
        replies: mpsc::Sender<Result<serve::PipelineResponse, Status>>,
        /// What the steps in the ordered lane change.
        lane: Arc<Mutex<Lane>>,
    },
}

/// An operation's name as a metrics label: its unary RPC's name.
fn op_name(op: &Op) -> &'static str {
    match op {
        Op::Create(_) => "Create",
        Op::Get(_) => "Get",
        Op::Touch(_) => "Touch",
        Op::Update(_) => "Update",
        Op::Regenerate(_) => "Regenerate",
        Op::Destroy(_) => "Destroy",
        Op::ListUserSessions(_) => "ListUserSessions",
        Op::DestroyUserSessions(_) => "DestroyUserSessions",
    }
}

impl Caller {
    /// Runs one operation through the function its unary RPC runs: its result, and whether
    /// it is a change (one whose reply must wait until it is durable, failed or not).
    async fn dispatch(&self, op: Op) -> (Result<Outcome, Status>, bool) {
        match op {
            Op::Create(r) => (self.create(r).await.map(Outcome::Session), true),
            Op::Get(r) => (self.get(&r.id, r.peek).await.map(Outcome::Session), false),
            Op::Touch(r) => (self.touch(&r).await.map(Outcome::Touch), false),
            Op::Update(r) => (self.update(r).await.map(Outcome::Session), true),
            Op::Regenerate(r) => (self.regenerate(&r).await.map(Outcome::Session), true),
            Op::Destroy(r) => (self.destroy(&r).await.map(Outcome::Destroy), true),
            Op::ListUserSessions(r) => (
                self.list_user(&r).await.map(Outcome::ListUserSessions),
                false,
            ),
            Op::DestroyUserSessions(r) => (
                self.destroy_user(&r)
                    .await
                    .map(Outcome::DestroyUserSessions),
                true,
            ),
        }
    }

    /// Serves one Pipeline stream: the stream of its replies.
    pub(super) fn serve_pipeline(
        self,
        requests: tonic::Streaming<pb::PipelineRequest>,
    ) -> ReceiverStream<Result<serve::PipelineResponse, Status>> {
        let (tx, rx) = mpsc::channel(PIPELINE_WINDOW);
        if self.tenant.durable_log.is_none() && self.group().is_none() {
            // Replies need not wait for the disk: one task applies each request in order and
            // sends its reply.
            self.apply_stream(requests, Sink::Direct(tx));
            return ReceiverStream::new(rx);
        }
        // Two stages, so a stream does not stop at every fsync or commit: the first applies
        // requests in order (in a group: plans and submits its writes in order), the second
        // holds each reply until its change is durable (one fsync covers everything applied
        // meanwhile) or committed, and sends it. Both channels are bounded.
        let (staged, steps) = mpsc::channel(PIPELINE_WINDOW);
        if self.group().is_none() {
            tokio::spawn(self.clone().settle_in_order(steps, tx, None));
            self.apply_stream(requests, Sink::Staged(staged));
            return ReceiverStream::new(rx);
        }
        // In a group a write's reply waits for its commit, a round trip to the others. A read
        // that no write still settling in the lane changes is answered at once by the first
        // stage, under the lease, instead of waiting behind writes to other sessions.
        let lane = Arc::new(Mutex::new(Lane::default()));
        tokio::spawn(
            self.clone()
                .settle_in_order(steps, tx.clone(), Some(lane.clone())),
        );
        let sink = Sink::Group {
            ordered: staged,
            replies: tx,
            lane,
        };
        self.apply_stream(requests, sink);
        ReceiverStream::new(rx)
    }

    /// The ordered lane: sends each step's reply in the stream's order, once its change is
    /// durable or committed (a run of reads waiting together shares one lease); releases
    /// each from `lane`, if any, as it is answered.
    async fn settle_in_order(
        self,
        mut steps: mpsc::Receiver<Step>,
        tx: mpsc::Sender<Result<serve::PipelineResponse, Status>>,
        lane: Option<Arc<Mutex<Lane>>>,
    ) {
        // A step taken from the channel that did not belong to the run of reads before it.
        let mut held = None;
        // The run of reads being served, kept so a stream allocates it once.
        let mut run = Vec::new();
        while let Some(step) = next_step(&mut steps, &mut held).await {
            let sent = match step {
                Step::Reply(a) if a.is_read() => {
                    // The reads queued behind it share one lease, taken now: after each of
                    // them arrived, and after the stream's earlier writes settled.
                    run_of(a, &mut steps, &mut held, Applied::is_read, &mut run);
                    self.serve_reads(&mut run, lane.as_deref(), &tx).await
                }
                Step::Reply(a) => {
                    let touches = a.touches;
                    let reply = self.finish(a, None).await;
                    if let Some(lane) = &lane {
                        lock(lane).release(&touches);
                    }
                    tx.send(Ok(reply)).await.is_ok()
                }
                Step::End(status) => tx.send(Err(status)).await.is_ok(),
            };
            // A failed send means the client went away: stop quietly.
            if !sent {
                return;
            }
        }
    }

    /// Serves a run of reads under one lease, taken now, within the earliest of their
    /// deadlines, and sends their replies, leaving `run` empty; releases each from `lane`,
    /// if any. `false` once the client has gone.
    async fn serve_reads(
        &self,
        run: &mut Vec<Applied>,
        lane: Option<&Mutex<Lane>>,
        tx: &mpsc::Sender<Result<serve::PipelineResponse, Status>>,
    ) -> bool {
        let deadline = run.iter().filter_map(|a| a.deadline).min();
        let lease = self.run_lease(deadline).await;
        for a in run.drain(..) {
            let touches = a.touches;
            let reply = self.finish(a, Some(&lease)).await;
            if let Some(lane) = lane {
                lock(lane).release(&touches);
            }
            if tx.send(Ok(reply)).await.is_err() {
                return false;
            }
        }
        true
    }

    /// Applies one pipelined request, if the budget has a permit for it; its response, and
    /// the log position the response must wait for if it changed anything.
    async fn pipelined(&self, request: pb::PipelineRequest) -> Applied {
        let op = request.op.as_ref().map_or("none", op_name);
        let touches = match (&request.op, self.group()) {
            (Some(op), Some(_)) => Touches::of(op),
            _ => Touches::Nothing,
        };
        let deadline = self.edge.request_timeout.map(|t| Instant::now() + t);
        let permit = match &self.edge.budget {
            Some(budget) => match budget.try_take() {
                Some(permit) => Some(permit),
                None => {
                    self.edge.metrics.shed_op(op);
                    return Applied {
                        response: serve::PipelineResponse {
                            id: request.id,
                            result: Some(Outcome::Error(status::error(&budget.exhausted()))),
                        },
                        wait: Wait::Nothing,
                        op,
                        deadline,
                        permit: None,
                        touches,
                    };
                }
            },
            None => None,
        };
        let (result, wait) = match request.op {
            Some(op) if self.group().is_some() => self.submit(op).await,
            Some(op) => {
                let (result, mutated) = self.dispatch(op).await;
                let wait = match mutated.then(|| self.log_position()).flatten() {
                    Some(position) => Wait::Log(position),
                    None => Wait::Nothing,
                };
                (
                    result.unwrap_or_else(|e| Outcome::Error(status::error(&e))),
                    wait,
                )
            }
            None => (
                Outcome::Error(status::error(&status::invalid("op", "is missing"))),
                Wait::Nothing,
            ),
        };
        Applied {
            response: serve::PipelineResponse {
                id: request.id,
                result: Some(result),
            },
            wait,
            op,
            deadline,
            permit,
            touches,
        }
    }

    /// In a group: plans a write and submits it behind the stream's earlier ones (its reply,
    /// as it will be once applied, and the commit to wait for); defers a read, and a write
    /// whose plan proposes nothing, to the second stage.
    async fn submit(&self, op: Op) -> (Outcome, Wait) {
        let Some(group) = self.group() else {
            unreachable!("submit is for a group's streams")
        };
        let planned = match &op {
            Op::Create(r) => self.plan_create(r).map(|p| p.map(Outcome::Session)),
            Op::Update(r) => self.plan_update(r).map(|p| p.map(Outcome::Session)),
            Op::Regenerate(r) => self.plan_regenerate(r).map(|p| p.map(Outcome::Session)),
            Op::Destroy(r) => self.plan_destroy(r).map(|p| p.map(Outcome::Destroy)),
            Op::DestroyUserSessions(_) => {
                // Its plan lists the user's sessions, a read: on a leader that has not yet
                // applied what was committed before its term it would miss some. The unary
                // path plans it under the lease, in the second stage.
                return (Outcome::Error(pb::Error::default()), Wait::Later(op));
            }
            Op::Get(_) | Op::Touch(_) | Op::ListUserSessions(_) => {
                // The reply is made in the second stage, under the lease.
                return (Outcome::Error(pb::Error::default()), Wait::Read(op));
            }
        };
        // A plan that replies without proposing is a read of this node's state, and may
        // depend on the stream's writes still in flight: the unary path plans it again in
        // the second stage, under the lease (see `group::write`).
        let plan = match planned {
            Ok(plan) if !plan.effects.is_empty() => plan,
            _ => return (Outcome::Error(pb::Error::default()), Wait::Later(op)),
        };
        match group.submit(plan.effects).await {
            Ok(pending) => (plan.reply, Wait::Group { pending, op }),
            Err(e) => (Outcome::Error(status::error(&e)), Wait::Nothing),
        }
    }

    /// The lease a run of reads shares, within `deadline`: the earliest of their
    /// `request_timeout`s.
    async fn run_lease(&self, deadline: Option<Instant>) -> Result<(), Status> {
        match deadline {
            Some(at) => tokio::time::timeout_at(at, self.read_lease())
                .await
                .unwrap_or_else(|_| Err(self.timed_out())),
            None => self.read_lease().await,
        }
    }

    /// The result `wait` leaves for a reply that was `planned`: the change made durable or
    /// committed (or an error saying why not), or a deferred operation run now; a read under
    /// `lease` if its run took one.
    async fn settle(
        &self,
        wait: Wait,
        planned: Outcome,
        lease: Option<&Result<(), Status>>,
    ) -> Result<Outcome, Status> {
        match wait {
            Wait::Nothing => Ok(planned),
            Wait::Log(position) => {
                self.durable_up_to(Some(position)).await?;
                Ok(planned)
            }
            Wait::Group { pending, op } => {
                let applied = pending.await?;
                if applied.first() == Some(&crate::store::Applied::Done) {
                    return Ok(planned);
                }
                // Overtaken: the unary path plans again until it is not.
                self.dispatch(op).await.0
            }
            Wait::Later(op) => self.dispatch(op).await.0,
            Wait::Read(op) => {
                match lease {
                    Some(lease) => lease.clone()?,
                    None => self.read_lease().await?,
                }
                self.read_leased(op)
            }
        }
    }

    /// A read once the lease is held.
    fn read_leased(&self, op: Op) -> Result<Outcome, Status> {
        match op {
            Op::Get(r) => self.get_leased(&r.id, r.peek).map(Outcome::Session),
            Op::Touch(r) => self.touch_leased(&r).map(Outcome::Touch),
            Op::ListUserSessions(r) => self.list_user_leased(&r).map(Outcome::ListUserSessions),
            _ => Err(Status::internal("a write was queued as a read")),
        }
    }

    /// Waits until an applied operation's change is durable (within its `request_timeout`),
    /// or serves it if it is a read (under `lease`, if its run took one), gives its permit
    /// back and counts it: its reply.
    async fn finish(
        &self,
        applied: Applied,
        lease: Option<&Result<(), Status>>,
    ) -> serve::PipelineResponse {
        let Applied {
            mut response,
            wait,
            op,
            deadline,
            permit,
            touches: _,
        } = applied;
        if !matches!(wait, Wait::Nothing) {
            let planned = response
                .result
                .take()
                .unwrap_or_else(|| Outcome::Error(pb::Error::default()));
            let settled = self.settle(wait, planned, lease);
            let settled = match deadline {
                Some(at) => tokio::time::timeout_at(at, settled)
                    .await
                    .unwrap_or_else(|_| Err(self.timed_out())),
                None => settled.await,
            };
            response.result = Some(settled.unwrap_or_else(|e| Outcome::Error(status::error(&e))));
        }
        drop(permit);
        let code = match &response.result {
            Some(Outcome::Error(e)) => Code::from_i32(e.code),
            _ => Code::Ok,
        };
        self.edge.metrics.pipelined(op, code);
        response
    }

    fn timed_out(&self) -> Status {
        let timeout = self.edge.request_timeout.unwrap_or_default();
        Status::deadline_exceeded(format!(
            "request_timeout ({}) passed before the change was durable",
            humantime::format_duration(timeout)
        ))
    }

    /// Hands a step on; `false` once the receiving side has gone (the client left).
    async fn send(&self, sink: &Sink, step: Step) -> bool {
        match sink {
            Sink::Staged(tx) => tx.send(step).await.is_ok(),
            Sink::Direct(tx) => {
                let reply = match step {
                    Step::Reply(applied) => Ok(self.finish(applied, None).await),
                    Step::End(status) => Err(status),
                };
                tx.send(reply).await.is_ok()
            }
            Sink::Group {
                ordered,
                replies,
                lane,
            } => {
                let Step::Reply(applied) = step else {
                    return ordered.send(step).await.is_ok();
                };
                // A read of what nothing in the lane changes sees every write the stream
                // asked for before it (each was answered once applied here): with the lease
                // holding now, after it arrived, it is answered at once.
                let clear = applied.is_read() && lock(lane).clear_for(&applied.touches);
                if clear && self.lease_holds() {
                    let reply = self.finish(applied, Some(&Ok(()))).await;
                    return replies.send(Ok(reply)).await.is_ok();
                }
                lock(lane).hold(&applied.touches);
                ordered.send(Step::Reply(applied)).await.is_ok()
            }
        }
    }

    /// Spawns the task that applies a Pipeline stream's requests in order and hands each
    /// on to `sink`. It stops at the stream's end, after a broken stream's error, when the
    /// sink closes (the client went away), or when the daemon starts shutting down: then it
    /// reads no further request and ends the stream with UNAVAILABLE after the replies of
    /// the operations already applied.
    fn apply_stream(self, mut requests: tonic::Streaming<pb::PipelineRequest>, sink: Sink) {
        let mut shutdown = self.edge.shutdown.clone();
        tokio::spawn(async move {
            loop {
                let message = match &mut shutdown {
                    Some(signal) => tokio::select! {
                        biased;
                        // A dropped sender means the daemon is gone: shutting down too.
                        _ = signal.wait_for(|stop| *stop) => None,
                        m = requests.message() => Some(m),
                    },
                    None => Some(requests.message().await),
                };
                let step = match message {
                    None => {
                        let end = Step::End(Status::unavailable("shutting down"));
                        if self.send(&sink, end).await {
                            linger(requests).await;
                        }
                        return;
                    }
                    Some(Ok(Some(request))) => Step::Reply(self.pipelined(request).await),
                    Some(Ok(None)) => return,
                    Some(Err(e)) => Step::End(e),
                };
                let end = matches!(step, Step::End(_));
                if !self.send(&sink, step).await || end {
                    return;
                }
            }
        });
    }
}

/// The next step: the one held back, else the channel's next; `None` once it is closed.
async fn next_step(steps: &mut mpsc::Receiver<Step>, held: &mut Option<Step>) -> Option<Step> {
    match held.take() {
        Some(step) => Some(step),
        None => steps.recv().await,
    }
}

/// Fills `run` (left empty by the run before) with `first` and the replies queued right
/// behind it that `joins` takes, up to the window; the first step that does not join is held
/// back in `held`.
fn run_of(
    first: Applied,
    steps: &mut mpsc::Receiver<Step>,
    held: &mut Option<Step>,
    joins: impl Fn(&Applied) -> bool,
    run: &mut Vec<Applied>,
) {
    run.push(first);
    while run.len() < PIPELINE_WINDOW {
        match steps.try_recv() {
            Ok(Step::Reply(a)) if joins(&a) => run.push(a),
            Ok(other) => {
                *held = Some(other);
                break;
            }
            Err(_) => break,
        }
    }
}

/// How long a stream ended by shutdown keeps its request side open, reading and dropping
/// what the client still sends, so the client reads the final status before the
/// connection closes. Closing at once would leave the client's requests in flight unread,
/// and the reset the kernel then sends can destroy the status before the client reads it.
const SHUTDOWN_LINGER: Duration = Duration::from_secs(1);

/// Reads and drops requests (none is applied) until the client closes its side or
/// [`SHUTDOWN_LINGER`] passes.
async fn linger(mut requests: tonic::Streaming<pb::PipelineRequest>) {
    let _ = tokio::time::timeout(SHUTDOWN_LINGER, async {
        while let Ok(Some(_)) = requests.message().await {}
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(id: &str) -> Touches {
        Touches::one(id)
    }

    #[test]
    fn a_read_waits_for_the_lane_only_behind_a_change_to_what_it_reads() {
        let mut lane = Lane::default();
        assert!(lane.clear_for(&one("a")) && lane.clear_for(&Touches::All));
        lane.hold(&one("a"));
        lane.hold(&Touches::Nothing);
        assert!(
            !lane.clear_for(&one("a")),
            "a Get of a session being updated waits"
        );
        assert!(lane.clear_for(&one("b")), "a Get of another does not");
        assert!(
            !lane.clear_for(&Touches::All),
            "a listing waits for any change"
        );
        lane.hold(&one("a"));
        lane.release(&one("a"));
        assert!(
            !lane.clear_for(&one("a")),
            "one of two changes to a is left"
        );
        lane.release(&one("a"));
        assert!(lane.clear_for(&one("a")));
        lane.hold(&Touches::All);
        assert!(
            !lane.clear_for(&one("b")),
            "behind DestroyUserSessions every read waits"
        );
        lane.release(&Touches::All);
        assert!(lane.clear_for(&one("b")));
        assert!(
            !lane.clear_for(&Touches::All),
            "the Create is still in the lane"
        );
        lane.release(&Touches::Nothing);
        assert!(lane.clear_for(&Touches::All));
        assert!(lane.sessions.is_empty());
    }
}
