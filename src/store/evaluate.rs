//! Evaluate: the requests, each decided once into an effect and then applied.
//!
//! Every rule, limit, compare-and-set and reading of the clock happens here and only here;
//! the result is an [`Effect`] carrying every value the change needs, which
//! [`super::apply`] makes happen. A write to an existing session is evaluated and applied
//! under that session's entry lock, so nothing can change it in between.
//!
//! Reads are the exception that keeps them cheap: a sliding read moves the last-access
//! atomic itself and produces a `Touch` effect only when the log's quarter-window throttle
//! says so (see [`Entry::slide_and_report`]).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use dashmap::mapref::entry::Entry as MapEntry;

use super::apply::Emit;
use super::entry::{attribute_bytes, session_bytes, Entry};
use super::events::{Effect, EndCause, Event};
use super::idempotency::{Idem, IdempotentOp};
use super::limits::pick_timeout;
use super::{Change, NewSession, Rotation, Store, StoreError};
use crate::session::{Attributes, ClientInfo, Millis, Session, SessionKey, Slot};

impl Store {
    /// Starts a session under a fresh server-generated ID; a retry with a key seen before
    /// returns the session that key created (see [`super::idempotency`]).
    pub fn create(&self, mut req: NewSession) -> Result<Session, StoreError> {
        self.check_writable()?;
        let key = req.idempotency_key.take();
        let (idempotency, _held) =
            match self.idempotent(key.as_deref(), IdempotentOp::Create, None, true)? {
                Idem::Retry(original) => return Ok(original),
                Idem::Fresh { key, held } => (key, held),
            };
        let new = self.check_new(req)?;
        let bytes = new.bytes;
        self.take_create_token()?;

        // Eviction takes time: the session starts once there is room for it.
        let now = self.make_room(bytes, self.now())?;
        let claim = self.claim_slot()?;
        let _latch = self.latch_users(new.user.as_deref(), None);
        // Under the latch nobody else adds to the user's list, so the count stands until
        // this session joins it; the victims go once it has.
        let victims = self.user_room(new.user.as_ref(), now)?;
        let effect = Effect::Create {
            session: new.session(now),
            idempotency,
        };
        let Effect::Create { session, .. } = &effect else {
            unreachable!("built as a Create just above")
        };
        self.apply_create(&effect, session, Some(claim), Emit::Yes);
        self.evict_victims(&victims, now);
        let Effect::Create { session, .. } = effect else {
            unreachable!("built as a Create just above")
        };
        Ok(session)
    }

    /// Reads a session; slides its idle deadline unless `peek`.
    pub fn get(&self, id: &str, peek: bool) -> Result<Session, StoreError> {
        let key = SessionKey::parse(id)?;
        let now = self.now();
        let entry = self.inner.sessions.get(&key).ok_or(StoreError::NotFound)?;
        if !entry.is_live(now) {
            return Err(StoreError::NotFound);
        }
        if !peek && entry.slide_and_report(now) {
            self.report_touch(key, now);
        }
        Ok(entry.snapshot(key, true))
    }

    /// Slides the idle deadline; returns the new `expires_at`.
    pub fn touch(&self, id: &str) -> Result<Millis, StoreError> {
        let key = SessionKey::parse(id)?;
        let now = self.now();
        let entry = self.inner.sessions.get(&key).ok_or(StoreError::NotFound)?;
        if !entry.is_live(now) {
            return Err(StoreError::NotFound);
        }
        if entry.slide_and_report(now) {
            self.report_touch(key, now);
        }
        Ok(entry.expires_at())
    }

    /// A sliding read's `Touch` effect, already applied by the read (it moved the atomic):
    /// the sinks hear of it while the reader still holds the entry, so it is never recorded
    /// after the session's end.
    fn report_touch(&self, key: SessionKey, at: Millis) {
        self.inner.sink.record(&Event {
            effect: &Effect::Touch { key, at },
            bytes_delta: 0,
            lifetime: 0,
        });
    }

    /// Applies a partial update atomically: every check passes before anything changes. A
    /// retry with a key seen before returns the session as it is, unchanged.
    ///
    /// Bounded work: the counts are checked first, every check after them is linear in the
    /// request, and the work under the session's lock is linear in `max_attributes`.
    pub fn update(&self, id: &str, mut change: Change) -> Result<Session, StoreError> {
        self.check_writable()?;
        let key = SessionKey::parse(id)?;
        let idem = change.idempotency_key.take();
        let (idempotency, _held) =
            match self.idempotent(idem.as_deref(), IdempotentOp::Update, Some(key), true)? {
                Idem::Retry(original) => return Ok(original),
                Idem::Fresh { key, held } => (key, held),
            };
        let l = &self.inner.limits;
        let checked = self.check_change(&change)?;
        let (set, remove, growth) = (&checked.set, &checked.remove, checked.growth);
        // Look the session up before making room, so an Update that fails anyway evicts
        // nobody. Room for the worst case (every key new) is made before this session's
        // lock is taken: eviction locks other sessions.
        let now = self.now();
        self.check_update_target(key, change.expected_version, now)?;
        // Eviction takes time: the session may have expired meanwhile, so it is checked
        // again, at the time the change happens.
        let now = self.make_room(growth, now)?;
        let mut entry = self
            .inner
            .sessions
            .get_mut(&key)
            .ok_or(StoreError::NotFound)?;
        check_entry(&entry, change.expected_version, now)?;
        // The result's shape first, so a limit failure leaves the session untouched.
        let shape = entry.reshaped(&change.set, |k| set.contains(k) || remove.contains(k));
        l.check_shape(shape.count, shape.bytes)?;
        let version = entry.version + 1;
        let effect = Effect::Update {
            key,
            set: change.set,
            remove: change.remove,
            version,
            at: now,
            idempotency,
        };
        self.apply_update(&mut entry, &effect, shape, (version, now), Emit::Yes);
        Ok(entry.snapshot(key, true))
    }

    /// A Create's request, checked against every rule and per-request limit: all that is
    /// left to decide is the room it needs and its time.
    pub(crate) fn check_new(&self, req: NewSession) -> Result<Checked, StoreError> {
        let l = &self.inner.limits;
        let idle = pick_timeout(
            req.idle_timeout,
            l.default_idle_timeout,
            l.max_idle_timeout,
            "idle_timeout",
            "max_idle_timeout",
        )?;
        let absolute = pick_timeout(
            req.absolute_timeout,
            l.default_absolute_timeout,
            l.max_absolute_timeout,
            "absolute_timeout",
            "max_absolute_timeout",
        )?;
        let user = l.check_user(req.user)?;
        l.check_client(&req.client)?;
        let mut attrs: HashMap<_, bytes::Bytes> = HashMap::with_capacity(req.attributes.len());
        let mut bytes = session_bytes(user.as_deref(), &req.client, []);
        for (k, v) in req.attributes {
            l.check_attribute(&k, &v)?;
            if let Some(old) = attrs.get(&k) {
                bytes -= attribute_bytes(&k, old.len());
            }
            bytes += attribute_bytes(&k, v.len());
            attrs.insert(k, v);
        }
        l.check_shape(attrs.len(), bytes)?;
        Ok(Checked {
            user,
            attrs: attrs.into(),
            bytes,
            idle,
            absolute,
            client: req.client,
        })
    }

    /// An Update's change, checked on its own (before the session is looked at): the keys it
    /// sets and removes, and how much it can grow the session at most.
    pub(crate) fn check_change<'c>(&self, change: &'c Change) -> Result<Changed<'c>, StoreError> {
        let l = &self.inner.limits;
        for (what, n) in [
            ("the number of keys in set", change.set.len()),
            ("the number of keys in remove", change.remove.len()),
        ] {
            if n > l.max_attributes {
                return Err(StoreError::over(
                    what,
                    n,
                    "max_attributes",
                    l.max_attributes,
                ));
            }
        }
        let mut set: HashSet<&str> = HashSet::with_capacity(change.set.len());
        for (k, v) in &change.set {
            l.check_attribute(k, v)?;
            if !set.insert(k) {
                return Err(StoreError::Invalid(
                    "an attribute key appears twice in set".into(),
                ));
            }
        }
        // A key listed twice in remove is removed once.
        let mut remove: HashSet<&str> = HashSet::with_capacity(change.remove.len());
        for k in &change.remove {
            if k.len() > l.max_key_bytes {
                return Err(StoreError::over(
                    "a removed attribute key's length",
                    k.len(),
                    "max_key_bytes",
                    l.max_key_bytes,
                ));
            }
            if set.contains(k.as_str()) {
                return Err(StoreError::Invalid(
                    "an attribute key is in both set and remove".into(),
                ));
            }
            remove.insert(k);
        }
        let growth: usize = change
            .set
            .iter()
            .map(|(k, v)| attribute_bytes(k, v.len()))
            .sum();
        Ok(Changed {
            set,
            remove,
            growth,
        })
    }

    /// Fails as a write to `key` would: missing, dead, or at another version.
    fn check_update_target(
        &self,
        key: SessionKey,
        expected: Option<u64>,
        now: Millis,
    ) -> Result<(), StoreError> {
        let entry = self.inner.sessions.get(&key).ok_or(StoreError::NotFound)?;
        check_entry(&entry, expected, now)
    }

    /// Moves a session to a fresh ID. Once this returns, the old ID is dead for every call,
    /// and every update acknowledged on it is in the new session.
    ///
    /// The move holds both users' latches, so to every user-wide operation and to the
    /// per-user cap it is one step: a DestroyUserSessions of either user runs wholly before
    /// it (and the new session is not yet the user's) or wholly after it (and sees the new
    /// session in the user's list).
    ///
    /// A retry with a key seen before returns the session under the ID that key moved to.
    pub fn regenerate(&self, id: &str, mut rotation: Rotation) -> Result<Session, StoreError> {
        self.check_writable()?;
        let old = SessionKey::parse(id)?;
        let idem = rotation.idempotency_key.take();
        let (idempotency, _held) =
            match self.idempotent(idem.as_deref(), IdempotentOp::Regenerate, Some(old), true)? {
                Idem::Retry(original) => return Ok(original),
                Idem::Fresh { key, held } => (key, held),
            };
        let Binding {
            current_user,
            user,
            login,
            growth,
        } = self.binding(old, rotation.user.take(), self.now())?;
        // Room is made after the lookup, so a Regenerate of a missing session evicts nobody.
        if growth > 0 {
            self.make_room(growth, self.now())?;
        }
        let _latches = self.latch_users(current_user.as_deref(), user.as_deref());
        // Eviction and waiting for the latches take time: the old session must be live now.
        let now = self.now();
        // Nobody can add to the new user's list while its latch is held, so this check
        // stands until the new key joins it. Victims are only picked here, and evicted once
        // the move is done, so a Regenerate that fails evicts nobody.
        let victims = self.user_room(user.as_ref().filter(|_| login), now)?;
        let held = match self.inner.sessions.entry(old) {
            MapEntry::Occupied(o) if o.get().is_live(now) => o,
            _ => return Err(StoreError::NotFound),
        };
        let effect = Effect::Regenerate {
            old,
            session: rotated(old, held.get(), &user, now, rotation.drop_attributes),
            idempotency,
        };
        let Effect::Regenerate { session, .. } = &effect else {
            unreachable!("built as a Regenerate just above")
        };
        self.apply_regenerate(held, &effect, session, Emit::Yes);
        self.evict_victims(&victims, now);
        let Effect::Regenerate { session, .. } = effect else {
            unreachable!("built as a Regenerate just above")
        };
        Ok(session)
    }

    /// Who a Regenerate of the live session `old` binds: its current user, the user it will
    /// have (the rotation's, checked, or the same), whether that is a login, and how many
    /// bytes a longer user ID adds.
    pub(crate) fn binding(
        &self,
        old: SessionKey,
        requested: Option<String>,
        now: Millis,
    ) -> Result<Binding, StoreError> {
        let new_user = match requested {
            None => None,
            Some(u) => Some(self.inner.limits.check_user(Some(u))?),
        };
        let current_user = {
            let entry = self.inner.sessions.get(&old).ok_or(StoreError::NotFound)?;
            if !entry.is_live(now) {
                return Err(StoreError::NotFound);
            }
            entry.user.clone()
        };
        let user = new_user.unwrap_or_else(|| current_user.clone());
        let growth = user
            .as_deref()
            .map_or(0, str::len)
            .saturating_sub(current_user.as_deref().map_or(0, str::len));
        Ok(Binding {
            login: user != current_user,
            current_user,
            user,
            growth,
        })
    }

    /// Ends one session. `Ok(false)` if there was no live session under that ID.
    pub fn destroy(&self, id: &str) -> Result<bool, StoreError> {
        self.check_writable()?;
        let key = SessionKey::parse(id)?;
        let now = self.now();
        Ok(self
            .end_with(key, now, |e| e.is_live(now).then_some(EndCause::Destroyed))
            .is_some())
    }

    /// Lists a user's live sessions, oldest first.
    pub fn list_user(&self, user: &str, with_attributes: bool) -> Result<Vec<Session>, StoreError> {
        let user = self.inner.limits.check_listed_user(user)?;
        let _latch = self.latch_users(Some(user), None);
        let keys = match self.inner.users.get(user) {
            Some(keys) => keys.clone(),
            None => return Ok(Vec::new()),
        };
        let now = self.now();
        let mut out: Vec<Session> = keys
            .iter()
            .filter_map(|k| {
                let e = self.inner.sessions.get(k)?;
                e.is_live(now).then(|| e.snapshot(*k, with_attributes))
            })
            .collect();
        out.sort_by_key(|s| s.created_at);
        Ok(out)
    }

    /// Ends every live session of `user` except `except` (the caller's own); returns how many.
    pub fn destroy_user(&self, user: &str, except: Option<&str>) -> Result<u32, StoreError> {
        self.check_writable()?;
        let user = self.inner.limits.check_listed_user(user)?;
        let except = except.map(SessionKey::parse).transpose()?;
        let now = self.now();
        let user: Arc<str> = Arc::from(user);
        let _latch = self.latch_users(Some(&user), None);
        let keys = match self.inner.users.get(&user) {
            Some(keys) => keys.clone(),
            None => return Ok(0),
        };
        let mut destroyed = 0u32;
        for key in keys {
            // Dead ones go too, as expired, so the list is left holding only `except`.
            let ended = self.end_with(key, now, |e| match e.is_live(now) {
                true if Some(key) == except => None,
                true => Some(EndCause::Destroyed),
                false => Some(EndCause::Expired),
            });
            if ended == Some(EndCause::Destroyed) {
                destroyed += 1;
            }
        }
        Ok(destroyed)
    }

    /// Ends `key` if `decide` names a cause, run on its entry under the entry's lock: the
    /// live form of [`Store::end_if`].
    pub(crate) fn end_with(
        &self,
        key: SessionKey,
        now: Millis,
        decide: impl FnOnce(&Entry) -> Option<EndCause>,
    ) -> Option<EndCause> {
        self.end_if(key, now, Emit::Yes, decide)
    }
}

/// Fails as a write to `entry` would at `now`: dead, or at another version than `expected`.
pub(crate) fn check_entry(
    entry: &Entry,
    expected: Option<u64>,
    now: Millis,
) -> Result<(), StoreError> {
    if !entry.is_live(now) {
        return Err(StoreError::NotFound);
    }
    match expected {
        Some(expected) if expected != entry.version => Err(StoreError::VersionMismatch {
            expected,
            current: entry.version,
        }),
        _ => Ok(()),
    }
}

/// The session a Regenerate makes of `entry`, stored under `old`, under a fresh key in the
/// same slot: the session stays where it was when the slots are split across groups, so a
/// rotation never has to move it. Binding a different user is a login: a fresh absolute
/// lifetime of the same length. Otherwise the absolute deadline is kept, so rotation never
/// extends a session.
pub(crate) fn rotated(
    old: SessionKey,
    entry: &Entry,
    user: &Option<Arc<str>>,
    now: Millis,
    drop_attributes: bool,
) -> Session {
    let key = SessionKey::generate_in(Slot::of(&old));
    let mut s = entry.snapshot(key, !drop_attributes);
    s.version = entry.version + 1;
    s.last_access_at = now;
    if *user != entry.user {
        let lifetime = entry.absolute.saturating_sub(entry.created_at);
        s.user = user.clone();
        s.created_at = now;
        s.absolute_expires_at = now.saturating_add(lifetime);
    }
    s
}

/// A Create's request after [`Store::check_new`].
pub(crate) struct Checked {
    /// The user to bind, checked.
    pub(crate) user: Option<Arc<str>>,
    /// The attributes, checked, a key given twice kept once (the last).
    pub(crate) attrs: Attributes,
    /// The session's size by the store's accounting.
    pub(crate) bytes: usize,
    idle: Millis,
    absolute: Millis,
    client: ClientInfo,
}

impl Checked {
    /// The session this request starts at `now`, under a fresh key.
    pub(crate) fn session(self, now: Millis) -> Session {
        Session {
            key: SessionKey::generate(),
            user: self.user,
            attributes: self.attrs,
            version: 1,
            created_at: now,
            last_access_at: now,
            idle_timeout: self.idle,
            absolute_expires_at: now.saturating_add(self.absolute),
            client: self.client,
        }
    }
}

/// An Update's change after [`Store::check_change`].
pub(crate) struct Changed<'c> {
    /// The keys it sets.
    pub(crate) set: HashSet<&'c str>,
    /// The keys it removes.
    pub(crate) remove: HashSet<&'c str>,
    /// The most it can grow the session by (every key new).
    pub(crate) growth: usize,
}

/// Who a Regenerate binds, after [`Store::binding`].
pub(crate) struct Binding {
    /// The session's user now.
    pub(crate) current_user: Option<Arc<str>>,
    /// Its user after the move.
    pub(crate) user: Option<Arc<str>>,
    /// Whether the move binds another user: a login.
    pub(crate) login: bool,
    /// The bytes a longer user ID adds.
    pub(crate) growth: usize,
}
