//! `icmp-guard probe`: what this kernel supports, found by trying rather than by reading
//! configuration files (a kernel can list `bpf` in its LSMs and still refuse LSM programs).

use std::path::Path;

use anyhow::Result;
use serde::Serialize;

use crate::{
    kernel::{
        enforcer::{self, EnforcerKind},
        offsets as kernel_offsets,
    },
    sources::workload,
};

#[derive(clap::Args, Debug)]
pub struct ProbeArgs {
    /// Print a JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Interfaces to try the inbound ICMP guard on (repeatable; default: every interface but
    /// loopback). Trying attaches the guard in native XDP mode and detaches it at once, which
    /// some NIC drivers answer with a queue reset (a few milliseconds without traffic).
    #[arg(long = "iface")]
    pub ifaces: Vec<String>,
}

/// Whether one interface takes the inbound ICMP guard in native XDP mode.
#[derive(Debug, Serialize)]
pub struct GuardInterface {
    pub name: String,
    pub mtu: u32,
    /// `native` or `native-multi-buffer`, or why the driver refused (then `run` uses generic
    /// XDP).
    pub native_xdp: Result<String, String>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub kernel: String,
    pub btf: bool,
    /// Whether every kernel struct field the programs read was found in BTF.
    pub kernel_offsets: Result<(), String>,
    /// Result of actually loading the LSM program.
    pub lsm_program_loads: Result<(), String>,
    pub lsm_list: Option<String>,
    pub cgroup2_mount: Result<String, String>,
    pub bpffs_mounted: bool,
    pub socket_tracepoint: String,
    pub auto_enforcer: Option<String>,
    pub blind_spots: Vec<String>,
    /// The inbound ICMP guard, per interface; `Err` when the guard could not be tried at all.
    pub guard: Result<Vec<GuardInterface>, String>,
}

fn probe_guard(names: &[String]) -> Result<Vec<GuardInterface>, String> {
    let all = crate::sources::interfaces::list().map_err(|e| format!("{e:#}"))?;
    let chosen: Vec<&crate::sources::interfaces::Interface> = if names.is_empty() {
        all.iter().filter(|i| !i.loopback).collect()
    } else {
        let mut out = Vec::new();
        for n in names {
            match all.iter().find(|i| &i.name == n) {
                Some(i) => out.push(i),
                None => return Err(format!("no interface named {n}")),
            }
        }
        out
    };
    let tried = crate::kernel::guard::probe_native(
        &chosen.iter().map(|i| i.name.clone()).collect::<Vec<_>>(),
    )
    .map_err(|e| format!("{e:#}"))?;
    Ok(chosen
        .iter()
        .map(|i| GuardInterface {
            name: i.name.clone(),
            mtu: i.mtu,
            native_xdp: match tried.get(&i.name) {
                Some(Ok(crate::kernel::guard::AttachMode::NativeFrags)) => {
                    Ok("native-multi-buffer".into())
                }
                Some(Ok(_)) => Ok("native".into()),
                Some(Err(e)) => Err(e.clone()),
                None => Err("not tried".into()),
            },
        })
        .collect())
}

pub fn collect(ifaces: &[String]) -> Report {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let btf = Path::new(kernel_offsets::VMLINUX_BTF).exists();
    let kernel_offsets = kernel_offsets::from_running_kernel()
        .map(|_| ())
        .map_err(|e| format!("{e:#}"));
    let lsm_program_loads = enforcer::probe_lsm().map_err(|e| format!("{e:#}"));
    let lsm_list = std::fs::read_to_string("/sys/kernel/security/lsm").ok();
    let cgroup2_mount = workload::cgroup2_mount()
        .map(|p| p.display().to_string())
        .map_err(|e| format!("{e:#}"));
    let bpffs_mounted = std::fs::read_to_string("/proc/self/mounts")
        .map(|m| {
            m.lines()
                .any(|l| l.split_whitespace().nth(2) == Some("bpf"))
        })
        .unwrap_or(false);
    let socket_tracepoint = if tracefs_events().is_some() {
        tracefs_events()
            .map(|e| e.join("syscalls/sys_enter_socket").exists())
            .map(|b| {
                if b {
                    "yes"
                } else {
                    "no (CONFIG_FTRACE_SYSCALLS is off)"
                }
            })
    } else {
        Some("tracefs is not mounted; `run` mounts it on /sys/kernel/tracing")
    }
    .unwrap_or_default()
    .to_string();
    let auto = if lsm_program_loads.is_ok() {
        Some(EnforcerKind::Lsm)
    } else if cgroup2_mount.is_ok() {
        Some(EnforcerKind::Cgroup)
    } else {
        None
    };
    Report {
        kernel,
        btf,
        kernel_offsets,
        lsm_program_loads,
        lsm_list,
        cgroup2_mount,
        bpffs_mounted,
        socket_tracepoint,
        auto_enforcer: auto.map(|k| k.name().to_string()),
        blind_spots: auto
            .map(|k| k.blind_spots().iter().map(|s| s.to_string()).collect())
            .unwrap_or_default(),
        guard: probe_guard(ifaces),
    }
}

fn tracefs_events() -> Option<std::path::PathBuf> {
    [
        "/sys/kernel/tracing/events",
        "/sys/kernel/debug/tracing/events",
    ]
    .iter()
    .map(std::path::PathBuf::from)
    .find(|p| p.exists())
}

pub fn run(args: &ProbeArgs) -> Result<()> {
    enforcer::check_root()?;
    let r = collect(&args.ifaces);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    let yes_no = |ok: bool| if ok { "yes" } else { "no" };
    println!("kernel                 {}", r.kernel);
    println!("BTF                    {}", yes_no(r.btf));
    match &r.kernel_offsets {
        Ok(()) => println!("kernel struct offsets  resolved from BTF"),
        Err(e) => println!("kernel struct offsets  NOT resolved: {e}"),
    }
    match &r.lsm_program_loads {
        Ok(()) => println!("LSM programs           load"),
        Err(e) => println!("LSM programs           refused: {e}"),
    }
    if let Some(l) = &r.lsm_list {
        println!("active LSMs            {}", l.trim());
    }
    match &r.cgroup2_mount {
        Ok(p) => println!("cgroup v2              {p}"),
        Err(e) => println!("cgroup v2              missing: {e}"),
    }
    println!(
        "bpffs                  {}",
        if r.bpffs_mounted {
            "mounted"
        } else {
            "not mounted (not needed: icmp-guard pins nothing)"
        }
    );
    println!("socket tracepoint      {}", r.socket_tracepoint);
    match &r.auto_enforcer {
        Some(k) => println!("--enforcer auto picks  {k}"),
        None => println!("--enforcer auto picks  nothing: neither LSM nor cgroup v2 is usable"),
    }
    for b in &r.blind_spots {
        println!("  blind spot: {b}");
    }
    match &r.guard {
        Ok(list) => {
            println!("inbound ICMP guard     per interface (native XDP tried, then detached):");
            for i in list {
                match &i.native_xdp {
                    Ok(m) if m == "native" => {
                        println!("  {:<16} mtu {:<6} native XDP", i.name, i.mtu)
                    }
                    Ok(_) => println!(
                        "  {:<16} mtu {:<6} native XDP (multi-buffer program, for the MTU)",
                        i.name, i.mtu
                    ),
                    Err(e) => println!(
                        "  {:<16} mtu {:<6} generic XDP (driver refused native: {e})",
                        i.name, i.mtu
                    ),
                }
            }
        }
        Err(e) => println!("inbound ICMP guard     cannot be tried: {e}"),
    }
    Ok(())
}
