//! The command-line tools of sessiond: clients of the daemon, built on `sessiond-client`,
//! kept out of the daemon's crate so that its dependency tree holds only what it runs.
//!
//! # Layout
//!
//! - `sessionctl` (`src/sessionctl/`): the command-line client, the way redis-cli is Redis's.
//! - `sessiond-bench` (`src/bench/`): a session-shaped load generator for sessiond, and the
//!   same logical workload against Redis.
//! - [`admin`]: what both read from the daemon's admin endpoint: an HTTP GET and a reader of
//!   Prometheus samples.
//! - [`cluster`]: `sessionctl cluster`: the admin calls of a node's peer service (status,
//!   init, add, remove, transfer-leader), as functions the tests run against real nodes.

pub mod admin;
pub mod cluster;
mod exposition;
