//! Image pulls for containers: `imagePullPolicy`, credentials from
//! `imagePullSecrets` (dockerconfigjson), and pull back-off.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use base64::Engine;
use k8s_openapi::api::core::v1::{Container, Pod};

use super::env::Sources;
use crate::cluster::client::Client;
use crate::cri::proto::runtime as api;

const FIRST_BACKOFF: Duration = Duration::from_secs(10);
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// The effective pull policy: the spec's, else Always for `:latest` or no tag, else IfNotPresent.
pub fn pull_policy(container: &Container) -> &str {
    if let Some(policy) = container.image_pull_policy.as_deref() {
        return policy;
    }
    let image = container.image.as_deref().unwrap_or_default();
    if image.contains('@') {
        return "IfNotPresent";
    }
    let last = image.rsplit('/').next().unwrap_or_default();
    match last.split_once(':') {
        Some((_, "latest")) | None => "Always",
        Some(_) => "IfNotPresent",
    }
}

/// The registry host of an image reference (Docker Hub when it has none).
pub fn registry_of(image: &str) -> &str {
    match image.split_once('/') {
        Some((first, _)) if first.contains(['.', ':']) || first == "localhost" => first,
        _ => "docker.io",
    }
}

/// Credentials for `image` from the pod's pull secrets, when one matches its registry.
pub async fn auth_for(
    client: &Client,
    sources: &mut Sources,
    pod: &Pod,
    image: &str,
) -> Result<Option<api::AuthConfig>, String> {
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    let registry = registry_of(image);
    let secrets = pod
        .spec
        .as_ref()
        .and_then(|s| s.image_pull_secrets.clone())
        .unwrap_or_default();
    for reference in secrets {
        let Some(data) = sources.secret_bytes(client, namespace, &reference.name).await? else {
            continue;
        };
        let json = data.get(".dockerconfigjson").or_else(|| data.get(".dockercfg"));
        if let Some(auth) = json.and_then(|bytes| auth_in_config(bytes, registry)) {
            return Ok(Some(auth));
        }
    }
    Ok(None)
}

#[derive(serde::Deserialize, Default)]
struct DockerEntry {
    #[serde(default)]
    username: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    auth: String,
}

/// Finds `registry` in a dockerconfigjson (`{"auths": {...}}`) or legacy dockercfg document.
fn auth_in_config(bytes: &[u8], registry: &str) -> Option<api::AuthConfig> {
    let value: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    let auths = value.get("auths").cloned().unwrap_or(value);
    let entries: BTreeMap<String, DockerEntry> = serde_json::from_value(auths).ok()?;
    let host_of = |key: &str| {
        let key = key.trim_start_matches("https://").trim_start_matches("http://");
        key.split('/').next().unwrap_or_default().to_string()
    };
    let wanted = |key: &str| {
        let host = host_of(key);
        host == registry || (registry == "docker.io" && (host == "index.docker.io" || host == "registry-1.docker.io"))
    };
    let (key, entry) = entries.into_iter().find(|(key, _)| wanted(key))?;
    let (mut username, mut password) = (entry.username, entry.password);
    if username.is_empty()
        && let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(entry.auth.trim())
        && let Some((u, p)) = String::from_utf8_lossy(&decoded).split_once(':')
    {
        username = u.to_string();
        password = p.to_string();
    }
    Some(api::AuthConfig {
        username,
        password,
        server_address: host_of(&key),
        ..Default::default()
    })
}

/// Exponential back-off per image after failed pulls.
#[derive(Default)]
pub struct PullBackoff {
    entries: HashMap<String, (Instant, Duration)>,
}

impl PullBackoff {
    /// When `image` may be pulled again, if it is still backing off.
    pub fn blocked_until(&self, image: &str) -> Option<Instant> {
        let (at, delay) = self.entries.get(image)?;
        let until = *at + *delay;
        (until > Instant::now()).then_some(until)
    }

    pub fn failed(&mut self, image: &str) {
        let delay = match self.entries.get(image) {
            Some((_, delay)) => (*delay * 2).min(MAX_BACKOFF),
            None => FIRST_BACKOFF,
        };
        self.entries.insert(image.into(), (Instant::now(), delay));
    }

    pub fn succeeded(&mut self, image: &str) {
        self.entries.remove(image);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container(image: &str, policy: Option<&str>) -> Container {
        Container {
            image: Some(image.into()),
            image_pull_policy: policy.map(str::to_string),
            ..Default::default()
        }
    }

    #[test]
    fn default_pull_policy() {
        assert_eq!(pull_policy(&container("busybox", None)), "Always");
        assert_eq!(pull_policy(&container("busybox:latest", None)), "Always");
        assert_eq!(pull_policy(&container("localhost:5000/busybox", None)), "Always");
        assert_eq!(
            pull_policy(&container("localhost:5000/busybox:1.36", None)),
            "IfNotPresent"
        );
        assert_eq!(pull_policy(&container("busybox@sha256:abc", None)), "IfNotPresent");
        assert_eq!(pull_policy(&container("busybox", Some("Never"))), "Never");
    }

    #[test]
    fn registries_and_credentials() {
        assert_eq!(registry_of("busybox"), "docker.io");
        assert_eq!(registry_of("library/busybox"), "docker.io");
        assert_eq!(registry_of("127.0.0.1:5000/x/y:1"), "127.0.0.1:5000");
        let config = br#"{"auths":{"https://127.0.0.1:5000":{"auth":"dXNlcjpwYXNz"}}}"#;
        let auth = auth_in_config(config, "127.0.0.1:5000").unwrap();
        assert_eq!((auth.username.as_str(), auth.password.as_str()), ("user", "pass"));
        assert!(auth_in_config(config, "docker.io").is_none());
        let hub = br#"{"auths":{"https://index.docker.io/v1/":{"username":"u","password":"p"}}}"#;
        assert_eq!(auth_in_config(hub, "docker.io").unwrap().username, "u");
    }
}
