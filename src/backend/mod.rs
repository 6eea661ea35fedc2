//! Backends run sandboxes and containers. The runtime handler picks one at
//! RunPodSandbox; the choice is stored with the sandbox.

pub mod linux;
pub mod vm;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Linux,
    /// The pod is one libvirt virtual machine.
    Vm,
}

/// Runtime handlers that select the Linux container backend.
pub const LINUX_HANDLERS: [&str; 4] = ["", "runc", "crun", "podvisor"];
/// Runtime handlers that select the VM backend.
pub const VM_HANDLERS: [&str; 1] = ["vm"];
/// Virtlet's pod annotation; the value [`VIRTLET_RUNTIME`] selects the VM backend.
pub const VIRTLET_ANNOTATION: &str = "kubernetes.io/target-runtime";
pub const VIRTLET_RUNTIME: &str = "virtlet.cloud";

/// Every runtime handler this runtime serves, as Status advertises them.
pub fn all_handlers() -> impl Iterator<Item = &'static str> {
    LINUX_HANDLERS.into_iter().chain(VM_HANDLERS)
}

pub fn backend_for_handler(handler: &str) -> Option<BackendKind> {
    if LINUX_HANDLERS.contains(&handler) {
        Some(BackendKind::Linux)
    } else if VM_HANDLERS.contains(&handler) {
        Some(BackendKind::Vm)
    } else {
        None
    }
}

/// The backend of a new sandbox: its handler, or Virtlet's annotation (for
/// pods migrated from Virtlet, which had no RuntimeClass).
pub fn backend_for_sandbox(handler: &str, annotations: &BTreeMap<String, String>) -> Option<BackendKind> {
    let kind = backend_for_handler(handler)?;
    if annotations.get(VIRTLET_ANNOTATION).map(String::as_str) == Some(VIRTLET_RUNTIME) {
        return Some(BackendKind::Vm);
    }
    Some(kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handlers_and_virtlet_annotation_pick_the_backend() {
        let none = BTreeMap::new();
        assert_eq!(backend_for_sandbox("", &none), Some(BackendKind::Linux));
        assert_eq!(backend_for_sandbox("runc", &none), Some(BackendKind::Linux));
        assert_eq!(backend_for_sandbox("vm", &none), Some(BackendKind::Vm));
        assert_eq!(backend_for_sandbox("kata", &none), None);
        let virtlet = BTreeMap::from([(VIRTLET_ANNOTATION.to_string(), VIRTLET_RUNTIME.to_string())]);
        assert_eq!(backend_for_sandbox("", &virtlet), Some(BackendKind::Vm));
        let other = BTreeMap::from([(VIRTLET_ANNOTATION.to_string(), "runc".to_string())]);
        assert_eq!(backend_for_sandbox("", &other), Some(BackendKind::Linux));
        assert!(all_handlers().any(|h| h == "vm"));
    }
}
