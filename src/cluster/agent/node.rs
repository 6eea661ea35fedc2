//! Node registration and heartbeats: the Node object (labels, capacity,
//! addresses, node info, conditions) and its Lease in `kube-node-lease`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{
    DaemonEndpoint, Node, NodeAddress, NodeCondition, NodeDaemonEndpoints, NodeStatus, NodeSystemInfo,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference, Time};
use serde_json::json;

use super::{Context, machine};
use crate::cluster::client::ClientError;
use crate::cluster::events::{EventType, now};

const LEASE_NAMESPACE: &str = "kube-node-lease";
/// How often readiness is checked while the runtime is not ready.
const NOT_READY_CHECK: Duration = Duration::from_millis(100);
/// How often runtime readiness is checked between heartbeats.
const READINESS_CHECK: Duration = Duration::from_secs(2);

/// Runtime readiness as the Ready condition shows it.
#[derive(Clone, Debug, PartialEq)]
struct Readiness {
    ready: bool,
    message: String,
}

struct Heartbeat {
    ctx: Arc<Context>,
    node_uid: String,
    lease: Option<Lease>,
    readiness: Option<Readiness>,
    /// When Ready last changed, for lastTransitionTime.
    ready_since: Time,
    started: Time,
}

/// Registers the node and keeps its status and Lease fresh; never returns.
pub async fn run(ctx: Arc<Context>) {
    let node_uid = loop {
        match register(&ctx).await {
            Ok(node) => break node.metadata.uid.unwrap_or_default(),
            Err(err) => {
                tracing::warn!(error = %crate::error_chain(&err), "registering the node; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    let started = Time(now());
    let mut beat = Heartbeat {
        ctx,
        node_uid,
        lease: None,
        readiness: None,
        ready_since: started.clone(),
        started,
    };
    // The Lease is renewed and the status posted every quarter of the lease duration, as kubelet does.
    let heartbeat = (beat.ctx.options.lease_duration / 4).max(Duration::from_millis(200));
    let mut last_post = Instant::now() - heartbeat;
    loop {
        let readiness = beat.readiness().await;
        // While the runtime is not ready (e.g. its network still starting), look again soon.
        let wait = match readiness.ready {
            true => READINESS_CHECK.min(heartbeat),
            false => NOT_READY_CHECK.min(heartbeat),
        };
        let changed = beat.readiness.as_ref() != Some(&readiness);
        if changed {
            if beat.readiness.is_some() {
                beat.ready_since = Time(now());
            }
            let reason = if readiness.ready { "NodeReady" } else { "NodeNotReady" };
            let node_ref = node_reference(&beat.ctx.options.node_name, &beat.node_uid);
            beat.ctx.recorder.emit(
                node_ref,
                EventType::Normal,
                reason,
                format!("Node {} status is now: {reason}", beat.ctx.options.node_name),
            );
            beat.readiness = Some(readiness);
        }
        if changed || last_post.elapsed() >= heartbeat {
            last_post = Instant::now();
            if let Err(err) = beat.post_status().await {
                tracing::warn!(error = %crate::error_chain(&err), "posting the node status");
            }
            if let Err(err) = beat.renew_lease().await {
                tracing::warn!(error = %crate::error_chain(&err), "renewing the node lease");
                beat.lease = None;
            }
        }
        tokio::time::sleep(wait).await;
    }
}

fn node_reference(name: &str, uid: &str) -> k8s_openapi::api::core::v1::ObjectReference {
    k8s_openapi::api::core::v1::ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Node".into()),
        name: Some(name.into()),
        uid: Some(uid.into()),
        ..Default::default()
    }
}

fn labels(ctx: &Context) -> BTreeMap<String, String> {
    let arch = machine::architecture();
    [
        ("kubernetes.io/hostname", ctx.options.node_name.as_str()),
        ("kubernetes.io/os", "linux"),
        ("kubernetes.io/arch", arch),
        ("beta.kubernetes.io/os", "linux"),
        ("beta.kubernetes.io/arch", arch),
        ("node-role.kubernetes.io/control-plane", ""),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

fn annotations(ctx: &Context) -> Option<BTreeMap<String, String>> {
    let mut annotations = BTreeMap::new();
    if let Some(ca) = &ctx.options.kubelet_ca_pem {
        let key = crate::cluster::apiserver::node_proxy::KUBELET_CA_ANNOTATION;
        annotations.insert(key.to_string(), ca.clone());
    }
    if !ctx.pod_subnets.is_empty() {
        annotations.insert(
            super::routes::POD_SUBNETS_ANNOTATION.to_string(),
            ctx.pod_subnets.join(","),
        );
    }
    (!annotations.is_empty()).then_some(annotations)
}

/// Creates the Node, or updates the one a previous run registered.
async fn register(ctx: &Context) -> Result<Node, ClientError> {
    let name = &ctx.options.node_name;
    let node = Node {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            labels: Some(labels(ctx)),
            annotations: annotations(ctx),
            ..Default::default()
        },
        ..Default::default()
    };
    match ctx.client.create(None, &node).await {
        Ok(node) => {
            tracing::info!(node = %name, "node registered");
            Ok(node)
        }
        Err(err) if err.is_conflict() => {
            let mut existing: Node = ctx.client.get(None, name).await?;
            let mut merged = existing.metadata.labels.take().unwrap_or_default();
            merged.extend(labels(ctx));
            let patch = json!({"metadata": {"labels": merged, "annotations": annotations(ctx)}});
            let node = ctx.client.merge_patch::<Node>(None, name, None, &patch).await?;
            tracing::info!(node = %name, "node re-registered");
            Ok(node)
        }
        Err(err) => Err(err),
    }
}

impl Heartbeat {
    async fn readiness(&self) -> Readiness {
        let status = match self.ctx.cri.status().await {
            Ok(status) => status,
            Err(err) => {
                return Readiness {
                    ready: false,
                    message: format!("container runtime is down: {err}"),
                };
            }
        };
        let conditions = status.status.map(|s| s.conditions).unwrap_or_default();
        let problems: Vec<String> = ["RuntimeReady", "NetworkReady"]
            .iter()
            .filter_map(|kind| {
                let condition = conditions.iter().find(|c| c.r#type == *kind);
                match condition {
                    Some(c) if c.status => None,
                    Some(c) => Some(format!(
                        "container runtime {kind}=false reason:{} message:{}",
                        c.reason, c.message
                    )),
                    None => Some(format!("container runtime did not report {kind}")),
                }
            })
            .collect();
        Readiness {
            ready: problems.is_empty(),
            message: if problems.is_empty() {
                "kubelet is posting ready status".into()
            } else {
                problems.join("; ")
            },
        }
    }

    fn status(&self) -> NodeStatus {
        let ctx = &self.ctx;
        let heartbeat = Time(now());
        let readiness = self.readiness.clone().unwrap_or(Readiness {
            ready: false,
            message: "starting".into(),
        });
        let condition = |kind: &str, status: bool, reason: &str, message: &str, since: &Time| NodeCondition {
            type_: kind.into(),
            status: if status { "True" } else { "False" }.into(),
            reason: Some(reason.into()),
            message: Some(message.into()),
            last_heartbeat_time: Some(heartbeat.clone()),
            last_transition_time: Some(since.clone()),
        };
        let quiet = [
            (
                "MemoryPressure",
                "KubeletHasSufficientMemory",
                "kubelet has sufficient memory available",
            ),
            (
                "DiskPressure",
                "KubeletHasNoDiskPressure",
                "kubelet has no disk pressure",
            ),
            (
                "PIDPressure",
                "KubeletHasSufficientPID",
                "kubelet has sufficient PID available",
            ),
        ];
        let mut conditions: Vec<NodeCondition> = quiet
            .iter()
            .map(|(kind, reason, message)| condition(kind, false, reason, message, &self.started))
            .collect();
        let ready_reason = if readiness.ready {
            "KubeletReady"
        } else {
            "KubeletNotReady"
        };
        conditions.push(condition(
            "Ready",
            readiness.ready,
            ready_reason,
            &readiness.message,
            &self.ready_since,
        ));
        let capacity: BTreeMap<String, Quantity> = [
            ("cpu", machine::cpus().to_string()),
            ("memory", format!("{}Ki", machine::memory_bytes() / 1024)),
            ("pods", "110".to_string()),
            (
                "ephemeral-storage",
                format!("{}Ki", machine::filesystem_bytes(&ctx.options.storage_dir) / 1024),
            ),
            ("hugepages-1Gi", "0".to_string()),
            ("hugepages-2Mi", "0".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), Quantity(v)))
        .collect();
        NodeStatus {
            allocatable: Some(capacity.clone()),
            capacity: Some(capacity),
            conditions: Some(conditions),
            addresses: Some(vec![
                NodeAddress {
                    type_: "InternalIP".into(),
                    address: ctx.node_ip.to_string(),
                },
                NodeAddress {
                    type_: "Hostname".into(),
                    address: machine::hostname(),
                },
            ]),
            node_info: Some(NodeSystemInfo {
                architecture: machine::architecture().into(),
                boot_id: machine::boot_id(),
                container_runtime_version: ctx.runtime_version.clone(),
                kernel_version: machine::kernel_version(),
                kube_proxy_version: String::new(),
                kubelet_version: crate::cluster::apiserver::discovery::GIT_VERSION.into(),
                machine_id: machine::machine_id(),
                operating_system: "linux".into(),
                os_image: machine::os_image(),
                system_uuid: machine::system_uuid(),
            }),
            daemon_endpoints: ctx.options.api_port.map(|port| NodeDaemonEndpoints {
                kubelet_endpoint: Some(DaemonEndpoint { port: port.into() }),
            }),
            ..Default::default()
        }
    }

    async fn post_status(&self) -> Result<(), ClientError> {
        let patch = json!({"status": self.status()});
        self.ctx
            .client
            .merge_patch::<Node>(None, &self.ctx.options.node_name, Some("status"), &patch)
            .await?;
        Ok(())
    }

    async fn renew_lease(&mut self) -> Result<(), ClientError> {
        let client = &self.ctx.client;
        let name = &self.ctx.options.node_name;
        let renew = Some(MicroTime(now()));
        let lease = match self.lease.take() {
            Some(lease) => Some(lease),
            None => client.get_opt::<Lease>(Some(LEASE_NAMESPACE), name).await?,
        };
        let stored = match lease {
            Some(mut lease) => {
                let spec = lease.spec.get_or_insert_with(Default::default);
                spec.holder_identity = Some(name.clone());
                spec.lease_duration_seconds = Some(self.ctx.options.lease_duration.as_secs().max(1) as i32);
                spec.renew_time = renew;
                client.replace(Some(LEASE_NAMESPACE), name, &lease).await?
            }
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        namespace: Some(LEASE_NAMESPACE.into()),
                        owner_references: Some(vec![OwnerReference {
                            api_version: "v1".into(),
                            kind: "Node".into(),
                            name: name.clone(),
                            uid: self.node_uid.clone(),
                            ..Default::default()
                        }]),
                        ..Default::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(name.clone()),
                        lease_duration_seconds: Some(self.ctx.options.lease_duration.as_secs().max(1) as i32),
                        renew_time: renew,
                        ..Default::default()
                    }),
                };
                client.create(Some(LEASE_NAMESPACE), &lease).await?
            }
        };
        self.lease = Some(stored);
        Ok(())
    }
}
