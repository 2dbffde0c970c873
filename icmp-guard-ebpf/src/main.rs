//! icmp-guard's kernel programs.
//!
//! Two enforcers share [`decision::decide`]: the BPF LSM `socket_create` hook (primary: sees every
//! family, runs before the socket exists) and `cgroup/sock_create` (fallback where LSM programs
//! cannot load: inet sockets only, after the kernel's own permission checks). Nothing else is
//! attached: no program runs for a syscall other than socket(2). Each hook has two tail-called
//! capture stages (see `alert.rs`), which run only for an alert and return the hook's verdict.
#![no_std]
#![no_main]

mod alert;
mod decision;
mod maps;
mod task;

use aya_ebpf::{
    macros::{cgroup_sock, lsm},
    programs::{LsmContext, SockContext},
};
use icmp_guard_common::event::enforcer;

use crate::{
    decision::Socket,
    maps::{CGROUP_STAGES, LSM_STAGES},
};

const EPERM: i32 = 1;
const EACCES: i32 = 13;

/// LSM hooks return 0 to allow and a negative errno to refuse.
const LSM_VERDICTS: (i32, i32) = (0, -EPERM);
/// cgroup/sock_create returns 1 to allow and 0 to refuse (the caller sees EPERM).
const CGROUP_VERDICTS: (i32, i32) = (1, 0);

/// The hook's constant for a decision. Written plainly, LLVM turns (0, -1) into `-(!allow)`, a
/// negation the verifier cannot bound; from 6.10 on it then refuses the LSM program for not
/// provably returning an errno. `black_box` keeps two constants on two branches.
#[inline(always)]
pub fn pick(allow: bool, verdicts: (i32, i32)) -> i32 {
    if allow {
        core::hint::black_box(verdicts.0)
    } else {
        core::hint::black_box(verdicts.1)
    }
}

/// Stage indices in `LSM_STAGES` / `CGROUP_STAGES`.
const STAGE_EXE: u32 = 0;
const STAGE_PARENT: u32 = 1;

#[lsm(hook = "socket_create")]
pub fn socket_create(ctx: LsmContext) -> i32 {
    // int socket_create(int family, int type, int protocol, int kern), then the verdict of the
    // LSM programs that ran before this one.
    let previous: i32 = ctx.arg(4);
    if previous != 0 {
        // An earlier refusal stays a refusal. Kernels from 6.10 on verify that an LSM program
        // returns an errno, which an unknown value cannot prove: EACCES (AppArmor's answer) is
        // kept, anything else is reported as EPERM.
        return if previous == -EACCES { -EACCES } else { -EPERM };
    }
    let kern: i32 = ctx.arg(3);
    if kern != 0 {
        // Sockets the kernel creates for itself are not a process's capability.
        return 0;
    }
    let family: i32 = ctx.arg(0);
    let sock_type: i32 = ctx.arg(1);
    let protocol: i32 = ctx.arg(2);
    let sock = Socket {
        family: family as u16,
        sock_type: sock_type as u32,
        protocol: protocol as u32,
    };
    let out = decision::decide(&sock, enforcer::LSM);
    let verdict = pick(out.allow, LSM_VERDICTS);
    if out.staged {
        // Does not return when it succeeds: the stages return the verdict.
        let _ = unsafe { LSM_STAGES.tail_call(&ctx, STAGE_EXE) };
        alert::abandon();
    }
    verdict
}

#[lsm(hook = "socket_create")]
pub fn socket_create_capture_exe(ctx: LsmContext) -> i32 {
    alert::capture_exe(true);
    let _ = unsafe { LSM_STAGES.tail_call(&ctx, STAGE_PARENT) };
    alert::abandon_with_verdict(LSM_VERDICTS)
}

#[lsm(hook = "socket_create")]
pub fn socket_create_capture_parent(_ctx: LsmContext) -> i32 {
    alert::capture_parent_and_submit(LSM_VERDICTS)
}

#[cgroup_sock(sock_create)]
pub fn sock_create(ctx: SockContext) -> i32 {
    // Only runs for user sockets: inet_create() skips the hook for kernel sockets.
    let (family, sock_type, protocol) =
        unsafe { ((*ctx.sock).family, (*ctx.sock).type_, (*ctx.sock).protocol) };
    let sock = Socket {
        family: family as u16,
        sock_type,
        protocol,
    };
    let out = decision::decide(&sock, enforcer::CGROUP);
    let verdict = pick(out.allow, CGROUP_VERDICTS);
    if out.staged {
        let _ = unsafe { CGROUP_STAGES.tail_call(&ctx, STAGE_EXE) };
        alert::abandon();
    }
    verdict
}

#[cgroup_sock(sock_create)]
pub fn sock_create_capture_exe(ctx: SockContext) -> i32 {
    alert::capture_exe(false);
    let _ = unsafe { CGROUP_STAGES.tail_call(&ctx, STAGE_PARENT) };
    alert::abandon_with_verdict(CGROUP_VERDICTS)
}

#[cgroup_sock(sock_create)]
pub fn sock_create_capture_parent(_ctx: SockContext) -> i32 {
    alert::capture_parent_and_submit(CGROUP_VERDICTS)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
