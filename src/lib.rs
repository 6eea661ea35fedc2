//! podvisor: a Kubernetes CRI runtime that runs pods as Linux containers or as
//! libvirt VMs. The binary's subcommands live in `main.rs`; everything else is here.

pub mod backend;
pub mod cgroups;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod cri;
pub mod daemon;
pub mod image;
pub mod logging;
pub mod manager;
pub mod network;
pub mod spec;
pub mod streaming;
pub mod sys;

/// An error and all its sources, `outer: inner: innermost`, for messages that
/// leave the process (gRPC statuses, CLI output).
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(inner) = source {
        let text = inner.to_string();
        if !message.ends_with(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = inner.source();
    }
    message
}
