//! Pods and their containers on this node, as the kernel sees them: cgroups and roots.
//!
//! A pod's cgroup is placed by its UID and QoS class, under the kubelet's cgroupfs or systemd
//! layout; its containers are the child cgroups. Each container has its own root filesystem
//! (an overlay with a device of its own), so `fromSource` paths are resolved through
//! `/proc/<pid>/root` of a process of that container, never in the agent's own root: the host's
//! `/usr/bin/ping` allows nothing in a container, nor a container's file on the host.

use std::{
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use crate::sources::kubernetes::pods::Qos;

/// How the kubelet names pod cgroups.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum CgroupDriver {
    /// `kubepods/besteffort/pod<uid>` (the kubelet's `--cgroup-driver=cgroupfs`).
    Cgroupfs,
    /// `kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid_>.slice`.
    Systemd,
}

impl CgroupDriver {
    /// The layout the kubelet uses on this node, from what exists under the cgroup v2 mount.
    pub fn detect(root: &Path) -> Option<Self> {
        if root.join("kubepods.slice").is_dir() {
            Some(CgroupDriver::Systemd)
        } else if root.join("kubepods").is_dir() {
            Some(CgroupDriver::Cgroupfs)
        } else {
            None
        }
    }
}

/// The cgroups whose children are pods: `kubepods` (Guaranteed pods) and its two QoS classes.
pub fn qos_cgroups(root: &Path, driver: CgroupDriver) -> [PathBuf; 3] {
    match driver {
        CgroupDriver::Cgroupfs => {
            let base = root.join("kubepods");
            [base.join("besteffort"), base.join("burstable"), base]
        }
        CgroupDriver::Systemd => {
            let base = root.join("kubepods.slice");
            [
                base.join("kubepods-besteffort.slice"),
                base.join("kubepods-burstable.slice"),
                base,
            ]
        }
    }
}

/// The pod's cgroup directory under the cgroup v2 mount `root`.
pub fn pod_cgroup(root: &Path, driver: CgroupDriver, qos: Qos, uid: &str) -> PathBuf {
    match driver {
        CgroupDriver::Cgroupfs => {
            let base = root.join("kubepods");
            let leaf = format!("pod{uid}");
            match qos {
                Qos::Guaranteed => base.join(leaf),
                Qos::Burstable => base.join("burstable").join(leaf),
                Qos::BestEffort => base.join("besteffort").join(leaf),
            }
        }
        CgroupDriver::Systemd => {
            // systemd escapes `-` in unit names; the kubelet writes the UID with `_`.
            let uid = uid.replace('-', "_");
            let base = root.join("kubepods.slice");
            match qos {
                Qos::Guaranteed => base.join(format!("kubepods-pod{uid}.slice")),
                Qos::Burstable => base
                    .join("kubepods-burstable.slice")
                    .join(format!("kubepods-burstable-pod{uid}.slice")),
                Qos::BestEffort => base
                    .join("kubepods-besteffort.slice")
                    .join(format!("kubepods-besteffort-pod{uid}.slice")),
            }
        }
    }
}

/// The container id in a container cgroup's name: 64 hex digits, bare (cgroupfs) or in a
/// systemd scope (`cri-containerd-<id>.scope`, `crio-<id>.scope`, `docker-<id>.scope`).
pub fn container_id(dir_name: &str) -> Option<&str> {
    let id = dir_name
        .strip_suffix(".scope")
        .and_then(|s| s.rsplit_once('-').map(|(_, id)| id))
        .unwrap_or(dir_name);
    (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then_some(id)
}

/// A running container of a pod, as found in its pod's cgroup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Container {
    pub id: String,
    pub cgroup: PathBuf,
    /// cgroup v2 id: the inode of the directory, what `bpf_get_current_cgroup_id` returns.
    pub cgroup_id: u64,
    /// A process of the container whose root is the container's own, through which its paths
    /// resolve; `None` while none is (the runtime is still setting it up).
    pub root_pid: Option<u32>,
}

/// The containers in `pod_cgroup` (the pause container included).
pub fn discover(pod_cgroup: &Path) -> Vec<Container> {
    let Ok(entries) = fs::read_dir(pod_cgroup) else {
        return Vec::new();
    };
    let host_root = root_identity(1);
    let mut out: Vec<Container> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name();
            let id = container_id(name.to_str()?)?.to_string();
            let meta = e.metadata().ok().filter(|m| m.is_dir())?;
            let cgroup = e.path();
            let root_pid = settled_pid(&cgroup, host_root);
            Some(Container {
                id,
                cgroup_id: meta.ino(),
                cgroup,
                root_pid,
            })
        })
        .collect();
    out.sort_by(|a, b| a.id.cmp(&b.id));
    out
}

/// (device, inode) of a process's root directory.
fn root_identity(pid: u32) -> Option<(u64, u64)> {
    fs::metadata(format!("/proc/{pid}/root"))
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// The first process of the cgroup whose root is no longer the host's: the runtime has moved it
/// into the container's root filesystem, so the container's paths resolve through it.
fn settled_pid(cgroup: &Path, host_root: Option<(u64, u64)>) -> Option<u32> {
    let procs = fs::read_to_string(cgroup.join("cgroup.procs")).ok()?;
    procs
        .lines()
        .filter_map(|l| l.trim().parse::<u32>().ok())
        .find(|&pid| {
            let root = root_identity(pid);
            root.is_some() && root != host_root
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0a1b2c3d-0000-1111-2222-333344445555";
    const ID: &str = "20a6333c6a46e0da32b3062f0ba76e9aed4fc5ef51f5ee8aec5b980963cedea3";

    #[test]
    fn pod_cgroups_follow_the_kubelet_layouts() {
        let root = Path::new("/sys/fs/cgroup");
        assert_eq!(
            pod_cgroup(root, CgroupDriver::Cgroupfs, Qos::BestEffort, UID),
            Path::new("/sys/fs/cgroup/kubepods/besteffort/pod0a1b2c3d-0000-1111-2222-333344445555")
        );
        assert_eq!(
            pod_cgroup(root, CgroupDriver::Cgroupfs, Qos::Guaranteed, UID),
            Path::new("/sys/fs/cgroup/kubepods/pod0a1b2c3d-0000-1111-2222-333344445555")
        );
        assert_eq!(
            pod_cgroup(root, CgroupDriver::Systemd, Qos::Burstable, UID),
            Path::new(
                "/sys/fs/cgroup/kubepods.slice/kubepods-burstable.slice/\
                 kubepods-burstable-pod0a1b2c3d_0000_1111_2222_333344445555.slice"
            )
        );
        assert_eq!(
            pod_cgroup(root, CgroupDriver::Systemd, Qos::Guaranteed, UID),
            Path::new(
                "/sys/fs/cgroup/kubepods.slice/kubepods-pod0a1b2c3d_0000_1111_2222_333344445555.slice"
            )
        );
    }

    #[test]
    fn container_ids_are_read_from_both_layouts() {
        assert_eq!(container_id(ID), Some(ID));
        assert_eq!(
            container_id(&format!("cri-containerd-{ID}.scope")),
            Some(ID)
        );
        assert_eq!(container_id(&format!("crio-{ID}.scope")), Some(ID));
        assert_eq!(container_id("cgroup.procs"), None);
        assert_eq!(container_id(&ID[1..]), None);
    }
}
