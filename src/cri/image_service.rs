//! CRI ImageService.

use std::time::{SystemTime, UNIX_EPOCH};

use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::convert::{credentials_from_cri, image_to_cri};
use super::errors::{image_status, status};
use super::proto::runtime as cri;
use super::proto::runtime::image_service_server::ImageService;
use crate::image::{ImageError, ImageStore};
use tonic::codegen::BoxStream;

pub struct ImageServiceImpl {
    store: ImageStore,
    /// Where container writable layers live, reported by ImageFsInfo.
    containers_dir: std::path::PathBuf,
}

impl ImageServiceImpl {
    pub fn new(store: ImageStore, containers_dir: std::path::PathBuf) -> Self {
        ImageServiceImpl { store, containers_dir }
    }

    fn filtered(&self, filter: Option<cri::ImageFilter>) -> Result<Vec<cri::Image>, Status> {
        let wanted = filter
            .and_then(|f| f.image)
            .map(|spec| spec.image)
            .filter(|s| !s.is_empty());
        let images = match wanted {
            None => self.store.list(),
            Some(image) => match self.store.resolve(&image) {
                Ok(record) => vec![record],
                // A bare repository name lists every tag of it, as `crictl images NAME` expects.
                Err(ImageError::NotFound(_)) => self.store.list_repository(&image),
                Err(err) => return Err(image_status(err)),
            },
        };
        Ok(images.iter().map(image_to_cri).collect())
    }
}

fn spec_image(spec: Option<&cri::ImageSpec>) -> Result<&str, Status> {
    match spec.map(|s| s.image.as_str()) {
        Some(image) if !image.is_empty() => Ok(image),
        _ => Err(Status::invalid_argument(
            "image spec with a non-empty image is required",
        )),
    }
}

#[tonic::async_trait]
impl ImageService for ImageServiceImpl {
    async fn list_images(
        &self,
        request: Request<cri::ListImagesRequest>,
    ) -> Result<Response<cri::ListImagesResponse>, Status> {
        let images = self.filtered(request.into_inner().filter)?;
        Ok(Response::new(cri::ListImagesResponse { images }))
    }

    async fn stream_images(
        &self,
        request: Request<cri::StreamImagesRequest>,
    ) -> Result<Response<BoxStream<cri::StreamImagesResponse>>, Status> {
        let images = self.filtered(request.into_inner().filter)?;
        Ok(Response::new(super::batched(images, 500, |images| {
            cri::StreamImagesResponse { images }
        })))
    }

    async fn image_status(
        &self,
        request: Request<cri::ImageStatusRequest>,
    ) -> Result<Response<cri::ImageStatusResponse>, Status> {
        let request = request.into_inner();
        let image = spec_image(request.image.as_ref())?;
        let span = tracing::debug_span!("ImageStatus", image);
        let _enter = span.enter();
        let Some(record) = self.store.status(image).map_err(image_status)? else {
            return Ok(Response::new(cri::ImageStatusResponse::default()));
        };
        let mut info = std::collections::HashMap::new();
        if request.verbose {
            let config: serde_json::Value = self
                .store
                .config_blob(&record)
                .ok()
                .and_then(|bytes| serde_json::from_slice(&bytes).ok())
                .unwrap_or(serde_json::Value::Null);
            let details = serde_json::json!({
                "id": record.id,
                "manifestDigest": record.manifest_digest,
                "repoTags": record.repo_tags,
                "repoDigests": record.repo_digests,
                "layers": record.layers,
                "snapshots": self.store.layer_dirs(&record),
                "pulledAt": record.pulled_at,
                "config": config,
            });
            info.insert("info".to_string(), details.to_string());
        }
        Ok(Response::new(cri::ImageStatusResponse {
            image: Some(image_to_cri(&record)),
            info,
        }))
    }

    async fn pull_image(
        &self,
        request: Request<cri::PullImageRequest>,
    ) -> Result<Response<cri::PullImageResponse>, Status> {
        let request = request.into_inner();
        let image = spec_image(request.image.as_ref())?.to_string();
        let span = tracing::info_span!("PullImage", image);
        async {
            let creds = credentials_from_cri(request.auth.as_ref())
                .map_err(|err| status(tonic::Code::InvalidArgument, &err))?;
            let started = std::time::Instant::now();
            let record = self.store.pull(&image, creds.as_ref()).await.map_err(image_status)?;
            tracing::debug!(elapsed_ms = started.elapsed().as_millis() as u64, id = %record.id, "pulled");
            Ok(Response::new(cri::PullImageResponse { image_ref: record.id }))
        }
        .instrument(span)
        .await
    }

    async fn remove_image(
        &self,
        request: Request<cri::RemoveImageRequest>,
    ) -> Result<Response<cri::RemoveImageResponse>, Status> {
        let request = request.into_inner();
        let image = spec_image(request.image.as_ref())?;
        let span = tracing::info_span!("RemoveImage", image);
        self.store.remove(image).instrument(span).await.map_err(image_status)?;
        Ok(Response::new(cri::RemoveImageResponse {}))
    }

    async fn image_fs_info(
        &self,
        _request: Request<cri::ImageFsInfoRequest>,
    ) -> Result<Response<cri::ImageFsInfoResponse>, Status> {
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as i64)
            .unwrap_or_default();
        let images = self.store.usage();
        let containers_dir = self.containers_dir.clone();
        let containers = tokio::task::spawn_blocking(move || crate::sys::fs::tree_usage(&containers_dir))
            .await
            .map_err(|err| Status::internal(err.to_string()))?
            .map_err(|err| status(tonic::Code::Internal, &err))?;
        let usage = |mountpoint: &std::path::Path, usage: crate::sys::fs::Usage| cri::FilesystemUsage {
            timestamp,
            fs_id: Some(cri::FilesystemIdentifier {
                mountpoint: mountpoint.display().to_string(),
            }),
            used_bytes: Some(cri::UInt64Value { value: usage.bytes }),
            inodes_used: Some(cri::UInt64Value { value: usage.inodes }),
        };
        Ok(Response::new(cri::ImageFsInfoResponse {
            image_filesystems: vec![usage(&images.mountpoint, images.usage)],
            container_filesystems: vec![usage(&self.containers_dir, containers)],
        }))
    }
}
