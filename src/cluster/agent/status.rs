//! A pod's status from what the runtime shows: phase, conditions, IPs and the
//! per-container states, following kubelet's rules.

use std::collections::HashMap;

use k8s_openapi::api::core::v1::{
    Container, ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting, ContainerStatus,
    HostIP, Pod, PodCondition, PodIP, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use super::probes::ProbeState;
use crate::cri::proto::runtime as api;

/// A reason a container is waiting, e.g. ErrImagePull or CrashLoopBackOff.
#[derive(Clone, Debug, PartialEq)]
pub struct Waiting {
    pub reason: String,
    pub message: String,
}

/// How far the init containers got.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum InitProgress {
    /// The init container at this index is the one to run or running.
    Running(usize),
    Done,
    /// One failed and the pod does not restart it.
    Failed,
}

pub struct Observed<'a> {
    pub pod: &'a Pod,
    /// The last status written, for transition times and the start time.
    pub previous: &'a PodStatus,
    pub runtime_name: &'a str,
    pub host_ip: &'a str,
    pub pod_ip: Option<&'a str>,
    pub sandbox_ready: bool,
    /// CRI containers by name, newest attempt first.
    pub containers: &'a HashMap<String, Vec<api::ContainerStatus>>,
    pub waiting: &'a HashMap<String, Waiting>,
    /// By container ID.
    pub probes: &'a HashMap<String, ProbeState>,
    pub init: InitProgress,
    pub now: Timestamp,
}

pub fn is_running(c: &api::ContainerStatus) -> bool {
    c.state == api::ContainerState::ContainerRunning as i32
}

pub fn is_exited(c: &api::ContainerStatus) -> bool {
    c.state == api::ContainerState::ContainerExited as i32 || c.state == api::ContainerState::ContainerUnknown as i32
}

pub fn time_of(nanos: i64) -> Option<Time> {
    (nanos > 0)
        .then(|| Timestamp::from_nanosecond(nanos as i128).ok())
        .flatten()
        .map(Time)
}

fn terminated(runtime: &str, c: &api::ContainerStatus) -> ContainerState {
    let reason = if !c.reason.is_empty() {
        c.reason.clone()
    } else if c.exit_code == 0 {
        "Completed".into()
    } else {
        "Error".into()
    };
    ContainerState {
        terminated: Some(ContainerStateTerminated {
            exit_code: c.exit_code,
            reason: Some(reason),
            message: Some(c.message.clone()).filter(|m| !m.is_empty()),
            started_at: time_of(c.started_at),
            finished_at: time_of(c.finished_at),
            container_id: Some(format!("{runtime}://{}", c.id)),
            signal: None,
        }),
        ..Default::default()
    }
}

fn waiting(reason: &str, message: &str) -> ContainerState {
    ContainerState {
        waiting: Some(ContainerStateWaiting {
            reason: Some(reason.into()),
            message: Some(message.into()).filter(|m: &String| !m.is_empty()),
        }),
        ..Default::default()
    }
}

fn container_status(o: &Observed<'_>, c: &Container, is_init: bool, default_waiting: &str) -> ContainerStatus {
    let history = o.containers.get(&c.name).map(Vec::as_slice).unwrap_or_default();
    let latest = history.first();
    let previous = history
        .get(1)
        .filter(|p| is_exited(p))
        .map(|p| terminated(o.runtime_name, p));
    let (state, last_state) = match (latest, o.waiting.get(&c.name)) {
        (Some(l), _) if is_running(l) => (
            ContainerState {
                running: Some(ContainerStateRunning {
                    started_at: time_of(l.started_at),
                }),
                ..Default::default()
            },
            previous,
        ),
        (latest, Some(w)) => (
            waiting(&w.reason, &w.message),
            latest.filter(|l| is_exited(l)).map(|l| terminated(o.runtime_name, l)),
        ),
        (Some(l), None) if is_exited(l) => (terminated(o.runtime_name, l), previous),
        (Some(_), None) => (waiting("ContainerCreating", ""), previous),
        (None, None) => (waiting(default_waiting, ""), None),
    };
    let probe = latest.and_then(|l| o.probes.get(&l.id)).cloned().unwrap_or_default();
    let running = latest.is_some_and(is_running);
    let ready = if is_init && c.restart_policy.as_deref() != Some("Always") {
        latest.is_some_and(|l| is_exited(l) && l.exit_code == 0)
    } else {
        running && probe.started && probe.ready
    };
    ContainerStatus {
        name: c.name.clone(),
        image: c.image.clone().unwrap_or_default(),
        image_id: latest.map(|l| l.image_ref.clone()).unwrap_or_default(),
        container_id: latest.map(|l| format!("{}://{}", o.runtime_name, l.id)),
        ready,
        started: Some(running && probe.started),
        restart_count: latest
            .map(|l| l.metadata.as_ref().map_or(0, |m| m.attempt as i32))
            .unwrap_or(0),
        state: Some(state),
        last_state: Some(last_state.unwrap_or_default()),
        ..Default::default()
    }
}

/// Kubelet's phase rules over the app containers' states.
fn phase(o: &Observed<'_>, statuses: &[ContainerStatus]) -> &'static str {
    match o.init {
        InitProgress::Failed => return "Failed",
        InitProgress::Running(_) => return "Pending",
        InitProgress::Done => {}
    }
    let (mut waiting, mut running, mut stopped, mut succeeded) = (0, 0, 0, 0);
    for status in statuses {
        let state = status.state.clone().unwrap_or_default();
        if state.running.is_some() {
            running += 1;
        } else if let Some(t) = &state.terminated {
            stopped += 1;
            succeeded += usize::from(t.exit_code == 0);
        } else if status.last_state.as_ref().is_some_and(|l| l.terminated.is_some()) {
            stopped += 1;
        } else {
            waiting += 1;
        }
    }
    let policy = o
        .pod
        .spec
        .as_ref()
        .and_then(|s| s.restart_policy.as_deref())
        .unwrap_or("Always");
    if waiting > 0 {
        "Pending"
    } else if running > 0 {
        "Running"
    } else if stopped > 0 {
        match policy {
            "Always" => "Running",
            _ if stopped == succeeded => "Succeeded",
            "Never" => "Failed",
            _ => "Running",
        }
    } else {
        "Pending"
    }
}

fn condition(o: &Observed<'_>, kind: &str, ok: bool, reason: Option<&str>, message: Option<String>) -> PodCondition {
    let status = if ok { "True" } else { "False" };
    let previous = o
        .previous
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == kind && c.status == status);
    PodCondition {
        type_: kind.into(),
        status: status.into(),
        reason: reason.map(str::to_string),
        message,
        last_probe_time: None,
        last_transition_time: previous
            .and_then(|p| p.last_transition_time.clone())
            .or(Some(Time(o.now))),
    }
}

fn names(statuses: &[ContainerStatus], pick: impl Fn(&ContainerStatus) -> bool) -> Vec<String> {
    statuses.iter().filter(|s| pick(s)).map(|s| s.name.clone()).collect()
}

pub fn pod_status(o: &Observed<'_>) -> PodStatus {
    let spec = o.pod.spec.clone().unwrap_or_default();
    let init_containers = spec.init_containers.clone().unwrap_or_default();
    let init_statuses: Vec<ContainerStatus> = init_containers
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let default = match o.init {
                InitProgress::Running(current) if current == i => "ContainerCreating",
                _ => "PodInitializing",
            };
            container_status(o, c, true, default)
        })
        .collect();
    let app_default = if o.init == InitProgress::Done {
        "ContainerCreating"
    } else {
        "PodInitializing"
    };
    let statuses: Vec<ContainerStatus> = spec
        .containers
        .iter()
        .map(|c| container_status(o, c, false, app_default))
        .collect();
    let phase = phase(o, &statuses);
    let terminal = matches!(phase, "Succeeded" | "Failed");
    let unready = names(&statuses, |s| !s.ready);
    let list = |names: &[String]| format!("[{}]", names.join(" "));
    let incomplete = names(&init_statuses, |s| !s.ready);
    let mut conditions = vec![
        condition(o, "PodReadyToStartContainers", o.sandbox_ready, None, None),
        if o.init == InitProgress::Done {
            condition(o, "Initialized", true, None, None)
        } else {
            let message = format!("containers with incomplete status: {}", list(&incomplete));
            condition(o, "Initialized", false, Some("ContainersNotInitialized"), Some(message))
        },
    ];
    let gates_open = spec.readiness_gates.iter().flatten().all(|gate| {
        o.previous
            .conditions
            .iter()
            .flatten()
            .any(|c| c.type_ == gate.condition_type && c.status == "True")
    });
    let (containers_ready, ready) = if terminal {
        (
            condition(o, "ContainersReady", false, Some("PodCompleted"), None),
            condition(o, "Ready", false, Some("PodCompleted"), None),
        )
    } else if unready.is_empty() {
        let ready = if gates_open {
            condition(o, "Ready", true, None, None)
        } else {
            condition(o, "Ready", false, Some("ReadinessGatesNotReady"), None)
        };
        (condition(o, "ContainersReady", true, None, None), ready)
    } else {
        let message = format!("containers with unready status: {}", list(&unready));
        (
            condition(
                o,
                "ContainersReady",
                false,
                Some("ContainersNotReady"),
                Some(message.clone()),
            ),
            condition(o, "Ready", false, Some("ContainersNotReady"), Some(message)),
        )
    };
    conditions.push(ready);
    conditions.push(containers_ready);
    let scheduled = o
        .previous
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "PodScheduled")
        .cloned()
        .unwrap_or_else(|| condition(o, "PodScheduled", true, None, None));
    conditions.push(scheduled);
    let known = [
        "PodReadyToStartContainers",
        "Initialized",
        "Ready",
        "ContainersReady",
        "PodScheduled",
    ];
    conditions.extend(
        o.previous
            .conditions
            .iter()
            .flatten()
            .filter(|c| !known.contains(&c.type_.as_str()))
            .cloned(),
    );
    let pod_ip = o.pod_ip.map(str::to_string).or_else(|| o.previous.pod_ip.clone());
    PodStatus {
        phase: Some(phase.into()),
        conditions: Some(conditions),
        host_ip: Some(o.host_ip.into()),
        host_ips: Some(vec![HostIP { ip: o.host_ip.into() }]),
        pod_ips: pod_ip.clone().map(|ip| vec![PodIP { ip }]),
        pod_ip,
        start_time: o.previous.start_time.clone().or(Some(Time(o.now))),
        qos_class: Some(super::config::qos_class(o.pod).into()),
        init_container_statuses: (!init_statuses.is_empty()).then_some(init_statuses),
        container_statuses: Some(statuses),
        nominated_node_name: o.previous.nominated_node_name.clone(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cri(id: &str, name: &str, attempt: u32, state: api::ContainerState, exit_code: i32) -> api::ContainerStatus {
        api::ContainerStatus {
            id: id.into(),
            metadata: Some(api::ContainerMetadata {
                name: name.into(),
                attempt,
            }),
            state: state as i32,
            started_at: 1_700_000_000_000_000_000,
            finished_at: if state == api::ContainerState::ContainerExited {
                1_700_000_001_000_000_000
            } else {
                0
            },
            exit_code,
            image_ref: "sha256:abc".into(),
            ..Default::default()
        }
    }

    fn pod(policy: &str) -> Pod {
        serde_saphyr::from_str(&format!(
            "metadata: {{name: p, uid: u}}\nspec:\n  restartPolicy: {policy}\n  containers:\n  - {{name: a, image: busybox}}\n  - {{name: b, image: busybox}}\n"
        ))
        .unwrap()
    }

    fn status(pod: &Pod, containers: &HashMap<String, Vec<api::ContainerStatus>>, ready: bool) -> PodStatus {
        let probes = containers
            .values()
            .flatten()
            .map(|c| {
                (
                    c.id.clone(),
                    ProbeState {
                        started: true,
                        ready,
                        failed: None,
                    },
                )
            })
            .collect();
        pod_status(&Observed {
            pod,
            previous: &PodStatus::default(),
            runtime_name: "podvisor",
            host_ip: "192.0.2.1",
            pod_ip: Some("10.0.0.5"),
            sandbox_ready: true,
            containers,
            waiting: &HashMap::new(),
            probes: &probes,
            init: InitProgress::Done,
            now: Timestamp::UNIX_EPOCH,
        })
    }

    #[test]
    fn running_and_ready() {
        use api::ContainerState::*;
        let pod = pod("Always");
        let containers = HashMap::from([
            ("a".to_string(), vec![cri("1", "a", 0, ContainerRunning, 0)]),
            (
                "b".to_string(),
                vec![
                    cri("3", "b", 1, ContainerRunning, 0),
                    cri("2", "b", 0, ContainerExited, 2),
                ],
            ),
        ]);
        let s = status(&pod, &containers, true);
        assert_eq!(s.phase.as_deref(), Some("Running"));
        assert_eq!(s.pod_ip.as_deref(), Some("10.0.0.5"));
        let ready = s
            .conditions
            .as_ref()
            .unwrap()
            .iter()
            .find(|c| c.type_ == "Ready")
            .unwrap();
        assert_eq!(ready.status, "True");
        let b = &s.container_statuses.as_ref().unwrap()[1];
        assert_eq!(b.restart_count, 1);
        assert_eq!(b.container_id.as_deref(), Some("podvisor://3"));
        assert_eq!(b.last_state.as_ref().unwrap().terminated.as_ref().unwrap().exit_code, 2);
        let s = status(&pod, &containers, false);
        let ready = s
            .conditions
            .as_ref()
            .unwrap()
            .iter()
            .find(|c| c.type_ == "Ready")
            .unwrap();
        assert_eq!(ready.status, "False");
        assert_eq!(ready.message.as_deref(), Some("containers with unready status: [a b]"));
    }

    #[test]
    fn terminal_phases() {
        use api::ContainerState::*;
        let both = |a: i32, b: i32| {
            HashMap::from([
                ("a".to_string(), vec![cri("1", "a", 0, ContainerExited, a)]),
                ("b".to_string(), vec![cri("2", "b", 0, ContainerExited, b)]),
            ])
        };
        let phase = |policy: &str, a, b| status(&pod(policy), &both(a, b), true).phase.unwrap();
        assert_eq!(phase("Never", 0, 0), "Succeeded");
        assert_eq!(phase("Never", 0, 1), "Failed");
        assert_eq!(phase("OnFailure", 0, 0), "Succeeded");
        assert_eq!(phase("OnFailure", 0, 1), "Running");
        assert_eq!(phase("Always", 0, 0), "Running");
        let s = status(&pod("Never"), &both(0, 3), true);
        let b = &s.container_statuses.as_ref().unwrap()[1];
        let t = b.state.as_ref().unwrap().terminated.as_ref().unwrap();
        assert_eq!((t.exit_code, t.reason.as_deref()), (3, Some("Error")));
        let pending = status(&pod("Always"), &HashMap::new(), true);
        assert_eq!(pending.phase.as_deref(), Some("Pending"));
        let waiting = pending.container_statuses.unwrap()[0]
            .state
            .clone()
            .unwrap()
            .waiting
            .unwrap();
        assert_eq!(waiting.reason.as_deref(), Some("ContainerCreating"));
    }
}
