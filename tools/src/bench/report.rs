//! What the run measured: per-worker latency histograms and error counts, merged into one
//! report, printed as a table or as one JSON object (`--json`, read by benches/compare.sh).

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use hdrhistogram::Histogram;
use serde_json::{json, Value};

use crate::workload::{op_name, Op, OpResult, OPS};
use crate::Args;

/// What a worker measured: requests sent (or due) from `from` on.
pub(crate) struct Tally {
    from: Instant,
    hist: HashMap<&'static str, Histogram<u64>>,
    errors: BTreeMap<String, u64>,
}

/// A latency histogram: 1 µs to 60 s, 3 significant digits.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("bounds")
}

impl Tally {
    pub(crate) fn new(from: Instant) -> Self {
        Tally {
            from,
            hist: OPS.iter().map(|(_, n)| (*n, histogram())).collect(),
            errors: BTreeMap::new(),
        }
    }

    /// Counts one finished request sent (or due) at `t0`, if that was in the measured time.
    pub(crate) fn record(&mut self, op: Op, t0: Instant, result: OpResult) {
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

    /// Adds another worker's tally to this one.
    pub(crate) fn add(&mut self, other: Tally) {
        for (name, h) in other.hist {
            self.hist
                .get_mut(name)
                .expect("every op")
                .add(&h)
                .expect("same bounds");
        }
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
    }
}

/// The report of a run: the settings, the merged tally over `--duration`, the server's CPU
/// from `before` to `after` (CPU seconds, RSS bytes), the CPU seconds of each of `--pids`
/// at the same two moments, the CPU seconds this load generator spent between them (on the
/// same cores, unless pinned apart), and the memory the population took.
#[allow(clippy::too_many_arguments)]
pub(crate) fn build(
    args: &Args,
    tally: Tally,
    populate_secs: f64,
    before: Option<(f64, f64)>,
    after: Option<(f64, f64)>,
    procs: Option<(Vec<f64>, Vec<f64>)>,
    own_cpu_seconds: Option<f64>,
    memory_after_populate: Option<Value>,
) -> Value {
    let secs = args.duration.as_secs_f64();
    let mut all = histogram();
    let mut per_op = serde_json::Map::new();
    for (_, name) in OPS {
        let h = &tally.hist[name];
        all.add(h).expect("same bounds");
        if !h.is_empty() {
            per_op.insert(name.into(), summary(h, secs));
        }
    }
    let server = match (before, after) {
        (Some((cpu0, _)), Some((cpu1, rss))) => {
            json!({"cpu_seconds": cpu1 - cpu0, "cpu_per_second": (cpu1 - cpu0) / secs, "rss_bytes": rss})
        }
        _ => json!(null),
    };
    let processes = match procs {
        Some((cpu0, cpu1)) if !args.pids.is_empty() => {
            let each: Vec<f64> = cpu0
                .iter()
                .zip(&cpu1)
                .map(|(a, b)| (b - a) / secs)
                .collect();
            json!({"pids": args.pids, "cpu_per_second": each.iter().sum::<f64>(), "cpu_per_second_each": each})
        }
        _ => json!(null),
    };
    json!({
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
        "errors": tally.errors,
        "server": server,
        "processes": processes,
        "load_generator": own_cpu_seconds.map(|cpu| json!({"cpu_seconds": cpu, "cpu_per_second": cpu / secs})),
        "memory_after_populate": memory_after_populate,
    })
}

fn summary(h: &Histogram<u64>, secs: f64) -> Value {
    json!({
        "ops": h.len(),
        "ops_per_second": h.len() as f64 / secs,
        "p50_us": h.value_at_quantile(0.50),
        "p99_us": h.value_at_quantile(0.99),
        "p999_us": h.value_at_quantile(0.999),
    })
}

/// The report as a table, for a person.
pub(crate) fn print_table(r: &Value) {
    println!(
        "target {}  sessions {}  concurrency {} over {} connections  {} s",
        r["target"], r["sessions"], r["concurrency"], r["connections"], r["duration_seconds"]
    );
    println!(
        "{:<12} {:>12} {:>10} {:>10} {:>10}",
        "operation", "ops/s", "p50 us", "p99 us", "p99.9 us"
    );
    let row = |name: &str, v: &Value| {
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
    println!("load generator  {}", r["load_generator"]);
    if !r["processes"].is_null() {
        println!("processes  {}", r["processes"]);
    }
    println!("memory  {}", r["memory_after_populate"]);
}
