//! The node agent's HTTPS API on kubelet's paths, which the API server proxies `kubectl logs/exec/attach/
//! port-forward` to:
//!
//! * `GET /containerLogs/{ns}/{pod}/{container}?follow&previous&tailLines&sinceSeconds&sinceTime&timestamps&limitBytes`
//! * `GET|POST /exec/{ns}/{pod}[/{uid}]/{container}?command=…&stdin&stdout&stderr&tty`
//! * `GET|POST /attach/{ns}/{pod}[/{uid}]/{container}?stdin&stdout&stderr&tty`
//! * `GET|POST /portForward/{ns}/{pod}[/{uid}]`
//!
//! Pods and containers are found through CRI alone (any runtime), by the labels the kubelet puts on sandboxes and
//! containers. Exec, attach and port-forward ask the runtime for a streaming URL and splice the caller's upgraded
//! connection (WebSocket or SPDY) to it. Callers authenticate with the cluster's bearer token.

#[path = "server_logs.rs"]
pub mod logs;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::cluster::apiserver::errors::ApiError;
use crate::cluster::forward::{self, ProxyBody, Upstream};
use crate::cri::proto::runtime as cri;
use cri::runtime_service_client::RuntimeServiceClient;
use logs::{LogOptions, flag};

pub const POD_NAME_LABEL: &str = "io.kubernetes.pod.name";
pub const POD_NAMESPACE_LABEL: &str = "io.kubernetes.pod.namespace";
pub const POD_UID_LABEL: &str = "io.kubernetes.pod.uid";
pub const CONTAINER_NAME_LABEL: &str = "io.kubernetes.container.name";

/// Port the kubelet API listens on by default.
pub const DEFAULT_PORT: u16 = 10250;

pub struct AgentServerConfig {
    /// Port 0 picks a free port.
    pub listen: SocketAddr,
    /// The CRI runtime's socket, e.g. `unix:///run/containerd/containerd.sock`.
    pub cri_endpoint: String,
    /// Serve HTTPS with this configuration; None serves plain HTTP.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Callers present `Authorization: Bearer <token>`.
    pub token: String,
    /// For `https://` streaming URLs from the runtime; without it only `http://` URLs work.
    pub streaming_tls: Option<Arc<rustls::ClientConfig>>,
}

/// Binds `config.listen` and serves until the returned task is aborted.
pub async fn serve(config: AgentServerConfig) -> anyhow::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = crate::sys::netns::bind_tcp(config.listen).await?;
    let addr = listener.local_addr()?;
    let acceptor = config.tls.clone().map(tokio_rustls::TlsAcceptor::from);
    let agent = Arc::new(Agent {
        cri_endpoint: config.cri_endpoint,
        channel: tokio::sync::OnceCell::new(),
        token: config.token,
        streaming_tls: config.streaming_tls,
    });
    let task = tokio::spawn(async move {
        loop {
            let (tcp, _) = match listener.accept().await {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!(error = %e, "node agent accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let (agent, acceptor) = (agent.clone(), acceptor.clone());
            tokio::spawn(async move {
                match acceptor {
                    Some(acceptor) => match acceptor.accept(tcp).await {
                        Ok(tls) => serve_connection(agent, tls).await,
                        Err(e) => tracing::debug!(error = %e, "node agent TLS handshake failed"),
                    },
                    None => serve_connection(agent, tcp).await,
                }
            });
        }
    });
    Ok((addr, task))
}

async fn serve_connection<S>(agent: Arc<Agent>, stream: S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| {
        let agent = agent.clone();
        async move { Ok::<_, Infallible>(agent.handle(req).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30))
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    if let Err(e) = conn.await {
        tracing::debug!(error = %e, "node agent connection ended with an error");
    }
}

struct Agent {
    cri_endpoint: String,
    channel: tokio::sync::OnceCell<Channel>,
    token: String,
    streaming_tls: Option<Arc<rustls::ClientConfig>>,
}

type Result<T> = std::result::Result<T, ApiError>;

/// A pod as named in a request path.
struct PodRef<'a> {
    namespace: &'a str,
    name: &'a str,
    uid: Option<&'a str>,
}

impl PodRef<'_> {
    fn labels(&self) -> HashMap<String, String> {
        let mut labels = HashMap::from([
            (POD_NAMESPACE_LABEL.to_string(), self.namespace.to_string()),
            (POD_NAME_LABEL.to_string(), self.name.to_string()),
        ]);
        if let Some(uid) = self.uid {
            labels.insert(POD_UID_LABEL.to_string(), uid.to_string());
        }
        labels
    }
}

impl std::fmt::Display for PodRef<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

fn status_response(err: &ApiError) -> Response<ProxyBody> {
    let body = serde_json::to_vec(&err.status()).unwrap_or_default();
    let mut resp = Response::new(full(body));
    *resp.status_mut() = err.code;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn full(data: impl Into<Bytes>) -> ProxyBody {
    Full::new(data.into()).map_err(|never| match never {}).boxed()
}

fn from_grpc(what: &str, status: tonic::Status) -> ApiError {
    let message = format!("{what}: {}", status.message());
    match status.code() {
        tonic::Code::NotFound => ApiError::new(StatusCode::NOT_FOUND, "NotFound", message),
        tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition | tonic::Code::OutOfRange => {
            ApiError::bad_request(message)
        }
        tonic::Code::Unavailable | tonic::Code::ResourceExhausted => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable", message)
        }
        _ => ApiError::internal(message),
    }
}

fn not_found(message: String) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "NotFound", message)
}

/// Query pairs, repeated keys kept (`command` is one value per argument).
fn query_pairs(req: &Request<Incoming>) -> Vec<(String, String)> {
    form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
        .into_owned()
        .collect()
}

fn authorized(token: &str, req: &Request<Incoming>) -> bool {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    // Constant-time comparison.
    presented.len() == token.len() && presented.bytes().zip(token.bytes()).fold(0u8, |a, (x, y)| a | (x ^ y)) == 0
}

/// A kubelet API path.
enum Route<'a> {
    Logs(PodRef<'a>, &'a str),
    Exec(PodRef<'a>, &'a str),
    Attach(PodRef<'a>, &'a str),
    PortForward(PodRef<'a>),
}

impl<'a> Route<'a> {
    fn parse(path: &'a str) -> Option<Self> {
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        if segments.iter().any(|s| s.is_empty()) {
            return None;
        }
        let pod = |namespace, name, uid| PodRef { namespace, name, uid };
        Some(match segments.as_slice() {
            ["containerLogs", ns, name, container] => Route::Logs(pod(ns, name, None), container),
            ["exec", ns, name, container] => Route::Exec(pod(ns, name, None), container),
            ["exec", ns, name, uid, container] => Route::Exec(pod(ns, name, Some(uid)), container),
            ["attach", ns, name, container] => Route::Attach(pod(ns, name, None), container),
            ["attach", ns, name, uid, container] => Route::Attach(pod(ns, name, Some(uid)), container),
            ["portForward", ns, name] => Route::PortForward(pod(ns, name, None)),
            ["portForward", ns, name, uid] => Route::PortForward(pod(ns, name, Some(uid))),
            _ => return None,
        })
    }

    /// Logs are read with GET; streams upgrade a GET (WebSocket) or a POST (SPDY).
    fn allows(&self, method: &Method) -> bool {
        match self {
            Route::Logs(..) => method == Method::GET,
            _ => method == Method::GET || method == Method::POST,
        }
    }
}

/// Stdio flags of exec and attach; kubelet also accepts the old names input/output/error.
fn stdio(q: &HashMap<String, String>) -> (bool, bool, bool, bool) {
    (
        flag(q, "stdin") || flag(q, "input"),
        flag(q, "stdout") || flag(q, "output"),
        flag(q, "stderr") || flag(q, "error"),
        flag(q, "tty"),
    )
}

impl Agent {
    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<ProxyBody> {
        let path = req.uri().path().to_string();
        if path == "/healthz" {
            return Response::new(full("ok"));
        }
        if !authorized(&self.token, &req) {
            return status_response(&ApiError::unauthorized());
        }
        let method = req.method().clone();
        let result = match Route::parse(&path) {
            None => Err(ApiError::path_not_found()),
            Some(route) if !route.allows(&method) => Err(ApiError::method_not_allowed(format!(
                "{method} is not supported on {path}"
            ))),
            Some(Route::Logs(pod, container)) => self.logs(&pod, container, &req).await,
            Some(Route::Exec(pod, container)) => self.exec(&pod, container, req).await,
            Some(Route::Attach(pod, container)) => self.attach(&pod, container, req).await,
            Some(Route::PortForward(pod)) => self.port_forward(&pod, req).await,
        };
        result.unwrap_or_else(|err| {
            tracing::debug!(%method, %path, code = err.code.as_u16(), message = %err.message, "node agent request failed");
            status_response(&err)
        })
    }

    async fn runtime(&self) -> Result<RuntimeServiceClient<Channel>> {
        let channel = self
            .channel
            .get_or_try_init(|| crate::cri::socket::connect(&self.cri_endpoint))
            .await
            .map_err(|e| {
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "ServiceUnavailable",
                    format!("connecting to the container runtime at {}: {e}", self.cri_endpoint),
                )
            })?;
        Ok(RuntimeServiceClient::new(channel.clone()))
    }

    /// The pod's sandboxes, newest first.
    async fn sandboxes(&self, pod: &PodRef<'_>) -> Result<Vec<cri::PodSandbox>> {
        let filter = cri::PodSandboxFilter {
            label_selector: pod.labels(),
            ..Default::default()
        };
        let mut items = self
            .runtime()
            .await?
            .list_pod_sandbox(cri::ListPodSandboxRequest { filter: Some(filter) })
            .await
            .map_err(|s| from_grpc("listing pod sandboxes", s))?
            .into_inner()
            .items;
        items.sort_by_key(|s| std::cmp::Reverse(s.created_at));
        Ok(items)
    }

    /// The instances of a container of the pod, newest (highest restart attempt) first. Without a uid in the
    /// request, the pod is the one of the newest ready sandbox, else of the newest sandbox: a stopped older pod of
    /// the same name may still be around.
    async fn containers(&self, pod: &PodRef<'_>, container: &str) -> Result<Vec<cri::Container>> {
        let sandboxes = self.sandboxes(pod).await?;
        let ready = cri::PodSandboxState::SandboxReady as i32;
        let Some(current) = sandboxes.iter().find(|s| s.state == ready).or(sandboxes.first()) else {
            return Err(not_found(format!("pod \"{pod}\" not found on this node")));
        };
        let mut labels = pod.labels();
        if pod.uid.is_none()
            && let Some(uid) = current.labels.get(POD_UID_LABEL)
        {
            labels.insert(POD_UID_LABEL.to_string(), uid.clone());
        }
        labels.insert(CONTAINER_NAME_LABEL.to_string(), container.to_string());
        let filter = cri::ContainerFilter {
            label_selector: labels,
            ..Default::default()
        };
        let mut items = self
            .runtime()
            .await?
            .list_containers(cri::ListContainersRequest { filter: Some(filter) })
            .await
            .map_err(|s| from_grpc("listing containers", s))?
            .into_inner()
            .containers;
        if items.is_empty() {
            return Err(not_found(format!(
                "container \"{container}\" in pod \"{pod}\" not found on this node (not created yet, or removed)"
            )));
        }
        items.sort_by_key(|c| {
            let attempt = c.metadata.as_ref().map_or(0, |m| m.attempt);
            std::cmp::Reverse((attempt, c.created_at))
        });
        Ok(items)
    }

    async fn running_container(&self, pod: &PodRef<'_>, container: &str) -> Result<cri::Container> {
        let running = cri::ContainerState::ContainerRunning as i32;
        self.containers(pod, container)
            .await?
            .into_iter()
            .find(|c| c.state == running)
            .ok_or_else(|| ApiError::bad_request(format!("container \"{container}\" in pod \"{pod}\" is not running")))
    }

    async fn logs(&self, pod: &PodRef<'_>, container: &str, req: &Request<Incoming>) -> Result<Response<ProxyBody>> {
        let q: HashMap<String, String> = query_pairs(req).into_iter().collect();
        let options = LogOptions::from_query(&q).map_err(ApiError::bad_request)?;
        let instances = self.containers(pod, container).await?;
        let chosen = if options.previous {
            instances.get(1).ok_or_else(|| {
                ApiError::bad_request(format!(
                    "previous terminated container \"{container}\" in pod \"{}\" not found",
                    pod.name
                ))
            })?
        } else {
            &instances[0]
        };
        let id = chosen.id.clone();
        let status = self
            .runtime()
            .await?
            .container_status(cri::ContainerStatusRequest {
                container_id: id.clone(),
                verbose: false,
            })
            .await
            .map_err(|s| from_grpc("container status", s))?
            .into_inner()
            .status
            .ok_or_else(|| ApiError::internal("the runtime returned no container status"))?;
        if status.log_path.is_empty() {
            return Err(not_found(format!(
                "container \"{container}\" in pod \"{pod}\" has no log file"
            )));
        }
        let runtime = self.runtime().await?;
        let is_running: logs::RunningCheck = Box::new(move || {
            let (mut runtime, id) = (runtime.clone(), id.clone());
            Box::pin(async move {
                let request = cri::ContainerStatusRequest {
                    container_id: id,
                    verbose: false,
                };
                match runtime.container_status(request).await {
                    Ok(r) => r.into_inner().status.is_some_and(|s| {
                        s.state == cri::ContainerState::ContainerRunning as i32
                            || s.state == cri::ContainerState::ContainerCreated as i32
                    }),
                    Err(_) => false,
                }
            })
        });
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(logs::stream_log(status.log_path.into(), options, is_running, tx));
        let mut resp = Response::new(StreamBody::new(ReceiverStream::new(rx)).boxed());
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        Ok(resp)
    }

    async fn exec(&self, pod: &PodRef<'_>, container: &str, req: Request<Incoming>) -> Result<Response<ProxyBody>> {
        let pairs = query_pairs(&req);
        let cmd: Vec<String> = pairs
            .iter()
            .filter(|(k, _)| k == "command")
            .map(|(_, v)| v.clone())
            .collect();
        if cmd.is_empty() {
            return Err(ApiError::bad_request(
                "you must specify at least one command for the container",
            ));
        }
        let (stdin, stdout, stderr, tty) = stdio(&pairs.into_iter().collect());
        let target = self.running_container(pod, container).await?;
        let url = self
            .runtime()
            .await?
            .exec(cri::ExecRequest {
                container_id: target.id,
                cmd,
                tty,
                stdin,
                stdout,
                stderr,
            })
            .await
            .map_err(|s| from_grpc("exec", s))?
            .into_inner()
            .url;
        self.to_streaming_server(req, &url, false).await
    }

    async fn attach(&self, pod: &PodRef<'_>, container: &str, req: Request<Incoming>) -> Result<Response<ProxyBody>> {
        let (stdin, stdout, stderr, tty) = stdio(&query_pairs(&req).into_iter().collect());
        let target = self.running_container(pod, container).await?;
        let url = self
            .runtime()
            .await?
            .attach(cri::AttachRequest {
                container_id: target.id,
                stdin,
                tty,
                stdout,
                stderr,
            })
            .await
            .map_err(|s| from_grpc("attach", s))?
            .into_inner()
            .url;
        self.to_streaming_server(req, &url, false).await
    }

    async fn port_forward(&self, pod: &PodRef<'_>, req: Request<Incoming>) -> Result<Response<ProxyBody>> {
        let mut ports = Vec::new();
        for (key, value) in query_pairs(&req) {
            if key != "port" && key != "ports" {
                continue;
            }
            for p in value.split(',') {
                match p.trim().parse::<u16>() {
                    Ok(port) if port > 0 => ports.push(i32::from(port)),
                    _ => return Err(ApiError::bad_request(format!("invalid port {p:?}"))),
                }
            }
        }
        let ready = cri::PodSandboxState::SandboxReady as i32;
        let sandbox = self
            .sandboxes(pod)
            .await?
            .into_iter()
            .find(|s| s.state == ready)
            .ok_or_else(|| not_found(format!("pod \"{pod}\" has no running sandbox on this node")))?;
        let url = self
            .runtime()
            .await?
            .port_forward(cri::PortForwardRequest {
                pod_sandbox_id: sandbox.id,
                port: ports,
            })
            .await
            .map_err(|s| from_grpc("port-forward", s))?
            .into_inner()
            .url;
        // WebSocket port-forward names its ports in the query.
        self.to_streaming_server(req, &url, true).await
    }

    /// Forwards the caller's request (upgrade included) to a streaming URL from the runtime.
    async fn to_streaming_server(
        &self,
        req: Request<Incoming>,
        url: &str,
        keep_query: bool,
    ) -> Result<Response<ProxyBody>> {
        let bad_url =
            |why: &str| ApiError::internal(format!("the runtime returned an unusable streaming URL {url:?}: {why}"));
        let uri: http::Uri = url.parse().map_err(|_| bad_url("not a URL"))?;
        let host = uri.host().ok_or_else(|| bad_url("no host"))?;
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => return Err(bad_url("not http or https")),
        };
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let tls = if https {
            let config = self.streaming_tls.clone().ok_or_else(|| {
                bad_url("https streaming URLs need the agent's streaming_tls setting (the runtime's CA)")
            })?;
            let name = ServerName::try_from(host.trim_start_matches('[').trim_end_matches(']').to_string())
                .map_err(|_| bad_url("invalid host name"))?;
            Some((config, name))
        } else {
            None
        };
        let upstream = Upstream {
            authority: format!("{host}:{port}"),
            tls,
        };
        let mut path_and_query = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
        if keep_query && let Some(query) = req.uri().query() {
            path_and_query.push(if path_and_query.contains('?') { '&' } else { '?' });
            path_and_query.push_str(query);
        }
        forward::forward(req, &upstream, &path_and_query, None)
            .await
            .map_err(|e| {
                ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "InternalError",
                    format!("streaming server: {e}"),
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubelet_paths() {
        let Some(Route::Exec(pod, container)) = Route::parse("/exec/ns/web/u1/c") else {
            panic!("exec with uid");
        };
        assert_eq!(
            (pod.to_string(), pod.uid, container),
            ("ns/web".into(), Some("u1"), "c")
        );
        assert!(matches!(Route::parse("/exec/ns/web/c"), Some(Route::Exec(p, "c")) if p.uid.is_none()));
        assert!(matches!(
            Route::parse("/containerLogs/ns/web/c"),
            Some(Route::Logs(_, "c"))
        ));
        assert!(matches!(
            Route::parse("/portForward/ns/web"),
            Some(Route::PortForward(_))
        ));
        for bad in [
            "/containerLogs/ns/web",
            "/exec/ns//c",
            "/portForward/ns/web/u/x",
            "/metrics",
        ] {
            assert!(Route::parse(bad).is_none(), "{bad}");
        }
        let logs = Route::parse("/containerLogs/ns/web/c").unwrap();
        assert!(logs.allows(&Method::GET) && !logs.allows(&Method::POST));
        assert!(Route::parse("/attach/ns/web/c").unwrap().allows(&Method::POST));
    }
}
