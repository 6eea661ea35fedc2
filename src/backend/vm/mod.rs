//! The libvirt layer of the VM-pod backend: a pod is one libvirt/QEMU domain.
//!
//! - [`probe`]: KVM or TCG, decided once per daemon by actually running a tiny domain.
//! - [`xml`]: the domain XML, written by a small escaping XML writer (plus a tiny reader).
//! - [`domain`]: lifecycle, state, stats and orphan listing over the `virt` crate.
//! - [`disk`]: per-VM qcow2 overlays on a shared read-only base (`qemu-img`).
//! - [`agent`]: `guest-exec` through the QEMU guest agent (libvirt's agent command API).
//! - [`cloudinit`]: the NoCloud `cidata` seed ISO.
//! - [`console`]: the serial console relay that writes the CRI log and serves attach.
//! - [`net`]: the tap and bridge that join the VM's NIC to the pod's network namespace.
//! - [`dhcp`]: the one-lease DHCP server that gives the VM the pod IP.
//! - [`helper`]: `podvisor vm-helper`, the per-VM process running the relay and DHCP.
//! - [`runtime`]: [`runtime::VmBackend`], what the manager calls.
//!
//! libvirt calls block: async callers run them on `spawn_blocking`.

pub mod agent;
pub mod cloudinit;
pub mod console;
pub mod dhcp;
pub mod disk;
pub mod domain;
pub mod helper;
pub mod net;
pub mod probe;
pub mod runtime;
pub mod xml;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The XML namespace of podvisor's element in a domain's `<metadata>`.
pub const METADATA_NS: &str = "https://podvisor.dev/xmlns/vm/1";
/// The prefix used for [`METADATA_NS`] in the domain XML.
pub const METADATA_PREFIX: &str = "podvisor";
/// Domain names start with this, followed by a prefix of the sandbox ID.
pub const DOMAIN_NAME_PREFIX: &str = "podvisor-";

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("{0}")]
    Invalid(String),
    #[error("{context}")]
    Libvirt {
        context: String,
        #[source]
        source: virt::error::Error,
    },
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// An external tool (`qemu-img`, `xorriso`) failed.
    #[error("{tool} failed: {message}")]
    Tool { tool: &'static str, message: String },
    #[error("domain {0} not found")]
    NotFound(String),
    /// The domain has no guest agent channel, or no agent answers on it.
    #[error("no guest agent: {0}")]
    NoAgent(String),
    /// The agent answered with an error, or with something we cannot read.
    #[error("guest agent: {0}")]
    Agent(String),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
}

impl VmError {
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> VmError {
        let context = context.into();
        move |source| VmError::Io { context, source }
    }

    pub fn libvirt(context: impl Into<String>) -> impl FnOnce(virt::error::Error) -> VmError {
        let context = context.into();
        move |source| VmError::Libvirt { context, source }
    }
}

/// Which accelerator a domain runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    /// QEMU's software emulation (libvirt domain type `qemu`).
    Tcg,
}

impl Accel {
    /// The libvirt `<domain type=…>`.
    pub fn domain_type(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "qemu",
        }
    }
}

/// What the domain boots from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmDisk {
    /// A bootable qcow2 overlay (see [`disk::create_overlay`]), booted by the firmware.
    Qcow2Overlay(PathBuf),
    /// Direct kernel boot; `root` is an optional qcow2 disk attached as `vda`.
    DirectKernel {
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        cmdline: String,
        root: Option<PathBuf>,
    },
}

impl VmDisk {
    /// The qcow2 attached as `vda`, if any.
    pub fn root_disk(&self) -> Option<&Path> {
        match self {
            VmDisk::Qcow2Overlay(path) => Some(path),
            VmDisk::DirectKernel { root, .. } => root.as_deref(),
        }
    }
}

/// How the NIC reaches the host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NicAttachment {
    /// An existing tap device (created by podvisor in the pod's network), `managed='no'`.
    Tap(String),
    /// A host bridge; libvirt creates the tap.
    Bridge(String),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmNic {
    pub attachment: NicAttachment,
    /// `52:54:00:…` style; the guest sees it as its MAC.
    pub mac: String,
}

/// CPU limits, as CRI gives them (whole-VM quota, not per vCPU).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuTune {
    pub shares: Option<u64>,
    pub quota: Option<i64>,
    pub period: Option<u64>,
}

/// Which pod and container a domain belongs to; stored in the domain's metadata.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodvisorMetadata {
    pub sandbox_id: String,
    pub container_id: String,
}

/// Everything needed to write a domain's XML.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    /// `podvisor-<sandbox id prefix>`, see [`domain_name`].
    pub name: String,
    pub uuid: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub cpu: CpuTune,
    pub disk: VmDisk,
    /// The cloud-init `cidata` ISO, attached read-only as `vdb`.
    pub seed_iso: Option<PathBuf>,
    pub nic: Option<VmNic>,
    /// The serial console's unix socket; QEMU listens, the console relay connects.
    pub console_socket: PathBuf,
    /// Optional raw copy of all console output, written by virtlogd.
    pub console_raw_log: Option<PathBuf>,
    /// The guest agent channel's unix socket (libvirt connects to it).
    pub agent_socket: PathBuf,
    pub metadata: PodvisorMetadata,
}

/// The domain name for a sandbox: `podvisor-` and the first 12 characters of its ID.
pub fn domain_name(sandbox_id: &str) -> String {
    let prefix: String = sandbox_id.chars().take(12).collect();
    format!("{DOMAIN_NAME_PREFIX}{prefix}")
}

/// A path as UTF-8 (libvirt XML and `qemu-img` arguments need text).
pub(crate) fn path_str(path: &Path) -> Result<&str, VmError> {
    path.to_str()
        .ok_or_else(|| VmError::Invalid(format!("path {} is not UTF-8", path.display())))
}
