//! A client of KubeArmor's alert stream, as `karmor logs` and the relay are: `icmp-guard test
//! --pod` reads the running agent's alerts through it, from inside the agent's pod.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result};
use serde_json::{Value, json};

#[allow(clippy::all, missing_docs)]
mod generated {
    include!(concat!(env!("OUT_DIR"), "/feeder-client/feeder.rs"));
}

use generated::log_service_client::LogServiceClient;

use super::proto::{Alert, RequestMessage};

/// A `WatchAlerts` subscription whose alerts collect in the background.
pub struct AlertWatch {
    alerts: Arc<Mutex<Vec<Value>>>,
    ended: Arc<Mutex<Option<String>>>,
    _runtime: tokio::runtime::Runtime,
}

impl AlertWatch {
    /// Subscribes to `WatchAlerts` (filter `policy`) at `addr` (host:port, plaintext). Returns
    /// once the agent has accepted the subscription: every alert raised after that reaches it.
    pub fn start(addr: &str) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .context("starting the gRPC client's runtime")?;
        let uri = format!("http://{addr}");
        let mut stream = runtime.block_on(async {
            let channel = tonic::transport::Endpoint::from_shared(uri.clone())
                .with_context(|| format!("{uri} is not a gRPC address"))?
                .connect_timeout(Duration::from_secs(5))
                .connect()
                .await
                .with_context(|| {
                    format!(
                        "no agent's alert stream answers at {addr}: run this inside the \
                         icmp-guard pod of the target pod's node (kubectl exec -n icmp-guard \
                         POD -- icmp-guard test --pod ...), or name the agent's --grpc address"
                    )
                })?;
            let response = LogServiceClient::new(channel)
                .watch_alerts(RequestMessage {
                    filter: "policy".into(),
                })
                .await
                .with_context(|| format!("subscribing to WatchAlerts at {addr}"))?;
            anyhow::Ok(response.into_inner())
        })?;
        let alerts = Arc::new(Mutex::new(Vec::new()));
        let ended = Arc::new(Mutex::new(None));
        let (sink, end) = (alerts.clone(), ended.clone());
        runtime.spawn(async move {
            let why = loop {
                match stream.message().await {
                    Ok(Some(a)) => sink.lock().unwrap().push(as_json(&a)),
                    Ok(None) => break "the agent ended the stream".to_string(),
                    Err(status) => break format!("the stream failed: {status}"),
                }
            };
            *end.lock().unwrap() = Some(why);
        });
        Ok(AlertWatch {
            alerts,
            ended,
            _runtime: runtime,
        })
    }

    /// Every alert received so far.
    pub fn alerts(&self) -> Vec<Value> {
        self.alerts.lock().unwrap().clone()
    }

    /// Why the stream ended, if it has.
    pub fn ended(&self) -> Option<String> {
        self.ended.lock().unwrap().clone()
    }
}

/// The fields `icmp-guard test` reads, under the names of the JSON alert.
fn as_json(a: &Alert) -> Value {
    json!({
        "HostPID": a.host_pid,
        "Action": a.action,
        "PolicyName": a.policy_name,
        "PodName": a.pod_name,
        "NamespaceName": a.namespace_name,
        "ProcessName": a.process_name,
    })
}
