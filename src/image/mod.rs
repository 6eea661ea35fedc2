//! The image store: pulls images from registries, keeps content-addressed
//! blobs (manifests, configs) and one unpacked snapshot per layer, and answers
//! lookups by id, tag, digest or id prefix.
//!
//! On disk, under the daemon root:
//! - `images/<id hex>.json`: one record per image, written atomically, last step of a pull;
//! - `blobs/sha256/<hex>`: manifests, indexes and configs;
//! - `snapshots/<diff id hex>/{fs/,meta.json}`: a layer unpacked for overlayfs, renamed
//!   into place only when complete;
//! - `tmp/`: work in progress, emptied at start.

pub mod auth;
mod catalog;
pub mod manifest;
pub mod progress;
mod pull;
pub mod reference;
pub mod registry;
pub mod unpack;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use serde::{Deserialize, Serialize};

pub use auth::Credentials;
use catalog::Catalog;
pub use catalog::ImageRecord;
pub use manifest::ImageConfig;
pub use progress::{LayerState, PullEvent};
use reference::{Reference, ReferenceError};
use registry::{RegistryClient, RegistryError};

use crate::config::RegistryConfig;
use crate::sys::fs::Usage;

/// Read at every pull when the config names no other file.
pub const DEFAULT_AUTH_FILE: &str = "/etc/podvisor/auth.json";

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    #[error("pulling {image}")]
    Registry {
        image: String,
        #[source]
        source: RegistryError,
    },
    #[error("{image} has an unusable manifest")]
    Manifest {
        image: String,
        #[source]
        source: manifest::ManifestError,
    },
    #[error("{image} has no image for {platform}")]
    NoPlatform { image: String, platform: String },
    #[error("layer {digest} of {image}")]
    Unpack {
        image: String,
        digest: String,
        #[source]
        source: unpack::UnpackError,
    },
    #[error("layer {digest} of {image} does not match its config: expected diff id {expected}, got {actual}")]
    DiffIdMismatch {
        image: String,
        digest: String,
        expected: String,
        actual: String,
    },
    #[error("bad credentials")]
    Auth(#[from] auth::AuthError),
    #[error("image {0:?} not found")]
    NotFound(String),
    #[error("image id prefix {0:?} matches several images")]
    Ambiguous(String),
    #[error("image store: {context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot build the registry client")]
    Client(#[source] reqwest::Error),
}

pub(crate) fn io_error(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ImageError {
    let context = context.into();
    move |source| ImageError::Io { context, source }
}

/// Disk usage of the image store.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StoreUsage {
    pub mountpoint: PathBuf,
    pub usage: Usage,
}

#[derive(Clone)]
pub struct ImageStore {
    inner: Arc<Inner>,
}

struct Inner {
    paths: Paths,
    config: RegistryConfig,
    client: OnceLock<RegistryClient>,
    catalog: Mutex<Catalog>,
    /// Serializes commits of image records (disk + memory) with removals.
    commit_lock: tokio::sync::Mutex<()>,
    /// One download per blob or layer at a time, across all pulls.
    fetch_locks: pull::KeyedLocks,
    /// Content that pulls in flight need; garbage collection leaves it alone.
    leases: Mutex<std::collections::HashMap<String, usize>>,
    /// Content that containers use, by container id: kept even when its image is removed.
    pins: Mutex<std::collections::HashMap<String, Vec<String>>>,
    progress: tokio::sync::broadcast::Sender<PullEvent>,
}

#[derive(Clone, Debug)]
pub(crate) struct Paths {
    root: PathBuf,
    images: PathBuf,
    blobs: PathBuf,
    snapshots: PathBuf,
    tmp: PathBuf,
}

impl Paths {
    fn new(root: &Path) -> Paths {
        Paths {
            root: root.to_path_buf(),
            images: root.join("images"),
            blobs: root.join("blobs").join("sha256"),
            snapshots: root.join("snapshots"),
            tmp: root.join("tmp"),
        }
    }

    fn blob(&self, digest: &str) -> PathBuf {
        self.blobs.join(digest_hex(digest))
    }

    fn snapshot(&self, diff_id: &str) -> PathBuf {
        self.snapshots.join(digest_hex(diff_id))
    }

    fn record(&self, id: &str) -> PathBuf {
        self.images.join(format!("{}.json", digest_hex(id)))
    }
}

fn digest_hex(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap_or(digest)
}

impl ImageStore {
    /// Opens (or creates) the store under `root`: loads the records, drops
    /// unfinished work left by a crash and content no image refers to.
    pub fn open(root: &Path, config: RegistryConfig) -> Result<ImageStore, ImageError> {
        let paths = Paths::new(root);
        let catalog = Catalog::load(&paths)?;
        let (progress, _) = tokio::sync::broadcast::channel(1024);
        let store = ImageStore {
            inner: Arc::new(Inner {
                paths,
                config,
                client: OnceLock::new(),
                catalog: Mutex::new(catalog),
                commit_lock: tokio::sync::Mutex::new(()),
                fetch_locks: pull::KeyedLocks::default(),
                leases: Mutex::new(Default::default()),
                pins: Mutex::new(Default::default()),
                progress,
            }),
        };
        Ok(store)
    }

    fn catalog(&self) -> std::sync::MutexGuard<'_, Catalog> {
        self.inner.catalog.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The registry client is built on first use, which keeps an idle daemon small.
    fn client(&self) -> Result<&RegistryClient, ImageError> {
        if let Some(client) = self.inner.client.get() {
            return Ok(client);
        }
        let client = RegistryClient::new(self.inner.config.clone()).map_err(ImageError::Client)?;
        Ok(self.inner.client.get_or_init(|| client))
    }

    pub fn list(&self) -> Vec<ImageRecord> {
        let mut images: Vec<_> = self.catalog().images.values().cloned().collect();
        images.sort_by(|a, b| a.id.cmp(&b.id));
        images
    }

    /// Images with any tag or digest in the repository `name` names
    /// (`busybox`, `registry.k8s.io/pause`); nothing when `name` has a tag or digest.
    pub fn list_repository(&self, name: &str) -> Vec<ImageRecord> {
        let Ok(reference) = Reference::parse(name) else {
            return Vec::new();
        };
        let last = name.rsplit('/').next().unwrap_or(name);
        if last.contains(':') || name.contains('@') {
            return Vec::new();
        }
        let repository = reference.name();
        self.list()
            .into_iter()
            .filter(|record| {
                record.repo_tags.iter().chain(&record.repo_digests).any(|n| {
                    n.strip_prefix(&repository)
                        .is_some_and(|rest| rest.starts_with(':') || rest.starts_with('@'))
                })
            })
            .collect()
    }

    /// Finds an image by id, `sha256:` id, tag, digest reference, or unambiguous id prefix.
    pub fn resolve(&self, image: &str) -> Result<ImageRecord, ImageError> {
        self.catalog().resolve(image).cloned()
    }

    pub fn status(&self, image: &str) -> Result<Option<ImageRecord>, ImageError> {
        match self.resolve(image) {
            Ok(record) => Ok(Some(record)),
            Err(ImageError::NotFound(_)) => Ok(None),
            Err(err) => Err(err),
        }
    }

    /// The raw config blob of an image.
    pub fn config_blob(&self, record: &ImageRecord) -> Result<Vec<u8>, ImageError> {
        std::fs::read(self.inner.paths.blob(&record.id)).map_err(io_error("reading image config"))
    }

    /// The unpacked directories of an image's layers, lowest first.
    pub fn layer_dirs(&self, record: &ImageRecord) -> Vec<PathBuf> {
        record
            .layers
            .iter()
            .map(|layer| self.inner.paths.snapshot(&layer.diff_id).join("fs"))
            .collect()
    }

    /// Removes an image with all its names and frees what nothing else uses.
    /// Removing an unknown image is not an error.
    pub async fn remove(&self, image: &str) -> Result<(), ImageError> {
        let _commit = self.inner.commit_lock.lock().await;
        let record = match self.resolve(image) {
            Ok(record) => record,
            Err(ImageError::NotFound(_)) => return Ok(()),
            Err(err) => return Err(err),
        };
        match std::fs::remove_file(self.inner.paths.record(&record.id)) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
                return Err(io_error("removing image record")(err));
            }
            _ => {}
        }
        self.catalog().images.remove(&record.id);
        tracing::info!(image = %record.id, "image removed");
        self.collect_garbage_now()
    }

    /// Moves every blob and snapshot no image (and no pull in flight) refers to
    /// out of the store, then deletes it in the background.
    /// The content a container uses: its image's config, manifest and layers.
    pub fn content_of(record: &ImageRecord) -> Vec<String> {
        let mut digests = vec![record.id.clone(), record.manifest_digest.clone()];
        digests.extend(record.layers.iter().map(|l| l.diff_id.clone()));
        digests
    }

    /// Keeps `digests` (from [`ImageStore::content_of`]) for `owner` until unpinned.
    pub fn pin(&self, owner: &str, digests: Vec<String>) {
        self.inner
            .pins
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(owner.to_string(), digests);
    }

    /// Releases what `owner` pinned and frees it if nothing else needs it.
    pub fn unpin(&self, owner: &str) {
        let removed = self.inner.pins.lock().unwrap_or_else(|e| e.into_inner()).remove(owner);
        if removed.is_some()
            && let Err(err) = self.collect_garbage_now()
        {
            tracing::warn!(error = %crate::error_chain(&err), "freeing image content");
        }
    }

    /// Frees blobs and snapshots nothing refers to. Called at start once
    /// containers have pinned what they use, and after removals.
    pub fn collect_garbage(&self) -> Result<(), ImageError> {
        self.collect_garbage_now()
    }

    fn collect_garbage_now(&self) -> Result<(), ImageError> {
        let mut leases = self.inner.leases.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for digests in self.inner.pins.lock().unwrap_or_else(|e| e.into_inner()).values() {
            for digest in digests {
                *leases.entry(digest.clone()).or_default() += 1;
            }
        }
        let doomed = self.catalog().take_unreferenced(&self.inner.paths, &leases)?;
        if !doomed.is_empty() {
            tracing::debug!(count = doomed.len(), "freeing unused image content");
            let delete = move || {
                for path in doomed {
                    let _ = crate::sys::fs::remove_tree(&path);
                    let _ = std::fs::remove_file(&path);
                }
            };
            match tokio::runtime::Handle::try_current() {
                Ok(handle) => drop(handle.spawn_blocking(delete)),
                Err(_) => delete(),
            }
        }
        Ok(())
    }

    pub fn usage(&self) -> StoreUsage {
        StoreUsage {
            mountpoint: self.inner.paths.root.clone(),
            usage: self.catalog().usage(),
        }
    }

    fn auth_file(&self) -> PathBuf {
        self.inner
            .config
            .auth_file
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_AUTH_FILE))
    }

    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<PullEvent> {
        self.inner.progress.subscribe()
    }

    /// Pulls `image` and returns its record. Layers already present are reused;
    /// concurrent pulls share downloads.
    ///
    /// The pull runs as a task of its own: a caller that gives up (a kubelet
    /// deadline) does not abort it halfway, and its retry finds the work done.
    pub async fn pull(&self, image: &str, creds: Option<&Credentials>) -> Result<ImageRecord, ImageError> {
        let store = self.clone();
        let image = image.to_string();
        let creds = creds.cloned();
        tokio::spawn(async move { store.pull_now(&image, creds.as_ref()).await })
            .await
            .map_err(|err| io_error("pull task")(std::io::Error::other(err.to_string())))?
    }

    async fn pull_now(&self, image: &str, creds: Option<&Credentials>) -> Result<ImageRecord, ImageError> {
        let reference = Reference::parse(image)?;
        let keychain = auth::Keychain {
            request: creds.cloned(),
            file: auth::load_auth_file(&self.auth_file())?,
        };
        let result = pull::pull(self, &reference, &keychain).await;
        let event = match &result {
            Ok(record) => PullEvent::finished(&reference, &record.id),
            Err(err) => PullEvent::failed(&reference, &crate::error_chain(err)),
        };
        let _ = self.inner.progress.send(event);
        // Pull buffers are large and short-lived: hand them back to the OS.
        // SAFETY: malloc_trim only releases free heap memory.
        unsafe { libc::malloc_trim(0) };
        result
    }
}
