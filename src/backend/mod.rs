//! Backends run sandboxes and containers. The runtime handler picks one at
//! RunPodSandbox; the choice is stored with the sandbox.

pub mod linux;

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Linux,
}

/// Runtime handlers that select the Linux container backend.
pub const LINUX_HANDLERS: [&str; 4] = ["", "runc", "crun", "podvisor"];

pub fn backend_for_handler(handler: &str) -> Option<BackendKind> {
    LINUX_HANDLERS.contains(&handler).then_some(BackendKind::Linux)
}
