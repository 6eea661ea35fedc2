//! StatefulSet controller: pods with stable names `<set>-<ordinal>` (hostname = pod name, subdomain = the
//! governing service). `OrderedReady` creates them one at a time in order, each after the previous is Running
//! and Ready, and removes them from the highest ordinal down; `Parallel` does all at once. A RollingUpdate
//! replaces pods of an old revision from the highest ordinal down to the partition, one at a time.
//! Template versions are ControllerRevisions; `volumeClaimTemplates` are not supported (no volumes yet).

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{ControllerRevision, StatefulSet};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::json;
use tokio::sync::broadcast::error::RecvError;

use super::workload::{
    Expectations, REVISION_HASH_LABEL, WorkQueue, controlled_by, controller_of, controller_ref, is_available,
    is_deleting, is_ready, name, sync_revisions, template_hash, uid,
};
use crate::cluster::client::{Client, ClientError, ListParams};
use crate::cluster::events::{EventType, Recorder, now, reference};
use crate::cluster::informer::{Change, Informer, object_key};

pub const POD_NAME_LABEL: &str = "statefulset.kubernetes.io/pod-name";
pub const POD_INDEX_LABEL: &str = "apps.kubernetes.io/pod-index";

struct Controller {
    client: Client,
    sets: Informer<StatefulSet>,
    pods: Informer<Pod>,
    revisions: Informer<ControllerRevision>,
    recorder: Recorder,
    queue: WorkQueue,
    expect: Expectations,
}

pub fn spawn(client: Client) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let sets: Informer<StatefulSet> = Informer::spawn(client.clone(), None, ListParams::default());
        let pods: Informer<Pod> = Informer::spawn(client.clone(), None, ListParams::default());
        let revisions: Informer<ControllerRevision> = Informer::spawn(client.clone(), None, ListParams::default());
        let mut set_changes = sets.subscribe();
        let mut pod_changes = pods.subscribe();
        sets.wait_synced().await;
        pods.wait_synced().await;
        revisions.wait_synced().await;
        let recorder = Recorder::new(client.clone(), "statefulset-controller", None);
        let mut c = Controller {
            client,
            sets,
            pods,
            revisions,
            recorder,
            queue: WorkQueue::default(),
            expect: Expectations::default(),
        };
        c.enqueue_all();
        loop {
            tokio::select! {
                change = set_changes.recv() => match change {
                    Ok(Change::Applied(s) | Change::Deleted(s)) => c.queue.add(object_key(&s.metadata)),
                    Ok(Change::Resynced) | Err(RecvError::Lagged(_)) => c.enqueue_all(),
                    Err(RecvError::Closed) => return,
                },
                change = pod_changes.recv() => match change {
                    Ok(Change::Applied(pod) | Change::Deleted(pod)) => c.enqueue_owner(&pod),
                    Ok(Change::Resynced) | Err(RecvError::Lagged(_)) => c.enqueue_all(),
                    Err(RecvError::Closed) => return,
                },
                _ = tokio::time::sleep_until(c.queue.next_due()) => {}
            }
            while let Ok(change) = pod_changes.try_recv() {
                if let Change::Applied(pod) | Change::Deleted(pod) = change {
                    c.enqueue_owner(&pod);
                }
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
                        tracing::debug!(statefulset = key, error = %err, "reconciling; will retry");
                        c.queue.retry(&key);
                    }
                }
            }
        }
    })
}

/// The ordinal of a pod named `<set>-<n>`.
pub fn ordinal(set: &str, pod: &str) -> Option<usize> {
    pod.strip_prefix(set)?.strip_prefix('-')?.parse().ok()
}

fn revision_of(pod: &Pod) -> Option<&str> {
    pod.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(REVISION_HASH_LABEL))
        .map(String::as_str)
}

fn running_and_ready(pod: &Pod) -> bool {
    pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running") && is_ready(pod)
}

impl Controller {
    fn enqueue_all(&mut self) {
        for s in self.sets.list() {
            self.queue.add(object_key(&s.metadata));
        }
    }

    fn enqueue_owner(&mut self, pod: &Pod) {
        if let Some(r) = controller_of(&pod.metadata).filter(|r| r.kind == "StatefulSet") {
            let ns = pod.metadata.namespace.as_deref().unwrap_or_default();
            self.queue.add(format!("{ns}/{}", r.name));
        }
    }

    async fn sync(&mut self, key: &str) -> Result<Option<Duration>, ClientError> {
        let Some(set) = self.sets.get(key) else {
            self.expect.forget(key);
            return Ok(None);
        };
        let ns = set.metadata.namespace.clone().unwrap_or_default();
        if is_deleting(&set.metadata) || !self.expect.caught_up(key, &ns, &self.pods) {
            return Ok(None);
        }
        let spec = set.spec.clone().unwrap_or_default();
        let set_name = name(&set.metadata).to_string();
        let collisions = set.status.as_ref().and_then(|s| s.collision_count).unwrap_or(0);
        let template = serde_json::to_value(&spec.template).unwrap_or_default();
        let update_rev = template_hash(&template, collisions);
        let labels = spec.template.metadata.as_ref().and_then(|m| m.labels.clone());
        let limit = spec.revision_history_limit.unwrap_or(10);
        sync_revisions(
            &self.client,
            &self.revisions,
            &set,
            labels,
            &update_rev,
            &template,
            limit,
        )
        .await?;

        let set_uid = uid(&set.metadata).to_string();
        let pods: BTreeMap<usize, Pod> = self
            .pods
            .list()
            .into_iter()
            .filter(|p| p.metadata.namespace.as_deref() == Some(ns.as_str()) && controlled_by(&p.metadata, &set_uid))
            .filter_map(|p| Some((ordinal(&set_name, name(&p.metadata))?, p)))
            .collect();
        let replicas = spec.replicas.unwrap_or(1).max(0) as usize;
        let ordered = spec.pod_management_policy.as_deref() != Some("Parallel");
        let terminating = pods.values().any(|p| is_deleting(&p.metadata));

        // Create missing pods (in order, one at a time, when OrderedReady).
        let mut blocked = false;
        for i in 0..replicas {
            match pods.get(&i) {
                None => {
                    self.create_pod(&set, i, &update_rev).await?;
                    if ordered {
                        blocked = true;
                        break;
                    }
                }
                Some(p) if ordered && (is_deleting(&p.metadata) || !running_and_ready(p)) => {
                    blocked = true;
                    break;
                }
                Some(_) => {}
            }
        }
        // Remove pods beyond `replicas`, highest first.
        let excess: Vec<&Pod> = pods
            .range(replicas..)
            .rev()
            .map(|(_, p)| p)
            .filter(|p| !is_deleting(&p.metadata))
            .collect();
        if !(blocked || (ordered && terminating)) {
            let batch = if ordered { 1 } else { excess.len() };
            for pod in excess.into_iter().take(batch) {
                self.delete_pod(&set, pod).await?;
            }
        }
        // Rolling update: the highest-ordinal pod of an old revision above the partition, once all are ready.
        let rolling = spec.update_strategy.as_ref().and_then(|s| s.type_.as_deref()) != Some("OnDelete");
        let partition = spec
            .update_strategy
            .as_ref()
            .and_then(|s| s.rolling_update.as_ref())
            .and_then(|r| r.partition)
            .unwrap_or(0)
            .max(0) as usize;
        let all_ready = (0..replicas).all(|i| pods.get(&i).is_some_and(running_and_ready));
        if rolling && all_ready && !terminating {
            let stale = (partition..replicas)
                .rev()
                .filter_map(|i| pods.get(&i))
                .find(|p| revision_of(p) != Some(update_rev.as_str()));
            if let Some(pod) = stale {
                self.delete_pod(&set, pod).await?;
            }
        }

        let active: Vec<&Pod> = pods.values().filter(|p| !is_deleting(&p.metadata)).collect();
        let min_ready = i64::from(spec.min_ready_seconds.unwrap_or(0));
        let at = now();
        let ready = active.iter().filter(|p| is_ready(p)).count();
        let available = active.iter().filter(|p| is_available(p, min_ready, at)).count();
        let updated = active
            .iter()
            .filter(|p| revision_of(p) == Some(update_rev.as_str()))
            .count();
        let old_status = set.status.clone().unwrap_or_default();
        let mut current_rev = old_status
            .current_revision
            .clone()
            .unwrap_or_else(|| update_rev.clone());
        if updated == replicas && ready == replicas && active.len() == replicas {
            current_rev = update_rev.clone();
        }
        let current = active
            .iter()
            .filter(|p| revision_of(p) == Some(current_rev.as_str()))
            .count();
        let status = json!({
            "observedGeneration": set.metadata.generation.unwrap_or(1),
            "replicas": active.len(),
            "readyReplicas": ready,
            "availableReplicas": available,
            "currentReplicas": current,
            "updatedReplicas": updated,
            "currentRevision": current_rev,
            "updateRevision": update_rev,
            "collisionCount": collisions,
        });
        let before = json!({
            "observedGeneration": old_status.observed_generation.unwrap_or(0),
            "replicas": old_status.replicas,
            "readyReplicas": old_status.ready_replicas.unwrap_or(0),
            "availableReplicas": old_status.available_replicas.unwrap_or(0),
            "currentReplicas": old_status.current_replicas.unwrap_or(0),
            "updatedReplicas": old_status.updated_replicas.unwrap_or(0),
            "currentRevision": old_status.current_revision.unwrap_or_default(),
            "updateRevision": old_status.update_revision.unwrap_or_default(),
            "collisionCount": collisions,
        });
        if status != before {
            self.client
                .merge_patch::<StatefulSet>(Some(&ns), &set_name, Some("status"), &json!({"status": status}))
                .await?;
        }
        Ok((min_ready > 0 && ready > available).then(|| Duration::from_secs(1)))
    }

    async fn create_pod(&mut self, set: &StatefulSet, i: usize, revision: &str) -> Result<(), ClientError> {
        let spec = set.spec.clone().unwrap_or_default();
        let ns = set.metadata.namespace.clone();
        let pod_name = format!("{}-{i}", name(&set.metadata));
        let template = spec.template;
        let mut labels = template
            .metadata
            .as_ref()
            .and_then(|m| m.labels.clone())
            .unwrap_or_default();
        labels.insert(REVISION_HASH_LABEL.into(), revision.to_string());
        labels.insert(POD_NAME_LABEL.into(), pod_name.clone());
        labels.insert(POD_INDEX_LABEL.into(), i.to_string());
        let mut pod_spec = template.spec.unwrap_or_default();
        pod_spec.hostname = Some(pod_name.clone());
        if !spec.service_name.as_deref().unwrap_or_default().is_empty() {
            pod_spec.subdomain = spec.service_name.clone();
        }
        let pod = Pod {
            metadata: ObjectMeta {
                name: Some(pod_name.clone()),
                namespace: ns.clone(),
                labels: Some(labels),
                annotations: template.metadata.as_ref().and_then(|m| m.annotations.clone()),
                owner_references: Some(vec![controller_ref(set)]),
                ..Default::default()
            },
            spec: Some(pod_spec),
            status: None,
        };
        let set_name = name(&set.metadata).to_string();
        match self.client.create(ns.as_deref(), &pod).await {
            Ok(_) => {
                self.expect.created(&object_key(&set.metadata), &pod_name);
                self.recorder.emit(
                    reference(set),
                    EventType::Normal,
                    "SuccessfulCreate",
                    format!("create Pod {pod_name} in StatefulSet {set_name} successful"),
                );
                Ok(())
            }
            // The previous pod of that name is still being deleted.
            Err(err) if err.is_conflict() => Ok(()),
            Err(err) => {
                self.recorder.emit(
                    reference(set),
                    EventType::Warning,
                    "FailedCreate",
                    format!("create Pod {pod_name} in StatefulSet {set_name} failed error: {err}"),
                );
                Err(err)
            }
        }
    }

    async fn delete_pod(&mut self, set: &StatefulSet, pod: &Pod) -> Result<(), ClientError> {
        let pod_name = name(&pod.metadata).to_string();
        self.client
            .delete::<Pod>(pod.metadata.namespace.as_deref(), &pod_name, None)
            .await?;
        self.expect.deleted(&object_key(&set.metadata), &pod_name);
        self.recorder.emit(
            reference(set),
            EventType::Normal,
            "SuccessfulDelete",
            format!(
                "delete Pod {pod_name} in StatefulSet {} successful",
                name(&set.metadata)
            ),
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinals_come_from_names() {
        assert_eq!(ordinal("web", "web-0"), Some(0));
        assert_eq!(ordinal("web", "web-12"), Some(12));
        assert_eq!(ordinal("web", "web-x"), None);
        assert_eq!(ordinal("web", "webby-1"), None);
    }
}
