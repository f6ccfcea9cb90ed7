//! The user index, and the lock order that keeps the store deadlock-free.
//!
//! Every session bound to a user is listed under that user, so ListUserSessions and
//! DestroyUserSessions never scan the map.
//!
//! # Lock order
//!
//! The one rule that keeps the store deadlock-free, written here and nowhere else. Locks are
//! taken in this order, never the other way round, and never two of one kind at once unless
//! said here:
//!
//! 1. user latches ([`Store::latch_users`]): a striped set of mutexes chosen by a hash of
//!    the user ID. Every user-wide operation (Create or Regenerate binding a user,
//!    ListUserSessions, DestroyUserSessions) holds its users' latches for its whole run, so
//!    a login's move from one user's list to another's is one step to all of them. A login
//!    takes two, in stripe order; two users on one stripe share it.
//! 2. a user's index entry in `users` (a DashMap shard lock: two at once could be the same
//!    shard and deadlock, which is why the latches exist);
//! 3. a part of the expiry wheel (its sweep looks keys up in `sessions`, so nothing files
//!    or takes wheel keys while holding a session entry);
//! 4. a session's entry in `sessions`. A live write evaluates and applies under it, so
//!    nothing can change the session between the decision and the change.
//!
//! A key's user never changes (regenerate makes a new key), so reading it first and then
//! locking the user's entry is stable. Only latch holders add keys to a user's list (and
//! replay, which runs alone), so a latch holder's count of a user's sessions stands until
//! it adds one. Removing a key from its user's list needs only the entry (rule 2), not the
//! latch: lists only shrink that way, which no user-wide operation can mistake for anything
//! else.

use std::hash::BuildHasher;
use std::sync::{Arc, MutexGuard};

use super::{PerUserPolicy, Store, StoreError};
use crate::lock;
use crate::session::{Millis, SessionKey};

/// Stripes of user latches; per-store, so a few dozen mutexes.
pub(crate) const USER_LATCHES: usize = 64;

impl Store {
    /// Runs `f` with the user's index entry locked (`None` for anonymous sessions), and drops
    /// the entry afterwards if it is left empty, so the index never leaks users.
    pub(crate) fn in_user_index<R>(
        &self,
        user: Option<&Arc<str>>,
        f: impl FnOnce(Option<&mut Vec<SessionKey>>) -> R,
    ) -> R {
        let Some(u) = user else {
            return f(None);
        };
        let mut keys = self.inner.users.entry(u.clone()).or_default();
        let out = f(Some(&mut keys));
        let empty = keys.is_empty();
        drop(keys);
        if empty {
            self.inner.users.remove_if(u, |_, k| k.is_empty());
        }
        out
    }

    /// Takes the latches of users `a` and `b` (see the module docs): in stripe order, and
    /// one stripe once, so two callers can never wait on each other.
    pub(crate) fn latch_users(
        &self,
        a: Option<&str>,
        b: Option<&str>,
    ) -> [Option<MutexGuard<'_, ()>>; 2] {
        let latches = &self.inner.latches;
        let stripe = |u: &str| (self.inner.latch_hasher.hash_one(u) as usize) % latches.len();
        let (mut first, mut second) = (a.map(stripe), b.map(stripe));
        if second == first {
            second = None;
        }
        if let (Some(x), Some(y)) = (first, second) {
            if y < x {
                (first, second) = (second, first);
            }
        }
        let take = |i: usize| lock(&latches[i]);
        [first.map(take), second.map(take)]
    }

    /// Drops dead keys from `user`'s list, then checks `max_sessions_per_user` for one more
    /// session: `Err` under `deny` if the user is at it; under `evict-oldest`, the sessions
    /// to evict for room (none if there is room, or no user). Evicts nothing itself. The
    /// caller holds the user's latch, so the answer stands until it adds the session.
    pub(crate) fn user_room(
        &self,
        user: Option<&Arc<str>>,
        now: Millis,
    ) -> Result<Vec<SessionKey>, StoreError> {
        match user {
            Some(u) => self.in_user_index(Some(u), |keys| match keys {
                Some(keys) => self.room_in(keys, now),
                None => Ok(Vec::new()),
            }),
            None => Ok(Vec::new()),
        }
    }

    /// [`Store::user_room`] on the user's locked list.
    fn room_in(
        &self,
        keys: &mut Vec<SessionKey>,
        now: Millis,
    ) -> Result<Vec<SessionKey>, StoreError> {
        let max = self.inner.limits.max_sessions_per_user;
        if keys.len() >= max {
            keys.retain(|k| self.inner.sessions.get(k).is_some_and(|e| e.is_live(now)));
        }
        if keys.len() < max {
            return Ok(Vec::new());
        }
        match self.inner.limits.per_user_policy {
            PerUserPolicy::Deny => Err(StoreError::Exhausted {
                limit: "max_sessions_per_user",
                max: max as u64,
                hint: "; destroy one of the user's sessions first",
            }),
            PerUserPolicy::EvictOldest => {
                // Oldest by creation (login) time: the device the user is least likely to be
                // sitting at. Every key left after the prune is live, so each has a time.
                let mut by_age: Vec<(Millis, SessionKey)> = keys
                    .iter()
                    .map(|k| {
                        let created = self.inner.sessions.get(k).map_or(0, |e| e.created_at);
                        (created, *k)
                    })
                    .collect();
                by_age.sort_unstable_by_key(|&(created, _)| created);
                let excess = keys.len() + 1 - max;
                Ok(by_age.into_iter().take(excess).map(|(_, k)| k).collect())
            }
        }
    }

    /// Evicts `victims` (picked by [`Store::user_room`]): `End` effects, each applied
    /// under its own locks.
    pub(crate) fn evict_victims(&self, victims: &[SessionKey], now: Millis) {
        for &key in victims {
            if self
                .end_with(key, now, |_| Some(super::events::EndCause::Evicted))
                .is_some()
            {
                tracing::info!(session = %key, "evicted a user's oldest session at max_sessions_per_user");
            }
        }
    }
}
