//! The feeder messages for `cargo xtask bench-grpc`, generated from the agent's own
//! `icmp-guard/proto/kubearmor.proto` with protox (no system protoc). The benchmark calls
//! `WatchAlerts` through tonic's generic client.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../icmp-guard/proto");
    let proto = dir.join("kubearmor.proto");
    println!("cargo:rerun-if-changed={}", proto.display());
    let fds = protox::compile([&proto], [&dir])?;
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(false)
        .compile_fds(fds)?;
    Ok(())
}
