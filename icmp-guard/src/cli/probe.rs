//! `icmp-guard probe`: what this kernel supports, found by trying rather than by reading
//! configuration files (a kernel can list `bpf` in its LSMs and still refuse LSM programs).
//!
//! `probe --json` prints [`Report`], a documented schema for scripts (README, "`icmp-guard
//! probe`"): only objects, arrays, strings, booleans and numbers, every key always present.
//! Each check is a [`Check`]: `supported` and a `detail` that says what was found or why not.
//!
//! Adding a check: add a field to [`Checks`] with its doc comment, fill it in [`collect`], print
//! it in [`run`], and add its row to the README's key table (`tests/probe.rs` fails until every
//! key the binary prints is in that table). New keys keep [`SCHEMA_VERSION`]; renaming or
//! removing one, or changing what it means, bumps it.

use std::path::{Path, PathBuf};

use anyhow::Result;
use procfs::process::{MountInfos, Process};
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
    /// Print a JSON object instead of text (schema in the README).
    #[arg(long)]
    pub json: bool,
    /// The pin directory whose set to report.
    #[arg(long, default_value = pins::DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// Print nothing; exit 0 only while a pinned set enforces with a live agent renewing its
    /// lease (a readiness probe).
    #[arg(long)]
    pub enforcing: bool,
    /// Try the inbound ICMP guard's native XDP on these interfaces (repeatable), or on every
    /// interface but loopback with `--iface all`. Trying attaches the guard and detaches it at
    /// once, which some NIC drivers answer with a queue reset (a few milliseconds without
    /// traffic): nothing is tried unless asked.
    #[arg(long = "iface")]
    pub ifaces: Vec<String>,
}

/// Version of the `--json` schema. Adding keys does not change it.
pub const SCHEMA_VERSION: u32 = 1;

/// `probe --json`.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// [`SCHEMA_VERSION`].
    pub schema_version: u32,
    /// The running kernel's release, as `uname -r` prints it.
    pub kernel_release: String,
    pub checks: Checks,
    pub enforcer: EnforcerChoice,
    pub pinned: Pinned,
    pub guard: Guard,
}

/// The set pinned at `--pin-dir`, if any.
#[derive(Clone, Debug, Serialize)]
pub struct Pinned {
    /// Where it was looked for.
    pub pin_dir: String,
    /// A set is pinned there.
    pub present: bool,
    /// Its map layout version (0 when none is pinned).
    pub layout: u32,
    /// The pinned hook links: `lsm`, `cgroup`.
    pub links: Vec<String>,
    /// The pid of the agent that last renewed its lease (0: none), and whether it still runs.
    pub agent_pid: u32,
    pub agent_running: bool,
    /// The programs decide: a link is pinned and the lease has not lapsed.
    pub enforcing: bool,
    /// Milliseconds of lease left, as a string (`unlimited` when it has no expiry).
    pub lease_left: String,
}

impl Pinned {
    fn of(dir: &Path) -> Pinned {
        let st = pins::status(dir);
        Pinned {
            pin_dir: dir.display().to_string(),
            present: st.pinned,
            layout: st.layout,
            links: st.links.clone(),
            agent_pid: st.agent_pid,
            agent_running: st.agent_alive,
            enforcing: st.enforcing(),
            lease_left: match st.lease_left_ms {
                u64::MAX => "unlimited".to_string(),
                ms => format!("{ms} ms"),
            },
        }
    }
}

/// One thing the kernel or the system does or does not offer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Check {
    pub supported: bool,
    /// When supported, what was found (a path, a list); when not, why, and what to do.
    pub detail: String,
}

impl Check {
    fn yes(detail: impl Into<String>) -> Check {
        Check {
            supported: true,
            detail: detail.into(),
        }
    }

    fn no(detail: impl Into<String>) -> Check {
        Check {
            supported: false,
            detail: detail.into(),
        }
    }

    fn from_result(r: Result<String>) -> Check {
        match r {
            Ok(found) => Check::yes(found),
            Err(e) => Check::no(format!("{e:#}")),
        }
    }
}

/// Every check, one key each.
#[derive(Clone, Debug, Serialize)]
pub struct Checks {
    /// `/sys/kernel/btf/vmlinux` exists: the kernel describes its own types.
    pub btf: Check,
    /// Every kernel struct field the programs read was found in BTF.
    pub kernel_offsets: Check,
    /// The kernel loaded the BPF LSM program (tried, not guessed).
    pub lsm_programs: Check,
    /// `bpf` is among the active LSMs in `/sys/kernel/security/lsm`; detail is that list.
    pub bpf_lsm_listed: Check,
    /// A cgroup v2 hierarchy is mounted; detail is its mount point.
    pub cgroup2: Check,
    /// A BPF filesystem is mounted; detail is where.
    pub bpffs: Check,
    /// Alerts can carry the caller's SOCK_NONBLOCK/SOCK_CLOEXEC flags, read from the registers
    /// saved at socket(2) entry; detail says how.
    pub socket_flags: Check,
}

/// What `run --enforcer auto` would use here.
#[derive(Clone, Debug, Serialize)]
pub struct EnforcerChoice {
    /// `lsm`, `cgroup`, or `none` when neither can run.
    pub auto_picks: String,
    /// What the picked enforcer cannot see; empty for `lsm` and `none`.
    pub blind_spots: Vec<String>,
}

/// Whether interfaces take the inbound ICMP guard in native XDP mode.
#[derive(Clone, Debug, Serialize)]
pub struct Guard {
    /// Interfaces were tried (`--iface`); when false, `detail` says how to ask.
    pub tried: bool,
    pub detail: String,
    pub interfaces: Vec<GuardInterface>,
}

/// One interface: native XDP, or why not (then `run` uses generic XDP).
#[derive(Clone, Debug, Serialize)]
pub struct GuardInterface {
    pub name: String,
    pub mtu: u32,
    pub native_xdp: bool,
    /// `native`, `native, multi-buffer program (for the MTU)`, or the driver's refusal.
    pub detail: String,
}

fn probe_guard(names: &[String]) -> Guard {
    if names.is_empty() {
        return Guard {
            tried: false,
            detail: "not tried: pass --iface NAME (or --iface all) to try native XDP".into(),
            interfaces: Vec::new(),
        };
    }
    let tried = (|| -> Result<Vec<GuardInterface>> {
        let all = crate::sources::interfaces::list()?;
        let chosen: Vec<&crate::sources::interfaces::Interface> =
            if names.iter().any(|n| n == "all") {
                all.iter().filter(|i| !i.loopback).collect()
            } else {
                let mut out = Vec::new();
                for n in names {
                    match all.iter().find(|i| &i.name == n) {
                        Some(i) => out.push(i),
                        None => anyhow::bail!("no interface named {n}"),
                    }
                }
                out
            };
        let modes = crate::kernel::guard::probe_native(
            &chosen.iter().map(|i| i.name.clone()).collect::<Vec<_>>(),
        )?;
        Ok(chosen
            .iter()
            .map(|i| {
                let (native_xdp, detail) = match modes.get(&i.name) {
                    Some(Ok(crate::kernel::guard::AttachMode::NativeFrags)) => (
                        true,
                        "native, multi-buffer program (for the MTU)".to_string(),
                    ),
                    Some(Ok(_)) => (true, "native".to_string()),
                    Some(Err(e)) => (
                        false,
                        format!("generic XDP: the driver refused native ({e})"),
                    ),
                    None => (false, "not tried".to_string()),
                };
                GuardInterface {
                    name: i.name.clone(),
                    mtu: i.mtu,
                    native_xdp,
                    detail,
                }
            })
            .collect())
    })();
    match tried {
        Ok(interfaces) => Guard {
            tried: true,
            detail: "native XDP tried, then detached".into(),
            interfaces,
        },
        Err(e) => Guard {
            tried: false,
            detail: format!("cannot be tried: {e:#}"),
            interfaces: Vec::new(),
        },
    }
}

pub fn collect(pin_dir: &Path, ifaces: &[String]) -> Report {
    let kernel_release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let btf = if Path::new(kernel_offsets::VMLINUX_BTF).exists() {
        Check::yes(kernel_offsets::VMLINUX_BTF)
    } else {
        Check::no(format!(
            "{} is missing: the kernel was built without CONFIG_DEBUG_INFO_BTF",
            kernel_offsets::VMLINUX_BTF
        ))
    };
    let kernel_offsets = Check::from_result(
        kernel_offsets::from_running_kernel().map(|_| "resolved from BTF".to_string()),
    );
    let lsm_programs = Check::from_result(enforcer::probe_lsm().map(|()| "load".to_string()));
    let bpf_lsm_listed = match std::fs::read_to_string("/sys/kernel/security/lsm") {
        Ok(list) => {
            let list = list.trim().to_string();
            Check {
                supported: list.split(',').any(|l| l == "bpf"),
                detail: list,
            }
        }
        Err(e) => Check::no(format!(
            "cannot read /sys/kernel/security/lsm ({e}); mount securityfs there to see the list"
        )),
    };
    let cgroup2 = Check::from_result(workload::cgroup2_mount().map(|p| p.display().to_string()));
    let mounts = Process::myself().and_then(|p| p.mountinfo());
    let bpffs = match &mounts {
        Ok(m) => bpffs_check(m),
        Err(e) => Check::no(format!("cannot read /proc/self/mountinfo: {e}")),
    };
    let socket_flags = match kernel_offsets::from_running_kernel() {
        Ok(o) if o.syscall_regs == 1 => Check::yes(format!(
            "from the registers saved at socket(2) entry: {} for the LSM enforcer, the top of the \
             kernel stack for the cgroup enforcer",
            if o.task_pt_regs_helper == 1 {
                "bpf_task_pt_regs"
            } else {
                "the top of the kernel stack"
            }
        )),
        Ok(_) => Check::no(
            "the saved syscall registers cannot be located on this architecture: alerts say \
             TypeFlags unknown",
        ),
        Err(e) => Check::no(format!("{e:#}")),
    };
    let auto = if lsm_programs.supported {
        Some(EnforcerKind::Lsm)
    } else if cgroup2.supported {
        Some(EnforcerKind::Cgroup)
    } else {
        None
    };
    Report {
        schema_version: SCHEMA_VERSION,
        kernel_release,
        checks: Checks {
            btf,
            kernel_offsets,
            lsm_programs,
            bpf_lsm_listed,
            cgroup2,
            bpffs,
            socket_flags,
        },
        enforcer: EnforcerChoice {
            auto_picks: auto.map_or("none", |k| k.name()).to_string(),
            blind_spots: auto
                .map(|k| k.blind_spots().iter().map(|s| s.to_string()).collect())
                .unwrap_or_default(),
        },
        pinned: Pinned::of(pin_dir),
        guard: probe_guard(ifaces),
    }
}

fn bpffs_check(mounts: &MountInfos) -> Check {
    let points: Vec<String> = mounts
        .iter()
        .filter(|m| m.fs_type == "bpf")
        .map(|m| m.mount_point.display().to_string())
        .collect();
    if points.is_empty() {
        Check::no("not mounted; `run` mounts it on /sys/fs/bpf to pin its programs")
    } else {
        Check::yes(points.join(", "))
    }
}

pub fn run(args: &ProbeArgs) -> Result<()> {
    enforcer::check_root()?;
    if args.enforcing {
        let p = Pinned::of(&args.pin_dir);
        if p.enforcing && p.agent_running {
            return Ok(());
        }
        anyhow::bail!(
            "not enforcing: {}",
            if !p.present {
                format!("nothing is pinned at {}", args.pin_dir.display())
            } else if !p.agent_running {
                format!("the agent that pinned it (pid {}) is gone", p.agent_pid)
            } else {
                "the lease has lapsed".to_string()
            }
        );
    }
    let r = collect(&args.pin_dir, &args.ifaces);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    let c = &r.checks;
    let line = |label: &str, check: &Check, yes: &str, no: &str| {
        let (word, detail) = if check.supported {
            (yes, &check.detail)
        } else {
            (no, &check.detail)
        };
        if word.is_empty() {
            println!("{label:<22} {detail}");
        } else if detail.is_empty() {
            println!("{label:<22} {word}");
        } else {
            println!("{label:<22} {word}: {detail}");
        }
    };
    println!("{:<22} {}", "kernel", r.kernel_release);
    line("BTF", &c.btf, "yes", "no");
    line(
        "kernel struct offsets",
        &c.kernel_offsets,
        "",
        "NOT resolved",
    );
    line("LSM programs", &c.lsm_programs, "", "refused");
    line("active LSMs", &c.bpf_lsm_listed, "", "");
    line("cgroup v2", &c.cgroup2, "", "missing");
    line("bpffs", &c.bpffs, "mounted", "");
    line("socket type flags", &c.socket_flags, "", "unknown");
    let p = &r.pinned;
    if p.present {
        println!(
            "{:<22} {} (layout {}, links: {}, agent pid {} {}, lease {})",
            "pinned set",
            p.pin_dir,
            p.layout,
            if p.links.is_empty() {
                "none".to_string()
            } else {
                p.links.join(", ")
            },
            p.agent_pid,
            if p.agent_running { "running" } else { "GONE" },
            if p.enforcing {
                format!("{} left", p.lease_left)
            } else {
                "lapsed: every socket is allowed".to_string()
            }
        );
        if !p.agent_running {
            println!(
                "  its agent is gone: start one to adopt it, or `icmp-guard unload` to remove it"
            );
        }
    } else {
        println!("{:<22} none at {}", "pinned set", p.pin_dir);
    }
    match r.enforcer.auto_picks.as_str() {
        "none" => println!(
            "{:<22} nothing: neither LSM nor cgroup v2 is usable",
            "--enforcer auto picks"
        ),
        k => println!("{:<22} {k}", "--enforcer auto picks"),
    }
    for b in &r.enforcer.blind_spots {
        println!("  blind spot: {b}");
    }
    if r.guard.tried {
        println!(
            "{:<22} per interface ({}):",
            "inbound ICMP guard", r.guard.detail
        );
        for i in &r.guard.interfaces {
            println!("  {:<16} mtu {:<6} {}", i.name, i.mtu, i.detail);
        }
    } else {
        println!("{:<22} {}", "inbound ICMP guard", r.guard.detail);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use procfs::FromRead;

    use super::*;

    #[test]
    fn bpffs_is_found_by_filesystem_type() {
        let none =
            MountInfos::from_read("25 1 8:1 / / rw - ext4 /dev/sda1 rw\n".as_bytes()).unwrap();
        assert!(!bpffs_check(&none).supported);
        let some = MountInfos::from_read(
            "25 1 8:1 / / rw - ext4 /dev/sda1 rw\n\
             40 25 0:40 / /sys/fs/bpf rw,nosuid - bpf bpf rw,mode=700\n"
                .as_bytes(),
        )
        .unwrap();
        assert_eq!(bpffs_check(&some), Check::yes("/sys/fs/bpf"));
    }
}
