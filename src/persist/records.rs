//! Records <-> domain: a log record is an [`Effect`], and a snapshot entry a [`Session`] or
//! an [`IdempotencyRecord`].
//!
//! Recovery decodes them here and hands them to the Store, which applies them through the
//! same code as live writes (`Store::apply`).

use std::sync::Arc;

use prost::Message;

use super::pb;
use crate::session::{Attributes, ClientInfo, Session, SessionKey, ID_BYTES};
use crate::store::events::{Effect, EndCause};
use crate::store::{IdempotencyRecord, IdempotentOp};

/// A session as stored.
pub fn stored(s: Session) -> pb::StoredSession {
    pb::StoredSession {
        key: bytes::Bytes::copy_from_slice(s.key.as_bytes()),
        user: s.user.as_deref().unwrap_or_default().to_owned(),
        attributes: s
            .attributes
            .shared()
            .map(|(key, value)| pb::Attribute { key, value })
            .collect(),
        version: s.version,
        created_at: s.created_at,
        last_access_at: s.last_access_at,
        idle_timeout: s.idle_timeout,
        absolute_expires_at: s.absolute_expires_at,
        client_ip: s.client.ip,
        client_user_agent: s.client.user_agent,
    }
}

/// Appends `s` encoded as a [`pb::StoredSession`] to `buf`: the bytes
/// `stored(s.clone()).encode(buf)` writes, without building the message. A snapshot writes
/// one per session, and the message costs a vector of attributes and a reference count per
/// key and per value; this walks the packed attributes once.
pub(crate) fn encode_stored(s: &Session, buf: &mut Vec<u8>) {
    use crate::proto::fields::{put, put_pair, put_u64};
    put(1, s.key.as_bytes(), buf);
    put(2, s.user.as_deref().unwrap_or_default().as_bytes(), buf);
    for (key, value) in s.attributes.raw() {
        put_pair(3, key, value, buf);
    }
    put_u64(4, s.version, buf);
    put_u64(5, s.created_at, buf);
    put_u64(6, s.last_access_at, buf);
    put_u64(7, s.idle_timeout, buf);
    put_u64(8, s.absolute_expires_at, buf);
    put(9, s.client.ip.as_bytes(), buf);
    put(10, s.client.user_agent.as_bytes(), buf);
}

/// A record's attributes as a map holds them: each key once, with the last value given for
/// it; `None` if a key is not UTF-8. (Our own records never repeat a key.)
fn last_of_each(attributes: &[pb::Attribute]) -> Option<Vec<(&str, &bytes::Bytes)>> {
    /// Up to this many attributes a scan finds a repeated key faster than a hash table.
    const SCAN: usize = 32;
    let entries = attributes
        .iter()
        .map(|a| Some((std::str::from_utf8(&a.key).ok()?, &a.value)));
    if attributes.len() > SCAN {
        let map: std::collections::HashMap<_, _> = entries.collect::<Option<_>>()?;
        return Some(map.into_iter().collect());
    }
    let mut out: Vec<(&str, &bytes::Bytes)> = Vec::with_capacity(attributes.len());
    for entry in entries {
        let (key, value) = entry?;
        match out.iter_mut().find(|(k, _)| *k == key) {
            Some(seen) => seen.1 = value,
            None => out.push((key, value)),
        }
    }
    Some(out)
}

fn key(bytes: &[u8]) -> Option<SessionKey> {
    let arr: [u8; ID_BYTES] = bytes.try_into().ok()?;
    Some(SessionKey::from_bytes(arr))
}

/// A stored session back in domain form; `None` if the key is malformed or the version is
/// one no session can reach (the next update would overflow it).
pub fn session(p: pb::StoredSession) -> Option<Session> {
    if p.version == u64::MAX {
        return None;
    }
    Some(Session {
        key: key(&p.key)?,
        user: (!p.user.is_empty()).then(|| Arc::from(p.user)),
        attributes: Attributes::pack(
            last_of_each(&p.attributes)?
                .iter()
                .map(|&(k, v)| (k, &v[..])),
        ),
        version: p.version,
        created_at: p.created_at,
        last_access_at: p.last_access_at,
        idle_timeout: p.idle_timeout,
        absolute_expires_at: p.absolute_expires_at,
        client: ClientInfo {
            ip: p.client_ip,
            user_agent: p.client_user_agent,
        },
    })
}

/// An effect's log record, encoded.
pub fn encode(effect: &Effect) -> Vec<u8> {
    use pb::record::Op;
    let key = |k: &SessionKey| bytes::Bytes::copy_from_slice(k.as_bytes());
    let op = match effect {
        Effect::Create { session, .. } => Op::Create(stored(session.clone())),
        Effect::Update {
            key: k,
            set,
            remove,
            version,
            at,
            ..
        } => Op::Update(pb::Update {
            key: key(k),
            set: set
                .iter()
                .map(|(k, v)| pb::Attribute {
                    key: bytes::Bytes::copy_from_slice(k.as_bytes()),
                    value: v.clone(),
                })
                .collect(),
            remove: remove.clone(),
            version: *version,
            at: *at,
        }),
        Effect::Touch { key: k, at } => Op::Touch(pb::Touch {
            key: key(k),
            at: *at,
        }),
        Effect::Regenerate { old, session, .. } => Op::Regenerate(pb::Regenerate {
            old_key: key(old),
            session: Some(stored(session.clone())),
        }),
        Effect::End { key: k, cause, at } => Op::End(pb::End {
            key: key(k),
            cause: match cause {
                EndCause::Destroyed => pb::EndCause::Destroyed,
                EndCause::Expired => pb::EndCause::Expired,
                EndCause::Evicted => pb::EndCause::Evicted,
            } as i32,
            at: *at,
        }),
    };
    pb::Record {
        op: Some(op),
        idempotency_key: effect
            .idempotency()
            .map_or_else(String::new, |k| k.to_string()),
    }
    .encode_to_vec()
}

/// A log record back as the effect it stores; `None` if it decodes but makes no sense
/// (damage that slipped past the checksum).
pub fn decode(payload: bytes::Bytes) -> Option<Effect> {
    use pb::record::Op;
    let record = pb::Record::decode(payload).ok()?;
    let idempotency =
        (!record.idempotency_key.is_empty()).then(|| Arc::from(record.idempotency_key));
    Some(match record.op? {
        Op::Create(s) => Effect::Create {
            session: session(s)?,
            idempotency,
        },
        Op::Update(u) => {
            if u.version == u64::MAX {
                return None;
            }
            Effect::Update {
                key: key(&u.key)?,
                set: last_of_each(&u.set)?
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), v.clone()))
                    .collect(),
                remove: u.remove,
                version: u.version,
                at: u.at,
                idempotency,
            }
        }
        Op::Touch(t) => Effect::Touch {
            key: key(&t.key)?,
            at: t.at,
        },
        Op::Regenerate(r) => Effect::Regenerate {
            old: key(&r.old_key)?,
            session: session(r.session?)?,
            idempotency,
        },
        Op::End(e) => Effect::End {
            key: key(&e.key)?,
            // Records from before the cause was kept read as destroyed; replay ignores it.
            cause: match pb::EndCause::try_from(e.cause) {
                Ok(pb::EndCause::Expired) => EndCause::Expired,
                Ok(pb::EndCause::Evicted) => EndCause::Evicted,
                _ => EndCause::Destroyed,
            },
            at: e.at,
        },
    })
}

/// One frame of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotEntry {
    /// A session (every frame of a snapshot written before idempotency records existed).
    Session(Session),
    /// An idempotency record; they follow the sessions.
    Idempotency(IdempotencyRecord),
}

/// An idempotency record as a snapshot frame.
pub fn stored_idempotency(r: &IdempotencyRecord) -> pb::SnapshotIdempotency {
    let op = match r.op {
        IdempotentOp::Create => pb::IdempotentOp::Create,
        IdempotentOp::Update => pb::IdempotentOp::Update,
        IdempotentOp::Regenerate => pb::IdempotentOp::Regenerate,
    };
    pb::SnapshotIdempotency {
        record: Some(pb::IdempotencyRecord {
            key: r.key.to_string(),
            op: op as i32,
            target: r
                .target
                .map(|t| bytes::Bytes::copy_from_slice(t.as_bytes()))
                .unwrap_or_default(),
            result: bytes::Bytes::copy_from_slice(r.result.as_bytes()),
            version: r.version,
            at: r.at,
        }),
    }
}

fn idempotency_record(p: pb::IdempotencyRecord) -> Option<IdempotencyRecord> {
    let op = match pb::IdempotentOp::try_from(p.op).ok()? {
        pb::IdempotentOp::Create => IdempotentOp::Create,
        pb::IdempotentOp::Update => IdempotentOp::Update,
        pb::IdempotentOp::Regenerate => IdempotentOp::Regenerate,
        pb::IdempotentOp::Unspecified => return None,
    };
    let target = match (op, p.target.is_empty()) {
        (IdempotentOp::Create, true) => None,
        (IdempotentOp::Update | IdempotentOp::Regenerate, false) => Some(key(&p.target)?),
        _ => return None,
    };
    if p.key.is_empty() {
        return None;
    }
    Some(IdempotencyRecord {
        key: Arc::from(p.key),
        op,
        target,
        result: key(&p.result)?,
        version: p.version,
        at: p.at,
    })
}

/// A snapshot frame back as its entry; `None` if it makes no sense. A frame is an
/// idempotency record exactly when it sets `SnapshotIdempotency.record`, a field number
/// sessions never use.
pub fn decode_snapshot_entry(payload: bytes::Bytes) -> Option<SnapshotEntry> {
    if let Some(record) = pb::SnapshotIdempotency::decode(payload.clone())
        .ok()?
        .record
    {
        return idempotency_record(record).map(SnapshotEntry::Idempotency);
    }
    pb::StoredSession::decode(payload)
        .ok()
        .and_then(session)
        .map(SnapshotEntry::Session)
}
