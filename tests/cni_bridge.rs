//! The real plugins (bridge, host-local, portmap, loopback) in fresh network
//! namespaces. Needs root.

#[path = "cni_common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{Attached, Netns, Server, TestNet, fetch, host_ip, in_netns, must, nat_rules_mentioning, run};
use podvisor::network::cni::{CniError, PortMapping, Protocol, StatusOutcome};
use serde_json::json;

fn addr(ip: &str, port: u16) -> SocketAddr {
    format!("{ip}:{port}").parse().expect("socket address")
}

#[tokio::test]
async fn bridge_chain_1_0_connectivity_portmap_and_del() {
    let net = TestNet::new();
    let config = net.conflist(
        "1.0.0",
        vec![
            net.bridge_plugin(),
            json!({"type": "portmap", "capabilities": {"portMappings": true}, "snat": true}),
            json!({"type": "loopback"}),
        ],
    );
    let runtime = net.runtime();
    assert!(runtime.missing_plugins(&config).is_empty());
    assert_eq!(
        runtime.status(&config).await.expect("status"),
        StatusOutcome::NotSupported {
            cni_version: "1.0.0".into()
        }
    );

    let (ns_a, ns_b) = (Netns::new(), Netns::new());
    let host_port = 20000 + (common::process_random() % 20000) as u16;
    let mut at_a = net.attachment(&ns_a);
    at_a.capabilities.port_mappings = vec![PortMapping {
        host_port,
        container_port: 80,
        protocol: Protocol::Tcp,
        host_ip: String::new(),
    }];
    let mut a = Attached::add(&runtime, &config, &at_a).await;
    let mut b = Attached::add(&runtime, &config, &net.attachment(&ns_b)).await;

    // Addresses: in the subnet, on eth0 inside the namespace, on the books of host-local.
    let (ip_a, ip_b) = (a.pod_ip(), b.pod_ip());
    assert!(
        ip_a.starts_with(&format!("{}.", net.prefix)),
        "{ip_a} not in {}",
        net.subnet()
    );
    assert_ne!(ip_a, ip_b);
    assert_eq!(a.result().cni_version(), "1.0.0");
    let shown = must(&["ip", "-n", &ns_a.name, "-4", "addr", "show", "eth0"]);
    assert!(shown.contains(&format!("{ip_a}/24")), "{shown}");
    let mut allocated = net.allocated_ips();
    allocated.sort();
    let mut expected = vec![ip_a.clone(), ip_b.clone()];
    expected.sort();
    assert_eq!(allocated, expected);
    let veth_a = a.host_veth();
    assert!(run(&["ip", "link", "show", &veth_a]).0);

    // CHECK with the stored result. portmap v1.1.1 fails CHECK for IPv4-only
    // pods with port mappings (containernetworking/plugins#819, fixed later).
    runtime.check(&config, &b.at, b.result()).await.expect("CHECK");
    match runtime.check(&config, &a.at, a.result()).await {
        Ok(()) => {}
        Err(e) if e.to_string().contains("\"portmap\" CHECK failed") && e.to_string().contains("ipv6") => {}
        Err(e) => panic!("CHECK: {e}"),
    }

    // Traffic: B -> A, host -> A, and host -> hostPort -> A:80 through portmap's DNAT.
    let _server_8080 = Server::start(&ns_a.path, 8080);
    let _server_80 = Server::start(&ns_a.path, 80);
    let target = addr(&ip_a, 8080);
    let from_b = in_netns(&ns_b.path, move || fetch(target));
    assert_eq!(from_b.expect("B reaches A"), "hello");
    assert_eq!(fetch(addr(&ip_a, 8080)).expect("host reaches A"), "hello");
    assert!(!nat_rules_mentioning(&a.at.container_id).is_empty(), "portmap rules");
    let via_host_port = fetch(addr(&host_ip(), host_port));
    assert_eq!(via_host_port.expect("host port reaches A:80"), "hello");

    // DEL: veth, address and port mapping are gone; a second DEL is fine.
    a.del().await.expect("DEL");
    assert!(!run(&["ip", "link", "show", &veth_a]).0, "{veth_a} still exists");
    assert_eq!(net.allocated_ips(), vec![ip_b.clone()]);
    assert!(
        nat_rules_mentioning(&a.at.container_id).is_empty(),
        "portmap rules left"
    );
    assert!(fetch(addr(&host_ip(), host_port)).is_err());
    runtime
        .del(&config, &a.at, a.result.as_ref())
        .await
        .expect("second DEL");
    runtime
        .del(&config, &a.at, None)
        .await
        .expect("DEL without a stored result");

    b.del().await.expect("DEL B");
    assert!(net.allocated_ips().is_empty());
    assert!(
        net.bridge_ports().trim().is_empty(),
        "ports left: {}",
        net.bridge_ports()
    );
}

#[tokio::test]
async fn bridge_chain_0_4_0_and_check_with_stored_result() {
    let net = TestNet::new();
    let config = net.conflist(
        "0.4.0",
        vec![
            net.bridge_plugin(),
            json!({"type": "portmap", "capabilities": {"portMappings": true}}),
            json!({"type": "loopback"}),
        ],
    );
    let runtime = net.runtime();
    let ns = Netns::new();
    let mut pod = Attached::add(&runtime, &config, &net.attachment(&ns)).await;
    let result = pod.result().clone();
    assert_eq!(result.cni_version(), "0.4.0");
    assert_eq!(result.raw()["ips"][0]["version"], "4", "0.4.0 layout: {}", result.raw());
    let ip = pod.pod_ip();
    assert!(must(&["ip", "-n", &ns.name, "addr", "show", "eth0"]).contains(&ip));

    // The stored result, after a trip through a record, is a valid prevResult for CHECK and DEL.
    let stored = serde_json::to_string(&result).expect("store");
    let restored: podvisor::network::cni::CniResult = serde_json::from_str(&stored).expect("restore");
    runtime.check(&config, &pod.at, &restored).await.expect("CHECK 0.4.0");
    pod.result = Some(restored);
    pod.del().await.expect("DEL");
    assert!(net.allocated_ips().is_empty());
    assert!(net.bridge_ports().trim().is_empty());
}

#[tokio::test]
async fn single_plugin_conf_is_wrapped_and_works() {
    let net = TestNet::new();
    let mut plugin = net.bridge_plugin();
    plugin["cniVersion"] = json!("0.3.1");
    plugin["name"] = json!(net.name);
    let config = net.write_config("10-single.conf", &plugin);
    assert_eq!(config.plugins.len(), 1);
    assert_eq!(config.cni_version, "0.3.1");
    let runtime = net.runtime();
    let ns = Netns::new();
    let mut pod = Attached::add(&runtime, &config, &net.attachment(&ns)).await;
    assert_eq!(pod.result().cni_version(), "0.3.1");
    assert!(must(&["ip", "-n", &ns.name, "addr", "show", "eth0"]).contains(&pod.pod_ip()));
    // CHECK arrived with 0.4.0.
    let check = runtime.check(&config, &pod.at, pod.result()).await;
    assert!(matches!(check, Err(CniError::Unsupported { .. })), "{check:?}");
    pod.del().await.expect("DEL");
    assert!(net.allocated_ips().is_empty());
}

#[tokio::test]
async fn missing_plugin_fails_before_anything_runs() {
    let net = TestNet::new();
    let config = net.conflist("1.0.0", vec![net.bridge_plugin(), json!({"type": "pv-no-such-plugin"})]);
    let runtime = net.runtime();
    assert_eq!(runtime.missing_plugins(&config), ["pv-no-such-plugin"]);
    let ns = Netns::new();
    let at = net.attachment(&ns);
    let err = runtime.add(&config, &at).await.expect_err("missing plugin");
    let text = err.to_string();
    assert!(
        text.contains("pv-no-such-plugin") && text.contains("/usr/lib/cni"),
        "{text}"
    );
    assert!(!run(&["ip", "-n", &ns.name, "link", "show", "eth0"]).0, "eth0 created");
    assert!(net.allocated_ips().is_empty());
    assert!(!run(&["ip", "link", "show", &net.bridge]).0, "bridge created");
    // DEL reports the missing plugin but still runs the others.
    let err = runtime
        .del(&config, &at, None)
        .await
        .expect_err("DEL names the missing plugin");
    assert!(err.to_string().contains("pv-no-such-plugin"));
}

#[tokio::test]
async fn plugin_failing_midway_rolls_back_earlier_plugins() {
    let net = TestNet::new();
    net.script_plugin(
        "pv-fail",
        r#"cat >/dev/null
[ "$CNI_COMMAND" = DEL ] && exit 0
echo '{"cniVersion":"1.0.0","code":7,"msg":"injected failure","details":"from the test"}'
exit 1"#,
    );
    let config = net.conflist(
        "1.0.0",
        vec![
            net.bridge_plugin(),
            json!({"type": "portmap", "capabilities": {"portMappings": true}}),
            json!({"type": "pv-fail"}),
        ],
    );
    let runtime = net.runtime();
    let ns = Netns::new();
    let mut at = net.attachment(&ns);
    at.capabilities.port_mappings = vec![PortMapping {
        host_port: 20000 + (common::process_random() % 20000) as u16 + 1,
        container_port: 80,
        protocol: Protocol::Tcp,
        host_ip: String::new(),
    }];
    let err = runtime.add(&config, &at).await.expect_err("ADD fails");
    assert_eq!(err.code(), Some(7));
    let text = err.to_string();
    assert!(
        text.contains("pv-fail")
            && text.contains("ADD")
            && text.contains("injected failure")
            && text.contains("from the test"),
        "{text}"
    );
    // The bridge's veth and address, and portmap's rules, were deleted again.
    assert!(!run(&["ip", "-n", &ns.name, "link", "show", "eth0"]).0, "eth0 left");
    assert!(
        net.bridge_ports().trim().is_empty(),
        "veth left: {}",
        net.bridge_ports()
    );
    assert!(
        net.allocated_ips().is_empty(),
        "addresses left: {:?}",
        net.allocated_ips()
    );
    assert!(nat_rules_mentioning(&at.container_id).is_empty(), "portmap rules left");
}

#[tokio::test]
async fn bad_ipam_config_error_reaches_the_caller() {
    let net = TestNet::new();
    let mut bridge = net.bridge_plugin();
    bridge["ipam"]["ranges"] = json!([[{"subnet": "10.1.2.0/33"}]]);
    let config = net.conflist("1.0.0", vec![bridge]);
    let runtime = net.runtime();
    let ns = Netns::new();
    let err = runtime
        .add(&config, &net.attachment(&ns))
        .await
        .expect_err("bad subnet");
    let text = err.to_string();
    assert!(
        text.contains("\"bridge\" ADD failed") && text.contains("10.1.2.0/33"),
        "{text}"
    );
    assert!(
        net.bridge_ports().trim().is_empty(),
        "veth left: {}",
        net.bridge_ports()
    );
}

#[tokio::test]
async fn del_after_netns_and_ipam_state_are_gone() {
    let net = TestNet::new();
    let config = net.conflist(
        "1.0.0",
        vec![
            net.bridge_plugin(),
            json!({"type": "portmap", "capabilities": {"portMappings": true}}),
            json!({"type": "loopback"}),
        ],
    );
    let runtime = net.runtime();
    let mut ns = Netns::new();
    let mut pod = Attached::add(&runtime, &config, &net.attachment(&ns)).await;
    let veth = pod.host_veth();
    ns.delete();
    assert!(!ns.path.exists());
    std::fs::remove_dir_all(&net.data_dir).expect("remove host-local state");
    pod.del().await.expect("DEL with the netns and IPAM state gone");
    runtime
        .del(&config, &pod.at, None)
        .await
        .expect("again, without a result");
    // The kernel frees a deleted namespace (and the veth pair with it) asynchronously.
    let deadline = Instant::now() + Duration::from_secs(10);
    while run(&["ip", "link", "show", &veth]).0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!run(&["ip", "link", "show", &veth]).0, "{veth} left");
}

/// ADD+DEL latency of the bridge + portmap + loopback chain:
/// `cargo test --test bridge -- --ignored --nocapture`.
#[tokio::test]
#[ignore]
async fn measure_add_del_latency() {
    let net = TestNet::new();
    let config = net.conflist(
        "1.0.0",
        vec![
            net.bridge_plugin(),
            json!({"type": "portmap", "capabilities": {"portMappings": true}}),
            json!({"type": "loopback"}),
        ],
    );
    let runtime = net.runtime();
    let (mut adds, mut dels, mut totals) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..21u16 {
        let ns = Netns::new();
        let mut at = net.attachment(&ns);
        at.capabilities.port_mappings = vec![PortMapping {
            host_port: 41000 + i,
            container_port: 80,
            protocol: Protocol::Tcp,
            host_ip: String::new(),
        }];
        let start = Instant::now();
        let mut pod = Attached::add(&runtime, &config, &at).await;
        let added = start.elapsed();
        pod.del().await.expect("DEL");
        let total = start.elapsed();
        if i > 0 {
            // The first run creates the bridge and the shared chains.
            adds.push(added);
            dels.push(total - added);
            totals.push(total);
        }
    }
    let p50 = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    println!(
        "ADD p50 {:?}, DEL p50 {:?}, ADD+DEL p50 {:?} (max {:?}) over {} runs",
        p50(&mut adds),
        p50(&mut dels),
        p50(&mut totals),
        totals.last().copied().unwrap_or_default(),
        totals.len()
    );
}
