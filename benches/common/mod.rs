//! What the benches share.

use sessiond::store::Limits;

/// Limits for benches: no creation-rate or memory limit in the way of millions of sessions.
pub fn limits() -> Limits {
    Limits {
        create_rate: 1_000_000_000,
        create_burst: 1_000_000_000,
        max_sessions: 100_000_000,
        max_memory_bytes: 1 << 40,
        ..Limits::default()
    }
}
