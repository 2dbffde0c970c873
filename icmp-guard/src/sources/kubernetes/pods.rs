//! Pods as workloads: what the agent needs of a Pod object, and the owner it reports
//! (Pod → ReplicaSet → Deployment, Job → CronJob, and the other controllers).

use std::{
    collections::{BTreeMap, HashMap},
    sync::Mutex,
    time::{Duration, Instant},
};

use k8s_openapi::api::{apps::v1::ReplicaSet, batch::v1::Job, core::v1::Pod};
use kube::{Api, Client, api::ObjectMeta};

use crate::events::alert::Owner;

/// Labels KubeArmor leaves out of a workload's labels: controllers set them, no policy selects
/// on them, and they change with every rollout.
pub const CONTROLLER_LABELS: [&str; 3] = [
    "pod-template-hash",
    "controller-revision-hash",
    "pod-template-generation",
];

/// A pod's quality-of-service class, which places its cgroup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Qos {
    Guaranteed,
    Burstable,
    BestEffort,
}

/// A container as the pod's status reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerStatus {
    pub name: String,
    /// The runtime's id: 64 hex digits.
    pub id: String,
    /// The image with its digest, as the status reports it (`imageID`), else the image name.
    pub image: String,
}

/// What the agent needs of a Pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    /// Without [`CONTROLLER_LABELS`].
    pub labels: BTreeMap<String, String>,
    pub qos: Qos,
    pub containers: Vec<ContainerStatus>,
    /// The direct controller reference (kind, name), resolved later to the top owner.
    pub controller: Option<(String, String)>,
}

pub fn pod_info(pod: &Pod) -> Option<PodInfo> {
    let meta = &pod.metadata;
    let uid = meta.uid.clone()?;
    let status = pod.status.as_ref();
    let qos = match status.and_then(|s| s.qos_class.as_deref()) {
        Some("Guaranteed") => Qos::Guaranteed,
        Some("Burstable") => Qos::Burstable,
        Some("BestEffort") => Qos::BestEffort,
        // The API server sets the class at admission; a pod without one is not one the kubelet
        // runs yet, and its cgroup cannot be placed.
        _ => return None,
    };
    let mut labels = meta.labels.clone().unwrap_or_default();
    for l in CONTROLLER_LABELS {
        labels.remove(l);
    }
    let containers = status
        .into_iter()
        .flat_map(|s| {
            s.container_statuses
                .iter()
                .flatten()
                .chain(s.init_container_statuses.iter().flatten())
                .chain(s.ephemeral_container_statuses.iter().flatten())
        })
        .filter_map(|c| {
            let id = c.container_id.as_deref()?.split_once("://")?.1.to_string();
            let image = if c.image_id.is_empty() {
                c.image.clone()
            } else {
                image_with_digest(&c.image, &c.image_id)
            };
            Some(ContainerStatus {
                name: c.name.clone(),
                id,
                image,
            })
        })
        .collect();
    Some(PodInfo {
        uid,
        namespace: meta.namespace.clone().unwrap_or_else(|| "default".into()),
        name: meta.name.clone().unwrap_or_default(),
        labels,
        qos,
        containers,
        controller: controller_of(meta),
    })
}

/// `name@sha256:…` from the status' `image` and `imageID` (which may itself be a full
/// `repo@sha256:…` reference or a bare `sha256:…` id).
fn image_with_digest(image: &str, image_id: &str) -> String {
    let digest = image_id
        .rsplit_once('@')
        .map(|(_, d)| d)
        .unwrap_or(image_id)
        .trim_start_matches("docker-pullable://");
    if image.contains('@') {
        image.to_string()
    } else {
        format!("{image}@{digest}")
    }
}

fn controller_of(meta: &ObjectMeta) -> Option<(String, String)> {
    meta.owner_references
        .iter()
        .flatten()
        .find(|r| r.controller == Some(true))
        .map(|r| (r.kind.clone(), r.name.clone()))
}

/// Resolves a pod's controller to the workload an operator names: a ReplicaSet's Deployment, a
/// Job's CronJob. Answers are cached: owners of a pod do not change. A failed lookup is not an
/// answer: it is tried again, at most every [`Owners::RETRY`].
pub struct Owners {
    client: Client,
    /// (kind, namespace, name) → its controller (kind, name), if it has one.
    cache: Mutex<HashMap<ObjectKey, Option<(String, String)>>>,
    /// Lookups that failed, and when.
    failed: Mutex<HashMap<ObjectKey, Instant>>,
}

type ObjectKey = (String, String, String);

impl Owners {
    pub fn new(client: Client) -> Self {
        Self {
            client,
            cache: Mutex::new(HashMap::new()),
            failed: Mutex::new(HashMap::new()),
        }
    }

    const RETRY: Duration = Duration::from_secs(10);

    /// KubeArmor's `Owner`: the top controller, or the pod itself when it has none. The flag
    /// is false when a lookup failed and the owner given is the direct controller for now.
    pub async fn owner(&self, pod: &PodInfo) -> (Owner, bool) {
        let ((kind, name), known) = match &pod.controller {
            None => (("Pod".to_string(), pod.name.clone()), true),
            Some((kind, name)) => match kind.as_str() {
                "ReplicaSet" | "Job" => match self.parent(kind, &pod.namespace, name).await {
                    Ok(Some(parent)) => (parent, true),
                    Ok(None) => ((kind.clone(), name.clone()), true),
                    Err(()) => ((kind.clone(), name.clone()), false),
                },
                _ => ((kind.clone(), name.clone()), true),
            },
        };
        let owner = Owner {
            reference: kind,
            name,
            namespace: pod.namespace.clone(),
        };
        (owner, known)
    }

    /// The controller of (kind, namespace, name); `Err` when the API could not say.
    async fn parent(
        &self,
        kind: &str,
        namespace: &str,
        name: &str,
    ) -> Result<Option<(String, String)>, ()> {
        let key = (kind.to_string(), namespace.to_string(), name.to_string());
        if let Some(hit) = self.cache.lock().expect("owners lock").get(&key) {
            return Ok(hit.clone());
        }
        if let Some(when) = self.failed.lock().expect("owners lock").get(&key)
            && when.elapsed() < Self::RETRY
        {
            return Err(());
        }
        let meta = match kind {
            "ReplicaSet" => Api::<ReplicaSet>::namespaced(self.client.clone(), namespace)
                .get_opt(name)
                .await
                .map(|o| o.map(|o| o.metadata)),
            "Job" => Api::<Job>::namespaced(self.client.clone(), namespace)
                .get_opt(name)
                .await
                .map(|o| o.map(|o| o.metadata)),
            _ => return Ok(None),
        };
        let parent = match meta {
            Ok(Some(meta)) => controller_of(&meta),
            Ok(None) => None,
            Err(e) => {
                log::warn!(
                    "looking up the owner of {kind} {namespace}/{name}: {e}; alerts name the \
                     {kind} until a lookup succeeds (retried every {}s; check that the agent's \
                     role may get replicasets and jobs)",
                    Self::RETRY.as_secs()
                );
                self.failed
                    .lock()
                    .expect("owners lock")
                    .insert(key, Instant::now());
                return Err(());
            }
        };
        self.failed.lock().expect("owners lock").remove(&key);
        self.cache
            .lock()
            .expect("owners lock")
            .insert(key, parent.clone());
        Ok(parent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_carry_their_digest() {
        assert_eq!(
            image_with_digest("localhost/testbox:1", "sha256:abc"),
            "localhost/testbox:1@sha256:abc"
        );
        assert_eq!(
            image_with_digest("nginx:1.25", "docker.io/library/nginx@sha256:def"),
            "nginx:1.25@sha256:def"
        );
        assert_eq!(
            image_with_digest("nginx@sha256:def", "docker.io/library/nginx@sha256:def"),
            "nginx@sha256:def"
        );
    }

    #[test]
    fn controller_labels_are_left_out_and_the_class_places_the_pod() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "nginx-77b4fdf86c-x7sdm", "namespace": "default", "uid": "u-1",
                "labels": {"app": "nginx", "pod-template-hash": "77b4fdf86c"},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                    "name": "nginx-77b4fdf86c", "uid": "r-1", "controller": true}]
            },
            "status": {
                "qosClass": "BestEffort", "phase": "Running",
                "containerStatuses": [{"name": "nginx", "image": "localhost/testbox:1",
                    "imageID": "sha256:0123", "containerID": "containerd://abcd",
                    "ready": true, "restartCount": 0}]
            }
        }))
        .unwrap();
        let info = pod_info(&pod).unwrap();
        assert_eq!(
            info.labels,
            [("app".to_string(), "nginx".to_string())].into()
        );
        assert_eq!(info.qos, Qos::BestEffort);
        assert_eq!(
            info.controller,
            Some(("ReplicaSet".into(), "nginx-77b4fdf86c".into()))
        );
        assert_eq!(info.containers[0].id, "abcd");
        assert_eq!(info.containers[0].image, "localhost/testbox:1@sha256:0123");
    }
}
