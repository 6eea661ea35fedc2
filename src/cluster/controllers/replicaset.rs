//! ReplicaSet controller: keeps `spec.replicas` active pods matching the selector. It creates pods from the
//! template (with a controller reference and `generateName`), deletes the least useful extra pods first,
//! adopts matching orphans, releases owned pods that stopped matching, and reports status.

use std::time::Duration;

use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use serde_json::json;
use tokio::sync::broadcast::error::RecvError;

use super::workload::{
    Expectations, WorkQueue, availability, controlled_by, controller_of, controller_ref, is_active, is_deleting,
    is_ready, name, selector_matches, uid,
};
use crate::cluster::client::{Client, ClientError, ListParams};
use crate::cluster::events::{EventType, Recorder, now, reference};
use crate::cluster::informer::{Change, Informer, object_key};

/// At most this many pods are created or deleted per reconcile of one ReplicaSet.
const BURST: usize = 100;
struct Controller {
    client: Client,
    pods: Informer<Pod>,
    sets: Informer<ReplicaSet>,
    recorder: Recorder,
    queue: WorkQueue,
    expect: Expectations,
}

pub fn spawn(client: Client) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let pods: Informer<Pod> = Informer::spawn(client.clone(), None, ListParams::default());
        let sets: Informer<ReplicaSet> = Informer::spawn(client.clone(), None, ListParams::default());
        let mut pod_changes = pods.subscribe();
        let mut set_changes = sets.subscribe();
        pods.wait_synced().await;
        sets.wait_synced().await;
        let recorder = Recorder::new(client.clone(), "replicaset-controller", None);
        let mut c = Controller {
            client,
            pods,
            sets,
            recorder,
            queue: WorkQueue::default(),
            expect: Expectations::default(),
        };
        c.enqueue_all();
        loop {
            tokio::select! {
                change = pod_changes.recv() => if !c.on_pod(change) { return },
                change = set_changes.recv() => if !c.on_set(change) { return },
                _ = tokio::time::sleep_until(c.queue.next_due()) => {}
            }
            loop {
                let more = match pod_changes.try_recv() {
                    Ok(change) => c.on_pod(Ok(change)),
                    Err(tokio::sync::broadcast::error::TryRecvError::Lagged(n)) => c.on_pod(Err(RecvError::Lagged(n))),
                    Err(_) => break,
                };
                if !more {
                    return;
                }
            }
            while let Ok(change) = set_changes.try_recv() {
                c.on_set(Ok(change));
            }
            for key in c.queue.take() {
                match c.sync(&key).await {
                    Ok(after) => {
                        c.queue.succeeded(&key);
                        if let Some(after) = after {
                            c.queue.add_after(&key, after);
                        }
                    }
                    Err(err) => {
                        tracing::debug!(replicaset = key, error = %err, "reconciling; will retry");
                        c.queue.retry(&key);
                    }
                }
            }
        }
    })
}

impl Controller {
    fn enqueue_all(&mut self) {
        for rs in self.sets.list() {
            self.queue.add(object_key(&rs.metadata));
        }
    }

    /// False when the informer is gone.
    fn on_set(&mut self, change: Result<Change<ReplicaSet>, RecvError>) -> bool {
        match change {
            Ok(Change::Applied(rs) | Change::Deleted(rs)) => self.queue.add(object_key(&rs.metadata)),
            Ok(Change::Resynced) | Err(RecvError::Lagged(_)) => self.enqueue_all(),
            Err(RecvError::Closed) => return false,
        }
        true
    }

    fn on_pod(&mut self, change: Result<Change<Pod>, RecvError>) -> bool {
        let pod = match change {
            Ok(Change::Applied(pod) | Change::Deleted(pod)) => pod,
            Ok(Change::Resynced) | Err(RecvError::Lagged(_)) => {
                self.enqueue_all();
                return true;
            }
            Err(RecvError::Closed) => return false,
        };
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        match controller_of(&pod.metadata) {
            Some(r) if r.kind == "ReplicaSet" => self.queue.add(format!("{ns}/{}", r.name)),
            Some(_) => {}
            // An orphan: any ReplicaSet that selects it may adopt it.
            None => {
                for rs in self.sets.list() {
                    if rs.metadata.namespace.as_deref() == Some(ns.as_str())
                        && selector_matches(rs.spec.as_ref().map(|s| &s.selector), pod.metadata.labels.as_ref())
                    {
                        self.queue.add(object_key(&rs.metadata));
                    }
                }
            }
        }
        true
    }

    /// Reconciles one ReplicaSet; returns when to look again (e.g. for minReadySeconds).
    async fn sync(&mut self, key: &str) -> Result<Option<Duration>, ClientError> {
        let Some(rs) = self.sets.get(key) else {
            self.expect.forget(key);
            return Ok(None);
        };
        let ns = rs.metadata.namespace.clone().unwrap_or_default();
        if !self.expect.caught_up(key, &ns, &self.pods) {
            return Ok(None);
        }
        let spec = rs.spec.clone().unwrap_or_default();
        let rs_uid = uid(&rs.metadata).to_string();
        let mut owned: Vec<Pod> = Vec::new();
        for pod in self.pods.list() {
            if pod.metadata.namespace.as_deref() != Some(ns.as_str()) {
                continue;
            }
            let matches = selector_matches(Some(&spec.selector), pod.metadata.labels.as_ref());
            match controller_of(&pod.metadata) {
                Some(r) if r.uid == rs_uid => {
                    if matches {
                        owned.push(pod);
                    } else if !is_deleting(&rs.metadata) {
                        self.set_owners(&pod, None).await?;
                    }
                }
                None if matches && is_active(&pod) && !is_deleting(&rs.metadata) => {
                    let adopted = self.set_owners(&pod, Some(&rs)).await?;
                    if controlled_by(&adopted.metadata, &rs_uid) {
                        owned.push(adopted);
                    }
                }
                _ => {}
            }
        }
        let active: Vec<&Pod> = owned.iter().filter(|p| is_active(p)).collect();
        let want = spec.replicas.unwrap_or(1).max(0) as usize;
        let mut failure = None;
        if !is_deleting(&rs.metadata) {
            if active.len() < want {
                failure = self.create_pods(&rs, (want - active.len()).min(BURST)).await.err();
            } else if active.len() > want {
                let mut ranked = active.clone();
                ranked.sort_by_key(|p| deletion_rank(p));
                self.delete_pods(&rs, &ranked[..(active.len() - want).min(BURST)])
                    .await?;
            }
        }
        let recheck = self.update_status(&rs, &active, failure.as_ref()).await?;
        match failure {
            // Retried with backoff; the condition says why meanwhile.
            Some(err) => Err(err),
            None => Ok(recheck),
        }
    }

    /// Sets a pod's controller to `rs` (adopt) or removes the controller reference (release).
    async fn set_owners(&self, pod: &Pod, rs: Option<&ReplicaSet>) -> Result<Pod, ClientError> {
        let mut refs: Vec<_> = pod
            .metadata
            .owner_references
            .clone()
            .unwrap_or_default()
            .into_iter()
            .filter(|r| r.controller != Some(true))
            .collect();
        if let Some(rs) = rs {
            refs.push(controller_ref(rs));
        }
        let patch = json!({"metadata": {"ownerReferences": refs, "resourceVersion": pod.metadata.resource_version}});
        self.client
            .merge_patch::<Pod>(pod.metadata.namespace.as_deref(), name(&pod.metadata), None, &patch)
            .await
    }

    async fn create_pods(&mut self, rs: &ReplicaSet, count: usize) -> Result<(), ClientError> {
        let key = object_key(&rs.metadata);
        let ns = rs.metadata.namespace.clone();
        let template = rs.spec.as_ref().and_then(|s| s.template.clone()).unwrap_or_default();
        let mut meta = template.metadata.unwrap_or_default();
        meta.name = None;
        meta.generate_name = Some(format!("{}-", name(&rs.metadata)));
        meta.namespace = ns.clone();
        meta.owner_references = Some(vec![controller_ref(rs)]);
        let pod = Pod {
            metadata: meta,
            spec: template.spec,
            status: None,
        };
        for _ in 0..count {
            match self.client.create(ns.as_deref(), &pod).await {
                Ok(created) => {
                    let pod_name = name(&created.metadata).to_string();
                    self.expect.created(&key, &pod_name);
                    self.recorder.emit(
                        reference(rs),
                        EventType::Normal,
                        "SuccessfulCreate",
                        format!("Created pod: {pod_name}"),
                    );
                }
                Err(err) => {
                    self.recorder.emit(
                        reference(rs),
                        EventType::Warning,
                        "FailedCreate",
                        format!("Error creating: {err}"),
                    );
                    return Err(err);
                }
            }
        }
        Ok(())
    }

    async fn delete_pods(&mut self, rs: &ReplicaSet, pods: &[&Pod]) -> Result<(), ClientError> {
        let key = object_key(&rs.metadata);
        for pod in pods {
            let pod_name = name(&pod.metadata).to_string();
            self.client
                .delete::<Pod>(pod.metadata.namespace.as_deref(), &pod_name, None)
                .await?;
            self.expect.deleted(&key, &pod_name);
            self.recorder.emit(
                reference(rs),
                EventType::Normal,
                "SuccessfulDelete",
                format!("Deleted pod: {pod_name}"),
            );
        }
        Ok(())
    }

    async fn update_status(
        &self,
        rs: &ReplicaSet,
        active: &[&Pod],
        failure: Option<&ClientError>,
    ) -> Result<Option<Duration>, ClientError> {
        let spec = rs.spec.clone().unwrap_or_default();
        let min_ready = i64::from(spec.min_ready_seconds.unwrap_or(0));
        let at: Timestamp = now();
        let template_labels = spec
            .template
            .as_ref()
            .and_then(|t| t.metadata.as_ref())
            .and_then(|m| m.labels.clone())
            .unwrap_or_default();
        let fully_labeled = active
            .iter()
            .filter(|p| {
                let labels = p.metadata.labels.clone().unwrap_or_default();
                template_labels.iter().all(|(k, v)| labels.get(k) == Some(v))
            })
            .count();
        let ready = active.iter().filter(|p| is_ready(p)).count();
        let mut available = 0;
        let mut recheck: Option<Duration> = None;
        for p in active {
            match availability(p, min_ready, at) {
                Ok(()) => available += 1,
                Err(Some(wait)) => recheck = Some(recheck.map_or(wait, |r| r.min(wait))),
                Err(None) => {}
            }
        }
        // ReplicaFailure while pods cannot be created, gone once they can.
        let old_conditions: Vec<serde_json::Value> = rs
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .map(|c| c.iter().filter_map(|c| serde_json::to_value(c).ok()).collect())
            .unwrap_or_default();
        let mut conditions: Vec<serde_json::Value> = old_conditions
            .iter()
            .filter(|c| c["type"] != "ReplicaFailure")
            .cloned()
            .collect();
        if let Some(err) = failure {
            let message = err.to_string();
            let old = old_conditions.iter().find(|c| c["type"] == "ReplicaFailure");
            let transition = old
                .map(|c| c["lastTransitionTime"].clone())
                .unwrap_or_else(|| json!(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(at)));
            conditions.push(
                json!({"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate",
                                   "message": message, "lastTransitionTime": transition}),
            );
        }
        let status = json!({
            "replicas": active.len(),
            "fullyLabeledReplicas": fully_labeled,
            "readyReplicas": ready,
            "availableReplicas": available,
            "observedGeneration": rs.metadata.generation.unwrap_or(1),
            "conditions": conditions,
        });
        let current = rs.status.as_ref().map(|s| {
            json!({
                "replicas": s.replicas,
                "fullyLabeledReplicas": s.fully_labeled_replicas.unwrap_or(0),
                "readyReplicas": s.ready_replicas.unwrap_or(0),
                "availableReplicas": s.available_replicas.unwrap_or(0),
                "observedGeneration": s.observed_generation.unwrap_or(0),
                "conditions": old_conditions,
            })
        });
        if current.as_ref() != Some(&status) {
            self.client
                .merge_patch::<ReplicaSet>(
                    rs.metadata.namespace.as_deref(),
                    name(&rs.metadata),
                    Some("status"),
                    &json!({"status": status}),
                )
                .await?;
        }
        Ok(recheck.map(|d| d + Duration::from_millis(50)))
    }
}

/// Sort key: the pods to delete first come first (unscheduled, pending, not ready, restarted more, newer).
fn deletion_rank(pod: &Pod) -> (bool, u8, bool, i64, std::cmp::Reverse<Option<Timestamp>>) {
    let assigned = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        .is_some_and(|n| !n.is_empty());
    let phase = match pod.status.as_ref().and_then(|s| s.phase.as_deref()) {
        Some("Pending") | None => 0,
        Some("Unknown") => 1,
        Some("Running") => 2,
        _ => 3,
    };
    let restarts: i64 = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .map_or(0, |cs| cs.iter().map(|c| i64::from(c.restart_count)).sum());
    let created = pod.metadata.creation_timestamp.as_ref().map(|t| t.0);
    (assigned, phase, is_ready(pod), -restarts, std::cmp::Reverse(created))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PodCondition, PodSpec, PodStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

    fn pod(name: &str, node: Option<&str>, phase: &str, ready: bool, created: i64) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                creation_timestamp: Some(Time(Timestamp::from_second(created).unwrap())),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: node.map(str::to_string),
                ..Default::default()
            }),
            status: Some(PodStatus {
                phase: Some(phase.into()),
                conditions: ready.then(|| {
                    vec![PodCondition {
                        type_: "Ready".into(),
                        status: "True".into(),
                        ..Default::default()
                    }]
                }),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn least_useful_pods_are_deleted_first() {
        let pods = [
            pod("running-old", Some("n"), "Running", true, 1),
            pod("running-new", Some("n"), "Running", true, 5),
            pod("unready", Some("n"), "Running", false, 2),
            pod("pending", Some("n"), "Pending", false, 3),
            pod("unscheduled", None, "Pending", false, 4),
        ];
        let mut ranked: Vec<&Pod> = pods.iter().collect();
        ranked.sort_by_key(|p| deletion_rank(p));
        let names: Vec<&str> = ranked.iter().map(|p| name(&p.metadata)).collect();
        assert_eq!(
            names,
            ["unscheduled", "pending", "unready", "running-new", "running-old"]
        );
    }
}
