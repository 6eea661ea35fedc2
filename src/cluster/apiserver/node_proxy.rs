//! Pod subresources served by the node: turning `pods/{name}/{log,exec,attach,portforward}` into a request on the
//! node agent's kubelet API, and [`KubeletProxy`], which sends it there over HTTPS.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use http::{Method, StatusCode};
use hyper::body::Incoming;
use rustls::pki_types::ServerName;
use serde_json::Value;

use super::errors::{ApiError, ApiResult};
use super::hooks::{NodeProxy, NodeRequest, ProxyBody};
use crate::cluster::forward::{self, Upstream};

fn names_of(pod: &Value, list: &str) -> Vec<String> {
    pod.pointer(&format!("/spec/{list}"))
        .and_then(Value::as_array)
        .map(|items| {
            items
                .iter()
                .filter_map(|c| c["name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// The container a request names, or the pod's only container; checked against the pod's spec.
fn container_of(pod: &Value, name: &str, requested: Option<&str>) -> ApiResult<String> {
    let containers = names_of(pod, "containers");
    let Some(requested) = requested.filter(|c| !c.is_empty()) else {
        return match containers.as_slice() {
            [only] => Ok(only.clone()),
            _ => Err(ApiError::bad_request(format!(
                "a container name must be specified for pod {name}, choose one of: [{}]",
                containers.join(" ")
            ))),
        };
    };
    let known = containers
        .iter()
        .chain(&names_of(pod, "initContainers"))
        .chain(&names_of(pod, "ephemeralContainers"))
        .any(|c| c == requested);
    if !known {
        return Err(ApiError::bad_request(format!(
            "container {requested} is not valid for pod {name}"
        )));
    }
    Ok(requested.to_string())
}

/// Builds the kubelet API request for a pod subresource (without the node lookup).
pub(super) fn node_request(
    pod: &Value,
    subresource: &str,
    method: &Method,
    query: Option<&str>,
) -> ApiResult<NodeRequest> {
    let meta = &pod["metadata"];
    let (ns, name, uid) = (
        meta["namespace"].as_str().unwrap_or("default"),
        meta["name"].as_str().unwrap_or_default(),
        meta["uid"].as_str().unwrap_or_default(),
    );
    let allowed = match subresource {
        "log" => method == Method::GET,
        _ => method == Method::GET || method == Method::POST,
    };
    if !allowed {
        return Err(ApiError::method_not_allowed(format!(
            "{method} is not supported on pods/{subresource}"
        )));
    }
    let node_name = pod
        .pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| ApiError::bad_request(format!("pod {name} does not have a host assigned")))?;
    let pairs: Vec<(String, String)> = form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .into_owned()
        .collect();
    let requested = pairs.iter().find(|(k, _)| k == "container").map(|(_, v)| v.as_str());
    let path = match subresource {
        "log" => format!("/containerLogs/{ns}/{name}/{}", container_of(pod, name, requested)?),
        "exec" | "attach" => format!(
            "/{subresource}/{ns}/{name}/{uid}/{}",
            container_of(pod, name, requested)?
        ),
        "portforward" => format!("/portForward/{ns}/{name}/{uid}"),
        other => {
            let message = format!("pods/{other} is not served by nodes");
            return Err(ApiError::new(StatusCode::NOT_FOUND, "NotFound", message));
        }
    };
    let mut rest = form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs.iter().filter(|(k, _)| k != "container") {
        rest.append_pair(k, v);
    }
    let rest = rest.finish();
    Ok(NodeRequest {
        node_name: node_name.to_string(),
        node: None,
        path_and_query: if rest.is_empty() {
            path
        } else {
            format!("{path}?{rest}")
        },
    })
}

/// A Node annotation with the PEM CA of a node agent whose serving certificate is not from the cluster CA (a node
/// that joined: it has no cluster CA key). Publishing it takes the same rights as publishing the node's address.
pub const KUBELET_CA_ANNOTATION: &str = "podvisor.io/kubelet-ca";

/// Proxies to node agents over HTTPS: the agent's certificate must chain to the cluster CA (or the CA the node
/// publishes in [`KUBELET_CA_ANNOTATION`]) and name the address dialled; the API server authenticates with the
/// cluster token.
pub struct KubeletProxy {
    tls: Arc<rustls::ClientConfig>,
    /// Client configurations for nodes' own CAs, by PEM.
    node_cas: std::sync::Mutex<std::collections::HashMap<String, Arc<rustls::ClientConfig>>>,
    authorization: String,
    /// The agent in this process: its node's name and address (used before the Node's published endpoint).
    local: Option<(String, SocketAddr)>,
}

impl KubeletProxy {
    pub fn new(ca_pem: &str, token: &str) -> anyhow::Result<Self> {
        Ok(KubeletProxy {
            tls: super::tls::client_config(ca_pem)?,
            node_cas: Default::default(),
            authorization: format!("Bearer {token}"),
            local: None,
        })
    }

    /// Requests for `node_name` go to `addr` without a Node lookup.
    pub fn with_local_node(mut self, node_name: &str, addr: SocketAddr) -> Self {
        self.local = Some((node_name.to_string(), addr));
        self
    }

    fn upstream(&self, target: &NodeRequest) -> ApiResult<Upstream> {
        let node_name = &target.node_name;
        let (host, port) = match &self.local {
            Some((local, addr)) if local == node_name => {
                let ip = match addr.ip() {
                    ip if ip.is_unspecified() => IpAddr::from([127, 0, 0, 1]),
                    ip => ip,
                };
                (ip.to_string(), addr.port())
            }
            _ => {
                let node = target
                    .node
                    .as_ref()
                    .ok_or_else(|| ApiError::not_found("nodes", node_name))?;
                kubelet_endpoint(node).ok_or_else(|| {
                    ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "ServiceUnavailable",
                        format!(
                            "node {node_name:?} publishes no kubelet endpoint (status.addresses and \
                             status.daemonEndpoints.kubeletEndpoint.Port)"
                        ),
                    )
                })?
            }
        };
        let (authority, server_name) = match host.parse::<IpAddr>() {
            Ok(ip) => (SocketAddr::new(ip, port).to_string(), ServerName::IpAddress(ip.into())),
            Err(_) => (
                format!("{host}:{port}"),
                ServerName::try_from(host.clone())
                    .map_err(|_| ApiError::internal(format!("node {node_name:?} has an invalid address {host:?}")))?,
            ),
        };
        let node_ca = target
            .node
            .as_ref()
            .and_then(|n| n.pointer("/metadata/annotations")?.get(KUBELET_CA_ANNOTATION)?.as_str());
        let tls = match node_ca {
            Some(pem) => self.node_ca_config(pem)?,
            None => self.tls.clone(),
        };
        Ok(Upstream {
            authority,
            tls: Some((tls, server_name)),
        })
    }

    fn node_ca_config(&self, pem: &str) -> ApiResult<Arc<rustls::ClientConfig>> {
        let mut cached = self.node_cas.lock().unwrap();
        if let Some(config) = cached.get(pem) {
            return Ok(config.clone());
        }
        let config = super::tls::client_config(pem)
            .map_err(|e| ApiError::internal(format!("the node's {KUBELET_CA_ANNOTATION} annotation: {e:#}")))?;
        if cached.len() > 256 {
            cached.clear();
        }
        cached.insert(pem.to_string(), config.clone());
        Ok(config)
    }
}

/// The node's kubelet address: InternalIP, else ExternalIP, else Hostname; the port from daemonEndpoints.
fn kubelet_endpoint(node: &Value) -> Option<(String, u16)> {
    let port = node
        .pointer("/status/daemonEndpoints/kubeletEndpoint/Port")
        .and_then(Value::as_u64)
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p > 0)?;
    let addresses = node.pointer("/status/addresses").and_then(Value::as_array)?;
    let host = ["InternalIP", "ExternalIP", "Hostname"].iter().find_map(|kind| {
        addresses
            .iter()
            .find(|a| a["type"] == *kind)
            .and_then(|a| a["address"].as_str())
            .filter(|a| !a.is_empty())
    })?;
    Some((host.to_string(), port))
}

#[async_trait::async_trait]
impl NodeProxy for KubeletProxy {
    async fn serve(&self, target: NodeRequest, req: hyper::Request<Incoming>) -> hyper::Response<ProxyBody> {
        let result = match self.upstream(&target) {
            Ok(upstream) => forward::forward(req, &upstream, &target.path_and_query, Some(&self.authorization))
                .await
                .map_err(|e| {
                    ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "ServiceUnavailable",
                        format!("the node agent of node {:?} did not answer: {e}", target.node_name),
                    )
                }),
            Err(e) => Err(e),
        };
        result.unwrap_or_else(|e| super::error_response(&e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod() -> Value {
        json!({"metadata": {"name": "web", "namespace": "ns", "uid": "u1"},
               "spec": {"nodeName": "n1", "containers": [{"name": "c"}], "initContainers": [{"name": "init"}]}})
    }

    #[test]
    fn kubelet_paths() {
        let get = Method::GET;
        let r = node_request(&pod(), "log", &get, Some("container=c&follow=true&tailLines=1")).unwrap();
        assert_eq!(r.node_name, "n1");
        assert_eq!(r.path_and_query, "/containerLogs/ns/web/c?follow=true&tailLines=1");
        let r = node_request(
            &pod(),
            "exec",
            &Method::POST,
            Some("command=sh&command=-c&command=echo+a%26b"),
        )
        .unwrap();
        assert_eq!(
            r.path_and_query,
            "/exec/ns/web/u1/c?command=sh&command=-c&command=echo+a%26b"
        );
        let r = node_request(&pod(), "attach", &get, Some("container=init&stdin=true")).unwrap();
        assert_eq!(r.path_and_query, "/attach/ns/web/u1/init?stdin=true");
        let r = node_request(&pod(), "portforward", &get, None).unwrap();
        assert_eq!(r.path_and_query, "/portForward/ns/web/u1");
    }

    #[test]
    fn rejected_requests() {
        let err = |pod: &Value, sub, method: &Method, q| node_request(pod, sub, method, q).unwrap_err();
        let e = err(&pod(), "log", &Method::GET, Some("container=nope"));
        assert_eq!(
            (e.code.as_u16(), e.message.as_str()),
            (400, "container nope is not valid for pod web")
        );
        assert_eq!(err(&pod(), "log", &Method::POST, None).code.as_u16(), 405);
        let mut unbound = pod();
        unbound["spec"]["nodeName"] = Value::Null;
        let e = err(&unbound, "exec", &Method::GET, None);
        assert_eq!(e.message, "pod web does not have a host assigned");
        let mut two = pod();
        two["spec"]["containers"] = json!([{"name": "a"}, {"name": "b"}]);
        let e = err(&two, "log", &Method::GET, None);
        assert_eq!(
            e.message,
            "a container name must be specified for pod web, choose one of: [a b]"
        );
    }

    #[test]
    fn endpoint_from_node_status() {
        let node = json!({"status": {
            "addresses": [{"type": "Hostname", "address": "h"}, {"type": "InternalIP", "address": "10.0.0.5"}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}}}});
        assert_eq!(kubelet_endpoint(&node), Some(("10.0.0.5".into(), 10250)));
        assert_eq!(kubelet_endpoint(&json!({"status": {}})), None);
    }
}
