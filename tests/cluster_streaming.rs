//! `kubectl logs`, `exec`, `attach` and `port-forward` through the API server and the node agent, with the real
//! kubectl against `podvisor up`. Each test creates the Pod object with kubectl, bound to a Node whose published
//! endpoint is this cluster's node agent but which that agent does not own (so it leaves the pod alone), and the
//! pod's sandbox and containers over CRI, labelled as the kubelet labels them: the test controls every restart.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::cluster::Cluster;
use common::cri::kubelet_namespaces;
use common::daemon::spec;
use common::oci::{Flavour, TestImage};
use common::push::push_image;
use common::registry::Registry;
use podvisor::cri::proto::runtime as cri;
use podvisor::cri::proto::runtime::image_service_client::ImageServiceClient;
use podvisor::cri::proto::runtime::runtime_service_client::RuntimeServiceClient;
use tonic::transport::Channel;

/// The node the test pods are bound to; the cluster's own agent runs as [`AGENT_NODE`].
const NODE: &str = "testnode";
const AGENT_NODE: &str = "agentnode";

/// A cluster whose node agent serves pods the test builds over CRI.
struct Env {
    c: Cluster,
    _registry: Registry,
    image: String,
    kubelet_port: u16,
}

/// One container of a pod the test runs.
struct Spec<'a> {
    name: &'a str,
    script: &'a str,
    stdin: bool,
}

fn sh<'a>(name: &'a str, script: &'a str) -> Spec<'a> {
    Spec {
        name,
        script,
        stdin: false,
    }
}

struct Pod {
    sandbox: String,
    config: cri::PodSandboxConfig,
    containers: HashMap<String, String>,
}

impl Env {
    async fn start() -> Env {
        let registry = Registry::start().await;
        push_image(
            &registry.url(),
            "test/busybox",
            "latest",
            &TestImage::busybox(),
            Flavour::Oci,
        )
        .await;
        // The agent takes a free port itself (a port picked here could be taken by another test meanwhile).
        let c = Cluster::start_with(&["--node-name", AGENT_NODE], "");
        let kubelet_port: u16 = c
            .wait_output(
                &[
                    "get",
                    "node",
                    AGENT_NODE,
                    "-o",
                    "jsonpath={.status.daemonEndpoints.kubeletEndpoint.Port}",
                ],
                Duration::from_secs(30),
                |out| out.parse::<u16>().is_ok_and(|p| p > 0),
            )
            .parse()
            .unwrap();
        let node = c.file(
            "testnode.yaml",
            &format!("apiVersion: v1\nkind: Node\nmetadata:\n  name: {NODE}\n"),
        );
        c.ok(&["apply", "-f", &node]);
        let published = format!(
            r#"{{"status":{{"addresses":[{{"type":"InternalIP","address":"127.0.0.1"}}],
                "daemonEndpoints":{{"kubeletEndpoint":{{"Port":{kubelet_port}}}}}}}}}"#
        );
        c.ok(&[
            "patch",
            "node",
            NODE,
            "--subresource=status",
            "--type=merge",
            "-p",
            &published,
        ]);
        let image = format!("{}/test/busybox:latest", registry.host());
        let env = Env {
            c,
            _registry: registry,
            image,
            kubelet_port,
        };
        ImageServiceClient::new(env.channel().await)
            .pull_image(cri::PullImageRequest {
                image: Some(spec(&env.image)),
                ..Default::default()
            })
            .await
            .expect("pull busybox");
        env
    }

    async fn channel(&self) -> Channel {
        podvisor::cri::socket::connect(&self.c.endpoint())
            .await
            .expect("CRI socket")
    }

    async fn runtime(&self) -> RuntimeServiceClient<Channel> {
        RuntimeServiceClient::new(self.channel().await)
    }

    /// Creates the Pod object (bound to `node` if given) and returns its uid.
    fn apply_pod(&self, name: &str, node: Option<&str>, containers: &[&str]) -> String {
        let mut yaml = format!("apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n");
        match node {
            Some(node) => yaml.push_str(&format!("  nodeName: {node}\n")),
            // Matches no node, so the scheduler leaves it unbound.
            None => yaml.push_str("  nodeSelector:\n    podvisor.io/test: unschedulable\n"),
        }
        yaml.push_str("  containers:\n");
        for c in containers {
            yaml.push_str(&format!("  - name: {c}\n    image: busybox\n"));
        }
        let file = self.c.file(&format!("{name}.yaml"), &yaml);
        self.c.ok(&["apply", "-f", &file]);
        self.c.ok(&["get", "pod", name, "-o", "jsonpath={.metadata.uid}"])
    }

    /// The Pod object plus its sandbox and started containers, labelled like the kubelet's.
    async fn run_pod(&self, name: &str, node: &str, containers: &[Spec<'_>]) -> Pod {
        let names: Vec<&str> = containers.iter().map(|c| c.name).collect();
        let uid = self.apply_pod(name, Some(node), &names);
        self.run_sandbox(name, &uid, containers).await
    }

    /// A sandbox with started containers for the pod `name` with `uid`.
    async fn run_sandbox(&self, name: &str, uid: &str, containers: &[Spec<'_>]) -> Pod {
        let labels = HashMap::from([
            ("io.kubernetes.pod.name".to_string(), name.to_string()),
            ("io.kubernetes.pod.namespace".to_string(), "default".to_string()),
            ("io.kubernetes.pod.uid".to_string(), uid.to_string()),
        ]);
        let config = cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: name.into(),
                uid: uid.into(),
                namespace: "default".into(),
                attempt: 0,
            }),
            hostname: name.into(),
            log_directory: self
                .c
                .dir
                .path()
                .join("pods")
                .join(format!("default_{name}_{uid}"))
                .display()
                .to_string(),
            labels,
            linux: Some(cri::LinuxPodSandboxConfig {
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: Some(kubelet_namespaces()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let sandbox = self
            .runtime()
            .await
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: String::new(),
            })
            .await
            .expect("RunPodSandbox")
            .into_inner()
            .pod_sandbox_id;
        let mut pod = Pod {
            sandbox,
            config,
            containers: HashMap::new(),
        };
        for c in containers {
            let id = self.start_container(&pod, c, 0).await;
            pod.containers.insert(c.name.to_string(), id);
        }
        pod
    }

    async fn start_container(&self, pod: &Pod, c: &Spec<'_>, attempt: u32) -> String {
        let mut labels = pod.config.labels.clone();
        labels.insert("io.kubernetes.container.name".into(), c.name.into());
        let config = cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: c.name.into(),
                attempt,
            }),
            image: Some(spec(&self.image)),
            command: vec!["sh".into(), "-c".into(), c.script.into()],
            log_path: format!("{}_{attempt}.log", c.name),
            labels,
            stdin: c.stdin,
            linux: Some(cri::LinuxContainerConfig {
                resources: None,
                security_context: Some(cri::LinuxContainerSecurityContext {
                    namespace_options: Some(kubelet_namespaces()),
                    ..Default::default()
                }),
            }),
            ..Default::default()
        };
        let mut runtime = self.runtime().await;
        let id = runtime
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: pod.sandbox.clone(),
                config: Some(config),
                sandbox_config: Some(pod.config.clone()),
            })
            .await
            .expect("CreateContainer")
            .into_inner()
            .container_id;
        runtime
            .start_container(cri::StartContainerRequest {
                container_id: id.clone(),
            })
            .await
            .expect("StartContainer");
        id
    }

    async fn stop_container(&self, id: &str) {
        self.runtime()
            .await
            .stop_container(cri::StopContainerRequest {
                container_id: id.into(),
                timeout: 0,
            })
            .await
            .expect("StopContainer");
    }

    async fn remove_pod(&self, pod: &Pod) {
        let mut runtime = self.runtime().await;
        let id = pod.sandbox.clone();
        runtime
            .stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: id.clone(),
            })
            .await
            .expect("StopPodSandbox");
        runtime
            .remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: id })
            .await
            .expect("RemovePodSandbox");
    }

    /// Sets the pod's phase (kubectl port-forward wants a running pod; no agent reports status yet).
    fn set_running(&self, pod: &str) {
        let patch = r#"{"status":{"phase":"Running"}}"#;
        self.c
            .ok(&["patch", "pod", pod, "--subresource=status", "--type=merge", "-p", patch]);
    }

    /// Waits until `kubectl logs` of the container shows `text`.
    fn wait_log(&self, pod: &str, container: &str, text: &str) {
        self.c
            .wait_output(&["logs", pod, "-c", container], Duration::from_secs(20), |out| {
                out.contains(text)
            });
    }
}

/// Lines a child writes to stdout, read on a thread.
fn stdout_lines(child: &mut Child) -> mpsc::Receiver<String> {
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Receives lines until one satisfies `pred`; returns all lines seen.
fn wait_line(rx: &mpsc::Receiver<String>, what: &str, pred: impl Fn(&str) -> bool) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                let done = pred(&line);
                seen.push(line);
                if done {
                    return seen;
                }
            }
            Err(_) => panic!("no line {what} in time; saw {seen:?}"),
        }
    }
}

/// How many of `pid`'s open files have names ending in `suffix`.
fn open_files(pid: u32, suffix: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|fds| {
            fds.filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
                .filter(|target| target.to_string_lossy().ends_with(suffix))
                .count()
        })
        .unwrap_or(0)
}

fn stop(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

fn output_text(out: &std::process::Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_through_the_api_server() {
    let env = Env::start().await;
    let c = &env.c;
    let main = sh(
        "c",
        // stdout and stderr are separate pipes: pauses keep their order.
        "echo one; sleep 0.2; echo two >&2; sleep 0.2; echo ready; \
         while [ ! -e /tmp/go ]; do sleep 0.05; done; echo three; sleep 1000",
    );
    // A line longer than the runtime's 16 KiB record size comes in partial records.
    let side = sh("side", "echo from-side; busybox seq -s '' 1 9000; sleep 1000");
    let long: String = (1..=9000).map(|n| n.to_string()).collect();
    let pod = env.run_pod("logs", NODE, &[main, side]).await;
    env.wait_log("logs", "c", "ready");

    assert_eq!(c.ok(&["logs", "logs", "-c", "c"]), "one\ntwo\nready\n");
    env.wait_log("logs", "side", "8999");
    assert_eq!(c.ok(&["logs", "logs", "-c", "side"]), format!("from-side\n{long}\n"));
    assert_eq!(c.ok(&["logs", "logs", "-c", "side", "--tail=1"]), format!("{long}\n"));
    // Without -c kubectl picks the first container.
    assert_eq!(c.ok(&["logs", "logs"]), "one\ntwo\nready\n");
    assert_eq!(c.ok(&["logs", "logs", "-c", "c", "--tail=1"]), "ready\n");
    assert_eq!(c.ok(&["logs", "logs", "-c", "c", "--limit-bytes=6"]), "one\ntw");
    assert_eq!(c.ok(&["logs", "logs", "-c", "c", "--since=1h"]), "one\ntwo\nready\n");
    let stamped = c.ok(&["logs", "logs", "-c", "c", "--timestamps"]);
    let lines: Vec<&str> = stamped.lines().collect();
    assert_eq!(lines.len(), 3, "{stamped}");
    for (line, text) in lines.iter().zip(["one", "two", "ready"]) {
        let (ts, rest) = line.split_once(' ').unwrap();
        assert!(ts.len() >= 20 && ts.as_bytes()[10] == b'T', "{line}");
        assert_eq!(rest, text);
    }

    // -f shows what is there, then a line written afterwards.
    let mut follow = c
        .cmd(&["logs", "-f", "logs", "-c", "c", "--tail=1"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = stdout_lines(&mut follow);
    wait_line(&lines, "ready", |l| l == "ready");
    let started = Instant::now();
    c.ok(&["exec", "logs", "-c", "c", "--", "touch", "/tmp/go"]);
    wait_line(&lines, "three", |l| l == "three");
    println!(
        "logs -f: a new line arrived {} ms after it was triggered",
        started.elapsed().as_millis()
    );
    // A follower that goes away stops the agent reading the file.
    let gone = c
        .cmd(&["logs", "-f", "logs", "-c", "side", "--tail=0"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let side_log = "side_0.log";
    let deadline = Instant::now() + Duration::from_secs(10);
    while open_files(c.pid(), side_log) == 0 {
        assert!(Instant::now() < deadline, "the agent never opened {side_log}");
        std::thread::sleep(Duration::from_millis(20));
    }
    stop(gone);
    let deadline = Instant::now() + Duration::from_secs(10);
    while open_files(c.pid(), side_log) > 0 {
        assert!(
            Instant::now() < deadline,
            "the agent still reads {side_log} for a follower that left"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // It ends when the container stops.
    env.stop_container(&pod.containers["c"]).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while follow.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "logs -f did not end with the container");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(follow.wait().unwrap().success());

    // A restart: --previous shows the old instance's log.
    let restarted = env
        .start_container(&pod, &sh("c", "echo second-life; sleep 1000"), 1)
        .await;
    env.wait_log("logs", "c", "second-life");
    assert_eq!(c.ok(&["logs", "logs", "-c", "c"]), "second-life\n");
    assert_eq!(
        c.ok(&["logs", "logs", "-c", "c", "--previous"]),
        "one\ntwo\nready\nthree\n"
    );
    let err = c.fails(&["logs", "logs", "-c", "side", "--previous"]);
    assert!(
        err.contains("previous terminated container \"side\" in pod \"logs\" not found"),
        "{err}"
    );
    env.stop_container(&restarted).await;

    // Errors.
    let err = c.fails(&["logs", "logs", "-c", "nope"]);
    assert!(err.contains("container nope is not valid for pod logs"), "{err}");
    let err = c.fails(&["logs", "ghost"]);
    assert!(err.contains("pods \"ghost\" not found"), "{err}");
    env.apply_pod("pending", None, &["c"]);
    let err = c.fails(&["logs", "pending"]);
    assert!(err.contains("pod pending does not have a host assigned"), "{err}");
    // Bound, but nothing runs it on the node.
    env.apply_pod("absent", Some(NODE), &["c"]);
    let err = c.fails(&["logs", "absent"]);
    assert!(
        err.contains("NotFound") && err.contains("not found on this node"),
        "{err}"
    );

    env.remove_pod(&pod).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_and_attach() {
    let env = Env::start().await;
    let c = &env.c;
    let reader = Spec {
        name: "reader",
        script: "while read l; do echo got $l; done",
        stdin: true,
    };
    let pod = env
        .run_pod(
            "shell",
            NODE,
            &[
                sh("c", "sleep 1000"),
                reader,
                sh("ticker", "i=0; while true; do echo tick$i; i=$((i+1)); sleep 0.2; done"),
            ],
        )
        .await;

    // Exit codes, stdout and stderr (WebSocket v5, kubectl's default).
    let out = c.kubectl(&[
        "exec",
        "shell",
        "-c",
        "c",
        "--",
        "sh",
        "-c",
        "echo hi; echo oops >&2; exit 3",
    ]);
    let (stdout, stderr) = output_text(&out);
    assert_eq!(out.status.code(), Some(3), "{stdout}{stderr}");
    assert_eq!(stdout, "hi\n");
    assert!(stderr.contains("oops"), "{stderr}");
    // The same over SPDY (kubectl's fallback).
    let out = c
        .cmd(&["exec", "shell", "-c", "c", "--", "sh", "-c", "echo spdy; exit 5"])
        .env("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", "false")
        .output()
        .unwrap();
    assert_eq!((out.status.code(), output_text(&out).0.as_str()), (Some(5), "spdy\n"));

    // stdin: -i with input, ended by EOF.
    let mut cat = c
        .cmd(&["exec", "-i", "shell", "-c", "c", "--", "sh", "-c", "cat; echo end"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    cat.stdin.take().unwrap().write_all(b"line 1\nline 2\n").unwrap();
    let out = cat.wait_with_output().unwrap();
    assert_eq!(output_text(&out).0, "line 1\nline 2\nend\n");
    assert!(out.status.success());

    // Round trips through one session: kubectl -> API server -> agent -> streaming server -> cat and back.
    let mut echo = c
        .cmd(&["exec", "-i", "shell", "-c", "c", "--", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = echo.stdin.take().unwrap();
    let lines = stdout_lines(&mut echo);
    let mut round_trips = Vec::new();
    for i in 0..20 {
        let started = Instant::now();
        input.write_all(format!("ping{i}\n").as_bytes()).unwrap();
        input.flush().unwrap();
        wait_line(&lines, "echo", |l| l == format!("ping{i}"));
        round_trips.push(started.elapsed());
    }
    drop(input);
    assert!(echo.wait().unwrap().success());
    round_trips.sort();
    println!(
        "exec -i round trip: median {:?}, max {:?} over {}",
        round_trips[round_trips.len() / 2],
        round_trips.last().unwrap(),
        round_trips.len()
    );
    let started = Instant::now();
    for _ in 0..5 {
        c.ok(&["exec", "shell", "-c", "c", "--", "true"]);
    }
    println!("kubectl exec -- true: {} ms each", started.elapsed().as_millis() / 5);

    // A terminal: kubectl -it under script(1), which gives it a pty.
    let kubectl = format!(
        "kubectl --kubeconfig {} --cache-dir {} exec -it shell -c c -- sh -c 'busybox tty; exit 4'",
        c.kubeconfig().display(),
        c.dir.path().join("kubectl-cache").display()
    );
    let out = std::process::Command::new("script")
        .args(["-qec", &kubectl, "/dev/null"])
        .stdin(Stdio::piped())
        .output()
        .unwrap();
    let (stdout, stderr) = output_text(&out);
    assert!(stdout.contains("/dev/pts/"), "{stdout}{stderr}");
    assert_eq!(out.status.code(), Some(4), "{stdout}{stderr}");

    // attach -i: input reaches the container's stdin, its output comes back.
    let mut attach = c
        .cmd(&["attach", "-i", "shell", "-c", "reader"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = attach.stdin.take().unwrap();
    let lines = stdout_lines(&mut attach);
    // The attachment is live once a line sent through it comes back.
    let mut attached = false;
    for n in 0..50 {
        input.write_all(format!("sync{n}\n").as_bytes()).unwrap();
        if lines.recv_timeout(Duration::from_millis(300)).is_ok() {
            attached = true;
            break;
        }
    }
    assert!(attached, "attach: no output");
    input.write_all(b"hello\n").unwrap();
    wait_line(&lines, "got hello", |l| l == "got hello");
    stop(attach);
    // attach without -i: output only; detaching leaves the container running.
    let mut watch = c
        .cmd(&["attach", "shell", "-c", "ticker"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = stdout_lines(&mut watch);
    wait_line(&lines, "a tick", |l| l.starts_with("tick"));
    wait_line(&lines, "another tick", |l| l.starts_with("tick"));
    stop(watch);
    assert!(c.ok(&["exec", "shell", "-c", "ticker", "--", "true"]).is_empty());

    // Errors.
    let err = c.fails(&["exec", "ghost", "--", "true"]);
    assert!(err.contains("pods \"ghost\" not found"), "{err}");
    env.apply_pod("unbound", None, &["c"]);
    let err = c.fails(&["exec", "unbound", "--", "true"]);
    assert!(err.contains("does not have a host assigned"), "{err}");
    env.stop_container(&pod.containers["c"]).await;
    let err = c.fails(&["exec", "shell", "-c", "c", "--", "true"]);
    assert!(
        err.contains("container \"c\" in pod \"default/shell\" is not running"),
        "{err}"
    );

    env.remove_pod(&pod).await;
}

/// `kubectl port-forward` prints `Forwarding from 127.0.0.1:<port> -> <remote>`; returns the local port.
fn forwarded_port(lines: &mpsc::Receiver<String>) -> u16 {
    let seen = wait_line(lines, "Forwarding from", |l| {
        l.starts_with("Forwarding from 127.0.0.1:")
    });
    let line = seen.last().unwrap();
    let rest = line.trim_start_matches("Forwarding from 127.0.0.1:");
    rest.split_whitespace().next().unwrap().parse().unwrap()
}

fn http_get(port: u16, path: &str) -> String {
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    conn.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .unwrap();
    let mut answer = Vec::new();
    conn.read_to_end(&mut answer).unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_forward_to_a_pod() {
    let env = Env::start().await;
    let c = &env.c;
    let script = "mkdir -p /www && echo hello-pf > /www/index.html && busybox seq 1 200000 > /www/big && \
                  echo ready && exec httpd -f -p 80 -h /www";
    let pod = env.run_pod("web", NODE, &[sh("httpd", script)]).await;
    env.wait_log("web", "httpd", "ready");
    env.set_running("web");
    let big: String = (1..=200_000).map(|n| format!("{n}\n")).collect();

    for (transport, websockets) in [("websocket", "true"), ("spdy", "false")] {
        let mut forward = c
            .cmd(&["port-forward", "pod/web", "0:80"])
            .env("KUBECTL_PORT_FORWARD_WEBSOCKETS", websockets)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = stdout_lines(&mut forward);
        let port = forwarded_port(&lines);
        let answer = http_get(port, "/");
        assert!(
            answer.starts_with("HTTP/1.") && answer.ends_with("hello-pf\n"),
            "{transport}: {answer}"
        );
        // Several connections at once, and 1.3 MB intact.
        let started = Instant::now();
        let fetches: Vec<_> = (0..3)
            .map(|_| std::thread::spawn(move || http_get(port, "/big")))
            .collect();
        for fetch in fetches {
            let answer = fetch.join().unwrap();
            let body = answer.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default();
            assert!(
                body == big,
                "{transport}: {} bytes instead of {}",
                body.len(),
                big.len()
            );
        }
        println!(
            "port-forward ({transport}): 3 x {} bytes in {} ms",
            big.len(),
            started.elapsed().as_millis()
        );
        stop(forward);
    }

    // An unbound pod is refused by the API server.
    env.apply_pod("idle", None, &["c"]);
    let patch = r#"{"status":{"phase":"Running"}}"#;
    c.ok(&[
        "patch",
        "pod",
        "idle",
        "--subresource=status",
        "--type=merge",
        "-p",
        patch,
    ]);
    let out = c.kubectl(&["port-forward", "pod/idle", "0:80"]);
    let (_, stderr) = output_text(&out);
    assert!(
        !out.status.success() && stderr.contains("does not have a host assigned"),
        "{stderr}"
    );

    env.remove_pod(&pod).await;
}

/// Pods on another node are reached at the address and port that node publishes, over HTTPS checked against the
/// cluster CA; the agent itself answers only callers with the cluster token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_are_found_by_their_published_endpoint() {
    let env = Env::start().await;
    let c = &env.c;
    let node = |name: &str, status: &str| {
        let file = c.file(
            &format!("{name}.yaml"),
            &format!("apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n"),
        );
        c.ok(&["apply", "-f", &file]);
        if !status.is_empty() {
            c.ok(&[
                "patch",
                "node",
                name,
                "--subresource=status",
                "--type=merge",
                "-p",
                status,
            ]);
        }
    };
    let published = format!(
        r#"{{"status":{{"addresses":[{{"type":"InternalIP","address":"127.0.0.1"}}],
            "daemonEndpoints":{{"kubeletEndpoint":{{"Port":{}}}}}}}}}"#,
        env.kubelet_port
    );
    node("remote1", &published);
    let pod = env
        .run_pod("far", "remote1", &[sh("c", "echo far-away; sleep 1000")])
        .await;
    env.wait_log("far", "c", "far-away");
    // What is left of another pod of the same name (stopped, newer here) does not get in the way.
    let stale = env
        .run_sandbox("far", "stale-uid", &[sh("c", "echo stale; sleep 1000")])
        .await;
    env.runtime()
        .await
        .stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: stale.sandbox.clone(),
        })
        .await
        .expect("StopPodSandbox");
    assert_eq!(c.ok(&["logs", "far"]), "far-away\n");
    assert_eq!(c.ok(&["exec", "far", "--", "echo", "via", "remote1"]), "via remote1\n");

    node("silent", "");
    env.apply_pod("on-silent", Some("silent"), &["c"]);
    let err = c.fails(&["logs", "on-silent"]);
    assert!(err.contains("node \"silent\" publishes no kubelet endpoint"), "{err}");
    env.apply_pod("on-ghost", Some("ghostnode"), &["c"]);
    let err = c.fails(&["logs", "on-ghost"]);
    assert!(err.contains("nodes \"ghostnode\" not found"), "{err}");
    let closed = common::free_port();
    node(
        "down",
        &published.replace(&env.kubelet_port.to_string(), &closed.to_string()),
    );
    env.apply_pod("on-down", Some("down"), &["c"]);
    let err = c.fails(&["logs", "on-down"]);
    assert!(err.contains("the node agent of node \"down\" did not answer"), "{err}");

    // The agent's own API: token required, kubelet-style paths, metav1.Status errors.
    let api_dir = c.data_dir().join("apiserver");
    // The agent API takes the node token (the one the API server presents).
    let token = std::fs::read_to_string(api_dir.join("node-token")).unwrap();
    let ca = std::fs::read(api_dir.join("ca.crt")).unwrap();
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .build()
        .unwrap();
    let base = format!("https://127.0.0.1:{}", env.kubelet_port);
    let get = |path: &str, auth: bool| {
        let mut request = client.get(format!("{base}{path}"));
        if auth {
            request = request.bearer_auth(token.trim());
        }
        request.send()
    };
    let logs = get("/containerLogs/default/far/c", true).await.unwrap();
    assert_eq!(logs.status(), 200);
    assert_eq!(logs.text().await.unwrap(), "far-away\n");
    assert_eq!(get("/containerLogs/default/far/c", false).await.unwrap().status(), 401);
    let missing = get("/containerLogs/default/nobody/c", true).await.unwrap();
    assert_eq!(missing.status(), 404);
    let status: serde_json::Value = missing.json().await.unwrap();
    assert_eq!(status["message"], "pod \"default/nobody\" not found on this node");
    let missing = get("/containerLogs/default/far/other", true).await.unwrap();
    assert_eq!(missing.status(), 404);
    let bad = get("/containerLogs/default/far/c?tailLines=x", true).await.unwrap();
    assert_eq!(bad.status(), 400);
    assert_eq!(get("/nothing/here", true).await.unwrap().status(), 404);

    env.remove_pod(&pod).await;
    env.remove_pod(&stale).await;
}
