//! A directory of claim files: each names one claimed resource (an address, a host port)
//! and holds the id of the sandbox that owns it. Claims are created with `O_EXCL` while
//! holding a `flock` on the directory, so concurrent claimers, threads or processes,
//! never share one.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

use super::{NetError, Result};

#[derive(Debug)]
pub(super) struct ClaimDir {
    path: PathBuf,
}

/// The directory, locked until dropped.
pub(super) struct Locked<'a> {
    path: &'a Path,
    _lock: Flock<File>,
}

impl ClaimDir {
    pub(super) fn new(path: PathBuf) -> ClaimDir {
        ClaimDir { path }
    }

    /// Creates the directory if needed and locks it (blocking; holders never wait on
    /// anything else, so the wait is short).
    pub(super) fn lock(&self) -> Result<Locked<'_>> {
        fs::create_dir_all(&self.path).map_err(|e| io_err(format!("creating {}", self.path.display()), e))?;
        let dir = File::open(&self.path).map_err(|e| io_err(format!("opening {}", self.path.display()), e))?;
        let lock = Flock::lock(dir, FlockArg::LockExclusive)
            .map_err(|(_, errno)| io_err(format!("locking {}", self.path.display()), errno.into()))?;
        Ok(Locked {
            path: &self.path,
            _lock: lock,
        })
    }
}

impl Locked<'_> {
    /// Every claim, name to owner. Files left empty by a crash between create and write
    /// (never visible otherwise: writers hold the lock) are removed.
    pub(super) fn claims(&self) -> Result<HashMap<String, String>> {
        let mut out = HashMap::new();
        let entries = match fs::read_dir(self.path) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(io_err(format!("listing {}", self.path.display()), e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| io_err(format!("listing {}", self.path.display()), e))?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if name.starts_with('.') {
                continue;
            }
            let owner = match fs::read_to_string(entry.path()) {
                Ok(owner) => owner.trim().to_string(),
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err(format!("reading {}", entry.path().display()), e)),
            };
            if owner.is_empty() {
                self.release(&name)?;
                continue;
            }
            out.insert(name, owner);
        }
        Ok(out)
    }

    /// Claims `name` for `owner`; `false` if it is already claimed.
    pub(super) fn claim(&self, name: &str, owner: &str) -> Result<bool> {
        let path = self.path.join(name);
        let mut file = match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(false),
            Err(e) => return Err(io_err(format!("creating {}", path.display()), e)),
        };
        if let Err(e) = file.write_all(owner.as_bytes()) {
            let _ = fs::remove_file(&path);
            return Err(io_err(format!("writing {}", path.display()), e));
        }
        Ok(true)
    }

    /// Removes a claim; a missing one is fine.
    pub(super) fn release(&self, name: &str) -> Result<()> {
        let path = self.path.join(name);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(format!("removing {}", path.display()), e)),
        }
    }

    /// Removes every claim of `owner`, returning how many there were.
    pub(super) fn release_owned(&self, owner: &str) -> Result<usize> {
        let mut n = 0;
        for (name, o) in self.claims()? {
            if o == owner {
                self.release(&name)?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// A small value kept next to the claims (a dot-file, so never taken for one).
    pub(super) fn hint(&self, key: &str) -> Option<String> {
        fs::read_to_string(self.path.join(format!(".{key}")))
            .ok()
            .map(|s| s.trim().to_string())
    }

    pub(super) fn set_hint(&self, key: &str, value: &str) -> Result<()> {
        let tmp = self.path.join(format!(".{key}.tmp"));
        let path = self.path.join(format!(".{key}"));
        fs::write(&tmp, value)
            .and_then(|()| fs::rename(&tmp, &path))
            .map_err(|e| io_err(format!("writing {}", path.display()), e))
    }
}

fn io_err(op: String, source: io::Error) -> NetError {
    NetError::Io { op, source }
}
