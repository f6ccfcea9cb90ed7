//! Records <-> domain: a log record is an [`Effect`], and a snapshot entry a [`Session`].
//!
//! Recovery decodes them here and hands them to the Store, which applies them through the
//! same code as live writes (`Store::apply`).

use std::sync::Arc;

use prost::Message;

use super::pb;
use crate::session::{ClientInfo, Session, SessionKey, ID_BYTES};
use crate::store::events::{Effect, EndCause};

/// A session as stored.
pub fn stored(s: Session) -> pb::StoredSession {
    pb::StoredSession {
        key: bytes::Bytes::copy_from_slice(s.key.as_bytes()),
        user: s.user.as_deref().unwrap_or_default().to_owned(),
        attributes: s.attributes,
        version: s.version,
        created_at: s.created_at,
        last_access_at: s.last_access_at,
        idle_timeout: s.idle_timeout,
        absolute_expires_at: s.absolute_expires_at,
        client_ip: s.client.ip,
        client_user_agent: s.client.user_agent,
    }
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
        attributes: p.attributes,
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
        Effect::Create(session) => Op::Create(stored(session.clone())),
        Effect::Update {
            key: k,
            set,
            remove,
            version,
            at,
        } => Op::Update(pb::Update {
            key: key(k),
            set: set.iter().cloned().collect(),
            remove: remove.clone(),
            version: *version,
            at: *at,
        }),
        Effect::Touch { key: k, at } => Op::Touch(pb::Touch {
            key: key(k),
            at: *at,
        }),
        Effect::Regenerate { old, session } => Op::Regenerate(pb::Regenerate {
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
    pb::Record { op: Some(op) }.encode_to_vec()
}

/// A log record back as the effect it stores; `None` if it decodes but makes no sense
/// (damage that slipped past the checksum).
pub fn decode(payload: bytes::Bytes) -> Option<Effect> {
    use pb::record::Op;
    Some(match pb::Record::decode(payload).ok()?.op? {
        Op::Create(s) => Effect::Create(session(s)?),
        Op::Update(u) => {
            if u.version == u64::MAX {
                return None;
            }
            Effect::Update {
                key: key(&u.key)?,
                set: u.set.into_iter().collect(),
                remove: u.remove,
                version: u.version,
                at: u.at,
            }
        }
        Op::Touch(t) => Effect::Touch {
            key: key(&t.key)?,
            at: t.at,
        },
        Op::Regenerate(r) => Effect::Regenerate {
            old: key(&r.old_key)?,
            session: session(r.session?)?,
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

/// A snapshot entry back as its session; `None` if it makes no sense.
pub fn decode_snapshot_entry(payload: bytes::Bytes) -> Option<Session> {
    pb::StoredSession::decode(payload).ok().and_then(session)
}
