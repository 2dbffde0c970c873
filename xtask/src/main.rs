//! `cargo xtask <command>`: project automation that is easier to keep correct in
//! Rust than in shell. One module per subcommand; `main` only dispatches.

mod bench_audit;
mod bench_guard;
mod bench_socket;
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
    /// under target/vm/kernels/
    VmKernels(vm::kernels::VmKernelsArgs),
    /// Boot a Debian kernel under qemu with an initramfs and run one command as root
    VmRun(vm::run::VmRunArgs),
    /// Run the `enforcement` integration tests inside the VM with the BPF LSM on
    VmTest(vm::test::VmTestArgs),
    /// Generate 10,000 security groups and compare `icmp-guard audit` with checkov on them
    BenchAudit(bench_audit::BenchAuditArgs),
    /// Time socket() with and without the agent, side by side in one run.
    BenchSocket(bench_socket::BenchSocketArgs),
    /// The inbound ICMP guard: cost per verdict path, and receiver CPU and TCP service under an
    /// ICMP flood against nftables and no filter, side by side in one run.
    BenchGuard(bench_guard::BenchGuardArgs),
    /// bench-guard's TCP request/response helper (runs inside its namespaces).
    #[command(hide = true)]
    Rr(bench_guard::RrArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::VmKernels(args) => vm::kernels::run(args),
        Cmd::VmRun(args) => vm::run::run(args),
        Cmd::VmTest(args) => vm::test::run(args),
        Cmd::BenchAudit(args) => bench_audit::run(args),
        Cmd::BenchSocket(args) => bench_socket::run(args),
        Cmd::BenchGuard(args) => bench_guard::run(args),
        Cmd::Rr(args) => bench_guard::rr(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            // A command that failed inside the VM passes its own exit code on.
            match e.downcast_ref::<vm::GuestExit>() {
                Some(g) => {
                    ExitCode::from(u8::try_from(g.code).ok().filter(|c| *c != 0).unwrap_or(1))
                }
                None => ExitCode::FAILURE,
            }
        }
    }
}
