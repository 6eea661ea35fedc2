//! The network of an extra node on this machine (`up --nodes`): a named
//! network namespace joined to the host by a veth pair on a /30. The node's
//! end (`eth0`) is its InternalIP and its default route leads to the host,
//! which forwards between nodes (the first node's route controller routes each
//! node's pod subnet to its InternalIP) and masquerades what leaves the machine.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use anyhow::Context;
use ipnet::Ipv4Net;

/// The interface name inside the node's namespace.
const NODE_IFNAME: &str = "eth0";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeNetwork {
    /// The namespace's name under /run/netns.
    pub netns: String,
    /// A /30 (or wider): the host takes the first address, the node the second.
    pub link: Ipv4Net,
}

impl NodeNetwork {
    pub fn new(netns: &str, link: Ipv4Net) -> anyhow::Result<NodeNetwork> {
        anyhow::ensure!(
            link.prefix_len() <= 30,
            "the node link {link} needs two host addresses (a /30 or wider)"
        );
        anyhow::ensure!(
            !netns.is_empty()
                && netns.len() <= 64
                && netns.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
                && !netns.starts_with('.'),
            "bad network namespace name {netns:?}"
        );
        Ok(NodeNetwork {
            netns: netns.to_string(),
            link: link.trunc(),
        })
    }

    pub fn host_ip(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.link.network()) + 1)
    }

    pub fn node_ip(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.link.network()) + 2)
    }

    fn tag(&self) -> String {
        let hash = crate::sys::fnv1a(self.netns.as_bytes());
        format!("{:08x}", hash as u32)
    }

    /// The host's end of the link.
    pub fn host_link(&self) -> String {
        format!("pvn{}", self.tag())
    }

    /// Our nftables table on the host (masquerade of what the node sends out).
    pub fn table(&self) -> String {
        format!("podvisor_node_{}", self.tag())
    }

    /// Makes the namespace, the link and the host's rules what they should be
    /// (again, after a restart); returns the namespace's path.
    pub async fn ensure(&self) -> anyhow::Result<PathBuf> {
        let path = crate::sys::netns::ensure_named(&self.netns)?;
        let host_link = self.host_link();
        let ns = self.netns.as_str();
        let prefix = self.link.prefix_len();
        if !std::path::Path::new("/sys/class/net").join(&host_link).exists() {
            ip(&[
                "link",
                "add",
                &host_link,
                "type",
                "veth",
                "peer",
                "name",
                NODE_IFNAME,
                "netns",
                ns,
            ])
            .await?;
        }
        ip(&[
            "addr",
            "replace",
            &format!("{}/{prefix}", self.host_ip()),
            "dev",
            &host_link,
        ])
        .await?;
        ip(&["link", "set", &host_link, "up"]).await?;
        let node_addr = format!("{}/{prefix}", self.node_ip());
        ip(&["-n", ns, "addr", "replace", &node_addr, "dev", NODE_IFNAME]).await?;
        ip(&["-n", ns, "link", "set", NODE_IFNAME, "up"]).await?;
        ip(&["-n", ns, "link", "set", "lo", "up"]).await?;
        ip(&[
            "-n",
            ns,
            "route",
            "replace",
            "default",
            "via",
            &self.host_ip().to_string(),
        ])
        .await?;
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").context("enabling IPv4 forwarding")?;
        let table = self.table();
        let rules = format!(
            "add table ip {table}\ndelete table ip {table}\nadd table ip {table}\n\
             add chain ip {table} postrouting {{ type nat hook postrouting priority 100; policy accept; }}\n\
             add rule ip {table} postrouting ip saddr {} oifname != \"{host_link}\" masquerade\n",
            self.link
        );
        nft(&rules).await?;
        Ok(path)
    }

    /// Removes the link, the host's rules and the namespace (with all it holds).
    pub async fn remove(&self) {
        let host_link = self.host_link();
        if std::path::Path::new("/sys/class/net").join(&host_link).exists()
            && let Err(e) = ip(&["link", "del", &host_link]).await
        {
            tracing::warn!(error = %e, "removing the node link");
        }
        let table = self.table();
        let _ = nft(&format!("add table ip {table}\ndelete table ip {table}\n")).await;
        if let Err(e) = crate::sys::netns::remove_named(&self.netns) {
            tracing::warn!(netns = %self.netns, error = %e, "removing the node network namespace");
        }
    }
}

async fn ip(args: &[&str]) -> anyhow::Result<()> {
    crate::sys::ip(args).await.map(drop).map_err(anyhow::Error::msg)
}

async fn nft(script: &str) -> anyhow::Result<()> {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("running nft")?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(script.as_bytes()).await?;
    }
    let out = child.wait_with_output().await?;
    anyhow::ensure!(
        out.status.success(),
        "nft: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_names() {
        let net = NodeNetwork::new("podvisor-ab-n2", "10.87.0.5/30".parse().unwrap()).unwrap();
        assert_eq!(net.link.to_string(), "10.87.0.4/30");
        assert_eq!(net.host_ip(), Ipv4Addr::new(10, 87, 0, 5));
        assert_eq!(net.node_ip(), Ipv4Addr::new(10, 87, 0, 6));
        assert!(net.host_link().len() <= 15);
        assert!(NodeNetwork::new("x", "10.0.0.0/31".parse().unwrap()).is_err());
        assert!(NodeNetwork::new("../x", "10.0.0.0/30".parse().unwrap()).is_err());
    }

    #[tokio::test]
    async fn a_node_namespace_reaches_the_host_and_leaves_nothing_behind() {
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let name = format!("podvisor-nodenet-test-{}", std::process::id());
        let link: Ipv4Net = "10.86.254.0/30".parse().unwrap();
        let net = NodeNetwork::new(&name, link).unwrap();
        net.ensure().await.unwrap();
        // Idempotent, as after a restart.
        net.ensure().await.unwrap();
        // From inside, the host's end answers and sees the node's address.
        let listener = std::net::TcpListener::bind((net.host_ip(), 0)).unwrap();
        let target = listener.local_addr().unwrap();
        let ns = std::fs::File::open(crate::sys::netns::named_path(&name)).unwrap();
        let connected = std::thread::spawn(move || {
            nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            std::net::TcpStream::connect_timeout(&target, std::time::Duration::from_secs(2))
                .map(|s| s.local_addr().unwrap().ip())
        })
        .join()
        .unwrap();
        let host_link = net.host_link();
        net.remove().await;
        assert_eq!(connected.unwrap(), std::net::IpAddr::V4(net.node_ip()));
        assert!(!std::path::Path::new("/sys/class/net").join(host_link).exists());
        assert!(!crate::sys::netns::named_path(&name).exists());
    }
}
