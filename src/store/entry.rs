//! One stored session, and the one formula for its size.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;

use super::packed::PackedClient;
use crate::session::{deadline, Attributes, ClientInfo, Millis, Session, SessionKey};

/// Fixed per-session overhead counted towards `max_session_bytes` and the bytes gauge:
/// the map entry, the key and the bookkeeping fields, rounded up.
pub const SESSION_OVERHEAD_BYTES: usize = 192;

/// Fixed per-attribute overhead: the two length prefixes in the packed buffer, rounded up.
pub const ATTRIBUTE_OVERHEAD_BYTES: usize = 8;

/// A touch is reported as an event once the idle deadline has moved by `1 / this` of the
/// idle window since the last reported touch.
pub const TOUCH_REPORT_FRACTION: u64 = 4;

/// What one attribute adds to a session's size.
pub(crate) fn attribute_bytes(key: &str, value_len: usize) -> usize {
    key.len() + value_len + ATTRIBUTE_OVERHEAD_BYTES
}

/// The approximate size of a session: what `max_session_bytes`, `max_memory_bytes` and the
/// bytes gauge count. The one formula; everything else adds or takes away attributes.
pub(crate) fn session_bytes<'a>(
    user: Option<&str>,
    client: &ClientInfo,
    attributes: impl IntoIterator<Item = (&'a str, usize)>,
) -> usize {
    SESSION_OVERHEAD_BYTES
        + user.map_or(0, str::len)
        + client.ip.len()
        + client.user_agent.len()
        + attributes
            .into_iter()
            .map(|(k, len)| attribute_bytes(k, len))
            .sum::<usize>()
}

/// The size of `s`.
pub(crate) fn size_of(s: &Session) -> usize {
    session_bytes(
        s.user.as_deref(),
        &s.client,
        s.attributes.slices().map(|(k, v)| (k, v.len())),
    )
}

/// One stored session. `last_access` is atomic so that a sliding read needs only the shard's
/// read lock.
pub(crate) struct Entry {
    pub(crate) user: Option<Arc<str>>,
    pub(crate) attrs: Attributes,
    pub(crate) version: u64,
    pub(crate) created_at: Millis,
    last_access: AtomicU64,
    /// The last access reported as a `Touch` effect (see [`Entry::slide_and_report`]).
    reported_access: AtomicU64,
    pub(crate) idle_timeout: Millis,
    pub(crate) absolute: Millis,
    client: PackedClient,
    pub(crate) bytes: usize,
}

/// The attributes an Update leaves, worked out before anything changes: evaluation checks
/// their shape against the limits, and apply stores them.
pub(crate) struct Reshaped {
    /// The attributes after the update.
    pub(crate) attrs: Attributes,
    /// How many.
    pub(crate) count: usize,
    /// The session's size after the update.
    pub(crate) bytes: usize,
}

impl Entry {
    /// An entry holding `s`, with its user handed over (not cloned).
    pub(crate) fn new(s: &Session, user: Option<Arc<str>>, bytes: usize) -> Self {
        Entry {
            user,
            attrs: s.attributes.clone(),
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

    pub(crate) fn expires_at(&self) -> Millis {
        deadline(
            self.last_access.load(Ordering::Relaxed),
            self.idle_timeout,
            self.absolute,
        )
    }

    pub(crate) fn is_live(&self, now: Millis) -> bool {
        now < self.expires_at()
    }

    /// Slides the idle deadline to `at`. `fetch_max`, so racing readers never move it back.
    /// The one change a reader makes; replay of a `Touch` makes it the same way.
    pub(crate) fn slide(&self, at: Millis) {
        self.last_access.fetch_max(at, Ordering::Relaxed);
    }

    /// Slides, and says whether this touch is worth a `Touch` effect: only once the deadline
    /// has moved by a quarter of the idle window since the last reported one, so the durable
    /// log gets a record per session every few minutes of activity, not one per read. Losing
    /// the unreported touches in a crash (or a failover) only shortens an idle deadline by
    /// that much.
    pub(crate) fn slide_and_report(&self, now: Millis) -> bool {
        self.slide(now);
        let reported = self.reported_access.load(Ordering::Relaxed);
        now.saturating_sub(reported) >= self.idle_timeout / TOUCH_REPORT_FRACTION
            && self
                .reported_access
                .compare_exchange(reported, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    /// Records that a `Touch` at `at` has been applied from elsewhere (replay).
    pub(crate) fn reported(&self, at: Millis) {
        self.reported_access.fetch_max(at, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self, key: SessionKey, with_attributes: bool) -> Session {
        Session {
            key,
            user: self.user.clone(),
            attributes: if with_attributes {
                self.attrs.clone()
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

    /// The attributes after setting `set` and removing `removed` keys: one pass over the
    /// stored ones. `set` holds each key once.
    pub(crate) fn reshaped(
        &self,
        set: &[(String, Bytes)],
        removed: impl Fn(&str) -> bool,
    ) -> Reshaped {
        let mut bytes = self.bytes
            + set
                .iter()
                .map(|(k, v)| attribute_bytes(k, v.len()))
                .sum::<usize>();
        let mut kept: Vec<(&str, &[u8])> = Vec::with_capacity(self.attrs.len());
        for (k, v) in self.attrs.slices() {
            if removed(k) {
                bytes -= attribute_bytes(k, v.len());
            } else {
                kept.push((k, v));
            }
        }
        let count = kept.len() + set.len();
        let attrs = Attributes::pack(
            kept.iter()
                .copied()
                .chain(set.iter().map(|(k, v)| (k.as_str(), v.as_ref()))),
        );
        Reshaped {
            attrs,
            count,
            bytes,
        }
    }
}
