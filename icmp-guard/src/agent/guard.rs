//! The inbound ICMP guard's stages wired together, for `agent.rs`: compile the policy's
//! network rules for this node's interfaces, start the guard only when they ask for it, keep it
//! in step with policy and interface changes, read its alerts, write the per-second summaries,
//! and stop it (every program detached) at the end.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use anyhow::{Result, anyhow};
use log::{error, info, warn};
use tokio::{io::unix::AsyncFd, task::JoinHandle};

use crate::{
    compile::guard::{self as compile_guard, GuardCompiled, GuardInput},
    events::guard::{self as guard_events, GuardContext},
    kernel::guard::{Counters, Guard},
    outputs::Outputs,
    sources::{config::GuardConfig, interfaces, policy::PolicySet},
};

/// What compiling the guard needs besides the policies.
#[derive(Clone)]
pub struct GuardSetup {
    pub config: GuardConfig,
    pub node_labels: BTreeMap<String, String>,
    pub audit_only: bool,
}

/// The guard's entries for this node and its interfaces as they are now; `None`: the guard is
/// off.
pub fn compile(set: &PolicySet, setup: &GuardSetup) -> Result<Option<GuardCompiled>> {
    if set.network.is_empty() {
        return Ok(None);
    }
    let ifaces = interfaces::list()?;
    compile_guard::compile(&GuardInput {
        policies: &set.network,
        node_labels: &setup.node_labels,
        interfaces: &ifaces,
        config: &setup.config,
        audit_only: setup.audit_only,
    })
}

fn describe_family(a: Option<icmp_guard_common::maps::Action>) -> String {
    use icmp_guard_common::maps::Action;
    match a {
        None => "not guarded".into(),
        Some(Action::Allow) => "rules only, no allow-list".into(),
        Some(Action::Audit) => "allow-list, others audited".into(),
        Some(Action::Block) => "allow-list, others blocked".into(),
    }
}

/// Installs `compiled` into `guard` and logs where and how it holds each interface.
fn apply_logged(guard: &mut Guard, compiled: &GuardCompiled) -> Result<()> {
    for (name, origin) in &compiled.missing {
        warn!(
            "{origin}: interface {name} does not exist on this node; the guard holds it as soon \
             as it appears"
        );
    }
    let reports = guard.apply(compiled)?;
    for r in reports {
        let gi = compiled.interfaces.iter().find(|i| i.name == r.name);
        info!(
            "inbound ICMP guard on {}: {} (ICMP: {}; ICMPv6: {}){}",
            r.name,
            r.mode.describe(),
            describe_family(gi.and_then(|g| g.v4)),
            describe_family(gi.and_then(|g| g.v6)),
            if r.refused.is_empty() {
                String::new()
            } else {
                format!("; refused first: {}", r.refused.join("; "))
            }
        );
    }
    Ok(())
}

/// Loads the guard and applies `compiled`: the agent calls this before it announces that it
/// enforces.
pub fn start(compiled: &GuardCompiled, config: &GuardConfig) -> Result<Guard> {
    let mut guard = Guard::load(config)?;
    guard.load_programs()?;
    apply_logged(&mut guard, compiled)?;
    Ok(guard)
}

struct State {
    guard: Option<Guard>,
    reader: Option<JoinHandle<()>>,
    /// Counters when the last summary was written.
    counters: Counters,
    last_summary: Instant,
    compiled: Option<GuardCompiled>,
}

pub struct GuardService {
    state: Mutex<State>,
    context: RwLock<GuardContext>,
    setup: GuardSetup,
}

impl GuardService {
    pub fn new(
        guard: Option<Guard>,
        compiled: Option<GuardCompiled>,
        context: GuardContext,
        setup: GuardSetup,
    ) -> Arc<Self> {
        let service = Arc::new(GuardService {
            state: Mutex::new(State {
                guard: None,
                reader: None,
                counters: [0; icmp_guard_common::guard::counter::COUNT as usize],
                last_summary: Instant::now(),
                compiled: None,
            }),
            context: RwLock::new(context),
            setup,
        });
        {
            let mut st = service.state.lock().expect("guard state");
            st.guard = guard;
            st.compiled = compiled;
            service.refresh_context(&st);
        }
        service
    }

    /// What compiling the guard needs besides the policies.
    pub fn setup(&self) -> &GuardSetup {
        &self.setup
    }

    pub fn running(&self) -> bool {
        self.state.lock().expect("guard state").guard.is_some()
    }

    fn refresh_context(&self, st: &State) {
        let mut ctx = self.context.write().expect("guard context");
        if let (Some(g), Some(c)) = (&st.guard, &st.compiled) {
            ctx.rules[g.active_generation() as usize] = Arc::new(c.rules.clone());
            ctx.interfaces = g
                .attachments()
                .into_iter()
                .map(|(i, n, m)| (i, (n, m)))
                .collect();
        }
    }

    /// Starts reading the running guard's alerts (inside the runtime).
    pub fn spawn_reader(self: &Arc<Self>, outputs: Arc<Outputs>) {
        let mut st = self.state.lock().expect("guard state");
        let Some(guard) = st.guard.as_mut() else {
            return;
        };
        let events = match guard.take_events() {
            Ok(e) => e,
            Err(e) => {
                error!("guard alerts cannot be read: {e:#}");
                return;
            }
        };
        let service = self.clone();
        st.reader = Some(tokio::spawn(async move {
            // SAFETY: the ring buffer owns its fd and lives as long as the registration.
            let mut fd = match unsafe {
                AsyncFd::register_with_interest(events, tokio::io::Interest::READABLE)
            } {
                Ok(fd) => fd,
                Err(e) => {
                    error!("registering the guard's ring buffer with tokio: {e}");
                    return;
                }
            };
            loop {
                let Ok(mut ready) = fd.readable_mut().await else {
                    return;
                };
                let rb = ready.get_inner_mut();
                while let Some(item) = rb.next() {
                    let Some(ev) = guard_events::decode(&item) else {
                        warn!("guard record of {} bytes is too short; skipped", item.len());
                        continue;
                    };
                    let alert = service.context.read().expect("guard context").alert(&ev);
                    outputs.offer(alert);
                }
                ready.clear_ready();
            }
        }));
    }

    /// Writes the summary of the interval since the last one (blocking: flips the epoch and
    /// waits for it to settle).
    pub async fn summarize(self: &Arc<Self>, outputs: &Outputs) {
        let service = self.clone();
        let summary = tokio::task::spawn_blocking(move || -> Result<Option<_>> {
            let mut st = service.state.lock().expect("guard state");
            let Some(guard) = st.guard.as_mut() else {
                return Ok(None);
            };
            let snapshot = guard.take_source_counts()?;
            let counters = guard.counters()?;
            let mut delta = counters;
            for (d, before) in delta.iter_mut().zip(st.counters.iter()) {
                *d = d.saturating_sub(*before);
            }
            st.counters = counters;
            let interval = st.last_summary.elapsed();
            st.last_summary = Instant::now();
            Ok(service
                .context
                .read()
                .expect("guard context")
                .summary(&snapshot, &delta, interval))
        })
        .await;
        match summary {
            Ok(Ok(Some(alert))) => outputs.announce(alert).await,
            Ok(Ok(None)) => {}
            Ok(Err(e)) => error!("guard summary failed: {e:#}"),
            Err(e) => error!("guard summary task failed: {e}"),
        }
    }

    /// Brings the guard in step with `compiled`: starts it, re-applies it, or stops it. Called on
    /// every policy reload and whenever the interfaces change.
    pub async fn apply(self: &Arc<Self>, compiled: Option<GuardCompiled>, outputs: Arc<Outputs>) {
        let was_running = self.running();
        if compiled.is_none() {
            if was_running {
                self.stop(&outputs).await;
                info!(
                    "inbound ICMP guard stopped: no KubeArmorNetworkPolicy ICMP rule selects this node"
                );
            }
            return;
        }
        // A fresh summary interval per guard instance.
        if !was_running {
            self.state.lock().expect("guard state").counters =
                [0; icmp_guard_common::guard::counter::COUNT as usize];
        }
        let service = self.clone();
        let config = self.setup.config;
        let result = tokio::task::spawn_blocking(move || -> Result<()> {
            let compiled = compiled.expect("checked above");
            let mut st = service.state.lock().expect("guard state");
            match st.guard.as_mut() {
                Some(g) => apply_logged(g, &compiled)?,
                None => st.guard = Some(start(&compiled, &config)?),
            }
            st.compiled = Some(compiled);
            service.refresh_context(&st);
            Ok(())
        })
        .await
        .map_err(|e| anyhow!("{e}"))
        .and_then(|r| r);
        match result {
            Ok(()) => {
                if !was_running && self.running() {
                    info!("inbound ICMP guard started");
                    self.spawn_reader(outputs);
                }
            }
            Err(e) => error!("inbound ICMP guard: {e:#}"),
        }
    }

    /// Whether the interfaces changed since the last apply in a way the guard must follow.
    pub fn interfaces_changed(&self, set: &PolicySet) -> Option<Result<Option<GuardCompiled>>> {
        let st = self.state.lock().expect("guard state");
        st.compiled.as_ref()?;
        let fresh = compile(set, &self.setup);
        match &fresh {
            Ok(Some(c)) if Some(c) == st.compiled.as_ref() => None,
            _ => Some(fresh),
        }
    }

    /// The last summary, then every program detached.
    pub async fn stop(self: &Arc<Self>, outputs: &Outputs) {
        if !self.running() {
            return;
        }
        self.summarize(outputs).await;
        let reader = self.state.lock().expect("guard state").reader.take();
        if let Some(r) = reader {
            // Awaited, so that the reader's hold on the outputs is gone when this returns.
            r.abort();
            let _ = r.await;
        }
        let mut st = self.state.lock().expect("guard state");
        if let Some(mut g) = st.guard.take() {
            if let Ok(c) = g.counters() {
                use icmp_guard_common::guard::{counter as k, reason};
                let sum = |base: u32| -> u64 {
                    (0..reason::COUNT as u32)
                        .map(|r| c[(base + r) as usize])
                        .sum()
                };
                info!(
                    "inbound ICMP guard stopped; kernel counters: passed {} (allowed {}, PMTUD {}, \
                     neighbour discovery {}, MLD {}, own replies {}, own errors {}, no allow-list \
                     {}, not guarded {}), dropped {}, audited {}, alerts sent {}, not sent {}; \
                     every guard program is detached",
                    [
                        k::PASS_ALLOWED,
                        k::PASS_PMTUD,
                        k::PASS_NDP,
                        k::PASS_MLD,
                        k::PASS_ECHO_REPLY,
                        k::PASS_OWN_ERROR,
                        k::PASS_UNLISTED,
                        k::PASS_UNGUARDED
                    ]
                    .iter()
                    .map(|i| c[*i as usize])
                    .sum::<u64>(),
                    c[k::PASS_ALLOWED as usize],
                    c[k::PASS_PMTUD as usize],
                    c[k::PASS_NDP as usize],
                    c[k::PASS_MLD as usize],
                    c[k::PASS_ECHO_REPLY as usize],
                    c[k::PASS_OWN_ERROR as usize],
                    c[k::PASS_UNLISTED as usize],
                    c[k::PASS_UNGUARDED as usize],
                    sum(k::DROP_BASE),
                    sum(k::AUDIT_BASE),
                    c[k::ALERTS_SENT as usize],
                    c[k::ALERTS_SUPPRESSED as usize],
                );
            }
            drop(g);
        }
        st.compiled = None;
    }
}

/// How often the interfaces are re-read for rules that name none (new interfaces get guarded).
pub const INTERFACE_POLL: Duration = Duration::from_secs(1);
