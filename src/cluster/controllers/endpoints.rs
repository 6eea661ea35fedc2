//! Endpoints controller: for every Service with a selector, an EndpointSlice
//! (`discovery.k8s.io/v1`, named after the Service) and the legacy Endpoints
//! listing the matching pods that have an IP, with their readiness, node and
//! the ports resolved against the pods' named container ports. Both are owned
//! by the Service, so the garbage collector removes them with it.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Endpoints, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;

use crate::cluster::client::{Client, ListParams};
use crate::cluster::informer::{Informer, object_key};

pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
const MANAGED_BY: &str = "endpointslice-controller.k8s.io";
const RESYNC: Duration = Duration::from_secs(30);

/// One pod as an endpoint.
struct Endpoint<'a> {
    pod: &'a Pod,
    ip: String,
    ready: bool,
    terminating: bool,
}

fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn selected<'a>(service: &Service, pods: &'a [Pod]) -> Option<Vec<Endpoint<'a>>> {
    let selector = service.spec.as_ref()?.selector.as_ref().filter(|s| !s.is_empty())?;
    let namespace = service.metadata.namespace.as_deref();
    Some(
        pods.iter()
            .filter(|p| p.metadata.namespace.as_deref() == namespace)
            .filter(|p| {
                let labels = p.metadata.labels.as_ref();
                selector.iter().all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
            })
            .filter(|p| {
                !matches!(
                    p.status.as_ref().and_then(|s| s.phase.as_deref()),
                    Some("Succeeded" | "Failed")
                )
            })
            .filter_map(|pod| {
                let ip = pod.status.as_ref()?.pod_ip.clone().filter(|ip| !ip.is_empty())?;
                let terminating = pod.metadata.deletion_timestamp.is_some();
                Some(Endpoint {
                    pod,
                    ip,
                    ready: pod_ready(pod) && !terminating,
                    terminating,
                })
            })
            .collect(),
    )
}

/// The pod's port for a Service port's targetPort (a number, or a container port's name).
fn target_port(pod: &Pod, target: Option<&IntOrString>, port: i32) -> Option<i32> {
    match target {
        None => Some(port),
        Some(IntOrString::Int(n)) => Some(*n),
        Some(IntOrString::String(name)) => name.parse().ok().or_else(|| {
            pod.spec
                .as_ref()?
                .containers
                .iter()
                .flat_map(|c| c.ports.iter().flatten())
                .find(|p| p.name.as_deref() == Some(name.as_str()))
                .map(|p| p.container_port)
        }),
    }
}

/// (name, port, protocol) of each Service port for this pod; None when a named port is missing.
fn resolved_ports(service: &Service, pod: &Pod) -> Option<Vec<(String, i32, String)>> {
    service
        .spec
        .as_ref()?
        .ports
        .iter()
        .flatten()
        .map(|p| {
            Some((
                p.name.clone().unwrap_or_default(),
                target_port(pod, p.target_port.as_ref(), p.port)?,
                p.protocol.clone().unwrap_or_else(|| "TCP".into()),
            ))
        })
        .collect()
}

fn owner(service: &Service) -> Value {
    json!([{
        "apiVersion": "v1", "kind": "Service",
        "name": service.metadata.name, "uid": service.metadata.uid,
        "controller": true, "blockOwnerDeletion": true,
    }])
}

/// The EndpointSlice and Endpoints a Service should have. Pods whose named ports
/// resolve differently from the first pod's are left out (one slice per Service).
pub fn desired(service: &Service, pods: &[Pod]) -> Option<(EndpointSlice, Endpoints)> {
    let endpoints = selected(service, pods)?;
    let name = service.metadata.name.clone()?;
    let namespace = service.metadata.namespace.clone().unwrap_or_else(|| "default".into());
    let ports = endpoints
        .first()
        .and_then(|e| resolved_ports(service, e.pod))
        .unwrap_or_default();
    let members: Vec<&Endpoint> = endpoints
        .iter()
        .filter(|e| resolved_ports(service, e.pod).as_ref() == Some(&ports))
        .collect();
    let target = |e: &Endpoint| json!({"kind": "Pod", "name": e.pod.metadata.name, "namespace": namespace, "uid": e.pod.metadata.uid});
    let slice = json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {
            "name": name, "namespace": namespace, "ownerReferences": owner(service),
            "labels": {SERVICE_NAME_LABEL: name, MANAGED_BY_LABEL: MANAGED_BY},
        },
        "addressType": "IPv4",
        "endpoints": members.iter().map(|e| json!({
            "addresses": [e.ip],
            "conditions": {"ready": e.ready, "serving": pod_ready(e.pod), "terminating": e.terminating},
            "nodeName": e.pod.spec.as_ref().and_then(|s| s.node_name.clone()),
            "targetRef": target(e),
        })).collect::<Vec<_>>(),
        "ports": ports.iter().map(|(n, p, proto)| json!({"name": n, "port": p, "protocol": proto})).collect::<Vec<_>>(),
    });
    let address = |e: &&Endpoint| json!({"ip": e.ip, "nodeName": e.pod.spec.as_ref().and_then(|s| s.node_name.clone()), "targetRef": target(e)});
    let ready: Vec<Value> = members.iter().filter(|e| e.ready).map(address).collect();
    let not_ready: Vec<Value> = members.iter().filter(|e| !e.ready).map(address).collect();
    let subsets = if members.is_empty() {
        json!([])
    } else {
        json!([{
            "addresses": ready, "notReadyAddresses": not_ready,
            "ports": ports.iter().map(|(n, p, proto)| json!({"name": n, "port": p, "protocol": proto})).collect::<Vec<_>>(),
        }])
    };
    let legacy = json!({
        "apiVersion": "v1", "kind": "Endpoints",
        "metadata": {"name": name, "namespace": namespace, "ownerReferences": owner(service)},
        "subsets": subsets,
    });
    Some((
        serde_json::from_value(slice).ok()?,
        serde_json::from_value(legacy).ok()?,
    ))
}

pub fn spawn(client: Client) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let services: Informer<Service> = Informer::spawn(client.clone(), None, ListParams::default());
        let pods: Informer<Pod> = Informer::spawn(client.clone(), None, ListParams::default());
        let mut service_changes = services.subscribe();
        let mut pod_changes = pods.subscribe();
        services.wait_synced().await;
        pods.wait_synced().await;
        // What was last written, to skip writes that change nothing.
        let mut written: HashMap<String, (Value, Value)> = HashMap::new();
        loop {
            let all_pods = pods.list();
            let mut wanted = BTreeMap::new();
            for service in services.list() {
                if let Some(objects) = desired(&service, &all_pods) {
                    wanted.insert(object_key(&service.metadata), objects);
                }
            }
            written.retain(|key, _| wanted.contains_key(key));
            for (key, (slice, legacy)) in wanted {
                let values = (
                    serde_json::to_value(&slice).unwrap_or_default(),
                    serde_json::to_value(&legacy).unwrap_or_default(),
                );
                if written.get(&key) == Some(&values) {
                    continue;
                }
                match write(&client, &slice, &legacy).await {
                    Ok(()) => _ = written.insert(key, values),
                    Err(err) => tracing::debug!(service = key, error = %err, "writing endpoints; will retry"),
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(RESYNC) => written.clear(),
                change = service_changes.recv() => if matches!(change, Err(RecvError::Closed)) { return },
                change = pod_changes.recv() => if matches!(change, Err(RecvError::Closed)) { return },
            }
            // Coalesce a burst of changes into one pass.
            tokio::time::sleep(Duration::from_millis(20)).await;
            while service_changes.try_recv().is_ok() || pod_changes.try_recv().is_ok() {}
        }
    })
}

/// Creates or replaces both objects.
async fn write(client: &Client, slice: &EndpointSlice, legacy: &Endpoints) -> Result<(), String> {
    let namespace = slice.metadata.namespace.as_deref();
    let name = slice.metadata.name.as_deref().unwrap_or_default();
    match client
        .get_opt::<EndpointSlice>(namespace, name)
        .await
        .map_err(|e| e.to_string())?
    {
        Some(current) => {
            let mut next = slice.clone();
            next.metadata.resource_version = current.metadata.resource_version;
            client
                .replace(namespace, name, &next)
                .await
                .map_err(|e| e.to_string())?;
        }
        None => _ = client.create(namespace, slice).await.map_err(|e| e.to_string())?,
    }
    match client
        .get_opt::<Endpoints>(namespace, name)
        .await
        .map_err(|e| e.to_string())?
    {
        Some(current) => {
            let mut next = legacy.clone();
            next.metadata.resource_version = current.metadata.resource_version;
            client
                .replace(namespace, name, &next)
                .await
                .map_err(|e| e.to_string())?;
        }
        None => _ = client.create(namespace, legacy).await.map_err(|e| e.to_string())?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_follow_selected_pods_and_named_ports() {
        let service: Service = serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "default", "uid": "s1"},
            "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]},
        }))
        .unwrap();
        let pod = |name: &str, app: &str, ip: &str, ready: &str| -> Pod {
            serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": "default", "uid": name, "labels": {"app": app}},
                "spec": {"nodeName": "n1", "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}]},
                "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": ready}]},
            }))
            .unwrap()
        };
        let pods = [
            pod("a", "web", "10.0.0.1", "True"),
            pod("b", "web", "10.0.0.2", "False"),
            pod("c", "db", "10.0.0.3", "True"),
            pod("d", "web", "", "True"),
        ];
        let (slice, legacy) = desired(&service, &pods).unwrap();
        let addresses: Vec<(String, Option<bool>)> = slice
            .endpoints
            .iter()
            .map(|e| (e.addresses[0].clone(), e.conditions.as_ref().and_then(|c| c.ready)))
            .collect();
        assert_eq!(
            addresses,
            [
                ("10.0.0.1".to_string(), Some(true)),
                ("10.0.0.2".to_string(), Some(false))
            ]
        );
        assert_eq!(slice.ports.as_ref().unwrap()[0].port, Some(8080));
        let subset = &legacy.subsets.as_ref().unwrap()[0];
        assert_eq!(subset.addresses.as_ref().unwrap().len(), 1);
        assert_eq!(subset.not_ready_addresses.as_ref().unwrap().len(), 1);
        let headless_without_selector: Service =
            serde_json::from_value(json!({"metadata": {"name": "x"}, "spec": {}})).unwrap();
        assert!(desired(&headless_without_selector, &pods).is_none());
    }
}
