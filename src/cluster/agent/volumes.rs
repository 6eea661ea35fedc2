//! Pod volumes on the node: emptyDir (a directory, or tmpfs for
//! `medium: Memory`), hostPath with its type checks, and file volumes
//! (configMap, secret, downwardAPI, projected) materialized under the pod's
//! directory in the agent's state dir. File volumes are swapped atomically
//! through a `..data` symlink, as kubelet does, so containers see updates.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use k8s_openapi::api::core::v1::{DownwardAPIVolumeFile, KeyToPath, Volume};

use super::AgentOptions;
use super::env::{Downward, Sources, field_value, resource_value};
use crate::cluster::client::Client;

/// A volume ready to be mounted into containers.
#[derive(Clone, Debug)]
pub struct Prepared {
    pub host_path: PathBuf,
    /// File volumes are always mounted read-only.
    pub read_only: bool,
    /// emptyDir and hostPath directories, where a missing subPath is created.
    pub writable_dir: bool,
}

/// File path (relative) -> content and mode.
type Payload = BTreeMap<String, (Vec<u8>, u32)>;

const DEFAULT_MODE: i32 = 0o644;

pub fn pod_dir(options: &AgentOptions, uid: &str) -> PathBuf {
    options.state_dir.join("pods").join(uid)
}

/// Makes every volume of the pod ready; idempotent, and it refreshes file
/// volumes whose sources changed.
pub async fn prepare(
    client: &Client,
    options: &AgentOptions,
    facts: &Downward<'_>,
) -> Result<HashMap<String, Prepared>, String> {
    let pod = facts.pod;
    let uid = pod.metadata.uid.as_deref().unwrap_or_default();
    let base = pod_dir(options, uid).join("volumes");
    let spec = pod.spec.clone().unwrap_or_default();
    let fs_group = spec.security_context.as_ref().and_then(|s| s.fs_group);
    let mut sources = Sources::default();
    let mut prepared = HashMap::new();
    for volume in spec.volumes.iter().flatten() {
        let name = &volume.name;
        let fail = |e: String| format!("MountVolume.SetUp failed for volume {name:?} : {e}");
        let ready = prepare_one(client, &mut sources, facts, &base, volume, fs_group)
            .await
            .map_err(fail)?;
        prepared.insert(name.clone(), ready);
    }
    Ok(prepared)
}

async fn prepare_one(
    client: &Client,
    sources: &mut Sources,
    facts: &Downward<'_>,
    base: &Path,
    volume: &Volume,
    fs_group: Option<i64>,
) -> Result<Prepared, String> {
    let namespace = facts.pod.metadata.namespace.as_deref().unwrap_or("default");
    let io = |e: io::Error| e.to_string();
    if let Some(empty) = &volume.empty_dir {
        let dir = base.join("empty-dir").join(&volume.name);
        create_dir(&dir, 0o777).map_err(io)?;
        if empty.medium.as_deref() == Some("Memory") {
            let size = empty
                .size_limit
                .as_ref()
                .and_then(super::quantity::bytes)
                .map(|b| format!(",size={b}"))
                .unwrap_or_default();
            mount_tmpfs(&dir, &format!("mode=0777{size}")).map_err(io)?;
        }
        set_group(&dir, fs_group, 0o2777).map_err(io)?;
        return Ok(Prepared {
            host_path: dir,
            read_only: false,
            writable_dir: true,
        });
    }
    if let Some(host) = &volume.host_path {
        let path = PathBuf::from(&host.path);
        check_host_path(&path, host.type_.as_deref().unwrap_or_default())?;
        return Ok(Prepared {
            writable_dir: path.is_dir(),
            host_path: path,
            read_only: false,
        });
    }
    let (kind, payload, tmpfs) = if let Some(cm) = &volume.config_map {
        let data = sources.config_map(client, namespace, &cm.name).await?;
        let data = match data {
            Some(data) => data.into_iter().map(|(k, v)| (k, v.into_bytes())).collect(),
            None if cm.optional.unwrap_or(false) => BTreeMap::new(),
            None => return Err(format!("configmap {:?} not found", cm.name)),
        };
        (
            "configmap",
            key_payload(&data, cm.items.as_deref(), cm.default_mode)?,
            false,
        )
    } else if let Some(secret) = &volume.secret {
        let name = secret.secret_name.clone().unwrap_or_default();
        let data = match sources.secret_bytes(client, namespace, &name).await? {
            Some(data) => data,
            None if secret.optional.unwrap_or(false) => BTreeMap::new(),
            None => return Err(format!("secret {name:?} not found")),
        };
        (
            "secret",
            key_payload(&data, secret.items.as_deref(), secret.default_mode)?,
            true,
        )
    } else if let Some(downward) = &volume.downward_api {
        let payload = downward_payload(
            facts,
            downward.items.as_deref().unwrap_or_default(),
            downward.default_mode,
        )?;
        ("downward-api", payload, false)
    } else if let Some(projected) = &volume.projected {
        let mut payload = Payload::new();
        let default_mode = projected.default_mode;
        for source in projected.sources.iter().flatten() {
            if let Some(cm) = &source.config_map {
                match sources.config_map(client, namespace, &cm.name).await? {
                    Some(data) => {
                        let data = data.into_iter().map(|(k, v)| (k, v.into_bytes())).collect();
                        payload.extend(key_payload(&data, cm.items.as_deref(), default_mode)?);
                    }
                    None if cm.optional.unwrap_or(false) => {}
                    None => return Err(format!("configmap {:?} not found", cm.name)),
                }
            }
            if let Some(secret) = &source.secret {
                match sources.secret_bytes(client, namespace, &secret.name).await? {
                    Some(data) => payload.extend(key_payload(&data, secret.items.as_deref(), default_mode)?),
                    None if secret.optional.unwrap_or(false) => {}
                    None => return Err(format!("secret {:?} not found", secret.name)),
                }
            }
            if let Some(downward) = &source.downward_api {
                payload.extend(downward_payload(
                    facts,
                    downward.items.as_deref().unwrap_or_default(),
                    default_mode,
                )?);
            }
        }
        ("projected", payload, true)
    } else {
        return Err("this volume type is not supported by the podvisor node agent".into());
    };
    let dir = base.join(kind).join(&volume.name);
    create_dir(&dir, 0o755).map_err(io)?;
    if tmpfs {
        mount_tmpfs(&dir, "mode=0755").map_err(io)?;
    }
    write_payload(&dir, &payload, fs_group).map_err(io)?;
    Ok(Prepared {
        host_path: dir,
        read_only: true,
        writable_dir: false,
    })
}

fn mode_of(mode: Option<i32>, default: Option<i32>) -> u32 {
    (mode.or(default).unwrap_or(DEFAULT_MODE) & 0o777) as u32
}

/// One file per key, or just the listed `items` (a missing listed key is an error).
fn key_payload(
    data: &BTreeMap<String, Vec<u8>>,
    items: Option<&[KeyToPath]>,
    default_mode: Option<i32>,
) -> Result<Payload, String> {
    let mut payload = Payload::new();
    match items {
        Some(items) if !items.is_empty() => {
            for item in items {
                let bytes = data
                    .get(&item.key)
                    .ok_or_else(|| format!("configuration key {:?} not found", item.key))?;
                payload.insert(item.path.clone(), (bytes.clone(), mode_of(item.mode, default_mode)));
            }
        }
        _ => {
            for (key, bytes) in data {
                payload.insert(key.clone(), (bytes.clone(), mode_of(None, default_mode)));
            }
        }
    }
    Ok(payload)
}

fn downward_payload(
    facts: &Downward<'_>,
    items: &[DownwardAPIVolumeFile],
    default_mode: Option<i32>,
) -> Result<Payload, String> {
    let mut payload = Payload::new();
    for item in items {
        let value = if let Some(field) = &item.field_ref {
            field_value(facts, field)?
        } else if let Some(resource) = &item.resource_field_ref {
            resource_value(facts, None, resource)?
        } else {
            continue;
        };
        payload.insert(
            item.path.clone(),
            (value.into_bytes(), mode_of(item.mode, default_mode)),
        );
    }
    Ok(payload)
}

fn check_host_path(path: &Path, kind: &str) -> Result<(), String> {
    let meta = std::fs::metadata(path);
    let shown = path.display();
    let want = |ok: bool, what: &str| {
        if ok {
            Ok(())
        } else {
            Err(format!("hostPath type check failed: {shown} is not a {what}"))
        }
    };
    match kind {
        "" => Ok(()),
        "DirectoryOrCreate" if meta.is_err() => create_dir(path, 0o755).map_err(|e| e.to_string()),
        "FileOrCreate" if meta.is_err() => std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map(drop)
            .map_err(|e| format!("creating {shown}: {e}")),
        _ => {
            let meta = meta.map_err(|_| format!("hostPath type check failed: {shown} does not exist"))?;
            let kind_of = meta.file_type();
            match kind {
                "DirectoryOrCreate" | "Directory" => want(kind_of.is_dir(), "directory"),
                "FileOrCreate" | "File" => want(kind_of.is_file(), "file"),
                "Socket" => want(kind_of.is_socket(), "socket"),
                "CharDevice" => want(kind_of.is_char_device(), "character device"),
                "BlockDevice" => want(kind_of.is_block_device(), "block device"),
                other => Err(format!("unknown hostPath type {other:?}")),
            }
        }
    }
}

fn create_dir(path: &Path, mode: u32) -> io::Result<()> {
    if !path.is_dir() {
        std::fs::create_dir_all(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

fn set_group(path: &Path, gid: Option<i64>, mode: u32) -> io::Result<()> {
    if let Some(gid) = gid {
        std::os::unix::fs::chown(path, None, Some(gid as u32))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

/// Mount points in this process's mount table at or below `dir`.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(PathBuf::from)
        .filter(|m| m.starts_with(dir))
        .collect()
}

fn mount_tmpfs(dir: &Path, data: &str) -> io::Result<()> {
    if mounts_under(dir).iter().any(|m| m == dir) {
        return Ok(());
    }
    use nix::mount::MsFlags;
    nix::mount::mount(
        Some("tmpfs"),
        dir,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(data),
    )
    .map_err(io::Error::from)
}

/// A relative path without `..`, as volume items must be.
fn safe_relative(path: &str) -> bool {
    let path = Path::new(path);
    !path.as_os_str().is_empty() && path.components().all(|c| matches!(c, Component::Normal(_)))
}

/// Writes `payload` into `dir` atomically: files go into a fresh `..<digest>`
/// directory, `..data` is switched to it with a rename, and each top-level
/// name is a symlink through `..data`. Unchanged payloads are left alone.
fn write_payload(dir: &Path, payload: &Payload, fs_group: Option<i64>) -> io::Result<()> {
    use sha2::Digest;
    let mut digest = sha2::Sha256::new();
    for (path, (bytes, mode)) in payload {
        if !safe_relative(path) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid item path {path:?}"),
            ));
        }
        digest.update(path.as_bytes());
        digest.update(mode.to_le_bytes());
        digest.update((bytes.len() as u64).to_le_bytes());
        digest.update(bytes);
    }
    let version = format!("..{}", hex::encode(&digest.finalize()[..12]));
    let data_link = dir.join("..data");
    if std::fs::read_link(&data_link).is_ok_and(|t| t == Path::new(&version)) {
        return Ok(());
    }
    let previous = std::fs::read_link(&data_link).ok();
    let staged = dir.join(&version);
    let _ = std::fs::remove_dir_all(&staged);
    std::fs::create_dir(&staged)?;
    for (path, (bytes, mode)) in payload {
        let file = staged.join(path);
        if let Some(parent) = file.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&file, bytes)?;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(*mode))?;
        if let Some(gid) = fs_group {
            std::os::unix::fs::chown(&file, None, Some(gid as u32))?;
        }
    }
    let temporary = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&temporary);
    std::os::unix::fs::symlink(&version, &temporary)?;
    std::fs::rename(&temporary, &data_link)?;
    let top: std::collections::BTreeSet<String> = payload
        .keys()
        .filter_map(|p| p.split('/').next().map(str::to_string))
        .collect();
    for name in &top {
        let link = dir.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(Path::new("..data").join(name), &link)?;
        }
    }
    for entry in std::fs::read_dir(dir)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("..") && !top.contains(&name) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    if let Some(previous) = previous {
        let _ = std::fs::remove_dir_all(dir.join(previous));
    }
    Ok(())
}

/// Unmounts and removes a pod's directory (volumes and termination-message files).
pub fn remove(options: &AgentOptions, uid: &str) -> io::Result<()> {
    let dir = pod_dir(options, uid);
    if !dir.exists() {
        return Ok(());
    }
    let mut mounts = mounts_under(&dir);
    mounts.sort_by_key(|m| std::cmp::Reverse(m.as_os_str().len()));
    for mount in &mounts {
        nix::mount::umount2(mount, nix::mount::MntFlags::MNT_DETACH).map_err(io::Error::from)?;
    }
    if !mounts_under(&dir).is_empty() {
        return Err(io::Error::other(format!("{} still has mounts", dir.display())));
    }
    std::fs::remove_dir_all(&dir)
}

/// Pod uids that have a directory in the state dir.
pub fn known_pods(options: &AgentOptions) -> Vec<String> {
    std::fs::read_dir(options.state_dir.join("pods"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// Where a volumeMount's `subPath` points, refusing escapes from the volume.
pub fn sub_path(volume: &Prepared, sub_path: &str) -> Result<PathBuf, String> {
    if sub_path.is_empty() {
        return Ok(volume.host_path.clone());
    }
    if !safe_relative(sub_path) {
        return Err(format!("invalid subPath {sub_path:?}"));
    }
    let path = volume.host_path.join(sub_path);
    if !path.exists() && volume.writable_dir {
        create_dir(&path, 0o755).map_err(|e| format!("creating subPath {sub_path:?}: {e}"))?;
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_swaps_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let mut payload = Payload::new();
        payload.insert("a".into(), (b"1".to_vec(), 0o644));
        payload.insert("sub/b".into(), (b"2".to_vec(), 0o600));
        write_payload(dir.path(), &payload, None).unwrap();
        assert_eq!(std::fs::read(dir.path().join("a")).unwrap(), b"1");
        assert_eq!(std::fs::read(dir.path().join("sub/b")).unwrap(), b"2");
        let mode = std::fs::metadata(dir.path().join("sub/b"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let first = std::fs::read_link(dir.path().join("..data")).unwrap();
        write_payload(dir.path(), &payload, None).unwrap();
        assert_eq!(std::fs::read_link(dir.path().join("..data")).unwrap(), first);
        payload.remove("sub/b");
        payload.insert("a".into(), (b"3".to_vec(), 0o644));
        write_payload(dir.path(), &payload, None).unwrap();
        assert_eq!(std::fs::read(dir.path().join("a")).unwrap(), b"3");
        assert!(std::fs::symlink_metadata(dir.path().join("sub")).is_err());
        assert!(!dir.path().join(first).exists());
        let bad = Payload::from([("../x".to_string(), (vec![], 0o644))]);
        assert!(write_payload(dir.path(), &bad, None).is_err());
    }

    #[test]
    fn host_path_types() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("d");
        assert!(check_host_path(&d, "Directory").is_err());
        check_host_path(&d, "DirectoryOrCreate").unwrap();
        check_host_path(&d, "Directory").unwrap();
        assert!(check_host_path(&d, "File").is_err());
        let f = dir.path().join("f");
        check_host_path(&f, "FileOrCreate").unwrap();
        check_host_path(&f, "File").unwrap();
        assert!(check_host_path(&f, "Socket").is_err());
        check_host_path(&dir.path().join("none"), "").unwrap();
    }

    #[test]
    fn sub_paths_stay_inside() {
        let dir = tempfile::tempdir().unwrap();
        let volume = Prepared {
            host_path: dir.path().into(),
            read_only: false,
            writable_dir: true,
        };
        assert_eq!(sub_path(&volume, "x/y").unwrap(), dir.path().join("x/y"));
        assert!(dir.path().join("x/y").is_dir());
        assert!(sub_path(&volume, "../etc").is_err());
        assert!(sub_path(&volume, "/etc").is_err());
    }
}
