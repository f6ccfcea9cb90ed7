//! The sessiond backend: its operations through sessiond's Rust client
//! ([`sessiond_client::SessionClient`]), as an app server sends them: over Pipeline
//! streams with `--pipeline`, else unary RPCs. Server CPU and RSS from the admin endpoint.

use std::time::Duration;

use bytes::Bytes;
use sessiond_client::{ClientOptions, Error, NewSession, SessionClient, Transport};

use crate::workload::{Op, OpResult, Slot};

/// A call's deadline: long, so that an open loop past the server's capacity shows up as
/// latency, not as errors.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The most calls in flight on one connection's stream.
const MAX_IN_FLIGHT: usize = 1024;

/// The client, shared by the workers.
#[derive(Clone)]
pub(crate) struct Grpc {
    client: SessionClient,
}

impl Grpc {
    /// A client of sessiond at `addr` (plaintext) over `connections` connections, each with
    /// its Pipeline stream if `pipeline`. With `follow_leader` false, calls stay on `addr`
    /// even when it is a follower (which forwards them to the leader).
    pub(crate) async fn connect(
        addr: &str,
        connections: usize,
        pipeline: bool,
        follow_leader: bool,
    ) -> Result<Grpc, String> {
        let options = ClientOptions {
            connections: Some(connections.max(1)),
            transport: if pipeline {
                Transport::Pipelined
            } else {
                Transport::Unary
            },
            timeout: Some(CALL_TIMEOUT),
            max_in_flight: Some(MAX_IN_FLIGHT),
            follow_leader: Some(follow_leader),
            ..ClientOptions::default()
        };
        let client = SessionClient::connect_with(addr, options)
            .await
            .map_err(|e| format!("sessiond at {addr}: {e}"))?;
        // Connect now, so that the first measured call does not pay for it.
        match client.peek("no-such-session").await {
            Ok(_) | Err(Error::NotFound) | Err(Error::InvalidArgument(_)) => Ok(Grpc { client }),
            Err(e) => Err(format!("cannot connect to sessiond at {addr}: {e}")),
        }
    }

    /// Creates a session for `user`; returns its ID.
    pub(crate) async fn create(
        &self,
        user: usize,
        attrs: Vec<(String, Bytes)>,
    ) -> Result<String, String> {
        let new = NewSession {
            user_id: Some(format!("user{user}")),
            attributes: attrs.into_iter().collect(),
            ..NewSession::default()
        };
        Ok(self.client.create(new).await.map_err(code)?.id)
    }

    /// Runs a Get, Update, Destroy or Regenerate on session `id`.
    pub(crate) async fn apply(&self, op: Op, id: &str, value_bytes: usize) -> Result<Slot, String> {
        let c = &self.client;
        match op {
            Op::Get => c.get(id).await.map(|_| Slot::Kept),
            Op::Update => {
                let set = [("attr3", Bytes::from(vec![b'u'; value_bytes]))];
                c.update(id, set, None::<String>, None)
                    .await
                    .map(|_| Slot::Kept)
            }
            Op::Destroy => c.destroy(id).await.map(|_| Slot::Ended),
            Op::Regenerate => c.regenerate(id, None).await.map(|s| Slot::Moved(s.id)),
            Op::Create | Op::List => unreachable!("not an operation on one session"),
        }
        .map_err(code)
    }

    /// Lists `user`'s sessions, without attributes.
    pub(crate) async fn list(&self, user: usize) -> OpResult {
        let user = format!("user{user}");
        self.client
            .list_user_sessions(&user)
            .await
            .map(drop)
            .map_err(code)
    }

    /// Server CPU seconds and RSS bytes, from the admin endpoint at `admin_addr`.
    pub(crate) async fn server_stats(&self, admin_addr: &str) -> Option<(f64, f64)> {
        let body = sessiond_tools::admin::fetch(admin_addr, "/metrics", Duration::from_secs(5))
            .await
            .ok()?;
        Some((
            sessiond_tools::admin::sample(&body, "sessiond_process_cpu_seconds_total")?,
            sessiond_tools::admin::sample(&body, "sessiond_process_resident_memory_bytes")?,
        ))
    }
}

/// An error's name in the error counts: its gRPC code.
fn code(e: Error) -> String {
    match e {
        Error::NotFound => "NotFound".into(),
        Error::Conflict { .. } => "Aborted".into(),
        Error::InvalidArgument(_) => "InvalidArgument".into(),
        Error::ResourceExhausted(_) => "ResourceExhausted".into(),
        Error::Unauthenticated(_) => "Unauthenticated".into(),
        Error::Unavailable(_) => "Unavailable".into(),
        Error::Other { code, .. } => format!("{code:?}"),
    }
}
