//! The in-memory view of the image store, loaded from disk at start.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::manifest::ImageConfig;
use super::reference::Reference;
use super::{ImageError, Paths, digest_hex, io_error};
use crate::sys::fs::Usage;

/// Everything podvisor keeps about one image; the file under `images/`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImageRecord {
    /// The config digest, `sha256:<hex>`.
    pub id: String,
    pub repo_tags: Vec<String>,
    pub repo_digests: Vec<String>,
    /// The image manifest for this node's platform.
    pub manifest_digest: String,
    pub layers: Vec<LayerRecord>,
    /// Compressed layers plus config, as the registry counts it.
    pub size: u64,
    pub config: ImageConfig,
    /// Unix time in nanoseconds.
    pub pulled_at: i64,
    #[serde(default)]
    pub pinned: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LayerRecord {
    pub digest: String,
    pub media_type: String,
    pub size: u64,
    pub diff_id: String,
}

/// Written inside each snapshot directory before it is renamed into place.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct SnapshotMeta {
    pub diff_id: String,
    pub usage: Usage,
}

#[derive(Default)]
pub(super) struct Catalog {
    pub images: HashMap<String, ImageRecord>,
    /// Snapshot usage by diff id.
    pub snapshots: HashMap<String, Usage>,
    /// Blob sizes by digest.
    pub blobs: HashMap<String, u64>,
}

impl Catalog {
    pub fn load(paths: &Paths) -> Result<Catalog, ImageError> {
        for dir in [&paths.images, &paths.blobs, &paths.snapshots] {
            crate::sys::fs::ensure_dir(dir, 0o700).map_err(io_error(format!("creating {}", dir.display())))?;
        }
        // Whatever a crashed daemon left half-done.
        crate::sys::fs::remove_tree(&paths.tmp).map_err(io_error("emptying tmp"))?;
        crate::sys::fs::ensure_dir(&paths.tmp, 0o700).map_err(io_error("creating tmp"))?;

        let mut catalog = Catalog::default();
        for entry in read_dir(&paths.images)? {
            let path = entry.path();
            if path.extension().is_none_or(|ext| ext != "json") {
                // A temporary file of an interrupted atomic write.
                let _ = std::fs::remove_file(&path);
                continue;
            }
            match std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|bytes| serde_json::from_slice::<ImageRecord>(&bytes).map_err(|e| e.to_string()))
            {
                Ok(record) => {
                    catalog.images.insert(record.id.clone(), record);
                }
                Err(err) => {
                    tracing::warn!(path = %path.display(), error = %err, "ignoring unreadable image record")
                }
            }
        }
        for entry in read_dir(&paths.blobs)? {
            let name = entry.file_name().to_string_lossy().into_owned();
            let size = entry.metadata().map(|m| m.len()).unwrap_or_default();
            if name.starts_with('.') {
                let _ = std::fs::remove_file(entry.path());
            } else {
                catalog.blobs.insert(format!("sha256:{name}"), size);
            }
        }
        for entry in read_dir(&paths.snapshots)? {
            let meta = std::fs::read(entry.path().join("meta.json"))
                .ok()
                .and_then(|bytes| serde_json::from_slice::<SnapshotMeta>(&bytes).ok());
            match meta {
                Some(meta) if digest_hex(&meta.diff_id) == entry.file_name().to_string_lossy() => {
                    catalog.snapshots.insert(meta.diff_id, meta.usage);
                }
                _ => {
                    tracing::warn!(path = %entry.path().display(), "removing snapshot without valid metadata");
                    let _ = crate::sys::fs::remove_tree(&entry.path());
                }
            }
        }
        catalog.drop_records_missing_content();
        catalog.dedupe_tags(paths);
        Ok(catalog)
    }

    /// A record whose layers or config are gone (removed by hand) cannot be used.
    fn drop_records_missing_content(&mut self) {
        let broken: Vec<String> = self
            .images
            .values()
            .filter(|r| {
                !self.blobs.contains_key(&r.id) || r.layers.iter().any(|l| !self.snapshots.contains_key(&l.diff_id))
            })
            .map(|r| r.id.clone())
            .collect();
        for id in broken {
            tracing::warn!(image = %id, "forgetting image whose content is missing");
            self.images.remove(&id);
        }
    }

    /// A crash between writing a new record and updating the one that lost a tag
    /// can leave a tag on two images: the newest pull keeps it.
    fn dedupe_tags(&mut self, paths: &Paths) {
        let mut owner: HashMap<String, (i64, String)> = HashMap::new();
        for record in self.images.values() {
            for tag in &record.repo_tags {
                let entry = owner
                    .entry(tag.clone())
                    .or_insert((record.pulled_at, record.id.clone()));
                if record.pulled_at > entry.0 {
                    *entry = (record.pulled_at, record.id.clone());
                }
            }
        }
        for record in self.images.values_mut() {
            let before = record.repo_tags.len();
            record.repo_tags.retain(|tag| owner[tag].1 == record.id);
            if record.repo_tags.len() != before {
                let _ = crate::sys::fs::atomic_write_json(&paths.record(&record.id), record);
            }
        }
    }

    pub fn resolve(&self, image: &str) -> Result<&ImageRecord, ImageError> {
        let not_found = || ImageError::NotFound(image.to_string());
        if image.is_empty() {
            return Err(not_found());
        }
        let as_id = if image.starts_with("sha256:") {
            image.to_string()
        } else {
            format!("sha256:{image}")
        };
        if let Some(record) = self.images.get(&as_id) {
            return Ok(record);
        }
        if let Ok(reference) = Reference::parse(image) {
            let found = match &reference.digest {
                Some(digest) => {
                    let wanted = reference.digested_name(digest);
                    self.images.values().find(|r| r.repo_digests.contains(&wanted))
                }
                None => {
                    let wanted = reference.tagged_name();
                    self.images
                        .values()
                        .find(|r| wanted.as_ref().is_some_and(|w| r.repo_tags.contains(w)))
                }
            };
            if let Some(record) = found {
                return Ok(record);
            }
        }
        let prefix = digest_hex(image);
        if prefix.len() >= 3 && prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
            let mut matches = self.images.values().filter(|r| digest_hex(&r.id).starts_with(prefix));
            if let Some(first) = matches.next() {
                if matches.next().is_some() {
                    return Err(ImageError::Ambiguous(image.to_string()));
                }
                return Ok(first);
            }
        }
        Err(not_found())
    }

    /// What committing `record` changes: the record merged with any existing one
    /// of the same id, first, then every other image that loses a tag to it.
    pub fn plan_commit(&self, mut record: ImageRecord) -> Vec<ImageRecord> {
        if let Some(existing) = self.images.get(&record.id) {
            for tag in &existing.repo_tags {
                if !record.repo_tags.contains(tag) {
                    record.repo_tags.push(tag.clone());
                }
            }
            for digest in &existing.repo_digests {
                if !record.repo_digests.contains(digest) {
                    record.repo_digests.push(digest.clone());
                }
            }
            record.pinned |= existing.pinned;
        }
        let mut changed = Vec::new();
        for other in self.images.values() {
            if other.id != record.id && other.repo_tags.iter().any(|t| record.repo_tags.contains(t)) {
                let mut other = other.clone();
                other.repo_tags.retain(|t| !record.repo_tags.contains(t));
                changed.push(other);
            }
        }
        changed.insert(0, record);
        changed
    }

    /// Forgets unreferenced blobs and snapshots and moves them under `tmp/`,
    /// returning the paths to delete.
    pub fn take_unreferenced(
        &mut self,
        paths: &Paths,
        leases: &HashMap<String, usize>,
    ) -> Result<Vec<PathBuf>, ImageError> {
        let mut used: HashSet<&str> = leases.keys().map(String::as_str).collect();
        for record in self.images.values() {
            used.insert(&record.id);
            used.insert(&record.manifest_digest);
            for digest in &record.repo_digests {
                if let Some((_, digest)) = digest.split_once('@') {
                    used.insert(digest);
                }
            }
            for layer in &record.layers {
                used.insert(&layer.diff_id);
            }
        }
        let unused_blobs: Vec<String> = self
            .blobs
            .keys()
            .filter(|d| !used.contains(d.as_str()))
            .cloned()
            .collect();
        let unused_snapshots: Vec<String> = self
            .snapshots
            .keys()
            .filter(|d| !used.contains(d.as_str()))
            .cloned()
            .collect();
        let mut doomed = Vec::new();
        for (digest, source) in unused_blobs
            .iter()
            .map(|d| (d, paths.blob(d)))
            .chain(unused_snapshots.iter().map(|d| (d, paths.snapshot(d))))
        {
            let target = paths
                .tmp
                .join(format!("gc-{}-{}", digest_hex(digest), rand::random::<u32>()));
            match std::fs::rename(&source, &target) {
                Ok(()) => doomed.push(target),
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => return Err(io_error(format!("freeing {}", source.display()))(err)),
            }
            self.blobs.remove(digest);
            self.snapshots.remove(digest);
        }
        Ok(doomed)
    }

    pub fn usage(&self) -> Usage {
        let mut total = Usage::default();
        for usage in self.snapshots.values() {
            total += *usage;
        }
        for size in self.blobs.values() {
            total += Usage {
                bytes: size.div_ceil(4096) * 4096,
                inodes: 1,
            };
        }
        total
    }
}

fn read_dir(dir: &std::path::Path) -> Result<Vec<std::fs::DirEntry>, ImageError> {
    std::fs::read_dir(dir)
        .and_then(|entries| entries.collect())
        .map_err(io_error(format!("reading {}", dir.display())))
}
