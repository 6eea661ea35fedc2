//! Cluster controllers, one file each. Every controller is a task that keeps
//! informers (list+watch caches) and reconciles on changes and on a timer;
//! the decisions are pure functions, unit-tested in their files.
//!
//! Namespace deletion and garbage collection (ownerReferences) need no
//! controller here: the API server does both itself.

use std::time::Duration;

use crate::cluster::client::Client;

pub mod cronjob;
pub mod daemonset;
pub mod deployment;
pub mod disruption;
pub mod endpoints;
pub mod job;
pub mod node_lifecycle;
pub mod pod_gc;
pub mod replicaset;
pub mod statefulset;
pub mod taint_eviction;
pub mod workload;

/// Settings of the controllers, from `podvisor up`.
#[derive(Clone, Debug)]
pub struct Settings {
    /// A node whose heartbeat (Lease renewal) is older than this is unreachable.
    pub node_monitor_grace: Duration,
    /// Finished pods beyond this many are deleted, oldest first.
    pub terminated_pod_threshold: usize,
    /// How long pods stay on a not-ready or unreachable node unless they say otherwise (tolerationSeconds).
    pub pod_eviction_timeout: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            node_monitor_grace: Duration::from_secs(40),
            terminated_pod_threshold: 1000,
            pod_eviction_timeout: Duration::from_secs(20),
        }
    }
}

/// Starts every controller.
pub fn spawn_all(client: &Client, settings: &Settings) -> Vec<tokio::task::JoinHandle<()>> {
    vec![
        node_lifecycle::spawn(client.clone(), settings.node_monitor_grace),
        pod_gc::spawn(client.clone(), settings.terminated_pod_threshold),
        taint_eviction::spawn(client.clone(), settings.pod_eviction_timeout),
        replicaset::spawn(client.clone()),
        deployment::spawn(client.clone()),
        daemonset::spawn(client.clone()),
        statefulset::spawn(client.clone()),
        job::spawn(client.clone()),
        cronjob::spawn(client.clone()),
        disruption::spawn(client.clone()),
        endpoints::spawn(client.clone()),
    ]
}
