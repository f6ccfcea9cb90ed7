//! How sessionctl prints: every answer is built as JSON (printed as is with `--json`), and
//! turned into aligned text for a person otherwise.

use std::collections::BTreeMap;
use std::time::{Duration, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde_json::{json, Value};
use sessiond_client::pb;

/// A protobuf timestamp in RFC 3339, to the second; `null` when absent.
pub(crate) fn timestamp(t: Option<prost_types::Timestamp>) -> Value {
    let Some(t) = t else { return Value::Null };
    let at = UNIX_EPOCH + Duration::new(t.seconds.max(0) as u64, t.nanos.max(0) as u32);
    json!(humantime::format_rfc3339_seconds(at).to_string())
}

/// An attribute value as text when it is UTF-8, else as `base64:...` (what `--set` reads).
fn value_text(v: &[u8]) -> String {
    match std::str::from_utf8(v) {
        Ok(s) => s.to_string(),
        Err(_) => format!("base64:{}", STANDARD.encode(v)),
    }
}

/// A session as sessionctl shows it, its ID first.
pub(crate) fn session_json(s: &pb::Session) -> Value {
    let attributes: BTreeMap<&str, String> = s
        .attributes
        .iter()
        .map(|(k, v)| (k.as_str(), value_text(v)))
        .collect();
    let client = s.client.clone().unwrap_or_default();
    json!({
        "id": s.id,
        "user_id": s.user_id,
        "version": s.version,
        "attributes": attributes,
        "created_at": timestamp(s.created_at),
        "last_access_at": timestamp(s.last_access_at),
        "expires_at": timestamp(s.expires_at),
        "absolute_expires_at": timestamp(s.absolute_expires_at),
        "idle_timeout_seconds": s.idle_timeout.map_or(0, |d| d.seconds),
        "client": { "ip": client.ip, "user_agent": client.user_agent },
    })
}

/// Text form: one `key: value` line per field, nested objects indented, lists numbered.
pub(crate) fn human(v: &Value) -> String {
    let mut out = String::new();
    write_human(&mut out, v, 0);
    out
}

fn write_human(out: &mut String, v: &Value, indent: usize) {
    let pad = "  ".repeat(indent);
    match v {
        Value::Object(map) => {
            let width = map.keys().map(String::len).max().unwrap_or(0);
            for (k, v) in map {
                match v {
                    Value::Object(m) if m.is_empty() => out.push_str(&format!("{pad}{k}: -\n")),
                    Value::Object(_) | Value::Array(_) => {
                        out.push_str(&format!("{pad}{k}:\n"));
                        write_human(out, v, indent + 1);
                    }
                    _ => out.push_str(&format!("{pad}{k:width$}  {}\n", scalar(v))),
                }
            }
        }
        Value::Array(items) => {
            if items.is_empty() {
                out.push_str(&format!("{pad}(none)\n"));
            }
            for (i, item) in items.iter().enumerate() {
                out.push_str(&format!("{pad}[{}]\n", i + 1));
                write_human(out, item, indent + 1);
            }
        }
        other => out.push_str(&format!("{pad}{}\n", scalar(other))),
    }
}

fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        Value::Number(n) => match n.as_f64() {
            Some(f) if f.fract() == 0.0 && f.abs() < 1e15 => format!("{}", f as i64),
            Some(f) => format!("{f:.3}"),
            None => n.to_string(),
        },
        other => other.to_string(),
    }
}
