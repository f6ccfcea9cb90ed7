//! One tenant's metric handles, made in one call ([`Telemetry::tenant`]) and handed out by
//! part: to the store (as its event sink), the log, the snapshot task, the reaper and the
//! guess watch. Each part is a plain struct of handles already labelled with the tenant, so
//! no owner registers a metric, knows a name or sees the registry.

use std::time::Duration;

use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};

use super::names::*;
use super::Telemetry;
use crate::session::Millis;
use crate::store::events::{Effect, EndCause, Event, EventSink};
use crate::store::reaper::ReaperObserver;
use crate::store::Reaped;

/// Every metric handle of one tenant, a part for each owner.
pub(crate) struct TenantMetrics {
    /// The store's event sink: sessions created, updated, regenerated and ended.
    pub sessions: SessionMetrics,
    /// The durable log's.
    pub log: LogMetrics,
    /// The snapshot task's.
    pub snapshots: SnapshotMetrics,
    /// The reaper's.
    pub reaper: ReaperMetrics,
    /// The guess watch's.
    pub guesses: GuessMetrics,
}

impl Telemetry {
    /// `tenant`'s metric handles, each labelled with its name. Without persistence
    /// (`durable` false) the log and snapshot parts record nothing and are not registered:
    /// a tenant with no log shows no log metrics.
    pub fn tenant(&self, tenant: &str, durable: bool) -> TenantMetrics {
        let t = || tenant.to_string();
        self.register(|| TenantMetrics {
            sessions: SessionMetrics {
                created: counter!(SESSIONS_CREATED, TENANT => t()),
                updated: counter!(SESSIONS_UPDATED, TENANT => t()),
                destroyed: counter!(SESSIONS_DESTROYED, TENANT => t()),
                expired: counter!(SESSIONS_EXPIRED, TENANT => t()),
                evicted: counter!(SESSIONS_EVICTED, TENANT => t()),
                regenerated: counter!(SESSIONS_REGENERATED, TENANT => t()),
                lifetime: histogram!(SESSION_LIFETIME, TENANT => t()),
            },
            log: if durable {
                LogMetrics {
                    segment_bytes: gauge!(LOG_BYTES, TENANT => t()),
                    fsync: histogram!(FSYNC, TENANT => t()),
                    write_errors: counter!(LOG_WRITE_ERRORS, TENANT => t()),
                    writable: gauge!(LOG_WRITABLE, TENANT => t()),
                }
            } else {
                LogMetrics::noop()
            },
            snapshots: if durable {
                SnapshotMetrics {
                    written: counter!(SNAPSHOTS, TENANT => t()),
                    age: gauge!(SNAPSHOT_AGE, TENANT => t()),
                }
            } else {
                SnapshotMetrics::noop()
            },
            reaper: ReaperMetrics {
                runs: counter!(REAPER_RUNS, TENANT => t()),
                lag: gauge!(REAPER_LAG, TENANT => t()),
                batch: histogram!(REAPER_BATCH, TENANT => t()),
            },
            guesses: GuessMetrics {
                misses: counter!(SESSION_ID_MISSES, TENANT => t()),
                flagged: counter!(GUESSING_PEERS, TENANT => t()),
            },
        })
    }
}

/// Counts sessions as they change. Plain atomic handles: no lock, no allocation.
pub(crate) struct SessionMetrics {
    created: Counter,
    updated: Counter,
    destroyed: Counter,
    expired: Counter,
    evicted: Counter,
    regenerated: Counter,
    lifetime: Histogram,
}

impl EventSink for SessionMetrics {
    fn record(&self, event: &Event<'_>) {
        match event.effect {
            Effect::Create { .. } => self.created.increment(1),
            Effect::Update { .. } => self.updated.increment(1),
            Effect::Touch { .. } => {}
            Effect::Regenerate { .. } => self.regenerated.increment(1),
            Effect::End { cause, .. } => {
                match cause {
                    EndCause::Destroyed => self.destroyed.increment(1),
                    EndCause::Expired => self.expired.increment(1),
                    EndCause::Evicted => self.evicted.increment(1),
                }
                self.lifetime.record(seconds(event.lifetime));
            }
        }
    }
}

/// What the durable log records.
pub struct LogMetrics {
    /// Bytes in the current segment.
    pub segment_bytes: Gauge,
    /// fsync latency.
    pub fsync: Histogram,
    /// Failed writes and fsyncs (first failures and failed retries).
    pub write_errors: Counter,
    /// 1 while the log writes, 0 while it fails (and writes are refused).
    pub writable: Gauge,
}

impl LogMetrics {
    /// Handles that record nothing, for tests and tools.
    pub fn noop() -> Self {
        LogMetrics {
            segment_bytes: Gauge::noop(),
            fsync: Histogram::noop(),
            write_errors: Counter::noop(),
            writable: Gauge::noop(),
        }
    }
}

/// What the snapshot task records.
pub(crate) struct SnapshotMetrics {
    /// Snapshots written.
    pub written: Counter,
    /// Seconds since the last snapshot (or since start, before the first).
    pub age: Gauge,
}

impl SnapshotMetrics {
    /// Handles that record nothing.
    pub fn noop() -> Self {
        SnapshotMetrics {
            written: Counter::noop(),
            age: Gauge::noop(),
        }
    }
}

/// Records each reaper batch.
pub(crate) struct ReaperMetrics {
    runs: Counter,
    lag: Gauge,
    batch: Histogram,
}

impl ReaperObserver for ReaperMetrics {
    fn batch(&self, reaped: &Reaped, took: Duration) {
        self.runs.increment(1);
        self.batch.record(took.as_secs_f64());
        self.lag.set(reaped.lag.map_or(0.0, seconds));
    }
}

/// What the guess watch records.
pub struct GuessMetrics {
    /// Lookups of well-formed session IDs that matched no live session.
    pub misses: Counter,
    /// Times a peer crossed the threshold within the window.
    pub flagged: Counter,
}

impl GuessMetrics {
    /// Handles that record nothing, for tests and tools.
    pub fn noop() -> Self {
        GuessMetrics {
            misses: Counter::noop(),
            flagged: Counter::noop(),
        }
    }
}

fn seconds(ms: Millis) -> f64 {
    ms as f64 / 1000.0
}
