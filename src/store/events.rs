//! The one stream every state change flows through.
//!
//! The Store emits exactly one [`Event`] per change, while it still holds the lock that made the
//! change, so a consumer sees each session's events in the order they happened. Metrics, and
//! later the durable log and replication, hang off this stream instead of being called from
//! each handler, so no code path can forget one of them.

use crate::session::{Millis, Session, SessionKey};

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndCause {
    /// Destroy, or DestroyUserSessions.
    Destroyed,
    /// Its deadline passed; freed by the reaper or pruned on the way.
    Expired,
    /// Pushed out to make room (per-user or memory limits).
    Evicted,
}

/// A change to the store. Borrowed, so emitting one costs no allocation.
#[derive(Debug)]
pub enum Event<'a> {
    /// A new session, as stored.
    Created {
        /// The new session.
        session: &'a Session,
        /// Its approximate size in memory.
        bytes: usize,
    },
    /// An Update was applied.
    Updated {
        /// Which session.
        key: SessionKey,
        /// The attributes written.
        set: &'a [(String, bytes::Bytes)],
        /// The attribute keys removed.
        remove: &'a [String],
        /// The version after the update.
        version: u64,
        /// When it happened (it also slid the idle deadline).
        at: Millis,
        /// Change in approximate size.
        bytes_delta: isize,
    },
    /// The idle deadline slid (Get without peek, or Touch).
    Touched {
        /// Which session.
        key: SessionKey,
        /// The new last-access time.
        at: Millis,
    },
    /// A session moved to a fresh ID.
    Regenerated {
        /// The ID that is now dead.
        old: SessionKey,
        /// The session under its new ID, as stored.
        session: &'a Session,
        /// Change in approximate size.
        bytes_delta: isize,
    },
    /// A session ended.
    Ended {
        /// Which session.
        key: SessionKey,
        /// Why.
        cause: EndCause,
        /// How long it lived, from creation (or login) to now.
        lifetime: Millis,
        /// The size it freed.
        bytes: usize,
    },
}

/// A consumer of the event stream. Called synchronously under the session's lock, so an
/// implementation must be quick and must never call back into the Store.
pub trait EventSink: Send + Sync + 'static {
    /// Receives one event.
    fn record(&self, event: &Event<'_>);

    /// Whether this sink can take changes now. The Store asks before every write and refuses
    /// the write if any sink says no (the durable log while its disk fails, or once closed),
    /// so nothing is acknowledged that the sink cannot keep. Called on every write: it must
    /// cost no more than an atomic load when the answer is yes.
    fn accepting(&self) -> Result<(), Refused> {
        Ok(())
    }
}

/// Why a sink cannot take changes now; the text says what is wrong and is fit for a client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// A sink that drops everything: a store with no metrics and no log.
pub struct Discard;

impl EventSink for Discard {
    fn record(&self, _: &Event<'_>) {}
}

/// Fans events out to several sinks, in order.
pub struct Fanout(pub Vec<Box<dyn EventSink>>);

impl EventSink for Fanout {
    fn record(&self, event: &Event<'_>) {
        for sink in &self.0 {
            sink.record(event);
        }
    }

    fn accepting(&self) -> Result<(), Refused> {
        self.0.iter().try_for_each(|sink| sink.accepting())
    }
}
