//! `icmp-guard guard-bench` (hidden; `cargo xtask bench-guard` runs it): the guard's cost per
//! packet on each verdict path, measured with `BPF_PROG_TEST_RUN` on the real program and maps.
//!
//! The policy is installed but nothing is attached: the frames are fed to the program by the
//! kernel's test runner as if they had arrived on `--iface` (which must exist in this network
//! namespace). Prints one JSON object per path: `{"path", "ns", "verdict"}`.

use std::path::PathBuf;

use anyhow::{Context, Result, anyhow, bail};
use serde::Serialize;

use crate::{
    agent::guard::GuardSetup,
    compile::guard::GuardCompiled,
    kernel::guard::Guard,
    sources::{
        config::{GuardConfig, Posture},
        policy::kubearmor,
    },
};

#[derive(clap::Args, Debug)]
pub struct GuardBenchArgs {
    /// A KubeArmorNetworkPolicy that trusts `--trusted` and not `--untrusted`.
    #[arg(long)]
    pub policy: PathBuf,
    /// The interface the frames arrive on (the policy must guard it).
    #[arg(long)]
    pub iface: String,
    #[arg(long)]
    pub trusted: std::net::Ipv4Addr,
    #[arg(long)]
    pub untrusted: std::net::Ipv4Addr,
    #[arg(long)]
    pub trusted6: std::net::Ipv6Addr,
    #[arg(long)]
    pub untrusted6: std::net::Ipv6Addr,
    /// Runs per path; the kernel reports the mean.
    #[arg(long, default_value_t = 1_000_000)]
    pub repeat: u32,
}

#[derive(Serialize)]
struct Row {
    path: &'static str,
    ns: f64,
    verdict: &'static str,
}

/// Frames for tests and benchmarks: Ethernet + IPv4/IPv6 + ICMP/TCP/UDP, checksums zero (the
/// guard does not read them).
pub mod frames {
    use std::net::{Ipv4Addr, Ipv6Addr};

    pub const DST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 2];
    pub const SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 1];

    pub fn eth(proto: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::with_capacity(14 + payload.len());
        f.extend_from_slice(&DST_MAC);
        f.extend_from_slice(&SRC_MAC);
        f.extend_from_slice(&proto.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, frag: u16, payload: &[u8]) -> Vec<u8> {
        let mut h = vec![0x45, 0];
        h.extend_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
        h.extend_from_slice(&[0, 1]);
        h.extend_from_slice(&frag.to_be_bytes());
        h.extend_from_slice(&[64, proto, 0, 0]);
        h.extend_from_slice(&src.octets());
        h.extend_from_slice(&dst.octets());
        h.extend_from_slice(payload);
        eth(0x0800, &h)
    }

    pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, nh: u8, hop: u8, payload: &[u8]) -> Vec<u8> {
        let mut h = vec![0x60, 0, 0, 0];
        h.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        h.extend_from_slice(&[nh, hop]);
        h.extend_from_slice(&src.octets());
        h.extend_from_slice(&dst.octets());
        h.extend_from_slice(payload);
        eth(0x86dd, &h)
    }

    /// An ICMP (or ICMPv6) header and `payload`.
    pub fn icmp(t: u8, c: u8, rest: [u8; 4], payload: &[u8]) -> Vec<u8> {
        let mut h = vec![t, c, 0, 0];
        h.extend_from_slice(&rest);
        h.extend_from_slice(payload);
        h
    }

    pub fn ports(sport: u16, dport: u16, len: usize) -> Vec<u8> {
        let mut h = sport.to_be_bytes().to_vec();
        h.extend_from_slice(&dport.to_be_bytes());
        h.resize(len, 0);
        h
    }

    /// The IP packet of a frame (without its Ethernet header).
    pub fn l3(frame: &[u8]) -> &[u8] {
        &frame[14..]
    }
}

fn compile(set: &crate::sources::policy::PolicySet, config: GuardConfig) -> Result<GuardCompiled> {
    let labels = std::collections::BTreeMap::from([
        ("kubernetes.io/os".to_string(), "linux".to_string()),
        (
            "kubernetes.io/hostname".to_string(),
            crate::agent::hostname(),
        ),
    ]);
    crate::agent::guard::compile(
        set,
        &GuardSetup {
            config,
            node_labels: labels,
            audit_only: false,
        },
    )?
    .ok_or_else(|| anyhow!("the policy does not turn the guard on for this node"))
}

pub fn run(args: &GuardBenchArgs) -> Result<()> {
    use frames::*;
    let set = kubearmor::load(&args.policy)
        .map_err(|e| anyhow!("{e}"))?
        .set;
    let ifindex = crate::sources::interfaces::list()?
        .into_iter()
        .find(|i| i.name == args.iface)
        .map(|i| i.ifindex)
        .with_context(|| format!("no interface {}", args.iface))?;
    // A rate no test-run loop reaches, so the allowed path is measured without the limit
    // biting; the rate-limited path gets its own policy generation below.
    let open = GuardConfig {
        rate_per_second: 1_000_000_000,
        burst: 1_000_000_000,
        ..GuardConfig::default()
    };
    let mut guard = Guard::load(&open)?;
    guard.load_programs()?;
    guard.install(&compile(&set, open)?)?;

    let node: std::net::Ipv4Addr = "10.255.255.254".parse()?;
    let node6: std::net::Ipv6Addr = "fd00:ffff::fffe".parse()?;
    let body = [0x41u8; 56];
    let echo = |src| ipv4(src, node, 1, 0, &icmp(8, 0, [0x12, 0x34, 0, 1], &body));
    let echo6 = |src| ipv6(src, node6, 58, 64, &icmp(128, 0, [0x12, 0x34, 0, 1], &body));
    let tcp_syn = ipv4(args.untrusted, node, 6, 0, &ports(40000, 443, 20));
    let tcp6 = ipv6(args.untrusted6, node6, 6, 64, &ports(40000, 443, 20));
    let pmtud = {
        let inner = ipv4(node, args.untrusted, 6, 0, &ports(443, 40000, 8));
        ipv4(
            args.untrusted,
            node,
            1,
            0,
            &icmp(3, 4, [0, 0, 5, 0x78], l3(&inner)),
        )
    };
    let ns = {
        let mut target = node6.octets().to_vec();
        target.extend_from_slice(&[1, 1, 2, 0, 0, 0, 0, 1]);
        ipv6(
            args.untrusted6,
            node6,
            58,
            255,
            &icmp(135, 0, [0; 4], &target),
        )
    };
    // The node pings the untrusted host and sends it UDP; the egress program records both,
    // so the reply and an error about the UDP flow are the node's own.
    let ping_out = ipv4(
        node,
        args.untrusted,
        1,
        0,
        &icmp(8, 0, [0x77, 0x77, 0, 1], &body),
    );
    let udp_out = ipv4(node, args.untrusted, 17, 0, &ports(33434, 53, 8));
    guard.test_run_tc(true, &ping_out, 1)?;
    guard.test_run_tc(true, &udp_out, 1)?;
    let reply = ipv4(
        args.untrusted,
        node,
        1,
        0,
        &icmp(0, 0, [0x77, 0x77, 0, 1], &body),
    );
    let error = ipv4(
        args.untrusted,
        node,
        1,
        0,
        &icmp(3, 3, [0; 4], l3(&udp_out)),
    );
    let truncated = {
        let mut f = echo(args.untrusted);
        f.truncate(14 + 20 + 4);
        f
    };

    let mut rows = Vec::new();
    let mut measure = |path: &'static str, frame: &[u8], guard: &mut Guard| -> Result<()> {
        let (ret, d) = guard.test_run_xdp(frame, ifindex, args.repeat)?;
        let verdict = match ret {
            1 => "drop",
            2 => "pass",
            _ => "other",
        };
        rows.push(Row {
            path,
            ns: d.as_nanos() as f64,
            verdict,
        });
        Ok(())
    };
    measure("non-ICMP: IPv4 TCP", &tcp_syn, &mut guard)?;
    measure("non-ICMP: IPv6 TCP", &tcp6, &mut guard)?;
    measure(
        "drop: untrusted echo request (IPv4)",
        &echo(args.untrusted),
        &mut guard,
    )?;
    measure(
        "drop: untrusted echo request (IPv6)",
        &echo6(args.untrusted6),
        &mut guard,
    )?;
    measure("drop: truncated ICMP", &truncated, &mut guard)?;
    measure(
        "pass: trusted echo request (IPv4)",
        &echo(args.trusted),
        &mut guard,
    )?;
    measure(
        "pass: trusted echo request (IPv6)",
        &echo6(args.trusted6),
        &mut guard,
    )?;
    measure("pass: PMTUD frag-needed (always)", &pmtud, &mut guard)?;
    measure("pass: neighbour solicitation (always)", &ns, &mut guard)?;
    measure("pass: echo reply to the node's ping", &reply, &mut guard)?;
    measure("pass: error about the node's UDP flow", &error, &mut guard)?;
    // Rate limit reached: one packet per second, no burst.
    guard.install(&compile(
        &set,
        GuardConfig {
            rate_per_second: 1,
            burst: 1,
            ..GuardConfig::default()
        },
    )?)?;
    measure(
        "drop: trusted source over its rate",
        &echo(args.trusted),
        &mut guard,
    )?;
    guard.install(&compile(
        &set,
        GuardConfig {
            posture: Posture::Audit,
            ..open
        },
    )?)?;
    measure(
        "audit: untrusted echo request (posture audit)",
        &echo(args.untrusted),
        &mut guard,
    )?;
    let (_, egress) = guard.test_run_tc(true, &tcp_syn, args.repeat)?;
    rows.push(Row {
        path: "egress: TCP packet of a known flow (TC)",
        ns: egress.as_nanos() as f64,
        verdict: "pass",
    });
    for r in &rows {
        println!("{}", serde_json::to_string(r)?);
    }
    if rows.iter().any(|r| r.verdict == "other") {
        bail!("a path returned an unexpected verdict");
    }
    Ok(())
}
