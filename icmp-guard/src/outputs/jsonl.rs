//! Alerts as JSON lines, one object per line, on stdout or appended to a file.

use std::{
    io::Write,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result};
use tokio::sync::mpsc;

use crate::events::alert::Alert;

/// Alerts waiting for the writer. Bounded, so a stalled output cannot grow memory without
/// limit; what does not fit is counted.
const QUEUE: usize = 4096;

/// What the output has done since start, for the loss accounting and for metrics.
#[derive(Debug, Default)]
pub struct Stats {
    /// Alerts (system events included) written in full.
    pub written: AtomicU64,
    /// Alerts the queue had no room for.
    pub dropped: AtomicU64,
}

pub struct JsonLines {
    tx: mpsc::Sender<Arc<Alert>>,
    stats: Arc<Stats>,
    writer: tokio::task::JoinHandle<Result<()>>,
}

impl JsonLines {
    /// `-` is stdout; anything else a file, created if missing and appended to. Must be called
    /// inside a tokio runtime.
    pub fn open(dest: &str) -> Result<Self> {
        let mut out: Box<dyn Write + Send> = if dest == "-" {
            Box::new(std::io::stdout())
        } else {
            Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(dest)
                    .with_context(|| format!("opening alert output {dest}"))?,
            )
        };
        let (tx, mut rx) = mpsc::channel::<Arc<Alert>>(QUEUE);
        let stats = Arc::new(Stats::default());
        let counts = stats.clone();
        let writer = tokio::task::spawn_blocking(move || -> Result<()> {
            while let Some(a) = rx.blocking_recv() {
                // One write per alert: a reader tailing the file never sees half a line.
                let mut line = serde_json::to_vec(&*a)?;
                line.push(b'\n');
                out.write_all(&line)?;
                out.flush()?;
                counts.written.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        });
        Ok(Self { tx, stats, writer })
    }

    pub fn offer(&self, alert: Arc<Alert>) {
        if self.tx.try_send(alert).is_err() {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub async fn send(&self, alert: Arc<Alert>) {
        // Fails only once the writer has stopped (its error is reported at close).
        let _ = self.tx.send(alert).await;
    }

    pub fn dropped(&self) -> u64 {
        self.stats.dropped.load(Ordering::Relaxed)
    }

    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    pub async fn close(self, timeout: Duration) {
        drop(self.tx);
        match tokio::time::timeout(timeout, self.writer).await {
            Ok(Ok(Err(e))) => log::error!("the alert output failed: {e:#}"),
            Err(_) => log::warn!("the alert output did not finish writing within {timeout:?}"),
            _ => {}
        }
    }
}
