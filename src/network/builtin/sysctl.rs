//! Writing `/proc/sys` values, only when they differ.

use std::fs;
use std::path::Path;

use super::{NetError, Result};

/// Sets `/proc/sys/<key>` (slash-separated) to `value` unless it already is.
pub(super) fn ensure(key: &str, value: &str) -> Result<()> {
    let path = Path::new("/proc/sys").join(key);
    let io_err = |source| NetError::Io {
        op: format!("sysctl {}", key.replace('/', ".")),
        source,
    };
    if fs::read_to_string(&path).map_err(io_err)?.trim() == value {
        return Ok(());
    }
    fs::write(&path, value).map_err(io_err)
}
