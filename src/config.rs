//! The daemon's configuration file (TOML). Every field has a default, so the
//! daemon runs with no file at all; unknown fields are rejected.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub const DEFAULT_CONFIG_PATH: &str = "/etc/podvisor/config.toml";

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub registry: RegistryConfig,
}

/// How images are fetched.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// Registry hosts (`host[:port]`) that may be reached over plain HTTP or with an
    /// unverified certificate. Loopback registries are always allowed plain HTTP.
    /// Default: none.
    pub insecure: Vec<String>,
    /// Per registry host, endpoints (`http(s)://host[:port][/prefix]`) tried in order
    /// before the host itself. Images keep their original name. Default: none.
    pub mirrors: BTreeMap<String, Vec<String>>,
    /// Credentials in docker's `config.json` format, read at every pull.
    /// Default: `/etc/podvisor/auth.json` when it exists.
    pub auth_file: Option<PathBuf>,
    /// Layers downloaded at once per pull. Default: 4.
    pub max_concurrent_downloads: usize,
    /// Attempts for each request on connection errors, 429 and 5xx answers. Default: 4.
    pub attempts: u32,
    /// Seconds a registry may stay silent before a request is failed. Default: 60.
    pub timeout_seconds: u64,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            insecure: Vec::new(),
            mirrors: BTreeMap::new(),
            auth_file: None,
            max_concurrent_downloads: 4,
            attempts: 4,
            timeout_seconds: 60,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: String, message: String },
}

impl Config {
    /// Loads `path`; a missing file at the default location means "all defaults",
    /// a missing file that was asked for explicitly is an error.
    pub fn load(path: &Path, explicit: bool) -> Result<Config, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound && !explicit => {
                return Ok(Config::default());
            }
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.display().to_string(),
                    source,
                });
            }
        };
        Config::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.display().to_string(),
            message,
        })
    }

    pub fn parse(text: &str) -> Result<Config, String> {
        let config: Config = toml::from_str(text).map_err(|err| err.to_string().trim_end().to_string())?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), String> {
        let registry = &self.registry;
        if registry.max_concurrent_downloads == 0 {
            return Err("registry.max_concurrent_downloads must be at least 1".into());
        }
        if registry.attempts == 0 {
            return Err("registry.attempts must be at least 1".into());
        }
        for (host, endpoints) in &registry.mirrors {
            for endpoint in endpoints {
                if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
                    return Err(format!(
                        "registry.mirrors.\"{host}\": endpoint {endpoint:?} must start with http:// or https://"
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_registry_shape() {
        let config = Config::parse(
            r#"
            [registry]
            insecure = ["myregistry.local:5000"]
            [registry.mirrors]
            "registry.k8s.io" = ["http://127.0.0.1:5000"]
            "docker.io" = ["http://127.0.0.1:5000", "https://mirror.example"]
            "#,
        )
        .unwrap();
        assert_eq!(config.registry.insecure, vec!["myregistry.local:5000"]);
        assert_eq!(config.registry.mirrors["docker.io"].len(), 2);
        assert_eq!(config.registry.max_concurrent_downloads, 4);
    }

    #[test]
    fn rejects_unknown_fields_and_bad_endpoints() {
        let err = Config::parse("[registry]\ninsecur = []\n").unwrap_err();
        assert!(err.contains("insecur"), "{err}");
        let err = Config::parse("[registry.mirrors]\n\"docker.io\" = [\"127.0.0.1:5000\"]\n").unwrap_err();
        assert!(err.contains("http://"), "{err}");
    }

    #[test]
    fn missing_default_file_means_defaults() {
        let config = Config::load(Path::new("/nonexistent/podvisor.toml"), false).unwrap();
        assert!(config.registry.mirrors.is_empty());
        assert!(Config::load(Path::new("/nonexistent/podvisor.toml"), true).is_err());
    }
}
