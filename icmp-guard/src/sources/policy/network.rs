//! `KubeArmorNetworkPolicy` (security.kubearmor.com/v1, cluster-scoped, short name `nsp`): the
//! inbound ICMP guard's policy.
//!
//! KubeArmor's CRD accepts only TCP, UDP and SCTP in `ports[].protocol`, and enforces the policy
//! with nftables. icmp-guard reads the same object and enforces its **ICMP and ICMPv6 ingress
//! rules** at XDP. Two extensions, both deliberate:
//!
//! - `protocol: ICMP` and `protocol: ICMPv6` (any case).
//! - For those protocols, `port` is the ICMP **type** and `endPort` the ICMP **code**, the way
//!   AWS stores them in a security group's `FromPort`/`ToPort` (so an EC2-044 remediation reads
//!   the same here): `port: 3, endPort: 4` is "fragmentation needed", `port: 8` alone is every
//!   echo request, no `port` (or `-1`) is every type. `endPort` is never the end of a range of
//!   types: write one `ports` item per type.
//!
//! Everything else KubeArmor's CRD accepts loads too: TCP/UDP/SCTP ports and `egress` rules are
//! reported as warnings (icmp-guard does not enforce them), so nothing is dropped silently. A
//! rule without `ports` covers every protocol, and so ICMP and ICMPv6 of every type (with a
//! warning saying so). A rule without `from` allows or blocks from anywhere.

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use super::{
    Action, Origin, PolicySet,
    kubearmor::{self, Inherited},
    yaml::{self, Diag, Map, Node},
};

/// One `KubeArmorNetworkPolicy`, reduced to what the guard enforces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkPolicy {
    pub name: String,
    /// `spec.nodeSelector.matchLabels`: the nodes it applies to.
    pub node_selector: BTreeMap<String, String>,
    /// The ingress rules with at least one ICMP or ICMPv6 match, in file order.
    pub ingress: Vec<IngressRule>,
    pub origin: Origin,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn protocol(self) -> &'static str {
        match self {
            Family::V4 => "ICMP",
            Family::V6 => "ICMPv6",
        }
    }
}

/// An address range; host bits are always zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    pub const ANY_V4: Cidr = Cidr {
        addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        prefix: 0,
    };
    pub const ANY_V6: Cidr = Cidr {
        addr: IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        prefix: 0,
    };

    pub fn family(&self) -> Family {
        match self.addr {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    /// The address bytes (4 or 16).
    pub fn octets(&self) -> Vec<u8> {
        match self.addr {
            IpAddr::V4(a) => a.octets().to_vec(),
            IpAddr::V6(a) => a.octets().to_vec(),
        }
    }

    /// Whether every address of `other` is in `self`.
    pub fn contains(&self, other: &Cidr) -> bool {
        if self.family() != other.family() || self.prefix > other.prefix {
            return false;
        }
        let (a, b) = (self.octets(), other.octets());
        masked(&b, self.prefix) == a
    }

    /// Parses `a.b.c.d/n` or `x::/n`; returns the range and whether host bits had to be cleared.
    pub fn parse(text: &str) -> Result<(Cidr, bool), String> {
        let Some((addr, len)) = text.split_once('/') else {
            return Err(format!(
                "`{text}` has no prefix length; write a range such as 192.0.2.0/24, or \
                 192.0.2.7/32 for one address"
            ));
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("`{addr}` is not an IPv4 or IPv6 address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix: u8 = len
            .parse()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| format!("`{len}` is not a prefix length between 0 and {max}"))?;
        let bytes = match addr {
            IpAddr::V4(a) => a.octets().to_vec(),
            IpAddr::V6(a) => a.octets().to_vec(),
        };
        let clean = masked(&bytes, prefix);
        let addr = match addr {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::new(clean[0], clean[1], clean[2], clean[3])),
            IpAddr::V6(_) => {
                let mut o = [0u8; 16];
                o.copy_from_slice(&clean);
                IpAddr::V6(Ipv6Addr::from(o))
            }
        };
        Ok((Cidr { addr, prefix }, clean != bytes))
    }
}

fn masked(bytes: &[u8], prefix: u8) -> Vec<u8> {
    bytes
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let bits = (prefix as usize).saturating_sub(i * 8).min(8);
            if bits == 0 {
                0
            } else {
                b & (0xffu8 << (8 - bits))
            }
        })
        .collect()
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// ICMP messages one `ports` item names: a type (or every type) and a code (or every code).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IcmpMatch {
    pub family: Family,
    pub icmp_type: Option<u8>,
    pub icmp_code: Option<u8>,
}

impl fmt::Display for IcmpMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.family.protocol())?;
        match (self.icmp_type, self.icmp_code) {
            (None, _) => write!(f, " (all types)"),
            (Some(t), None) => write!(f, " type {t}"),
            (Some(t), Some(c)) => write!(f, " type {t} code {c}"),
        }
    }
}

/// One `spec.ingress[]` item, after inheritance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IngressRule {
    /// `from[].ipBlock.cidr`; `0.0.0.0/0` and `::/0` when `from` is absent.
    pub sources: Vec<Cidr>,
    /// `iface[]`; empty means every interface except loopback.
    pub ifaces: Vec<String>,
    /// The ICMP and ICMPv6 messages of `ports[]`.
    pub icmp: Vec<IcmpMatch>,
    pub action: Action,
    pub severity: Option<u8>,
    pub tags: Vec<String>,
    pub message: Option<String>,
    pub origin: Origin,
}

const SPEC_KEYS: [&str; 9] = [
    "nodeSelector",
    "selector",
    "ingress",
    "egress",
    "level",
    "severity",
    "tags",
    "message",
    "action",
];
const INGRESS_KEYS: [&str; 7] = [
    "from", "ports", "iface", "action", "severity", "tags", "message",
];
/// Linux interface names: at most 15 bytes (IFNAMSIZ - 1).
const IFNAME_MAX: usize = 15;

/// Reads a `KubeArmorNetworkPolicy` document (kind and apiVersion already checked).
pub(super) fn parse(doc: &Map<'_, '_>, diag: &mut Diag<'_>, out: &mut PolicySet) {
    doc.reject_unknown(diag, &["apiVersion", "kind", "metadata", "spec", "status"]);
    let (name, _) = kubearmor::parse_metadata(doc, Some(kubearmor::KIND_NETWORK_POLICY), diag);
    let Some(spec_node) = doc.require(
        diag,
        "spec",
        "add spec.nodeSelector.matchLabels and spec.ingress",
    ) else {
        return;
    };
    let Some(spec) = Map::read(diag, spec_node, &doc.field("spec")) else {
        return;
    };
    spec.reject_unknown(diag, &SPEC_KEYS);
    let node_selector = kubearmor::parse_node_selector(&spec, diag);
    if let Some(e) = spec.entry("selector") {
        diag.warn(
            e.key_node,
            &spec.field("selector"),
            "icmp-guard enforces network policies on the node itself; spec.selector (pods) is \
             ignored",
        );
    }
    if let Some(e) = spec.entry("level") {
        diag.warn(
            e.key_node,
            &spec.field("level"),
            "icmp-guard does not enforce network quotas; spec.level is ignored",
        );
    }
    if let Some(e) = spec.entry("egress") {
        diag.warn(
            e.key_node,
            &spec.field("egress"),
            "icmp-guard enforces only ingress ICMP and ICMPv6 rules; these egress rules have no \
             effect here",
        );
    }
    let defaults = Inherited::read(&spec, diag);
    let mut ingress = Vec::new();
    if let Some(items) = spec.sequence(diag, "ingress") {
        let base = spec.field("ingress");
        for (i, node) in items.iter().enumerate() {
            if let Some(rule) = parse_ingress(node, &yaml::item(&base, i), &defaults, diag) {
                ingress.push(rule);
            }
        }
    }
    if let Some(name) = name {
        out.network.push(NetworkPolicy {
            name,
            node_selector,
            ingress,
            origin: diag.origin(doc.node()),
        });
    }
}

fn parse_ingress(
    node: &Node<'_>,
    path: &str,
    defaults: &Inherited,
    diag: &mut Diag<'_>,
) -> Option<IngressRule> {
    let m = Map::read(diag, node, path)?;
    m.reject_unknown(diag, &INGRESS_KEYS);
    let own = Inherited::read(&m, diag).over(defaults);
    let sources = match m.get("from") {
        None => vec![Cidr::ANY_V4, Cidr::ANY_V6],
        Some(_) => parse_from(&m, diag),
    };
    let ifaces = parse_ifaces(&m, diag);
    let icmp = match m.get("ports") {
        None => {
            diag.warn(
                m.node(),
                &m.field("ports"),
                "has no ports, so it covers every protocol: icmp-guard applies it to ICMP and \
                 ICMPv6 of every type and enforces nothing else of it",
            );
            vec![
                IcmpMatch {
                    family: Family::V4,
                    icmp_type: None,
                    icmp_code: None,
                },
                IcmpMatch {
                    family: Family::V6,
                    icmp_type: None,
                    icmp_code: None,
                },
            ]
        }
        Some(_) => parse_ports(&m, diag),
    };
    // An ICMP match needs a source of its family: ICMP arrives only from IPv4 addresses. A rule
    // none of whose matches can ever apply is an error; a family without sources, a warning.
    let ports_node = m.get("ports").unwrap_or(m.node());
    let has = |f: Family| sources.iter().any(|s| s.family() == f);
    if m.get("ports").is_some() && !icmp.is_empty() && !icmp.iter().any(|i| has(i.family)) {
        diag.error(
            ports_node,
            &m.field("ports"),
            "names only ICMP families that from[] has no range of (ICMP needs IPv4 ranges, \
             ICMPv6 IPv6 ranges), so it could never match; add ipBlocks of that family",
        );
    } else if m.get("from").is_some() {
        for family in [Family::V4, Family::V6] {
            if icmp.iter().any(|i| i.family == family) && !has(family) {
                diag.warn(
                    ports_node,
                    &m.field("ports"),
                    format!(
                        "names {} but from[] has no {} range, so that part matches nothing",
                        family.protocol(),
                        if family == Family::V4 { "IPv4" } else { "IPv6" }
                    ),
                );
            }
        }
    }
    if icmp.is_empty() {
        return None;
    }
    Some(IngressRule {
        sources,
        ifaces,
        icmp,
        // KubeArmor: an empty action means Block.
        action: own.action.unwrap_or(Action::Block),
        severity: own.severity,
        tags: own.tags,
        message: own.message,
        origin: diag.origin(m.node()),
    })
}

fn parse_from(m: &Map<'_, '_>, diag: &mut Diag<'_>) -> Vec<Cidr> {
    let mut out = Vec::new();
    let Some(items) = m.sequence(diag, "from") else {
        return out;
    };
    let base = m.field("from");
    if items.is_empty() {
        diag.error(
            m.get("from").unwrap_or(m.node()),
            &base,
            "is an empty list, which matches no source; remove it for \"anywhere\" or list \
             ipBlock ranges",
        );
    }
    for (i, node) in items.iter().enumerate() {
        let path = yaml::item(&base, i);
        let Some(peer) = Map::read(diag, node, &path) else {
            continue;
        };
        peer.reject_unknown(diag, &["ipBlock"]);
        let Some(block_node) =
            peer.require(diag, "ipBlock", "write `ipBlock: {cidr: 192.0.2.0/24}`")
        else {
            continue;
        };
        let Some(block) = Map::read(diag, block_node, &peer.field("ipBlock")) else {
            continue;
        };
        for e in block.entries() {
            if e.key != "cidr" {
                let reason = if e.key == "except" {
                    "`except` is not part of KubeArmor's ipBlock and is not supported: ignoring \
                     it would widen the rule; split the range into the parts you mean"
                        .to_string()
                } else {
                    format!("unknown key `{}`; an ipBlock has only `cidr`", e.key)
                };
                diag.error(e.key_node, &block.field(e.key), reason);
            }
        }
        let Some(text) = block
            .require(diag, "cidr", "write a range such as `cidr: 192.0.2.0/24`")
            .and_then(|n| yaml::string(diag, n, &block.field("cidr")))
        else {
            continue;
        };
        let node = block.get("cidr").unwrap_or(block.node());
        match Cidr::parse(text.trim()) {
            Ok((cidr, cleared)) => {
                if cleared {
                    diag.warn(
                        node,
                        &block.field("cidr"),
                        format!("`{text}` has host bits set; it means {cidr}"),
                    );
                }
                out.push(cidr);
            }
            Err(reason) => diag.error(node, &block.field("cidr"), reason),
        }
    }
    out
}

fn parse_ifaces(m: &Map<'_, '_>, diag: &mut Diag<'_>) -> Vec<String> {
    let Some(names) = m.string_list(diag, "iface") else {
        return Vec::new();
    };
    let base = m.field("iface");
    let node = m.get("iface").unwrap_or(m.node());
    let mut out = Vec::new();
    for (i, name) in names.into_iter().enumerate() {
        let valid = !name.is_empty()
            && name.len() <= IFNAME_MAX
            && name != "."
            && name != ".."
            && !name.contains(['/', ':'])
            && !name.chars().any(char::is_whitespace);
        if valid {
            out.push(name);
        } else {
            diag.error(
                node,
                &yaml::item(&base, i),
                format!(
                    "`{name}` is not a Linux interface name (1 to {IFNAME_MAX} characters, no \
                     `/`, `:` or spaces)"
                ),
            );
        }
    }
    out
}

/// `ports[]`: the ICMP and ICMPv6 items become matches; TCP/UDP/SCTP items are warned about.
fn parse_ports(m: &Map<'_, '_>, diag: &mut Diag<'_>) -> Vec<IcmpMatch> {
    let mut out = Vec::new();
    let Some(items) = m.sequence(diag, "ports") else {
        return out;
    };
    let base = m.field("ports");
    for (i, node) in items.iter().enumerate() {
        let path = yaml::item(&base, i);
        let Some(port) = Map::read(diag, node, &path) else {
            continue;
        };
        port.reject_unknown(diag, &["protocol", "port", "endPort"]);
        let protocol = port.string(diag, "protocol");
        let family = match protocol.as_deref().map(str::to_ascii_lowercase).as_deref() {
            Some("icmp") => Family::V4,
            Some("icmpv6") => Family::V6,
            Some("tcp" | "udp" | "sctp") | None => {
                diag.warn(
                    port.node(),
                    &path,
                    format!(
                        "{} ports are not enforced by icmp-guard (it guards ICMP and ICMPv6 \
                         only); this item has no effect here",
                        protocol.as_deref().unwrap_or("TCP (no protocol given)")
                    ),
                );
                continue;
            }
            Some(_) => {
                let node = port.get("protocol").unwrap_or(port.node());
                diag.error(
                    node,
                    &port.field("protocol"),
                    format!(
                        "unknown protocol `{}`; use TCP, UDP, SCTP, or icmp-guard's ICMP and \
                         ICMPv6",
                        protocol.unwrap_or_default()
                    ),
                );
                continue;
            }
        };
        let icmp_type = icmp_number(&port, "port", "ICMP type", diag);
        let icmp_code = icmp_number(&port, "endPort", "ICMP code", diag);
        let (Ok(icmp_type), Ok(icmp_code)) = (icmp_type, icmp_code) else {
            continue;
        };
        if icmp_type.is_none() && icmp_code.is_some() {
            diag.error(
                port.get("endPort").unwrap_or(port.node()),
                &port.field("endPort"),
                "is the ICMP code (as AWS's ToPort), which needs a type in `port`; name the type, \
                 or remove endPort for all codes",
            );
            continue;
        }
        if let Some(c) = icmp_code
            && c > 15
        {
            diag.warn(
                port.get("endPort").unwrap_or(port.node()),
                &port.field("endPort"),
                format!(
                    "code {c}: no ICMP type defines codes above 15; endPort is the ICMP code \
                     (AWS's ToPort), not the end of a range of types"
                ),
            );
        }
        out.push(IcmpMatch {
            family,
            icmp_type,
            icmp_code,
        });
    }
    out
}

/// An ICMP type or code in `port`/`endPort`: 0–255, as a number or a string of digits (the CRD
/// types `port` as a string); absent or -1 means all.
fn icmp_number(
    port: &Map<'_, '_>,
    key: &str,
    what: &str,
    diag: &mut Diag<'_>,
) -> Result<Option<u8>, ()> {
    let Some(node) = port.get(key) else {
        return Ok(None);
    };
    let n = yaml::plain(node);
    let value: Option<i64> = match &n.data {
        saphyr::YamlData::Value(saphyr::Scalar::Integer(i)) => Some(*i),
        saphyr::YamlData::Value(saphyr::Scalar::String(s)) => s.trim().parse().ok(),
        _ => None,
    };
    match value {
        Some(-1) => Ok(None),
        Some(v @ 0..=255) => Ok(Some(v as u8)),
        _ => {
            diag.error(
                n,
                &port.field(key),
                format!(
                    "must be an {what} between 0 and 255 (or -1 for all), found {}; for ICMP, \
                     port is the type and endPort the code, as in AWS's FromPort/ToPort",
                    yaml::describe(n)
                ),
            );
            Err(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_parse_and_normalise() {
        let (c, cleared) = Cidr::parse("10.1.2.3/8").unwrap();
        assert_eq!(c.to_string(), "10.0.0.0/8");
        assert!(cleared);
        let (c, cleared) = Cidr::parse("2001:db8::/32").unwrap();
        assert_eq!(c.to_string(), "2001:db8::/32");
        assert!(!cleared);
        assert!(Cidr::parse("10.0.0.1").is_err());
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("::/129").is_err());
        assert!(Cidr::parse("nope/8").is_err());
        let (c, _) = Cidr::parse("10.1.2.3/0").unwrap();
        assert_eq!(c, Cidr::ANY_V4);
    }

    #[test]
    fn containment() {
        let p = |s| Cidr::parse(s).unwrap().0;
        assert!(p("10.0.0.0/8").contains(&p("10.1.0.0/16")));
        assert!(!p("10.1.0.0/16").contains(&p("10.0.0.0/8")));
        assert!(Cidr::ANY_V4.contains(&p("192.0.2.0/24")));
        assert!(!Cidr::ANY_V4.contains(&p("2001:db8::/32")));
        assert!(p("2001:db8::/32").contains(&p("2001:db8:1::/48")));
    }
}
