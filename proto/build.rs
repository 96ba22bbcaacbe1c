//! Compiles `proto/*.proto` with protox (pure Rust), so no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/admin.proto",
        "proto/control.proto",
        "proto/data.proto",
        "proto/raft.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    // The descriptors themselves, for the coordinator's gRPC reflection service.
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("ferry_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Admin responses are printed by `ferryctl -o json`.
        .type_attribute(".ferry.admin.v1", "#[derive(serde::Serialize)]")
        // Enums are numbers in protobuf; in JSON they are their lower-case names.
        .field_attribute(
            ".ferry.admin.v1.MigrationProgress.phase",
            "#[serde(serialize_with = \"crate::json::phase\")]",
        )
        .field_attribute(
            ".ferry.admin.v1.RoundInfo.outcome",
            "#[serde(serialize_with = \"crate::json::phase\")]",
        )
        .field_attribute(
            ".ferry.admin.v1.CutoverInfo.phase",
            "#[serde(serialize_with = \"crate::json::cutover_phase\")]",
        )
        .field_attribute(
            ".ferry.admin.v1.SegmentState.state",
            "#[serde(serialize_with = \"crate::json::segment_status\")]",
        )
        .field_attribute(
            ".ferry.admin.v1.JobInfo.state",
            "#[serde(serialize_with = \"crate::json::job_state\")]",
        )
        .compile_fds(descriptors)?;
    Ok(())
}
