//! The `icmp-guard` command.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "icmp-guard",
    version,
    about = "Keeps ICMP and raw-packet sockets to the programs meant to have them, with \
             KubeArmor-compatible policies and alerts"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: enforce a policy in the kernel and stream alerts as JSON lines.
    Run(Box<icmp_guard::agent::RunArgs>),
    /// Report what this kernel supports and which enforcer `run` would pick.
    Probe(icmp_guard::cli::probe::ProbeArgs),
    /// Audit security-group definitions for EC2-044, inbound ICMP open to the whole internet
    /// (AWS API JSON, CloudFormation, Terraform HCL and plans).
    Audit(icmp_guard::audit::AuditArgs),
    /// Prove the enforcement: run scanner probes (hping3, nmap, a raw socket) and ping inside a
    /// workload and check each one's errno and alert.
    Test(icmp_guard::cli::simulation::TestArgs),
    /// Remove the pinned kernel programs and maps at once: every socket is allowed again.
    Unload(icmp_guard::cli::unload::UnloadArgs),
    /// Open one socket and report the result (the raw-socket probe `test` runs).
    #[command(hide = true)]
    ProbeSocket { kind: String },
    /// The inbound ICMP guard's cost per verdict path (`cargo xtask bench-guard` runs it).
    #[command(hide = true)]
    GuardBench(icmp_guard::cli::guard_bench::GuardBenchArgs),
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_target(false)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => icmp_guard::agent::run(*args),
        Command::Probe(args) => icmp_guard::cli::probe::run(&args),
        Command::Unload(args) => icmp_guard::cli::unload::run(&args),
        Command::Audit(args) => return icmp_guard::audit::run(&args),
        Command::Test(args) => match icmp_guard::cli::simulation::run(&args) {
            Ok(true) => return ExitCode::SUCCESS,
            Ok(false) => return ExitCode::from(1),
            Err(e) => Err(e),
        },
        Command::GuardBench(args) => icmp_guard::cli::guard_bench::run(&args),
        Command::ProbeSocket { kind } => match icmp_guard::cli::simulation::probe_socket(&kind) {
            Ok(true) => return ExitCode::SUCCESS,
            Ok(false) => return ExitCode::from(1),
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("icmp-guard: error: {e:#}");
            ExitCode::from(2)
        }
    }
}
