//! The embedded default policy, enforced by `icmp-guard run` when no `--policy` is given.
//!
//! It must never take a node off the network, so it enforces only where no node-critical daemon
//! needs the capability, and audits the rest:
//!
//! | class    | ping family | network daemons¹ | anything else |
//! | -------- | ----------- | ---------------- | ------------- |
//! | icmp     | allowed     | refused          | **refused** (alert `Block`) |
//! | icmpv6   | allowed     | allowed          | **refused** (alert `Block`) |
//! | raw      | allowed     | audited          | audited (alert `Audit`) |
//! | packet   | allowed     | audited          | audited (alert `Audit`) |
//! | tcp, udp, sctp, other, unix, netlink, … | untouched | untouched | untouched |
//!
//! ¹ systemd-networkd, NetworkManager and dhcpcd send router solicitations and neighbour
//! discovery from userspace through raw ICMPv6 sockets; refusing them breaks IPv6 on the node.
//!
//! Why raw and packet are only audited: DHCP clients (dhclient, systemd-networkd) open
//! `AF_PACKET` sockets, tcpdump captures through them, and keepalived (VRRP) and routing daemons
//! (OSPF, PIM) speak their protocols over inet raw sockets. Refusing those by default can take a
//! node off the network. `policies/host/strict.yaml` enforces all four classes for operators who
//! know their nodes run none of them.

use std::{collections::BTreeMap, path::PathBuf};

use icmp_guard_common::Class;

use super::{Action, Origin, Policy, PolicySet, Rule, Target};

pub const POLICY_NAME: &str = "icmp-guard-default";

/// Where iputils and busybox-style installs put ping and its aliases. Several are usually the
/// same file (usrmerge symlinks); paths that do not exist on a node are simply not installed.
pub const PING_PATHS: &[&str] = &[
    "/usr/bin/ping",
    "/bin/ping",
    "/usr/sbin/ping",
    "/sbin/ping",
    "/usr/bin/ping4",
    "/usr/bin/ping6",
    "/bin/ping4",
    "/bin/ping6",
];

/// Network managers that need raw ICMPv6 for router and neighbour discovery.
pub const NETWORK_DAEMON_PATHS: &[&str] = &[
    "/usr/lib/systemd/systemd-networkd",
    "/lib/systemd/systemd-networkd",
    "/usr/sbin/NetworkManager",
    "/usr/sbin/dhcpcd",
    "/sbin/dhcpcd",
];

fn rule(classes: &[Class], protocol: &str, sources: &[&str], action: Action, why: &str) -> Rule {
    Rule {
        classes: classes.to_vec(),
        protocol: protocol.to_string(),
        sources: sources.iter().map(PathBuf::from).collect(),
        action,
        severity: Some(match action {
            Action::Block => 5,
            _ => 3,
        }),
        tags: vec!["icmp-guard".into(), "ICMP-CONTROL".into()],
        message: Some(why.to_string()),
        origin: origin(),
    }
}

fn origin() -> Origin {
    Origin {
        file: PathBuf::from("<embedded default policy>"),
        line: 0,
    }
}

pub fn policy_set() -> PolicySet {
    let icmpv6_sources: Vec<&str> = PING_PATHS
        .iter()
        .chain(NETWORK_DAEMON_PATHS)
        .copied()
        .collect();
    let scan = "ICMP-capable socket from a program that is not ping";
    let rules = vec![
        rule(&[Class::Icmp], "icmp", PING_PATHS, Action::Allow, scan),
        rule(
            &[Class::Icmpv6],
            "icmpv6",
            &icmpv6_sources,
            Action::Allow,
            scan,
        ),
        rule(
            &[Class::Raw, Class::Packet],
            "raw,packet",
            PING_PATHS,
            Action::Allow,
            scan,
        ),
        rule(
            &[Class::Raw],
            "raw",
            &[],
            Action::Audit,
            "raw inet socket (can forge ICMP); audited only, as routing daemons and keepalived need it",
        ),
        rule(
            &[Class::Packet],
            "packet",
            &[],
            Action::Audit,
            "AF_PACKET socket (can forge frames); audited only, as DHCP clients and tcpdump need it",
        ),
    ];
    PolicySet {
        policies: vec![Policy {
            name: POLICY_NAME.to_string(),
            namespace: None,
            target: Target::Host {
                node_selector: BTreeMap::new(),
            },
            rules,
            origin: origin(),
        }],
        network: Vec::new(),
    }
}
