//! Compiles `proto/` into Rust (server and client) and writes the file
//! descriptor set that server reflection serves. Uses the vendored `protoc`,
//! so no system install is needed.
use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let well_known = protoc_bin_vendored::include_path()?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let protos = [
        PathBuf::from("proto/maitre/memory/v1/memory.proto"),
        PathBuf::from("proto/maitre/booking/v1/booking.proto"),
    ];
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("maitre_descriptor.bin"))
        .compile_with_config(config, &protos, &[PathBuf::from("proto"), well_known])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
