//! Builds the kernel programs (`icmp-guard-ebpf`) for `bpfel-unknown-none` and leaves the objects
//! in OUT_DIR, where `src/kernel/enforcer.rs` (socket programs) and `src/kernel/guard.rs` (the
//! inbound ICMP guard) embed them.
//!
//! The kernel crate is compiled with Debian's `rustc-web` toolchain (`/usr/bin/rustc`, which ships
//! a prebuilt `core` for the BPF target in `libstd-rust-web-dev-bpf`) and linked by bpf-linker:
//! everything comes from package registries, no rustup component downloads. aya-build is not
//! used because it always goes through `rustup run`, which would pick rustup's toolchain.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

const SETUP_HINT: &str = "run `bash scripts/setup.sh` once (it installs rustc-web, cargo-web, \
                          libstd-rust-web-dev-bpf, llvm-22-dev and bpf-linker)";

fn main() -> Result<()> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    compile_proto(&manifest_dir, &PathBuf::from(env::var("OUT_DIR")?))?;
    let ebpf_dir = manifest_dir.join("../icmp-guard-ebpf");
    let common_dir = manifest_dir.join("../icmp-guard-common");
    for dir in [ebpf_dir.join("src"), common_dir.join("src")] {
        println!("cargo:rerun-if-changed={}", dir.display());
    }
    for file in [
        ebpf_dir.join("Cargo.toml"),
        ebpf_dir.join("Cargo.lock"),
        ebpf_dir.join(".cargo/config.toml"),
        common_dir.join("Cargo.toml"),
    ] {
        println!("cargo:rerun-if-changed={}", file.display());
    }
    for var in [
        "ICMP_GUARD_BPF_RUSTC",
        "ICMP_GUARD_BPF_CARGO",
        "ICMP_GUARD_PREBUILT_EBPF",
        "ICMP_GUARD_PREBUILT_GUARD",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let dest = out_dir.join("icmp-guard.bpf.o");
    let guard_dest = out_dir.join("icmp-guard-guard.bpf.o");

    if let Ok(prebuilt) = env::var("ICMP_GUARD_PREBUILT_EBPF") {
        std::fs::copy(&prebuilt, &dest)
            .with_context(|| format!("copying ICMP_GUARD_PREBUILT_EBPF={prebuilt}"))?;
        let guard = env::var("ICMP_GUARD_PREBUILT_GUARD")
            .context("ICMP_GUARD_PREBUILT_EBPF is set: set ICMP_GUARD_PREBUILT_GUARD too")?;
        std::fs::copy(&guard, &guard_dest)
            .with_context(|| format!("copying ICMP_GUARD_PREBUILT_GUARD={guard}"))?;
        return Ok(());
    }

    let rustc = env::var("ICMP_GUARD_BPF_RUSTC").unwrap_or_else(|_| "/usr/bin/rustc".into());
    let cargo = env::var("ICMP_GUARD_BPF_CARGO").unwrap_or_else(|_| "/usr/bin/cargo".into());
    check_toolchain(Path::new(&rustc), Path::new(&cargo))?;

    let target_dir = out_dir.join("ebpf-target");
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(&ebpf_dir)
        .args(["build", "--release", "--target", "bpfel-unknown-none"])
        .arg("--target-dir")
        .arg(&target_dir);
    // The outer cargo's settings are for the host build; none of them may leak into the BPF one.
    for (key, _) in env::vars() {
        if key.starts_with("CARGO_") || key == "RUSTFLAGS" || key.starts_with("RUSTC") {
            cmd.env_remove(&key);
        }
    }
    // aya-ebpf uses unstable features; the Debian compiler is stable, so it has to be told.
    cmd.env("RUSTC", &rustc).env("RUSTC_BOOTSTRAP", "1");
    let status = cmd
        .status()
        .with_context(|| format!("running {cargo} for the kernel programs; {SETUP_HINT}"))?;
    if !status.success() {
        bail!("building icmp-guard-ebpf failed (see above); if a tool is missing, {SETUP_HINT}");
    }
    for (bin, to) in [("icmp-guard", &dest), ("icmp-guard-guard", &guard_dest)] {
        let built = target_dir.join("bpfel-unknown-none/release").join(bin);
        std::fs::copy(&built, to)
            .with_context(|| format!("copying {} to {}", built.display(), to.display()))?;
    }
    Ok(())
}

fn check_toolchain(rustc: &Path, cargo: &Path) -> Result<()> {
    for tool in [rustc, cargo] {
        if !tool.exists() {
            bail!("{} not found; {SETUP_HINT}", tool.display());
        }
    }
    let sysroot = Command::new(rustc)
        .args(["--print", "sysroot"])
        .output()
        .with_context(|| format!("running {}", rustc.display()))?;
    let sysroot = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim());
    if !sysroot.join("lib/rustlib/bpfel-unknown-none").exists() {
        bail!(
            "{} has no core library for bpfel-unknown-none; {SETUP_HINT}",
            rustc.display()
        );
    }
    let linker = env::var_os("PATH")
        .map(|p| env::split_paths(&p).any(|d| d.join("bpf-linker").is_file()))
        .unwrap_or(false);
    if !linker {
        bail!("bpf-linker is not on PATH; {SETUP_HINT}");
    }
    Ok(())
}

/// `feeder.LogService` in two passes, so that an alert is encoded once and the same bytes go to
/// every subscriber:
/// - `OUT_DIR/feeder-messages/feeder.rs`: every message as a prost struct, no service;
/// - `OUT_DIR/feeder-service/feeder.rs`: the tonic server alone, whose messages are the ones of
///   the first pass, except `Alert`, which is `outputs::grpc::wire::EncodedAlert` (bytes
///   encoded once from the first pass's `Alert`).
///
/// `OUT_DIR/feeder.bin` is the encoded descriptor set that server reflection serves.
fn compile_proto(manifest_dir: &Path, out_dir: &Path) -> Result<()> {
    let proto_dir = manifest_dir.join("proto");
    let proto = proto_dir.join("kubearmor.proto");
    println!("cargo:rerun-if-changed={}", proto.display());
    let fds = protox::compile([&proto], [&proto_dir])
        .map_err(|e| anyhow::anyhow!("{}: {e}", proto.display()))?;
    std::fs::write(
        out_dir.join("feeder.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    let messages = out_dir.join("feeder-messages");
    let service = out_dir.join("feeder-service");
    let client = out_dir.join("feeder-client");
    for dir in [&messages, &service, &client] {
        std::fs::create_dir_all(dir)?;
    }
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(false)
        .out_dir(&messages)
        .emit_rerun_if_changed(false)
        .compile_fds(fds.clone())
        .context("generating the feeder messages")?;
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(true)
        .build_transport(false)
        .out_dir(&service)
        .emit_rerun_if_changed(false)
        .extern_path(".feeder", "crate::outputs::grpc::proto")
        .extern_path(".feeder.Alert", "crate::outputs::grpc::wire::EncodedAlert")
        .compile_fds(fds.clone())
        .context("generating the feeder.LogService server")?;
    // `icmp-guard test --pod` reads the running agent's alerts as any KubeArmor client does.
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        .build_transport(false)
        .out_dir(&client)
        .emit_rerun_if_changed(false)
        .extern_path(".feeder", "crate::outputs::grpc::proto")
        .compile_fds(fds)
        .context("generating the feeder.LogService client")?;
    Ok(())
}
