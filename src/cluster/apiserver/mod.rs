//! A Kubernetes-compatible API server (JSON over HTTPS) for the built-in resource types podvisor's mini-cluster
//! serves. See `handlers` for the verbs and `hooks` for the node agent / controller extension points.

pub mod discovery;
pub mod errors;
mod gc;
mod handlers;
pub mod hooks;
pub mod node_proxy;
pub mod patch;
pub mod protobuf;
pub mod registry;
pub mod select;
pub mod services;
pub mod table;
pub mod tls;
pub mod validate;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::cluster::store::{RedbStore, Store};
use errors::ApiError;
pub use hooks::{BoundPodsGraceful, DeleteDecision, DeletePolicy, Hooks, NodeProxy, NodeRequest};
pub use node_proxy::KubeletProxy;

pub type Body = BoxBody<Bytes, std::io::Error>;

pub struct Config {
    /// Holds `store.redb`, the CA, serving certificate and token.
    pub state_dir: PathBuf,
    /// Listen address; port 0 picks a free port.
    pub addr: SocketAddr,
    pub hooks: Hooks,
    /// Where Services' ClusterIPs come from; the first address is the `kubernetes` service's.
    pub service_cidr: ipnet::Ipv4Net,
}

pub const DEFAULT_SERVICE_CIDR: &str = "10.96.0.0/16";

impl Config {
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        Config {
            state_dir: state_dir.into(),
            addr: SocketAddr::from(([127, 0, 0, 1], 6443)),
            hooks: Hooks::default(),
            service_cidr: DEFAULT_SERVICE_CIDR.parse().expect("a CIDR"),
        }
    }
}

/// Served without a token, as kubeadm's kube-public ConfigMap: the CA a joining node checks against its hash.
pub const CLUSTER_INFO_PATH: &str = "/api/v1/namespaces/kube-public/configmaps/cluster-info";

pub(crate) struct State {
    pub store: Arc<dyn Store>,
    pub token: String,
    pub node_token: String,
    pub ca_pem: String,
    pub hooks: Hooks,
    /// Wakes the garbage collector (after deletes).
    pub gc: tokio::sync::Notify,
    pub service_cidr: ipnet::Ipv4Net,
    /// Serializes Service creations (address allocation).
    pub service_allocation: tokio::sync::Mutex<()>,
    /// Serializes evictions, so concurrent ones never overspend a disruption budget.
    pub evictions: tokio::sync::Mutex<()>,
}

/// A running API server.
pub struct ApiServer {
    pub addr: SocketAddr,
    pub url: String,
    pub ca_pem: String,
    pub token: String,
    /// What joining nodes present (see `Identity::Node`).
    pub node_token: String,
    /// The same store the server writes; in-process components may watch it directly.
    pub store: Arc<dyn Store>,
    task: JoinHandle<()>,
    gc_task: JoinHandle<()>,
}

impl ApiServer {
    /// Opens the durable store under `state_dir` and starts serving.
    pub async fn start(config: Config) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&config.state_dir)?;
        let store: Arc<dyn Store> = Arc::new(RedbStore::open(&config.state_dir.join("store.redb"))?);
        Self::start_with_store(config, store).await
    }

    pub async fn start_with_store(config: Config, store: Arc<dyn Store>) -> anyhow::Result<Self> {
        let creds = tls::load_or_create(&config.state_dir)?;
        let acceptor = tokio_rustls::TlsAcceptor::from(tls::server_config(&creds)?);
        let state = Arc::new(State {
            store: store.clone(),
            token: creds.token.clone(),
            node_token: creds.node_token.clone(),
            ca_pem: creds.ca_pem.clone(),
            hooks: config.hooks,
            gc: tokio::sync::Notify::new(),
            service_cidr: config.service_cidr,
            service_allocation: tokio::sync::Mutex::new(()),
            evictions: tokio::sync::Mutex::new(()),
        });
        handlers::bootstrap(&state).await?;
        let gc_task = gc::spawn(state.clone());
        let listener = TcpListener::bind(config.addr).await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(accept_loop(listener, acceptor, state));
        Ok(ApiServer {
            addr,
            url: format!("https://{addr}"),
            ca_pem: creds.ca_pem,
            token: creds.token,
            node_token: creds.node_token,
            store,
            task,
            gc_task,
        })
    }

    pub fn kubeconfig(&self) -> String {
        tls::kubeconfig(&self.url, &self.ca_pem, &self.token)
    }

    pub fn stop(self) {
        self.task.abort();
        self.gc_task.abort();
    }
}

async fn accept_loop(listener: TcpListener, acceptor: tokio_rustls::TlsAcceptor, state: Arc<State>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, state) = (acceptor.clone(), state.clone());
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else { return };
            let svc = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(state, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), svc)
                .with_upgrades()
                .await;
        });
    }
}

pub(crate) fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

pub(crate) fn json_response(code: StatusCode, v: &Value, content_type: &str) -> hyper::Response<Body> {
    let mut r = hyper::Response::new(full(serde_json::to_vec(v).unwrap_or_default()));
    *r.status_mut() = code;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(content_type).unwrap_or(HeaderValue::from_static("application/json")),
    );
    r
}

pub(crate) fn error_response(e: &ApiError) -> hyper::Response<Body> {
    json_response(e.code, &e.status(), "application/json")
}

fn text(code: StatusCode, s: &'static str) -> hyper::Response<Body> {
    let mut r = hyper::Response::new(full(s));
    *r.status_mut() = code;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

pub(crate) fn query_map(q: Option<&str>) -> HashMap<String, String> {
    form_urlencoded::parse(q.unwrap_or("").as_bytes())
        .into_owned()
        .collect()
}

/// Who a request comes from.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Identity {
    Admin,
    /// A node agent (`podvisor join`'s token): reads everything, writes where agents write.
    Node,
}

fn same_secret(presented: &str, secret: &str) -> bool {
    // Constant-time comparison.
    presented.len() == secret.len() && presented.bytes().zip(secret.bytes()).fold(0u8, |a, (x, y)| a | (x ^ y)) == 0
}

fn identify(state: &State, req: &hyper::Request<Incoming>) -> Option<Identity> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let token = value.strip_prefix("Bearer ")?;
    if same_secret(token, &state.token) {
        Some(Identity::Admin)
    } else if same_secret(token, &state.node_token) {
        Some(Identity::Node)
    } else {
        None
    }
}

const AGGREGATED: &str = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList";

async fn route(state: Arc<State>, req: hyper::Request<Incoming>) -> hyper::Response<Body> {
    let started = Instant::now();
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let resp = route_inner(state, req).await;
    tracing::debug!(%method, %path, status = resp.status().as_u16(), us = started.elapsed().as_micros() as u64, "request");
    resp
}

async fn route_inner(state: Arc<State>, req: hyper::Request<Incoming>) -> hyper::Response<Body> {
    let path = req.uri().path().trim_end_matches('/').to_string();
    match path.as_str() {
        "/version" => return json_response(StatusCode::OK, &discovery::version(), "application/json"),
        "/healthz" | "/livez" | "/readyz" => return text(StatusCode::OK, "ok"),
        CLUSTER_INFO_PATH if req.method() == http::Method::GET => {
            let info = serde_json::json!({
                "apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "cluster-info", "namespace": "kube-public"},
                "data": {"ca.crt": state.ca_pem},
            });
            return json_response(StatusCode::OK, &info, "application/json");
        }
        _ => {}
    }
    let Some(identity) = identify(&state, &req) else {
        return error_response(&ApiError::unauthorized());
    };
    let read = matches!(*req.method(), http::Method::GET | http::Method::HEAD);
    if identity == Identity::Node && !read && !handlers::node_may_write(req.method(), &path) {
        return error_response(&ApiError::forbidden(format!(
            "{path} is forbidden: the node token may not {} it (the administrator's kubeconfig may)",
            req.method().as_str().to_lowercase()
        )));
    }
    let accept = req
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let wants_aggregated = accept.contains("as=APIGroupDiscoveryList") && accept.contains("v=v2;");
    let ok = |v: Value| json_response(StatusCode::OK, &v, "application/json");
    if req.method() == http::Method::GET {
        match path.as_str() {
            "/api" if wants_aggregated => {
                return json_response(StatusCode::OK, &discovery::aggregated(true), AGGREGATED);
            }
            "/apis" if wants_aggregated => {
                return json_response(StatusCode::OK, &discovery::aggregated(false), AGGREGATED);
            }
            "/api" => return ok(discovery::legacy_api()),
            "/apis" => return ok(discovery::legacy_apis()),
            "/openapi/v3" => return ok(discovery::openapi_index()),
            _ => {}
        }
        if let Some(gv) = path.strip_prefix("/openapi/v3/") {
            return match discovery::openapi_gv(gv) {
                Some(doc) => ok(doc),
                None => error_response(&ApiError::path_not_found()),
            };
        }
        let segs: Vec<&str> = path.split('/').skip(1).collect();
        match segs.as_slice() {
            ["api", v] => {
                return discovery::resource_list("", v).map_or_else(|| error_response(&ApiError::path_not_found()), ok);
            }
            ["apis", g, v] => {
                return discovery::resource_list(g, v).map_or_else(|| error_response(&ApiError::path_not_found()), ok);
            }
            ["apis", g] => {
                let groups = discovery::legacy_apis();
                if let Some(grp) = groups["groups"]
                    .as_array()
                    .and_then(|a| a.iter().find(|x| x["name"] == *g))
                {
                    let mut grp = grp.clone();
                    grp["kind"] = "APIGroup".into();
                    grp["apiVersion"] = "v1".into();
                    return ok(grp);
                }
                return error_response(&ApiError::path_not_found());
            }
            _ => {}
        }
    }
    handlers::resource_request(state, req, &accept).await
}
