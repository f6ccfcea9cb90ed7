//! The Store: the one place where session rules live.
//!
//! Sessions sit in a sharded `DashMap` keyed by the binary session key. A second map indexes
//! sessions by user, and a lazy timing wheel ([`wheel`]) indexes them by deadline for the
//! [`reaper`]. Every change emits one [`events::Event`].
//!
//! Lock order, the one rule that keeps this deadlock-free. Locks are taken in this order,
//! never the other way round, and never two of one kind at once unless said here:
//!
//! 1. user latches (`Store::latch_users`): a striped set of mutexes chosen by a hash of
//!    the user ID. Every user-wide operation (Create or Regenerate binding a user,
//!    ListUserSessions, DestroyUserSessions) holds its users' latches for its whole run, so
//!    a login's move from one user's list to another's is one step to all of them. A login
//!    takes two, in stripe order; two users on one stripe share it.
//! 2. a user's index entry in `users` (a DashMap shard lock: two at once could be the same
//!    shard and deadlock, which is why the latches exist);
//! 3. a part of the expiry wheel (its sweep looks keys up in `sessions`, so nothing files
//!    or takes wheel keys while holding a session entry);
//! 4. a session's entry in `sessions`.
//!
//! A key's user never changes (regenerate makes a new key), so reading it first and then
//! locking the user's entry is stable. Removing a key from its user's list needs only the
//! entry (rule 2), not the latch: lists only shrink that way, which no user-wide operation
//! can mistake for anything else.
//!
//! Record order: a new key (Create, Regenerate) becomes reachable (map, wheel, eviction
//! sample, user list) only after its event is emitted, so the log never holds an `End`
//! before the record that made the key.
//!
//! Every read checks the deadline itself, so correctness never rests on the reaper keeping
//! up; the reaper only frees memory.

mod all;
pub mod error;
pub mod events;
mod limits;
pub mod packed;
pub mod reaper;
pub mod wheel;

use std::collections::HashSet;
use std::hash::{BuildHasher, RandomState};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicIsize, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

pub use self::error::StoreError;
use self::events::{EndCause, Event, EventSink};
use self::limits::pick_timeout;
pub use self::limits::{LimitOverrides, Limits, LimitsError, PerUserPolicy};
use self::packed::{Packed, PackedClient};
use self::wheel::Wheel;
use crate::clock::Clock;
use crate::session::{
    deadline, Attributes, ClientInfo, KeyHasherBuilder, Millis, Session, SessionKey,
};

/// Fixed per-session overhead counted towards `max_session_bytes` and the bytes gauge:
/// the map entry, the key and the bookkeeping fields, rounded up.
pub const SESSION_OVERHEAD_BYTES: usize = 192;

/// Fixed per-attribute overhead: the two length prefixes in the packed buffer, rounded up.
pub const ATTRIBUTE_OVERHEAD_BYTES: usize = 8;

/// What a Create asks for. Unset timeouts take the server defaults.
#[derive(Debug, Clone, Default)]
pub struct NewSession {
    /// The user to bind, or `None` for an anonymous session.
    pub user: Option<String>,
    /// Initial attributes.
    pub attributes: Vec<(String, Bytes)>,
    /// Requested idle timeout.
    pub idle_timeout: Option<Duration>,
    /// Requested absolute timeout.
    pub absolute_timeout: Option<Duration>,
    /// Where the session comes from.
    pub client: ClientInfo,
}

/// A partial update: `set` and `remove` apply together or not at all.
#[derive(Debug, Clone, Default)]
pub struct Change {
    /// Attributes to insert or overwrite.
    pub set: Vec<(String, Bytes)>,
    /// Attribute keys to delete.
    pub remove: Vec<String>,
    /// Compare-and-set: apply only at this version.
    pub expected_version: Option<u64>,
}

/// What a Regenerate asks for.
#[derive(Debug, Clone, Default)]
pub struct Rotation {
    /// `Some`: bind this user ("" means anonymous). `None`: keep the current user.
    pub user: Option<String>,
    /// Start the new ID with no attributes.
    pub drop_attributes: bool,
}

/// What one reaper step did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reaped {
    /// Sessions freed because they were dead.
    pub expired: usize,
    /// Keys put back in the wheel because they had been touched since filing.
    pub refiled: usize,
    /// Whether the step stopped at its batch limit with more due.
    pub more: bool,
    /// How late the oldest due slot was at the time of this step.
    pub lag: Option<Millis>,
    /// Keys of sessions that had ended early, dropped from the expiry wheel.
    pub swept: usize,
}

/// Point-in-time counters, cheap to read (atomics and a map length).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Sessions in memory (a few may be dead and waiting for the reaper).
    pub sessions: usize,
    /// Approximate bytes held by sessions.
    pub bytes: usize,
    /// Users with at least one session in the index.
    pub users: usize,
}

/// One stored session. `last_access` is atomic so that a sliding read needs only the shard's
/// read lock.
struct Entry {
    user: Option<Arc<str>>,
    attrs: Packed,
    version: u64,
    created_at: Millis,
    last_access: AtomicU64,
    /// The last access reported as a `Touched` event (see [`Entry::slide`]).
    reported_access: AtomicU64,
    idle_timeout: Millis,
    absolute: Millis,
    client: PackedClient,
    bytes: usize,
}

impl Entry {
    fn expires_at(&self) -> Millis {
        deadline(
            self.last_access.load(Ordering::Relaxed),
            self.idle_timeout,
            self.absolute,
        )
    }

    fn is_live(&self, now: Millis) -> bool {
        now < self.expires_at()
    }

    /// Slides the idle deadline to `now`. `fetch_max`, so racing readers never move it back.
    fn slide(&self, now: Millis) {
        self.last_access.fetch_max(now, Ordering::Relaxed);
    }

    /// Slides, and says whether this touch is worth an event: only once the deadline has
    /// moved by a quarter of the idle window since the last reported one, so the durable log
    /// gets a record per session every few minutes of activity, not one per read. Losing
    /// the unreported touches in a crash only shortens an idle deadline by that much.
    fn slide_and_report(&self, now: Millis) -> bool {
        self.slide(now);
        let reported = self.reported_access.load(Ordering::Relaxed);
        now.saturating_sub(reported) >= self.idle_timeout / TOUCH_REPORT_FRACTION
            && self
                .reported_access
                .compare_exchange(reported, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    fn snapshot(&self, key: SessionKey, with_attributes: bool) -> Session {
        Session {
            key,
            user: self.user.clone(),
            attributes: if with_attributes {
                self.attrs.unpack()
            } else {
                Attributes::new()
            },
            version: self.version,
            created_at: self.created_at,
            last_access_at: self.last_access.load(Ordering::Relaxed),
            idle_timeout: self.idle_timeout,
            absolute_expires_at: self.absolute,
            client: self.client.unpack(),
        }
    }

    fn from_session(s: &Session, bytes: usize) -> Self {
        Self::with_user(s, s.user.clone(), bytes)
    }

    /// An entry from `s`'s fields, with its user handed over (not cloned).
    fn with_user(s: &Session, user: Option<Arc<str>>, bytes: usize) -> Self {
        Entry {
            user,
            attrs: Packed::pack(s.attributes.iter().map(|(k, v)| (k.as_str(), v.as_ref()))),
            version: s.version,
            created_at: s.created_at,
            last_access: AtomicU64::new(s.last_access_at),
            reported_access: AtomicU64::new(s.last_access_at),
            idle_timeout: s.idle_timeout,
            absolute: s.absolute_expires_at,
            client: PackedClient::pack(&s.client),
            bytes,
        }
    }
}

fn attribute_bytes(key: &str, value_len: usize) -> usize {
    key.len() + value_len + ATTRIBUTE_OVERHEAD_BYTES
}

fn base_bytes(user: Option<&str>, client: &ClientInfo) -> usize {
    SESSION_OVERHEAD_BYTES + user.map_or(0, str::len) + client.ip.len() + client.user_agent.len()
}

/// The session store. A cheap handle: clone it freely.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    /// Entries are boxed so a table slot is 40 bytes, not 200: a hash table keeps up to half
    /// its slots empty after it doubles, and empty slots of the full entry size cost about
    /// 160 bytes per session at 1M sessions. Reads measured no slower for the extra hop.
    sessions: DashMap<SessionKey, Box<Entry>, KeyHasherBuilder>,
    users: DashMap<Arc<str>, Vec<SessionKey>>,
    wheel: Wheel,
    clock: Clock,
    limits: Limits,
    /// Sessions in `sessions`, kept beside the map so the `max_sessions` check is one atomic.
    count: AtomicUsize,
    /// Sum of `Entry::bytes`.
    bytes: AtomicUsize,
    /// The daemon-wide memory budget this store draws on with the others.
    pool: Arc<MemoryPool>,
    /// The part of the pool held for this store alone: up to this many bytes it never
    /// evicts because of what other stores hold.
    reserved: usize,
    /// Rotates the wheel part eviction samples start from.
    evict_from: AtomicUsize,
    /// User latches (see the module docs), chosen by `latch_hasher`.
    latches: Box<[Mutex<()>]>,
    latch_hasher: RandomState,
    /// `create_rate` and `create_burst`, on the store's clock.
    creates: RateLimiter<NotKeyed, InMemoryState, RateClock, NoOpMiddleware<Nanos>>,
    sink: Box<dyn EventSink>,
}

/// The memory budget all stores of one daemon share (one store per tenant): the daemon-wide
/// `max_memory_bytes`.
///
/// Each store is guaranteed its share, `min(its own max_memory_bytes, cap / tenants)`: up to
/// that it never has to evict because of what the others hold. Beyond its share a store may
/// grow (to its own cap) only into what no other store holds or is guaranteed; when that is
/// used up, it evicts its own sessions, never another store's. Shares are handed out as
/// stores join and never add up to more than the cap, so neither does what the stores hold.
#[derive(Debug)]
pub struct MemoryPool {
    /// Bytes held by all stores.
    used: AtomicUsize,
    /// The sum over stores of `max(held, share)`: what is held or promised. Signed, because
    /// concurrent changes of one store may land here in another order than in its counter.
    committed: AtomicIsize,
    /// The sum of the shares handed out.
    reserved: AtomicUsize,
    cap: usize,
    share: usize,
}

impl MemoryPool {
    /// A budget of `cap` bytes for one store.
    pub fn new(cap: usize) -> Arc<Self> {
        Self::shared(cap, 1)
    }

    /// A budget of `cap` bytes shared by `tenants` stores, each guaranteed an equal share.
    pub fn shared(cap: usize, tenants: usize) -> Arc<Self> {
        Arc::new(MemoryPool {
            used: AtomicUsize::new(0),
            committed: AtomicIsize::new(0),
            reserved: AtomicUsize::new(0),
            cap,
            share: cap / tenants.max(1),
        })
    }

    /// Bytes held by all stores in the pool.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// The daemon-wide cap.
    pub fn cap(&self) -> usize {
        self.cap
    }

    /// The equal share of one tenant: what a tenant with no `max_memory_bytes` of its own
    /// may hold.
    pub fn share(&self) -> usize {
        self.share
    }

    /// Hands a joining store with its own cap `own` its guaranteed share, no more than is
    /// left unpromised.
    fn join(&self, own: usize) -> usize {
        let want = own.min(self.share);
        let mut granted = 0;
        let _ = self
            .reserved
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |r| {
                granted = want.min(self.cap.saturating_sub(r));
                Some(r + granted)
            });
        self.committed
            .fetch_add(granted as isize, Ordering::Relaxed);
        granted
    }

    /// Gives back what a store held and was promised, when it goes away.
    fn leave(&self, reserved: usize, held: usize) {
        self.used.fetch_sub(held, Ordering::Relaxed);
        self.committed
            .fetch_sub(held.max(reserved) as isize, Ordering::Relaxed);
        self.reserved.fetch_sub(reserved, Ordering::Relaxed);
    }

    /// Bytes held or promised.
    fn committed(&self) -> usize {
        self.committed.load(Ordering::Relaxed).max(0) as usize
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.pool
            .leave(self.reserved, self.bytes.load(Ordering::Relaxed));
    }
}

/// The store's clock, as the rate limiter reads time.
#[derive(Clone)]
struct RateClock(Clock);

impl governor::clock::Clock for RateClock {
    type Instant = Nanos;

    fn now(&self) -> Nanos {
        Nanos::from(Duration::from_millis(self.0.now()))
    }
}

/// A touch is reported as an event once the idle deadline has moved by `1 / this` of the
/// idle window since the last reported touch.
pub const TOUCH_REPORT_FRACTION: u64 = 4;

/// Sessions looked at per eviction round under `max_memory_bytes`.
const EVICTION_SAMPLE: usize = 64;

/// Eviction rounds one call may run before it gives up with RESOURCE_EXHAUSTED.
const EVICTION_ROUNDS: usize = 8;

/// Stripes of user latches (see the module docs); per-store, so a few dozen mutexes.
const USER_LATCHES: usize = 64;

/// The expiry wheel is swept once it holds more than twice as many keys as there are
/// sessions, plus this many (so a small store is not swept over a handful of keys).
const WHEEL_SWEEP_SLACK: usize = 4096;

/// Granularity of the expiry wheel. Reads are exact regardless; this only sets how soon after
/// its deadline a dead session's memory is freed.
pub const WHEEL_GRANULARITY: Duration = Duration::from_secs(1);

impl Store {
    /// A store with `shards` map shards (a power of two).
    pub fn new(limits: Limits, shards: usize, clock: Clock, sink: Box<dyn EventSink>) -> Self {
        Self::with_capacity(limits, shards, clock, sink, 0)
    }

    /// A store with room for `capacity` sessions before its map grows: recovery knows how
    /// many it is about to load, and growing a million-entry map step by step is slow.
    pub fn with_capacity(
        limits: Limits,
        shards: usize,
        clock: Clock,
        sink: Box<dyn EventSink>,
        capacity: usize,
    ) -> Self {
        let pool = MemoryPool::new(limits.max_memory_bytes);
        Self::in_pool(limits, shards, clock, sink, capacity, pool)
    }

    /// A store that shares `pool` with other stores: one tenant's store of several.
    pub fn in_pool(
        limits: Limits,
        shards: usize,
        clock: Clock,
        sink: Box<dyn EventSink>,
        capacity: usize,
        pool: Arc<MemoryPool>,
    ) -> Self {
        let shards = shards.max(2).next_power_of_two();
        let one = NonZeroU32::MIN;
        let quota = Quota::per_second(NonZeroU32::new(limits.create_rate).unwrap_or(one))
            .allow_burst(NonZeroU32::new(limits.create_burst).unwrap_or(one));
        let creates = RateLimiter::direct_with_clock(quota, RateClock(clock.clone()));
        let reserved = pool.join(limits.max_memory_bytes);
        Store {
            inner: Arc::new(Inner {
                sessions: DashMap::with_capacity_and_hasher_and_shard_amount(
                    capacity,
                    KeyHasherBuilder::default(),
                    shards,
                ),
                users: DashMap::with_shard_amount(shards),
                wheel: Wheel::new(WHEEL_GRANULARITY.as_millis() as Millis, shards),
                clock,
                limits,
                count: AtomicUsize::new(0),
                bytes: AtomicUsize::new(0),
                reserved,
                pool,
                evict_from: AtomicUsize::new(0),
                latches: (0..USER_LATCHES).map(|_| Mutex::new(())).collect(),
                latch_hasher: RandomState::new(),
                creates,
                sink,
            }),
        }
    }

    /// `Unavailable` while a sink (the durable log) cannot keep changes: checked first by
    /// every write, so nothing is acknowledged that would not survive. Reads skip it.
    pub(crate) fn check_writable(&self) -> Result<(), StoreError> {
        self.inner
            .sink
            .accepting()
            .map_err(|r| StoreError::Unavailable(r.0))
    }

    /// The store's clock.
    pub fn clock(&self) -> &Clock {
        &self.inner.clock
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    /// Starts a session under a fresh server-generated ID.
    pub fn create(&self, req: NewSession) -> Result<Session, StoreError> {
        self.check_writable()?;
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
        let user = self.inner.limits.check_user(req.user)?;
        self.inner.limits.check_client(&req.client)?;
        let mut attrs = Attributes::with_capacity(req.attributes.len());
        let mut bytes = base_bytes(user.as_deref(), &req.client);
        for (k, v) in req.attributes {
            self.inner.limits.check_attribute(&k, &v)?;
            if let Some(old) = attrs.get(&k) {
                bytes -= attribute_bytes(&k, old.len());
            }
            bytes += attribute_bytes(&k, v.len());
            attrs.insert(k, v);
        }
        self.inner.limits.check_shape(attrs.len(), bytes)?;
        self.take_create_token()?;

        // Eviction takes time: the session starts once there is room for it.
        let now = self.make_room(bytes, self.now())?;
        let session = Session {
            key: SessionKey::generate(),
            user,
            attributes: attrs,
            version: 1,
            created_at: now,
            last_access_at: now,
            idle_timeout: idle,
            absolute_expires_at: now.saturating_add(absolute),
            client: req.client,
        };
        self.reserve_slot()?;
        let _latch = self.latch_users(session.user.as_deref(), None);
        let inserted = self.in_user_index(session.user.as_ref(), |keys| {
            if let Some(keys) = keys {
                let victims = self.user_room(keys, now)?;
                self.evict_from_user(keys, &victims, now);
                self.insert(&session, bytes);
                keys.push(session.key);
            } else {
                self.insert(&session, bytes);
            }
            Ok(())
        });
        if let Err(e) = inserted {
            self.inner.count.fetch_sub(1, Ordering::Relaxed);
            return Err(e);
        }
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
            self.inner.sink.record(&Event::Touched { key, at: now });
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
            self.inner.sink.record(&Event::Touched { key, at: now });
        }
        Ok(entry.expires_at())
    }

    /// Applies a partial update atomically: every check passes before anything changes.
    ///
    /// Bounded work: the counts are checked first, every check after them is linear in the
    /// request, and the work under the session's lock is linear in `max_attributes`.
    pub fn update(&self, id: &str, change: Change) -> Result<Session, StoreError> {
        self.check_writable()?;
        let key = SessionKey::parse(id)?;
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
            self.inner.limits.check_attribute(k, v)?;
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
        // Work out the result's shape first, so a limit failure leaves the session untouched:
        // one pass over the stored attributes.
        let mut bytes = entry.bytes + growth;
        let mut kept: Vec<(&str, Bytes)> = Vec::with_capacity(entry.attrs.len());
        for (k, v) in entry.attrs.iter() {
            if set.contains(k) || remove.contains(k) {
                bytes -= attribute_bytes(k, v.len());
            } else {
                kept.push((k, v));
            }
        }
        self.inner
            .limits
            .check_shape(kept.len() + change.set.len(), bytes)?;
        let packed = Packed::pack(
            kept.iter()
                .map(|(k, v)| (*k, v.as_ref()))
                .chain(change.set.iter().map(|(k, v)| (k.as_str(), v.as_ref()))),
        );
        drop(kept);
        entry.attrs = packed;
        let delta = bytes as isize - entry.bytes as isize;
        entry.bytes = bytes;
        entry.version += 1;
        entry.slide(now);
        self.add_bytes(delta);
        self.inner.sink.record(&Event::Updated {
            key,
            set: &change.set,
            remove: &change.remove,
            version: entry.version,
            at: now,
            bytes_delta: delta,
        });
        Ok(entry.snapshot(key, true))
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
    pub fn regenerate(&self, id: &str, rotation: Rotation) -> Result<Session, StoreError> {
        self.check_writable()?;
        let old = SessionKey::parse(id)?;
        let new_user = match rotation.user {
            None => None,
            Some(u) => Some(self.inner.limits.check_user(Some(u))?),
        };
        let current_user = {
            let entry = self.inner.sessions.get(&old).ok_or(StoreError::NotFound)?;
            if !entry.is_live(self.now()) {
                return Err(StoreError::NotFound);
            }
            entry.user.clone()
        };
        let user = new_user.unwrap_or_else(|| current_user.clone());
        let login = user != current_user;
        // A login may bind a longer user ID than the session had. Room is made after the
        // lookup, so a Regenerate of a missing session evicts nobody.
        let growth = user
            .as_deref()
            .map_or(0, str::len)
            .saturating_sub(current_user.as_deref().map_or(0, str::len));
        if growth > 0 {
            self.make_room(growth, self.now())?;
        }
        let _latches = self.latch_users(current_user.as_deref(), user.as_deref());
        // Eviction and waiting for the latches take time: the old session must be live now.
        let now = self.now();
        // Nobody can add to the new user's list while its latch is held, so this check
        // stands until the new key joins it. Victims are only picked here, and evicted once
        // the old session is taken, so a Regenerate that fails evicts nobody.
        let victims = match (login, &user) {
            (true, Some(u)) => self.in_user_index(Some(u), |keys| {
                keys.map_or(Ok(Vec::new()), |keys| self.user_room(keys, now))
            })?,
            _ => Vec::new(),
        };
        let (_, entry) = self
            .inner
            .sessions
            .remove_if(&old, |_, e| e.is_live(now))
            .ok_or(StoreError::NotFound)?;
        if !victims.is_empty() {
            self.in_user_index(user.as_ref(), |keys| {
                if let Some(keys) = keys {
                    self.evict_from_user(keys, &victims, now);
                }
            });
        }
        let session = self.rotated(*entry, old, &user, now, rotation.drop_attributes);
        if login {
            self.in_user_index(current_user.as_ref(), |keys| {
                if let Some(keys) = keys {
                    keys.retain(|k| *k != old);
                }
            });
        }
        self.in_user_index(user.as_ref(), |keys| {
            if let Some(keys) = keys {
                if !login {
                    keys.retain(|k| *k != old);
                }
                keys.push(session.key);
            }
        });
        Ok(session)
    }

    /// Ends one session. `Ok(false)` if there was no live session under that ID.
    pub fn destroy(&self, id: &str) -> Result<bool, StoreError> {
        self.check_writable()?;
        let key = SessionKey::parse(id)?;
        let now = self.now();
        Ok(self.end(key, now, EndCause::Destroyed, |e| e.is_live(now)))
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
        let destroyed = self.in_user_index(Some(&user), |keys| {
            let Some(keys) = keys else { return 0 };
            let mut destroyed = 0u32;
            keys.retain(|k| {
                let live = self.inner.sessions.get(k).is_some_and(|e| e.is_live(now));
                if live && Some(*k) == except {
                    return true;
                }
                let cause = if live {
                    EndCause::Destroyed
                } else {
                    EndCause::Expired
                };
                if self.remove_entry(*k, now, cause, |_| true).is_some() && live {
                    destroyed += 1;
                }
                false
            });
            destroyed
        });
        Ok(destroyed)
    }

    /// One bounded reaper step: frees up to `max` due sessions and re-files touched ones.
    pub fn reap(&self, max: usize) -> Reaped {
        let now = self.now();
        let mut due = Vec::with_capacity(max.min(4096));
        let oldest = self.inner.wheel.take_due(now, max, &mut due);
        let mut out = Reaped {
            more: due.len() >= max,
            lag: oldest.map(|o| now.saturating_sub(o)),
            ..Reaped::default()
        };
        for key in due {
            // Re-check: the session may have been touched, destroyed or regenerated since it
            // was filed.
            let Some(expires) = self.inner.sessions.get(&key).map(|e| e.expires_at()) else {
                continue;
            };
            if expires > now {
                self.inner.wheel.file(key, expires);
                out.refiled += 1;
            } else if self.end(key, now, EndCause::Expired, |e| !e.is_live(now)) {
                out.expired += 1;
            }
        }
        // A session that ended early (destroyed, regenerated, evicted) leaves its key in the
        // wheel until the slot comes due, days away; under churn those would pile up. Once
        // they outnumber the live keys, sweep them out, `max` keys a step.
        let wheel = &self.inner.wheel;
        let sessions = self.inner.count.load(Ordering::Relaxed);
        if !wheel.sweeping() && wheel.len() > sessions.saturating_mul(2) + WHEEL_SWEEP_SLACK {
            wheel.start_sweep();
        }
        if wheel.sweeping() {
            out.swept = wheel.sweep(max, |k| self.inner.sessions.contains_key(k));
            out.more |= wheel.sweeping();
        }
        out
    }

    /// Calls `f` with every session in memory (live or awaiting the reaper). For snapshots,
    /// which run beside live traffic: a shard's lock is held only to list its keys (32
    /// bytes each), then each session is copied under its own brief read lock, and `f` runs
    /// with no lock held. Holding a shard while `f` encodes and writes would stall every
    /// writer to it, and the runtime thread each writer blocks, for the whole shard.
    pub fn for_each_session(&self, mut f: impl FnMut(Session)) {
        let keys: Vec<SessionKey> = self.inner.sessions.iter().map(|e| *e.key()).collect();
        for key in keys {
            let Some((mut session, attrs)) = self
                .inner
                .sessions
                .get(&key)
                .map(|e| (e.snapshot(key, false), e.attrs.clone()))
            else {
                continue;
            };
            session.attributes = attrs.unpack();
            f(session);
        }
    }

    /// Loads recovered sessions, emitting no events (they are already durable). Limits are
    /// not applied: what was accepted before a restart stays. Spread over the machine's
    /// cores, since start-up waits for it.
    pub fn restore(&self, mut sessions: Vec<Session>) {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let chunk = sessions.len().div_ceil(threads).max(1);
        std::thread::scope(|scope| {
            for part in sessions.chunks_mut(chunk) {
                scope.spawn(move || part.iter_mut().for_each(|s| self.restore_one(s)));
            }
        });
    }

    /// Loads one session, moving its parts out of `s` (and freeing what is left on this
    /// thread, not in one serial drop at the end).
    fn restore_one(&self, s: &mut Session) {
        let bytes = base_bytes(s.user.as_deref(), &s.client)
            + s.attributes
                .iter()
                .map(|(k, v)| attribute_bytes(k, v.len()))
                .sum::<usize>();
        if let Some(u) = &s.user {
            self.inner.users.entry(u.clone()).or_default().push(s.key);
        }
        let user = s.user.take();
        let entry = Entry::with_user(s, user, bytes);
        drop(std::mem::take(&mut s.attributes));
        drop(std::mem::take(&mut s.client));
        let expires_at = entry.expires_at();
        let old = self.inner.sessions.insert(s.key, Box::new(entry));
        if let Some(old) = old {
            // Recovery hands each key over once; if not, keep the accounting right.
            self.add_bytes(-(old.bytes as isize));
            self.inner.count.fetch_sub(1, Ordering::Relaxed);
        }
        self.inner.wheel.file(s.key, expires_at);
        self.inner.count.fetch_add(1, Ordering::Relaxed);
        self.add_bytes(bytes as isize);
    }

    /// Current counters.
    pub fn stats(&self) -> Stats {
        Stats {
            sessions: self.inner.count.load(Ordering::Relaxed),
            bytes: self.inner.bytes.load(Ordering::Relaxed),
            users: self.inner.users.len(),
        }
    }

    /// Keys filed in the expiry wheel (live or awaiting a re-check). For tests.
    pub fn wheel_len(&self) -> usize {
        self.inner.wheel.len()
    }

    fn now(&self) -> Millis {
        self.inner.clock.now()
    }

    /// Stores a new session. Its event goes out first, while nothing else can reach the key
    /// (it is fresh), so no `End` of it can reach the log before its `Created`.
    fn insert(&self, session: &Session, bytes: usize) {
        self.add_bytes(bytes as isize);
        self.inner.sink.record(&Event::Created { session, bytes });
        self.inner
            .sessions
            .insert(session.key, Box::new(Entry::from_session(session, bytes)));
        self.inner.wheel.file(session.key, session.expires_at());
    }

    /// Whether `need` more bytes fit: under the store's own `max_memory_bytes`, and either
    /// within its guaranteed share of the pool or within what the pool has left.
    fn fits(&self, need: usize) -> bool {
        let held = self.inner.bytes.load(Ordering::Relaxed);
        let after = held.saturating_add(need);
        if after > self.inner.limits.max_memory_bytes {
            return false;
        }
        let reserved = self.inner.reserved;
        if after <= reserved {
            return true;
        }
        let pool = &self.inner.pool;
        let growth = after - held.max(reserved);
        pool.committed().saturating_add(growth) <= pool.cap
    }

    /// Evicts until `need` more bytes fit (see [`Store::fits`]). Candidates are the
    /// earliest-filed sessions in the expiry wheel (a sample of the longest idle); within a
    /// sample, dead sessions go first, then anonymous ones, then authenticated ones, each by
    /// deadline. Only this store's sessions are candidates, and eviction stops as soon as the
    /// need fits, so it never goes below the store's share. Bounded work: gives up with
    /// RESOURCE_EXHAUSTED after a few samples.
    ///
    /// Callers look their session up first, so a request that fails anyway evicts nobody.
    /// Returns the time to go on with: `now` if nothing had to be evicted, else the clock
    /// read again, since eviction takes time and a session may have expired meanwhile.
    fn make_room(&self, need: usize, now: Millis) -> Result<Millis, StoreError> {
        if self.fits(need) {
            return Ok(now);
        }
        let (own, pool) = (self.inner.limits.max_memory_bytes, &self.inner.pool);
        let exhausted = StoreError::Exhausted {
            limit: "max_memory_bytes",
            max: own.min(pool.cap) as u64,
            hint: "",
        };
        // The most this store could hold by evicting all of its own sessions.
        let reserved = self.inner.reserved;
        let mine = self.inner.bytes.load(Ordering::Relaxed).max(reserved);
        let others = pool.committed().saturating_sub(mine);
        if need > own.min(reserved.max(pool.cap.saturating_sub(others))) {
            // Could never fit: evicting every session this store may evict would not help.
            return Err(exhausted);
        }
        let mut sample = Vec::with_capacity(EVICTION_SAMPLE);
        for _ in 0..EVICTION_ROUNDS {
            let from = self.inner.evict_from.fetch_add(1, Ordering::Relaxed);
            sample.clear();
            self.inner
                .wheel
                .take_earliest(from, EVICTION_SAMPLE, &mut sample);
            if sample.is_empty() {
                break;
            }
            let mut ranked: Vec<(bool, bool, Millis, SessionKey)> = sample
                .iter()
                .filter_map(|k| {
                    let e = self.inner.sessions.get(k)?;
                    Some((e.is_live(now), e.user.is_some(), e.expires_at(), *k))
                })
                .collect();
            ranked.sort_unstable_by_key(|&(live, auth, expires, _)| (live, auth, expires));
            for (live, _, expires, key) in ranked {
                if self.fits(need) {
                    self.inner.wheel.file(key, expires);
                    continue;
                }
                let cause = if live {
                    EndCause::Evicted
                } else {
                    EndCause::Expired
                };
                if self.end(key, now, cause, |e| e.is_live(now) == live) {
                    if live {
                        tracing::warn!(session = %key, "evicted at max_memory_bytes");
                    }
                } else if self.inner.sessions.contains_key(&key) {
                    self.inner.wheel.file(key, expires);
                }
            }
            if self.fits(need) {
                return Ok(self.now());
            }
        }
        Err(exhausted)
    }

    /// Takes a token from the `create_rate` bucket.
    fn take_create_token(&self) -> Result<(), StoreError> {
        self.inner
            .creates
            .check()
            .map_err(|_| StoreError::Exhausted {
                limit: "create_rate",
                max: u64::from(self.inner.limits.create_rate),
                hint: " sessions per second; retry shortly",
            })
    }

    /// Claims one of `max_sessions`; the caller gives it back if the insert does not happen.
    fn reserve_slot(&self) -> Result<(), StoreError> {
        let max = self.inner.limits.max_sessions;
        self.inner
            .count
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .map(|_| ())
            .map_err(|_| StoreError::Exhausted {
                limit: "max_sessions",
                max: max as u64,
                hint: "",
            })
    }

    /// Runs `f` with the user's index entry locked (`None` for anonymous sessions), and drops
    /// the entry afterwards if it is left empty, so the index never leaks users.
    fn in_user_index<R>(
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
    fn latch_users(&self, a: Option<&str>, b: Option<&str>) -> [Option<MutexGuard<'_, ()>>; 2] {
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
        let take = |i: usize| {
            latches[i]
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        };
        [first.map(take), second.map(take)]
    }

    /// Drops dead keys from a user's list, then checks `max_sessions_per_user` for one more
    /// session: `Err` under `deny` if the user is at it; under `evict-oldest`, the sessions
    /// to evict for room (none if there is room). Evicts nothing itself.
    fn user_room(
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

    /// Evicts `victims` (picked by [`Store::user_room`]) from a user's list and the map.
    fn evict_from_user(&self, keys: &mut Vec<SessionKey>, victims: &[SessionKey], now: Millis) {
        for &key in victims {
            keys.retain(|k| *k != key);
            if self
                .remove_entry(key, now, EndCause::Evicted, |_| true)
                .is_some()
            {
                tracing::info!(session = %key, "evicted a user's oldest session at max_sessions_per_user");
            }
        }
    }

    /// Stores `entry`, taken out from under `old`, under a fresh key: the second half of a
    /// Regenerate. Binding a different user is a login: a fresh absolute lifetime of the same
    /// length. Otherwise the absolute deadline is kept, so rotation never extends a session.
    fn rotated(
        &self,
        entry: Entry,
        old: SessionKey,
        user: &Option<Arc<str>>,
        now: Millis,
        drop_attributes: bool,
    ) -> Session {
        let mut s = entry.snapshot(SessionKey::generate(), !drop_attributes);
        s.version = entry.version + 1;
        s.last_access_at = now;
        if *user != entry.user {
            let lifetime = entry.absolute.saturating_sub(entry.created_at);
            s.user = user.clone();
            s.created_at = now;
            s.absolute_expires_at = now.saturating_add(lifetime);
        }
        let bytes = base_bytes(s.user.as_deref(), &s.client)
            + s.attributes
                .iter()
                .map(|(k, v)| attribute_bytes(k, v.len()))
                .sum::<usize>();
        // The event first, as in `insert`: the new key is reachable only once it is out.
        let delta = bytes as isize - entry.bytes as isize;
        self.add_bytes(delta);
        self.inner.sink.record(&Event::Regenerated {
            old,
            session: &s,
            bytes_delta: delta,
        });
        self.inner
            .sessions
            .insert(s.key, Box::new(Entry::from_session(&s, bytes)));
        self.inner.wheel.file(s.key, s.expires_at());
        s
    }

    /// Ends `key` if `pred` holds, keeping the user index in step. Returns whether it did.
    fn end(
        &self,
        key: SessionKey,
        now: Millis,
        cause: EndCause,
        pred: impl Fn(&Entry) -> bool,
    ) -> bool {
        let Some(user) = self.inner.sessions.get(&key).map(|e| e.user.clone()) else {
            return false;
        };
        self.in_user_index(user.as_ref(), |keys| {
            let removed = self.remove_entry(key, now, cause, pred).is_some();
            if let (true, Some(keys)) = (removed, keys) {
                keys.retain(|k| *k != key);
            }
            removed
        })
    }

    /// Removes the map entry and does the accounting. The caller keeps the user index in step.
    fn remove_entry(
        &self,
        key: SessionKey,
        now: Millis,
        cause: EndCause,
        pred: impl Fn(&Entry) -> bool,
    ) -> Option<()> {
        let (_, entry) = self.inner.sessions.remove_if(&key, |_, e| pred(e))?;
        self.inner.count.fetch_sub(1, Ordering::Relaxed);
        self.add_bytes(-(entry.bytes as isize));
        self.inner.sink.record(&Event::Ended {
            key,
            cause,
            lifetime: now.saturating_sub(entry.created_at),
            bytes: entry.bytes,
        });
        Some(())
    }

    fn add_bytes(&self, delta: isize) {
        let (own, pool) = (&self.inner.bytes, &self.inner.pool);
        let before = if delta >= 0 {
            pool.used.fetch_add(delta as usize, Ordering::Relaxed);
            own.fetch_add(delta as usize, Ordering::Relaxed)
        } else {
            pool.used.fetch_sub(delta.unsigned_abs(), Ordering::Relaxed);
            own.fetch_sub(delta.unsigned_abs(), Ordering::Relaxed)
        };
        // What the pool counts as this store's is `max(held, reserved)`: it moves only above
        // the share. Each change adds its own step, so the sum stays exact under races.
        let after = before.wrapping_add_signed(delta);
        let reserved = self.inner.reserved;
        let step = after.max(reserved) as isize - before.max(reserved) as isize;
        if step != 0 {
            pool.committed.fetch_add(step, Ordering::Relaxed);
        }
    }
}

/// Fails as a write to `entry` would at `now`: dead, or at another version than `expected`.
fn check_entry(entry: &Entry, expected: Option<u64>, now: Millis) -> Result<(), StoreError> {
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

#[cfg(test)]
mod tests;
