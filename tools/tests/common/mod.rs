//! A real sessiond for the tools' tests: the daemon in-process (the `sessiond` library) on
//! ephemeral loopback ports and a manual clock, and the throwaway CA of the daemon's tests.

#![allow(dead_code)]

#[path = "../../../tests/common/certs.rs"]
pub mod certs;

use sessiond::clock::Clock;
use sessiond::config::Config;
use sessiond::server::Daemon;

/// Start of the manual clock: an arbitrary fixed wall-clock time.
pub const T0: u64 = 1_750_000_000_000;

/// A config for tests: ephemeral ports, nothing on disk, everything else default.
pub fn test_config() -> Config {
    Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_listen: "127.0.0.1:0".parse().unwrap(),
        persist: false,
        ..Config::default()
    }
}

/// Starts the daemon with `config` on a manual clock.
pub async fn start(config: Config) -> Daemon {
    Daemon::start(config, Clock::manual(T0)).await.unwrap()
}

/// The hex SHA-256 of a tenant token: what `token_sha256` holds.
pub fn sha256_hex(token: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, token.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
