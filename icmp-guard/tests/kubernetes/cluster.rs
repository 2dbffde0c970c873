//! The test cluster as the tests see it: `kubectl` with the harness's kubeconfig, a namespace
//! per test, pods and their containers, the agent started on the node, probes inside pods, and
//! the API server stopped and started again.
//!
//! Everything comes from the environment `cargo xtask k8s test` gives its command. Without it
//! the tests fail and say so: they never skip.

use std::{
    ffi::OsString,
    io::Read,
    os::unix::{ffi::OsStringExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::Once,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde_json::Value;

use crate::common::{Agent, AgentSpec, cgroup2_mount, scratch};

/// An environment variable `cargo xtask k8s test` sets; its absence is a failure.
pub fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: these tests need the test cluster; run them under the harness, \
             e.g. `cargo xtask k8s test -- cargo test --release -p icmp-guard --test \
             kubernetes -- --test-threads=1` (scripts/test.sh does)"
        )
    })
}

pub fn node() -> String {
    env("ICMP_GUARD_K8S_NODE")
}

pub fn image() -> String {
    env("ICMP_GUARD_TESTBOX_IMAGE")
}

pub fn state_dir() -> PathBuf {
    PathBuf::from(env("ICMP_GUARD_K8S_STATE"))
}

pub fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

/// The seed policy, as committed.
pub fn seed_policy_text() -> String {
    std::fs::read_to_string(repo_file("policies/kubearmor/restrict-scanning-tools.yaml")).unwrap()
}

/// The seed policy moved to namespace `ns` (only `metadata.namespace` changes).
pub fn seed_policy_in(ns: &str) -> String {
    let text = seed_policy_text();
    assert!(text.contains("namespace: default\n"));
    text.replace("namespace: default\n", &format!("namespace: {ns}\n"))
}

pub fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Runs `cmd` to its end, killing it after `timeout`; stdin from `input`.
pub fn run_with_timeout(mut cmd: Command, input: Option<&str>, timeout: Duration) -> Output {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {what}: {e}"));
    if let Some(text) = input {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(text.as_bytes()).unwrap();
    }
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
    }
}

pub fn kubectl_cmd(args: &[&str]) -> Command {
    let mut c = Command::new(env("ICMP_GUARD_KUBECTL"));
    c.env("KUBECONFIG", env("KUBECONFIG")).args(args);
    c
}

/// `kubectl ARGS`, whatever its exit status.
pub fn kubectl_output(args: &[&str], input: Option<&str>) -> Output {
    // Longer than every `--timeout` the tests give kubectl itself.
    run_with_timeout(kubectl_cmd(args), input, Duration::from_secs(240))
}

/// `kubectl ARGS`; its stdout. A failure fails the test with kubectl's message.
pub fn kubectl(args: &[&str]) -> String {
    kubectl_in(args, None)
}

pub fn kubectl_in(args: &[&str], input: Option<&str>) -> String {
    let o = kubectl_output(args, input);
    assert!(
        o.status.success(),
        "kubectl {} failed ({}):\n{}{}",
        args.join(" "),
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn apply(yaml: &str) -> String {
    kubectl_in(&["apply", "-f", "-"], Some(yaml))
}

pub fn get_json(args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    serde_json::from_str(&kubectl(&all)).unwrap()
}

/// KubeArmor's CRDs (`deploy/kubernetes/00-crds.yaml`), once per test process.
pub fn install_crds() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let crds = repo_file("deploy/kubernetes/00-crds.yaml");
        kubectl(&["apply", "-f", crds.to_str().unwrap()]);
        kubectl(&[
            "wait",
            "--for=condition=established",
            "--timeout=60s",
            "crd/kubearmorpolicies.security.kubearmor.com",
            "crd/kubearmorhostpolicies.security.kubearmor.com",
        ]);
    });
}

/// Waits until no pod and no KubeArmorPolicy of another namespace is left (earlier tests delete
/// theirs without waiting): a test that counts the agent's updates must not see those go.
pub fn wait_for_other_namespaces_to_empty(ns: &str) {
    let others = |kind: &str| -> Vec<String> {
        kubectl(&[
            "get",
            kind,
            "--all-namespaces",
            "-o",
            "jsonpath={range .items[*]}{.metadata.namespace}/{.metadata.name}{\"\\n\"}{end}",
        ])
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with(&format!("{ns}/")))
        .map(str::to_string)
        .collect()
    };
    wait_until(
        Duration::from_secs(120),
        "the pods and policies of earlier tests gone",
        || others("pods").is_empty() && others("kubearmorpolicies").is_empty(),
    );
}

/// A namespace of one test, deleted when dropped (with everything in it).
pub struct Namespace {
    pub name: String,
    owned: bool,
}

impl Namespace {
    pub fn new(name: &str) -> Namespace {
        install_crds();
        // A namespace left by an earlier, interrupted run of the same test goes first.
        let _ = kubectl_output(&["delete", "namespace", name, "--wait=true"], None);
        apply(&format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n"
        ));
        // Pods need the namespace's default ServiceAccount, which a controller creates.
        wait_until(
            Duration::from_secs(60),
            "the default service account",
            || {
                kubectl_output(&["-n", name, "get", "serviceaccount", "default"], None)
                    .status
                    .success()
            },
        );
        Namespace {
            name: name.to_string(),
            owned: true,
        }
    }

    /// A namespace the test did not make (`default`): never deleted.
    pub fn existing(name: &str) -> Namespace {
        Namespace {
            name: name.to_string(),
            owned: false,
        }
    }

    pub fn kubectl(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend(args);
        kubectl(&all)
    }

    pub fn kubectl_output(&self, args: &[&str], input: Option<&str>) -> Output {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend(args);
        kubectl_output(&all, input)
    }

    /// A pod running the testbox image, labelled `labels`, running `command` (default: sleep).
    pub fn pod(&self, name: &str, labels: &[(&str, &str)], command: Option<&[&str]>) -> String {
        pod_yaml(&self.name, name, labels, command, "Always")
    }

    pub fn apply(&self, yaml: &str) -> String {
        apply(yaml)
    }

    /// Waits for the pod to be Ready; returns it as the API has it.
    pub fn ready(&self, pod: &str) -> Pod {
        self.kubectl(&[
            "wait",
            "--for=condition=Ready",
            "--timeout=180s",
            &format!("pod/{pod}"),
        ]);
        self.get_pod(pod)
    }

    pub fn get_pod(&self, pod: &str) -> Pod {
        Pod(get_json(&["-n", &self.name, "get", "pod", pod]))
    }

    /// Runs `argv` in the pod's first container through `kubectl exec` (60 s at most).
    pub fn exec(&self, pod: &str, argv: &[&str]) -> Output {
        self.exec_in(pod, argv, None)
    }

    pub fn exec_in(&self, pod: &str, argv: &[&str], input: Option<&str>) -> Output {
        let mut args = vec!["-n", self.name.as_str(), "exec"];
        if input.is_some() {
            args.push("-i");
        }
        args.extend([pod, "--"]);
        args.extend(argv);
        run_with_timeout(kubectl_cmd(&args), input, Duration::from_secs(60))
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        let _ = kubectl_output(&["delete", "namespace", &self.name, "--wait=false"], None);
    }
}

pub fn pod_yaml(
    ns: &str,
    name: &str,
    labels: &[(&str, &str)],
    command: Option<&[&str]>,
    restart: &str,
) -> String {
    let labels: String = labels
        .iter()
        .map(|(k, v)| format!("    {k}: {v}\n"))
        .collect();
    let command = serde_json::to_string(command.unwrap_or(&["sleep", "1000000"])).unwrap();
    format!(
        "apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: {ns}
  labels:
{labels}spec:
  terminationGracePeriodSeconds: 1
  restartPolicy: {restart}
  containers:
  - name: box
    image: {image}
    imagePullPolicy: Never
    command: {command}
",
        image = image()
    )
}

/// A pod as the API has it.
pub struct Pod(pub Value);

impl Pod {
    pub fn name(&self) -> &str {
        self.0["metadata"]["name"].as_str().unwrap()
    }

    fn status(&self) -> &Value {
        &self.0["status"]["containerStatuses"][0]
    }

    /// The runtime's id of its first container (64 hex digits).
    pub fn container_id(&self) -> String {
        let id = self.status()["containerID"].as_str().unwrap_or("");
        let id = id.split_once("://").map(|(_, id)| id).unwrap_or("");
        assert_eq!(
            id.len(),
            64,
            "container id of {}: {:?}",
            self.name(),
            self.0
        );
        id.to_string()
    }

    pub fn container_name(&self) -> String {
        self.status()["name"].as_str().unwrap().to_string()
    }

    /// `image@sha256:…`, as KubeArmor writes ContainerImage: the status' image and the
    /// digest of its imageID.
    pub fn container_image(&self) -> String {
        let image = self.status()["image"].as_str().unwrap();
        let id = self.status()["imageID"].as_str().unwrap();
        let digest = id.rsplit_once('@').map(|(_, d)| d).unwrap_or(id);
        assert!(digest.starts_with("sha256:"), "imageID {id}");
        format!("{image}@{digest}")
    }

    pub fn phase(&self) -> &str {
        self.0["status"]["phase"].as_str().unwrap_or("")
    }
}

/// Polls `cond` every 50 ms; fails the test after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < timeout, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The cgroup the cgroup enforcer attaches to: the kubelet's `kubepods`, never the root.
pub fn kubepods() -> PathBuf {
    let p = cgroup2_mount().join("kubepods");
    assert!(
        p.is_dir(),
        "{} is missing: is the test cluster's kubelet running (cgroupfs driver)?",
        p.display()
    );
    p
}

/// The agent on the node, as the tests run it: the cgroup enforcer on the kubepods subtree,
/// an empty host policy directory (the embedded host default must not touch the host), the
/// cluster through the admin kubeconfig, cluster name `0-trust` as in the seed's alert.
pub fn start_agent() -> Agent {
    let dir = scratch("k8s-agent");
    let empty = dir.join("no-host-policies");
    std::fs::create_dir_all(&empty).unwrap();
    let config = dir.join("config.yaml");
    std::fs::write(&config, "clusterName: 0-trust\n").unwrap();
    let kubeconfig = env("KUBECONFIG");
    let node = node();
    let agent = Agent::start(AgentSpec {
        policy: Some(&empty),
        config: Some(&config),
        attach: &kubepods(),
        extra: &["--kubeconfig", &kubeconfig, "--node-name", &node],
    });
    // Leaked on purpose: the scratch directory lives as long as the test process.
    std::mem::forget(dir);
    agent
}

/// Waits for the agent to say that the container's sources are in force; returns the line.
pub fn wait_in_force(agent: &Agent, container_id: &str) -> String {
    agent.wait_log(
        &format!("container {} (", &container_id[..12]),
        Duration::from_secs(30),
    )
}

/// One attempt of a probe loop running in a pod: when it started and ended (seconds since
/// the epoch, the host's clock: pods share it), and whether the socket was refused.
#[derive(Clone, Copy, Debug)]
pub struct Attempt {
    pub start: f64,
    pub end: f64,
    pub refused: bool,
}

/// A pod command that tries `probe` (a shell command opening a socket) every 20 ms and prints
/// `START END ok|refused` per attempt, timed by bash's `$EPOCHREALTIME`.
pub fn probe_loop(probe: &str) -> Vec<String> {
    let script = format!(
        "while :; do t0=$EPOCHREALTIME; if {probe} >/dev/null 2>&1; then r=ok; else r=refused; fi; \
         echo \"$t0 $EPOCHREALTIME $r\"; sleep 0.02; done"
    );
    vec!["/bin/bash".into(), "-c".into(), script]
}

/// The probe's attempts so far, read from the pod's log.
pub fn attempts(ns: &Namespace, pod: &str) -> Vec<Attempt> {
    ns.kubectl(&["logs", pod])
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let start = f.next()?.parse().ok()?;
            let end = f.next()?.parse().ok()?;
            let refused = match f.next()? {
                "ok" => false,
                "refused" => true,
                _ => return None,
            };
            Some(Attempt {
                start,
                end,
                refused,
            })
        })
        .collect()
}

/// Waits until the probe shows `refused` on attempts started after `since`.
pub fn wait_probe(ns: &Namespace, pod: &str, since: f64, refused: bool, what: &str) {
    wait_until(Duration::from_secs(30), what, || {
        attempts(ns, pod)
            .iter()
            .any(|a| a.start > since && a.refused == refused)
    });
}

/// After a change at `changed` (when kubectl returned): the time to the end of the first
/// attempt that shows the new behaviour, having checked that every attempt started before
/// `changed` showed the old one and every attempt after the first new one shows the new one
/// too. Waits `settle` first so that enough attempts follow.
pub fn time_to_flip(
    ns: &Namespace,
    pod: &str,
    changed: f64,
    now_refused: bool,
    settle: Duration,
) -> f64 {
    std::thread::sleep(settle);
    let all = attempts(ns, pod);
    let before: Vec<&Attempt> = all
        .iter()
        .filter(|a| a.end < changed)
        .rev()
        .take(5)
        .collect();
    assert!(
        !before.is_empty() && before.iter().all(|a| a.refused != now_refused),
        "the probe in {pod} did not show the old behaviour just before the change: {before:?}"
    );
    let after: Vec<&Attempt> = all.iter().filter(|a| a.start >= changed).collect();
    let first = after
        .iter()
        .position(|a| a.refused == now_refused)
        .unwrap_or_else(|| {
            panic!(
                "the probe in {pod} never showed the new behaviour (refused: {now_refused}) in \
                 {settle:?}: {after:?}"
            )
        });
    let flapping: Vec<&&Attempt> = after[first..]
        .iter()
        .filter(|a| a.refused != now_refused)
        .collect();
    assert!(
        flapping.is_empty(),
        "the probe in {pod} went back to the old behaviour after the change: {flapping:?}"
    );
    assert!(
        after.len() - first >= 5,
        "too few attempts after the change to judge: {after:?}"
    );
    after[first].end - changed
}

/// The API server, stopped: its command line, working directory and log, to start it again
/// exactly as the harness did. The pid file is rewritten, so `cargo xtask k8s stop` finds the
/// new process.
pub struct StoppedApiServer {
    argv: Vec<OsString>,
    cwd: PathBuf,
    restarted: bool,
}

const APISERVER: &str = "kube-apiserver";

fn apiserver_pid_file() -> PathBuf {
    state_dir().join("pids").join(format!("{APISERVER}.pid"))
}

fn alive(pid: i32) -> bool {
    // A zombie (stopped, not reaped yet by the harness that started it) is gone for us.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .is_some_and(|state| state != "Z" && state != "X")
        })
        .unwrap_or(false)
}

/// Stops the API server with SIGTERM (its graceful shutdown closes every watch; SIGKILL if that
/// takes more than 15 s), and waits until it is gone and its port refuses connections.
pub fn stop_apiserver() -> StoppedApiServer {
    let pid: i32 = std::fs::read_to_string(apiserver_pid_file())
        .expect("the harness's kube-apiserver pid file")
        .trim()
        .parse()
        .unwrap();
    let argv: Vec<OsString> = std::fs::read(format!("/proc/{pid}/cmdline"))
        .expect("the API server's command line")
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| OsString::from_vec(a.to_vec()))
        .collect();
    assert!(
        argv[0].to_string_lossy().ends_with(APISERVER),
        "pid {pid} is not the API server: {argv:?}"
    );
    let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap();
    // SAFETY: plain kill(2) of the pid the harness recorded and we just checked.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    // Its graceful shutdown waits up to 60 s for open requests to end (the kubelet's and the
    // agent's watches may not); past 15 s it is killed, which is an outage all the same.
    let start = Instant::now();
    while alive(pid) && start.elapsed() < Duration::from_secs(15) {
        std::thread::sleep(Duration::from_millis(50));
    }
    if alive(pid) {
        // SAFETY: as above.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    }
    wait_until(Duration::from_secs(10), "the API server exits", || {
        !alive(pid)
    });
    wait_until(Duration::from_secs(10), "port 6443 closed", || {
        std::net::TcpStream::connect("127.0.0.1:6443").is_err()
    });
    StoppedApiServer {
        argv,
        cwd,
        restarted: false,
    }
}

impl StoppedApiServer {
    /// Starts the API server again with the same command line, directory and log file (in its
    /// own session, as the harness does), and waits until it is ready.
    pub fn restart(mut self) {
        self.start();
    }

    fn start(&mut self) {
        if self.restarted {
            return;
        }
        self.restarted = true;
        let log_path = state_dir().join("logs").join(format!("{APISERVER}.log"));
        let log = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&log_path)
            .unwrap();
        let mut cmd = Command::new(&self.argv[0]);
        cmd.args(&self.argv[1..])
            .current_dir(&self.cwd)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        // SAFETY: setsid is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let child = cmd.spawn().expect("starting the API server again");
        std::fs::write(apiserver_pid_file(), format!("{}\n", child.id())).unwrap();
        // Not waited for: the harness's stop ends it by its pid file.
        std::mem::forget(child);
        wait_until(
            Duration::from_secs(120),
            "the API server ready again",
            || {
                kubectl_output(&["get", "--raw", "/readyz"], None)
                    .status
                    .success()
            },
        );
    }
}

impl Drop for StoppedApiServer {
    fn drop(&mut self) {
        // A failed test must not leave the cluster without its API server.
        self.start();
    }
}

/// Runs `argv` in a running container through containerd itself (`ctr task exec`): what works
/// while the API server (hence `kubectl exec`) is down.
pub fn ctr_exec(container_id: &str, argv: &[&str]) -> Output {
    static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let exec_id = format!(
        "icmp-guard-test-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let mut cmd = Command::new("ctr");
    cmd.arg("--address")
        .arg(env("ICMP_GUARD_CONTAINERD_SOCK"))
        .args(["--namespace", "k8s.io", "task", "exec", "--exec-id"])
        .arg(&exec_id)
        .arg(container_id)
        .args(argv);
    run_with_timeout(cmd, None, Duration::from_secs(60))
}

pub fn out(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}
