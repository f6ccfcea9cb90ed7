//! What can go wrong in a Store call. Messages name the field or limit at fault and never carry
//! a session ID or an attribute value.

use crate::session::IdError;

/// A Store call's failure. `api::status` maps each variant to one gRPC code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The session ID is malformed. It never reached the map.
    #[error(transparent)]
    BadId(#[from] IdError),
    /// The request breaks a rule or a per-request size limit; the text names which.
    #[error("{0}")]
    Invalid(String),
    /// No live session has this ID: it never existed, was destroyed, or has expired.
    /// The three are deliberately indistinguishable.
    #[error("session not found")]
    NotFound,
    /// A compare-and-set Update found another version; nothing was changed.
    #[error("version mismatch: expected {expected}, session is at {current}")]
    VersionMismatch {
        /// What the caller expected.
        expected: u64,
        /// What the session holds.
        current: u64,
    },
    /// A capacity limit is reached; `limit` is the config setting's name.
    #[error("{limit} reached ({max}){hint}")]
    Exhausted {
        /// The name of the setting, as written in the config file.
        limit: &'static str,
        /// Its value.
        max: u64,
        /// What the caller can do about it, if anything.
        hint: &'static str,
    },
    /// A write's idempotency key was used before, and what that write made is gone since: the
    /// text says which ("created", "updated", "moved to"). NOT_FOUND, like any missing session.
    #[error("the session this idempotency key {0} has ended since")]
    RetryEnded(&'static str),
    /// Another request with the same idempotency key is still being served; retry it.
    #[error("a request with this idempotency key is still in progress; retry it")]
    InProgress,
    /// Writes cannot be kept now (the durable log cannot write, or the daemon is shutting
    /// down); reads still work. The text says why, naming the file and the OS error.
    #[error("{0}")]
    Unavailable(String),
}

impl StoreError {
    /// A size or count limit broken by the request itself.
    pub(crate) fn over(what: impl std::fmt::Display, got: usize, limit: &str, max: usize) -> Self {
        StoreError::Invalid(format!("{what} is {got}, over {limit} ({max})"))
    }
}
