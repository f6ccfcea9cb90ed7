//! Records <-> domain, and the replay that rebuilds the sessions from a snapshot and the log.
//!
//! Replay is idempotent, so records that a snapshot already reflects can be applied again
//! harmlessly: creates and regenerates are upserts that keep the higher version, updates
//! apply only onto the version just before theirs, touches only move time forward, and ends
//! remove whatever is there.

use std::collections::HashMap;
use std::sync::Arc;

use prost::Message;

use super::format::FormatError;
use super::pb;
use crate::session::{ClientInfo, KeyHasherBuilder, Millis, Session, SessionKey, ID_BYTES};
use crate::store::events::Event;

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

/// The log record for an event, encoded.
pub fn encode(event: &Event<'_>) -> Vec<u8> {
    use pb::record::Op;
    let op = match event {
        Event::Created { session, .. } => Op::Create(stored((*session).clone())),
        Event::Updated {
            key,
            set,
            remove,
            version,
            at,
            ..
        } => Op::Update(pb::Update {
            key: bytes::Bytes::copy_from_slice(key.as_bytes()),
            set: set.iter().cloned().collect(),
            remove: remove.to_vec(),
            version: *version,
            at: *at,
        }),
        Event::Touched { key, at } => Op::Touch(pb::Touch {
            key: bytes::Bytes::copy_from_slice(key.as_bytes()),
            at: *at,
        }),
        Event::Regenerated { old, session, .. } => Op::Regenerate(pb::Regenerate {
            old_key: bytes::Bytes::copy_from_slice(old.as_bytes()),
            session: Some(stored((*session).clone())),
        }),
        Event::Ended { key, .. } => Op::End(pb::End {
            key: bytes::Bytes::copy_from_slice(key.as_bytes()),
        }),
    };
    pb::Record { op: Some(op) }.encode_to_vec()
}

/// Sessions being rebuilt.
#[derive(Default)]
pub struct Replay {
    /// The sessions so far, live or not.
    pub sessions: HashMap<SessionKey, Session, KeyHasherBuilder>,
    /// Records applied.
    pub records: u64,
}

/// A record that decodes but makes no sense: damage that slipped past the checksum.
fn nonsense(path: &std::path::Path) -> FormatError {
    FormatError::Corrupt {
        path: path.to_owned(),
        offset: 0,
    }
}

impl Replay {
    /// Adds one snapshot entry.
    pub fn load_snapshot_entry(
        &mut self,
        payload: bytes::Bytes,
        path: &std::path::Path,
    ) -> Result<(), FormatError> {
        let s = pb::StoredSession::decode(payload)
            .ok()
            .and_then(session)
            .ok_or_else(|| nonsense(path))?;
        self.sessions.insert(s.key, s);
        Ok(())
    }

    /// Applies one log record.
    pub fn apply(
        &mut self,
        payload: bytes::Bytes,
        path: &std::path::Path,
    ) -> Result<(), FormatError> {
        use pb::record::Op;
        let record = pb::Record::decode(payload).map_err(|_| nonsense(path))?;
        self.records += 1;
        match record.op.ok_or_else(|| nonsense(path))? {
            Op::Create(s) => {
                let s = session(s).ok_or_else(|| nonsense(path))?;
                self.upsert(s);
            }
            Op::Update(u) => {
                let k = key(&u.key).ok_or_else(|| nonsense(path))?;
                if u.version == u64::MAX {
                    return Err(nonsense(path));
                }
                if let Some(s) = self.sessions.get_mut(&k) {
                    if s.version.checked_add(1) == Some(u.version) {
                        for r in &u.remove {
                            s.attributes.remove(r);
                        }
                        s.attributes.extend(u.set);
                        s.version = u.version;
                        s.last_access_at = s.last_access_at.max(u.at);
                    }
                }
            }
            Op::Touch(t) => {
                let k = key(&t.key).ok_or_else(|| nonsense(path))?;
                if let Some(s) = self.sessions.get_mut(&k) {
                    s.last_access_at = s.last_access_at.max(t.at);
                }
            }
            Op::Regenerate(r) => {
                let old = key(&r.old_key).ok_or_else(|| nonsense(path))?;
                let s = r.session.and_then(session).ok_or_else(|| nonsense(path))?;
                self.sessions.remove(&old);
                self.upsert(s);
            }
            Op::End(e) => {
                let k = key(&e.key).ok_or_else(|| nonsense(path))?;
                self.sessions.remove(&k);
            }
        }
        Ok(())
    }

    fn upsert(&mut self, s: Session) {
        match self.sessions.get(&s.key) {
            Some(cur) if cur.version >= s.version => {}
            _ => {
                self.sessions.insert(s.key, s);
            }
        }
    }

    /// The sessions still alive at `now`: one that expired while the daemon was down stays
    /// dead.
    pub fn live(self, now: Millis) -> Vec<Session> {
        self.sessions
            .into_values()
            .filter(|s| now < s.expires_at())
            .collect()
    }
}
