//! `cargo xtask bench-grpc`: the gRPC alert stream under a flood of refusals.
//!
//! The agent (release build, cgroup enforcer on a cgroup of this benchmark, `alertsPerSecond: 0`
//! so that every refusal is an alert, `--grpc 127.0.0.1:0`, JSON lines to a file) serves ten
//! `WatchAlerts` clients (tonic, generated from `icmp-guard/proto/kubearmor.proto`, one HTTP/2
//! connection each, in this process). A child process in the benchmark's cgroup opens raw sockets
//! the policy refuses, as fast as it can (or `--rate` per second), for `--seconds`.
//!
//! Reported, in figures that hold on a shared machine: the agent's CPU time per alert it read
//! and per alert it delivered (not per second of wall time), what each client received plus what
//! was announced to it as lost (which must add up to what `--output` got), and the latency from
//! the kernel's decision in socket() (the alert's `UpdatedTime`, µs) to a client's receipt, as
//! median and p99 over every alert every client received. The load average is printed with them.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail};
use clap::Args;

use crate::bench_agent::{self, Agent};

mod feeder {
    // Only the request message is used; the others come with the file.
    #![allow(clippy::all, dead_code)]
    tonic::include_proto!("feeder");
}

/// The fields of `feeder.Alert` the benchmark reads; prost skips the others without building
/// them, so the ten clients take less of the machine the agent runs on.
#[derive(Clone, PartialEq, prost::Message)]
struct SlimAlert {
    #[prost(int64, tag = "1")]
    timestamp: i64,
    #[prost(string, tag = "2")]
    updated_time: String,
    #[prost(string, tag = "17")]
    r#type: String,
    #[prost(map = "string, string", tag = "43")]
    event_data: std::collections::HashMap<String, String>,
}

#[derive(Debug, Args)]
pub struct BenchGrpcArgs {
    /// WatchAlerts clients.
    #[arg(long, default_value_t = 10)]
    pub clients: usize,
    /// Seconds of refusals.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Refusals per second (default: as fast as one process can).
    #[arg(long)]
    pub rate: Option<u64>,
    /// The agent binary (default: target/release/icmp-guard, built first).
    #[arg(long)]
    pub agent: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct FloodArgs {
    #[arg(long)]
    pub cgroup: PathBuf,
    #[arg(long)]
    pub seconds: u64,
    #[arg(long)]
    pub rate: Option<u64>,
}

/// The flooder: joins the cgroup, then opens raw sockets the policy refuses.
pub fn flood(args: FloodArgs) -> Result<()> {
    fs::write(args.cgroup.join("cgroup.procs"), "0")?;
    let start = Instant::now();
    let end = start + Duration::from_secs(args.seconds);
    let (mut refused, mut opened) = (0u64, 0u64);
    while Instant::now() < end {
        for _ in 0..100 {
            // SAFETY: plain syscalls.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
            if fd >= 0 {
                unsafe { libc::close(fd) };
                opened += 1;
            } else {
                refused += 1;
            }
        }
        if let Some(rate) = args.rate {
            let due = start + Duration::from_secs_f64((refused + opened) as f64 / rate as f64);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
    }
    println!("REFUSED {refused} OPENED {opened}");
    Ok(())
}

#[derive(Default, Debug)]
struct Received {
    /// Policy alerts (MatchedPolicy, MatchedHostPolicy).
    alerts: u64,
    /// System events that `--output` also has (the kernel's losses).
    system: u64,
    /// Alerts this client lost, as announced to it.
    announced_lost: u64,
    /// socket() to receipt, µs, per policy alert.
    latency_us: Vec<u64>,
    end: String,
}

const CLIENT_LOSS: &str = "dropped for this gRPC client, which did not keep up";

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// The decision's wall-clock time: `Timestamp` (s) and the microseconds of `UpdatedTime`.
fn decided_us(a: &SlimAlert) -> Option<u64> {
    let frac = a.updated_time.split('.').nth(1)?.trim_end_matches('Z');
    Some(a.timestamp as u64 * 1_000_000 + frac.parse::<u64>().ok()?)
}

async fn client(addr: String, last: Arc<AtomicU64>) -> Result<Received> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await?;
    let codec = tonic_prost::ProstCodec::<feeder::RequestMessage, SlimAlert>::default();
    let mut stream = grpc
        .server_streaming(
            tonic::Request::new(feeder::RequestMessage {
                filter: "policy".into(),
            }),
            tonic::codegen::http::uri::PathAndQuery::from_static("/feeder.LogService/WatchAlerts"),
            codec,
        )
        .await?
        .into_inner();
    let mut r = Received::default();
    loop {
        match stream.message().await {
            Ok(Some(a)) => {
                let now = now_us();
                last.store(now, Ordering::Relaxed);
                if a.r#type == "SystemEvent" {
                    if a.event_data.get("Reason").map(String::as_str) == Some(CLIENT_LOSS) {
                        r.announced_lost += a
                            .event_data
                            .get("Count")
                            .and_then(|c| c.parse::<u64>().ok())
                            .unwrap_or(0);
                    } else {
                        r.system += 1;
                    }
                } else {
                    r.alerts += 1;
                    if let Some(t) = decided_us(&a) {
                        r.latency_us.push(now.saturating_sub(t));
                    }
                }
            }
            Ok(None) => {
                r.end = "OK".into();
                break;
            }
            Err(s) => {
                r.end = format!("{:?}", s.code());
                break;
            }
        }
    }
    Ok(r)
}

/// utime + stime of `pid`, in seconds.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = &stat[stat.rfind(')').context("malformed stat")? + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat(5); `after` starts at field 3.
    let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    // SAFETY: no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks as f64 / hz)
}

fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn policy(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let policy = dir.join("policy.yaml");
    fs::write(
        &policy,
        bench_agent::host_allow_policy("raw", Path::new("/usr/bin/ping")),
    )?;
    let config = dir.join("config.yaml");
    fs::write(&config, "alertsPerSecond: 0\n")?;
    Ok((policy, config))
}

pub fn run(args: BenchGrpcArgs) -> Result<()> {
    bench_agent::require_root("bench-grpc")?;
    let agent_bin = bench_agent::release_agent(args.agent.clone())?;
    let cg =
        bench_agent::cgroup2_mount()?.join(format!("icmp-guard-bench-grpc-{}", std::process::id()));
    fs::create_dir_all(&cg)?;
    let dir = std::env::temp_dir().join(format!("icmp-guard-bench-grpc-{}", std::process::id()));
    fs::create_dir_all(&dir)?;
    let result = measure(&args, &agent_bin, &cg, &dir);
    let _ = fs::remove_dir(&cg);
    let _ = fs::remove_dir_all(&dir);
    result
}

fn measure(args: &BenchGrpcArgs, agent_bin: &Path, cg: &Path, dir: &Path) -> Result<()> {
    let (policy, config) = policy(dir)?;
    let output = dir.join("alerts.jsonl");
    let mut agent = Agent::start(
        agent_bin,
        cg,
        &[
            "--policy",
            policy.to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
            "--output",
            output.to_str().unwrap(),
            "--grpc",
            "127.0.0.1:0",
        ],
    )?;
    let prefix = "gRPC feeder.LogService listening on ";
    let line = agent.wait_log(prefix, Duration::from_secs(5))?;
    let addr = line[line.find(prefix).unwrap() + prefix.len()..]
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();

    // One thread and runtime per client, as separate client processes would be: a client busy
    // decoding never holds up another's connection (and its answers to the server's pings).
    let last = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..args.clients)
        .map(|_| {
            let (addr, last) = (addr.clone(), last.clone());
            std::thread::spawn(move || -> Result<Received> {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?
                    .block_on(client(addr, last))
            })
        })
        .collect();
    let start = Instant::now();
    while agent.log_count("opened WatchAlerts") < args.clients {
        if start.elapsed() > Duration::from_secs(30) {
            bail!("the clients did not all subscribe");
        }
        std::thread::sleep(Duration::from_millis(20));
    }

    let load_before = loadavg();
    let me = std::process::id();
    let (agent_cpu0, me_cpu0) = (cpu_seconds(agent.child.id())?, cpu_seconds(me)?);
    let t0 = Instant::now();
    let mut flood = Command::new(std::env::current_exe()?);
    flood
        .arg("bench-grpc-flood")
        .arg("--cgroup")
        .arg(cg)
        .arg("--seconds")
        .arg(args.seconds.to_string());
    if let Some(r) = args.rate {
        flood.arg("--rate").arg(r.to_string());
    }
    let out = flood.stderr(Stdio::inherit()).output()?;
    let flood_text = String::from_utf8_lossy(&out.stdout).to_string();
    let refused: u64 = flood_text
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("the flooder said {flood_text:?}"))?;
    let flood_secs = t0.elapsed().as_secs_f64();
    // Drained when neither a client nor --output has received anything for two seconds.
    let drain_start = Instant::now();
    let mut seen = (0u64, 0u64);
    let mut quiet_since = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let now = (
            last.load(Ordering::Relaxed),
            fs::metadata(&output).map(|m| m.len()).unwrap_or(0),
        );
        if now != seen {
            seen = now;
            quiet_since = Instant::now();
        }
        if quiet_since.elapsed() >= Duration::from_secs(2)
            || drain_start.elapsed() > Duration::from_secs(120)
        {
            break;
        }
    }
    let busy = (quiet_since - t0).as_secs_f64();
    let (agent_cpu, me_cpu) = (
        cpu_seconds(agent.child.id())? - agent_cpu0,
        cpu_seconds(me)? - me_cpu0,
    );
    let load_after = loadavg();
    // Clients the agent let go before the stop (keepalive).
    let early: Vec<String> = agent
        .log
        .lock()
        .expect("log")
        .iter()
        .filter(|l| l.contains("closed WatchAlerts"))
        .cloned()
        .collect();
    agent.stop()?;
    let received: Vec<Received> = clients
        .into_iter()
        .map(|c| c.join().expect("client thread"))
        .collect::<Result<_>>()?;

    let log = agent.log.lock().expect("log").clone();
    let counters = log
        .iter()
        .find(|l| l.contains("stopped; kernel counters:"))
        .cloned()
        .unwrap_or_default();
    let json = fs::read_to_string(dir.join("alerts.jsonl"))?;
    let (mut policy_alerts, mut system, mut kernel_lost) = (0u64, 0u64, 0u64);
    for l in json.lines() {
        let v: serde_json::Value = serde_json::from_str(l)?;
        if v["Type"] == "SystemEvent" {
            system += 1;
            kernel_lost += v["EventData"]["Count"]
                .as_str()
                .and_then(|c| c.parse::<u64>().ok())
                .unwrap_or(0);
        } else {
            policy_alerts += 1;
        }
    }
    let lines = policy_alerts + system;

    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")?;
    println!(
        "bench-grpc: {} WatchAlerts clients, {} s of refused raw sockets {}, cgroup enforcer, \
         kernel {}, {} cores",
        args.clients,
        args.seconds,
        match args.rate {
            Some(r) => format!("at {r}/s"),
            None => "at full speed".into(),
        },
        kernel.trim(),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    println!("load average before {load_before}, after {load_after}");
    println!(
        "refusals: {refused} ({:.0}/s); agent {}",
        refused as f64 / flood_secs,
        counters
            .split("kernel counters: ")
            .nth(1)
            .and_then(|c| c.split(';').next())
            .unwrap_or("(no stop line)")
    );
    println!(
        "--output: {policy_alerts} alerts + {system} system events announcing {kernel_lost} \
         alerts the kernel could not hand over (refusals = alerts + those: {})",
        if policy_alerts + kernel_lost == refused {
            "yes"
        } else {
            "NO"
        }
    );
    let delivered: u64 = received.iter().map(|r| r.alerts + r.system).sum();
    println!(
        "agent CPU: {agent_cpu:.2} s over {busy:.1} s of flood and drain ({:.0}% of one core); \
         {:.1} µs per alert read{}",
        100.0 * agent_cpu / busy,
        1e6 * agent_cpu / lines.max(1) as f64,
        if delivered > 0 {
            format!(
                ", {:.2} µs per alert delivered to a client",
                1e6 * agent_cpu / delivered as f64
            )
        } else {
            String::new()
        }
    );
    println!(
        "the {} clients (this process): {me_cpu:.2} s CPU",
        args.clients
    );
    println!(
        "{:<7} {:>9} {:>7} {:>15} {:>12} {:>9} {:>9} {:>12}",
        "client", "alerts", "system", "announced lost", "sum", "= output", "p50 ms", "end"
    );
    let mut all: Vec<u64> = Vec::new();
    for (i, r) in received.iter().enumerate() {
        let sum = r.alerts + r.system + r.announced_lost;
        let mut l = r.latency_us.clone();
        l.sort_unstable();
        println!(
            "{:<7} {:>9} {:>7} {:>15} {:>12} {:>9} {:>9.1} {:>12}",
            i + 1,
            r.alerts,
            r.system,
            r.announced_lost,
            sum,
            if sum == lines { "yes" } else { "NO" },
            percentile(&l, 0.5) as f64 / 1000.0,
            r.end
        );
        all.extend(r.latency_us.iter().copied());
    }
    all.sort_unstable();
    println!(
        "latency socket() -> client receipt, {} receipts: median {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        all.len(),
        percentile(&all, 0.5) as f64 / 1000.0,
        percentile(&all, 0.99) as f64 / 1000.0,
        all.last().copied().unwrap_or(0) as f64 / 1000.0
    );
    for l in &early {
        println!("agent, before the stop: {l}");
    }
    // A client the agent let go early cannot add up; one that stayed to the stop must.
    if received
        .iter()
        .any(|r| r.end == "Unavailable" && r.alerts + r.system + r.announced_lost != lines)
    {
        bail!("a client's alerts and announced losses do not add up to --output");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    #[test]
    fn slim_alert_reads_the_fields_of_feeder_alert() {
        let full = feeder::Alert {
            timestamp: 1_795_287_592,
            updated_time: "2026-11-21T18:59:52.118442Z".into(),
            r#type: "SystemEvent".into(),
            process_name: "/usr/sbin/hping3".into(),
            event_data: [("Count".to_string(), "3".to_string())].into(),
            ..Default::default()
        };
        let slim = SlimAlert::decode(full.encode_to_vec().as_slice()).unwrap();
        assert_eq!(slim.timestamp, full.timestamp);
        assert_eq!(slim.r#type, full.r#type);
        assert_eq!(slim.event_data, full.event_data);
        assert_eq!(decided_us(&slim), Some(1_795_287_592_118_442));
    }
}
