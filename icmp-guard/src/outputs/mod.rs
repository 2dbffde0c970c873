//! Where alerts go: JSON lines on stdout or in a file, and every subscriber an output stage
//! registers (the gRPC stream).
//!
//! The ring-buffer reader hands each alert to [`Outputs::offer`], which never waits: an output
//! that cannot take an alert counts it, and the agent announces the count. Announcements
//! themselves go through [`Outputs::announce`], which waits for room in the JSON lines output,
//! because they are the record of what was lost.

pub mod jsonl;

use std::sync::Arc;

use crate::events::alert::Alert;

/// A consumer of alerts besides the JSON lines output. `offer` must return at once; what the
/// subscriber cannot take it counts and reports itself.
pub trait Subscriber: Send + Sync {
    fn offer(&self, alert: &Arc<Alert>);
}

pub struct Outputs {
    jsonl: jsonl::JsonLines,
    subscribers: Vec<Arc<dyn Subscriber>>,
}

impl Outputs {
    pub fn new(jsonl: jsonl::JsonLines) -> Self {
        Self {
            jsonl,
            subscribers: Vec::new(),
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

    /// Lets the JSON lines output write what it holds, for at most `timeout`.
    pub async fn close(self, timeout: std::time::Duration) {
        self.jsonl.close(timeout).await;
    }
}
