//! The DaemonSet of `deploy/kubernetes/`, as an operator deploys it, in the test cluster of
//! `cargo xtask k8s test`: the image built by `cargo xtask image` from the agent under test and
//! imported into the cluster's containerd, `kubectl apply -f deploy/kubernetes/` unchanged, the
//! agent running as the DaemonSet's pod (in-cluster configuration, hostPID, the cgroup enforcer
//! on the kubepods subtree as its ConfigMap says).
//!
//! One test walks the whole life of the deployment, because each step needs the one before and
//! the cluster has one node: Ready, RBAC, the seed scenario in a pod, host policies for the
//! node's own programs (in a test cgroup under kubepods, never machine-wide), then
//! `kubectl delete -f deploy/kubernetes/` and every socket back. Traffic goes only to 127.0.0.1
//! in pods and in loopback-only network namespaces.
//!
//! Run: `cargo xtask k8s test -- cargo test --release -p icmp-guard
//! --test kubernetes_daemonset -- --test-threads=1` (scripts/test.sh runs it after the
//! `kubernetes` suite).

mod common;
// Shared with the `kubernetes` suite, which uses all of it.
#[allow(dead_code)]
mod kubernetes {
    pub mod cluster;
}

use std::{
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use common::{TestCgroup, agent_bin, placement, refused, run_probe, s, scratch, text};
use kubernetes::cluster::*;
use serde_json::Value;

const NS: &str = "icmp-guard";
const SA: &str = "system:serviceaccount:icmp-guard:icmp-guard";
const PIN_DIR: &str = "/sys/fs/bpf/icmp-guard";
const HOST_PING: &str = "/usr/bin/ping";
const HOST_HPING3: &str = "/usr/sbin/hping3";

fn manifests() -> PathBuf {
    repo_file("deploy/kubernetes")
}

/// `cargo xtask image` of the agent under test, imported into the cluster's containerd under
/// the names the DaemonSet asks for.
fn import_image() {
    let xtask = env("ICMP_GUARD_XTASK");
    let dir = scratch("image");
    let archive = dir.join("icmp-guard.tar");
    let mut build = Command::new(&xtask);
    build
        .arg("image")
        .arg("--agent")
        .arg(agent_bin())
        .arg("--output")
        .arg(&archive);
    let o = run_with_timeout(build, None, Duration::from_secs(300));
    assert!(o.status.success(), "cargo xtask image: {}", out(&o));
    eprintln!("{}", String::from_utf8_lossy(&o.stdout));
    let mut import = Command::new("ctr");
    import
        .arg("--address")
        .arg(env("ICMP_GUARD_CONTAINERD_SOCK"))
        .args(["--namespace", "k8s.io", "images", "import"])
        .arg(&archive);
    let o = run_with_timeout(import, None, Duration::from_secs(120));
    assert!(o.status.success(), "ctr images import: {}", out(&o));
    let mut list = Command::new("ctr");
    list.arg("--address")
        .arg(env("ICMP_GUARD_CONTAINERD_SOCK"))
        .args(["--namespace", "k8s.io", "images", "ls", "-q"]);
    let listed = out(&run_with_timeout(list, None, Duration::from_secs(60)));
    assert!(
        listed.contains("docker.io/library/icmp-guard:latest"),
        "icmp-guard:latest is not in the cluster's containerd after the import: {listed}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// The deployment, deleted when dropped (a failed test must not leave the agent running).
struct Deployed {
    deleted: bool,
}

impl Deployed {
    fn apply() -> Deployed {
        let applied = kubectl(&["apply", "-f", manifests().to_str().unwrap()]);
        eprintln!("kubectl apply -f deploy/kubernetes/:\n{applied}");
        Deployed { deleted: false }
    }

    fn delete(&mut self) -> String {
        self.deleted = true;
        kubectl(&[
            "delete",
            "--wait=true",
            "--timeout=180s",
            "-f",
            manifests().to_str().unwrap(),
        ])
    }
}

impl Drop for Deployed {
    fn drop(&mut self) {
        if !self.deleted {
            let _ = kubectl_output(
                &[
                    "delete",
                    "--ignore-not-found",
                    "--wait=false",
                    "-f",
                    manifests().to_str().unwrap(),
                ],
                None,
            );
        }
    }
}

/// The pinned set the DaemonSet leaves on the node, removed at the end whatever happened.
struct Pins;

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = Command::new(agent_bin())
            .args(["unload", "--pin-dir", PIN_DIR])
            .output();
    }
}

fn agent_pod() -> String {
    let name = kubectl(&[
        "-n",
        NS,
        "get",
        "pod",
        "-l",
        "app.kubernetes.io/name=icmp-guard",
        "-o",
        "jsonpath={.items[0].metadata.name}",
    ]);
    assert!(!name.is_empty(), "no pod of the DaemonSet");
    name
}

/// The agent pod's log: its stderr (the agent's own log) and stdout (alerts, JSON lines).
fn agent_log(pod: &str) -> String {
    kubectl(&["-n", NS, "logs", pod])
}

fn agent_alerts(pod: &str) -> Vec<Value> {
    agent_log(pod)
        .lines()
        .filter(|l| l.starts_with('{'))
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn wait_alert(pod: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        if let Some(a) = agent_alerts(pod).into_iter().find(|a| pred(a)) {
            return a;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no alert for {what} in the agent pod's log within 30 s:\n{}",
            agent_log(pod)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn can_i(verb: &str, resource: &str) -> bool {
    let o = kubectl_output(&["auth", "can-i", verb, resource, "--as", SA], None);
    let answer = String::from_utf8_lossy(&o.stdout).trim().to_string();
    match answer.as_str() {
        "yes" => true,
        "no" => false,
        _ => panic!("kubectl auth can-i {verb} {resource}: {}", out(&o)),
    }
}

/// `icmp-guard probe --json` of the node's pinned set.
fn pinned() -> Value {
    let o = Command::new(agent_bin())
        .args(["probe", "--json", "--pin-dir", PIN_DIR])
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("icmp-guard probe --json: {e}: {}", out(&o)));
    v["pinned"].clone()
}

/// A strict host policy: hping3 of the node may open no ICMP or UDP socket.
const HOST_BLOCK_HPING3: &str = "apiVersion: security.kubearmor.com/v1
kind: KubeArmorHostPolicy
metadata:
  name: icmp-guard-test-host-block-hping3
spec:
  nodeSelector:
    matchLabels:
      kubernetes.io/os: linux
  severity: 8
  message: hping3 on the node
  network:
    matchProtocols:
    - protocol: icmp
      fromSource:
      - path: /usr/sbin/hping3
    - protocol: udp
      fromSource:
      - path: /usr/sbin/hping3
  action: Block
";

#[test]
fn the_daemonset_deploys_enforces_and_gives_every_socket_back() {
    common::require_root();
    for tool in [HOST_PING, HOST_HPING3] {
        common::require_tool(tool);
    }
    let t0 = Instant::now();
    let _pins = Pins;
    import_image();
    eprintln!("image imported after {:.1} s", t0.elapsed().as_secs_f64());

    // 1. Applied as it is, the DaemonSet's pod becomes Ready: its readiness probe is
    //    `icmp-guard probe --enforcing`, true once the pinned programs decide under a live
    //    agent.
    let mut deployed = Deployed::apply();
    kubectl(&[
        "-n",
        NS,
        "rollout",
        "status",
        "--timeout=180s",
        "daemonset/icmp-guard",
    ]);
    let pod = agent_pod();
    kubectl(&[
        "-n",
        NS,
        "wait",
        "--for=condition=Ready",
        "--timeout=120s",
        &format!("pod/{pod}"),
    ]);
    eprintln!(
        "agent pod {pod} Ready after {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    let log = agent_log(&pod);
    // Through pid 1's root, or (where pid 1 refuses even root's ptrace access, as on the
    // machine these tests run on) the root of the container runtime's shim.
    assert!(
        log.contains("host paths resolve through /proc/")
            && log.contains("the agent runs in a container"),
        "the agent in its pod does not say that it resolves host paths through the node's root:\n{log}"
    );
    let p = pinned();
    assert_eq!(p["enforcing"], true, "{p}");
    assert_eq!(p["agent_running"], true, "{p}");
    assert!(
        p["links"].as_array().unwrap().iter().any(|l| l == "cgroup"),
        "{p}"
    );

    // 2. The service account reads what the agent watches and nothing else.
    for (verb, resource) in [
        ("list", "pods"),
        ("watch", "pods"),
        ("watch", "namespaces"),
        ("watch", "nodes"),
        ("watch", "kubearmorpolicies.security.kubearmor.com"),
        ("watch", "kubearmorhostpolicies.security.kubearmor.com"),
        ("get", "replicasets.apps"),
        ("get", "jobs.batch"),
        ("create", "events.events.k8s.io"),
    ] {
        assert!(
            can_i(verb, resource),
            "the agent's account may not {verb} {resource}"
        );
    }
    for (verb, resource) in [
        ("get", "secrets"),
        ("list", "secrets"),
        ("create", "pods"),
        ("delete", "pods"),
        ("create", "kubearmorpolicies.security.kubearmor.com"),
        ("get", "configmaps"),
    ] {
        assert!(
            !can_i(verb, resource),
            "the agent's account may {verb} {resource}"
        );
    }

    // 3. The seed's scenario with the agent as this pod: hping3 refused with an alert, ping
    //    works, in the nginx Deployment of namespace default.
    seed_scenario(&pod);

    // 4. Host policies for the node's own programs, resolved in the node's root: a host
    //    program in a test cgroup under kubepods (the enforcer's attach point; never the
    //    machine's root) is refused under a strict host policy, the host's ping is not.
    let host = TestCgroup::at(kubepods().join(format!(
        "icmp-guard-test-{}-daemonset-host",
        std::process::id()
    )));
    let place = placement(&host);
    let hping = [HOST_HPING3, "--icmp", "-c", "1", "127.0.0.1"];
    let before = run_probe(&place, &hping);
    assert!(
        !refused(&before),
        "hping3 refused before the host policy: {}",
        text(&before)
    );
    let since = now();
    apply(HOST_BLOCK_HPING3);
    let start = Instant::now();
    let refused_out = loop {
        let o = run_probe(&place, &hping);
        if refused(&o) {
            break o;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the host policy did not refuse the node's hping3 within 30 s: {}\n{}",
            text(&o),
            agent_log(&pod)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!(
        "host policy in force after {:.2} s: {}",
        now() - since,
        text(&refused_out)
    );
    let a = wait_alert(&pod, "the node's hping3", |a| {
        s(a, "ProcessName") == HOST_HPING3 && s(a, "Type") == "MatchedHostPolicy"
    });
    assert_eq!(s(&a, "Action"), "Block", "{a}");
    assert_eq!(
        s(&a, "PolicyName"),
        "icmp-guard-test-host-block-hping3",
        "{a}"
    );
    let ping = run_probe(&place, &[HOST_PING, "-c", "1", "-W", "2", "127.0.0.1"]);
    assert!(
        ping.status.success() && !refused(&ping),
        "the node's ping under the host policies: {}",
        text(&ping)
    );

    // 5. `kubectl delete -f deploy/kubernetes/`: the agent stops on SIGTERM, the pinned
    //    programs' lease lapses after the stop grace, and every socket is allowed again.
    let deleted = deployed.delete();
    eprintln!("kubectl delete -f deploy/kubernetes/:\n{deleted}");
    let start = Instant::now();
    loop {
        let p = pinned();
        if p["enforcing"] == false {
            assert_eq!(p["agent_running"], false, "{p}");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the pinned set still enforces 30 s after the delete: {p}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let after = run_probe(&place, &hping);
    assert!(
        !refused(&after),
        "hping3 still refused after the delete: {}",
        text(&after)
    );
    eprintln!("whole test {:.1} s", t0.elapsed().as_secs_f64());
}

fn seed_scenario(agent: &str) {
    let ns = Namespace::existing("default");
    let seed = repo_file("policies/kubearmor/restrict-scanning-tools.yaml");
    let nginx = repo_file("xtask/k8s/smoke/nginx.yaml");
    let cleanup = |wait: &str| {
        for f in [&nginx, &seed] {
            let _ = kubectl_output(
                &[
                    "delete",
                    "--ignore-not-found",
                    wait,
                    "-f",
                    f.to_str().unwrap(),
                ],
                None,
            );
        }
    };
    cleanup("--wait=true");
    kubectl(&["apply", "-f", seed.to_str().unwrap()]);
    kubectl(&["apply", "-f", nginx.to_str().unwrap()]);
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
    let pod = ns.ready(&name);
    let cid = pod.container_id();
    wait_until(
        Duration::from_secs(30),
        "the agent pod reports the nginx container in force",
        || agent_log(agent).contains(&format!("container {} (", &cid[..12])),
    );
    let session = "hping3 127.0.0.1\nping -c 1 127.0.0.1\n";
    let o = ns.exec_in(pod.name(), &["bash"], Some(session));
    let t = out(&o);
    eprintln!("kubectl exec -i {} -- bash:\n{t}", pod.name());
    assert!(
        t.contains("[get_if_name] socket(AF_INET, SOCK_DGRAM, 0): Operation not permitted"),
        "{t}"
    );
    assert!(t.contains("1 packets transmitted, 1 received"), "{t}");
    let a = wait_alert(agent, "hping3 in nginx", |a| {
        s(a, "Source") == "/usr/sbin/hping3 127.0.0.1"
    });
    assert_eq!(s(&a, "Action"), "Block", "{a}");
    assert_eq!(s(&a, "PolicyName"), "DefaultPosture", "{a}");
    assert_eq!(s(&a, "ContainerID"), cid, "{a}");
    assert_eq!(s(&a, "PodName"), pod.name(), "{a}");
    assert_eq!(s(&a, "NamespaceName"), "default", "{a}");
    assert_eq!(a["Owner"]["Ref"], "Deployment", "{a}");
    let alerts = agent_alerts(agent);
    assert!(
        alerts
            .iter()
            .all(|a| s(a, "ProcessName") != "/usr/bin/ping" || s(a, "Action") != "Block"),
        "{alerts:?}"
    );

    // `icmp-guard test --pod`, from the agent's pod as an operator runs it: the probes run in
    // the nginx pod with its own executables, the alerts come from the agent's stream.
    let target = format!("default/{}", pod.name());
    let o = kubectl_output(
        &[
            "exec",
            "-n",
            NS,
            "ds/icmp-guard",
            "--",
            "icmp-guard",
            "test",
            "--pod",
            &target,
        ],
        None,
    );
    let t = out(&o);
    eprintln!("kubectl exec -n {NS} ds/icmp-guard -- icmp-guard test --pod {target}:\n{t}");
    assert!(o.status.success(), "icmp-guard test --pod failed:\n{t}");
    assert!(t.contains("PASS: "), "{t}");
    for row in ["hping3 ", "hping3 --icmp", "raw ICMP socket", "ping "] {
        let line = t
            .lines()
            .find(|l| l.starts_with(row))
            .unwrap_or_else(|| panic!("no {row:?} row:\n{t}"));
        assert!(
            line.trim_end().ends_with("pass") && !line.contains("skipped"),
            "the {row:?} row did not pass in the pod:\n{t}"
        );
    }
    assert!(
        t.contains(&format!("probes ran in pod {target} (container nginx,")),
        "{t}"
    );
    let log = agent_log(agent);
    assert!(
        log.contains("gave up CAP_SYS_ADMIN, CAP_SYS_CHROOT, CAP_NET_RAW"),
        "the agent kept the capabilities it holds only for `test --pod`:\n{log}"
    );
    cleanup("--wait=false");
}
