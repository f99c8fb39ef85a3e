//! Generates the channel's, the cloud-inference service's, the device-mapper interface's and the ONNX format's Rust code from `proto/*.proto` with protox (no system `protoc`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(
        [
            "proto/channel.proto",
            "proto/inference.proto",
            "proto/mapper.proto",
        ],
        ["proto"],
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .codec_path("crate::codec::LeanCodec")
        .compile_fds(fds)?;
    // The ONNX model format (the part the trainer reads): plain messages, no services.
    let onnx = protox::compile(["proto/onnx.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(false)
        .compile_fds(onnx)?;
    Ok(())
}
