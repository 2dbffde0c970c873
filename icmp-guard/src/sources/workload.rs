//! Workloads: a cgroup with labels and a namespace.
//!
//! Today the agent's config file declares them; pods will become workloads once the Kubernetes
//! API is watched, with the same shape. A process in a child cgroup of a workload belongs to that
//! workload: the kernel programs search the caller's cgroup ancestors.

use std::{
    collections::BTreeMap,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    /// Id used in the kernel maps; 1-based (0 is the host).
    pub id: u32,
    pub name: String,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub pod: Option<String>,
    pub container: Option<String>,
    /// Absolute path of the cgroup directory.
    pub cgroup: PathBuf,
    /// cgroup v2 id: the inode number of the cgroup directory.
    pub cgroup_id: u64,
}

impl Workload {
    /// `k=v,k=v`, sorted, as in KubeArmor's `Labels`.
    pub fn labels_string(&self) -> String {
        self.labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Where the cgroup v2 hierarchy is mounted: `/sys/fs/cgroup` on unified hosts,
/// `/sys/fs/cgroup/unified` on hybrid ones.
pub fn cgroup2_mount() -> Result<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").context("reading mountinfo")?;
    for line in text.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        if right.split_whitespace().next() == Some("cgroup2")
            && let Some(mp) = left.split_whitespace().nth(4)
        {
            return Ok(PathBuf::from(mp));
        }
    }
    bail!(
        "no cgroup v2 hierarchy is mounted; mount one with `mount -t cgroup2 none /sys/fs/cgroup` \
         (or boot with systemd.unified_cgroup_hierarchy=1)"
    )
}

/// Creates the cgroup if missing and returns its id.
pub fn ensure_cgroup(path: &Path) -> Result<u64> {
    std::fs::create_dir_all(path).with_context(|| format!("creating cgroup {}", path.display()))?;
    cgroup_id(path)
}

pub fn cgroup_id(path: &Path) -> Result<u64> {
    Ok(std::fs::metadata(path)
        .with_context(|| format!("reading cgroup {}", path.display()))?
        .ino())
}

/// The cgroup path `spec` names: absolute paths must lie under the v2 mount, relative ones are
/// taken from it.
pub fn cgroup_path(mount: &Path, spec: &Path) -> Result<PathBuf> {
    if spec.is_absolute() {
        if !spec.starts_with(mount) {
            bail!(
                "cgroup {} is not under the cgroup v2 mount {}; give a path relative to it",
                spec.display(),
                mount.display()
            );
        }
        Ok(spec.to_path_buf())
    } else {
        Ok(mount.join(spec))
    }
}
