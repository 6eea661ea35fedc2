//! CRI RuntimeService. Runtime-wide calls live here; sandbox and container
//! calls answer Unimplemented until the container backend lands.

use std::collections::HashMap;
use std::sync::Mutex;

use tonic::{Request, Response, Status};

use super::proto::runtime as cri;
use super::proto::runtime::runtime_service_server::RuntimeService;
use super::{CRI_API_VERSION, RUNTIME_NAME};

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
    /// The pod CIDR kubelet last handed over through UpdateRuntimeConfig.
    pod_cidr: Mutex<String>,
}

impl RuntimeServiceImpl {
    pub fn new(info: RuntimeInfo) -> Self {
        RuntimeServiceImpl {
            info,
            pod_cidr: Mutex::new(String::new()),
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
    async fn version(
        &self,
        _request: Request<cri::VersionRequest>,
    ) -> Result<Response<cri::VersionResponse>, Status> {
        Ok(Response::new(cri::VersionResponse {
            version: "0.1.0".to_string(),
            runtime_name: RUNTIME_NAME.to_string(),
            runtime_version: env!("CARGO_PKG_VERSION").to_string(),
            runtime_api_version: CRI_API_VERSION.to_string(),
        }))
    }

    async fn status(
        &self,
        request: Request<cri::StatusRequest>,
    ) -> Result<Response<cri::StatusResponse>, Status> {
        let conditions = vec![
            condition("RuntimeReady", true, "", ""),
            condition(
                "NetworkReady",
                false,
                "NetworkNotImplemented",
                "pod networking is not available in this build yet",
            ),
        ];
        let mut info = HashMap::new();
        if request.into_inner().verbose {
            let pod_cidr = self
                .pod_cidr
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            let details = serde_json::json!({
                "runtime": &self.info,
                "podCIDR": pod_cidr,
                "cgroupDriver": "cgroupfs",
            });
            info.insert("info".to_string(), details.to_string());
        }
        Ok(Response::new(cri::StatusResponse {
            status: Some(cri::RuntimeStatus { conditions }),
            info,
            runtime_handlers: Vec::new(),
            features: Some(cri::RuntimeFeatures::default()),
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
}
