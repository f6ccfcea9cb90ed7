//! `sessionctl stats`: a readable summary of the daemon's `/metrics`.

use serde_json::{json, Value};
use tonic::Code;

use crate::{Cli, Failure};

/// The metrics `stats` shows, in order: (label, metric, unit).
const STATS: &[(&str, &str, &str)] = &[
    ("sessions", "sessiond_sessions_active", ""),
    ("users", "sessiond_users_with_sessions", ""),
    ("session_bytes", "sessiond_session_bytes", "bytes"),
    ("created", "sessiond_sessions_created_total", ""),
    ("updated", "sessiond_sessions_updated_total", ""),
    ("destroyed", "sessiond_sessions_destroyed_total", ""),
    ("expired", "sessiond_sessions_expired_total", ""),
    ("regenerated", "sessiond_sessions_regenerated_total", ""),
    ("evicted", "sessiond_sessions_evicted_total", ""),
    ("id_misses", "sessiond_session_id_misses_total", ""),
    ("rss", "sessiond_process_resident_memory_bytes", "bytes"),
    ("open_fds", "sessiond_process_open_fds", ""),
    ("cpu_seconds", "sessiond_process_cpu_seconds_total", "s"),
    ("uptime_seconds", "sessiond_uptime_seconds", "s"),
];

pub(crate) async fn stats(cli: &Cli) -> Result<Value, Failure> {
    let body = sessiond_tools::admin::fetch(&cli.admin_addr, "/metrics", cli.timeout)
        .await
        .map_err(|why| Failure {
            code: Code::Unavailable as u8,
            message: format!(
                "UNAVAILABLE: cannot read metrics from {}: {why}",
                cli.admin_addr
            ),
        })?;
    let mut requests = 0.0;
    let mut errors = 0.0;
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        let Some((name, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (Some(labels), Ok(value)) = (
            name.strip_prefix("sessiond_grpc_requests_total{"),
            value.parse::<f64>(),
        ) else {
            continue;
        };
        // Operations inside Pipeline streams are not requests of their own.
        if labels.contains("via=\"pipeline\"") {
            continue;
        }
        requests += value;
        if !labels.contains("code=\"OK\"") && !labels.contains("code=\"NotFound\"") {
            errors += value;
        }
    }
    // Per-tenant series are summed: the daemon's totals.
    let mut out = serde_json::Map::new();
    for (label, metric, _) in STATS {
        if let Some(v) = sessiond_tools::admin::sample(&body, metric) {
            out.insert((*label).into(), json!(v));
        }
    }
    out.insert("grpc_requests".into(), json!(requests));
    out.insert("grpc_errors".into(), json!(errors));
    Ok(Value::Object(out))
}
