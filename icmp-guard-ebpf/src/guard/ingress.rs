//! The ingress decision, shared by the XDP program and its TC fallback.
//!
//! Order, for ICMP only (everything else leaves after the protocol byte):
//! 1. malformed or truncated ICMP → dropped (reason `malformed`), whatever the source;
//! 2. fragments of ICMP → passed only for a source with an Allow rule (ping of death);
//! 3. Path MTU Discovery, neighbour discovery (hop limit 255) and MLD → always passed;
//! 4. the active policy's LPM trie: no entry for this interface and family → not guarded;
//! 5. echo replies and errors that belong to the node's own flows → passed;
//! 6. the verdict of the source's rules for this type and code, else the default posture;
//!    an Allow is subject to the source's rate.

use aya_ebpf::{
    helpers::{bpf_ktime_get_boot_ns, bpf_ktime_get_ns},
    maps::lpm_trie::Key,
};
use icmp_guard_common::{
    guard::{
        FlowKey, GuardEvent, GuardSettings, ICMP_ANY, SOURCE_KEY_FIXED_BITS, SourceCount,
        SourceCountKey, SourceEntry, SourceKeyV4, SourceKeyV6, SourceOther, VerdictKey, counter,
        event_flags, reason,
    },
    maps::{Action, RULE_POSTURE},
};

use super::{
    flows::FLOW_TTL,
    maps::{
        GUARD_ACTIVE, GUARD_ALERT_CREDIT, GUARD_EPOCH, GUARD_EVENTS, GUARD_FLOWS, GUARD_RATE,
        GUARD_SETTINGS, GUARD_SOURCE_COUNTS, GUARD_SOURCE_OTHER, GUARD_SOURCES_V4,
        GUARD_SOURCES_V6, GUARD_VERDICTS, count,
    },
    packet::{ETH_P_IP, ETH_P_IPV6, Pkt, l3, v4_addr},
};

const ALLOW: u8 = Action::Allow as u8;
const AUDIT: u8 = Action::Audit as u8;
const BLOCK: u8 = Action::Block as u8;

const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ICMPV6: u8 = 58;

/// IPv6 extension headers walked before giving up (hop-by-hop, routing, fragment, destination
/// options and AH each count once).
const MAX_EXT_HEADERS: usize = 6;

/// What is known about one ICMP packet.
struct Seen {
    family: u8,
    src: [u8; 16],
    dst: [u8; 16],
    /// Offset of the ICMP header.
    l4: usize,
    icmp_type: u8,
    icmp_code: u8,
    /// Bytes 4..8 of the ICMP header (an echo's identifier and sequence).
    rest: [u8; 4],
    flags: u8,
}

/// `true`: drop the packet.
#[inline(always)]
pub fn ingress(p: &Pkt, hook: u8) -> bool {
    let Some((off, proto)) = l3(p) else {
        return false;
    };
    if proto == ETH_P_IP {
        return ipv4(p, off, hook);
    }
    if proto == ETH_P_IPV6 {
        return ipv6(p, off, hook);
    }
    false
}

#[inline(always)]
fn ipv4(p: &Pkt, l3: usize, hook: u8) -> bool {
    let base = p.data + l3;
    if base + 20 > p.end {
        // Too short for an IPv4 header: ICMP only if the protocol byte can be read and says so.
        if p.u8_at(l3 + 9) == Some(IPPROTO_ICMP) {
            let seen = unknown(4, [0; 16], [0; 16], event_flags::NO_SOURCE);
            return unknown_type(p, hook, &seen, reason::MALFORMED);
        }
        return false;
    }
    // SAFETY: 20 bytes checked above.
    let protocol = unsafe { *((base + 9) as *const u8) };
    if protocol != IPPROTO_ICMP {
        return false;
    }
    // From here on, only ICMP.
    let (vihl, tot_len, frag, src, dst) = unsafe {
        (
            *(base as *const u8),
            ((*((base + 2) as *const u8) as u16) << 8) | *((base + 3) as *const u8) as u16,
            ((*((base + 6) as *const u8) as u16) << 8) | *((base + 7) as *const u8) as u16,
            *((base + 12) as *const [u8; 4]),
            *((base + 16) as *const [u8; 4]),
        )
    };
    let mut seen = unknown(4, v4_addr(src), v4_addr(dst), event_flags::NO_TYPE);
    let ihl = ((vihl & 0x0f) as usize) * 4;
    let l3_len = p.frame_len.saturating_sub(l3 as u32);
    if vihl >> 4 != 4 || ihl < 20 || tot_len as u32 > l3_len {
        return unknown_type(p, hook, &seen, reason::MALFORMED);
    }
    if frag & 0x1fff != 0 {
        // A later fragment: no ICMP header to read.
        return unknown_type(p, hook, &seen, reason::FRAGMENT);
    }
    let l4 = l3 + ihl;
    if (tot_len as usize) < ihl + 8 {
        return unknown_type(p, hook, &seen, reason::MALFORMED);
    }
    let Some(icmp) = p.bytes_at::<8>(l4) else {
        return unknown_type(p, hook, &seen, reason::MALFORMED);
    };
    let (icmp_type, icmp_code) = (icmp[0], icmp[1]);
    seen.l4 = l4;
    seen.icmp_type = icmp_type;
    seen.icmp_code = icmp_code;
    seen.rest = [icmp[4], icmp[5], icmp[6], icmp[7]];
    seen.flags = 0;
    if frag & 0x2000 != 0 {
        // The first fragment of a larger ICMP message.
        return unknown_type(p, hook, &seen, reason::FRAGMENT);
    }
    if icmp_type == 3 && icmp_code == 4 {
        count(counter::PASS_PMTUD);
        return false;
    }
    decide(p, hook, &seen)
}

#[inline(always)]
fn is_ext_header(nh: u8) -> bool {
    nh == 0 || nh == 43 || nh == 44 || nh == 60 || nh == 51
}

#[inline(always)]
fn ipv6(p: &Pkt, l3: usize, hook: u8) -> bool {
    let base = p.data + l3;
    if base + 40 > p.end {
        if p.u8_at(l3 + 6) == Some(IPPROTO_ICMPV6) {
            let seen = unknown(6, [0; 16], [0; 16], event_flags::NO_SOURCE);
            return unknown_type(p, hook, &seen, reason::MALFORMED);
        }
        return false;
    }
    // SAFETY: 40 bytes checked above.
    let mut nh = unsafe { *((base + 6) as *const u8) };
    if nh == IPPROTO_TCP || nh == IPPROTO_UDP {
        return false;
    }
    if nh != IPPROTO_ICMPV6 && !is_ext_header(nh) {
        return false;
    }
    let (payload_len, hop_limit, src, dst) = unsafe {
        (
            ((*((base + 4) as *const u8) as u16) << 8) | *((base + 5) as *const u8) as u16,
            *((base + 7) as *const u8),
            *((base + 8) as *const [u8; 16]),
            *((base + 24) as *const [u8; 16]),
        )
    };
    let mut seen = unknown(6, src, dst, event_flags::NO_TYPE);
    let mut off = l3 + 40;
    let mut fragment = false;
    let mut later_fragment = false;
    for _ in 0..MAX_EXT_HEADERS {
        if !is_ext_header(nh) {
            break;
        }
        // Every extension header is at least 8 bytes.
        let Some(ext) = p.bytes_at::<8>(off) else {
            return unknown_type(p, hook, &seen, reason::EXT_HEADERS);
        };
        let (next, len) = (ext[0], ext[1]);
        if nh == 44 {
            fragment = true;
            later_fragment = ((ext[2] as u16) << 8 | ext[3] as u16) & 0xfff8 != 0;
            off += 8;
        } else if nh == 51 {
            off += (len as usize + 2) * 4;
        } else {
            off += (len as usize + 1) * 8;
        }
        nh = next;
    }
    if is_ext_header(nh) {
        return unknown_type(p, hook, &seen, reason::EXT_HEADERS);
    }
    if nh != IPPROTO_ICMPV6 {
        return false;
    }
    let l3_len = p.frame_len.saturating_sub(l3 as u32);
    if payload_len as u32 + 40 > l3_len {
        return unknown_type(p, hook, &seen, reason::MALFORMED);
    }
    if later_fragment {
        return unknown_type(p, hook, &seen, reason::FRAGMENT);
    }
    if off + 8 > l3 + 40 + payload_len as usize {
        return unknown_type(p, hook, &seen, reason::MALFORMED);
    }
    let Some(icmp) = p.bytes_at::<8>(off) else {
        return unknown_type(p, hook, &seen, reason::MALFORMED);
    };
    let (icmp_type, icmp_code) = (icmp[0], icmp[1]);
    seen.l4 = off;
    seen.icmp_type = icmp_type;
    seen.icmp_code = icmp_code;
    seen.rest = [icmp[4], icmp[5], icmp[6], icmp[7]];
    seen.flags = 0;
    if fragment {
        return unknown_type(p, hook, &seen, reason::FRAGMENT);
    }
    match icmp_type {
        2 => {
            count(counter::PASS_PMTUD);
            return false;
        }
        133..=137 if hop_limit == 255 => {
            count(counter::PASS_NDP);
            return false;
        }
        130 | 131 | 132 | 143 => {
            count(counter::PASS_MLD);
            return false;
        }
        _ => {}
    }
    decide(p, hook, &seen)
}

#[inline(always)]
fn unknown(family: u8, src: [u8; 16], dst: [u8; 16], flags: u8) -> Seen {
    Seen {
        family,
        src,
        dst,
        l4: 0,
        icmp_type: 0,
        icmp_code: 0,
        rest: [0; 4],
        flags: flags | event_flags::NO_TYPE,
    }
}

#[inline(always)]
fn generation() -> u32 {
    GUARD_ACTIVE.get(0).copied().unwrap_or(0) & 1
}

#[inline(always)]
fn source_entry(p: &Pkt, generation: u32, seen: &Seen) -> Option<SourceEntry> {
    if seen.family == 4 {
        let key = Key::new(
            SOURCE_KEY_FIXED_BITS + 32,
            SourceKeyV4 {
                generation,
                ifindex: p.ifindex,
                addr: [seen.src[0], seen.src[1], seen.src[2], seen.src[3]],
            },
        );
        GUARD_SOURCES_V4.get(&key).copied()
    } else {
        let key = Key::new(
            SOURCE_KEY_FIXED_BITS + 128,
            SourceKeyV6 {
                generation,
                ifindex: p.ifindex,
                addr: seen.src,
            },
        );
        GUARD_SOURCES_V6.get(&key).copied()
    }
}

/// A packet whose ICMP type is not known or not trusted (fragment, malformed, unparsed
/// extension headers): only an explicit Allow rule for the whole source lets a fragment pass;
/// everything else gets the posture (or Block, if a rule says so).
#[inline(always)]
fn unknown_type(p: &Pkt, hook: u8, seen: &Seen, why: u8) -> bool {
    let generation = generation();
    let Some(entry) = source_entry(p, generation, seen) else {
        count(counter::PASS_UNGUARDED);
        return false;
    };
    let Some(settings) = GUARD_SETTINGS.get(generation) else {
        return false;
    };
    if why == reason::FRAGMENT && entry.action == ALLOW && entry.rule != RULE_POSTURE {
        return allowed(p, hook, generation, settings, seen, entry.rule);
    }
    let action = if entry.action == BLOCK {
        BLOCK
    } else {
        settings.posture
    };
    deny(p, hook, generation, settings, seen, why, action, entry.rule)
}

#[inline(always)]
fn decide(p: &Pkt, hook: u8, seen: &Seen) -> bool {
    let generation = generation();
    let Some(entry) = source_entry(p, generation, seen) else {
        count(counter::PASS_UNGUARDED);
        return false;
    };
    // The node's own traffic: echo replies to its pings, errors about its flows.
    let v4 = seen.family == 4;
    let t = seen.icmp_type;
    if (v4 && t == 0) || (!v4 && t == 129) {
        if own_echo_reply(seen) {
            count(counter::PASS_ECHO_REPLY);
            return false;
        }
    } else if (v4 && (t == 3 || t == 11 || t == 12)) || (!v4 && (t == 1 || t == 3 || t == 4)) {
        if own_error(p, seen) {
            count(counter::PASS_OWN_ERROR);
            return false;
        }
    }
    let (mut action, mut rule) = (entry.action, entry.rule);
    if entry.specific != 0 {
        let mut key = VerdictKey {
            generation,
            class: entry.class,
            icmp_type: t as u16,
            icmp_code: seen.icmp_code as u16,
        };
        if let Some(v) = unsafe { GUARD_VERDICTS.get(&key) } {
            (action, rule) = (v.action, v.rule);
        } else {
            key.icmp_code = ICMP_ANY;
            if let Some(v) = unsafe { GUARD_VERDICTS.get(&key) } {
                (action, rule) = (v.action, v.rule);
            }
        }
    }
    if action == ALLOW && rule == RULE_POSTURE {
        // No allow-list on this interface for this family.
        count(counter::PASS_UNLISTED);
        return false;
    }
    let Some(settings) = GUARD_SETTINGS.get(generation) else {
        return false;
    };
    if action == ALLOW {
        return allowed(p, hook, generation, settings, seen, rule);
    }
    let why = if rule == RULE_POSTURE {
        reason::POSTURE
    } else {
        reason::RULE
    };
    deny(p, hook, generation, settings, seen, why, action, rule)
}

/// An allowed packet, within its source's rate (GCRA; races between CPUs make the limit
/// approximate under contention, never the counts).
#[inline(always)]
fn allowed(
    p: &Pkt,
    hook: u8,
    generation: u32,
    settings: &GuardSettings,
    seen: &Seen,
    rule: u32,
) -> bool {
    let interval = settings.rate_interval_ns;
    if interval == 0 {
        count(counter::PASS_ALLOWED);
        return false;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    let key = SourceCountKey {
        family: seen.family,
        epoch: 0,
        _pad: [0; 2],
        addr: seen.src,
    };
    match GUARD_RATE.get_ptr_mut(&key) {
        Some(tat) => {
            let t = unsafe { *tat };
            let t = if t > now { t } else { now };
            if t - now > settings.rate_tolerance_ns {
                return deny(
                    p,
                    hook,
                    generation,
                    settings,
                    seen,
                    reason::RATE,
                    settings.posture,
                    rule,
                );
            }
            unsafe { *tat = t + interval };
        }
        None => {
            let _ = GUARD_RATE.insert(&key, &(now + interval), 0);
        }
    }
    count(counter::PASS_ALLOWED);
    false
}

/// An Audit or Block: counted (per reason and per source), alerted within the alert rate, and
/// dropped unless it is only audited.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn deny(
    p: &Pkt,
    hook: u8,
    generation: u32,
    settings: &GuardSettings,
    seen: &Seen,
    why: u8,
    action: u8,
    rule: u32,
) -> bool {
    let block = action == BLOCK;
    let drop = block && settings.audit_only == 0;
    if drop {
        count(counter::DROP_BASE + why as u32);
    } else {
        count(counter::AUDIT_BASE + why as u32);
    }
    count_source(seen, drop);
    let mut flags = seen.flags;
    if drop {
        flags |= event_flags::DROPPED;
    } else if block {
        flags |= event_flags::DOWNGRADED;
    }
    alert(
        p,
        hook,
        generation,
        seen,
        why,
        if block { BLOCK } else { AUDIT },
        rule,
        flags,
    );
    drop
}

/// Adds the packet to its source's count of the current summary epoch.
#[inline(always)]
fn count_source(seen: &Seen, dropped: bool) {
    let epoch = GUARD_EPOCH.get(0).copied().unwrap_or(0) & 1;
    let add = |c: *mut SourceCount| unsafe {
        if dropped {
            (*c).dropped += 1;
        } else {
            (*c).audited += 1;
        }
    };
    let add_other = |o: *mut SourceOther| unsafe {
        if dropped {
            (*o).dropped += 1;
        } else {
            (*o).audited += 1;
        }
    };
    let key = SourceCountKey {
        family: seen.family,
        epoch: epoch as u8,
        _pad: [0; 2],
        addr: seen.src,
    };
    // The common case under a flood: the source is already counted in this epoch.
    if let Some(c) = GUARD_SOURCE_COUNTS.get_ptr_mut(&key) {
        add(c);
        return;
    }
    let Some(other) = GUARD_SOURCE_OTHER.get_ptr_mut(epoch) else {
        return;
    };
    if unsafe { (*other).full } != 0 {
        add_other(other);
        count(counter::SOURCE_TABLE_FULL);
        return;
    }
    let first = SourceCount {
        dropped: dropped as u64,
        audited: (!dropped) as u64,
    };
    // BPF_NOEXIST: another CPU may have inserted the key meanwhile; then add to this CPU's slot.
    match GUARD_SOURCE_COUNTS.insert(&key, &first, 1) {
        Ok(()) => {}
        Err(_) => {
            if let Some(c) = GUARD_SOURCE_COUNTS.get_ptr_mut(&key) {
                add(c);
            } else {
                unsafe { (*other).full = 1 };
                add_other(other);
                count(counter::SOURCE_TABLE_FULL);
            }
        }
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn alert(
    p: &Pkt,
    hook: u8,
    generation: u32,
    seen: &Seen,
    why: u8,
    action: u8,
    rule: u32,
    flags: u8,
) {
    let Some(credit) = GUARD_ALERT_CREDIT.get_ptr_mut(0) else {
        return;
    };
    if unsafe { *credit } == 0 {
        count(counter::ALERTS_SUPPRESSED);
        return;
    }
    unsafe { *credit -= 1 };
    let event = GuardEvent {
        boot_ns: unsafe { bpf_ktime_get_boot_ns() },
        ifindex: p.ifindex,
        rule,
        src: seen.src,
        dst: seen.dst,
        len: p.frame_len,
        family: seen.family,
        icmp_type: seen.icmp_type,
        icmp_code: seen.icmp_code,
        action,
        reason: why,
        flags,
        generation: generation as u8,
        hook,
    };
    if GUARD_EVENTS.output::<GuardEvent>(&event, 0).is_ok() {
        count(counter::ALERTS_SENT);
    } else {
        count(counter::RINGBUF_FULL);
    }
}

#[inline(always)]
fn fresh(key: &FlowKey) -> bool {
    match unsafe { GUARD_FLOWS.get(key) } {
        Some(seen_at) => {
            let now = unsafe { bpf_ktime_get_ns() };
            now.saturating_sub(*seen_at) < FLOW_TTL
        }
        None => false,
    }
}

/// An echo reply whose (source, identifier) the node sent an echo request to.
#[inline(always)]
fn own_echo_reply(seen: &Seen) -> bool {
    let id = seen.rest;
    let key = FlowKey {
        family: seen.family,
        proto: if seen.family == 4 {
            IPPROTO_ICMP
        } else {
            IPPROTO_ICMPV6
        },
        _pad: [0; 2],
        ports: [id[0], id[1], 0, 0],
        local: seen.dst,
        remote: seen.src,
    };
    fresh(&key)
}

/// An error whose embedded header is a packet the node sent: matched on the inner header, since
/// errors come from routers, not from the peer.
#[inline(always)]
fn own_error(p: &Pkt, seen: &Seen) -> bool {
    let inner = seen.l4 + 8;
    let mut key = FlowKey {
        family: seen.family,
        ..FlowKey::default()
    };
    let l4;
    let proto;
    if seen.family == 4 {
        let Some(h) = p.bytes_at::<20>(inner) else {
            return false;
        };
        let ihl = ((h[0] & 0x0f) as usize) * 4;
        if ihl < 20 {
            return false;
        }
        proto = h[9];
        key.local = v4_addr([h[12], h[13], h[14], h[15]]);
        key.remote = v4_addr([h[16], h[17], h[18], h[19]]);
        l4 = inner + ihl;
    } else {
        let Some(h) = p.bytes_at::<40>(inner) else {
            return false;
        };
        proto = h[6];
        key.local.copy_from_slice(&h[8..24]);
        key.remote.copy_from_slice(&h[24..40]);
        l4 = inner + 40;
    }
    let Some(h) = p.bytes_at::<8>(l4) else {
        return false;
    };
    if proto == IPPROTO_TCP || proto == IPPROTO_UDP {
        key.ports = [h[0], h[1], h[2], h[3]];
    } else if (proto == IPPROTO_ICMP && h[0] == 8) || (proto == IPPROTO_ICMPV6 && h[0] == 128) {
        key.ports = [h[4], h[5], 0, 0];
    } else {
        return false;
    }
    key.proto = proto;
    fresh(&key)
}
