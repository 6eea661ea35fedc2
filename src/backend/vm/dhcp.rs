//! A tiny DHCPv4 server for one client: the VM. It runs in the pod's network
//! namespace (in the VM helper), bound to the pod bridge, and answers
//! DISCOVER and REQUEST from the VM's MAC alone with the one lease it has:
//! the pod IP, prefix, router, routes, DNS and MTU. The lease never expires
//! (the address belongs to the pod for its whole life).

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;

use serde::{Deserialize, Serialize};

use super::VmError;

const MAGIC: [u8; 4] = [99, 130, 83, 99];
const DISCOVER: u8 = 1;
const OFFER: u8 = 2;
const REQUEST: u8 = 3;
const ACK: u8 = 5;
const NAK: u8 = 6;
const INFINITE: u32 = u32::MAX;

/// The one lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The client's MAC; other clients are ignored.
    pub mac: [u8; 6],
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub router: Option<Ipv4Addr>,
    /// Classless static routes (option 121): destination, prefix, gateway.
    pub routes: Vec<(Ipv4Addr, u8, Ipv4Addr)>,
    pub dns: Vec<Ipv4Addr>,
    pub domain: Option<String>,
    pub hostname: Option<String>,
    pub mtu: u32,
    /// The server identifier (option 54).
    pub server: Ipv4Addr,
}

pub fn parse_mac(mac: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = mac.split(':');
    for byte in &mut out {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// A request's essentials.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    pub kind: u8,
    pub xid: [u8; 4],
    pub flags: [u8; 2],
    pub chaddr: [u8; 6],
    pub ciaddr: Ipv4Addr,
    pub requested: Option<Ipv4Addr>,
}

pub fn parse_request(packet: &[u8]) -> Option<Request> {
    if packet.len() < 240 || packet[0] != 1 || packet[1] != 1 || packet[2] != 6 || packet[236..240] != MAGIC {
        return None;
    }
    let mut kind = None;
    let mut requested = None;
    let mut i = 240;
    while i < packet.len() {
        let code = packet[i];
        if code == 255 {
            break;
        }
        if code == 0 {
            i += 1;
            continue;
        }
        let len = *packet.get(i + 1)? as usize;
        let value = packet.get(i + 2..i + 2 + len)?;
        match code {
            53 if len == 1 => kind = Some(value[0]),
            50 if len == 4 => requested = Some(Ipv4Addr::new(value[0], value[1], value[2], value[3])),
            _ => {}
        }
        i += 2 + len;
    }
    Some(Request {
        kind: kind?,
        xid: packet[4..8].try_into().ok()?,
        flags: packet[10..12].try_into().ok()?,
        chaddr: packet[28..34].try_into().ok()?,
        ciaddr: Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]),
        requested,
    })
}

fn prefix_mask(prefix: u8) -> Ipv4Addr {
    Ipv4Addr::from(if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix.min(32)))
    })
}

fn option(out: &mut Vec<u8>, code: u8, value: &[u8]) {
    for chunk in value.chunks(255) {
        out.push(code);
        out.push(chunk.len() as u8);
        out.extend_from_slice(chunk);
    }
}

/// The reply to `req`, if it gets one.
pub fn reply(lease: &Lease, req: &Request) -> Option<Vec<u8>> {
    if req.chaddr != lease.mac {
        return None;
    }
    let kind = match req.kind {
        DISCOVER => OFFER,
        REQUEST => {
            let wanted = req.requested.unwrap_or(req.ciaddr);
            if wanted == lease.address { ACK } else { NAK }
        }
        _ => return None,
    };
    let mut out = vec![0u8; 240];
    out[0] = 2;
    out[1] = 1;
    out[2] = 6;
    out[4..8].copy_from_slice(&req.xid);
    out[10..12].copy_from_slice(&req.flags);
    if kind != NAK {
        out[16..20].copy_from_slice(&lease.address.octets());
    }
    out[28..34].copy_from_slice(&lease.mac);
    out[236..240].copy_from_slice(&MAGIC);
    option(&mut out, 53, &[kind]);
    option(&mut out, 54, &lease.server.octets());
    if kind != NAK {
        option(&mut out, 51, &INFINITE.to_be_bytes());
        option(&mut out, 1, &prefix_mask(lease.prefix).octets());
        if let Some(router) = lease.router {
            option(&mut out, 3, &router.octets());
        }
        if !lease.dns.is_empty() {
            option(
                &mut out,
                6,
                &lease.dns.iter().flat_map(|d| d.octets()).collect::<Vec<_>>(),
            );
        }
        if let Some(domain) = &lease.domain {
            option(&mut out, 15, domain.as_bytes());
        }
        if let Some(hostname) = &lease.hostname {
            option(&mut out, 12, hostname.as_bytes());
        }
        option(&mut out, 26, &(lease.mtu.min(u16::MAX as u32) as u16).to_be_bytes());
        if !lease.routes.is_empty() {
            // RFC 3442: with option 121 the client ignores option 3, so the default route goes in too.
            let mut value = Vec::new();
            let mut push = |dst: Ipv4Addr, prefix: u8, gw: Ipv4Addr| {
                value.push(prefix);
                value.extend_from_slice(&dst.octets()[..usize::from(prefix.div_ceil(8))]);
                value.extend_from_slice(&gw.octets());
            };
            for (dst, prefix, gw) in &lease.routes {
                push(*dst, *prefix, *gw);
            }
            if let Some(router) = lease.router {
                push(Ipv4Addr::UNSPECIFIED, 0, router);
            }
            option(&mut out, 121, &value);
        }
    }
    out.push(255);
    // Some clients want at least a BOOTP-sized packet.
    if out.len() < 300 {
        out.resize(300, 0);
    }
    Some(out)
}

/// Serves `lease` on `interface` (in the current network namespace) forever.
pub fn serve(interface: &str, lease: &Lease) -> Result<(), VmError> {
    let socket =
        UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 67)).map_err(VmError::io("binding DHCP port 67"))?;
    socket.set_broadcast(true).map_err(VmError::io("SO_BROADCAST"))?;
    let name = interface.as_bytes();
    // SAFETY: the fd is a valid socket and the pointer/length describe `name`.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_BINDTODEVICE,
            name.as_ptr().cast(),
            name.len() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(VmError::io(format!("binding DHCP to {interface}"))(
            std::io::Error::last_os_error(),
        ));
    }
    let mut buf = [0u8; 1500];
    loop {
        let (n, _) = match socket.recv_from(&mut buf) {
            Ok(got) => got,
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(VmError::io("receiving DHCP")(err)),
        };
        let Some(req) = parse_request(&buf[..n]) else { continue };
        let Some(answer) = reply(lease, &req) else { continue };
        if let Err(err) = socket.send_to(&answer, SocketAddrV4::new(Ipv4Addr::BROADCAST, 68)) {
            tracing::warn!(error = %err, "sending DHCP reply");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease() -> Lease {
        Lease {
            mac: parse_mac("52:54:00:aa:bb:cc").unwrap(),
            address: "10.88.0.5".parse().unwrap(),
            prefix: 16,
            router: Some("10.88.0.1".parse().unwrap()),
            routes: vec![("10.96.0.0".parse().unwrap(), 12, "10.88.0.1".parse().unwrap())],
            dns: vec!["10.96.0.10".parse().unwrap()],
            domain: Some("cluster.local".into()),
            hostname: Some("vm".into()),
            mtu: 1450,
            server: "10.88.0.1".parse().unwrap(),
        }
    }

    fn request(kind: u8, mac: [u8; 6], requested: Option<Ipv4Addr>) -> Vec<u8> {
        let mut p = vec![0u8; 240];
        p[0] = 1;
        p[1] = 1;
        p[2] = 6;
        p[4..8].copy_from_slice(&[1, 2, 3, 4]);
        p[28..34].copy_from_slice(&mac);
        p[236..240].copy_from_slice(&MAGIC);
        p.extend_from_slice(&[53, 1, kind]);
        if let Some(ip) = requested {
            p.extend_from_slice(&[50, 4]);
            p.extend_from_slice(&ip.octets());
        }
        p.push(255);
        p
    }

    fn options(packet: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        let mut i = 240;
        while packet[i] != 255 {
            let len = packet[i + 1] as usize;
            out.push((packet[i], packet[i + 2..i + 2 + len].to_vec()));
            i += 2 + len;
        }
        out
    }

    #[test]
    fn offers_and_acks_the_one_lease() {
        let lease = lease();
        let req = parse_request(&request(DISCOVER, lease.mac, None)).unwrap();
        let offer = reply(&lease, &req).unwrap();
        assert_eq!(offer[0], 2);
        assert_eq!(&offer[4..8], &[1, 2, 3, 4]);
        assert_eq!(&offer[16..20], &[10, 88, 0, 5]);
        let opts = options(&offer);
        assert!(opts.contains(&(53, vec![OFFER])));
        assert!(opts.contains(&(1, vec![255, 255, 0, 0])));
        assert!(opts.contains(&(3, vec![10, 88, 0, 1])));
        assert!(opts.contains(&(26, 1450u16.to_be_bytes().to_vec())));
        assert!(opts.contains(&(121, vec![12, 10, 96, 10, 88, 0, 1, 0, 10, 88, 0, 1])));
        let req = parse_request(&request(REQUEST, lease.mac, Some(lease.address))).unwrap();
        assert!(options(&reply(&lease, &req).unwrap()).contains(&(53, vec![ACK])));
        let req = parse_request(&request(REQUEST, lease.mac, Some("10.0.0.9".parse().unwrap()))).unwrap();
        assert!(options(&reply(&lease, &req).unwrap()).contains(&(53, vec![NAK])));
    }

    #[test]
    fn ignores_other_clients_and_garbage() {
        let lease = lease();
        let req = parse_request(&request(DISCOVER, [2, 0, 0, 0, 0, 1], None)).unwrap();
        assert_eq!(reply(&lease, &req), None);
        assert_eq!(parse_request(&[1, 2, 3]), None);
        assert_eq!(prefix_mask(24), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(prefix_mask(0), Ipv4Addr::UNSPECIFIED);
    }
}
