//! The pace of the daemon's periodic background work (the reaper, the snapshotter, the TLS
//! watch): a step every period until shutdown.
//!
//! Each of them used to write the same loop by hand; here it is written once, so they all
//! keep the same two promises: a step that overruns delays the next one instead of being
//! followed by a burst of catch-up steps, and a task stops at its next tick once the stop
//! signal turns true or its sender is gone (the daemon is gone), never in the middle of a
//! step.

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::{Interval, MissedTickBehavior};

/// Ticks every period until `stop` turns true:
/// `while ticker.tick().await { one step }`.
pub struct Ticker {
    interval: Interval,
    stop: watch::Receiver<bool>,
}

impl Ticker {
    /// Ticks at once, then every `every`, until `stop` turns true (or its sender is dropped).
    pub fn new(every: Duration, stop: watch::Receiver<bool>) -> Self {
        let mut interval = tokio::time::interval(every);
        interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Ticker { interval, stop }
    }

    /// Waits for the next tick: `true` to run a step, `false` once stopped.
    pub async fn tick(&mut self) -> bool {
        tokio::select! {
            // A tick due at the moment of stopping is not taken: stopping wins.
            biased;
            _ = self.stop.wait_for(|stop| *stop) => false,
            _ = self.interval.tick() => true,
        }
    }

    /// Whether the stop signal has turned true, for a step that works in batches and should
    /// not start another once the daemon is stopping.
    pub fn stopping(&self) -> bool {
        *self.stop.borrow()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Long enough that only the first tick, which is due at once, is ever taken.
    const HOUR: Duration = Duration::from_secs(3600);

    #[tokio::test]
    async fn ticks_at_once_then_stops_when_told() {
        let (stop, rx) = watch::channel(false);
        let mut ticker = Ticker::new(HOUR, rx);
        assert!(ticker.tick().await);
        assert!(!ticker.stopping());
        stop.send(true).unwrap();
        assert!(ticker.stopping());
        assert!(!ticker.tick().await);
        assert!(!ticker.tick().await);
    }

    #[tokio::test]
    async fn stopping_wins_over_a_tick_that_is_due() {
        let (_stop, rx) = watch::channel(true);
        let mut ticker = Ticker::new(HOUR, rx);
        assert!(!ticker.tick().await);
    }

    #[tokio::test]
    async fn a_dropped_sender_stops_it_too() {
        let (stop, rx) = watch::channel(false);
        let mut ticker = Ticker::new(HOUR, rx);
        drop(stop);
        assert!(!ticker.tick().await);
    }
}
