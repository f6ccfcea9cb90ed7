//! Compiles `proto/` with protox (a pure-Rust protobuf compiler), so building needs only cargo.

use std::collections::HashSet;
use std::path::PathBuf;

use prost::Message;
use prost_types::FileDescriptorSet;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let api = "proto/sessiond/v1/session_store.proto";
    let persist = "proto/sessiond/persist/v1/persist.proto";
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile([api], ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    // The encoded descriptor set feeds gRPC reflection, so grpcurl works without the proto.
    std::fs::write(out.join("sessiond_descriptor.bin"), fds.encode_to_vec())?;
    // The API's types and client stub, as any client sees them. The client is generic over
    // its transport, without the `connect` that would need tonic's channel in the daemon:
    // the tests bring their own channel.
    tonic_prost_build::configure()
        .build_server(false)
        .build_transport(false)
        .bytes(".sessiond.v1")
        .compile_fds(fds.clone())?;
    // The server's side (`proto::serve`): its `Session` is `proto::reply::Session`, which
    // encodes straight from the store's session, and so are the messages that hold one.
    // Every other message is the client's type above.
    let serve_dir = out.join("serve");
    std::fs::create_dir_all(&serve_dir)?;
    let mut serve = tonic_prost_build::configure()
        .build_client(false)
        .bytes(".sessiond.v1")
        .out_dir(&serve_dir)
        .extern_path(".sessiond.v1.Session", "crate::proto::reply::Session");
    for name in messages_without(&fds, ".sessiond.v1.Session") {
        serve = serve.extern_path(
            &name,
            format!("crate::proto::pb::{}", &name[".sessiond.v1.".len()..]),
        );
    }
    serve.compile_fds(fds)?;
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

/// The fully qualified names of the top-level messages of the API's package that neither
/// are `inner` nor hold one, directly or through other messages (a oneof's fields included).
fn messages_without(fds: &FileDescriptorSet, inner: &str) -> Vec<String> {
    let package = ".sessiond.v1";
    let messages: Vec<_> = fds
        .file
        .iter()
        .filter(|f| f.package() == &package[1..])
        .flat_map(|f| &f.message_type)
        .map(|m| (format!("{package}.{}", m.name()), m))
        .collect();
    let mut holding: HashSet<String> = HashSet::from([inner.to_owned()]);
    loop {
        let before = holding.len();
        for (name, m) in &messages {
            if m.field.iter().any(|f| holding.contains(f.type_name())) {
                holding.insert(name.clone());
            }
        }
        if holding.len() == before {
            break;
        }
    }
    messages
        .into_iter()
        .map(|(name, _)| name)
        .filter(|name| !holding.contains(name))
        .collect()
}
