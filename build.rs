//! Compiles `proto/` with protox (a pure-Rust protobuf compiler), so building needs only cargo.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/sessiond/v1/session_store.proto";
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile([proto], ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    // The encoded descriptor set feeds gRPC reflection, so grpcurl works without the proto.
    std::fs::write(out.join("sessiond_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .bytes(".sessiond.v1")
        .compile_fds(fds)?;
    Ok(())
}
