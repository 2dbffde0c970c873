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
//!
//! Only these hooks are attached: the agent costs nothing to a syscall other than socket(2), and
//! a socket of a family or class no policy decides is allowed after at most one array read.

use std::{
    collections::BTreeMap,
    fs::File,
    os::{fd::AsFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result, anyhow, bail};
use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, PerCpuHashMap, ProgramArray, RingBuf},
    programs::{CgroupAttachMode, CgroupSock, Lsm, ProgramError, links::FdLink},
};
use icmp_guard_common::{
    Class,
    maps::{
        self as m, CgroupKey, RuleKey, Settings, SuppressKey, Verdict, WorkloadKey, WorkloadPolicy,
        control, counter, outcome,
    },
    offsets::KernelOffsets,
};
use log::warn;

use super::{
    pins::{self, PinDir},
    state::{self, Quiescence, StateMap},
};
use crate::compile::Compiled;

/// The kernel object built by build.rs from `icmp-guard-ebpf`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/icmp-guard.bpf.o"));

/// Version of the map layout this agent writes (`State::layout`).
pub const LAYOUT: u32 = 2;

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
    /// Where the maps and the hook's link are pinned; `None`: nothing is pinned, and the
    /// programs go when the agent's process does.
    pub pins: Option<&'a Path>,
    /// How long the programs keep deciding after the agent's last renewal (pinned only).
    pub lease: Duration,
}

/// How this agent came to its maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arrival {
    /// Nothing was pinned: new maps, an empty policy until the first one is applied.
    Fresh,
    /// A pinned set of this layout was adopted: its policy stays in force until this agent's
    /// replaces it, and alerts it raised meanwhile are read from its ring buffer.
    Adopted,
    /// A pinned set of another layout (`from`) was found: a new set was loaded beside it, and
    /// the old one is removed once the new one enforces this agent's first policy.
    Replaced { from: u32 },
    /// Not pinned (`--no-pin`).
    Unpinned,
}

pub struct Enforcer {
    pub kind: EnforcerKind,
    pub attached_cgroup: Option<PathBuf>,
    pub arrival: Arrival,
    ebpf: Ebpf,
    state: Arc<StateMap>,
    pins: Option<PinDir>,
    lease: Option<LeaseKeeper>,
    /// What each generation holds in the kernel (`None`: unknown, rewrite it in full), so that
    /// an update writes only what changed.
    written: [Option<Generation>; 2],
    /// Epoch of the active generation (see `maps::control`).
    epoch: u16,
    /// The generation left by the last flip may still be read by a decision that started
    /// before it; it is rewritten only after a grace period.
    flipped_since_quiescence: bool,
    /// How the last wait for readers went (reported once if it had to sleep).
    quiescence: Option<Quiescence>,
    /// A set of another layout this agent's replaces, until its first policy is applied.
    takeover: Option<Takeover>,
}

/// The old set while the new one, loaded beside it, has only the empty policy: both decide,
/// and the old one's lease is kept fresh, until the new one holds the agent's first policy.
/// Removing it earlier would leave a moment with nothing refused.
struct Takeover {
    from: u32,
    old: PinDir,
    staging: PinDir,
    old_lease: Option<LeaseKeeper>,
}

/// One generation's entries, without the generation in the keys.
#[derive(Clone, Debug, Default, PartialEq)]
struct Generation {
    settings: Settings,
    cgroups: BTreeMap<u64, u32>,
    workloads: BTreeMap<u32, WorkloadPolicy>,
    rules: BTreeMap<(u32, u8, u64, u64), Verdict>,
}

impl Generation {
    fn of(c: &Compiled) -> Self {
        Generation {
            settings: c.settings,
            cgroups: c.cgroups.iter().copied().collect(),
            workloads: c.workloads.clone(),
            rules: c
                .rules
                .iter()
                .map(|(slot, v)| {
                    let (dev, ino) = slot.exe.map(|e| (e.dev, e.ino)).unwrap_or((0, 0));
                    (
                        (slot.workload, slot.class as u8, dev, ino),
                        Verdict {
                            action: v.action as u8,
                            _pad: [0; 3],
                            rule: v.rule,
                        },
                    )
                })
                .collect(),
        }
    }

    /// The classes some workload decides, by a rule or by its posture: every other class is
    /// allowed after one read of the control word.
    fn classes_in_use(&self) -> u16 {
        self.workloads
            .values()
            .fold(0, |m, wp| m | wp.rule_classes | wp.posture_classes)
    }
}

/// Loads the object; with `pins`, every map is taken from its pin there when one exists, and
/// pinned there when not.
fn load_object(offsets: &KernelOffsets, pins: Option<&Path>) -> Result<Ebpf> {
    let mut loader = EbpfLoader::new();
    loader.override_global("OFFSETS", offsets, true);
    if let Some(dir) = pins {
        for name in pins::PINNED_MAPS {
            loader.map_pin_path(name, dir.join(name));
        }
    }
    loader
        .load(OBJECT)
        .context("loading the icmp-guard kernel object (maps and programs)")
}

/// Renews the lease every second from a thread of its own, so that nothing the agent does
/// (a long policy compilation, a slow API server) can let it lapse while the agent runs.
struct LeaseKeeper {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

const RENEW_EVERY: Duration = Duration::from_secs(1);

impl LeaseKeeper {
    fn start(state: Arc<StateMap>, lease: Duration) -> Self {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        state.set_lease_until_ns(pins::boottime_ns() + lease.as_nanos() as u64);
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("lease".into())
                .spawn(move || {
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        state.set_lease_until_ns(pins::boottime_ns() + lease.as_nanos() as u64);
                        std::thread::park_timeout(RENEW_EVERY);
                    }
                })
                .expect("spawning the lease thread")
        };
        Self {
            stop,
            thread: Some(thread),
        }
    }

    fn stop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        self.stop();
    }
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
        // Another agent may still be stopping (a restart): wait for its lock a while.
        let pin = match opts.pins {
            Some(p) => Some(PinDir::open(p, Duration::from_secs(30))?),
            None => None,
        };
        let (arrival, staging) = match pin.as_ref().map(|p| p.layout()) {
            None => (Arrival::Unpinned, None),
            Some(None) => (Arrival::Fresh, None),
            Some(Some(l)) if l == LAYOUT => (Arrival::Adopted, None),
            Some(Some(from)) => {
                // A set this agent cannot read: load a new one beside it, and remove the old
                // one only once the new one enforces. The first words of STATE are the same in
                // every layout, so the old set's lease can be kept fresh meanwhile.
                let old = pin.as_ref().expect("pinned");
                let old_lease = pins::read_state(&old.path)
                    .map(|old_state| LeaseKeeper::start(Arc::new(old_state), opts.lease));
                // bpffs refuses names with a dot: no `.next`.
                let path = PathBuf::from(format!("{}-next", old.path.display()));
                let _ = pins::unload(&path);
                (
                    Arrival::Replaced { from },
                    Some((PinDir::open(&path, Duration::ZERO)?, old_lease)),
                )
            }
        };
        let target = staging.as_ref().map(|(s, _)| s).or(pin.as_ref());
        let mut ebpf = load_object(offsets, target.map(|p| p.path.as_path()))?;
        let Some(aya::maps::Map::Array(state)) = ebpf.map(m::MAP_STATE) else {
            bail!("kernel object has no array map {}", m::MAP_STATE);
        };
        let state = Arc::new(StateMap::map(state.fd().as_fd())?);
        let adopted = arrival == Arrival::Adopted;
        if adopted {
            // First of all: keep the adopted set deciding, and exempt this agent.
            state.set_agent_tgid(std::process::id());
        } else {
            // Nothing decided until the first policy is written: no class is in use. The
            // epoch starts one before 0 so that the first policy goes to generation 0 as 0.
            state.set_control(control::word(u16::MAX, 0));
            state.set_lease_until_ns(u64::MAX);
            state.set_agent_tgid(std::process::id());
            state.set_layout(LAYOUT);
        }
        let lease = pin
            .as_ref()
            .map(|_| LeaseKeeper::start(state.clone(), opts.lease));
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
        let epoch = control::epoch(state.control());
        let mut enforcer = Enforcer {
            kind,
            attached_cgroup: None,
            arrival,
            ebpf,
            state,
            pins: pin,
            lease,
            written: [None, None],
            epoch,
            // An adopted set may have just flipped: wait before rewriting either generation.
            flipped_since_quiescence: adopted,
            quiescence: None,
            takeover: None,
        };
        if !adopted {
            // Empty policy first: the programs must never run against half-written maps.
            log::debug!("writing the empty initial policy");
            enforcer.apply(&Compiled::default())?;
        }
        log::debug!("attaching the {} program", kind.name());
        let (stages, programs) = match kind {
            EnforcerKind::Lsm => (m::MAP_LSM_STAGES, LSM_PROGRAMS),
            EnforcerKind::Cgroup => {
                load_cgroup(&mut enforcer.ebpf)?;
                (m::MAP_CGROUP_STAGES, CGROUP_PROGRAMS)
            }
        };
        // The stages of an adopted set's programs are replaced one slot at a time: the hook
        // then tail-calls this agent's stages, which read the same in-flight alerts.
        install_stages(&mut enforcer.ebpf, stages, programs)?;
        let link_dir = staging
            .as_ref()
            .map(|(s, _)| s)
            .or(enforcer.pins.as_ref())
            .map(|p| p.path.clone());
        enforcer.attach(opts, link_dir.as_deref())?;
        if let (Some((staging, old_lease)), Some(old), Arrival::Replaced { from }) =
            (staging, enforcer.pins.take(), arrival)
        {
            enforcer.takeover = Some(Takeover {
                from,
                old,
                staging,
                old_lease,
            });
        }
        log::debug!("enforcer ready");
        Ok(enforcer)
    }

    /// The new set holds this agent's first policy: remove the old one, then put the new one
    /// in its place.
    fn complete_takeover(&mut self, t: Takeover) -> Result<()> {
        let Takeover {
            from,
            old,
            staging,
            old_lease,
        } = t;
        if let Some(mut keeper) = old_lease {
            keeper.stop();
        }
        let removed = pins::unload(&old.path)?;
        log::info!(
            "removed the pinned set of layout {from} at {} ({} pins) after this one took over",
            old.path.display(),
            removed.len()
        );
        std::fs::rename(&staging.path, &old.path).with_context(|| {
            format!(
                "moving {} to {}",
                staging.path.display(),
                old.path.display()
            )
        })?;
        self.pins = Some(staging.moved_to(old.path.clone()));
        Ok(())
    }

    /// Attaches the hook. Unpinned: the link belongs to this process. Pinned in `dir`: an
    /// adopted cgroup link on the same cgroup is pointed at the new program in one step
    /// (`BPF_LINK_UPDATE`); otherwise the new link is attached and pinned first and the old
    /// one removed after, so that some program decides at every instant.
    fn attach(&mut self, opts: &Options, dir: Option<&Path>) -> Result<()> {
        let kind = self.kind;
        let link: FdLink = match kind {
            EnforcerKind::Lsm => {
                let prog: &mut Lsm = self
                    .ebpf
                    .program_mut("socket_create")
                    .expect("checked at load")
                    .try_into()?;
                let id = prog
                    .attach()
                    .context("attaching the LSM socket_create program")?;
                if dir.is_none() {
                    return Ok(());
                }
                prog.take_link(id)?.into()
            }
            EnforcerKind::Cgroup => {
                let cgroup = File::open(opts.cgroup)
                    .with_context(|| format!("opening cgroup {}", opts.cgroup.display()))?;
                let target = std::fs::metadata(opts.cgroup)?.ino();
                self.attached_cgroup = Some(opts.cgroup.to_path_buf());
                let prog: &mut CgroupSock = self
                    .ebpf
                    .program_mut("sock_create")
                    .expect("loaded above")
                    .try_into()?;
                if let Some(dir) = dir {
                    let old = pins::link_pin(dir, kind.name());
                    if let Some(fd) = pins::obj_get(&old)
                        && pins::link_cgroup_id(fd.as_fd()) == Some(target)
                    {
                        pins::link_update(fd.as_fd(), prog.fd()?.as_fd())?;
                        log::info!(
                            "the pinned cgroup link now runs this agent's program (replaced in \
                             place)"
                        );
                        return Ok(());
                    }
                }
                // aya attaches through a bpf_link, and cgroup links always run beside other
                // programs on the same hook (the kernel allows a socket only when every one
                // does); link_create takes no BPF_F_ALLOW_MULTI, so the mode stays the default.
                let id = prog
                    .attach(cgroup, CgroupAttachMode::default())
                    .with_context(|| format!("attaching to cgroup {}", opts.cgroup.display()))?;
                if dir.is_none() {
                    return Ok(());
                }
                prog.take_link(id)?.try_into()?
            }
        };
        let dir = dir.expect("unpinned links returned above");
        let pin = pins::link_pin(dir, kind.name());
        // bpffs refuses names with a dot.
        let next = PathBuf::from(format!("{}-next", pin.display()));
        let _ = std::fs::remove_file(&next);
        let pinned = link
            .pin(&next)
            .with_context(|| format!("pinning the link at {}", next.display()))?;
        // Both the old and the new program decide now; the old link goes last.
        for other in ["lsm", "cgroup"] {
            let _ = std::fs::remove_file(pins::link_pin(dir, other));
        }
        std::fs::rename(&next, &pin)
            .with_context(|| format!("moving {} to {}", next.display(), pin.display()))?;
        // The pin holds the link now; dropping this handle does not detach it.
        drop(pinned);
        Ok(())
    }

    /// Installs `compiled` atomically: the inactive generation is brought to the new policy,
    /// then one atomic store of the control word makes it active (with the classes it decides).
    /// A decision reads that word once, so it sees the old policy or the new one, never a mix.
    /// Only what differs from what the generation held is written.
    pub fn apply(&mut self, compiled: &Compiled) -> Result<()> {
        let epoch = self.epoch.wrapping_add(1);
        let generation = control::generation(epoch as u64);
        if self.flipped_since_quiescence {
            // Decisions that read the control word before the last flip may still be reading
            // the generation about to be rewritten; wait until none is left.
            let q = state::wait_for_readers();
            if let Quiescence::Sleep(d) = q
                && self.quiescence != Some(q)
            {
                warn!(
                    "membarrier(MEMBARRIER_CMD_GLOBAL) is not available ({}); policy updates \
                     wait {d:?} each instead of one RCU grace period",
                    std::io::Error::last_os_error()
                );
            }
            self.quiescence = Some(q);
            self.flipped_since_quiescence = false;
        }
        let target = Generation::of(compiled);
        let held = self.written[generation as usize].take();
        if let Err(e) = self.write_generation(generation, held.as_ref(), &target) {
            // The generation is inactive and now half-written: the next update rewrites it in
            // full. The active one is untouched.
            return Err(
                e.context("the new policy was not applied; the previous one stays in force")
            );
        }
        self.state
            .set_control(control::word(epoch, target.classes_in_use()));
        self.written[generation as usize] = Some(target);
        self.epoch = epoch;
        self.flipped_since_quiescence = true;
        if let Some(t) = self.takeover.take() {
            self.complete_takeover(t)
                .context("the policy is in force, but the pinned set it replaces is left")?;
        }
        Ok(())
    }

    /// Brings `generation` from `held` (`None`: unknown contents) to `target`.
    fn write_generation(
        &mut self,
        generation: u32,
        held: Option<&Generation>,
        target: &Generation,
    ) -> Result<()> {
        if held.is_none() {
            self.clear_generation(generation)?;
        }
        let empty = Generation::default();
        let held = held.unwrap_or(&empty);
        if held.settings != target.settings || held == &empty {
            let mut settings: Array<&mut MapData, Settings> =
                Array::try_from(self.map(m::MAP_SETTINGS)?)?;
            settings.set(generation, target.settings, 0)?;
        }
        {
            let mut cgroups: HashMap<&mut MapData, CgroupKey, u32> =
                HashMap::try_from(self.map(m::MAP_WORKLOAD_OF_CGROUP)?)?;
            let key = |cgroup_id| CgroupKey {
                generation,
                _pad: 0,
                cgroup_id,
            };
            let (gone, changed) = diff(&held.cgroups, &target.cgroups);
            for k in gone {
                cgroups.remove(&key(*k))?;
            }
            for (k, v) in changed {
                cgroups.insert(key(*k), v, 0)?;
            }
        }
        {
            let mut workloads: HashMap<&mut MapData, WorkloadKey, WorkloadPolicy> =
                HashMap::try_from(self.map(m::MAP_WORKLOADS)?)?;
            let key = |workload| WorkloadKey {
                generation,
                workload,
            };
            let (gone, changed) = diff(&held.workloads, &target.workloads);
            for k in gone {
                workloads.remove(&key(*k))?;
            }
            for (k, v) in changed {
                workloads.insert(key(*k), v, 0)?;
            }
        }
        let mut rules: HashMap<&mut MapData, RuleKey, Verdict> =
            HashMap::try_from(self.map(m::MAP_RULES)?)?;
        let key = |&(workload, class, exe_dev, exe_ino): &(u32, u8, u64, u64)| RuleKey {
            generation,
            workload,
            class,
            _pad: [0; 7],
            exe_dev,
            exe_ino,
        };
        let (gone, changed) = diff(&held.rules, &target.rules);
        for k in gone {
            rules.remove(&key(k))?;
        }
        for (k, v) in changed {
            rules
                .insert(key(k), v, 0)
                .with_context(|| format!("inserting kernel rule {k:?}"))?;
        }
        Ok(())
    }

    /// Removes every entry of `generation` (whose contents are unknown).
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

    /// The epoch of the policy the kernel programs currently read (`maps::control`).
    pub fn epoch(&self) -> u16 {
        self.epoch
    }

    /// The words every decision reads first.
    pub fn state(&self) -> &StateMap {
        &self.state
    }

    /// The pin directory, when the set is pinned.
    pub fn pin_dir(&self) -> Option<&Path> {
        self.pins.as_ref().map(|p| p.path.as_path())
    }

    /// Stops renewing the lease and lets it run for `grace` more: a new agent adopting the
    /// pinned set within it takes over with no gap; otherwise every socket is allowed again
    /// when it lapses. Returns whether the set is pinned (unpinned programs go with the
    /// process).
    pub fn release(&mut self, grace: Duration) -> bool {
        match self.lease.as_mut() {
            Some(keeper) => {
                keeper.stop();
                self.state
                    .set_lease_until_ns(pins::boottime_ns() + grace.as_nanos() as u64);
                true
            }
            None => false,
        }
    }

    /// The ring buffer of decisions, for the alert pipeline (can be taken once).
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>> {
        let map = self
            .ebpf
            .take_map(m::MAP_EVENTS)
            .ok_or_else(|| anyhow!("events ring buffer already taken"))?;
        Ok(RingBuf::try_from(map)?)
    }

    /// Per-CPU counters summed over CPUs.
    pub fn counters(&mut self) -> Result<Counters> {
        let decisions = self.decisions()?;
        let arr: PerCpuArray<&mut MapData, u64> =
            PerCpuArray::try_from(self.map(m::MAP_COUNTERS)?)?;
        let sum = |i: u32| -> Result<u64> { Ok(arr.get(&i, 0)?.iter().sum()) };
        let total = |o: u32| decisions.values().map(|d| d[o as usize]).sum();
        Ok(Counters {
            ringbuf_full: sum(counter::RINGBUF_FULL)?,
            blocked: total(outcome::BLOCKED),
            audited: total(outcome::AUDITED),
            decided: decisions.values().flatten().sum(),
            identity_errors: sum(counter::IDENTITY_ERRORS)?,
            suppress_lost: sum(counter::SUPPRESS_LOST)?,
            stage_errors: sum(counter::STAGE_ERRORS)?,
            lease_lapsed: sum(counter::LEASE_LAPSED)?,
        })
    }

    /// Decisions per class, summed over CPUs: `[allowed, audited, blocked]` (indexed by
    /// `maps::outcome`). Classes never decided are left out.
    pub fn decisions(&mut self) -> Result<BTreeMap<Class, [u64; 3]>> {
        let arr: PerCpuArray<&mut MapData, u64> =
            PerCpuArray::try_from(self.map(m::MAP_DECISIONS)?)?;
        let mut out = BTreeMap::new();
        for class in Class::ALL_MANAGED {
            let mut row = [0u64; 3];
            for (o, slot) in row.iter_mut().enumerate() {
                let i = class as u32 * outcome::COUNT + o as u32;
                *slot = arr.get(&i, 0)?.iter().sum();
            }
            if row != [0; 3] {
                out.insert(class, row);
            }
        }
        Ok(out)
    }

    /// Alerts suppressed by the in-kernel rate limit since the agent started, per what they
    /// would have said.
    pub fn suppressed(&mut self) -> Result<BTreeMap<SuppressKey, u64>> {
        let h: PerCpuHashMap<&mut MapData, SuppressKey, u64> =
            PerCpuHashMap::try_from(self.map(m::MAP_SUPPRESSED)?)?;
        let mut out = BTreeMap::new();
        for k in h.keys() {
            let k = k?;
            if let Ok(values) = h.get(&k, 0) {
                out.insert(k, values.iter().sum());
            }
        }
        Ok(out)
    }
}

/// Decisions of one (class, outcome), summed over CPUs, for the metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecisionCount {
    pub class: icmp_guard_common::Class,
    /// Allow: let through without an alert; Audit: let through with one (an Audit rule or
    /// posture, or a Block in audit mode); Block: refused.
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

    /// Every (class, outcome) of [`Enforcer::decisions`], as metric samples.
    pub fn all(decisions: &BTreeMap<Class, [u64; 3]>) -> Vec<DecisionCount> {
        use icmp_guard_common::maps::Action;
        decisions
            .iter()
            .flat_map(|(class, row)| {
                [Action::Allow, Action::Audit, Action::Block]
                    .into_iter()
                    .zip(row)
                    .map(|(action, &count)| DecisionCount {
                        class: *class,
                        action,
                        count,
                    })
            })
            .collect()
    }
}

/// What brings a kernel map from `held` to `target`: the keys that went, then the entries that
/// are new or changed.
#[allow(clippy::type_complexity)]
fn diff<'a, K: Ord, V: PartialEq + Copy>(
    held: &'a BTreeMap<K, V>,
    target: &'a BTreeMap<K, V>,
) -> (Vec<&'a K>, Vec<(&'a K, V)>) {
    let gone = held.keys().filter(|k| !target.contains_key(k)).collect();
    let changed = target
        .iter()
        .filter(|(k, v)| held.get(k) != Some(v))
        .map(|(k, v)| (k, *v))
        .collect();
    (gone, changed)
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
    pub lease_lapsed: u64,
}

/// Loads (without attaching) the LSM program: the only reliable test of whether this kernel
/// accepts LSM programs.
///
/// The real offsets matter: they sit in frozen `.rodata`, so with zeroed ones the verifier would
/// drop everything behind the validity check and accept a program it would refuse in earnest.
pub fn probe_lsm() -> Result<()> {
    let btf = Btf::from_sys_fs().context("reading /sys/kernel/btf/vmlinux")?;
    let offsets = crate::kernel::offsets::from_running_kernel()?;
    let mut ebpf = load_object(&offsets, None)?;
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

#[cfg(test)]
mod tests {
    use aya_obj::ProgramSection;

    /// The agent attaches nothing that runs for a syscall it does not decide: its object holds
    /// the two socket hooks and their alert stages, and no tracepoint, kprobe or other
    /// machine-wide program.
    #[test]
    fn the_object_holds_only_socket_hooks() {
        let obj = aya_obj::Object::parse(super::OBJECT).expect("the embedded object parses");
        let mut names: Vec<&str> = obj.programs.keys().map(String::as_str).collect();
        names.sort();
        for (name, p) in &obj.programs {
            assert!(
                matches!(
                    p.section,
                    ProgramSection::Lsm { .. } | ProgramSection::CgroupSock { .. }
                ),
                "{name} is a {:?} program",
                p.section
            );
        }
        let mut expected: Vec<&str> = super::LSM_PROGRAMS
            .iter()
            .chain(super::CGROUP_PROGRAMS.iter())
            .copied()
            .collect();
        expected.sort();
        assert_eq!(names, expected);
    }
}
