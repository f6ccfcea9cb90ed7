//! A real sessiond for the tools' tests: the daemon in-process (the `sessiond` library) on
//! ephemeral loopback ports and a manual clock, and the throwaway CA of the daemon's tests.

#![allow(dead_code)]

#[path = "../../../tests/common/certs.rs"]
pub mod certs;
#[path = "../../../tests/common/config.rs"]
mod config;

// Not every test crate uses each of them.
#[allow(unused_imports)]
pub use config::{sha256_hex, test_config, T0};

use sessiond::clock::Clock;
use sessiond::config::Config;
use sessiond::server::Daemon;

/// Starts the daemon with `config` on a manual clock.
pub async fn start(config: Config) -> Daemon {
    Daemon::start(config, Clock::manual(T0)).await.unwrap()
}
