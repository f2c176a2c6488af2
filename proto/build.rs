//! Generates the tonic/prost code for every `.proto` under `proto/`.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("shardline_descriptor.bin"))
        .compile_protos(
            &[
                "proto/shardline/v1/inference.proto",
                "proto/shardline/v1/membership.proto",
                "proto/shardline/worker/v1/worker.proto",
            ],
            &["proto"],
        )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
