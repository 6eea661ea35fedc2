//! `podvisor daemon`: sets up the node's directories, takes the root lock,
//! opens the stores and serves the CRI on a unix socket until told to stop.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use crate::config::{Config, ConfigError};
use crate::cri::proto::podvisor::pull_progress_server::PullProgressServer;
use crate::cri::proto::runtime::image_service_server::ImageServiceServer;
use crate::cri::proto::runtime::runtime_service_server::RuntimeServiceServer;
use crate::cri::{self, ImageServiceImpl, PullProgressImpl, RuntimeInfo, RuntimeServiceImpl};
use crate::image::{ImageError, ImageStore};
use crate::streaming::StreamingServer;
use crate::sys::lock::{DirLock, LockError};

pub const DEFAULT_ENDPOINT: &str = "unix:///run/podvisor/podvisor.sock";
pub const DEFAULT_ROOT: &str = "/var/lib/podvisor";
pub const DEFAULT_STATE: &str = "/run/podvisor";
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

#[derive(Clone, Debug)]
pub struct DaemonOptions {
    /// `unix:///path` or a plain path.
    pub listen: String,
    /// Durable node state: images, records.
    pub root: PathBuf,
    /// Runtime files that do not survive a reboot.
    pub state: PathBuf,
    pub config_path: PathBuf,
    /// The config path was given on the command line, so it must exist.
    pub config_explicit: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error("cannot create {path}")]
    Dir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the image store")]
    Images(#[source] ImageError),
    #[error("cannot start the sandbox and container manager")]
    Manager(#[source] crate::manager::ManagerError),
    #[error(transparent)]
    Socket(#[from] cri::socket::SocketError),
    #[error("gRPC server failed")]
    Serve(#[source] tonic::transport::Error),
    #[error("cannot listen for streaming on {address}")]
    Streaming {
        address: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Runs the daemon until `shutdown` completes.
pub async fn run(options: DaemonOptions, shutdown: impl Future<Output = ()> + Send) -> Result<(), DaemonError> {
    let config = Config::load(&options.config_path, options.config_explicit)?;
    for dir in [&options.root, &options.state] {
        crate::sys::fs::ensure_dir(dir, 0o711).map_err(|source| DaemonError::Dir {
            path: dir.display().to_string(),
            source,
        })?;
    }
    let _lock = DirLock::acquire(&options.root.join("podvisor.lock"))?;
    let images = ImageStore::open(&options.root, config.registry.clone()).map_err(DaemonError::Images)?;
    let network =
        crate::network::PodNetwork::new(&config.network, &options.state).map_err(|e| DaemonError::Manager(e.into()))?;
    let manager = crate::manager::Manager::new(images.clone(), network, &options.root, &options.state, &config.vm)
        .await
        .map_err(DaemonError::Manager)?;
    manager.probe_hypervisor();
    // Only now do containers' pins protect the image content they use.
    images.collect_garbage().map_err(DaemonError::Images)?;
    let address = config.streaming.address;
    let mut streaming_config = crate::streaming::ServerConfig::new(address);
    if let (Some(cert), Some(key)) = (&config.streaming.tls_cert, &config.streaming.tls_key) {
        let tls =
            crate::streaming::tls_config(cert, key).map_err(|source| DaemonError::Streaming { address, source })?;
        streaming_config.tls = Some(Arc::new(tls));
    }
    let streaming = StreamingServer::with_config(
        streaming_config,
        Arc::new(cri::StreamingRuntimeImpl::new(manager.clone())),
    )
    .await
    .map_err(|source| DaemonError::Streaming { address, source })?;
    let streaming = Arc::new(streaming);
    let socket = cri::socket::socket_path(&options.listen);
    let info = RuntimeInfo {
        root: options.root.clone(),
        state: options.state.clone(),
        socket: socket.clone(),
        cgroup_layout: crate::cgroups::detect_layout(std::path::Path::new("/sys/fs/cgroup")),
        config,
    };
    let listener = cri::socket::bind(&socket)?;
    tracing::info!(
        socket = %socket.display(),
        root = %options.root.display(),
        cgroups = ?info.cgroup_layout,
        images = images.list().len(),
        streaming = %streaming.local_addr(),
        "podvisor daemon ready"
    );
    let containers_dir = options.root.join("containers");
    let (stop_serving, serving_stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tonic::transport::Server::builder()
        .trace_fn(|request| tracing::info_span!("rpc", method = %request.uri().path()))
        .add_service(RuntimeServiceServer::new(RuntimeServiceImpl::new(
            info, manager, streaming,
        )))
        .add_service(ImageServiceServer::new(ImageServiceImpl::new(
            images.clone(),
            containers_dir,
        )))
        .add_service(PullProgressServer::new(PullProgressImpl::new(images)))
        .serve_with_incoming_shutdown(tokio_stream::wrappers::UnixListenerStream::new(listener), async {
            let _ = serving_stopped.await;
        });
    tokio::pin!(server);
    let result = tokio::select! {
        result = &mut server => result,
        () = shutdown => {
            let _ = stop_serving.send(());
            // Clients like kubelet keep their connections open: give requests
            // in flight a moment, then go.
            match tokio::time::timeout(SHUTDOWN_GRACE, &mut server).await {
                Ok(result) => result,
                Err(_) => Ok(()),
            }
        }
    };
    let _ = std::fs::remove_file(&socket);
    tracing::info!("podvisor daemon stopped");
    result.map_err(DaemonError::Serve)
}
