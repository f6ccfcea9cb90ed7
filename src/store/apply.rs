//! Apply: the one code that changes sessions.
//!
//! Every change reaches the maps through here, whether a live write just decided it
//! ([`super::evaluate`]) or recovery replays it from the log (and, next, a replica receives
//! it from its leader). Apply decides nothing: it reads no clock, draws no randomness and
//! checks no limit; an [`Effect`] carries every value the change needs. A live write
//! evaluates and applies under the same locks (see [`super::users`] for their order), so
//! nothing changes between the decision and the change.
//!
//! Replay may meet records a snapshot already reflects, so [`Store::apply`] is idempotent:
//! creates and regenerates keep the higher version of a key, an update applies only onto
//! the version just before its own, touches only move time forward, and ends remove
//! whatever is there.
//!
//! Record order: a new key (Create, Regenerate) becomes reachable (map, wheel, eviction
//! sample, user list) only after its event is emitted, so the log never holds an `End`
//! before the record that made the key.
//!
//! A write's idempotency key is recorded (see [`super::idempotency`]) only when the write is
//! applied, never when it is stale. A live write records it before its session becomes
//! reachable (or under its entry's lock), so a snapshot that holds the change holds the
//! record too (snapshots read the records after the sessions); the key stays reserved until
//! the write is done, so no retry sees the record early. [`Store::apply`] records it after
//! the change, so a leader's plan that finds the record finds the change. An effect whose
//! key another write recorded, still in force at the effect's time, is stale: a leader
//! planned one key twice.

use std::collections::HashSet;
use std::sync::atomic::Ordering;

use dashmap::mapref::entry::Entry as MapEntry;
use dashmap::mapref::one::RefMut;

use super::entry::{size_of, Entry, Reshaped};
use super::events::{Effect, EndCause, Event};
use super::room::SlotClaim;
use super::Store;
use crate::session::{Millis, Session, SessionKey};

/// Whether an applied change is news to the sinks: a live write's is (the log must keep
/// it); a replayed one is already durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Emit {
    /// Tell the sinks.
    Yes,
    /// Already durable: tell nobody.
    No,
}

/// How [`Store::apply_as`] treats a Regenerate that finds neither of its keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Replay {
    /// Recreate the moved session: a single-node log replayed over a fuzzy snapshot.
    Lenient,
    /// Stale: the session was gone before the move (a group's committed entries).
    Strict,
}

/// What [`Store::apply`] did with an effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Applied {
    /// The change is made.
    Done,
    /// Nothing changed: the effect was already applied (replay), its session is gone, or a
    /// newer write overtook the state it was planned on.
    Stale,
}

/// A session's map entry, held for writing.
pub(crate) type Held<'a> = dashmap::mapref::entry::OccupiedEntry<'a, SessionKey, Box<Entry>>;

impl Store {
    /// Applies an effect decided elsewhere: a log record at recovery, or a committed effect
    /// of the group's log on every node of a replicated group. Idempotent (see the module
    /// docs). Emits no events: the effect is already durable.
    ///
    /// Says whether the effect changed anything: a group's leader planned it against an
    /// older state ([`super::plan`]), and a newer write may have overtaken it, or taken its
    /// idempotency key.
    pub fn apply(&self, effect: &Effect) -> Applied {
        self.apply_as(effect, Emit::No, Replay::Lenient)
    }

    /// [`Store::apply`] for a replicated group's committed effect: the same change, and the
    /// sinks hear of it (the metrics count it; a group keeps no single-node log to refill).
    ///
    /// Unlike a replay of the single-node log, a Regenerate whose old and new keys are both
    /// absent is stale here: the session ended (or moved) before the move committed. The
    /// group's snapshots carry the moves applied while they were taken, so a replay after
    /// one never meets a move it missed (see `cluster::state_machine`).
    pub fn apply_committed(&self, effect: &Effect) -> Applied {
        self.apply_as(effect, Emit::Yes, Replay::Strict)
    }

    fn apply_as(&self, effect: &Effect, emit: Emit, replay: Replay) -> Applied {
        self.inner.floor.fetch_max(effect.at(), Ordering::Relaxed);
        if self.key_taken(effect) {
            return Applied::Stale;
        }
        let done = match effect {
            Effect::Create { session, .. } => self.apply_create(effect, session, None, emit),
            Effect::Update {
                key,
                set,
                remove,
                version,
                at,
                ..
            } => {
                let Some(mut entry) = self.inner.sessions.get_mut(key) else {
                    return Applied::Stale;
                };
                if entry.version.checked_add(1) != Some(*version) {
                    return Applied::Stale;
                }
                let gone: HashSet<&str> = set
                    .iter()
                    .map(|(k, _)| k.as_str())
                    .chain(remove.iter().map(String::as_str))
                    .collect();
                let shape = entry.reshaped(set, |k| gone.contains(k));
                self.apply_update(&mut entry, effect, shape, (*version, *at), emit);
                true
            }
            Effect::Touch { key, at } => match self.inner.sessions.get(key) {
                Some(entry) => {
                    entry.slide(*at);
                    entry.reported(*at);
                    true
                }
                None => false,
            },
            Effect::Regenerate { old, session, .. } => {
                // Applied before, the new key is there already: only the old may be left.
                let held = match self.inner.sessions.contains_key(&session.key) {
                    true => None,
                    false => match self.inner.sessions.entry(*old) {
                        MapEntry::Occupied(o) => Some(o),
                        MapEntry::Vacant(_) => None,
                    },
                };
                match held {
                    // The move starts from the version it was decided on, or a write that
                    // overtook the plan would be lost in the rotation.
                    Some(o) if o.get().version.checked_add(1) != Some(session.version) => false,
                    Some(o) => {
                        self.apply_regenerate(o, effect, session, emit);
                        true
                    }
                    // Neither key: gone before the move, unless a fuzzy single-node
                    // snapshot missed both (the old key listed after the move took it,
                    // the new one before the move made it).
                    None if replay == Replay::Strict
                        && !self.inner.sessions.contains_key(&session.key) =>
                    {
                        false
                    }
                    None => {
                        self.end_if(*old, session.created_at, emit, |_| {
                            Some(EndCause::Destroyed)
                        });
                        self.apply_create(effect, session, None, emit)
                    }
                }
            }
            Effect::End { key, cause, at } => {
                self.end_if(*key, *at, emit, |_| Some(*cause)).is_some()
            }
        };
        match done {
            true => {
                self.remember(effect);
                Applied::Done
            }
            false => Applied::Stale,
        }
    }

    /// Stores `s`, the session of a `Create` (or of a `Regenerate` whose old key is gone).
    /// A live Create hands over the `max_sessions` slot it claimed; an applied one (replay,
    /// a group's commit) counts the session here, and leaves alone a key already stored at
    /// this version or later.
    pub(crate) fn apply_create(
        &self,
        effect: &Effect,
        s: &Session,
        claim: Option<SlotClaim<'_>>,
        emit: Emit,
    ) -> bool {
        if claim.is_none()
            && self
                .inner
                .sessions
                .get(&s.key)
                .is_some_and(|cur| cur.version >= s.version)
        {
            return false;
        }
        let bytes = size_of(s);
        self.add_bytes(bytes as isize);
        self.tell(emit, effect, bytes as isize, 0);
        if emit == Emit::Yes {
            self.remember(effect);
        }
        let entry = Box::new(Entry::new(s, s.user.clone(), bytes));
        match self.inner.sessions.insert(s.key, entry) {
            Some(replaced) => {
                // Replay of a key stored at an older version: its count and user stand.
                self.add_bytes(-(replaced.bytes as isize));
            }
            None => {
                match claim {
                    Some(claim) => claim.used(),
                    None => {
                        self.inner.count.fetch_add(1, Ordering::Relaxed);
                    }
                }
                self.in_user_index(s.user.as_ref(), |keys| {
                    if let Some(keys) = keys {
                        keys.push(s.key);
                    }
                });
            }
        }
        self.inner.wheel.file(s.key, s.expires_at());
        true
    }

    /// Stores an Update's attributes (worked out by [`Entry::reshaped`]) at `version`, and
    /// slides the idle deadline to the update's time.
    pub(crate) fn apply_update(
        &self,
        entry: &mut RefMut<'_, SessionKey, Box<Entry>>,
        effect: &Effect,
        shape: Reshaped,
        (version, at): (u64, Millis),
        emit: Emit,
    ) {
        let delta = shape.bytes as isize - entry.bytes as isize;
        entry.attrs = shape.attrs;
        entry.bytes = shape.bytes;
        entry.version = version;
        entry.slide(at);
        self.add_bytes(delta);
        self.tell(emit, effect, delta, 0);
        if emit == Emit::Yes {
            self.remember(effect);
        }
    }

    /// Moves the held session to `session`'s fresh key: the old key is gone once its entry
    /// is released, and the new one is reachable only after the event is out.
    pub(crate) fn apply_regenerate(
        &self,
        held: Held<'_>,
        effect: &Effect,
        session: &Session,
        emit: Emit,
    ) {
        let (old, entry) = held.remove_entry();
        let bytes = size_of(session);
        let delta = bytes as isize - entry.bytes as isize;
        self.add_bytes(delta);
        self.tell(emit, effect, delta, 0);
        if emit == Emit::Yes {
            self.remember(effect);
        }
        let new = Box::new(Entry::new(session, session.user.clone(), bytes));
        self.inner.sessions.insert(session.key, new);
        self.inner.wheel.file(session.key, session.expires_at());
        if entry.user != session.user {
            self.in_user_index(entry.user.as_ref(), |keys| {
                if let Some(keys) = keys {
                    keys.retain(|k| *k != old);
                }
            });
        }
        self.in_user_index(session.user.as_ref(), |keys| {
            if let Some(keys) = keys {
                keys.retain(|k| *k != old);
                keys.push(session.key);
            }
        });
    }

    /// Ends `key` if `decide`, run on its entry under the entry's lock, names a cause; keeps
    /// the user index in step. `decide` is the evaluator's last check (is it still dead, is
    /// it still the one to evict), taken where nothing can change it before the end; replay
    /// passes one that always agrees. Returns the cause if it ended the session.
    pub(crate) fn end_if(
        &self,
        key: SessionKey,
        at: Millis,
        emit: Emit,
        decide: impl FnOnce(&Entry) -> Option<EndCause>,
    ) -> Option<EndCause> {
        let user = self.inner.sessions.get(&key)?.user.clone();
        self.in_user_index(user.as_ref(), |keys| {
            let held = match self.inner.sessions.entry(key) {
                MapEntry::Occupied(o) => o,
                MapEntry::Vacant(_) => return None,
            };
            let cause = decide(held.get())?;
            let (_, entry) = held.remove_entry();
            self.inner.count.fetch_sub(1, Ordering::Relaxed);
            self.add_bytes(-(entry.bytes as isize));
            let lifetime = at.saturating_sub(entry.created_at);
            let end = Effect::End { key, cause, at };
            self.tell(emit, &end, -(entry.bytes as isize), lifetime);
            if let Some(keys) = keys {
                keys.retain(|k| *k != key);
            }
            Some(cause)
        })
    }

    /// Hands an applied effect to the sinks, if it is news to them.
    fn tell(&self, emit: Emit, effect: &Effect, bytes_delta: isize, lifetime: Millis) {
        if emit == Emit::Yes {
            self.inner.sink.record(&Event {
                effect,
                bytes_delta,
                lifetime,
            });
        }
    }

    /// Loads recovered sessions, as `Create` effects applied without events (they are
    /// already durable). Spread over the machine's cores, since start-up waits for it.
    pub fn restore(&self, mut sessions: Vec<Session>) {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let chunk = sessions.len().div_ceil(threads).max(1);
        let mut parts = Vec::with_capacity(threads);
        while sessions.len() > chunk {
            parts.push(sessions.split_off(sessions.len() - chunk));
        }
        parts.push(sessions);
        std::thread::scope(|scope| {
            for part in parts {
                scope.spawn(move || {
                    for s in part {
                        let _ = self.apply(&Effect::Create {
                            session: s,
                            idempotency: None,
                        });
                    }
                });
            }
        });
    }
}
