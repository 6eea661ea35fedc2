//! Unpacks OCI image layers into overlayfs-ready lower directories.
//!
//! Every path is resolved beneath a directory fd of the destination with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)`, so neither `..`
//! components nor symlinks (absolute or relative) let an entry write outside
//! it, and the final component of a path is never followed. Whiteouts are
//! converted to the overlayfs format: `.wh.NAME` becomes a 0:0 character
//! device, `.wh..wh..opq` sets `trusted.overlay.opaque=y` on its directory.

use std::cell::Cell;
use std::cmp::Reverse;
use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::rc::Rc;

use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{self, AtFlags, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{self, FchmodatFlags, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::{self, Gid, Uid, UnlinkatFlags};
use sha2::{Digest, Sha256};
use tar::EntryType;
use tracing::{debug, warn};

/// Read buffer in front of the (compressed) source stream.
const SOURCE_BUFFER: usize = 1 << 20;
/// Read buffer in front of the tar parser.
const TAR_BUFFER: usize = 256 << 10;
/// Upper bound of the per-file write buffer (smaller files get one their size).
const MAX_WRITE_BUFFER: usize = 1 << 20;
/// openat2 returns EAGAIN when a concurrent rename races a `..` lookup.
const OPENAT2_RETRIES: usize = 16;

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const WHITEOUT_META_PREFIX: &[u8] = b".wh..wh.";
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";
const OPAQUE_XATTR: &CStr = c"trusted.overlay.opaque";
const PAX_XATTR_PREFIX: &str = "SCHILY.xattr.";
/// Overlay state (`userxattr` mounts use `user.overlay.`) must only come from whiteout
/// entries, never from a layer's own xattrs.
const OVERLAY_XATTR_PREFIXES: [&str; 2] = ["trusted.overlay.", "user.overlay."];

const ESCAPES_THROUGH_SYMLINK: &str = "path escapes the layer root through a symlink";
const LINK_ESCAPES_THROUGH_SYMLINK: &str = "hard link target escapes the layer root through a symlink";

/// How a layer blob is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// Maps an OCI or Docker layer media type to its compression; `None` if it is not a layer type.
    pub fn from_media_type(media_type: &str) -> Option<Compression> {
        match media_type {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar" => Some(Compression::None),
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Some(Compression::Gzip),
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => Some(Compression::Zstd),
            _ => None,
        }
    }
}

/// What [`unpack_layer`] saw of a layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnpackStats {
    /// `sha256:<hex>` of the whole uncompressed tar stream, trailing padding included.
    pub diff_id: String,
    /// Size of the uncompressed tar stream.
    pub uncompressed_bytes: u64,
    /// Tar entries read, including skipped ones (PAX and GNU long-name headers excluded).
    pub entries: u64,
}

/// Why a layer could not be unpacked; `dest` may then hold a partial tree.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// An entry tried to reach outside the destination.
    #[error("unsafe layer entry {entry:?}: {reason}")]
    Unsafe { entry: String, reason: &'static str },
    /// The compressed stream or the tar archive inside it is malformed.
    #[error("corrupt layer: {what}")]
    Corrupt {
        what: String,
        #[source]
        source: Option<io::Error>,
    },
    /// Reading the layer stream handed to [`unpack_layer`] failed.
    #[error("cannot read the layer stream")]
    Read(#[source] io::Error),
    /// A filesystem operation in the destination failed.
    #[error("cannot {op} {path:?}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: io::Error,
    },
}

impl UnpackError {
    /// Wraps a failure to read the layer stream outside [`unpack_layer`], such as while
    /// draining bytes that follow the archive.
    pub fn from_read(source: io::Error) -> Self {
        UnpackError::Read(source)
    }
}

/// Unpacks one layer (compressed stream `reader`) into `dest`, an existing empty directory,
/// producing an overlayfs-ready lower dir.
pub fn unpack_layer(reader: impl Read, compression: Compression, dest: &Path) -> Result<UnpackStats, UnpackError> {
    let source_failed = Rc::new(Cell::new(false));
    let source = BufReader::with_capacity(
        SOURCE_BUFFER,
        SourceReader {
            inner: reader,
            failed: Rc::clone(&source_failed),
        },
    );
    let tar_stream: Box<dyn Read + '_> = match compression {
        Compression::None => Box::new(source),
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(source)),
        Compression::Zstd => {
            Box::new(
                zstd::stream::read::Decoder::with_buffer(source).map_err(|source| UnpackError::Io {
                    op: "set up a zstd decoder for",
                    path: dest.display().to_string(),
                    source,
                })?,
            )
        }
    };
    let digest = DigestReader {
        inner: tar_stream,
        hasher: Sha256::new(),
        bytes: 0,
    };
    let mut archive = tar::Archive::new(BufReader::with_capacity(TAR_BUFFER, digest));
    let mut unpacker = Unpacker::new(dest, source_failed)?;

    let mut entries = 0;
    for entry in archive.entries().map_err(|e| unpacker.read_error(e))? {
        let mut entry = entry.map_err(|e| unpacker.read_error(e))?;
        entries += 1;
        unpacker.unpack_entry(&mut entry)?;
    }
    // The DiffID covers the whole stream: end-of-archive blocks and any padding after them.
    let mut rest = archive.into_inner();
    io::copy(&mut rest, &mut io::sink()).map_err(|e| unpacker.read_error(e))?;
    unpacker.apply_dir_mtimes()?;

    let digest = rest.into_inner();
    Ok(UnpackStats {
        diff_id: format!("sha256:{}", hex::encode(digest.hasher.finalize())),
        uncompressed_bytes: digest.bytes,
        entries,
    })
}

/// The caller's stream; remembers failures so they are not reported as corrupt data.
struct SourceReader<R> {
    inner: R,
    failed: Rc<Cell<bool>>,
}

impl<R: Read> Read for SourceReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf).inspect_err(|e| {
            if e.kind() != io::ErrorKind::Interrupted {
                self.failed.set(true);
            }
        })
    }
}

/// Hashes and counts the uncompressed tar stream.
struct DigestReader<R> {
    inner: R,
    hasher: Sha256,
    bytes: u64,
}

impl<R: Read> Read for DigestReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

/// Remembers whether a read failed, to tell archive errors from write errors after `io::copy`.
struct TrackedReader<R> {
    inner: R,
    failed: bool,
}

impl<R: Read> Read for TrackedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf).inspect_err(|e| {
            if e.kind() != io::ErrorKind::Interrupted {
                self.failed = true;
            }
        })
    }
}

/// What an entry creates, decided from its tar type.
enum Kind {
    File,
    Dir,
    Symlink,
    HardLink,
    /// Character or block device, or fifo.
    Node(SFlag, libc::dev_t),
}

/// Ownership, permissions, mtime and xattrs of an entry.
struct Metadata {
    uid: Uid,
    gid: Gid,
    mode: Mode,
    mtime: TimeSpec,
    xattrs: Vec<(CString, Vec<u8>)>,
}

impl Metadata {
    fn read<R: Read>(entry: &mut tar::Entry<'_, R>, path: &[u8]) -> Result<Self, UnpackError> {
        let mut xattrs = Vec::new();
        let mut pax_mtime = None;
        let extensions = entry
            .pax_extensions()
            .map_err(|e| corrupt(format!("unreadable pax header for {:?}", lossy(path)), e))?;
        for record in extensions.into_iter().flatten() {
            // tar splits records at newlines, so a binary value containing one is lost.
            let Ok(record) = record else {
                warn!(entry = %lossy(path), "skipping malformed pax record");
                continue;
            };
            let Ok(key) = record.key() else { continue };
            if key == "mtime" {
                pax_mtime = parse_pax_time(record.value_bytes());
            } else if let Some(name) = key.strip_prefix(PAX_XATTR_PREFIX) {
                if OVERLAY_XATTR_PREFIXES.iter().any(|p| name.starts_with(p)) {
                    warn!(entry = %lossy(path), xattr = name, "ignoring overlay xattr in layer");
                } else if let Ok(name) = CString::new(name) {
                    xattrs.push((name, record.value_bytes().to_vec()));
                }
            }
        }

        let header = entry.header();
        let raw = header.as_old();
        let id = |value, raw_field: &[u8], field| {
            numeric_field(value, raw_field)
                .and_then(|id| u32::try_from(id).ok())
                .ok_or_else(|| invalid_field(field, path))
        };
        let uid = Uid::from_raw(id(header.uid(), &raw.uid, "uid")?);
        let gid = Gid::from_raw(id(header.gid(), &raw.gid, "gid")?);
        let mode = numeric_field(header.mode().map(u64::from), &raw.mode).ok_or_else(|| invalid_field("mode", path))?;
        let mtime = match pax_mtime {
            Some(mtime) => mtime,
            None => numeric_field(header.mtime(), &raw.mtime)
                .and_then(|secs| i64::try_from(secs).ok())
                .map(|secs| TimeSpec::new(secs, 0))
                .ok_or_else(|| invalid_field("mtime", path))?,
        };
        Ok(Metadata {
            uid,
            gid,
            mode: Mode::from_bits_truncate((mode & 0o7777) as libc::mode_t),
            mtime,
            xattrs,
        })
    }
}

/// A numeric header field; like Go's archive/tar, an empty one (all NULs or spaces) reads as 0.
fn numeric_field(parsed: io::Result<u64>, raw: &[u8]) -> Option<u64> {
    match parsed {
        Ok(value) => Some(value),
        Err(_) if raw.iter().all(|&b| b == 0 || b == b' ') => Some(0),
        Err(_) => None,
    }
}

/// Parses a PAX time such as `1700000000.123456789` (or `-1.5`, 1.5 s before the epoch).
fn parse_pax_time(value: &[u8]) -> Option<TimeSpec> {
    let value = std::str::from_utf8(value).ok()?;
    let (secs, fraction) = value.split_once('.').unwrap_or((value, ""));
    let secs: i64 = secs.parse().ok()?;
    if !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let digits = &fraction[..fraction.len().min(9)];
    let nanos = match digits.len() {
        0 => 0,
        len => digits.parse::<i64>().ok()? * 10_i64.pow(9 - len as u32),
    };
    if value.starts_with('-') && nanos > 0 {
        Some(TimeSpec::new(secs.checked_sub(1)?, 1_000_000_000 - nanos))
    } else {
        Some(TimeSpec::new(secs, nanos))
    }
}

/// Where metadata is applied: an open file or directory, or a name in a directory that is
/// never followed.
#[derive(Clone, Copy)]
enum Node<'a> {
    File(BorrowedFd<'a>),
    Dir(BorrowedFd<'a>),
    /// Devices and fifos, which cannot be opened safely.
    Special {
        dir: BorrowedFd<'a>,
        name: &'a [u8],
    },
    Symlink {
        dir: BorrowedFd<'a>,
        name: &'a [u8],
    },
}

/// Owner first (chown clears setuid/setgid and file capabilities), then xattrs and mode, then
/// mtime; directories get their mtime once the whole layer is written.
fn apply_metadata(node: Node<'_>, meta: &Metadata, path: &[u8]) -> Result<(), UnpackError> {
    let (uid, gid) = (Some(meta.uid), Some(meta.gid));
    match node {
        Node::File(fd) | Node::Dir(fd) => unistd::fchown(fd, uid, gid),
        Node::Special { dir, name } | Node::Symlink { dir, name } => {
            unistd::fchownat(dir, name, uid, gid, AtFlags::AT_SYMLINK_NOFOLLOW)
        }
    }
    .map_err(io_error("change the owner of", path))?;

    if !matches!(node, Node::Symlink { .. }) {
        for (name, value) in &meta.xattrs {
            match set_xattr(node, name, value) {
                Ok(()) => {}
                // ENOTSUP has the same value as EOPNOTSUPP on Linux.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EPERM | libc::EOPNOTSUPP)) => {
                    let entry = lossy(path);
                    debug!(%entry, xattr = ?name, error = %e, "xattr not supported here");
                }
                Err(e) => return Err(io_error("set an xattr on", path)(e)),
            }
        }
    }

    match node {
        Node::File(fd) | Node::Dir(fd) => stat::fchmod(fd, meta.mode),
        Node::Special { dir, name } => stat::fchmodat(dir, name, meta.mode, FchmodatFlags::NoFollowSymlink),
        Node::Symlink { .. } => Ok(()),
    }
    .map_err(io_error("change the mode of", path))?;

    let mtime = &meta.mtime;
    match node {
        Node::File(fd) => stat::futimens(fd, mtime, mtime),
        Node::Special { dir, name } | Node::Symlink { dir, name } => {
            stat::utimensat(dir, name, mtime, mtime, UtimensatFlags::NoFollowSymlink)
        }
        Node::Dir(_) => Ok(()),
    }
    .map_err(io_error("set the mtime of", path))
}

fn set_xattr(node: Node<'_>, name: &CStr, value: &[u8]) -> io::Result<()> {
    let result = match node {
        Node::File(fd) | Node::Dir(fd) => {
            // SAFETY: `fd` is open for the duration of the call, `name` is NUL-terminated and
            // `value` is valid for `value.len()` bytes.
            unsafe { libc::fsetxattr(fd.as_raw_fd(), name.as_ptr(), value.as_ptr().cast(), value.len(), 0) }
        }
        Node::Special { dir, name: file } => {
            // Reached through our own directory fd; lsetxattr does not follow the final component.
            let mut proc_path = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
            proc_path.extend_from_slice(file);
            let proc_path = CString::new(proc_path)?;
            // SAFETY: `proc_path` and `name` are NUL-terminated and `value` is valid for
            // `value.len()` bytes.
            unsafe { libc::lsetxattr(proc_path.as_ptr(), name.as_ptr(), value.as_ptr().cast(), value.len(), 0) }
        }
        Node::Symlink { .. } => return Ok(()),
    };
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Why a tar path was refused before touching the filesystem.
#[derive(Clone, Copy)]
enum PathViolation {
    Absolute,
    AboveRoot,
    NulByte,
}

impl PathViolation {
    fn entry_reason(self) -> &'static str {
        match self {
            PathViolation::Absolute => "absolute path",
            PathViolation::AboveRoot => "path climbs above the layer root",
            PathViolation::NulByte => "path contains a NUL byte",
        }
    }

    fn link_reason(self) -> &'static str {
        match self {
            PathViolation::Absolute => "hard link target is an absolute path",
            PathViolation::AboveRoot => "hard link target climbs above the layer root",
            PathViolation::NulByte => "hard link target contains a NUL byte",
        }
    }
}

/// Splits a tar path into normal components: empty and `.` components are dropped and `..`
/// is folded lexically, failing if it would climb above the root.
fn clean_path(raw: &[u8]) -> Result<Vec<&[u8]>, PathViolation> {
    if raw.starts_with(b"/") {
        return Err(PathViolation::Absolute);
    }
    if raw.contains(&0) {
        return Err(PathViolation::NulByte);
    }
    let mut parts = Vec::new();
    for part in raw.split(|&b| b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => {
                parts.pop().ok_or(PathViolation::AboveRoot)?;
            }
            _ => parts.push(part),
        }
    }
    Ok(parts)
}

/// Joins clean components into a path relative to the root (`.` for the root itself).
fn join(parts: &[&[u8]]) -> Vec<u8> {
    if parts.is_empty() {
        b".".to_vec()
    } else {
        parts.join(&b'/')
    }
}

/// Opens `path` strictly beneath `root`: `..` or a symlink leaving it fails with EXDEV.
fn open_beneath(root: &OwnedFd, path: &[u8], flags: OFlag) -> nix::Result<OwnedFd> {
    let how = OpenHow::new()
        .flags(flags | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let mut retries = 0;
    loop {
        match fcntl::openat2(root, path, how) {
            Err(Errno::EAGAIN) if retries < OPENAT2_RETRIES => retries += 1,
            result => return result,
        }
    }
}

/// Creates a directory missing from the archive: mode 0755, owned by root.
fn create_implicit_dir(parent: BorrowedFd<'_>, name: &[u8]) -> nix::Result<OwnedFd> {
    stat::mkdirat(parent, name, Mode::S_IRWXU)?;
    let dir = fcntl::openat(parent, name, dir_flags() | OFlag::O_NOFOLLOW, Mode::empty())?;
    unistd::fchown(&dir, Some(Uid::from_raw(0)), Some(Gid::from_raw(0)))?;
    // Explicit mode: mkdir applies the umask and inherits setgid from the parent.
    stat::fchmod(&dir, Mode::from_bits_truncate(0o755))?;
    Ok(dir)
}

/// Clears `name` in `dir` for a new entry. Returns true if it is a directory that was kept.
fn remove_existing(dir: BorrowedFd<'_>, name: &[u8], keep_dir: bool, path: &[u8]) -> Result<bool, UnpackError> {
    match unistd::unlinkat(dir, name, UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => Ok(false),
        Err(Errno::EISDIR) if keep_dir => Ok(true),
        Err(Errno::EISDIR) => remove_tree(dir, name).map(|()| false),
        Err(e) => Err(e),
    }
    .map_err(io_error("replace", path))
}

/// Removes directory `name` in `parent` with everything below it, never following symlinks.
fn remove_tree(parent: BorrowedFd<'_>, name: &[u8]) -> nix::Result<()> {
    let mut dir = Dir::openat(parent, name, dir_flags() | OFlag::O_NOFOLLOW, Mode::empty())?;
    // Collect first: removing entries while reading the directory may skip some.
    let children = dir
        .iter()
        .filter_map(|child| match child {
            Ok(child) if matches!(child.file_name().to_bytes(), b"." | b"..") => None,
            Ok(child) => Some(Ok(child.file_name().to_owned())),
            Err(e) => Some(Err(e)),
        })
        .collect::<nix::Result<Vec<CString>>>()?;
    for child in &children {
        match unistd::unlinkat(&dir, child.as_c_str(), UnlinkatFlags::NoRemoveDir) {
            Err(Errno::EISDIR) => remove_tree(dir.as_fd(), child.as_bytes())?,
            result => result?,
        }
    }
    drop(dir);
    unistd::unlinkat(parent, name, UnlinkatFlags::RemoveDir)
}

fn dir_flags() -> OFlag {
    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn io_error<E: Into<io::Error>>(op: &'static str, path: &[u8]) -> impl FnOnce(E) -> UnpackError {
    move |source| UnpackError::Io {
        op,
        path: lossy(path),
        source: source.into(),
    }
}

/// Like [`io_error`], but EXDEV from [`open_beneath`] means the path tried to leave the root.
fn resolve_error(op: &'static str, path: &[u8], escape_reason: &'static str) -> impl FnOnce(Errno) -> UnpackError {
    move |errno| match errno {
        Errno::EXDEV => unsafe_entry(path, escape_reason),
        errno => io_error(op, path)(errno),
    }
}

fn unsafe_entry(path: &[u8], reason: &'static str) -> UnpackError {
    UnpackError::Unsafe {
        entry: lossy(path),
        reason,
    }
}

fn corrupt(what: String, source: io::Error) -> UnpackError {
    UnpackError::Corrupt {
        what,
        source: Some(source),
    }
}

fn invalid_field(field: &str, path: &[u8]) -> UnpackError {
    UnpackError::Corrupt {
        what: format!("invalid {field} in the header of {:?}", lossy(path)),
        source: None,
    }
}

struct Unpacker {
    /// The destination directory; every path is resolved beneath it.
    root: OwnedFd,
    /// Directory mtimes by path, applied at the end because adding children changes them.
    dir_mtimes: HashMap<Vec<u8>, TimeSpec>,
    source_failed: Rc<Cell<bool>>,
}

impl Unpacker {
    fn new(dest: &Path, source_failed: Rc<Cell<bool>>) -> Result<Self, UnpackError> {
        let root = fcntl::open(dest, dir_flags(), Mode::empty()).map_err(|e| UnpackError::Io {
            op: "open the destination",
            path: dest.display().to_string(),
            source: e.into(),
        })?;
        Ok(Unpacker {
            root,
            dir_mtimes: HashMap::new(),
            source_failed,
        })
    }

    /// Classifies an error from reading the archive: the source failed, or its data is bad.
    fn read_error(&self, source: io::Error) -> UnpackError {
        if self.source_failed.get() {
            UnpackError::Read(source)
        } else {
            corrupt("invalid compressed or tar data".to_owned(), source)
        }
    }

    fn unpack_entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<(), UnpackError> {
        let path = entry.path_bytes().into_owned();
        let parts = clean_path(&path).map_err(|v| unsafe_entry(&path, v.entry_reason()))?;
        let header = entry.header();
        let kind = match header.entry_type() {
            // Pre-POSIX archives mark directories only with a trailing slash.
            EntryType::Regular if header.as_old().linkflag == [0] && path.ends_with(b"/") => Kind::Dir,
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => Kind::File,
            EntryType::Directory => Kind::Dir,
            EntryType::Symlink => Kind::Symlink,
            EntryType::Link => Kind::HardLink,
            EntryType::Fifo => Kind::Node(SFlag::S_IFIFO, 0),
            device @ (EntryType::Char | EntryType::Block) => {
                let number = |n: io::Result<Option<u32>>| {
                    n.map(|n| n.unwrap_or(0))
                        .map_err(|_| invalid_field("device number", &path))
                };
                let major = number(header.device_major())?;
                let minor = number(header.device_minor())?;
                let format = match device {
                    EntryType::Char => SFlag::S_IFCHR,
                    _ => SFlag::S_IFBLK,
                };
                Kind::Node(format, stat::makedev(major.into(), minor.into()))
            }
            EntryType::XGlobalHeader => {
                debug!("ignoring pax global header");
                return Ok(());
            }
            other => {
                warn!(entry = %lossy(&path), kind = ?other, "skipping unsupported entry type");
                return Ok(());
            }
        };
        let Some((&name, parent)) = parts.split_last() else {
            debug!(entry = %lossy(&path), "ignoring the layer root entry");
            return Ok(());
        };

        let is_meta = |part: &&[u8]| part.starts_with(WHITEOUT_META_PREFIX);
        if name == OPAQUE_MARKER && !parent.iter().any(is_meta) {
            return self.mark_opaque(parent, &path);
        }
        // Other `.wh..wh.` names are AUFS metadata (like the `.wh..wh.plnk` directory).
        if parts.iter().any(is_meta) {
            debug!(entry = %lossy(&path), "ignoring whiteout meta entry");
            return Ok(());
        }
        if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
            return self.whiteout(parent, hidden, &path);
        }

        let meta = Metadata::read(entry, &path)?;
        let dir = self.open_dir(parent, &path)?;
        let dir = dir.as_fd();
        match kind {
            Kind::File => self.write_file(dir, name, entry, &meta, &path),
            Kind::Dir => {
                if !remove_existing(dir, name, true, &path)? {
                    stat::mkdirat(dir, name, Mode::S_IRWXU).map_err(io_error("create directory", &path))?;
                }
                let fd = fcntl::openat(dir, name, dir_flags() | OFlag::O_NOFOLLOW, Mode::empty())
                    .map_err(io_error("open directory", &path))?;
                apply_metadata(Node::Dir(fd.as_fd()), &meta, &path)?;
                self.dir_mtimes.insert(join(&parts), meta.mtime);
                Ok(())
            }
            Kind::Symlink => {
                let target = entry.link_name_bytes().ok_or_else(|| UnpackError::Corrupt {
                    what: format!("symlink {:?} has no target", lossy(&path)),
                    source: None,
                })?;
                remove_existing(dir, name, false, &path)?;
                unistd::symlinkat(target.as_ref(), dir, name).map_err(io_error("create symlink", &path))?;
                apply_metadata(Node::Symlink { dir, name }, &meta, &path)
            }
            Kind::HardLink => {
                let target = entry.link_name_bytes().ok_or_else(|| UnpackError::Corrupt {
                    what: format!("hard link {:?} has no target", lossy(&path)),
                    source: None,
                })?;
                self.hard_link(dir, name, &parts, &target, &path)
            }
            Kind::Node(format, device) => {
                remove_existing(dir, name, false, &path)?;
                stat::mknodat(dir, name, format, Mode::S_IRUSR | Mode::S_IWUSR, device)
                    .map_err(io_error("create node", &path))?;
                apply_metadata(Node::Special { dir, name }, &meta, &path)
            }
        }
    }

    /// Opens the directory at `parts` beneath the root, creating missing components.
    fn open_dir(&self, parts: &[&[u8]], path: &[u8]) -> Result<OwnedFd, UnpackError> {
        let escape = || resolve_error("open the parent of", path, ESCAPES_THROUGH_SYMLINK);
        match open_beneath(&self.root, &join(parts), dir_flags()) {
            Err(Errno::ENOENT) => {}
            result => return result.map_err(escape()),
        }
        // Something is missing: walk down from the root, creating what is absent.
        let mut dir = self.root.try_clone().map_err(io_error("open the parent of", path))?;
        for (depth, &part) in parts.iter().enumerate() {
            dir = match open_beneath(&self.root, &join(&parts[..=depth]), dir_flags()) {
                Ok(next) => next,
                Err(Errno::ENOENT) => {
                    create_implicit_dir(dir.as_fd(), part).map_err(io_error("create a parent directory of", path))?
                }
                Err(errno) => return Err(escape()(errno)),
            };
        }
        Ok(dir)
    }

    fn mark_opaque(&self, dir_parts: &[&[u8]], path: &[u8]) -> Result<(), UnpackError> {
        let dir = self.open_dir(dir_parts, path)?;
        set_xattr(Node::Dir(dir.as_fd()), OPAQUE_XATTR, b"y").map_err(io_error("set the opaque xattr for", path))
    }

    fn whiteout(&self, parent: &[&[u8]], hidden: &[u8], path: &[u8]) -> Result<(), UnpackError> {
        if matches!(hidden, b"" | b"." | b"..") {
            return Err(unsafe_entry(path, "invalid whiteout name"));
        }
        let dir = self.open_dir(parent, path)?;
        remove_existing(dir.as_fd(), hidden, false, path)?;
        stat::mknodat(&dir, hidden, SFlag::S_IFCHR, Mode::empty(), 0).map_err(io_error("create the whiteout for", path))
    }

    fn hard_link(
        &self,
        dir: BorrowedFd<'_>,
        name: &[u8],
        parts: &[&[u8]],
        target: &[u8],
        path: &[u8],
    ) -> Result<(), UnpackError> {
        let target = clean_path(target).map_err(|v| unsafe_entry(path, v.link_reason()))?;
        let Some((&target_name, target_parent)) = target.split_last() else {
            return Err(unsafe_entry(path, "hard link target is the layer root"));
        };
        if target == parts {
            debug!(entry = %lossy(path), "ignoring hard link to itself");
            return Ok(());
        }
        // The target's parents must resolve beneath the root; the target itself is not followed.
        let target_dir = open_beneath(&self.root, &join(target_parent), OFlag::O_PATH | OFlag::O_DIRECTORY).map_err(
            resolve_error("resolve the hard link target of", path, LINK_ESCAPES_THROUGH_SYMLINK),
        )?;
        remove_existing(dir, name, false, path)?;
        unistd::linkat(&target_dir, target_name, dir, name, AtFlags::empty())
            .map_err(io_error("create hard link", path))
    }

    fn write_file<R: Read>(
        &self,
        dir: BorrowedFd<'_>,
        name: &[u8],
        entry: &mut tar::Entry<'_, R>,
        meta: &Metadata,
        path: &[u8],
    ) -> Result<(), UnpackError> {
        remove_existing(dir, name, false, path)?;
        // O_EXCL: never open (and so never write through) anything that already exists.
        let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let fd =
            fcntl::openat(dir, name, flags, Mode::S_IRUSR | Mode::S_IWUSR).map_err(io_error("create file", path))?;
        let size = entry.size();
        let capacity = usize::try_from(size).map_or(MAX_WRITE_BUFFER, |s| s.min(MAX_WRITE_BUFFER));
        let mut out = BufWriter::with_capacity(capacity, File::from(fd));
        let mut data = TrackedReader {
            inner: entry,
            failed: false,
        };
        let copied = match io::copy(&mut data, &mut out) {
            Ok(copied) => copied,
            Err(e) if data.failed => return Err(self.read_error(e)),
            Err(e) => return Err(io_error("write file", path)(e)),
        };
        if copied != size {
            return Err(UnpackError::Corrupt {
                what: format!("data of {:?} is truncated", lossy(path)),
                source: None,
            });
        }
        let file = out
            .into_inner()
            .map_err(|e| io_error("write file", path)(e.into_error()))?;
        apply_metadata(Node::File(file.as_fd()), meta, path)
    }

    /// Sets the deferred directory mtimes, deepest first.
    fn apply_dir_mtimes(&mut self) -> Result<(), UnpackError> {
        let mut dirs: Vec<_> = self.dir_mtimes.drain().collect();
        dirs.sort_unstable_by_key(|(path, _)| Reverse(path.iter().filter(|&&b| b == b'/').count()));
        for (path, mtime) in dirs {
            let flags = dir_flags() | OFlag::O_NOFOLLOW;
            match open_beneath(&self.root, &path, flags) {
                Ok(dir) => stat::futimens(&dir, &mtime, &mtime).map_err(io_error("set the mtime of", &path))?,
                // Replaced or removed by a later entry.
                Err(Errno::ENOENT | Errno::ENOTDIR | Errno::ELOOP | Errno::EXDEV) => {}
                Err(errno) => return Err(io_error("open directory", &path)(errno)),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::io::Write;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    use std::path::PathBuf;
    use tar::Header;

    const MTIME: u64 = 1_600_000_000;

    /// Builds tars in memory, writing names raw so that malicious ones survive.
    struct Layer(tar::Builder<Vec<u8>>);

    impl Layer {
        fn new() -> Self {
            Layer(tar::Builder::new(Vec::new()))
        }

        fn header(kind: EntryType, path: &str, size: u64, mode: u32) -> Header {
            let mut header = Header::new_gnu();
            header.set_entry_type(kind);
            let name = &mut header.as_old_mut().name;
            name[..path.len()].copy_from_slice(path.as_bytes());
            header.set_size(size);
            header.set_mode(mode);
            header.set_uid(0);
            header.set_gid(0);
            header.set_mtime(MTIME);
            header
        }

        fn append(&mut self, mut header: Header, data: &[u8]) -> &mut Self {
            header.set_cksum();
            self.0.append(&header, data).unwrap();
            self
        }

        fn file(&mut self, path: &str, data: &[u8]) -> &mut Self {
            self.append(Self::header(EntryType::Regular, path, data.len() as u64, 0o644), data)
        }

        fn file_owned(&mut self, path: &str, mode: u32, uid: u64, gid: u64, data: &[u8]) -> &mut Self {
            let mut header = Self::header(EntryType::Regular, path, data.len() as u64, mode);
            header.set_uid(uid);
            header.set_gid(gid);
            self.append(header, data)
        }

        fn dir(&mut self, path: &str, mode: u32) -> &mut Self {
            self.append(Self::header(EntryType::Directory, path, 0, mode), b"")
        }

        fn link(&mut self, kind: EntryType, path: &str, target: &str) -> &mut Self {
            let mut header = Self::header(kind, path, 0, 0o777);
            header.as_old_mut().linkname[..target.len()].copy_from_slice(target.as_bytes());
            self.append(header, b"")
        }

        fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
            self.link(EntryType::Symlink, path, target)
        }

        fn hardlink(&mut self, path: &str, target: &str) -> &mut Self {
            self.link(EntryType::Link, path, target)
        }

        fn device(&mut self, kind: EntryType, path: &str, major: u32, minor: u32) -> &mut Self {
            let mut header = Self::header(kind, path, 0, 0o620);
            header.set_device_major(major).unwrap();
            header.set_device_minor(minor).unwrap();
            self.append(header, b"")
        }

        fn pax(&mut self, records: &[(&str, &[u8])]) -> &mut Self {
            self.0.append_pax_extensions(records.iter().copied()).unwrap();
            self
        }

        fn build(&mut self) -> Vec<u8> {
            let builder = std::mem::replace(&mut self.0, tar::Builder::new(Vec::new()));
            builder.into_inner().unwrap()
        }
    }

    /// A destination nested in a tempdir, next to a sentinel file and an `outside` directory.
    struct Sandbox {
        tmp: tempfile::TempDir,
        dest: PathBuf,
    }

    const SENTINEL: &[u8] = b"untouched";

    impl Sandbox {
        fn new() -> Self {
            let tmp = tempfile::tempdir().unwrap();
            let dest = tmp.path().join("layer");
            fs::create_dir(&dest).unwrap();
            fs::create_dir(tmp.path().join("outside")).unwrap();
            fs::write(tmp.path().join("sentinel"), SENTINEL).unwrap();
            Sandbox { tmp, dest }
        }

        fn unpack(&self, tar: &[u8]) -> Result<UnpackStats, UnpackError> {
            unpack_layer(tar, Compression::None, &self.dest)
        }

        fn path(&self, relative: &str) -> PathBuf {
            self.dest.join(relative)
        }

        fn outside(&self) -> String {
            self.tmp.path().join("outside").display().to_string()
        }

        fn assert_nothing_escaped(&self) {
            let mut names: Vec<_> = fs::read_dir(self.tmp.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            names.sort();
            assert_eq!(names, ["layer", "outside", "sentinel"]);
            assert_eq!(fs::read_dir(self.tmp.path().join("outside")).unwrap().count(), 0);
            let sentinel = self.tmp.path().join("sentinel");
            assert_eq!(fs::read(&sentinel).unwrap(), SENTINEL);
            assert_eq!(fs::metadata(&sentinel).unwrap().nlink(), 1);
        }

        fn assert_unsafe(&self, tar: &[u8]) {
            match self.unpack(tar) {
                Err(UnpackError::Unsafe { .. }) => {}
                other => panic!("expected Unsafe, got {other:?}"),
            }
            self.assert_nothing_escaped();
        }
    }

    fn lstat(path: &Path) -> fs::Metadata {
        fs::symlink_metadata(path).unwrap()
    }

    fn get_xattr(path: &Path, name: &CStr) -> Option<Vec<u8>> {
        let path = CString::new(path.as_os_str().as_bytes()).unwrap();
        let mut value = vec![0u8; 256];
        // SAFETY: both strings are NUL-terminated and `value` is valid for `value.len()` bytes.
        let len = unsafe { libc::lgetxattr(path.as_ptr(), name.as_ptr(), value.as_mut_ptr().cast(), value.len()) };
        let len = usize::try_from(len).ok()?;
        value.truncate(len);
        Some(value)
    }

    fn sha256(data: &[u8]) -> String {
        format!("sha256:{}", hex::encode(Sha256::digest(data)))
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(data).unwrap();
        encoder.finish().unwrap()
    }

    #[test]
    fn media_types() {
        let cases = [
            ("application/vnd.oci.image.layer.v1.tar", Some(Compression::None)),
            ("application/vnd.oci.image.layer.v1.tar+gzip", Some(Compression::Gzip)),
            ("application/vnd.oci.image.layer.v1.tar+zstd", Some(Compression::Zstd)),
            (
                "application/vnd.oci.image.layer.nondistributable.v1.tar",
                Some(Compression::None),
            ),
            (
                "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
                Some(Compression::Gzip),
            ),
            (
                "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
                Some(Compression::Zstd),
            ),
            (
                "application/vnd.docker.image.rootfs.diff.tar.gzip",
                Some(Compression::Gzip),
            ),
            ("application/vnd.docker.image.rootfs.diff.tar", Some(Compression::None)),
            ("application/vnd.oci.image.config.v1+json", None),
            ("", None),
        ];
        for (media_type, expected) in cases {
            assert_eq!(Compression::from_media_type(media_type), expected, "{media_type}");
        }
    }

    #[test]
    fn files_dirs_ownership_modes_and_mtimes() {
        let sandbox = Sandbox::new();
        let tar = Layer::new()
            .dir("./", 0o700)
            .dir("./etc/", 0o750)
            .file("./etc/hosts", b"127.0.0.1 localhost\n")
            .file_owned("usr/bin/sudo", 0o4755, 0, 0, b"#!/bin/true\n")
            .file_owned("srv/data", 0o2640, 1234, 5678, b"data")
            .dir("tmp", 0o1777)
            .build();
        let stats = sandbox.unpack(&tar).unwrap();
        assert_eq!(stats.entries, 6);

        assert_eq!(fs::read(sandbox.path("etc/hosts")).unwrap(), b"127.0.0.1 localhost\n");
        let etc = lstat(&sandbox.path("etc"));
        assert!(etc.is_dir());
        assert_eq!(etc.mode() & 0o7777, 0o750);
        // Set after the child was written.
        assert_eq!(etc.mtime(), MTIME as i64);

        let sudo = lstat(&sandbox.path("usr/bin/sudo"));
        assert_eq!(sudo.mode() & 0o7777, 0o4755);
        assert_eq!(sudo.mtime(), MTIME as i64);
        let data = lstat(&sandbox.path("srv/data"));
        assert_eq!((data.uid(), data.gid(), data.mode() & 0o7777), (1234, 5678, 0o2640));
        assert_eq!(lstat(&sandbox.path("tmp")).mode() & 0o7777, 0o1777);

        // Parents missing from the tar: 0755, root-owned.
        for implicit in ["usr", "usr/bin", "srv"] {
            let meta = lstat(&sandbox.path(implicit));
            assert!(meta.is_dir());
            assert_eq!(
                (meta.mode() & 0o7777, meta.uid(), meta.gid()),
                (0o755, 0, 0),
                "{implicit}"
            );
        }
        // The root entry is ignored.
        assert_eq!(lstat(&sandbox.dest).mode() & 0o7777, 0o755);
    }

    #[test]
    fn gzip_and_zstd_with_diff_id() {
        let mut tar = Layer::new()
            .dir("app", 0o755)
            .file("app/big", &vec![7u8; 3 << 20])
            .build();
        // Tar writers may pad the stream past the end-of-archive blocks; that is in the DiffID.
        tar.extend_from_slice(&[0u8; 10240]);
        let expected = sha256(&tar);
        let zstd = zstd::stream::encode_all(tar.as_slice(), 3).unwrap();
        for (compression, compressed) in [
            (Compression::None, tar.clone()),
            (Compression::Gzip, gzip(&tar)),
            (Compression::Zstd, zstd),
        ] {
            let sandbox = Sandbox::new();
            let stats = unpack_layer(compressed.as_slice(), compression, &sandbox.dest).unwrap();
            assert_eq!(stats.diff_id, expected, "{compression:?}");
            assert_eq!(stats.uncompressed_bytes, tar.len() as u64);
            assert_eq!(stats.entries, 2);
            assert_eq!(fs::read(sandbox.path("app/big")).unwrap(), vec![7u8; 3 << 20]);
        }
    }

    #[test]
    fn symlinks_and_hard_links() {
        let sandbox = Sandbox::new();
        let mut layer = Layer::new();
        layer
            .file("bin/busybox", b"busybox")
            .hardlink("bin/sh", "./bin/busybox");
        let mut header = Layer::header(EntryType::Symlink, "bin/ls", 0, 0o777);
        header.set_link_name("busybox").unwrap();
        header.set_uid(42);
        layer.append(header, b"");
        // Targets are data: absolute or escaping ones are fine while nothing goes through them.
        let tar = layer
            .symlink("etc/mtab", "/proc/self/mounts")
            .symlink("up", "../../..")
            .build();
        sandbox.unpack(&tar).unwrap();

        let busybox = lstat(&sandbox.path("bin/busybox"));
        let sh = lstat(&sandbox.path("bin/sh"));
        assert_eq!(busybox.ino(), sh.ino());
        assert_eq!(busybox.nlink(), 2);
        let ls = lstat(&sandbox.path("bin/ls"));
        assert!(ls.file_type().is_symlink());
        assert_eq!((ls.uid(), ls.mtime()), (42, MTIME as i64));
        assert_eq!(fs::read_link(sandbox.path("bin/ls")).unwrap(), Path::new("busybox"));
        assert_eq!(
            fs::read_link(sandbox.path("etc/mtab")).unwrap(),
            Path::new("/proc/self/mounts")
        );
        assert_eq!(fs::read_link(sandbox.path("up")).unwrap(), Path::new("../../.."));
        sandbox.assert_nothing_escaped();
    }

    #[test]
    fn relative_symlinks_inside_are_followed_for_parents() {
        let sandbox = Sandbox::new();
        let tar = Layer::new()
            .dir("real", 0o755)
            .symlink("alias", "real")
            .symlink("sub/back", "../real")
            .file("alias/a", b"a")
            .file("sub/back/b", b"b")
            .build();
        sandbox.unpack(&tar).unwrap();
        assert_eq!(fs::read(sandbox.path("real/a")).unwrap(), b"a");
        assert_eq!(fs::read(sandbox.path("real/b")).unwrap(), b"b");
    }

    #[test]
    fn devices_and_fifos() {
        let sandbox = Sandbox::new();
        let tar = Layer::new()
            .device(EntryType::Char, "dev/null", 1, 3)
            .device(EntryType::Block, "dev/loop0", 7, 0)
            .device(EntryType::Fifo, "run/fifo", 0, 0)
            .build();
        sandbox.unpack(&tar).unwrap();
        let null = lstat(&sandbox.path("dev/null"));
        assert!(null.file_type().is_char_device());
        assert_eq!((stat::major(null.rdev()), stat::minor(null.rdev())), (1, 3));
        assert_eq!((null.mode() & 0o7777, null.mtime()), (0o620, MTIME as i64));
        let disk = lstat(&sandbox.path("dev/loop0"));
        assert!(disk.file_type().is_block_device());
        assert_eq!((stat::major(disk.rdev()), stat::minor(disk.rdev())), (7, 0));
        assert!(lstat(&sandbox.path("run/fifo")).file_type().is_fifo());
    }

    #[test]
    fn whiteouts_and_opaque_dirs() {
        let sandbox = Sandbox::new();
        let tar = Layer::new()
            .file("etc/gone", b"replaced by the whiteout")
            .file("etc/.wh.gone", b"")
            .file("var/.wh.cache", b"")
            .dir("opt", 0o755)
            .file("opt/.wh..wh..opq", b"")
            .file("new/nested/.wh..wh..opq", b"")
            .file(".wh..wh..plnk/123", b"")
            .file(".wh..wh.aufs", b"")
            .build();
        sandbox.unpack(&tar).unwrap();
        for whiteout in ["etc/gone", "var/cache"] {
            let meta = lstat(&sandbox.path(whiteout));
            assert!(meta.file_type().is_char_device(), "{whiteout}");
            assert_eq!(meta.rdev(), 0);
        }
        assert!(!sandbox.path("etc/.wh.gone").exists());
        for opaque in ["opt", "new/nested"] {
            assert_eq!(
                get_xattr(&sandbox.path(opaque), OPAQUE_XATTR).as_deref(),
                Some(&b"y"[..])
            );
            assert!(!sandbox.path(opaque).join(".wh..wh..opq").exists());
        }
        assert_eq!(get_xattr(&sandbox.path("etc"), OPAQUE_XATTR), None);
        assert!(!sandbox.path(".wh..wh..plnk").exists());
        assert!(!sandbox.path(".wh..wh.aufs").exists());
    }

    #[test]
    fn later_entries_replace_earlier_ones() {
        let sandbox = Sandbox::new();
        fs::write(sandbox.tmp.path().join("outside/target"), SENTINEL).unwrap();
        let tar = Layer::new()
            .file("f", b"first")
            .file("f", b"second")
            .file("file_then_dir", b"x")
            .dir("file_then_dir", 0o711)
            .file("dir_then_file/child/deep", b"x")
            .file("dir_then_file", b"now a file")
            .dir("kept", 0o755)
            .file("kept/child", b"stays")
            .dir("kept", 0o700)
            .symlink("link", &format!("{}/target", sandbox.outside()))
            .file("link", b"replaces the symlink")
            .file("orig", b"original")
            .hardlink("twin", "orig")
            .file("twin", b"replaces the hard link")
            .build();
        sandbox.unpack(&tar).unwrap();
        assert_eq!(fs::read(sandbox.path("f")).unwrap(), b"second");
        assert_eq!(lstat(&sandbox.path("file_then_dir")).mode() & 0o7777, 0o711);
        assert_eq!(fs::read(sandbox.path("dir_then_file")).unwrap(), b"now a file");
        assert_eq!(lstat(&sandbox.path("kept")).mode() & 0o7777, 0o700);
        assert_eq!(fs::read(sandbox.path("kept/child")).unwrap(), b"stays");
        assert_eq!(fs::read(sandbox.path("link")).unwrap(), b"replaces the symlink");
        assert_eq!(fs::read(sandbox.tmp.path().join("outside/target")).unwrap(), SENTINEL);
        assert_eq!(fs::read(sandbox.path("orig")).unwrap(), b"original");
        assert_eq!(fs::read(sandbox.path("twin")).unwrap(), b"replaces the hard link");
    }

    #[test]
    fn pax_xattrs_and_mtime() {
        let sandbox = Sandbox::new();
        let tar = Layer::new()
            .pax(&[
                ("SCHILY.xattr.user.origin", b"layer"),
                ("SCHILY.xattr.trusted.overlay.redirect", b"/elsewhere"),
                ("SCHILY.xattr.user.overlay.opaque", b"y"),
                ("mtime", b"1600000000.25"),
            ])
            .file("file", b"x")
            .pax(&[("SCHILY.xattr.user.dir", b"\x00\x01binary")])
            .dir("dir", 0o755)
            .pax(&[("SCHILY.xattr.user.link", b"skipped")])
            .symlink("link", "file")
            .build();
        sandbox.unpack(&tar).unwrap();
        let file = sandbox.path("file");
        assert_eq!(get_xattr(&file, c"user.origin").as_deref(), Some(&b"layer"[..]));
        assert_eq!(get_xattr(&file, c"trusted.overlay.redirect"), None);
        assert_eq!(get_xattr(&file, c"user.overlay.opaque"), None);
        let meta = lstat(&file);
        assert_eq!((meta.mtime(), meta.mtime_nsec()), (MTIME as i64, 250_000_000));
        assert_eq!(
            get_xattr(&sandbox.path("dir"), c"user.dir").as_deref(),
            Some(&b"\x00\x01binary"[..])
        );
        assert_eq!(get_xattr(&sandbox.path("link"), c"user.link"), None);
    }

    #[test]
    fn long_and_pax_names() {
        let sandbox = Sandbox::new();
        let long = format!("{}/file", "d".repeat(150));
        let mut layer = Layer::new();
        layer.append(
            Layer::header(EntryType::XGlobalHeader, "pax_global_header", 0, 0o644),
            b"",
        );
        let mut header = Header::new_gnu();
        header.set_size(4);
        header.set_mode(0o644);
        layer.0.append_data(&mut header, &long, &b"long"[..]).unwrap();
        let tar = layer.pax(&[("path", b"pax/name")]).file("ignored", b"pax").build();
        let stats = sandbox.unpack(&tar).unwrap();
        assert_eq!(stats.entries, 3);
        assert_eq!(fs::read(sandbox.path(&long)).unwrap(), b"long");
        assert_eq!(fs::read(sandbox.path("pax/name")).unwrap(), b"pax");
        assert!(!sandbox.path("ignored").exists());
        assert!(!sandbox.path("pax_global_header").exists());

        // A pre-POSIX directory: type NUL and a trailing slash.
        let sandbox = Sandbox::new();
        let mut v7_dir = Layer::header(EntryType::Regular, "old/", 0, 0o750);
        v7_dir.as_old_mut().linkflag = [0];
        let tar = Layer::new().append(v7_dir, b"").file("old/file", b"x").build();
        sandbox.unpack(&tar).unwrap();
        assert_eq!(lstat(&sandbox.path("old")).mode() & 0o7777, 0o750);
        assert!(lstat(&sandbox.path("old")).is_dir());

        // The PAX name is the one that counts, and the one that is checked.
        let sandbox = Sandbox::new();
        sandbox.assert_unsafe(
            &Layer::new()
                .pax(&[("path", b"../escape")])
                .file("innocent", b"x")
                .build(),
        );
        assert!(!sandbox.path("innocent").exists());
    }

    #[test]
    fn parses_pax_times() {
        let parse = |s: &str| parse_pax_time(s.as_bytes()).map(|t| (t.tv_sec(), t.tv_nsec()));
        assert_eq!(parse("12"), Some((12, 0)));
        assert_eq!(parse("12.5"), Some((12, 500_000_000)));
        assert_eq!(parse("12.1234567891"), Some((12, 123_456_789)));
        assert_eq!(parse("-1.5"), Some((-2, 500_000_000)));
        assert_eq!(parse("1.x"), None);
        assert_eq!(parse(""), None);
    }

    #[test]
    fn rejects_parent_escape() {
        let sandbox = Sandbox::new();
        sandbox.assert_unsafe(&Layer::new().file("../escape", b"x").build());
    }

    #[test]
    fn rejects_absolute_path() {
        let sandbox = Sandbox::new();
        let absolute = format!("{}/abs", sandbox.outside());
        sandbox.assert_unsafe(&Layer::new().file(&absolute, b"x").build());
    }

    #[test]
    fn rejects_nested_parent_escape() {
        let sandbox = Sandbox::new();
        sandbox.assert_unsafe(&Layer::new().file("a/../../escape", b"x").build());
        assert!(!sandbox.path("a").exists());
    }

    #[test]
    fn rejects_write_through_absolute_symlink() {
        let sandbox = Sandbox::new();
        let outside = sandbox.outside();
        sandbox.assert_unsafe(&Layer::new().symlink("evil", &outside).file("evil/passwd", b"x").build());
        sandbox.assert_unsafe(&Layer::new().symlink("evil", &outside).dir("evil/dir", 0o755).build());
        sandbox.assert_unsafe(&Layer::new().symlink("evil", &outside).file("evil/a/b/c", b"x").build());
    }

    #[test]
    fn rejects_write_through_relative_symlink_escape() {
        let sandbox = Sandbox::new();
        sandbox.assert_unsafe(&Layer::new().symlink("evil", "../outside").file("evil/x", b"x").build());
        sandbox.assert_unsafe(
            &Layer::new()
                .symlink("d/evil", "../../../x")
                .file("d/evil/y", b"y")
                .build(),
        );
        sandbox.assert_unsafe(&Layer::new().symlink("up", "..").file("up/pwned", b"x").build());
    }

    #[test]
    fn rejects_whiteouts_through_escaping_symlinks() {
        let sandbox = Sandbox::new();
        sandbox.assert_unsafe(
            &Layer::new()
                .symlink("evil", "..")
                .file("evil/.wh.sentinel", b"")
                .build(),
        );
        sandbox.assert_unsafe(
            &Layer::new()
                .symlink("evil", &sandbox.outside())
                .file("evil/.wh..wh..opq", b"")
                .build(),
        );
        assert_eq!(get_xattr(&sandbox.tmp.path().join("outside"), OPAQUE_XATTR), None);
    }

    #[test]
    fn rejects_hard_link_escape() {
        let sandbox = Sandbox::new();
        sandbox.assert_unsafe(&Layer::new().hardlink("stolen", "../sentinel").build());
        sandbox.assert_unsafe(&Layer::new().hardlink("stolen", "a/../../sentinel").build());
        let absolute = sandbox.tmp.path().join("sentinel").display().to_string();
        sandbox.assert_unsafe(&Layer::new().hardlink("stolen", &absolute).build());
        assert!(!sandbox.path("stolen").exists());
    }

    #[test]
    fn rejects_hard_link_through_escaping_symlink() {
        let sandbox = Sandbox::new();
        let tmp = sandbox.tmp.path().display().to_string();
        sandbox.assert_unsafe(
            &Layer::new()
                .symlink("evil", &tmp)
                .hardlink("stolen", "evil/sentinel")
                .build(),
        );
        sandbox.assert_unsafe(
            &Layer::new()
                .symlink("evil", "..")
                .hardlink("stolen", "evil/sentinel")
                .build(),
        );
        assert!(fs::symlink_metadata(sandbox.path("stolen")).is_err());
    }

    #[test]
    fn hard_link_to_symlink_links_the_symlink_itself() {
        let sandbox = Sandbox::new();
        let target = format!("{}/../sentinel", sandbox.outside());
        let tar = Layer::new().symlink("evil", &target).hardlink("twin", "evil").build();
        sandbox.unpack(&tar).unwrap();
        let twin = lstat(&sandbox.path("twin"));
        assert!(twin.file_type().is_symlink());
        assert_eq!(twin.ino(), lstat(&sandbox.path("evil")).ino());
        sandbox.assert_nothing_escaped();
    }

    #[test]
    fn truncated_gzip_is_corrupt() {
        let sandbox = Sandbox::new();
        let tar = Layer::new().file("file", &vec![1u8; 100_000]).build();
        let compressed = gzip(&tar);
        let truncated = &compressed[..compressed.len() / 2];
        match unpack_layer(truncated, Compression::Gzip, &sandbox.dest) {
            Err(UnpackError::Corrupt { .. }) => {}
            other => panic!("expected Corrupt, got {other:?}"),
        }
        // Cut right before the gzip trailer: all tar data arrives, the checksum never does.
        let trailerless = &compressed[..compressed.len() - 8];
        let sandbox = Sandbox::new();
        match unpack_layer(trailerless, Compression::Gzip, &sandbox.dest) {
            Err(UnpackError::Corrupt { .. }) => {}
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }

    #[test]
    fn truncated_tar_is_corrupt() {
        let sandbox = Sandbox::new();
        let tar = Layer::new().file("file", &vec![1u8; 100_000]).build();
        match sandbox.unpack(&tar[..50_000]) {
            Err(UnpackError::Corrupt { .. }) => {}
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }

    #[test]
    fn source_errors_are_read_errors() {
        struct Failing<'a>(&'a [u8]);
        impl Read for Failing<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                if self.0.is_empty() {
                    return Err(io::Error::new(io::ErrorKind::ConnectionReset, "reset"));
                }
                self.0.read(buf)
            }
        }
        let sandbox = Sandbox::new();
        let compressed = gzip(&Layer::new().file("file", &vec![1u8; 100_000]).build());
        let reader = Failing(&compressed[..compressed.len() / 2]);
        match unpack_layer(reader, Compression::Gzip, &sandbox.dest) {
            Err(UnpackError::Read(e)) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset),
            other => panic!("expected Read, got {other:?}"),
        }
    }
}
