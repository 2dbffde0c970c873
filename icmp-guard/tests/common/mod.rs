//! Harness for the privileged end-to-end tests: start the real agent against the real kernel,
//! run real programs in a test cgroup and a private network namespace, read the alerts.
//!
//! The same tests run on the host (cgroup enforcer) and inside the qemu VM (LSM enforcer, via
//! `cargo xtask vm-test`); the environment variables below tell them where they are.
//! They never skip: without root or without a tool they fail and say what is missing.
#![allow(dead_code)]

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use serde_json::Value;

pub fn enforcer() -> String {
    std::env::var("ICMP_GUARD_ENFORCER").unwrap_or_else(|_| "cgroup".into())
}

pub fn is_lsm() -> bool {
    enforcer() == "lsm"
}

pub fn agent_bin() -> PathBuf {
    std::env::var_os("ICMP_GUARD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_icmp-guard")))
}

pub fn policies_dir() -> PathBuf {
    std::env::var_os("ICMP_GUARD_POLICIES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../policies")))
}

pub fn require_root() {
    // SAFETY: no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "these tests load BPF programs into the running kernel: run them as root \
         (the README's test command does)"
    );
}

pub fn require_tool(path: &str) -> &str {
    assert!(
        Path::new(path).exists(),
        "{path} is missing: install it (the README's test command installs hping3, nmap, \
         iputils-ping and python3)"
    );
    path
}

pub const PING: &str = "/usr/bin/ping";
pub const HPING3: &str = "/usr/sbin/hping3";
pub const PYTHON: &str = "/usr/bin/python3";

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// A scratch directory unique to this test.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "icmp-guard-test-{}-{}-{name}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub fn cgroup2_mount() -> PathBuf {
    icmp_guard::sources::workload::cgroup2_mount().unwrap_or_else(|e| panic!("{e:#}"))
}

/// A child cgroup that is removed when dropped.
pub struct TestCgroup {
    pub path: PathBuf,
}

impl TestCgroup {
    pub fn new(name: &str) -> Self {
        let path = cgroup2_mount().join(format!(
            "icmp-guard-test-{}-{}-{name}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).unwrap();
        TestCgroup { path }
    }

    pub fn at(path: PathBuf) -> Self {
        std::fs::create_dir_all(&path).unwrap();
        TestCgroup { path }
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Processes have exited by now; a cgroup with none left can be removed.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.path).is_ok() || !self.path.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

pub use icmp_guard::cli::sandbox::Placement;

pub fn placement(cg: &TestCgroup) -> Placement {
    Placement::in_cgroup(&cg.path)
}

/// Runs `argv` in `place`; returns its output. Times out after 30 s.
pub fn run_probe(place: &Placement, argv: &[&str]) -> Output {
    icmp_guard::cli::sandbox::run(place, argv, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{argv:?}: {e}"))
}

pub fn spawn_probe(place: &Placement, argv: &[&str], stdin: Stdio) -> Child {
    icmp_guard::cli::sandbox::spawn(place, argv, stdin)
        .unwrap_or_else(|e| panic!("spawning {argv:?}: {e}"))
}

pub fn wait_with_timeout(child: Child, timeout: Duration, what: &[&str]) -> Output {
    icmp_guard::cli::sandbox::wait(child, timeout).unwrap_or_else(|e| panic!("{what:?}: {e}"))
}

pub fn text(o: &Output) -> String {
    icmp_guard::cli::sandbox::text(o)
}

/// True when the output shows the kernel's refusal (EPERM/EACCES as the tools print it).
pub fn refused(o: &Output) -> bool {
    icmp_guard::cli::sandbox::reported_errno(o).is_some()
}

/// A running agent.
pub struct Agent {
    child: Option<Child>,
    pub alerts: PathBuf,
    pub log: Arc<Mutex<Vec<String>>>,
    pub dir: PathBuf,
    /// The pin directory this harness gave the agent, removed when it stops: each test's
    /// agent has its own, so tests never adopt each other's sets. `None` when the test passed
    /// its own `--pin-dir` (or `--no-pin`) and owns it.
    pub own_pins: Option<PathBuf>,
}

/// A unique pin directory for a test's agent.
pub fn test_pin_dir(name: &str) -> PathBuf {
    PathBuf::from(format!(
        "/sys/fs/bpf/icmp-guard-test-{}-{}-{name}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ))
}

pub struct AgentSpec<'a> {
    pub policy: Option<&'a Path>,
    pub config: Option<&'a Path>,
    /// The cgroup the cgroup enforcer attaches to (ignored under LSM).
    pub attach: &'a Path,
    pub extra: &'a [&'a str],
}

impl Agent {
    pub fn start(spec: AgentSpec) -> Agent {
        Agent::start_with(spec, |_| {})
    }

    /// As [`Agent::start`], with `prepare` adjusting the command first (e.g. to enter a network
    /// namespace).
    pub fn start_with(spec: AgentSpec, prepare: impl FnOnce(&mut Command)) -> Agent {
        require_root();
        let dir = scratch("agent");
        let alerts = dir.join("alerts.jsonl");
        let mut cmd = Command::new(agent_bin());
        cmd.arg("run")
            .arg("--enforcer")
            .arg(enforcer())
            .arg("--output")
            .arg(&alerts)
            .arg("--cgroup")
            .arg(spec.attach)
            .args(spec.extra)
            .env("RUST_LOG", "info");
        if let Some(p) = spec.policy {
            cmd.arg("--policy").arg(p);
        }
        if let Some(c) = spec.config {
            cmd.arg("--config").arg(c);
        }
        let own_pins = (!spec
            .extra
            .iter()
            .any(|a| a.starts_with("--pin-dir") || *a == "--no-pin"))
        .then(|| test_pin_dir("agent"));
        if let Some(p) = &own_pins {
            cmd.arg("--pin-dir").arg(p);
        }
        prepare(&mut cmd);
        let spawned =
            icmp_guard::agent::spawn_until_ready(cmd, Duration::from_secs(90), Some("[agent]"))
                .unwrap_or_else(|e| panic!("{e:#}"));
        Agent {
            child: Some(spawned.process),
            alerts,
            log: spawned.log,
            dir,
            own_pins,
        }
    }

    pub fn wait_log(&self, needle: &str, timeout: Duration) -> String {
        let start = Instant::now();
        loop {
            if let Some(l) = self.log.lock().unwrap().iter().find(|l| l.contains(needle)) {
                return l.clone();
            }
            if start.elapsed() > timeout {
                panic!(
                    "agent did not log {needle:?} within {timeout:?}; its log:\n{}",
                    self.log.lock().unwrap().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_count(&self, needle: &str) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    pub fn alerts(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(&self.alerts).unwrap_or_default();
        // A line still being written has no newline yet; it is read on the next poll.
        let complete = text.rfind('\n').map(|i| &text[..=i]).unwrap_or("");
        complete
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad alert {l}: {e}")))
            .collect()
    }

    /// Waits up to 10 s for an alert `pred` accepts.
    pub fn wait_alert(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let start = Instant::now();
        loop {
            if let Some(a) = self.alerts().into_iter().find(|a| pred(a)) {
                return a;
            }
            if start.elapsed() > Duration::from_secs(10) {
                panic!(
                    "no alert for {what} within 10 s; alerts so far:\n{}",
                    self.alerts()
                        .iter()
                        .map(|a| a.to_string())
                        .collect::<Vec<_>>()
                        .join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Lets in-flight alerts arrive, then returns all alerts.
    pub fn settled_alerts(&self) -> Vec<Value> {
        std::thread::sleep(Duration::from_millis(700));
        self.alerts()
    }

    /// SIGTERM, and the agent must exit cleanly.
    pub fn stop(mut self) {
        self.stop_inner();
    }

    /// The agent's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the agent runs").id()
    }

    /// Sends `sig` and waits (up to 15 s) for the agent to exit; returns how it exited. A pin
    /// directory the harness gave the agent is removed after; one the test passed is left as
    /// the agent left it.
    pub fn signal(mut self, sig: i32) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("the agent runs");
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(child.id() as i32, sig) };
        let start = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if start.elapsed() > Duration::from_secs(15) {
                let _ = child.kill();
                panic!(
                    "agent did not exit within 15 s of signal {sig}; log:\n{}",
                    self.log.lock().unwrap().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        self.unpin();
        status
    }

    fn stop_inner(&mut self) {
        if let Some(mut child) = self.child.take() {
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let start = Instant::now();
            loop {
                if let Some(status) = child.try_wait().unwrap() {
                    assert!(
                        status.success(),
                        "agent exited with {status} after SIGTERM; log:\n{}",
                        self.log.lock().unwrap().join("\n")
                    );
                    break;
                }
                if start.elapsed() > Duration::from_secs(15) {
                    let _ = child.kill();
                    panic!("agent did not stop within 15 s of SIGTERM");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.unpin();
    }

    /// Removes the pinned set the harness gave this agent: its sockets are given back at once,
    /// as a test that stops an agent expects.
    fn unpin(&mut self) {
        if let Some(p) = self.own_pins.take()
            && p.exists()
        {
            icmp_guard::kernel::pins::unload(&p).unwrap_or_else(|e| {
                panic!("removing the test's pinned set {}: {e:#}", p.display())
            });
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(p) = self.own_pins.take() {
            let _ = icmp_guard::kernel::pins::unload(&p);
        }
    }
}

/// `CLOCK_MONOTONIC` in seconds: the clock of Python's `time.monotonic()`, so that times taken
/// here and in a probe compare.
pub fn monotonic() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// A pin directory a test owns (for agents it starts one after the other); its set is removed
/// when dropped.
pub struct TestPins {
    pub path: PathBuf,
}

impl TestPins {
    pub fn new(name: &str) -> Self {
        TestPins {
            path: test_pin_dir(name),
        }
    }

    pub fn arg(&self) -> String {
        format!("--pin-dir={}", self.path.display())
    }
}

impl Drop for TestPins {
    fn drop(&mut self) {
        if self.path.exists() {
            let _ = icmp_guard::kernel::pins::unload(&self.path);
        }
    }
}

pub fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

/// Python one-liners used as probes: python is also the "interpreter" identity case.
pub fn py_socket(family: &str, kind: &str, proto: &str) -> String {
    format!(
        "import socket,sys\n\
         try:\n    socket.socket(socket.{family}, socket.{kind}, {proto}).close(); print('OPENED')\n\
         except OSError as e:\n    print('REFUSED', e.errno, e.strerror); sys.exit(3)\n"
    )
}
