//! VM pods (a Deployment with `runtimeClassName: vm`) through `podvisor up`
//! and the real `kubectl`, next to a container pod: scheduled, running, the
//! console in `kubectl logs`, reachable by pod IP from the container pod, a
//! Service in front of them reaching both VMs, and gone (domains included)
//! once deleted. Two VM boots (QEMU under TCG here).
//! Skipped (loudly) when libvirtd is not running; `hack/test` starts it.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::cluster::Cluster;
use common::oci::{Compression, Flavour, ImageConfig, Layer, TestImage};
use common::push::push_image;
use common::registry::Registry;
use podvisor::cri::proto::runtime as cri;
use vmimage::initramfs::{INDEX_HTML, READY_MARKER};
use vmimage::{GuestAgent, VmImageSpec, VmImages};

const WAIT: Duration = Duration::from_secs(120);

/// Destroys and undefines the domains of sandboxes the test saw, whatever happens.
#[derive(Default)]
struct DomainGuard(std::sync::Mutex<Vec<String>>);

impl DomainGuard {
    fn track(&self, sandbox_id: &str) {
        self.0
            .lock()
            .unwrap()
            .push(podvisor::backend::vm::domain_name(sandbox_id));
    }
}

impl Drop for DomainGuard {
    fn drop(&mut self) {
        for name in self.0.lock().unwrap().iter() {
            let _ = Command::new("virsh").args(["-q", "destroy", name]).output();
            let _ = Command::new("virsh").args(["-q", "undefine", name]).output();
        }
    }
}

fn domain_exists(name: &str) -> bool {
    Command::new("virsh")
        .args(["-q", "dominfo", name])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn sandboxes(endpoint: &str) -> Vec<cri::PodSandbox> {
    let endpoint = endpoint.to_string();
    runtime().block_on(async move {
        let channel = podvisor::cri::socket::connect(&endpoint).await.unwrap();
        cri::runtime_service_client::RuntimeServiceClient::new(channel)
            .list_pod_sandbox(cri::ListPodSandboxRequest::default())
            .await
            .unwrap()
            .into_inner()
            .items
    })
}

/// Pushes busybox and the containerDisk test image; returns the registry and both references.
fn registry_with_images() -> (Registry, String, String) {
    let images = VmImages::build(&VmImageSpec::new(GuestAgent::preferred("/usr/sbin/qemu-ga")).expect("VM image spec"))
        .expect("building the VM test images");
    let disk = images.container_disk_image().unwrap();
    let disk = TestImage::new(
        ImageConfig {
            labels: disk.labels.clone(),
            cmd: None,
            ..Default::default()
        },
        vec![Layer::new(disk.layer_tar.clone(), Compression::Gzip)],
    );
    let registry = runtime().block_on(async {
        let registry = Registry::start().await;
        push_image(
            &registry.url(),
            "test/busybox",
            "latest",
            &TestImage::busybox(),
            Flavour::Oci,
        )
        .await;
        push_image(&registry.url(), "test/vmdisk", "latest", &disk, Flavour::Oci).await;
        registry
    });
    let busybox = format!("{}/test/busybox:latest", registry.host());
    let vmdisk = format!("{}/test/vmdisk:latest", registry.host());
    (registry, busybox, vmdisk)
}

const PODS: &str = "apiVersion: apps/v1
kind: Deployment
metadata: {name: vms}
spec:
  replicas: 2
  selector: {matchLabels: {app: vm}}
  template:
    metadata: {labels: {app: vm}}
    spec:
      runtimeClassName: vm
      terminationGracePeriodSeconds: 5
      containers:
      - name: vm
        image: $VMDISK
        resources: {limits: {memory: 256Mi}}
---
apiVersion: v1
kind: Service
metadata: {name: vms}
spec:
  selector: {app: vm}
  ports: [{port: 80}]
---
apiVersion: v1
kind: Pod
metadata: {name: web}
spec:
  terminationGracePeriodSeconds: 0
  containers:
  - name: main
    image: $BUSYBOX
    command: [sh, -c, 'trap \"exit 0\" TERM; while true; do sleep 1; done']
";

#[test]
fn vm_pods_behind_a_service_next_to_a_container_pod() {
    if !std::path::Path::new("/run/libvirt/libvirt-sock").exists() {
        eprintln!("SKIPPED: libvirtd is not running (hack/test starts it)");
        return;
    }
    let guard = DomainGuard::default();
    let (_registry, busybox, vmdisk) = registry_with_images();
    let c = Cluster::start_with(&[], "[vm]\nhypervisor = \"auto\"\n");
    let manifest = PODS.replace("$VMDISK", &vmdisk).replace("$BUSYBOX", &busybox);
    let file = c.file("pods.yaml", &manifest);
    let applied = Instant::now();
    c.ok(&["apply", "-f", &file]);

    // All scheduled and running; the VM pods' sandboxes run under the vm handler.
    let vm_pods = c.wait_output(
        &[
            "get",
            "pods",
            "-l",
            "app=vm",
            "-o",
            "jsonpath={range .items[?(@.status.phase=='Running')]}{.metadata.name} {end}",
        ],
        WAIT,
        |names| names.split_whitespace().count() == 2,
    );
    let vm_pods: Vec<String> = vm_pods.split_whitespace().map(String::from).collect();
    c.wait_output(&["get", "pod", "web", "-o", "jsonpath={.status.phase}"], WAIT, |p| {
        p == "Running"
    });
    let vm_sandboxes: Vec<cri::PodSandbox> = sandboxes(&c.endpoint())
        .into_iter()
        .filter(|s| s.metadata.as_ref().is_some_and(|m| vm_pods.contains(&m.name)))
        .collect();
    assert_eq!(vm_sandboxes.len(), 2, "{vm_sandboxes:?}");
    let mut domains = Vec::new();
    for sandbox in &vm_sandboxes {
        guard.track(&sandbox.id);
        assert_eq!(sandbox.runtime_handler, "vm");
        let domain = podvisor::backend::vm::domain_name(&sandbox.id);
        assert!(domain_exists(&domain), "no libvirt domain {domain}");
        domains.push(domain);
    }
    let vmpod = vm_pods[0].as_str();
    let node = c.ok(&["get", "pod", vmpod, "-o", "jsonpath={.spec.nodeName}"]);
    assert!(!node.is_empty(), "{vmpod} was not bound to a node");

    // The console shows the guest's boot in kubectl logs.
    c.wait_output(&["logs", vmpod], WAIT, |log| log.contains(READY_MARKER));
    let vm_ip = c.ok(&["get", "pod", vmpod, "-o", "jsonpath={.status.podIP}"]);
    assert!(!vm_ip.is_empty(), "{vmpod} has no pod IP");

    // busybox-static's `wget -T` crashes, so a bounded nc speaks HTTP instead.
    let fetch = |address: &str, path: &str| {
        let request = format!("printf 'GET {path} HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {address} 80");
        let out = c.kubectl(&["exec", "web", "--", "sh", "-c", &request]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        (out.status.success() && text.contains("200 OK"))
            .then(|| text.split("\r\n\r\n").nth(1).unwrap_or("").trim().to_string())
    };
    // The container pod reaches the VM's HTTP server by pod IP.
    let deadline = Instant::now() + WAIT;
    while fetch(&vm_ip, "/").is_none_or(|page| page != INDEX_HTML) {
        assert!(Instant::now() < deadline, "web never fetched http://{vm_ip}/");
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!(
        "kubectl apply → VM pod serving HTTP to a container pod: {:?}",
        applied.elapsed()
    );

    // The Service in front of the VMs spreads connections over both.
    let vm_ips: std::collections::BTreeSet<String> = vm_pods
        .iter()
        .map(|pod| c.ok(&["get", "pod", pod, "-o", "jsonpath={.status.podIP}"]))
        .collect();
    let cluster_ip = c.ok(&["get", "svc", "vms", "-o", "jsonpath={.spec.clusterIP}"]);
    let mut seen = std::collections::BTreeSet::new();
    let deadline = Instant::now() + WAIT;
    while seen != vm_ips {
        if let Some(ip) = fetch(&cluster_ip, "/ip") {
            assert!(vm_ips.contains(&ip), "{ip} is not one of {vm_ips:?}");
            seen.insert(ip);
        }
        assert!(
            Instant::now() < deadline,
            "the Service reached only {seen:?} of {vm_ips:?}"
        );
    }

    // Deleting the VM pods removes their domains and sandboxes; the container pod stays.
    c.ok(&["delete", "deployment", "vms"]);
    let deadline = Instant::now() + WAIT;
    while domains.iter().any(|d| domain_exists(d)) {
        assert!(Instant::now() < deadline, "domains {domains:?} outlived their pods");
        std::thread::sleep(Duration::from_millis(200));
    }
    let deadline = Instant::now() + WAIT;
    while sandboxes(&c.endpoint())
        .iter()
        .any(|s| vm_sandboxes.iter().any(|v| v.id == s.id))
    {
        assert!(Instant::now() < deadline, "the VM pods' sandboxes were not removed");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        c.ok(&["get", "pod", "web", "-o", "jsonpath={.status.phase}"]),
        "Running"
    );
}
