//! `podvisor up` / `podvisor down`: the whole mini-cluster in one process —
//! the CRI daemon (unless another runtime's socket is given), the API server
//! over its durable store, the scheduler, the controllers and the node agent.
//!
//! `up` starts that process in the background and returns once the cluster
//! answers; `up --foreground` is the process itself. `down` asks it to stop and
//! to remove the pods it ran.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::cluster::agent::server::{self as agent_server, AgentServerConfig};
use crate::cluster::agent::{Agent, AgentOptions};
use crate::cluster::apiserver::{ApiServer, Config as ApiConfig, KubeletProxy, tls};
use crate::cluster::client::Client;
use crate::cluster::store::EtcdStore;
use crate::daemon::DaemonOptions;

pub const DEFAULT_DATA_DIR: &str = "/var/lib/podvisor/cluster";
pub const DEFAULT_API_ADDRESS: &str = "127.0.0.1:6443";
/// Written by the cluster process once it serves; removed when it stops.
pub(crate) const READY_FILE: &str = "ready";
const PID_FILE: &str = "up.pid";
/// Present when `down` asked for the pods to be removed too.
pub(crate) const DOWN_FILE: &str = "down-requested";
const LOG_FILE: &str = "up.log";
/// The `podvisor join` line for other machines.
pub const JOIN_COMMAND_FILE: &str = "join-command";

#[derive(Clone, Debug)]
pub struct UpOptions {
    /// Store, certificates, token, pid and log.
    pub data_dir: PathBuf,
    pub kubeconfig: PathBuf,
    pub api_address: SocketAddr,
    /// Another CRI runtime's socket; None runs podvisor's own daemon in-process.
    pub runtime_endpoint: Option<String>,
    /// For the in-process CRI daemon.
    pub daemon: DaemonOptions,
    pub node_name: String,
    /// How the scheduler ranks nodes.
    pub scheduler_strategy: crate::cluster::scheduler::Strategy,
    pub controllers: crate::cluster::controllers::Settings,
    /// The node agent's API port; None tries 10250 and falls back to a free port.
    pub kubelet_port: Option<u16>,
    /// Only the API server, scheduler and controllers: no CRI daemon and no
    /// node agent on this machine (nodes join from elsewhere).
    pub control_plane_only: bool,
    /// Where the node agent keeps container logs.
    pub pod_log_dir: PathBuf,
    /// When the node agent rotates container logs.
    pub log_rotation: crate::cluster::agent::logrotate::LogRotation,
    /// Join that cluster as one more node (CRI daemon and node agent, no control plane).
    pub join: Option<JoinTarget>,
    /// Nodes on this machine, this one included: the others run as `podvisor join` processes.
    pub nodes: usize,
    /// The node agents' Lease duration (renewed every quarter of it).
    pub node_lease_duration: Duration,
    /// Where Services' ClusterIPs come from.
    pub service_cidr: ipnet::Ipv4Net,
    /// The cluster DNS address pods get (for a joined node: the cluster's; `up` uses its own).
    pub cluster_dns: Option<String>,
    /// Where the API server keeps the cluster's objects.
    pub store: StoreLocation,
    /// Run the service proxy (one per network namespace).
    pub service_proxy: bool,
    /// A joining node's own network namespace on this machine (`up --nodes`).
    pub node_network: Option<super::nodenet::NodeNetwork>,
    /// Where `up --nodes` takes the extra nodes' links to the host from (a /30 each).
    pub node_link_cidr: ipnet::Ipv4Net,
}

/// The default range of the extra local nodes' host links.
pub const DEFAULT_NODE_LINK_CIDR: &str = "10.87.0.0/24";

/// The object store behind the API server.
#[derive(Clone, Debug, Default)]
pub enum StoreLocation {
    /// redb under the data directory.
    #[default]
    Embedded,
    /// An etcd v3 cluster; objects live under `prefix`, so several clusters can share one etcd.
    Etcd { endpoints: Vec<String>, prefix: String },
}

/// How a joining node reaches and trusts the cluster.
#[derive(Clone, Debug)]
pub enum JoinTarget {
    /// A kubeconfig with server, CA and token (as `up` writes it).
    Kubeconfig(PathBuf),
    /// A server and token; the CA is fetched from the server and must have this hash (`sha256:<hex>`).
    Token {
        server: String,
        token: String,
        ca_cert_hash: String,
    },
}

impl JoinTarget {
    pub async fn client(&self) -> anyhow::Result<Client> {
        match self {
            JoinTarget::Kubeconfig(path) => Client::from_kubeconfig(path)
                .with_context(|| format!("reading the cluster's kubeconfig {}", path.display())),
            JoinTarget::Token {
                server,
                token,
                ca_cert_hash,
            } => {
                let server = server.trim_end_matches('/');
                // Not yet trusted: the CA is checked against the hash before anything else is sent.
                let insecure = reqwest::Client::builder()
                    .danger_accept_invalid_certs(true)
                    .connect_timeout(Duration::from_secs(5))
                    .timeout(Duration::from_secs(10))
                    .build()?;
                let url = format!("{server}{}", crate::cluster::apiserver::CLUSTER_INFO_PATH);
                let info: serde_json::Value = insecure
                    .get(&url)
                    .send()
                    .await
                    .and_then(|r| r.error_for_status())
                    .with_context(|| format!("fetching the cluster CA from {url}"))?
                    .json()
                    .await
                    .with_context(|| format!("reading {url}"))?;
                let ca = info
                    .pointer("/data/ca.crt")
                    .and_then(serde_json::Value::as_str)
                    .with_context(|| format!("{url} holds no data.ca.crt"))?;
                let actual = tls::ca_cert_hash(ca)?;
                anyhow::ensure!(
                    actual.eq_ignore_ascii_case(ca_cert_hash.trim()),
                    "the cluster CA at {server} has hash {actual}, not the expected {ca_cert_hash}: refusing to join"
                );
                Ok(Client::new(server, ca, token)?)
            }
        }
    }
}

impl UpOptions {
    pub fn endpoint(&self) -> String {
        self.runtime_endpoint
            .clone()
            .unwrap_or_else(|| self.daemon.listen.clone())
    }
}

/// A duration as Kubernetes flags write it: `40s`, `500ms`, `2m`, `1h` (a bare number is seconds).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 40s"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(number)),
        "" | "s" => Ok(Duration::from_secs(number)),
        "m" => Ok(Duration::from_secs(number * 60)),
        "h" => Ok(Duration::from_secs(number * 3600)),
        _ => Err(format!("{text:?}: unknown unit {unit:?} (use ms, s, m or h)")),
    }
}

/// `~/.kube/podvisor.yaml`.
pub fn default_kubeconfig() -> PathBuf {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"));
    home.join(".kube").join("podvisor.yaml")
}

pub fn node_name() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .map(|h| h.to_lowercase())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "podvisor".into())
}

/// The components running next to the API server (unless this process only
/// joined another cluster as a node). Each is a task that lives until the
/// cluster stops.
pub struct Components {
    tasks: Vec<tokio::task::JoinHandle<()>>,
    agent: Option<Agent>,
}

/// The node agent's API as started: its address and the CA of its certificate
/// when that is not the cluster CA.
struct AgentEndpoint {
    addr: SocketAddr,
    own_ca_pem: Option<String>,
}

impl Components {
    fn start(client: &Client, options: &UpOptions, agent: Option<&AgentEndpoint>) -> Self {
        let mut tasks = Vec::new();
        if options.join.is_none() {
            tasks.push(crate::cluster::scheduler::spawn(
                client.clone(),
                options.scheduler_strategy,
            ));
            tasks.extend(crate::cluster::controllers::spawn_all(client, &options.controllers));
        }
        let agent = agent.map(|endpoint| {
            Agent::start(
                client.clone(),
                AgentOptions {
                    node_name: options.node_name.clone(),
                    runtime_endpoint: options.endpoint(),
                    state_dir: options.data_dir.join("agent"),
                    pod_log_dir: options.pod_log_dir.clone(),
                    storage_dir: options.daemon.root.clone(),
                    cluster_dns: options.cluster_dns.clone(),
                    cluster_domain: "cluster.local".into(),
                    api_port: Some(endpoint.addr.port()),
                    log_rotation: options.log_rotation.clone(),
                    kubelet_ca_pem: endpoint.own_ca_pem.clone(),
                    lease_duration: options.node_lease_duration,
                },
            )
        });
        Components { tasks, agent }
    }

    /// Removes every pod the node agent ran (for `down`).
    async fn remove_pods(&self) {
        if let Some(agent) = &self.agent {
            agent.remove_pods().await;
        }
    }

    fn stop(self) {
        if let Some(agent) = self.agent {
            agent.stop();
        }
        for task in self.tasks {
            task.abort();
        }
    }
}

/// Runs the cluster (or, with `join`, one more node of another) in this process until `shutdown`.
pub async fn run_foreground(mut options: UpOptions, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
    let started = Instant::now();
    crate::sys::fs::ensure_dir(&options.data_dir, 0o700)
        .with_context(|| format!("creating {}", options.data_dir.display()))?;
    let _ = std::fs::remove_file(options.data_dir.join(DOWN_FILE));
    std::fs::write(options.data_dir.join(PID_FILE), std::process::id().to_string())?;

    if let Some(network) = &options.node_network {
        let path = network
            .ensure()
            .await
            .with_context(|| format!("setting up network namespace {}", network.netns))?;
        crate::sys::netns::set_node(path)?;
    }
    if options.join.is_none() && options.nodes > 1 && options.runtime_endpoint.is_none() {
        // Pods reach the other nodes' pods with their own address.
        options.daemon.config_path = super::nodes::write_first_node_config(&options)?;
        options.daemon.config_explicit = true;
    }
    let (stop_daemon, daemon_stopped) = tokio::sync::oneshot::channel::<()>();
    let daemon = match &options.runtime_endpoint {
        _ if options.control_plane_only => None,
        Some(_) => None,
        None => {
            let daemon_options = options.daemon.clone();
            Some(tokio::spawn(async move {
                crate::daemon::run(daemon_options, async {
                    let _ = daemon_stopped.await;
                })
                .await
            }))
        }
    };
    if let Some(task) = &daemon {
        wait_for_socket(&options.endpoint(), task).await?;
    }

    let mut api = None;
    let mut local_nodes = None;
    let mut dns = None;
    let (client, agent_server) = match &options.join {
        Some(target) => {
            let client = target.client().await?;
            // No cluster CA key here: the agent's certificate comes from a CA of this node's own.
            let credentials = tls::load_or_create(&options.data_dir.join("kubelet"))?;
            let listen = std::net::IpAddr::from([0, 0, 0, 0]);
            // Callers of the agent API (the API server) present the node token.
            let agent_token = node_token(&client).await?;
            let (addr, task) = start_agent_server(&options, &credentials, listen, &agent_token).await?;
            let endpoint = AgentEndpoint {
                addr,
                own_ca_pem: Some(credentials.ca_pem.clone()),
            };
            (client, Some((endpoint, task)))
        }
        None => {
            let api_dir = options.data_dir.join("apiserver");
            let credentials = tls::load_or_create(&api_dir)?;
            let agent_server = match options.control_plane_only {
                true => None,
                false => {
                    let listen = std::net::IpAddr::from([127, 0, 0, 1]);
                    let (addr, task) =
                        start_agent_server(&options, &credentials, listen, &credentials.node_token).await?;
                    Some((AgentEndpoint { addr, own_ca_pem: None }, task))
                }
            };
            let mut api_config = ApiConfig::new(api_dir);
            api_config.addr = options.api_address;
            api_config.service_cidr = options.service_cidr;
            let mut proxy = KubeletProxy::new(&credentials.ca_pem, &credentials.node_token)?;
            if let Some((endpoint, _)) = &agent_server {
                proxy = proxy.with_local_node(&options.node_name, endpoint.addr);
            }
            api_config.hooks.node_proxy = Some(Arc::new(proxy));
            let server = match &options.store {
                StoreLocation::Embedded => ApiServer::start(api_config).await,
                StoreLocation::Etcd { endpoints, prefix } => {
                    let store = EtcdStore::connect(endpoints, prefix).await?;
                    tracing::info!(endpoints = %endpoints.join(","), %prefix, "object store on etcd");
                    ApiServer::start_with_store(api_config, Arc::new(store)).await
                }
            }
            .with_context(|| format!("starting the API server on {}", options.api_address))?;
            write_kubeconfig(&options.kubeconfig, &server.kubeconfig())?;
            write_join_command(&options, &server)?;
            let client = Client::new(&server.url, &server.ca_pem, &server.token)?;
            publish_node_token(&client, &server.node_token).await?;
            // The `kubernetes` Service leads to this API server.
            let api_ip = match server.addr.ip() {
                std::net::IpAddr::V4(ip) if !ip.is_unspecified() => ip,
                _ => crate::cluster::agent::primary_ipv4(),
            };
            let api_port = [("https", server.addr.port(), "TCP")];
            publish_endpoints(&client, "default", "kubernetes", api_ip, &api_port).await?;
            if !options.control_plane_only {
                let (dns_service, task) = start_dns(&client, options.service_cidr).await?;
                options.cluster_dns = Some(dns_service.to_string());
                dns = Some(task);
            }
            if options.nodes > 1 {
                local_nodes = Some(super::nodes::LocalNodes::start(&options)?);
            }
            api = Some(server);
            (client, agent_server)
        }
    };
    if options.join.is_some() && options.cluster_dns.is_none() {
        // The cluster's DNS, as `up` published it.
        let service = client
            .get_opt::<k8s_openapi::api::core::v1::Service>(Some("kube-system"), "kube-dns")
            .await?;
        options.cluster_dns = service
            .and_then(|s| s.spec?.cluster_ip)
            .filter(|ip| ip.parse::<std::net::Ipv4Addr>().is_ok());
    }
    let components = Components::start(&client, &options, agent_server.as_ref().map(|(e, _)| e));
    // One service proxy per network namespace: extra local nodes go without (`join --no-service-proxy`).
    let proxy_table = crate::cluster::proxy::table_name(&options.data_dir);
    let proxy = options
        .service_proxy
        .then(|| crate::cluster::proxy::spawn(client.clone(), proxy_table.clone()));
    // Whole or not at all: readers wait for the file, then read the URL.
    let ready = options.data_dir.join(READY_FILE);
    std::fs::write(ready.with_extension("tmp"), client.base_url().as_bytes())?;
    std::fs::rename(ready.with_extension("tmp"), &ready)?;
    tracing::info!(
        api = %client.base_url(),
        kubeconfig = %options.kubeconfig.display(),
        runtime = %options.endpoint(),
        node = %options.node_name,
        node_agent = ?agent_server.as_ref().map(|(e, _)| e.addr),
        joined = options.join.is_some(),
        ms = started.elapsed().as_millis() as u64,
        "podvisor cluster up"
    );

    shutdown.await;
    let _ = std::fs::remove_file(options.data_dir.join(READY_FILE));
    let remove_pods = options.data_dir.join(DOWN_FILE).exists();
    if let Some(nodes) = local_nodes {
        nodes.stop(remove_pods).await;
    }
    if remove_pods {
        components.remove_pods().await;
    }
    components.stop();
    if let Some(dns) = dns {
        dns.abort();
    }
    if let Some(proxy) = proxy {
        proxy.abort();
        crate::cluster::proxy::remove_table(&proxy_table).await;
    }
    if let Some(api) = api {
        api.stop();
    }
    if let Some((_, task)) = agent_server {
        task.abort();
    }
    if let Some(task) = daemon {
        let _ = stop_daemon.send(());
        task.await
            .context("the CRI daemon task")?
            .map_err(|err| anyhow::anyhow!(crate::error_chain(&err)))?;
    }
    if let (Some(network), true) = (&options.node_network, remove_pods) {
        network.remove().await;
    }
    let _ = std::fs::remove_file(options.data_dir.join(PID_FILE));
    let _ = std::fs::remove_file(options.data_dir.join(DOWN_FILE));
    Ok(())
}

/// The node agent's HTTPS API on `listen` (127.0.0.1 next to the API server, every address on a joined node), with
/// a certificate from `credentials`' CA; callers must present `token`.
async fn start_agent_server(
    options: &UpOptions,
    credentials: &tls::Credentials,
    listen: std::net::IpAddr,
    token: &str,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    if listen.is_unspecified() {
        names.push(crate::cluster::agent::primary_ipv4().to_string());
    }
    if options
        .node_name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    {
        names.push(options.node_name.clone());
    }
    let (cert, key) = tls::issue_serving_cert(credentials, &format!("system:node:{}", options.node_name), &names)?;
    let serving = tls::server_config_from_pem(&cert, &key)?;
    let config = |port: u16| AgentServerConfig {
        listen: SocketAddr::new(listen, port),
        cri_endpoint: options.endpoint(),
        tls: Some(serving.clone()),
        token: token.to_string(),
        streaming_tls: None,
    };
    let port = options.kubelet_port.unwrap_or(agent_server::DEFAULT_PORT);
    match agent_server::serve(config(port)).await {
        Ok(served) => Ok(served),
        Err(err) if options.kubelet_port.is_none() => {
            tracing::warn!(port, error = %err, "node agent port taken, using a free port");
            agent_server::serve(config(0)).await
        }
        Err(err) => Err(err.context(format!("node agent on port {port}"))),
    }
}

async fn wait_for_socket(
    endpoint: &str,
    daemon: &tokio::task::JoinHandle<Result<(), crate::daemon::DaemonError>>,
) -> anyhow::Result<()> {
    let socket = crate::cri::socket::socket_path(endpoint);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !socket.exists() {
        if daemon.is_finished() {
            anyhow::bail!("the CRI daemon stopped while starting (see the log above)");
        }
        anyhow::ensure!(Instant::now() < deadline, "the CRI daemon did not start in 60 s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// The cluster DNS on this machine's address, and the `kube-dns` Service (the
/// range's tenth address) with an EndpointSlice leading there; returns the
/// Service's address, what pods get as their nameserver.
async fn start_dns(
    client: &Client,
    service_cidr: ipnet::Ipv4Net,
) -> anyhow::Result<(std::net::Ipv4Addr, tokio::task::JoinHandle<()>)> {
    use k8s_openapi::api::core::v1::Service;
    let node_ip = crate::cluster::agent::primary_ipv4();
    let (bound, task) =
        crate::cluster::dns::spawn(client.clone(), SocketAddr::from((node_ip, 0)), "cluster.local".into())
            .await
            .context("starting the cluster DNS")?;
    let service_ip = crate::cluster::dns::service_ip(&service_cidr);
    let service: Service = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "kube-dns", "namespace": "kube-system", "labels": {"k8s-app": "kube-dns"}},
        "spec": {"clusterIP": service_ip.to_string(), "ports": [{"name": "dns", "port": 53, "protocol": "UDP"},
                            {"name": "dns-tcp", "port": 53, "protocol": "TCP"}]},
    }))?;
    match client.create(Some("kube-system"), &service).await {
        Ok(_) => {}
        // Kept from an earlier run: its ports brought up to date.
        Err(e) if e.is_conflict() => {
            let mut current: Service = client.get(Some("kube-system"), "kube-dns").await?;
            let ports = service.spec.as_ref().and_then(|s| s.ports.clone());
            let outline = |ports: &Option<Vec<k8s_openapi::api::core::v1::ServicePort>>| {
                let ports = ports.iter().flatten();
                ports
                    .map(|p| (p.name.clone(), p.port, p.protocol.clone()))
                    .collect::<Vec<_>>()
            };
            if let Some(spec) = current.spec.as_mut().filter(|s| outline(&s.ports) != outline(&ports)) {
                spec.ports = ports;
                client.replace(Some("kube-system"), "kube-dns", &current).await?;
            }
        }
        Err(e) => return Err(anyhow::anyhow!("creating the kube-dns Service: {e}")),
    }
    let ports = [("dns", bound.port(), "UDP"), ("dns-tcp", bound.port(), "TCP")];
    publish_endpoints(client, "kube-system", "kube-dns", node_ip, &ports).await?;
    tracing::info!(service = %service_ip, listen = %bound, "cluster DNS");
    Ok((service_ip, task))
}

const NODE_TOKEN_SECRET: &str = "podvisor-node-token";

/// The node token as a Secret in kube-system, for nodes joining with the administrator's kubeconfig.
async fn publish_node_token(client: &Client, token: &str) -> anyhow::Result<()> {
    use k8s_openapi::api::core::v1::Secret;
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": NODE_TOKEN_SECRET, "namespace": "kube-system"},
        "stringData": {"token": token},
    }))?;
    match client.get_opt::<Secret>(Some("kube-system"), NODE_TOKEN_SECRET).await? {
        Some(current)
            if current
                .data
                .as_ref()
                .and_then(|d| d.get("token"))
                .map(|t| t.0.as_slice())
                == Some(token.as_bytes()) => {}
        Some(current) => {
            let mut secret = secret;
            secret.metadata.resource_version = current.metadata.resource_version;
            client.replace(Some("kube-system"), NODE_TOKEN_SECRET, &secret).await?;
        }
        None => _ = client.create(Some("kube-system"), &secret).await?,
    }
    Ok(())
}

/// The token the API server presents to node agents (a joining node may hold the administrator's instead).
async fn node_token(client: &Client) -> anyhow::Result<String> {
    use k8s_openapi::api::core::v1::Secret;
    let secret = client
        .get_opt::<Secret>(Some("kube-system"), NODE_TOKEN_SECRET)
        .await
        .context("reading the cluster's node token")?;
    let token = secret
        .and_then(|s| s.data?.get("token").cloned())
        .map(|t| String::from_utf8_lossy(&t.0).trim().to_string());
    Ok(token.unwrap_or_else(|| client.token().to_string()))
}

/// The EndpointSlice and Endpoints of a Service without selector served at `ip` on `ports` (name, port, protocol).
async fn publish_endpoints(
    client: &Client,
    namespace: &str,
    name: &str,
    ip: std::net::Ipv4Addr,
    ports: &[(&str, u16, &str)],
) -> anyhow::Result<()> {
    use k8s_openapi::api::core::v1::Endpoints;
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    let port_list: Vec<serde_json::Value> = ports
        .iter()
        .map(|(port_name, port, protocol)| serde_json::json!({"name": port_name, "port": port, "protocol": protocol}))
        .collect();
    let mut slice: EndpointSlice = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "namespace": namespace,
                     "labels": {crate::cluster::controllers::endpoints::SERVICE_NAME_LABEL: name}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [ip.to_string()], "conditions": {"ready": true}}],
        "ports": port_list,
    }))?;
    match client.get_opt::<EndpointSlice>(Some(namespace), name).await? {
        Some(current) => {
            slice.metadata.resource_version = current.metadata.resource_version;
            client.replace(Some(namespace), name, &slice).await?;
        }
        None => _ = client.create(Some(namespace), &slice).await?,
    }
    let mut endpoints: Endpoints = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "namespace": namespace},
        "subsets": [{"addresses": [{"ip": ip.to_string()}], "ports": port_list}],
    }))?;
    match client.get_opt::<Endpoints>(Some(namespace), name).await? {
        Some(current) => {
            endpoints.metadata.resource_version = current.metadata.resource_version;
            client.replace(Some(namespace), name, &endpoints).await?;
        }
        None => _ = client.create(Some(namespace), &endpoints).await?,
    }
    Ok(())
}

/// `<data-dir>/join-command`: the line that joins another machine to this cluster (printed by `up`).
fn write_join_command(options: &UpOptions, server: &ApiServer) -> anyhow::Result<()> {
    let host = match server.addr.ip() {
        ip if ip.is_unspecified() => crate::cluster::agent::primary_ipv4().to_string(),
        ip => ip.to_string(),
    };
    let line = format!(
        "podvisor join --server https://{host}:{} --token {} --ca-cert-hash {}\n",
        server.addr.port(),
        server.node_token,
        tls::ca_cert_hash(&server.ca_pem)?
    );
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(options.data_dir.join(JOIN_COMMAND_FILE))?;
    std::io::Write::write_all(&mut file, line.as_bytes())?;
    Ok(())
}

fn write_kubeconfig(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    file.write_all(text.as_bytes())?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// `podvisor up` without `--foreground`: starts the cluster process in its own
/// session, logging to `up.log`, and returns once it serves.
pub fn run_detached(options: &UpOptions, foreground_args: Vec<std::ffi::OsString>) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    crate::sys::fs::ensure_dir(&options.data_dir, 0o700)
        .with_context(|| format!("creating {}", options.data_dir.display()))?;
    if let Some(pid) = running_pid(&options.data_dir) {
        println!("podvisor cluster already running (pid {pid})");
        print_usage(&options.kubeconfig);
        return Ok(());
    }
    let started = Instant::now();
    let ready = options.data_dir.join(READY_FILE);
    let _ = std::fs::remove_file(&ready);
    let log_path = options.data_dir.join(LOG_FILE);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let offset = log.metadata().map(|m| m.len()).unwrap_or(0);
    let mut command = std::process::Command::new(std::env::current_exe()?);
    command
        .args(foreground_args)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: setsid is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        command.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = command.spawn().context("starting the cluster process")?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while !ready.exists() {
        if let Some(status) = child.try_wait()? {
            let text = std::fs::read(&log_path).unwrap_or_default();
            let tail = String::from_utf8_lossy(&text[(offset as usize).min(text.len())..]).into_owned();
            anyhow::bail!("the cluster process exited ({status}):\n{}", tail.trim());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the cluster did not come up in 120 s; see {}",
            log_path.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    println!(
        "podvisor cluster up in {} ms (pid {}, log {})",
        started.elapsed().as_millis(),
        child.id(),
        log_path.display()
    );
    print_usage(&options.kubeconfig);
    if options.api_address.ip().is_loopback() {
        println!("nodes on other machines can join once the API listens beyond loopback (--api-address 0.0.0.0:6443)");
    } else if let Ok(line) = std::fs::read_to_string(options.data_dir.join(JOIN_COMMAND_FILE)) {
        println!("to add a node on another machine: {}", line.trim());
    }
    Ok(())
}

fn print_usage(kubeconfig: &Path) {
    println!("export KUBECONFIG={}", kubeconfig.display());
}

/// The pid of a live cluster (or joined node) process of this data dir.
pub(crate) fn running_pid(data_dir: &Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(data_dir.join(PID_FILE))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let is_up = cmdline.split(|b| *b == 0).any(|arg| arg == b"up" || arg == b"join");
    is_up.then_some(pid)
}

/// `podvisor down`: stops the cluster process of `data_dir`, which first removes
/// the pods it ran. The store stays, so `up` brings the objects back.
pub fn down(data_dir: &Path, timeout: Duration) -> anyhow::Result<()> {
    let Some(pid) = running_pid(data_dir) else {
        println!("no podvisor cluster running for {}", data_dir.display());
        return Ok(());
    };
    std::fs::write(data_dir.join(DOWN_FILE), b"")?;
    let pid = nix::unistd::Pid::from_raw(pid);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).context("signalling the cluster process")?;
    let deadline = Instant::now() + timeout;
    while nix::sys::signal::kill(pid, None).is_ok() && std::path::Path::new(&format!("/proc/{pid}")).exists() {
        if Instant::now() >= deadline {
            anyhow::bail!("the cluster process {pid} did not stop in {} s", timeout.as_secs());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    println!("podvisor cluster stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_as_flags_write_them() {
        assert_eq!(parse_duration("40s"), Ok(Duration::from_secs(40)));
        assert_eq!(parse_duration("40"), Ok(Duration::from_secs(40)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("5d").is_err() && parse_duration("s").is_err() && parse_duration("").is_err());
    }
}
