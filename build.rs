//! Compiles `proto/` with protox (a pure-Rust protobuf compiler), so building needs only cargo.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let api = "proto/sessiond/v1/session_store.proto";
    let persist = "proto/sessiond/persist/v1/persist.proto";
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile([api], ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    // The encoded descriptor set feeds gRPC reflection, so grpcurl works without the proto.
    std::fs::write(out.join("sessiond_descriptor.bin"), fds.encode_to_vec())?;
    // The client stub is generic over its transport, without the `connect` that would need
    // tonic's channel in the daemon: the tests bring their own channel.
    tonic_prost_build::configure()
        .build_transport(false)
        .bytes(".sessiond.v1")
        .compile_fds(fds)?;
    // The storage records: messages only, no service, and not served by reflection.
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(false)
        .bytes(".sessiond.persist.v1")
        .compile_fds(protox::compile([persist], ["proto"])?)?;
    // The cluster's peer service and its records. The Raft types are openraft's own types
    // (src/cluster/pb_impl.rs), which want ordered maps for a membership.
    let cluster = ".sessiond.cluster.v1";
    tonic_prost_build::configure()
        .bytes(cluster)
        .btree_map(cluster)
        .compile_fds(protox::compile(
            ["proto/sessiond/cluster/v1/cluster.proto"],
            ["proto"],
        )?)?;
    Ok(())
}
