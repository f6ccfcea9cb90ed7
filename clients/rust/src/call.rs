//! One call from start to result: its deadline, the connection it takes, the transport it
//! travels on, and whether it may be sent again when that connection fails.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tonic::metadata::MetadataMap;
use tonic::{Code, Status};

use crate::connection::{Conn, Router, Slot, DEFAULT_TIMEOUT};
use crate::pipeline::Failed;
use crate::LEADER_HEADER;
use crate::{wire, Error, SessionClient};
use wire::pipeline_request::Op;
use wire::pipeline_response::Result as Outcome;

/// The most times one call is sent or tried (a first time and two retries), all within its
/// deadline.
const MAX_ATTEMPTS: usize = 3;

/// Whether sending `op` twice changes nothing a caller could tell: a read, or a write with
/// an idempotency key.
fn retry_safe(op: &Op) -> bool {
    match op {
        Op::Get(_) | Op::Touch(_) | Op::ListUserSessions(_) => true,
        Op::Create(r) => !r.idempotency_key.is_empty(),
        Op::Update(r) => !r.idempotency_key.is_empty(),
        Op::Regenerate(r) => !r.idempotency_key.is_empty(),
        Op::Destroy(_) | Op::DestroyUserSessions(_) => false,
    }
}

/// The error a failed pipelined operation carries, typed like its unary status; a lost
/// compare-and-set's version from its `current_version`.
pub(crate) fn pb_error(e: wire::Error) -> Error {
    match (Code::from_i32(e.code), e.current_version) {
        (Code::Aborted, Some(current_version)) => Error::Conflict { current_version },
        (code, _) => Status::new(code, e.message).into(),
    }
}

/// A reply of the wrong kind for its request: a server bug, reported rather than a panic.
pub(crate) fn unexpected(outcome: Outcome) -> Error {
    match outcome {
        Outcome::Error(e) => pb_error(e),
        _ => Error::Other {
            code: Code::Internal,
            message: "sessiond answered with a reply of the wrong kind for the request".into(),
        },
    }
}

/// A call's deadline passed.
fn timed_out(client: &SessionClient) -> Error {
    let timeout = client
        .inner
        .shared
        .options
        .timeout
        .unwrap_or(DEFAULT_TIMEOUT);
    Error::Other {
        code: Code::DeadlineExceeded,
        message: format!("no reply within the client's timeout ({timeout:?})"),
    }
}

impl SessionClient {
    /// The next slot, round-robin.
    fn slot(&self) -> &Slot {
        let slots = &self.inner.slots;
        &slots[self.inner.next.fetch_add(1, Ordering::Relaxed) % slots.len()]
    }

    /// A connection for the next call: its slot's, or, when that slot cannot connect now,
    /// any other slot's that is up.
    async fn conn(&self) -> Result<Arc<Conn>, Error> {
        match self.slot().get(&self.inner.shared).await {
            Err(Error::Unavailable(why)) => (self.inner.slots.iter())
                .find_map(Slot::usable)
                .ok_or(Error::Unavailable(why)),
            other => other,
        }
    }

    /// Runs one operation within the client's timeout: its reply, or its typed error.
    pub(crate) async fn call(&self, op: Op) -> Result<Outcome, Error> {
        let timeout = self.inner.shared.options.timeout.unwrap_or(DEFAULT_TIMEOUT);
        tokio::time::timeout(timeout, self.attempts(op))
            .await
            .unwrap_or_else(|_| Err(timed_out(self)))
    }

    async fn attempts(&self, mut op: Op) -> Result<Outcome, Error> {
        let safe = retry_safe(&op);
        let mut last = None;
        for _ in 0..MAX_ATTEMPTS {
            let conn = self.conn().await?;
            // A copy to send again, for a call that may be sent again after it left.
            let spare = (safe || conn.pipe.is_some()).then(|| op.clone());
            let result = match &conn.pipe {
                Some(pipe) => match pipe.call(op).await {
                    Ok(Outcome::Error(e)) => Err(pb_error(e)),
                    Ok(outcome) => Ok(outcome),
                    Err(Failed::NotSent(back)) => {
                        conn.retire();
                        op = back;
                        last = Some("the Pipeline stream had ended".into());
                        continue;
                    }
                    Err(Failed::InFlight(ended)) => {
                        conn.retire();
                        let why = format!(
                            "the connection to sessiond broke with the call in flight ({})",
                            ended.why
                        );
                        match spare {
                            Some(spare) if safe || ended.unapplied => {
                                op = spare;
                                last = Some(why);
                                continue;
                            }
                            _ => {
                                return Err(Error::Unavailable(format!(
                                    "{why}: it may or may not have been applied"
                                )))
                            }
                        }
                    }
                },
                // Boxed: a unary call's future is a few KiB, and inline every call's
                // future (pipelined ones too) would carry room for it.
                None => Box::pin(unary(&conn, op, &self.inner.shared.router)).await,
            };
            match (result, spare) {
                (Err(Error::Unavailable(why)), Some(spare)) if safe => {
                    op = spare;
                    last = Some(why);
                }
                (result, _) => return result,
            }
        }
        Err(Error::Unavailable(format!(
            "gave up after {MAX_ATTEMPTS} attempts; the last: {}",
            last.unwrap_or_default()
        )))
    }

    /// GetMany, always unary, within the client's timeout; retried as a read.
    pub(crate) async fn get_many_call(
        &self,
        req: wire::GetManyRequest,
    ) -> Result<Vec<wire::GetResult>, Error> {
        let attempts = async {
            let mut last = String::new();
            for _ in 0..MAX_ATTEMPTS - 1 {
                let conn = self.conn().await?;
                let result = conn.stub.clone().get_many(req.clone()).await;
                let metadata = match &result {
                    Ok(r) => r.metadata(),
                    Err(s) => s.metadata(),
                };
                follow(&conn, metadata, &self.inner.shared.router);
                match result.map_err(unsent_as_unavailable) {
                    Ok(r) => return Ok(r.into_inner().results),
                    Err(s) if s.code() == Code::Unavailable => {
                        if conn.pipe.is_none() {
                            conn.retire();
                        }
                        last = s.message().to_string();
                    }
                    Err(s) => return Err(s.into()),
                }
            }
            Err(Error::Unavailable(last))
        };
        let timeout = self.inner.shared.options.timeout.unwrap_or(DEFAULT_TIMEOUT);
        tokio::time::timeout(timeout, attempts)
            .await
            .unwrap_or_else(|_| Err(timed_out(self)))
    }
}

/// Records the leader a reply named; a connection to another node takes no new call.
fn follow(conn: &Conn, metadata: &MetadataMap, router: &Router) {
    let leader = metadata.get(LEADER_HEADER).and_then(|v| v.to_str().ok());
    if leader.is_some_and(|l| router.leader_says(&conn.url, l)) {
        conn.retire();
    }
}

/// Runs `op` as its unary RPC. An `UNAVAILABLE` retires the connection, so the next call
/// makes a fresh one (to the next address, if this one is gone).
async fn unary(conn: &Conn, op: Op, router: &Router) -> Result<Outcome, Error> {
    fn parts<T>(r: tonic::Response<T>, f: impl FnOnce(T) -> Outcome) -> (MetadataMap, Outcome) {
        let (metadata, message, _) = r.into_parts();
        (metadata, f(message))
    }
    let mut stub = conn.stub.clone();
    let result = match op {
        Op::Create(r) => stub.create(r).await.map(|r| parts(r, Outcome::Session)),
        Op::Get(r) => stub.get(r).await.map(|r| parts(r, Outcome::Session)),
        Op::Touch(r) => stub.touch(r).await.map(|r| parts(r, Outcome::Touch)),
        Op::Update(r) => stub.update(r).await.map(|r| parts(r, Outcome::Session)),
        Op::Regenerate(r) => stub.regenerate(r).await.map(|r| parts(r, Outcome::Session)),
        Op::Destroy(r) => stub.destroy(r).await.map(|r| parts(r, Outcome::Destroy)),
        Op::ListUserSessions(r) => stub
            .list_user_sessions(r)
            .await
            .map(|r| parts(r, Outcome::ListUserSessions)),
        Op::DestroyUserSessions(r) => stub
            .destroy_user_sessions(r)
            .await
            .map(|r| parts(r, Outcome::DestroyUserSessions)),
    };
    match result {
        Ok((metadata, outcome)) => {
            follow(conn, &metadata, router);
            Ok(outcome)
        }
        Err(status) => {
            follow(conn, status.metadata(), router);
            let status = unsent_as_unavailable(status);
            if status.code() == Code::Unavailable {
                conn.retire();
            }
            Err(status.into())
        }
    }
}

/// A call the transport cancelled (its connection closed before the request went out:
/// hyper's "operation was canceled") is the connection failing, not the server cancelling
/// the call: it reads as `UNAVAILABLE`, which retires the connection and lets a read go to
/// the next one. A status the server sent has no source error; the transport's has one (a
/// deadline that expired, also `CANCELLED` with a source, stays as it is).
fn unsent_as_unavailable(status: Status) -> Status {
    let mut source = std::error::Error::source(&status);
    if status.code() != Code::Cancelled || source.is_none() {
        return status;
    }
    while let Some(e) = source {
        if e.is::<tonic::TimeoutExpired>() {
            return status;
        }
        source = e.source();
    }
    Status::unavailable(format!(
        "the connection to sessiond closed: {}",
        status.message()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_the_transport_cancelled_is_unavailable_and_a_servers_cancel_or_a_deadline_is_not() {
        let mut unsent = Status::cancelled("operation was canceled");
        unsent.set_source(Arc::new(std::io::Error::other("connection closed")));
        let unsent = unsent_as_unavailable(unsent);
        assert_eq!(unsent.code(), Code::Unavailable);
        assert!(
            unsent.message().contains("operation was canceled"),
            "{unsent:?}"
        );

        let by_server = unsent_as_unavailable(Status::cancelled("cancelled by the server"));
        assert_eq!(by_server.code(), Code::Cancelled);

        let mut deadline = Status::cancelled("Timeout expired");
        deadline.set_source(Arc::new(tonic::TimeoutExpired(())));
        assert_eq!(unsent_as_unavailable(deadline).code(), Code::Cancelled);
    }

    #[test]
    fn only_reads_and_keyed_writes_are_sent_twice() {
        assert!(retry_safe(&Op::Get(wire::GetRequest::default())));
        assert!(retry_safe(&Op::Touch(wire::TouchRequest::default())));
        assert!(retry_safe(&Op::ListUserSessions(
            wire::ListUserSessionsRequest::default()
        )));
        assert!(!retry_safe(&Op::Create(wire::CreateRequest::default())));
        assert!(retry_safe(&Op::Create(wire::CreateRequest {
            idempotency_key: "k".into(),
            ..Default::default()
        })));
        assert!(!retry_safe(&Op::Update(wire::UpdateRequest::default())));
        assert!(retry_safe(&Op::Regenerate(wire::RegenerateRequest {
            idempotency_key: "k".into(),
            ..Default::default()
        })));
        assert!(!retry_safe(&Op::Destroy(wire::DestroyRequest::default())));
        assert!(!retry_safe(&Op::DestroyUserSessions(
            wire::DestroyUserSessionsRequest::default()
        )));
    }
}
