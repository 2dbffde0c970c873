//! The guard's records → KubeArmor alerts, and the per-second summaries that account for every
//! dropped or audited packet.
//!
//! - A rate-limited sample of decisions becomes `MatchedNetworkPolicy` alerts, as KubeArmor's
//!   own network firewall writes them: `Operation: NetworkFirewall`, `Resource: INGRESS`,
//!   `Data: "SourceIP=… DestinationIP=… Protocol=ICMP ICMPType=8 ICMPCode=0"`, the same keys in
//!   `EventData`. ICMP has no ports, so `SourcePort`/`DestinationPort` are left out.
//! - Every packet is counted in the kernel, per reason and per source. Once a second the agent
//!   writes one `SystemEvent` (`Operation: NetworkFirewall`, `Resource: INGRESS`) with the
//!   interval's totals and its top sources. A summary rather than more `MatchedNetworkPolicy`
//!   alerts, so that consumers that count policy matches never count a flood twice.

use std::{collections::BTreeMap, net::IpAddr, sync::Arc, time::Duration};

use icmp_guard_common::{
    guard::{GuardEvent, counter, event_flags, hook, reason},
    maps::{Action, RULE_POSTURE},
};

use crate::{
    compile::guard::GuardRuleInfo,
    events::alert::{Alert, alert_at},
    kernel::guard::{AttachMode, Counters, SourceSnapshot},
    sources::policy::network::Family,
};

/// Sources named in a summary.
pub const SUMMARY_TOP: usize = 10;

pub struct GuardContext {
    pub cluster_name: String,
    pub host_name: String,
    pub boot_to_unix_ns: i128,
    /// Rule tables of the two generations, as last applied.
    pub rules: [Arc<Vec<GuardRuleInfo>>; 2],
    pub interfaces: BTreeMap<u32, (String, AttachMode)>,
    pub alerts_per_sec: u32,
}

pub fn decode(bytes: &[u8]) -> Option<GuardEvent> {
    if bytes.len() < std::mem::size_of::<GuardEvent>() {
        return None;
    }
    // SAFETY: length checked; GuardEvent is plain old data; read_unaligned copes with any
    // alignment.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<GuardEvent>()) })
}

pub fn address(family: Family, bytes: &[u8; 16]) -> IpAddr {
    match family {
        Family::V4 => IpAddr::from([bytes[0], bytes[1], bytes[2], bytes[3]]),
        Family::V6 => IpAddr::from(*bytes),
    }
}

fn now_unix_ns() -> i128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0)
}

/// What each reason means, for the alert's message.
fn why(r: u8) -> &'static str {
    match r {
        reason::RULE => "matched a rule",
        reason::POSTURE => "from outside the allowed ranges",
        reason::RATE => "over its source's rate limit",
        reason::FRAGMENT => "fragmented ICMP from a source without an Allow rule",
        reason::MALFORMED => "malformed or truncated ICMP",
        reason::EXT_HEADERS => "IPv6 extension headers too long to prove it is not ICMPv6",
        _ => "unknown reason",
    }
}

impl GuardContext {
    fn base(&self, unix_ns: i128) -> Alert {
        Alert {
            operation: "NetworkFirewall".into(),
            resource: "INGRESS".into(),
            ..alert_at(unix_ns, &self.cluster_name, &self.host_name)
        }
    }

    fn interface(&self, ifindex: u32) -> String {
        self.interfaces
            .get(&ifindex)
            .map(|(n, _)| n.clone())
            .unwrap_or_else(|| format!("ifindex {ifindex}"))
    }

    pub fn alert(&self, ev: &GuardEvent) -> Alert {
        let mut a = self.base(ev.boot_ns as i128 + self.boot_to_unix_ns);
        a.kind = "MatchedNetworkPolicy".into();
        let family = if ev.family == 4 {
            Family::V4
        } else {
            Family::V6
        };
        let protocol = family.protocol();
        let mut fields: Vec<(&str, String)> = Vec::new();
        if ev.flags & event_flags::NO_SOURCE == 0 {
            fields.push(("SourceIP", address(family, &ev.src).to_string()));
            fields.push(("DestinationIP", address(family, &ev.dst).to_string()));
        }
        fields.push(("Protocol", protocol.to_string()));
        if ev.flags & event_flags::NO_TYPE == 0 {
            fields.push(("ICMPType", ev.icmp_type.to_string()));
            fields.push(("ICMPCode", ev.icmp_code.to_string()));
        }
        a.data = fields
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ");
        for (k, v) in fields {
            a.event_data.insert(k.into(), v);
        }
        a.event_data
            .insert("Interface".into(), self.interface(ev.ifindex));
        a.event_data
            .insert("Reason".into(), reason::name(ev.reason).into());
        a.event_data.insert("Length".into(), ev.len.to_string());
        a.enforcer = if ev.hook == hook::TC { "TC" } else { "XDP" }.into();
        let dropped = ev.flags & event_flags::DROPPED != 0;
        a.action = match Action::from_u8(ev.action) {
            Action::Block if dropped => "Block",
            Action::Block => "Audit (Block)",
            _ => "Audit",
        }
        .into();
        a.result = if dropped { "Dropped" } else { "Passed" }.into();
        let rule = (ev.rule != RULE_POSTURE)
            .then(|| self.rules[(ev.generation & 1) as usize].get(ev.rule as usize))
            .flatten();
        match rule.filter(|_| ev.reason == reason::RULE) {
            Some(r) => {
                a.policy_name = r.policy.clone();
                a.severity = r.severity.map(|s| s.to_string()).unwrap_or_default();
                a.tags = r.tags.join(",");
                a.atags = r.tags.clone();
                a.message = r.message.clone().unwrap_or_default();
                a.event_data
                    .insert("RuleOrigin".into(), r.origin.to_string());
            }
            None => {
                a.policy_name = "DefaultPosture".into();
                a.message = format!("inbound {protocol}: {}", why(ev.reason));
                if let Some(r) = rule {
                    // A rule allowed the source, but the packet was over its rate.
                    a.event_data
                        .insert("RuleOrigin".into(), r.origin.to_string());
                }
            }
        }
        a
    }

    /// The interval's account: `None` when nothing was dropped, audited or suppressed.
    pub fn summary(
        &self,
        snapshot: &SourceSnapshot,
        delta: &Counters,
        interval: Duration,
    ) -> Option<Alert> {
        let sum = |base: u32| -> u64 {
            (0..reason::COUNT as u32)
                .map(|r| delta[(base + r) as usize])
                .sum()
        };
        let dropped: u64 = snapshot
            .sources
            .iter()
            .map(|(_, _, c)| c.dropped)
            .sum::<u64>()
            + snapshot.other.dropped;
        let audited: u64 = snapshot
            .sources
            .iter()
            .map(|(_, _, c)| c.audited)
            .sum::<u64>()
            + snapshot.other.audited;
        let suppressed = delta[counter::ALERTS_SUPPRESSED as usize];
        let ringbuf_full = delta[counter::RINGBUF_FULL as usize];
        if dropped == 0 && audited == 0 && suppressed == 0 && ringbuf_full == 0 {
            return None;
        }
        let mut top: Vec<&(Family, [u8; 16], icmp_guard_common::guard::SourceCount)> =
            snapshot.sources.iter().collect();
        top.sort_by_key(|(f, a, c)| (std::cmp::Reverse(c.dropped + c.audited), *f, *a));
        let listed: Vec<String> = top
            .iter()
            .take(SUMMARY_TOP)
            .map(|(f, a, c)| format!("{}={}/{}", address(*f, a), c.dropped, c.audited))
            .collect();
        let reasons: Vec<String> = (0..reason::COUNT)
            .filter_map(|r| {
                let d = delta[(counter::DROP_BASE + r as u32) as usize];
                let a = delta[(counter::AUDIT_BASE + r as u32) as usize];
                (d + a > 0).then(|| format!("{}={d}/{a}", reason::name(r)))
            })
            .collect();
        let mut a = self.base(now_unix_ns());
        a.kind = "SystemEvent".into();
        a.enforcer = "XDP".into();
        a.max_alerts_per_sec = self.alerts_per_sec as i32;
        a.dropping_alerts_interval = 1;
        a.message = format!(
            "inbound ICMP guard, last {:.1} s: {dropped} dropped, {audited} audited, from {} \
             sources{}; {} alerts sent, {suppressed} not sent (rate limit); top sources \
             (dropped/audited): {}",
            interval.as_secs_f64(),
            snapshot.sources.len(),
            if snapshot.other.dropped + snapshot.other.audited > 0 {
                format!(
                    " and {} packets from sources beyond the table",
                    snapshot.other.dropped + snapshot.other.audited
                )
            } else {
                String::new()
            },
            delta[counter::ALERTS_SENT as usize],
            if listed.is_empty() {
                "none".to_string()
            } else {
                listed.join(", ")
            }
        );
        a.data = format!("Dropped={dropped} Audited={audited}");
        let d = &mut a.event_data;
        d.insert("Dropped".into(), dropped.to_string());
        d.insert("Audited".into(), audited.to_string());
        d.insert("DroppedCounted".into(), sum(counter::DROP_BASE).to_string());
        d.insert(
            "AuditedCounted".into(),
            sum(counter::AUDIT_BASE).to_string(),
        );
        d.insert("Sources".into(), snapshot.sources.len().to_string());
        d.insert("Top".into(), listed.join(","));
        d.insert(
            "OtherSourcesDropped".into(),
            snapshot.other.dropped.to_string(),
        );
        d.insert(
            "OtherSourcesAudited".into(),
            snapshot.other.audited.to_string(),
        );
        d.insert("Reasons".into(), reasons.join(","));
        d.insert(
            "AlertsSent".into(),
            delta[counter::ALERTS_SENT as usize].to_string(),
        );
        d.insert("AlertsSuppressed".into(), suppressed.to_string());
        d.insert("RingBufferFull".into(), ringbuf_full.to_string());
        d.insert("IntervalMs".into(), interval.as_millis().to_string());
        Some(a)
    }
}

#[cfg(test)]
mod tests {
    use icmp_guard_common::guard::SourceCount;

    use super::*;

    fn ctx() -> GuardContext {
        GuardContext {
            cluster_name: "c".into(),
            host_name: "h".into(),
            boot_to_unix_ns: 0,
            rules: Default::default(),
            interfaces: BTreeMap::from([(7, ("veth0".to_string(), AttachMode::Native))]),
            alerts_per_sec: 10,
        }
    }

    #[test]
    fn a_posture_drop_reads_like_kubearmor() {
        let mut src = [0u8; 16];
        src[..4].copy_from_slice(&[192, 0, 2, 9]);
        let mut dst = [0u8; 16];
        dst[..4].copy_from_slice(&[10, 99, 0, 2]);
        let ev = GuardEvent {
            boot_ns: 1_700_000_000_000_000_000,
            ifindex: 7,
            rule: RULE_POSTURE,
            src,
            dst,
            len: 60,
            family: 4,
            icmp_type: 8,
            icmp_code: 0,
            action: Action::Block as u8,
            reason: reason::POSTURE,
            flags: event_flags::DROPPED,
            generation: 0,
            hook: hook::XDP,
        };
        let a = ctx().alert(&ev);
        assert_eq!(a.kind, "MatchedNetworkPolicy");
        assert_eq!(a.operation, "NetworkFirewall");
        assert_eq!(a.resource, "INGRESS");
        assert_eq!(
            a.data,
            "SourceIP=192.0.2.9 DestinationIP=10.99.0.2 Protocol=ICMP ICMPType=8 ICMPCode=0"
        );
        assert_eq!(a.event_data["SourceIP"], "192.0.2.9");
        assert_eq!(a.event_data["ICMPType"], "8");
        assert_eq!(a.event_data["Interface"], "veth0");
        assert_eq!((a.action.as_str(), a.result.as_str()), ("Block", "Dropped"));
        assert_eq!(a.policy_name, "DefaultPosture");
        assert_eq!(a.enforcer, "XDP");
    }

    #[test]
    fn summaries_add_up_sources() {
        let mut delta = [0u64; counter::COUNT as usize];
        delta[(counter::DROP_BASE + reason::POSTURE as u32) as usize] = 7;
        let snap = SourceSnapshot {
            sources: vec![
                (
                    Family::V4,
                    [1; 16],
                    SourceCount {
                        dropped: 5,
                        audited: 0,
                    },
                ),
                (
                    Family::V4,
                    [2; 16],
                    SourceCount {
                        dropped: 1,
                        audited: 0,
                    },
                ),
            ],
            other: SourceCount {
                dropped: 1,
                audited: 0,
            },
        };
        let a = ctx()
            .summary(&snap, &delta, Duration::from_secs(1))
            .unwrap();
        assert_eq!(a.event_data["Dropped"], "7");
        assert_eq!(a.event_data["Top"], "1.1.1.1=5/0,2.2.2.2=1/0");
        assert_eq!(a.event_data["Reasons"], "posture=7/0");
        assert!(
            ctx()
                .summary(
                    &SourceSnapshot::default(),
                    &[0; counter::COUNT as usize],
                    Duration::from_secs(1)
                )
                .is_none()
        );
    }
}
