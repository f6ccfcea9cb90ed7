//! The load generator: virtual browsers against one app over real HTTP.
//!
//! Off-the-shelf generators (`oha`, `h2load`) send every request with the same headers, so
//! they cannot keep a cookie per virtual browser; this one does. Each browser holds its own
//! keep-alive HTTP/1.1 connection and its own cookie, starts its session with a cart add,
//! and then loops over the mix (cart reads, cart adds of one of a few SKUs, logins), taking
//! the cookie of every `Set-Cookie` it gets. Latency is measured from just before a request
//! is written to when its whole answer is read, into one HDR histogram per operation.
//!
//! After the measured window comes the lost-adds check ([`crate::tabs`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use hdrhistogram::Histogram;
use http::{header, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::time::Instant;

pub use self::tabs::LostAdds;
use crate::procs;

mod tabs;

/// The largest latency the histograms hold, in µs (a minute): anything slower is clamped.
const MAX_LATENCY_US: u64 = 60_000_000;

/// The load generator's errors.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A `--mix` that does not parse.
    #[error("bad mix {0:?}: expected read=N,add=N,login=N with at least one weight above 0")]
    Mix(String),
    /// The app could not be reached.
    #[error("cannot connect to the app at {addr}: {source}")]
    Connect {
        /// The app's address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// An HTTP exchange failed below the status line (the connection broke).
    #[error("HTTP exchange with the app failed: {0}")]
    Http(#[from] hyper::Error),
    /// An answer that is not what the contract says.
    #[error("unexpected answer from the app: {0}")]
    Answer(String),
}

/// One of the operations of the mix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// `GET /cart`.
    Read,
    /// `POST /cart/items` of one of the SKUs.
    Add,
    /// `POST /login` as the browser's user.
    Login,
}

impl Op {
    const ALL: [Op; 3] = [Op::Read, Op::Add, Op::Login];

    fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Add => "add",
            Op::Login => "login",
        }
    }
}

/// Weights of the operations in the load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mix {
    weights: [u32; 3],
}

impl Default for Mix {
    /// A storefront's traffic: mostly cart views, a quarter adds, a few logins.
    fn default() -> Self {
        Mix {
            weights: [70, 25, 5],
        }
    }
}

impl FromStr for Mix {
    type Err = LoadError;

    fn from_str(s: &str) -> Result<Self, LoadError> {
        let bad = || LoadError::Mix(s.to_string());
        let mut weights = [0u32; 3];
        for part in s.split(',').filter(|p| !p.trim().is_empty()) {
            let (name, n) = part.split_once('=').ok_or_else(bad)?;
            let i = Op::ALL
                .iter()
                .position(|op| op.name() == name.trim())
                .ok_or_else(bad)?;
            weights[i] = n.trim().parse().map_err(|_| bad())?;
        }
        if weights.iter().all(|&w| w == 0) {
            return Err(bad());
        }
        Ok(Mix { weights })
    }
}

impl Mix {
    fn pick(&self, rng: &mut SmallRng) -> Op {
        let total: u32 = self.weights.iter().sum();
        let mut x = rng.random_range(0..total);
        for (op, &w) in Op::ALL.iter().zip(&self.weights) {
            if x < w {
                return *op;
            }
            x -= w;
        }
        Op::Read
    }
}

/// What to run.
#[derive(Clone, Debug)]
pub struct LoadConfig {
    /// The app's address.
    pub target: SocketAddr,
    /// Concurrent virtual browsers (each one connection, one request in flight).
    pub browsers: usize,
    /// Load before the measured window, not counted.
    pub warmup: Duration,
    /// The measured window.
    pub duration: Duration,
    /// The operations' weights.
    pub mix: Mix,
    /// Distinct SKUs the adds pick from (a cart holds at most this many lines).
    pub skus: usize,
    /// Browsers in the lost-adds check (0: no check).
    pub tab_browsers: usize,
    /// Concurrent tabs per browser in the lost-adds check.
    pub tabs: usize,
    /// Adds each tab makes, one after another, each of its own SKU.
    pub adds_per_tab: usize,
    /// Processes whose CPU time over the measured window is reported (the store, then the
    /// app's processes).
    pub pids: Vec<u32>,
    /// The name of the session cookie the app sets (`shop::COOKIE` for the Rust apps).
    pub cookie: String,
}

/// Latency and rate of one operation (or all of them) over the measured window.
#[derive(Clone, Debug, Serialize)]
pub struct OpStats {
    /// Requests completed per second.
    pub ops_per_second: f64,
    /// Requests completed.
    pub count: u64,
    /// Latency percentiles, µs.
    pub p50_us: u64,
    /// 99th percentile, µs.
    pub p99_us: u64,
    /// 99.9th percentile, µs.
    pub p999_us: u64,
}

/// CPU of the processes named by `--pids` over the measured window.
#[derive(Clone, Debug, Serialize)]
pub struct CpuStats {
    /// All of them together, in cores busy (CPU seconds per second).
    pub cpu_per_second: f64,
    /// Each one's, in the order given.
    pub per_process: Vec<f64>,
}

/// A run's report (the JSON `web-load --json` prints).
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Every operation together.
    pub overall: OpStats,
    /// Per operation.
    pub operations: BTreeMap<Op, OpStats>,
    /// Error answers (non-2xx) and broken exchanges per operation, in the measured window.
    pub errors: BTreeMap<Op, u64>,
    /// CPU of `pids`, if given and readable.
    pub processes: Option<CpuStats>,
    /// The lost-adds check, if run.
    pub lost_adds: Option<LostAdds>,
}

/// One connection to the app, as a browser's (or a tab's) keep-alive connection.
pub(crate) struct Conn {
    addr: SocketAddr,
    /// The session cookie's name.
    cookie: Arc<str>,
    sender: SendRequest<Full<Bytes>>,
}

/// An answer: its status, its JSON body (`Null` if none), and the cookie it set, if any
/// (`Some("")` when it cleared it).
pub(crate) struct Answer {
    pub(crate) status: StatusCode,
    pub(crate) body: Value,
    pub(crate) set_cookie: Option<String>,
}

impl Conn {
    pub(crate) async fn open(addr: SocketAddr, cookie: &str) -> Result<Conn, LoadError> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|source| LoadError::Connect { addr, source })?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        // Ends with the connection; its error shows as the next request's.
        tokio::spawn(conn);
        Ok(Conn {
            addr,
            cookie: cookie.into(),
            sender,
        })
    }

    pub(crate) async fn call(
        &mut self,
        method: Method,
        path: &str,
        cookie: Option<&str>,
        body: Option<Value>,
    ) -> Result<Answer, LoadError> {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, self.addr.to_string())
            .header(header::USER_AGENT, "sessiond-web-bench");
        if let Some(c) = cookie {
            req = req.header(header::COOKIE, format!("{}={c}", self.cookie));
        }
        let body = match body {
            Some(v) => {
                req = req.header(header::CONTENT_TYPE, "application/json");
                Full::new(Bytes::from(v.to_string()))
            }
            None => Full::new(Bytes::new()),
        };
        let req = req
            .body(body)
            .map_err(|e| LoadError::Answer(format!("cannot build a request: {e}")))?;
        // A server may close an idle keep-alive connection (gunicorn does): open another, as
        // a browser does.
        if self.sender.ready().await.is_err() {
            *self = Conn::open(self.addr, &self.cookie).await?;
            self.sender.ready().await?;
        }
        let res = self.sender.send_request(req).await?;
        let status = res.status();
        let set_cookie = res
            .headers()
            .get_all(header::SET_COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(|v| cookie_value(v, &self.cookie));
        let bytes = res.into_body().collect().await?.to_bytes();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Ok(Answer {
            status,
            body,
            set_cookie,
        })
    }
}

/// The value `Set-Cookie` gives our cookie (`""` when it removes it), if it is about it.
fn cookie_value(set_cookie: &str, cookie: &str) -> Option<String> {
    let pair = set_cookie.split(';').next()?;
    let (name, value) = pair.split_once('=')?;
    if name.trim() != cookie {
        return None;
    }
    let removed = set_cookie
        .split(';')
        .skip(1)
        .any(|attr| attr.trim().eq_ignore_ascii_case("max-age=0"));
    Some(if removed {
        String::new()
    } else {
        value.trim().to_string()
    })
}

/// A browser's cookie jar of one cookie; tabs of one browser share it.
#[derive(Clone, Default)]
pub(crate) struct Jar(Arc<Mutex<Option<String>>>);

impl Jar {
    pub(crate) fn get(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(crate) fn take(&self, set_cookie: Option<String>) {
        if let Some(v) = set_cookie {
            *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(v).filter(|v| !v.is_empty());
        }
    }
}

/// One browser's measurements.
struct Tally {
    hist: BTreeMap<Op, Histogram<u64>>,
    errors: BTreeMap<Op, u64>,
}

impl Tally {
    fn new() -> Tally {
        let hist = Op::ALL
            .iter()
            .map(|&op| {
                let h = Histogram::new_with_bounds(1, MAX_LATENCY_US, 3)
                    .expect("constant histogram bounds are valid");
                (op, h)
            })
            .collect();
        Tally {
            hist,
            errors: Op::ALL.iter().map(|&op| (op, 0)).collect(),
        }
    }

    fn merge(&mut self, other: &Tally) {
        for (op, h) in &other.hist {
            if let Some(mine) = self.hist.get_mut(op) {
                // Same bounds on both sides: cannot fail.
                let _ = mine.add(h);
            }
        }
        for (op, n) in &other.errors {
            *self.errors.entry(*op).or_default() += n;
        }
    }
}

/// The request of `op` for browser `b`.
fn request(
    op: Op,
    b: usize,
    rng: &mut SmallRng,
    skus: usize,
) -> (Method, &'static str, Option<Value>) {
    match op {
        Op::Read => (Method::GET, "/cart", None),
        Op::Add => {
            let sku = format!("sku-{}", rng.random_range(0..skus.max(1)));
            (
                Method::POST,
                "/cart/items",
                Some(json!({ "sku": sku, "qty": 1 })),
            )
        }
        Op::Login => (
            Method::POST,
            "/login",
            Some(json!({ "user": format!("user-{b}") })),
        ),
    }
}

/// One browser's loop until `end`, counting what starts at or after `measure_from`.
async fn browser(
    cfg: Arc<LoadConfig>,
    b: usize,
    measure_from: Instant,
    end: Instant,
) -> Result<Tally, LoadError> {
    let mut rng = SmallRng::seed_from_u64(b as u64);
    let mut tally = Tally::new();
    let jar = Jar::default();
    let mut conn = Conn::open(cfg.target, &cfg.cookie).await?;
    // Every browser starts its session with an add, as a shopper does.
    let first = conn
        .call(
            Method::POST,
            "/cart/items",
            None,
            Some(json!({ "sku": "sku-0", "qty": 1 })),
        )
        .await?;
    if first.status != StatusCode::OK || first.set_cookie.is_none() {
        return Err(LoadError::Answer(format!(
            "the first add answered {} {}a cookie",
            first.status,
            if first.set_cookie.is_some() {
                "with "
            } else {
                "without "
            }
        )));
    }
    jar.take(first.set_cookie);
    loop {
        let start = Instant::now();
        if start >= end {
            return Ok(tally);
        }
        let op = cfg.mix.pick(&mut rng);
        let (method, path, body) = request(op, b, &mut rng, cfg.skus);
        let answer = conn.call(method, path, jar.get().as_deref(), body).await;
        let took = start.elapsed();
        let ok = match answer {
            Ok(a) => {
                jar.take(a.set_cookie);
                a.status.is_success()
            }
            Err(_) => {
                // A broken connection: a browser opens another one.
                conn = Conn::open(cfg.target, &cfg.cookie).await?;
                false
            }
        };
        if start >= measure_from {
            if ok {
                let us = (took.as_micros() as u64).clamp(1, MAX_LATENCY_US);
                if let Some(h) = tally.hist.get_mut(&op) {
                    h.saturating_record(us);
                }
            } else {
                *tally.errors.entry(op).or_default() += 1;
            }
        }
    }
}

fn stats(h: &Histogram<u64>, seconds: f64) -> OpStats {
    OpStats {
        ops_per_second: h.len() as f64 / seconds,
        count: h.len(),
        p50_us: h.value_at_quantile(0.50),
        p99_us: h.value_at_quantile(0.99),
        p999_us: h.value_at_quantile(0.999),
    }
}

/// Runs the load, then the lost-adds check, and reports.
pub async fn run(cfg: LoadConfig) -> Result<Report, LoadError> {
    let cfg = Arc::new(cfg);
    let start = Instant::now();
    let measure_from = start + cfg.warmup;
    let end = measure_from + cfg.duration;
    let tasks: Vec<_> = (0..cfg.browsers)
        .map(|b| tokio::spawn(browser(cfg.clone(), b, measure_from, end)))
        .collect();
    // CPU over the measured window: read as it opens and as it closes.
    tokio::time::sleep_until(measure_from).await;
    let cpu_from = procs::cpu_seconds(&cfg.pids);
    tokio::time::sleep_until(end).await;
    let cpu_to = procs::cpu_seconds(&cfg.pids);
    let mut all = Tally::new();
    for t in tasks {
        let tally = t
            .await
            .map_err(|e| LoadError::Answer(format!("a browser task failed: {e}")))??;
        all.merge(&tally);
    }
    let seconds = cfg.duration.as_secs_f64().max(1e-9);
    let mut overall = Histogram::new_with_bounds(1, MAX_LATENCY_US, 3)
        .expect("constant histogram bounds are valid");
    for h in all.hist.values() {
        let _ = overall.add(h);
    }
    let processes = match (cpu_from, cpu_to) {
        (Some(a), Some(b)) if !cfg.pids.is_empty() => {
            let per_process: Vec<f64> = a.iter().zip(&b).map(|(a, b)| (b - a) / seconds).collect();
            Some(CpuStats {
                cpu_per_second: per_process.iter().sum(),
                per_process,
            })
        }
        _ => None,
    };
    let lost_adds = if cfg.tab_browsers > 0 && cfg.tabs > 0 && cfg.adds_per_tab > 0 {
        Some(tabs::lost_adds(&cfg).await?)
    } else {
        None
    };
    Ok(Report {
        overall: stats(&overall, seconds),
        operations: all
            .hist
            .iter()
            .map(|(op, h)| (*op, stats(h, seconds)))
            .collect(),
        errors: all.errors,
        processes,
        lost_adds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix_parses_and_refuses_nonsense() {
        let m: Mix = "read=1,add=2".parse().unwrap();
        assert_eq!(m.weights, [1, 2, 0]);
        assert!("read=0".parse::<Mix>().is_err());
        assert!("browse=3".parse::<Mix>().is_err());
        assert!("read=x".parse::<Mix>().is_err());
        let mut rng = SmallRng::seed_from_u64(1);
        let only_add: Mix = "add=5".parse().unwrap();
        assert!((0..100).all(|_| only_add.pick(&mut rng) == Op::Add));
    }

    #[test]
    fn set_cookie_is_read_for_our_cookie_only() {
        assert_eq!(
            cookie_value("sid=abc; Path=/; HttpOnly", "sid").as_deref(),
            Some("abc")
        );
        assert_eq!(
            cookie_value("sid=; Path=/; Max-Age=0", "sid").as_deref(),
            Some("")
        );
        assert_eq!(cookie_value("other=abc; Path=/", "sid"), None);
    }
}
