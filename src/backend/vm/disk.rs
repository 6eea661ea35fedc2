//! Per-VM root disks: a qcow2 overlay on a read-only base image shared by all
//! VMs of that image, grown to the requested size, deleted with the VM.
//! Done with `qemu-img` while the VM is not running.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::{VmError, path_str};

/// What `qemu-img info` says about an image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageInfo {
    pub format: String,
    pub virtual_size: u64,
    pub actual_size: Option<u64>,
    pub backing_file: Option<String>,
}

fn qemu_img(args: &[&str]) -> Result<Vec<u8>, VmError> {
    let output = Command::new("qemu-img")
        .args(args)
        .output()
        .map_err(VmError::io("running qemu-img"))?;
    if !output.status.success() {
        return Err(VmError::Tool {
            tool: "qemu-img",
            message: format!(
                "{} ({}): {}",
                args.first().unwrap_or(&""),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        });
    }
    Ok(output.stdout)
}

/// Parses `qemu-img info --output=json`.
pub fn parse_info(json: &[u8]) -> Result<ImageInfo, VmError> {
    let bad = |what: &str| VmError::Tool {
        tool: "qemu-img",
        message: format!("info output without {what}"),
    };
    let value: serde_json::Value = serde_json::from_slice(json).map_err(|_| bad("JSON"))?;
    Ok(ImageInfo {
        format: value["format"].as_str().ok_or_else(|| bad("format"))?.to_string(),
        virtual_size: value["virtual-size"].as_u64().ok_or_else(|| bad("virtual-size"))?,
        actual_size: value["actual-size"].as_u64(),
        backing_file: value["backing-filename"].as_str().map(str::to_string),
    })
}

/// `qemu-img info` of an image (`-U`: also while a VM has it open).
pub fn image_info(path: &Path) -> Result<ImageInfo, VmError> {
    parse_info(&qemu_img(&["info", "--output=json", "-U", path_str(path)?])?)
}

/// Creates `overlay` (qcow2) on `base` (qcow2 or raw, no backing file of its
/// own), at least `size` bytes large: a smaller size than the base's is
/// ignored (disks only grow). The file appears under its name only once
/// complete.
pub fn create_overlay(base: &Path, overlay: &Path, size: Option<u64>) -> Result<ImageInfo, VmError> {
    if !base.is_absolute() || !overlay.is_absolute() {
        return Err(VmError::Invalid("base and overlay paths must be absolute".into()));
    }
    let base_info = image_info(base)?;
    if let Some(backing) = &base_info.backing_file {
        return Err(VmError::Invalid(format!(
            "base image {} has a backing file ({backing}); only self-contained images are used",
            base.display()
        )));
    }
    if !matches!(base_info.format.as_str(), "qcow2" | "raw") {
        return Err(VmError::Invalid(format!(
            "base image {} is {}, not qcow2 or raw",
            base.display(),
            base_info.format
        )));
    }
    let size = size.unwrap_or(0).max(base_info.virtual_size);
    let temp = temp_path(overlay);
    let _ = std::fs::remove_file(&temp);
    let result = qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-F",
        &base_info.format,
        "-b",
        path_str(base)?,
        path_str(&temp)?,
        &size.to_string(),
    ])
    .and_then(|_| std::fs::rename(&temp, overlay).map_err(VmError::io(format!("renaming {}", temp.display()))));
    if let Err(err) = result {
        let _ = std::fs::remove_file(&temp);
        return Err(err);
    }
    image_info(overlay)
}

fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp-{}", std::process::id()));
    path.with_file_name(name)
}

/// Grows `image` to `size` bytes if it is smaller; returns whether it grew.
/// The guest's partitions and filesystems are its own business (cloud-init
/// `growpart` does it on boot).
pub fn grow(image: &Path, size: u64) -> Result<bool, VmError> {
    let info = image_info(image)?;
    if size <= info.virtual_size {
        return Ok(false);
    }
    qemu_img(&["resize", "-q", "-f", &info.format, path_str(image)?, &size.to_string()])?;
    Ok(true)
}

/// Deletes an overlay; a missing file is fine.
pub fn delete(overlay: &Path) -> Result<(), VmError> {
    match std::fs::remove_file(overlay) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
            Err(VmError::io(format!("deleting {}", overlay.display()))(err))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_qemu_img_info() {
        let json = br#"{"backing-filename-format":"qcow2","virtual-size":67108864,"filename":"/o.qcow2",
            "format":"qcow2","actual-size":200704,"backing-filename":"/b.qcow2","dirty-flag":false}"#;
        assert_eq!(
            parse_info(json).unwrap(),
            ImageInfo {
                format: "qcow2".into(),
                virtual_size: 64 << 20,
                actual_size: Some(200704),
                backing_file: Some("/b.qcow2".into()),
            }
        );
        assert!(parse_info(br#"{"format":"raw"}"#).is_err());
        assert!(parse_info(b"nope").is_err());
    }

    #[test]
    fn temp_name_is_next_to_the_target() {
        let temp = temp_path(Path::new("/var/lib/x/root.qcow2"));
        assert_eq!(temp.parent(), Some(Path::new("/var/lib/x")));
        assert!(
            temp.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("root.qcow2.tmp-")
        );
    }
}
