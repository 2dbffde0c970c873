//! Where alerts go: JSON lines on stdout or in a file, and every subscriber an output stage
//! registers (the gRPC stream, [`grpc`]). Beside them, Prometheus metrics ([`metrics`]).
//!
//! The ring-buffer reader hands each alert to [`Outputs::offer`], which never waits: an output
//! that cannot take an alert counts it, and the agent announces the count. Announcements
//! themselves go through [`Outputs::announce`], which waits for room in the JSON lines output,
//! because they are the record of what was lost.

pub mod grpc;
pub mod jsonl;
pub mod metrics;

use std::{net::SocketAddr, sync::Arc};

use anyhow::Result;

use crate::events::alert::Alert;

/// What the output stages need from the running agent (implemented in `agent.rs`).
pub trait AgentView: Send + Sync + 'static {
    /// A `SystemEvent` alert announcing `count` alerts lost for `reason`, stamped now.
    fn loss_event(&self, reason: &str, count: u64) -> Alert;
    /// The agent's state for metrics, read at each scrape.
    fn snapshot(&self) -> metrics::Snapshot;
}

/// The network outputs of `icmp-guard run`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ServeArgs {
    #[command(flatten)]
    pub grpc: grpc::GrpcArgs,
    /// Serve Prometheus metrics at http://ADDR/metrics, e.g. 127.0.0.1:9464 (plain HTTP).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<SocketAddr>,
}

/// The listeners of [`ServeArgs`], bound before the agent enforces so that a wrong address or
/// certificate stops it before anything is attached.
pub struct Listeners {
    grpc: Option<grpc::Bound>,
    metrics: Option<metrics::Bound>,
}

pub fn bind(args: &ServeArgs) -> Result<Listeners> {
    Ok(Listeners {
        grpc: grpc::bind(&args.grpc)?,
        metrics: metrics::bind(args.metrics)?,
    })
}

/// The running servers, owned by [`Outputs`].
struct Servers {
    grpc: Option<grpc::Running>,
    metrics: Option<metrics::Running>,
}

impl Listeners {
    /// Starts the servers; the gRPC hub becomes a subscriber of `outputs`, and the servers
    /// stop when `outputs` closes.
    pub async fn start(self, outputs: &mut Outputs, agent: Arc<dyn AgentView>) -> Result<()> {
        let grpc = match self.grpc {
            Some(b) => {
                let running = b.start(agent.clone()).await?;
                outputs.subscribe(running.hub.clone());
                Some(running)
            }
            None => None,
        };
        let metrics = match self.metrics {
            Some(b) => Some(b.start(metrics::registry(
                agent,
                outputs.jsonl.stats(),
                grpc.as_ref().map(|g| g.hub.clone()),
            ))?),
            None => None,
        };
        outputs.servers = Some(Servers { grpc, metrics });
        Ok(())
    }
}

impl Servers {
    async fn stop(self) {
        if let Some(g) = self.grpc {
            g.stop().await;
        }
        if let Some(m) = self.metrics {
            m.stop().await;
        }
    }
}

/// A consumer of alerts besides the JSON lines output. `offer` must return at once; what the
/// subscriber cannot take it counts and reports itself.
pub trait Subscriber: Send + Sync {
    fn offer(&self, alert: &Arc<Alert>);
}

pub struct Outputs {
    jsonl: jsonl::JsonLines,
    subscribers: Vec<Arc<dyn Subscriber>>,
    servers: Option<Servers>,
}

impl Outputs {
    pub fn new(jsonl: jsonl::JsonLines) -> Self {
        Self {
            jsonl,
            subscribers: Vec::new(),
            servers: None,
        }
    }

    pub fn subscribe(&mut self, s: Arc<dyn Subscriber>) {
        self.subscribers.push(s);
    }

    /// An alert from the kernel: offered to every output without waiting.
    pub fn offer(&self, alert: Alert) {
        let alert = Arc::new(alert);
        for s in &self.subscribers {
            s.offer(&alert);
        }
        self.jsonl.offer(alert);
    }

    /// A system event (a loss report): waits for room in the JSON lines output.
    pub async fn announce(&self, alert: Alert) {
        let alert = Arc::new(alert);
        for s in &self.subscribers {
            s.offer(&alert);
        }
        self.jsonl.send(alert).await;
    }

    /// Alerts the JSON lines output could not take, since start.
    pub fn jsonl_dropped(&self) -> u64 {
        self.jsonl.dropped()
    }

    /// Ends the gRPC streams with UNAVAILABLE after what they still hold, closes the
    /// listeners, and lets the JSON lines output write what it holds, for at most `timeout`.
    /// Called after the last alert has been offered.
    pub async fn close(self, timeout: std::time::Duration) {
        if let Some(s) = self.servers {
            s.stop().await;
        }
        self.jsonl.close(timeout).await;
    }
}
