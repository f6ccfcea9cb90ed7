//! The Pipeline stream: many operations in flight on one bidirectional stream.
//!
//! Each operation is applied in order, takes its own permit of `max_concurrent_requests`
//! (shed with RESOURCE_EXHAUSTED when there is none) and waits for the disk within its own
//! `request_timeout`. When the daemon starts draining, a stream reads no further request,
//! answers the ones it took and ends with UNAVAILABLE "shutting down", so an open stream
//! never holds the drain until `shutdown_grace` runs out.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status};

use super::group::Pending;
use super::{pb, status, Caller, PIPELINE_WINDOW};
use pb::pipeline_request::Op;
use pb::pipeline_response::Result as Outcome;

/// One pipelined operation, applied, on its way to its reply.
struct Applied {
    response: pb::PipelineResponse,
    /// What its reply waits for.
    wait: Wait,
    /// Its name as a metrics label.
    op: &'static str,
    /// When its `request_timeout` runs out.
    deadline: Option<Instant>,
    /// Its share of `max_concurrent_requests`, held until its reply is ready.
    permit: Option<OwnedSemaphorePermit>,
}

/// What the applying stage of a Pipeline stream hands on: a reply, or the stream's end.
/// What an applied operation's reply waits for before it is sent.
enum Wait {
    /// Nothing: the reply is ready.
    Nothing,
    /// The single-node log, durable up to this position.
    Log(u64),
    /// In a group: the commit of a write submitted in the stream's order. `op` is planned
    /// again if the write comes back overtaken (unless `replan` is false: DestroyUserSessions,
    /// whose overtaken ends ended their sessions anyway).
    Group {
        pending: Pending,
        op: Op,
        replan: bool,
    },
    /// In a group: an operation run once every earlier operation of the stream has its
    /// reply, so it sees the stream's own writes: a read, or a write whose plan failed while
    /// earlier writes of the stream were still in flight (an update of a session the stream
    /// has just created, say).
    Later(Op),
}

// Nearly every step is a reply: boxing it would cost an allocation per operation to save
// channel slots.
#[allow(clippy::large_enum_variant)]
enum Step {
    Reply(Applied),
    End(Status),
}

/// Where the applying stage sends its steps: straight to the client when replies need not
/// wait for the disk, or to the stage that waits for it.
enum Sink {
    Direct(mpsc::Sender<Result<pb::PipelineResponse, Status>>),
    Staged(mpsc::Sender<Step>),
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
        mut self,
        requests: tonic::Streaming<pb::PipelineRequest>,
    ) -> ReceiverStream<Result<pb::PipelineResponse, Status>> {
        let (tx, rx) = mpsc::channel(PIPELINE_WINDOW);
        if self.group().is_some() {
            self.unsettled = Some(Default::default());
        }
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
        let (applied_tx, mut applied) = mpsc::channel(PIPELINE_WINDOW);
        self.clone()
            .apply_stream(requests, Sink::Staged(applied_tx));
        tokio::spawn(async move {
            while let Some(step) = applied.recv().await {
                let reply = match step {
                    Step::Reply(a) => Ok(self.finish(a).await),
                    Step::End(status) => Err(status),
                };
                // A failed send means the client went away: stop quietly.
                if tx.send(reply).await.is_err() {
                    return;
                }
            }
        });
        ReceiverStream::new(rx)
    }

    /// Applies one pipelined request, if the budget has a permit for it; its response, and
    /// the log position the response must wait for if it changed anything.
    async fn pipelined(&self, request: pb::PipelineRequest) -> Applied {
        let op = request.op.as_ref().map_or("none", op_name);
        let deadline = self.edge.request_timeout.map(|t| Instant::now() + t);
        let permit = match &self.edge.budget {
            Some(budget) => match budget.try_take() {
                Some(permit) => Some(permit),
                None => {
                    self.edge.metrics.shed_op(op);
                    return Applied {
                        response: pb::PipelineResponse {
                            id: request.id,
                            result: Some(Outcome::Error(status::error(&budget.exhausted()))),
                        },
                        wait: Wait::Nothing,
                        op,
                        deadline,
                        permit: None,
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
            response: pb::PipelineResponse {
                id: request.id,
                result: Some(result),
            },
            wait,
            op,
            deadline,
            permit,
        }
    }

    /// In a group: plans a write and submits it behind the stream's earlier ones (its reply,
    /// as it will be once applied, and the commit to wait for); defers a read to the second
    /// stage.
    async fn submit(&self, op: Op) -> (Outcome, Wait) {
        let Some(group) = self.group() else {
            unreachable!("submit is for a group's streams")
        };
        // A plan that replies without proposing is a read of this node's state: under the
        // lease, as `group::write` takes it.
        if !matches!(op, Op::Get(_) | Op::Touch(_) | Op::ListUserSessions(_)) {
            if let Err(e) = group.lease_read().await {
                return (Outcome::Error(status::error(&e)), Wait::Nothing);
            }
        }
        let planned = match &op {
            Op::Create(r) => self.plan_create(r).map(|p| p.map(Outcome::Session)),
            Op::Update(r) => self.plan_update(r).map(|p| p.map(Outcome::Session)),
            Op::Regenerate(r) => self.plan_regenerate(r).map(|p| p.map(Outcome::Session)),
            Op::Destroy(r) => self.plan_destroy(r).map(|p| p.map(Outcome::Destroy)),
            Op::DestroyUserSessions(r) => self
                .plan_destroy_user(r)
                .map(|p| p.map(Outcome::DestroyUserSessions)),
            Op::Get(_) | Op::Touch(_) | Op::ListUserSessions(_) => {
                // The reply is made in the second stage.
                return (Outcome::Error(pb::Error::default()), Wait::Later(op));
            }
        };
        let unsettled = self.unsettled.as_deref();
        let plan = match planned {
            Ok(plan) => plan,
            Err(_) if unsettled.is_some_and(|n| n.load(Ordering::Acquire) > 0) => {
                return (Outcome::Error(pb::Error::default()), Wait::Later(op));
            }
            Err(e) => return (Outcome::Error(status::error(&e)), Wait::Nothing),
        };
        if plan.effects.is_empty() {
            return (plan.reply, Wait::Nothing);
        }
        match group.submit(plan.effects).await {
            Ok(pending) => {
                if let Some(n) = unsettled {
                    n.fetch_add(1, Ordering::AcqRel);
                }
                let replan = !matches!(op, Op::DestroyUserSessions(_));
                (
                    plan.reply,
                    Wait::Group {
                        pending,
                        op,
                        replan,
                    },
                )
            }
            Err(e) => (Outcome::Error(status::error(&e)), Wait::Nothing),
        }
    }

    /// The result `wait` leaves for a reply that was `planned`: the change made durable or
    /// committed (or an error saying why not), or a deferred read run now.
    async fn settle(&self, wait: Wait, planned: Outcome) -> Result<Outcome, Status> {
        match wait {
            Wait::Nothing => Ok(planned),
            Wait::Log(position) => {
                self.durable_up_to(Some(position)).await?;
                Ok(planned)
            }
            Wait::Group {
                pending,
                op,
                replan,
            } => {
                let applied = pending.await;
                if let Some(n) = &self.unsettled {
                    n.fetch_sub(1, Ordering::AcqRel);
                }
                let applied = applied?;
                if !replan || applied.first() == Some(&crate::store::Applied::Done) {
                    return Ok(planned);
                }
                // Overtaken: the unary path plans again until it is not.
                self.dispatch(op).await.0
            }
            Wait::Later(op) => self.dispatch(op).await.0,
        }
    }

    /// Waits until an applied operation's change is durable (within its `request_timeout`),
    /// gives its permit back and counts it: its reply.
    async fn finish(&self, applied: Applied) -> pb::PipelineResponse {
        let Applied {
            mut response,
            wait,
            op,
            deadline,
            permit,
        } = applied;
        if !matches!(wait, Wait::Nothing) {
            let planned = response
                .result
                .take()
                .unwrap_or_else(|| Outcome::Error(pb::Error::default()));
            let settled = self.settle(wait, planned);
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
                    Step::Reply(applied) => Ok(self.finish(applied).await),
                    Step::End(status) => Err(status),
                };
                tx.send(reply).await.is_ok()
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
