//! Idempotency keys: safe retries of Create, Update and Regenerate.
//!
//! A write may carry a key. Applying it records what it did under that key (an
//! [`IdempotencyRecord`]), for `idempotency_window`; a retry with the same key finds the
//! record before deciding anything and answers with the original result, as it is now,
//! instead of making a second change. The records are part of the replicated state: the key
//! travels in the [`Effect`], the record is made by apply (live writes and [`Store::apply`]
//! alike), the log and snapshots keep it, and every replica holds the same ones.
//!
//! Apply reads no clock, so records are pruned by the time of the write being recorded:
//! storing a record at `t` forgets those with `at + idempotency_window <= t`, and then the
//! oldest while more than `max_idempotency_keys` are kept. Reads check the window themselves.
//!
//! Two requests with one key at once: a live write reserves its key while it is decided and
//! applied, so the second is refused with [`StoreError::InProgress`] until the first is done.
//! A replicated leader plans without applying, so two plans may both carry a key; the second
//! to be applied finds the first's record and is [`Applied::Stale`](super::Applied::Stale), so
//! the leader plans it again and that finds the record.
//!
//! The records take one mutex, held briefly and only by writes that carry a key. Their memory
//! is not counted in the store's bytes (they are not sessions, and eviction cannot free them);
//! `max_idempotency_keys` bounds it.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use super::events::Effect;
use super::{Store, StoreError};
use crate::session::{Millis, Session, SessionKey};

/// Which write an idempotency key was used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IdempotentOp {
    /// Create.
    Create,
    /// Update.
    Update,
    /// Regenerate.
    Regenerate,
}

/// What a write with an idempotency key did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyRecord {
    /// The key.
    pub key: Arc<str>,
    /// The write it was used for.
    pub op: IdempotentOp,
    /// The session the write was on: `None` for a Create.
    pub target: Option<SessionKey>,
    /// The session it produced or changed.
    pub result: SessionKey,
    /// The version it produced.
    pub version: u64,
    /// When.
    pub at: Millis,
}

impl IdempotencyRecord {
    /// The record `effect` leaves when applied; `None` if it carries no key.
    pub fn of(effect: &Effect) -> Option<Self> {
        let key = effect.idempotency()?.clone();
        let (op, target, result, version) = match effect {
            Effect::Create { session, .. } => {
                (IdempotentOp::Create, None, session.key, session.version)
            }
            Effect::Update { key, version, .. } => {
                (IdempotentOp::Update, Some(*key), *key, *version)
            }
            Effect::Regenerate { old, session, .. } => (
                IdempotentOp::Regenerate,
                Some(*old),
                session.key,
                session.version,
            ),
            Effect::Touch { .. } | Effect::End { .. } => return None,
        };
        Some(IdempotencyRecord {
            key,
            op,
            target,
            result,
            version,
            at: effect.at(),
        })
    }

    /// Whether the record still answers retries at `now`.
    fn in_force(&self, now: Millis, window: Millis) -> bool {
        now < self.at.saturating_add(window)
    }
}

/// The records, oldest first beside them for pruning, and the keys of live writes being
/// decided.
#[derive(Default)]
pub(crate) struct Keys {
    records: HashMap<Arc<str>, IdempotencyRecord>,
    /// Ordered by time, then key: the order does not depend on the order of inserts.
    by_age: BTreeSet<(Millis, Arc<str>)>,
    pending: HashSet<Arc<str>>,
}

/// A live write's hold on its key: released (dropped) once the write is applied or failed.
pub(crate) struct Reserved<'s> {
    keys: &'s Mutex<Keys>,
    key: Arc<str>,
}

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        lock(self.keys).pending.remove(&self.key);
    }
}

/// What a keyed write learns before it is decided.
pub(crate) enum Idem<'s> {
    /// A retry: the original result, as it is now. Nothing more to do.
    Retry(Session),
    /// Not seen (or no key): go on, carrying `key` in the effect.
    Fresh {
        /// The key, for the effect.
        key: Option<Arc<str>>,
        /// A live write's reservation of it.
        held: Option<Reserved<'s>>,
    },
}

fn lock(keys: &Mutex<Keys>) -> MutexGuard<'_, Keys> {
    // A panic elsewhere cannot leave the maps half-changed in a way that matters here.
    keys.lock().unwrap_or_else(|e| e.into_inner())
}

impl Store {
    /// Looks a write's key up before anything else is decided: a retry of the same write
    /// gets its original result; a key used for a different write is refused. `hold`: a live
    /// write, which reserves the key until it is done.
    pub(crate) fn idempotent(
        &self,
        key: Option<&str>,
        op: IdempotentOp,
        target: Option<SessionKey>,
        hold: bool,
    ) -> Result<Idem<'_>, StoreError> {
        let Some(key) = self.inner.limits.check_idempotency_key(key)? else {
            return Ok(Idem::Fresh {
                key: None,
                held: None,
            });
        };
        let now = self.now();
        let window = self.inner.limits.idempotency_window_ms();
        let found = {
            let mut keys = lock(&self.inner.idempotency);
            if keys.pending.contains(&key) {
                return Err(StoreError::InProgress);
            }
            let found = keys
                .records
                .get(&key)
                .filter(|r| r.in_force(now, window))
                .cloned();
            if found.is_none() && hold {
                keys.pending.insert(key.clone());
            }
            found
        };
        let Some(record) = found else {
            let held = hold.then(|| Reserved {
                keys: &self.inner.idempotency,
                key: key.clone(),
            });
            return Ok(Idem::Fresh {
                key: Some(key),
                held,
            });
        };
        // Never name the sessions: the caller may not know the other one.
        if record.op != op || record.target != target {
            return Err(StoreError::Invalid(
                "idempotency key was used for a different request".into(),
            ));
        }
        let what = match op {
            IdempotentOp::Create => "created",
            IdempotentOp::Update => "updated",
            IdempotentOp::Regenerate => "moved to",
        };
        let entry = self
            .inner
            .sessions
            .get(&record.result)
            .filter(|e| e.is_live(now) && e.version >= record.version)
            .ok_or(StoreError::RetryEnded(what))?;
        Ok(Idem::Retry(entry.snapshot(record.result, true)))
    }

    /// Records what a keyed effect did (nothing for one without a key), and prunes by its
    /// time. Part of applying it: no clock, the same on every replica.
    pub(crate) fn remember(&self, effect: &Effect) {
        let Some(record) = IdempotencyRecord::of(effect) else {
            return;
        };
        let l = &self.inner.limits;
        remember_in(
            &mut lock(&self.inner.idempotency),
            record,
            l.idempotency_window_ms(),
            l.max_idempotency_keys,
        );
    }

    /// Whether applying `effect` would record over another write's key still in force at the
    /// effect's time: a leader planned the same key twice, and the later plan must not apply.
    pub(crate) fn key_taken(&self, effect: &Effect) -> bool {
        let Some(record) = IdempotencyRecord::of(effect) else {
            return false;
        };
        let window = self.inner.limits.idempotency_window_ms();
        lock(&self.inner.idempotency)
            .records
            .get(&record.key)
            .is_some_and(|r| r.in_force(record.at, window) && *r != record)
    }

    /// Loads recovered records (a snapshot's), oldest first, pruned as they go.
    pub fn restore_idempotency(&self, mut records: Vec<IdempotencyRecord>) {
        records.sort_by(|a, b| (a.at, &a.key).cmp(&(b.at, &b.key)));
        let l = &self.inner.limits;
        let mut keys = lock(&self.inner.idempotency);
        for r in records {
            remember_in(
                &mut keys,
                r,
                l.idempotency_window_ms(),
                l.max_idempotency_keys,
            );
        }
    }

    /// Every idempotency record kept, oldest first. For snapshots: copies them under the
    /// lock, then calls `f` with no lock held.
    pub fn idempotency_records(&self) -> Vec<IdempotencyRecord> {
        let keys = lock(&self.inner.idempotency);
        keys.by_age
            .iter()
            .filter_map(|(_, k)| keys.records.get(k).cloned())
            .collect()
    }

    /// Idempotency records kept (some may be past the window, awaiting a prune).
    pub fn idempotency_keys(&self) -> usize {
        lock(&self.inner.idempotency).records.len()
    }
}

fn remember_in(keys: &mut Keys, record: IdempotencyRecord, window: Millis, max: usize) {
    let t = record.at;
    if let Some(old) = keys.records.insert(record.key.clone(), record.clone()) {
        keys.by_age.remove(&(old.at, old.key));
    }
    keys.by_age.insert((record.at, record.key));
    while let Some((at, key)) = keys.by_age.first().cloned() {
        if at.saturating_add(window) > t && keys.records.len() <= max {
            break;
        }
        keys.by_age.pop_first();
        keys.records.remove(&key);
    }
}
