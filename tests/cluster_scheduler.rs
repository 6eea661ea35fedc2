//! The scheduler and the cluster controllers through the real `kubectl`,
//! against `podvisor up`. There is no node agent here: the tests make Node
//! (and Lease) objects themselves, and pods use an image that is never pulled.

mod common;

use std::time::{Duration, Instant};

use common::cluster::Cluster;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(15);
const IMAGE: &str = "example.invalid/never-pulled:1";

/// A Ready node with `cpu` allocatable, 8Gi memory, 110 pods and `labels`.
fn node(name: &str, cpu: &str, labels: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": labels},
        "spec": {},
        "status": {
            "capacity": {"cpu": cpu, "memory": "8Gi", "pods": "110"},
            "allocatable": {"cpu": cpu, "memory": "8Gi", "pods": "110"},
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                            "message": "test node", "lastHeartbeatTime": now()}],
        },
    })
}

/// A pod requesting `cpu`, with `spec` merged into its spec.
fn pod(name: &str, cpu: &str, spec: Value) -> Value {
    let mut pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"containers": [{"name": "c", "image": IMAGE,
                                 "resources": {"requests": {"cpu": cpu}}}]},
    });
    if let (Some(base), Value::Object(extra)) = (pod["spec"].as_object_mut(), spec) {
        base.extend(extra);
    }
    pod
}

fn now() -> String {
    let elapsed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    k8s_openapi::jiff::Timestamp::new(elapsed.as_secs() as i64, (elapsed.subsec_micros() * 1000) as i32)
        .unwrap()
        .to_string()
}

fn apply(c: &Cluster, objects: &[Value]) {
    let documents: Vec<String> = objects.iter().map(Value::to_string).collect();
    let name = format!("objects-{}.json", rand_suffix());
    let file = c.file(&name, &documents.join("\n"));
    c.ok(&["apply", "-f", &file]);
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// Waits for the pod to be bound and returns its node.
fn node_of(c: &Cluster, pod: &str) -> String {
    c.wait_output(&["get", "pod", pod, "-o", "jsonpath={.spec.nodeName}"], WAIT, |n| {
        !n.is_empty()
    })
}

/// Waits for the pod's PodScheduled=False condition to mention `text`; returns its message.
fn unschedulable(c: &Cluster, pod: &str, text: &str) -> String {
    let path = "jsonpath={.status.conditions[?(@.type==\"PodScheduled\")].status} \
                {.status.conditions[?(@.type==\"PodScheduled\")].reason} \
                {.status.conditions[?(@.type==\"PodScheduled\")].message}";
    let out = c.wait_output(&["get", "pod", pod, "-o", path], WAIT, |o| o.contains(text));
    assert!(out.starts_with("False Unschedulable "), "{out}");
    assert_eq!(c.ok(&["get", "pod", pod, "-o", "jsonpath={.spec.nodeName}"]), "");
    out["False Unschedulable ".len()..].to_string()
}

fn events(c: &Cluster, pod: &str, reason: &str) -> String {
    let selector = format!("involvedObject.name={pod},reason={reason}");
    c.ok(&[
        "get",
        "events",
        "--field-selector",
        &selector,
        "-o",
        "jsonpath={range .items[*]}{.type} {.count} {.source.component}: {.message}{\"\\n\"}{end}",
    ])
}

/// Waits for at least one such event; returns them as `events` does.
fn wait_events(c: &Cluster, pod: &str, reason: &str) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let found = events(c, pod, reason);
        if !found.is_empty() || Instant::now() > deadline {
            return found;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn pods_go_to_ready_nodes_and_wait_for_room() {
    let c = Cluster::start_with(&["--control-plane-only"], "");
    let mut not_ready = node("sick", "16", json!({}));
    not_ready["status"]["conditions"][0]["status"] = json!("False");
    apply(&c, &[node("small", "2", json!({})), not_ready]);

    let started = Instant::now();
    apply(&c, &[pod("fits", "500m", json!({}))]);
    assert_eq!(node_of(&c, "fits"), "small");
    eprintln!("apply to bound (with kubectl polling): {:?}", started.elapsed());
    assert_eq!(
        wait_events(&c, "fits", "Scheduled").trim(),
        "Normal 1 default-scheduler: Successfully assigned default/fits to small"
    );
    let conditions = c.ok(&[
        "get",
        "pod",
        "fits",
        "-o",
        "jsonpath={.status.conditions[*].type}={.status.conditions[*].status}",
    ]);
    assert_eq!(conditions, "PodScheduled=True");

    apply(&c, &[pod("big", "4", json!({}))]);
    let message = unschedulable(&c, "big", "Insufficient cpu");
    assert_eq!(
        message,
        "0/2 nodes are available: 1 Insufficient cpu, 1 node(s) had untolerated taint {node.kubernetes.io/not-ready: }."
    );
    assert!(c.ok(&["get", "pod", "big"]).contains("Pending"));
    let failed = wait_events(&c, "big", "FailedScheduling");
    assert!(
        failed.starts_with("Warning 1 default-scheduler: 0/2 nodes are available: 1 Insufficient cpu"),
        "{failed}"
    );
    let described = c.ok(&["describe", "pod", "big"]);
    assert!(
        described.contains("FailedScheduling") && described.contains("Insufficient cpu"),
        "{described}"
    );

    // A bigger node: the waiting pod goes there at once.
    apply(&c, &[node("large", "8", json!({}))]);
    assert_eq!(node_of(&c, "big"), "large");
    let conditions = c.ok(&[
        "get",
        "pod",
        "big",
        "-o",
        "jsonpath={.status.conditions[?(@.type==\"PodScheduled\")].status}",
    ]);
    assert_eq!(conditions, "True");
    // The repeated failures were one event, not one per attempt.
    assert_eq!(events(&c, "big", "FailedScheduling").lines().count(), 1);
}

#[test]
fn selectors_affinity_and_taints_pick_the_node() {
    let c = Cluster::start_with(&["--control-plane-only"], "");
    let mut gpu = node("gpu", "4", json!({"gpu": "true", "zone": "east"}));
    gpu["spec"]["taints"] = json!([{"key": "dedicated", "value": "gpu", "effect": "NoSchedule"}]);
    apply(
        &c,
        &[
            node("east", "4", json!({"zone": "east", "cores": "8"})),
            node("west", "4", json!({"zone": "west", "disk": "ssd", "cores": "32"})),
            gpu,
        ],
    );
    let required = |expressions: Value, fields: Value| {
        json!({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": expressions, "matchFields": fields}]}}}})
    };
    let toleration = json!([{"key": "dedicated", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}]);
    let mut tolerant = required(json!([{"key": "gpu", "operator": "Exists"}]), json!([]));
    tolerant["tolerations"] = toleration.clone();
    let mut tolerant_anywhere = required(
        json!([{"key": "zone", "operator": "In", "values": ["east"]}]),
        json!([]),
    );
    tolerant_anywhere["tolerations"] = toleration;
    tolerant_anywhere["affinity"]["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"] =
        json!([{"weight": 10, "preference": {"matchExpressions": [{"key": "gpu", "operator": "DoesNotExist"}]}}]);
    apply(
        &c,
        &[
            pod("by-selector", "100m", json!({"nodeSelector": {"zone": "west"}})),
            pod(
                "by-field",
                "100m",
                required(
                    json!([]),
                    json!([{"key": "metadata.name", "operator": "In", "values": ["east"]}]),
                ),
            ),
            pod(
                "by-number",
                "100m",
                required(json!([{"key": "cores", "operator": "Gt", "values": ["16"]}]), json!([])),
            ),
            pod(
                "not-east",
                "100m",
                required(
                    json!([{"key": "zone", "operator": "NotIn", "values": ["east"]}]),
                    json!([]),
                ),
            ),
            pod("tolerant", "100m", tolerant),
            pod("prefers-plain", "100m", tolerant_anywhere),
            pod(
                "intolerant",
                "100m",
                required(json!([{"key": "gpu", "operator": "Exists"}]), json!([])),
            ),
            pod(
                "prefers-ssd",
                "100m",
                json!({"affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 50, "preference": {"matchExpressions": [{"key": "disk", "operator": "In", "values": ["ssd"]}]}}]}}}),
            ),
        ],
    );
    for (pod, want) in [
        ("by-selector", "west"),
        ("by-field", "east"),
        ("by-number", "west"),
        ("not-east", "west"),
        ("tolerant", "gpu"),
        ("prefers-plain", "east"),
        ("prefers-ssd", "west"),
    ] {
        assert_eq!(node_of(&c, pod), want, "{pod}");
    }
    assert_eq!(
        unschedulable(&c, "intolerant", "taint"),
        "0/3 nodes are available: 1 node(s) had untolerated taint {dedicated: gpu}, \
         2 node(s) didn't match Pod's node affinity/selector."
    );
}

#[test]
fn cordons_host_ports_and_runtime_classes() {
    let c = Cluster::start_with(&["--control-plane-only"], "");
    apply(
        &c,
        &[
            node("a", "4", json!({"name": "a"})),
            node("b", "4", json!({"name": "b"})),
        ],
    );
    c.ok(&["cordon", "a"]);
    apply(&c, &[pod("anywhere", "100m", json!({}))]);
    assert_eq!(node_of(&c, "anywhere"), "b");
    apply(&c, &[pod("on-a", "100m", json!({"nodeSelector": {"name": "a"}}))]);
    assert_eq!(
        unschedulable(&c, "on-a", "unschedulable"),
        "0/2 nodes are available: 1 node(s) didn't match Pod's node affinity/selector, 1 node(s) were unschedulable."
    );
    c.ok(&["uncordon", "a"]);
    assert_eq!(node_of(&c, "on-a"), "a");

    let with_port = |name: &str| {
        let mut p = pod(name, "100m", json!({"nodeSelector": {"name": "b"}}));
        p["spec"]["containers"][0]["ports"] = json!([{"containerPort": 80, "hostPort": 8080}]);
        p
    };
    apply(&c, &[with_port("port-1")]);
    assert_eq!(node_of(&c, "port-1"), "b");
    apply(&c, &[with_port("port-2")]);
    unschedulable(&c, "port-2", "didn't have free ports for the requested pod ports");
    c.ok(&["delete", "pod", "port-1", "--grace-period=0", "--force"]);
    assert_eq!(node_of(&c, "port-2"), "b");

    // RuntimeClass `vm` exists; a node that lists its handlers must list it.
    c.ok(&["annotate", "node", "b", "podvisor.io/runtime-handlers=runc"]);
    apply(
        &c,
        &[
            pod("vm-pod", "100m", json!({"runtimeClassName": "vm"})),
            pod(
                "vm-on-b",
                "100m",
                json!({"runtimeClassName": "vm", "nodeSelector": {"name": "b"}}),
            ),
            pod("no-class", "100m", json!({"runtimeClassName": "nope"})),
        ],
    );
    assert_eq!(node_of(&c, "vm-pod"), "a");
    assert_eq!(
        unschedulable(&c, "vm-on-b", "runtime handler"),
        "0/2 nodes are available: 1 node(s) didn't match Pod's node affinity/selector, \
         1 node(s) didn't support the runtime handler \"vm\"."
    );
    assert_eq!(
        unschedulable(&c, "no-class", "not found"),
        "0/2 nodes are available: 2 runtimeclass.node.k8s.io \"nope\" not found."
    );
    c.ok(&[
        "annotate",
        "node",
        "b",
        "podvisor.io/runtime-handlers=runc,vm",
        "--overwrite",
    ]);
    assert_eq!(node_of(&c, "vm-on-b"), "b");
}

fn four_pods() -> Vec<Value> {
    (1..=4).map(|i| pod(&format!("p{i}"), "1", json!({}))).collect()
}

fn nodes_of_four(c: &Cluster) -> Vec<String> {
    let mut nodes: Vec<String> = (1..=4).map(|i| node_of(c, &format!("p{i}"))).collect();
    nodes.sort();
    nodes
}

#[test]
fn spread_is_the_default() {
    let c = Cluster::start_with(&["--control-plane-only"], "");
    apply(&c, &[node("a", "4", json!({})), node("b", "4", json!({}))]);
    // Applied together, so the scheduler must count the pods it just bound.
    apply(&c, &four_pods());
    assert_eq!(nodes_of_four(&c), ["a", "a", "b", "b"]);
}

#[test]
fn binpack_fills_one_node_first() {
    let c = Cluster::start_with(&["--control-plane-only", "--scheduler-strategy", "binpack"], "");
    apply(&c, &[node("a", "4", json!({})), node("b", "4", json!({}))]);
    apply(&c, &four_pods());
    assert_eq!(nodes_of_four(&c), ["a", "a", "a", "a"]);
    apply(&c, &[pod("p5", "1", json!({}))]);
    assert_eq!(node_of(&c, "p5"), "b");
}

#[test]
fn a_stale_lease_makes_the_node_unreachable() {
    let c = Cluster::start_with(&["--control-plane-only", "--node-monitor-grace-period", "3s"], "");
    let lease = |renewed: String| {
        json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
               "metadata": {"name": "n1", "namespace": "kube-node-lease"},
               "spec": {"holderIdentity": "n1", "leaseDurationSeconds": 40, "renewTime": renewed}})
    };
    apply(&c, &[node("n1", "4", json!({})), lease(now())]);
    let ready =
        "jsonpath={.status.conditions[?(@.type==\"Ready\")].status} {.spec.taints[*].key}:{.spec.taints[*].effect}";
    assert!(c.ok(&["get", "node", "n1", "-o", ready]).starts_with("True"));

    // No renewal for 3 s: Ready=Unknown and the unreachable taints.
    let started = Instant::now();
    let out = c.wait_output(&["get", "node", "n1", "-o", ready], WAIT, |o| o.starts_with("Unknown"));
    assert!(started.elapsed() >= Duration::from_secs(1), "{:?}", started.elapsed());
    let taints = c.ok(&[
        "get",
        "node",
        "n1",
        "-o",
        "jsonpath={range .spec.taints[*]}{.key}:{.effect} {end}",
    ]);
    assert!(
        taints.contains("node.kubernetes.io/unreachable:NoExecute"),
        "{out} {taints}"
    );
    assert!(taints.contains("node.kubernetes.io/unreachable:NoSchedule"), "{taints}");
    let reason = c.ok(&[
        "get",
        "node",
        "n1",
        "-o",
        "jsonpath={.status.conditions[?(@.type==\"Ready\")].reason}",
    ]);
    assert_eq!(reason, "NodeStatusUnknown");
    assert!(c.ok(&["get", "nodes"]).contains("NotReady"));

    // Pods stay off it meanwhile.
    apply(&c, &[pod("waits", "100m", json!({}))]);
    unschedulable(&c, "waits", "node.kubernetes.io/unreachable");

    // Renewed: back to Ready, taints gone, and the pod lands.
    let patch = json!({"spec": {"renewTime": now()}}).to_string();
    c.ok(&[
        "patch",
        "lease",
        "n1",
        "-n",
        "kube-node-lease",
        "--type",
        "merge",
        "-p",
        &patch,
    ]);
    let out = c.wait_output(&["get", "node", "n1", "-o", ready], WAIT, |o| o.starts_with("True"));
    assert_eq!(out.trim(), "True :", "{out}");
    assert_eq!(node_of(&c, "waits"), "n1");
}

#[test]
fn pods_of_a_deleted_node_are_collected() {
    let c = Cluster::start_with(&["--control-plane-only"], "");
    apply(&c, &[node("doomed", "4", json!({})), node("stays", "4", json!({}))]);
    let on_doomed = json!({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["doomed"]}]}]}}}});
    apply(
        &c,
        &[
            pod("scheduled", "100m", on_doomed),
            pod("pinned", "100m", json!({"nodeName": "doomed"})),
            pod("survivor", "100m", json!({"nodeName": "stays"})),
        ],
    );
    assert_eq!(node_of(&c, "scheduled"), "doomed");
    c.ok(&["delete", "node", "doomed"]);
    let left = c.wait_output(&["get", "pods", "-o", "name"], WAIT, |o| o.trim() == "pod/survivor");
    assert_eq!(left.trim(), "pod/survivor");
}

#[test]
fn pods_leave_an_unreachable_node_after_the_eviction_timeout() {
    let c = Cluster::start_with(
        &[
            "--control-plane-only",
            "--node-monitor-grace-period",
            "1s",
            "--pod-eviction-timeout",
            "3s",
        ],
        "",
    );
    let tolerate = |seconds: Value| {
        json!({"nodeName": "n1", "tolerations": [{"key": "node.kubernetes.io/unreachable", "operator": "Exists",
                                                  "effect": "NoExecute", "tolerationSeconds": seconds}]})
    };
    apply(
        &c,
        &[
            node("n1", "4", json!({})),
            pod("evicted", "100m", json!({"nodeName": "n1"})),
            pod("tolerant", "100m", tolerate(Value::Null)),
            pod("patient", "100m", tolerate(json!(3600))),
        ],
    );
    let deleting = "jsonpath={range .items[*]}{.metadata.name}={.metadata.deletionTimestamp} {end}";
    let out = c.wait_output(&["get", "pods", "-o", deleting], Duration::from_secs(30), |o| {
        o.split_whitespace()
            .any(|p| p.starts_with("evicted=") && p.len() > "evicted=".len())
    });
    let taint_added = c.ok(&[
        "get",
        "node",
        "n1",
        "-o",
        "jsonpath={.spec.taints[?(@.effect==\"NoExecute\")].timeAdded}",
    ]);
    let marked = out
        .split_whitespace()
        .find_map(|p| p.strip_prefix("evicted="))
        .unwrap()
        .to_string();
    let seconds = |t: &str| t.parse::<k8s_openapi::jiff::Timestamp>().unwrap().as_second();
    assert!(
        seconds(&marked) - seconds(&taint_added) >= 2,
        "evicted at {marked}, tainted at {taint_added}"
    );
    assert!(out.contains("tolerant= ") && out.contains("patient= "), "{out}");
    wait_events(&c, "evicted", "TaintManagerEviction");
}
