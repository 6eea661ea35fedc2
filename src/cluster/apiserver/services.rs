//! Service addresses: a ClusterIP from the service CIDR for each new Service
//! (unless headless or ExternalName), NodePorts from 30000-32767 for
//! NodePort services, both kept on update. What is taken is read from the
//! stored Services, so allocations survive restarts; creations are serialized.

use std::collections::HashSet;
use std::net::Ipv4Addr;

use serde_json::{Value, json};

use super::State;
use super::errors::{ApiError, ApiResult, Cause};
use crate::cluster::store::Scope;

pub const NODE_PORTS: std::ops::RangeInclusive<u16> = 30000..=32767;

fn invalid(service: &Value, field: &str, value: &str, message: &str) -> ApiError {
    let name = service.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("");
    ApiError::invalid("Service", "", name, vec![Cause::invalid(field, value, message)])
}

fn service_type(obj: &Value) -> &str {
    obj.pointer("/spec/type").and_then(Value::as_str).unwrap_or("ClusterIP")
}

/// The first address of the range, the `kubernetes` service's.
pub fn first_ip(cidr: &ipnet::Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(cidr.network()) + 1)
}

/// Fills in the ClusterIP and NodePorts of a Service being created.
pub(super) async fn allocate(state: &State, obj: &mut Value) -> ApiResult<()> {
    let kind = service_type(obj).to_string();
    let named = json!({"metadata": {"name": obj.pointer("/metadata/name").cloned().unwrap_or(Value::Null)}});
    if kind == "ExternalName" {
        return Ok(());
    }
    let (services, _) = state
        .store
        .list(&Scope::new("", "services", None))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    // A name already taken fails as the create would, not on its own address.
    let name = obj.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("");
    let namespace = obj.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or("");
    if services
        .iter()
        .any(|s| s.key.name == name && s.key.namespace == namespace)
    {
        return Err(ApiError::from_store(
            crate::cluster::store::StoreError::AlreadyExists,
            "services",
            name,
        ));
    }
    let ips: HashSet<String> = services
        .iter()
        .filter_map(|s| s.value.pointer("/spec/clusterIP")?.as_str().map(String::from))
        .collect();
    let ports: HashSet<i64> = services
        .iter()
        .flat_map(|s| {
            s.value
                .pointer("/spec/ports")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
        })
        .filter_map(|p| p.get("nodePort")?.as_i64())
        .collect();
    let cidr = state.service_cidr;
    let requested = obj
        .pointer("/spec/clusterIP")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let ip = match requested.as_str() {
        "None" => "None".to_string(),
        "" => {
            let hosts = cidr.hosts().skip(1);
            hosts
                .map(|ip| ip.to_string())
                .find(|ip| !ips.contains(ip))
                .ok_or_else(|| invalid(&named, "spec.clusterIP", "", &format!("no free address left in {cidr}")))?
        }
        wanted => {
            let addr: Ipv4Addr = wanted
                .parse()
                .map_err(|_| invalid(&named, "spec.clusterIP", wanted, "must be a valid IP address"))?;
            if !cidr.contains(&addr) || addr == cidr.network() || addr == cidr.broadcast() {
                return Err(invalid(
                    &named,
                    "spec.clusterIP",
                    wanted,
                    &format!("provided IP is not in the valid range. The range of valid IPs is {cidr}"),
                ));
            }
            if ips.contains(wanted) {
                return Err(invalid(
                    &named,
                    "spec.clusterIP",
                    wanted,
                    "provided IP is already allocated",
                ));
            }
            wanted.to_string()
        }
    };
    if ip == "None" && kind != "ClusterIP" {
        return Err(invalid(
            &named,
            "spec.clusterIP",
            "None",
            "may only be set to None for ClusterIP services",
        ));
    }
    obj["spec"]["clusterIP"] = json!(ip);
    if ip != "None" {
        obj["spec"]["clusterIPs"] = json!([ip]);
    }
    if kind == "NodePort" || kind == "LoadBalancer" {
        let mut taken = ports;
        for (i, port) in obj
            .pointer_mut("/spec/ports")
            .and_then(Value::as_array_mut)
            .into_iter()
            .flatten()
            .enumerate()
        {
            let field = format!("spec.ports[{i}].nodePort");
            let node_port = match port.get("nodePort").and_then(Value::as_i64) {
                Some(n) if n != 0 => {
                    if !NODE_PORTS.contains(&(n as u16)) || n > 65535 {
                        return Err(invalid(
                            &named,
                            &field,
                            &n.to_string(),
                            "provided port is not in the valid range. The range of valid ports is 30000-32767",
                        ));
                    }
                    if taken.contains(&n) {
                        return Err(invalid(
                            &named,
                            &field,
                            &n.to_string(),
                            "provided port is already allocated",
                        ));
                    }
                    n
                }
                _ => NODE_PORTS
                    .map(i64::from)
                    .find(|n| !taken.contains(n))
                    .ok_or_else(|| invalid(&named, &field, "", "no free node port left"))?,
            };
            taken.insert(node_port);
            port["nodePort"] = json!(node_port);
        }
    }
    Ok(())
}

/// On update: the ClusterIP cannot change (an empty one keeps the old), NodePorts stay.
pub(super) fn keep_addresses(old: &Value, new: &mut Value) -> ApiResult<()> {
    let old_ip = old.pointer("/spec/clusterIP").and_then(Value::as_str).unwrap_or("");
    let new_ip = new.pointer("/spec/clusterIP").and_then(Value::as_str).unwrap_or("");
    if new_ip.is_empty() || new_ip == old_ip {
        if !old_ip.is_empty() {
            new["spec"]["clusterIP"] = json!(old_ip);
            if let Some(ips) = old.pointer("/spec/clusterIPs") {
                new["spec"]["clusterIPs"] = ips.clone();
            }
        }
    } else if !old_ip.is_empty() {
        return Err(invalid(new, "spec.clusterIP", new_ip, "field is immutable"));
    }
    let old_ports: Vec<(i64, i64)> = old
        .pointer("/spec/ports")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|p| Some((p.get("port")?.as_i64()?, p.get("nodePort")?.as_i64()?)))
        .collect();
    if matches!(service_type(new), "NodePort" | "LoadBalancer") {
        for port in new
            .pointer_mut("/spec/ports")
            .and_then(Value::as_array_mut)
            .into_iter()
            .flatten()
        {
            let number = port.get("port").and_then(Value::as_i64);
            if port.get("nodePort").and_then(Value::as_i64).is_none_or(|n| n == 0)
                && let Some((_, node_port)) = old_ports.iter().find(|(p, _)| Some(*p) == number)
            {
                port["nodePort"] = json!(node_port);
            }
        }
    }
    Ok(())
}
