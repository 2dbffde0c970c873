//! `icmp-guard run`: start the enforcer, apply the policy, stream alerts, keep the policy fresh.

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, Result, anyhow};
use log::{error, info, warn};
use tokio::{io::unix::AsyncFd, signal::unix::SignalKind};

use crate::{
    compile::{self, Compiled, Postures, guard::GuardCompiled, identity::Resolver},
    events::alert,
    guard::{GuardService, GuardSetup},
    kernel::{
        enforcer::{Counters, Enforcer, EnforcerChoice, Options},
        offsets as kernel_offsets,
    },
    outputs::{Outputs, jsonl::JsonLines},
    sources::{
        config::AgentConfig,
        policy::{self, Action, PolicySet},
        workload::{self, Workload},
    },
};

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
    /// How often policy files and fromSource paths are checked for changes, in milliseconds.
    #[arg(long, default_value_t = 250)]
    pub refresh_ms: u64,
}

/// Everything a policy compilation needs besides the policies themselves.
struct Environment {
    workloads: Vec<Workload>,
    node_labels: BTreeMap<String, String>,
    postures: Postures,
    alerts_per_sec: u32,
    audit_only: bool,
    guard: GuardSetup,
}

/// Where policies come from, and how to tell whether they changed.
enum PolicySource {
    Embedded,
    Path(PathBuf),
}

impl PolicySource {
    fn load(&self) -> Result<PolicySet> {
        match self {
            PolicySource::Embedded => Ok(policy::default::policy_set()),
            PolicySource::Path(p) => {
                let loaded = policy::kubearmor::load(p)
                    .map_err(|e| anyhow!("{e}\nfix the policy files above; nothing was applied"))?;
                for w in &loaded.warnings {
                    warn!("{w}");
                }
                Ok(loaded.set)
            }
        }
    }

    /// (path, modified, len) of every policy file: a cheap change detector.
    fn fingerprint(&self) -> Vec<(PathBuf, Option<SystemTime>, u64)> {
        let PolicySource::Path(root) = self else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let mut stack = vec![root.clone()];
        while let Some(p) = stack.pop() {
            let Ok(meta) = std::fs::metadata(&p) else {
                out.push((p, None, 0));
                continue;
            };
            if meta.is_dir() {
                if let Ok(rd) = std::fs::read_dir(&p) {
                    stack.extend(rd.filter_map(|e| e.ok()).map(|e| e.path()));
                }
            } else {
                out.push((p, meta.modified().ok(), meta.len()));
            }
        }
        out.sort();
        out
    }
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

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

fn environment(config: &AgentConfig, mode: Mode) -> Result<Environment> {
    let mount = workload::cgroup2_mount()?;
    let mut workloads = Vec::new();
    for (i, spec) in config.workloads.iter().enumerate() {
        let path = workload::cgroup_path(&mount, &spec.cgroup)
            .with_context(|| format!("workload {} ({})", spec.name, spec.origin))?;
        let cgroup_id = workload::ensure_cgroup(&path)
            .with_context(|| format!("workload {} ({})", spec.name, spec.origin))?;
        workloads.push(Workload {
            id: i as u32 + 1,
            name: spec.name.clone(),
            namespace: spec.namespace.clone(),
            labels: spec.labels.clone(),
            pod: spec.pod.clone(),
            container: spec.container.clone(),
            cgroup: path,
            cgroup_id,
        });
    }
    let mut node_labels = config.node_labels.clone();
    node_labels
        .entry("kubernetes.io/hostname".into())
        .or_insert_with(|| config.host_name.clone().unwrap_or_else(hostname));
    node_labels
        .entry("kubernetes.io/os".into())
        .or_insert_with(|| "linux".into());
    let to_action = |p: crate::sources::config::Posture| match p {
        crate::sources::config::Posture::Block => Action::Block,
        crate::sources::config::Posture::Audit => Action::Audit,
    };
    Ok(Environment {
        workloads,
        node_labels: node_labels.clone(),
        postures: Postures {
            workloads: to_action(config.default_posture),
            host: to_action(config.host_default_posture),
            namespaces: config
                .namespace_postures
                .iter()
                .map(|(k, v)| (k.clone(), to_action(*v)))
                .collect(),
            scope: match config.posture_scope {
                crate::sources::config::PostureScope::Protocol => compile::PostureScope::Protocol,
                crate::sources::config::PostureScope::Workload => compile::PostureScope::Workload,
            },
        },
        alerts_per_sec: config.alerts_per_second,
        audit_only: mode == Mode::Audit,
        guard: GuardSetup {
            config: config.guard,
            node_labels,
            audit_only: mode == Mode::Audit,
        },
    })
}

fn compile_with(set: &PolicySet, env: &Environment) -> Result<Compiled> {
    let resolver = Resolver::host()?;
    compile::compile(
        &compile::Input {
            policies: set,
            workloads: &env.workloads,
            node_labels: &env.node_labels,
            postures: &env.postures,
            audit_only: env.audit_only,
            alerts_per_sec: env.alerts_per_sec,
        },
        &resolver,
    )
}

fn report_unresolved(c: &Compiled, embedded: bool) {
    for u in &c.unresolved {
        if embedded {
            // The default lists every usual install location; most are absent on any one node.
            log::debug!(
                "default policy: {} not present ({})",
                u.path.display(),
                u.error
            );
        } else {
            warn!(
                "{}: fromSource {} does not resolve ({}); no process can be running it now, and \
                 the rule applies as soon as it appears",
                u.origin,
                u.path.display(),
                u.error
            );
        }
    }
}

/// The identities of every source path, to notice a replaced binary (package upgrade).
fn source_identities(c: &Compiled) -> Vec<Option<crate::compile::identity::ExecutableId>> {
    let Ok(r) = Resolver::host() else {
        return Vec::new();
    };
    c.sources.iter().map(|p| r.resolve(p).ok()).collect()
}

struct Shared {
    enforcer: Mutex<Enforcer>,
    context: std::sync::RwLock<alert::Context>,
    limit: u32,
    guard: Arc<GuardService>,
    /// Each applied policy's guard entries (`None`: the guard is off), for the guard's task.
    guard_policy: tokio::sync::watch::Sender<(PolicySet, Option<GuardCompiled>)>,
}

pub fn run(args: RunArgs) -> Result<()> {
    crate::kernel::enforcer::check_root()?;
    let config = match &args.config {
        Some(p) => crate::sources::config::load(p).map_err(|e| anyhow!("{e}"))?,
        None => AgentConfig::default(),
    };
    let env = environment(&config, args.mode)?;
    let source = match &args.policy {
        Some(p) => PolicySource::Path(p.clone()),
        None => PolicySource::Embedded,
    };
    let set = source.load()?;
    let compiled = compile_with(&set, &env)?;
    report_unresolved(&compiled, matches!(source, PolicySource::Embedded));
    let guard_compiled = crate::guard::compile(&set, &env.guard)?;

    let offsets = kernel_offsets::from_running_kernel()?;
    let cgroup = match &args.cgroup {
        Some(c) => c.clone(),
        None => workload::cgroup2_mount()?,
    };
    let mut enforcer = Enforcer::start(
        &Options {
            choice: args.enforcer,
            cgroup: &cgroup,
        },
        &offsets,
    )?;
    enforcer.apply(&compiled)?;
    let generation = enforcer.active_generation();
    // The guard changes nothing on the network unless a KubeArmorNetworkPolicy asks for it.
    let guard = match &guard_compiled {
        Some(c) => Some(crate::guard::start(c, &env.guard.config)?),
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
        set.policies.len(),
        compiled.rules.len(),
        env.workloads.len(),
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
    let mut rules: [Arc<Vec<compile::RuleInfo>>; 2] = Default::default();
    rules[generation as usize] = Arc::new(compiled.rules_info.clone());
    let shared = Arc::new(Shared {
        context: std::sync::RwLock::new(alert::Context {
            cluster_name: config.cluster_name.clone(),
            host_name: config.host_name.clone().unwrap_or_else(hostname),
            enforcer: enforcer.kind,
            boot_to_unix_ns: alert::boot_to_unix_ns(),
            workloads: env.workloads.iter().map(|w| (w.id, w.clone())).collect(),
            rules,
        }),
        enforcer: Mutex::new(enforcer),
        limit: env.alerts_per_sec,
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
            env.guard.clone(),
        ),
        guard_policy: tokio::sync::watch::channel((set.clone(), guard_compiled)).0,
    });

    if !shared.guard.running() {
        info!("inbound ICMP guard off: no KubeArmorNetworkPolicy ICMP rule selects this node");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let outputs = Outputs::new(JsonLines::open(&args.output)?);
        serve(
            shared,
            events,
            Arc::new(outputs),
            source,
            env,
            compiled,
            args.refresh_ms,
        )
        .await
    })
}

async fn serve(
    shared: Arc<Shared>,
    events: aya::maps::RingBuf<aya::maps::MapData>,
    outputs: Arc<Outputs>,
    source: PolicySource,
    env: Environment,
    compiled: Compiled,
    refresh_ms: u64,
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

    // What has been announced so far; the last account at stop continues from it.
    let seen = Arc::new(tokio::sync::Mutex::new(Losses::default()));
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
            let mut tick = tokio::time::interval(crate::guard::INTERFACE_POLL);
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

    let refresher = {
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut state = RefreshState {
                fingerprint: source.fingerprint(),
                identities: source_identities(&compiled),
                compiled,
            };
            let mut tick = tokio::time::interval(Duration::from_millis(refresh_ms.max(50)));
            loop {
                tick.tick().await;
                refresh(&shared, &source, &env, &mut state).await;
            }
        })
    };

    let mut term = tokio::signal::unix::signal(SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: stopping"),
        _ = int.recv() => info!("SIGINT: stopping"),
        r = &mut reader => error!("alert reader stopped: {r:?}"),
    }
    // The reader holds the outputs; it must go for the writer to see the end of the stream.
    reader.abort();
    let _ = reader.await;
    refresher.abort();
    accounting.abort();
    let _ = accounting.await;
    guard_task.abort();
    let _ = guard_task.await;
    // The guard's last summary, then its programs detached.
    shared.guard.stop(&outputs).await;
    // A last account, so that what was lost just before stopping is still reported.
    announce_losses(&shared, &outputs, &mut *seen.lock().await).await;
    match Arc::try_unwrap(outputs) {
        Ok(outputs) => outputs.close(Duration::from_secs(2)).await,
        Err(_) => warn!("alert outputs still in use at stop; the last alerts may be unwritten"),
    }
    let counters = shared.enforcer.lock().expect("enforcer lock").counters()?;
    info!(
        "stopped; kernel counters: decided {}, blocked {}, audited {}, ring buffer full {}, \
         identity read errors {}; the programs are detached and every socket is allowed again",
        counters.decided,
        counters.blocked,
        counters.audited,
        counters.ringbuf_full,
        counters.identity_errors
    );
    Ok(())
}

#[derive(Default)]
struct Losses {
    suppressed: HashMap<u32, u64>,
    counters: Counters,
    userspace: u64,
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
            for (w, total) in suppressed {
                let before = seen.suppressed.insert(w, total).unwrap_or(0);
                if total > before {
                    events.push(ctx.loss_event(
                        "suppressed by the alert rate limit",
                        total - before,
                        Some(w),
                        shared.limit,
                    ));
                }
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
                    "suppressed while the per-workload suppression map was full",
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

struct RefreshState {
    fingerprint: Vec<(PathBuf, Option<SystemTime>, u64)>,
    identities: Vec<Option<crate::compile::identity::ExecutableId>>,
    compiled: Compiled,
}

/// Hot reload and source tracking in one place: a changed policy file or a replaced binary both
/// lead to a full recompilation, validated before anything is applied.
async fn refresh(
    shared: &Arc<Shared>,
    source: &PolicySource,
    env: &Environment,
    st: &mut RefreshState,
) {
    let fingerprint = source.fingerprint();
    let identities = source_identities(&st.compiled);
    let policy_changed = fingerprint != st.fingerprint;
    let sources_changed = identities != st.identities;
    if !policy_changed && !sources_changed {
        return;
    }
    st.fingerprint = fingerprint;
    let set = match source.load() {
        Ok(s) => s,
        Err(e) => {
            error!("policy reload refused, the previous policy stays in force:\n{e:#}");
            RELOADS_REFUSED.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    let compiled = match compile_with(&set, env) {
        Ok(c) => c,
        Err(e) => {
            error!("policy reload refused, the previous policy stays in force: {e:#}");
            RELOADS_REFUSED.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    let guard_compiled = match crate::guard::compile(&set, &env.guard) {
        Ok(c) => c,
        Err(e) => {
            error!("policy reload refused, the previous policy stays in force: {e:#}");
            RELOADS_REFUSED.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    report_unresolved(&compiled, matches!(source, PolicySource::Embedded));
    let shared2 = shared.clone();
    let c2 = compiled.clone();
    let applied = tokio::task::spawn_blocking(move || -> Result<u32> {
        let mut e = shared2.enforcer.lock().expect("enforcer lock");
        e.apply(&c2)?;
        let g = e.active_generation();
        shared2.context.write().expect("context lock").rules[g as usize] =
            Arc::new(c2.rules_info.clone());
        Ok(g)
    })
    .await;
    match applied {
        Ok(Ok(g)) => {
            let n = RELOADS.fetch_add(1, Ordering::Relaxed) + 1;
            info!(
                "policy {} applied as generation {g} (reload #{n}): {} kernel rules",
                if policy_changed {
                    "change"
                } else {
                    "refresh after a fromSource binary changed"
                },
                compiled.rules.len()
            );
            st.identities = source_identities(&compiled);
            st.compiled = compiled;
            // The guard follows in its own task (attaching takes a moment).
            shared.guard_policy.send_replace((set, guard_compiled));
        }
        Ok(Err(e)) => {
            RELOADS_REFUSED.fetch_add(1, Ordering::Relaxed);
            error!("{e:#}");
        }
        Err(e) => error!("policy apply task failed: {e}"),
    }
}

static RELOADS: AtomicU64 = AtomicU64::new(0);
static RELOADS_REFUSED: AtomicU64 = AtomicU64::new(0);
