//! icmp-guard's kernel programs.
//!
//! Two enforcers share [`decision::decide`]: the BPF LSM `socket_create` hook (primary: sees every
//! family, runs before the socket exists) and `cgroup/sock_create` (fallback where LSM programs
//! cannot load: inet sockets only, after the kernel's own permission checks). A tracepoint on
//! `sys_enter_socket` keeps the `SOCK_NONBLOCK`/`SOCK_CLOEXEC` flags for the alert.
#![no_std]
#![no_main]

mod alert;
mod decision;
mod maps;
mod task;

use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid,
    macros::{cgroup_sock, lsm, tracepoint},
    programs::{LsmContext, SockContext, TracePointContext},
};
use icmp_guard_common::{event::enforcer, maps::PendingSocket};

use crate::{decision::Socket, maps::PENDING_SOCKET};

const EPERM: i32 = 1;

#[lsm(hook = "socket_create")]
pub fn socket_create(ctx: LsmContext) -> i32 {
    // int socket_create(int family, int type, int protocol, int kern), then the verdict of the
    // LSM programs that ran before this one.
    let previous: i32 = ctx.arg(4);
    if previous != 0 {
        return previous;
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
    if decision::decide(&sock, enforcer::LSM) {
        0
    } else {
        -EPERM
    }
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
    if decision::decide(&sock, enforcer::CGROUP) {
        1
    } else {
        0
    }
}

#[tracepoint]
pub fn sys_enter_socket(ctx: TracePointContext) -> u32 {
    // Offsets from /sys/kernel/tracing/events/syscalls/sys_enter_socket/format: the three
    // arguments are 8-byte fields at 16, 24 and 32.
    let (Ok(family), Ok(sock_type), Ok(protocol)) = (unsafe {
        (
            ctx.read_at::<u64>(16),
            ctx.read_at::<u64>(24),
            ctx.read_at::<u64>(32),
        )
    }) else {
        return 0;
    };
    let pending = PendingSocket {
        family: family as u32,
        sock_type: sock_type as u32,
        protocol: protocol as u32,
        _pad: 0,
    };
    let _ = PENDING_SOCKET.insert(bpf_get_current_pid_tgid(), pending, 0);
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
