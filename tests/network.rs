//! Pod networking end to end, for both paths: the CNI reference plugins
//! (bridge, host-local, portmap, loopback) and the built-in bridge network.
//! Checked by traffic: pod to pod, node to pod, hostPorts, and by what is
//! left on the node afterwards (veths, address allocations, NAT rules).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::cri::{Fixture, mounts_under};
use common::daemon::remove_test_network;
use podvisor::cri::proto::runtime as cri;
use tonic::Code;

/// Which network a test's daemon uses, with what it needs to inspect it.
struct TestNetwork {
    kind: Kind,
    bridge: String,
    prefix: String,
    /// Where address allocations are kept (one file per address).
    ipam_dir: PathBuf,
    nat: String,
    _dir: tempfile::TempDir,
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Kind {
    Cni,
    Builtin,
}

fn unique() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    (std::process::id() % 1000) * 100 + NEXT.fetch_add(1, Ordering::Relaxed)
}

impl TestNetwork {
    /// The network and the daemon config that selects it.
    fn new(kind: Kind) -> (TestNetwork, String) {
        let n = unique();
        let dir = tempfile::tempdir().unwrap();
        let bridge = format!("pvn{n:06}");
        let prefix = format!("10.{}.{}", 200 + n % 50, (n / 50) % 256);
        let nat = format!("pvn_{n}");
        let (config, ipam_dir) = match kind {
            Kind::Cni => {
                let conf_dir = dir.path().join("net.d");
                std::fs::create_dir(&conf_dir).unwrap();
                let data_dir = dir.path().join("ipam");
                let conflist = serde_json::json!({
                    "cniVersion": "1.0.0",
                    "name": format!("pvn{n}"),
                    "plugins": [
                        {"type": "bridge", "bridge": bridge, "isGateway": true, "ipMasq": true, "hairpinMode": true,
                         "ipam": {"type": "host-local", "ranges": [[{"subnet": format!("{prefix}.0/24")}]],
                                  "routes": [{"dst": "0.0.0.0/0"}], "dataDir": data_dir}},
                        {"type": "portmap", "capabilities": {"portMappings": true}, "snat": true},
                        {"type": "loopback"}
                    ]
                });
                std::fs::write(conf_dir.join("10-test.conflist"), conflist.to_string()).unwrap();
                let config = format!(
                    "[network]\nmode = \"cni\"\ncni_conf_dir = \"{}\"\ncni_bin_dirs = [\"/usr/lib/cni\"]\n",
                    conf_dir.display()
                );
                (config, data_dir.join(format!("pvn{n}")))
            }
            Kind::Builtin => {
                let config = format!(
                    "[network]\nmode = \"builtin\"\n[network.builtin]\nbridge = \"{bridge}\"\nsubnet = \"{prefix}.0/24\"\nnat_name = \"{nat}\"\n"
                );
                (config, PathBuf::new())
            }
        };
        let network = TestNetwork {
            kind,
            bridge,
            prefix,
            ipam_dir,
            nat,
            _dir: dir,
        };
        (network, config)
    }

    fn with_state(mut self, fx: &Fixture) -> TestNetwork {
        if self.kind == Kind::Builtin {
            self.ipam_dir = fx.daemon.state().join("network/ipam");
        }
        self
    }

    /// Interfaces attached to the bridge (one host veth per attached pod).
    fn bridge_ports(&self) -> Vec<String> {
        let out = std::process::Command::new("ip")
            .args(["-o", "link", "show", "master", &self.bridge])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|name| name.split('@').next().unwrap_or(name).to_string())
            .collect()
    }

    /// Addresses allocated to pods.
    fn allocated(&self) -> Vec<String> {
        std::fs::read_dir(&self.ipam_dir)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|name| name.starts_with(&self.prefix))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// NAT rules that mention `needle` (a sandbox id, or a pod address).
    fn nat_rules_mentioning(&self, needle: &str) -> usize {
        let out = std::process::Command::new("nft")
            .args(["list", "ruleset"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains(needle))
            .count()
    }
}

impl Drop for TestNetwork {
    fn drop(&mut self) {
        remove_test_network(&self.bridge, &self.nat);
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("0.0.0.0:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The node's first global IPv4 address.
fn node_address() -> Option<String> {
    let out = std::process::Command::new("ip")
        .args(["-4", "-o", "addr", "show", "scope", "global"])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.contains(" pv"))
        .find_map(|l| l.split_whitespace().nth(3))
        .and_then(|cidr| cidr.split('/').next())
        .map(str::to_string)
}

/// An HTTP GET over plain TCP; the body, or why it failed.
fn http_get(addr: &str) -> Result<String, String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let attempt = (|| -> std::io::Result<String> {
            let mut stream = TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(2))?;
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            stream.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
            let mut text = String::new();
            stream.read_to_string(&mut text)?;
            Ok(text)
        })();
        match attempt {
            Ok(text) if text.contains("200") => return Ok(text),
            Ok(text) if Instant::now() > deadline => return Err(text),
            Err(e) if Instant::now() > deadline => return Err(e.to_string()),
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

async fn pod_ip(fx: &Fixture, pod: &str) -> String {
    fx.runtime()
        .await
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: pod.into(),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap()
        .network
        .unwrap()
        .ip
}

async fn stop_and_remove(fx: &Fixture, pod: &str) {
    let mut runtime = fx.runtime().await;
    runtime
        .stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: pod.into(),
        })
        .await
        .expect("StopPodSandbox");
    runtime
        .remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: pod.into(),
        })
        .await
        .expect("RemovePodSandbox");
}

async fn traffic_host_ports_and_cleanup(kind: Kind) {
    let (network, config) = TestNetwork::new(kind);
    let fx = Fixture::start_with_config(Some(&config)).await;
    let network = network.with_state(&fx);
    let status = fx
        .runtime()
        .await
        .status(cri::StatusRequest { verbose: false })
        .await
        .unwrap()
        .into_inner();
    let ready = status
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.r#type == "NetworkReady")
        .unwrap();
    assert!(ready.status, "{kind:?}: network not ready: {ready:?}");

    let host_port = free_port();
    let mut server_config = fx.pod("server");
    server_config.port_mappings = vec![cri::PortMapping {
        protocol: cri::Protocol::Tcp as i32,
        container_port: 8080,
        host_port: host_port as i32,
        host_ip: String::new(),
    }];
    server_config.dns_config = Some(cri::DnsConfig {
        servers: vec!["10.96.0.10".into()],
        searches: vec!["test.svc.cluster.local".into()],
        options: vec!["ndots:5".into()],
    });
    let server_pod = fx.run_pod(server_config.clone()).await;
    let server = fx
        .create(
            &server_pod,
            &server_config,
            fx.container(
                "httpd",
                "mkdir -p /www && echo hello-from-the-pod > /www/index.html && exec httpd -f -p 8080 -h /www",
            ),
        )
        .await
        .unwrap();
    fx.start_container(&server).await.unwrap();
    let server_ip = pod_ip(&fx, &server_pod).await;
    assert!(
        server_ip.starts_with(&format!("{}.", network.prefix)),
        "{kind:?}: {server_ip}"
    );

    // Inside: eth0 has the address PodSandboxStatus reports; resolv.conf is the pod's.
    let out = fx.exec(&server, &["ip", "-4", "-o", "addr", "show", "eth0"]).await;
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("{server_ip}/")),
        "{kind:?}: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = fx.exec(&server, &["cat", "/etc/resolv.conf"]).await;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "search test.svc.cluster.local\nnameserver 10.96.0.10\noptions ndots:5\n"
    );

    // Another pod reaches it by pod IP.
    let client_config = fx.pod("client");
    let client_pod = fx.run_pod(client_config.clone()).await;
    let client = fx
        .create(&client_pod, &client_config, fx.container("client", "exec sleep 1000"))
        .await
        .unwrap();
    fx.start_container(&client).await.unwrap();
    // (busybox-static's wget resolves names through glibc's NSS and crashes without it.)
    let fetch = format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {server_ip} 8080");
    let mut out = fx.exec(&client, &["sh", "-c", &fetch]).await;
    for _ in 0..50 {
        if String::from_utf8_lossy(&out.stdout).contains("hello-from-the-pod") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        out = fx.exec(&client, &["sh", "-c", &fetch]).await;
    }
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("hello-from-the-pod\n"),
        "{kind:?}: pod to pod (exit {}): {}",
        out.exit_code,
        String::from_utf8_lossy(&out.stderr)
    );

    // The node reaches the pod, and the hostPort on the node's address (and, for the
    // built-in network, on 127.0.0.1 too).
    let body = http_get(&format!("{server_ip}:8080")).unwrap_or_else(|e| panic!("{kind:?}: node to pod: {e}"));
    assert!(body.contains("hello-from-the-pod"));
    if let Some(node) = node_address() {
        let body =
            http_get(&format!("{node}:{host_port}")).unwrap_or_else(|e| panic!("{kind:?}: hostPort on {node}: {e}"));
        assert!(body.contains("hello-from-the-pod"));
    }
    if kind == Kind::Builtin {
        let body = http_get(&format!("127.0.0.1:{host_port}")).unwrap_or_else(|e| panic!("hostPort on 127.0.0.1: {e}"));
        assert!(body.contains("hello-from-the-pod"));
    }

    // The traffic shows in the pod's network stats.
    let stats = fx
        .runtime()
        .await
        .pod_sandbox_stats(cri::PodSandboxStatsRequest {
            pod_sandbox_id: server_pod.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .stats
        .unwrap();
    let eth0 = stats.linux.unwrap().network.unwrap().default_interface.unwrap();
    assert_eq!(eth0.name, "eth0");
    assert!(
        eth0.rx_bytes.unwrap().value > 100 && eth0.tx_bytes.unwrap().value > 100,
        "{eth0:?}"
    );

    // Stopping releases the pod's veth, address and port rules (and keeps the record).
    assert_eq!(
        network.bridge_ports().len(),
        2,
        "{kind:?}: {:?}",
        network.bridge_ports()
    );
    assert!(
        network.allocated().contains(&server_ip),
        "{kind:?}: {:?}",
        network.allocated()
    );
    assert!(network.nat_rules_mentioning(&host_port.to_string()) > 0);
    fx.runtime()
        .await
        .stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: server_pod.clone(),
        })
        .await
        .unwrap();
    assert_eq!(
        network.bridge_ports().len(),
        1,
        "{kind:?}: {:?}",
        network.bridge_ports()
    );
    assert!(!network.allocated().contains(&server_ip), "{kind:?}: address kept");
    assert_eq!(
        network.nat_rules_mentioning(&format!("dport {host_port}")),
        0,
        "{kind:?}: hostPort rule kept"
    );
    assert!(http_get(&format!("{server_ip}:8080")).is_err());
    stop_and_remove(&fx, &server_pod).await;
    stop_and_remove(&fx, &client_pod).await;
    assert!(network.bridge_ports().is_empty());
    assert!(network.allocated().is_empty());
}

#[tokio::test]
async fn cni_pods_reach_each_other_the_node_and_host_ports() {
    traffic_host_ports_and_cleanup(Kind::Cni).await;
}

#[tokio::test]
async fn builtin_pods_reach_each_other_the_node_and_host_ports() {
    traffic_host_ports_and_cleanup(Kind::Builtin).await;
}

async fn crash_then_stop_cleans_up(kind: Kind) {
    let (network, config) = TestNetwork::new(kind);
    let mut fx = Fixture::start_with_config(Some(&config)).await;
    let network = network.with_state(&fx);
    let pod = fx.run_pod(fx.pod("crash")).await;
    let ip = pod_ip(&fx, &pod).await;
    assert_eq!(network.bridge_ports().len(), 1);
    fx.daemon.restart().await;
    assert_eq!(pod_ip(&fx, &pod).await, ip, "{kind:?}: the address survives a restart");
    fx.runtime()
        .await
        .stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await
        .unwrap();
    assert!(
        network.bridge_ports().is_empty(),
        "{kind:?}: {:?}",
        network.bridge_ports()
    );
    assert!(network.allocated().is_empty(), "{kind:?}: {:?}", network.allocated());
    stop_and_remove(&fx, &pod).await;
}

#[tokio::test]
async fn cni_stop_after_a_daemon_crash_cleans_up() {
    crash_then_stop_cleans_up(Kind::Cni).await;
}

#[tokio::test]
async fn builtin_stop_after_a_daemon_crash_cleans_up() {
    crash_then_stop_cleans_up(Kind::Builtin).await;
}

async fn hundred_cycles_leave_nothing(kind: Kind) {
    let (network, config) = TestNetwork::new(kind);
    let fx = Fixture::start_with_config(Some(&config)).await;
    let network = network.with_state(&fx);
    let fx = &fx;
    // Four workers at a time, 25 cycles each, each cycle with a hostPort.
    let workers = (0..4).map(|worker| async move {
        let mut seen = Vec::new();
        for cycle in 0..25 {
            let mut config = fx.pod(&format!("cycle-{worker}-{cycle}"));
            config.port_mappings = vec![cri::PortMapping {
                protocol: cri::Protocol::Tcp as i32,
                container_port: 80,
                host_port: 30000 + (worker * 100 + cycle) + (unique() % 200) as i32 * 10,
                host_ip: String::new(),
            }];
            let pod = fx.run_pod(config).await;
            seen.push(pod_ip(fx, &pod).await);
            stop_and_remove(fx, &pod).await;
        }
        seen
    });
    let ips: Vec<String> = futures_util::future::join_all(workers)
        .await
        .into_iter()
        .flatten()
        .collect();
    assert_eq!(ips.len(), 100);
    assert!(
        network.bridge_ports().is_empty(),
        "{kind:?}: {:?}",
        network.bridge_ports()
    );
    assert!(network.allocated().is_empty(), "{kind:?}: {:?}", network.allocated());
    for ip in &ips {
        assert_eq!(
            network.nat_rules_mentioning(&format!("{ip}:80")),
            0,
            "{kind:?}: a rule for {ip} is left"
        );
    }
    let netns_left = mounts_under(&fx.daemon.state());
    assert!(netns_left.is_empty(), "{netns_left:?}");
}

#[tokio::test]
async fn cni_hundred_pod_cycles_leave_nothing_behind() {
    hundred_cycles_leave_nothing(Kind::Cni).await;
}

#[tokio::test]
async fn builtin_hundred_pod_cycles_leave_nothing_behind() {
    hundred_cycles_leave_nothing(Kind::Builtin).await;
}

#[tokio::test]
async fn broken_cni_configs_fail_clearly_and_leave_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let conf_dir = dir.path().join("net.d");
    std::fs::create_dir(&conf_dir).unwrap();
    let config = format!(
        "[network]\nmode = \"cni\"\ncni_conf_dir = \"{}\"\ncni_bin_dirs = [\"/usr/lib/cni\"]\n",
        conf_dir.display()
    );
    let fx = Fixture::start_with_config(Some(&config)).await;
    let mut runtime = fx.runtime().await;
    let network_ready = |status: cri::StatusResponse| {
        status
            .status
            .unwrap()
            .conditions
            .into_iter()
            .find(|c| c.r#type == "NetworkReady")
            .unwrap()
    };

    // No configuration at all.
    let ready = network_ready(
        runtime
            .status(cri::StatusRequest::default())
            .await
            .unwrap()
            .into_inner(),
    );
    assert!(
        !ready.status && ready.message.contains("no CNI network configuration"),
        "{ready:?}"
    );
    let cases = [
        ("{ not json", "not valid JSON"),
        (
            r#"{"cniVersion": "1.0.0", "name": "broken", "plugins": [{"type": "no-such-plugin"}]}"#,
            "no-such-plugin",
        ),
    ];
    for (text, expected) in cases {
        std::fs::write(conf_dir.join("10-broken.conflist"), text).unwrap();
        let ready = network_ready(
            runtime
                .status(cri::StatusRequest::default())
                .await
                .unwrap()
                .into_inner(),
        );
        assert!(!ready.status && ready.message.contains(expected), "{ready:?}");
        let err = runtime
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(fx.pod("broken")),
                runtime_handler: String::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
        assert!(err.message().contains(expected), "{err}");
    }
    let pods = runtime
        .list_pod_sandbox(cri::ListPodSandboxRequest::default())
        .await
        .unwrap()
        .into_inner()
        .items;
    assert!(pods.is_empty(), "{pods:?}");
    assert!(mounts_under(&fx.daemon.state()).is_empty());
    assert!(
        common::daemon::list_dir(&fx.daemon.state().join("linux/sandboxes")).is_empty(),
        "no sandbox directory left"
    );

    // A plugin that fails after the bridge plugin attached: the error reaches the
    // caller and the bridge plugin's work is undone.
    let bridge = format!("pvb{:06}", unique());
    let conflist = serde_json::json!({
        "cniVersion": "1.0.0", "name": "half", "plugins": [
            {"type": "bridge", "bridge": bridge,
             "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.199.77.0/24"}]], "dataDir": dir.path().join("ipam")}},
            {"type": "tuning", "sysctl": {"net.no.such.sysctl": "1"}}
        ]
    });
    std::fs::write(conf_dir.join("10-broken.conflist"), conflist.to_string()).unwrap();
    let err = runtime
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(fx.pod("half")),
            runtime_handler: String::new(),
        })
        .await
        .unwrap_err();
    assert!(err.message().contains("tuning"), "{err}");
    let ports = std::process::Command::new("ip")
        .args(["-o", "link", "show", "master", &bridge])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&ports.stdout).trim().is_empty(),
        "a veth is left"
    );
    assert!(mounts_under(&fx.daemon.state()).is_empty());
    remove_test_network(&bridge, "none");
}

#[tokio::test]
async fn host_network_pods_skip_the_network() {
    let (network, config) = TestNetwork::new(Kind::Builtin);
    let fx = Fixture::start_with_config(Some(&config)).await;
    let mut pod_config = fx.pod("hostnet");
    pod_config.linux.as_mut().unwrap().security_context = Some(cri::LinuxSandboxSecurityContext {
        namespace_options: Some(cri::NamespaceOption {
            network: cri::NamespaceMode::Node as i32,
            ..Default::default()
        }),
        ..Default::default()
    });
    let pod = fx.run_pod(pod_config).await;
    assert_eq!(pod_ip(&fx, &pod).await, "");
    assert!(network.bridge_ports().is_empty());
    stop_and_remove(&fx, &pod).await;
}
