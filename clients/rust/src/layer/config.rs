//! The layer's settings: the cookie's attributes, the timeouts new sessions ask for and the
//! codec, checked once, when [`Builder::build`] makes the layer, so a cookie that browsers
//! would silently drop is a startup error instead of a login that never sticks.

use std::sync::Arc;
use std::time::Duration;

use cookie::{Cookie, CookieBuilder, SameSite};

use super::codec::{Codec, Json};
use super::{SessiondLayer, Shared, DEFAULT_COOKIE};
use crate::SessionClient;

/// A setting that [`Builder::build`] refuses, naming the setting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The cookie name is empty or holds a character a cookie name cannot (RFC 6265 token:
    /// no spaces, controls, or any of `()<>@,;:\"/[]?={}`).
    #[error("cookie name {0:?} is not a valid cookie name (RFC 6265 token)")]
    CookieName(String),
    /// A `__Host-` cookie must be `Secure`, have `Path=/` and no `Domain`; browsers drop it
    /// otherwise.
    #[error("cookie {name:?}: a __Host- cookie needs Secure, Path=/ and no Domain ({problem})")]
    HostPrefix {
        /// The cookie name.
        name: String,
        /// Which of the three rules is broken.
        problem: &'static str,
    },
    /// A `__Secure-` cookie must be `Secure`; browsers drop it otherwise.
    #[error("cookie {0:?}: a __Secure- cookie needs Secure")]
    SecurePrefix(String),
    /// `SameSite=None` without `Secure` is rejected by browsers.
    #[error("SameSite=None needs Secure")]
    SameSiteNone,
    /// `Partitioned` without `Secure` is rejected by browsers.
    #[error("a Partitioned cookie needs Secure")]
    Partitioned,
    /// The cookie `Domain` is empty or holds a character a domain cannot.
    #[error("cookie domain {0:?} is not a host name")]
    Domain(String),
    /// The cookie `Path` does not start with `/` or holds `;` or a control character.
    #[error("cookie path {0:?} must start with / and hold no ';' or control character")]
    Path(String),
    /// A timeout is zero (sessiond would refuse every `Create`).
    #[error("{0} must be positive")]
    ZeroTimeout(&'static str),
}

/// The cookie's attributes.
#[derive(Debug, Clone)]
pub(crate) struct CookieConfig {
    pub(crate) name: String,
    same_site: SameSite,
    domain: Option<String>,
    path: String,
    secure: bool,
    http_only: bool,
    partitioned: bool,
    /// Send `Max-Age` following the session's expiry (otherwise: a browser-session cookie).
    pub(crate) persistent: bool,
}

impl Default for CookieConfig {
    fn default() -> Self {
        CookieConfig {
            name: DEFAULT_COOKIE.into(),
            same_site: SameSite::Lax,
            domain: None,
            path: "/".into(),
            secure: true,
            http_only: true,
            partitioned: false,
            persistent: false,
        }
    }
}

/// RFC 6265 `token`: visible ASCII but separators.
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b))
}

/// Whether `name` starts with `prefix`, as browsers match it (case-insensitively).
fn has_prefix(name: &str, prefix: &str) -> bool {
    name.get(..prefix.len())
        .is_some_and(|p| p.eq_ignore_ascii_case(prefix))
}

impl CookieConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if !is_token(&self.name) {
            return Err(ConfigError::CookieName(self.name.clone()));
        }
        if let Some(d) = &self.domain {
            let host = d.strip_prefix('.').unwrap_or(d);
            let ok = !host.is_empty()
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b));
            if !ok {
                return Err(ConfigError::Domain(d.clone()));
            }
        }
        if !self.path.starts_with('/')
            || self
                .path
                .bytes()
                .any(|b| b == b';' || b < 0x20 || b == 0x7f)
        {
            return Err(ConfigError::Path(self.path.clone()));
        }
        if has_prefix(&self.name, "__Host-") {
            let problem = if !self.secure {
                Some("Secure is off")
            } else if self.domain.is_some() {
                Some("a Domain is set")
            } else if self.path != "/" {
                Some("the Path is not /")
            } else {
                None
            };
            if let Some(problem) = problem {
                return Err(ConfigError::HostPrefix {
                    name: self.name.clone(),
                    problem,
                });
            }
        }
        if has_prefix(&self.name, "__Secure-") && !self.secure {
            return Err(ConfigError::SecurePrefix(self.name.clone()));
        }
        if self.same_site == SameSite::None && !self.secure {
            return Err(ConfigError::SameSiteNone);
        }
        if self.partitioned && !self.secure {
            return Err(ConfigError::Partitioned);
        }
        Ok(())
    }

    fn base(&self, value: &str) -> CookieBuilder<'static> {
        let mut c = Cookie::build((self.name.clone(), value.to_string()))
            .path(self.path.clone())
            .http_only(self.http_only)
            .secure(self.secure)
            .same_site(self.same_site);
        if let Some(d) = &self.domain {
            c = c.domain(d.clone());
        }
        if self.partitioned {
            c = c.partitioned(true);
        }
        c
    }

    /// The `Set-Cookie` value that gives the browser `id`; with `max_age`, a persistent cookie
    /// (whole seconds, rounded up: the browser may keep a dead ID a moment, which is harmless,
    /// but never drops a live one early).
    pub(crate) fn set(&self, id: &str, max_age: Option<Duration>) -> String {
        let mut c = self.base(id);
        if let Some(age) = max_age {
            let secs = age.as_secs() + u64::from(age.subsec_nanos() > 0);
            let secs = i64::try_from(secs).unwrap_or(i64::MAX);
            c = c.max_age(cookie::time::Duration::seconds(secs));
        }
        c.build().to_string()
    }

    /// The `Set-Cookie` value that deletes the cookie (same name, path and domain).
    pub(crate) fn clear(&self) -> String {
        let mut c = self.base("").build();
        c.make_removal();
        c.to_string()
    }
}

/// Settings for a [`SessiondLayer`], from [`SessiondLayer::builder`]. Every setting has a safe
/// default; [`build`](Builder::build) checks the combination.
///
/// ```no_run
/// use std::time::Duration;
/// use sessiond_client::layer::{SameSite, SessiondLayer};
/// use sessiond_client::SessionClient;
///
/// # async fn app() -> Result<(), Box<dyn std::error::Error>> {
/// let client = SessionClient::connect("http://127.0.0.1:7420").await?;
/// let layer = SessiondLayer::builder(client)
///     .cookie_name("__Secure-shop")
///     .domain("shop.example")          // sent to every subdomain too
///     .same_site(SameSite::Strict)
///     .persistent(true)                // survives a browser restart, until the session ends
///     .idle_timeout(Duration::from_secs(20 * 60))
///     .absolute_timeout(Duration::from_secs(7 * 24 * 3600))
///     .build()?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
#[must_use = "call build() to make the layer"]
pub struct Builder<C = Json> {
    client: SessionClient,
    codec: C,
    cookie: CookieConfig,
    idle_timeout: Option<Duration>,
    absolute_timeout: Option<Duration>,
}

impl<C> std::fmt::Debug for Builder<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Builder")
            .field("cookie", &self.cookie)
            .field("idle_timeout", &self.idle_timeout)
            .field("absolute_timeout", &self.absolute_timeout)
            .finish_non_exhaustive()
    }
}

impl Builder<Json> {
    pub(crate) fn new(client: SessionClient) -> Self {
        Builder {
            client,
            codec: Json,
            cookie: CookieConfig::default(),
            idle_timeout: None,
            absolute_timeout: None,
        }
    }
}

impl<C: Codec> Builder<C> {
    /// The cookie's name (default [`DEFAULT_COOKIE`], `__Host-sid`). A `__Host-` name needs
    /// `Secure`, `Path=/` and no `Domain`; a `__Secure-` name needs `Secure`.
    ///
    /// ```no_run
    /// # async fn f(client: sessiond_client::SessionClient) {
    /// let layer = sessiond_client::SessiondLayer::builder(client).cookie_name("sid").build();
    /// # }
    /// ```
    pub fn cookie_name(mut self, name: impl Into<String>) -> Self {
        self.cookie.name = name.into();
        self
    }

    /// `SameSite` (default `Lax`: sent on top-level navigations from other sites, not on their
    /// subrequests). `None` needs `Secure`.
    ///
    /// ```no_run
    /// # async fn f(client: sessiond_client::SessionClient) {
    /// use sessiond_client::layer::SameSite;
    /// let layer = sessiond_client::SessiondLayer::builder(client)
    ///     .same_site(SameSite::Strict)
    ///     .build();
    /// # }
    /// ```
    pub fn same_site(mut self, same_site: SameSite) -> Self {
        self.cookie.same_site = same_site;
        self
    }

    /// `Domain`: the browser sends the cookie to this host and its subdomains (default: none,
    /// only the host that set it). Not allowed with a `__Host-` name.
    ///
    /// ```no_run
    /// # async fn f(client: sessiond_client::SessionClient) {
    /// let layer = sessiond_client::SessiondLayer::builder(client)
    ///     .cookie_name("__Secure-sid")
    ///     .domain("example.com")
    ///     .build();
    /// # }
    /// ```
    pub fn domain(mut self, domain: impl Into<String>) -> Self {
        self.cookie.domain = Some(domain.into());
        self
    }

    /// `Path` (default `/`). Anything else is not allowed with a `__Host-` name.
    ///
    /// ```no_run
    /// # async fn f(client: sessiond_client::SessionClient) {
    /// let layer = sessiond_client::SessiondLayer::builder(client)
    ///     .cookie_name("__Secure-sid")
    ///     .path("/shop")
    ///     .build();
    /// # }
    /// ```
    pub fn path(mut self, path: impl Into<String>) -> Self {
        self.cookie.path = path.into();
        self
    }

    /// `Secure` (default true). Turn it off only for plain-HTTP development on a host other
    /// than `localhost` (browsers accept `Secure` cookies from `http://localhost`), with a name
    /// without the `__Host-` or `__Secure-` prefix.
    ///
    /// ```no_run
    /// # async fn f(client: sessiond_client::SessionClient) {
    /// let layer = sessiond_client::SessiondLayer::builder(client)
    ///     .cookie_name("dev-sid")
    ///     .secure(false)
    ///     .build();
    /// # }
    /// ```
    pub fn secure(mut self, secure: bool) -> Self {
        self.cookie.secure = secure;
        self
    }

    /// `HttpOnly` (default true: scripts cannot read the session ID).
    ///
    /// ```no_run
    /// # async fn f(client: sessiond_client::SessionClient) {
    /// let layer = sessiond_client::SessiondLayer::builder(client).http_only(true).build();
    /// # }
    /// ```
    pub fn http_only(mut self, http_only: bool) -> Self {
        self.cookie.http_only = http_only;
        self
    }

    /// `Partitioned` (CHIPS, default false): for an app embedded in other sites' pages, one
    /// cookie jar per top-level site. Needs `Secure`.
    ///
    /// ```no_run
    /// # async fn f(client: sessiond_client::SessionClient) {
    /// use sessiond_client::layer::SameSite;
    /// let layer = sessiond_client::SessiondLayer::builder(client)
    ///     .same_site(SameSite::None)
    ///     .partitioned(true)
    ///     .build();
    /// # }
    /// ```
    pub fn partitioned(mut self, partitioned: bool) -> Self {
        self.cookie.partitioned = partitioned;
        self
    }

    /// A persistent cookie (default false: a browser-session cookie, gone when the browser
    /// closes). Persistent, every `Set-Cookie` carries `Max-Age` = the session's `expires_at`
    /// less its last access, as sessiond reports them (so the app server's clock plays no
    /// part), and the cookie is sent again on each response whose request used the live
    /// session, so that `Max-Age` follows the sliding idle deadline.
    ///
    /// The price of following: a request that overlapped a login in another tab (so it used
    /// the pre-login session just before the login regenerated it) and answers after the
    /// login re-sends the pre-login ID. The browser then holds a dead ID and the user must
    /// log in again. A browser-session cookie is only ever sent with a new ID, so it never
    /// does this.
    ///
    /// ```no_run
    /// # async fn f(client: sessiond_client::SessionClient) {
    /// let layer = sessiond_client::SessiondLayer::builder(client).persistent(true).build();
    /// # }
    /// ```
    pub fn persistent(mut self, persistent: bool) -> Self {
        self.cookie.persistent = persistent;
        self
    }

    /// The idle timeout new sessions ask for (default: the server's, 30 min unless
    /// configured). The server refuses more than its `max_idle_timeout`.
    ///
    /// ```no_run
    /// # async fn f(client: sessiond_client::SessionClient) {
    /// use std::time::Duration;
    /// let layer = sessiond_client::SessiondLayer::builder(client)
    ///     .idle_timeout(Duration::from_secs(15 * 60))
    ///     .build();
    /// # }
    /// ```
    pub fn idle_timeout(mut self, idle: Duration) -> Self {
        self.idle_timeout = Some(idle);
        self
    }

    /// The absolute timeout new sessions ask for: the hard cap on a session's life, however
    /// active (default: the server's, 24 h unless configured). A login (`regenerate` binding a
    /// user) starts a fresh one.
    ///
    /// ```no_run
    /// # async fn f(client: sessiond_client::SessionClient) {
    /// use std::time::Duration;
    /// let layer = sessiond_client::SessiondLayer::builder(client)
    ///     .absolute_timeout(Duration::from_secs(8 * 3600))
    ///     .build();
    /// # }
    /// ```
    pub fn absolute_timeout(mut self, absolute: Duration) -> Self {
        self.absolute_timeout = Some(absolute);
        self
    }

    /// The codec for [`Session::get`](super::Session::get) and
    /// [`Session::insert`](super::Session::insert) (default [`Json`]). Handlers then take
    /// `Session<D>`.
    ///
    /// ```no_run
    /// # async fn f(client: sessiond_client::SessionClient) {
    /// use sessiond_client::layer::{Json, Session};
    /// type AppSession = Session<Json>; // name it once if you pick another codec
    /// let layer = sessiond_client::SessiondLayer::builder(client).codec(Json).build();
    /// # }
    /// ```
    pub fn codec<D: Codec>(self, codec: D) -> Builder<D> {
        Builder {
            client: self.client,
            codec,
            cookie: self.cookie,
            idle_timeout: self.idle_timeout,
            absolute_timeout: self.absolute_timeout,
        }
    }

    /// The layer, or the first setting browsers or sessiond would refuse.
    ///
    /// ```no_run
    /// # async fn f(client: sessiond_client::SessionClient) {
    /// use sessiond_client::layer::ConfigError;
    /// let err = sessiond_client::SessiondLayer::builder(client).domain("example.com").build();
    /// assert!(matches!(err, Err(ConfigError::HostPrefix { .. })));
    /// # }
    /// ```
    pub fn build(self) -> Result<SessiondLayer<C>, ConfigError> {
        self.cookie.validate()?;
        if self.idle_timeout == Some(Duration::ZERO) {
            return Err(ConfigError::ZeroTimeout("idle_timeout"));
        }
        if self.absolute_timeout == Some(Duration::ZERO) {
            return Err(ConfigError::ZeroTimeout("absolute_timeout"));
        }
        Ok(SessiondLayer {
            shared: Arc::new(Shared {
                client: self.client,
                codec: self.codec,
                cookie: self.cookie,
                idle_timeout: self.idle_timeout,
                absolute_timeout: self.absolute_timeout,
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(f: impl FnOnce(&mut CookieConfig)) -> Result<(), ConfigError> {
        let mut c = CookieConfig::default();
        f(&mut c);
        c.validate()
    }

    #[test]
    fn browsers_rules_are_checked() {
        assert_eq!(check(|_| {}), Ok(()));
        assert!(matches!(
            check(|c| c.domain = Some("example.com".into())),
            Err(ConfigError::HostPrefix { problem, .. }) if problem.contains("Domain")
        ));
        assert!(matches!(
            check(|c| c.path = "/app".into()),
            Err(ConfigError::HostPrefix { problem, .. }) if problem.contains("Path")
        ));
        assert!(matches!(
            check(|c| c.secure = false),
            Err(ConfigError::HostPrefix { problem, .. }) if problem.contains("Secure")
        ));
        // Browsers match the prefixes case-insensitively.
        assert!(matches!(
            check(|c| {
                c.name = "__HOST-x".into();
                c.secure = false
            }),
            Err(ConfigError::HostPrefix { .. })
        ));
        assert_eq!(
            check(|c| {
                c.name = "__Secure-x".into();
                c.secure = false
            }),
            Err(ConfigError::SecurePrefix("__Secure-x".into()))
        );
        assert_eq!(
            check(|c| {
                c.name = "sid".into();
                c.secure = false;
                c.same_site = SameSite::None
            }),
            Err(ConfigError::SameSiteNone)
        );
        assert_eq!(
            check(|c| {
                c.name = "sid".into();
                c.secure = false;
                c.partitioned = true
            }),
            Err(ConfigError::Partitioned)
        );
        assert_eq!(
            check(|c| {
                c.name = "sid".into();
                c.domain = Some(".example.com".into());
                c.path = "/app".into();
                c.secure = false
            }),
            Ok(())
        );
    }

    #[test]
    fn malformed_names_domains_and_paths_are_refused() {
        for bad in ["", "a b", "a;b", "a=b", "é"] {
            assert_eq!(
                check(|c| c.name = bad.into()),
                Err(ConfigError::CookieName(bad.into()))
            );
        }
        for bad in ["", "a;b.com", "a b.com"] {
            assert_eq!(
                check(|c| {
                    c.name = "sid".into();
                    c.domain = Some(bad.into())
                }),
                Err(ConfigError::Domain(bad.into()))
            );
        }
        for bad in ["app", "/a;b", "/a\nb"] {
            assert_eq!(
                check(|c| {
                    c.name = "sid".into();
                    c.path = bad.into()
                }),
                Err(ConfigError::Path(bad.into()))
            );
        }
    }

    #[test]
    fn max_age_rounds_up_to_whole_seconds() {
        let c = CookieConfig::default();
        let v = c.set("ID", Some(Duration::from_millis(1500)));
        assert!(v.contains("Max-Age=2"), "{v}");
        assert!(!c.set("ID", None).contains("Max-Age"));
        assert!(c.clear().contains("Max-Age=0"));
    }
}
