//! DaemonSet controller: one pod per eligible node (the template's node selector and required node affinity
//! match, and its tolerations plus the default DaemonSet tolerations cover the node's NoSchedule/NoExecute
//! taints). Pods are pinned to their node with required node affinity on `metadata.name`, as Kubernetes does,
//! and placed by the scheduler. Template versions are ControllerRevisions (`kubectl rollout history ds/x`);
//! pods carry `controller-revision-hash`, and a RollingUpdate replaces old pods at most maxUnavailable at a time.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use k8s_openapi::api::apps::v1::{ControllerRevision, DaemonSet};
use k8s_openapi::api::core::v1::{
    Affinity, Node, NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, Pod, Toleration,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::json;
use tokio::sync::broadcast::error::RecvError;

use super::deployment::resolve;
use super::workload::{
    Expectations, WorkQueue, controlled_by, controller_of, controller_ref, is_active, is_available, is_deleting,
    is_ready, name, sync_revisions, template_hash, uid,
};
use crate::cluster::client::{Client, ClientError, ListParams};
use crate::cluster::events::{EventType, Recorder, now, reference};
use crate::cluster::informer::{Change, Informer, object_key};
use crate::cluster::scheduler::filter::{NodeState, PodInput, affinity_mismatch, untolerated_taint};

pub use super::workload::REVISION_HASH_LABEL;

struct Controller {
    client: Client,
    sets: Informer<DaemonSet>,
    pods: Informer<Pod>,
    nodes: Informer<Node>,
    revisions: Informer<ControllerRevision>,
    recorder: Recorder,
    queue: WorkQueue,
    expect: Expectations,
}

pub fn spawn(client: Client) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let sets: Informer<DaemonSet> = Informer::spawn(client.clone(), None, ListParams::default());
        let pods: Informer<Pod> = Informer::spawn(client.clone(), None, ListParams::default());
        let nodes: Informer<Node> = Informer::spawn(client.clone(), None, ListParams::default());
        let revisions: Informer<ControllerRevision> = Informer::spawn(client.clone(), None, ListParams::default());
        let mut set_changes = sets.subscribe();
        let mut pod_changes = pods.subscribe();
        let mut node_changes = nodes.subscribe();
        sets.wait_synced().await;
        pods.wait_synced().await;
        nodes.wait_synced().await;
        revisions.wait_synced().await;
        let recorder = Recorder::new(client.clone(), "daemonset-controller", None);
        let mut c = Controller {
            client,
            sets,
            pods,
            nodes,
            revisions,
            recorder,
            queue: WorkQueue::default(),
            expect: Expectations::default(),
        };
        c.enqueue_all();
        loop {
            tokio::select! {
                change = set_changes.recv() => match change {
                    Ok(Change::Applied(ds) | Change::Deleted(ds)) => c.queue.add(object_key(&ds.metadata)),
                    Ok(Change::Resynced) | Err(RecvError::Lagged(_)) => c.enqueue_all(),
                    Err(RecvError::Closed) => return,
                },
                change = pod_changes.recv() => match change {
                    Ok(Change::Applied(pod) | Change::Deleted(pod)) => c.enqueue_owner(&pod),
                    Ok(Change::Resynced) | Err(RecvError::Lagged(_)) => c.enqueue_all(),
                    Err(RecvError::Closed) => return,
                },
                // Any node change may change where daemons belong.
                change = node_changes.recv() => match change {
                    Err(RecvError::Closed) => return,
                    _ => c.enqueue_all(),
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
                        tracing::debug!(daemonset = key, error = %err, "reconciling; will retry");
                        c.queue.retry(&key);
                    }
                }
            }
        }
    })
}

/// The tolerations every daemon pod gets, so that node problems do not evict or exclude it.
pub fn default_tolerations(host_network: bool) -> Vec<Toleration> {
    let exists = |key: &str, effect: &str| Toleration {
        key: Some(key.into()),
        operator: Some("Exists".into()),
        effect: Some(effect.into()),
        ..Default::default()
    };
    let mut out = vec![
        exists("node.kubernetes.io/not-ready", "NoExecute"),
        exists("node.kubernetes.io/unreachable", "NoExecute"),
        exists("node.kubernetes.io/disk-pressure", "NoSchedule"),
        exists("node.kubernetes.io/memory-pressure", "NoSchedule"),
        exists("node.kubernetes.io/pid-pressure", "NoSchedule"),
        exists("node.kubernetes.io/unschedulable", "NoSchedule"),
    ];
    if host_network {
        out.push(exists("node.kubernetes.io/network-unavailable", "NoSchedule"));
    }
    out
}

/// The template's pod with the default tolerations added (what runs on every node).
fn daemon_pod(ds: &DaemonSet) -> Pod {
    let template = ds.spec.as_ref().map(|s| s.template.clone()).unwrap_or_default();
    let mut spec = template.spec.unwrap_or_default();
    let tolerations = spec.tolerations.get_or_insert_with(Vec::new);
    for t in default_tolerations(spec.host_network == Some(true)) {
        if !tolerations.contains(&t) {
            tolerations.push(t);
        }
    }
    Pod {
        metadata: template.metadata.unwrap_or_default(),
        spec: Some(spec),
        status: None,
    }
}

/// Whether a daemon pod belongs on `node`.
pub fn should_run(pod: &Pod, node: &Node) -> bool {
    let input = PodInput::new(pod, None);
    let state = NodeState::new(node.clone());
    untolerated_taint(&input, &state).is_none() && affinity_mismatch(&input, &state).is_none()
}

/// The node a daemon pod is for: its `spec.nodeName`, or the node its required affinity names.
fn target_node(pod: &Pod) -> Option<String> {
    let spec = pod.spec.as_ref()?;
    if let Some(n) = spec.node_name.as_deref().filter(|n| !n.is_empty()) {
        return Some(n.to_string());
    }
    let terms = &spec
        .affinity
        .as_ref()?
        .node_affinity
        .as_ref()?
        .required_during_scheduling_ignored_during_execution
        .as_ref()?
        .node_selector_terms;
    terms
        .iter()
        .flat_map(|t| t.match_fields.iter().flatten())
        .find(|f| f.key == "metadata.name" && f.operator == "In")
        .and_then(|f| f.values.as_ref()?.first().cloned())
}

/// Pins `pod` to `node` with required node affinity on `metadata.name` (kept with any other terms).
fn pin_to_node(pod: &mut Pod, node: &str) {
    let field = NodeSelectorRequirement {
        key: "metadata.name".into(),
        operator: "In".into(),
        values: Some(vec![node.to_string()]),
    };
    let spec = pod.spec.get_or_insert_with(Default::default);
    let affinity = spec.affinity.get_or_insert_with(Affinity::default);
    let node_affinity = affinity.node_affinity.get_or_insert_with(NodeAffinity::default);
    let required = node_affinity
        .required_during_scheduling_ignored_during_execution
        .get_or_insert_with(|| NodeSelector {
            node_selector_terms: Vec::new(),
        });
    if required.node_selector_terms.is_empty() {
        required.node_selector_terms.push(NodeSelectorTerm::default());
    }
    for term in &mut required.node_selector_terms {
        term.match_fields = Some(vec![field.clone()]);
    }
}

impl Controller {
    fn enqueue_all(&mut self) {
        for ds in self.sets.list() {
            self.queue.add(object_key(&ds.metadata));
        }
    }

    fn enqueue_owner(&mut self, pod: &Pod) {
        if let Some(r) = controller_of(&pod.metadata).filter(|r| r.kind == "DaemonSet") {
            let ns = pod.metadata.namespace.as_deref().unwrap_or_default();
            self.queue.add(format!("{ns}/{}", r.name));
        }
    }

    async fn sync(&mut self, key: &str) -> Result<Option<Duration>, ClientError> {
        let Some(ds) = self.sets.get(key) else {
            self.expect.forget(key);
            return Ok(None);
        };
        let ns = ds.metadata.namespace.clone().unwrap_or_default();
        if is_deleting(&ds.metadata) || !self.expect.caught_up(key, &ns, &self.pods) {
            return Ok(None);
        }
        let spec = ds.spec.clone().unwrap_or_default();
        let collisions = ds.status.as_ref().and_then(|s| s.collision_count).unwrap_or(0);
        let template = serde_json::to_value(&spec.template).unwrap_or_default();
        let hash = template_hash(&template, collisions);
        let labels = spec.template.metadata.as_ref().and_then(|m| m.labels.clone());
        let limit = spec.revision_history_limit.unwrap_or(10);
        sync_revisions(&self.client, &self.revisions, &ds, labels, &hash, &template, limit).await?;

        let ds_uid = uid(&ds.metadata).to_string();
        let mut by_node: BTreeMap<String, Vec<Pod>> = BTreeMap::new();
        for pod in self.pods.list() {
            if pod.metadata.namespace.as_deref() == Some(ns.as_str())
                && controlled_by(&pod.metadata, &ds_uid)
                && is_active(&pod)
                && let Some(node) = target_node(&pod)
            {
                by_node.entry(node).or_default().push(pod);
            }
        }
        let template_pod = daemon_pod(&ds);
        let nodes: HashMap<String, Node> = self
            .nodes
            .list()
            .into_iter()
            .map(|n| (name(&n.metadata).to_string(), n))
            .collect();
        let eligible: Vec<&String> = nodes
            .iter()
            .filter(|(_, n)| !is_deleting(&n.metadata) && should_run(&template_pod, n))
            .map(|(name, _)| name)
            .collect();
        let min_ready = i64::from(spec.min_ready_seconds.unwrap_or(0));
        let at = now();
        let rolling = spec.update_strategy.as_ref().and_then(|s| s.type_.as_deref()) != Some("OnDelete");
        let rolling_update = spec.update_strategy.as_ref().and_then(|s| s.rolling_update.as_ref());
        // maxSurge: a node's new daemon starts next to the old one, which goes once the new one is available.
        let max_surge = match rolling {
            true => resolve(
                rolling_update.and_then(|r| r.max_surge.as_ref()),
                eligible.len() as i32,
                true,
                0,
            ),
            false => 0,
        };
        let is_current = |p: &Pod| p.metadata.labels.as_ref().and_then(|l| l.get(REVISION_HASH_LABEL)) == Some(&hash);
        let mut surging = 0;
        let mut to_create = Vec::new();
        let mut to_delete: Vec<Pod> = Vec::new();
        for node in &eligible {
            match by_node.get(*node).map(Vec::as_slice) {
                None | Some([]) => to_create.push((*node).clone()),
                Some([_]) => {}
                Some(pods) if max_surge > 0 && pods.iter().filter(|p| is_current(p)).count() == 1 => {
                    let new = pods.iter().find(|p| is_current(p)).expect("one current pod");
                    if is_available(new, min_ready, at) {
                        to_delete.extend(pods.iter().filter(|p| !is_current(p)).cloned());
                    } else {
                        surging += 1;
                    }
                }
                Some(pods) => {
                    // Keep one, preferring the current revision, then the oldest.
                    let mut pods = pods.to_vec();
                    pods.sort_by_key(|p| {
                        let current =
                            p.metadata.labels.as_ref().and_then(|l| l.get(REVISION_HASH_LABEL)) == Some(&hash);
                        (!current, p.metadata.creation_timestamp.as_ref().map(|t| t.0))
                    });
                    to_delete.extend(pods.into_iter().skip(1));
                }
            }
        }
        for (node, pods) in &by_node {
            if !eligible.contains(&node) {
                to_delete.extend(pods.iter().cloned());
            }
        }
        if max_surge > 0 {
            // Surge: unavailable old daemons are replaced at once, available ones get a new daemon beside them,
            // at most maxSurge nodes at a time.
            for node in &eligible {
                if let Some([pod]) = by_node.get(*node).map(Vec::as_slice)
                    && !is_current(pod)
                {
                    if !is_available(pod, min_ready, at) {
                        to_delete.push(pod.clone());
                    } else if surging < max_surge {
                        surging += 1;
                        to_create.push((*node).clone());
                    }
                }
            }
        } else if rolling {
            // Old pods go, at most maxUnavailable daemons down at a time; unavailable old ones first.
            let max_unavailable = resolve(
                rolling_update.and_then(|r| r.max_unavailable.as_ref()),
                eligible.len() as i32,
                true,
                0,
            )
            .max(1);
            let mut unavailable = 0;
            let mut old_available = Vec::new();
            for node in &eligible {
                let pods = by_node.get(*node).map(Vec::as_slice).unwrap_or_default();
                let Some(pod) = pods.first() else {
                    unavailable += 1;
                    continue;
                };
                let current = pod.metadata.labels.as_ref().and_then(|l| l.get(REVISION_HASH_LABEL)) == Some(&hash);
                let up = is_available(pod, min_ready, at);
                if !up {
                    unavailable += 1;
                }
                if !current && pods.len() == 1 {
                    if up {
                        old_available.push(pod.clone());
                    } else {
                        to_delete.push(pod.clone());
                    }
                }
            }
            let budget = (max_unavailable - unavailable).max(0) as usize;
            to_delete.extend(old_available.into_iter().take(budget));
        }
        for pod in &to_delete {
            let pod_name = name(&pod.metadata).to_string();
            self.client.delete::<Pod>(Some(&ns), &pod_name, None).await?;
            self.expect.deleted(key, &pod_name);
            self.recorder.emit(
                reference(&ds),
                EventType::Normal,
                "SuccessfulDelete",
                format!("Deleted pod: {pod_name}"),
            );
        }

        // After the deletions: a surge pod elsewhere starts only once an old one is gone.
        for node in &to_create {
            self.create_pod(&ds, &hash, node).await?;
        }

        let desired = eligible.len();
        let on_eligible = |f: &dyn Fn(&Pod) -> bool| {
            eligible
                .iter()
                .filter(|n| by_node.get(**n).and_then(|p| p.first()).is_some_and(f))
                .count()
        };
        let current = on_eligible(&|_| true);
        let ready = on_eligible(&is_ready);
        let available = on_eligible(&|p| is_available(p, min_ready, at));
        let updated = eligible
            .iter()
            .filter(|n| by_node.get(**n).is_some_and(|pods| pods.iter().any(is_current)))
            .count();
        let misscheduled = by_node.keys().filter(|n| !eligible.contains(n)).count();
        let status = json!({
            "desiredNumberScheduled": desired,
            "currentNumberScheduled": current,
            "numberMisscheduled": misscheduled,
            "numberReady": ready,
            "numberAvailable": available,
            "numberUnavailable": desired - available,
            "updatedNumberScheduled": updated,
            "observedGeneration": ds.metadata.generation.unwrap_or(1),
        });
        let old = ds.status.clone().unwrap_or_default();
        let before = json!({
            "desiredNumberScheduled": old.desired_number_scheduled,
            "currentNumberScheduled": old.current_number_scheduled,
            "numberMisscheduled": old.number_misscheduled,
            "numberReady": old.number_ready,
            "numberAvailable": old.number_available.unwrap_or(0),
            "numberUnavailable": old.number_unavailable.unwrap_or(0),
            "updatedNumberScheduled": old.updated_number_scheduled.unwrap_or(0),
            "observedGeneration": old.observed_generation.unwrap_or(0),
        });
        if status != before {
            self.client
                .merge_patch::<DaemonSet>(
                    Some(&ns),
                    name(&ds.metadata),
                    Some("status"),
                    &json!({"status": status}),
                )
                .await?;
        }
        // Ready pods become available after minReadySeconds.
        Ok((min_ready > 0 && ready > available).then(|| Duration::from_secs(1)))
    }

    async fn create_pod(&mut self, ds: &DaemonSet, hash: &str, node: &str) -> Result<(), ClientError> {
        let mut pod = daemon_pod(ds);
        let ns = ds.metadata.namespace.clone();
        pod.metadata = ObjectMeta {
            generate_name: Some(format!("{}-", name(&ds.metadata))),
            namespace: ns.clone(),
            owner_references: Some(vec![controller_ref(ds)]),
            ..pod.metadata
        };
        pod.metadata
            .labels
            .get_or_insert_with(Default::default)
            .insert(REVISION_HASH_LABEL.into(), hash.to_string());
        pin_to_node(&mut pod, node);
        match self.client.create(ns.as_deref(), &pod).await {
            Ok(created) => {
                let pod_name = name(&created.metadata).to_string();
                self.expect.created(&object_key(&ds.metadata), &pod_name);
                self.recorder.emit(
                    reference(ds),
                    EventType::Normal,
                    "SuccessfulCreate",
                    format!("Created pod: {pod_name}"),
                );
                Ok(())
            }
            Err(err) => {
                self.recorder.emit(
                    reference(ds),
                    EventType::Warning,
                    "FailedCreate",
                    format!("Error creating: {err}"),
                );
                Err(err)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::NodeCondition;
    use k8s_openapi::api::core::v1::{NodeSpec, NodeStatus, PodSpec, Taint};

    fn node(name: &str, labels: &[(&str, &str)], taints: Vec<Taint>) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: Some(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
                ..Default::default()
            },
            spec: Some(NodeSpec {
                taints: Some(taints),
                ..Default::default()
            }),
            status: Some(NodeStatus {
                conditions: Some(vec![NodeCondition {
                    type_: "Ready".into(),
                    status: "True".into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn eligibility_follows_selector_and_taints() {
        let mut pod = Pod {
            spec: Some(PodSpec {
                tolerations: Some(default_tolerations(false)),
                ..Default::default()
            }),
            ..Default::default()
        };
        let cordoned = Taint {
            key: "node.kubernetes.io/unschedulable".into(),
            effect: "NoSchedule".into(),
            ..Default::default()
        };
        let dedicated = Taint {
            key: "dedicated".into(),
            value: Some("db".into()),
            effect: "NoSchedule".into(),
            ..Default::default()
        };
        assert!(should_run(&pod, &node("a", &[], vec![cordoned])));
        assert!(!should_run(&pod, &node("b", &[], vec![dedicated])));
        pod.spec.as_mut().unwrap().node_selector = Some([("disk".to_string(), "ssd".to_string())].into());
        assert!(!should_run(&pod, &node("c", &[], vec![])));
        assert!(should_run(&pod, &node("d", &[("disk", "ssd")], vec![])));
    }

    #[test]
    fn pods_are_pinned_by_affinity() {
        let mut pod = Pod::default();
        pin_to_node(&mut pod, "n1");
        assert_eq!(target_node(&pod).as_deref(), Some("n1"));
        pod.spec.as_mut().unwrap().node_name = Some("n2".into());
        assert_eq!(target_node(&pod).as_deref(), Some("n2"));
    }
}
