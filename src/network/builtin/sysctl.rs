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

/// Sets each `(key, value)` in the node's network namespace (see [`crate::sys::netns`]).
pub(super) fn ensure_in_node(settings: &[(String, &str)]) -> Result<()> {
    let mut outcome = Ok(());
    let ran = crate::sys::netns::run_in_node(|| {
        outcome = settings.iter().try_for_each(|(key, value)| ensure(key, value));
        Ok(())
    });
    ran.map_err(|source| NetError::Io {
        op: "entering the node network namespace".into(),
        source,
    })?;
    outcome
}
