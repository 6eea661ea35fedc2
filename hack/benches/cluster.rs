//! Mini-cluster benchmark: `podvisor up` (background mode) until it returns
//! and until the API answers, until a node is Ready (when a node agent
//! registers one), the idle RSS of the whole process tree, and the latency
//! from creating a pod to it being bound (and Running, with a node agent).
//! Without a node agent a fake Node is created so that pods can be bound.
//! With one: a 10-replica Deployment and its rollout, and the service proxy
//! against direct pod access (per-connection latency, connections per second,
//! bulk throughput). Then `up --nodes 3`: readiness, idle RSS and failover.
//! Run with `hack/bench-cluster`.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::daemon::{remove_test_network, test_network_config_for_nodes};
use common::oci::{Flavour, TestImage};
use common::push::push_image;
use common::registry::Registry;
use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::WatchEvent;
use podvisor::cluster::client::{Client, ListParams, WatchStream};
use serde_json::json;

/// How long to wait for a node agent to register its node before going on without one.
const NODE_APPEARS_WITHIN: Duration = Duration::from_secs(5);
const FAKE_NODE: &str = "bench-fake-node";

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    samples[((samples.len() as f64 - 1.0) * p).round() as usize]
}

fn report(what: &str, samples: &mut [Duration]) {
    let p50 = percentile(samples, 0.50);
    let p95 = percentile(samples, 0.95);
    println!(
        "{what:<40} p50 {:>8.2} ms   p95 {:>8.2} ms   (n={})",
        p50.as_secs_f64() * 1000.0,
        p95.as_secs_f64() * 1000.0,
        samples.len()
    );
}

fn once(what: &str, took: Duration) {
    println!("{what:<40} {:>12.2} ms", took.as_secs_f64() * 1000.0);
}

fn status_field(pid: i32, field: &str) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .map(|v| v.trim().to_string())
}

/// RSS of `root` and every process below it, in KiB, and how many processes that is.
fn tree_rss_kib(root: i32) -> (u64, usize) {
    let mut tree = vec![root];
    let mut grew = true;
    let all: Vec<(i32, i32)> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let ppid: i32 = status_field(pid, "PPid:")?.parse().ok()?;
            Some((pid, ppid))
        })
        .collect();
    while grew {
        grew = false;
        for (pid, ppid) in &all {
            if tree.contains(ppid) && !tree.contains(pid) {
                tree.push(*pid);
                grew = true;
            }
        }
    }
    let kib = tree
        .iter()
        .filter_map(|pid| status_field(*pid, "VmRSS:"))
        .filter_map(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    (kib, tree.len())
}

struct Up {
    dir: tempfile::TempDir,
    network: (String, String),
}

impl Up {
    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("cluster")
    }

    fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    fn kubectl(&self, args: &[&str]) -> std::process::Output {
        Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(self.kubeconfig())
            .arg("--cache-dir")
            .arg(self.dir.path().join("kubectl-cache"))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run kubectl")
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = Command::new(env!("CARGO_BIN_EXE_podvisor"))
            .arg("down")
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(["--timeout", "60"])
            .stdout(Stdio::null())
            .status();
        remove_test_network(&self.network.0, &self.network.1);
        // The extra nodes' networks (`--nodes`), named in their configs.
        for entry in std::fs::read_dir(self.data_dir().join("nodes"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let text = std::fs::read_to_string(entry.path().join("config.toml")).unwrap_or_default();
            let value = |key: &str| {
                text.lines()
                    .find_map(|l| l.trim().strip_prefix(key)?.trim().strip_prefix('='))
                    .map(|v| v.trim().trim_matches('"').to_string())
                    .unwrap_or_default()
            };
            remove_test_network(&value("bridge"), &value("nat_name"));
        }
    }
}

/// `podvisor up` in the background, on a free port, in a temporary directory.
fn start_up(nodes: u32, extra_args: &[&str]) -> (Up, Duration) {
    let dir = tempfile::Builder::new()
        .prefix("podvisor-bench-")
        .tempdir()
        .expect("tempdir");
    let (network, bridge, nat) = test_network_config_for_nodes(nodes);
    std::fs::write(dir.path().join("config.toml"), network).unwrap();
    let up = Up {
        dir,
        network: (bridge, nat),
    };
    let path = |p: &str| up.dir.path().join(p);
    let address = format!("127.0.0.1:{}", common::free_port());
    let started = Instant::now();
    let status = Command::new(env!("CARGO_BIN_EXE_podvisor"))
        .arg("up")
        .arg("--data-dir")
        .arg(up.data_dir())
        .arg("--kubeconfig")
        .arg(up.kubeconfig())
        .args(["--api-address", &address])
        .arg("--listen")
        .arg(format!("unix://{}", path("cri.sock").display()))
        .arg("--root")
        .arg(path("root"))
        .arg("--state")
        .arg(path("state"))
        .arg("--config")
        .arg(path("config.toml"))
        .args(["--nodes", &nodes.to_string()])
        .args(extra_args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .status()
        .expect("run podvisor up");
    let took = started.elapsed();
    assert!(
        status.success(),
        "podvisor up failed; see {}/up.log",
        up.data_dir().display()
    );
    (up, took)
}

fn up_pid(data_dir: &Path) -> i32 {
    std::fs::read_to_string(data_dir.join("up.pid"))
        .expect("up.pid")
        .trim()
        .parse()
        .expect("a pid")
}

fn is_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Waits for a Ready node registered by a node agent; None when none shows up.
async fn wait_for_agent_node(client: &Client) -> Option<String> {
    let deadline = Instant::now() + NODE_APPEARS_WITHIN;
    let mut ready_deadline = None;
    loop {
        let nodes = client
            .list::<Node>(None, &ListParams::default())
            .await
            .expect("list nodes")
            .items;
        if let Some(node) = nodes.iter().find(|n| is_ready(n)) {
            return node.metadata.name.clone();
        }
        if !nodes.is_empty() && ready_deadline.is_none() {
            ready_deadline = Some(Instant::now() + Duration::from_secs(60));
        }
        if Instant::now() > ready_deadline.unwrap_or(deadline) {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn create_fake_node(client: &Client) {
    let node: Node = serde_json::from_value(json!({
        "metadata": {"name": FAKE_NODE},
        "status": {
            "allocatable": {"cpu": "64", "memory": "256Gi", "pods": "1000"},
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}],
        },
    }))
    .unwrap();
    client.create(None, &node).await.expect("create the fake node");
}

fn pod(name: &str, image: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "terminationGracePeriodSeconds": 0,
            "containers": [{"name": "c", "image": image, "command": ["/bin/busybox", "sleep", "3600"]}],
        },
    }))
    .unwrap()
}

/// Reads the watch until `name` satisfies `done`.
async fn wait_pod(events: &mut WatchStream<Pod>, name: &str, done: impl Fn(&Pod) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let event = tokio::time::timeout_at(deadline, events.next())
            .await
            .unwrap_or_else(|_| panic!("pod {name} did not get there in 120 s"))
            .expect("the watch ended")
            .expect("a watch event");
        if let WatchEvent::Added(pod) | WatchEvent::Modified(pod) = event
            && pod.metadata.name.as_deref() == Some(name)
            && done(&pod)
        {
            return;
        }
    }
}

fn bound(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        .is_some_and(|n| !n.is_empty())
}

fn running(pod: &Pod) -> bool {
    pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
}

#[tokio::main]
async fn main() {
    let iterations: usize = std::env::var("BENCH_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let (up, up_took) = start_up(1, &[]);
    let started = Instant::now() - up_took;
    once("podvisor up (returns)", up_took);
    let client = Client::from_kubeconfig(&up.kubeconfig()).expect("kubeconfig");
    while client.list::<Namespace>(None, &ListParams::default()).await.is_err() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    once("podvisor up → API answering", started.elapsed());
    let agent_node = wait_for_agent_node(&client).await;
    match &agent_node {
        Some(name) => once(&format!("podvisor up → node {name} Ready"), started.elapsed()),
        None => println!("{:<40} {:>12}", "podvisor up → node Ready", "no node"),
    }

    tokio::time::sleep(Duration::from_secs(5)).await;
    let (kib, processes) = tree_rss_kib(up_pid(&up.data_dir()));
    println!(
        "{:<40} {kib:>9} KiB   ({processes} processes)",
        "idle RSS, whole tree, after 5 s"
    );

    // Pods: bound (always) and Running (with a node agent, from a local registry).
    let registry;
    let image = match &agent_node {
        Some(_) => {
            registry = Registry::start().await;
            push_image(
                &registry.url(),
                "bench/busybox",
                "v1",
                &TestImage::busybox(),
                Flavour::Oci,
            )
            .await;
            format!("{}/bench/busybox:v1", registry.host())
        }
        None => {
            create_fake_node(&client).await;
            "example.invalid/never-pulled:1".to_string()
        }
    };
    let list = client
        .list::<Pod>(Some("default"), &ListParams::default())
        .await
        .expect("list pods");
    let mut events = client
        .watch::<Pod>(Some("default"), &ListParams::default(), &list.resource_version, 600)
        .await
        .expect("watch pods");
    let rounds = if agent_node.is_some() {
        iterations.div_ceil(3)
    } else {
        iterations
    };
    let (mut to_bound, mut to_running) = (Vec::new(), Vec::new());
    for i in 0..rounds {
        let name = format!("bench-{i}");
        let created = Instant::now();
        client
            .create(Some("default"), &pod(&name, &image))
            .await
            .expect("create pod");
        wait_pod(&mut events, &name, bound).await;
        to_bound.push(created.elapsed());
        if agent_node.is_some() {
            wait_pod(&mut events, &name, running).await;
            to_running.push(created.elapsed());
        }
        client
            .delete::<Pod>(Some("default"), &name, Some(0))
            .await
            .expect("delete pod");
    }
    report("create pod → bound (API client)", &mut to_bound);
    if agent_node.is_some() {
        report("create pod → Running (API client)", &mut to_running);
    }

    let (mut applied, mut applied_running) = (Vec::new(), Vec::new());
    for i in 0..iterations.div_ceil(3) {
        let name = format!("applied-{i}");
        let file = up.dir.path().join(format!("{name}.json"));
        std::fs::write(&file, serde_json::to_vec(&pod(&name, &image)).unwrap()).unwrap();
        let started = Instant::now();
        let out = up.kubectl(&["apply", "-f", file.to_str().unwrap()]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        wait_pod(&mut events, &name, bound).await;
        applied.push(started.elapsed());
        if agent_node.is_some() {
            wait_pod(&mut events, &name, running).await;
            applied_running.push(started.elapsed());
        }
        client
            .delete::<Pod>(Some("default"), &name, Some(0))
            .await
            .expect("delete pod");
    }
    report("kubectl apply → bound", &mut applied);
    if agent_node.is_some() {
        report("kubectl apply → Running", &mut applied_running);
        deployments(&client, &image).await;
        service_proxy(&client, &image).await;
    }
    drop(up);
    several_nodes().await;
}

fn deployment_status(d: &Deployment) -> (i64, i32, i32, i32) {
    let status = d.status.clone().unwrap_or_default();
    (
        status.observed_generation.unwrap_or(0),
        status.updated_replicas.unwrap_or(0),
        status.available_replicas.unwrap_or(0),
        status.replicas.unwrap_or(0),
    )
}

/// Polls the Deployment until `generation` is observed with every replica updated and available.
async fn wait_rolled_out(client: &Client, name: &str, generation: i64, replicas: i32) {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let d: Deployment = client.get(Some("default"), name).await.expect("deployment");
        let (observed, updated, available, total) = deployment_status(&d);
        if observed >= generation && updated == replicas && available == replicas && total == replicas {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "deployment {name} not rolled out: {:?}",
            d.status
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A 10-replica Deployment: create → all available, then a rollout of all 10.
async fn deployments(client: &Client, image: &str) {
    let template = |marker: &str| {
        json!({
            "metadata": {"labels": {"app": "bench"}},
            "spec": {
                "terminationGracePeriodSeconds": 0,
                "containers": [{"name": "c", "image": image, "command": ["/bin/busybox", "sleep", "3600"],
                                "env": [{"name": "ROUND", "value": marker}]}],
            },
        })
    };
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "bench"},
        "spec": {"replicas": 10, "selector": {"matchLabels": {"app": "bench"}}, "template": template("1")},
    }))
    .unwrap();
    let started = Instant::now();
    client
        .create(Some("default"), &deployment)
        .await
        .expect("create deployment");
    wait_rolled_out(client, "bench", 1, 10).await;
    once("Deployment of 10 → all available", started.elapsed());
    let started = Instant::now();
    let patched: Deployment = client
        .merge_patch(
            Some("default"),
            "bench",
            None,
            &json!({"spec": {"template": template("2")}}),
        )
        .await
        .expect("patch deployment");
    wait_rolled_out(client, "bench", patched.metadata.generation.unwrap_or(2), 10).await;
    once("rollout of 10 (25% surge/unavailable)", started.elapsed());
    client
        .delete::<Deployment>(Some("default"), "bench", Some(0))
        .await
        .expect("delete deployment");
}

/// `podvisor up --nodes 3`: time to three Ready nodes, idle RSS of the whole
/// tree, and failover: a node's process killed → its pod marked for eviction.
async fn several_nodes() {
    let grace = [
        "--node-lease-duration-seconds",
        "4",
        "--node-monitor-grace-period",
        "5s",
        "--pod-eviction-timeout",
        "5s",
    ];
    let (up, up_took) = start_up(3, &grace);
    let started = Instant::now() - up_took;
    let client = Client::from_kubeconfig(&up.kubeconfig()).expect("kubeconfig");
    loop {
        let ready = client
            .list::<Node>(None, &ListParams::default())
            .await
            .map(|l| l.items.iter().filter(|n| is_ready(n)).count())
            .unwrap_or(0);
        if ready == 3 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "3 nodes not Ready in 120 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    once("up --nodes 3 → 3 nodes Ready", started.elapsed());
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (kib, processes) = tree_rss_kib(up_pid(&up.data_dir()));
    println!(
        "{:<40} {kib:>9} KiB   ({processes} processes)",
        "idle RSS, 3 nodes, whole tree"
    );

    // Failover: a pod pinned to the third node; the node's process dies.
    let nodes = client
        .list::<Node>(None, &ListParams::default())
        .await
        .expect("nodes")
        .items;
    let victim = nodes
        .iter()
        .filter_map(|n| n.metadata.name.clone())
        .find(|n| n.ends_with("-3"))
        .expect("a third node");
    let mut pinned = pod("pinned", "example.invalid/never-pulled:1");
    pinned.spec.as_mut().unwrap().node_name = Some(victim.clone());
    client.create(Some("default"), &pinned).await.expect("create pod");
    let pid: i32 = std::fs::read_to_string(up.data_dir().join("nodes").join(&victim).join("up.pid"))
        .expect("node pid")
        .trim()
        .parse()
        .expect("a pid");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).expect("kill node");
    let died = Instant::now();
    let (mut not_ready, mut evicted) = (None, None);
    while evicted.is_none() {
        assert!(died.elapsed() < Duration::from_secs(120), "no failover in 120 s");
        if not_ready.is_none() {
            let node: Node = client.get(None, &victim).await.expect("node");
            if !is_ready(&node) {
                not_ready = Some(died.elapsed());
            }
        }
        let pod: Pod = client.get(Some("default"), "pinned").await.expect("pod");
        if pod.metadata.deletion_timestamp.is_some() {
            evicted = Some(died.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    once("node killed → NotReady (grace 5 s)", not_ready.unwrap_or_default());
    once("node killed → pod evicted (+5 s)", evicted.unwrap());
}

/// One HTTP/1.0 GET on a new connection; the bytes received.
async fn http_get(address: std::net::SocketAddr, path: &str) -> usize {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await.expect("connect");
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .await
        .expect("request");
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0;
    loop {
        match stream.read(&mut buf).await.expect("response") {
            0 => return total,
            n => total += n,
        }
    }
}

/// Requests per second with `clients` connections at a time for `window`.
async fn connections_per_second(address: std::net::SocketAddr, clients: usize, window: Duration) -> f64 {
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            tokio::spawn(async move {
                let mut done = 0u64;
                while started.elapsed() < window {
                    http_get(address, "/index.html").await;
                    done += 1;
                }
                done
            })
        })
        .collect();
    let mut total = 0;
    for task in tasks {
        total += task.await.expect("client");
    }
    total as f64 / started.elapsed().as_secs_f64()
}

/// The service proxy against direct access to a pod: a 2-replica web
/// Deployment behind a ClusterIP Service, measured from the host.
async fn service_proxy(client: &Client, image: &str) {
    let script = "mkdir -p /www && echo ok > /www/index.html && \
                  dd if=/dev/zero of=/www/big bs=1M count=64 2>/dev/null && exec httpd -f -p 8080 -h /www";
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}}, "template": {
            "metadata": {"labels": {"app": "web"}},
            "spec": {"terminationGracePeriodSeconds": 0, "containers": [{
                "name": "web", "image": image, "command": ["sh", "-c", script],
                "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1}}]}}},
    }))
    .unwrap();
    client
        .create(Some("default"), &deployment)
        .await
        .expect("create deployment");
    let service: Service = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]},
    }))
    .unwrap();
    let service = client.create(Some("default"), &service).await.expect("create service");
    wait_rolled_out(client, "web", 1, 2).await;
    let cluster_ip = service.spec.and_then(|s| s.cluster_ip).expect("a ClusterIP");
    let via_service: std::net::SocketAddr = format!("{cluster_ip}:80").parse().unwrap();
    let pods = client
        .list::<Pod>(Some("default"), &ListParams::default())
        .await
        .expect("pods")
        .items;
    let pod_ip = pods
        .iter()
        .filter(|p| {
            p.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("app"))
                .map(String::as_str)
                == Some("web")
        })
        .find_map(|p| p.status.as_ref()?.pod_ip.clone())
        .expect("a web pod's IP");
    let direct: std::net::SocketAddr = format!("{pod_ip}:8080").parse().unwrap();
    // Both endpoints programmed: every connection to the Service answers.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut answered = 0;
    while answered < 20 {
        let ok = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(via_service))
            .await
            .is_ok_and(|c| c.is_ok());
        answered = if ok { answered + 1 } else { 0 };
        assert!(Instant::now() < deadline, "{via_service} does not answer");
    }

    for (label, address) in [("pod IP", direct), ("Service IP", via_service)] {
        for _ in 0..20 {
            http_get(address, "/index.html").await;
        }
        let mut latencies = Vec::new();
        for _ in 0..300 {
            let started = Instant::now();
            assert!(http_get(address, "/index.html").await > 0);
            latencies.push(started.elapsed());
        }
        report(&format!("GET on a new connection, {label}"), &mut latencies);
    }
    for (label, address) in [("pod IP", direct), ("Service IP", via_service)] {
        let rate = connections_per_second(address, 4, Duration::from_secs(3)).await;
        println!(
            "{:<40} {rate:>9.0} req/s   (4 clients, new connection each)",
            format!("requests, {label}")
        );
    }
    for (label, address) in [("pod IP", direct), ("Service IP", via_service)] {
        let mut best = 0.0f64;
        for _ in 0..3 {
            let started = Instant::now();
            let bytes = http_get(address, "/big").await;
            assert!(bytes >= 64 << 20, "short download: {bytes}");
            best = best.max(bytes as f64 / started.elapsed().as_secs_f64() / (1 << 20) as f64);
        }
        println!(
            "{:<40} {best:>9.0} MiB/s (64 MiB, best of 3)",
            format!("bulk download, {label}")
        );
    }
    // Cluster DNS: a Service name over UDP through the kube-dns Service.
    let dns: Service = client.get(Some("kube-system"), "kube-dns").await.expect("kube-dns");
    let dns_ip = dns.spec.and_then(|s| s.cluster_ip).expect("kube-dns ClusterIP");
    let socket = tokio::net::UdpSocket::bind("0.0.0.0:0").await.unwrap();
    socket.connect(format!("{dns_ip}:53")).await.unwrap();
    let mut query = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in "web.default.svc.cluster.local".split('.') {
        query.push(label.len() as u8);
        query.extend_from_slice(label.as_bytes());
    }
    query.extend_from_slice(&[0, 0, 1, 0, 1]);
    let mut latencies = Vec::new();
    let mut answer = [0u8; 512];
    for i in 0..320 {
        let started = Instant::now();
        socket.send(&query).await.unwrap();
        let n = tokio::time::timeout(Duration::from_secs(2), socket.recv(&mut answer))
            .await
            .expect("a DNS answer")
            .unwrap();
        assert!(n > query.len() && answer[7] == 1, "no A record");
        if i >= 20 {
            latencies.push(started.elapsed());
        }
    }
    report("DNS A query (UDP, via kube-dns)", &mut latencies);

    client
        .delete::<Service>(Some("default"), "web", Some(0))
        .await
        .expect("delete service");
    client
        .delete::<Deployment>(Some("default"), "web", Some(0))
        .await
        .expect("delete deployment");
}
