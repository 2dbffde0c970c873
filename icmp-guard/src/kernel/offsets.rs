//! Kernel struct offsets for the kernel programs, resolved in the running kernel's BTF.
//!
//! aya has no CO-RE relocations for Rust kernel code, so the programs read `task_struct`,
//! `mm_struct`, `file`, `dentry` and `mount` fields at offsets this module finds in
//! `/sys/kernel/btf/vmlinux` at start-up. A kernel upgrade changes the numbers, not the code.

use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use btf_rs::{Btf, Type};
use icmp_guard_common::offsets::KernelOffsets;

pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

pub fn from_running_kernel() -> Result<KernelOffsets> {
    let path = Path::new(VMLINUX_BTF);
    if !path.exists() {
        bail!(
            "{VMLINUX_BTF} is missing: this kernel was built without CONFIG_DEBUG_INFO_BTF, which \
             icmp-guard needs to find kernel struct offsets; use a distribution kernel with BTF"
        );
    }
    let btf = Btf::from_file(path).with_context(|| format!("parsing {VMLINUX_BTF}"))?;
    resolve(&btf)
}

pub fn resolve(btf: &Btf) -> Result<KernelOffsets> {
    let f = |s: &str, field: &str| member_offset(btf, s, field);
    Ok(KernelOffsets {
        task_mm: f("task_struct", "mm")?,
        task_real_parent: f("task_struct", "real_parent")?,
        task_tgid: f("task_struct", "tgid")?,
        task_thread_pid: f("task_struct", "thread_pid")?,
        task_group_leader: f("task_struct", "group_leader")?,
        mm_exe_file: f("mm_struct", "exe_file")?,
        mm_arg_start: f("mm_struct", "arg_start")?,
        mm_arg_end: f("mm_struct", "arg_end")?,
        file_f_path: f("file", "f_path")?,
        file_f_inode: f("file", "f_inode")?,
        path_mnt: f("path", "mnt")?,
        path_dentry: f("path", "dentry")?,
        inode_i_ino: f("inode", "i_ino")?,
        inode_i_sb: f("inode", "i_sb")?,
        sb_s_dev: f("super_block", "s_dev")?,
        dentry_d_parent: f("dentry", "d_parent")?,
        dentry_d_name: f("dentry", "d_name")?,
        qstr_name: f("qstr", "name")?,
        vfsmount_mnt_root: f("vfsmount", "mnt_root")?,
        mount_mnt: f("mount", "mnt")?,
        mount_mnt_parent: f("mount", "mnt_parent")?,
        mount_mnt_mountpoint: f("mount", "mnt_mountpoint")?,
        pid_level: f("pid", "level")?,
        pid_numbers: f("pid", "numbers")?,
        upid_nr: f("upid", "nr")?,
        upid_size: struct_size(btf, "upid")? as u32,
        task_cgroups: f("task_struct", "cgroups")?,
        css_set_dfl_cgrp: f("css_set", "dfl_cgrp")?,
        cgroup_kn: f("cgroup", "kn")?,
        // Renamed `__parent` when it became RCU-protected (6.14 and later).
        kernfs_node_parent: f("kernfs_node", "parent").or_else(|_| f("kernfs_node", "__parent"))?,
        kernfs_node_id: f("kernfs_node", "id")?,
        task_stack: f("task_struct", "stack")?,
        // x86_64: THREAD_SIZE_ORDER is 2, one more with KASAN's bigger stacks.
        thread_size: if has_type(btf, "kasan_report") {
            32768
        } else {
            16384
        },
        valid: 1,
        ..syscall_registers(btf)
    })
}

/// Where the registers saved at syscall entry keep the syscall number and the first three
/// arguments (x86_64's `struct pt_regs`). Left invalid, with a log line, where the names differ
/// (other architectures): alerts then say the type flags are unknown.
fn syscall_registers(btf: &Btf) -> KernelOffsets {
    let f = |field: &str| member_offset(btf, "pt_regs", field);
    let found = (|| -> Result<KernelOffsets> {
        Ok(KernelOffsets {
            pt_regs_size: struct_size(btf, "pt_regs")? as u32,
            pt_regs_orig_ax: f("orig_ax")?,
            pt_regs_arg1: f("di")?,
            pt_regs_arg2: f("si")?,
            pt_regs_arg3: f("dx")?,
            syscall_regs: 1,
            task_pt_regs_helper: has_helper(btf, "BPF_FUNC_task_pt_regs") as u32,
            valid: 1,
            ..KernelOffsets::default()
        })
    })();
    found.unwrap_or_else(|e| {
        log::warn!(
            "the saved syscall registers cannot be located ({e:#}); alerts will show the socket \
             type without SOCK_NONBLOCK/SOCK_CLOEXEC"
        );
        KernelOffsets {
            valid: 1,
            ..KernelOffsets::default()
        }
    })
}

fn has_type(btf: &Btf, name: &str) -> bool {
    btf.resolve_ids_by_name(name)
        .map(|ids| !ids.is_empty())
        .unwrap_or(false)
}

/// Whether `enum bpf_func_id` of the running kernel names `helper`: the kernel has it.
pub fn has_helper(btf: &Btf, helper: &str) -> bool {
    let Ok(types) = btf.resolve_types_by_name("bpf_func_id") else {
        return false;
    };
    types.iter().any(|t| match t {
        Type::Enum(e) => e
            .members
            .iter()
            .any(|m| btf.resolve_name(m).is_ok_and(|n| n == helper)),
        _ => false,
    })
}

fn find_struct(btf: &Btf, name: &str) -> Result<btf_rs::Struct> {
    btf.resolve_types_by_name(name)
        .map_err(|e| anyhow!("kernel BTF has no type named {name}: {e}"))?
        .into_iter()
        .find_map(|t| match t {
            Type::Struct(s) if !s.members.is_empty() => Some(s),
            _ => None,
        })
        .ok_or_else(|| anyhow!("kernel BTF has no struct {name} with members"))
}

fn struct_size(btf: &Btf, name: &str) -> Result<usize> {
    Ok(find_struct(btf, name)?.size())
}

/// Byte offset of `field` in `struct name`, looking through anonymous struct/union members
/// (newer kernels wrap many `mm_struct` fields in one).
pub fn member_offset(btf: &Btf, name: &str, field: &str) -> Result<u32> {
    let s = find_struct(btf, name)?;
    find_member(btf, &s, field)?
        .map(|bits| bits / 8)
        .ok_or_else(|| anyhow!("kernel BTF: struct {name} has no field {field}"))
}

fn find_member(btf: &Btf, s: &btf_rs::Struct, field: &str) -> Result<Option<u32>> {
    for m in &s.members {
        let name = btf.resolve_name(m).unwrap_or_default();
        if name == field {
            if m.bitfield_size().is_some_and(|b| b != 0) {
                bail!("kernel BTF: {field} is a bitfield, which the programs cannot read");
            }
            return Ok(Some(m.bit_offset()));
        }
        if name.is_empty()
            && let Some(inner) = anonymous_aggregate(btf, m)?
            && let Some(bits) = find_member(btf, &inner, field)?
        {
            return Ok(Some(m.bit_offset() + bits));
        }
    }
    Ok(None)
}

fn anonymous_aggregate(btf: &Btf, m: &btf_rs::Member) -> Result<Option<btf_rs::Struct>> {
    let mut t = btf.resolve_chained_type(m)?;
    // Skip qualifiers and typedefs down to the aggregate.
    for _ in 0..8 {
        match t {
            Type::Struct(s) | Type::Union(s) => return Ok(Some(s)),
            Type::Typedef(_) | Type::Const(_) | Type::Volatile(_) | Type::Restrict(_) => {
                let inner = t.as_btf_type().expect("qualifier has a BTF type");
                t = btf.resolve_chained_type(inner)?;
            }
            _ => return Ok(None),
        }
    }
    Ok(None)
}
