//! The maps the programs share with the agent. Layouts live in `icmp-guard-common`.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap, ProgramArray, RingBuf},
};
use icmp_guard_common::event::SocketEvent;
use icmp_guard_common::maps::{
    CgroupKey, MAX_RULES, MAX_WORKLOAD_CGROUPS, MAX_WORKLOADS, PendingSocket, RateState, RuleKey,
    Settings, Verdict, WorkloadKey, WorkloadPolicy, counter,
};

/// Index 0: the active generation (0 or 1).
#[map]
pub static ACTIVE: Array<u32> = Array::with_max_entries(1, 0);

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

/// Alerts suppressed by the rate limit, per workload and per CPU: each CPU adds to its own slot,
/// so no suppressed alert goes uncounted; the agent sums the slots.
#[map]
pub static SUPPRESSED: PerCpuHashMap<u32, u64> = PerCpuHashMap::with_max_entries(MAX_WORKLOADS, 0);

#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(icmp_guard_common::maps::EVENTS_BYTES, 0);

/// socket(2) arguments with their flags, per thread, from `sys_enter_socket`.
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

#[map]
pub static PENDING_SOCKET: LruHashMap<u64, PendingSocket> = LruHashMap::with_max_entries(4096, 0);

#[inline(always)]
pub fn count(index: u32) {
    if let Some(c) = COUNTERS.get_ptr_mut(index) {
        // Per-CPU slot: no other CPU writes it, so a plain add is exact.
        unsafe { *c += 1 };
    }
}
