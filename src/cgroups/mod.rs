//! cgroup hierarchy detection (and, with the container backend, management).

use std::path::Path;

/// How the host mounts its cgroup controllers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// Only cgroup v1 hierarchies.
    V1,
    /// v1 controller hierarchies plus a cgroup2 mount at `unified/`.
    Hybrid,
    /// One cgroup2 hierarchy.
    V2,
}

pub fn detect_layout(mount_root: &Path) -> Layout {
    if is_cgroup2(mount_root) {
        Layout::V2
    } else if is_cgroup2(&mount_root.join("unified")) {
        Layout::Hybrid
    } else {
        Layout::V1
    }
}

fn is_cgroup2(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .is_ok_and(|fs| fs.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_directory_is_not_cgroup2() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(detect_layout(dir.path()), Layout::V1);
    }
}
