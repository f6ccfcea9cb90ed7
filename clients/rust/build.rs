//! Compiles sessiond's API with protox (pure Rust): building needs only cargo.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=../../proto");
    let fds = protox::compile(["sessiond/v1/session_store.proto"], ["../../proto"])?;
    tonic_prost_build::configure()
        .build_server(false)
        .bytes(".sessiond.v1")
        .compile_fds(fds)?;
    Ok(())
}
