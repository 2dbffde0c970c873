//! `cargo xtask k8s start`, `status` and `kubectl`: the components, their flags,
//! and the checks that say the cluster is usable.
//!
//! Everything listens on 127.0.0.1 except what pods need: the apiserver binds
//! 0.0.0.0 and advertises 10.250.0.1 (the harness's interface), so the `kubernetes`
//! Service (10.96.0.1:443) reaches it from pods and host-network pods alike, with
//! unmodified in-cluster manifests; the kubelet serves on 10.250.0.1 (the node's
//! InternalIP, which the apiserver uses for exec/logs). The guard chains of `host`
//! keep both from being reached from outside the machine.

use std::ffi::OsStr;
use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};

use super::{
    APISERVER_PORT, CLUSTER_CIDR, CLUSTER_DNS_IP, CNI_BRIDGE, Layout, NODE_IP, POD_SUBNET,
    SERVICE_CIDR, build, ctr, host, image, node_name, pki, require_root, run_checked, stop,
};

/// The components in start order; `stop` goes backwards (with exceptions, see there).
pub const COMPONENTS: [&str; 7] = [
    "containerd",
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubelet",
    "kube-proxy",
];

const ETCD_CLIENT: &str = "127.0.0.1:2379";
const WAIT_APISERVER: Duration = Duration::from_secs(90);
const WAIT_NODE: Duration = Duration::from_secs(180);

/// The executable a component runs from (checked against /proc/<pid>/cmdline, so a
/// stale pid file never makes us signal an unrelated process).
pub fn component_exe(layout: &Layout, name: &str) -> PathBuf {
    match name {
        "containerd" => PathBuf::from("/usr/bin/containerd"),
        "etcd" => PathBuf::from("/usr/bin/etcd"),
        other => layout.binary(other),
    }
}

/// The pid of a running component, from its pid file.
pub fn component_pid(layout: &Layout, name: &str) -> Option<i32> {
    let pid: i32 = fs::read_to_string(layout.pids().join(format!("{name}.pid")))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let argv0 = cmdline.split(|b| *b == 0).next()?;
    (Path::new(OsStr::from_bytes(argv0)) == component_exe(layout, name)).then_some(pid)
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// `2026-11-21T23:41:41Z` -> seconds since the epoch (what the API writes for
/// condition timestamps; always UTC).
pub fn parse_rfc3339_utc(s: &str) -> Option<i64> {
    let s = s.trim().strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.splitn(3, '-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.splitn(3, ':').map(|p| p.parse::<f64>().ok());
    let (hh, mm, ss) = (t.next()??, t.next()??, t.next()??);
    // days from civil (Howard Hinnant)
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + (hh as i64) * 3600 + (mm as i64) * 60 + ss as i64)
}

/// kubectl with the admin kubeconfig, quiet on failure (for polling).
fn kubectl_output(layout: &Layout, args: &[&str]) -> Option<String> {
    let out = Command::new(layout.kubectl())
        .arg("--kubeconfig")
        .arg(layout.admin_kubeconfig())
        .args(["--request-timeout", "5s"])
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn apiserver_ready(layout: &Layout) -> bool {
    layout.admin_kubeconfig().exists()
        && kubectl_output(layout, &["get", "--raw", "/readyz"]).is_some_and(|s| s.trim() == "ok")
}

/// (Ready status, heartbeat seconds since the epoch) of our node.
pub fn node_ready(layout: &Layout, node: &str) -> Option<(bool, i64)> {
    let out = kubectl_output(
        layout,
        &[
            "get",
            "node",
            node,
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Ready\")].status} {.status.conditions[?(@.type==\"Ready\")].lastHeartbeatTime}",
        ],
    )?;
    let (status, hb) = out.trim().split_once(' ')?;
    Some((status == "True", parse_rfc3339_utc(hb)?))
}

/// When the kubelet last renewed the node's Lease. With leases on (1.20's default)
/// the Ready condition's heartbeat is only rewritten every 5 minutes when nothing
/// changes; the lease is renewed every 10 s, so it says whether the kubelet is alive.
pub fn lease_renewed(layout: &Layout, node: &str) -> Option<i64> {
    let out = kubectl_output(
        layout,
        &[
            "-n",
            "kube-node-lease",
            "get",
            "lease",
            node,
            "-o",
            "jsonpath={.spec.renewTime}",
        ],
    )?;
    parse_rfc3339_utc(&out)
}

/// Up and usable: every component runs, the apiserver is ready, and the node is Ready
/// with its lease renewed in the last minute.
pub fn healthy(layout: &Layout, node: &str) -> bool {
    COMPONENTS
        .iter()
        .all(|c| component_pid(layout, c).is_some())
        && apiserver_ready(layout)
        && node_ready(layout, node).is_some_and(|(ready, _)| ready)
        && lease_renewed(layout, node).is_some_and(|t| now_secs() as i64 - t < 60)
}

/// A `flock` on `<state>/lock`, held while start/stop/test change the cluster, so
/// two harness runs never start or stop the same state dir at once.
pub struct StateLock {
    _file: fs::File,
}

impl StateLock {
    pub fn acquire(layout: &Layout) -> Result<StateLock> {
        use std::os::fd::AsRawFd;
        fs::create_dir_all(&layout.state)
            .with_context(|| format!("creating {}", layout.state.display()))?;
        let path = layout.state.join("lock");
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: flock on an fd we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            eprintln!(
                "k8s: another harness run holds {}; waiting for it",
                path.display()
            );
            // SAFETY: as above, blocking this time.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
                bail!(
                    "flock {}: {}",
                    path.display(),
                    std::io::Error::last_os_error()
                );
            }
        }
        Ok(StateLock { _file: file })
    }
}

pub fn run_start() -> Result<()> {
    let layout = Layout::new()?;
    let _lock = StateLock::acquire(&layout)?;
    start(&layout, false)?;
    Ok(())
}

/// What `start` reports to `test`.
pub struct Started {
    pub node: String,
    pub ready_after: Duration,
}

/// Starts the cluster (or finds it running). `fresh`: wipe etcd and the kubelet dir
/// first, so no object from an earlier run exists (a running cluster is stopped for
/// that).
pub fn start(layout: &Layout, fresh: bool) -> Result<Started> {
    require_root("start")?;
    let t0 = Instant::now();
    let node = node_name();
    if !build::binaries_present(layout) || !image::images_present(layout) {
        bail!(
            "the Kubernetes binaries or images are not in {}; run `cargo xtask k8s build` first",
            layout.root.display()
        );
    }
    let any_running = COMPONENTS
        .iter()
        .any(|c| component_pid(layout, c).is_some());
    if any_running && !fresh && healthy(layout, &node) {
        println!(
            "k8s start: the cluster is already up (node {node} Ready)\nexport KUBECONFIG={}",
            layout.admin_kubeconfig().display()
        );
        return Ok(Started {
            node,
            ready_after: t0.elapsed(),
        });
    }
    if any_running || layout.host_saved().join("complete").exists() {
        eprintln!(
            "k8s start: {} left over from an earlier run; stopping it first",
            if any_running {
                "an unhealthy or unwanted cluster is"
            } else {
                "host state is"
            }
        );
        stop::stop(layout, false)?;
    }
    if fresh {
        for d in [layout.etcd_data(), layout.kubelet_dir()] {
            if d.exists() {
                fs::remove_dir_all(&d).with_context(|| format!("removing {}", d.display()))?;
            }
        }
    }
    preflight()?;
    // On cgroup v1 hybrid the kubelet's cgroupfs driver makes `kubepods` in the v1 hierarchies
    // only; runc makes it in cgroup2 with the first container. The agent attaches there
    // (`--cgroup …/unified/kubepods`) and may start before any pod: it is made here, and
    // removed by `stop` with the other kubepods directories.
    let unified = Path::new("/sys/fs/cgroup/unified");
    if unified.join("cgroup.controllers").exists() {
        fs::create_dir_all(unified.join("kubepods"))
            .context("creating /sys/fs/cgroup/unified/kubepods")?;
    }

    for d in [
        layout.pids(),
        layout.component_logs(),
        layout.etcd_data(),
        layout.containerd_dir(),
        layout.kubelet_dir(),
        layout.cni_dir().join("net.d"),
    ] {
        fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    }
    // From here on, anything that fails leaves processes and host changes behind:
    // undo them before returning the error.
    let result = start_components(layout, &node, t0);
    match result {
        Ok(ready_after) => {
            println!(
                "k8s start: node {node} Ready after {:.1} s\nexport KUBECONFIG={}",
                ready_after.as_secs_f64(),
                layout.admin_kubeconfig().display()
            );
            Ok(Started { node, ready_after })
        }
        Err(e) => {
            eprintln!("k8s start: failed: {e:#}\nk8s start: stopping what was started");
            if let Err(e2) = stop::stop(layout, false) {
                eprintln!("k8s start: stop after the failure also failed: {e2:#}");
            }
            Err(e.context(format!(
                "starting the cluster failed; component logs are in {}",
                layout.component_logs().display()
            )))
        }
    }
}

/// Refuses to start over something that is not ours: a foreign cni0, or another
/// cluster on our ports (e.g. one started by other scripts).
fn preflight() -> Result<()> {
    for dir in [
        "/sys/fs/cgroup/unified/kubepods",
        "/sys/fs/cgroup/memory/kubepods",
    ] {
        if Path::new(dir).exists() {
            bail!(
                "{dir} exists: another kubelet's pods (or a run that `cargo xtask k8s stop` \
                 could not clean) are on this machine; stop that cluster first"
            );
        }
    }
    if Path::new("/sys/class/net").join(CNI_BRIDGE).exists() {
        bail!(
            "the interface {CNI_BRIDGE} exists and the harness did not create it (another \
             cluster or CNI setup?); stop that first, or `ip link delete {CNI_BRIDGE}` if it is stale"
        );
    }
    for port in [
        2379u16,
        2380,
        APISERVER_PORT,
        10248,
        10249,
        10250,
        10256,
        10257,
        10259,
    ] {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        if TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok() {
            bail!(
                "something already listens on 127.0.0.1:{port} (another etcd or Kubernetes?); \
                 stop it first (`ss -ltnp sport = :{port}` shows what)"
            );
        }
    }
    for tool in [
        "/usr/bin/containerd",
        "/usr/bin/etcd",
        "/usr/bin/ctr",
        "/usr/lib/cni/bridge",
    ] {
        if !Path::new(tool).exists() {
            bail!("{tool} is missing; run `cargo xtask k8s build` (it installs the packages)");
        }
    }
    Ok(())
}

/// Starts `name` detached (own session: a Ctrl-C meant for a test command must not
/// reach the cluster), logging to `<state>/logs/<name>.log` (the previous run's log
/// is kept as `.log.prev`).
fn spawn(layout: &Layout, name: &str, args: &[String]) -> Result<i32> {
    let logs = layout.component_logs();
    let log_path = logs.join(format!("{name}.log"));
    if log_path.exists() {
        let _ = fs::rename(&log_path, logs.join(format!("{name}.log.prev")));
    }
    let log = fs::File::create(&log_path)?;
    let exe = component_exe(layout, name);
    let mut cmd = Command::new(&exe);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .current_dir(&layout.state);
    // SAFETY: setsid is async-signal-safe and touches no memory.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {}", exe.display()))?;
    let pid = child.id() as i32;
    fs::write(
        layout.pids().join(format!("{name}.pid")),
        format!("{pid}\n"),
    )?;
    // The child is reaped by init once we exit; nobody waits for it here.
    std::mem::forget(child);
    Ok(pid)
}

/// Polls `check` every 200 ms until it holds, `limit` passes, or `name` dies.
fn wait_for(
    layout: &Layout,
    name: &str,
    what: &str,
    limit: Duration,
    mut check: impl FnMut() -> bool,
) -> Result<()> {
    let t = Instant::now();
    loop {
        if check() {
            return Ok(());
        }
        if super::test::interrupted() {
            bail!("interrupted while waiting for {what}");
        }
        if component_pid(layout, name).is_none() {
            bail!(
                "{name} exited while waiting for {what}; its log ({}) ends with:\n{}",
                layout
                    .component_logs()
                    .join(format!("{name}.log"))
                    .display(),
                build::tail(&layout.component_logs().join(format!("{name}.log")), 20)
            );
        }
        if t.elapsed() > limit {
            bail!(
                "timed out after {} s waiting for {what}; {name}'s log ({}) ends with:\n{}",
                limit.as_secs(),
                layout
                    .component_logs()
                    .join(format!("{name}.log"))
                    .display(),
                build::tail(&layout.component_logs().join(format!("{name}.log")), 20)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn ts(t0: Instant, msg: &str) {
    eprintln!("k8s start: [{:5.1} s] {msg}", t0.elapsed().as_secs_f64());
}

fn p(path: PathBuf) -> String {
    path.display().to_string()
}

fn flags(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn start_components(layout: &Layout, node: &str, t0: Instant) -> Result<Duration> {
    host::save(layout)?;
    host::setup_network()?;
    pki::ensure(layout, node)?;
    ts(
        t0,
        &format!("host state saved, {} up, pki ready", super::API_IFACE),
    );

    // ---------------- containerd ----------------
    let cd = layout.containerd_dir();
    let config = cd.join("config.toml");
    fs::write(&config, containerd_config(layout))?;
    fs::write(
        layout.cni_dir().join("net.d/10-icmp-guard-bridge.conflist"),
        cni_config(layout),
    )?;
    let sock = layout.containerd_sock();
    let _ = fs::remove_file(&sock);
    spawn(layout, "containerd", &["--config".into(), p(config)])?;
    wait_for(
        layout,
        "containerd",
        "the containerd socket",
        Duration::from_secs(30),
        || {
            sock.exists()
                && ctr(layout)
                    .arg("version")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
        },
    )?;
    import_images(layout)?;
    ts(t0, "containerd up, images imported");

    // ---------------- etcd ----------------
    spawn(
        layout,
        "etcd",
        &[
            "--name".into(),
            "icmp-guard".into(),
            "--data-dir".into(),
            p(layout.etcd_data().join("data")),
            "--listen-client-urls=http://127.0.0.1:2379".into(),
            "--advertise-client-urls=http://127.0.0.1:2379".into(),
            "--listen-peer-urls=http://127.0.0.1:2380".into(),
            "--initial-advertise-peer-urls=http://127.0.0.1:2380".into(),
            "--initial-cluster=icmp-guard=http://127.0.0.1:2380".into(),
            "--listen-metrics-urls=http://127.0.0.1:2381".into(),
        ],
    )?;
    wait_for(
        layout,
        "etcd",
        "etcd's /health",
        Duration::from_secs(30),
        || http_get(ETCD_CLIENT, "/health").is_some_and(|b| b.contains("\"health\":\"true\"")),
    )?;
    ts(t0, "etcd healthy");

    // ---------------- kube-apiserver ----------------
    let pki = layout.pki();
    let mut args = flags(&[
        "--etcd-servers=http://127.0.0.1:2379",
        "--bind-address=0.0.0.0",
        "--insecure-port=0",
        "--authorization-mode=Node,RBAC",
        "--allow-privileged=true",
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
        "--kubelet-preferred-address-types=InternalIP,Hostname",
        "--profiling=false",
    ]);
    args.extend([
        format!("--advertise-address={NODE_IP}"),
        format!("--secure-port={APISERVER_PORT}"),
        format!("--service-cluster-ip-range={SERVICE_CIDR}"),
        format!("--tls-cert-file={}", p(pki.join("apiserver.crt"))),
        format!("--tls-private-key-file={}", p(pki.join("apiserver.key"))),
        format!("--token-auth-file={}", p(pki.join("tokens.csv"))),
        format!("--service-account-key-file={}", p(pki.join("sa.pub"))),
        format!(
            "--service-account-signing-key-file={}",
            p(pki.join("sa.key"))
        ),
        format!("--cert-dir={}", p(pki.join("apiserver-certs"))),
    ]);
    spawn(layout, "kube-apiserver", &args)?;
    wait_for(
        layout,
        "kube-apiserver",
        "the apiserver's /readyz",
        WAIT_APISERVER,
        || apiserver_ready(layout),
    )?;
    ts(t0, "kube-apiserver ready");

    // ---------------- controller-manager, scheduler ----------------
    let kcm_kc = p(layout.kubeconfig("controller-manager"));
    spawn(
        layout,
        "kube-controller-manager",
        &[
            format!("--kubeconfig={kcm_kc}"),
            format!("--authentication-kubeconfig={kcm_kc}"),
            format!("--authorization-kubeconfig={kcm_kc}"),
            "--use-service-account-credentials=true".into(),
            format!(
                "--service-account-private-key-file={}",
                p(pki.join("sa.key"))
            ),
            format!("--root-ca-file={}", p(pki.join("ca.crt"))),
            "--leader-elect=false".into(),
            "--bind-address=127.0.0.1".into(),
            "--port=0".into(),
            format!("--cert-dir={}", p(pki.join("controller-manager"))),
        ],
    )?;
    let sched_kc = p(layout.kubeconfig("scheduler"));
    spawn(
        layout,
        "kube-scheduler",
        &[
            format!("--kubeconfig={sched_kc}"),
            format!("--authentication-kubeconfig={sched_kc}"),
            format!("--authorization-kubeconfig={sched_kc}"),
            "--leader-elect=false".into(),
            "--bind-address=127.0.0.1".into(),
            "--port=0".into(),
            format!("--cert-dir={}", p(pki.join("scheduler"))),
        ],
    )?;

    // ---------------- kubelet ----------------
    let kubelet_dir = layout.kubelet_dir();
    // A node object from an earlier run can still say Ready: only a heartbeat from
    // this kubelet counts (whole seconds, as the API stores them).
    let kubelet_start = now_secs().floor() as i64;
    spawn(
        layout,
        "kubelet",
        &[
            format!("--kubeconfig={}", p(layout.kubeconfig("kubelet"))),
            "--container-runtime=remote".into(),
            format!(
                "--container-runtime-endpoint=unix://{}",
                p(layout.containerd_sock())
            ),
            format!("--containerd={}", p(layout.containerd_sock())),
            "--runtime-request-timeout=5m".into(),
            "--cgroup-driver=cgroupfs".into(),
            "--cgroups-per-qos=true".into(),
            "--enforce-node-allocatable=".into(),
            "--protect-kernel-defaults=false".into(),
            "--fail-swap-on=false".into(),
            format!("--root-dir={}", p(kubelet_dir.clone())),
            format!("--cert-dir={}", p(pki.join("kubelet"))),
            format!(
                "--volume-plugin-dir={}",
                p(kubelet_dir.join("volume-plugins"))
            ),
            format!("--hostname-override={node}"),
            format!("--node-ip={NODE_IP}"),
            format!("--address={NODE_IP}"),
            "--read-only-port=0".into(),
            "--healthz-bind-address=127.0.0.1".into(),
            format!("--pod-infra-container-image={}", super::PAUSE_IMAGE),
            // images cannot be pulled again: never garbage-collect them
            "--image-gc-high-threshold=100".into(),
            "--image-gc-low-threshold=99".into(),
            "--eviction-hard=memory.available<100Mi".into(),
            format!("--cluster-dns={CLUSTER_DNS_IP}"),
            "--cluster-domain=cluster.local".into(),
            "--node-status-update-frequency=10s".into(),
            "--v=2".into(),
        ],
    )?;

    // ---------------- kube-proxy ----------------
    spawn(
        layout,
        "kube-proxy",
        &[
            format!("--kubeconfig={}", p(layout.kubeconfig("kube-proxy"))),
            format!("--hostname-override={node}"),
            "--proxy-mode=iptables".into(),
            format!("--cluster-cidr={CLUSTER_CIDR}"),
            "--metrics-bind-address=127.0.0.1:10249".into(),
            "--healthz-bind-address=127.0.0.1:10256".into(),
            // 0: leave the host's conntrack sysctls alone
            "--conntrack-max-per-core=0".into(),
            "--conntrack-tcp-timeout-established=0".into(),
            "--conntrack-tcp-timeout-close-wait=0".into(),
        ],
    )?;
    write_env_file(layout, node)?;

    wait_for(
        layout,
        "kubelet",
        &format!("node {node} Ready"),
        WAIT_NODE,
        || node_ready(layout, node).is_some_and(|(ready, hb)| ready && hb >= kubelet_start),
    )?;
    ts(t0, &format!("node {node} Ready"));
    wait_for(
        layout,
        "kube-controller-manager",
        "the default ServiceAccount",
        Duration::from_secs(60),
        || {
            kubectl_output(
                layout,
                &["-n", "default", "get", "serviceaccount", "default"],
            )
            .is_some()
        },
    )?;
    for c in COMPONENTS {
        if component_pid(layout, c).is_none() {
            bail!(
                "{c} is not running; its log: {}",
                layout.component_logs().join(format!("{c}.log")).display()
            );
        }
    }
    ts(t0, "default ServiceAccount exists");
    Ok(t0.elapsed())
}

fn containerd_config(layout: &Layout) -> String {
    format!(
        r#"version = 2
root = "{root}"
state = "{state}"
oom_score = 0

[grpc]
  address = "{sock}"

[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = "{opt}"
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "{pause}"
    # no CAP_SYS_RESOURCE in this sandbox: without this runc fails with
    # "can't get final child's PID from pipe"
    restrict_oom_score_adj = true
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/usr/lib/cni"
      conf_dir = "{cni}/net.d"
    [plugins."io.containerd.grpc.v1.cri".containerd]
      snapshotter = "overlayfs"
      default_runtime_name = "runc"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
          SystemdCgroup = false
          # runc's state in the state dir, not /run/containerd/runc
          Root = "{runc_root}"
"#,
        root = layout.containerd_root().display(),
        state = layout.containerd_state().display(),
        sock = layout.containerd_sock().display(),
        opt = layout.containerd_dir().join("opt").display(),
        runc_root = layout.containerd_dir().join("runc").display(),
        pause = super::PAUSE_IMAGE,
        cni = layout.cni_dir().display(),
    )
}

fn cni_config(layout: &Layout) -> String {
    format!(
        r#"{{
  "cniVersion": "0.4.0",
  "name": "icmp-guard-bridge",
  "plugins": [
    {{
      "type": "bridge",
      "bridge": "{CNI_BRIDGE}",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {{
        "type": "host-local",
        "ranges": [[{{"subnet": "{POD_SUBNET}"}}]],
        "routes": [{{"dst": "0.0.0.0/0"}}],
        "dataDir": "{ipam}"
      }}
    }},
    {{"type": "portmap", "capabilities": {{"portMappings": true}}}}
  ]
}}
"#,
        ipam = layout.cni_dir().join("ipam").display()
    )
}

/// Imports an image unless containerd already has it with the same manifest digest.
fn import_images(layout: &Layout) -> Result<()> {
    let out = run_checked(ctr(layout).args(["images", "ls"]))?;
    let listing = String::from_utf8_lossy(&out.stdout).into_owned();
    for img in image::image_files(layout) {
        let want = image::recorded_digest(&img.archive);
        let have = listing.lines().find_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some(img.name)).then(|| w.nth(1).map(str::to_string))?
        });
        if want.is_some() && have == want {
            continue;
        }
        run_checked(ctr(layout).args(["images", "import"]).arg(&img.archive))
            .with_context(|| format!("importing {}", img.archive.display()))?;
    }
    Ok(())
}

/// A minimal HTTP/1.0 GET on 127.0.0.1 (etcd's /health); the body, if 200.
fn http_get(addr: &str, path: &str) -> Option<String> {
    let addr: SocketAddr = addr.parse().ok()?;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let (head, body) = resp.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.").then_some(())?;
    head.split_whitespace()
        .nth(1)
        .filter(|c| *c == "200")
        .map(|_| body.to_string())
}

/// The environment `test` gives its command (also written to `<state>/env` for
/// `. <state>/env` in a shell).
pub fn test_env(layout: &Layout, node: &str) -> Vec<(&'static str, String)> {
    vec![
        ("KUBECONFIG", p(layout.admin_kubeconfig())),
        (super::STATE_ENV, p(layout.state.clone())),
        ("ICMP_GUARD_KUBECTL", p(layout.kubectl())),
        ("ICMP_GUARD_CONTAINERD_SOCK", p(layout.containerd_sock())),
        ("ICMP_GUARD_K8S_NODE", node.to_string()),
        ("ICMP_GUARD_TESTBOX_IMAGE", super::TESTBOX_IMAGE.to_string()),
        // This very xtask, for tests that build the agent's image (`xtask image --agent`):
        // `cargo xtask` cannot run inside `cargo test`, which holds the build directory's lock.
        (
            "ICMP_GUARD_XTASK",
            std::env::current_exe()
                .map(p)
                .unwrap_or_else(|_| "xtask".to_string()),
        ),
    ]
}

fn write_env_file(layout: &Layout, node: &str) -> Result<()> {
    let text: String = test_env(layout, node)
        .iter()
        .map(|(k, v)| format!("export {k}={v}\n"))
        .collect();
    fs::write(layout.state.join("env"), text)?;
    Ok(())
}

pub fn run_status() -> Result<()> {
    let layout = Layout::new()?;
    let node = node_name();
    println!("state dir: {}", layout.state.display());
    let mut running = 0;
    for c in COMPONENTS {
        match component_pid(&layout, c) {
            Some(pid) => {
                running += 1;
                println!("  {c:<24} running (pid {pid})");
            }
            None => println!("  {c:<24} not running"),
        }
    }
    if running == 0 {
        println!("cluster: stopped");
        if layout.host_saved().join("complete").exists() {
            println!(
                "  (host state saved by a start is still in {}: run `cargo xtask k8s stop`)",
                layout.host_saved().display()
            );
        }
        return Ok(());
    }
    if !apiserver_ready(&layout) {
        println!("apiserver: not ready");
        return Ok(());
    }
    println!("apiserver: ready (https://127.0.0.1:{APISERVER_PORT})");
    match node_ready(&layout, &node) {
        Some((ready, _)) => println!(
            "node {node}: {} (lease renewed {} ago)",
            if ready { "Ready" } else { "NotReady" },
            lease_renewed(&layout, &node)
                .map(|t| format!("{} s", now_secs() as i64 - t))
                .unwrap_or_else(|| "never".into())
        ),
        None => println!("node {node}: not registered"),
    }
    if let Some(pods) = kubectl_output(&layout, &["get", "pods", "-A", "--no-headers"]) {
        println!("pods: {}", pods.lines().count());
    }
    println!("export KUBECONFIG={}", layout.admin_kubeconfig().display());
    Ok(())
}

/// Replaces this process with the cached kubectl (exit status and signals pass
/// through untouched).
pub fn run_kubectl(args: &[String]) -> Result<()> {
    let layout = Layout::new()?;
    let kubectl = layout.kubectl();
    if !kubectl.exists() {
        bail!(
            "{} is missing; run `cargo xtask k8s build`",
            kubectl.display()
        );
    }
    if !layout.admin_kubeconfig().exists() {
        bail!(
            "{} is missing; run `cargo xtask k8s start`",
            layout.admin_kubeconfig().display()
        );
    }
    let err = Command::new(&kubectl)
        .args(args)
        .env("KUBECONFIG", layout.admin_kubeconfig())
        .exec();
    Err(anyhow::Error::new(err).context(format!("running {}", kubectl.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339() {
        assert_eq!(parse_rfc3339_utc("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_rfc3339_utc("2000-02-29T00:00:00Z"), Some(951_782_400));
        assert_eq!(
            parse_rfc3339_utc("2025-12-31T23:59:59Z"),
            Some(1_767_225_599)
        );
        assert_eq!(parse_rfc3339_utc("2025-12-31 23:59:59"), None);
    }
}
