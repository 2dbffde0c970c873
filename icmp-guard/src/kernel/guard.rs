//! The inbound ICMP guard in the kernel: its own object (`icmp-guard-guard`), loaded only when a
//! policy turns the guard on, its programs attached to the guarded interfaces, and its maps fed
//! with compiled policy.
//!
//! Per interface: `guard_xdp` in native mode where the driver has it (the multi-buffer variant
//! when the MTU needs it), generic XDP otherwise, TC ingress where XDP cannot attach at all (for
//! example another program holds the XDP hook); and always `guard_tc_egress`, which records the
//! node's own flows. Links are owned by this process and never pinned: stopping the agent
//! detaches everything, so a clean stop is always a way back.
//!
//! Policy updates are atomic like the socket maps': every entry carries a generation, the
//! inactive generation is written in full, then one array slot flips.

use std::{
    collections::{BTreeMap, HashMap as StdHashMap},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow};
use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, MapData, PerCpuArray, PerCpuHashMap, PerCpuValues, RingBuf,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{
        SchedClassifier, TcAttachType, TestRun, TestRunOptions, Xdp, XdpMode,
        tc::{self, SchedClassifierLinkId},
        xdp::XdpLinkId,
    },
    util::KernelVersion,
};
use icmp_guard_common::guard::{
    self as g, GuardSettings, GuardVerdict, SOURCE_KEY_FIXED_BITS, SourceCount, SourceCountKey,
    SourceEntry, SourceKeyV4, SourceKeyV6, SourceOther, VerdictKey, counter,
};

use crate::{
    compile::guard::{GuardCompiled, GuardedInterface},
    kernel::enforcer::short_error,
    sources::{
        config::{GuardAttach, GuardConfig},
        policy::network::Family,
    },
};

/// The guard object built by build.rs from `icmp-guard-ebpf/src/guard`.
static OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/icmp-guard-guard.bpf.o"));

/// As for the socket maps: a generation is rewritten only after it has been inactive this long.
const GENERATION_QUIESCENCE: Duration = Duration::from_secs(1);
/// After the summary epoch flips, how long before the old epoch's counts are read: a program run
/// that read the old epoch takes microseconds.
const EPOCH_QUIESCENCE: Duration = Duration::from_millis(20);

/// How the guard holds one interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum AttachMode {
    Native,
    /// Native, with the multi-buffer (`xdp.frags`) program: the MTU does not fit one page.
    NativeFrags,
    Generic,
    Tc,
}

impl AttachMode {
    pub fn describe(self) -> &'static str {
        match self {
            AttachMode::Native => "native XDP",
            AttachMode::NativeFrags => "native XDP (multi-buffer, for the MTU)",
            AttachMode::Generic => "generic XDP",
            AttachMode::Tc => "TC ingress",
        }
    }

    /// The `Enforcer` of alerts.
    pub fn enforcer(self) -> &'static str {
        match self {
            AttachMode::Tc => "TC",
            _ => "XDP",
        }
    }
}

struct Attachment {
    name: String,
    mode: AttachMode,
    xdp: Option<(&'static str, XdpLinkId)>,
    tc_ingress: Option<SchedClassifierLinkId>,
    tc_egress: SchedClassifierLinkId,
}

/// What happened to one interface during an apply, for the log.
#[derive(Clone, Debug)]
pub struct AttachReport {
    pub name: String,
    pub mode: AttachMode,
    /// Modes tried first and why they were refused.
    pub refused: Vec<String>,
}

pub struct Guard {
    ebpf: Ebpf,
    choice: GuardAttach,
    /// Alerts per second: the credit the kernel spends, refilled at every summary.
    alerts_per_second: u32,
    active: Option<u32>,
    last_flip: Option<Instant>,
    attached: BTreeMap<u32, Attachment>,
    epoch: u32,
}

/// Dropped and audited packets of one interval, per source, and of sources that did not fit.
#[derive(Clone, Debug, Default)]
pub struct SourceSnapshot {
    pub sources: Vec<(Family, [u8; 16], SourceCount)>,
    pub other: SourceCount,
}

pub type Counters = [u64; counter::COUNT as usize];

/// The kernel's refusal of a program: the first line for the operator, the verifier's last
/// lines in the debug log.
fn refused(name: &str, e: &aya::programs::ProgramError) -> anyhow::Error {
    if let aya::programs::ProgramError::LoadError { verifier_log, .. } = e {
        let text = verifier_log.to_string();
        let lines: Vec<&str> = text.lines().collect();
        log::debug!(
            "verifier log of {name} (last lines):\n{}",
            lines[lines.len().saturating_sub(40)..].join("\n")
        );
    }
    anyhow!("the kernel refused {name}: {}", short_error(e))
}

fn load_object() -> Result<Ebpf> {
    EbpfLoader::new()
        .load(OBJECT)
        .context("loading the guard's kernel object (maps and programs)")
}

impl Guard {
    /// Loads the object and its maps; attaches nothing until [`Guard::apply`].
    pub fn load(config: &GuardConfig) -> Result<Self> {
        crate::kernel::enforcer::check_root()?;
        let mut guard = Guard {
            ebpf: load_object()?,
            choice: config.attach,
            alerts_per_second: config.alerts_per_second,
            active: None,
            last_flip: None,
            attached: BTreeMap::new(),
            epoch: 0,
        };
        guard.refill_alerts()?;
        Ok(guard)
    }

    /// Gives the kernel this second's alerts to spend.
    fn refill_alerts(&mut self) -> Result<()> {
        let credit = self.alerts_per_second as u64;
        let mut arr: Array<&mut MapData, u64> =
            Array::try_from(self.map(g::MAP_GUARD_ALERT_CREDIT)?)?;
        arr.set(0, credit, 0)?;
        Ok(())
    }

    fn map(&mut self, name: &str) -> Result<&mut aya::maps::Map> {
        self.ebpf
            .map_mut(name)
            .ok_or_else(|| anyhow!("guard object has no map {name}"))
    }

    fn xdp(&mut self, name: &str) -> Result<&mut Xdp> {
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("guard object has no program {name}"))?
            .try_into()?;
        if prog.fd().is_err() {
            prog.load().map_err(|e| refused(name, &e))?;
        }
        Ok(prog)
    }

    fn classifier(&mut self, name: &str) -> Result<&mut SchedClassifier> {
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("guard object has no program {name}"))?
            .try_into()?;
        if prog.fd().is_err() {
            prog.load().map_err(|e| refused(name, &e))?;
        }
        Ok(prog)
    }

    /// Loads every program the configured attach mode may need, so a verifier refusal shows at
    /// start rather than at the first interface.
    pub fn load_programs(&mut self) -> Result<()> {
        self.classifier(g::PROG_TC_EGRESS)?;
        match self.choice {
            GuardAttach::Tc => {
                self.classifier(g::PROG_TC_INGRESS)?;
            }
            _ => {
                self.xdp(g::PROG_XDP)?;
            }
        }
        Ok(())
    }

    fn attach_tc(
        &mut self,
        prog: &str,
        iface: &str,
        ty: TcAttachType,
    ) -> Result<SchedClassifierLinkId> {
        // Before 6.6 there is no TCX: the program goes through a clsact qdisc, added if missing
        // (and left in place at stop, since other filters may hang off it).
        let tcx = KernelVersion::current()
            .map(|v| v >= KernelVersion::new(6, 6, 0))
            .unwrap_or(false);
        if !tcx {
            let _ = tc::qdisc_add_clsact(iface);
        }
        let p = self.classifier(prog)?;
        p.attach(iface, ty)
            .with_context(|| format!("attaching {prog} to {iface}"))
    }

    fn attach_xdp(
        &mut self,
        prog: &'static str,
        iface: &str,
        mode: XdpMode,
    ) -> Result<(&'static str, XdpLinkId)> {
        let p = self.xdp(prog)?;
        let id = p
            .attach(iface, mode)
            .map_err(|e| anyhow!("{}", short_error(&e)))?;
        Ok((prog, id))
    }

    /// Attaches the ingress program to one interface in the configured mode, falling back as
    /// `auto` allows; the egress recorder is attached first so that replies to what the node
    /// sends from now on are recognised.
    fn attach_interface(&mut self, gi: &GuardedInterface) -> Result<AttachReport> {
        let iface = gi.name.as_str();
        let tc_egress = self.attach_tc(g::PROG_TC_EGRESS, iface, TcAttachType::Egress)?;
        let mut refused = Vec::new();
        let mut chosen = None;
        let choice = self.choice;
        if matches!(choice, GuardAttach::Auto | GuardAttach::Native) {
            for (prog, mode) in [
                (g::PROG_XDP, AttachMode::Native),
                (g::PROG_XDP_FRAGS, AttachMode::NativeFrags),
            ] {
                match self.attach_xdp(prog, iface, XdpMode::Driver) {
                    Ok(link) => {
                        chosen = Some((mode, Some(link), None));
                        break;
                    }
                    Err(e) => refused.push(format!("{}: {e:#}", mode.describe())),
                }
            }
        }
        if chosen.is_none() && matches!(choice, GuardAttach::Auto | GuardAttach::Generic) {
            match self.attach_xdp(g::PROG_XDP, iface, XdpMode::Skb) {
                Ok(link) => chosen = Some((AttachMode::Generic, Some(link), None)),
                Err(e) => refused.push(format!("generic XDP: {e:#}")),
            }
        }
        if chosen.is_none() && matches!(choice, GuardAttach::Auto | GuardAttach::Tc) {
            match self.attach_tc(g::PROG_TC_INGRESS, iface, TcAttachType::Ingress) {
                Ok(link) => chosen = Some((AttachMode::Tc, None, Some(link))),
                Err(e) => refused.push(format!("TC ingress: {e:#}")),
            }
        }
        let Some((mode, xdp, tc_ingress)) = chosen else {
            let _ = self.classifier(g::PROG_TC_EGRESS)?.detach(tc_egress);
            return Err(anyhow!(
                "cannot attach the guard to {iface} (attach: {}): {}",
                choice.as_str(),
                refused.join("; ")
            ));
        };
        self.attached.insert(
            gi.ifindex,
            Attachment {
                name: gi.name.clone(),
                mode,
                xdp,
                tc_ingress,
                tc_egress,
            },
        );
        Ok(AttachReport {
            name: gi.name.clone(),
            mode,
            refused,
        })
    }

    fn detach_interface(&mut self, ifindex: u32) -> Result<()> {
        let Some(a) = self.attached.remove(&ifindex) else {
            return Ok(());
        };
        if let Some((prog, id)) = a.xdp {
            self.xdp(prog)?.detach(id)?;
        }
        if let Some(id) = a.tc_ingress {
            self.classifier(g::PROG_TC_INGRESS)?.detach(id)?;
        }
        self.classifier(g::PROG_TC_EGRESS)?.detach(a.tc_egress)?;
        Ok(())
    }

    /// Installs `compiled` atomically, then attaches to interfaces that became guarded and
    /// detaches from those that no longer are. Returns what happened to each newly attached
    /// interface; an interface that cannot be attached is an error (the policy is in force on
    /// the others).
    pub fn apply(&mut self, compiled: &GuardCompiled) -> Result<Vec<AttachReport>> {
        self.install(compiled)?;
        self.follow_interfaces(compiled)
    }

    /// Writes `compiled` into the inactive generation and flips to it; attaches nothing.
    pub fn install(&mut self, compiled: &GuardCompiled) -> Result<()> {
        let next = self.active.map_or(0, |g| g ^ 1);
        if let Some(t) = self.last_flip {
            let since = t.elapsed();
            if since < GENERATION_QUIESCENCE {
                std::thread::sleep(GENERATION_QUIESCENCE - since);
            }
        }
        self.clear_generation(next)?;
        if let Err(e) = self.write_generation(next, compiled) {
            let _ = self.clear_generation(next);
            return Err(e.context("the new guard policy was not applied; the previous one stays"));
        }
        let mut active: Array<&mut MapData, u32> = Array::try_from(self.map(g::MAP_GUARD_ACTIVE)?)?;
        active.set(0, next, 0)?;
        self.active = Some(next);
        self.last_flip = Some(Instant::now());
        Ok(())
    }

    fn follow_interfaces(&mut self, compiled: &GuardCompiled) -> Result<Vec<AttachReport>> {
        let wanted: BTreeMap<u32, &GuardedInterface> =
            compiled.interfaces.iter().map(|i| (i.ifindex, i)).collect();
        let stale: Vec<u32> = self
            .attached
            .keys()
            .filter(|i| !wanted.contains_key(i))
            .copied()
            .collect();
        for ifindex in stale {
            self.detach_interface(ifindex)?;
        }
        let mut reports = Vec::new();
        let mut failures = Vec::new();
        for (ifindex, gi) in wanted {
            if self.attached.contains_key(&ifindex) {
                continue;
            }
            match self.attach_interface(gi) {
                Ok(r) => reports.push(r),
                Err(e) => failures.push(format!("{e:#}")),
            }
        }
        if !failures.is_empty() {
            return Err(anyhow!("{}", failures.join("\n")));
        }
        Ok(reports)
    }

    fn write_generation(&mut self, generation: u32, c: &GuardCompiled) -> Result<()> {
        {
            let mut settings: Array<&mut MapData, GuardSettings> =
                Array::try_from(self.map(g::MAP_GUARD_SETTINGS)?)?;
            settings.set(generation, c.settings, 0)?;
        }
        for s in &c.sources {
            let prefix_len = SOURCE_KEY_FIXED_BITS + s.cidr.prefix as u32;
            let octets = s.cidr.octets();
            if octets.len() == 4 {
                let mut trie: LpmTrie<&mut MapData, SourceKeyV4, SourceEntry> =
                    LpmTrie::try_from(self.map(g::MAP_GUARD_SOURCES_V4)?)?;
                let key = SourceKeyV4 {
                    generation,
                    ifindex: s.ifindex,
                    addr: [octets[0], octets[1], octets[2], octets[3]],
                };
                trie.insert(&Key::new(prefix_len, key), s.entry, 0)
                    .with_context(|| format!("inserting guard prefix {}", s.cidr))?;
            } else {
                let mut trie: LpmTrie<&mut MapData, SourceKeyV6, SourceEntry> =
                    LpmTrie::try_from(self.map(g::MAP_GUARD_SOURCES_V6)?)?;
                let mut addr = [0u8; 16];
                addr.copy_from_slice(&octets);
                let key = SourceKeyV6 {
                    generation,
                    ifindex: s.ifindex,
                    addr,
                };
                trie.insert(&Key::new(prefix_len, key), s.entry, 0)
                    .with_context(|| format!("inserting guard prefix {}", s.cidr))?;
            }
        }
        let mut verdicts: HashMap<&mut MapData, VerdictKey, GuardVerdict> =
            HashMap::try_from(self.map(g::MAP_GUARD_VERDICTS)?)?;
        for (&(class, icmp_type, icmp_code), v) in &c.verdicts {
            let key = VerdictKey {
                generation,
                class,
                icmp_type,
                icmp_code,
            };
            verdicts.insert(key, *v, 0)?;
        }
        Ok(())
    }

    fn clear_generation(&mut self, generation: u32) -> Result<()> {
        {
            let mut trie: LpmTrie<&mut MapData, SourceKeyV4, SourceEntry> =
                LpmTrie::try_from(self.map(g::MAP_GUARD_SOURCES_V4)?)?;
            let stale: Vec<Key<SourceKeyV4>> = trie
                .keys()
                .filter_map(|k| k.ok())
                .filter(|k| k.data().generation == generation)
                .collect();
            for k in stale {
                trie.remove(&k)?;
            }
        }
        {
            let mut trie: LpmTrie<&mut MapData, SourceKeyV6, SourceEntry> =
                LpmTrie::try_from(self.map(g::MAP_GUARD_SOURCES_V6)?)?;
            let stale: Vec<Key<SourceKeyV6>> = trie
                .keys()
                .filter_map(|k| k.ok())
                .filter(|k| k.data().generation == generation)
                .collect();
            for k in stale {
                trie.remove(&k)?;
            }
        }
        let mut verdicts: HashMap<&mut MapData, VerdictKey, GuardVerdict> =
            HashMap::try_from(self.map(g::MAP_GUARD_VERDICTS)?)?;
        let stale: Vec<VerdictKey> = verdicts
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| k.generation == generation)
            .collect();
        for k in stale {
            verdicts.remove(&k)?;
        }
        Ok(())
    }

    pub fn active_generation(&self) -> u32 {
        self.active.unwrap_or(0)
    }

    /// (ifindex, name, mode) of every attached interface.
    pub fn attachments(&self) -> Vec<(u32, String, AttachMode)> {
        self.attached
            .iter()
            .map(|(i, a)| (*i, a.name.clone(), a.mode))
            .collect()
    }

    /// Every counter, summed over CPUs.
    pub fn counters(&mut self) -> Result<Counters> {
        let arr: PerCpuArray<&mut MapData, u64> =
            PerCpuArray::try_from(self.map(g::MAP_GUARD_COUNTERS)?)?;
        let mut out = [0u64; counter::COUNT as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            *slot = arr.get(&(i as u32), 0)?.iter().sum();
        }
        Ok(out)
    }

    /// Flips the summary epoch and returns (and clears) what the previous epoch counted.
    pub fn take_source_counts(&mut self) -> Result<SourceSnapshot> {
        let old = self.epoch;
        let new = old ^ 1;
        {
            let mut epoch: Array<&mut MapData, u32> =
                Array::try_from(self.map(g::MAP_GUARD_EPOCH)?)?;
            epoch.set(0, new, 0)?;
        }
        self.epoch = new;
        self.refill_alerts()?;
        std::thread::sleep(EPOCH_QUIESCENCE);
        let mut snap = SourceSnapshot::default();
        {
            let mut counts: PerCpuHashMap<&mut MapData, SourceCountKey, SourceCount> =
                PerCpuHashMap::try_from(self.map(g::MAP_GUARD_SOURCE_COUNTS)?)?;
            let keys: Vec<SourceCountKey> = counts
                .keys()
                .filter_map(|k| k.ok())
                .filter(|k| k.epoch as u32 == old)
                .collect();
            for k in keys {
                if let Ok(values) = counts.get(&k, 0) {
                    let sum = values
                        .iter()
                        .fold(SourceCount::default(), |a, v| SourceCount {
                            dropped: a.dropped + v.dropped,
                            audited: a.audited + v.audited,
                        });
                    let family = if k.family == 4 {
                        Family::V4
                    } else {
                        Family::V6
                    };
                    snap.sources.push((family, k.addr, sum));
                }
                counts.remove(&k)?;
            }
        }
        let mut other: PerCpuArray<&mut MapData, SourceOther> =
            PerCpuArray::try_from(self.map(g::MAP_GUARD_SOURCE_OTHER)?)?;
        let values = other.get(&old, 0)?;
        for v in values.iter() {
            snap.other.dropped += v.dropped;
            snap.other.audited += v.audited;
        }
        let cpus = values.iter().count();
        other.set(
            old,
            PerCpuValues::try_from(vec![SourceOther::default(); cpus])?,
            0,
        )?;
        Ok(snap)
    }

    /// The alert ring buffer (can be taken once).
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>> {
        let map = self
            .ebpf
            .take_map(g::MAP_GUARD_EVENTS)
            .ok_or_else(|| anyhow!("guard events ring buffer already taken"))?;
        Ok(RingBuf::try_from(map)?)
    }

    /// Runs the ingress XDP program on one frame as if it arrived on `ifindex`
    /// (`BPF_PROG_TEST_RUN`): the program's return value and its mean time per run.
    pub fn test_run_xdp(
        &mut self,
        frame: &[u8],
        ifindex: u32,
        repeat: u32,
    ) -> Result<(u32, Duration)> {
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
        // egress_ifindex.
        let md: [u32; 6] = [0, frame.len() as u32, 0, ifindex, 0, 0];
        let ctx: Vec<u8> = md.iter().flat_map(|v| v.to_ne_bytes()).collect();
        let prog = self.xdp(g::PROG_XDP)?;
        let r = prog.test_run(TestRunOptions {
            data_in: Some(frame),
            ctx_in: Some(&ctx),
            repeat,
            ..Default::default()
        })?;
        Ok((r.return_value, r.duration))
    }

    /// Runs a TC program on one frame (`BPF_PROG_TEST_RUN`).
    pub fn test_run_tc(
        &mut self,
        egress: bool,
        frame: &[u8],
        repeat: u32,
    ) -> Result<(u32, Duration)> {
        let name = if egress {
            g::PROG_TC_EGRESS
        } else {
            g::PROG_TC_INGRESS
        };
        let prog = self.classifier(name)?;
        let r = prog.test_run(TestRunOptions {
            data_in: Some(frame),
            repeat,
            ..Default::default()
        })?;
        Ok((r.return_value, r.duration))
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let ifindexes: Vec<u32> = self.attached.keys().copied().collect();
        for i in ifindexes {
            let _ = self.detach_interface(i);
        }
    }
}

/// For `probe`: whether each interface takes the guard in native mode, found by attaching the
/// guard (with no policy in its maps, so it passes every packet) and detaching it at once.
/// Some drivers reset their queues when an XDP program attaches; `probe` says so.
pub fn probe_native(ifaces: &[String]) -> Result<StdHashMap<String, Result<AttachMode, String>>> {
    let mut guard = Guard::load(&GuardConfig {
        attach: GuardAttach::Native,
        ..GuardConfig::default()
    })?;
    let mut out = StdHashMap::new();
    for iface in ifaces {
        let mut refused = Vec::new();
        let mut result = Err(String::new());
        for (prog, mode) in [
            (g::PROG_XDP, AttachMode::Native),
            (g::PROG_XDP_FRAGS, AttachMode::NativeFrags),
        ] {
            match guard.attach_xdp(prog, iface, XdpMode::Driver) {
                Ok((prog, id)) => {
                    guard.xdp(prog)?.detach(id)?;
                    result = Ok(mode);
                    break;
                }
                Err(e) => refused.push(format!("{e:#}")),
            }
        }
        if result.is_err() {
            result = Err(refused.join("; "));
        }
        out.insert(iface.clone(), result);
    }
    Ok(out)
}
