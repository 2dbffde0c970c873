//! The enforcer: the kernel programs, loaded, attached, and fed compiled policies.
//!
//! Two kinds share one kernel object and one decision function:
//! - `lsm`: BPF LSM `socket_create`. Sees every address family (AF_PACKET included) and runs for
//!   every process on the machine.
//! - `cgroup`: `cgroup/sock_create` on a cgroup v2 subtree, for kernels that refuse LSM
//!   programs. It runs only for inet sockets, and only after the kernel's own permission checks.
//!
//! Links are owned by this process and never pinned: when the agent exits, for whatever reason,
//! the kernel detaches the programs and every socket is allowed again. Stopping the agent is
//! always a way back.

use std::{
    collections::HashMap as StdHashMap,
    fs::File,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, PerCpuHashMap, ProgramArray, RingBuf},
    programs::{CgroupAttachMode, CgroupSock, Lsm, ProgramError, TracePoint},
};
use icmp_guard_common::{
    maps::{
        self as m, ACTIVE_GENERATION_INDEX, CgroupKey, RuleKey, Settings, Verdict, WorkloadKey,
        WorkloadPolicy, counter,
    },
    offsets::KernelOffsets,
};
use log::{info, warn};

use crate::compile::Compiled;

/// The kernel object built by build.rs from `icmp-guard-ebpf`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/icmp-guard.bpf.o"));

/// A decision runs in microseconds; a generation is rewritten only after it has been inactive
/// for at least this long, so no decision can still be reading it. This is what makes policy
/// updates atomic without an RCU primitive in userspace.
const GENERATION_QUIESCENCE: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum EnforcerChoice {
    /// LSM where the kernel loads it, else cgroup (and say so).
    Auto,
    Lsm,
    Cgroup,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EnforcerKind {
    Lsm,
    Cgroup,
}

impl EnforcerKind {
    /// The `Enforcer` field of alerts. `BPFLSM` is KubeArmor's own name for the LSM path.
    pub fn alert_name(self) -> &'static str {
        match self {
            EnforcerKind::Lsm => "BPFLSM",
            EnforcerKind::Cgroup => "BPFCgroupSock",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            EnforcerKind::Lsm => "lsm",
            EnforcerKind::Cgroup => "cgroup",
        }
    }

    /// What this enforcer cannot see, for `probe` and the start-up log.
    pub fn blind_spots(self) -> &'static [&'static str] {
        match self {
            EnforcerKind::Lsm => &[],
            EnforcerKind::Cgroup => &[
                "cgroup/sock_create runs only for AF_INET and AF_INET6 sockets, so packet \
                 (AF_PACKET) rules are neither enforced nor alerted",
                "sockets the kernel refuses before the hook (ICMP datagram sockets outside \
                 net.ipv4.ping_group_range, raw sockets without CAP_NET_RAW) are neither decided \
                 nor alerted",
            ],
        }
    }
}

pub struct Options<'a> {
    pub choice: EnforcerChoice,
    /// cgroup v2 directory to attach the cgroup program to (its whole subtree is covered).
    pub cgroup: &'a Path,
}

pub struct Enforcer {
    pub kind: EnforcerKind,
    /// Whether `sys_enter_socket` is attached (alerts then carry the type flags).
    pub type_flags: bool,
    pub attached_cgroup: Option<PathBuf>,
    ebpf: Ebpf,
    active: Option<u32>,
    last_flip: Option<Instant>,
}

fn load_object(offsets: &KernelOffsets) -> Result<Ebpf> {
    let tgid = std::process::id();
    EbpfLoader::new()
        .override_global("OFFSETS", offsets, true)
        .override_global("AGENT_TGID", &tgid, true)
        .load(OBJECT)
        .context("loading the icmp-guard kernel object (maps and programs)")
}

/// The LSM hook and its two alert-capture stages (tail-called, so each is verified on its own).
const LSM_PROGRAMS: [&str; 3] = [
    "socket_create",
    "socket_create_capture_exe",
    "socket_create_capture_parent",
];
const CGROUP_PROGRAMS: [&str; 3] = [
    "sock_create",
    "sock_create_capture_exe",
    "sock_create_capture_parent",
];

/// Loads the LSM programs; the inner `Err` is the kernel refusing them (no BPF LSM, or the
/// verifier), the outer one anything else.
fn try_load_lsm(ebpf: &mut Ebpf, btf: &Btf) -> Result<std::result::Result<(), ProgramError>> {
    for name in LSM_PROGRAMS {
        let prog: &mut Lsm = ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("kernel object has no {name} program"))?
            .try_into()?;
        if let Err(e) = prog.load("socket_create", btf) {
            return Ok(Err(e));
        }
    }
    Ok(Ok(()))
}

fn load_cgroup(ebpf: &mut Ebpf) -> Result<()> {
    for name in CGROUP_PROGRAMS {
        let prog: &mut CgroupSock = ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("kernel object has no {name} program"))?
            .try_into()?;
        prog.load().map_err(|e| {
            anyhow!("the kernel refused the cgroup/sock_create program {name}: {e}")
        })?;
    }
    Ok(())
}

/// Puts the two capture stages of `programs` into the tail-call array `map`.
fn install_stages(ebpf: &mut Ebpf, map: &str, programs: [&str; 3]) -> Result<()> {
    let mut fds = Vec::new();
    for name in &programs[1..] {
        let prog = ebpf
            .program(name)
            .ok_or_else(|| anyhow!("kernel object has no {name} program"))?;
        fds.push(prog.fd()?.try_clone()?);
    }
    let mut stages: ProgramArray<&mut MapData> = ProgramArray::try_from(
        ebpf.map_mut(map)
            .ok_or_else(|| anyhow!("kernel object has no map {map}"))?,
    )?;
    for (i, fd) in fds.iter().enumerate() {
        stages.set(i as u32, fd, 0)?;
    }
    Ok(())
}

impl Enforcer {
    pub fn start(opts: &Options, offsets: &KernelOffsets) -> Result<Self> {
        check_root()?;
        let btf = Btf::from_sys_fs().context(
            "reading /sys/kernel/btf/vmlinux: this kernel has no BTF, which the LSM program needs",
        );
        let mut ebpf = load_object(offsets)?;
        let kind = match opts.choice {
            EnforcerChoice::Lsm => {
                let btf = btf?;
                try_load_lsm(&mut ebpf, &btf)?.map_err(|e| {
                    anyhow!(
                        "the kernel refused the LSM program ({e}); boot with `bpf` in lsm= \
                         (e.g. lsm=lockdown,capability,bpf) or use --enforcer cgroup"
                    )
                })?;
                EnforcerKind::Lsm
            }
            EnforcerChoice::Cgroup => EnforcerKind::Cgroup,
            EnforcerChoice::Auto => match btf {
                Err(e) => {
                    warn!("LSM enforcer unavailable ({e:#}); falling back to cgroup/sock_create");
                    EnforcerKind::Cgroup
                }
                Ok(btf) => match try_load_lsm(&mut ebpf, &btf)? {
                    Ok(()) => EnforcerKind::Lsm,
                    Err(e) => {
                        warn!(
                            "the kernel refused the LSM program ({}); falling back to \
                             cgroup/sock_create, which does not see AF_PACKET sockets",
                            short_error(&e)
                        );
                        EnforcerKind::Cgroup
                    }
                },
            },
        };
        let mut enforcer = Enforcer {
            kind,
            type_flags: false,
            attached_cgroup: None,
            ebpf,
            active: None,
            last_flip: None,
        };
        // Empty policy first: the programs must never run against half-written maps.
        log::debug!("writing the empty initial policy");
        enforcer.apply(&Compiled::default())?;
        log::debug!("attaching the {} program", kind.name());
        match kind {
            EnforcerKind::Lsm => {
                install_stages(&mut enforcer.ebpf, m::MAP_LSM_STAGES, LSM_PROGRAMS)?;
                let prog: &mut Lsm = enforcer
                    .ebpf
                    .program_mut("socket_create")
                    .expect("checked at load")
                    .try_into()?;
                prog.attach()
                    .context("attaching the LSM socket_create program")?;
            }
            EnforcerKind::Cgroup => {
                load_cgroup(&mut enforcer.ebpf)?;
                install_stages(&mut enforcer.ebpf, m::MAP_CGROUP_STAGES, CGROUP_PROGRAMS)?;
                let prog: &mut CgroupSock = enforcer
                    .ebpf
                    .program_mut("sock_create")
                    .expect("loaded above")
                    .try_into()?;
                let dir = File::open(opts.cgroup)
                    .with_context(|| format!("opening cgroup {}", opts.cgroup.display()))?;
                // aya attaches through a bpf_link, and cgroup links always run beside other
                // programs on the same hook (the kernel allows a socket only when every one
                // does); link_create takes no BPF_F_ALLOW_MULTI, so the mode stays the default.
                prog.attach(dir, CgroupAttachMode::default())
                    .with_context(|| format!("attaching to cgroup {}", opts.cgroup.display()))?;
                enforcer.attached_cgroup = Some(opts.cgroup.to_path_buf());
            }
        }
        log::debug!("attaching sys_enter_socket");
        enforcer.type_flags = enforcer.attach_type_flags();
        log::debug!("enforcer ready");
        Ok(enforcer)
    }

    /// `sys_enter_socket` keeps the caller's SOCK_NONBLOCK/SOCK_CLOEXEC for alerts; without it
    /// alerts still come, with the bare type.
    fn attach_type_flags(&mut self) -> bool {
        ensure_tracefs();
        let result = (|| -> Result<()> {
            let prog: &mut TracePoint = self
                .ebpf
                .program_mut("sys_enter_socket")
                .ok_or_else(|| anyhow!("no sys_enter_socket program"))?
                .try_into()?;
            prog.load()?;
            prog.attach("syscalls", "sys_enter_socket")?;
            Ok(())
        })();
        match result {
            Ok(()) => true,
            Err(e) => {
                warn!(
                    "cannot attach the syscalls/sys_enter_socket tracepoint ({e:#}); alerts will \
                     show the socket type without SOCK_NONBLOCK/SOCK_CLOEXEC"
                );
                false
            }
        }
    }

    /// Installs `compiled` atomically: the inactive generation is written in full, then the
    /// active-generation index flips in a single array write. A decision reads that index once,
    /// so it sees the old policy or the new one, never a mix.
    pub fn apply(&mut self, compiled: &Compiled) -> Result<()> {
        let next = match self.active {
            None => 0,
            Some(g) => g ^ 1,
        };
        if let Some(t) = self.last_flip {
            let since = t.elapsed();
            if since < GENERATION_QUIESCENCE {
                std::thread::sleep(GENERATION_QUIESCENCE - since);
            }
        }
        self.clear_generation(next)?;
        if let Err(e) = self.write_generation(next, compiled) {
            // Leave nothing of a half-written policy behind; the active one is untouched.
            let _ = self.clear_generation(next);
            return Err(
                e.context("the new policy was not applied; the previous one stays in force")
            );
        }
        let mut active: Array<&mut MapData, u32> = Array::try_from(self.map(m::MAP_ACTIVE)?)?;
        active.set(ACTIVE_GENERATION_INDEX, next, 0)?;
        self.active = Some(next);
        self.last_flip = Some(Instant::now());
        Ok(())
    }

    fn write_generation(&mut self, generation: u32, c: &Compiled) -> Result<()> {
        {
            let mut settings: Array<&mut MapData, Settings> =
                Array::try_from(self.map(m::MAP_SETTINGS)?)?;
            settings.set(generation, c.settings, 0)?;
        }
        {
            let mut cgroups: HashMap<&mut MapData, CgroupKey, u32> =
                HashMap::try_from(self.map(m::MAP_WORKLOAD_OF_CGROUP)?)?;
            for &(cgroup_id, workload) in &c.cgroups {
                let key = CgroupKey {
                    generation,
                    _pad: 0,
                    cgroup_id,
                };
                cgroups.insert(key, workload, 0)?;
            }
        }
        {
            let mut workloads: HashMap<&mut MapData, WorkloadKey, WorkloadPolicy> =
                HashMap::try_from(self.map(m::MAP_WORKLOADS)?)?;
            for (&workload, wp) in &c.workloads {
                workloads.insert(
                    WorkloadKey {
                        generation,
                        workload,
                    },
                    *wp,
                    0,
                )?;
            }
        }
        let mut rules: HashMap<&mut MapData, RuleKey, Verdict> =
            HashMap::try_from(self.map(m::MAP_RULES)?)?;
        for (slot, v) in &c.rules {
            let (exe_dev, exe_ino) = slot.exe.map(|e| (e.dev, e.ino)).unwrap_or((0, 0));
            let key = RuleKey {
                generation,
                workload: slot.workload,
                class: slot.class as u8,
                _pad: [0; 7],
                exe_dev,
                exe_ino,
            };
            let verdict = Verdict {
                action: v.action as u8,
                _pad: [0; 3],
                rule: v.rule,
            };
            rules
                .insert(key, verdict, 0)
                .with_context(|| format!("inserting kernel rule {slot:?}"))?;
        }
        Ok(())
    }

    fn clear_generation(&mut self, generation: u32) -> Result<()> {
        fn clear<K: aya::Pod, V: aya::Pod>(
            map: &mut aya::maps::Map,
            of_generation: impl Fn(&K) -> bool,
        ) -> Result<()> {
            let mut h: HashMap<&mut MapData, K, V> = HashMap::try_from(map)?;
            let stale: Vec<K> = h
                .keys()
                .filter_map(|k| k.ok())
                .filter(&of_generation)
                .collect();
            for k in stale {
                h.remove(&k)?;
            }
            Ok(())
        }
        clear::<CgroupKey, u32>(self.map(m::MAP_WORKLOAD_OF_CGROUP)?, |k| {
            k.generation == generation
        })?;
        clear::<WorkloadKey, WorkloadPolicy>(self.map(m::MAP_WORKLOADS)?, |k| {
            k.generation == generation
        })?;
        clear::<RuleKey, Verdict>(self.map(m::MAP_RULES)?, |k| k.generation == generation)?;
        Ok(())
    }

    fn map(&mut self, name: &str) -> Result<&mut aya::maps::Map> {
        self.ebpf
            .map_mut(name)
            .ok_or_else(|| anyhow!("kernel object has no map {name}"))
    }

    /// The generation the kernel programs currently read.
    pub fn active_generation(&self) -> u32 {
        self.active.unwrap_or(0)
    }

    /// The ring buffer of decisions, for the alert pipeline (can be taken once).
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>> {
        let map = self
            .ebpf
            .take_map(m::MAP_EVENTS)
            .ok_or_else(|| anyhow!("events ring buffer already taken"))?;
        Ok(RingBuf::try_from(map)?)
    }

    /// Per-CPU counters summed over CPUs, indexed by `icmp_guard_common::maps::counter`.
    pub fn counters(&mut self) -> Result<Counters> {
        let arr: PerCpuArray<&mut MapData, u64> =
            PerCpuArray::try_from(self.map(m::MAP_COUNTERS)?)?;
        let sum = |i: u32| -> Result<u64> { Ok(arr.get(&i, 0)?.iter().sum()) };
        Ok(Counters {
            ringbuf_full: sum(counter::RINGBUF_FULL)?,
            blocked: sum(counter::BLOCKED)?,
            audited: sum(counter::AUDITED)?,
            decided: sum(counter::DECIDED)?,
            identity_errors: sum(counter::IDENTITY_ERRORS)?,
            suppress_lost: sum(counter::SUPPRESS_LOST)?,
            stage_errors: sum(counter::STAGE_ERRORS)?,
        })
    }

    /// Decisions per (class, action), for the `icmp_guard_decisions_total` metric.
    ///
    /// NOT YET COUNTED BY THE KERNEL: this returns `Ok(None)`, and the metric is left out, until
    /// the kernel object keeps a per-CPU array indexed `class * 3 + action` (`Action`: Allow 0,
    /// Audit 1, Block 2). Filling this in (read the array, sum over CPUs, one `DecisionCount` per
    /// managed class and action) is all the metrics need.
    pub fn decisions(&mut self) -> Result<Option<Vec<DecisionCount>>> {
        Ok(None)
    }

    /// Alerts suppressed by the in-kernel rate limit, per workload, since the agent started.
    pub fn suppressed(&mut self) -> Result<StdHashMap<u32, u64>> {
        let h: PerCpuHashMap<&mut MapData, u32, u64> =
            PerCpuHashMap::try_from(self.map(m::MAP_SUPPRESSED)?)?;
        let mut out = StdHashMap::new();
        for k in h.keys() {
            let k = k?;
            if let Ok(values) = h.get(&k, 0) {
                out.insert(k, values.iter().sum());
            }
        }
        Ok(out)
    }
}

/// Decisions of one (class, action), summed over CPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecisionCount {
    pub class: icmp_guard_common::Class,
    pub action: icmp_guard_common::maps::Action,
    pub count: u64,
}

impl DecisionCount {
    /// The `action` label of the metric.
    pub fn action_name(&self) -> &'static str {
        use icmp_guard_common::maps::Action;
        match self.action {
            Action::Allow => "allow",
            Action::Audit => "audit",
            Action::Block => "block",
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counters {
    pub ringbuf_full: u64,
    pub blocked: u64,
    pub audited: u64,
    pub decided: u64,
    pub identity_errors: u64,
    pub suppress_lost: u64,
    pub stage_errors: u64,
}

/// Loads (without attaching) the LSM program: the only reliable test of whether this kernel
/// accepts LSM programs.
///
/// The real offsets matter: they sit in frozen `.rodata`, so with zeroed ones the verifier would
/// drop everything behind the validity check and accept a program it would refuse in earnest.
pub fn probe_lsm() -> Result<()> {
    let btf = Btf::from_sys_fs().context("reading /sys/kernel/btf/vmlinux")?;
    let offsets = crate::kernel::offsets::from_running_kernel()?;
    let mut ebpf = load_object(&offsets)?;
    try_load_lsm(&mut ebpf, &btf)?.map_err(|e| anyhow!("{}", short_error(&e)))
}

pub fn check_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "icmp-guard must run as root (it loads BPF programs and attaches them to the kernel); \
             run it with sudo or as the systemd service"
        );
    }
    Ok(())
}

/// aya puts the verifier log in the error; the first line is what an operator needs.
pub fn short_error(e: &ProgramError) -> String {
    match e {
        ProgramError::LoadError { io_error, .. } => format!("BPF_PROG_LOAD: {io_error}"),
        other => other.to_string(),
    }
}

/// Tracepoints are found through tracefs; mount it where the kernel expects it if nobody has.
fn ensure_tracefs() {
    let dir = Path::new("/sys/kernel/tracing");
    if dir.join("events").exists() || Path::new("/sys/kernel/debug/tracing/events").exists() {
        return;
    }
    let (src, fs, target) = (c"tracefs", c"tracefs", c"/sys/kernel/tracing");
    // SAFETY: static C strings, no data argument.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fs.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        info!("mounted tracefs on /sys/kernel/tracing to attach the socket tracepoint");
    }
}
