//! `KubeArmorNetworkPolicy` ICMP ingress rules → the guard's map entries.
//!
//! All of the policy logic is here; the kernel does one longest-prefix lookup and at most two
//! exact lookups:
//!
//! - An interface is guarded when a selected rule names it, or when a rule names no interface
//!   (then every interface but loopback is). Per interface and family (ICMP, ICMPv6) the rules
//!   that apply are those naming that interface or none.
//! - Allow-list mode per interface and family: once an Allow rule covers ICMP (or ICMPv6) there,
//!   ICMP of that family that no rule allows gets the configured posture (block or audit). With
//!   only Audit/Block rules, unmatched ICMP passes. Allowing ICMP never touches ICMPv6, so IPv6
//!   keeps working unless asked otherwise.
//! - Every source range of a rule becomes a prefix in the LPM trie, keyed by interface; so does
//!   `0.0.0.0/0` (`::/0`), which carries the posture. A prefix's verdicts come from every rule
//!   whose ranges *contain* it, so a narrower Allow never undoes a wider Block: Block beats
//!   Audit beats Allow, as for sockets.
//! - Per prefix, the verdict of each ICMP type/code a rule names is precomputed: `(type, code)`,
//!   then `(type, any code)`, then the prefix's own default, which is the entry itself.

use std::collections::BTreeMap;

use anyhow::{Result, bail};
use icmp_guard_common::{
    guard::{GuardSettings, GuardVerdict, ICMP_ANY, MAX_SOURCES, MAX_VERDICTS, SourceEntry},
    maps::{Action, RULE_POSTURE},
};

use crate::sources::{
    config::GuardConfig,
    interfaces::Interface,
    policy::{
        Origin,
        network::{Cidr, Family, IcmpMatch, NetworkPolicy},
    },
};

/// What an alert needs to know about the rule that decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuardRuleInfo {
    pub policy: String,
    pub action: Action,
    pub severity: Option<u8>,
    pub tags: Vec<String>,
    pub message: Option<String>,
    pub origin: Origin,
}

/// One guarded interface and, per family, whether it is allow-listed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuardedInterface {
    pub name: String,
    pub ifindex: u32,
    pub mtu: u32,
    /// Per family: `None` not guarded; `Some(Allow)` rules but no allow-list; `Some(posture)`.
    pub v4: Option<Action>,
    pub v6: Option<Action>,
}

/// One LPM entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourcePrefix {
    pub ifindex: u32,
    pub cidr: Cidr,
    pub entry: SourceEntry,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GuardCompiled {
    pub settings: GuardSettings,
    pub interfaces: Vec<GuardedInterface>,
    pub sources: Vec<SourcePrefix>,
    /// (class, type, code or [`ICMP_ANY`]) → verdict.
    pub verdicts: BTreeMap<(u32, u16, u16), GuardVerdict>,
    pub rules: Vec<GuardRuleInfo>,
    /// Interfaces a rule names that this node does not have (right now).
    pub missing: Vec<(String, Origin)>,
    /// Policies that select this node.
    pub policies: usize,
}

pub struct GuardInput<'a> {
    pub policies: &'a [NetworkPolicy],
    pub node_labels: &'a BTreeMap<String, String>,
    pub interfaces: &'a [Interface],
    pub config: &'a GuardConfig,
    pub audit_only: bool,
}

fn rank(a: Action) -> u8 {
    match a {
        Action::Allow => 0,
        Action::Audit => 1,
        Action::Block => 2,
    }
}

/// GCRA parameters for `rate` events per second in bursts of `burst`.
fn gcra(rate: u32, burst: u32) -> (u64, u64) {
    if rate == 0 {
        return (0, 0);
    }
    let interval = (1_000_000_000u64 / rate as u64).max(1);
    (interval, interval * (burst.max(1) as u64 - 1))
}

pub fn settings(config: &GuardConfig, audit_only: bool) -> GuardSettings {
    let (rate_interval_ns, rate_tolerance_ns) = gcra(config.rate_per_second, config.burst);
    GuardSettings {
        audit_only: audit_only as u8,
        posture: config.posture.action() as u8,
        _pad: [0; 6],
        rate_interval_ns,
        rate_tolerance_ns,
    }
}

/// A rule as it applies to one family: its ranges and ICMP matches of that family.
struct Applied<'a> {
    rule: u32,
    action: Action,
    sources: Vec<Cidr>,
    matches: Vec<&'a IcmpMatch>,
}

/// `None` when no selected policy has an ICMP rule: the guard stays off.
pub fn compile(input: &GuardInput) -> Result<Option<GuardCompiled>> {
    let selected: Vec<&NetworkPolicy> = input
        .policies
        .iter()
        .filter(|p| {
            !p.node_selector.is_empty()
                && p.node_selector
                    .iter()
                    .all(|(k, v)| input.node_labels.get(k) == Some(v))
        })
        .collect();
    let mut out = GuardCompiled {
        settings: settings(input.config, input.audit_only),
        policies: selected.len(),
        ..Default::default()
    };
    // Rule table, and each rule with its interfaces.
    let mut rules = Vec::new();
    for p in &selected {
        for r in &p.ingress {
            out.rules.push(GuardRuleInfo {
                policy: p.name.clone(),
                action: r.action,
                severity: r.severity,
                tags: r.tags.clone(),
                message: r.message.clone(),
                origin: r.origin.clone(),
            });
            rules.push(r);
        }
    }
    if rules.is_empty() {
        return Ok(None);
    }
    for r in &rules {
        for name in &r.ifaces {
            if !input.interfaces.iter().any(|i| &i.name == name)
                && !out.missing.iter().any(|(n, _)| n == name)
            {
                out.missing.push((name.clone(), r.origin.clone()));
            }
        }
    }
    let guarded = |iface: &Interface| {
        rules.iter().any(|r| {
            if r.ifaces.is_empty() {
                !iface.loopback
            } else {
                r.ifaces.contains(&iface.name)
            }
        })
    };
    let mut classes: BTreeMap<Vec<(u32, usize, u8)>, u32> = BTreeMap::new();
    for iface in input.interfaces.iter().filter(|i| guarded(i)) {
        let mut gi = GuardedInterface {
            name: iface.name.clone(),
            ifindex: iface.ifindex,
            mtu: iface.mtu,
            v4: None,
            v6: None,
        };
        for family in [Family::V4, Family::V6] {
            let applied: Vec<Applied> = rules
                .iter()
                .enumerate()
                .filter(|(_, r)| {
                    r.ifaces.is_empty() && !iface.loopback || r.ifaces.contains(&iface.name)
                })
                .map(|(i, r)| Applied {
                    rule: i as u32,
                    action: r.action,
                    sources: r
                        .sources
                        .iter()
                        .copied()
                        .filter(|s| s.family() == family)
                        .collect(),
                    matches: r.icmp.iter().filter(|m| m.family == family).collect(),
                })
                .filter(|a| !a.sources.is_empty() && !a.matches.is_empty())
                .collect();
            if applied.is_empty() {
                continue;
            }
            let posture = if applied.iter().any(|a| a.action == Action::Allow) {
                input.config.posture.action()
            } else {
                Action::Allow
            };
            match family {
                Family::V4 => gi.v4 = Some(posture),
                Family::V6 => gi.v6 = Some(posture),
            }
            let any = match family {
                Family::V4 => Cidr::ANY_V4,
                Family::V6 => Cidr::ANY_V6,
            };
            let mut prefixes: Vec<Cidr> = applied
                .iter()
                .flat_map(|a| a.sources.iter().copied())
                .collect();
            prefixes.push(any);
            prefixes.sort();
            prefixes.dedup();
            for prefix in prefixes {
                // (rule, match index, posture) identifies the verdicts of this prefix.
                let mut covering: Vec<(&Applied, usize, &IcmpMatch)> = Vec::new();
                for a in &applied {
                    if a.sources.iter().any(|s| s.contains(&prefix)) {
                        for (mi, m) in a.matches.iter().enumerate() {
                            covering.push((a, mi, m));
                        }
                    }
                }
                let mut class_key: Vec<(u32, usize, u8)> = covering
                    .iter()
                    .map(|(a, mi, _)| (a.rule, *mi, posture as u8))
                    .collect();
                class_key.push((u32::MAX, 0, posture as u8));
                class_key.sort();
                let next = classes.len() as u32;
                let (class, fresh) = match classes.get(&class_key) {
                    Some(c) => (*c, false),
                    None => {
                        classes.insert(class_key, next);
                        (next, true)
                    }
                };
                let strictest = |pred: &dyn Fn(&IcmpMatch) -> bool| {
                    covering
                        .iter()
                        .filter(|(_, _, m)| pred(m))
                        .map(|(a, _, _)| (a.action, a.rule))
                        .max_by_key(|(act, rule)| (rank(*act), u32::MAX - rule))
                };
                let (action, rule) =
                    strictest(&|m| m.icmp_type.is_none()).unwrap_or((posture, RULE_POSTURE));
                let mut specific = false;
                for (_, _, m) in &covering {
                    let Some(t) = m.icmp_type else {
                        continue;
                    };
                    specific = true;
                    let key = match m.icmp_code {
                        Some(c) => (class, t as u16, c as u16),
                        None => (class, t as u16, ICMP_ANY),
                    };
                    if !fresh || out.verdicts.contains_key(&key) {
                        continue;
                    }
                    let covers = |o: &IcmpMatch| match (o.icmp_type, o.icmp_code) {
                        (None, _) => true,
                        (Some(ot), None) => ot == t,
                        (Some(ot), Some(oc)) => ot == t && Some(oc) == m.icmp_code,
                    };
                    let (action, rule) = strictest(&covers).expect("the match covers itself");
                    out.verdicts.insert(
                        key,
                        GuardVerdict {
                            action: action as u8,
                            _pad: [0; 3],
                            rule,
                        },
                    );
                }
                out.sources.push(SourcePrefix {
                    ifindex: iface.ifindex,
                    cidr: prefix,
                    entry: SourceEntry {
                        class,
                        rule,
                        action: action as u8,
                        specific: specific as u8,
                        _pad: [0; 2],
                    },
                });
            }
        }
        if gi.v4.is_some() || gi.v6.is_some() {
            out.interfaces.push(gi);
        }
    }
    let per_family = |f: Family| out.sources.iter().filter(|s| s.cidr.family() == f).count();
    if per_family(Family::V4).max(per_family(Family::V6)) > (MAX_SOURCES / 2) as usize {
        bail!(
            "the guard's rules make {} IPv4 and {} IPv6 prefixes (ranges × interfaces); at most \
             {} of each fit in the kernel maps: use fewer, wider ranges or name interfaces",
            per_family(Family::V4),
            per_family(Family::V6),
            MAX_SOURCES / 2
        );
    }
    if out.verdicts.len() > (MAX_VERDICTS / 2) as usize {
        bail!(
            "the guard's rules make {} type-specific verdicts; at most {} fit in the kernel map",
            out.verdicts.len(),
            MAX_VERDICTS / 2
        );
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::{
        config::Posture,
        policy::network::{IcmpMatch, IngressRule},
    };

    fn cidr(s: &str) -> Cidr {
        Cidr::parse(s).unwrap().0
    }

    fn rule(action: Action, sources: &[&str], icmp: &[IcmpMatch], ifaces: &[&str]) -> IngressRule {
        IngressRule {
            sources: sources.iter().map(|s| cidr(s)).collect(),
            ifaces: ifaces.iter().map(|s| s.to_string()).collect(),
            icmp: icmp.to_vec(),
            action,
            severity: None,
            tags: vec![],
            message: None,
            origin: Origin::default(),
        }
    }

    fn icmp(t: Option<u8>, c: Option<u8>) -> IcmpMatch {
        IcmpMatch {
            family: Family::V4,
            icmp_type: t,
            icmp_code: c,
        }
    }

    fn interfaces() -> Vec<Interface> {
        vec![
            Interface {
                name: "lo".into(),
                ifindex: 1,
                loopback: true,
                mtu: 65536,
            },
            Interface {
                name: "eth0".into(),
                ifindex: 2,
                loopback: false,
                mtu: 1500,
            },
            Interface {
                name: "eth1".into(),
                ifindex: 3,
                loopback: false,
                mtu: 1500,
            },
        ]
    }

    fn run(rules: Vec<IngressRule>, posture: Posture) -> Option<GuardCompiled> {
        let policy = NetworkPolicy {
            name: "p".into(),
            node_selector: BTreeMap::from([("kubernetes.io/os".into(), "linux".into())]),
            ingress: rules,
            origin: Origin::default(),
        };
        let labels = BTreeMap::from([("kubernetes.io/os".to_string(), "linux".to_string())]);
        let config = GuardConfig {
            posture,
            ..GuardConfig::default()
        };
        compile(&GuardInput {
            policies: &[policy],
            node_labels: &labels,
            interfaces: &interfaces(),
            config: &config,
            audit_only: false,
        })
        .unwrap()
    }

    fn entry<'a>(c: &'a GuardCompiled, ifindex: u32, s: &str) -> &'a SourceEntry {
        &c.sources
            .iter()
            .find(|p| p.ifindex == ifindex && p.cidr == cidr(s))
            .unwrap_or_else(|| panic!("no entry for {s} on {ifindex}: {:#?}", c.sources))
            .entry
    }

    #[test]
    fn no_rules_no_guard() {
        assert!(run(vec![], Posture::Block).is_none());
    }

    #[test]
    fn allow_from_a_range_blocks_the_rest_of_icmp_only() {
        let c = run(
            vec![rule(
                Action::Allow,
                &["203.0.113.0/24"],
                &[icmp(None, None)],
                &[],
            )],
            Posture::Block,
        )
        .unwrap();
        // Every interface but loopback; IPv4 only.
        assert_eq!(
            c.interfaces.iter().map(|i| i.ifindex).collect::<Vec<_>>(),
            vec![2, 3]
        );
        assert!(
            c.interfaces
                .iter()
                .all(|i| i.v4 == Some(Action::Block) && i.v6.is_none())
        );
        let trusted = entry(&c, 2, "203.0.113.0/24");
        assert_eq!(trusted.action, Action::Allow as u8);
        assert_eq!(trusted.rule, 0);
        let rest = entry(&c, 2, "0.0.0.0/0");
        assert_eq!(rest.action, Action::Block as u8);
        assert_eq!(rest.rule, RULE_POSTURE);
        assert!(c.verdicts.is_empty());
    }

    #[test]
    fn types_and_codes_become_specific_verdicts() {
        let c = run(
            vec![
                rule(
                    Action::Allow,
                    &["10.0.0.0/8"],
                    &[icmp(Some(8), None)],
                    &["eth0"],
                ),
                rule(
                    Action::Allow,
                    &["0.0.0.0/0"],
                    &[icmp(Some(3), Some(4))],
                    &["eth0"],
                ),
                rule(
                    Action::Block,
                    &["10.9.0.0/16"],
                    &[icmp(Some(8), None)],
                    &["eth0"],
                ),
            ],
            Posture::Audit,
        )
        .unwrap();
        assert_eq!(c.interfaces.len(), 1);
        assert_eq!(c.interfaces[0].v4, Some(Action::Audit));
        let ten = entry(&c, 2, "10.0.0.0/8");
        assert_eq!(ten.specific, 1);
        assert_eq!(ten.action, Action::Audit as u8, "other types: posture");
        let v = c.verdicts[&(ten.class, 8, ICMP_ANY)];
        assert_eq!(v.action, Action::Allow as u8);
        assert_eq!(c.verdicts[&(ten.class, 3, 4)].action, Action::Allow as u8);
        // The narrower Block range is covered by the wider Allow too; Block wins.
        let nine = entry(&c, 2, "10.9.0.0/16");
        let v = c.verdicts[&(nine.class, 8, ICMP_ANY)];
        assert_eq!((v.action, v.rule), (Action::Block as u8, 2));
        let any = entry(&c, 2, "0.0.0.0/0");
        assert!(!c.verdicts.contains_key(&(any.class, 8, ICMP_ANY)));
        assert_eq!(c.verdicts[&(any.class, 3, 4)].action, Action::Allow as u8);
    }

    #[test]
    fn block_rules_alone_leave_unmatched_icmp_alone() {
        let c = run(
            vec![rule(
                Action::Block,
                &["198.51.100.0/24"],
                &[icmp(None, None)],
                &[],
            )],
            Posture::Block,
        )
        .unwrap();
        assert!(c.interfaces.iter().all(|i| i.v4 == Some(Action::Allow)));
        let rest = entry(&c, 2, "0.0.0.0/0");
        assert_eq!(
            (rest.action, rest.rule),
            (Action::Allow as u8, RULE_POSTURE)
        );
        assert_eq!(entry(&c, 2, "198.51.100.0/24").action, Action::Block as u8);
    }

    #[test]
    fn named_missing_interfaces_are_reported() {
        let c = run(
            vec![rule(
                Action::Allow,
                &["0.0.0.0/0"],
                &[icmp(None, None)],
                &["wg9"],
            )],
            Posture::Block,
        )
        .unwrap();
        assert!(c.interfaces.is_empty());
        assert_eq!(c.missing.len(), 1);
    }

    #[test]
    fn rates_become_gcra_intervals() {
        assert_eq!(gcra(100, 200), (10_000_000, 10_000_000 * 199));
        assert_eq!(gcra(0, 5), (0, 0));
        assert_eq!(gcra(10, 1), (100_000_000, 0));
    }
}
