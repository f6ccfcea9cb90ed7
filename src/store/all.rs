//! Tenant-wide operations: every session of the store at once.

use super::events::EndCause;
use super::{Store, StoreError};
use crate::session::SessionKey;

impl Store {
    /// Ends every live session (a leaked secret: log every user out); returns how many.
    ///
    /// Each session ends as a Destroy would end it, with its own event (so its own log
    /// record), under its own locks: writers to other sessions are never stalled for the
    /// whole sweep. Sessions created while it runs may survive it. The keys are listed
    /// first, 32 bytes per session, so the map is never locked while sessions are ended.
    /// Refused up front if the log cannot keep the changes; once under way it finishes (the
    /// log keeps every record through a disk failure, and the caller's sync reports one).
    pub(crate) fn destroy_all(&self) -> Result<u64, StoreError> {
        self.check_writable()?;
        let keys: Vec<SessionKey> = self.inner.sessions.iter().map(|e| *e.key()).collect();
        let mut destroyed = 0;
        for key in keys {
            let now = self.now();
            let ended = self.end_with(key, now, |e| e.is_live(now).then_some(EndCause::Destroyed));
            if ended.is_some() {
                destroyed += 1;
            }
        }
        Ok(destroyed)
    }
}

#[cfg(test)]
mod tests {
    use crate::clock::Clock;
    use crate::store::events::Discard;
    use crate::store::{Limits, NewSession, Store};

    #[test]
    fn destroy_all_ends_every_live_session_and_counts_them() {
        let clock = Clock::manual(1_000_000);
        let store = Store::new(Limits::default(), 4, clock, Box::new(Discard));
        let mut ids = Vec::new();
        for i in 0..50 {
            let user = (i % 3 == 0).then(|| format!("u{i}"));
            let s = store
                .create(NewSession {
                    user,
                    ..NewSession::default()
                })
                .unwrap();
            ids.push(s.key.encode());
        }
        assert_eq!(store.destroy_all(), Ok(50));
        for id in &ids {
            assert!(store.get(id, true).is_err());
        }
        assert_eq!(store.stats().sessions, 0);
        assert_eq!(store.stats().users, 0);
        assert_eq!(store.destroy_all(), Ok(0));
    }
}
