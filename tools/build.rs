//! Compiles the cluster's peer protocol with protox (pure Rust): building needs only cargo.
//!
//! The client half only: `sessionctl cluster` makes the peer service's admin calls. The
//! protocol is internal to sessiond, so it is not part of `sessiond-client`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=../proto/sessiond/cluster");
    let fds = protox::compile(["sessiond/cluster/v1/cluster.proto"], ["../proto"])?;
    // Ordered maps, as the daemon has them: members print in ID order.
    tonic_prost_build::configure()
        .build_server(false)
        .btree_map(".sessiond.cluster.v1")
        .compile_fds(fds)?;
    Ok(())
}
