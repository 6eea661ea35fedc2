//! Node lifecycle: a node whose agent stopped renewing its Lease (in
//! `kube-node-lease`) for longer than the grace period gets its conditions set
//! to `Unknown`, the `node.kubernetes.io/unreachable` taints (NoSchedule and
//! NoExecute) and its pods marked not Ready. A node whose Ready condition is
//! False gets the `not-ready` taints instead. When the lease is renewed again,
//! the conditions this controller set go back (Ready=True) and the taints go;
//! the agent's next status report then has the last word.
//!
//! The heartbeat is the latest of the Lease's renewTime, the Ready condition's
//! lastHeartbeatTime and the node's creation, so a node that never reported
//! also becomes unreachable after the grace period.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, NodeCondition, Pod, Taint};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use serde_json::json;
use tokio::sync::broadcast::error::RecvError;

use crate::cluster::client::{Client, ListParams};
use crate::cluster::events::{EventType, Recorder, now, reference};
use crate::cluster::informer::Informer;
use crate::cluster::scheduler::filter::{TAINT_NOT_READY, TAINT_UNREACHABLE, ready_status};

pub const LEASE_NAMESPACE: &str = "kube-node-lease";
const REASON_UNKNOWN: &str = "NodeStatusUnknown";
const REASON_NEVER_UPDATED: &str = "NodeStatusNeverUpdated";

/// Starts the controller; it checks every node a few times per grace period and on every change.
pub fn spawn(client: Client, grace: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let nodes: Informer<Node> = Informer::spawn(client.clone(), None, ListParams::default());
        let leases: Informer<Lease> =
            Informer::spawn(client.clone(), Some(LEASE_NAMESPACE.into()), ListParams::default());
        let recorder = Recorder::new(client.clone(), "node-controller", None);
        let mut node_changes = nodes.subscribe();
        let mut lease_changes = leases.subscribe();
        nodes.wait_synced().await;
        leases.wait_synced().await;
        let period = (grace / 4).clamp(Duration::from_millis(200), Duration::from_secs(5));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                change = node_changes.recv() => if matches!(change, Err(RecvError::Closed)) { return },
                change = lease_changes.recv() => if matches!(change, Err(RecvError::Closed)) { return },
            }
            while node_changes.try_recv().is_ok() || lease_changes.try_recv().is_ok() {}
            let at = now();
            for node in nodes.list() {
                let name = node.metadata.name.clone().unwrap_or_default();
                let lease = leases.get(&format!("{LEASE_NAMESPACE}/{name}"));
                let Some(update) = plan(&node, lease.as_ref(), at, grace) else {
                    continue;
                };
                if let Err(err) = apply(&client, &recorder, &node, update).await {
                    tracing::debug!(node = name, error = %err, "updating a node");
                }
            }
        }
    })
}

/// Changes one node needs: new conditions and/or new taints.
#[derive(Debug, Default, PartialEq)]
pub struct NodeUpdate {
    pub conditions: Option<Vec<NodeCondition>>,
    pub taints: Option<Vec<Taint>>,
}

/// The latest sign of life of the node.
pub fn last_heartbeat(node: &Node, lease: Option<&Lease>) -> Option<Timestamp> {
    let lease_spec = lease.and_then(|l| l.spec.as_ref());
    let renewed = lease_spec.and_then(|s| s.renew_time.as_ref().or(s.acquire_time.as_ref()));
    let reported = conditions(node)
        .iter()
        .find(|c| c.type_ == "Ready")
        .and_then(|c| c.last_heartbeat_time.clone());
    [
        renewed.map(|t| t.0),
        reported.map(|t| t.0),
        node.metadata.creation_timestamp.as_ref().map(|t| t.0),
    ]
    .into_iter()
    .flatten()
    .max()
}

fn conditions(node: &Node) -> Vec<NodeCondition> {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default()
}

/// What the node needs at time `at`, or None when it is as it should be.
pub fn plan(node: &Node, lease: Option<&Lease>, at: Timestamp, grace: Duration) -> Option<NodeUpdate> {
    let stale = last_heartbeat(node, lease)
        .is_none_or(|beat| at.as_millisecond() - beat.as_millisecond() > grace.as_millis() as i64);
    let mut update = NodeUpdate::default();
    let current = conditions(node);
    let ready = ready_status(node).to_string();
    let ours = |c: &NodeCondition| matches!(c.reason.as_deref(), Some(REASON_UNKNOWN | REASON_NEVER_UPDATED));
    if stale && (ready != "Unknown" || !current.iter().any(|c| c.type_ == "Ready")) {
        let mut next: Vec<NodeCondition> = current
            .into_iter()
            .map(|mut c| {
                if c.status != "Unknown" {
                    c.status = "Unknown".into();
                    c.reason = Some(REASON_UNKNOWN.into());
                    c.message = Some("Kubelet stopped posting node status.".into());
                    c.last_transition_time = Some(Time(at));
                }
                c
            })
            .collect();
        if !next.iter().any(|c| c.type_ == "Ready") {
            next.push(NodeCondition {
                type_: "Ready".into(),
                status: "Unknown".into(),
                reason: Some(REASON_NEVER_UPDATED.into()),
                message: Some("Kubelet never posted node status.".into()),
                last_transition_time: Some(Time(at)),
                ..Default::default()
            });
        }
        update.conditions = Some(next);
    } else if !stale
        && current
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "Unknown" && ours(c))
    {
        let next = current
            .into_iter()
            .map(|mut c| {
                if c.status == "Unknown" && ours(&c) {
                    let ready = c.type_ == "Ready";
                    c.status = if ready { "True" } else { "False" }.into();
                    c.reason = Some(if ready { "KubeletReady" } else { "NodeHeartbeatResumed" }.into());
                    c.message = Some("the node's lease is being renewed again".into());
                    c.last_transition_time = Some(Time(at));
                    c.last_heartbeat_time = Some(Time(at));
                }
                c
            })
            .collect();
        update.conditions = Some(next);
    }
    let ready_after = match &update.conditions {
        Some(next) => next
            .iter()
            .find(|c| c.type_ == "Ready")
            .map_or("Unknown", |c| c.status.as_str())
            .to_string(),
        None => ready,
    };
    let current_taints = node.spec.as_ref().and_then(|s| s.taints.clone()).unwrap_or_default();
    let taints = taints_for(&current_taints, &ready_after, at);
    if taints != current_taints {
        update.taints = Some(taints);
    }
    (update != NodeUpdate::default()).then_some(update)
}

/// `current` with this controller's taints made to match the Ready status.
fn taints_for(current: &[Taint], ready: &str, at: Timestamp) -> Vec<Taint> {
    let wanted_key = match ready {
        "True" => None,
        "False" => Some(TAINT_NOT_READY),
        _ => Some(TAINT_UNREACHABLE),
    };
    let managed = |t: &Taint| {
        (t.key == TAINT_NOT_READY || t.key == TAINT_UNREACHABLE)
            && (t.effect == "NoSchedule" || t.effect == "NoExecute")
    };
    let mut taints: Vec<Taint> = current
        .iter()
        .filter(|t| !managed(t) || Some(t.key.as_str()) == wanted_key)
        .cloned()
        .collect();
    if let Some(key) = wanted_key {
        for effect in ["NoSchedule", "NoExecute"] {
            if !taints.iter().any(|t| t.key == key && t.effect == effect) {
                taints.push(Taint {
                    key: key.into(),
                    effect: effect.into(),
                    time_added: Some(Time(at)),
                    value: None,
                });
            }
        }
    }
    taints
}

async fn apply(
    client: &Client,
    recorder: &Recorder,
    node: &Node,
    update: NodeUpdate,
) -> crate::cluster::client::Result<()> {
    let name = node.metadata.name.as_deref().unwrap_or_default();
    let mut version = node.metadata.resource_version.clone();
    if let Some(next) = &update.conditions {
        let patch = json!({"metadata": {"resourceVersion": version}, "status": {"conditions": next}});
        let patched: Node = client.merge_patch(None, name, Some("status"), &patch).await?;
        version = patched.metadata.resource_version;
        let ready = next
            .iter()
            .find(|c| c.type_ == "Ready")
            .map_or("Unknown", |c| c.status.as_str());
        let (reason, unreachable) = if ready == "True" {
            ("NodeReady", false)
        } else {
            ("NodeNotReady", true)
        };
        tracing::info!(node = name, ready, "node status changed by its heartbeat");
        recorder.emit(
            reference(node),
            EventType::Normal,
            reason,
            format!("Node {name} status is now: {reason}"),
        );
        if unreachable {
            mark_pods_not_ready(client, name).await;
        }
    }
    if let Some(taints) = &update.taints {
        let taints = if taints.is_empty() { json!(null) } else { json!(taints) };
        let patch = json!({"metadata": {"resourceVersion": version}, "spec": {"taints": taints}});
        client.merge_patch::<Node>(None, name, None, &patch).await?;
    }
    Ok(())
}

/// Sets `Ready=False` on the pods of an unreachable node, as their state is no longer known.
async fn mark_pods_not_ready(client: &Client, node: &str) {
    let params = ListParams::fields(format!("spec.nodeName={node}"));
    let pods = match client.list::<Pod>(None, &params).await {
        Ok(list) => list.items,
        Err(err) => return tracing::debug!(node, error = %err, "listing the pods of a node"),
    };
    for pod in pods {
        let mut conditions = pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.clone())
            .unwrap_or_default();
        let Some(ready) = conditions.iter_mut().find(|c| c.type_ == "Ready" && c.status == "True") else {
            continue;
        };
        ready.status = "False".into();
        ready.last_transition_time = Some(Time(now()));
        let patch = json!({
            "metadata": {"resourceVersion": pod.metadata.resource_version},
            "status": {"conditions": conditions},
        });
        let name = pod.metadata.name.as_deref().unwrap_or_default();
        if let Err(err) = client
            .merge_patch::<Pod>(pod.metadata.namespace.as_deref(), name, Some("status"), &patch)
            .await
        {
            tracing::debug!(pod = name, error = %err, "marking a pod not ready");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::api::core::v1::{NodeSpec, NodeStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};

    const GRACE: Duration = Duration::from_secs(40);

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(second).unwrap()
    }

    fn node(ready: &str, taints: Vec<Taint>) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some("n".into()),
                creation_timestamp: Some(Time(at(1000))),
                ..Default::default()
            },
            spec: Some(NodeSpec {
                taints: Some(taints),
                ..Default::default()
            }),
            status: Some(NodeStatus {
                conditions: Some(vec![
                    NodeCondition {
                        type_: "Ready".into(),
                        status: ready.into(),
                        reason: Some(
                            if ready == "Unknown" {
                                REASON_UNKNOWN
                            } else {
                                "KubeletReady"
                            }
                            .into(),
                        ),
                        ..Default::default()
                    },
                    NodeCondition {
                        type_: "MemoryPressure".into(),
                        status: "False".into(),
                        ..Default::default()
                    },
                ]),
                ..Default::default()
            }),
        }
    }

    fn lease(renewed: i64) -> Lease {
        Lease {
            metadata: ObjectMeta::default(),
            spec: Some(LeaseSpec {
                renew_time: Some(MicroTime(at(renewed))),
                ..Default::default()
            }),
        }
    }

    fn keys(taints: &[Taint]) -> Vec<String> {
        taints.iter().map(|t| format!("{}:{}", t.key, t.effect)).collect()
    }

    #[test]
    fn fresh_ready_nodes_are_left_alone() {
        assert_eq!(plan(&node("True", vec![]), Some(&lease(2000)), at(2030), GRACE), None);
        // No lease yet: the node's creation counts.
        assert_eq!(plan(&node("True", vec![]), None, at(1030), GRACE), None);
    }

    #[test]
    fn a_stale_lease_makes_the_node_unknown_and_tainted() {
        let update = plan(&node("True", vec![]), Some(&lease(2000)), at(2041), GRACE).unwrap();
        let conditions = update.conditions.unwrap();
        assert!(conditions.iter().all(|c| c.status == "Unknown"));
        assert_eq!(conditions[0].reason.as_deref(), Some(REASON_UNKNOWN));
        assert_eq!(
            keys(&update.taints.unwrap()),
            [
                "node.kubernetes.io/unreachable:NoSchedule",
                "node.kubernetes.io/unreachable:NoExecute"
            ]
        );
        // Already Unknown and tainted: nothing more to do.
        let tainted = taints_for(&[], "Unknown", at(2041));
        assert_eq!(
            plan(&node("Unknown", tainted), Some(&lease(2000)), at(2100), GRACE),
            None
        );
    }

    #[test]
    fn a_renewed_lease_brings_the_node_back() {
        let tainted = taints_for(&[], "Unknown", at(2041));
        let mut n = node("Unknown", tainted);
        n.status.as_mut().unwrap().conditions.as_mut().unwrap()[1].status = "Unknown".into();
        n.status.as_mut().unwrap().conditions.as_mut().unwrap()[1].reason = Some(REASON_UNKNOWN.into());
        let update = plan(&n, Some(&lease(2100)), at(2101), GRACE).unwrap();
        let conditions = update.conditions.unwrap();
        assert_eq!(conditions[0].status, "True");
        assert_eq!(conditions[1].status, "False");
        assert_eq!(update.taints, Some(vec![]));
    }

    #[test]
    fn not_ready_nodes_get_not_ready_taints_and_others_stay() {
        let other = Taint {
            key: "dedicated".into(),
            effect: "NoSchedule".into(),
            ..Default::default()
        };
        let update = plan(&node("False", vec![other]), Some(&lease(2000)), at(2001), GRACE).unwrap();
        assert_eq!(update.conditions, None);
        assert_eq!(
            keys(&update.taints.unwrap()),
            [
                "dedicated:NoSchedule",
                "node.kubernetes.io/not-ready:NoSchedule",
                "node.kubernetes.io/not-ready:NoExecute"
            ]
        );
    }

    #[test]
    fn a_node_that_never_reported_becomes_unknown() {
        let mut n = node("True", vec![]);
        n.status = None;
        let update = plan(&n, None, at(1041), GRACE).unwrap();
        let conditions = update.conditions.unwrap();
        assert_eq!(conditions.len(), 1);
        assert_eq!(conditions[0].reason.as_deref(), Some(REASON_NEVER_UPDATED));
    }
}
