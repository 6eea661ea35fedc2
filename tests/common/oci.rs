//! In-memory OCI/Docker images: reproducible layers, config and manifests.

use std::collections::BTreeMap;
use std::io::Write;

use bytes::Bytes;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tar::{Builder, EntryType, Header};

/// Fixed mtime for every tar entry, so layer digests are reproducible.
pub const MTIME: u64 = 1_600_000_000;

/// Applets linked to `/bin/busybox` in [`busybox_layer`].
pub const BUSYBOX_APPLETS: &[&str] = &[
    "sh", "ls", "cat", "echo", "sleep", "id", "true", "false", "env", "hostname", "mkdir", "rm", "touch", "wc", "head",
    "tail", "grep", "stat", "readlink", "ps", "kill", "printf", "test", "uname", "whoami", "chmod", "ln", "cp", "mv",
    "sed", "pwd", "tee", "nc", "wget", "mount", "top", "ip", "httpd",
];

/// `sha256:<hex>` of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// Manifest media-type family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavour {
    Oci,
    Docker,
}

impl Flavour {
    pub fn manifest_media_type(self) -> &'static str {
        match self {
            Flavour::Oci => "application/vnd.oci.image.manifest.v1+json",
            Flavour::Docker => "application/vnd.docker.distribution.manifest.v2+json",
        }
    }

    /// OCI image index or Docker manifest list.
    pub fn index_media_type(self) -> &'static str {
        match self {
            Flavour::Oci => "application/vnd.oci.image.index.v1+json",
            Flavour::Docker => "application/vnd.docker.distribution.manifest.list.v2+json",
        }
    }

    pub fn config_media_type(self) -> &'static str {
        match self {
            Flavour::Oci => "application/vnd.oci.image.config.v1+json",
            Flavour::Docker => "application/vnd.docker.container.image.v1+json",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

/// One layer: the uncompressed tar and its (possibly compressed) blob.
#[derive(Clone, Debug)]
pub struct Layer {
    pub tar: Bytes,
    pub compression: Compression,
    pub blob: Bytes,
    /// Digest of `blob`.
    pub digest: String,
    /// Digest of `tar`.
    pub diff_id: String,
}

impl Layer {
    pub fn new(tar: impl Into<Bytes>, compression: Compression) -> Layer {
        let tar: Bytes = tar.into();
        let blob: Bytes = match compression {
            Compression::None => tar.clone(),
            Compression::Gzip => {
                // flate2 writes mtime 0 and no file name: deterministic output.
                let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
                enc.write_all(&tar).expect("gzip");
                enc.finish().expect("gzip").into()
            }
            Compression::Zstd => zstd::encode_all(&tar[..], 3).expect("zstd").into(),
        };
        Layer {
            digest: sha256_digest(&blob),
            diff_id: sha256_digest(&tar),
            tar,
            compression,
            blob,
        }
    }

    /// The same tar with another compression.
    pub fn with_compression(&self, compression: Compression) -> Layer {
        Layer::new(self.tar.clone(), compression)
    }

    pub fn size(&self) -> u64 {
        self.blob.len() as u64
    }

    pub fn media_type(&self, flavour: Flavour) -> &'static str {
        match (flavour, self.compression) {
            (Flavour::Oci, Compression::None) => "application/vnd.oci.image.layer.v1.tar",
            (Flavour::Oci, Compression::Gzip) => "application/vnd.oci.image.layer.v1.tar+gzip",
            // Docker has no zstd layer type; its tooling uses the OCI one.
            (_, Compression::Zstd) => "application/vnd.oci.image.layer.v1.tar+zstd",
            (Flavour::Docker, Compression::None) => "application/vnd.docker.image.rootfs.diff.tar",
            (Flavour::Docker, Compression::Gzip) => "application/vnd.docker.image.rootfs.diff.tar.gzip",
        }
    }

    fn descriptor(&self, flavour: Flavour) -> Value {
        json!({"mediaType": self.media_type(flavour), "digest": self.digest, "size": self.size()})
    }
}

#[derive(Clone, Debug)]
pub struct History {
    pub created_by: String,
    pub empty_layer: bool,
}

/// The runtime-relevant part of an image config; serialized by [`TestImage::config_json`].
#[derive(Clone, Debug)]
pub struct ImageConfig {
    pub created: String,
    pub architecture: String,
    pub os: String,
    pub variant: Option<String>,
    pub env: Vec<String>,
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
    pub user: String,
    pub working_dir: String,
    pub labels: BTreeMap<String, String>,
    pub stop_signal: Option<String>,
    /// E.g. "8080/tcp".
    pub exposed_ports: Vec<String>,
    /// `rootfs.diff_ids`; `None` derives them from the image's layers.
    pub diff_ids: Option<Vec<String>>,
    pub history: Vec<History>,
}

impl Default for ImageConfig {
    /// Host architecture, linux, a standard PATH and `Cmd: ["sh"]`.
    fn default() -> Self {
        ImageConfig {
            created: "2024-01-01T00:00:00Z".into(),
            architecture: host_arch().into(),
            os: "linux".into(),
            variant: None,
            env: vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()],
            entrypoint: None,
            cmd: Some(vec!["sh".into()]),
            user: String::new(),
            working_dir: String::new(),
            labels: BTreeMap::new(),
            stop_signal: None,
            exposed_ports: Vec::new(),
            diff_ids: None,
            history: Vec::new(),
        }
    }
}

/// GOARCH name of the host.
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

#[derive(Clone, Debug)]
pub struct TestImage {
    pub config: ImageConfig,
    pub layers: Vec<Layer>,
}

impl TestImage {
    pub fn new(config: ImageConfig, layers: Vec<Layer>) -> TestImage {
        TestImage { config, layers }
    }

    /// Default config over a gzip [`busybox_layer`].
    pub fn busybox() -> TestImage {
        TestImage::new(ImageConfig::default(), vec![busybox_layer(Compression::Gzip)])
    }

    pub fn config_json(&self) -> Vec<u8> {
        let c = &self.config;
        let mut runtime = serde_json::Map::new();
        let mut set = |key: &str, value: Value| {
            runtime.insert(key.into(), value);
        };
        if !c.user.is_empty() {
            set("User", json!(c.user));
        }
        if !c.exposed_ports.is_empty() {
            let ports: serde_json::Map<_, _> = c.exposed_ports.iter().map(|p| (p.clone(), json!({}))).collect();
            set("ExposedPorts", ports.into());
        }
        if !c.env.is_empty() {
            set("Env", json!(c.env));
        }
        if let Some(entrypoint) = &c.entrypoint {
            set("Entrypoint", json!(entrypoint));
        }
        if let Some(cmd) = &c.cmd {
            set("Cmd", json!(cmd));
        }
        if !c.working_dir.is_empty() {
            set("WorkingDir", json!(c.working_dir));
        }
        if !c.labels.is_empty() {
            set("Labels", json!(c.labels));
        }
        if let Some(signal) = &c.stop_signal {
            set("StopSignal", json!(signal));
        }
        let diff_ids = c
            .diff_ids
            .clone()
            .unwrap_or_else(|| self.layers.iter().map(|l| l.diff_id.clone()).collect());
        let history: Vec<Value> = c
            .history
            .iter()
            .map(|h| json!({"created": c.created, "created_by": h.created_by, "empty_layer": h.empty_layer}))
            .collect();
        let mut config = json!({
            "created": c.created,
            "architecture": c.architecture,
            "os": c.os,
            "config": runtime,
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": history,
        });
        if let Some(variant) = &c.variant {
            config["variant"] = json!(variant);
        }
        serde_json::to_vec(&config).expect("serialize config")
    }

    pub fn config_digest(&self) -> String {
        sha256_digest(&self.config_json())
    }

    pub fn manifest_json(&self, flavour: Flavour) -> Vec<u8> {
        let config = self.config_json();
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": flavour.manifest_media_type(),
            "config": {
                "mediaType": flavour.config_media_type(),
                "digest": sha256_digest(&config),
                "size": config.len(),
            },
            "layers": self.layers.iter().map(|l| l.descriptor(flavour)).collect::<Vec<_>>(),
        });
        serde_json::to_vec(&manifest).expect("serialize manifest")
    }

    pub fn manifest_digest(&self, flavour: Flavour) -> String {
        sha256_digest(&self.manifest_json(flavour))
    }
}

/// One tar entry for [`layer_from_entries`]. Paths are relative ("etc/passwd").
#[derive(Clone, Debug)]
pub enum Entry {
    File {
        path: String,
        data: Vec<u8>,
        mode: u32,
        uid: u64,
        gid: u64,
    },
    Dir {
        path: String,
        mode: u32,
        uid: u64,
        gid: u64,
    },
    Symlink {
        path: String,
        target: String,
    },
    /// `target` is another path in the archive.
    HardLink {
        path: String,
        target: String,
    },
    /// Deletes `path` from lower layers: written as `dir/.wh.name`.
    Whiteout(String),
    /// Hides the lower layers' contents of this directory: `dir/.wh..wh..opq`.
    Opaque(String),
    CharDevice {
        path: String,
        major: u32,
        minor: u32,
        mode: u32,
    },
    /// Header name and link name written verbatim (GNU long-name records past
    /// 100 bytes), so `../x`, `/abs` etc. get through. Mode 0644, root-owned.
    Raw {
        name: Vec<u8>,
        kind: EntryType,
        link: Vec<u8>,
        data: Vec<u8>,
    },
}

impl Entry {
    /// Root-owned 0644 file.
    pub fn file(path: &str, data: impl Into<Vec<u8>>) -> Entry {
        Entry::File {
            path: path.into(),
            data: data.into(),
            mode: 0o644,
            uid: 0,
            gid: 0,
        }
    }

    /// Root-owned 0755 directory.
    pub fn dir(path: &str) -> Entry {
        Entry::Dir {
            path: path.into(),
            mode: 0o755,
            uid: 0,
            gid: 0,
        }
    }

    pub fn symlink(path: &str, target: &str) -> Entry {
        Entry::Symlink {
            path: path.into(),
            target: target.into(),
        }
    }
}

fn header(kind: EntryType, mode: u32, uid: u64, gid: u64, size: u64) -> Header {
    let mut h = Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(uid);
    h.set_gid(gid);
    h.set_size(size);
    h.set_mtime(MTIME);
    h
}

/// Appends a GNU `././@LongLink` record carrying `value` for the next header.
fn append_long_name(b: &mut Builder<Vec<u8>>, kind: EntryType, value: &[u8]) {
    let mut h = header(kind, 0o644, 0, 0, value.len() as u64 + 1);
    h.as_old_mut().name[..13].copy_from_slice(b"././@LongLink");
    h.set_cksum();
    b.append(&h, [value, b"\0"].concat().as_slice())
        .expect("append long name");
}

fn split_parent(path: &str) -> (&str, &str) {
    match path.rsplit_once('/') {
        Some((dir, name)) => (dir, name),
        None => ("", path),
    }
}

fn in_dir(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.into()
    } else {
        format!("{dir}/{name}")
    }
}

/// Serializes `entries` in order into an uncompressed tar.
pub fn tar_from_entries(entries: &[Entry]) -> Vec<u8> {
    let mut b = Builder::new(Vec::new());
    for entry in entries {
        let res = match entry {
            Entry::File {
                path,
                data,
                mode,
                uid,
                gid,
            } => {
                let mut h = header(EntryType::Regular, *mode, *uid, *gid, data.len() as u64);
                b.append_data(&mut h, path, data.as_slice())
            }
            Entry::Dir { path, mode, uid, gid } => {
                let mut h = header(EntryType::Directory, *mode, *uid, *gid, 0);
                b.append_data(&mut h, format!("{}/", path.trim_end_matches('/')), &[][..])
            }
            Entry::Symlink { path, target } => {
                let mut h = header(EntryType::Symlink, 0o777, 0, 0, 0);
                b.append_link(&mut h, path, target)
            }
            Entry::HardLink { path, target } => {
                let mut h = header(EntryType::Link, 0o644, 0, 0, 0);
                b.append_link(&mut h, path, target)
            }
            Entry::Whiteout(path) => {
                let (dir, name) = split_parent(path);
                let mut h = header(EntryType::Regular, 0o644, 0, 0, 0);
                b.append_data(&mut h, in_dir(dir, &format!(".wh.{name}")), &[][..])
            }
            Entry::Opaque(dir) => {
                let mut h = header(EntryType::Regular, 0o644, 0, 0, 0);
                b.append_data(&mut h, in_dir(dir, ".wh..wh..opq"), &[][..])
            }
            Entry::CharDevice {
                path,
                major,
                minor,
                mode,
            } => {
                let mut h = header(EntryType::Char, *mode, 0, 0, 0);
                h.set_device_major(*major).expect("device major");
                h.set_device_minor(*minor).expect("device minor");
                b.append_data(&mut h, path, &[][..])
            }
            Entry::Raw { name, kind, link, data } => {
                if name.len() > 100 {
                    append_long_name(&mut b, EntryType::GNULongName, name);
                }
                if link.len() > 100 {
                    append_long_name(&mut b, EntryType::GNULongLink, link);
                }
                let mut h = header(*kind, 0o644, 0, 0, data.len() as u64);
                let old = h.as_old_mut();
                let n = name.len().min(100);
                old.name[..n].copy_from_slice(&name[..n]);
                let n = link.len().min(100);
                old.linkname[..n].copy_from_slice(&link[..n]);
                h.set_cksum();
                b.append(&h, data.as_slice())
            }
        };
        res.unwrap_or_else(|e| panic!("tar entry {entry:?}: {e}"));
    }
    b.into_inner().expect("finish tar")
}

pub fn layer_from_entries(entries: &[Entry], compression: Compression) -> Layer {
    Layer::new(tar_from_entries(entries), compression)
}

/// Busybox root filesystem: `/bin/busybox` from the host plus [`BUSYBOX_APPLETS`]
/// symlinks, users root(0), tester(1000, also in group extra=2000) and nobody,
/// `/tmp` (1777), `/root`, `/home/tester` (1000:1000).
pub fn busybox_layer(compression: Compression) -> Layer {
    Layer::new(tar_from_entries(&busybox_entries()), compression)
}

pub fn busybox_entries() -> Vec<Entry> {
    let busybox = std::fs::read("/bin/busybox").expect("read /bin/busybox (busybox-static)");
    let dir = |path: &str, mode, owner| Entry::Dir {
        path: path.into(),
        mode,
        uid: owner,
        gid: owner,
    };
    let mut entries = vec![
        dir("bin", 0o755, 0),
        Entry::File {
            path: "bin/busybox".into(),
            data: busybox,
            mode: 0o755,
            uid: 0,
            gid: 0,
        },
    ];
    entries.extend(
        BUSYBOX_APPLETS
            .iter()
            .map(|applet| Entry::symlink(&format!("bin/{applet}"), "busybox")),
    );
    entries.extend([
        dir("etc", 0o755, 0),
        Entry::file(
            "etc/passwd",
            "root:x:0:0:root:/root:/bin/sh\n\
             tester:x:1000:1000:tester:/home/tester:/bin/sh\n\
             nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        ),
        Entry::file(
            "etc/group",
            "root:x:0:\ntester:x:1000:\nextra:x:2000:tester\nnobody:x:65534:\n",
        ),
        dir("home", 0o755, 0),
        dir("home/tester", 0o755, 1000),
        dir("root", 0o700, 0),
        dir("tmp", 0o1777, 0),
    ]);
    entries
}

/// A layer holding one file `filler/<seed>.bin` of `size` pseudo-random
/// (incompressible) bytes, reproducible per seed.
pub fn filler_layer(size: usize, seed: u64, compression: Compression) -> Layer {
    // splitmix64
    let mut state = seed;
    let mut data = Vec::with_capacity(size + 8);
    while data.len() < size {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        data.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    data.truncate(size);
    let entries = [Entry::dir("filler"), Entry::file(&format!("filler/{seed}.bin"), data)];
    layer_from_entries(&entries, compression)
}
