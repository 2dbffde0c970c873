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
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, anyhow};

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

/// Resolves paths as seen from one mount namespace root (the host's `/` for now; a container's
/// `/proc/PID/root` once pods are workloads).
pub struct Resolver {
    root: PathBuf,
    /// mount id → kernel dev_t, read once per resolver.
    mounts: HashMap<u64, u64>,
}

impl Resolver {
    pub fn host() -> Result<Self> {
        Self::new(Path::new("/"), Path::new("/proc/self/mountinfo"))
    }

    /// Paths as the process `pid` sees them: through its root, with the devices of its mount
    /// namespace (a container's overlay has a device of its own).
    pub fn of_process(pid: u32) -> Result<Self> {
        Self::new(
            Path::new(&format!("/proc/{pid}/root")),
            Path::new(&format!("/proc/{pid}/mountinfo")),
        )
    }

    pub fn new(root: &Path, mountinfo: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(mountinfo)
            .with_context(|| format!("reading {}", mountinfo.display()))?;
        Ok(Self {
            root: root.to_path_buf(),
            mounts: parse_mountinfo(&text),
        })
    }

    /// The identity of the file `path` names, following symlinks.
    pub fn resolve(&self, path: &Path) -> io::Result<ExecutableId> {
        let rel = path.strip_prefix("/").unwrap_or(path);
        let full = self.root.join(rel);
        let (mnt_id, ino) = statx_mount_and_ino(&full)?;
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

/// mountinfo line: `ID PARENT MAJOR:MINOR ROOT MOUNTPOINT …`.
fn parse_mountinfo(text: &str) -> HashMap<u64, u64> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let id = fields.next()?.parse::<u64>().ok()?;
            let _parent = fields.next()?;
            let (major, minor) = fields.next()?.split_once(':')?;
            let major: u64 = major.parse().ok()?;
            let minor: u64 = minor.parse().ok()?;
            Some((id, (major << 20) | minor))
        })
        .collect()
}

fn statx_mount_and_ino(path: &Path) -> io::Result<(u64, u64)> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out-pointer.
    let rc = unsafe {
        libc::statx(
            libc::AT_FDCWD,
            c.as_ptr(),
            0,
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

/// The identity of a running process's executable (`/proc/PID/exe`).
pub fn of_process(pid: u32) -> Result<ExecutableId> {
    let resolver = Resolver::host()?;
    resolver
        .resolve(Path::new(&format!("/proc/{pid}/exe")))
        .map_err(|e| anyhow!("resolving /proc/{pid}/exe: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_device_is_encoded_like_the_kernel() {
        let m = parse_mountinfo(
            "22 1 259:3 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p3 rw\n\
             40 22 0:37 / /home rw shared:20 - btrfs /dev/sda2 rw\n",
        );
        assert_eq!(m[&22], (259 << 20) | 3);
        assert_eq!(m[&40], 37);
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
}
