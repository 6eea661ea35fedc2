//! Sandbox operations.

use std::collections::HashMap;

use super::records::{ContainerState, SandboxRecord, SandboxState};
use super::{Manager, ManagerError, new_id, now_nanos, sandbox_name_key, store_error};
use crate::backend;
use crate::spec::SandboxSpec;

impl Manager {
    pub async fn run_sandbox(&self, spec: SandboxSpec) -> Result<String, ManagerError> {
        let kind = backend::backend_for_sandbox(&spec.runtime_handler, &spec.annotations).ok_or_else(|| {
            ManagerError::InvalidArgument(format!(
                "unknown runtime handler {:?} (known: {:?})",
                spec.runtime_handler,
                backend::all_handlers().collect::<Vec<_>>()
            ))
        })?;
        if spec.metadata.name.is_empty() || spec.metadata.namespace.is_empty() {
            return Err(ManagerError::InvalidArgument(
                "sandbox metadata needs a name and a namespace".into(),
            ));
        }
        let id = new_id();
        let key = sandbox_name_key(&spec);
        {
            let mut names = self.names();
            if let Some(owner) = names.get(&key) {
                return Err(ManagerError::AlreadyExists(format!(
                    "sandbox name {key} is already used by {owner}"
                )));
            }
            names.insert(key.clone(), id.clone());
        }
        let _guard = self.lock(&id).await;
        let linux = self.inner.linux.clone();
        let id_for_task = id.clone();
        let spec_for_task = spec.clone();
        let created = tokio::task::spawn_blocking(move || linux.run_sandbox(&id_for_task, &spec_for_task)).await;
        let runtime = match created {
            Ok(Ok(runtime)) => runtime,
            Ok(Err(err)) => {
                self.names().remove(&key);
                return Err(err.into());
            }
            Err(join) => {
                self.names().remove(&key);
                return Err(ManagerError::FailedPrecondition(format!(
                    "sandbox setup task failed: {join}"
                )));
            }
        };
        let network = match &runtime.netns {
            Some(netns) if spec.namespaces.network != crate::spec::NamespaceMode::Node => {
                match self.inner.network.attach(&id, &spec, netns, &runtime.dir).await {
                    Ok(attachment) => Some(attachment),
                    Err(err) => {
                        self.discard_sandbox(&runtime, &key).await;
                        return Err(err.into());
                    }
                }
            }
            _ => None,
        };
        let record = SandboxRecord {
            id: id.clone(),
            spec,
            state: SandboxState::Ready,
            created_at: now_nanos(),
            backend: kind,
            runtime,
            network,
        };
        if let Err(err) = self.inner.store.save_sandbox(&record) {
            if let Some(network) = &record.network {
                let _ = self
                    .inner
                    .network
                    .detach(&id, record.runtime.netns.as_deref(), network)
                    .await;
            }
            self.discard_sandbox(&record.runtime, &key).await;
            return Err(store_error("saving sandbox record")(err));
        }
        self.sandboxes().insert(id.clone(), record);
        tracing::info!(sandbox = %id, "sandbox ready");
        Ok(id)
    }

    /// Stops every container of the sandbox and what keeps it running. Unknown ids are fine.
    pub async fn stop_sandbox(&self, id: &str) -> Result<(), ManagerError> {
        let Some(id) = self.find_sandbox_id(id) else {
            return Ok(());
        };
        let container_ids: Vec<String> = self
            .containers()
            .values()
            .filter(|c| c.sandbox_id == id && c.state == ContainerState::Running)
            .map(|c| c.id.clone())
            .collect();
        for container in container_ids {
            self.stop_container(&container, 0).await?;
        }
        let _guard = self.lock(&id).await;
        let Some(mut record) = self.sandboxes().get(&id).cloned() else {
            return Ok(());
        };
        if record.network.is_none() && record.state == SandboxState::NotReady {
            return Ok(());
        }
        if let Some(network) = &record.network {
            self.inner
                .network
                .detach(&id, record.runtime.netns.as_deref(), network)
                .await?;
            record.network = None;
        }
        self.inner.linux.stop_sandbox(&record.runtime);
        record.state = SandboxState::NotReady;
        self.inner
            .store
            .save_sandbox(&record)
            .map_err(store_error("saving sandbox record"))?;
        self.sandboxes().insert(id.clone(), record);
        tracing::info!(sandbox = %id, "sandbox stopped");
        Ok(())
    }

    /// Removes the sandbox with all its containers. Unknown ids are fine.
    pub async fn remove_sandbox(&self, id: &str) -> Result<(), ManagerError> {
        let Some(id) = self.find_sandbox_id(id) else {
            return Ok(());
        };
        let container_ids: Vec<String> = self
            .containers()
            .values()
            .filter(|c| c.sandbox_id == id)
            .map(|c| c.id.clone())
            .collect();
        for container in container_ids {
            self.remove_container(&container).await?;
        }
        let _guard = self.lock(&id).await;
        let Some(record) = self.sandboxes().get(&id).cloned() else {
            return Ok(());
        };
        if let Some(network) = &record.network {
            self.inner
                .network
                .detach(&id, record.runtime.netns.as_deref(), network)
                .await?;
        }
        let linux = self.inner.linux.clone();
        let runtime = record.runtime.clone();
        let _ = tokio::task::spawn_blocking(move || linux.remove_sandbox(&runtime)).await;
        self.inner
            .store
            .delete_sandbox(&id)
            .map_err(store_error("deleting sandbox record"))?;
        self.sandboxes().remove(&id);
        self.names().remove(&sandbox_name_key(&record.spec));
        drop(_guard);
        self.forget_lock(&id);
        tracing::info!(sandbox = %id, "sandbox removed");
        Ok(())
    }

    /// Undoes a sandbox that never got its record.
    async fn discard_sandbox(&self, runtime: &crate::backend::linux::sandbox::SandboxRuntime, name_key: &str) {
        let linux = self.inner.linux.clone();
        let runtime = runtime.clone();
        let _ = tokio::task::spawn_blocking(move || linux.remove_sandbox(&runtime)).await;
        self.names().remove(name_key);
    }

    /// Whether pods can be attached to the network now, or why not.
    pub fn pod_subnets(&self) -> Vec<String> {
        self.inner.network.pod_subnets()
    }

    pub async fn network_ready(&self) -> Result<String, String> {
        self.inner.network.ready().await
    }

    /// New pod-level resources (kubelet's in-place resize). Applied to the pod
    /// cgroup when podvisor made it; a cgroup parent from kubelet is kubelet's
    /// to size, so then they are only recorded.
    pub async fn update_sandbox_resources(
        &self,
        id: &str,
        resources: crate::cgroups::Resources,
    ) -> Result<(), ManagerError> {
        let mut record = self.sandbox(id)?;
        let _guard = self.lock(&record.id).await;
        if record.state != SandboxState::Ready {
            return Err(ManagerError::FailedPrecondition(format!(
                "sandbox {} is not ready",
                record.id
            )));
        }
        if record.runtime.owns_cgroup {
            self.inner
                .linux
                .update_sandbox_resources(&record.runtime.cgroup_path, &resources)?;
        }
        record.spec.resources = resources;
        self.inner
            .store
            .save_sandbox(&record)
            .map_err(store_error("saving sandbox record"))?;
        self.sandboxes().insert(record.id.clone(), record);
        Ok(())
    }

    pub fn sandbox(&self, id: &str) -> Result<SandboxRecord, ManagerError> {
        self.find_sandbox_id(id)
            .and_then(|id| self.sandboxes().get(&id).cloned())
            .ok_or_else(|| ManagerError::NotFound {
                kind: "sandbox",
                id: id.to_string(),
            })
    }

    pub fn list_sandboxes(
        &self,
        id_prefix: &str,
        state: Option<SandboxState>,
        labels: &HashMap<String, String>,
    ) -> Vec<SandboxRecord> {
        let mut out: Vec<SandboxRecord> = self
            .sandboxes()
            .values()
            .filter(|r| r.id.starts_with(id_prefix))
            .filter(|r| state.is_none_or(|s| r.state == s))
            .filter(|r| super::labels_match(&r.spec.labels, labels))
            .cloned()
            .collect();
        out.sort_by_key(|r| r.created_at);
        out
    }
}
