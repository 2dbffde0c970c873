//! End-to-end enforcement on the real kernel: the agent, real programs, real refusals, real
//! alerts. On the host these run with the cgroup enforcer; `cargo xtask vm-test` runs the same
//! binary inside Debian's kernels with `ICMP_GUARD_ENFORCER=lsm`.

mod common;

use std::{path::Path, process::Stdio, time::Duration};

use common::*;
use serde_json::Value;

fn strict_policy() -> std::path::PathBuf {
    policies_dir().join("host/strict.yaml")
}

fn start_strict(cg: &TestCgroup, extra: &[&str]) -> Agent {
    Agent::start(AgentSpec {
        policy: Some(&strict_policy()),
        config: None,
        attach: &cg.path,
        extra,
    })
}

fn block_alert_for(agent: &Agent, process: &str) -> Value {
    agent.wait_alert(&format!("Block of {process}"), |a| {
        s(a, "ProcessName") == process && s(a, "Action") == "Block"
    })
}

fn assert_no_alert_for(agent: &Agent, process: &str) {
    let alerts = agent.settled_alerts();
    let mine: Vec<&Value> = alerts
        .iter()
        .filter(|a| s(a, "ProcessName") == process)
        .collect();
    assert!(mine.is_empty(), "unexpected alerts for {process}: {mine:?}");
}

#[test]
fn ping_is_allowed_and_not_alerted() {
    let cg = TestCgroup::new("ping");
    let agent = start_strict(&cg, &[]);
    let out = run_probe(
        &placement(&cg),
        &[require_tool(PING), "-c", "1", "-W", "2", "127.0.0.1"],
    );
    assert!(out.status.success(), "ping failed: {}", text(&out));
    assert!(text(&out).contains("1 received"), "{}", text(&out));
    assert_no_alert_for(&agent, PING);
    agent.stop();
}

#[test]
fn hping3_is_refused_with_an_alert() {
    let cg = TestCgroup::new("hping3");
    let agent = start_strict(&cg, &[]);
    let out = run_probe(
        &placement(&cg),
        &[require_tool(HPING3), "-c", "1", "127.0.0.1"],
    );
    assert!(!out.status.success());
    assert!(refused(&out), "hping3 was not refused: {}", text(&out));
    let a = block_alert_for(&agent, HPING3);
    assert_eq!(s(&a, "Result"), "Permission denied");
    assert_eq!(
        s(&a, "Resource"),
        "domain=AF_INET type=SOCK_RAW protocol=255"
    );
    assert_eq!(s(&a, "Source"), "/usr/sbin/hping3 -c 1 127.0.0.1");
    assert_eq!(s(&a, "PolicyName"), "DefaultPosture");
    assert_eq!(s(&a, "Type"), "MatchedHostPolicy");
    assert_eq!(s(&a, "Operation"), "Network");
    assert_eq!(
        s(&a, "Enforcer"),
        if is_lsm() { "BPFLSM" } else { "BPFCgroupSock" }
    );
    assert_eq!(a["EventData"]["Class"], "raw");
    assert_eq!(a["EventData"]["Comm"], "hping3");
    // The test binary spawned hping3: the parent is this very executable.
    let me = procfs::process::Process::myself().unwrap().exe().unwrap();
    assert_eq!(s(&a, "ParentProcessName"), me.to_str().unwrap());
    assert_eq!(a["HostPPID"].as_i64().unwrap(), std::process::id() as i64);
    // The executable identity in the alert is the one userspace resolves for the path: the BTF
    // offsets and the device encoding agree with the kernel.
    let id = icmp_guard::compile::identity::Resolver::host()
        .unwrap()
        .resolve(Path::new(HPING3))
        .unwrap();
    assert_eq!(a["EventData"]["Executable"], id.to_string());
    agent.stop();
}

#[test]
fn hping3_icmp_mode_is_refused_with_an_alert() {
    let cg = TestCgroup::new("hping3-icmp");
    let agent = start_strict(&cg, &[]);
    let out = run_probe(
        &placement(&cg),
        &[require_tool(HPING3), "--icmp", "-c", "1", "127.0.0.1"],
    );
    assert!(
        refused(&out),
        "hping3 --icmp was not refused: {}",
        text(&out)
    );
    let a = block_alert_for(&agent, HPING3);
    assert_eq!(s(&a, "Source"), "/usr/sbin/hping3 --icmp -c 1 127.0.0.1");
    agent.stop();
}

/// A copy of ping itself, named ping, is not ping: identity is the file, not its name or bytes.
#[test]
fn copied_and_renamed_binaries_are_refused() {
    let cg = TestCgroup::new("copies");
    let agent = start_strict(&cg, &[]);
    let dir = scratch("copies");
    let ping_copy = dir.join("ping");
    std::fs::copy(PING, &ping_copy).unwrap();
    let hping_as_ping = scratch("hping-as-ping").join("ping");
    std::fs::copy(require_tool(HPING3), &hping_as_ping).unwrap();
    let place = placement(&cg);

    let out = run_probe(
        &place,
        &[
            ping_copy.to_str().unwrap(),
            "-c",
            "1",
            "-W",
            "1",
            "127.0.0.1",
        ],
    );
    assert!(refused(&out), "a copy of ping was allowed: {}", text(&out));
    block_alert_for(&agent, ping_copy.to_str().unwrap());

    let out = run_probe(
        &place,
        &[hping_as_ping.to_str().unwrap(), "-c", "1", "127.0.0.1"],
    );
    assert!(
        refused(&out),
        "hping3 renamed to ping was allowed: {}",
        text(&out)
    );
    block_alert_for(&agent, hping_as_ping.to_str().unwrap());
    agent.stop();
}

#[test]
fn symlinks_resolve_to_their_target() {
    let cg = TestCgroup::new("symlinks");
    let agent = start_strict(&cg, &[]);
    let dir = scratch("symlinks");
    let fake = dir.join("ping");
    std::os::unix::fs::symlink(require_tool(HPING3), &fake).unwrap();
    let real = dir.join("my-ping");
    std::os::unix::fs::symlink(PING, &real).unwrap();
    let place = placement(&cg);

    let out = run_probe(&place, &[fake.to_str().unwrap(), "-c", "1", "127.0.0.1"]);
    assert!(
        refused(&out),
        "a symlink named ping to hping3 was allowed: {}",
        text(&out)
    );
    // The kernel reports the file that runs, not the link's name.
    block_alert_for(&agent, HPING3);

    let out = run_probe(
        &place,
        &[real.to_str().unwrap(), "-c", "1", "-W", "2", "127.0.0.1"],
    );
    assert!(
        out.status.success(),
        "a symlink to ping was refused: {}",
        text(&out)
    );
    agent.stop();
}

#[test]
fn the_dynamic_loader_does_not_launder_identity() {
    let cg = TestCgroup::new("loader");
    let agent = start_strict(&cg, &[]);
    let loader = "/lib64/ld-linux-x86-64.so.2";
    let place = placement(&cg);
    let out = run_probe(
        &place,
        &[require_tool(loader), HPING3, "-c", "1", "127.0.0.1"],
    );
    assert!(
        refused(&out),
        "hping3 through ld.so was allowed: {}",
        text(&out)
    );
    let a = agent.wait_alert("Block via the loader", |a| {
        s(a, "Action") == "Block" && s(a, "ProcessName").contains("ld-linux-x86-64.so.2")
    });
    assert!(s(&a, "Source").contains("/usr/sbin/hping3"), "{a}");
    // Even ping, started through the loader, is the loader as far as identity goes.
    let out = run_probe(&place, &[loader, PING, "-c", "1", "-W", "1", "127.0.0.1"]);
    assert!(
        refused(&out),
        "ping through ld.so was allowed: {}",
        text(&out)
    );
    agent.stop();
}

#[test]
fn a_process_calling_itself_ping_is_refused() {
    let cg = TestCgroup::new("comm");
    let agent = start_strict(&cg, &[]);
    let script = format!(
        "import ctypes\nctypes.CDLL(None).prctl(15, b'ping', 0, 0, 0)\n{}",
        py_socket("AF_INET", "SOCK_RAW", "socket.IPPROTO_ICMP")
    );
    let out = run_probe(&placement(&cg), &[require_tool(PYTHON), "-c", &script]);
    assert!(
        text(&out).contains("REFUSED 1"),
        "python named ping got a raw ICMP socket: {}",
        text(&out)
    );
    let a = agent.wait_alert("comm spoof", |a| {
        s(a, "Action") == "Block" && a["EventData"]["Comm"] == "ping"
    });
    assert!(s(&a, "ProcessName").contains("python3"), "{a}");
    assert_eq!(
        s(&a, "Resource"),
        "domain=AF_INET type=SOCK_RAW|SOCK_CLOEXEC protocol=1"
    );
    agent.stop();
}

#[test]
fn processes_running_before_the_agent_are_enforced() {
    let cg = TestCgroup::new("early");
    let place = placement(&cg);
    // Waits for a line on stdin, then opens a raw socket.
    let script = format!(
        "import sys\nsys.stdin.readline()\n{}",
        py_socket("AF_INET", "SOCK_RAW", "255")
    );
    let mut child = spawn_probe(
        &place,
        &[require_tool(PYTHON), "-c", &script],
        Stdio::piped(),
    );
    std::thread::sleep(Duration::from_millis(300));
    let agent = start_strict(&cg, &[]);
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let out = wait_with_timeout(child, Duration::from_secs(20), &["python early"]);
    assert!(text(&out).contains("REFUSED 1"), "{}", text(&out));
    agent.wait_alert("early process", |a| {
        s(a, "Action") == "Block" && s(a, "ProcessName").contains("python3")
    });
    agent.stop();
}

/// A copy of ping in a scratch directory, and an agent whose policy allows icmp and raw
/// sockets from that copy only: what a package upgrade will replace.
fn upgrade_setup(
    name: &str,
    extra: &[&str],
) -> (TestCgroup, std::path::PathBuf, std::path::PathBuf, Agent) {
    let cg = TestCgroup::new(name);
    let dir = scratch(name);
    let allowed = dir.join("ping");
    std::fs::copy(PING, &allowed).unwrap();
    let policy = dir.join("policy.yaml");
    std::fs::write(
        &policy,
        format!(
            "apiVersion: security.kubearmor.com/v1\nkind: KubeArmorHostPolicy\nmetadata:\n  name: {name}\nspec:\n  nodeSelector:\n    matchLabels:\n      kubernetes.io/os: linux\n  network:\n    matchProtocols:\n    - protocol: icmp,raw\n      fromSource:\n      - path: {}\n  action: Allow\n",
            allowed.display()
        ),
    )
    .unwrap();
    let agent = Agent::start(AgentSpec {
        policy: Some(&policy),
        config: None,
        attach: &cg.path,
        extra,
    });
    (cg, dir, allowed, agent)
}

/// A package upgrade replaces the allowed binary with a new inode; it must stay allowed.
#[test]
fn a_replaced_allowed_binary_stays_allowed() {
    let (cg, dir, allowed, agent) = upgrade_setup("upgrade", &[]);
    let place = placement(&cg);
    let ping = allowed.to_str().unwrap();
    let out = run_probe(&place, &[ping, "-c", "1", "-W", "2", "127.0.0.1"]);
    assert!(
        out.status.success(),
        "allowed copy refused before the upgrade: {}",
        text(&out)
    );

    // What dpkg does: write the new file beside the old one, then rename it over.
    let staged = dir.join("ping.dpkg-new");
    std::fs::copy(PING, &staged).unwrap();
    let before = std::fs::metadata(&allowed)
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .unwrap();
    std::fs::rename(&staged, &allowed).unwrap();
    let after = std::fs::metadata(&allowed)
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .unwrap();
    assert_ne!(
        before, after,
        "the upgrade must produce a new inode for this test to mean anything"
    );
    agent.wait_log(
        "refresh after a fromSource binary changed",
        Duration::from_secs(10),
    );
    let out = run_probe(&place, &[ping, "-c", "1", "-W", "2", "127.0.0.1"]);
    assert!(
        out.status.success(),
        "the upgraded binary was refused: {}",
        text(&out)
    );
    agent.stop();
}

/// The upgrade is noticed by inotify on the binary's directory, not by the periodic round (ten
/// minutes away here): the staged new version is allowed as soon as dpkg creates it, so the
/// program runs the moment it is renamed into place.
#[test]
fn a_replaced_allowed_binary_is_applied_at_once() {
    let (cg, dir, allowed, agent) = upgrade_setup("upgrade-inotify", &["--refresh-ms", "600000"]);
    // Any update counts (the log names its cause, which depends on what else the round saw):
    // with the periodic round ten minutes away, only inotify can have woken it.
    let applied = |n: usize, what: &str| {
        let start = std::time::Instant::now();
        while agent.log_count("applied as update") < n {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "{what} did not wake a round within 5 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let before = agent.log_count("applied as update");
    let staged = dir.join("ping.dpkg-new");
    std::fs::copy(PING, &staged).unwrap();
    applied(before + 1, "the staged file");
    std::fs::rename(&staged, &allowed).unwrap();
    // At once, before any round could see the rename.
    let ping = allowed.to_str().unwrap();
    let out = run_probe(&placement(&cg), &[ping, "-c", "1", "-W", "2", "127.0.0.1"]);
    assert!(
        out.status.success(),
        "the upgraded binary was refused right after the rename: {}",
        text(&out)
    );
    applied(before + 2, "the rename");
    assert_eq!(agent.log_count("that inotify did not report"), 0);
    agent.stop();
}

#[test]
fn audit_mode_lets_the_socket_through_and_alerts() {
    let cg = TestCgroup::new("audit");
    let agent = start_strict(&cg, &["--mode", "audit"]);
    let out = run_probe(
        &placement(&cg),
        &[
            require_tool(PYTHON),
            "-c",
            &py_socket("AF_INET", "SOCK_RAW", "255"),
        ],
    );
    assert!(
        text(&out).contains("OPENED"),
        "audit mode refused: {}",
        text(&out)
    );
    let a = agent.wait_alert("audit", |a| s(a, "ProcessName").contains("python3"));
    assert_eq!(s(&a, "Action"), "Audit (Block)");
    assert_eq!(s(&a, "Result"), "Passed");
    agent.stop();
}

#[test]
fn other_programs_tcp_udp_and_unix_sockets_are_untouched() {
    let cg = TestCgroup::new("untouched");
    let agent = start_strict(&cg, &[]);
    let script = "import socket\n\
        srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM); srv.bind(('127.0.0.1', 0)); srv.listen(1)\n\
        cli = socket.create_connection(srv.getsockname()); conn, _ = srv.accept()\n\
        cli.sendall(b'hi'); assert conn.recv(2) == b'hi'\n\
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.sendto(b'x', ('127.0.0.1', 9))\n\
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM); a.sendall(b'u'); assert b.recv(1) == b'u'\n\
        s6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)\n\
        nl = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)\n\
        print('ALL-OK')\n";
    let out = run_probe(&placement(&cg), &[require_tool(PYTHON), "-c", script]);
    assert!(text(&out).contains("ALL-OK"), "{}", text(&out));
    assert_no_alert_for(&agent, "/usr/bin/python3.11");
    assert!(agent.settled_alerts().is_empty(), "{:?}", agent.alerts());
    agent.stop();
}

#[test]
fn classes_no_policy_names_are_never_decided() {
    // The strict policy names icmp, icmpv6, raw and packet. tcp and udp sockets must leave the
    // hook after its one read of the control word: no decision is counted for them, while the
    // refused raw socket is.
    let cg = TestCgroup::new("undecided");
    let agent = start_strict(&cg, &[]);
    let script = "import socket\n\
        for _ in range(50):\n\
        \x20   socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()\n\
        \x20   socket.socket(socket.AF_INET6, socket.SOCK_DGRAM).close()\n\
        \x20   socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).close()\n\
        try:\n\
        \x20   socket.socket(socket.AF_INET, socket.SOCK_RAW, 255)\n\
        except PermissionError:\n\
        \x20   print('RAW-REFUSED')\n";
    let out = run_probe(&placement(&cg), &[require_tool(PYTHON), "-c", script]);
    assert!(text(&out).contains("RAW-REFUSED"), "{}", text(&out));
    let log = agent.log.clone();
    agent.stop();
    // The agent's last line may still be on its way through the log reader.
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    let line = loop {
        if let Some(l) = log
            .lock()
            .unwrap()
            .iter()
            .find(|l| l.contains("decisions by class"))
        {
            break l.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no decision counts at stop; log:\n{}",
            log.lock().unwrap().join("\n")
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let counts = line
        .split("decisions by class (allowed/audited/blocked): ")
        .nth(1)
        .and_then(|r| r.split(';').next())
        .unwrap_or_else(|| panic!("unexpected stop line: {line}"));
    let classes: Vec<&str> = counts
        .split(", ")
        .map(|c| c.split(' ').next().unwrap())
        .collect();
    assert!(
        !classes.contains(&"tcp") && !classes.contains(&"udp"),
        "tcp or udp sockets were decided: {counts}"
    );
    let raw = counts
        .split(", ")
        .find(|c| c.starts_with("raw "))
        .unwrap_or_else(|| panic!("the refused raw socket was not counted: {counts}"));
    let blocked: u64 = raw.rsplit('/').next().unwrap().parse().unwrap();
    assert!(blocked >= 1, "{raw}");
}

#[test]
fn packet_sockets_follow_the_enforcer() {
    let cg = TestCgroup::new("packet");
    let agent = start_strict(&cg, &[]);
    let out = run_probe(
        &placement(&cg),
        &[
            require_tool(PYTHON),
            "-c",
            &py_socket("AF_PACKET", "SOCK_RAW", "0"),
        ],
    );
    if is_lsm() {
        assert!(
            text(&out).contains("REFUSED 1"),
            "AF_PACKET allowed under LSM: {}",
            text(&out)
        );
        let a = agent.wait_alert("AF_PACKET", |a| a["EventData"]["Class"] == "packet");
        assert!(
            s(&a, "Resource").starts_with("domain=AF_PACKET type=SOCK_RAW"),
            "{a}"
        );
    } else {
        // The documented blind spot of cgroup/sock_create: it never runs for AF_PACKET.
        assert!(text(&out).contains("OPENED"), "{}", text(&out));
        assert!(agent.settled_alerts().is_empty());
    }
    agent.stop();
}

#[test]
fn stopping_the_agent_gives_every_socket_back() {
    let cg = TestCgroup::new("stop");
    let agent = start_strict(&cg, &[]);
    let place = placement(&cg);
    let probe = py_socket("AF_INET", "SOCK_RAW", "255");
    let out = run_probe(&place, &[require_tool(PYTHON), "-c", &probe]);
    assert!(text(&out).contains("REFUSED 1"), "{}", text(&out));
    agent.wait_log(icmp_guard::agent::READY, Duration::from_secs(1));
    agent.stop();
    let out = run_probe(&place, &[PYTHON, "-c", &probe]);
    assert!(
        text(&out).contains("OPENED"),
        "still refused after stop: {}",
        text(&out)
    );
}

#[test]
fn rate_limited_alerts_are_all_accounted_for() {
    let cg = TestCgroup::new("rate");
    let dir = scratch("rate");
    let config = dir.join("config.yaml");
    std::fs::write(&config, "alertsPerSecond: 5\n").unwrap();
    let agent = Agent::start(AgentSpec {
        policy: Some(&strict_policy()),
        config: Some(&config),
        attach: &cg.path,
        extra: &[],
    });
    let tries = 40;
    let script = format!(
        "import socket\nn=0\nfor _ in range({tries}):\n    try:\n        socket.socket(socket.AF_INET, socket.SOCK_RAW, 255)\n    except PermissionError:\n        n+=1\nprint('REFUSED', n)\n"
    );
    let out = run_probe(&placement(&cg), &[require_tool(PYTHON), "-c", &script]);
    assert!(
        text(&out).contains(&format!("REFUSED {tries}")),
        "{}",
        text(&out)
    );
    // The loss report comes from the agent's once-a-second accounting.
    let report = agent.wait_alert("suppression report", |a| s(a, "Type") == "SystemEvent");
    std::thread::sleep(Duration::from_millis(1500));
    let alerts = agent.alerts();
    let blocks = alerts.iter().filter(|a| s(a, "Action") == "Block").count() as u64;
    let suppressed: u64 = alerts
        .iter()
        .filter(|a| s(a, "Type") == "SystemEvent")
        .map(|a| {
            a["EventData"]["Count"]
                .as_str()
                .unwrap()
                .parse::<u64>()
                .unwrap()
        })
        .sum();
    assert!(blocks >= 1 && blocks < tries, "blocks {blocks}");
    assert_eq!(
        blocks + suppressed,
        tries,
        "alerts {blocks} + suppressed {suppressed} != {tries}"
    );
    assert_eq!(report["MaxAlertsPerSec"], 5);
    agent.stop();
}

/// The spoof a path-based identity falls for: in a private mount namespace, bind-mount hping3
/// over /usr/bin/ping and run "/usr/bin/ping". The path says ping; the file is hping3.
#[test]
fn a_bind_mount_over_the_allowed_path_is_refused() {
    let cg = TestCgroup::new("bind-mount");
    let agent = start_strict(&cg, &[]);
    let script = format!(
        "import ctypes, os\n\
         libc = ctypes.CDLL(None, use_errno=True)\n\
         assert libc.unshare(0x00020000) == 0, 'unshare(CLONE_NEWNS)'\n\
         assert libc.mount(b'none', b'/', None, 0x4000 | 0x40000, None) == 0, 'make / private'\n\
         assert libc.mount(b'{HPING3}', b'{PING}', None, 0x1000, None) == 0, 'bind mount'\n\
         os.execv('{PING}', ['ping', '-c', '1', '127.0.0.1'])\n"
    );
    let out = run_probe(&placement(&cg), &[require_tool(PYTHON), "-c", &script]);
    assert!(
        refused(&out),
        "hping3 mounted over ping was allowed: {}",
        text(&out)
    );
    let a = agent.wait_alert("bind mount spoof", |a| s(a, "Action") == "Block");
    // The kernel's path walk reports where the file is mounted; the identity is hping3's.
    assert_eq!(s(&a, "ProcessName"), PING, "{a}");
    let hping = icmp_guard::compile::identity::Resolver::host()
        .unwrap()
        .resolve(Path::new(HPING3))
        .unwrap();
    assert_eq!(a["EventData"]["Executable"], hping.to_string());
    agent.stop();
}

/// Malformed policy files that a hot reload must refuse, built from the strict policy: the
/// mistakes people make, what a half-finished write leaves behind, and byte-level mutants
/// (deterministic, kept only when the parser refuses them).
fn malformed_policies(valid: &str) -> Vec<(String, Vec<u8>)> {
    let good_doc = valid.to_string();
    let mut cases: Vec<(String, Vec<u8>)> = vec![
        ("an empty file (a write in progress)".into(), Vec::new()),
        ("only a comment".into(), b"# being edited\n".to_vec()),
        ("not UTF-8".into(), b"\xff\xfe\x00kind: \xc3\x28\n".to_vec()),
        ("tabs for indentation".into(), valid.replace("  ", "\t").into_bytes()),
        ("a misspelt kind".into(), valid.replace("KubeArmorHostPolicy", "KubeArmorHostPolcy").into_bytes()),
        ("an unknown protocol".into(), valid.replace("icmp,icmpv6", "icmpp,icmpv6").into_bytes()),
        ("a misspelt key".into(), valid.replace("matchProtocols", "matchProtocol").into_bytes()),
        ("a relative fromSource path".into(), valid.replace("/usr/bin/ping", "usr/bin/ping").into_bytes()),
        (
            "a good document followed by a broken one".into(),
            format!("{good_doc}---\nkind: KubeArmorHostPolicy\nmetadata: [\n").into_bytes(),
        ),
        (
            "a List with a good item and a broken one".into(),
            format!(
                "apiVersion: v1\nkind: List\nitems:\n- {}\n- kind: KubeArmorHostPolicy\n  metadata: 3\n",
                good_doc
                    .lines()
                    .filter(|l| !l.starts_with('#'))
                    .collect::<Vec<_>>()
                    .join("\n  ")
            )
            .into_bytes(),
        ),
        ("deep nesting".into(), format!("{}x\n", "- ".repeat(40_000)).into_bytes()),
        (
            "an alias bomb".into(),
            (1..12)
                .map(|i| format!("a{i}: &a{i} [{}]\n", vec![format!("*a{}", i - 1); 9].join(",")))
                .fold("a0: &a0 [x,x,x,x,x,x,x,x,x]\n".to_string(), |acc, l| acc + &l)
                .into_bytes(),
        ),
    ];
    // Byte-level mutants: flip, delete or insert bytes at positions from a fixed xorshift seed.
    let mut state: u64 = 0x1c3f_9a2b_5d7e_4f61;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let bytes = valid.as_bytes();
    let mut mutants = 0;
    while mutants < 16 {
        let mut m = bytes.to_vec();
        for _ in 0..1 + next() % 3 {
            let at = (next() as usize) % m.len();
            match next() % 4 {
                0 => m[at] = b"\t:-[]{}&*!|>'\"#\n %"[(next() % 18) as usize],
                1 => {
                    m.remove(at);
                }
                2 => m.insert(at, b":[{\t"[(next() % 4) as usize]),
                _ => m.truncate(at),
            }
        }
        let text = String::from_utf8_lossy(&m);
        if icmp_guard::sources::policy::kubearmor::parse_str(&text, Path::new("m.yaml")).is_err() {
            cases.push((format!("byte mutant {mutants}"), m));
            mutants += 1;
        }
    }
    cases
}

/// "A malformed policy during hot reload must never apply anything": a running agent is fed a
/// series of broken policy files, and after each one the kernel still decides as before (ping
/// allowed, a raw ICMP socket from python refused) and the refusal is in the log. A valid change
/// at the end is applied, which shows the reload path was live all along.
#[test]
fn malformed_policies_during_hot_reload_apply_nothing() {
    let cg = TestCgroup::new("malformed-reload");
    let dir = scratch("malformed-reload");
    let policy = dir.join("policy.yaml");
    let valid = std::fs::read_to_string(strict_policy()).unwrap();
    std::fs::write(&policy, &valid).unwrap();
    let agent = Agent::start(AgentSpec {
        policy: Some(&policy),
        config: None,
        attach: &cg.path,
        extra: &[],
    });
    let place = placement(&cg);
    let raw_icmp = py_socket("AF_INET", "SOCK_RAW", "1");
    let check = |after: &str| {
        let out = run_probe(&place, &[require_tool(PYTHON), "-c", &raw_icmp]);
        assert!(
            text(&out).contains("REFUSED 1"),
            "after {after}: python's raw ICMP socket was not refused: {}",
            text(&out)
        );
        let out = run_probe(
            &place,
            &[require_tool(PING), "-c", "1", "-W", "2", "127.0.0.1"],
        );
        assert!(
            out.status.success(),
            "after {after}: ping was refused: {}",
            text(&out)
        );
    };
    check("start");
    let cases = malformed_policies(&valid);
    for (i, (what, bytes)) in cases.iter().enumerate() {
        // Written beside and renamed over, so the agent sees this content and nothing between.
        let staged = dir.join("policy.yaml.new");
        std::fs::write(&staged, bytes).unwrap();
        std::fs::rename(&staged, &policy).unwrap();
        let start = std::time::Instant::now();
        while agent.log_count("policy reload refused") <= i {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "no refusal logged for {what}; the agent's log:\n{}",
                agent.log.lock().unwrap().join("\n")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(
            agent.log_count("policy change applied"),
            0,
            "{what} was applied; the agent's log:\n{}",
            agent.log.lock().unwrap().join("\n")
        );
        check(what);
    }
    assert_eq!(agent.log_count("policy reload refused"), cases.len());

    // A valid change is still applied: python may now open raw ICMP sockets too.
    let python = std::fs::canonicalize(PYTHON).unwrap();
    let allowed = valid.replace(
        "      - path: /usr/bin/ping\n",
        &format!(
            "      - path: /usr/bin/ping\n      - path: {}\n",
            python.display()
        ),
    );
    assert_ne!(allowed, valid);
    std::fs::write(dir.join("policy.yaml.new"), &allowed).unwrap();
    std::fs::rename(dir.join("policy.yaml.new"), &policy).unwrap();
    agent.wait_log("policy change applied", Duration::from_secs(10));
    let out = run_probe(&place, &[PYTHON, "-c", &raw_icmp]);
    assert!(text(&out).contains("OPENED"), "{}", text(&out));
    agent.stop();
}
