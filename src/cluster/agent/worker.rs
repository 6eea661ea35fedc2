//! One pod's worker: it brings the pod's sandbox and containers to what the
//! spec asks (init containers in order, restart policy with back-off, probes),
//! writes the pod's status when it changes, and tears the pod down when it is
//! deleted. The runtime's state, found by CRI labels, is the source of truth,
//! so a restarted agent adopts what is already running.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::core::v1::{Container, ObjectReference, Pod, PodStatus};
use k8s_openapi::api::node::v1::RuntimeClass;
use serde_json::json;
use tokio::sync::{Notify, watch};

use super::Context;
use super::config::{self, ANNOTATION_HASH, pod_name, pod_namespace};
use super::cri::CriError;
use super::images::PullBackoff;
use super::probes::{ProbeStates, Prober};
use super::status::{InitProgress, Observed, Waiting, is_exited, is_running, pod_status};
use super::volumes::Prepared;
use crate::cluster::events::{EventType, now, reference};
use crate::cri::proto::runtime as api;

/// Periodic re-check of a live pod when nothing else wakes its worker.
const RESYNC: Duration = Duration::from_secs(10);
/// Retry after a failed step (runtime or API error).
const RETRY: Duration = Duration::from_secs(2);
/// How often configMap/secret/downwardAPI volumes are refreshed.
const VOLUME_REFRESH: Duration = Duration::from_secs(30);
const FIRST_RESTART_BACKOFF: Duration = Duration::from_secs(10);
const MAX_RESTART_BACKOFF: Duration = Duration::from_secs(300);
/// A container that ran this long without a problem resets its back-off.
const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(600);

/// The latest state of a pod as the informer saw it.
#[derive(Clone)]
pub struct Target {
    pub pod: Pod,
    /// Deleted from the API (or no longer bound here).
    pub gone: bool,
}

pub struct Handle {
    pub target: watch::Sender<Target>,
    pub wake: Arc<Notify>,
    pub task: tokio::task::JoinHandle<()>,
}

/// `involvedObject` for events about one of the pod's containers.
pub fn container_reference(pod: &Pod, name: &str) -> ObjectReference {
    let spec = pod.spec.clone().unwrap_or_default();
    let init = spec.init_containers.iter().flatten().any(|c| c.name == name);
    let mut reference = reference(pod);
    reference.field_path = Some(if init {
        format!("spec.initContainers{{{name}}}")
    } else {
        format!("spec.containers{{{name}}}")
    });
    reference
}

/// Where probes and httpGet hooks connect: the pod IP, the node's for host-network pods.
pub fn probe_host(ctx: &Context, pod: &Pod, pod_ip: Option<&str>) -> String {
    let host_network = pod.spec.as_ref().and_then(|s| s.host_network).unwrap_or(false);
    let known = pod_ip
        .map(str::to_string)
        .or_else(|| pod.status.as_ref().and_then(|s| s.pod_ip.clone()));
    match known {
        Some(ip) if !host_network && !ip.is_empty() => ip,
        _ => ctx.node_ip.to_string(),
    }
}

pub(super) struct Sandbox {
    pub id: String,
    pub config: api::PodSandboxConfig,
    pub ip: Option<String>,
}

/// What became of one container in a sync.
enum Outcome {
    Running,
    /// Exited and stays so (restart policy).
    Exited(i32),
    /// Waiting (back-off, image, config); retry at the given time.
    Waiting(Instant),
    Started,
}

pub(super) struct Worker {
    pub ctx: Arc<Context>,
    pub uid: String,
    pub pod: Pod,
    pub wake: Arc<Notify>,
    pub volumes: HashMap<String, Prepared>,
    volumes_at: Option<Instant>,
    pub sandbox: Option<Sandbox>,
    /// CRI containers of the current sandbox by name, newest attempt first.
    pub containers: HashMap<String, Vec<api::ContainerStatus>>,
    /// Exited containers never change: their status is read once.
    exited: HashMap<String, api::ContainerStatus>,
    pub waiting: HashMap<String, Waiting>,
    restart_backoff: HashMap<String, Duration>,
    pub pulls: PullBackoff,
    pub probers: HashMap<String, Prober>,
    pub probe_states: ProbeStates,
    init: InitProgress,
    /// The status last written (or found), for transition times.
    pub status: PodStatus,
    written: Option<serde_json::Value>,
    /// Succeeded or Failed: nothing runs any more.
    terminal: bool,
    /// When this worker first saw the pod, until a container runs.
    first_seen: Option<Instant>,
}

pub async fn run(ctx: Arc<Context>, uid: String, mut updates: watch::Receiver<Target>, wake: Arc<Notify>) {
    let mut target = updates.borrow_and_update().clone();
    let mut worker = Worker {
        status: target.pod.status.clone().unwrap_or_default(),
        ctx: ctx.clone(),
        uid: uid.clone(),
        pod: target.pod.clone(),
        wake,
        volumes: HashMap::new(),
        volumes_at: None,
        sandbox: None,
        containers: HashMap::new(),
        exited: HashMap::new(),
        waiting: HashMap::new(),
        restart_backoff: HashMap::new(),
        pulls: PullBackoff::default(),
        probers: HashMap::new(),
        probe_states: Default::default(),
        init: InitProgress::Running(0),
        written: None,
        terminal: false,
        first_seen: Some(Instant::now()),
    };
    loop {
        worker.pod = target.pod.clone();
        if target.gone || target.pod.metadata.deletion_timestamp.is_some() {
            worker.terminate(target.gone).await;
            break;
        }
        // A deletion interrupts whatever the sync is doing (e.g. a long pull).
        let deleted = |t: &Target| t.gone || t.pod.metadata.deletion_timestamp.is_some();
        let synced = tokio::select! {
            synced = worker.sync() => Some(synced),
            changed = updates.wait_for(deleted) => match changed {
                Ok(_) => None,
                Err(_) => return,
            },
        };
        let next = match synced {
            None => {
                target = updates.borrow_and_update().clone();
                continue;
            }
            Some(Ok(next)) => next,
            Some(Err(err)) => {
                tracing::warn!(pod = %worker.key(), error = %err, "pod sync failed; retrying");
                Some(Instant::now() + RETRY)
            }
        };
        let idle = if worker.terminal {
            Duration::from_secs(3600)
        } else {
            RESYNC
        };
        let deadline = next.unwrap_or_else(|| Instant::now() + idle);
        tokio::select! {
            changed = updates.changed() => if changed.is_err() { return },
            _ = worker.wake.notified() => {}
            _ = tokio::time::sleep_until(deadline.into()) => {}
        }
        target = updates.borrow_and_update().clone();
    }
    ctx.workers.remove(&uid);
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Cri(#[from] CriError),
    #[error("{0}")]
    Sandbox(String),
}

fn finished_at(c: &api::ContainerStatus) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_nanos(c.finished_at.max(0) as u64)
}

pub fn started_at(c: &api::ContainerStatus) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_nanos(c.started_at.max(0) as u64)
}

fn attempt(c: &api::ContainerStatus) -> u32 {
    c.metadata.as_ref().map_or(0, |m| m.attempt)
}

impl Worker {
    pub fn key(&self) -> String {
        format!("{}/{}", pod_namespace(&self.pod), pod_name(&self.pod))
    }

    pub fn emit(&self, container: Option<&str>, kind: EventType, reason: &str, message: String) {
        let object = match container {
            Some(name) => container_reference(&self.pod, name),
            None => reference(&self.pod),
        };
        self.ctx.recorder.emit(object, kind, reason, message);
    }

    pub fn pod_ip(&self) -> Option<&str> {
        self.sandbox.as_ref().and_then(|s| s.ip.as_deref())
    }

    async fn sync(&mut self) -> Result<Option<Instant>, SyncError> {
        if self.terminal {
            return Ok(None);
        }
        let phase = self.status.phase.as_deref();
        if self.written.is_none() && matches!(phase, Some("Succeeded" | "Failed")) {
            // Finished before this agent started: keep it as it is.
            self.observe().await?;
            self.finish().await;
            return Ok(None);
        }
        if self.volumes_at.is_none_or(|at| at.elapsed() >= VOLUME_REFRESH)
            && let Err(message) = self.prepare_volumes().await
        {
            self.emit(None, EventType::Warning, "FailedMount", message);
            self.publish_status().await;
            return Ok(Some(Instant::now() + RETRY * 2));
        }
        self.observe().await?;
        if self.sandbox.is_none() {
            self.create_sandbox().await?;
            self.observe().await?;
        }
        let mut next: Option<Instant> = None;
        let mut at = |when: Instant| next = Some(next.map_or(when, |n: Instant| n.min(when)));
        self.kill_failed_probes().await;
        self.init = self.run_init_containers(&mut at).await?;
        if self.init == InitProgress::Done {
            let spec = self.pod.spec.clone().unwrap_or_default();
            for container in &spec.containers {
                if let Outcome::Waiting(when) = self.drive(container, false).await? {
                    at(when);
                }
            }
        }
        self.refresh_containers().await?;
        self.sync_probers();
        if let Some(seen) = self
            .first_seen
            .take_if(|_| self.containers.values().flatten().any(is_running))
        {
            tracing::info!(pod = %self.key(), ms = seen.elapsed().as_millis() as u64, "pod running");
        }
        self.publish_status().await;
        if matches!(self.status.phase.as_deref(), Some("Succeeded" | "Failed")) {
            self.finish().await;
        }
        Ok(next)
    }

    async fn prepare_volumes(&mut self) -> Result<(), String> {
        let facts = super::env::Downward {
            pod: &self.pod,
            pod_ip: self.pod_ip().unwrap_or_default(),
            host_ip: &self.ctx.node_ip.to_string(),
            node_cpus: super::machine::cpus(),
            node_memory: super::machine::memory_bytes(),
        };
        self.volumes = super::volumes::prepare(&self.ctx.client, &self.ctx.options, &facts).await?;
        self.volumes_at = Some(Instant::now());
        Ok(())
    }

    /// Reads the pod's current sandbox and its containers from the runtime.
    async fn observe(&mut self) -> Result<(), CriError> {
        let cri = &self.ctx.cri;
        let labels = HashMap::from([
            (super::labels::POD_UID.to_string(), self.uid.clone()),
            (super::labels::NODE.to_string(), self.ctx.options.node_name.clone()),
        ]);
        let sandboxes = cri.list_sandboxes(labels).await?;
        let ready = api::PodSandboxState::SandboxReady as i32;
        let current = sandboxes
            .iter()
            .filter(|s| s.state == ready)
            .max_by_key(|s| s.created_at);
        match current {
            None => self.sandbox = None,
            Some(s) if self.sandbox.as_ref().is_some_and(|known| known.id == s.id) => {}
            Some(s) => {
                let status = cri.sandbox_status(&s.id).await?;
                let host_network = self.pod.spec.as_ref().and_then(|s| s.host_network).unwrap_or(false);
                let ip = match status.network.map(|n| n.ip).filter(|ip| !ip.is_empty()) {
                    _ if host_network => Some(self.ctx.node_ip.to_string()),
                    ip => ip,
                };
                let attempt = s.metadata.as_ref().map_or(0, |m| m.attempt);
                let config = config::sandbox_config(&self.ctx.options, &self.ctx.host_dns, &self.pod, attempt);
                self.sandbox = Some(Sandbox {
                    id: s.id.clone(),
                    config,
                    ip,
                });
            }
        }
        self.refresh_containers().await
    }

    pub async fn refresh_containers(&mut self) -> Result<(), CriError> {
        self.containers.clear();
        let Some(sandbox) = &self.sandbox else {
            return Ok(());
        };
        let filter = api::ContainerFilter {
            pod_sandbox_id: sandbox.id.clone(),
            ..Default::default()
        };
        let listed = self.ctx.cri.list_containers(filter).await?;
        self.exited.retain(|id, _| listed.iter().any(|c| &c.id == id));
        for container in listed {
            let status = match self.exited.get(&container.id) {
                Some(status) => status.clone(),
                None => match self.ctx.cri.container_status(&container.id).await {
                    Ok(mut status) => {
                        if is_exited(&status) {
                            status.message = self.termination_message(&status);
                            self.exited.insert(container.id.clone(), status.clone());
                        }
                        status
                    }
                    Err(err) if err.is_not_found() => continue,
                    Err(err) => return Err(err),
                },
            };
            let name = status.metadata.as_ref().map(|m| m.name.clone()).unwrap_or_default();
            self.containers.entry(name).or_default().push(status);
        }
        for history in self.containers.values_mut() {
            history.sort_by_key(|c| std::cmp::Reverse((attempt(c), c.created_at)));
        }
        Ok(())
    }

    async fn create_sandbox(&mut self) -> Result<(), SyncError> {
        let spec = self.pod.spec.clone().unwrap_or_default();
        let handler = match spec.runtime_class_name.as_deref().filter(|n| !n.is_empty()) {
            None => String::new(),
            Some(name) => match self.ctx.client.get_opt::<RuntimeClass>(None, name).await {
                Ok(Some(class)) => class.handler,
                Ok(None) => {
                    let message = format!("RuntimeClass {name:?} not found");
                    self.emit(None, EventType::Warning, "FailedCreatePodSandBox", message.clone());
                    return Err(SyncError::Sandbox(message));
                }
                Err(err) => return Err(SyncError::Sandbox(format!("reading RuntimeClass {name:?}: {err}"))),
            },
        };
        let labels = config::pod_labels(&self.ctx.options, &self.pod);
        let old = self.ctx.cri.list_sandboxes(labels).await?;
        let attempt = old
            .iter()
            .map(|s| s.metadata.as_ref().map_or(0, |m| m.attempt) + 1)
            .max()
            .unwrap_or(0);
        for stale in &old {
            self.ctx.cri.stop_sandbox(&stale.id).await?;
            self.ctx.cri.remove_sandbox(&stale.id).await?;
        }
        if !old.is_empty() {
            let message = "Pod sandbox changed, it will be killed and re-created.".to_string();
            self.emit(None, EventType::Normal, "SandboxChanged", message);
        }
        let log_dir = config::log_directory(&self.ctx.options, &self.pod);
        if let Err(err) = std::fs::create_dir_all(&log_dir) {
            return Err(SyncError::Sandbox(format!("creating {}: {err}", log_dir.display())));
        }
        let config = config::sandbox_config(&self.ctx.options, &self.ctx.host_dns, &self.pod, attempt);
        match self.ctx.cri.run_sandbox(config, &handler).await {
            Ok(id) => {
                tracing::debug!(pod = %self.key(), sandbox = %id, "sandbox running");
                Ok(())
            }
            Err(err) => {
                let message = format!("Failed to create pod sandbox: {}", err.status.message());
                self.emit(None, EventType::Warning, "FailedCreatePodSandBox", message);
                Err(err.into())
            }
        }
    }

    /// Runs init containers in order; each must succeed before the next starts.
    async fn run_init_containers(&mut self, at: &mut impl FnMut(Instant)) -> Result<InitProgress, SyncError> {
        let spec = self.pod.spec.clone().unwrap_or_default();
        // Once an app container exists, the init phase is over for this sandbox.
        if spec.containers.iter().any(|c| self.containers.contains_key(&c.name)) {
            return Ok(InitProgress::Done);
        }
        for (index, container) in spec.init_containers.iter().flatten().enumerate() {
            let sidecar = container.restart_policy.as_deref() == Some("Always");
            match self.drive(container, true).await? {
                Outcome::Exited(0) => continue,
                Outcome::Running | Outcome::Started if sidecar => continue,
                Outcome::Exited(_) => return Ok(InitProgress::Failed),
                Outcome::Waiting(when) => at(when),
                Outcome::Running | Outcome::Started => {}
            }
            return Ok(InitProgress::Running(index));
        }
        Ok(InitProgress::Done)
    }

    /// Whether an exited container is started again under the restart policy.
    fn restarts(&self, container: &Container, is_init: bool, exit_code: i32) -> bool {
        let pod_policy = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.restart_policy.as_deref())
            .unwrap_or("Always");
        let policy = match (is_init, container.restart_policy.as_deref(), pod_policy) {
            (true, Some("Always"), _) => "Always",
            (true, _, "Never") => "Never",
            (true, _, _) => "OnFailure",
            (false, _, policy) => policy,
        };
        match policy {
            "Always" => true,
            "OnFailure" => exit_code != 0,
            _ => false,
        }
    }

    /// Brings one container towards running (or completed) under its restart policy.
    async fn drive(&mut self, container: &Container, is_init: bool) -> Result<Outcome, SyncError> {
        let name = container.name.clone();
        let latest = self.containers.get(&name).and_then(|h| h.first()).cloned();
        let Some(latest) = latest else {
            return Ok(self.start(container, 0).await);
        };
        if is_running(&latest) {
            let changed = latest.annotations.get(ANNOTATION_HASH) != Some(&config::container_hash(container));
            let one_shot_init = is_init && container.restart_policy.as_deref() != Some("Always");
            if changed && !one_shot_init {
                let message = format!("Container {name} definition changed, will be restarted");
                self.kill_container(container, &latest.id, message, None).await;
                self.restart_backoff.remove(&name);
                // Back at once with the new definition, whatever the restart policy.
                return Ok(self.start(container, attempt(&latest) + 1).await);
            }
            return Ok(Outcome::Running);
        }
        if !is_exited(&latest) {
            // Created but never started (the agent stopped in between): replace it.
            self.ctx.cri.remove_container(&latest.id).await?;
            return Ok(self.start(container, attempt(&latest)).await);
        }
        if !self.restarts(container, is_init, latest.exit_code) {
            self.waiting.remove(&name);
            return Ok(Outcome::Exited(latest.exit_code));
        }
        let ran = finished_at(&latest)
            .duration_since(started_at(&latest))
            .unwrap_or_default();
        if ran >= BACKOFF_RESET_AFTER {
            self.restart_backoff.remove(&name);
        }
        let delay = self.restart_backoff.get(&name).copied().unwrap_or_default();
        let wait = (finished_at(&latest) + delay)
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        if !wait.is_zero() {
            let pod = format!("{}_{}({})", pod_name(&self.pod), pod_namespace(&self.pod), self.uid);
            let message = format!(
                "back-off {}s restarting failed container={name} pod={pod}",
                delay.as_secs()
            );
            self.waiting.insert(
                name.clone(),
                Waiting {
                    reason: "CrashLoopBackOff".into(),
                    message,
                },
            );
            let text = format!("Back-off restarting failed container {name} in pod {pod}");
            self.emit(Some(&name), EventType::Warning, "BackOff", text);
            return Ok(Outcome::Waiting(Instant::now() + wait));
        }
        let next_delay = if delay.is_zero() {
            FIRST_RESTART_BACKOFF
        } else {
            (delay * 2).min(MAX_RESTART_BACKOFF)
        };
        self.restart_backoff.insert(name.clone(), next_delay);
        // Keep only the latest dead container (for lastState and `logs -p`).
        for old in self.containers.get(&name).into_iter().flatten().skip(1) {
            let _ = self.ctx.cri.remove_container(&old.id).await;
        }
        Ok(self.start(container, attempt(&latest) + 1).await)
    }

    async fn start(&mut self, container: &Container, attempt: u32) -> Outcome {
        match self.start_container(container, attempt).await {
            Ok(_) => {
                self.waiting.remove(&container.name);
                Outcome::Started
            }
            Err((waiting, retry)) => {
                self.waiting.insert(container.name.clone(), waiting);
                Outcome::Waiting(retry)
            }
        }
    }

    pub async fn publish_status(&mut self) {
        let probes = self.probe_states.lock().unwrap().clone();
        let host_ip = self.ctx.node_ip.to_string();
        let status = pod_status(&Observed {
            pod: &self.pod,
            previous: &self.status,
            runtime_name: &self.ctx.runtime_name,
            host_ip: &host_ip,
            pod_ip: self.pod_ip(),
            sandbox_ready: self.sandbox.is_some(),
            containers: &self.containers,
            waiting: &self.waiting,
            probes: &probes,
            init: self.init,
            now: now(),
        });
        let value = match serde_json::to_value(&status) {
            Ok(value) => value,
            Err(_) => return,
        };
        if self.written.as_ref() == Some(&value) {
            return;
        }
        let patch = json!({ "status": value });
        let result = self
            .ctx
            .client
            .merge_patch::<Pod>(
                Some(pod_namespace(&self.pod)),
                pod_name(&self.pod),
                Some("status"),
                &patch,
            )
            .await;
        match result {
            Ok(_) => {
                self.written = Some(value);
                self.status = status;
            }
            Err(err) if err.is_not_found() => {}
            Err(err) => tracing::warn!(pod = %self.key(), error = %err, "writing the pod status"),
        }
    }

    /// The pod is done: stop probing and release the sandbox (containers stay for their logs).
    async fn finish(&mut self) {
        self.terminal = true;
        self.probers.clear();
        if let Some(sandbox) = self.sandbox.take()
            && let Err(err) = self.ctx.cri.stop_sandbox(&sandbox.id).await
        {
            tracing::warn!(pod = %self.key(), error = %err, "stopping the sandbox of a finished pod");
        }
    }
}
