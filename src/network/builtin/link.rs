//! rtnetlink operations: the bridge, veth pairs and, inside a pod's network namespace,
//! addresses, links and routes. A netlink socket stays bound to the namespace it was
//! created in, so one made on a short-lived thread that joined the pod's namespace
//! configures that namespace from anywhere.

use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::path::Path;

use futures_util::TryStreamExt;
use netlink_packet_route::address::{AddressAttribute, AddressFlags};
use netlink_packet_route::link::{InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::route::{RouteAttribute, RouteHeader};
use nix::sched::CloneFlags;
use rtnetlink::sys::protocols::NETLINK_ROUTE;
use rtnetlink::sys::{Socket, TokioSocket};
use rtnetlink::{LinkBridge, LinkBridgePort, LinkUnspec, LinkVeth, RouteMessageBuilder};

use super::{NetError, Result};

/// What we need to know about a link.
#[derive(Clone, Debug)]
pub(super) struct LinkInfo {
    pub index: u32,
    pub up: bool,
    pub mtu: u32,
    pub alias: Option<String>,
    pub controller: Option<u32>,
    pub is_bridge: bool,
    pub is_veth: bool,
}

impl LinkInfo {
    fn parse(msg: LinkMessage) -> LinkInfo {
        let mut info = LinkInfo {
            index: msg.header.index,
            up: msg.header.flags.contains(LinkFlags::Up),
            mtu: 0,
            alias: None,
            controller: None,
            is_bridge: false,
            is_veth: false,
        };
        for attr in msg.attributes {
            match attr {
                LinkAttribute::Mtu(mtu) => info.mtu = mtu,
                LinkAttribute::IfAlias(alias) if !alias.is_empty() => info.alias = Some(alias),
                LinkAttribute::Controller(index) => info.controller = Some(index),
                LinkAttribute::LinkInfo(infos) => {
                    for i in infos {
                        if let netlink_packet_route::link::LinkInfo::Kind(kind) = i {
                            info.is_bridge = kind == InfoKind::Bridge;
                            info.is_veth = kind == InfoKind::Veth;
                        }
                    }
                }
                _ => {}
            }
        }
        info
    }
}

/// A route-netlink connection to one network namespace; dropped, it closes. Needs a Tokio
/// runtime with I/O enabled (the connection is a spawned task).
pub(super) struct Netlink {
    handle: rtnetlink::Handle,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Netlink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The positive errno of a netlink error reply.
pub(super) fn errno(err: &rtnetlink::Error) -> Option<i32> {
    match err {
        rtnetlink::Error::NetlinkError(msg) => msg.code.map(|c| -c.get()),
        _ => None,
    }
}

fn nl_err(op: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetError {
    let op = op.into();
    move |source| NetError::Netlink { op, source }
}

impl Netlink {
    /// A connection to the calling thread's network namespace (the host's).
    pub(super) fn host() -> Result<Netlink> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(|source| NetError::Io {
            op: "opening a netlink socket".into(),
            source,
        })?;
        Ok(Netlink {
            handle,
            task: tokio::spawn(conn),
        })
    }

    /// A connection to the node's network namespace (see [`crate::sys::netns`]).
    pub(super) async fn node() -> Result<Netlink> {
        let Some(path) = crate::sys::netns::node() else {
            return Netlink::host();
        };
        let file = File::open(path).map_err(|source| NetError::Netns {
            path: path.to_path_buf(),
            source,
        })?;
        Netlink::in_netns(&file, path).await
    }

    /// A connection to the network namespace `netns` (an open nsfs file, named `path`).
    pub(super) async fn in_netns(netns: &File, path: &Path) -> Result<Netlink> {
        let ns_err = |source| NetError::Netns {
            path: path.to_path_buf(),
            source,
        };
        let ns = OwnedFd::from(netns.try_clone().map_err(ns_err)?);
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("netns-netlink".into())
            .spawn(move || {
                let made = nix::sched::setns(&ns, CloneFlags::CLONE_NEWNET)
                    .map_err(io::Error::from)
                    .and_then(|()| Socket::new(NETLINK_ROUTE))
                    .and_then(|socket| {
                        socket.set_non_blocking(true)?;
                        // SAFETY: into_raw_fd hands over sole ownership of the open socket.
                        Ok(unsafe { OwnedFd::from_raw_fd(socket.into_raw_fd()) })
                    });
                let _ = tx.send(made);
            })
            .map_err(ns_err)?;
        let fd = rx
            .await
            .map_err(|_| ns_err(io::Error::other("netlink thread died")))?
            .map_err(ns_err)?;
        // SAFETY: `fd` is an open, non-blocking netlink socket we own; the TokioSocket takes
        // it over. We are inside a Tokio runtime, which registering it requires.
        let socket = unsafe { TokioSocket::from_raw_fd(fd.into_raw_fd()) };
        let (conn, handle, _) = rtnetlink::from_socket(socket);
        Ok(Netlink {
            handle,
            task: tokio::spawn(conn),
        })
    }

    pub(super) async fn link_by_name(&self, name: &str) -> Result<Option<LinkInfo>> {
        let mut links = self.handle.link().get().match_name(name.to_string()).execute();
        match links.try_next().await {
            Ok(link) => Ok(link.map(LinkInfo::parse)),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(nl_err(format!("looking up link {name}"))(e)),
        }
    }

    async fn link_by_index(&self, index: u32) -> Result<Option<LinkInfo>> {
        let mut links = self.handle.link().get().match_index(index).execute();
        match links.try_next().await {
            Ok(link) => Ok(link.map(LinkInfo::parse)),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(nl_err(format!("looking up link #{index}"))(e)),
        }
    }

    /// The indexes of the links enslaved to `bridge`.
    pub(super) async fn ports_of(&self, bridge: u32) -> Result<Vec<u32>> {
        let links: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(nl_err("listing links"))?;
        Ok(links
            .into_iter()
            .map(LinkInfo::parse)
            .filter(|l| l.controller == Some(bridge))
            .map(|l| l.index)
            .collect())
    }

    /// Makes the bridge exist, be up and carry `addrs`; returns it.
    pub(super) async fn ensure_bridge(
        &self,
        name: &str,
        mtu: Option<u32>,
        mac: [u8; 6],
        addrs: &[(IpAddr, u8)],
    ) -> Result<LinkInfo> {
        let mut bridge = match self.link_by_name(name).await? {
            Some(link) => link,
            None => {
                let mtu = match mtu {
                    Some(mtu) => mtu,
                    None => self.uplink_mtu().await,
                };
                // A fixed MAC, so the bridge's does not follow its lowest port's.
                let msg = LinkBridge::new(name).mtu(mtu).address(mac.to_vec()).build();
                match self.handle.link().add(msg).execute().await {
                    Ok(()) => {}
                    Err(e) if errno(&e) == Some(libc::EEXIST) => {}
                    Err(e) => return Err(nl_err(format!("creating bridge {name}"))(e)),
                }
                self.link_by_name(name)
                    .await?
                    .ok_or_else(|| NetError::Conflict(format!("bridge {name} vanished right after creation")))?
            }
        };
        if !bridge.is_bridge {
            return Err(NetError::Config(format!("interface {name} exists and is not a bridge")));
        }
        if !bridge.up {
            self.set_up(bridge.index).await?;
            bridge.up = true;
        }
        let have = self.addresses(bridge.index).await?;
        for &(ip, prefix) in addrs {
            if !have.contains(&ip) {
                self.add_address(bridge.index, ip, prefix).await?;
            }
        }
        Ok(bridge)
    }

    /// The MTU of the interface of the host's IPv4 default route; 1500 without one.
    async fn uplink_mtu(&self) -> u32 {
        let mut routes = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute();
        let mut oif = None;
        while let Ok(Some(route)) = routes.try_next().await {
            if oif.is_none()
                && route.header.destination_prefix_length == 0
                && route.header.table == RouteHeader::RT_TABLE_MAIN
            {
                oif = route.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Oif(index) => Some(*index),
                    _ => None,
                });
            }
        }
        match oif {
            Some(index) => match self.link_by_index(index).await {
                Ok(Some(link)) if link.mtu >= 1280 => link.mtu,
                _ => 1500,
            },
            None => 1500,
        }
    }

    /// Creates a veth pair: `host` enslaved to `bridge` and up, `peer` (with `mac`) made
    /// directly inside the namespace `netns`.
    pub(super) async fn create_veth(
        &self,
        host: &str,
        peer: &str,
        netns: &File,
        bridge: u32,
        mtu: u32,
        mac: [u8; 6],
    ) -> Result<()> {
        let peer_msg = LinkUnspec::new_with_name(peer)
            .mtu(mtu)
            .address(mac.to_vec())
            .setns_by_fd(netns.as_raw_fd())
            .build();
        let msg = LinkVeth::new(host, peer)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg)))
            .mtu(mtu)
            .controller(bridge)
            .up()
            .build();
        self.handle
            .link()
            .add(msg)
            .execute()
            .await
            .map_err(nl_err(format!("creating veth {host}/{peer}")))
    }

    /// Turns hairpin mode on for a bridge port (so a pod reaches itself through a NAT'd
    /// address) and records the owning sandbox in its alias.
    pub(super) async fn set_bridge_port(&self, index: u32, owner: &str) -> Result<()> {
        let msg = LinkBridgePort::new(index).hairpin(true).alias(owner).build();
        self.handle
            .link()
            .set_port(msg)
            .execute()
            .await
            .map_err(nl_err(format!("configuring bridge port #{index}")))
    }

    pub(super) async fn set_up(&self, index: u32) -> Result<()> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(nl_err(format!("setting link #{index} up")))
    }

    /// Deletes a link; one already gone is fine.
    pub(super) async fn delete_link(&self, index: u32) -> Result<()> {
        match self.handle.link().del(index).execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(()),
            Err(e) => Err(nl_err(format!("deleting link #{index}"))(e)),
        }
    }

    pub(super) async fn delete_link_by_name(&self, name: &str) -> Result<()> {
        match self.link_by_name(name).await? {
            Some(link) => self.delete_link(link.index).await,
            None => Ok(()),
        }
    }

    async fn addresses(&self, index: u32) -> Result<Vec<IpAddr>> {
        let msgs: Vec<_> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(nl_err(format!("listing addresses of link #{index}")))?;
        let mut out = Vec::new();
        for msg in msgs.into_iter().filter(|m| m.header.index == index) {
            for attr in msg.attributes {
                if let AddressAttribute::Local(ip) | AddressAttribute::Address(ip) = attr
                    && !out.contains(&ip)
                {
                    out.push(ip);
                }
            }
        }
        Ok(out)
    }

    /// Adds an address (IPv6 ones without duplicate address detection, so they are usable
    /// at once); one already there is fine.
    pub(super) async fn add_address(&self, index: u32, ip: IpAddr, prefix: u8) -> Result<()> {
        let mut req = self.handle.address().add(index, ip, prefix);
        if ip.is_ipv6() {
            req.message_mut()
                .attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        match req.execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(libc::EEXIST) => Ok(()),
            Err(e) => Err(nl_err(format!("adding address {ip}/{prefix} to link #{index}"))(e)),
        }
    }

    /// Adds a default route via `gateway` out of link `index`; one already there is fine.
    pub(super) async fn add_default_route(&self, index: u32, gateway: IpAddr) -> Result<()> {
        let msg = match gateway {
            IpAddr::V4(gw) => RouteMessageBuilder::<Ipv4Addr>::new()
                .gateway(gw)
                .output_interface(index)
                .build(),
            IpAddr::V6(gw) => RouteMessageBuilder::<Ipv6Addr>::new()
                .gateway(gw)
                .output_interface(index)
                .build(),
        };
        match self.handle.route().add(msg).execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(libc::EEXIST) => Ok(()),
            Err(e) => Err(nl_err(format!("adding default route via {gateway}"))(e)),
        }
    }
}
