//! Pods as workloads, in a real Kubernetes: the test cluster of `cargo xtask k8s test`
//! (Kubernetes 1.20, containerd, runc, the kubelet's cgroupfs driver on cgroup v1 hybrid with
//! cgroup2 at /sys/fs/cgroup/unified), the agent on the node as a process with `--kubeconfig`
//! and `--node-name`, attached to the kubepods subtree only.
//!
//! Each test starts its own agent and uses its own namespace (the seed scenario uses `default`,
//! as the seed does, and removes what it made), so that a failure names what broke. Traffic
//! goes only to 127.0.0.1 inside pods. Without the cluster these tests fail; they never skip.
//!
//! Run: `cargo xtask k8s test -- cargo test --release -p icmp-guard
//! --test kubernetes -- --test-threads=1`.

mod common;
mod kubernetes {
    pub mod cluster;
}

use std::time::Duration;

use common::s;
use kubernetes::cluster::*;
use serde_json::{Value, json};

/// The seed's Expected Alert (`ICMP control`, KubeArmor), as published.
const SEED_ALERT: &str = r#"{
  "Action": "Block",
  "ClusterName": "0-trust",
  "ContainerID": "20a6333c6a46e0da32b3062f0ba76e9aed4fc5ef51f5ee8aec5b980963cedea3",
  "ContainerImage": "docker.io/library/nginx:latest@sha256:32da30332506740a2f7c34d5dc70467b7f14ec67d912703568daff790ab3f755",
  "ContainerName": "nginx",
  "Data": "syscall=SYS_SOCKET",
  "Enforcer": "AppArmor",
  "HostName": "aditya",
  "HostPID": 86904,
  "HostPPID": 86860,
  "Labels": "app=nginx",
  "NamespaceName": "default",
  "Operation": "Network",
  "Owner": {
    "Name": "nginx",
    "Namespace": "default",
    "Ref": "Deployment"
  },
  "PID": 1064,
  "PPID": 1058,
  "ParentProcessName": "/usr/bin/bash",
  "PodName": "nginx-77b4fdf86c-x7sdm",
  "PolicyName": "DefaultPosture",
  "ProcessName": "/usr/sbin/hping3",
  "Resource": "domain=AF_INET type=SOCK_DGRAM|SOCK_NONBLOCK|SOCK_CLOEXEC protocol=0",
  "Result": "Permission denied",
  "Source": "/usr/sbin/hping3 www.google.com",
  "Timestamp": 1696593032,
  "Type": "MatchedPolicy",
  "UpdatedTime": "2023-10-06T11:50:32.098937Z",
  "cluster_id": "4291",
  "component_name": "kubearmor",
  "instanceGroup": "0",
  "instanceID": "0",
  "tenant_id": "167",
  "workload": "1"
}"#;

/// Fields of the seed's alert that do not depend on where it ran: equal, value for value.
/// (ClusterName is the agent config's `clusterName`, set to the seed's `0-trust`.)
const SEED_EQUAL: [&str; 14] = [
    "Action",
    "ClusterName",
    "ContainerName",
    "Data",
    "Labels",
    "NamespaceName",
    "Operation",
    "Owner",
    "PolicyName",
    "ProcessName",
    "Resource",
    "Result",
    "Source",
    "Type",
];

/// Fields that name the environment, each checked against where this alert came from:
/// ContainerID, ContainerImage, PodName and Owner against the API; PID/PPID in the
/// container's pid namespace, HostPID/HostPPID on the host; ParentProcessName is the shell of
/// the image (the seed's nginx image is Debian with merged /usr: `/usr/bin/bash`; the testbox
/// has `/bin/bash`); Enforcer is the hook (`AppArmor` there, `BPFCgroupSock` here);
/// HostName, Timestamp, UpdatedTime; and the KubeArmor service's own `cluster_id`,
/// `component_name`, `instanceGroup`, `instanceID`, `tenant_id`, `workload`, not part of
/// `feeder.Alert`.
const SEED_ENVIRONMENT: [&str; 18] = [
    "ContainerID",
    "ContainerImage",
    "PodName",
    "PID",
    "PPID",
    "HostPID",
    "HostPPID",
    "ParentProcessName",
    "Enforcer",
    "HostName",
    "Timestamp",
    "UpdatedTime",
    "cluster_id",
    "component_name",
    "instanceGroup",
    "instanceID",
    "tenant_id",
    "workload",
];

const PING: &str = "/usr/bin/ping";
const HPING3: &str = "/usr/sbin/hping3";
const BUSYBOX_PING: &str = "/bin/ping";

fn refused_text(text: &str) -> bool {
    text.contains("Operation not permitted") || text.contains("ermission denied")
}

/// The seed's objects in `default`: removed before (with their pods, so that only the new
/// Deployment's pod has the label) and after, passed or failed.
struct DefaultNamespaceObjects;

impl DefaultNamespaceObjects {
    fn remove(wait: bool) {
        let nginx = repo_file("xtask/k8s/smoke/nginx.yaml");
        let seed = repo_file("policies/kubearmor/restrict-scanning-tools.yaml");
        let wait = format!("--wait={wait}");
        for f in [nginx, seed] {
            let _ = kubectl_output(
                &[
                    "delete",
                    "--ignore-not-found",
                    &wait,
                    "-f",
                    f.to_str().unwrap(),
                ],
                None,
            );
        }
    }

    fn clean() -> Self {
        Self::remove(true);
        wait_until(
            Duration::from_secs(120),
            "no pod labelled app=nginx in default",
            || {
                kubectl(&[
                    "-n",
                    "default",
                    "get",
                    "pods",
                    "-l",
                    "app=nginx",
                    "-o",
                    "name",
                ])
                .trim()
                .is_empty()
            },
        );
        DefaultNamespaceObjects
    }
}

impl Drop for DefaultNamespaceObjects {
    fn drop(&mut self) {
        Self::remove(false);
    }
}

/// The owner KubeArmor reports, found through the API: Pod → ReplicaSet → Deployment.
fn owner_from_api(pod: &Pod) -> Value {
    let rs = &pod.0["metadata"]["ownerReferences"][0];
    assert_eq!(rs["kind"], "ReplicaSet", "{:?}", pod.0["metadata"]);
    let ns = pod.0["metadata"]["namespace"].as_str().unwrap();
    let rs = get_json(&["-n", ns, "get", "replicaset", rs["name"].as_str().unwrap()]);
    let dep = &rs["metadata"]["ownerReferences"][0];
    json!({"Ref": dep["kind"], "Name": dep["name"], "Namespace": ns})
}

#[test]
fn seed_simulation_in_the_nginx_deployment() {
    install_crds();
    let _cleanup = DefaultNamespaceObjects::clean();
    let agent = start_agent();
    // The seed's policy and an nginx Deployment (label app=nginx), applied as they are.
    let seed = repo_file("policies/kubearmor/restrict-scanning-tools.yaml");
    let applied = kubectl(&["apply", "-f", seed.to_str().unwrap()]);
    assert!(applied.contains("kubearmorpolicy"), "{applied}");
    kubectl(&[
        "apply",
        "-f",
        repo_file("xtask/k8s/smoke/nginx.yaml").to_str().unwrap(),
    ]);
    kubectl(&[
        "-n",
        "default",
        "rollout",
        "status",
        "--timeout=180s",
        "deployment/nginx",
    ]);
    let name = kubectl(&[
        "get",
        "pod",
        "-l",
        "app=nginx",
        "-o",
        "jsonpath={.items[0].metadata.name}",
    ]);
    let ns = Namespace::existing("default");
    let pod = ns.ready(&name);
    let cid = pod.container_id();
    wait_in_force(&agent, &cid);

    // The Simulation, typed into `kubectl exec -it POD -- bash` (without a terminal here);
    // ping to 127.0.0.1 instead of google.com: traffic stays in the pod.
    let session =
        "echo \"shell pid $$\"\nhping3 www.google.com\nhping3 127.0.0.1\nping -c 1 127.0.0.1\n";
    let o = ns.exec_in(pod.name(), &["bash"], Some(session));
    let text = out(&o);
    eprintln!("kubectl exec -i {} -- bash:\n{text}", pod.name());
    assert!(
        text.contains("Unable to resolve 'www.google.com'"),
        "{text}"
    );
    assert!(
        text.contains("[get_if_name] socket(AF_INET, SOCK_DGRAM, 0): Operation not permitted"),
        "{text}"
    );
    assert!(text.contains("1 packets transmitted, 1 received"), "{text}");
    let shell_pid: i64 = text
        .lines()
        .find_map(|l| l.strip_prefix("shell pid "))
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("{text}"));

    let expected: Value = serde_json::from_str(SEED_ALERT).unwrap();
    let a = agent.wait_alert("hping3 www.google.com", |a| {
        s(a, "Source") == "/usr/sbin/hping3 www.google.com"
    });
    eprintln!("alert: {}", serde_json::to_string_pretty(&a).unwrap());
    for k in SEED_EQUAL {
        assert_eq!(a[k], expected[k], "field {k}: {a}");
    }
    // Every field of the seed's alert is accounted for.
    for k in expected.as_object().unwrap().keys() {
        assert!(
            SEED_EQUAL.contains(&k.as_str()) || SEED_ENVIRONMENT.contains(&k.as_str()),
            "seed field {k} is neither compared nor explained"
        );
    }
    assert!(a.get("Severity").is_none(), "{a}");
    // The environment's fields, against where the alert came from.
    assert_eq!(s(&a, "ContainerID"), cid);
    assert_eq!(s(&a, "ContainerName"), pod.container_name());
    assert_eq!(s(&a, "ContainerImage"), pod.container_image());
    assert_eq!(s(&a, "PodName"), pod.name());
    assert_eq!(a["Owner"], owner_from_api(&pod));
    assert_eq!(
        a["PPID"], shell_pid,
        "PPID is the shell's pid in the container: {a}"
    );
    assert_ne!(a["HostPPID"], a["PPID"], "{a}");
    assert!(a["HostPID"].as_i64().unwrap() > 0 && a["PID"].as_i64().unwrap() > 0);
    let bash = ns.exec(
        pod.name(),
        &["bash", "-c", "readlink -f \"$(command -v bash)\""],
    );
    assert_eq!(
        s(&a, "ParentProcessName"),
        String::from_utf8_lossy(&bash.stdout).trim(),
        "ParentProcessName is the image's bash"
    );
    assert_eq!(
        s(&a, "Enforcer"),
        if common::is_lsm() {
            "BPFLSM"
        } else {
            "BPFCgroupSock"
        }
    );
    assert_eq!(s(&a, "HostName"), agent_host_name());

    // `hping3 127.0.0.1`: the same socket without the resolver's flags.
    let b = agent.wait_alert("hping3 127.0.0.1", |a| {
        s(a, "Source") == "/usr/sbin/hping3 127.0.0.1"
    });
    for k in SEED_EQUAL {
        match k {
            "Resource" => assert_eq!(s(&b, k), "domain=AF_INET type=SOCK_DGRAM protocol=0", "{b}"),
            "Source" => {}
            _ => assert_eq!(b[k], expected[k], "field {k}: {b}"),
        }
    }
    // ping works and is never blocked.
    let alerts = agent.settled_alerts();
    assert!(
        alerts
            .iter()
            .all(|a| s(a, "ProcessName") != PING || s(a, "Action") != "Block"),
        "{alerts:?}"
    );
    agent.stop();
}

fn agent_host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_string()
}

#[test]
fn identity_in_a_container() {
    let ns = Namespace::new("ig-identity");
    let agent = start_agent();
    ns.apply(&seed_policy_in(&ns.name));
    ns.apply(&ns.pod("nginx", &[("app", "nginx")], None));
    ns.apply(&ns.pod("other", &[("app", "other")], None));
    let nginx = ns.ready("nginx");
    let other = ns.ready("other");
    wait_in_force(&agent, &nginx.container_id());
    wait_in_force(&agent, &other.container_id());

    let sh = |pod: &str, script: &str| {
        let o = ns.exec(pod, &["bash", "-c", script]);
        (o.status.success(), out(&o))
    };
    // A copy of hping3 named ping: refused, and the alert names the copy.
    let (ok, text) = sh(
        "nginx",
        "cp /usr/sbin/hping3 /tmp/ping && /tmp/ping -1 -c 1 127.0.0.1",
    );
    assert!(
        !ok && refused_text(&text),
        "copy of hping3 named ping: {text}"
    );
    let a = agent.wait_alert("/tmp/ping", |a| s(a, "ProcessName") == "/tmp/ping");
    assert_eq!(s(&a, "Action"), "Block");
    assert_eq!(s(&a, "PodName"), "nginx");
    assert_eq!(s(&a, "ContainerID"), nginx.container_id());
    // A copy of ping itself is another file: refused (iputils then says "Address family for
    // hostname not supported", having failed every socket it tried).
    let (ok, text) = sh(
        "nginx",
        "cp /usr/bin/ping /tmp/myping && /tmp/myping -c 1 127.0.0.1",
    );
    assert!(!ok, "copy of ping: {text}");
    let a = agent.wait_alert("/tmp/myping", |a| s(a, "ProcessName") == "/tmp/myping");
    assert_eq!(s(&a, "Action"), "Block");
    // busybox's ping, /bin/ping: named ping, another executable: refused.
    let (ok, text) = sh("nginx", "/bin/ping -c 1 127.0.0.1");
    assert!(!ok, "busybox ping: {text}");
    agent.wait_alert("busybox ping", |a| {
        s(a, "ProcessName") == "/bin/busybox" && s(a, "PodName") == "nginx"
    });
    // The container's own ping, and a symlink to it: allowed.
    let (ok, text) = sh(
        "nginx",
        "/usr/bin/ping -c 1 127.0.0.1 && ln -sf /usr/bin/ping /tmp/lnping && /tmp/lnping -c 1 127.0.0.1",
    );
    assert!(
        ok && text.contains("1 received"),
        "the container's ping: {text}"
    );
    // The pod with other labels: untouched, hping3 and busybox ping work, no alert names it.
    let (ok, text) = sh(
        "other",
        "hping3 -1 -c 1 127.0.0.1 && /bin/ping -c 1 127.0.0.1",
    );
    assert!(ok, "pod with other labels: {text}");
    let alerts = agent.settled_alerts();
    assert!(
        alerts.iter().all(|a| s(a, "PodName") != "other"),
        "{alerts:?}"
    );
    assert!(
        alerts
            .iter()
            .all(|a| s(a, "ProcessName") != PING || s(a, "Action") != "Block"),
        "{alerts:?}"
    );
    agent.stop();
}

#[test]
fn a_pod_created_after_the_policy_is_enforced_from_its_first_socket() {
    let ns = Namespace::new("ig-first");
    let agent = start_agent();
    ns.apply(&seed_policy_in(&ns.name));
    agent.wait_log(
        &format!(
            "KubeArmorPolicy/{}/restrict-scanning-tools: policy accepted",
            ns.name
        ),
        Duration::from_secs(10),
    );
    // Its command opens a raw ICMP socket at once: busybox's ping, not the allowed one.
    let first = pod_yaml(
        &ns.name,
        "first",
        &[("app", "nginx")],
        Some(&[BUSYBOX_PING, "-c", "1", "127.0.0.1"]),
        "Never",
    );
    ns.apply(&first);
    wait_until(Duration::from_secs(180), "pod first done", || {
        matches!(ns.get_pod("first").phase(), "Succeeded" | "Failed")
    });
    let first = ns.get_pod("first");
    let logs = ns.kubectl(&["logs", "first"]);
    assert_eq!(first.phase(), "Failed", "busybox ping ran: {logs}");
    assert!(refused_text(&logs), "{logs}");
    let a = agent.wait_alert("the first socket of pod first", |a| {
        s(a, "ProcessName") == "/bin/busybox" && s(a, "NamespaceName") == ns.name
    });
    assert_eq!(s(&a, "Action"), "Block");
    assert_eq!(s(&a, "PodName"), "first");
    assert_eq!(
        a["Owner"],
        json!({"Ref": "Pod", "Name": "first", "Namespace": ns.name})
    );
    assert!(s(&a, "Resource").contains("SOCK_RAW"), "{a}");
    agent.stop();
}

/// A pod whose container tries busybox's ping every 20 ms: refused under the seed, allowed
/// under a policy that also names /bin/ping, or under none.
fn probe_pod(ns: &Namespace, name: &str, labels: &[(&str, &str)]) -> Pod {
    let cmd = probe_loop(&format!("{BUSYBOX_PING} -c 1 -W 1 127.0.0.1"));
    let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
    ns.apply(&pod_yaml(&ns.name, name, labels, Some(&cmd), "Always"));
    ns.ready(name)
}

/// The seed policy that also allows busybox's ping (an absolute symlink in the image,
/// `/bin/ping -> /bin/busybox`, resolved inside the container).
fn seed_allowing_busybox(ns: &str) -> String {
    let p = seed_policy_in(ns);
    let with = p.replace(
        "    - protocol: icmp\n      fromSource:\n      - path: /usr/bin/ping\n",
        "    - protocol: icmp\n      fromSource:\n      - path: /usr/bin/ping\n      - path: /bin/ping\n",
    );
    assert_ne!(p, with);
    with
}

#[test]
fn policy_apply_and_delete_take_effect_within_a_second() {
    let ns = Namespace::new("ig-policy");
    let agent = start_agent();
    ns.apply(&seed_policy_in(&ns.name));
    let pod = probe_pod(&ns, "probe", &[("app", "nginx")]);
    wait_in_force(&agent, &pod.container_id());
    wait_probe(
        &ns,
        "probe",
        now(),
        true,
        "busybox ping refused under the seed",
    );

    let mut report = Vec::new();
    for (what, yaml, refused) in [
        (
            "apply: /bin/ping allowed",
            Some(seed_allowing_busybox(&ns.name)),
            false,
        ),
        (
            "apply: back to the seed",
            Some(seed_policy_in(&ns.name)),
            true,
        ),
        ("delete", None, false),
    ] {
        match &yaml {
            Some(y) => {
                ns.apply(y);
            }
            None => {
                ns.kubectl(&["delete", "kubearmorpolicy", "restrict-scanning-tools"]);
            }
        }
        let changed = now();
        let took = time_to_flip(&ns, "probe", changed, refused, Duration::from_secs(3));
        eprintln!(
            "{what}: the probe's first socket with the new behaviour ended {:.0} ms after kubectl returned",
            took * 1000.0
        );
        report.push((what, took));
        assert!(
            took < 1.0,
            "{what}: took {took:.3} s from kubectl returning to the new behaviour"
        );
    }
    eprintln!("{report:?}");
    agent.stop();
}

#[test]
fn relabelling_moves_a_pod_in_and_out_of_the_selector() {
    let ns = Namespace::new("ig-relabel");
    let agent = start_agent();
    ns.apply(&seed_policy_in(&ns.name));
    let pod = probe_pod(&ns, "probe", &[("app", "nginx")]);
    wait_in_force(&agent, &pod.container_id());
    wait_probe(
        &ns,
        "probe",
        now(),
        true,
        "busybox ping refused while app=nginx",
    );
    for (label, refused) in [("app=web", false), ("app=nginx", true)] {
        ns.kubectl(&["label", "pod", "probe", label, "--overwrite"]);
        let changed = now();
        let took = time_to_flip(&ns, "probe", changed, refused, Duration::from_secs(3));
        eprintln!(
            "relabel {label}: new behaviour {:.0} ms after kubectl returned",
            took * 1000.0
        );
        assert!(took < 1.0, "relabel {label}: took {took:.3} s");
    }
    // The alerts carry the labels of the moment.
    let a = agent.wait_alert("busybox ping after relabelling", |a| {
        s(a, "PodName") == "probe" && s(a, "NamespaceName") == ns.name
    });
    assert_eq!(s(&a, "Labels"), "app=nginx");
    agent.stop();
}

#[test]
fn a_namespace_annotated_audit_audits_instead_of_blocking() {
    let ns = Namespace::new("ig-audit");
    let agent = start_agent();
    ns.apply(&seed_policy_in(&ns.name));
    ns.apply(&ns.pod("nginx", &[("app", "nginx")], None));
    let pod = ns.ready("nginx");
    wait_in_force(&agent, &pod.container_id());
    let hping = |_: ()| {
        let o = ns.exec("nginx", &[HPING3, "-1", "-c", "1", "127.0.0.1"]);
        (o.status.success(), out(&o))
    };
    let (ok, text) = hping(());
    assert!(
        !ok && refused_text(&text),
        "blocked before the annotation: {text}"
    );
    kubectl(&[
        "annotate",
        &format!("namespace/{}", ns.name),
        "kubearmor-network-posture=audit",
    ]);
    wait_until(Duration::from_secs(5), "audit posture in force", || {
        hping(()).0
    });
    let (ok, text) = hping(());
    assert!(ok, "audited, not refused: {text}");
    let a = agent.wait_alert("audited hping3", |a| {
        s(a, "ProcessName") == HPING3 && s(a, "Action") == "Audit"
    });
    assert_eq!(s(&a, "Result"), "Passed");
    assert_eq!(s(&a, "PolicyName"), "DefaultPosture");
    assert_eq!(s(&a, "NamespaceName"), ns.name);
    // ping is still allowed, not audited.
    let o = ns.exec("nginx", &[PING, "-c", "1", "127.0.0.1"]);
    assert!(o.status.success(), "{}", out(&o));
    let alerts = agent.settled_alerts();
    assert!(
        alerts.iter().all(|a| s(a, "ProcessName") != PING),
        "{alerts:?}"
    );
    agent.stop();
}

#[test]
fn a_terminating_pod_keeps_its_rules_through_its_grace_period() {
    let ns = Namespace::new("ig-terminating");
    let agent = start_agent();
    ns.apply(&seed_policy_in(&ns.name));
    // Containers that ignore SIGTERM and run through a 60 s grace period.
    let slow = |name: &str, app: &str| {
        pod_yaml(
            &ns.name,
            name,
            &[("app", app)],
            Some(&["/bin/bash", "-c", "trap '' TERM; while :; do sleep 1; done"]),
            "Always",
        )
        .replace(
            "terminationGracePeriodSeconds: 1",
            "terminationGracePeriodSeconds: 60",
        )
    };
    ns.apply(&slow("nginx", "nginx"));
    ns.apply(&slow("other", "other"));
    let nginx = ns.ready("nginx");
    let other = ns.ready("other");
    wait_in_force(&agent, &nginx.container_id());
    wait_in_force(&agent, &other.container_id());
    ns.kubectl(&["delete", "pod", "nginx", "other", "--wait=false"]);
    wait_until(Duration::from_secs(10), "both pods terminating", || {
        ["nginx", "other"]
            .iter()
            .all(|p| !ns.get_pod(p).0["metadata"]["deletionTimestamp"].is_null())
    });
    std::thread::sleep(Duration::from_secs(1));
    // The selected pod: ping still allowed, hping3 still refused by its policy.
    let o = ns.exec("nginx", &[PING, "-c", "1", "127.0.0.1"]);
    assert!(
        o.status.success(),
        "ping in the terminating nginx pod: {}",
        out(&o)
    );
    let o = ns.exec("nginx", &[HPING3, "-1", "-c", "1", "127.0.0.1"]);
    assert!(
        refused_text(&out(&o)),
        "hping3 in the terminating nginx pod: {}",
        out(&o)
    );
    // The unselected pod: still untouched.
    let o = ns.exec("other", &[BUSYBOX_PING, "-c", "1", "127.0.0.1"]);
    assert!(
        o.status.success(),
        "busybox ping in the terminating other pod: {}",
        out(&o)
    );
    let alerts = agent.settled_alerts();
    assert!(
        alerts.iter().all(|a| s(a, "PodName") != "other"),
        "{alerts:?}"
    );
    assert!(
        alerts
            .iter()
            .all(|a| !a["EventData"]["Workload"].is_string()),
        "no process of a known pod falls to the pending-pods workload: {alerts:?}"
    );
    // Let the pods go now.
    let _ = ns.kubectl_output(
        &[
            "delete",
            "pod",
            "nginx",
            "other",
            "--grace-period=0",
            "--force",
        ],
        None,
    );
    agent.stop();
}

#[test]
fn the_api_server_stopped_for_30_s() {
    let ns = Namespace::new("ig-apiserver");
    let agent = start_agent();
    ns.apply(&seed_policy_in(&ns.name));
    ns.apply(&ns.pod("nginx", &[("app", "nginx")], None));
    let pod = ns.ready("nginx");
    let cid = pod.container_id();
    wait_in_force(&agent, &cid);

    let down = stop_apiserver();
    let stopped_at = std::time::Instant::now();
    agent.wait_log(
        "Kubernetes watch of pods on this node failed",
        Duration::from_secs(30),
    );
    // While it is down: refusals still refused, ping still allowed, alerts still written,
    // with the pod's fields.
    let mut probes = 0;
    while stopped_at.elapsed() < Duration::from_secs(30) {
        let o = ctr_exec(&cid, &[HPING3, "-1", "-c", "1", "127.0.0.1"]);
        assert!(
            refused_text(&out(&o)),
            "hping3 while the API is down: {}",
            out(&o)
        );
        let o = ctr_exec(&cid, &[PING, "-c", "1", "127.0.0.1"]);
        assert!(
            o.status.success(),
            "ping while the API is down: {}",
            out(&o)
        );
        probes += 1;
        std::thread::sleep(Duration::from_secs(5));
    }
    let during = agent.alerts();
    let refused_while_down = during
        .iter()
        .filter(|a| s(a, "ProcessName") == HPING3 && s(a, "PodName") == "nginx")
        .count();
    assert!(
        refused_while_down >= probes,
        "{probes} probes, alerts: {during:?}"
    );
    let a = during
        .iter()
        .rev()
        .find(|a| s(a, "ProcessName") == HPING3)
        .unwrap();
    assert_eq!(s(a, "ContainerID"), cid);
    assert_eq!(s(a, "NamespaceName"), ns.name);
    assert_eq!(s(a, "Labels"), "app=nginx");
    eprintln!(
        "API server down for {:.1} s, {probes} probe rounds",
        stopped_at.elapsed().as_secs_f64()
    );

    down.restart();
    agent.wait_log(
        "Kubernetes watch of pods on this node resumed",
        Duration::from_secs(90),
    );
    agent.wait_log(
        "Kubernetes watch of KubeArmorPolicy resumed",
        Duration::from_secs(90),
    );
    // A policy change made after the restart is applied.
    ns.kubectl(&["delete", "kubearmorpolicy", "restrict-scanning-tools"]);
    wait_until(
        Duration::from_secs(5),
        "hping3 allowed once the policy is deleted",
        || {
            ns.exec("nginx", &[HPING3, "-1", "-c", "1", "127.0.0.1"])
                .status
                .success()
        },
    );
    agent.stop();
}

#[test]
fn an_invalid_policy_gets_an_event_and_changes_nothing() {
    let ns = Namespace::new("ig-invalid");
    // Every update the agent applies counts below: none may come from an earlier test's
    // objects going away.
    wait_for_other_namespaces_to_empty(&ns.name);
    let agent = start_agent();
    ns.apply(&ns.pod("nginx", &[("app", "nginx")], None));
    let pod = ns.ready("nginx");
    wait_in_force(&agent, &pod.container_id());
    let hping_allowed = || {
        ns.exec("nginx", &[HPING3, "-1", "-c", "1", "127.0.0.1"])
            .status
            .success()
    };
    let events_of = |name: &str| -> Vec<Value> {
        get_json(&[
            "-n",
            &ns.name,
            "get",
            "events",
            "--field-selector",
            &format!("involvedObject.name={name}"),
        ])["items"]
            .as_array()
            .unwrap()
            .clone()
    };
    let wait_event = |name: &str, needle: &str| -> Value {
        let mut found = None;
        wait_until(
            Duration::from_secs(20),
            &format!("an Event on {name}"),
            || {
                found = events_of(name).into_iter().find(|e| {
                    e["reason"] == "PolicyRefused"
                        && e["message"].as_str().unwrap_or("").contains(needle)
                });
                found.is_some()
            },
        );
        found.unwrap()
    };

    // A new invalid policy: an Event, and nothing applied (hping3 still works).
    let bad_new = seed_policy_in(&ns.name)
        .replace("name: restrict-scanning-tools", "name: bad-protocol")
        .replace("- protocol: icmp\n", "- protocol: icmpp\n");
    let reloads = agent.log_count("applied as update");
    ns.apply(&bad_new);
    let e = wait_event("bad-protocol", "unknown protocol `icmpp`");
    eprintln!("Event: {}", e["message"]);
    assert_eq!(e["type"], "Warning");
    assert_eq!(e["involvedObject"]["kind"], "KubeArmorPolicy");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("spec.network.matchProtocols[0].protocol"),
        "{e}"
    );
    let describe = ns.kubectl(&["describe", "kubearmorpolicy", "bad-protocol"]);
    eprintln!("kubectl describe ksp bad-protocol:\n{describe}");
    assert!(describe.contains("PolicyRefused"), "{describe}");
    assert!(hping_allowed(), "an invalid policy must apply nothing");
    assert_eq!(
        agent.log_count("applied as update"),
        reloads,
        "nothing applied"
    );

    // A valid policy, then an invalid change of it: the valid version stays in force.
    ns.apply(&seed_policy_in(&ns.name));
    wait_until(Duration::from_secs(5), "the seed in force", || {
        !hping_allowed()
    });
    let bad_change = seed_policy_in(&ns.name).replace("path: /usr/bin/ping", "path: usr/bin/ping");
    let reloads = agent.log_count("applied as update");
    ns.apply(&bad_change);
    let e = wait_event("restrict-scanning-tools", "is not an absolute path");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("its last valid version stays in force"),
        "{e}"
    );
    std::thread::sleep(Duration::from_secs(1));
    assert!(!hping_allowed(), "the last valid version stays in force");
    let o = ns.exec("nginx", &[PING, "-c", "1", "127.0.0.1"]);
    assert!(o.status.success(), "ping still allowed: {}", out(&o));
    assert_eq!(
        agent.log_count("applied as update"),
        reloads,
        "nothing applied"
    );
    agent.stop();
}
