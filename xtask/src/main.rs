//! `cargo xtask <command>`: project automation that is easier to keep correct in
//! Rust than in shell. One module per subcommand; `main` only dispatches.

mod bench_agent;
mod bench_audit;
mod bench_grpc;
mod bench_guard;
mod bench_overhead;
mod bench_pods;
mod bench_upgrade;
mod cache;
mod fuzz;
mod image;
mod k8s;
mod vm;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "xtask",
    about = "Building, VM tests and benchmarks for icmp-guard"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Fetch and unpack Debian's kernels (5.10 bullseye, 6.1 bookworm, 6.12 trixie)
    /// under $ICMP_GUARD_CACHE/vm/kernels/ (default /var/cache/icmp-guard)
    VmKernels(vm::kernels::VmKernelsArgs),
    /// Boot a Debian kernel under qemu with an initramfs and run one command as root
    VmRun(vm::run::VmRunArgs),
    /// Run the `enforcement` integration tests inside the VM with the BPF LSM on
    VmTest(vm::test::VmTestArgs),
    /// Boot a Debian root filesystem with systemd as PID 1 under qemu, install the systemd
    /// unit as the README says and check it live (start, ping, restart, kill, stop, security)
    VmSystemd(vm::systemd::VmSystemdArgs),
    /// Generate 10,000 security groups and compare `icmp-guard audit` with checkov on them
    BenchAudit(bench_audit::BenchAuditArgs),
    /// What the agent costs: syscalls it never decides, socket() by class, BPF time per program,
    /// 10 vs 10,000 rules; without and with the agent, side by side in one run
    BenchOverhead(bench_overhead::BenchOverheadArgs),
    /// Pods in the test cluster: the time from a container's start to its rules, the agent's
    /// CPU and memory over a churn of pods and with many pods on the node.
    BenchPods(bench_pods::BenchPodsArgs),
    /// What bench-pods runs inside the cluster's environment.
    #[command(hide = true)]
    BenchPodsRun(bench_pods::BenchPodsRunArgs),
    /// Single-node Kubernetes test cluster: build, start, stop, status, kubectl, test
    K8s(k8s::K8sArgs),
    /// Write the agent's OCI image archive to target/image/icmp-guard.tar (no pulls)
    Image(image::ImageArgs),
    /// Build the image and prove it loads: a private containerd (`ctr images import`, both
    /// tags, `ctr run`) and podman (`podman load`, `podman run --version`)
    ImageTest(image::import_test::ImageTestArgs),
    /// Run every fuzz target (fuzz/, libFuzzer) for a bounded time; fail on any crash or hang
    Fuzz(fuzz::FuzzArgs),
    /// Ten gRPC WatchAlerts clients while refusals flood: agent CPU per alert, what each client
    /// received and was told it lost, socket()-to-client latency.
    BenchGrpc(bench_grpc::BenchGrpcArgs),
    /// The flooder bench-grpc runs in its cgroup.
    #[command(hide = true)]
    BenchGrpcFlood(bench_grpc::FloodArgs),
    /// The inbound ICMP guard: cost per verdict path, and receiver CPU and TCP service under an
    /// ICMP flood against nftables and no filter, side by side in one run.
    BenchGuard(bench_guard::BenchGuardArgs),
    /// bench-guard's TCP request/response helper (runs inside its namespaces).
    #[command(hide = true)]
    Rr(bench_guard::RrArgs),
    /// Package upgrades of an allowed binary: pings refused while `apt-get install --reinstall
    /// iputils-ping` runs N times, with and without the inotify watch of fromSource
    /// directories, side by side in one run.
    BenchUpgrade(bench_upgrade::BenchUpgradeArgs),
}

/// `cargo xtask` runs this binary with the variables cargo sets for a package (its
/// `CARGO_MANIFEST_DIR`, `CARGO_PKG_*`, …). A cargo started from here would inherit them, and
/// build scripts that declare them with `rerun-if-env-changed` (ring's, for one) would see them
/// changed from a build started in the shell and rebuild, several minutes each time the test
/// command goes from a shell build to an xtask one. They are removed before anything starts.
fn forget_package_env() {
    let ours: Vec<std::ffi::OsString> = std::env::vars_os()
        .map(|(k, _)| k)
        .filter(|k| {
            let k = k.to_string_lossy();
            k.starts_with("CARGO_PKG_")
                || k.starts_with("CARGO_MANIFEST_")
                || k.starts_with("CARGO_BIN_")
                || k == "CARGO_CRATE_NAME"
                || k == "CARGO_PRIMARY_PACKAGE"
                || k == "OUT_DIR"
        })
        .collect();
    for k in ours {
        // SAFETY: called first thing in main, before any other thread exists.
        unsafe { std::env::remove_var(k) };
    }
}

fn main() -> ExitCode {
    forget_package_env();
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::VmKernels(args) => vm::kernels::run(args),
        Cmd::VmRun(args) => vm::run::run(args),
        Cmd::VmTest(args) => vm::test::run(args),
        Cmd::VmSystemd(args) => vm::systemd::run(args),
        Cmd::BenchAudit(args) => bench_audit::run(args),
        Cmd::BenchOverhead(args) => bench_overhead::run(args),
        Cmd::BenchPods(args) => bench_pods::run(args),
        Cmd::BenchPodsRun(args) => bench_pods::run_inside(args),
        Cmd::K8s(args) => k8s::run(args),
        Cmd::Image(args) => image::run(args),
        Cmd::ImageTest(args) => image::import_test::run(args),
        Cmd::Fuzz(args) => fuzz::run(args),
        Cmd::BenchGrpc(args) => bench_grpc::run(args),
        Cmd::BenchGrpcFlood(args) => bench_grpc::flood(args),
        Cmd::BenchGuard(args) => bench_guard::run(args),
        Cmd::Rr(args) => bench_guard::rr(args),
        Cmd::BenchUpgrade(args) => bench_upgrade::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            // A command that failed inside the VM passes its own exit code on.
            let code = e
                .downcast_ref::<vm::GuestExit>()
                .map(|g| g.code)
                .or_else(|| e.downcast_ref::<k8s::CommandExit>().map(|c| c.code));
            match code {
                Some(c) => ExitCode::from(u8::try_from(c).ok().filter(|c| *c != 0).unwrap_or(1)),
                None => ExitCode::FAILURE,
            }
        }
    }
}
