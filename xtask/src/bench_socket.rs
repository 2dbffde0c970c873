//! `cargo xtask bench-socket`: what the socket hook costs, measured side by side in one run.
//!
//! This process times `socket()` + `close()` in a loop for three kinds of socket, with no agent
//! and then with the agent enforcing a policy, alternating the two for several rounds so that
//! drift on the machine hits both alike. Each figure is the median of the rounds' ns per call,
//! and the ratio is with/without. The kinds are:
//! - udp: a class the policy leaves alone (the hook returns after classifying);
//! - raw ICMP from an allowed executable: the full decision, allowed, no alert;
//! - raw ICMP refused (alerts off by an alertsPerSecond of 1, so the refusal path is measured
//!   rather than the alert pipeline).
//!
//! The agent is the release build, with the cgroup enforcer on a cgroup this process joins (the
//! LSM enforcer where the kernel allows it would see the whole machine).

use std::{
    fs,
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{Result, bail};
use clap::Args;

use crate::bench_agent::{self, Agent};

#[derive(Debug, Args)]
pub struct BenchSocketArgs {
    /// socket()+close() calls per kind per round.
    #[arg(long, default_value_t = 20_000)]
    pub calls: u32,
    /// Rounds, each one without and one with the agent.
    #[arg(long, default_value_t = 5)]
    pub rounds: u32,
    /// The agent binary (default: target/release/icmp-guard, built first).
    #[arg(long)]
    pub agent: Option<PathBuf>,
}

#[derive(Clone, Copy)]
enum Kind {
    Udp,
    RawIcmp,
}

fn one_call(kind: Kind) -> bool {
    let (ty, proto) = match kind {
        Kind::Udp => (libc::SOCK_DGRAM, 0),
        Kind::RawIcmp => (libc::SOCK_RAW, libc::IPPROTO_ICMP),
    };
    // SAFETY: plain syscalls.
    let fd = unsafe { libc::socket(libc::AF_INET, ty, proto) };
    if fd >= 0 {
        unsafe { libc::close(fd) };
        true
    } else {
        false
    }
}

/// ns per call, and whether every call had the expected outcome.
fn time(kind: Kind, calls: u32, expect_open: bool) -> Result<f64> {
    let start = Instant::now();
    for _ in 0..calls {
        if one_call(kind) != expect_open {
            bail!(
                "a socket call {} unexpectedly",
                if expect_open {
                    "was refused"
                } else {
                    "succeeded"
                }
            );
        }
    }
    Ok(start.elapsed().as_nanos() as f64 / calls as f64)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn start_agent(agent: &Path, policy: &Path, config: &Path, cgroup: &Path) -> Result<Agent> {
    let (policy, config) = (policy.to_str().unwrap(), config.to_str().unwrap());
    Agent::start(
        agent,
        cgroup,
        &[
            "--output",
            "/dev/null",
            "--policy",
            policy,
            "--config",
            config,
        ],
    )
}

pub fn run(args: BenchSocketArgs) -> Result<()> {
    bench_agent::require_root("bench-socket")?;
    let agent = bench_agent::release_agent(args.agent)?;
    let cg2 = bench_agent::cgroup2_mount()?;
    let cgroup = cg2.join(format!("icmp-guard-bench-{}", std::process::id()));
    fs::create_dir_all(&cgroup)?;
    fs::write(cgroup.join("cgroup.procs"), std::process::id().to_string())?;

    let dir = std::env::temp_dir().join(format!("icmp-guard-bench-{}", std::process::id()));
    fs::create_dir_all(&dir)?;
    let me = fs::canonicalize("/proc/self/exe")?;
    // This process may open raw ICMP sockets; the copy below may not.
    let allow = dir.join("allow.yaml");
    fs::write(&allow, bench_agent::host_allow_policy("icmp", &me))?;
    let deny = dir.join("deny.yaml");
    fs::write(
        &deny,
        bench_agent::host_allow_policy("icmp", Path::new("/usr/bin/ping")),
    )?;
    let config = dir.join("config.yaml");
    fs::write(&config, "alertsPerSecond: 1\n")?;

    let n = args.calls;
    let mut rows: Vec<(&str, Vec<f64>, Vec<f64>)> = vec![
        ("udp (class left alone)", vec![], vec![]),
        ("raw ICMP, allowed executable", vec![], vec![]),
        ("raw ICMP, refused", vec![], vec![]),
    ];
    for round in 0..args.rounds {
        eprintln!("bench-socket: round {}/{}", round + 1, args.rounds);
        rows[0].1.push(time(Kind::Udp, n, true)?);
        rows[1].1.push(time(Kind::RawIcmp, n, true)?);
        // Without an agent the "refused" call opens; its baseline is the same open.
        rows[2].1.push(time(Kind::RawIcmp, n, true)?);
        {
            let _agent = start_agent(&agent, &allow, &config, &cgroup)?;
            rows[0].2.push(time(Kind::Udp, n, true)?);
            rows[1].2.push(time(Kind::RawIcmp, n, true)?);
        }
        {
            let _agent = start_agent(&agent, &deny, &config, &cgroup)?;
            rows[2].2.push(time(Kind::RawIcmp, n, false)?);
        }
    }
    fs::write(cg2.join("cgroup.procs"), std::process::id().to_string())?;
    let _ = fs::remove_dir(&cgroup);
    let _ = fs::remove_dir_all(&dir);

    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")?;
    println!(
        "socket()+close(), {n} calls x {} rounds, median ns per call, cgroup enforcer, kernel {}",
        args.rounds,
        kernel.trim()
    );
    println!(
        "{:<30} {:>12} {:>12} {:>8}",
        "socket", "no agent", "agent", "ratio"
    );
    for (name, without, with) in rows {
        let (a, b) = (median(without), median(with));
        println!("{name:<30} {a:>12.0} {b:>12.0} {:>7.2}x", b / a);
    }
    Ok(())
}
