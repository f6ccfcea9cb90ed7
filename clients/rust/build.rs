//! Compiles sessiond's API with protox (pure Rust): building needs only cargo.
//!
//! The crate carries its own copy of the API, `proto/sessiond/v1/session_store.proto`, so the
//! published package builds on its own. In the repository the build reads the workspace's
//! `proto/` instead, so a change to the API reaches the client at once; `tests/proto.rs`
//! fails while the copy differs from it (refresh it with the `cp` that test names).

use std::path::{Path, PathBuf};

/// The API, relative to a proto root.
const API: &str = "sessiond/v1/session_store.proto";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = if Path::new("../../proto").join(API).exists() {
        "../../proto"
    } else {
        "proto"
    };
    println!("cargo:rerun-if-changed={root}");
    let fds = protox::compile([API], [root])?;
    // `pb`: the generated types and client stub, as any caller of the raw stub sees them.
    tonic_prost_build::configure()
        .build_server(false)
        .bytes(".sessiond.v1")
        .compile_fds(fds.clone())?;
    // `wire`: the typed client's own copy, whose `Session` is `reply::Session` (attributes
    // decoded into one packed buffer, not a hash map).
    let wire = PathBuf::from(std::env::var("OUT_DIR")?).join("wire");
    std::fs::create_dir_all(&wire)?;
    tonic_prost_build::configure()
        .build_server(false)
        .build_transport(false)
        .bytes(".sessiond.v1")
        .out_dir(&wire)
        .extern_path(".sessiond.v1.Session", "crate::reply::Session")
        .compile_fds(fds)?;
    Ok(())
}
