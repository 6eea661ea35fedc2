//! Deployments, ReplicaSets, DaemonSets and garbage collection through the real `kubectl`, against
//! `podvisor up`. Most tests run the control plane only, with Node objects made by the test and a fake
//! kubelet (below) that marks bound pods Running and Ready after a delay and finishes graceful deletions;
//! the last one runs real pods from the test registry.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::cluster::Cluster;
use common::oci::{Flavour, TestImage};
use common::push::push_image;
use common::registry::Registry;
use k8s_openapi::api::core::v1::Pod;
use podvisor::cluster::client::{Client, ListParams};
use podvisor::cluster::informer::{Change, Informer};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(30);

fn now() -> String {
    let elapsed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    k8s_openapi::jiff::Timestamp::from_second(elapsed.as_secs() as i64)
        .unwrap()
        .to_string()
}

/// A Ready node with room for plenty of pods.
fn node(name: &str, taints: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "spec": {"taints": taints},
        "status": {
            "capacity": {"cpu": "16", "memory": "32Gi", "pods": "110"},
            "allocatable": {"cpu": "16", "memory": "32Gi", "pods": "110"},
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                            "message": "test node", "lastHeartbeatTime": now()}],
        },
    })
}

fn control_plane(nodes: &[Value]) -> Cluster {
    // Test nodes never renew a lease: keep them Ready for the whole test.
    let c = Cluster::start_with(&["--control-plane-only", "--node-monitor-grace-period", "1h"], "");
    apply(&c, "nodes", nodes);
    c
}

fn apply(c: &Cluster, name: &str, objects: &[Value]) {
    let text: Vec<String> = objects.iter().map(Value::to_string).collect();
    let file = c.file(&format!("{name}.json"), &text.join("\n"));
    c.ok(&["apply", "-f", &file]);
}

/// What the fake kubelet saw of one label selection while it ran.
#[derive(Default)]
struct Extremes {
    /// Fewest Ready (not terminating) pods seen since `reset`.
    min_ready: i64,
    /// Most not-terminating pods seen since `reset`.
    max_active: i64,
}

/// Plays the node agent for pods bound to test nodes: after `ready_delay` a pod becomes Running and Ready; a
/// pod being deleted is removed at once. It also records the extremes of pods labelled `app=<tracked>`.
struct FakeKubelet {
    runtime: Option<tokio::runtime::Runtime>,
    ready_delay_ms: Arc<AtomicU64>,
    extremes: Arc<Mutex<Extremes>>,
    tracked_ready: Arc<AtomicI64>,
}

impl FakeKubelet {
    fn start(c: &Cluster, tracked_app: &str) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let client = Client::from_kubeconfig(&c.kubeconfig()).unwrap();
        let ready_delay_ms = Arc::new(AtomicU64::new(300));
        let extremes = Arc::new(Mutex::new(Extremes::default()));
        let tracked_ready = Arc::new(AtomicI64::new(0));
        let (delay, ext, tracked, app) = (
            ready_delay_ms.clone(),
            extremes.clone(),
            tracked_ready.clone(),
            tracked_app.to_string(),
        );
        runtime.spawn(async move {
            let pods: Informer<Pod> = Informer::spawn(client.clone(), None, ListParams::default());
            let mut changes = pods.subscribe();
            pods.wait_synced().await;
            let mut handled: HashSet<String> = HashSet::new();
            let mut finishing: HashSet<String> = HashSet::new();
            loop {
                let all = pods.list();
                let mine: Vec<&Pod> = all
                    .iter()
                    .filter(|p| p.metadata.labels.as_ref().and_then(|l| l.get("app")) == Some(&app))
                    .collect();
                let active = mine.iter().filter(|p| p.metadata.deletion_timestamp.is_none()).count() as i64;
                let ready = mine
                    .iter()
                    .filter(|p| p.metadata.deletion_timestamp.is_none() && is_ready(p))
                    .count() as i64;
                tracked.store(ready, Ordering::SeqCst);
                {
                    let mut e = ext.lock().unwrap();
                    e.min_ready = e.min_ready.min(ready);
                    e.max_active = e.max_active.max(active);
                }
                for pod in &all {
                    let ns = pod.metadata.namespace.clone().unwrap_or_default();
                    let name = pod.metadata.name.clone().unwrap_or_default();
                    let bound = pod
                        .spec
                        .as_ref()
                        .and_then(|s| s.node_name.as_deref())
                        .is_some_and(|n| !n.is_empty());
                    if pod.metadata.deletion_timestamp.is_some() {
                        if !finishing.insert(format!("{ns}/{name}")) {
                            continue;
                        }
                        let (client, ns, name) = (client.clone(), ns.clone(), name.clone());
                        tokio::spawn(async move { client.delete::<Pod>(Some(&ns), &name, Some(0)).await });
                    } else if bound && !is_ready(pod) && handled.insert(format!("{ns}/{name}")) {
                        let (client, wait) = (client.clone(), delay.load(Ordering::SeqCst));
                        tokio::spawn(async move {
                            tokio::time::sleep(Duration::from_millis(wait)).await;
                            let status = json!({"status": {"phase": "Running", "conditions": [
                                {"type": "PodScheduled", "status": "True", "lastTransitionTime": now()},
                                {"type": "ContainersReady", "status": "True", "lastTransitionTime": now()},
                                {"type": "Ready", "status": "True", "lastTransitionTime": now()}]}});
                            let _ = client
                                .merge_patch::<Pod>(Some(&ns), &name, Some("status"), &status)
                                .await;
                        });
                    }
                }
                match changes.recv().await {
                    Ok(Change::Deleted(p)) => {
                        let key = format!(
                            "{}/{}",
                            p.metadata.namespace.unwrap_or_default(),
                            p.metadata.name.unwrap_or_default()
                        );
                        handled.remove(&key);
                        finishing.remove(&key);
                    }
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(_) => return,
                }
            }
        });
        FakeKubelet {
            runtime: Some(runtime),
            ready_delay_ms,
            extremes,
            tracked_ready,
        }
    }

    /// Starts a new observation window.
    fn reset(&self) {
        let now = self.tracked_ready.load(Ordering::SeqCst);
        *self.extremes.lock().unwrap() = Extremes {
            min_ready: now,
            max_active: 0,
        };
    }

    fn extremes(&self) -> (i64, i64) {
        let e = self.extremes.lock().unwrap();
        (e.min_ready, e.max_active)
    }
}

impl Drop for FakeKubelet {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn rollout_ok(c: &Cluster, what: &str) {
    let out = c.ok(&["rollout", "status", what, "--timeout=60s"]);
    assert!(out.contains("successfully rolled out"), "{out}");
}

fn jsonpath(c: &Cluster, args: &[&str], path: &str) -> String {
    let path = format!("jsonpath={path}");
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["-o", &path]);
    c.ok(&all)
}

/// Names of the app's pods that are not being deleted.
fn active_pods(c: &Cluster, app: &str) -> Vec<String> {
    let selector = format!("app={app}");
    let out = jsonpath(
        c,
        &["get", "pods", "-l", &selector],
        "{range .items[*]}{.metadata.name} {.metadata.deletionTimestamp}{\"\\n\"}{end}",
    );
    out.lines()
        .filter(|l| l.split_whitespace().count() == 1)
        .map(|l| l.trim().to_string())
        .collect()
}

fn wait_active_pods(c: &Cluster, app: &str, n: usize) {
    let deadline = Instant::now() + WAIT;
    loop {
        let pods = active_pods(c, app);
        if pods.len() == n {
            return;
        }
        assert!(Instant::now() < deadline, "wanted {n} pods of {app}, have {pods:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `REVISION` column of `kubectl rollout history`.
fn revisions(c: &Cluster, what: &str) -> Vec<String> {
    c.ok(&["rollout", "history", what])
        .lines()
        .skip_while(|l| !l.starts_with("REVISION"))
        .skip(1)
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

fn replica_sets(c: &Cluster, app: &str) -> Vec<String> {
    let selector = format!("app={app}");
    jsonpath(c, &["get", "rs", "-l", &selector], "{.items[*].metadata.name}")
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

#[test]
fn deployment_scales_rolls_out_and_rolls_back() {
    let c = control_plane(&[node("n1", json!([])), node("n2", json!([]))]);
    let kubelet = FakeKubelet::start(&c, "web");

    // `kubectl create deployment` sends a protobuf body.
    let out = c.ok(&[
        "create",
        "deployment",
        "web",
        "--image=example.invalid/web:1",
        "--replicas=3",
    ]);
    assert_eq!(out.trim(), "deployment.apps/web created");
    let started = Instant::now();
    rollout_ok(&c, "deployment/web");
    eprintln!("3 replicas available after {:?}", started.elapsed());
    let table = c.ok(&["get", "deploy", "web"]);
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["NAME", "READY", "UP-TO-DATE", "AVAILABLE", "AGE"]);
    let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(&row[..4], ["web", "3/3", "3", "3"], "{table}");
    let wide = c.ok(&["get", "deploy", "web", "-o", "wide"]);
    assert!(
        wide.contains("CONTAINERS") && wide.contains("example.invalid/web:1") && wide.contains("app=web"),
        "{wide}"
    );
    let rs = replica_sets(&c, "web");
    assert_eq!(rs.len(), 1);
    let rs_table = c.ok(&["get", "rs"]);
    assert!(
        rs_table.starts_with("NAME") && rs_table.contains("DESIRED   CURRENT   READY"),
        "{rs_table}"
    );
    let owners = jsonpath(
        &c,
        &["get", "pods", "-l", "app=web"],
        "{range .items[*]}{.metadata.ownerReferences[0].kind}/{.metadata.ownerReferences[0].name}/{.metadata.ownerReferences[0].controller} {end}",
    );
    assert_eq!(
        owners.split_whitespace().collect::<Vec<_>>(),
        vec![format!("ReplicaSet/{}/true", rs[0]); 3]
    );
    let rs_owner = jsonpath(
        &c,
        &["get", "rs", &rs[0]],
        "{.metadata.ownerReferences[0].kind}/{.metadata.ownerReferences[0].name}",
    );
    assert_eq!(rs_owner, "Deployment/web");

    // Scale up and back down; a deleted pod is replaced.
    c.ok(&["scale", "deployment/web", "--replicas=5"]);
    rollout_ok(&c, "deployment/web");
    wait_active_pods(&c, "web", 5);
    c.ok(&["scale", "deployment/web", "--replicas=3"]);
    wait_active_pods(&c, "web", 3);
    let victim = active_pods(&c, "web")[0].clone();
    c.ok(&["delete", "pod", &victim]);
    c.wait_output(
        &["get", "deploy", "web", "-o", "jsonpath={.status.availableReplicas}"],
        WAIT,
        |a| a == "3",
    );
    assert!(!active_pods(&c, "web").contains(&victim));

    // A rolling update: 3 replicas, 25% → maxSurge 1, maxUnavailable 0.
    kubelet.reset();
    c.ok(&["set", "image", "deployment/web", "web=example.invalid/web:2"]);
    rollout_ok(&c, "deployment/web");
    let (min_ready, max_active) = kubelet.extremes();
    eprintln!("rolling update: at least {min_ready} ready, at most {max_active} pods");
    assert!(min_ready >= 3, "ready pods dropped to {min_ready}");
    assert!(max_active <= 4, "{max_active} pods at once");
    assert_eq!(revisions(&c, "deployment/web"), ["1", "2"]);
    assert_eq!(replica_sets(&c, "web").len(), 2);
    let images = jsonpath(
        &c,
        &["get", "pods", "-l", "app=web"],
        "{.items[*].spec.containers[0].image}",
    );
    assert_eq!(
        images.split_whitespace().collect::<Vec<_>>(),
        ["example.invalid/web:2"; 3]
    );

    // Undo brings the first template back as revision 3.
    let undone = c.ok(&["rollout", "undo", "deployment/web"]);
    assert!(undone.contains("rolled back"), "{undone}");
    rollout_ok(&c, "deployment/web");
    let image = jsonpath(
        &c,
        &["get", "deploy", "web"],
        "{.spec.template.spec.containers[0].image}",
    );
    assert_eq!(image, "example.invalid/web:1");
    assert_eq!(revisions(&c, "deployment/web"), ["2", "3"]);
    let first = &rs[0];
    let annotations = jsonpath(
        &c,
        &["get", "rs", first],
        "{.metadata.annotations.deployment\\.kubernetes\\.io/revision} {.metadata.annotations.deployment\\.kubernetes\\.io/revision-history}",
    );
    assert_eq!(annotations, "3 1");
    assert_eq!(
        jsonpath(
            &c,
            &["get", "deploy", "web"],
            "{.metadata.annotations.deployment\\.kubernetes\\.io/revision}"
        ),
        "3"
    );

    // Paused: template changes wait; resume rolls them out.
    c.ok(&["rollout", "pause", "deployment/web"]);
    c.ok(&["set", "image", "deployment/web", "web=example.invalid/web:3"]);
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(
        replica_sets(&c, "web").len(),
        2,
        "a paused deployment made a ReplicaSet"
    );
    c.ok(&["rollout", "resume", "deployment/web"]);
    rollout_ok(&c, "deployment/web");
    assert_eq!(replica_sets(&c, "web").len(), 3);

    // Restart: a new ReplicaSet with the restartedAt template annotation.
    c.ok(&["rollout", "restart", "deployment/web"]);
    rollout_ok(&c, "deployment/web");
    assert_eq!(revisions(&c, "deployment/web"), ["2", "3", "4", "5"]);
    let restarted = jsonpath(
        &c,
        &["get", "deploy", "web"],
        "{.spec.template.metadata.annotations.kubectl\\.kubernetes\\.io/restartedAt}",
    );
    assert!(!restarted.is_empty());

    // History is trimmed to revisionHistoryLimit old ReplicaSets.
    c.ok(&[
        "patch",
        "deployment",
        "web",
        "-p",
        r#"{"spec":{"revisionHistoryLimit":1}}"#,
    ]);
    c.wait_output(&["get", "rs", "-l", "app=web", "-o", "name"], WAIT, |o| {
        o.lines().count() == 2
    });

    let described = c.ok(&["describe", "deployment", "web"]);
    assert!(described.contains("ScalingReplicaSet"), "{described}");
    let conditions = jsonpath(
        &c,
        &["get", "deploy", "web"],
        "{range .status.conditions[*]}{.type}={.status}/{.reason} {end}",
    );
    assert!(
        conditions.contains("Available=True/MinimumReplicasAvailable"),
        "{conditions}"
    );
    assert!(
        conditions.contains("Progressing=True/NewReplicaSetAvailable"),
        "{conditions}"
    );
}

/// `image=replicas` of the app's ReplicaSets, sorted.
fn rs_sizes(c: &Cluster, app: &str) -> Vec<String> {
    let selector = format!("app={app}");
    let out = jsonpath(
        c,
        &["get", "rs", "-l", &selector],
        "{range .items[*]}{.spec.template.spec.containers[0].image}={.spec.replicas} {end}",
    );
    let mut sizes: Vec<String> = out.split_whitespace().map(str::to_string).collect();
    sizes.sort();
    sizes
}

fn wait_rs_sizes(c: &Cluster, app: &str, want: &[&str]) {
    let deadline = Instant::now() + WAIT;
    loop {
        let sizes = rs_sizes(c, app);
        if sizes == want {
            return;
        }
        assert!(Instant::now() < deadline, "ReplicaSets {sizes:?}, wanted {want:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn scaling_mid_rollout_is_proportional() {
    let c = control_plane(&[node("n1", json!([]))]);
    let kubelet = FakeKubelet::start(&c, "prop");
    c.ok(&[
        "create",
        "deployment",
        "prop",
        "--image=example.invalid/prop:1",
        "--replicas=4",
    ]);
    rollout_ok(&c, "deployment/prop");
    // New pods never get ready: the rollout stops at 3 old + 2 new (4 replicas, 25% surge and unavailable).
    kubelet.ready_delay_ms.store(3_600_000, Ordering::SeqCst);
    c.ok(&["set", "image", "deployment/prop", "*=example.invalid/prop:2"]);
    wait_rs_sizes(&c, "prop", &["example.invalid/prop:1=3", "example.invalid/prop:2=2"]);
    // Scaled to 8 (10 with the surge) mid-rollout: each ReplicaSet keeps its share, 6 and 4.
    c.ok(&["scale", "deployment/prop", "--replicas=8"]);
    wait_rs_sizes(&c, "prop", &["example.invalid/prop:1=6", "example.invalid/prop:2=4"]);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        rs_sizes(&c, "prop"),
        ["example.invalid/prop:1=6", "example.invalid/prop:2=4"],
        "the shares hold"
    );
    let desired = jsonpath(
        &c,
        &["get", "rs", "-l", "app=prop"],
        "{.items[*].metadata.annotations.deployment\\.kubernetes\\.io/desired-replicas}",
    );
    assert_eq!(desired, "8 8");
    // And back down to 4 (5 with the surge): 3 and 2 again.
    c.ok(&["scale", "deployment/prop", "--replicas=4"]);
    wait_rs_sizes(&c, "prop", &["example.invalid/prop:1=3", "example.invalid/prop:2=2"]);
}

#[test]
fn recreate_progress_deadline_and_validation() {
    let c = control_plane(&[node("n1", json!([]))]);
    let kubelet = FakeKubelet::start(&c, "rec");
    let deployment = |name: &str, image: &str, extra: Value| {
        let mut d = json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name},
            "spec": {"replicas": 2, "selector": {"matchLabels": {"app": name}},
                     "template": {"metadata": {"labels": {"app": name}},
                                  "spec": {"containers": [{"name": "c", "image": image}]}}},
        });
        if let Value::Object(extra) = extra {
            d["spec"].as_object_mut().unwrap().extend(extra);
        }
        d
    };
    apply(
        &c,
        "rec",
        &[deployment(
            "rec",
            "example.invalid/a:1",
            json!({"strategy": {"type": "Recreate"}}),
        )],
    );
    rollout_ok(&c, "deployment/rec");
    // Recreate: no new pod before every old one is gone.
    kubelet.reset();
    apply(
        &c,
        "rec2",
        &[deployment(
            "rec",
            "example.invalid/a:2",
            json!({"strategy": {"type": "Recreate"}}),
        )],
    );
    rollout_ok(&c, "deployment/rec");
    let (_, max_active) = kubelet.extremes();
    assert!(max_active <= 2, "{max_active} pods at once during Recreate");

    // Pods that never become ready: the progress deadline passes.
    kubelet.ready_delay_ms.store(3_600_000, Ordering::SeqCst);
    apply(
        &c,
        "slow",
        &[deployment(
            "slow",
            "example.invalid/a:1",
            json!({"progressDeadlineSeconds": 2}),
        )],
    );
    let out = c.kubectl(&["rollout", "status", "deployment/slow", "--timeout=30s"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("exceeded its progress deadline"),
        "{stderr}"
    );
    let progressing = jsonpath(
        &c,
        &["get", "deploy", "slow"],
        "{.status.conditions[?(@.type==\"Progressing\")].status}/{.status.conditions[?(@.type==\"Progressing\")].reason}",
    );
    assert_eq!(progressing, "False/ProgressDeadlineExceeded");

    // Validation names the field; the selector is immutable.
    let mut bad = deployment("bad", "example.invalid/a:1", json!({}));
    bad["spec"]["selector"]["matchLabels"]["app"] = json!("other");
    let file = c.file("bad.json", &bad.to_string());
    let err = c.fails(&["apply", "-f", &file]);
    assert!(
        err.contains("spec.template.metadata.labels") && err.contains("does not match"),
        "{err}"
    );
    let mut no_selector = deployment("bad", "example.invalid/a:1", json!({}));
    no_selector["spec"].as_object_mut().unwrap().remove("selector");
    let file = c.file("bad2.json", &no_selector.to_string());
    let err = c.fails(&["create", "-f", &file]);
    assert!(err.contains("spec.selector: Required value"), "{err}");
    let err = c.fails(&[
        "patch",
        "deployment",
        "rec",
        "-p",
        r#"{"spec":{"selector":{"matchLabels":{"app":"x"}},"template":{"metadata":{"labels":{"app":"x"}}}}}"#,
    ]);
    assert!(err.contains("field is immutable"), "{err}");

    // `kubectl create service` sends protobuf too.
    let out = c.ok(&["create", "service", "clusterip", "rec", "--tcp=80:8080"]);
    assert_eq!(out.trim(), "service/rec created");
    let svc = jsonpath(
        &c,
        &["get", "svc", "rec"],
        "{.spec.type} {.spec.selector.app} {.spec.ports[0].port}:{.spec.ports[0].targetPort}/{.spec.ports[0].protocol}",
    );
    assert_eq!(svc, "ClusterIP rec 80:8080/TCP");

    let resources = c.ok(&["api-resources", "--api-group=apps", "--no-headers"]);
    for expected in ["deploy", "rs", "ds", "controllerrevisions"] {
        assert!(resources.contains(expected), "{resources}");
    }
    let all = c.ok(&["get", "all"]);
    assert!(
        all.contains("deployment.apps/rec") && all.contains("replicaset.apps/rec-"),
        "{all}"
    );
}

#[test]
fn deletes_cascade_orphan_or_wait_for_dependents() {
    let c = control_plane(&[node("n1", json!([]))]);
    let _kubelet = FakeKubelet::start(&c, "none");
    for app in ["bg", "orphan", "fg"] {
        c.ok(&[
            "create",
            "deployment",
            app,
            "--image=example.invalid/a:1",
            "--replicas=2",
        ]);
    }
    for app in ["bg", "orphan", "fg"] {
        rollout_ok(&c, &format!("deployment/{app}"));
    }

    // Background (kubectl's default): the deployment goes, then its ReplicaSet and pods.
    c.ok(&["delete", "deployment", "bg"]);
    c.wait_output(&["get", "rs,pods", "-l", "app=bg", "-o", "name"], WAIT, str::is_empty);

    // Orphan: the ReplicaSet stays, without owner, and keeps its pods.
    let rs = replica_sets(&c, "orphan");
    c.ok(&["delete", "deployment", "orphan", "--cascade=orphan"]);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(replica_sets(&c, "orphan"), rs);
    assert_eq!(jsonpath(&c, &["get", "rs", &rs[0]], "{.metadata.ownerReferences}"), "");
    assert_eq!(active_pods(&c, "orphan").len(), 2);

    // Foreground: `kubectl delete` returns once the dependents are gone, then the owner.
    let started = Instant::now();
    c.ok(&["delete", "deployment", "fg", "--cascade=foreground"]);
    eprintln!("foreground delete took {:?}", started.elapsed());
    assert_eq!(c.ok(&["get", "deploy,rs,pods", "-l", "app=fg", "-o", "name"]), "");

    // Only dependents with blockOwnerDeletion hold a foreground deletion up: a finalizer keeps both
    // dependents here, and the owner goes as soon as the blocking one is released.
    c.ok(&["create", "configmap", "owner"]);
    let owner_uid = jsonpath(&c, &["get", "configmap", "owner"], "{.metadata.uid}");
    let dependent = |name: &str, block: bool| {
        json!({"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": name, "finalizers": ["example.com/hold"],
                            "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner",
                                                 "uid": owner_uid, "blockOwnerDeletion": block}]}})
    };
    apply(
        &c,
        "dependents",
        &[dependent("blocking", true), dependent("loose", false)],
    );
    c.ok(&["delete", "configmap", "owner", "--cascade=foreground", "--wait=false"]);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        c.ok(&["get", "configmap", "owner", "-o", "name"]).trim(),
        "configmap/owner"
    );
    c.ok(&[
        "patch",
        "configmap",
        "blocking",
        "--type=merge",
        "-p",
        r#"{"metadata":{"finalizers":null}}"#,
    ]);
    c.wait_output(
        &["get", "configmap", "owner", "--ignore-not-found", "-o", "name"],
        WAIT,
        str::is_empty,
    );
    let loose = jsonpath(&c, &["get", "configmap", "loose"], "{.metadata.deletionTimestamp}");
    assert!(!loose.is_empty(), "the loose dependent is being deleted too");
    c.ok(&[
        "patch",
        "configmap",
        "loose",
        "--type=merge",
        "-p",
        r#"{"metadata":{"finalizers":null}}"#,
    ]);

    // A new deployment selecting the orphaned ReplicaSet adopts it (same template: no new pods).
    let pods = active_pods(&c, "orphan");
    c.ok(&[
        "create",
        "deployment",
        "orphan",
        "--image=example.invalid/a:1",
        "--replicas=2",
    ]);
    c.wait_output(
        &[
            "get",
            "rs",
            &rs[0],
            "-o",
            "jsonpath={.metadata.ownerReferences[0].name}",
        ],
        WAIT,
        |o| o == "orphan",
    );
    rollout_ok(&c, "deployment/orphan");
    assert_eq!(replica_sets(&c, "orphan"), rs);
    assert_eq!(active_pods(&c, "orphan"), pods);
    c.ok(&["delete", "deployment", "orphan"]);
    c.wait_output(
        &["get", "rs,pods", "-l", "app=orphan", "-o", "name"],
        WAIT,
        str::is_empty,
    );
}

#[test]
fn daemonset_runs_one_pod_per_eligible_node() {
    let tainted = node(
        "dedicated",
        json!([{"key": "dedicated", "value": "db", "effect": "NoSchedule"}]),
    );
    let c = control_plane(&[node("n1", json!([])), node("n2", json!([])), tainted]);
    let kubelet = FakeKubelet::start(&c, "agent");
    let ds = |image: &str| {
        json!({
            "apiVersion": "apps/v1", "kind": "DaemonSet",
            "metadata": {"name": "agent"},
            "spec": {"selector": {"matchLabels": {"app": "agent"}},
                     "template": {"metadata": {"labels": {"app": "agent"}},
                                  "spec": {"containers": [{"name": "c", "image": image}]}}},
        })
    };
    apply(&c, "ds", &[ds("example.invalid/agent:1")]);
    rollout_ok(&c, "daemonset/agent");
    let placed = jsonpath(&c, &["get", "pods", "-l", "app=agent"], "{.items[*].spec.nodeName}");
    let mut nodes: Vec<&str> = placed.split_whitespace().collect();
    nodes.sort();
    assert_eq!(nodes, ["n1", "n2"]);
    let table = c.ok(&["get", "ds"]);
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAME",
            "DESIRED",
            "CURRENT",
            "READY",
            "UP-TO-DATE",
            "AVAILABLE",
            "NODE",
            "SELECTOR",
            "AGE"
        ]
    );
    let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(&row[..6], ["agent", "2", "2", "2", "2", "2"], "{table}");

    // A template change rolls over the nodes; history comes from ControllerRevisions.
    apply(&c, "ds2", &[ds("example.invalid/agent:2")]);
    rollout_ok(&c, "daemonset/agent");
    let images = jsonpath(
        &c,
        &["get", "pods", "-l", "app=agent"],
        "{.items[*].spec.containers[0].image}",
    );
    assert_eq!(
        images.split_whitespace().collect::<Vec<_>>(),
        ["example.invalid/agent:2"; 2]
    );
    assert_eq!(revisions(&c, "daemonset/agent"), ["1", "2"]);

    // maxSurge 1, maxUnavailable 0: each node's new daemon starts beside the old one, which goes once the new
    // one is available; never fewer than 2 ready, never more than 3 at once.
    let mut surge = ds("example.invalid/agent:3");
    surge["spec"]["updateStrategy"] = json!({"type": "RollingUpdate",
                                            "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}});
    kubelet.reset();
    apply(&c, "ds3", &[surge]);
    rollout_ok(&c, "daemonset/agent");
    wait_active_pods(&c, "agent", 2);
    let images = jsonpath(
        &c,
        &["get", "pods", "-l", "app=agent"],
        "{.items[*].spec.containers[0].image}",
    );
    assert_eq!(
        images.split_whitespace().collect::<Vec<_>>(),
        ["example.invalid/agent:3"; 2]
    );
    let (min_ready, max_active) = kubelet.extremes();
    assert_eq!(
        (min_ready, max_active),
        (2, 3),
        "ready never below 2, at most one surge pod"
    );

    // A new node gets its daemon.
    apply(&c, "n3", &[node("n3", json!([]))]);
    c.wait_output(
        &[
            "get",
            "pods",
            "-l",
            "app=agent",
            "-o",
            "jsonpath={.items[*].spec.nodeName}",
        ],
        WAIT,
        |o| o.contains("n3"),
    );
    c.ok(&["delete", "ds", "agent"]);
    c.wait_output(&["get", "pods", "-l", "app=agent", "-o", "name"], WAIT, str::is_empty);
}

#[test]
fn statefulset_creates_in_order_and_updates_from_the_top() {
    let c = control_plane(&[node("n1", json!([]))]);
    let kubelet = FakeKubelet::start(&c, "db");
    let sts = |image: &str, replicas: i64| {
        json!({
            "apiVersion": "apps/v1", "kind": "StatefulSet",
            "metadata": {"name": "db"},
            "spec": {"replicas": replicas, "serviceName": "db", "selector": {"matchLabels": {"app": "db"}},
                     "template": {"metadata": {"labels": {"app": "db"}},
                                  "spec": {"containers": [{"name": "c", "image": image}]}}},
        })
    };
    kubelet.ready_delay_ms.store(200, Ordering::SeqCst);
    apply(&c, "sts", &[sts("example.invalid/db:1", 3)]);
    let out = c.ok(&["rollout", "status", "statefulset/db", "--timeout=60s"]);
    assert!(out.contains("complete"), "{out}");
    // Ordered: each pod was created after the previous one was ready.
    let created = jsonpath(
        &c,
        &["get", "pods", "-l", "app=db", "--sort-by=.metadata.creationTimestamp"],
        "{.items[*].metadata.name}",
    );
    assert_eq!(created, "db-0 db-1 db-2");
    let hostnames = jsonpath(&c, &["get", "pods", "-l", "app=db"], "{.items[*].spec.hostname}");
    assert_eq!(hostnames, "db-0 db-1 db-2");
    let table = c.ok(&["get", "sts"]);
    assert!(table.starts_with("NAME") && table.contains("db     3/3"), "{table}");

    apply(&c, "sts2", &[sts("example.invalid/db:2", 3)]);
    let out = c.ok(&["rollout", "status", "statefulset/db", "--timeout=60s"]);
    assert!(out.contains("complete"), "{out}");
    c.wait_output(
        &[
            "get",
            "pods",
            "-l",
            "app=db",
            "-o",
            "jsonpath={.items[*].spec.containers[0].image}",
        ],
        WAIT,
        |o| o == "example.invalid/db:2 example.invalid/db:2 example.invalid/db:2",
    );
    assert_eq!(revisions(&c, "statefulset/db"), ["1", "2"]);

    c.ok(&["scale", "statefulset/db", "--replicas=1"]);
    wait_active_pods(&c, "db", 1);
    assert_eq!(active_pods(&c, "db"), ["db-0"]);
}

#[test]
fn deployment_of_real_pods_becomes_available_and_heals() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let registry = runtime.block_on(async {
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
    let image = format!("{}/test/busybox:latest", registry.host());
    let c = Cluster::start_with(&["--node-name", "testnode"], "");
    let deployment = json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "real"},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "real"}},
                 "template": {"metadata": {"labels": {"app": "real"}},
                              "spec": {"terminationGracePeriodSeconds": 1,
                                       "containers": [{"name": "c", "image": image,
                                                       "command": ["sh", "-c", "sleep 3600"]}]}}},
    });
    let started = Instant::now();
    apply(&c, "real", &[deployment]);
    let out = c.ok(&["rollout", "status", "deployment/real", "--timeout=120s"]);
    assert!(out.contains("successfully rolled out"), "{out}");
    eprintln!("2 real replicas available after {:?}", started.elapsed());
    let phases = jsonpath(&c, &["get", "pods", "-l", "app=real"], "{.items[*].status.phase}");
    assert_eq!(phases, "Running Running");

    let victim = active_pods(&c, "real")[0].clone();
    let started = Instant::now();
    c.ok(&["delete", "pod", &victim]);
    c.wait_output(
        &["get", "deploy", "real", "-o", "jsonpath={.status.availableReplicas}"],
        Duration::from_secs(60),
        |a| a == "2",
    );
    let pods = active_pods(&c, "real");
    assert!(pods.len() == 2 && !pods.contains(&victim), "{pods:?}");
    eprintln!("deleted pod replaced and available after {:?}", started.elapsed());

    c.ok(&["delete", "deployment", "real"]);
    c.wait_output(
        &["get", "pods", "-l", "app=real", "-o", "name"],
        Duration::from_secs(60),
        str::is_empty,
    );
}

/// Pods must run as an existing ServiceAccount: until it exists, the ReplicaSet
/// (and its Deployment) report ReplicaFailure with the API server's reason, and
/// the pods come once it is created.
#[test]
fn replica_failure_until_the_service_account_exists() {
    let c = control_plane(&[node("n1", json!([]))]);
    let _kubelet = FakeKubelet::start(&c, "robotic");
    let direct = c.fails(&[
        "run",
        "lone",
        "--image=busybox",
        "--overrides",
        r#"{"spec":{"serviceAccountName":"robot"}}"#,
    ]);
    assert!(
        direct.contains("error looking up service account default/robot: serviceaccount \"robot\" not found"),
        "{direct}"
    );
    c.ok(&[
        "create",
        "deployment",
        "robotic",
        "--image=example.invalid/robotic:1",
        "--replicas=2",
    ]);
    rollout_ok(&c, "deployment/robotic");
    c.ok(&[
        "patch",
        "deployment",
        "robotic",
        "-p",
        r#"{"spec":{"template":{"spec":{"serviceAccountName":"robot"}}}}"#,
    ]);
    let failure = "{.status.conditions[?(@.type==\"ReplicaFailure\")].reason}: {.status.conditions[?(@.type==\"ReplicaFailure\")].message}";
    let deadline = Instant::now() + WAIT;
    let shown = loop {
        let shown = jsonpath(&c, &["get", "deployment", "robotic"], failure);
        if shown.starts_with("FailedCreate: ") {
            break shown;
        }
        assert!(
            Instant::now() < deadline,
            "no ReplicaFailure on the Deployment: {shown:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(shown.contains("serviceaccount \"robot\" not found"), "{shown}");
    let on_rs = jsonpath(
        &c,
        &["get", "rs", "-l", "app=robotic"],
        "{.items[*].status.conditions[?(@.type==\"ReplicaFailure\")].status}",
    );
    assert_eq!(on_rs, "True");
    // The old pods keep serving meanwhile.
    assert_eq!(active_pods(&c, "robotic").len(), 2);
    c.ok(&["create", "serviceaccount", "robot"]);
    rollout_ok(&c, "deployment/robotic");
    let deadline = Instant::now() + WAIT;
    while !jsonpath(&c, &["get", "deployment", "robotic"], failure)
        .trim()
        .starts_with(':')
    {
        assert!(
            Instant::now() < deadline,
            "ReplicaFailure stayed after the account was created"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let accounts = jsonpath(
        &c,
        &["get", "pods", "-l", "app=robotic"],
        "{.items[*].spec.serviceAccountName}",
    );
    assert!(accounts.split_whitespace().all(|a| a == "robot"), "{accounts}");
}

/// PodDisruptionBudgets: `kubectl create pdb` (protobuf), its status in
/// `get pdb`, and `kubectl drain` held back (429, retried) while an eviction
/// would leave fewer healthy pods than the budget wants.
#[test]
fn disruption_budgets_hold_back_drain() {
    let c = control_plane(&[node("n1", json!([])), node("n2", json!([]))]);
    let _kubelet = FakeKubelet::start(&c, "guarded");
    c.ok(&[
        "create",
        "deployment",
        "guarded",
        "--image=example.invalid/guarded:1",
        "--replicas=3",
    ]);
    rollout_ok(&c, "deployment/guarded");
    c.ok(&[
        "create",
        "pdb",
        "guarded",
        "--selector=app=guarded",
        "--min-available=3",
    ]);
    let allowed = "{.status.currentHealthy}/{.status.desiredHealthy}/{.status.disruptionsAllowed}";
    let deadline = Instant::now() + WAIT;
    while jsonpath(&c, &["get", "pdb", "guarded"], allowed) != "3/3/0" {
        assert!(
            Instant::now() < deadline,
            "pdb status: {}",
            jsonpath(&c, &["get", "pdb", "guarded"], allowed)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let row = c.ok(&["get", "pdb", "guarded", "--no-headers"]);
    assert_eq!(
        row.split_whitespace().take(4).collect::<Vec<_>>(),
        ["guarded", "3", "N/A", "0"],
        "{row}"
    );
    let on_n1 = jsonpath(
        &c,
        &["get", "pods", "--field-selector=spec.nodeName=n1"],
        "{.items[*].metadata.name}",
    );
    assert!(!on_n1.is_empty(), "the test wants a pod on n1");
    let out = c.kubectl(&["drain", "n1", "--timeout=4s"]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("Cannot evict pod as it would violate the pod's disruption budget"),
        "{text}"
    );
    assert_eq!(
        jsonpath(
            &c,
            &["get", "pods", "--field-selector=spec.nodeName=n1"],
            "{.items[*].metadata.name}"
        ),
        on_n1,
        "nothing was evicted"
    );
    // One disruption allowed: drain goes on, one pod at a time as replacements get ready on n2.
    c.ok(&[
        "patch",
        "pdb",
        "guarded",
        "--type=merge",
        "-p",
        r#"{"spec":{"minAvailable":2}}"#,
    ]);
    let out = c.ok(&["drain", "n1", "--timeout=60s"]);
    assert!(out.contains("drained"), "{out}");
    let left = jsonpath(
        &c,
        &["get", "pods", "--field-selector=spec.nodeName=n1"],
        "{.items[*].metadata.name}",
    );
    assert!(left.is_empty(), "{left}");
}
