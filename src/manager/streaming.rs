//! Streaming sessions (Exec, Attach, PortForward): the checks made when a
//! session is requested and again when its client connects, then the backend.

use super::records::{ContainerRecord, ContainerState, SandboxRecord, SandboxState};
use super::{Manager, ManagerError};
use crate::streaming::StreamIo;

impl Manager {
    /// A container that exec and attach may reach: it exists and runs (a
    /// Linux container's process, or a VM).
    pub fn running_container(&self, id: &str) -> Result<ContainerRecord, ManagerError> {
        let record = self.container(id)?;
        match (record.state, record.pid.is_some() || record.vm.is_some()) {
            (ContainerState::Running, true) => Ok(record),
            _ => Err(ManagerError::FailedPrecondition(format!(
                "container {} is not running",
                record.id
            ))),
        }
    }

    /// A container an exec session may run in: VMs run commands through their
    /// guest agent, which has no terminal.
    pub fn exec_target(&self, id: &str, tty: bool) -> Result<ContainerRecord, ManagerError> {
        let record = self.running_container(id)?;
        if record.vm.is_some() && tty {
            return Err(ManagerError::InvalidArgument(format!(
                "container {} is a VM: exec runs through its guest agent, which has no terminal; \
                 exec without a tty (no -t), or attach to its serial console",
                record.id
            )));
        }
        Ok(record)
    }

    /// A running container whose terminal setting is what the attach asks for
    /// (a VM's serial console takes either).
    pub fn attachable_container(&self, id: &str, tty: bool) -> Result<ContainerRecord, ManagerError> {
        let record = self.running_container(id)?;
        if record.vm.is_none() && record.spec.tty != tty {
            return Err(ManagerError::InvalidArgument(format!(
                "attach with tty={tty} to container {} which has tty={}",
                record.id, record.spec.tty
            )));
        }
        Ok(record)
    }

    /// A sandbox whose ports may be forwarded: it exists and is ready.
    pub fn ready_sandbox(&self, id: &str) -> Result<SandboxRecord, ManagerError> {
        let record = self.sandbox(id)?;
        if record.state != SandboxState::Ready {
            return Err(ManagerError::FailedPrecondition(format!(
                "sandbox {} is not ready",
                record.id
            )));
        }
        Ok(record)
    }

    /// Runs a command in a container with the client's stdio; returns its exit code.
    pub async fn exec_stream(
        &self,
        id: &str,
        command: Vec<String>,
        tty: bool,
        io: StreamIo,
    ) -> Result<i32, ManagerError> {
        if command.is_empty() {
            return Err(ManagerError::InvalidArgument("exec needs a command".into()));
        }
        let record = self.exec_target(id, tty)?;
        if record.vm.is_some() {
            return self.exec_stream_vm(&record, command, io).await;
        }
        let pid = record.pid.unwrap_or_default();
        let process = self.exec_process(&record, command, tty)?;
        Ok(self.inner.linux.exec_stream(&record.runtime, pid, process, io).await?)
    }

    /// Attaches the client's stdio to the container's main process.
    pub async fn attach(&self, id: &str, tty: bool, io: StreamIo) -> Result<(), ManagerError> {
        let record = self.attachable_container(id, tty)?;
        if let Some(vm) = &record.vm {
            return attach_console(&vm.attach_socket(), io).await;
        }
        crate::backend::linux::attach::attach(&record.runtime.bundle, tty, record.spec.stdin_once, io).await?;
        Ok(())
    }

    /// A TCP connection to `port` on the pod's loopback.
    pub async fn port_forward(&self, sandbox_id: &str, port: u16) -> Result<tokio::net::TcpStream, ManagerError> {
        let record = self.ready_sandbox(sandbox_id)?;
        if record.backend == crate::backend::BackendKind::Vm {
            // The VM holds the pod IP: connect to it there, from the node.
            let ip = record
                .network
                .as_ref()
                .and_then(|n| n.ips().into_iter().next())
                .ok_or_else(|| ManagerError::FailedPrecondition(format!("VM pod {} has no IP", record.id)))?;
            return tokio::net::TcpStream::connect((ip.as_str(), port))
                .await
                .map_err(|e| ManagerError::FailedPrecondition(format!("connecting to {ip}:{port} in VM pod: {e}")));
        }
        Ok(self
            .inner
            .linux
            .connect_in_pod(record.runtime.netns.clone(), port)
            .await?)
    }

    /// A non-tty exec in a VM through its guest agent: stdin is read to its end
    /// first (the agent takes it whole), the output is written once the command
    /// has finished.
    async fn exec_stream_vm(
        &self,
        record: &ContainerRecord,
        command: Vec<String>,
        io: StreamIo,
    ) -> Result<i32, ManagerError> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let Some(container) = record.vm.clone() else {
            return Err(ManagerError::FailedPrecondition("not a VM container".into()));
        };
        let StreamIo {
            stdin, stdout, stderr, ..
        } = io;
        let input = match stdin {
            Some(stdin) => {
                let mut data = Vec::new();
                stdin
                    .take(VM_EXEC_STDIN_LIMIT + 1)
                    .read_to_end(&mut data)
                    .await
                    .map_err(|e| ManagerError::FailedPrecondition(format!("reading the exec's stdin: {e}")))?;
                if data.len() as u64 > VM_EXEC_STDIN_LIMIT {
                    return Err(ManagerError::InvalidArgument(format!(
                        "stdin of an exec into a VM is limited to {VM_EXEC_STDIN_LIMIT} bytes"
                    )));
                }
                Some(data)
            }
            None => None,
        };
        let output = self.exec_vm(container, command, input, VM_EXEC_TIMEOUT).await?;
        for (stream, data) in [(stdout, output.stdout), (stderr, output.stderr)] {
            if let Some(mut stream) = stream {
                // A client that went away does not change the command's exit code.
                let _ = stream.write_all(&data).await;
                let _ = stream.shutdown().await;
            }
        }
        Ok(output.exit_code)
    }
}

/// What the guest agent takes as one command's stdin.
const VM_EXEC_STDIN_LIMIT: u64 = 16 << 20;
/// Longest a streaming exec into a VM may run.
const VM_EXEC_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// Connects the client to a VM's serial console relay until either side ends.
async fn attach_console(socket: &std::path::Path, io: StreamIo) -> Result<(), ManagerError> {
    use tokio::io::AsyncWriteExt;
    let console = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|e| ManagerError::FailedPrecondition(format!("the VM's console ({}): {e}", socket.display())))?;
    let (mut from_console, mut to_console) = console.into_split();
    let StreamIo {
        stdin, stdout, stderr, ..
    } = io;
    let input = async move {
        if let Some(mut stdin) = stdin {
            let _ = tokio::io::copy(&mut stdin, &mut to_console).await;
        }
        // Without input (or after it) the session lasts as long as the output.
        std::future::pending::<()>().await
    };
    let output = async move {
        match stdout.or(stderr) {
            Some(mut out) => {
                let _ = tokio::io::copy(&mut from_console, &mut out).await;
                let _ = out.shutdown().await;
            }
            None => {
                let _ = tokio::io::copy(&mut from_console, &mut tokio::io::sink()).await;
            }
        }
    };
    tokio::select! {
        _ = input => {}
        _ = output => {}
    }
    Ok(())
}
