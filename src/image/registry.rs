//! A client for the OCI distribution API (Docker Registry v2): endpoint choice
//! (mirrors, plain HTTP), the Basic and Bearer token flows, retries with backoff,
//! and verified manifest fetches. Blob bodies are streamed to the caller.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use sha2::{Digest, Sha256};

use super::auth::{Challenge, Credentials, Keychain};
use super::reference::{Reference, is_valid_digest};
use crate::config::RegistryConfig;

pub const MEDIA_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const MEDIA_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";
const MAX_MANIFEST_BYTES: usize = 4 << 20;
const USER_AGENT: &str = concat!("podvisor/", env!("CARGO_PKG_VERSION"));

/// One place an image can be fetched from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// `https://registry-1.docker.io` or a mirror's URL, without trailing slash.
    pub base: String,
    /// The host used to pick credentials and cache tokens.
    pub host: String,
    pub is_mirror: bool,
    skip_tls_verify: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("registry {url} is unreachable")]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{what} not found at {host}: {message}")]
    NotFound {
        what: String,
        host: String,
        message: String,
    },
    #[error("{host} refused access to {what}: {message}")]
    Unauthorized {
        what: String,
        host: String,
        message: String,
    },
    #[error("{host} answered {status} for {what}: {message}")]
    Status {
        what: String,
        host: String,
        status: u16,
        message: String,
    },
    #[error("{what} failed verification: expected {expected}, got {actual}")]
    Mismatch {
        what: String,
        expected: String,
        actual: String,
    },
    #[error("{what}: {reason}")]
    Invalid { what: String, reason: String },
}

impl RegistryError {
    fn rank(&self) -> u8 {
        match self {
            RegistryError::Unreachable { .. } => 0,
            RegistryError::Status { .. } => 1,
            RegistryError::NotFound { .. } => 2,
            RegistryError::Unauthorized { .. } => 3,
            RegistryError::Mismatch { .. } | RegistryError::Invalid { .. } => 4,
        }
    }

    /// Whether another endpoint (the next mirror or the origin) may do better.
    fn try_next_endpoint(&self) -> bool {
        !matches!(self, RegistryError::Mismatch { .. } | RegistryError::Invalid { .. })
    }
}

/// A manifest or index as fetched, verified against its digest.
#[derive(Clone, Debug)]
pub struct FetchedManifest {
    pub digest: String,
    pub media_type: String,
    pub bytes: Vec<u8>,
}

/// (host, scope, credentials fingerprint): what an Authorization header is good for.
type AuthKey = (String, String, String);

struct CachedAuth {
    header: String,
    expires: Instant,
}

pub struct RegistryClient {
    config: RegistryConfig,
    verified: reqwest::Client,
    unverified: reqwest::Client,
    auth_cache: Mutex<HashMap<AuthKey, CachedAuth>>,
}

impl RegistryClient {
    pub fn new(config: RegistryConfig) -> Result<RegistryClient, reqwest::Error> {
        let build = |skip_verify: bool| {
            reqwest::Client::builder()
                .user_agent(USER_AGENT)
                .connect_timeout(Duration::from_secs(10))
                .read_timeout(Duration::from_secs(config.timeout_seconds))
                .danger_accept_invalid_certs(skip_verify)
                .build()
        };
        Ok(RegistryClient {
            verified: build(false)?,
            unverified: build(true)?,
            config,
            auth_cache: Mutex::new(HashMap::new()),
        })
    }

    /// Where to look for `registry`'s images, in order: its mirrors, then the
    /// registry itself (plain HTTP for loopback hosts; HTTPS then HTTP for insecure ones).
    pub fn endpoints(&self, registry: &str) -> Vec<Endpoint> {
        let mut endpoints: Vec<Endpoint> = self
            .config
            .mirrors
            .get(registry)
            .into_iter()
            .flatten()
            .map(|url| {
                let base = url.trim_end_matches('/').to_string();
                let host = super::auth::normalize_host(&base);
                Endpoint {
                    skip_tls_verify: self.is_insecure(&host),
                    base,
                    host,
                    is_mirror: true,
                }
            })
            .collect();
        let api_host = if registry == super::reference::DEFAULT_REGISTRY {
            "registry-1.docker.io"
        } else {
            registry
        };
        let origin = |scheme: &str, skip_tls_verify| Endpoint {
            base: format!("{scheme}://{api_host}"),
            host: registry.to_string(),
            is_mirror: false,
            skip_tls_verify,
        };
        if is_loopback_host(registry) {
            endpoints.push(origin("http", false));
        } else if self.is_insecure(registry) {
            endpoints.push(origin("https", true));
            endpoints.push(origin("http", false));
        } else {
            endpoints.push(origin("https", false));
        }
        endpoints
    }

    fn is_insecure(&self, host: &str) -> bool {
        self.config.insecure.iter().any(|h| h == host)
    }

    /// Resolves `reference` to its top-level manifest (possibly an index), trying
    /// each endpoint in order. Returns the endpoint that answered with it.
    pub async fn fetch_top_manifest(
        &self,
        reference: &Reference,
        keychain: &Keychain,
    ) -> Result<(Endpoint, FetchedManifest), RegistryError> {
        let endpoints = self.endpoints(&reference.registry);
        let mut last_error = None;
        for endpoint in endpoints {
            match self
                .fetch_manifest(
                    &endpoint,
                    &reference.repository,
                    reference.manifest_reference(),
                    keychain,
                )
                .await
            {
                Ok(manifest) => return Ok((endpoint, manifest)),
                Err(err) if err.try_next_endpoint() => {
                    // Keep the most telling answer: a registry's "not found" or
                    // "denied" says more than another one being unreachable.
                    if last_error
                        .as_ref()
                        .is_some_and(|last: &RegistryError| last.rank() > err.rank())
                    {
                        continue;
                    }
                    tracing::debug!(endpoint = %endpoint.base, error = %err, "endpoint failed, trying the next");
                    last_error = Some(err);
                }
                Err(err) => return Err(err),
            }
        }
        Err(last_error.expect("there is always at least the origin endpoint"))
    }

    /// Fetches one manifest by tag or digest and verifies it.
    pub async fn fetch_manifest(
        &self,
        endpoint: &Endpoint,
        repository: &str,
        tag_or_digest: &str,
        keychain: &Keychain,
    ) -> Result<FetchedManifest, RegistryError> {
        let separator = if is_valid_digest(tag_or_digest) { '@' } else { ':' };
        let what = format!("manifest {repository}{separator}{tag_or_digest}");
        let path = format!("manifests/{tag_or_digest}");
        let response = self
            .get(endpoint, repository, &path, Some(MANIFEST_ACCEPT), keychain, &what)
            .await?;
        let header_type = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or(v).trim().to_string());
        if response
            .content_length()
            .is_some_and(|len| len as usize > MAX_MANIFEST_BYTES)
        {
            return Err(invalid(&what, "manifest is larger than 4 MiB"));
        }
        let bytes = response.bytes().await.map_err(|source| RegistryError::Unreachable {
            url: endpoint.base.clone(),
            source,
        })?;
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(invalid(&what, "manifest is larger than 4 MiB"));
        }
        let digest = sha256_digest(&bytes);
        if is_valid_digest(tag_or_digest) && digest != tag_or_digest {
            return Err(RegistryError::Mismatch {
                what,
                expected: tag_or_digest.to_string(),
                actual: digest,
            });
        }
        let media_type = manifest_media_type(&bytes)
            .or(header_type)
            .ok_or_else(|| invalid(&what, "no media type in manifest or Content-Type"))?;
        Ok(FetchedManifest {
            digest,
            media_type,
            bytes: bytes.to_vec(),
        })
    }

    /// Starts downloading a blob; the caller streams and verifies the body.
    pub async fn fetch_blob(
        &self,
        endpoint: &Endpoint,
        repository: &str,
        digest: &str,
        keychain: &Keychain,
    ) -> Result<reqwest::Response, RegistryError> {
        let what = format!("blob {digest}");
        self.get(endpoint, repository, &format!("blobs/{digest}"), None, keychain, &what)
            .await
    }

    /// Fetches a small blob (a config) fully and verifies digest and size.
    pub async fn fetch_small_blob(
        &self,
        endpoint: &Endpoint,
        repository: &str,
        digest: &str,
        size: u64,
        keychain: &Keychain,
    ) -> Result<Vec<u8>, RegistryError> {
        let what = format!("blob {digest}");
        if size as usize > MAX_MANIFEST_BYTES {
            return Err(invalid(&what, "config blob is larger than 4 MiB"));
        }
        let response = self.fetch_blob(endpoint, repository, digest, keychain).await?;
        let bytes = response.bytes().await.map_err(|source| RegistryError::Unreachable {
            url: endpoint.base.clone(),
            source,
        })?;
        verify_blob(&what, digest, size, &bytes)?;
        Ok(bytes.to_vec())
    }

    /// GET with authentication and retries. Returns only successful responses.
    async fn get(
        &self,
        endpoint: &Endpoint,
        repository: &str,
        path: &str,
        accept: Option<&str>,
        keychain: &Keychain,
        what: &str,
    ) -> Result<reqwest::Response, RegistryError> {
        let url = format!("{}/v2/{repository}/{path}", endpoint.base);
        let scope = format!("repository:{repository}:pull");
        let creds = keychain.for_host(&endpoint.host);
        let cache_key = (
            endpoint.host.clone(),
            scope.clone(),
            creds.map(Credentials::fingerprint).unwrap_or_default(),
        );
        let http = if endpoint.skip_tls_verify {
            &self.unverified
        } else {
            &self.verified
        };
        let mut authenticated = false;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut request = http.get(&url);
            if let Some(accept) = accept {
                request = request.header(ACCEPT, accept);
            }
            if let Some(header) = self.cached_auth(&cache_key) {
                request = request.header(AUTHORIZATION, header);
            }
            let retry_reason = match request.send().await {
                Err(source) => {
                    if attempt >= self.config.attempts {
                        return Err(RegistryError::Unreachable {
                            url: endpoint.base.clone(),
                            source,
                        });
                    }
                    format!("{source}")
                }
                Ok(response) => {
                    let status = response.status();
                    if status.is_success() {
                        return Ok(response);
                    }
                    if status == StatusCode::UNAUTHORIZED && !authenticated {
                        let challenge = response
                            .headers()
                            .get(WWW_AUTHENTICATE)
                            .and_then(|v| v.to_str().ok())
                            .and_then(Challenge::parse);
                        if let Some(challenge) = challenge {
                            authenticated = true;
                            self.authenticate(endpoint, &cache_key, &challenge, creds, what).await?;
                            attempt -= 1;
                            continue;
                        }
                    }
                    let retryable =
                        status == StatusCode::TOO_MANY_REQUESTS || matches!(status.as_u16(), 500 | 502 | 503 | 504);
                    if !retryable || attempt >= self.config.attempts {
                        return Err(status_error(endpoint, what, response).await);
                    }
                    format!("status {status}")
                }
            };
            let delay = Duration::from_millis(100 << (attempt - 1).min(6));
            tracing::debug!(url, attempt, reason = retry_reason, ?delay, "retrying registry request");
            tokio::time::sleep(delay).await;
        }
    }

    fn cached_auth(&self, key: &AuthKey) -> Option<String> {
        let cache = self.auth_cache.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .get(key)
            .filter(|entry| entry.expires > Instant::now())
            .map(|entry| entry.header.clone())
    }

    /// Answers a challenge: Basic with the user and password, Bearer by
    /// asking the token server (or by sending a given registry token).
    async fn authenticate(
        &self,
        endpoint: &Endpoint,
        key: &AuthKey,
        challenge: &Challenge,
        creds: Option<&Credentials>,
        what: &str,
    ) -> Result<(), RegistryError> {
        let unauthorized = |message: &str| RegistryError::Unauthorized {
            what: what.to_string(),
            host: endpoint.host.clone(),
            message: message.to_string(),
        };
        let (header, lifetime) = match challenge {
            Challenge::Basic => {
                let header = creds.and_then(Credentials::basic_header).ok_or_else(|| {
                    unauthorized("the registry asks for a user name and password and none were given")
                })?;
                (header, Duration::from_secs(3600))
            }
            Challenge::Bearer { .. } if creds.is_some_and(|c| !c.registry_token.is_empty()) => {
                let token = &creds.expect("checked above").registry_token;
                (format!("Bearer {token}"), Duration::from_secs(3600))
            }
            Challenge::Bearer {
                realm,
                service,
                scope: challenge_scope,
            } => {
                let scope = challenge_scope.as_deref().unwrap_or(&key.1);
                let (token, lifetime) = self
                    .fetch_token(endpoint, realm, service.as_deref(), scope, creds, what)
                    .await?;
                (format!("Bearer {token}"), lifetime)
            }
        };
        // Tokens are cached a little shorter than they live.
        let expires = Instant::now()
            + lifetime
                .saturating_sub(Duration::from_secs(10))
                .max(Duration::from_secs(1));
        self.auth_cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.clone(), CachedAuth { header, expires });
        Ok(())
    }

    async fn fetch_token(
        &self,
        endpoint: &Endpoint,
        realm: &str,
        service: Option<&str>,
        scope: &str,
        creds: Option<&Credentials>,
        what: &str,
    ) -> Result<(String, Duration), RegistryError> {
        let http = if endpoint.skip_tls_verify {
            &self.unverified
        } else {
            &self.verified
        };
        let request = match creds {
            Some(creds) if !creds.identity_token.is_empty() => {
                let mut form = vec![
                    ("grant_type", "refresh_token"),
                    ("refresh_token", creds.identity_token.as_str()),
                    ("scope", scope),
                    ("client_id", "podvisor"),
                ];
                if let Some(service) = service {
                    form.push(("service", service));
                }
                http.post(realm).form(&form)
            }
            _ => {
                let mut query = vec![("scope", scope)];
                if let Some(service) = service {
                    query.push(("service", service));
                }
                let request = http.get(realm).query(&query);
                match creds.and_then(Credentials::basic_header) {
                    Some(basic) => request.header(AUTHORIZATION, basic),
                    None => request,
                }
            }
        };
        let response = request.send().await.map_err(|source| RegistryError::Unreachable {
            url: realm.to_string(),
            source,
        })?;
        if !response.status().is_success() {
            let status = response.status();
            let message = registry_message(response).await;
            return Err(if matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
                RegistryError::Unauthorized {
                    what: what.to_string(),
                    host: endpoint.host.clone(),
                    message: format!("token server: {message}"),
                }
            } else {
                RegistryError::Status {
                    what: format!("token for {what}"),
                    host: endpoint.host.clone(),
                    status: status.as_u16(),
                    message,
                }
            });
        }
        #[derive(serde::Deserialize)]
        struct TokenAnswer {
            #[serde(default)]
            token: String,
            #[serde(default)]
            access_token: String,
            #[serde(default)]
            expires_in: Option<u64>,
        }
        let answer: TokenAnswer = response
            .json()
            .await
            .map_err(|err| invalid(what, &format!("token server answered with unreadable JSON: {err}")))?;
        let token = if answer.token.is_empty() {
            answer.access_token
        } else {
            answer.token
        };
        if token.is_empty() {
            return Err(invalid(what, "token server answered without a token"));
        }
        // 60 s is the lifetime the distribution spec assumes when none is given.
        Ok((token, Duration::from_secs(answer.expires_in.unwrap_or(60).max(1))))
    }
}

async fn status_error(endpoint: &Endpoint, what: &str, response: reqwest::Response) -> RegistryError {
    let status = response.status();
    let message = registry_message(response).await;
    let what = what.to_string();
    let host = endpoint.host.clone();
    match status {
        StatusCode::NOT_FOUND => RegistryError::NotFound { what, host, message },
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => RegistryError::Unauthorized { what, host, message },
        _ => RegistryError::Status {
            what,
            host,
            status: status.as_u16(),
            message,
        },
    }
}

/// The registry's own words: `CODE: message` entries of its error body, or its text.
async fn registry_message(response: reqwest::Response) -> String {
    #[derive(serde::Deserialize)]
    struct Errors {
        errors: Vec<ErrorEntry>,
    }
    #[derive(serde::Deserialize)]
    struct ErrorEntry {
        #[serde(default)]
        code: String,
        #[serde(default)]
        message: String,
    }
    let status = response.status();
    let body = response.bytes().await.unwrap_or_default();
    let body = &body[..body.len().min(4096)];
    if let Ok(parsed) = serde_json::from_slice::<Errors>(body)
        && !parsed.errors.is_empty()
    {
        return parsed
            .errors
            .iter()
            .map(|e| format!("{}: {}", e.code, e.message))
            .collect::<Vec<_>>()
            .join("; ");
    }
    let text = String::from_utf8_lossy(body).trim().to_string();
    if text.is_empty() {
        status.canonical_reason().unwrap_or("no message").to_string()
    } else {
        text
    }
}

fn invalid(what: &str, reason: &str) -> RegistryError {
    RegistryError::Invalid {
        what: what.to_string(),
        reason: reason.to_string(),
    }
}

pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

pub fn verify_blob(what: &str, digest: &str, size: u64, bytes: &[u8]) -> Result<(), RegistryError> {
    if bytes.len() as u64 != size {
        return Err(RegistryError::Mismatch {
            what: format!("{what} size"),
            expected: size.to_string(),
            actual: bytes.len().to_string(),
        });
    }
    let actual = sha256_digest(bytes);
    if actual != digest {
        return Err(RegistryError::Mismatch {
            what: what.to_string(),
            expected: digest.to_string(),
            actual,
        });
    }
    Ok(())
}

fn manifest_media_type(bytes: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
        manifests: Option<serde_json::Value>,
        #[serde(rename = "schemaVersion")]
        schema_version: Option<u32>,
    }
    let probe: Probe = serde_json::from_slice(bytes).ok()?;
    match probe.media_type {
        Some(media_type) => Some(media_type),
        // OCI allows leaving mediaType out; tell index from manifest by shape.
        None if probe.manifests.is_some() => Some(MEDIA_OCI_INDEX.to_string()),
        None if probe.schema_version == Some(2) => Some(MEDIA_OCI_MANIFEST.to_string()),
        None => None,
    }
}

/// `localhost`, `127.0.0.0/8` and `::1`, with or without a port: Docker's rule
/// for registries that may be used over plain HTTP without configuration.
pub fn is_loopback_host(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or_default()
    } else {
        host.rsplit_once(':').map_or(host, |(name, _)| name)
    };
    name == "localhost" || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(config: RegistryConfig) -> RegistryClient {
        RegistryClient::new(config).unwrap()
    }

    #[test]
    fn loopback_rule() {
        assert!(is_loopback_host("127.0.0.1:5000"));
        assert!(is_loopback_host("127.8.9.1"));
        assert!(is_loopback_host("localhost:5000"));
        assert!(is_loopback_host("[::1]:5000"));
        assert!(!is_loopback_host("10.0.0.1:5000"));
        assert!(!is_loopback_host("registry.k8s.io"));
    }

    #[test]
    fn endpoints_put_mirrors_first_and_pick_schemes() {
        let mut config = RegistryConfig::default();
        config
            .mirrors
            .insert("docker.io".into(), vec!["http://127.0.0.1:5000/".into()]);
        config.insecure.push("myregistry.local:5000".into());
        let client = client(config);
        let bases: Vec<_> = client.endpoints("docker.io").into_iter().map(|e| e.base).collect();
        assert_eq!(bases, ["http://127.0.0.1:5000", "https://registry-1.docker.io"]);
        let bases: Vec<_> = client
            .endpoints("myregistry.local:5000")
            .into_iter()
            .map(|e| e.base)
            .collect();
        assert_eq!(bases, ["https://myregistry.local:5000", "http://myregistry.local:5000"]);
        let bases: Vec<_> = client.endpoints("localhost:5000").into_iter().map(|e| e.base).collect();
        assert_eq!(bases, ["http://localhost:5000"]);
        let bases: Vec<_> = client.endpoints("quay.io").into_iter().map(|e| e.base).collect();
        assert_eq!(bases, ["https://quay.io"]);
    }

    #[test]
    fn media_type_from_body_shape() {
        assert_eq!(
            manifest_media_type(br#"{"schemaVersion":2,"manifests":[]}"#).as_deref(),
            Some(MEDIA_OCI_INDEX)
        );
        assert_eq!(
            manifest_media_type(br#"{"schemaVersion":2,"config":{},"layers":[]}"#).as_deref(),
            Some(MEDIA_OCI_MANIFEST)
        );
        assert_eq!(
            manifest_media_type(br#"{"mediaType":"application/vnd.docker.distribution.manifest.v2+json"}"#).as_deref(),
            Some(MEDIA_DOCKER_MANIFEST)
        );
    }
}
