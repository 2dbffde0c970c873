//! No gap, ever: restarts, upgrades and crashes of the real agent on the real kernel. On the
//! host these run with the cgroup enforcer on test cgroups; `cargo xtask vm-test` runs the same
//! binary under the BPF LSM.
//!
//! Each test owns a pin directory ([`TestPins`]) and starts agents on it one after the other,
//! as systemd does. What is asserted is what the kernel answered to a real program: a loop of
//! `socket()` calls in the test cgroup, every attempt timed with `CLOCK_MONOTONIC`.

mod common;

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::*;
use serde_json::Value;

fn strict_policy() -> PathBuf {
    policies_dir().join("host/strict.yaml")
}

fn start_on(cg: &TestCgroup, pins: &TestPins, policy: &Path, extra: &[&str]) -> Agent {
    let pin = pins.arg();
    let mut args = vec![pin.as_str()];
    args.extend_from_slice(extra);
    Agent::start(AgentSpec {
        policy: Some(policy),
        config: None,
        attach: &cg.path,
        extra: &args,
    })
}

/// A raw IPv4 socket (protocol 255, what hping3 and nmap forge packets with) from python: the
/// strict policy and every policy below refuse it, as python is not in any `fromSource`.
const RAW: (&str, &str, &str) = ("AF_INET", "SOCK_RAW", "255");

/// Tries `socket()` every half millisecond until told to stop, and records when each attempt
/// was refused or opened. The pause leaves the agents the CPU they need to start; it still
/// makes well over a thousand attempts a second.
const LOOP: &str = r#"
import array, errno, os, socket, sys, time
family, kind, proto, stop, out = sys.argv[1:6]
family, kind, proto = getattr(socket, family), getattr(socket, kind), int(proto)
refused, opened, other = array.array('d'), array.array('d'), []
ready = out + '.ready'
next_check = 0.0
while True:
    t = time.monotonic()
    try:
        socket.socket(family, kind, proto).close()
        opened.append(t)
    except OSError as e:
        if e.errno in (errno.EPERM, errno.EACCES):
            refused.append(t)
        else:
            other.append('%f %s' % (t, e))
    if t >= next_check:
        next_check = t + 0.01
        if not os.path.exists(ready):
            open(ready, 'w').close()
        if os.path.exists(stop):
            break
    time.sleep(0.0005)
with open(out + '.refused', 'wb') as f:
    refused.tofile(f)
with open(out + '.opened', 'wb') as f:
    opened.tofile(f)
with open(out + '.other', 'w') as f:
    f.write('\n'.join(other))
"#;

struct SocketLoop {
    child: Child,
    dir: PathBuf,
}

struct Attempts {
    refused: Vec<f64>,
    opened: Vec<f64>,
    other: Vec<String>,
}

impl SocketLoop {
    fn start(cg: &TestCgroup, (family, kind, proto): (&str, &str, &str)) -> Self {
        let dir = scratch("restarts-loop");
        let out = dir.join("attempts");
        let child = spawn_probe(
            &placement(cg),
            &[
                require_tool(PYTHON),
                "-c",
                LOOP,
                family,
                kind,
                proto,
                dir.join("stop").to_str().unwrap(),
                out.to_str().unwrap(),
            ],
            Stdio::null(),
        );
        let start = Instant::now();
        while !dir.join("attempts.ready").exists() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the socket loop did not start within 30 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        SocketLoop { child, dir }
    }

    fn finish(self) -> Attempts {
        std::fs::write(self.dir.join("stop"), "").unwrap();
        let out = wait_with_timeout(self.child, Duration::from_secs(30), &["socket loop"]);
        assert!(
            out.status.success(),
            "the socket loop failed: {}",
            text(&out)
        );
        let floats = |name: &str| -> Vec<f64> {
            std::fs::read(self.dir.join(name))
                .unwrap()
                .chunks_exact(8)
                .map(|b| f64::from_ne_bytes(b.try_into().unwrap()))
                .collect()
        };
        let other = std::fs::read_to_string(self.dir.join("attempts.other")).unwrap();
        let attempts = Attempts {
            refused: floats("attempts.refused"),
            opened: floats("attempts.opened"),
            other: other.lines().map(String::from).collect(),
        };
        // Megabytes of timestamps: not left behind.
        let _ = std::fs::remove_dir_all(&self.dir);
        attempts
    }
}

impl Attempts {
    fn refused_between(&self, from: f64, to: f64) -> Vec<f64> {
        self.refused
            .iter()
            .copied()
            .filter(|t| (from..=to).contains(t))
            .collect()
    }

    /// Every attempt was refused, and between `from` and `to` (the gap) the loop kept trying:
    /// at least `min` attempts, none more than a second apart.
    fn assert_no_gap(&self, what: &str, from: f64, to: f64, min: usize) {
        assert!(
            self.other.is_empty(),
            "{what}: attempts failed otherwise than refused: {:?}",
            &self.other[..self.other.len().min(5)]
        );
        assert!(
            self.opened.is_empty(),
            "{what}: {} of {} sockets were opened, the first {:.3} s after the gap began \
             (the gap lasted {:.3} s)",
            self.opened.len(),
            self.opened.len() + self.refused.len(),
            self.opened[0] - from,
            to - from
        );
        let during = self.refused_between(from, to);
        eprintln!(
            "{what}: {} attempts refused in all, {} during the {:.3} s gap",
            self.refused.len(),
            during.len(),
            to - from
        );
        assert!(
            during.len() >= min,
            "{what}: only {} attempts during the {:.3} s gap; the test needs at least {min} to \
             mean anything",
            during.len(),
            to - from
        );
        let mut edges = vec![from];
        edges.extend(&during);
        edges.push(to);
        let widest = edges.windows(2).map(|w| w[1] - w[0]).fold(0.0, f64::max);
        assert!(
            widest < 1.0,
            "{what}: the loop paused {widest:.3} s during the gap; attempts must cover it"
        );
    }
}

/// What `--stop-grace-secs` is by default, as the README documents it.
const STOP_GRACE: f64 = 3.0;

fn alerts_for<'a>(alerts: &'a [Value], process: &str) -> Vec<&'a Value> {
    alerts
        .iter()
        .filter(|a| s(a, "ProcessName") == process)
        .collect()
}

/// A restart (SIGTERM, then a new agent on the same pin directory, as `systemctl restart`
/// does): a socket both agents refuse is refused at every instant in between.
#[test]
fn a_restart_leaves_no_gap() {
    let cg = TestCgroup::new("restarts-restart");
    let pins = TestPins::new("restarts-restart");
    let old = start_on(&cg, &pins, &strict_policy(), &[]);
    let lp = SocketLoop::start(&cg, RAW);
    std::thread::sleep(Duration::from_millis(300));
    let gap_start = monotonic();
    let status = old.signal(libc::SIGTERM);
    assert!(status.success(), "the old agent exited with {status}");
    let new = start_on(&cg, &pins, &strict_policy(), &[]);
    let gap_end = monotonic();
    new.wait_log("adopted the pinned set", Duration::from_secs(1));
    std::thread::sleep(Duration::from_millis(300));
    let attempts = lp.finish();
    attempts.assert_no_gap("restart", gap_start, gap_end, 100);
    new.stop();
}

/// An upgrade that changes the policy: the old agent refuses the loop's socket, the new one
/// (another policy file) too, and nothing gets through while one hands over to the other. The
/// new policy is in force once the new agent says it enforces.
#[test]
fn a_policy_change_across_a_restart_leaves_no_gap() {
    let cg = TestCgroup::new("restarts-upgrade");
    let pins = TestPins::new("restarts-upgrade");
    let dir = scratch("restarts-upgrade");
    let extra_ping = dir.join("ping-v2");
    std::fs::copy(require_tool(PING), &extra_ping).unwrap();
    let new_policy = dir.join("policy-v2.yaml");
    std::fs::write(
        &new_policy,
        format!(
            "apiVersion: security.kubearmor.com/v1\nkind: KubeArmorHostPolicy\nmetadata:\n  \
             name: restarts-v2\nspec:\n  nodeSelector:\n    matchLabels:\n      \
             kubernetes.io/os: linux\n  network:\n    matchProtocols:\n    - protocol: \
             icmp,icmpv6,raw,packet\n      fromSource:\n      - path: {PING}\n      - path: \
             {}\n  action: Allow\n",
            extra_ping.display()
        ),
    )
    .unwrap();
    let place = placement(&cg);
    let ping_v2 = [
        extra_ping.to_str().unwrap(),
        "-c",
        "1",
        "-W",
        "2",
        "127.0.0.1",
    ];

    let old = start_on(&cg, &pins, &strict_policy(), &[]);
    let out = run_probe(&place, &ping_v2);
    assert!(
        refused(&out),
        "the old policy let {ping_v2:?} run: {}",
        text(&out)
    );
    let lp = SocketLoop::start(&cg, RAW);
    std::thread::sleep(Duration::from_millis(300));
    let gap_start = monotonic();
    assert!(old.signal(libc::SIGTERM).success());
    let new = start_on(&cg, &pins, &new_policy, &[]);
    let gap_end = monotonic();
    new.wait_log("adopted the pinned set", Duration::from_secs(1));
    std::thread::sleep(Duration::from_millis(300));
    let attempts = lp.finish();
    attempts.assert_no_gap("policy change across a restart", gap_start, gap_end, 100);
    let out = run_probe(&place, &ping_v2);
    assert!(
        out.status.success(),
        "the new policy is not in force: {ping_v2:?} failed: {}",
        text(&out)
    );
    new.stop();
}

/// SIGKILL (a crash, the OOM killer) leaves the pinned programs enforcing on the lease last
/// renewed; a new agent adopts them and nothing got through at any point.
#[test]
fn a_killed_agent_keeps_enforcing_until_a_new_one_adopts() {
    let cg = TestCgroup::new("restarts-kill");
    let pins = TestPins::new("restarts-kill");
    let old = start_on(&cg, &pins, &strict_policy(), &[]);
    let lp = SocketLoop::start(&cg, RAW);
    std::thread::sleep(Duration::from_millis(300));
    let killed = monotonic();
    let status = old.signal(libc::SIGKILL);
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL)
    );
    // Longer than the stop grace: a killed agent's set lives on its lease, not on the grace.
    std::thread::sleep(Duration::from_secs_f64(STOP_GRACE + 1.0));
    let new = start_on(&cg, &pins, &strict_policy(), &[]);
    let adopted = monotonic();
    new.wait_log("adopted the pinned set", Duration::from_secs(1));
    std::thread::sleep(Duration::from_millis(300));
    let attempts = lp.finish();
    attempts.assert_no_gap("SIGKILL, then a new agent", killed, adopted, 1000);
    new.stop();
}

/// Alerts raised while no agent runs wait in the pinned ring buffer and the next agent
/// delivers them.
#[test]
fn alerts_raised_while_no_agent_runs_are_delivered_by_the_next() {
    let cg = TestCgroup::new("restarts-alerts");
    let pins = TestPins::new("restarts-alerts");
    let dir = scratch("restarts-alerts");
    let hping = dir.join("hping3-while-down");
    std::fs::copy(require_tool(HPING3), &hping).unwrap();
    let hping = hping.to_str().unwrap();
    let old = start_on(&cg, &pins, &strict_policy(), &[]);
    assert!(!old.signal(libc::SIGKILL).success());
    let out = run_probe(&placement(&cg), &[hping, "-c", "1", "127.0.0.1"]);
    assert!(
        refused(&out),
        "hping3 was not refused with no agent running: {}",
        text(&out)
    );
    let new = start_on(&cg, &pins, &strict_policy(), &[]);
    let a = new.wait_alert(&format!("Block of {hping} raised before it started"), |a| {
        s(a, "ProcessName") == hping && s(a, "Action") == "Block"
    });
    assert_eq!(s(&a, "Source"), format!("{hping} -c 1 127.0.0.1"), "{a}");
    // Delivered once: by this agent, not also counted as lost.
    assert_eq!(alerts_for(&new.settled_alerts(), hping).len(), 1);
    new.stop();
}

/// A clean stop (SIGTERM, `systemctl stop`) keeps the pinned programs deciding for the stop
/// grace, for a restarted agent to take over, and gives every socket back when it ends.
#[test]
fn a_stop_gives_every_socket_back_within_the_grace() {
    let cg = TestCgroup::new("restarts-stop");
    let pins = TestPins::new("restarts-stop");
    let agent = start_on(&cg, &pins, &strict_policy(), &[]);
    let lp = SocketLoop::start(&cg, RAW);
    std::thread::sleep(Duration::from_millis(300));
    let stopped = monotonic();
    assert!(agent.signal(libc::SIGTERM).success());
    let deadline = Instant::now() + Duration::from_secs_f64(STOP_GRACE + 3.0);
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let attempts = lp.finish();
    let Some(first) = attempts.opened.first().copied() else {
        panic!(
            "no socket was given back within {} s of SIGTERM",
            STOP_GRACE + 3.0
        )
    };
    let after = first - stopped;
    let last_refused = attempts.refused.last().copied().unwrap_or(0.0) - stopped;
    eprintln!(
        "stop: sockets refused until {last_refused:.3} s after SIGTERM, given back from \
         {after:.3} s (grace {STOP_GRACE} s)"
    );
    // The grace is kept (a restart has that long) and not overrun by more than the lease
    // thread's and the clocks' slack.
    assert!(
        after >= STOP_GRACE - 0.2,
        "sockets were given back {after:.3} s after SIGTERM, before the {STOP_GRACE} s grace \
         a restarted agent counts on"
    );
    assert!(
        after <= STOP_GRACE + 1.0,
        "sockets were given back only {after:.3} s after SIGTERM; the grace is {STOP_GRACE} s"
    );
    assert!(
        last_refused < after,
        "a socket was refused {last_refused:.3} s after SIGTERM, after one was given back"
    );
}

/// `icmp-guard unload` removes a pinned set at once, even a killed agent's whose lease still
/// runs.
#[test]
fn unload_gives_every_socket_back_at_once() {
    let cg = TestCgroup::new("restarts-unload");
    let pins = TestPins::new("restarts-unload");
    let agent = start_on(&cg, &pins, &strict_policy(), &[]);
    let lp = SocketLoop::start(&cg, RAW);
    assert!(!agent.signal(libc::SIGKILL).success());
    std::thread::sleep(Duration::from_millis(300));
    let before = monotonic();
    let out = Command::new(agent_bin())
        .args(["unload", &pins.arg()])
        .output()
        .unwrap();
    let after = monotonic();
    assert!(
        out.status.success(),
        "icmp-guard unload failed: {}",
        text(&out)
    );
    assert!(
        text(&out).contains("every socket is allowed again"),
        "{}",
        text(&out)
    );
    assert!(!pins.path.exists(), "unload left {}", pins.path.display());
    std::thread::sleep(Duration::from_millis(300));
    let attempts = lp.finish();
    let refused_after = attempts.refused_between(after, f64::MAX);
    assert!(
        refused_after.is_empty(),
        "{} sockets were refused after unload returned",
        refused_after.len()
    );
    assert!(
        !attempts.refused_between(before - 0.3, before).is_empty(),
        "the killed agent's set did not enforce before unload: the test means nothing"
    );
    let first = attempts
        .opened
        .first()
        .copied()
        .expect("sockets after unload");
    eprintln!(
        "unload: ran {:.3} s; the first socket was given back {:.3} s after it started",
        after - before,
        first - before
    );
    assert!(first - before < 1.0, "unload took {:.3} s", first - before);
}

/// A pinned set of another layout (an older agent's maps) is replaced: the new agent loads its
/// own beside it, and removes the old one only once its own enforces.
#[test]
fn an_incompatible_pinned_set_is_replaced_with_no_gap() {
    let cg = TestCgroup::new("restarts-layout");
    let pins = TestPins::new("restarts-layout");
    let old = start_on(&cg, &pins, &strict_policy(), &[]);
    let lp = SocketLoop::start(&cg, RAW);
    std::thread::sleep(Duration::from_millis(300));
    let gap_start = monotonic();
    assert!(!old.signal(libc::SIGKILL).success());
    let state = icmp_guard::kernel::pins::read_state(&pins.path).expect("the pinned STATE map");
    let layout = state.layout();
    assert_eq!(layout, icmp_guard::kernel::enforcer::LAYOUT);
    // What an agent of another version left: its layout number differs.
    state.set_layout(layout - 1);
    drop(state);
    let new = start_on(&cg, &pins, &strict_policy(), &[]);
    let gap_end = monotonic();
    new.wait_log(
        &format!("replacing the pinned set of layout {}", layout - 1),
        Duration::from_secs(1),
    );
    new.wait_log(
        &format!("removed the pinned set of layout {}", layout - 1),
        Duration::from_secs(1),
    );
    std::thread::sleep(Duration::from_millis(300));
    let attempts = lp.finish();
    attempts.assert_no_gap("incompatible layout replaced", gap_start, gap_end, 100);
    let status = icmp_guard::kernel::pins::status(&pins.path);
    assert_eq!(status.layout, layout, "{status:?}");
    assert_eq!(status.agent_pid, new.pid(), "{status:?}");
    assert!(
        !PathBuf::from(format!("{}-next", pins.path.display())).exists(),
        "the staging directory was left behind"
    );
    new.stop();
}

/// `probe` reports a pinned set whose agent is gone: still enforcing on its lease, its agent's
/// pid, not running.
#[test]
fn probe_reports_a_pinned_set_whose_agent_is_gone() {
    let cg = TestCgroup::new("restarts-probe");
    let pins = TestPins::new("restarts-probe");
    // A lease no slow `probe` start outlasts (under TCG with a loaded host, the default 10 s did
    // once): what is checked is what probe reports of a killed agent's set, not the lease.
    let agent = start_on(&cg, &pins, &strict_policy(), &["--lease-secs=60"]);
    let pid = agent.pid();
    let probe = |extra: &[&str]| {
        Command::new(agent_bin())
            .arg("probe")
            .arg(pins.arg())
            .args(extra)
            .output()
            .unwrap()
    };
    assert!(
        probe(&["--enforcing"]).status.success(),
        "probe --enforcing says a live agent's set does not enforce"
    );
    assert!(!agent.signal(libc::SIGKILL).success());
    let out = probe(&["--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let p = &report["pinned"];
    assert_eq!(p["present"], true, "{p}");
    assert_eq!(p["agent_pid"], pid, "{p}");
    assert_eq!(p["agent_running"], false, "{p}");
    assert_eq!(p["enforcing"], true, "{p}");
    assert_eq!(p["layout"], icmp_guard::kernel::enforcer::LAYOUT, "{p}");
    let link = if is_lsm() { "lsm" } else { "cgroup" };
    assert_eq!(p["links"], serde_json::json!([link]), "{p}");
    let left: u64 = s(p, "lease_left")
        .strip_suffix(" ms")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("lease_left: {p}"));
    assert!(left > 0 && left <= 60_000, "{p}");
    let out = probe(&["--enforcing"]);
    assert!(
        !out.status.success(),
        "probe --enforcing passes with the agent gone"
    );
    assert!(
        text(&out).contains(&format!("the agent that pinned it (pid {pid}) is gone")),
        "{}",
        text(&out)
    );
    let out = probe(&[]);
    assert!(
        text(&out).contains(&pins.path.display().to_string()),
        "{}",
        text(&out)
    );
}
