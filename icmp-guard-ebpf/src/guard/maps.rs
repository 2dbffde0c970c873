//! The guard's maps. Layouts live in `icmp_guard_common::guard`.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
};
use icmp_guard_common::guard::{
    FlowKey, GuardSettings, GuardVerdict, MAX_COUNTED_SOURCES, MAX_FLOWS, MAX_RATE_SOURCES,
    MAX_SOURCES, MAX_VERDICTS, SourceCount, SourceCountKey, SourceEntry, SourceKeyV4, SourceKeyV6,
    SourceOther, VerdictKey, counter,
};

/// Index 0: the active generation (0 or 1).
#[map]
pub static GUARD_ACTIVE: Array<u32> = Array::with_max_entries(1, 0);

/// Index = generation.
#[map]
pub static GUARD_SETTINGS: Array<GuardSettings> = Array::with_max_entries(2, 0);

#[map]
pub static GUARD_SOURCES_V4: LpmTrie<SourceKeyV4, SourceEntry> =
    LpmTrie::with_max_entries(MAX_SOURCES, 0);

#[map]
pub static GUARD_SOURCES_V6: LpmTrie<SourceKeyV6, SourceEntry> =
    LpmTrie::with_max_entries(MAX_SOURCES, 0);

#[map]
pub static GUARD_VERDICTS: HashMap<VerdictKey, GuardVerdict> =
    HashMap::with_max_entries(MAX_VERDICTS, 0);

/// The node's own flows, written by the egress program: value = when last seen (ns since boot).
#[map]
pub static GUARD_FLOWS: LruHashMap<FlowKey, u64> = LruHashMap::with_max_entries(MAX_FLOWS, 0);

/// Per-source rate state (GCRA: the theoretical arrival time, ns). Not generation-keyed: a
/// reload does not hand a flooding source a fresh burst.
#[map]
pub static GUARD_RATE: LruHashMap<SourceCountKey, u64> =
    LruHashMap::with_max_entries(MAX_RATE_SOURCES, 0);

/// Index 0: alerts that may still be sent in this second. The agent refills it once a second to
/// `alertsPerSecond`, so the drop path reads no clock. Decremented with benign races between
/// CPUs (a few extra alerts under contention; every packet is counted regardless).
#[map]
pub static GUARD_ALERT_CREDIT: Array<u64> = Array::with_max_entries(1, 0);

/// Index 0: the summary epoch packets are counted in (0 or 1).
#[map]
pub static GUARD_EPOCH: Array<u32> = Array::with_max_entries(1, 0);

#[map]
pub static GUARD_SOURCE_COUNTS: PerCpuHashMap<SourceCountKey, SourceCount> =
    PerCpuHashMap::with_max_entries(MAX_COUNTED_SOURCES, 0);

/// Index = epoch.
#[map]
pub static GUARD_SOURCE_OTHER: PerCpuArray<SourceOther> = PerCpuArray::with_max_entries(2, 0);

#[map]
pub static GUARD_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

#[map]
pub static GUARD_EVENTS: RingBuf =
    RingBuf::with_byte_size(icmp_guard_common::guard::EVENTS_BYTES, 0);

#[inline(always)]
pub fn count(index: u32) {
    if let Some(c) = GUARD_COUNTERS.get_ptr_mut(index) {
        // Per-CPU slot: no other CPU writes it, so a plain add is exact.
        unsafe { *c += 1 };
    }
}
