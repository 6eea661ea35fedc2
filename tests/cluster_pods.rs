//! The node agent through `podvisor up` and the real `kubectl`: pods bound to
//! the node run as CRI sandboxes and containers of the in-process daemon, with
//! their status, restarts, probes, volumes and deletion observable from outside.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::cluster::Cluster;
use common::oci::{Flavour, TestImage};
use common::push::push_image;
use common::registry::Registry;
use podvisor::cri::proto::runtime as cri;

const NODE: &str = "testnode";
const WAIT: Duration = Duration::from_secs(40);

/// A cluster whose node is `testnode`, a registry with busybox, and a host
/// directory for pods to leave files in.
struct Env {
    c: Cluster,
    image: String,
    host: PathBuf,
    _registry: Registry,
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

impl Env {
    fn start() -> Env {
        let registry = runtime().block_on(async {
            let registry = Registry::start().await;
            for tag in ["latest", "v2"] {
                push_image(
                    &registry.url(),
                    "test/busybox",
                    tag,
                    &TestImage::busybox(),
                    Flavour::Oci,
                )
                .await;
            }
            registry
        });
        let image = format!("{}/test/busybox:latest", registry.host());
        let c = Cluster::start_with(&["--node-name", NODE], "");
        let host = c.dir.path().join("host");
        std::fs::create_dir_all(&host).unwrap();
        Env {
            c,
            image,
            host,
            _registry: registry,
        }
    }

    /// Applies a manifest with `$IMAGE`, `$HOST` and `$NODE` replaced.
    fn apply(&self, name: &str, yaml: &str) {
        let text = yaml
            .replace("$IMAGE", &self.image)
            .replace("$HOST", &self.host.display().to_string())
            .replace("$NODE", NODE);
        let file = self.c.file(&format!("{name}.yaml"), &text);
        self.c.ok(&["apply", "-f", &file]);
    }

    fn jsonpath(&self, pod: &str, path: &str) -> String {
        self.c.ok(&["get", "pod", pod, "-o", &format!("jsonpath={path}")])
    }

    fn wait_jsonpath(&self, pod: &str, path: &str, cond: impl Fn(&str) -> bool) -> String {
        let args = ["get", "pod", pod, "-o", &format!("jsonpath={path}")];
        self.c.wait_output(&args, WAIT, cond)
    }

    fn wait_file(&self, name: &str, cond: impl Fn(&str) -> bool) -> String {
        let path = self.host.join(name);
        let deadline = Instant::now() + WAIT;
        loop {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            if cond(&text) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "{} never matched; it holds {text:?}\n{}",
                path.display(),
                self.c.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn sandboxes(&self) -> Vec<cri::PodSandbox> {
        let endpoint = self.c.endpoint();
        runtime().block_on(async move {
            let channel = podvisor::cri::socket::connect(&endpoint).await.unwrap();
            cri::runtime_service_client::RuntimeServiceClient::new(channel)
                .list_pod_sandbox(cri::ListPodSandboxRequest::default())
                .await
                .unwrap()
                .into_inner()
                .items
        })
    }

    fn pod_logs(&self) -> PathBuf {
        self.c.dir.path().join("pod-logs")
    }
}

/// The text of a CRI log file without its `<time> <stream> <tag>` prefixes.
fn log_text(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.splitn(4, ' ').nth(3))
        .collect::<Vec<_>>()
        .join("\n")
}

const CONFIG: &str = "apiVersion: v1
kind: ConfigMap
metadata: {name: settings}
data: {greeting: hello, mode: fast, file.txt: from-configmap}
---
apiVersion: v1
kind: Secret
metadata: {name: creds}
stringData: {password: s3cret}
";

const ENV_POD: &str = "apiVersion: v1
kind: Pod
metadata: {name: envpod, labels: {app: web}}
spec:
  nodeName: $NODE
  containers:
  - name: main
    image: $IMAGE
    imagePullPolicy: IfNotPresent
    command: [sh, -c, 'env | sort > /host/env.txt; cat /cfg/file.txt > /host/cfg.txt; cat /info/labels > /host/labels.txt; echo $(GREETING) logged; trap \"exit 0\" TERM; while true; do sleep 1; done']
    env:
    - {name: LITERAL, value: plain}
    - {name: GREETING, valueFrom: {configMapKeyRef: {name: settings, key: greeting}}}
    - {name: PASSWORD, valueFrom: {secretKeyRef: {name: creds, key: password}}}
    - {name: POD_NAME, valueFrom: {fieldRef: {fieldPath: metadata.name}}}
    - {name: POD_NAMESPACE, valueFrom: {fieldRef: {fieldPath: metadata.namespace}}}
    - {name: POD_UID, valueFrom: {fieldRef: {fieldPath: metadata.uid}}}
    - {name: POD_IP, valueFrom: {fieldRef: {fieldPath: status.podIP}}}
    - {name: NODE_NAME, valueFrom: {fieldRef: {fieldPath: spec.nodeName}}}
    - {name: APP, valueFrom: {fieldRef: {fieldPath: \"metadata.labels['app']\"}}}
    - {name: MEM_MI, valueFrom: {resourceFieldRef: {resource: limits.memory, divisor: 1Mi}}}
    - {name: COMPOSED, value: '$(LITERAL)-$(APP)'}
    envFrom:
    - {prefix: CM_, configMapRef: {name: settings}}
    resources: {limits: {memory: 64Mi, cpu: 500m}}
    volumeMounts:
    - {name: host, mountPath: /host}
    - {name: cfg, mountPath: /cfg}
    - {name: info, mountPath: /info}
  volumes:
  - {name: host, hostPath: {path: $HOST, type: Directory}}
  - {name: cfg, configMap: {name: settings}}
  - name: info
    downwardAPI: {items: [{path: labels, fieldRef: {fieldPath: metadata.labels}}]}
";

#[test]
fn pod_runs_with_env_volumes_and_status() {
    let env = Env::start();
    env.apply("config", CONFIG);
    let started = Instant::now();
    env.apply("pod", ENV_POD);
    env.wait_jsonpath("envpod", "{.status.phase}", |p| p == "Running");
    let to_running = started.elapsed();
    env.wait_jsonpath("envpod", "{.status.conditions[?(@.type==\"Ready\")].status}", |s| {
        s == "True"
    });
    println!("apply -> Running: {} ms", to_running.as_millis());

    let pod_ip = env.jsonpath("envpod", "{.status.podIP}");
    assert!(pod_ip.parse::<std::net::Ipv4Addr>().is_ok(), "pod IP {pod_ip:?}");
    assert!(!env.jsonpath("envpod", "{.status.hostIP}").is_empty());
    assert!(!env.jsonpath("envpod", "{.status.startTime}").is_empty());
    assert_eq!(env.jsonpath("envpod", "{.status.qosClass}"), "Guaranteed");
    let id = env.jsonpath("envpod", "{.status.containerStatuses[0].containerID}");
    assert!(id.starts_with("podvisor://"), "{id}");
    assert_eq!(env.jsonpath("envpod", "{.status.containerStatuses[0].ready}"), "true");
    assert!(
        !env.jsonpath("envpod", "{.status.containerStatuses[0].imageID}")
            .is_empty()
    );
    let uid = env.jsonpath("envpod", "{.metadata.uid}");

    let vars = env.wait_file("env.txt", |t| t.contains("PASSWORD"));
    for expected in [
        "LITERAL=plain".to_string(),
        "GREETING=hello".into(),
        "PASSWORD=s3cret".into(),
        "POD_NAME=envpod".into(),
        "POD_NAMESPACE=default".into(),
        format!("POD_UID={uid}"),
        format!("POD_IP={pod_ip}"),
        format!("NODE_NAME={NODE}"),
        "APP=web".into(),
        "MEM_MI=64".into(),
        "COMPOSED=plain-web".into(),
        "CM_mode=fast".into(),
        "CM_greeting=hello".into(),
    ] {
        assert!(vars.lines().any(|l| l == expected), "{expected} missing from:\n{vars}");
    }
    assert_eq!(env.wait_file("cfg.txt", |t| !t.is_empty()), "from-configmap");
    assert_eq!(env.wait_file("labels.txt", |t| !t.is_empty()), "app=\"web\"");

    let log = env.pod_logs().join(format!("default_envpod_{uid}/main/0.log"));
    let deadline = Instant::now() + WAIT;
    while !log_text(&log).contains("hello logged") {
        assert!(Instant::now() < deadline, "log {}: {:?}", log.display(), log_text(&log));
        std::thread::sleep(Duration::from_millis(50));
    }
    let events = env
        .c
        .ok(&["get", "events", "--field-selector", "involvedObject.name=envpod"]);
    for reason in ["Pulled", "Created", "Started"] {
        assert!(events.contains(reason), "{reason} missing:\n{events}");
    }
    // The node registered itself and keeps a lease.
    let node = env.c.ok(&["get", "node", NODE, "-o", "jsonpath={.status.conditions[?(@.type==\"Ready\")].status} {.status.nodeInfo.containerRuntimeVersion} {.status.nodeInfo.kubeletVersion} {.status.capacity.pods}"]);
    assert!(
        node.starts_with("True podvisor://") && node.contains(" v1.32") && node.ends_with(" 110"),
        "{node}"
    );
    let labels = env.c.ok(&["get", "node", NODE, "--show-labels"]);
    assert!(
        labels.contains("kubernetes.io/os=linux") && labels.contains(&format!("kubernetes.io/hostname={NODE}")),
        "{labels}"
    );
    let lease = env.c.ok(&[
        "get",
        "lease",
        NODE,
        "-n",
        "kube-node-lease",
        "-o",
        "jsonpath={.spec.holderIdentity}",
    ]);
    assert_eq!(lease, NODE);
}

const INIT_POD: &str = "apiVersion: v1
kind: Pod
metadata: {name: initpod}
spec:
  nodeName: $NODE
  initContainers:
  - {name: first, image: $IMAGE, imagePullPolicy: IfNotPresent, command: [sh, -c, 'echo first >> /shared/order'], volumeMounts: [{name: shared, mountPath: /shared}]}
  - {name: second, image: $IMAGE, imagePullPolicy: IfNotPresent, command: [sh, -c, 'sleep 1; echo second >> /shared/order'], volumeMounts: [{name: shared, mountPath: /shared}]}
  containers:
  - name: writer
    image: $IMAGE
    imagePullPolicy: IfNotPresent
    command: [sh, -c, 'echo from-writer >> /shared/order; trap \"exit 0\" TERM; while true; do sleep 1; done']
    volumeMounts: [{name: shared, mountPath: /shared}]
  - name: reader
    image: $IMAGE
    imagePullPolicy: IfNotPresent
    command: [sh, -c, 'until grep -q from-writer /shared/order; do sleep 0.1; done; cp /shared/order /host/order; trap \"exit 0\" TERM; while true; do sleep 1; done']
    volumeMounts: [{name: shared, mountPath: /shared}, {name: host, mountPath: /host}]
  volumes:
  - {name: shared, emptyDir: {medium: Memory, sizeLimit: 16Mi}}
  - {name: host, hostPath: {path: $HOST}}
";

#[test]
fn init_containers_run_in_order_and_share_empty_dir() {
    let env = Env::start();
    env.apply("pod", INIT_POD);
    let init = env.wait_jsonpath(
        "initpod",
        "{.status.conditions[?(@.type==\"Initialized\")].status}",
        |s| !s.is_empty(),
    );
    if init == "False" {
        assert_eq!(env.jsonpath("initpod", "{.status.phase}"), "Pending");
    }
    env.wait_jsonpath("initpod", "{.status.phase}", |p| p == "Running");
    assert_eq!(
        env.wait_file("order", |t| t.contains("from-writer")),
        "first\nsecond\nfrom-writer\n"
    );
    let reasons = env.jsonpath("initpod", "{.status.initContainerStatuses[*].state.terminated.reason}");
    assert_eq!(reasons, "Completed Completed");
    assert_eq!(
        env.jsonpath("initpod", "{.status.conditions[?(@.type==\"Initialized\")].status}"),
        "True"
    );
}

const EXIT_POD: &str = "apiVersion: v1
kind: Pod
metadata: {name: NAME}
spec:
  nodeName: $NODE
  restartPolicy: Never
  containers:
  - {name: main, image: $IMAGE, imagePullPolicy: IfNotPresent, command: [sh, -c, 'printf bye > /dev/termination-log; exit CODE']}
";

#[test]
fn restart_policy_never_ends_in_succeeded_or_failed() {
    let env = Env::start();
    env.apply("bad", &EXIT_POD.replace("NAME", "bad").replace("CODE", "3"));
    // Left to the scheduler: bound after creation, the agent's watch picks it up.
    let unbound = EXIT_POD
        .replace("NAME", "ok")
        .replace("CODE", "0")
        .replace("  nodeName: $NODE\n", "");
    env.apply("ok", &unbound);
    env.wait_jsonpath("ok", "{.spec.nodeName}", |n| n == NODE);
    env.wait_jsonpath("ok", "{.status.phase}", |p| p == "Succeeded");
    env.wait_jsonpath("bad", "{.status.phase}", |p| p == "Failed");
    let state = "{.status.containerStatuses[0].state.terminated.exitCode} {.status.containerStatuses[0].state.terminated.reason} {.status.containerStatuses[0].state.terminated.message} {.status.containerStatuses[0].restartCount}";
    assert_eq!(env.jsonpath("bad", state), "3 Error bye 0");
    assert_eq!(env.jsonpath("ok", state), "0 Completed bye 0");
    assert_eq!(
        env.jsonpath("ok", "{.status.conditions[?(@.type==\"Ready\")].reason}"),
        "PodCompleted"
    );
}

const CRASH_POD: &str = "apiVersion: v1
kind: Pod
metadata: {name: crasher}
spec:
  nodeName: $NODE
  containers:
  - {name: main, image: $IMAGE, imagePullPolicy: IfNotPresent, command: [sh, -c, 'echo crashing; exit 2']}
";

#[test]
fn crashing_container_backs_off() {
    let env = Env::start();
    env.apply("pod", CRASH_POD);
    let reason = "{.status.containerStatuses[0].state.waiting.reason}";
    env.wait_jsonpath("crasher", reason, |r| r == "CrashLoopBackOff");
    let status = env.jsonpath(
        "crasher",
        "{.status.phase} {.status.containerStatuses[0].lastState.terminated.exitCode} {.status.containerStatuses[0].state.waiting.message}",
    );
    assert!(
        status.starts_with("Running 2 back-off 10s restarting failed container=main"),
        "{status}"
    );
    // After the 10 s back-off it restarts again; the count keeps growing.
    env.wait_jsonpath("crasher", "{.status.containerStatuses[0].restartCount}", |n| {
        n.parse::<u32>().unwrap_or(0) >= 2
    });
    let events = env
        .c
        .ok(&["get", "events", "--field-selector", "involvedObject.name=crasher"]);
    assert!(events.contains("BackOff"), "{events}");
}

const PROBE_POD: &str = "apiVersion: v1
kind: Pod
metadata: {name: probed}
spec:
  nodeName: $NODE
  containers:
  - name: live
    image: $IMAGE
    imagePullPolicy: IfNotPresent
    command: [sh, -c, 'touch /tmp/healthy; sleep 2; rm /tmp/healthy; trap \"exit 0\" TERM; while true; do sleep 1; done']
    livenessProbe: {exec: {command: [cat, /tmp/healthy]}, periodSeconds: 1, failureThreshold: 1}
  - name: web
    image: $IMAGE
    imagePullPolicy: IfNotPresent
    command: [sh, -c, 'mkdir -p /www; echo ok > /www/index.html; exec httpd -f -p 8080 -h /www']
    ports: [{name: http, containerPort: 8080}]
    readinessProbe: {httpGet: {path: /index.html, port: http}, periodSeconds: 1}
  - name: closed
    image: $IMAGE
    imagePullPolicy: IfNotPresent
    command: [sh, -c, 'trap \"exit 0\" TERM; while true; do sleep 1; done']
    readinessProbe: {tcpSocket: {port: 9999}, periodSeconds: 1, failureThreshold: 1}
";

#[test]
fn probes_restart_and_gate_readiness() {
    let env = Env::start();
    env.apply("pod", PROBE_POD);
    env.wait_jsonpath(
        "probed",
        "{.status.containerStatuses[?(@.name==\"live\")].restartCount}",
        |n| n.parse::<u32>().unwrap_or(0) >= 1,
    );
    env.wait_jsonpath("probed", "{.status.containerStatuses[?(@.name==\"web\")].ready}", |r| {
        r == "true"
    });
    let status = env.jsonpath(
        "probed",
        "{.status.phase} {.status.containerStatuses[?(@.name==\"closed\")].ready} {.status.conditions[?(@.type==\"Ready\")].status}",
    );
    assert_eq!(status, "Running false False");
    let events = env
        .c
        .ok(&["get", "events", "--field-selector", "involvedObject.name=probed"]);
    assert!(
        events.contains("Liveness probe failed") && events.contains("Readiness probe failed"),
        "{events}"
    );
    assert!(events.contains("failed liveness probe, will be restarted"), "{events}");
}

const GRACEFUL_POD: &str = "apiVersion: v1
kind: Pod
metadata: {name: graceful}
spec:
  nodeName: $NODE
  restartPolicy: Never
  terminationGracePeriodSeconds: 20
  containers:
  - name: main
    image: $IMAGE
    imagePullPolicy: IfNotPresent
    command: [sh, -c, 'trap \"echo term > /host/term; exit 0\" TERM; while true; do sleep 0.2; done']
    lifecycle:
      postStart: {exec: {command: [sh, -c, 'echo started > /host/poststart']}}
      preStop: {exec: {command: [sh, -c, 'echo stopping > /host/prestop']}}
    volumeMounts: [{name: host, mountPath: /host}]
  volumes:
  - {name: host, hostPath: {path: $HOST}}
";

#[test]
fn graceful_delete_runs_hooks_and_removes_the_sandbox() {
    let env = Env::start();
    env.apply("pod", GRACEFUL_POD);
    env.wait_jsonpath("graceful", "{.status.phase}", |p| p == "Running");
    assert_eq!(env.wait_file("poststart", |t| !t.is_empty()), "started\n");
    assert_eq!(env.sandboxes().len(), 1);
    // A new image replaces the container (restartPolicy does not matter for that).
    let v2 = env.image.replace(":latest", ":v2");
    env.c.ok(&["set", "image", "pod/graceful", &format!("main={v2}")]);
    let replaced = "{.status.containerStatuses[0].restartCount} {.status.containerStatuses[0].state.running.startedAt}";
    env.wait_jsonpath("graceful", replaced, |s| s.starts_with("1 ") && s.len() > 2);
    assert_eq!(std::fs::read_to_string(env.host.join("prestop")).unwrap(), "stopping\n");
    let uid = env.jsonpath("graceful", "{.metadata.uid}");
    let started = Instant::now();
    env.c.ok(&["delete", "pod", "graceful", "--timeout=30s"]);
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "delete took {:?}",
        started.elapsed()
    );
    assert_eq!(std::fs::read_to_string(env.host.join("prestop")).unwrap(), "stopping\n");
    assert_eq!(std::fs::read_to_string(env.host.join("term")).unwrap(), "term\n");
    assert!(env.c.fails(&["get", "pod", "graceful"]).contains("NotFound"));
    assert!(env.sandboxes().is_empty(), "{:?}", env.sandboxes());
    assert!(!env.pod_logs().join(format!("default_graceful_{uid}")).exists());
    assert!(!env.c.data_dir().join("agent/pods").join(&uid).exists());
}

const LONG_POD: &str = "apiVersion: v1
kind: Pod
metadata: {name: longrun}
spec:
  nodeName: $NODE
  containers:
  - name: main
    image: $IMAGE
    imagePullPolicy: IfNotPresent
    command: [sh, -c, 'trap \"exit 0\" TERM; while true; do sleep 1; done']
    volumeMounts: [{name: secret, mountPath: /secret}]
  volumes:
  - {name: secret, secret: {secretName: creds}}
";

#[test]
fn pods_survive_kill_9_of_the_cluster() {
    let mut env = Env::start();
    env.apply("config", CONFIG);
    env.apply("pod", LONG_POD);
    env.wait_jsonpath("longrun", "{.status.conditions[?(@.type==\"Ready\")].status}", |s| {
        s == "True"
    });
    let id = env.jsonpath("longrun", "{.status.containerStatuses[0].containerID}");
    let started = env.jsonpath("longrun", "{.status.containerStatuses[0].state.running.startedAt}");
    env.c.restart();
    // The agent adopts the running container: same ID, no restart, still Ready.
    env.wait_jsonpath("longrun", "{.status.conditions[?(@.type==\"Ready\")].status}", |s| {
        s == "True"
    });
    std::thread::sleep(Duration::from_secs(2));
    let after = "{.status.phase} {.status.containerStatuses[0].containerID} {.status.containerStatuses[0].restartCount} {.status.containerStatuses[0].state.running.startedAt}";
    assert_eq!(env.jsonpath("longrun", after), format!("Running {id} 0 {started}"));
    assert_eq!(env.sandboxes().len(), 1);
    let nodes = env.c.ok(&["get", "nodes", "-o", "name"]);
    assert_eq!(nodes.trim(), format!("node/{NODE}"));
    // A force-deleted pod vanishes from the store at once; the agent still tears it down.
    env.c.ok(&["delete", "pod", "longrun", "--grace-period=0", "--force"]);
    let deadline = Instant::now() + WAIT;
    while !env.sandboxes().is_empty() {
        assert!(Instant::now() < deadline, "sandbox left behind:\n{}", env.c.log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn down_stops_and_removes_pods() {
    let mut env = Env::start();
    env.apply("config", CONFIG);
    env.apply("pod", LONG_POD);
    env.wait_jsonpath("longrun", "{.status.phase}", |p| p == "Running");
    // A second pod once the image is present: how fast apply reaches Running.
    let started = Instant::now();
    env.apply(
        "quick",
        &EXIT_POD
            .replace("NAME", "quick")
            .replace("exit CODE", "trap \"exit 0\" TERM; while true; do sleep 1; done"),
    );
    env.wait_jsonpath("quick", "{.status.phase}", |p| p == "Running");
    println!("apply -> Running (image present): {} ms", started.elapsed().as_millis());
    let monitors = format!("monitor {}", env.c.dir.path().display());
    assert!(!common::cri::processes_mentioning(&monitors).is_empty());
    let down = std::process::Command::new(env!("CARGO_BIN_EXE_podvisor"))
        .arg("down")
        .arg("--data-dir")
        .arg(env.c.data_dir())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The cluster process is this test's child: reap it so that `down` sees it gone.
    let status = env.c.wait_exit(WAIT);
    assert!(status.is_some_and(|s| s.success()), "{status:?}\n{}", env.c.log());
    let out = down.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(
        common::cri::processes_mentioning(&monitors).is_empty(),
        "{}",
        env.c.log()
    );
    assert!(common::cri::mounts_under(&env.c.data_dir()).is_empty());
    assert!(
        !env.c.data_dir().join("agent/pods").exists()
            || std::fs::read_dir(env.c.data_dir().join("agent/pods"))
                .unwrap()
                .next()
                .is_none()
    );
}

/// Measurement, not a check: RSS and CPU of the whole `podvisor up` process
/// (API server, store, CRI daemon and agent) idling with three running pods.
#[test]
#[ignore]
fn idle_footprint() {
    let env = Env::start();
    for name in ["idle-a", "idle-b", "idle-c"] {
        let pod = EXIT_POD
            .replace("NAME", name)
            .replace("exit CODE", "trap \"exit 0\" TERM; while true; do sleep 1; done");
        env.apply(name, &pod);
    }
    for name in ["idle-a", "idle-b", "idle-c"] {
        env.wait_jsonpath(name, "{.status.phase}", |p| p == "Running");
    }
    let pid = env.c.pid();
    let cpu_ticks = || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    };
    std::thread::sleep(Duration::from_secs(10));
    let before = cpu_ticks();
    std::thread::sleep(Duration::from_secs(60));
    let ticks = cpu_ticks() - before;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss = status.lines().find(|l| l.starts_with("VmRSS")).unwrap();
    println!("idle with 3 pods: {rss}; CPU {} ms over 60 s", ticks * 10);
}

/// The agent drives another runtime's CRI socket (`--runtime-endpoint`): here
/// a separate `podvisor daemon`, standing in for containerd or CRI-O.
#[test]
fn agent_drives_an_external_runtime() {
    let rt = runtime();
    let (registry, daemon) = rt.block_on(async {
        let registry = Registry::start().await;
        push_image(
            &registry.url(),
            "test/busybox",
            "latest",
            &TestImage::busybox(),
            Flavour::Oci,
        )
        .await;
        (registry, common::daemon::Daemon::start().await)
    });
    let c = Cluster::start_with(&["--runtime-endpoint", &daemon.endpoint(), "--node-name", NODE], "");
    let pod = EXIT_POD
        .replace("NAME", "external")
        .replace(
            "exit CODE",
            "echo from-external; trap \"exit 0\" TERM; while true; do sleep 1; done",
        )
        .replace("$IMAGE", &format!("{}/test/busybox:latest", registry.host()))
        .replace("$NODE", NODE);
    let file = c.file("external.yaml", &pod);
    c.ok(&["apply", "-f", &file]);
    c.wait_output(
        &["get", "pod", "external", "-o", "jsonpath={.status.phase}"],
        WAIT,
        |p| p == "Running",
    );
    // The sandbox lives in the external daemon, none in the cluster's own socket.
    let external = |endpoint: String| {
        runtime().block_on(async move {
            let channel = podvisor::cri::socket::connect(&endpoint).await.unwrap();
            cri::runtime_service_client::RuntimeServiceClient::new(channel)
                .list_pod_sandbox(cri::ListPodSandboxRequest::default())
                .await
                .unwrap()
                .into_inner()
                .items
        })
    };
    let sandboxes = external(daemon.endpoint());
    assert_eq!(sandboxes.len(), 1);
    assert_eq!(sandboxes[0].metadata.as_ref().unwrap().name, "external");
    assert!(!c.dir.path().join("cri.sock").exists(), "up started its own daemon");
    c.wait_output(&["logs", "external"], WAIT, |l| l.contains("from-external"));
    assert_eq!(c.ok(&["exec", "external", "--", "cat", "/proc/1/comm"]).trim(), "sh");
    c.ok(&["delete", "pod", "external", "--wait=true", "--timeout=60s"]);
    assert!(external(daemon.endpoint()).is_empty(), "{}", c.log());
}

/// A chatty container's log is rotated: renamed, reopened by the runtime, old
/// files pruned to the limit, and `kubectl logs` keeps reading the new file.
#[test]
fn container_logs_rotate() {
    let registry = runtime().block_on(async {
        let registry = Registry::start().await;
        push_image(
            &registry.url(),
            "test/busybox",
            "latest",
            &TestImage::busybox(),
            Flavour::Oci,
        )
        .await;
        registry
    });
    let c = Cluster::start_with(
        &[
            "--node-name",
            NODE,
            "--container-log-max-size",
            "32Ki",
            "--container-log-max-files",
            "3",
            "--container-log-monitor-interval",
            "300ms",
        ],
        "",
    );
    let pod = EXIT_POD
        .replace("NAME", "chatty")
        .replace(
            "exit CODE",
            "i=0; while true; do i=$((i+1)); yes round-$i | head -c 8000; sleep 0.1; done",
        )
        .replace("$IMAGE", &format!("{}/test/busybox:latest", registry.host()))
        .replace("$NODE", NODE);
    let file = c.file("chatty.yaml", &pod);
    c.ok(&["apply", "-f", &file]);
    c.wait_output(&["get", "pod", "chatty", "-o", "jsonpath={.status.phase}"], WAIT, |p| {
        p == "Running"
    });
    let dir = std::fs::read_dir(c.dir.path().join("pod-logs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().contains("_chatty_"))
        .expect("the pod's log directory")
        .join("main");
    let rotated = |dir: &Path| -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with("0.log."))
            .collect();
        names.sort();
        names
    };
    // ~80 KB/s against a 32 KiB limit: several rotations within a few seconds.
    let deadline = Instant::now() + WAIT;
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < 4 {
        assert!(Instant::now() < deadline, "only rotated {seen:?}:\n{}", c.log());
        let now = rotated(&dir);
        assert!(now.len() <= 2, "more than max-files - 1 rotated files kept: {now:?}");
        seen.extend(now);
        std::thread::sleep(Duration::from_millis(100));
    }
    // The runtime writes to the reopened file: it holds rounds newer than any rotated one.
    let round = |text: &str| -> u64 {
        text.lines()
            .filter_map(|l| l.rsplit("round-").next()?.trim().parse().ok())
            .max()
            .unwrap_or(0)
    };
    let newest_rotated = rotated(&dir).last().cloned().unwrap();
    let rotated_max = round(&std::fs::read_to_string(dir.join(&newest_rotated)).unwrap());
    let current = c.wait_output(&["logs", "chatty", "--tail", "3"], WAIT, |t| round(t) > rotated_max);
    assert!(round(&current) > rotated_max, "{current}");
    let size = std::fs::metadata(dir.join("0.log")).unwrap().len();
    assert!(size < 512 * 1024, "the current log grew to {size} bytes");
}

/// A gRPC health server of the test's own, toggled between SERVING and NOT_SERVING.
struct Health(std::sync::Arc<std::sync::atomic::AtomicBool>);

#[tonic::async_trait]
impl podvisor::cri::proto::health::health_server::Health for Health {
    async fn check(
        &self,
        _: tonic::Request<podvisor::cri::proto::health::HealthCheckRequest>,
    ) -> Result<tonic::Response<podvisor::cri::proto::health::HealthCheckResponse>, tonic::Status> {
        use podvisor::cri::proto::health::health_check_response::ServingStatus;
        let status = match self.0.load(std::sync::atomic::Ordering::SeqCst) {
            true => ServingStatus::Serving,
            false => ServingStatus::NotServing,
        };
        Ok(tonic::Response::new(
            podvisor::cri::proto::health::HealthCheckResponse { status: status as i32 },
        ))
    }
}

/// A gRPC readiness probe (grpc.health.v1 Check) gates the pod's readiness.
#[test]
fn grpc_probe_gates_readiness() {
    let serving = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt.block_on(tokio::net::TcpListener::bind("0.0.0.0:0")).unwrap();
    let port = listener.local_addr().unwrap().port();
    let service = podvisor::cri::proto::health::health_server::HealthServer::new(Health(serving.clone()));
    rt.spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let env = Env::start();
    // A host-network pod: its IP is the node's, where the test's server listens.
    let pod = format!(
        "apiVersion: v1
kind: Pod
metadata: {{name: grpc}}
spec:
  nodeName: $NODE
  hostNetwork: true
  terminationGracePeriodSeconds: 0
  containers:
  - name: main
    image: $IMAGE
    command: [sh, -c, 'trap \"exit 0\" TERM; while true; do sleep 1; done']
    readinessProbe: {{grpc: {{port: {port}}}, periodSeconds: 1, failureThreshold: 1}}
"
    );
    env.apply("grpc", &pod);
    let ready = "{.status.conditions[?(@.type==\"Ready\")].status}";
    env.wait_jsonpath("grpc", ready, |s| s == "True");
    serving.store(false, std::sync::atomic::Ordering::SeqCst);
    env.wait_jsonpath("grpc", ready, |s| s == "False");
    let events = env.c.wait_output(
        &[
            "get",
            "events",
            "--field-selector",
            "involvedObject.name=grpc,reason=Unhealthy",
            "-o",
            "jsonpath={.items[*].message}",
        ],
        WAIT,
        |m| m.contains("NOT_SERVING"),
    );
    assert!(events.contains("Readiness probe failed"), "{events}");
    serving.store(true, std::sync::atomic::Ordering::SeqCst);
    env.wait_jsonpath("grpc", ready, |s| s == "True");
}

/// batch/v1 Jobs with real pods: `kubectl create job` (protobuf) runs to
/// completion (`kubectl wait`, `logs job/`, `get jobs`), a parallel Job reaches
/// its completions, a failing one stops at its backoff limit, and deleting a
/// Job takes its pods.
#[test]
fn jobs_run_to_completion_or_give_up() {
    let env = Env::start();
    let c = &env.c;
    c.ok(&[
        "create",
        "job",
        "hello",
        &format!("--image={}", env.image),
        "--",
        "sh",
        "-c",
        "echo hi from $(hostname)",
    ]);
    let waited = c.ok(&["wait", "--for=condition=complete", "job/hello", "--timeout=60s"]);
    assert!(waited.contains("job.batch/hello condition met"), "{waited}");
    assert!(c.ok(&["logs", "job/hello"]).starts_with("hi from hello-"));
    let row = c.ok(&["get", "job", "hello", "--no-headers"]);
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cells[..3], ["hello", "Complete", "1/1"], "{row}");
    let labels = c.ok(&[
        "get",
        "pods",
        "-l",
        "job-name=hello",
        "-o",
        "jsonpath={.items[*].status.phase}",
    ]);
    assert_eq!(labels, "Succeeded");

    let parallel = format!(
        "apiVersion: batch/v1
kind: Job
metadata: {{name: many}}
spec:
  completions: 4
  parallelism: 2
  template:
    spec:
      restartPolicy: Never
      containers: [{{name: w, image: {}, command: [sh, -c, 'sleep 0.3']}}]
",
        env.image
    );
    c.ok(&["apply", "-f", &c.file("many.yaml", &parallel)]);
    let failing = format!(
        "apiVersion: batch/v1
kind: Job
metadata: {{name: doomed}}
spec:
  backoffLimit: 1
  template:
    spec:
      restartPolicy: Never
      containers: [{{name: w, image: {}, command: [sh, -c, 'exit 7']}}]
",
        env.image
    );
    c.ok(&["apply", "-f", &c.file("doomed.yaml", &failing)]);
    c.ok(&["wait", "--for=condition=complete", "job/many", "--timeout=60s"]);
    assert_eq!(
        c.ok(&[
            "get",
            "job",
            "many",
            "-o",
            "jsonpath={.status.succeeded} {.status.active} {.status.failed}"
        ]),
        "4 0 0"
    );
    c.ok(&["wait", "--for=condition=failed", "job/doomed", "--timeout=60s"]);
    assert_eq!(
        c.ok(&[
            "get",
            "job",
            "doomed",
            "-o",
            "jsonpath={.status.failed} {.status.conditions[?(@.type==\"Failed\")].reason}"
        ]),
        "2 BackoffLimitExceeded"
    );
    assert!(c.ok(&["get", "job", "doomed", "--no-headers"]).contains("Failed"));
    // The pod template must not restart forever.
    let always = c.fails(&[
        "create",
        "-f",
        &c.file(
            "always.yaml",
            &failing.replace("doomed", "always").replace("Never", "Always"),
        ),
    ]);
    assert!(always.contains("spec.template.spec.restartPolicy"), "{always}");
    // Deleting a Job takes its pods.
    c.ok(&["delete", "job", "many"]);
    let deadline = Instant::now() + WAIT;
    while !c
        .ok(&["get", "pods", "-l", "job-name=many", "-o", "name"])
        .trim()
        .is_empty()
    {
        assert!(Instant::now() < deadline, "the Job's pods outlived it");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// CronJobs: `kubectl create cronjob` (protobuf), a manual run with
/// `create job --from=cronjob/`, a run at the next scheduled minute, and a bad
/// schedule refused.
#[test]
fn cronjobs_run_on_schedule() {
    let env = Env::start();
    let c = &env.c;
    let bad = c.fails(&["create", "cronjob", "bad", "--image=busybox", "--schedule=61 * * * *"]);
    assert!(bad.contains("spec.schedule"), "{bad}");
    c.ok(&[
        "create",
        "cronjob",
        "tick",
        &format!("--image={}", env.image),
        "--schedule=* * * * *",
        "--",
        "sh",
        "-c",
        "echo tick",
    ]);
    let row = c.ok(&["get", "cronjob", "tick", "--no-headers"]);
    assert!(row.starts_with("tick ") && row.contains("* * * * *"), "{row}");
    c.ok(&["create", "job", "tick-now", "--from=cronjob/tick"]);
    c.ok(&["wait", "--for=condition=complete", "job/tick-now", "--timeout=60s"]);
    assert_eq!(c.ok(&["logs", "job/tick-now"]).trim(), "tick");
    // The next minute's run, named after its slot.
    let deadline = Instant::now() + Duration::from_secs(90);
    let scheduled = loop {
        let jobs = c.ok(&["get", "jobs", "-o", "name"]);
        if let Some(job) = jobs
            .lines()
            .find(|j| j.starts_with("job.batch/tick-") && *j != "job.batch/tick-now")
        {
            break job.to_string();
        }
        assert!(Instant::now() < deadline, "no scheduled run: {jobs}");
        std::thread::sleep(Duration::from_millis(500));
    };
    c.ok(&["wait", "--for=condition=complete", &scheduled, "--timeout=60s"]);
    let slot: i64 = scheduled.trim_start_matches("job.batch/tick-").parse().unwrap();
    let annotation = c.ok(&[
        "get",
        &scheduled,
        "-o",
        "jsonpath={.metadata.annotations.batch\\.kubernetes\\.io/cronjob-scheduled-timestamp}",
    ]);
    let stamp: k8s_openapi::jiff::Timestamp = annotation.parse().unwrap();
    assert_eq!(stamp.as_second(), slot * 60);
    let deadline = Instant::now() + WAIT;
    while c
        .ok(&["get", "cronjob", "tick", "-o", "jsonpath={.status.lastSuccessfulTime}"])
        .is_empty()
    {
        assert!(Instant::now() < deadline, "lastSuccessfulTime never set");
        std::thread::sleep(Duration::from_millis(200));
    }
    // Suspended, it runs no more; deleted, its Jobs go with it.
    c.ok(&["patch", "cronjob", "tick", "-p", r#"{"spec":{"suspend":true}}"#]);
    c.ok(&["delete", "cronjob", "tick"]);
    let deadline = Instant::now() + WAIT;
    while !c.ok(&["get", "jobs", "-o", "name"]).trim().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the CronJob's Jobs outlived it: {}",
            c.ok(&["get", "jobs", "-o", "jsonpath={range .items[*]}{.metadata.name} {.metadata.ownerReferences} {.metadata.deletionTimestamp}{\"\\n\"}{end}"])
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
