//! Container operations.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use super::records::{ContainerRecord, ContainerState, SandboxState, process_start_time};
use super::{EventKind, Manager, ManagerError, container_name_key, new_id, now_nanos, store_error};
use crate::backend::linux::{ContainerPlan, ExecOutput, process::ProcessConfig};
use crate::image::ImageError;
use crate::spec::ContainerSpec;

/// Joins a log path from a request under its directory, refusing escapes.
pub fn log_path_under(dir: &str, relative: &str) -> Result<PathBuf, ManagerError> {
    let relative_path = Path::new(relative);
    if relative_path.is_absolute() || relative_path.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(ManagerError::InvalidArgument(format!(
            "log path {relative:?} must stay inside the sandbox log directory"
        )));
    }
    Ok(Path::new(dir).join(relative_path))
}

fn signal_from_name(name: &str) -> Option<nix::sys::signal::Signal> {
    let upper = name.trim().to_ascii_uppercase();
    if let Ok(number) = upper.parse::<i32>() {
        return nix::sys::signal::Signal::try_from(number).ok();
    }
    let full = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    full.parse().ok()
}

impl Manager {
    pub async fn create_container(&self, sandbox_id: &str, spec: ContainerSpec) -> Result<String, ManagerError> {
        let sandbox = self.sandbox(sandbox_id)?;
        if sandbox.state != SandboxState::Ready {
            return Err(ManagerError::FailedPrecondition(format!(
                "sandbox {} is not ready",
                sandbox.id
            )));
        }
        if spec.metadata.name.is_empty() {
            return Err(ManagerError::InvalidArgument("container metadata needs a name".into()));
        }
        let image = match self.inner.images.resolve(&spec.image) {
            Ok(image) => image,
            Err(ImageError::NotFound(_)) => {
                return Err(ManagerError::NotFound {
                    kind: "image",
                    id: spec.image.clone(),
                });
            }
            Err(err) => return Err(err.into()),
        };
        let log_path = if sandbox.spec.log_directory.is_empty() || spec.log_path.is_empty() {
            // No log: output is discarded, and no path is handed out for clients to touch.
            PathBuf::new()
        } else {
            log_path_under(&sandbox.spec.log_directory, &spec.log_path)?
        };
        let key = container_name_key(&sandbox.id, &spec);
        let id = new_id();
        {
            let mut names = self.names();
            if let Some(owner) = names.get(&key) {
                return Err(ManagerError::AlreadyExists(format!(
                    "container name {:?} (attempt {}) is already used by {owner} in this sandbox",
                    spec.metadata.name, spec.metadata.attempt
                )));
            }
            names.insert(key.clone(), id.clone());
        }
        let _guard = self.lock(&id).await;
        let linux = &self.inner.linux;
        let (runtime, vm) = if sandbox.backend == crate::backend::BackendKind::Vm {
            match self.create_vm(&id, &sandbox, &spec, &image, log_path).await {
                Ok((runtime, vm)) => (runtime, Some(vm)),
                Err(err) => {
                    self.names().remove(&key);
                    return Err(err);
                }
            }
        } else {
            let cgroup_path = format!("{}/{id}", sandbox.runtime.cgroup_path);
            let cgroup_procs = linux.cgroup_procs(&cgroup_path);
            let plan = ContainerPlan {
                id: &id,
                spec: &spec,
                sandbox: &sandbox.spec,
                sandbox_runtime: &sandbox.runtime,
                image: &image,
                layer_dirs: self.inner.images.layer_dirs(&image),
                bundle: linux.bundle_dir(&id),
                rw_dir: linux.rw_dir(&id),
                log_path,
                cgroup_procs,
                cgroup_path,
            };
            match linux.create_container(&plan) {
                Ok(runtime) => (runtime, None),
                Err(err) => {
                    self.names().remove(&key);
                    return Err(err.into());
                }
            }
        };
        let image_ref = image.repo_digests.first().cloned().unwrap_or_else(|| image.id.clone());
        let record = ContainerRecord {
            id: id.clone(),
            sandbox_id: sandbox.id.clone(),
            spec,
            image_id: image.id.clone(),
            image_ref,
            state: ContainerState::Created,
            created_at: now_nanos(),
            started_at: 0,
            finished_at: 0,
            exit_code: 0,
            reason: String::new(),
            message: String::new(),
            pid: None,
            monitor_pid: None,
            monitor_start_time: None,
            runtime,
            image_content: crate::image::ImageStore::content_of(&image),
            vm,
        };
        self.inner.images.pin(&id, record.image_content.clone());
        if let Err(err) = self.inner.store.save_container(&record) {
            self.inner.images.unpin(&id);
            if record.vm.is_some() {
                let _ = self.remove_vm(&record).await;
            } else {
                linux.remove_container(&record.runtime);
            }
            self.names().remove(&key);
            return Err(store_error("saving container record")(err));
        }
        self.emit(&record, EventKind::Created);
        self.containers().insert(id.clone(), record);
        Ok(id)
    }

    pub async fn start_container(&self, id: &str) -> Result<(), ManagerError> {
        let id = self.find_container_id(id).ok_or_else(|| ManagerError::NotFound {
            kind: "container",
            id: id.to_string(),
        })?;
        let _guard = self.lock(&id).await;
        let mut record = self.container(&id)?;
        if record.state != ContainerState::Created {
            return Err(ManagerError::FailedPrecondition(format!(
                "container {id} is {:?}, only a created container can be started",
                record.state
            )));
        }
        if record.vm.is_some() {
            return self.start_vm(record).await;
        }
        match self.inner.linux.start_container(&record.runtime).await {
            Ok(started) => {
                record.state = ContainerState::Running;
                record.started_at = now_nanos();
                record.pid = Some(started.pid);
                record.monitor_pid = Some(started.monitor_pid);
                record.monitor_start_time = process_start_time(started.monitor_pid);
                self.save(&record)?;
                self.emit(&record, EventKind::Started);
                let manager = self.clone();
                let mut monitor = started.monitor;
                let container_id = id.clone();
                tokio::spawn(async move {
                    let _ = monitor.wait().await;
                    manager.monitor_ended(&container_id).await;
                });
                Ok(())
            }
            Err(err) => {
                let message = crate::error_chain(&err);
                record.state = ContainerState::Exited;
                record.finished_at = now_nanos();
                record.exit_code = 128;
                record.reason = "StartError".into();
                record.message = message;
                self.save(&record)?;
                Err(err.into())
            }
        }
    }

    pub(super) fn save(&self, record: &ContainerRecord) -> Result<(), ManagerError> {
        self.inner
            .store
            .save_container(record)
            .map_err(store_error("saving container record"))?;
        self.containers().insert(record.id.clone(), record.clone());
        Ok(())
    }

    pub fn container(&self, id: &str) -> Result<ContainerRecord, ManagerError> {
        self.find_container_id(id)
            .and_then(|id| self.containers().get(&id).cloned())
            .ok_or_else(|| ManagerError::NotFound {
                kind: "container",
                id: id.to_string(),
            })
    }

    /// Records how a running container ended, from its monitor's exit record.
    pub(super) async fn monitor_ended(&self, id: &str) {
        let _guard = self.lock(id).await;
        let Ok(mut record) = self.container(id) else {
            return;
        };
        if record.state != ContainerState::Running {
            return;
        }
        self.settle_exit(&mut record);
        if let Err(err) = self.save(&record) {
            tracing::error!(container = %id, error = %crate::error_chain(&err), "recording container exit");
        }
        self.emit(&record, EventKind::Stopped);
    }

    /// Fills in the end of a container that is no longer running.
    pub(super) fn settle_exit(&self, record: &mut ContainerRecord) {
        if record.vm.is_some() {
            // Only reached when the helper ended; the domain's state is looked at by the VM watcher.
            return;
        }
        let linux = &self.inner.linux;
        record.state = ContainerState::Exited;
        match linux.exit_record(&record.runtime) {
            Some(exit) => {
                record.exit_code = exit.exit_code;
                record.finished_at = exit.finished_at;
                record.reason = if linux.oom_killed(&record.runtime) {
                    "OOMKilled".into()
                } else if exit.exit_code == 0 {
                    "Completed".into()
                } else {
                    "Error".into()
                };
                record.message = exit.start_error.unwrap_or_default();
            }
            None => {
                record.exit_code = 255;
                record.finished_at = now_nanos();
                record.reason = "Unknown".into();
                record.message = "the container's monitor ended without recording an exit".into();
            }
        }
        tracing::info!(container = %record.id, exit_code = record.exit_code, reason = %record.reason, "container exited");
    }

    /// Signals the container, waits up to `timeout` seconds, then kills it.
    /// Returns when it is gone. Unknown or stopped containers are fine.
    pub async fn stop_container(&self, id: &str, timeout: i64) -> Result<(), ManagerError> {
        let Some(id) = self.find_container_id(id) else {
            return Ok(());
        };
        let record = self.container(&id)?;
        if record.state != ContainerState::Running {
            return Ok(());
        }
        if record.vm.is_some() {
            return self.stop_vm(&record, timeout).await;
        }
        let signal = if !record.spec.stop_signal.is_empty() {
            record.spec.stop_signal.clone()
        } else {
            self.inner
                .images
                .resolve(&record.image_id)
                .map(|image| image.config.stop_signal)
                .unwrap_or_default()
        };
        let signal = signal_from_name(&signal).unwrap_or(nix::sys::signal::Signal::SIGTERM);
        let kill = |signal| {
            if let Some(pid) = record.pid {
                send_signal(pid, record.monitor_pid, record.monitor_start_time, signal);
            }
        };
        // A zero timeout means SIGKILL at once, as other runtimes do.
        if timeout > 0 {
            kill(signal);
            let deadline = std::time::Instant::now() + Duration::from_secs(timeout as u64);
            while self.is_running(&id) {
                if std::time::Instant::now() >= deadline {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            if !self.is_running(&id) {
                return Ok(());
            }
        }
        // The workload first; the monitor kills what it leaves. The whole
        // cgroup only if that did not end it.
        kill(nix::sys::signal::Signal::SIGKILL);
        let grace = std::time::Instant::now() + Duration::from_secs(2);
        while self.is_running(&id) && std::time::Instant::now() < grace {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if self.is_running(&id) {
            self.inner.linux.kill_all(&record.runtime);
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while self.is_running(&id) {
            if std::time::Instant::now() >= deadline {
                return Err(ManagerError::DeadlineExceeded(format!(
                    "container {id} did not stop after SIGKILL"
                )));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    fn is_running(&self, id: &str) -> bool {
        self.containers()
            .get(id)
            .is_some_and(|c| c.state == ContainerState::Running)
    }

    pub async fn remove_container(&self, id: &str) -> Result<(), ManagerError> {
        let Some(id) = self.find_container_id(id) else {
            return Ok(());
        };
        self.stop_container(&id, 0).await?;
        let _guard = self.lock(&id).await;
        let Ok(record) = self.container(&id) else {
            return Ok(());
        };
        if record.vm.is_some() {
            self.remove_vm(&record).await?;
        } else {
            let linux = self.inner.linux.clone();
            let runtime = record.runtime.clone();
            let _ = tokio::task::spawn_blocking(move || linux.remove_container(&runtime)).await;
        }
        self.inner
            .store
            .delete_container(&id)
            .map_err(store_error("deleting container record"))?;
        self.containers().remove(&id);
        self.inner.images.unpin(&id);
        self.names()
            .remove(&container_name_key(&record.sandbox_id, &record.spec));
        self.emit(&record, EventKind::Deleted);
        drop(_guard);
        self.forget_lock(&id);
        Ok(())
    }

    pub fn list_containers(
        &self,
        id_prefix: &str,
        sandbox_prefix: &str,
        state: Option<ContainerState>,
        labels: &HashMap<String, String>,
    ) -> Vec<ContainerRecord> {
        let mut out: Vec<ContainerRecord> = self
            .containers()
            .values()
            .filter(|r| r.id.starts_with(id_prefix) && r.sandbox_id.starts_with(sandbox_prefix))
            .filter(|r| state.is_none_or(|s| r.state == s))
            .filter(|r| super::labels_match(&r.spec.labels, labels))
            .cloned()
            .collect();
        out.sort_by_key(|r| r.created_at);
        out
    }

    /// The process config of an exec: the container's identity, a new command;
    /// with a terminal `TERM=xterm` unless the container sets `TERM`.
    pub(super) fn exec_process(
        &self,
        record: &ContainerRecord,
        command: Vec<String>,
        tty: bool,
    ) -> Result<ProcessConfig, ManagerError> {
        let bytes = std::fs::read(crate::backend::linux::monitor::config_path(&record.runtime.bundle))
            .map_err(store_error("reading container config"))?;
        let config: crate::backend::linux::monitor::InitConfig = serde_json::from_slice(&bytes)
            .map_err(|e| store_error("parsing container config")(std::io::Error::other(e)))?;
        let mut process = config.process;
        process.args = command;
        process.tty = tty;
        process.oom_score_adj = None;
        if tty && !process.env.iter().any(|e| e.starts_with("TERM=")) {
            process.env.push("TERM=xterm".into());
        }
        Ok(process)
    }

    pub async fn exec_sync(&self, id: &str, command: Vec<String>, timeout: i64) -> Result<ExecOutput, ManagerError> {
        if command.is_empty() {
            return Err(ManagerError::InvalidArgument("exec needs a command".into()));
        }
        let record = self.container(id)?;
        if record.vm.is_some() {
            return self.exec_sync_vm(&record, command, timeout).await;
        }
        let pid = match (record.state, record.pid) {
            (ContainerState::Running, Some(pid)) => pid,
            _ => {
                return Err(ManagerError::FailedPrecondition(format!(
                    "container {} is not running",
                    record.id
                )));
            }
        };
        let process = self.exec_process(&record, command, false)?;
        let timeout = (timeout > 0).then(|| Duration::from_secs(timeout as u64));
        self.inner
            .linux
            .exec_sync(&record.runtime, pid, process, timeout)
            .await
            .map_err(|err| match err {
                crate::backend::linux::LinuxError::Timeout(limit) => {
                    ManagerError::DeadlineExceeded(format!("command timed out after {limit:?}"))
                }
                other => other.into(),
            })
    }

    pub async fn reopen_log(&self, id: &str) -> Result<(), ManagerError> {
        let record = self.container(id)?;
        let monitor_pid = match (record.state, record.monitor_pid) {
            (ContainerState::Running, Some(pid)) => pid,
            _ => {
                return Err(ManagerError::FailedPrecondition(format!(
                    "container {} is not running",
                    record.id
                )));
            }
        };
        if record.runtime.log_path.as_os_str().is_empty() {
            return Ok(());
        }
        self.inner.linux.reopen_log(monitor_pid)?;
        // The monitor creates the file again; wait until it has.
        for _ in 0..100 {
            if record.runtime.log_path.exists() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Err(ManagerError::DeadlineExceeded(
            "the log file was not reopened within 1 s".into(),
        ))
    }

    pub async fn update_resources(&self, id: &str, resources: crate::cgroups::Resources) -> Result<(), ManagerError> {
        let mut record = self.container(id)?;
        let _guard = self.lock(&record.id).await;
        if record.state == ContainerState::Exited {
            return Err(ManagerError::FailedPrecondition(format!(
                "container {} has exited",
                record.id
            )));
        }
        if record.vm.is_none() {
            self.inner.linux.update_resources(&record.runtime, &resources)?;
        }
        record.spec.resources = resources;
        self.save(&record)
    }

    pub fn container_stats(&self, record: &ContainerRecord) -> Option<crate::cgroups::Stats> {
        match &record.vm {
            Some(vm) if record.state == ContainerState::Running => self.vm_stats(vm),
            Some(_) => None,
            None => self.inner.linux.stats(&record.runtime.cgroup_path),
        }
    }

    /// Interface counters inside a pod's network namespace.
    pub fn sandbox_interfaces(
        &self,
        netns: &std::path::Path,
    ) -> Vec<crate::backend::linux::sandbox::InterfaceCounters> {
        crate::backend::linux::sandbox::interface_counters(netns)
    }

    pub fn sandbox_stats(&self, cgroup_path: &str) -> Option<crate::cgroups::Stats> {
        self.inner.linux.stats(cgroup_path)
    }

    /// The container's own writes: the upper layer, or a VM's root overlay on the host.
    pub fn writable_layer_usage(&self, record: &ContainerRecord) -> crate::sys::fs::Usage {
        match &record.vm {
            Some(vm) => crate::sys::fs::tree_usage(&vm.dir.join("root.qcow2")).unwrap_or_default(),
            None => crate::sys::fs::tree_usage(&record.runtime.rw_dir.join("upper")).unwrap_or_default(),
        }
    }
}

/// Signals the workload, unless its monitor is gone or its PID was reused.
fn send_signal(pid: i32, monitor_pid: Option<i32>, monitor_start: Option<u64>, signal: nix::sys::signal::Signal) {
    if let Some(monitor) = monitor_pid
        && monitor_start.is_some()
        && process_start_time(monitor) != monitor_start
    {
        return;
    }
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_paths_stay_in_their_directory() {
        assert_eq!(
            log_path_under("/logs", "c/0.log").unwrap(),
            PathBuf::from("/logs/c/0.log")
        );
        assert!(log_path_under("/logs", "../escape.log").is_err());
        assert!(log_path_under("/logs", "/etc/passwd").is_err());
        assert!(log_path_under("/logs", "a/../../b").is_err());
    }

    #[test]
    fn signal_names() {
        use nix::sys::signal::Signal;
        assert_eq!(signal_from_name("SIGQUIT"), Some(Signal::SIGQUIT));
        assert_eq!(signal_from_name("usr1"), Some(Signal::SIGUSR1));
        assert_eq!(signal_from_name("9"), Some(Signal::SIGKILL));
        assert_eq!(signal_from_name("nope"), None);
    }
}
