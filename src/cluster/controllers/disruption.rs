//! Disruption controller: keeps each PodDisruptionBudget's status (healthy,
//! desired and expected pods, disruptions allowed) current as its pods change.

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;

use super::workload::{WorkQueue, name};
use crate::cluster::client::{Client, ClientError, ListParams};
use crate::cluster::events::now;
use crate::cluster::informer::{Change, Informer, object_key};

pub fn spawn(client: Client) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let pods: Informer<Pod> = Informer::spawn(client.clone(), None, ListParams::default());
        let budgets: Informer<PodDisruptionBudget> = Informer::spawn(client.clone(), None, ListParams::default());
        let mut pod_changes = pods.subscribe();
        let mut budget_changes = budgets.subscribe();
        pods.wait_synced().await;
        budgets.wait_synced().await;
        let mut queue = WorkQueue::default();
        let enqueue_ns = |queue: &mut WorkQueue, ns: Option<&str>| {
            for pdb in budgets.list() {
                if ns.is_none() || pdb.metadata.namespace.as_deref() == ns {
                    queue.add(object_key(&pdb.metadata));
                }
            }
        };
        enqueue_ns(&mut queue, None);
        loop {
            tokio::select! {
                change = pod_changes.recv() => match change {
                    Ok(Change::Applied(p) | Change::Deleted(p)) => enqueue_ns(&mut queue, p.metadata.namespace.as_deref()),
                    Ok(Change::Resynced) | Err(RecvError::Lagged(_)) => enqueue_ns(&mut queue, None),
                    Err(RecvError::Closed) => return,
                },
                change = budget_changes.recv() => match change {
                    Ok(Change::Applied(b) | Change::Deleted(b)) => queue.add(object_key(&b.metadata)),
                    Ok(Change::Resynced) | Err(RecvError::Lagged(_)) => enqueue_ns(&mut queue, None),
                    Err(RecvError::Closed) => return,
                },
                _ = tokio::time::sleep_until(queue.next_due()) => {}
            }
            for key in queue.take() {
                match sync(&client, &budgets, &pods, &key).await {
                    Ok(()) => queue.succeeded(&key),
                    Err(err) => {
                        tracing::debug!(pdb = key, error = %err, "updating status; will retry");
                        queue.retry(&key);
                    }
                }
            }
        }
    })
}

async fn sync(
    client: &Client,
    budgets: &Informer<PodDisruptionBudget>,
    pods: &Informer<Pod>,
    key: &str,
) -> Result<(), ClientError> {
    let Some(pdb) = budgets.get(key) else {
        return Ok(());
    };
    let pdb_value = serde_json::to_value(&pdb).unwrap_or_default();
    let pods: Vec<Value> = pods
        .list()
        .iter()
        .filter(|p| p.metadata.namespace == pdb.metadata.namespace)
        .filter_map(|p| serde_json::to_value(p).ok())
        .collect();
    let budget = crate::cluster::disruption::budget(&pdb_value, &pods);
    let stamp = json!(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now()));
    let status = crate::cluster::disruption::status(&pdb_value, budget, &stamp);
    // Compared on what it says (timestamps and formatting aside), so a write never triggers another.
    let gist = |s: Option<&Value>| {
        let s = s.cloned().unwrap_or_default();
        json!([
            s["observedGeneration"],
            s["currentHealthy"],
            s["desiredHealthy"],
            s["expectedPods"],
            s["disruptionsAllowed"],
            s.pointer("/conditions/0/status")
        ])
    };
    if gist(pdb_value.get("status")) == gist(Some(&status)) {
        return Ok(());
    }
    client
        .merge_patch::<PodDisruptionBudget>(
            pdb.metadata.namespace.as_deref(),
            name(&pdb.metadata),
            Some("status"),
            &json!({"status": status}),
        )
        .await
        .map(drop)
}
