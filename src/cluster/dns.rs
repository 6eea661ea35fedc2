//! Cluster DNS, over UDP and TCP on one port of this machine's address. It
//! answers, in the cluster domain:
//! - `<service>.<namespace>.svc.<domain>`: A, the ClusterIP (a headless
//!   Service's ready endpoint IPs; an ExternalName Service's CNAME);
//! - `_<port>._<protocol>.<service>.<namespace>.svc.<domain>`: SRV for named
//!   ports, aiming at the Service (headless: at each ready endpoint, named
//!   `<hostname or a-b-c-d>.<service>...`, which has its own A record), with
//!   the targets' A records as additional answers;
//! - `<a-b-c-d>.<namespace>.pod.<domain>`: A, that address;
//! - `d.c.b.a.in-addr.arpa` of a ClusterIP or headless endpoint: PTR, its name;
//! - NXDOMAIN for other names in the domain, and no data for other types.
//!
//! Every other question is relayed to the machine's own resolvers. UDP
//! answers larger than the client's buffer (512 bytes, or its EDNS size) come
//! back truncated so that the client retries over TCP. The `kube-dns`
//! Service in kube-system (the service range's tenth address) leads here
//! through the service proxy; pods get that address as their nameserver.

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

use crate::cluster::client::{Client, ListParams};
use crate::cluster::controllers::endpoints::SERVICE_NAME_LABEL;
use crate::cluster::informer::Informer;

const TYPE_A: u16 = 1;
const TYPE_CNAME: u16 = 5;
const TYPE_PTR: u16 = 12;
const TYPE_OPT: u16 = 41;
const TYPE_SRV: u16 = 33;
const TYPE_ANY: u16 = 255;
const RCODE_SERVFAIL: u8 = 2;
const RCODE_NXDOMAIN: u8 = 3;
const TTL: u32 = 5;
/// A UDP answer's limit for clients that do not say (RFC 1035).
const CLASSIC_UDP_SIZE: usize = 512;
/// How long a TCP client may stay idle between questions.
const TCP_IDLE: Duration = Duration::from_secs(10);
const RELAY_TIMEOUT: Duration = Duration::from_secs(5);

/// The kube-dns Service's address: the tenth of the service range.
pub fn service_ip(cidr: &ipnet::Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(cidr.network()) + 10)
}

#[derive(Clone, Debug, PartialEq)]
pub enum Data {
    A(Ipv4Addr),
    Cname(String),
    Ptr(String),
    Srv {
        priority: u16,
        weight: u16,
        port: u16,
        target: String,
    },
}

impl Data {
    fn rtype(&self) -> u16 {
        match self {
            Data::A(_) => TYPE_A,
            Data::Cname(_) => TYPE_CNAME,
            Data::Ptr(_) => TYPE_PTR,
            Data::Srv { .. } => TYPE_SRV,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    pub name: String,
    pub data: Data,
}

/// What the cluster domain says about a question.
#[derive(Debug, PartialEq)]
pub enum Lookup {
    Answer {
        answers: Vec<Record>,
        additional: Vec<Record>,
    },
    /// The name exists, without records of that type.
    NoData,
    NxDomain,
    /// Outside the cluster domain: for the machine's resolvers.
    Elsewhere,
}

/// The cluster domain's records, rebuilt from Services and EndpointSlices on every change.
#[derive(Debug, Default)]
pub struct Zone {
    domain: String,
    records: HashMap<String, Vec<Data>>,
    /// Names with nothing of their own but records below them (`<namespace>.svc.<domain>`...).
    interior: HashSet<String>,
    /// Reverse names (`d.c.b.a.in-addr.arpa`) of ClusterIPs and headless endpoints.
    reverse: HashMap<String, Vec<String>>,
}

impl Zone {
    pub fn build(domain: &str, services: &[Service], slices: &[EndpointSlice]) -> Zone {
        let domain = domain.trim_matches('.').to_lowercase();
        let mut records: HashMap<String, Vec<Data>> = HashMap::new();
        let mut reverse: HashMap<String, Vec<String>> = HashMap::new();
        let reverse_name = |ip: &Ipv4Addr| {
            let [a, b, c, d] = ip.octets();
            format!("{d}.{c}.{b}.{a}.in-addr.arpa")
        };
        for service in services {
            let (Some(name), Some(namespace), Some(spec)) =
                (&service.metadata.name, &service.metadata.namespace, &service.spec)
            else {
                continue;
            };
            let base = format!("{name}.{namespace}.svc.{domain}").to_lowercase();
            if spec.type_.as_deref() == Some("ExternalName") {
                if let Some(target) = &spec.external_name {
                    let target = target.trim_end_matches('.').to_lowercase();
                    records.entry(base).or_default().push(Data::Cname(target));
                }
                continue;
            }
            let cluster_ip = spec.cluster_ip.clone().unwrap_or_default();
            if cluster_ip != "None" {
                let Ok(ip) = cluster_ip.parse() else { continue };
                records.entry(base.clone()).or_default().push(Data::A(ip));
                reverse.entry(reverse_name(&ip)).or_default().push(base.clone());
                for port in spec.ports.iter().flatten() {
                    let Some(port_name) = port.name.as_deref().filter(|n| !n.is_empty()) else {
                        continue;
                    };
                    let protocol = port.protocol.as_deref().unwrap_or("TCP").to_lowercase();
                    records
                        .entry(format!("_{port_name}._{protocol}.{base}").to_lowercase())
                        .or_default()
                        .push(Data::Srv {
                            priority: 0,
                            weight: 100,
                            port: port.port as u16,
                            target: base.clone(),
                        });
                }
                continue;
            }
            // Headless: the ready endpoints themselves.
            records.entry(base.clone()).or_default();
            let own = slices
                .iter()
                .filter(|s| s.metadata.namespace.as_ref() == Some(namespace))
                .filter(|s| s.metadata.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL)) == Some(name));
            for slice in own {
                for endpoint in &slice.endpoints {
                    if endpoint.conditions.as_ref().and_then(|c| c.ready) != Some(true) {
                        continue;
                    }
                    for ip in endpoint.addresses.iter().filter_map(|a| a.parse::<Ipv4Addr>().ok()) {
                        let label = endpoint
                            .hostname
                            .clone()
                            .unwrap_or_else(|| ip.to_string().replace('.', "-"));
                        let own_name = format!("{label}.{base}").to_lowercase();
                        records.entry(base.clone()).or_default().push(Data::A(ip));
                        records.entry(own_name.clone()).or_default().push(Data::A(ip));
                        reverse.entry(reverse_name(&ip)).or_default().push(own_name.clone());
                        for port in slice.ports.iter().flatten() {
                            let (Some(port_name), Some(number)) =
                                (port.name.as_deref().filter(|n| !n.is_empty()), port.port)
                            else {
                                continue;
                            };
                            let protocol = port.protocol.as_deref().unwrap_or("TCP").to_lowercase();
                            records
                                .entry(format!("_{port_name}._{protocol}.{base}").to_lowercase())
                                .or_default()
                                .push(Data::Srv {
                                    priority: 0,
                                    weight: 100,
                                    port: number as u16,
                                    target: own_name.clone(),
                                });
                        }
                    }
                }
            }
        }
        for data in records.values_mut() {
            data.dedup();
        }
        let mut interior = HashSet::new();
        for name in records.keys() {
            let mut rest = name.as_str();
            while let Some((_, parent)) = rest.split_once('.') {
                if parent.len() <= domain.len() {
                    break;
                }
                if !records.contains_key(parent) {
                    interior.insert(parent.to_string());
                }
                rest = parent;
            }
        }
        for names in reverse.values_mut() {
            names.sort();
            names.dedup();
        }
        Zone {
            domain,
            records,
            interior,
            reverse,
        }
    }

    fn in_domain(&self, name: &str) -> bool {
        name == self.domain || name.ends_with(&format!(".{}", self.domain))
    }

    pub fn lookup(&self, name: &str, qtype: u16) -> Lookup {
        if let Some(names) = self.reverse.get(name) {
            return match qtype {
                TYPE_PTR | TYPE_ANY => Lookup::Answer {
                    answers: names
                        .iter()
                        .map(|target| Record {
                            name: name.to_string(),
                            data: Data::Ptr(target.clone()),
                        })
                        .collect(),
                    additional: Vec::new(),
                },
                _ => Lookup::NoData,
            };
        }
        if !self.in_domain(name) {
            return Lookup::Elsewhere;
        }
        if let Some(ip) = self.pod_address(name) {
            return match qtype {
                TYPE_A | TYPE_ANY => Lookup::Answer {
                    answers: vec![Record {
                        name: name.to_string(),
                        data: Data::A(ip),
                    }],
                    additional: Vec::new(),
                },
                _ => Lookup::NoData,
            };
        }
        let Some(all) = self.records.get(name) else {
            return if self.interior.contains(name) || name == self.domain {
                Lookup::NoData
            } else {
                Lookup::NxDomain
            };
        };
        // A CNAME stands for the name whatever the question's type.
        let answers: Vec<Record> = all
            .iter()
            .filter(|d| qtype == TYPE_ANY || d.rtype() == qtype || matches!(d, Data::Cname(_)))
            .map(|d| Record {
                name: name.to_string(),
                data: d.clone(),
            })
            .collect();
        if answers.is_empty() {
            return Lookup::NoData;
        }
        let mut additional = Vec::new();
        for answer in &answers {
            if let Data::Srv { target, .. } = &answer.data {
                for data in self.records.get(target).into_iter().flatten() {
                    let record = Record {
                        name: target.clone(),
                        data: data.clone(),
                    };
                    if matches!(data, Data::A(_)) && !additional.contains(&record) {
                        additional.push(record);
                    }
                }
            }
        }
        Lookup::Answer { answers, additional }
    }

    /// `a-b-c-d.<namespace>.pod.<domain>`'s address.
    fn pod_address(&self, name: &str) -> Option<Ipv4Addr> {
        let rest = name.strip_suffix(&format!(".pod.{}", self.domain))?;
        let (dashed, namespace) = rest.split_once('.')?;
        if namespace.is_empty() || namespace.contains('.') {
            return None;
        }
        dashed.replace('-', ".").parse().ok()
    }
}

/// A query's question: name (lowercase, no trailing dot), type, where it ends, and the UDP size the client takes.
pub fn question(packet: &[u8]) -> Option<(String, u16, usize, usize)> {
    if packet.len() < 12 || packet[2] & 0x80 != 0 || u16::from_be_bytes([packet[4], packet[5]]) != 1 {
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
    let end = pos + 4;
    if end > packet.len() {
        return None;
    }
    // An EDNS OPT record right after the question carries the client's UDP size in its class.
    let additional = u16::from_be_bytes([packet[10], packet[11]]);
    let udp_size = match packet.get(end..end + 5) {
        Some([0, t0, t1, s0, s1]) if additional > 0 && u16::from_be_bytes([*t0, *t1]) == TYPE_OPT => {
            (u16::from_be_bytes([*s0, *s1]) as usize).clamp(CLASSIC_UDP_SIZE, 4096)
        }
        _ => CLASSIC_UDP_SIZE,
    };
    Some((labels.join("."), qtype, end, udp_size))
}

fn put_name(out: &mut Vec<u8>, name: &str, question: &str) {
    if name == question {
        out.extend_from_slice(&[0xc0, 0x0c]); // the question's name
        return;
    }
    for label in name.split('.').filter(|l| !l.is_empty()) {
        let bytes = &label.as_bytes()[..label.len().min(63)];
        out.push(bytes.len() as u8);
        out.extend_from_slice(bytes);
    }
    out.push(0);
}

fn put_record(out: &mut Vec<u8>, record: &Record, question: &str) {
    put_name(out, &record.name, question);
    out.extend_from_slice(&record.data.rtype().to_be_bytes());
    out.extend_from_slice(&1u16.to_be_bytes()); // IN
    out.extend_from_slice(&TTL.to_be_bytes());
    let length_at = out.len();
    out.extend_from_slice(&[0, 0]);
    match &record.data {
        Data::A(ip) => out.extend_from_slice(&ip.octets()),
        Data::Cname(target) | Data::Ptr(target) => put_name(out, target, ""),
        Data::Srv {
            priority,
            weight,
            port,
            target,
        } => {
            out.extend_from_slice(&priority.to_be_bytes());
            out.extend_from_slice(&weight.to_be_bytes());
            out.extend_from_slice(&port.to_be_bytes());
            put_name(out, target, "");
        }
    }
    let length = (out.len() - length_at - 2) as u16;
    out[length_at..length_at + 2].copy_from_slice(&length.to_be_bytes());
}

/// The reply to `query` (kept up to the end of its question) with `rcode` and
/// records; if it would exceed `limit` bytes, an empty one flagged truncated.
pub fn reply(
    query: &[u8],
    end_of_question: usize,
    rcode: u8,
    answers: &[Record],
    additional: &[Record],
    limit: usize,
) -> Vec<u8> {
    let (name, ..) = question(query).unwrap_or_default();
    let mut out = query[..end_of_question].to_vec();
    let recursion_desired = query[2] & 0x01;
    out[2] = 0x84 | recursion_desired; // response, authoritative
    out[3] = 0x80 | rcode; // recursion available
    out[6..8].copy_from_slice(&(answers.len() as u16).to_be_bytes());
    out[8..10].fill(0);
    out[10..12].copy_from_slice(&(additional.len() as u16).to_be_bytes());
    for record in answers.iter().chain(additional) {
        put_record(&mut out, record, &name);
    }
    if out.len() > limit {
        out.truncate(end_of_question);
        out[2] |= 0x02;
        out[6..12].fill(0);
    }
    out
}

type SharedZone = Arc<RwLock<Zone>>;

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

/// The answer to one query (None: not a query, dropped).
async fn answer(zone: &SharedZone, query: &[u8], upstream: Option<SocketAddr>, over_tcp: bool) -> Option<Vec<u8>> {
    let (name, qtype, end, udp_size) = question(query)?;
    let limit = if over_tcp { u16::MAX as usize } else { udp_size };
    let lookup = zone.read().unwrap().lookup(&name, qtype);
    Some(match lookup {
        Lookup::Answer { answers, additional } => reply(query, end, 0, &answers, &additional, limit),
        Lookup::NoData => reply(query, end, 0, &[], &[], limit),
        Lookup::NxDomain => reply(query, end, RCODE_NXDOMAIN, &[], &[], limit),
        Lookup::Elsewhere => {
            let relayed = match upstream {
                Some(upstream) if over_tcp => relay_tcp(query, upstream).await,
                Some(upstream) => relay_udp(query, upstream).await,
                None => None,
            };
            relayed.unwrap_or_else(|| reply(query, end, RCODE_SERVFAIL, &[], &[], limit))
        }
    })
}

async fn relay_udp(query: &[u8], upstream: SocketAddr) -> Option<Vec<u8>> {
    let socket = UdpSocket::bind(("0.0.0.0", 0)).await.ok()?;
    socket.send_to(query, upstream).await.ok()?;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(RELAY_TIMEOUT, socket.recv(&mut buf))
        .await
        .ok()?
        .ok()?;
    buf.truncate(n);
    Some(buf)
}

async fn relay_tcp(query: &[u8], upstream: SocketAddr) -> Option<Vec<u8>> {
    tokio::time::timeout(RELAY_TIMEOUT, async {
        let mut stream = TcpStream::connect(upstream).await.ok()?;
        write_framed(&mut stream, query).await.ok()?;
        read_framed(&mut stream).await.ok()
    })
    .await
    .ok()?
}

async fn read_framed(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let length = stream.read_u16().await? as usize;
    let mut message = vec![0u8; length];
    stream.read_exact(&mut message).await?;
    Ok(message)
}

async fn write_framed(stream: &mut TcpStream, message: &[u8]) -> std::io::Result<()> {
    let mut framed = Vec::with_capacity(message.len() + 2);
    framed.extend_from_slice(&(message.len() as u16).to_be_bytes());
    framed.extend_from_slice(message);
    stream.write_all(&framed).await
}

/// Binds UDP and TCP on one port of `address` (port 0: a free one).
async fn bind(address: SocketAddr) -> std::io::Result<(UdpSocket, TcpListener)> {
    let mut last = None;
    for _ in 0..20 {
        let udp = UdpSocket::bind(address).await?;
        match TcpListener::bind(udp.local_addr()?).await {
            Ok(tcp) => return Ok((udp, tcp)),
            // The free UDP port may be taken for TCP: another one.
            Err(e) if address.port() == 0 => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no port free for both UDP and TCP")))
}

/// Serves the cluster DNS on `address` until aborted; returns the bound address (UDP and TCP alike).
pub async fn spawn(
    client: Client,
    address: SocketAddr,
    domain: String,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let (udp, tcp) = bind(address).await?;
    let udp = Arc::new(udp);
    let bound = udp.local_addr()?;
    let zone: SharedZone = Arc::new(RwLock::new(Zone::build(&domain, &[], &[])));
    let task = tokio::spawn(async move {
        let services: Informer<Service> = Informer::spawn(client.clone(), None, ListParams::default());
        let slices: Informer<EndpointSlice> = Informer::spawn(client, None, ListParams::default());
        let (mut service_changes, mut slice_changes) = (services.subscribe(), slices.subscribe());
        let updater = {
            let zone = zone.clone();
            async move {
                services.wait_synced().await;
                slices.wait_synced().await;
                loop {
                    *zone.write().unwrap() = Zone::build(&domain, &services.list(), &slices.list());
                    tokio::select! {
                        _ = service_changes.recv() => {}
                        _ = slice_changes.recv() => {}
                    }
                    while service_changes.try_recv().is_ok() || slice_changes.try_recv().is_ok() {}
                }
            }
        };
        let upstream = upstream();
        let udp_server = {
            let zone = zone.clone();
            async move {
                let mut buf = vec![0u8; 4096];
                loop {
                    let Ok((n, from)) = udp.recv_from(&mut buf).await else {
                        continue;
                    };
                    let query = buf[..n].to_vec();
                    let (zone, udp) = (zone.clone(), udp.clone());
                    tokio::spawn(async move {
                        if let Some(answer) = answer(&zone, &query, upstream, false).await {
                            let _ = udp.send_to(&answer, from).await;
                        }
                    });
                }
            }
        };
        let tcp_server = async move {
            loop {
                let Ok((mut stream, _)) = tcp.accept().await else {
                    continue;
                };
                let zone = zone.clone();
                tokio::spawn(async move {
                    while let Ok(Ok(query)) = tokio::time::timeout(TCP_IDLE, read_framed(&mut stream)).await {
                        let Some(answer) = answer(&zone, &query, upstream, true).await else {
                            break;
                        };
                        if write_framed(&mut stream, &answer).await.is_err() {
                            break;
                        }
                    }
                });
            }
        };
        tokio::join!(updater, udp_server, tcp_server);
    });
    Ok((bound, task))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn query(name: &str, qtype: u16) -> Vec<u8> {
        let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in name.split('.') {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.push(0);
        q.extend_from_slice(&qtype.to_be_bytes());
        q.extend_from_slice(&[0, 1]);
        q
    }

    fn zone() -> Zone {
        let services: Vec<Service> = serde_json::from_value(json!([
            {"metadata": {"name": "web", "namespace": "default"},
             "spec": {"clusterIP": "10.96.0.5", "ports": [{"name": "http", "port": 80}, {"port": 81}]}},
            {"metadata": {"name": "db", "namespace": "prod"},
             "spec": {"clusterIP": "None", "ports": [{"name": "pg", "port": 5432}]}},
            {"metadata": {"name": "out", "namespace": "default"},
             "spec": {"type": "ExternalName", "externalName": "example.org."}},
        ]))
        .unwrap();
        let slices: Vec<EndpointSlice> = serde_json::from_value(json!([
            {"metadata": {"name": "db-1", "namespace": "prod", "labels": {SERVICE_NAME_LABEL: "db"}},
             "addressType": "IPv4",
             "ports": [{"name": "pg", "port": 5432, "protocol": "TCP"}],
             "endpoints": [
                {"addresses": ["10.88.0.7"], "hostname": "db-0", "conditions": {"ready": true}},
                {"addresses": ["10.88.0.8"], "conditions": {"ready": true}},
                {"addresses": ["10.88.0.9"], "conditions": {"ready": false}}]},
        ]))
        .unwrap();
        Zone::build("cluster.local", &services, &slices)
    }

    fn a(name: &str, ip: &str) -> Record {
        Record {
            name: name.into(),
            data: Data::A(ip.parse().unwrap()),
        }
    }

    #[test]
    fn zone_answers_services_ports_endpoints_and_pods() {
        let z = zone();
        let web = "web.default.svc.cluster.local";
        assert_eq!(
            z.lookup(web, TYPE_A),
            Lookup::Answer {
                answers: vec![a(web, "10.96.0.5")],
                additional: vec![]
            }
        );
        assert_eq!(z.lookup(web, 28), Lookup::NoData, "AAAA of a v4 Service");
        let Lookup::Answer { answers, additional } = z.lookup("_http._tcp.web.default.svc.cluster.local", TYPE_SRV)
        else {
            panic!()
        };
        assert_eq!(
            answers[0].data,
            Data::Srv {
                priority: 0,
                weight: 100,
                port: 80,
                target: web.into()
            }
        );
        assert_eq!(additional, vec![a(web, "10.96.0.5")]);
        // Headless: ready endpoints only, each under its own name, SRV aiming at them.
        let Lookup::Answer { answers, .. } = z.lookup("db.prod.svc.cluster.local", TYPE_A) else {
            panic!()
        };
        assert_eq!(answers.len(), 2);
        assert!(matches!(
            z.lookup("db-0.db.prod.svc.cluster.local", TYPE_A),
            Lookup::Answer { answers, .. } if answers == vec![a("db-0.db.prod.svc.cluster.local", "10.88.0.7")]
        ));
        let Lookup::Answer { answers, additional } = z.lookup("_pg._tcp.db.prod.svc.cluster.local", TYPE_SRV) else {
            panic!()
        };
        let targets: Vec<String> = answers
            .iter()
            .map(|r| match &r.data {
                Data::Srv { target, port: 5432, .. } => target.clone(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            targets,
            ["db-0.db.prod.svc.cluster.local", "10-88-0-8.db.prod.svc.cluster.local"]
        );
        assert_eq!(additional.len(), 2);
        assert!(matches!(
            z.lookup("out.default.svc.cluster.local", TYPE_A),
            Lookup::Answer { answers, .. } if answers[0].data == Data::Cname("example.org".into())
        ));
        assert!(matches!(
            z.lookup("10-1-2-3.default.pod.cluster.local", TYPE_A),
            Lookup::Answer { answers, .. } if answers[0].data == Data::A("10.1.2.3".parse().unwrap())
        ));
        assert_eq!(z.lookup("nothere.default.svc.cluster.local", TYPE_A), Lookup::NxDomain);
        assert_eq!(z.lookup("prod.svc.cluster.local", TYPE_A), Lookup::NoData);
        assert_eq!(z.lookup("svc.cluster.local", TYPE_A), Lookup::NoData);
        assert_eq!(z.lookup("example.org", TYPE_A), Lookup::Elsewhere);
        // Reverse: ClusterIPs to their Service, headless endpoints to their own names; others relayed.
        assert!(matches!(
            z.lookup("5.0.96.10.in-addr.arpa", TYPE_PTR),
            Lookup::Answer { answers, .. } if answers[0].data == Data::Ptr(web.into())
        ));
        assert!(matches!(
            z.lookup("7.0.88.10.in-addr.arpa", TYPE_PTR),
            Lookup::Answer { answers, .. } if answers == vec![Record {
                name: "7.0.88.10.in-addr.arpa".into(),
                data: Data::Ptr("db-0.db.prod.svc.cluster.local".into()),
            }]
        ));
        assert_eq!(z.lookup("9.0.88.10.in-addr.arpa", TYPE_PTR), Lookup::Elsewhere);
    }

    #[test]
    fn replies_carry_the_question_records_and_truncation() {
        let q = query("Web.default.svc.cluster.local", TYPE_A);
        let (name, qtype, end, size) = question(&q).unwrap();
        assert_eq!(
            (name.as_str(), qtype, end, size),
            ("web.default.svc.cluster.local", 1, q.len(), 512)
        );
        let r = reply(&q, end, 0, &[a(&name, "10.96.0.5")], &[], 512);
        assert_eq!(&r[..2], &[0x12, 0x34]);
        assert_eq!(r[3] & 0x0f, 0);
        assert_eq!(u16::from_be_bytes([r[6], r[7]]), 1);
        assert_eq!(&r[r.len() - 4..], &[10, 96, 0, 5]);
        let nx = reply(&q, end, RCODE_NXDOMAIN, &[], &[], 512);
        assert_eq!(nx[3] & 0x0f, 3);
        assert_eq!(nx.len(), q.len());
        // Too many for 512 bytes: truncated, flagged, no records.
        let many: Vec<Record> = (0..40).map(|i| a(&format!("host-{i}.example"), "10.0.0.1")).collect();
        let t = reply(&q, end, 0, &many, &[], 512);
        assert_eq!((t[2] & 0x02, t.len()), (0x02, q.len()));
        assert!(reply(&q, end, 0, &many, &[], 65535).len() > 512);
        // An EDNS OPT record raises the UDP limit.
        let mut edns = q.clone();
        edns[11] = 1;
        edns.extend_from_slice(&[0, 0, 41, 0x04, 0xd0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(question(&edns).unwrap().3, 1232);
    }
}
