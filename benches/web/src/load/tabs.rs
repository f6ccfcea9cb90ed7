//! The lost-adds check: several browsers at once, each with a number of concurrent "tabs"
//! that share the browser's cookie and add distinct items, one after another; then each
//! browser's cart is read and compared with the adds the app acknowledged (answered 200).
//! A store that saves the whole session at the end of each request loses the adds of tabs
//! whose requests overlapped; one that writes back only the changed keys loses none.

use http::{Method, StatusCode};
use serde::Serialize;
use serde_json::{json, Value};

use super::{Conn, Jar, LoadConfig, LoadError};

/// The lost-adds check's outcome.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LostAdds {
    /// Adds the app answered 200.
    pub acknowledged: u64,
    /// Of those, the ones the final carts hold.
    pub kept: u64,
    /// Acknowledged but missing: `acknowledged - kept`.
    pub lost: u64,
    /// Adds that got an error answer (not counted as acknowledged).
    pub failed: u64,
}

/// The lost-adds check: `tab_browsers` browsers at once, each with `tabs` concurrent tabs
/// adding `adds_per_tab` distinct items each; then each browser's cart is read.
pub async fn lost_adds(cfg: &LoadConfig) -> Result<LostAdds, LoadError> {
    let browsers: Vec<_> = (0..cfg.tab_browsers)
        .map(|b| tokio::spawn(tabbed_browser(cfg.clone(), b)))
        .collect();
    let mut total = LostAdds::default();
    for b in browsers {
        let one = b
            .await
            .map_err(|e| LoadError::Answer(format!("a browser task failed: {e}")))??;
        total.acknowledged += one.acknowledged;
        total.kept += one.kept;
        total.lost += one.lost;
        total.failed += one.failed;
    }
    Ok(total)
}

async fn tabbed_browser(cfg: LoadConfig, b: usize) -> Result<LostAdds, LoadError> {
    let jar = Jar::default();
    let mut conn = Conn::open(cfg.target, &cfg.cookie).await?;
    let first = conn
        .call(
            Method::POST,
            "/cart/items",
            None,
            Some(json!({ "sku": "first", "qty": 1 })),
        )
        .await?;
    if first.status != StatusCode::OK {
        return Err(LoadError::Answer(format!(
            "the lost-adds check's first add answered {}",
            first.status
        )));
    }
    jar.take(first.set_cookie);
    let tabs: Vec<_> = (0..cfg.tabs)
        .map(|t| {
            let (jar, cfg) = (jar.clone(), cfg.clone());
            tokio::spawn(async move {
                let mut conn = Conn::open(cfg.target, &cfg.cookie).await?;
                let mut acked = Vec::new();
                let mut failed = 0u64;
                for k in 0..cfg.adds_per_tab {
                    let sku = format!("b{b}-t{t}-{k}");
                    let body = json!({ "sku": sku, "qty": 1 });
                    let a = conn
                        .call(
                            Method::POST,
                            "/cart/items",
                            jar.get().as_deref(),
                            Some(body),
                        )
                        .await?;
                    jar.take(a.set_cookie);
                    if a.status == StatusCode::OK {
                        acked.push(sku);
                    } else {
                        failed += 1;
                    }
                }
                Ok::<_, LoadError>((acked, failed))
            })
        })
        .collect();
    let mut acked = Vec::new();
    let mut failed = 0;
    for t in tabs {
        let (a, f) = t
            .await
            .map_err(|e| LoadError::Answer(format!("a tab task failed: {e}")))??;
        acked.extend(a);
        failed += f;
    }
    let cart = conn
        .call(Method::GET, "/cart", jar.get().as_deref(), None)
        .await?;
    let lines = cart
        .body
        .get("cart")
        .and_then(Value::as_object)
        .ok_or_else(|| {
            LoadError::Answer(format!("GET /cart answered {} without a cart", cart.status))
        })?;
    let kept = acked
        .iter()
        .filter(|sku| lines.get(sku.as_str()).and_then(Value::as_u64) == Some(1))
        .count() as u64;
    Ok(LostAdds {
        acknowledged: acked.len() as u64,
        kept,
        lost: acked.len() as u64 - kept,
        failed,
    })
}
