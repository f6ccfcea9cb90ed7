//! Store operations at 1M live sessions of about 1 KiB (8 attributes of 128 bytes), in
//! process and without gRPC: the ceiling the daemon's network path is measured against.
//!
//! Run: `cargo bench --bench store`. Set `SESSIOND_BENCH_SESSIONS` to change the population.

use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use sessiond::clock::Clock;
use sessiond::store::events::Discard;
use sessiond::store::{Change, Limits, NewSession, Rotation, Store};

/// The daemon's allocator, so the figures are the daemon's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn population() -> usize {
    std::env::var("SESSIOND_BENCH_SESSIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000)
}

fn session_attributes() -> Vec<(String, Bytes)> {
    (0..8)
        .map(|i| (format!("attr{i}"), Bytes::from(vec![b'x'; 128])))
        .collect()
}

fn filled_store(n: usize) -> (Store, Vec<String>) {
    let store = Store::new(Limits::default(), 64, Clock::system(), Box::new(Discard));
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
    let n = population();
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
    group.finish();
    println!(
        "store holds {} sessions, ~{} bytes by its own accounting",
        store.stats().sessions,
        store.stats().bytes
    );
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).warm_up_time(Duration::from_secs(1));
    targets = store_ops
}
criterion_main!(benches);
