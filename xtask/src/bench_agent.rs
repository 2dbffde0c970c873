//! What the benchmarks that run the agent share: the release build, a cgroup of their own, and
//! the agent as a child process whose log is kept.

use std::{
    fs,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// `icmp_guard::agent::READY` (xtask does not link the agent, which builds BPF code).
const READY: &str = "enforcing with";

pub fn require_root(what: &str) -> Result<()> {
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("{what} loads BPF programs: run it as root");
    }
    Ok(())
}

/// `agent`, or target/release/icmp-guard built now.
pub fn release_agent(agent: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(a) = agent {
        return Ok(a);
    }
    let root = crate::vm::workspace_root();
    let st = Command::new(crate::vm::cargo_bin())
        .args(["build", "--release", "-p", "icmp-guard"])
        .current_dir(&root)
        .status()?;
    if !st.success() {
        bail!("cargo build --release failed");
    }
    Ok(root.join("target/release/icmp-guard"))
}

pub fn cgroup2_mount() -> Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mountinfo")?;
    mounts
        .lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            right
                .starts_with("cgroup2 ")
                .then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
        })
        .context("no cgroup v2 mount")
}

/// A host policy that allows `protocol` sockets only from `path`: every other program is
/// refused with a DefaultPosture alert.
pub fn host_allow_policy(protocol: &str, path: &Path) -> String {
    format!(
        "apiVersion: security.kubearmor.com/v1\nkind: KubeArmorHostPolicy\nmetadata:\n  \
         name: bench\nspec:\n  nodeSelector:\n    matchLabels:\n      kubernetes.io/os: linux\n  \
         network:\n    matchProtocols:\n    - protocol: {protocol}\n      fromSource:\n      \
         - path: {}\n  action: Allow\n",
        path.display()
    )
}

/// A running agent; SIGTERM and wait when dropped.
pub struct Agent {
    pub child: Child,
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Agent {
    /// `icmp-guard run --enforcer cgroup --cgroup CGROUP ARGS…`, once it reports ready.
    pub fn start(agent: &Path, cgroup: &Path, args: &[&str]) -> Result<Agent> {
        let mut child = Command::new(agent)
            .args(["run", "--enforcer", "cgroup", "--cgroup"])
            .arg(cgroup)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting the agent")?;
        let stderr = child.stderr.take().expect("piped");
        let log = Arc::new(Mutex::new(Vec::new()));
        {
            let log = log.clone();
            // Keeps draining, so the agent never blocks on a full pipe.
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    log.lock().expect("log").push(line);
                }
            });
        }
        let agent = Agent { child, log };
        agent.wait_log(READY, Duration::from_secs(60))?;
        Ok(agent)
    }

    pub fn wait_log(&self, needle: &str, timeout: Duration) -> Result<String> {
        let start = Instant::now();
        loop {
            if let Some(l) = self
                .log
                .lock()
                .expect("log")
                .iter()
                .find(|l| l.contains(needle))
            {
                return Ok(l.clone());
            }
            if start.elapsed() > timeout {
                bail!(
                    "the agent did not log {needle:?} within {timeout:?}; its log:\n{}",
                    self.log.lock().expect("log").join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_count(&self, needle: &str) -> usize {
        self.log
            .lock()
            .expect("log")
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// SIGTERM, then waits for the exit.
    pub fn stop(&mut self) -> Result<()> {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let st = self.child.wait()?;
        // Let the log reader take the last lines.
        std::thread::sleep(Duration::from_millis(100));
        if !st.success() {
            bail!("the agent exited with {st}");
        }
        Ok(())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let _ = self.child.wait();
        }
    }
}
