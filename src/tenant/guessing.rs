//! Detection (not defence) of session-ID guessing: lookups of well-formed IDs that match no
//! live session are counted per peer in a fixed window, and a peer that crosses the threshold
//! is logged once per window, with its address and count but never the IDs it tried.
//!
//! With 242 random bits in every ID guessing cannot succeed; what this catches is a client
//! replaying stolen or stale cookies at scale, or a scanner, which operators want to hear about.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use dashmap::DashMap;

use crate::observe::GuessMetrics;

/// Peers tracked at once; past it, windows that have ended are dropped to make room, so a
/// flood of source addresses cannot grow the map without bound.
pub(crate) const MAX_TRACKED_PEERS: usize = 100_000;

/// The per-peer miss counter.
pub struct GuessWatch {
    threshold: u32,
    window: Duration,
    peers: DashMap<IpAddr, (Instant, u32)>,
    metrics: GuessMetrics,
}

impl GuessWatch {
    /// Flags a peer with `threshold` misses within `window`.
    pub fn new(threshold: u32, window: Duration, metrics: GuessMetrics) -> Self {
        GuessWatch {
            threshold,
            window,
            peers: DashMap::new(),
            metrics,
        }
    }

    /// Records one miss by `peer` (unknown when the transport gives no address).
    pub(crate) fn miss(&self, peer: Option<IpAddr>) {
        self.metrics.misses.increment(1);
        let Some(ip) = peer else { return };
        let now = Instant::now();
        if self.peers.len() >= MAX_TRACKED_PEERS {
            self.peers
                .retain(|_, (start, _)| now.duration_since(*start) < self.window);
        }
        let mut entry = self.peers.entry(ip).or_insert((now, 0));
        let (start, count) = &mut *entry;
        if now.duration_since(*start) >= self.window {
            *start = now;
            *count = 0;
        }
        *count += 1;
        if *count == self.threshold {
            self.metrics.flagged.increment(1);
            tracing::warn!(
                peer = %ip,
                misses = *count,
                window = ?self.window,
                "many lookups of unknown session IDs from one peer: stolen-cookie replay or ID guessing?"
            );
        }
    }

    /// Misses of `peer` in its current window. For tests.
    pub fn count(&self, peer: IpAddr) -> u32 {
        self.peers.get(&peer).map_or(0, |e| e.1)
    }
}
