//! The VM's NIC joined to the pod's network namespace.
//!
//! The pod network (CNI or built-in) sets up `eth0` in the pod's pinned
//! network namespace as for any pod. Then:
//! - a tap is created in the node's namespace (QEMU, which runs there, gets it
//!   opened by libvirt at domain start, `type='ethernet'`, `managed='no'`);
//! - once QEMU holds it, the tap moves into the pod namespace (an open tap
//!   keeps working across namespaces);
//! - there, `eth0` and the tap become ports of a bridge `br0`; `eth0` gives
//!   its IPv4 address up (the VM owns it now) and its MAC (the VM NIC takes
//!   it; `eth0` gets a new one), so the node's neighbour entries stay right;
//!   the bridge learns no addresses on `eth0`, where the node's bridge
//!   (hairpin mode) echoes the VM's own broadcasts back;
//! - the VM helper's DHCP server (see [`super::dhcp`]) leases it the pod IP.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;

use serde::{Deserialize, Serialize};

use super::VmError;

/// The pod's interface, as the network set it up.
pub const POD_INTERFACE: &str = "eth0";
/// The bridge inside the pod namespace.
pub const POD_BRIDGE: &str = "br0";

/// What the VM takes over from the pod's `eth0`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodNet {
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Option<Ipv4Addr>,
    /// Other routes via a gateway, as (destination, prefix, gateway).
    #[serde(default)]
    pub routes: Vec<(Ipv4Addr, u8, Ipv4Addr)>,
    pub mtu: u32,
    /// `eth0`'s MAC, which the VM's NIC takes.
    pub mac: String,
    pub nameservers: Vec<Ipv4Addr>,
    pub searches: Vec<String>,
}

/// The tap's name for a sandbox: `vmt` and 12 characters of its ID.
pub fn tap_name(sandbox_id: &str) -> String {
    format!("vmt{}", &sandbox_id[..sandbox_id.len().min(12)])
}

fn run(cmd: &mut Command) -> Result<String, VmError> {
    let output = cmd.output().map_err(VmError::io(format!("running {cmd:?}")))?;
    if !output.status.success() {
        return Err(VmError::Tool {
            tool: "ip",
            message: format!("{cmd:?}: {}", String::from_utf8_lossy(&output.stderr).trim()),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// `ip ARGS` in the network namespace pinned at `netns`.
fn ip_in(netns: &Path, args: &[&str]) -> Result<String, VmError> {
    run(Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .arg("ip")
        .args(args))
}

fn ip(args: &[&str]) -> Result<String, VmError> {
    run(Command::new("ip").args(args))
}

fn json(text: &str) -> Result<serde_json::Value, VmError> {
    serde_json::from_str(text).map_err(|e| VmError::Invalid(format!("unreadable `ip -j` output: {e}")))
}

/// Reads `eth0`'s IPv4 address, MAC, MTU and routes, and the DNS servers of
/// the pod's resolv.conf.
pub fn read_pod_net(netns: &Path, resolv_conf: &Path) -> Result<PodNet, VmError> {
    let links = json(&ip_in(netns, &["-j", "-4", "addr", "show", "dev", POD_INTERFACE])?)?;
    let link = links
        .get(0)
        .ok_or_else(|| VmError::Invalid(format!("the pod has no {POD_INTERFACE}")))?;
    let addr = link["addr_info"]
        .as_array()
        .and_then(|a| a.iter().find(|a| a["family"] == "inet"))
        .ok_or_else(|| VmError::Invalid(format!("the pod's {POD_INTERFACE} has no IPv4 address")))?;
    let address: Ipv4Addr = addr["local"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| VmError::Invalid("unreadable pod address".into()))?;
    let prefix = addr["prefixlen"].as_u64().unwrap_or(32) as u8;
    let mtu = link["mtu"].as_u64().unwrap_or(1500) as u32;
    let links = json(&ip_in(netns, &["-j", "link", "show", "dev", POD_INTERFACE])?)?;
    let mac = links[0]["address"].as_str().unwrap_or_default().to_string();
    let mut gateway = None;
    let mut routes = Vec::new();
    for route in json(&ip_in(netns, &["-j", "-4", "route", "show"])?)?
        .as_array()
        .into_iter()
        .flatten()
    {
        let Some(via) = route["gateway"].as_str().and_then(|g| g.parse::<Ipv4Addr>().ok()) else {
            continue;
        };
        match route["dst"].as_str() {
            Some("default") => gateway = Some(via),
            Some(dst) => {
                let (net, len) = dst.split_once('/').unwrap_or((dst, "32"));
                if let (Ok(net), Ok(len)) = (net.parse(), len.parse()) {
                    routes.push((net, len, via));
                }
            }
            None => {}
        }
    }
    let resolv = std::fs::read_to_string(resolv_conf).unwrap_or_default();
    let mut nameservers = Vec::new();
    let mut searches = Vec::new();
    for line in resolv.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("nameserver") => nameservers.extend(words.next().and_then(|w| w.parse::<Ipv4Addr>().ok())),
            Some("search") => searches.extend(words.map(String::from)),
            _ => {}
        }
    }
    Ok(PodNet {
        address,
        prefix,
        gateway,
        routes,
        mtu,
        mac,
        nameservers,
        searches,
    })
}

/// A locally administered unicast MAC, for `eth0` once the VM took its own.
pub fn random_mac() -> String {
    let b: [u8; 5] = rand::random();
    format!("0a:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3], b[4])
}

/// Creates the (persistent) tap in the node's namespace; fine if it exists.
pub fn create_tap(tap: &str) -> Result<(), VmError> {
    if Path::new("/sys/class/net").join(tap).exists() {
        return Ok(());
    }
    ip(&["tuntap", "add", "dev", tap, "mode", "tap"]).map(|_| ())
}

/// Deletes the tap wherever it is (node or pod namespace); fine if it is gone.
pub fn delete_tap(tap: &str, netns: Option<&Path>) {
    let _ = ip(&["link", "del", "dev", tap]);
    if let Some(netns) = netns.filter(|n| n.exists()) {
        let _ = ip_in(netns, &["link", "del", "dev", tap]);
    }
}

/// Moves the tap (already opened by QEMU) into the pod namespace and bridges
/// it with `eth0`, which gives up its address and MAC. Idempotent.
pub fn join_pod(netns: &Path, tap: &str, net: &PodNet) -> Result<(), VmError> {
    if Path::new("/sys/class/net").join(tap).exists() {
        ip(&["link", "set", "dev", tap, "netns", &netns.display().to_string()])?;
    }
    let mtu = net.mtu.to_string();
    let links = json(&ip_in(netns, &["-j", "link", "show"])?)?;
    let has_bridge = links
        .as_array()
        .into_iter()
        .flatten()
        .any(|l| l["ifname"] == POD_BRIDGE);
    if !has_bridge {
        ip_in(netns, &["link", "add", POD_BRIDGE, "mtu", &mtu, "type", "bridge"])?;
    }
    ip_in(netns, &["addr", "flush", "dev", POD_INTERFACE])?;
    let eth0_mac = links
        .as_array()
        .into_iter()
        .flatten()
        .find(|l| l["ifname"] == POD_INTERFACE)
        .and_then(|l| l["address"].as_str())
        .unwrap_or_default()
        .to_string();
    if eth0_mac.eq_ignore_ascii_case(&net.mac) {
        ip_in(netns, &["link", "set", "dev", POD_INTERFACE, "down"])?;
        ip_in(netns, &["link", "set", "dev", POD_INTERFACE, "address", &random_mac()])?;
    }
    ip_in(
        netns,
        &["link", "set", "dev", POD_INTERFACE, "master", POD_BRIDGE, "up"],
    )?;
    // No address learning on `eth0`: its peer is a port of the node's bridge,
    // which is normally in hairpin mode (so pods reach themselves through
    // NAT'd addresses) and so sends every broadcast and multicast of the VM
    // (ARP, DHCP, IPv6 DAD and router solicitations) straight back. Learning
    // from those echoes would move the VM's MAC to `eth0`, and `br0` would
    // then drop whatever comes in on `eth0` for the VM (the gateway's ARP
    // replies, the node's TCP) until the VM sent a unicast frame again; a VM
    // that only answers waits for the node's neighbour entry for the pod IP
    // to time out and the node to ask by broadcast: tens of seconds. With
    // two ports nothing needs learning there: what the tap sends to unknown
    // addresses goes to `eth0` anyway.
    ip_in(
        netns,
        &[
            "link",
            "set",
            "dev",
            POD_INTERFACE,
            "type",
            "bridge_slave",
            "learning",
            "off",
        ],
    )?;
    ip_in(
        netns,
        &["link", "set", "dev", tap, "mtu", &mtu, "master", POD_BRIDGE, "up"],
    )?;
    ip_in(netns, &["link", "set", "dev", POD_BRIDGE, "up"])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_names_fit_in_ifnamsiz() {
        let tap = tap_name(&"a".repeat(64));
        assert_eq!(tap.len(), 15);
        assert!(tap.starts_with("vmt"));
        let mac = random_mac();
        assert_eq!(mac.len(), 17);
        assert!(mac.starts_with("0a:"));
    }
}
