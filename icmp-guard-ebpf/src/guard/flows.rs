//! The egress side: every flow the node sends on is written to the flow table, so that the
//! ingress program can tell replies and errors that belong to it from unsolicited ICMP.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use icmp_guard_common::guard::{FLOW_REFRESH_NS, FLOW_TTL_NS, FlowKey, counter};

use super::{
    maps::{GUARD_FLOWS, count},
    packet::{ETH_P_IP, ETH_P_IPV6, Pkt, l3, v4_addr},
};

pub const FLOW_TTL: u64 = FLOW_TTL_NS;

/// Records the packet's flow if it is TCP, UDP or an echo request. Never changes the packet.
#[inline(always)]
pub fn record(p: &Pkt) {
    let Some((off, proto)) = l3(p) else {
        return;
    };
    let mut key = FlowKey::default();
    let l4;
    if proto == ETH_P_IP {
        let Some(h) = p.bytes_at::<20>(off) else {
            return;
        };
        let ihl = ((h[0] & 0x0f) as usize) * 4;
        // Later fragments carry no ports.
        if ihl < 20 || (h[6] & 0x1f) != 0 || h[7] != 0 {
            return;
        }
        key.family = 4;
        key.proto = h[9];
        key.local = v4_addr([h[12], h[13], h[14], h[15]]);
        key.remote = v4_addr([h[16], h[17], h[18], h[19]]);
        l4 = off + ihl;
    } else if proto == ETH_P_IPV6 {
        // One bounds check for the whole header: separate optional reads let the compiler
        // merge values in ways the verifier cannot follow.
        let Some(h) = p.bytes_at::<40>(off) else {
            return;
        };
        let nh = h[6];
        let mut src = [0u8; 16];
        let mut dst = [0u8; 16];
        src.copy_from_slice(&h[8..24]);
        dst.copy_from_slice(&h[24..40]);
        key.family = 6;
        key.proto = nh;
        key.local = src;
        key.remote = dst;
        l4 = off + 40;
    } else {
        return;
    }
    let Some(h) = p.bytes_at::<8>(l4) else {
        return;
    };
    match key.proto {
        6 | 17 => key.ports = [h[0], h[1], h[2], h[3]],
        1 if h[0] == 8 => key.ports = [h[4], h[5], 0, 0],
        58 if h[0] == 128 => key.ports = [h[4], h[5], 0, 0],
        _ => return,
    }
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(seen) = unsafe { GUARD_FLOWS.get(&key) }
        && now.saturating_sub(*seen) < FLOW_REFRESH_NS
    {
        return;
    }
    let _ = GUARD_FLOWS.insert(&key, &now, 0);
    count(counter::EGRESS_RECORDED);
}
