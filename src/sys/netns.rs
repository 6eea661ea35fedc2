//! The node's network namespace.
//!
//! A daemon normally serves the network namespace it runs in. One serving an
//! extra node of `podvisor up --nodes` keeps its process in the host's
//! namespace (image pulls and the API server are on the host's loopback) and
//! puts the node's own network in a named namespace: the pod bridge, NAT and
//! hostPorts, CNI plugins, the node agent's listener and the service proxy.
//! Those places ask [`node`] and enter it; sockets and netlink connections
//! keep the namespace they were made in, whatever thread uses them later.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use nix::sched::CloneFlags;

static NODE_NETNS: OnceLock<PathBuf> = OnceLock::new();

/// Where named namespaces live (as `ip netns` keeps them).
pub const NAMED_DIR: &str = "/run/netns";
const NSFS_MAGIC: i64 = 0x6e73_6673;

/// Makes `path` this process's node network namespace (once; later calls must agree).
pub fn set_node(path: PathBuf) -> io::Result<()> {
    File::open(&path)?;
    let set = NODE_NETNS.get_or_init(|| path.clone());
    if *set != path {
        return Err(io::Error::other(format!(
            "the node network namespace is already {}",
            set.display()
        )));
    }
    Ok(())
}

/// The node's network namespace, if it is not the process's own.
pub fn node() -> Option<&'static Path> {
    NODE_NETNS.get().map(PathBuf::as_path)
}

fn open_node() -> io::Result<Option<OwnedFd>> {
    node()
        .map(|path| File::open(path).map(OwnedFd::from))
        .transpose()
        .map_err(|e| io::Error::new(e.kind(), format!("opening the node network namespace: {e}")))
}

/// Runs `work` on a thread inside the node's network namespace (here, without one).
pub fn run_in_node<T: Send>(work: impl FnOnce() -> io::Result<T> + Send) -> io::Result<T> {
    let Some(ns) = open_node()? else {
        return work();
    };
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                nix::sched::setns(&ns, CloneFlags::CLONE_NEWNET)?;
                work()
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("a thread in the node network namespace panicked")))
    })
}

/// Has the command's child enter the node's network namespace before it runs.
pub fn enter_node(command: &mut tokio::process::Command) -> io::Result<()> {
    let Some(ns) = open_node()? else {
        return Ok(());
    };
    // SAFETY: setns is async-signal-safe and the closure allocates nothing.
    unsafe {
        command.pre_exec(move || {
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

/// A TCP listener bound in the node's network namespace.
pub async fn bind_tcp(addr: std::net::SocketAddr) -> io::Result<tokio::net::TcpListener> {
    if node().is_none() {
        return tokio::net::TcpListener::bind(addr).await;
    }
    let listener = tokio::task::spawn_blocking(move || {
        run_in_node(|| {
            let listener = std::net::TcpListener::bind(addr)?;
            listener.set_nonblocking(true)?;
            Ok(listener)
        })
    })
    .await
    .map_err(io::Error::other)??;
    tokio::net::TcpListener::from_std(listener)
}

/// The path of the named namespace `name`.
pub fn named_path(name: &str) -> PathBuf {
    Path::new(NAMED_DIR).join(name)
}

fn is_nsfs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type().0 == NSFS_MAGIC)
}

/// The named network namespace `name`, made (and pinned by a bind mount) if missing.
pub fn ensure_named(name: &str) -> io::Result<PathBuf> {
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad network namespace name {name:?}"),
        ));
    }
    let path = named_path(name);
    if is_nsfs(&path) {
        return Ok(path);
    }
    std::fs::create_dir_all(NAMED_DIR)?;
    File::create(&path)?;
    let target = path.clone();
    let made = std::thread::spawn(move || -> io::Result<()> {
        nix::sched::unshare(CloneFlags::CLONE_NEWNET)?;
        nix::mount::mount(
            Some("/proc/thread-self/ns/net"),
            &target,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )?;
        Ok(())
    })
    .join()
    .unwrap_or_else(|_| Err(io::Error::other("the namespace thread panicked")));
    if let Err(err) = made {
        let _ = std::fs::remove_file(&path);
        return Err(io::Error::new(
            err.kind(),
            format!("making network namespace {name}: {err}"),
        ));
    }
    Ok(path)
}

/// Unpins and removes the named namespace `name` (gone once nothing is in it).
pub fn remove_named(name: &str) -> io::Result<()> {
    let path = named_path(name);
    if is_nsfs(&path) {
        nix::mount::umount2(&path, nix::mount::MntFlags::MNT_DETACH)?;
    }
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_namespaces_are_made_once_and_removed() {
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let name = format!("podvisor-test-{}", std::process::id());
        let path = ensure_named(&name).unwrap();
        assert!(is_nsfs(&path));
        let inode = std::fs::metadata("/proc/self/ns/net").map(|m| std::os::unix::fs::MetadataExt::ino(&m));
        let pinned = nix::sys::stat::stat(&path).unwrap().st_ino;
        assert_ne!(Some(pinned), inode.ok(), "a new namespace, not ours");
        assert_eq!(ensure_named(&name).unwrap(), path);
        assert_eq!(nix::sys::stat::stat(&path).unwrap().st_ino, pinned, "made once");
        remove_named(&name).unwrap();
        assert!(!path.exists());
        remove_named(&name).unwrap();
        assert!(ensure_named("../x").is_err());
    }
}
