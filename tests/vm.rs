//! VM pods end to end, through the real CRI socket, with real libvirtd and
//! QEMU (TCG here). One VM boot covers the whole lifecycle, to keep boots few.
//! Skipped (loudly) when libvirtd is not running; `hack/test` starts it.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use podvisor::cri::proto::runtime as cri;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::cri::Fixture;
use common::oci::{Compression, Flavour, ImageConfig, Layer, TestImage};
use common::push::push_image;
use vmimage::initramfs::{INDEX_HTML, READY_MARKER};
use vmimage::{GuestAgent, VmImageSpec, VmImages};

/// Destroys and undefines the domains of the sandboxes a test made, whatever happens.
#[derive(Default)]
struct DomainGuard(std::sync::Mutex<Vec<String>>);

impl DomainGuard {
    fn track(&self, sandbox_id: &str) {
        self.0
            .lock()
            .unwrap()
            .push(podvisor::backend::vm::domain_name(sandbox_id));
    }
}

impl Drop for DomainGuard {
    fn drop(&mut self) {
        for name in self.0.lock().unwrap().iter() {
            let _ = Command::new("virsh").args(["-q", "destroy", name]).output();
            let _ = Command::new("virsh").args(["-q", "undefine", name]).output();
        }
    }
}

fn libvirt_available() -> bool {
    std::path::Path::new("/run/libvirt/libvirt-sock").exists()
}

fn vm_image(image: &vmimage::oci::OciImage) -> TestImage {
    TestImage::new(
        ImageConfig {
            labels: image.labels.clone(),
            cmd: None,
            ..Default::default()
        },
        vec![Layer::new(image.layer_tar.clone(), Compression::Gzip)],
    )
}

async fn vm_fixture() -> (Fixture, String, String) {
    let images = tokio::task::spawn_blocking(|| {
        let spec = VmImageSpec::new(GuestAgent::preferred("/usr/sbin/qemu-ga")).expect("VM image spec");
        VmImages::build(&spec).expect("building the VM test images")
    })
    .await
    .unwrap();
    let fixture = Fixture::start_with_config(Some("[vm]\nhypervisor = \"auto\"\n")).await;
    let disk = vm_image(&images.container_disk_image().unwrap());
    let kernel = vm_image(&images.kernel_boot_image().unwrap());
    let url = fixture.registry.url();
    push_image(&url, "test/vmdisk", "latest", &disk, Flavour::Oci).await;
    push_image(&url, "test/vmkernel", "latest", &kernel, Flavour::Oci).await;
    let host = fixture.registry.host().to_string();
    let disk_ref = format!("{host}/test/vmdisk:latest");
    let kernel_ref = format!("{host}/test/vmkernel:latest");
    fixture.daemon.pull(&disk_ref).await.expect("pull containerDisk");
    fixture.daemon.pull(&kernel_ref).await.expect("pull kernel image");
    (fixture, disk_ref, kernel_ref)
}

/// A VM pod with a hostPort (a free port) for the guest's port 80.
async fn run_vm_pod(fixture: &Fixture, guard: &DomainGuard, name: &str) -> (String, cri::PodSandboxConfig) {
    let mut config = fixture.pod(name);
    config.port_mappings.push(cri::PortMapping {
        protocol: cri::Protocol::Tcp as i32,
        container_port: 80,
        host_port: common::free_port() as i32,
        host_ip: String::new(),
    });
    let id = fixture
        .runtime()
        .await
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: "vm".into(),
        })
        .await
        .expect("RunPodSandbox vm")
        .into_inner()
        .pod_sandbox_id;
    guard.track(&id);
    (id, config)
}

fn vm_container(image: &str) -> cri::ContainerConfig {
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: "vm".into(),
            attempt: 0,
        }),
        image: Some(cri::ImageSpec {
            image: image.into(),
            ..Default::default()
        }),
        log_path: "vm.log".into(),
        linux: Some(cri::LinuxContainerConfig {
            resources: Some(cri::LinuxContainerResources {
                memory_limit_in_bytes: 256 << 20,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

async fn pod_ip(fixture: &Fixture, pod: &str) -> String {
    fixture
        .runtime()
        .await
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: pod.into(),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap()
        .network
        .unwrap()
        .ip
}

async fn http_get(ip: &str) -> Option<String> {
    let connect = tokio::net::TcpStream::connect((ip, 80));
    let mut stream = tokio::time::timeout(Duration::from_secs(2), connect).await.ok()?.ok()?;
    stream.write_all(b"GET / HTTP/1.0\r\n\r\n").await.ok()?;
    let mut body = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut body))
        .await
        .ok()?
        .ok()?;
    Some(body)
}

/// Retries until the VM serves its page on `ip`; `when` names the check in the failure.
async fn wait_http(ip: &str, timeout: Duration, when: &str) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(body) = http_get(ip).await.filter(|b| b.contains(INDEX_HTML)) {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "the VM did not answer HTTP on {ip} within {timeout:?} {when}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_http_at(address: &str, timeout: Duration, when: &str) {
    let deadline = Instant::now() + timeout;
    loop {
        let got = async {
            let mut stream = tokio::net::TcpStream::connect(address).await.ok()?;
            stream.write_all(b"GET / HTTP/1.0\r\n\r\n").await.ok()?;
            let mut body = String::new();
            tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut body))
                .await
                .ok()?
                .ok()?;
            Some(body)
        };
        if tokio::time::timeout(Duration::from_secs(6), got)
            .await
            .ok()
            .flatten()
            .is_some_and(|b| b.contains(INDEX_HTML))
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no answer from {address} within {timeout:?} {when}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Exec (guest agent), attach (serial console) and port-forward (the pod IP)
/// through the streaming server, as kubectl and crictl use them.
async fn streaming_into_the_vm(fixture: &Fixture, pod: &str, id: &str) {
    use common::streaming::*;
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let mut runtime = fixture.runtime().await;

    // Exec over WebSocket v5: stdin whole to the agent, stdout and stderr apart, the exit code.
    let url = runtime
        .exec(cri::ExecRequest {
            container_id: id.into(),
            cmd: ["/bin/sh", "-c", "cat; echo e >&2; exit 4"].map(String::from).to_vec(),
            stdin: true,
            stdout: true,
            stderr: true,
            tty: false,
        })
        .await
        .expect("Exec into a VM")
        .into_inner()
        .url;
    let (mut ws, _) = ws_connect(&url, "v5.channel.k8s.io").await;
    for message in [&b"\x00piped "[..], b"\x00input", &[255, 0]] {
        ws.send(Message::Binary(bytes::Bytes::copy_from_slice(message)))
            .await
            .unwrap();
    }
    let (channels, _) = ws_collect(&mut ws).await;
    assert_eq!(channels[&1], b"piped input");
    assert_eq!(channels[&2], b"e\n");
    assert_eq!(exit_code_of(&channels[&3]), 4);

    // A terminal cannot be had through the agent: refused, clearly.
    let err = runtime
        .exec(cri::ExecRequest {
            container_id: id.into(),
            cmd: vec!["sh".into()],
            stdin: true,
            stdout: true,
            tty: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("guest agent"), "{err:?}");

    // Attach: the serial console's shell answers what is typed.
    let url = runtime
        .attach(cri::AttachRequest {
            container_id: id.into(),
            stdin: true,
            stdout: true,
            tty: true,
            ..Default::default()
        })
        .await
        .expect("Attach to a VM")
        .into_inner()
        .url;
    let (mut ws, _) = ws_connect(&url, "v5.channel.k8s.io").await;
    ws.send(Message::Binary(bytes::Bytes::from_static(
        b"\x00echo attach-$((6*7))\n",
    )))
    .await
    .unwrap();
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !String::from_utf8_lossy(&seen).contains("attach-42") {
        let message = tokio::time::timeout_at(deadline, ws.next())
            .await
            .unwrap_or_else(|_| panic!("no answer on the console: {:?}", String::from_utf8_lossy(&seen)))
            .expect("the attach stream ended")
            .expect("a WebSocket message");
        if let Message::Binary(data) = message
            && data.first() == Some(&1)
        {
            seen.extend_from_slice(&data[1..]);
        }
    }
    let _ = ws.close(None).await;

    // Port-forward over SPDY to the guest's port 80.
    let url = runtime
        .port_forward(cri::PortForwardRequest {
            pod_sandbox_id: pod.into(),
            port: vec![],
        })
        .await
        .expect("PortForward into a VM pod")
        .into_inner()
        .url;
    let (_, session) = spdy_connect(&url, &["portforward.k8s.io"]).await;
    let headers = |kind: &str| {
        podvisor::streaming::spdy::Headers::new()
            .with("streamType", kind)
            .with("port", "80")
            .with("requestID", "0")
    };
    let mut error = session.open_stream(headers("error")).unwrap();
    let data = session.open_stream(headers("data")).unwrap();
    error.shutdown().await.unwrap();
    let (mut data_rd, mut data_wr) = data.into_split();
    data_wr.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    let (page, error) = tokio::join!(read_all(&mut data_rd), read_all(&mut error));
    assert!(
        String::from_utf8_lossy(&page).contains(INDEX_HTML),
        "{} / {}",
        String::from_utf8_lossy(&page),
        String::from_utf8_lossy(&error)
    );
}

fn rss_kib(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn domain_exists(name: &str) -> bool {
    Command::new("virsh")
        .args(["-q", "dominfo", name])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_pod_lifecycle() {
    if !libvirt_available() {
        eprintln!("SKIPPED: libvirtd is not running (hack/test starts it)");
        return;
    }
    let guard = DomainGuard::default();
    let (mut fixture, disk_ref, kernel_ref) = vm_fixture().await;

    // Status: the vm handler and the hypervisor decision.
    let status = fixture
        .runtime()
        .await
        .status(cri::StatusRequest { verbose: true })
        .await
        .unwrap()
        .into_inner();
    assert!(status.runtime_handlers.iter().any(|h| h.name == "vm"));

    let started = Instant::now();
    let (pod, pod_config) = run_vm_pod(&fixture, &guard, "vmpod").await;
    let id = fixture
        .create(&pod, &pod_config, vm_container(&disk_ref))
        .await
        .expect("CreateContainer (containerDisk)");
    fixture.start_container(&id).await.expect("StartContainer");
    let ip = pod_ip(&fixture, &pod).await;
    wait_http(&ip, Duration::from_secs(120), "after its boot").await;
    let to_http = started.elapsed();
    eprintln!("MEASURE RunPodSandbox -> HTTP answer on the pod IP: {to_http:?}");

    let info: serde_json::Value = serde_json::from_str(&status.info["info"]).unwrap();
    let vm_info = &fixture
        .runtime()
        .await
        .status(cri::StatusRequest { verbose: true })
        .await
        .unwrap()
        .into_inner()
        .info["info"];
    let vm_info: serde_json::Value = serde_json::from_str(vm_info).unwrap();
    eprintln!("Status vm info: {} (first: {})", vm_info["vm"], info["vm"]);
    assert!(["kvm", "tcg"].contains(&vm_info["vm"]["accel"].as_str().unwrap_or_default()));

    // The console in the CRI log.
    let status = fixture.status(&id).await;
    assert_eq!(status.state, cri::ContainerState::ContainerRunning as i32);
    let log_path = status.log_path.clone();
    common::wait_for(Duration::from_secs(60), "the ready marker in the CRI log", || {
        std::fs::read_to_string(&log_path).is_ok_and(|l| l.contains(READY_MARKER))
    })
    .await;
    let log = std::fs::read_to_string(&log_path).unwrap();
    let line = log.lines().find(|l| l.contains(READY_MARKER)).unwrap();
    let fields: Vec<&str> = line.splitn(4, ' ').collect();
    assert!(
        fields[1] == "stdout" && (fields[2] == "F" || fields[2] == "P"),
        "{line}"
    );
    assert!(
        line.contains(&format!("ip={ip}")),
        "the VM got the pod IP by DHCP: {line}"
    );

    // Memory beyond the guest's RAM.
    let domain = podvisor::backend::vm::domain_name(&pod);
    let qemu_pid = std::fs::read_to_string(format!("/run/libvirt/qemu/{domain}.pid")).unwrap_or_default();
    let qemu_rss = rss_kib(qemu_pid.trim());
    let helper = common::cri::processes_mentioning("vm-helper").into_iter().find(|pid| {
        std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| c.contains(&fixture.daemon.state().display().to_string()))
    });
    let helper_rss = helper.map(|p| rss_kib(&p.to_string())).unwrap_or(0);
    eprintln!(
        "MEASURE qemu RSS {} MiB (guest RAM 256 MiB), helper RSS {} MiB",
        qemu_rss / 1024,
        helper_rss / 1024
    );

    // ExecSync through the guest agent.
    let out = fixture.exec(&id, &["/bin/sh", "-c", "echo hello-exec; exit 3"]).await;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello-exec\n");
    assert_eq!(out.exit_code, 3);

    // The guest's broadcasts come straight back into the pod from the node's
    // bridge (its pod ports are in hairpin mode). The pod's bridge must not
    // take them to mean that the VM's MAC is behind eth0: the gateway's ARP
    // replies, and then the node's TCP, would be dropped there until the
    // node's neighbour entry timed out (tens of seconds).
    let out = fixture
        .exec(
            &id,
            &[
                "/bin/sh",
                "-c",
                "set -- $(ip -4 route show default); arping -c 3 -w 6 -I eth0 \"$3\"",
            ],
        )
        .await;
    assert_eq!(
        out.exit_code,
        0,
        "the guest's ARP requests to its gateway got no reply: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    wait_http(&ip, Duration::from_secs(10), "after the guest's broadcasts").await;

    streaming_into_the_vm(&fixture, &pod, &id).await;

    // The hostPort reaches the guest's HTTP server.
    let host_port = pod_config.port_mappings[0].host_port;
    wait_http_at(
        &format!("127.0.0.1:{host_port}"),
        Duration::from_secs(20),
        "through its hostPort",
    )
    .await;

    // A container pod and the VM pod reach each other by pod IP.
    let client_config = fixture.pod("vmclient");
    let client_pod = fixture.run_pod(client_config.clone()).await;
    let client = fixture
        .create(
            &client_pod,
            &client_config,
            fixture.container(
                "web",
                "mkdir -p /www && echo hello-from-the-container > /www/index.html && exec httpd -f -p 8080 -h /www",
            ),
        )
        .await
        .unwrap();
    fixture.start_container(&client).await.unwrap();
    let request = format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {ip} 80");
    let out = fixture.exec(&client, &["sh", "-c", &request]).await;
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(INDEX_HTML),
        "container pod → VM: {out:?}"
    );
    let client_ip = pod_ip(&fixture, &client_pod).await;
    let request = format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {client_ip} 8080");
    let out = fixture.exec(&id, &["/bin/sh", "-c", &request]).await;
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("hello-from-the-container"),
        "VM → container pod: {out:?}"
    );
    fixture.remove_pod(&client_pod).await;

    // Stats from libvirt: CPU time, QEMU's memory, the root overlay.
    let stats = fixture
        .runtime()
        .await
        .container_stats(cri::ContainerStatsRequest {
            container_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .stats
        .unwrap();
    let value = |v: Option<cri::UInt64Value>| v.map(|v| v.value).unwrap_or(0);
    assert!(value(stats.cpu.unwrap().usage_core_nano_seconds) > 0);
    assert!(value(stats.memory.unwrap().working_set_bytes) > 64 << 20);
    assert!(value(stats.writable_layer.unwrap().used_bytes) > 0);
    let pod_stats = fixture
        .runtime()
        .await
        .pod_sandbox_stats(cri::PodSandboxStatsRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .stats
        .unwrap()
        .linux
        .unwrap();
    assert!(value(pod_stats.cpu.unwrap().usage_core_nano_seconds) > 0);
    assert_eq!(pod_stats.containers.len(), 1);

    // One container per VM pod; images that are not VM images.
    let err = fixture
        .create(&pod, &pod_config, {
            let mut c = vm_container(&disk_ref);
            c.metadata.as_mut().unwrap().name = "second".into();
            c
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    let (pod2, pod2_config) = run_vm_pod(&fixture, &guard, "notvm").await;
    let err = fixture
        .create(&pod2, &pod2_config, vm_container(&fixture.image))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("not a VM image"), "{err:?}");
    fixture.remove_pod(&pod2).await;

    // kill -9 of the daemon: the VM keeps running and is reported running.
    fixture.daemon.kill();
    wait_http(&ip, Duration::from_secs(10), "after kill -9 of the daemon").await;
    fixture.daemon.restart().await;
    let status = fixture.status(&id).await;
    assert_eq!(status.state, cri::ContainerState::ContainerRunning as i32);
    let out = fixture.exec(&id, &["/bin/sh", "-c", "echo again"]).await;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "again\n");
    wait_http(&ip, Duration::from_secs(10), "after the daemon's restart").await;

    // Graceful stop: ACPI, the guest powers off, exit code 0.
    fixture
        .runtime()
        .await
        .stop_container(cri::StopContainerRequest {
            container_id: id.clone(),
            timeout: 60,
        })
        .await
        .expect("StopContainer");
    let status = fixture.status(&id).await;
    assert_eq!(status.state, cri::ContainerState::ContainerExited as i32);
    assert_eq!(
        (status.exit_code, status.reason.as_str()),
        (0, "Completed"),
        "{status:?}"
    );

    // Remove: no domain, disk, ISO or tap left.
    let vm_dir = fixture.daemon.state().join("vm").join(&id[..12]);
    assert!(vm_dir.join("root.qcow2").exists() && vm_dir.join("cidata.iso").exists());
    fixture.remove_pod(&pod).await;
    assert!(!domain_exists(&domain), "domain {domain} left behind");
    assert!(!vm_dir.exists(), "{} left behind", vm_dir.display());
    let tap = podvisor::backend::vm::net::tap_name(&pod);
    assert!(!std::path::Path::new("/sys/class/net").join(&tap).exists());
    let listed = fixture
        .runtime()
        .await
        .list_containers(cri::ListContainersRequest { filter: None })
        .await
        .unwrap()
        .into_inner()
        .containers;
    assert!(listed.is_empty());

    // A direct-kernel-boot image: vmlinuz and initrd from the image, the command line from the annotation.
    let mut kernel_pod_config = fixture.pod("vmkernel");
    kernel_pod_config.annotations.insert(
        "vm.podvisor.io/kernel-cmdline".into(),
        "console=ttyS0 podvisor.test=kernel-boot".into(),
    );
    let kernel_pod = fixture
        .runtime()
        .await
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(kernel_pod_config.clone()),
            runtime_handler: "vm".into(),
        })
        .await
        .expect("RunPodSandbox vm (kernel boot)")
        .into_inner()
        .pod_sandbox_id;
    guard.track(&kernel_pod);
    let kernel_vm = fixture
        .create(&kernel_pod, &kernel_pod_config, vm_container(&kernel_ref))
        .await
        .expect("CreateContainer (direct kernel boot)");
    fixture
        .start_container(&kernel_vm)
        .await
        .expect("StartContainer (direct kernel boot)");
    let kernel_ip = pod_ip(&fixture, &kernel_pod).await;
    wait_http(&kernel_ip, Duration::from_secs(120), "after a direct kernel boot").await;
    let log_path = fixture.status(&kernel_vm).await.log_path;
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains(vmimage::initramfs::CMDLINE_MARKER) && l.contains("podvisor.test=kernel-boot")),
        "the annotation's command line did not reach the kernel:\n{log}"
    );
    fixture.remove_pod(&kernel_pod).await;
    assert!(!domain_exists(&podvisor::backend::vm::domain_name(&kernel_pod)));
}
