//! The record a kernel program writes into the ring buffer for every Audit or Block decision.

/// An executable path is captured as one fixed slot per step of the kernel's walk from the file
/// up to the root, leaf first: step `i` writes its component (NUL-terminated, at most
/// `PATH_COMPONENT_MAX - 1` bytes) at `i * PATH_COMPONENT_MAX`, and a step that crosses a mount
/// writes an empty slot. Fixed slots keep every iteration of the walk identical for the
/// verifier whichever branch it took, so it can prune instead of exploring every combination.
pub const PATH_COMPONENT_MAX: usize = 128;
/// Deepest walk (path components plus mount crossings).
pub const PATH_MAX_DEPTH: usize = 32;
pub const PATH_BUF: usize = PATH_COMPONENT_MAX * PATH_MAX_DEPTH;
/// Bytes of the command line captured (NUL-separated arguments, as in `/proc/PID/cmdline`).
pub const CMDLINE_BUF: usize = 1024;

pub const COMM_LEN: usize = 16;

/// Which enforcer decided.
pub mod enforcer {
    pub const LSM: u8 = 1;
    pub const CGROUP: u8 = 2;
}

/// How the verdict was found.
pub mod matched {
    /// A rule for this class and this executable.
    pub const CLASS_AND_SOURCE: u8 = 1;
    /// A rule for this class and any executable.
    pub const CLASS: u8 = 2;
    /// No rule matched; the workload's default posture decided.
    pub const POSTURE: u8 = 3;
}

/// Bits of [`SocketEvent::flags`].
pub mod flags {
    /// The socket was refused (the caller saw EPERM).
    pub const DENIED: u16 = 1 << 0;
    /// The type carries the caller's `SOCK_NONBLOCK`/`SOCK_CLOEXEC` bits as passed to socket(2).
    pub const TYPE_FLAGS_KNOWN: u16 = 1 << 1;
    /// The executable path did not fit or was deeper than the walk: it is incomplete.
    pub const EXE_TRUNCATED: u16 = 1 << 2;
    pub const PARENT_TRUNCATED: u16 = 1 << 3;
    pub const CMDLINE_TRUNCATED: u16 = 1 << 4;
    /// The caller had no executable (a kernel thread) or it could not be read.
    pub const NO_EXE: u16 = 1 << 5;
    /// The agent runs in audit mode: this Block was downgraded and the socket let through.
    pub const DOWNGRADED: u16 = 1 << 6;
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct SocketEvent {
    /// `bpf_ktime_get_boot_ns()` at the decision.
    pub boot_ns: u64,
    pub cgroup_id: u64,
    pub exe_dev: u64,
    pub exe_ino: u64,
    pub host_pid: u32,
    pub host_tid: u32,
    pub host_ppid: u32,
    /// Pid and parent pid in the caller's own pid namespace.
    pub ns_pid: u32,
    pub ns_ppid: u32,
    pub uid: u32,
    pub gid: u32,
    pub workload: u32,
    pub rule: u32,
    pub sock_type: u32,
    pub protocol: u32,
    pub family: u16,
    pub flags: u16,
    pub class: u8,
    pub action: u8,
    pub matched: u8,
    pub enforcer: u8,
    /// Slots of `exe` and `parent_exe` the walk used.
    pub exe_len: u16,
    pub parent_len: u16,
    pub cmdline_len: u16,
    /// Epoch of the policy update the decision was taken under (`maps::control`): `rule`
    /// indexes that update's rule table.
    pub epoch: u16,
    pub _pad: [u8; 4],
    pub comm: [u8; COMM_LEN],
    pub exe: [u8; PATH_BUF],
    pub parent_exe: [u8; PATH_BUF],
    pub cmdline: [u8; CMDLINE_BUF],
}
