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
use std::sync::{Arc, Mutex};

use super::events::Effect;
use super::{Store, StoreError};
use crate::lock;
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

    /// Replaces every idempotency record with `records` (a replica installing a snapshot).
    pub fn replace_idempotency(&self, records: Vec<IdempotencyRecord>) {
        {
            let mut keys = lock(&self.inner.idempotency);
            keys.records.clear();
            keys.by_age.clear();
        }
        self.restore_idempotency(records);
    }

    /// Every idempotency record kept, oldest first: copies, so a snapshot writes them with
    /// no lock held.
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

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use bytes::Bytes;

    use super::super::events::{Discard, Event, EventSink};
    use super::super::{Applied, Change, Limits, NewSession, Rotation};
    use super::*;
    use crate::clock::Clock;

    const T0: Millis = 1_700_000_000_000;

    /// Keeps every effect the store emits, for a replica to apply.
    #[derive(Default, Clone)]
    struct Effects(Arc<Mutex<Vec<Effect>>>);

    impl EventSink for Effects {
        fn record(&self, event: &Event<'_>) {
            self.0.lock().unwrap().push(event.effect.clone());
        }
    }

    impl Effects {
        fn take(&self) -> Vec<Effect> {
            std::mem::take(&mut self.0.lock().unwrap())
        }
    }

    fn store_with(limits: Limits) -> Store {
        Store::new(limits, 8, Clock::manual(T0), Box::new(Discard))
    }

    fn store() -> Store {
        store_with(Limits::default())
    }

    fn keyed(key: &str) -> NewSession {
        NewSession {
            idempotency_key: Some(key.into()),
            ..NewSession::default()
        }
    }

    fn change(key: Option<&str>, expected: Option<u64>, value: &str) -> Change {
        Change {
            set: vec![("cart".into(), Bytes::copy_from_slice(value.as_bytes()))],
            expected_version: expected,
            idempotency_key: key.map(str::to_owned),
            ..Change::default()
        }
    }

    fn rotation(key: &str) -> Rotation {
        Rotation {
            user: Some("alice".into()),
            idempotency_key: Some(key.into()),
            ..Rotation::default()
        }
    }

    #[test]
    fn a_retried_create_returns_the_same_session_and_makes_no_second() {
        let effects = Effects::default();
        let store = Store::new(
            Limits::default(),
            8,
            Clock::manual(T0),
            Box::new(effects.clone()),
        );
        let first = store.create(keyed("k1")).unwrap();
        assert_eq!(effects.take().len(), 1);
        store.clock().advance(Duration::from_secs(30));
        let again = store.create(keyed("k1")).unwrap();
        assert_eq!(again.key, first.key);
        assert_eq!(store.stats().sessions, 1);
        assert!(effects.take().is_empty(), "a retry changes nothing");
        // Another key is another session; no key is never a retry.
        assert_ne!(store.create(keyed("k2")).unwrap().key, first.key);
        store.create(NewSession::default()).unwrap();
        store.create(NewSession::default()).unwrap();
        assert_eq!(store.stats().sessions, 4);
        assert_eq!(store.idempotency_keys(), 2);
    }

    #[test]
    fn a_retried_update_bumps_the_version_once() {
        let store = store();
        let id = store.create(NewSession::default()).unwrap().key.encode();
        let first = store
            .update(&id, change(Some("u1"), None, "apple"))
            .unwrap();
        assert_eq!(first.version, 2);
        let again = store
            .update(&id, change(Some("u1"), None, "apple"))
            .unwrap();
        assert_eq!(again.version, 2);
        assert_eq!(store.get(&id, true).unwrap().version, 2);
        // A later write shows: the retry returns the session as it is now.
        store.update(&id, change(None, None, "pear")).unwrap();
        let later = store
            .update(&id, change(Some("u1"), None, "apple"))
            .unwrap();
        assert_eq!(later.version, 3);
        assert_eq!(later.attributes["cart"], Bytes::from_static(b"pear"));
    }

    #[test]
    fn a_compare_and_set_retried_after_it_succeeded_returns_the_success() {
        let store = store();
        let id = store.create(NewSession::default()).unwrap().key.encode();
        let cas = |key| change(key, Some(1), "apple");
        assert_eq!(store.update(&id, cas(Some("c1"))).unwrap().version, 2);
        let again = store.update(&id, cas(Some("c1"))).unwrap();
        assert_eq!(again.version, 2);
        assert_eq!(again.attributes["cart"], Bytes::from_static(b"apple"));
        // Without the key, the same retry is a version mismatch.
        assert_eq!(
            store.update(&id, cas(None)).unwrap_err(),
            StoreError::VersionMismatch {
                expected: 1,
                current: 2
            }
        );
    }

    #[test]
    fn a_retried_regenerate_returns_the_session_under_its_new_id() {
        let store = store();
        let old = store.create(NewSession::default()).unwrap().key.encode();
        let moved = store.regenerate(&old, rotation("r1")).unwrap();
        let again = store.regenerate(&old, rotation("r1")).unwrap();
        assert_eq!(again.key, moved.key);
        assert_eq!(again.version, moved.version);
        assert_eq!(store.stats().sessions, 1);
        assert_eq!(store.get(&old, true), Err(StoreError::NotFound));
        assert_eq!(store.list_user("alice", false).unwrap().len(), 1);
    }

    #[test]
    fn a_key_reused_for_another_request_is_invalid_and_names_no_session() {
        let store = store();
        let a = store.create(keyed("k")).unwrap().key.encode();
        let b = store.create(NewSession::default()).unwrap().key.encode();
        let mismatch = [
            store.update(&a, change(Some("k"), None, "x")),
            store.regenerate(&a, rotation("k")),
        ];
        store.update(&a, change(Some("u"), None, "x")).unwrap();
        let other_session = store.update(&b, change(Some("u"), None, "x"));
        let create_with_update_key = store.create(keyed("u"));
        for err in mismatch
            .into_iter()
            .chain([other_session])
            .map(|r| r.unwrap_err())
            .chain([create_with_update_key.unwrap_err()])
        {
            assert_eq!(
                err,
                StoreError::Invalid("idempotency key was used for a different request".into())
            );
            assert!(!err.to_string().contains(&a) && !err.to_string().contains(&b));
        }
        assert_eq!(store.get(&b, true).unwrap().version, 1, "nothing changed");
    }

    #[test]
    fn a_retry_after_its_session_ended_is_not_found_and_says_so() {
        let store = store();
        let s = store.create(keyed("k")).unwrap();
        assert!(store.destroy(&s.key.encode()).unwrap());
        let err = store.create(keyed("k")).unwrap_err();
        assert_eq!(err, StoreError::RetryEnded("created"));
        assert!(err.to_string().contains("has ended"), "{err}");
        assert_eq!(store.stats().sessions, 0, "and no second session");
    }

    #[test]
    fn a_key_over_the_limit_is_invalid_naming_the_setting() {
        let store = store_with(Limits {
            max_idempotency_key_bytes: 8,
            ..Limits::default()
        });
        let err = store.create(keyed("123456789")).unwrap_err();
        assert!(matches!(err, StoreError::Invalid(_)));
        assert!(
            err.to_string().contains("max_idempotency_key_bytes"),
            "{err}"
        );
        store.create(keyed("12345678")).unwrap();
        // "" is no key at all.
        store.create(keyed("")).unwrap();
        store.create(keyed("")).unwrap();
        assert_eq!(store.stats().sessions, 3);
        assert_eq!(store.idempotency_keys(), 1);
    }

    #[test]
    fn keys_are_forgotten_after_the_window_and_pruned_by_later_writes() {
        let store = store_with(Limits {
            idempotency_window: Duration::from_secs(60),
            ..Limits::default()
        });
        let first = store.create(keyed("k")).unwrap();
        store.clock().advance(Duration::from_millis(59_999));
        assert_eq!(store.create(keyed("k")).unwrap().key, first.key);
        store.clock().advance(Duration::from_millis(1));
        // The window has passed: the record answers no more, even before it is pruned.
        let second = store.create(keyed("k")).unwrap();
        assert_ne!(second.key, first.key);
        assert_eq!(store.stats().sessions, 2);
        assert_eq!(store.create(keyed("k")).unwrap().key, second.key);
        // A keyed write at a later time prunes the records that are past the window.
        store.create(keyed("other")).unwrap();
        assert_eq!(store.idempotency_keys(), 2);
        store.clock().advance(Duration::from_secs(60));
        store.create(keyed("last")).unwrap();
        assert_eq!(store.idempotency_keys(), 1);
    }

    #[test]
    fn the_oldest_key_is_dropped_at_max_idempotency_keys() {
        let store = store_with(Limits {
            max_idempotency_keys: 2,
            ..Limits::default()
        });
        let k1 = store.create(keyed("k1")).unwrap();
        store.clock().advance(Duration::from_millis(1));
        store.create(keyed("k2")).unwrap();
        store.clock().advance(Duration::from_millis(1));
        let k3 = store.create(keyed("k3")).unwrap();
        assert_eq!(store.idempotency_keys(), 2);
        let keys: Vec<_> = store
            .idempotency_records()
            .into_iter()
            .map(|r| r.key.to_string())
            .collect();
        assert_eq!(keys, ["k2", "k3"]);
        assert_eq!(store.create(keyed("k3")).unwrap().key, k3.key);
        assert_ne!(store.create(keyed("k1")).unwrap().key, k1.key);
    }

    #[test]
    fn a_key_in_progress_is_refused_until_its_write_is_done() {
        let store = store();
        let held = store
            .idempotent(Some("k"), IdempotentOp::Create, None, true)
            .unwrap();
        assert_eq!(store.create(keyed("k")), Err(StoreError::InProgress));
        drop(held);
        let s = store.create(keyed("k")).unwrap();
        // A write that fails releases its key.
        let err = store.update("not an id", change(Some("x"), None, "v"));
        assert!(err.is_err());
        let bad = Change {
            remove: vec!["cart".into()],
            ..change(Some("x"), None, "v")
        };
        assert!(store.update(&s.key.encode(), bad).is_err());
        assert!(store
            .update(&s.key.encode(), change(Some("x"), None, "v"))
            .is_ok());
    }

    #[test]
    fn a_replica_fed_the_effects_answers_a_retry_as_the_leader_does() {
        let effects = Effects::default();
        let leader = Store::new(
            Limits::default(),
            8,
            Clock::manual(T0),
            Box::new(effects.clone()),
        );
        let created = leader.create(keyed("c")).unwrap();
        let id = created.key.encode();
        let updated = leader
            .update(&id, change(Some("u"), Some(1), "kiwi"))
            .unwrap();
        let moved = leader.regenerate(&id, rotation("r")).unwrap();
        let replica = store();
        for e in effects.take() {
            assert_eq!(replica.apply(&e), Applied::Done);
        }
        assert_eq!(replica.idempotency_records(), leader.idempotency_records());
        for store in [&leader, &replica] {
            let c = store.create(keyed("c"));
            let u = store.update(&id, change(Some("u"), Some(1), "kiwi"));
            let r = store.regenerate(&id, rotation("r")).unwrap();
            assert_eq!(c.unwrap_err(), StoreError::RetryEnded("created"));
            assert_eq!(u.unwrap_err(), StoreError::RetryEnded("updated"));
            assert_eq!(r.key, moved.key);
            assert_eq!(store.stats().sessions, 1);
        }
        assert_eq!(updated.version, 2);
        // Replaying an effect again (recovery over a snapshot) changes nothing.
        let replayed = store();
        let create = Effect::Create {
            session: created.clone(),
            idempotency: Some("c".into()),
        };
        assert_eq!(replayed.apply(&create), Applied::Done);
        assert_eq!(replayed.apply(&create), Applied::Stale);
        assert_eq!(replayed.idempotency_keys(), 1);
    }

    #[test]
    fn plans_answer_retries_like_live_writes() {
        let store = store();
        let plan = store.plan_create(keyed("c")).unwrap();
        assert_eq!(store.apply(&plan.effects[0]), Applied::Done);
        let retry = store.plan_create(keyed("c")).unwrap();
        assert!(retry.effects.is_empty());
        assert_eq!(retry.reply.key, plan.reply.key);
        let id = plan.reply.key.encode();

        let cas = store
            .plan_update(&id, change(Some("u"), Some(1), "fig"))
            .unwrap();
        assert_eq!(store.apply(&cas.effects[0]), Applied::Done);
        let retry = store
            .plan_update(&id, change(Some("u"), Some(1), "fig"))
            .unwrap();
        assert!(retry.effects.is_empty());
        assert_eq!(retry.reply.version, 2);
        assert_eq!(
            store
                .plan_update(&id, change(Some("u"), Some(1), "fig"))
                .unwrap()
                .reply,
            store
                .update(&id, change(Some("u"), Some(1), "fig"))
                .unwrap()
        );

        let moved = store.plan_regenerate(&id, rotation("r")).unwrap();
        assert_eq!(store.apply(&moved.effects[0]), Applied::Done);
        let retry = store.plan_regenerate(&id, rotation("r")).unwrap();
        assert!(retry.effects.is_empty());
        assert_eq!(retry.reply.key, moved.reply.key);
        assert_eq!(
            store
                .plan_update(&id, change(Some("r"), None, "x"))
                .unwrap_err(),
            StoreError::Invalid("idempotency key was used for a different request".into())
        );
        assert_eq!(store.stats().sessions, 1);
    }

    #[test]
    fn one_key_planned_twice_applies_once_and_the_replan_is_the_retry() {
        let store = store();
        let first = store.plan_create(keyed("c")).unwrap();
        let second = store.plan_create(keyed("c")).unwrap();
        assert_eq!(store.apply(&first.effects[0]), Applied::Done);
        assert_eq!(store.apply(&second.effects[0]), Applied::Stale);
        assert_eq!(store.stats().sessions, 1);
        let again = store.plan_create(keyed("c")).unwrap();
        assert!(again.effects.is_empty());
        assert_eq!(again.reply.key, first.reply.key);

        // Past the window, the key is free again, also at apply time.
        let window = store.limits().idempotency_window;
        let late = store.plan_create(keyed("c")).unwrap();
        store.clock().advance(window);
        let fresh = store.plan_create(keyed("c")).unwrap();
        assert_eq!(fresh.effects.len(), 1);
        assert!(late.effects.is_empty());
        assert_eq!(store.apply(&fresh.effects[0]), Applied::Done);
        assert_eq!(store.stats().sessions, 2);
    }
}
