//! Pods and their containers on this node, as the kernel sees them: cgroups and roots.
//!
//! A pod's cgroup is placed by its UID and QoS class, under the kubelet's cgroupfs or systemd
//! layout; its containers are the child cgroups. Each container has its own root filesystem
//! (an overlay with a device of its own), so `fromSource` paths are resolved in that root, never
//! in the agent's own: the host's `/usr/bin/ping` allows nothing in a container, nor a
//! container's file on the host.
//!
//! The root is reached through `/proc/<pid>/root` of a process of the container once one has
//! entered it. Before that, containerd's bundle stands in for it: the runtime mounts the
//! container's root filesystem at `…/io.containerd.runtime.v2.task/<namespace>/<id>/rootfs`
//! and writes `config.json` beside it (whose `linux.cgroupsPath` names the pod) before it makes
//! the container's cgroup. A container whose first command is its own `ping` must find its
//! rules in force, and the runtime starts that command a few milliseconds after making the
//! cgroup: too soon for a round woken by the cgroup, but not for one woken by the mount.

use std::{
    collections::HashMap,
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use crate::{
    compile::identity::HostRoot,
    sources::{kubernetes::pods::Qos, workload::ContainerRoot},
};

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
    /// Where its paths resolve: the runtime's mount of its root filesystem, and a process of
    /// the container whose root is the container's own (which also sees its volumes). Each
    /// root's identities are allowed: a file only the mount shows is one a volume hides, which
    /// no process of the container can execute.
    pub roots: Vec<ContainerRoot>,
}

/// The containers in `pod_cgroup` (the pause container included). `rootfs`: the runtime's
/// root filesystem mounts by container id ([`rootfs_mounts`]).
pub fn discover(pod_cgroup: &Path, rootfs: &HashMap<String, PathBuf>) -> Vec<Container> {
    let Ok(entries) = fs::read_dir(pod_cgroup) else {
        return Vec::new();
    };
    // The roots a process has before the runtime moves it into the container's: the host's
    // (pid 1's, where the agent may read it, or that of the node's process the agent resolves
    // host paths through) and the agent's own.
    let node = match HostRoot::get() {
        HostRoot::Own => None,
        HostRoot::Process(pid) => root_identity(pid),
    };
    let outside: Vec<(u64, u64)> = [root_identity(1), own_root_identity(), node]
        .into_iter()
        .flatten()
        .collect();
    let mut out: Vec<Container> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name();
            let id = container_id(name.to_str()?)?.to_string();
            let meta = e.metadata().ok().filter(|m| m.is_dir())?;
            let cgroup = e.path();
            let roots = rootfs
                .get(&id)
                .cloned()
                .map(ContainerRoot::Mount)
                .into_iter()
                .chain(settled_pid(&cgroup, &outside).map(ContainerRoot::Process))
                .collect();
            Some(Container {
                id,
                cgroup_id: meta.ino(),
                cgroup,
                roots,
            })
        })
        .collect();
    out.sort_by(|a, b| a.id.cmp(&b.id));
    out
}

/// What a containerd bundle says of its container: the pod it belongs to and its name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BundleInfo {
    pub pod_uid: Option<String>,
    pub name: Option<String>,
}

/// Reads the OCI `config.json` beside a container's `rootfs` mount: the pod UID from
/// `linux.cgroupsPath` (`/kubepods/besteffort/pod<uid>/<id>`, or systemd's
/// `kubepods-besteffort-pod<uid_>.slice:cri-containerd:<id>`), the name from the CRI's
/// `io.kubernetes.cri.container-name` annotation.
pub fn bundle_info(rootfs: &Path) -> BundleInfo {
    let Some(config) = rootfs.parent().map(|b| b.join("config.json")) else {
        return BundleInfo::default();
    };
    let Ok(text) = fs::read_to_string(&config) else {
        return BundleInfo::default();
    };
    let Ok(json) = serde_json::from_str::<serde_json::Value>(&text) else {
        return BundleInfo::default();
    };
    BundleInfo {
        pod_uid: json["linux"]["cgroupsPath"].as_str().and_then(pod_uid_in),
        name: json["annotations"]["io.kubernetes.cri.container-name"]
            .as_str()
            .map(str::to_string),
    }
}

/// The pod UID in a cgroup path of either layout (`pod` and 36 characters, `_` for `-`).
fn pod_uid_in(cgroups_path: &str) -> Option<String> {
    cgroups_path.match_indices("pod").find_map(|(i, _)| {
        let uid = cgroups_path.get(i + 3..i + 3 + 36)?.replace('_', "-");
        let shape = uid.char_indices().all(|(j, c)| match j {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        });
        shape.then_some(uid)
    })
}

/// containerd's mounts of container root filesystems in the node's mount namespace, by
/// container id: `<state>/io.containerd.runtime.v2.task/<namespace>/<id>/rootfs`, as the agent
/// reaches them ([`HostRoot`]: through the node's root when the agent runs in a container).
/// CRI-O and Docker name theirs by storage layer instead; their containers wait for a settled
/// process.
pub fn rootfs_mounts() -> HashMap<String, PathBuf> {
    let host = HostRoot::get();
    std::fs::read_to_string(host.mountinfo())
        .map(|text| {
            parse_rootfs_mounts(&text)
                .into_iter()
                .map(|(id, dir)| (id, host.path(&dir)))
                .collect()
        })
        .unwrap_or_default()
}

fn parse_rootfs_mounts(mountinfo: &str) -> HashMap<String, PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let mount_point = unescape_mountinfo(line.split_whitespace().nth(4)?);
            let path = Path::new(&mount_point);
            if path.file_name()? != "rootfs" {
                return None;
            }
            let id = path.parent()?.file_name()?.to_str()?;
            let under_task_dir = path.ancestors().any(|a| {
                a.file_name()
                    .is_some_and(|n| n == "io.containerd.runtime.v2.task")
            });
            (under_task_dir && container_id(id) == Some(id))
                .then(|| (id.to_string(), path.to_path_buf()))
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let octal = b[i + 1..i + 4]
                .iter()
                .fold(0u16, |n, c| n * 8 + u16::from(c - b'0'));
            out.push(octal as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn own_root_identity() -> Option<(u64, u64)> {
    fs::metadata("/").ok().map(|m| (m.dev(), m.ino()))
}

/// (device, inode) of a process's root directory.
fn root_identity(pid: u32) -> Option<(u64, u64)> {
    fs::metadata(format!("/proc/{pid}/root"))
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// The first process of the cgroup whose root is no longer the host's: the runtime has moved it
/// into the container's root filesystem, so the container's paths resolve through it.
fn settled_pid(cgroup: &Path, outside: &[(u64, u64)]) -> Option<u32> {
    let procs = fs::read_to_string(cgroup.join("cgroup.procs")).ok()?;
    procs
        .lines()
        .filter_map(|l| l.trim().parse::<u32>().ok())
        .find(|&pid| {
            let root = root_identity(pid);
            root.is_some_and(|r| !outside.contains(&r))
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

    #[test]
    fn bundles_name_their_pod_in_both_layouts() {
        assert_eq!(
            pod_uid_in(&format!("/kubepods/besteffort/pod{UID}/{ID}")).as_deref(),
            Some(UID)
        );
        assert_eq!(
            pod_uid_in(&format!(
                "kubepods-besteffort-pod{}.slice:cri-containerd:{ID}",
                UID.replace('-', "_")
            ))
            .as_deref(),
            Some(UID)
        );
        assert_eq!(pod_uid_in("/kubepods/podnot-a-uid/x"), None);
    }

    #[test]
    fn containerd_rootfs_mounts_are_found_by_container_id() {
        let text = format!(
            "51 27 0:42 / /run/containerd/io.containerd.runtime.v2.task/k8s.io/{ID}/rootfs rw - overlay overlay rw\n\
             52 27 0:43 / /var/lib/my\\040state/io.containerd.runtime.v2.task/k8s.io/{ID2}/rootfs rw - overlay overlay rw\n\
             53 27 0:44 / /var/lib/containers/storage/overlay/{ID}/merged rw - overlay overlay rw\n\
             54 27 0:45 / /mnt/{ID}/rootfs rw - overlay overlay rw\n",
            ID2 = ID.replace('2', "b")
        );
        let m = parse_rootfs_mounts(&text);
        assert_eq!(m.len(), 2, "{m:?}");
        assert_eq!(
            m[ID],
            Path::new(&format!(
                "/run/containerd/io.containerd.runtime.v2.task/k8s.io/{ID}/rootfs"
            ))
        );
        assert_eq!(
            m[&ID.replace('2', "b")],
            Path::new(&format!(
                "/var/lib/my state/io.containerd.runtime.v2.task/k8s.io/{}/rootfs",
                ID.replace('2', "b")
            ))
        );
    }
}
