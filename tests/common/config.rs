//! The test config, its clock's start and the token hash: shared with the tools' tests,
//! which include this file by path.

use sessiond::config::Config;

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

/// The hex SHA-256 of a tenant token: what `token_sha256` holds.
pub fn sha256_hex(token: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, token.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
