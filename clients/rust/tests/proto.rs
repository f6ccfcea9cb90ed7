//! The API copy the crate carries for its published package (`proto/`, read by `build.rs`
//! outside the repository) is the workspace's API, byte for byte.

use std::path::Path;

#[test]
fn the_packaged_proto_is_the_workspace_proto() {
    let api = "sessiond/v1/session_store.proto";
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let workspace = crate_dir.join("../../proto").join(api);
    if !workspace.exists() {
        // Built from the published package: there is no workspace to compare with.
        return;
    }
    let copy = std::fs::read(crate_dir.join("proto").join(api)).unwrap();
    assert!(
        copy == std::fs::read(&workspace).unwrap(),
        "clients/rust/proto/{api} is stale: run `cp proto/{api} clients/rust/proto/{api}` at the \
         repository root"
    );
}
