//! One `Config`, layered: built-in defaults < config file < environment (`SESSIOND_*`) < flags.
//!
//! `config/sessiond.toml` lists every setting with its default; a unit test keeps the two in
//! step. Durations are written the human way (`30m`, `24h`, `500ms`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::{Figment, Provider};
use serde::{Deserialize, Serialize};

use crate::persist::log::FsyncPolicy;
use crate::store::{LimitOverrides, Limits, LimitsError};

/// The config file read when `--config` is not given, if it exists.
pub(crate) const DEFAULT_CONFIG_FILE: &str = "config/sessiond.toml";

/// Prefix of the environment variables that override the file.
pub(crate) const ENV_PREFIX: &str = "SESSIOND_";

/// Every setting of the daemon. Field names are the config-file keys; the environment variable
/// is the name upper-cased behind `SESSIOND_`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// gRPC listen address. Loopback by default: expose it deliberately.
    pub listen: SocketAddr,
    /// HTTP listen address for /metrics, /healthz and /readyz.
    pub admin_listen: SocketAddr,
    /// Directory for the durable log and snapshots.
    pub data_dir: PathBuf,
    /// Keep sessions across restarts (the log and snapshots under `data_dir`). Off: a pure
    /// in-memory cache.
    pub persist: bool,
    /// When the log is fsynced: `always` (before every reply), `everysec`, or `no`.
    pub fsync: FsyncPolicy,
    /// Snapshot once the log since the last snapshot is this large (or larger: see
    /// `snapshot_log_percent`).
    pub snapshot_log_bytes: u64,
    /// Snapshot once the log since the last snapshot reaches this percentage of that
    /// snapshot's size, when that is more than `snapshot_log_bytes` (Redis's
    /// `auto-aof-rewrite-percentage`). 0 leaves `snapshot_log_bytes` alone.
    pub snapshot_log_percent: u64,
    /// Snapshot at least this often while anything changes.
    #[serde(with = "humantime_serde")]
    pub snapshot_interval: Duration,
    /// `text` for people, `json` for log pipelines.
    pub log_format: LogFormat,

    /// PEM certificate chain for the gRPC port; empty = no TLS.
    pub tls_cert: PathBuf,
    /// PEM private key for `tls_cert`.
    pub tls_key: PathBuf,
    /// PEM CA bundle that client certificates must chain to; set = mutual TLS.
    pub tls_client_ca: PathBuf,
    /// How often the TLS files are checked for changes (SIGHUP reloads at once).
    #[serde(with = "humantime_serde")]
    pub tls_watch_interval: Duration,
    /// Allow a non-loopback `listen` without TLS and client authentication. Only for networks
    /// where every host that can reach the port is trusted with every session.
    pub insecure_listen: bool,
    /// Serve the admin endpoint over HTTPS with `tls_cert` and `tls_key` (no client
    /// certificate asked for: Prometheus and probes scrape it).
    pub admin_tls: bool,

    /// Map shards. More shards mean less lock contention; a power of two.
    pub shards: usize,
    /// What the Store enforces: timeouts, sizes, per-user, memory and creation-rate limits.
    /// Flattened: each is a top-level key (`idle_timeout`, `max_sessions`, ...) with its
    /// own `SESSIOND_*` variable. With tenants, these are the daemon-wide values that a
    /// tenant's own limits override.
    #[serde(flatten)]
    pub limits: Limits,

    /// Largest gRPC message accepted or sent, in bytes.
    pub max_message_bytes: usize,
    /// Session IDs in one GetMany call.
    pub max_batch_ids: usize,
    /// Concurrent HTTP/2 streams (in-flight RPCs) per connection.
    pub max_concurrent_streams: u32,
    /// RPCs in flight across all connections. Past it, new RPCs are refused at once with
    /// RESOURCE_EXHAUSTED instead of queueing.
    pub max_concurrent_requests: usize,
    /// Bytes of request headers (gRPC metadata) per request.
    pub max_header_list_bytes: u32,
    /// Open client connections on the gRPC port. Past it, new connections are closed at once.
    pub max_connections: usize,
    /// Threads serving requests (the async runtime's workers); 0 = automatic: one per CPU
    /// the process may run on, less one, at least one ([`Config::workers`]).
    pub worker_threads: usize,
    /// With tenants: requests a connection may make without valid credentials (health checks
    /// aside) before it is closed.
    pub unauthenticated_requests: u32,
    /// Bytes of a request body accepted without credentials (health checks, reflection).
    /// A SessionStore request without credentials is refused from its headers alone.
    pub max_unauthenticated_message_bytes: usize,
    /// A connection that has not finished its TLS handshake and sent the HTTP/2 preface
    /// within this is closed, and stops counting against `max_connections`.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Open connections on the admin port. Past it, a new connection is closed at once.
    pub admin_max_connections: usize,
    /// An admin connection that has not sent a whole request head within this (from when it
    /// opened, or since its last request) is closed.
    #[serde(with = "humantime_serde")]
    pub admin_header_read_timeout: Duration,
    /// A request that takes longer is cancelled with DEADLINE_EXCEEDED.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Interval of HTTP/2 keepalive pings to idle clients.
    #[serde(with = "humantime_serde")]
    pub keepalive_interval: Duration,
    /// A client that does not answer a keepalive ping within this is disconnected.
    #[serde(with = "humantime_serde")]
    pub keepalive_timeout: Duration,

    /// Lookups of unknown session IDs from one peer within `guess_window` that get it logged
    /// as a possible ID-guessing or stolen-cookie source.
    pub guess_threshold: u32,
    /// The window `guess_threshold` counts over.
    #[serde(with = "humantime_serde")]
    pub guess_window: Duration,

    /// How often the reaper wakes to free expired sessions.
    #[serde(with = "humantime_serde")]
    pub reaper_interval: Duration,
    /// Sessions the reaper handles before yielding to requests.
    pub reaper_batch: usize,
    /// How long shutdown keeps serving while it reports not-ready, so load balancers stop
    /// sending traffic first. A second signal skips the wait.
    #[serde(with = "humantime_serde")]
    pub shutdown_delay: Duration,
    /// How long shutdown waits for in-flight RPCs before it gives up on them.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,

    /// Apps sharing this daemon, each with its own sessions, credentials and quotas. Empty:
    /// single-tenant mode, where every client that can connect shares one store.
    pub tenants: Vec<TenantConfig>,

    /// The `[cluster]` section: present, this node is a member of a replicated group; absent,
    /// sessiond is a single node exactly as without it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterConfig>,
}

/// `[cluster]`: this node's part in a replicated group (see `src/cluster/`).
///
/// The timeouts are raised from openraft's LAN defaults (50 ms heartbeats, 150-300 ms
/// elections): on a loaded two-core machine those elect spuriously.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// Where the peer service listens: Raft RPCs and forwarded calls from the other members,
    /// and sessionctl's cluster calls. Whoever can talk to it can rewrite every session, so
    /// beyond loopback it needs mutual TLS (`tls_cert`, `tls_key`, `tls_ca`) or the daemon's
    /// `insecure_listen`. Port 0 takes a free port.
    pub peer_listen: SocketAddr,
    /// The peer address (`host:port`, a DNS name or an IP) the other members reach this node
    /// at; empty: `peer_listen` as bound. With peer TLS, this node's certificate must name
    /// its host (or every node shares one certificate: see `tls_server_name`).
    pub advertise_peer: String,
    /// The client address (`host:port`, a DNS name or an IP) named to clients in the
    /// `sessiond-leader` reply header when this node leads; empty: the daemon's `listen`.
    pub advertise_client: String,
    /// PEM certificate chain of this node for the peer port: the peer server's certificate,
    /// and the client certificate this node presents when it dials a peer. Set with
    /// `tls_key` and `tls_ca`, or not at all; empty: the peer port speaks plaintext
    /// (loopback only, unless `insecure_listen`).
    pub tls_cert: PathBuf,
    /// PEM private key of `tls_cert`.
    pub tls_key: PathBuf,
    /// PEM bundle of the cluster CA: a peer that dials this node must present a client
    /// certificate that chains to it, and a peer this node dials must present a server
    /// certificate that chains to it. Dedicate a CA to the cluster: whoever holds a
    /// certificate it signed is a member, able to rewrite every session.
    pub tls_ca: PathBuf,
    /// The name peer server certificates are verified against; empty: the host of the peer
    /// address as the membership records it (`advertise_peer`, not a `dial_overrides`
    /// target). For clusters whose nodes share one certificate.
    pub tls_server_name: String,
    /// How often the leader sends heartbeats, renewing its lease.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// A follower that hears from no leader for a random time between this and
    /// `election_timeout_max` stands for election. At least three heartbeat intervals.
    #[serde(with = "humantime_serde")]
    pub election_timeout_min: Duration,
    /// See `election_timeout_min`. The leader's lease for reads lasts this long.
    #[serde(with = "humantime_serde")]
    pub election_timeout_max: Duration,
    /// How long sending one snapshot to a member, and its installing it, may take.
    #[serde(with = "humantime_serde")]
    pub snapshot_timeout: Duration,
    /// Also take a snapshot after this many log entries since the last one; 0: by size
    /// alone (`snapshot_log_bytes`, `snapshot_log_percent` and `snapshot_interval`, as on a
    /// single node). The log a snapshot covers is then purged.
    pub snapshot_every_entries: u64,
    /// Entries a snapshot already holds that are kept in the log anyway, so a member a little
    /// behind catches up from the log rather than by a whole snapshot.
    pub keep_entries_after_snapshot: u64,
    /// Log entries in one replication message.
    pub max_entries_per_append: u64,
    /// Peer addresses as the membership records them (`advertise_peer`), mapped to the
    /// address this node dials instead: a local proxy or sidecar on the way to that peer.
    /// Empty: every peer is dialled at its recorded address.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub dial_overrides: BTreeMap<String, String>,
    /// On a node that has never been part of a cluster, make a new cluster with this node as
    /// its only member at start (what `--bootstrap` sets). Ignored once the node is a member.
    pub bootstrap: bool,
    /// When the Raft log is fsynced: `always`, `everysec` or `no` (as `fsync`; the vote is
    /// always fsynced). Unset: the daemon's `fsync`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fsync: Option<FsyncPolicy>,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            peer_listen: SocketAddr::from(([127, 0, 0, 1], 7422)),
            advertise_peer: String::new(),
            advertise_client: String::new(),
            tls_cert: PathBuf::new(),
            tls_key: PathBuf::new(),
            tls_ca: PathBuf::new(),
            tls_server_name: String::new(),
            heartbeat_interval: Duration::from_millis(150),
            election_timeout_min: Duration::from_millis(500),
            election_timeout_max: Duration::from_secs(1),
            snapshot_timeout: Duration::from_secs(300),
            snapshot_every_entries: 0,
            keep_entries_after_snapshot: 1000,
            max_entries_per_append: 300,
            dial_overrides: BTreeMap::new(),
            bootstrap: false,
            fsync: None,
        }
    }
}

impl ClusterConfig {
    /// Checks what types alone cannot; errors name the setting as `cluster.NAME`. Protected
    /// mode needs the daemon's `insecure_listen` as well: see
    /// [`ClusterConfig::validate_protected_mode`].
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |setting: &str, why: String| Err(ConfigError(format!("cluster.{setting} {why}")));
        let set = |p: &PathBuf| !p.as_os_str().is_empty();
        let files = [
            ("tls_cert", set(&self.tls_cert)),
            ("tls_key", set(&self.tls_key)),
            ("tls_ca", set(&self.tls_ca)),
        ];
        if files.iter().any(|(_, s)| *s) && !files.iter().all(|(_, s)| *s) {
            let missing: Vec<String> = files
                .iter()
                .filter(|(_, s)| !*s)
                .map(|(n, _)| format!("cluster.{n}"))
                .collect();
            return Err(ConfigError(format!(
                "cluster.tls_cert, cluster.tls_key and cluster.tls_ca are set together or not \
                 at all (peer TLS is mutual: each node presents its certificate and checks the \
                 other's against the cluster CA); missing: {}",
                missing.join(", ")
            )));
        }
        if !self.tls_server_name.is_empty() {
            if !set(&self.tls_cert) {
                return bad(
                    "tls_server_name",
                    "needs peer TLS (cluster.tls_cert, cluster.tls_key, cluster.tls_ca)".into(),
                );
            }
            if rustls::pki_types::ServerName::try_from(self.tls_server_name.as_str()).is_err() {
                return bad(
                    "tls_server_name",
                    format!("{:?} is not a DNS name or IP address", self.tls_server_name),
                );
            }
        }
        for (name, d) in [
            ("heartbeat_interval", self.heartbeat_interval),
            ("snapshot_timeout", self.snapshot_timeout),
        ] {
            if d.is_zero() {
                return bad(name, "must be longer than zero".into());
            }
        }
        if self.election_timeout_min < self.heartbeat_interval * 3 {
            return bad(
                "election_timeout_min",
                format!(
                    "({:?}) must be at least three heartbeat_intervals ({:?}), or a couple of \
                     late heartbeats start an election",
                    self.election_timeout_min,
                    self.heartbeat_interval * 3
                ),
            );
        }
        if self.election_timeout_max <= self.election_timeout_min {
            return bad(
                "election_timeout_max",
                format!(
                    "({:?}) must be longer than election_timeout_min ({:?}): the spread keeps \
                     members from standing for election at once",
                    self.election_timeout_max, self.election_timeout_min
                ),
            );
        }
        if self.max_entries_per_append == 0 {
            return bad("max_entries_per_append", "must be at least 1".into());
        }
        for (name, addr) in [
            ("advertise_peer", &self.advertise_peer),
            ("advertise_client", &self.advertise_client),
        ] {
            let valid = addr.is_empty()
                || addr
                    .rsplit_once(':')
                    .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !valid {
                return bad(name, format!("must be host:port, got {addr:?}"));
            }
        }
        Ok(())
    }

    /// Protected mode on the peer port: beyond loopback, a peer must prove it is a member
    /// (mutual TLS against the cluster CA), unless the operator says, with the daemon's
    /// `insecure_listen`, that every host that can reach the port is trusted.
    pub fn validate_protected_mode(&self, insecure_listen: bool) -> Result<(), ConfigError> {
        if self.peer_listen.ip().is_loopback() || insecure_listen || self.tls().is_some() {
            return Ok(());
        }
        Err(ConfigError(format!(
            "refusing to serve the peer port on cluster.peer_listen {} without TLS: anyone who \
             can reach it could join the cluster's traffic and rewrite every session. Set \
             cluster.tls_cert, cluster.tls_key and cluster.tls_ca (mutual TLS with a cluster \
             CA), or set insecure_listen = true (--insecure-listen) if every host that can \
             reach that address is trusted.",
            self.peer_listen
        )))
    }

    /// The peer port's TLS files, if peer TLS is on: the cluster CA verifies client
    /// certificates (and, dialling, server certificates).
    pub fn tls(&self) -> Option<crate::tls::TlsFiles> {
        if self.tls_cert.as_os_str().is_empty() {
            return None;
        }
        Some(crate::tls::TlsFiles {
            cert: self.tls_cert.clone(),
            key: self.tls_key.clone(),
            client_ca: Some(self.tls_ca.clone()),
            section: crate::tls::Section::Cluster,
        })
    }
}

/// One tenant: `[[tenants]]` in the config file.
///
/// A client is this tenant when it presents a bearer token whose SHA-256 is `token_sha256`
/// (`authorization: Bearer <token>` metadata), or a verified client certificate whose subject
/// is `client_subject`. Unset limits take the daemon-wide setting of the same name.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// Name: in metrics labels, logs and the data directory (`data_dir/tenants/NAME`).
    pub name: String,
    /// Hex SHA-256 of the tenant's bearer token (`printf %s TOKEN | sha256sum`). The token
    /// itself is never stored.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub token_sha256: String,
    /// Subject of the tenant's mTLS client certificate, RFC 4514 style (`CN=storefront`), or
    /// just its common name.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub client_subject: String,
    /// Limits of its own over the daemon-wide ones (`max_sessions`, `create_rate`, ...),
    /// written beside its name.
    #[serde(flatten)]
    pub limits: LimitOverrides,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 7420)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 7421)),
            data_dir: PathBuf::from("./data"),
            persist: true,
            fsync: FsyncPolicy::Everysec,
            snapshot_log_bytes: 64 * 1024 * 1024,
            snapshot_log_percent: 100,
            snapshot_interval: Duration::from_secs(3600),
            log_format: LogFormat::Text,
            tls_cert: PathBuf::new(),
            tls_key: PathBuf::new(),
            tls_client_ca: PathBuf::new(),
            tls_watch_interval: Duration::from_secs(10),
            insecure_listen: false,
            admin_tls: false,
            shards: 64,
            limits: Limits::default(),
            max_message_bytes: 4 * 1024 * 1024,
            max_batch_ids: 1000,
            max_concurrent_streams: 1024,
            max_concurrent_requests: 4096,
            max_header_list_bytes: 16 * 1024,
            max_connections: 10_000,
            worker_threads: 0,
            unauthenticated_requests: 8,
            max_unauthenticated_message_bytes: 4096,
            handshake_timeout: Duration::from_secs(10),
            admin_max_connections: 64,
            admin_header_read_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            guess_threshold: 100,
            guess_window: Duration::from_secs(60),
            reaper_interval: Duration::from_secs(1),
            reaper_batch: 1000,
            shutdown_delay: Duration::ZERO,
            shutdown_grace: Duration::from_secs(10),
            tenants: Vec::new(),
            cluster: None,
        }
    }
}

/// A setting that failed to load or validate; the message names it.
#[derive(Debug, thiserror::Error)]
#[error("configuration error: {0}")]
pub struct ConfigError(String);

impl ConfigError {
    /// An error with this message; it should name the setting.
    pub(crate) fn new(msg: String) -> Self {
        ConfigError(msg)
    }
}

impl From<LimitsError> for ConfigError {
    fn from(e: LimitsError) -> Self {
        ConfigError(e.to_string())
    }
}

/// The tenants' limits alone, which `Config::load` reads before the whole for the sake of its
/// error messages.
#[derive(Deserialize)]
struct TenantsLimits {
    #[serde(default)]
    #[allow(dead_code)] // read only to be checked
    tenants: Vec<LimitOverrides>,
}

impl Config {
    /// The async runtime's worker count: `worker_threads`, or when that is 0, one per CPU
    /// the process may run on less one, at least one. The CPU left over runs the log and
    /// snapshot threads and the kernel's network work, and, for a sidecar, the app: on two
    /// cores one worker served 1.18 times the operations of two, at 0.75 times the CPU per
    /// operation, because two workers spend their time waking each other (README,
    /// Performance).
    pub fn workers(&self, cpus: usize) -> usize {
        match self.worker_threads {
            0 => cpus.saturating_sub(1).max(1),
            n => n,
        }
    }

    /// Loads the layers. `file` is `--config`; without it, [`DEFAULT_CONFIG_FILE`] is read if
    /// present. `flags` holds the command-line overrides (serialised, `None`s skipped).
    pub fn load(file: Option<&Path>, flags: impl Serialize) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        match file {
            Some(path) if !path.exists() => {
                return Err(ConfigError(format!(
                    "config file {} does not exist",
                    path.display()
                )))
            }
            Some(path) => figment = figment.merge(Toml::file_exact(path)),
            None if Path::new(DEFAULT_CONFIG_FILE).exists() => {
                figment = figment.merge(Toml::file_exact(DEFAULT_CONFIG_FILE))
            }
            None => {}
        }
        // Only our own settings: other SESSIOND_* variables (sessionctl's SESSIOND_ADDR) are
        // not typos in the daemon's config.
        let known = Self::keys();
        let env = Env::prefixed(ENV_PREFIX).filter(move |k| known.iter().any(|n| k == n.as_str()));
        let figment = figment.merge(env).merge(Serialized::defaults(flags));
        let error = |e: figment::Error| ConfigError(e.to_string());
        // The limits are flattened into `Config` and `TenantConfig`. serde reads flattened
        // values from a copy that has lost figment's record of their key and source, and says
        // neither about an unknown key beside them. So the keys and the limits are checked
        // first, on their own, and a bad one is named with where it was written (`... for key
        // "default.max_sessions" in config/sessiond.toml TOML file`).
        Self::refuse_unknown_keys(&figment)?;
        figment.extract::<Limits>().map_err(error)?;
        figment.extract::<TenantsLimits>().map_err(error)?;
        let mut config: Config = figment.extract().map_err(error)?;
        if let Some(cluster) = &mut config.cluster {
            cluster.fsync.get_or_insert(config.fsync);
        }
        config.validate()?;
        Ok(config)
    }

    /// Refuses a top-level key that is no setting, saying where it was written: serde's own
    /// error for an unknown key beside flattened ones does not.
    fn refuse_unknown_keys(figment: &Figment) -> Result<(), ConfigError> {
        let known = Self::keys();
        let given: figment::value::Dict =
            figment.extract().map_err(|e| ConfigError(e.to_string()))?;
        match given.keys().find(|k| !known.contains(k)) {
            None => Ok(()),
            Some(key) => {
                let place = match figment.find_metadata(key) {
                    Some(m) => match &m.source {
                        Some(source) => format!(" in {source} {}", m.name),
                        None => format!(" in {}", m.name),
                    },
                    None => String::new(),
                };
                Err(ConfigError(format!("unknown setting `{key}`{place}")))
            }
        }
    }

    /// The names of all settings.
    pub fn keys() -> Vec<String> {
        let mut keys: Vec<String> = Serialized::defaults(Config::default())
            .data()
            .ok()
            .and_then(|mut d| d.remove(&figment::Profile::Default))
            .map(|d| d.into_keys().collect())
            .unwrap_or_default();
        // A section that is absent by default, so the defaults do not name it.
        keys.push("cluster".into());
        keys
    }

    /// Checks what types alone cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |setting: &str, why: String| Err(ConfigError(format!("{setting} {why}")));
        if !self.shards.is_power_of_two() || self.shards > 4096 {
            return bad(
                "shards",
                format!("must be a power of two up to 4096, got {}", self.shards),
            );
        }
        for (name, d) in [
            ("reaper_interval", self.reaper_interval),
            ("tls_watch_interval", self.tls_watch_interval),
            ("snapshot_interval", self.snapshot_interval),
            ("guess_window", self.guess_window),
            ("request_timeout", self.request_timeout),
            ("handshake_timeout", self.handshake_timeout),
            ("admin_header_read_timeout", self.admin_header_read_timeout),
            ("keepalive_interval", self.keepalive_interval),
            ("keepalive_timeout", self.keepalive_timeout),
        ] {
            if d.is_zero() {
                return bad(name, "must be longer than zero".into());
            }
        }
        let set = |p: &PathBuf| !p.as_os_str().is_empty();
        if set(&self.tls_cert) != set(&self.tls_key) {
            return bad("tls_cert", "and tls_key must be set together".into());
        }
        if set(&self.tls_client_ca) && !set(&self.tls_cert) {
            return bad(
                "tls_client_ca",
                "needs tls_cert and tls_key (mutual TLS is TLS first)".into(),
            );
        }
        self.validate_protected_mode()?;
        self.limits.validate()?;
        for (name, n) in [
            ("snapshot_log_bytes", self.snapshot_log_bytes as usize),
            ("max_message_bytes", self.max_message_bytes),
            ("max_batch_ids", self.max_batch_ids),
            ("reaper_batch", self.reaper_batch),
            (
                "max_concurrent_streams",
                self.max_concurrent_streams as usize,
            ),
            ("max_connections", self.max_connections),
            ("admin_max_connections", self.admin_max_connections),
            (
                "unauthenticated_requests",
                self.unauthenticated_requests as usize,
            ),
            (
                "max_unauthenticated_message_bytes",
                self.max_unauthenticated_message_bytes,
            ),
        ] {
            if n == 0 {
                return bad(name, "must be at least 1".into());
            }
        }
        if self.max_message_bytes < 1024 {
            return bad("max_message_bytes", "must be at least 1024".into());
        }
        if self.admin_tls && !set(&self.tls_cert) {
            return bad("admin_tls", "needs tls_cert and tls_key".into());
        }
        if let Some(cluster) = &self.cluster {
            cluster.validate()?;
            cluster.validate_protected_mode(self.insecure_listen)?;
        }
        self.validate_tenants()
    }

    /// Protected mode: beyond loopback, a client must be unable to read the traffic (TLS) and
    /// must prove who it is (a client certificate from `tls_client_ca`, or a tenant's token),
    /// unless the operator says every host that can reach the port is trusted.
    fn validate_protected_mode(&self) -> Result<(), ConfigError> {
        if self.listen.ip().is_loopback() || self.insecure_listen {
            return Ok(());
        }
        let tls = !self.tls_cert.as_os_str().is_empty();
        let client_auth = !self.tls_client_ca.as_os_str().is_empty() || !self.tenants.is_empty();
        const TLS: &str = "TLS (set tls_cert and tls_key)";
        const CLIENT_AUTH: &str = "client authentication (set tls_client_ca for mutual TLS, \
             or configure [[tenants]] with token_sha256)";
        let (without, missing, risk) = match (tls, client_auth) {
            (true, true) => return Ok(()),
            (false, true) => (
                "without TLS",
                TLS.to_string(),
                "anyone on the path could read every session ID and tenant token",
            ),
            (true, false) => (
                "without client authentication",
                CLIENT_AUTH.to_string(),
                "anyone who can connect could create a session for any user or list any \
                 user's session IDs",
            ),
            (false, false) => (
                "without TLS or client authentication",
                format!("{TLS} and {CLIENT_AUTH}"),
                "anyone who can reach the port could read and forge every session",
            ),
        };
        Err(ConfigError(format!(
            "refusing to listen on {} {without}: {risk}. Missing: {missing}. Or set \
             insecure_listen = true (--insecure-listen) if every host that can reach that \
             address is trusted.",
            self.listen
        )))
    }

    fn validate_tenants(&self) -> Result<(), ConfigError> {
        let mut names = std::collections::HashSet::new();
        let mut tokens = std::collections::HashSet::new();
        let mut subjects = std::collections::HashSet::new();
        for (i, t) in self.tenants.iter().enumerate() {
            let at = |why: String| Err(ConfigError(format!("tenants[{i}] ({}): {why}", t.name)));
            let valid_name = !t.name.is_empty()
                && t.name.len() <= 64
                && t.name.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_'
                });
            if !valid_name {
                return at("name must be 1 to 64 of a-z, 0-9, - and _".into());
            }
            if !names.insert(&t.name) {
                return at("name is used by another tenant".into());
            }
            if t.token_sha256.is_empty() && t.client_subject.is_empty() {
                return at(
                    "needs token_sha256 or client_subject: a tenant nobody can reach".into(),
                );
            }
            if !t.token_sha256.is_empty() {
                if t.token_sha256.len() != 64
                    || !t.token_sha256.bytes().all(|b| b.is_ascii_hexdigit())
                {
                    return at("token_sha256 must be 64 hex digits (the SHA-256 of the token, not the token)".into());
                }
                if !tokens.insert(t.token_sha256.to_ascii_lowercase()) {
                    return at("token_sha256 is another tenant's too".into());
                }
            }
            if !t.client_subject.is_empty() {
                if self.tls_client_ca.as_os_str().is_empty() {
                    return at("client_subject needs mutual TLS (tls_client_ca)".into());
                }
                if !subjects.insert(&t.client_subject) {
                    return at("client_subject is another tenant's too".into());
                }
            }
            if let Err(e) = t.limits.apply(&self.limits).validate() {
                return at(e.to_string());
            }
        }
        Ok(())
    }

    /// The TLS files, if TLS is on.
    pub fn tls(&self) -> Option<crate::tls::TlsFiles> {
        if self.tls_cert.as_os_str().is_empty() {
            return None;
        }
        Some(crate::tls::TlsFiles {
            cert: self.tls_cert.clone(),
            key: self.tls_key.clone(),
            client_ca: (!self.tls_client_ca.as_os_str().is_empty())
                .then(|| self.tls_client_ca.clone()),
            section: crate::tls::Section::Daemon,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::PerUserPolicy;

    #[derive(Serialize, Default)]
    struct NoFlags {}

    #[test]
    fn workers_default_to_one_per_cpu_less_one_and_a_setting_wins() {
        let auto = Config::default();
        assert_eq!([1, 2, 3, 16].map(|cpus| auto.workers(cpus)), [1, 1, 2, 15]);
        let set = Config {
            worker_threads: 4,
            ..Config::default()
        };
        assert_eq!([1, 2, 16].map(|cpus| set.workers(cpus)), [4, 4, 4]);
    }

    #[test]
    fn shipped_config_file_matches_the_built_in_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(DEFAULT_CONFIG_FILE);
        let from_file: Config = Figment::from(Toml::file_exact(&path)).extract().unwrap();
        assert_eq!(from_file, Config::default());
        // And it mentions every setting, so it stays the complete reference.
        let text = std::fs::read_to_string(&path).unwrap();
        for key in Config::keys() {
            if key == "tenants" {
                // An array of tables: shown as a commented-out example.
                assert!(text.contains("\n# [[tenants]]"), "tenants example missing");
                continue;
            }
            if key == "cluster" {
                // A section that is absent by default: shown commented out, every setting
                // with its default.
                assert!(text.contains("\n# [cluster]"), "cluster example missing");
                let defaults = Serialized::defaults(ClusterConfig::default())
                    .data()
                    .unwrap()
                    .remove(&figment::Profile::Default)
                    .unwrap();
                for k in defaults.keys().chain([&"fsync".to_string()]) {
                    assert!(
                        text.contains(&format!("\n# {k} = ")),
                        "cluster.{k} missing from {DEFAULT_CONFIG_FILE}"
                    );
                }
                continue;
            }
            assert!(
                text.contains(&format!("\n{key} = ")),
                "{key} missing from {DEFAULT_CONFIG_FILE}"
            );
        }
    }

    #[test]
    fn protected_mode_needs_tls_and_client_authentication_beyond_loopback() {
        let public = Config {
            listen: "0.0.0.0:7420".parse().unwrap(),
            ..Config::default()
        };
        let tls = Config {
            tls_cert: "cert.pem".into(),
            tls_key: "key.pem".into(),
            ..public.clone()
        };
        let tenant = TenantConfig {
            name: "shop".into(),
            token_sha256: "ab".repeat(32),
            ..TenantConfig::default()
        };
        let refused = |c: &Config| c.validate().unwrap_err().to_string();

        let err = refused(&public);
        assert!(
            err.contains("refusing to listen on 0.0.0.0:7420 without TLS or client authentication"),
            "{err}"
        );
        for named in [
            "tls_cert",
            "tls_client_ca",
            "[[tenants]]",
            "insecure_listen",
        ] {
            assert!(err.contains(named), "{err} lacks {named}");
        }
        // TLS alone encrypts, but anyone may still connect and act.
        let err = refused(&tls);
        assert!(err.contains("without client authentication"), "{err}");
        assert!(
            err.contains("tls_client_ca") && err.contains("[[tenants]]"),
            "{err}"
        );
        assert!(!err.contains("tls_cert"), "TLS is set, yet named: {err}");
        // Tokens alone would cross the network in clear.
        let err = refused(&Config {
            tenants: vec![tenant.clone()],
            ..public.clone()
        });
        assert!(err.contains("without TLS:"), "{err}");
        assert!(err.contains("tls_cert and tls_key"), "{err}");
        assert!(
            !err.contains("tls_client_ca"),
            "client auth is set, yet named: {err}"
        );

        for ok in [
            Config {
                tls_client_ca: "clients.pem".into(),
                ..tls.clone()
            },
            Config {
                tenants: vec![tenant],
                ..tls.clone()
            },
            Config {
                insecure_listen: true,
                ..public.clone()
            },
            Config::default(),
        ] {
            ok.validate().unwrap();
        }
        let err = Config {
            tls_cert: "cert.pem".into(),
            ..Config::default()
        }
        .validate()
        .unwrap_err();
        assert!(err.to_string().contains("tls_key"), "{err}");
    }

    #[test]
    fn protected_mode_on_the_peer_port_needs_peer_tls_or_insecure_listen_beyond_loopback() {
        let public = ClusterConfig {
            peer_listen: "0.0.0.0:7422".parse().unwrap(),
            ..ClusterConfig::default()
        };
        let member = |cluster: &ClusterConfig, insecure_listen: bool| Config {
            cluster: Some(cluster.clone()),
            insecure_listen,
            ..Config::default()
        };
        let err = member(&public, false).validate().unwrap_err().to_string();
        for named in [
            "cluster.peer_listen 0.0.0.0:7422 without TLS",
            "cluster.tls_cert",
            "cluster.tls_key",
            "cluster.tls_ca",
            "insecure_listen",
        ] {
            assert!(err.contains(named), "{err} lacks {named}");
        }
        let tls = ClusterConfig {
            tls_cert: "peer.pem".into(),
            tls_key: "peer.key".into(),
            tls_ca: "cluster-ca.pem".into(),
            ..public.clone()
        };
        for (cluster, insecure) in [
            (&public, true),
            (&tls, false),
            (&ClusterConfig::default(), false),
            (
                &ClusterConfig {
                    tls_server_name: "peers.test".into(),
                    ..tls.clone()
                },
                false,
            ),
        ] {
            member(cluster, insecure).validate().unwrap();
        }
        assert_eq!(
            tls.tls().map(|f| f.client_ca),
            Some(Some("cluster-ca.pem".into())),
            "the cluster CA verifies peers' client certificates"
        );
    }

    #[test]
    fn tenants_are_checked_and_errors_name_the_tenant() {
        let tenant = |name: &str, hash: &str| TenantConfig {
            name: name.into(),
            token_sha256: hash.into(),
            ..TenantConfig::default()
        };
        let ok = "ab".repeat(32);
        let check = |tenants: Vec<TenantConfig>| {
            Config {
                tenants,
                ..Config::default()
            }
            .validate()
            .map_err(|e| e.to_string())
        };
        check(vec![tenant("shop", &ok)]).unwrap();
        for (tenants, want) in [
            (vec![tenant("Shop!", &ok)], "name must be"),
            (
                vec![tenant("shop", "")],
                "needs token_sha256 or client_subject",
            ),
            (vec![tenant("shop", "secret")], "64 hex digits"),
            (
                vec![tenant("shop", &ok), tenant("shop", &"cd".repeat(32))],
                "used by another tenant",
            ),
            (
                vec![tenant("a", &ok), tenant("b", &ok)],
                "another tenant's too",
            ),
            (
                vec![TenantConfig {
                    client_subject: "CN=app".into(),
                    ..tenant("shop", "")
                }],
                "needs mutual TLS",
            ),
            (
                vec![TenantConfig {
                    limits: LimitOverrides {
                        create_rate: Some(0),
                        ..LimitOverrides::default()
                    },
                    ..tenant("shop", &ok)
                }],
                "create_rate must be at least 1",
            ),
        ] {
            let err = check(tenants).unwrap_err();
            assert!(err.contains("tenants["), "{err}");
            assert!(err.contains(want), "{err} lacks {want}");
        }
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail API, not ours
    fn layers_override_in_order_and_errors_name_the_setting() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "s.toml",
                "idle_timeout = \"5m\"\nshards = 16\nmax_attributes = 7",
            )?;
            jail.set_env("SESSIOND_SHARDS", "32");
            jail.set_env("SESSIOND_ADDR", "127.0.0.1:1"); // sessionctl's, ignored here
            #[derive(Serialize)]
            struct Flags {
                max_attributes: usize,
            }
            let c = Config::load(Some(Path::new("s.toml")), Flags { max_attributes: 9 }).unwrap();
            assert_eq!(c.limits.default_idle_timeout, Duration::from_secs(300));
            assert_eq!(c.shards, 32);
            assert_eq!(c.limits.max_attributes, 9);

            jail.set_env("SESSIOND_IDLE_TIMEOUT", "soon");
            let err = Config::load(Some(Path::new("s.toml")), NoFlags {}).unwrap_err();
            assert!(err.to_string().contains("SESSIOND_"), "{err}");
            assert!(err.to_string().contains("IDLE_TIMEOUT"), "{err}");

            jail.set_env("SESSIOND_IDLE_TIMEOUT", "1m");
            jail.set_env("SESSIOND_SHARDS", "3");
            let err = Config::load(Some(Path::new("s.toml")), NoFlags {}).unwrap_err();
            assert!(err.to_string().contains("shards"), "{err}");

            jail.set_env("SESSIOND_SHARDS", "4");
            jail.create_file("typo.toml", "idel_timeout = \"5m\"")?;
            let err = Config::load(Some(Path::new("typo.toml")), NoFlags {}).unwrap_err();
            assert!(err.to_string().contains("idel_timeout"), "{err}");
            assert!(err.to_string().contains("typo.toml"), "{err}");

            let err = Config::load(Some(Path::new("missing.toml")), NoFlags {}).unwrap_err();
            assert!(err.to_string().contains("missing.toml"), "{err}");
            Ok(())
        });
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail API, not ours
    fn a_cluster_section_turns_the_cluster_on_and_its_errors_name_the_setting() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("single.toml", "fsync = \"always\"")?;
            let c = Config::load(Some(Path::new("single.toml")), NoFlags {}).unwrap();
            assert_eq!(c.cluster, None, "no section, no cluster");

            jail.create_file(
                "c.toml",
                "fsync = \"always\"\n[cluster]\nheartbeat_interval = \"100ms\"\n",
            )?;
            let c = Config::load(Some(Path::new("c.toml")), NoFlags {}).unwrap();
            let cluster = c.cluster.unwrap();
            assert_eq!(cluster.heartbeat_interval, Duration::from_millis(100));
            assert_eq!(cluster.election_timeout_min, Duration::from_millis(500));
            assert_eq!(cluster.fsync, Some(FsyncPolicy::Always), "inherits fsync");

            for (body, want) in [
                (
                    "election_timeout_min = \"400ms\"",
                    "cluster.election_timeout_min",
                ),
                (
                    "election_timeout_max = \"500ms\"",
                    "cluster.election_timeout_max",
                ),
                ("peer_listen = \"0.0.0.0:7422\"", "cluster.peer_listen"),
                (
                    "max_entries_per_append = 0",
                    "cluster.max_entries_per_append",
                ),
                ("advertise_peer = \"nohost\"", "cluster.advertise_peer"),
                (
                    "tls_cert = \"peer.pem\"",
                    "missing: cluster.tls_key, cluster.tls_ca",
                ),
                (
                    "tls_cert = \"p.pem\"\ntls_key = \"p.key\"\ntls_ca = \"ca.pem\"\n\
                     tls_server_name = \"not a name!\"",
                    "cluster.tls_server_name",
                ),
                ("tls_server_name = \"peers.test\"", "needs peer TLS"),
            ] {
                jail.create_file("bad.toml", &format!("[cluster]\n{body}\n"))?;
                let err = Config::load(Some(Path::new("bad.toml")), NoFlags {}).unwrap_err();
                assert!(err.to_string().contains(want), "{body}: {err}");
            }
            jail.create_file("typo.toml", "[cluster]\nheartbeat = \"1s\"\n")?;
            let err = Config::load(Some(Path::new("typo.toml")), NoFlags {}).unwrap_err();
            assert!(err.to_string().contains("heartbeat"), "{err}");
            Ok(())
        });
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail API, not ours
    fn environment_variables_still_set_the_limits_by_their_old_names() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("s.toml", "create_burst = 50\nmax_sessions = 1000")?;
            jail.set_env("SESSIOND_IDLE_TIMEOUT", "5m");
            jail.set_env("SESSIOND_ABSOLUTE_TIMEOUT", "2h");
            jail.set_env("SESSIOND_MAX_SESSIONS_PER_USER", "3");
            jail.set_env("SESSIOND_PER_USER_POLICY", "evict-oldest");
            jail.set_env("SESSIOND_MAX_MEMORY_BYTES", "1048576");
            jail.set_env("SESSIOND_CREATE_BURST", "7");
            let c = Config::load(Some(Path::new("s.toml")), NoFlags {}).unwrap();
            assert_eq!(
                c.limits,
                Limits {
                    default_idle_timeout: Duration::from_secs(300),
                    default_absolute_timeout: Duration::from_secs(7200),
                    max_sessions_per_user: 3,
                    per_user_policy: PerUserPolicy::EvictOldest,
                    max_memory_bytes: 1 << 20,
                    create_burst: 7,
                    max_sessions: 1000, // from the file, no variable over it
                    ..Limits::default()
                }
            );

            // A value of the wrong kind names its variable; a bad number names the setting.
            jail.set_env("SESSIOND_MAX_SESSIONS", "lots");
            let err = Config::load(Some(Path::new("s.toml")), NoFlags {}).unwrap_err();
            assert!(err.to_string().contains("SESSIOND_"), "{err}");
            assert!(err.to_string().contains("MAX_SESSIONS"), "{err}");
            jail.set_env("SESSIOND_MAX_SESSIONS", "10");
            jail.set_env("SESSIOND_CREATE_BURST", "0");
            let err = Config::load(Some(Path::new("s.toml")), NoFlags {}).unwrap_err();
            assert_eq!(
                err.to_string(),
                "configuration error: create_burst must be at least 1"
            );
            Ok(())
        });
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail API, not ours
    fn a_tenants_limits_apply_over_the_daemon_wide_ones_and_are_checked_the_same() {
        figment::Jail::expect_with(|jail| {
            let tenant = format!(
                "[[tenants]]\nname = \"shop\"\ntoken_sha256 = \"{}\"\n",
                "ab".repeat(32)
            );
            jail.create_file(
                "s.toml",
                &format!(
                    "max_attributes = 9\ncreate_rate = 100\ncreate_burst = 200\n{tenant}\
                     create_burst = 20\nper_user_policy = \"evict-oldest\"\n"
                ),
            )?;
            let c = Config::load(Some(Path::new("s.toml")), NoFlags {}).unwrap();
            let shop = &c.tenants[0];
            assert_eq!(
                shop.limits,
                LimitOverrides {
                    create_burst: Some(20),
                    per_user_policy: Some(PerUserPolicy::EvictOldest),
                    ..LimitOverrides::default()
                }
            );
            let applied = shop.limits.apply(&c.limits);
            assert_eq!(
                (
                    applied.max_attributes,
                    applied.create_rate,
                    applied.create_burst
                ),
                (9, 100, 20)
            );
            assert_eq!(applied.per_user_policy, PerUserPolicy::EvictOldest);
            assert_eq!(c.limits.create_burst, 200);

            // A bad override is refused like a bad daemon-wide limit, naming the tenant.
            jail.create_file("over.toml", &format!("{tenant}create_rate = 1000000001\n"))?;
            let err = Config::load(Some(Path::new("over.toml")), NoFlags {}).unwrap_err();
            assert_eq!(
                err.to_string(),
                "configuration error: tenants[0] (shop): create_rate must be at most 1000000000"
            );
            // And one of the wrong kind is named with its key and file.
            jail.create_file("kind.toml", &format!("{tenant}create_rate = \"fast\"\n"))?;
            let err = Config::load(Some(Path::new("kind.toml")), NoFlags {}).unwrap_err();
            assert!(err.to_string().contains("tenants.0.create_rate"), "{err}");
            assert!(err.to_string().contains("kind.toml"), "{err}");
            // A misspelt override is an unknown key, as before.
            jail.create_file("typo.toml", &format!("{tenant}create_brust = 5\n"))?;
            let err = Config::load(Some(Path::new("typo.toml")), NoFlags {}).unwrap_err();
            assert!(err.to_string().contains("create_brust"), "{err}");
            Ok(())
        });
    }

    /// The deployment manifests give each pod its own `[cluster]` settings in one variable
    /// (the image has no shell to write a file): a dict in figment's syntax, merged key by key
    /// over the file's section.
    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail API, not ours
    fn one_variable_sets_the_cluster_section_key_by_key_over_the_file() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("c.toml", "[cluster]\nheartbeat_interval = \"100ms\"\n")?;
            jail.set_env(
                "SESSIOND_CLUSTER",
                "{peer_listen=\"127.0.0.1:7422\", \
                 advertise_peer=\"sessiond-0.sessiond-peers.default.svc.cluster.local:7422\"}",
            );
            let c = Config::load(Some(Path::new("c.toml")), NoFlags {}).unwrap();
            let cluster = c.cluster.unwrap();
            assert_eq!(
                cluster.advertise_peer,
                "sessiond-0.sessiond-peers.default.svc.cluster.local:7422"
            );
            assert_eq!(
                cluster.heartbeat_interval,
                Duration::from_millis(100),
                "the file's"
            );
            assert_eq!(
                cluster.peer_listen,
                SocketAddr::from(([127, 0, 0, 1], 7422))
            );

            // Without a section in the file, the variable alone makes the node a member.
            jail.create_file("single.toml", "")?;
            let c = Config::load(Some(Path::new("single.toml")), NoFlags {}).unwrap();
            assert_eq!(
                c.cluster.unwrap().heartbeat_interval,
                Duration::from_millis(150)
            );

            // A misspelt key inside it is refused by name.
            jail.set_env("SESSIOND_CLUSTER", "{advertise_pear=\"a:1\"}");
            let err = Config::load(Some(Path::new("single.toml")), NoFlags {}).unwrap_err();
            assert!(err.to_string().contains("advertise_pear"), "{err}");
            Ok(())
        });
    }
}
