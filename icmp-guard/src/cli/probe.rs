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
        offsets as kernel_offsets,
    },
    sources::workload,
};

#[derive(clap::Args, Debug)]
pub struct ProbeArgs {
    /// Print a JSON object instead of text (schema in the README).
    #[arg(long)]
    pub json: bool,
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
    /// The `syscalls/sys_enter_socket` tracepoint exists (for socket type flags in alerts).
    pub socket_tracepoint: Check,
}

/// What `run --enforcer auto` would use here.
#[derive(Clone, Debug, Serialize)]
pub struct EnforcerChoice {
    /// `lsm`, `cgroup`, or `none` when neither can run.
    pub auto_picks: String,
    /// What the picked enforcer cannot see; empty for `lsm` and `none`.
    pub blind_spots: Vec<String>,
}

pub fn collect() -> Report {
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
    let socket_tracepoint = match tracefs_events() {
        Some(events) if events.join("syscalls/sys_enter_socket").exists() => {
            Check::yes(format!("{}/syscalls/sys_enter_socket", events.display()))
        }
        Some(_) => {
            Check::no("the kernel has no syscall tracepoints (CONFIG_FTRACE_SYSCALLS is off)")
        }
        None => Check::no("tracefs is not mounted; `run` mounts it on /sys/kernel/tracing"),
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
            socket_tracepoint,
        },
        enforcer: EnforcerChoice {
            auto_picks: auto.map_or("none", |k| k.name()).to_string(),
            blind_spots: auto
                .map(|k| k.blind_spots().iter().map(|s| s.to_string()).collect())
                .unwrap_or_default(),
        },
    }
}

fn bpffs_check(mounts: &MountInfos) -> Check {
    let points: Vec<String> = mounts
        .iter()
        .filter(|m| m.fs_type == "bpf")
        .map(|m| m.mount_point.display().to_string())
        .collect();
    if points.is_empty() {
        Check::no("not mounted (not needed: icmp-guard pins nothing)")
    } else {
        Check::yes(points.join(", "))
    }
}

fn tracefs_events() -> Option<PathBuf> {
    [
        "/sys/kernel/tracing/events",
        "/sys/kernel/debug/tracing/events",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}

pub fn run(args: &ProbeArgs) -> Result<()> {
    enforcer::check_root()?;
    let r = collect();
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
    line("socket tracepoint", &c.socket_tracepoint, "yes", "no");
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
