//! Image benchmark: p50/p95 of cold PullImage from a local registry, ImageStatus
//! and ListImages, for a small busybox image and a ~50 MiB image of 10 layers,
//! plus the daemon's idle RSS. Run with `hack/bench-images`.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::daemon::{Daemon, spec};
use common::oci::{Compression, Flavour, ImageConfig, TestImage, filler_layer};
use common::push::push_image;
use common::registry::Registry;
use podvisor::cri::proto::runtime::{ImageStatusRequest, ListImagesRequest, RemoveImageRequest};

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    let index = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[index]
}

fn report(what: &str, samples: &mut [Duration]) {
    let p50 = percentile(samples, 0.50);
    let p95 = percentile(samples, 0.95);
    println!(
        "{what:<40} p50 {:>9.3} ms   p95 {:>9.3} ms   (n={})",
        p50.as_secs_f64() * 1000.0,
        p95.as_secs_f64() * 1000.0,
        samples.len()
    );
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

async fn wait_until_empty(daemon: &Daemon) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !daemon.entries("snapshots").is_empty() || !daemon.entries("tmp").is_empty() {
        assert!(Instant::now() < deadline, "snapshots were not freed");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::main]
async fn main() {
    let iterations: usize = std::env::var("BENCH_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    // SAFETY: set before any other thread reads the environment.
    unsafe { std::env::set_var("PODVISOR_TEST_LOG", "warn") };
    let registry = Registry::start().await;
    let small = TestImage::busybox();
    let big = TestImage::new(
        ImageConfig::default(),
        (0..10).map(|i| filler_layer(5 << 20, i, Compression::Gzip)).collect(),
    );
    push_image(&registry.url(), "bench/small", "v1", &small, Flavour::Oci).await;
    push_image(&registry.url(), "bench/big", "v1", &big, Flavour::Oci).await;
    let small_bytes: u64 = small.layers.iter().map(|l| l.size()).sum();
    let big_bytes: u64 = big.layers.iter().map(|l| l.size()).sum();

    let daemon = Daemon::start().await;
    let pid = daemon.pid();
    tokio::time::sleep(Duration::from_millis(500)).await;
    println!("podvisor idle RSS (fresh start)          {:>9} KiB", rss_kib(pid));
    let mut client = daemon.images().await;

    for (label, name, bytes, n) in [
        (
            "busybox",
            format!("{}/bench/small:v1", registry.host()),
            small_bytes,
            iterations,
        ),
        (
            "10-layer",
            format!("{}/bench/big:v1", registry.host()),
            big_bytes,
            iterations.div_ceil(3),
        ),
    ] {
        let mut pulls = Vec::new();
        for _ in 0..n {
            let started = Instant::now();
            daemon.pull(&name).await.expect("pull");
            pulls.push(started.elapsed());
            client
                .remove_image(RemoveImageRequest {
                    image: Some(spec(&name)),
                })
                .await
                .expect("remove");
            wait_until_empty(&daemon).await;
        }
        report(
            &format!("PullImage cold, {label} ({:.1} MiB)", bytes as f64 / (1 << 20) as f64),
            &mut pulls,
        );
    }

    let name = format!("{}/bench/small:v1", registry.host());
    daemon.pull(&name).await.expect("pull");
    daemon
        .pull(&format!("{}/bench/big:v1", registry.host()))
        .await
        .expect("pull");
    let mut statuses = Vec::new();
    let mut lists = Vec::new();
    for _ in 0..1000 {
        let started = Instant::now();
        client
            .image_status(ImageStatusRequest {
                image: Some(spec(&name)),
                verbose: false,
            })
            .await
            .expect("status");
        statuses.push(started.elapsed());
        let started = Instant::now();
        client
            .list_images(ListImagesRequest { filter: None })
            .await
            .expect("list");
        lists.push(started.elapsed());
    }
    report("ImageStatus", &mut statuses);
    report("ListImages (2 images)", &mut lists);
    tokio::time::sleep(Duration::from_millis(500)).await;
    println!("podvisor RSS after the benchmark         {:>9} KiB", rss_kib(pid));
}
