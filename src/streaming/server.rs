//! The HTTP streaming server: single-use URLs for exec/attach/port-forward and the protocol upgrades.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http::header::{CONNECTION, UPGRADE};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use rand::RngCore;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::portforward::{self, WsMode};
use super::remotecommand::{self, ACCEPTED_VERSIONS_HEADER, Command, PROTOCOL_VERSION_HEADER, Protocol, WsProtocol};
use super::spdy::{Role, Session, SessionConfig};
use super::websocket::{self, ChannelMux, Encoding};
use super::{
    AttachRequest, ExecRequest, PortForwardRequest, StdioFlags, StreamError, StreamingRuntime, validate_stdio,
};

/// Streaming server settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address to listen on.
    pub addr: SocketAddr,
    /// URL prefix of the returned URLs; defaults to `http://<bound address>` (loopback if bound to any address).
    pub base_url: Option<String>,
    /// How long a registered URL stays valid if unused.
    pub token_ttl: Duration,
    /// Most registered-but-unused URLs at once.
    pub max_pending: usize,
    /// How long a client may take to create all streams of a session.
    pub stream_creation_timeout: Duration,
    /// SPDY session tuning.
    pub spdy: SessionConfig,
    /// Serve HTTPS with this certificate (the URLs then start with `https://`).
    pub tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
}

impl ServerConfig {
    /// Defaults for listening on `addr`.
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            base_url: None,
            token_ttl: Duration::from_secs(60),
            max_pending: 1000,
            stream_creation_timeout: Duration::from_secs(30),
            spdy: SessionConfig::default(),
            tls: None,
        }
    }
}

/// A TLS server configuration from PEM files: the certificate chain and its private key.
pub fn tls_config(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> std::io::Result<tokio_rustls::rustls::ServerConfig> {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let invalid = |what: &str, e: &dyn std::fmt::Display| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{what}: {e}"))
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| invalid(&cert.display().to_string(), &e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(&cert.display().to_string(), &e))?;
    if chain.is_empty() {
        return Err(invalid(&cert.display().to_string(), &"no certificate in the file"));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| invalid(&key.display().to_string(), &e))?;
    rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid("TLS versions", &e))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| invalid("certificate and key", &e))
}

#[derive(Debug, Clone)]
enum Cached {
    Exec(ExecRequest),
    Attach(AttachRequest),
    PortForward(PortForwardRequest),
}

impl Cached {
    fn kind(&self) -> &'static str {
        match self {
            Cached::Exec(_) => "exec",
            Cached::Attach(_) => "attach",
            Cached::PortForward(_) => "portforward",
        }
    }
}

struct Inner {
    runtime: Arc<dyn StreamingRuntime>,
    config: ServerConfig,
    base_url: String,
    local_addr: SocketAddr,
    tokens: Mutex<HashMap<String, (Instant, Cached)>>,
}

/// The streaming HTTP server. Dropping it stops accepting new connections (running sessions continue).
pub struct StreamingServer {
    inner: Arc<Inner>,
    stop: CancellationToken,
}

impl std::fmt::Debug for StreamingServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamingServer")
            .field("url", &self.inner.base_url)
            .finish()
    }
}

impl StreamingServer {
    /// Binds `addr` with default settings and starts serving in the background.
    pub async fn new(addr: SocketAddr, runtime: Arc<dyn StreamingRuntime>) -> std::io::Result<Self> {
        Self::with_config(ServerConfig::new(addr), runtime).await
    }

    /// Binds `config.addr` and starts serving in the background.
    pub async fn with_config(config: ServerConfig, runtime: Arc<dyn StreamingRuntime>) -> std::io::Result<Self> {
        let listener = TcpListener::bind(config.addr).await?;
        let local_addr = listener.local_addr()?;
        let base_url = match &config.base_url {
            Some(url) => url.trim_end_matches('/').to_string(),
            None => {
                let mut advertised = local_addr;
                if advertised.ip().is_unspecified() {
                    advertised.set_ip(match advertised.ip() {
                        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
                    });
                }
                let scheme = if config.tls.is_some() { "https" } else { "http" };
                format!("{scheme}://{advertised}")
            }
        };
        let inner = Arc::new(Inner {
            runtime,
            config,
            base_url,
            local_addr,
            tokens: Mutex::new(HashMap::new()),
        });
        let stop = CancellationToken::new();
        tokio::spawn(accept_loop(inner.clone(), listener, stop.clone()));
        Ok(Self { inner, stop })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    /// Registers an exec session and returns its single-use URL.
    pub fn register_exec(&self, req: ExecRequest) -> Result<String, StreamError> {
        if req.cmd.is_empty() {
            return Err(StreamError::InvalidArgument("cmd must not be empty".into()));
        }
        validate_stdio(StdioFlags {
            stdin: req.stdin,
            stdout: req.stdout,
            stderr: req.stderr,
            tty: req.tty,
        })?;
        self.inner.register(Cached::Exec(req))
    }

    /// Registers an attach session and returns its single-use URL.
    pub fn register_attach(&self, req: AttachRequest) -> Result<String, StreamError> {
        validate_stdio(StdioFlags {
            stdin: req.stdin,
            stdout: req.stdout,
            stderr: req.stderr,
            tty: req.tty,
        })?;
        self.inner.register(Cached::Attach(req))
    }

    /// Registers a port-forward session and returns its single-use URL.
    pub fn register_portforward(&self, req: PortForwardRequest) -> Result<String, StreamError> {
        if let Some(bad) = req.ports.iter().find(|p| !(1..=65535).contains(*p)) {
            return Err(StreamError::InvalidArgument(format!("invalid port {bad}")));
        }
        self.inner.register(Cached::PortForward(req))
    }

    /// Stops accepting new connections.
    pub fn shutdown(&self) {
        self.stop.cancel();
    }
}

impl Drop for StreamingServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Inner {
    fn register(&self, req: Cached) -> Result<String, StreamError> {
        let mut raw = [0u8; 18];
        rand::rng().fill_bytes(&mut raw);
        let token = URL_SAFE_NO_PAD.encode(raw);
        let kind = req.kind();
        let now = Instant::now();
        let mut tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        tokens.retain(|_, (expires, _)| *expires > now);
        if tokens.len() >= self.config.max_pending {
            return Err(StreamError::ResourceExhausted);
        }
        tokens.insert(token.clone(), (now + self.config.token_ttl, req));
        Ok(format!("{}/{kind}/{token}", self.base_url))
    }

    /// Removes and returns the request for a token if it exists, is unexpired and matches the path kind.
    fn consume(&self, kind: &str, token: &str) -> Option<Cached> {
        let mut tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        let (expires, req) = tokens.remove(token)?;
        (expires > Instant::now() && req.kind() == kind).then_some(req)
    }

    fn handle(self: &Arc<Self>, mut req: Request<Incoming>) -> Response<Full<Bytes>> {
        if req.method() != Method::GET && req.method() != Method::POST {
            return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
        }
        let path = req.uri().path().trim_matches('/');
        let Some((kind, token)) = path.split_once('/') else {
            return text(StatusCode::NOT_FOUND, "not found");
        };
        if token.is_empty() || token.contains('/') {
            return text(StatusCode::NOT_FOUND, "not found");
        }
        let Some(cached) = self.consume(kind, token) else {
            return text(StatusCode::NOT_FOUND, "unknown or expired streaming token");
        };
        let on_upgrade = hyper::upgrade::on(&mut req);
        let headers = req.headers();
        match cached {
            Cached::Exec(r) => self.remotecommand(headers, on_upgrade, Command::Exec(r)),
            Cached::Attach(r) => self.remotecommand(headers, on_upgrade, Command::Attach(r)),
            Cached::PortForward(r) => self.portforward(headers, req.uri().query(), on_upgrade, r),
        }
    }

    fn remotecommand(
        self: &Arc<Self>,
        headers: &HeaderMap,
        on_upgrade: hyper::upgrade::OnUpgrade,
        cmd: Command,
    ) -> Response<Full<Bytes>> {
        let runtime = self.runtime.clone();
        if websocket::is_websocket_request(headers) {
            let offered = websocket::offered_protocols(headers);
            let (protocol, echo) = if offered.is_empty() {
                let legacy = WsProtocol {
                    name: "channel.k8s.io",
                    version: Protocol::V1,
                    encoding: Encoding::Binary,
                };
                (legacy, None)
            } else {
                match remotecommand::WS_PROTOCOLS
                    .into_iter()
                    .find(|p| offered.iter().any(|o| o == p.name))
                {
                    Some(p) => (p, Some(p.name)),
                    None => return text(StatusCode::FORBIDDEN, "unable to negotiate a websocket subprotocol"),
                }
            };
            let resp = match websocket::handshake_response(headers, echo) {
                Ok(resp) => resp,
                Err(msg) => return text(StatusCode::BAD_REQUEST, msg),
            };
            tracing::debug!(
                transport = "websocket",
                protocol = protocol.name,
                ?offered,
                "remotecommand upgrade"
            );
            tokio::spawn(async move {
                match on_upgrade.await {
                    Ok(upgraded) => {
                        let ws = websocket::server_socket(TokioIo::new(upgraded)).await;
                        let mux = ChannelMux::new(ws, protocol.encoding);
                        remotecommand::serve_websocket(mux, runtime, cmd, protocol).await;
                    }
                    Err(e) => tracing::debug!(error = %e, "websocket upgrade failed"),
                }
            });
            return resp;
        }
        if !is_spdy_request(headers) {
            return text(
                StatusCode::BAD_REQUEST,
                "unable to upgrade: missing upgrade headers in request",
            );
        }
        let offers: Vec<&str> = headers
            .get_all(PROTOCOL_VERSION_HEADER)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        let negotiated = match Protocol::negotiate(offers.iter().copied()) {
            Ok(p) => p,
            Err(_) => {
                let mut resp = text(
                    StatusCode::FORBIDDEN,
                    &format!(
                        "unable to upgrade: unable to negotiate protocol: client supports {offers:?}, server supports {:?}",
                        Protocol::ALL.map(Protocol::name)
                    ),
                );
                for p in Protocol::ALL {
                    resp.headers_mut()
                        .append(ACCEPTED_VERSIONS_HEADER, p.name().parse().expect("static name"));
                }
                return resp;
            }
        };
        let protocol = negotiated.unwrap_or(Protocol::V1);
        tracing::debug!(
            transport = "spdy",
            protocol = protocol.name(),
            ?offers,
            "remotecommand upgrade"
        );
        let timeout = self.config.stream_creation_timeout;
        let spdy = self.config.spdy.clone();
        tokio::spawn(async move {
            match on_upgrade.await {
                Ok(upgraded) => {
                    let session = Session::new(TokioIo::new(upgraded), Role::Server, spdy);
                    remotecommand::serve_spdy(session, runtime, cmd, protocol, timeout).await;
                }
                Err(e) => tracing::debug!(error = %e, "spdy upgrade failed"),
            }
        });
        spdy_switching(negotiated.map(Protocol::name))
    }

    fn portforward(
        self: &Arc<Self>,
        headers: &HeaderMap,
        query: Option<&str>,
        on_upgrade: hyper::upgrade::OnUpgrade,
        req: PortForwardRequest,
    ) -> Response<Full<Bytes>> {
        let runtime = self.runtime.clone();
        let timeout = self.config.stream_creation_timeout;
        let spdy = self.config.spdy.clone();
        if websocket::is_websocket_request(headers) {
            let offered = websocket::offered_protocols(headers);
            let (mode, echo) = if offered.is_empty() {
                (WsMode::Channels(Encoding::Binary), None)
            } else {
                match portforward::WS_PROTOCOLS
                    .into_iter()
                    .find(|(name, _)| offered.iter().any(|o| o == name))
                {
                    Some((name, mode)) => (mode, Some(name)),
                    None => return text(StatusCode::FORBIDDEN, "unable to negotiate a websocket subprotocol"),
                }
            };
            let ports = match mode {
                WsMode::Tunnel => Vec::new(),
                WsMode::Channels(_) => match query_ports(query, &req) {
                    Ok(ports) => ports,
                    Err(msg) => return text(StatusCode::BAD_REQUEST, &msg),
                },
            };
            let resp = match websocket::handshake_response(headers, echo) {
                Ok(resp) => resp,
                Err(msg) => return text(StatusCode::BAD_REQUEST, msg),
            };
            tracing::debug!(transport = "websocket", ?mode, ?offered, "port-forward upgrade");
            tokio::spawn(async move {
                let upgraded = match on_upgrade.await {
                    Ok(upgraded) => upgraded,
                    Err(e) => return tracing::debug!(error = %e, "websocket upgrade failed"),
                };
                let ws = websocket::server_socket(TokioIo::new(upgraded)).await;
                match mode {
                    WsMode::Tunnel => {
                        let session = Session::new(websocket::tunnel(ws), Role::Server, spdy);
                        portforward::serve_spdy(session, runtime, req, timeout).await;
                    }
                    WsMode::Channels(encoding) => {
                        portforward::serve_websocket(ChannelMux::new(ws, encoding), runtime, req, ports).await;
                    }
                }
            });
            return resp;
        }
        if !is_spdy_request(headers) {
            return text(
                StatusCode::BAD_REQUEST,
                "unable to upgrade: missing upgrade headers in request",
            );
        }
        let offers: Vec<&str> = headers
            .get_all(PROTOCOL_VERSION_HEADER)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .collect();
        if !offers.is_empty() && !offers.contains(&portforward::PROTOCOL) {
            let mut resp = text(
                StatusCode::FORBIDDEN,
                &format!(
                    "unable to upgrade: unable to negotiate protocol: client supports {offers:?}, server supports [{:?}]",
                    portforward::PROTOCOL
                ),
            );
            resp.headers_mut().append(
                ACCEPTED_VERSIONS_HEADER,
                portforward::PROTOCOL.parse().expect("static name"),
            );
            return resp;
        }
        let echo = (!offers.is_empty()).then_some(portforward::PROTOCOL);
        tracing::debug!(transport = "spdy", ?offers, "port-forward upgrade");
        tokio::spawn(async move {
            match on_upgrade.await {
                Ok(upgraded) => {
                    let session = Session::new(TokioIo::new(upgraded), Role::Server, spdy);
                    portforward::serve_spdy(session, runtime, req, timeout).await;
                }
                Err(e) => tracing::debug!(error = %e, "spdy upgrade failed"),
            }
        });
        spdy_switching(echo)
    }
}

/// Ports of a WebSocket port-forward request: `port` (or `ports`) query values, repeated and/or comma-separated;
/// without them the registered request's ports.
fn query_ports(query: Option<&str>, req: &PortForwardRequest) -> Result<Vec<u16>, String> {
    let mut ports = Vec::new();
    for pair in query.unwrap_or_default().split('&') {
        let Some((key, value)) = pair.split_once('=') else {
            continue;
        };
        if key != "port" && key != "ports" {
            continue;
        }
        let value = value.replace("%2C", ",").replace("%2c", ",");
        for p in value.split(',') {
            ports.push(portforward::parse_port(p).ok_or_else(|| format!("invalid port {p:?}"))?);
        }
    }
    if ports.is_empty() {
        ports = req.ports.iter().filter_map(|p| u16::try_from(*p).ok()).collect();
    }
    if ports.is_empty() {
        return Err("query parameter \"port\" is required".into());
    }
    if ports.len() > portforward::MAX_WS_PORTS {
        return Err(format!("at most {} ports per connection", portforward::MAX_WS_PORTS));
    }
    if let Some(p) = ports.iter().find(|p| !portforward::port_allowed(req, **p)) {
        return Err(format!("port {p} is not allowed"));
    }
    Ok(ports)
}

fn is_spdy_request(headers: &HeaderMap) -> bool {
    let upgrade = headers
        .get_all(UPGRADE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.to_ascii_lowercase().contains("spdy/3.1"));
    let connection = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.to_ascii_lowercase().contains("upgrade"));
    upgrade && connection
}

fn spdy_switching(protocol: Option<&str>) -> Response<Full<Bytes>> {
    let mut resp = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(CONNECTION, "Upgrade")
        .header(UPGRADE, "SPDY/3.1");
    if let Some(p) = protocol {
        resp = resp.header(PROTOCOL_VERSION_HEADER, p);
    }
    resp.body(Full::default()).unwrap_or_default()
}

fn text(status: StatusCode, msg: &str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(format!("{msg}\n"))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        "text/plain; charset=utf-8".parse().expect("static value"),
    );
    resp
}

async fn accept_loop(inner: Arc<Inner>, listener: TcpListener, stop: CancellationToken) {
    loop {
        let (tcp, _) = tokio::select! {
            _ = stop.cancelled() => return,
            res = listener.accept() => match res {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!(error = %e, "streaming server accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        tokio::spawn(serve_connection(inner.clone(), tcp));
    }
}

async fn serve_connection(inner: Arc<Inner>, tcp: TcpStream) {
    let _ = tcp.set_nodelay(true);
    match inner.config.tls.clone() {
        Some(tls) => match tokio_rustls::TlsAcceptor::from(tls).accept(tcp).await {
            Ok(stream) => serve_http(inner, stream).await,
            Err(e) => tracing::debug!(error = %e, "streaming TLS handshake failed"),
        },
        None => serve_http(inner, tcp).await,
    }
}

async fn serve_http<S>(inner: Arc<Inner>, stream: S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| {
        let inner = inner.clone();
        async move { Ok::<_, Infallible>(inner.handle(req)) }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30))
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    if let Err(e) = conn.await {
        tracing::debug!(error = %e, "streaming http connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_come_from_query_or_request() {
        let any = PortForwardRequest::default();
        assert_eq!(query_ports(Some("port=80&port=443"), &any), Ok(vec![80, 443]));
        assert_eq!(query_ports(Some("ports=80%2C81,82"), &any), Ok(vec![80, 81, 82]));
        assert!(query_ports(Some("port=0"), &any).is_err());
        assert!(query_ports(None, &any).is_err());
        let only = PortForwardRequest {
            pod_sandbox_id: "p".into(),
            ports: vec![8080],
        };
        assert_eq!(query_ports(None, &only), Ok(vec![8080]));
        assert!(query_ports(Some("port=22"), &only).is_err());
    }
}
