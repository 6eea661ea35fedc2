//! Exec, Attach and PortForward against a real daemon and real containers:
//! the URLs the RPCs return, served over SPDY and WebSocket to our own
//! clients, and to crictl when it is installed.

mod common;

use std::time::Duration;

use bytes::Bytes;
use futures_util::SinkExt;
use podvisor::cri::proto::runtime as cri;
use podvisor::streaming::spdy::{Headers, Session, SessionConfig, SpdyStream};
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::Message;

use common::cri::{Fixture, processes_mentioning};
use common::streaming::*;
use common::wait_for;

const V5: &str = "v5.channel.k8s.io";

#[derive(Clone, Copy, Default)]
struct Stdio {
    stdin: bool,
    stdout: bool,
    stderr: bool,
    tty: bool,
}

const OUT_ERR: Stdio = Stdio {
    stdin: false,
    stdout: true,
    stderr: true,
    tty: false,
};
const IN_OUT: Stdio = Stdio {
    stdin: true,
    stdout: true,
    stderr: false,
    tty: false,
};
const TTY: Stdio = Stdio {
    stdin: true,
    stdout: true,
    stderr: false,
    tty: true,
};

async fn exec_url(fx: &Fixture, id: &str, cmd: &[&str], io: Stdio) -> Result<String, tonic::Status> {
    let request = cri::ExecRequest {
        container_id: id.into(),
        cmd: cmd.iter().map(|s| s.to_string()).collect(),
        tty: io.tty,
        stdin: io.stdin,
        stdout: io.stdout,
        stderr: io.stderr,
    };
    Ok(fx.runtime().await.exec(request).await?.into_inner().url)
}

async fn attach_url(fx: &Fixture, id: &str, io: Stdio) -> Result<String, tonic::Status> {
    let request = cri::AttachRequest {
        container_id: id.into(),
        tty: io.tty,
        stdin: io.stdin,
        stdout: io.stdout,
        stderr: io.stderr,
    };
    Ok(fx.runtime().await.attach(request).await?.into_inner().url)
}

async fn port_forward_url(fx: &Fixture, pod: &str) -> String {
    let request = cri::PortForwardRequest {
        pod_sandbox_id: pod.into(),
        port: vec![],
    };
    fx.runtime()
        .await
        .port_forward(request)
        .await
        .expect("PortForward")
        .into_inner()
        .url
}

/// The streams of a remotecommand session, opened as client-go does.
struct Streams {
    error: SpdyStream,
    stdin: Option<SpdyStream>,
    stdout: Option<SpdyStream>,
    stderr: Option<SpdyStream>,
    resize: Option<SpdyStream>,
}

fn open_streams(session: &Session, io: Stdio) -> Streams {
    let open = |wanted: bool, kind: &str| wanted.then(|| session.open_stream(stream_type(kind)).unwrap());
    Streams {
        error: session.open_stream(stream_type("error")).unwrap(),
        stdin: open(io.stdin, "stdin"),
        stdout: open(io.stdout, "stdout"),
        stderr: open(io.stderr && !io.tty, "stderr"),
        resize: open(io.tty, "resize"),
    }
}

async fn resize(streams: &mut Streams, width: u16, height: u16) {
    let message = format!("{{\"Width\":{width},\"Height\":{height}}}");
    streams
        .resize
        .as_mut()
        .unwrap()
        .write_all(message.as_bytes())
        .await
        .unwrap();
}

/// A SPDY session whose TCP connection dies (as when the client is killed) when the returned task is aborted.
async fn killable_session(url: &str) -> (Session, tokio::task::JoinHandle<()>) {
    let mut headers = SPDY_UPGRADE.to_vec();
    headers.push(("X-Stream-Protocol-Version", V5));
    let (status, head, mut tcp) = raw_request(url, "POST", &headers).await;
    assert_eq!(status, 101, "{head}");
    let (ours, mut theirs) = tokio::io::duplex(64 * 1024);
    let pipe = tokio::spawn(async move {
        let _ = tokio::io::copy_bidirectional(&mut theirs, &mut tcp).await;
    });
    let session = Session::new(ours, podvisor::streaming::spdy::Role::Client, Default::default());
    (session, pipe)
}

fn status_of(fx_status: &cri::ContainerStatus) -> cri::ContainerState {
    cri::ContainerState::try_from(fx_status.state).unwrap()
}

/// The PIDs in the cgroup of a container whose init is `pid` (its pids controller, or cgroup2).
fn cgroup_members(pid: &str) -> Vec<String> {
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let dir = cgroups
        .lines()
        .find_map(|l| l.split_once(":pids:").map(|(_, p)| format!("/sys/fs/cgroup/pids{p}")))
        .or_else(|| {
            cgroups
                .lines()
                .find_map(|l| l.strip_prefix("0::").map(|p| format!("/sys/fs/cgroup{p}")))
        })
        .unwrap();
    std::fs::read_to_string(format!("{dir}/cgroup.procs"))
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

async fn container_pid(fx: &Fixture, id: &str) -> String {
    let info = fx
        .runtime()
        .await
        .container_status(cri::ContainerStatusRequest {
            container_id: id.into(),
            verbose: true,
        })
        .await
        .unwrap()
        .into_inner()
        .info;
    let info: serde_json::Value = serde_json::from_str(&info["info"]).unwrap();
    info["pid"].to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_over_spdy_and_websocket() {
    let fx = Fixture::start().await;
    let pod_config = fx.pod("exec");
    let pod = fx.run_pod(pod_config.clone()).await;
    let id = fx
        .create(&pod, &pod_config, fx.container("exec", "exec sleep 1000"))
        .await
        .unwrap();
    fx.start_container(&id).await.unwrap();

    // stdout and stderr apart, the exit code in the v5 status.
    let url = exec_url(&fx, &id, &["sh", "-c", "echo out; echo err >&2; exit 3"], OUT_ERR)
        .await
        .unwrap();
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    let (head, session) = spdy_connect(&url, &[V5, "v4.channel.k8s.io"]).await;
    assert!(
        head.to_ascii_lowercase()
            .contains("x-stream-protocol-version: v5.channel.k8s.io"),
        "{head}"
    );
    let s = open_streams(&session, OUT_ERR);
    let (out, err, status) = tokio::join!(
        read_all(s.stdout.unwrap()),
        read_all(s.stderr.unwrap()),
        read_all(s.error)
    );
    assert_eq!((out.as_slice(), err.as_slice()), (&b"out\n"[..], &b"err\n"[..]));
    assert_eq!(exit_code_of(&status), 3);

    // A URL is good for one session.
    let (code, _, _) = raw_request(&url, "POST", &SPDY_UPGRADE).await;
    assert_eq!(code, 404);

    // stdin round trip (v4).
    let url = exec_url(&fx, &id, &["cat"], IN_OUT).await.unwrap();
    let (_, session) = spdy_connect(&url, &["v4.channel.k8s.io"]).await;
    let mut s = open_streams(&session, IN_OUT);
    let mut stdin = s.stdin.take().unwrap();
    stdin.write_all(b"from stdin").await.unwrap();
    stdin.shutdown().await.unwrap();
    let (out, status) = tokio::join!(read_all(s.stdout.unwrap()), read_all(s.error));
    assert_eq!(out, b"from stdin");
    assert_eq!(exit_code_of(&status), 0);

    // A terminal in the container: its size from the start, then resized.
    let script = "busybox tty; echo TERM=$TERM; busybox stty size; read x; busybox stty size";
    let url = exec_url(&fx, &id, &["sh", "-c", script], TTY).await.unwrap();
    let (_, session) = spdy_connect(&url, &[V5]).await;
    let mut s = open_streams(&session, TTY);
    resize(&mut s, 100, 30).await;
    let mut stdout = s.stdout.take().unwrap();
    let mut seen = Vec::new();
    read_until(&mut stdout, &mut seen, "30 100").await;
    let text = read_until(&mut stdout, &mut seen, "/dev/pts/").await;
    assert!(text.contains("TERM=xterm\r\n"), "{text:?}");
    resize(&mut s, 120, 40).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.stdin.as_mut().unwrap().write_all(b"\n").await.unwrap();
    read_until(&mut stdout, &mut seen, "40 120").await;
    assert_eq!(exit_code_of(&read_all(s.error).await), 0);

    // WebSocket v5, stdin ended with the close signal.
    let io = Stdio {
        stdin: true,
        stdout: true,
        stderr: true,
        tty: false,
    };
    let url = exec_url(&fx, &id, &["sh", "-c", "cat; echo e >&2; exit 4"], io)
        .await
        .unwrap();
    let (mut ws, protocol) = ws_connect(&url, "v4.channel.k8s.io, v5.channel.k8s.io").await;
    assert_eq!(protocol.as_deref(), Some(V5));
    for message in [&b"\x00piped "[..], b"\x00input", &[255, 0]] {
        ws.send(Message::Binary(Bytes::copy_from_slice(message))).await.unwrap();
    }
    let (channels, _) = ws_collect(&mut ws).await;
    assert_eq!(channels[&1], b"piped input");
    assert_eq!(channels[&2], b"e\n");
    assert_eq!(exit_code_of(&channels[&3]), 4);

    // A command that cannot start: exit code 127 and why, on stderr.
    let url = exec_url(&fx, &id, &["no-such-program"], OUT_ERR).await.unwrap();
    let (_, session) = spdy_connect(&url, &[V5]).await;
    let s = open_streams(&session, OUT_ERR);
    let (_, err, status) = tokio::join!(
        read_all(s.stdout.unwrap()),
        read_all(s.stderr.unwrap()),
        read_all(s.error)
    );
    assert!(String::from_utf8_lossy(&err).contains("not found"), "{err:?}");
    assert_eq!(exit_code_of(&status), 127);

    // Requests that cannot be served fail at the RPC.
    let code = |r: Result<String, tonic::Status>| r.unwrap_err().code();
    assert_eq!(
        code(exec_url(&fx, "nope", &["true"], OUT_ERR).await),
        tonic::Code::NotFound
    );
    let none = Stdio::default();
    assert_eq!(
        code(exec_url(&fx, &id, &["true"], none).await),
        tonic::Code::InvalidArgument
    );
    let tty_stderr = Stdio { stderr: true, ..TTY };
    assert_eq!(
        code(exec_url(&fx, &id, &["true"], tty_stderr).await),
        tonic::Code::InvalidArgument
    );
    assert_eq!(code(attach_url(&fx, &id, TTY).await), tonic::Code::InvalidArgument);
    let done = fx
        .create(&pod, &pod_config, fx.container("done", "true"))
        .await
        .unwrap();
    fx.start_container(&done).await.unwrap();
    fx.wait_exit(&done).await;
    assert_eq!(
        code(exec_url(&fx, &done, &["true"], OUT_ERR).await),
        tonic::Code::FailedPrecondition
    );
    assert_eq!(
        code(attach_url(&fx, &done, IN_OUT).await),
        tonic::Code::FailedPrecondition
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_clients_that_vanish_leave_no_process_behind() {
    let fx = Fixture::start().await;
    let (_, id) = fx.run("vanish", fx.container("vanish", "exec sleep 1000")).await;
    let init = container_pid(&fx, &id).await;
    assert_eq!(cgroup_members(&init), vec![init.clone()]);
    let helpers = format!(
        "exec-helper {}",
        fx.daemon.state().join("linux/containers").join(&id).display()
    );
    for (io, first, second) in [(OUT_ERR, 1001, 1002), (TTY, 1003, 1004)] {
        // A background child shares the process's group.
        let script = format!("sleep {first} & sleep {second}; wait");
        let url = exec_url(&fx, &id, &["sh", "-c", &script], io).await.unwrap();
        let (session, connection) = killable_session(&url).await;
        let _streams = open_streams(&session, io);
        wait_for(Duration::from_secs(20), "the exec's processes", || {
            [first, second]
                .iter()
                .all(|n| !processes_mentioning(&format!("sleep {n}")).is_empty())
        })
        .await;
        // The helper that started them is in the container's cgroup too.
        assert_eq!(cgroup_members(&init).len(), 5);
        connection.abort();
        wait_for(Duration::from_secs(20), "the exec's processes to be gone", || {
            cgroup_members(&init) == vec![init.clone()] && processes_mentioning(&helpers).is_empty()
        })
        .await;
    }
    assert_eq!(status_of(&fx.status(&id).await), cri::ContainerState::ContainerRunning);
    let exec_files = std::fs::read_dir(fx.daemon.state().join("linux/containers").join(&id))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("exec-"))
        .count();
    assert_eq!(exec_files, 0, "exec configs and pid files are removed");
}

/// An attach session over SPDY with its streams.
async fn attach(fx: &Fixture, id: &str, io: Stdio) -> (Session, Streams) {
    let url = attach_url(fx, id, io).await.unwrap();
    let (_, session) = spdy_connect(&url, &[V5]).await;
    let streams = open_streams(&session, io);
    (session, streams)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_to_running_containers() {
    let mut fx = Fixture::start().await;
    let pod_config = fx.pod("attach");
    let pod = fx.run_pod(pod_config.clone()).await;
    let mut config = fx.container("reader", "while read l; do echo got $l; done");
    config.stdin = true;
    let id = fx.create(&pod, &pod_config, config).await.unwrap();
    fx.start_container(&id).await.unwrap();

    // One attacher writes, another only reads: both see the output.
    let (a, mut sa) = attach(&fx, &id, IN_OUT).await;
    let mut a_out = sa.stdout.take().unwrap();
    let mut a_seen = Vec::new();
    sa.stdin.as_mut().unwrap().write_all(b"one\n").await.unwrap();
    read_until(&mut a_out, &mut a_seen, "got one\n").await;
    let reader = Stdio {
        stdin: false,
        stdout: true,
        stderr: true,
        tty: false,
    };
    let (b, mut sb) = attach(&fx, &id, reader).await;
    let mut b_out = sb.stdout.take().unwrap();
    let mut b_seen = Vec::new();
    // The second attacher is in once it sees a line written after it connected.
    for n in 0.. {
        assert!(n < 100, "the second attacher saw nothing");
        let line = format!("sync{n}\n");
        sa.stdin.as_mut().unwrap().write_all(line.as_bytes()).await.unwrap();
        let mut buf = [0u8; 1024];
        if let Ok(Ok(read)) = tokio::time::timeout(
            Duration::from_millis(200),
            tokio::io::AsyncReadExt::read(&mut b_out, &mut buf),
        )
        .await
        {
            b_seen.extend_from_slice(&buf[..read]);
            break;
        }
    }
    sa.stdin.as_mut().unwrap().write_all(b"two\n").await.unwrap();
    read_until(&mut a_out, &mut a_seen, "got two\n").await;
    read_until(&mut b_out, &mut b_seen, "got two\n").await;

    // Detaching leaves it running; attaching again works.
    a.close().await;
    b.close().await;
    drop((sa, sb, a_out, b_out));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(status_of(&fx.status(&id).await), cri::ContainerState::ContainerRunning);

    // Also across a daemon crash: the monitor keeps serving attach.
    fx.daemon.restart().await;
    let (c, mut sc) = attach(&fx, &id, IN_OUT).await;
    let mut c_out = sc.stdout.take().unwrap();
    sc.stdin.as_mut().unwrap().write_all(b"three\n").await.unwrap();
    read_until(&mut c_out, &mut Vec::new(), "got three\n").await;
    c.close().await;
    let log = std::fs::read_to_string(fx.status(&id).await.log_path).unwrap();
    for line in ["got one", "got two", "got three"] {
        assert!(log.contains(line), "{log}");
    }

    // stdin_once: the attacher's end of input closes the container's stdin.
    let mut config = fx.container("once", "cat; echo bye");
    config.stdin = true;
    config.stdin_once = true;
    let once = fx.create(&pod, &pod_config, config).await.unwrap();
    fx.start_container(&once).await.unwrap();
    let (_d, mut sd) = attach(&fx, &once, IN_OUT).await;
    let mut stdin = sd.stdin.take().unwrap();
    stdin.write_all(b"abc\n").await.unwrap();
    stdin.shutdown().await.unwrap();
    let (out, status) = tokio::join!(read_all(sd.stdout.take().unwrap()), read_all(sd.error));
    assert_eq!(out, b"abc\nbye\n");
    assert_eq!(exit_code_of(&status), 0);
    assert_eq!(fx.wait_exit(&once).await.exit_code, 0);

    // A terminal: input typed into it, resizes applied to it.
    let mut config = fx.container("shell", "exec sh");
    config.stdin = true;
    config.tty = true;
    let shell = fx.create(&pod, &pod_config, config).await.unwrap();
    fx.start_container(&shell).await.unwrap();
    let (e, mut se) = attach(&fx, &shell, TTY).await;
    let mut e_out = se.stdout.take().unwrap();
    resize(&mut se, 77, 33).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stdin = se.stdin.as_mut().unwrap();
    stdin.write_all(b"busybox stty size; echo $((6*7))\n").await.unwrap();
    let mut seen = Vec::new();
    read_until(&mut e_out, &mut seen, "33 77\r\n").await;
    read_until(&mut e_out, &mut seen, "42\r\n").await;
    e.close().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        status_of(&fx.status(&shell).await),
        cri::ContainerState::ContainerRunning
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attachers_that_do_not_read_are_dropped_without_stalling_anything() {
    use podvisor::backend::linux::attach::{HELLO, SOCKET_NAME, WANT_STDOUT};
    use std::io::{Read, Write};
    let fx = Fixture::start().await;
    // 3 MB of output once told to go, in bursts a reading attacher keeps up with.
    let script = "read go; busybox head -c 100000 /dev/zero | busybox tr '\\0' x > /tmp/chunk; \
                  i=0; while [ $i -lt 30 ]; do cat /tmp/chunk; i=$((i+1)); sleep 0.05; done; \
                  echo; echo end-of-output; exec sleep 1000";
    let mut config = fx.container("burst", script);
    config.stdin = true;
    let (_, id) = fx.run("burst", config).await;
    // An attacher that never reads, straight on the monitor's socket (through
    // /proc/self/fd: the bundle path is longer than a socket address).
    let bundle = std::fs::File::open(fx.daemon.state().join("linux/containers").join(&id)).unwrap();
    let path = format!(
        "/proc/self/fd/{}/{SOCKET_NAME}",
        std::os::fd::AsRawFd::as_raw_fd(&bundle)
    );
    let mut stalled = std::os::unix::net::UnixStream::connect(path).unwrap();
    stalled.write_all(&[HELLO, 0, 0, 0, 1, WANT_STDOUT]).unwrap();
    let (_fast, mut fast) = attach(&fx, &id, IN_OUT).await;
    fast.stdin.as_mut().unwrap().write_all(b"go\n").await.unwrap();
    let mut fast_out = fast.stdout.take().unwrap();
    let mut seen = Vec::new();
    read_until(&mut fast_out, &mut seen, "end-of-output").await;
    assert!(seen.len() > 3_000_000);
    let log = std::fs::read_to_string(fx.status(&id).await.log_path).unwrap();
    assert!(log.contains("end-of-output"));
    // The one that did not read was disconnected, with part of the output.
    stalled.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let received = tokio::task::spawn_blocking(move || {
        let mut all = Vec::new();
        stalled.read_to_end(&mut all).map(|_| all.len())
    })
    .await
    .unwrap()
    .expect("the monitor closes the stalled attacher");
    assert!(received < 3_000_000, "{received}");
    assert_eq!(status_of(&fx.status(&id).await), cri::ContainerState::ContainerRunning);
}

/// Forwards one connection over a port-forward session: sends `payload`,
/// half-closes, returns (what came back, the error stream's text).
async fn forward(session: &Session, port: u16, request_id: u32, payload: &[u8]) -> (Vec<u8>, String) {
    let headers = |kind: &str| {
        Headers::new()
            .with("streamType", kind)
            .with("port", &port.to_string())
            .with("requestID", &request_id.to_string())
    };
    let mut error = session.open_stream(headers("error")).unwrap();
    let data = session.open_stream(headers("data")).unwrap();
    error.shutdown().await.unwrap();
    let (mut data_rd, mut data_wr) = data.into_split();
    let payload = payload.to_vec();
    let send = async move {
        let _ = data_wr.write_all(&payload).await;
        let _ = data_wr.shutdown().await;
    };
    let (_, back, error) = tokio::join!(send, read_all(&mut data_rd), read_all(&mut error));
    (back, String::from_utf8_lossy(&error).into_owned())
}

/// Waits until something listens on `port` in the container's network namespace.
async fn wait_listening(fx: &Fixture, id: &str, port: u16) {
    let local = format!(":{port:04X}");
    for _ in 0..200 {
        let out = fx.exec(id, &["cat", "/proc/net/tcp", "/proc/net/tcp6"]).await;
        let listening = String::from_utf8_lossy(&out.stdout).lines().any(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.len() > 3 && fields[1].ends_with(&local) && fields[3] == "0A"
        });
        if listening {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("nothing listens on port {port}");
}

fn host_network(config: &mut cri::PodSandboxConfig) {
    config.linux.as_mut().unwrap().security_context = Some(cri::LinuxSandboxSecurityContext {
        namespace_options: Some(cri::NamespaceOption {
            network: cri::NamespaceMode::Node as i32,
            pid: cri::NamespaceMode::Container as i32,
            ..Default::default()
        }),
        ..Default::default()
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_forward_into_pod_and_host_networks() {
    let fx = Fixture::start().await;
    let (pod, id) = fx.run("echo", fx.container("echo", "exec nc -ll -p 8080 -e cat")).await;
    wait_listening(&fx, &id, 8080).await;
    let url = port_forward_url(&fx, &pod).await;
    let (head, session) = spdy_connect(&url, &["portforward.k8s.io"]).await;
    assert!(head.contains("portforward.k8s.io"), "{head}");
    assert_eq!(
        forward(&session, 8080, 0, b"ping").await,
        (b"ping".to_vec(), String::new())
    );
    // Two connections at once over one session.
    let a: Vec<u8> = (0..200_000u32).map(|i| (i % 199) as u8).collect();
    let b: Vec<u8> = (0..200_000u32).map(|i| (i % 97) as u8).collect();
    let (ra, rb) = tokio::join!(forward(&session, 8080, 1, &a), forward(&session, 8080, 2, &b));
    assert!(ra.0 == a && rb.0 == b, "concurrent round trips differ");
    // Nothing listens on 8081 (not even on the node: the pod has its own network).
    let (back, error) = forward(&session, 8081, 3, b"x").await;
    assert!(back.is_empty());
    assert!(error.to_lowercase().contains("connection refused"), "{error}");
    assert_eq!(forward(&session, 8080, 4, b"still usable").await.0, b"still usable");
    session.close().await;

    // A host-network pod: the node's loopback.
    let port = common::free_port();
    let mut pod_config = fx.pod("hostnet");
    host_network(&mut pod_config);
    let pod = fx.run_pod(pod_config.clone()).await;
    let mut config = fx.container("echo", &format!("exec nc -ll -p {port} -e cat"));
    config
        .linux
        .as_mut()
        .unwrap()
        .security_context
        .as_mut()
        .unwrap()
        .namespace_options = Some(cri::NamespaceOption {
        network: cri::NamespaceMode::Node as i32,
        pid: cri::NamespaceMode::Container as i32,
        ..Default::default()
    });
    let id = fx.create(&pod, &pod_config, config).await.unwrap();
    fx.start_container(&id).await.unwrap();
    wait_listening(&fx, &id, port).await;
    let url = port_forward_url(&fx, &pod).await;
    let (_, session) = spdy_connect(&url, &["portforward.k8s.io"]).await;
    assert_eq!(
        forward(&session, port, 0, b"host").await,
        (b"host".to_vec(), String::new())
    );
    session.close().await;

    // A pod that is not ready.
    fx.runtime()
        .await
        .stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await
        .unwrap();
    let status = fx
        .runtime()
        .await
        .port_forward(cri::PortForwardRequest {
            pod_sandbox_id: pod,
            port: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crictl_exec_attach_and_port_forward() {
    let Some(crictl_bin) = crictl_path() else {
        eprintln!("crictl is not installed at /usr/local/bin/crictl: skipping the crictl checks");
        return;
    };
    let fx = Fixture::start().await;
    let dir = tempfile::tempdir().unwrap();
    let endpoint = fx.daemon.endpoint();
    let crictl = |args: &[&str]| crictl(&crictl_bin, dir.path(), &endpoint, args);
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let pod_config = fx.pod("cli");
    let pod = fx.run_pod(pod_config.clone()).await;
    let id = fx
        .create(&pod, &pod_config, fx.container("cli", "exec nc -ll -p 8080 -e cat"))
        .await
        .unwrap();
    fx.start_container(&id).await.unwrap();

    for t in ["spdy", "websocket"] {
        let out = run(
            crictl(&["exec", "-r", t, &id, "sh", "-c", "echo out; echo err >&2; exit 3"]),
            b"",
        )
        .await;
        assert_eq!(text(&out.stdout), "out\n", "{t}");
        let stderr = text(&out.stderr);
        assert!(
            stderr.starts_with("err\n") && stderr.contains("exit code 3"),
            "{t}: {stderr}"
        );

        let out = run(crictl(&["exec", "-i", "-r", t, &id, "cat"]), b"hello").await;
        assert!(out.status.success(), "{t}: {}", text(&out.stderr));
        assert_eq!(text(&out.stdout), "hello", "{t}");

        let script = "busybox tty; busybox stty size; read x; busybox stty size";
        let on_pty = OnPty::spawn(crictl(&["exec", "-it", "-r", t, &id, "sh", "-c", script]), 30, 100);
        on_pty.wait_for("/dev/pts/").await;
        on_pty.wait_for("30 100").await;
        set_winsize(&on_pty.master, 40, 120);
        tokio::time::sleep(Duration::from_millis(500)).await;
        on_pty.type_keys(b"\r");
        on_pty.wait_for("40 120").await;
        assert!(on_pty.wait_exit().await.success(), "{t}");

        // kubectl attach -i semantics: stdin_once, so the end of input ends the container.
        let mut config = fx.container(&format!("attach-{t}"), "while read l; do echo got $l; done; echo done");
        config.stdin = true;
        config.stdin_once = true;
        let attached = fx.create(&pod, &pod_config, config).await.unwrap();
        fx.start_container(&attached).await.unwrap();
        let out = run(crictl(&["attach", "-i", "-r", t, &attached]), b"line\n").await;
        assert!(out.status.success(), "{t}: {}", text(&out.stderr));
        assert_eq!(text(&out.stdout), "got line\ndone\n", "{t}");
        assert_eq!(fx.wait_exit(&attached).await.exit_code, 0);

        wait_listening(&fx, &id, 8080).await;
        let local = common::free_port();
        let forwarding = Background::spawn(crictl(&["port-forward", "-r", t, &pod, &format!("{local}:8080")]));
        forwarding.wait_for("Forwarding from").await;
        assert_eq!(round_trip(local, b"ping").await, b"ping", "{t}");
        let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let (x, y) = tokio::join!(round_trip(local, &big), round_trip(local, b"small"));
        assert!(x == big && y == b"small", "{t}: concurrent round trips differ");
    }
}

/// With a certificate configured the server speaks HTTPS: the URL says so and a
/// whole SPDY exec runs over TLS.
#[tokio::test]
async fn exec_over_https_with_a_configured_certificate() {
    use tokio::io::AsyncReadExt;
    use tokio_rustls::rustls;
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let made = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ])
        .args([
            "-days",
            "1",
            "-subj",
            "/CN=podvisor-test",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ])
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl");
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let config = format!(
        "[streaming]\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
        cert.display(),
        key.display()
    );
    let fx = Fixture::start_with_config(Some(&config)).await;
    let (_pod, id) = fx.run("tls", fx.container("tls", "exec sleep 1000")).await;
    let url = exec_url(&fx, &id, &["sh", "-c", "echo over tls; exit 4"], OUT_ERR)
        .await
        .unwrap();
    let rest = url
        .strip_prefix("https://")
        .unwrap_or_else(|| panic!("not an https URL: {url}"));
    let (host, path) = rest.split_once('/').unwrap();

    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(&cert).unwrap();
    let der = rustls::pki_types::pem::PemObject::from_pem_slice(&pem).unwrap();
    roots.add(der).unwrap();
    let client =
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(host).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(client))
        .connect(name, tcp)
        .await
        .expect("TLS handshake with the configured certificate");
    let request = format!(
        "POST /{path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: {V5}\r\n\r\n"
    );
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(tls.read_u8().await.unwrap());
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
    let session = Session::new(tls, podvisor::streaming::spdy::Role::Client, SessionConfig::default());
    let s = open_streams(&session, OUT_ERR);
    let (out, _, status) = tokio::join!(
        read_all(s.stdout.unwrap()),
        read_all(s.stderr.unwrap()),
        read_all(s.error)
    );
    assert_eq!(out, b"over tls\n");
    assert_eq!(exit_code_of(&status), 4);
}
