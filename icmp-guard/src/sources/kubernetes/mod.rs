//! Kubernetes as a source of truth, through watchers and reflectors: the pods on this node,
//! the namespaces' `kubearmor-network-posture` annotation, this node's labels, and the
//! `KubeArmorPolicy` / `KubeArmorHostPolicy` custom resources.
//!
//! Each watcher feeds a reflector store; every change wakes the agent, which rebuilds what it
//! enforces from the stores. The stores keep the last state they saw: when the API server goes
//! away, the watchers retry with backoff and the last known state stays in force. Losing the API
//! never loosens enforcement.

pub mod pods;
pub mod policies;

use std::{
    collections::BTreeMap,
    fmt::Debug,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result, anyhow};
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::{
    Api, Client, Resource,
    api::{ApiResource, DynamicObject, GroupVersionKind},
    runtime::{
        WatchStreamExt,
        reflector::{self, Store},
        watcher,
    },
};
use log::{info, warn};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;

/// KubeArmor's namespace annotation for the default network posture of its pods.
pub const POSTURE_ANNOTATION: &str = "kubearmor-network-posture";

#[derive(clap::Args, Debug, Clone, Default)]
pub struct KubernetesArgs {
    /// Watch pods, namespaces, this node and KubeArmor policies through this kubeconfig.
    /// In a pod, `--in-cluster` uses the service account instead.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Watch the Kubernetes API with the pod's service account (the DaemonSet sets this).
    #[arg(long, conflicts_with = "kubeconfig")]
    pub in_cluster: bool,
    /// This node's name in the API (default: $NODE_NAME, else the host name).
    #[arg(long)]
    pub node_name: Option<String>,
    /// How the kubelet names pod cgroups (default: found from what exists under the cgroup v2
    /// mount, `kubepods` or `kubepods.slice`).
    #[arg(long, value_enum)]
    pub cgroup_driver: Option<crate::sources::containers::CgroupDriver>,
}

impl KubernetesArgs {
    pub fn enabled(&self) -> bool {
        self.kubeconfig.is_some() || self.in_cluster
    }

    pub fn node_name(&self) -> String {
        self.node_name
            .clone()
            .or_else(|| std::env::var("NODE_NAME").ok().filter(|n| !n.is_empty()))
            .unwrap_or_else(crate::agent::hostname)
    }
}

/// The API resources of KubeArmor's policy kinds.
pub fn policy_resource(kind: &str) -> ApiResource {
    let plural = match kind {
        "KubeArmorPolicy" => "kubearmorpolicies",
        "KubeArmorHostPolicy" => "kubearmorhostpolicies",
        other => unreachable!("not a KubeArmor policy kind: {other}"),
    };
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("security.kubearmor.com", "v1", kind),
        plural,
    )
}

/// The client configuration a kubeconfig file names.
pub async fn kubeconfig(path: &Path) -> Result<kube::Config> {
    let kubeconfig = kube::config::Kubeconfig::read_from(path)
        .with_context(|| format!("reading kubeconfig {}", path.display()))?;
    kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .with_context(|| format!("using kubeconfig {}", path.display()))
}

/// The watched state of the cluster, as far as this node is concerned.
#[derive(Clone)]
pub struct Cluster {
    pub client: Client,
    pub node_name: String,
    pub pods: Store<Pod>,
    pub namespaces: Store<Namespace>,
    pub nodes: Store<Node>,
    pub policies: Store<DynamicObject>,
    pub host_policies: Store<DynamicObject>,
    /// Woken on every change of any store.
    pub changed: Arc<Notify>,
}

impl Cluster {
    /// Connects and starts every watcher. Returns once the client is built; the stores fill in
    /// the background (see [`Cluster::wait_synced`]).
    pub async fn connect(args: &KubernetesArgs) -> Result<Self> {
        let config = match &args.kubeconfig {
            Some(path) => kubeconfig(path).await?,
            None => kube::Config::incluster().context(
                "reading the in-cluster configuration (service account token and \
                 KUBERNETES_SERVICE_HOST); outside a pod, pass --kubeconfig",
            )?,
        };
        let server = config.cluster_url.clone();
        let client = Client::try_from(config).context("building the Kubernetes client")?;
        let node_name = args.node_name();
        info!("watching the Kubernetes API at {server} for node {node_name}");
        let changed = Arc::new(Notify::new());
        let by_node = format!("spec.nodeName={node_name}");
        let this_node = format!("metadata.name={node_name}");
        let pods = watch(
            Api::<Pod>::all(client.clone()),
            watcher::Config::default().fields(&by_node),
            (),
            "pods on this node",
            &changed,
        );
        let namespaces = watch(
            Api::<Namespace>::all(client.clone()),
            watcher::Config::default(),
            (),
            "namespaces",
            &changed,
        );
        let nodes = watch(
            Api::<Node>::all(client.clone()),
            watcher::Config::default().fields(&this_node),
            (),
            "this node",
            &changed,
        );
        let ksp = policy_resource("KubeArmorPolicy");
        let policies = watch(
            Api::<DynamicObject>::all_with(client.clone(), &ksp),
            watcher::Config::default(),
            ksp.clone(),
            "KubeArmorPolicy",
            &changed,
        );
        let hsp = policy_resource("KubeArmorHostPolicy");
        let host_policies = watch(
            Api::<DynamicObject>::all_with(client.clone(), &hsp),
            watcher::Config::default(),
            hsp.clone(),
            "KubeArmorHostPolicy",
            &changed,
        );
        Ok(Cluster {
            client,
            node_name,
            pods,
            namespaces,
            nodes,
            policies,
            host_policies,
            changed,
        })
    }

    /// Waits until every store has had its first full list, so that the first policy the agent
    /// applies already knows the cluster.
    pub async fn wait_synced(&self, timeout: Duration) -> Result<()> {
        let all = async {
            let _ = self.pods.wait_until_ready().await;
            let _ = self.namespaces.wait_until_ready().await;
            let _ = self.nodes.wait_until_ready().await;
            let _ = self.policies.wait_until_ready().await;
            let _ = self.host_policies.wait_until_ready().await;
        };
        tokio::time::timeout(timeout, all).await.map_err(|_| {
            anyhow!(
                "the Kubernetes API did not list pods, namespaces, this node and the KubeArmor \
                 policies within {timeout:?}; check the API server address, the credentials, \
                 the RBAC rules (deploy/kubernetes/) and that the KubeArmor CRDs are installed"
            )
        })
    }

    /// This node's labels, as host policies' `nodeSelector` sees them.
    pub fn node_labels(&self) -> Option<BTreeMap<String, String>> {
        self.nodes
            .state()
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(self.node_name.as_str()))
            .map(|n| n.metadata.labels.clone().unwrap_or_default())
    }

    /// Namespaces whose `kubearmor-network-posture` annotation says `block` or `audit`.
    /// Anything else is logged by the caller as it compiles.
    pub fn namespace_postures(&self) -> BTreeMap<String, String> {
        self.namespaces
            .state()
            .iter()
            .filter_map(|ns| {
                let name = ns.metadata.name.clone()?;
                let posture = ns.metadata.annotations.as_ref()?.get(POSTURE_ANNOTATION)?;
                Some((name, posture.clone()))
            })
            .collect()
    }
}

/// Starts a watcher with backoff feeding a reflector store; wakes `changed` on every event and
/// says in the log when the API is lost and when the watch resumes.
fn watch<K>(
    api: Api<K>,
    config: watcher::Config,
    dyntype: K::DynamicType,
    what: &'static str,
    changed: &Arc<Notify>,
) -> Store<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Send + Sync,
{
    let writer = reflector::store::Writer::new(dyntype);
    let reader = writer.as_reader();
    let changed = changed.clone();
    tokio::spawn(async move {
        let failing = AtomicBool::new(false);
        let mut stream =
            reflector::reflector(writer, watcher(api, config).default_backoff()).boxed();
        while let Some(event) = stream.next().await {
            match event {
                Ok(_) => {
                    if failing.swap(false, Ordering::Relaxed) {
                        info!("Kubernetes watch of {what} resumed");
                    }
                    changed.notify_one();
                }
                Err(e) => {
                    if !failing.swap(true, Ordering::Relaxed) {
                        warn!(
                            "Kubernetes watch of {what} failed ({e}); the last known state stays \
                             in force and the watch is retried with backoff"
                        );
                    } else {
                        log::debug!("Kubernetes watch of {what} still failing: {e}");
                    }
                }
            }
        }
    });
    reader
}
