//! Runtime-provided capability arguments (`runtimeConfig`) and `CNI_ARGS`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Per-pod data the runtime hands to plugins that declare the matching
/// capability. DEL must get the same values as ADD (portmap, for one, only
/// removes the mappings it is told about).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CapabilityArgs {
    /// `portMappings`; passed only when non-empty.
    pub port_mappings: Vec<PortMapping>,
    /// `bandwidth`.
    pub bandwidth: Option<Bandwidth>,
    /// `dns`.
    pub dns: Option<Dns>,
    /// `ips`: requested addresses in CIDR form; passed only when non-empty.
    pub ips: Vec<String>,
    /// `mac`.
    pub mac: Option<String>,
    /// Any further capability by its name (e.g. `io.kubernetes.cri.pod-annotations`).
    pub other: BTreeMap<String, Value>,
}

/// One `portMappings` entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortMapping {
    pub host_port: u16,
    pub container_port: u16,
    pub protocol: Protocol,
    /// Empty means all host addresses.
    #[serde(rename = "hostIP", default, skip_serializing_if = "String::is_empty")]
    pub host_ip: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

/// Traffic shaping, rates in bits per second and bursts in bits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Bandwidth {
    pub ingress_rate: u64,
    pub ingress_burst: u64,
    pub egress_rate: u64,
    pub egress_burst: u64,
}

/// The pod's DNS settings.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dns {
    pub servers: Vec<String>,
    pub searches: Vec<String>,
    pub options: Vec<String>,
}

impl CapabilityArgs {
    /// The `runtimeConfig` for one plugin: every capability the plugin sets
    /// to `true` in its `capabilities` map and for which there is a value.
    pub fn runtime_config_for(&self, plugin: &Map<String, Value>) -> Map<String, Value> {
        let mut runtime_config = Map::new();
        let Some(Value::Object(declared)) = plugin.get("capabilities") else {
            return runtime_config;
        };
        for (name, enabled) in declared {
            if enabled != &Value::Bool(true) {
                continue;
            }
            if let Some(value) = self.value_of(name) {
                runtime_config.insert(name.clone(), value);
            }
        }
        runtime_config
    }

    fn value_of(&self, capability: &str) -> Option<Value> {
        match capability {
            "portMappings" if !self.port_mappings.is_empty() => Some(to_json(&self.port_mappings)),
            "bandwidth" => self.bandwidth.as_ref().map(to_json),
            "dns" => self.dns.as_ref().map(to_json),
            "ips" if !self.ips.is_empty() => Some(to_json(&self.ips)),
            "mac" => self.mac.as_ref().map(to_json),
            other => self.other.get(other).cloned(),
        }
    }
}

/// Serializes the capability types, which are plain strings and integers and
/// so cannot fail.
fn to_json<T: Serialize>(value: &T) -> Value {
    serde_json::to_value(value).unwrap_or(Value::Null)
}

/// The pod identity passed in `CNI_ARGS`.
pub(super) fn format_cni_args(
    pod_namespace: &str,
    pod_name: &str,
    container_id: &str,
    pod_uid: &str,
) -> Result<String, String> {
    let pairs = [
        ("K8S_POD_NAMESPACE", pod_namespace),
        ("K8S_POD_NAME", pod_name),
        ("K8S_POD_INFRA_CONTAINER_ID", container_id),
        ("K8S_POD_UID", pod_uid),
    ];
    let mut args = String::from("IgnoreUnknown=1");
    for (key, value) in pairs {
        if value.contains([';', '=']) {
            return Err(format!("{key} value {value:?} must not contain ';' or '='"));
        }
        args.push(';');
        args.push_str(key);
        args.push('=');
        args.push_str(value);
    }
    Ok(args)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn plugin(capabilities: Value) -> Map<String, Value> {
        let Value::Object(map) = json!({"type": "x", "capabilities": capabilities}) else {
            unreachable!("literal object")
        };
        map
    }

    fn args() -> CapabilityArgs {
        CapabilityArgs {
            port_mappings: vec![PortMapping {
                host_port: 8080,
                container_port: 80,
                protocol: Protocol::Tcp,
                host_ip: String::new(),
            }],
            bandwidth: Some(Bandwidth {
                ingress_rate: 1_000_000,
                ingress_burst: 2_000_000,
                egress_rate: 3_000_000,
                egress_burst: 4_000_000,
            }),
            dns: Some(Dns {
                servers: vec!["10.96.0.10".into()],
                searches: vec!["svc.cluster.local".into()],
                options: vec!["ndots:5".into()],
            }),
            ips: Vec::new(),
            mac: Some("02:00:00:00:00:01".into()),
            other: BTreeMap::from([("cgroupPath".to_string(), json!("/kubepods/pod1"))]),
        }
    }

    #[test]
    fn runtime_config_only_has_declared_capabilities() {
        let args = args();
        let rc = args.runtime_config_for(&plugin(json!({"portMappings": true, "bandwidth": false})));
        assert_eq!(
            Value::Object(rc),
            json!({"portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]})
        );
        let rc = args.runtime_config_for(&plugin(
            json!({"bandwidth": true, "dns": true, "mac": true, "ips": true, "cgroupPath": true}),
        ));
        assert_eq!(
            Value::Object(rc),
            json!({
                "bandwidth": {"ingressRate": 1_000_000, "ingressBurst": 2_000_000, "egressRate": 3_000_000, "egressBurst": 4_000_000},
                "dns": {"servers": ["10.96.0.10"], "searches": ["svc.cluster.local"], "options": ["ndots:5"]},
                "mac": "02:00:00:00:00:01",
                "cgroupPath": "/kubepods/pod1",
            })
        );
        let with_ips = CapabilityArgs {
            ips: vec!["10.1.2.3/24".into()],
            ..CapabilityArgs::default()
        };
        let rc = with_ips.runtime_config_for(&plugin(json!({"ips": true, "portMappings": true})));
        assert_eq!(Value::Object(rc), json!({"ips": ["10.1.2.3/24"]}));
        assert!(args.runtime_config_for(&plugin(json!("yes"))).is_empty());
        let no_capabilities = Map::from_iter([("type".to_string(), json!("bridge"))]);
        assert!(args.runtime_config_for(&no_capabilities).is_empty());
        // Nothing to say about an empty list.
        let empty = CapabilityArgs::default();
        assert!(
            empty
                .runtime_config_for(&plugin(json!({"portMappings": true})))
                .is_empty()
        );
    }

    #[test]
    fn host_ip_is_passed_when_set() {
        let mut args = args();
        args.port_mappings[0].host_ip = "192.0.2.2".into();
        args.port_mappings[0].protocol = Protocol::Sctp;
        let rc = args.runtime_config_for(&plugin(json!({"portMappings": true})));
        assert_eq!(rc["portMappings"][0]["hostIP"], "192.0.2.2");
        assert_eq!(rc["portMappings"][0]["protocol"], "sctp");
    }

    #[test]
    fn cni_args_format() {
        assert_eq!(
            format_cni_args("default", "web-0", "abc123", "6f1c").expect("valid"),
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=abc123;K8S_POD_UID=6f1c"
        );
        assert!(format_cni_args("a;b", "n", "c", "u").is_err());
        assert!(format_cni_args("a", "n=1", "c", "u").is_err());
    }
}
