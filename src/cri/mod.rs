//! The gRPC face of the node: CRI v1 RuntimeService and ImageService, plus
//! podvisor's pull-progress service, served on one unix socket. Handlers only
//! validate, convert, call the layer below and convert back.

mod convert;
mod errors;
mod image_service;
mod progress_service;
mod runtime_convert;
mod runtime_service;
pub mod socket;
mod streaming_runtime;

pub use image_service::ImageServiceImpl;
pub use progress_service::PullProgressImpl;
pub use runtime_service::{RuntimeInfo, RuntimeServiceImpl};
pub use streaming_runtime::StreamingRuntimeImpl;

/// Code generated from `proto/`.
pub mod proto {
    #[allow(clippy::all, clippy::pedantic, missing_docs)] // reason: generated code
    pub mod runtime {
        tonic::include_proto!("runtime.v1");
    }
    #[allow(clippy::all, clippy::pedantic, missing_docs)] // reason: generated code
    pub mod podvisor {
        tonic::include_proto!("podvisor.v1");
    }
    /// gRPC health checking, for the node agent's gRPC probes.
    #[allow(clippy::all, clippy::pedantic, missing_docs)] // reason: generated code
    pub mod health {
        tonic::include_proto!("grpc.health.v1");
    }
}

/// Sends a list in batches, as the CRI's `Stream*` calls do, keeping each
/// message well under gRPC's default 4 MiB limit.
fn batched<T: Clone, M: Send + 'static>(
    items: Vec<T>,
    size: usize,
    wrap: impl Fn(Vec<T>) -> M,
) -> tonic::codegen::BoxStream<M> {
    let batches: Vec<Result<M, tonic::Status>> = items.chunks(size).map(|chunk| Ok(wrap(chunk.to_vec()))).collect();
    Box::pin(tokio_stream::iter(batches))
}

/// The CRI API version this runtime speaks.
pub const CRI_API_VERSION: &str = "v1";
pub const RUNTIME_NAME: &str = "podvisor";
