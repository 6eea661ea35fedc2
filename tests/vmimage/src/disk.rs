//! Boot media: a syslinux FAT disk as qcow2 (KubeVirt containerDisk) and the
//! layer tars for both image variants.

use std::fs;
use std::io;
use std::path::Path;
use std::process::Command;

use crate::{other_err, run};

/// Kernel command line of the disk variant; also the suggested one for direct kernel boot.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 quiet";
/// Owner of containerDisk files, as KubeVirt expects (qemu's UID/GID there).
pub const CONTAINER_DISK_OWNER: u64 = 107;
/// Paths inside the image layers.
pub const CONTAINER_DISK_PATH: &str = "disk/disk.qcow2";
pub const KERNEL_PATH: &str = "boot/vmlinuz";
pub const INITRD_PATH: &str = "boot/initrd";

const MIB: u64 = 1 << 20;

/// The `syslinux.cfg` that boots `vmlinuz` with `initrd.gz` and `cmdline`.
pub fn syslinux_cfg(cmdline: &str) -> String {
    format!("DEFAULT linux\nPROMPT 0\nTIMEOUT 0\nLABEL linux\n  KERNEL vmlinuz\n  APPEND initrd=initrd.gz {cmdline}\n")
}

/// Writes a bootable qcow2 to `out`: a partitionless FAT image with syslinux
/// in its boot sector, holding the kernel, initrd and `syslinux.cfg`.
/// Scratch files go to `work` (removed afterwards). Needs `mkfs.vfat`
/// (dosfstools), `syslinux`, `mcopy` (mtools) and `qemu-img` (qemu-utils).
pub fn build_boot_disk(vmlinuz: &Path, initrd: &Path, cmdline: &str, work: &Path, out: &Path) -> io::Result<()> {
    let raw = work.join("disk.raw");
    let cfg = work.join("syslinux.cfg");
    fs::write(&cfg, syslinux_cfg(cmdline))?;
    // Payload plus room for FAT tables, ldlinux.sys/.c32 and slack, in whole MiB.
    let payload = fs::metadata(vmlinuz)?.len() + fs::metadata(initrd)?.len();
    let size = (payload + 4 * MIB).div_ceil(MIB) * MIB;
    fs::File::create(&raw)?.set_len(size)?;
    let result = (|| {
        run(Command::new("mkfs.vfat").args(["-n", "PODVISOR"]).arg(&raw))?;
        run(Command::new("syslinux").arg("--install").arg(&raw))?;
        for (src, name) in [
            (vmlinuz, "vmlinuz"),
            (initrd, "initrd.gz"),
            (cfg.as_path(), "syslinux.cfg"),
        ] {
            let mut mcopy = Command::new("mcopy");
            // mtools would otherwise reject geometry that mkfs.vfat picked for a plain file.
            mcopy.env("MTOOLS_SKIP_CHECK", "1").arg("-i").arg(&raw).arg(src);
            run(mcopy.arg(format!("::{name}")))?;
        }
        run(Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .arg(&raw)
            .arg(out))
    })();
    let _ = fs::remove_file(&raw);
    let _ = fs::remove_file(&cfg);
    result.map_err(|e| other_err(format!("building boot disk: {e}")))
}

/// A containerDisk layer: `disk/disk.qcow2`, both owned by 107:107.
pub fn container_disk_tar(qcow2: &Path) -> io::Result<Vec<u8>> {
    let mut tar = TarWriter::new();
    tar.dir("disk", 0o755, CONTAINER_DISK_OWNER)?;
    tar.file(CONTAINER_DISK_PATH, 0o644, CONTAINER_DISK_OWNER, &fs::read(qcow2)?)?;
    tar.finish()
}

/// A direct-kernel-boot layer: `boot/vmlinuz` and `boot/initrd`, owned by root.
pub fn kernel_boot_tar(vmlinuz: &Path, initrd: &Path) -> io::Result<Vec<u8>> {
    let mut tar = TarWriter::new();
    tar.dir("boot", 0o755, 0)?;
    tar.file(KERNEL_PATH, 0o644, 0, &fs::read(vmlinuz)?)?;
    tar.file(INITRD_PATH, 0o644, 0, &fs::read(initrd)?)?;
    tar.finish()
}

/// Deterministic tar: fixed mtime, numeric owners, no user/group names.
struct TarWriter(tar::Builder<Vec<u8>>);

impl TarWriter {
    fn new() -> TarWriter {
        TarWriter(tar::Builder::new(Vec::new()))
    }

    fn header(kind: tar::EntryType, mode: u32, owner: u64, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(owner);
        h.set_gid(owner);
        h.set_size(size);
        h.set_mtime(crate::cpio::MTIME.into());
        h
    }

    fn dir(&mut self, path: &str, mode: u32, owner: u64) -> io::Result<()> {
        let mut h = Self::header(tar::EntryType::Directory, mode, owner, 0);
        self.0.append_data(&mut h, format!("{path}/"), &[][..])
    }

    fn file(&mut self, path: &str, mode: u32, owner: u64, data: &[u8]) -> io::Result<()> {
        let mut h = Self::header(tar::EntryType::Regular, mode, owner, data.len() as u64);
        self.0.append_data(&mut h, path, data)
    }

    fn finish(self) -> io::Result<Vec<u8>> {
        self.0.into_inner()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn syslinux_cfg_boots_linux_label() {
        let cfg = syslinux_cfg("console=ttyS0 foo=bar");
        assert!(cfg.starts_with("DEFAULT linux\n"));
        assert!(cfg.contains("LABEL linux\n  KERNEL vmlinuz\n  APPEND initrd=initrd.gz console=ttyS0 foo=bar\n"));
    }

    #[test]
    fn layer_tars_have_expected_entries() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        fs::write(&a, b"kernel").unwrap();
        fs::write(&b, b"initrd").unwrap();
        let list = |tar: Vec<u8>| -> Vec<(String, u64, Vec<u8>)> {
            let mut archive = tar::Archive::new(&tar[..]);
            archive
                .entries()
                .unwrap()
                .map(|e| {
                    let mut e = e.unwrap();
                    let mut data = Vec::new();
                    e.read_to_end(&mut data).unwrap();
                    (e.path().unwrap().display().to_string(), e.header().uid().unwrap(), data)
                })
                .collect()
        };
        let entries = list(container_disk_tar(&a).unwrap());
        assert_eq!(entries[0].0, "disk/");
        assert_eq!(entries[1], ("disk/disk.qcow2".into(), 107, b"kernel".to_vec()));
        let entries = list(kernel_boot_tar(&a, &b).unwrap());
        let names: Vec<_> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(names, ["boot/", "boot/vmlinuz", "boot/initrd"]);
        assert_eq!(entries[2].2, b"initrd");
        // Reproducible.
        assert_eq!(kernel_boot_tar(&a, &b).unwrap(), kernel_boot_tar(&a, &b).unwrap());
    }
}
