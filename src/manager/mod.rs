//! Node-local truth about sandboxes and containers: records and their state
//! machines, the durable record store, rollback of half-done operations,
//! recovery after a restart, and lifecycle events. Calls go down to a backend.

mod containers;
pub mod records;
mod recovery;
mod sandboxes;
mod streaming;
mod vm;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use records::{ContainerRecord, RecordStore, SandboxRecord};

use crate::backend::linux::{LinuxBackend, LinuxError};
use crate::image::ImageStore;

#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{kind} {id:?} not found")]
    NotFound { kind: &'static str, id: String },
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    DeadlineExceeded(String),
    #[error("linux backend")]
    Backend(#[from] LinuxError),
    #[error("VM backend")]
    Vm(#[from] crate::backend::vm::VmError),
    #[error("image")]
    Image(#[from] crate::image::ImageError),
    #[error("pod network")]
    Network(#[from] crate::network::NetworkError),
    #[error("saving state: {context}")]
    Store {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

pub(crate) fn store_error(context: &str) -> impl FnOnce(std::io::Error) -> ManagerError + '_ {
    move |source| ManagerError::Store {
        context: context.to_string(),
        source,
    }
}

/// A container lifecycle event, for GetContainerEvents.
#[derive(Clone, Debug)]
pub struct ContainerEvent {
    pub container_id: String,
    pub sandbox_id: String,
    pub kind: EventKind,
    pub created_at: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Created,
    Started,
    Stopped,
    Deleted,
}

#[derive(Clone)]
pub struct Manager {
    inner: Arc<Inner>,
}

struct Inner {
    images: ImageStore,
    linux: Arc<LinuxBackend>,
    vm: Arc<crate::backend::vm::runtime::VmBackend>,
    network: Arc<crate::network::PodNetwork>,
    store: RecordStore,
    sandboxes: Mutex<HashMap<String, SandboxRecord>>,
    containers: Mutex<HashMap<String, ContainerRecord>>,
    /// One operation at a time per sandbox or container id.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Names in use: pod names, and `sandbox/container name/attempt`.
    names: Mutex<HashMap<String, String>>,
    events: tokio::sync::broadcast::Sender<ContainerEvent>,
}

pub fn now_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or_default()
}

/// A fresh 64-hex-digit id, like other runtimes give.
fn new_id() -> String {
    format!("{:032x}{:032x}", rand::random::<u128>(), rand::random::<u128>())
}

impl Manager {
    pub async fn new(
        images: ImageStore,
        network: crate::network::PodNetwork,
        root: &std::path::Path,
        state: &std::path::Path,
        vm_config: &crate::config::VmConfig,
    ) -> Result<Manager, ManagerError> {
        let linux = Arc::new(LinuxBackend::new(root, state)?);
        let vm = Arc::new(crate::backend::vm::runtime::VmBackend::new(vm_config, state));
        let network = Arc::new(network);
        let store = RecordStore::open(root).map_err(store_error("opening the record store"))?;
        let (events, _) = tokio::sync::broadcast::channel(1024);
        let manager = Manager {
            inner: Arc::new(Inner {
                images,
                linux,
                vm,
                network,
                store,
                sandboxes: Mutex::new(HashMap::new()),
                containers: Mutex::new(HashMap::new()),
                locks: Mutex::new(HashMap::new()),
                names: Mutex::new(HashMap::new()),
                events,
            }),
        };
        manager.recover().await;
        Ok(manager)
    }

    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<ContainerEvent> {
        self.inner.events.subscribe()
    }

    fn emit(&self, record: &ContainerRecord, kind: EventKind) {
        let _ = self.inner.events.send(ContainerEvent {
            container_id: record.id.clone(),
            sandbox_id: record.sandbox_id.clone(),
            kind,
            created_at: now_nanos(),
        });
    }

    async fn lock(&self, id: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = self
            .inner
            .locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(id.to_string())
            .or_default()
            .clone();
        lock.lock_owned().await
    }

    fn forget_lock(&self, id: &str) {
        self.inner.locks.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
    }

    fn sandboxes(&self) -> std::sync::MutexGuard<'_, HashMap<String, SandboxRecord>> {
        self.inner.sandboxes.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn containers(&self) -> std::sync::MutexGuard<'_, HashMap<String, ContainerRecord>> {
        self.inner.containers.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn names(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.inner.names.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Finds a sandbox by full id or unique prefix.
    fn find_sandbox_id(&self, id: &str) -> Option<String> {
        find_by_prefix(self.sandboxes().keys(), id)
    }

    fn find_container_id(&self, id: &str) -> Option<String> {
        find_by_prefix(self.containers().keys(), id)
    }
}

fn find_by_prefix<'a>(ids: impl Iterator<Item = &'a String>, wanted: &str) -> Option<String> {
    if wanted.is_empty() {
        return None;
    }
    let mut matches = ids.filter(|id| id.starts_with(wanted));
    let first = matches.next()?;
    if first.len() == wanted.len() || matches.next().is_none() {
        Some(first.clone())
    } else {
        None
    }
}

/// The name a sandbox reserves: namespace, name, uid and attempt.
fn sandbox_name_key(spec: &crate::spec::SandboxSpec) -> String {
    let m = &spec.metadata;
    format!("pod/{}/{}/{}/{}", m.namespace, m.name, m.uid, m.attempt)
}

/// The name a container reserves within its sandbox: name and attempt.
fn container_name_key(sandbox_id: &str, spec: &crate::spec::ContainerSpec) -> String {
    format!(
        "container/{sandbox_id}/{}/{}",
        spec.metadata.name, spec.metadata.attempt
    )
}

/// Label selectors as the CRI uses them: every key must match exactly.
pub fn labels_match(labels: &std::collections::BTreeMap<String, String>, selector: &HashMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}
