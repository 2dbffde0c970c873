//! The maps the programs share with the agent. Layouts live in `icmp-guard-common`.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, PerCpuArray, PerCpuHashMap, ProgramArray, RingBuf},
};
use icmp_guard_common::event::SocketEvent;
use icmp_guard_common::maps::{
    BPF_F_MMAPABLE, CgroupKey, DECISION_SLOTS, MAX_RULES, MAX_SUPPRESS_KEYS, MAX_WORKLOAD_CGROUPS,
    MAX_WORKLOADS, RateState, RuleKey, Settings, State, SuppressKey, Verdict, WorkloadKey,
    WorkloadPolicy, counter, outcome,
};

/// The one entry every managed socket reads first: active generation, classes in use, lease,
/// the agent's own pid. Mapped by the agent, which stores each word atomically.
#[map]
pub static STATE: Array<State> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// Index = generation.
#[map]
pub static SETTINGS: Array<Settings> = Array::with_max_entries(2, 0);

#[map]
pub static WORKLOAD_OF_CGROUP: HashMap<CgroupKey, u32> =
    HashMap::with_max_entries(MAX_WORKLOAD_CGROUPS, 0);

#[map]
pub static WORKLOADS: HashMap<WorkloadKey, WorkloadPolicy> =
    HashMap::with_max_entries(MAX_WORKLOADS, 0);

#[map]
pub static RULES: HashMap<RuleKey, Verdict> = HashMap::with_max_entries(MAX_RULES, 0);

/// Per-workload alert rate state (not generation-keyed: counts survive policy reloads).
#[map]
pub static RATE: HashMap<u32, RateState> = HashMap::with_max_entries(MAX_WORKLOADS, 0);

/// Alerts suppressed by the rate limit, per (workload, rule, class, action, executable) and per
/// CPU: each CPU adds to its own slot, so no suppressed alert goes uncounted; the agent sums the
/// slots and says in each summary what was suppressed.
#[map]
pub static SUPPRESSED: PerCpuHashMap<SuppressKey, u64> =
    PerCpuHashMap::with_max_entries(MAX_SUPPRESS_KEYS, 0);

#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// Decisions per (class, outcome), per CPU.
#[map]
pub static DECISIONS: PerCpuArray<u64> = PerCpuArray::with_max_entries(DECISION_SLOTS, 0);

#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(icmp_guard_common::maps::EVENTS_BYTES, 0);

/// An alert in flight through the tail-called stages, with the decision the hook returns.
#[repr(C)]
pub struct PendingAlert {
    /// 1 when the socket is refused.
    pub denied: u32,
    pub _pad: u32,
    pub event: SocketEvent,
}

/// Keyed by the thread id: a thread is inside one socket() call at a time.
#[map]
pub static ALERTS_IN_FLIGHT: HashMap<u64, PendingAlert> = HashMap::with_max_entries(256, 0);

/// All zeroes, never written: the template an in-flight alert starts from (too big for the stack).
#[map]
pub static ZERO_ALERT: PerCpuArray<PendingAlert> = PerCpuArray::with_max_entries(1, 0);

/// The alert stages, per program type (a tail call stays within one type).
#[map]
pub static LSM_STAGES: ProgramArray = ProgramArray::with_max_entries(2, 0);
#[map]
pub static CGROUP_STAGES: ProgramArray = ProgramArray::with_max_entries(2, 0);

#[inline(always)]
pub fn count(index: u32) {
    add(&COUNTERS, index);
}

/// Counts one decision of `class` with `outcome` (see `maps::outcome`).
#[inline(always)]
pub fn count_decision(class: u8, what: u32) {
    add(&DECISIONS, class as u32 * outcome::COUNT + what);
}

#[inline(always)]
fn add(map: &PerCpuArray<u64>, index: u32) {
    if let Some(c) = map.get_ptr_mut(index) {
        // Per-CPU slot: no other CPU writes it, so a plain add is exact.
        unsafe { *c += 1 };
    }
}
