//! A reverse proxy in front of a registry that adds auth (basic or the Docker
//! bearer-token flow), counts requests, throttles blob downloads and injects
//! failures.

use std::collections::HashSet;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use base64::prelude::*;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use reqwest::Url;
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Body = BoxBody<Bytes, BoxError>;

/// Service name in bearer challenges and token requests.
pub const SERVICE: &str = "test-registry";

#[derive(Clone, Debug, Default)]
pub enum ProxyAuth {
    #[default]
    None,
    /// `401 WWW-Authenticate: Basic realm="test"` without these credentials.
    Basic { user: String, pass: String },
    /// Docker token flow: `/token` trades these credentials (or a refresh
    /// token) for a bearer token.
    Bearer { user: String, pass: String },
}

#[derive(Clone, Debug, Default)]
pub struct ProxyOptions {
    pub auth: ProxyAuth,
    /// Bearer mode: accepted as `Authorization: Bearer` without a token
    /// exchange (CRI `AuthConfig.registry_token`).
    pub registry_token: Option<String>,
    /// Bearer mode: accepted as `refresh_token` by `POST /token`
    /// (CRI `AuthConfig.identity_token`).
    pub identity_token: Option<String>,
    /// Throttle blob GET bodies to this rate; see [`Proxy::set_bytes_per_sec`].
    pub bytes_per_sec: Option<u64>,
}

/// One request as seen by the proxy.
#[derive(Clone, Debug)]
pub struct LoggedRequest {
    /// `METHOD /path?query`
    pub line: String,
    pub status: u16,
    /// Got past auth and failure injection (forwarded, or a token issued).
    pub passed: bool,
}

/// The proxy server; stops (with all its connections) on drop.
pub struct Proxy {
    host: String,
    state: Arc<State>,
    server: JoinHandle<()>,
}

struct Failure {
    needle: String,
    remaining: usize,
    status: StatusCode,
}

struct State {
    upstream: String,
    base: String,
    opts: ProxyOptions,
    http: reqwest::Client,
    /// 0: unthrottled.
    bytes_per_sec: Arc<AtomicU64>,
    log: Mutex<Vec<LoggedRequest>>,
    tokens: Mutex<HashSet<String>>,
    refresh_tokens: Mutex<HashSet<String>>,
    failures: Mutex<Vec<Failure>>,
    issued: AtomicU64,
}

impl Proxy {
    /// A pass-through proxy (no auth, no throttling) to `upstream` ("http://host:port").
    pub async fn start(upstream: &str) -> Proxy {
        Self::start_with(upstream, ProxyOptions::default()).await
    }

    pub async fn start_with(upstream: &str, opts: ProxyOptions) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy listener");
        let addr = listener.local_addr().expect("proxy local_addr");
        let state = Arc::new(State {
            upstream: upstream.trim_end_matches('/').to_owned(),
            base: format!("http://{addr}"),
            bytes_per_sec: Arc::new(AtomicU64::new(opts.bytes_per_sec.unwrap_or(0))),
            opts,
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .expect("proxy http client"),
            log: Mutex::default(),
            tokens: Mutex::default(),
            refresh_tokens: Mutex::default(),
            failures: Mutex::default(),
            issued: AtomicU64::new(0),
        });
        let server = tokio::spawn(serve(listener, state.clone()));
        Proxy {
            host: addr.to_string(),
            state,
            server,
        }
    }

    /// "http://127.0.0.1:PORT"
    pub fn url(&self) -> String {
        self.state.base.clone()
    }

    /// "127.0.0.1:PORT"
    pub fn host(&self) -> &str {
        &self.host
    }

    /// How many requests whose `METHOD /path?query` contains `needle` got past
    /// auth and failure injection, e.g. `count("GET /v2/app/blobs/sha256:..")`.
    pub fn count(&self, needle: &str) -> usize {
        let log = self.state.log.lock().unwrap();
        log.iter().filter(|r| r.passed && r.line.contains(needle)).count()
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<LoggedRequest> {
        self.state.log.lock().unwrap().clone()
    }

    /// The next `n` authorized requests get `status` instead of being forwarded.
    pub fn fail_next(&self, n: usize, status: u16) {
        self.fail_next_matching("", n, status);
    }

    /// Like [`Proxy::fail_next`], only for requests whose line contains `needle`.
    pub fn fail_next_matching(&self, needle: &str, n: usize, status: u16) {
        self.state.failures.lock().unwrap().push(Failure {
            needle: needle.into(),
            remaining: n,
            status: StatusCode::from_u16(status).expect("valid status"),
        });
    }

    /// Throttles blob GET bodies (also ones already streaming); `None` lifts it.
    pub fn set_bytes_per_sec(&self, rate: Option<u64>) {
        self.state.bytes_per_sec.store(rate.unwrap_or(0), Ordering::Relaxed);
    }

    /// Invalidates every issued bearer token, as if they had expired.
    pub fn expire_tokens(&self) {
        self.state.tokens.lock().unwrap().clear();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn serve(listener: TcpListener, state: Arc<State>) {
    // Owning the connections here means aborting this task closes them all.
    let mut conns = JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        while conns.try_join_next().is_some() {}
        let state = state.clone();
        conns.spawn(async move {
            let svc = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(state.handle(req).await) }
            });
            let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

impl State {
    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let line = format!("{} {}", req.method(), req.uri());
        let (resp, passed) = self.route(req, &line).await;
        self.log.lock().unwrap().push(LoggedRequest {
            line,
            status: resp.status().as_u16(),
            passed,
        });
        resp
    }

    async fn route(&self, req: Request<Incoming>, line: &str) -> (Response<Body>, bool) {
        if let ProxyAuth::Bearer { user, pass } = &self.opts.auth
            && req.uri().path() == "/token"
        {
            return self.token(req, user, pass).await;
        }
        if !self.authorized(req.headers()) {
            return (self.challenge(req.method(), req.uri().path()), false);
        }
        let failure = self
            .failures
            .lock()
            .unwrap()
            .iter_mut()
            .find(|f| f.remaining > 0 && line.contains(&f.needle))
            .map(|f| {
                f.remaining -= 1;
                f.status
            });
        if let Some(status) = failure {
            return (error(status, "UNAVAILABLE", "injected failure"), false);
        }
        (self.forward(req).await, true)
    }

    fn authorized(&self, headers: &HeaderMap) -> bool {
        match &self.opts.auth {
            ProxyAuth::None => true,
            ProxyAuth::Basic { user, pass } => {
                basic_credentials(headers).is_some_and(|(u, p)| &u == user && &p == pass)
            }
            ProxyAuth::Bearer { .. } => {
                let Some(token) = authorization(headers, "Bearer ") else {
                    return false;
                };
                self.opts.registry_token.as_deref() == Some(token) || self.tokens.lock().unwrap().contains(token)
            }
        }
    }

    fn challenge(&self, method: &Method, path: &str) -> Response<Body> {
        let value = match &self.opts.auth {
            ProxyAuth::Bearer { .. } => {
                let mut v = format!(r#"Bearer realm="{}/token",service="{SERVICE}""#, self.base);
                if let Some(scope) = scope(method, path) {
                    v.push_str(&format!(r#",scope="{scope}""#));
                }
                v
            }
            _ => r#"Basic realm="test""#.into(),
        };
        let mut resp = error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", "authentication required");
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_str(&value).expect("challenge header"),
        );
        resp
    }

    /// `GET /token` with basic credentials, or `POST /token` with form
    /// `grant_type=password` / `grant_type=refresh_token`.
    async fn token(&self, req: Request<Incoming>, user: &str, pass: &str) -> (Response<Body>, bool) {
        let (parts, body) = req.into_parts();
        let mut params = form_pairs(parts.uri.query().unwrap_or(""));
        if parts.method == Method::POST {
            let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            params.extend(form_pairs(&String::from_utf8_lossy(&body)));
        }
        let param = |name: &str| params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
        let (valid, offline) = match (&parts.method, param("grant_type")) {
            (&Method::POST, Some("password")) => {
                (param("username") == Some(user) && param("password") == Some(pass), true)
            }
            (&Method::POST, Some("refresh_token")) => {
                let valid = param("refresh_token").is_some_and(|t| {
                    self.opts.identity_token.as_deref() == Some(t) || self.refresh_tokens.lock().unwrap().contains(t)
                });
                (valid, true)
            }
            (&Method::GET, _) => {
                let valid = basic_credentials(&parts.headers).is_some_and(|(u, p)| u == user && p == pass);
                (valid, param("offline_token") == Some("true"))
            }
            _ => (false, false),
        };
        if !valid {
            let resp = error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", "authentication required");
            return (resp, false);
        }
        let token = self.new_token();
        self.tokens.lock().unwrap().insert(token.clone());
        let mut body = json!({"token": token, "access_token": token, "expires_in": 300});
        if offline {
            let refresh = match param("refresh_token") {
                Some(t) => t.to_owned(),
                None => self.new_token(),
            };
            self.refresh_tokens.lock().unwrap().insert(refresh.clone());
            body["refresh_token"] = json!(refresh);
        }
        (json_response(StatusCode::OK, &body), true)
    }

    fn new_token(&self) -> String {
        let n = self.issued.fetch_add(1, Ordering::Relaxed);
        hex::encode(Sha256::digest(format!("{}/{n}", self.base)))
    }

    async fn forward(&self, req: Request<Incoming>) -> Response<Body> {
        let (parts, body) = req.into_parts();
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let mut headers = parts.headers;
        strip_hop_by_hop(&mut headers);
        headers.remove(header::HOST);
        if !matches!(self.opts.auth, ProxyAuth::None) {
            // The proxy did the auth; the registry behind it is anonymous.
            headers.remove(header::AUTHORIZATION);
        }
        let sent = self
            .http
            .request(parts.method.clone(), format!("{}{path}", self.upstream))
            .headers(headers)
            .body(reqwest::Body::wrap(body))
            .send()
            .await;
        let upstream = match sent {
            Ok(upstream) => upstream,
            Err(e) => return error(StatusCode::BAD_GATEWAY, "UNAVAILABLE", &e.to_string()),
        };
        let mut resp = Response::builder().status(upstream.status());
        for (name, value) in upstream.headers() {
            if name == header::LOCATION {
                // Upload URLs must come back through the proxy.
                let location = value.to_str().unwrap_or_default();
                let rewritten = location.replacen(&self.upstream, &self.base, 1);
                resp = resp.header(name, rewritten);
            } else if !is_hop_by_hop(name.as_str()) {
                resp = resp.header(name, value);
            }
        }
        let throttled = parts.method == Method::GET && parts.uri.path().contains("/blobs/sha256:");
        let (tx, rx) = mpsc::channel(1);
        tokio::spawn(pump(upstream, tx, throttled.then(|| self.bytes_per_sec.clone())));
        resp.body(ChannelBody(rx).boxed()).expect("proxy response")
    }
}

/// Copies the upstream body into the response, pacing it at `rate` bytes/s
/// (re-read per slice, 0 = unlimited). Ends when the client goes away.
async fn pump(
    mut upstream: reqwest::Response,
    tx: mpsc::Sender<Result<Bytes, BoxError>>,
    rate: Option<Arc<AtomicU64>>,
) {
    loop {
        let mut chunk = match upstream.chunk().await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => return,
            Err(e) => {
                let _ = tx.send(Err(e.into())).await;
                return;
            }
        };
        while !chunk.is_empty() {
            let rate = rate.as_ref().map_or(0, |r| r.load(Ordering::Relaxed));
            // About 20 slices per second when throttled.
            let len = if rate == 0 {
                chunk.len()
            } else {
                chunk.len().min((rate / 20).max(1) as usize)
            };
            if tx.send(Ok(chunk.split_to(len))).await.is_err() {
                return;
            }
            if rate > 0 {
                tokio::time::sleep(Duration::from_secs_f64(len as f64 / rate as f64)).await;
            }
        }
    }
}

/// A response body fed by [`pump`]; hyper frames it by the Content-Length header.
struct ChannelBody(mpsc::Receiver<Result<Bytes, BoxError>>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.0.poll_recv(cx).map(|chunk| chunk.map(|r| r.map(Frame::data)))
    }
}

/// A registry-style error: `{"errors":[{"code":..,"message":..}]}`.
fn error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    json_response(
        status,
        &json!({"errors": [{"code": code, "message": message, "detail": null}]}),
    )
}

fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<Body> {
    let body = Full::new(Bytes::from(body.to_string()))
        .map_err(|never| match never {})
        .boxed();
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .header("docker-distribution-api-version", "registry/2.0")
        .body(body)
        .expect("json response")
}

fn authorization<'a>(headers: &'a HeaderMap, scheme: &str) -> Option<&'a str> {
    headers.get(header::AUTHORIZATION)?.to_str().ok()?.strip_prefix(scheme)
}

fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let decoded = BASE64_STANDARD.decode(authorization(headers, "Basic ")?).ok()?;
    let (user, pass) = std::str::from_utf8(&decoded).ok()?.split_once(':')?;
    Some((user.into(), pass.into()))
}

/// `repository:<name>:pull` (or `pull,push` for writes) for a `/v2/<name>/...` path.
fn scope(method: &Method, path: &str) -> Option<String> {
    let rest = path.strip_prefix("/v2/")?;
    let end = ["/blobs/", "/manifests/", "/tags/"]
        .iter()
        .filter_map(|m| rest.rfind(m))
        .max()?;
    let actions = if matches!(*method, Method::GET | Method::HEAD) {
        "pull"
    } else {
        "pull,push"
    };
    Some(format!("repository:{}:{actions}", &rest[..end]))
}

fn form_pairs(encoded: &str) -> Vec<(String, String)> {
    let url = Url::parse(&format!("http://form/?{encoded}")).expect("form url");
    url.query_pairs().into_owned().collect()
}

fn is_hop_by_hop(name: &str) -> bool {
    matches!(
        name,
        "connection" | "keep-alive" | "proxy-connection" | "transfer-encoding" | "te" | "trailer" | "upgrade"
    )
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let names: Vec<_> = headers.keys().filter(|n| is_hop_by_hop(n.as_str())).cloned().collect();
    for name in names {
        headers.remove(name);
    }
}
