//! `icmp-guard probe`: what this kernel supports, found by trying rather than by reading
//! configuration files (a kernel can list `bpf` in its LSMs and still refuse LSM programs).

use std::path::Path;

use anyhow::Result;
use serde::Serialize;

use crate::{
    kernel::{
        enforcer::{self, EnforcerKind},
        offsets as kernel_offsets, pins,
    },
    sources::workload,
};

#[derive(clap::Args, Debug)]
pub struct ProbeArgs {
    /// Print a JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// The pin directory whose set to report.
    #[arg(long, default_value = pins::DEFAULT_PIN_DIR)]
    pub pin_dir: std::path::PathBuf,
    /// Report nothing; exit 0 only while a pinned set enforces with a live agent renewing its
    /// lease (a readiness probe).
    #[arg(long)]
    pub enforcing: bool,
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
    /// The pinned set, if any: its layout, its agent and whether that agent still runs, the
    /// lease left.
    pub pinned: pins::Status,
    /// Where alerts take the caller's SOCK_NONBLOCK/SOCK_CLOEXEC flags from.
    pub socket_flags: String,
    pub auto_enforcer: Option<String>,
    pub blind_spots: Vec<String>,
}

pub fn collect(pin_dir: &Path) -> Report {
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
    let socket_flags = match kernel_offsets::from_running_kernel() {
        Ok(o) if o.syscall_regs == 1 => format!(
            "from the registers saved at socket(2) entry ({} for the LSM enforcer, the top of \
             the kernel stack for the cgroup enforcer)",
            if o.task_pt_regs_helper == 1 {
                "bpf_task_pt_regs"
            } else {
                "the top of the kernel stack"
            }
        ),
        Ok(_) => "unknown: the saved syscall registers cannot be located on this architecture"
            .to_string(),
        Err(e) => format!("unknown: {e:#}"),
    };
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
        pinned: pins::status(pin_dir),
        socket_flags,
        auto_enforcer: auto.map(|k| k.name().to_string()),
        blind_spots: auto
            .map(|k| k.blind_spots().iter().map(|s| s.to_string()).collect())
            .unwrap_or_default(),
    }
}

pub fn run(args: &ProbeArgs) -> Result<()> {
    enforcer::check_root()?;
    if args.enforcing {
        let st = pins::status(&args.pin_dir);
        if st.enforcing() && st.agent_alive {
            return Ok(());
        }
        anyhow::bail!(
            "not enforcing: {}",
            if !st.pinned {
                format!("nothing is pinned at {}", args.pin_dir.display())
            } else if !st.agent_alive {
                format!("the agent that pinned it (pid {}) is gone", st.agent_pid)
            } else {
                "the lease has lapsed".to_string()
            }
        );
    }
    let r = collect(&args.pin_dir);
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
            "not mounted (`run` mounts it on /sys/fs/bpf to pin)"
        }
    );
    let p = &r.pinned;
    if p.pinned {
        println!(
            "pinned set             {} (layout {}, links: {}, agent pid {} {}, lease {})",
            args.pin_dir.display(),
            p.layout,
            if p.links.is_empty() {
                "none".to_string()
            } else {
                p.links.join(", ")
            },
            p.agent_pid,
            if p.agent_alive { "running" } else { "GONE" },
            match p.lease_left_ms {
                u64::MAX => "without expiry".to_string(),
                0 => "lapsed: every socket is allowed".to_string(),
                ms => format!("{} ms left", ms),
            }
        );
        if !p.agent_alive {
            println!(
                "  its agent is gone: start one to adopt it, or `icmp-guard unload` to remove it"
            );
        }
    } else {
        println!("pinned set             none at {}", args.pin_dir.display());
    }
    println!("socket type flags      {}", r.socket_flags);
    match &r.auto_enforcer {
        Some(k) => println!("--enforcer auto picks  {k}"),
        None => println!("--enforcer auto picks  nothing: neither LSM nor cgroup v2 is usable"),
    }
    for b in &r.blind_spots {
        println!("  blind spot: {b}");
    }
    Ok(())
}
