//! Pod networking. A sandbox with its own network namespace is attached
//! through the CNI plugin chain configured in the CNI directory, or through
//! podvisor's built-in bridge network when there is no CNI configuration.
//! What an attach made is kept with the sandbox (and, before the attach, as
//! an intent in the sandbox directory), so that detaching works after a
//! daemon restart, and after a crash in the middle of creating the sandbox.

pub mod builtin;
pub mod cni;

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::{NetworkConfig, NetworkMode};
use crate::spec::SandboxSpec;

/// The interface pods get.
pub const POD_INTERFACE: &str = "eth0";
/// Where the intent of an attach is written in the sandbox directory.
const INTENT_FILE: &str = "network.json";

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// The request cannot be served as asked (bad annotation, port taken, ...).
    #[error("{0}")]
    Invalid(String),
    /// No usable network: missing configuration or plugins.
    #[error("pod network is not ready: {0}")]
    NotReady(String),
    #[error(transparent)]
    Cni(#[from] cni::CniError),
    #[error(transparent)]
    Builtin(#[from] builtin::NetError),
}

/// How a sandbox is attached, as stored with it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
#[allow(clippy::large_enum_variant)] // one per sandbox record
pub enum NetworkAttachment {
    Cni {
        /// The network configuration list used (DEL runs with the same one).
        network: serde_json::Value,
        /// What the plugins were given at ADD (portmap needs it again at DEL).
        capabilities: cni::CapabilityArgs,
        pod: PodRef,
        /// The chain's result; `None` while the attach is under way.
        result: Option<Box<cni::CniResult>>,
    },
    Builtin {
        /// `None` while the attach is under way.
        attachment: Option<builtin::Attachment>,
    },
}

/// The pod identity plugins see in `CNI_ARGS`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

impl NetworkAttachment {
    /// The pod's addresses, IPv4 first.
    pub fn ips(&self) -> Vec<String> {
        match self {
            NetworkAttachment::Cni { result, .. } => result.as_deref().map(|r| r.pod_ips()).unwrap_or_default(),
            NetworkAttachment::Builtin { attachment } => attachment
                .iter()
                .flat_map(|a| std::iter::once(a.ipv4.to_string()).chain(a.ipv6.map(|ip| ip.to_string())))
                .collect(),
        }
    }
}

/// The node's pod network.
pub struct PodNetwork {
    config: NetworkConfig,
    cni: cni::CniRuntime,
    builtin: builtin::BuiltinNetwork,
    /// The CNI configuration last loaded, and the directory's fingerprint then.
    loaded: Mutex<Option<(cni::Fingerprint, Option<cni::NetworkConfigList>)>>,
}

impl PodNetwork {
    pub fn new(config: &NetworkConfig, state_dir: &Path) -> Result<PodNetwork, NetworkError> {
        let settings = &config.builtin;
        let mut builtin_config = builtin::BuiltinConfig::new(state_dir.join("network"));
        builtin_config.bridge = settings.bridge.clone();
        builtin_config.subnet_v4 = settings
            .subnet
            .parse()
            .map_err(|_| NetworkError::Invalid(format!("bad subnet {:?}", settings.subnet)))?;
        builtin_config.subnet_v6 = match &settings.subnet_v6 {
            Some(v6) => Some(
                v6.parse()
                    .map_err(|_| NetworkError::Invalid(format!("bad IPv6 subnet {v6:?}")))?,
            ),
            None => None,
        };
        builtin_config.mtu = settings.mtu;
        builtin_config.nat = match settings.nat.as_str() {
            "nft" => builtin::NatBackend::Nft,
            "iptables" => builtin::NatBackend::Iptables,
            _ => builtin::NatBackend::Auto,
        };
        builtin_config.nat_name = settings.nat_name.clone();
        builtin_config.cluster_subnets = settings
            .cluster_subnets
            .iter()
            .map(|s| {
                s.parse::<ipnet::Ipv4Net>()
                    .map(|net| net.trunc())
                    .map_err(|_| NetworkError::Invalid(format!("bad cluster subnet {s:?}")))
            })
            .collect::<Result<_, _>>()?;
        let mut cni = cni::CniRuntime::new(config.cni_bin_dirs.clone());
        cni.timeout = Duration::from_secs(config.cni_timeout_seconds);
        Ok(PodNetwork {
            config: config.clone(),
            cni,
            builtin: builtin::BuiltinNetwork::new(builtin_config)?,
            loaded: Mutex::new(None),
        })
    }

    /// The CNI network in effect, reloaded when the directory changed.
    fn cni_network(&self) -> Result<Option<cni::NetworkConfigList>, NetworkError> {
        if self.config.mode == NetworkMode::Builtin {
            return Ok(None);
        }
        let dir = &self.config.cni_conf_dir;
        let fingerprint = cni::fingerprint(dir)?;
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((seen, network)) = loaded.as_ref()
            && *seen == fingerprint
        {
            return Ok(network.clone());
        }
        let network = cni::load_network(dir)?;
        if let Some(network) = &network {
            tracing::info!(network = %network.name, file = %network.path.display(), "using CNI network");
        }
        *loaded = Some((fingerprint, network.clone()));
        Ok(network)
    }

    /// Which path new pods take: `Some(network)` for CNI, `None` for the built-in one.
    fn choose(&self) -> Result<Option<cni::NetworkConfigList>, NetworkError> {
        let network = self.cni_network()?;
        match (self.config.mode, network) {
            (NetworkMode::Cni, None) => Err(NetworkError::NotReady(format!(
                "no CNI network configuration in {}",
                self.config.cni_conf_dir.display()
            ))),
            (_, network) => Ok(network),
        }
    }

    /// `Ok` when pods can be attached, or why not (the runtime's NetworkReady condition).
    pub async fn ready(&self) -> Result<String, String> {
        match self.choose().map_err(|e| crate::error_chain(&e))? {
            Some(network) => {
                let missing = self.cni.missing_plugins(&network);
                if !missing.is_empty() {
                    return Err(format!(
                        "CNI network {} needs plugins not found in {:?}: {}",
                        network.name,
                        self.cni.plugin_dirs,
                        missing.join(", ")
                    ));
                }
                match self.cni.status(&network).await {
                    Ok(_) => Ok(format!("CNI network {}", network.name)),
                    Err(err) => Err(crate::error_chain(&err)),
                }
            }
            None => self
                .builtin
                .is_ready()
                .await
                .map(|()| format!("built-in network on {}", self.builtin.config().bridge)),
        }
    }

    /// The pod subnets when the built-in network is in use (a CNI network's are its plugins' business).
    pub fn pod_subnets(&self) -> Vec<String> {
        match self.choose() {
            Ok(None) => {
                let config = self.builtin.config();
                std::iter::once(config.subnet_v4.to_string())
                    .chain(config.subnet_v6.map(|v6| v6.to_string()))
                    .collect()
            }
            _ => Vec::new(),
        }
    }

    /// Prepares the built-in network at daemon start when it is the one in use.
    pub async fn start(&self) {
        if matches!(self.choose(), Ok(None))
            && let Err(err) = self.builtin.ensure_ready().await
        {
            tracing::warn!(error = %crate::error_chain(&err), "setting up the built-in network");
        }
    }

    /// Attaches the sandbox's network namespace. The intent is written to
    /// `sandbox_dir` first, so a crash half-way can still be cleaned up.
    pub async fn attach(
        &self,
        sandbox_id: &str,
        spec: &SandboxSpec,
        netns: &Path,
        sandbox_dir: &Path,
    ) -> Result<NetworkAttachment, NetworkError> {
        let network = self.choose()?;
        let mut intent = match &network {
            Some(network) => NetworkAttachment::Cni {
                network: conflist_json(network),
                capabilities: capability_args(spec)?,
                pod: PodRef {
                    namespace: spec.metadata.namespace.clone(),
                    name: spec.metadata.name.clone(),
                    uid: spec.metadata.uid.clone(),
                },
                result: None,
            },
            None => NetworkAttachment::Builtin { attachment: None },
        };
        crate::sys::fs::atomic_write_json(&sandbox_dir.join(INTENT_FILE), &intent)
            .map_err(|e| NetworkError::Invalid(format!("recording the network intent: {e}")))?;
        match (&mut intent, network) {
            (
                NetworkAttachment::Cni {
                    capabilities,
                    pod,
                    result,
                    ..
                },
                Some(network),
            ) => {
                let at = cni_attachment(sandbox_id, netns, pod, capabilities);
                *result = Some(Box::new(self.cni.add(&network, &at).await?));
            }
            (NetworkAttachment::Builtin { attachment }, None) => {
                let request = builtin::AttachRequest {
                    sandbox_id: sandbox_id.to_string(),
                    netns: netns.to_path_buf(),
                    ifname: POD_INTERFACE.to_string(),
                    port_mappings: builtin_ports(spec)?,
                };
                *attachment = Some(self.builtin.attach(&request).await?);
            }
            _ => unreachable!("the intent follows the chosen network"),
        }
        Ok(intent)
    }

    /// Detaches a sandbox. Idempotent; works without the namespace (it may be
    /// gone) and, for the built-in network, with nothing but the id.
    pub async fn detach(
        &self,
        sandbox_id: &str,
        netns: Option<&Path>,
        attachment: &NetworkAttachment,
    ) -> Result<(), NetworkError> {
        match attachment {
            NetworkAttachment::Cni {
                network,
                capabilities,
                pod,
                result,
            } => {
                let bytes = serde_json::to_vec(network).unwrap_or_default();
                let network = cni::NetworkConfigList::parse(&bytes, Path::new("(stored with the sandbox)"))?;
                let netns = netns.map(Path::to_path_buf).unwrap_or_default();
                let at = cni_attachment(sandbox_id, &netns, pod, capabilities);
                self.cni.del(&network, &at, result.as_deref()).await?;
            }
            NetworkAttachment::Builtin { attachment } => {
                self.builtin.detach(sandbox_id, netns, attachment.as_ref()).await?;
            }
        }
        Ok(())
    }

    /// Detaches what an interrupted attach left in `sandbox_dir` (a sandbox
    /// without a record). Nothing to do without an intent file.
    pub async fn detach_orphan(&self, sandbox_id: &str, sandbox_dir: &Path) {
        let intent: Option<NetworkAttachment> = std::fs::read(sandbox_dir.join(INTENT_FILE))
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok());
        if let Some(intent) = intent {
            let netns = sandbox_dir.join("ns").join("net");
            let netns = netns.exists().then_some(netns);
            if let Err(err) = self.detach(sandbox_id, netns.as_deref(), &intent).await {
                tracing::warn!(sandbox = %sandbox_id, error = %crate::error_chain(&err), "detaching an orphaned sandbox");
            }
        }
    }
}

fn cni_attachment(sandbox_id: &str, netns: &Path, pod: &PodRef, capabilities: &cni::CapabilityArgs) -> cni::Attachment {
    cni::Attachment {
        container_id: sandbox_id.to_string(),
        netns: netns.to_path_buf(),
        ifname: POD_INTERFACE.to_string(),
        pod_namespace: pod.namespace.clone(),
        pod_name: pod.name.clone(),
        pod_uid: pod.uid.clone(),
        capabilities: capabilities.clone(),
    }
}

/// A network configuration list as JSON again (for storing with the sandbox).
fn conflist_json(network: &cni::NetworkConfigList) -> serde_json::Value {
    serde_json::json!({
        "cniVersion": network.cni_version,
        "name": network.name,
        "disableCheck": network.disable_check,
        "plugins": network.plugins,
    })
}

fn protocol(name: &str) -> Result<(cni::Protocol, builtin::Protocol), NetworkError> {
    match name {
        "tcp" | "" => Ok((cni::Protocol::Tcp, builtin::Protocol::Tcp)),
        "udp" => Ok((cni::Protocol::Udp, builtin::Protocol::Udp)),
        "sctp" => Ok((cni::Protocol::Sctp, builtin::Protocol::Sctp)),
        other => Err(NetworkError::Invalid(format!(
            "unknown port mapping protocol {other:?}"
        ))),
    }
}

fn builtin_ports(spec: &SandboxSpec) -> Result<Vec<builtin::PortMapping>, NetworkError> {
    spec.port_mappings
        .iter()
        .filter(|p| p.host_port != 0)
        .map(|p| {
            Ok(builtin::PortMapping {
                protocol: protocol(&p.protocol)?.1,
                container_port: p.container_port,
                host_port: p.host_port,
                host_ip: p.host_ip.clone(),
            })
        })
        .collect()
}

/// What CNI plugins get in `runtimeConfig`: published ports, bandwidth
/// limits from the pod annotations, and the pod's DNS settings.
fn capability_args(spec: &SandboxSpec) -> Result<cni::CapabilityArgs, NetworkError> {
    let port_mappings = spec
        .port_mappings
        .iter()
        .filter(|p| p.host_port != 0)
        .map(|p| {
            Ok(cni::PortMapping {
                host_port: p.host_port,
                container_port: p.container_port,
                protocol: protocol(&p.protocol)?.0,
                host_ip: p.host_ip.clone(),
            })
        })
        .collect::<Result<Vec<_>, NetworkError>>()?;
    let rate = |key: &str| -> Result<Option<u64>, NetworkError> {
        spec.annotations
            .get(key)
            .map(|value| {
                parse_quantity(value)
                    .ok_or_else(|| NetworkError::Invalid(format!("annotation {key}: {value:?} is not a bandwidth")))
            })
            .transpose()
    };
    let ingress = rate("kubernetes.io/ingress-bandwidth")?;
    let egress = rate("kubernetes.io/egress-bandwidth")?;
    // Bursts are left effectively unlimited, as kubelet's runtimes do.
    let burst = i32::MAX as u64;
    let bandwidth = (ingress.is_some() || egress.is_some()).then(|| cni::Bandwidth {
        ingress_rate: ingress.unwrap_or(0),
        ingress_burst: if ingress.is_some() { burst } else { 0 },
        egress_rate: egress.unwrap_or(0),
        egress_burst: if egress.is_some() { burst } else { 0 },
    });
    let dns = &spec.dns;
    let dns = (!dns.servers.is_empty() || !dns.searches.is_empty() || !dns.options.is_empty()).then(|| cni::Dns {
        servers: dns.servers.clone(),
        searches: dns.searches.clone(),
        options: dns.options.clone(),
    });
    Ok(cni::CapabilityArgs {
        port_mappings,
        bandwidth,
        dns,
        ..Default::default()
    })
}

/// A Kubernetes quantity such as `10M`, `1Gi` or `500k`, as a number.
fn parse_quantity(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    let factor: f64 = match suffix {
        "" => 1.0,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024f64.powi(4),
        _ => return None,
    };
    let value = number * factor;
    (value.is_finite() && value >= 1.0).then_some(value as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::PortMapping;

    #[test]
    fn quantities() {
        assert_eq!(parse_quantity("10M"), Some(10_000_000));
        assert_eq!(parse_quantity("1Mi"), Some(1 << 20));
        assert_eq!(parse_quantity("1.5k"), Some(1500));
        assert_eq!(parse_quantity("fast"), None);
        assert_eq!(parse_quantity("0"), None);
    }

    #[test]
    fn capability_args_from_the_sandbox() {
        let mut spec = SandboxSpec {
            port_mappings: vec![
                PortMapping {
                    protocol: "tcp".into(),
                    container_port: 80,
                    host_port: 8080,
                    host_ip: String::new(),
                },
                PortMapping {
                    protocol: "udp".into(),
                    container_port: 53,
                    host_port: 0,
                    host_ip: String::new(),
                },
            ],
            ..Default::default()
        };
        spec.annotations
            .insert("kubernetes.io/ingress-bandwidth".into(), "10M".into());
        spec.dns.servers = vec!["10.96.0.10".into()];
        let args = capability_args(&spec).unwrap();
        assert_eq!(
            args.port_mappings.len(),
            1,
            "ports without a host port are not published"
        );
        assert_eq!(args.bandwidth.unwrap().ingress_rate, 10_000_000);
        assert_eq!(args.bandwidth.unwrap().egress_rate, 0);
        assert_eq!(args.dns.unwrap().servers, vec!["10.96.0.10"]);
        spec.annotations
            .insert("kubernetes.io/egress-bandwidth".into(), "lots".into());
        assert!(matches!(capability_args(&spec), Err(NetworkError::Invalid(_))));
    }
}
