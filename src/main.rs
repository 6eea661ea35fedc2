use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

use podvisor::config::DEFAULT_CONFIG_PATH;
use podvisor::daemon::{self, DEFAULT_ENDPOINT, DEFAULT_ROOT, DEFAULT_STATE, DaemonOptions};
use podvisor::logging::{self, LogFormat};

/// podvisor: one CRI runtime for pods as Linux containers or as VMs.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "PODVISOR_LOG_FORMAT")]
    log_format: LogFormat,
    /// Log level (overridden by RUST_LOG).
    #[arg(long, global = true, default_value = "info", env = "PODVISOR_LOG_LEVEL")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once at start
enum Command {
    /// Serve the CRI (RuntimeService and ImageService) on a unix socket.
    Daemon {
        /// Socket to listen on.
        #[arg(long, default_value = DEFAULT_ENDPOINT, env = "PODVISOR_LISTEN")]
        listen: String,
        /// Directory for durable state (images, records).
        #[arg(long, default_value = DEFAULT_ROOT)]
        root: PathBuf,
        /// Directory for runtime state that does not survive a reboot.
        #[arg(long, default_value = DEFAULT_STATE)]
        state: PathBuf,
        /// Config file (TOML); the daemon runs without one.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Pull an image through the daemon, with progress.
    Pull {
        /// Image reference, e.g. busybox or registry.k8s.io/pause:3.10.
        image: String,
        /// Registry credentials as USER:PASSWORD.
        #[arg(long)]
        creds: Option<String>,
        #[arg(long, default_value = DEFAULT_ENDPOINT, env = "PODVISOR_ENDPOINT")]
        endpoint: String,
    },
    /// Start a one-node mini-cluster (API server, scheduler, controllers, node
    /// agent and, unless --runtime-endpoint is given, the CRI daemon) and write
    /// a kubeconfig for kubectl.
    Up {
        /// Cluster state: the object store, certificates, token and log.
        #[arg(long, default_value = podvisor::cluster::up::DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
        /// Where to write the kubeconfig [default: ~/.kube/podvisor.yaml].
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
        /// The API server's address.
        #[arg(long, default_value = podvisor::cluster::up::DEFAULT_API_ADDRESS)]
        api_address: std::net::SocketAddr,
        /// Use this CRI runtime (e.g. unix:///run/containerd/containerd.sock)
        /// instead of starting podvisor's own daemon.
        #[arg(long)]
        runtime_endpoint: Option<String>,
        /// The node's name [default: the host name].
        #[arg(long)]
        node_name: Option<String>,
        /// Port of the node agent's HTTPS API on 127.0.0.1 (logs, exec, attach, port-forward) [default: 10250,
        /// or a free port when that is taken].
        #[arg(long)]
        kubelet_port: Option<u16>,
        /// Where the node agent writes container logs.
        #[arg(long, default_value = podvisor::cluster::agent::DEFAULT_POD_LOG_DIR)]
        pod_log_dir: PathBuf,
        /// Rotate a running container's log once it is larger than this (e.g. 10Mi, 512Ki, bytes).
        #[arg(long, default_value = "10Mi", value_parser = podvisor::cluster::agent::logrotate::parse_size)]
        container_log_max_size: u64,
        /// Log files kept per container, the current one included (at least 2).
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(2..))]
        container_log_max_files: u64,
        /// How often container log sizes are checked.
        #[arg(long, default_value = "10s", value_parser = podvisor::cluster::up::parse_duration)]
        container_log_monitor_interval: std::time::Duration,
        /// Run only the API server, scheduler and controllers (no CRI daemon,
        /// no node agent here).
        #[arg(long)]
        control_plane_only: bool,
        /// Socket for the in-process CRI daemon.
        #[arg(long, default_value = DEFAULT_ENDPOINT)]
        listen: String,
        #[arg(long, default_value = DEFAULT_ROOT)]
        root: PathBuf,
        #[arg(long, default_value = DEFAULT_STATE)]
        state: PathBuf,
        /// Config file of the in-process CRI daemon.
        #[arg(long)]
        config: Option<PathBuf>,
        /// How the scheduler ranks nodes: spread pods over nodes (least
        /// requested) or fill one node first (binpack, most requested).
        #[arg(long, value_enum, default_value_t = podvisor::cluster::scheduler::Strategy::Spread)]
        scheduler_strategy: podvisor::cluster::scheduler::Strategy,
        /// A node whose lease goes unrenewed this long becomes unreachable (e.g. 40s, 500ms, 2m).
        #[arg(long, default_value = "40s", value_parser = podvisor::cluster::up::parse_duration)]
        node_monitor_grace_period: std::time::Duration,
        /// Pods on a not-ready or unreachable node are deleted this long after it became so, unless they
        /// tolerate its taint for another time (kube's default is 300s; short here for demos).
        #[arg(long, default_value = "20s", value_parser = podvisor::cluster::up::parse_duration)]
        pod_eviction_timeout: std::time::Duration,
        /// The node Lease's duration in seconds; the agent renews it every quarter of that.
        #[arg(long, default_value_t = 40, value_parser = clap::value_parser!(u64).range(1..))]
        node_lease_duration_seconds: u64,
        /// Services' ClusterIPs come from this range (its first address is the `kubernetes` Service's).
        #[arg(long, default_value = podvisor::cluster::apiserver::DEFAULT_SERVICE_CIDR)]
        service_cidr: ipnet::Ipv4Net,
        /// Nodes on this machine, this one included; the others are `podvisor join` processes with their own
        /// CRI daemon and pod network (see README).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=16))]
        nodes: u64,
        /// Keep the cluster's objects in etcd (etcd://HOST:PORT[,HOST:PORT...], every member of an etcd cluster)
        /// instead of the embedded store under --data-dir.
        #[arg(long, value_parser = store_url)]
        store: Option<String>,
        /// Key prefix of this cluster's objects in etcd.
        #[arg(long, default_value = podvisor::cluster::store::etcd_store::DEFAULT_PREFIX, requires = "store")]
        store_prefix: String,
        /// With --nodes: each extra node's network namespace is linked to the host by a /30 from this range
        /// (its address there is the node's InternalIP).
        #[arg(long, default_value = podvisor::cluster::up::DEFAULT_NODE_LINK_CIDR)]
        node_link_cidr: ipnet::Ipv4Net,
        /// Stay in the foreground instead of returning once the cluster is up.
        #[arg(long)]
        foreground: bool,
    },
    /// Join a cluster as one more node: a CRI daemon (unless --runtime-endpoint) and a node agent, in the
    /// foreground, reaching the API server named in the cluster's kubeconfig.
    Join {
        /// The cluster's kubeconfig (server, CA and token), as `podvisor up` wrote it.
        #[arg(long, required_unless_present = "server", conflicts_with = "server")]
        kubeconfig: Option<PathBuf>,
        /// The API server's URL, e.g. https://10.0.0.5:6443 (with --token and --ca-cert-hash, as printed by `up`).
        #[arg(long, requires_all = ["token", "ca_cert_hash"])]
        server: Option<String>,
        /// The cluster's token.
        #[arg(long)]
        token: Option<String>,
        /// `sha256:<hex>` of the cluster CA certificate; the CA fetched from the server must match it.
        #[arg(long)]
        ca_cert_hash: Option<String>,
        /// The node's name [default: the host name].
        #[arg(long)]
        node_name: Option<String>,
        /// The node's state: agent volumes, its API certificate, pid and ready files.
        #[arg(long, default_value = "/var/lib/podvisor/node")]
        data_dir: PathBuf,
        /// Port of the node agent's HTTPS API, on every address [default: 10250, or a free port when taken].
        #[arg(long)]
        kubelet_port: Option<u16>,
        #[arg(long, default_value = podvisor::cluster::agent::DEFAULT_POD_LOG_DIR)]
        pod_log_dir: PathBuf,
        #[arg(long, default_value = "10Mi", value_parser = podvisor::cluster::agent::logrotate::parse_size)]
        container_log_max_size: u64,
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(2..))]
        container_log_max_files: u64,
        #[arg(long, default_value = "10s", value_parser = podvisor::cluster::up::parse_duration)]
        container_log_monitor_interval: std::time::Duration,
        /// The node Lease's duration in seconds; the agent renews it every quarter of that.
        #[arg(long, default_value_t = 40, value_parser = clap::value_parser!(u64).range(1..))]
        node_lease_duration_seconds: u64,
        /// The cluster DNS address for pods [default: the `kube-dns` Service's].
        #[arg(long)]
        cluster_dns: Option<std::net::Ipv4Addr>,
        /// Leave Services to the proxy already serving this machine's network (another node here).
        #[arg(long)]
        no_service_proxy: bool,
        /// Give the node a network namespace of its own (under /run/netns), linked to the host by
        /// --netns-link; `up --nodes` does this for its extra nodes.
        #[arg(long, requires = "netns_link")]
        netns: Option<String>,
        /// The /30 between the host (first address) and the node's namespace (second: the node's address).
        #[arg(long, requires = "netns")]
        netns_link: Option<ipnet::Ipv4Net>,
        /// Use this CRI runtime instead of starting podvisor's own daemon.
        #[arg(long)]
        runtime_endpoint: Option<String>,
        #[arg(long, default_value = DEFAULT_ENDPOINT)]
        listen: String,
        #[arg(long, default_value = DEFAULT_ROOT)]
        root: PathBuf,
        #[arg(long, default_value = DEFAULT_STATE)]
        state: PathBuf,
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Stop the cluster `up` started and remove the pods it ran (objects stay).
    Down {
        #[arg(long, default_value = podvisor::cluster::up::DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
        /// Seconds to wait for the pods to stop.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
    /// Internal: the per-container monitor the daemon starts.
    #[command(hide = true)]
    Monitor { bundle: PathBuf },
    /// Internal: runs a process inside a running container.
    #[command(hide = true)]
    ExecHelper { config: PathBuf },
    /// Internal: the init of a pod-wide PID namespace.
    #[command(hide = true)]
    PodInit,
    /// Internal: a VM's console relay and DHCP server.
    #[command(hide = true)]
    VmHelper { config: PathBuf },
    /// Internal: makes a pod's user namespace and the namespaces it owns.
    #[command(hide = true)]
    UsernsHolder { kinds: String },
    /// List the images the daemon stores.
    Images {
        /// Only print image ids.
        #[arg(short, long)]
        quiet: bool,
        #[arg(long, default_value = DEFAULT_ENDPOINT, env = "PODVISOR_ENDPOINT")]
        endpoint: String,
    },
}

fn main() -> std::process::ExitCode {
    // The helpers run single-threaded and never start an async runtime. The
    // monitor lives as long as its container: it skips the argument parser, whose
    // code would otherwise stay resident in every monitor.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.len() == 3 && args[1] == "monitor" {
        podvisor::backend::linux::monitor::run(std::path::Path::new(&args[2]))
    }
    if args.len() == 3 && args[1] == "vm-helper" {
        podvisor::backend::vm::helper::main(std::path::Path::new(&args[2]))
    }
    if args.len() == 2 && args[1] == "pod-init" {
        podvisor::backend::linux::sandbox::pod_init_main()
    }
    let cli = Cli::parse();
    match &cli.command {
        Command::Up { foreground: false, .. } => return exit_with(up_detached(&cli, &args)),
        Command::Down { data_dir, timeout } => {
            return exit_with(podvisor::cluster::up::down(
                data_dir,
                std::time::Duration::from_secs(*timeout),
            ));
        }
        Command::Monitor { bundle } => podvisor::backend::linux::monitor::run(bundle),
        Command::ExecHelper { config } => podvisor::backend::linux::exec::run(config),
        Command::PodInit => podvisor::backend::linux::sandbox::pod_init_main(),
        Command::VmHelper { config } => podvisor::backend::vm::helper::main(config),
        Command::UsernsHolder { kinds } => podvisor::backend::linux::sandbox::userns_holder_main(kinds),
        _ => {}
    }
    exit_with(run(cli))
}

fn exit_with(result: anyhow::Result<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn store_url(url: &str) -> Result<String, String> {
    podvisor::cluster::store::etcd_store::parse_url(url).map(|_| url.to_string())
}

fn up_options(command: &Command) -> Option<podvisor::cluster::up::UpOptions> {
    let Command::Up {
        data_dir,
        kubeconfig,
        api_address,
        runtime_endpoint,
        node_name,
        control_plane_only,
        kubelet_port,
        pod_log_dir,
        container_log_max_size,
        container_log_max_files,
        container_log_monitor_interval,
        listen,
        root,
        state,
        config,
        scheduler_strategy,
        node_monitor_grace_period,
        pod_eviction_timeout,
        nodes,
        node_lease_duration_seconds,
        service_cidr,
        store,
        store_prefix,
        node_link_cidr,
        ..
    } = command
    else {
        return None;
    };
    Some(podvisor::cluster::up::UpOptions {
        data_dir: data_dir.clone(),
        kubeconfig: kubeconfig
            .clone()
            .unwrap_or_else(podvisor::cluster::up::default_kubeconfig),
        api_address: *api_address,
        runtime_endpoint: runtime_endpoint.clone(),
        daemon: DaemonOptions {
            listen: listen.clone(),
            root: root.clone(),
            state: state.clone(),
            config_explicit: config.is_some(),
            config_path: config.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH)),
        },
        node_name: node_name.clone().unwrap_or_else(podvisor::cluster::up::node_name),
        scheduler_strategy: *scheduler_strategy,
        controllers: podvisor::cluster::controllers::Settings {
            node_monitor_grace: *node_monitor_grace_period,
            pod_eviction_timeout: *pod_eviction_timeout,
            ..Default::default()
        },
        kubelet_port: *kubelet_port,
        control_plane_only: *control_plane_only,
        pod_log_dir: pod_log_dir.clone(),
        log_rotation: podvisor::cluster::agent::logrotate::LogRotation {
            max_size: *container_log_max_size,
            max_files: *container_log_max_files as usize,
            interval: *container_log_monitor_interval,
        },
        join: None,
        nodes: *nodes as usize,
        node_lease_duration: std::time::Duration::from_secs(*node_lease_duration_seconds),
        service_cidr: *service_cidr,
        cluster_dns: None,
        service_proxy: !control_plane_only,
        store: match store {
            Some(url) => podvisor::cluster::up::StoreLocation::Etcd {
                endpoints: podvisor::cluster::store::etcd_store::parse_url(url).expect("checked by clap"),
                prefix: store_prefix.clone(),
            },
            None => podvisor::cluster::up::StoreLocation::Embedded,
        },
        node_network: None,
        node_link_cidr: *node_link_cidr,
    })
}

fn join_options(command: &Command) -> Option<anyhow::Result<podvisor::cluster::up::UpOptions>> {
    let Command::Join {
        kubeconfig,
        server,
        token,
        ca_cert_hash,
        node_name,
        data_dir,
        kubelet_port,
        pod_log_dir,
        container_log_max_size,
        container_log_max_files,
        container_log_monitor_interval,
        node_lease_duration_seconds,
        cluster_dns,
        no_service_proxy,
        netns,
        netns_link,
        runtime_endpoint,
        listen,
        root,
        state,
        config,
    } = command
    else {
        return None;
    };
    let target = match (kubeconfig, server, token, ca_cert_hash) {
        (Some(path), ..) => podvisor::cluster::up::JoinTarget::Kubeconfig(path.clone()),
        (None, Some(server), Some(token), Some(hash)) => podvisor::cluster::up::JoinTarget::Token {
            server: server.clone(),
            token: token.clone(),
            ca_cert_hash: hash.clone(),
        },
        _ => unreachable!("clap requires --kubeconfig or --server, --token and --ca-cert-hash"),
    };
    let node_network = match (netns, netns_link) {
        (Some(name), Some(link)) => Some(podvisor::cluster::nodenet::NodeNetwork::new(name, *link)),
        _ => None,
    }
    .transpose();
    Some(node_network.map(|node_network| {
        podvisor::cluster::up::UpOptions {
            data_dir: data_dir.clone(),
            kubeconfig: kubeconfig.clone().unwrap_or_else(|| data_dir.join("kubeconfig")),
            api_address: podvisor::cluster::up::DEFAULT_API_ADDRESS
                .parse()
                .expect("a socket address"),
            runtime_endpoint: runtime_endpoint.clone(),
            daemon: DaemonOptions {
                listen: listen.clone(),
                root: root.clone(),
                state: state.clone(),
                config_explicit: config.is_some(),
                config_path: config.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH)),
            },
            node_name: node_name.clone().unwrap_or_else(podvisor::cluster::up::node_name),
            scheduler_strategy: Default::default(),
            controllers: Default::default(),
            kubelet_port: *kubelet_port,
            control_plane_only: false,
            pod_log_dir: pod_log_dir.clone(),
            log_rotation: podvisor::cluster::agent::logrotate::LogRotation {
                max_size: *container_log_max_size,
                max_files: *container_log_max_files as usize,
                interval: *container_log_monitor_interval,
            },
            join: Some(target),
            nodes: 1,
            node_lease_duration: std::time::Duration::from_secs(*node_lease_duration_seconds),
            service_cidr: podvisor::cluster::apiserver::DEFAULT_SERVICE_CIDR
                .parse()
                .expect("a CIDR"),
            cluster_dns: cluster_dns.map(|ip| ip.to_string()),
            service_proxy: !no_service_proxy,
            store: Default::default(),
            node_network,
            node_link_cidr: podvisor::cluster::up::DEFAULT_NODE_LINK_CIDR.parse().expect("a CIDR"),
        }
    }))
}

/// Re-runs this command line with `--foreground` in the background.
fn up_detached(cli: &Cli, args: &[std::ffi::OsString]) -> anyhow::Result<()> {
    let options = up_options(&cli.command).expect("an up command");
    let mut foreground: Vec<std::ffi::OsString> = args[1..].to_vec();
    foreground.push("--foreground".into());
    podvisor::cluster::up::run_detached(&options, foreground)
}

fn run(cli: Cli) -> anyhow::Result<()> {
    logging::init(cli.log_format, &cli.log_level);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(32)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        match cli.command {
            Command::Daemon {
                listen,
                root,
                state,
                config,
            } => {
                let options = DaemonOptions {
                    listen,
                    root,
                    state,
                    config_explicit: config.is_some(),
                    config_path: config.unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH)),
                };
                daemon::run(options, shutdown_signal())
                    .await
                    .map_err(|err| anyhow::anyhow!(podvisor::error_chain(&err)))
            }
            command @ Command::Up { .. } => {
                let options = up_options(&command).expect("an up command");
                podvisor::cluster::up::run_foreground(options, shutdown_signal()).await
            }
            command @ Command::Join { .. } => {
                let options = join_options(&command).expect("a join command")?;
                podvisor::cluster::up::run_foreground(options, shutdown_signal()).await
            }
            Command::Down { .. } => unreachable!("handled before the runtime starts"),
            Command::Pull { image, creds, endpoint } => podvisor::cli::pull(&endpoint, &image, creds.as_deref())
                .await
                .map_err(|err| anyhow::anyhow!(podvisor::error_chain(&err))),
            Command::Images { quiet, endpoint } => podvisor::cli::images(&endpoint, quiet)
                .await
                .map_err(|err| anyhow::anyhow!(podvisor::error_chain(&err))),
            Command::Monitor { .. }
            | Command::ExecHelper { .. }
            | Command::PodInit
            | Command::UsernsHolder { .. }
            | Command::VmHelper { .. } => {
                unreachable!("handled before the runtime starts")
            }
        }
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("shutting down");
}
