//! Workloads: a cgroup with labels and a namespace.
//!
//! The agent's config file declares some; every pod on the node is one, from the Kubernetes API.
//! A process in a child cgroup of a workload belongs to that workload: the kernel programs search
//! the caller's cgroup ancestors. A pod's containers are its child cgroups, each with a root
//! filesystem of its own in which the policies' `fromSource` paths are resolved.

use std::{
    collections::BTreeMap,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use procfs::process::{MountInfos, Process};

/// Id of the workload that stands for pods whose cgroup exists but that the agent does not know
/// yet: the `kubepods` cgroup itself. Until a pod is known, its processes get the default
/// posture for every class a `KubeArmorPolicy` names, so that no container's first socket
/// escapes the policy that will select it.
pub const PENDING_PODS: u32 = u32::MAX - 1;

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
    /// The controller an operator names (a pod's Deployment, …).
    pub owner: Option<Owner>,
    /// Where its processes' executables are: the host's root (declared workloads) or each of
    /// its containers' own root (pods).
    pub root: Root,
}

/// KubeArmor's `Owner` of a pod: the top controller (`Ref` is its kind), or the pod itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    pub kind: String,
    pub name: String,
    pub namespace: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Root {
    /// The host's file system (as the agent resolves it).
    Host,
    /// A pod: its running containers, each with its own root.
    Containers(Vec<Container>),
}

/// A running container of a pod workload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Container {
    /// The runtime's id, 64 hex digits.
    pub id: String,
    /// The name and image from the pod's status, once the status reports this container.
    pub name: Option<String>,
    pub image: Option<String>,
    /// The container's own cgroup: what the kernel reports as the caller's cgroup.
    pub cgroup_id: u64,
    /// Where its paths resolve, each root giving the identities it sees; empty while the
    /// runtime is still setting the container up (its sources then allow nothing yet).
    pub roots: Vec<ContainerRoot>,
}

/// Where a container's `fromSource` paths resolve.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ContainerRoot {
    /// Through a process of the container whose root is the container's own: its volumes and
    /// every other mount of the container included.
    Process(u32),
    /// The runtime's mount of the container's root filesystem, as the agent sees it: there
    /// before the container's first process starts, without the container's other mounts.
    Mount(PathBuf),
}

impl Workload {
    /// The container of this workload whose cgroup is `cgroup_id`.
    pub fn container(&self, cgroup_id: u64) -> Option<&Container> {
        match &self.root {
            Root::Containers(cs) => cs.iter().find(|c| c.cgroup_id == cgroup_id),
            Root::Host => None,
        }
    }

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
    let mounts = Process::myself()
        .and_then(|p| p.mountinfo())
        .context("reading /proc/self/mountinfo")?;
    cgroup2_mount_in(&mounts)
}

/// The first cgroup v2 mount of a mount table.
pub fn cgroup2_mount_in(mounts: &MountInfos) -> Result<PathBuf> {
    if let Some(m) = mounts.iter().find(|m| m.fs_type == "cgroup2") {
        return Ok(m.mount_point.clone());
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

#[cfg(test)]
mod tests {
    use procfs::FromRead;

    use super::*;

    #[test]
    fn the_cgroup2_mount_is_found_by_filesystem_type() {
        let hybrid = MountInfos::from_read(
            "25 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n\
             30 25 0:26 / /sys/fs/cgroup ro,nosuid shared:9 - tmpfs tmpfs ro,mode=755\n\
             31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw\n\
             32 30 0:28 / /sys/fs/cgroup/cpu rw,nosuid shared:11 - cgroup cgroup rw,cpu\n"
                .as_bytes(),
        )
        .unwrap();
        assert_eq!(
            cgroup2_mount_in(&hybrid).unwrap(),
            Path::new("/sys/fs/cgroup/unified")
        );
        let v1_only =
            MountInfos::from_read("25 1 8:1 / / rw shared:1 - ext4 /dev/sda1 rw\n".as_bytes())
                .unwrap();
        let e = cgroup2_mount_in(&v1_only).unwrap_err();
        assert!(e.to_string().contains("mount -t cgroup2"), "{e}");
    }
}
