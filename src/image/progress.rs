//! Pull progress events, broadcast to whoever watches (the `podvisor pull` bar).

use super::reference::Reference;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerState {
    Waiting,
    Downloading,
    Extracting,
    Done,
    Exists,
}

impl LayerState {
    pub fn as_str(self) -> &'static str {
        match self {
            LayerState::Waiting => "waiting",
            LayerState::Downloading => "downloading",
            LayerState::Extracting => "extracting",
            LayerState::Done => "done",
            LayerState::Exists => "exists",
        }
    }
}

#[derive(Clone, Debug)]
pub struct LayerProgress {
    pub digest: String,
    pub size: u64,
    pub downloaded: u64,
    pub state: LayerState,
}

#[derive(Clone, Debug)]
pub enum PullEventKind {
    /// The manifest is known: all layers, in order.
    Started(Vec<LayerProgress>),
    Layer(LayerProgress),
    Finished {
        image_id: String,
    },
    Failed {
        message: String,
    },
}

#[derive(Clone, Debug)]
pub struct PullEvent {
    /// The normalized reference.
    pub image: String,
    pub kind: PullEventKind,
}

impl PullEvent {
    pub fn new(reference: &Reference, kind: PullEventKind) -> PullEvent {
        PullEvent {
            image: reference.to_string(),
            kind,
        }
    }

    pub fn finished(reference: &Reference, image_id: &str) -> PullEvent {
        PullEvent::new(
            reference,
            PullEventKind::Finished {
                image_id: image_id.to_string(),
            },
        )
    }

    pub fn failed(reference: &Reference, message: &str) -> PullEvent {
        PullEvent::new(
            reference,
            PullEventKind::Failed {
                message: message.to_string(),
            },
        )
    }
}
