//! The API server and store through the real `kubectl`, against `podvisor up`
//! in a temporary directory.

mod common;

use common::cluster::Cluster;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::Duration;

const POD: &str = "apiVersion: v1
kind: Pod
metadata:
  name: web
  labels: {app: web}
spec:
  containers:
  - name: c
    image: nginx:1.27
    ports: [{containerPort: 80}]
";

#[test]
fn discovery_and_namespaces() {
    let c = Cluster::start();
    assert!(c.ok(&["version"]).contains("Server Version: v1.32."));
    let res = c.ok(&["api-resources"]);
    for r in ["pods", "configmaps", "leases", "runtimeclasses", "events.k8s.io/v1"] {
        assert!(res.contains(r), "{res}");
    }
    let ns = c.ok(&["get", "ns"]);
    for n in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        assert!(ns.contains(n), "{ns}");
    }
    assert!(c.ok(&["create", "ns", "x"]).contains("namespace/x created"));
    assert!(c.ok(&["get", "runtimeclass", "vm"]).contains("vm "));
    assert!(c.fails(&["delete", "ns", "default"]).contains("may not be deleted"));
}

#[test]
fn pod_lifecycle() {
    let c = Cluster::start();
    let f = c.file("pod.yaml", POD);
    assert!(c.ok(&["apply", "-f", &f]).contains("pod/web created"));
    assert!(c.ok(&["apply", "-f", &f]).contains("pod/web unchanged"));
    let wide = c.ok(&["get", "pods", "-o", "wide"]);
    assert!(
        wide.contains("NOMINATED NODE") && wide.contains("READINESS GATES"),
        "{wide}"
    );
    assert!(wide.lines().nth(1).unwrap().split_whitespace().collect::<Vec<_>>()[..4] == ["web", "0/1", "Pending", "0"]);
    let yaml = c.ok(&["get", "pod", "web", "-o", "yaml"]);
    assert!(yaml.contains("uid:") && yaml.contains("imagePullPolicy: IfNotPresent") && yaml.contains("phase: Pending"));
    c.ok(&["label", "pod", "web", "tier=fe"]);
    c.ok(&["annotate", "pod", "web", "note=hi"]);
    let labels = c.ok(&["get", "pod", "web", "--show-labels"]);
    assert!(labels.contains("app=web,tier=fe"), "{labels}");
    let o = c
        .cmd(&["edit", "pod", "web"])
        .env("KUBE_EDITOR", "sed -i s/nginx:1.27/nginx:1.28/")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        c.ok(&["get", "pod", "web", "-o", "jsonpath={.spec.containers[0].image}"]),
        "nginx:1.28"
    );
    assert_eq!(
        c.ok(&["get", "pod", "web", "-o", "jsonpath={.metadata.annotations.note}"]),
        "hi"
    );
    // Server-side apply: create-or-update.
    let g = c.file("g.yaml", &POD.replace("name: web\n", "name: ssa\n"));
    assert!(
        c.ok(&["apply", "--server-side", "-f", &g])
            .contains("serverside-applied")
    );
    assert!(
        c.ok(&["apply", "--server-side", "-f", &g])
            .contains("serverside-applied")
    );
    // Unbound pods are deleted at once.
    assert!(c.ok(&["delete", "pod", "web", "ssa"]).contains("deleted"));
    assert!(c.ok(&["get", "pods"]).is_empty());
}

#[test]
fn configmaps_secrets_and_namespace_cascade() {
    let c = Cluster::start();
    c.ok(&["create", "ns", "x"]);
    c.ok(&[
        "create",
        "configmap",
        "cfg",
        "-n",
        "x",
        "--from-literal=a=1",
        "--from-literal=b=2",
    ]);
    c.ok(&[
        "create",
        "secret",
        "generic",
        "s1",
        "-n",
        "x",
        "--from-literal=p=secret",
    ]);
    c.ok(&["run", "p1", "-n", "x", "--image=busybox"]);
    let out = c.ok(&["get", "cm,secret", "-n", "x"]);
    let row = |name: &str| {
        out.lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    };
    assert!(row("configmap/cfg").starts_with("configmap/cfg 2 "), "{out}");
    // Every namespace gets the cluster's CA, as Kubernetes' root-CA publisher does.
    assert!(
        row("configmap/kube-root-ca.crt").starts_with("configmap/kube-root-ca.crt 1 "),
        "{out}"
    );
    assert!(row("secret/s1").starts_with("secret/s1 Opaque 1 "), "{out}");
    assert_eq!(
        c.ok(&["get", "secret", "s1", "-n", "x", "-o", "jsonpath={.data.p}"]),
        "c2VjcmV0"
    );
    c.ok(&["delete", "ns", "x"]);
    assert!(c.fails(&["get", "ns", "x"]).contains("NotFound"));
    assert!(c.fails(&["get", "cm", "cfg", "-n", "x"]).contains("NotFound"));
    c.ok(&["create", "ns", "x"]);
    assert!(c.ok(&["get", "all", "-n", "x"]).is_empty());
}

#[test]
fn watch_sees_other_client() {
    let c = Cluster::start();
    let f = c.file("pod.yaml", POD);
    c.ok(&["apply", "-f", &f]);
    let mut w = c.cmd(&["get", "pods", "-w"]).stdout(Stdio::piped()).spawn().unwrap();
    let (tx, rx) = mpsc::channel();
    let stdout = w.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let next = || rx.recv_timeout(Duration::from_secs(10)).expect("watch output");
    assert!(next().starts_with("NAME"));
    assert!(next().starts_with("web "));
    c.ok(&["run", "second", "--image=busybox"]);
    // web's own status updates may come first.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let line = next();
        if line.starts_with("second ") {
            break;
        }
        assert!(line.starts_with("web "), "{line}");
        assert!(std::time::Instant::now() < deadline, "second never showed up");
    }
    c.ok(&["delete", "pod", "second"]);
    let _ = w.kill();
    let _ = w.wait();
}

#[test]
fn errors() {
    let c = Cluster::start();
    let bad = c.file(
        "bad.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: Bad_Name}\nspec:\n  containers:\n  - name: c\n",
    );
    let e = c.fails(&["apply", "-f", &bad]);
    assert!(
        e.contains("is invalid")
            && e.contains("metadata.name")
            && e.contains("spec.containers[0].image: Required value"),
        "{e}"
    );
    let unk = c.file(
        "unk.yaml",
        &POD.replace("image: nginx:1.27", "image: nginx:1.27\n    imagee: typo"),
    );
    let e = c.fails(&["apply", "-f", &unk, "--validate=strict"]);
    assert!(e.contains("unknown field \"spec.containers[0].imagee\""), "{e}");
    assert!(c.ok(&["get", "pods"]).is_empty());
    let e = c.fails(&["get", "pods", "--token=wrong"]);
    assert!(e.contains("Unauthorized"), "{e}");
    assert!(
        c.fails(&["get", "pod", "nope"])
            .contains("(NotFound): pods \"nope\" not found")
    );
    let e = c.fails(&["logs", "nope-ish"]);
    assert!(e.contains("NotFound"), "{e}");
}

#[test]
fn survives_kill_9() {
    let mut c = Cluster::start();
    c.ok(&["create", "configmap", "keep", "--from-literal=k=v"]);
    let ca_path = c.data_dir().join("apiserver/ca.crt");
    let ca = std::fs::read(&ca_path).unwrap();
    // SIGKILL: no shutdown path runs.
    c.restart();
    assert_eq!(std::fs::read(&ca_path).unwrap(), ca);
    assert_eq!(c.ok(&["get", "cm", "keep", "-o", "jsonpath={.data.k}"]), "v");
}

/// A delete without a resourceVersion precondition succeeds while another
/// client keeps writing the object (the graceful delete's own write is retried).
#[test]
fn delete_wins_over_concurrent_writes() {
    use k8s_openapi::api::core::v1::Pod;
    use podvisor::cluster::client::Client;
    let c = Cluster::start_with(&["--control-plane-only"], "");
    let client = Client::from_kubeconfig(&c.kubeconfig()).unwrap();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(async move {
            for round in 0..20 {
                let name = format!("busy-{round}");
                let pod: Pod = serde_json::from_value(serde_json::json!({
                    "metadata": {"name": name},
                    "spec": {"nodeName": "gone", "containers": [{"name": "c", "image": "busybox"}]},
                }))
                .unwrap();
                client.create(Some("default"), &pod).await.unwrap();
                let writer = {
                    let (client, name) = (client.clone(), name.clone());
                    tokio::spawn(async move {
                        for i in 0..200 {
                            let patch = serde_json::json!({"metadata": {"labels": {"i": i.to_string()}}});
                            if client
                                .merge_patch::<Pod>(Some("default"), &name, None, &patch)
                                .await
                                .is_err()
                            {
                                break;
                            }
                        }
                    })
                };
                tokio::time::sleep(Duration::from_millis(5)).await;
                client
                    .delete::<Pod>(Some("default"), &name, None)
                    .await
                    .unwrap_or_else(|e| panic!("round {round}: {e}"));
                writer.abort();
            }
        });
}

/// ServiceAccounts and RBAC objects are kept (charts carry them; RBAC is not
/// enforced): every namespace has a `default` account, pods run as it, and
/// kubectl's generators (protobuf bodies) and manifests create the rest.
#[test]
fn service_accounts_and_rbac_objects() {
    let c = Cluster::start();
    assert!(c.ok(&["get", "sa"]).contains("default "));
    c.ok(&["create", "ns", "team"]);
    let accounts = c.wait_output(
        &["get", "sa", "-n", "team", "-o", "name"],
        Duration::from_secs(10),
        |o| !o.is_empty(),
    );
    assert_eq!(accounts.trim(), "serviceaccount/default");
    let ca = c.ok(&[
        "get",
        "cm",
        "kube-root-ca.crt",
        "-n",
        "team",
        "-o",
        "jsonpath={.data.ca\\.crt}",
    ]);
    assert!(ca.starts_with("-----BEGIN CERTIFICATE-----"), "{ca}");
    assert!(
        c.ok(&["create", "serviceaccount", "robot", "-n", "team"])
            .contains("serviceaccount/robot created")
    );
    c.ok(&[
        "create",
        "role",
        "pod-reader",
        "-n",
        "team",
        "--verb=get",
        "--verb=list",
        "--resource=pods",
    ]);
    c.ok(&[
        "create",
        "rolebinding",
        "robot-reads",
        "-n",
        "team",
        "--role=pod-reader",
        "--serviceaccount=team:robot",
    ]);
    c.ok(&["create", "clusterrole", "node-viewer", "--verb=get", "--resource=nodes"]);
    c.ok(&[
        "create",
        "clusterrolebinding",
        "robot-views-nodes",
        "--clusterrole=node-viewer",
        "--serviceaccount=team:robot",
    ]);
    assert_eq!(
        c.ok(&[
            "get",
            "role",
            "pod-reader",
            "-n",
            "team",
            "-o",
            "jsonpath={.rules[0].verbs}"
        ]),
        r#"["get","list"]"#
    );
    let binding = c.ok(&["get", "rolebinding", "-n", "team"]);
    assert!(
        binding.contains("robot-reads") && binding.contains("Role/pod-reader"),
        "{binding}"
    );
    assert_eq!(
        c.ok(&[
            "get",
            "clusterrolebinding",
            "robot-views-nodes",
            "-o",
            "jsonpath={.subjects[0].kind}/{.subjects[0].namespace}/{.subjects[0].name} {.roleRef.kind}"
        ]),
        "ServiceAccount/team/robot ClusterRole"
    );
    // A chart-style manifest: account, role, binding and a pod running as the account.
    let manifest = c.file(
        "app.yaml",
        "apiVersion: v1
kind: ServiceAccount
metadata: {name: app, namespace: team}
automountServiceAccountToken: false
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: app, namespace: team}
rules: [{apiGroups: [''], resources: [configmaps], verbs: [get]}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: app, namespace: team}
subjects: [{kind: ServiceAccount, name: app, namespace: team}]
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: app}
---
apiVersion: v1
kind: Pod
metadata: {name: app, namespace: team}
spec:
  serviceAccountName: app
  containers: [{name: c, image: busybox}]
",
    );
    let applied = c.ok(&["apply", "-f", &manifest]);
    for line in [
        "serviceaccount/app created",
        "role.rbac.authorization.k8s.io/app created",
        "rolebinding.rbac.authorization.k8s.io/app created",
    ] {
        assert!(applied.contains(line), "{applied}");
    }
    assert_eq!(
        c.ok(&[
            "get",
            "sa",
            "app",
            "-n",
            "team",
            "-o",
            "jsonpath={.automountServiceAccountToken}"
        ]),
        "false"
    );
    assert_eq!(
        c.ok(&[
            "get",
            "pod",
            "app",
            "-n",
            "team",
            "-o",
            "jsonpath={.spec.serviceAccountName}"
        ]),
        "app"
    );
    c.ok(&["run", "plain", "-n", "team", "--image=busybox"]);
    assert_eq!(
        c.ok(&[
            "get",
            "pod",
            "plain",
            "-n",
            "team",
            "-o",
            "jsonpath={.spec.serviceAccountName}"
        ]),
        "default"
    );
    // They go with their namespace.
    c.ok(&["delete", "ns", "team"]);
    assert!(
        c.fails(&["get", "role", "pod-reader", "-n", "team"])
            .contains("NotFound")
    );
    assert!(c.ok(&["get", "clusterrole", "node-viewer"]).contains("node-viewer"));
}
