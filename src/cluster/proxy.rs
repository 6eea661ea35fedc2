//! The service proxy: programs an nftables table of its own so that
//! connections to a Service's ClusterIP:port, and to its NodePorts on this
//! machine's addresses, go to one of its ready endpoints, picked at random per
//! connection (`sessionAffinity: ClientIP` keeps a client on one endpoint for
//! its timeout). A Service port without ready endpoints is refused (TCP reset,
//! ICMP unreachable for UDP). Service traffic is masqueraded, so replies come
//! back through this machine whatever the source (the host, a pod on any
//! bridge, a pod reaching itself). The whole table is replaced in one `nft`
//! transaction per change; it is removed when the cluster stops.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use tokio::sync::broadcast::error::RecvError;

use crate::cluster::client::{Client, ListParams};
use crate::cluster::controllers::endpoints::SERVICE_NAME_LABEL;
use crate::cluster::informer::Informer;

/// Packets of service connections, to be masqueraded.
const MASQUERADE_MARK: u32 = 0x0050_0000;
const RESYNC: Duration = Duration::from_secs(60);

/// The table of the cluster whose data dir this is (short: nft names are limited).
pub fn table_name(data_dir: &Path) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(data_dir.as_os_str().as_encoded_bytes());
    format!("podvisor_svc_{}", hex::encode(&digest[..4]))
}

/// One Service port as programmed: where it listens and where it goes.
#[derive(Clone, Debug, PartialEq)]
pub struct ServicePort {
    pub cluster_ip: Option<String>,
    pub node_port: Option<u16>,
    pub port: u16,
    /// "tcp", "udp" or "sctp".
    pub protocol: String,
    /// Ready endpoints as (ip, port).
    pub endpoints: Vec<(String, u16)>,
    /// ClientIP affinity timeout.
    pub affinity: Option<u32>,
}

/// Every Service port with its ready endpoints (headless and ExternalName Services have none).
pub fn service_ports(services: &[Service], slices: &[EndpointSlice]) -> Vec<ServicePort> {
    let mut out = Vec::new();
    for service in services {
        let Some(spec) = service.spec.as_ref() else { continue };
        let cluster_ip = spec.cluster_ip.clone().filter(|ip| !ip.is_empty() && ip != "None");
        if cluster_ip.is_none() || spec.type_.as_deref() == Some("ExternalName") {
            continue;
        }
        let name = service.metadata.name.as_deref();
        let namespace = service.metadata.namespace.as_deref();
        let own_slices: Vec<&EndpointSlice> = slices
            .iter()
            .filter(|s| s.metadata.namespace.as_deref() == namespace)
            .filter(|s| {
                s.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(SERVICE_NAME_LABEL))
                    .map(String::as_str)
                    == name
            })
            .collect();
        let affinity = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
            spec.session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .unwrap_or(10_800) as u32
        });
        for port in spec.ports.iter().flatten() {
            let port_name = port.name.clone().unwrap_or_default();
            let protocol = port.protocol.clone().unwrap_or_else(|| "TCP".into()).to_lowercase();
            let mut endpoints = Vec::new();
            for slice in &own_slices {
                let Some(target) = slice
                    .ports
                    .iter()
                    .flatten()
                    .find(|p| p.name.clone().unwrap_or_default() == port_name)
                    .and_then(|p| p.port)
                else {
                    continue;
                };
                for endpoint in &slice.endpoints {
                    if endpoint.conditions.as_ref().and_then(|c| c.ready) != Some(true) {
                        continue;
                    }
                    for address in &endpoint.addresses {
                        endpoints.push((address.clone(), target as u16));
                    }
                }
            }
            endpoints.sort();
            endpoints.dedup();
            out.push(ServicePort {
                cluster_ip: cluster_ip.clone(),
                node_port: port.node_port.filter(|p| *p > 0).map(|p| p as u16),
                port: port.port as u16,
                protocol,
                endpoints,
                affinity,
            });
        }
    }
    out
}

/// The table's full text, for `nft -f -` (deleting and recreating it in one transaction).
pub fn ruleset(table: &str, ports: &[ServicePort], exists: bool) -> String {
    let mut s = String::new();
    if exists {
        let _ = writeln!(s, "delete table ip {table}");
    }
    let _ = writeln!(s, "table ip {table} {{");
    for (chain, kind, hook, priority) in [
        ("prerouting", "nat", "prerouting", "dstnat"),
        ("output", "nat", "output", "-100"),
        ("postrouting", "nat", "postrouting", "srcnat"),
        ("reject_forward", "filter", "forward", "filter"),
        ("reject_local", "filter", "output", "filter"),
        ("reject_input", "filter", "input", "filter"),
    ] {
        let _ = writeln!(
            s,
            "  chain {chain} {{ type {kind} hook {hook} priority {priority}; policy accept; }}"
        );
    }
    let _ = writeln!(s, "  chain services {{ }}");
    let _ = writeln!(s, "  chain refused {{ }}");
    let _ = writeln!(s, "}}");
    let rule = |s: &mut String, chain: &str, text: &str| {
        let _ = writeln!(s, "add rule ip {table} {chain} {text}");
    };
    for chain in ["prerouting", "output"] {
        rule(&mut s, chain, "jump services");
    }
    for chain in ["reject_forward", "reject_local", "reject_input"] {
        rule(&mut s, chain, "jump refused");
    }
    rule(
        &mut s,
        "postrouting",
        &format!("meta mark & {MASQUERADE_MARK:#x} == {MASQUERADE_MARK:#x} masquerade"),
    );
    let mut affinity_sets = BTreeMap::new();
    for (i, port) in ports.iter().enumerate() {
        let proto = &port.protocol;
        let mut matches = Vec::new();
        if let Some(ip) = &port.cluster_ip {
            matches.push(format!("ip daddr {ip} {proto} dport {}", port.port));
        }
        if let Some(node_port) = port.node_port {
            matches.push(format!("fib daddr type local {proto} dport {node_port}"));
        }
        if port.endpoints.is_empty() {
            let refusal = if proto == "tcp" {
                "reject with tcp reset"
            } else {
                "reject"
            };
            for m in &matches {
                rule(&mut s, "refused", &format!("{m} {refusal}"));
            }
            continue;
        }
        let chain = format!("svc_{i}");
        let _ = writeln!(s, "add chain ip {table} {chain}");
        for m in &matches {
            rule(&mut s, "services", &format!("{m} jump {chain}"));
        }
        rule(
            &mut s,
            &chain,
            &format!("meta mark set meta mark | {MASQUERADE_MARK:#x}"),
        );
        if let Some(timeout) = port.affinity {
            // The endpoint a client used last, while it keeps coming back.
            let set = format!("affinity_{i}");
            affinity_sets.insert(set.clone(), timeout);
            let _ = writeln!(
                s,
                "add map ip {table} {set} {{ type ipv4_addr : ipv4_addr . inet_service; flags dynamic,timeout; timeout {timeout}s; }}"
            );
            rule(
                &mut s,
                &chain,
                &format!("meta l4proto {proto} ip saddr @{set} dnat ip addr . port to ip saddr map @{set}"),
            );
        }
        let endpoint_chain = |j: usize| format!("svc_{i}_ep_{j}");
        for (j, (ip, target)) in port.endpoints.iter().enumerate() {
            let _ = writeln!(s, "add chain ip {table} {}", endpoint_chain(j));
            if port.affinity.is_some() {
                rule(
                    &mut s,
                    &endpoint_chain(j),
                    &format!("update @affinity_{i} {{ ip saddr : {ip} . {target} }}"),
                );
            }
            rule(
                &mut s,
                &endpoint_chain(j),
                &format!("meta l4proto {proto} dnat ip to {ip}:{target}"),
            );
        }
        let choices: Vec<String> = (0..port.endpoints.len())
            .map(|j| format!("{j} : jump {}", endpoint_chain(j)))
            .collect();
        rule(
            &mut s,
            &chain,
            &format!(
                "numgen random mod {} vmap {{ {} }}",
                port.endpoints.len(),
                choices.join(", ")
            ),
        );
    }
    s
}

async fn nft(args: &[&str], input: Option<&str>) -> Result<(), String> {
    use tokio::io::AsyncWriteExt;
    let mut command = tokio::process::Command::new("nft");
    crate::sys::netns::enter_node(&mut command).map_err(|e| format!("running nft: {e}"))?;
    let mut child = command
        .args(args)
        .stdin(if input.is_some() {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        })
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("running nft: {e}"))?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin
            .write_all(text.as_bytes())
            .await
            .map_err(|e| format!("writing to nft: {e}"))?;
    }
    let out = child.wait_with_output().await.map_err(|e| format!("nft: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "nft {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

async fn table_exists(table: &str) -> bool {
    nft(&["list", "table", "ip", table], None).await.is_ok()
}

/// Removes the proxy's table (when the cluster stops).
pub async fn remove_table(table: &str) {
    if table_exists(table).await
        && let Err(e) = nft(&["delete", "table", "ip", table], None).await
    {
        tracing::warn!(table, error = %e, "removing the service proxy's table");
    }
}

pub fn spawn(client: Client, table: String) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let services: Informer<Service> = Informer::spawn(client.clone(), None, ListParams::default());
        let slices: Informer<EndpointSlice> = Informer::spawn(client, None, ListParams::default());
        let mut service_changes = services.subscribe();
        let mut slice_changes = slices.subscribe();
        services.wait_synced().await;
        slices.wait_synced().await;
        let mut programmed: Option<Vec<ServicePort>> = None;
        loop {
            let ports = service_ports(&services.list(), &slices.list());
            if programmed.as_ref() != Some(&ports) {
                let text = ruleset(&table, &ports, table_exists(&table).await);
                match nft(&["-f", "-"], Some(&text)).await {
                    Ok(()) => {
                        tracing::debug!(table, ports = ports.len(), "service rules programmed");
                        programmed = Some(ports);
                    }
                    Err(e) => tracing::warn!(table, error = %e, "programming service rules; will retry"),
                }
            }
            let retry = programmed.is_none();
            tokio::select! {
                _ = tokio::time::sleep(if retry { Duration::from_secs(1) } else { RESYNC }) => programmed = programmed.filter(|_| !retry),
                change = service_changes.recv() => if matches!(change, Err(RecvError::Closed)) { return },
                change = slice_changes.recv() => if matches!(change, Err(RecvError::Closed)) { return },
            }
            while service_changes.try_recv().is_ok() || slice_changes.try_recv().is_ok() {}
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ports_take_ready_endpoints_of_their_slices() {
        let services: Vec<Service> = serde_json::from_value(json!([
            {"metadata": {"name": "web", "namespace": "default"},
             "spec": {"clusterIP": "10.96.0.5", "type": "NodePort", "sessionAffinity": "ClientIP",
                      "ports": [{"name": "http", "port": 80, "nodePort": 30080, "protocol": "TCP"}]}},
            {"metadata": {"name": "headless", "namespace": "default"},
             "spec": {"clusterIP": "None", "ports": [{"port": 80}]}},
        ]))
        .unwrap();
        let slices: Vec<EndpointSlice> = serde_json::from_value(json!([
            {"metadata": {"name": "web", "namespace": "default", "labels": {SERVICE_NAME_LABEL: "web"}},
             "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
             "endpoints": [{"addresses": ["10.0.0.2"], "conditions": {"ready": true}},
                           {"addresses": ["10.0.0.3"], "conditions": {"ready": false}}]},
        ]))
        .unwrap();
        let ports = service_ports(&services, &slices);
        assert_eq!(
            ports,
            [ServicePort {
                cluster_ip: Some("10.96.0.5".into()),
                node_port: Some(30080),
                port: 80,
                protocol: "tcp".into(),
                endpoints: vec![("10.0.0.2".into(), 8080)],
                affinity: Some(10_800),
            }]
        );
        let text = ruleset("t", &ports, true);
        assert!(text.starts_with("delete table ip t\n"), "{text}");
        assert!(text.contains("ip daddr 10.96.0.5 tcp dport 80 jump svc_0"), "{text}");
        assert!(
            text.contains("fib daddr type local tcp dport 30080 jump svc_0"),
            "{text}"
        );
        assert!(text.contains("meta l4proto tcp dnat ip to 10.0.0.2:8080"), "{text}");
        // The kernel's own parser accepts it (check mode changes nothing).
        if std::process::Command::new("nft").arg("--version").output().is_ok() {
            let mut child = std::process::Command::new("nft")
                .args(["-c", "-f", "-"])
                .stdin(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(ruleset("podvisor_svc_check", &ports, false).as_bytes())
                .unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        }
        let none = ServicePort {
            endpoints: vec![],
            ..ports[0].clone()
        };
        assert!(ruleset("t", &[none], false).contains("ip daddr 10.96.0.5 tcp dport 80 reject with tcp reset"));
    }
}
