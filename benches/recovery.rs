//! Recovery time at 1M sessions: load the snapshot, replay the log tail, rebuild the Store.
//!
//! Run: `cargo bench --bench recovery`. `SESSIOND_BENCH_SESSIONS` changes the population;
//! `SESSIOND_BENCH_VALUE_BYTES` the size of each session's one attribute (default 200).
//! `SESSIOND_BENCH_TAIL_PERCENT` makes the log tail that large a share of the snapshot by
//! rewriting sessions' attribute (100: a tail as large as the snapshot, what
//! `snapshot_log_percent = 100` lets accumulate); unset, the tail updates 10% of sessions.
// criterion_group! defines an undocumented public function.
#![allow(missing_docs)]

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use sessiond::clock::Clock;
use sessiond::observe::LogMetrics;
use sessiond::persist::log::FsyncPolicy;
use sessiond::persist::{recover, snapshot, Persistence};
use sessiond::store::events::Discard;
use sessiond::store::{Change, NewSession, Store};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn metrics() -> LogMetrics {
    LogMetrics::noop()
}

/// The store recovery loads into, sized as the daemon sizes it.
fn new_store(capacity: usize) -> Store {
    Store::with_capacity(
        common::limits(),
        64,
        Clock::system(),
        Box::new(Discard),
        capacity,
    )
}

fn recovery(c: &mut Criterion) {
    let n = env("SESSIOND_BENCH_SESSIONS", 1_000_000);
    let value = Bytes::from(vec![b'x'; env("SESSIOND_BENCH_VALUE_BYTES", 200)]);
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Clock::system();
    {
        let (p, _) = Persistence::open(dir.path(), FsyncPolicy::No, metrics()).expect("open");
        let store = Store::new(common::limits(), 64, clock.clone(), Box::new(p.log.clone()));
        let started = Instant::now();
        let mut ids = Vec::with_capacity(n);
        for i in 0..n {
            let s = store
                .create(NewSession {
                    user: (i % 4 == 0).then(|| format!("user{i}")),
                    attributes: vec![("cart".into(), value.clone())],
                    ..NewSession::default()
                })
                .expect("create");
            ids.push(s.key.encode());
        }
        let s = snapshot(dir.path(), &p.log, &store).expect("snapshot");
        match std::env::var("SESSIOND_BENCH_TAIL_PERCENT")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
        {
            // A log tail of `pct` percent of the snapshot's size: whole attributes rewritten.
            Some(pct) => {
                let want = s.bytes * pct / 100;
                let mut written = 0u64;
                'tail: loop {
                    for id in &ids {
                        if written >= want {
                            break 'tail;
                        }
                        store
                            .update(
                                id,
                                Change {
                                    set: vec![("cart".into(), value.clone())],
                                    ..Change::default()
                                },
                            )
                            .expect("update");
                        written += value.len() as u64 + 64;
                    }
                }
            }
            // A log tail after the snapshot: 10% of sessions updated.
            None => {
                for id in ids.iter().step_by(10) {
                    store
                        .update(
                            id,
                            Change {
                                set: vec![("theme".into(), Bytes::from_static(b"dark"))],
                                ..Change::default()
                            },
                        )
                        .expect("update");
                }
            }
        }
        p.log.close();
        let tail: u64 = std::fs::read_dir(dir.path())
            .expect("data dir")
            .filter_map(Result::ok)
            .filter(|e| e.path().extension().is_some_and(|x| x == "sdl"))
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum();
        println!(
            "setup: {n} sessions, snapshot {} MB, log tail {} MB, built in {:.1} s",
            s.bytes / 1_000_000,
            tail / 1_000_000,
            started.elapsed().as_secs_f64()
        );
    }

    // One pass, for the report: the whole recovery and what the snapshot held.
    let t = Instant::now();
    let r = recover(dir.path(), false, new_store).expect("recover");
    println!(
        "one pass: {:.2} s, {} sessions from the snapshot, {} log records applied",
        t.elapsed().as_secs_f64(),
        r.from_snapshot,
        r.records
    );
    drop(r);

    let mut group = c.benchmark_group("recovery");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(20));
    group.bench_function(format!("{n}_sessions_snapshot_plus_tail"), |b| {
        // Dropping a million sessions is not part of recovery: keep it out of the timing.
        b.iter_with_large_drop(|| {
            let r = recover(dir.path(), false, new_store).expect("recover");
            assert_eq!(r.store.stats().sessions, n);
            r
        })
    });
    group.finish();
}

criterion_group!(benches, recovery);
criterion_main!(benches);
