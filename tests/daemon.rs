//! The daemon itself: socket, lock, runtime-wide RPCs, config handling, CLI.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::Stdio;

use common::daemon::Daemon;
use common::oci::{Flavour, TestImage};
use common::push::push_image;
use common::registry::Registry;
use podvisor::cri::proto::runtime::{RuntimeConfigRequest, StatusRequest, UpdateRuntimeConfigRequest, VersionRequest};
use tonic::Code;

#[tokio::test]
async fn version_status_and_runtime_config() {
    let daemon = Daemon::start().await;
    let mut runtime = daemon.runtime().await;
    let version = runtime
        .version(VersionRequest { version: "v1".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(version.runtime_name, "podvisor");
    assert_eq!(version.runtime_api_version, "v1");
    assert_eq!(version.runtime_version, env!("CARGO_PKG_VERSION"));

    let status = runtime
        .status(StatusRequest { verbose: true })
        .await
        .unwrap()
        .into_inner();
    let conditions = status.status.unwrap().conditions;
    let runtime_ready = conditions.iter().find(|c| c.r#type == "RuntimeReady").unwrap();
    assert!(runtime_ready.status);
    // The daemon under test has a built-in network of its own, set up at start.
    let network_ready = conditions.iter().find(|c| c.r#type == "NetworkReady").unwrap();
    assert!(network_ready.status, "{network_ready:?}");
    let info: serde_json::Value = serde_json::from_str(&status.info["info"]).unwrap();
    assert_eq!(info["cgroupDriver"], "cgroupfs");
    assert!(
        ["v1", "hybrid", "v2"].contains(&info["runtime"]["cgroup_layout"].as_str().unwrap()),
        "{info}"
    );
    assert_eq!(info["runtime"]["config"]["registry"]["max_concurrent_downloads"], 4);

    let config = runtime
        .runtime_config(RuntimeConfigRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        config.linux.unwrap().cgroup_driver,
        podvisor::cri::proto::runtime::CgroupDriver::Cgroupfs as i32
    );
    runtime
        .update_runtime_config(UpdateRuntimeConfigRequest {
            runtime_config: Some(podvisor::cri::proto::runtime::RuntimeConfig {
                network_config: Some(podvisor::cri::proto::runtime::NetworkConfig {
                    pod_cidr: "10.244.0.0/24".into(),
                }),
            }),
        })
        .await
        .unwrap();
    let status = runtime
        .status(StatusRequest { verbose: true })
        .await
        .unwrap()
        .into_inner();
    assert!(status.info["info"].contains("10.244.0.0/24"));

    // Not built yet: said plainly, not faked.
    let err = runtime
        .checkpoint_container(podvisor::cri::proto::runtime::CheckpointContainerRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);
}

#[tokio::test]
async fn socket_is_private_and_a_second_daemon_is_refused() {
    let mut daemon = Daemon::start().await;
    let meta = std::fs::metadata(daemon.socket()).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!((meta.uid(), meta.gid()), (0, 0));

    let second = daemon.command().stderr(Stdio::piped()).output().unwrap();
    assert!(!second.status.success());
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(stderr.contains("another podvisor daemon"), "{stderr}");
    // The first daemon still serves.
    daemon.runtime().await.version(VersionRequest::default()).await.unwrap();

    // A crash leaves a stale socket behind; the next start replaces it.
    daemon.kill();
    assert!(daemon.socket().exists());
    daemon.restart().await;
    daemon.runtime().await.version(VersionRequest::default()).await.unwrap();

    // A clean stop removes the socket.
    daemon.stop();
    assert!(!daemon.socket().exists());
}

#[tokio::test]
async fn bad_config_is_refused_with_the_offending_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "[registry]\nmirrorz = {}\n").unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_podvisor"))
        .args(["daemon", "--config"])
        .arg(&config)
        .arg("--root")
        .arg(dir.path().join("root"))
        .arg("--state")
        .arg(dir.path().join("state"))
        .arg("--listen")
        .arg(dir.path().join("sock"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("mirrorz"), "{stderr}");
    assert!(!dir.path().join("sock").exists());
}

#[tokio::test]
async fn cli_pull_and_images() {
    let registry = Registry::start().await;
    let image = TestImage::busybox();
    push_image(&registry.url(), "cli/busybox", "v1", &image, Flavour::Oci).await;
    let daemon = Daemon::start().await;
    let name = format!("{}/cli/busybox:v1", registry.host());
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_podvisor"))
            .args(args)
            .env("PODVISOR_ENDPOINT", daemon.endpoint())
            .output()
            .unwrap()
    };
    let pulled = run(&["pull", &name]);
    assert!(pulled.status.success(), "{}", String::from_utf8_lossy(&pulled.stderr));
    assert!(String::from_utf8_lossy(&pulled.stdout).contains(&image.config_digest()));

    let listed = run(&["images"]);
    let table = String::from_utf8_lossy(&listed.stdout);
    let mut lines = table.lines();
    assert!(lines.next().unwrap().starts_with("IMAGE"));
    let row = lines.next().unwrap();
    assert!(
        row.contains(&format!("{}/cli/busybox", registry.host())) && row.contains("v1"),
        "{table}"
    );
    let quiet = run(&["images", "-q"]);
    assert_eq!(String::from_utf8_lossy(&quiet.stdout).trim(), image.config_digest());

    let missing = run(&["pull", &format!("{}/cli/missing:v1", registry.host())]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("not found"));
}
