//! `cargo xtask k8s ...`: a single-node Kubernetes 1.20 test cluster on this machine,
//! for the agent's Kubernetes features and tests. See `xtask/k8s/README.md`.
//!
//! Where things live (never in the clone: CI clones afresh every run):
//! - `<cache>/k8s/` (`<cache>` = `$ICMP_GUARD_CACHE` or `/var/cache/icmp-guard`):
//!   `bin/` the six Kubernetes binaries, `images/` the pause and testbox OCI archives,
//!   `src/` the Debian source package and its unpacked tree (with Go's build cache
//!   in `_output/`), `apt/` a private apt state with a deb-src line, `logs/` build logs.
//! - the state dir, `$ICMP_GUARD_K8S_STATE` or `<cache>/k8s/state`: everything a
//!   running cluster writes (etcd data, containerd root and state, kubelet dir, CNI
//!   IPAM, pki and tokens, kubeconfigs, component logs and pid files) and, in
//!   `host/`, what `start` saved of the host to restore at `stop`. On disk rather
//!   than in /run so that the imported images and etcd survive a stop (`stop
//!   --purge` removes them).

pub mod build;
pub mod cluster;
pub mod host;
pub mod image;
pub mod pki;
pub mod stop;
pub mod test;

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Result, bail};
use clap::{Args, Subcommand};

pub use crate::vm::run_checked;

/// The binaries built from the Kubernetes source, by their `cmd/` names.
pub const BINARIES: [&str; 6] = [
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubelet",
    "kube-proxy",
    "kubectl",
];

pub const PAUSE_IMAGE: &str = "k8s.gcr.io/pause:3.2";
pub const TESTBOX_IMAGE: &str = "localhost/icmp-guard-testbox:1";

/// The harness's own interface and address: the node's InternalIP, the apiserver's
/// advertised address (so the `kubernetes` Service's endpoint) and the kubelet's.
/// Pods reach it through the host's routing, and nothing about it ever leaves the
/// machine, unlike the node's external address.
pub const API_IFACE: &str = "icmpg-api0";
pub const NODE_IP: &str = "10.250.0.1";
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
pub const KUBERNETES_SERVICE_IP: &str = "10.96.0.1";
pub const CLUSTER_DNS_IP: &str = "10.96.0.10";
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
pub const POD_SUBNET: &str = "10.244.0.0/24";
pub const CNI_BRIDGE: &str = "cni0";
pub const APISERVER_PORT: u16 = 6443;
pub const KUBELET_PORT: u16 = 10250;

/// Environment variable that moves the state dir.
pub const STATE_ENV: &str = "ICMP_GUARD_K8S_STATE";

#[derive(Debug, Args)]
pub struct K8sArgs {
    #[command(subcommand)]
    pub command: K8sCmd,
}

#[derive(Debug, Subcommand)]
pub enum K8sCmd {
    /// Install the Debian packages, build Kubernetes from Debian's source package and
    /// the pause/testbox images (cached under the cache dir; a no-op when done)
    Build,
    /// Start the single-node cluster and wait for the node to be Ready
    Start,
    /// Stop the cluster and restore the host (iptables, sysctls, interfaces, cgroups)
    Stop(stop::StopArgs),
    /// Show which components run and whether the node is Ready
    Status,
    /// Run the cached kubectl with the admin kubeconfig
    Kubectl {
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "ARGS"
        )]
        args: Vec<String>,
    },
    /// build + start (fresh etcd), run CMD against the cluster, always stop; exits
    /// with CMD's status
    Test(test::TestArgs),
}

pub fn run(args: K8sArgs) -> Result<()> {
    match args.command {
        K8sCmd::Build => build::run(),
        K8sCmd::Start => cluster::run_start(),
        K8sCmd::Stop(a) => stop::run(a),
        K8sCmd::Status => cluster::run_status(),
        K8sCmd::Kubectl { args } => cluster::run_kubectl(&args),
        K8sCmd::Test(a) => test::run(a),
    }
}

/// A command run against the cluster exited non-zero: `main` exits with `code`.
#[derive(Debug)]
pub struct CommandExit {
    pub code: i32,
    pub message: String,
}

impl fmt::Display for CommandExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for CommandExit {}

/// Every path the harness uses, derived from the cache dir and the state dir.
#[derive(Debug, Clone)]
pub struct Layout {
    /// `<cache>/k8s`
    pub root: PathBuf,
    pub bin: PathBuf,
    pub images: PathBuf,
    pub src: PathBuf,
    pub apt: PathBuf,
    /// build logs (component logs are in the state dir)
    pub logs: PathBuf,
    pub state: PathBuf,
}

impl Layout {
    pub fn new() -> Result<Layout> {
        let root = crate::cache::cache_dir().join("k8s");
        let state = std::env::var_os(STATE_ENV)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("state"));
        if !state.is_absolute() {
            bail!("{STATE_ENV}={} must be an absolute path", state.display());
        }
        let layout = Layout {
            bin: root.join("bin"),
            images: root.join("images"),
            src: root.join("src"),
            apt: root.join("apt"),
            logs: root.join("logs"),
            state,
            root,
        };
        // A unix socket path is limited to 108 bytes.
        let sock = layout.containerd_sock();
        if sock.as_os_str().len() > 100 {
            bail!(
                "the containerd socket path {} is too long for a unix socket; set {STATE_ENV} to a shorter directory",
                sock.display()
            );
        }
        Ok(layout)
    }

    /// `<cache>/k8s/src/kubernetes` once unpacked completely.
    pub fn source_tree_if_unpacked(&self) -> Option<PathBuf> {
        let t = self.src.join("kubernetes");
        t.join(".go/src/k8s.io/kubernetes").exists().then_some(t)
    }

    pub fn binary(&self, name: &str) -> PathBuf {
        self.bin.join(name)
    }
    pub fn kubectl(&self) -> PathBuf {
        self.binary("kubectl")
    }
    pub fn pids(&self) -> PathBuf {
        self.state.join("pids")
    }
    pub fn component_logs(&self) -> PathBuf {
        self.state.join("logs")
    }
    pub fn pki(&self) -> PathBuf {
        self.state.join("pki")
    }
    pub fn etcd_data(&self) -> PathBuf {
        self.state.join("etcd")
    }
    pub fn containerd_dir(&self) -> PathBuf {
        self.state.join("containerd")
    }
    pub fn containerd_root(&self) -> PathBuf {
        self.containerd_dir().join("root")
    }
    pub fn containerd_state(&self) -> PathBuf {
        self.containerd_dir().join("state")
    }
    pub fn containerd_sock(&self) -> PathBuf {
        self.containerd_dir().join("containerd.sock")
    }
    pub fn kubelet_dir(&self) -> PathBuf {
        self.state.join("kubelet")
    }
    pub fn cni_dir(&self) -> PathBuf {
        self.state.join("cni")
    }
    /// What `start` saved of the host, for `stop` to restore.
    pub fn host_saved(&self) -> PathBuf {
        self.state.join("host")
    }
    pub fn kubeconfig(&self, user: &str) -> PathBuf {
        self.state.join(format!("{user}.kubeconfig"))
    }
    pub fn admin_kubeconfig(&self) -> PathBuf {
        self.kubeconfig("admin")
    }
}

/// The node's name: the host name, lower-cased, if it is a valid DNS-1123 subdomain.
pub fn node_name() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let name = raw.trim().to_ascii_lowercase();
    let valid = !name.is_empty()
        && name.len() <= 253
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    if valid {
        name
    } else {
        "icmp-guard-node".to_string()
    }
}

/// `ctr` against the harness's containerd, in the CRI namespace.
pub fn ctr(layout: &Layout) -> Command {
    let mut c = Command::new("ctr");
    c.arg("--address")
        .arg(layout.containerd_sock())
        .args(["--namespace", "k8s.io"]);
    c
}

/// Fails unless running as root: everything here changes the host's network,
/// cgroups and mounts.
pub fn require_root(what: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("`cargo xtask k8s {what}` must run as root (it starts containerd and the kubelet)");
    }
    Ok(())
}

/// True if `path` exists (without following a final symlink).
pub fn exists(path: &Path) -> bool {
    path.symlink_metadata().is_ok()
}
