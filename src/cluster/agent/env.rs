//! A container's environment: Services' variables (`<NAME>_SERVICE_HOST`...),
//! then `envFrom` and `env` with values from ConfigMaps, Secrets, the
//! downward API (fields and resources) and `$(VAR)` references.

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::api::core::v1::{
    ConfigMap, Container, ObjectFieldSelector, Pod, ResourceFieldSelector, Secret, Service,
};

use super::quantity;
use crate::cluster::client::Client;

/// Facts the downward API reads that are not in the pod object yet.
pub struct Downward<'a> {
    pub pod: &'a Pod,
    pub pod_ip: &'a str,
    pub host_ip: &'a str,
    pub node_cpus: usize,
    pub node_memory: u64,
}

/// ConfigMaps and Secrets read once per container start.
#[derive(Default)]
pub struct Sources {
    config_maps: HashMap<String, Option<BTreeMap<String, String>>>,
    secrets: HashMap<String, Option<BTreeMap<String, Vec<u8>>>>,
}

impl Sources {
    pub async fn config_map(
        &mut self,
        client: &Client,
        namespace: &str,
        name: &str,
    ) -> Result<Option<BTreeMap<String, String>>, String> {
        if let Some(found) = self.config_maps.get(name) {
            return Ok(found.clone());
        }
        let found: Option<ConfigMap> = client
            .get_opt(Some(namespace), name)
            .await
            .map_err(|e| format!("reading configmap {name:?}: {e}"))?;
        let data = found.map(|cm| {
            let mut data = cm.data.unwrap_or_default();
            for (key, bytes) in cm.binary_data.unwrap_or_default() {
                data.insert(key, String::from_utf8_lossy(&bytes.0).into_owned());
            }
            data
        });
        self.config_maps.insert(name.into(), data.clone());
        Ok(data)
    }

    pub async fn secret(
        &mut self,
        client: &Client,
        namespace: &str,
        name: &str,
    ) -> Result<Option<BTreeMap<String, String>>, String> {
        Ok(self.secret_bytes(client, namespace, name).await?.map(|data| {
            data.into_iter()
                .map(|(k, v)| (k, String::from_utf8_lossy(&v).into_owned()))
                .collect()
        }))
    }

    pub async fn secret_bytes(
        &mut self,
        client: &Client,
        namespace: &str,
        name: &str,
    ) -> Result<Option<BTreeMap<String, Vec<u8>>>, String> {
        if let Some(found) = self.secrets.get(name) {
            return Ok(found.clone());
        }
        let found: Option<Secret> = client
            .get_opt(Some(namespace), name)
            .await
            .map_err(|e| format!("reading secret {name:?}: {e}"))?;
        let data = found.map(|s| {
            let mut data: BTreeMap<String, Vec<u8>> =
                s.data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.0)).collect();
            // The API server may keep write-only `stringData` as it came.
            for (k, v) in s.string_data.unwrap_or_default() {
                data.insert(k, v.into_bytes());
            }
            data
        });
        self.secrets.insert(name.into(), data.clone());
        Ok(data)
    }
}

/// Resolves the container's environment in Kubernetes order: `envFrom`
/// sources first, then `env` entries (later ones win). A missing required
/// source is an error (CreateContainerConfigError).
/// The variables Services give a pod, as kubelet sets them: its namespace's
/// Services (unless `enableServiceLinks: false`) and the `kubernetes` Service.
pub async fn service_links(client: &Client, pod: &Pod) -> Result<Vec<(String, String)>, String> {
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    let links = pod.spec.as_ref().and_then(|s| s.enable_service_links).unwrap_or(true);
    let mut services: Vec<Service> = Vec::new();
    if links {
        let params = crate::cluster::client::ListParams::default();
        let list = client
            .list::<Service>(Some(namespace), &params)
            .await
            .map_err(|e| format!("listing the services of namespace {namespace}: {e}"))?;
        services.extend(list.items);
    }
    if namespace != "default" || !links {
        let master = client
            .get_opt::<Service>(Some("default"), "kubernetes")
            .await
            .map_err(|e| format!("reading the kubernetes service: {e}"))?;
        services.extend(master);
    }
    Ok(service_vars(&services))
}

/// `<NAME>_SERVICE_HOST`, `<NAME>_SERVICE_PORT[_<PORT NAME>]` and the Docker
/// link variables (`<NAME>_PORT`, `<NAME>_PORT_<port>_<PROTO>[_PROTO|_PORT|_ADDR]`).
pub fn service_vars(services: &[Service]) -> Vec<(String, String)> {
    let mut vars = Vec::new();
    for service in services {
        let (Some(name), Some(spec)) = (&service.metadata.name, &service.spec) else {
            continue;
        };
        let Some(ip) = spec.cluster_ip.as_deref().filter(|ip| !ip.is_empty() && *ip != "None") else {
            continue;
        };
        let ports = spec.ports.as_deref().unwrap_or_default();
        let Some(first) = ports.first() else { continue };
        let prefix = name.to_uppercase().replace('-', "_");
        vars.push((format!("{prefix}_SERVICE_HOST"), ip.to_string()));
        vars.push((format!("{prefix}_SERVICE_PORT"), first.port.to_string()));
        for port in ports {
            if let Some(port_name) = port.name.as_deref().filter(|n| !n.is_empty()) {
                let suffix = port_name.to_uppercase().replace('-', "_");
                vars.push((format!("{prefix}_SERVICE_PORT_{suffix}"), port.port.to_string()));
            }
        }
        let protocol = |p: &k8s_openapi::api::core::v1::ServicePort| p.protocol.clone().unwrap_or_else(|| "TCP".into());
        vars.push((
            format!("{prefix}_PORT"),
            format!("{}://{ip}:{}", protocol(first).to_lowercase(), first.port),
        ));
        for port in ports {
            let proto = protocol(port);
            let base = format!("{prefix}_PORT_{}_{}", port.port, proto.to_uppercase());
            vars.push((base.clone(), format!("{}://{ip}:{}", proto.to_lowercase(), port.port)));
            vars.push((format!("{base}_PROTO"), proto.to_lowercase()));
            vars.push((format!("{base}_PORT"), port.port.to_string()));
            vars.push((format!("{base}_ADDR"), ip.to_string()));
        }
    }
    vars
}

/// The container's variables, on top of `base` (the Services' ones): a name set later wins.
pub async fn resolve(
    client: &Client,
    sources: &mut Sources,
    facts: &Downward<'_>,
    container: &Container,
    base: Vec<(String, String)>,
) -> Result<Vec<(String, String)>, String> {
    let namespace = facts.pod.metadata.namespace.as_deref().unwrap_or("default");
    let mut vars: Vec<(String, String)> = base;
    let set = |vars: &mut Vec<(String, String)>, name: String, value: String| {
        vars.retain(|(n, _)| *n != name);
        vars.push((name, value));
    };
    for from in container.env_from.iter().flatten() {
        let prefix = from.prefix.clone().unwrap_or_default();
        let (data, optional, what) = if let Some(cm) = &from.config_map_ref {
            let data = sources.config_map(client, namespace, &cm.name).await?;
            (data, cm.optional.unwrap_or(false), format!("configmap {:?}", cm.name))
        } else if let Some(s) = &from.secret_ref {
            let data = sources.secret(client, namespace, &s.name).await?;
            (data, s.optional.unwrap_or(false), format!("secret {:?}", s.name))
        } else {
            continue;
        };
        match data {
            Some(data) => {
                for (key, value) in data {
                    let name = format!("{prefix}{key}");
                    if valid_env_name(&name) {
                        set(&mut vars, name, value);
                    }
                }
            }
            None if optional => {}
            None => return Err(format!("{what} not found")),
        }
    }
    for entry in container.env.iter().flatten() {
        let value = if let Some(source) = &entry.value_from {
            if let Some(r) = &source.config_map_key_ref {
                let data = sources.config_map(client, namespace, &r.name).await?;
                match data.and_then(|d| d.get(&r.key).cloned()) {
                    Some(v) => v,
                    None if r.optional.unwrap_or(false) => continue,
                    None => {
                        return Err(format!(
                            "couldn't find key {} in ConfigMap {}/{}",
                            r.key, namespace, r.name
                        ));
                    }
                }
            } else if let Some(r) = &source.secret_key_ref {
                let data = sources.secret(client, namespace, &r.name).await?;
                match data.and_then(|d| d.get(&r.key).cloned()) {
                    Some(v) => v,
                    None if r.optional.unwrap_or(false) => continue,
                    None => {
                        return Err(format!(
                            "couldn't find key {} in Secret {}/{}",
                            r.key, namespace, r.name
                        ));
                    }
                }
            } else if let Some(field) = &source.field_ref {
                field_value(facts, field)?
            } else if let Some(resource) = &source.resource_field_ref {
                resource_value(facts, Some(container), resource)?
            } else {
                String::new()
            }
        } else {
            expand(entry.value.as_deref().unwrap_or_default(), &vars)
        };
        set(&mut vars, entry.name.clone(), value);
    }
    Ok(vars)
}

fn valid_env_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// `$(VAR)` -> its value when defined; `$$` -> `$`; anything else stays.
pub fn expand(text: &str, vars: &[(String, String)]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(body) = after.strip_prefix('(')
            && let Some(end) = body.find(')')
        {
            let name = &body[..end];
            match vars.iter().rev().find(|(n, _)| n == name) {
                Some((_, value)) => out.push_str(value),
                None => out.push_str(&rest[at..at + end + 3]),
            }
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// A downward-API field of the pod.
pub fn field_value(facts: &Downward<'_>, field: &ObjectFieldSelector) -> Result<String, String> {
    let meta = &facts.pod.metadata;
    let spec = facts.pod.spec.clone().unwrap_or_default();
    let path = field.field_path.as_str();
    let map_entry = |map: &Option<BTreeMap<String, String>>, prefix: &str| {
        let key = path.strip_prefix(prefix)?.strip_suffix("']")?;
        Some(map.as_ref().and_then(|m| m.get(key).cloned()).unwrap_or_default())
    };
    Ok(match path {
        "metadata.name" => meta.name.clone().unwrap_or_default(),
        "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "metadata.labels" => render_map(&meta.labels),
        "metadata.annotations" => render_map(&meta.annotations),
        "spec.nodeName" => spec.node_name.unwrap_or_default(),
        "spec.serviceAccountName" => spec.service_account_name.unwrap_or_default(),
        "status.podIP" | "status.podIPs" => facts.pod_ip.to_string(),
        "status.hostIP" | "status.hostIPs" => facts.host_ip.to_string(),
        _ => {
            if let Some(v) = map_entry(&meta.labels, "metadata.labels['") {
                v
            } else if let Some(v) = map_entry(&meta.annotations, "metadata.annotations['") {
                v
            } else {
                return Err(format!("unsupported fieldPath {path:?}"));
            }
        }
    })
}

/// `key="value"` lines, as the downward API writes label and annotation files.
fn render_map(map: &Option<BTreeMap<String, String>>) -> String {
    map.iter()
        .flatten()
        .map(|(k, v)| format!("{k}={v:?}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A container's resource limit or request in units of the divisor, rounded up;
/// an unset limit is the node's allocatable.
pub fn resource_value(
    facts: &Downward<'_>,
    container: Option<&Container>,
    selector: &ResourceFieldSelector,
) -> Result<String, String> {
    let spec = facts.pod.spec.clone().unwrap_or_default();
    let container = match &selector.container_name {
        Some(name) if !name.is_empty() => spec
            .containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
            .find(|c| &c.name == name)
            .cloned(),
        _ => container.cloned(),
    }
    .ok_or_else(|| format!("resourceFieldRef {:?} names no container", selector.resource))?;
    let resources = container.resources.as_ref();
    let (kind, name) = selector
        .resource
        .split_once('.')
        .ok_or_else(|| format!("unsupported resource {:?}", selector.resource))?;
    let value = match kind {
        "limits" => quantity::limit(resources, name).and_then(|q| quantity::parse(&q.0)),
        "requests" => quantity::request(resources, name).and_then(|q| quantity::parse(&q.0)),
        _ => return Err(format!("unsupported resource {:?}", selector.resource)),
    };
    let value = match (value, kind, name) {
        (Some(v), _, _) => v,
        (None, "limits", "cpu") => facts.node_cpus as f64,
        (None, "limits", "memory") => facts.node_memory as f64,
        _ => 0.0,
    };
    let divisor = selector
        .divisor
        .as_ref()
        .and_then(|d| quantity::parse(&d.0))
        .filter(|d| *d > 0.0)
        .unwrap_or(1.0);
    Ok(format!("{}", (value / divisor).ceil() as i64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn services_give_kubelet_style_variables() {
        let services: Vec<Service> = serde_json::from_value(serde_json::json!([
            {"metadata": {"name": "web-db"},
             "spec": {"clusterIP": "10.96.0.7", "ports": [{"name": "pg-main", "port": 5432}, {"port": 53, "protocol": "UDP"}]}},
            {"metadata": {"name": "headless"}, "spec": {"clusterIP": "None", "ports": [{"port": 80}]}},
        ]))
        .unwrap();
        let vars: BTreeMap<String, String> = service_vars(&services).into_iter().collect();
        let get = |k: &str| vars.get(k).map(String::as_str);
        assert_eq!(get("WEB_DB_SERVICE_HOST"), Some("10.96.0.7"));
        assert_eq!(get("WEB_DB_SERVICE_PORT"), Some("5432"));
        assert_eq!(get("WEB_DB_SERVICE_PORT_PG_MAIN"), Some("5432"));
        assert_eq!(get("WEB_DB_PORT"), Some("tcp://10.96.0.7:5432"));
        assert_eq!(get("WEB_DB_PORT_53_UDP"), Some("udp://10.96.0.7:53"));
        assert_eq!(get("WEB_DB_PORT_53_UDP_PROTO"), Some("udp"));
        assert_eq!(get("WEB_DB_PORT_5432_TCP_ADDR"), Some("10.96.0.7"));
        assert_eq!(get("WEB_DB_PORT_5432_TCP_PORT"), Some("5432"));
        assert!(!vars.keys().any(|k| k.starts_with("HEADLESS")));
    }

    #[test]
    fn expansion() {
        let vars = vec![("A".to_string(), "1".to_string()), ("B".to_string(), "x".to_string())];
        assert_eq!(expand("$(A)-$(B)", &vars), "1-x");
        assert_eq!(expand("$(C) $$(A) $", &vars), "$(C) $(A) $");
        assert_eq!(expand("a$(A", &vars), "a$(A");
    }

    #[test]
    fn downward_fields_and_resources() {
        let pod: Pod = serde_saphyr::from_str(
            "metadata: {name: p, namespace: n, uid: u, labels: {app: web}}
spec:
  nodeName: node1
  containers:
  - name: c
    image: x
    resources: {limits: {memory: 64Mi}, requests: {cpu: 250m}}",
        )
        .unwrap();
        let facts = Downward {
            pod: &pod,
            pod_ip: "10.0.0.2",
            host_ip: "192.168.1.1",
            node_cpus: 4,
            node_memory: 1 << 30,
        };
        let field = |p: &str| {
            field_value(
                &facts,
                &ObjectFieldSelector {
                    field_path: p.into(),
                    api_version: None,
                },
            )
            .unwrap()
        };
        assert_eq!(field("metadata.labels['app']"), "web");
        assert_eq!(field("metadata.labels"), "app=\"web\"");
        assert_eq!(field("spec.nodeName"), "node1");
        assert_eq!(field("status.podIP"), "10.0.0.2");
        let c = &pod.spec.as_ref().unwrap().containers[0];
        let res = |r: &str, d: Option<&str>| {
            resource_value(
                &facts,
                Some(c),
                &ResourceFieldSelector {
                    resource: r.into(),
                    divisor: d.map(|d| k8s_openapi::apimachinery::pkg::api::resource::Quantity(d.into())),
                    container_name: None,
                },
            )
            .unwrap()
        };
        assert_eq!(res("limits.memory", Some("1Mi")), "64");
        assert_eq!(res("limits.cpu", None), "4");
        assert_eq!(res("requests.cpu", Some("1m")), "250");
        assert_eq!(res("requests.cpu", None), "1");
    }
}
