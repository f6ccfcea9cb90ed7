//! The background task that frees expired sessions.
//!
//! It wakes once per `interval`, drains what the expiry wheel says is due in batches of at
//! most `batch` keys, and yields to the runtime between batches so it never stalls requests.
//! Reads never depend on it: they check deadlines themselves.

use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::{Reaped, Store};
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
