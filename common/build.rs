//! Generates the gRPC code for `proto/*.proto` with a vendored `protoc` (no system protobuf compiler needed).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/worker.proto");
    println!("cargo:rerun-if-changed=proto/cluster.proto");
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure().compile_with_config(config, &["proto/worker.proto", "proto/cluster.proto"], &["proto"])?;
    Ok(())
}
