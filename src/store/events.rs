//! Effects, and the one stream every applied change flows through.
//!
//! A write is evaluated once into an [`Effect`]: the change itself, carrying every value it
//! needs (timestamps, generated IDs), and nothing of how it was decided. [`Store::apply`]
//! makes the change; the log stores the effect as its record, and recovery (later,
//! replicas) apply the same effects through the same code.
//!
//! Each applied effect reaches the Store's [`EventSink`] as one [`Event`], while the change
//! is still the newest of its session, so a consumer sees each session's changes in the
//! order they happened. Metrics and the durable log hang off this stream instead of being
//! called from each handler, so no code path can forget one of them.
//!
//! [`Store::apply`]: super::Store::apply

use std::sync::Arc;

use bytes::Bytes;

use crate::session::{Millis, Session, SessionKey};

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndCause {
    /// Destroy, DestroyUserSessions or DestroyAllSessions.
    Destroyed,
    /// Its deadline passed; freed by the reaper or pruned on the way.
    Expired,
    /// Pushed out to make room (per-user or memory limits).
    Evicted,
}

/// One change to the store, as decided: what the log stores and what apply makes happen.
///
/// A write made with an idempotency key carries it (`idempotency`), and applying the write
/// records what it did under that key (see [`super::idempotency`]): the record is replicated
/// state, like the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// A new session.
    Create {
        /// The session, as stored.
        session: Session,
        /// The request's idempotency key, if it had one.
        idempotency: Option<Arc<str>>,
    },
    /// A partial update onto version `version - 1`.
    Update {
        /// Which session.
        key: SessionKey,
        /// The attributes written.
        set: Vec<(String, Bytes)>,
        /// The attribute keys removed.
        remove: Vec<String>,
        /// The version after the update.
        version: u64,
        /// When it happened (it also slid the idle deadline).
        at: Millis,
        /// The request's idempotency key, if it had one.
        idempotency: Option<Arc<str>>,
    },
    /// The idle deadline slid (Get without peek, or Touch).
    Touch {
        /// Which session.
        key: SessionKey,
        /// The new last-access time.
        at: Millis,
    },
    /// A session moved to a fresh ID.
    Regenerate {
        /// The ID that is now dead.
        old: SessionKey,
        /// The session under its new ID, as stored.
        session: Session,
        /// The request's idempotency key, if it had one.
        idempotency: Option<Arc<str>>,
    },
    /// A session ended.
    End {
        /// Which session.
        key: SessionKey,
        /// Why.
        cause: EndCause,
        /// When.
        at: Millis,
    },
}

impl Effect {
    /// The time the change happened, as decided.
    pub fn at(&self) -> Millis {
        match self {
            Effect::Create { session: s, .. } | Effect::Regenerate { session: s, .. } => {
                s.last_access_at
            }
            Effect::Update { at, .. } | Effect::Touch { at, .. } | Effect::End { at, .. } => *at,
        }
    }

    /// The idempotency key the write carries, if any.
    pub fn idempotency(&self) -> Option<&Arc<str>> {
        match self {
            Effect::Create { idempotency, .. }
            | Effect::Update { idempotency, .. }
            | Effect::Regenerate { idempotency, .. } => idempotency.as_ref(),
            Effect::Touch { .. } | Effect::End { .. } => None,
        }
    }
}

/// An applied effect, as the sinks see it.
#[derive(Debug, Clone, Copy)]
pub struct Event<'a> {
    /// The change.
    pub effect: &'a Effect,
    /// What it did to the store's approximate size in bytes.
    pub bytes_delta: isize,
    /// For an `End`: how long the session had lived, from creation (or login) to its end.
    pub lifetime: Millis,
}

/// A consumer of the event stream. Called synchronously by the writer, so an implementation
/// must be quick and must never call back into the Store.
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
pub(crate) struct Fanout(pub Vec<Box<dyn EventSink>>);

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
