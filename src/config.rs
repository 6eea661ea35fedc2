//! The daemon's configuration file (TOML). Every field has a default, so the
//! daemon runs with no file at all; unknown fields are rejected.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub const DEFAULT_CONFIG_PATH: &str = "/etc/podvisor/config.toml";

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub registry: RegistryConfig,
    pub network: NetworkConfig,
    pub streaming: StreamingConfig,
    pub vm: VmConfig,
}

/// The VM-pod backend (runtime handler `vm`).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct VmConfig {
    /// `auto` (KVM when a test domain really runs on it, else TCG), `kvm` or `tcg`. Default: `auto`.
    pub hypervisor: String,
    /// The libvirt connection. Default: `qemu:///system`.
    pub libvirt_uri: String,
    /// Guest memory when the container has no memory limit, in MiB. Default: 512.
    pub default_memory_mib: u64,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            hypervisor: "auto".into(),
            libvirt_uri: "qemu:///system".into(),
            default_memory_mib: 512,
        }
    }
}

/// The HTTP server behind the URLs that Exec, Attach and PortForward return.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StreamingConfig {
    /// `IP:PORT` to listen on; port 0 picks a free port (the URLs carry the real one).
    /// Default: `127.0.0.1:0`.
    pub address: SocketAddr,
    /// PEM certificate (chain) and private key: serve HTTPS instead of HTTP.
    /// Default: none (plain HTTP, fit for the loopback address only).
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
}

impl Default for StreamingConfig {
    fn default() -> Self {
        StreamingConfig {
            address: SocketAddr::from(([127, 0, 0, 1], 0)),
            tls_cert: None,
            tls_key: None,
        }
    }
}

/// Which pod network is used.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// CNI when the config directory holds a network configuration, else the built-in network.
    #[default]
    Auto,
    /// CNI only: without a configuration pods cannot start and the network is not ready.
    Cni,
    /// The built-in bridge network, whatever the CNI directory holds.
    Builtin,
}

/// How pods are connected.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkConfig {
    /// Default: `auto`.
    pub mode: NetworkMode,
    /// Where CNI network configurations (`.conflist`, `.conf`, `.json`) are read;
    /// the first file by name wins. Default: `/etc/cni/net.d`.
    pub cni_conf_dir: PathBuf,
    /// Where CNI plugins are looked for, in order. Default: `/opt/cni/bin`, `/usr/lib/cni`.
    pub cni_bin_dirs: Vec<PathBuf>,
    /// Seconds one CNI plugin call may take before it is killed. Default: 60.
    pub cni_timeout_seconds: u64,
    pub builtin: BuiltinNetworkConfig,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            mode: NetworkMode::Auto,
            cni_conf_dir: PathBuf::from("/etc/cni/net.d"),
            cni_bin_dirs: vec![PathBuf::from("/opt/cni/bin"), PathBuf::from("/usr/lib/cni")],
            cni_timeout_seconds: 60,
            builtin: BuiltinNetworkConfig::default(),
        }
    }
}

/// The built-in network (used without a CNI configuration).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BuiltinNetworkConfig {
    /// The bridge pods are attached to. Default: `podvisor0`.
    pub bridge: String,
    /// Pod IPv4 addresses; the first is the bridge's (the pods' gateway). Default: `10.88.0.0/16`.
    pub subnet: String,
    /// Optional pod IPv6 subnet, e.g. `fd88::/64`. Default: none.
    pub subnet_v6: Option<String>,
    /// MTU of the bridge and the pods' interfaces. Default: the host's default-route interface's.
    pub mtu: Option<u32>,
    /// `auto` (nftables when `nft` works, else iptables), `nft` or `iptables`. Default: `auto`.
    pub nat: String,
    /// Name of podvisor's nftables tables (and prefix of its iptables chains). Default: `podvisor`.
    pub nat_name: String,
    /// The other nodes' pod subnets: traffic to them keeps the pod's address (routed, not masqueraded).
    /// Default: none (`up --nodes` fills it in).
    pub cluster_subnets: Vec<String>,
}

impl Default for BuiltinNetworkConfig {
    fn default() -> Self {
        BuiltinNetworkConfig {
            bridge: "podvisor0".into(),
            subnet: "10.88.0.0/16".into(),
            subnet_v6: None,
            mtu: None,
            nat: "auto".into(),
            nat_name: "podvisor".into(),
            cluster_subnets: Vec::new(),
        }
    }
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
        let builtin = &self.network.builtin;
        if builtin.subnet.parse::<ipnet::Ipv4Net>().is_err() {
            return Err(format!(
                "network.builtin.subnet {:?} is not an IPv4 CIDR",
                builtin.subnet
            ));
        }
        if let Some(v6) = &builtin.subnet_v6
            && v6.parse::<ipnet::Ipv6Net>().is_err()
        {
            return Err(format!("network.builtin.subnet_v6 {v6:?} is not an IPv6 CIDR"));
        }
        if !["auto", "nft", "iptables"].contains(&builtin.nat.as_str()) {
            return Err(format!(
                "network.builtin.nat {:?} must be auto, nft or iptables",
                builtin.nat
            ));
        }
        if self.streaming.tls_cert.is_some() != self.streaming.tls_key.is_some() {
            return Err("streaming.tls_cert and streaming.tls_key go together".into());
        }
        if !["auto", "kvm", "tcg"].contains(&self.vm.hypervisor.as_str()) {
            return Err(format!(
                "vm.hypervisor {:?} must be auto, kvm or tcg",
                self.vm.hypervisor
            ));
        }
        if self.vm.default_memory_mib < 16 {
            return Err("vm.default_memory_mib must be at least 16".into());
        }
        if self.network.cni_timeout_seconds == 0 {
            return Err("network.cni_timeout_seconds must be at least 1".into());
        }
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
    fn streaming_address_defaults_to_a_random_loopback_port() {
        assert_eq!(Config::default().streaming.address.to_string(), "127.0.0.1:0");
        let config = Config::parse("[streaming]\naddress = \"0.0.0.0:10010\"\n").unwrap();
        assert_eq!(config.streaming.address.port(), 10010);
        assert!(Config::parse("[streaming]\naddress = \"nowhere\"\n").is_err());
    }

    #[test]
    fn missing_default_file_means_defaults() {
        let config = Config::load(Path::new("/nonexistent/podvisor.toml"), false).unwrap();
        assert!(config.registry.mirrors.is_empty());
        assert!(Config::load(Path::new("/nonexistent/podvisor.toml"), true).is_err());
    }
}
