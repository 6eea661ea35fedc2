//! Server-side `meta.k8s.io/v1` Table rendering with the columns kubectl shows for real clusters.

use k8s_openapi::jiff::Timestamp;
use serde_json::{Value, json};

use super::registry::ResourceInfo;

/// What `rows[].object` carries (`includeObject=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IncludeObject {
    None,
    Metadata,
    Object,
}

impl IncludeObject {
    pub fn parse(s: Option<&str>) -> Self {
        match s {
            Some("None") => IncludeObject::None,
            Some("Object") => IncludeObject::Object,
            _ => IncludeObject::Metadata,
        }
    }
}

pub fn now() -> Timestamp {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Timestamp::from_second(secs as i64).unwrap_or(Timestamp::UNIX_EPOCH)
}

/// RFC 3339 with second precision, as Kubernetes writes `metav1.Time`.
pub fn rfc3339(t: Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// kubectl's short human duration ("45s", "5m30s", "3h", "2d4h", "400d", "3y20d").
pub fn human_duration(secs: i64) -> String {
    let s = secs.max(0);
    let (m, h, d) = (s / 60, s / 3600, s / 86400);
    if s < 120 {
        format!("{s}s")
    } else if m < 10 {
        if s % 60 == 0 {
            format!("{m}m")
        } else {
            format!("{m}m{}s", s % 60)
        }
    } else if m < 180 {
        format!("{m}m")
    } else if h < 8 {
        if m % 60 == 0 {
            format!("{h}h")
        } else {
            format!("{h}h{}m", m % 60)
        }
    } else if h < 48 {
        format!("{h}h")
    } else if h < 24 * 8 {
        if h % 24 == 0 {
            format!("{d}d")
        } else {
            format!("{d}d{}h", h % 24)
        }
    } else if d < 365 * 2 {
        format!("{d}d")
    } else if d < 365 * 8 {
        if d % 365 == 0 {
            format!("{}y", d / 365)
        } else {
            format!("{}y{}d", d / 365, d % 365)
        }
    } else {
        format!("{}y", d / 365)
    }
}

fn age(v: Option<&Value>, now: Timestamp) -> String {
    match v.and_then(Value::as_str).and_then(|s| s.parse::<Timestamp>().ok()) {
        Some(t) => human_duration(now.as_second() - t.as_second()),
        None => "<unknown>".into(),
    }
}

fn s<'a>(v: &'a Value, ptr: &str) -> &'a str {
    v.pointer(ptr).and_then(Value::as_str).unwrap_or("")
}

/// The wide columns of a pod-template owner: containers, images, selector.
fn template_wide(o: &Value, template: &str, selector: Option<&Value>) -> [Value; 3] {
    let containers = arr(o, &format!("{template}/spec/containers"));
    let join = |field: &str| {
        containers
            .iter()
            .map(|c| c[field].as_str().unwrap_or(""))
            .collect::<Vec<_>>()
            .join(",")
    };
    [
        or_none(&join("name")),
        or_none(&join("image")),
        or_none(&selector.map(super::select::selector_string).unwrap_or_default()),
    ]
}

fn or_none(x: &str) -> Value {
    Value::String(if x.is_empty() { "<none>".into() } else { x.into() })
}

fn arr<'a>(v: &'a Value, ptr: &str) -> &'a [Value] {
    v.pointer(ptr)
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

fn obj_len(v: &Value, ptr: &str) -> usize {
    v.pointer(ptr).and_then(Value::as_object).map_or(0, |m| m.len())
}

type Col = (&'static str, &'static str, &'static str, i32);

fn columns(info: &ResourceInfo) -> Vec<Col> {
    let name: Col = ("Name", "string", "name", 0);
    let age: Col = ("Age", "string", "", 0);
    match (info.group, info.resource) {
        ("", "pods") => vec![
            name,
            ("Ready", "string", "", 0),
            ("Status", "string", "", 0),
            ("Restarts", "string", "", 0),
            age,
            ("IP", "string", "", 1),
            ("Node", "string", "", 1),
            ("Nominated Node", "string", "", 1),
            ("Readiness Gates", "string", "", 1),
        ],
        ("", "nodes") => vec![
            name,
            ("Status", "string", "", 0),
            ("Roles", "string", "", 0),
            age,
            ("Version", "string", "", 0),
            ("Internal-IP", "string", "", 1),
            ("External-IP", "string", "", 1),
            ("OS-Image", "string", "", 1),
            ("Kernel-Version", "string", "", 1),
            ("Container-Runtime", "string", "", 1),
        ],
        ("", "namespaces") => vec![name, ("Status", "string", "", 0), age],
        ("", "configmaps") => vec![name, ("Data", "integer", "", 0), age],
        ("", "serviceaccounts") => vec![name, ("Secrets", "integer", "", 0), age],
        ("rbac.authorization.k8s.io", "rolebindings" | "clusterrolebindings") => {
            vec![name, ("Role", "string", "", 0), age]
        }
        ("", "secrets") => vec![name, ("Type", "string", "", 0), ("Data", "integer", "", 0), age],
        ("", "services") => vec![
            name,
            ("Type", "string", "", 0),
            ("Cluster-IP", "string", "", 0),
            ("External-IP", "string", "", 0),
            ("Port(s)", "string", "", 0),
            age,
            ("Selector", "string", "", 1),
        ],
        ("", "endpoints") => vec![name, ("Endpoints", "string", "", 0), age],
        ("discovery.k8s.io", "endpointslices") => vec![
            name,
            ("AddressType", "string", "", 0),
            ("Ports", "string", "", 0),
            ("Endpoints", "string", "", 0),
            age,
        ],
        (_, "events") => vec![
            ("Last Seen", "string", "", 0),
            ("Type", "string", "", 0),
            ("Reason", "string", "", 0),
            ("Object", "string", "", 0),
            ("Message", "string", "", 0),
        ],
        ("coordination.k8s.io", "leases") => vec![name, ("Holder", "string", "", 0), age],
        ("node.k8s.io", "runtimeclasses") => vec![name, ("Handler", "string", "", 0), age],
        ("apps", "deployments") => vec![
            name,
            ("Ready", "string", "", 0),
            ("Up-to-date", "integer", "", 0),
            ("Available", "integer", "", 0),
            age,
            ("Containers", "string", "", 1),
            ("Images", "string", "", 1),
            ("Selector", "string", "", 1),
        ],
        ("apps", "replicasets") => vec![
            name,
            ("Desired", "integer", "", 0),
            ("Current", "integer", "", 0),
            ("Ready", "integer", "", 0),
            age,
            ("Containers", "string", "", 1),
            ("Images", "string", "", 1),
            ("Selector", "string", "", 1),
        ],
        ("apps", "daemonsets") => vec![
            name,
            ("Desired", "integer", "", 0),
            ("Current", "integer", "", 0),
            ("Ready", "integer", "", 0),
            ("Up-to-date", "integer", "", 0),
            ("Available", "integer", "", 0),
            ("Node Selector", "string", "", 0),
            age,
            ("Containers", "string", "", 1),
            ("Images", "string", "", 1),
            ("Selector", "string", "", 1),
        ],
        ("apps", "statefulsets") => vec![
            name,
            ("Ready", "string", "", 0),
            age,
            ("Containers", "string", "", 1),
            ("Images", "string", "", 1),
        ],
        ("policy", "poddisruptionbudgets") => vec![
            name,
            ("Min Available", "string", "", 0),
            ("Max Unavailable", "string", "", 0),
            ("Allowed Disruptions", "integer", "", 0),
            age,
        ],
        ("batch", "cronjobs") => vec![
            name,
            ("Schedule", "string", "", 0),
            ("Timezone", "string", "", 0),
            ("Suspend", "boolean", "", 0),
            ("Active", "integer", "", 0),
            ("Last Schedule", "string", "", 0),
            age,
            ("Containers", "string", "", 1),
            ("Images", "string", "", 1),
            ("Selector", "string", "", 1),
        ],
        ("batch", "jobs") => vec![
            name,
            ("Status", "string", "", 0),
            ("Completions", "string", "", 0),
            ("Duration", "string", "", 0),
            age,
            ("Containers", "string", "", 1),
            ("Images", "string", "", 1),
            ("Selector", "string", "", 1),
        ],
        ("apps", "controllerrevisions") => vec![
            name,
            ("Controller", "string", "", 0),
            ("Revision", "integer", "", 0),
            age,
        ],
        _ => vec![name, age],
    }
}

fn pod_status(p: &Value) -> String {
    let mut reason = s(p, "/status/phase").to_string();
    if !s(p, "/status/reason").is_empty() {
        reason = s(p, "/status/reason").to_string();
    }
    let inits = arr(p, "/status/initContainerStatuses");
    let n_init = arr(p, "/spec/initContainers").len();
    let mut initializing = false;
    for (i, c) in inits.iter().enumerate() {
        if c.pointer("/state/terminated/exitCode").and_then(Value::as_i64) == Some(0) {
            continue;
        }
        initializing = true;
        let term = s(c, "/state/terminated/reason");
        let wait = s(c, "/state/waiting/reason");
        reason = if c.pointer("/state/terminated").is_some() {
            if term.is_empty() {
                format!("Init:ExitCode:{}", c["state"]["terminated"]["exitCode"])
            } else {
                format!("Init:{term}")
            }
        } else if !wait.is_empty() && wait != "PodInitializing" {
            format!("Init:{wait}")
        } else {
            format!("Init:{i}/{n_init}")
        };
        break;
    }
    if !initializing {
        let mut has_running = false;
        for c in arr(p, "/status/containerStatuses").iter().rev() {
            let wait = s(c, "/state/waiting/reason");
            let term = s(c, "/state/terminated/reason");
            if !wait.is_empty() {
                reason = wait.to_string();
            } else if !term.is_empty() {
                reason = term.to_string();
            } else if c.pointer("/state/terminated").is_some() {
                reason = format!("ExitCode:{}", c["state"]["terminated"]["exitCode"]);
            } else if c.pointer("/state/running").is_some() && c["ready"] == json!(true) {
                has_running = true;
            }
        }
        if reason == "Completed" && has_running {
            reason = "Running".into();
        }
    }
    if p.pointer("/metadata/deletionTimestamp").is_some() {
        reason = if s(p, "/status/reason") == "NodeLost" {
            "Unknown".into()
        } else {
            "Terminating".into()
        };
    }
    reason
}

fn cells(info: &ResourceInfo, o: &Value, now: Timestamp) -> Vec<Value> {
    let name = json!(s(o, "/metadata/name"));
    let created = age(o.pointer("/metadata/creationTimestamp"), now);
    match (info.group, info.resource) {
        ("", "pods") => {
            let statuses = arr(o, "/status/containerStatuses");
            let ready = statuses.iter().filter(|c| c["ready"] == json!(true)).count();
            let restarts: i64 = statuses.iter().filter_map(|c| c["restartCount"].as_i64()).sum();
            let gates = arr(o, "/spec/readinessGates");
            let gates = if gates.is_empty() {
                "<none>".to_string()
            } else {
                let conds = arr(o, "/status/conditions");
                let ok = gates
                    .iter()
                    .filter(|g| {
                        conds
                            .iter()
                            .any(|c| c["type"] == g["conditionType"] && c["status"] == "True")
                    })
                    .count();
                format!("{ok}/{}", gates.len())
            };
            vec![
                name,
                json!(format!("{ready}/{}", arr(o, "/spec/containers").len())),
                json!(pod_status(o)),
                json!(restarts.to_string()),
                json!(created),
                or_none(s(o, "/status/podIP")),
                or_none(s(o, "/spec/nodeName")),
                or_none(s(o, "/status/nominatedNodeName")),
                json!(gates),
            ]
        }
        ("", "nodes") => {
            let ready = arr(o, "/status/conditions").iter().find(|c| c["type"] == "Ready");
            let mut status = match ready.and_then(|c| c["status"].as_str()) {
                Some("True") => "Ready".to_string(),
                Some(_) => "NotReady".to_string(),
                None => "Unknown".to_string(),
            };
            if o.pointer("/spec/unschedulable") == Some(&json!(true)) {
                status.push_str(",SchedulingDisabled");
            }
            let mut roles: Vec<&str> = o
                .pointer("/metadata/labels")
                .and_then(Value::as_object)
                .into_iter()
                .flatten()
                .filter_map(|(k, _)| k.strip_prefix("node-role.kubernetes.io/"))
                .collect();
            roles.sort();
            let addr = |t: &str| {
                arr(o, "/status/addresses")
                    .iter()
                    .find(|a| a["type"] == t)
                    .and_then(|a| a["address"].as_str())
                    .unwrap_or("")
                    .to_string()
            };
            vec![
                name,
                json!(status),
                or_none(&roles.join(",")),
                json!(created),
                json!(s(o, "/status/nodeInfo/kubeletVersion")),
                or_none(&addr("InternalIP")),
                or_none(&addr("ExternalIP")),
                json!(s(o, "/status/nodeInfo/osImage")),
                json!(s(o, "/status/nodeInfo/kernelVersion")),
                json!(s(o, "/status/nodeInfo/containerRuntimeVersion")),
            ]
        }
        ("", "namespaces") => vec![name, json!(s(o, "/status/phase")), json!(created)],
        ("policy", "poddisruptionbudgets") => {
            let shown = |p: &str| match o.pointer(p) {
                Some(Value::Number(n)) => json!(n.to_string()),
                Some(Value::String(s)) => json!(s),
                _ => json!("N/A"),
            };
            vec![
                name,
                shown("/spec/minAvailable"),
                shown("/spec/maxUnavailable"),
                json!(
                    o.pointer("/status/disruptionsAllowed")
                        .and_then(Value::as_i64)
                        .unwrap_or(0)
                ),
                json!(created),
            ]
        }
        ("batch", "cronjobs") => {
            let last = match s(o, "/status/lastScheduleTime") {
                "" => "<none>".to_string(),
                _ => age(o.pointer("/status/lastScheduleTime"), now),
            };
            let mut row = vec![
                name,
                json!(s(o, "/spec/schedule")),
                or_none(s(o, "/spec/timeZone")),
                json!(o.pointer("/spec/suspend").and_then(Value::as_bool).unwrap_or(false)),
                json!(arr(o, "/status/active").len()),
                json!(last),
                json!(created),
            ];
            row.extend(template_wide(o, "/spec/jobTemplate/spec/template", None));
            row
        }
        ("batch", "jobs") => {
            let condition = |t: &str| {
                arr(o, "/status/conditions")
                    .iter()
                    .any(|c| c["type"] == t && c["status"] == "True")
            };
            let status = if condition("Complete") {
                "Complete"
            } else if condition("Failed") {
                "Failed"
            } else if o.pointer("/spec/suspend") == Some(&json!(true)) {
                "Suspended"
            } else {
                "Running"
            };
            let succeeded = o.pointer("/status/succeeded").and_then(Value::as_i64).unwrap_or(0);
            let completions = match o.pointer("/spec/completions").and_then(Value::as_i64) {
                Some(n) => format!("{succeeded}/{n}"),
                None => format!(
                    "{succeeded}/1 of {}",
                    o.pointer("/spec/parallelism").and_then(Value::as_i64).unwrap_or(1)
                ),
            };
            let at = |p: &str| {
                o.pointer(p)
                    .and_then(Value::as_str)
                    .and_then(|t| t.parse::<Timestamp>().ok())
            };
            let duration = match (at("/status/startTime"), at("/status/completionTime")) {
                (Some(start), Some(end)) => human_duration(end.as_second() - start.as_second()),
                (Some(start), None) => human_duration(now.as_second() - start.as_second()),
                _ => String::new(),
            };
            let mut row = vec![name, json!(status), json!(completions), json!(duration), json!(created)];
            row.extend(template_wide(o, "/spec/template", o.pointer("/spec/selector")));
            row
        }
        ("", "configmaps") => vec![
            name,
            json!(obj_len(o, "/data") + obj_len(o, "/binaryData")),
            json!(created),
        ],
        ("", "secrets") => vec![name, json!(s(o, "/type")), json!(obj_len(o, "/data")), json!(created)],
        ("", "serviceaccounts") => vec![name, json!(arr(o, "/secrets").len()), json!(created)],
        ("rbac.authorization.k8s.io", "rolebindings" | "clusterrolebindings") => vec![
            name,
            json!(format!("{}/{}", s(o, "/roleRef/kind"), s(o, "/roleRef/name"))),
            json!(created),
        ],
        ("", "services") => {
            let ports: Vec<String> = arr(o, "/spec/ports")
                .iter()
                .map(|p| {
                    let proto = p["protocol"].as_str().unwrap_or("TCP");
                    match p["nodePort"].as_i64() {
                        Some(np) => format!("{}:{np}/{proto}", p["port"]),
                        None => format!("{}/{proto}", p["port"]),
                    }
                })
                .collect();
            let ext: Vec<&str> = arr(o, "/spec/externalIPs").iter().filter_map(Value::as_str).collect();
            let sel: Vec<String> = o
                .pointer("/spec/selector")
                .and_then(Value::as_object)
                .into_iter()
                .flatten()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                .collect();
            vec![
                name,
                json!(s(o, "/spec/type")),
                or_none(s(o, "/spec/clusterIP")),
                or_none(&ext.join(",")),
                or_none(&ports.join(",")),
                json!(created),
                or_none(&sel.join(",")),
            ]
        }
        ("", "endpoints") => {
            let mut shown = Vec::new();
            for subset in arr(o, "/subsets") {
                for address in subset["addresses"].as_array().into_iter().flatten() {
                    for port in subset["ports"].as_array().into_iter().flatten() {
                        shown.push(format!("{}:{}", s(address, "/ip"), port["port"]));
                    }
                }
            }
            vec![name, or_none(&list_of(&shown)), json!(created)]
        }
        ("discovery.k8s.io", "endpointslices") => {
            let ports: Vec<String> = arr(o, "/ports").iter().map(|p| p["port"].to_string()).collect();
            let addresses: Vec<String> = arr(o, "/endpoints")
                .iter()
                .flat_map(|e| e["addresses"].as_array().cloned().unwrap_or_default())
                .filter_map(|a| a.as_str().map(String::from))
                .collect();
            vec![
                name,
                json!(s(o, "/addressType")),
                or_none(&ports.join(",")),
                or_none(&list_of(&addresses)),
                json!(created),
            ]
        }
        (g, "events") => {
            let core = g.is_empty();
            let (obj, msg, last) = if core {
                (
                    "/involvedObject",
                    "/message",
                    ["/lastTimestamp", "/eventTime", "/firstTimestamp"],
                )
            } else {
                (
                    "/regarding",
                    "/note",
                    ["/deprecatedLastTimestamp", "/eventTime", "/deprecatedFirstTimestamp"],
                )
            };
            let when = last
                .iter()
                .find_map(|p| o.pointer(p).filter(|v| v.is_string()))
                .or_else(|| o.pointer("/metadata/creationTimestamp"));
            let object = format!(
                "{}/{}",
                s(o, &format!("{obj}/kind")).to_ascii_lowercase(),
                s(o, &format!("{obj}/name"))
            );
            vec![
                json!(age(when, now)),
                json!(s(o, "/type")),
                json!(s(o, "/reason")),
                json!(object),
                json!(s(o, msg)),
            ]
        }
        ("coordination.k8s.io", "leases") => vec![name, or_none(s(o, "/spec/holderIdentity")), json!(created)],
        ("node.k8s.io", "runtimeclasses") => vec![name, json!(s(o, "/handler")), json!(created)],
        ("apps", "deployments" | "replicasets" | "daemonsets" | "statefulsets") => {
            let n = |ptr: &str| json!(o.pointer(ptr).and_then(Value::as_i64).unwrap_or(0));
            let wide = template_wide(o, "/spec/template", o.pointer("/spec/selector"));
            let mut row = match info.resource {
                "statefulsets" => {
                    let ready = format!(
                        "{}/{}",
                        n("/status/readyReplicas"),
                        o.pointer("/spec/replicas").and_then(Value::as_i64).unwrap_or(1)
                    );
                    return vec![name, json!(ready), json!(created), wide[0].clone(), wide[1].clone()];
                }
                "deployments" => vec![
                    name,
                    json!(format!(
                        "{}/{}",
                        n("/status/readyReplicas"),
                        o.pointer("/spec/replicas").and_then(Value::as_i64).unwrap_or(1)
                    )),
                    n("/status/updatedReplicas"),
                    n("/status/availableReplicas"),
                    json!(created),
                ],
                "replicasets" => vec![
                    name,
                    n("/spec/replicas"),
                    n("/status/replicas"),
                    n("/status/readyReplicas"),
                    json!(created),
                ],
                _ => {
                    let selector: Vec<String> = o
                        .pointer("/spec/template/spec/nodeSelector")
                        .and_then(Value::as_object)
                        .into_iter()
                        .flatten()
                        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                        .collect();
                    vec![
                        name,
                        n("/status/desiredNumberScheduled"),
                        n("/status/currentNumberScheduled"),
                        n("/status/numberReady"),
                        n("/status/updatedNumberScheduled"),
                        n("/status/numberAvailable"),
                        or_none(&selector.join(",")),
                        json!(created),
                    ]
                }
            };
            row.extend(wide);
            row
        }
        ("apps", "controllerrevisions") => {
            let controller = arr(o, "/metadata/ownerReferences")
                .iter()
                .find(|r| r["controller"] == json!(true))
                .map(|r| {
                    let group = r["apiVersion"]
                        .as_str()
                        .unwrap_or("")
                        .rsplit_once('/')
                        .map_or("", |(g, _)| g);
                    let kind = r["kind"].as_str().unwrap_or("").to_lowercase();
                    let kind = if group.is_empty() {
                        kind
                    } else {
                        format!("{kind}.{group}")
                    };
                    format!("{kind}/{}", r["name"].as_str().unwrap_or(""))
                })
                .unwrap_or_default();
            vec![
                name,
                or_none(&controller),
                json!(o.get("revision").and_then(Value::as_i64).unwrap_or(0)),
                json!(created),
            ]
        }
        _ => vec![name, json!(created)],
    }
}

fn row_object(o: &Value, include: IncludeObject) -> Value {
    match include {
        IncludeObject::None => Value::Null,
        IncludeObject::Object => o.clone(),
        IncludeObject::Metadata => {
            json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": o["metadata"]})
        }
    }
}

/// A Table for `objs`. `headers` is false for watch events after the first.
pub fn table(info: &ResourceInfo, objs: &[&Value], rv: &str, include: IncludeObject, headers: bool) -> Value {
    let now = now();
    let rows: Vec<Value> = objs
        .iter()
        .map(|o| {
            let mut r = json!({"cells": cells(info, o, now)});
            let obj = row_object(o, include);
            if !obj.is_null() {
                r["object"] = obj;
            }
            r
        })
        .collect();
    let mut t =
        json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": rv}, "rows": rows});
    if headers {
        let cols: Vec<Value> = columns(info)
            .into_iter()
            .map(|(n, ty, f, p)| json!({"name": n, "type": ty, "format": f, "description": "", "priority": p}))
            .collect();
        t["columnDefinitions"] = json!(cols);
    }
    t
}

/// The first three entries, then "+ N more...", as kubectl prints endpoint lists.
fn list_of(items: &[String]) -> String {
    match items.len() {
        0..=3 => items.join(","),
        n => format!("{} + {} more...", items[..3].join(","), n - 3),
    }
}

#[cfg(test)]
mod tests {
    use super::super::registry::lookup;
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(human_duration(5), "5s");
        assert_eq!(human_duration(150), "2m30s");
        assert_eq!(human_duration(3600 * 3 + 60), "3h1m");
        assert_eq!(human_duration(86400 * 3 + 3600), "3d1h");
        assert_eq!(human_duration(86400 * 400), "400d");
    }

    #[test]
    fn pod_rows() {
        let info = lookup("", "v1", "pods").unwrap();
        let p = json!({"metadata": {"name": "web", "creationTimestamp": rfc3339(now())},
            "spec": {"containers": [{"name": "a"}, {"name": "b"}], "nodeName": "n1"},
            "status": {"phase": "Running", "podIP": "10.0.0.5", "containerStatuses": [
                {"name": "a", "ready": true, "restartCount": 2, "state": {"running": {}}},
                {"name": "b", "ready": false, "restartCount": 1, "state": {"waiting": {"reason": "CrashLoopBackOff"}}}]}});
        let t = table(info, &[&p], "7", IncludeObject::Metadata, true);
        assert_eq!(t["columnDefinitions"].as_array().unwrap().len(), 9);
        let c = &t["rows"][0]["cells"];
        assert_eq!(c[1], "1/2");
        assert_eq!(c[2], "CrashLoopBackOff");
        assert_eq!(c[3], "3");
        assert_eq!(c[5], "10.0.0.5");
        assert_eq!(c[7], "<none>");
        assert_eq!(t["rows"][0]["object"]["kind"], "PartialObjectMetadata");
        let mut d = p.clone();
        d["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        assert_eq!(pod_status(&d), "Terminating");
    }

    #[test]
    fn secret_and_service_rows() {
        let sec = lookup("", "v1", "secrets").unwrap();
        let t = table(
            sec,
            &[&json!({"metadata": {"name": "s"}, "type": "Opaque", "data": {"a": "", "b": ""}})],
            "1",
            IncludeObject::None,
            false,
        );
        assert_eq!(t["rows"][0]["cells"], json!(["s", "Opaque", 2, "<unknown>"]));
        assert!(t.get("columnDefinitions").is_none() && t["rows"][0].get("object").is_none());
        let svc = lookup("", "v1", "services").unwrap();
        let o = json!({"metadata": {"name": "web"}, "spec": {"type": "NodePort", "clusterIP": "10.96.0.10",
            "ports": [{"port": 80, "nodePort": 30080, "protocol": "TCP"}], "selector": {"app": "web"}}});
        let c = &table(svc, &[&o], "1", IncludeObject::None, true)["rows"][0]["cells"];
        assert_eq!(c[4], "80:30080/TCP");
        assert_eq!(c[6], "app=web");
    }
}
