//! CRI RuntimeService: validate, convert, call the manager, convert back.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tonic::{Request, Response, Status};

use tonic::codegen::BoxStream;
use tracing::Instrument;

use super::errors::manager_status;
use super::proto::runtime as cri;
use super::proto::runtime::runtime_service_server::RuntimeService;
use super::runtime_convert as convert;
use super::{CRI_API_VERSION, RUNTIME_NAME};
use crate::manager::EventKind;
use crate::manager::records::ContainerState;
use crate::streaming::{StreamError, StreamingServer};

/// Facts about this runtime that Status reports.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RuntimeInfo {
    pub root: std::path::PathBuf,
    pub state: std::path::PathBuf,
    pub socket: std::path::PathBuf,
    pub cgroup_layout: crate::cgroups::Layout,
    pub config: crate::config::Config,
}

pub struct RuntimeServiceImpl {
    info: RuntimeInfo,
    manager: crate::manager::Manager,
    /// Hands out the URLs of Exec, Attach and PortForward.
    streaming: Arc<StreamingServer>,
    /// The pod CIDR kubelet last handed over through UpdateRuntimeConfig.
    pod_cidr: Mutex<String>,
    /// Last CPU sample per container or sandbox id, for nanocores.
    cpu_samples: Mutex<HashMap<String, (i64, u64)>>,
}

impl RuntimeServiceImpl {
    pub fn new(info: RuntimeInfo, manager: crate::manager::Manager, streaming: Arc<StreamingServer>) -> Self {
        RuntimeServiceImpl {
            info,
            manager,
            streaming,
            pod_cidr: Mutex::new(String::new()),
            cpu_samples: Mutex::new(HashMap::new()),
        }
    }
}

fn condition(kind: &str, ready: bool, reason: &str, message: &str) -> cri::RuntimeCondition {
    cri::RuntimeCondition {
        r#type: kind.to_string(),
        status: ready,
        reason: reason.to_string(),
        message: message.to_string(),
    }
}

#[tonic::async_trait]
impl RuntimeService for RuntimeServiceImpl {
    async fn version(&self, _request: Request<cri::VersionRequest>) -> Result<Response<cri::VersionResponse>, Status> {
        Ok(Response::new(cri::VersionResponse {
            version: "0.1.0".to_string(),
            runtime_name: RUNTIME_NAME.to_string(),
            runtime_version: env!("CARGO_PKG_VERSION").to_string(),
            runtime_api_version: CRI_API_VERSION.to_string(),
        }))
    }

    async fn status(&self, request: Request<cri::StatusRequest>) -> Result<Response<cri::StatusResponse>, Status> {
        let network = match self.manager.network_ready().await {
            Ok(_) => condition("NetworkReady", true, "", ""),
            Err(why) => condition("NetworkReady", false, "NetworkPluginNotReady", &why),
        };
        let conditions = vec![condition("RuntimeReady", true, "", ""), network];
        let mut info = HashMap::new();
        if request.into_inner().verbose {
            let pod_cidr = self.pod_cidr.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let details = serde_json::json!({
                "runtime": &self.info,
                "podCIDR": pod_cidr,
                "podSubnets": self.manager.pod_subnets(),
                "cgroupDriver": "cgroupfs",
                "vm": self.manager.vm_info(),
            });
            info.insert("info".to_string(), details.to_string());
        }
        Ok(Response::new(cri::StatusResponse {
            status: Some(cri::RuntimeStatus { conditions }),
            info,
            runtime_handlers: crate::backend::all_handlers()
                .map(|name| cri::RuntimeHandler {
                    name: name.to_string(),
                    features: Some(cri::RuntimeHandlerFeatures {
                        recursive_read_only_mounts: true,
                        user_namespaces: true,
                    }),
                })
                .collect(),
            features: Some(cri::RuntimeFeatures {
                supplemental_groups_policy: true,
                user_namespaces_host_network: false,
            }),
        }))
    }

    async fn runtime_config(
        &self,
        _request: Request<cri::RuntimeConfigRequest>,
    ) -> Result<Response<cri::RuntimeConfigResponse>, Status> {
        Ok(Response::new(cri::RuntimeConfigResponse {
            linux: Some(cri::LinuxRuntimeConfiguration {
                cgroup_driver: cri::CgroupDriver::Cgroupfs as i32,
            }),
        }))
    }

    async fn update_runtime_config(
        &self,
        request: Request<cri::UpdateRuntimeConfigRequest>,
    ) -> Result<Response<cri::UpdateRuntimeConfigResponse>, Status> {
        let pod_cidr = request
            .into_inner()
            .runtime_config
            .and_then(|c| c.network_config)
            .map(|n| n.pod_cidr)
            .unwrap_or_default();
        if !pod_cidr.is_empty() {
            tracing::info!(pod_cidr, "pod CIDR updated");
            *self.pod_cidr.lock().unwrap_or_else(|e| e.into_inner()) = pod_cidr;
        }
        Ok(Response::new(cri::UpdateRuntimeConfigResponse {}))
    }

    async fn run_pod_sandbox(
        &self,
        request: Request<cri::RunPodSandboxRequest>,
    ) -> Result<Response<cri::RunPodSandboxResponse>, Status> {
        let request = request.into_inner();
        let config = request
            .config
            .ok_or_else(|| Status::invalid_argument("sandbox config is required"))?;
        let spec = convert::sandbox_spec(config, request.runtime_handler).map_err(Status::invalid_argument)?;
        let span =
            tracing::info_span!("RunPodSandbox", pod = %spec.metadata.name, namespace = %spec.metadata.namespace);
        let manager = self.manager.clone();
        let id = detached(async move { manager.run_sandbox(spec).await }.instrument(span)).await?;
        Ok(Response::new(cri::RunPodSandboxResponse { pod_sandbox_id: id }))
    }

    async fn stop_pod_sandbox(
        &self,
        request: Request<cri::StopPodSandboxRequest>,
    ) -> Result<Response<cri::StopPodSandboxResponse>, Status> {
        let id = request.into_inner().pod_sandbox_id;
        let span = tracing::info_span!("StopPodSandbox", sandbox = %id);
        let manager = self.manager.clone();
        detached(async move { manager.stop_sandbox(&id).await }.instrument(span)).await?;
        Ok(Response::new(cri::StopPodSandboxResponse {}))
    }

    async fn remove_pod_sandbox(
        &self,
        request: Request<cri::RemovePodSandboxRequest>,
    ) -> Result<Response<cri::RemovePodSandboxResponse>, Status> {
        let id = request.into_inner().pod_sandbox_id;
        let span = tracing::info_span!("RemovePodSandbox", sandbox = %id);
        let manager = self.manager.clone();
        detached(async move { manager.remove_sandbox(&id).await }.instrument(span)).await?;
        Ok(Response::new(cri::RemovePodSandboxResponse {}))
    }

    async fn pod_sandbox_status(
        &self,
        request: Request<cri::PodSandboxStatusRequest>,
    ) -> Result<Response<cri::PodSandboxStatusResponse>, Status> {
        let request = request.into_inner();
        let record = self.manager.sandbox(&request.pod_sandbox_id).map_err(manager_status)?;
        let mut info = HashMap::new();
        if request.verbose {
            let details = serde_json::json!({
                "backend": record.backend,
                "runtime": record.runtime,
                "spec": record.spec,
                "network": record.network,
            });
            info.insert("info".to_string(), details.to_string());
        }
        let containers_statuses = self
            .manager
            .list_containers("", &record.id, None, &HashMap::new())
            .iter()
            .map(convert::container_status)
            .collect();
        Ok(Response::new(cri::PodSandboxStatusResponse {
            status: Some(convert::sandbox_status(&record)),
            info,
            containers_statuses,
            timestamp: crate::manager::now_nanos(),
        }))
    }

    async fn list_pod_sandbox(
        &self,
        request: Request<cri::ListPodSandboxRequest>,
    ) -> Result<Response<cri::ListPodSandboxResponse>, Status> {
        let items = self.sandboxes(request.into_inner().filter);
        Ok(Response::new(cri::ListPodSandboxResponse { items }))
    }

    async fn stream_pod_sandboxes(
        &self,
        request: Request<cri::StreamPodSandboxesRequest>,
    ) -> Result<Response<BoxStream<cri::StreamPodSandboxesResponse>>, Status> {
        let items = self.sandboxes(request.into_inner().filter);
        Ok(Response::new(super::batched(items, 500, |pod_sandboxes| {
            cri::StreamPodSandboxesResponse { pod_sandboxes }
        })))
    }

    async fn create_container(
        &self,
        request: Request<cri::CreateContainerRequest>,
    ) -> Result<Response<cri::CreateContainerResponse>, Status> {
        let request = request.into_inner();
        let config = request
            .config
            .ok_or_else(|| Status::invalid_argument("container config is required"))?;
        let spec = convert::container_spec(config).map_err(Status::invalid_argument)?;
        let span =
            tracing::info_span!("CreateContainer", sandbox = %request.pod_sandbox_id, container = %spec.metadata.name);
        let manager = self.manager.clone();
        let sandbox_id = request.pod_sandbox_id;
        let id = detached(async move { manager.create_container(&sandbox_id, spec).await }.instrument(span)).await?;
        Ok(Response::new(cri::CreateContainerResponse { container_id: id }))
    }

    async fn start_container(
        &self,
        request: Request<cri::StartContainerRequest>,
    ) -> Result<Response<cri::StartContainerResponse>, Status> {
        let id = request.into_inner().container_id;
        let span = tracing::info_span!("StartContainer", container = %id);
        let manager = self.manager.clone();
        detached(async move { manager.start_container(&id).await }.instrument(span)).await?;
        Ok(Response::new(cri::StartContainerResponse {}))
    }

    async fn stop_container(
        &self,
        request: Request<cri::StopContainerRequest>,
    ) -> Result<Response<cri::StopContainerResponse>, Status> {
        let request = request.into_inner();
        let span = tracing::info_span!("StopContainer", container = %request.container_id);
        let manager = self.manager.clone();
        detached(async move { manager.stop_container(&request.container_id, request.timeout).await }.instrument(span))
            .await?;
        Ok(Response::new(cri::StopContainerResponse {}))
    }

    async fn remove_container(
        &self,
        request: Request<cri::RemoveContainerRequest>,
    ) -> Result<Response<cri::RemoveContainerResponse>, Status> {
        let id = request.into_inner().container_id;
        let span = tracing::info_span!("RemoveContainer", container = %id);
        let manager = self.manager.clone();
        detached(async move { manager.remove_container(&id).await }.instrument(span)).await?;
        Ok(Response::new(cri::RemoveContainerResponse {}))
    }

    async fn list_containers(
        &self,
        request: Request<cri::ListContainersRequest>,
    ) -> Result<Response<cri::ListContainersResponse>, Status> {
        let containers = self.containers(request.into_inner().filter);
        Ok(Response::new(cri::ListContainersResponse { containers }))
    }

    async fn stream_containers(
        &self,
        request: Request<cri::StreamContainersRequest>,
    ) -> Result<Response<BoxStream<cri::StreamContainersResponse>>, Status> {
        let containers = self.containers(request.into_inner().filter);
        Ok(Response::new(super::batched(containers, 500, |containers| {
            cri::StreamContainersResponse { containers }
        })))
    }

    async fn container_status(
        &self,
        request: Request<cri::ContainerStatusRequest>,
    ) -> Result<Response<cri::ContainerStatusResponse>, Status> {
        let request = request.into_inner();
        let record = self.manager.container(&request.container_id).map_err(manager_status)?;
        let mut info = HashMap::new();
        if request.verbose {
            let details = serde_json::json!({
                "sandboxID": record.sandbox_id,
                "pid": record.pid,
                "monitorPid": record.monitor_pid,
                "runtime": record.runtime,
                "spec": record.spec,
            });
            info.insert("info".to_string(), details.to_string());
        }
        Ok(Response::new(cri::ContainerStatusResponse {
            status: Some(convert::container_status(&record)),
            info,
        }))
    }

    async fn update_container_resources(
        &self,
        request: Request<cri::UpdateContainerResourcesRequest>,
    ) -> Result<Response<cri::UpdateContainerResourcesResponse>, Status> {
        let request = request.into_inner();
        let resources = convert::resources(request.linux.as_ref());
        let span = tracing::info_span!("UpdateContainerResources", container = %request.container_id);
        self.manager
            .update_resources(&request.container_id, resources)
            .instrument(span)
            .await
            .map_err(manager_status)?;
        Ok(Response::new(cri::UpdateContainerResourcesResponse {}))
    }

    async fn update_pod_sandbox_resources(
        &self,
        request: Request<cri::UpdatePodSandboxResourcesRequest>,
    ) -> Result<Response<cri::UpdatePodSandboxResourcesResponse>, Status> {
        let request = request.into_inner();
        let resources = convert::pod_resources(request.overhead.as_ref(), request.resources.as_ref());
        let span = tracing::info_span!("UpdatePodSandboxResources", sandbox = %request.pod_sandbox_id);
        self.manager
            .update_sandbox_resources(&request.pod_sandbox_id, resources)
            .instrument(span)
            .await
            .map_err(manager_status)?;
        Ok(Response::new(cri::UpdatePodSandboxResourcesResponse {}))
    }

    async fn reopen_container_log(
        &self,
        request: Request<cri::ReopenContainerLogRequest>,
    ) -> Result<Response<cri::ReopenContainerLogResponse>, Status> {
        let id = request.into_inner().container_id;
        self.manager.reopen_log(&id).await.map_err(manager_status)?;
        Ok(Response::new(cri::ReopenContainerLogResponse {}))
    }

    async fn exec_sync(
        &self,
        request: Request<cri::ExecSyncRequest>,
    ) -> Result<Response<cri::ExecSyncResponse>, Status> {
        let request = request.into_inner();
        let span = tracing::info_span!("ExecSync", container = %request.container_id);
        let output = self
            .manager
            .exec_sync(&request.container_id, request.cmd, request.timeout)
            .instrument(span)
            .await
            .map_err(manager_status)?;
        Ok(Response::new(cri::ExecSyncResponse {
            stdout: output.stdout,
            stderr: output.stderr,
            exit_code: output.exit_code,
        }))
    }

    async fn exec(&self, request: Request<cri::ExecRequest>) -> Result<Response<cri::ExecResponse>, Status> {
        let request = request.into_inner();
        let record = self
            .manager
            .exec_target(&request.container_id, request.tty)
            .map_err(manager_status)?;
        let url = self
            .streaming
            .register_exec(crate::streaming::ExecRequest {
                container_id: record.id,
                cmd: request.cmd,
                tty: request.tty,
                stdin: request.stdin,
                stdout: request.stdout,
                stderr: request.stderr,
            })
            .map_err(stream_status)?;
        Ok(Response::new(cri::ExecResponse { url }))
    }

    async fn attach(&self, request: Request<cri::AttachRequest>) -> Result<Response<cri::AttachResponse>, Status> {
        let request = request.into_inner();
        let record = self
            .manager
            .attachable_container(&request.container_id, request.tty)
            .map_err(manager_status)?;
        let url = self
            .streaming
            .register_attach(crate::streaming::AttachRequest {
                container_id: record.id,
                tty: request.tty,
                stdin: request.stdin,
                stdout: request.stdout,
                stderr: request.stderr,
            })
            .map_err(stream_status)?;
        Ok(Response::new(cri::AttachResponse { url }))
    }

    async fn port_forward(
        &self,
        request: Request<cri::PortForwardRequest>,
    ) -> Result<Response<cri::PortForwardResponse>, Status> {
        let request = request.into_inner();
        let record = self
            .manager
            .ready_sandbox(&request.pod_sandbox_id)
            .map_err(manager_status)?;
        let url = self
            .streaming
            .register_portforward(crate::streaming::PortForwardRequest {
                pod_sandbox_id: record.id,
                ports: request.port,
            })
            .map_err(stream_status)?;
        Ok(Response::new(cri::PortForwardResponse { url }))
    }

    async fn container_stats(
        &self,
        request: Request<cri::ContainerStatsRequest>,
    ) -> Result<Response<cri::ContainerStatsResponse>, Status> {
        let record = self
            .manager
            .container(&request.into_inner().container_id)
            .map_err(manager_status)?;
        Ok(Response::new(cri::ContainerStatsResponse {
            stats: Some(self.container_stats_of(&record)),
        }))
    }

    async fn list_container_stats(
        &self,
        request: Request<cri::ListContainerStatsRequest>,
    ) -> Result<Response<cri::ListContainerStatsResponse>, Status> {
        let stats = self.stats_list(request.into_inner().filter);
        Ok(Response::new(cri::ListContainerStatsResponse { stats }))
    }

    async fn stream_container_stats(
        &self,
        request: Request<cri::StreamContainerStatsRequest>,
    ) -> Result<Response<BoxStream<cri::StreamContainerStatsResponse>>, Status> {
        let stats = self.stats_list(request.into_inner().filter);
        Ok(Response::new(super::batched(stats, 200, |container_stats| {
            cri::StreamContainerStatsResponse { container_stats }
        })))
    }

    async fn pod_sandbox_stats(
        &self,
        request: Request<cri::PodSandboxStatsRequest>,
    ) -> Result<Response<cri::PodSandboxStatsResponse>, Status> {
        let record = self
            .manager
            .sandbox(&request.into_inner().pod_sandbox_id)
            .map_err(manager_status)?;
        Ok(Response::new(cri::PodSandboxStatsResponse {
            stats: Some(self.sandbox_stats_of(&record)),
        }))
    }

    async fn list_pod_sandbox_stats(
        &self,
        request: Request<cri::ListPodSandboxStatsRequest>,
    ) -> Result<Response<cri::ListPodSandboxStatsResponse>, Status> {
        let stats = self.sandbox_stats_list(request.into_inner().filter);
        Ok(Response::new(cri::ListPodSandboxStatsResponse { stats }))
    }

    async fn stream_pod_sandbox_stats(
        &self,
        request: Request<cri::StreamPodSandboxStatsRequest>,
    ) -> Result<Response<BoxStream<cri::StreamPodSandboxStatsResponse>>, Status> {
        let stats = self.sandbox_stats_list(request.into_inner().filter);
        Ok(Response::new(super::batched(stats, 200, |pod_sandbox_stats| {
            cri::StreamPodSandboxStatsResponse { pod_sandbox_stats }
        })))
    }

    async fn get_container_events(
        &self,
        _request: Request<cri::GetEventsRequest>,
    ) -> Result<Response<BoxStream<cri::ContainerEventResponse>>, Status> {
        use tokio_stream::StreamExt;
        let manager = self.manager.clone();
        let events = tokio_stream::wrappers::BroadcastStream::new(self.manager.subscribe()).filter_map(move |event| {
            let event = event.ok()?;
            let kind = match event.kind {
                EventKind::Created => cri::ContainerEventType::ContainerCreatedEvent,
                EventKind::Started => cri::ContainerEventType::ContainerStartedEvent,
                EventKind::Stopped => cri::ContainerEventType::ContainerStoppedEvent,
                EventKind::Deleted => cri::ContainerEventType::ContainerDeletedEvent,
            };
            let sandbox = manager.sandbox(&event.sandbox_id).ok();
            let containers_statuses = manager
                .container(&event.container_id)
                .map(|c| vec![convert::container_status(&c)])
                .unwrap_or_default();
            Some(Ok(cri::ContainerEventResponse {
                container_id: event.container_id,
                container_event_type: kind as i32,
                created_at: event.created_at,
                pod_sandbox_status: sandbox.as_ref().map(convert::sandbox_status),
                containers_statuses,
            }))
        });
        Ok(Response::new(Box::pin(events)))
    }
}

fn stream_status(err: StreamError) -> Status {
    let code = match &err {
        StreamError::InvalidArgument(_) => tonic::Code::InvalidArgument,
        StreamError::NotFound(_) => tonic::Code::NotFound,
        StreamError::ResourceExhausted => tonic::Code::ResourceExhausted,
        _ => tonic::Code::Internal,
    };
    super::errors::status(code, &err)
}

/// Runs a state-changing operation to its end even if the caller gives up
/// (kubelet deadlines), so records never lag behind what really happened.
async fn detached<T: Send + 'static>(
    operation: impl std::future::Future<Output = Result<T, crate::manager::ManagerError>> + Send + 'static,
) -> Result<T, Status> {
    match tokio::spawn(operation).await {
        Ok(result) => result.map_err(manager_status),
        Err(err) => Err(Status::internal(format!("operation task failed: {err}"))),
    }
}

impl RuntimeServiceImpl {
    fn sandboxes(&self, filter: Option<cri::PodSandboxFilter>) -> Vec<cri::PodSandbox> {
        let filter = filter.unwrap_or_default();
        let state = filter.state.map(|s| convert::sandbox_state_from_cri(s.state));
        self.manager
            .list_sandboxes(&filter.id, state, &filter.label_selector)
            .iter()
            .map(convert::sandbox_to_cri)
            .collect()
    }

    fn containers(&self, filter: Option<cri::ContainerFilter>) -> Vec<cri::Container> {
        let filter = filter.unwrap_or_default();
        let state = filter.state.map(|s| convert::container_state_from_cri(s.state));
        self.manager
            .list_containers(&filter.id, &filter.pod_sandbox_id, state, &filter.label_selector)
            .iter()
            .map(convert::container_to_cri)
            .collect()
    }

    fn container_stats_of(&self, record: &crate::manager::records::ContainerRecord) -> cri::ContainerStats {
        let now = crate::manager::now_nanos();
        let stats = self.manager.container_stats(record).unwrap_or_default();
        let usage = self.manager.writable_layer_usage(record);
        cri::ContainerStats {
            attributes: Some(cri::ContainerAttributes {
                id: record.id.clone(),
                metadata: Some(cri::ContainerMetadata {
                    name: record.spec.metadata.name.clone(),
                    attempt: record.spec.metadata.attempt,
                }),
                labels: record.spec.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                annotations: record
                    .spec
                    .annotations
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            }),
            cpu: Some(self.cpu_usage(&record.id, now, &stats)),
            memory: Some(memory_usage(now, &stats)),
            writable_layer: Some(cri::FilesystemUsage {
                timestamp: now,
                fs_id: Some(cri::FilesystemIdentifier {
                    mountpoint: record.runtime.rw_dir.display().to_string(),
                }),
                used_bytes: Some(cri::UInt64Value { value: usage.bytes }),
                inodes_used: Some(cri::UInt64Value { value: usage.inodes }),
            }),
            swap: None,
            io: None,
        }
    }

    /// CPU usage with nanocores computed from the previous sample of the same id.
    fn cpu_usage(&self, id: &str, now: i64, stats: &crate::cgroups::Stats) -> cri::CpuUsage {
        let mut samples = self.cpu_samples.lock().unwrap_or_else(|e| e.into_inner());
        let nano_cores = samples.get(id).and_then(|(then, used)| {
            let elapsed = now.checked_sub(*then).filter(|e| *e > 0)?;
            let delta = stats.cpu_usage_ns.checked_sub(*used)?;
            Some((delta as u128 * 1_000_000_000 / elapsed as u128) as u64)
        });
        samples.insert(id.to_string(), (now, stats.cpu_usage_ns));
        // Forget samples of containers and sandboxes that are gone.
        if samples.len() > 4096 {
            samples.retain(|id, _| self.manager.container(id).is_ok() || self.manager.sandbox(id).is_ok());
        }
        cri::CpuUsage {
            timestamp: now,
            usage_core_nano_seconds: Some(cri::UInt64Value {
                value: stats.cpu_usage_ns,
            }),
            usage_nano_cores: Some(cri::UInt64Value {
                value: nano_cores.unwrap_or_default(),
            }),
            psi: None,
        }
    }

    fn stats_list(&self, filter: Option<cri::ContainerStatsFilter>) -> Vec<cri::ContainerStats> {
        let filter = filter.unwrap_or_default();
        self.manager
            .list_containers(
                &filter.id,
                &filter.pod_sandbox_id,
                Some(ContainerState::Running),
                &filter.label_selector,
            )
            .iter()
            .map(|record| self.container_stats_of(record))
            .collect()
    }

    fn sandbox_stats_of(&self, record: &crate::manager::records::SandboxRecord) -> cri::PodSandboxStats {
        let now = crate::manager::now_nanos();
        let running = self
            .manager
            .list_containers("", &record.id, Some(ContainerState::Running), &HashMap::new());
        let stats = match record.backend {
            // QEMU runs outside the pod's cgroup: the pod is its VM.
            crate::backend::BackendKind::Vm => running.first().and_then(|vm| self.manager.container_stats(vm)),
            crate::backend::BackendKind::Linux => self.manager.sandbox_stats(&record.runtime.cgroup_path),
        }
        .unwrap_or_default();
        let containers = running.iter().map(|c| self.container_stats_of(c)).collect();
        cri::PodSandboxStats {
            attributes: Some(cri::PodSandboxAttributes {
                id: record.id.clone(),
                metadata: Some(cri::PodSandboxMetadata {
                    name: record.spec.metadata.name.clone(),
                    uid: record.spec.metadata.uid.clone(),
                    namespace: record.spec.metadata.namespace.clone(),
                    attempt: record.spec.metadata.attempt,
                }),
                labels: record.spec.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                annotations: record
                    .spec
                    .annotations
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            }),
            linux: Some(cri::LinuxPodSandboxStats {
                cpu: Some(self.cpu_usage(&record.id, now, &stats)),
                memory: Some(memory_usage(now, &stats)),
                network: record
                    .runtime
                    .netns
                    .as_deref()
                    .map(|netns| network_usage(now, self.manager.sandbox_interfaces(netns))),
                process: Some(cri::ProcessUsage {
                    timestamp: now,
                    process_count: Some(cri::UInt64Value {
                        value: stats.pids_current,
                    }),
                }),
                containers,
                io: None,
            }),
            windows: None,
        }
    }

    fn sandbox_stats_list(&self, filter: Option<cri::PodSandboxStatsFilter>) -> Vec<cri::PodSandboxStats> {
        let filter = filter.unwrap_or_default();
        self.manager
            .list_sandboxes(
                &filter.id,
                Some(crate::manager::records::SandboxState::Ready),
                &filter.label_selector,
            )
            .iter()
            .map(|record| self.sandbox_stats_of(record))
            .collect()
    }
}

/// The pod's interface counters; `eth0` (the pods' interface) is the default one.
fn network_usage(now: i64, counters: Vec<crate::backend::linux::sandbox::InterfaceCounters>) -> cri::NetworkUsage {
    let value = |value: u64| Some(cri::UInt64Value { value });
    let interfaces: Vec<cri::NetworkInterfaceUsage> = counters
        .into_iter()
        .map(|c| cri::NetworkInterfaceUsage {
            name: c.name,
            rx_bytes: value(c.rx_bytes),
            rx_errors: value(c.rx_errors),
            tx_bytes: value(c.tx_bytes),
            tx_errors: value(c.tx_errors),
        })
        .collect();
    cri::NetworkUsage {
        timestamp: now,
        default_interface: interfaces
            .iter()
            .find(|i| i.name == crate::network::POD_INTERFACE)
            .cloned(),
        interfaces,
    }
}

fn memory_usage(now: i64, stats: &crate::cgroups::Stats) -> cri::MemoryUsage {
    let value = |v: u64| Some(cri::UInt64Value { value: v });
    cri::MemoryUsage {
        timestamp: now,
        working_set_bytes: value(stats.memory_working_set),
        available_bytes: stats.memory_limit.map(|limit| cri::UInt64Value {
            value: limit.saturating_sub(stats.memory_working_set),
        }),
        usage_bytes: value(stats.memory_usage),
        rss_bytes: value(stats.memory_rss),
        page_faults: value(stats.memory_page_faults),
        major_page_faults: value(stats.memory_major_page_faults),
        psi: None,
    }
}
