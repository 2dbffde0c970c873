//! Executable identity: what a `fromSource` path means to the kernel programs.
//!
//! The programs identify the caller by the file its process is executing: the inode of
//! `mm->exe_file`, as `(inode->i_sb->s_dev, inode->i_ino)`. That cannot be spoofed by renaming
//! or copying a binary, by a symlink, by `comm` or `argv[0]`, or by a bind mount over the allowed
//! path in a private mount namespace. This module turns the paths of a policy into those keys.
//!
//! `stat(2)`'s `st_dev` is not always the superblock's `s_dev` (btrfs subvolumes and overlayfs
//! report other devices), so the device comes from the file's mount in mountinfo, which prints
//! the superblock's device; the mount is found through `statx(STATX_MNT_ID)`.

use std::{
    collections::HashMap,
    ffi::CString,
    fmt, io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, anyhow};
use procfs::{
    FromRead,
    process::{MountInfos, Process},
};

/// The kernel's view of an executable file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExecutableId {
    /// Kernel-internal `dev_t`: `major << 20 | minor`.
    pub dev: u64,
    pub ino: u64,
}

impl fmt::Display for ExecutableId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.dev >> 20, self.dev & 0xfffff, self.ino)
    }
}

/// Resolves paths as seen from one mount namespace: a root to resolve paths under and that
/// namespace's mount table (the host's `/` and the agent's own mountinfo, or a container's
/// `/proc/PID/root` and that process's mountinfo).
pub struct Resolver {
    root: PathBuf,
    /// The root as a directory, for any root but `/`: paths, and the symlinks met on the way, are
    /// resolved inside it (`openat2` with `RESOLVE_IN_ROOT`). Through `/proc/PID/root/…` the
    /// kernel would resolve an absolute symlink (busybox's `/bin/ping -> /bin/busybox`, Debian's
    /// `/etc/alternatives/…`) in the agent's root, i.e. on the host.
    root_dir: Option<OwnedFd>,
    /// mount id → kernel dev_t, read once per resolver.
    mounts: HashMap<u64, u64>,
}

impl Resolver {
    /// The node's view: `/` and `/proc/self/mountinfo` when the agent shares pid 1's mount
    /// namespace, else pid 1's root and mount table ([`HostRoot`]).
    pub fn host() -> Result<Self> {
        match HostRoot::get() {
            HostRoot::Own => Self::own(),
            HostRoot::Process(pid) => Self::for_process(pid),
        }
    }

    /// The agent's own view: `/` and `/proc/self/mountinfo`.
    pub fn own() -> Result<Self> {
        let mountinfo = Process::myself()
            .and_then(|p| p.mountinfo())
            .context("reading /proc/self/mountinfo")?;
        Self::from_mountinfo(Path::new("/"), &mountinfo)
    }

    /// The view of process `pid` (a container's, once pods are workloads): paths are resolved
    /// under `/proc/PID/root` and devices come from `/proc/PID/mountinfo`, because the mount
    /// ids `statx` reports there are the ones of that process's mount namespace.
    pub fn for_process(pid: u32) -> Result<Self> {
        let pid_i32 = i32::try_from(pid).with_context(|| format!("pid {pid} is out of range"))?;
        let mountinfo = Process::new(pid_i32)
            .and_then(|p| p.mountinfo())
            .with_context(|| format!("reading /proc/{pid}/mountinfo"))?;
        Self::from_mountinfo(Path::new(&format!("/proc/{pid}/root")), &mountinfo)
    }

    /// Paths inside the directory `dir`, taken as a root: a container's root filesystem as its
    /// runtime mounted it on the node, reached from the agent (through `/proc/1/root` when the
    /// agent runs in a container: [`HostRoot::path`]); devices from the node's mount table.
    pub fn of_mount(dir: &Path) -> Result<Self> {
        Self::new(dir, &HostRoot::get().mountinfo())
    }

    /// Paths under `root`, devices from the mountinfo file at `mountinfo`.
    pub fn new(root: &Path, mountinfo: &Path) -> Result<Self> {
        let mountinfo = MountInfos::from_file(mountinfo)
            .with_context(|| format!("reading {}", mountinfo.display()))?;
        Self::from_mountinfo(root, &mountinfo)
    }

    /// Paths under `root`, devices from an already parsed mount table.
    pub fn from_mountinfo(root: &Path, mountinfo: &MountInfos) -> Result<Self> {
        let root_dir = if root == Path::new("/") {
            None
        } else {
            Some(
                std::fs::File::open(root)
                    .map(OwnedFd::from)
                    .with_context(|| format!("opening root directory {}", root.display()))?,
            )
        };
        Ok(Self {
            root: root.to_path_buf(),
            root_dir,
            mounts: mount_devices(mountinfo)?,
        })
    }

    /// The identity of the file `path` names, following symlinks (inside the root).
    pub fn resolve(&self, path: &Path) -> io::Result<ExecutableId> {
        let rel = path.strip_prefix("/").unwrap_or(path);
        let full = self.root.join(rel);
        match &self.root_dir {
            None => self.identify(&full, statx_mount_and_ino(&full)?),
            Some(dir) => {
                let file = open_in_root(dir, rel)?;
                self.identify(&full, statx_mount_and_ino_fd(&file)?)
            }
        }
    }

    /// The identity of the file at `full`, a path of the agent's own namespace (a magic link
    /// such as `/proc/PID/exe` is followed by the kernel, wherever it leads).
    fn resolve_full(&self, full: &Path) -> io::Result<ExecutableId> {
        self.identify(full, statx_mount_and_ino(full)?)
    }

    fn identify(&self, full: &Path, (mnt_id, ino): (u64, u64)) -> io::Result<ExecutableId> {
        let dev = self.mounts.get(&mnt_id).copied().ok_or_else(|| {
            io::Error::other(format!(
                "{} is on mount {mnt_id}, which is not in mountinfo (mounted after the agent read \
                 it?); it will be resolved again on the next policy refresh",
                full.display()
            ))
        })?;
        Ok(ExecutableId { dev, ino })
    }
}

/// Where the node's own paths are, as the agent reaches them: its own root, or the root of a
/// process of the node when the agent runs in a container of its own with the host's pid
/// namespace (a DaemonSet pod with `hostPID: true`). Host policies and the embedded default
/// name the node's files, which the image's root does not hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostRoot {
    /// The agent shares the node's mount namespace: `/` and `/proc/self/mountinfo`.
    Own,
    /// The agent's mount namespace is not the node's: `/proc/PID/root` and
    /// `/proc/PID/mountinfo` of this process of the node (pid 1, or the container runtime's
    /// shim when pid 1 cannot be read).
    Process(u32),
}

impl HostRoot {
    /// Found once per process (mount namespaces do not change under a running agent).
    pub fn get() -> HostRoot {
        Self::detected().0
    }

    /// What [`HostRoot::get`] found and why, for the agent's log.
    pub fn explain() -> &'static str {
        &Self::detected().1
    }

    fn detected() -> &'static (HostRoot, String) {
        static ROOT: std::sync::OnceLock<(HostRoot, String)> = std::sync::OnceLock::new();
        ROOT.get_or_init(Self::detect)
    }

    /// Compares the agent's mount namespace (the inode of `/proc/self/ns/mnt`) with pid 1's;
    /// where pid 1's cannot be read (a pid 1 that refuses even root's ptrace access), with its
    /// ancestors': the nearest one in another namespace is the container runtime's shim, which
    /// runs in the node's. Also says what it found, for the agent's log.
    fn detect() -> (HostRoot, String) {
        use std::os::unix::fs::MetadataExt;
        let ns = |pid: &str| std::fs::metadata(format!("/proc/{pid}/ns/mnt")).map(|m| m.ino());
        let mine = match ns("self") {
            Ok(m) => m,
            Err(e) => {
                return (
                    HostRoot::Own,
                    format!("host paths resolve in / (cannot read /proc/self/ns/mnt: {e})"),
                );
            }
        };
        let init_err = match ns("1") {
            Ok(init) if init == mine => {
                return (
                    HostRoot::Own,
                    format!(
                        "host paths resolve in / (the agent shares pid 1's mount namespace \
                         mnt:[{mine}])"
                    ),
                );
            }
            Ok(init) => {
                return (
                    HostRoot::Process(1),
                    format!(
                        "host paths resolve through /proc/1/root (the agent runs in a container: \
                         its mount namespace mnt:[{mine}] is not pid 1's mnt:[{init}])"
                    ),
                );
            }
            Err(e) => e,
        };
        let mut pid = std::process::id();
        for _ in 0..64 {
            let Some(parent) = parent_of(pid).filter(|p| *p > 1) else {
                break;
            };
            match ns(&parent.to_string()) {
                Ok(theirs) if theirs != mine => {
                    let comm =
                        std::fs::read_to_string(format!("/proc/{parent}/comm")).unwrap_or_default();
                    return (
                        HostRoot::Process(parent),
                        format!(
                            "host paths resolve through /proc/{parent}/root (the agent runs in a \
                             container: its mount namespace mnt:[{mine}] is not that of its \
                             ancestor {parent} ({}), mnt:[{theirs}], the container runtime's; \
                             pid 1's cannot be read: {init_err})",
                            comm.trim()
                        ),
                    );
                }
                Ok(_) => pid = parent,
                Err(_) => break,
            }
        }
        (
            HostRoot::Own,
            format!(
                "host paths resolve in / (the agent's ancestors share its mount namespace \
                 mnt:[{mine}]; pid 1's cannot be read: {init_err})"
            ),
        )
    }

    /// The mount table of the node's mount namespace.
    pub fn mountinfo(self) -> PathBuf {
        match self {
            HostRoot::Own => PathBuf::from("/proc/self/mountinfo"),
            HostRoot::Process(pid) => PathBuf::from(format!("/proc/{pid}/mountinfo")),
        }
    }

    /// A path of the node (absolute) as the agent reaches it.
    pub fn path(self, node_path: &Path) -> PathBuf {
        match self {
            HostRoot::Own => node_path.to_path_buf(),
            HostRoot::Process(pid) => Path::new(&format!("/proc/{pid}/root"))
                .join(node_path.strip_prefix("/").unwrap_or(node_path)),
        }
    }
}

/// `PROC_PID_INIT_INO`: the inode of the initial pid namespace, fixed by the kernel.
const INITIAL_PID_NAMESPACE: u64 = 0xEFFF_FFFC;

/// Fails unless this process is in the initial pid namespace: the kernel programs know the
/// agent by its pid there (`bpf_get_current_pid_tgid`), never decide its sockets, and report the
/// node's pids in alerts. In a container of its own pid namespace `getpid()` is another number.
pub fn require_initial_pid_namespace() -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let ino = std::fs::metadata("/proc/self/ns/pid")
        .map(|m| m.ino())
        .context("reading /proc/self/ns/pid")?;
    if ino != INITIAL_PID_NAMESPACE {
        return Err(anyhow!(
            "the agent runs in a pid namespace of its own (pid:[{ino}]): the kernel programs \
             would not recognise it as the agent; run it in the host's pid namespace \
             (`hostPID: true` in a pod, `--pid=host` for podman or docker)"
        ));
    }
    Ok(())
}

/// The parent of `pid`, from `/proc/PID/stat`.
fn parent_of(pid: u32) -> Option<u32> {
    let pid = i32::try_from(pid).ok()?;
    let stat = Process::new(pid).ok()?.stat().ok()?;
    u32::try_from(stat.ppid).ok()
}

/// mount id → kernel `dev_t` (`major << 20 | minor`), from each mount's `MAJOR:MINOR`, which is
/// the superblock's device.
fn mount_devices(mountinfo: &MountInfos) -> Result<HashMap<u64, u64>> {
    mountinfo
        .iter()
        .map(|m| {
            let id = u64::try_from(m.mnt_id)
                .map_err(|_| anyhow!("mountinfo has a negative mount id {}", m.mnt_id))?;
            let dev = kernel_dev(&m.majmin).ok_or_else(|| {
                anyhow!(
                    "mountinfo gives mount {id} ({}) the device `{}`, not MAJOR:MINOR",
                    m.mount_point.display(),
                    m.majmin
                )
            })?;
            Ok((id, dev))
        })
        .collect()
}

/// `MAJOR:MINOR` as the kernel's internal `dev_t`.
fn kernel_dev(majmin: &str) -> Option<u64> {
    let (major, minor) = majmin.split_once(':')?;
    let major: u64 = major.parse().ok()?;
    let minor: u64 = minor.parse().ok()?;
    (major < (1 << 12) && minor < (1 << 20)).then_some((major << 20) | minor)
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// Opens `rel` (an `O_PATH` descriptor) with `dir` as its root: `..` and absolute symlinks stop
/// at `dir`, as they do for the processes whose root it is.
fn open_in_root(dir: &OwnedFd, rel: &Path) -> io::Result<OwnedFd> {
    let c = c_path(rel)?;
    // SAFETY: zeroed open_how is valid (no flags); the fields are set below.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_PATH | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: valid directory fd, C string and open_how of the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            c.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn statx_mount_and_ino(path: &Path) -> io::Result<(u64, u64)> {
    let c = c_path(path)?;
    statx_at(libc::AT_FDCWD, &c, 0)
}

fn statx_mount_and_ino_fd(file: &OwnedFd) -> io::Result<(u64, u64)> {
    statx_at(file.as_raw_fd(), c"", libc::AT_EMPTY_PATH)
}

fn statx_at(dirfd: i32, path: &std::ffi::CStr, flags: i32) -> io::Result<(u64, u64)> {
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out-pointer.
    let rc = unsafe {
        libc::statx(
            dirfd,
            path.as_ptr(),
            flags,
            libc::STATX_INO | libc::STATX_MNT_ID,
            &mut stx,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if stx.stx_mask & libc::STATX_MNT_ID == 0 {
        return Err(io::Error::other(
            "this kernel's statx does not report mount ids (Linux 5.8 or newer is needed)",
        ));
    }
    Ok((stx.stx_mnt_id, stx.stx_ino))
}

/// The identity of a running process's executable: `/proc/PID/exe` is a link to the very file
/// the process executes, which `statx` follows whatever mount namespace it lies in, so its mount
/// id is looked up in that process's own mountinfo.
pub fn of_process(pid: u32) -> Result<ExecutableId> {
    Resolver::for_process(pid)?
        .resolve_full(Path::new(&format!("/proc/{pid}/exe")))
        .map_err(|e| anyhow!("resolving /proc/{pid}/exe: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> MountInfos {
        MountInfos::from_read(text.as_bytes()).unwrap()
    }

    #[test]
    fn mountinfo_device_is_encoded_like_the_kernel() {
        let m = mount_devices(&parse(
            "22 1 259:3 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p3 rw\n\
             40 22 0:37 / /home rw shared:20 - btrfs /dev/sda2 rw\n",
        ))
        .unwrap();
        assert_eq!(m[&22], (259 << 20) | 3);
        assert_eq!(m[&40], 37);
    }

    #[test]
    fn a_device_that_is_not_major_minor_is_an_error() {
        assert_eq!(kernel_dev("8:1"), Some((8 << 20) | 1));
        assert_eq!(kernel_dev("8"), None);
        assert_eq!(kernel_dev("8:x"), None);
        assert_eq!(kernel_dev("4096:0"), None);
        let e = mount_devices(&parse("22 1 8-1 / / rw - ext4 /dev/sda1 rw\n")).unwrap_err();
        assert!(e.to_string().contains("not MAJOR:MINOR"), "{e}");
    }

    #[test]
    fn a_process_view_resolves_like_the_host_view_in_the_same_namespace() {
        let me = std::process::id();
        let host = Resolver::host().unwrap();
        let mine = Resolver::for_process(me).unwrap();
        let exe = std::env::current_exe().unwrap();
        assert_eq!(mine.resolve(&exe).unwrap(), host.resolve(&exe).unwrap());
        assert_eq!(of_process(me).unwrap(), host.resolve(&exe).unwrap());
        let from_file = Resolver::new(Path::new("/"), Path::new("/proc/self/mountinfo")).unwrap();
        assert_eq!(
            from_file.resolve(&exe).unwrap(),
            host.resolve(&exe).unwrap()
        );
    }

    #[test]
    fn node_paths_are_reached_through_the_root_of_a_process_of_the_node() {
        let ping = Path::new("/usr/bin/ping");
        assert_eq!(HostRoot::Own.path(ping), ping);
        assert_eq!(
            HostRoot::Process(42).path(ping),
            Path::new("/proc/42/root/usr/bin/ping")
        );
        assert_eq!(HostRoot::Own.mountinfo(), Path::new("/proc/self/mountinfo"));
        assert_eq!(
            HostRoot::Process(42).mountinfo(),
            Path::new("/proc/42/mountinfo")
        );
    }

    #[test]
    fn a_symlink_and_its_target_are_one_executable() {
        let dir = std::env::temp_dir().join(format!("icmp-guard-id-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let target = dir.join("tool");
        std::fs::write(&target, b"#!/bin/true\n").unwrap();
        let link = dir.join("ping");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let copy = dir.join("copy");
        std::fs::copy(&target, &copy).unwrap();
        let r = Resolver::host().unwrap();
        assert_eq!(r.resolve(&link).unwrap(), r.resolve(&target).unwrap());
        assert_ne!(r.resolve(&copy).unwrap(), r.resolve(&target).unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn absolute_symlinks_resolve_inside_the_root() {
        // A container image's `/bin/ping -> /bin/busybox`: the link must lead to the image's
        // busybox, not to the host's file of that name.
        let root = std::env::temp_dir().join(format!("icmp-guard-root-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let tool = "icmp-guard-only-in-this-root";
        std::fs::create_dir_all(root.join("bin")).unwrap();
        std::fs::write(root.join(tool), b"busybox").unwrap();
        std::os::unix::fs::symlink(format!("/{tool}"), root.join("bin/ping")).unwrap();
        std::os::unix::fs::symlink("../../..", root.join("bin/up")).unwrap();
        assert!(!Path::new("/").join(tool).exists());
        let r = Resolver::new(&root, Path::new("/proc/self/mountinfo")).unwrap();
        let in_root = r.resolve(&PathBuf::from("/").join(tool)).unwrap();
        assert_eq!(r.resolve(Path::new("/bin/ping")).unwrap(), in_root);
        // `..` stops at the root too.
        assert_eq!(
            r.resolve(&Path::new("/bin/up").join(tool)).unwrap(),
            in_root
        );
        std::fs::remove_dir_all(&root).unwrap();
    }
}
