//! Single-layer OCI images of the VM artifacts.
//!
//! podvisor's tests can turn one into their own `TestImage` (tests/common/oci.rs):
//! `TestImage::new(ImageConfig { labels: img.labels.clone(), cmd: None, ..Default::default() },
//! vec![Layer::new(img.layer_tar.clone(), Compression::Gzip)])`, then `push_image` it.
//! [`OciImage::write_layout`] writes a standalone OCI image layout instead.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::Path;

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::initramfs::gzip;

pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
pub const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";

/// Image label naming the VM image kind: [`KIND_CONTAINER_DISK`] or [`KIND_KERNEL_BOOT`].
pub const LABEL_KIND: &str = "io.podvisor.vm.kind";
pub const KIND_CONTAINER_DISK: &str = "containerdisk";
pub const KIND_KERNEL_BOOT: &str = "kernel";
/// Image label with the kernel command line the image was built for.
pub const LABEL_CMDLINE: &str = "io.podvisor.vm.kernel-cmdline";

/// `sha256:<hex>` of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// One uncompressed layer tar plus the config labels.
#[derive(Clone, Debug)]
pub struct OciImage {
    pub layer_tar: Vec<u8>,
    pub labels: BTreeMap<String, String>,
}

/// The serialized blobs of an [`OciImage`] (gzip done once).
pub struct OciBlobs {
    pub layer: Vec<u8>,
    pub config: Vec<u8>,
    pub manifest: Vec<u8>,
}

impl OciImage {
    /// Gzips the layer and serializes config and manifest.
    pub fn blobs(&self) -> io::Result<OciBlobs> {
        let layer = gzip(&self.layer_tar)?;
        let config = serde_json::to_vec(&json!({
            "created": "2024-01-01T00:00:00Z",
            "architecture": "amd64",
            "os": "linux",
            "config": {"Labels": self.labels},
            "rootfs": {"type": "layers", "diff_ids": [sha256_digest(&self.layer_tar)]},
            "history": [{"created": "2024-01-01T00:00:00Z", "created_by": "vmimage"}],
        }))?;
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST_MEDIA_TYPE,
            "config": descriptor(CONFIG_MEDIA_TYPE, &config),
            "layers": [descriptor(LAYER_MEDIA_TYPE, &layer)],
        }))?;
        Ok(OciBlobs {
            layer,
            config,
            manifest,
        })
    }

    /// Writes an OCI image layout (`oci-layout`, `index.json`, `blobs/sha256/*`)
    /// into `dir`, tagging the manifest `tag`; returns the manifest digest.
    pub fn write_layout(&self, dir: &Path, tag: &str) -> io::Result<String> {
        let blobs = self.blobs()?;
        let blob_dir = dir.join("blobs/sha256");
        fs::create_dir_all(&blob_dir)?;
        for blob in [&blobs.layer, &blobs.config, &blobs.manifest] {
            let digest = sha256_digest(blob);
            fs::write(blob_dir.join(&digest["sha256:".len()..]), blob)?;
        }
        let mut manifest = descriptor(MANIFEST_MEDIA_TYPE, &blobs.manifest);
        manifest["annotations"] = json!({"org.opencontainers.image.ref.name": tag});
        let index = json!({"schemaVersion": 2, "mediaType": INDEX_MEDIA_TYPE, "manifests": [manifest]});
        fs::write(dir.join("index.json"), serde_json::to_vec(&index)?)?;
        fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        Ok(sha256_digest(&blobs.manifest))
    }
}

fn descriptor(media_type: &str, blob: &[u8]) -> Value {
    json!({"mediaType": media_type, "digest": sha256_digest(blob), "size": blob.len()})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_self_consistent() {
        let image = OciImage {
            layer_tar: b"not really a tar".to_vec(),
            labels: BTreeMap::from([(LABEL_KIND.to_owned(), KIND_KERNEL_BOOT.to_owned())]),
        };
        let dir = tempfile::tempdir().unwrap();
        let digest = image.write_layout(dir.path(), "latest").unwrap();
        let read_json = |digest: &str| -> Value {
            let path = dir.path().join("blobs/sha256").join(&digest["sha256:".len()..]);
            let bytes = fs::read(path).unwrap();
            assert_eq!(sha256_digest(&bytes), digest);
            serde_json::from_slice(&bytes).unwrap()
        };
        let index: Value = serde_json::from_slice(&fs::read(dir.path().join("index.json")).unwrap()).unwrap();
        assert_eq!(index["manifests"][0]["digest"], digest);
        let manifest = read_json(&digest);
        let config = read_json(manifest["config"]["digest"].as_str().unwrap());
        assert_eq!(config["config"]["Labels"][LABEL_KIND], KIND_KERNEL_BOOT);
        assert_eq!(config["rootfs"]["diff_ids"][0], sha256_digest(&image.layer_tar));
        let layer_digest = manifest["layers"][0]["digest"].as_str().unwrap();
        assert!(dir.path().join("blobs/sha256").join(&layer_digest[7..]).is_file());
    }
}
