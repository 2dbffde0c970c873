//! The inbound ICMP guard end to end, on the real kernel: the agent runs inside a network
//! namespace of its own (the "node"), guards the veth that joins it to a "peer" namespace, and
//! real tools send from the peer: ping, trafgen (floods), scapy (errors, NDP, malformed frames),
//! python sockets (TCP). Nothing leaves the machine: every address lives in the test's own
//! namespaces, which are deleted at the end.
//!
//! Never skipped: without root, trafgen (Debian `netsniff-ng`) or scapy (`python3-scapy`) these
//! tests fail and say what is missing (`scripts/setup.sh` installs them).

mod common;

use std::{
    os::fd::AsRawFd,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use common::*;
use serde_json::Value;

const TRAFGEN: &str = "/usr/sbin/trafgen";
const SYSTEM_PYTHON: &str = "/usr/bin/python3";

static SEQ: AtomicUsize = AtomicUsize::new(0);

fn packets_py() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/guard/packets.py"
    ))
}

fn require_scapy() {
    require_tool(SYSTEM_PYTHON);
    let out = Command::new(SYSTEM_PYTHON)
        .args(["-c", "import scapy.all"])
        .output()
        .expect("running python3");
    assert!(
        out.status.success(),
        "scapy is missing for {SYSTEM_PYTHON}: apt-get install python3-scapy (scripts/setup.sh \
         does)"
    );
}

fn require_trafgen() {
    assert!(
        Path::new(TRAFGEN).exists(),
        "{TRAFGEN} is missing: apt-get install netsniff-ng (scripts/setup.sh does)"
    );
}

fn run(argv: &[&str]) -> Output {
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    assert!(
        out.status.success(),
        "{argv:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn in_ns(ns: &str, argv: &[&str]) -> Output {
    let mut full = vec!["ip", "netns", "exec", ns];
    full.extend_from_slice(argv);
    Command::new(full[0])
        .args(&full[1..])
        .output()
        .unwrap_or_else(|e| panic!("{full:?}: {e}"))
}

fn in_ns_ok(ns: &str, argv: &[&str]) -> Output {
    let out = in_ns(ns, argv);
    assert!(
        out.status.success(),
        "{argv:?} in {ns} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A network namespace, deleted (with its interfaces) when dropped.
struct Netns(String);

impl Netns {
    fn new(name: String) -> Self {
        run(&["ip", "netns", "add", &name]);
        in_ns_ok(&name, &["ip", "link", "set", "lo", "up"]);
        Netns(name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Node and peer joined by a veth pair. The node has 10.99.0.2 and fd99::2; the peer has a
/// trusted address (10.99.0.1, fd99::1) and an untrusted one (10.99.0.3, fd99::3).
struct Topo {
    node: Netns,
    peer: Netns,
    node_if: String,
    peer_if: String,
    node_mac: String,
}

const NODE: &str = "10.99.0.2";
const TRUSTED: &str = "10.99.0.1";
const UNTRUSTED: &str = "10.99.0.3";
const NODE6: &str = "fd99::2";
const TRUSTED6: &str = "fd99::1";
const UNTRUSTED6: &str = "fd99::3";

impl Topo {
    fn new(ipv6: bool) -> Topo {
        require_root();
        let id = format!(
            "{}{}",
            std::process::id() % 100_000,
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let node = Netns::new(format!("icmpg-guard-{id}-node"));
        let peer = Netns::new(format!("icmpg-guard-{id}-peer"));
        let node_if = format!("gd{id}n");
        let peer_if = format!("gd{id}p");
        run(&[
            "ip", "link", "add", &node_if, "netns", &node.0, "type", "veth", "peer", "name",
            &peer_if, "netns", &peer.0,
        ]);
        for (ns, ifname, addrs, addrs6) in [
            (&node.0, &node_if, vec![NODE], vec![NODE6]),
            (
                &peer.0,
                &peer_if,
                vec![TRUSTED, UNTRUSTED],
                vec![TRUSTED6, UNTRUSTED6],
            ),
        ] {
            if !ipv6 {
                // Without IPv6 the link carries no MLD or router solicitations, so the counts
                // below are exactly the test's packets.
                in_ns_ok(
                    ns,
                    &[
                        "sysctl",
                        "-qw",
                        &format!("net.ipv6.conf.{ifname}.disable_ipv6=1"),
                    ],
                );
            }
            for a in addrs {
                in_ns_ok(
                    ns,
                    &["ip", "addr", "add", &format!("{a}/24"), "dev", ifname],
                );
            }
            if ipv6 {
                for a in addrs6 {
                    in_ns_ok(
                        ns,
                        &[
                            "ip",
                            "addr",
                            "add",
                            &format!("{a}/64"),
                            "dev",
                            ifname,
                            "nodad",
                        ],
                    );
                }
            }
            in_ns_ok(ns, &["ip", "link", "set", ifname, "up"]);
        }
        let node_mac = String::from_utf8_lossy(
            &in_ns_ok(
                &node.0,
                &["cat", &format!("/sys/class/net/{node_if}/address")],
            )
            .stdout,
        )
        .trim()
        .to_string();
        Topo {
            node,
            peer,
            node_if,
            peer_if,
            node_mac,
        }
    }

    fn ping_from(&self, src: &str, dst: &str, count: u32) -> Output {
        in_ns(
            &self.peer.0,
            &[
                require_tool(PING),
                "-c",
                &count.to_string(),
                "-i",
                "0.2",
                "-W",
                "1",
                "-I",
                src,
                dst,
            ],
        )
    }

    fn packets(&self, args: &[&str]) -> Output {
        require_scapy();
        let script = packets_py();
        let mut argv = vec![
            SYSTEM_PYTHON,
            script.to_str().unwrap(),
            &self.peer_if,
            &self.node_mac,
        ];
        argv.extend_from_slice(args);
        in_ns(&self.peer.0, &argv)
    }

    /// Starts the agent inside the node namespace with `policy` and `config`.
    fn agent(&self, policy: &Path, config: Option<&Path>, cg: &TestCgroup) -> Agent {
        let netns = std::fs::File::open(format!("/run/netns/{}", self.node.0)).unwrap();
        Agent::start_with(
            AgentSpec {
                policy: Some(policy),
                config,
                attach: &cg.path,
                extra: &[],
            },
            move |cmd| {
                let fd = netns.as_raw_fd();
                // SAFETY: setns on a descriptor this process holds open; async-signal-safe.
                unsafe {
                    cmd.pre_exec(move || {
                        if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        Ok(())
                    });
                }
                // The descriptor must outlive the fork; the agent process does not need it.
                std::mem::forget(netns);
            },
        )
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// A policy that allows ICMP (and ICMPv6) from the trusted addresses only.
fn trust_policy(trusted: &[&str]) -> String {
    let from: String = trusted
        .iter()
        .map(|c| format!("        - ipBlock:\n            cidr: \"{c}\"\n"))
        .collect();
    format!(
        "apiVersion: security.kubearmor.com/v1\n\
         kind: KubeArmorNetworkPolicy\n\
         metadata:\n  name: trusted-icmp\n\
         spec:\n  nodeSelector:\n    matchLabels:\n      kubernetes.io/os: linux\n  \
         severity: 4\n  message: untrusted ICMP\n  ingress:\n    - from:\n{from}      \
         ports:\n        - protocol: ICMP\n        - protocol: ICMPv6\n      action: Allow\n"
    )
}

/// The kernel counters the agent logs when the guard stops.
#[derive(Debug, Default)]
struct StopCounts {
    allowed: u64,
    pmtud: u64,
    ndp: u64,
    own_replies: u64,
    own_errors: u64,
    dropped: u64,
    audited: u64,
}

fn number_after(line: &str, key: &str) -> u64 {
    let i = line
        .find(key)
        .unwrap_or_else(|| panic!("no `{key}` in {line}"));
    line[i + key.len()..]
        .trim_start()
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

fn stop_counts(agent: Agent) -> StopCounts {
    let log = agent.log.clone();
    agent.stop();
    std::thread::sleep(Duration::from_millis(200));
    let lines = log.lock().unwrap();
    let line = lines
        .iter()
        .find(|l| l.contains("inbound ICMP guard stopped; kernel counters"))
        .unwrap_or_else(|| {
            panic!(
                "no guard counters in the agent's log:\n{}",
                lines.join("\n")
            )
        });
    StopCounts {
        allowed: number_after(line, "(allowed"),
        pmtud: number_after(line, "PMTUD"),
        ndp: number_after(line, "neighbour discovery"),
        own_replies: number_after(line, "own replies"),
        own_errors: number_after(line, "own errors"),
        dropped: number_after(line, "dropped"),
        audited: number_after(line, "audited"),
    }
}

/// Every guard summary written so far: (dropped, audited, top sources).
fn summaries(alerts: &[Value]) -> Vec<&Value> {
    alerts
        .iter()
        .filter(|a| s(a, "Type") == "SystemEvent" && s(a, "Operation") == "NetworkFirewall")
        .collect()
}

fn event_u64(a: &Value, key: &str) -> u64 {
    a["EventData"][key]
        .as_str()
        .unwrap_or_else(|| panic!("no EventData.{key} in {a}"))
        .parse()
        .unwrap()
}

fn guard_alerts(alerts: &[Value]) -> Vec<&Value> {
    alerts
        .iter()
        .filter(|a| s(a, "Type") == "MatchedNetworkPolicy")
        .collect()
}

fn received(o: &Output) -> u32 {
    let t = String::from_utf8_lossy(&o.stdout);
    t.split(" received")
        .next()
        .and_then(|s| s.rsplit(", ").next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no ping summary in {t}"))
}

#[test]
fn trusted_ping_answered_untrusted_dropped_with_alert_and_policy_reloads() {
    let topo = Topo::new(false);
    let cg = TestCgroup::new("guard-basic");
    let dir = scratch("guard-basic");
    let policies = dir.join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    let policy = write(&policies, "trusted.yaml", &trust_policy(&["10.99.0.1/32"]));
    let agent = topo.agent(&policies, None, &cg);
    let line = agent.wait_log("inbound ICMP guard on", Duration::from_secs(10));
    assert!(line.contains(&topo.node_if), "{line}");
    assert!(line.contains("native XDP"), "veth takes native XDP: {line}");

    let ok = topo.ping_from(TRUSTED, NODE, 3);
    assert_eq!(received(&ok), 3, "{}", String::from_utf8_lossy(&ok.stdout));
    let dropped = topo.ping_from(UNTRUSTED, NODE, 3);
    assert_eq!(received(&dropped), 0, "the untrusted source was answered");

    let alert = agent.wait_alert("the untrusted echo request", |a| {
        s(a, "Type") == "MatchedNetworkPolicy" && a["EventData"]["SourceIP"] == UNTRUSTED
    });
    assert_eq!(s(&alert, "Operation"), "NetworkFirewall");
    assert_eq!(s(&alert, "Resource"), "INGRESS");
    assert_eq!(
        s(&alert, "Data"),
        format!("SourceIP={UNTRUSTED} DestinationIP={NODE} Protocol=ICMP ICMPType=8 ICMPCode=0")
    );
    for (k, v) in [
        ("SourceIP", UNTRUSTED),
        ("DestinationIP", NODE),
        ("Protocol", "ICMP"),
        ("ICMPType", "8"),
        ("ICMPCode", "0"),
        ("Reason", "posture"),
    ] {
        assert_eq!(alert["EventData"][k], v, "{alert}");
    }
    assert_eq!(alert["EventData"]["Interface"], topo.node_if.as_str());
    assert_eq!(s(&alert, "Action"), "Block");
    assert_eq!(s(&alert, "Result"), "Dropped");
    assert_eq!(s(&alert, "Enforcer"), "XDP");
    assert_eq!(s(&alert, "PolicyName"), "DefaultPosture");
    let all = agent.settled_alerts();
    assert!(
        guard_alerts(&all)
            .iter()
            .all(|a| a["EventData"]["SourceIP"] != TRUSTED),
        "the trusted source was alerted"
    );

    // Hot reload: trusting the other address lets its ping through, atomically.
    std::fs::write(&policy, trust_policy(&["10.99.0.0/24"])).unwrap();
    agent.wait_log("policy change applied", Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(500));
    let now_ok = topo.ping_from(UNTRUSTED, NODE, 2);
    assert_eq!(received(&now_ok), 2, "the reloaded policy did not apply");

    // A broken change is refused whole; the last good policy stays in force.
    std::fs::write(&policy, trust_policy(&["10.99.0.0/33"])).unwrap();
    agent.wait_log("policy reload refused", Duration::from_secs(10));
    assert_eq!(received(&topo.ping_from(UNTRUSTED, NODE, 1)), 1);

    let counts = stop_counts(agent);
    assert_eq!(counts.dropped, 3, "{counts:?}");
    assert_eq!(counts.allowed, 3 + 2 + 1, "{counts:?}");
    // Nothing is left on the interface.
    let link = in_ns_ok(&topo.node.0, &["ip", "link", "show", &topo.node_if]);
    assert!(
        !String::from_utf8_lossy(&link.stdout).contains("xdp"),
        "XDP still attached after stop"
    );
}

#[test]
fn audit_mode_drops_nothing_and_alerts() {
    let topo = Topo::new(false);
    let cg = TestCgroup::new("guard-audit");
    let dir = scratch("guard-audit");
    let policy = write(&dir, "p.yaml", &trust_policy(&["10.99.0.1/32"]));
    let config = write(&dir, "c.yaml", "guard:\n  posture: audit\n");
    let agent = topo.agent(&policy, Some(&config), &cg);
    let out = topo.ping_from(UNTRUSTED, NODE, 3);
    assert_eq!(received(&out), 3, "audit posture dropped a packet");
    let alert = agent.wait_alert("the audited echo request", |a| {
        s(a, "Type") == "MatchedNetworkPolicy" && a["EventData"]["SourceIP"] == UNTRUSTED
    });
    assert_eq!(s(&alert, "Action"), "Audit");
    assert_eq!(s(&alert, "Result"), "Passed");
    let alerts = agent.settled_alerts();
    let sums = summaries(&alerts);
    assert!(!sums.is_empty(), "no summary");
    let audited: u64 = sums.iter().map(|a| event_u64(a, "Audited")).sum();
    let counts = stop_counts(agent);
    assert_eq!((counts.dropped, counts.audited), (0, 3), "{counts:?}");
    assert!(audited <= 3);
}

#[test]
fn pmtud_from_an_untrusted_router_reaches_the_stack() {
    // node ── router ──(MTU 1280)── far. The node trusts nobody: the router's frag-needed must
    // still get through, or the TCP transfer below black-holes.
    let topo = Topo::new(false);
    let id = format!(
        "{}{}",
        std::process::id() % 100_000,
        SEQ.fetch_add(1, Ordering::Relaxed)
    );
    let far = Netns::new(format!("icmpg-guard-{id}-far"));
    let (r_if, f_if) = (format!("gd{id}r"), format!("gd{id}f"));
    let router = &topo.peer.0;
    run(&[
        "ip", "link", "add", &r_if, "netns", router, "type", "veth", "peer", "name", &f_if,
        "netns", &far.0,
    ]);
    in_ns_ok(router, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    in_ns_ok(router, &["ip", "addr", "add", "10.98.0.1/24", "dev", &r_if]);
    in_ns_ok(router, &["ip", "link", "set", &r_if, "mtu", "1280", "up"]);
    in_ns_ok(&far.0, &["ip", "addr", "add", "10.98.0.2/24", "dev", &f_if]);
    // The far end keeps MTU 1500, so it advertises a full-size MSS and the node sends 1500-byte
    // segments that only the router's 1280-byte link refuses: PMTUD has to work.
    in_ns_ok(&far.0, &["ip", "link", "set", &f_if, "up"]);
    in_ns_ok(
        &far.0,
        &["ip", "route", "add", "default", "via", "10.98.0.1"],
    );
    in_ns_ok(
        &topo.node.0,
        &["ip", "route", "add", "10.98.0.0/24", "via", UNTRUSTED],
    );
    let cg = TestCgroup::new("guard-pmtud");
    let dir = scratch("guard-pmtud");
    let policy = write(&dir, "p.yaml", &trust_policy(&["192.0.2.1/32"]));
    let agent = topo.agent(&policy, None, &cg);
    let server = Command::new("ip")
        .args(["netns", "exec", &far.0, SYSTEM_PYTHON, "-c"])
        .arg(
            "import socket\n\
             s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
             s.bind(('10.98.0.2', 5001)); s.listen(1); print('ready', flush=True)\n\
             c,_=s.accept(); n=0\n\
             while True:\n    b=c.recv(65536)\n    if not b: break\n    n+=len(b)\n\
             c.sendall(str(n).encode()); c.close()\n",
        )
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let client = in_ns(
        &topo.node.0,
        &[
            SYSTEM_PYTHON,
            "-c",
            "import socket\n\
             c=socket.create_connection(('10.98.0.2', 5001), timeout=10)\n\
             c.sendall(b'x'*300000); c.shutdown(socket.SHUT_WR)\n\
             print(c.recv(100).decode())\n",
        ],
    );
    let _ = wait_with_timeout(server, Duration::from_secs(15), &["tcp server"]);
    assert!(
        client.status.success() && String::from_utf8_lossy(&client.stdout).trim() == "300000",
        "the TCP transfer across the smaller MTU did not complete: {}{}",
        String::from_utf8_lossy(&client.stdout),
        String::from_utf8_lossy(&client.stderr)
    );
    let counts = stop_counts(agent);
    assert!(
        counts.pmtud >= 1,
        "no frag-needed reached the guard: {counts:?}"
    );
    assert_eq!(counts.dropped, 0, "{counts:?}");
}

#[test]
fn ipv6_neighbour_discovery_keeps_working_with_icmpv6_guarded() {
    require_scapy();
    let topo = Topo::new(true);
    let cg = TestCgroup::new("guard-ndp");
    let dir = scratch("guard-ndp");
    // ICMPv6 is allow-listed to fd99::1 only: fd99::3 is untrusted.
    let policy = write(
        &dir,
        "p.yaml",
        &trust_policy(&["fd99::1/128", "10.99.0.1/32"]),
    );
    let agent = topo.agent(&policy, None, &cg);
    // The untrusted address resolves the node (a solicitation from scapy, answered by the
    // node's kernel) ...
    let ns = topo.packets(&["ns", UNTRUSTED6, NODE6]);
    assert!(
        ns.status.success(),
        "no neighbour advertisement for an untrusted solicitation: {}",
        String::from_utf8_lossy(&ns.stderr)
    );
    // ... and reaches a TCP service over IPv6, which needs neighbour discovery both ways.
    in_ns(&topo.peer.0, &["ip", "-6", "neigh", "flush", "all"]);
    in_ns(&topo.node.0, &["ip", "-6", "neigh", "flush", "all"]);
    let server = Command::new("ip")
        .args(["netns", "exec", &topo.node.0, SYSTEM_PYTHON, "-c"])
        .arg(
            "import socket\n\
             s=socket.socket(socket.AF_INET6); s.bind(('fd99::2', 5002)); s.listen(1)\n\
             c,_=s.accept(); c.sendall(b'hello'); c.close()\n",
        )
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let client = in_ns(
        &topo.peer.0,
        &[
            SYSTEM_PYTHON,
            "-c",
            "import socket\n\
             c=socket.socket(socket.AF_INET6); c.settimeout(10); c.bind(('fd99::3', 0))\n\
             c.connect(('fd99::2', 5002)); print(c.recv(10).decode())\n",
        ],
    );
    let _ = wait_with_timeout(server, Duration::from_secs(15), &["tcp6 server"]);
    assert_eq!(
        String::from_utf8_lossy(&client.stdout).trim(),
        "hello",
        "{}",
        String::from_utf8_lossy(&client.stderr)
    );
    // The trusted IPv6 source pings; the untrusted one does not get through.
    assert_eq!(received(&topo.ping_from(TRUSTED6, NODE6, 2)), 2);
    assert_eq!(received(&topo.ping_from(UNTRUSTED6, NODE6, 2)), 0);
    let counts = stop_counts(agent);
    assert!(
        counts.ndp >= 2,
        "neighbour discovery was not seen: {counts:?}"
    );
    assert_eq!(counts.dropped, 2, "{counts:?}");
}

#[test]
fn the_nodes_own_traffic_and_tcp_services_are_untouched() {
    require_scapy();
    let topo = Topo::new(false);
    let cg = TestCgroup::new("guard-own");
    let dir = scratch("guard-own");
    let policy = write(&dir, "p.yaml", &trust_policy(&["192.0.2.1/32"]));
    let agent = topo.agent(&policy, None, &cg);
    // The node pings the untrusted host: its replies pass.
    let out = in_ns(
        &topo.node.0,
        &[PING, "-c", "3", "-i", "0.2", "-W", "1", UNTRUSTED],
    );
    assert_eq!(
        received(&out),
        3,
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // An error about a UDP flow the node sent passes; the same error about a flow it never sent
    // is dropped.
    let udp = in_ns(
        &topo.node.0,
        &[
            SYSTEM_PYTHON,
            "-c",
            "import socket\n\
             s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('10.99.0.2', 40001))\n\
             s.sendto(b'q', ('10.99.0.3', 53))\n",
        ],
    );
    assert!(udp.status.success());
    std::thread::sleep(Duration::from_millis(300));
    let own = topo.packets(&["error", UNTRUSTED, NODE, NODE, UNTRUSTED, "40001", "53"]);
    assert!(
        own.status.success(),
        "{}",
        String::from_utf8_lossy(&own.stderr)
    );
    let foreign = topo.packets(&["error", UNTRUSTED, NODE, NODE, UNTRUSTED, "40002", "53"]);
    assert!(foreign.status.success());
    // A TCP service stays reachable from the untrusted source.
    let server = Command::new("ip")
        .args(["netns", "exec", &topo.node.0, SYSTEM_PYTHON, "-c"])
        .arg(
            "import socket\n\
             s=socket.socket(); s.bind(('10.99.0.2', 5003)); s.listen(1)\n\
             c,_=s.accept(); c.sendall(b'hello'); c.close()\n",
        )
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let client = in_ns(
        &topo.peer.0,
        &[
            SYSTEM_PYTHON,
            "-c",
            "import socket\n\
             c=socket.socket(); c.settimeout(10); c.bind(('10.99.0.3', 0))\n\
             c.connect(('10.99.0.2', 5003)); print(c.recv(10).decode())\n",
        ],
    );
    let _ = wait_with_timeout(server, Duration::from_secs(15), &["tcp server"]);
    assert_eq!(String::from_utf8_lossy(&client.stdout).trim(), "hello");
    let counts = stop_counts(agent);
    assert_eq!(counts.own_replies, 3, "{counts:?}");
    // scapy's, and the peer kernel's own port unreachable for the closed port 53.
    assert_eq!(counts.own_errors, 2, "{counts:?}");
    assert_eq!(
        counts.dropped, 1,
        "only the foreign error is dropped: {counts:?}"
    );
}

/// trafgen's packet description of an echo request from `src` to the node.
fn trafgen_echo(topo: &Topo, src: &str) -> String {
    let peer_mac = String::from_utf8_lossy(
        &in_ns_ok(
            &topo.peer.0,
            &["cat", &format!("/sys/class/net/{}/address", topo.peer_if)],
        )
        .stdout,
    )
    .trim()
    .to_string();
    format!(
        "{{ eth(da={}, sa={peer_mac}), ipv4(saddr={src}, daddr={NODE}, ttl=64), \
         icmp4(type=8, code=0, id=0x1234, seq=dinc()), fill(0x41, 18) }}",
        topo.node_mac
    )
}

fn trafgen(topo: &Topo, conf: &Path, packets: u32, rate_pps: u32) {
    require_trafgen();
    let out = in_ns(
        &topo.peer.0,
        &[
            TRAFGEN,
            "--dev",
            &topo.peer_if,
            "--conf",
            conf.to_str().unwrap(),
            "--cpus",
            "1",
            "-n",
            &packets.to_string(),
            "-b",
            &format!("{rate_pps}pps"),
            "--no-sock-mem",
        ],
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains(&format!("{packets} packets outgoing")),
        "trafgen did not send {packets} packets: {text}"
    );
}

#[test]
fn a_trusted_flood_is_rate_limited_and_every_packet_is_accounted_for() {
    let topo = Topo::new(false);
    let cg = TestCgroup::new("guard-rate");
    let dir = scratch("guard-rate");
    let policy = write(&dir, "p.yaml", &trust_policy(&["10.99.0.1/32"]));
    let config = write(
        &dir,
        "c.yaml",
        "guard:\n  ratePerSecond: 100\n  burst: 20\n  alertsPerSecond: 5\n",
    );
    let agent = topo.agent(&policy, Some(&config), &cg);
    let conf = write(&dir, "trusted.cfg", &trafgen_echo(&topo, TRUSTED));
    let untrusted = write(&dir, "untrusted.cfg", &trafgen_echo(&topo, UNTRUSTED));
    let started = Instant::now();
    trafgen(&topo, &conf, 4000, 4000);
    let seconds = started.elapsed().as_secs_f64();
    trafgen(&topo, &untrusted, 1000, 10000);
    std::thread::sleep(Duration::from_millis(1500));
    let alerts_path = agent.alerts.clone();
    let counts = stop_counts(agent);
    assert_eq!(counts.allowed + counts.dropped, 5000, "{counts:?}");
    // 20 at once, then 100 per second for as long as the flood lasted (with slack for timing).
    let most = 20 + (100.0 * (seconds + 0.5)) as u64;
    assert!(
        counts.allowed >= 20 && counts.allowed <= most,
        "allowed {} of the trusted flood; expected between 20 and {most}",
        counts.allowed
    );
    // Every dropped packet is in a summary (the last one is written at stop), under its source;
    // per-packet alerts stayed within their rate.
    let alerts = read_alerts(&alerts_path);
    let sums = summaries(&alerts);
    let dropped: u64 = sums.iter().map(|a| event_u64(a, "Dropped")).sum();
    assert_eq!(
        dropped, counts.dropped,
        "summaries do not add up to the drops"
    );
    let from = |src: &str| -> u64 {
        sums.iter()
            .flat_map(|a| {
                a["EventData"]["Top"]
                    .as_str()
                    .unwrap_or("")
                    .split(',')
                    .filter_map(|e| e.split_once('='))
                    .filter(|(ip, _)| *ip == src)
                    .map(|(_, n)| n.split('/').next().unwrap().parse::<u64>().unwrap())
                    .collect::<Vec<_>>()
            })
            .sum()
    };
    assert_eq!(
        from(UNTRUSTED),
        1000,
        "every untrusted packet under its source"
    );
    assert_eq!(
        from(TRUSTED),
        counts.dropped - 1000,
        "the rate-limited rest under theirs"
    );
    let sent = guard_alerts(&alerts).len() as u64;
    let suppressed: u64 = sums.iter().map(|a| event_u64(a, "AlertsSuppressed")).sum();
    assert_eq!(
        sent + suppressed,
        counts.dropped,
        "alerts sent + not sent = drops"
    );
    assert!(
        sent <= 5 * (sums.len() as u64 + 2),
        "{sent} alerts for {} summaries at 5 alerts per second",
        sums.len()
    );
    let reasons: Vec<&str> = sums
        .iter()
        .filter_map(|a| a["EventData"]["Reasons"].as_str())
        .collect();
    assert!(reasons.iter().any(|r| r.contains("rate=")), "{reasons:?}");
    assert!(
        reasons.iter().any(|r| r.contains("posture=")),
        "{reasons:?}"
    );
}

fn read_alerts(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad alert {l}: {e}")))
        .collect()
}

#[test]
fn malformed_truncated_and_fragmented_icmp_is_counted_and_dropped() {
    require_scapy();
    let topo = Topo::new(false);
    let cg = TestCgroup::new("guard-malformed");
    let dir = scratch("guard-malformed");
    // Even the trusted source's malformed frames are dropped; its fragments pass.
    let policy = write(&dir, "p.yaml", &trust_policy(&["10.99.0.1/32"]));
    let agent = topo.agent(&policy, None, &cg);
    let count = |o: &Output| -> u64 {
        assert!(
            o.status.success(),
            "scapy failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).trim().parse().unwrap()
    };
    let malformed = count(&topo.packets(&["malformed", TRUSTED, NODE]));
    let fragments = count(&topo.packets(&["fragments", UNTRUSTED, NODE]));
    let trusted_fragments = count(&topo.packets(&["fragments", TRUSTED, NODE]));
    assert_eq!((malformed, fragments), (4, 4));
    std::thread::sleep(Duration::from_millis(1500));
    let alerts_path = agent.alerts.clone();
    let counts = stop_counts(agent);
    assert_eq!(counts.dropped, malformed + fragments, "{counts:?}");
    assert_eq!(counts.allowed, trusted_fragments, "{counts:?}");
    let alerts = read_alerts(&alerts_path);
    let reasons: String = summaries(&alerts)
        .iter()
        .filter_map(|a| a["EventData"]["Reasons"].as_str())
        .collect::<Vec<_>>()
        .join(",");
    let total = |name: &str| -> u64 {
        reasons
            .split(',')
            .filter_map(|r| r.strip_prefix(&format!("{name}=")))
            .map(|n| n.split('/').next().unwrap().parse::<u64>().unwrap())
            .sum()
    };
    assert_eq!(total("malformed"), malformed, "{reasons}");
    assert_eq!(total("fragment"), fragments, "{reasons}");
    let a = guard_alerts(&alerts);
    assert!(
        a.iter().any(|a| a["EventData"]["Reason"] == "malformed"),
        "no malformed alert"
    );
}

#[test]
fn tc_ingress_fallback_enforces_the_same_policy() {
    let topo = Topo::new(false);
    let cg = TestCgroup::new("guard-tc");
    let dir = scratch("guard-tc");
    let policy = write(&dir, "p.yaml", &trust_policy(&["10.99.0.1/32"]));
    let config = write(
        &dir,
        "c.yaml",
        "guard:
  attach: tc
",
    );
    let agent = topo.agent(&policy, Some(&config), &cg);
    let line = agent.wait_log("inbound ICMP guard on", Duration::from_secs(10));
    assert!(line.contains("TC ingress"), "{line}");
    assert_eq!(received(&topo.ping_from(TRUSTED, NODE, 2)), 2);
    assert_eq!(received(&topo.ping_from(UNTRUSTED, NODE, 2)), 0);
    let alert = agent.wait_alert("a TC drop", |a| s(a, "Type") == "MatchedNetworkPolicy");
    assert_eq!(s(&alert, "Enforcer"), "TC");
    let counts = stop_counts(agent);
    assert_eq!((counts.allowed, counts.dropped), (2, 2), "{counts:?}");
}

#[test]
fn the_guard_is_off_without_a_network_policy() {
    let topo = Topo::new(false);
    let cg = TestCgroup::new("guard-off");
    let agent = topo.agent(&policies_dir().join("host/strict.yaml"), None, &cg);
    agent.wait_log("inbound ICMP guard off", Duration::from_secs(5));
    let link = in_ns_ok(&topo.node.0, &["ip", "-d", "link", "show", &topo.node_if]);
    assert!(!String::from_utf8_lossy(&link.stdout).contains("xdp"));
    assert_eq!(received(&topo.ping_from(UNTRUSTED, NODE, 1)), 1);
    agent.stop();
}

fn probe_in(topo: &Topo) -> Value {
    let netns = std::fs::File::open(format!("/run/netns/{}", topo.node.0)).unwrap();
    let fd = netns.as_raw_fd();
    let mut cmd = Command::new(agent_bin());
    cmd.args(["probe", "--json", "--iface", "all"]);
    // SAFETY: setns on a descriptor this process holds open.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    drop(netns);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn probe_names_native_xdp_per_interface() {
    let topo = Topo::new(false);
    let report = probe_in(&topo);
    assert_eq!(report["guard"]["tried"], true, "{report}");
    let list = report["guard"]["interfaces"]
        .as_array()
        .unwrap_or_else(|| panic!("{report}"));
    assert_eq!(list.len(), 1, "only the namespace's veth: {report}");
    assert_eq!(list[0]["name"], topo.node_if.as_str());
    assert_eq!(list[0]["native_xdp"], true, "{report}");
    assert_eq!(list[0]["detail"], "native", "{report}");
    // A jumbo MTU does not fit one page: native XDP needs the multi-buffer program.
    in_ns_ok(
        &topo.peer.0,
        &["ip", "link", "set", &topo.peer_if, "mtu", "9000"],
    );
    in_ns_ok(
        &topo.node.0,
        &["ip", "link", "set", &topo.node_if, "mtu", "9000"],
    );
    let report = probe_in(&topo);
    assert_eq!(
        report["guard"]["interfaces"][0]["native_xdp"], true,
        "{report}"
    );
    assert_eq!(
        report["guard"]["interfaces"][0]["detail"], "native, multi-buffer program (for the MTU)",
        "{report}"
    );
}

// Parsing, without the kernel: the same loader as every other policy.

fn parse(text: &str) -> Result<icmp_guard::sources::policy::kubearmor::Loaded, String> {
    icmp_guard::sources::policy::kubearmor::parse_str(text, Path::new("nsp.yaml"))
        .map_err(|e| e.to_string())
}

#[test]
fn the_example_policy_does_what_ec2_044s_remediation_does() {
    use icmp_guard::sources::policy::network::{Family, IcmpMatch};
    let path = policies_dir().join("network/ec2-044-trusted-icmp.yaml");
    let loaded =
        icmp_guard::sources::policy::kubearmor::load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    let p = &loaded.set.network[0];
    assert_eq!(p.ingress.len(), 3);
    let sources =
        |i: usize| -> Vec<String> { p.ingress[i].sources.iter().map(|c| c.to_string()).collect() };
    assert_eq!(sources(0), ["203.0.113.0/24", "2001:db8::/32"]);
    assert_eq!(sources(1), ["0.0.0.0/0"]);
    assert_eq!(
        p.ingress[1].icmp,
        [IcmpMatch {
            family: Family::V4,
            icmp_type: Some(3),
            icmp_code: Some(4)
        }]
    );
    assert_eq!(sources(2), ["::/0"]);
    assert_eq!(p.ingress[2].icmp[0].icmp_type, Some(2));
}

#[test]
fn invalid_network_policies_name_file_line_and_field() {
    let head = "apiVersion: security.kubearmor.com/v1\nkind: KubeArmorNetworkPolicy\n\
                metadata:\n  name: bad\nspec:\n  nodeSelector:\n    matchLabels:\n      \
                kubernetes.io/os: linux\n  ingress:\n";
    let cases = [
        (
            "    - from:\n        - ipBlock:\n            cidr: 10.0.0.0/33\n      ports:\n        - protocol: ICMP\n",
            "nsp.yaml:12: spec.ingress[0].from[0].ipBlock.cidr: `33` is not a prefix length",
        ),
        (
            "    - ports:\n        - protocol: ICMP\n          port: \"300\"\n",
            "nsp.yaml:12: spec.ingress[0].ports[0].port: must be an ICMP type between 0 and 255",
        ),
        (
            "    - ports:\n        - protocol: ICMP\n          endPort: 4\n",
            "nsp.yaml:12: spec.ingress[0].ports[0].endPort: is the ICMP code",
        ),
        (
            "    - ports:\n        - protocol: IGMP\n",
            "nsp.yaml:11: spec.ingress[0].ports[0].protocol: unknown protocol `IGMP`",
        ),
        (
            "    - from:\n        - ipBlock:\n            cidr: 10.0.0.0/8\n      ports:\n        - protocol: ICMPv6\n",
            "nsp.yaml:14: spec.ingress[0].ports: names only ICMP families",
        ),
        (
            "    - iface: [\"this-name-is-too-long\"]\n",
            "nsp.yaml:10: spec.ingress[0].iface[0]: `this-name-is-too-long` is not a Linux interface name",
        ),
        (
            "    - from:\n        - ipBlock:\n            cidr: 10.0.0.0/8\n            except: 10.1.0.0/16\n",
            "nsp.yaml:13: spec.ingress[0].from[0].ipBlock.except: `except` is not part",
        ),
        (
            "    - action: allow\n",
            "nsp.yaml:10: spec.ingress[0].action: `allow` is not an action",
        ),
    ];
    for (rule, want) in cases {
        let err = parse(&format!("{head}{rule}")).expect_err(rule);
        assert!(err.contains(want), "for\n{rule}\nwant {want}\ngot {err}");
    }
    // TCP ports and egress rules load with warnings, never silently.
    let ok = parse(&format!(
        "{head}    - ports:\n        - port: \"22\"\n          protocol: TCP\n  egress:\n    - to: []\n"
    ))
    .unwrap();
    assert_eq!(ok.warnings.len(), 2, "{:?}", ok.warnings);
    assert!(ok.set.network[0].ingress.is_empty());
    // A duplicate name is an error, as for the other kinds.
    let twice = format!("{head}    - action: Allow\n---\n{head}    - action: Allow\n");
    assert!(
        parse(&twice)
            .unwrap_err()
            .contains("duplicate KubeArmorNetworkPolicy bad")
    );
}
