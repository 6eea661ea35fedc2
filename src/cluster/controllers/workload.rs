//! What the workload controllers (ReplicaSet, Deployment, DaemonSet) share: pod readiness and availability,
//! controller references, selectors, and a keyed work queue with delayed retries.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::ControllerRevision;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::runtime::RawExtension;
use k8s_openapi::jiff::Timestamp;
use k8s_openapi::{Metadata, Resource};
use serde_json::{Value, json};

use crate::cluster::apiserver::select;
use crate::cluster::client::{Client, ClientError};
use crate::cluster::informer::Informer;

/// The owner reference marked `controller: true`, if any.
pub fn controller_of(meta: &ObjectMeta) -> Option<&OwnerReference> {
    meta.owner_references
        .as_deref()
        .unwrap_or_default()
        .iter()
        .find(|r| r.controller == Some(true))
}

/// Whether `meta` is controlled by the object with `uid`.
pub fn controlled_by(meta: &ObjectMeta, uid: &str) -> bool {
    controller_of(meta).is_some_and(|r| r.uid == uid)
}

/// A controller reference to `owner` (`controller` and `blockOwnerDeletion` set).
pub fn controller_ref<K: Resource + Metadata<Ty = ObjectMeta>>(owner: &K) -> OwnerReference {
    let meta = owner.metadata();
    OwnerReference {
        api_version: K::API_VERSION.to_string(),
        kind: K::KIND.to_string(),
        name: meta.name.clone().unwrap_or_default(),
        uid: meta.uid.clone().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

pub fn name(meta: &ObjectMeta) -> &str {
    meta.name.as_deref().unwrap_or_default()
}

pub fn uid(meta: &ObjectMeta) -> &str {
    meta.uid.as_deref().unwrap_or_default()
}

pub fn is_deleting(meta: &ObjectMeta) -> bool {
    meta.deletion_timestamp.is_some()
}

/// Whether a structured selector matches the labels. A missing selector matches nothing.
pub fn selector_matches(
    selector: Option<&LabelSelector>,
    labels: Option<&std::collections::BTreeMap<String, String>>,
) -> bool {
    let Some(selector) = selector else { return false };
    let Ok(sel) = serde_json::to_value(selector) else {
        return false;
    };
    let obj = serde_json::json!({"metadata": {"labels": labels}});
    select::selector_matches(&sel, &obj)
}

/// A pod that counts towards its controller's replicas: not being deleted and not finished.
pub fn is_active(pod: &Pod) -> bool {
    !is_deleting(&pod.metadata) && !crate::cluster::scheduler::is_terminal(pod)
}

/// When the pod's Ready condition turned True, if it is ready.
pub fn ready_since(pod: &Pod) -> Option<Option<Timestamp>> {
    let cond = pod
        .status
        .as_ref()?
        .conditions
        .as_deref()?
        .iter()
        .find(|c| c.type_ == "Ready" && c.status == "True")?;
    Some(cond.last_transition_time.as_ref().map(|t| t.0))
}

pub fn is_ready(pod: &Pod) -> bool {
    ready_since(pod).is_some()
}

/// Ready for at least `min_ready` at `now`; otherwise how long until it would be (None if not ready at all).
pub fn availability(pod: &Pod, min_ready: i64, now: Timestamp) -> Result<(), Option<Duration>> {
    let since = ready_since(pod).ok_or(None)?;
    if min_ready <= 0 {
        return Ok(());
    }
    let Some(since) = since else { return Ok(()) };
    let ready_ms = now.as_millisecond() - since.as_millisecond();
    let need_ms = min_ready * 1000;
    if ready_ms >= need_ms {
        Ok(())
    } else {
        Err(Some(Duration::from_millis((need_ms - ready_ms) as u64)))
    }
}

pub fn is_available(pod: &Pod, min_ready: i64, now: Timestamp) -> bool {
    availability(pod, min_ready, now).is_ok()
}

/// FNV-1a (32 bit) of the bytes, as Kubernetes hashes pod templates.
pub fn fnv32a(data: &[u8]) -> u32 {
    data.iter()
        .fold(0x811c_9dc5u32, |h, b| (h ^ u32::from(*b)).wrapping_mul(0x0100_0193))
}

/// A hash rendered with the alphabet Kubernetes uses for name suffixes (no vowels, no confusable digits).
pub fn safe_encode(n: u32) -> String {
    const ALPHA: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    n.to_string()
        .bytes()
        .map(|b| ALPHA[usize::from(b) % ALPHA.len()] as char)
        .collect()
}

/// The hash of a pod template (its canonical JSON) plus a collision count.
pub fn template_hash(template: &Value, collision_count: i32) -> String {
    let mut data = serde_json::to_vec(template).unwrap_or_default();
    if collision_count > 0 {
        data.extend_from_slice(collision_count.to_string().as_bytes());
    }
    safe_encode(fnv32a(&data))
}

pub const REVISION_HASH_LABEL: &str = "controller-revision-hash";

/// Keeps one ControllerRevision per template of `owner` (DaemonSet, StatefulSet), named `<owner>-<hash>`: the
/// current one has the highest revision (going back to an old template renumbers it), and old ones beyond
/// `history_limit` go.
pub async fn sync_revisions<K>(
    client: &Client,
    revisions: &Informer<ControllerRevision>,
    owner: &K,
    template_labels: Option<BTreeMap<String, String>>,
    hash: &str,
    template: &Value,
    history_limit: i32,
) -> Result<(), ClientError>
where
    K: Resource + Metadata<Ty = ObjectMeta>,
{
    let meta = owner.metadata();
    let ns = meta.namespace.clone();
    let owner_uid = uid(meta);
    let mut owned: Vec<ControllerRevision> = revisions
        .list()
        .into_iter()
        .filter(|r| r.metadata.namespace == ns && controlled_by(&r.metadata, owner_uid))
        .collect();
    let cr_name = format!("{}-{hash}", name(meta));
    let max = owned.iter().map(|r| r.revision).max().unwrap_or(0);
    match owned.iter().find(|r| name(&r.metadata) == cr_name) {
        Some(r) if r.revision < max => {
            client
                .merge_patch::<ControllerRevision>(ns.as_deref(), &cr_name, None, &json!({"revision": max + 1}))
                .await?;
        }
        Some(_) => {}
        None => {
            let mut labels = template_labels.unwrap_or_default();
            labels.insert(REVISION_HASH_LABEL.into(), hash.to_string());
            let mut data_template = template.clone();
            data_template["$patch"] = json!("replace");
            let cr = ControllerRevision {
                metadata: ObjectMeta {
                    name: Some(cr_name.clone()),
                    namespace: ns.clone(),
                    labels: Some(labels),
                    owner_references: Some(vec![controller_ref(owner)]),
                    ..Default::default()
                },
                data: Some(RawExtension(json!({"spec": {"template": data_template}}))),
                revision: max + 1,
            };
            match client.create(ns.as_deref(), &cr).await {
                Ok(created) => owned.push(created),
                Err(err) if err.is_conflict() => {}
                Err(err) => return Err(err),
            }
        }
    }
    let limit = history_limit.max(0) as usize;
    let mut old: Vec<&ControllerRevision> = owned.iter().filter(|r| name(&r.metadata) != cr_name).collect();
    if old.len() > limit {
        old.sort_by_key(|r| r.revision);
        for r in &old[..old.len() - limit] {
            client
                .delete::<ControllerRevision>(ns.as_deref(), name(&r.metadata), None)
                .await?;
        }
    }
    Ok(())
}

/// Pods a controller created or deleted per owner key, until its pod cache shows them: reconciling on a cache
/// that misses the controller's own last writes would create or delete pods twice.
#[derive(Default)]
pub struct Expectations {
    by_key: HashMap<String, Pending>,
}

struct Pending {
    created: HashSet<String>,
    deleted: HashSet<String>,
    since: Instant,
}

/// Expectations older than this are dropped (a lost watch event must not block an owner for ever).
const EXPECTATION_TTL: Duration = Duration::from_secs(30);

impl Expectations {
    fn pending(&mut self, key: &str) -> &mut Pending {
        let p = self.by_key.entry(key.to_string()).or_insert_with(|| Pending {
            created: HashSet::new(),
            deleted: HashSet::new(),
            since: Instant::now(),
        });
        p.since = Instant::now();
        p
    }

    pub fn created(&mut self, key: &str, pod: &str) {
        self.pending(key).created.insert(pod.to_string());
    }

    pub fn deleted(&mut self, key: &str, pod: &str) {
        self.pending(key).deleted.insert(pod.to_string());
    }

    pub fn forget(&mut self, key: &str) {
        self.by_key.remove(key);
    }

    /// Whether the cache shows every pod created or deleted for `key` (pods of namespace `ns`).
    pub fn caught_up(&mut self, key: &str, ns: &str, pods: &Informer<Pod>) -> bool {
        let Some(p) = self.by_key.get_mut(key) else { return true };
        p.created.retain(|n| pods.get(&format!("{ns}/{n}")).is_none());
        p.deleted.retain(|n| {
            pods.get(&format!("{ns}/{n}"))
                .is_some_and(|pod| !is_deleting(&pod.metadata))
        });
        let done = (p.created.is_empty() && p.deleted.is_empty()) || p.since.elapsed() > EXPECTATION_TTL;
        if done {
            self.by_key.remove(key);
        }
        done
    }
}

/// Keys to reconcile now, keys to reconcile later, and per-key retry backoff.
#[derive(Default)]
pub struct WorkQueue {
    ready: BTreeSet<String>,
    later: HashMap<String, Instant>,
    failures: HashMap<String, u32>,
}

impl WorkQueue {
    pub fn add(&mut self, key: impl Into<String>) {
        self.ready.insert(key.into());
    }

    /// Reconcile `key` again after `delay` (the earliest request wins).
    pub fn add_after(&mut self, key: &str, delay: Duration) {
        let at = Instant::now() + delay;
        let slot = self.later.entry(key.to_string()).or_insert(at);
        *slot = (*slot).min(at);
    }

    /// After a failed reconcile: 100 ms, doubling up to 10 s.
    pub fn retry(&mut self, key: &str) {
        let n = self.failures.entry(key.to_string()).or_insert(0);
        *n += 1;
        let delay = Duration::from_millis(100 * 2u64.pow((*n - 1).min(7))).min(Duration::from_secs(10));
        self.add_after(key, delay);
    }

    pub fn succeeded(&mut self, key: &str) {
        self.failures.remove(key);
    }

    /// Moves due delayed keys to ready and returns all ready keys.
    pub fn take(&mut self) -> Vec<String> {
        let now = Instant::now();
        let due: Vec<String> = self
            .later
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for k in due {
            self.later.remove(&k);
            self.ready.insert(k);
        }
        std::mem::take(&mut self.ready).into_iter().collect()
    }

    /// When the next delayed key is due (far in the future if none).
    pub fn next_due(&self) -> tokio::time::Instant {
        let at = self
            .later
            .values()
            .min()
            .copied()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::time::Instant::from_std(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_stable_and_safe() {
        assert_eq!(fnv32a(b""), 0x811c_9dc5);
        assert_eq!(fnv32a(b"a"), 0xe40c_292c);
        let h = template_hash(&serde_json::json!({"spec": {"containers": []}}), 0);
        assert_eq!(h, template_hash(&serde_json::json!({"spec": {"containers": []}}), 0));
        assert_ne!(h, template_hash(&serde_json::json!({"spec": {"containers": []}}), 1));
        assert!(h.bytes().all(|b| b"bcdfghjklmnpqrstvwxz2456789".contains(&b)));
    }

    #[test]
    fn queue_backs_off_and_delays() {
        let mut q = WorkQueue::default();
        q.add("a");
        q.add("a");
        q.add_after("b", Duration::from_secs(60));
        assert_eq!(q.take(), ["a"]);
        assert!(q.take().is_empty());
        q.retry("c");
        assert!(q.next_due() <= tokio::time::Instant::now() + Duration::from_millis(150));
    }
}
