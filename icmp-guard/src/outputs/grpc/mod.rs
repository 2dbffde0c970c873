//! KubeArmor's alert stream: `feeder.LogService` over gRPC, for `karmor logs`,
//! kubearmor-relay-server and whatever reads the relay.
//!
//! - [`proto`]: the messages of `proto/kubearmor.proto` and the alert conversion;
//! - [`wire`]: an alert encoded once for every client;
//! - [`hub`]: one bounded queue per client, losses counted and announced per client;
//! - [`service`]: the RPCs, with KubeArmor's filter semantics;
//! - [`client`]: a subscriber, for `icmp-guard test --pod`.
//!
//! Beside `feeder.LogService` the server answers `grpc.health.v1` (the service reports SERVING
//! while the agent enforces) and server reflection in both v1 and v1alpha (grpcurl 1.8 asks for
//! v1alpha). Keepalive is KubeArmor's: a ping every second, a connection whose peer does not
//! answer within 5 s is closed, and clients may ping without open streams.

pub mod client;
pub mod hub;
pub mod proto;
pub mod service;
pub mod wire;

use std::{
    net::SocketAddr,
    os::unix::fs::{FileTypeExt, PermissionsExt},
    path::{Path, PathBuf},
    str::FromStr,
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result, anyhow, bail};
use log::{info, warn};
use tokio::sync::oneshot;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig, server::TcpIncoming};

use self::{
    hub::Hub,
    service::{Feeder, LogServiceServer},
};

/// HTTP/2 ping interval and answer timeout: KubeArmor's server values.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// TCP keepalive under the HTTP/2 one, for peers that vanished without a FIN.
const TCP_KEEPALIVE: Duration = Duration::from_secs(10);
/// How long a stop waits for clients to take the end of their streams.
const STOP_GRACE: Duration = Duration::from_secs(3);

/// Where a server listens: `HOST:PORT` or `unix:PATH`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listen {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl FromStr for Listen {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(
                    "unix: needs a socket path, e.g. unix:/run/icmp-guard/grpc.sock".into(),
                );
            }
            return Ok(Listen::Unix(PathBuf::from(path)));
        }
        s.parse::<SocketAddr>().map(Listen::Tcp).map_err(|_| {
            format!(
                "`{s}` is not an address to listen on: use IP:PORT (e.g. 127.0.0.1:32767, \
                 0.0.0.0:32767, [::1]:32767) or unix:PATH"
            )
        })
    }
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listen::Tcp(a) => write!(f, "{a}"),
            Listen::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

#[derive(clap::Args, Debug, Clone, Default)]
pub struct GrpcArgs {
    /// Serve KubeArmor's feeder.LogService (alerts for `karmor logs` and kubearmor-relay-server)
    /// on IP:PORT or unix:PATH. KubeArmor's port is 32767. Plaintext is allowed only on
    /// loopback and unix sockets, unless --grpc-insecure.
    #[arg(long, value_name = "ADDR")]
    pub grpc: Option<Listen>,
    /// TLS certificate chain (PEM) for the gRPC server.
    #[arg(long, value_name = "FILE", requires_all = ["grpc", "grpc_tls_key"])]
    pub grpc_tls_cert: Option<PathBuf>,
    /// TLS private key (PEM) for the gRPC server.
    #[arg(long, value_name = "FILE", requires = "grpc_tls_cert")]
    pub grpc_tls_key: Option<PathBuf>,
    /// CA certificates (PEM) client certificates must chain to: mutual TLS. Clients without
    /// such a certificate are refused.
    #[arg(long, value_name = "FILE", requires = "grpc_tls_cert")]
    pub grpc_tls_client_ca: Option<PathBuf>,
    /// Allow plaintext gRPC on an address other than loopback, where the network itself is
    /// trusted (e.g. a pod network with its own encryption). Alerts name processes and pods.
    #[arg(long, requires = "grpc")]
    pub grpc_insecure: bool,
    /// A second, plaintext server with only grpc.health.v1 on IP:PORT, for probes that cannot
    /// speak TLS (kubelet's gRPC probe). KubeArmor's port is 32766.
    #[arg(long, value_name = "ADDR", requires = "grpc")]
    pub grpc_health: Option<SocketAddr>,
    /// Alerts each gRPC stream may hold for a slow client before it loses them (counted and
    /// announced to that client).
    #[arg(long, value_name = "ALERTS", default_value_t = hub::DEFAULT_QUEUE)]
    pub grpc_queue: usize,
}

enum Listener {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener, PathBuf),
}

/// The gRPC listeners, bound (and TLS material read) before the agent starts enforcing, so that
/// a wrong address or certificate stops it before anything is attached, and clients can connect
/// as soon as it reports ready.
pub struct Bound {
    listener: Listener,
    health: Option<std::net::TcpListener>,
    tls: Option<ServerTlsConfig>,
    queue: usize,
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading the gRPC {what} {}", path.display()))
}

fn tls_config(args: &GrpcArgs) -> Result<Option<ServerTlsConfig>> {
    let (Some(cert), Some(key)) = (&args.grpc_tls_cert, &args.grpc_tls_key) else {
        return Ok(None);
    };
    let identity = Identity::from_pem(read(cert, "certificate")?, read(key, "key")?);
    let mut config = ServerTlsConfig::new().identity(identity);
    if let Some(ca) = &args.grpc_tls_client_ca {
        config = config.client_ca_root(Certificate::from_pem(read(ca, "client CA")?));
    }
    // Checked now, so that a wrong file stops the agent here: building the server parses the
    // PEM files and the key.
    Server::builder().tls_config(config.clone()).map_err(|e| {
        anyhow!(
            "the gRPC TLS files do not make a usable server configuration ({e}); give a PEM \
             certificate chain, its PEM private key and, for mutual TLS, a PEM CA"
        )
    })?;
    Ok(Some(config))
}

/// Binds a unix socket, replacing a stale socket file but never a live server or another file.
fn bind_unix(path: &Path) -> Result<std::os::unix::net::UnixListener> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            bail!(
                "{} exists and is not a socket; choose another path for --grpc unix:PATH",
                path.display()
            );
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "{} is in use by a running server (another icmp-guard?); stop it or choose \
                 another path",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing the stale socket {}", path.display()))?;
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let l = std::os::unix::net::UnixListener::bind(path)
        .with_context(|| format!("listening on unix:{}", path.display()))?;
    // Alerts name processes and pods: only root (and who root lets in) may read them.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

fn bind_tcp(addr: SocketAddr, what: &str) -> Result<std::net::TcpListener> {
    std::net::TcpListener::bind(addr)
        .with_context(|| format!("listening for {what} on {addr} (is the port in use?)"))
}

/// Binds what `args` asks for; `None` without `--grpc`.
pub fn bind(args: &GrpcArgs) -> Result<Option<Bound>> {
    let Some(listen) = &args.grpc else {
        return Ok(None);
    };
    let tls = tls_config(args)?;
    if let Listen::Tcp(addr) = listen
        && tls.is_none()
        && !addr.ip().is_loopback()
        && !args.grpc_insecure
    {
        bail!(
            "--grpc {addr} would send alerts in plaintext over the network; give \
             --grpc-tls-cert and --grpc-tls-key (and --grpc-tls-client-ca for mutual TLS), \
             listen on loopback or a unix socket, or accept plaintext with --grpc-insecure"
        );
    }
    let listener = match listen {
        Listen::Tcp(addr) => Listener::Tcp(bind_tcp(*addr, "gRPC")?),
        Listen::Unix(path) => Listener::Unix(bind_unix(path)?, path.clone()),
    };
    let health = match args.grpc_health {
        Some(addr) => Some(bind_tcp(addr, "gRPC health")?),
        None => None,
    };
    let security = match (&tls, args.grpc_tls_client_ca.is_some()) {
        (Some(_), true) => "mutual TLS",
        (Some(_), false) => "TLS",
        (None, _) => "plaintext",
    };
    let at = match &listener {
        Listener::Tcp(l) => l.local_addr()?.to_string(),
        Listener::Unix(_, p) => format!("unix:{}", p.display()),
    };
    info!("gRPC feeder.LogService listening on {at} ({security})");
    if let Some(h) = &health {
        info!(
            "gRPC health (grpc.health.v1) listening on {} (plaintext)",
            h.local_addr()?
        );
    }
    Ok(Some(Bound {
        listener,
        health,
        tls,
        queue: args.grpc_queue,
    }))
}

/// The running gRPC server.
pub struct Running {
    pub hub: Arc<Hub>,
    reporter: tonic_health::server::HealthReporter,
    stop: Vec<oneshot::Sender<()>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    unix_path: Option<PathBuf>,
}

impl Bound {
    /// Starts serving; the returned hub is what the alert outputs offer alerts to.
    pub async fn start(self, agent: Arc<dyn super::AgentView>) -> Result<Running> {
        let hub = Hub::new(self.queue, agent);
        let (reporter, health) = tonic_health::server::health_reporter();
        reporter.set_serving::<LogServiceServer<Feeder>>().await;
        // Both reflection services list every service, each other included.
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .include_reflection_service(false)
                .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(
                    tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
                )
        };
        let mut builder = Server::builder()
            .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT));
        if let Some(tls) = self.tls {
            builder = builder.tls_config(tls)?;
        }
        let router = builder
            .add_service(health)
            .add_service(LogServiceServer::new(Feeder { hub: hub.clone() }))
            .add_service(reflection().build_v1()?)
            .add_service(reflection().build_v1alpha()?);
        let mut stop = Vec::new();
        let mut tasks = Vec::new();
        let (tx, rx) = oneshot::channel::<()>();
        stop.push(tx);
        let signal = async move {
            let _ = rx.await;
        };
        let mut unix_path = None;
        tasks.push(match self.listener {
            Listener::Tcp(l) => {
                l.set_nonblocking(true)?;
                let incoming = TcpIncoming::from(tokio::net::TcpListener::from_std(l)?)
                    .with_nodelay(Some(true))
                    .with_keepalive(Some(TCP_KEEPALIVE));
                tokio::spawn(async move {
                    if let Err(e) = router.serve_with_incoming_shutdown(incoming, signal).await {
                        warn!("the gRPC server stopped: {e}");
                    }
                })
            }
            Listener::Unix(l, path) => {
                l.set_nonblocking(true)?;
                unix_path = Some(path);
                let incoming = tokio_stream::wrappers::UnixListenerStream::new(
                    tokio::net::UnixListener::from_std(l)?,
                );
                tokio::spawn(async move {
                    if let Err(e) = router.serve_with_incoming_shutdown(incoming, signal).await {
                        warn!("the gRPC server stopped: {e}");
                    }
                })
            }
        });
        if let Some(l) = self.health {
            l.set_nonblocking(true)?;
            let (tx, rx) = oneshot::channel::<()>();
            stop.push(tx);
            let service = tonic_health::pb::health_server::HealthServer::new(
                tonic_health::server::HealthService::from_health_reporter(reporter.clone()),
            );
            let incoming = TcpIncoming::from(tokio::net::TcpListener::from_std(l)?);
            tasks.push(tokio::spawn(async move {
                let r = Server::builder()
                    .add_service(service)
                    .serve_with_incoming_shutdown(incoming, async move {
                        let _ = rx.await;
                    })
                    .await;
                if let Err(e) = r {
                    warn!("the gRPC health server stopped: {e}");
                }
            }));
        }
        Ok(Running {
            hub,
            reporter,
            stop,
            tasks,
            unix_path,
        })
    }
}

impl Running {
    /// Reports NOT_SERVING, ends every stream with UNAVAILABLE after what it still holds, and
    /// closes the listeners. Clients that do not take the end within a few seconds (stalled)
    /// are disconnected.
    pub async fn stop(self) {
        self.reporter
            .set_not_serving::<LogServiceServer<Feeder>>()
            .await;
        self.hub.close();
        for s in self.stop {
            let _ = s.send(());
        }
        let deadline = tokio::time::Instant::now() + STOP_GRACE;
        for mut t in self.tasks {
            if tokio::time::timeout_at(deadline, &mut t).await.is_err() {
                warn!(
                    "gRPC clients did not take the end of their streams within {STOP_GRACE:?}; \
                     their connections are closed"
                );
                t.abort();
            }
        }
        if let Some(p) = self.unix_path {
            let _ = std::fs::remove_file(p);
        }
    }
}
