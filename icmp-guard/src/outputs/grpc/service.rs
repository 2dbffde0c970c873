//! `feeder.LogService` as KubeArmor's clients expect it to behave.

use std::{pin::Pin, sync::Arc};

use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::{
    hub::{Hub, StreamKind, Subscription},
    proto::{Log, Message, NonceMessage, ReplyMessage, RequestMessage},
    wire::EncodedAlert,
};

#[allow(clippy::all, missing_docs)]
mod generated {
    include!(concat!(env!("OUT_DIR"), "/feeder-service/feeder.rs"));
}

pub use generated::log_service_server::{LogService, LogServiceServer};

type Streaming<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

pub struct Feeder {
    pub hub: Arc<Hub>,
}

/// Who is asking, for logs and metrics: the TCP peer, or the unix socket's peer process.
fn peer<T>(req: &Request<T>) -> String {
    if let Some(addr) = req.remote_addr() {
        return addr.to_string();
    }
    if let Some(uds) = req
        .extensions()
        .get::<tonic::transport::server::UdsConnectInfo>()
        && let Some(cred) = uds.peer_cred
    {
        return match cred.pid() {
            Some(pid) => format!("unix pid {pid} uid {}", cred.uid()),
            None => format!("unix uid {}", cred.uid()),
        };
    }
    "unknown".into()
}

fn alerts(sub: Subscription) -> Streaming<EncodedAlert> {
    Box::pin(futures_util::stream::unfold(sub, |mut sub| async move {
        let item = sub.next_alert().await?;
        Some((item, sub))
    }))
}

/// A stream that sends nothing until the agent stops, then ends with UNAVAILABLE.
fn idle<T: Send + 'static>(sub: Subscription) -> Streaming<T> {
    Box::pin(futures_util::stream::unfold(Some(sub), |sub| async move {
        let mut sub = sub?;
        match sub.next_alert().await {
            Some(Err(status)) => Some((Err(status), None)),
            // Logs and messages streams have no queue, so nothing else comes out.
            _ => None,
        }
    }))
}

#[tonic::async_trait]
impl LogService for Feeder {
    async fn health_check(
        &self,
        request: Request<NonceMessage>,
    ) -> Result<Response<ReplyMessage>, Status> {
        Ok(Response::new(ReplyMessage {
            retval: request.into_inner().nonce,
        }))
    }

    type WatchMessagesStream = Streaming<Message>;

    /// icmp-guard's own log is not streamed; the stream stays open because kubearmor-relay-server
    /// tears all three streams down when one ends. KubeArmor takes any filter here.
    async fn watch_messages(
        &self,
        request: Request<RequestMessage>,
    ) -> Result<Response<Self::WatchMessagesStream>, Status> {
        let sub = self.hub.subscribe(
            StreamKind::Messages,
            peer(&request),
            &request.get_ref().filter,
        )?;
        Ok(Response::new(idle(sub)))
    }

    type WatchAlertsStream = Streaming<EncodedAlert>;

    /// Filter `all` or `policy`: every alert, system events included (KubeArmor stores the filter
    /// and sends everything). Any other filter ends the stream at once, with OK and no items, as
    /// KubeArmor does.
    async fn watch_alerts(
        &self,
        request: Request<RequestMessage>,
    ) -> Result<Response<Self::WatchAlertsStream>, Status> {
        Ok(Response::new(
            match self.open(&request, StreamKind::Alerts, &["all", "policy"])? {
                Some(sub) => alerts(sub),
                None => Box::pin(tokio_stream::empty()),
            },
        ))
    }

    type WatchLogsStream = Streaming<Log>;

    /// Filter `all` or `system`, else ends at once with OK. icmp-guard has no visibility logs to
    /// send; the stream stays open for the relay's sake.
    async fn watch_logs(
        &self,
        request: Request<RequestMessage>,
    ) -> Result<Response<Self::WatchLogsStream>, Status> {
        Ok(Response::new(
            match self.open(&request, StreamKind::Logs, &["all", "system"])? {
                Some(sub) => idle(sub),
                None => Box::pin(tokio_stream::empty()),
            },
        ))
    }
}

impl Feeder {
    /// A subscription if the request's filter is one of `accepted`; `None` (the stream ends at
    /// once with OK) otherwise.
    fn open(
        &self,
        request: &Request<RequestMessage>,
        kind: StreamKind,
        accepted: &[&str],
    ) -> Result<Option<Subscription>, Status> {
        let filter = &request.get_ref().filter;
        if !accepted.contains(&filter.as_str()) {
            return Ok(None);
        }
        self.hub.subscribe(kind, peer(request), filter).map(Some)
    }
}
