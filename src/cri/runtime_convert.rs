//! CRI RuntimeService messages <-> manager domain types.

use std::collections::BTreeMap;

use super::proto::runtime as cri;
use crate::cgroups::Resources;
use crate::manager::records::{ContainerRecord, ContainerState, SandboxRecord, SandboxState};
use crate::spec::{
    Capabilities, ContainerMetadata, ContainerSpec, Device, DnsConfig, IdMapping, Mount, MountPropagation,
    NamespaceMode, Namespaces, PodMetadata, PortMapping, SandboxSpec, SeccompProfile, SecurityContext,
    SupplementalGroupsPolicy, UserNamespace,
};

fn btree(map: &std::collections::HashMap<String, String>) -> BTreeMap<String, String> {
    map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn hash(map: &BTreeMap<String, String>) -> std::collections::HashMap<String, String> {
    map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn namespace_mode(mode: i32) -> NamespaceMode {
    match cri::NamespaceMode::try_from(mode).unwrap_or(cri::NamespaceMode::Pod) {
        cri::NamespaceMode::Pod => NamespaceMode::Pod,
        cri::NamespaceMode::Container => NamespaceMode::Container,
        cri::NamespaceMode::Node => NamespaceMode::Node,
        cri::NamespaceMode::Target => NamespaceMode::Target,
    }
}

fn namespace_mode_to_cri(mode: NamespaceMode) -> i32 {
    (match mode {
        NamespaceMode::Pod => cri::NamespaceMode::Pod,
        NamespaceMode::Container => cri::NamespaceMode::Container,
        NamespaceMode::Node => cri::NamespaceMode::Node,
        NamespaceMode::Target => cri::NamespaceMode::Target,
    }) as i32
}

fn namespaces(options: Option<&cri::NamespaceOption>) -> Result<Namespaces, String> {
    let Some(options) = options else {
        // Absent options read as their proto defaults: everything POD.
        return Ok(Namespaces::default());
    };
    Ok(Namespaces {
        network: namespace_mode(options.network),
        pid: namespace_mode(options.pid),
        ipc: namespace_mode(options.ipc),
        target_id: options.target_id.clone(),
        user: options
            .userns_options
            .as_ref()
            .map(user_namespace)
            .transpose()?
            .flatten(),
    })
}

/// Kubelet's user namespace request: NODE (the node's) or POD with exactly
/// one UID and one GID range that maps container ID 0.
fn user_namespace(userns: &cri::UserNamespace) -> Result<Option<UserNamespace>, String> {
    let mode = cri::NamespaceMode::try_from(userns.mode)
        .map_err(|_| format!("unknown user namespace mode {}", userns.mode))?;
    match mode {
        cri::NamespaceMode::Node => {
            if !userns.uids.is_empty() || !userns.gids.is_empty() {
                return Err("user namespace mappings need mode POD, not NODE".into());
            }
            Ok(None)
        }
        cri::NamespaceMode::Pod => {
            let range = |kind: &str, mappings: &[cri::IdMapping]| -> Result<IdMapping, String> {
                let [m] = mappings else {
                    return Err(format!(
                        "a pod user namespace needs exactly one {kind} mapping, got {}",
                        mappings.len()
                    ));
                };
                if m.container_id != 0 {
                    return Err(format!(
                        "the {kind} mapping must start at container ID 0, not {}",
                        m.container_id
                    ));
                }
                if m.length == 0 || m.host_id.checked_add(m.length - 1).is_none() {
                    return Err(format!(
                        "the {kind} mapping {}+{} is not a valid range",
                        m.host_id, m.length
                    ));
                }
                if m.host_id == 0 {
                    return Err(format!(
                        "the {kind} mapping must not include the node's root (host ID 0)"
                    ));
                }
                Ok(IdMapping {
                    container_id: m.container_id,
                    host_id: m.host_id,
                    length: m.length,
                })
            };
            Ok(Some(UserNamespace {
                uids: range("UID", &userns.uids)?,
                gids: range("GID", &userns.gids)?,
            }))
        }
        other => Err(format!(
            "user namespace mode {} is not supported (use NODE or POD)",
            other.as_str_name()
        )),
    }
}

fn user_namespace_to_cri(user: Option<&UserNamespace>) -> cri::UserNamespace {
    let mapping = |m: &IdMapping| cri::IdMapping {
        host_id: m.host_id,
        container_id: m.container_id,
        length: m.length,
    };
    match user {
        Some(user) => cri::UserNamespace {
            mode: cri::NamespaceMode::Pod as i32,
            uids: vec![mapping(&user.uids)],
            gids: vec![mapping(&user.gids)],
        },
        None => cri::UserNamespace {
            mode: cri::NamespaceMode::Node as i32,
            ..Default::default()
        },
    }
}

pub fn resources(r: Option<&cri::LinuxContainerResources>) -> Resources {
    let Some(r) = r else {
        return Resources::default();
    };
    let positive = |v: i64| (v > 0).then_some(v);
    Resources {
        cpu_shares: (r.cpu_shares > 0).then_some(r.cpu_shares as u64),
        cpu_quota: (r.cpu_quota != 0).then_some(r.cpu_quota),
        cpu_period: (r.cpu_period > 0).then_some(r.cpu_period as u64),
        cpuset_cpus: (!r.cpuset_cpus.is_empty()).then(|| r.cpuset_cpus.clone()),
        cpuset_mems: (!r.cpuset_mems.is_empty()).then(|| r.cpuset_mems.clone()),
        memory_limit: positive(r.memory_limit_in_bytes),
        memory_swap_limit: (r.memory_swap_limit_in_bytes != 0).then_some(r.memory_swap_limit_in_bytes),
        pids_limit: None,
        hugepage_limits: r
            .hugepage_limits
            .iter()
            .map(|h| (h.page_size.clone(), h.limit))
            .collect(),
        unified: btree(&r.unified),
    }
}

fn resources_to_cri(r: &Resources, oom_score_adj: Option<i64>) -> cri::LinuxContainerResources {
    cri::LinuxContainerResources {
        cpu_period: r.cpu_period.unwrap_or_default() as i64,
        cpu_quota: r.cpu_quota.unwrap_or_default(),
        cpu_shares: r.cpu_shares.unwrap_or_default() as i64,
        memory_limit_in_bytes: r.memory_limit.unwrap_or_default(),
        oom_score_adj: oom_score_adj.unwrap_or_default(),
        cpuset_cpus: r.cpuset_cpus.clone().unwrap_or_default(),
        cpuset_mems: r.cpuset_mems.clone().unwrap_or_default(),
        hugepage_limits: r
            .hugepage_limits
            .iter()
            .map(|(page_size, limit)| cri::HugepageLimit {
                page_size: page_size.clone(),
                limit: *limit,
            })
            .collect(),
        unified: hash(&r.unified),
        memory_swap_limit_in_bytes: r.memory_swap_limit.unwrap_or_default(),
    }
}

fn seccomp(profile: Option<&cri::SecurityProfile>, legacy_path: &str) -> Option<SeccompProfile> {
    match profile {
        Some(profile) => match cri::security_profile::ProfileType::try_from(profile.profile_type) {
            Ok(cri::security_profile::ProfileType::RuntimeDefault) => Some(SeccompProfile::RuntimeDefault),
            Ok(cri::security_profile::ProfileType::Localhost) => Some(SeccompProfile::Localhost(
                profile.localhost_ref.trim_start_matches("localhost/").into(),
            )),
            _ => Some(SeccompProfile::Unconfined),
        },
        None => match legacy_path {
            "runtime/default" | "docker/default" => Some(SeccompProfile::RuntimeDefault),
            path if path.starts_with("localhost/") => {
                Some(SeccompProfile::Localhost(path["localhost/".len()..].into()))
            }
            _ => None,
        },
    }
}

/// The pod cgroup's resources: the pod's own, with the pod overhead added to its limits.
pub fn pod_resources(
    overhead: Option<&cri::LinuxContainerResources>,
    pod: Option<&cri::LinuxContainerResources>,
) -> Resources {
    let mut resources = resources(pod);
    let overhead = self::resources(overhead);
    if let (Some(limit), Some(extra)) = (resources.memory_limit, overhead.memory_limit) {
        resources.memory_limit = Some(limit + extra);
    }
    if let (Some(quota), Some(extra)) = (resources.cpu_quota, overhead.cpu_quota)
        && quota > 0
        && extra > 0
    {
        resources.cpu_quota = Some(quota + extra);
    }
    if let (Some(shares), Some(extra)) = (resources.cpu_shares, overhead.cpu_shares) {
        resources.cpu_shares = Some(shares + extra);
    }
    resources
}

pub fn sandbox_spec(config: cri::PodSandboxConfig, runtime_handler: String) -> Result<SandboxSpec, String> {
    let metadata = config.metadata.ok_or("sandbox config needs metadata")?;
    let linux = config.linux.unwrap_or_default();
    let security = linux.security_context.unwrap_or_default();
    let resources = pod_resources(linux.overhead.as_ref(), linux.resources.as_ref());
    let dns = config.dns_config.unwrap_or_default();
    Ok(SandboxSpec {
        metadata: PodMetadata {
            name: metadata.name,
            uid: metadata.uid,
            namespace: metadata.namespace,
            attempt: metadata.attempt,
        },
        hostname: config.hostname,
        log_directory: config.log_directory,
        dns: DnsConfig {
            servers: dns.servers,
            searches: dns.searches,
            options: dns.options,
        },
        port_mappings: config
            .port_mappings
            .iter()
            .map(|p| PortMapping {
                protocol: match cri::Protocol::try_from(p.protocol).unwrap_or(cri::Protocol::Tcp) {
                    cri::Protocol::Tcp => "tcp".into(),
                    cri::Protocol::Udp => "udp".into(),
                    cri::Protocol::Sctp => "sctp".into(),
                },
                container_port: p.container_port.clamp(0, 65535) as u16,
                host_port: p.host_port.clamp(0, 65535) as u16,
                host_ip: p.host_ip.clone(),
            })
            .collect(),
        labels: btree(&config.labels),
        annotations: btree(&config.annotations),
        cgroup_parent: linux.cgroup_parent,
        namespaces: namespaces(security.namespace_options.as_ref())?,
        sysctls: btree(&linux.sysctls),
        privileged: security.privileged,
        resources,
        runtime_handler,
    })
}

pub fn container_spec(config: cri::ContainerConfig) -> Result<ContainerSpec, String> {
    let metadata = config.metadata.ok_or("container config needs metadata")?;
    let image = config.image.map(|i| i.image).unwrap_or_default();
    if image.is_empty() {
        return Err("container config needs an image".into());
    }
    let linux = config.linux.unwrap_or_default();
    let security = linux.security_context.unwrap_or_default();
    let caps = security.capabilities.unwrap_or_default();
    let stop_signal = match cri::Signal::try_from(config.stop_signal) {
        Ok(cri::Signal::RuntimeDefault) | Err(_) => String::new(),
        Ok(signal) => signal.as_str_name().to_string(),
    };
    Ok(ContainerSpec {
        metadata: ContainerMetadata {
            name: metadata.name,
            attempt: metadata.attempt,
        },
        image,
        command: config.command,
        args: config.args,
        working_dir: config.working_dir,
        envs: config
            .envs
            .into_iter()
            .map(|kv| (kv.key, String::from_utf8_lossy(&kv.value).into_owned()))
            .collect(),
        mounts: config
            .mounts
            .into_iter()
            .map(|m| Mount {
                propagation: match cri::MountPropagation::try_from(m.propagation)
                    .unwrap_or(cri::MountPropagation::PropagationPrivate)
                {
                    cri::MountPropagation::PropagationPrivate => MountPropagation::Private,
                    cri::MountPropagation::PropagationHostToContainer => MountPropagation::HostToContainer,
                    cri::MountPropagation::PropagationBidirectional => MountPropagation::Bidirectional,
                },
                container_path: m.container_path,
                host_path: m.host_path,
                readonly: m.readonly,
                recursive_readonly: m.recursive_read_only,
                selinux_relabel: m.selinux_relabel,
                idmapped: !m.uid_mappings.is_empty() || !m.gid_mappings.is_empty(),
            })
            .collect(),
        devices: config
            .devices
            .into_iter()
            .map(|d| Device {
                container_path: d.container_path,
                host_path: d.host_path,
                permissions: d.permissions,
            })
            .collect(),
        labels: btree(&config.labels),
        annotations: btree(&config.annotations),
        log_path: config.log_path,
        stdin: config.stdin,
        stdin_once: config.stdin_once,
        tty: config.tty,
        resources: resources(linux.resources.as_ref()),
        oom_score_adj: linux.resources.as_ref().map(|r| r.oom_score_adj).filter(|v| *v != 0),
        security: SecurityContext {
            capabilities: Capabilities {
                add: caps.add_capabilities,
                drop: caps.drop_capabilities,
                add_ambient: caps.add_ambient_capabilities,
            },
            privileged: security.privileged,
            namespaces: namespaces(security.namespace_options.as_ref())?,
            run_as_user: security.run_as_user.map(|v| v.value),
            run_as_group: security.run_as_group.map(|v| v.value),
            run_as_username: security.run_as_username,
            readonly_rootfs: security.readonly_rootfs,
            supplemental_groups: security.supplemental_groups,
            supplemental_groups_policy: if security.supplemental_groups_policy == cri::SupplementalGroupsPolicy::Strict as i32 {
                SupplementalGroupsPolicy::Strict
            } else {
                SupplementalGroupsPolicy::Merge
            },
            no_new_privs: security.no_new_privs,
            // Kubelet always sends the lists; empty ones mean "none" only when privileged.
            masked_paths: (!security.masked_paths.is_empty() || security.privileged).then_some(security.masked_paths),
            readonly_paths: (!security.readonly_paths.is_empty() || security.privileged).then_some(security.readonly_paths),
            #[allow(deprecated)] // reason: older kubelets still send the path form
            seccomp: seccomp(security.seccomp.as_ref(), &security.seccomp_profile_path),
        },
        stop_signal,
    })
}

fn pod_metadata(m: &PodMetadata) -> cri::PodSandboxMetadata {
    cri::PodSandboxMetadata {
        name: m.name.clone(),
        uid: m.uid.clone(),
        namespace: m.namespace.clone(),
        attempt: m.attempt,
    }
}

pub fn sandbox_state(state: SandboxState) -> i32 {
    (match state {
        SandboxState::Ready => cri::PodSandboxState::SandboxReady,
        SandboxState::NotReady => cri::PodSandboxState::SandboxNotready,
    }) as i32
}

pub fn sandbox_state_from_cri(state: i32) -> SandboxState {
    if state == cri::PodSandboxState::SandboxReady as i32 {
        SandboxState::Ready
    } else {
        SandboxState::NotReady
    }
}

pub fn sandbox_to_cri(record: &SandboxRecord) -> cri::PodSandbox {
    cri::PodSandbox {
        id: record.id.clone(),
        metadata: Some(pod_metadata(&record.spec.metadata)),
        state: sandbox_state(record.state),
        created_at: record.created_at,
        labels: hash(&record.spec.labels),
        annotations: hash(&record.spec.annotations),
        runtime_handler: record.spec.runtime_handler.clone(),
    }
}

pub fn sandbox_status(record: &SandboxRecord) -> cri::PodSandboxStatus {
    let ns = &record.spec.namespaces;
    cri::PodSandboxStatus {
        id: record.id.clone(),
        metadata: Some(pod_metadata(&record.spec.metadata)),
        state: sandbox_state(record.state),
        created_at: record.created_at,
        network: Some({
            let mut ips = record.network.as_ref().map(|n| n.ips()).unwrap_or_default().into_iter();
            cri::PodSandboxNetworkStatus {
                ip: ips.next().unwrap_or_default(),
                additional_ips: ips.map(|ip| cri::PodIp { ip }).collect(),
            }
        }),
        linux: Some(cri::LinuxPodSandboxStatus {
            namespaces: Some(cri::Namespace {
                options: Some(cri::NamespaceOption {
                    network: namespace_mode_to_cri(ns.network),
                    pid: namespace_mode_to_cri(ns.pid),
                    ipc: namespace_mode_to_cri(ns.ipc),
                    target_id: ns.target_id.clone(),
                    userns_options: Some(user_namespace_to_cri(ns.user.as_ref())),
                }),
            }),
        }),
        labels: hash(&record.spec.labels),
        annotations: hash(&record.spec.annotations),
        runtime_handler: record.spec.runtime_handler.clone(),
    }
}

pub fn container_state(state: ContainerState) -> i32 {
    (match state {
        ContainerState::Created => cri::ContainerState::ContainerCreated,
        ContainerState::Running => cri::ContainerState::ContainerRunning,
        ContainerState::Exited => cri::ContainerState::ContainerExited,
        ContainerState::Unknown => cri::ContainerState::ContainerUnknown,
    }) as i32
}

pub fn container_state_from_cri(state: i32) -> ContainerState {
    match cri::ContainerState::try_from(state).unwrap_or(cri::ContainerState::ContainerUnknown) {
        cri::ContainerState::ContainerCreated => ContainerState::Created,
        cri::ContainerState::ContainerRunning => ContainerState::Running,
        cri::ContainerState::ContainerExited => ContainerState::Exited,
        cri::ContainerState::ContainerUnknown => ContainerState::Unknown,
    }
}

fn container_metadata(record: &ContainerRecord) -> cri::ContainerMetadata {
    cri::ContainerMetadata {
        name: record.spec.metadata.name.clone(),
        attempt: record.spec.metadata.attempt,
    }
}

fn image_spec(record: &ContainerRecord) -> cri::ImageSpec {
    cri::ImageSpec {
        image: record.spec.image.clone(),
        ..Default::default()
    }
}

pub fn container_to_cri(record: &ContainerRecord) -> cri::Container {
    cri::Container {
        id: record.id.clone(),
        pod_sandbox_id: record.sandbox_id.clone(),
        metadata: Some(container_metadata(record)),
        image: Some(image_spec(record)),
        image_ref: record.image_ref.clone(),
        state: container_state(record.state),
        created_at: record.created_at,
        labels: hash(&record.spec.labels),
        annotations: hash(&record.spec.annotations),
        image_id: record.image_id.clone(),
    }
}

pub fn container_status(record: &ContainerRecord) -> cri::ContainerStatus {
    cri::ContainerStatus {
        id: record.id.clone(),
        metadata: Some(container_metadata(record)),
        state: container_state(record.state),
        created_at: record.created_at,
        started_at: record.started_at,
        finished_at: record.finished_at,
        exit_code: record.exit_code,
        image: Some(image_spec(record)),
        image_ref: record.image_ref.clone(),
        reason: record.reason.clone(),
        message: record.message.clone(),
        labels: hash(&record.spec.labels),
        annotations: hash(&record.spec.annotations),
        mounts: record
            .spec
            .mounts
            .iter()
            .map(|m| cri::Mount {
                container_path: m.container_path.clone(),
                host_path: m.host_path.clone(),
                readonly: m.readonly,
                selinux_relabel: m.selinux_relabel,
                propagation: match m.propagation {
                    MountPropagation::Private => cri::MountPropagation::PropagationPrivate,
                    MountPropagation::HostToContainer => cri::MountPropagation::PropagationHostToContainer,
                    MountPropagation::Bidirectional => cri::MountPropagation::PropagationBidirectional,
                } as i32,
                recursive_read_only: m.recursive_readonly,
                ..Default::default()
            })
            .collect(),
        log_path: record.runtime.log_path.display().to_string(),
        resources: Some(cri::ContainerResources {
            linux: Some(resources_to_cri(&record.spec.resources, record.spec.oom_score_adj)),
            windows: None,
        }),
        image_id: record.image_id.clone(),
        user: Some(cri::ContainerUser {
            linux: Some(cri::LinuxContainerUser {
                uid: i64::from(record.runtime.uid),
                gid: i64::from(record.runtime.gid),
                supplemental_groups: {
                    let mut groups: Vec<i64> = record.runtime.groups.iter().map(|g| i64::from(*g)).collect();
                    groups.sort_unstable();
                    groups
                },
            }),
        }),
        stop_signal: 0,
    }
}
