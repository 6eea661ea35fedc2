//! The streaming server's view of podvisor: sessions whose clients connected
//! run through the manager.

use crate::manager::{Manager, ManagerError};
use crate::streaming::{AttachRequest, BoxConnection, BoxFuture, ExecRequest, StreamError, StreamIo, StreamingRuntime};

pub struct StreamingRuntimeImpl {
    manager: Manager,
}

impl StreamingRuntimeImpl {
    pub fn new(manager: Manager) -> Self {
        StreamingRuntimeImpl { manager }
    }
}

fn stream_error(err: ManagerError) -> StreamError {
    let message = crate::error_chain(&err);
    tracing::warn!(error = %message, "streaming session failed");
    match err {
        ManagerError::InvalidArgument(_) => StreamError::InvalidArgument(message),
        ManagerError::NotFound { .. } => StreamError::NotFound(message),
        _ => StreamError::Other(message),
    }
}

impl StreamingRuntime for StreamingRuntimeImpl {
    fn exec(&self, req: ExecRequest, io: StreamIo) -> BoxFuture<'static, Result<i32, StreamError>> {
        let manager = self.manager.clone();
        Box::pin(async move {
            manager
                .exec_stream(&req.container_id, req.cmd, req.tty, io)
                .await
                .map_err(stream_error)
        })
    }

    fn attach(&self, req: AttachRequest, io: StreamIo) -> BoxFuture<'static, Result<(), StreamError>> {
        let manager = self.manager.clone();
        Box::pin(async move {
            manager
                .attach(&req.container_id, req.tty, io)
                .await
                .map_err(stream_error)
        })
    }

    fn port_forward(&self, pod_sandbox_id: &str, port: u16) -> BoxFuture<'static, Result<BoxConnection, StreamError>> {
        let manager = self.manager.clone();
        let sandbox = pod_sandbox_id.to_string();
        Box::pin(async move {
            let connection = manager.port_forward(&sandbox, port).await.map_err(stream_error)?;
            Ok(Box::new(connection) as BoxConnection)
        })
    }
}
