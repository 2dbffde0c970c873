//! Writing an Audit/Block decision into the ring buffer, within the workload's alert budget.
//!
//! The decision has already been taken when this runs: a full ring buffer or an exhausted budget
//! only costs the alert, never the enforcement, and both are counted.
//!
//! The work is split in three so that each part is verified on its own: the hook stages the
//! alert ([`stage`]), then tail-calls the program that captures the executable's path and the
//! command line ([`capture_exe`]), which tail-calls the one that captures the parent and submits
//! ([`capture_parent_and_submit`]). Done in one program, the path walks multiplied the states the
//! verifier of older kernels (6.1) explores past its limit.

use aya_ebpf::helpers::{
    bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
    generated::{bpf_get_current_cgroup_id, bpf_get_current_task, bpf_ktime_get_boot_ns},
};
use icmp_guard_common::{
    Class,
    class::SOCK_TYPE_MASK,
    event::{SocketEvent, flags},
    maps::{Action, RateState, Settings, SuppressKey, counter},
};

use crate::{
    decision::Socket,
    maps::{ALERTS_IN_FLIGHT, EVENTS, RATE, SUPPRESSED, ZERO_ALERT, count},
    task,
};

pub struct Decided<'a> {
    pub sock: &'a Socket,
    pub class: Class,
    pub action: Action,
    pub rule: u32,
    pub matched: u8,
    pub workload: u32,
    pub enforcer: u8,
    pub denied: bool,
    pub exe: (u64, u64),
    pub pid_tgid: u64,
    pub epoch: u16,
}

const WINDOW_NS: u64 = 1_000_000_000;

/// Takes one alert from the workload's budget. Returns false when this alert must be
/// suppressed; it is then counted in `SUPPRESSED` under what it would have said.
#[inline(always)]
fn admit(d: &Decided, limit: u32, now: u64) -> bool {
    if limit == 0 {
        return true;
    }
    let workload = d.workload;
    let state = match RATE.get_ptr_mut(workload) {
        Some(s) => s,
        None => {
            let fresh = RateState {
                window_start_ns: now,
                in_window: 0,
            };
            // BPF_NOEXIST: if another CPU created it meanwhile, use theirs.
            let _ = RATE.insert(workload, fresh, 1);
            match RATE.get_ptr_mut(workload) {
                Some(s) => s,
                // The map is full: count the alert as suppressed rather than lose it silently.
                None => {
                    suppress(d);
                    return false;
                }
            }
        }
    };
    unsafe {
        if now.wrapping_sub((*state).window_start_ns) >= WINDOW_NS {
            (*state).window_start_ns = now;
            (*state).in_window = 0;
        }
        (*state).in_window += 1;
        if (*state).in_window > limit as u64 {
            suppress(d);
            return false;
        }
    }
    true
}

#[inline(always)]
fn suppress(d: &Decided) {
    let key = SuppressKey {
        workload: d.workload,
        rule: d.rule,
        exe_dev: d.exe.0,
        exe_ino: d.exe.1,
        class: d.class as u8,
        action: d.action as u8,
        denied: d.denied as u8,
        _pad: 0,
        epoch: d.epoch,
        _pad2: 0,
    };
    match SUPPRESSED.get_ptr_mut(&key) {
        // This CPU's own slot: a plain add is exact.
        Some(n) => unsafe { *n += 1 },
        None => {
            // Inserting sets this CPU's slot to 1 and the others to 0. BPF_NOEXIST: if another
            // CPU inserted the key meanwhile, add to this CPU's slot of theirs.
            if SUPPRESSED.insert(&key, &1, 1).is_err() {
                match SUPPRESSED.get_ptr_mut(&key) {
                    Some(n) => unsafe { *n += 1 },
                    None => count(counter::SUPPRESS_LOST),
                }
            }
        }
    }
}

/// Stages an alert for this thread: the cheap fields now, the paths and the command line in
/// the tail-called stages (see `main.rs`). Returns false when no alert is due (rate limit) or
/// it could not be staged (counted). The entry records whether the socket is refused; every
/// stage returns the hook's verdict from it, so enforcement never depends on the alert.
#[inline(always)]
pub fn stage(d: &Decided, settings: &Settings) -> bool {
    let now = unsafe { bpf_ktime_get_boot_ns() };
    if !admit(d, settings.alerts_per_sec, now) {
        return false;
    }
    // A thread is inside one socket() call at a time, so its id keys the alert in flight.
    let Some(template) = ZERO_ALERT.get_ptr(0) else {
        return false;
    };
    if unsafe { ALERTS_IN_FLIGHT.insert(d.pid_tgid, &*template, 0) }.is_err() {
        count(counter::RINGBUF_FULL);
        return false;
    }
    let Some(pending) = ALERTS_IN_FLIGHT.get_ptr_mut(d.pid_tgid) else {
        count(counter::RINGBUF_FULL);
        return false;
    };
    let uid_gid = bpf_get_current_uid_gid();
    let mut fl: u16 = if d.denied { flags::DENIED } else { 0 };
    if d.action == Action::Block && !d.denied {
        fl |= flags::DOWNGRADED;
    }
    unsafe {
        (*pending).denied = d.denied as u32;
        let ev = &raw mut (*pending).event;
        (*ev).boot_ns = now;
        (*ev).cgroup_id = bpf_get_current_cgroup_id();
        (*ev).exe_dev = d.exe.0;
        (*ev).exe_ino = d.exe.1;
        (*ev).host_pid = (d.pid_tgid >> 32) as u32;
        (*ev).host_tid = d.pid_tgid as u32;
        (*ev).uid = uid_gid as u32;
        (*ev).gid = (uid_gid >> 32) as u32;
        (*ev).workload = d.workload;
        (*ev).rule = d.rule;
        // The hooks' view; the first stage replaces both with the caller's own socket(2)
        // arguments, flags included, when it can read them.
        (*ev).sock_type = d.sock.sock_type;
        (*ev).protocol = d.sock.protocol;
        (*ev).family = d.sock.family;
        (*ev).class = d.class as u8;
        (*ev).action = d.action as u8;
        (*ev).matched = d.matched;
        (*ev).enforcer = d.enforcer;
        (*ev).epoch = d.epoch;
        (*ev).comm = bpf_get_current_comm().unwrap_or([0; 16]);
        if !task::offsets_valid() {
            fl |= flags::NO_EXE;
        }
        (*ev).flags = fl;
    }
    true
}

/// A tail call failed (an empty stage slot): the alert is dropped, counted, and the entry freed.
#[inline(always)]
pub fn abandon() {
    count(counter::STAGE_ERRORS);
    let _ = ALERTS_IN_FLIGHT.remove(bpf_get_current_pid_tgid());
}

/// The hook's verdict for this thread's staged alert, as one of the hook's own constants (the
/// verifier must see that a cgroup program returns 0 or 1). The entry cannot be missing here
/// (only this thread's last stage removes it); should it be, the socket is allowed and the miss
/// counted, rather than a refusal invented.
#[inline(always)]
fn staged_verdict(tid: u64, verdicts: (i32, i32)) -> i32 {
    match ALERTS_IN_FLIGHT.get_ptr(tid) {
        Some(p) => crate::pick(unsafe { (*p).denied } == 0, verdicts),
        None => {
            count(counter::STAGE_ERRORS);
            crate::pick(true, verdicts)
        }
    }
}

/// [`abandon`] from inside a stage, which must still return the hook's verdict.
#[inline(always)]
pub fn abandon_with_verdict(verdicts: (i32, i32)) -> i32 {
    let verdict = staged_verdict(bpf_get_current_pid_tgid(), verdicts);
    abandon();
    verdict
}

/// Stage 1: the caller's socket(2) arguments, the executable's path and the command line.
/// `lsm`: this stage runs in the LSM program, which may use `bpf_task_pt_regs`.
#[inline(always)]
pub fn capture_exe(lsm: bool) {
    let tid = bpf_get_current_pid_tgid();
    let Some(pending) = ALERTS_IN_FLIGHT.get_ptr_mut(tid) else {
        return;
    };
    if !task::offsets_valid() {
        return;
    }
    let current = unsafe { bpf_get_current_task() } as usize;
    unsafe {
        let ev = &raw mut (*pending).event;
        let mut fl = (*ev).flags;
        // The hooks see the type without SOCK_NONBLOCK/SOCK_CLOEXEC, and the cgroup hook sees
        // protocol 0 already resolved (to IPPROTO_UDP, …). The caller's own arguments are in
        // the registers saved when it entered socket(2); they are this call's when the saved
        // syscall number is socket's and family, base type and protocol agree with the hook.
        if let Some((family, ty, protocol)) = task::socket_syscall_args(current, lsm) {
            if family == (*ev).family as u64
                && ty as u32 & SOCK_TYPE_MASK == (*ev).sock_type & SOCK_TYPE_MASK
                && (protocol == (*ev).protocol as u64 || protocol == 0)
            {
                (*ev).sock_type = ty as u32;
                (*ev).protocol = protocol as u32;
                fl |= flags::TYPE_FLAGS_KNOWN;
            }
        }
        match task::exe_file(current) {
            Ok(file) if file != 0 => {
                let (n, complete) = task::write_path(file, (*ev).exe.as_mut_ptr());
                (*ev).exe_len = n;
                if !complete {
                    fl |= flags::EXE_TRUNCATED;
                }
            }
            _ => fl |= flags::NO_EXE,
        }
        let (n, complete) = task::write_cmdline(current, (*ev).cmdline.as_mut_ptr());
        (*ev).cmdline_len = n;
        if !complete {
            fl |= flags::CMDLINE_TRUNCATED;
        }
        (*ev).flags = fl;
    }
}

/// Stage 2: the pids in the caller's namespace, the parent's executable, then the ring buffer.
/// Returns the hook's verdict.
#[inline(always)]
pub fn capture_parent_and_submit(verdicts: (i32, i32)) -> i32 {
    let tid = bpf_get_current_pid_tgid();
    let verdict = staged_verdict(tid, verdicts);
    let Some(pending) = ALERTS_IN_FLIGHT.get_ptr_mut(tid) else {
        return verdict;
    };
    let current = unsafe { bpf_get_current_task() } as usize;
    unsafe {
        let ev = &raw mut (*pending).event;
        if task::offsets_valid() {
            let (level, ns_pid) = task::ns_tgid(current, None).unwrap_or((0, 0));
            (*ev).ns_pid = ns_pid;
            if let Ok(parent) = task::real_parent(current) {
                (*ev).host_ppid = task::tgid(parent).unwrap_or(0);
                (*ev).ns_ppid = task::ns_tgid(parent, Some(level)).map(|r| r.1).unwrap_or(0);
                if let Ok(file) = task::exe_file(parent) {
                    if file != 0 {
                        let (n, complete) = task::write_path(file, (*ev).parent_exe.as_mut_ptr());
                        (*ev).parent_len = n;
                        if !complete {
                            (*ev).flags |= flags::PARENT_TRUNCATED;
                        }
                    }
                }
            }
        }
        if EVENTS.output::<SocketEvent>(&*ev, 0).is_err() {
            count(counter::RINGBUF_FULL);
        }
    }
    let _ = ALERTS_IN_FLIGHT.remove(tid);
    verdict
}
