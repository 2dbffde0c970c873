//! `cargo xtask bench-guard`: what the inbound ICMP guard costs, measured in one run.
//!
//! 1. Per verdict path, the XDP program's mean time per packet with `BPF_PROG_TEST_RUN`
//!    (`icmp-guard guard-bench`, the real object and maps, nothing attached).
//! 2. On a veth pair between two network namespaces, trafgen offers a fixed load of ICMP echo
//!    requests from random (untrusted) sources to the receiver, under three receivers side by
//!    side: no filter, an nftables netdev-ingress rule set that does the guard's job, and the
//!    guard (native XDP). The receiver's veth runs in threaded NAPI mode with its thread pinned
//!    to one CPU, so the receive path's CPU time is that thread's time (`/proc/PID/schedstat`):
//!    CPU per offered packet, and the share of a core at that load.
//! 3. During each flood, a TCP request/response client in the sender namespace measures
//!    transactions per second against a server in the receiver namespace.
//!
//! Nothing leaves the machine: every address is in the two namespaces, which are deleted at the
//! end. xtask does not link the agent: it runs the release binary.

use std::{
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::Args;

#[derive(Debug, Args)]
pub struct BenchGuardArgs {
    /// Offered load of the flood, packets per second.
    #[arg(long, default_value_t = 150_000)]
    pub rate: u32,
    /// Seconds of flood per receiver.
    #[arg(long, default_value_t = 10)]
    pub seconds: u32,
    /// `BPF_PROG_TEST_RUN` repetitions per path.
    #[arg(long, default_value_t = 2_000_000)]
    pub repeat: u32,
    /// The agent binary (default: target/release/icmp-guard, built first).
    #[arg(long)]
    pub agent: Option<PathBuf>,
}

/// Hidden helpers the benchmark runs inside the namespaces.
#[derive(Debug, Args)]
pub struct RrArgs {
    /// `server` or `client`.
    pub role: String,
    pub addr: String,
    /// Client only: seconds to run.
    #[arg(default_value_t = 0)]
    pub seconds: u64,
}

const TX_ADDR: &str = "10.77.0.1";
const RX_ADDR: &str = "10.77.0.2";
const TRUSTED: &str = "10.77.1.0/24";
const RR_PORT: u16 = 5099;

fn sh(argv: &[&str]) -> Result<String> {
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .with_context(|| format!("running {argv:?}"))?;
    if !out.status.success() {
        bail!(
            "{argv:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ns(name: &str, argv: &[&str]) -> Result<String> {
    let mut full = vec!["ip", "netns", "exec", name];
    full.extend_from_slice(argv);
    sh(&full)
}

struct Namespaces {
    tx: String,
    rx: String,
    tx_if: String,
    rx_if: String,
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for n in [&self.tx, &self.rx] {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

fn topology() -> Result<Namespaces> {
    let id = std::process::id() % 100_000;
    let n = Namespaces {
        tx: format!("icmpg-bench-{id}-tx"),
        rx: format!("icmpg-bench-{id}-rx"),
        tx_if: format!("gb{id}t"),
        rx_if: format!("gb{id}r"),
    };
    for name in [&n.tx, &n.rx] {
        sh(&["ip", "netns", "add", name])?;
        ns(name, &["ip", "link", "set", "lo", "up"])?;
    }
    sh(&[
        "ip", "link", "add", &n.tx_if, "netns", &n.tx, "type", "veth", "peer", "name", &n.rx_if,
        "netns", &n.rx,
    ])?;
    for (name, ifname, addr) in [(&n.tx, &n.tx_if, TX_ADDR), (&n.rx, &n.rx_if, RX_ADDR)] {
        ns(
            name,
            &[
                "sysctl",
                "-qw",
                &format!("net.ipv6.conf.{ifname}.disable_ipv6=1"),
            ],
        )?;
        ns(
            name,
            &["ip", "addr", "add", &format!("{addr}/16"), "dev", ifname],
        )?;
        ns(name, &["ip", "link", "set", ifname, "up"])?;
    }
    // The receiver answers pings from anywhere when nothing filters them, as a node would.
    ns(&n.rx, &["ip", "route", "add", "default", "via", TX_ADDR])?;
    // veth delivers through NAPI only without TSO on the sender and with GRO on the receiver;
    // then the receive path runs in a NAPI thread that can be pinned and timed.
    ns(&n.tx, &["ethtool", "-K", &n.tx_if, "tso", "off"])?;
    ns(&n.rx, &["ethtool", "-K", &n.rx_if, "gro", "on"])?;
    ns(
        &n.rx,
        &[
            "sh",
            "-c",
            &format!("echo 1 > /sys/class/net/{}/threaded", n.rx_if),
        ],
    )?;
    Ok(n)
}

/// The receiver's NAPI thread, pinned to CPU 1.
fn napi_thread(rx_if: &str) -> Result<u32> {
    let want = format!("napi/{rx_if}-");
    for e in fs::read_dir("/proc")?.filter_map(|e| e.ok()) {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(comm) = fs::read_to_string(format!("/proc/{pid}/comm"))
            && comm.trim().starts_with(&want)
        {
            sh(&["taskset", "-p", "-c", "1", &pid.to_string()])?;
            // Real-time, so that on a busy machine the thread's wake-up latency does not stand in
            // for the cost of the receive path in the TCP figures.
            sh(&["chrt", "-f", "-p", "50", &pid.to_string()])?;
            return Ok(pid);
        }
    }
    bail!("no NAPI thread for {rx_if}: threaded NAPI did not take (GRO off?)")
}

fn cpu_ns(pid: u32) -> Result<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/schedstat"))?;
    Ok(s.split_whitespace().next().context("schedstat")?.parse()?)
}

fn enter_ns(cmd: &mut Command, name: &str) -> Result<()> {
    let f = fs::File::open(format!("/run/netns/{name}"))?;
    let fd = f.as_raw_fd();
    // SAFETY: setns on a descriptor kept open (leaked) for the child.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    std::mem::forget(f);
    Ok(())
}

fn nft_rules(rx_if: &str) -> String {
    format!(
        "table netdev icmpguard {{\n\
         \x20 set trusted4 {{ type ipv4_addr; flags interval; elements = {{ {TRUSTED} }} }}\n\
         \x20 set trusted6 {{ type ipv6_addr; flags interval; elements = {{ fd77:1::/64 }} }}\n\
         \x20 chain ingress {{\n\
         \x20   type filter hook ingress device \"{rx_if}\" priority -500; policy accept;\n\
         \x20   meta protocol ip ip protocol != icmp accept\n\
         \x20   meta protocol ip6 meta l4proto != ipv6-icmp accept\n\
         \x20   icmp type destination-unreachable icmp code frag-needed accept\n\
         \x20   icmpv6 type packet-too-big accept\n\
         \x20   icmpv6 type {{ nd-router-solicit, nd-router-advert, nd-neighbor-solicit, \
         nd-neighbor-advert, nd-redirect }} ip6 hoplimit 255 accept\n\
         \x20   icmpv6 type {{ mld-listener-query, mld-listener-report, mld-listener-done, \
         mld2-listener-report }} accept\n\
         \x20   ip saddr @trusted4 meter rate4 {{ ip saddr limit rate over 100/second burst 200 \
         packets }} counter drop\n\
         \x20   ip saddr @trusted4 accept\n\
         \x20   ip6 saddr @trusted6 meter rate6 {{ ip6 saddr limit rate over 100/second burst 200 \
         packets }} counter drop\n\
         \x20   ip6 saddr @trusted6 accept\n\
         \x20   meta l4proto {{ icmp, ipv6-icmp }} counter drop\n\
         \x20 }}\n\
         }}\n"
    )
}

fn guard_policy() -> String {
    format!(
        "apiVersion: security.kubearmor.com/v1\nkind: KubeArmorNetworkPolicy\nmetadata:\n  \
         name: bench\nspec:\n  nodeSelector:\n    matchLabels:\n      kubernetes.io/os: linux\n  \
         ingress:\n    - from:\n        - ipBlock:\n            cidr: {TRUSTED}\n        - \
         ipBlock:\n            cidr: fd77:1::/64\n      ports:\n        - protocol: ICMP\n        \
         - protocol: ICMPv6\n      action: Allow\n"
    )
}

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

fn start_agent(
    agent: &Path,
    netns: &str,
    policy: &Path,
    config: &Path,
    cgroup: &Path,
) -> Result<(Agent, String)> {
    let mut cmd = Command::new(agent);
    cmd.args([
        "run",
        "--enforcer",
        "cgroup",
        "--output",
        "/dev/null",
        "--policy",
    ])
    .arg(policy)
    .arg("--config")
    .arg(config)
    .arg("--cgroup")
    .arg(cgroup)
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    enter_ns(&mut cmd, netns)?;
    let mut child = cmd.spawn().context("starting the agent")?;
    let stderr = child.stderr.take().expect("piped");
    let mut lines = BufReader::new(stderr).lines();
    let mut attach = String::new();
    for line in lines.by_ref() {
        let line = line?;
        if line.contains("inbound ICMP guard on") {
            attach = line.clone();
        }
        // icmp_guard::agent::READY
        if line.contains("enforcing with") {
            std::thread::spawn(move || for _ in lines {});
            return Ok((Agent(child), attach));
        }
    }
    let _ = child.kill();
    bail!("the agent did not start")
}

struct Measured {
    name: &'static str,
    sent: u64,
    window_s: f64,
    napi_ns: u64,
    rr_per_s: f64,
}

/// One flood: trafgen in the sender namespace at `rate` for `seconds`, the NAPI thread's time
/// and a TCP request/response run in the middle of it.
fn flood(
    n: &Namespaces,
    name: &'static str,
    conf: &Path,
    rate: u32,
    seconds: u32,
    me: &Path,
) -> Result<Measured> {
    let napi = napi_thread(&n.rx_if)?;
    let packets = rate as u64 * seconds as u64;
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", "0", "trafgen", "--dev", &n.tx_if, "--conf"])
        .arg(conf)
        .args(["--cpus", "1", "-n", &packets.to_string(), "-b"])
        .arg(format!("{rate}pps"))
        .arg("--no-sock-mem")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    enter_ns(&mut cmd, &n.tx)?;
    let mut tg = cmd.spawn().context("starting trafgen")?;
    // One second to settle, then the receiver's CPU with the flood alone, then the TCP
    // request/response rate while the flood goes on (its packets would otherwise count as the
    // flood's cost).
    let cpu_window = (seconds.saturating_sub(2) / 2).max(1) as u64;
    std::thread::sleep(Duration::from_secs(1));
    let (c0, t0) = (cpu_ns(napi)?, Instant::now());
    std::thread::sleep(Duration::from_secs(cpu_window));
    let (c1, window) = (cpu_ns(napi)?, t0.elapsed());
    let rr = ns(
        &n.tx,
        &[
            me.to_str().unwrap(),
            "rr",
            "client",
            &format!("{RX_ADDR}:{RR_PORT}"),
            &(seconds as u64 - 1 - cpu_window - 1).max(1).to_string(),
        ],
    )?;
    let mut out = String::new();
    tg.stdout.take().unwrap().read_to_string(&mut out)?;
    let mut err = String::new();
    tg.stderr.take().unwrap().read_to_string(&mut err)?;
    let status = tg.wait()?;
    if !status.success() || !format!("{out}{err}").contains(&format!("{packets} packets outgoing"))
    {
        bail!("trafgen did not send {packets} packets: {out}{err}");
    }
    Ok(Measured {
        name,
        sent: packets,
        window_s: window.as_secs_f64(),
        napi_ns: c1 - c0,
        rr_per_s: rr.trim().parse().unwrap_or(0.0),
    })
}

pub fn rr(args: RrArgs) -> Result<()> {
    match args.role.as_str() {
        "server" => {
            let l = TcpListener::bind(&args.addr)?;
            println!("ready");
            std::io::stdout().flush()?;
            for s in l.incoming() {
                let mut s = s?;
                s.set_nodelay(true)?;
                std::thread::spawn(move || {
                    let mut b = [0u8; 1];
                    while s.read_exact(&mut b).is_ok() {
                        if s.write_all(&b).is_err() {
                            break;
                        }
                    }
                });
            }
            Ok(())
        }
        "client" => {
            let mut s = TcpStream::connect(&args.addr)?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            let end = Instant::now() + Duration::from_secs(args.seconds);
            let start = Instant::now();
            let mut n = 0u64;
            let mut b = [0u8; 1];
            while Instant::now() < end {
                s.write_all(b"x")?;
                if s.read_exact(&mut b).is_err() {
                    break;
                }
                n += 1;
            }
            println!("{:.0}", n as f64 / start.elapsed().as_secs_f64());
            Ok(())
        }
        other => bail!("rr role must be server or client, not {other}"),
    }
}

pub fn run(args: BenchGuardArgs) -> Result<()> {
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("bench-guard creates network namespaces and loads BPF programs: run it as root");
    }
    for tool in ["trafgen", "nft", "ethtool", "taskset"] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true)
        {
            bail!("{tool} is missing: run `bash scripts/setup.sh`");
        }
    }
    let agent = crate::bench_agent::release_agent(args.agent)?;
    let me = std::env::current_exe()?;
    let dir = std::env::temp_dir().join(format!("icmpg-bench-{}", std::process::id()));
    fs::create_dir_all(&dir)?;
    let policy = dir.join("policy.yaml");
    fs::write(&policy, guard_policy())?;
    let load = fs::read_to_string("/proc/loadavg")?;

    let n = topology()?;

    // 1. Per verdict path.
    let paths = ns(
        &n.rx,
        &[
            agent.to_str().unwrap(),
            "guard-bench",
            "--policy",
            policy.to_str().unwrap(),
            "--iface",
            &n.rx_if,
            "--trusted",
            "10.77.1.1",
            "--untrusted",
            "192.0.2.9",
            "--trusted6",
            "fd77:1::1",
            "--untrusted6",
            "2001:db8::9",
            "--repeat",
            &args.repeat.to_string(),
        ],
    )?;

    // 2. and 3. Floods.
    let rx_mac = ns(
        &n.rx,
        &["cat", &format!("/sys/class/net/{}/address", n.rx_if)],
    )?;
    let tx_mac = ns(
        &n.tx,
        &["cat", &format!("/sys/class/net/{}/address", n.tx_if)],
    )?;
    let conf = dir.join("flood.cfg");
    fs::write(
        &conf,
        format!(
            "{{ eth(da={}, sa={}), ipv4(saddr=drnd(), daddr={RX_ADDR}, ttl=64), icmp4(type=8, \
             code=0, id=0x1234, seq=dinc()), fill(0x41, 18) }}\n",
            rx_mac.trim(),
            tx_mac.trim()
        ),
    )?;
    let mut server = Command::new(&me);
    server
        .args(["rr", "server", &format!("{RX_ADDR}:{RR_PORT}")])
        .stdout(Stdio::piped());
    enter_ns(&mut server, &n.rx)?;
    let mut server = server.spawn()?;
    let mut ready = String::new();
    BufReader::new(server.stdout.take().unwrap()).read_line(&mut ready)?;
    let idle_rr = ns(
        &n.tx,
        &[
            me.to_str().unwrap(),
            "rr",
            "client",
            &format!("{RX_ADDR}:{RR_PORT}"),
            "3",
        ],
    )?;

    let mut results = Vec::new();
    results.push(flood(&n, "no filter", &conf, args.rate, args.seconds, &me)?);
    let rules = dir.join("rules.nft");
    fs::write(&rules, nft_rules(&n.rx_if))?;
    ns(&n.rx, &["nft", "-f", rules.to_str().unwrap()])?;
    results.push(flood(
        &n,
        "nftables netdev ingress",
        &conf,
        args.rate,
        args.seconds,
        &me,
    )?);
    ns(&n.rx, &["nft", "delete", "table", "netdev", "icmpguard"])?;
    let cg2 = fs::read_to_string("/proc/self/mountinfo")?
        .lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            right
                .starts_with("cgroup2 ")
                .then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
        })
        .context("no cgroup v2 mount")?;
    let cgroup = cg2.join(format!("icmpg-bench-{}", std::process::id()));
    fs::create_dir_all(&cgroup)?;
    let mut attach = Vec::new();
    for (name, mode) in [
        ("icmp-guard, native XDP", "native"),
        ("icmp-guard, generic XDP", "generic"),
        ("icmp-guard, TC ingress", "tc"),
    ] {
        let config = dir.join(format!("{mode}.yaml"));
        fs::write(&config, format!("guard:\n  attach: {mode}\n"))?;
        let (_agent, line) = start_agent(&agent, &n.rx, &policy, &config, &cgroup)?;
        attach.push(line);
        results.push(flood(&n, name, &conf, args.rate, args.seconds, &me)?);
    }
    let _ = server.kill();
    let _ = server.wait();
    let _ = fs::remove_dir(&cgroup);
    let _ = fs::remove_dir_all(&dir);
    drop(n);

    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")?;
    println!(
        "bench-guard on kernel {}, 2 CPUs, load average at start {}",
        kernel.trim(),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "\n1. XDP program per verdict path (BPF_PROG_TEST_RUN, {} runs each):",
        args.repeat
    );
    println!("{:<48} {:>8} {:>8}", "path", "ns/pkt", "verdict");
    for line in paths.lines() {
        let v: serde_json::Value = serde_json::from_str(line)?;
        println!(
            "{:<48} {:>8} {:>8}",
            v["path"].as_str().unwrap_or(""),
            v["ns"],
            v["verdict"].as_str().unwrap_or("")
        );
    }
    println!(
        "\n2./3. {} pps of echo requests from random sources for {} s per receiver (veth, \
         receiver NAPI thread pinned to CPU 1 at SCHED_FIFO 50, trafgen on CPU 0)",
        args.rate, args.seconds,
    );
    for a in &attach {
        println!("  agent: {}", a.split("] ").nth(1).unwrap_or(a));
    }
    println!(
        "TCP request/response with no flood: {} per second",
        idle_rr.trim()
    );
    println!(
        "{:<26} {:>12} {:>14} {:>16}",
        "receiver", "CPU ns/pkt", "CPU share", "TCP RR/s (flood)"
    );
    for r in &results {
        let offered = r.sent as f64 / args.seconds as f64 * r.window_s;
        println!(
            "{:<26} {:>12.0} {:>13.1}% {:>16.0}",
            r.name,
            r.napi_ns as f64 / offered,
            r.napi_ns as f64 / (r.window_s * 1e9) * 100.0,
            r.rr_per_s
        );
    }
    Ok(())
}
