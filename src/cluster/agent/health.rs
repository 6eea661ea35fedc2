//! Container health for a pod's worker: one prober per running container,
//! restarts when a liveness or startup probe gives up, and kills with the
//! preStop hook.

use std::time::Duration;

use k8s_openapi::api::core::v1::Container;

use super::probes::{self, ProbeState};
use super::status::is_running;
use super::worker::{Worker, container_reference, probe_host, started_at};
use crate::cluster::events::EventType;
use crate::cri::proto::runtime as api;

impl Worker {
    /// Stops a container (preStop hook first) so that the restart policy takes over.
    pub async fn kill_container(&mut self, container: &Container, id: &str, message: String, grace: Option<i64>) {
        self.emit(Some(&container.name), EventType::Normal, "Killing", message);
        let grace = grace
            .or_else(|| self.pod.spec.as_ref().and_then(|s| s.termination_grace_period_seconds))
            .unwrap_or(30)
            .max(0);
        if let Some(hook) = container.lifecycle.as_ref().and_then(|l| l.pre_stop.as_ref()) {
            let target = self.probe_target(container, id);
            if let Err(message) = probes::run_hook(&self.ctx, &target, hook, Duration::from_secs(grace as u64)).await {
                let text = format!("PreStopHook failed: {message}");
                self.emit(Some(&container.name), EventType::Warning, "FailedPreStopHook", text);
            }
        }
        if let Err(err) = self.ctx.cri.stop_container(id, grace).await {
            tracing::warn!(pod = %self.key(), container = id, error = %err, "stopping a container");
        }
        self.probers.remove(id);
        self.probe_states.lock().unwrap().remove(id);
    }

    pub fn probe_target(&self, container: &Container, id: &str) -> probes::Target {
        probes::Target {
            container_id: id.into(),
            container: container.clone(),
            host: probe_host(&self.ctx, &self.pod, self.pod_ip()),
            reference: container_reference(&self.pod, &container.name),
        }
    }

    pub fn spec_container(&self, name: &str) -> Option<(Container, bool)> {
        let spec = self.pod.spec.clone().unwrap_or_default();
        if let Some(c) = spec.containers.into_iter().find(|c| c.name == name) {
            return Some((c, false));
        }
        spec.init_containers
            .into_iter()
            .flatten()
            .find(|c| c.name == name)
            .map(|c| (c, true))
    }

    /// Restarts containers whose liveness or startup probe gave up on them.
    pub async fn kill_failed_probes(&mut self) {
        let failed: Vec<(String, String)> = self
            .probe_states
            .lock()
            .unwrap()
            .iter()
            .filter_map(|(id, s)| s.failed.clone().map(|m| (id.clone(), m)))
            .collect();
        for (id, message) in failed {
            let found = self
                .containers
                .values()
                .flatten()
                .find(|c| c.id == id && is_running(c))
                .cloned();
            let name = found.as_ref().and_then(|c| c.metadata.as_ref()).map(|m| m.name.clone());
            match name.and_then(|n| self.spec_container(&n)) {
                Some((container, _)) => {
                    let grace = container
                        .liveness_probe
                        .as_ref()
                        .and_then(|p| p.termination_grace_period_seconds);
                    self.kill_container(&container, &id, message, grace).await;
                    self.refresh_containers().await.ok();
                }
                None => {
                    self.probe_states.lock().unwrap().remove(&id);
                }
            }
        }
    }

    /// Keeps one prober per running container with probes (regular init containers have none).
    pub fn sync_probers(&mut self) {
        let running: Vec<(api::ContainerStatus, Container)> = self
            .containers
            .values()
            .flatten()
            .filter(|c| is_running(c))
            .filter_map(|c| {
                let name = c.metadata.as_ref()?.name.clone();
                let (spec, is_init) = self.spec_container(&name)?;
                (!is_init || spec.restart_policy.as_deref() == Some("Always")).then(|| (c.clone(), spec))
            })
            .collect();
        self.probers.retain(|id, _| running.iter().any(|(c, _)| &c.id == id));
        self.probe_states
            .lock()
            .unwrap()
            .retain(|id, _| self.containers.values().flatten().any(|c| &c.id == id));
        for (status, spec) in running {
            if self.probers.contains_key(&status.id) {
                continue;
            }
            // Adopted after a restart: keep the readiness the status already shows.
            let container_id = format!("{}://{}", self.ctx.runtime_name, status.id);
            let known_ready = self
                .status
                .container_statuses
                .iter()
                .chain(self.status.init_container_statuses.iter())
                .flatten()
                .any(|s| s.container_id.as_deref() == Some(&container_id) && s.ready);
            if known_ready {
                self.probe_states.lock().unwrap().insert(
                    status.id.clone(),
                    ProbeState {
                        started: true,
                        ready: true,
                        failed: None,
                    },
                );
            }
            let target = self.probe_target(&spec, &status.id);
            let prober = probes::start(
                self.ctx.clone(),
                target,
                started_at(&status),
                self.probe_states.clone(),
                self.wake.clone(),
            );
            self.probers.insert(status.id.clone(), prober);
        }
    }
}
