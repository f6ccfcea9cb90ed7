//! Plan: a write decided for a replicated group, to be applied once the group has it.
//!
//! A single node evaluates and applies each write under one lock ([`super::evaluate`]). A
//! group's leader cannot: it must not change its state before a majority holds the change,
//! or a reader could see a write that a failover then loses. So the leader *plans*: it
//! evaluates the write against its applied state, with the same checks as a single node,
//! into the effects to propose, and changes nothing. Every node, the leader included,
//! applies the effects through [`Store::apply`] once the group has committed them.
//!
//! Between planning and applying, another committed write can overtake the plan (two
//! updates of one session planned at the same version). Apply's guards catch it: an update
//! applies only onto the version it was planned on, a regenerate only onto the session it
//! rotated. [`Applied::Stale`] says the effect changed nothing, and the leader plans again
//! against the newer state, so no acknowledged write is lost and a compare-and-set still
//! means what it says.
//!
//! What planning gives up, next to a single node:
//! - `max_memory_bytes` refuses instead of evicting: eviction picks victims by sampling
//!   the whole store, which a plan cannot hold still until its commit;
//! - `max_sessions` and `max_sessions_per_user` are checked against the applied state, so
//!   writes planned concurrently for one user can pass one check together and briefly hold
//!   more than the cap, until the user's next login evicts the excess.
//!
//! [`Applied::Stale`]: super::Applied::Stale

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::evaluate::Binding;
use super::events::{Effect, EndCause};
use super::idempotency::{Idem, IdempotentOp};
use super::{Change, NewSession, Rotation, Store, StoreError};
use crate::session::{Millis, Session, SessionKey};

/// A planned write: the effects to propose, in order, as one entry of the group's log, and
/// the reply the caller gets once they are applied (if the first one is not stale).
///
/// A retry of a keyed write that was applied before plans no effects: its reply is the
/// original result, as it is now (see [`super::idempotency`]).
#[derive(Debug, Clone)]
pub struct Plan<T> {
    /// What to propose: the write, then what it evicts.
    pub effects: Vec<Effect>,
    /// The reply, as it will be once the effects are applied.
    pub reply: T,
}

impl<T> Plan<T> {
    /// The same plan with its reply made into another form.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Plan<U> {
        Plan {
            effects: self.effects,
            reply: f(self.reply),
        }
    }
}

impl Plan<Session> {
    /// A retry's plan: nothing to propose, the original result to reply.
    fn retry(original: Session) -> Self {
        Plan {
            effects: Vec::new(),
            reply: original,
        }
    }
}

impl Store {
    /// Plans a Create: the session under a fresh key, and the user's oldest sessions it
    /// evicts under `evict-oldest`.
    pub fn plan_create(&self, mut req: NewSession) -> Result<Plan<Session>, StoreError> {
        self.check_writable()?;
        let key = req.idempotency_key.take();
        let idempotency =
            match self.idempotent(key.as_deref(), IdempotentOp::Create, None, false)? {
                Idem::Retry(original) => return Ok(Plan::retry(original)),
                Idem::Fresh { key, .. } => key,
            };
        let new = self.check_new(req)?;
        self.take_create_token()?;
        self.check_room(new.bytes)?;
        let max = self.inner.limits.max_sessions;
        if self.inner.count.load(Ordering::Relaxed) >= max {
            return Err(StoreError::Exhausted {
                limit: "max_sessions",
                max: max as u64,
                hint: "",
            });
        }
        let now = self.now();
        let victims = {
            let _latch = self.latch_users(new.user.as_deref(), None);
            self.user_room(new.user.as_ref(), now)?
        };
        let session = new.session(now);
        let create = Effect::Create {
            session: session.clone(),
            idempotency,
        };
        Ok(evicting(create, &victims, now, session))
    }

    /// Plans a partial Update: the effect, and the session as it will read once applied.
    pub fn plan_update(&self, id: &str, change: Change) -> Result<Plan<Session>, StoreError> {
        self.check_writable()?;
        let key = SessionKey::parse(id)?;
        let idem = change.idempotency_key.as_deref();
        let idempotency = match self.idempotent(idem, IdempotentOp::Update, Some(key), false)? {
            Idem::Retry(original) => return Ok(Plan::retry(original)),
            Idem::Fresh { key, .. } => key,
        };
        let checked = self.check_change(&change)?;
        let now = self.now();
        let entry = self.inner.sessions.get(&key).ok_or(StoreError::NotFound)?;
        super::evaluate::check_entry(&entry, change.expected_version, now)?;
        let shape = entry.reshaped(&change.set, |k| {
            checked.set.contains(k) || checked.remove.contains(k)
        });
        self.inner.limits.check_shape(shape.count, shape.bytes)?;
        self.check_room(shape.bytes.saturating_sub(entry.bytes))?;
        let version = entry.version + 1;
        let mut reply = entry.snapshot(key, false);
        drop(entry);
        reply.attributes = shape.attrs;
        reply.version = version;
        reply.last_access_at = reply.last_access_at.max(now);
        Ok(Plan {
            effects: vec![Effect::Update {
                key,
                set: change.set,
                remove: change.remove,
                version,
                at: now,
                idempotency,
            }],
            reply,
        })
    }

    /// Plans a Regenerate: the move to a fresh key in the old key's place, and what a login
    /// evicts under `evict-oldest`.
    pub fn plan_regenerate(
        &self,
        id: &str,
        rotation: Rotation,
    ) -> Result<Plan<Session>, StoreError> {
        self.check_writable()?;
        let old = SessionKey::parse(id)?;
        let idem = rotation.idempotency_key.as_deref();
        let idempotency = match self.idempotent(idem, IdempotentOp::Regenerate, Some(old), false)? {
            Idem::Retry(original) => return Ok(Plan::retry(original)),
            Idem::Fresh { key, .. } => key,
        };
        let now = self.now();
        let Binding {
            current_user,
            user,
            login,
            growth,
        } = self.binding(old, rotation.user.clone(), now)?;
        self.check_room(growth)?;
        let victims = {
            let _latches = self.latch_users(current_user.as_deref(), user.as_deref());
            self.user_room(user.as_ref().filter(|_| login), now)?
        };
        // Read again after the latches: the session the move starts from, at its version now.
        let entry = self.inner.sessions.get(&old).ok_or(StoreError::NotFound)?;
        if !entry.is_live(now) {
            return Err(StoreError::NotFound);
        }
        let session = super::evaluate::rotated(old, &entry, &user, now, rotation.drop_attributes);
        drop(entry);
        let moved = Effect::Regenerate {
            old,
            session: session.clone(),
            idempotency,
        };
        Ok(evicting(moved, &victims, now, session))
    }

    /// Plans a Destroy: the reply says whether there was a live session under that ID (no
    /// effect if there was none).
    pub fn plan_destroy(&self, id: &str) -> Result<Plan<bool>, StoreError> {
        self.check_writable()?;
        let key = SessionKey::parse(id)?;
        let now = self.now();
        let live = self
            .inner
            .sessions
            .get(&key)
            .is_some_and(|e| e.is_live(now));
        let effects = match live {
            true => vec![Effect::End {
                key,
                cause: EndCause::Destroyed,
                at: now,
            }],
            false => Vec::new(),
        };
        Ok(Plan {
            effects,
            reply: live,
        })
    }

    /// Plans a DestroyUserSessions: an `End` for each of the user's sessions but `except`
    /// (dead ones as expired). The reply counts the live ones.
    pub fn plan_destroy_user(
        &self,
        user: &str,
        except: Option<&str>,
    ) -> Result<Plan<u32>, StoreError> {
        self.check_writable()?;
        let user = self.inner.limits.check_listed_user(user)?;
        let except = except.map(SessionKey::parse).transpose()?;
        let now = self.now();
        let user: Arc<str> = Arc::from(user);
        let keys = {
            let _latch = self.latch_users(Some(&user), None);
            match self.inner.users.get(&user) {
                Some(keys) => keys.clone(),
                None => Vec::new(),
            }
        };
        let mut effects = Vec::with_capacity(keys.len());
        let mut live = 0u32;
        for key in keys.into_iter().filter(|k| Some(*k) != except) {
            let Some(alive) = self.inner.sessions.get(&key).map(|e| e.is_live(now)) else {
                continue;
            };
            live += u32::from(alive);
            let cause = match alive {
                true => EndCause::Destroyed,
                false => EndCause::Expired,
            };
            effects.push(Effect::End {
                key,
                cause,
                at: now,
            });
        }
        Ok(Plan {
            effects,
            reply: live,
        })
    }

    /// Plans one bounded reaper step: an `End` for each due session that is dead, to be
    /// proposed by the leader. Every node runs it, so every node's expiry wheel (its own
    /// index, not replicated state) stays bounded: touched keys are filed again at their
    /// deadline, and dead ones a wheel slot later, so that one whose `End` never commits
    /// (a follower's, or a leader's that lost its lead) comes round again. Stale keys are
    /// swept out as [`Store::reap`] does.
    pub fn plan_reap(&self, max: usize) -> Vec<Effect> {
        let now = self.now();
        let mut due = Vec::with_capacity(max.min(4096));
        self.inner.wheel.take_due(now, max, &mut due);
        let mut ends = Vec::new();
        for key in due {
            let Some(expires) = self.inner.sessions.get(&key).map(|e| e.expires_at()) else {
                continue;
            };
            if expires > now {
                self.inner.wheel.file(key, expires);
            } else {
                self.inner
                    .wheel
                    .file(key, now + super::WHEEL_GRANULARITY.as_millis() as Millis);
                ends.push(Effect::End {
                    key,
                    cause: EndCause::Expired,
                    at: now,
                });
            }
        }
        self.sweep_wheel(max);
        ends
    }

    /// Fails if `need` more bytes would not fit under `max_memory_bytes` (or the shared
    /// pool): a plan refuses instead of evicting (see the module docs).
    fn check_room(&self, need: usize) -> Result<(), StoreError> {
        match self.fits(need) {
            true => Ok(()),
            false => Err(StoreError::Exhausted {
                limit: "max_memory_bytes",
                max: self
                    .inner
                    .limits
                    .max_memory_bytes
                    .min(self.inner.pool.cap()) as u64,
                hint: "; a replicated group refuses rather than evicting",
            }),
        }
    }
}

/// The plan of `write`, followed by the `End`s that evict `victims` at `now`.
fn evicting<T>(write: Effect, victims: &[SessionKey], now: Millis, reply: T) -> Plan<T> {
    let mut effects = Vec::with_capacity(1 + victims.len());
    effects.push(write);
    effects.extend(victims.iter().map(|&key| Effect::End {
        key,
        cause: EndCause::Evicted,
        at: now,
    }));
    Plan { effects, reply }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;

    use super::super::{events, Applied, Limits, PerUserPolicy};
    use super::*;
    use crate::clock::Clock;

    const T0: Millis = 1_700_000_000_000;

    fn store_with(limits: Limits) -> Store {
        Store::new(limits, 8, Clock::manual(T0), Box::new(events::Discard))
    }

    fn store() -> Store {
        store_with(Limits::default())
    }

    fn set(k: &str, v: &str) -> Change {
        Change {
            set: vec![(k.to_owned(), Bytes::copy_from_slice(v.as_bytes()))],
            ..Change::default()
        }
    }

    fn apply_all(store: &Store, effects: &[Effect]) -> Vec<Applied> {
        effects.iter().map(|e| store.apply(e)).collect()
    }

    /// Plans and applies a Create, as a group's leader does once it is committed.
    fn created(store: &Store, user: Option<&str>) -> Session {
        let plan = store
            .plan_create(NewSession {
                user: user.map(str::to_owned),
                ..NewSession::default()
            })
            .unwrap();
        assert_eq!(apply_all(store, &plan.effects)[0], Applied::Done);
        plan.reply
    }

    #[test]
    fn a_plan_changes_nothing_until_it_is_applied_and_then_reads_as_its_reply() {
        let store = store();
        let plan = store.plan_create(NewSession::default()).unwrap();
        let id = plan.reply.key.encode();
        assert_eq!(store.get(&id, true), Err(StoreError::NotFound));
        assert_eq!(store.stats().sessions, 0);
        assert_eq!(apply_all(&store, &plan.effects), vec![Applied::Done]);
        assert_eq!(store.get(&id, true).unwrap(), plan.reply);

        let update = store.plan_update(&id, set("cart", "apple")).unwrap();
        assert!(store.get(&id, true).unwrap().attributes.is_empty());
        assert_eq!(apply_all(&store, &update.effects), vec![Applied::Done]);
        assert_eq!(store.get(&id, true).unwrap(), update.reply);
        assert_eq!(update.reply.version, 2);
    }

    #[test]
    fn an_overtaken_update_is_stale_and_planned_again_keeps_both_writes() {
        let store = store();
        let id = created(&store, None).key.encode();
        let first = store.plan_update(&id, set("cart", "apple")).unwrap();
        let second = store.plan_update(&id, set("theme", "dark")).unwrap();
        assert_eq!(apply_all(&store, &first.effects), vec![Applied::Done]);
        assert_eq!(apply_all(&store, &second.effects), vec![Applied::Stale]);
        let again = store.plan_update(&id, set("theme", "dark")).unwrap();
        assert_eq!(apply_all(&store, &again.effects), vec![Applied::Done]);
        let s = store.get(&id, true).unwrap();
        assert_eq!(s.version, 3);
        assert_eq!(s.attributes.len(), 2, "neither write is lost");
    }

    #[test]
    fn an_overtaken_compare_and_set_planned_again_is_a_version_mismatch() {
        let store = store();
        let id = created(&store, None).key.encode();
        let cas = |v: &str| Change {
            expected_version: Some(1),
            ..set("cart", v)
        };
        let first = store.plan_update(&id, cas("apple")).unwrap();
        let second = store.plan_update(&id, cas("pear")).unwrap();
        assert_eq!(apply_all(&store, &first.effects), vec![Applied::Done]);
        assert_eq!(apply_all(&store, &second.effects), vec![Applied::Stale]);
        assert_eq!(
            store.plan_update(&id, cas("pear")).unwrap_err(),
            StoreError::VersionMismatch {
                expected: 1,
                current: 2
            }
        );
    }

    #[test]
    fn a_regenerate_overtaken_by_an_update_is_stale_and_planned_again_carries_the_update() {
        let store = store();
        let id = created(&store, None).key.encode();
        let rotation = Rotation {
            user: Some("alice".into()),
            ..Rotation::default()
        };
        let regen = store.plan_regenerate(&id, rotation.clone()).unwrap();
        let update = store.plan_update(&id, set("cart", "apple")).unwrap();
        assert_eq!(apply_all(&store, &update.effects), vec![Applied::Done]);
        assert_eq!(apply_all(&store, &regen.effects), vec![Applied::Stale]);
        assert!(store.get(&id, true).is_ok(), "a stale move changes nothing");

        let regen = store.plan_regenerate(&id, rotation).unwrap();
        assert_eq!(apply_all(&store, &regen.effects), vec![Applied::Done]);
        assert_eq!(store.get(&id, true), Err(StoreError::NotFound));
        let moved = store.get(&regen.reply.key.encode(), true).unwrap();
        assert_eq!(moved, regen.reply);
        assert!(moved.attributes.contains_key("cart"));
        assert_eq!(store.list_user("alice", false).unwrap().len(), 1);
    }

    #[test]
    fn destroy_user_plans_an_end_for_every_session_but_the_callers() {
        let store = store();
        let keep = created(&store, Some("bob"));
        created(&store, Some("bob"));
        created(&store, Some("bob"));
        let plan = store
            .plan_destroy_user("bob", Some(&keep.key.encode()))
            .unwrap();
        assert_eq!(plan.reply, 2);
        assert!(apply_all(&store, &plan.effects)
            .iter()
            .all(|a| *a == Applied::Done));
        let left = store.list_user("bob", false).unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].key, keep.key);
        assert!(store.plan_destroy(&keep.key.encode()).unwrap().reply);
    }

    #[test]
    fn a_login_at_the_cap_under_evict_oldest_plans_the_oldest_sessions_end() {
        let store = store_with(Limits {
            max_sessions_per_user: 2,
            per_user_policy: PerUserPolicy::EvictOldest,
            ..Limits::default()
        });
        let oldest = created(&store, Some("carol"));
        store.clock().advance(Duration::from_secs(1));
        created(&store, Some("carol"));
        let plan = store
            .plan_create(NewSession {
                user: Some("carol".into()),
                ..NewSession::default()
            })
            .unwrap();
        assert_eq!(plan.effects.len(), 2);
        assert!(matches!(
            plan.effects[1],
            Effect::End { key, cause: EndCause::Evicted, .. } if key == oldest.key
        ));
        let _ = apply_all(&store, &plan.effects);
        assert_eq!(store.list_user("carol", false).unwrap().len(), 2);
        assert_eq!(
            store.get(&oldest.key.encode(), true),
            Err(StoreError::NotFound)
        );
    }

    #[test]
    fn a_plan_over_the_memory_cap_is_refused_and_names_the_setting() {
        let store = store_with(Limits {
            max_memory_bytes: 1_000,
            ..Limits::default()
        });
        let big = NewSession {
            attributes: vec![("blob".into(), Bytes::from(vec![b'x'; 900]))],
            ..NewSession::default()
        };
        let err = store.plan_create(big).unwrap_err();
        assert!(err.to_string().contains("max_memory_bytes"), "{err}");
    }

    #[test]
    fn the_reaper_plans_ends_for_dead_sessions_only() {
        let store = store();
        let s = created(&store, None);
        assert!(store.plan_reap(100).is_empty());
        store.clock().advance(Duration::from_secs(24 * 3600));
        let ends = store.plan_reap(100);
        assert_eq!(ends.len(), 1);
        assert_eq!(apply_all(&store, &ends), vec![Applied::Done]);
        assert_eq!(store.stats().sessions, 0);
        assert!(store
            .plan_destroy(&s.key.encode())
            .unwrap()
            .effects
            .is_empty());
    }

    #[test]
    fn a_replica_that_becomes_leader_never_plans_with_an_earlier_time_than_it_applied() {
        let leader = store();
        leader.clock().advance(Duration::from_secs(3600));
        let plan = leader.plan_create(NewSession::default()).unwrap();
        let replica = store();
        let _ = apply_all(&replica, &plan.effects);
        let next = replica.plan_create(NewSession::default()).unwrap();
        assert!(next.reply.created_at >= plan.reply.created_at);
    }
}
