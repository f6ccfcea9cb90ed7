//! The Store: the one place where session rules live.
//!
//! Sessions sit in a sharded `DashMap` keyed by the binary session key. A second map indexes
//! sessions by user, and a lazy timing wheel ([`wheel`]) indexes them by deadline for the
//! [`reaper`]. Every change emits one [`events::Event`].
//!
//! Lock order, the rule that keeps this deadlock-free: a user's index entry is always taken
//! before any session entry, never the other way round, and never two of either at once.
//! A key's user never changes (regenerate makes a new key), so reading it first and then
//! locking the user's entry is stable.
//!
//! Every read checks the deadline itself, so correctness never rests on the reaper keeping
//! up; the reaper only frees memory.

pub mod error;
pub mod events;
pub mod packed;
pub mod reaper;
pub mod wheel;

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

pub use self::error::StoreError;
use self::events::{EndCause, Event, EventSink};
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

/// The rules and limits the Store enforces. Built from the config.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Idle timeout when a Create does not ask for one.
    pub default_idle_timeout: Duration,
    /// Absolute timeout when a Create does not ask for one.
    pub default_absolute_timeout: Duration,
    /// The longest idle timeout a Create may ask for.
    pub max_idle_timeout: Duration,
    /// The longest absolute timeout a Create may ask for.
    pub max_absolute_timeout: Duration,
    /// Attributes per session.
    pub max_attributes: usize,
    /// Bytes in an attribute key.
    pub max_key_bytes: usize,
    /// Bytes in an attribute value.
    pub max_value_bytes: usize,
    /// Approximate bytes of one whole session: attributes, user, client info and overhead.
    pub max_session_bytes: usize,
    /// Bytes in a user ID.
    pub max_user_id_bytes: usize,
    /// Bytes of client info (IP plus user agent).
    pub max_client_info_bytes: usize,
    /// Live sessions bound to one user.
    pub max_sessions_per_user: usize,
    /// What a new session of a user at `max_sessions_per_user` does.
    pub per_user_policy: PerUserPolicy,
    /// Live sessions in the whole store.
    pub max_sessions: usize,
    /// Approximate bytes of all sessions together. Past it, sessions are evicted: anonymous
    /// before authenticated, the longest idle first.
    pub max_memory_bytes: usize,
    /// Sessions created per second, sustained (a token bucket refilled at this rate).
    pub create_rate: u32,
    /// Sessions that may be created at once before `create_rate` applies: the bucket's size.
    pub create_burst: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            default_idle_timeout: Duration::from_secs(30 * 60),
            default_absolute_timeout: Duration::from_secs(24 * 3600),
            max_idle_timeout: Duration::from_secs(7 * 24 * 3600),
            max_absolute_timeout: Duration::from_secs(90 * 24 * 3600),
            max_attributes: 256,
            max_key_bytes: 256,
            max_value_bytes: 64 * 1024,
            max_session_bytes: 1024 * 1024,
            max_user_id_bytes: 256,
            max_client_info_bytes: 1024,
            max_sessions_per_user: 100,
            per_user_policy: PerUserPolicy::Deny,
            max_sessions: 10_000_000,
            max_memory_bytes: 2 << 30,
            create_rate: 10_000,
            create_burst: 100_000,
        }
    }
}

/// What happens when a user at `max_sessions_per_user` starts another session
/// (OWASP ASVS 5.0 7.1.2: the application limits concurrent sessions per account).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PerUserPolicy {
    /// Refuse the new session with RESOURCE_EXHAUSTED.
    Deny,
    /// End the user's oldest session to make room.
    EvictOldest,
}

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
    /// Rotates the wheel part eviction samples start from.
    evict_from: AtomicUsize,
    /// `create_rate` and `create_burst`, on the store's clock.
    creates: RateLimiter<NotKeyed, InMemoryState, RateClock, NoOpMiddleware<Nanos>>,
    sink: Box<dyn EventSink>,
}

/// The memory budget all stores of one daemon share (one store per tenant): the daemon-wide
/// `max_memory_bytes`. Each store also keeps to its own cap; a store that needs room evicts
/// from itself.
#[derive(Debug)]
pub struct MemoryPool {
    used: AtomicUsize,
    cap: usize,
}

impl MemoryPool {
    /// A budget of `cap` bytes.
    pub fn new(cap: usize) -> Arc<Self> {
        Arc::new(MemoryPool {
            used: AtomicUsize::new(0),
            cap,
        })
    }

    /// Bytes held by all stores in the pool.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
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
                pool,
                evict_from: AtomicUsize::new(0),
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
        let user = self.check_user(req.user)?;
        self.check_client(&req.client)?;
        let mut attrs = Attributes::with_capacity(req.attributes.len());
        let mut bytes = base_bytes(user.as_deref(), &req.client);
        for (k, v) in req.attributes {
            self.check_attribute(&k, &v)?;
            if let Some(old) = attrs.get(&k) {
                bytes -= attribute_bytes(&k, old.len());
            }
            bytes += attribute_bytes(&k, v.len());
            attrs.insert(k, v);
        }
        self.check_shape(attrs.len(), bytes)?;
        self.take_create_token()?;

        let now = self.now();
        self.make_room(bytes, now)?;
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
        let inserted = self.in_user_index(session.user.as_ref(), |keys| {
            if let Some(keys) = keys {
                self.prune_and_check_room(keys, now)?;
                keys.push(session.key);
            }
            self.insert(&session, bytes);
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
    pub fn update(&self, id: &str, change: Change) -> Result<Session, StoreError> {
        self.check_writable()?;
        let key = SessionKey::parse(id)?;
        for (k, v) in &change.set {
            self.check_attribute(k, v)?;
        }
        for k in &change.remove {
            if k.len() > self.inner.limits.max_key_bytes {
                return Err(StoreError::over(
                    "a removed attribute key's length",
                    k.len(),
                    "max_key_bytes",
                    self.inner.limits.max_key_bytes,
                ));
            }
            if change.set.iter().any(|(s, _)| s == k) {
                return Err(StoreError::Invalid(
                    "an attribute key is in both set and remove".into(),
                ));
            }
        }
        let now = self.now();
        // Room for the worst case (every key new), made before this session's lock is taken:
        // eviction locks other sessions.
        let growth = change
            .set
            .iter()
            .map(|(k, v)| attribute_bytes(k, v.len()))
            .sum();
        self.make_room(growth, now)?;
        let mut entry = self
            .inner
            .sessions
            .get_mut(&key)
            .ok_or(StoreError::NotFound)?;
        if !entry.is_live(now) {
            return Err(StoreError::NotFound);
        }
        if let Some(expected) = change.expected_version {
            if expected != entry.version {
                return Err(StoreError::VersionMismatch {
                    expected,
                    current: entry.version,
                });
            }
        }
        // Work out the result's shape first, so a limit failure leaves the session untouched.
        let mut count = entry.attrs.len();
        let mut bytes = entry.bytes;
        let mut seen: Vec<&str> = Vec::with_capacity(change.set.len());
        for (k, v) in &change.set {
            if seen.contains(&k.as_str()) {
                return Err(StoreError::Invalid(
                    "an attribute key appears twice in set".into(),
                ));
            }
            seen.push(k);
            match entry.attrs.get(k) {
                Some(old) => {
                    bytes = bytes - attribute_bytes(k, old.len()) + attribute_bytes(k, v.len())
                }
                None => {
                    count += 1;
                    bytes += attribute_bytes(k, v.len());
                }
            }
        }
        for (i, k) in change.remove.iter().enumerate() {
            // A key listed twice is removed once.
            if change.remove[..i].contains(k) {
                continue;
            }
            if let Some(old) = entry.attrs.get(k) {
                count -= 1;
                bytes -= attribute_bytes(k, old.len());
            }
        }
        self.check_shape(count, bytes)?;

        let replaced = |k: &str| {
            change.remove.iter().any(|r| r == k) || change.set.iter().any(|(s, _)| s == k)
        };
        let kept: Vec<(&str, Bytes)> = entry.attrs.iter().filter(|(k, _)| !replaced(k)).collect();
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

    /// Moves a session to a fresh ID. Once this returns, the old ID is dead for every call,
    /// and every update acknowledged on it is in the new session.
    pub fn regenerate(&self, id: &str, rotation: Rotation) -> Result<Session, StoreError> {
        self.check_writable()?;
        let old = SessionKey::parse(id)?;
        let new_user = match rotation.user {
            None => None,
            Some(u) => Some(self.check_user(Some(u))?),
        };
        let now = self.now();
        let current_user = {
            let entry = self.inner.sessions.get(&old).ok_or(StoreError::NotFound)?;
            if !entry.is_live(now) {
                return Err(StoreError::NotFound);
            }
            entry.user.clone()
        };
        let user = new_user.unwrap_or_else(|| current_user.clone());
        let login = user != current_user;
        if let (true, Some(u)) = (login, &user) {
            self.ensure_user_room(u, now)?;
        }
        // The old key leaves and the new key arrives under the old user's index lock, so a
        // concurrent DestroyUserSessions sees either the old session or the new one. On a
        // login, the new key then joins the new user's index; in between the session is in
        // neither list, which DestroyUserSessions of either user can only see as "not mine".
        let session = self.in_user_index(current_user.as_ref(), |keys| {
            let (_, entry) = self
                .inner
                .sessions
                .remove_if(&old, |_, e| e.is_live(now))
                .ok_or(StoreError::NotFound)?;
            let session = self.rotated(*entry, old, &user, now, rotation.drop_attributes);
            if let Some(keys) = keys {
                keys.retain(|k| *k != old);
                if !login {
                    keys.push(session.key);
                }
            }
            Ok::<_, StoreError>(session)
        })?;
        if let (true, Some(u)) = (login, &user) {
            self.inner
                .users
                .entry(u.clone())
                .or_default()
                .push(session.key);
        }
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
        let user = self.check_listed_user(user)?;
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
        let user = self.check_listed_user(user)?;
        let except = except.map(SessionKey::parse).transpose()?;
        let now = self.now();
        let user: Arc<str> = Arc::from(user);
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

    fn insert(&self, session: &Session, bytes: usize) {
        self.inner
            .sessions
            .insert(session.key, Box::new(Entry::from_session(session, bytes)));
        self.inner.wheel.file(session.key, session.expires_at());
        self.add_bytes(bytes as isize);
        self.inner.sink.record(&Event::Created { session, bytes });
    }

    /// Evicts until `need` more bytes fit under `max_memory_bytes`. Candidates are the
    /// earliest-filed sessions in the expiry wheel (a sample of the longest idle); within a
    /// sample, dead sessions go first, then anonymous ones, then authenticated ones, each by
    /// deadline. Bounded work: gives up with RESOURCE_EXHAUSTED after a few samples.
    fn make_room(&self, need: usize, now: Millis) -> Result<(), StoreError> {
        let (own, pool) = (self.inner.limits.max_memory_bytes, &self.inner.pool);
        let fits = || {
            self.inner
                .bytes
                .load(Ordering::Relaxed)
                .saturating_add(need)
                <= own
                && pool.used().saturating_add(need) <= pool.cap
        };
        if fits() {
            return Ok(());
        }
        let cap = own.min(pool.cap);
        let exhausted = StoreError::Exhausted {
            limit: "max_memory_bytes",
            max: cap as u64,
            hint: "",
        };
        if need > cap {
            // Could never fit: evicting everyone else would not help.
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
                if fits() {
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
            if fits() {
                return Ok(());
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

    fn ensure_user_room(&self, user: &Arc<str>, now: Millis) -> Result<(), StoreError> {
        match self.inner.users.get_mut(user) {
            Some(mut keys) => self.prune_and_check_room(&mut keys, now),
            None => Ok(()),
        }
    }

    /// Drops dead keys from a user's list, then fails if the user is at the limit.
    fn prune_and_check_room(
        &self,
        keys: &mut Vec<SessionKey>,
        now: Millis,
    ) -> Result<(), StoreError> {
        let max = self.inner.limits.max_sessions_per_user;
        if keys.len() >= max {
            keys.retain(|k| self.inner.sessions.get(k).is_some_and(|e| e.is_live(now)));
        }
        match self.inner.limits.per_user_policy {
            _ if keys.len() < max => {}
            PerUserPolicy::Deny => {
                return Err(StoreError::Exhausted {
                    limit: "max_sessions_per_user",
                    max: max as u64,
                    hint: "; destroy one of the user's sessions first",
                })
            }
            PerUserPolicy::EvictOldest => {
                // Oldest by creation (login) time: the device the user is least likely to be
                // sitting at. Every key left after the prune is live, so each has a time.
                while keys.len() >= max {
                    let oldest = keys
                        .iter()
                        .enumerate()
                        .min_by_key(|(_, k)| self.inner.sessions.get(k).map_or(0, |e| e.created_at))
                        .map(|(i, _)| i);
                    let Some(i) = oldest else { break };
                    let key = keys.swap_remove(i);
                    if self
                        .remove_entry(key, now, EndCause::Evicted, |_| true)
                        .is_some()
                    {
                        tracing::info!(session = %key, "evicted a user's oldest session at max_sessions_per_user");
                    }
                }
            }
        }
        Ok(())
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
        self.inner
            .sessions
            .insert(s.key, Box::new(Entry::from_session(&s, bytes)));
        self.inner.wheel.file(s.key, s.expires_at());
        let delta = bytes as isize - entry.bytes as isize;
        self.add_bytes(delta);
        self.inner.sink.record(&Event::Regenerated {
            old,
            session: &s,
            bytes_delta: delta,
        });
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
        let (own, pool) = (&self.inner.bytes, &self.inner.pool.used);
        if delta >= 0 {
            own.fetch_add(delta as usize, Ordering::Relaxed);
            pool.fetch_add(delta as usize, Ordering::Relaxed);
        } else {
            own.fetch_sub(delta.unsigned_abs(), Ordering::Relaxed);
            pool.fetch_sub(delta.unsigned_abs(), Ordering::Relaxed);
        }
    }

    fn check_user(&self, user: Option<String>) -> Result<Option<Arc<str>>, StoreError> {
        match user {
            None => Ok(None),
            Some(u) if u.is_empty() => Ok(None),
            Some(u) => {
                let max = self.inner.limits.max_user_id_bytes;
                if u.len() > max {
                    return Err(StoreError::over(
                        "user_id's length",
                        u.len(),
                        "max_user_id_bytes",
                        max,
                    ));
                }
                Ok(Some(Arc::from(u)))
            }
        }
    }

    fn check_listed_user<'u>(&self, user: &'u str) -> Result<&'u str, StoreError> {
        if user.is_empty() {
            return Err(StoreError::Invalid("user_id must not be empty".into()));
        }
        let max = self.inner.limits.max_user_id_bytes;
        if user.len() > max {
            return Err(StoreError::over(
                "user_id's length",
                user.len(),
                "max_user_id_bytes",
                max,
            ));
        }
        Ok(user)
    }

    fn check_client(&self, client: &ClientInfo) -> Result<(), StoreError> {
        let got = client.ip.len() + client.user_agent.len();
        let max = self.inner.limits.max_client_info_bytes;
        if got > max {
            return Err(StoreError::over(
                "client ip plus user_agent length",
                got,
                "max_client_info_bytes",
                max,
            ));
        }
        Ok(())
    }

    fn check_attribute(&self, key: &str, value: &Bytes) -> Result<(), StoreError> {
        let l = &self.inner.limits;
        if key.is_empty() {
            return Err(StoreError::Invalid(
                "attribute keys must not be empty".into(),
            ));
        }
        if key.len() > l.max_key_bytes {
            return Err(StoreError::over(
                "an attribute key's length",
                key.len(),
                "max_key_bytes",
                l.max_key_bytes,
            ));
        }
        if value.len() > l.max_value_bytes {
            return Err(StoreError::over(
                format_args!("attribute {key:?}'s value size"),
                value.len(),
                "max_value_bytes",
                l.max_value_bytes,
            ));
        }
        Ok(())
    }

    fn check_shape(&self, attributes: usize, bytes: usize) -> Result<(), StoreError> {
        let l = &self.inner.limits;
        if attributes > l.max_attributes {
            return Err(StoreError::over(
                "the attribute count",
                attributes,
                "max_attributes",
                l.max_attributes,
            ));
        }
        if bytes > l.max_session_bytes {
            return Err(StoreError::over(
                "the session size",
                bytes,
                "max_session_bytes",
                l.max_session_bytes,
            ));
        }
        Ok(())
    }
}

/// Picks a requested timeout or the default, and checks it against the maximum.
fn pick_timeout(
    requested: Option<Duration>,
    default: Duration,
    max: Duration,
    field: &str,
    limit: &str,
) -> Result<Millis, StoreError> {
    let t = requested.unwrap_or(default);
    // Deadlines count whole milliseconds: anything shorter would be dead on arrival.
    if t.as_millis() == 0 {
        return Err(StoreError::Invalid(format!("{field} must be at least 1ms")));
    }
    if t > max {
        return Err(StoreError::Invalid(format!(
            "{field} of {} is over {limit} ({})",
            humantime::format_duration(t),
            humantime::format_duration(max)
        )));
    }
    Ok(t.as_millis() as Millis)
}

#[cfg(test)]
mod tests;
