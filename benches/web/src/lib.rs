//! The whole web stack side by side (`benches/web-compare.sh`): the storefront's
//! session-shaped routes served on sessiond and on tower-sessions with Redis, and the HTTP
//! load that drives them.
//!
//! # Layout
//! - [`shop`]: the routes (`GET /cart`, `POST /cart/items`, `POST /login`), written once over
//!   [`shop::ShopSession`], and the two apps: [`shop::sessiond_app`] (`SessiondLayer`,
//!   partial write-back of the changed cart line) and [`shop::redis_app`] (`tower-sessions`
//!   with `tower-sessions-redis-store`, a whole-record save).
//! - [`load`]: the load generator: many virtual browsers, each on its own keep-alive
//!   connection with its own cookie, a mix of cart reads, cart adds and logins; and in
//!   `load/tabs.rs`, the lost-adds check that follows the load: concurrent tabs of one
//!   browser adding distinct items, counted against the final cart ([`load::LostAdds`]).
//! - [`procs`]: CPU time of the app and store processes, from `/proc`.
//! - `bin/web-app.rs` serves one app; `bin/web-load.rs` runs the load and prints its report.

pub mod load;
pub mod procs;
pub mod shop;
