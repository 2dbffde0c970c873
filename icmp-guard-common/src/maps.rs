//! Keys and values of the policy maps.
//!
//! Userspace compiles policies into these entries; the kernel only looks them up. Every policy
//! entry carries a *generation* (0 or 1): an update writes the inactive generation in full, then
//! flips [`ACTIVE_GENERATION_INDEX`] in one array write. A decision reads the generation once, so
//! it sees either the old policy or the new one, never a mix.

/// Names of the maps, as the kernel object defines them.
pub const MAP_ACTIVE: &str = "ACTIVE";
pub const MAP_SETTINGS: &str = "SETTINGS";
pub const MAP_WORKLOAD_OF_CGROUP: &str = "WORKLOAD_OF_CGROUP";
pub const MAP_WORKLOADS: &str = "WORKLOADS";
pub const MAP_RULES: &str = "RULES";
pub const MAP_RATE: &str = "RATE";
pub const MAP_SUPPRESSED: &str = "SUPPRESSED";
pub const MAP_COUNTERS: &str = "COUNTERS";
pub const MAP_EVENTS: &str = "EVENTS";
pub const MAP_PENDING_SOCKET: &str = "PENDING_SOCKET";
pub const MAP_LSM_STAGES: &str = "LSM_STAGES";
pub const MAP_CGROUP_STAGES: &str = "CGROUP_STAGES";

pub const ACTIVE_GENERATION_INDEX: u32 = 0;

/// Capacity of the rule map: both generations together.
pub const MAX_RULES: u32 = 16384;
pub const MAX_WORKLOADS: u32 = 2048;
pub const MAX_WORKLOAD_CGROUPS: u32 = 8192;
/// How many ancestor levels of the caller's cgroup are searched for a workload.
pub const MAX_CGROUP_DEPTH: u32 = 16;
/// Ring buffer size in bytes (a power of two, a multiple of the page size).
pub const EVENTS_BYTES: u32 = 1 << 22;

/// Workload id of the host: processes that belong to no declared workload.
pub const HOST_WORKLOAD: u32 = 0;

/// Rule id used in events when the default posture decided.
pub const RULE_POSTURE: u32 = u32::MAX;

#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Action {
    Allow = 0,
    Audit = 1,
    Block = 2,
}

impl Action {
    pub const fn from_u8(v: u8) -> Action {
        match v {
            0 => Action::Allow,
            1 => Action::Audit,
            _ => Action::Block,
        }
    }
}

/// Per-generation settings; index = generation.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// 1: a Block decision is reported as `Audit (Block)` and the socket is let through.
    pub audit_only: u8,
    /// 1: at least one workload is declared, so the caller's cgroup ancestors must be searched.
    pub has_workloads: u8,
    pub _pad: [u8; 2],
    /// Alerts per second per workload before suppression starts; 0 = unlimited.
    pub alerts_per_sec: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CgroupKey {
    pub generation: u32,
    pub _pad: u32,
    pub cgroup_id: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct WorkloadKey {
    pub generation: u32,
    pub workload: u32,
}

/// How one workload decides sockets that match no rule.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkloadPolicy {
    /// Classes that have at least one rule: only these are looked up in [`RULES`](MAP_RULES).
    pub rule_classes: u16,
    /// Classes under allow-list mode: an unmatched socket of these gets `posture_action`.
    pub posture_classes: u16,
    /// [`Action`] of the default posture (Audit or Block).
    pub posture_action: u8,
    pub _pad: [u8; 3],
}

/// `exe_dev == 0 && exe_ino == 0` is a rule for any executable.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RuleKey {
    pub generation: u32,
    pub workload: u32,
    pub class: u8,
    pub _pad: [u8; 7],
    /// Kernel `dev_t` of the executable's filesystem (`inode->i_sb->s_dev`).
    pub exe_dev: u64,
    pub exe_ino: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    /// [`Action`].
    pub action: u8,
    pub _pad: [u8; 3],
    /// Index of the rule in the agent's compiled rule table, for the alert.
    pub rule: u32,
}

/// Per-workload alert rate state. Updated with benign races between CPUs, so the limit is
/// approximate under contention; the suppressed count lives in the per-CPU
/// [`SUPPRESSED`](MAP_SUPPRESSED) map and is exact.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateState {
    pub window_start_ns: u64,
    pub in_window: u64,
}

/// Indices of the per-CPU [`COUNTERS`](MAP_COUNTERS) array.
pub mod counter {
    /// Events the ring buffer had no room for.
    pub const RINGBUF_FULL: u32 = 0;
    /// Sockets refused.
    pub const BLOCKED: u32 = 1;
    /// Sockets let through with an Audit decision.
    pub const AUDITED: u32 = 2;
    /// Decisions taken (any managed socket of a workload with policy).
    pub const DECIDED: u32 = 3;
    /// Reads of kernel memory that failed while identifying the caller.
    pub const IDENTITY_ERRORS: u32 = 4;
    /// Suppressed alerts that could not be counted per workload (the map was full).
    pub const SUPPRESS_LOST: u32 = 5;
    /// Alerts dropped because a capture stage could not be tail-called.
    pub const STAGE_ERRORS: u32 = 6;
    pub const COUNT: u32 = 8;
}

/// What `sys_enter_socket` saw, kept until the cgroup program of the same thread runs: the cgroup
/// hook only sees the type without `SOCK_NONBLOCK`/`SOCK_CLOEXEC`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PendingSocket {
    pub family: u32,
    pub sock_type: u32,
    pub protocol: u32,
    pub _pad: u32,
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are #[repr(C)] plain integers with explicit padding.
    unsafe impl aya::Pod for Settings {}
    unsafe impl aya::Pod for CgroupKey {}
    unsafe impl aya::Pod for WorkloadKey {}
    unsafe impl aya::Pod for WorkloadPolicy {}
    unsafe impl aya::Pod for RuleKey {}
    unsafe impl aya::Pod for Verdict {}
    unsafe impl aya::Pod for RateState {}
    unsafe impl aya::Pod for PendingSocket {}
}
