//! Manifests, indexes and image configs (OCI and Docker schema 2), parsed
//! tolerantly into what podvisor needs.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::registry::{MEDIA_DOCKER_LIST, MEDIA_DOCKER_MANIFEST, MEDIA_OCI_INDEX, MEDIA_OCI_MANIFEST};
use super::unpack::Compression;

const MEDIA_OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const MEDIA_DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";

#[derive(Clone, Debug, Deserialize)]
pub struct Descriptor {
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default)]
    pub platform: Option<Platform>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct Index {
    pub manifests: Vec<Descriptor>,
}

#[derive(Debug, Deserialize)]
pub struct Manifest {
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

pub enum ManifestKind {
    Index,
    Image,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("unsupported manifest media type {0:?} (schema 1 images are not supported)")]
    UnsupportedManifest(String),
    #[error("unsupported layer media type {0:?}")]
    UnsupportedLayer(String),
    #[error("unsupported config media type {0:?}")]
    UnsupportedConfig(String),
    #[error("malformed {what}: {message}")]
    Malformed { what: &'static str, message: String },
    #[error("config lists {diff_ids} layers but the manifest has {layers}")]
    LayerCountMismatch { diff_ids: usize, layers: usize },
}

pub fn kind_of(media_type: &str) -> Result<ManifestKind, ManifestError> {
    match media_type {
        MEDIA_OCI_INDEX | MEDIA_DOCKER_LIST => Ok(ManifestKind::Index),
        MEDIA_OCI_MANIFEST | MEDIA_DOCKER_MANIFEST => Ok(ManifestKind::Image),
        other => Err(ManifestError::UnsupportedManifest(other.to_string())),
    }
}

pub fn parse_index(bytes: &[u8]) -> Result<Index, ManifestError> {
    serde_json::from_slice(bytes).map_err(|err| ManifestError::Malformed {
        what: "image index",
        message: err.to_string(),
    })
}

pub fn parse_manifest(bytes: &[u8]) -> Result<Manifest, ManifestError> {
    let manifest: Manifest = serde_json::from_slice(bytes).map_err(|err| ManifestError::Malformed {
        what: "image manifest",
        message: err.to_string(),
    })?;
    let config_type = manifest.config.media_type.as_str();
    if !config_type.is_empty() && config_type != MEDIA_OCI_CONFIG && config_type != MEDIA_DOCKER_CONFIG {
        return Err(ManifestError::UnsupportedConfig(config_type.to_string()));
    }
    for layer in &manifest.layers {
        if Compression::from_media_type(&layer.media_type).is_none() {
            return Err(ManifestError::UnsupportedLayer(layer.media_type.clone()));
        }
    }
    Ok(manifest)
}

/// The platform this node runs, in OCI terms.
pub fn node_platform() -> Platform {
    let architecture = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    };
    Platform {
        architecture: architecture.to_string(),
        os: "linux".to_string(),
        variant: None,
    }
}

/// Picks the index entry for `wanted`: an exact os/architecture match, preferring
/// entries without a variant (or the wanted one); attestations never match.
pub fn select_platform<'a>(index: &'a Index, wanted: &Platform) -> Option<&'a Descriptor> {
    let candidates = index.manifests.iter().filter(|d| {
        d.platform
            .as_ref()
            .is_some_and(|p| p.os == wanted.os && p.architecture == wanted.architecture)
    });
    candidates.min_by_key(|d| {
        let variant = d.platform.as_ref().and_then(|p| p.variant.as_deref());
        match (variant, wanted.variant.as_deref()) {
            (v, w) if v == w => 0,
            (None, _) | (Some("v1"), None) => 1,
            _ => 2,
        }
    })
}

/// The parts of an image config that containers use.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default)]
pub struct ImageConfig {
    pub architecture: String,
    pub os: String,
    pub user: String,
    pub env: Vec<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub working_dir: String,
    pub stop_signal: String,
    pub labels: BTreeMap<String, String>,
    pub volumes: Vec<String>,
    pub exposed_ports: Vec<String>,
}

/// Parses a config blob into the runtime config and the layer diff ids.
pub fn parse_config(bytes: &[u8]) -> Result<(ImageConfig, Vec<String>), ManifestError> {
    #[derive(Deserialize, Default)]
    #[serde(default)]
    struct File {
        architecture: String,
        os: String,
        config: Option<Runtime>,
        rootfs: Option<RootFs>,
    }
    #[derive(Deserialize, Default)]
    #[serde(default)]
    struct RootFs {
        diff_ids: Vec<String>,
    }
    #[derive(Deserialize, Default)]
    #[serde(default, rename_all = "PascalCase")]
    struct Runtime {
        user: Option<String>,
        env: Option<Vec<String>>,
        entrypoint: Option<Vec<String>>,
        cmd: Option<Vec<String>>,
        working_dir: Option<String>,
        stop_signal: Option<String>,
        labels: Option<BTreeMap<String, String>>,
        volumes: Option<BTreeMap<String, serde_json::Value>>,
        exposed_ports: Option<BTreeMap<String, serde_json::Value>>,
    }
    let file: File = serde_json::from_slice(bytes).map_err(|err| ManifestError::Malformed {
        what: "image config",
        message: err.to_string(),
    })?;
    let runtime = file.config.unwrap_or_default();
    let config = ImageConfig {
        architecture: file.architecture,
        os: file.os,
        user: runtime.user.unwrap_or_default(),
        env: runtime.env.unwrap_or_default(),
        entrypoint: runtime.entrypoint.unwrap_or_default(),
        cmd: runtime.cmd.unwrap_or_default(),
        working_dir: runtime.working_dir.unwrap_or_default(),
        stop_signal: runtime.stop_signal.unwrap_or_default(),
        labels: runtime.labels.unwrap_or_default(),
        volumes: runtime.volumes.unwrap_or_default().into_keys().collect(),
        exposed_ports: runtime.exposed_ports.unwrap_or_default().into_keys().collect(),
    };
    let diff_ids = file.rootfs.unwrap_or_default().diff_ids;
    if let Some(bad) = diff_ids.iter().find(|d| !super::reference::is_valid_digest(d)) {
        return Err(ManifestError::Malformed {
            what: "image config",
            message: format!("diff id {bad:?} is not a sha256 digest"),
        });
    }
    Ok((config, diff_ids))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn descriptor(arch: &str, variant: Option<&str>, digest: &str) -> Descriptor {
        Descriptor {
            media_type: MEDIA_OCI_MANIFEST.into(),
            digest: digest.into(),
            size: 1,
            platform: Some(Platform {
                architecture: arch.into(),
                os: "linux".into(),
                variant: variant.map(Into::into),
            }),
        }
    }

    #[test]
    fn selects_the_node_platform_and_never_another() {
        let index = Index {
            manifests: vec![
                descriptor("arm64", Some("v8"), "arm"),
                descriptor("amd64", Some("v3"), "amd-v3"),
                descriptor("amd64", None, "amd"),
            ],
        };
        let amd64 = Platform {
            architecture: "amd64".into(),
            os: "linux".into(),
            variant: None,
        };
        assert_eq!(select_platform(&index, &amd64).unwrap().digest, "amd");
        let only_arm = Index {
            manifests: vec![descriptor("arm64", None, "arm")],
        };
        assert!(select_platform(&only_arm, &amd64).is_none());
    }

    #[test]
    fn parses_config_with_nulls() {
        let (config, diff_ids) = parse_config(
            br#"{"architecture":"amd64","os":"linux","config":{"Env":null,"Cmd":["sh"],"User":"1000:1000","Volumes":{"/data":{}}},
                "rootfs":{"type":"layers","diff_ids":["sha256:0000000000000000000000000000000000000000000000000000000000000000"]}}"#,
        )
        .unwrap();
        assert_eq!(config.cmd, ["sh"]);
        assert!(config.env.is_empty());
        assert_eq!(config.user, "1000:1000");
        assert_eq!(config.volumes, ["/data"]);
        assert_eq!(diff_ids.len(), 1);
        assert!(parse_config(br#"{"rootfs":{"diff_ids":["nope"]}}"#).is_err());
    }

    #[test]
    fn refuses_unknown_layer_types() {
        let manifest = br#"{"schemaVersion":2,"config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:x","size":1},
            "layers":[{"mediaType":"application/x-weird","digest":"sha256:y","size":1}]}"#;
        assert!(matches!(
            parse_manifest(manifest),
            Err(ManifestError::UnsupportedLayer(_))
        ));
    }
}
