//! The runtime side of CNI (spec 1.0/1.1, and 0.3.x/0.4.0 configs): load
//! the network from the config directory, then run its plugin chain to
//! attach a pod's network namespace (ADD), check it (CHECK), detach it (DEL),
//! and ask whether the network is ready (STATUS).
//!
//! The caller stores the [`CniResult`] of ADD with the sandbox (it
//! serializes as the plugins' own JSON) and passes it back to DEL/CHECK,
//! together with the same [`Attachment`].

mod capabilities;
mod config;
mod error;
mod invoke;
mod result;

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Map, Value, json};

pub use capabilities::{Bandwidth, CapabilityArgs, Dns, PortMapping, Protocol};
pub use config::{CONFIG_EXTENSIONS, CniVersion, Fingerprint, NetworkConfigList, fingerprint, load_network};
pub use error::{CniError, Command, PluginFailure, codes};
pub use result::{Cidr, CniResult, Interface, IpConfig, ResultDns, ResultParseError, Route};

use invoke::Invocation;

/// Where plugins are looked for unless configured otherwise.
pub const DEFAULT_PLUGIN_DIRS: &[&str] = &["/opt/cni/bin", "/usr/lib/cni"];
/// The default limit for one plugin command.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs CNI plugins.
#[derive(Clone, Debug)]
pub struct CniRuntime {
    /// Searched in order for plugin binaries; also `CNI_PATH`.
    pub plugin_dirs: Vec<PathBuf>,
    /// Limit for each plugin command; the plugin is killed when it expires.
    pub timeout: Duration,
}

impl Default for CniRuntime {
    fn default() -> Self {
        CniRuntime::new(DEFAULT_PLUGIN_DIRS.iter().map(PathBuf::from).collect())
    }
}

/// One pod's attachment to the network.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Attachment {
    /// The sandbox id (`CNI_CONTAINERID`).
    pub container_id: String,
    /// The pod's network namespace (`CNI_NETNS`); may be gone for DEL.
    pub netns: PathBuf,
    /// The interface to create inside the namespace (`CNI_IFNAME`), usually `eth0`.
    pub ifname: String,
    pub pod_namespace: String,
    pub pod_name: String,
    pub pod_uid: String,
    pub capabilities: CapabilityArgs,
}

impl Attachment {
    /// `CNI_ARGS`, the pod identity in the form kubelet-era plugins expect.
    pub fn cni_args(&self) -> Result<String, CniError> {
        capabilities::format_cni_args(&self.pod_namespace, &self.pod_name, &self.container_id, &self.pod_uid)
            .map_err(CniError::InvalidArgument)
    }

    /// The `CNI_*` variables of ADD, DEL and CHECK.
    fn env(&self) -> Result<Vec<(&'static str, OsString)>, CniError> {
        let mut id = self.container_id.chars();
        let valid_id = id.next().is_some_and(|c| c.is_ascii_alphanumeric())
            && id.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
        if !valid_id {
            return Err(CniError::InvalidArgument(format!(
                "invalid container id {:?}",
                self.container_id
            )));
        }
        if self.ifname.is_empty() {
            return Err(CniError::InvalidArgument("empty interface name".to_string()));
        }
        let mut env = vec![
            ("CNI_CONTAINERID", OsString::from(&self.container_id)),
            ("CNI_IFNAME", OsString::from(&self.ifname)),
            ("CNI_ARGS", OsString::from(self.cni_args()?)),
        ];
        if !self.netns.as_os_str().is_empty() {
            env.push(("CNI_NETNS", self.netns.clone().into_os_string()));
        }
        Ok(env)
    }
}

/// The answer of [`CniRuntime::status`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StatusOutcome {
    /// Every plugin answered STATUS with success.
    Ready,
    /// The config's `cniVersion` predates STATUS (1.1.0): treat the network
    /// as ready when [`CniRuntime::missing_plugins`] is empty.
    NotSupported { cni_version: String },
}

/// What a plugin answers to VERSION.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VersionInfo {
    pub cni_version: String,
    #[serde(default)]
    pub supported_versions: Vec<String>,
}

impl CniRuntime {
    pub fn new(plugin_dirs: Vec<PathBuf>) -> Self {
        CniRuntime {
            plugin_dirs,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// The plugin types of `net` not found in the plugin directories.
    pub fn missing_plugins(&self, net: &NetworkConfigList) -> Vec<String> {
        let mut missing: Vec<String> = Vec::new();
        for plugin_type in net.plugin_types() {
            if self.find_plugin(plugin_type).is_err() && !missing.iter().any(|m| m == plugin_type) {
                missing.push(plugin_type.to_string());
            }
        }
        missing
    }

    /// Attaches the pod: ADD through the chain in order, each plugin getting
    /// the previous one's result. If a plugin fails, the whole chain is
    /// deleted again (best effort) before the error is returned. Every plugin
    /// must exist before anything runs. If this future is dropped half-way
    /// the caller must call [`CniRuntime::del`].
    pub async fn add(&self, net: &NetworkConfigList, at: &Attachment) -> Result<CniResult, CniError> {
        net.version()?;
        let env = at.env()?;
        if at.netns.as_os_str().is_empty() {
            return Err(CniError::InvalidArgument("ADD needs a network namespace".to_string()));
        }
        let paths = net
            .plugin_types()
            .map(|plugin_type| self.find_plugin(plugin_type))
            .collect::<Result<Vec<_>, _>>()?;
        let mut last: Option<CniResult> = None;
        for (plugin, path) in net.plugins.iter().zip(&paths) {
            let plugin_type = config::plugin_type(plugin);
            let stdin = net.plugin_stdin(plugin, last.as_ref().map(CniResult::raw), Some(&at.capabilities));
            let outcome = async {
                let stdout = self
                    .invoke(Invocation {
                        command: Command::Add,
                        plugin_type,
                        plugin_path: path,
                        env: &env,
                        stdin,
                    })
                    .await?;
                CniResult::from_slice(&stdout).map_err(|e| CniError::InvalidResult {
                    plugin: plugin_type.to_string(),
                    command: Command::Add,
                    reason: e.to_string(),
                })
            }
            .await;
            match outcome {
                Ok(result) => last = Some(result),
                Err(err) => {
                    tracing::warn!(
                        network = %net.name,
                        container = %at.container_id,
                        error = %err,
                        "CNI ADD failed; deleting the partial attachment"
                    );
                    if let Err(del_err) = self.del_chain(net, &env, &at.capabilities, last.as_ref()).await {
                        tracing::warn!(error = %del_err, "cleanup after a failed CNI ADD left an error");
                    }
                    return Err(err);
                }
            }
        }
        last.ok_or_else(|| CniError::InvalidConfig {
            path: net.path.clone(),
            reason: "no plugins".to_string(),
        })
    }

    /// Detaches the pod: DEL through the chain in reverse order, going on
    /// past failures and returning the first. `prev` is the stored ADD result
    /// (passed as `prevResult` from cniVersion 0.4.0 on); without it DEL is
    /// still run. A namespace that no longer exists is passed as is. `at`
    /// must carry the capabilities given to ADD (portmap needs them to
    /// find its rules).
    pub async fn del(
        &self,
        net: &NetworkConfigList,
        at: &Attachment,
        prev: Option<&CniResult>,
    ) -> Result<(), CniError> {
        net.version()?;
        let env = at.env()?;
        self.del_chain(net, &env, &at.capabilities, prev).await
    }

    async fn del_chain(
        &self,
        net: &NetworkConfigList,
        env: &[(&'static str, OsString)],
        capabilities: &CapabilityArgs,
        prev: Option<&CniResult>,
    ) -> Result<(), CniError> {
        let prev = prev.filter(|_| net.version().is_ok_and(|v| v >= CniVersion::V0_4_0));
        let mut first_error = None;
        for plugin in net.plugins.iter().rev() {
            let plugin_type = config::plugin_type(plugin);
            let outcome = async {
                let path = self.find_plugin(plugin_type)?;
                self.invoke(Invocation {
                    command: Command::Del,
                    plugin_type,
                    plugin_path: &path,
                    env,
                    stdin: net.plugin_stdin(plugin, prev.map(CniResult::raw), Some(capabilities)),
                })
                .await
            }
            .await;
            if let Err(err) = outcome {
                tracing::warn!(network = %net.name, error = %err, "CNI DEL failed; continuing with the other plugins");
                first_error.get_or_insert(err);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Verifies the attachment: CHECK through the chain in order with the
    /// stored ADD result. Succeeds at once when the network sets
    /// `disableCheck`; configs older than 0.4.0 get [`CniError::Unsupported`].
    pub async fn check(&self, net: &NetworkConfigList, at: &Attachment, prev: &CniResult) -> Result<(), CniError> {
        if net.version()? < CniVersion::V0_4_0 {
            return Err(CniError::Unsupported {
                command: Command::Check,
                version: net.cni_version.clone(),
            });
        }
        if net.disable_check {
            return Ok(());
        }
        let env = at.env()?;
        for plugin in &net.plugins {
            let plugin_type = config::plugin_type(plugin);
            let path = self.find_plugin(plugin_type)?;
            self.invoke(Invocation {
                command: Command::Check,
                plugin_type,
                plugin_path: &path,
                env: &env,
                stdin: net.plugin_stdin(plugin, Some(prev.raw()), Some(&at.capabilities)),
            })
            .await?;
        }
        Ok(())
    }

    /// Asks every plugin whether it is ready (STATUS, cniVersion 1.1.0 and
    /// later). A plugin that is not ready gives [`CniError::Plugin`], usually
    /// with code [`codes::PLUGIN_NOT_AVAILABLE`].
    pub async fn status(&self, net: &NetworkConfigList) -> Result<StatusOutcome, CniError> {
        if net.version()? < CniVersion::V1_1_0 {
            return Ok(StatusOutcome::NotSupported {
                cni_version: net.cni_version.clone(),
            });
        }
        for plugin in &net.plugins {
            let plugin_type = config::plugin_type(plugin);
            let path = self.find_plugin(plugin_type)?;
            self.invoke(Invocation {
                command: Command::Status,
                plugin_type,
                plugin_path: &path,
                env: &[],
                stdin: net.plugin_stdin(plugin, None, None),
            })
            .await?;
        }
        Ok(StatusOutcome::Ready)
    }

    /// Asks a plugin which spec versions it speaks (VERSION), telling it the
    /// version the runtime would use.
    pub async fn version(&self, plugin_type: &str, cni_version: &str) -> Result<VersionInfo, CniError> {
        let path = self.find_plugin(plugin_type)?;
        let request: Map<String, Value> = Map::from_iter([("cniVersion".to_string(), json!(cni_version))]);
        let stdout = self
            .invoke(Invocation {
                command: Command::Version,
                plugin_type,
                plugin_path: &path,
                env: &[],
                stdin: Value::Object(request).to_string().into_bytes(),
            })
            .await?;
        serde_json::from_slice(&stdout).map_err(|e| CniError::InvalidResult {
            plugin: plugin_type.to_string(),
            command: Command::Version,
            reason: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attachment() -> Attachment {
        Attachment {
            container_id: "0123abcd".into(),
            netns: "/run/netns/x".into(),
            ifname: "eth0".into(),
            pod_namespace: "default".into(),
            pod_name: "web".into(),
            pod_uid: "uid-1".into(),
            capabilities: CapabilityArgs::default(),
        }
    }

    #[test]
    fn attachment_env() {
        let env = attachment().env().expect("valid");
        let get = |key: &str| {
            env.iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| v.to_string_lossy().into_owned())
        };
        assert_eq!(get("CNI_CONTAINERID").as_deref(), Some("0123abcd"));
        assert_eq!(get("CNI_NETNS").as_deref(), Some("/run/netns/x"));
        assert_eq!(get("CNI_IFNAME").as_deref(), Some("eth0"));
        assert_eq!(
            get("CNI_ARGS").as_deref(),
            Some(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web;K8S_POD_INFRA_CONTAINER_ID=0123abcd;K8S_POD_UID=uid-1"
            )
        );
        let no_netns = Attachment {
            netns: PathBuf::new(),
            ..attachment()
        };
        assert!(no_netns.env().expect("valid").iter().all(|(k, _)| *k != "CNI_NETNS"));
        for bad in ["", "-x", "a/b", "a b"] {
            let at = Attachment {
                container_id: bad.into(),
                ..attachment()
            };
            assert!(matches!(at.env(), Err(CniError::InvalidArgument(_))), "{bad:?}");
        }
    }

    #[test]
    fn cni_path_joins_dirs() {
        let runtime = CniRuntime::new(vec!["/opt/cni/bin".into(), "/usr/lib/cni".into()]);
        assert_eq!(runtime.cni_path(), "/opt/cni/bin:/usr/lib/cni");
        assert_eq!(CniRuntime::default().timeout, DEFAULT_TIMEOUT);
    }
}
