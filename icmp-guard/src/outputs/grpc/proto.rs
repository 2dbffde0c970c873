//! The `feeder` messages (generated from `proto/kubearmor.proto` by build.rs) and the one
//! conversion that matters: an [`Alert`](crate::events::alert::Alert) as it is written to
//! `--output` becomes a `feeder.Alert` with the same value in every field.

#![allow(clippy::all, missing_docs)]

include!(concat!(env!("OUT_DIR"), "/feeder-messages/feeder.rs"));

/// The encoded descriptor set of `feeder`, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/feeder.bin"));

impl From<&crate::events::alert::Alert> for Alert {
    /// Field by field, so that adding a field to the JSON alert without carrying it here fails to
    /// compile (the destructuring names every field).
    fn from(a: &crate::events::alert::Alert) -> Self {
        let crate::events::alert::Alert {
            timestamp,
            updated_time,
            cluster_name,
            host_name,
            namespace_name,
            owner,
            pod_name,
            labels,
            container_id,
            container_name,
            container_image,
            host_ppid,
            host_pid,
            ppid,
            pid,
            uid,
            parent_process_name,
            process_name,
            policy_name,
            severity,
            tags,
            atags,
            message,
            kind,
            source,
            operation,
            resource,
            data,
            enforcer,
            action,
            result,
            max_alerts_per_sec,
            dropping_alerts_interval,
            event_data,
        } = a;
        Alert {
            timestamp: *timestamp,
            updated_time: updated_time.clone(),
            cluster_name: cluster_name.clone(),
            host_name: host_name.clone(),
            namespace_name: namespace_name.clone(),
            owner: owner.as_ref().map(|o| Podowner {
                r#ref: o.reference.clone(),
                name: o.name.clone(),
                namespace: o.namespace.clone(),
            }),
            pod_name: pod_name.clone(),
            labels: labels.clone(),
            container_id: container_id.clone(),
            container_name: container_name.clone(),
            container_image: container_image.clone(),
            host_ppid: *host_ppid,
            host_pid: *host_pid,
            ppid: *ppid,
            pid: *pid,
            uid: *uid,
            parent_process_name: parent_process_name.clone(),
            process_name: process_name.clone(),
            policy_name: policy_name.clone(),
            severity: severity.clone(),
            tags: tags.clone(),
            a_tags: atags.clone(),
            message: message.clone(),
            r#type: kind.clone(),
            source: source.clone(),
            operation: operation.clone(),
            resource: resource.clone(),
            data: data.clone(),
            enforcer: enforcer.clone(),
            action: action.clone(),
            result: result.clone(),
            max_alerts_per_sec: *max_alerts_per_sec,
            dropping_alerts_interval: *dropping_alerts_interval,
            event_data: event_data
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use prost::Message as _;

    use super::*;
    use crate::events::alert::{Alert as JsonAlert, Owner};

    fn full() -> JsonAlert {
        JsonAlert {
            timestamp: 1_795_287_592,
            updated_time: "2026-11-21T18:59:52.118442Z".into(),
            cluster_name: "c".into(),
            host_name: "h".into(),
            namespace_name: "default".into(),
            owner: Some(Owner {
                reference: "Deployment".into(),
                name: "nginx".into(),
                namespace: "default".into(),
            }),
            pod_name: "p".into(),
            labels: "app=nginx".into(),
            container_id: "cid".into(),
            container_name: "nginx".into(),
            container_image: "nginx:1".into(),
            host_ppid: 1,
            host_pid: 2,
            ppid: 3,
            pid: 4,
            uid: 5,
            parent_process_name: "/bin/sh".into(),
            process_name: "/usr/sbin/hping3".into(),
            policy_name: "pol".into(),
            severity: "5".into(),
            tags: "a,b".into(),
            atags: vec!["a".into(), "b".into()],
            message: "m".into(),
            kind: "MatchedPolicy".into(),
            source: "/usr/sbin/hping3 -c 1".into(),
            operation: "Network".into(),
            resource: "domain=AF_INET type=SOCK_RAW protocol=255".into(),
            data: "syscall=SYS_SOCKET".into(),
            enforcer: "BPFLSM".into(),
            action: "Block".into(),
            result: "Permission denied".into(),
            max_alerts_per_sec: 10,
            dropping_alerts_interval: 30,
            event_data: BTreeMap::from([("Class".into(), "raw".into())]),
        }
    }

    /// The proto3 JSON mapping with proto field names is KubeArmor's JSON: every field of the
    /// JSON alert must come out of the wire message under the same key with the same value.
    #[test]
    fn every_json_field_survives_the_wire() {
        let a = full();
        let wire = Alert::from(&a).encode_to_vec();
        let back = Alert::decode(wire.as_slice()).unwrap();
        let json: serde_json::Value = serde_json::to_value(&a).unwrap();
        let obj = json.as_object().unwrap();
        let check = |key: &str, got: serde_json::Value| {
            assert_eq!(obj.get(key), Some(&got), "{key}");
        };
        check("Timestamp", back.timestamp.into());
        check("UpdatedTime", back.updated_time.clone().into());
        check("ClusterName", back.cluster_name.clone().into());
        check("HostName", back.host_name.clone().into());
        check("NamespaceName", back.namespace_name.clone().into());
        let o = back.owner.clone().unwrap();
        check(
            "Owner",
            serde_json::json!({"Ref": o.r#ref, "Name": o.name, "Namespace": o.namespace}),
        );
        check("PodName", back.pod_name.clone().into());
        check("Labels", back.labels.clone().into());
        check("ContainerID", back.container_id.clone().into());
        check("ContainerName", back.container_name.clone().into());
        check("ContainerImage", back.container_image.clone().into());
        check("HostPPID", back.host_ppid.into());
        check("HostPID", back.host_pid.into());
        check("PPID", back.ppid.into());
        check("PID", back.pid.into());
        check("UID", back.uid.into());
        check("ParentProcessName", back.parent_process_name.clone().into());
        check("ProcessName", back.process_name.clone().into());
        check("PolicyName", back.policy_name.clone().into());
        check("Severity", back.severity.clone().into());
        check("Tags", back.tags.clone().into());
        check("ATags", back.a_tags.clone().into());
        check("Message", back.message.clone().into());
        check("Type", back.r#type.clone().into());
        check("Source", back.source.clone().into());
        check("Operation", back.operation.clone().into());
        check("Resource", back.resource.clone().into());
        check("Data", back.data.clone().into());
        check("Enforcer", back.enforcer.clone().into());
        check("Action", back.action.clone().into());
        check("Result", back.result.clone().into());
        check("MaxAlertsPerSec", back.max_alerts_per_sec.into());
        check(
            "DroppingAlertsInterval",
            back.dropping_alerts_interval.into(),
        );
        check(
            "EventData",
            serde_json::to_value(back.event_data.iter().collect::<BTreeMap<_, _>>()).unwrap(),
        );
        // 34 keys checked above: the JSON alert has no key the wire message lacks.
        assert_eq!(obj.len(), 34, "{obj:?}");
    }
}
