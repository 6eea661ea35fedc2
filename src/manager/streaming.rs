//! Streaming sessions (Exec, Attach, PortForward): the checks made when a
//! session is requested and again when its client connects, then the backend.

use super::records::{ContainerRecord, ContainerState, SandboxRecord, SandboxState};
use super::{Manager, ManagerError};
use crate::streaming::StreamIo;

impl Manager {
    /// A container that exec and attach may reach: it exists, runs, and is a
    /// Linux container (streaming into VMs is not implemented yet).
    pub fn running_container(&self, id: &str) -> Result<ContainerRecord, ManagerError> {
        let record = self.container(id)?;
        if record.vm.is_some() {
            return Err(ManagerError::FailedPrecondition(format!(
                "container {} is a VM: exec and attach sessions into VMs are not supported yet (ExecSync is)",
                record.id
            )));
        }
        match (record.state, record.pid) {
            (ContainerState::Running, Some(_)) => Ok(record),
            _ => Err(ManagerError::FailedPrecondition(format!(
                "container {} is not running",
                record.id
            ))),
        }
    }

    /// A running container whose terminal setting is what the attach asks for.
    pub fn attachable_container(&self, id: &str, tty: bool) -> Result<ContainerRecord, ManagerError> {
        let record = self.running_container(id)?;
        if record.spec.tty != tty {
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
        if record.backend != crate::backend::BackendKind::Linux {
            return Err(ManagerError::FailedPrecondition(format!(
                "sandbox {} is a VM pod: port-forward into VMs is not supported yet",
                record.id
            )));
        }
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
        let record = self.running_container(id)?;
        let pid = record.pid.unwrap_or_default();
        let process = self.exec_process(&record, command, tty)?;
        Ok(self.inner.linux.exec_stream(&record.runtime, pid, process, io).await?)
    }

    /// Attaches the client's stdio to the container's main process.
    pub async fn attach(&self, id: &str, tty: bool, io: StreamIo) -> Result<(), ManagerError> {
        let record = self.attachable_container(id, tty)?;
        crate::backend::linux::attach::attach(&record.runtime.bundle, tty, record.spec.stdin_once, io).await?;
        Ok(())
    }

    /// A TCP connection to `port` on the pod's loopback.
    pub async fn port_forward(&self, sandbox_id: &str, port: u16) -> Result<tokio::net::TcpStream, ManagerError> {
        let record = self.ready_sandbox(sandbox_id)?;
        Ok(self
            .inner
            .linux
            .connect_in_pod(record.runtime.netns.clone(), port)
            .await?)
    }
}
