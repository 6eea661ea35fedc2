//! Runtime benchmark: p50/p95 of the sandbox and container lifecycle calls
//! over 30+ iterations (pods on the built-in network), the daemon's idle RSS
//! and the memory each running pod adds (RSS of every process podvisor starts
//! for it); then RunPodSandbox/StopPodSandbox for each network path (built-in,
//! CNI bridge chain, host network). Run with `hack/bench`.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::cri::Fixture;
use podvisor::cri::proto::runtime as cri;

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    samples[((samples.len() as f64 - 1.0) * p).round() as usize]
}

fn report(what: &str, samples: &mut [Duration]) {
    let p50 = percentile(samples, 0.50);
    let p95 = percentile(samples, 0.95);
    println!(
        "{what:<30} p50 {:>8.2} ms   p95 {:>8.2} ms   (n={})",
        p50.as_secs_f64() * 1000.0,
        p95.as_secs_f64() * 1000.0,
        samples.len()
    );
}

fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// (PSS, private) KiB from smaps_rollup: what a process really adds, with
/// pages shared with the daemon and other monitors counted once.
fn pss_and_private_kib(pid: i32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let field = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("Pss:"), field("Private_Clean:") + field("Private_Dirty:"))
}

async fn timed<T>(samples: &mut Vec<Duration>, future: impl std::future::Future<Output = T>) -> T {
    let started = Instant::now();
    let out = future.await;
    samples.push(started.elapsed());
    out
}

#[tokio::main]
async fn main() {
    let iterations: usize = std::env::var("BENCH_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    // SAFETY: set before any other thread reads the environment.
    unsafe { std::env::set_var("PODVISOR_TEST_LOG", "warn") };
    let fx = Fixture::start().await;
    let daemon_pid = fx.daemon.pid() as i32;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = rss_kib(daemon_pid);
    let mut runtime = fx.runtime().await;
    let names = [
        "RunPodSandbox",
        "CreateContainer",
        "StartContainer",
        "ContainerStatus",
        "StopContainer",
        "RemoveContainer",
        "StopPodSandbox",
        "RemovePodSandbox",
    ];
    let mut samples: Vec<Vec<Duration>> = vec![Vec::new(); names.len()];
    let mut per_pod_kib = Vec::new();
    let mut per_pod_pss = Vec::new();
    let mut per_pod_private = Vec::new();
    for i in 0..iterations {
        let pod_config = fx.pod(&format!("bench-{i}"));
        let pod = timed(
            &mut samples[0],
            runtime.run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(pod_config.clone()),
                runtime_handler: String::new(),
            }),
        )
        .await
        .expect("run")
        .into_inner()
        .pod_sandbox_id;
        let config = fx.container("main", "exec sleep 1000");
        let id = timed(
            &mut samples[1],
            runtime.create_container(cri::CreateContainerRequest {
                pod_sandbox_id: pod.clone(),
                config: Some(config),
                sandbox_config: Some(pod_config),
            }),
        )
        .await
        .expect("create")
        .into_inner()
        .container_id;
        timed(
            &mut samples[2],
            runtime.start_container(cri::StartContainerRequest {
                container_id: id.clone(),
            }),
        )
        .await
        .expect("start");
        let status = timed(
            &mut samples[3],
            runtime.container_status(cri::ContainerStatusRequest {
                container_id: id.clone(),
                verbose: true,
            }),
        )
        .await
        .expect("status")
        .into_inner();
        let info: serde_json::Value = serde_json::from_str(&status.info["info"]).unwrap_or_default();
        if let Some(monitor) = info["monitorPid"].as_i64() {
            per_pod_kib.push(rss_kib(monitor as i32));
            let (pss, private) = pss_and_private_kib(monitor as i32);
            per_pod_pss.push(pss);
            per_pod_private.push(private);
        }
        timed(
            &mut samples[4],
            runtime.stop_container(cri::StopContainerRequest {
                container_id: id.clone(),
                timeout: 0,
            }),
        )
        .await
        .expect("stop");
        timed(
            &mut samples[5],
            runtime.remove_container(cri::RemoveContainerRequest { container_id: id }),
        )
        .await
        .expect("remove");
        timed(
            &mut samples[6],
            runtime.stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: pod.clone(),
            }),
        )
        .await
        .expect("stopp");
        timed(
            &mut samples[7],
            runtime.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: pod }),
        )
        .await
        .expect("rmp");
    }
    for (name, samples) in names.iter().zip(samples.iter_mut()) {
        report(name, samples);
    }
    per_pod_kib.sort();
    per_pod_pss.sort();
    per_pod_private.sort();
    println!("podvisor daemon idle RSS              {idle:>8} KiB");
    println!("podvisor daemon RSS after the run     {:>8} KiB", rss_kib(daemon_pid));
    if !per_pod_kib.is_empty() {
        let mid = per_pod_kib.len() / 2;
        println!(
            "per running pod (its monitor, 1 container): RSS {} KiB, PSS {} KiB, private {} KiB",
            per_pod_kib[mid], per_pod_pss[mid], per_pod_private[mid]
        );
    }
    drop(fx);
    for path in ["built-in", "CNI bridge", "host network"] {
        network_path(path, iterations).await;
    }
}

/// RunPodSandbox and StopPodSandbox (then RemovePodSandbox, untimed) on one network path.
async fn network_path(path: &str, iterations: usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    let bridge = format!("pvbench{}", std::process::id() % 10000);
    let config = match path {
        "CNI bridge" => {
            let conf_dir = dir.path().join("net.d");
            std::fs::create_dir(&conf_dir).expect("conf dir");
            let conflist = serde_json::json!({
                "cniVersion": "1.0.0", "name": "bench", "plugins": [
                    {"type": "bridge", "bridge": bridge, "isGateway": true, "ipMasq": true,
                     "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.211.0.0/24"}]],
                              "routes": [{"dst": "0.0.0.0/0"}], "dataDir": dir.path().join("ipam")}},
                    {"type": "portmap", "capabilities": {"portMappings": true}},
                    {"type": "loopback"}
                ]
            });
            std::fs::write(conf_dir.join("10-bench.conflist"), conflist.to_string()).expect("conflist");
            Some(format!(
                "[network]\nmode = \"cni\"\ncni_conf_dir = \"{}\"\ncni_bin_dirs = [\"/usr/lib/cni\"]\n",
                conf_dir.display()
            ))
        }
        _ => None,
    };
    let fx = Fixture::start_with_config(config.as_deref()).await;
    let mut runtime = fx.runtime().await;
    let (mut run, mut stop) = (Vec::new(), Vec::new());
    for i in 0..iterations {
        let mut pod_config = fx.pod(&format!("net-{i}"));
        if path == "host network" {
            pod_config.linux.as_mut().expect("linux").security_context = Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(cri::NamespaceOption {
                    network: cri::NamespaceMode::Node as i32,
                    ..Default::default()
                }),
                ..Default::default()
            });
        }
        let pod = timed(
            &mut run,
            runtime.run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(pod_config),
                runtime_handler: String::new(),
            }),
        )
        .await
        .expect("run")
        .into_inner()
        .pod_sandbox_id;
        timed(
            &mut stop,
            runtime.stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: pod.clone(),
            }),
        )
        .await
        .expect("stopp");
        runtime
            .remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: pod })
            .await
            .expect("rmp");
    }
    report(&format!("RunPodSandbox, {path}"), &mut run);
    report(&format!("StopPodSandbox, {path}"), &mut stop);
    drop(fx);
    if path == "CNI bridge" {
        common::daemon::remove_test_network(&bridge, "none");
    }
}
