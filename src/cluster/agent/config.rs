//! Pod spec -> CRI configs, as kubelet builds them: the sandbox config (labels,
//! hostname, DNS, ports, namespaces, security) and container configs
//! (metadata, labels, annotations, resources, security context).

use std::collections::HashMap;

use k8s_openapi::api::core::v1::{Container, Pod, PodSecurityContext, SeccompProfile, SecurityContext};

use super::machine::ResolvConf;
use super::{AgentOptions, labels, quantity};
use crate::cri::proto::runtime as api;

pub const ANNOTATION_HASH: &str = "io.kubernetes.container.hash";
pub const ANNOTATION_RESTART_COUNT: &str = "io.kubernetes.container.restartCount";
pub const ANNOTATION_GRACE: &str = "io.kubernetes.pod.terminationGracePeriod";
pub const ANNOTATION_TERMINATION_MESSAGE_PATH: &str = "io.kubernetes.container.terminationMessagePath";

pub fn pod_name(pod: &Pod) -> &str {
    pod.metadata.name.as_deref().unwrap_or_default()
}

pub fn pod_namespace(pod: &Pod) -> &str {
    pod.metadata.namespace.as_deref().unwrap_or("default")
}

pub fn pod_uid(pod: &Pod) -> &str {
    pod.metadata.uid.as_deref().unwrap_or_default()
}

/// `<pod log dir>/<namespace>_<name>_<uid>`.
pub fn log_directory(options: &AgentOptions, pod: &Pod) -> std::path::PathBuf {
    options
        .pod_log_dir
        .join(format!("{}_{}_{}", pod_namespace(pod), pod_name(pod), pod_uid(pod)))
}

/// The labels that identify a pod's sandboxes and containers.
pub fn pod_labels(options: &AgentOptions, pod: &Pod) -> HashMap<String, String> {
    HashMap::from([
        (labels::POD_NAME.to_string(), pod_name(pod).to_string()),
        (labels::POD_NAMESPACE.to_string(), pod_namespace(pod).to_string()),
        (labels::POD_UID.to_string(), pod_uid(pod).to_string()),
        (labels::NODE.to_string(), options.node_name.clone()),
    ])
}

fn host_network(pod: &Pod) -> bool {
    pod.spec.as_ref().and_then(|s| s.host_network).unwrap_or(false)
}

/// Pod network and IPC; a PID namespace per container unless shared or the host's.
pub fn namespace_options(pod: &Pod) -> api::NamespaceOption {
    let spec = pod.spec.clone().unwrap_or_default();
    let mode = |host: Option<bool>, otherwise: api::NamespaceMode| {
        if host.unwrap_or(false) {
            api::NamespaceMode::Node as i32
        } else {
            otherwise as i32
        }
    };
    let pid = if spec.share_process_namespace.unwrap_or(false) {
        api::NamespaceMode::Pod
    } else {
        api::NamespaceMode::Container
    };
    api::NamespaceOption {
        network: mode(spec.host_network, api::NamespaceMode::Pod),
        pid: mode(spec.host_pid, pid),
        ipc: mode(spec.host_ipc, api::NamespaceMode::Pod),
        ..Default::default()
    }
}

/// resolv.conf for the pod, by `dnsPolicy` and `dnsConfig`.
pub fn dns_config(options: &AgentOptions, host: &ResolvConf, pod: &Pod) -> api::DnsConfig {
    let spec = pod.spec.clone().unwrap_or_default();
    let policy = spec.dns_policy.as_deref().unwrap_or("ClusterFirst");
    let cluster = match policy {
        "ClusterFirstWithHostNet" => true,
        "ClusterFirst" => !host_network(pod),
        _ => false,
    };
    let mut conf = match (policy, cluster, &options.cluster_dns) {
        ("None", _, _) => ResolvConf::default(),
        (_, true, Some(server)) => {
            let domain = &options.cluster_domain;
            let ns = pod_namespace(pod);
            let mut searches = vec![format!("{ns}.svc.{domain}"), format!("svc.{domain}"), domain.clone()];
            searches.extend(host.searches.iter().cloned());
            ResolvConf {
                servers: vec![server.clone()],
                searches,
                options: vec!["ndots:5".into()],
            }
        }
        _ => host.clone(),
    };
    if let Some(extra) = &spec.dns_config {
        for server in extra.nameservers.iter().flatten() {
            if !conf.servers.contains(server) {
                conf.servers.push(server.clone());
            }
        }
        for search in extra.searches.iter().flatten() {
            if !conf.searches.contains(search) {
                conf.searches.push(search.clone());
            }
        }
        for option in extra.options.iter().flatten() {
            let name = option.name.clone().unwrap_or_default();
            conf.options.retain(|o| o.split(':').next() != Some(name.as_str()));
            conf.options.push(match &option.value {
                Some(value) => format!("{name}:{value}"),
                None => name,
            });
        }
    }
    conf.servers.truncate(3);
    conf.searches.truncate(32);
    api::DnsConfig {
        servers: conf.servers,
        searches: conf.searches,
        options: conf.options,
    }
}

/// The pod's hostname: `spec.hostname` or its name, cut to 63 characters.
pub fn hostname(pod: &Pod) -> String {
    let name = pod
        .spec
        .as_ref()
        .and_then(|s| s.hostname.clone())
        .unwrap_or_else(|| pod_name(pod).to_string());
    let mut name: String = name.chars().take(63).collect();
    while name.ends_with(['-', '.']) {
        name.pop();
    }
    name
}

fn protocol(name: Option<&str>) -> i32 {
    match name {
        Some("UDP") => api::Protocol::Udp as i32,
        Some("SCTP") => api::Protocol::Sctp as i32,
        _ => api::Protocol::Tcp as i32,
    }
}

fn seccomp(profile: Option<&SeccompProfile>) -> api::SecurityProfile {
    use api::security_profile::ProfileType;
    match profile {
        Some(p) if p.type_ == "RuntimeDefault" => api::SecurityProfile {
            profile_type: ProfileType::RuntimeDefault as i32,
            localhost_ref: String::new(),
        },
        Some(p) if p.type_ == "Localhost" => api::SecurityProfile {
            profile_type: ProfileType::Localhost as i32,
            localhost_ref: p.localhost_profile.clone().unwrap_or_default(),
        },
        _ => api::SecurityProfile {
            profile_type: ProfileType::Unconfined as i32,
            localhost_ref: String::new(),
        },
    }
}

fn int64(value: Option<i64>) -> Option<api::Int64Value> {
    value.map(|value| api::Int64Value { value })
}

fn supplemental_groups(pod_sc: &PodSecurityContext) -> Vec<i64> {
    let mut groups = pod_sc.supplemental_groups.clone().unwrap_or_default();
    if let Some(fs_group) = pod_sc.fs_group
        && !groups.contains(&fs_group)
    {
        groups.push(fs_group);
    }
    groups
}

pub fn sandbox_config(options: &AgentOptions, host_dns: &ResolvConf, pod: &Pod, attempt: u32) -> api::PodSandboxConfig {
    let spec = pod.spec.clone().unwrap_or_default();
    let pod_sc = spec.security_context.clone().unwrap_or_default();
    let mut labels: HashMap<String, String> = pod.metadata.labels.clone().unwrap_or_default().into_iter().collect();
    labels.extend(pod_labels(options, pod));
    let annotations = pod
        .metadata
        .annotations
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    let port_mappings = spec
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .filter(|p| p.host_port.unwrap_or(0) > 0)
        .map(|p| api::PortMapping {
            protocol: protocol(p.protocol.as_deref()),
            container_port: p.container_port,
            host_port: p.host_port.unwrap_or(0),
            host_ip: p.host_ip.clone().unwrap_or_default(),
        })
        .collect();
    let privileged = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .any(|c| c.security_context.as_ref().and_then(|s| s.privileged).unwrap_or(false));
    let sysctls = pod_sc
        .sysctls
        .iter()
        .flatten()
        .map(|s| (s.name.clone(), s.value.clone()))
        .collect();
    api::PodSandboxConfig {
        metadata: Some(api::PodSandboxMetadata {
            name: pod_name(pod).into(),
            uid: pod_uid(pod).into(),
            namespace: pod_namespace(pod).into(),
            attempt,
        }),
        hostname: hostname(pod),
        log_directory: log_directory(options, pod).display().to_string(),
        dns_config: Some(dns_config(options, host_dns, pod)),
        port_mappings,
        labels,
        annotations,
        linux: Some(api::LinuxPodSandboxConfig {
            cgroup_parent: String::new(),
            security_context: Some(api::LinuxSandboxSecurityContext {
                namespace_options: Some(namespace_options(pod)),
                run_as_user: int64(pod_sc.run_as_user),
                run_as_group: int64(pod_sc.run_as_group),
                supplemental_groups: supplemental_groups(&pod_sc),
                privileged,
                seccomp: Some(seccomp(pod_sc.seccomp_profile.as_ref())),
                ..Default::default()
            }),
            sysctls,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A stable hash of a container's spec; a change restarts the container.
pub fn container_hash(container: &Container) -> String {
    use sha2::Digest;
    let json = serde_json::to_vec(container).unwrap_or_default();
    hex::encode(&sha2::Sha256::digest(&json)[..8])
}

/// The pod's QoS class from its containers' requests and limits.
pub fn qos_class(pod: &Pod) -> &'static str {
    let spec = pod.spec.clone().unwrap_or_default();
    let containers: Vec<&Container> = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .collect();
    let mut any = false;
    let mut guaranteed = true;
    for c in &containers {
        for resource in ["cpu", "memory"] {
            let limit = quantity::limit(c.resources.as_ref(), resource);
            let request = quantity::request(c.resources.as_ref(), resource);
            any |= limit.is_some() || request.is_some();
            let equal = match (&limit, &request) {
                (Some(l), Some(r)) => quantity::parse(&l.0) == quantity::parse(&r.0),
                _ => false,
            };
            guaranteed &= equal;
        }
    }
    match (any, guaranteed) {
        (false, _) => "BestEffort",
        (true, true) => "Guaranteed",
        (true, false) => "Burstable",
    }
}

/// CPU shares and quota and the memory limit, as kubelet maps them to cgroups.
pub fn resources(pod: &Pod, container: &Container, memory_capacity: u64) -> api::LinuxContainerResources {
    const PERIOD: i64 = 100_000;
    let res = container.resources.as_ref();
    let cpu_request = quantity::request(res, "cpu").and_then(|q| quantity::millicores(&q));
    let cpu_limit = quantity::limit(res, "cpu").and_then(|q| quantity::millicores(&q));
    let memory_limit = quantity::limit(res, "memory").and_then(|q| quantity::bytes(&q));
    let memory_request = quantity::request(res, "memory").and_then(|q| quantity::bytes(&q));
    let oom_score_adj = match qos_class(pod) {
        "Guaranteed" => -997,
        "BestEffort" => 1000,
        _ => {
            let request = memory_request.unwrap_or(0).max(0) as u64;
            let adj = 1000 - (1000 * request / memory_capacity.max(1)) as i64;
            adj.clamp(2, 999)
        }
    };
    api::LinuxContainerResources {
        cpu_period: if cpu_limit.is_some() { PERIOD } else { 0 },
        cpu_quota: cpu_limit.map(|m| (m * PERIOD / 1000).max(1000)).unwrap_or(0),
        cpu_shares: cpu_request.map(|m| (m * 1024 / 1000).max(2)).unwrap_or(2),
        memory_limit_in_bytes: memory_limit.unwrap_or(0),
        oom_score_adj,
        ..Default::default()
    }
}

/// The container's Linux security context, with the pod's defaults applied.
pub fn security_context(pod: &Pod, container: &Container) -> api::LinuxContainerSecurityContext {
    let pod_sc = pod
        .spec
        .as_ref()
        .and_then(|s| s.security_context.clone())
        .unwrap_or_default();
    let sc: SecurityContext = container.security_context.clone().unwrap_or_default();
    let privileged = sc.privileged.unwrap_or(false);
    let capabilities = sc.capabilities.as_ref().map(|c| api::Capability {
        add_capabilities: c.add.clone().unwrap_or_default(),
        drop_capabilities: c.drop.clone().unwrap_or_default(),
        ..Default::default()
    });
    api::LinuxContainerSecurityContext {
        capabilities,
        privileged,
        namespace_options: Some(namespace_options(pod)),
        run_as_user: int64(sc.run_as_user.or(pod_sc.run_as_user)),
        run_as_group: int64(sc.run_as_group.or(pod_sc.run_as_group)),
        readonly_rootfs: sc.read_only_root_filesystem.unwrap_or(false),
        supplemental_groups: supplemental_groups(&pod_sc),
        no_new_privs: !privileged && sc.allow_privilege_escalation == Some(false),
        seccomp: Some(seccomp(sc.seccomp_profile.as_ref().or(pod_sc.seccomp_profile.as_ref()))),
        ..Default::default()
    }
}

/// `runAsNonRoot` with an explicit root user is a configuration error.
pub fn check_non_root(pod: &Pod, container: &Container) -> Result<(), String> {
    let pod_sc = pod
        .spec
        .as_ref()
        .and_then(|s| s.security_context.clone())
        .unwrap_or_default();
    let sc = container.security_context.clone().unwrap_or_default();
    let non_root = sc.run_as_non_root.or(pod_sc.run_as_non_root).unwrap_or(false);
    if non_root && sc.run_as_user.or(pod_sc.run_as_user) == Some(0) {
        return Err("container's runAsUser breaks non-root policy".into());
    }
    Ok(())
}

pub fn container_labels(options: &AgentOptions, pod: &Pod, name: &str) -> HashMap<String, String> {
    let mut labels = pod_labels(options, pod);
    labels.insert(labels::CONTAINER_NAME.into(), name.into());
    labels
}

pub fn container_annotations(pod: &Pod, container: &Container, attempt: u32) -> HashMap<String, String> {
    let grace = pod
        .spec
        .as_ref()
        .and_then(|s| s.termination_grace_period_seconds)
        .unwrap_or(30);
    HashMap::from([
        (ANNOTATION_HASH.to_string(), container_hash(container)),
        (ANNOTATION_RESTART_COUNT.to_string(), attempt.to_string()),
        (ANNOTATION_GRACE.to_string(), grace.to_string()),
        (
            ANNOTATION_TERMINATION_MESSAGE_PATH.to_string(),
            container
                .termination_message_path
                .clone()
                .unwrap_or_else(|| "/dev/termination-log".into()),
        ),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(yaml: &str) -> Pod {
        serde_saphyr::from_str(yaml).unwrap()
    }

    fn options() -> AgentOptions {
        AgentOptions {
            node_name: "n1".into(),
            runtime_endpoint: String::new(),
            state_dir: "/s".into(),
            pod_log_dir: "/logs".into(),
            storage_dir: "/".into(),
            cluster_dns: None,
            cluster_domain: "cluster.local".into(),
            api_port: None,
            log_rotation: Default::default(),
            kubelet_ca_pem: None,
            lease_duration: std::time::Duration::from_secs(40),
        }
    }

    const POD: &str = "metadata: {name: web, namespace: ns, uid: u1, labels: {app: web}}
spec:
  shareProcessNamespace: true
  securityContext: {runAsUser: 1000, fsGroup: 2000, sysctls: [{name: net.ipv4.ip_unprivileged_port_start, value: '0'}]}
  dnsConfig: {nameservers: [9.9.9.9], options: [{name: ndots, value: '2'}]}
  containers:
  - name: c
    image: busybox
    ports: [{containerPort: 80, hostPort: 8080}, {containerPort: 81}]
    resources: {requests: {cpu: 250m, memory: 64Mi}, limits: {cpu: 500m, memory: 128Mi}}
    securityContext: {allowPrivilegeEscalation: false, capabilities: {add: [NET_ADMIN]}}
";

    #[test]
    fn sandbox_as_kubelet_builds_it() {
        let host = ResolvConf::parse("nameserver 1.1.1.1\nsearch example.com\noptions ndots:1\n");
        let config = sandbox_config(&options(), &host, &pod(POD), 2);
        assert_eq!(config.metadata.as_ref().unwrap().attempt, 2);
        assert_eq!(config.hostname, "web");
        assert_eq!(config.log_directory, "/logs/ns_web_u1");
        assert_eq!(config.labels["app"], "web");
        assert_eq!(config.labels[labels::POD_UID], "u1");
        assert_eq!(config.labels[labels::NODE], "n1");
        assert_eq!(config.port_mappings.len(), 1);
        assert_eq!(config.port_mappings[0].host_port, 8080);
        let dns = config.dns_config.unwrap();
        assert_eq!(dns.servers, ["1.1.1.1", "9.9.9.9"]);
        assert_eq!(dns.searches, ["example.com"]);
        assert_eq!(dns.options, ["ndots:2"]);
        let linux = config.linux.unwrap();
        assert_eq!(linux.sysctls["net.ipv4.ip_unprivileged_port_start"], "0");
        let sc = linux.security_context.unwrap();
        assert_eq!(sc.namespace_options.unwrap().pid, api::NamespaceMode::Pod as i32);
        assert_eq!(sc.run_as_user.unwrap().value, 1000);
        assert_eq!(sc.supplemental_groups, [2000]);
    }

    #[test]
    fn container_resources_and_security() {
        let pod = pod(POD);
        let c = &pod.spec.as_ref().unwrap().containers[0];
        let r = resources(&pod, c, 1 << 30);
        assert_eq!((r.cpu_shares, r.cpu_quota, r.cpu_period), (256, 50_000, 100_000));
        assert_eq!(r.memory_limit_in_bytes, 128 << 20);
        assert_eq!(qos_class(&pod), "Burstable");
        let sc = security_context(&pod, c);
        assert!(sc.no_new_privs);
        assert_eq!(sc.capabilities.unwrap().add_capabilities, ["NET_ADMIN"]);
        assert_eq!(sc.run_as_user.unwrap().value, 1000);
    }

    #[test]
    fn cluster_dns_and_none_policy() {
        let mut opts = options();
        opts.cluster_dns = Some("10.96.0.10".into());
        let host = ResolvConf::parse("nameserver 1.1.1.1\n");
        let dns = dns_config(
            &opts,
            &host,
            &pod("metadata: {name: p, namespace: x}\nspec: {containers: []}"),
        );
        assert_eq!(dns.servers, ["10.96.0.10"]);
        assert_eq!(dns.searches[0], "x.svc.cluster.local");
        let none =
            pod("metadata: {name: p}\nspec: {dnsPolicy: None, dnsConfig: {nameservers: [8.8.8.8]}, containers: []}");
        assert_eq!(dns_config(&opts, &host, &none).servers, ["8.8.8.8"]);
    }

    #[test]
    fn long_hostnames_are_cut() {
        let name = "a".repeat(62) + "-b";
        let p = pod(&format!("metadata: {{name: {name}}}\nspec: {{containers: []}}"));
        assert_eq!(hostname(&p), "a".repeat(62));
    }
}
