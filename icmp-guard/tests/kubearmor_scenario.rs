//! The KubeArmor "ICMP control" seed scenario, end to end: its policy file unchanged, a workload
//! labelled `app=nginx` in namespace `default`, hping3 refused with the seed's alert, ping
//! working. Plus posture scopes and hot reload. Runs on the host (cgroup enforcer) and in the VM
//! (LSM enforcer).

mod common;

use std::{path::PathBuf, time::Duration};

use common::*;
use serde_json::Value;

fn seed_policy() -> PathBuf {
    policies_dir().join("kubearmor/restrict-scanning-tools.yaml")
}

/// A parent cgroup the cgroup enforcer attaches to, with the nginx workload inside it.
struct Scene {
    parent: TestCgroup,
    nginx: PathBuf,
    config: PathBuf,
}

fn scene(name: &str, extra_config: &str) -> Scene {
    let parent = TestCgroup::new(name);
    let nginx = parent.path.join("nginx");
    let dir = scratch(name);
    let config = dir.join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "clusterName: 0-trust\n{extra_config}workloads:\n  - name: nginx\n    cgroup: {}\n    namespace: default\n    labels:\n      app: nginx\n    pod: nginx-77b4fdf86c-x7sdm\n    container: nginx\n",
            nginx.display()
        ),
    )
    .unwrap();
    Scene {
        parent,
        nginx,
        config,
    }
}

impl Scene {
    fn start(&self, policy: &std::path::Path) -> Agent {
        Agent::start(AgentSpec {
            policy: Some(policy),
            config: Some(&self.config),
            attach: &self.parent.path,
            extra: &[],
        })
    }

    fn place(&self) -> Placement {
        Placement::in_cgroup(&self.nginx)
    }
}

impl Drop for Scene {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.nginx);
    }
}

/// The fields of the seed's Expected Alert that do not depend on the environment.
fn assert_seed_fields(a: &Value, resource: &str, source: &str) {
    for (k, v) in [
        ("Type", "MatchedPolicy"),
        ("PolicyName", "DefaultPosture"),
        ("Action", "Block"),
        ("Operation", "Network"),
        ("Result", "Permission denied"),
        ("Data", "syscall=SYS_SOCKET"),
        ("Resource", resource),
        ("ProcessName", "/usr/sbin/hping3"),
        ("ParentProcessName", "/usr/bin/bash"),
        ("Source", source),
        ("Labels", "app=nginx"),
        ("NamespaceName", "default"),
        ("ClusterName", "0-trust"),
        ("PodName", "nginx-77b4fdf86c-x7sdm"),
        ("ContainerName", "nginx"),
    ] {
        assert_eq!(s(a, k), v, "field {k} of {a}");
    }
    assert!(
        a.get("Severity").is_none(),
        "a posture decision has no severity: {a}"
    );
}

#[test]
fn seed_hping3_resolver_socket_is_refused_with_the_seed_alert() {
    let sc = scene("seed-resolve", "");
    let agent = sc.start(&seed_policy());
    // The seed's own command, run from bash as in the seed, in a namespace with only loopback.
    let out = run_probe(
        &sc.place(),
        &[
            "/usr/bin/bash",
            "-c",
            &format!("{} www.google.com; exit $?", require_tool(HPING3)),
        ],
    );
    assert!(
        text(&out).contains("Unable to resolve"),
        "hping3 should fail at its resolver socket: {}",
        text(&out)
    );
    let a = agent.wait_alert("resolver socket", |a| s(a, "ProcessName") == HPING3);
    assert_seed_fields(
        &a,
        "domain=AF_INET type=SOCK_DGRAM|SOCK_NONBLOCK|SOCK_CLOEXEC protocol=0",
        "/usr/sbin/hping3 www.google.com",
    );
    // hping3 (through glibc) opens AF_UNIX sockets first: never decided, never alerted.
    let alerts = agent.settled_alerts();
    assert!(
        alerts.iter().all(|a| !s(a, "Resource").contains("AF_UNIX")),
        "{alerts:?}"
    );
    agent.stop();
}

#[test]
fn seed_hping3_localhost_fails_at_its_first_inet_socket() {
    let sc = scene("seed-local", "");
    let agent = sc.start(&seed_policy());
    let out = run_probe(
        &sc.place(),
        &[
            "/usr/bin/bash",
            "-c",
            &format!("{} 127.0.0.1; exit $?", require_tool(HPING3)),
        ],
    );
    assert!(
        text(&out).contains("socket(AF_INET, SOCK_DGRAM, 0): Permission denied")
            || text(&out).contains("socket(AF_INET, SOCK_DGRAM, 0): Operation not permitted"),
        "{}",
        text(&out)
    );
    let a = agent.wait_alert("hping3 127.0.0.1", |a| s(a, "ProcessName") == HPING3);
    assert_seed_fields(
        &a,
        "domain=AF_INET type=SOCK_DGRAM protocol=0",
        "/usr/sbin/hping3 127.0.0.1",
    );
    agent.stop();
}

#[test]
fn seed_ping_works_without_a_block_alert() {
    let sc = scene("seed-ping", "");
    let agent = sc.start(&seed_policy());
    let out = run_probe(
        &sc.place(),
        &[require_tool(PING), "-c", "1", "-W", "2", "127.0.0.1"],
    );
    assert!(out.status.success(), "{}", text(&out));
    let alerts = agent.settled_alerts();
    assert!(
        alerts.iter().all(|a| s(a, "Action") != "Block"),
        "{alerts:?}"
    );
    agent.stop();
}

const TCP_SERVER: &str = "import socket,sys\n\
try:\n    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\n\
except OSError as e:\n    print('REFUSED', e.errno); sys.exit(3)\n\
srv.bind(('127.0.0.1', 0)); srv.listen(1)\n\
cli = socket.create_connection(srv.getsockname()); conn, _ = srv.accept()\n\
cli.sendall(b'GET'); print('SERVED', conn.recv(3).decode())\n";

#[test]
fn posture_scope_protocol_leaves_the_workloads_tcp_alone() {
    let sc = scene("scope-protocol", "postureScope: protocol\n");
    let agent = sc.start(&seed_policy());
    let out = run_probe(&sc.place(), &[require_tool(PYTHON), "-c", TCP_SERVER]);
    assert!(text(&out).contains("SERVED GET"), "{}", text(&out));
    assert!(agent.settled_alerts().is_empty(), "{:?}", agent.alerts());
    agent.stop();
}

#[test]
fn posture_scope_workload_refuses_the_workloads_tcp_under_block() {
    let sc = scene(
        "scope-workload",
        "postureScope: workload\ndefaultNetworkPosture: block\n",
    );
    let agent = sc.start(&seed_policy());
    let out = run_probe(&sc.place(), &[require_tool(PYTHON), "-c", TCP_SERVER]);
    assert!(text(&out).contains("REFUSED 1"), "{}", text(&out));
    let a = agent.wait_alert("tcp under workload scope", |a| {
        a["EventData"]["Class"] == "tcp"
    });
    assert_eq!(s(&a, "PolicyName"), "DefaultPosture");
    assert_eq!(s(&a, "Action"), "Block");
    agent.stop();
}

#[test]
fn namespace_posture_audit_lets_through_and_alerts() {
    let sc = scene(
        "ns-audit",
        "namespaces:\n  default:\n    networkPosture: audit\n",
    );
    let agent = sc.start(&seed_policy());
    let out = run_probe(
        &sc.place(),
        &[
            require_tool(PYTHON),
            "-c",
            &py_socket("AF_INET", "SOCK_DGRAM", "0"),
        ],
    );
    assert!(text(&out).contains("OPENED"), "{}", text(&out));
    let a = agent.wait_alert("audit posture", |a| s(a, "PolicyName") == "DefaultPosture");
    assert_eq!(s(&a, "Action"), "Audit");
    assert_eq!(s(&a, "Result"), "Passed");
    agent.stop();
}

#[test]
fn processes_outside_the_workload_are_untouched_by_its_policy() {
    let sc = scene("outside", "");
    let agent = sc.start(&seed_policy());
    // Same attach point, but not in the nginx cgroup: the host has no policy.
    let out = run_probe(
        &Placement::in_cgroup(&sc.parent.path),
        &[
            require_tool(PYTHON),
            "-c",
            &py_socket("AF_INET", "SOCK_RAW", "1"),
        ],
    );
    assert!(text(&out).contains("OPENED"), "{}", text(&out));
    assert!(agent.settled_alerts().is_empty(), "{:?}", agent.alerts());
    agent.stop();
}

#[test]
fn a_child_cgroup_of_the_workload_belongs_to_it() {
    let sc = scene("child", "");
    let agent = sc.start(&seed_policy());
    let child = TestCgroup::at(sc.nginx.join("worker"));
    let out = run_probe(
        &Placement::in_cgroup(&child.path),
        &[
            require_tool(PYTHON),
            "-c",
            &py_socket("AF_INET", "SOCK_DGRAM", "0"),
        ],
    );
    assert!(text(&out).contains("REFUSED 1"), "{}", text(&out));
    let a = agent.wait_alert("child cgroup", |a| s(a, "Labels") == "app=nginx");
    assert_eq!(s(&a, "Action"), "Block");
    agent.stop();
}

#[test]
fn block_rules_are_decided_in_the_kernel_with_their_metadata() {
    let sc = scene("block-rule", "");
    let dir = scratch("block-rule");
    let policy = dir.join("policy.yaml");
    std::fs::write(
        &policy,
        "apiVersion: security.kubearmor.com/v1\nkind: KubeArmorPolicy\nmetadata:\n  name: no-raw\n  namespace: default\nspec:\n  selector:\n    matchLabels:\n      app: nginx\n  network:\n    matchProtocols:\n    - protocol: raw\n      severity: 7\n      tags: [MITRE, T1046]\n      message: packet forging\n    - protocol: udp\n      action: Audit\n  action: Block\n",
    )
    .unwrap();
    let agent = sc.start(&policy);
    let out = run_probe(
        &sc.place(),
        &[
            require_tool(PYTHON),
            "-c",
            &format!(
                "{}{}",
                py_socket("AF_INET", "SOCK_DGRAM", "0").replace("sys.exit(3)", "pass"),
                py_socket("AF_INET", "SOCK_RAW", "255")
            ),
        ],
    );
    assert!(
        text(&out).contains("OPENED"),
        "the udp socket is audited, not refused: {}",
        text(&out)
    );
    assert!(text(&out).contains("REFUSED 1"), "{}", text(&out));
    let raw = agent.wait_alert("raw block", |a| a["EventData"]["Class"] == "raw");
    assert_eq!(s(&raw, "PolicyName"), "no-raw");
    assert_eq!(s(&raw, "Severity"), "7");
    assert_eq!(s(&raw, "Tags"), "MITRE,T1046");
    assert_eq!(raw["ATags"], serde_json::json!(["MITRE", "T1046"]));
    assert_eq!(s(&raw, "Message"), "packet forging");
    let udp = agent.wait_alert("udp audit", |a| a["EventData"]["Class"] == "udp");
    assert_eq!(s(&udp, "Action"), "Audit");
    assert_eq!(s(&udp, "Result"), "Passed");
    agent.stop();
}

#[test]
fn hot_reload_applies_valid_changes_and_refuses_invalid_ones() {
    let sc = scene("reload", "");
    let dir = scratch("reload");
    let policy = dir.join("policy.yaml");
    std::fs::copy(seed_policy(), &policy).unwrap();
    let agent = sc.start(&policy);
    let udp = py_socket("AF_INET", "SOCK_DGRAM", "0");
    let out = run_probe(&sc.place(), &[require_tool(PYTHON), "-c", &udp]);
    assert!(text(&out).contains("REFUSED 1"), "{}", text(&out));

    // An invalid change is refused and the old policy stays in force.
    std::fs::write(&policy, "apiVersion: security.kubearmor.com/v1\nkind: KubeArmorPolicy\nmetadata:\n  name: broken\nspec:\n  network:\n    matchProtocols:\n    - protocol: icmpp\n").unwrap();
    agent.wait_log("policy reload refused", Duration::from_secs(10));
    let out = run_probe(&sc.place(), &[PYTHON, "-c", &udp]);
    assert!(
        text(&out).contains("REFUSED 1"),
        "old policy must stay: {}",
        text(&out)
    );

    // A valid change that also allows udp from python is applied.
    let python = std::fs::canonicalize(PYTHON).unwrap();
    let allowed = std::fs::read_to_string(seed_policy()).unwrap().replace(
        "    - protocol: udp\n      fromSource:\n      - path: /usr/bin/ping\n",
        &format!(
            "    - protocol: udp\n      fromSource:\n      - path: /usr/bin/ping\n      - path: {}\n",
            python.display()
        ),
    );
    assert!(allowed.contains(python.to_str().unwrap()));
    std::fs::write(&policy, allowed).unwrap();
    agent.wait_log("policy change applied", Duration::from_secs(10));
    let out = run_probe(&sc.place(), &[PYTHON, "-c", &udp]);
    assert!(text(&out).contains("OPENED"), "{}", text(&out));
    assert_eq!(agent.log_count("policy reload refused"), 1);
    agent.stop();
}

fn icmp_guard_test(args: &[&str]) -> std::process::Output {
    require_root();
    std::process::Command::new(agent_bin())
        .arg("test")
        .arg("--enforcer")
        .arg(enforcer())
        .args(args)
        .output()
        .expect("running icmp-guard test")
}

#[test]
fn icmp_guard_test_prints_an_all_pass_table_for_the_seed_scenario() {
    let out = icmp_guard_test(&[]);
    let t = text(&out);
    eprintln!("{t}");
    assert!(out.status.success(), "{t}");
    for probe in [
        "hping3 ",
        "hping3 --icmp",
        "nmap -sn",
        "nmap -sS",
        "raw ICMP socket",
        "ping ",
    ] {
        let row = t
            .lines()
            .find(|l| l.starts_with(probe))
            .unwrap_or_else(|| panic!("no row {probe}: {t}"));
        assert!(row.contains("pass"), "{row}");
    }
    assert!(t.contains("PASS: 6 of 6 rows"), "{t}");
}

#[test]
fn icmp_guard_test_fails_when_the_policy_only_audits() {
    // The embedded default only audits raw sockets: hping3 gets through, and `test` must say so.
    let dir = scratch("audit-only");
    let policy = dir.join("audit.yaml");
    std::fs::write(
        &policy,
        "apiVersion: security.kubearmor.com/v1\nkind: KubeArmorHostPolicy\nmetadata:\n  name: audit-only\nspec:\n  nodeSelector:\n    matchLabels:\n      kubernetes.io/os: linux\n  network:\n    matchProtocols:\n    - protocol: raw,icmp\n      fromSource:\n      - path: /usr/sbin/hping3\n  action: Audit\n",
    )
    .unwrap();
    let out = icmp_guard_test(&["--policy", policy.to_str().unwrap()]);
    let t = text(&out);
    eprintln!("{t}");
    assert_eq!(out.status.code(), Some(1), "{t}");
    let row = t.lines().find(|l| l.starts_with("hping3 ")).unwrap();
    assert!(row.contains("FAIL: the probe succeeded"), "{row}");
}

#[test]
fn icmp_guard_test_reads_a_running_agents_alerts() {
    let cg = TestCgroup::new("running");
    let agent = Agent::start(AgentSpec {
        policy: Some(&policies_dir().join("host/strict.yaml")),
        config: None,
        attach: &cg.path,
        extra: &[],
    });
    let probes = cg.path.join("probes");
    let out = icmp_guard_test(&[
        "--alerts",
        agent.alerts.to_str().unwrap(),
        "--cgroup",
        probes.to_str().unwrap(),
    ]);
    let t = text(&out);
    eprintln!("{t}");
    assert!(out.status.success(), "{t}");
    assert!(t.contains("PASS: 6 of 6 rows"), "{t}");
    let _ = std::fs::remove_dir(&probes);
    agent.stop();
}
