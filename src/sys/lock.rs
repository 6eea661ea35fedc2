//! An exclusive lock on a state directory, so that two daemons never share one.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::Path;

/// Held for the daemon's lifetime; the kernel drops the lock when the process dies,
/// so a crashed daemon never leaves a stale lock behind.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("another podvisor daemon (pid {holder}) is already using {path}")]
    Held { path: String, holder: String },
    #[error("cannot lock {path}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
}

impl DirLock {
    pub fn acquire(lock_path: &Path) -> Result<DirLock, LockError> {
        let io_err = |source| LockError::Io {
            path: lock_path.display().to_string(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(lock_path)
            .map_err(io_err)?;
        // SAFETY: flock only reads the fd, which stays open for the call.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                return Err(LockError::Held {
                    path: lock_path.parent().unwrap_or(lock_path).display().to_string(),
                    holder: if holder.is_empty() {
                        "unknown".into()
                    } else {
                        holder.into()
                    },
                });
            }
            return Err(io_err(err));
        }
        file.set_len(0).map_err(io_err)?;
        file.rewind().map_err(io_err)?;
        writeln!(file, "{}", std::process::id()).map_err(io_err)?;
        Ok(DirLock { _file: file })
    }
}
