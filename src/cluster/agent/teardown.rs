//! Stopping pods: preStop hooks, StopContainer within the grace period, then
//! StopPodSandbox and RemovePodSandbox, volumes and logs. Also the sweeps for
//! sandboxes of pods that no longer exist and for `podvisor down`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;

use super::config::{ANNOTATION_GRACE, log_directory, pod_name, pod_namespace};
use super::cri::{Cri, CriError};
use super::probes::{Target, run_hook};
use super::worker::Worker;
use super::{AgentOptions, Context, labels, volumes};
use crate::cluster::events::{EventType, now};
use crate::cri::proto::runtime as api;

/// Grace for containers of pods that vanished from the API.
pub const ORPHAN_GRACE: Duration = Duration::from_secs(2);
/// Pause between attempts of the final DELETE.
const DELETE_RETRY: Duration = Duration::from_secs(1);
/// Upper bound of the grace used by `podvisor down`.
const DOWN_GRACE_CAP: i64 = 30;

fn uid_filter(options: &AgentOptions, uid: &str) -> HashMap<String, String> {
    HashMap::from([
        (labels::POD_UID.to_string(), uid.to_string()),
        (labels::NODE.to_string(), options.node_name.clone()),
    ])
}

async fn running_containers(cri: &Cri, labels: HashMap<String, String>) -> Result<Vec<api::Container>, CriError> {
    cri.list_containers(api::ContainerFilter {
        state: Some(api::ContainerStateValue {
            state: api::ContainerState::ContainerRunning as i32,
        }),
        label_selector: labels,
        ..Default::default()
    })
    .await
}

/// Stops one container: its preStop hook (when the pod is known), then
/// StopContainer with what is left of the grace period.
async fn stop_container(ctx: &Context, pod: Option<&Pod>, container: &api::Container, deadline: Instant) {
    let name = container
        .labels
        .get(labels::CONTAINER_NAME)
        .cloned()
        .unwrap_or_default();
    if let Some(pod) = pod {
        let spec = pod.spec.clone().unwrap_or_default();
        let found = spec
            .containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
            .find(|c| c.name == name)
            .cloned();
        let reference = super::worker::container_reference(pod, &name);
        if let Some(c) = found
            && let Some(hook) = c.lifecycle.as_ref().and_then(|l| l.pre_stop.clone())
        {
            let target = Target {
                container_id: container.id.clone(),
                container: c,
                host: super::worker::probe_host(ctx, pod, None),
                reference: reference.clone(),
            };
            let limit = deadline.saturating_duration_since(Instant::now());
            if let Err(message) = run_hook(ctx, &target, &hook, limit).await {
                ctx.recorder.emit(
                    reference.clone(),
                    EventType::Warning,
                    "FailedPreStopHook",
                    format!("PreStopHook failed: {message}"),
                );
            }
        }
        ctx.recorder.emit(
            reference,
            EventType::Normal,
            "Killing",
            format!("Stopping container {name}"),
        );
    }
    let grace = deadline.saturating_duration_since(Instant::now()).as_secs() as i64;
    if let Err(err) = ctx.cri.stop_container(&container.id, grace).await
        && !err.is_not_found()
    {
        tracing::warn!(container = %container.id, error = %err, "stopping a container");
    }
}

/// Stops all of a pod's containers (in parallel, hooks first), then removes its
/// sandboxes, volumes and logs.
pub async fn kill_pod(ctx: &Context, pod: Option<&Pod>, uid: &str, grace: Duration) -> Result<(), CriError> {
    let deadline = Instant::now() + grace;
    let filter = uid_filter(&ctx.options, uid);
    let containers = running_containers(&ctx.cri, filter.clone()).await?;
    futures_util::future::join_all(containers.iter().map(|c| stop_container(ctx, pod, c, deadline))).await;
    remove_sandboxes(&ctx.cri, &ctx.options, filter).await?;
    if let Err(err) = volumes::remove(&ctx.options, uid) {
        tracing::warn!(pod = uid, error = %err, "removing the pod's volumes");
    }
    if let Some(pod) = pod {
        let _ = std::fs::remove_dir_all(log_directory(&ctx.options, pod));
    }
    Ok(())
}

/// Stops and removes the sandboxes matching `filter` (and with them their containers).
async fn remove_sandboxes(cri: &Cri, options: &AgentOptions, filter: HashMap<String, String>) -> Result<(), CriError> {
    for sandbox in cri.list_sandboxes(filter).await? {
        cri.stop_sandbox(&sandbox.id).await?;
        cri.remove_sandbox(&sandbox.id).await?;
        if let (Some(ns), Some(name), Some(uid)) = (
            sandbox.labels.get(labels::POD_NAMESPACE),
            sandbox.labels.get(labels::POD_NAME),
            sandbox.labels.get(labels::POD_UID),
        ) {
            let _ = std::fs::remove_dir_all(options.pod_log_dir.join(format!("{ns}_{name}_{uid}")));
        }
    }
    Ok(())
}

/// Removes what belongs to pods the API no longer has (`known` are the pods it has).
pub async fn remove_orphans(ctx: Arc<Context>, known: Vec<String>) {
    let known: HashSet<String> = known.into_iter().collect();
    let node = HashMap::from([(labels::NODE.to_string(), ctx.options.node_name.clone())]);
    let sandboxes = match ctx.cri.list_sandboxes(node).await {
        Ok(sandboxes) => sandboxes,
        Err(err) => {
            tracing::warn!(error = %err, "listing sandboxes to find orphans");
            return;
        }
    };
    let mut orphans: HashSet<String> = sandboxes
        .iter()
        .filter_map(|s| s.labels.get(labels::POD_UID).cloned())
        .collect();
    orphans.extend(volumes::known_pods(&ctx.options));
    let workers = ctx.workers.0.lock().unwrap().keys().cloned().collect::<HashSet<_>>();
    orphans.retain(|uid| !known.contains(uid) && !workers.contains(uid));
    for uid in orphans {
        tracing::info!(pod = %uid, "removing the sandboxes of a pod that no longer exists");
        if let Err(err) = kill_pod(&ctx, None, &uid, ORPHAN_GRACE).await {
            tracing::warn!(pod = %uid, error = %err, "removing an orphaned pod");
        }
    }
}

/// Stops and removes every sandbox of this node agent (`podvisor down`),
/// giving containers their pod's grace period (at most 30 s).
pub async fn remove_all(cri: &Cri, options: &AgentOptions) {
    let node = HashMap::from([(labels::NODE.to_string(), options.node_name.clone())]);
    let containers = running_containers(cri, node.clone()).await.unwrap_or_default();
    let stops = containers.iter().map(|c| {
        let grace = c
            .annotations
            .get(ANNOTATION_GRACE)
            .and_then(|g| g.parse::<i64>().ok())
            .unwrap_or(30)
            .clamp(0, DOWN_GRACE_CAP);
        cri.stop_container(&c.id, grace)
    });
    for result in futures_util::future::join_all(stops).await {
        if let Err(err) = result {
            tracing::warn!(error = %err, "stopping a container");
        }
    }
    if let Err(err) = remove_sandboxes(cri, options, node).await {
        tracing::warn!(error = %err, "removing sandboxes");
    }
    for uid in volumes::known_pods(options) {
        if let Err(err) = volumes::remove(options, &uid) {
            tracing::warn!(pod = %uid, error = %err, "removing the pod's volumes");
        }
    }
}

impl Worker {
    /// Graceful deletion (or the pod vanished): stop everything, then remove the pod object.
    pub async fn terminate(&mut self, gone: bool) {
        self.probers.clear();
        let grace = if gone {
            ORPHAN_GRACE
        } else {
            let deadline = self.pod.metadata.deletion_timestamp.as_ref().map(|t| t.0.as_second());
            let left = deadline.map_or(0, |d| d - now().as_second());
            Duration::from_secs(left.max(0) as u64)
        };
        let mut delay = Duration::from_millis(500);
        while let Err(err) = kill_pod(&self.ctx, Some(&self.pod), &self.uid, grace).await {
            tracing::warn!(pod = %self.key(), error = %err, "stopping the pod; retrying");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(10));
        }
        if gone {
            return;
        }
        for _ in 0..10 {
            let namespace = Some(pod_namespace(&self.pod));
            match self
                .ctx
                .client
                .delete::<Pod>(namespace, pod_name(&self.pod), Some(0))
                .await
            {
                Ok(()) => return,
                Err(err) => {
                    tracing::warn!(pod = %self.key(), error = %err, "deleting the pod object");
                    tokio::time::sleep(DELETE_RETRY).await;
                }
            }
        }
    }
}
