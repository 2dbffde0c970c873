//! Prometheus metrics at `http://ADDR/metrics` (`--metrics ADDR`), with `prometheus-client`.
//!
//! Nothing is counted twice: every figure is read at scrape time from where it is kept (the
//! kernel's per-CPU counters, the outputs' own counters, the gRPC hub), by one [`Collector`] per
//! source. Adding a source is one `register_collector` line in [`registry`].

use std::{
    convert::Infallible,
    fmt::Write as _,
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
};

use anyhow::{Context, Result};
use http_body_util::Full;
use hyper::{Request, Response, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use log::{info, warn};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};
use tokio::sync::oneshot;

use super::{
    AgentView,
    grpc::hub::{self, Hub},
    jsonl,
};
use crate::kernel::enforcer::{Counters, DecisionCount};

/// The agent's state as metrics report it, read at each scrape through [`AgentView::snapshot`].
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// `lsm` or `cgroup`.
    pub enforcer: &'static str,
    /// The kernel's counters; `None` if reading them failed (reported in the log).
    pub counters: Option<Counters>,
    /// Decisions per (class, action) as the kernel counts them; `None` while the kernel object
    /// does not count them (see `Enforcer::decisions`).
    pub decisions: Option<Vec<DecisionCount>>,
    /// Alerts suppressed by the in-kernel rate limit, per workload name (`host` for the node).
    pub suppressed: Vec<(String, u64)>,
    pub reloads_applied: u64,
    pub reloads_refused: u64,
    /// Policy rules in force, and workloads known.
    pub rules: usize,
    pub workloads: usize,
}

type Labels<'a> = Vec<(&'static str, &'a str)>;

/// One metric family of constant samples.
fn family<'l>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    samples: impl IntoIterator<Item = (Labels<'l>, u64)>,
) -> std::fmt::Result {
    fn encode(kind: MetricType, sample: MetricEncoder, v: u64) -> std::fmt::Result {
        match kind {
            MetricType::Counter => ConstCounter::new(v).encode(sample),
            _ => ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX)).encode(sample),
        }
    }
    let mut m = enc.encode_descriptor(name, help, None, kind)?;
    let samples: Vec<_> = samples.into_iter().collect();
    if let [(labels, v)] = samples.as_slice()
        && labels.is_empty()
    {
        // A single sample without labels is written as `name value`, not `name{} value`.
        return encode(kind, m, *v);
    }
    for (labels, v) in &samples {
        encode(kind, m.encode_family(labels)?, *v)?;
    }
    Ok(())
}

fn one<'l>(labels: Labels<'l>, v: u64) -> [(Labels<'l>, u64); 1] {
    [(labels, v)]
}

/// The kernel's counters, policy reloads, rules and workloads.
struct AgentCollector(Arc<dyn AgentView>);

impl std::fmt::Debug for AgentCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AgentCollector")
    }
}

impl Collector for AgentCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        use MetricType::{Counter, Gauge};
        let s = self.0.snapshot();
        let e = vec![("enforcer", s.enforcer)];
        if let Some(c) = s.counters {
            for (name, help, v) in [
                (
                    "icmp_guard_kernel_decisions",
                    "Sockets of a managed class in a workload with a policy, decided by the kernel",
                    c.decided,
                ),
                (
                    "icmp_guard_kernel_blocked",
                    "Sockets the kernel refused",
                    c.blocked,
                ),
                (
                    "icmp_guard_kernel_audited",
                    "Sockets the kernel let through with an alert (Audit, or Block in --mode audit)",
                    c.audited,
                ),
                (
                    "icmp_guard_kernel_identity_errors",
                    "Failed reads of kernel memory while identifying the caller's executable",
                    c.identity_errors,
                ),
            ] {
                family(&mut enc, name, help, Counter, one(e.clone(), v))?;
            }
            family(
                &mut enc,
                "icmp_guard_alerts_kernel_lost",
                "Alerts the kernel could not hand to the agent, by reason",
                Counter,
                [
                    (vec![("reason", "ringbuf_full")], c.ringbuf_full),
                    (vec![("reason", "suppression_map_full")], c.suppress_lost),
                    (vec![("reason", "capture_stage")], c.stage_errors),
                ],
            )?;
        }
        if let Some(decisions) = &s.decisions {
            family(
                &mut enc,
                "icmp_guard_decisions",
                "Kernel decisions by socket class and action",
                Counter,
                decisions.iter().map(|d| {
                    (
                        vec![
                            ("enforcer", s.enforcer),
                            ("class", d.class.name()),
                            ("action", d.action_name()),
                        ],
                        d.count,
                    )
                }),
            )?;
        }
        family(
            &mut enc,
            "icmp_guard_alerts_suppressed",
            "Alerts suppressed by the per-workload rate limit (alertsPerSecond), counted in the kernel",
            Counter,
            s.suppressed
                .iter()
                .map(|(w, n)| (vec![("workload", w.as_str())], *n)),
        )?;
        family(
            &mut enc,
            "icmp_guard_policy_reloads",
            "Policy changes applied, and refused (the previous policy stayed in force)",
            Counter,
            [
                (vec![("result", "applied")], s.reloads_applied),
                (vec![("result", "refused")], s.reloads_refused),
            ],
        )?;
        family(
            &mut enc,
            "icmp_guard_rules",
            "Policy rules in force",
            Gauge,
            one(vec![], s.rules as u64),
        )?;
        family(
            &mut enc,
            "icmp_guard_workloads",
            "Workloads known to the agent",
            Gauge,
            one(vec![], s.workloads as u64),
        )?;
        Ok(())
    }
}

/// The outputs: the JSON lines file, and the gRPC streams as a whole.
struct OutputCollector {
    jsonl: Arc<jsonl::Stats>,
    grpc: Option<Arc<Hub>>,
}

impl std::fmt::Debug for OutputCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OutputCollector")
    }
}

impl Collector for OutputCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        family(
            &mut enc,
            "icmp_guard_alerts_written",
            "Alerts and system events written to --output",
            MetricType::Counter,
            one(vec![], self.jsonl.written.load(Ordering::Relaxed)),
        )?;
        let grpc = self.grpc.as_ref().map(|h| h.totals());
        family(
            &mut enc,
            "icmp_guard_alerts_output_lost",
            "Alerts an output could not take, per output (grpc: every client since start, each \
             loss announced to its client)",
            MetricType::Counter,
            std::iter::once((
                vec![("output", "jsonl")],
                self.jsonl.dropped.load(Ordering::Relaxed),
            ))
            .chain(grpc.map(|t| (vec![("output", "grpc")], t.lost))),
        )?;
        if let Some(t) = grpc {
            family(
                &mut enc,
                "icmp_guard_grpc_alerts_sent",
                "Alerts sent on WatchAlerts streams, every client since start",
                MetricType::Counter,
                one(vec![], t.sent),
            )?;
        }
        Ok(())
    }
}

/// The gRPC clients.
struct GrpcCollector(Arc<Hub>);

impl std::fmt::Debug for GrpcCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GrpcCollector")
    }
}

impl Collector for GrpcCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        use MetricType::{Counter, Gauge};
        let clients = self.0.clients();
        let kinds = [
            hub::StreamKind::Alerts,
            hub::StreamKind::Logs,
            hub::StreamKind::Messages,
        ];
        family(
            &mut enc,
            "icmp_guard_grpc_streams",
            "Open feeder.LogService streams, by stream",
            Gauge,
            kinds.iter().map(|k| {
                (
                    vec![("stream", k.name())],
                    clients.iter().filter(|c| c.kind == *k).count() as u64,
                )
            }),
        )?;
        let ids: Vec<(String, &hub::Client)> = clients
            .iter()
            .filter(|c| c.kind == hub::StreamKind::Alerts)
            .map(|c| (c.id.to_string(), &**c))
            .collect();
        fn labels<'a>((id, c): &'a (String, &hub::Client)) -> Labels<'a> {
            vec![("client", id.as_str()), ("peer", c.peer.as_str())]
        }
        family(
            &mut enc,
            "icmp_guard_grpc_client_alerts_lost",
            "Alerts lost by one WatchAlerts client that did not keep up (announced to it)",
            Counter,
            ids.iter().map(|x| (labels(x), x.1.lost())),
        )?;
        family(
            &mut enc,
            "icmp_guard_grpc_client_alerts_sent",
            "Alerts sent to one WatchAlerts client",
            Counter,
            ids.iter().map(|x| (labels(x), x.1.sent())),
        )?;
        family(
            &mut enc,
            "icmp_guard_grpc_client_queued",
            "Alerts waiting in one WatchAlerts client's queue",
            Gauge,
            ids.iter().map(|x| (labels(x), x.1.queued() as u64)),
        )
    }
}

/// Version and kernel, as info metrics.
#[derive(Debug)]
struct BuildCollector {
    release: String,
}

impl Collector for BuildCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let m = enc.encode_descriptor(
            "icmp_guard_build",
            "The icmp-guard build (value 1)",
            None,
            MetricType::Info,
        )?;
        prometheus_client::metrics::info::Info::new(vec![("version", env!("CARGO_PKG_VERSION"))])
            .encode(m)?;
        let m = enc.encode_descriptor(
            "icmp_guard_kernel_release",
            "The running kernel (value 1)",
            None,
            MetricType::Info,
        )?;
        prometheus_client::metrics::info::Info::new(vec![("release", self.release.as_str())])
            .encode(m)
    }
}

/// Every source of metrics: the agent (kernel counters, reloads), the JSON lines output and, with
/// `--grpc`, the gRPC hub.
pub fn registry(
    agent: Arc<dyn AgentView>,
    jsonl: Arc<jsonl::Stats>,
    grpc: Option<Arc<Hub>>,
) -> Registry {
    let mut r = Registry::default();
    r.register_collector(Box::new(AgentCollector(agent)));
    r.register_collector(Box::new(OutputCollector {
        jsonl,
        grpc: grpc.clone(),
    }));
    if let Some(hub) = grpc {
        r.register_collector(Box::new(GrpcCollector(hub)));
    }
    r.register_collector(Box::new(BuildCollector {
        release: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_default(),
    }));
    r
}

/// The metrics listener, bound before the agent starts enforcing.
pub struct Bound(std::net::TcpListener);

pub fn bind(addr: Option<SocketAddr>) -> Result<Option<Bound>> {
    let Some(addr) = addr else { return Ok(None) };
    let l = std::net::TcpListener::bind(addr)
        .with_context(|| format!("listening for metrics on {addr} (is the port in use?)"))?;
    info!("Prometheus metrics at http://{}/metrics", l.local_addr()?);
    Ok(Some(Bound(l)))
}

/// OpenMetrics text, which Prometheus asks for by default and also reads as its text format.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

pub struct Running {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Bound {
    pub fn start(self, registry: Registry) -> Result<Running> {
        self.0.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(self.0)?;
        let registry = Arc::new(registry);
        let (stop, mut stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    _ = &mut stopped => return,
                    r = listener.accept() => match r {
                        Ok((s, _)) => s,
                        Err(e) => {
                            warn!("metrics: accepting a connection failed: {e}");
                            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                            continue;
                        }
                    },
                };
                let registry = registry.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                        let registry = registry.clone();
                        async move { Ok::<_, Infallible>(respond(&registry, req.uri().path())) }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Running { stop, task })
    }
}

fn respond(registry: &Registry, path: &str) -> Response<Full<Bytes>> {
    let (status, content_type, body) = if path == "/metrics" {
        let mut text = String::new();
        match prometheus_client::encoding::text::encode(&mut text, registry) {
            Ok(()) => (200, CONTENT_TYPE, text),
            Err(e) => (
                500,
                "text/plain",
                format!("encoding the metrics failed: {e}\n"),
            ),
        }
    } else {
        let mut text = String::new();
        let _ = writeln!(text, "icmp-guard serves its metrics at /metrics");
        (404, "text/plain", text)
    };
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts")
}

impl Running {
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}
