//! Address allocation: one claim file per address under `state_dir/ipam/<addr>` holding
//! the sandbox id. The search for a free address starts after the last one handed out
//! (the `.last-v4` / `.last-v6` hints), so a released address is not reused at once.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use ipnet::{Ipv4Net, Ipv6Net};

use super::store::{ClaimDir, Locked};
use super::{NetError, Result};

#[derive(Debug)]
pub(super) struct Ipam {
    dir: ClaimDir,
}

/// The assignable range of a subnet as integers: after the gateway (network + 1), up
/// to the last address (exclusive of the IPv4 broadcast).
struct Range {
    first: u128,
    last: u128,
    v6: bool,
}

impl Range {
    fn v4(net: Ipv4Net) -> Range {
        Range {
            first: u128::from(u32::from(net.network())) + 2,
            last: u128::from(u32::from(net.broadcast())) - 1,
            v6: false,
        }
    }

    fn v6(net: Ipv6Net) -> Range {
        Range {
            first: u128::from(net.network()) + 2,
            last: u128::from(net.broadcast()),
            v6: true,
        }
    }

    fn addr(&self, n: u128) -> IpAddr {
        if self.v6 {
            IpAddr::V6(Ipv6Addr::from(n))
        } else {
            // In range by construction: first..=last come from a u32.
            IpAddr::V4(Ipv4Addr::from(n as u32))
        }
    }

    fn number(&self, ip: IpAddr) -> u128 {
        match ip {
            IpAddr::V4(a) => u128::from(u32::from(a)),
            IpAddr::V6(a) => u128::from(a),
        }
    }

    fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv6() == self.v6 && (self.first..=self.last).contains(&self.number(ip))
    }

    fn key(&self) -> &'static str {
        if self.v6 { "last-v6" } else { "last-v4" }
    }
}

impl Ipam {
    pub(super) fn new(path: PathBuf) -> Ipam {
        Ipam {
            dir: ClaimDir::new(path),
        }
    }

    /// The sandbox's IPv4 address (and IPv6 when a subnet is given): the ones it already
    /// holds, else fresh ones.
    pub(super) fn allocate(
        &self,
        sandbox: &str,
        v4: Ipv4Net,
        v6: Option<Ipv6Net>,
    ) -> Result<(Ipv4Addr, Option<Ipv6Addr>)> {
        let dir = self.dir.lock()?;
        let claims = dir.claims()?;
        // The ranges bound the results: a u32 for IPv4.
        let ip4 = Ipv4Addr::from(allocate_in(&dir, &claims, sandbox, &Range::v4(v4))? as u32);
        let ip6 = match v6 {
            Some(net) => Some(Ipv6Addr::from(allocate_in(&dir, &claims, sandbox, &Range::v6(net))?)),
            None => None,
        };
        Ok((ip4, ip6))
    }

    /// Releases every address of the sandbox; returns how many it had.
    pub(super) fn release(&self, sandbox: &str) -> Result<usize> {
        self.dir.lock()?.release_owned(sandbox)
    }

    /// Every claimed address and its owner.
    #[cfg(test)]
    pub(super) fn claims(&self) -> Result<std::collections::HashMap<String, String>> {
        self.dir.lock()?.claims()
    }
}

fn allocate_in(
    dir: &Locked<'_>,
    claims: &std::collections::HashMap<String, String>,
    sandbox: &str,
    range: &Range,
) -> Result<u128> {
    let mut used = HashSet::new();
    for (name, owner) in claims {
        let Ok(ip) = name.parse::<IpAddr>() else {
            continue;
        };
        if !range.contains(ip) {
            continue;
        }
        if owner == sandbox {
            return Ok(range.number(ip));
        }
        used.insert(ip);
    }
    let size = range.last - range.first + 1;
    let start = dir
        .hint(range.key())
        .and_then(|h| h.parse::<IpAddr>().ok())
        .filter(|ip| range.contains(*ip))
        .map(|ip| range.number(ip))
        .map_or(
            range.first,
            |last| if last >= range.last { range.first } else { last + 1 },
        );
    // Every used address is skipped without a syscall, so at most used.len() + 1 steps
    // are taken before a free one, however large the range.
    let mut offset = start - range.first;
    for _ in 0..size.min(used.len() as u128 + 1 + 64) {
        let n = range.first + offset;
        let ip = range.addr(n);
        offset = (offset + 1) % size;
        if used.contains(&ip) {
            continue;
        }
        if dir.claim(&ip.to_string(), sandbox)? {
            dir.set_hint(range.key(), &ip.to_string())?;
            return Ok(n);
        }
    }
    Err(NetError::Exhausted(format!(
        "{}..{}",
        range.addr(range.first),
        range.addr(range.last)
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ipam() -> (Ipam, PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "netbridge-ipam-{}-{:?}",
            std::process::id(),
            std::time::SystemTime::now()
        ));
        (Ipam::new(dir.clone()), dir)
    }

    #[test]
    fn allocation_reuse_hint_and_exhaustion() {
        let (ipam, dir) = ipam();
        let net: Ipv4Net = "10.9.0.0/29".parse().unwrap();
        let v6: Ipv6Net = "fd09::/64".parse().unwrap();
        let (a, a6) = ipam.allocate("a", net, Some(v6)).unwrap();
        assert_eq!((a, a6), ("10.9.0.2".parse().unwrap(), Some("fd09::2".parse().unwrap())));
        assert_eq!(
            ipam.allocate("a", net, Some(v6)).unwrap().0,
            a,
            "owner's address reused"
        );
        assert_eq!(ipam.allocate("b", net, None).unwrap().0, Ipv4Addr::new(10, 9, 0, 3));
        assert_eq!(ipam.release("a").unwrap(), 2);
        // The hint keeps the released .2 from coming back at once.
        assert_eq!(ipam.allocate("c", net, None).unwrap().0, Ipv4Addr::new(10, 9, 0, 4));
        for id in ["d", "e", "f"] {
            ipam.allocate(id, net, None).unwrap();
        }
        // .2-.6 are usable in a /29; .2 wrapped around to "f".
        assert!(matches!(ipam.allocate("g", net, None), Err(NetError::Exhausted(_))));
        assert_eq!(ipam.claims().unwrap().len(), 5);
        // A claim emptied by a crash is reclaimed.
        std::fs::write(dir.join("10.9.0.5"), "").unwrap();
        assert_eq!(ipam.allocate("g", net, None).unwrap().0, Ipv4Addr::new(10, 9, 0, 5));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
