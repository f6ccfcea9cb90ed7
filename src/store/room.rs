//! Room for sessions: the memory pool the tenants share, the create rate, and eviction.
//!
//! Everything here is evaluation: whether a change fits, and which sessions go to make it
//! fit. Evictions are `End` effects, applied like any other.

use std::sync::atomic::{AtomicIsize, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use governor::nanos::Nanos;

use super::events::EndCause;
use super::{Inner, Store, StoreError};
use crate::clock::Clock;
use crate::session::{Millis, SessionKey};

/// Sessions looked at per eviction round under `max_memory_bytes`.
const EVICTION_SAMPLE: usize = 64;

/// Eviction rounds one call may run before it gives up with RESOURCE_EXHAUSTED.
const EVICTION_ROUNDS: usize = 8;

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
    pub(crate) fn join(&self, own: usize) -> usize {
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
pub(crate) struct RateClock(pub(crate) Clock);

impl governor::clock::Clock for RateClock {
    type Instant = Nanos;

    fn now(&self) -> Nanos {
        Nanos::from(Duration::from_millis(self.0.now()))
    }
}

/// One of `max_sessions`, claimed by a Create that has not stored its session yet.
pub(crate) struct SlotClaim<'a>(Option<&'a AtomicUsize>);

impl SlotClaim<'_> {
    /// The session is stored: the slot is its count now.
    pub(crate) fn used(mut self) {
        self.0 = None;
    }
}

impl Drop for SlotClaim<'_> {
    fn drop(&mut self) {
        if let Some(count) = self.0 {
            count.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Store {
    /// Whether `need` more bytes fit: under the store's own `max_memory_bytes`, and either
    /// within its guaranteed share of the pool or within what the pool has left.
    pub(crate) fn fits(&self, need: usize) -> bool {
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
    pub(crate) fn make_room(&self, need: usize, now: Millis) -> Result<Millis, StoreError> {
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
                // Ended only if it is as it was when ranked: a session touched meanwhile
                // (dead then, live now) stays.
                let ended = self.end_with(key, now, |e| (e.is_live(now) == live).then_some(cause));
                if ended.is_some() {
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
    pub(crate) fn take_create_token(&self) -> Result<(), StoreError> {
        self.inner
            .creates
            .check()
            .map_err(|_| StoreError::Exhausted {
                limit: "create_rate",
                max: u64::from(self.inner.limits.create_rate),
                hint: " sessions per second; retry shortly",
            })
    }

    /// Claims one of `max_sessions` for a Create. The claim is the count the new session
    /// will hold; dropped unused (the Create failed), it gives the slot back.
    pub(crate) fn claim_slot(&self) -> Result<SlotClaim<'_>, StoreError> {
        let max = self.inner.limits.max_sessions;
        self.inner
            .count
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .map(|_| SlotClaim(Some(&self.inner.count)))
            .map_err(|_| StoreError::Exhausted {
                limit: "max_sessions",
                max: max as u64,
                hint: "",
            })
    }

    pub(crate) fn add_bytes(&self, delta: isize) {
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
