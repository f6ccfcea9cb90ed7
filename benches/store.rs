//! Store operations at 1M and 10M live sessions of about 1 KiB (8 attributes of 128 bytes),
//! in process and without gRPC: the ceiling the daemon's network path is measured against
//! (and a Get's reply encoded for the wire, as the server does it and through the generated
//! message); and the reaper's cost while 100k sessions expire per second.
//!
//! Run: `cargo bench --bench store`. `SESSIOND_BENCH_SESSIONS` (comma-separated) changes the
//! populations.
// criterion_group! defines an undocumented public function.
#![allow(missing_docs)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use prost::Message as _;
use sessiond::clock::Clock;
use sessiond::store::events::Discard;
use sessiond::store::{Change, NewSession, Rotation, Store};

/// The live populations the store ops run at: `SESSIOND_BENCH_SESSIONS`, comma-separated
/// (default 1M and 10M; 10M sessions of 1 KiB take about 16 GB).
fn populations() -> Vec<usize> {
    std::env::var("SESSIOND_BENCH_SESSIONS")
        .unwrap_or_else(|_| "1000000,10000000".into())
        .split(',')
        .filter_map(|v| v.trim().parse().ok())
        .collect()
}

fn session_attributes() -> Vec<(String, Bytes)> {
    (0..8)
        .map(|i| (format!("attr{i}"), Bytes::from(vec![b'x'; 128])))
        .collect()
}

fn filled_store(n: usize) -> (Store, Vec<String>) {
    let store = Store::new(common::limits(), 64, Clock::system(), Box::new(Discard));
    let ids = (0..n)
        .map(|i| {
            store
                .create(NewSession {
                    user: (i % 4 == 0).then(|| format!("user{}", i / 4)),
                    attributes: session_attributes(),
                    ..NewSession::default()
                })
                .expect("create")
                .key
                .encode()
        })
        .collect();
    (store, ids)
}

fn store_ops(c: &mut Criterion) {
    for n in populations() {
        store_ops_at(c, n);
    }
}

fn store_ops_at(c: &mut Criterion, n: usize) {
    let (store, ids) = filled_store(n);
    let mut group = c.benchmark_group(format!("store_{n}_sessions"));
    group.throughput(Throughput::Elements(1));
    group.measurement_time(Duration::from_secs(5));

    let mut i = 0usize;
    group.bench_function("get_sliding", |b| {
        b.iter(|| {
            i = (i + 7919) % ids.len();
            store.get(&ids[i], false).expect("get")
        })
    });

    // A Get as the server answers it: the read, then its reply encoded for the wire, straight
    // from the store's session; and, for reference, through the generated message (a map of
    // the attributes, and a `String` per key), the way replies were built before.
    let mut buf = bytes::BytesMut::with_capacity(4096);
    group.bench_function("get_reply_encoded", |b| {
        b.iter(|| {
            i = (i + 7919) % ids.len();
            let s = store.get(&ids[i], false).expect("get");
            buf.clear();
            sessiond::api::serve::Session::from(s)
                .encode(&mut buf)
                .expect("room");
            buf.len()
        })
    });
    group.bench_function("get_reply_encoded_via_generated_message", |b| {
        b.iter(|| {
            i = (i + 7919) % ids.len();
            let s = store.get(&ids[i], false).expect("get");
            buf.clear();
            generated(s).encode(&mut buf).expect("room");
            buf.len()
        })
    });

    let value = Bytes::from(vec![b'y'; 128]);
    group.bench_function("update_one_attribute", |b| {
        b.iter(|| {
            i = (i + 7919) % ids.len();
            store
                .update(
                    &ids[i],
                    Change {
                        set: vec![("attr3".to_string(), value.clone())],
                        ..Change::default()
                    },
                )
                .expect("update")
        })
    });

    group.bench_function("create_then_destroy", |b| {
        b.iter(|| {
            let s = store
                .create(NewSession {
                    attributes: session_attributes(),
                    ..NewSession::default()
                })
                .expect("create");
            store.destroy(&s.key.encode()).expect("destroy")
        })
    });

    // Regenerate consumes its input ID, so each iteration rotates a fresh session.
    group.bench_function("regenerate", |b| {
        b.iter_batched(
            || {
                store
                    .create(NewSession {
                        attributes: session_attributes(),
                        ..NewSession::default()
                    })
                    .expect("create")
                    .key
                    .encode()
            },
            |id| {
                store
                    .regenerate(&id, Rotation::default())
                    .expect("regenerate")
            },
            BatchSize::SmallInput,
        )
    });
    // A snapshot's body (every session copied out and encoded), into a sink: its CPU, without
    // the disk. Per session, so the figure compares across populations.
    group.sample_size(10);
    group.bench_function("snapshot_body_per_session", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut done = 0u64;
            while done < iters {
                let started = std::time::Instant::now();
                let (sessions, _) =
                    sessiond::persist::write_sessions(&store, &mut std::io::sink()).expect("sink");
                total += started.elapsed();
                done += sessions.max(1);
            }
            total.mul_f64(iters as f64 / done as f64)
        })
    });
    group.finish();
    println!(
        "store holds {} sessions, ~{} bytes by its own accounting",
        store.stats().sessions,
        store.stats().bytes
    );
}

/// `s` as the generated `Session` message, built field by field.
fn generated(s: sessiond::session::Session) -> sessiond::api::pb::Session {
    use sessiond::api::pb;
    use sessiond::api::reply::{duration, timestamp};
    pb::Session {
        id: s.key.encode(),
        user_id: s.user.as_deref().unwrap_or_default().to_owned(),
        attributes: s.attributes.to_map(),
        version: s.version,
        created_at: Some(timestamp(s.created_at)),
        last_access_at: Some(timestamp(s.last_access_at)),
        expires_at: Some(timestamp(s.expires_at())),
        absolute_expires_at: Some(timestamp(s.absolute_expires_at)),
        idle_timeout: Some(duration(s.idle_timeout)),
        client: Some(pb::ClientInfo {
            ip: s.client.ip,
            user_agent: s.client.user_agent,
        }),
    }
}

/// Sessions expiring per second of the mass-expiry bench.
const EXPIRING_PER_SECOND: usize = 100_000;

/// The reaper while 100k sessions expire every second, beside 1M live ones: what freeing one
/// second's worth costs, and what it does to the latency of reads running beside it.
fn mass_expiry(c: &mut Criterion) {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let clock = Clock::manual(1_700_000_000_000);
    let store = Store::new(common::limits(), 64, clock.clone(), Box::new(Discard));
    let live: Arc<Vec<String>> = Arc::new(
        (0..1_000_000)
            .map(|_| {
                store
                    .create(NewSession {
                        attributes: session_attributes(),
                        idle_timeout: Some(Duration::from_secs(24 * 3600)),
                        ..NewSession::default()
                    })
                    .expect("create")
                    .key
                    .encode()
            })
            .collect(),
    );
    // One second's expiries: created now, dead a second later.
    let doomed = || {
        for _ in 0..EXPIRING_PER_SECOND {
            store
                .create(NewSession {
                    attributes: session_attributes(),
                    idle_timeout: Some(Duration::from_secs(1)),
                    ..NewSession::default()
                })
                .expect("create");
        }
        clock.advance(Duration::from_secs(2));
    };
    let reap_all = || {
        let t = std::time::Instant::now();
        while store.reap(1000).more {}
        t.elapsed()
    };

    // Read latency on one thread, without and then beside a reaper freeing 100k sessions.
    let reads = |reaping: bool| {
        if reaping {
            doomed();
        }
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let (store, ids, stop) = (store.clone(), live.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut h = hdrhistogram::Histogram::<u64>::new(3).expect("histogram");
                let mut i = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    i = (i + 7919) % ids.len();
                    let t = std::time::Instant::now();
                    store.get(&ids[i], true).expect("get");
                    h.record(t.elapsed().as_nanos() as u64).expect("in range");
                }
                h
            })
        };
        let took = if reaping {
            reap_all()
        } else {
            std::thread::sleep(Duration::from_millis(200));
            Duration::ZERO
        };
        stop.store(true, Ordering::Relaxed);
        let h = reader.join().expect("reader");
        (took, h.value_at_quantile(0.5), h.value_at_quantile(0.99))
    };
    let (_, idle_p50, idle_p99) = reads(false);
    let (took, busy_p50, busy_p99) = reads(true);
    println!(
        "mass expiry: freeing {EXPIRING_PER_SECOND} expired sessions took {:.1} ms ({:.1}% of a core at 100k expiries/s); \
         get p50/p99 {idle_p50}/{idle_p99} ns without the reaper, {busy_p50}/{busy_p99} ns beside it",
        took.as_secs_f64() * 1e3,
        took.as_secs_f64() * 100.0,
    );

    let mut group = c.benchmark_group("mass_expiry");
    group.sample_size(10);
    group.warm_up_time(Duration::from_millis(500));
    group.throughput(Throughput::Elements(EXPIRING_PER_SECOND as u64));
    group.bench_function("reap_one_second_of_100k_expiries", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| {
                    doomed();
                    reap_all()
                })
                .sum()
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).warm_up_time(Duration::from_secs(1));
    targets = store_ops, mass_expiry
}
criterion_main!(benches);
