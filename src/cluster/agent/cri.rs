//! The node agent's CRI client: every runtime call goes through the socket, so
//! the agent drives podvisor's daemon or any other CRI runtime alike.

use std::collections::HashMap;
use std::time::Duration;

use tonic::transport::Channel;

use crate::cri::proto::runtime as api;
use crate::cri::proto::runtime::image_service_client::ImageServiceClient;
use crate::cri::proto::runtime::runtime_service_client::RuntimeServiceClient;

/// Longest wait for a runtime call other than pulls and stops.
const CALL_TIMEOUT: Duration = Duration::from_secs(120);
const PULL_TIMEOUT: Duration = Duration::from_secs(15 * 60);

#[derive(Debug, thiserror::Error)]
#[error("CRI {call}: {}", .status.message())]
pub struct CriError {
    pub call: &'static str,
    pub status: tonic::Status,
}

impl CriError {
    pub fn is_not_found(&self) -> bool {
        self.status.code() == tonic::Code::NotFound
    }
}

pub type Result<T> = std::result::Result<T, CriError>;

#[derive(Clone)]
pub struct Cri {
    channel: Channel,
}

async fn call<T>(
    name: &'static str,
    timeout: Duration,
    future: impl Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T> {
    match tokio::time::timeout(timeout, future).await {
        Ok(Ok(response)) => Ok(response.into_inner()),
        Ok(Err(status)) => Err(CriError { call: name, status }),
        Err(_) => Err(CriError {
            call: name,
            status: tonic::Status::deadline_exceeded(format!("no answer in {} s", timeout.as_secs())),
        }),
    }
}

impl Cri {
    /// Connects, retrying until the runtime's socket answers.
    pub async fn connect(endpoint: &str) -> Cri {
        let mut delay = Duration::from_millis(50);
        loop {
            match crate::cri::socket::connect(endpoint).await {
                Ok(channel) => return Cri { channel },
                Err(err) => {
                    tracing::warn!(endpoint, error = %crate::error_chain(&err), "cannot reach the CRI runtime; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    fn runtime(&self) -> RuntimeServiceClient<Channel> {
        RuntimeServiceClient::new(self.channel.clone())
    }

    fn images(&self) -> ImageServiceClient<Channel> {
        ImageServiceClient::new(self.channel.clone())
    }

    pub async fn version(&self) -> Result<api::VersionResponse> {
        let request = api::VersionRequest { version: "v1".into() };
        call("Version", CALL_TIMEOUT, self.runtime().version(request)).await
    }

    pub async fn status(&self) -> Result<api::StatusResponse> {
        call(
            "Status",
            CALL_TIMEOUT,
            self.runtime().status(api::StatusRequest { verbose: false }),
        )
        .await
    }

    /// The pod subnets the runtime reports in its verbose status (podvisor does; other runtimes may not).
    pub async fn pod_subnets(&self) -> Vec<String> {
        let Ok(status) = call(
            "Status",
            CALL_TIMEOUT,
            self.runtime().status(api::StatusRequest { verbose: true }),
        )
        .await
        else {
            return Vec::new();
        };
        status
            .info
            .get("info")
            .and_then(|info| serde_json::from_str::<serde_json::Value>(info).ok())
            .and_then(|info| serde_json::from_value(info.get("podSubnets")?.clone()).ok())
            .unwrap_or_default()
    }

    pub async fn list_sandboxes(&self, labels: HashMap<String, String>) -> Result<Vec<api::PodSandbox>> {
        let request = api::ListPodSandboxRequest {
            filter: Some(api::PodSandboxFilter {
                label_selector: labels,
                ..Default::default()
            }),
        };
        Ok(
            call("ListPodSandbox", CALL_TIMEOUT, self.runtime().list_pod_sandbox(request))
                .await?
                .items,
        )
    }

    pub async fn sandbox_status(&self, id: &str) -> Result<api::PodSandboxStatus> {
        let request = api::PodSandboxStatusRequest {
            pod_sandbox_id: id.into(),
            verbose: false,
        };
        let response = call(
            "PodSandboxStatus",
            CALL_TIMEOUT,
            self.runtime().pod_sandbox_status(request),
        )
        .await?;
        Ok(response.status.unwrap_or_default())
    }

    pub async fn run_sandbox(&self, config: api::PodSandboxConfig, handler: &str) -> Result<String> {
        let request = api::RunPodSandboxRequest {
            config: Some(config),
            runtime_handler: handler.into(),
        };
        Ok(
            call("RunPodSandbox", CALL_TIMEOUT, self.runtime().run_pod_sandbox(request))
                .await?
                .pod_sandbox_id,
        )
    }

    pub async fn stop_sandbox(&self, id: &str) -> Result<()> {
        let request = api::StopPodSandboxRequest {
            pod_sandbox_id: id.into(),
        };
        call("StopPodSandbox", CALL_TIMEOUT, self.runtime().stop_pod_sandbox(request)).await?;
        Ok(())
    }

    pub async fn remove_sandbox(&self, id: &str) -> Result<()> {
        let request = api::RemovePodSandboxRequest {
            pod_sandbox_id: id.into(),
        };
        call(
            "RemovePodSandbox",
            CALL_TIMEOUT,
            self.runtime().remove_pod_sandbox(request),
        )
        .await?;
        Ok(())
    }

    pub async fn list_containers(&self, filter: api::ContainerFilter) -> Result<Vec<api::Container>> {
        let request = api::ListContainersRequest { filter: Some(filter) };
        Ok(
            call("ListContainers", CALL_TIMEOUT, self.runtime().list_containers(request))
                .await?
                .containers,
        )
    }

    pub async fn reopen_container_log(&self, id: &str) -> Result<()> {
        let request = api::ReopenContainerLogRequest {
            container_id: id.into(),
        };
        call(
            "ReopenContainerLog",
            CALL_TIMEOUT,
            self.runtime().reopen_container_log(request),
        )
        .await?;
        Ok(())
    }

    pub async fn container_status(&self, id: &str) -> Result<api::ContainerStatus> {
        let request = api::ContainerStatusRequest {
            container_id: id.into(),
            verbose: false,
        };
        let response = call(
            "ContainerStatus",
            CALL_TIMEOUT,
            self.runtime().container_status(request),
        )
        .await?;
        response.status.ok_or_else(|| CriError {
            call: "ContainerStatus",
            status: tonic::Status::not_found("no status"),
        })
    }

    pub async fn create_container(
        &self,
        sandbox_id: &str,
        config: api::ContainerConfig,
        sandbox_config: api::PodSandboxConfig,
    ) -> Result<String> {
        let request = api::CreateContainerRequest {
            pod_sandbox_id: sandbox_id.into(),
            config: Some(config),
            sandbox_config: Some(sandbox_config),
        };
        Ok(call(
            "CreateContainer",
            CALL_TIMEOUT,
            self.runtime().create_container(request),
        )
        .await?
        .container_id)
    }

    pub async fn start_container(&self, id: &str) -> Result<()> {
        let request = api::StartContainerRequest {
            container_id: id.into(),
        };
        call("StartContainer", CALL_TIMEOUT, self.runtime().start_container(request)).await?;
        Ok(())
    }

    /// Stops with SIGTERM (or the image's stop signal), SIGKILL after `grace_seconds`.
    pub async fn stop_container(&self, id: &str, grace_seconds: i64) -> Result<()> {
        let request = api::StopContainerRequest {
            container_id: id.into(),
            timeout: grace_seconds,
        };
        let limit = CALL_TIMEOUT + Duration::from_secs(grace_seconds.max(0) as u64);
        call("StopContainer", limit, self.runtime().stop_container(request)).await?;
        Ok(())
    }

    pub async fn remove_container(&self, id: &str) -> Result<()> {
        let request = api::RemoveContainerRequest {
            container_id: id.into(),
        };
        call(
            "RemoveContainer",
            CALL_TIMEOUT,
            self.runtime().remove_container(request),
        )
        .await?;
        Ok(())
    }

    pub async fn exec_sync(&self, id: &str, cmd: Vec<String>, timeout_seconds: i64) -> Result<api::ExecSyncResponse> {
        let request = api::ExecSyncRequest {
            container_id: id.into(),
            cmd,
            timeout: timeout_seconds,
        };
        let limit = Duration::from_secs(timeout_seconds.max(1) as u64 + 5);
        call("ExecSync", limit, self.runtime().exec_sync(request)).await
    }

    /// The image's id when it is present.
    pub async fn image_present(&self, image: &str) -> Result<Option<String>> {
        let request = api::ImageStatusRequest {
            image: Some(image_spec(image)),
            verbose: false,
        };
        let response = call("ImageStatus", CALL_TIMEOUT, self.images().image_status(request)).await?;
        Ok(response.image.map(|i| i.id))
    }

    pub async fn pull_image(
        &self,
        image: &str,
        auth: Option<api::AuthConfig>,
        sandbox: Option<api::PodSandboxConfig>,
    ) -> Result<String> {
        let request = api::PullImageRequest {
            image: Some(image_spec(image)),
            auth,
            sandbox_config: sandbox,
        };
        Ok(call("PullImage", PULL_TIMEOUT, self.images().pull_image(request))
            .await?
            .image_ref)
    }

    /// Container lifecycle events, for runtimes that stream them.
    pub async fn container_events(&self) -> Result<tonic::Streaming<api::ContainerEventResponse>> {
        call(
            "GetContainerEvents",
            CALL_TIMEOUT,
            self.runtime().get_container_events(api::GetEventsRequest {}),
        )
        .await
    }
}

pub fn image_spec(image: &str) -> api::ImageSpec {
    api::ImageSpec {
        image: image.into(),
        user_specified_image: image.into(),
        ..Default::default()
    }
}
