//! Builds the VM artifacts once per (kernel version, inputs) and caches them.
//!
//! Layout: `<cache>/<kernel version>-<16 hex of sha256(inputs)>/{vmlinuz,initrd.gz,disk.qcow2,cmdline}`.
//! A build happens in a private temp dir that is renamed into place, so parallel
//! tests (threads or processes) never see a half-built entry; a loser of the
//! rename race discards its copy and uses the winner's.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

use crate::disk::{self, DEFAULT_CMDLINE};
use crate::oci::{self, OciImage};
use crate::{GuestAgent, InitramfsSpec, Kernel};

/// Bump when the build recipe changes in a way the inputs hash cannot see.
const RECIPE_VERSION: &str = "vmimage-1";

/// Inputs of [`VmImages::build`].
#[derive(Clone, Debug)]
pub struct VmImageSpec {
    pub initramfs: InitramfsSpec,
    /// Kernel command line baked into the disk's `syslinux.cfg`.
    pub cmdline: String,
    pub cache_dir: PathBuf,
}

impl VmImageSpec {
    /// The newest cloud kernel, `/bin/busybox`, [`DEFAULT_CMDLINE`], [`default_cache_dir`].
    pub fn new(agent: GuestAgent) -> io::Result<VmImageSpec> {
        Ok(VmImageSpec {
            initramfs: InitramfsSpec::new(Kernel::find()?, agent),
            cmdline: DEFAULT_CMDLINE.into(),
            cache_dir: default_cache_dir(),
        })
    }
}

/// `$PODVISOR_VM_IMAGE_CACHE`, else `<tmp>/podvisor-vmimage-cache`.
pub fn default_cache_dir() -> PathBuf {
    std::env::var_os("PODVISOR_VM_IMAGE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("podvisor-vmimage-cache"))
}

/// Built artifacts (in the cache: treat as read-only, copy before handing to libvirt,
/// whose dynamic ownership would chown them).
#[derive(Clone, Debug)]
pub struct VmImages {
    pub dir: PathBuf,
    pub kernel_version: String,
    /// Hex digest prefix of the inputs.
    pub key: String,
    pub vmlinuz: PathBuf,
    pub initrd: PathBuf,
    pub disk_qcow2: PathBuf,
    pub cmdline: String,
    /// Whether this call built the entry (false: cache hit or lost the race).
    pub built: bool,
}

impl VmImages {
    pub fn build(spec: &VmImageSpec) -> io::Result<VmImages> {
        let kernel = &spec.initramfs.kernel;
        let cpio = spec.initramfs.build_cpio()?;
        let vmlinuz = fs::read(&kernel.vmlinuz)?;
        let mut hasher = Sha256::new();
        for part in [RECIPE_VERSION.as_bytes(), spec.cmdline.as_bytes(), &vmlinuz, &cpio] {
            hasher.update((part.len() as u64).to_le_bytes());
            hasher.update(part);
        }
        let key = hex::encode(hasher.finalize())[..16].to_owned();
        let dir = spec.cache_dir.join(format!("{}-{key}", kernel.version));
        let mut built = false;
        if !dir.is_dir() {
            fs::create_dir_all(&spec.cache_dir)?;
            remove_stale_temp_dirs(&spec.cache_dir);
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos();
            let tmp = spec
                .cache_dir
                .join(format!(".tmp-{key}-{}-{nanos}", std::process::id()));
            let result = populate(&tmp, &vmlinuz, &cpio, &spec.cmdline).and_then(|()| fs::rename(&tmp, &dir));
            match result {
                Ok(()) => built = true,
                // Another builder renamed its copy into place first.
                Err(_) if dir.is_dir() => {}
                Err(e) => {
                    let _ = fs::remove_dir_all(&tmp);
                    return Err(e);
                }
            }
            let _ = fs::remove_dir_all(&tmp);
        }
        Ok(VmImages {
            kernel_version: kernel.version.clone(),
            key,
            vmlinuz: dir.join("vmlinuz"),
            initrd: dir.join("initrd.gz"),
            disk_qcow2: dir.join("disk.qcow2"),
            cmdline: spec.cmdline.clone(),
            dir,
            built,
        })
    }

    /// KubeVirt containerDisk: one layer with `disk/disk.qcow2` (107:107).
    pub fn container_disk_image(&self) -> io::Result<OciImage> {
        Ok(OciImage {
            layer_tar: disk::container_disk_tar(&self.disk_qcow2)?,
            labels: self.labels(oci::KIND_CONTAINER_DISK),
        })
    }

    /// Direct kernel boot: one layer with `boot/vmlinuz` and `boot/initrd`.
    pub fn kernel_boot_image(&self) -> io::Result<OciImage> {
        Ok(OciImage {
            layer_tar: disk::kernel_boot_tar(&self.vmlinuz, &self.initrd)?,
            labels: self.labels(oci::KIND_KERNEL_BOOT),
        })
    }

    fn labels(&self, kind: &str) -> BTreeMap<String, String> {
        BTreeMap::from([
            (oci::LABEL_KIND.to_owned(), kind.to_owned()),
            (oci::LABEL_CMDLINE.to_owned(), self.cmdline.clone()),
        ])
    }
}

/// Temp dirs of builders that died (an hour is far beyond any build).
fn remove_stale_temp_dirs(cache_dir: &Path) {
    let Ok(entries) = fs::read_dir(cache_dir) else { return };
    for entry in entries.flatten() {
        let stale = entry
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|modified| modified.elapsed().unwrap_or_default() > std::time::Duration::from_secs(3600));
        if stale && entry.file_name().to_string_lossy().starts_with(".tmp-") {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

fn populate(tmp: &Path, vmlinuz: &[u8], cpio: &[u8], cmdline: &str) -> io::Result<()> {
    fs::create_dir(tmp)?;
    // World-readable, so a qemu running as libvirt-qemu can read what tests hand it.
    fs::set_permissions(tmp, fs::Permissions::from_mode(0o755))?;
    fs::write(tmp.join("vmlinuz"), vmlinuz)?;
    fs::write(tmp.join("initrd.gz"), crate::initramfs::gzip(cpio)?)?;
    fs::write(tmp.join("cmdline"), cmdline)?;
    disk::build_boot_disk(
        &tmp.join("vmlinuz"),
        &tmp.join("initrd.gz"),
        cmdline,
        tmp,
        &tmp.join("disk.qcow2"),
    )?;
    for name in ["vmlinuz", "initrd.gz", "cmdline", "disk.qcow2"] {
        fs::set_permissions(tmp.join(name), fs::Permissions::from_mode(0o644))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds for real (needs the packages from the README), then hits the cache;
    /// parallel builders agree on one entry.
    #[test]
    fn builds_once_and_caches() {
        let Ok(mut spec) = VmImageSpec::new(GuestAgent::None) else {
            eprintln!("no cloud kernel; skipping");
            return;
        };
        let cache = tempfile::tempdir().unwrap();
        spec.cache_dir = cache.path().to_owned();
        let results: Vec<VmImages> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..3).map(|_| s.spawn(|| VmImages::build(&spec).unwrap())).collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(results.iter().all(|r| r.dir == results[0].dir));
        assert!(results.iter().filter(|r| r.built).count() <= 1);
        let again = VmImages::build(&spec).unwrap();
        assert!(!again.built);
        assert!(again.dir.ends_with(format!("{}-{}", again.kernel_version, again.key)));
        // Only the final entry is left: no temp dirs.
        assert_eq!(fs::read_dir(cache.path()).unwrap().count(), 1);
        let qcow2 = fs::read(&again.disk_qcow2).unwrap();
        assert_eq!(&qcow2[..4], b"QFI\xfb");
        let initrd = fs::read(&again.initrd).unwrap();
        assert_eq!(&initrd[..2], b"\x1f\x8b");

        spec.cmdline.push_str(" foo=1");
        assert_ne!(VmImages::build(&spec).unwrap().key, again.key);
    }
}
