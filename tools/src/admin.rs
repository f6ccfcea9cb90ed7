//! The client side of sessiond's admin endpoint: GET a path (sessionctl's `stats`, the
//! bench's server CPU and memory) and read one value out of the Prometheus text it serves.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

pub use crate::exposition::sample;

/// GETs `path` from an admin endpoint (`host:port` or `http://host:port`) and returns the body
/// of a successful reply; the error says why not.
pub async fn fetch(addr: &str, path: &str, timeout: Duration) -> Result<String, String> {
    let base = if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    let uri: http::Uri = format!("{base}{path}")
        .parse()
        .map_err(|e| format!("{e}"))?;
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let get = async {
        let resp = client.get(uri).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        if !status.is_success() {
            return Err(format!("HTTP {status}"));
        }
        Ok(String::from_utf8_lossy(&body).into_owned())
    };
    tokio::time::timeout(timeout, get)
        .await
        .map_err(|_| "timed out".to_string())?
}

#[cfg(test)]
mod tests {
    use super::sample;

    #[test]
    fn a_bare_name_sums_its_series_and_a_labelled_one_is_exact() {
        let text = "# HELP m help\nm{tenant=\"a\"} 2\nm{tenant=\"b\"} 3\nm_total 7\nn 1.5\n";
        assert_eq!(sample(text, "m"), Some(5.0));
        assert_eq!(sample(text, "m{tenant=\"b\"}"), Some(3.0));
        assert_eq!(sample(text, "m_total"), Some(7.0));
        assert_eq!(sample(text, "n"), Some(1.5));
        assert_eq!(sample(text, "missing"), None);
    }
}
