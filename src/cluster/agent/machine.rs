//! Facts about this machine for the Node object: CPUs, memory, disk, address,
//! OS and kernel.

use std::net::{Ipv4Addr, UdpSocket};
use std::path::Path;

/// CPUs this process may use (affinity and cgroup quota included).
pub fn cpus() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// `MemTotal` from /proc/meminfo, in bytes.
pub fn memory_bytes() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let kib = text
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0);
    let limit = cgroup_memory_limit().unwrap_or(u64::MAX);
    (kib * 1024).min(limit)
}

/// The memory limit of this process's cgroup (v2), when it has one.
fn cgroup_memory_limit() -> Option<u64> {
    let membership = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let relative = membership.lines().find_map(|l| l.strip_prefix("0::"))?;
    let path = Path::new("/sys/fs/cgroup").join(relative.trim_start_matches('/'));
    std::fs::read_to_string(path.join("memory.max"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The size of the filesystem holding `path`, in bytes.
pub fn filesystem_bytes(path: &Path) -> u64 {
    let mut probe = path.to_path_buf();
    while !probe.exists() {
        if !probe.pop() {
            return 0;
        }
    }
    nix::sys::statvfs::statvfs(&probe)
        .map(|s| s.blocks() * s.fragment_size())
        .unwrap_or(0)
}

/// The source address of the default route (no packet is sent), else loopback;
/// in the node's network namespace when it has one.
pub fn primary_ipv4() -> Ipv4Addr {
    let probe = || -> std::io::Result<Ipv4Addr> {
        let socket = UdpSocket::bind("0.0.0.0:0")?;
        socket.connect("8.8.8.8:53")?;
        match socket.local_addr()?.ip() {
            std::net::IpAddr::V4(ip) => Ok(ip),
            std::net::IpAddr::V6(_) => Err(std::io::ErrorKind::Unsupported.into()),
        }
    };
    crate::sys::netns::run_in_node(probe).unwrap_or(Ipv4Addr::LOCALHOST)
}

pub fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default()
}

/// `PRETTY_NAME` from /etc/os-release.
pub fn os_image() -> String {
    let text = std::fs::read_to_string("/etc/os-release")
        .or_else(|_| std::fs::read_to_string("/usr/lib/os-release"))
        .unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim_matches('"').to_string())
        .unwrap_or_else(|| "Linux".into())
}

pub fn kernel_version() -> String {
    read_trimmed("/proc/sys/kernel/osrelease")
}

pub fn machine_id() -> String {
    read_trimmed("/etc/machine-id")
}

pub fn boot_id() -> String {
    read_trimmed("/proc/sys/kernel/random/boot_id")
}

pub fn system_uuid() -> String {
    read_trimmed("/sys/class/dmi/id/product_uuid")
}

/// The Go-style architecture name Kubernetes uses.
pub fn architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "powerpc64" => "ppc64le",
        "s390x" => "s390x",
        "riscv64" => "riscv64",
        other => other,
    }
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Nameservers, search domains and options of a resolv.conf.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ResolvConf {
    pub servers: Vec<String>,
    pub searches: Vec<String>,
    pub options: Vec<String>,
}

impl ResolvConf {
    pub fn parse(text: &str) -> ResolvConf {
        let mut conf = ResolvConf::default();
        for line in text.lines() {
            let mut words = line.split_whitespace();
            match words.next() {
                Some("nameserver") => conf.servers.extend(words.next().map(str::to_string)),
                Some("search") | Some("domain") => conf.searches = words.map(str::to_string).collect(),
                Some("options") => conf.options.extend(words.map(str::to_string)),
                _ => {}
            }
        }
        conf
    }

    /// The host's resolv.conf; a local stub resolver (127.0.0.53) is unreachable
    /// from a pod, so systemd-resolved's upstream list is used instead.
    pub fn host() -> ResolvConf {
        let read = |path: &str| std::fs::read_to_string(path).ok().map(|t| ResolvConf::parse(&t));
        let conf = read("/etc/resolv.conf").unwrap_or_default();
        let loopback_only = !conf.servers.is_empty()
            && conf
                .servers
                .iter()
                .all(|s| s.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback()));
        if loopback_only && let Some(upstream) = read("/run/systemd/resolve/resolv.conf") {
            return ResolvConf {
                searches: conf.searches,
                ..upstream
            };
        }
        conf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf() {
        let conf = ResolvConf::parse("# c\nnameserver 1.1.1.1\nnameserver 8.8.8.8\nsearch a.b c\noptions ndots:2\n");
        assert_eq!(conf.servers, ["1.1.1.1", "8.8.8.8"]);
        assert_eq!(conf.searches, ["a.b", "c"]);
        assert_eq!(conf.options, ["ndots:2"]);
    }

    #[test]
    fn machine_facts() {
        assert!(cpus() >= 1);
        assert!(memory_bytes() > 0);
        assert!(filesystem_bytes(Path::new("/nonexistent/dir")) > 0);
    }
}
