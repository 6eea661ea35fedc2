//! The scheduling loop: informers on pods, nodes and RuntimeClasses; a queue of
//! pods to place; pods no node fits wait, "parked", until something changes.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, Pod, PodSpec};
use k8s_openapi::api::node::v1::RuntimeClass;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;

use super::filter::{NodeState, PodInput};
use super::{SCHEDULER_NAME, Strategy, place, unschedulable_message};
use crate::cluster::client::{Client, ListParams};
use crate::cluster::events::{EventType, Recorder, now, reference};
use crate::cluster::informer::{Change, Informer, object_key};

/// Parked pods are tried again at least this often.
const RETRY_INTERVAL: Duration = Duration::from_secs(15);
/// A FailedScheduling event with an unchanged message is repeated at most this often.
const REPEAT_EVENT_AFTER: Duration = Duration::from_secs(30);

/// Starts the scheduler; it runs until the task is aborted.
pub fn spawn(client: Client, strategy: Strategy) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut scheduler = Scheduler {
            recorder: Recorder::new(client.clone(), SCHEDULER_NAME, None),
            pods: Informer::spawn(client.clone(), None, ListParams::default()),
            nodes: Informer::spawn(client.clone(), None, ListParams::default()),
            classes: Informer::spawn(client.clone(), None, ListParams::default()),
            client,
            strategy,
            queue: VecDeque::new(),
            queued: HashSet::new(),
            parked: HashMap::new(),
            assumed: HashMap::new(),
        };
        scheduler.run().await;
    })
}

/// A pod that fit no node, and what was last reported about it.
struct Parked {
    spec: Option<PodSpec>,
    message: String,
    reported_at: Instant,
}

/// A pod bound by this scheduler that the pod informer does not show bound yet.
struct Assumed {
    uid: Option<String>,
    node: String,
}

struct Scheduler {
    client: Client,
    strategy: Strategy,
    recorder: Recorder,
    pods: Informer<Pod>,
    nodes: Informer<Node>,
    classes: Informer<RuntimeClass>,
    queue: VecDeque<String>,
    queued: HashSet<String>,
    parked: HashMap<String, Parked>,
    assumed: HashMap<String, Assumed>,
}

/// Pods this scheduler should place: no node yet, ours, not being deleted, not finished.
pub fn wants_scheduling(pod: &Pod) -> bool {
    let Some(spec) = pod.spec.as_ref() else {
        return false;
    };
    spec.node_name.as_deref().unwrap_or("").is_empty()
        && matches!(spec.scheduler_name.as_deref(), None | Some("") | Some(SCHEDULER_NAME))
        && pod.metadata.deletion_timestamp.is_none()
        && !is_terminal(pod)
}

pub fn is_terminal(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

fn bound_node(pod: &Pod) -> Option<&str> {
    pod.spec.as_ref()?.node_name.as_deref().filter(|n| !n.is_empty())
}

impl Scheduler {
    async fn run(&mut self) {
        let mut pod_changes = self.pods.subscribe();
        let mut node_changes = self.nodes.subscribe();
        let mut class_changes = self.classes.subscribe();
        self.pods.wait_synced().await;
        self.nodes.wait_synced().await;
        self.classes.wait_synced().await;
        self.enqueue_all();
        let mut retry = tokio::time::interval(RETRY_INTERVAL);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if !self.queue.is_empty() {
                self.schedule_queued().await;
            }
            tokio::select! {
                change = pod_changes.recv() => {
                    self.on_pod_change(change);
                    while let Ok(change) = pod_changes.try_recv() {
                        self.on_pod_change(Ok(change));
                    }
                }
                change = node_changes.recv() => {
                    if matches!(change, Err(RecvError::Closed)) {
                        return;
                    }
                    while node_changes.try_recv().is_ok() {}
                    self.unpark_all();
                }
                change = class_changes.recv() => {
                    if matches!(change, Err(RecvError::Closed)) {
                        return;
                    }
                    while class_changes.try_recv().is_ok() {}
                    self.unpark_all();
                }
                _ = retry.tick() => self.unpark_all(),
            }
        }
    }

    fn enqueue(&mut self, key: String) {
        if self.queued.insert(key.clone()) {
            self.queue.push_back(key);
        }
    }

    fn enqueue_all(&mut self) {
        for pod in self.pods.list() {
            if wants_scheduling(&pod) {
                self.parked.remove(&object_key(&pod.metadata));
                self.enqueue(object_key(&pod.metadata));
            }
        }
    }

    fn unpark_all(&mut self) {
        let keys: Vec<String> = self.parked.keys().cloned().collect();
        keys.into_iter().for_each(|k| self.enqueue(k));
    }

    fn on_pod_change(&mut self, change: Result<Change<Pod>, RecvError>) {
        match change {
            Ok(Change::Applied(pod)) => {
                let key = object_key(&pod.metadata);
                if wants_scheduling(&pod) {
                    // Our own status writes come back here; only a changed spec is news.
                    if self.parked.get(&key).is_some_and(|p| p.spec == pod.spec) {
                        return;
                    }
                    self.enqueue(key);
                } else {
                    self.parked.remove(&key);
                    if bound_node(&pod).is_some() {
                        self.assumed.remove(&key);
                    }
                    if is_terminal(&pod) {
                        self.unpark_all();
                    }
                }
            }
            Ok(Change::Deleted(pod)) => {
                let key = object_key(&pod.metadata);
                self.parked.remove(&key);
                self.assumed.remove(&key);
                if bound_node(&pod).is_some() {
                    self.unpark_all();
                }
            }
            Ok(Change::Resynced) | Err(RecvError::Lagged(_)) => self.enqueue_all(),
            Err(RecvError::Closed) => {}
        }
    }

    fn runtime_class(&self, pod: &Pod) -> Result<Option<RuntimeClass>, String> {
        match pod.spec.as_ref().and_then(|s| s.runtime_class_name.as_deref()) {
            None | Some("") => Ok(None),
            Some(name) => self
                .classes
                .get(name)
                .map(Some)
                .ok_or_else(|| format!("runtimeclass.node.k8s.io {name:?} not found")),
        }
    }

    /// The nodes with the pods bound (or being bound) to them counted in.
    fn snapshot(&mut self) -> Vec<NodeState> {
        let mut nodes: BTreeMap<String, NodeState> = self
            .nodes
            .list()
            .into_iter()
            .filter(|n| n.metadata.deletion_timestamp.is_none())
            .map(|n| (n.metadata.name.clone().unwrap_or_default(), NodeState::new(n)))
            .collect();
        let pods: HashMap<String, Pod> = self
            .pods
            .list()
            .into_iter()
            .map(|p| (object_key(&p.metadata), p))
            .collect();
        self.assumed.retain(|key, assumed| {
            pods.get(key)
                .is_some_and(|p| bound_node(p).is_none() && p.metadata.uid == assumed.uid)
        });
        for (key, pod) in &pods {
            let node = bound_node(pod).or_else(|| self.assumed.get(key).map(|a| a.node.as_str()));
            let Some(state) = node.and_then(|n| nodes.get_mut(n)) else {
                continue;
            };
            if !is_terminal(pod) {
                let class = self.runtime_class(pod).ok().flatten();
                state.add_pod(&PodInput::new(pod, class.as_ref()));
            }
        }
        nodes.into_values().collect()
    }

    async fn schedule_queued(&mut self) {
        let mut nodes = self.snapshot();
        while let Some(key) = self.queue.pop_front() {
            self.queued.remove(&key);
            let Some(pod) = self.pods.get(&key) else {
                continue;
            };
            if !wants_scheduling(&pod) || self.assumed.contains_key(&key) {
                continue;
            }
            self.schedule_one(key, pod, &mut nodes).await;
        }
    }

    async fn schedule_one(&mut self, key: String, pod: Pod, nodes: &mut [NodeState]) {
        let class = match self.runtime_class(&pod) {
            Ok(class) => class,
            Err(reason) => {
                let reasons = BTreeMap::from([(reason, nodes.len())]);
                return self.park(key, &pod, unschedulable_message(nodes.len(), &reasons)).await;
            }
        };
        let input = PodInput::new(&pod, class.as_ref());
        let index = match place(self.strategy, &pod, &input, nodes) {
            Ok(index) => index,
            Err(message) => return self.park(key, &pod, message).await,
        };
        let node = nodes[index].name.clone();
        match self.bind(&pod, &node).await {
            Ok(()) => {
                nodes[index].add_pod(&input);
                self.parked.remove(&key);
                self.assumed.insert(
                    key.clone(),
                    Assumed {
                        uid: pod.metadata.uid.clone(),
                        node: node.clone(),
                    },
                );
                tracing::debug!(pod = %key, node, "scheduled");
                self.recorder.emit(
                    reference(&pod),
                    EventType::Normal,
                    "Scheduled",
                    format!("Successfully assigned {key} to {node}"),
                );
            }
            Err(err) if err.is_not_found() || err.is_conflict() => {
                tracing::debug!(pod = %key, error = %err, "binding skipped: the pod changed");
            }
            Err(err) => {
                tracing::warn!(pod = %key, node, error = %err, "binding failed; retrying later");
                self.parked.insert(
                    key,
                    Parked {
                        spec: None,
                        message: String::new(),
                        reported_at: Instant::now(),
                    },
                );
            }
        }
    }

    async fn bind(&self, pod: &Pod, node: &str) -> crate::cluster::client::Result<()> {
        let name = pod.metadata.name.as_deref().unwrap_or_default();
        let namespace = pod.metadata.namespace.as_deref();
        let binding = json!({
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": name, "namespace": namespace, "uid": pod.metadata.uid},
            "target": {"apiVersion": "v1", "kind": "Node", "name": node},
        });
        self.client
            .create_subresource::<Pod>(namespace, name, "binding", &binding)
            .await
            .map(drop)
    }

    /// Records why the pod fits nowhere (condition and event) and parks it.
    async fn park(&mut self, key: String, pod: &Pod, message: String) {
        let previous = self.parked.remove(&key);
        let repeat = previous
            .as_ref()
            .is_none_or(|p| p.message != message || p.reported_at.elapsed() >= REPEAT_EVENT_AFTER);
        let reported_at = match previous {
            Some(p) if !repeat => p.reported_at,
            _ => {
                tracing::debug!(pod = %key, message, "unschedulable");
                self.recorder
                    .emit(reference(pod), EventType::Warning, "FailedScheduling", message.clone());
                Instant::now()
            }
        };
        if let Err(err) = self.set_unschedulable(pod, &message).await {
            tracing::debug!(pod = %key, error = %err, "updating the PodScheduled condition");
        }
        self.parked.insert(
            key,
            Parked {
                spec: pod.spec.clone(),
                message,
                reported_at,
            },
        );
    }

    /// Sets `PodScheduled=False` (reason Unschedulable) unless it already says `message`.
    async fn set_unschedulable(&self, pod: &Pod, message: &str) -> crate::cluster::client::Result<()> {
        let conditions = pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.clone())
            .unwrap_or_default();
        let current = conditions.iter().find(|c| c.type_ == "PodScheduled");
        if current.is_some_and(|c| {
            c.status == "False" && c.reason.as_deref() == Some("Unschedulable") && c.message.as_deref() == Some(message)
        }) {
            return Ok(());
        }
        let transition = match current {
            Some(c) if c.status == "False" => c.last_transition_time.clone(),
            _ => Some(Time(now())),
        };
        let mut list: Vec<Value> = conditions
            .iter()
            .filter(|c| c.type_ != "PodScheduled")
            .map(|c| serde_json::to_value(c).unwrap_or_default())
            .collect();
        list.push(json!({
            "type": "PodScheduled",
            "status": "False",
            "reason": "Unschedulable",
            "message": message,
            "lastProbeTime": null,
            "lastTransitionTime": transition,
        }));
        let patch = json!({
            "metadata": {"resourceVersion": pod.metadata.resource_version},
            "status": {"conditions": list},
        });
        let name = pod.metadata.name.as_deref().unwrap_or_default();
        self.client
            .merge_patch::<Pod>(pod.metadata.namespace.as_deref(), name, Some("status"), &patch)
            .await
            .map(drop)
    }
}
