//! `cargo xtask bench-pods`: what pods cost the agent, in the real test cluster.
//!
//! The harness (`cargo xtask k8s test`) starts the cluster; the agent runs on the node as the
//! Kubernetes tests run it (cgroup enforcer on `kubepods`, the API through the admin
//! kubeconfig) with the seed's `KubeArmorPolicy` applied. Then:
//!
//! - **Churn**: pods labelled `app=nginx` are created and deleted one after the other. Each
//!   container's first command tries its own `/usr/bin/ping` in a loop until the kernel lets it
//!   open its socket, and prints the time that took (bash's `$EPOCHREALTIME`, minus the time of
//!   one allowed ping measured right after) and how many tries were refused. That is the time
//!   from a container's start to its `fromSource` rules being in place, seen from inside.
//! - The agent's CPU time (utime + stime from `/proc/PID/stat`) over the churn, and its
//!   resident memory before, after and at its peak (`VmHWM`).
//! - **Memory with many pods**: `--known` pods (another label, no policy) on the node at once,
//!   then the agent's resident memory.

use std::{
    fs,
    io::Write,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::Args;

#[derive(Debug, Args)]
pub struct BenchPodsArgs {
    /// Pods created and deleted, one after the other.
    #[arg(long, default_value_t = 50)]
    pub pods: u32,
    /// Pods on the node at once for the memory figure (the kubelet admits 110 by default).
    #[arg(long, default_value_t = 100)]
    pub known: u32,
    /// The agent binary (default: target/release/icmp-guard, built first).
    #[arg(long)]
    pub agent: Option<PathBuf>,
}

/// What the harness runs inside the cluster's environment.
#[derive(Debug, Args)]
pub struct BenchPodsRunArgs {
    #[arg(long)]
    pub pods: u32,
    #[arg(long)]
    pub known: u32,
    #[arg(long)]
    pub agent: PathBuf,
}

pub fn run(args: BenchPodsArgs) -> Result<()> {
    let agent = crate::bench_agent::release_agent(args.agent)?;
    let agent = fs::canonicalize(&agent).with_context(|| format!("agent {}", agent.display()))?;
    let me = std::env::current_exe()?;
    crate::k8s::test::run(crate::k8s::test::TestArgs {
        cmd: vec![
            me.display().to_string(),
            "bench-pods-run".into(),
            "--pods".into(),
            args.pods.to_string(),
            "--known".into(),
            args.known.to_string(),
            "--agent".into(),
            agent.display().to_string(),
        ],
    })
}

fn env(name: &str) -> Result<String> {
    std::env::var(name).with_context(|| {
        format!("{name} is not set: bench-pods-run runs under `cargo xtask k8s test` (use `cargo xtask bench-pods`)")
    })
}

struct Kubectl(String);

impl Kubectl {
    fn run(&self, args: &[&str], stdin: Option<&str>) -> Result<String> {
        let mut child = Command::new(&self.0)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting kubectl")?;
        if let Some(text) = stdin {
            child
                .stdin
                .take()
                .expect("piped")
                .write_all(text.as_bytes())?;
        }
        drop(child.stdin.take());
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "kubectl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// The agent on the node, stopped (and its programs detached) when dropped.
struct Agent {
    child: Child,
    log: PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        // SAFETY: our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// (CPU seconds, resident KiB, peak resident KiB) of `pid`.
fn usage(pid: u32) -> Result<(f64, u64, u64)> {
    let p = procfs::process::Process::new(pid as i32)?;
    let stat = p.stat()?;
    let tick = procfs::ticks_per_second() as f64;
    let status = p.status()?;
    Ok((
        (stat.utime + stat.stime) as f64 / tick,
        status.vmrss.unwrap_or(0),
        status.vmhwm.unwrap_or(0),
    ))
}

const MEASURE: &str = r#"t0=$EPOCHREALTIME; n=0
until ping -c 1 -W 1 127.0.0.1 >/dev/null 2>&1; do n=$((n+1)); [ $n -ge 20000 ] && break; done
t1=$EPOCHREALTIME
ping -c 1 -W 1 127.0.0.1 >/dev/null 2>&1; t2=$EPOCHREALTIME
echo "bench $t0 $t1 $t2 $n"
exec sleep 3600"#;

fn pod(name: &str, app: &str, image: &str, script: &str) -> String {
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": {"app": app}},
        "spec": {
            "terminationGracePeriodSeconds": 0,
            "containers": [{
                "name": "main",
                "image": image,
                "imagePullPolicy": "Never",
                "command": ["/bin/bash", "-c", script],
            }],
        },
    })
    .to_string()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub fn run_inside(args: BenchPodsRunArgs) -> Result<()> {
    let kubectl = Kubectl(env("ICMP_GUARD_KUBECTL")?);
    let kubeconfig = env("KUBECONFIG")?;
    let node = env("ICMP_GUARD_K8S_NODE")?;
    let image = env("ICMP_GUARD_TESTBOX_IMAGE")?;
    let root = crate::vm::workspace_root();
    let work = std::env::temp_dir().join(format!("icmp-guard-bench-pods-{}", std::process::id()));
    fs::create_dir_all(work.join("policies"))?;
    let kubepods = Path::new("/sys/fs/cgroup/unified/kubepods");
    if !kubepods.is_dir() {
        bail!(
            "{} is missing: is the kubelet running with cgroup v2 here?",
            kubepods.display()
        );
    }

    kubectl.run(
        &[
            "apply",
            "-f",
            &root
                .join("deploy/kubernetes/00-crds.yaml")
                .display()
                .to_string(),
        ],
        None,
    )?;
    let log = work.join("agent.log");
    let child = Command::new(&args.agent)
        .args(["run", "--enforcer", "cgroup", "--cgroup"])
        .arg(kubepods)
        .args([
            "--kubeconfig",
            &kubeconfig,
            "--node-name",
            &node,
            "--no-pin",
            "--policy",
        ])
        .arg(work.join("policies"))
        .arg("--output")
        .arg(work.join("alerts.jsonl"))
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log)?)
        .spawn()
        .context("starting the agent")?;
    let agent = Agent { child, log };
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let text = fs::read_to_string(&agent.log).unwrap_or_default();
        if text.contains("enforcing with") {
            break;
        }
        if Instant::now() > deadline {
            bail!("the agent did not start enforcing within 120 s:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // The API needs a moment to serve a new CRD's kind.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match kubectl.run(
            &[
                "apply",
                "-f",
                &root
                    .join("policies/kubearmor/restrict-scanning-tools.yaml")
                    .display()
                    .to_string(),
            ],
            None,
        ) {
            Ok(_) => break,
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    }

    let deadline = Instant::now() + Duration::from_secs(60);
    while !fs::read_to_string(&agent.log)
        .unwrap_or_default()
        .contains("policy accepted from the Kubernetes API")
    {
        if Instant::now() > deadline {
            bail!("the agent did not accept the seed policy within 60 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let pid = agent.child.id();
    std::thread::sleep(Duration::from_secs(2));
    let (cpu0, rss0, _) = usage(pid)?;

    eprintln!("bench-pods: churn of {} pods", args.pods);
    let mut times_ms = Vec::new();
    let mut refused = 0u64;
    let started = Instant::now();
    for i in 0..args.pods {
        let name = format!("churn-{i}");
        kubectl.run(
            &["apply", "-f", "-"],
            Some(&pod(&name, "nginx", &image, MEASURE)),
        )?;
        let deadline = Instant::now() + Duration::from_secs(120);
        let line = loop {
            let out = kubectl
                .run(&["logs", "-n", "default", &name], None)
                .unwrap_or_default();
            if let Some(l) = out.lines().find(|l| l.starts_with("bench ")) {
                break l.to_string();
            }
            if Instant::now() > deadline {
                bail!("pod {name} printed no measurement within 120 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let f: Vec<f64> = line
            .split_whitespace()
            .skip(1)
            .map(|v| v.parse::<f64>())
            .collect::<Result<_, _>>()
            .with_context(|| format!("pod {name} printed `{line}`"))?;
        let [t0, t1, t2, n] = f[..] else {
            bail!("pod {name} printed `{line}`");
        };
        if n >= 20000.0 {
            bail!("pod {name}: its ping was still refused after 20000 tries");
        }
        let ping = t2 - t1;
        times_ms.push(((t1 - t0) - ping).max(0.0) * 1000.0);
        refused += n as u64;
        kubectl.run(
            &[
                "delete",
                "pod",
                "-n",
                "default",
                &name,
                "--grace-period=0",
                "--force",
                "--wait=false",
            ],
            None,
        )?;
    }
    let churn_secs = started.elapsed().as_secs_f64();
    let (cpu1, rss1, hwm1) = usage(pid)?;
    // Wait for the churned pods to be gone before the memory figure.
    let deadline = Instant::now() + Duration::from_secs(180);
    while kubectl
        .run(&["get", "pods", "-n", "default", "-o", "name"], None)?
        .contains("churn-")
    {
        if Instant::now() > deadline {
            bail!("the churned pods were not gone within 180 s");
        }
        std::thread::sleep(Duration::from_secs(1));
    }

    eprintln!("bench-pods: {} pods on the node at once", args.known);
    let list: Vec<serde_json::Value> = (0..args.known)
        .map(|i| {
            serde_json::from_str(&pod(
                &format!("known-{i}"),
                "other",
                &image,
                "exec sleep 3600",
            ))
            .expect("valid JSON")
        })
        .collect();
    let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": list}).to_string();
    kubectl.run(&["apply", "-f", "-"], Some(&list))?;
    let deadline = Instant::now() + Duration::from_secs(600);
    let running = loop {
        let out = kubectl.run(
            &[
                "get",
                "pods",
                "-n",
                "default",
                "-l",
                "app=other",
                "--field-selector=status.phase=Running",
                "-o",
                "name",
            ],
            None,
        )?;
        let n = out.lines().count() as u32;
        if n >= args.known || Instant::now() > deadline {
            break n;
        }
        std::thread::sleep(Duration::from_secs(2));
    };
    // A few of the agent's rounds with every pod known.
    std::thread::sleep(Duration::from_secs(5));
    let (cpu2, rss2, hwm2) = usage(pid)?;
    kubectl.run(
        &[
            "delete",
            "pods",
            "-n",
            "default",
            "-l",
            "app=other",
            "--grace-period=0",
            "--force",
            "--wait=false",
        ],
        None,
    )?;

    let alerts = fs::read_to_string(work.join("alerts.jsonl")).unwrap_or_default();
    let ping_blocks = alerts
        .lines()
        .filter(|l| {
            l.contains("\"ProcessName\":\"/usr/bin/ping\"") && l.contains("\"Action\":\"Block\"")
        })
        .count();
    // The agent's own account: "container ID (NAME) of pod NS/churn-N: its sources are in
    // force, N ms after its cgroup appeared".
    let mut agent_ms: Vec<f64> = fs::read_to_string(&agent.log)?
        .lines()
        .filter(|l| l.contains("/churn-") && l.contains("its sources are in force"))
        .filter_map(|l| {
            let rest = l.split("its sources are in force, ").nth(1)?;
            rest.strip_suffix(" ms after its cgroup appeared")?
                .parse()
                .ok()
        })
        .collect();
    agent_ms.sort_by(f64::total_cmp);
    drop(agent);
    let _ = fs::remove_dir_all(&work);

    times_ms.sort_by(f64::total_cmp);
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")?;
    println!(
        "bench-pods: kernel {}, cgroup enforcer on kubepods, seed policy, {} pods churned in {:.1} s",
        kernel.trim(),
        args.pods,
        churn_secs
    );
    println!();
    println!("container start -> its own ping allowed (ms, seen from inside the container):");
    println!(
        "  median {:.1}, p99 {:.1}, max {:.1}, min {:.1}",
        percentile(&times_ms, 0.5),
        percentile(&times_ms, 0.99),
        times_ms.last().copied().unwrap_or(0.0),
        times_ms.first().copied().unwrap_or(0.0)
    );
    println!(
        "  pings refused before that: {refused} in all; Block alerts for /usr/bin/ping: {ping_blocks}"
    );
    if agent_ms.is_empty() {
        println!("the agent logged no container of a churned pod in force");
    } else {
        println!(
            "the agent's own account, pod cgroup created -> container's sources in force (ms, {} \
             containers incl. sandboxes): median {:.0}, p99 {:.0}, max {:.0}",
            agent_ms.len(),
            percentile(&agent_ms, 0.5),
            percentile(&agent_ms, 0.99),
            agent_ms.last().copied().unwrap_or(0.0)
        );
    }
    println!();
    println!(
        "agent CPU during the churn: {:.2} s for {} pods ({:.0} ms per pod, {:.1}% of one core)",
        cpu1 - cpu0,
        args.pods,
        (cpu1 - cpu0) * 1000.0 / args.pods as f64,
        (cpu1 - cpu0) * 100.0 / churn_secs
    );
    println!(
        "agent resident memory: {:.1} MiB before, {:.1} MiB after, peak {:.1} MiB",
        rss0 as f64 / 1024.0,
        rss1 as f64 / 1024.0,
        hwm1 as f64 / 1024.0
    );
    println!(
        "with {running} pods running on the node ({} asked): {:.1} MiB resident, peak {:.1} MiB, \
         CPU {:.2} s while they started",
        args.known,
        rss2 as f64 / 1024.0,
        hwm2 as f64 / 1024.0,
        cpu2 - cpu1
    );
    if running < args.known {
        println!(
            "  (only {running} of {} reached Running within 600 s)",
            args.known
        );
    }
    Ok(())
}
