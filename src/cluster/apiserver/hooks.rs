//! Extension points for the node agent and controllers.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
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

pub type ProxyBody = BoxBody<Bytes, std::io::Error>;

/// Serves pod subresources that live on a node: `log`, `exec`, `attach`, `portforward`. The request is handed over
/// as received (upgrades included); `pod` is the current object.
#[async_trait::async_trait]
pub trait NodeProxy: Send + Sync + 'static {
    async fn serve(&self, pod: &Value, subresource: &str, req: hyper::Request<Incoming>) -> hyper::Response<ProxyBody>;
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
