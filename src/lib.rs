//! sessiond: a dedicated session-store daemon.
//!
//! # Layout
//!
//! - [`session`]: session IDs and session data; pure values and their invariants.
//! - [`clock`]: the one source of time; tests drive a manual clock instead of sleeping.
//! - `ticker` (crate-private): the pace of periodic background work (the reaper, the
//!   snapshotter, the TLS watch): a step every period until shutdown.
//! - [`store`]: the Store, where every session rule lives: each write evaluated once into an
//!   effect and applied by the one apply path (shared with recovery); the sharded map, the
//!   user index, the expiry wheel, the reaper and the event stream.
//! - `proto` (crate-private): the generated API types and the service's name, below every
//!   layer that speaks the API; [`api`] re-exports the types as `api::pb`.
//! - [`api`]: the gRPC edge; thin handlers, the proto <-> domain mapping, and the one
//!   `StoreError -> Status` mapping.
//! - [`observe`]: every metric name, the Prometheus rendering, the gRPC metrics layer, and
//!   the bundles of metric handles it builds: one per tenant, whose parts go to the store, the
//!   log, the snapshot task, the reaper and the guess watch, and one for the gRPC port.
//! - [`admin`]: the HTTP endpoint for `/metrics`, `/healthz` and `/readyz`.
//! - [`config`]: one `Config`, layered from defaults, file, environment and flags.
//! - [`cluster`]: the replicated sessiond on openraft: the Raft log store, the state machine
//!   over the Store, the peer transport, and the node that starts them (`[cluster]` settings).
//! - [`server`]: wiring: builds the servers, starts the background tasks and runs the
//!   ordered shutdown; shared by `main` and the tests.
//! - [`persist`]: the durable log, snapshots (and the task that takes them) and recovery.
//! - [`tenant`]: tenants, each with its own store, and the credentials that pick one;
//!   [`tenant::guessing`], each tenant's watch for peers looking up many unknown session IDs.
//! - [`tls`]: TLS and mutual TLS, reloadable without a restart, and the watch that reloads
//!   changed certificate files.
//! - [`transport`]: the gRPC port's connections: the connection cap, per-connection state,
//!   and the layer that authenticates requests before their bodies are read.

pub(crate) mod admin;
pub mod api;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod observe;
pub mod persist;
pub(crate) mod proto;
pub mod server;
pub mod session;
pub mod store;
pub mod tenant;
pub(crate) mod ticker;
pub mod tls;
pub(crate) mod transport;

/// Locks `m` whether or not a panic poisoned it: how every mutex of the crate is taken. No
/// holder leaves its data half-changed across a panic, so poisoning is ignored rather than
/// spread to every later caller.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
