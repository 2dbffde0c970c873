//! The maps the programs share with the agent. Layouts live in `icmp-guard-common`.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
};
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
#[map]
pub static PENDING_SOCKET: LruHashMap<u64, PendingSocket> = LruHashMap::with_max_entries(4096, 0);

#[inline(always)]
pub fn count(index: u32) {
    if let Some(c) = COUNTERS.get_ptr_mut(index) {
        // Per-CPU slot: no other CPU writes it, so a plain add is exact.
        unsafe { *c += 1 };
    }
}
