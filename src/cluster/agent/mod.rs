//! The node agent: a kubelet-lite that registers this node, watches the pods
//! bound to it and drives them through a CRI runtime's socket (podvisor's own
//! daemon or any other), reporting their status back to the API server.
//!
//! One task per pod ([`worker`]) serializes that pod's work; pods proceed in
//! parallel. Everything a pod runs is found again by CRI labels, so a restarted
//! agent adopts running sandboxes and containers instead of recreating them.

mod config;
mod cri;
mod env;
mod health;
mod images;
pub mod logrotate;
mod machine;
mod node;
mod probes;
mod quantity;
mod routes;
pub mod server;
mod start;
mod status;
mod teardown;
mod volumes;
mod worker;

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use tokio::sync::{Notify, broadcast, watch};

use crate::cluster::client::{Client, ListParams};
use crate::cluster::events::Recorder;
use crate::cluster::informer::{Change, Informer};

pub use cri::Cri;
pub use machine::primary_ipv4;

/// Labels the agent puts on everything it creates through CRI.
pub mod labels {
    pub const POD_NAME: &str = "io.kubernetes.pod.name";
    pub const POD_NAMESPACE: &str = "io.kubernetes.pod.namespace";
    pub const POD_UID: &str = "io.kubernetes.pod.uid";
    pub const CONTAINER_NAME: &str = "io.kubernetes.container.name";
    /// The node agent that owns a sandbox or container.
    pub const NODE: &str = "podvisor.io/node";
}

pub const DEFAULT_POD_LOG_DIR: &str = "/var/log/pods";

/// How often container states are polled when the runtime streams no events.
const POLL_WITHOUT_EVENTS: Duration = Duration::from_secs(1);
/// How often they are polled as a safety net next to the event stream.
const POLL_WITH_EVENTS: Duration = Duration::from_secs(5);

#[derive(Clone, Debug)]
pub struct AgentOptions {
    pub node_name: String,
    /// The CRI runtime's socket, `unix:///...`.
    pub runtime_endpoint: String,
    /// Per-pod volume contents (configMap, secret, emptyDir, ...).
    pub state_dir: PathBuf,
    /// Container logs: `<dir>/<namespace>_<name>_<uid>/<container>/<restart>.log`.
    pub pod_log_dir: PathBuf,
    /// The filesystem reported as the node's ephemeral storage.
    pub storage_dir: PathBuf,
    /// The cluster DNS server for `ClusterFirst` pods; without one they get the host's resolvers.
    pub cluster_dns: Option<String>,
    pub cluster_domain: String,
    /// The port of the agent's API (logs, exec, ...), published in the Node's daemonEndpoints.
    pub api_port: Option<u16>,
    pub log_rotation: logrotate::LogRotation,
    /// The CA of the agent API's certificate when it is not the cluster CA (a joined node), published on the Node.
    pub kubelet_ca_pem: Option<String>,
    /// The node Lease's duration; it is renewed every quarter of it (kubelet's nodeLeaseDurationSeconds, 40).
    pub lease_duration: Duration,
}

/// What every part of the agent shares.
pub(crate) struct Context {
    pub client: Client,
    pub cri: Cri,
    pub recorder: Recorder,
    pub options: AgentOptions,
    pub node_ip: Ipv4Addr,
    /// The runtime's name, the scheme of container IDs (`podvisor://<id>`).
    pub runtime_name: String,
    /// e.g. `podvisor://0.1.0`.
    pub runtime_version: String,
    pub host_dns: machine::ResolvConf,
    /// The runtime's pod subnets, published on the Node for the other nodes' routes.
    pub pod_subnets: Vec<String>,
    /// For httpGet probes and hooks.
    pub http: reqwest::Client,
    pub workers: Workers,
}

/// The running pod workers by pod uid.
#[derive(Clone, Default)]
pub(crate) struct Workers(Arc<Mutex<HashMap<String, worker::Handle>>>);

impl Workers {
    fn wake(&self, uid: &str) {
        if let Some(handle) = self.0.lock().unwrap().get(uid) {
            handle.wake.notify_one();
        }
    }

    pub fn remove(&self, uid: &str) {
        self.0.lock().unwrap().remove(uid);
    }

    fn abort_all(&self) {
        for (_, handle) in self.0.lock().unwrap().drain() {
            handle.task.abort();
        }
    }
}

/// The running agent.
pub struct Agent {
    task: tokio::task::JoinHandle<()>,
    workers: Workers,
    options: AgentOptions,
}

impl Agent {
    pub fn start(client: Client, options: AgentOptions) -> Agent {
        let workers = Workers::default();
        let task = tokio::spawn(run(client, options.clone(), workers.clone()));
        Agent { task, workers, options }
    }

    /// Stops the agent, then stops and removes every sandbox it created (for `podvisor down`).
    pub async fn remove_pods(&self) {
        self.task.abort();
        self.workers.abort_all();
        let cri = Cri::connect(&self.options.runtime_endpoint).await;
        teardown::remove_all(&cri, &self.options).await;
    }

    pub fn stop(self) {
        self.task.abort();
        self.workers.abort_all();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn run(client: Client, options: AgentOptions, workers: Workers) {
    let cri = Cri::connect(&options.runtime_endpoint).await;
    let version = loop {
        match cri.version().await {
            Ok(version) => break version,
            Err(err) => {
                tracing::warn!(error = %err, "asking the CRI runtime for its version; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    let http = reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .user_agent(format!(
            "kube-probe/{}",
            crate::cluster::apiserver::discovery::GIT_VERSION
                .trim_start_matches('v')
                .split('.')
                .take(2)
                .collect::<Vec<_>>()
                .join(".")
        ))
        .build()
        .unwrap_or_default();
    let pod_subnets = cri.pod_subnets().await;
    let ctx = Arc::new(Context {
        recorder: Recorder::new(client.clone(), "kubelet", Some(&options.node_name)),
        client: client.clone(),
        cri,
        node_ip: machine::primary_ipv4(),
        runtime_name: version.runtime_name.clone(),
        runtime_version: format!("{}://{}", version.runtime_name, version.runtime_version),
        host_dns: machine::ResolvConf::host(),
        pod_subnets,
        http,
        options,
        workers,
    });
    let _node = AbortOnDrop(tokio::spawn(node::run(ctx.clone())));
    let params = ListParams::fields(format!("spec.nodeName={}", ctx.options.node_name));
    let informer = Informer::<Pod>::spawn(client, None, params);
    let mut changes = informer.subscribe();
    informer.wait_synced().await;
    let _watcher = AbortOnDrop(tokio::spawn(watch_runtime(ctx.clone())));
    let _log_rotation = AbortOnDrop(tokio::spawn(logrotate::run(ctx.clone())));
    // A node in a network namespace of its own leaves routing to the host (its default route).
    let _routes = crate::sys::netns::node()
        .is_none()
        .then(|| AbortOnDrop(tokio::spawn(routes::run(ctx.clone()))));
    let known: Vec<String> = informer.list().iter().filter_map(|p| p.metadata.uid.clone()).collect();
    tokio::spawn(teardown::remove_orphans(ctx.clone(), known));
    reconcile(&ctx, &informer.list());
    tracing::info!(node = %ctx.options.node_name, runtime = %ctx.runtime_version, "node agent started");
    loop {
        match changes.recv().await {
            Ok(Change::Applied(pod)) => dispatch(&ctx, pod, false),
            Ok(Change::Deleted(pod)) => dispatch(&ctx, pod, true),
            Ok(Change::Resynced) | Err(broadcast::error::RecvError::Lagged(_)) => reconcile(&ctx, &informer.list()),
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Hands a pod's latest state to its worker, starting one if needed.
fn dispatch(ctx: &Arc<Context>, pod: Pod, gone: bool) {
    let Some(uid) = pod.metadata.uid.clone() else {
        return;
    };
    let mut workers = ctx.workers.0.lock().unwrap();
    if let Some(handle) = workers.get(&uid)
        && !handle.task.is_finished()
    {
        handle.target.send_replace(worker::Target { pod, gone });
        return;
    }
    if gone {
        // No worker, or one that already tore the pod down.
        workers.remove(&uid);
        return;
    }
    let (target, updates) = watch::channel(worker::Target { pod, gone });
    let wake = Arc::new(Notify::new());
    let task = tokio::spawn(worker::run(ctx.clone(), uid.clone(), updates, wake.clone()));
    workers.insert(uid, worker::Handle { target, wake, task });
}

/// After a fresh list: every listed pod goes to its worker; workers of pods no
/// longer listed tear theirs down.
fn reconcile(ctx: &Arc<Context>, pods: &[Pod]) {
    let listed: std::collections::HashSet<&str> = pods.iter().filter_map(|p| p.metadata.uid.as_deref()).collect();
    let stale: Vec<(String, Pod)> = ctx
        .workers
        .0
        .lock()
        .unwrap()
        .iter()
        .filter(|(uid, _)| !listed.contains(uid.as_str()))
        .map(|(uid, handle)| (uid.clone(), handle.target.borrow().pod.clone()))
        .collect();
    for (_, pod) in stale {
        dispatch(ctx, pod, true);
    }
    for pod in pods {
        dispatch(ctx, pod.clone(), false);
    }
}

/// Wakes a pod's worker when one of its containers changes state: from the
/// runtime's event stream when it has one, and by polling the container list.
async fn watch_runtime(ctx: Arc<Context>) {
    let events_up = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let _events = AbortOnDrop(tokio::spawn(follow_events(ctx.clone(), events_up.clone())));
    let filter = crate::cri::proto::runtime::ContainerFilter {
        label_selector: HashMap::from([(labels::NODE.to_string(), ctx.options.node_name.clone())]),
        ..Default::default()
    };
    let mut states: HashMap<String, i32> = HashMap::new();
    loop {
        let period = if events_up.load(std::sync::atomic::Ordering::Relaxed) {
            POLL_WITH_EVENTS
        } else {
            POLL_WITHOUT_EVENTS
        };
        tokio::time::sleep(period).await;
        let Ok(containers) = ctx.cri.list_containers(filter.clone()).await else {
            continue;
        };
        let mut fresh = HashMap::with_capacity(containers.len());
        for container in containers {
            if states.get(&container.id) != Some(&container.state)
                && let Some(uid) = container.labels.get(labels::POD_UID)
            {
                ctx.workers.wake(uid);
            }
            fresh.insert(container.id, container.state);
        }
        states = fresh;
    }
}

async fn follow_events(ctx: Arc<Context>, up: Arc<std::sync::atomic::AtomicBool>) {
    use futures_util::StreamExt;
    loop {
        if let Ok(mut stream) = ctx.cri.container_events().await {
            up.store(true, std::sync::atomic::Ordering::Relaxed);
            while let Some(Ok(event)) = stream.next().await {
                let uid = event
                    .pod_sandbox_status
                    .as_ref()
                    .and_then(|s| s.labels.get(labels::POD_UID))
                    .or_else(|| {
                        event
                            .containers_statuses
                            .iter()
                            .find_map(|c| c.labels.get(labels::POD_UID))
                    });
                if let Some(uid) = uid {
                    ctx.workers.wake(uid);
                }
            }
        }
        up.store(false, std::sync::atomic::Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}
