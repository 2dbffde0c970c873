//! Reading who the caller is out of kernel memory.
//!
//! Offsets come from the running kernel's BTF (see `icmp_guard_common::offsets`); every read goes
//! through `bpf_probe_read_kernel`, so a wrong pointer yields an error, never a crash.

use aya_ebpf::helpers::{
    bpf_probe_read_kernel,
    generated::{
        bpf_get_current_task_btf, bpf_probe_read_kernel_str, bpf_probe_read_user,
        bpf_task_pt_regs,
    },
};
use icmp_guard_common::{
    event::{CMDLINE_BUF, PATH_COMPONENT_MAX, PATH_MAX_DEPTH},
    offsets::KernelOffsets,
};

#[unsafe(no_mangle)]
pub static OFFSETS: KernelOffsets = KernelOffsets {
    task_mm: 0,
    task_real_parent: 0,
    task_tgid: 0,
    task_thread_pid: 0,
    task_group_leader: 0,
    mm_exe_file: 0,
    mm_arg_start: 0,
    mm_arg_end: 0,
    file_f_path: 0,
    file_f_inode: 0,
    path_mnt: 0,
    path_dentry: 0,
    inode_i_ino: 0,
    inode_i_sb: 0,
    sb_s_dev: 0,
    dentry_d_parent: 0,
    dentry_d_name: 0,
    qstr_name: 0,
    vfsmount_mnt_root: 0,
    mount_mnt: 0,
    mount_mnt_parent: 0,
    mount_mnt_mountpoint: 0,
    pid_level: 0,
    pid_numbers: 0,
    upid_nr: 0,
    upid_size: 0,
    task_cgroups: 0,
    css_set_dfl_cgrp: 0,
    cgroup_kn: 0,
    kernfs_node_parent: 0,
    kernfs_node_id: 0,
    task_stack: 0,
    thread_size: 0,
    pt_regs_size: 0,
    pt_regs_orig_ax: 0,
    pt_regs_arg1: 0,
    pt_regs_arg2: 0,
    pt_regs_arg3: 0,
    syscall_regs: 0,
    task_pt_regs_helper: 0,
    valid: 0,
};

macro_rules! off {
    ($field:ident) => {
        // Read through a volatile pointer so the compiler keeps the load: the agent patches the
        // value in the object's .rodata before loading.
        unsafe { core::ptr::read_volatile(&raw const OFFSETS.$field) as usize }
    };
}

#[inline(always)]
fn read<T: Copy>(base: usize, offset: usize) -> Result<T, i32> {
    unsafe { bpf_probe_read_kernel((base + offset) as *const T) }
}

#[inline(always)]
pub fn offsets_valid() -> bool {
    off!(valid) == 1
}

/// `task->mm->exe_file`, or 0 for a task without an address space (kernel threads).
#[inline(always)]
pub fn exe_file(task: usize) -> Result<usize, i32> {
    let mm: usize = read(task, off!(task_mm))?;
    if mm == 0 {
        return Ok(0);
    }
    read(mm, off!(mm_exe_file))
}

/// The executable's identity: (`inode->i_sb->s_dev`, `inode->i_ino`).
///
/// An inode names the file itself, not a path to it: a copy or a bind mount over the allowed path
/// has a different identity, a symlink resolves to its target, and a binary started through the
/// dynamic loader has the loader's identity.
#[inline(always)]
pub fn file_identity(file: usize) -> Result<(u64, u64), i32> {
    let inode: usize = read(file, off!(file_f_inode))?;
    let ino: u64 = read(inode, off!(inode_i_ino))?;
    let sb: usize = read(inode, off!(inode_i_sb))?;
    let dev: u32 = read(sb, off!(sb_s_dev))?;
    Ok((dev as u64, ino))
}

/// The kernfs node of `task`'s cgroup in the v2 hierarchy (`task->cgroups->dfl_cgrp->kn`).
/// Its `id` is the cgroup id, and its `parent` chain leads to the root cgroup.
#[inline(always)]
pub fn cgroup_node(task: usize) -> Result<usize, i32> {
    let cset: usize = read(task, off!(task_cgroups))?;
    let cgrp: usize = read(cset, off!(css_set_dfl_cgrp))?;
    read(cgrp, off!(cgroup_kn))
}

#[inline(always)]
pub fn kernfs_parent(kn: usize) -> Result<usize, i32> {
    read(kn, off!(kernfs_node_parent))
}

#[inline(always)]
pub fn kernfs_id(kn: usize) -> Result<u64, i32> {
    read(kn, off!(kernfs_node_id))
}

pub fn real_parent(task: usize) -> Result<usize, i32> {
    read(task, off!(task_real_parent))
}

pub fn tgid(task: usize) -> Result<u32, i32> {
    read(task, off!(task_tgid))
}

/// The process id of `task`'s thread group as seen in the pid namespace at `level`
/// (`None`: the process is not visible there). Returns (own level, pid at `level`).
#[inline(always)]
pub fn ns_tgid(task: usize, level: Option<u32>) -> Result<(u32, u32), i32> {
    let leader: usize = read(task, off!(task_group_leader))?;
    let pid: usize = read(leader, off!(task_thread_pid))?;
    let own: u32 = read(pid, off!(pid_level))?;
    let at = level.unwrap_or(own);
    if at > own {
        return Ok((own, 0));
    }
    // Pid namespaces nest at most 32 deep (MAX_PID_NS_LEVEL); the mask keeps the read in bounds
    // for the verifier as well.
    let slot = (at & 31) as usize;
    let nr: u32 = read(
        pid,
        off!(pid_numbers) + slot * off!(upid_size) + off!(upid_nr),
    )?;
    Ok((own, nr))
}

/// x86_64's `__NR_socket`.
const NR_SOCKET: u64 = 41;
/// The padding kernels may leave above the saved registers at the top of the stack: none, or
/// 16 bytes on kernels built with FRED (x86_64 `TOP_OF_KERNEL_STACK_PADDING`).
const STACK_PADDINGS: [usize; 2] = [0, 16];

/// The current task's socket(2) arguments (family, type with its flags, protocol), read from
/// the registers saved when it entered the syscall, or `None` when the saved syscall number is
/// not socket(2) or the registers cannot be found. `lsm`: the caller is an LSM program, which
/// may use `bpf_task_pt_regs` where the kernel has it; otherwise their place at the top of the
/// task's kernel stack is computed (5.10 has no such helper, cgroup programs may not call it).
#[inline(always)]
pub fn socket_syscall_args(task: usize, lsm: bool) -> Option<(u64, u64, u64)> {
    if off!(syscall_regs) != 1 {
        return None;
    }
    if lsm && off!(task_pt_regs_helper) == 1 {
        // SAFETY: helpers with a BTF task pointer; the result is only ever read through
        // bpf_probe_read_kernel.
        let regs = unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) } as usize;
        return socket_args_at(regs);
    }
    let stack: usize = read(task, off!(task_stack)).ok()?;
    if stack == 0 {
        return None;
    }
    for padding in STACK_PADDINGS {
        let regs = stack + off!(thread_size) - padding - off!(pt_regs_size);
        if let Some(args) = socket_args_at(regs) {
            return Some(args);
        }
    }
    None
}

#[inline(always)]
fn socket_args_at(regs: usize) -> Option<(u64, u64, u64)> {
    let nr: u64 = read(regs, off!(pt_regs_orig_ax)).ok()?;
    if nr != NR_SOCKET {
        return None;
    }
    Some((
        read(regs, off!(pt_regs_arg1)).ok()?,
        read(regs, off!(pt_regs_arg2)).ok()?,
        read(regs, off!(pt_regs_arg3)).ok()?,
    ))
}

/// Writes the path of `file` into `buf` (`PATH_BUF` bytes) as fixed slots, leaf first (see
/// `icmp_guard_common::event`), crossing mounts up to the root of the caller's mount namespace.
/// Returns (slots used, complete).
#[inline(always)]
pub fn write_path(file: usize, buf: *mut u8) -> (u16, bool) {
    let Ok(mut vfsmount) = read::<usize>(file, off!(file_f_path) + off!(path_mnt)) else {
        return (0, false);
    };
    let Ok(mut dentry) = read::<usize>(file, off!(file_f_path) + off!(path_dentry)) else {
        return (0, false);
    };
    let mut mount = vfsmount.wrapping_sub(off!(mount_mnt));
    let mut complete = false;
    let mut used: u16 = 0;
    for i in 0..PATH_MAX_DEPTH {
        let slot = unsafe { buf.add(i * PATH_COMPONENT_MAX) };
        let Ok(mnt_root) = read::<usize>(vfsmount, off!(vfsmount_mnt_root)) else {
            break;
        };
        let Ok(parent) = read::<usize>(dentry, off!(dentry_d_parent)) else {
            break;
        };
        let mut next_dentry = parent;
        let mut name: usize = 0;
        if dentry == mnt_root {
            // At the root of this mount: continue from where it is mounted, unless this is the
            // namespace's root mount, whose parent is itself.
            let Ok(mnt_parent) = read::<usize>(mount, off!(mount_mnt_parent)) else {
                break;
            };
            if mnt_parent == mount {
                complete = true;
                break;
            }
            let Ok(mountpoint) = read::<usize>(mount, off!(mount_mnt_mountpoint)) else {
                break;
            };
            next_dentry = mountpoint;
            mount = mnt_parent;
            vfsmount = mount + off!(mount_mnt);
        } else if dentry == parent {
            // The root of a filesystem that is not the root of its mount: a disconnected
            // dentry. Report what was found as incomplete rather than invent the rest.
            break;
        } else {
            let Ok(n) = read::<usize>(dentry, off!(dentry_d_name) + off!(qstr_name)) else {
                break;
            };
            name = n;
        }
        // Both branches end here with the same shape: one slot written, then the next step.
        let n = if name == 0 {
            unsafe { *slot = 0 };
            1
        } else {
            unsafe {
                bpf_probe_read_kernel_str(slot.cast(), PATH_COMPONENT_MAX as u32, name as *const _)
            }
        };
        if n <= 0 {
            break;
        }
        used = i as u16 + 1;
        dentry = next_dentry;
    }
    (used, complete)
}

/// Copies the command line (`mm->arg_start..arg_end`, NUL-separated arguments) of the current
/// task into `buf` (`CMDLINE_BUF` bytes). Returns (bytes copied, complete).
#[inline(always)]
pub fn write_cmdline(task: usize, buf: *mut u8) -> (u16, bool) {
    let Ok(mm) = read::<usize>(task, off!(task_mm)) else {
        return (0, false);
    };
    if mm == 0 {
        return (0, true);
    }
    let (Ok(start), Ok(end)) = (
        read::<usize>(mm, off!(mm_arg_start)),
        read::<usize>(mm, off!(mm_arg_end)),
    ) else {
        return (0, false);
    };
    if end <= start {
        return (0, true);
    }
    let want = end - start;
    let len = want.min(CMDLINE_BUF - 1) & (CMDLINE_BUF - 1);
    let rc = unsafe { bpf_probe_read_user(buf.cast(), len as u32, start as *const _) };
    if rc != 0 {
        return (0, false);
    }
    (len as u16, len == want)
}
