//! The pod `icmp-guard test --pod NAMESPACE/NAME` probes: found through the Kubernetes API,
//! then on this node by its cgroup, as the agent finds it. The probes run in the container's
//! cgroup (so the pod's policies decide them) and in its network and mount namespaces (so they
//! are the pod's own executables and reach only the pod's loopback).

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;

use crate::{
    cli::sandbox::{Namespaces, Placement},
    sources::{
        containers::{self, CgroupDriver},
        kubernetes::{self, pods},
        workload::{self, ContainerRoot},
    },
};

/// A running container of the pod under test.
pub struct PodTarget {
    /// `namespace/name`, and the container's name.
    pub pod: String,
    pub container: String,
    pub cgroup: PathBuf,
    /// A process of the container, whose namespaces and root the probes use.
    pub pid: u32,
}

impl PodTarget {
    /// Where the pod's own executables run.
    pub fn placement(&self) -> Result<Placement> {
        let ns = Namespaces::of(self.pid, true).with_context(|| self.ns_hint())?;
        Ok(Placement::in_pod(&self.cgroup, ns))
    }

    /// Where icmp-guard's own probe runs: the pod's cgroup and network, this root (the pod
    /// does not have icmp-guard's executable).
    pub fn own_placement(&self) -> Result<Placement> {
        let ns = Namespaces::of(self.pid, false).with_context(|| self.ns_hint())?;
        Ok(Placement::in_pod(&self.cgroup, ns))
    }

    /// `path` as the pod sees it, from here.
    pub fn in_root(&self, path: &Path) -> PathBuf {
        let rel = path.strip_prefix("/").unwrap_or(path);
        PathBuf::from(format!("/proc/{}/root", self.pid)).join(rel)
    }

    fn ns_hint(&self) -> String {
        format!(
            "opening the namespaces of pid {} (container {} of pod {}); this needs \
             CAP_SYS_PTRACE, and entering them CAP_SYS_ADMIN and CAP_SYS_CHROOT",
            self.pid, self.container, self.pod
        )
    }
}

/// Finds `spec` (`NAMESPACE/NAME`) through the API, and its container (`container`, or the
/// first running one) on this node.
pub fn resolve(
    spec: &str,
    container: Option<&str>,
    kubeconfig: Option<&Path>,
) -> Result<PodTarget> {
    let (namespace, name) = spec
        .split_once('/')
        .filter(|(ns, n)| !ns.is_empty() && !n.is_empty() && !n.contains('/'))
        .ok_or_else(|| {
            anyhow!("--pod {spec}: give NAMESPACE/NAME, e.g. default/nginx-7c5ddbdf54-x2x8w")
        })?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let pod: Pod = runtime.block_on(async {
        let config = match kubeconfig {
            Some(path) => kubernetes::kubeconfig(path).await?,
            // In the agent's pod: its service account; elsewhere $KUBECONFIG or ~/.kube/config.
            None => kube::Config::infer().await.context(
                "finding the Kubernetes API: run this in the icmp-guard pod, or pass --kubeconfig",
            )?,
        };
        let client = kube::Client::try_from(config)?;
        Api::<Pod>::namespaced(client, namespace)
            .get(name)
            .await
            .with_context(|| format!("reading pod {namespace}/{name} from the API"))
    })?;
    let node = kubernetes::KubernetesArgs::default().node_name();
    let on = pod.spec.as_ref().and_then(|s| s.node_name.clone());
    if on.as_deref() != Some(node.as_str()) {
        bail!(
            "pod {spec} runs on node {}, this is node {node}: run the command in the icmp-guard \
             pod of that node (kubectl get pods -n icmp-guard -o wide)",
            on.as_deref().unwrap_or("(none yet)")
        );
    }
    let info = pods::pod_info(&pod)
        .ok_or_else(|| anyhow!("pod {spec} has no QoS class yet: wait until it runs"))?;
    let running: Vec<(String, String)> = pod
        .status
        .iter()
        .flat_map(|s| s.container_statuses.iter().flatten())
        .filter(|c| c.state.as_ref().is_some_and(|st| st.running.is_some()))
        .filter_map(|c| {
            let id = c.container_id.as_deref()?.split_once("://")?.1;
            Some((c.name.clone(), id.to_string()))
        })
        .collect();
    let (cname, id) = match container {
        Some(want) => running.iter().find(|(n, _)| n == want).ok_or_else(|| {
            anyhow!(
                "pod {spec} has no running container {want}; running: {}",
                names(&running)
            )
        })?,
        None => running
            .first()
            .ok_or_else(|| anyhow!("pod {spec} has no running container yet"))?,
    };
    let mount = workload::cgroup2_mount()?;
    let driver = CgroupDriver::detect(&mount).ok_or_else(|| {
        anyhow!(
            "neither kubepods nor kubepods.slice is under {}: is this a Kubernetes node, and is \
             the node's cgroup file system mounted here?",
            mount.display()
        )
    })?;
    let pod_cgroup = containers::pod_cgroup(&mount, driver, info.qos, &info.uid);
    // The agent's own discovery: the container's cgroup, and a process of it whose root is the
    // container's (one the runtime has not yet moved would resolve the node's paths).
    let found = containers::discover(&pod_cgroup, &HashMap::new())
        .into_iter()
        .find(|c| &c.id == id)
        .ok_or_else(|| {
            anyhow!(
                "container {cname} ({id}) of pod {spec} has no cgroup under {}",
                pod_cgroup.display()
            )
        })?;
    let pid = found
        .roots
        .iter()
        .find_map(|r| match r {
            ContainerRoot::Process(pid) => Some(*pid),
            ContainerRoot::Mount(_) => None,
        })
        .ok_or_else(|| {
            anyhow!("container {cname} of pod {spec} has no process in its own root yet")
        })?;
    let cgroup = found.cgroup;
    Ok(PodTarget {
        pod: spec.to_string(),
        container: cname.clone(),
        cgroup,
        pid,
    })
}

fn names(running: &[(String, String)]) -> String {
    if running.is_empty() {
        return "none".into();
    }
    running
        .iter()
        .map(|(n, _)| n.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}
