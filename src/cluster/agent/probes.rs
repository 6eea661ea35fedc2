//! Container probes (startup, liveness, readiness) and lifecycle hooks:
//! exec through CRI ExecSync, httpGet against the pod IP, tcpSocket.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::{
    Container, ExecAction, GRPCAction, HTTPGetAction, LifecycleHandler, ObjectReference, Probe, TCPSocketAction,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::sync::Notify;

use super::Context;
use crate::cluster::events::EventType;

/// What the probes have concluded about one container.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProbeState {
    /// The startup probe passed (or there is none).
    pub started: bool,
    /// The readiness probe passes (or there is none).
    pub ready: bool,
    /// Why the container must be restarted (liveness or startup probe failed).
    pub failed: Option<String>,
}

/// Probe states by container ID.
pub type ProbeStates = Arc<Mutex<HashMap<String, ProbeState>>>;

/// One action of a probe or hook.
enum Action<'a> {
    Exec(&'a ExecAction),
    Http(&'a HTTPGetAction),
    Tcp(&'a TCPSocketAction),
    Grpc(&'a GRPCAction),
}

/// Where a probe or hook runs.
#[derive(Clone)]
pub struct Target {
    pub container_id: String,
    pub container: Container,
    /// The pod IP (the node's for host-network pods).
    pub host: String,
    pub reference: ObjectReference,
}

fn probe_action(probe: &Probe) -> Option<Action<'_>> {
    if let Some(exec) = &probe.exec {
        Some(Action::Exec(exec))
    } else if let Some(http) = &probe.http_get {
        Some(Action::Http(http))
    } else if let Some(tcp) = &probe.tcp_socket {
        Some(Action::Tcp(tcp))
    } else {
        probe.grpc.as_ref().map(Action::Grpc)
    }
}

/// Resolves a port given by number or by the container's port name.
fn port(container: &Container, port: &IntOrString) -> Result<u16, String> {
    match port {
        IntOrString::Int(n) => u16::try_from(*n).map_err(|_| format!("invalid port {n}")),
        IntOrString::String(name) => {
            if let Ok(n) = name.parse::<u16>() {
                return Ok(n);
            }
            container
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name.as_str()))
                .and_then(|p| u16::try_from(p.container_port).ok())
                .ok_or_else(|| format!("port {name:?} not found in the container's ports"))
        }
    }
}

async fn run_action(ctx: &Context, target: &Target, action: Action<'_>, timeout: Duration) -> Result<(), String> {
    match action {
        Action::Exec(exec) => {
            let cmd = exec.command.clone().unwrap_or_default();
            let seconds = timeout.as_secs().max(1) as i64;
            let result = ctx
                .cri
                .exec_sync(&target.container_id, cmd, seconds)
                .await
                .map_err(|e| e.to_string())?;
            if result.exit_code == 0 {
                Ok(())
            } else {
                let mut output = String::from_utf8_lossy(&result.stdout).into_owned();
                output.push_str(&String::from_utf8_lossy(&result.stderr));
                Err(format!("command exited with {}: {}", result.exit_code, output.trim()))
            }
        }
        Action::Http(http) => {
            let port = port(&target.container, &http.port)?;
            let host = http
                .host
                .clone()
                .filter(|h| !h.is_empty())
                .unwrap_or(target.host.clone());
            let scheme = http.scheme.as_deref().unwrap_or("HTTP").to_lowercase();
            let path = http.path.clone().unwrap_or_else(|| "/".into());
            let path = if path.starts_with('/') {
                path
            } else {
                format!("/{path}")
            };
            let host = if host.contains(':') { format!("[{host}]") } else { host };
            let url = format!("{scheme}://{host}:{port}{path}");
            let mut request = ctx.http.get(&url).timeout(timeout);
            for header in http.http_headers.iter().flatten() {
                request = request.header(header.name.as_str(), header.value.as_str());
            }
            let response = request.send().await.map_err(|e| format!("Get {url:?}: {e}"))?;
            let code = response.status().as_u16();
            if (200..400).contains(&code) {
                Ok(())
            } else {
                Err(format!("HTTP probe failed with statuscode: {code}"))
            }
        }
        Action::Tcp(tcp) => {
            let port = port(&target.container, &tcp.port)?;
            let host = tcp
                .host
                .clone()
                .filter(|h| !h.is_empty())
                .unwrap_or(target.host.clone());
            let address = format!("{}:{port}", if host.contains(':') { format!("[{host}]") } else { host });
            match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(&address)).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(err)) => Err(format!("dial tcp {address}: {err}")),
                Err(_) => Err(format!("dial tcp {address}: i/o timeout")),
            }
        }
        Action::Grpc(grpc) => grpc_check(&target.host, grpc, timeout).await,
    }
}

/// A gRPC probe: `grpc.health.v1.Health/Check` on the pod IP; only SERVING passes.
async fn grpc_check(host: &str, grpc: &GRPCAction, timeout: Duration) -> Result<(), String> {
    use crate::cri::proto::health::health_check_response::ServingStatus;
    use crate::cri::proto::health::{HealthCheckRequest, health_client::HealthClient};
    let port = u16::try_from(grpc.port).map_err(|_| format!("invalid port {}", grpc.port))?;
    let address = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .map_err(|e| format!("invalid address {address}: {e}"))?
        .connect_timeout(timeout)
        .timeout(timeout);
    let channel = match tokio::time::timeout(timeout, endpoint.connect()).await {
        Ok(Ok(channel)) => channel,
        Ok(Err(e)) => return Err(format!("failed to connect service {address:?}: {e}")),
        Err(_) => {
            return Err(format!(
                "timeout: failed to connect service {address:?} within {timeout:?}"
            ));
        }
    };
    let request = HealthCheckRequest {
        service: grpc.service.clone().unwrap_or_default(),
    };
    let response = match tokio::time::timeout(timeout, HealthClient::new(channel).check(request)).await {
        Ok(Ok(response)) => response.into_inner(),
        Ok(Err(status)) => {
            return Err(format!(
                "rpc error: code = {:?} desc = {}",
                status.code(),
                status.message()
            ));
        }
        Err(_) => return Err(format!("timeout: health rpc did not complete within {timeout:?}")),
    };
    match ServingStatus::try_from(response.status) {
        Ok(ServingStatus::Serving) => Ok(()),
        Ok(other) => Err(format!("service unhealthy (responded with {:?})", other.as_str_name())),
        Err(_) => Err(format!("service unhealthy (responded with status {})", response.status)),
    }
}

/// Runs a postStart or preStop hook to completion (or `limit`).
pub async fn run_hook(ctx: &Context, target: &Target, hook: &LifecycleHandler, limit: Duration) -> Result<(), String> {
    if let Some(sleep) = &hook.sleep {
        tokio::time::sleep(Duration::from_secs(sleep.seconds.max(0) as u64).min(limit)).await;
        return Ok(());
    }
    let action = if let Some(exec) = &hook.exec {
        Action::Exec(exec)
    } else if let Some(http) = &hook.http_get {
        Action::Http(http)
    } else if let Some(tcp) = &hook.tcp_socket {
        Action::Tcp(tcp)
    } else {
        return Ok(());
    };
    match tokio::time::timeout(limit, run_action(ctx, target, action, limit)).await {
        Ok(result) => result,
        Err(_) => Err(format!("hook did not finish in {} s", limit.as_secs())),
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Startup,
    Liveness,
    Readiness,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Startup => "Startup",
            Kind::Liveness => "Liveness",
            Kind::Readiness => "Readiness",
        }
    }
}

/// The probes of one running container, stopped on drop.
pub struct Prober {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts probing a container that started at `started_at`; results land in
/// `states` under its ID, and `wake` tells the pod's worker about changes.
pub fn start(
    ctx: Arc<Context>,
    target: Target,
    started_at: SystemTime,
    states: ProbeStates,
    wake: Arc<Notify>,
) -> Prober {
    let task = tokio::spawn(async move {
        let c = &target.container;
        let report = Reporter {
            id: target.container_id.clone(),
            states,
            wake,
        };
        if let Some(probe) = &c.startup_probe
            && let Err(message) = probe_loop(&ctx, &target, probe, Kind::Startup, started_at, &report).await
        {
            report.update(|s| s.failed = Some(message));
            return;
        }
        report.update(|s| s.started = true);
        let readiness = async {
            match &c.readiness_probe {
                Some(probe) => {
                    let _ = probe_loop(&ctx, &target, probe, Kind::Readiness, started_at, &report).await;
                }
                None => report.update(|s| s.ready = true),
            }
        };
        let liveness = async {
            if let Some(probe) = &c.liveness_probe
                && let Err(message) = probe_loop(&ctx, &target, probe, Kind::Liveness, started_at, &report).await
            {
                report.update(|s| s.failed = Some(message));
            }
        };
        tokio::join!(readiness, liveness);
    });
    Prober { task }
}

/// Records a container's probe results and wakes its pod's worker on changes.
struct Reporter {
    id: String,
    states: ProbeStates,
    wake: Arc<Notify>,
}

impl Reporter {
    fn update(&self, change: impl FnOnce(&mut ProbeState)) {
        let mut all = self.states.lock().unwrap();
        let state = all.entry(self.id.clone()).or_default();
        let before = state.clone();
        change(state);
        if *state != before {
            self.wake.notify_one();
        }
    }
}

/// Runs one probe by its schedule. Startup returns Ok once it passes; startup
/// and liveness return Err when they reach their failure threshold; readiness
/// runs until stopped, recording its verdict.
async fn probe_loop(
    ctx: &Context,
    target: &Target,
    probe: &Probe,
    kind: Kind,
    started_at: SystemTime,
    report: &Reporter,
) -> Result<(), String> {
    let seconds = |v: Option<i32>, default: i32| Duration::from_secs(v.unwrap_or(default).max(0) as u64);
    let period = seconds(probe.period_seconds, 10).max(Duration::from_secs(1));
    let timeout = seconds(probe.timeout_seconds, 1).max(Duration::from_secs(1));
    let success_threshold = if kind == Kind::Readiness {
        probe.success_threshold.unwrap_or(1).max(1)
    } else {
        1
    };
    let failure_threshold = probe.failure_threshold.unwrap_or(3).max(1);
    let Some(action) = probe_action(probe) else {
        // gRPC probes are not supported: they count as passing.
        if kind == Kind::Readiness {
            report.update(|s| s.ready = true);
        }
        return Ok(());
    };
    let first = started_at + seconds(probe.initial_delay_seconds, 0);
    if let Ok(wait) = first.duration_since(SystemTime::now()) {
        tokio::time::sleep(wait).await;
    }
    let (mut successes, mut failures) = (0, 0);
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let action = match &action {
            Action::Exec(a) => Action::Exec(a),
            Action::Http(a) => Action::Http(a),
            Action::Tcp(a) => Action::Tcp(a),
            Action::Grpc(a) => Action::Grpc(a),
        };
        match run_action(ctx, target, action, timeout).await {
            Ok(()) => {
                failures = 0;
                successes += 1;
                if successes >= success_threshold {
                    match kind {
                        Kind::Startup => return Ok(()),
                        Kind::Readiness => report.update(|s| s.ready = true),
                        Kind::Liveness => {}
                    }
                }
            }
            Err(message) => {
                successes = 0;
                failures += 1;
                let text = format!("{} probe failed: {message}", kind.name());
                ctx.recorder
                    .emit(target.reference.clone(), EventType::Warning, "Unhealthy", text.clone());
                if failures >= failure_threshold {
                    match kind {
                        Kind::Readiness => report.update(|s| s.ready = false),
                        Kind::Startup | Kind::Liveness => {
                            let verb = if kind == Kind::Startup { "startup" } else { "liveness" };
                            return Err(format!(
                                "Container {} failed {verb} probe, will be restarted",
                                target.container.name
                            ));
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ContainerPort;

    #[test]
    fn named_ports() {
        let c = Container {
            ports: Some(vec![ContainerPort {
                name: Some("http".into()),
                container_port: 8080,
                ..Default::default()
            }]),
            ..Default::default()
        };
        assert_eq!(port(&c, &IntOrString::String("http".into())), Ok(8080));
        assert_eq!(port(&c, &IntOrString::String("81".into())), Ok(81));
        assert_eq!(port(&c, &IntOrString::Int(80)), Ok(80));
        assert!(port(&c, &IntOrString::String("nope".into())).is_err());
    }
}
