//! What the cluster's tests share: stores on a manual clock, sessions and effects, entries.

use std::collections::BTreeMap;

use bytes::Bytes;
use openraft::entry::RaftEntry;
use openraft::EntryPayload;

use super::{pb, LogId, Membership, Proposal};
use crate::clock::Clock;
use crate::session::{ClientInfo, Millis, Session, SessionKey, ID_BYTES};
use crate::store::{events, Effect, Limits, Store};

/// The manual clock's start: far from the epoch, as real times are.
pub(crate) const T0: Millis = 1_700_000_000_000;

/// A store on a manual clock that never moves: nothing expires under a test.
pub(crate) fn store() -> Store {
    Store::new(
        Limits::default(),
        8,
        Clock::manual(T0),
        Box::new(events::Discard),
    )
}

/// Session number `n`, with an attribute naming it.
pub(crate) fn session(n: u32) -> Session {
    let mut key = [0u8; ID_BYTES];
    key[..4].copy_from_slice(&n.to_le_bytes());
    key[4] = 0xC1;
    Session {
        key: SessionKey::from_bytes(key),
        user: Some(format!("user-{}", n % 7).into()),
        attributes: [("n".to_string(), Bytes::from(n.to_string()))]
            .into_iter()
            .collect(),
        version: 1,
        created_at: T0,
        last_access_at: T0,
        idle_timeout: 3_600_000,
        absolute_expires_at: T0 + 86_400_000,
        client: ClientInfo::default(),
    }
}

/// Creates session `n`.
pub(crate) fn create(n: u32) -> Effect {
    Effect::Create {
        session: session(n),
        idempotency: None,
    }
}

/// Sets attribute `k` of session `n`, moving it to `version`.
pub(crate) fn update(n: u32, version: u64, k: &str) -> Effect {
    Effect::Update {
        key: session(n).key,
        set: vec![(k.to_string(), Bytes::from_static(b"v"))],
        remove: Vec::new(),
        version,
        at: T0 + version,
        idempotency: None,
    }
}

/// Ends session `n`.
pub(crate) fn end(n: u32) -> Effect {
    Effect::End {
        key: session(n).key,
        cause: events::EndCause::Destroyed,
        at: T0 + 1,
    }
}

/// An entry with `effects` at `term`, `index`.
pub(crate) fn entry(term: u64, index: u64, effects: Vec<Effect>) -> pb::Entry {
    pb::Entry::new(
        LogId::new(term, index),
        EntryPayload::Normal(Proposal(effects)),
    )
}

/// A blank entry.
pub(crate) fn blank(term: u64, index: u64) -> pb::Entry {
    pb::Entry::new_blank(LogId::new(term, index))
}

/// A membership entry of voters `ids`.
pub(crate) fn membership(term: u64, index: u64, ids: &[u64]) -> pb::Entry {
    let nodes: BTreeMap<u64, pb::Node> = ids
        .iter()
        .map(|id| {
            (
                *id,
                pb::Node {
                    peer_addr: format!("127.0.0.1:{}", 9000 + id),
                    client_addr: String::new(),
                },
            )
        })
        .collect();
    let m = Membership::new(vec![ids.iter().copied().collect()], nodes).unwrap();
    pb::Entry::new_membership(LogId::new(term, index), m)
}

/// Every session of `store`, sorted by key: what two replicas compare.
pub(crate) fn sessions(store: &Store) -> Vec<Session> {
    let mut all = Vec::new();
    store.for_each_session(|s| all.push(s));
    all.sort_by_key(|s| *s.key.as_bytes());
    all
}
