//! VM pod benchmark: RunPodSandbox → the VM answering HTTP on its pod IP
//! (sandbox, CreateContainer, StartContainer and the guest's boot), and what a
//! running VM pod costs the node beyond its guest RAM (QEMU's RSS minus the
//! guest memory, plus the per-VM helper). QEMU under TCG unless KVM works.
//! Run with `hack/bench-vm` (needs libvirtd; `hack/bench-vm` starts it).

#[path = "../../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::cri::Fixture;
use common::oci::{Compression, Flavour, ImageConfig, Layer, TestImage};
use common::push::push_image;
use podvisor::cri::proto::runtime as cri;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vmimage::initramfs::{INDEX_HTML, READY_MARKER};
use vmimage::{GuestAgent, VmImageSpec, VmImages};

const GUEST_MIB: u64 = 256;

fn rss_kib(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// QEMU's own resident memory: its RSS outside the mapping that holds the guest's RAM.
fn rss_outside_guest_kib(pid: &str) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let (mut total, mut size) = (0, 0);
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        match (fields.next(), fields.next().and_then(|v| v.parse::<u64>().ok())) {
            (Some("Size:"), Some(kib)) => size = kib,
            (Some("Rss:"), Some(kib)) if size < GUEST_MIB * 1024 => total += kib,
            _ => {}
        }
    }
    total
}

async fn answers(ip: &str) -> bool {
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect((ip, 80)).await.ok()?;
        stream.write_all(b"GET / HTTP/1.0\r\n\r\n").await.ok()?;
        let mut body = String::new();
        stream.read_to_string(&mut body).await.ok()?;
        Some(body.contains(INDEX_HTML))
    };
    // Short attempts: a connect waiting on ARP for a VM not up yet would otherwise
    // hold the measurement back by seconds.
    tokio::time::timeout(Duration::from_millis(500), attempt)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

#[tokio::main]
async fn main() {
    let iterations: usize = std::env::var("BENCH_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
        .max(1);
    let images = tokio::task::spawn_blocking(|| {
        VmImages::build(&VmImageSpec::new(GuestAgent::preferred("/usr/sbin/qemu-ga")).expect("VM image spec"))
            .expect("building the VM image")
    })
    .await
    .unwrap();
    let fixture = Fixture::start_with_config(Some("[vm]\nhypervisor = \"auto\"\n")).await;
    let disk = images.container_disk_image().unwrap();
    let disk = TestImage::new(
        ImageConfig {
            labels: disk.labels.clone(),
            cmd: None,
            ..Default::default()
        },
        vec![Layer::new(disk.layer_tar.clone(), Compression::Gzip)],
    );
    push_image(&fixture.registry.url(), "bench/vmdisk", "latest", &disk, Flavour::Oci).await;
    let image = format!("{}/bench/vmdisk:latest", fixture.registry.host());
    fixture.daemon.pull(&image).await.expect("pull the VM image");

    let mut to_http = Vec::new();
    let mut to_ready = Vec::new();
    for round in 0..iterations {
        let config = fixture.pod(&format!("benchvm{round}"));
        let started = Instant::now();
        // The guest prints its ready marker on the console once its httpd runs.
        let console = std::path::Path::new(&config.log_directory).join("vm.log");
        let ready = tokio::spawn(async move {
            loop {
                if std::fs::read_to_string(&console).is_ok_and(|log| log.contains(READY_MARKER)) {
                    return started.elapsed();
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        let pod = fixture
            .runtime()
            .await
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: "vm".into(),
            })
            .await
            .expect("RunPodSandbox")
            .into_inner()
            .pod_sandbox_id;
        let container = cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: "vm".into(),
                attempt: 0,
            }),
            image: Some(cri::ImageSpec {
                image: image.clone(),
                ..Default::default()
            }),
            log_path: "vm.log".into(),
            linux: Some(cri::LinuxContainerConfig {
                resources: Some(cri::LinuxContainerResources {
                    memory_limit_in_bytes: (GUEST_MIB << 20) as i64,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let id = fixture.create(&pod, &config, container).await.expect("CreateContainer");
        fixture.start_container(&id).await.expect("StartContainer");
        let ip = fixture
            .runtime()
            .await
            .pod_sandbox_status(cri::PodSandboxStatusRequest {
                pod_sandbox_id: pod.clone(),
                verbose: false,
            })
            .await
            .unwrap()
            .into_inner()
            .status
            .unwrap()
            .network
            .unwrap()
            .ip;
        while !answers(&ip).await {
            assert!(
                started.elapsed() < Duration::from_secs(180),
                "the VM never answered on {ip}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        to_http.push(started.elapsed());
        match tokio::time::timeout(Duration::from_secs(10), ready).await {
            Ok(Ok(elapsed)) => to_ready.push(elapsed),
            _ => eprintln!("no ready marker in the console log of round {round}"),
        }
        if round == 0 {
            tokio::time::sleep(Duration::from_secs(5)).await;
            let domain = podvisor::backend::vm::domain_name(&pod);
            let qemu = std::fs::read_to_string(format!("/run/libvirt/qemu/{domain}.pid")).unwrap_or_default();
            let qemu_kib = rss_kib(qemu.trim());
            let state = fixture.daemon.state().display().to_string();
            let helpers: u64 = common::cri::processes_mentioning("vm-helper")
                .into_iter()
                .filter(|pid| std::fs::read_to_string(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c.contains(&state)))
                .map(|pid| rss_kib(&pid.to_string()))
                .sum();
            let qemu_own_kib = rss_outside_guest_kib(qemu.trim());
            println!(
                "{:<44} {:>6} MiB   (QEMU outside guest RAM {} MiB, helper {} MiB; QEMU RSS {} MiB, {GUEST_MIB} MiB guest)",
                "VM pod memory beyond its guest RAM",
                (qemu_own_kib + helpers) / 1024,
                qemu_own_kib / 1024,
                helpers / 1024,
                qemu_kib / 1024
            );
        }
        fixture.remove_pod(&pod).await;
    }
    to_http.sort();
    to_ready.sort();
    if !to_ready.is_empty() {
        println!(
            "{:<44} p50 {:>8.0} ms   max {:>8.0} ms   (n={})",
            "RunPodSandbox → guest ready on its console",
            to_ready[to_ready.len() / 2].as_secs_f64() * 1000.0,
            to_ready.last().unwrap().as_secs_f64() * 1000.0,
            to_ready.len()
        );
    }
    println!(
        "{:<44} p50 {:>8.0} ms   max {:>8.0} ms   (n={}, {})",
        "RunPodSandbox → VM answers HTTP on pod IP",
        to_http[to_http.len() / 2].as_secs_f64() * 1000.0,
        to_http.last().unwrap().as_secs_f64() * 1000.0,
        to_http.len(),
        fixture
            .runtime()
            .await
            .status(cri::StatusRequest { verbose: true })
            .await
            .ok()
            .and_then(|s| {
                let info: serde_json::Value = serde_json::from_str(s.into_inner().info.get("info")?).ok()?;
                info["vm"]["accel"].as_str().map(String::from)
            })
            .unwrap_or_else(|| "accel unknown".into())
    );
}
