//! Pod routes between machines: every node publishes its runtime's pod
//! subnets on its Node; each agent routes the other nodes' subnets through
//! their InternalIP, so pods reach pods on other machines by pod IP. Nodes
//! that share this machine's address (the extra nodes of `up --nodes`) need no
//! route: their bridges are local. Routes carry their own protocol number, so
//! the agent finds and removes the ones whose node went away, and never
//! touches routes it did not make; a metric of the agent's own (from its API
//! server and node name) keeps two clusters on one machine out of each
//! other's routes.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use tokio::sync::broadcast::error::RecvError;

use super::Context;
use crate::cluster::client::ListParams;
use crate::cluster::informer::Informer;

/// Comma-separated pod subnets of the node's runtime.
pub const POD_SUBNETS_ANNOTATION: &str = "podvisor.io/pod-subnets";
/// The `proto` of the routes the agent makes (a private number).
const ROUTE_PROTOCOL: &str = "199";
const RESYNC: Duration = Duration::from_secs(30);

/// Destination subnet → gateway, for every other node reachable at another address.
pub fn wanted_routes(
    nodes: &[Node],
    own_name: &str,
    own_ip: IpAddr,
    own_subnets: &[String],
) -> BTreeMap<String, IpAddr> {
    let own: Vec<ipnet::IpNet> = own_subnets.iter().filter_map(|s| s.parse().ok()).collect();
    let mut routes = BTreeMap::new();
    for node in nodes {
        if node.metadata.name.as_deref() == Some(own_name) {
            continue;
        }
        let Some(gateway) = internal_ip(node).filter(|ip| *ip != own_ip) else {
            continue;
        };
        let subnets = node
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(POD_SUBNETS_ANNOTATION))
            .map(String::as_str)
            .unwrap_or_default();
        for subnet in subnets.split(',').filter_map(|s| s.trim().parse::<ipnet::IpNet>().ok()) {
            if subnet.addr().is_ipv4() != gateway.is_ipv4() {
                continue;
            }
            if own
                .iter()
                .any(|o| o.contains(&subnet.network()) || subnet.contains(&o.network()))
            {
                tracing::warn!(node = ?node.metadata.name, %subnet, "its pod subnet overlaps this node's: no route");
                continue;
            }
            routes.insert(subnet.trunc().to_string(), gateway);
        }
    }
    routes
}

fn internal_ip(node: &Node) -> Option<IpAddr> {
    node.status
        .as_ref()?
        .addresses
        .as_ref()?
        .iter()
        .find(|a| a.type_ == "InternalIP")?
        .address
        .parse()
        .ok()
}

pub(crate) async fn run(ctx: Arc<Context>) {
    let nodes: Informer<Node> = Informer::spawn(ctx.client.clone(), None, ListParams::default());
    let mut changes = nodes.subscribe();
    nodes.wait_synced().await;
    let own_ip = IpAddr::V4(ctx.node_ip);
    let metric = route_metric(&format!("{} {}", ctx.client.base_url(), ctx.options.node_name));
    loop {
        let wanted = wanted_routes(&nodes.list(), &ctx.options.node_name, own_ip, &ctx.pod_subnets);
        if let Err(e) = sync(&wanted, metric).await {
            tracing::warn!(error = %e, "syncing pod routes to other nodes");
        }
        tokio::select! {
            _ = tokio::time::sleep(RESYNC) => {}
            change = changes.recv() => if matches!(change, Err(RecvError::Closed)) { return },
        }
        while changes.try_recv().is_ok() {}
    }
}

/// The metric of this agent's routes: one per cluster and node, in 1000..1_001_000.
fn route_metric(identity: &str) -> u32 {
    let hash = crate::sys::fnv1a(identity.as_bytes());
    1000 + (hash % 1_000_000) as u32
}

/// Makes this machine's routes of our protocol and `metric` exactly `wanted`.
async fn sync(wanted: &BTreeMap<String, IpAddr>, metric: u32) -> Result<(), String> {
    let metric_text = metric.to_string();
    let mut present = BTreeMap::new();
    for family in ["-4", "-6"] {
        let listed = crate::sys::ip(&[family, "-j", "route", "show", "proto", ROUTE_PROTOCOL]).await?;
        let routes: Vec<serde_json::Value> = serde_json::from_str(listed.trim()).unwrap_or_default();
        for route in routes {
            let (Some(dst), Some(gateway)) = (route["dst"].as_str(), route["gateway"].as_str()) else {
                continue;
            };
            if route["metric"].as_u64() != Some(u64::from(metric)) {
                continue;
            }
            present.insert(dst.to_string(), gateway.to_string());
        }
    }
    for (dst, gateway) in wanted {
        if present.get(dst) != Some(&gateway.to_string()) {
            crate::sys::ip(&[
                "route",
                "replace",
                dst,
                "via",
                &gateway.to_string(),
                "proto",
                ROUTE_PROTOCOL,
                "metric",
                &metric_text,
            ])
            .await?;
            tracing::info!(subnet = dst, %gateway, "pod route to another node");
        }
    }
    for dst in present.keys().filter(|dst| !wanted.contains_key(*dst)) {
        crate::sys::ip(&["route", "del", dst, "proto", ROUTE_PROTOCOL, "metric", &metric_text]).await?;
        tracing::info!(subnet = dst, "pod route removed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(name: &str, ip: &str, subnets: &str) -> Node {
        serde_json::from_value(json!({
            "metadata": {"name": name, "annotations": {POD_SUBNETS_ANNOTATION: subnets}},
            "status": {"addresses": [{"type": "InternalIP", "address": ip}]},
        }))
        .unwrap()
    }

    #[test]
    fn metrics_tell_agents_apart() {
        let a = route_metric("https://127.0.0.1:6443 alpha");
        assert!((1000..1_001_000).contains(&a));
        assert_eq!(a, route_metric("https://127.0.0.1:6443 alpha"));
        assert_ne!(a, route_metric("https://127.0.0.1:6444 alpha"));
    }

    #[test]
    fn routes_go_to_other_machines_only() {
        let own: IpAddr = "10.0.0.1".parse().unwrap();
        let nodes = [
            node("me", "10.0.0.1", "10.88.0.0/16"),
            node("local-2", "10.0.0.1", "10.89.0.0/16"),
            node("remote", "10.0.0.2", "10.90.0.0/16,fd90::/64"),
            node("clash", "10.0.0.3", "10.88.5.0/24"),
            node("bare", "10.0.0.4", ""),
        ];
        let routes = wanted_routes(&nodes, "me", own, &["10.88.0.0/16".into()]);
        assert_eq!(
            routes.into_iter().collect::<Vec<_>>(),
            [("10.90.0.0/16".to_string(), "10.0.0.2".parse::<IpAddr>().unwrap())]
        );
    }
}
