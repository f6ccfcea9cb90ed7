//! proto -> domain: requests into what the Store takes. (Replies carrying a session are
//! encoded straight from the store's session, by [`reply`](crate::proto::reply).)

use std::time::Duration;

use tonic::Status;

use super::pb;
use super::status::invalid;
use crate::session::ClientInfo;
use crate::store::{Change, NewSession, Rotation};

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
