//! Linux container pods end to end: the real daemon, real namespaces,
//! cgroups and overlayfs, checked by what the container itself observes.

mod common;

use std::time::Duration;

use common::cri::{Fixture, mounts_under, no_labels, processes_mentioning};
use podvisor::cri::proto::runtime as cri;
use tonic::Code;

fn security(config: &mut cri::ContainerConfig) -> &mut cri::LinuxContainerSecurityContext {
    config
        .linux
        .get_or_insert_with(Default::default)
        .security_context
        .get_or_insert_with(Default::default)
}

fn status_field<'a>(output: &'a str, field: &str) -> &'a str {
    output
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .map(str::trim)
        .unwrap_or_else(|| panic!("{field} missing in {output}"))
}

#[tokio::test]
async fn lifecycle_logs_exec_stop_remove_leave_nothing_behind() {
    let fx = Fixture::start().await;
    let mut pod_config = fx.pod("life");
    pod_config.dns_config = Some(cri::DnsConfig {
        servers: vec!["10.0.0.10".into()],
        searches: vec!["test.svc.cluster.local".into()],
        options: vec!["ndots:5".into()],
    });
    let pod = fx.run_pod(pod_config.clone()).await;
    let config = fx.container(
        "main",
        "echo started; hostname; cat /etc/resolv.conf; echo to-stderr >&2; exec sleep 1000",
    );
    let id = fx.create(&pod, &pod_config, config).await.unwrap();
    assert_eq!(fx.status(&id).await.state, cri::ContainerState::ContainerCreated as i32);
    fx.start_container(&id).await.unwrap();
    let status = fx.status(&id).await;
    assert_eq!(status.state, cri::ContainerState::ContainerRunning as i32);
    assert!(status.started_at >= status.created_at && status.created_at > 0);

    // The log file in the CRI format.
    common::wait_for(Duration::from_secs(5), "log lines", || {
        std::fs::read_to_string(&status.log_path)
            .unwrap_or_default()
            .lines()
            .count()
            >= 6
    })
    .await;
    let log = std::fs::read_to_string(&status.log_path).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    assert!(lines[0].ends_with(" stdout F started"), "{log}");
    assert!(lines.iter().any(|l| l.ends_with(" stdout F life")), "hostname: {log}");
    assert!(
        lines.iter().any(|l| l.ends_with(" stdout F nameserver 10.0.0.10")),
        "{log}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.ends_with(" stdout F search test.svc.cluster.local")),
        "{log}"
    );
    assert!(lines.iter().any(|l| l.ends_with(" stdout F options ndots:5")), "{log}");
    assert!(lines.iter().any(|l| l.ends_with(" stderr F to-stderr")), "{log}");
    let stamp = lines[0].split(' ').next().unwrap();
    assert!(
        stamp.len() == 30 && stamp.ends_with('Z') && stamp.contains('T'),
        "RFC3339Nano: {stamp}"
    );

    // ExecSync: output, exit codes, the container's view of the world.
    let out = fx.exec(&id, &["sh", "-c", "echo out; echo err >&2; exit 3"]).await;
    assert_eq!(
        (out.stdout.as_slice(), out.stderr.as_slice(), out.exit_code),
        (&b"out\n"[..], &b"err\n"[..], 3)
    );
    let out = fx.exec(&id, &["cat", "/etc/hostname"]).await;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "life\n");
    let out = fx.exec(&id, &["sh", "-c", "cat /proc/1/cmdline | tr '\\0' ' '"]).await;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "sleep 1000 ",
        "PID 1 is the workload"
    );
    let out = fx.exec(&id, &["no-such-command"]).await;
    assert_eq!(out.exit_code, 127);

    // Lists and filters.
    let mut runtime = fx.runtime().await;
    let listed = runtime
        .list_containers(cri::ListContainersRequest {
            filter: Some(cri::ContainerFilter {
                pod_sandbox_id: pod.clone(),
                state: Some(cri::ContainerStateValue {
                    state: cri::ContainerState::ContainerRunning as i32,
                }),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .containers;
    assert_eq!(
        listed.iter().map(|c| c.id.clone()).collect::<Vec<_>>(),
        vec![id.clone()]
    );
    let pods = runtime
        .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
        .await
        .unwrap()
        .into_inner()
        .items;
    assert_eq!(pods.len(), 1);
    assert_eq!(pods[0].state, cri::PodSandboxState::SandboxReady as i32);

    // Stop: sleep as PID 1 ignores SIGTERM, so the timeout runs out and SIGKILL follows.
    let started = std::time::Instant::now();
    runtime
        .stop_container(cri::StopContainerRequest {
            container_id: id.clone(),
            timeout: 1,
        })
        .await
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(900));
    let status = fx.status(&id).await;
    assert_eq!(status.state, cri::ContainerState::ContainerExited as i32);
    assert_eq!(status.exit_code, 137);
    assert!(status.finished_at >= status.started_at);
    let err = runtime
        .exec_sync(cri::ExecSyncRequest {
            container_id: id.clone(),
            cmd: vec!["true".into()],
            timeout: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);

    fx.remove_pod(&pod).await;
    assert!(
        runtime
            .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
            .await
            .unwrap()
            .into_inner()
            .items
            .is_empty()
    );
    let err = runtime
        .container_status(cri::ContainerStatusRequest {
            container_id: id.clone(),
            verbose: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(
        mounts_under(&fx.daemon.state()).is_empty(),
        "{:?}",
        mounts_under(&fx.daemon.state())
    );
    assert!(processes_mentioning(&format!("monitor {}", fx.daemon.state().display())).is_empty());
    assert!(
        !std::path::Path::new(&format!("/sys/fs/cgroup/memory/podvisor/{pod}")).exists(),
        "pod cgroup removed"
    );
    // Idempotent removal.
    fx.remove_pod(&pod).await;
    runtime
        .remove_container(cri::RemoveContainerRequest {
            container_id: id.clone(),
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn workloads_start_with_default_signal_dispositions() {
    let fx = Fixture::start().await;
    let (status, log) = fx
        .output_of("signals", fx.container("signals", "exec grep SigIgn /proc/self/status"))
        .await;
    assert_eq!(status.exit_code, 0, "{log}");
    assert_eq!(
        log.trim(),
        "SigIgn:\t0000000000000000",
        "nothing ignored (SIGPIPE included)"
    );
    let (pod, id) = fx.run("signals-exec", fx.container("sleeper", "exec sleep 1000")).await;
    let out = fx.exec(&id, &["grep", "SigIgn", "/proc/self/status"]).await;
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "SigIgn:\t0000000000000000");
    fx.remove_pod(&pod).await;
}

#[tokio::test]
async fn exit_codes_and_reasons() {
    let fx = Fixture::start().await;
    let (status, text) = fx.output_of("ok", fx.container("ok", "echo done")).await;
    assert_eq!(
        (status.exit_code, status.reason.as_str(), text.as_str()),
        (0, "Completed", "done")
    );
    let (status, _) = fx.output_of("fail", fx.container("fail", "exit 42")).await;
    assert_eq!((status.exit_code, status.reason.as_str()), (42, "Error"));
    // A workload that cannot start: StartContainer says why, the status keeps it.
    let pod_config = fx.pod("nostart");
    let pod = fx.run_pod(pod_config.clone()).await;
    let mut config = fx.container("nostart", "");
    config.command = vec!["/no/such/binary".into()];
    let id = fx.create(&pod, &pod_config, config).await.unwrap();
    let err = fx.start_container(&id).await.unwrap_err();
    assert!(err.message().contains("/no/such/binary"), "{err:?}");
    let status = fx.status(&id).await;
    assert_eq!(status.state, cri::ContainerState::ContainerExited as i32);
    assert_eq!(status.reason, "StartError");
}

#[tokio::test]
async fn oom_killed_containers_report_it() {
    let fx = Fixture::start().await;
    let mut config = fx.container("hog", "echo $(cat /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null); x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo survived");
    config.linux.as_mut().unwrap().resources = Some(cri::LinuxContainerResources {
        memory_limit_in_bytes: 32 << 20,
        ..Default::default()
    });
    let (_, id) = fx.run("oom", config).await;
    let status = fx.wait_exit(&id).await;
    assert_eq!(
        (status.exit_code, status.reason.as_str()),
        (137, "OOMKilled"),
        "{status:?}"
    );
}

#[tokio::test]
async fn users_groups_capabilities_and_security_flags() {
    let fx = Fixture::start().await;

    let mut config = fx.container(
        "user",
        "grep -E '^(Uid|Gid|Groups|CapEff|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status",
    );
    let sc = security(&mut config);
    sc.run_as_user = Some(cri::Int64Value { value: 1000 });
    sc.supplemental_groups = vec![3000];
    sc.no_new_privs = true;
    sc.seccomp = Some(cri::SecurityProfile {
        profile_type: cri::security_profile::ProfileType::RuntimeDefault as i32,
        localhost_ref: String::new(),
    });
    let (status, text) = fx.output_of("user", config).await;
    assert_eq!(status.exit_code, 0, "{text}");
    assert!(status_field(&text, "Uid:").starts_with("1000\t1000"), "{text}");
    assert!(status_field(&text, "Gid:").starts_with("1000\t1000"), "{text}");
    let groups: Vec<&str> = status_field(&text, "Groups:").split_whitespace().collect();
    assert!(
        groups.contains(&"2000") && groups.contains(&"3000"),
        "image group extra=2000 merged with 3000: {text}"
    );
    assert_eq!(
        status_field(&text, "CapEff:"),
        "0000000000000000",
        "non-root has no effective capabilities"
    );
    assert_eq!(status_field(&text, "NoNewPrivs:"), "1");
    assert_eq!(status_field(&text, "Seccomp:"), "2");

    let mut config = fx.container("caps", "grep -E '^(CapEff|CapBnd):' /proc/self/status");
    let sc = security(&mut config);
    sc.capabilities = Some(cri::Capability {
        add_capabilities: vec!["NET_ADMIN".into()],
        drop_capabilities: vec!["ALL".into()],
        add_ambient_capabilities: Vec::new(),
    });
    let (_, text) = fx.output_of("caps", config).await;
    // CAP_NET_ADMIN is bit 12.
    assert_eq!(status_field(&text, "CapEff:"), "0000000000001000", "{text}");
    assert_eq!(status_field(&text, "CapBnd:"), "0000000000001000", "{text}");

    let mut config = fx.container("username", "id -u; id -g");
    security(&mut config).run_as_username = "tester".into();
    let (_, text) = fx.output_of("username", config).await;
    assert_eq!(text, "1000\n1000");

    let mut config = fx.container(
        "readonly",
        "touch /should-fail && echo wrote; touch /tmp/x 2>/dev/null || echo tmp-readonly-too",
    );
    security(&mut config).readonly_rootfs = true;
    let (_, text) = fx.output_of("readonly", config).await;
    assert!(!text.contains("wrote"), "{text}");
}

#[tokio::test]
async fn masked_paths_proc_and_sys() {
    let fx = Fixture::start().await;
    let config = fx.container(
        "masks",
        "wc -c < /proc/keys; (echo 1 > /proc/sys/kernel/domainname) 2>/dev/null && echo sys-writable; (touch /sys/x) 2>/dev/null && echo sysfs-writable; echo end",
    );
    let (_, text) = fx.output_of("masks", config).await;
    assert_eq!(
        text, "0\nend",
        "masked kcore reads empty, /proc/sys and /sys are read-only"
    );
}

#[tokio::test]
async fn bind_mounts_readonly_and_propagation() {
    let fx = Fixture::start().await;
    let host = tempfile::tempdir().unwrap();
    std::fs::write(host.path().join("from-host"), "hello\n").unwrap();
    let ro = tempfile::tempdir().unwrap();
    let mut config = fx.container(
        "mounts",
        "cat /data/from-host; echo written > /data/from-container; touch /ro/x 2>/dev/null || echo ro-refused",
    );
    config.mounts = vec![
        cri::Mount {
            container_path: "/data".into(),
            host_path: host.path().display().to_string(),
            ..Default::default()
        },
        cri::Mount {
            container_path: "/ro".into(),
            host_path: ro.path().display().to_string(),
            readonly: true,
            ..Default::default()
        },
    ];
    let (status, text) = fx.output_of("mounts", config).await;
    assert_eq!(text, "hello\nro-refused", "{status:?}");
    assert_eq!(
        std::fs::read_to_string(host.path().join("from-container")).unwrap(),
        "written\n"
    );

    let mut config = fx.container("missing", "true");
    config.mounts = vec![cri::Mount {
        container_path: "/data".into(),
        host_path: "/no/such/dir".into(),
        ..Default::default()
    }];
    let pod_config = fx.pod("missing");
    let pod = fx.run_pod(pod_config.clone()).await;
    let err = fx.create(&pod, &pod_config, config).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("/no/such/dir"));
}

#[tokio::test]
async fn bad_requests_are_refused_cleanly() {
    let fx = Fixture::start().await;
    let pod_config = fx.pod("bad");
    let pod = fx.run_pod(pod_config.clone()).await;
    let mut runtime = fx.runtime().await;

    let err = fx
        .create("no-such-pod", &pod_config, fx.container("x", "true"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let mut config = fx.container("x", "true");
    config.image = Some(common::daemon::spec("never/pulled:image"));
    assert_eq!(
        fx.create(&pod, &pod_config, config).await.unwrap_err().code(),
        Code::NotFound
    );
    let mut config = fx.container("x", "true");
    config.log_path = "../../escape.log".into();
    assert_eq!(
        fx.create(&pod, &pod_config, config).await.unwrap_err().code(),
        Code::InvalidArgument
    );

    fx.create(&pod, &pod_config, fx.container("dup", "true")).await.unwrap();
    let err = fx
        .create(&pod, &pod_config, fx.container("dup", "true"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);

    let err = runtime
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(pod_config.clone()),
            runtime_handler: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "same pod name and attempt");
    let err = runtime
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(fx.pod("handler")),
            runtime_handler: "no-such-handler".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let mut sysctl_pod = fx.pod("sysctl");
    sysctl_pod
        .linux
        .as_mut()
        .unwrap()
        .sysctls
        .insert("vm.swappiness".into(), "1".into());
    let err = runtime
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(sysctl_pod),
            runtime_handler: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // Unknown ids: stop and remove are no-ops, status is NotFound.
    runtime
        .stop_container(cri::StopContainerRequest {
            container_id: "nope".into(),
            timeout: 0,
        })
        .await
        .unwrap();
    runtime
        .remove_container(cri::RemoveContainerRequest {
            container_id: "nope".into(),
        })
        .await
        .unwrap();
    runtime
        .stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: "nope".into(),
        })
        .await
        .unwrap();
    runtime
        .remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: "nope".into(),
        })
        .await
        .unwrap();

    fx.remove_pod(&pod).await;
    assert!(fx.daemon.entries("containers").is_empty(), "writable layers removed");
    assert!(mounts_under(&fx.daemon.state()).is_empty());
}

#[tokio::test]
async fn pod_namespaces_sysctls_and_shared_pid() {
    let fx = Fixture::start().await;
    let mut pod_config = fx.pod("shared");
    let linux = pod_config.linux.as_mut().unwrap();
    linux
        .sysctls
        .insert("net.ipv4.ip_unprivileged_port_start".into(), "80".into());
    linux.security_context = Some(cri::LinuxSandboxSecurityContext {
        namespace_options: Some(cri::NamespaceOption {
            pid: cri::NamespaceMode::Pod as i32,
            ..Default::default()
        }),
        ..Default::default()
    });
    let pod = fx.run_pod(pod_config.clone()).await;
    let mut first = fx.container("first", "exec sleep 1000");
    security(&mut first).namespace_options = Some(cri::NamespaceOption {
        pid: cri::NamespaceMode::Pod as i32,
        ..Default::default()
    });
    let first = fx.create(&pod, &pod_config, first).await.unwrap();
    fx.start_container(&first).await.unwrap();
    let mut second = fx.container("second", "exec sleep 1000");
    security(&mut second).namespace_options = Some(cri::NamespaceOption {
        pid: cri::NamespaceMode::Pod as i32,
        ..Default::default()
    });
    let second = fx.create(&pod, &pod_config, second).await.unwrap();
    fx.start_container(&second).await.unwrap();

    let out = fx
        .exec(
            &second,
            &[
                "sh",
                "-c",
                "ps -o comm | grep -c sleep; cat /proc/sys/net/ipv4/ip_unprivileged_port_start",
            ],
        )
        .await;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "2\n80\n",
        "both sleeps visible; the pod's sysctl"
    );
    let out = fx.exec(&first, &["sh", "-c", "echo shm > /dev/shm/x"]).await;
    assert_eq!(out.exit_code, 0);
    let out = fx.exec(&second, &["cat", "/dev/shm/x"]).await;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "shm\n",
        "/dev/shm is shared in the pod"
    );
    let out = fx
        .exec(&second, &["cat", "/proc/sys/net/ipv4/ip_unprivileged_port_start"])
        .await;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "80\n");
    let host = std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start").unwrap();
    assert_ne!(host.trim(), "80", "the node's value is untouched");
    fx.remove_pod(&pod).await;
    assert!(processes_mentioning("pod-init").iter().all(|pid| {
        !std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .unwrap_or_default()
            .contains(&pod)
    }));
}

#[tokio::test]
async fn exec_timeout_kills_the_process() {
    let fx = Fixture::start().await;
    let (_, id) = fx.run("timeout", fx.container("main", "exec sleep 1000")).await;
    let mut runtime = fx.runtime().await;
    let started = std::time::Instant::now();
    let err = runtime
        .exec_sync(cri::ExecSyncRequest {
            container_id: id.clone(),
            cmd: vec!["sh".into(), "-c".into(), "sleep 77".into()],
            timeout: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded);
    assert!(started.elapsed() < Duration::from_secs(5));
    // Gone at once, not even a zombie inside the container (as critest checks).
    assert!(processes_mentioning("sleep 77").is_empty());
    let out = fx
        .exec(&id, &["sh", "-c", "ps -o stat,args | grep 'sleep 7[7]' || true"])
        .await;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn daemon_crash_keeps_containers_and_recovers_their_state() {
    let mut fx = Fixture::start().await;
    let (pod, long) = fx.run("crash", fx.container("long", "exec sleep 1000")).await;
    let pod_config = fx.pod("crash");
    let short = fx
        .create(&pod, &pod_config, fx.container("short", "sleep 1; exit 7"))
        .await
        .unwrap();
    fx.start_container(&short).await.unwrap();

    fx.daemon.kill();
    tokio::time::sleep(Duration::from_millis(1500)).await; // `short` ends while no daemon runs
    fx.daemon.restart().await;

    let status = fx.status(&long).await;
    assert_eq!(
        status.state,
        cri::ContainerState::ContainerRunning as i32,
        "still running after the crash"
    );
    let out = fx.exec(&long, &["echo", "alive"]).await;
    assert_eq!(out.stdout, b"alive\n");
    let status = fx.wait_exit(&short).await;
    assert_eq!(status.exit_code, 7, "the exit that happened meanwhile is known");
    let listed = fx
        .runtime()
        .await
        .list_containers(cri::ListContainersRequest { filter: None })
        .await
        .unwrap()
        .into_inner()
        .containers;
    assert_eq!(listed.len(), 2, "no duplicates");
    // An adopted container's exit is noticed too.
    fx.runtime()
        .await
        .stop_container(cri::StopContainerRequest {
            container_id: long.clone(),
            timeout: 0,
        })
        .await
        .unwrap();
    assert_eq!(fx.status(&long).await.exit_code, 137);
    fx.remove_pod(&pod).await;
    assert!(mounts_under(&fx.daemon.state()).is_empty());
    let _ = no_labels();
}

#[tokio::test]
async fn stats_and_resource_updates() {
    let fx = Fixture::start().await;
    let mut config = fx.container(
        "stats",
        "x=$(head -c 5000000 /dev/zero | tr '\\0' a); while true; do :; done",
    );
    config.linux.as_mut().unwrap().resources = Some(cri::LinuxContainerResources {
        memory_limit_in_bytes: 256 << 20,
        cpu_shares: 512,
        ..Default::default()
    });
    let (pod, id) = fx.run("stats", config).await;
    let mut runtime = fx.runtime().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let first = runtime
        .container_stats(cri::ContainerStatsRequest {
            container_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .stats
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = runtime
        .container_stats(cri::ContainerStatsRequest {
            container_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .stats
        .unwrap();
    let cpu = |s: &cri::ContainerStats| s.cpu.as_ref().unwrap().usage_core_nano_seconds.as_ref().unwrap().value;
    assert!(cpu(&second) > cpu(&first), "cpu time moves");
    assert!(second.cpu.as_ref().unwrap().usage_nano_cores.as_ref().unwrap().value > 0);
    assert!(
        second
            .memory
            .as_ref()
            .unwrap()
            .working_set_bytes
            .as_ref()
            .unwrap()
            .value
            > 1_000_000
    );
    let listed = runtime
        .list_container_stats(cri::ListContainerStatsRequest { filter: None })
        .await
        .unwrap()
        .into_inner()
        .stats;
    assert_eq!(listed.len(), 1);
    let pod_stats = runtime
        .pod_sandbox_stats(cri::PodSandboxStatsRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .stats
        .unwrap();
    assert_eq!(pod_stats.linux.unwrap().containers.len(), 1);

    runtime
        .update_container_resources(cri::UpdateContainerResourcesRequest {
            container_id: id.clone(),
            linux: Some(cri::LinuxContainerResources {
                memory_limit_in_bytes: 128 << 20,
                cpu_shares: 256,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    let status = fx.status(&id).await;
    let linux = status.resources.unwrap().linux.unwrap();
    assert_eq!((linux.memory_limit_in_bytes, linux.cpu_shares), (128 << 20, 256));
    // The kernel's own view, on this hybrid (v1) host.
    let cgroup = |controller: &str, file: &str| {
        std::fs::read_to_string(format!("/sys/fs/cgroup/{controller}/podvisor/{pod}/{id}/{file}")).unwrap_or_default()
    };
    assert_eq!(
        cgroup("memory", "memory.limit_in_bytes").trim(),
        (128u64 << 20).to_string()
    );
    assert_eq!(cgroup("cpu", "cpu.shares").trim(), "256");

    // Pod-level resize: overhead plus the containers' sum, on podvisor's pod cgroup.
    runtime
        .update_pod_sandbox_resources(cri::UpdatePodSandboxResourcesRequest {
            pod_sandbox_id: pod.clone(),
            overhead: Some(cri::LinuxContainerResources {
                memory_limit_in_bytes: 16 << 20,
                ..Default::default()
            }),
            resources: Some(cri::LinuxContainerResources {
                memory_limit_in_bytes: 300 << 20,
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    let pod_limit =
        std::fs::read_to_string(format!("/sys/fs/cgroup/memory/podvisor/{pod}/memory.limit_in_bytes")).unwrap();
    assert_eq!(pod_limit.trim(), (316u64 << 20).to_string());
    let err = runtime
        .update_pod_sandbox_resources(cri::UpdatePodSandboxResourcesRequest {
            pod_sandbox_id: "no-such-pod".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    fx.remove_pod(&pod).await;
}

#[tokio::test]
async fn fifty_pods_of_two_containers_concurrently_leave_nothing_behind() {
    let fx = std::sync::Arc::new(Fixture::start().await);
    let pods: Vec<_> = (0..50)
        .map(|i| {
            let fx = fx.clone();
            tokio::spawn(async move {
                let pod_config = fx.pod(&format!("many-{i}"));
                let pod = fx.run_pod(pod_config.clone()).await;
                for name in ["a", "b"] {
                    let id = fx
                        .create(&pod, &pod_config, fx.container(name, "exec sleep 1000"))
                        .await
                        .unwrap();
                    fx.start_container(&id).await.unwrap();
                }
                pod
            })
        })
        .collect();
    let mut ids = Vec::new();
    for pod in pods {
        ids.push(pod.await.unwrap());
    }
    let running = fx
        .runtime()
        .await
        .list_containers(cri::ListContainersRequest {
            filter: Some(cri::ContainerFilter {
                state: Some(cri::ContainerStateValue {
                    state: cri::ContainerState::ContainerRunning as i32,
                }),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .containers;
    assert_eq!(running.len(), 100);
    let monitors = processes_mentioning(&format!("monitor {}", fx.daemon.state().display()));
    assert_eq!(monitors.len(), 100);

    let pod_ids = ids.clone();
    let removals: Vec<_> = ids
        .into_iter()
        .map(|pod| {
            let fx = fx.clone();
            tokio::spawn(async move { fx.remove_pod(&pod).await })
        })
        .collect();
    for removal in removals {
        removal.await.unwrap();
    }
    assert!(
        mounts_under(&fx.daemon.state()).is_empty(),
        "{:?}",
        mounts_under(&fx.daemon.state())
    );
    assert!(processes_mentioning(&format!("monitor {}", fx.daemon.state().display())).is_empty());
    for pid in monitors {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "monitor {pid} is gone"
        );
    }
    assert!(fx.daemon.entries("containers").is_empty());
    for pod in &pod_ids {
        for controller in ["memory", "cpu", "pids", "cpuset"] {
            let dir = format!("/sys/fs/cgroup/{controller}/podvisor/{pod}");
            assert!(!std::path::Path::new(&dir).exists(), "{dir} was left behind");
        }
    }
    let pods = fx
        .runtime()
        .await
        .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
        .await
        .unwrap();
    assert!(pods.into_inner().items.is_empty());
}

#[tokio::test]
async fn container_events_and_log_reopen() {
    let fx = Fixture::start().await;
    let mut events = fx
        .runtime()
        .await
        .get_container_events(cri::GetEventsRequest {})
        .await
        .unwrap()
        .into_inner();
    let (pod, id) = fx
        .run(
            "events",
            fx.container(
                "ticker",
                "i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.1; done",
            ),
        )
        .await;
    let status = fx.status(&id).await;
    let log = std::path::PathBuf::from(&status.log_path);
    // The monitor creates the log before the first line: wait for that line.
    common::wait_for(Duration::from_secs(5), "ticks", || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("stdout F tick 0")
    })
    .await;

    // kubelet rotates: rename, then ask for a reopen; new lines go to a new file.
    let rotated = log.with_extension("log.1");
    std::fs::rename(&log, &rotated).unwrap();
    fx.runtime()
        .await
        .reopen_container_log(cri::ReopenContainerLogRequest {
            container_id: id.clone(),
        })
        .await
        .unwrap();
    common::wait_for(Duration::from_secs(5), "lines in the reopened log", || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("stdout F tick")
    })
    .await;
    assert!(std::fs::read_to_string(&rotated).unwrap().contains("stdout F tick 0"));

    fx.remove_pod(&pod).await;
    let mut kinds = Vec::new();
    while kinds.len() < 4 {
        let event = tokio::time::timeout(Duration::from_secs(5), events.message())
            .await
            .expect("an event in time")
            .unwrap()
            .unwrap();
        assert_eq!(event.container_id, id);
        kinds.push(event.container_event_type);
    }
    use cri::ContainerEventType::*;
    assert_eq!(
        kinds,
        [
            ContainerCreatedEvent,
            ContainerStartedEvent,
            ContainerStoppedEvent,
            ContainerDeletedEvent
        ]
        .map(|k| k as i32)
    );
}

#[tokio::test]
async fn host_namespaces() {
    let fx = Fixture::start().await;
    let mut pod_config = fx.pod("host");
    pod_config.linux.as_mut().unwrap().security_context = Some(cri::LinuxSandboxSecurityContext {
        namespace_options: Some(cri::NamespaceOption {
            network: cri::NamespaceMode::Node as i32,
            pid: cri::NamespaceMode::Node as i32,
            ipc: cri::NamespaceMode::Node as i32,
            ..Default::default()
        }),
        ..Default::default()
    });
    let pod = fx.run_pod(pod_config.clone()).await;
    let mut config = fx.container("host", "exec sleep 1000");
    security(&mut config).namespace_options = Some(cri::NamespaceOption {
        network: cri::NamespaceMode::Node as i32,
        pid: cri::NamespaceMode::Node as i32,
        ipc: cri::NamespaceMode::Node as i32,
        ..Default::default()
    });
    let id = fx.create(&pod, &pod_config, config).await.unwrap();
    fx.start_container(&id).await.unwrap();
    let ns = |pid: &str, kind: &str| std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).unwrap();
    let out = fx
        .exec(
            &id,
            &["sh", "-c", "for n in net pid ipc; do readlink /proc/self/ns/$n; done"],
        )
        .await;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    for kind in ["net", "pid", "ipc"] {
        assert!(
            text.contains(ns("self", kind).to_str().unwrap()),
            "{kind} is the node's: {text}"
        );
    }
    let hostname = nix::unistd::gethostname().unwrap().to_string_lossy().into_owned();
    let out = fx.exec(&id, &["cat", "/etc/hostname"]).await;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        hostname,
        "host network pods carry the node's name"
    );
}

#[tokio::test]
async fn privileged_containers_get_every_capability_the_node_has() {
    let fx = Fixture::start().await;
    let mut config = fx.container("privileged", "grep -E '^CapEff:' /proc/self/status; touch /sys/kernel/x 2>/dev/null; mkdir -p /tmp/m && mount -t tmpfs none /tmp/m && echo mounted");
    security(&mut config).privileged = true;
    let (_, text) = fx.output_of("privileged", config).await;
    let own = std::fs::read_to_string("/proc/self/status").unwrap();
    assert_eq!(status_field(&text, "CapEff:"), status_field(&own, "CapEff:"), "{text}");
    assert!(text.contains("mounted"), "{text}");

    let mut config = fx.container("all", "grep -E '^CapEff:' /proc/self/status");
    security(&mut config).capabilities = Some(cri::Capability {
        add_capabilities: vec!["ALL".into()],
        ..Default::default()
    });
    let (_, text) = fx.output_of("all", config).await;
    assert_eq!(status_field(&text, "CapEff:"), status_field(&own, "CapEff:"));

    // Seccomp without no_new_privs is installed while the process may still do so.
    let mut config = fx.container("seccomp", "grep -E '^(Seccomp|NoNewPrivs):' /proc/self/status");
    security(&mut config).seccomp = Some(cri::SecurityProfile {
        profile_type: cri::security_profile::ProfileType::RuntimeDefault as i32,
        localhost_ref: String::new(),
    });
    let (status, text) = fx.output_of("seccomp", config).await;
    assert_eq!(status.exit_code, 0, "{text}");
    assert_eq!(
        (status_field(&text, "Seccomp:"), status_field(&text, "NoNewPrivs:")),
        ("2", "0")
    );
}

#[tokio::test]
async fn recursive_readonly_needs_readonly_and_private_propagation() {
    let fx = Fixture::start().await;
    let pod_config = fx.pod("rro");
    let pod = fx.run_pod(pod_config.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    for (readonly, propagation) in [
        (false, cri::MountPropagation::PropagationPrivate),
        (true, cri::MountPropagation::PropagationHostToContainer),
        (true, cri::MountPropagation::PropagationBidirectional),
    ] {
        let mut config = fx.container("rro", "true");
        config.mounts = vec![cri::Mount {
            container_path: "/data".into(),
            host_path: dir.path().display().to_string(),
            readonly,
            recursive_read_only: true,
            propagation: propagation as i32,
            ..Default::default()
        }];
        let err = fx.create(&pod, &pod_config, config).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{readonly} {propagation:?}");
    }
}

#[tokio::test]
async fn containers_without_a_log_directory_discard_output_safely() {
    use std::os::unix::fs::FileTypeExt;
    let fx = Fixture::start().await;
    let mut pod_config = fx.pod("nolog");
    pod_config.log_directory = String::new();
    let pod = fx.run_pod(pod_config.clone()).await;
    let id = fx
        .create(
            &pod,
            &pod_config,
            fx.container("quiet", "echo discarded; exec sleep 1000"),
        )
        .await
        .unwrap();
    fx.start_container(&id).await.unwrap();
    assert_eq!(fx.status(&id).await.log_path, "", "no path is handed out");
    fx.runtime()
        .await
        .reopen_container_log(cri::ReopenContainerLogRequest {
            container_id: id.clone(),
        })
        .await
        .unwrap();
    assert!(std::fs::metadata("/dev/null").unwrap().file_type().is_char_device());
    fx.remove_pod(&pod).await;
}

#[tokio::test]
async fn a_cgroup_parent_from_kubelet_is_used_and_left_to_kubelet() {
    let fx = Fixture::start().await;
    let parent = format!("/kubepods-test-{}/pod{}", std::process::id(), rand_suffix());
    let mut pod_config = fx.pod("parent");
    pod_config.linux.as_mut().unwrap().cgroup_parent = parent.clone();
    let pod = fx.run_pod(pod_config.clone()).await;
    let id = fx
        .create(&pod, &pod_config, fx.container("c", "exec sleep 1000"))
        .await
        .unwrap();
    fx.start_container(&id).await.unwrap();
    let container_dir = format!("/sys/fs/cgroup/memory{parent}/{id}");
    assert!(std::path::Path::new(&container_dir).exists(), "{container_dir}");
    fx.remove_pod(&pod).await;
    assert!(!std::path::Path::new(&container_dir).exists());
    let parent_dir = format!("/sys/fs/cgroup/memory{parent}");
    assert!(std::path::Path::new(&parent_dir).exists(), "kubelet's pod cgroup stays");
    // Tidy up what kubelet would have removed.
    for controller in [
        "memory", "cpu", "cpuacct", "cpuset", "pids", "blkio", "devices", "freezer", "unified",
    ] {
        let _ = std::fs::remove_dir(format!("/sys/fs/cgroup/{controller}{parent}"));
        let _ = std::fs::remove_dir(format!(
            "/sys/fs/cgroup/{controller}/kubepods-test-{}",
            std::process::id()
        ));
    }
}

fn rand_suffix() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos()
}

#[tokio::test]
async fn removing_an_image_in_use_keeps_its_layers_until_the_container_goes() {
    let mut fx = Fixture::start().await;
    let (pod, id) = fx.run("inuse", fx.container("c", "exec sleep 1000")).await;
    fx.daemon
        .images()
        .await
        .remove_image(cri::RemoveImageRequest {
            image: Some(common::daemon::spec(&fx.image)),
        })
        .await
        .unwrap();
    assert!(
        !fx.daemon.entries("snapshots").is_empty(),
        "the container's layers stay"
    );
    fx.daemon.restart().await; // and across a restart
    assert!(!fx.daemon.entries("snapshots").is_empty());
    let out = fx.exec(&id, &["ls", "/bin/busybox"]).await;
    assert_eq!(out.exit_code, 0);
    fx.remove_pod(&pod).await;
    common::wait_for(Duration::from_secs(5), "the layers to be freed", || {
        fx.daemon.entries("snapshots").is_empty()
    })
    .await;
}

#[tokio::test]
async fn device_access_is_limited_to_the_defaults_and_requested_devices() {
    use std::os::unix::fs::MetadataExt;
    let fx = Fixture::start().await;
    // The node's root disk, whatever its numbers.
    let root_dev = std::fs::metadata("/").unwrap().dev();
    let (major, minor) = (nix::sys::stat::major(root_dev), nix::sys::stat::minor(root_dev));
    let script = format!(
        "mknod /tmp/disk b {major} {minor} && (head -c 1 /tmp/disk >/dev/null 2>&1 && echo disk-readable || echo disk-denied); head -c 3 /dev/myzero | wc -c"
    );
    let mut config = fx.container("devices", &script);
    config.devices = vec![cri::Device {
        container_path: "/dev/myzero".into(),
        host_path: "/dev/zero".into(),
        permissions: "rwm".into(),
    }];
    let (status, text) = fx.output_of("devices", config).await;
    assert_eq!(text, "disk-denied\n3", "{status:?}");
}

#[tokio::test]
async fn tty_containers_get_a_terminal_of_their_own() {
    let fx = Fixture::start().await;
    let mut config = fx.container("tty", "test -t 1 && echo terminal; tty; echo to-stderr >&2");
    config.tty = true;
    let (status, text) = fx.output_of("tty", config).await;
    assert_eq!(status.exit_code, 0, "{text}");
    let lines: Vec<&str> = text.lines().map(|l| l.trim_end_matches('\r')).collect();
    assert_eq!(lines, ["terminal", "/dev/pts/0", "to-stderr"], "{text:?}");
    let log = std::fs::read_to_string(&status.log_path).unwrap();
    assert!(
        log.lines().all(|l| l.split(' ').nth(1) == Some("stdout")),
        "a terminal is one stream: {log}"
    );
}

fn userns_options(host_id: u32) -> cri::NamespaceOption {
    let mapping = vec![cri::IdMapping {
        host_id,
        container_id: 0,
        length: 65536,
    }];
    cri::NamespaceOption {
        userns_options: Some(cri::UserNamespace {
            mode: cri::NamespaceMode::Pod as i32,
            uids: mapping.clone(),
            gids: mapping,
        }),
        ..common::cri::kubelet_namespaces()
    }
}

#[tokio::test]
async fn user_namespaces_map_the_pod_root_to_an_unprivileged_host_range() {
    let fx = Fixture::start().await;
    let host_id = 200_000 + (rand_suffix() % 1000) * 65536;
    let mut pod_config = fx.pod("userns");
    let linux = pod_config.linux.as_mut().unwrap();
    linux.security_context.as_mut().unwrap().namespace_options = Some(userns_options(host_id));
    linux
        .sysctls
        .insert("net.ipv4.ip_unprivileged_port_start".into(), "100".into());
    let pod = fx.run_pod(pod_config.clone()).await;
    let volume = tempfile::tempdir().unwrap();
    std::fs::write(volume.path().join("owned-by-node-root"), "v").unwrap();
    let mut config = fx.container(
        "app",
        "cat /proc/self/uid_map /proc/self/gid_map; id -u; stat -c %u /bin/busybox /vol/owned-by-node-root; \
         echo w > /written && echo wrote-root; cat /proc/sys/net/ipv4/ip_unprivileged_port_start; \
         grep CapEff /proc/self/status; hostname; exec sleep 1000",
    );
    security(&mut config).namespace_options = Some(userns_options(host_id));
    config.mounts.push(cri::Mount {
        container_path: "/vol".into(),
        host_path: volume.path().display().to_string(),
        uid_mappings: vec![cri::IdMapping {
            host_id,
            container_id: 0,
            length: 65536,
        }],
        gid_mappings: vec![cri::IdMapping {
            host_id,
            container_id: 0,
            length: 65536,
        }],
        ..Default::default()
    });
    let id = fx.create(&pod, &pod_config, config).await.expect("CreateContainer");
    fx.start_container(&id).await.expect("StartContainer");
    let status = fx.status(&id).await;
    let mut log = String::new();
    for _ in 0..100 {
        log = std::fs::read_to_string(&status.log_path).unwrap_or_default();
        if log.contains("userns") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let lines: Vec<&str> = log.lines().filter_map(|l| l.splitn(4, ' ').nth(3)).collect();
    let words = |line: &str| line.split_whitespace().map(str::to_string).collect::<Vec<_>>();
    let expected_map = vec!["0".to_string(), host_id.to_string(), "65536".to_string()];
    assert_eq!(words(lines[0]), expected_map, "uid_map: {log}");
    assert_eq!(words(lines[1]), expected_map, "gid_map: {log}");
    assert_eq!(lines[2], "0", "root inside: {log}");
    assert_eq!(lines[3], "0", "image files are the pod root's (idmapped layers): {log}");
    assert_eq!(
        lines[4], "0",
        "an idmapped volume's root-owned file is the pod root's: {log}"
    );
    assert_eq!(lines[5], "wrote-root", "the pod root writes its own /: {log}");
    assert_eq!(lines[6], "100", "the pod's sysctl in a netns its userns owns: {log}");
    assert!(lines[7].starts_with("CapEff:"), "{log}");
    assert_eq!(lines[8], "userns");

    // Seen from the node, the container's processes and files belong to the range.
    let pid = processes_mentioning("sleep 1000")
        .into_iter()
        .find(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
                .unwrap_or_default()
                .contains(&id)
        })
        .expect("the container's process");
    let owner = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert_eq!(
        status_field(&owner, "Uid:").split_whitespace().next(),
        Some(host_id.to_string().as_str())
    );
    let out = fx.exec(&id, &["sh", "-c", "id -u; cat /proc/self/uid_map"]).await;
    let out = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.starts_with("0\n"), "exec runs as the pod root: {out}");
    assert_eq!(
        words(out.lines().nth(1).unwrap()),
        expected_map,
        "exec joins the user namespace"
    );

    // A container cannot leave its pod's user namespace.
    let mut other = fx.container("other", "true");
    security(&mut other).namespace_options = Some(userns_options(host_id + 65536));
    let err = fx.create(&pod, &pod_config, other).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    fx.remove_pod(&pod).await;
    assert!(mounts_under(&fx.daemon.state()).is_empty(), "namespaces unpinned");
    assert!(processes_mentioning("userns-holder").is_empty());
}

#[tokio::test]
async fn bad_user_namespace_requests_are_refused() {
    let fx = Fixture::start().await;
    let cases: Vec<(&str, cri::UserNamespace)> = vec![
        (
            "two ranges",
            cri::UserNamespace {
                mode: cri::NamespaceMode::Pod as i32,
                uids: vec![
                    cri::IdMapping {
                        host_id: 100_000,
                        container_id: 0,
                        length: 10,
                    },
                    cri::IdMapping {
                        host_id: 200_000,
                        container_id: 10,
                        length: 10,
                    },
                ],
                gids: vec![cri::IdMapping {
                    host_id: 100_000,
                    container_id: 0,
                    length: 10,
                }],
            },
        ),
        (
            "container root unmapped",
            cri::UserNamespace {
                mode: cri::NamespaceMode::Pod as i32,
                uids: vec![cri::IdMapping {
                    host_id: 100_000,
                    container_id: 1,
                    length: 10,
                }],
                gids: vec![cri::IdMapping {
                    host_id: 100_000,
                    container_id: 1,
                    length: 10,
                }],
            },
        ),
        (
            "container mode",
            cri::UserNamespace {
                mode: cri::NamespaceMode::Container as i32,
                ..Default::default()
            },
        ),
    ];
    let mut runtime = fx.runtime().await;
    for (what, userns) in cases {
        let mut config = fx.pod("bad-userns");
        config
            .linux
            .as_mut()
            .unwrap()
            .security_context
            .as_mut()
            .unwrap()
            .namespace_options
            .as_mut()
            .unwrap()
            .userns_options = Some(userns);
        let err = runtime
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(config),
                runtime_handler: String::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{what}: {err}");
    }
    // With host networking a pod user namespace is refused too, and nothing is left.
    let mut config = fx.pod("userns-hostnet");
    let options = config.linux.as_mut().unwrap().security_context.as_mut().unwrap();
    options.namespace_options = Some(cri::NamespaceOption {
        network: cri::NamespaceMode::Node as i32,
        ..userns_options(300_000)
    });
    let err = runtime
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(config),
            runtime_handler: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    let pods = runtime
        .list_pod_sandbox(cri::ListPodSandboxRequest::default())
        .await
        .unwrap()
        .into_inner()
        .items;
    assert!(pods.is_empty(), "{pods:?}");
    assert!(mounts_under(&fx.daemon.state()).is_empty());
}
