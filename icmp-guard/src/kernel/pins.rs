//! The pinned set: the maps and the hook's link under bpffs (`/sys/fs/bpf/icmp-guard/` by
//! default), so that enforcement outlives the agent's process.
//!
//! What each kind of stop does follows from it and from the lease in the `STATE` map (the
//! programs decide only while the lease is fresh; see `maps::State`):
//! - a running agent renews the lease every second;
//! - SIGTERM (a restart, `systemctl stop`, Ctrl-C) shortens the lease to the stop grace: a new
//!   agent adopts the pinned set within it and no socket escapes, or it lapses and every
//!   socket is allowed again;
//! - SIGKILL, a panic or the OOM killer leave the lease as last renewed: the programs keep
//!   enforcing (and alerts wait in the pinned ring buffer) until a new agent adopts them, or
//!   until it lapses;
//! - `icmp-guard unload` removes the pinned set at once.

use std::{
    fs::File,
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use aya::maps::MapData;
use icmp_guard_common::maps as m;

use super::state::StateMap;

/// Where the agent pins its set unless told otherwise.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/icmp-guard";

/// Every map of the kernel object, pinned by name in the pin directory. `.rodata` (the struct
/// offsets) is not: each agent's programs get their own.
pub const PINNED_MAPS: [&str; 14] = [
    m::MAP_STATE,
    m::MAP_SETTINGS,
    m::MAP_WORKLOAD_OF_CGROUP,
    m::MAP_WORKLOADS,
    m::MAP_RULES,
    m::MAP_RATE,
    m::MAP_SUPPRESSED,
    m::MAP_COUNTERS,
    m::MAP_DECISIONS,
    m::MAP_EVENTS,
    "ALERTS_IN_FLIGHT",
    "ZERO_ALERT",
    m::MAP_LSM_STAGES,
    m::MAP_CGROUP_STAGES,
];

/// The pin of the hook's link for an enforcer kind (`lsm` or `cgroup`). bpffs refuses names
/// with a dot, so none of the pins has one.
pub fn link_pin(dir: &Path, kind: &str) -> PathBuf {
    dir.join(format!("link-{kind}"))
}

/// A pin directory this agent holds: an exclusive lock on it keeps two agents from adopting
/// the same set at once.
pub struct PinDir {
    pub path: PathBuf,
    _lock: File,
}

impl PinDir {
    /// Mounts bpffs if needed, creates the directory and takes its lock, waiting up to
    /// `wait` for an agent that is still stopping.
    pub fn open(path: &Path, wait: Duration) -> Result<Self> {
        ensure_bpffs(path)?;
        std::fs::create_dir_all(path).with_context(|| {
            format!(
                "creating the pin directory {}; it must be on a bpf file system",
                path.display()
            )
        })?;
        let lock = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let start = Instant::now();
        loop {
            // SAFETY: a valid fd.
            if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                break;
            }
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                bail!("locking {}: {e}", path.display());
            }
            if start.elapsed() > wait {
                bail!(
                    "another icmp-guard agent holds {} (pid {}); stop it first, or give this one \
                     another --pin-dir",
                    path.display(),
                    status(path).agent_pid
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(Self {
            path: path.to_path_buf(),
            _lock: lock,
        })
    }

    /// The same held directory after it was renamed to `path`.
    pub fn moved_to(self, path: PathBuf) -> Self {
        Self { path, ..self }
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// The layout of the set pinned here, if there is one.
    pub fn layout(&self) -> Option<u32> {
        read_state(&self.path).map(|s| s.layout())
    }
}

/// The `STATE` map pinned in `dir`, mapped.
pub fn read_state(dir: &Path) -> Option<StateMap> {
    let map = MapData::from_pin(dir.join(m::MAP_STATE)).ok()?;
    StateMap::map(map.fd().as_fd()).ok()
}

/// Mounts bpffs on `/sys/fs/bpf` when `dir` is under it and nothing is mounted there.
pub fn ensure_bpffs(dir: &Path) -> Result<()> {
    if on_bpffs(dir) {
        return Ok(());
    }
    let root = Path::new("/sys/fs/bpf");
    if !dir.starts_with(root) {
        bail!(
            "{} is not on a bpf file system; mount one (mount -t bpf bpf DIR) or pin under \
             /sys/fs/bpf",
            dir.display()
        );
    }
    std::fs::create_dir_all(root).ok();
    let (src, fs, target) = (c"bpf", c"bpf", c"/sys/fs/bpf");
    // SAFETY: static C strings, no data.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fs.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        bail!(
            "mounting bpffs on /sys/fs/bpf: {}; mount it (mount -t bpf bpf /sys/fs/bpf) or run \
             with --no-pin",
            std::io::Error::last_os_error()
        );
    }
    log::info!("mounted bpffs on /sys/fs/bpf to pin the kernel programs' state");
    Ok(())
}

/// Whether `dir` (or its nearest existing ancestor) is on bpffs.
fn on_bpffs(dir: &Path) -> bool {
    const BPF_FS_MAGIC: i64 = 0xcafe4a11;
    let mut p = dir;
    loop {
        if p.exists() {
            let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) else {
                return false;
            };
            let mut st: libc::statfs = unsafe { std::mem::zeroed() };
            // SAFETY: valid C string and out-pointer.
            return unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0
                && st.f_type as i64 == BPF_FS_MAGIC;
        }
        match p.parent() {
            Some(parent) => p = parent,
            None => return false,
        }
    }
}

/// What a pin directory holds, for `probe` and `status`.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Status {
    /// A pinned set exists.
    pub pinned: bool,
    pub layout: u32,
    /// The pid of the agent that last renewed the lease (0: none).
    pub agent_pid: u32,
    /// That process is still running.
    pub agent_alive: bool,
    /// Milliseconds the lease has left (0: lapsed; u64::MAX: no expiry).
    pub lease_left_ms: u64,
    /// The pinned links: `lsm`, `cgroup`.
    pub links: Vec<String>,
}

impl Status {
    /// The programs decide: a link is pinned and the lease is fresh.
    pub fn enforcing(&self) -> bool {
        self.pinned && !self.links.is_empty() && self.lease_left_ms > 0
    }
}

pub fn status(dir: &Path) -> Status {
    let Some(state) = read_state(dir) else {
        return Status::default();
    };
    let agent_pid = state.agent_tgid();
    let lease = state.lease_until_ns();
    let now = boottime_ns();
    Status {
        pinned: true,
        layout: state.layout(),
        agent_pid,
        agent_alive: agent_pid != 0 && Path::new(&format!("/proc/{agent_pid}")).exists(),
        lease_left_ms: if lease == u64::MAX {
            u64::MAX
        } else {
            lease.saturating_sub(now) / 1_000_000
        },
        links: ["lsm", "cgroup"]
            .into_iter()
            .filter(|k| link_pin(dir, k).exists())
            .map(String::from)
            .collect(),
    }
}

/// Keeps the lease of the set pinned in `dir` fresh from a thread of its own until dropped.
pub struct LeaseHold {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for LeaseHold {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

/// A starting agent renews the lease of a set whose agent is gone (a restart after the stop
/// grace began, a crash) before anything slow: reading the kernel's BTF and loading the
/// programs take seconds on a slow machine (15 s under qemu's TCG), longer than the stop grace,
/// and the set must keep deciding until this agent adopts it. A lapsed lease is renewed too:
/// this agent adopts the set and its policy in a moment anyway. A set whose agent still runs is
/// left alone (it renews its own).
pub fn hold_lease(dir: &Path, lease: Duration) -> Option<LeaseHold> {
    let st = status(dir);
    if !st.pinned || st.agent_alive {
        return None;
    }
    let state = read_state(dir)?;
    let renew = move |state: &StateMap| {
        state.set_lease_until_ns(boottime_ns() + lease.as_nanos() as u64);
    };
    renew(&state);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let thread = {
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("early-lease".into())
            .spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    renew(&state);
                    std::thread::park_timeout(Duration::from_secs(1));
                }
            })
            .ok()?
    };
    log::info!(
        "renewing the lease of the pinned set at {} (its agent, pid {}, is gone) while this \
         agent starts",
        dir.display(),
        st.agent_pid
    );
    Some(LeaseHold {
        stop,
        thread: Some(thread),
    })
}

/// `CLOCK_BOOTTIME`, the clock of `bpf_ktime_get_boot_ns`.
pub fn boottime_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Removes the pinned set in `dir`: the links first (the programs detach at once and every
/// socket is allowed again), then the maps and the directory.
pub fn unload(dir: &Path) -> Result<Vec<String>> {
    // Removing a link's pin does not detach it at once: bpffs drops the link after an RCU
    // grace period, and the kernel releases it from a workqueue after that. The lease ends
    // first, so every program still attached lets every socket through from here on.
    if let Some(state) = read_state(dir) {
        state.set_lease_until_ns(0);
        super::state::wait_for_readers();
    }
    let mut removed = Vec::new();
    for kind in ["lsm", "cgroup"] {
        let p = link_pin(dir, kind);
        if p.exists() {
            std::fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
            removed.push(format!("link-{kind}"));
        }
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(removed);
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_file() || p.symlink_metadata().is_ok_and(|m| !m.is_dir()) {
            std::fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
            removed.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    std::fs::remove_dir(dir).with_context(|| format!("removing {}", dir.display()))?;
    Ok(removed)
}

/// `BPF_OBJ_GET`: the object pinned at `path`, if any.
pub fn obj_get(path: &Path) -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    const BPF_OBJ_GET: libc::c_long = 7;
    // union bpf_attr for BPF_OBJ_GET: pathname u64, bpf_fd u32, file_flags u32.
    let mut attr = [0u8; 128];
    attr[..8].copy_from_slice(&(c.as_ptr() as u64).to_ne_bytes());
    // SAFETY: the bpf syscall; `c` outlives it.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_GET, attr.as_mut_ptr(), 16) };
    // SAFETY: a new fd the kernel gave us.
    (fd >= 0).then(|| unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// `BPF_LINK_UPDATE`: points `link` at `prog` in one step (cgroup links support it; tracing
/// links, which LSM programs use, do not).
pub fn link_update(
    link: std::os::fd::BorrowedFd<'_>,
    prog: std::os::fd::BorrowedFd<'_>,
) -> Result<()> {
    #[repr(C)]
    struct LinkUpdate {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    const BPF_LINK_UPDATE: libc::c_long = 29;
    let mut attr = [0u8; 128];
    let upd = LinkUpdate {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: prog.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    // SAFETY: plain data into a zeroed attribute buffer of the kernel's union size.
    unsafe {
        std::ptr::copy_nonoverlapping(
            (&upd as *const LinkUpdate).cast::<u8>(),
            attr.as_mut_ptr(),
            std::mem::size_of::<LinkUpdate>(),
        )
    };
    // SAFETY: the bpf syscall with a pointer to the buffer and its size.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_UPDATE,
            attr.as_mut_ptr(),
            std::mem::size_of::<LinkUpdate>(),
        )
    };
    if rc < 0 {
        return Err(anyhow!(
            "BPF_LINK_UPDATE: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// The cgroup a cgroup link is attached to (its id, the directory's inode), from
/// `BPF_OBJ_GET_INFO_BY_FD`.
pub fn link_cgroup_id(link: std::os::fd::BorrowedFd<'_>) -> Option<u64> {
    // struct bpf_link_info: type u32, id u32, prog_id u32, then the union, 8-aligned: for a
    // cgroup link, cgroup_id u64 and attach_type u32.
    let mut info = [0u8; 64];
    #[repr(C)]
    struct GetInfo {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    const BPF_LINK_TYPE_CGROUP: u32 = 3;
    let req = GetInfo {
        bpf_fd: link.as_raw_fd() as u32,
        info_len: info.len() as u32,
        info: info.as_mut_ptr() as u64,
    };
    let mut attr = [0u8; 128];
    // SAFETY: as in `link_update`.
    unsafe {
        std::ptr::copy_nonoverlapping(
            (&req as *const GetInfo).cast::<u8>(),
            attr.as_mut_ptr(),
            std::mem::size_of::<GetInfo>(),
        )
    };
    // SAFETY: the bpf syscall; `info` outlives it.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            attr.as_mut_ptr(),
            std::mem::size_of::<GetInfo>(),
        )
    };
    let kind = u32::from_ne_bytes(info[0..4].try_into().ok()?);
    (rc == 0 && kind == BPF_LINK_TYPE_CGROUP)
        .then(|| u64::from_ne_bytes(info[16..24].try_into().expect("8 bytes")))
}
