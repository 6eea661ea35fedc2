//! Containers, daemon side: turning a CRI container request into the
//! monitor's `InitConfig` (rootfs, mounts, identity, capabilities, seccomp,
//! cgroup), starting the monitor, stopping, removing, and exec.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::LinuxError;
use super::monitor::{InitConfig, PidNamespace};
use super::process::{CapabilitySets, ProcessConfig};
use super::rootfs::{DeviceSpec, MountKind, MountSpec, Propagation, RootfsSpec};
use super::sandbox::SandboxRuntime;
use super::users;
use crate::image::{ImageConfig, ImageRecord};
use crate::spec::{ContainerSpec, MountPropagation, NamespaceMode, SandboxSpec, SeccompProfile};

/// The capabilities a container gets unless it asks otherwise (the set
/// Docker and containerd give).
pub const DEFAULT_CAPABILITIES: [&str; 14] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// Devices every container may use: creating any node (mknod), and reading or
/// writing null, zero, full, random, urandom, tty, ptmx and its pseudo-terminals.
const DEFAULT_DEVICE_RULES: [&str; 10] = [
    "c *:* m",
    "b *:* m",
    "c 1:3 rwm",
    "c 1:5 rwm",
    "c 1:7 rwm",
    "c 1:8 rwm",
    "c 1:9 rwm",
    "c 5:0 rwm",
    "c 5:2 rwm",
    "c 136:* rwm",
];

/// Device cgroup rules: the defaults plus the container's own devices.
pub fn device_rules(devices: &[DeviceSpec]) -> Vec<String> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let mut rules: Vec<String> = DEFAULT_DEVICE_RULES.iter().map(|r| r.to_string()).collect();
    for device in devices {
        let Ok(meta) = std::fs::metadata(&device.host_path) else {
            continue;
        };
        let kind = if meta.file_type().is_block_device() { 'b' } else { 'c' };
        let rdev = meta.rdev();
        let access: String = device.permissions.chars().filter(|c| "rwm".contains(*c)).collect();
        let access = if access.is_empty() { "rwm".to_string() } else { access };
        rules.push(format!(
            "{kind} {}:{} {access}",
            nix::sys::stat::major(rdev),
            nix::sys::stat::minor(rdev)
        ));
    }
    rules
}

const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What the backend keeps about a container (stored in its record).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerRuntime {
    /// Runtime files: config.json, exit.json, the rootfs mount point.
    pub bundle: PathBuf,
    /// The writable layer: upper/ and work/.
    pub rw_dir: PathBuf,
    pub cgroup_path: String,
    pub log_path: PathBuf,
    pub uid: u32,
    pub gid: u32,
    /// Every group the process is in, the primary one included.
    #[serde(default)]
    pub groups: Vec<u32>,
}

/// Everything a container is made from.
pub struct ContainerPlan<'a> {
    pub id: &'a str,
    pub spec: &'a ContainerSpec,
    pub sandbox: &'a SandboxSpec,
    pub sandbox_runtime: &'a SandboxRuntime,
    pub image: &'a ImageRecord,
    pub layer_dirs: Vec<PathBuf>,
    pub bundle: PathBuf,
    pub rw_dir: PathBuf,
    pub log_path: PathBuf,
    pub cgroup_path: String,
    /// `cgroup.procs` files of `cgroup_path`.
    pub cgroup_procs: Vec<PathBuf>,
}

/// The command line: CRI command/args over the image's Entrypoint/Cmd.
pub fn command_line(spec: &ContainerSpec, image: &ImageConfig) -> Result<Vec<String>, LinuxError> {
    let (entrypoint, args) = if !spec.command.is_empty() {
        (spec.command.clone(), spec.args.clone())
    } else if !spec.args.is_empty() {
        (image.entrypoint.clone(), spec.args.clone())
    } else {
        (image.entrypoint.clone(), image.cmd.clone())
    };
    let line: Vec<String> = entrypoint.into_iter().chain(args).collect();
    if line.is_empty() {
        return Err(LinuxError::Invalid(
            "no command: neither the container nor its image specifies one".into(),
        ));
    }
    Ok(line)
}

/// Image environment, then the container's, later keys replacing earlier ones.
pub fn environment(spec: &ContainerSpec, image: &ImageConfig, hostname: &str) -> Vec<String> {
    let mut env: Vec<String> = Vec::new();
    let mut set = |entry: String| {
        let key = entry.split('=').next().unwrap_or_default().to_string();
        env.retain(|e| e.split('=').next() != Some(key.as_str()));
        env.push(entry);
    };
    set(DEFAULT_PATH.to_string());
    if !hostname.is_empty() {
        set(format!("HOSTNAME={hostname}"));
    }
    for entry in &image.env {
        set(entry.clone());
    }
    for (key, value) in &spec.envs {
        set(format!("{key}={value}"));
    }
    env
}

/// Reads a file as the image presents it (top layer first; a whiteout hides it).
pub fn read_image_file(layer_dirs: &[PathBuf], relative: &str) -> String {
    use std::os::unix::fs::FileTypeExt;
    for dir in layer_dirs.iter().rev() {
        let path = dir.join(relative);
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.file_type().is_char_device() => return String::new(),
            Ok(meta) if meta.is_file() => {
                return std::fs::read_to_string(&path).unwrap_or_default();
            }
            _ => {}
        }
    }
    String::new()
}

fn resolve_capabilities(spec: &ContainerSpec, uid: u32) -> Result<CapabilitySets, LinuxError> {
    let security = &spec.security;
    // "All" means all this runtime holds: a container can get no more than its creator.
    let mut all: Vec<String> = caps::read(None, caps::CapSet::Permitted)
        .unwrap_or_else(|_| caps::all())
        .into_iter()
        .map(|c| c.to_string())
        .collect();
    all.sort();
    let normalize = |name: &String| {
        let upper = name.to_ascii_uppercase();
        if upper == "ALL" || upper.starts_with("CAP_") {
            upper
        } else {
            format!("CAP_{upper}")
        }
    };
    let mut set: Vec<String> = if security.privileged {
        all.clone()
    } else {
        DEFAULT_CAPABILITIES.iter().map(|c| c.to_string()).collect()
    };
    if !security.privileged {
        let drops: Vec<String> = security.capabilities.drop.iter().map(normalize).collect();
        if drops.iter().any(|d| d == "ALL") {
            set.clear();
        } else {
            set.retain(|c| !drops.contains(c));
        }
        for add in security.capabilities.add.iter().map(normalize) {
            if add == "ALL" {
                set = all.clone();
            } else if !set.contains(&add) {
                if !all.contains(&add) {
                    return Err(LinuxError::Invalid(format!("unknown capability {add}")));
                }
                set.push(add);
            }
        }
    }
    let ambient: Vec<String> = security.capabilities.add_ambient.iter().map(normalize).collect();
    for cap in &ambient {
        if !set.contains(cap) {
            set.push(cap.clone());
        }
    }
    // A non-root process starts with only its ambient capabilities effective.
    let (effective, permitted) = if uid == 0 {
        (set.clone(), set.clone())
    } else {
        (ambient.clone(), ambient.clone())
    };
    Ok(CapabilitySets {
        bounding: set,
        effective,
        permitted,
        inheritable: ambient.clone(),
        ambient,
    })
}

fn propagation(mount: MountPropagation) -> Propagation {
    match mount {
        MountPropagation::Private => Propagation::Private,
        MountPropagation::HostToContainer => Propagation::Slave,
        MountPropagation::Bidirectional => Propagation::Shared,
    }
}

/// Builds the monitor's config. Reads only the image's passwd/group files.
pub fn init_config(plan: &ContainerPlan<'_>) -> Result<InitConfig, LinuxError> {
    let spec = plan.spec;
    let security = &spec.security;
    let image_config = &plan.image.config;
    let args = command_line(spec, image_config)?;

    let passwd = read_image_file(&plan.layer_dirs, "etc/passwd");
    let group = read_image_file(&plan.layer_dirs, "etc/group");
    let user_text = if !security.run_as_username.is_empty() {
        security.run_as_username.clone()
    } else if let Some(uid) = security.run_as_user {
        uid.to_string()
    } else {
        image_config.user.clone()
    };
    let mut user = users::resolve(&user_text, &passwd, &group).map_err(|e| LinuxError::Invalid(e.to_string()))?;
    if security.run_as_group.is_some() && security.run_as_user.is_none() && security.run_as_username.is_empty() {
        return Err(LinuxError::Invalid(
            "run_as_group needs run_as_user or run_as_username to be set too".into(),
        ));
    }
    if let Some(gid) = security.run_as_group {
        user.gid =
            u32::try_from(gid).map_err(|_| LinuxError::Invalid(format!("run_as_group {gid} is out of range")))?;
    }
    // The primary group leads the list, as `id -G` shows it.
    let mut additional_gids: Vec<u32> = vec![user.gid];
    if security.supplemental_groups_policy == crate::spec::SupplementalGroupsPolicy::Merge {
        for gid in &user.image_groups {
            if !additional_gids.contains(gid) {
                additional_gids.push(*gid);
            }
        }
    }
    for gid in &security.supplemental_groups {
        let gid = u32::try_from(*gid)
            .map_err(|_| LinuxError::Invalid(format!("supplemental group {gid} is out of range")))?;
        if !additional_gids.contains(&gid) {
            additional_gids.push(gid);
        }
    }

    let hostname = std::fs::read_to_string(&plan.sandbox_runtime.hostname_file).unwrap_or_default();
    let mut env = environment(spec, image_config, hostname.trim());
    if !env.iter().any(|e| e.starts_with("HOME=")) {
        env.push(format!("HOME={}", user.home));
    }
    let cwd = if !spec.working_dir.is_empty() {
        spec.working_dir.clone()
    } else if !image_config.working_dir.is_empty() {
        image_config.working_dir.clone()
    } else {
        "/".to_string()
    };

    let mut mounts = Vec::new();
    let bind = |destination: &str, source: &Path, readonly: bool| MountSpec {
        destination: destination.to_string(),
        source: source.to_path_buf(),
        kind: MountKind::Bind,
        readonly,
        recursive_readonly: false,
        propagation: Propagation::Private,
        recursive: false,
        idmap: false,
    };
    let user_mounts: Vec<&str> = spec.mounts.iter().map(|m| m.container_path.as_str()).collect();
    let runtime = plan.sandbox_runtime;
    for (destination, source) in [
        ("/etc/hostname", &runtime.hostname_file),
        ("/etc/hosts", &runtime.hosts_file),
        ("/etc/resolv.conf", &runtime.resolv_file),
    ] {
        if !user_mounts.contains(&destination) {
            mounts.push(bind(destination, source, security.readonly_rootfs));
        }
    }
    let pod_userns = plan.sandbox.namespaces.user;
    if let Some(user) = security.namespaces.user
        && Some(user) != pod_userns
    {
        return Err(LinuxError::Invalid(
            "a container's user namespace must be its pod's".into(),
        ));
    }
    if let Some(user) = pod_userns
        && plan.sandbox_runtime.userns.is_none()
    {
        return Err(LinuxError::Invalid(format!(
            "the pod was made without its user namespace {user:?}"
        )));
    }
    let mut root_propagation = Propagation::Private;
    for mount in &spec.mounts {
        if mount.idmapped && pod_userns.is_none() {
            return Err(LinuxError::Invalid(format!(
                "mount {} asks for ID mappings, but the pod has no user namespace",
                mount.container_path
            )));
        }
        let source = PathBuf::from(&mount.host_path);
        if !source.exists() {
            return Err(LinuxError::Invalid(format!(
                "mount source {} does not exist",
                mount.host_path
            )));
        }
        if !mount.container_path.starts_with('/') {
            return Err(LinuxError::Invalid(format!(
                "mount destination {:?} is not absolute",
                mount.container_path
            )));
        }
        if mount.recursive_readonly && (!mount.readonly || mount.propagation != MountPropagation::Private) {
            return Err(LinuxError::Invalid(format!(
                "recursive read-only mount {} must be read-only with private propagation",
                mount.container_path
            )));
        }
        let propagation = propagation(mount.propagation);
        match propagation {
            Propagation::Shared => root_propagation = Propagation::Shared,
            Propagation::Slave if root_propagation == Propagation::Private => root_propagation = Propagation::Slave,
            _ => {}
        }
        mounts.push(MountSpec {
            destination: mount.container_path.clone(),
            source,
            kind: MountKind::Bind,
            readonly: mount.readonly,
            recursive_readonly: mount.recursive_readonly,
            propagation,
            recursive: true,
            idmap: mount.idmapped,
        });
    }
    let devices = spec
        .devices
        .iter()
        .map(|d| {
            if !Path::new(&d.host_path).exists() {
                return Err(LinuxError::Invalid(format!("device {} does not exist", d.host_path)));
            }
            Ok(DeviceSpec {
                host_path: PathBuf::from(&d.host_path),
                container_path: d.container_path.clone(),
                permissions: d.permissions.clone(),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;

    let mut join_namespaces = Vec::new();
    if let Some(netns) = &runtime.netns {
        join_namespaces.push((libc::CLONE_NEWNET, netns.clone()));
    }
    if let Some(ipcns) = &runtime.ipcns {
        join_namespaces.push((libc::CLONE_NEWIPC, ipcns.clone()));
    }
    if let Some(utsns) = &runtime.utsns {
        join_namespaces.push((libc::CLONE_NEWUTS, utsns.clone()));
    }
    let pid_namespace = match security.namespaces.pid {
        NamespaceMode::Node => PidNamespace::Host,
        NamespaceMode::Pod => match &runtime.pidns {
            Some(path) => PidNamespace::Join(path.clone()),
            None => PidNamespace::New,
        },
        NamespaceMode::Container => PidNamespace::New,
        NamespaceMode::Target => {
            return Err(LinuxError::Invalid(
                "TARGET pid namespaces are only for ephemeral containers, which podvisor does not support yet".into(),
            ));
        }
    };

    let capabilities = resolve_capabilities(spec, user.uid)?;
    let privileged = security.privileged;
    let rootfs = RootfsSpec {
        lower_dirs: plan.layer_dirs.clone(),
        upper_dir: plan.rw_dir.join("upper"),
        work_dir: plan.rw_dir.join("work"),
        target: plan.bundle.join("rootfs"),
        readonly_rootfs: security.readonly_rootfs,
        privileged,
        mounts,
        devices,
        masked_paths: security
            .masked_paths
            .clone()
            .unwrap_or_else(super::rootfs::default_masked_paths),
        readonly_paths: security
            .readonly_paths
            .clone()
            .unwrap_or_else(super::rootfs::default_readonly_paths),
        shm: runtime.shm.clone(),
        root_propagation,
        cgroup_mounts: Vec::new(),
        userns: runtime.userns.clone(),
    };
    let seccomp_filter = match (&security.seccomp, privileged) {
        (Some(SeccompProfile::RuntimeDefault | SeccompProfile::Localhost(_)), false) => {
            Some(plan.bundle.join("seccomp.bpf"))
        }
        _ => None,
    };
    Ok(InitConfig {
        id: plan.id.to_string(),
        join_namespaces,
        user_namespace: runtime.userns.clone(),
        pid_namespace,
        cgroup_procs: plan.cgroup_procs.clone(),
        cgroup_path: plan.cgroup_path.clone(),
        rootfs,
        process: ProcessConfig {
            args,
            env,
            cwd,
            uid: user.uid,
            gid: user.gid,
            additional_gids,
            capabilities,
            no_new_privs: security.no_new_privs,
            seccomp_filter,
            // The CRI sets no rlimits: the container inherits the node's.
            rlimits: Vec::new(),
            oom_score_adj: spec.oom_score_adj,
            tty: spec.tty,
        },
        log_path: plan.log_path.clone(),
        stdin: spec.stdin,
        stdin_once: spec.stdin_once,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(entrypoint: &[&str], cmd: &[&str]) -> ImageConfig {
        ImageConfig {
            entrypoint: entrypoint.iter().map(|s| s.to_string()).collect(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            env: vec!["PATH=/image/bin".into(), "FROM_IMAGE=1".into()],
            ..Default::default()
        }
    }

    fn spec(command: &[&str], args: &[&str]) -> ContainerSpec {
        ContainerSpec {
            command: command.iter().map(|s| s.to_string()).collect(),
            args: args.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn command_line_follows_the_cri_rules() {
        let img = image(&["/entry"], &["default"]);
        assert_eq!(command_line(&spec(&[], &[]), &img).unwrap(), ["/entry", "default"]);
        assert_eq!(command_line(&spec(&[], &["x"]), &img).unwrap(), ["/entry", "x"]);
        assert_eq!(command_line(&spec(&["/cmd"], &[]), &img).unwrap(), ["/cmd"]);
        assert_eq!(command_line(&spec(&["/cmd"], &["y"]), &img).unwrap(), ["/cmd", "y"]);
        assert!(command_line(&spec(&[], &[]), &image(&[], &[])).is_err());
    }

    #[test]
    fn environment_merges_with_later_keys_winning() {
        let mut container = spec(&[], &[]);
        container.envs = vec![("FROM_IMAGE".into(), "2".into()), ("NEW".into(), "x".into())];
        let env = environment(&container, &image(&[], &[]), "pod");
        assert_eq!(env, ["HOSTNAME=pod", "PATH=/image/bin", "FROM_IMAGE=2", "NEW=x"]);
    }

    #[test]
    fn capabilities_add_drop_all_and_non_root() {
        let mut container = spec(&[], &[]);
        container.security.capabilities.drop = vec!["ALL".into()];
        container.security.capabilities.add = vec!["NET_ADMIN".into()];
        let sets = resolve_capabilities(&container, 0).unwrap();
        assert_eq!(sets.bounding, ["CAP_NET_ADMIN"]);
        assert_eq!(sets.effective, ["CAP_NET_ADMIN"]);
        let sets = resolve_capabilities(&spec(&[], &[]), 1000).unwrap();
        assert_eq!(sets.bounding.len(), DEFAULT_CAPABILITIES.len());
        assert!(sets.effective.is_empty(), "non-root gets no effective capabilities");
        let mut container = spec(&[], &[]);
        container.security.capabilities.add = vec!["CAP_NOT_REAL".into()];
        assert!(resolve_capabilities(&container, 0).is_err());
    }

    #[test]
    fn image_files_respect_layers_and_whiteouts() {
        let dir = tempfile::tempdir().unwrap();
        let lower = dir.path().join("lower");
        let upper = dir.path().join("upper");
        std::fs::create_dir_all(lower.join("etc")).unwrap();
        std::fs::create_dir_all(upper.join("etc")).unwrap();
        std::fs::write(lower.join("etc/passwd"), "lower").unwrap();
        assert_eq!(read_image_file(&[lower.clone(), upper.clone()], "etc/passwd"), "lower");
        std::fs::write(upper.join("etc/passwd"), "upper").unwrap();
        assert_eq!(read_image_file(&[lower, upper], "etc/passwd"), "upper");
    }
}
