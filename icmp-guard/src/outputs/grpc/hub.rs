//! The clients of `feeder.LogService`, each with its own bounded queue.
//!
//! The ring-buffer reader offers every alert here ([`Subscriber::offer`]), and the offer never
//! waits: the alert goes into each client's queue that has room. A client that falls behind
//! loses only its own alerts. They are counted per client (metrics), and the count is announced
//! on that client's stream as a `SystemEvent` alert as soon as its queue has drained, or after at
//! most [`ANNOUNCE_WITHIN`] if it never catches up. KubeArmor's server drops the same alerts
//! silently (KubeArmor #1155, #2721).
//!
//! An alert is converted and encoded once, by the first stream that sends it; the others send
//! the same bytes.

use std::{
    sync::{
        Arc, Mutex, OnceLock, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use log::{info, warn};
use tokio::{
    sync::{Notify, mpsc, watch},
    time::Instant,
};
use tonic::Status;

use super::{proto, wire::EncodedAlert};
use crate::{
    events::alert::Alert,
    outputs::{AgentView, Subscriber},
};

/// KubeArmor's queue per stream.
pub const DEFAULT_QUEUE: usize = 1000;

/// A client that never drains its queue still hears about its losses this often.
pub const ANNOUNCE_WITHIN: Duration = Duration::from_secs(1);

/// A client's losses are logged at most this often (its metrics and announcements are exact);
/// logging every loss is what made KubeArmor's memory spike (KubeArmor #2721).
const LOG_LOSSES_EVERY: Duration = Duration::from_secs(10);

/// The three streams of `feeder.LogService`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum StreamKind {
    Alerts,
    Logs,
    Messages,
}

impl StreamKind {
    pub fn name(self) -> &'static str {
        match self {
            StreamKind::Alerts => "alerts",
            StreamKind::Logs => "logs",
            StreamKind::Messages => "messages",
        }
    }

    fn rpc(self) -> &'static str {
        match self {
            StreamKind::Alerts => "WatchAlerts",
            StreamKind::Logs => "WatchLogs",
            StreamKind::Messages => "WatchMessages",
        }
    }
}

/// One alert on its way to the clients.
struct Entry {
    alert: Arc<Alert>,
    wire: OnceLock<EncodedAlert>,
}

impl Entry {
    fn wire(&self) -> EncodedAlert {
        self.wire
            .get_or_init(|| EncodedAlert::encode(&proto::Alert::from(&*self.alert)))
            .clone()
    }
}

/// One open stream.
pub struct Client {
    pub id: u64,
    pub peer: String,
    pub kind: StreamKind,
    /// Only alert streams have a queue; logs and messages streams stay open, empty.
    tx: Option<mpsc::Sender<Arc<Entry>>>,
    lost: AtomicU64,
    sent: AtomicU64,
    /// Wakes the stream when a loss is counted, so that it is announced even if no alert follows.
    wake: Notify,
}

impl Client {
    pub fn lost(&self) -> u64 {
        self.lost.load(Ordering::Relaxed)
    }

    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Alerts waiting in this client's queue.
    pub fn queued(&self) -> usize {
        self.tx
            .as_ref()
            .map(|tx| tx.max_capacity() - tx.capacity())
            .unwrap_or(0)
    }
}

/// What the clients that have gone away received and lost, so totals never go down.
#[derive(Default, Clone, Copy)]
pub struct Totals {
    pub sent: u64,
    pub lost: u64,
}

pub struct Hub {
    clients: RwLock<Vec<Arc<Client>>>,
    gone: Mutex<Totals>,
    next_id: AtomicU64,
    queue: usize,
    closing: watch::Sender<bool>,
    agent: Arc<dyn AgentView>,
}

impl Hub {
    pub fn new(queue: usize, agent: Arc<dyn AgentView>) -> Arc<Self> {
        Arc::new(Hub {
            clients: RwLock::new(Vec::new()),
            gone: Mutex::new(Totals::default()),
            next_id: AtomicU64::new(1),
            queue: queue.max(1),
            closing: watch::channel(false).0,
            agent,
        })
    }

    pub fn queue(&self) -> usize {
        self.queue
    }

    /// The open streams, for metrics.
    pub fn clients(&self) -> Vec<Arc<Client>> {
        self.clients.read().expect("clients lock").clone()
    }

    /// Sent and lost by every client since start, gone or not.
    pub fn totals(&self) -> Totals {
        let mut t = *self.gone.lock().expect("totals lock");
        for c in self.clients.read().expect("clients lock").iter() {
            t.sent += c.sent();
            t.lost += c.lost();
        }
        t
    }

    /// Opens a stream for `peer`. Refused with UNAVAILABLE once the agent is stopping.
    pub fn subscribe(
        self: &Arc<Self>,
        kind: StreamKind,
        peer: String,
        filter: &str,
    ) -> Result<Subscription, Status> {
        if *self.closing.borrow() {
            return Err(stopping());
        }
        let (tx, rx) = match kind {
            StreamKind::Alerts => {
                let (tx, rx) = mpsc::channel(self.queue);
                (Some(tx), Some(rx))
            }
            _ => (None, None),
        };
        let client = Arc::new(Client {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            peer,
            kind,
            tx,
            lost: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            wake: Notify::new(),
        });
        info!(
            "gRPC client {} ({}) opened {} with filter {filter:?}",
            client.id,
            client.peer,
            kind.rpc()
        );
        self.clients
            .write()
            .expect("clients lock")
            .push(client.clone());
        Ok(Subscription {
            closing: self.closing.subscribe(),
            hub: self.clone(),
            client,
            rx,
            announced: 0,
            first_unannounced: None,
            logged: None,
            finished: false,
        })
    }

    /// Ends every stream: each sends what its queue holds and the losses not yet announced, then
    /// ends with UNAVAILABLE so that clients know the agent stopped and reconnect.
    pub fn close(&self) {
        self.closing.send_replace(true);
    }

    fn remove(&self, client: &Client) {
        self.clients
            .write()
            .expect("clients lock")
            .retain(|c| c.id != client.id);
        let mut gone = self.gone.lock().expect("totals lock");
        gone.sent += client.sent();
        gone.lost += client.lost();
        info!(
            "gRPC client {} ({}) closed {}: {} alerts sent, {} lost",
            client.id,
            client.peer,
            client.kind.rpc(),
            client.sent(),
            client.lost()
        );
    }

    /// The `SystemEvent` telling one client how many alerts it lost.
    fn loss_announcement(&self, client: &Client, count: u64, log: bool) -> EncodedAlert {
        let reason = "dropped for this gRPC client, which did not keep up";
        let mut a = self.agent.loss_event(reason, count);
        a.message = format!(
            "{count} alerts dropped for gRPC client {} ({}): it did not read them fast enough and \
             its queue of {} was full; other clients and the --output file are not affected",
            client.id, client.peer, self.queue
        );
        a.event_data.insert("Client".into(), client.id.to_string());
        a.event_data.insert("Peer".into(), client.peer.clone());
        a.event_data.insert("Queue".into(), self.queue.to_string());
        if log {
            warn!(
                "gRPC client {} ({}) does not keep up: {} alerts dropped for it so far, each \
                 announced to it (icmp_guard_grpc_client_alerts_lost_total); other clients and \
                 the --output file are not affected",
                client.id,
                client.peer,
                client.lost()
            );
        }
        EncodedAlert::encode(&proto::Alert::from(&a))
    }
}

pub fn stopping() -> Status {
    Status::unavailable("icmp-guard is stopping; reconnect once it is back")
}

impl Subscriber for Hub {
    fn offer(&self, alert: &Arc<Alert>) {
        let clients = self.clients.read().expect("clients lock");
        let mut entry = None;
        for c in clients.iter() {
            let Some(tx) = &c.tx else { continue };
            let e = entry
                .get_or_insert_with(|| {
                    Arc::new(Entry {
                        alert: alert.clone(),
                        wire: OnceLock::new(),
                    })
                })
                .clone();
            match tx.try_send(e) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    c.lost.fetch_add(1, Ordering::Relaxed);
                    c.wake.notify_one();
                }
                // The stream is going away; it is removed from the list right after.
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
    }
}

/// One client's open stream; removed from the hub when dropped (the client went away or the
/// stream ended).
pub struct Subscription {
    hub: Arc<Hub>,
    client: Arc<Client>,
    rx: Option<mpsc::Receiver<Arc<Entry>>>,
    closing: watch::Receiver<bool>,
    announced: u64,
    first_unannounced: Option<Instant>,
    logged: Option<Instant>,
    finished: bool,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.hub.remove(&self.client);
    }
}

impl Subscription {
    /// The next item of an alert stream: an alert, a loss announcement, or the final
    /// UNAVAILABLE. `None` after that.
    pub async fn next_alert(&mut self) -> Option<Result<EncodedAlert, Status>> {
        if self.finished {
            return None;
        }
        loop {
            let closing = *self.closing.borrow();
            let queue_empty = self.rx.as_ref().is_none_or(|rx| rx.is_empty());
            let lost = self.client.lost.load(Ordering::Relaxed);
            if lost > self.announced {
                let since = *self.first_unannounced.get_or_insert_with(Instant::now);
                if queue_empty || closing || since.elapsed() >= ANNOUNCE_WITHIN {
                    let count = lost - self.announced;
                    self.announced = lost;
                    self.first_unannounced = None;
                    let log = self.logged.is_none_or(|t| t.elapsed() >= LOG_LOSSES_EVERY);
                    if log {
                        self.logged = Some(Instant::now());
                    }
                    return Some(Ok(self.hub.loss_announcement(&self.client, count, log)));
                }
            }
            let Some(rx) = self.rx.as_mut() else {
                // A logs or messages stream: nothing to send until the agent stops.
                if closing {
                    self.finished = true;
                    return Some(Err(stopping()));
                }
                let _ = self.closing.changed().await;
                continue;
            };
            if closing {
                // Send what is queued, then the losses (above), then the status.
                if let Ok(e) = rx.try_recv() {
                    return Some(Ok(self.sent(e)));
                }
                self.finished = true;
                return Some(Err(stopping()));
            }
            let deadline = self.first_unannounced.map(|t| t + ANNOUNCE_WITHIN);
            tokio::select! {
                biased;
                _ = self.closing.changed() => continue,
                e = rx.recv() => match e {
                    Some(e) => return Some(Ok(self.sent(e))),
                    // The sender lives in this client's entry as long as this subscription, so
                    // this does not happen; ending with the status would still be right.
                    None => {
                        self.finished = true;
                        return Some(Err(stopping()));
                    }
                },
                _ = self.client.wake.notified() => continue,
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)),
                    if deadline.is_some() => continue,
            }
        }
    }

    fn sent(&self, e: Arc<Entry>) -> EncodedAlert {
        self.client.sent.fetch_add(1, Ordering::Relaxed);
        e.wire()
    }
}
