//! hostPort reservations: one claim file per mapping under
//! `state_dir/ports/<proto>-<port>-<host ip|any|any4|any6>` holding the sandbox id, so a
//! port already mapped by another sandbox is refused even after a restart.

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;

use super::store::ClaimDir;
use super::{NetError, Protocol, Result};

/// Which local addresses a hostPort listens on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum HostIp {
    /// Every local address of both families (an empty host IP).
    Any,
    AnyV4,
    AnyV6,
    Addr(IpAddr),
}

impl HostIp {
    pub(super) fn parse(s: &str) -> Option<HostIp> {
        match s.trim() {
            "" => Some(HostIp::Any),
            s => match s.parse::<IpAddr>().ok()? {
                IpAddr::V4(a) if a.is_unspecified() => Some(HostIp::AnyV4),
                IpAddr::V6(a) if a.is_unspecified() => Some(HostIp::AnyV6),
                ip => Some(HostIp::Addr(ip)),
            },
        }
    }

    pub(super) fn only_v6(self) -> bool {
        matches!(self, HostIp::AnyV6 | HostIp::Addr(IpAddr::V6(_)))
    }

    fn families(self) -> (bool, bool) {
        match self {
            HostIp::Any => (true, true),
            HostIp::AnyV4 => (true, false),
            HostIp::AnyV6 => (false, true),
            HostIp::Addr(ip) => (ip.is_ipv4(), ip.is_ipv6()),
        }
    }

    /// Whether both can match the same destination address.
    fn overlaps(self, other: HostIp) -> bool {
        let ((a4, a6), (b4, b6)) = (self.families(), other.families());
        if !(a4 && b4 || a6 && b6) {
            return false;
        }
        match (self, other) {
            (HostIp::Addr(a), HostIp::Addr(b)) => a == b,
            _ => true,
        }
    }

    fn token(self) -> String {
        match self {
            HostIp::Any => "any".into(),
            HostIp::AnyV4 => "any4".into(),
            HostIp::AnyV6 => "any6".into(),
            HostIp::Addr(ip) => ip.to_string(),
        }
    }

    fn from_token(s: &str) -> Option<HostIp> {
        match s {
            "any" => Some(HostIp::Any),
            "any4" => Some(HostIp::AnyV4),
            "any6" => Some(HostIp::AnyV6),
            s => s.parse().ok().map(HostIp::Addr),
        }
    }
}

impl fmt::Display for HostIp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostIp::Any => f.write_str("any address"),
            HostIp::AnyV4 => f.write_str("0.0.0.0"),
            HostIp::AnyV6 => f.write_str("[::]"),
            HostIp::Addr(IpAddr::V6(a)) => write!(f, "[{a}]"),
            HostIp::Addr(a) => write!(f, "{a}"),
        }
    }
}

/// A validated port mapping with a non-zero host port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct PortRequest {
    pub protocol: Protocol,
    pub host_port: u16,
    pub container_port: u16,
    pub host_ip: HostIp,
}

impl PortRequest {
    pub(super) fn clashes_with(&self, other: &PortRequest) -> bool {
        self.protocol == other.protocol && self.host_port == other.host_port && self.host_ip.overlaps(other.host_ip)
    }

    fn claim_name(&self) -> String {
        format!("{}-{}-{}", self.protocol.as_str(), self.host_port, self.host_ip.token())
    }

    fn from_claim_name(name: &str) -> Option<PortRequest> {
        let mut parts = name.splitn(3, '-');
        let protocol = match parts.next()? {
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            "sctp" => Protocol::Sctp,
            _ => return None,
        };
        let host_port = parts.next()?.parse().ok()?;
        let host_ip = HostIp::from_token(parts.next()?)?;
        Some(PortRequest {
            protocol,
            host_port,
            container_port: 0,
            host_ip,
        })
    }
}

impl fmt::Display for PortRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} port {} on {}",
            self.protocol.as_str(),
            self.host_port,
            self.host_ip
        )
    }
}

#[derive(Debug)]
pub(super) struct PortClaims {
    dir: ClaimDir,
}

impl PortClaims {
    pub(super) fn new(path: PathBuf) -> PortClaims {
        PortClaims {
            dir: ClaimDir::new(path),
        }
    }

    /// Reserves all the mappings for the sandbox, or none if one clashes with another
    /// sandbox's.
    pub(super) fn reserve(&self, sandbox: &str, requests: &[PortRequest]) -> Result<()> {
        if requests.is_empty() {
            return Ok(());
        }
        let dir = self.dir.lock()?;
        let claims = dir.claims()?;
        for req in requests {
            for (name, owner) in &claims {
                if owner == sandbox {
                    continue;
                }
                if let Some(held) = PortRequest::from_claim_name(name)
                    && held.clashes_with(req)
                {
                    return Err(NetError::Conflict(format!(
                        "host {req} is already mapped by sandbox {owner} ({held})"
                    )));
                }
            }
        }
        for req in requests {
            // An existing claim of the same name is this sandbox's own (checked above).
            dir.claim(&req.claim_name(), sandbox)?;
        }
        Ok(())
    }

    /// Whether the sandbox holds any reservation.
    pub(super) fn owned_by(&self, sandbox: &str) -> Result<bool> {
        Ok(self.dir.lock()?.claims()?.values().any(|o| o == sandbox))
    }

    /// Releases every reservation of the sandbox; returns how many it had.
    pub(super) fn release(&self, sandbox: &str) -> Result<usize> {
        self.dir.lock()?.release_owned(sandbox)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlaps() {
        let a = |s: &str| HostIp::parse(s).unwrap();
        assert!(a("").overlaps(a("10.0.0.1")));
        assert!(a("0.0.0.0").overlaps(a("10.0.0.1")));
        assert!(!a("0.0.0.0").overlaps(a("::1")));
        assert!(!a("10.0.0.1").overlaps(a("10.0.0.2")));
        assert!(a("::").overlaps(a("")));
        assert!(HostIp::parse("nope").is_none());
        let req = PortRequest {
            protocol: Protocol::Udp,
            host_port: 53,
            container_port: 5353,
            host_ip: a("fd00::1"),
        };
        let back = PortRequest::from_claim_name(&req.claim_name()).unwrap();
        assert!(back.clashes_with(&req));
    }
}
