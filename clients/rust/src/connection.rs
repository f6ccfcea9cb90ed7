//! Where calls go and how connections come and go: the seed addresses, the leader a reply
//! names, and one lazily made connection per slot, made again with a bounded, jittered
//! backoff after a failure.
//!
//! A slot holds at most one [`Conn`]: a channel and, on the pipelined transport, its
//! [`Pipe`]. A call that finds its slot without a usable connection makes one, unless the
//! last attempt failed and its backoff has not run out yet: then it fails at once with
//! [`Error::Unavailable`], so an app whose store is down answers quickly instead of
//! stalling every request for its whole timeout.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use tonic::Code;

use crate::pipeline::Pipe;
use crate::{wire, Bearer, ClientOptions, Error, Transport, WireStub};

/// The first wait after a failed connection attempt, by default.
pub const DEFAULT_RECONNECT_MIN: Duration = Duration::from_millis(50);

/// The longest wait between connection attempts, by default: how long an app may take to
/// notice that sessiond is back.
pub const DEFAULT_RECONNECT_MAX: Duration = Duration::from_secs(2);

/// The per-call timeout, by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long connecting to one address (and opening its stream) may take, by default (or
/// the call timeout, if shorter): short enough that a call whose first seed is on a host
/// that is down still has time to reach the next.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// How long connecting to one address may take under `options`.
pub(crate) fn connect_timeout(options: &ClientOptions) -> Duration {
    let timeout = options.timeout.unwrap_or(DEFAULT_TIMEOUT);
    options
        .connect_timeout
        .unwrap_or(DEFAULT_CONNECT_TIMEOUT.min(timeout))
}

/// HTTP/2 keepalive pings on an open connection: a peer that vanished without closing it
/// (a partition, a host that died) is noticed within interval + timeout, and its
/// connection made again, instead of every call on it timing out.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Turns `host:port`, `http://...` or `https://...` into a URL with its scheme, or names the
/// problem.
pub(crate) fn url(addr: &str, tls: bool) -> Result<String, Error> {
    let addr = addr.trim().trim_end_matches('/');
    if addr.is_empty() {
        return Err(Error::InvalidArgument(
            "a sessiond address is empty: expected host:port or http(s)://host:port".into(),
        ));
    }
    let url = match addr.contains("://") {
        true => addr.to_string(),
        false if tls => format!("https://{addr}"),
        false => format!("http://{addr}"),
    };
    Endpoint::from_shared(url.clone())
        .map_err(|e| Error::InvalidArgument(format!("sessiond address {addr:?}: {e}")))?;
    Ok(url)
}

/// The endpoint for `url` with the TLS of `options`.
pub(crate) fn endpoint(url: &str, options: &ClientOptions) -> Result<Endpoint, Error> {
    let tls = options.ca_pem.is_some() || url.starts_with("https://");
    let mut endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|e| Error::InvalidArgument(format!("sessiond address {url:?}: {e}")))?
        .connect_timeout(connect_timeout(options))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true);
    if tls {
        let mut config = ClientTlsConfig::new().with_enabled_roots();
        if let Some(ca) = &options.ca_pem {
            config = config.ca_certificate(Certificate::from_pem(ca));
        }
        if let Some((cert, key)) = &options.identity_pem {
            config = config.identity(Identity::from_pem(cert, key));
        }
        if let Some(domain) = &options.domain {
            config = config.domain_name(domain);
        }
        endpoint = endpoint
            .tls_config(config)
            .map_err(|e| Error::InvalidArgument(format!("TLS settings: {e}")))?;
    }
    Ok(endpoint)
}

/// The addresses calls may go to: the leader once a reply named one, else the seeds in turn.
pub(crate) struct Router {
    seeds: Vec<String>,
    tls: bool,
    /// Whether calls move to the leader a reply names (`ClientOptions::follow_leader`).
    follow: bool,
    state: Mutex<RouterState>,
}

#[derive(Default)]
struct RouterState {
    /// The leader's URL, as the last reply that named one said.
    leader: Option<String>,
    /// The seed to try first: the last one that answered.
    first_seed: usize,
}

impl Router {
    /// Routes over `seeds` (already URLs); `tls` picks the scheme for a leader's `host:port`;
    /// without `follow`, calls stay on the seeds whatever the replies name.
    pub(crate) fn new(seeds: Vec<String>, tls: bool, follow: bool) -> Router {
        Router {
            seeds,
            tls,
            follow,
            state: Mutex::default(),
        }
    }

    /// The addresses to try, in order: the leader if known, then every seed, starting with
    /// the one that last answered.
    pub(crate) fn candidates(&self) -> Vec<String> {
        let state = self.state.lock().unwrap();
        let n = self.seeds.len();
        let seeds = (0..n).map(|i| self.seeds[(state.first_seed + i) % n].clone());
        let mut out: Vec<String> = state.leader.iter().cloned().collect();
        out.extend(seeds.filter(|s| Some(s) != state.leader.as_ref()));
        out
    }

    /// The leader, if a reply named one.
    pub(crate) fn leader(&self) -> Option<String> {
        self.state.lock().unwrap().leader.clone()
    }

    /// `url` answered: start with it next time (if a seed).
    pub(crate) fn answered(&self, url: &str) {
        if let Some(i) = self.seeds.iter().position(|s| s == url) {
            self.state.lock().unwrap().first_seed = i;
        }
    }

    /// `url` could not be reached: if it was the leader, forget it, so the seeds are tried.
    pub(crate) fn unreachable(&self, url: &str) {
        let mut state = self.state.lock().unwrap();
        if state.leader.as_deref() == Some(url) {
            state.leader = None;
        }
    }

    /// A reply from `on` named `header` as the leader: records it. Whether calls should
    /// move: the leader is known and is not `on`, and the client follows the leader.
    pub(crate) fn leader_says(&self, on: &str, header: &str) -> bool {
        if !self.follow {
            return false;
        }
        let Ok(leader) = url(header, self.tls) else {
            return false;
        };
        let moved = leader != on;
        self.state.lock().unwrap().leader = Some(leader);
        moved
    }
}

/// One connection: a channel to `url`, and its Pipeline stream on the pipelined transport.
pub(crate) struct Conn {
    /// Where it goes.
    pub(crate) url: String,
    /// The unary calls' stub (GetMany, and every call on the unary transport).
    pub(crate) stub: WireStub,
    /// The stream, on the pipelined transport.
    pub(crate) pipe: Option<Pipe>,
    /// No new call should start here: it broke, or the leader is elsewhere.
    stale: AtomicBool,
}

impl Conn {
    /// Whether new calls may start here.
    fn usable(&self) -> bool {
        !self.stale.load(Ordering::Acquire) && self.pipe.as_ref().is_none_or(|p| p.is_open())
    }

    /// Lets the calls in flight finish, but starts no new one here.
    pub(crate) fn retire(&self) {
        self.stale.store(true, Ordering::Release);
    }
}

/// What a slot knows about its last failed attempts.
#[derive(Default)]
struct Down {
    failures: u32,
    retry_at: Option<Instant>,
    last_error: String,
    /// [`Shared::connects`] when the last attempt failed.
    connects: u64,
}

/// One of the client's connections, made when first needed and again after it breaks.
#[derive(Default)]
pub(crate) struct Slot {
    current: Mutex<Option<Arc<Conn>>>,
    /// Held while connecting, so one attempt runs at a time and the others wait for it.
    connecting: tokio::sync::Mutex<Down>,
}

impl Slot {
    /// The slot's connection, made now if it has none (or only a stale one).
    pub(crate) async fn get(&self, client: &Shared) -> Result<Arc<Conn>, Error> {
        if let Some(conn) = self.usable() {
            return Ok(conn);
        }
        let mut down = self.connecting.lock().await;
        if let Some(conn) = self.usable() {
            return Ok(conn);
        }
        let now = Instant::now();
        // Another slot connected since this one failed: sessiond is back, try now.
        let back = client.connects.load(Ordering::Acquire) != down.connects;
        if let Some(at) = down.retry_at.filter(|at| *at > now && !back) {
            return Err(Error::Unavailable(format!(
                "cannot reach sessiond ({}); the next attempt is in {} ms",
                down.last_error,
                (at - now).as_millis()
            )));
        }
        // Boxed: connecting is rare, and its future is large; inline, every call's future
        // would carry room for it.
        match Box::pin(connect(client)).await {
            Ok(conn) => {
                client.connects.fetch_add(1, Ordering::AcqRel);
                *down = Down::default();
                let conn = Arc::new(conn);
                *self.current.lock().unwrap() = Some(conn.clone());
                Ok(conn)
            }
            // sessiond answered, and said no (a wrong token, say): no backoff helps that.
            Err(Failure::Refused(status)) => Err(status.into()),
            Err(Failure::Unreachable(why)) => {
                down.failures += 1;
                down.retry_at = Some(now + backoff(&client.options, down.failures));
                down.last_error = why.clone();
                down.connects = client.connects.load(Ordering::Acquire);
                Err(Error::Unavailable(format!("cannot reach sessiond ({why})")))
            }
        }
    }

    /// Its connection, if it has one that takes new calls.
    pub(crate) fn usable(&self) -> Option<Arc<Conn>> {
        let current = self.current.lock().unwrap();
        current.as_ref().filter(|c| c.usable()).cloned()
    }
}

/// How long to wait after the `failures`-th failed attempt in a row: doubling from the
/// minimum up to the maximum, then jittered down by up to half, so clients that lost the
/// same server do not come back in step.
pub(crate) fn backoff(options: &ClientOptions, failures: u32) -> Duration {
    let min = options.reconnect_min.unwrap_or(DEFAULT_RECONNECT_MIN);
    let max = options
        .reconnect_max
        .unwrap_or(DEFAULT_RECONNECT_MAX)
        .max(min);
    let full = min
        .saturating_mul(1 << failures.saturating_sub(1).min(16))
        .min(max);
    full.mul_f64(0.5 + fastrand::f64() / 2.0)
}

/// What every slot shares: the options, the token, the router.
pub(crate) struct Shared {
    pub(crate) options: ClientOptions,
    pub(crate) bearer: Bearer,
    pub(crate) router: Router,
    /// How many connections any slot has made.
    pub(crate) connects: AtomicU64,
}

/// Why a connection could not be made.
enum Failure {
    /// No address answered: why, naming each one tried.
    Unreachable(String),
    /// sessiond answered, and refused the stream (its status).
    Refused(tonic::Status),
}

/// Connects to the first candidate that answers; on the pipelined transport, opens its
/// stream too, and if that node names another leader, moves there (once) when it can.
async fn connect(client: &Shared) -> Result<Conn, Failure> {
    let mut candidates = client.router.candidates();
    let mut errors = Vec::new();
    let mut fallback = None;
    let mut followed = false;
    let mut i = 0;
    while i < candidates.len() {
        let url = candidates[i].clone();
        i += 1;
        match open(client, &url).await {
            Ok((conn, leader)) => {
                client.router.answered(&url);
                let moved = leader.is_some_and(|l| client.router.leader_says(&url, &l));
                if !moved || followed {
                    return Ok(conn);
                }
                // A follower: it would forward every call. Try the leader, keeping this one
                // in case the leader cannot be reached from here.
                followed = true;
                if let Some(leader) = client.router.leader() {
                    candidates.insert(i, leader);
                }
                fallback = Some(conn);
                candidates.truncate(i + 1);
            }
            Err(Failure::Unreachable(e)) => {
                client.router.unreachable(&url);
                errors.push(format!("{url}: {e}"));
            }
            Err(refused) => return fallback.ok_or(refused),
        }
    }
    fallback.ok_or_else(|| Failure::Unreachable(errors.join("; ")))
}

/// Opens one connection to `url`: its channel and, pipelined, its stream; with the leader
/// the stream's headers name.
async fn open(client: &Shared, url: &str) -> Result<(Conn, Option<String>), Failure> {
    let channel = endpoint(url, &client.options)
        .map_err(|e| Failure::Unreachable(e.to_string()))?
        .connect()
        .await
        .map_err(|e| Failure::Unreachable(source_chain(&e)))?;
    let stub = wire::session_store_client::SessionStoreClient::with_interceptor(
        channel,
        client.bearer.clone(),
    );
    let (pipe, leader) = match client.options.transport {
        Transport::Unary => (None, None),
        Transport::Pipelined => {
            let opened = tokio::time::timeout(
                connect_timeout(&client.options),
                Pipe::open(stub.clone(), client.options.max_in_flight()),
            )
            .await
            .map_err(|_| Failure::Unreachable("no reply to opening a Pipeline stream".into()))?
            .map_err(|s| match s.code() {
                Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded => {
                    Failure::Unreachable(format!("opening a Pipeline stream: {}", s.message()))
                }
                _ => Failure::Refused(s),
            })?;
            (Some(opened.0), opened.1)
        }
    };
    Ok((
        Conn {
            url: url.to_string(),
            stub,
            pipe,
            stale: AtomicBool::new(false),
        },
        leader,
    ))
}

/// An error and its causes, on one line: tonic's own message for a failed connect is only
/// "transport error".
fn source_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router(seeds: &[&str]) -> Router {
        Router::new(
            seeds.iter().map(|s| url(s, false).unwrap()).collect(),
            false,
            true,
        )
    }

    #[test]
    fn seeds_are_a_fail_over_list_until_a_reply_names_the_leader() {
        let r = router(&["10.0.0.1:7420", "http://10.0.0.2:7420", "10.0.0.3:7420"]);
        assert_eq!(
            r.candidates(),
            [
                "http://10.0.0.1:7420",
                "http://10.0.0.2:7420",
                "http://10.0.0.3:7420"
            ]
        );
        // The second seed answered: it comes first from now on.
        r.answered("http://10.0.0.2:7420");
        assert_eq!(r.candidates()[0], "http://10.0.0.2:7420");

        // A follower names the leader: calls move there, and the seeds stay behind it.
        assert!(r.leader_says("http://10.0.0.2:7420", "10.0.0.3:7420"));
        assert_eq!(
            r.candidates(),
            [
                "http://10.0.0.3:7420",
                "http://10.0.0.2:7420",
                "http://10.0.0.1:7420"
            ]
        );
        // The leader naming itself: nothing moves.
        assert!(!r.leader_says("http://10.0.0.3:7420", "10.0.0.3:7420"));
        // It changes: follow it, even to an address that is no seed.
        assert!(r.leader_says("http://10.0.0.3:7420", "10.0.0.9:7420"));
        assert_eq!(r.candidates()[0], "http://10.0.0.9:7420");
        assert_eq!(r.candidates().len(), 4);
        // The leader cannot be reached: back to the seeds.
        r.unreachable("http://10.0.0.9:7420");
        assert_eq!(r.leader(), None);
        assert_eq!(r.candidates()[0], "http://10.0.0.2:7420");
        // A header that is no address is ignored.
        assert!(!r.leader_says("http://10.0.0.2:7420", "not an address\n"));
        assert_eq!(r.leader(), None);
    }

    #[test]
    fn a_tls_client_reaches_the_leader_over_tls() {
        let r = Router::new(vec![url("db1:7420", true).unwrap()], true, true);
        assert!(r.leader_says("https://db1:7420", "db2:7420"));
        assert_eq!(r.leader().as_deref(), Some("https://db2:7420"));
    }

    #[test]
    fn a_client_that_does_not_follow_the_leader_stays_on_its_seeds() {
        let seeds = vec![url("10.0.0.2:7420", false).unwrap()];
        let r = Router::new(seeds, false, false);
        assert!(!r.leader_says("http://10.0.0.2:7420", "10.0.0.3:7420"));
        assert_eq!(r.leader(), None);
        assert_eq!(r.candidates(), ["http://10.0.0.2:7420"]);
    }

    #[test]
    fn backoff_doubles_up_to_its_cap_with_jitter_below_it() {
        let options = ClientOptions {
            reconnect_min: Some(Duration::from_millis(100)),
            reconnect_max: Some(Duration::from_millis(1000)),
            ..ClientOptions::default()
        };
        for _ in 0..100 {
            let first = backoff(&options, 1);
            assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
            let third = backoff(&options, 3);
            assert!(third >= Duration::from_millis(200) && third <= Duration::from_millis(400));
            let late = backoff(&options, 40);
            assert!(late >= Duration::from_millis(500) && late <= Duration::from_millis(1000));
        }
    }

    #[test]
    fn bad_addresses_are_named() {
        assert!(matches!(url("", false), Err(Error::InvalidArgument(m)) if m.contains("empty")));
        assert!(matches!(
            url("http://exa mple:1", false),
            Err(Error::InvalidArgument(m)) if m.contains("exa mple")
        ));
        assert_eq!(url("h:1/", true).unwrap(), "https://h:1");
    }
}
