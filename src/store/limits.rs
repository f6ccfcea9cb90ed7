//! The limits the Store enforces, and the checks that apply them to a request.
//!
//! [`Limits`] owns its settings: their defaults, their config keys and their validation.
//! A tenant's [`LimitOverrides`] replace some of them. Every request check here is part of
//! evaluating a request: none runs when a change is applied.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::StoreError;
use crate::session::MAX_KEY_BYTES;
use crate::session::{ClientInfo, Millis};

/// The highest `create_rate`: one session per nanosecond.
pub(crate) const MAX_CREATE_RATE: u32 = 1_000_000_000;

/// The rules and limits the Store enforces: the one place each limit is defined, defaulted
/// (in `Default`) and checked ([`Limits::validate`]).
///
/// The daemon's `Config` embeds it flattened, so each field is a top-level config key under
/// its serde name (which is also the name errors use) and a `SESSIOND_*` environment
/// variable. Unknown keys are skipped here, since `Config` refuses them itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Limits {
    /// Idle timeout for sessions created without one.
    #[serde(rename = "idle_timeout", with = "humantime_serde")]
    pub default_idle_timeout: Duration,
    /// Absolute timeout for sessions created without one: the hard cap on a session's life.
    #[serde(rename = "absolute_timeout", with = "humantime_serde")]
    pub default_absolute_timeout: Duration,
    /// The longest idle timeout a Create may ask for.
    #[serde(with = "humantime_serde")]
    pub max_idle_timeout: Duration,
    /// The longest absolute timeout a Create may ask for.
    #[serde(with = "humantime_serde")]
    pub max_absolute_timeout: Duration,
    /// Attributes per session.
    pub max_attributes: usize,
    /// Bytes in one attribute key.
    pub max_key_bytes: usize,
    /// Bytes in one attribute value.
    pub max_value_bytes: usize,
    /// Approximate bytes of one whole session: attributes, user, client info and overhead.
    pub max_session_bytes: usize,
    /// Bytes in a user ID.
    pub max_user_id_bytes: usize,
    /// Bytes of client info (IP plus user agent) per session.
    pub max_client_info_bytes: usize,
    /// Live sessions one user may hold.
    pub max_sessions_per_user: usize,
    /// At `max_sessions_per_user`: `deny` refuses the new session, `evict-oldest` ends the
    /// user's oldest session to make room.
    pub per_user_policy: PerUserPolicy,
    /// Live sessions in the store.
    pub max_sessions: usize,
    /// Approximate bytes of all sessions together (the `sessiond_session_bytes` figure, not
    /// RSS). Past it, sessions are evicted: anonymous before authenticated, the longest idle
    /// first. The daemon-wide setting is a pool every tenant's store shares.
    pub max_memory_bytes: usize,
    /// Sessions created per second, sustained (a token bucket refilled at this rate).
    pub create_rate: u32,
    /// Sessions that may be created at once before `create_rate` applies: the bucket's size.
    pub create_burst: u32,
    /// Bytes in one idempotency key (Create, Update and Regenerate may carry one).
    pub max_idempotency_key_bytes: usize,
    /// How long a keyed write is remembered: a retry with its key within this gets the
    /// original result. Part of the replicated state's rules, so every node of a group must
    /// have the same value.
    #[serde(with = "humantime_serde")]
    pub idempotency_window: Duration,
    /// Idempotency keys remembered per store; past it the oldest is forgotten early. Their
    /// memory (about 250 bytes plus the key each) is not counted in `max_memory_bytes`: this
    /// bounds it instead. Like the window, the same on every node of a group.
    pub max_idempotency_keys: usize,
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
            max_idempotency_key_bytes: 128,
            idempotency_window: Duration::from_secs(10 * 60),
            max_idempotency_keys: 1_000_000,
        }
    }
}

/// What happens when a user at `max_sessions_per_user` starts another session
/// (OWASP ASVS 5.0 7.1.2: the application limits concurrent sessions per account).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PerUserPolicy {
    /// Refuse the new session with RESOURCE_EXHAUSTED.
    Deny,
    /// End the user's oldest session to make room.
    EvictOldest,
}

/// A limit that cannot work, named by its setting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{setting} {problem}")]
pub struct LimitsError {
    /// The setting at fault, as written in the config file.
    pub setting: &'static str,
    /// What is wrong with it: the rest of a sentence that starts with its name.
    pub problem: String,
}

impl Limits {
    /// Checks what the types alone cannot: every limit leaves room for a session, and the
    /// defaults are within the maximums.
    pub fn validate(&self) -> Result<(), LimitsError> {
        let bad = |setting, problem: &str| {
            Err(LimitsError {
                setting,
                problem: problem.into(),
            })
        };
        for (setting, d) in [
            ("idle_timeout", self.default_idle_timeout),
            ("absolute_timeout", self.default_absolute_timeout),
            ("idempotency_window", self.idempotency_window),
        ] {
            if d.is_zero() {
                return bad(setting, "must be longer than zero");
            }
        }
        if self.default_idle_timeout > self.max_idle_timeout {
            return bad("idle_timeout", "must not exceed max_idle_timeout");
        }
        if self.default_absolute_timeout > self.max_absolute_timeout {
            return bad("absolute_timeout", "must not exceed max_absolute_timeout");
        }
        for (setting, n) in [
            ("max_attributes", self.max_attributes),
            ("max_key_bytes", self.max_key_bytes),
            ("max_value_bytes", self.max_value_bytes),
            ("max_session_bytes", self.max_session_bytes),
            ("max_user_id_bytes", self.max_user_id_bytes),
            ("max_sessions_per_user", self.max_sessions_per_user),
            ("max_sessions", self.max_sessions),
            ("max_memory_bytes", self.max_memory_bytes),
            ("create_rate", self.create_rate as usize),
            ("create_burst", self.create_burst as usize),
            ("max_idempotency_key_bytes", self.max_idempotency_key_bytes),
            ("max_idempotency_keys", self.max_idempotency_keys),
        ] {
            if n == 0 {
                return bad(setting, "must be at least 1");
            }
        }
        if self.max_key_bytes > MAX_KEY_BYTES {
            return bad("max_key_bytes", &format!("must be at most {MAX_KEY_BYTES}"));
        }
        if self.create_rate > MAX_CREATE_RATE {
            return bad("create_rate", &format!("must be at most {MAX_CREATE_RATE}"));
        }
        if self.idempotency_window.as_millis() == 0 {
            return bad("idempotency_window", "must be at least 1ms");
        }
        Ok(())
    }
}

/// A tenant's own limits: each one set replaces the daemon-wide limit of the same name.
/// The keys sit in the tenant's `[[tenants]]` table beside its name and credentials.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct LimitOverrides {
    /// Replaces [`Limits::max_sessions`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_sessions: Option<usize>,
    /// Replaces [`Limits::max_sessions_per_user`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_sessions_per_user: Option<usize>,
    /// Replaces [`Limits::per_user_policy`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_user_policy: Option<PerUserPolicy>,
    /// Replaces [`Limits::max_session_bytes`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_session_bytes: Option<usize>,
    /// Replaces [`Limits::max_memory_bytes`], within the daemon-wide pool.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_memory_bytes: Option<usize>,
    /// Replaces [`Limits::create_rate`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub create_rate: Option<u32>,
    /// Replaces [`Limits::create_burst`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub create_burst: Option<u32>,
}

impl LimitOverrides {
    /// `base` with every limit set here replaced. The result is checked like any other
    /// `Limits`, with [`Limits::validate`].
    pub fn apply(&self, base: &Limits) -> Limits {
        // Destructured, so a new override cannot be left out here.
        let LimitOverrides {
            max_sessions,
            max_sessions_per_user,
            per_user_policy,
            max_session_bytes,
            max_memory_bytes,
            create_rate,
            create_burst,
        } = *self;
        Limits {
            max_sessions: max_sessions.unwrap_or(base.max_sessions),
            max_sessions_per_user: max_sessions_per_user.unwrap_or(base.max_sessions_per_user),
            per_user_policy: per_user_policy.unwrap_or(base.per_user_policy),
            max_session_bytes: max_session_bytes.unwrap_or(base.max_session_bytes),
            max_memory_bytes: max_memory_bytes.unwrap_or(base.max_memory_bytes),
            create_rate: create_rate.unwrap_or(base.create_rate),
            create_burst: create_burst.unwrap_or(base.create_burst),
            ..base.clone()
        }
    }
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

    /// A write's idempotency key: `None` for none ("" on the wire), else at most
    /// `max_idempotency_key_bytes`.
    pub(crate) fn check_idempotency_key(
        &self,
        key: Option<&str>,
    ) -> Result<Option<Arc<str>>, StoreError> {
        match key {
            None | Some("") => Ok(None),
            Some(k) if k.len() > self.max_idempotency_key_bytes => Err(StoreError::over(
                "idempotency_key's length",
                k.len(),
                "max_idempotency_key_bytes",
                self.max_idempotency_key_bytes,
            )),
            Some(k) => Ok(Some(Arc::from(k))),
        }
    }

    /// `idempotency_window` in milliseconds.
    pub(crate) fn idempotency_window_ms(&self) -> Millis {
        self.idempotency_window.as_millis() as Millis
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_rejects_each_bad_limit_naming_the_setting() {
        Limits::default().validate().unwrap();
        // How to spoil a limit, the setting the error must name, and what it must say.
        type Case = (fn(&mut Limits), &'static str, &'static str);
        let cases: Vec<Case> = vec![
            (
                |l| l.default_idle_timeout = Duration::ZERO,
                "idle_timeout",
                "must be longer than zero",
            ),
            (
                |l| l.default_absolute_timeout = Duration::ZERO,
                "absolute_timeout",
                "must be longer than zero",
            ),
            (
                |l| l.default_idle_timeout = l.max_idle_timeout + Duration::from_secs(1),
                "idle_timeout",
                "must not exceed max_idle_timeout",
            ),
            (
                |l| l.default_absolute_timeout = l.max_absolute_timeout + Duration::from_secs(1),
                "absolute_timeout",
                "must not exceed max_absolute_timeout",
            ),
            (
                |l| l.max_attributes = 0,
                "max_attributes",
                "must be at least 1",
            ),
            (
                |l| l.max_key_bytes = 0,
                "max_key_bytes",
                "must be at least 1",
            ),
            (
                |l| l.max_key_bytes = MAX_KEY_BYTES + 1,
                "max_key_bytes",
                "must be at most 65535",
            ),
            (
                |l| l.max_value_bytes = 0,
                "max_value_bytes",
                "must be at least 1",
            ),
            (
                |l| l.max_session_bytes = 0,
                "max_session_bytes",
                "must be at least 1",
            ),
            (
                |l| l.max_user_id_bytes = 0,
                "max_user_id_bytes",
                "must be at least 1",
            ),
            (
                |l| l.max_sessions_per_user = 0,
                "max_sessions_per_user",
                "must be at least 1",
            ),
            (|l| l.max_sessions = 0, "max_sessions", "must be at least 1"),
            (
                |l| l.max_memory_bytes = 0,
                "max_memory_bytes",
                "must be at least 1",
            ),
            (|l| l.create_rate = 0, "create_rate", "must be at least 1"),
            (
                |l| l.create_rate = MAX_CREATE_RATE + 1,
                "create_rate",
                "must be at most 1000000000",
            ),
            (|l| l.create_burst = 0, "create_burst", "must be at least 1"),
            (
                |l| l.max_idempotency_key_bytes = 0,
                "max_idempotency_key_bytes",
                "must be at least 1",
            ),
            (
                |l| l.max_idempotency_keys = 0,
                "max_idempotency_keys",
                "must be at least 1",
            ),
            (
                |l| l.idempotency_window = Duration::ZERO,
                "idempotency_window",
                "must be longer than zero",
            ),
            (
                |l| l.idempotency_window = Duration::from_micros(500),
                "idempotency_window",
                "must be at least 1ms",
            ),
        ];
        for (spoil, setting, problem) in cases {
            let mut limits = Limits::default();
            spoil(&mut limits);
            let err = limits.validate().unwrap_err();
            assert_eq!((err.setting, err.problem.as_str()), (setting, problem));
            assert_eq!(err.to_string(), format!("{setting} {problem}"));
        }
        // The edges themselves are fine.
        Limits {
            default_idle_timeout: Duration::from_secs(7 * 24 * 3600),
            max_key_bytes: MAX_KEY_BYTES,
            create_rate: MAX_CREATE_RATE,
            create_burst: 1,
            ..Limits::default()
        }
        .validate()
        .unwrap();
    }

    #[test]
    fn overrides_replace_only_the_limits_they_set() {
        let daemon_wide = Limits {
            max_attributes: 7,
            create_rate: 50,
            create_burst: 500,
            ..Limits::default()
        };
        assert_eq!(LimitOverrides::default().apply(&daemon_wide), daemon_wide);
        let own = LimitOverrides {
            max_sessions: Some(10),
            max_sessions_per_user: Some(2),
            per_user_policy: Some(PerUserPolicy::EvictOldest),
            max_session_bytes: Some(4096),
            max_memory_bytes: Some(1 << 20),
            create_burst: Some(5),
            create_rate: None,
        };
        assert_eq!(
            own.apply(&daemon_wide),
            Limits {
                max_sessions: 10,
                max_sessions_per_user: 2,
                per_user_policy: PerUserPolicy::EvictOldest,
                max_session_bytes: 4096,
                max_memory_bytes: 1 << 20,
                create_burst: 5,
                ..daemon_wide.clone()
            }
        );
        // What comes out is checked like any limits.
        let zero = LimitOverrides {
            create_burst: Some(0),
            ..LimitOverrides::default()
        };
        let err = zero.apply(&daemon_wide).validate().unwrap_err();
        assert_eq!(err.to_string(), "create_burst must be at least 1");
    }
}
