//! podvisor.v1.PullProgress: live pull progress for `podvisor pull`.

use tokio_stream::StreamExt;
use tokio_stream::wrappers::BroadcastStream;
use tonic::{Request, Response, Status};

use super::proto::podvisor as pv;
use super::proto::podvisor::pull_progress_server::PullProgress;
use crate::image::progress::{LayerProgress, PullEventKind};
use crate::image::reference::Reference;
use crate::image::{ImageStore, PullEvent};
use tonic::codegen::BoxStream;

pub struct PullProgressImpl {
    store: ImageStore,
}

impl PullProgressImpl {
    pub fn new(store: ImageStore) -> Self {
        PullProgressImpl { store }
    }
}

fn layer_to_proto(layer: &LayerProgress) -> pv::LayerProgress {
    pv::LayerProgress {
        digest: layer.digest.clone(),
        size: layer.size,
        downloaded: layer.downloaded,
        state: layer.state.as_str().to_string(),
    }
}

fn event_to_proto(event: PullEvent) -> pv::PullEvent {
    let mut out = pv::PullEvent {
        image: event.image,
        ..Default::default()
    };
    match event.kind {
        PullEventKind::Started(layers) => out.layers = layers.iter().map(layer_to_proto).collect(),
        PullEventKind::Layer(layer) => out.layer = Some(layer_to_proto(&layer)),
        PullEventKind::Finished { image_id } => out.image_id = image_id,
        PullEventKind::Failed { message } => out.error = message,
    }
    out
}

#[tonic::async_trait]
impl PullProgress for PullProgressImpl {
    async fn watch(
        &self,
        request: Request<pv::WatchPullRequest>,
    ) -> Result<Response<BoxStream<pv::PullEvent>>, Status> {
        let wanted = Reference::parse(&request.into_inner().image)
            .map_err(|err| Status::invalid_argument(err.to_string()))?
            .to_string();
        let events = BroadcastStream::new(self.store.subscribe()).filter_map(move |event| match event {
            Ok(event) if event.image == wanted => Some(Ok(event_to_proto(event))),
            // A slow watcher misses events rather than slowing pulls down.
            _ => None,
        });
        Ok(Response::new(Box::pin(events)))
    }
}
