//! The one decision both enforcers share: classify, find the workload, look the verdict up.
//!
//! Everything here is a constant number of map lookups; userspace has already compiled the
//! policy into exactly the keys looked up here.

use aya_ebpf::helpers::{
    bpf_get_current_pid_tgid, bpf_get_current_task,
    generated::{bpf_get_current_cgroup_id, bpf_ktime_get_boot_ns},
};
use icmp_guard_common::{
    Class, classify,
    event::matched,
    maps::{
        Action, CgroupKey, HOST_WORKLOAD, MAX_CGROUP_DEPTH, RULE_POSTURE, RuleKey, Settings,
        WorkloadKey, control, counter, outcome,
    },
};

use crate::{
    alert::{self, Decided},
    maps::{RULES, SETTINGS, STATE, WORKLOAD_OF_CGROUP, WORKLOADS, count, count_decision},
    task,
};

/// What the hook saw. `sock_type` carries no `SOCK_NONBLOCK`/`SOCK_CLOEXEC`: the kernel strips
/// them before either hook runs.
pub struct Socket {
    pub family: u16,
    pub sock_type: u32,
    pub protocol: u32,
}

/// The outcome for the hook: whether the socket may be created, and whether an alert was
/// staged for the capture stages.
pub struct Outcome {
    pub allow: bool,
    pub staged: bool,
}

const ALLOW: Outcome = Outcome {
    allow: true,
    staged: false,
};

/// Decides one socket. The order is what keeps the agent free for everything it does not
/// decide: a family it never manages returns before any lookup, and a class no policy names
/// returns after one read of the inlined `STATE` array. Only sockets of a class in use pay for
/// the workload and rule lookups.
#[inline(always)]
pub fn decide(sock: &Socket, enforcer: u8) -> Outcome {
    let class = classify(sock.family, sock.sock_type, sock.protocol);
    if class == Class::Unmanaged {
        return ALLOW;
    }
    let Some(state) = STATE.get_ptr(0) else {
        return ALLOW;
    };
    // Each word is stored atomically by the agent; read each once.
    let word = unsafe { core::ptr::read_volatile(&raw const (*state).control) };
    if control::classes(word) & class.bit() == 0 {
        return ALLOW;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let agent = unsafe { core::ptr::read_volatile(&raw const (*state).agent_tgid) };
    if (pid_tgid >> 32) as u32 == agent {
        // The agent's own sockets are never decided: it can never lock itself out.
        return ALLOW;
    }
    let lease = unsafe { core::ptr::read_volatile(&raw const (*state).lease_until_ns) };
    if lease != u64::MAX && unsafe { bpf_ktime_get_boot_ns() } >= lease {
        // The agent is gone and did not come back in time: give every socket back.
        count(counter::LEASE_LAPSED);
        return ALLOW;
    }
    let generation = control::generation(word);
    let Some(settings) = SETTINGS.get(generation).copied() else {
        return ALLOW;
    };
    let workload = find_workload(generation, &settings);
    let Some(wp) = (unsafe {
        WORKLOADS.get(WorkloadKey {
            generation,
            workload,
        })
    })
    .copied() else {
        // No policy for this workload: no decision and no event, as in KubeArmor.
        return ALLOW;
    };
    let bit = class.bit();
    if wp.rule_classes & bit == 0 && wp.posture_classes & bit == 0 {
        return ALLOW;
    }

    let current = unsafe { bpf_get_current_task() } as usize;
    let exe = if task::offsets_valid() {
        match task::exe_file(current) {
            Ok(0) => (0, 0),
            Ok(file) => task::file_identity(file).unwrap_or_else(|_| {
                count(counter::IDENTITY_ERRORS);
                (0, 0)
            }),
            Err(_) => {
                count(counter::IDENTITY_ERRORS);
                (0, 0)
            }
        }
    } else {
        (0, 0)
    };

    let mut key = RuleKey {
        generation,
        workload,
        class: class as u8,
        _pad: [0; 7],
        exe_dev: exe.0,
        exe_ino: exe.1,
    };
    let mut found = None;
    if wp.rule_classes & bit != 0 {
        // An identity of (0, 0) is the "any executable" key itself; never let a caller whose
        // executable could not be read match a source-specific rule.
        if exe != (0, 0) {
            if let Some(v) = unsafe { RULES.get(&key) } {
                found = Some((v.action, v.rule, matched::CLASS_AND_SOURCE));
            }
        }
        if found.is_none() {
            key.exe_dev = 0;
            key.exe_ino = 0;
            if let Some(v) = unsafe { RULES.get(&key) } {
                found = Some((v.action, v.rule, matched::CLASS));
            }
        }
    }
    if found.is_none() && wp.posture_classes & bit != 0 {
        found = Some((wp.posture_action, RULE_POSTURE, matched::POSTURE));
    }
    let Some((action, rule, how)) = found else {
        count_decision(class as u8, outcome::ALLOWED);
        return ALLOW;
    };
    let action = Action::from_u8(action);
    if action == Action::Allow {
        count_decision(class as u8, outcome::ALLOWED);
        return ALLOW;
    }
    let denied = action == Action::Block && settings.audit_only == 0;
    count_decision(
        class as u8,
        if denied {
            outcome::BLOCKED
        } else {
            outcome::AUDITED
        },
    );
    let staged = alert::stage(
        &Decided {
            sock,
            class,
            action,
            rule,
            matched: how,
            workload,
            enforcer,
            denied,
            exe,
            pid_tgid,
            epoch: control::epoch(word),
        },
        &settings,
    );
    Outcome {
        allow: !denied,
        staged,
    }
}

/// The workload of the caller: the deepest cgroup on its path to the root (its own included)
/// that the agent declared, or the host.
///
/// The ancestors are found by walking kernfs parents rather than with
/// `bpf_get_current_ancestor_cgroup_id`, which Debian's 5.10 refuses in LSM programs
/// ("unknown func"): one path for every kernel.
#[inline(always)]
fn find_workload(generation: u32, settings: &Settings) -> u32 {
    if settings.has_workloads == 0 {
        return HOST_WORKLOAD;
    }
    let key = |cgroup_id| CgroupKey {
        generation,
        _pad: 0,
        cgroup_id,
    };
    let own = unsafe { bpf_get_current_cgroup_id() };
    if let Some(w) = unsafe { WORKLOAD_OF_CGROUP.get(key(own)) } {
        return *w;
    }
    if !task::offsets_valid() {
        return HOST_WORKLOAD;
    }
    let current = unsafe { bpf_get_current_task() } as usize;
    let Ok(mut kn) = task::cgroup_node(current).and_then(task::kernfs_parent) else {
        return HOST_WORKLOAD;
    };
    for _ in 0..MAX_CGROUP_DEPTH {
        if kn == 0 {
            break;
        }
        let Ok(id) = task::kernfs_id(kn) else {
            break;
        };
        if let Some(w) = unsafe { WORKLOAD_OF_CGROUP.get(key(id)) } {
            return *w;
        }
        let Ok(parent) = task::kernfs_parent(kn) else {
            break;
        };
        kn = parent;
    }
    HOST_WORKLOAD
}
