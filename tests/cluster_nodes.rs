//! `podvisor up --nodes 3`: three nodes on this machine (the cluster process
//! and two `podvisor join` processes, each with its own CRI daemon and pod
//! network), driven by the real `kubectl`: pods spread over the nodes, logs
//! and exec reach a joined node's agent, pods reach each other across nodes
//! by pod IP, and a node that dies has its pods evicted and replaced elsewhere.

mod common;

use std::time::{Duration, Instant};

use common::cluster::Cluster;
use common::oci::{Flavour, TestImage};
use common::push::push_image;
use common::registry::Registry;

const WAIT: Duration = Duration::from_secs(60);

fn deployment(image: &str) -> String {
    format!(
        "apiVersion: apps/v1
kind: Deployment
metadata: {{name: web}}
spec:
  replicas: 3
  selector: {{matchLabels: {{app: web}}}}
  template:
    metadata: {{labels: {{app: web}}}}
    spec:
      terminationGracePeriodSeconds: 0
      containers:
      - name: web
        image: {image}
        command: [sh, -c, 'mkdir -p /www/cgi-bin && hostname > /www/index.html && printf ''#!/bin/sh\\necho\\necho $REMOTE_ADDR\\n'' > /www/cgi-bin/peer && chmod +x /www/cgi-bin/peer && echo serving $(hostname) && exec httpd -f -p 8080 -h /www']
        resources: {{requests: {{cpu: 100m}}}}
---
apiVersion: v1
kind: Service
metadata: {{name: web}}
spec:
  selector: {{app: web}}
  ports: [{{port: 80, targetPort: 8080}}]
"
    )
}

/// GET / from the host on a new connection: the answering pod's name, or why not.
fn get(address: &str) -> Result<String, String> {
    use std::io::{Read, Write};
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

fn http_from(c: &Cluster, pod: &str, ip: &str) -> String {
    http_get_from(c, pod, ip, "/")
}

/// GET `path` on port 8080 of `ip`, from inside `pod`.
fn http_get_from(c: &Cluster, pod: &str, ip: &str, path: &str) -> String {
    let request = format!("printf 'GET {path} HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {ip} 8080");
    let deadline = Instant::now() + WAIT;
    loop {
        let out = c.kubectl(&["exec", pod, "--", "sh", "-c", &request]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() && text.contains("200 OK") {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{pod} never got an answer from {ip}: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn three_nodes_spread_talk_and_fail_over() {
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
    let cidr = format!("10.{}.{}.0/24", 150 + std::process::id() % 50, std::process::id() % 250);
    // The extra nodes' links to the host, also this test's own.
    let links = format!("10.87.{}.0/28", std::process::id() % 250);
    let c = Cluster::start_with(
        &[
            "--service-cidr",
            &cidr,
            "--node-link-cidr",
            &links,
            "--nodes",
            "3",
            "--node-name",
            "alpha",
            "--node-lease-duration-seconds",
            "2",
            "--node-monitor-grace-period",
            "5s",
            "--pod-eviction-timeout",
            "2s",
        ],
        "",
    );
    let ready = "jsonpath={range .items[*]}{.metadata.name}={.status.conditions[?(@.type==\"Ready\")].status} {end}";
    let nodes = c.wait_output(&["get", "nodes", "-o", ready], WAIT, |o| {
        o.split_whitespace().filter(|n| n.ends_with("=True")).count() == 3
    });
    assert_eq!(nodes.trim(), "alpha=True alpha-2=True alpha-3=True");

    // Each extra node has a network namespace of its own: its address is its end of
    // the link to the host, and its pod bridge is in there, not on the host.
    let address =
        "jsonpath={range .items[*]}{.metadata.name}={.status.addresses[?(@.type==\"InternalIP\")].address} {end}";
    let addresses = c.ok(&["get", "nodes", "-o", address]);
    let link_base = links.trim_end_matches(".0/28");
    let (ip2, ip3) = (format!("{link_base}.2"), format!("{link_base}.6"));
    assert!(
        addresses.contains(&format!("alpha-2={ip2} ")) && addresses.contains(&format!("alpha-3={ip3} ")),
        "{addresses}"
    );
    let nodes_dir = c.data_dir().join("nodes");
    let node_file = |node: &str, file: &str| std::fs::read_to_string(nodes_dir.join(node).join(file)).unwrap();
    let netns2 = node_file("alpha-2", "network")
        .lines()
        .next()
        .unwrap()
        .strip_prefix("netns ")
        .unwrap()
        .to_string();
    let bridge2 = node_file("alpha-2", "config.toml")
        .lines()
        .find_map(|l| {
            Some(
                l.trim()
                    .strip_prefix("bridge")?
                    .trim()
                    .strip_prefix('=')?
                    .trim()
                    .trim_matches('"')
                    .to_string(),
            )
        })
        .unwrap();
    let in_netns = std::process::Command::new("ip")
        .args(["-n", &netns2, "-o", "link", "show", "type", "bridge"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&in_netns.stdout).contains(&bridge2));
    assert!(!std::path::Path::new("/sys/class/net").join(&bridge2).exists());

    // So the same hostPort serves on two nodes, each at its own address.
    for node in ["alpha-2", "alpha-3"] {
        let pod = format!(
            "apiVersion: v1
kind: Pod
metadata: {{name: hp-{node}}}
spec:
  nodeName: {node}
  terminationGracePeriodSeconds: 0
  containers:
  - name: web
    image: {image}
    command: [sh, -c, 'mkdir -p /www && hostname > /www/index.html && exec httpd -f -p 8080 -h /www']
    ports: [{{containerPort: 8080, hostPort: 18080}}]
"
        );
        c.ok(&["apply", "-f", &c.file(&format!("hp-{node}.yaml"), &pod)]);
    }
    // A hostNetwork pod lives in its node's namespace: it listens at the node's address.
    let host_network = format!(
        "apiVersion: v1
kind: Pod
metadata: {{name: hn-alpha-3}}
spec:
  nodeName: alpha-3
  hostNetwork: true
  terminationGracePeriodSeconds: 0
  containers:
  - name: web
    image: {image}
    command: [sh, -c, 'mkdir -p /www && echo hn-alpha-3 > /www/index.html && exec httpd -f -p 18081 -h /www']
"
    );
    c.ok(&["apply", "-f", &c.file("hn.yaml", &host_network)]);
    for (node, ip) in [("alpha-2", &ip2), ("alpha-3", &ip3)] {
        let deadline = Instant::now() + WAIT;
        loop {
            match get(&format!("{ip}:18080")) {
                Ok(name) if name == format!("hp-{node}") => break,
                other => assert!(Instant::now() < deadline, "{ip}:18080: {other:?}"),
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let deadline = Instant::now() + WAIT;
    loop {
        match get(&format!("{ip3}:18081")) {
            Ok(body) if body == "hn-alpha-3" => break,
            other => assert!(Instant::now() < deadline, "{ip3}:18081: {other:?}"),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        c.ok(&["get", "pod", "hn-alpha-3", "-o", "jsonpath={.status.podIP}"]),
        ip3
    );
    c.ok(&["delete", "pod", "hp-alpha-2", "hp-alpha-3", "hn-alpha-3"]);

    // Spread: equal requests on equal nodes put one replica on each (the pods
    // above are gone: deletion waited for them).
    let file = c.file("web.yaml", &deployment(&image));
    c.ok(&["apply", "-f", &file]);
    let placement = "jsonpath={range .items[*]}{.metadata.name}:{.spec.nodeName}:{.status.podIP}:{.status.phase} {end}";
    let out = c.wait_output(&["get", "pods", "-o", placement], WAIT, |o| {
        o.split_whitespace().filter(|p| p.ends_with(":Running")).count() == 3
    });
    let pods: Vec<(String, String, String)> = out
        .split_whitespace()
        .map(|p| {
            let parts: Vec<&str> = p.split(':').collect();
            (parts[0].into(), parts[1].into(), parts[2].into())
        })
        .collect();
    let mut on: Vec<&str> = pods.iter().map(|(_, node, _)| node.as_str()).collect();
    on.sort();
    assert_eq!(on, ["alpha", "alpha-2", "alpha-3"], "{out}");
    let on_node = |node: &str| pods.iter().find(|(_, n, _)| n == node).unwrap().clone();
    let (second, _, second_ip) = on_node("alpha-2");
    let (third, _, third_ip) = on_node("alpha-3");
    let (first, _, first_ip) = on_node("alpha");
    // Different nodes, different pod subnets.
    assert_ne!(
        first_ip.rsplit_once('.').unwrap().0,
        second_ip.rsplit_once('.').unwrap().0
    );

    // A joined node's agent serves logs and exec through the API server.
    c.wait_output(&["logs", &second], WAIT, |l| l.contains(&format!("serving {second}")));
    assert_eq!(c.ok(&["exec", &second, "--", "hostname"]).trim(), second);

    // Pods reach each other across nodes by pod IP.
    assert!(http_from(&c, &third, &second_ip).contains(&second));
    assert!(http_from(&c, &first, &third_ip).contains(&third));
    // ... with their own addresses (no masquerading between nodes' pod subnets);
    // busybox httpd shows the peer as `[::ffff:a.b.c.d]`.
    let peer = http_get_from(&c, &third, &second_ip, "/cgi-bin/peer");
    assert!(peer.contains(&format!(":{third_ip}]")), "{peer}");
    let peer = http_get_from(&c, &first, &third_ip, "/cgi-bin/peer");
    assert!(peer.contains(&format!(":{first_ip}]")), "{peer}");

    // The Service spreads over the three nodes' pods.
    let service = format!(
        "{}:80",
        c.ok(&["get", "svc", "web", "-o", "jsonpath={.spec.clusterIP}"])
    );
    let mut seen = std::collections::BTreeSet::new();
    let deadline = Instant::now() + WAIT;
    while seen.len() < 3 {
        if let Ok(name) = get(&service) {
            seen.insert(name);
        }
        assert!(Instant::now() < deadline, "{service} reached only {seen:?}");
    }
    // From a pod on an extra node (its own namespace and proxy): the cluster DNS
    // names the Service, and the Service's IP answers.
    let cluster_ip = service.trim_end_matches(":80");
    let deadline = Instant::now() + WAIT;
    loop {
        let out = c.kubectl(&[
            "exec",
            &third,
            "--",
            "busybox",
            "nslookup",
            "web.default.svc.cluster.local",
        ]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if text.contains(&format!("Address: {cluster_ip}")) {
            break;
        }
        assert!(Instant::now() < deadline, "nslookup from {third}: {text}");
        std::thread::sleep(Duration::from_millis(300));
    }
    let through_service = c.ok(&[
        "exec",
        &third,
        "--",
        "sh",
        "-c",
        &format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {cluster_ip} 80"),
    ]);
    assert!(through_service.contains("200 OK"), "{through_service}");

    // alpha-3 dies: NotReady after the grace period, its pod evicted.
    let pid: i32 = std::fs::read_to_string(c.data_dir().join("nodes/alpha-3/up.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).unwrap();
    let died = Instant::now();
    c.wait_output(
        &["get", "node", "alpha-3", "-o", ready.replace(".items[*]", "").as_str()],
        WAIT,
        |o| o.contains("=Unknown"),
    );
    c.wait_output(
        &["get", "pod", &third, "-o", "jsonpath={.metadata.deletionTimestamp}"],
        WAIT,
        |t| !t.is_empty(),
    );
    eprintln!("node death → pod marked for deletion: {:?}", died.elapsed());
    // The Deployment replaces it on a live node.
    let live = "jsonpath={range .items[*]}{.spec.nodeName}:{.status.phase}:{.metadata.deletionTimestamp} {end}";
    c.wait_output(&["get", "pods", "-l", "app=web", "-o", live], WAIT, |o| {
        o.split_whitespace()
            .filter(|p| p.ends_with(":Running:") && !p.starts_with("alpha-3:"))
            .count()
            == 3
    });
    eprintln!("node death → replacement running elsewhere: {:?}", died.elapsed());
    // The others keep serving, and the Service answers from live pods only.
    assert!(http_from(&c, &first, &second_ip).contains(&second));
    let deadline = Instant::now() + WAIT;
    let mut answered = 0;
    while answered < 20 {
        match get(&service) {
            Ok(name) if name != third => answered += 1,
            _ => answered = 0,
        }
        assert!(
            Instant::now() < deadline,
            "{service} kept failing or answering from {third}"
        );
    }

    // drain: alpha is cordoned and its replica evicted, to come back on alpha-2 (alpha-3 is dead).
    let out = c.ok(&["drain", "alpha", "--ignore-daemonsets", "--timeout=60s"]);
    assert!(out.contains("evicted") && out.contains("drained"), "{out}");
    assert!(c.ok(&["get", "node", "alpha"]).contains("SchedulingDisabled"));
    c.wait_output(&["get", "pods", "-l", "app=web", "-o", live], WAIT, |o| {
        let running: Vec<&str> = o.split_whitespace().filter(|p| p.ends_with(":Running:")).collect();
        running.len() == 3 && running.iter().all(|p| p.starts_with("alpha-2:"))
    });
    c.ok(&["uncordon", "alpha"]);
    assert!(!c.ok(&["get", "node", "alpha"]).contains("SchedulingDisabled"));

    // kill -9 of the cluster process: the node processes live on and are adopted.
    let mut c = c;
    let container = "jsonpath={.status.containerStatuses[0].containerID}";
    let second_container = c.ok(&["get", "pod", &second, "-o", container]);
    let alpha2 = std::fs::read_to_string(c.data_dir().join("nodes/alpha-2/up.pid")).unwrap();
    c.restart();
    assert_eq!(
        std::fs::read_to_string(c.data_dir().join("nodes/alpha-2/up.pid")).unwrap(),
        alpha2
    );
    c.wait_output(&["get", "nodes", "-o", ready], WAIT, |o| o.contains("alpha-2=True"));
    assert_eq!(c.ok(&["get", "pod", &second, "-o", container]), second_container);
    assert!(http_from(&c, &second, &second_ip).contains(&second));

    // down stops the node processes, which remove their pods; alpha-3, dead again
    // (its hostNetwork pod still running), is started once more to do the same.
    // (After its restart above, alpha-3 must be Ready and untainted, or its new pod is evicted.)
    c.wait_output(&["get", "nodes", "-o", ready], WAIT, |o| o.contains("alpha-3=True"));
    c.wait_output(
        &["get", "node", "alpha-3", "-o", "jsonpath={.spec.taints}"],
        WAIT,
        |t| !t.contains("unreachable") && !t.contains("not-ready"),
    );
    let host_network = host_network
        .replace("hn-alpha-3", "hn2-alpha-3")
        .replace("18081", "18082");
    c.ok(&["apply", "-f", &c.file("hn2.yaml", &host_network)]);
    let running = "jsonpath={.status.phase}";
    c.wait_output(&["get", "pod", "hn2-alpha-3", "-o", running], WAIT, |p| p == "Running");
    let alpha3: i32 = node_file("alpha-3", "up.pid").trim().parse().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(alpha3), nix::sys::signal::Signal::SIGKILL).unwrap();
    let monitors3 = format!("monitor {}", c.dir.path().join("state-alpha-3").display());
    assert!(!common::cri::processes_mentioning(&monitors3).is_empty());
    let netns3 = node_file("alpha-3", "network")
        .lines()
        .next()
        .unwrap()
        .strip_prefix("netns ")
        .unwrap()
        .to_string();
    let monitors = format!("monitor {}", c.dir.path().join("state-alpha-2").display());
    assert!(!common::cri::processes_mentioning(&monitors).is_empty());
    let down = std::process::Command::new(env!("CARGO_BIN_EXE_podvisor"))
        .arg("down")
        .arg("--data-dir")
        .arg(c.data_dir())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    assert!(c.wait_exit(WAIT).is_some_and(|s| s.success()), "{}", c.log());
    assert!(down.wait_with_output().unwrap().status.success());
    let alpha2_pid = format!("/proc/{}", alpha2.trim());
    assert!(
        !std::path::Path::new(&alpha2_pid).exists(),
        "alpha-2's process outlived down"
    );
    let monitors = format!("monitor {}", c.dir.path().join("root-alpha-2").display());
    assert!(
        common::cri::processes_mentioning(&monitors).is_empty(),
        "alpha-2's containers outlived down"
    );
    // ... and their network namespaces and links.
    assert!(!std::path::Path::new("/run/netns").join(&netns2).exists());
    assert!(
        common::cri::processes_mentioning(&monitors3).is_empty(),
        "dead alpha-3's containers outlived down"
    );
    assert!(!std::path::Path::new("/run/netns").join(&netns3).exists());
    let host_link2 = node_file("alpha-2", "network")
        .lines()
        .nth(1)
        .unwrap()
        .strip_prefix("host_link ")
        .unwrap()
        .to_string();
    assert!(!std::path::Path::new("/sys/class/net").join(host_link2).exists());
}

/// `podvisor join --server --token --ca-cert-hash`, as printed by `up`: the CA
/// fetched from the server must match the hash, then the node registers.
#[test]
fn join_with_a_token_checks_the_ca_hash() {
    let c = Cluster::start();
    let line = std::fs::read_to_string(c.data_dir().join("join-command")).unwrap();
    let args: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(&args[..2], ["podvisor", "join"], "{line}");
    let value = |flag: &str| args[args.iter().position(|a| *a == flag).unwrap() + 1].to_string();
    let (server, token, hash) = (value("--server"), value("--token"), value("--ca-cert-hash"));
    assert!(hash.starts_with("sha256:") && hash.len() == 7 + 64, "{hash}");

    // The CA is public (no token needed); everything else is not.
    let insecure = std::process::Command::new("kubectl")
        .args(["--server", &server, "--insecure-skip-tls-verify", "--token", "wrong"])
        .args(["get", "--raw", "/api/v1/namespaces/kube-public/configmaps/cluster-info"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&insecure.stdout).contains("BEGIN CERTIFICATE"));
    // The join token is a node's: it reads, and writes only what node agents write.
    assert!(
        !std::fs::read_to_string(c.kubeconfig()).unwrap().contains(&token),
        "the join line carries the administrator's token"
    );
    c.ok(&["--token", &token, "get", "pods", "-A"]);
    let denied = c.fails(&["--token", &token, "create", "deployment", "evil", "--image", "x"]);
    assert!(denied.contains("is forbidden: the node token"), "{denied}");
    let denied = c.fails(&["--token", &token, "delete", "namespace", "default"]);
    assert!(denied.contains("is forbidden"), "{denied}");

    let dir = tempfile::Builder::new().prefix("podvisor-join-").tempdir().unwrap();
    let (network, bridge, nat) = common::daemon::test_network_config();
    std::fs::write(dir.path().join("config.toml"), network).unwrap();
    let join = |hash: &str| {
        let path = |p: &str| dir.path().join(p);
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_podvisor"));
        command
            .args(["join", "--server", &server, "--token", &token, "--ca-cert-hash", hash])
            .args(["--node-name", "joiner", "--kubelet-port", "0"])
            .arg("--data-dir")
            .arg(path("node"))
            .arg("--listen")
            .arg(format!("unix://{}", path("cri.sock").display()))
            .arg("--root")
            .arg(path("root"))
            .arg("--state")
            .arg(path("state"))
            .arg("--config")
            .arg(path("config.toml"))
            .arg("--pod-log-dir")
            .arg(path("logs"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        command
    };
    let forged = format!("sha256:{}", "0".repeat(64));
    let refused = join(&forged).output().unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("refusing to join"), "{stderr}");

    let table = podvisor::cluster::proxy::table_name(&dir.path().join("node"));
    struct Kill(std::process::Child, String, String, String);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
            common::daemon::remove_test_network(&self.1, &self.2);
            let _ = std::process::Command::new("nft")
                .args(["delete", "table", "ip", &self.3])
                .output();
        }
    }
    let mut joining = join(&hash);
    let log = std::fs::File::create(dir.path().join("join.log")).unwrap();
    joining.stdout(log.try_clone().unwrap()).stderr(log);
    let mut joined = Kill(joining.spawn().unwrap(), bridge, nat, table.clone());
    let ready = "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}";
    c.wait_output(&["get", "node", "joiner", "-o", ready], WAIT, |s| s == "True");

    // The joined machine runs a service proxy of its own: the cluster's Services are programmed there.
    let dns_ip = c.ok(&[
        "get",
        "svc",
        "-n",
        "kube-system",
        "kube-dns",
        "-o",
        "jsonpath={.spec.clusterIP}",
    ]);
    let nft_table = || {
        let out = std::process::Command::new("nft")
            .args(["list", "table", "ip", &table])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let deadline = Instant::now() + WAIT;
    while !nft_table().contains(&dns_ip) {
        assert!(
            Instant::now() < deadline,
            "{dns_ip} not in {table}: {}",
            std::fs::read_to_string(dir.path().join("join.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // It goes with the node (stopped as a service manager would).
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(joined.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let _ = joined.0.wait();
    assert!(nft_table().is_empty(), "{table} left behind");
}

/// A node on another machine (faked: a Node whose InternalIP sits on a spare
/// bridge here) gets a route to its pod subnets through its address; the route
/// goes with the node.
#[test]
fn pod_subnets_of_other_machines_are_routed() {
    let c = Cluster::start();
    let n = std::process::id() % 200 + 20;
    let link = format!("pvr{}", std::process::id() % 100000);
    struct Link(String);
    impl Drop for Link {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip").args(["link", "del", &self.0]).status();
        }
    }
    let ip = |args: &[&str]| {
        let out = std::process::Command::new("ip").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    ip(&["link", "add", &link, "type", "bridge"]);
    let _link = Link(link.clone());
    ip(&["addr", "add", &format!("10.253.{n}.1/24"), "dev", &link]);
    ip(&["link", "set", &link, "up"]);
    let subnet = format!("10.254.{n}.0/24");
    let remote = serde_json::json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "remote", "annotations": {"podvisor.io/pod-subnets": subnet}},
        "status": {"addresses": [{"type": "InternalIP", "address": format!("10.253.{n}.2")}]},
    });
    let file = c.file("remote.json", &remote.to_string());
    c.ok(&["apply", "-f", &file]);
    let deadline = Instant::now() + WAIT;
    let route = loop {
        let route = ip(&["route", "show", &subnet]);
        if !route.trim().is_empty() {
            break route;
        }
        assert!(Instant::now() < deadline, "no route to {subnet}:\n{}", c.log());
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        route.contains(&format!("via 10.253.{n}.2")) && route.contains("proto 199"),
        "{route}"
    );
    // The node's own subnet is published too.
    let own = c.ok(&[
        "get",
        "nodes",
        "-o",
        "jsonpath={.items[?(@.metadata.name!=\"remote\")].metadata.annotations.podvisor\\.io/pod-subnets}",
    ]);
    assert!(own.starts_with("10."), "{own:?}");
    c.ok(&["delete", "node", "remote"]);
    let deadline = Instant::now() + WAIT;
    while !ip(&["route", "show", &subnet]).trim().is_empty() {
        assert!(Instant::now() < deadline, "the route to {subnet} outlived its node");
        std::thread::sleep(Duration::from_millis(100));
    }
}
