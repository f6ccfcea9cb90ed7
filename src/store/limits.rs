//! The limits the Store enforces, and the checks that apply them to a request.
//!
//! Every check here is part of evaluating a request: none runs when a change is applied.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::StoreError;
use crate::session::{ClientInfo, Millis};

/// The rules and limits the Store enforces. Built from the config.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Idle timeout when a Create does not ask for one.
    pub default_idle_timeout: Duration,
    /// Absolute timeout when a Create does not ask for one.
    pub default_absolute_timeout: Duration,
    /// The longest idle timeout a Create may ask for.
    pub max_idle_timeout: Duration,
    /// The longest absolute timeout a Create may ask for.
    pub max_absolute_timeout: Duration,
    /// Attributes per session.
    pub max_attributes: usize,
    /// Bytes in an attribute key.
    pub max_key_bytes: usize,
    /// Bytes in an attribute value.
    pub max_value_bytes: usize,
    /// Approximate bytes of one whole session: attributes, user, client info and overhead.
    pub max_session_bytes: usize,
    /// Bytes in a user ID.
    pub max_user_id_bytes: usize,
    /// Bytes of client info (IP plus user agent).
    pub max_client_info_bytes: usize,
    /// Live sessions bound to one user.
    pub max_sessions_per_user: usize,
    /// What a new session of a user at `max_sessions_per_user` does.
    pub per_user_policy: PerUserPolicy,
    /// Live sessions in the whole store.
    pub max_sessions: usize,
    /// Approximate bytes of all sessions together. Past it, sessions are evicted: anonymous
    /// before authenticated, the longest idle first.
    pub max_memory_bytes: usize,
    /// Sessions created per second, sustained (a token bucket refilled at this rate).
    pub create_rate: u32,
    /// Sessions that may be created at once before `create_rate` applies: the bucket's size.
    pub create_burst: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            default_idle_timeout: Duration::from_secs(30 * 60),
            default_absolute_timeout: Duration::from_secs(24 * 3600),
            max_idle_timeout: Duration::from_secs(7 * 24 * 3600),
            max_absolute_timeout: Duration::from_secs(90 * 24 * 3600),
            max_attributes: 256,
            max_key_bytes: 256,
            max_value_bytes: 64 * 1024,
            max_session_bytes: 1024 * 1024,
            max_user_id_bytes: 256,
            max_client_info_bytes: 1024,
            max_sessions_per_user: 100,
            per_user_policy: PerUserPolicy::Deny,
            max_sessions: 10_000_000,
            max_memory_bytes: 2 << 30,
            create_rate: 10_000,
            create_burst: 100_000,
        }
    }
}

/// What happens when a user at `max_sessions_per_user` starts another session
/// (OWASP ASVS 5.0 7.1.2: the application limits concurrent sessions per account).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PerUserPolicy {
    /// Refuse the new session with RESOURCE_EXHAUSTED.
    Deny,
    /// End the user's oldest session to make room.
    EvictOldest,
}

impl Limits {
    pub(crate) fn check_user(&self, user: Option<String>) -> Result<Option<Arc<str>>, StoreError> {
        match user {
            None => Ok(None),
            Some(u) if u.is_empty() => Ok(None),
            Some(u) => {
                let max = self.max_user_id_bytes;
                if u.len() > max {
                    return Err(StoreError::over(
                        "user_id's length",
                        u.len(),
                        "max_user_id_bytes",
                        max,
                    ));
                }
                Ok(Some(Arc::from(u)))
            }
        }
    }

    pub(crate) fn check_listed_user<'u>(&self, user: &'u str) -> Result<&'u str, StoreError> {
        if user.is_empty() {
            return Err(StoreError::Invalid("user_id must not be empty".into()));
        }
        let max = self.max_user_id_bytes;
        if user.len() > max {
            return Err(StoreError::over(
                "user_id's length",
                user.len(),
                "max_user_id_bytes",
                max,
            ));
        }
        Ok(user)
    }

    pub(crate) fn check_client(&self, client: &ClientInfo) -> Result<(), StoreError> {
        let got = client.ip.len() + client.user_agent.len();
        let max = self.max_client_info_bytes;
        if got > max {
            return Err(StoreError::over(
                "client ip plus user_agent length",
                got,
                "max_client_info_bytes",
                max,
            ));
        }
        Ok(())
    }

    pub(crate) fn check_attribute(&self, key: &str, value: &Bytes) -> Result<(), StoreError> {
        let l = self;
        if key.is_empty() {
            return Err(StoreError::Invalid(
                "attribute keys must not be empty".into(),
            ));
        }
        if key.len() > l.max_key_bytes {
            return Err(StoreError::over(
                "an attribute key's length",
                key.len(),
                "max_key_bytes",
                l.max_key_bytes,
            ));
        }
        if value.len() > l.max_value_bytes {
            return Err(StoreError::over(
                format_args!("attribute {key:?}'s value size"),
                value.len(),
                "max_value_bytes",
                l.max_value_bytes,
            ));
        }
        Ok(())
    }

    pub(crate) fn check_shape(&self, attributes: usize, bytes: usize) -> Result<(), StoreError> {
        let l = self;
        if attributes > l.max_attributes {
            return Err(StoreError::over(
                "the attribute count",
                attributes,
                "max_attributes",
                l.max_attributes,
            ));
        }
        if bytes > l.max_session_bytes {
            return Err(StoreError::over(
                "the session size",
                bytes,
                "max_session_bytes",
                l.max_session_bytes,
            ));
        }
        Ok(())
    }
}

/// Picks a requested timeout or the default, and checks it against the maximum.
pub(crate) fn pick_timeout(
    requested: Option<Duration>,
    default: Duration,
    max: Duration,
    field: &str,
    limit: &str,
) -> Result<Millis, StoreError> {
    let t = requested.unwrap_or(default);
    // Deadlines count whole milliseconds: anything shorter would be dead on arrival.
    if t.as_millis() == 0 {
        return Err(StoreError::Invalid(format!("{field} must be at least 1ms")));
    }
    if t > max {
        return Err(StoreError::Invalid(format!(
            "{field} of {} is over {limit} ({})",
            humantime::format_duration(t),
            humantime::format_duration(max)
        )));
    }
    Ok(t.as_millis() as Millis)
}
