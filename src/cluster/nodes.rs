//! `podvisor up --nodes N`: N-1 more nodes on this machine, each a
//! `podvisor join` process with its own CRI daemon (root, state, socket) and
//! its own built-in pod network (bridge, subnet, NAT table), joined to the
//! cluster through the kubeconfig `up` wrote. Each has a network namespace of
//! its own (see [`super::nodenet`]) holding its pod bridge, hostPorts, agent
//! listener and service proxy; its InternalIP is its end of the link to the
//! host, where the first node's route controller routes its pod subnet.
//!
//! A node process outlives a `kill -9` of `up`, as containers do; `up` adopts
//! it again at its next start. Stopping `up` stops them; `down` also has them
//! remove their pods.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;

use super::up::UpOptions;

pub struct LocalNodes {
    nodes: Vec<LocalNode>,
    options: UpOptions,
}

struct LocalNode {
    name: String,
    index: usize,
    dir: PathBuf,
    pid: i32,
    /// Our own child (reaped on stop); None for an adopted process.
    child: Option<std::process::Child>,
}

/// The name of the `index`-th extra node (2, 3, ...).
pub fn node_name(first: &str, index: usize) -> String {
    format!("{first}-{index}")
}

/// The network namespace and host link of the `index`-th extra node: a name
/// unique to this cluster's data directory, the `index-2`-th /30 of `cidr` (the first extra node has index 2).
pub fn node_network(
    data_dir: &Path,
    cidr: ipnet::Ipv4Net,
    index: usize,
) -> anyhow::Result<super::nodenet::NodeNetwork> {
    let start = u64::from(u32::from(cidr.network())) + 4 * (index as u64 - 2);
    anyhow::ensure!(
        start + 4 <= u64::from(u32::from(cidr.broadcast())) + 1,
        "--node-link-cidr {cidr} has no room for node {index}'s /30"
    );
    let hash = crate::sys::fnv1a(data_dir.as_os_str().as_encoded_bytes());
    let link = ipnet::Ipv4Net::new(std::net::Ipv4Addr::from(start as u32), 30)?;
    super::nodenet::NodeNetwork::new(&format!("podvisor-{:08x}-n{index}", hash as u32), link)
}

/// The network section of the `index`-th extra node: the next blocks after the
/// base subnet, a bridge and NAT table of its own.
pub fn network_for(
    base: &crate::config::BuiltinNetworkConfig,
    index: usize,
) -> anyhow::Result<(String, String, String)> {
    let net: ipnet::Ipv4Net = base.subnet.parse().context("network.builtin.subnet")?;
    let block = 1u64 << (32 - u32::from(net.prefix_len()));
    let start = u64::from(u32::from(net.network())) + block * (index as u64 - 1);
    anyhow::ensure!(
        start + block <= 1 << 32,
        "no room for node {index}'s subnet after {}",
        base.subnet
    );
    let subnet = ipnet::Ipv4Net::new(std::net::Ipv4Addr::from(start as u32), net.prefix_len())?;
    let suffix = format!("n{index}");
    let keep = 15usize.saturating_sub(suffix.len()).min(base.bridge.len());
    let bridge = format!("{}{suffix}", &base.bridge[..keep]);
    let nat = format!("{}_{suffix}", base.nat_name);
    Ok((bridge, subnet.to_string(), nat))
}

/// The daemon config of node `index` (1 is `up`'s own): the base file's text
/// with its own network (extra nodes) and the others' pod subnets, reached
/// without masquerading.
fn node_config(options: &UpOptions, index: usize) -> anyhow::Result<String> {
    let path = &options.daemon.config_path;
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !options.daemon.config_explicit => String::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let config = crate::config::Config::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let mut table: toml::Table = text.parse().with_context(|| format!("parsing {}", path.display()))?;
    let mut subnets = vec![config.network.builtin.subnet.clone()];
    for other in 2..=options.nodes {
        subnets.push(network_for(&config.network.builtin, other)?.1);
    }
    let own = subnets.remove(index - 1);
    let network = table
        .entry("network")
        .or_insert_with(|| toml::Value::Table(Default::default()))
        .as_table_mut()
        .context("[network] is not a table")?;
    let builtin = network
        .entry("builtin")
        .or_insert_with(|| toml::Value::Table(Default::default()))
        .as_table_mut()
        .context("[network.builtin] is not a table")?;
    builtin.insert("cluster_subnets".into(), subnets.into());
    if index > 1 {
        let (bridge, _, nat) = network_for(&config.network.builtin, index)?;
        builtin.insert("bridge".into(), bridge.into());
        builtin.insert("subnet".into(), own.into());
        builtin.insert("nat_name".into(), nat.into());
        builtin.remove("subnet_v6");
    }
    Ok(toml::to_string(&table)?)
}

/// `up --nodes`: the first node's daemon config (the base file and the other
/// nodes' pod subnets), written to the data directory; returns its path.
pub fn write_first_node_config(options: &UpOptions) -> anyhow::Result<PathBuf> {
    let text = node_config(options, 1)?;
    let path = options.data_dir.join("node-config.toml");
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

fn sibling(path: &Path, name: &str) -> PathBuf {
    let mut text = path.as_os_str().to_owned();
    text.push(format!("-{name}"));
    PathBuf::from(text)
}

/// Starts the `index`-th node's `podvisor join` process.
fn spawn_node(options: &UpOptions, index: usize, name: String, dir: PathBuf) -> anyhow::Result<LocalNode> {
    let exe = std::env::current_exe()?;
    let config = dir.join("config.toml");
    std::fs::write(&config, node_config(options, index)?)?;
    let network = node_network(&options.data_dir, options.node_link_cidr, index)?;
    // What cleanup needs when the node process is gone.
    std::fs::write(
        dir.join("network"),
        format!(
            "netns {}\nhost_link {}\ntable {}\n",
            network.netns,
            network.host_link(),
            network.table()
        ),
    )?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("node.log"))?;
    let mut command = std::process::Command::new(&exe);
    command
        .arg("join")
        .arg("--kubeconfig")
        .arg(&options.kubeconfig)
        .args(["--node-name", &name])
        .arg("--data-dir")
        .arg(&dir)
        .arg("--listen")
        .arg(format!("unix://{}", dir.join("cri.sock").display()))
        .arg("--root")
        .arg(sibling(&options.daemon.root, &name))
        .arg("--state")
        .arg(sibling(&options.daemon.state, &name))
        .arg("--config")
        .arg(&config)
        .arg("--pod-log-dir")
        .arg(&options.pod_log_dir)
        .arg("--node-lease-duration-seconds")
        .arg(options.node_lease_duration.as_secs().to_string())
        .args(
            options
                .cluster_dns
                .iter()
                .flat_map(|ip| ["--cluster-dns".to_string(), ip.clone()]),
        )
        .args(["--netns", &network.netns])
        .arg("--netns-link")
        .arg(network.link.to_string())
        .arg("--container-log-max-size")
        .arg(options.log_rotation.max_size.to_string())
        .arg("--container-log-max-files")
        .arg(options.log_rotation.max_files.to_string())
        .arg("--container-log-monitor-interval")
        .arg(format!("{}ms", options.log_rotation.interval.as_millis()))
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: setsid is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            command.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
    }
    let child = command.spawn().with_context(|| format!("starting node {name}"))?;
    tracing::info!(node = %name, pid = child.id(), "started a node process");
    Ok(LocalNode {
        name,
        index,
        dir,
        pid: child.id() as i32,
        child: Some(child),
    })
}

impl LocalNode {
    fn alive(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => Path::new(&format!("/proc/{}", self.pid)).exists(),
        }
    }
}

impl LocalNodes {
    /// Starts (or adopts) nodes 2..=N.
    pub fn start(options: &UpOptions) -> anyhow::Result<LocalNodes> {
        let mut nodes = Vec::new();
        for index in 2..=options.nodes {
            let name = node_name(&options.node_name, index);
            let dir = options.data_dir.join("nodes").join(&name);
            crate::sys::fs::ensure_dir(&dir, 0o700)?;
            if let Some(pid) = super::up::running_pid(&dir) {
                tracing::info!(node = %name, pid, "adopting a running node process");
                nodes.push(LocalNode {
                    name,
                    index,
                    dir,
                    pid,
                    child: None,
                });
                continue;
            }
            nodes.push(spawn_node(options, index, name, dir)?);
        }
        Ok(LocalNodes {
            nodes,
            options: options.clone(),
        })
    }

    /// Stops every node process; with `remove_pods` they remove their pods (and
    /// their networks) first. A node whose process died (killed in a failover
    /// demo) is started once more for that.
    pub async fn stop(mut self, remove_pods: bool) {
        if remove_pods {
            for node in &mut self.nodes {
                if node.alive() {
                    continue;
                }
                let ready = node.dir.join(super::up::READY_FILE);
                let _ = std::fs::remove_file(&ready);
                match spawn_node(&self.options, node.index, node.name.clone(), node.dir.clone()) {
                    Ok(started) => *node = started,
                    Err(e) => {
                        tracing::warn!(node = %node.name, error = %e, "restarting a dead node to remove its pods");
                        continue;
                    }
                }
                let deadline = Instant::now() + Duration::from_secs(60);
                while !ready.exists() && node.alive() && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        for node in &self.nodes {
            if remove_pods {
                let _ = std::fs::write(node.dir.join(super::up::DOWN_FILE), b"");
            }
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(node.pid), nix::sys::signal::Signal::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        for mut node in self.nodes {
            loop {
                if !node.alive() {
                    break;
                }
                if Instant::now() > deadline {
                    tracing::warn!(node = %node.name, pid = node.pid, "node process did not stop in 120 s");
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_nodes_take_the_next_links() {
        let cidr = "10.87.0.0/29".parse().unwrap();
        let second = node_network(Path::new("/a"), cidr, 2).unwrap();
        let third = node_network(Path::new("/a"), cidr, 3).unwrap();
        assert_eq!(
            (second.link.to_string(), third.link.to_string()),
            ("10.87.0.0/30".into(), "10.87.0.4/30".into())
        );
        assert_ne!(second.netns, third.netns);
        assert_ne!(second.netns, node_network(Path::new("/b"), cidr, 2).unwrap().netns);
        assert!(node_network(Path::new("/a"), cidr, 4).is_err());
    }

    #[test]
    fn extra_nodes_take_the_next_subnets() {
        let base = crate::config::BuiltinNetworkConfig::default();
        assert_eq!(
            network_for(&base, 2).unwrap(),
            ("podvisor0n2".into(), "10.89.0.0/16".into(), "podvisor_n2".into())
        );
        assert_eq!(network_for(&base, 3).unwrap().1, "10.90.0.0/16");
        let long = crate::config::BuiltinNetworkConfig {
            bridge: "abcdefghijklmno".into(),
            subnet: "10.1.2.0/24".into(),
            ..Default::default()
        };
        assert_eq!(
            network_for(&long, 2).unwrap(),
            ("abcdefghijklmn2".into(), "10.1.3.0/24".into(), "podvisor_n2".into())
        );
        let full = crate::config::BuiltinNetworkConfig {
            subnet: "255.255.255.0/24".into(),
            ..Default::default()
        };
        assert!(network_for(&full, 2).is_err());
    }
}
