//! Tenants: apps sharing one daemon, each with its own store (sessions, user index, quotas),
//! log and metrics label, and the credentials that say which tenant a request is.
//!
//! Without `[[tenants]]` in the config there is one open tenant, `default`, and no
//! credentials are asked for (single-tenant mode). With tenants, a request is a tenant when:
//!
//! - its `authorization: Bearer TOKEN` metadata hashes (SHA-256) to the tenant's
//!   `token_sha256`. The presented hash is compared with every tenant's in constant time, so
//!   neither the answer's timing nor its content says how close a guess was; or
//! - its connection's verified client certificate has the tenant's `client_subject`.
//!
//! Tenants never share a store, so an ID of one is NOT_FOUND for every other, and
//! ListUserSessions cannot cross them. They share the daemon-wide `max_memory_bytes`
//! ([`memory_pool`]): each is guaranteed an equal share of it, and a tenant with no
//! `max_memory_bytes` of its own holds at most that share, so no tenant can fill the pool
//! and make another evict its own users.
//!
//! [`guessing`] holds each tenant's watch for peers looking up many unknown session IDs.

pub mod guessing;

use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use subtle::ConstantTimeEq;

use self::guessing::GuessWatch;
use crate::config::{Config, TenantConfig};
use crate::persist::log::{FsyncPolicy, Log};
use crate::store::{Limits, MemoryPool, Store};

/// The name of the one tenant in single-tenant mode.
pub(crate) const DEFAULT_TENANT: &str = "default";

/// One tenant's share of the daemon.
pub struct Tenant {
    /// Its name, as in the config, metrics labels and logs.
    pub name: Arc<str>,
    /// Its sessions.
    pub store: Store,
    /// Lookups of unknown IDs by its clients, per peer.
    pub guesses: GuessWatch,
    /// Its log, when replies must wait for the disk (`fsync = always`).
    pub durable_log: Option<Arc<Log>>,
}

impl Tenant {
    /// A tenant over `store`. With a `log` under `fsync = always`, mutations reply only once
    /// their record is on disk.
    pub fn new(
        name: &str,
        store: Store,
        guesses: GuessWatch,
        log: Option<Arc<Log>>,
    ) -> Arc<Tenant> {
        Arc::new(Tenant {
            name: Arc::from(name),
            store,
            guesses,
            durable_log: log.filter(|l| l.policy() == FsyncPolicy::Always),
        })
    }
}

/// How a tenant is recognised.
pub(crate) enum Credential {
    /// SHA-256 of a bearer token.
    TokenSha256([u8; 32]),
    /// Subject (or common name) of a verified client certificate.
    ClientSubject(String),
}

/// Why a request has no tenant. The messages name what was wrong, never the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Refusal {
    /// No token and no client certificate.
    #[error("credentials required: send `authorization: Bearer <token>` metadata or a client certificate")]
    Missing,
    /// An `authorization` value that is not `Bearer <token>`.
    #[error("the authorization metadata must be `Bearer <token>`")]
    Malformed,
    /// A token no tenant has.
    #[error("the bearer token matches no tenant")]
    UnknownToken,
    /// A client certificate no tenant has.
    #[error("the client certificate's subject matches no tenant")]
    UnknownCertificate,
}

/// All tenants, and who is who.
pub struct Tenants {
    all: Vec<Arc<Tenant>>,
    /// Token hashes and subjects, by index into `all`. Empty: single-tenant mode.
    credentials: Vec<(Credential, usize)>,
}

impl Tenants {
    /// Single-tenant mode: `tenant` is everyone's.
    pub fn open(tenant: Arc<Tenant>) -> Self {
        Tenants {
            all: vec![tenant],
            credentials: Vec::new(),
        }
    }

    /// Several tenants, each with its credentials.
    pub(crate) fn with_credentials(tenants: Vec<(Arc<Tenant>, Vec<Credential>)>) -> Self {
        let mut all = Vec::new();
        let mut credentials = Vec::new();
        for (i, (tenant, creds)) in tenants.into_iter().enumerate() {
            all.push(tenant);
            credentials.extend(creds.into_iter().map(|c| (c, i)));
        }
        Tenants { all, credentials }
    }

    /// Every tenant, in config order.
    pub fn all(&self) -> &[Arc<Tenant>] {
        &self.all
    }

    /// Whether requests must carry credentials.
    pub(crate) fn requires_credentials(&self) -> bool {
        !self.credentials.is_empty()
    }

    /// The tenant of a request with this `authorization` value and these verified client
    /// certificates (leaf first). A token, when present, decides; otherwise the certificate.
    pub(crate) fn authenticate(
        &self,
        authorization: Option<&[u8]>,
        certs: Option<&[CertificateDer<'static>]>,
    ) -> Result<&Arc<Tenant>, Refusal> {
        if !self.requires_credentials() {
            return Ok(&self.all[0]);
        }
        if let Some(value) = authorization {
            let token = value
                .strip_prefix(b"Bearer ")
                .filter(|t| !t.is_empty())
                .ok_or(Refusal::Malformed)?;
            return self.by_token(token).ok_or(Refusal::UnknownToken);
        }
        match certs.and_then(|c| c.first()) {
            Some(leaf) => self.by_certificate(leaf).ok_or(Refusal::UnknownCertificate),
            None => Err(Refusal::Missing),
        }
    }

    fn by_token(&self, token: &[u8]) -> Option<&Arc<Tenant>> {
        let presented = ring::digest::digest(&ring::digest::SHA256, token);
        // Look at every tenant's hash, whatever matches, so time says nothing.
        let mut found = None;
        for (cred, i) in &self.credentials {
            if let Credential::TokenSha256(hash) = cred {
                if bool::from(hash.ct_eq(presented.as_ref())) {
                    found = Some(*i);
                }
            }
        }
        found.map(|i| &self.all[i])
    }

    fn by_certificate(&self, leaf: &CertificateDer<'_>) -> Option<&Arc<Tenant>> {
        let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
        let subject = cert.subject();
        let full = subject.to_string();
        let common_names: Vec<&str> = subject
            .iter_common_name()
            .filter_map(|cn| cn.as_str().ok())
            .collect();
        let matches = |want: &str| {
            want == full || common_names.contains(&want.strip_prefix("CN=").unwrap_or(want))
        };
        self.credentials.iter().find_map(|(cred, i)| match cred {
            Credential::ClientSubject(want) if matches(want) => Some(&self.all[*i]),
            _ => None,
        })
    }
}

/// The daemon-wide memory pool: `max_memory_bytes`, shared by every tenant's store, with an
/// equal share guaranteed to each (see [`MemoryPool`]).
pub(crate) fn memory_pool(config: &Config) -> Arc<MemoryPool> {
    MemoryPool::shared(config.limits.max_memory_bytes, config.tenants.len().max(1))
}

/// A tenant's limits: its own quotas over the daemon-wide settings. Without a
/// `max_memory_bytes` of its own, it gets an equal share of the daemon-wide one, the share
/// [`memory_pool`] guarantees it.
pub(crate) fn tenant_limits(config: &Config, t: &TenantConfig) -> Limits {
    let mut limits = t.limits.apply(&config.limits);
    if t.limits.max_memory_bytes.is_none() {
        limits.max_memory_bytes = memory_pool(config).share();
    }
    limits
}

/// Parses the hex of a `token_sha256` setting (validated by the config already).
pub(crate) fn parse_token_sha256(hex: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    if hex.len() != 64 {
        return None;
    }
    for (i, pair) in hex.as_bytes().chunks(2).enumerate() {
        let s = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Clock;
    use crate::observe::GuessMetrics;
    use crate::store::events::Discard;
    use crate::store::{LimitOverrides, Limits};

    fn tenant(name: &str) -> Arc<Tenant> {
        let guesses = GuessWatch::new(
            100,
            std::time::Duration::from_secs(60),
            GuessMetrics::noop(),
        );
        let store = Store::new(Limits::default(), 8, Clock::manual(0), Box::new(Discard));
        Tenant::new(name, store, guesses, None)
    }

    fn sha256_hex(token: &str) -> String {
        ring::digest::digest(&ring::digest::SHA256, token.as_bytes())
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    #[test]
    fn tokens_pick_their_tenant_and_everything_else_is_refused_by_name() {
        let hash = |t: &str| Credential::TokenSha256(parse_token_sha256(&sha256_hex(t)).unwrap());
        let tenants = Tenants::with_credentials(vec![
            (tenant("shop"), vec![hash("shop-secret")]),
            (tenant("blog"), vec![hash("blog-secret")]),
        ]);
        let auth = |v: &str| {
            tenants
                .authenticate(Some(v.as_bytes()), None)
                .map(|t| &*t.name)
        };
        assert_eq!(auth("Bearer shop-secret"), Ok("shop"));
        assert_eq!(auth("Bearer blog-secret"), Ok("blog"));
        assert_eq!(auth("Bearer shop-secreT"), Err(Refusal::UnknownToken));
        assert_eq!(auth("Basic shop-secret"), Err(Refusal::Malformed));
        assert_eq!(auth("Bearer "), Err(Refusal::Malformed));
        assert_eq!(
            tenants.authenticate(None, None).map(|t| &*t.name),
            Err(Refusal::Missing)
        );
        // No message carries the token.
        for r in [Refusal::Missing, Refusal::Malformed, Refusal::UnknownToken] {
            assert!(!r.to_string().contains("secret"));
        }
    }

    #[test]
    fn single_tenant_mode_asks_for_nothing() {
        let tenants = Tenants::open(tenant(DEFAULT_TENANT));
        assert!(!tenants.requires_credentials());
        assert_eq!(&*tenants.authenticate(None, None).unwrap().name, "default");
    }

    #[test]
    fn a_tenant_without_its_own_memory_cap_gets_an_equal_share_of_the_pool() {
        let tenant = |name: &str, max_memory_bytes| TenantConfig {
            name: name.into(),
            limits: LimitOverrides {
                max_memory_bytes,
                ..LimitOverrides::default()
            },
            ..TenantConfig::default()
        };
        let daemon_wide = Limits {
            max_memory_bytes: 3000,
            ..Limits::default()
        };
        let config = Config {
            limits: daemon_wide.clone(),
            tenants: vec![
                tenant("shop", None),
                tenant("blog", None),
                tenant("admin", Some(500)),
            ],
            ..Config::default()
        };
        let caps: Vec<usize> = config
            .tenants
            .iter()
            .map(|t| tenant_limits(&config, t).max_memory_bytes)
            .collect();
        assert_eq!(caps, [1000, 1000, 500]);
        let pool = memory_pool(&config);
        assert_eq!((pool.cap(), pool.share()), (3000, 1000));
        // Single-tenant mode: the one store has the whole pool.
        let single = Config {
            limits: daemon_wide,
            ..Config::default()
        };
        assert_eq!(memory_pool(&single).share(), 3000);
        assert_eq!(single.limits.max_memory_bytes, 3000);
    }

    #[test]
    fn token_hashes_parse_from_hex() {
        assert_eq!(parse_token_sha256(&"ab".repeat(32)), Some([0xab; 32]));
        assert_eq!(parse_token_sha256("abc"), None);
        assert_eq!(parse_token_sha256(&"zz".repeat(32)), None);
    }
}
