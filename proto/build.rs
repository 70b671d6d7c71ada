//! Compiles `exfilguard/v1/*.proto` with tonic-prost-build and writes the file
//! descriptor set that the controller serves through gRPC reflection.

use std::{env, path::PathBuf};

const PROTOS: &[&str] = &[
    "exfilguard/v1/common.proto",
    "exfilguard/v1/agent.proto",
    "exfilguard/v1/incidents.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let mut config = tonic_prost_build::Config::new();
    // `PROTOC` wins (a distribution's protoc); otherwise the vendored binary, so
    // a fresh machine needs no system package to build the workspace.
    println!("cargo:rerun-if-env-changed=PROTOC");
    let protoc = match env::var_os("PROTOC") {
        Some(path) => PathBuf::from(path),
        None => protoc_bin_vendored::protoc_bin_path()?,
    };
    config.protoc_executable(protoc);
    tonic_prost_build::configure()
        // No generated `Client::connect(endpoint)` constructor: it would clash with
        // the `Connect` rpc's method. Clients build a `Channel` and call `new`.
        .build_transport(false)
        .file_descriptor_set_path(out_dir.join("exfilguard_v1_descriptor.bin"))
        .compile_with_config(config, PROTOS, &["."])?;
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    Ok(())
}
