//! What a [`Session`](super::Session) call can fail with, and how that answers an HTTP
//! request.

use axum::response::{IntoResponse, Response};
use http::StatusCode;

use super::codec::CodecError;
use crate::Error;

/// What a [`Session`](super::Session) call can fail with: sessiond's answer, or a value the
/// codec could not turn into bytes or back. Messages name the attribute key and the type,
/// never the session ID or a value: a codec's own message can quote the stored data (serde's
/// "invalid type: string \"alice@example.com\"..."), so it is only the error's `source()`,
/// for a caller that chooses to show it.
///
/// As an axum response (`IntoResponse`), it is a 503 when sessiond could not be used and a
/// 500 otherwise, with a short body that gives nothing away; log the error itself if you
/// need the detail.
///
/// ```no_run
/// use sessiond_client::layer::{Session, SessionError};
///
/// async fn handler(session: Session) -> Result<String, SessionError> {
///     match session.get::<u32>("visits").await {
///         Err(SessionError::Decode { key, .. }) => Ok(format!("{key} holds something else")),
///         other => Ok(format!("{:?}", other?)),
///     }
/// }
/// ```
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// sessiond refused the call or could not be reached.
    #[error(transparent)]
    Store(#[from] Error),
    /// The stored value of `key` is not what the caller asked for (another type, another
    /// codec, or bytes written raw).
    #[error("session value {key:?} does not decode as {type_name}")]
    Decode {
        /// The attribute.
        key: String,
        /// The type asked for (`std::any::type_name`).
        type_name: &'static str,
        /// The codec's reason; it may quote the stored value.
        source: CodecError,
    },
    /// The value for `key` cannot be encoded (for JSON: a map whose keys are not strings).
    #[error("session value {key:?} does not encode as {type_name}")]
    Encode {
        /// The attribute.
        key: String,
        /// The value's type (`std::any::type_name`).
        type_name: &'static str,
        /// The codec's reason; it may quote the value.
        source: CodecError,
    },
}

impl IntoResponse for SessionError {
    fn into_response(self) -> Response {
        match self {
            SessionError::Store(Error::Unavailable(_) | Error::ResourceExhausted(_)) => {
                (StatusCode::SERVICE_UNAVAILABLE, "session store unavailable").into_response()
            }
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "session error").into_response(),
        }
    }
}
