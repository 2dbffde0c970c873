//! What the agent enforces, rebuilt from its sources whenever one of them changes: policy files
//! (or the embedded default), the agent config, and with Kubernetes the pods on this node, their
//! containers, the namespaces' postures, this node's labels and the policy custom resources.
//!
//! Every change goes the same way: gather the desired state, compile it completely, and apply it
//! atomically only if it differs from what the kernel holds. A source that cannot be read (a
//! broken policy file, an invalid custom resource, an unreachable API server) changes nothing:
//! the last valid state of that source stays in force.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result, anyhow};
use log::{debug, error, info, warn};
use tokio::sync::{Notify, mpsc};

use super::{Mode, Shared, hostname};
use crate::{
    compile::{
        self, Compiled, Postures,
        identity::{ExecutableId, HostRoot, Resolver},
    },
    sources::{
        config::{AgentConfig, PostureScope},
        containers::{self, CgroupDriver},
        kubernetes::{
            self, Cluster,
            pods::{Owners, PodInfo},
            policies::{self, ApiPolicies},
        },
        policy::{self, Action, PolicySet, Target},
        workload::{self, Owner, Root, Workload},
    },
};

pub static RELOADS: AtomicU64 = AtomicU64::new(0);
pub static RELOADS_REFUSED: AtomicU64 = AtomicU64::new(0);

/// Name of the workload that stands for pods whose cgroup exists but that the agent does not
/// know yet (see [`pending_pods`]).
pub const PENDING_POD: &str = "pending pod";

/// How often rounds run while a new container's root is not settled yet, and for how long
/// after its cgroup appeared (see [`Reconciler::settling`]).
const SETTLE_POLL: Duration = Duration::from_millis(10);
const SETTLE_WINDOW: Duration = Duration::from_secs(5);

/// Where policies come from, and how to tell whether they changed.
pub enum PolicySource {
    Embedded,
    Path(PathBuf),
}

impl PolicySource {
    pub fn load(&self) -> Result<PolicySet> {
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

/// What the config file fixes for the life of the agent.
pub struct Environment {
    pub workloads: Vec<Workload>,
    pub node_labels: BTreeMap<String, String>,
    pub postures: Postures,
    pub alerts_per_sec: u32,
    pub audit_only: bool,
}

impl Environment {
    pub fn from_config(config: &AgentConfig, mode: Mode) -> Result<Self> {
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
                owner: None,
                root: Root::Host,
            });
        }
        let mut node_labels = config.node_labels.clone();
        node_labels
            .entry("kubernetes.io/hostname".into())
            .or_insert_with(|| config.host_name.clone().unwrap_or_else(hostname));
        node_labels
            .entry("kubernetes.io/os".into())
            .or_insert_with(|| "linux".into());
        Ok(Environment {
            workloads,
            node_labels,
            postures: Postures {
                workloads: config.default_posture.action(),
                host: config.host_default_posture.action(),
                namespaces: config
                    .namespace_postures
                    .iter()
                    .map(|(k, v)| (k.clone(), v.action()))
                    .collect(),
                scope: match config.posture_scope {
                    PostureScope::Protocol => compile::PostureScope::Protocol,
                    PostureScope::Workload => compile::PostureScope::Workload,
                },
            },
            alerts_per_sec: config.alerts_per_second,
            audit_only: mode == Mode::Audit,
        })
    }
}

/// The resolver of host paths: this process's root, or the host's through pid 1 when the agent
/// runs in a container of its own (with the host's pid namespace).
pub fn host_resolver() -> Result<Resolver> {
    Resolver::host()
}

/// Kubernetes as seen so far.
struct Kube {
    cluster: Cluster,
    api: ApiPolicies,
    owners: Owners,
    recorder: kube::runtime::events::Recorder,
    /// Pod owners resolved so far, by pod UID.
    owner_of: BTreeMap<String, Owner>,
    cgroup_root: PathBuf,
    driver: Option<CgroupDriver>,
    /// Namespace annotations already warned about, to say it once.
    bad_postures: BTreeSet<(String, String)>,
    /// What the runtime's bundles say, by container id (read once per container).
    bundles: BTreeMap<String, containers::BundleInfo>,
}

/// What is known of a container's start, to report the time from its start to its rules.
#[derive(Clone, Copy, Debug, Default)]
struct ContainerTimes {
    /// When its cgroup was made, once the agent has seen it.
    cgroup: Option<SystemTime>,
    /// When a compilation with its root was first in the kernel.
    in_force: Option<SystemTime>,
    reported: bool,
}

/// Everything a compilation needs.
pub struct Desired {
    pub set: PolicySet,
    pub workloads: Vec<Workload>,
    pub node_labels: BTreeMap<String, String>,
    pub postures: Postures,
}

pub struct Reconciler {
    source: PolicySource,
    env: Environment,
    kube: Option<Kube>,
    fingerprint: Vec<(PathBuf, Option<SystemTime>, u64)>,
    /// The last valid policies of the files (or the embedded default).
    file_set: PolicySet,
    /// Identities of the host's source paths when last compiled: a package upgrade replaces one.
    identities: Vec<Option<ExecutableId>>,
    pub last: Compiled,
    /// The workloads last applied, for alerts.
    pub workloads: Vec<Workload>,
    /// Workload ids of pods, by UID, stable for the pod's life. Ids are never reused, so an
    /// alert read late never names another pod.
    pod_ids: BTreeMap<String, u32>,
    next_id: u32,
    /// The start of each container and when its sources came into force.
    containers_seen: BTreeMap<String, ContainerTimes>,
    /// When the agent started: containers from before were not timed.
    started: SystemTime,
    /// Directories under inotify: the QoS parents and every pod cgroup.
    watched: BTreeSet<PathBuf>,
    watcher: Option<notify::RecommendedWatcher>,
    wake: Arc<Notify>,
    /// inotify on the directories of the host's `fromSource` paths (`None`: turned off).
    sources: Option<SourceWatch>,
    /// The source watch's event count when the last round began.
    source_events_seen: u64,
}

/// Watches the directories of the host's `fromSource` paths, so that a package upgrade (dpkg
/// writes `<path>.dpkg-new`, then renames it over `<path>`) is applied at once: the new file is
/// another identity, refused until the kernel knows it. The periodic round stays as the
/// safety net and says so when it finds a change this missed.
struct SourceWatch {
    watcher: notify::RecommendedWatcher,
    dirs: BTreeSet<PathBuf>,
    /// The paths whose creation or renaming wakes a round: each source path, where it resolves
    /// to, and its `.dpkg-new`.
    paths: Arc<std::sync::RwLock<BTreeSet<PathBuf>>>,
    /// Events on those paths so far.
    events: Arc<AtomicU64>,
}

impl SourceWatch {
    fn new(wake: Arc<Notify>) -> notify::Result<Self> {
        let paths: Arc<std::sync::RwLock<BTreeSet<PathBuf>>> = Arc::default();
        let events = Arc::new(AtomicU64::new(0));
        let watcher = {
            let (paths, events) = (paths.clone(), events.clone());
            notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
                let Ok(e) = res else { return };
                let relevant = matches!(
                    e.kind,
                    notify::EventKind::Create(_)
                        | notify::EventKind::Modify(notify::event::ModifyKind::Name(_))
                );
                if relevant
                    && e.paths
                        .iter()
                        .any(|p| paths.read().expect("paths lock").contains(p))
                {
                    events.fetch_add(1, Ordering::Relaxed);
                    wake.notify_one();
                }
            })?
        };
        Ok(Self {
            watcher,
            dirs: BTreeSet::new(),
            paths,
            events,
        })
    }

    /// Watches the directories of `sources` (and of what they resolve to) and no others.
    fn watch(&mut self, sources: &BTreeSet<PathBuf>) {
        use notify::Watcher;
        let mut paths = BTreeSet::new();
        for p in sources {
            paths.insert(p.clone());
            paths.insert(staged(p));
            if let Ok(real) = std::fs::canonicalize(p)
                && real != *p
            {
                paths.insert(staged(&real));
                paths.insert(real);
            }
        }
        let dirs: BTreeSet<PathBuf> = paths
            .iter()
            .filter_map(|p| p.parent().map(Path::to_path_buf))
            .collect();
        *self.paths.write().expect("paths lock") = paths;
        for gone in self.dirs.difference(&dirs) {
            let _ = self.watcher.unwatch(gone);
        }
        for new in dirs.difference(&self.dirs) {
            // A directory that does not exist yet is the periodic round's to notice.
            if let Err(e) = self.watcher.watch(new, notify::RecursiveMode::NonRecursive) {
                debug!("inotify on {}: {e}", new.display());
            }
        }
        self.dirs = dirs;
    }
}

use compile::staged_upgrade as staged;

impl Reconciler {
    pub async fn new(
        source: PolicySource,
        env: Environment,
        kube_args: &kubernetes::KubernetesArgs,
    ) -> Result<Self> {
        let file_set = source.load()?;
        let kube = if kube_args.enabled() {
            let cluster = Cluster::connect(kube_args).await?;
            let cgroup_root = workload::cgroup2_mount()?;
            let driver = kube_args
                .cgroup_driver
                .or_else(|| CgroupDriver::detect(&cgroup_root));
            Some(Kube {
                owners: Owners::new(cluster.client.clone()),
                recorder: policies::recorder(cluster.client.clone(), &cluster.node_name),
                cluster,
                api: ApiPolicies::default(),
                owner_of: BTreeMap::new(),
                cgroup_root,
                driver,
                bad_postures: BTreeSet::new(),
                bundles: BTreeMap::new(),
            })
        } else {
            None
        };
        let next_id = env.workloads.len() as u32 + 1;
        let wake = Arc::new(Notify::new());
        if kube.is_some() {
            watch_mounts(wake.clone());
        }
        Ok(Self {
            fingerprint: source.fingerprint(),
            source,
            env,
            kube,
            file_set,
            identities: Vec::new(),
            last: Compiled::default(),
            workloads: Vec::new(),
            pod_ids: BTreeMap::new(),
            next_id,
            containers_seen: BTreeMap::new(),
            started: SystemTime::now(),
            watched: BTreeSet::new(),
            watcher: None,
            wake,
            sources: None,
            source_events_seen: 0,
        })
    }

    /// Turns the watch of the host's `fromSource` directories on (the default) or off (to
    /// measure what it brings: `cargo xtask bench-upgrade`).
    pub fn watch_sources(&mut self, on: bool) {
        self.sources = if on {
            match SourceWatch::new(self.wake.clone()) {
                Ok(w) => Some(w),
                Err(e) => {
                    warn!(
                        "cannot watch the fromSource directories with inotify ({e}); a replaced                          binary is found by the periodic round only, and refused until then"
                    );
                    None
                }
            }
        } else {
            None
        };
    }

    pub fn embedded(&self) -> bool {
        matches!(self.source, PolicySource::Embedded)
    }

    pub fn alerts_per_sec(&self) -> u32 {
        self.env.alerts_per_sec
    }

    pub fn policy_count(&self) -> usize {
        self.file_set.policies.len()
    }

    /// Waits (at most `timeout`) for the Kubernetes stores' first lists, so that the first
    /// policy applied knows the cluster. Past the timeout the agent enforces what it knows and
    /// says so; the watches keep trying.
    pub async fn wait_for_cluster(&self, timeout: Duration) {
        if let Some(k) = &self.kube {
            match k.cluster.wait_synced(timeout).await {
                Ok(()) => info!(
                    "Kubernetes: {} pods on node {}, {} KubeArmorPolicy, {} KubeArmorHostPolicy",
                    k.cluster.pods.state().len(),
                    k.cluster.node_name,
                    k.cluster.policies.state().len(),
                    k.cluster.host_policies.state().len()
                ),
                Err(e) => warn!("{e:#}; enforcing what is known meanwhile"),
            }
        }
    }

    /// Gathers the desired state from every source.
    pub async fn desired(&mut self) -> Desired {
        let mut set = self.file_set.clone();
        let mut workloads = self.env.workloads.clone();
        let mut node_labels = self.env.node_labels.clone();
        let mut postures = self.env.postures.clone();
        if let Some(k) = self.kube.as_mut() {
            let objects = k
                .cluster
                .policies
                .state()
                .into_iter()
                .map(|o| ("KubeArmorPolicy", o))
                .chain(
                    k.cluster
                        .host_policies
                        .state()
                        .into_iter()
                        .map(|o| ("KubeArmorHostPolicy", o)),
                );
            let (api, refusals) = k.api.update(objects);
            if !refusals.is_empty() {
                let recorder = k.recorder.clone();
                tokio::spawn(async move { policies::record(&recorder, refusals).await });
            }
            set.policies.extend(api);
            if let Some(labels) = k.cluster.node_labels() {
                // The API's labels are the node's; the config may add or override some.
                let mut merged = labels;
                merged.extend(self.env.node_labels.clone());
                node_labels = merged;
            }
            for (ns, value) in k.cluster.namespace_postures() {
                if postures.namespaces.contains_key(&ns) {
                    continue; // the config file's setting wins
                }
                match value.as_str() {
                    "block" => {
                        postures.namespaces.insert(ns, Action::Block);
                    }
                    "audit" => {
                        postures.namespaces.insert(ns, Action::Audit);
                    }
                    _ => {
                        if k.bad_postures.insert((ns.clone(), value.clone())) {
                            warn!(
                                "namespace {ns}: annotation {}={value:?} is neither block nor \
                                 audit; the default posture applies",
                                kubernetes::POSTURE_ANNOTATION
                            );
                        }
                    }
                }
            }
            let pods: Vec<PodInfo> = k
                .cluster
                .pods
                .state()
                .iter()
                .filter_map(|p| kubernetes::pods::pod_info(p))
                .collect();
            // Owners resolved for good are kept; a failed lookup is tried again next round
            // (the lookups themselves are rate-limited), naming the direct controller meanwhile.
            let mut owner_now = BTreeMap::new();
            for pod in &pods {
                if !k.owner_of.contains_key(&pod.uid) {
                    let (owner, known) = k.owners.owner(pod).await;
                    let owner = Owner {
                        kind: owner.reference,
                        name: owner.name,
                        namespace: owner.namespace,
                    };
                    if known {
                        k.owner_of.insert(pod.uid.clone(), owner);
                    } else {
                        owner_now.insert(pod.uid.clone(), owner);
                    }
                }
            }
            let present: BTreeSet<&str> = pods.iter().map(|p| p.uid.as_str()).collect();
            k.owner_of.retain(|uid, _| present.contains(uid.as_str()));
            self.pod_ids.retain(|uid, _| present.contains(uid.as_str()));
            if k.driver.is_none() {
                k.driver = CgroupDriver::detect(&k.cgroup_root);
            }
            if let Some(driver) = k.driver {
                let mut to_watch: BTreeSet<PathBuf> =
                    containers::qos_cgroups(&k.cgroup_root, driver)
                        .into_iter()
                        .collect();
                if let Some(pending) = pending_pods(&k.cgroup_root, driver, &set) {
                    workloads.push(pending);
                }
                // The runtime's bundles, by pod: containers being created, before their cgroup.
                let rootfs = containers::rootfs_mounts();
                k.bundles.retain(|id, _| rootfs.contains_key(id));
                let mut bundles_of: BTreeMap<String, Vec<(&String, &PathBuf)>> = BTreeMap::new();
                for (id, mount) in &rootfs {
                    let info = k
                        .bundles
                        .entry(id.clone())
                        .or_insert_with(|| containers::bundle_info(mount));
                    if let Some(uid) = &info.pod_uid {
                        bundles_of.entry(uid.clone()).or_default().push((id, mount));
                    }
                }
                // Terminating pods too: their containers run through the grace period, under
                // their own rules; only a pod whose cgroup is gone is left out.
                for pod in &pods {
                    let cgroup = containers::pod_cgroup(&k.cgroup_root, driver, pod.qos, &pod.uid);
                    let Ok(cgroup_id) = workload::cgroup_id(&cgroup) else {
                        // The kubelet has not made it yet (or has removed it): the pending-pods
                        // workload covers whatever runs there before the next round.
                        continue;
                    };
                    to_watch.insert(cgroup.clone());
                    let id = *self.pod_ids.entry(pod.uid.clone()).or_insert_with(|| {
                        let id = self.next_id;
                        self.next_id += 1;
                        id
                    });
                    let found = containers::discover(&cgroup, &rootfs);
                    let mut list = Vec::new();
                    for c in found {
                        let status = pod.containers.iter().find(|s| s.id == c.id);
                        let times = self.containers_seen.entry(c.id.clone()).or_default();
                        times
                            .cgroup
                            .get_or_insert_with(|| cgroup_created(&c.cgroup));
                        list.push(workload::Container {
                            name: status
                                .map(|s| s.name.clone())
                                .or_else(|| k.bundles.get(&c.id).and_then(|b| b.name.clone())),
                            id: c.id,
                            image: status.map(|s| s.image.clone()),
                            cgroup_id: c.cgroup_id,
                            roots: c.roots,
                        });
                    }
                    // Containers being created: their root filesystem is mounted, their cgroup
                    // not made yet. Their sources are resolved now, so that their first
                    // command finds its rules.
                    for (cid, mount) in bundles_of.get(&pod.uid).into_iter().flatten() {
                        if list.iter().any(|c| &c.id == *cid) {
                            continue;
                        }
                        self.containers_seen.entry((*cid).clone()).or_default();
                        let status = pod.containers.iter().find(|s| &s.id == *cid);
                        list.push(workload::Container {
                            id: (*cid).clone(),
                            name: status
                                .map(|s| s.name.clone())
                                .or_else(|| k.bundles.get(*cid).and_then(|b| b.name.clone())),
                            image: status.map(|s| s.image.clone()),
                            // No cgroup yet: no alert can name it before the next round.
                            cgroup_id: 0,
                            roots: vec![workload::ContainerRoot::Mount((*mount).clone())],
                        });
                    }
                    workloads.push(Workload {
                        id,
                        name: format!("{}/{}", pod.namespace, pod.name),
                        namespace: pod.namespace.clone(),
                        labels: pod.labels.clone(),
                        pod: Some(pod.name.clone()),
                        container: None,
                        cgroup,
                        cgroup_id,
                        owner: k
                            .owner_of
                            .get(&pod.uid)
                            .or_else(|| owner_now.get(&pod.uid))
                            .cloned(),
                        root: Root::Containers(list),
                    });
                }
                self.watch(to_watch);
            }
        }
        Desired {
            set,
            workloads,
            node_labels,
            postures,
        }
    }

    /// Keeps inotify watches on exactly `dirs`, so that a new pod cgroup or container wakes
    /// the agent at once instead of at the next periodic round.
    fn watch(&mut self, dirs: BTreeSet<PathBuf>) {
        use notify::Watcher;
        if self.watcher.is_none() {
            let wake = self.wake.clone();
            match notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
                if res.is_ok_and(|e| e.kind.is_create()) {
                    wake.notify_one();
                }
            }) {
                Ok(w) => self.watcher = Some(w),
                Err(e) => {
                    warn!(
                        "cannot watch pod cgroups with inotify ({e}); new containers are found \
                         by the periodic round only"
                    );
                    return;
                }
            }
        }
        let w = self.watcher.as_mut().expect("set above");
        for gone in self.watched.difference(&dirs) {
            let _ = w.unwatch(gone);
        }
        for new in dirs.difference(&self.watched) {
            if let Err(e) = w.watch(new, notify::RecursiveMode::NonRecursive) {
                debug!("inotify on {}: {e}", new.display());
            }
        }
        self.watched = dirs;
    }

    /// True while a container found in the last round has no root to resolve its paths in yet
    /// (no bundle mount the agent can read, no process in it yet) and appeared less than
    /// [`SETTLE_WINDOW`] ago. The runtime moves the container's first process into its root a
    /// few milliseconds after making its cgroup (when inotify woke the round); until a round
    /// sees it there, the container's `fromSource` programs are refused. Rounds come every
    /// [`SETTLE_POLL`] meanwhile, so that window stays that short.
    pub fn settling(&self) -> bool {
        let now = SystemTime::now();
        self.workloads.iter().any(|w| match &w.root {
            Root::Containers(cs) => cs.iter().any(|c| {
                c.roots.is_empty()
                    && self
                        .containers_seen
                        .get(&c.id)
                        .and_then(|t| t.cgroup)
                        .is_some_and(|created| {
                            now.duration_since(created).unwrap_or_default() < SETTLE_WINDOW
                        })
            }),
            Root::Host => false,
        })
    }

    /// What wakes the agent besides its periodic round: inotify on pod cgroups, and the
    /// Kubernetes watches.
    pub fn wakers(&self) -> (Arc<Notify>, Option<Arc<Notify>>) {
        (
            self.wake.clone(),
            self.kube.as_ref().map(|k| k.cluster.changed.clone()),
        )
    }

    pub fn compile(&self, d: &Desired) -> Result<Compiled> {
        let resolver = host_resolver()?;
        compile::compile(
            &compile::Input {
                policies: &d.set,
                workloads: &d.workloads,
                node_labels: &d.node_labels,
                postures: &d.postures,
                audit_only: self.env.audit_only,
                alerts_per_sec: self.env.alerts_per_sec,
            },
            &resolver,
        )
    }

    /// The identities of every host source path, to notice a replaced binary.
    fn source_identities(c: &Compiled) -> Vec<Option<ExecutableId>> {
        let Ok(r) = host_resolver() else {
            return Vec::new();
        };
        // The staged new version of each too (see `compile::staged_upgrade`): its appearance
        // is a change to apply, like its rename.
        c.sources
            .iter()
            .flat_map(|p| [r.resolve(p).ok(), r.resolve(&staged(p)).ok()])
            .collect()
    }

    /// Records what was applied.
    pub fn applied(&mut self, compiled: Compiled, workloads: Vec<Workload>) {
        self.identities = Self::source_identities(&compiled);
        if let Some(w) = self.sources.as_mut() {
            w.watch(&compiled.sources);
        }
        self.last = compiled;
        self.in_force(workloads);
    }

    /// `workloads` are what the kernel enforces now (just applied, or compiled to what it
    /// already held): notes when each container's root is first in force, reports it against
    /// the container's start (its cgroup's creation; the rules may come first, from the
    /// runtime's bundle), and forgets the containers that are gone.
    fn in_force(&mut self, workloads: Vec<Workload>) {
        let now = SystemTime::now();
        for w in &workloads {
            let Root::Containers(cs) = &w.root else {
                continue;
            };
            for c in cs {
                let Some(t) = self.containers_seen.get_mut(&c.id) else {
                    continue;
                };
                if !c.roots.is_empty() && t.in_force.is_none() {
                    t.in_force = Some(now);
                }
                let (Some(cgroup), Some(in_force), false) = (t.cgroup, t.in_force, t.reported)
                else {
                    continue;
                };
                t.reported = true;
                let name = c
                    .name
                    .as_deref()
                    .unwrap_or("the sandbox, or not in the pod's status yet");
                let when = if cgroup < self.started {
                    "it was running when the agent started".to_string()
                } else {
                    match in_force.duration_since(cgroup) {
                        Ok(after) => format!("{} ms after its cgroup appeared", after.as_millis()),
                        Err(e) => {
                            format!("{} ms before its cgroup appeared", e.duration().as_millis())
                        }
                    }
                };
                info!(
                    "container {} ({name}) of pod {}: its sources are in force, {when}",
                    &c.id[..12],
                    w.name,
                );
            }
        }
        let live: BTreeSet<&str> = workloads
            .iter()
            .filter_map(|w| match &w.root {
                Root::Containers(cs) => Some(cs.iter().map(|c| c.id.as_str())),
                Root::Host => None,
            })
            .flatten()
            .collect();
        self.containers_seen
            .retain(|id, _| live.contains(id.as_str()));
        self.workloads = workloads;
    }

    /// One round: reload what changed, compile, and apply if the result differs.
    pub(crate) async fn round(&mut self, shared: &Arc<Shared>) {
        let events_before = self
            .sources
            .as_ref()
            .map(|w| w.events.load(Ordering::Relaxed));
        let watcher_missed = events_before == Some(self.source_events_seen);
        if let Some(n) = events_before {
            self.source_events_seen = n;
        }
        let fingerprint = self.source.fingerprint();
        let files_changed = fingerprint != self.fingerprint;
        if files_changed {
            self.fingerprint = fingerprint;
            match self.source.load() {
                Ok(set) => self.file_set = set,
                Err(e) => {
                    error!("policy reload refused, the previous policy stays in force:\n{e:#}");
                    RELOADS_REFUSED.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        }
        let desired = self.desired().await;
        let compiled = match self.compile(&desired) {
            Ok(c) => c,
            Err(e) => {
                error!("policy reload refused, the previous policy stays in force: {e:#}");
                RELOADS_REFUSED.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        let guard = match crate::agent::guard::compile(&desired.set, shared.guard.setup()) {
            Ok(g) => g,
            Err(e) => {
                error!("policy reload refused, the previous policy stays in force: {e:#}");
                RELOADS_REFUSED.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        let identities = Self::source_identities(&compiled);
        // A changed policy file is applied even when it compiles to what the kernel holds: the
        // operator's change is then in force, logged and counted like any other.
        if compiled == self.last && !files_changed {
            if desired.workloads != self.workloads {
                // Nothing for the kernel, but alerts name containers by what is known now.
                shared
                    .context
                    .write()
                    .expect("context lock")
                    .set_workloads(&desired.workloads);
                self.in_force(desired.workloads);
            }
            return;
        }
        let why = if files_changed {
            "policy change"
        } else if identities != self.identities && !self.identities.is_empty() {
            // No event since the last round, none since this one began: inotify missed it.
            if watcher_missed
                && self
                    .sources
                    .as_ref()
                    .map(|w| w.events.load(Ordering::Relaxed))
                    == events_before
            {
                warn!(
                    "the periodic round found a replaced fromSource binary that inotify did not                      report; it was refused until now. Check the inotify limits                      (fs.inotify.max_user_watches) and the agent's earlier warnings"
                );
            }
            "refresh after a fromSource binary changed"
        } else {
            "workload or cluster change"
        };
        report_unresolved(&compiled, self.embedded());
        let started = Instant::now();
        match apply(shared, &compiled, &desired.workloads).await {
            Ok(epoch) => {
                let n = RELOADS.fetch_add(1, Ordering::Relaxed) + 1;
                info!(
                    "{why} applied as update {epoch} (reload #{n}, {} ms): {} kernel rules, {} \
                     workloads",
                    started.elapsed().as_millis(),
                    compiled.rules.len(),
                    desired.workloads.len()
                );
                self.applied(compiled, desired.workloads);
                // The guard follows in its own task (attaching takes a moment).
                if shared.guard_policy.borrow().1 != guard {
                    shared.guard_policy.send_replace((desired.set, guard));
                }
            }
            Err(e) => {
                RELOADS_REFUSED.fetch_add(1, Ordering::Relaxed);
                error!("{e:#}");
            }
        }
    }
}

/// Writes `compiled` into the kernel: the rule table first (an alert of the new epoch may be
/// read at once), then the maps, then the workloads alerts name.
pub(crate) async fn apply(
    shared: &Arc<Shared>,
    compiled: &Compiled,
    workloads: &[Workload],
) -> Result<u16> {
    let shared = shared.clone();
    let c = compiled.clone();
    let w = workloads.to_vec();
    tokio::task::spawn_blocking(move || -> Result<u16> {
        let mut e = shared.enforcer.lock().expect("enforcer lock");
        let next = e.epoch().wrapping_add(1);
        {
            let mut ctx = shared.context.write().expect("context lock");
            ctx.rules.insert(next, Arc::new(c.rules_info.clone()));
            ctx.set_workloads(&w);
        }
        e.apply(&c)?;
        Ok(e.epoch())
    })
    .await
    .map_err(|e| anyhow!("the policy apply task failed: {e}"))?
}

/// Wakes the rounds whenever the mount table changes: the runtime mounts a container's root
/// filesystem before it makes the container's cgroup, and a round woken then has the
/// container's rules in force before its first process runs. (`/proc/PID/mountinfo` reports
/// a change as `POLLPRI`; the node's table ([`HostRoot`]) when the agent runs in a container.)
fn watch_mounts(wake: Arc<Notify>) {
    let spawned = std::thread::Builder::new()
        .name("mount-watch".into())
        .spawn(move || {
            use std::os::fd::AsRawFd;
            let file = match std::fs::File::open(HostRoot::get().mountinfo()) {
                Ok(f) => f,
                Err(e) => {
                    warn!(
                        "cannot watch the mount table ({e}); a container's rules come with its \
                         cgroup instead of its root filesystem mount"
                    );
                    return;
                }
            };
            let mut pfd = libc::pollfd {
                fd: file.as_raw_fd(),
                events: libc::POLLPRI,
                revents: 0,
            };
            loop {
                // SAFETY: one valid pollfd, for the life of `file`.
                let rc = unsafe { libc::poll(&mut pfd, 1, -1) };
                if rc < 0 {
                    let e = std::io::Error::last_os_error();
                    if e.kind() == std::io::ErrorKind::Interrupted {
                        continue;
                    }
                    warn!("watching the mount table failed ({e}); no longer watched");
                    return;
                }
                if pfd.revents & (libc::POLLPRI | libc::POLLERR) != 0 {
                    wake.notify_one();
                }
            }
        });
    if let Err(e) = spawned {
        warn!("cannot start the mount table watch ({e})");
    }
}

/// When a container's cgroup was made (its directory's change time).
fn cgroup_created(dir: &Path) -> SystemTime {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(dir)
        .map(|m| SystemTime::UNIX_EPOCH + Duration::new(m.ctime() as u64, m.ctime_nsec() as u32))
        .unwrap_or_else(|_| SystemTime::now())
}

/// The workload of pods whose cgroup exists but that the agent does not know yet: the
/// `kubepods` cgroup itself, found by the kernel's walk when no pod cgroup below it is declared.
/// Until the agent has seen the pod, its processes get the default posture for every class a
/// `KubeArmorPolicy` names, so that no container's first socket escapes the policy that selects
/// it. In practice the agent knows a pod before its first container starts.
fn pending_pods(root: &Path, driver: CgroupDriver, set: &PolicySet) -> Option<Workload> {
    let dir = match driver {
        CgroupDriver::Cgroupfs => root.join("kubepods"),
        CgroupDriver::Systemd => root.join("kubepods.slice"),
    };
    let cgroup_id = workload::cgroup_id(&dir).ok()?;
    let named = set
        .policies
        .iter()
        .any(|p| matches!(p.target, Target::Workloads(_)) && !p.rules.is_empty());
    named.then(|| Workload {
        id: workload::PENDING_PODS,
        name: PENDING_POD.into(),
        namespace: String::new(),
        labels: BTreeMap::new(),
        pod: None,
        container: None,
        cgroup: dir,
        cgroup_id,
        owner: None,
        root: Root::Containers(Vec::new()),
    })
}

pub fn report_unresolved(c: &Compiled, embedded: bool) {
    for u in &c.unresolved {
        if embedded {
            // The default lists every usual install location; most are absent on any one node.
            debug!(
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

/// Runs rounds: at every tick, at once when a pod cgroup or container appears or the cluster
/// changes. A burst of changes is taken in one round.
pub(crate) async fn run(mut r: Reconciler, shared: Arc<Shared>, every: Duration) {
    let (wake, cluster) = r.wakers();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (tx, mut rx) = mpsc::channel::<()>(1);
    if let Some(c) = cluster {
        let tx = tx.clone();
        tokio::spawn(async move {
            loop {
                c.notified().await;
                let _ = tx.try_send(());
            }
        });
    }
    {
        let tx = tx.clone();
        tokio::spawn(async move {
            loop {
                wake.notified().await;
                let _ = tx.try_send(());
            }
        });
    }
    loop {
        let settling = r.settling();
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::time::sleep(SETTLE_POLL), if settling => {}
            _ = rx.recv() => {
                // Let the rest of a burst (a pod's several watch events) arrive.
                tokio::time::sleep(Duration::from_millis(5)).await;
                while rx.try_recv().is_ok() {}
            }
        }
        r.round(&shared).await;
    }
}
