//! `icmp-guard run`: start the enforcer, apply the policy, stream alerts, keep the policy fresh.
//!
//! The data path, stage by stage: the sources ([`reconcile`] gathers them and compiles) → the
//! kernel (the enforcer's maps) → the ring buffer of decisions → alerts → the outputs.

pub mod guard;
pub mod reconcile;

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow};
use icmp_guard_common::maps::SuppressKey;
use log::{error, info, warn};
use tokio::{io::unix::AsyncFd, signal::unix::SignalKind};

use crate::{
    events::alert,
    kernel::{
        enforcer::{Arrival, Counters, Enforcer, EnforcerChoice, Options},
        offsets as kernel_offsets, pins,
    },
    outputs::{Outputs, jsonl::JsonLines},
    sources::{config::AgentConfig, kubernetes::KubernetesArgs, workload},
};
use reconcile::{Environment, PolicySource, Reconciler};

use crate::{compile::guard::GuardCompiled, sources::policy::PolicySet};
use guard::{GuardService, GuardSetup};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Refuse what the policy blocks.
    Enforce,
    /// Refuse nothing; report every Block as `Audit (Block)`.
    Audit,
}

#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// KubeArmorPolicy / KubeArmorHostPolicy YAML file or directory. Without it, the embedded
    /// default policy is enforced (see README).
    #[arg(long)]
    pub policy: Option<PathBuf>,
    /// Agent configuration: cluster name, node labels, postures, workloads.
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "auto")]
    pub enforcer: EnforcerChoice,
    /// Where alerts go as JSON lines: a file (appended to) or `-` for stdout.
    #[arg(long, default_value = "-")]
    pub output: String,
    #[arg(long, value_enum, default_value = "enforce")]
    pub mode: Mode,
    /// cgroup v2 directory the cgroup enforcer attaches to (default: the cgroup v2 root, i.e.
    /// every process). Ignored by the LSM enforcer, which sees the whole machine.
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
    /// How often policy files, fromSource paths and pod containers are checked for changes,
    /// in milliseconds (changes the agent is told of apply at once).
    #[arg(long, default_value_t = 250)]
    pub refresh_ms: u64,
    /// Where the kernel programs' maps and link are pinned (on bpffs, mounted if needed), so
    /// that a restarted agent takes over with no gap and a crashed one keeps enforcing until
    /// it is back. `icmp-guard unload` removes it.
    #[arg(long, default_value = pins::DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// Pin nothing: the programs go with the agent's process (every socket is allowed again
    /// the moment it ends, however it ends).
    #[arg(long, conflicts_with = "pin_dir")]
    pub no_pin: bool,
    /// Seconds the pinned programs keep deciding after the agent's last renewal (it renews
    /// every second): how long a crashed agent has to come back.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(2..=3600))]
    pub lease_secs: u64,
    /// Seconds the pinned programs keep deciding after a clean stop (SIGTERM, Ctrl-C), for a
    /// restarted agent to take over; then every socket is allowed again.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub stop_grace_secs: u64,
    /// Turns off the inotify watch of the host's fromSource directories, leaving a replaced
    /// binary to the periodic round (`cargo xtask bench-upgrade` measures both).
    #[arg(long, hide = true)]
    pub no_source_watch: bool,
    #[command(flatten)]
    pub kubernetes: KubernetesArgs,
    #[command(flatten)]
    pub serve: crate::outputs::ServeArgs,
}

/// How the agent's log line announcing that it enforces begins. Whatever starts an agent and
/// must wait for it ([`spawn_until_ready`]) looks for this.
pub const READY: &str = "enforcing with";

/// An `icmp-guard run` started as a child process, its stderr collected line by line.
pub struct Spawned {
    pub process: std::process::Child,
    pub log: Arc<Mutex<Vec<String>>>,
}

/// Spawns `cmd` (an `icmp-guard run …`) and waits until it logs [`READY`]. If the child exits or
/// `timeout` passes first, it is killed and the error carries its log. `echo` copies each log
/// line to this process's stderr behind that prefix.
pub fn spawn_until_ready(
    mut cmd: std::process::Command,
    timeout: Duration,
    echo: Option<&'static str>,
) -> Result<Spawned> {
    use std::io::{BufRead, BufReader};
    let mut process = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("starting icmp-guard run")?;
    let log = Arc::new(Mutex::new(Vec::<String>::new()));
    let stderr = process.stderr.take().expect("stderr is piped");
    {
        let log = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(prefix) = echo {
                    eprintln!("{prefix} {line}");
                }
                log.lock().expect("log lock").push(line);
            }
        });
    }
    let start = std::time::Instant::now();
    loop {
        if log
            .lock()
            .expect("log lock")
            .iter()
            .any(|l| l.contains(READY))
        {
            return Ok(Spawned { process, log });
        }
        if process.try_wait()?.is_some() || start.elapsed() > timeout {
            let _ = process.kill();
            let _ = process.wait();
            // Let the reader thread take the last lines.
            std::thread::sleep(Duration::from_millis(100));
            return Err(anyhow!(
                "the agent did not start within {timeout:?}; its log:\n{}",
                log.lock().expect("log lock").join("\n")
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The DaemonSet grants these for `icmp-guard test --pod` alone: entering a pod's network and
/// mount namespaces, and the raw sockets ping and the probes open (as a container's default
/// capabilities allow them in the pod). The agent never uses them, so it gives them up.
const POD_TEST_CAPABILITIES: [(u32, &str); 3] = [
    (21, "CAP_SYS_ADMIN"),
    (18, "CAP_SYS_CHROOT"),
    (13, "CAP_NET_RAW"),
];

/// Removes `caps` from this thread's effective, permitted and inheritable sets (`capset`);
/// logs the ones it held.
fn drop_capabilities(caps: &[(u32, &str)]) -> Result<()> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    let mut header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: capget fills two `Data` words for version 3.
    if unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error()).context("reading this process's capabilities");
    }
    let mut held = Vec::new();
    for &(cap, name) in caps {
        let (word, bit) = ((cap / 32) as usize, 1u32 << (cap % 32));
        if data[word].permitted & bit != 0 {
            held.push(name);
        }
        data[word].effective &= !bit;
        data[word].permitted &= !bit;
        data[word].inheritable &= !bit;
    }
    if held.is_empty() {
        return Ok(());
    }
    // SAFETY: as above; only lowers the sets.
    if unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error()).context("giving up capabilities");
    }
    info!(
        "gave up {} (granted for `icmp-guard test --pod`; the agent does not use them)",
        held.join(", ")
    );
    Ok(())
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

pub(crate) struct Shared {
    enforcer: Mutex<Enforcer>,
    context: std::sync::RwLock<alert::Context>,
    limit: u32,
    guard: Arc<GuardService>,
    /// Each applied policy's guard entries (`None`: the guard is off), for the guard's task.
    guard_policy: tokio::sync::watch::Sender<(PolicySet, Option<GuardCompiled>)>,
}

pub fn run(args: RunArgs) -> Result<()> {
    crate::kernel::enforcer::check_root()?;
    if args.kubernetes.in_cluster {
        // Before any thread starts: capabilities are per thread.
        drop_capabilities(&POD_TEST_CAPABILITIES)?;
    }
    crate::compile::identity::require_initial_pid_namespace()?;
    info!("{}", crate::compile::identity::HostRoot::explain());
    let config = match &args.config {
        Some(p) => crate::sources::config::load(p).map_err(|e| anyhow!("{e}"))?,
        None => AgentConfig::default(),
    };
    let env = Environment::from_config(&config, args.mode)?;
    let source = match &args.policy {
        Some(p) => PolicySource::Path(p.clone()),
        None => PolicySource::Embedded,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    // Policy files and listen addresses are checked before anything is loaded: a broken file
    // must not take over a running agent's pinned set.
    source.load()?;
    let listeners = crate::outputs::bind(&args.serve)?;
    // Before the slow part (BTF, loading the programs): a restart or a crash must not let the
    // pinned set's lease lapse while this agent starts.
    let early_lease = if args.no_pin {
        None
    } else {
        pins::hold_lease(&args.pin_dir, Duration::from_secs(args.lease_secs))
    };
    let offsets = kernel_offsets::from_running_kernel()?;
    let cgroup = match &args.cgroup {
        Some(c) => c.clone(),
        None => workload::cgroup2_mount()?,
    };
    // The enforcer first: adopting a pinned set renews its lease before anything slow (the
    // Kubernetes API, compiling) can let it lapse.
    let mut enforcer = Enforcer::start(
        &Options {
            choice: args.enforcer,
            cgroup: &cgroup,
            pins: (!args.no_pin).then_some(args.pin_dir.as_path()),
            lease: Duration::from_secs(args.lease_secs),
        },
        &offsets,
    )?;
    // The enforcer renews the lease now (or, replacing a set of another layout, the old one's).
    drop(early_lease);
    match enforcer.arrival {
        Arrival::Adopted => info!(
            "adopted the pinned set at {}: its policy stays in force until this agent's is \
             compiled",
            args.pin_dir.display()
        ),
        Arrival::Replaced { from } => info!(
            "replacing the pinned set of layout {from} at {} with this agent's (layout {}): both \
             decide until this agent's policy is in force, then the old one is removed",
            args.pin_dir.display(),
            crate::kernel::enforcer::LAYOUT
        ),
        Arrival::Fresh => info!("pinned at {}", args.pin_dir.display()),
        Arrival::Unpinned => {}
    }
    rt.block_on(async move {
        let mut reconciler = Reconciler::new(source, env, &args.kubernetes).await?;
        reconciler.watch_sources(!args.no_source_watch);
        reconciler.wait_for_cluster(Duration::from_secs(30)).await;
        let desired = reconciler.desired().await;
        let compiled = reconciler.compile(&desired)?;
        reconcile::report_unresolved(&compiled, reconciler.embedded());
        let guard_setup = GuardSetup {
            config: config.guard,
            node_labels: desired.node_labels.clone(),
            audit_only: args.mode == Mode::Audit,
        };
        let guard_compiled = crate::agent::guard::compile(&desired.set, &guard_setup)?;
        enforcer.apply(&compiled)?;
        let epoch = enforcer.epoch();
        // The guard changes nothing on the network unless a KubeArmorNetworkPolicy asks for it.
        let guard = match &guard_compiled {
            Some(c) => Some(crate::agent::guard::start(c, &config.guard)?),
            None => None,
        };
        info!(
            "{READY} the {} enforcer{}: {} policies, {} kernel rules, {} workloads, mode {:?}",
            enforcer.kind.name(),
            enforcer
                .attached_cgroup
                .as_ref()
                .map(|c| format!(" on cgroup {}", c.display()))
                .unwrap_or_default(),
            desired.set.policies.len(),
            compiled.rules.len(),
            desired.workloads.len(),
            args.mode,
        );
        for blind in enforcer.kind.blind_spots() {
            warn!(
                "blind spot of the {} enforcer: {blind}",
                enforcer.kind.name()
            );
        }
        if let Some(attached) = &enforcer.attached_cgroup
            && Some(attached) != workload::cgroup2_mount().ok().as_ref()
        {
            warn!(
                "blind spot of the cgroup enforcer: processes outside {} are not covered",
                attached.display()
            );
        }
        let events = enforcer.take_events()?;
        let mut rules = alert::RuleTables::default();
        rules.insert(epoch, Arc::new(compiled.rules_info.clone()));
        let mut context = alert::Context {
            cluster_name: config.cluster_name.clone(),
            host_name: config.host_name.clone().unwrap_or_else(hostname),
            enforcer: enforcer.kind,
            boot_to_unix_ns: alert::boot_to_unix_ns(),
            workloads: BTreeMap::new(),
            gone: Default::default(),
            rules,
            executables: Default::default(),
        };
        context.set_workloads(&desired.workloads);
        let shared = Arc::new(Shared {
            context: std::sync::RwLock::new(context),
            enforcer: Mutex::new(enforcer),
            limit: reconciler.alerts_per_sec(),
            guard: GuardService::new(
                guard,
                guard_compiled.clone(),
                crate::events::guard::GuardContext {
                    cluster_name: config.cluster_name.clone(),
                    host_name: config.host_name.clone().unwrap_or_else(hostname),
                    boot_to_unix_ns: alert::boot_to_unix_ns(),
                    rules: Default::default(),
                    interfaces: Default::default(),
                    alerts_per_sec: config.guard.alerts_per_second,
                },
                guard_setup,
            ),
            guard_policy: tokio::sync::watch::channel((desired.set.clone(), guard_compiled)).0,
        });
        if !shared.guard.running() {
            info!("inbound ICMP guard off: no KubeArmorNetworkPolicy ICMP rule selects this node");
        }
        reconciler.applied(compiled, desired.workloads);
        let mut outputs = Outputs::new(JsonLines::open(&args.output)?);
        listeners.start(&mut outputs, shared.clone()).await?;
        serve(
            shared,
            events,
            Arc::new(outputs),
            reconciler,
            args.refresh_ms,
            Duration::from_secs(args.stop_grace_secs),
        )
        .await
    })
}

async fn serve(
    shared: Arc<Shared>,
    events: aya::maps::RingBuf<aya::maps::MapData>,
    outputs: Arc<Outputs>,
    reconciler: Reconciler,
    refresh_ms: u64,
    stop_grace: Duration,
) -> Result<()> {
    let mut reader = {
        let shared = shared.clone();
        let outputs = outputs.clone();
        tokio::spawn(async move {
            // SAFETY: the ring buffer owns its fd and outlives the registration (both live in
            // `fd`), which is what register_with_interest requires.
            let mut fd =
                unsafe { AsyncFd::register_with_interest(events, tokio::io::Interest::READABLE) }
                    .map_err(|e| anyhow!("registering the ring buffer with tokio: {e}"))?;
            loop {
                let mut guard = fd.readable_mut().await?;
                let rb = guard.get_inner_mut();
                while let Some(item) = rb.next() {
                    let Some(ev) = alert::decode(&item) else {
                        warn!(
                            "ring buffer record of {} bytes is too short; skipped",
                            item.len()
                        );
                        continue;
                    };
                    let a = shared.context.read().expect("context lock").alert(&ev);
                    outputs.offer(a);
                }
                guard.clear_ready();
            }
            #[allow(unreachable_code)]
            Ok::<(), anyhow::Error>(())
        })
    };

    // What has been announced so far; the last account at stop continues from it. An adopted
    // set's counters go back to its first agent: only what happens from now on is announced.
    let seen = Arc::new(tokio::sync::Mutex::new(Losses::as_of_now(&shared)));
    let accounting = {
        let shared = shared.clone();
        let outputs = outputs.clone();
        let seen = seen.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                announce_losses(&shared, &outputs, &mut *seen.lock().await).await;
            }
        })
    };

    shared.guard.spawn_reader(outputs.clone());
    let guard_task = {
        let shared = shared.clone();
        let outputs = outputs.clone();
        let mut policy = shared.guard_policy.subscribe();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(crate::agent::guard::INTERFACE_POLL);
            loop {
                tokio::select! {
                    changed = policy.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        let compiled = policy.borrow_and_update().1.clone();
                        shared.guard.apply(compiled, outputs.clone()).await;
                    }
                    _ = tick.tick() => {
                        shared.guard.summarize(&outputs).await;
                        let set = policy.borrow().0.clone();
                        if let Some(fresh) = shared.guard.interfaces_changed(&set) {
                            match fresh {
                                Ok(c) => shared.guard.apply(c, outputs.clone()).await,
                                Err(e) => error!("inbound ICMP guard: reading interfaces: {e:#}"),
                            }
                        }
                    }
                }
            }
        })
    };

    let refresher = tokio::spawn(reconcile::run(
        reconciler,
        shared.clone(),
        Duration::from_millis(refresh_ms.max(50)),
    ));

    let mut term = tokio::signal::unix::signal(SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: stopping"),
        _ = int.recv() => info!("SIGINT: stopping"),
        r = &mut reader => error!("alert reader stopped: {r:?}"),
    }
    // The lease is renewed until the last moment and the grace counted from there: a slow
    // shutdown (seconds under qemu's TCG) must not eat the time a restarted agent has to adopt.
    // The reader holds the outputs; it must go for the writer to see the end of the stream.
    reader.abort();
    let _ = reader.await;
    refresher.abort();
    accounting.abort();
    let _ = accounting.await;
    guard_task.abort();
    let _ = guard_task.await;
    // The guard's last summary, then its programs detached: the guard is not pinned, and a
    // stopped agent changes nothing on the network.
    shared.guard.stop(&outputs).await;
    // A last account, so that what was lost just before stopping is still reported.
    announce_losses(&shared, &outputs, &mut *seen.lock().await).await;
    match Arc::try_unwrap(outputs) {
        Ok(outputs) => outputs.close(Duration::from_secs(2)).await,
        Err(_) => warn!("alert outputs still in use at stop; the last alerts may be unwritten"),
    }
    // Now the lease: a pinned set keeps deciding for the grace, for a restarted agent to
    // adopt; alerts raised meanwhile wait in its ring buffer.
    let pinned = shared
        .enforcer
        .lock()
        .expect("enforcer lock")
        .release(stop_grace);
    let (counters, decisions) = {
        let mut e = shared.enforcer.lock().expect("enforcer lock");
        (e.counters()?, e.decisions()?)
    };
    let by_class: Vec<String> = decisions
        .iter()
        .map(|(class, [allowed, audited, blocked])| {
            format!("{} {allowed}/{audited}/{blocked}", class.name())
        })
        .collect();
    let after = if pinned {
        format!(
            "the pinned programs keep deciding for {stop_grace:?} for a restarted agent to take \
             over, then every socket is allowed again (`icmp-guard unload` does it at once)"
        )
    } else {
        "the programs are detached and every socket is allowed again".to_string()
    };
    info!(
        "stopped; kernel counters: decided {}, blocked {}, audited {}, ring buffer full {}, \
         identity read errors {}; decisions by class (allowed/audited/blocked): {}; {after}",
        counters.decided,
        counters.blocked,
        counters.audited,
        counters.ringbuf_full,
        counters.identity_errors,
        if by_class.is_empty() {
            "none".to_string()
        } else {
            by_class.join(", ")
        }
    );
    Ok(())
}

#[derive(Default)]
struct Losses {
    suppressed: BTreeMap<SuppressKey, u64>,
    counters: Counters,
    userspace: u64,
}

impl Losses {
    /// What the kernel counted before this agent: not this agent's to announce.
    fn as_of_now(shared: &Shared) -> Self {
        let mut e = shared.enforcer.lock().expect("enforcer lock");
        Losses {
            suppressed: e.suppressed().unwrap_or_default(),
            counters: e.counters().unwrap_or_default(),
            userspace: 0,
        }
    }
}

async fn announce_losses(shared: &Shared, outputs: &Outputs, seen: &mut Losses) {
    let (suppressed, counters) = {
        let mut e = shared.enforcer.lock().expect("enforcer lock");
        (e.suppressed(), e.counters())
    };
    let mut events = Vec::new();
    {
        let ctx = shared.context.read().expect("context lock");
        if let Ok(suppressed) = suppressed {
            // One summary per workload, saying what was suppressed since the last one.
            let mut new: BTreeMap<u32, Vec<(SuppressKey, u64)>> = BTreeMap::new();
            for (k, total) in suppressed {
                let before = seen.suppressed.insert(k, total).unwrap_or(0);
                if total > before {
                    new.entry(k.workload).or_default().push((k, total - before));
                }
            }
            for entries in new.values() {
                events.push(ctx.suppression_event(entries, shared.limit));
            }
        }
        if let Ok(c) = counters {
            let was = seen.counters;
            for (now, before, what) in [
                (
                    c.ringbuf_full,
                    was.ringbuf_full,
                    "lost because the kernel ring buffer was full",
                ),
                (
                    c.suppress_lost,
                    was.suppress_lost,
                    "suppressed while the suppression map was full",
                ),
                (
                    c.stage_errors,
                    was.stage_errors,
                    "lost because an alert capture stage could not run",
                ),
            ] {
                if now > before {
                    events.push(ctx.loss_event(what, now - before, None, shared.limit));
                }
            }
            seen.counters = c;
        }
        let userspace = outputs.jsonl_dropped();
        if userspace > seen.userspace {
            events.push(ctx.loss_event(
                "dropped because the alert output could not keep up",
                userspace - seen.userspace,
                None,
                shared.limit,
            ));
            seen.userspace = userspace;
        }
    }
    for e in events {
        warn!("{}", e.message);
        // Loss reports wait for room: they are the record of what was lost.
        outputs.announce(e).await;
    }
}

/// What the gRPC stream and the metrics read from the running agent.
impl crate::outputs::AgentView for Shared {
    fn loss_event(&self, reason: &str, count: u64) -> alert::Alert {
        let ctx = self.context.read().expect("context lock");
        ctx.loss_event(reason, count, None, self.limit)
    }

    fn snapshot(&self) -> crate::outputs::metrics::Snapshot {
        use std::sync::atomic::Ordering;
        // The enforcer lock is taken and released before the context lock, as the reconciler
        // nests them.
        let (kind, counters, decisions, suppressed, epoch) = {
            let mut e = self.enforcer.lock().expect("enforcer lock");
            // A failed read leaves its metrics out of this scrape, and says so.
            let failed = |what: &str, err: anyhow::Error| {
                warn!("metrics: reading the kernel's {what} failed: {err:#}");
            };
            let counters = e.counters().map_err(|err| failed("counters", err)).ok();
            let decisions = e
                .decisions()
                .map_err(|err| failed("decision counters", err))
                .ok()
                .map(|d| crate::kernel::enforcer::DecisionCount::all(&d));
            let suppressed = e
                .suppressed()
                .map_err(|err| failed("suppression counts", err));
            (
                e.kind,
                counters,
                decisions,
                suppressed.unwrap_or_default(),
                e.epoch(),
            )
        };
        let ctx = self.context.read().expect("context lock");
        let name = |w: u32| match ctx.workloads.get(&w) {
            Some(w) => w.name.clone(),
            None if w == icmp_guard_common::maps::HOST_WORKLOAD => "host".into(),
            None => format!("workload {w}"),
        };
        let mut by_workload: BTreeMap<String, u64> = BTreeMap::new();
        for (k, n) in suppressed {
            *by_workload.entry(name(k.workload)).or_default() += n;
        }
        crate::outputs::metrics::Snapshot {
            enforcer: kind.name(),
            counters,
            decisions,
            suppressed: by_workload.into_iter().collect(),
            reloads_applied: reconcile::RELOADS.load(Ordering::Relaxed),
            reloads_refused: reconcile::RELOADS_REFUSED.load(Ordering::Relaxed),
            rules: ctx.rules.get(epoch).map_or(0, |r| r.len()),
            workloads: ctx.workloads.len(),
        }
    }
}
