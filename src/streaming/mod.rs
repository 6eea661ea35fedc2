//! Server side of the kubelet streaming protocols used by the CRI `Exec`, `Attach` and `PortForward` RPCs.
//!
//! The RPCs only return a URL from [`StreamingServer::register_exec`] & co.; the client (crictl, or the kubelet
//! proxying kubectl) then connects to that URL on our HTTP server and upgrades the connection to one of:
//!
//! * SPDY/3.1 (`Upgrade: SPDY/3.1`) carrying remotecommand `v5`…`v1` (`X-Stream-Protocol-Version`) or
//!   `portforward.k8s.io`, one SPDY stream per stdio channel / per forwarded connection;
//! * WebSocket channel protocols (`v5.channel.k8s.io`, `v4.channel.k8s.io`, …, base64 variants) where each message
//!   starts with a channel byte, for exec/attach and for port forwarding;
//! * SPDY tunnelled through WebSocket (`SPDY/3.1+portforward.k8s.io`), used by newer port-forward clients.
//!
//! The runtime plugs in through [`StreamingRuntime`].

pub mod portforward;
pub mod remotecommand;
pub mod server;
pub mod spdy;
pub mod websocket;

use std::future::Future;
use std::io;
use std::pin::Pin;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;

pub use server::{ServerConfig, StreamingServer, tls_config};

/// A boxed, sendable future.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;
/// Input handed to the runtime (stdin).
pub type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
/// Output handed to the runtime (stdout, stderr).
pub type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

/// A bidirectional byte stream, e.g. a `TcpStream` into the pod's network namespace.
pub trait Connection: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Connection for T {}

/// Connection returned by [`StreamingRuntime::port_forward`].
pub type BoxConnection = Box<dyn Connection>;

/// Mirror of the CRI `ExecRequest`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExecRequest {
    pub container_id: String,
    pub cmd: Vec<String>,
    pub tty: bool,
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
}

/// Mirror of the CRI `AttachRequest`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AttachRequest {
    pub container_id: String,
    pub tty: bool,
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
}

/// Mirror of the CRI `PortForwardRequest`. An empty `ports` list allows any port.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PortForwardRequest {
    pub pod_sandbox_id: String,
    pub ports: Vec<i32>,
}

/// Terminal size sent by the client on the resize channel (JSON `{"Width":..,"Height":..}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TerminalSize {
    #[serde(rename = "Width")]
    pub width: u16,
    #[serde(rename = "Height")]
    pub height: u16,
}

/// The client's stdio for one exec/attach session. Absent streams were not requested.
///
/// The runtime must have written all output before its future resolves: the session then sends the exit status
/// and closes. Dropping (or shutting down) `stdout`/`stderr` signals end of output to the client. `stdin` reaches
/// EOF when the client closes its stdin.
#[derive(Default)]
pub struct StreamIo {
    pub stdin: Option<BoxRead>,
    pub stdout: Option<BoxWrite>,
    pub stderr: Option<BoxWrite>,
    /// Terminal resizes (tty sessions only); the first message is normally the initial size.
    pub resize: Option<mpsc::Receiver<TerminalSize>>,
}

impl std::fmt::Debug for StreamIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamIo")
            .field("stdin", &self.stdin.is_some())
            .field("stdout", &self.stdout.is_some())
            .field("stderr", &self.stderr.is_some())
            .field("resize", &self.resize.is_some())
            .finish()
    }
}

/// Errors of the streaming layer and of runtime callbacks.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("too many pending streaming requests")]
    ResourceExhausted,
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("{0}")]
    Other(String),
}

/// What the streaming server needs from the container runtime.
pub trait StreamingRuntime: Send + Sync + 'static {
    /// Runs `req.cmd` in the container with the given stdio and returns its exit code.
    fn exec(&self, req: ExecRequest, io: StreamIo) -> BoxFuture<'static, Result<i32, StreamError>>;
    /// Attaches the stdio to the container's main process until it exits or the client goes away.
    fn attach(&self, req: AttachRequest, io: StreamIo) -> BoxFuture<'static, Result<(), StreamError>>;
    /// Opens a TCP connection to `port` inside the sandbox's network namespace.
    fn port_forward(&self, pod_sandbox_id: &str, port: u16) -> BoxFuture<'static, Result<BoxConnection, StreamError>>;
}

/// Stdio flags shared by exec and attach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StdioFlags {
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    pub tty: bool,
}

/// Validates stdio flags like the kubelet does for CRI requests.
pub(crate) fn validate_stdio(flags: StdioFlags) -> Result<(), StreamError> {
    if flags.tty && flags.stderr {
        return Err(StreamError::InvalidArgument(
            "tty and stderr cannot both be true".into(),
        ));
    }
    if !flags.stdin && !flags.stdout && !flags.stderr {
        return Err(StreamError::InvalidArgument(
            "one of stdin, stdout, or stderr must be set".into(),
        ));
    }
    Ok(())
}

/// Copies between a client stream and a target connection until the target side is done.
///
/// Client EOF half-closes the target's write side and keeps relaying the target's answer; target EOF ends the
/// forward (the client then sees EOF). Errors in either direction end it.
pub(crate) async fn forward_connection<R, W>(client_rd: R, client_wr: W, target: BoxConnection) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    use tokio::io::AsyncWriteExt;
    let (mut target_rd, mut target_wr) = tokio::io::split(target);
    let mut client_rd = client_rd;
    let mut client_wr = client_wr;
    let up = async {
        tokio::io::copy(&mut client_rd, &mut target_wr).await?;
        target_wr.shutdown().await
    };
    let down = async {
        tokio::io::copy(&mut target_rd, &mut client_wr).await?;
        client_wr.shutdown().await
    };
    tokio::pin!(up, down);
    tokio::select! {
        res = &mut down => res,
        res = &mut up => match res {
            Ok(()) => down.await,
            Err(e) => Err(e),
        },
    }
}
