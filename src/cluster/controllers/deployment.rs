//! Deployment controller: one ReplicaSet per pod template (named `<deployment>-<pod-template-hash>`), rolled
//! out with `RollingUpdate` (bounded by maxSurge/maxUnavailable and pod availability) or `Recreate`,
//! revision annotations (a rollback bumps the old ReplicaSet to the next revision and records the old number
//! in `revision-history`), `revisionHistoryLimit` cleanup, `paused`, and the status and conditions
//! (`Available`, `Progressing` with `progressDeadlineSeconds`) that `kubectl rollout status` reads.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet, ReplicaSetSpec};
use k8s_openapi::api::core::v1::{Pod, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::Timestamp;
use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;

use super::workload::{
    WorkQueue, controlled_by, controller_of, controller_ref, is_deleting, name, selector_matches, template_hash, uid,
};
use crate::cluster::client::{Client, ClientError, ListParams};
use crate::cluster::events::{EventType, Recorder, now, reference};
use crate::cluster::informer::{Change, Informer, object_key};

pub const REVISION: &str = "deployment.kubernetes.io/revision";
pub const REVISION_HISTORY: &str = "deployment.kubernetes.io/revision-history";
const DESIRED_REPLICAS: &str = "deployment.kubernetes.io/desired-replicas";
const MAX_REPLICAS: &str = "deployment.kubernetes.io/max-replicas";
const CHANGE_CAUSE: &str = "kubernetes.io/change-cause";
pub const HASH_LABEL: &str = "pod-template-hash";

struct Controller {
    client: Client,
    deployments: Informer<Deployment>,
    sets: Informer<ReplicaSet>,
    pods: Informer<Pod>,
    recorder: Recorder,
    queue: WorkQueue,
    /// ReplicaSets as this controller last wrote them (and when), until the cache catches up.
    written: HashMap<String, (ReplicaSet, Instant)>,
}

pub fn spawn(client: Client) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let deployments: Informer<Deployment> = Informer::spawn(client.clone(), None, ListParams::default());
        let sets: Informer<ReplicaSet> = Informer::spawn(client.clone(), None, ListParams::default());
        let pods: Informer<Pod> = Informer::spawn(client.clone(), None, ListParams::default());
        let mut d_changes = deployments.subscribe();
        let mut rs_changes = sets.subscribe();
        let mut pod_changes = pods.subscribe();
        deployments.wait_synced().await;
        sets.wait_synced().await;
        pods.wait_synced().await;
        let recorder = Recorder::new(client.clone(), "deployment-controller", None);
        let mut c = Controller {
            client,
            deployments,
            sets,
            pods,
            recorder,
            queue: WorkQueue::default(),
            written: HashMap::new(),
        };
        c.enqueue_all();
        loop {
            tokio::select! {
                change = d_changes.recv() => match change {
                    Ok(Change::Applied(d) | Change::Deleted(d)) => c.queue.add(object_key(&d.metadata)),
                    Ok(Change::Resynced) | Err(RecvError::Lagged(_)) => c.enqueue_all(),
                    Err(RecvError::Closed) => return,
                },
                change = rs_changes.recv() => match change {
                    Ok(Change::Applied(rs)) => c.enqueue_owner(&rs.metadata),
                    Ok(Change::Deleted(rs)) => {
                        c.written.remove(&object_key(&rs.metadata));
                        c.enqueue_owner(&rs.metadata);
                    }
                    Ok(Change::Resynced) | Err(RecvError::Lagged(_)) => c.enqueue_all(),
                    Err(RecvError::Closed) => return,
                },
                change = pod_changes.recv() => match change {
                    // Recreate waits for the old pods to be gone.
                    Ok(Change::Deleted(pod)) => c.enqueue_pod_owner(&pod),
                    Ok(_) => {}
                    Err(RecvError::Lagged(_)) => c.enqueue_all(),
                    Err(RecvError::Closed) => return,
                },
                _ = tokio::time::sleep_until(c.queue.next_due()) => {}
            }
            while let Ok(change) = d_changes.try_recv() {
                if let Change::Applied(d) | Change::Deleted(d) = change {
                    c.queue.add(object_key(&d.metadata));
                }
            }
            while let Ok(change) = rs_changes.try_recv() {
                match change {
                    Change::Applied(rs) => c.enqueue_owner(&rs.metadata),
                    Change::Deleted(rs) => {
                        c.written.remove(&object_key(&rs.metadata));
                        c.enqueue_owner(&rs.metadata);
                    }
                    Change::Resynced => c.enqueue_all(),
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
                        tracing::debug!(deployment = key, error = %err, "reconciling; will retry");
                        c.queue.retry(&key);
                    }
                }
            }
        }
    })
}

fn rv(meta: &ObjectMeta) -> u64 {
    meta.resource_version
        .as_deref()
        .and_then(|r| r.parse().ok())
        .unwrap_or(0)
}

pub fn revision(meta: &ObjectMeta) -> i64 {
    meta.annotations
        .as_ref()
        .and_then(|a| a.get(REVISION))
        .and_then(|r| r.parse().ok())
        .unwrap_or(0)
}

fn spec_replicas(rs: &ReplicaSet) -> i32 {
    rs.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0)
}

fn available(rs: &ReplicaSet) -> i32 {
    rs.status.as_ref().and_then(|s| s.available_replicas).unwrap_or(0)
}

/// A template with the `pod-template-hash` label removed, for comparing a ReplicaSet with its Deployment.
fn without_hash(template: Option<&PodTemplateSpec>) -> Value {
    let mut t = serde_json::to_value(template.cloned().unwrap_or_default()).unwrap_or_default();
    if let Some(labels) = t.pointer_mut("/metadata/labels").and_then(Value::as_object_mut) {
        labels.remove(HASH_LABEL);
        if labels.is_empty() {
            t["metadata"].as_object_mut().map(|m| m.remove("labels"));
        }
    }
    if t.get("metadata")
        .and_then(Value::as_object)
        .is_some_and(|m| m.is_empty())
    {
        t.as_object_mut().map(|m| m.remove("metadata"));
    }
    t
}

/// An int-or-percent of `total`: percentages round up for maxSurge and down for maxUnavailable.
pub fn resolve(value: Option<&IntOrString>, total: i32, round_up: bool, default_percent: i32) -> i32 {
    let percent = |p: i32| {
        let scaled = i64::from(p) * i64::from(total);
        (if round_up { (scaled + 99) / 100 } else { scaled / 100 }) as i32
    };
    match value {
        Some(IntOrString::Int(n)) => *n,
        Some(IntOrString::String(s)) => match s.strip_suffix('%').and_then(|p| p.parse().ok()) {
            Some(p) => percent(p),
            None => s.parse().unwrap_or(0),
        },
        None => percent(default_percent),
    }
}

/// (maxSurge, maxUnavailable) for a rolling update of `replicas`; never both zero.
pub fn fenceposts(d: &Deployment, replicas: i32) -> (i32, i32) {
    let ru = d
        .spec
        .as_ref()
        .and_then(|s| s.strategy.as_ref())
        .and_then(|s| s.rolling_update.as_ref());
    let surge = resolve(ru.and_then(|r| r.max_surge.as_ref()), replicas, true, 25).max(0);
    let unavailable = resolve(ru.and_then(|r| r.max_unavailable.as_ref()), replicas, false, 25).max(0);
    if surge == 0 && unavailable == 0 {
        (0, 1)
    } else {
        (surge, unavailable.min(replicas))
    }
}

fn is_recreate(d: &Deployment) -> bool {
    d.spec
        .as_ref()
        .and_then(|s| s.strategy.as_ref())
        .and_then(|s| s.type_.as_deref())
        == Some("Recreate")
}

/// Old ReplicaSets' new sizes for one rolling-update step (oldest first), given the new ReplicaSet's size
/// and availability: first unhealthy replicas go, then as many as availability above the minimum allows.
pub fn scale_down_old(old: &[(i32, i32)], new: (i32, i32), replicas: i32, max_unavailable: i32) -> Vec<i32> {
    let mut sizes: Vec<i32> = old.iter().map(|(spec, _)| *spec).collect();
    let all_pods: i32 = sizes.iter().sum::<i32>() + new.0;
    let min_available = replicas - max_unavailable;
    let new_unavailable = new.0 - new.1;
    let mut max_scaled_down = all_pods - min_available - new_unavailable;
    if max_scaled_down <= 0 {
        return sizes;
    }
    for (i, (spec, avail)) in old.iter().enumerate() {
        if max_scaled_down <= 0 {
            break;
        }
        let unhealthy = spec - avail;
        if *spec == 0 || unhealthy <= 0 {
            continue;
        }
        let down = unhealthy.min(max_scaled_down);
        sizes[i] -= down;
        max_scaled_down -= down;
    }
    let available_total: i32 = old.iter().map(|(_, a)| *a).sum::<i32>() + new.1;
    if available_total <= min_available {
        return sizes;
    }
    let mut to_scale_down = available_total - min_available;
    for size in sizes.iter_mut() {
        if to_scale_down <= 0 {
            break;
        }
        let down = (*size).min(to_scale_down);
        *size -= down;
        to_scale_down -= down;
    }
    sizes
}

/// Proportional scaling: the replica count changed while several ReplicaSets
/// are active (`sizes` as (replicas, revision)). Each keeps its share of
/// `allowed` (replicas + maxSurge); the rounding leftover goes to the largest
/// (ties: the newest when adding, the oldest when removing).
pub fn proportional_sizes(sizes: &[(i32, i64)], allowed: i32) -> Vec<i32> {
    let total: i32 = sizes.iter().map(|(size, _)| *size).sum();
    let mut out: Vec<i32> = sizes.iter().map(|(size, _)| *size).collect();
    let to_add = allowed - total;
    if to_add == 0 || total == 0 {
        return out;
    }
    let mut order: Vec<usize> = (0..sizes.len()).collect();
    order.sort_by_key(|&i| {
        let (size, rev) = sizes[i];
        (std::cmp::Reverse(size), if to_add > 0 { -rev } else { rev })
    });
    let mut added = 0;
    for &i in &order {
        let size = sizes[i].0;
        if size == 0 {
            continue;
        }
        let share = ((size as f64 * allowed as f64) / total as f64).round() as i32 - size;
        let left = to_add - added;
        let step = if to_add > 0 { share.min(left) } else { share.max(left) };
        out[i] += step;
        added += step;
    }
    if let Some(&first) = order.first() {
        out[first] = (out[first] + to_add - added).max(0);
    }
    out
}

/// Sets a condition; its transition time changes only with its status. Unchanged conditions stay as they are
/// unless `touch` (progress was made: `lastUpdateTime` moves).
fn set_condition(
    conditions: &mut Vec<Value>,
    stamp: &Value,
    type_: &str,
    status: &str,
    reason: &str,
    message: String,
    touch: bool,
) {
    let existing = conditions.iter_mut().find(|c| c["type"] == type_);
    let same = existing
        .as_ref()
        .is_some_and(|c| c["status"] == status && c["reason"] == reason && c["message"] == message.as_str());
    if same && !touch {
        return;
    }
    let transition = existing
        .as_ref()
        .filter(|c| c["status"] == status)
        .map(|c| c["lastTransitionTime"].clone())
        .unwrap_or(stamp.clone());
    let cond = json!({"type": type_, "status": status, "reason": reason, "message": message,
                      "lastUpdateTime": stamp, "lastTransitionTime": transition});
    match existing {
        Some(c) => *c = cond,
        None => conditions.push(cond),
    }
}

impl Controller {
    fn enqueue_all(&mut self) {
        for d in self.deployments.list() {
            self.queue.add(object_key(&d.metadata));
        }
    }

    fn enqueue_owner(&mut self, meta: &ObjectMeta) {
        if let Some(r) = controller_of(meta).filter(|r| r.kind == "Deployment") {
            self.queue
                .add(format!("{}/{}", meta.namespace.as_deref().unwrap_or_default(), r.name));
        }
    }

    fn enqueue_pod_owner(&mut self, pod: &Pod) {
        let ns = pod.metadata.namespace.as_deref().unwrap_or_default();
        if let Some(r) = controller_of(&pod.metadata).filter(|r| r.kind == "ReplicaSet")
            && let Some(rs) = self.sets.get(&format!("{ns}/{}", r.name))
        {
            self.enqueue_owner(&rs.metadata);
        }
    }

    /// The Deployment's ReplicaSets, newest knowledge first (cache, or what this controller just wrote).
    fn replica_sets(&mut self, ns: &str, owner_uid: &str) -> Vec<ReplicaSet> {
        let mut by_key: BTreeMap<String, ReplicaSet> = self
            .sets
            .list()
            .into_iter()
            .filter(|rs| rs.metadata.namespace.as_deref() == Some(ns))
            .map(|rs| (object_key(&rs.metadata), rs))
            .collect();
        // A write the cache has not shown after this long was lost (e.g. the object was deleted meanwhile).
        self.written.retain(|key, (w, at)| match by_key.get(key) {
            Some(cached) => rv(&cached.metadata) < rv(&w.metadata),
            None => at.elapsed() < Duration::from_secs(10),
        });
        for (key, (w, _)) in &self.written {
            if w.metadata.namespace.as_deref() == Some(ns) {
                by_key.insert(key.clone(), w.clone());
            }
        }
        by_key
            .into_values()
            .filter(|rs| controlled_by(&rs.metadata, owner_uid) && !is_deleting(&rs.metadata))
            .collect()
    }

    /// ReplicaSets without a controller whose labels the Deployment selects become its own.
    async fn adopt_orphans(&mut self, d: &Deployment) -> Result<(), ClientError> {
        let selector = d.spec.as_ref().map(|s| &s.selector);
        for rs in self.sets.list() {
            if rs.metadata.namespace != d.metadata.namespace
                || controller_of(&rs.metadata).is_some()
                || is_deleting(&rs.metadata)
                || !selector_matches(selector, rs.metadata.labels.as_ref())
            {
                continue;
            }
            let mut refs = rs.metadata.owner_references.clone().unwrap_or_default();
            refs.push(controller_ref(d));
            let patch = json!({"metadata": {"ownerReferences": refs, "resourceVersion": rs.metadata.resource_version}});
            let adopted = self
                .client
                .merge_patch::<ReplicaSet>(rs.metadata.namespace.as_deref(), name(&rs.metadata), None, &patch)
                .await?;
            self.remember(adopted);
        }
        Ok(())
    }

    fn remember(&mut self, rs: ReplicaSet) -> ReplicaSet {
        self.written
            .insert(object_key(&rs.metadata), (rs.clone(), Instant::now()));
        rs
    }

    async fn sync(&mut self, key: &str) -> Result<Option<Duration>, ClientError> {
        let Some(d) = self.deployments.get(key) else {
            return Ok(None);
        };
        if is_deleting(&d.metadata) {
            return Ok(None);
        }
        let ns = d.metadata.namespace.clone().unwrap_or_default();
        let spec = d.spec.clone().unwrap_or_default();
        let replicas = spec.replicas.unwrap_or(1).max(0);
        self.adopt_orphans(&d).await?;
        let all = self.replica_sets(&ns, uid(&d.metadata));
        let template = without_hash(Some(&spec.template));
        let (mut new_rs, mut old): (Vec<ReplicaSet>, Vec<ReplicaSet>) = all
            .into_iter()
            .partition(|rs| without_hash(rs.spec.as_ref().and_then(|s| s.template.as_ref())) == template);
        // Several identical templates: the newest revision is the new one.
        new_rs.sort_by_key(|rs| std::cmp::Reverse(revision(&rs.metadata)));
        if new_rs.len() > 1 {
            old.extend(new_rs.drain(1..));
        }
        let mut new_rs = new_rs.pop();
        old.sort_by_key(|rs| {
            (
                rs.metadata.creation_timestamp.as_ref().map(|t| t.0),
                revision(&rs.metadata),
            )
        });
        let mut created = false;

        // The replica count changed while a rollout has several ReplicaSets active: each keeps its share.
        let active: Vec<ReplicaSet> = old
            .iter()
            .chain(new_rs.iter())
            .filter(|rs| spec_replicas(rs) > 0)
            .cloned()
            .collect();
        let scaling_event = active.iter().any(|rs| {
            let desired = rs.metadata.annotations.as_ref().and_then(|a| a.get(DESIRED_REPLICAS));
            desired
                .and_then(|v| v.parse::<i32>().ok())
                .is_some_and(|v| v != replicas)
        });
        if active.len() > 1 && scaling_event && !is_recreate(&d) {
            let (surge, _) = fenceposts(&d, replicas);
            let sizes: Vec<(i32, i64)> = active
                .iter()
                .map(|rs| (spec_replicas(rs), revision(&rs.metadata)))
                .collect();
            for (rs, size) in active.iter().zip(proportional_sizes(&sizes, replicas + surge)) {
                let scaled = self.scale(&d, rs, size, replicas).await?;
                for slot in old.iter_mut().chain(new_rs.iter_mut()) {
                    if slot.metadata.name == scaled.metadata.name {
                        *slot = scaled.clone();
                    }
                }
            }
            return self.update_status(&d, new_rs.as_ref(), &old, false).await;
        }

        if spec.paused == Some(true) {
            self.scale_paused(&d, new_rs.as_ref(), &old, replicas).await?;
        } else {
            let max_old_revision = old.iter().map(|rs| revision(&rs.metadata)).max().unwrap_or(0);
            if let Some(rs) = &new_rs {
                let mut rs = self.sync_revision(&d, rs, max_old_revision).await?;
                let min_ready = rs.spec.as_ref().and_then(|s| s.min_ready_seconds).unwrap_or(0);
                if min_ready != spec.min_ready_seconds.unwrap_or(0) {
                    let patch = json!({"spec": {"minReadySeconds": spec.min_ready_seconds.unwrap_or(0)}});
                    let patched = self
                        .client
                        .merge_patch::<ReplicaSet>(rs.metadata.namespace.as_deref(), name(&rs.metadata), None, &patch)
                        .await?;
                    rs = self.remember(patched);
                }
                new_rs = Some(rs);
            }
            let recreate = is_recreate(&d);
            if recreate {
                let mut scaled = false;
                for rs in old.iter().filter(|rs| spec_replicas(rs) > 0) {
                    self.scale(&d, rs, 0, replicas).await?;
                    scaled = true;
                }
                let old_uids: Vec<&str> = old.iter().map(|rs| uid(&rs.metadata)).collect();
                let old_pods_left = self.pods.list().into_iter().any(|p| {
                    controller_of(&p.metadata).is_some_and(|r| old_uids.contains(&r.uid.as_str()))
                        && !crate::cluster::scheduler::is_terminal(&p)
                });
                if !scaled && !old_pods_left {
                    match &new_rs {
                        None => {
                            new_rs = Some(self.create_rs(&d, replicas, max_old_revision + 1).await?);
                            created = true;
                        }
                        Some(rs) if spec_replicas(rs) != replicas => {
                            new_rs = Some(self.scale(&d, rs, replicas, replicas).await?);
                        }
                        Some(_) => {}
                    }
                }
            } else {
                let (surge, unavailable) = fenceposts(&d, replicas);
                let total: i32 = old.iter().map(spec_replicas).sum::<i32>() + new_rs.as_ref().map_or(0, spec_replicas);
                let max_total = replicas + surge;
                let rs = match new_rs.take() {
                    Some(rs) => rs,
                    None => {
                        let first = old.iter().all(|rs| spec_replicas(rs) == 0);
                        let size = if first {
                            replicas
                        } else {
                            (max_total - total).clamp(0, replicas)
                        };
                        created = true;
                        self.create_rs(&d, size, max_old_revision + 1).await?
                    }
                };
                let current = spec_replicas(&rs);
                let total: i32 = old.iter().map(spec_replicas).sum::<i32>() + current;
                let mut scaled_new = created;
                let rs = if current > replicas {
                    scaled_new = true;
                    self.scale(&d, &rs, replicas, replicas).await?
                } else if current < replicas && total < max_total {
                    scaled_new = true;
                    let target = (current + max_total - total).min(replicas);
                    self.scale(&d, &rs, target, replicas).await?
                } else {
                    rs
                };
                if !scaled_new {
                    let sizes_in: Vec<(i32, i32)> = old.iter().map(|rs| (spec_replicas(rs), available(rs))).collect();
                    let sizes = scale_down_old(&sizes_in, (spec_replicas(&rs), available(&rs)), replicas, unavailable);
                    for (rs_old, size) in old.clone().iter().zip(sizes) {
                        if size != spec_replicas(rs_old) {
                            let scaled = self.scale(&d, rs_old, size, replicas).await?;
                            if let Some(slot) = old.iter_mut().find(|o| o.metadata.name == scaled.metadata.name) {
                                *slot = scaled;
                            }
                        }
                    }
                }
                new_rs = Some(rs);
            }
        }
        self.cleanup(&d, &old).await?;
        self.update_status(&d, new_rs.as_ref(), &old, created).await
    }

    /// Paused: no rollout, but a replica count change still lands (on the newest active ReplicaSet).
    async fn scale_paused(
        &mut self,
        d: &Deployment,
        new_rs: Option<&ReplicaSet>,
        old: &[ReplicaSet],
        replicas: i32,
    ) -> Result<(), ClientError> {
        let total: i32 = old.iter().map(spec_replicas).sum::<i32>() + new_rs.map_or(0, spec_replicas);
        if total == replicas {
            return Ok(());
        }
        let target = new_rs
            .or_else(|| {
                old.iter()
                    .filter(|rs| spec_replicas(rs) > 0)
                    .max_by_key(|rs| revision(&rs.metadata))
            })
            .or_else(|| old.iter().max_by_key(|rs| revision(&rs.metadata)));
        if let Some(rs) = target {
            let size = (spec_replicas(rs) + replicas - total).max(0);
            self.scale(d, rs, size, replicas).await?;
        }
        Ok(())
    }

    /// The new ReplicaSet's revision is one above every old one (a rollback renumbers it).
    async fn sync_revision(
        &mut self,
        d: &Deployment,
        rs: &ReplicaSet,
        max_old: i64,
    ) -> Result<ReplicaSet, ClientError> {
        let current = revision(&rs.metadata);
        let cause = d
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(CHANGE_CAUSE))
            .cloned();
        let rs_cause = rs
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(CHANGE_CAUSE))
            .cloned();
        if current > max_old && (cause.is_none() || cause == rs_cause) {
            return Ok(rs.clone());
        }
        let mut annotations = json!({});
        if current <= max_old {
            annotations[REVISION] = json!((max_old + 1).to_string());
            if current > 0 {
                let history = rs
                    .metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(REVISION_HISTORY))
                    .filter(|h| !h.is_empty())
                    .map_or(current.to_string(), |h| format!("{h},{current}"));
                annotations[REVISION_HISTORY] = json!(history);
            }
        }
        if let Some(cause) = cause {
            annotations[CHANGE_CAUSE] = json!(cause);
        }
        let patched = self
            .client
            .merge_patch::<ReplicaSet>(
                rs.metadata.namespace.as_deref(),
                name(&rs.metadata),
                None,
                &json!({"metadata": {"annotations": annotations}}),
            )
            .await?;
        Ok(self.remember(patched))
    }

    async fn create_rs(&mut self, d: &Deployment, size: i32, rev: i64) -> Result<ReplicaSet, ClientError> {
        let spec = d.spec.clone().unwrap_or_default();
        let ns = d.metadata.namespace.clone();
        let collisions = d.status.as_ref().and_then(|s| s.collision_count).unwrap_or(0);
        let template_value = serde_json::to_value(&spec.template).unwrap_or_default();
        let hash = template_hash(&template_value, collisions);
        let rs_name = format!("{}-{hash}", name(&d.metadata));
        let mut template = spec.template.clone();
        let meta = template.metadata.get_or_insert_with(Default::default);
        meta.labels
            .get_or_insert_with(Default::default)
            .insert(HASH_LABEL.into(), hash.clone());
        let mut selector: LabelSelector = spec.selector.clone();
        selector
            .match_labels
            .get_or_insert_with(Default::default)
            .insert(HASH_LABEL.into(), hash.clone());
        let (surge, _) = fenceposts(d, spec.replicas.unwrap_or(1));
        let mut annotations: BTreeMap<String, String> = BTreeMap::new();
        annotations.insert(REVISION.into(), rev.to_string());
        annotations.insert(DESIRED_REPLICAS.into(), spec.replicas.unwrap_or(1).to_string());
        annotations.insert(MAX_REPLICAS.into(), (spec.replicas.unwrap_or(1) + surge).to_string());
        if let Some(cause) = d.metadata.annotations.as_ref().and_then(|a| a.get(CHANGE_CAUSE)) {
            annotations.insert(CHANGE_CAUSE.into(), cause.clone());
        }
        let rs = ReplicaSet {
            metadata: ObjectMeta {
                name: Some(rs_name.clone()),
                namespace: ns.clone(),
                labels: meta.labels.clone(),
                annotations: Some(annotations),
                owner_references: Some(vec![controller_ref(d)]),
                ..Default::default()
            },
            spec: Some(ReplicaSetSpec {
                replicas: Some(size),
                min_ready_seconds: spec.min_ready_seconds,
                selector,
                template: Some(template),
            }),
            status: None,
        };
        match self.client.create(ns.as_deref(), &rs).await {
            Ok(created) => {
                if size > 0 {
                    self.recorder.emit(
                        reference(d),
                        EventType::Normal,
                        "ScalingReplicaSet",
                        format!("Scaled up replica set {rs_name} to {size} from 0"),
                    );
                }
                Ok(self.remember(created))
            }
            Err(err) if err.is_conflict() => {
                // Taken by a ReplicaSet with another template (or one we cannot see yet): count a collision.
                if let Ok(existing) = self.client.get::<ReplicaSet>(ns.as_deref(), &rs_name).await
                    && controlled_by(&existing.metadata, uid(&d.metadata))
                    && without_hash(existing.spec.as_ref().and_then(|s| s.template.as_ref()))
                        == without_hash(Some(&spec.template))
                {
                    return Ok(self.remember(existing));
                }
                self.client
                    .merge_patch::<Deployment>(
                        ns.as_deref(),
                        name(&d.metadata),
                        Some("status"),
                        &json!({"status": {"collisionCount": collisions + 1}}),
                    )
                    .await?;
                Err(err)
            }
            Err(err) => Err(err),
        }
    }

    async fn scale(
        &mut self,
        d: &Deployment,
        rs: &ReplicaSet,
        size: i32,
        replicas: i32,
    ) -> Result<ReplicaSet, ClientError> {
        let from = spec_replicas(rs);
        let (surge, _) = fenceposts(d, replicas);
        let patch = json!({
            "metadata": {"annotations": {DESIRED_REPLICAS: replicas.to_string(),
                                         MAX_REPLICAS: (replicas + surge).to_string()}},
            "spec": {"replicas": size},
        });
        let scaled = self
            .client
            .merge_patch::<ReplicaSet>(rs.metadata.namespace.as_deref(), name(&rs.metadata), None, &patch)
            .await?;
        if from != size {
            let direction = if size > from { "up" } else { "down" };
            self.recorder.emit(
                reference(d),
                EventType::Normal,
                "ScalingReplicaSet",
                format!(
                    "Scaled {direction} replica set {} to {size} from {from}",
                    name(&rs.metadata)
                ),
            );
        }
        Ok(self.remember(scaled))
    }

    /// Deletes the oldest scaled-down ReplicaSets beyond `revisionHistoryLimit`.
    async fn cleanup(&mut self, d: &Deployment, old: &[ReplicaSet]) -> Result<(), ClientError> {
        let limit = d
            .spec
            .as_ref()
            .and_then(|s| s.revision_history_limit)
            .unwrap_or(10)
            .max(0) as usize;
        let mut idle: Vec<&ReplicaSet> = old
            .iter()
            .filter(|rs| spec_replicas(rs) == 0 && rs.status.as_ref().is_none_or(|s| s.replicas == 0))
            .collect();
        if idle.len() <= limit {
            return Ok(());
        }
        idle.sort_by_key(|rs| revision(&rs.metadata));
        for rs in &idle[..idle.len() - limit] {
            self.client
                .delete::<ReplicaSet>(rs.metadata.namespace.as_deref(), name(&rs.metadata), None)
                .await?;
            self.written.remove(&object_key(&rs.metadata));
        }
        Ok(())
    }

    async fn update_status(
        &mut self,
        d: &Deployment,
        new_rs: Option<&ReplicaSet>,
        old: &[ReplicaSet],
        created: bool,
    ) -> Result<Option<Duration>, ClientError> {
        let spec = d.spec.clone().unwrap_or_default();
        let replicas = spec.replicas.unwrap_or(1).max(0);
        let all: Vec<&ReplicaSet> = old.iter().chain(new_rs).collect();
        let sum = |f: &dyn Fn(&ReplicaSet) -> i32| all.iter().map(|rs| f(rs)).sum::<i32>();
        let status_replicas = sum(&|rs| rs.status.as_ref().map_or(0, |s| s.replicas));
        let ready = sum(&|rs| rs.status.as_ref().and_then(|s| s.ready_replicas).unwrap_or(0));
        let avail = sum(&available);
        let total_spec = sum(&spec_replicas);
        let updated = new_rs.and_then(|rs| rs.status.as_ref()).map_or(0, |s| s.replicas);
        let new_name = new_rs.map(|rs| name(&rs.metadata).to_string()).unwrap_or_default();
        let generation = d.metadata.generation.unwrap_or(1);

        let old_status = d.status.clone().unwrap_or_default();
        let mut conditions: Vec<Value> = old_status
            .conditions
            .clone()
            .unwrap_or_default()
            .iter()
            .filter_map(|c| serde_json::to_value(c).ok())
            .collect();
        let at: Timestamp = now();
        let stamp = json!(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(at));
        let max_unavailable = if is_recreate(d) { 0 } else { fenceposts(d, replicas).1 };
        if avail >= replicas - max_unavailable {
            set_condition(
                &mut conditions,
                &stamp,
                "Available",
                "True",
                "MinimumReplicasAvailable",
                "Deployment has minimum availability.".into(),
                false,
            );
        } else {
            set_condition(
                &mut conditions,
                &stamp,
                "Available",
                "False",
                "MinimumReplicasUnavailable",
                "Deployment does not have minimum availability.".into(),
                false,
            );
        }
        // A ReplicaSet that cannot create its pods says so on the Deployment too.
        let failure = all.iter().find_map(|rs| {
            rs.status
                .as_ref()?
                .conditions
                .as_ref()?
                .iter()
                .find(|c| c.type_ == "ReplicaFailure" && c.status == "True")
                .cloned()
        });
        match failure {
            Some(c) => set_condition(
                &mut conditions,
                &stamp,
                "ReplicaFailure",
                "True",
                c.reason.as_deref().unwrap_or("FailedCreate"),
                c.message.unwrap_or_default(),
                false,
            ),
            None => conditions.retain(|c| c["type"] != "ReplicaFailure"),
        }
        let complete = updated == replicas && status_replicas == replicas && avail == replicas && new_rs.is_some();
        let old_old_replicas = old_status.replicas.unwrap_or(0) - old_status.updated_replicas.unwrap_or(0);
        let progressed = updated > old_status.updated_replicas.unwrap_or(0)
            || status_replicas - updated < old_old_replicas
            || ready > old_status.ready_replicas.unwrap_or(0)
            || avail > old_status.available_replicas.unwrap_or(0);
        let progressing = conditions.iter().find(|c| c["type"] == "Progressing").cloned();
        let reason_now = progressing.as_ref().and_then(|c| c["reason"].as_str()).unwrap_or("");
        let deadline = spec.progress_deadline_seconds.map(i64::from);
        let mut recheck = None;
        if spec.paused == Some(true) {
            set_condition(
                &mut conditions,
                &stamp,
                "Progressing",
                "Unknown",
                "DeploymentPaused",
                "Deployment is paused".into(),
                false,
            );
        } else if complete {
            set_condition(
                &mut conditions,
                &stamp,
                "Progressing",
                "True",
                "NewReplicaSetAvailable",
                format!("ReplicaSet \"{new_name}\" has successfully progressed."),
                false,
            );
        } else if created {
            set_condition(
                &mut conditions,
                &stamp,
                "Progressing",
                "True",
                "NewReplicaSetCreated",
                format!("Created new replica set \"{new_name}\""),
                true,
            );
        } else if progressed
            || matches!(reason_now, "" | "NewReplicaSetAvailable" | "DeploymentPaused")
            || (reason_now == "ProgressDeadlineExceeded" && old_status.observed_generation != Some(generation))
        {
            set_condition(
                &mut conditions,
                &stamp,
                "Progressing",
                "True",
                "ReplicaSetUpdated",
                format!("ReplicaSet \"{new_name}\" is progressing."),
                true,
            );
        } else if reason_now != "ProgressDeadlineExceeded"
            && let (Some(deadline), Some(c)) = (deadline, &progressing)
        {
            let last = c["lastUpdateTime"]
                .as_str()
                .and_then(|t| t.parse::<Timestamp>().ok())
                .unwrap_or(at);
            let left_ms = last.as_millisecond() + deadline * 1000 - at.as_millisecond();
            if left_ms <= 0 {
                set_condition(
                    &mut conditions,
                    &stamp,
                    "Progressing",
                    "False",
                    "ProgressDeadlineExceeded",
                    format!("ReplicaSet \"{new_name}\" has timed out progressing."),
                    false,
                );
                self.recorder.emit(
                    reference(d),
                    EventType::Warning,
                    "ProgressDeadlineExceeded",
                    format!("Deployment \"{}\" has timed out progressing.", name(&d.metadata)),
                );
            } else {
                recheck = Some(Duration::from_millis(left_ms as u64 + 50));
            }
        }
        if !complete && spec.paused != Some(true) && recheck.is_none() && reason_now != "ProgressDeadlineExceeded" {
            recheck = deadline.map(|s| Duration::from_secs(s as u64) + Duration::from_millis(50));
        }
        let status = json!({
            "observedGeneration": generation,
            "replicas": status_replicas,
            "updatedReplicas": updated,
            "readyReplicas": ready,
            "availableReplicas": avail,
            "unavailableReplicas": (total_spec - avail).max(0),
            "conditions": conditions,
        });
        let current = json!({
            "observedGeneration": old_status.observed_generation.unwrap_or(0),
            "replicas": old_status.replicas.unwrap_or(0),
            "updatedReplicas": old_status.updated_replicas.unwrap_or(0),
            "readyReplicas": old_status.ready_replicas.unwrap_or(0),
            "availableReplicas": old_status.available_replicas.unwrap_or(0),
            "unavailableReplicas": old_status.unavailable_replicas.unwrap_or(0),
            "conditions": old_status.conditions.as_ref().map_or(json!([]), |c| serde_json::to_value(c).unwrap_or_default()),
        });
        let ns = d.metadata.namespace.as_deref();
        if let Some(rs) = new_rs {
            let rev = revision(&rs.metadata).to_string();
            let have = d.metadata.annotations.as_ref().and_then(|a| a.get(REVISION));
            if have != Some(&rev) {
                self.client
                    .merge_patch::<Deployment>(
                        ns,
                        name(&d.metadata),
                        None,
                        &json!({"metadata": {"annotations": {REVISION: rev}}}),
                    )
                    .await?;
            }
        }
        if status != current {
            self.client
                .merge_patch::<Deployment>(ns, name(&d.metadata), Some("status"), &json!({"status": status}))
                .await?;
        }
        Ok(recheck)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int_or_percent() {
        let p = |s: &str| IntOrString::String(s.into());
        assert_eq!(resolve(Some(&p("25%")), 3, true, 0), 1);
        assert_eq!(resolve(Some(&p("25%")), 3, false, 0), 0);
        assert_eq!(resolve(Some(&p("50%")), 5, true, 0), 3);
        assert_eq!(resolve(Some(&IntOrString::Int(2)), 10, false, 0), 2);
        assert_eq!(resolve(None, 10, true, 25), 3);
    }

    #[test]
    fn rolling_step_keeps_availability() {
        // 3 replicas, maxUnavailable 0: an old pod goes only as a new one is available.
        assert_eq!(scale_down_old(&[(3, 3)], (1, 0), 3, 0), [3]);
        assert_eq!(scale_down_old(&[(3, 3)], (1, 1), 3, 0), [2]);
        // Unhealthy old replicas go first, as far as the surge allows.
        assert_eq!(scale_down_old(&[(3, 1)], (1, 0), 3, 1), [2]);
        // maxUnavailable 1: one old pod may go before any new one is ready.
        assert_eq!(scale_down_old(&[(3, 3)], (1, 0), 3, 1), [2]);
        // Oldest first.
        assert_eq!(scale_down_old(&[(1, 1), (2, 2)], (3, 3), 3, 0), [0, 0]);
    }

    #[test]
    fn scaling_mid_rollout_keeps_shares() {
        // Old 3 and new 2 (4 replicas + 1 surge), scaled to 8 (+2 surge): 6 and 4.
        assert_eq!(proportional_sizes(&[(3, 1), (2, 2)], 10), [6, 4]);
        // And back down to 4 + 1.
        assert_eq!(proportional_sizes(&[(6, 1), (4, 2)], 5), [3, 2]);
        // Rounding leftovers go to the largest; ties: the newest when adding, the oldest when removing.
        assert_eq!(proportional_sizes(&[(1, 1), (1, 2)], 3), [1, 2]);
        assert_eq!(proportional_sizes(&[(2, 1), (2, 2)], 3), [1, 2]);
        assert_eq!(proportional_sizes(&[(5, 1), (0, 2), (5, 3)], 5), [2, 0, 3]);
        assert_eq!(proportional_sizes(&[(3, 1), (2, 2)], 0), [0, 0]);
    }

    #[test]
    fn templates_compare_without_the_hash_label() {
        let mut t = PodTemplateSpec::default();
        let plain = without_hash(Some(&t));
        t.metadata = Some(ObjectMeta {
            labels: Some([(HASH_LABEL.to_string(), "abc".to_string())].into()),
            ..Default::default()
        });
        assert_eq!(without_hash(Some(&t)), plain);
    }
}
