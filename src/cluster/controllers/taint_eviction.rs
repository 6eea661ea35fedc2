//! NoExecute taint eviction: a pod on a node with a `NoExecute` taint it does
//! not tolerate is deleted at once; one it tolerates for `tolerationSeconds`
//! is deleted that long after the taint was added. Pods that say nothing about
//! the not-ready and unreachable taints tolerate them for the configured
//! eviction timeout (kube's DefaultTolerationSeconds, shorter here for demos),
//! so that the pods of a dead node are replaced elsewhere by their controllers.

use std::collections::HashMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod, Taint, Toleration};
use tokio::sync::broadcast::error::RecvError;

use crate::cluster::client::{Client, ListParams};
use crate::cluster::events::{EventType, Recorder, now, reference};
use crate::cluster::informer::Informer;
use crate::cluster::scheduler::filter::{TAINT_NOT_READY, TAINT_UNREACHABLE, tolerates};

/// When a pod must go, measured from the epoch in milliseconds; None when it may stay.
pub fn eviction_deadline(pod: &Pod, node: &Node, default_toleration: Duration) -> Option<i64> {
    let tolerations: &[Toleration] = pod
        .spec
        .as_ref()
        .and_then(|s| s.tolerations.as_deref())
        .unwrap_or_default();
    let taints = node.spec.as_ref().and_then(|s| s.taints.as_deref()).unwrap_or_default();
    taints
        .iter()
        .filter(|t| t.effect == "NoExecute")
        .filter_map(|taint| taint_deadline(taint, tolerations, default_toleration))
        .min()
}

fn taint_deadline(taint: &Taint, tolerations: &[Toleration], default_toleration: Duration) -> Option<i64> {
    let added = taint.time_added.as_ref().map_or(0, |t| t.0.as_millisecond());
    let matching: Vec<&Toleration> = tolerations.iter().filter(|t| tolerates(t, taint)).collect();
    if matching.is_empty() {
        return if taint.key == TAINT_NOT_READY || taint.key == TAINT_UNREACHABLE {
            Some(added + default_toleration.as_millis() as i64)
        } else {
            Some(i64::MIN)
        };
    }
    // Tolerated forever unless every matching toleration is time-limited; then the shortest wins.
    if matching.iter().any(|t| t.toleration_seconds.is_none()) {
        return None;
    }
    matching
        .iter()
        .filter_map(|t| t.toleration_seconds)
        .map(|secs| added + secs.max(0) * 1000)
        .min()
}

pub fn spawn(client: Client, default_toleration: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let nodes: Informer<Node> = Informer::spawn(client.clone(), None, ListParams::default());
        let pods: Informer<Pod> = Informer::spawn(client.clone(), None, ListParams::default());
        let recorder = Recorder::new(client.clone(), "taint-eviction-controller", None);
        let mut node_changes = nodes.subscribe();
        let mut pod_changes = pods.subscribe();
        nodes.wait_synced().await;
        pods.wait_synced().await;
        let mut next_check: Option<tokio::time::Instant> = None;
        loop {
            let wake = next_check.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(60));
            tokio::select! {
                _ = tokio::time::sleep_until(wake) => {}
                change = node_changes.recv() => if matches!(change, Err(RecvError::Closed)) { return },
                change = pod_changes.recv() => if matches!(change, Err(RecvError::Closed)) { return },
            }
            while node_changes.try_recv().is_ok() || pod_changes.try_recv().is_ok() {}
            let tainted: HashMap<String, Node> = nodes
                .list()
                .into_iter()
                .filter(|n| {
                    n.spec
                        .as_ref()
                        .and_then(|s| s.taints.as_ref())
                        .is_some_and(|t| t.iter().any(|t| t.effect == "NoExecute"))
                })
                .filter_map(|n| Some((n.metadata.name.clone()?, n)))
                .collect();
            next_check = None;
            if tainted.is_empty() {
                continue;
            }
            let at = now().as_millisecond();
            for pod in pods.list() {
                if pod.metadata.deletion_timestamp.is_some() {
                    continue;
                }
                let Some(node) = pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.node_name.as_ref())
                    .and_then(|n| tainted.get(n))
                else {
                    continue;
                };
                let Some(deadline) = eviction_deadline(&pod, node, default_toleration) else {
                    continue;
                };
                if deadline > at {
                    let later = tokio::time::Instant::now() + Duration::from_millis((deadline - at) as u64);
                    next_check = Some(next_check.map_or(later, |n| n.min(later)));
                    continue;
                }
                evict(&client, &recorder, &pod).await;
            }
        }
    })
}

async fn evict(client: &Client, recorder: &Recorder, pod: &Pod) {
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    match client.delete::<Pod>(Some(namespace), name, None).await {
        Ok(_) => {
            tracing::info!(pod = %format!("{namespace}/{name}"), "evicted from a NoExecute-tainted node");
            recorder.emit(
                reference(pod),
                EventType::Normal,
                "TaintManagerEviction",
                format!("Marking for deletion Pod {namespace}/{name}"),
            );
        }
        Err(err) if err.is_not_found() => {}
        Err(err) => tracing::warn!(pod = %format!("{namespace}/{name}"), error = %err, "evicting a pod"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;
    use serde_json::json;

    fn node(taints: serde_json::Value) -> Node {
        serde_json::from_value(json!({"metadata": {"name": "n"}, "spec": {"taints": taints}})).unwrap()
    }

    fn pod(tolerations: serde_json::Value) -> Pod {
        serde_json::from_value(
            json!({"metadata": {"name": "p"}, "spec": {"containers": [], "tolerations": tolerations}}),
        )
        .unwrap()
    }

    const ADDED: &str = "2026-01-01T00:00:00Z";

    #[test]
    fn deadlines_follow_tolerations() {
        let added = ADDED.parse::<Timestamp>().unwrap().as_millisecond();
        let unreachable = node(json!([{"key": TAINT_UNREACHABLE, "effect": "NoExecute", "timeAdded": ADDED}]));
        let grace = Duration::from_secs(20);
        assert_eq!(
            eviction_deadline(&pod(json!([])), &unreachable, grace),
            Some(added + 20_000)
        );
        let limited = pod(
            json!([{"key": TAINT_UNREACHABLE, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 5}]),
        );
        assert_eq!(eviction_deadline(&limited, &unreachable, grace), Some(added + 5_000));
        let forever = pod(json!([{"operator": "Exists"}]));
        assert_eq!(eviction_deadline(&forever, &unreachable, grace), None);
        let other = node(json!([{"key": "dedicated", "value": "db", "effect": "NoExecute", "timeAdded": ADDED}]));
        assert_eq!(eviction_deadline(&pod(json!([])), &other, grace), Some(i64::MIN));
        let no_schedule = node(json!([{"key": "dedicated", "effect": "NoSchedule"}]));
        assert_eq!(eviction_deadline(&pod(json!([])), &no_schedule, grace), None);
    }
}
