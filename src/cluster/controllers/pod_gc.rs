//! Pod garbage collection: pods bound to a node that no longer exists are
//! deleted with no grace (nothing is left to stop them), and finished pods
//! (Succeeded or Failed) beyond a threshold are deleted, oldest first.
//!
//! A pod's node counts as gone at once when its deletion was seen, otherwise
//! after it has been missing for [`ORPHAN_QUARANTINE`]: a pod may name a node
//! whose agent has not registered it yet.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, Pod};
use tokio::sync::broadcast::error::RecvError;

use crate::cluster::client::{Client, ListParams};
use crate::cluster::informer::{Change, Informer, object_key};

/// How often everything is checked, besides right after a node is deleted.
const CHECK_INTERVAL: Duration = Duration::from_secs(20);
/// How long a node nobody saw deleted must be missing before its pods go.
pub const ORPHAN_QUARANTINE: Duration = Duration::from_secs(40);

pub fn spawn(client: Client, terminated_threshold: usize) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let pods: Informer<Pod> = Informer::spawn(client.clone(), None, ListParams::default());
        let nodes: Informer<Node> = Informer::spawn(client.clone(), None, ListParams::default());
        let mut node_changes = nodes.subscribe();
        pods.wait_synced().await;
        nodes.wait_synced().await;
        let mut tick = tokio::time::interval(CHECK_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Missing nodes: since when, or None when seen deleted.
        let mut missing: HashMap<String, Option<Instant>> = HashMap::new();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                change = node_changes.recv() => match change {
                    Ok(Change::Deleted(node)) => {
                        missing.insert(node.metadata.name.unwrap_or_default(), None);
                    }
                    Ok(Change::Applied(node)) => {
                        missing.remove(node.metadata.name.as_deref().unwrap_or_default());
                        continue;
                    }
                    Ok(Change::Resynced) | Err(RecvError::Lagged(_)) => {}
                    Err(RecvError::Closed) => return,
                },
            }
            collect(&client, &pods.list(), &nodes.list(), &mut missing, terminated_threshold).await;
        }
    })
}

async fn collect(
    client: &Client,
    pods: &[Pod],
    nodes: &[Node],
    missing: &mut HashMap<String, Option<Instant>>,
    terminated_threshold: usize,
) {
    let node_names: HashSet<&str> = nodes.iter().filter_map(|n| n.metadata.name.as_deref()).collect();
    let orphans = orphaned(pods, &node_names);
    let wanted: HashSet<&str> = orphans
        .iter()
        .filter_map(|p| p.spec.as_ref()?.node_name.as_deref())
        .collect();
    missing.retain(|name, _| wanted.contains(name.as_str()));
    for pod in orphans {
        let node = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.as_deref())
            .unwrap_or_default();
        let since = *missing.entry(node.to_string()).or_insert(Some(Instant::now()));
        if since.is_some_and(|t| t.elapsed() < ORPHAN_QUARANTINE) {
            continue;
        }
        // The node cache may lag behind: only a node the API server does not know is gone.
        match client.get_opt::<Node>(None, node).await {
            Ok(None) => delete(client, pod, &format!("its node {node} is gone")).await,
            Ok(Some(_)) => {}
            Err(err) => tracing::debug!(node, error = %err, "checking a node"),
        }
    }
    for pod in excess_terminated(pods, terminated_threshold) {
        delete(client, pod, "too many finished pods").await;
    }
}

async fn delete(client: &Client, pod: &Pod, why: &str) {
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    tracing::info!(pod = %object_key(&pod.metadata), why, "deleting pod");
    if let Err(err) = client
        .delete::<Pod>(pod.metadata.namespace.as_deref(), name, Some(0))
        .await
    {
        tracing::warn!(pod = %object_key(&pod.metadata), error = %err, "garbage-collecting a pod");
    }
}

/// Pods bound to a node not in `nodes`.
pub fn orphaned<'a>(pods: &'a [Pod], nodes: &HashSet<&str>) -> Vec<&'a Pod> {
    pods.iter()
        .filter(|p| {
            p.spec
                .as_ref()
                .and_then(|s| s.node_name.as_deref())
                .is_some_and(|n| !n.is_empty() && !nodes.contains(n))
        })
        .collect()
}

/// The oldest finished pods beyond `threshold`.
pub fn excess_terminated(pods: &[Pod], threshold: usize) -> Vec<&Pod> {
    let mut finished: Vec<&Pod> = pods
        .iter()
        .filter(|p| crate::cluster::scheduler::is_terminal(p))
        .collect();
    if finished.len() <= threshold {
        return Vec::new();
    }
    finished.sort_by_key(|p| {
        (
            p.metadata.creation_timestamp.as_ref().map(|t| t.0),
            p.metadata.name.clone(),
        )
    });
    finished.truncate(finished.len() - threshold);
    finished
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PodSpec, PodStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
    use k8s_openapi::jiff::Timestamp;

    fn pod(name: &str, node: Option<&str>, phase: &str, created: i64) -> Pod {
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
                ..Default::default()
            }),
        }
    }

    fn names(pods: Vec<&Pod>) -> Vec<&str> {
        pods.into_iter().filter_map(|p| p.metadata.name.as_deref()).collect()
    }

    #[test]
    fn orphans_are_pods_on_missing_nodes() {
        let pods = [
            pod("on-a", Some("a"), "Running", 1),
            pod("on-gone", Some("gone"), "Running", 2),
            pod("unbound", None, "Pending", 3),
            pod("empty", Some(""), "Pending", 4),
        ];
        assert_eq!(names(orphaned(&pods, &HashSet::from(["a"]))), ["on-gone"]);
    }

    #[test]
    fn oldest_finished_pods_beyond_the_threshold_go() {
        let pods = [
            pod("new-done", Some("a"), "Succeeded", 30),
            pod("running", Some("a"), "Running", 1),
            pod("old-failed", Some("a"), "Failed", 10),
            pod("mid-done", Some("a"), "Succeeded", 20),
        ];
        assert_eq!(names(excess_terminated(&pods, 1)), ["old-failed", "mid-done"]);
        assert!(excess_terminated(&pods, 3).is_empty());
    }
}
