//! Keys and values of the policy maps.
//!
//! Userspace compiles policies into these entries; the kernel only looks them up. Every policy
//! entry carries a *generation* (0 or 1): an update writes the inactive generation in full, then
//! advances the epoch of [`State::control`], whose low bit is the generation, in one atomic store. A decision reads the
//! control word once, so it sees either the old policy or the new one, never a mix.

/// Names of the maps, as the kernel object defines them.
pub const MAP_STATE: &str = "STATE";
pub const MAP_SETTINGS: &str = "SETTINGS";
pub const MAP_WORKLOAD_OF_CGROUP: &str = "WORKLOAD_OF_CGROUP";
pub const MAP_WORKLOADS: &str = "WORKLOADS";
pub const MAP_RULES: &str = "RULES";
pub const MAP_RATE: &str = "RATE";
pub const MAP_SUPPRESSED: &str = "SUPPRESSED";
pub const MAP_COUNTERS: &str = "COUNTERS";
pub const MAP_DECISIONS: &str = "DECISIONS";
pub const MAP_EVENTS: &str = "EVENTS";
pub const MAP_LSM_STAGES: &str = "LSM_STAGES";
pub const MAP_CGROUP_STAGES: &str = "CGROUP_STAGES";

/// Capacity of the rule map: both generations together (16,384 kernel rules each).
pub const MAX_RULES: u32 = 32768;
/// Both generations together (2,047 workloads each, besides the host).
pub const MAX_WORKLOADS: u32 = 4096;
pub const MAX_WORKLOAD_CGROUPS: u32 = 16384;
/// How many ancestor levels of the caller's cgroup are searched for a workload.
pub const MAX_CGROUP_DEPTH: u32 = 16;
/// Ring buffer size in bytes (a power of two, a multiple of the page size).
pub const EVENTS_BYTES: u32 = 1 << 22;
/// Distinct (workload, rule, class, action, executable) keys whose suppressed alerts are counted.
pub const MAX_SUPPRESS_KEYS: u32 = 16384;

/// Workload id of the host: processes that belong to no declared workload.
pub const HOST_WORKLOAD: u32 = 0;

/// Rule id used in events when the default posture decided.
pub const RULE_POSTURE: u32 = u32::MAX;

/// `BPF_F_MMAPABLE`: the agent maps the [`State`] array and stores its words atomically.
pub const BPF_F_MMAPABLE: u32 = 1 << 10;

/// The one entry every managed socket reads first. Userspace writes each field with a single
/// aligned atomic store through a shared mapping of the array (never `bpf_map_update_elem`,
/// whose copy may tear a word), so a decision sees each word either before or after a change.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct State {
    /// [`control`]: the active generation and the classes it decides.
    pub control: u64,
    /// Decisions are taken only while `bpf_ktime_get_boot_ns()` is below this; after it, every
    /// socket is allowed. `u64::MAX`: no expiry.
    pub lease_until_ns: u64,
    /// The agent's own process: never decided, so it can never lock itself out.
    pub agent_tgid: u32,
    /// Layout version of the maps, for an agent that finds them already loaded.
    pub layout: u32,
}

/// Byte offsets of the [`State`] words, for the agent's atomic stores.
pub const STATE_CONTROL_OFFSET: usize = 0;
pub const STATE_LEASE_OFFSET: usize = 8;
pub const STATE_AGENT_OFFSET: usize = 16;
pub const STATE_LAYOUT_OFFSET: usize = 20;

/// The control word of [`State`].
pub mod control {
    /// Bits 0..16: the epoch, counting policy updates. Its low bit is the active generation;
    /// events carry the whole epoch so that the agent names the rule of the update that decided,
    /// even when alerts are read after later updates.
    pub const EPOCH: u64 = 0xffff;
    /// Bits 16..32: the classes (`Class::bit`) some workload of the active generation decides,
    /// by a rule or by its posture. A socket of any other class is allowed after this one read.
    pub const CLASSES_SHIFT: u32 = 16;

    pub const fn word(epoch: u16, classes: u16) -> u64 {
        epoch as u64 | ((classes as u64) << CLASSES_SHIFT)
    }

    pub const fn epoch(word: u64) -> u16 {
        (word & EPOCH) as u16
    }

    pub const fn generation(word: u64) -> u32 {
        (word & 1) as u32
    }

    pub const fn classes(word: u64) -> u16 {
        (word >> CLASSES_SHIFT) as u16
    }
}

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
    /// Reads of kernel memory that failed while identifying the caller.
    pub const IDENTITY_ERRORS: u32 = 4;
    /// Suppressed alerts that could not be counted per key (the map was full).
    pub const SUPPRESS_LOST: u32 = 5;
    /// Alerts dropped because a capture stage could not be tail-called.
    pub const STAGE_ERRORS: u32 = 6;
    /// Managed sockets allowed without a decision because the agent's lease had lapsed.
    pub const LEASE_LAPSED: u32 = 7;
    pub const COUNT: u32 = 8;
}

/// What a decision did to the socket: the second index of the per-CPU
/// [`DECISIONS`](MAP_DECISIONS) array, `class * outcome::COUNT + outcome`.
pub mod outcome {
    /// Let through without an alert (an Allow rule, or no rule and no posture for the class).
    pub const ALLOWED: u32 = 0;
    /// Let through with an alert: an Audit rule or posture, or a Block in audit mode.
    pub const AUDITED: u32 = 1;
    /// Refused.
    pub const BLOCKED: u32 = 2;
    pub const COUNT: u32 = 3;
}

/// Entries of [`DECISIONS`](MAP_DECISIONS).
pub const DECISION_SLOTS: u32 = crate::class::CLASS_COUNT as u32 * outcome::COUNT;

/// What a suppressed alert would have said, as far as the summary needs it: which workload,
/// which executable, which class, which rule and which action. Counted per CPU in
/// [`SUPPRESSED`](MAP_SUPPRESSED), so one scanner's flood never hides that another program was
/// blocked.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SuppressKey {
    pub workload: u32,
    /// Index into the rule table of `generation`, or [`RULE_POSTURE`].
    pub rule: u32,
    pub exe_dev: u64,
    pub exe_ino: u64,
    pub class: u8,
    /// [`Action`].
    pub action: u8,
    /// 1 when the socket was refused (a Block in audit mode is not).
    pub denied: u8,
    pub _pad: u8,
    /// Epoch of the policy update the decision was taken under (see [`control`]).
    pub epoch: u16,
    pub _pad2: u16,
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
    unsafe impl aya::Pod for SuppressKey {}
    unsafe impl aya::Pod for State {}
}
