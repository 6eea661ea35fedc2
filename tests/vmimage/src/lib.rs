//! Test support for podvisor's VM-pod backend: builds bootable busybox VM
//! images from Debian packages on the machine (no downloads).
//!
//! - [`initramfs`]: a busybox initramfs with DHCP, HTTP, a guest agent and a console shell.
//! - [`guest_agent`]: a minimal QEMU guest agent (QGA JSON protocol), the `podvisor-test-agent` binary.
//! - [`disk`]: a KubeVirt containerDisk (syslinux on FAT, as qcow2) and direct-kernel-boot files.
//! - [`oci`]: those as single-layer OCI images (raw tars, config, manifest, image layout).
//! - [`cache`]: [`VmImages::build`] caches the artifacts per kernel version and input hash.

pub mod cache;
pub mod cpio;
pub mod disk;
pub mod guest_agent;
pub mod initramfs;
pub mod oci;

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::Command;

pub use cache::{VmImageSpec, VmImages};
pub use initramfs::{GuestAgent, InitramfsSpec};

pub(crate) fn other_err(msg: impl Into<String>) -> io::Error {
    io::Error::other(msg.into())
}

/// An installed kernel: `/boot/vmlinuz-<version>` and `/lib/modules/<version>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kernel {
    pub version: String,
    pub vmlinuz: PathBuf,
    pub modules_dir: PathBuf,
}

impl Kernel {
    pub fn with_version(version: &str) -> io::Result<Kernel> {
        let kernel = Kernel {
            version: version.into(),
            vmlinuz: PathBuf::from(format!("/boot/vmlinuz-{version}")),
            modules_dir: PathBuf::from(format!("/lib/modules/{version}")),
        };
        if !kernel.vmlinuz.is_file() || !kernel.modules_dir.join("kernel").is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("kernel {version}: need {} and its modules", kernel.vmlinuz.display()),
            ));
        }
        Ok(kernel)
    }

    /// `$PODVISOR_VM_KERNEL` (a version), else the newest installed Debian
    /// cloud kernel (package linux-image-cloud-amd64).
    pub fn find() -> io::Result<Kernel> {
        if let Ok(version) = std::env::var("PODVISOR_VM_KERNEL") {
            return Kernel::with_version(&version);
        }
        let mut versions: Vec<String> = fs::read_dir("/boot")?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter_map(|name| name.strip_prefix("vmlinuz-").map(String::from))
            .filter(|v| v.ends_with("-cloud-amd64") && Path::new("/lib/modules").join(v).join("kernel").is_dir())
            .collect();
        versions.sort_by_key(|v| version_key(v));
        let newest = versions.pop().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                "no cloud kernel in /boot: apt-get install linux-image-cloud-amd64",
            )
        })?;
        Kernel::with_version(&newest)
    }

    /// Module `name` (e.g. "virtio_net") as a plain `.ko`, decompressing
    /// `.ko.xz`, `.ko.zst` and `.ko.gz` as shipped.
    pub fn module(&self, name: &str) -> io::Result<Vec<u8>> {
        let path = self.module_path(name)?;
        let data = fs::read(&path)?;
        let file_name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        decompress_module(file_name, data)
    }

    fn module_path(&self, name: &str) -> io::Result<PathBuf> {
        // Kernel module names treat '-' and '_' alike; files may use either.
        let wanted = name.replace('-', "_");
        let mut stack = vec![self.modules_dir.join("kernel")];
        while let Some(dir) = stack.pop() {
            for entry in fs::read_dir(&dir)? {
                let entry = entry?;
                let path = entry.path();
                if entry.file_type()?.is_dir() {
                    stack.push(path);
                    continue;
                }
                let file = entry.file_name();
                let file = file.to_string_lossy();
                if let Some((stem, _)) = file.split_once(".ko")
                    && stem.replace('-', "_") == wanted
                {
                    return Ok(path);
                }
            }
        }
        Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("module {name} not found under {}", self.modules_dir.display()),
        ))
    }
}

/// Numeric-aware sort key: "6.1.0-56" < "6.1.0-100".
fn version_key(v: &str) -> Vec<(u64, String)> {
    v.split(|c: char| !c.is_ascii_alphanumeric())
        .map(|part| (part.parse().unwrap_or(0), part.to_owned()))
        .collect()
}

fn decompress_module(file_name: &str, data: Vec<u8>) -> io::Result<Vec<u8>> {
    if file_name.ends_with(".ko") {
        Ok(data)
    } else if file_name.ends_with(".ko.zst") {
        zstd::decode_all(&data[..])
    } else if file_name.ends_with(".ko.gz") {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&data[..]).read_to_end(&mut out)?;
        Ok(out)
    } else if file_name.ends_with(".ko.xz") {
        pipe_through(Command::new("xz").args(["-dc"]), &data)
    } else {
        Err(other_err(format!("unknown module compression: {file_name}")))
    }
}

/// Runs `cmd` with `input` on stdin; returns its stdout.
fn pipe_through(cmd: &mut Command, input: &[u8]) -> io::Result<Vec<u8>> {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    let input = input.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output()?;
    writer.join().map_err(|_| other_err("stdin writer panicked"))??;
    if !out.status.success() {
        return Err(other_err(format!(
            "{cmd:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(out.stdout)
}

/// Runs `cmd`, failing with its stderr unless it exits 0.
pub(crate) fn run(cmd: &mut Command) -> io::Result<()> {
    let out = cmd.output().map_err(|e| other_err(format!("{cmd:?}: {e}")))?;
    if !out.status.success() {
        return Err(other_err(format!(
            "{cmd:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_order_is_numeric() {
        let mut v = vec!["6.1.0-100-cloud-amd64", "6.1.0-56-cloud-amd64", "6.10.0-1-cloud-amd64"];
        v.sort_by_key(|v| version_key(v));
        assert_eq!(
            v,
            ["6.1.0-56-cloud-amd64", "6.1.0-100-cloud-amd64", "6.10.0-1-cloud-amd64"]
        );
    }

    #[test]
    fn decompresses_every_module_format() {
        let plain = b"\x7fELF fake module".repeat(100);
        let zst = zstd::encode_all(&plain[..], 3).unwrap();
        assert_eq!(decompress_module("a.ko.zst", zst).unwrap(), plain);
        let gz = initramfs::gzip(&plain).unwrap();
        assert_eq!(decompress_module("a.ko.gz", gz).unwrap(), plain);
        let xz = pipe_through(Command::new("xz").args(["-c", "--check=crc32"]), &plain).unwrap();
        assert_eq!(decompress_module("a.ko.xz", xz).unwrap(), plain);
        assert_eq!(decompress_module("a.ko", plain.clone()).unwrap(), plain);
        assert!(decompress_module("a.ko.bz2", plain).is_err());
    }

    #[test]
    fn finds_installed_cloud_kernel_modules() {
        let Ok(kernel) = Kernel::find() else {
            eprintln!("no cloud kernel installed; skipping");
            return;
        };
        for name in initramfs::VIRTIO_MODULES {
            let module = kernel.module(name).unwrap();
            assert_eq!(&module[..4], b"\x7fELF", "{name}");
        }
    }
}
