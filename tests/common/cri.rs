//! CRI request builders and a ready-made "daemon + registry + busybox" fixture
//! for container tests.

use std::collections::HashMap;
use std::time::Duration;

use podvisor::cri::proto::runtime as cri;
use tempfile::TempDir;

use super::daemon::{Daemon, spec};
use super::oci::{Flavour, TestImage};
use super::push::push_image;
use super::registry::Registry;

pub struct Fixture {
    pub daemon: Daemon,
    pub registry: Registry,
    /// The pulled busybox image reference.
    pub image: String,
    pub logs: TempDir,
}

impl Fixture {
    pub async fn start() -> Fixture {
        Self::start_with_config(None).await
    }

    /// With a daemon config of the test's own (without `[network]` the daemon
    /// gets a built-in network of its own).
    pub async fn start_with_config(config: Option<&str>) -> Fixture {
        let registry = Registry::start().await;
        push_image(
            &registry.url(),
            "test/busybox",
            "latest",
            &TestImage::busybox(),
            Flavour::Oci,
        )
        .await;
        let daemon = Daemon::start_with_config(config).await;
        let image = format!("{}/test/busybox:latest", registry.host());
        daemon.pull(&image).await.expect("pull busybox");
        Fixture {
            daemon,
            registry,
            image,
            logs: tempfile::tempdir().expect("log dir"),
        }
    }

    pub async fn runtime(&self) -> cri::runtime_service_client::RuntimeServiceClient<tonic::transport::Channel> {
        self.daemon.runtime().await
    }

    pub fn pod(&self, name: &str) -> cri::PodSandboxConfig {
        cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: name.into(),
                uid: format!("uid-{name}"),
                namespace: "test".into(),
                attempt: 0,
            }),
            hostname: name.into(),
            log_directory: self.logs.path().join(name).display().to_string(),
            // What kubelet sends for a pod without shareProcessNamespace.
            linux: Some(cri::LinuxPodSandboxConfig {
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: Some(kubelet_namespaces()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    pub fn container(&self, name: &str, script: &str) -> cri::ContainerConfig {
        cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: name.into(),
                attempt: 0,
            }),
            image: Some(spec(&self.image)),
            command: vec!["sh".into(), "-c".into(), script.into()],
            log_path: format!("{name}.log"),
            linux: Some(cri::LinuxContainerConfig {
                resources: None,
                security_context: Some(cri::LinuxContainerSecurityContext {
                    namespace_options: Some(kubelet_namespaces()),
                    ..Default::default()
                }),
            }),
            ..Default::default()
        }
    }

    pub async fn run_pod(&self, config: cri::PodSandboxConfig) -> String {
        self.runtime()
            .await
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(config),
                runtime_handler: String::new(),
            })
            .await
            .expect("RunPodSandbox")
            .into_inner()
            .pod_sandbox_id
    }

    pub async fn create(
        &self,
        pod: &str,
        pod_config: &cri::PodSandboxConfig,
        config: cri::ContainerConfig,
    ) -> Result<String, tonic::Status> {
        Ok(self
            .runtime()
            .await
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: pod.into(),
                config: Some(config),
                sandbox_config: Some(pod_config.clone()),
            })
            .await?
            .into_inner()
            .container_id)
    }

    pub async fn start_container(&self, id: &str) -> Result<(), tonic::Status> {
        self.runtime()
            .await
            .start_container(cri::StartContainerRequest {
                container_id: id.into(),
            })
            .await
            .map(|_| ())
    }

    /// Creates and starts a container in a fresh pod; returns (pod, container).
    pub async fn run(&self, pod_name: &str, config: cri::ContainerConfig) -> (String, String) {
        let pod_config = self.pod(pod_name);
        let pod = self.run_pod(pod_config.clone()).await;
        let id = self.create(&pod, &pod_config, config).await.expect("CreateContainer");
        self.start_container(&id).await.expect("StartContainer");
        (pod, id)
    }

    pub async fn status(&self, id: &str) -> cri::ContainerStatus {
        self.runtime()
            .await
            .container_status(cri::ContainerStatusRequest {
                container_id: id.into(),
                verbose: false,
            })
            .await
            .expect("ContainerStatus")
            .into_inner()
            .status
            .expect("a status")
    }

    /// Waits until the container has exited and returns its status.
    pub async fn wait_exit(&self, id: &str) -> cri::ContainerStatus {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let status = self.status(id).await;
            if status.state == cri::ContainerState::ContainerExited as i32 {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "container {id} did not exit: {status:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn exec(&self, id: &str, cmd: &[&str]) -> cri::ExecSyncResponse {
        self.runtime()
            .await
            .exec_sync(cri::ExecSyncRequest {
                container_id: id.into(),
                cmd: cmd.iter().map(|s| s.to_string()).collect(),
                timeout: 10,
            })
            .await
            .expect("ExecSync")
            .into_inner()
    }

    /// Runs `script` in a container of its own pod and returns its log text once it exited.
    pub async fn output_of(&self, pod_name: &str, config: cri::ContainerConfig) -> (cri::ContainerStatus, String) {
        let (_, id) = self.run(pod_name, config).await;
        let status = self.wait_exit(&id).await;
        let log = std::fs::read_to_string(&status.log_path).unwrap_or_default();
        let text: String = log
            .lines()
            .filter_map(|line| line.splitn(4, ' ').nth(3))
            .collect::<Vec<_>>()
            .join("\n");
        (status, text)
    }

    pub async fn remove_pod(&self, pod: &str) {
        let mut runtime = self.runtime().await;
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
}

/// Mount points under `dir` in this process's mount table.
pub fn mounts_under(dir: &std::path::Path) -> Vec<String> {
    let prefix = dir.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .filter(|mount_point| mount_point.starts_with(&prefix))
        .map(str::to_string)
        .collect()
}

/// Processes whose command line mentions `needle`.
pub fn processes_mentioning(needle: &str) -> Vec<i32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let zombie = status.lines().any(|l| l.starts_with("State:") && l.contains('Z'));
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if !zombie && cmdline.contains(needle) {
            found.push(pid);
        }
    }
    found
}

/// Pod network and IPC, a PID namespace per container: kubelet's default.
pub fn kubelet_namespaces() -> cri::NamespaceOption {
    cri::NamespaceOption {
        pid: cri::NamespaceMode::Container as i32,
        ..Default::default()
    }
}

pub fn no_labels() -> HashMap<String, String> {
    HashMap::new()
}
