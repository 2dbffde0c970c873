//! Keys, values and records of the inbound ICMP guard (the XDP/TC programs of the second kernel
//! object, `icmp-guard-guard`).
//!
//! Userspace compiles `KubeArmorNetworkPolicy` ingress rules into these entries; the kernel only
//! looks them up. Policy entries carry a generation, as the socket maps do: an update writes the
//! inactive generation in full, then flips [`MAP_GUARD_ACTIVE`] in one array write.
//!
//! A packet's decision needs at most one LPM lookup (source → [`SourceEntry`]) and, only for
//! sources whose rules name ICMP types, two hash lookups ([`VerdictKey`] with the type and code,
//! then with the type alone). Everything else is counted per CPU.

pub const MAP_GUARD_ACTIVE: &str = "GUARD_ACTIVE";
pub const MAP_GUARD_SETTINGS: &str = "GUARD_SETTINGS";
pub const MAP_GUARD_SOURCES_V4: &str = "GUARD_SOURCES_V4";
pub const MAP_GUARD_SOURCES_V6: &str = "GUARD_SOURCES_V6";
pub const MAP_GUARD_VERDICTS: &str = "GUARD_VERDICTS";
pub const MAP_GUARD_FLOWS: &str = "GUARD_FLOWS";
pub const MAP_GUARD_RATE: &str = "GUARD_RATE";
pub const MAP_GUARD_ALERT_CREDIT: &str = "GUARD_ALERT_CREDIT";
pub const MAP_GUARD_EPOCH: &str = "GUARD_EPOCH";
pub const MAP_GUARD_SOURCE_COUNTS: &str = "GUARD_SOURCE_COUNTS";
pub const MAP_GUARD_SOURCE_OTHER: &str = "GUARD_SOURCE_OTHER";
pub const MAP_GUARD_COUNTERS: &str = "GUARD_COUNTERS";
pub const MAP_GUARD_EVENTS: &str = "GUARD_EVENTS";

/// Program names in the guard object.
pub const PROG_XDP: &str = "guard_xdp";
/// The same program, loaded with `BPF_F_XDP_HAS_FRAGS` (kernels from 5.18): needed for native
/// XDP on interfaces whose MTU does not fit one page (veth with MTU 9000).
pub const PROG_XDP_FRAGS: &str = "guard_xdp_frags";
pub const PROG_TC_INGRESS: &str = "guard_tc_ingress";
pub const PROG_TC_EGRESS: &str = "guard_tc_egress";

/// Capacities. LPM tries and verdicts hold both generations.
pub const MAX_SOURCES: u32 = 16384;
pub const MAX_VERDICTS: u32 = 16384;
pub const MAX_FLOWS: u32 = 65536;
pub const MAX_RATE_SOURCES: u32 = 65536;
/// Sources counted per summary interval (both epochs together); beyond it, packets are counted
/// under "other sources".
pub const MAX_COUNTED_SOURCES: u32 = 16384;
pub const EVENTS_BYTES: u32 = 1 << 20;

/// `icmp_type`/`icmp_code` of a [`VerdictKey`] that matches any value.
pub const ICMP_ANY: u16 = 0x100;

/// Bits of the LPM key before the address: generation and ifindex, matched exactly.
pub const SOURCE_KEY_FIXED_BITS: u32 = 64;

/// How a flow table entry is known fresh: the node sent on this flow within this many seconds.
pub const FLOW_TTL_NS: u64 = 120_000_000_000;
/// The egress program rewrites an entry only when it is older than this, so a busy flow does not
/// write the map on every packet.
pub const FLOW_REFRESH_NS: u64 = 1_000_000_000;

/// Per-generation settings; index = generation.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuardSettings {
    /// 1: every Block is downgraded to an audit (`--mode audit`).
    pub audit_only: u8,
    /// `Action` given to packets that exceed their source's rate, fragments and malformed
    /// packets from sources without an Allow rule: the configured posture (Block or Audit).
    pub posture: u8,
    pub _pad: [u8; 6],
    /// Per-source rate limit as GCRA: one packet per `rate_interval_ns`, bursts of
    /// `rate_tolerance_ns / rate_interval_ns + 1`. 0 = no limit.
    pub rate_interval_ns: u64,
    pub rate_tolerance_ns: u64,
}

/// LPM key of [`MAP_GUARD_SOURCES_V4`]: `prefix_len` = [`SOURCE_KEY_FIXED_BITS`] + CIDR length.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SourceKeyV4 {
    pub generation: u32,
    pub ifindex: u32,
    /// Network byte order.
    pub addr: [u8; 4],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SourceKeyV6 {
    pub generation: u32,
    pub ifindex: u32,
    pub addr: [u8; 16],
}

/// What the longest matching prefix says about a source on one interface.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SourceEntry {
    /// The set of rules that cover this prefix, for [`VerdictKey`] lookups.
    pub class: u32,
    /// Verdict for ICMP types no rule of the class names: an `Action`, and the rule that gave it
    /// ([`RULE_POSTURE`](crate::maps::RULE_POSTURE) for the default posture).
    pub rule: u32,
    pub action: u8,
    /// 1 when the class has type-specific verdicts to look up first.
    pub specific: u8,
    pub _pad: [u8; 2],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VerdictKey {
    pub generation: u32,
    pub class: u32,
    pub icmp_type: u16,
    pub icmp_code: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuardVerdict {
    pub action: u8,
    pub _pad: [u8; 3],
    pub rule: u32,
}

/// A flow the node itself sent on, as the egress program saw it (post-NAT).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// 4 or 6.
    pub family: u8,
    /// 6, 17, or 1/58 for an echo request.
    pub proto: u8,
    pub _pad: [u8; 2],
    /// TCP/UDP: the first four bytes of the header (local port, remote port); echo: the
    /// identifier and two zero bytes.
    pub ports: [u8; 4],
    pub local: [u8; 16],
    pub remote: [u8; 16],
}

/// A source address; IPv4 in the first four bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SourceCountKey {
    pub family: u8,
    /// Summary epoch (0 or 1) the packet was counted in; always 0 in [`MAP_GUARD_RATE`].
    pub epoch: u8,
    pub _pad: [u8; 2],
    pub addr: [u8; 16],
}

/// Packets dropped and audited from one source in one epoch, per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SourceCount {
    pub dropped: u64,
    pub audited: u64,
}

/// Packets of sources that did not fit [`MAP_GUARD_SOURCE_COUNTS`], per epoch and CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SourceOther {
    pub dropped: u64,
    pub audited: u64,
    /// 1 once an insert failed in this epoch on this CPU: later sources skip the attempt.
    pub full: u64,
}

/// Why a packet was dropped or audited.
pub mod reason {
    /// An Audit or Block rule.
    pub const RULE: u8 = 0;
    /// No rule allowed it; the default posture.
    pub const POSTURE: u8 = 1;
    /// Its source is allowed but over its rate.
    pub const RATE: u8 = 2;
    /// A fragment of ICMP from a source without an Allow rule (ping of death).
    pub const FRAGMENT: u8 = 3;
    /// A malformed or truncated ICMP packet.
    pub const MALFORMED: u8 = 4;
    /// An IPv6 packet whose extension headers do not end within the walk: it cannot be proven
    /// not to be ICMPv6.
    pub const EXT_HEADERS: u8 = 5;
    pub const COUNT: u8 = 6;

    pub const fn name(r: u8) -> &'static str {
        match r {
            RULE => "rule",
            POSTURE => "posture",
            RATE => "rate",
            FRAGMENT => "fragment",
            MALFORMED => "malformed",
            EXT_HEADERS => "extension-headers",
            _ => "unknown",
        }
    }
}

/// Which program decided.
pub mod hook {
    pub const XDP: u8 = 1;
    pub const TC: u8 = 2;
}

/// Indices of the per-CPU [`MAP_GUARD_COUNTERS`] array. Every ICMP packet the ingress program
/// sees adds one to exactly one of the `PASS_*`, `DROP_BASE + reason` or `AUDIT_BASE + reason`
/// counters.
pub mod counter {
    /// ICMPv4 3/4 and ICMPv6 2: Path MTU Discovery.
    pub const PASS_PMTUD: u32 = 0;
    /// ICMPv6 133–137 with hop limit 255.
    pub const PASS_NDP: u32 = 1;
    /// ICMPv6 130–132, 143.
    pub const PASS_MLD: u32 = 2;
    /// Echo replies to the node's own echo requests.
    pub const PASS_ECHO_REPLY: u32 = 3;
    /// Errors whose inner header is one of the node's own flows.
    pub const PASS_OWN_ERROR: u32 = 4;
    /// Allowed by a rule, within the source's rate.
    pub const PASS_ALLOWED: u32 = 5;
    /// On an interface and family with no Allow rule, so no allow-list: passed.
    pub const PASS_UNLISTED: u32 = 6;
    /// The interface or family is not guarded by the active policy.
    pub const PASS_UNGUARDED: u32 = 7;
    pub const DROP_BASE: u32 = 8;
    pub const AUDIT_BASE: u32 = 16;
    pub const ALERTS_SENT: u32 = 24;
    pub const ALERTS_SUPPRESSED: u32 = 25;
    pub const RINGBUF_FULL: u32 = 26;
    /// Packets counted under "other sources" because the per-source table was full.
    pub const SOURCE_TABLE_FULL: u32 = 27;
    /// Flow-table writes by the egress program.
    pub const EGRESS_RECORDED: u32 = 28;
    /// TC ingress: `bpf_skb_pull_data` failed, headers were read as far as linear.
    pub const PULL_FAILED: u32 = 29;
    pub const COUNT: u32 = 32;
}

/// Bits of [`GuardEvent::flags`].
pub mod event_flags {
    /// The packet was dropped.
    pub const DROPPED: u8 = 1 << 0;
    /// A Block downgraded by `--mode audit`.
    pub const DOWNGRADED: u8 = 1 << 1;
    /// The source address could not be read (truncated header).
    pub const NO_SOURCE: u8 = 1 << 2;
    /// The ICMP type and code could not be read.
    pub const NO_TYPE: u8 = 1 << 3;
}

/// The ring-buffer record of one alerted packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuardEvent {
    pub boot_ns: u64,
    pub ifindex: u32,
    /// Index into the generation's rule table, or `RULE_POSTURE`.
    pub rule: u32,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Bytes of the frame.
    pub len: u32,
    pub family: u8,
    pub icmp_type: u8,
    pub icmp_code: u8,
    pub action: u8,
    pub reason: u8,
    pub flags: u8,
    pub generation: u8,
    pub hook: u8,
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are #[repr(C)] plain integers with explicit padding.
    unsafe impl aya::Pod for GuardSettings {}
    unsafe impl aya::Pod for SourceKeyV4 {}
    unsafe impl aya::Pod for SourceKeyV6 {}
    unsafe impl aya::Pod for SourceEntry {}
    unsafe impl aya::Pod for VerdictKey {}
    unsafe impl aya::Pod for GuardVerdict {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for SourceCountKey {}
    unsafe impl aya::Pod for SourceCount {}
    unsafe impl aya::Pod for SourceOther {}
    unsafe impl aya::Pod for GuardEvent {}
}
