//! `sessiond-bench`: a session-shaped load generator for sessiond, and the same logical
//! workload against Redis the way a Redis-backed session library runs it.
//!
//! A population of sessions (default 100k, 8 attributes of 128 bytes, four per user) is
//! created first; then `--concurrency` workers over `--connections` connections run a mix
//! of session operations for `--duration`. Latency is recorded per operation in HDR
//! histograms (one per worker, merged at the end, so recording takes no lock).
//!
//! One logical operation against Redis costs what a session library spends on it:
//! - Get (sliding): GET, then EXPIRE;
//! - Update one attribute: GET, then SET ... EX of the whole blob (`--redis-update blob`),
//!   or HSET then EXPIRE on a hash (`--redis-update hset`);
//! - Create: SET ... EX NX, then SADD to the user's set;
//! - Destroy: DEL, then SREM;
//! - Regenerate: GET, then SET ... EX NX under the new ID, then DEL the old, then SADD/SREM;
//! - ListUserSessions: SMEMBERS, then MGET.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Parser, ValueEnum};
use futures_util::stream::{FuturesUnordered, StreamExt};
use hdrhistogram::Histogram;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use sessiond_client::pb;
use sessiond_client::pb::session_store_client::SessionStoreClient;
use tonic::transport::{Channel, Endpoint};

/// Session-shaped load against sessiond (grpc://) or Redis (redis://).
#[derive(Parser, Clone)]
#[command(version, about)]
struct Args {
    /// grpc://HOST:PORT for sessiond, redis://HOST:PORT for Redis.
    #[arg(long, default_value = "grpc://127.0.0.1:7420")]
    target: String,
    /// sessiond's admin address, for server CPU and RSS (ignored for Redis).
    #[arg(long, default_value = "127.0.0.1:7421")]
    admin_addr: String,
    /// Live sessions created before the run.
    #[arg(long, default_value_t = 100_000)]
    sessions: usize,
    /// Attributes per session.
    #[arg(long, default_value_t = 8)]
    attributes: usize,
    /// Bytes per attribute value.
    #[arg(long, default_value_t = 128)]
    value_bytes: usize,
    /// Operation mix, as weights: get,update,create,destroy,regenerate,list.
    #[arg(
        long,
        default_value = "get=80,update=12,create=4,destroy=2,regenerate=1,list=1"
    )]
    mix: String,
    /// Requests in flight.
    #[arg(long, default_value_t = 50)]
    concurrency: usize,
    /// Connections the workers share.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Measured run time.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Unmeasured run time before it.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Open loop: offer this many operations per second in all, whatever the latency,
    /// instead of sending the next request as soon as the last answered. A pacer thread
    /// releases requests as they fall due (every 100 µs), each worker keeps up to 64 in
    /// flight, and latency counts from when a request was due, so a server that falls behind
    /// cannot hide its queue.
    #[arg(long)]
    rate: Option<u32>,
    /// Send sessiond's operations over one Pipeline stream per connection instead of unary
    /// RPCs.
    #[arg(long)]
    pipeline: bool,
    /// How Redis updates one attribute.
    #[arg(long, value_enum, default_value_t = RedisUpdate::Blob)]
    redis_update: RedisUpdate,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Debug)]
enum RedisUpdate {
    /// Read-modify-write of the whole serialised session (GET + SET EX).
    Blob,
    /// One hash field (HSET + EXPIRE).
    Hset,
}

/// The logical operations.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Op {
    Get,
    Update,
    Create,
    Destroy,
    Regenerate,
    List,
}

const OPS: [(Op, &str); 6] = [
    (Op::Get, "get"),
    (Op::Update, "update"),
    (Op::Create, "create"),
    (Op::Destroy, "destroy"),
    (Op::Regenerate, "regenerate"),
    (Op::List, "list"),
];

/// Session lifetime used for Redis keys, as a session library would set it.
const TTL_SECS: u64 = 1800;

/// Parses `get=80,update=12,...` into cumulative weights.
fn parse_mix(s: &str) -> Result<Vec<(Op, u32)>, String> {
    let mut weights = Vec::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        let (name, w) = part
            .split_once('=')
            .ok_or_else(|| format!("mix entry {part:?} is not name=weight"))?;
        let op = OPS
            .iter()
            .find(|(_, n)| *n == name.trim())
            .ok_or_else(|| format!("unknown operation {name:?} in mix"))?
            .0;
        let w: u32 = w
            .trim()
            .parse()
            .map_err(|_| format!("weight of {name} is not a whole number"))?;
        weights.push((op, w));
    }
    if weights.iter().map(|(_, w)| w).sum::<u32>() == 0 {
        return Err("the mix has no weight".into());
    }
    Ok(weights)
}

/// Picks an operation for a roll in `0..total`.
fn pick(mix: &[(Op, u32)], mut roll: u32) -> Op {
    for (op, w) in mix {
        if roll < *w {
            return *op;
        }
        roll -= w;
    }
    mix.last().map_or(Op::Get, |(op, _)| *op)
}

/// The live session IDs the workers draw from; a destroyed slot is refilled by a create.
struct Pool {
    slots: Vec<Mutex<Option<(String, usize)>>>,
    next_user: AtomicUsize,
}

impl Pool {
    fn get(&self, i: usize) -> Option<(String, usize)> {
        self.slots[i % self.slots.len()].lock().unwrap().clone()
    }
    fn set(&self, i: usize, v: Option<(String, usize)>) {
        *self.slots[i % self.slots.len()].lock().unwrap() = v;
    }
}

/// What a worker measured: requests sent (or due) from `from` on.
struct Tally {
    from: Instant,
    hist: HashMap<&'static str, Histogram<u64>>,
    errors: BTreeMap<String, u64>,
}

impl Tally {
    fn new(from: Instant) -> Self {
        Tally {
            from,
            hist: OPS
                .iter()
                .map(|(_, n)| {
                    (
                        *n,
                        Histogram::new_with_bounds(1, 60_000_000, 3).expect("bounds"),
                    )
                })
                .collect(),
            errors: BTreeMap::new(),
        }
    }

    /// Counts one finished request sent (or due) at `t0`, if that was in the measured time.
    fn record(&mut self, op: Op, t0: Instant, result: OpResult) {
        if t0 < self.from {
            return;
        }
        match result {
            Ok(()) => {
                let us = t0.elapsed().as_micros().max(1) as u64;
                let _ = self.hist.get_mut(op_name(op)).expect("every op").record(us);
            }
            Err(e) => {
                *self
                    .errors
                    .entry(format!("{}: {e}", op_name(op)))
                    .or_default() += 1
            }
        }
    }
}

/// Under `--rate`, how many requests one worker may have outstanding. Past it, requests
/// fall behind their schedule, and their latency still counts from when they were due.
const OPEN_LOOP_IN_FLIGHT: usize = 64;

/// How often the open loop's pacer releases the requests that have fallen due. tokio's
/// timers tick every millisecond, which would send each millisecond's requests in one
/// burst; a thread of its own can release them in smaller, steadier steps.
const PACER_STEP: Duration = Duration::from_micros(100);

/// The open loop's schedule: request `k` is due at `start + k / rate`. A pacer thread
/// releases each request once it is due; workers take them in order.
struct Schedule {
    start: Instant,
    every: Duration,
    released: tokio::sync::Semaphore,
    taken: AtomicUsize,
}

impl Schedule {
    /// Starts the pacer thread: `rate` requests per second until `stop_at`.
    fn start(rate: u32, stop_at: Instant) -> Arc<Schedule> {
        let schedule = Arc::new(Schedule {
            start: Instant::now(),
            every: Duration::from_secs_f64(1.0 / f64::from(rate.max(1))),
            released: tokio::sync::Semaphore::new(0),
            taken: AtomicUsize::new(0),
        });
        let pacer = schedule.clone();
        std::thread::Builder::new()
            .name("pacer".into())
            .spawn(move || pacer.pace(stop_at))
            .expect("a thread for the pacer");
        schedule
    }

    /// Releases every request due by now, in steps of [`PACER_STEP`], until `stop_at`.
    fn pace(&self, stop_at: Instant) {
        let mut released = 0usize;
        loop {
            let now = Instant::now();
            if now >= stop_at {
                self.released.close();
                return;
            }
            let due = (now.duration_since(self.start).as_nanos() / self.every.as_nanos().max(1))
                as usize
                + 1;
            self.released.add_permits(due - released);
            released = due;
            std::thread::sleep(PACER_STEP);
        }
    }

    /// Waits for the next request to fall due; when it was due. `None` once the run is over.
    async fn next(&self) -> Option<Instant> {
        self.released.acquire().await.ok()?.forget();
        let k = self.taken.fetch_add(1, Ordering::Relaxed);
        Some(self.start + self.every.mul_f64(k as f64))
    }
}

fn op_name(op: Op) -> &'static str {
    OPS.iter().find(|(o, _)| *o == op).map_or("?", |(_, n)| n)
}

/// One connection to sessiond: unary RPCs, or one Pipeline stream.
#[derive(Clone)]
enum GrpcConn {
    Unary(SessionStoreClient<Channel>),
    Pipe(Arc<PipeConn>),
}

/// Callers waiting for pipeline responses, by request id.
type Waiting =
    Arc<Mutex<HashMap<u64, tokio::sync::oneshot::Sender<pb::pipeline_response::Result>>>>;

/// A Pipeline stream: requests go in with fresh ids; a reader task hands each response to
/// the caller waiting on that id.
struct PipeConn {
    tx: tokio::sync::mpsc::Sender<pb::PipelineRequest>,
    waiting: Waiting,
    next: std::sync::atomic::AtomicU64,
}

impl PipeConn {
    async fn open(mut client: SessionStoreClient<Channel>) -> Result<PipeConn, String> {
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        let mut responses = client
            .pipeline(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .map_err(|e| format!("pipeline: {e}"))?
            .into_inner();
        let waiting: Waiting = Arc::default();
        let routes = waiting.clone();
        tokio::spawn(async move {
            while let Ok(Some(r)) = responses.message().await {
                let waiter = routes.lock().unwrap().remove(&r.id);
                if let (Some(w), Some(result)) = (waiter, r.result) {
                    let _ = w.send(result);
                }
            }
        });
        Ok(PipeConn {
            tx,
            waiting,
            next: std::sync::atomic::AtomicU64::new(0),
        })
    }
}

impl GrpcConn {
    /// Runs one operation, unary or pipelined, as the pipeline's result type.
    async fn call(
        &self,
        op: pb::pipeline_request::Op,
    ) -> Result<pb::pipeline_response::Result, String> {
        use pb::pipeline_request::Op as Req;
        use pb::pipeline_response::Result as Res;
        let code = |e: tonic::Status| format!("{:?}", e.code());
        let result = match self {
            GrpcConn::Pipe(p) => {
                let id = p.next.fetch_add(1, Ordering::Relaxed);
                let (tx, rx) = tokio::sync::oneshot::channel();
                p.waiting.lock().unwrap().insert(id, tx);
                p.tx.send(pb::PipelineRequest { id, op: Some(op) })
                    .await
                    .map_err(|_| "pipeline closed".to_string())?;
                rx.await.map_err(|_| "pipeline closed".to_string())?
            }
            GrpcConn::Unary(c) => {
                let mut c = c.clone();
                match op {
                    Req::Create(r) => Res::Session(c.create(r).await.map_err(code)?.into_inner()),
                    Req::Get(r) => Res::Session(c.get(r).await.map_err(code)?.into_inner()),
                    Req::Touch(r) => Res::Touch(c.touch(r).await.map_err(code)?.into_inner()),
                    Req::Update(r) => Res::Session(c.update(r).await.map_err(code)?.into_inner()),
                    Req::Regenerate(r) => {
                        Res::Session(c.regenerate(r).await.map_err(code)?.into_inner())
                    }
                    Req::Destroy(r) => Res::Destroy(c.destroy(r).await.map_err(code)?.into_inner()),
                    Req::ListUserSessions(r) => Res::ListUserSessions(
                        c.list_user_sessions(r).await.map_err(code)?.into_inner(),
                    ),
                    Req::DestroyUserSessions(r) => Res::DestroyUserSessions(
                        c.destroy_user_sessions(r).await.map_err(code)?.into_inner(),
                    ),
                }
            }
        };
        match result {
            Res::Error(e) => Err(format!("{:?}", tonic::Code::from_i32(e.code))),
            ok => Ok(ok),
        }
    }
}

/// One backend's connections.
#[derive(Clone)]
enum Backend {
    Grpc(Vec<GrpcConn>),
    Redis(Vec<redis::aio::MultiplexedConnection>, RedisUpdate),
}

fn attributes(args: &Args, seed: u64) -> Vec<(String, Bytes)> {
    (0..args.attributes)
        .map(|i| {
            let mut v = vec![b'a' + (seed % 26) as u8; args.value_bytes];
            v[0] = b'0' + (i % 10) as u8;
            (format!("attr{i}"), Bytes::from(v))
        })
        .collect()
}

fn blob(attrs: &[(String, Bytes)]) -> Vec<u8> {
    let map: BTreeMap<&str, String> = attrs
        .iter()
        .map(|(k, v)| (k.as_str(), String::from_utf8_lossy(v).into_owned()))
        .collect();
    serde_json::to_vec(&map).expect("serialisable")
}

fn new_redis_id(rng: &mut SmallRng) -> String {
    let mut b = [0u8; 32];
    rng.fill(&mut b);
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

type OpResult = Result<(), String>;

impl Backend {
    async fn connect(args: &Args) -> Result<Backend, String> {
        if let Some(addr) = args.target.strip_prefix("redis://") {
            let client =
                redis::Client::open(format!("redis://{addr}/")).map_err(|e| e.to_string())?;
            let mut conns = Vec::new();
            for _ in 0..args.connections.max(1) {
                conns.push(
                    client
                        .get_multiplexed_async_connection()
                        .await
                        .map_err(|e| format!("cannot connect to Redis at {addr}: {e}"))?,
                );
            }
            return Ok(Backend::Redis(conns, args.redis_update));
        }
        let addr = args.target.strip_prefix("grpc://").unwrap_or(&args.target);
        let mut conns = Vec::new();
        for _ in 0..args.connections.max(1) {
            let ch = Endpoint::from_shared(format!("http://{addr}"))
                .map_err(|e| e.to_string())?
                .tcp_nodelay(true)
                .connect()
                .await
                .map_err(|e| format!("cannot connect to sessiond at {addr}: {e}"))?;
            let client = SessionStoreClient::new(ch);
            conns.push(if args.pipeline {
                GrpcConn::Pipe(Arc::new(PipeConn::open(client).await?))
            } else {
                GrpcConn::Unary(client)
            });
        }
        Ok(Backend::Grpc(conns))
    }

    /// Creates a session for `user`; returns its ID.
    async fn create(
        &self,
        conn: usize,
        args: &Args,
        user: usize,
        rng: &mut SmallRng,
    ) -> Result<String, String> {
        let attrs = attributes(args, user as u64);
        match self {
            Backend::Grpc(c) => {
                let req = pb::CreateRequest {
                    user_id: format!("user{user}"),
                    attributes: attrs.into_iter().collect(),
                    ..Default::default()
                };
                match c[conn % c.len()]
                    .call(pb::pipeline_request::Op::Create(req))
                    .await?
                {
                    pb::pipeline_response::Result::Session(s) => Ok(s.id),
                    _ => Err("unexpected result".into()),
                }
            }
            Backend::Redis(c, mode) => {
                let mut con = c[conn % c.len()].clone();
                let id = new_redis_id(rng);
                let key = format!("sess:{id}");
                if *mode == RedisUpdate::Hset {
                    let mut cmd = redis::cmd("HSET");
                    cmd.arg(&key);
                    for (k, v) in &attrs {
                        cmd.arg(k).arg(v.as_ref());
                    }
                    cmd.arg("_user").arg(user);
                    cmd.query_async::<()>(&mut con).await.map_err(redis_err)?;
                    exec(&mut con, redis::cmd("EXPIRE").arg(&key).arg(TTL_SECS)).await?;
                } else {
                    exec(
                        &mut con,
                        redis::cmd("SET")
                            .arg(&key)
                            .arg(blob(&attrs))
                            .arg("EX")
                            .arg(TTL_SECS)
                            .arg("NX"),
                    )
                    .await?;
                }
                exec(
                    &mut con,
                    redis::cmd("SADD").arg(format!("user:{user}")).arg(&id),
                )
                .await?;
                Ok(id)
            }
        }
    }

    async fn run(
        &self,
        op: Op,
        conn: usize,
        pool: &Pool,
        slot: usize,
        args: &Args,
        rng: &mut SmallRng,
    ) -> OpResult {
        match op {
            Op::Create => {
                let user = pool.next_user.fetch_add(1, Ordering::Relaxed) / 4;
                let id = self.create(conn, args, user, rng).await?;
                pool.set(slot, Some((id, user)));
                return Ok(());
            }
            Op::List => {
                let user = pool.get(slot).map_or(0, |(_, u)| u);
                return self.list(conn, user).await;
            }
            _ => {}
        }
        let Some((id, user)) = pool.get(slot) else {
            // An emptied slot: refill it, as a new visitor would.
            let user = pool.next_user.fetch_add(1, Ordering::Relaxed) / 4;
            let id = self.create(conn, args, user, rng).await?;
            pool.set(slot, Some((id, user)));
            return Ok(());
        };
        match self {
            Backend::Grpc(c) => {
                use pb::pipeline_request::Op as Req;
                let c = &c[conn % c.len()];
                match op {
                    Op::Get => c
                        .call(Req::Get(pb::GetRequest { id, peek: false }))
                        .await
                        .map(drop),
                    Op::Update => {
                        let req = pb::UpdateRequest {
                            id,
                            set: [(
                                "attr3".to_string(),
                                Bytes::from(vec![b'u'; args.value_bytes]),
                            )]
                            .into(),
                            ..Default::default()
                        };
                        c.call(Req::Update(req)).await.map(drop)
                    }
                    Op::Destroy => {
                        c.call(Req::Destroy(pb::DestroyRequest { id })).await?;
                        pool.set(slot, None);
                        Ok(())
                    }
                    Op::Regenerate => {
                        let req = pb::RegenerateRequest {
                            id,
                            ..Default::default()
                        };
                        if let pb::pipeline_response::Result::Session(s) =
                            c.call(Req::Regenerate(req)).await?
                        {
                            pool.set(slot, Some((s.id, user)));
                        }
                        Ok(())
                    }
                    Op::Create | Op::List => unreachable!("handled above"),
                }
            }
            Backend::Redis(c, mode) => {
                let mut con = c[conn % c.len()].clone();
                let key = format!("sess:{id}");
                let hset = *mode == RedisUpdate::Hset;
                match op {
                    Op::Get => {
                        if hset {
                            redis::cmd("HGETALL")
                                .arg(&key)
                                .query_async::<Vec<Vec<u8>>>(&mut con)
                                .await
                                .map_err(redis_err)?;
                        } else {
                            redis::cmd("GET")
                                .arg(&key)
                                .query_async::<Option<Vec<u8>>>(&mut con)
                                .await
                                .map_err(redis_err)?;
                        }
                        exec(&mut con, redis::cmd("EXPIRE").arg(&key).arg(TTL_SECS)).await
                    }
                    Op::Update if hset => {
                        exec(
                            &mut con,
                            redis::cmd("HSET")
                                .arg(&key)
                                .arg("attr3")
                                .arg(vec![b'u'; args.value_bytes]),
                        )
                        .await?;
                        exec(&mut con, redis::cmd("EXPIRE").arg(&key).arg(TTL_SECS)).await
                    }
                    Op::Update => {
                        let current: Option<Vec<u8>> = redis::cmd("GET")
                            .arg(&key)
                            .query_async(&mut con)
                            .await
                            .map_err(redis_err)?;
                        let mut map: BTreeMap<String, String> = current
                            .and_then(|b| serde_json::from_slice(&b).ok())
                            .unwrap_or_default();
                        map.insert("attr3".into(), "u".repeat(args.value_bytes));
                        let body = serde_json::to_vec(&map).expect("serialisable");
                        exec(
                            &mut con,
                            redis::cmd("SET")
                                .arg(&key)
                                .arg(body)
                                .arg("EX")
                                .arg(TTL_SECS),
                        )
                        .await
                    }
                    Op::Destroy => {
                        exec(&mut con, redis::cmd("DEL").arg(&key)).await?;
                        exec(
                            &mut con,
                            redis::cmd("SREM").arg(format!("user:{user}")).arg(&id),
                        )
                        .await?;
                        pool.set(slot, None);
                        Ok(())
                    }
                    Op::Regenerate => {
                        let fresh = new_redis_id(rng);
                        let new_key = format!("sess:{fresh}");
                        if hset {
                            // RENAME moves a hash in one step; EXPIRE keeps the TTL.
                            exec(&mut con, redis::cmd("RENAME").arg(&key).arg(&new_key)).await?;
                        } else {
                            let body: Option<Vec<u8>> = redis::cmd("GET")
                                .arg(&key)
                                .query_async(&mut con)
                                .await
                                .map_err(redis_err)?;
                            let body = body.ok_or("missing")?;
                            exec(
                                &mut con,
                                redis::cmd("SET")
                                    .arg(&new_key)
                                    .arg(body)
                                    .arg("EX")
                                    .arg(TTL_SECS)
                                    .arg("NX"),
                            )
                            .await?;
                            exec(&mut con, redis::cmd("DEL").arg(&key)).await?;
                        }
                        let set = format!("user:{user}");
                        exec(&mut con, redis::cmd("SADD").arg(&set).arg(&fresh)).await?;
                        exec(&mut con, redis::cmd("SREM").arg(&set).arg(&id)).await?;
                        pool.set(slot, Some((fresh, user)));
                        Ok(())
                    }
                    Op::Create | Op::List => unreachable!("handled above"),
                }
            }
        }
    }

    async fn list(&self, conn: usize, user: usize) -> OpResult {
        match self {
            Backend::Grpc(c) => {
                let req = pb::ListUserSessionsRequest {
                    user_id: format!("user{user}"),
                    include_attributes: false,
                };
                c[conn % c.len()]
                    .call(pb::pipeline_request::Op::ListUserSessions(req))
                    .await
                    .map(drop)
            }
            Backend::Redis(c, mode) => {
                let mut con = c[conn % c.len()].clone();
                let ids: Vec<String> = redis::cmd("SMEMBERS")
                    .arg(format!("user:{user}"))
                    .query_async(&mut con)
                    .await
                    .map_err(redis_err)?;
                if ids.is_empty() {
                    return Ok(());
                }
                if *mode == RedisUpdate::Hset {
                    for id in ids {
                        redis::cmd("HGETALL")
                            .arg(format!("sess:{id}"))
                            .query_async::<Vec<Vec<u8>>>(&mut con)
                            .await
                            .map_err(redis_err)?;
                    }
                    Ok(())
                } else {
                    let mut cmd = redis::cmd("MGET");
                    for id in &ids {
                        cmd.arg(format!("sess:{id}"));
                    }
                    cmd.query_async::<Vec<Option<Vec<u8>>>>(&mut con)
                        .await
                        .map(drop)
                        .map_err(redis_err)
                }
            }
        }
    }

    /// Server CPU seconds and RSS bytes, if the server tells.
    async fn server_stats(&self, args: &Args) -> Option<(f64, f64)> {
        match self {
            Backend::Grpc(_) => {
                let body = sessiond_tools::admin::fetch(
                    &args.admin_addr,
                    "/metrics",
                    Duration::from_secs(5),
                )
                .await
                .ok()?;
                Some((
                    sessiond_tools::admin::sample(&body, "sessiond_process_cpu_seconds_total")?,
                    sessiond_tools::admin::sample(&body, "sessiond_process_resident_memory_bytes")?,
                ))
            }
            Backend::Redis(c, _) => {
                let mut con = c[0].clone();
                let info: String = redis::cmd("INFO")
                    .arg("all")
                    .query_async(&mut con)
                    .await
                    .ok()?;
                let field = |name: &str| {
                    info.lines().find_map(|l| {
                        l.strip_prefix(name)?
                            .strip_prefix(':')?
                            .trim()
                            .parse::<f64>()
                            .ok()
                    })
                };
                Some((
                    field("used_cpu_sys")? + field("used_cpu_user")?,
                    field("used_memory_rss")?,
                ))
            }
        }
    }

    /// Redis's own accounting: used_memory and the number of keys.
    async fn redis_memory(&self) -> Option<(f64, f64)> {
        let Backend::Redis(c, _) = self else {
            return None;
        };
        let mut con = c[0].clone();
        let info: String = redis::cmd("INFO")
            .arg("memory")
            .query_async(&mut con)
            .await
            .ok()?;
        let used = info
            .lines()
            .find_map(|l| l.strip_prefix("used_memory:")?.trim().parse::<f64>().ok())?;
        let keys: u64 = redis::cmd("DBSIZE").query_async(&mut con).await.ok()?;
        Some((used, keys as f64))
    }
}

/// Runs a Redis command whose reply is not needed.
async fn exec(con: &mut redis::aio::MultiplexedConnection, cmd: &redis::Cmd) -> OpResult {
    cmd.query_async::<()>(con).await.map_err(redis_err)
}

fn redis_err(e: redis::RedisError) -> String {
    format!("redis {:?}", e.kind())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sessiond-bench: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    let mix = parse_mix(&args.mix)?;
    let total: u32 = mix.iter().map(|(_, w)| w).sum();
    let backend = Backend::connect(&args).await?;
    let args = Arc::new(args);

    // Populate, measuring the server's memory before and after.
    let memory_before = match backend.redis_memory().await {
        Some((used, _)) => Some(used),
        None => backend.server_stats(&args).await.map(|(_, rss)| rss),
    };
    let started = Instant::now();
    let pool = Arc::new(Pool {
        slots: (0..args.sessions.max(1))
            .map(|_| Mutex::new(None))
            .collect(),
        next_user: AtomicUsize::new(args.sessions),
    });
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for w in 0..args.concurrency.max(1) {
        let (backend, pool, next, args) =
            (backend.clone(), pool.clone(), next.clone(), args.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = SmallRng::seed_from_u64(w as u64);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= args.sessions {
                    return Ok::<(), String>(());
                }
                let id = backend.create(w, &args, i / 4, &mut rng).await?;
                pool.set(i, Some((id, i / 4)));
            }
        }));
    }
    for t in tasks {
        t.await.map_err(|e| e.to_string())??;
    }
    let populate_secs = started.elapsed().as_secs_f64();
    let n = args.sessions as f64;
    let memory_after_populate = match (backend.redis_memory().await, memory_before) {
        (Some((used, keys)), Some(before)) => Some(json!({
            "measure": "redis used_memory",
            "bytes": used,
            "redis_keys": keys,
            "bytes_per_session": (used - before) / n,
        })),
        (None, Some(before)) => backend.server_stats(&args).await.map(|(_, rss)| {
            json!({
                "measure": "sessiond RSS",
                "bytes": rss,
                "bytes_per_session": (rss - before) / n,
            })
        }),
        _ => None,
    };

    // Warm up, then measure.
    let before_stats = std::sync::Arc::new(tokio::sync::Mutex::new(None));
    let measure_from = Instant::now() + args.warmup;
    let stop_at = measure_from + args.duration;
    let schedule = args.rate.map(|rate| Schedule::start(rate, stop_at));
    let mut workers = Vec::new();
    for w in 0..args.concurrency.max(1) {
        let (backend, pool, args, mix) = (backend.clone(), pool.clone(), args.clone(), mix.clone());
        let schedule = schedule.clone();
        workers.push(tokio::spawn(async move {
            let mut rng = SmallRng::seed_from_u64(1000 + w as u64);
            let mut tally = Tally::new(measure_from);
            // Closed loop: one request at a time, the next sent as soon as the last answers.
            // Open loop: a request whenever the schedule releases one, up to
            // OPEN_LOOP_IN_FLIGHT outstanding, each timed from when it was due.
            let cap = if schedule.is_some() {
                OPEN_LOOP_IN_FLIGHT
            } else {
                1
            };
            let mut in_flight = FuturesUnordered::new();
            let mut scheduled = schedule.is_some();
            loop {
                let now = Instant::now();
                let due = match &schedule {
                    None if in_flight.is_empty() && now < stop_at => Some(now),
                    None => None,
                    Some(schedule) if scheduled && in_flight.len() < cap => tokio::select! {
                        biased;
                        Some((op, t0, result)) = in_flight.next(), if !in_flight.is_empty() => {
                            tally.record(op, t0, result);
                            continue;
                        }
                        due = schedule.next() => {
                            scheduled = due.is_some();
                            due
                        }
                    },
                    Some(_) => None,
                };
                if let Some(t0) = due {
                    let op = pick(&mix, rng.random_range(0..total));
                    let slot = rng.random_range(0..pool.slots.len());
                    let mut op_rng = SmallRng::seed_from_u64(rng.random());
                    let (backend, pool, args) = (&backend, &pool, &args);
                    in_flight.push(async move {
                        let result = backend.run(op, w, pool, slot, args, &mut op_rng).await;
                        (op, t0, result)
                    });
                    continue;
                }
                match in_flight.next().await {
                    Some((op, t0, result)) => tally.record(op, t0, result),
                    None => return tally,
                }
            }
        }));
    }
    tokio::time::sleep_until(measure_from.into()).await;
    *before_stats.lock().await = backend.server_stats(&args).await;
    let mut merged = Tally::new(measure_from);
    for w in workers {
        let t = w.await.map_err(|e| e.to_string())?;
        for (name, h) in t.hist {
            merged
                .hist
                .get_mut(name)
                .expect("every op")
                .add(&h)
                .expect("same bounds");
        }
        for (k, v) in t.errors {
            *merged.errors.entry(k).or_default() += v;
        }
    }
    let after = backend.server_stats(&args).await;
    let secs = args.duration.as_secs_f64();
    let mut all = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
    let mut per_op = serde_json::Map::new();
    for (_, name) in OPS {
        let h = &merged.hist[name];
        all.add(h).expect("same bounds");
        if !h.is_empty() {
            per_op.insert(name.into(), summary(h, secs));
        }
    }
    let server = match (*before_stats.lock().await, after) {
        (Some((cpu0, _)), Some((cpu1, rss))) => {
            json!({"cpu_seconds": cpu1 - cpu0, "cpu_per_second": (cpu1 - cpu0) / secs, "rss_bytes": rss})
        }
        _ => json!(null),
    };
    let report = json!({
        "target": args.target,
        "redis_update": (args.target.starts_with("redis://")).then(|| format!("{:?}", args.redis_update).to_lowercase()),
        "pipeline": args.pipeline,
        "offered_rate": args.rate,
        "sessions": args.sessions,
        "session_bytes": args.attributes * args.value_bytes,
        "concurrency": args.concurrency,
        "connections": args.connections,
        "duration_seconds": secs,
        "populate_seconds": populate_secs,
        "overall": summary(&all, secs),
        "operations": per_op,
        "errors": merged.errors,
        "server": server,
        "memory_after_populate": memory_after_populate,
    });
    if args.json {
        println!("{report}");
    } else {
        print_table(&report);
    }
    Ok(())
}

fn summary(h: &Histogram<u64>, secs: f64) -> serde_json::Value {
    json!({
        "ops": h.len(),
        "ops_per_second": h.len() as f64 / secs,
        "p50_us": h.value_at_quantile(0.50),
        "p99_us": h.value_at_quantile(0.99),
        "p999_us": h.value_at_quantile(0.999),
    })
}

fn print_table(r: &serde_json::Value) {
    println!(
        "target {}  sessions {}  concurrency {} over {} connections  {} s",
        r["target"], r["sessions"], r["concurrency"], r["connections"], r["duration_seconds"]
    );
    println!(
        "{:<12} {:>12} {:>10} {:>10} {:>10}",
        "operation", "ops/s", "p50 us", "p99 us", "p99.9 us"
    );
    let row = |name: &str, v: &serde_json::Value| {
        println!(
            "{:<12} {:>12.0} {:>10} {:>10} {:>10}",
            name,
            v["ops_per_second"].as_f64().unwrap_or(0.0),
            v["p50_us"],
            v["p99_us"],
            v["p999_us"]
        );
    };
    row("overall", &r["overall"]);
    if let Some(ops) = r["operations"].as_object() {
        for (name, v) in ops {
            row(name, v);
        }
    }
    if let Some(errors) = r["errors"].as_object() {
        for (k, v) in errors {
            println!("errors  {k}: {v}");
        }
    }
    println!("server  {}", r["server"]);
    println!("memory  {}", r["memory_after_populate"]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mix_parses_and_picks_by_weight() {
        let mix = parse_mix("get=80,update=12,create=4,destroy=2,regenerate=1,list=1").unwrap();
        let total: u32 = mix.iter().map(|(_, w)| w).sum();
        assert_eq!(total, 100);
        assert_eq!(pick(&mix, 0), Op::Get);
        assert_eq!(pick(&mix, 79), Op::Get);
        assert_eq!(pick(&mix, 80), Op::Update);
        assert_eq!(pick(&mix, 95), Op::Create);
        assert_eq!(pick(&mix, 96), Op::Destroy);
        assert_eq!(pick(&mix, 99), Op::List);
        let mut counts = HashMap::new();
        for roll in 0..total {
            *counts.entry(op_name(pick(&mix, roll))).or_insert(0) += 1;
        }
        assert_eq!(counts["update"], 12);
        assert!(parse_mix("get=80,fly=1").unwrap_err().contains("fly"));
        assert!(parse_mix("get=0").is_err());
        assert!(parse_mix("get").is_err());
    }

    #[tokio::test]
    async fn the_open_loop_schedule_hands_out_each_due_time_once_in_order_then_ends() {
        let rate = 10_000;
        let schedule = Schedule::start(rate, Instant::now() + Duration::from_millis(100));
        let mut due = Vec::new();
        while let Some(t) = schedule.next().await {
            due.push(t);
        }
        assert!(!due.is_empty(), "the pacer released nothing");
        assert_eq!(due[0], schedule.start);
        let every = Duration::from_secs(1) / rate;
        for pair in due.windows(2) {
            let gap = pair[1] - pair[0];
            assert!(
                gap.abs_diff(every) < Duration::from_micros(1),
                "gap {gap:?}"
            );
        }
        assert!(
            schedule.next().await.is_none(),
            "a closed schedule stays closed"
        );
    }

    #[test]
    fn redis_blobs_are_json_of_the_attributes() {
        let a = vec![("k".to_string(), Bytes::from_static(b"v"))];
        assert_eq!(blob(&a), br#"{"k":"v"}"#);
    }
}
