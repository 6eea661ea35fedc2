//! The pull pipeline: resolve the manifest, fetch the config, then stream
//! every missing layer from the registry straight into its snapshot, verifying
//! the compressed digest, the size and the diff id on the way.

use std::collections::HashMap;
use std::io::{self, Read};
use std::path::Path;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use super::auth::Keychain;
use super::catalog::{ImageRecord, LayerRecord, SnapshotMeta};
use super::manifest::{self, Descriptor, ManifestKind};
use super::progress::{LayerProgress, LayerState, PullEvent, PullEventKind};
use super::reference::Reference;
use super::registry::{Endpoint, FetchedManifest, RegistryError};
use super::unpack::{self, Compression};
use super::{ImageError, ImageStore, io_error};

/// Per-key async locks, so that one blob is fetched by one pull at a time.
#[derive(Default)]
pub(super) struct KeyedLocks {
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl KeyedLocks {
    async fn lock(&self, key: &str) -> KeyGuard<'_> {
        let lock = {
            let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
            locks.entry(key.to_string()).or_default().clone()
        };
        let guard = lock.clone().lock_owned().await;
        KeyGuard {
            owner: self,
            key: key.to_string(),
            lock,
            _guard: guard,
        }
    }
}

struct KeyGuard<'a> {
    owner: &'a KeyedLocks,
    key: String,
    lock: Arc<tokio::sync::Mutex<()>>,
    _guard: tokio::sync::OwnedMutexGuard<()>,
}

impl Drop for KeyGuard<'_> {
    fn drop(&mut self) {
        let mut locks = self.owner.locks.lock().unwrap_or_else(|e| e.into_inner());
        // Ours, the map's, and the guard's clone: nobody else waits for it.
        if Arc::strong_count(&self.lock) <= 3 {
            locks.remove(&self.key);
        }
    }
}

/// Keeps content a pull needs out of garbage collection until it is committed.
struct Lease<'a> {
    store: &'a ImageStore,
    digests: Vec<String>,
}

impl<'a> Lease<'a> {
    fn new(store: &'a ImageStore) -> Lease<'a> {
        Lease {
            store,
            digests: Vec::new(),
        }
    }

    fn add(&mut self, digest: &str) {
        let mut leases = self.store.inner.leases.lock().unwrap_or_else(|e| e.into_inner());
        *leases.entry(digest.to_string()).or_default() += 1;
        self.digests.push(digest.to_string());
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        let mut leases = self.store.inner.leases.lock().unwrap_or_else(|e| e.into_inner());
        for digest in &self.digests {
            if let Some(count) = leases.get_mut(digest) {
                *count -= 1;
                if *count == 0 {
                    leases.remove(digest);
                }
            }
        }
    }
}

struct PullContext<'a> {
    store: &'a ImageStore,
    reference: &'a Reference,
    endpoint: Endpoint,
    keychain: &'a Keychain,
}

impl PullContext<'_> {
    fn image(&self) -> String {
        self.reference.to_string()
    }

    fn registry_error(&self, source: RegistryError) -> ImageError {
        ImageError::Registry {
            image: self.image(),
            source,
        }
    }

    fn emit(&self, kind: PullEventKind) {
        let _ = self.store.inner.progress.send(PullEvent::new(self.reference, kind));
    }
}

pub(super) async fn pull(
    store: &ImageStore,
    reference: &Reference,
    keychain: &Keychain,
) -> Result<ImageRecord, ImageError> {
    let client = store.client()?;
    let image = reference.to_string();
    let (endpoint, top) =
        client
            .fetch_top_manifest(reference, keychain)
            .await
            .map_err(|source| ImageError::Registry {
                image: image.clone(),
                source,
            })?;
    let ctx = PullContext {
        store,
        reference,
        endpoint,
        keychain,
    };
    if ctx.endpoint.is_mirror {
        tracing::debug!(image, mirror = %ctx.endpoint.base, "pulling through mirror");
    }
    let manifest_error = |source| ImageError::Manifest {
        image: image.clone(),
        source,
    };
    let mut lease = Lease::new(store);
    lease.add(&top.digest);
    let platform_manifest = match manifest::kind_of(&top.media_type).map_err(manifest_error)? {
        ManifestKind::Image => top.clone(),
        ManifestKind::Index => {
            let index = manifest::parse_index(&top.bytes).map_err(manifest_error)?;
            let platform = manifest::node_platform();
            let chosen = manifest::select_platform(&index, &platform).ok_or_else(|| ImageError::NoPlatform {
                image: image.clone(),
                platform: format!("{}/{}", platform.os, platform.architecture),
            })?;
            let fetched = client
                .fetch_manifest(&ctx.endpoint, &reference.repository, &chosen.digest, keychain)
                .await
                .map_err(|e| ctx.registry_error(e))?;
            if let ManifestKind::Index = manifest::kind_of(&fetched.media_type).map_err(manifest_error)? {
                return Err(manifest_error(manifest::ManifestError::Malformed {
                    what: "image index",
                    message: "an index entry for this platform points to another index".into(),
                }));
            }
            fetched
        }
    };
    lease.add(&platform_manifest.digest);
    let parsed = manifest::parse_manifest(&platform_manifest.bytes).map_err(manifest_error)?;
    store_small_blob(store, &top)?;
    store_small_blob(store, &platform_manifest)?;

    let config_digest = parsed.config.digest.clone();
    lease.add(&config_digest);
    let config_bytes = fetch_config(&ctx, &parsed.config).await?;
    let (config, diff_ids) = manifest::parse_config(&config_bytes).map_err(manifest_error)?;
    if diff_ids.len() != parsed.layers.len() {
        return Err(manifest_error(manifest::ManifestError::LayerCountMismatch {
            diff_ids: diff_ids.len(),
            layers: parsed.layers.len(),
        }));
    }
    for diff_id in &diff_ids {
        lease.add(diff_id);
    }

    ctx.emit(PullEventKind::Started(
        parsed
            .layers
            .iter()
            .map(|layer| LayerProgress {
                digest: layer.digest.clone(),
                size: layer.size,
                downloaded: 0,
                state: LayerState::Waiting,
            })
            .collect(),
    ));
    let concurrency = store.inner.config.max_concurrent_downloads;
    let ctx = &ctx;
    let work: Vec<(Descriptor, String)> = parsed.layers.iter().cloned().zip(diff_ids.iter().cloned()).collect();
    futures_util::stream::iter(work)
        .map(|(layer, diff_id)| async move { ensure_snapshot(ctx, &layer, &diff_id).await })
        .buffer_unordered(concurrency)
        .try_collect::<Vec<()>>()
        .await?;

    let layers: Vec<LayerRecord> = parsed
        .layers
        .iter()
        .zip(&diff_ids)
        .map(|(layer, diff_id)| LayerRecord {
            digest: layer.digest.clone(),
            media_type: layer.media_type.clone(),
            size: layer.size,
            diff_id: diff_id.clone(),
        })
        .collect();
    let record = ImageRecord {
        id: config_digest,
        repo_tags: reference.tagged_name().into_iter().collect(),
        repo_digests: vec![reference.digested_name(&top.digest)],
        manifest_digest: platform_manifest.digest.clone(),
        size: parsed.config.size + layers.iter().map(|l| l.size).sum::<u64>(),
        layers,
        config,
        pulled_at: now_nanos(),
        pinned: false,
    };
    commit(store, record).await
}

/// Writes the record (and the records that lost a tag to it) and publishes it.
async fn commit(store: &ImageStore, record: ImageRecord) -> Result<ImageRecord, ImageError> {
    let _commit = store.inner.commit_lock.lock().await;
    // The catalog changes only once the disk agrees.
    let changed = store.catalog().plan_commit(record);
    for changed_record in &changed {
        crate::sys::fs::atomic_write_json(&store.inner.paths.record(&changed_record.id), changed_record)
            .map_err(io_error("writing image record"))?;
    }
    let mut catalog = store.catalog();
    for changed_record in &changed {
        catalog.images.insert(changed_record.id.clone(), changed_record.clone());
    }
    let record = changed.into_iter().next().expect("commit returns the new record first");
    tracing::info!(image = %record.id, tags = ?record.repo_tags, "image pulled");
    Ok(record)
}

fn store_small_blob(store: &ImageStore, fetched: &FetchedManifest) -> Result<(), ImageError> {
    if store.catalog().blobs.contains_key(&fetched.digest) {
        return Ok(());
    }
    crate::sys::fs::atomic_write(&store.inner.paths.blob(&fetched.digest), &fetched.bytes)
        .map_err(io_error("writing manifest blob"))?;
    store
        .catalog()
        .blobs
        .insert(fetched.digest.clone(), fetched.bytes.len() as u64);
    Ok(())
}

async fn fetch_config(ctx: &PullContext<'_>, descriptor: &Descriptor) -> Result<Vec<u8>, ImageError> {
    let store = ctx.store;
    let digest = &descriptor.digest;
    let _fetching = store.inner.fetch_locks.lock(digest).await;
    if store.catalog().blobs.contains_key(digest) {
        return std::fs::read(store.inner.paths.blob(digest)).map_err(io_error("reading image config"));
    }
    let bytes = store
        .client()?
        .fetch_small_blob(
            &ctx.endpoint,
            &ctx.reference.repository,
            digest,
            descriptor.size,
            ctx.keychain,
        )
        .await
        .map_err(|e| ctx.registry_error(e))?;
    crate::sys::fs::atomic_write(&store.inner.paths.blob(digest), &bytes).map_err(io_error("writing image config"))?;
    store.catalog().blobs.insert(digest.clone(), bytes.len() as u64);
    Ok(bytes)
}

/// Makes sure the snapshot of one layer exists, downloading it if needed.
async fn ensure_snapshot(ctx: &PullContext<'_>, layer: &Descriptor, diff_id: &str) -> Result<(), ImageError> {
    let store = ctx.store;
    let _fetching = store.inner.fetch_locks.lock(diff_id).await;
    let progress = |state, downloaded| {
        ctx.emit(PullEventKind::Layer(LayerProgress {
            digest: layer.digest.clone(),
            size: layer.size,
            downloaded,
            state,
        }))
    };
    if store.catalog().snapshots.contains_key(diff_id) {
        progress(LayerState::Exists, layer.size);
        return Ok(());
    }
    let attempts = store.inner.config.attempts;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let work = WorkDir(
            store
                .inner
                .paths
                .tmp
                .join(format!("unpack-{:016x}", rand::random::<u64>())),
        );
        let result = download_snapshot(ctx, layer, diff_id, &work.0, &progress).await;
        drop(work);
        match result {
            Err(ImageError::Registry {
                source: source @ RegistryError::Unreachable { .. },
                ..
            }) if attempt < attempts => {
                tracing::warn!(layer = %layer.digest, attempt, error = %crate::error_chain(&source), "layer download broke off, retrying");
                tokio::time::sleep(std::time::Duration::from_millis(200 << attempt)).await;
            }
            other => return other,
        }
    }
}

async fn download_snapshot(
    ctx: &PullContext<'_>,
    layer: &Descriptor,
    diff_id: &str,
    work: &Path,
    progress: &impl Fn(LayerState, u64),
) -> Result<(), ImageError> {
    let store = ctx.store;
    let unpack_error = |source| ImageError::Unpack {
        image: ctx.image(),
        digest: layer.digest.clone(),
        source,
    };
    let compression = Compression::from_media_type(&layer.media_type).unwrap_or(Compression::Gzip);
    let fs_dir = work.join("fs");
    crate::sys::fs::ensure_dir(&fs_dir, 0o755).map_err(io_error("creating snapshot directory"))?;

    let response = store
        .client()?
        .fetch_blob(&ctx.endpoint, &ctx.reference.repository, &layer.digest, ctx.keychain)
        .await
        .map_err(|e| ctx.registry_error(e))?;
    progress(LayerState::Downloading, 0);

    let (sender, receiver) = mpsc::channel::<io::Result<Bytes>>(64);
    let unpack_dir = fs_dir.clone();
    let unpacking = tokio::task::spawn_blocking(move || {
        let mut reader = HashingReader::new(ChannelReader::new(receiver));
        let stats = unpack::unpack_layer(&mut reader, compression, &unpack_dir)?;
        // The compressed stream may carry bytes past the end of the tar.
        io::copy(&mut reader, &mut io::sink()).map_err(unpack::UnpackError::from_read)?;
        Ok::<_, unpack::UnpackError>((stats, reader.finish()))
    });

    let mut body = response.bytes_stream();
    let mut downloaded: u64 = 0;
    let mut last_report: u64 = 0;
    let mut stream_error = None;
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(chunk) => {
                downloaded += chunk.len() as u64;
                if downloaded > layer.size {
                    stream_error = Some(ctx.registry_error(RegistryError::Mismatch {
                        what: format!("blob {} size", layer.digest),
                        expected: layer.size.to_string(),
                        actual: format!("more than {}", layer.size),
                    }));
                    break;
                }
                if downloaded - last_report >= 256 * 1024 {
                    last_report = downloaded;
                    progress(LayerState::Downloading, downloaded);
                }
                if sender.send(Ok(chunk)).await.is_err() {
                    break; // the unpacker stopped early; its error tells why
                }
            }
            Err(source) => {
                let _ = sender
                    .send(Err(io::Error::new(io::ErrorKind::UnexpectedEof, "download broke off")))
                    .await;
                stream_error = Some(ctx.registry_error(RegistryError::Unreachable {
                    url: ctx.endpoint.base.clone(),
                    source,
                }));
                break;
            }
        }
    }
    if stream_error.is_some() {
        let _ = sender.send(Err(io::Error::other("download aborted"))).await;
    }
    drop(sender);
    progress(LayerState::Extracting, downloaded);
    let unpacked = unpacking
        .await
        .map_err(|err| io_error("unpacking task")(io::Error::other(err.to_string())))?;
    if let Some(err) = stream_error {
        return Err(err);
    }
    let (stats, (digest, size)) = unpacked.map_err(unpack_error)?;
    if size != layer.size {
        return Err(ctx.registry_error(RegistryError::Mismatch {
            what: format!("blob {} size", layer.digest),
            expected: layer.size.to_string(),
            actual: size.to_string(),
        }));
    }
    if digest != layer.digest {
        return Err(ctx.registry_error(RegistryError::Mismatch {
            what: format!("blob {}", layer.digest),
            expected: layer.digest.clone(),
            actual: digest,
        }));
    }
    if stats.diff_id != diff_id {
        return Err(ImageError::DiffIdMismatch {
            image: ctx.image(),
            digest: layer.digest.clone(),
            expected: diff_id.to_string(),
            actual: stats.diff_id,
        });
    }

    let usage_dir = fs_dir.clone();
    let usage = tokio::task::spawn_blocking(move || crate::sys::fs::tree_usage(&usage_dir))
        .await
        .map_err(|err| io_error("measuring snapshot")(io::Error::other(err.to_string())))?
        .map_err(io_error("measuring snapshot"))?;
    let meta = SnapshotMeta {
        diff_id: diff_id.to_string(),
        usage,
    };
    crate::sys::fs::atomic_write_json(&work.join("meta.json"), &meta).map_err(io_error("writing snapshot metadata"))?;
    std::fs::rename(work, store.inner.paths.snapshot(diff_id)).map_err(io_error("committing snapshot"))?;
    store.catalog().snapshots.insert(diff_id.to_string(), usage);
    progress(LayerState::Done, downloaded);
    Ok(())
}

/// A layer's work directory under `tmp/`, removed however the work ends
/// (once committed it has been renamed away, so there is nothing left to remove).
struct WorkDir(std::path::PathBuf);

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = crate::sys::fs::remove_tree(&self.0);
    }
}

/// Reads the chunks a download task sends, for the blocking unpacker.
struct ChannelReader {
    receiver: mpsc::Receiver<io::Result<Bytes>>,
    current: Bytes,
}

impl ChannelReader {
    fn new(receiver: mpsc::Receiver<io::Result<Bytes>>) -> ChannelReader {
        ChannelReader {
            receiver,
            current: Bytes::new(),
        }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.receiver.blocking_recv() {
                Some(Ok(chunk)) => self.current = chunk,
                Some(Err(err)) => return Err(err),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

/// Hashes and counts what passes through.
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
}

impl<R: Read> HashingReader<R> {
    fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }

    fn finish(self) -> (String, u64) {
        (format!("sha256:{}", hex::encode(self.hasher.finalize())), self.count)
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

fn now_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or_default()
}
