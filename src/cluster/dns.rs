//! Cluster DNS: answers `<service>.<namespace>.svc.<domain>` with the
//! Service's ClusterIP (a headless Service's ready endpoint IPs), NXDOMAIN for
//! other names in the cluster domain, and relays every other question to the
//! machine's own resolvers. It listens on UDP on this machine's address; the
//! `kube-dns` Service in kube-system (the service range's tenth address)
//! leads there through the service proxy, and pods get that address as
//! their nameserver.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, RwLock};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use tokio::net::UdpSocket;

use crate::cluster::client::{Client, ListParams};
use crate::cluster::controllers::endpoints::SERVICE_NAME_LABEL;
use crate::cluster::informer::Informer;

const TYPE_A: u16 = 1;
const TTL: u32 = 5;

/// The kube-dns Service's address: the tenth of the service range.
pub fn service_ip(cidr: &ipnet::Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(cidr.network()) + 10)
}

/// A question: name (lowercase, no trailing dot), type, and where it ends in the packet.
fn question(packet: &[u8]) -> Option<(String, u16, usize)> {
    if packet.len() < 12 || u16::from_be_bytes([packet[4], packet[5]]) != 1 {
        return None;
    }
    let mut pos = 12;
    let mut labels = Vec::new();
    loop {
        let len = *packet.get(pos)? as usize;
        pos += 1;
        if len == 0 {
            break;
        }
        if len > 63 {
            return None;
        }
        labels.push(String::from_utf8_lossy(packet.get(pos..pos + len)?).to_lowercase());
        pos += len;
    }
    let qtype = u16::from_be_bytes([*packet.get(pos)?, *packet.get(pos + 1)?]);
    Some((labels.join("."), qtype, pos + 4))
}

/// The reply to `query` (up to its question) with `answers` as A records, or NXDOMAIN when None.
pub fn reply(query: &[u8], end_of_question: usize, answers: Option<&[Ipv4Addr]>) -> Vec<u8> {
    let mut out = query[..end_of_question].to_vec();
    let recursion_desired = query[2] & 0x01;
    out[2] = 0x84 | recursion_desired; // response, authoritative
    out[3] = 0x80 | if answers.is_none() { 3 } else { 0 }; // recursion available; NXDOMAIN
    let count = answers.map_or(0, |a| a.len()) as u16;
    out[6..8].copy_from_slice(&count.to_be_bytes());
    out[8..12].fill(0);
    for ip in answers.into_iter().flatten() {
        out.extend_from_slice(&[0xc0, 0x0c]); // the question's name
        out.extend_from_slice(&TYPE_A.to_be_bytes());
        out.extend_from_slice(&1u16.to_be_bytes());
        out.extend_from_slice(&TTL.to_be_bytes());
        out.extend_from_slice(&4u16.to_be_bytes());
        out.extend_from_slice(&ip.octets());
    }
    out
}

/// Service addresses by `<name>.<namespace>`.
type Records = Arc<RwLock<HashMap<String, Vec<Ipv4Addr>>>>;

fn records(services: &[Service], slices: &[EndpointSlice]) -> HashMap<String, Vec<Ipv4Addr>> {
    let mut out = HashMap::new();
    for service in services {
        let (Some(name), Some(namespace)) = (&service.metadata.name, &service.metadata.namespace) else {
            continue;
        };
        let cluster_ip = service
            .spec
            .as_ref()
            .and_then(|s| s.cluster_ip.clone())
            .unwrap_or_default();
        let ips: Vec<Ipv4Addr> = if cluster_ip == "None" {
            slices
                .iter()
                .filter(|s| s.metadata.namespace.as_ref() == Some(namespace))
                .filter(|s| s.metadata.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL)) == Some(name))
                .flat_map(|s| s.endpoints.iter())
                .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
                .flat_map(|e| e.addresses.iter().filter_map(|a| a.parse().ok()))
                .collect()
        } else {
            cluster_ip.parse().into_iter().collect()
        };
        out.insert(format!("{name}.{namespace}"), ips);
    }
    out
}

/// The machine's first real upstream resolver (systemd-resolved's upstream when the stub is configured).
fn upstream() -> Option<SocketAddr> {
    for path in ["/etc/resolv.conf", "/run/systemd/resolve/resolv.conf"] {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let found = text
            .lines()
            .filter_map(|l| l.trim().strip_prefix("nameserver"))
            .filter_map(|a| a.trim().parse::<std::net::IpAddr>().ok())
            .find(|ip| !ip.is_loopback());
        if let Some(ip) = found {
            return Some(SocketAddr::new(ip, 53));
        }
    }
    None
}

/// Binds the server on `address` (port 0: a free one) and serves until aborted; returns the bound address.
pub async fn spawn(
    client: Client,
    address: SocketAddr,
    domain: String,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let socket = Arc::new(UdpSocket::bind(address).await?);
    let bound = socket.local_addr()?;
    let table: Records = Arc::default();
    let task = tokio::spawn(async move {
        let services: Informer<Service> = Informer::spawn(client.clone(), None, ListParams::default());
        let slices: Informer<EndpointSlice> = Informer::spawn(client, None, ListParams::default());
        let (mut service_changes, mut slice_changes) = (services.subscribe(), slices.subscribe());
        let updater = {
            let table = table.clone();
            async move {
                services.wait_synced().await;
                slices.wait_synced().await;
                loop {
                    *table.write().unwrap() = records(&services.list(), &slices.list());
                    tokio::select! {
                        _ = service_changes.recv() => {}
                        _ = slice_changes.recv() => {}
                    }
                    while service_changes.try_recv().is_ok() || slice_changes.try_recv().is_ok() {}
                }
            }
        };
        let suffix = format!(".svc.{}", domain.trim_matches('.'));
        let upstream = upstream();
        let server = async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let Ok((n, from)) = socket.recv_from(&mut buf).await else {
                    continue;
                };
                let query = buf[..n].to_vec();
                let Some((name, qtype, end)) = question(&query) else {
                    continue;
                };
                if let Some(service) = name.strip_suffix(&suffix) {
                    let known = table.read().unwrap().get(service).cloned();
                    let answer = match (known, qtype) {
                        (Some(ips), TYPE_A) => reply(&query, end, Some(&ips)),
                        (Some(_), _) => reply(&query, end, Some(&[])),
                        (None, _) => reply(&query, end, None),
                    };
                    let _ = socket.send_to(&answer, from).await;
                } else if name.ends_with(domain.trim_matches('.')) {
                    let _ = socket.send_to(&reply(&query, end, None), from).await;
                } else if let Some(upstream) = upstream {
                    let socket = socket.clone();
                    tokio::spawn(async move {
                        if let Some(answer) = relay(&query, upstream).await {
                            let _ = socket.send_to(&answer, from).await;
                        }
                    });
                }
            }
        };
        tokio::join!(updater, server);
    });
    Ok((bound, task))
}

async fn relay(query: &[u8], upstream: SocketAddr) -> Option<Vec<u8>> {
    let socket = UdpSocket::bind(("0.0.0.0", 0)).await.ok()?;
    socket.send_to(query, upstream).await.ok()?;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(std::time::Duration::from_secs(5), socket.recv(&mut buf))
        .await
        .ok()?
        .ok()?;
    buf.truncate(n);
    Some(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(name: &str) -> Vec<u8> {
        let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in name.split('.') {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.extend_from_slice(&[0, 0, 1, 0, 1]);
        q
    }

    #[test]
    fn answers_carry_the_question_and_a_records() {
        let q = query("Web.default.svc.cluster.local");
        let (name, qtype, end) = question(&q).unwrap();
        assert_eq!(
            (name.as_str(), qtype, end),
            ("web.default.svc.cluster.local", 1, q.len())
        );
        let r = reply(&q, end, Some(&["10.96.0.5".parse().unwrap()]));
        assert_eq!(&r[..2], &[0x12, 0x34]);
        assert_eq!(r[3] & 0x0f, 0);
        assert_eq!(u16::from_be_bytes([r[6], r[7]]), 1);
        assert_eq!(&r[r.len() - 4..], &[10, 96, 0, 5]);
        let nx = reply(&q, end, None);
        assert_eq!(nx[3] & 0x0f, 3);
        assert_eq!(nx.len(), q.len());
    }
}
