//! The background task that frees expired sessions.
//!
//! It wakes once per `interval`, drains what the expiry wheel says is due in batches of at
//! most `batch` keys, and yields to the runtime between batches so it never stalls requests.
//! Reads never depend on it: they check deadlines themselves.

use std::time::{Duration, Instant};

use tokio::sync::watch;

use std::sync::atomic::Ordering;

use super::events::EndCause;
use super::{Reaped, Store, WHEEL_SWEEP_SLACK};
use crate::ticker::Ticker;

/// Something that wants to hear about each reaper step (metrics).
pub trait ReaperObserver: Send + Sync + 'static {
    /// One batch finished: what it did and how long it took.
    fn batch(&self, reaped: &Reaped, took: Duration);
}

impl ReaperObserver for () {
    fn batch(&self, _: &Reaped, _: Duration) {}
}

/// Runs until `shutdown` turns true (or its sender is dropped).
pub async fn run(
    store: Store,
    interval: Duration,
    batch: usize,
    observer: impl ReaperObserver,
    shutdown: watch::Receiver<bool>,
) {
    let mut ticker = Ticker::new(interval, shutdown);
    while ticker.tick().await {
        loop {
            let started = Instant::now();
            let reaped = store.reap(batch);
            observer.batch(&reaped, started.elapsed());
            if reaped.expired > 0 {
                tracing::debug!(expired = reaped.expired, refiled = reaped.refiled, "reaped");
            }
            if !reaped.more || ticker.stopping() {
                break;
            }
            tokio::task::yield_now().await;
        }
    }
    tracing::debug!("reaper stopped");
}

impl Store {
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
            } else if self
                .end_with(key, now, |e| (!e.is_live(now)).then_some(EndCause::Expired))
                .is_some()
            {
                out.expired += 1;
            }
        }
        let (swept, sweeping) = self.sweep_wheel(max);
        out.swept = swept;
        out.more |= sweeping;
        out
    }

    /// Sweeps up to `max` stale keys out of the wheel, once they outnumber the live ones.
    /// Returns how many it swept and whether a sweep is still under way.
    pub(crate) fn sweep_wheel(&self, max: usize) -> (usize, bool) {
        // A session that ended early (destroyed, regenerated, evicted) leaves its key in the
        // wheel until the slot comes due, days away; under churn those would pile up. Once
        // they outnumber the live keys, sweep them out, `max` keys a step.
        let wheel = &self.inner.wheel;
        let sessions = self.inner.count.load(Ordering::Relaxed);
        if !wheel.sweeping() && wheel.len() > sessions.saturating_mul(2) + WHEEL_SWEEP_SLACK {
            wheel.start_sweep();
        }
        if !wheel.sweeping() {
            return (0, false);
        }
        let swept = wheel.sweep(max, |k| self.inner.sessions.contains_key(k));
        (swept, wheel.sweeping())
    }
}
