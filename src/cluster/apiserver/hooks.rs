//! Extension points for the node agent and controllers.

use std::sync::Arc;

use hyper::body::Incoming;
use serde_json::Value;

/// How a DELETE of an object proceeds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeleteDecision {
    /// Remove from the store now.
    Immediate,
    /// Set `deletionTimestamp` (+ grace seconds) and leave the final delete (with gracePeriodSeconds=0) to an
    /// agent, e.g. the node agent after it has stopped the pod's containers.
    Graceful { grace_seconds: i64 },
}

/// Decides graceful vs immediate deletion. The default makes pods bound to a node graceful.
pub trait DeletePolicy: Send + Sync + 'static {
    fn decide(&self, resource: &str, obj: &Value, requested_grace: Option<i64>) -> DeleteDecision;
}

/// Pods with `spec.nodeName` are deleted gracefully (grace from the request or the pod's
/// `terminationGracePeriodSeconds`); a grace of 0 or an unbound pod deletes at once.
pub struct BoundPodsGraceful;

impl DeletePolicy for BoundPodsGraceful {
    fn decide(&self, resource: &str, obj: &Value, requested_grace: Option<i64>) -> DeleteDecision {
        let bound = obj
            .pointer("/spec/nodeName")
            .and_then(Value::as_str)
            .is_some_and(|n| !n.is_empty());
        if resource != "pods" || !bound || requested_grace == Some(0) {
            return DeleteDecision::Immediate;
        }
        let grace = requested_grace
            .or_else(|| {
                obj.pointer("/spec/terminationGracePeriodSeconds")
                    .and_then(Value::as_i64)
            })
            .unwrap_or(30)
            .max(1);
        DeleteDecision::Graceful { grace_seconds: grace }
    }
}

pub use crate::cluster::forward::ProxyBody;

/// A pod subresource request (`log`, `exec`, `attach`, `portforward`) bound for the pod's node, after the API server
/// checked the pod is bound and the container exists.
#[derive(Clone, Debug)]
pub struct NodeRequest {
    pub node_name: String,
    /// The Node object, if registered.
    pub node: Option<Value>,
    /// Path and query on the node's kubelet API, e.g. `/containerLogs/default/web/c?follow=true`.
    pub path_and_query: String,
}

/// Serves pod subresources that live on a node. The client's request is handed over as received (upgrades
/// included) and the answer goes back as is.
#[async_trait::async_trait]
pub trait NodeProxy: Send + Sync + 'static {
    async fn serve(&self, target: NodeRequest, req: hyper::Request<Incoming>) -> hyper::Response<ProxyBody>;
}

#[derive(Clone)]
pub struct Hooks {
    pub delete: Arc<dyn DeletePolicy>,
    pub node_proxy: Option<Arc<dyn NodeProxy>>,
}

impl Default for Hooks {
    fn default() -> Self {
        Hooks {
            delete: Arc::new(BoundPodsGraceful),
            node_proxy: None,
        }
    }
}
