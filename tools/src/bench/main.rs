//! `sessiond-bench`: a session-shaped load generator for sessiond, and the same logical
//! workload against Redis the way a Redis-backed session library runs it.
//!
//! A population of sessions (default 100k, 8 attributes of 128 bytes, four per user) is
//! created first; then `--concurrency` workers over `--connections` connections run a mix
//! of session operations for `--duration`. Latency is recorded per operation in HDR
//! histograms (one per worker, merged at the end, so recording takes no lock).
//!
//! One logical operation against Redis costs what a session library spends on it:
//! - Get (sliding): GET and decoding the blob into the attributes, then EXPIRE;
//! - Update one attribute: GET, then SET ... EX of the whole blob (`--redis-update blob`),
//!   or HSET then EXPIRE on a hash (`--redis-update hset`);
//! - Create: SET ... EX NX, then SADD to the user's set;
//! - Destroy: DEL, then SREM;
//! - Regenerate: GET, then SET ... EX NX under the new ID, then DEL the old, then SADD/SREM;
//! - ListUserSessions: SMEMBERS, then MGET.
//!
//! # Layout
//!
//! - `workload`: the operations, the mix that picks them, the pool of live sessions.
//! - `schedule`: the open loop's pacer, for `--rate`.
//! - `backend`: one interface over the two backends, and what each operation does to the
//!   pool; `grpc` (unary or Pipeline) and `redis` send the operations.
//! - `report`: latency histograms and error counts, merged into the table or JSON report.
//! - `procs`: the CPU time of every server process of a run (`--pids`), from `/proc`.

mod backend;
mod grpc;
mod procs;
mod redis;
mod report;
mod schedule;
mod workload;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use futures_util::stream::{FuturesUnordered, StreamExt};
use rand::rngs::SmallRng;
use rand::SeedableRng;
use serde_json::json;

use crate::backend::Backend;
use crate::redis::RedisUpdate;
use crate::report::Tally;
use crate::schedule::{Schedule, OPEN_LOOP_IN_FLIGHT};
use crate::workload::{draw, parse_mix, Pool};

/// Session-shaped load against sessiond (grpc://) or Redis (redis://).
#[derive(Parser, Clone)]
#[command(version)]
pub(crate) struct Args {
    /// grpc://HOST:PORT for sessiond, redis://HOST:PORT for Redis.
    #[arg(long, default_value = "grpc://127.0.0.1:7420")]
    pub(crate) target: String,
    /// sessiond's admin address, for server CPU and RSS (ignored for Redis).
    #[arg(long, default_value = "127.0.0.1:7421")]
    pub(crate) admin_addr: String,
    /// Live sessions created before the run.
    #[arg(long, default_value_t = 100_000)]
    pub(crate) sessions: usize,
    /// Attributes per session.
    #[arg(long, default_value_t = 8)]
    pub(crate) attributes: usize,
    /// Bytes per attribute value.
    #[arg(long, default_value_t = 128)]
    pub(crate) value_bytes: usize,
    /// Operation mix, as weights: get,update,create,destroy,regenerate,list.
    #[arg(
        long,
        default_value = "get=80,update=12,create=4,destroy=2,regenerate=1,list=1"
    )]
    pub(crate) mix: String,
    /// Requests in flight.
    #[arg(long, default_value_t = 50)]
    pub(crate) concurrency: usize,
    /// Connections the workers share.
    #[arg(long, default_value_t = 4)]
    pub(crate) connections: usize,
    /// The generator's own worker threads; 0: one per CPU less one, at least one. Two
    /// threads on two cores spend about half the generator's CPU waking each other, and
    /// the generator shares the machine with the server it measures.
    #[arg(long, default_value_t = 0)]
    pub(crate) threads: usize,
    /// Measured run time.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub(crate) duration: Duration,
    /// Unmeasured run time before it.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub(crate) warmup: Duration,
    /// Open loop: offer this many operations per second in all, whatever the latency,
    /// instead of sending the next request as soon as the last answered. A pacer thread
    /// releases requests as they fall due (every 100 µs), each worker keeps up to 64 in
    /// flight, and latency counts from when a request was due, so a server that falls behind
    /// cannot hide its queue.
    #[arg(long)]
    pub(crate) rate: Option<u32>,
    /// Send sessiond's operations over one Pipeline stream per connection instead of unary
    /// RPCs.
    #[arg(long)]
    pub(crate) pipeline: bool,
    /// Keep sessiond's calls on `--target` even when it is a follower of a replicated group
    /// (which forwards them to the leader), instead of moving to the leader it names.
    #[arg(long)]
    pub(crate) no_follow_leader: bool,
    /// How Redis updates one attribute.
    #[arg(long, value_enum, default_value_t = RedisUpdate::Blob)]
    pub(crate) redis_update: RedisUpdate,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub(crate) json: bool,
    /// Every server process of the run, as Linux PIDs (e.g. a replicated group's members, or
    /// Redis and its replica): their CPU over the measured time is reported together, beside
    /// the target's own.
    #[arg(long, value_delimiter = ',', value_name = "PID,...")]
    pub(crate) pids: Vec<u32>,
}

impl Args {
    /// The runtime's worker threads: `--threads`, or when that is 0, one per CPU less one
    /// (at least one), as sessiond's own default.
    fn worker_threads(&self) -> usize {
        match self.threads {
            0 => std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .saturating_sub(1)
                .max(1),
            n => n,
        }
    }
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.worker_threads())
        .enable_all()
        .build();
    let result = match runtime {
        Ok(runtime) => runtime.block_on(run(args)),
        Err(e) => Err(format!("cannot start the async runtime: {e}")),
    };
    match result {
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
    let measure_from = Instant::now() + args.warmup;
    let stop_at = measure_from + args.duration;
    let schedule = args.rate.map(|rate| Schedule::start(rate, stop_at));
    // A marker on stderr when the measured window opens, for a profiler to start on
    // (benches/profile.sh); the report itself is on stdout.
    let window = args.duration;
    tokio::spawn(async move {
        tokio::time::sleep_until(measure_from.into()).await;
        eprintln!(
            "sessiond-bench: measuring for {}",
            humantime::format_duration(window)
        );
    });
    let mut workers = Vec::new();
    for w in 0..args.concurrency.max(1) {
        let (backend, pool, args, mix) = (backend.clone(), pool.clone(), args.clone(), mix.clone());
        let schedule = schedule.clone();
        workers.push(tokio::spawn(async move {
            let mut rng = SmallRng::seed_from_u64(1000 + w as u64);
            let mut tally = Tally::new(measure_from);
            // Closed loop: one request at a time, the next sent as soon as the last answers,
            // awaited in place (the generator's own cost is charged to the machine the
            // servers share, so it allocates nothing per request here).
            let Some(schedule) = schedule else {
                while Instant::now() < stop_at {
                    let t0 = Instant::now();
                    let (op, slot, mut op_rng) = draw(&mix, total, pool.slots.len(), &mut rng);
                    let result = backend.run(op, w, &pool, slot, &args, &mut op_rng).await;
                    tally.record(op, t0, result);
                }
                return tally;
            };
            // Open loop: OPEN_LOOP_IN_FLIGHT lanes, each taking the next request the schedule
            // releases whenever it is free and awaiting it in place, as the closed loop does
            // (a request allocates nothing of the generator's); each is timed from when it
            // was due. The lanes share the worker's tally, never across an await.
            let shared = Mutex::new(tally);
            let (backend, pool, args, mix, tally) = (&backend, &pool, &args, &mix, &shared);
            let mut lanes = (0..OPEN_LOOP_IN_FLIGHT)
                .map(|_| {
                    let mut rng = SmallRng::from_rng(&mut rng);
                    let schedule = &schedule;
                    async move {
                        while let Some(t0) = schedule.next().await {
                            let (op, slot, mut op_rng) =
                                draw(mix, total, pool.slots.len(), &mut rng);
                            let result = backend.run(op, w, pool, slot, args, &mut op_rng).await;
                            tally
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .record(op, t0, result);
                        }
                    }
                })
                .collect::<FuturesUnordered<_>>();
            while lanes.next().await.is_some() {}
            drop(lanes);
            shared.into_inner().unwrap_or_else(|e| e.into_inner())
        }));
    }
    tokio::time::sleep_until(measure_from.into()).await;
    let before = backend.server_stats(&args).await;
    let procs_before = procs::cpu_seconds(&args.pids);
    let own_before = procs::cpu_seconds(&[std::process::id()]);
    let mut merged = Tally::new(measure_from);
    for w in workers {
        merged.add(w.await.map_err(|e| e.to_string())?);
    }
    let after = backend.server_stats(&args).await;
    let procs_after = procs::cpu_seconds(&args.pids);
    let own_after = procs::cpu_seconds(&[std::process::id()]);
    let report = report::build(
        &args,
        merged,
        populate_secs,
        before,
        after,
        procs_before.zip(procs_after),
        own_before.zip(own_after).map(|(a, b)| b[0] - a[0]),
        memory_after_populate,
    );
    if args.json {
        println!("{report}");
    } else {
        report::print_table(&report);
    }
    Ok(())
}
