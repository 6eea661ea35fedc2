//! Services through `podvisor up` and the real `kubectl`: a ClusterIP from the
//! cluster's service range, EndpointSlices and Endpoints following the pods,
//! and the service proxy spreading connections from the host and from pods
//! over the ready endpoints, NodePorts, refusal without endpoints, ClientIP
//! affinity, and no nftables table left once the cluster is gone.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::cluster::Cluster;
use common::oci::{Flavour, TestImage};
use common::push::push_image;
use common::registry::Registry;

const WAIT: Duration = Duration::from_secs(60);

fn objects(image: &str) -> String {
    format!(
        "apiVersion: apps/v1
kind: Deployment
metadata: {{name: web}}
spec:
  replicas: 2
  selector: {{matchLabels: {{app: web}}}}
  template:
    metadata: {{labels: {{app: web}}}}
    spec:
      terminationGracePeriodSeconds: 0
      containers:
      - name: web
        image: {image}
        command: [sh, -c, 'mkdir -p /www && hostname > /www/index.html && exec httpd -f -p 8080 -h /www']
        ports: [{{name: http, containerPort: 8080}}]
        readinessProbe: {{tcpSocket: {{port: http}}, periodSeconds: 1}}
---
apiVersion: v1
kind: Service
metadata: {{name: web}}
spec:
  type: NodePort
  selector: {{app: web}}
  ports: [{{name: http, port: 80, targetPort: http}}]
---
apiVersion: v1
kind: Service
metadata: {{name: sticky}}
spec:
  selector: {{app: web}}
  sessionAffinity: ClientIP
  ports: [{{port: 80, targetPort: 8080}}]
---
apiVersion: v1
kind: Service
metadata: {{name: web-pods}}
spec:
  clusterIP: None
  selector: {{app: web}}
  ports: [{{name: http, port: 8080}}]
---
apiVersion: v1
kind: Service
metadata: {{name: nobody}}
spec:
  selector: {{app: nobody}}
  ports: [{{port: 80, targetPort: 8080}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: client}}
spec:
  terminationGracePeriodSeconds: 0
  containers:
  - name: c
    image: {image}
    command: [sh, -c, 'trap \"exit 0\" TERM; while true; do sleep 1; done']
"
    )
}

/// GET / from the host; the body (the answering pod's name), or why not.
fn get(address: &str) -> Result<String, String> {
    let mut stream = std::net::TcpStream::connect_timeout(&address.parse().unwrap(), Duration::from_secs(3))
        .map_err(|e| e.to_string())?;
    stream.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    stream.write_all(b"GET / HTTP/1.0\r\n\r\n").map_err(|e| e.to_string())?;
    let mut response = String::new();
    stream.read_to_string(&mut response).map_err(|e| e.to_string())?;
    response
        .split("\r\n\r\n")
        .nth(1)
        .map(|b| b.trim().to_string())
        .ok_or_else(|| format!("no body in {response:?}"))
}

/// Answers per pod name over `n` connections.
fn spread(address: &str, n: usize) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for _ in 0..n {
        let body = get(address).unwrap_or_else(|e| panic!("{address}: {e}"));
        *seen.entry(body).or_insert(0) += 1;
    }
    seen
}

#[test]
fn services_spread_connections_over_ready_endpoints() {
    let registry = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let registry = Registry::start().await;
            push_image(
                &registry.url(),
                "test/busybox",
                "latest",
                &TestImage::busybox(),
                Flavour::Oci,
            )
            .await;
            registry
        });
    let image = format!("{}/test/busybox:latest", registry.host());
    // A service range of this test's own: clusters of other tests program theirs.
    let cidr = format!("10.{}.{}.0/24", 200 + std::process::id() % 50, std::process::id() % 250);
    let c = Cluster::start_with(&["--service-cidr", &cidr], "");
    let table = podvisor::cluster::proxy::table_name(&c.data_dir());
    let file = c.file("objects.yaml", &objects(&image));
    c.ok(&["apply", "-f", &file]);
    c.ok(&["rollout", "status", "deployment/web", "--timeout=60s"]);

    let cluster_ip = c.ok(&["get", "svc", "web", "-o", "jsonpath={.spec.clusterIP}"]);
    let net: ipnet::Ipv4Net = cidr.parse().unwrap();
    assert!(
        net.contains(&cluster_ip.parse::<std::net::Ipv4Addr>().unwrap()),
        "{cluster_ip} not in {cidr}"
    );
    let table_out = c.ok(&["get", "svc", "web"]);
    assert!(
        table_out.contains("NodePort") && table_out.contains(&cluster_ip),
        "{table_out}"
    );

    // EndpointSlice and Endpoints list both pods' IPs with the resolved port.
    let slice = c.wait_output(
        &[
            "get",
            "endpointslices",
            "-l",
            "kubernetes.io/service-name=web",
            "-o",
            "jsonpath={.items[0].endpoints[*].addresses[0]} {.items[0].ports[0].port}",
        ],
        WAIT,
        |o| o.split_whitespace().count() == 3,
    );
    assert!(slice.ends_with(" 8080"), "{slice}");
    let endpoints = c.ok(&["get", "endpoints", "web"]);
    assert!(endpoints.contains(":8080"), "{endpoints}");

    // From the host: both pods answer on the ClusterIP.
    let address = format!("{cluster_ip}:80");
    let deadline = Instant::now() + WAIT;
    while get(&address).is_err() {
        assert!(Instant::now() < deadline, "{address} never answered:\n{}", c.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    let seen = spread(&address, 40);
    assert_eq!(seen.len(), 2, "40 connections reached {seen:?}");
    assert!(seen.values().all(|n| *n >= 5), "uneven: {seen:?}");

    // From a pod.
    let request = format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {cluster_ip} 80");
    let out = c.wait_output(&["exec", "client", "--", "sh", "-c", &request], WAIT, |o| {
        o.contains("200 OK")
    });
    assert!(out.contains("web-"), "{out}");

    // Cluster DNS from the pod: the Service's name (full, and through the search path)
    // gives its ClusterIP; unknown cluster names do not resolve.
    let dns_ip = podvisor::cluster::dns::service_ip(&net).to_string();
    let resolv = c.ok(&["exec", "client", "--", "cat", "/etc/resolv.conf"]);
    assert!(
        resolv.contains(&format!("nameserver {dns_ip}")) && resolv.contains("default.svc.cluster.local"),
        "{resolv}"
    );
    // (busybox's nslookup tries every search domain and fails if any does: only its answer counts.)
    for name in ["web.default.svc.cluster.local", "web"] {
        let deadline = Instant::now() + WAIT;
        loop {
            let out = c.kubectl(&["exec", "client", "--", "busybox", "nslookup", name]);
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            if text.contains(&format!("Address: {cluster_ip}")) {
                break;
            }
            assert!(Instant::now() < deadline, "{name}: {text}");
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    let out = c.kubectl(&[
        "exec",
        "client",
        "--",
        "busybox",
        "nslookup",
        "nothere.default.svc.cluster.local",
    ]);
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("Address: 10."),
        "{out:?}"
    );

    // Services created before the pod are in its environment, as kubelet sets them.
    let env = c.ok(&["exec", "client", "--", "env"]);
    for var in [
        format!("WEB_SERVICE_HOST={cluster_ip}"),
        "WEB_SERVICE_PORT_HTTP=80".to_string(),
        format!("WEB_PORT_80_TCP=tcp://{cluster_ip}:80"),
        "KUBERNETES_SERVICE_PORT=443".to_string(),
    ] {
        assert!(env.lines().any(|l| l == var), "{var} not in\n{env}");
    }
    assert!(
        !env.contains("WEB_PODS_SERVICE_HOST"),
        "a headless Service has no variables"
    );

    // SRV for named ports, from a pod.
    let out = c.ok(&[
        "exec",
        "client",
        "--",
        "busybox",
        "nslookup",
        "-type=srv",
        "_http._tcp.web.default.svc.cluster.local",
    ]);
    assert!(out.contains("0 100 80 web.default.svc.cluster.local"), "{out}");

    // From the host through the kube-dns Service, over UDP and TCP: A, SRV, headless Services' pods.
    let dig = |args: &[&str]| {
        let out = std::process::Command::new("dig")
            .args(["+short", "+time=3", "+tries=2", &format!("@{dns_ip}")])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "dig {args:?}: {out:?}");
        let mut lines: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(String::from).collect();
        lines.sort();
        lines
    };
    assert_eq!(dig(&["web.default.svc.cluster.local"]), [cluster_ip.as_str()]);
    assert_eq!(dig(&["+tcp", "web.default.svc.cluster.local"]), [cluster_ip.as_str()]);
    assert_eq!(
        dig(&["+tcp", "SRV", "_http._tcp.web.default.svc.cluster.local"]),
        ["0 100 80 web.default.svc.cluster.local."]
    );
    let pod_ips = c.ok(&[
        "get",
        "pods",
        "-l",
        "app=web",
        "-o",
        "jsonpath={.items[*].status.podIP}",
    ]);
    let mut pod_ips: Vec<String> = pod_ips.split_whitespace().map(String::from).collect();
    pod_ips.sort();
    assert_eq!(dig(&["web-pods.default.svc.cluster.local"]), pod_ips);
    let srv = dig(&["SRV", "_http._tcp.web-pods.default.svc.cluster.local"]);
    let mut expected: Vec<String> = pod_ips
        .iter()
        .map(|ip| {
            format!(
                "0 100 8080 {}.web-pods.default.svc.cluster.local.",
                ip.replace('.', "-")
            )
        })
        .collect();
    expected.sort();
    assert_eq!(srv, expected);
    let first = pod_ips[0].replace('.', "-");
    assert_eq!(
        dig(&[&format!("{first}.web-pods.default.svc.cluster.local")]),
        [pod_ips[0].clone()]
    );
    assert_eq!(
        dig(&[&format!("{first}.default.pod.cluster.local")]),
        [pod_ips[0].clone()]
    );
    assert_eq!(dig(&["-x", &cluster_ip]), ["web.default.svc.cluster.local."]);
    assert_eq!(
        dig(&["-x", &pod_ips[0]]),
        [format!("{first}.web-pods.default.svc.cluster.local.")]
    );
    let status = |args: &[&str]| {
        let out = std::process::Command::new("dig")
            .args(["+time=3", "+tries=2", &format!("@{dns_ip}")])
            .args(args)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.split("status: ")
            .nth(1)
            .and_then(|s| s.split(',').next())
            .unwrap_or(&text)
            .to_string()
    };
    assert_eq!(status(&["nothere.default.svc.cluster.local"]), "NXDOMAIN");
    assert_eq!(status(&["AAAA", "web.default.svc.cluster.local"]), "NOERROR");

    // The `kubernetes` Service leads to the API server.
    let api = c.ok(&["get", "svc", "kubernetes", "-o", "jsonpath={.spec.clusterIP}"]);
    let endpoints = c.ok(&[
        "get",
        "endpoints",
        "kubernetes",
        "-o",
        "jsonpath={.subsets[0].ports[0].port}",
    ]);
    assert_eq!(endpoints, c.url.rsplit(':').next().unwrap().trim_end_matches('/'));
    let version = c.ok(&[
        "--server",
        &format!("https://{api}:443"),
        "--tls-server-name",
        "kubernetes",
        "get",
        "--raw",
        "/version",
    ]);
    assert!(version.contains("gitVersion"), "{version}");

    // The NodePort on the node's address.
    let node_port = c.ok(&["get", "svc", "web", "-o", "jsonpath={.spec.ports[0].nodePort}"]);
    let node_ip = podvisor::cluster::agent::primary_ipv4();
    let seen = spread(&format!("{node_ip}:{node_port}"), 10);
    assert!(!seen.is_empty(), "{seen:?}");

    // ClientIP affinity: one client, one pod.
    let sticky = c.ok(&["get", "svc", "sticky", "-o", "jsonpath={.spec.clusterIP}"]);
    let seen = spread(&format!("{sticky}:80"), 10);
    assert_eq!(seen.len(), 1, "{seen:?}");

    // No ready endpoint: refused at once.
    let nobody = c.ok(&["get", "svc", "nobody", "-o", "jsonpath={.spec.clusterIP}"]);
    let refused =
        std::net::TcpStream::connect_timeout(&format!("{nobody}:80").parse().unwrap(), Duration::from_secs(3))
            .expect_err("a service without endpoints answered");
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused, "{refused}");

    // Endpoints follow the pods: scaled to one, one pod answers.
    c.ok(&["scale", "deployment/web", "--replicas=1"]);
    c.wait_output(
        &[
            "get",
            "endpoints",
            "web",
            "-o",
            "jsonpath={.subsets[0].addresses[*].ip}",
        ],
        WAIT,
        |o| o.split_whitespace().count() == 1,
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(spread(&address, 10).len(), 1);

    // Addresses are checked; the ClusterIP cannot change.
    let out = c.fails(&[
        "create",
        "service",
        "clusterip",
        "outside",
        "--tcp=80:80",
        "--clusterip=192.0.2.1",
    ]);
    assert!(out.contains("not in the valid range"), "{out}");
    let out = c.fails(&[
        "patch",
        "svc",
        "web",
        "-p",
        &format!("{{\"spec\":{{\"clusterIP\":\"{}\"}}}}", net.hosts().last().unwrap()),
    ]);
    assert!(out.contains("immutable"), "{out}");

    // Deleting the Service takes its EndpointSlice along.
    c.ok(&["delete", "svc", "web"]);
    c.wait_output(
        &[
            "get",
            "endpointslices",
            "-l",
            "kubernetes.io/service-name=web",
            "-o",
            "name",
        ],
        WAIT,
        |o| o.trim().is_empty(),
    );
    drop(c);
    let tables = String::from_utf8_lossy(
        &std::process::Command::new("nft")
            .args(["list", "tables"])
            .output()
            .unwrap()
            .stdout,
    )
    .into_owned();
    assert!(!tables.contains(&table), "{table} left behind: {tables}");
}
