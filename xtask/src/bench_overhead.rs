//! `cargo xtask bench-overhead`: what the agent costs, measured side by side in one run.
//!
//! Every figure is a ratio of the same loop timed without and with the agent, in rounds that
//! alternate the two so that drift on a shared machine hits both alike; each figure is reported
//! as the median and the minimum over the rounds.
//!
//! - The machine-wide tax: `getppid()` and `read(fd, buf, 0)` loops, syscalls the agent never
//!   decides. Anything the agent attaches to a syscall tracepoint shows here.
//! - `socket()` + `close()` for tcp and udp (classes no rule names), unix (a family the agent
//!   never manages), raw ICMP from an executable a rule allows (a decided allow) and an
//!   `IPPROTO_RAW` socket the posture refuses (alerts limited to 1 per second, so the refusal is
//!   measured rather than the alert pipeline).
//! - The same decided allow, untouched class and refusal with 10 kernel rules for 1 workload and
//!   with 10,000 kernel rules for 1,000 workloads: the decision must not depend on either.
//! - The kernel's own per-program figures (`kernel.bpf_stats_enabled`: run_time_ns / run_cnt)
//!   for every program the agent loads, per kind of call. Stats cost time themselves, so they are
//!   taken in a pass of their own, never during the timed rounds.
//!
//! The agent is the release build with the cgroup enforcer attached to a cgroup this process
//! joins (the LSM enforcer, where the kernel allows it, would see the whole machine); this process
//! is a declared workload in a child of that cgroup.

use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::Args;

#[derive(Debug, Args)]
pub struct BenchOverheadArgs {
    /// Rounds; each times every loop without the agent, with 10 rules and with 10,000 rules.
    #[arg(long, default_value_t = 7)]
    pub rounds: u32,
    /// getppid()/read() calls per loop.
    #[arg(long, default_value_t = 2_000_000)]
    pub syscalls: u32,
    /// socket()+close() calls per loop.
    #[arg(long, default_value_t = 20_000)]
    pub sockets: u32,
    /// Calls per kind in the bpf_stats pass.
    #[arg(long, default_value_t = 200_000)]
    pub stats_calls: u32,
    /// The agent binary (default: target/release/icmp-guard, built first).
    #[arg(long)]
    pub agent: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Probe {
    Getppid,
    Read,
    Tcp,
    Udp,
    Unix,
    /// Raw ICMP from this executable, which a rule allows.
    IcmpAllowed,
    /// IPPROTO_RAW from this executable, which the default posture refuses.
    RawRefused,
}

impl Probe {
    const ALL: [Probe; 7] = [
        Probe::Getppid,
        Probe::Read,
        Probe::Tcp,
        Probe::Udp,
        Probe::Unix,
        Probe::IcmpAllowed,
        Probe::RawRefused,
    ];
    /// What is compared between 10 and 10,000 rules.
    const SCALED: [Probe; 3] = [Probe::Udp, Probe::IcmpAllowed, Probe::RawRefused];

    fn name(self) -> &'static str {
        match self {
            Probe::Getppid => "getppid()",
            Probe::Read => "read(fd, buf, 0)",
            Probe::Tcp => "socket+close tcp",
            Probe::Udp => "socket+close udp",
            Probe::Unix => "socket+close unix",
            Probe::IcmpAllowed => "socket+close icmp, allowed",
            Probe::RawRefused => "socket raw, refused",
        }
    }

    fn is_syscall(self) -> bool {
        matches!(self, Probe::Getppid | Probe::Read)
    }
}

/// Opens and closes one socket; true if it opened.
fn socket_once(domain: i32, ty: i32, proto: i32) -> bool {
    // SAFETY: plain syscalls.
    let fd = unsafe { libc::socket(domain, ty, proto) };
    if fd >= 0 {
        unsafe { libc::close(fd) };
        true
    } else {
        false
    }
}

/// Runs `probe` `n` times; returns ns per call. `with_agent` says whether the refusal is due.
fn run_probe(probe: Probe, n: u32, with_agent: bool, null_fd: i32) -> Result<f64> {
    let mut buf = [0u8; 1];
    let start = Instant::now();
    let (domain, ty, proto, expect_open) = match probe {
        Probe::Getppid => {
            for _ in 0..n {
                // SAFETY: no arguments.
                unsafe { libc::getppid() };
            }
            return Ok(start.elapsed().as_nanos() as f64 / n as f64);
        }
        Probe::Read => {
            for _ in 0..n {
                // SAFETY: a valid fd and buffer; zero bytes.
                unsafe { libc::read(null_fd, buf.as_mut_ptr().cast(), 0) };
            }
            return Ok(start.elapsed().as_nanos() as f64 / n as f64);
        }
        Probe::Tcp => (libc::AF_INET, libc::SOCK_STREAM, 0, true),
        Probe::Udp => (libc::AF_INET, libc::SOCK_DGRAM, 0, true),
        Probe::Unix => (libc::AF_UNIX, libc::SOCK_STREAM, 0, true),
        Probe::IcmpAllowed => (libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP, true),
        Probe::RawRefused => (
            libc::AF_INET,
            libc::SOCK_RAW,
            libc::IPPROTO_RAW,
            !with_agent,
        ),
    };
    for _ in 0..n {
        if socket_once(domain, ty, proto) != expect_open {
            bail!(
                "{}: a socket was {} unexpectedly (with agent: {with_agent})",
                probe.name(),
                if expect_open { "refused" } else { "opened" }
            );
        }
    }
    Ok(start.elapsed().as_nanos() as f64 / n as f64)
}

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        // SAFETY: plain signal to our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

/// Whether `agent run` pins by default (and so takes `--no-pin`): builds before pinning did not.
fn pins_by_default(agent: &Path) -> bool {
    Command::new(agent)
        .args(["run", "--help"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("--no-pin"))
        .unwrap_or(false)
}

fn start_agent(agent: &Path, policy: &Path, config: &Path, cgroup: &Path) -> Result<Agent> {
    let mut cmd = Command::new(agent);
    cmd.args(["run", "--enforcer", "cgroup", "--output", "/dev/null"]);
    if pins_by_default(agent) {
        // Measure the agent, not an adoption of a set some other agent left pinned.
        cmd.arg("--no-pin");
    }
    let mut child = cmd
        .arg("--policy")
        .arg(policy)
        .arg("--config")
        .arg(config)
        .arg("--cgroup")
        .arg(cgroup)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting the agent")?;
    let stderr = child.stderr.take().expect("piped");
    let mut lines = BufReader::new(stderr).lines();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut log = Vec::new();
    for line in lines.by_ref() {
        let line = line?;
        // icmp_guard::agent::READY (xtask does not link the agent, which builds BPF code).
        if line.contains("enforcing with") {
            // Keep draining so the agent never blocks on a full pipe.
            std::thread::spawn(move || for _ in lines {});
            return Ok(Agent(child));
        }
        log.push(line);
        if Instant::now() > deadline {
            break;
        }
    }
    let _ = child.kill();
    bail!("the agent did not start; its log:\n{}", log.join("\n"))
}

/// Nine files besides this executable, with distinct identities, as further `fromSource`
/// paths: the rules must be real entries, not duplicates of one key.
const OTHER_SOURCES: [&str; 9] = [
    "/usr/bin/ping",
    "/usr/bin/true",
    "/usr/bin/false",
    "/usr/bin/env",
    "/usr/bin/id",
    "/usr/bin/tee",
    "/usr/bin/cat",
    "/usr/bin/head",
    "/usr/bin/tail",
];

/// One policy for every workload labelled `bench: yes`: icmp from this executable and four
/// others, raw from five others (10 rules per workload). Raw from this executable therefore
/// gets the default posture, Block.
fn policy(me: &Path) -> String {
    let list = |paths: &[&str]| {
        paths
            .iter()
            .map(|p| format!("      - path: {p}\n"))
            .collect::<String>()
    };
    let me = me.display().to_string();
    format!(
        "apiVersion: security.kubearmor.com/v1\nkind: KubeArmorPolicy\nmetadata:\n  name: bench\n  \
         namespace: default\nspec:\n  selector:\n    matchLabels:\n      bench: \"yes\"\n  network:\n    \
         matchProtocols:\n    - protocol: icmp\n      fromSource:\n{}    - protocol: raw\n      \
         fromSource:\n{}  action: Allow\n",
        list(&[
            &me,
            OTHER_SOURCES[0],
            OTHER_SOURCES[1],
            OTHER_SOURCES[2],
            OTHER_SOURCES[3]
        ]),
        list(&OTHER_SOURCES[4..]),
    )
}

/// An agent config declaring `n` workloads, cgroups `<rel>/w0` … `<rel>/w{n-1}` under the
/// cgroup v2 mount, all labelled `bench: yes`.
fn config(rel: &Path, n: usize) -> String {
    let mut s = String::from("alertsPerSecond: 1\nworkloads:\n");
    for i in 0..n {
        s.push_str(&format!(
            "  - name: w{i}\n    cgroup: {}/w{i}\n    namespace: default\n    labels:\n      bench: \"yes\"\n",
            rel.display()
        ));
    }
    s
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

/// (run_time_ns, run_cnt) of every program loaded now, by id, with its name.
fn program_stats() -> Result<BTreeMap<u32, (String, u64, u64)>> {
    let mut out = BTreeMap::new();
    for info in aya::programs::loaded_programs() {
        let info = info.context("listing loaded BPF programs")?;
        let name = info.name_as_str().unwrap_or("?").to_string();
        out.insert(
            info.id(),
            (name, info.run_time().as_nanos() as u64, info.run_count()),
        );
    }
    Ok(out)
}

struct Sysctl {
    path: &'static str,
    before: String,
}

impl Sysctl {
    fn set(path: &'static str, value: &str) -> Result<Self> {
        let before = fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
        fs::write(path, value).with_context(|| format!("writing {path}"))?;
        Ok(Self { path, before })
    }
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        let _ = fs::write(self.path, self.before.trim());
    }
}

pub fn run(args: BenchOverheadArgs) -> Result<()> {
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("bench-overhead loads BPF programs: run it as root");
    }
    if args.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    let agent = crate::bench_agent::release_agent(args.agent)?;
    let agent = fs::canonicalize(&agent).with_context(|| format!("agent {}", agent.display()))?;
    let cg2 = crate::bench_agent::cgroup2_mount()?;
    let rel = PathBuf::from(format!("icmp-guard-bench-{}", std::process::id()));
    let attach = cg2.join(&rel);
    // The bench process is workload w0 in both configurations.
    let mine = attach.join("w0");
    let workloads = 1000;
    for i in 0..workloads {
        fs::create_dir_all(attach.join(format!("w{i}")))?;
    }
    fs::write(mine.join("cgroup.procs"), std::process::id().to_string())?;
    let _cleanup = Cleanup {
        back_to: cg2.clone(),
        attach: attach.clone(),
        workloads,
    };

    let dir = std::env::temp_dir().join(format!("icmp-guard-bench-{}", std::process::id()));
    fs::create_dir_all(&dir)?;
    let me = fs::canonicalize("/proc/self/exe")?;
    for p in OTHER_SOURCES {
        if !Path::new(p).exists() {
            bail!(
                "{p} is missing; the benchmark uses it as a fromSource path (apt-get install iputils-ping coreutils)"
            );
        }
    }
    let policy_path = dir.join("policy.yaml");
    fs::write(&policy_path, policy(&me))?;
    let small = dir.join("small.yaml");
    fs::write(&small, config(&rel, 1))?;
    let large = dir.join("large.yaml");
    fs::write(&large, config(&rel, workloads))?;
    let null = fs::File::open("/dev/null")?;
    let null_fd = std::os::fd::AsRawFd::as_raw_fd(&null);

    let count = |p: Probe| {
        if p.is_syscall() {
            args.syscalls
        } else {
            args.sockets
        }
    };
    // results[config][probe] = ns per call of each round; config 0 = no agent, 1 = 10 rules,
    // 2 = 10,000 rules.
    let mut results: [BTreeMap<Probe, Vec<f64>>; 3] = Default::default();
    let mut large_refused = None;
    for round in 0..args.rounds {
        eprintln!("bench-overhead: round {}/{}", round + 1, args.rounds);
        for p in Probe::ALL {
            results[0]
                .entry(p)
                .or_default()
                .push(run_probe(p, count(p), false, null_fd)?);
        }
        {
            let _agent = start_agent(&agent, &policy_path, &small, &attach)?;
            for p in Probe::ALL {
                results[1]
                    .entry(p)
                    .or_default()
                    .push(run_probe(p, count(p), true, null_fd)?);
            }
        }
        // An agent whose kernel maps cannot hold 10,000 rules refuses the configuration; that
        // is reported as a result instead of ending the run.
        match start_agent(&agent, &policy_path, &large, &attach) {
            Ok(_agent) => {
                for p in Probe::SCALED {
                    results[2]
                        .entry(p)
                        .or_default()
                        .push(run_probe(p, count(p), true, null_fd)?);
                }
            }
            Err(e) => {
                eprintln!("bench-overhead: 10,000 rules not measured: {e:#}");
                large_refused = Some(format!("{e:#}"));
            }
        }
    }

    // The kernel's own figures, in a pass of their own.
    eprintln!("bench-overhead: bpf_stats pass");
    let stats = {
        let before_agent = program_stats()?;
        let _agent = start_agent(&agent, &policy_path, &small, &attach)?;
        let ours: Vec<u32> = program_stats()?
            .into_keys()
            .filter(|id| !before_agent.contains_key(id))
            .collect();
        // The floor: what bpf_stats reports for a program that does nothing, run by the same
        // hook on the same calls. The agent's figures above it are what its decision costs.
        let floor = EmptyProgram::attach(&mine)?;
        let mut ours = ours;
        ours.push(floor.id()?);
        let _stats = Sysctl::set("/proc/sys/kernel/bpf_stats_enabled", "1")?;
        let mut per_probe = Vec::new();
        for p in Probe::ALL {
            let before = program_stats()?;
            let n = if p.is_syscall() {
                args.syscalls
            } else {
                args.stats_calls
            };
            run_probe(p, n, true, null_fd)?;
            let after = program_stats()?;
            let mut progs = Vec::new();
            for id in &ours {
                let (Some((name, t0, c0)), Some((_, t1, c1))) = (before.get(id), after.get(id))
                else {
                    continue;
                };
                progs.push((name.clone(), c1 - c0, t1 - t0, n));
            }
            per_probe.push((p, progs));
        }
        per_probe
    };

    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")?;
    let loadavg = fs::read_to_string("/proc/loadavg")?;
    println!(
        "bench-overhead: kernel {}, cgroup enforcer, {} rounds alternating, load average {}",
        kernel.trim(),
        args.rounds,
        loadavg
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!("agent: {}", agent.display());
    println!();
    println!(
        "{:<28} {:>10} {:>10} {:>10} {:>10} {:>8} {:>8}",
        "ns per call", "none med", "none min", "agent med", "agent min", "med x", "min x"
    );
    for p in Probe::ALL {
        let (a, b) = (&results[0][&p], &results[1][&p]);
        println!(
            "{:<28} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>8.3} {:>8.3}",
            p.name(),
            median(a),
            min(a),
            median(b),
            min(b),
            median(b) / median(a),
            min(b) / min(a)
        );
    }
    println!();
    println!(
        "{:<28} {:>10} {:>10} {:>10} {:>10} {:>8} {:>8}",
        "10 vs 10,000 rules", "10 med", "10 min", "10k med", "10k min", "med x", "min x"
    );
    if let Some(e) = &large_refused {
        println!(
            "not measured: the agent refused 10,000 rules: {}",
            e.lines().last().unwrap_or("")
        );
    }
    for p in Probe::SCALED {
        let (a, Some(b)) = (&results[1][&p], results[2].get(&p)) else {
            continue;
        };
        println!(
            "{:<28} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>8.3} {:>8.3}",
            p.name(),
            median(a),
            min(a),
            median(b),
            min(b),
            median(b) / median(a),
            min(b) / min(a)
        );
    }
    println!("(10 kernel rules for 1 workload vs 10,000 kernel rules for 1,000 workloads)");
    println!();
    println!(
        "BPF time per call (kernel.bpf_stats_enabled), 10 rules; `{}` is an empty \
         cgroup/sock_create program (r0 = 1; exit) attached beside the agent's, the floor of \
         what bpf_stats reports:",
        EmptyProgram::NAME
    );
    println!(
        "{:<28} {:<18} {:>12} {:>12}",
        "call", "program", "runs/call", "ns per run"
    );
    for (p, progs) in &stats {
        let mut any = false;
        for (name, runs, ns, n) in progs {
            if *runs == 0 {
                continue;
            }
            any = true;
            println!(
                "{:<28} {:<18} {:>12.3} {:>12.1}",
                p.name(),
                name,
                *runs as f64 / *n as f64,
                *ns as f64 / *runs as f64
            );
        }
        if !any {
            println!(
                "{:<28} {:<18} {:>12} {:>12}",
                p.name(),
                "(none ran)",
                "0",
                "-"
            );
        }
    }
    Ok(())
}

/// Moves this process back and removes the bench cgroups, whatever happened.
struct Cleanup {
    back_to: PathBuf,
    attach: PathBuf,
    workloads: usize,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = fs::write(
            self.back_to.join("cgroup.procs"),
            std::process::id().to_string(),
        );
        for i in 0..self.workloads {
            let _ = fs::remove_dir(self.attach.join(format!("w{i}")));
        }
        let _ = fs::remove_dir(&self.attach);
    }
}

/// An empty `cgroup/sock_create` program (`r0 = 1; exit`), loaded and linked with raw `bpf(2)`
/// calls so that no object file is needed; closing it detaches and unloads it.
struct EmptyProgram {
    prog: std::os::fd::OwnedFd,
    _link: std::os::fd::OwnedFd,
}

impl EmptyProgram {
    const NAME: &'static str = "empty_floor";

    fn bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> Result<std::os::fd::OwnedFd> {
        use std::os::fd::FromRawFd;
        // SAFETY: attr is a zero-padded `union bpf_attr` of the size passed.
        let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        // SAFETY: the kernel returned a new descriptor.
        Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
    }

    fn attach(cgroup: &Path) -> Result<Self> {
        use std::os::fd::AsRawFd;
        const BPF_PROG_LOAD: libc::c_long = 5;
        const BPF_LINK_CREATE: libc::c_long = 28;
        const BPF_PROG_TYPE_CGROUP_SOCK: u32 = 9;
        const BPF_CGROUP_INET_SOCK_CREATE: u32 = 2;
        // mov64 r0, 1; exit
        let insns: [u64; 2] = [
            u64::from_le_bytes([0xb7, 0, 0, 0, 1, 0, 0, 0]),
            u64::from_le_bytes([0x95, 0, 0, 0, 0, 0, 0, 0]),
        ];
        let license = c"GPL";
        let mut attr = [0u8; 128];
        attr[0..4].copy_from_slice(&BPF_PROG_TYPE_CGROUP_SOCK.to_ne_bytes());
        attr[4..8].copy_from_slice(&(insns.len() as u32).to_ne_bytes());
        attr[8..16].copy_from_slice(&(insns.as_ptr() as u64).to_ne_bytes());
        attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
        attr[48..48 + Self::NAME.len()].copy_from_slice(Self::NAME.as_bytes());
        attr[68..72].copy_from_slice(&BPF_CGROUP_INET_SOCK_CREATE.to_ne_bytes());
        let prog = Self::bpf(BPF_PROG_LOAD, &mut attr).context("loading the empty program")?;
        let dir =
            fs::File::open(cgroup).with_context(|| format!("opening {}", cgroup.display()))?;
        let mut attr = [0u8; 128];
        attr[0..4].copy_from_slice(&(prog.as_raw_fd() as u32).to_ne_bytes());
        attr[4..8].copy_from_slice(&(dir.as_raw_fd() as u32).to_ne_bytes());
        attr[8..12].copy_from_slice(&BPF_CGROUP_INET_SOCK_CREATE.to_ne_bytes());
        let link = Self::bpf(BPF_LINK_CREATE, &mut attr)
            .with_context(|| format!("linking the empty program to {}", cgroup.display()))?;
        Ok(Self { prog, _link: link })
    }

    /// The program's id, from its descriptor's fdinfo.
    fn id(&self) -> Result<u32> {
        use std::os::fd::AsRawFd;
        let path = format!("/proc/self/fdinfo/{}", self.prog.as_raw_fd());
        fs::read_to_string(&path)?
            .lines()
            .find_map(|l| l.strip_prefix("prog_id:"))
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| format!("{path} has no prog_id"))
    }
}
