//! The Store: the one place where session rules live.
//!
//! Sessions sit in a sharded `DashMap` keyed by the binary session key. A second map indexes
//! sessions by user ([`users`]), and a lazy timing wheel ([`wheel`]) indexes them by deadline
//! for the [`reaper`].
//!
//! Every write is evaluated once ([`evaluate`]: rules, limits, compare-and-set, the clock)
//! into an [`Effect`], and the effect is applied ([`apply`]): the one code that changes
//! sessions, shared by live writes and recovery. Each applied change reaches the sinks (the
//! metrics, the durable log) as one [`events::Event`].
//!
//! - [`limits`]: the limits and the request checks;
//! - [`entry`]: one stored session and its size;
//! - [`room`]: the memory pool, the create rate and eviction;
//! - [`users`]: the user index, and the lock order every path keeps;
//! - [`all`]: tenant-wide operations;
//! - [`idempotency`]: idempotency keys, so a retried write gets its original result.
//!
//! Every read checks the deadline itself, so correctness never rests on the reaper keeping
//! up; the reaper only frees memory.

mod all;
mod apply;
mod entry;
mod error;
mod evaluate;
pub mod events;
mod idempotency;
mod limits;
mod packed;
mod plan;
pub(crate) mod reaper;
mod room;
mod users;
mod wheel;

use std::hash::RandomState;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

pub use self::apply::Applied;
use self::entry::Entry;
pub(crate) use self::entry::{attribute_bytes, size_of};
pub use self::entry::{ATTRIBUTE_OVERHEAD_BYTES, SESSION_OVERHEAD_BYTES, TOUCH_REPORT_FRACTION};
pub use self::error::StoreError;
pub use self::events::Effect;
use self::events::EventSink;
pub use self::idempotency::{IdempotencyRecord, IdempotentOp};
pub use self::limits::{LimitOverrides, Limits, LimitsError, PerUserPolicy};
pub use self::plan::Plan;
pub use self::room::MemoryPool;
use self::room::RateClock;
use self::users::USER_LATCHES;
use self::wheel::Wheel;
use crate::clock::Clock;
use crate::session::{ClientInfo, KeyHasherBuilder, Millis, Session, SessionKey};

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
    /// Makes a retry safe: a Create with a key seen within `idempotency_window` returns the
    /// session that key created (see [`idempotency`]).
    pub idempotency_key: Option<String>,
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
    /// Makes a retry safe: an Update of the same session with a key seen within
    /// `idempotency_window` returns the session as it is, without a second change.
    pub idempotency_key: Option<String>,
}

/// What a Regenerate asks for.
#[derive(Debug, Clone, Default)]
pub struct Rotation {
    /// `Some`: bind this user ("" means anonymous). `None`: keep the current user.
    pub user: Option<String>,
    /// Start the new ID with no attributes.
    pub drop_attributes: bool,
    /// Makes a retry safe: a Regenerate of the same (old) ID with a key seen within
    /// `idempotency_window` returns the session under the ID it moved to.
    pub idempotency_key: Option<String>,
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
    /// The newest time carried by an effect applied through [`Store::apply`].
    floor: AtomicU64,
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
    /// Idempotency records and the keys of live writes in progress.
    idempotency: Mutex<idempotency::Keys>,
    sink: Box<dyn EventSink>,
}

/// The expiry wheel is swept once it holds more than twice as many keys as there are
/// sessions, plus this many (so a small store is not swept over a handful of keys).
const WHEEL_SWEEP_SLACK: usize = 4096;

/// Granularity of the expiry wheel. Reads are exact regardless; this only sets how soon after
/// its deadline a dead session's memory is freed.
pub(crate) const WHEEL_GRANULARITY: Duration = Duration::from_secs(1);

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
                floor: AtomicU64::new(0),
                bytes: AtomicUsize::new(0),
                reserved,
                pool,
                evict_from: AtomicUsize::new(0),
                latches: (0..USER_LATCHES).map(|_| Mutex::new(())).collect(),
                latch_hasher: RandomState::new(),
                creates,
                idempotency: Mutex::default(),
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

    /// Calls `f` with every session in memory (live or awaiting the reaper). For snapshots,
    /// which run beside live traffic: a shard's lock is held only to list its keys (32
    /// bytes each), then each session is copied under its own brief read lock (its
    /// attributes are shared, not copied), and `f` runs with no lock held. Holding a shard while `f` encodes and writes would stall every
    /// writer to it, and the runtime thread each writer blocks, for the whole shard.
    pub fn for_each_session(&self, mut f: impl FnMut(Session)) {
        let keys: Vec<SessionKey> = self.inner.sessions.iter().map(|e| *e.key()).collect();
        for key in keys {
            let Some(session) = self.inner.sessions.get(&key).map(|e| e.snapshot(key, true)) else {
                continue;
            };
            f(session);
        }
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

    /// The clock's time, but never earlier than the newest time an applied effect carries:
    /// a replica that becomes leader never decides with a clock behind its predecessor's.
    fn now(&self) -> Millis {
        self.inner
            .clock
            .now()
            .max(self.inner.floor.load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests;
