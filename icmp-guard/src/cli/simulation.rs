//! `icmp-guard test`: the seed's "Simulation" as a command an operator runs after installing.
//!
//! Attacker probes (hping3 in its default and `--icmp` modes, `nmap -sn` and `nmap -sS`, and a
//! raw ICMP socket opened by icmp-guard itself) must be refused with a Block alert; ping must
//! work without one. `refused*` marks nmap's ping scan, which on loopback may legitimately send
//! nothing at all.
//! Probes run inside a workload's cgroup and in a network namespace with only loopback, so
//! nothing they send can leave the machine even if enforcement failed. It either starts its own
//! agent (by default with the seed's ICMP-control policy and a workload labelled `app=nginx`), or
//! watches the alert file of an agent that is already running. With `--pod` the probes run in a
//! pod instead (see `cli::pod`), with its own executables and its loopback, and the running
//! agent's alerts come from its KubeArmor stream.

use std::{
    io::{BufRead, BufReader, Seek, SeekFrom},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use serde::Serialize;
use serde_json::Value;

use crate::{
    cli::{
        pod::{self, PodTarget},
        sandbox::{self, Placement},
    },
    kernel::enforcer::EnforcerChoice,
    outputs::grpc::client::AlertWatch,
    sources::workload,
};

/// The seed's policy, unchanged: allow icmp and udp sockets only from /usr/bin/ping.
pub const SEED_POLICY: &str =
    include_str!("../../../policies/kubearmor/restrict-scanning-tools.yaml");

#[derive(clap::Args, Debug)]
pub struct TestArgs {
    /// Policy file or directory for the agent this command starts (default: the seed's
    /// ICMP-control KubeArmorPolicy, with a workload labelled app=nginx in namespace default).
    #[arg(long)]
    pub policy: Option<PathBuf>,
    /// Agent config declaring the workload the probes run in (with --workload).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Name of the workload (from --config) to run the probes in.
    #[arg(long)]
    pub workload: Option<String>,
    /// Do not start an agent: read the alert file of one that is already running.
    #[arg(long)]
    pub alerts: Option<PathBuf>,
    /// cgroup to run the probes in when no workload is named (default: a new cgroup under the
    /// cgroup v2 root, removed afterwards).
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "auto")]
    pub enforcer: EnforcerChoice,
    /// Print the rows as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Probe a pod (NAMESPACE/NAME) under the running agent, from the icmp-guard pod on its
    /// node: the probes run in the pod's cgroup and namespaces with the pod's own executables,
    /// and the agent's alerts are read from its KubeArmor alert stream (--grpc).
    #[arg(long, value_name = "NAMESPACE/NAME", conflicts_with_all = ["policy", "config", "workload", "alerts", "cgroup"])]
    pub pod: Option<String>,
    /// With --pod: the container to probe in (default: the pod's first running container).
    #[arg(long, requires = "pod")]
    pub container: Option<String>,
    /// With --pod: the running agent's KubeArmor alert stream (its --grpc, plaintext).
    #[arg(long, default_value = "127.0.0.1:32767")]
    pub grpc: String,
    /// With --pod: the kubeconfig to find the pod with (default: the pod's service account,
    /// else $KUBECONFIG or ~/.kube/config).
    #[arg(long, requires = "pod")]
    pub kubeconfig: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Expect {
    Refused,
    /// Refused, or it finished without opening any socket the policy decides (no alert at all).
    RefusedOrSilent,
    Allowed,
}

struct Probe {
    name: &'static str,
    argv: Vec<String>,
    expect: Expect,
    /// The executable whose absence makes the row "not installed".
    tool: PathBuf,
    /// icmp-guard's own probe: never in a pod, so it runs from this root.
    own: bool,
}

#[derive(Debug, Serialize)]
pub struct Row {
    pub probe: String,
    pub command: String,
    pub expected: Expect,
    pub errno: String,
    pub alert: String,
    pub pass: bool,
    /// The pod has no such executable: the row says so and decides nothing.
    pub skipped: bool,
    pub note: String,
}

fn probes() -> Result<Vec<Probe>> {
    let me = std::env::current_exe().context("finding icmp-guard's own path")?;
    let p = |name, argv: &[&str], expect, tool: &str| Probe {
        name,
        argv: argv.iter().map(|s| s.to_string()).collect(),
        expect,
        tool: PathBuf::from(tool),
        own: false,
    };
    let me_str = me.to_string_lossy().into_owned();
    Ok(vec![
        p(
            "hping3",
            &["/usr/sbin/hping3", "-c", "1", "127.0.0.1"],
            Expect::Refused,
            "/usr/sbin/hping3",
        ),
        p(
            "hping3 --icmp",
            &["/usr/sbin/hping3", "--icmp", "-c", "1", "127.0.0.1"],
            Expect::Refused,
            "/usr/sbin/hping3",
        ),
        // On local addresses nmap's ping scan reports the host up without sending anything: its
        // only inet socket is udp, refused where the policy restricts udp (as the seed's does).
        p(
            "nmap -sn",
            &["/usr/bin/nmap", "-sn", "-n", "127.0.0.1"],
            Expect::RefusedOrSilent,
            "/usr/bin/nmap",
        ),
        // A SYN scan forges its packets through IPPROTO_RAW and reads them with AF_PACKET.
        p(
            "nmap -sS",
            &["/usr/bin/nmap", "-sS", "-p", "9", "-n", "-Pn", "127.0.0.1"],
            Expect::Refused,
            "/usr/bin/nmap",
        ),
        Probe {
            name: "raw ICMP socket",
            argv: vec![me_str.clone(), "probe-socket".into(), "raw-icmp".into()],
            expect: Expect::Refused,
            tool: me.clone(),
            own: true,
        },
        p(
            "ping",
            &["/usr/bin/ping", "-c", "1", "-W", "2", "127.0.0.1"],
            Expect::Allowed,
            "/usr/bin/ping",
        ),
    ])
}

/// A started agent, stopped on drop.
struct OwnAgent {
    child: Child,
    _dir: PathBuf,
}

impl Drop for OwnAgent {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = sandbox::wait_child(&mut self.child, Duration::from_secs(10));
    }
}

/// Where the alerts of this run are read.
enum Alerts {
    /// An agent's `--output` file, from the byte offset where this run's alerts start.
    File { path: PathBuf, from: u64 },
    /// A running agent's KubeArmor alert stream, subscribed to before the first probe.
    Stream(AlertWatch),
}

impl Alerts {
    fn read(&self) -> Vec<Value> {
        match self {
            Alerts::File { path, from } => read_alerts(path, *from),
            Alerts::Stream(w) => w.alerts(),
        }
    }
}

struct Setup {
    alerts: Alerts,
    /// Where the probes run, and icmp-guard's own probe.
    place: Placement,
    own_place: Placement,
    /// The pod probed, whose root has the probes' executables.
    pod: Option<PodTarget>,
    /// For the summary line.
    placed: String,
    _agent: Option<OwnAgent>,
    _cleanup: Option<PathBuf>,
}

impl Setup {
    fn in_cgroup(
        alerts: Alerts,
        cgroup: PathBuf,
        agent: Option<OwnAgent>,
        cleanup: Option<PathBuf>,
    ) -> Self {
        let place = Placement::in_cgroup(&cgroup);
        Setup {
            alerts,
            own_place: place.clone(),
            place,
            pod: None,
            placed: format!(
                "probes ran in cgroup {} with a loopback-only network",
                cgroup.display()
            ),
            _agent: agent,
            _cleanup: cleanup,
        }
    }
}

fn start_agent(args: &TestArgs, policy: &Path, config: &Path, dir: &Path) -> Result<OwnAgent> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.arg("run")
        // A throw-away agent: it must neither adopt nor leave a pinned set.
        .arg("--no-pin")
        .arg("--policy")
        .arg(policy)
        .arg("--config")
        .arg(config)
        .arg("--output")
        .arg(dir.join("alerts.jsonl"))
        .arg("--enforcer")
        .arg(match args.enforcer {
            EnforcerChoice::Auto => "auto",
            EnforcerChoice::Lsm => "lsm",
            EnforcerChoice::Cgroup => "cgroup",
        });
    let spawned = crate::agent::spawn_until_ready(cmd, Duration::from_secs(90), None)?;
    Ok(OwnAgent {
        child: spawned.process,
        _dir: dir.to_path_buf(),
    })
}

fn setup(args: &TestArgs) -> Result<Setup> {
    if let Some(spec) = &args.pod {
        let target = pod::resolve(spec, args.container.as_deref(), args.kubeconfig.as_deref())?;
        let watch = AlertWatch::start(&args.grpc)?;
        return Ok(Setup {
            alerts: Alerts::Stream(watch),
            place: target.placement()?,
            own_place: target.own_placement()?,
            placed: format!(
                "probes ran in pod {} (container {}, cgroup {}) in its network and mount \
                 namespaces; alerts from the agent's stream at {}",
                target.pod,
                target.container,
                target.cgroup.display(),
                args.grpc
            ),
            pod: Some(target),
            _agent: None,
            _cleanup: None,
        });
    }
    let mount = workload::cgroup2_mount()?;
    let configured = match (&args.config, &args.workload) {
        (Some(c), Some(name)) => {
            let cfg = crate::sources::config::load(c).map_err(|e| anyhow!("{e}"))?;
            let spec = cfg
                .workloads
                .iter()
                .find(|w| &w.name == name)
                .ok_or_else(|| anyhow!("{} declares no workload named {name}", c.display()))?;
            Some(workload::cgroup_path(&mount, &spec.cgroup)?)
        }
        (None, Some(_)) => bail!("--workload needs --config, which declares the workload"),
        _ => None,
    };
    // Without a named workload the probes are host processes in a cgroup of their own.
    let own_cgroup = || match &args.cgroup {
        Some(c) => (c.clone(), None),
        None => {
            let c = mount.join(format!("icmp-guard-test-{}", std::process::id()));
            (c.clone(), Some(c))
        }
    };
    if let Some(alerts) = &args.alerts {
        let (cgroup, cleanup) = match configured {
            Some(c) => (c, None),
            None => own_cgroup(),
        };
        workload::ensure_cgroup(&cgroup)?;
        let from = std::fs::metadata(alerts)
            .with_context(|| {
                format!(
                    "reading the running agent's alert file {}",
                    alerts.display()
                )
            })?
            .len();
        return Ok(Setup::in_cgroup(
            Alerts::File {
                path: alerts.clone(),
                from,
            },
            cgroup,
            None,
            cleanup,
        ));
    }
    let dir = std::env::temp_dir().join(format!("icmp-guard-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let config_path = dir.join("config.yaml");
    let (policy, config, cgroup, cleanup) = match (&args.policy, &args.config) {
        (Some(p), Some(c)) => {
            let cgroup = configured.ok_or_else(|| {
                anyhow!("with --config, name the workload to probe with --workload")
            })?;
            (p.clone(), c.clone(), cgroup, None)
        }
        (Some(p), None) => {
            let (cgroup, cleanup) = own_cgroup();
            workload::ensure_cgroup(&cgroup)?;
            std::fs::write(&config_path, "workloads: []\n")?;
            (p.clone(), config_path, cgroup, cleanup)
        }
        (None, None) => {
            let policy = dir.join("restrict-scanning-tools.yaml");
            std::fs::write(&policy, SEED_POLICY)?;
            // A throw-away workload that the seed policy's selector matches.
            let (cgroup, cleanup) = own_cgroup();
            std::fs::write(
                &config_path,
                format!(
                    "workloads:\n  - name: icmp-guard-test\n    cgroup: {}\n    namespace: default\n    labels:\n      app: nginx\n",
                    cgroup.display()
                ),
            )?;
            (policy, config_path, cgroup, cleanup)
        }
        (None, Some(_)) => bail!("--config without --policy: give the policy the agent enforces"),
    };
    let agent = start_agent(args, &policy, &config, &dir)?;
    Ok(Setup::in_cgroup(
        Alerts::File {
            path: dir.join("alerts.jsonl"),
            from: 0,
        },
        cgroup,
        Some(agent),
        cleanup,
    ))
}

impl Drop for Setup {
    fn drop(&mut self) {
        let Some(c) = &self._cleanup else {
            return;
        };
        // Right after its last process exits, a cgroup can still be busy for a moment.
        for _ in 0..50 {
            if std::fs::remove_dir(c).is_ok() || !c.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "icmp-guard test: could not remove the probe cgroup {}; remove it with rmdir",
            c.display()
        );
    }
}

fn read_alerts(path: &Path, from: u64) -> Vec<Value> {
    let Ok(mut f) = std::fs::File::open(path) else {
        return Vec::new();
    };
    if f.seek(SeekFrom::Start(from)).is_err() {
        return Vec::new();
    }
    BufReader::new(f)
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| serde_json::from_str(&l).ok())
        .collect()
}

fn alerts_of(alerts: &[Value], pid: u32) -> Vec<&Value> {
    alerts
        .iter()
        .filter(|a| a.get("HostPID").and_then(Value::as_u64) == Some(pid as u64))
        .collect()
}

fn run_probe(setup: &Setup, probe: &Probe) -> Row {
    let command = probe.argv.join(" ");
    let mut row = Row {
        probe: probe.name.to_string(),
        command,
        expected: probe.expect,
        errno: "-".into(),
        alert: "-".into(),
        pass: false,
        skipped: false,
        note: String::new(),
    };
    if let Some(pod) = setup.pod.as_ref().filter(|_| !probe.own)
        && !pod.in_root(&probe.tool).exists()
    {
        row.errno = "not in the pod".into();
        row.skipped = true;
        row.note = format!(
            "container {} has no {}",
            pod.container,
            probe.tool.display()
        );
        return row;
    }
    if setup.pod.is_none() && !probe.tool.exists() {
        row.errno = "not installed".into();
        row.note = format!(
            "{} is not installed (apt-get install -y hping3 nmap iputils-ping)",
            probe.tool.display()
        );
        return row;
    }
    let argv: Vec<&str> = probe.argv.iter().map(String::as_str).collect();
    let place = if probe.own {
        &setup.own_place
    } else {
        &setup.place
    };
    let child = match sandbox::spawn(place, &argv, Stdio::null()) {
        Ok(c) => c,
        Err(e) => {
            row.note = format!("could not start: {e}");
            return row;
        }
    };
    let pid = child.id();
    let out = match sandbox::wait(child, Duration::from_secs(30)) {
        Ok(o) => o,
        Err(e) => {
            row.note = e.to_string();
            return row;
        }
    };
    if let Some(errno) = sandbox::reported_errno(&out) {
        row.errno = errno.into();
    }
    // Alerts reach the file within milliseconds; give a slow machine a second.
    let deadline = Instant::now() + Duration::from_millis(1500);
    let mut mine;
    loop {
        let all = setup.alerts.read();
        mine = alerts_of(&all, pid)
            .into_iter()
            .cloned()
            .collect::<Vec<_>>();
        let blocked = mine.iter().any(|a| a["Action"] == "Block");
        if (probe.expect != Expect::Allowed && blocked) || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let block = mine.iter().find(|a| a["Action"] == "Block");
    if let Some(a) = block.or(mine.first()) {
        row.alert = format!(
            "{} / {}",
            a["PolicyName"].as_str().unwrap_or("?"),
            a["Action"].as_str().unwrap_or("?")
        );
    }
    match probe.expect {
        Expect::Refused => {
            row.pass = block.is_some() && !out.status.success();
            if !row.pass {
                row.note = if out.status.success() {
                    "the probe succeeded: nothing refused it".into()
                } else {
                    "failed, but no Block alert names it".into()
                };
            }
        }
        Expect::RefusedOrSilent => {
            let refused = block.is_some() && !out.status.success();
            let silent = mine.is_empty() && out.status.success();
            row.pass = refused || silent;
            if silent {
                row.note = "sent no ICMP: nmap reports local addresses up without probing".into();
            } else if !row.pass {
                row.note = "neither refused with a Block alert nor silent".into();
            }
        }
        Expect::Allowed => {
            row.pass = out.status.success() && block.is_none();
            if !out.status.success() {
                row.note = format!("failed: {}", sandbox::text(&out).trim());
            } else if block.is_some() {
                row.note = "succeeded but a Block alert names it".into();
            }
        }
    }
    row
}

pub fn run(args: &TestArgs) -> Result<bool> {
    crate::kernel::enforcer::check_root()?;
    let setup = setup(args)?;
    let rows: Vec<Row> = probes()?.iter().map(|p| run_probe(&setup, p)).collect();
    if let Alerts::Stream(w) = &setup.alerts
        && let Some(why) = w.ended()
    {
        bail!("the agent's alert stream ended during the test ({why}): no row can be trusted");
    }
    // Rows the pod has no executable for decide nothing, but at least one refusal must be seen.
    let all_pass = rows.iter().all(|r| r.pass || r.skipped)
        && rows.iter().any(|r| r.pass && r.expected == Expect::Refused);
    let skipped = rows.iter().filter(|r| r.skipped).count();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print_table(&rows);
        println!(
            "{}: {} of {} rows as expected{} ({})",
            if all_pass { "PASS" } else { "FAIL" },
            rows.iter().filter(|r| r.pass).count(),
            rows.len() - skipped,
            if skipped > 0 {
                format!(", {skipped} skipped: not in the pod")
            } else {
                String::new()
            },
            setup.placed
        );
    }
    Ok(all_pass)
}

fn print_table(rows: &[Row]) {
    let header = [
        "PROBE",
        "EXPECTED",
        "ERRNO SEEN",
        "ALERT (policy / action)",
        "RESULT",
    ];
    let cells: Vec<[String; 5]> = rows
        .iter()
        .map(|r| {
            [
                r.probe.clone(),
                match r.expected {
                    Expect::Refused => "refused".into(),
                    Expect::RefusedOrSilent => "refused*".into(),
                    Expect::Allowed => "allowed".into(),
                },
                r.errno.clone(),
                r.alert.clone(),
                match (r.pass, r.note.is_empty()) {
                    _ if r.skipped => format!("skipped ({})", r.note),
                    (true, true) => "pass".into(),
                    (true, false) => format!("pass ({})", r.note),
                    (false, _) => format!("FAIL: {}", r.note),
                },
            ]
        })
        .collect();
    let mut width = header.map(str::len);
    for c in &cells {
        for (w, s) in width.iter_mut().zip(c) {
            *w = (*w).max(s.len());
        }
    }
    let line = |c: [&str; 5]| {
        let mut s = String::new();
        for (i, cell) in c.iter().enumerate() {
            if i + 1 == c.len() {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}  ", w = width[i]));
            }
        }
        println!("{}", s.trim_end());
    };
    line(header);
    for c in &cells {
        line([&c[0], &c[1], &c[2], &c[3], &c[4]]);
    }
}

/// `icmp-guard probe-socket raw-icmp`: the probe of icmp-guard's own, so that the test does not
/// depend on any scanner being installed. Exits 0 when the socket opened, 1 when refused.
pub fn probe_socket(kind: &str) -> Result<bool> {
    let (family, ty, proto) = match kind {
        "raw-icmp" => (libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP),
        "raw-icmpv6" => (libc::AF_INET6, libc::SOCK_RAW, libc::IPPROTO_ICMPV6),
        "raw" => (libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW),
        "packet" => (libc::AF_PACKET, libc::SOCK_RAW, 0),
        other => bail!("unknown socket kind {other}: use raw-icmp, raw-icmpv6, raw or packet"),
    };
    // SAFETY: plain syscall.
    let fd = unsafe { libc::socket(family, ty, proto) };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        println!("socket({kind}): {e}");
        return Ok(false);
    }
    // SAFETY: we own fd.
    unsafe { libc::close(fd) };
    println!("socket({kind}): opened");
    Ok(true)
}
