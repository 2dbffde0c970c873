//! `KubeArmorPolicy` and `KubeArmorHostPolicy` custom resources → policies, through the same
//! parser and validation as files.
//!
//! Each object is validated on its own. An invalid object changes nothing: a new one applies
//! nothing, and a change that breaks an existing one leaves its last valid version in force. The
//! refusal is logged and recorded as a Kubernetes Event on the object, naming the field and the
//! reason, so that `kubectl describe ksp NAME` shows it. The other policies keep working.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    sync::Arc,
};

use kube::{
    Resource, ResourceExt,
    api::DynamicObject,
    runtime::events::{Event, EventType, Recorder, Reporter},
};
use log::{info, warn};
use serde_json::{Value, json};

use crate::sources::policy::{Policy, kubearmor, kubearmor::PolicyWarning};

/// One object as last seen, and what it contributes.
struct Seen {
    resource_version: String,
    /// The last valid version of the object's policy (`None`: it has never been valid).
    valid: Option<Policy>,
}

/// A refusal to report on its object.
pub struct Refusal {
    pub kind: &'static str,
    pub object: Arc<DynamicObject>,
    pub message: String,
}

/// The policies of the API, kept per object across changes.
#[derive(Default)]
pub struct ApiPolicies {
    by_uid: BTreeMap<String, Seen>,
}

impl ApiPolicies {
    /// Brings the set up to date with the objects in the stores. Returns the policies in force
    /// and the refusals found by this update (each object version is judged once).
    /// `objects`: (kind, object) of every policy object in the stores.
    pub fn update(
        &mut self,
        objects: impl IntoIterator<Item = (&'static str, Arc<DynamicObject>)>,
    ) -> (Vec<Policy>, Vec<Refusal>) {
        let mut present = BTreeSet::new();
        let mut refusals = Vec::new();
        for (kind, object) in objects {
            let Some(uid) = object.metadata.uid.clone() else {
                continue;
            };
            present.insert(uid.clone());
            let version = object.resource_version().unwrap_or_default();
            if self
                .by_uid
                .get(&uid)
                .is_some_and(|s| s.resource_version == version)
            {
                continue;
            }
            let origin = origin_of(kind, &object);
            let judged = parse_object(kind, &object, &origin);
            let seen = self.by_uid.entry(uid).or_insert(Seen {
                resource_version: String::new(),
                valid: None,
            });
            seen.resource_version = version;
            match judged {
                Ok((policy, warnings)) => {
                    for w in warnings {
                        warn!("{w}");
                    }
                    info!("{origin}: policy accepted from the Kubernetes API");
                    seen.valid = policy;
                }
                Err(message) => {
                    let kept = if seen.valid.is_some() {
                        "its last valid version stays in force"
                    } else {
                        "nothing of it is applied"
                    };
                    warn!("{origin}: policy refused, {kept}:\n{message}");
                    refusals.push(Refusal {
                        kind,
                        object: object.clone(),
                        message: format!("policy refused, {kept}: {message}"),
                    });
                }
            }
        }
        self.by_uid.retain(|uid, _| present.contains(uid));
        let policies = self
            .by_uid
            .values()
            .filter_map(|s| s.valid.clone())
            .collect();
        (policies, refusals)
    }
}

/// `KubeArmorPolicy/NAMESPACE/NAME` (or `KubeArmorHostPolicy/NAME`): the "file" of the policy
/// in messages and alerts' `RuleOrigin`.
fn origin_of(kind: &str, object: &DynamicObject) -> String {
    match object.namespace() {
        Some(ns) => format!("{kind}/{ns}/{}", object.name_any()),
        None => format!("{kind}/{}", object.name_any()),
    }
}

/// Runs the file parser on the object as it was applied: kind, apiVersion, the identifying
/// metadata and the spec (server-side metadata and status are not the policy).
#[allow(clippy::type_complexity)]
fn parse_object(
    kind: &str,
    object: &DynamicObject,
    origin: &str,
) -> Result<(Option<Policy>, Vec<PolicyWarning>), String> {
    let mut metadata = json!({ "name": object.name_any() });
    if let Some(ns) = object.namespace() {
        metadata["namespace"] = Value::String(ns);
    }
    // The apiVersion is the object's own, so that a version icmp-guard does not read is refused
    // with the parser's message.
    let api_version = object
        .types
        .as_ref()
        .map(|t| t.api_version.clone())
        .unwrap_or_else(|| kubearmor::API_VERSION.to_string());
    let mut doc = json!({
        "apiVersion": api_version,
        "kind": kind,
        "metadata": metadata,
    });
    if let Some(spec) = object.data.get("spec") {
        doc["spec"] = spec.clone();
    }
    // JSON is YAML; pretty-printed, each field is on a line of its own for the messages.
    let text = serde_json::to_string_pretty(&doc).unwrap_or_default();
    match kubearmor::parse_str(&text, Path::new(origin)) {
        Ok(loaded) => Ok((loaded.set.policies.into_iter().next(), loaded.warnings)),
        Err(errors) => Err(errors
            .iter()
            .map(|e| {
                // The line is of the rendered object, which the operator never saw: the field
                // path is what locates the error.
                format!("{}: {}", e.field, e.reason)
            })
            .collect::<Vec<_>>()
            .join("; ")),
    }
}

/// Records refusals as Events on their objects. Failing to record one is logged, never fatal:
/// the refusal itself is already in force and in the log.
pub async fn record(recorder: &Recorder, refusals: Vec<Refusal>) {
    for r in refusals {
        // Events carry at most 1 kB of note.
        let mut note = r.message.clone();
        if note.len() > 1000 {
            let mut end = 990;
            while !note.is_char_boundary(end) {
                end -= 1;
            }
            note.truncate(end);
            note.push_str(" …");
        }
        let event = Event {
            type_: EventType::Warning,
            reason: "PolicyRefused".into(),
            note: Some(note),
            action: "Validate".into(),
            secondary: None,
        };
        let reference = r.object.object_ref(&super::policy_resource(r.kind));
        if let Err(e) = recorder.publish(&event, &reference).await {
            warn!(
                "could not record the refusal as a Kubernetes Event on {}: {e}; check that the \
                 agent's role may create events",
                origin_of(r.kind, &r.object)
            );
        }
    }
}

pub fn recorder(client: kube::Client, node_name: &str) -> Recorder {
    Recorder::new(
        client,
        Reporter {
            controller: "icmp-guard".into(),
            instance: Some(format!("icmp-guard-{node_name}")),
        },
    )
}
