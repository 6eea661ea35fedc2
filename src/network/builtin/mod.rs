//! The built-in default pod network, used when no CNI configuration exists.
//!
//! One Linux bridge holds the gateway address(es); each pod gets a veth pair whose host
//! end is a bridge port and whose other end is the pod's `eth0`. Addresses come from
//! claim files under the state directory, and NAT (egress masquerade, hostPort DNAT) is
//! done with nftables (one table we own) or, failing that, the iptables CLI (our own
//! chains).
//!
//! Everything an attachment leaves on the host can be found from its sandbox id alone:
//! the host veth's name and alias, the address and port claim files, the NAT rule
//! comments. So [`BuiltinNetwork::detach`] needs no in-memory state and works after a
//! daemon restart.

mod ipam;
mod link;
mod nat;
mod ports;
mod store;
mod sysctl;

#[cfg(test)]
mod tests;

use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

pub use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

use ipam::Ipam;
use link::{LinkInfo, Netlink};
use nat::{DnatRule, Nat, NatBase};
use ports::{HostIp, PortClaims, PortRequest};

/// Which NAT implementation drives the rules.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NatBackend {
    /// nftables if the `nft` binary works, else iptables.
    #[default]
    Auto,
    Nft,
    Iptables,
}

/// Settings of the built-in network.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuiltinConfig {
    /// The bridge's name.
    pub bridge: String,
    /// Pod IPv4 subnet; the first host address is the gateway.
    pub subnet_v4: Ipv4Net,
    /// Optional pod IPv6 subnet (a ULA such as `fd88::/64`).
    pub subnet_v6: Option<Ipv6Net>,
    /// MTU of the bridge and veths; `None` takes the MTU of the host's default-route
    /// interface when the bridge is created (1500 without one).
    pub mtu: Option<u32>,
    /// Where address and port claims live.
    pub state_dir: PathBuf,
    pub nat: NatBackend,
    /// Name of our nftables tables (`ip <name>`, `ip6 <name>`); upper-cased, the prefix
    /// of our iptables chains (`PODVISOR-HOSTPORTS`, `PODVISOR-POSTROUTING`).
    pub nat_name: String,
    /// Other nodes' pod subnets, reached without masquerading.
    pub cluster_subnets: Vec<Ipv4Net>,
}

impl BuiltinConfig {
    /// The defaults: bridge `podvisor0`, 10.88.0.0/16, no IPv6, automatic NAT backend.
    pub fn new(state_dir: impl Into<PathBuf>) -> BuiltinConfig {
        BuiltinConfig {
            bridge: "podvisor0".into(),
            subnet_v4: Ipv4Net::new(Ipv4Addr::new(10, 88, 0, 0), 16).expect("/16 is a valid prefix"),
            subnet_v6: None,
            mtu: None,
            state_dir: state_dir.into(),
            nat: NatBackend::Auto,
            nat_name: "podvisor".into(),
            cluster_subnets: Vec::new(),
        }
    }
}

/// A transport protocol of a port mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
}

/// A CRI port mapping. `host_port` 0 means "not published" and is skipped.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMapping {
    pub protocol: Protocol,
    pub container_port: u16,
    pub host_port: u16,
    /// Empty: every local address of both families; `0.0.0.0` / `::`: every local
    /// address of that family; otherwise that one address.
    #[serde(default)]
    pub host_ip: String,
}

/// What [`BuiltinNetwork::attach`] needs.
#[derive(Clone, Debug)]
pub struct AttachRequest {
    pub sandbox_id: String,
    /// A bind-mounted network namespace file.
    pub netns: PathBuf,
    /// The interface name inside the pod, usually `eth0`.
    pub ifname: String,
    pub port_mappings: Vec<PortMapping>,
}

/// The result of an attach, to be kept in the sandbox record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub ipv4: Ipv4Addr,
    pub ipv6: Option<Ipv6Addr>,
    pub gateway: Ipv4Addr,
    #[serde(default)]
    pub gateway_v6: Option<Ipv6Addr>,
    pub host_veth: String,
    /// The pod interface's MAC address.
    pub mac: String,
    #[serde(default = "default_ifname")]
    pub ifname: String,
}

fn default_ifname() -> String {
    "eth0".into()
}

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("invalid built-in network config: {0}")]
    Config(String),
    #[error("invalid network request: {0}")]
    Invalid(String),
    #[error("{0}")]
    Conflict(String),
    #[error("no free address left in {0}")]
    Exhausted(String),
    #[error("network namespace {}", path.display())]
    Netns {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{op}")]
    Io {
        op: String,
        #[source]
        source: io::Error,
    },
    #[error("netlink: {op}")]
    Netlink {
        op: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("{backend}: {op}: {detail}")]
    Nat {
        backend: &'static str,
        op: String,
        detail: String,
    },
}

pub type Result<T, E = NetError> = std::result::Result<T, E>;

/// The built-in network. Cheap to keep for the daemon's lifetime; holds no connections.
#[derive(Debug)]
pub struct BuiltinNetwork {
    cfg: BuiltinConfig,
    gateway_v4: Ipv4Addr,
    gateway_v6: Option<Ipv6Addr>,
    ipam: Ipam,
    ports: PortClaims,
    nat: tokio::sync::OnceCell<Nat>,
    /// Whether this instance has put the base NAT ruleset in place (and `is_ready` has
    /// not found it damaged since); until then every NAT change re-applies it.
    nat_base_applied: AtomicBool,
}

impl BuiltinNetwork {
    /// Validates the config; touches nothing on the host.
    pub fn new(mut cfg: BuiltinConfig) -> Result<BuiltinNetwork> {
        let bridge_ok = valid_ifname(&cfg.bridge)
            && cfg
                .bridge
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
        if !bridge_ok {
            return Err(NetError::Config(format!(
                "bridge name {:?} must be 1-15 characters of A-Z, a-z, 0-9, '-', '_' and '.'",
                cfg.bridge
            )));
        }
        cfg.subnet_v4 = cfg.subnet_v4.trunc();
        if cfg.subnet_v4.prefix_len() > 30 {
            return Err(NetError::Config(format!("IPv4 subnet {} is too small", cfg.subnet_v4)));
        }
        if let Some(v6) = &mut cfg.subnet_v6 {
            *v6 = v6.trunc();
            if v6.prefix_len() > 120 {
                return Err(NetError::Config(format!("IPv6 subnet {v6} is too small")));
            }
        }
        if let Some(mtu) = cfg.mtu
            && !(1280..=65535).contains(&mtu)
        {
            return Err(NetError::Config(format!("MTU {mtu} is out of range (1280..=65535)")));
        }
        let name_ok = cfg.nat_name.len() <= 20
            && cfg.nat_name.starts_with(|c: char| c.is_ascii_lowercase())
            && cfg
                .nat_name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !name_ok {
            return Err(NetError::Config(format!(
                "NAT name {:?} must be 1-20 characters of a-z, 0-9 and _, starting with a letter",
                cfg.nat_name
            )));
        }
        if cfg.state_dir.as_os_str().is_empty() {
            return Err(NetError::Config("state_dir is empty".into()));
        }
        let gateway_v4 = first_host_v4(cfg.subnet_v4);
        let gateway_v6 = cfg.subnet_v6.map(first_host_v6);
        Ok(BuiltinNetwork {
            ipam: Ipam::new(cfg.state_dir.join("ipam")),
            ports: PortClaims::new(cfg.state_dir.join("ports")),
            cfg,
            gateway_v4,
            gateway_v6,
            nat: tokio::sync::OnceCell::new(),
            nat_base_applied: AtomicBool::new(false),
        })
    }

    pub fn config(&self) -> &BuiltinConfig {
        &self.cfg
    }

    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway_v4
    }

    /// The host-side veth name of a sandbox: `pv` + 11 hex characters of its id (of a
    /// hash of it when the id does not start with 11 hex digits).
    pub fn host_veth_name(sandbox_id: &str) -> String {
        let prefix = sandbox_id
            .get(..11)
            .filter(|p| p.bytes().all(|b| b.is_ascii_hexdigit()));
        match prefix {
            Some(p) => format!("pv{}", p.to_ascii_lowercase()),
            None => format!("pv{:011x}", crate::sys::fnv1a(sandbox_id.as_bytes()) >> 20),
        }
    }

    /// Makes the bridge and sysctls what they should be, and applies the base NAT ruleset
    /// unless this instance already did (an nft/iptables transaction costs milliseconds;
    /// [`is_ready`](Self::is_ready) verifies it and, if damaged, makes the next call
    /// re-apply it). Idempotent and cheap; [`attach`](Self::attach) does the same itself.
    pub async fn ensure_ready(&self) -> Result<()> {
        let nat = self.nat().await?;
        let host = Netlink::node().await?;
        self.ensure_host(&host).await?;
        self.apply_nat(nat, &[], "").await
    }

    /// For the runtime's NetworkReady condition: the bridge exists and is up, and the base
    /// NAT ruleset is intact.
    pub async fn is_ready(&self) -> Result<(), String> {
        let nat = self.nat().await.map_err(|e| error_chain(&e))?;
        let host = Netlink::node().await.map_err(|e| error_chain(&e))?;
        match host.link_by_name(&self.cfg.bridge).await {
            Ok(Some(link)) if link.up => {}
            Ok(Some(_)) => return Err(format!("bridge {} is down", self.cfg.bridge)),
            Ok(None) => return Err(format!("bridge {} does not exist", self.cfg.bridge)),
            Err(e) => return Err(error_chain(&e)),
        }
        let checked = nat.check(&self.nat_base()).await;
        if checked.is_err() {
            self.nat_base_applied.store(false, Ordering::Release);
        }
        checked
    }

    /// Connects a pod's network namespace: address(es), veth, routes, hostPorts. On
    /// failure everything done so far is undone before the error is returned. Retrying
    /// for the same sandbox reuses its addresses and replaces what an earlier attempt left.
    pub async fn attach(&self, req: &AttachRequest) -> Result<Attachment> {
        validate_sandbox_id(&req.sandbox_id)?;
        if !valid_ifname(&req.ifname) {
            return Err(NetError::Invalid(format!(
                "{:?} is not a valid interface name",
                req.ifname
            )));
        }
        let ports = self.port_requests(&req.port_mappings)?;
        let netns = File::open(&req.netns).map_err(|source| NetError::Netns {
            path: req.netns.clone(),
            source,
        })?;
        let nat = self.nat().await?;
        let host = Netlink::node().await?;
        let bridge = self.ensure_host(&host).await?;

        // Whatever an earlier attempt for this sandbox left is replaced (its veth takes the
        // pod end with it).
        let veth = Self::host_veth_name(&req.sandbox_id);
        if let Some(old) = host.link_by_name(&veth).await? {
            self.remove_host_veth(&host, &veth, &old, &req.sandbox_id).await?;
        }
        if self.ports.owned_by(&req.sandbox_id)? {
            nat.remove_tagged(&self.nat_base(), &req.sandbox_id).await?;
            self.ports.release(&req.sandbox_id)?;
        }

        let pod = Netlink::in_netns(&netns, &req.netns).await?;
        if pod.link_by_name(&req.ifname).await?.is_some() {
            return Err(NetError::Conflict(format!(
                "interface {} already exists in network namespace {}",
                req.ifname,
                req.netns.display()
            )));
        }

        let mut done = Done::default();
        let steps = AttachSteps {
            req,
            ports: &ports,
            netns: &netns,
            nat,
            host: &host,
            pod: &pod,
            bridge: &bridge,
            veth: &veth,
        };
        match self.attach_steps(&steps, &mut done).await {
            Ok(attachment) => Ok(attachment),
            Err(err) => {
                tracing::warn!(sandbox = %req.sandbox_id, error = %error_chain(&err), "attach failed, undoing");
                self.undo(&steps, &done).await;
                Err(err)
            }
        }
    }

    /// Disconnects a sandbox: its veth, NAT rules, port and address claims. Idempotent;
    /// needs only the sandbox id (the netns may be gone). `netns` and `attachment`, when
    /// given, are used to find the pod-side interface if the host side is missing.
    pub async fn detach(&self, sandbox_id: &str, netns: Option<&Path>, attachment: Option<&Attachment>) -> Result<()> {
        validate_sandbox_id(sandbox_id)?;
        // Links and rules are independent (and both slow in the kernel): done concurrently.
        let (links, rules) = tokio::join!(self.detach_links(sandbox_id, netns, attachment), async {
            self.nat().await?.remove_tagged(&self.nat_base(), sandbox_id).await
        });
        // Claims go last: until the rules are gone, the ports stay reserved.
        let results = [
            links,
            rules.map(drop),
            self.ports.release(sandbox_id).map(drop),
            self.ipam.release(sandbox_id).map(drop),
        ];
        let mut first_err = None;
        for e in results.into_iter().filter_map(Result::err) {
            tracing::warn!(sandbox = %sandbox_id, error = %error_chain(&e), "detach step failed");
            first_err.get_or_insert(e);
        }
        first_err.map_or(Ok(()), Err)
    }

    async fn detach_links(
        &self,
        sandbox_id: &str,
        netns: Option<&Path>,
        attachment: Option<&Attachment>,
    ) -> Result<()> {
        let host = Netlink::node().await?;
        let mut names = vec![Self::host_veth_name(sandbox_id)];
        if let Some(a) = attachment
            && !names.contains(&a.host_veth)
        {
            names.push(a.host_veth.clone());
        }
        let mut removed = false;
        for name in &names {
            if let Some(link) = host.link_by_name(name).await? {
                self.remove_host_veth(&host, name, &link, sandbox_id).await?;
                removed = true;
            }
        }
        match (removed, netns, attachment) {
            (false, Some(path), Some(a)) => remove_pod_veth(path, &a.ifname).await,
            _ => Ok(()),
        }
    }

    /// Removes everything: the pods' veths, the bridge, our NAT table/chains and the state
    /// directory. For tests and uninstall.
    pub async fn teardown_all(&self) -> Result<()> {
        let host = Netlink::node().await?;
        if let Some(bridge) = host.link_by_name(&self.cfg.bridge).await? {
            for port in host.ports_of(bridge.index).await? {
                host.delete_link(port).await?;
            }
            host.delete_link(bridge.index).await?;
        }
        let nat = self.nat().await?;
        nat.teardown(&self.nat_base()).await?;
        match std::fs::remove_dir_all(&self.cfg.state_dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(NetError::Io {
                op: format!("removing {}", self.cfg.state_dir.display()),
                source,
            }),
        }
    }

    async fn nat(&self) -> Result<&Nat> {
        self.nat
            .get_or_try_init(|| Nat::detect(self.cfg.nat, &self.cfg.nat_name))
            .await
    }

    /// Adds `rules` (tagged `tag`) in one transaction, with the base ruleset if this
    /// instance has not applied it yet or the rules alone fail (our table or chains were
    /// removed behind our back).
    async fn apply_nat(&self, nat: &Nat, rules: &[DnatRule], tag: &str) -> Result<()> {
        let base = self.nat_base();
        if self.nat_base_applied.load(Ordering::Acquire) {
            if rules.is_empty() {
                return Ok(());
            }
            match nat.apply(&base, rules, tag, false).await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    tracing::info!(error = %error_chain(&e), "adding NAT rules failed; re-applying the base ruleset")
                }
            }
        }
        nat.apply(&base, rules, tag, true).await?;
        self.nat_base_applied.store(true, Ordering::Release);
        Ok(())
    }

    fn nat_base(&self) -> NatBase<'_> {
        NatBase {
            bridge: &self.cfg.bridge,
            v4: self.cfg.subnet_v4,
            v6: self.cfg.subnet_v6,
            cluster: &self.cfg.cluster_subnets,
        }
    }

    /// Bridge up with the gateway address(es), forwarding and route_localnet on.
    async fn ensure_host(&self, host: &Netlink) -> Result<LinkInfo> {
        let mut addrs = vec![(IpAddr::V4(self.gateway_v4), self.cfg.subnet_v4.prefix_len())];
        if let (Some(gw), Some(net)) = (self.gateway_v6, self.cfg.subnet_v6) {
            addrs.push((IpAddr::V6(gw), net.prefix_len()));
        }
        let bridge = host
            .ensure_bridge(&self.cfg.bridge, self.cfg.mtu, mac_for(self.gateway_v4), &addrs)
            .await?;
        let mut settings = vec![
            ("net/ipv4/ip_forward".to_string(), "1"),
            (format!("net/ipv4/conf/{}/route_localnet", self.cfg.bridge), "1"),
        ];
        if self.cfg.subnet_v6.is_some() {
            settings.push(("net/ipv6/conf/all/forwarding".to_string(), "1"));
        }
        sysctl::ensure_in_node(&settings)?;
        Ok(bridge)
    }

    fn port_requests(&self, mappings: &[PortMapping]) -> Result<Vec<PortRequest>> {
        let mut out: Vec<PortRequest> = Vec::new();
        for m in mappings.iter().filter(|m| m.host_port != 0) {
            if m.container_port == 0 {
                return Err(NetError::Invalid(format!(
                    "host port {} maps to container port 0",
                    m.host_port
                )));
            }
            let host_ip = HostIp::parse(&m.host_ip)
                .ok_or_else(|| NetError::Invalid(format!("host IP {:?} is not an IP address", m.host_ip)))?;
            if host_ip.only_v6() && self.cfg.subnet_v6.is_none() {
                return Err(NetError::Invalid(format!(
                    "host IP {} is IPv6 but the pod network has no IPv6 subnet",
                    m.host_ip
                )));
            }
            let req = PortRequest {
                protocol: m.protocol,
                host_port: m.host_port,
                container_port: m.container_port,
                host_ip,
            };
            if let Some(dup) = out.iter().find(|o| o.clashes_with(&req)) {
                return Err(NetError::Invalid(format!("port mappings {dup} and {req} overlap")));
            }
            out.push(req);
        }
        Ok(out)
    }

    async fn attach_steps(&self, s: &AttachSteps<'_>, done: &mut Done) -> Result<Attachment> {
        let id = &s.req.sandbox_id;
        done.addresses = true;
        let (ipv4, ipv6) = self.ipam.allocate(id, self.cfg.subnet_v4, self.cfg.subnet_v6)?;

        done.ports = true;
        self.ports.reserve(id, s.ports)?;

        // The pod's links and its NAT rules are independent: done concurrently, an attach
        // with hostPorts costs about one nft/iptables call.
        let mac = mac_for(ipv4);
        let rules = dnat_rules(s.ports, ipv4, ipv6);
        done.rules = true;
        let (linked, natted) = tokio::join!(
            self.connect_pod(s, ipv4, ipv6, mac, &mut done.veth),
            self.apply_nat(s.nat, &rules, id)
        );
        linked?;
        natted?;

        Ok(Attachment {
            ipv4,
            ipv6,
            gateway: self.gateway_v4,
            gateway_v6: ipv6.and(self.gateway_v6),
            host_veth: s.veth.to_string(),
            mac: format_mac(mac),
            ifname: s.req.ifname.clone(),
        })
    }

    /// The veth pair and the pod side's addresses, links and routes. `created` tells
    /// whether the veth exists (and so must be undone).
    async fn connect_pod(
        &self,
        s: &AttachSteps<'_>,
        ipv4: Ipv4Addr,
        ipv6: Option<Ipv6Addr>,
        mac: [u8; 6],
        created: &mut bool,
    ) -> Result<()> {
        let mtu = self.cfg.mtu.unwrap_or(s.bridge.mtu);
        s.host
            .create_veth(s.veth, &s.req.ifname, s.netns, s.bridge.index, mtu, mac)
            .await
            .map_err(|e| match e {
                NetError::Netlink { source, .. } if link::errno(&source) == Some(libc::EEXIST) => NetError::Conflict(
                    format!("interface {} or {} (in the pod) already exists", s.veth, s.req.ifname),
                ),
                e => e,
            })?;
        *created = true;
        let host_end = s
            .host
            .link_by_name(s.veth)
            .await?
            .ok_or_else(|| NetError::Conflict(format!("veth {} vanished right after creation", s.veth)))?;
        s.host.set_bridge_port(host_end.index, &s.req.sandbox_id).await?;

        let eth = s.pod.link_by_name(&s.req.ifname).await?.ok_or_else(|| {
            NetError::Conflict(format!("{} vanished from the pod right after creation", s.req.ifname))
        })?;
        s.pod
            .add_address(eth.index, IpAddr::V4(ipv4), self.cfg.subnet_v4.prefix_len())
            .await?;
        if let (Some(ip), Some(net)) = (ipv6, self.cfg.subnet_v6) {
            s.pod.add_address(eth.index, IpAddr::V6(ip), net.prefix_len()).await?;
        }
        s.pod.set_up(eth.index).await?;
        if let Some(lo) = s.pod.link_by_name("lo").await?
            && !lo.up
        {
            s.pod.set_up(lo.index).await?;
        }
        s.pod.add_default_route(eth.index, IpAddr::V4(self.gateway_v4)).await?;
        if let (Some(gw), Some(_)) = (self.gateway_v6, ipv6) {
            s.pod.add_default_route(eth.index, IpAddr::V6(gw)).await?;
        }
        Ok(())
    }

    async fn undo(&self, s: &AttachSteps<'_>, done: &Done) {
        let id = &s.req.sandbox_id;
        let warn = |what: &str, e: NetError| {
            tracing::warn!(sandbox = %id, error = %error_chain(&e), "undoing attach: {what}");
        };
        if done.rules
            && let Err(e) = s.nat.remove_tagged(&self.nat_base(), id).await
        {
            warn("NAT rules", e);
        }
        if done.veth
            && let Err(e) = s.host.delete_link_by_name(s.veth).await
        {
            warn("veth", e);
        }
        if done.ports
            && let Err(e) = self.ports.release(id)
        {
            warn("port claims", e);
        }
        if done.addresses
            && let Err(e) = self.ipam.release(id)
        {
            warn("address claims", e);
        }
    }

    /// Deletes a host veth unless its alias says it belongs to another sandbox.
    async fn remove_host_veth(&self, host: &Netlink, name: &str, link: &LinkInfo, sandbox_id: &str) -> Result<()> {
        match link.alias.as_deref() {
            Some(owner) if owner != sandbox_id => Err(NetError::Conflict(format!(
                "host interface {name} belongs to sandbox {owner}, not {sandbox_id}"
            ))),
            _ => host.delete_link(link.index).await,
        }
    }
}

/// What an attach has done so far, for undoing it.
#[derive(Default)]
struct Done {
    addresses: bool,
    ports: bool,
    veth: bool,
    rules: bool,
}

struct AttachSteps<'a> {
    req: &'a AttachRequest,
    ports: &'a [PortRequest],
    netns: &'a File,
    nat: &'a Nat,
    host: &'a Netlink,
    pod: &'a Netlink,
    bridge: &'a LinkInfo,
    veth: &'a str,
}

/// Deletes the pod end of a veth inside a netns that still exists.
async fn remove_pod_veth(netns: &Path, ifname: &str) -> Result<()> {
    let file = match File::open(netns) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(NetError::Netns {
                path: netns.to_path_buf(),
                source,
            });
        }
    };
    let pod = Netlink::in_netns(&file, netns).await?;
    match pod.link_by_name(ifname).await? {
        Some(link) if link.is_veth => pod.delete_link(link.index).await,
        _ => Ok(()),
    }
}

fn dnat_rules(ports: &[PortRequest], ipv4: Ipv4Addr, ipv6: Option<Ipv6Addr>) -> Vec<DnatRule> {
    let mut rules = Vec::new();
    for p in ports {
        let (v4, v6, daddr) = match p.host_ip {
            HostIp::Any => (true, true, None),
            HostIp::AnyV4 => (true, false, None),
            HostIp::AnyV6 => (false, true, None),
            HostIp::Addr(ip) => (ip.is_ipv4(), ip.is_ipv6(), Some(ip)),
        };
        let mut push = |to: IpAddr| {
            rules.push(DnatRule {
                protocol: p.protocol,
                host_port: p.host_port,
                daddr,
                to,
                to_port: p.container_port,
            })
        };
        if v4 {
            push(IpAddr::V4(ipv4));
        }
        if v6 && let Some(ip) = ipv6 {
            push(IpAddr::V6(ip));
        }
    }
    rules
}

fn validate_sandbox_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(NetError::Invalid(format!(
            "sandbox id {id:?} must be 1-128 characters of A-Z, a-z, 0-9, '-', '_' and '.'"
        )))
    }
}

fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && name != "."
        && name != ".."
        && name.bytes().all(|b| b.is_ascii_graphic() && b != b'/' && b != b':')
}

fn first_host_v4(net: Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(net.network()) + 1)
}

fn first_host_v6(net: Ipv6Net) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(net.network()) + 1)
}

/// A locally administered unicast MAC derived from an IPv4 address (`0a:58:` + the four
/// octets): stable for the address, so neighbours' caches stay right when it is reused.
fn mac_for(ip: Ipv4Addr) -> [u8; 6] {
    let o = ip.octets();
    [0x0a, 0x58, o[0], o[1], o[2], o[3]]
}

fn format_mac(mac: [u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// An error and its sources, joined with ": ".
pub(crate) fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
