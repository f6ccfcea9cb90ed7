//! The one mapping from Store errors to gRPC statuses.

use tonic::metadata::MetadataValue;
use tonic::{Code, Status};

use crate::store::StoreError;

/// Response metadata on every `ABORTED` version mismatch: the session's current version in
/// ASCII decimal, so a client can retry its compare-and-set without parsing the message.
/// A Pipeline operation's `Error` carries the same number in `current_version`.
pub(crate) const CURRENT_VERSION_HEADER: &str = "sessiond-current-version";

impl From<StoreError> for Status {
    fn from(e: StoreError) -> Self {
        let code = match &e {
            StoreError::BadId(_) | StoreError::Invalid(_) => Code::InvalidArgument,
            StoreError::NotFound | StoreError::RetryEnded(_) => Code::NotFound,
            StoreError::VersionMismatch { .. } | StoreError::InProgress => Code::Aborted,
            StoreError::Exhausted { .. } => Code::ResourceExhausted,
            StoreError::Unavailable(_) => Code::Unavailable,
        };
        // Store messages never hold a session ID or an attribute value, so they are safe to
        // hand back verbatim.
        let mut status = Status::new(code, e.to_string());
        if let StoreError::VersionMismatch { current, .. } = e {
            status
                .metadata_mut()
                .insert(CURRENT_VERSION_HEADER, MetadataValue::from(current));
        }
        status
    }
}

impl From<crate::tenant::Refusal> for Status {
    fn from(r: crate::tenant::Refusal) -> Self {
        // The message says what was missing or wrong, never the token.
        Status::unauthenticated(r.to_string())
    }
}

impl From<crate::persist::log::LogFailed> for Status {
    fn from(e: crate::persist::log::LogFailed) -> Self {
        Status::unavailable(e.to_string())
    }
}

/// A failure of the replicated group under the edge, by what the client should make of it.
/// The group sorts its own errors into these; the codes and the wording added for clients
/// are decided here, with the rest of the mapping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupFailure {
    /// No leader with a quorum can take the call now (an election, a partition, a stopped
    /// node): nothing was applied, retry shortly.
    Unavailable(String),
    /// The write may or may not have been applied (the leader changed under it).
    Indeterminate(String),
    /// Refused as it stands (a membership change while another runs, say).
    Rejected(String),
    /// A peer's message was malformed.
    Malformed(String),
}

impl From<GroupFailure> for Status {
    fn from(f: GroupFailure) -> Self {
        match f {
            GroupFailure::Unavailable(m) => Status::unavailable(m),
            // An indeterminate write is the case idempotency keys are for: say so.
            GroupFailure::Indeterminate(m) => Status::unavailable(format!(
                "{m}; retry with the same idempotency_key to learn its outcome"
            )),
            GroupFailure::Rejected(m) => Status::failed_precondition(m),
            GroupFailure::Malformed(m) => Status::invalid_argument(m),
        }
    }
}

/// A malformed request field the Store never saw (a negative duration, say).
pub(crate) fn invalid(field: &str, why: &str) -> Status {
    Status::invalid_argument(format!("{field} {why}"))
}

/// A response that would be larger than `max_message_bytes`, refused before the rest of it
/// was built.
pub(crate) fn too_large(max: usize) -> Status {
    Status::resource_exhausted(format!(
        "the response would be larger than max_message_bytes ({max}); ask for fewer or smaller sessions"
    ))
}

/// A Status as the `Error` message of a batch or pipeline result, with the current version
/// of a version mismatch lifted out of its metadata.
pub(crate) fn error(status: &Status) -> super::pb::Error {
    super::pb::Error {
        code: status.code() as i32,
        message: status.message().to_string(),
        current_version: status
            .metadata()
            .get(CURRENT_VERSION_HEADER)
            .and_then(|v| v.to_str().ok()?.parse().ok()),
    }
}
