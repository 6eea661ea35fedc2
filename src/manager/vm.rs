//! Container operations of VM pods: the pod's one container is its VM.

use std::sync::Arc;
use std::time::Duration;

use super::records::{ContainerRecord, ContainerState, SandboxRecord, process_start_time};
use super::{EventKind, Manager, ManagerError, now_nanos};
use crate::backend::linux::{ContainerRuntime, ExecOutput};
use crate::backend::vm::VmError;
use crate::backend::vm::domain::VmState;
use crate::backend::vm::runtime::{VmBackend, VmContainer, VmPlan};

/// How often a running VM's state is looked at.
const WATCH_INTERVAL: Duration = Duration::from_millis(500);

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, VmError> + Send + 'static,
) -> Result<T, ManagerError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result.map_err(ManagerError::from),
        Err(join) => Err(ManagerError::FailedPrecondition(format!("VM task failed: {join}"))),
    }
}

impl Manager {
    pub(super) fn vm_backend(&self) -> Arc<VmBackend> {
        self.inner.vm.clone()
    }

    /// A running VM's usage from libvirt, in cgroup terms: the guest's CPU
    /// time, and QEMU's resident memory as what it costs the node.
    pub(super) fn vm_stats(&self, vm: &VmContainer) -> Option<crate::cgroups::Stats> {
        let stats = self.vm_backend().stats(vm).ok()?;
        let rss = stats.memory_rss_kib.unwrap_or(0) * 1024;
        Some(crate::cgroups::Stats {
            cpu_usage_ns: stats.cpu_time_ns,
            memory_usage: rss,
            memory_working_set: rss,
            memory_rss: rss,
            memory_limit: Some(stats.memory_max_kib * 1024).filter(|l| *l > 0),
            pids_current: 1,
            ..Default::default()
        })
    }

    /// Decides KVM or TCG in the background, so that Status can tell and the
    /// first VM does not wait. Only when libvirt is there at all.
    pub fn probe_hypervisor(&self) {
        if !std::path::Path::new("/run/libvirt/libvirt-sock").exists() {
            return;
        }
        let vm = self.vm_backend();
        tokio::task::spawn_blocking(move || {
            if let Err(err) = vm.hypervisor() {
                tracing::warn!(error = %crate::error_chain(&err), "VM hypervisor probe failed");
            }
        });
    }

    /// The VM backend's state for Status: the hypervisor and why.
    pub fn vm_info(&self) -> serde_json::Value {
        match self.inner.vm.cached_hypervisor() {
            Some(choice) => serde_json::json!({ "accel": choice.accel, "reason": choice.reason }),
            None => serde_json::json!({ "accel": null, "reason": "not probed yet (libvirtd not reachable?)" }),
        }
    }

    /// CreateContainer in a VM pod: finds the image's disk or kernel and defines the domain.
    pub(super) async fn create_vm(
        &self,
        id: &str,
        sandbox: &SandboxRecord,
        spec: &crate::spec::ContainerSpec,
        image: &crate::image::ImageRecord,
        log_path: std::path::PathBuf,
    ) -> Result<(ContainerRuntime, VmContainer), ManagerError> {
        if let Some(other) = self.containers().values().find(|c| c.sandbox_id == sandbox.id) {
            return Err(ManagerError::InvalidArgument(format!(
                "VM pod {} already has its one container ({}); a VM pod holds exactly one",
                sandbox.id, other.id
            )));
        }
        let netns = sandbox
            .runtime
            .netns
            .clone()
            .filter(|_| sandbox.spec.namespaces.network != crate::spec::NamespaceMode::Node);
        let vm = self.vm_backend();
        let layer_dirs = self.inner.images.layer_dirs(image);
        let (sandbox_id, container_id) = (sandbox.id.clone(), id.to_string());
        let (pod_name, pod_annotations) = (sandbox.spec.metadata.name.clone(), sandbox.spec.annotations.clone());
        let (spec_owned, resolv_conf) = (spec.clone(), sandbox.runtime.resolv_file.clone());
        let log = log_path.clone();
        let container = blocking(move || {
            vm.create(&VmPlan {
                sandbox_id: &sandbox_id,
                container_id: &container_id,
                pod_name: &pod_name,
                pod_annotations: &pod_annotations,
                spec: &spec_owned,
                layer_dirs,
                netns,
                resolv_conf,
                log_path: log,
            })
        })
        .await?;
        let runtime = ContainerRuntime {
            bundle: container.dir.clone(),
            rw_dir: container.dir.clone(),
            cgroup_path: String::new(),
            log_path,
            uid: 0,
            gid: 0,
            groups: Vec::new(),
        };
        Ok((runtime, container))
    }

    /// StartContainer of a VM; the caller holds the container's lock.
    pub(super) async fn start_vm(&self, mut record: ContainerRecord) -> Result<(), ManagerError> {
        let Some(mut container) = record.vm.clone() else {
            return Err(ManagerError::FailedPrecondition("not a VM container".into()));
        };
        let vm = self.vm_backend();
        let started = blocking(move || vm.start(&mut container).map(|()| container)).await;
        match started {
            Ok(container) => {
                record.state = ContainerState::Running;
                record.started_at = now_nanos();
                record.monitor_pid = container.helper_pid;
                record.monitor_start_time = container.helper_pid.and_then(process_start_time);
                record.vm = Some(container);
                self.save(&record)?;
                self.emit(&record, EventKind::Started);
                self.watch_vm(record.id.clone());
                Ok(())
            }
            Err(err) => {
                record.state = ContainerState::Exited;
                record.finished_at = now_nanos();
                record.exit_code = 128;
                record.reason = "StartError".into();
                record.message = crate::error_chain(&err);
                self.save(&record)?;
                Err(err)
            }
        }
    }

    /// Watches a running VM until it is shut off, then records its exit.
    pub(super) fn watch_vm(&self, id: String) {
        let manager = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(WATCH_INTERVAL).await;
                let Ok(record) = manager.container(&id) else { return };
                if record.state != ContainerState::Running {
                    return;
                }
                let Some(container) = record.vm.clone() else { return };
                let vm = manager.vm_backend();
                let state = tokio::task::spawn_blocking(move || vm.state(&container)).await;
                match state {
                    Ok(Ok(state)) if state.is_active() => continue,
                    Ok(Ok(state)) => {
                        manager.vm_ended(&id, Some(state)).await;
                        return;
                    }
                    Ok(Err(VmError::NotFound(_))) => {
                        manager.vm_ended(&id, None).await;
                        return;
                    }
                    // libvirtd away for a moment: look again later.
                    _ => continue,
                }
            }
        });
    }

    async fn vm_ended(&self, id: &str, state: Option<VmState>) {
        let _guard = self.lock(id).await;
        let Ok(mut record) = self.container(id) else { return };
        if record.state != ContainerState::Running {
            return;
        }
        settle_vm_exit(&mut record, state);
        if let Err(err) = self.save(&record) {
            tracing::error!(container = %id, error = %crate::error_chain(&err), "recording VM exit");
        }
        self.emit(&record, EventKind::Stopped);
    }

    /// ACPI shutdown, then destroy after `timeout` seconds (at once for 0).
    pub(super) async fn stop_vm(&self, record: &ContainerRecord, timeout: i64) -> Result<(), ManagerError> {
        let Some(container) = record.vm.clone() else {
            return Ok(());
        };
        let vm = self.vm_backend();
        let grace = Duration::from_secs(timeout.max(0) as u64);
        let outcome = blocking(move || vm.stop(&container, grace)).await?;
        tracing::info!(container = %record.id, ?outcome, "VM stopped");
        let vm = self.vm_backend();
        let container = record.vm.clone().unwrap_or_else(|| unreachable!());
        let state = blocking(move || vm.state(&container)).await.ok();
        self.vm_ended(&record.id, state).await;
        Ok(())
    }

    pub(super) async fn remove_vm(&self, record: &ContainerRecord) -> Result<(), ManagerError> {
        let Some(container) = record.vm.clone() else {
            return Ok(());
        };
        let vm = self.vm_backend();
        blocking(move || vm.remove(&container)).await
    }

    pub(super) async fn exec_sync_vm(
        &self,
        record: &ContainerRecord,
        command: Vec<String>,
        timeout: i64,
    ) -> Result<ExecOutput, ManagerError> {
        let Some(container) = record.vm.clone() else {
            return Err(ManagerError::FailedPrecondition("not a VM container".into()));
        };
        if record.state != ContainerState::Running {
            return Err(ManagerError::FailedPrecondition(format!(
                "container {} is not running",
                record.id
            )));
        }
        self.exec_vm(container, command, None, Duration::from_secs(timeout.max(0) as u64))
            .await
    }

    /// Runs a command through the VM's guest agent, with `stdin` as its input.
    pub(super) async fn exec_vm(
        &self,
        container: VmContainer,
        command: Vec<String>,
        stdin: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<ExecOutput, ManagerError> {
        let vm = self.vm_backend();
        let output = blocking(move || vm.exec(&container, &command, stdin, timeout)).await;
        match output {
            Ok(out) => Ok(ExecOutput {
                stdout: out.stdout,
                stderr: out.stderr,
                exit_code: out.exit_code,
            }),
            Err(ManagerError::Vm(VmError::NoAgent(why))) => Err(ManagerError::FailedPrecondition(format!(
                "the VM has no guest agent (or it does not answer): {why}"
            ))),
            Err(ManagerError::Vm(VmError::Timeout(limit))) => Err(ManagerError::DeadlineExceeded(format!(
                "command timed out after {limit:?}"
            ))),
            Err(err) => Err(err),
        }
    }

    /// Recovery of a VM container recorded as running: re-adopted when its
    /// domain still runs (the helper started again if it died), else its exit
    /// is recorded.
    pub(super) async fn recover_vm(&self, record: &mut ContainerRecord) {
        let Some(mut container) = record.vm.clone() else { return };
        let vm = self.vm_backend();
        let probe = container.clone();
        let state = tokio::task::spawn_blocking(move || vm.state(&probe)).await;
        match state {
            Ok(Ok(state)) if state.is_active() => {
                if !VmBackend::helper_alive(&container) {
                    let vm = self.vm_backend();
                    match tokio::task::spawn_blocking(move || vm.spawn_helper(&mut container).map(|()| container)).await
                    {
                        Ok(Ok(container)) => {
                            record.monitor_pid = container.helper_pid;
                            record.monitor_start_time = container.helper_pid.and_then(process_start_time);
                            record.vm = Some(container);
                            let _ = self.inner.store.save_container(record);
                        }
                        _ => tracing::warn!(container = %record.id, "could not restart the VM helper"),
                    }
                }
                self.watch_vm(record.id.clone());
            }
            Ok(Ok(state)) => {
                settle_vm_exit(record, Some(state));
                let _ = self.inner.store.save_container(record);
                self.emit(record, EventKind::Stopped);
            }
            Ok(Err(VmError::NotFound(_))) => {
                settle_vm_exit(record, None);
                let _ = self.inner.store.save_container(record);
                self.emit(record, EventKind::Stopped);
            }
            // libvirtd not reachable now: keep the record and watch.
            _ => self.watch_vm(record.id.clone()),
        }
    }

    /// Removes this daemon's domains that no container record knows.
    pub(super) async fn sweep_vm_orphans(&self) {
        let known: std::collections::HashSet<String> = self.containers().keys().cloned().collect();
        let vm = self.vm_backend();
        let _ = tokio::task::spawn_blocking(move || vm.sweep_orphans(&known)).await;
    }
}

/// The exit of a VM that is no longer running, from its domain state.
fn settle_vm_exit(record: &mut ContainerRecord, state: Option<VmState>) {
    record.state = ContainerState::Exited;
    record.finished_at = now_nanos();
    match state.and_then(|s| s.exit()) {
        Some(exit) => {
            record.exit_code = exit.exit_code;
            record.reason = exit.reason.to_string();
        }
        None => {
            record.exit_code = 255;
            record.reason = "Unknown".into();
            record.message = "the VM's domain is gone".into();
        }
    }
    tracing::info!(container = %record.id, exit_code = record.exit_code, reason = %record.reason, "VM exited");
}
