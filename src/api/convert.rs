//! proto <-> domain. The only place that knows both shapes.

use std::time::Duration;

use tonic::Status;

use super::pb;
use super::status::invalid;
use crate::session::{ClientInfo, Millis, Session};
use crate::store::{Change, NewSession, Rotation};

/// Wall-clock milliseconds as a protobuf timestamp.
pub fn timestamp(ms: Millis) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

/// Milliseconds as a protobuf duration.
pub fn duration(ms: Millis) -> prost_types::Duration {
    prost_types::Duration {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

fn std_duration(field: &str, d: Option<prost_types::Duration>) -> Result<Option<Duration>, Status> {
    d.map(|d| Duration::try_from(d).map_err(|_| invalid(field, "must be a positive duration")))
        .transpose()
}

fn client(c: Option<pb::ClientInfo>) -> ClientInfo {
    c.map(|c| ClientInfo {
        ip: c.ip,
        user_agent: c.user_agent,
    })
    .unwrap_or_default()
}

/// A Session for the wire.
pub fn session(s: Session) -> pb::Session {
    let expires_at = s.expires_at();
    pb::Session {
        id: s.key.encode(),
        user_id: s.user.as_deref().unwrap_or_default().to_owned(),
        attributes: s.attributes,
        version: s.version,
        created_at: Some(timestamp(s.created_at)),
        last_access_at: Some(timestamp(s.last_access_at)),
        expires_at: Some(timestamp(expires_at)),
        absolute_expires_at: Some(timestamp(s.absolute_expires_at)),
        idle_timeout: Some(duration(s.idle_timeout)),
        client: Some(pb::ClientInfo {
            ip: s.client.ip,
            user_agent: s.client.user_agent,
        }),
    }
}

/// A CreateRequest for the Store.
pub(crate) fn new_session(r: pb::CreateRequest) -> Result<NewSession, Status> {
    Ok(NewSession {
        user: Some(r.user_id),
        attributes: r.attributes.into_iter().collect(),
        idle_timeout: std_duration("idle_timeout", r.idle_timeout)?,
        absolute_timeout: std_duration("absolute_timeout", r.absolute_timeout)?,
        client: client(r.client),
        idempotency_key: key(r.idempotency_key),
    })
}

/// An `idempotency_key` for the Store: "" is none.
fn key(k: String) -> Option<String> {
    (!k.is_empty()).then_some(k)
}

/// An UpdateRequest's change for the Store.
pub fn change(r: pb::UpdateRequest) -> Change {
    Change {
        set: r.set.into_iter().collect(),
        remove: r.remove,
        expected_version: r.expected_version,
        idempotency_key: key(r.idempotency_key),
    }
}

/// A RegenerateRequest's rotation for the Store.
pub fn rotation(r: &pb::RegenerateRequest) -> Rotation {
    Rotation {
        user: r.user_id.clone(),
        drop_attributes: r.drop_attributes,
        idempotency_key: key(r.idempotency_key.clone()),
    }
}
