//! Unix socket plumbing: binding the daemon's socket safely and connecting
//! clients (the CLI, tests) to it.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

/// `unix:///run/x.sock` or `/run/x.sock` -> `/run/x.sock`.
pub fn socket_path(endpoint: &str) -> PathBuf {
    PathBuf::from(endpoint.strip_prefix("unix://").unwrap_or(endpoint))
}

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("socket {0} is in use by another process")]
    InUse(String),
    #[error("cannot set up socket {path}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
}

/// Binds `path` with mode 0660, owned by root. A stale socket left by a dead
/// daemon is replaced; a live one is never stolen.
pub fn bind(path: &Path) -> Result<tokio::net::UnixListener, SocketError> {
    let io_err = |source| SocketError::Io {
        path: path.display().to_string(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io_err)?;
    }
    if std::fs::symlink_metadata(path).is_ok() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(SocketError::InUse(path.display().to_string()));
        }
        std::fs::remove_file(path).map_err(io_err)?;
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(io_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(io_err)?;
    std::os::unix::fs::lchown(path, Some(0), Some(0)).map_err(io_err)?;
    Ok(listener)
}

/// A gRPC channel to a unix socket endpoint.
pub async fn connect(endpoint: &str) -> Result<Channel, tonic::transport::Error> {
    let path = socket_path(endpoint);
    Endpoint::from_static("http://[::]:50051")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?)) }
        }))
        .await
}
