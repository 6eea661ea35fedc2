//! A typed Kubernetes API client over HTTPS (bearer token, cluster CA), used by
//! the scheduler, the controllers and the node agent. They talk to the API
//! server exactly as remote components would, so a node agent on another
//! machine runs the same code.

use std::pin::Pin;
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Status, WatchEvent};
use k8s_openapi::{ListableResource, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with a `Status` error.
    #[error("{code} {reason}: {message}")]
    Api { code: u16, reason: String, message: String },
    #[error("talking to the API server: {0}")]
    Transport(#[from] reqwest::Error),
    #[error("decoding the API server's answer: {0}")]
    Decode(#[from] serde_json::Error),
    #[error("{0}")]
    Config(String),
}

impl ClientError {
    pub fn code(&self) -> Option<u16> {
        match self {
            ClientError::Api { code, .. } => Some(*code),
            _ => None,
        }
    }
    pub fn is_not_found(&self) -> bool {
        self.code() == Some(404)
    }
    pub fn is_conflict(&self) -> bool {
        self.code() == Some(409)
    }
    pub fn is_gone(&self) -> bool {
        self.code() == Some(410)
    }
}

pub type Result<T> = std::result::Result<T, ClientError>;

/// List and watch filters.
#[derive(Clone, Debug, Default)]
pub struct ListParams {
    pub label_selector: Option<String>,
    pub field_selector: Option<String>,
}

impl ListParams {
    pub fn fields(selector: impl Into<String>) -> Self {
        ListParams {
            field_selector: Some(selector.into()),
            ..Default::default()
        }
    }

    fn query(&self, out: &mut Vec<(&'static str, String)>) {
        if let Some(s) = &self.label_selector {
            out.push(("labelSelector", s.clone()));
        }
        if let Some(s) = &self.field_selector {
            out.push(("fieldSelector", s.clone()));
        }
    }
}

/// A list's items and the resourceVersion to watch from.
pub struct ObjectList<K> {
    pub items: Vec<K>,
    pub resource_version: String,
}

pub type WatchStream<K> = Pin<Box<dyn Stream<Item = Result<WatchEvent<K>>> + Send>>;

#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Client {
    pub fn new(base_url: &str, ca_pem: &str, token: &str) -> Result<Self> {
        let ca = reqwest::Certificate::from_pem(ca_pem.as_bytes())?;
        let http = reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(ca)
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(90))
            .build()?;
        Ok(Client {
            http,
            base: base_url.trim_end_matches('/').to_string(),
            token: token.to_string(),
        })
    }

    /// Reads server, CA and token from a kubeconfig written by `podvisor up`.
    pub fn from_kubeconfig(path: &std::path::Path) -> Result<Self> {
        use base64::Engine;
        let text = std::fs::read_to_string(path)
            .map_err(|e| ClientError::Config(format!("reading {}: {e}", path.display())))?;
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.trim().strip_prefix(name).map(|v| v.trim().to_string()))
                .ok_or_else(|| ClientError::Config(format!("{} has no {name}", path.display())))
        };
        let server = field("server:")?;
        let token = field("token:")?;
        let ca = base64::engine::general_purpose::STANDARD
            .decode(field("certificate-authority-data:")?)
            .map_err(|e| ClientError::Config(format!("bad CA data: {e}")))?;
        Self::new(&server, &String::from_utf8_lossy(&ca), &token)
    }

    /// The bearer token this client presents.
    pub fn token(&self) -> &str {
        &self.token
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// The collection path of `K`, e.g. `/api/v1/namespaces/default/pods`.
    pub fn collection_path<K: Resource>(namespace: Option<&str>) -> String {
        let prefix = if K::GROUP.is_empty() {
            format!("/api/{}", K::VERSION)
        } else {
            format!("/apis/{}/{}", K::GROUP, K::VERSION)
        };
        match namespace {
            Some(ns) => format!("{prefix}/namespaces/{ns}/{}", K::URL_PATH_SEGMENT),
            None => format!("{prefix}/{}", K::URL_PATH_SEGMENT),
        }
    }

    fn object_path<K: Resource>(namespace: Option<&str>, name: &str) -> String {
        format!("{}/{name}", Self::collection_path::<K>(namespace))
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .header("Accept", "application/json")
    }

    async fn send<T: DeserializeOwned>(&self, request: reqwest::RequestBuilder) -> Result<T> {
        let response = request.send().await?;
        let status = response.status();
        let body = response.bytes().await?;
        if !status.is_success() {
            return Err(api_error(status.as_u16(), &body));
        }
        Ok(serde_json::from_slice(&body)?)
    }

    pub async fn get<K: Resource + DeserializeOwned>(&self, namespace: Option<&str>, name: &str) -> Result<K> {
        self.send(self.request(reqwest::Method::GET, &Self::object_path::<K>(namespace, name)))
            .await
    }

    /// `get`, with a missing object as `None`.
    pub async fn get_opt<K: Resource + DeserializeOwned>(
        &self,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Option<K>> {
        match self.get(namespace, name).await {
            Ok(object) => Ok(Some(object)),
            Err(err) if err.is_not_found() => Ok(None),
            Err(err) => Err(err),
        }
    }

    pub async fn list<K: ListableResource + DeserializeOwned>(
        &self,
        namespace: Option<&str>,
        params: &ListParams,
    ) -> Result<ObjectList<K>> {
        let mut query = Vec::new();
        params.query(&mut query);
        let value: Value = self
            .send(
                self.request(reqwest::Method::GET, &Self::collection_path::<K>(namespace))
                    .query(&query),
            )
            .await?;
        let resource_version = value
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let items = match value.get("items") {
            Some(Value::Array(items)) => items
                .iter()
                .map(|item| serde_json::from_value(item.clone()))
                .collect::<std::result::Result<_, _>>()?,
            _ => Vec::new(),
        };
        Ok(ObjectList {
            items,
            resource_version,
        })
    }

    /// Watches from `resource_version` (with bookmarks). The stream ends when the
    /// server closes it; a 410 error means: list again.
    pub async fn watch<K: Resource + DeserializeOwned + Send + 'static>(
        &self,
        namespace: Option<&str>,
        params: &ListParams,
        resource_version: &str,
        timeout_seconds: u32,
    ) -> Result<WatchStream<K>> {
        let mut query = vec![
            ("watch", "true".to_string()),
            ("allowWatchBookmarks", "true".to_string()),
            ("resourceVersion", resource_version.to_string()),
            ("timeoutSeconds", timeout_seconds.to_string()),
        ];
        params.query(&mut query);
        let response = self
            .request(reqwest::Method::GET, &Self::collection_path::<K>(namespace))
            .query(&query)
            .send()
            .await?;
        let status = response.status();
        if !status.is_success() {
            let body = response.bytes().await?;
            return Err(api_error(status.as_u16(), &body));
        }
        let bytes = response.bytes_stream();
        let lines = futures_util::stream::unfold((bytes, Vec::<u8>::new()), |(mut bytes, mut buffer)| async move {
            loop {
                if let Some(end) = buffer.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buffer.drain(..=end).collect();
                    if line.iter().all(u8::is_ascii_whitespace) {
                        continue;
                    }
                    return Some((Ok(line), (bytes, buffer)));
                }
                match bytes.next().await {
                    Some(Ok(chunk)) => buffer.extend_from_slice(&chunk),
                    Some(Err(err)) => return Some((Err(ClientError::from(err)), (bytes, buffer))),
                    None if buffer.iter().all(u8::is_ascii_whitespace) => return None,
                    None => return Some((Ok(std::mem::take(&mut buffer)), (bytes, buffer))),
                }
            }
        });
        Ok(Box::pin(lines.map(|line| {
            let line = line?;
            let event: WatchEvent<K> = serde_json::from_slice(&line)?;
            match &event {
                WatchEvent::ErrorStatus(status) => return Err(status_error(status)),
                WatchEvent::ErrorOther(_) => {
                    return Err(ClientError::Api {
                        code: 500,
                        reason: "InternalError".into(),
                        message: "watch error".into(),
                    });
                }
                _ => {}
            }
            Ok(event)
        })))
    }

    pub async fn create<K: Resource + Serialize + DeserializeOwned>(
        &self,
        namespace: Option<&str>,
        object: &K,
    ) -> Result<K> {
        self.send(
            self.request(reqwest::Method::POST, &Self::collection_path::<K>(namespace))
                .json(object),
        )
        .await
    }

    /// PUT: fails with 409 when `object`'s resourceVersion is stale.
    pub async fn replace<K: Resource + Serialize + DeserializeOwned>(
        &self,
        namespace: Option<&str>,
        name: &str,
        object: &K,
    ) -> Result<K> {
        self.send(
            self.request(reqwest::Method::PUT, &Self::object_path::<K>(namespace, name))
                .json(object),
        )
        .await
    }

    /// PUT on the status subresource.
    pub async fn replace_status<K: Resource + Serialize + DeserializeOwned>(
        &self,
        namespace: Option<&str>,
        name: &str,
        object: &K,
    ) -> Result<K> {
        let path = format!("{}/status", Self::object_path::<K>(namespace, name));
        self.send(self.request(reqwest::Method::PUT, &path).json(object)).await
    }

    /// JSON merge patch, on the object or on a subresource (e.g. `status`).
    pub async fn merge_patch<K: Resource + DeserializeOwned>(
        &self,
        namespace: Option<&str>,
        name: &str,
        subresource: Option<&str>,
        patch: &Value,
    ) -> Result<K> {
        let mut path = Self::object_path::<K>(namespace, name);
        if let Some(sub) = subresource {
            path = format!("{path}/{sub}");
        }
        self.send(
            self.request(reqwest::Method::PATCH, &path)
                .header("Content-Type", "application/merge-patch+json")
                .body(serde_json::to_vec(patch)?),
        )
        .await
    }

    /// POST to a subresource, e.g. a pod's `binding` or `eviction`.
    pub async fn create_subresource<K: Resource>(
        &self,
        namespace: Option<&str>,
        name: &str,
        subresource: &str,
        body: &Value,
    ) -> Result<Value> {
        let path = format!("{}/{subresource}", Self::object_path::<K>(namespace, name));
        self.send(self.request(reqwest::Method::POST, &path).json(body)).await
    }

    /// DELETE; `grace_seconds` Some(0) deletes at once. A missing object is not an error.
    pub async fn delete<K: Resource>(
        &self,
        namespace: Option<&str>,
        name: &str,
        grace_seconds: Option<i64>,
    ) -> Result<()> {
        let mut body = serde_json::json!({"kind": "DeleteOptions", "apiVersion": "v1"});
        if let Some(grace) = grace_seconds {
            body["gracePeriodSeconds"] = grace.into();
        }
        let request = self
            .request(reqwest::Method::DELETE, &Self::object_path::<K>(namespace, name))
            .json(&body);
        match self.send::<Value>(request).await {
            Ok(_) => Ok(()),
            Err(err) if err.is_not_found() => Ok(()),
            Err(err) => Err(err),
        }
    }
}

fn api_error(code: u16, body: &[u8]) -> ClientError {
    match serde_json::from_slice::<Status>(body) {
        Ok(status) => ClientError::Api {
            code,
            reason: status.reason.unwrap_or_default(),
            message: status.message.unwrap_or_default(),
        },
        Err(_) => ClientError::Api {
            code,
            reason: String::new(),
            message: String::from_utf8_lossy(body).into_owned(),
        },
    }
}

fn status_error(status: &Status) -> ClientError {
    ClientError::Api {
        code: status.code.unwrap_or(500) as u16,
        reason: status.reason.clone().unwrap_or_default(),
        message: status.message.clone().unwrap_or_default(),
    }
}
