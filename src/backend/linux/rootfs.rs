//! Assembles a container's root filesystem and pivots into it.
//!
//! Runs in the container's init child: a freshly forked, single-threaded
//! process that has already joined the pod's namespaces and unshared its mount
//! namespace. The sequence follows what runc and containerd users expect:
//! overlay rootfs, the standard kernel filesystems, `/dev`, the spec's mounts,
//! devices, masked and read-only paths, then `pivot_root`.
//!
//! Every path inside the container is resolved within the new rootfs with
//! `openat2(RESOLVE_IN_ROOT)`, so symlinks and `..` in the image can never
//! reach the host: `/data -> /etc` resolves to `<rootfs>/etc`, and
//! `/../../x` is clamped to `<rootfs>/x`. Mounts are placed on the opened
//! file descriptor through its `/proc/self/fd/N` path, never on a path that
//! could be swapped between the check and the mount.

use std::ffi::{CStr, CString, OsStr, OsString};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag, open, openat, openat2, readlinkat};
use nix::mount::{MntFlags, MsFlags};
use nix::sys::stat::{Mode, SFlag, fstat, mkdirat, mknodat, stat};
use nix::sys::statfs::{PROC_SUPER_MAGIC, fstatfs};
use nix::sys::statvfs::{FsFlags, fstatvfs};
use nix::unistd::{UnlinkatFlags, chdir, fchdir, pivot_root, symlinkat, unlinkat};
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

/// Mount propagation, applied recursively (`rprivate`, `rslave`, `rshared`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
pub enum Propagation {
    #[default]
    Private,
    Slave,
    Shared,
}

impl Propagation {
    fn flag(&self) -> MsFlags {
        match self {
            Propagation::Private => MsFlags::MS_PRIVATE,
            Propagation::Slave => MsFlags::MS_SLAVE,
            Propagation::Shared => MsFlags::MS_SHARED,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum MountKind {
    Bind,
    /// A private tmpfs (nosuid, nodev); `size_bytes: None` is the kernel default (half of RAM).
    Tmpfs {
        size_bytes: Option<u64>,
        mode: Option<u32>,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MountSpec {
    /// Absolute path inside the container. Symlinks and ".." resolve within the rootfs
    /// (`/data -> /etc` makes `/data/x` mean `<rootfs>/etc/x`; `/../x` means `<rootfs>/x`);
    /// missing directories (or, for a file source, the file) are created there. Mounting
    /// over the root or inside /proc is refused (except the lxcfs files runc allows).
    pub destination: String,
    /// Host path, for `MountKind::Bind`.
    pub source: PathBuf,
    pub kind: MountKind,
    /// Read-only top mount (submounts of a recursive bind stay as they are).
    pub readonly: bool,
    /// Read-only mount and all its submounts: `mount_setattr(AT_RECURSIVE, MOUNT_ATTR_RDONLY)`.
    pub recursive_readonly: bool,
    pub propagation: Propagation,
    /// `rbind`: carry the source's submounts along.
    pub recursive: bool,
    /// A bind with the ID mapping of `RootfsSpec::userns` (an idmapped mount).
    #[serde(default)]
    pub idmap: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeviceSpec {
    pub host_path: PathBuf,
    pub container_path: String,
    /// "rwm" subset; enforced by the devices cgroup, informational here.
    pub permissions: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct CgroupMount {
    /// "cgroup" (v1) or "cgroup2".
    pub fstype: String,
    /// Directory under /sys/fs/cgroup; "" for a v2-only layout (cgroup2 at /sys/fs/cgroup itself).
    pub name: String,
    /// Mount data, e.g. "cpu,cpuacct" or "name=systemd" for v1; usually "" for cgroup2.
    pub options: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct RootfsSpec {
    /// Image layer directories, lowest first. Empty: `target` already holds the rootfs.
    pub lower_dirs: Vec<PathBuf>,
    /// The container's writable layer (same filesystem as `work_dir`); empty for a
    /// read-only overlay.
    pub upper_dir: PathBuf,
    pub work_dir: PathBuf,
    /// Existing empty directory where the rootfs is assembled and then pivoted into.
    pub target: PathBuf,
    pub readonly_rootfs: bool,
    /// `/sys` and cgroups read-write, the host's `/dev` (a non-recursive bind, with the
    /// container's own pts, shm and mqueue on top), masked and read-only paths not applied.
    pub privileged: bool,
    /// Applied in order after the standard mounts.
    pub mounts: Vec<MountSpec>,
    /// Extra device nodes: mknod with the host node's type, numbers and mode (owned by
    /// root), or a bind mount of the host node where mknod is not permitted. With
    /// `privileged`, nodes already in the (host's) /dev are left as they are.
    pub devices: Vec<DeviceSpec>,
    pub masked_paths: Vec<String>,
    pub readonly_paths: Vec<String>,
    /// Host directory (the pod's shm tmpfs) bound at /dev/shm; `None`: a private 64 MiB tmpfs.
    pub shm: Option<PathBuf>,
    /// Propagation of "/" in the new mount namespace, set before anything else.
    /// `Private` unless a mount wants `Slave` or `Shared`.
    pub root_propagation: Propagation,
    /// How /sys/fs/cgroup looks (read-only unless privileged); empty: as sysfs shows it.
    pub cgroup_mounts: Vec<CgroupMount>,
    /// The pod's user namespace: the image layers, and binds marked `idmap`, are mounted
    /// with its ID mapping, so that the files the node's root owns are the container root's.
    #[serde(default)]
    pub userns: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    /// A system call failed; `step` names what was being done and to which path.
    #[error("{step}")]
    Sys {
        step: String,
        #[source]
        source: Errno,
    },
    #[error("bind mount source {} does not exist", .0.display())]
    MissingSource(PathBuf),
    #[error("device {} does not exist on the host", .0.display())]
    MissingDevice(PathBuf),
    #[error("{} is not a character or block device", .0.display())]
    NotADevice(PathBuf),
    #[error("destination {0} is not an absolute path")]
    RelativeDestination(String),
    #[error("destination {0} escapes the rootfs")]
    Escape(String),
    #[error("destination {0} resolves to the root of the rootfs")]
    RootDestination(String),
    #[error("destination {0} is inside /proc")]
    ProcDestination(String),
    #[error("{0} was replaced while it was being mounted")]
    Raced(String),
    #[error(
        "overlay options for {layers} layers take {len} bytes (limit 4095) \
         and a path is too long for fsconfig"
    )]
    OverlayTooLong { layers: usize, len: usize },
    #[error("mounting the overlay at {}: {message}", target.display())]
    Overlay {
        target: PathBuf,
        message: String,
        #[source]
        source: Errno,
    },
    #[error("read-only recursive mount of {0} needs mount_setattr(2), which this kernel lacks")]
    NoRecursiveReadonly(String),
    #[error("invalid cgroup mount {name:?}: {reason}")]
    InvalidCgroupMount { name: String, reason: &'static str },
}

type Result<T> = std::result::Result<T, RootfsError>;

/// Attaches a lazily built step description to a failed system call.
trait Step<T> {
    fn step(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> Step<T> for nix::Result<T> {
    fn step(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| RootfsError::Sys { step: what(), source })
    }
}

/// The usual OCI masked paths (Docker's defaults).
pub fn default_masked_paths() -> Vec<String> {
    [
        "/proc/asound",
        "/proc/acpi",
        "/proc/interrupts",
        "/proc/kcore",
        "/proc/keys",
        "/proc/latency_stats",
        "/proc/timer_list",
        "/proc/timer_stats",
        "/proc/sched_debug",
        "/proc/scsi",
        "/sys/firmware",
        "/sys/devices/virtual/powercap",
    ]
    .map(String::from)
    .into()
}

/// The usual OCI read-only paths.
pub fn default_readonly_paths() -> Vec<String> {
    ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
        .map(String::from)
        .into()
}

/// Assembles the container's root filesystem and makes it the root (pivot_root), leaving
/// cwd at "/". Call it in the container's init child, in its own mount namespace.
pub fn setup_rootfs(spec: &RootfsSpec) -> Result<()> {
    let _umask = UmaskGuard::zero();
    mount_path(
        None,
        Path::new("/"),
        None,
        MsFlags::MS_REC | spec.root_propagation.flag(),
        None,
    )
    .step(|| format!("setting / to recursive {:?} propagation", spec.root_propagation))?;
    if spec.root_propagation == Propagation::Shared {
        // The rootfs mounted under a shared parent would propagate back to the host, and
        // pivot_root refuses a new root whose parent is shared. (A slave parent is fine, and
        // stays a slave, so that binds of directories on it keep receiving host mounts.)
        make_parent_mount_private(&spec.target)?;
    }
    mount_rootfs(spec)?;
    let root = open(
        &spec.target,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .step(|| format!("opening the rootfs {}", spec.target.display()))?;
    let rootfs = Rootfs { spec, root };

    rootfs.mount_proc()?;
    rootfs.setup_dev()?;
    rootfs.mount_sys()?;
    rootfs.mount_cgroups()?;
    for mount in &spec.mounts {
        rootfs.mount_user(mount)?;
    }
    for device in &spec.devices {
        rootfs.create_device(device)?;
    }
    if !spec.privileged {
        rootfs.mask_paths()?;
        rootfs.readonly_paths()?;
    }
    if spec.readonly_rootfs {
        remount_bind(&rootfs.root, MsFlags::MS_RDONLY).step(|| "remounting / read-only".into())?;
    }
    rootfs.pivot()
}

/// The overlayfs mount data for the spec: `lowerdir` top layer first, then `upperdir` and
/// `workdir`, with `\`, `:` and `,` escaped. When the absolute form exceeds the 4095 bytes
/// mount(2) accepts, paths are relative to the lower dirs' common parent (the mount is then
/// made from that directory, like containerd does); if that is still too long the mount uses
/// fsconfig `lowerdir+` (Linux 6.8+) instead.
pub fn overlay_options(spec: &RootfsSpec) -> String {
    String::from_utf8_lossy(&overlay_data(spec).options).into_owned()
}

/// mount(2) copies one page of mount data, NUL included.
const MAX_MOUNT_DATA: usize = 4095;
/// fsconfig(2) copies string values of at most 255 bytes.
const MAX_FSCONFIG_STRING: usize = 255;
/// How often openat2 is retried when a concurrent mount or rename makes it give up (EAGAIN).
const OPENAT2_RETRIES: usize = 128;
/// Symlinks followed while creating a path, as the kernel's MAXSYMLINKS.
const MAX_SYMLINKS: usize = 40;

/// Destinations under /proc that may be mounted over (lxcfs and friends), as runc allows.
const PROC_MOUNT_ALLOWED: &[&str] = &[
    "/proc/cpuinfo",
    "/proc/diskstats",
    "/proc/meminfo",
    "/proc/stat",
    "/proc/swaps",
    "/proc/uptime",
    "/proc/loadavg",
    "/proc/slabinfo",
    "/proc/net/dev",
    "/proc/sys/kernel/ns_last_pid",
];

/// Device nodes every container gets: name, kind, major, minor (mode 0666).
const DEFAULT_DEVICES: &[(&str, u64, u64)] = &[
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

const DEV_SYMLINKS: &[(&str, &str)] = &[
    ("/proc/self/fd", "fd"),
    ("/proc/self/fd/0", "stdin"),
    ("/proc/self/fd/1", "stdout"),
    ("/proc/self/fd/2", "stderr"),
    ("pts/ptmx", "ptmx"),
];

struct OverlayData {
    /// Directory the relative paths in `options` start from.
    base: Option<PathBuf>,
    options: Vec<u8>,
}

fn overlay_data(spec: &RootfsSpec) -> OverlayData {
    let absolute = render_overlay(spec, None);
    if absolute.len() <= MAX_MOUNT_DATA || spec.lower_dirs.is_empty() {
        return OverlayData {
            base: None,
            options: absolute,
        };
    }
    let base = common_parent(&spec.lower_dirs);
    let relative = render_overlay(spec, Some(&base));
    if relative.len() < absolute.len() {
        OverlayData {
            base: Some(base),
            options: relative,
        }
    } else {
        OverlayData {
            base: None,
            options: absolute,
        }
    }
}

fn render_overlay(spec: &RootfsSpec, base: Option<&Path>) -> Vec<u8> {
    let mut out = b"lowerdir=".to_vec();
    for (i, dir) in spec.lower_dirs.iter().rev().enumerate() {
        if i > 0 {
            out.push(b':');
        }
        push_escaped(&mut out, relative_to(dir, base));
    }
    if !spec.upper_dir.as_os_str().is_empty() {
        out.extend_from_slice(b",upperdir=");
        push_escaped(&mut out, relative_to(&spec.upper_dir, base));
        out.extend_from_slice(b",workdir=");
        push_escaped(&mut out, relative_to(&spec.work_dir, base));
    }
    out
}

fn relative_to<'a>(path: &'a Path, base: Option<&Path>) -> &'a OsStr {
    match base.and_then(|base| path.strip_prefix(base).ok()) {
        Some(rel) if rel.as_os_str().is_empty() => OsStr::new("."),
        Some(rel) => rel.as_os_str(),
        None => path.as_os_str(),
    }
}

fn push_escaped(out: &mut Vec<u8>, path: &OsStr) {
    for &byte in path.as_bytes() {
        if matches!(byte, b'\\' | b':' | b',') {
            out.push(b'\\');
        }
        out.push(byte);
    }
}

/// The deepest directory containing all `paths` ("/" at worst).
fn common_parent(paths: &[PathBuf]) -> PathBuf {
    let Some((first, rest)) = paths.split_first() else {
        return PathBuf::from("/");
    };
    let mut common = first.parent().unwrap_or(Path::new("/")).to_path_buf();
    for path in rest {
        while !path.starts_with(&common) {
            if !common.pop() {
                return PathBuf::from("/");
            }
        }
    }
    common
}

fn mount_rootfs(spec: &RootfsSpec) -> Result<()> {
    if let Some(userns) = &spec.userns
        && !spec.lower_dirs.is_empty()
    {
        return mount_rootfs_unmapped(&idmap_layers(spec, userns)?);
    }
    mount_rootfs_unmapped(spec)
}

/// Mounts the layers' common parent again, ID-mapped through `userns`, next to the
/// rootfs (in the container's mount namespace only), and returns the spec with the
/// lower dirs moved there. The writable layer stays unmapped: overlayfs writes it with
/// the caller's (already mapped) IDs.
fn idmap_layers(spec: &RootfsSpec, userns: &Path) -> Result<RootfsSpec> {
    let base = common_parent(&spec.lower_dirs);
    let at = spec.target.with_file_name("layers");
    match std::fs::create_dir(&at) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => {
            return Err(RootfsError::Sys {
                step: format!("creating {}", at.display()),
                source: Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
            });
        }
    }
    let tree =
        idmapped_tree(&base, userns, false).step(|| format!("ID-mapping the image layers in {}", base.display()))?;
    move_mount_to(&tree, &at).step(|| format!("attaching the ID-mapped layers at {}", at.display()))?;
    let mut mapped = spec.clone();
    mapped.lower_dirs = spec
        .lower_dirs
        .iter()
        .map(|dir| at.join(dir.strip_prefix(&base).unwrap_or(dir)))
        .collect();
    Ok(mapped)
}

/// A detached copy of the mount tree at `source`, ID-mapped through the user namespace
/// file `userns`.
fn idmapped_tree(source: &Path, userns: &Path, recursive: bool) -> nix::Result<OwnedFd> {
    let userns = open(userns, OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty())?;
    let source = CString::new(source.as_os_str().as_bytes()).map_err(|_| Errno::EINVAL)?;
    let recursive_flag = if recursive {
        libc::AT_RECURSIVE as libc::c_uint
    } else {
        0
    };
    // SAFETY: the path is NUL-terminated and outlives the call; returns a new fd or -1.
    let fd = Errno::result(unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            source.as_ptr(),
            OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | recursive_flag,
        )
    })?;
    // SAFETY: open_tree returned a fresh descriptor that nothing else owns.
    let tree = unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) };
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_IDMAP,
        attr_clr: 0,
        propagation: 0,
        userns_fd: userns.as_raw_fd() as u64,
    };
    let flags = libc::AT_EMPTY_PATH | if recursive { libc::AT_RECURSIVE } else { 0 };
    // SAFETY: the path is NUL-terminated and `attr` is a live struct whose size is passed
    // along; the kernel only reads both.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            flags,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    Errno::result(rc)?;
    Ok(tree)
}

fn mount_rootfs_unmapped(spec: &RootfsSpec) -> Result<()> {
    let target = &spec.target;
    if spec.lower_dirs.is_empty() {
        // pivot_root needs the new root to be a mount point.
        return mount_path(Some(target), target, None, MsFlags::MS_BIND | MsFlags::MS_REC, None)
            .step(|| format!("bind mounting the rootfs {} onto itself", target.display()));
    }
    let data = overlay_data(spec);
    let layers = spec.lower_dirs.len();
    if data.options.len() <= MAX_MOUNT_DATA {
        debug!(target = %target.display(), layers, "mounting the overlay rootfs");
        return mount_overlay_legacy(target, &data);
    }
    let paths = spec.lower_dirs.iter().chain([&spec.upper_dir, &spec.work_dir]);
    if paths.clone().any(|p| p.as_os_str().len() > MAX_FSCONFIG_STRING) {
        return Err(RootfsError::OverlayTooLong {
            layers,
            len: data.options.len(),
        });
    }
    debug!(target = %target.display(), layers, "mounting the overlay rootfs with fsconfig");
    mount_overlay_fsconfig(spec)
}

fn mount_overlay_legacy(target: &Path, data: &OverlayData) -> Result<()> {
    let overlay_err = |source| {
        let options = String::from_utf8_lossy(&data.options);
        let mut message: String = options.chars().take(512).collect();
        if message.len() < options.len() {
            message.push_str("...");
        }
        RootfsError::Overlay {
            target: target.to_path_buf(),
            message,
            source,
        }
    };
    let Some(base) = &data.base else {
        return nix::mount::mount(
            Some("overlay"),
            target,
            Some("overlay"),
            MsFlags::empty(),
            Some(data.options.as_slice()),
        )
        .map_err(overlay_err);
    };
    // Relative layer paths are resolved from the cwd at mount time; the target is held
    // open so that a relative one still means what it did.
    let dir_flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
    let cwd = open(".", dir_flags, Mode::empty()).step(|| "opening the current directory".into())?;
    let target_fd = open(target, dir_flags, Mode::empty()).step(|| format!("opening {}", target.display()))?;
    chdir(base).step(|| format!("changing directory to {}", base.display()))?;
    let mounted = nix::mount::mount(
        Some("overlay"),
        &fd_path(&target_fd),
        Some("overlay"),
        MsFlags::empty(),
        Some(data.options.as_slice()),
    );
    fchdir(&cwd).step(|| "returning to the previous directory".into())?;
    mounted.map_err(overlay_err)
}

/// The new mount API takes one layer per `lowerdir+` call, so the layer count has no
/// length limit (only each path's 255 bytes).
fn mount_overlay_fsconfig(spec: &RootfsSpec) -> Result<()> {
    let target = &spec.target;
    let fs = fsopen(c"overlay").step(|| "opening an overlay filesystem context".into())?;
    let overlay_err = |what: String, source: Errno| RootfsError::Overlay {
        target: target.clone(),
        message: match fs_log(&fs) {
            log if log.is_empty() => what,
            log => format!("{what} ({log})"),
        },
        source,
    };
    let set = |key: &CStr, value: &Path| {
        CString::new(value.as_os_str().as_bytes())
            .map_err(|_| Errno::EINVAL)
            .and_then(|c| fsconfig_string(&fs, key, &c))
            .map_err(|e| {
                let what = format!("setting {} to {}", key.to_string_lossy(), value.display());
                overlay_err(what, e)
            })
    };
    for dir in spec.lower_dirs.iter().rev() {
        set(c"lowerdir+", dir)?;
    }
    if !spec.upper_dir.as_os_str().is_empty() {
        set(c"upperdir", &spec.upper_dir)?;
        set(c"workdir", &spec.work_dir)?;
    }
    fsconfig_create(&fs).map_err(|e| overlay_err("creating the overlay".into(), e))?;
    let mnt = fsmount(&fs).map_err(|e| overlay_err("creating the overlay mount".into(), e))?;
    move_mount_to(&mnt, target).step(|| format!("attaching the overlay at {}", target.display()))
}

/// Makes the mount containing `path` private (non-recursively).
fn make_parent_mount_private(path: &Path) -> Result<()> {
    let path = std::fs::canonicalize(path).map_err(|e| RootfsError::Sys {
        step: format!("resolving {}", path.display()),
        source: Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
    })?;
    for dir in path.ancestors() {
        let c = CString::new(dir.as_os_str().as_bytes()).map_err(|_| RootfsError::Sys {
            step: format!("resolving {}", dir.display()),
            source: Errno::EINVAL,
        })?;
        let st =
            statx(libc::AT_FDCWD, &c, libc::AT_SYMLINK_NOFOLLOW).step(|| format!("inspecting {}", dir.display()))?;
        if st.stx_attributes & libc::STATX_ATTR_MOUNT_ROOT as u64 != 0 || dir == Path::new("/") {
            return mount_path(None, dir, None, MsFlags::MS_PRIVATE, None)
                .step(|| format!("making {} private", dir.display()));
        }
    }
    Ok(())
}

/// What to create when a path is missing.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Leaf {
    Dir,
    File,
}

/// The result of resolving `path` in the rootfs. EXDEV is how openat2 reports a ".."
/// that would have left the root (a concurrent rename); RESOLVE_IN_ROOT otherwise clamps.
fn resolved(path: &str, result: nix::Result<OwnedFd>) -> Result<OwnedFd> {
    match result {
        Err(Errno::EXDEV) => Err(RootfsError::Escape(path.into())),
        other => other.step(|| format!("resolving {path} in the rootfs")),
    }
}

/// The rootfs being assembled; `root` is an `O_PATH` descriptor of its mount root.
struct Rootfs<'a> {
    spec: &'a RootfsSpec,
    root: OwnedFd,
}

impl Rootfs<'_> {
    /// Opens `path` (`O_PATH`) inside the rootfs; symlinks and ".." cannot leave it.
    fn open(&self, path: &str) -> nix::Result<OwnedFd> {
        let rel = match path.trim_start_matches('/') {
            "" => ".",
            rel => rel,
        };
        let how = OpenHow::new()
            .flags(OFlag::O_PATH | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
        // EAGAIN: a mount or rename anywhere on the system raced with a ".." step, and the
        // kernel could not prove it stayed inside; it asks the caller to retry.
        let mut result = openat2(&self.root, rel, how);
        for _ in 0..OPENAT2_RETRIES {
            if !matches!(result, Err(Errno::EAGAIN)) {
                break;
            }
            result = openat2(&self.root, rel, how);
        }
        result
    }

    /// Like [`Rootfs::open`], creating missing directories and, as `leaf` says, the last component.
    fn ensure(&self, path: &str, leaf: Leaf) -> Result<OwnedFd> {
        match self.open(path) {
            Err(Errno::ENOENT) => {}
            other => return resolved(path, other),
        }
        match self.create_path(path, leaf) {
            Err(Errno::EXDEV) => return Err(RootfsError::Escape(path.into())),
            other => other.step(|| format!("creating {path} in the rootfs"))?,
        }
        resolved(path, self.open(path))
    }

    /// Walks `path` one component at a time from the root, resolving symlinks within the
    /// rootfs itself (as RESOLVE_IN_ROOT would) and creating what is missing, so that a
    /// dangling symlink in the image gets its target created inside the rootfs.
    fn create_path(&self, path: &str, leaf: Leaf) -> nix::Result<()> {
        let component_how = OpenHow::new()
            .flags(OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS);
        let mut dirs: Vec<OwnedFd> = Vec::new(); // resolved directories below the root
        let mut todo: Vec<OsString> = components(OsStr::new(path)).rev().collect();
        let (mut links, mut steps) = (0, 0);
        while let Some(name) = todo.pop() {
            steps += 1;
            if steps > 4096 {
                return Err(Errno::ELOOP); // only a concurrent rename storm gets here
            }
            if name == ".." {
                dirs.pop();
                continue;
            }
            let parent = dirs.last().map_or(self.root.as_fd(), |d| d.as_fd());
            match openat2(parent, name.as_os_str(), component_how) {
                Ok(fd) => match SFlag::from_bits_truncate(fstat(&fd)?.st_mode & libc::S_IFMT) {
                    SFlag::S_IFDIR => dirs.push(fd),
                    SFlag::S_IFLNK => {
                        links += 1;
                        if links > MAX_SYMLINKS {
                            return Err(Errno::ELOOP);
                        }
                        let target = readlinkat(parent, name.as_os_str())?;
                        if target.as_bytes().starts_with(b"/") {
                            dirs.clear();
                        }
                        todo.extend(components(&target).rev());
                    }
                    _ if todo.is_empty() => return Ok(()),
                    _ => return Err(Errno::ENOTDIR),
                },
                Err(Errno::ENOENT) => {
                    let created = if todo.is_empty() && leaf == Leaf::File {
                        let flags =
                            OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
                        openat(parent, name.as_os_str(), flags, Mode::from_bits_truncate(0o644)).map(drop)
                    } else {
                        mkdirat(parent, name.as_os_str(), Mode::from_bits_truncate(0o755))
                    };
                    match created {
                        // Open it (or whatever raced in, e.g. a dangling symlink) next round.
                        Ok(()) | Err(Errno::EEXIST) => todo.push(name),
                        Err(e) => return Err(e),
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Re-opens `dest` after something was mounted on `before` (the descriptor it was
    /// mounted through, which still names the covered file) and checks that it now is the
    /// root of a different mount.
    fn reopen_mounted(&self, dest: &str, before: &OwnedFd) -> Result<OwnedFd> {
        let fd = resolved(dest, self.open(dest))?;
        let old = statx_fd(before).step(|| format!("inspecting {dest}"))?;
        let new = statx_fd(&fd).step(|| format!("inspecting {dest}"))?;
        // Both facts need Linux 5.8; older kernels do not report them and are not checked.
        let mount_root = libc::STATX_ATTR_MOUNT_ROOT as u64;
        let not_root = new.stx_attributes_mask & mount_root != 0 && new.stx_attributes & mount_root == 0;
        let same_mount = new.stx_mask & libc::STATX_MNT_ID != 0 && new.stx_mnt_id == old.stx_mnt_id;
        if not_root || same_mount {
            return Err(RootfsError::Raced(dest.into()));
        }
        Ok(fd)
    }

    /// Mounts a kernel filesystem at `dest` and returns its root.
    fn mount_fs(&self, dest: &str, fstype: &str, flags: MsFlags, data: Option<&str>) -> Result<OwnedFd> {
        let fd = self.ensure(dest, Leaf::Dir)?;
        mount_str(Some(fstype), &fd_path(&fd), Some(fstype), flags, data)
            .step(|| format!("mounting {fstype} on {dest}"))?;
        self.reopen_mounted(dest, &fd)
    }

    /// Bind mounts host `source` at `dest` and returns the new mount's root. A
    /// `user_destination` (from the spec) may not be the root or inside /proc.
    fn bind(&self, source: &Path, dest: &str, recursive: bool, user_destination: bool) -> Result<OwnedFd> {
        let src = match open(source, OFlag::O_PATH | OFlag::O_CLOEXEC, Mode::empty()) {
            Err(Errno::ENOENT) => return Err(RootfsError::MissingSource(source.into())),
            other => other.step(|| format!("opening bind mount source {}", source.display()))?,
        };
        let is_dir =
            fstat(&src).step(|| format!("inspecting {}", source.display()))?.st_mode & libc::S_IFMT == libc::S_IFDIR;
        let fd = self.ensure(dest, if is_dir { Leaf::Dir } else { Leaf::File })?;
        if user_destination {
            self.check_destination(dest, &fd)?;
        }
        let flags = MsFlags::MS_BIND | if recursive { MsFlags::MS_REC } else { MsFlags::empty() };
        mount_path(Some(&fd_path(&src)), &fd_path(&fd), None, flags, None)
            .step(|| format!("bind mounting {} on {dest}", source.display()))?;
        self.reopen_mounted(dest, &fd)
    }

    /// Like `bind` for a user mount, ID-mapped through the pod's user namespace.
    fn bind_idmapped(&self, source: &Path, dest: &str, recursive: bool) -> Result<OwnedFd> {
        let Some(userns) = &self.spec.userns else {
            return Err(RootfsError::Sys {
                step: format!("ID-mapping {dest} without a user namespace"),
                source: Errno::EINVAL,
            });
        };
        let is_dir = match stat(source) {
            Err(Errno::ENOENT) => return Err(RootfsError::MissingSource(source.into())),
            other => {
                other
                    .step(|| format!("inspecting bind mount source {}", source.display()))?
                    .st_mode
                    & libc::S_IFMT
                    == libc::S_IFDIR
            }
        };
        let fd = self.ensure(dest, if is_dir { Leaf::Dir } else { Leaf::File })?;
        self.check_destination(dest, &fd)?;
        let tree =
            idmapped_tree(source, userns, recursive).step(|| format!("ID-mapping {} for {dest}", source.display()))?;
        move_mount_onto(&tree, &fd).step(|| format!("bind mounting {} on {dest}", source.display()))?;
        self.reopen_mounted(dest, &fd)
    }

    /// Refuses user mounts over the rootfs root or inside /proc.
    fn check_destination(&self, dest: &str, fd: &OwnedFd) -> Result<()> {
        let st = statx_fd(fd).step(|| format!("inspecting {dest}"))?;
        let root = statx_fd(&self.root).step(|| "inspecting the rootfs".into())?;
        if (st.stx_mnt_id, st.stx_ino, st.stx_dev_major, st.stx_dev_minor)
            == (root.stx_mnt_id, root.stx_ino, root.stx_dev_major, root.stx_dev_minor)
        {
            return Err(RootfsError::RootDestination(dest.into()));
        }
        let on_proc = fstatfs(fd).step(|| format!("inspecting {dest}"))?.filesystem_type() == PROC_SUPER_MAGIC;
        if on_proc && !PROC_MOUNT_ALLOWED.contains(&clean_path(dest).as_str()) {
            return Err(RootfsError::ProcDestination(dest.into()));
        }
        Ok(())
    }

    fn mount_proc(&self) -> Result<()> {
        let flags = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_NODEV;
        self.mount_fs("/proc", "proc", flags, None).map(drop)
    }

    fn setup_dev(&self) -> Result<()> {
        if self.spec.privileged {
            // The host's device nodes, without its submounts (its /dev/pts is replaced below).
            self.bind(Path::new("/dev"), "/dev", false, false)?;
        } else {
            let flags = MsFlags::MS_NOSUID | MsFlags::MS_STRICTATIME;
            let dev = self.mount_fs("/dev", "tmpfs", flags, Some("mode=755,size=65536k"))?;
            for &(name, major, minor) in DEFAULT_DEVICES {
                let host = Path::new("/dev").join(name);
                let rdev = match stat(&host) {
                    Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFCHR => st.st_rdev,
                    _ => nix::sys::stat::makedev(major, minor),
                };
                let mode = Mode::from_bits_truncate(0o666);
                make_node(&dev, name, &host, SFlag::S_IFCHR, mode, rdev).step(|| format!("creating /dev/{name}"))?;
            }
            let mut links = DEV_SYMLINKS.to_vec();
            if Path::new("/proc/kcore").exists() {
                links.push(("/proc/kcore", "core"));
            }
            for (target, name) in links {
                match symlinkat(target, &dev, name) {
                    Ok(()) | Err(Errno::EEXIST) => {}
                    Err(e) => return Err(e).step(|| format!("creating the /dev/{name} symlink")),
                }
            }
        }
        self.mount_devpts()?;
        self.mount_shm()?;
        self.mount_mqueue()
    }

    /// Whether to mount at `dest` under /dev. In privileged mode /dev is the host's: mount
    /// over the directories it has, never create any.
    fn wants_dev_dir(&self, dest: &str) -> Result<bool> {
        if !self.spec.privileged {
            return Ok(true);
        }
        match self.open(dest) {
            Ok(_) => Ok(true),
            Err(Errno::ENOENT) => Ok(false),
            Err(e) => Err(e).step(|| format!("resolving {dest} in the rootfs")),
        }
    }

    fn mount_devpts(&self) -> Result<()> {
        if !self.wants_dev_dir("/dev/pts")? {
            return Ok(());
        }
        let flags = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC;
        let data = "newinstance,ptmxmode=0666,mode=0620";
        match self.mount_fs("/dev/pts", "devpts", flags, Some(&format!("{data},gid=5"))) {
            // gid 5 (tty) is not mapped in some user namespaces.
            Err(RootfsError::Sys {
                source: Errno::EINVAL, ..
            }) => self.mount_fs("/dev/pts", "devpts", flags, Some(data)).map(drop),
            other => other.map(drop),
        }
    }

    fn mount_shm(&self) -> Result<()> {
        if !self.wants_dev_dir("/dev/shm")? {
            return Ok(());
        }
        let hardening = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
        match &self.spec.shm {
            Some(host) => {
                let shm = self.bind(host, "/dev/shm", false, false)?;
                remount_bind(&shm, hardening).step(|| "remounting /dev/shm nosuid,nodev,noexec".into())
            }
            None => self
                .mount_fs("/dev/shm", "tmpfs", hardening, Some("mode=1777,size=65536k"))
                .map(drop),
        }
    }

    fn mount_mqueue(&self) -> Result<()> {
        if !self.wants_dev_dir("/dev/mqueue")? {
            return Ok(());
        }
        let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
        match self.mount_fs("/dev/mqueue", "mqueue", flags, None) {
            // An IPC namespace we do not own: show the host's queues, as rootless runc does.
            Err(RootfsError::Sys {
                source: Errno::EPERM, ..
            }) if Path::new("/dev/mqueue").is_dir() => {
                warn!("cannot mount mqueue, binding the host's /dev/mqueue");
                self.bind(Path::new("/dev/mqueue"), "/dev/mqueue", true, false)
                    .map(drop)
            }
            other => other.map(drop),
        }
    }

    fn mount_sys(&self) -> Result<()> {
        let ro = self.readonly_unless_privileged();
        let flags = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_NODEV | ro;
        match self.mount_fs("/sys", "sysfs", flags, None) {
            // sysfs belongs to the network namespace: one we do not own cannot be mounted.
            Err(RootfsError::Sys {
                source: Errno::EPERM, ..
            }) => {
                warn!("cannot mount sysfs, binding the host's /sys");
                let sys = self.bind(Path::new("/sys"), "/sys", true, false)?;
                if !ro.is_empty() {
                    set_recursive_readonly(&sys).map_err(|e| match e {
                        Errno::ENOSYS => RootfsError::NoRecursiveReadonly("/sys".into()),
                        source => RootfsError::Sys {
                            step: "making /sys read-only".into(),
                            source,
                        },
                    })?;
                }
                Ok(())
            }
            other => other.map(drop),
        }
    }

    fn mount_cgroups(&self) -> Result<()> {
        let ro = self.readonly_unless_privileged();
        let flags = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_NODEV;
        match cgroup_layout(&self.spec.cgroup_mounts)? {
            CgroupLayout::AsIs => Ok(()),
            CgroupLayout::Unified => self.mount_fs("/sys/fs/cgroup", "cgroup2", flags | ro, None).map(drop),
            CgroupLayout::Hierarchies(hierarchies) => {
                let dir = self.mount_fs("/sys/fs/cgroup", "tmpfs", flags, Some("mode=755"))?;
                for h in hierarchies {
                    let dest = format!("/sys/fs/cgroup/{}", h.name);
                    let data = Some(h.options.as_str()).filter(|o| !o.is_empty());
                    self.mount_fs(&dest, &h.fstype, flags | ro, data)?;
                    // Co-mounted controllers ("cpu,cpuacct") get a symlink per controller.
                    for part in h.name.split(',').filter(|p| *p != h.name) {
                        match symlinkat(h.name.as_str(), &dir, part) {
                            Ok(()) | Err(Errno::EEXIST) => {}
                            Err(e) => {
                                return Err(e).step(|| format!("creating the /sys/fs/cgroup/{part} symlink"));
                            }
                        }
                    }
                }
                if !ro.is_empty() {
                    remount_bind(&dir, MsFlags::MS_RDONLY).step(|| "remounting /sys/fs/cgroup read-only".into())?;
                }
                Ok(())
            }
        }
    }

    fn mount_user(&self, m: &MountSpec) -> Result<()> {
        let dest = m.destination.as_str();
        if !dest.starts_with('/') {
            return Err(RootfsError::RelativeDestination(dest.into()));
        }
        let mnt = match &m.kind {
            MountKind::Bind => {
                let mnt = if m.idmap {
                    self.bind_idmapped(&m.source, dest, m.recursive)?
                } else {
                    self.bind(&m.source, dest, m.recursive, true)?
                };
                if m.readonly {
                    remount_bind(&mnt, MsFlags::MS_RDONLY).step(|| format!("remounting {dest} read-only"))?;
                }
                mnt
            }
            MountKind::Tmpfs { size_bytes, mode } => {
                let fd = self.ensure(dest, Leaf::Dir)?;
                self.check_destination(dest, &fd)?;
                let mut data = Vec::new();
                if let Some(size) = size_bytes {
                    data.push(format!("size={size}"));
                }
                if let Some(mode) = mode {
                    data.push(format!("mode={mode:o}"));
                }
                let ro = if m.readonly {
                    MsFlags::MS_RDONLY
                } else {
                    MsFlags::empty()
                };
                let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | ro;
                let data = data.join(",");
                mount_str(Some("tmpfs"), &fd_path(&fd), Some("tmpfs"), flags, Some(&data))
                    .step(|| format!("mounting tmpfs on {dest}"))?;
                self.reopen_mounted(dest, &fd)?
            }
        };
        if m.recursive_readonly {
            set_recursive_readonly(&mnt).map_err(|e| match e {
                Errno::ENOSYS => RootfsError::NoRecursiveReadonly(dest.into()),
                source => RootfsError::Sys {
                    step: format!("making {dest} recursively read-only"),
                    source,
                },
            })?;
        }
        mount_path(None, &fd_path(&mnt), None, MsFlags::MS_REC | m.propagation.flag(), None)
            .step(|| format!("setting {dest} to {:?} propagation", m.propagation))
    }

    fn create_device(&self, device: &DeviceSpec) -> Result<()> {
        let dest = device.container_path.as_str();
        if !dest.starts_with('/') {
            return Err(RootfsError::RelativeDestination(dest.into()));
        }
        let (parent, name) = dest.trim_end_matches('/').rsplit_once('/').unwrap_or(("", ""));
        if matches!(name, "" | "." | "..") {
            return Err(RootfsError::RootDestination(dest.into()));
        }
        let st = match stat(&device.host_path) {
            Err(Errno::ENOENT) => return Err(RootfsError::MissingDevice(device.host_path.clone())),
            other => other.step(|| format!("inspecting device {}", device.host_path.display()))?,
        };
        let kind = SFlag::from_bits_truncate(st.st_mode & libc::S_IFMT);
        if kind != SFlag::S_IFCHR && kind != SFlag::S_IFBLK {
            return Err(RootfsError::NotADevice(device.host_path.clone()));
        }
        let dir = self.ensure(parent, Leaf::Dir)?;
        let how = OpenHow::new()
            .flags(OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS);
        if openat2(&dir, name, how).is_ok() {
            if self.spec.privileged {
                return Ok(()); // already there in the host's /dev
            }
            unlinkat(&dir, name, UnlinkatFlags::NoRemoveDir).step(|| format!("replacing {dest} with the device"))?;
        }
        let mode = Mode::from_bits_truncate(st.st_mode & 0o7777);
        make_node(&dir, name, &device.host_path, kind, mode, st.st_rdev).step(|| format!("creating device {dest}"))
    }

    fn mask_paths(&self) -> Result<()> {
        for path in &self.spec.masked_paths {
            let fd = match self.open(path) {
                Err(Errno::ENOENT) => continue,
                other => resolved(path, other)?,
            };
            let is_dir = fstat(&fd).step(|| format!("inspecting {path}"))?.st_mode & libc::S_IFMT == libc::S_IFDIR;
            let target = fd_path(&fd);
            if is_dir {
                let flags = MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
                mount_str(Some("tmpfs"), &target, Some("tmpfs"), flags, Some("mode=755"))
            } else {
                mount_path(Some(Path::new("/dev/null")), &target, None, MsFlags::MS_BIND, None)
            }
            .step(|| format!("masking {path}"))?;
        }
        Ok(())
    }

    fn readonly_paths(&self) -> Result<()> {
        for path in &self.spec.readonly_paths {
            let fd = match self.open(path) {
                Err(Errno::ENOENT) => continue,
                other => resolved(path, other)?,
            };
            let target = fd_path(&fd);
            mount_path(Some(&target), &target, None, MsFlags::MS_BIND | MsFlags::MS_REC, None)
                .step(|| format!("bind mounting {path} onto itself"))?;
            let mnt = self.reopen_mounted(path, &fd)?;
            remount_bind(&mnt, MsFlags::MS_RDONLY).step(|| format!("remounting {path} read-only"))?;
        }
        Ok(())
    }

    fn readonly_unless_privileged(&self) -> MsFlags {
        if self.spec.privileged {
            MsFlags::empty()
        } else {
            MsFlags::MS_RDONLY
        }
    }

    /// `pivot_root(".", ".")` stacks the old root on the new one; detaching it leaves the
    /// new root alone without needing a put_old directory inside it.
    fn pivot(self) -> Result<()> {
        let old_root = open(
            "/",
            OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .step(|| "opening the old root".into())?;
        fchdir(&self.root).step(|| "changing directory to the rootfs".into())?;
        pivot_root(".", ".").step(|| format!("pivot_root into {}", self.spec.target.display()))?;
        fchdir(&old_root).step(|| "changing directory to the old root".into())?;
        // Slave first, so that detaching the old root cannot propagate unmounts to the host.
        mount_path(None, Path::new("."), None, MsFlags::MS_SLAVE | MsFlags::MS_REC, None)
            .step(|| "making the old root a recursive slave".into())?;
        nix::mount::umount2(".", MntFlags::MNT_DETACH).step(|| "detaching the old root".into())?;
        chdir("/").step(|| "changing directory to /".into())
    }
}

enum CgroupLayout<'a> {
    /// Leave /sys/fs/cgroup as sysfs shows it.
    AsIs,
    /// A single cgroup2 mount at /sys/fs/cgroup.
    Unified,
    /// A tmpfs at /sys/fs/cgroup with one mount per hierarchy (v1 or hybrid).
    Hierarchies(&'a [CgroupMount]),
}

fn cgroup_layout(mounts: &[CgroupMount]) -> Result<CgroupLayout<'_>> {
    match mounts {
        [] => return Ok(CgroupLayout::AsIs),
        [only] if only.name.is_empty() && only.fstype == "cgroup2" => {
            return Ok(CgroupLayout::Unified);
        }
        _ => {}
    }
    for m in mounts {
        let invalid = |reason| RootfsError::InvalidCgroupMount {
            name: m.name.clone(),
            reason,
        };
        if m.fstype != "cgroup" && m.fstype != "cgroup2" {
            return Err(invalid("fstype must be cgroup or cgroup2"));
        }
        if m.name.is_empty() {
            return Err(invalid("only a single cgroup2 mount may have an empty name"));
        }
        if m.name.contains('/') || m.name == "." || m.name == ".." {
            return Err(invalid("name must be a single directory name"));
        }
    }
    Ok(CgroupLayout::Hierarchies(mounts))
}

/// Creates a device node like the host's, or bind mounts the host node where mknod is not
/// permitted (in a user namespace).
fn make_node(dir: &OwnedFd, name: &str, host: &Path, kind: SFlag, mode: Mode, rdev: libc::dev_t) -> nix::Result<()> {
    match mknodat(dir, name, kind, mode, rdev) {
        Err(Errno::EPERM) => {}
        other => return other,
    }
    debug!(host = %host.display(), "mknod not permitted, bind mounting the host node");
    let src = open(host, OFlag::O_PATH | OFlag::O_CLOEXEC, Mode::empty())?;
    let flags = OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    drop(openat(dir, name, flags, mode)?);
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS);
    let dest = openat2(dir, name, how)?;
    mount_path(Some(&fd_path(&src)), &fd_path(&dest), None, MsFlags::MS_BIND, None)
}

/// The components of a container path ("" and "." dropped, ".." kept).
fn components(path: &OsStr) -> impl DoubleEndedIterator<Item = OsString> + '_ {
    path.as_bytes()
        .split(|&b| b == b'/')
        .filter(|c| !c.is_empty() && *c != b".")
        .map(|c| OsString::from_vec(c.to_vec()))
}

/// Lexically normalized absolute path, ".." clamped at "/" (as RESOLVE_IN_ROOT does).
fn clean_path(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            part => parts.push(part),
        }
    }
    format!("/{}", parts.join("/"))
}

fn fd_path(fd: &impl AsRawFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

fn mount_path(
    source: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> nix::Result<()> {
    nix::mount::mount(source, target, fstype, flags, data)
}

fn mount_str(
    source: Option<&str>,
    target: &Path,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> nix::Result<()> {
    nix::mount::mount(source, target, fstype, flags, data)
}

/// Changes the per-mount flags of the bind mount (or mount root) `fd`, keeping nosuid,
/// nodev, noexec, atime and read-only as they are and adding `add`.
fn remount_bind(fd: &OwnedFd, add: MsFlags) -> nix::Result<()> {
    let current = fstatvfs(fd)?.flags();
    let mut flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | add;
    for (st, ms) in [
        (FsFlags::ST_RDONLY, MsFlags::MS_RDONLY),
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ] {
        if current.contains(st) {
            flags |= ms;
        }
    }
    mount_path(None, &fd_path(fd), None, flags, None)
}

/// Sets the umask to 0 for the duration of the setup (modes are given explicitly).
struct UmaskGuard(Mode);

impl UmaskGuard {
    fn zero() -> Self {
        UmaskGuard(nix::sys::stat::umask(Mode::empty()))
    }
}

impl Drop for UmaskGuard {
    fn drop(&mut self) {
        nix::sys::stat::umask(self.0);
    }
}

// The new mount API and statx, which nix does not wrap. Values from <linux/mount.h>.
const FSOPEN_CLOEXEC: libc::c_uint = 1;
const FSCONFIG_SET_STRING: libc::c_uint = 1;
const FSCONFIG_CMD_CREATE: libc::c_uint = 6;
const FSMOUNT_CLOEXEC: libc::c_uint = 1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 4;
const MOVE_MOUNT_T_EMPTY_PATH: libc::c_uint = 0x40;
const MOUNT_ATTR_RDONLY: u64 = 1;
const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;
const OPEN_TREE_CLONE: libc::c_uint = 1;
const OPEN_TREE_CLOEXEC: libc::c_uint = libc::O_CLOEXEC as libc::c_uint;

/// `struct mount_attr` (MOUNT_ATTR_SIZE_VER0).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// Makes the mount `fd` and every mount below it read-only.
fn set_recursive_readonly(fd: &OwnedFd) -> nix::Result<()> {
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_RDONLY,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: the path is a valid NUL-terminated string and `attr` is a live struct whose
    // size is passed along; the kernel only reads both.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            fd.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_RECURSIVE,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    Errno::result(rc).map(drop)
}

fn fsopen(fstype: &CStr) -> nix::Result<OwnedFd> {
    // SAFETY: `fstype` is NUL-terminated; the call returns a new descriptor or -1.
    let fd = Errno::result(unsafe { libc::syscall(libc::SYS_fsopen, fstype.as_ptr(), FSOPEN_CLOEXEC) })?;
    // SAFETY: fsopen returned a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

fn fsconfig_string(fs: &OwnedFd, key: &CStr, value: &CStr) -> nix::Result<()> {
    // SAFETY: both strings are NUL-terminated and outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fs.as_raw_fd(),
            FSCONFIG_SET_STRING,
            key.as_ptr(),
            value.as_ptr(),
            0,
        )
    };
    Errno::result(rc).map(drop)
}

fn fsconfig_create(fs: &OwnedFd) -> nix::Result<()> {
    // SAFETY: FSCONFIG_CMD_CREATE takes no key or value pointers.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fs.as_raw_fd(),
            FSCONFIG_CMD_CREATE,
            std::ptr::null::<libc::c_char>(),
            std::ptr::null::<libc::c_void>(),
            0,
        )
    };
    Errno::result(rc).map(drop)
}

fn fsmount(fs: &OwnedFd) -> nix::Result<OwnedFd> {
    // SAFETY: plain integer arguments; returns a new descriptor or -1.
    let fd = Errno::result(unsafe { libc::syscall(libc::SYS_fsmount, fs.as_raw_fd(), FSMOUNT_CLOEXEC, 0) })?;
    // SAFETY: fsmount returned a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

fn move_mount_to(mnt: &OwnedFd, target: &Path) -> nix::Result<()> {
    let target = CString::new(target.as_os_str().as_bytes()).map_err(|_| Errno::EINVAL)?;
    // SAFETY: both paths are NUL-terminated and outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            mnt.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            target.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    Errno::result(rc).map(drop)
}

/// Attaches the detached mount `mnt` onto the directory or file open as `target`.
fn move_mount_onto(mnt: &OwnedFd, target: &OwnedFd) -> nix::Result<()> {
    // SAFETY: both paths are empty NUL-terminated strings; the fds are open.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            mnt.as_raw_fd(),
            c"".as_ptr(),
            target.as_raw_fd(),
            c"".as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH,
        )
    };
    Errno::result(rc).map(drop)
}

/// The messages the kernel logged on a filesystem context, joined by "; ".
fn fs_log(fs: &OwnedFd) -> String {
    let mut messages = Vec::new();
    let mut buf = [0u8; 1024];
    while let Ok(n) = nix::unistd::read(fs, &mut buf) {
        if n == 0 {
            break;
        }
        messages.push(String::from_utf8_lossy(&buf[..n]).trim_end().to_string());
    }
    messages.join("; ")
}

fn statx(dirfd: libc::c_int, path: &CStr, flags: libc::c_int) -> nix::Result<libc::statx> {
    let mut buf = std::mem::MaybeUninit::<libc::statx>::uninit();
    let mask = libc::STATX_BASIC_STATS | libc::STATX_MNT_ID;
    // SAFETY: `path` is NUL-terminated and `buf` is valid for writes of a statx struct.
    let rc = unsafe { libc::statx(dirfd, path.as_ptr(), flags, mask, buf.as_mut_ptr()) };
    Errno::result(rc)?;
    // SAFETY: statx succeeded, so the kernel filled `buf`.
    Ok(unsafe { buf.assume_init() })
}

fn statx_fd(fd: &OwnedFd) -> nix::Result<libc::statx> {
    statx(fd.as_raw_fd(), c"", libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW)
}

#[cfg(test)]
mod tests {
    //! Unit tests for the pure parts, and scenarios that really assemble a rootfs. A
    //! scenario needs a single-threaded process with its own mount namespace, which the
    //! multi-threaded test harness is not: the test re-runs this binary with only
    //! `scenario_child` selected, which forks a child that unshares, sets up, pivots and
    //! checks from inside, printing one line per check. The mount namespace dies with the
    //! child; the test also verifies that no mount appeared under the fixture in its own.

    use super::*;
    use std::fs;
    use std::io::Write;
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt, symlink};
    use std::panic::AssertUnwindSafe;
    use std::process::Command;

    use nix::sched::{CloneFlags, unshare};
    use nix::sys::stat::makedev;
    use nix::sys::wait::{WaitStatus, waitpid};
    use nix::unistd::{ForkResult, fork, pipe};

    const SCENARIO_ENV: &str = "PODVISOR_ROOTFS_SCENARIO";
    const DIR_ENV: &str = "PODVISOR_ROOTFS_DIR";

    // ----- pure functions -----

    fn layered(lowers: &[&str], upper: &str, work: &str) -> RootfsSpec {
        RootfsSpec {
            lower_dirs: lowers.iter().map(PathBuf::from).collect(),
            upper_dir: upper.into(),
            work_dir: work.into(),
            target: "/run/c/rootfs".into(),
            ..Default::default()
        }
    }

    #[test]
    fn overlay_options_list_the_top_layer_first() {
        let lowers = ["/var/lib/pv/l/1", "/var/lib/pv/l/2", "/var/lib/pv/l/3"];
        let spec = layered(&lowers, "/var/lib/pv/c/upper", "/var/lib/pv/c/work");
        assert_eq!(
            overlay_options(&spec),
            "lowerdir=/var/lib/pv/l/3:/var/lib/pv/l/2:/var/lib/pv/l/1,\
             upperdir=/var/lib/pv/c/upper,workdir=/var/lib/pv/c/work"
        );
    }

    #[test]
    fn overlay_options_escape_separators() {
        let spec = layered(&["/l/a:b", "/l/c,d", "/l/e\\f"], "/u", "/w");
        let expected = r"lowerdir=/l/e\\f:/l/c\,d:/l/a\:b,upperdir=/u,workdir=/w";
        assert_eq!(overlay_options(&spec), expected);
        let readonly = layered(&["/l/1", "/l/2"], "", "");
        assert_eq!(overlay_options(&readonly), "lowerdir=/l/2:/l/1");
    }

    /// An "image" layer then `count` layers, all under `base`.
    fn many_layers(base: &Path, count: usize, name_len: usize) -> Vec<PathBuf> {
        let name = |i| format!("{i:02}-{}", "l".repeat(name_len));
        let layers = (0..count).map(|i| base.join(name(i)));
        std::iter::once(base.join("image")).chain(layers).collect()
    }

    const LONG_BASE: &str = concat!(
        "/var/lib/podvisor/",
        "a-deliberately-long-directory-name-so-that-absolute-layer-paths-are-long"
    );

    #[test]
    fn overlay_options_go_relative_when_too_long() {
        let base = Path::new(LONG_BASE);
        let mut spec = RootfsSpec {
            lower_dirs: many_layers(base, 60, 30),
            upper_dir: base.join("c/upper"),
            work_dir: PathBuf::from("/elsewhere/work"),
            ..Default::default()
        };
        assert!(render_overlay(&spec, None).len() > MAX_MOUNT_DATA);
        assert_eq!(overlay_data(&spec).base.as_deref(), Some(base));
        let options = overlay_options(&spec);
        assert!(options.len() <= MAX_MOUNT_DATA, "{} bytes", options.len());
        let layer = "l".repeat(30);
        assert!(options.starts_with(&format!("lowerdir=59-{layer}:58-{layer}:")));
        assert!(options.ends_with(":image,upperdir=c/upper,workdir=/elsewhere/work"));

        // Too long even relative: mount_rootfs uses fsconfig (each path < 256 bytes).
        spec.lower_dirs = many_layers(base, 60, 90);
        assert!(overlay_options(&spec).len() > MAX_MOUNT_DATA);
        let fits = |p: &PathBuf| p.as_os_str().len() <= MAX_FSCONFIG_STRING;
        assert!(spec.lower_dirs.iter().all(fits));
    }

    #[test]
    fn common_parent_of_paths() {
        let parent = |p: &[&str]| common_parent(&p.iter().map(PathBuf::from).collect::<Vec<_>>());
        assert_eq!(parent(&["/a/b/c", "/a/b/d"]), Path::new("/a/b"));
        assert_eq!(parent(&["/a/b/c", "/a/x"]), Path::new("/a"));
        assert_eq!(parent(&["/a/b", "/c/d"]), Path::new("/"));
        assert_eq!(parent(&["/a/b"]), Path::new("/a"));
        assert_eq!(parent(&[]), Path::new("/"));
        assert_eq!(relative_to(Path::new("/a/b"), Some(Path::new("/a/b"))), ".");
        assert_eq!(relative_to(Path::new("/x"), Some(Path::new("/a"))), "/x");
    }

    #[test]
    fn clean_path_clamps_at_root() {
        assert_eq!(clean_path("/proc/./cpuinfo"), "/proc/cpuinfo");
        assert_eq!(clean_path("/../../proc//cpuinfo"), "/proc/cpuinfo");
        assert_eq!(clean_path("/a/b/../../.."), "/");
        let parts: Vec<_> = components(OsStr::new("//a/./b/../c/")).collect();
        assert_eq!(parts, ["a", "b", "..", "c"]);
    }

    fn cgroup(fstype: &str, name: &str, options: &str) -> CgroupMount {
        let (fstype, name, options) = (fstype.into(), name.into(), options.into());
        CgroupMount { fstype, name, options }
    }

    #[test]
    fn cgroup_layouts() {
        assert!(matches!(cgroup_layout(&[]), Ok(CgroupLayout::AsIs)));
        let v2 = [cgroup("cgroup2", "", "")];
        assert!(matches!(cgroup_layout(&v2), Ok(CgroupLayout::Unified)));
        let hybrid = [
            cgroup("cgroup", "cpu,cpuacct", "cpu,cpuacct"),
            cgroup("cgroup", "systemd", "name=systemd"),
            cgroup("cgroup2", "unified", ""),
        ];
        let layout = cgroup_layout(&hybrid);
        assert!(matches!(layout, Ok(CgroupLayout::Hierarchies(h)) if h.len() == 3));
        for bad in [
            cgroup("cgroup", "", "memory"),
            cgroup("tmpfs", "memory", ""),
            cgroup("cgroup", "../etc", "memory"),
            cgroup("cgroup", "..", "memory"),
        ] {
            let layout = cgroup_layout(std::slice::from_ref(&bad));
            assert!(matches!(layout, Err(RootfsError::InvalidCgroupMount { .. })), "{bad:?}");
        }
    }

    #[test]
    fn default_paths() {
        let masked = default_masked_paths();
        for path in ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware"] {
            assert!(masked.iter().any(|p| p == path), "{path}");
        }
        let readonly = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"];
        assert_eq!(default_readonly_paths(), readonly);
    }

    #[test]
    fn error_messages_name_the_step_and_path() {
        let err = RootfsError::MissingSource("/srv/data".into());
        assert_eq!(err.to_string(), "bind mount source /srv/data does not exist");
        let err = Err::<(), _>(Errno::EPERM).step(|| "mounting proc on /proc".into());
        let err = err.unwrap_err();
        assert_eq!(err.to_string(), "mounting proc on /proc");
        let source = std::error::Error::source(&err).map(|s| s.to_string());
        assert_eq!(source.as_deref(), Some("EPERM: Operation not permitted"));
        let err = RootfsError::Escape("/../x".into());
        assert_eq!(err.to_string(), "destination /../x escapes the rootfs");
    }

    // ----- scenario plumbing -----

    /// One line per check on stdout; the scenario fails if any check did.
    #[derive(Default)]
    struct Checks {
        failures: usize,
    }

    impl Checks {
        fn check(&mut self, what: &str, ok: bool, detail: impl std::fmt::Debug) {
            if ok {
                println!("ok   {what}");
            } else {
                self.failures += 1;
                println!("FAIL {what}: {detail:?}");
            }
        }

        /// The top-most mount at `point` has `fstype` and every option (mount or
        /// superblock; "!x": not x).
        fn mount(&mut self, mounts: &[MountInfo], point: &str, fstype: &str, options: &[&str]) {
            let mount = mount_at(mounts, point);
            let ok = mount.is_some_and(|m| {
                let has = |o: &str| m.options.iter().chain(&m.super_options).any(|x| x == o);
                m.fstype == fstype
                    && options.iter().all(|o| match o.strip_prefix('!') {
                        Some(absent) => !has(absent),
                        None => has(o),
                    })
            });
            let what = format!("{point} is {fstype} {}", options.join(","));
            self.check(&what, ok, mount);
        }

        fn read_only(&mut self, path: &str) {
            let err = fs::write(path, "x").err().and_then(|e| e.raw_os_error());
            let what = format!("{path} refuses writes (EROFS)");
            self.check(&what, err == Some(libc::EROFS), err);
        }

        fn writable(&mut self, path: &str) {
            let result = fs::write(path, "x");
            self.check(&format!("{path} writable"), result.is_ok(), result);
        }

        fn content(&mut self, path: &str, expected: &str) {
            let content = fs::read_to_string(path);
            let ok = content.as_deref().ok() == Some(expected);
            self.check(&format!("{path} reads {expected:?}"), ok, content);
        }

        fn exists(&mut self, path: &str, expected: bool) {
            let what = format!("{path} {}", if expected { "exists" } else { "absent" });
            self.check(&what, Path::new(path).exists() == expected, "");
        }

        fn setup(&mut self, spec: &RootfsSpec) -> bool {
            let result = setup_rootfs(spec).map_err(|e| error_chain(&e));
            let ok = result.is_ok();
            self.check("setup_rootfs", ok, result);
            ok
        }
    }

    fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
        let mut message = err.to_string();
        let mut source = err.source();
        while let Some(inner) = source {
            message = format!("{message}: {inner}");
            source = inner.source();
        }
        message
    }

    type Scenario = fn(&Path, &mut Checks);

    const SCENARIOS: &[(&str, Scenario)] = &[
        ("standard", scenario_standard),
        ("readonly_rootfs", scenario_readonly_rootfs),
        ("privileged", scenario_privileged),
        ("binds", scenario_binds),
        ("propagation_shared_root", |d, t| {
            scenario_propagation(d, t, Propagation::Shared)
        }),
        ("propagation_slave_root", |d, t| {
            scenario_propagation(d, t, Propagation::Slave)
        }),
        ("errors", scenario_errors),
        ("many_layers_relative", |d, t| scenario_many_layers(d, t, 30)),
        ("many_layers_fsconfig", |d, t| scenario_many_layers(d, t, 90)),
        ("cgroup_v2", scenario_cgroup_v2),
        ("prebuilt_rootfs", scenario_prebuilt_rootfs),
        ("user_namespace", scenario_user_namespace),
    ];

    /// Entry point of the re-executed test binary; a no-op in a normal run.
    #[test]
    fn scenario_child() {
        let Ok(name) = std::env::var(SCENARIO_ENV) else {
            return;
        };
        let dir = PathBuf::from(std::env::var_os(DIR_ENV).expect("scenario dir"));
        let (_, scenario) = SCENARIOS
            .iter()
            .find(|(n, _)| *n == name)
            .unwrap_or_else(|| panic!("unknown scenario {name}"));
        let code = in_child(|| {
            let mut checks = Checks::default();
            scenario(&dir, &mut checks);
            println!("scenario {name} done, {} failed", checks.failures);
            checks.failures
        });
        assert_eq!(code, 0, "scenario {name} failed");
    }

    /// Runs `body` in a forked child with its own private mount namespace; its exit code.
    fn in_child(body: impl FnOnce() -> usize) -> i32 {
        // SAFETY: the harness's other threads are parked waiting for this test (scenarios
        // run with one test thread); the child only runs `body` and leaves with _exit.
        match unsafe { fork() }.expect("fork") {
            ForkResult::Child => {
                let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    unshare(CloneFlags::CLONE_NEWNS).expect("unshare(CLONE_NEWNS)");
                    let private = MsFlags::MS_REC | MsFlags::MS_PRIVATE;
                    mount_path(None, Path::new("/"), None, private, None).expect("rprivate /");
                    body()
                }));
                let _ = std::io::stdout().flush();
                let code = match result {
                    Ok(0) => 0,
                    Ok(_) => 1,
                    Err(_) => 101,
                };
                // SAFETY: ends the forked child without running the harness's exit path.
                unsafe { libc::_exit(code) }
            }
            ForkResult::Parent { child } => match waitpid(child, None).expect("waitpid") {
                WaitStatus::Exited(_, code) => code,
                other => panic!("child ended with {other:?}"),
            },
        }
    }

    /// Runs a scenario in a fresh process and returns its output, asserting that it passed
    /// and left this process's mount table as it was.
    fn run_scenario(name: &str, dir: &Path) -> String {
        let (_, child_test) = concat!(module_path!(), "::scenario_child")
            .split_once("::")
            .expect("module path");
        let before = fixture_mounts(dir);
        let out = Command::new(std::env::current_exe().expect("test binary"))
            .args(["--exact", child_test, "--nocapture", "--test-threads=1"])
            .env(SCENARIO_ENV, name)
            .env(DIR_ENV, dir)
            .output()
            .expect("running the scenario");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let passed = stdout.contains(&format!("scenario {name} done, 0 failed"));
        assert!(
            out.status.success() && passed,
            "scenario {name} failed\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
        );
        println!("{stdout}"); // shown with --nocapture
        let after = fixture_mounts(dir);
        assert_eq!(before, after, "scenario {name} leaked mounts into the test's namespace");
        stdout
    }

    /// This process's mountinfo lines under the fixture dir, where every mount a scenario
    /// makes lives (other tests of the crate may mount elsewhere concurrently).
    fn fixture_mounts(dir: &Path) -> Vec<String> {
        let text = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
        let dir = dir.to_string_lossy();
        text.lines().filter(|l| l.contains(&*dir)).map(String::from).collect()
    }

    /// A temp dir with an image layer (busybox, symlinks), a second layer, upper and work
    /// dirs, the target and bind sources. `None` (test skipped) when not root.
    fn fixture() -> Option<tempfile::TempDir> {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: assembling a rootfs needs root");
            return None;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        for sub in [
            "image/bin",
            "image/etc/secret",
            "layer2/etc",
            "upper",
            "work",
            "rootfs",
            "src-rw",
            "src-ro",
            "src-rro/sub",
            "pod-shm",
        ] {
            fs::create_dir_all(d.join(sub)).unwrap();
        }
        let image = d.join("image");
        fs::copy("/bin/busybox", image.join("bin/busybox")).expect("copying /bin/busybox");
        symlink("busybox", image.join("bin/sh")).unwrap();
        symlink("/etc", image.join("data")).unwrap();
        symlink("../../../../../etc", image.join("rel")).unwrap();
        let dangling = format!("/var/podvisor-dangling-{}", unique(d));
        symlink(dangling, image.join("dangling")).unwrap();
        for (file, content) in [
            ("image/etc/hostname", "image\n"),
            ("image/etc/secret/key", "secret"),
            ("layer2/etc/hostname", "layer2\n"),
            ("layer2/layer2-only", "2"),
            ("src-rw/rw-file", "rw"),
            ("src-ro/ro-file", "ro"),
            ("src-rro/top", "top"),
            ("src-file", "file content"),
        ] {
            fs::write(d.join(file), content).unwrap();
        }
        Some(dir)
    }

    /// A name part unique to this fixture, for paths that must not appear on the host.
    fn unique(dir: &Path) -> String {
        let name = dir.file_name().unwrap_or_default().to_string_lossy();
        name.trim_start_matches('.').to_string()
    }

    fn base_spec(dir: &Path) -> RootfsSpec {
        RootfsSpec {
            lower_dirs: vec![dir.join("image"), dir.join("layer2")],
            upper_dir: dir.join("upper"),
            work_dir: dir.join("work"),
            target: dir.join("rootfs"),
            masked_paths: default_masked_paths(),
            readonly_paths: default_readonly_paths(),
            ..Default::default()
        }
    }

    fn bind(source: PathBuf, destination: &str) -> MountSpec {
        MountSpec {
            destination: destination.into(),
            source,
            kind: MountKind::Bind,
            readonly: false,
            recursive_readonly: false,
            propagation: Propagation::Private,
            recursive: false,
            idmap: false,
        }
    }

    fn mount_tmpfs(path: &Path) {
        let tmpfs = Some(Path::new("tmpfs"));
        mount_path(tmpfs, path, Some("tmpfs"), MsFlags::empty(), None).expect("mounting a tmpfs");
    }

    #[derive(Debug)]
    struct MountInfo {
        mount_point: String,
        options: Vec<String>,
        /// Propagation: "shared:N", "master:N", ...
        optional: Vec<String>,
        fstype: String,
        super_options: Vec<String>,
    }

    /// Undoes mountinfo's octal escapes (`\040` for a space).
    fn unescape(field: &str) -> String {
        let bytes = field.as_bytes();
        let (mut out, mut i) = (Vec::new(), 0);
        while i < bytes.len() {
            let octal = bytes.get(i + 1..i + 4).and_then(|o| {
                let o = std::str::from_utf8(o).ok()?;
                u8::from_str_radix(o, 8).ok()
            });
            match (bytes[i], octal) {
                (b'\\', Some(byte)) => (out.push(byte), i += 4),
                (byte, _) => (out.push(byte), i += 1),
            };
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    fn mounts() -> Vec<MountInfo> {
        let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let split = |s: &str| s.split(',').map(String::from).collect();
        let parse = |line: &str| {
            let (left, right) = line.split_once(" - ")?;
            let left: Vec<&str> = left.split(' ').collect();
            let right: Vec<&str> = right.split(' ').collect();
            Some(MountInfo {
                mount_point: unescape(left.get(4)?),
                options: split(left.get(5)?),
                optional: left[6..].iter().map(|s| s.to_string()).collect(),
                fstype: right.first()?.to_string(),
                super_options: split(right.get(2)?),
            })
        };
        text.lines().filter_map(parse).collect()
    }

    /// The top-most mount at `point`.
    fn mount_at<'a>(mounts: &'a [MountInfo], point: &str) -> Option<&'a MountInfo> {
        mounts.iter().rev().find(|m| m.mount_point == point)
    }

    /// How this machine presents /sys/fs/cgroup, as `cgroup_mounts`.
    fn host_cgroup_mounts() -> Vec<CgroupMount> {
        let mut out = Vec::new();
        for m in mounts() {
            if m.mount_point == "/sys/fs/cgroup" && m.fstype == "cgroup2" {
                return vec![cgroup("cgroup2", "", "")];
            }
            let Some(name) = m.mount_point.strip_prefix("/sys/fs/cgroup/") else {
                continue;
            };
            let options = m.super_options.iter().filter(|o| *o != "rw" && *o != "ro");
            match m.fstype.as_str() {
                "cgroup" => {
                    let options = options.cloned().collect::<Vec<_>>().join(",");
                    out.push(cgroup("cgroup", name, &options));
                }
                "cgroup2" => out.push(cgroup("cgroup2", name, "")),
                _ => {}
            }
        }
        out
    }

    fn is_char_device(path: &str, major: u64, minor: u64) -> bool {
        fs::metadata(path).is_ok_and(|m| m.file_type().is_char_device() && m.rdev() == makedev(major, minor))
    }

    // ----- scenarios (run in the forked child) -----

    fn scenario_standard(dir: &Path, t: &mut Checks) {
        let mut spec = base_spec(dir);
        let host_cgroups = host_cgroup_mounts();
        spec.cgroup_mounts = host_cgroups.clone();
        spec.devices = vec![DeviceSpec {
            host_path: "/dev/full".into(),
            container_path: "/dev/extra/full2".into(),
            permissions: "rwm".into(),
        }];
        spec.masked_paths.extend(["/etc/secret".into(), "/no/such/path".into()]);
        if !t.setup(&spec) {
            return;
        }
        let cwd = std::env::current_dir();
        t.check("cwd is /", cwd.as_deref().ok() == Some(Path::new("/")), &cwd);
        t.content("/etc/hostname", "layer2\n");
        t.exists("/bin/busybox", true);
        t.exists("/layer2-only", true);
        t.exists(&dir.display().to_string(), false);
        t.writable("/written-inside");
        let out = Command::new("/bin/sh").args(["-c", "echo $((6 * 7))"]).output();
        let answer = out.as_ref().map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
        t.check("busybox sh runs", answer.as_deref().ok() == Some("42\n"), &out);

        let m = mounts();
        t.mount(&m, "/", "overlay", &["rw"]);
        t.mount(&m, "/proc", "proc", &["nosuid", "nodev", "noexec"]);
        t.check("/proc/self works", fs::read_link("/proc/self/exe").is_ok(), "");
        t.mount(&m, "/dev", "tmpfs", &["nosuid", "mode=755", "size=65536k"]);
        for &(name, major, minor) in DEFAULT_DEVICES {
            let path = format!("/dev/{name}");
            let mode = fs::metadata(&path).map(|m| m.permissions().mode() & 0o777);
            let ok = is_char_device(&path, major, minor) && mode.as_ref().is_ok_and(|m| *m == 0o666);
            t.check(&format!("{path} is char {major}:{minor} 0666"), ok, mode);
        }
        t.writable("/dev/null");
        t.content("/dev/null", "");
        let zeros = fs::File::open("/dev/zero").and_then(|f| {
            let mut buf = [1u8; 16];
            std::io::Read::read_exact(&mut &f, &mut buf).map(|_| buf)
        });
        let all_zero = zeros.as_ref().is_ok_and(|b| b.iter().all(|&x| x == 0));
        t.check("/dev/zero reads zeros", all_zero, &zeros);
        for (target, name) in DEV_SYMLINKS {
            let link = fs::read_link(format!("/dev/{name}"));
            let ok = link.as_deref().ok() == Some(Path::new(target));
            t.check(&format!("/dev/{name} -> {target}"), ok, &link);
        }
        let pts_options = ["nosuid", "noexec", "ptmxmode=666", "mode=620", "gid=5"];
        t.mount(&m, "/dev/pts", "devpts", &pts_options);
        let ptmx = fs::OpenOptions::new().read(true).write(true).open("/dev/ptmx");
        t.check("/dev/ptmx opens a pty", ptmx.is_ok(), &ptmx);
        let shm_options = ["nosuid", "nodev", "noexec", "size=65536k"];
        t.mount(&m, "/dev/shm", "tmpfs", &shm_options);
        t.writable("/dev/shm/x");
        t.mount(&m, "/dev/mqueue", "mqueue", &["nosuid", "nodev", "noexec"]);
        let extra = is_char_device("/dev/extra/full2", 1, 7);
        t.check("extra device /dev/extra/full2 is char 1:7", extra, "");

        t.mount(&m, "/sys", "sysfs", &["ro", "nosuid", "nodev", "noexec"]);
        let mkdir = fs::create_dir("/sys/podvisor").err().and_then(|e| e.raw_os_error());
        t.check("/sys refuses writes", mkdir == Some(libc::EROFS), mkdir);
        match host_cgroups.first() {
            Some(v2) if v2.name.is_empty() => t.mount(&m, "/sys/fs/cgroup", "cgroup2", &["ro"]),
            Some(_) => t.mount(&m, "/sys/fs/cgroup", "tmpfs", &["ro"]),
            None => {}
        }
        for h in host_cgroups.iter().filter(|h| !h.name.is_empty()) {
            t.mount(&m, &format!("/sys/fs/cgroup/{}", h.name), &h.fstype, &["ro"]);
        }

        // Masked files read as /dev/null (this kernel may lack kcore, sysrq, sched_debug).
        for path in ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/proc/interrupts"] {
            if Path::new(path).exists() {
                t.content(path, "");
            }
        }
        for dir in ["/sys/firmware", "/etc/secret"] {
            if Path::new(dir).exists() {
                t.mount(&m, dir, "tmpfs", &["ro"]);
                let empty = fs::read_dir(dir).is_ok_and(|mut d| d.next().is_none());
                t.check(&format!("masked {dir} is empty"), empty, "");
            }
        }
        t.read_only("/etc/secret/key");
        t.read_only("/proc/sys/kernel/domainname");
        for path in default_readonly_paths() {
            if Path::new(&path).exists() {
                t.mount(&m, &path, "proc", &["ro", "nosuid", "nodev", "noexec"]);
            }
        }
    }

    #[test]
    fn standard_container() {
        let Some(fx) = fixture() else { return };
        run_scenario("standard", fx.path());
        let written = fs::read_to_string(fx.path().join("upper/written-inside"));
        assert_eq!(written.ok().as_deref(), Some("x"), "the write landed in upper_dir");
        assert!(
            fx.path().join("upper/proc").is_dir(),
            "mount points are created in upper_dir"
        );
    }

    fn scenario_readonly_rootfs(dir: &Path, t: &mut Checks) {
        let mut spec = base_spec(dir);
        spec.readonly_rootfs = true;
        spec.mounts = vec![bind(dir.join("src-rw"), "/mnt/rw")];
        // The pod's shm tmpfs, made on the "host" side.
        let pod_shm = dir.join("pod-shm");
        mount_tmpfs(&pod_shm);
        fs::write(pod_shm.join("from-pod"), "pod").unwrap();
        spec.shm = Some(pod_shm);
        if !t.setup(&spec) {
            return;
        }
        let m = mounts();
        t.mount(&m, "/", "overlay", &["ro"]);
        t.read_only("/x");
        t.content("/etc/hostname", "layer2\n");
        t.writable("/mnt/rw/x");
        t.mount(&m, "/dev/shm", "tmpfs", &["rw", "nosuid", "nodev", "noexec"]);
        t.content("/dev/shm/from-pod", "pod");
        t.writable("/dev/shm/from-container");
    }

    #[test]
    fn readonly_rootfs_and_pod_shm() {
        let Some(fx) = fixture() else { return };
        run_scenario("readonly_rootfs", fx.path());
        assert!(!fx.path().join("upper/x").exists());
    }

    fn scenario_privileged(dir: &Path, t: &mut Checks) {
        let mut spec = base_spec(dir);
        spec.privileged = true;
        spec.cgroup_mounts = host_cgroup_mounts();
        // Some host devices outside the default set, to look for inside.
        let is_extra = |e: &fs::DirEntry| {
            let name = e.file_name().to_string_lossy().into_owned();
            let char_dev = e.file_type().is_ok_and(|t| t.is_char_device());
            (char_dev && DEFAULT_DEVICES.iter().all(|(d, ..)| *d != name)).then_some(name)
        };
        let host_only: Vec<String> = fs::read_dir("/dev")
            .map(|d| d.flatten().filter_map(|e| is_extra(&e)).take(5).collect())
            .unwrap_or_default();
        if !t.setup(&spec) {
            return;
        }
        let m = mounts();
        t.mount(&m, "/sys", "sysfs", &["!ro"]);
        t.check("/proc/kcore not masked", mount_at(&m, "/proc/kcore").is_none(), "");
        t.check("/proc/sys not read-only", mount_at(&m, "/proc/sys").is_none(), "");
        for name in &host_only {
            t.exists(&format!("/dev/{name}"), true);
        }
        t.mount(&m, "/dev/pts", "devpts", &["ptmxmode=666"]);
        t.mount(&m, "/dev/shm", "tmpfs", &["size=65536k"]);
        for cg in m.iter().filter(|c| c.mount_point.starts_with("/sys/fs/cgroup")) {
            t.check(
                &format!("{} read-write", cg.mount_point),
                !cg.options.contains(&"ro".into()),
                cg,
            );
        }
    }

    #[test]
    fn privileged_container() {
        let Some(fx) = fixture() else { return };
        run_scenario("privileged", fx.path());
    }

    fn scenario_binds(dir: &Path, t: &mut Checks) {
        let u = unique(dir);
        // A submount under a bind source, made on the "host" side.
        let sub = dir.join("src-rro/sub");
        mount_tmpfs(&sub);
        fs::write(sub.join("inner-file"), "inner").unwrap();

        let src = |name: &str| dir.join(name);
        let tmpfs = MountKind::Tmpfs {
            size_bytes: Some(1 << 20),
            mode: Some(0o750),
        };
        let mut spec = base_spec(dir);
        spec.mounts = vec![
            bind(src("src-rw"), "/mnt/rw"),
            MountSpec {
                readonly: true,
                ..bind(src("src-ro"), "/mnt/ro")
            },
            MountSpec {
                readonly: true,
                ..bind(src("src-file"), "/etc/app.conf")
            },
            MountSpec {
                readonly: true,
                recursive: true,
                recursive_readonly: true,
                ..bind(src("src-rro"), "/mnt/rro")
            },
            MountSpec {
                readonly: true,
                recursive: true,
                ..bind(src("src-rro"), "/mnt/rec")
            },
            bind(src("src-rro"), "/mnt/nonrec"),
            bind(src("src-rw"), &format!("/data/podvisor-escape-{u}")),
            bind(src("src-rw"), &format!("/rel/podvisor-rel-{u}")),
            bind(src("src-rw"), "/dangling/x"),
            bind(src("src-rw"), &format!("/../../../../podvisor-dotdot-{u}/x")),
            MountSpec {
                kind: tmpfs,
                ..bind(PathBuf::new(), "/scratch")
            },
        ];
        if !t.setup(&spec) {
            return;
        }
        t.writable("/mnt/rw/new");
        t.content("/mnt/ro/ro-file", "ro");
        t.read_only("/mnt/ro/new");
        t.content("/etc/app.conf", "file content");
        t.read_only("/etc/app.conf");
        t.content("/mnt/rro/sub/inner-file", "inner");
        t.read_only("/mnt/rro/x");
        t.read_only("/mnt/rro/sub/x");
        t.read_only("/mnt/rec/x");
        t.writable("/mnt/rec/sub/x"); // readonly without recursive_readonly: top only
        t.exists("/mnt/nonrec/sub/inner-file", false);
        t.exists(&format!("/etc/podvisor-escape-{u}/rw-file"), true);
        t.exists(&format!("/etc/podvisor-rel-{u}/rw-file"), true);
        t.exists(&format!("/var/podvisor-dangling-{u}/x/rw-file"), true);
        t.exists(&format!("/podvisor-dotdot-{u}/x/rw-file"), true);
        let m = mounts();
        let scratch = ["nosuid", "nodev", "size=1024k", "mode=750"];
        t.mount(&m, "/scratch", "tmpfs", &scratch);
        let rw = mount_at(&m, "/mnt/rw");
        let private = rw.is_some_and(|r| r.optional.is_empty());
        t.check("private bind has no propagation", private, rw);
    }

    #[test]
    fn bind_mounts_and_symlink_escapes() {
        let Some(fx) = fixture() else { return };
        let (d, u) = (fx.path(), unique(fx.path()));
        run_scenario("binds", d);
        assert!(d.join("src-rw/new").exists(), "the write reached the rw bind's source");
        assert!(
            d.join("upper/etc/app.conf").is_file(),
            "file bind destination is a file"
        );
        // `data -> /etc`, `rel -> ../../../../../etc`, a dangling absolute symlink and
        // "/../../.." all resolved inside the rootfs (so in upper_dir), never on the host.
        for (inside, host) in [
            (format!("etc/podvisor-escape-{u}"), format!("/etc/podvisor-escape-{u}")),
            (format!("etc/podvisor-rel-{u}"), format!("/etc/podvisor-rel-{u}")),
            (
                format!("var/podvisor-dangling-{u}/x"),
                format!("/var/podvisor-dangling-{u}"),
            ),
            (format!("podvisor-dotdot-{u}/x"), format!("/podvisor-dotdot-{u}")),
        ] {
            assert!(d.join("upper").join(&inside).is_dir(), "{inside} not in upper_dir");
            assert!(!Path::new(&host).exists(), "{host} was created on the host");
        }
    }

    /// Shared tmpfs sources in this ("host") namespace, bound into a container set up in
    /// a child namespace with Slave, Shared and Private propagation; mounts made on either
    /// side after the binds must travel only as the propagation says.
    fn scenario_propagation(dir: &Path, t: &mut Checks, root: Propagation) {
        let make_shared = |path: &Path| {
            mount_path(None, path, None, MsFlags::MS_SHARED, None).expect("make-shared");
        };
        let kinds = if root == Propagation::Shared {
            vec![("slave", Propagation::Slave), ("shared", Propagation::Shared)]
        } else {
            // The fixture dir as a shared mount: it holds the target, and "plain" is a
            // plain directory on it (like a volume dir on a host's shared root filesystem).
            let bind_self = MsFlags::MS_BIND | MsFlags::MS_REC;
            mount_path(Some(dir), dir, None, bind_self, None).expect("bind");
            make_shared(dir);
            fs::create_dir(dir.join("prop-plain")).unwrap();
            vec![("slave", Propagation::Slave), ("plain", Propagation::Slave)]
        };
        let kinds = [kinds, vec![("private", Propagation::Private)]].concat();
        for (name, _) in kinds.iter().filter(|(name, _)| *name != "plain") {
            let src = dir.join(format!("prop-{name}"));
            fs::create_dir(&src).unwrap();
            mount_tmpfs(&src);
            make_shared(&src);
        }
        let (to_host_r, to_host_w) = pipe().unwrap();
        let (to_ctr_r, to_ctr_w) = pipe().unwrap();
        let signal = |fd: &OwnedFd| nix::unistd::write(fd, b"x").expect("signal");
        let wait = |fd: &OwnedFd| nix::unistd::read(fd, &mut [0u8]).expect("wait");

        let container = || {
            let mut c = Checks::default();
            let mut spec = base_spec(dir);
            spec.root_propagation = root.clone();
            let mount = |(name, propagation): &(&str, Propagation)| MountSpec {
                propagation: propagation.clone(),
                ..bind(dir.join(format!("prop-{name}")), &format!("/vol/{name}"))
            };
            spec.mounts = kinds.iter().map(mount).collect();
            if !c.setup(&spec) {
                signal(&to_host_w);
                return 1;
            }
            let m = mounts();
            let propagation = |name: &str| {
                let mount = mount_at(&m, &format!("/vol/{name}"));
                let fields = mount.map(|m| m.optional.iter().map(|o| o.split(':').next()));
                fields.map(|f| f.flatten().collect::<Vec<_>>().join(","))
            };
            let expected = [
                ("slave", "master"),
                ("plain", "master"),
                ("shared", "shared"),
                ("private", ""),
            ];
            for (name, want) in expected.into_iter().filter(|(n, _)| kinds.iter().any(|k| k.0 == *n)) {
                let got = propagation(name);
                c.check(
                    &format!("/vol/{name} propagation {want:?}"),
                    got.as_deref() == Some(want),
                    got,
                );
            }
            signal(&to_host_w); // bound: host, mount now
            wait(&to_ctr_r);
            for (name, propagation) in &kinds {
                let reaches = *propagation != Propagation::Private;
                c.exists(&format!("/vol/{name}/sub/marker"), reaches);
                let inner = PathBuf::from(format!("/vol/{name}/inner"));
                fs::create_dir(&inner).unwrap();
                mount_tmpfs(&inner);
                fs::write(inner.join("marker"), "ctr").unwrap();
            }
            signal(&to_host_w); // mounted inside: host, look
            wait(&to_ctr_r);
            c.failures
        };
        // SAFETY: this process is single-threaded (a forked scenario child).
        let child = match unsafe { fork() }.expect("fork") {
            ForkResult::Child => {
                let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    unshare(CloneFlags::CLONE_NEWNS).expect("unshare");
                    container()
                }));
                let _ = std::io::stdout().flush();
                // SAFETY: ends the forked child without running exit handlers.
                unsafe { libc::_exit(if matches!(result, Ok(0)) { 0 } else { 1 }) }
            }
            ForkResult::Parent { child } => child,
        };
        wait(&to_host_r);
        for (name, _) in &kinds {
            let sub = dir.join(format!("prop-{name}/sub"));
            fs::create_dir(&sub).unwrap();
            mount_tmpfs(&sub);
            fs::write(sub.join("marker"), "host").unwrap();
        }
        signal(&to_ctr_w);
        wait(&to_host_r);
        for (name, propagation) in &kinds {
            let back = *propagation == Propagation::Shared;
            let marker = dir.join(format!("prop-{name}/inner/marker"));
            let what = format!("container mount under /vol/{name} reaches the host: {back}");
            t.check(&what, marker.exists() == back, "");
        }
        signal(&to_ctr_w);
        let status = waitpid(child, None);
        let passed = matches!(status, Ok(WaitStatus::Exited(_, 0)));
        t.check("container checks passed", passed, status);
    }

    #[test]
    fn propagation_with_shared_root() {
        let Some(fx) = fixture() else { return };
        run_scenario("propagation_shared_root", fx.path());
    }

    #[test]
    fn propagation_with_slave_root() {
        let Some(fx) = fixture() else { return };
        run_scenario("propagation_slave_root", fx.path());
    }

    type ErrorCase = (&'static str, RootfsSpec, fn(&RootfsError) -> bool);

    /// Each failing setup runs in its own child, as the runtime discards such a child.
    fn scenario_errors(dir: &Path, t: &mut Checks) {
        let with_mount = |destination: &str, source: &str| RootfsSpec {
            mounts: vec![bind(dir.join(source), destination)],
            ..base_spec(dir)
        };
        let with_device = |host: &str| RootfsSpec {
            devices: vec![DeviceSpec {
                host_path: host.into(),
                container_path: "/dev/bogus".into(),
                permissions: "rwm".into(),
            }],
            ..base_spec(dir)
        };
        let cases: Vec<ErrorCase> = vec![
            (
                "missing bind source",
                with_mount("/mnt/x", "no-such-source"),
                |e| matches!(e, RootfsError::MissingSource(p) if p.ends_with("no-such-source")),
            ),
            ("relative destination", with_mount("mnt/x", "src-rw"), |e| {
                matches!(e, RootfsError::RelativeDestination(_))
            }),
            ("destination is the root", with_mount("/..", "src-rw"), |e| {
                matches!(e, RootfsError::RootDestination(_))
            }),
            (
                "destination inside /proc",
                with_mount("/proc/sys/kernel", "src-rw"),
                |e| matches!(e, RootfsError::ProcDestination(_)),
            ),
            ("device that is not a device", with_device("/etc/hostname"), |e| {
                matches!(e, RootfsError::NotADevice(_))
            }),
            ("missing device", with_device("/dev/podvisor-no-such-device"), |e| {
                matches!(e, RootfsError::MissingDevice(_))
            }),
        ];
        for (what, spec, expected) in cases {
            let code = in_child(|| match setup_rootfs(&spec) {
                Err(e) if expected(&e) => {
                    println!("     {what}: {}", error_chain(&e));
                    0
                }
                other => {
                    println!("     {what}: unexpected {other:?}");
                    1
                }
            });
            t.check(what, code == 0, code);
        }
    }

    #[test]
    fn setup_errors() {
        let Some(fx) = fixture() else { return };
        let out = run_scenario("errors", fx.path());
        let missing = fx.path().join("no-such-source");
        let message = format!("bind mount source {} does not exist", missing.display());
        assert!(out.contains(&message), "{out}");
    }

    fn scenario_many_layers(dir: &Path, t: &mut Checks, name_len: usize) {
        let mut spec = base_spec(dir);
        spec.lower_dirs = many_layers(&dir.join(&LONG_BASE[1..]), 60, name_len);
        let options = overlay_options(&spec);
        let how = if options.len() <= MAX_MOUNT_DATA {
            "relative"
        } else {
            "fsconfig"
        };
        println!(
            "     {} lower dirs, {} bytes of options: {how}",
            spec.lower_dirs.len(),
            options.len()
        );
        if !t.setup(&spec) {
            return;
        }
        t.content("/top", "59");
        let all = (0..60).all(|i| Path::new(&format!("/layer-{i:02}")).exists());
        t.check("every layer visible", all, "");
        t.exists("/bin/busybox", true);
        t.writable("/written-inside");
    }

    fn build_many_layers(dir: &Path, name_len: usize) {
        let layers = many_layers(&dir.join(&LONG_BASE[1..]), 60, name_len);
        fs::create_dir_all(layers[0].join("bin")).unwrap();
        fs::copy(dir.join("image/bin/busybox"), layers[0].join("bin/busybox")).unwrap();
        for (i, layer) in layers[1..].iter().enumerate() {
            fs::create_dir_all(layer).unwrap();
            fs::write(layer.join("top"), i.to_string()).unwrap();
            fs::write(layer.join(format!("layer-{i:02}")), "").unwrap();
        }
    }

    #[test]
    fn sixty_layers_with_relative_options() {
        let Some(fx) = fixture() else { return };
        build_many_layers(fx.path(), 30);
        let out = run_scenario("many_layers_relative", fx.path());
        assert!(out.contains(": relative"), "{out}");
        assert!(fx.path().join("upper/written-inside").exists());
    }

    #[test]
    fn sixty_layers_with_fsconfig() {
        let Some(fx) = fixture() else { return };
        build_many_layers(fx.path(), 90);
        let out = run_scenario("many_layers_fsconfig", fx.path());
        assert!(out.contains(": fsconfig"), "{out}");
        assert!(fx.path().join("upper/written-inside").exists());
    }

    fn scenario_cgroup_v2(dir: &Path, t: &mut Checks) {
        let mut spec = base_spec(dir);
        spec.cgroup_mounts = vec![cgroup("cgroup2", "", "")];
        if !t.setup(&spec) {
            return;
        }
        t.mount(
            &mounts(),
            "/sys/fs/cgroup",
            "cgroup2",
            &["ro", "nosuid", "nodev", "noexec"],
        );
        t.exists("/sys/fs/cgroup/cgroup.controllers", true);
    }

    #[test]
    fn cgroup_v2_layout() {
        let Some(fx) = fixture() else { return };
        run_scenario("cgroup_v2", fx.path());
    }

    fn scenario_prebuilt_rootfs(dir: &Path, t: &mut Checks) {
        let spec = RootfsSpec {
            lower_dirs: Vec::new(),
            target: dir.join("image"),
            ..base_spec(dir)
        };
        if !t.setup(&spec) {
            return;
        }
        let m = mounts();
        let root = mount_at(&m, "/");
        t.check(
            "/ is a bind of the target",
            root.is_some_and(|r| r.fstype != "overlay"),
            root,
        );
        t.content("/etc/hostname", "image\n");
        t.mount(&m, "/proc", "proc", &[]);
    }

    #[test]
    fn prebuilt_rootfs_without_layers() {
        let Some(fx) = fixture() else { return };
        run_scenario("prebuilt_rootfs", fx.path());
    }

    /// A user namespace mapping only root, in the host's network namespace: mknod is not
    /// permitted (device nodes become bind mounts of the host's), sysfs cannot be mounted
    /// (a read-only rbind of the host's /sys instead) and gid 5 is unmapped (devpts
    /// without gid=5).
    fn scenario_user_namespace(dir: &Path, t: &mut Checks) {
        let flags =
            CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWPID | CloneFlags::CLONE_NEWIPC;
        unshare(flags).expect("unshare");
        fs::write("/proc/self/uid_map", "0 0 1").expect("uid_map");
        fs::write("/proc/self/setgroups", "deny").expect("setgroups");
        fs::write("/proc/self/gid_map", "0 0 1").expect("gid_map");
        // The first child is pid 1 of the new pid namespace, which mounting proc needs.
        let code = in_child(|| {
            let mut c = Checks::default();
            let spec = RootfsSpec {
                lower_dirs: Vec::new(),
                target: dir.join("image"),
                ..base_spec(dir)
            };
            if !c.setup(&spec) {
                return 1;
            }
            let m = mounts();
            let bound = is_char_device("/dev/null", 1, 3) && mount_at(&m, "/dev/null").is_some();
            c.check("/dev/null is the host node, bind mounted", bound, "");
            c.writable("/dev/null");
            c.mount(&m, "/sys", "sysfs", &["ro"]);
            let under_sys = |n: &&MountInfo| n.mount_point.starts_with("/sys/") && n.fstype != "tmpfs";
            let nested: Vec<_> = m.iter().filter(under_sys).collect();
            let all_ro = nested.iter().all(|n| n.options.contains(&"ro".into()));
            c.check(
                "/sys is a read-only recursive bind",
                !nested.is_empty() && all_ro,
                &nested,
            );
            c.mount(&m, "/dev/pts", "devpts", &["!gid=5", "ptmxmode=666"]);
            c.content("/proc/keys", "");
            c.failures
        });
        t.check("checks inside the user namespace", code == 0, code);
    }

    #[test]
    fn user_namespace_fallbacks() {
        let Some(fx) = fixture() else { return };
        run_scenario("user_namespace", fx.path());
    }
}
