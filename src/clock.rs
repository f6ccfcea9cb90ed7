//! The one source of time. Production reads the wall clock; tests drive a manual clock, so
//! expiry tests advance time instead of sleeping.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::session::Millis;

/// A shared handle to the time source.
#[derive(Clone, Debug)]
pub struct Clock(Arc<Source>);

#[derive(Debug)]
enum Source {
    System,
    Manual(AtomicU64),
}

impl Clock {
    /// The wall clock. Deadlines are wall-clock times so they mean the same after a restart.
    pub fn system() -> Self {
        Clock(Arc::new(Source::System))
    }

    /// A clock that stands still until `advance` moves it.
    pub fn manual(start: Millis) -> Self {
        Clock(Arc::new(Source::Manual(AtomicU64::new(start))))
    }

    /// Milliseconds since the Unix epoch.
    pub fn now(&self) -> Millis {
        match &*self.0 {
            Source::System => SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as Millis),
            Source::Manual(now) => now.load(Ordering::Acquire),
        }
    }

    /// Moves a manual clock forward.
    ///
    /// # Panics
    /// On the system clock: only tests move time, and doing it in production is a bug.
    pub fn advance(&self, by: Duration) {
        match &*self.0 {
            Source::System => panic!("the system clock cannot be advanced"),
            Source::Manual(now) => {
                now.fetch_add(by.as_millis() as Millis, Ordering::AcqRel);
            }
        }
    }
}
