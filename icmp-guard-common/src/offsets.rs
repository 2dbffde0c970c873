//! Kernel struct offsets, read from the running kernel's BTF by the agent at start-up.
//!
//! aya has no CO-RE for Rust kernel code, so hard-coded offsets would break on the next kernel
//! upgrade. The agent resolves each field in `/sys/kernel/btf/vmlinux` and hands the numbers to
//! the kernel programs as a read-only global.

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    pub task_mm: u32,
    pub task_real_parent: u32,
    pub task_tgid: u32,
    pub task_thread_pid: u32,
    pub task_group_leader: u32,
    pub mm_exe_file: u32,
    pub mm_arg_start: u32,
    pub mm_arg_end: u32,
    pub file_f_path: u32,
    pub file_f_inode: u32,
    pub path_mnt: u32,
    pub path_dentry: u32,
    pub inode_i_ino: u32,
    pub inode_i_sb: u32,
    pub sb_s_dev: u32,
    pub dentry_d_parent: u32,
    pub dentry_d_name: u32,
    pub qstr_name: u32,
    pub vfsmount_mnt_root: u32,
    pub mount_mnt: u32,
    pub mount_mnt_parent: u32,
    pub mount_mnt_mountpoint: u32,
    pub pid_level: u32,
    pub pid_numbers: u32,
    pub upid_nr: u32,
    pub upid_size: u32,
    pub task_cgroups: u32,
    pub css_set_dfl_cgrp: u32,
    pub cgroup_kn: u32,
    pub kernfs_node_parent: u32,
    pub kernfs_node_id: u32,
    /// `task_struct.stack`: the base of the task's kernel stack, whose top holds the registers
    /// saved at syscall entry.
    pub task_stack: u32,
    /// x86_64 `THREAD_SIZE`: the kernel stack's size (16 KiB, 32 KiB with KASAN).
    pub thread_size: u32,
    /// `sizeof(struct pt_regs)` and the offsets of the syscall number and the first three
    /// arguments in it (x86_64 names: `orig_ax`, `di`, `si`, `dx`).
    pub pt_regs_size: u32,
    pub pt_regs_orig_ax: u32,
    pub pt_regs_arg1: u32,
    pub pt_regs_arg2: u32,
    pub pt_regs_arg3: u32,
    /// 1 when the fields above were found: the alert stages may read the caller's socket(2)
    /// arguments (with their SOCK_NONBLOCK/SOCK_CLOEXEC flags) from the saved registers.
    pub syscall_regs: u32,
    /// 1 when the kernel has `bpf_task_pt_regs` (5.15 and later): the LSM stage asks it for the
    /// saved registers instead of computing their place on the stack.
    pub task_pt_regs_helper: u32,
    /// 1 once the agent has filled the struct; the programs refuse to guess otherwise.
    pub valid: u32,
}

#[cfg(feature = "user")]
// SAFETY: #[repr(C)] struct of u32s.
unsafe impl aya::Pod for KernelOffsets {}
