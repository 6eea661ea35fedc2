//! Decoding through the k8s-openapi types, defaulting, validation and update rules.

use serde_json::{Map, Value, json};

use super::errors::{ApiError, ApiResult, Cause};
use super::registry::ResourceInfo;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FieldValidation {
    Ignore,
    Warn,
    Strict,
}

impl FieldValidation {
    pub fn parse(s: Option<&str>) -> ApiResult<Self> {
        match s {
            None | Some("") | Some("Warn") => Ok(FieldValidation::Warn),
            Some("Strict") => Ok(FieldValidation::Strict),
            Some("Ignore") => Ok(FieldValidation::Ignore),
            Some(o) => Err(ApiError::bad_request(format!(
                "fieldValidation must be Ignore, Warn or Strict, got {o:?}"
            ))),
        }
    }
}

/// Paths of input fields that the typed round trip dropped (unknown fields). Nulls are not reported.
pub fn unknown_fields(input: &Value, output: &Value, path: &str, out: &mut Vec<String>) {
    match (input, output) {
        (Value::Object(i), Value::Object(o)) => {
            for (k, v) in i {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                match o.get(k) {
                    None if !v.is_null() => out.push(p),
                    Some(ov) => unknown_fields(v, ov, &p, out),
                    None => {}
                }
            }
        }
        (Value::Array(i), Value::Array(o)) => {
            for (n, (a, b)) in i.iter().zip(o).enumerate() {
                unknown_fields(a, b, &format!("{path}[{n}]"), out);
            }
        }
        _ => {}
    }
}

/// Type-checks `obj` against its k8s-openapi type and prunes unknown fields. Returns warnings (Warn mode).
pub fn decode(info: &ResourceInfo, obj: &mut Value, fv: FieldValidation) -> ApiResult<Vec<String>> {
    let typed = (info.codec)(obj.clone()).map_err(|e| {
        ApiError::bad_request(format!(
            "{} in version {:?} cannot be handled as a {}: {e}",
            info.kind, info.version, info.kind
        ))
    })?;
    let mut unknown = Vec::new();
    unknown_fields(obj, &typed, "", &mut unknown);
    *obj = typed;
    match fv {
        FieldValidation::Strict if !unknown.is_empty() => {
            let name = obj
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            let mut e = ApiError::invalid(
                info.kind,
                info.group,
                &name,
                unknown.iter().map(Cause::unknown).collect(),
            );
            e.message = format!(
                "{} {name:?} is invalid: strict decoding error: {}",
                info.kind,
                unknown
                    .iter()
                    .map(|u| format!("unknown field {u:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            Err(e)
        }
        FieldValidation::Warn => Ok(unknown.iter().map(|u| format!("unknown field {u:?}")).collect()),
        _ => Ok(Vec::new()),
    }
}

fn obj_mut<'a>(v: &'a mut Value, key: &str) -> &'a mut Map<String, Value> {
    if !v.get(key).is_some_and(Value::is_object) {
        v[key] = json!({});
    }
    v[key].as_object_mut().expect("just made an object")
}

fn default_str(m: &mut Map<String, Value>, k: &str, v: &str) {
    m.entry(k).or_insert_with(|| Value::String(v.into()));
}

/// Defaults a real API server would fill in, so `-o yaml` looks familiar and controllers can rely on them.
pub fn apply_defaults(info: &ResourceInfo, obj: &mut Value) {
    let name = obj
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    match (info.group, info.resource) {
        ("batch", "jobs") => default_job(obj, &name),
        ("batch", "cronjobs") => {
            let spec = obj_mut(obj, "spec");
            default_str(spec, "concurrencyPolicy", "Allow");
            spec.entry("suspend").or_insert(json!(false));
            spec.entry("successfulJobsHistoryLimit").or_insert(json!(3));
            spec.entry("failedJobsHistoryLimit").or_insert(json!(1));
        }
        ("", "secrets") => {
            // stringData is write-only: merged into data (base64), winning over it.
            let map = obj.as_object_mut().expect("an object");
            if let Some(Value::Object(strings)) = map.remove("stringData") {
                use base64::Engine;
                let data = map.entry("data").or_insert(json!({}));
                if let Some(data) = data.as_object_mut() {
                    for (key, value) in strings {
                        let text = value.as_str().unwrap_or_default().to_string();
                        let encoded = base64::engine::general_purpose::STANDARD.encode(text);
                        data.insert(key, Value::String(encoded));
                    }
                }
            }
            if map.get("type").and_then(Value::as_str).is_none_or(str::is_empty) {
                map.insert("type".into(), json!("Opaque"));
            }
        }
        ("", "pods") => {
            let spec = obj_mut(obj, "spec");
            default_pod_spec(spec);
            default_str(spec, "preemptionPolicy", "PreemptLowerPriority");
            // As the ServiceAccount admission plugin does (serviceAccount is its old alias).
            default_str(spec, "serviceAccountName", "default");
            let account = spec["serviceAccountName"].clone();
            spec.entry("serviceAccount").or_insert(account);
            spec.entry("enableServiceLinks").or_insert(json!(true));
            spec.entry("priority").or_insert(json!(0));
            let status = obj_mut(obj, "status");
            default_str(status, "phase", "Pending");
            default_str(status, "qosClass", "BestEffort");
        }
        ("", "namespaces") => {
            let meta = obj_mut(obj, "metadata");
            if let Some(l) = meta.entry("labels").or_insert(json!({})).as_object_mut() {
                l.insert("kubernetes.io/metadata.name".into(), Value::String(name));
            }
            obj_mut(obj, "spec")
                .entry("finalizers")
                .or_insert(json!(["kubernetes"]));
            default_str(obj_mut(obj, "status"), "phase", "Active");
        }
        ("", "services") => {
            let spec = obj_mut(obj, "spec");
            default_str(spec, "type", "ClusterIP");
            default_str(spec, "sessionAffinity", "None");
            for p in spec
                .get_mut("ports")
                .and_then(Value::as_array_mut)
                .into_iter()
                .flatten()
            {
                if let Some(p) = p.as_object_mut() {
                    default_str(p, "protocol", "TCP");
                    if let Some(port) = p.get("port").cloned() {
                        p.entry("targetPort").or_insert(port);
                    }
                }
            }
            obj_mut(obj, "status").entry("loadBalancer").or_insert(json!({}));
        }
        ("apps", "deployments" | "replicasets" | "daemonsets" | "statefulsets") => {
            let spec = obj_mut(obj, "spec");
            if info.resource == "statefulsets" {
                default_str(spec, "podManagementPolicy", "OrderedReady");
                let st = spec.entry("updateStrategy").or_insert(json!({}));
                if let Some(st) = st.as_object_mut() {
                    default_str(st, "type", "RollingUpdate");
                    if st["type"] == "RollingUpdate" {
                        let ru = st.entry("rollingUpdate").or_insert(json!({}));
                        if let Some(ru) = ru.as_object_mut() {
                            ru.entry("partition").or_insert(json!(0));
                        }
                    }
                }
            }
            if info.resource != "daemonsets" {
                spec.entry("replicas").or_insert(json!(1));
            }
            if info.resource != "replicasets" {
                spec.entry("revisionHistoryLimit").or_insert(json!(10));
            }
            if info.resource == "deployments" {
                spec.entry("progressDeadlineSeconds").or_insert(json!(600));
                default_rolling(spec, "strategy", "25%", "25%");
            }
            if info.resource == "daemonsets" {
                default_rolling(spec, "updateStrategy", "1", "0");
            }
            let template = spec.entry("template").or_insert(json!({}));
            if let Some(t) = template.as_object_mut() {
                t.entry("metadata").or_insert(json!({}));
                let pod_spec = t.entry("spec").or_insert(json!({}));
                if let Some(ps) = pod_spec.as_object_mut() {
                    default_pod_spec(ps);
                }
            }
        }
        _ => {}
    }
}

/// Job defaults: one pod to one completion, 6 retries, and (unless `manualSelector`) a selector on the
/// Job's uid, with the labels that carry it added to the template.
fn default_job(obj: &mut Value, name: &str) {
    let uid = obj
        .pointer("/metadata/uid")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let spec = obj_mut(obj, "spec");
    if !spec.contains_key("parallelism") && !spec.contains_key("completions") {
        spec.insert("completions".into(), json!(1));
    }
    spec.entry("parallelism").or_insert(json!(1));
    spec.entry("backoffLimit").or_insert(json!(6));
    default_str(spec, "completionMode", "NonIndexed");
    spec.entry("suspend").or_insert(json!(false));
    let manual = spec.get("manualSelector") == Some(&json!(true));
    if !manual && !uid.is_empty() {
        spec.entry("selector")
            .or_insert(json!({"matchLabels": {"batch.kubernetes.io/controller-uid": uid}}));
    }
    let template = spec.entry("template").or_insert(json!({}));
    let Some(t) = template.as_object_mut() else { return };
    if !manual && !uid.is_empty() {
        let meta = t.entry("metadata").or_insert(json!({}));
        if let Some(meta) = meta.as_object_mut() {
            let labels = meta.entry("labels").or_insert(json!({}));
            if let Some(labels) = labels.as_object_mut() {
                for (key, value) in [
                    ("batch.kubernetes.io/controller-uid", &uid),
                    ("batch.kubernetes.io/job-name", &name.to_string()),
                    ("controller-uid", &uid),
                    ("job-name", &name.to_string()),
                ] {
                    labels.entry(key).or_insert(json!(value));
                }
            }
        }
    }
    let pod_spec = t.entry("spec").or_insert(json!({}));
    if let Some(ps) = pod_spec.as_object_mut() {
        // No default restart policy: a Job's pods must say Never or OnFailure.
        let policy = ps.remove("restartPolicy");
        default_pod_spec(ps);
        match policy {
            Some(p) => _ = ps.insert("restartPolicy".into(), p),
            None => _ = ps.remove("restartPolicy"),
        }
    }
}

/// `{type: RollingUpdate, rollingUpdate: {maxUnavailable, maxSurge}}` unless another type is set.
fn default_rolling(spec: &mut Map<String, Value>, field: &str, max_unavailable: &str, max_surge: &str) {
    let strategy = spec.entry(field).or_insert(json!({}));
    let Some(st) = strategy.as_object_mut() else { return };
    default_str(st, "type", "RollingUpdate");
    if st["type"] != "RollingUpdate" {
        return;
    }
    let ru = st.entry("rollingUpdate").or_insert(json!({}));
    if let Some(ru) = ru.as_object_mut() {
        let int_or_percent = |s: &str| s.parse::<i64>().map_or(json!(s), |n| json!(n));
        ru.entry("maxUnavailable").or_insert(int_or_percent(max_unavailable));
        ru.entry("maxSurge").or_insert(int_or_percent(max_surge));
    }
}

/// Pod spec defaults, for pods and for the pod templates of workloads.
fn default_pod_spec(spec: &mut Map<String, Value>) {
    default_str(spec, "restartPolicy", "Always");
    default_str(spec, "dnsPolicy", "ClusterFirst");
    default_str(spec, "schedulerName", "default-scheduler");
    spec.entry("terminationGracePeriodSeconds").or_insert(json!(30));
    spec.entry("securityContext").or_insert(json!({}));
    for list in ["initContainers", "containers"] {
        for c in spec.get_mut(list).and_then(Value::as_array_mut).into_iter().flatten() {
            let Some(c) = c.as_object_mut() else { continue };
            let image = c.get("image").and_then(Value::as_str).unwrap_or("");
            let last = image.rsplit('/').next().unwrap_or("");
            let policy = if !last.contains(':') || last.ends_with(":latest") {
                "Always"
            } else {
                "IfNotPresent"
            };
            let policy = if image.contains('@') { "IfNotPresent" } else { policy };
            default_str(c, "imagePullPolicy", policy);
            default_str(c, "terminationMessagePath", "/dev/termination-log");
            default_str(c, "terminationMessagePolicy", "File");
            c.entry("resources").or_insert(json!({}));
            for p in c.get_mut("ports").and_then(Value::as_array_mut).into_iter().flatten() {
                if let Some(p) = p.as_object_mut() {
                    default_str(p, "protocol", "TCP");
                }
            }
        }
    }
}

const DNS1123_LABEL_MSG: &str = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')";
const DNS1123_SUBDOMAIN_MSG: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";

pub fn is_dns1123_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

pub fn is_dns1123_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns1123_label)
}

fn check_name(field: &str, name: &str, label: bool, causes: &mut Vec<Cause>) {
    if label && !is_dns1123_label(name) {
        causes.push(Cause::invalid(field, name, DNS1123_LABEL_MSG));
    } else if !label && !is_dns1123_subdomain(name) {
        causes.push(Cause::invalid(field, name, DNS1123_SUBDOMAIN_MSG));
    }
}

fn str_at<'a>(v: &'a Value, ptr: &str) -> &'a str {
    v.pointer(ptr).and_then(Value::as_str).unwrap_or("")
}

/// Validates a complete object (after defaulting). 422 with field causes.
pub fn validate(info: &ResourceInfo, obj: &Value) -> ApiResult<()> {
    let mut causes = Vec::new();
    let name = str_at(obj, "/metadata/name");
    let label_names = matches!(info.resource, "namespaces" | "services");
    if name.is_empty() {
        causes.push(Cause::required("metadata.name", "name or generateName is required"));
    } else {
        check_name("metadata.name", name, label_names, &mut causes);
    }
    if let Some(labels) = obj.pointer("/metadata/labels").and_then(Value::as_object) {
        for (k, v) in labels {
            let val = v.as_str().unwrap_or("");
            let ok = val.len() <= 63
                && val.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
                && val.bytes().next().is_none_or(|b| b.is_ascii_alphanumeric())
                && val.bytes().last().is_none_or(|b| b.is_ascii_alphanumeric());
            if !ok {
                causes.push(Cause::invalid("metadata.labels", val, "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character"));
            }
            let key_name = k.rsplit('/').next().unwrap_or("");
            if key_name.is_empty() || key_name.len() > 63 {
                causes.push(Cause::invalid(
                    "metadata.labels",
                    k,
                    "name part must be no more than 63 characters",
                ));
            }
        }
    }
    match (info.group, info.resource) {
        ("", "pods") => validate_pod_spec(&obj["spec"], "spec", &mut causes),
        ("apps", "deployments" | "replicasets" | "daemonsets" | "statefulsets") => {
            validate_workload(info, obj, &mut causes)
        }
        ("batch", "cronjobs") => {
            let schedule = str_at(obj, "/spec/schedule");
            if let Err(e) = crate::cluster::cron::Schedule::parse(schedule) {
                causes.push(Cause::invalid("spec.schedule", schedule, &e));
            }
            let zone = str_at(obj, "/spec/timeZone");
            if !["", "UTC", "Etc/UTC"].contains(&zone) {
                causes.push(Cause::invalid(
                    "spec.timeZone",
                    zone,
                    "only UTC schedules are supported",
                ));
            }
            let policy = str_at(obj, "/spec/concurrencyPolicy");
            if !["Allow", "Forbid", "Replace"].contains(&policy) {
                causes.push(Cause::invalid(
                    "spec.concurrencyPolicy",
                    policy,
                    "Unsupported value: supported values: \"Allow\", \"Forbid\", \"Replace\"",
                ));
            }
            match str_at(obj, "/spec/jobTemplate/spec/template/spec/restartPolicy") {
                "Never" | "OnFailure" => {}
                other => causes.push(Cause::invalid(
                    "spec.jobTemplate.spec.template.spec.restartPolicy",
                    other,
                    "Unsupported value: supported values: \"OnFailure\", \"Never\"",
                )),
            }
        }
        ("batch", "jobs") => {
            let policy = str_at(obj, "/spec/template/spec/restartPolicy");
            match policy {
                "Never" | "OnFailure" => {}
                "" => causes.push(Cause::required("spec.template.spec.restartPolicy", "")),
                other => causes.push(Cause::invalid(
                    "spec.template.spec.restartPolicy",
                    other,
                    "Unsupported value: supported values: \"OnFailure\", \"Never\"",
                )),
            }
            if obj.pointer("/spec/selector").is_none() {
                causes.push(Cause::required("spec.selector", ""));
            }
            validate_pod_spec(&obj["spec"]["template"]["spec"], "spec.template.spec", &mut causes);
        }
        ("", "configmaps") | ("", "secrets") => {
            for field in ["data", "binaryData", "stringData"] {
                for k in obj
                    .get(field)
                    .and_then(Value::as_object)
                    .map(|m| m.keys())
                    .into_iter()
                    .flatten()
                {
                    if k.is_empty() || !k.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) {
                        causes.push(Cause::invalid(
                            format!("{field}[{k}]"),
                            k,
                            "a valid config key must consist of alphanumeric characters, '-', '_' or '.'",
                        ));
                    }
                }
            }
        }
        ("node.k8s.io", "runtimeclasses") => {
            let h = str_at(obj, "/handler");
            if h.is_empty() {
                causes.push(Cause::required("handler", ""));
            } else {
                check_name("handler", h, true, &mut causes);
            }
        }
        ("", "services") => {
            for (i, p) in obj
                .pointer("/spec/ports")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .enumerate()
            {
                if p.get("port")
                    .and_then(Value::as_i64)
                    .is_none_or(|n| !(1..=65535).contains(&n))
                {
                    causes.push(Cause::invalid(
                        format!("spec.ports[{i}].port"),
                        &p["port"].to_string(),
                        "must be between 1 and 65535, inclusive",
                    ));
                }
            }
        }
        _ => {}
    }
    if causes.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid(info.kind, info.group, name, causes))
    }
}

/// Selector, template and counts of Deployments, ReplicaSets and DaemonSets.
fn validate_workload(info: &ResourceInfo, obj: &Value, causes: &mut Vec<Cause>) {
    let selector = obj.pointer("/spec/selector");
    let empty = selector.is_none_or(|s| {
        s.get("matchLabels")
            .and_then(Value::as_object)
            .is_none_or(|m| m.is_empty())
            && s.get("matchExpressions")
                .and_then(Value::as_array)
                .is_none_or(|e| e.is_empty())
    });
    if empty {
        causes.push(Cause::required("spec.selector", ""));
    } else if let Some(sel) = selector
        && !super::select::selector_matches(sel, &obj["spec"]["template"])
    {
        let labels = obj
            .pointer("/spec/template/metadata/labels")
            .cloned()
            .unwrap_or(json!({}));
        causes.push(Cause::invalid(
            "spec.template.metadata.labels",
            &labels.to_string(),
            "`selector` does not match template `labels`",
        ));
    }
    for field in ["replicas", "minReadySeconds", "revisionHistoryLimit"] {
        if let Some(n) = obj["spec"].get(field).and_then(Value::as_i64)
            && n < 0
        {
            causes.push(Cause::invalid(
                format!("spec.{field}"),
                &n.to_string(),
                "must be greater than or equal to 0",
            ));
        }
    }
    let template_spec = &obj["spec"]["template"]["spec"];
    validate_pod_spec(template_spec, "spec.template.spec", causes);
    let rp = str_at(template_spec, "/restartPolicy");
    if rp != "Always" && !rp.is_empty() {
        causes.push(Cause::invalid(
            "spec.template.spec.restartPolicy",
            rp,
            "supported values: \"Always\"",
        ));
    }
    if info.resource == "deployments" {
        let st = str_at(obj, "/spec/strategy/type");
        if !["RollingUpdate", "Recreate"].contains(&st) {
            causes.push(Cause::invalid(
                "spec.strategy.type",
                st,
                "supported values: \"Recreate\", \"RollingUpdate\"",
            ));
        }
        if st == "RollingUpdate" {
            validate_rolling_update(obj, causes);
        }
        if st == "Recreate"
            && obj
                .pointer("/spec/strategy/rollingUpdate")
                .is_some_and(|r| !r.is_null())
        {
            causes.push(Cause::forbidden(
                "spec.strategy.rollingUpdate",
                "may not be specified when strategy `type` is 'Recreate'",
            ));
        }
    }
}

/// maxUnavailable and maxSurge: non-negative ints or percentages up to 100%, not both zero.
fn validate_rolling_update(obj: &Value, causes: &mut Vec<Cause>) {
    let zero = |v: Option<&Value>| match v {
        Some(Value::Number(n)) => n.as_i64() == Some(0),
        Some(Value::String(p)) => p.trim_end_matches('%').parse::<i64>().ok() == Some(0),
        _ => false,
    };
    for field in ["maxUnavailable", "maxSurge"] {
        let v = obj.pointer(&format!("/spec/strategy/rollingUpdate/{field}"));
        let bad = match v {
            Some(Value::Number(n)) => n.as_i64().is_none_or(|n| n < 0),
            Some(Value::String(p)) => p
                .strip_suffix('%')
                .and_then(|p| p.parse::<i64>().ok())
                .is_none_or(|p| !(0..=100).contains(&p)),
            _ => false,
        };
        if bad {
            causes.push(Cause::invalid(
                format!("spec.strategy.rollingUpdate.{field}"),
                &v.map(Value::to_string).unwrap_or_default(),
                "must be a non-negative integer or a percentage between 0% and 100%",
            ));
        }
    }
    if zero(obj.pointer("/spec/strategy/rollingUpdate/maxUnavailable"))
        && zero(obj.pointer("/spec/strategy/rollingUpdate/maxSurge"))
    {
        causes.push(Cause::invalid(
            "spec.strategy.rollingUpdate.maxUnavailable",
            "0",
            "may not be 0 when `maxSurge` is 0",
        ));
    }
}

fn validate_pod_spec(spec: &Value, prefix: &str, causes: &mut Vec<Cause>) {
    let containers = spec.get("containers").and_then(Value::as_array);
    if containers.is_none_or(|c| c.is_empty()) {
        causes.push(Cause::required(format!("{prefix}.containers"), ""));
    }
    let mut seen = Vec::new();
    for list in ["initContainers", "containers"] {
        for (i, c) in spec
            .get(list)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            let cname = str_at(c, "/name");
            let field = format!("{prefix}.{list}[{i}]");
            if cname.is_empty() {
                causes.push(Cause::required(format!("{field}.name"), ""));
            } else if !is_dns1123_label(cname) {
                causes.push(Cause::invalid(format!("{field}.name"), cname, DNS1123_LABEL_MSG));
            } else if seen.contains(&cname) {
                causes.push(Cause::duplicate(format!("{field}.name"), cname));
            } else {
                seen.push(cname);
            }
            if str_at(c, "/image").trim().is_empty() {
                causes.push(Cause::required(format!("{field}.image"), ""));
            }
            for (j, p) in c
                .get("ports")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .enumerate()
            {
                if p.get("containerPort")
                    .and_then(Value::as_i64)
                    .is_none_or(|n| !(1..=65535).contains(&n))
                {
                    causes.push(Cause::invalid(
                        format!("{field}.ports[{j}].containerPort"),
                        &p["containerPort"].to_string(),
                        "must be between 1 and 65535, inclusive",
                    ));
                }
            }
        }
    }
    let rp = str_at(spec, "/restartPolicy");
    if !["Always", "OnFailure", "Never"].contains(&rp) {
        causes.push(Cause::invalid(
            format!("{prefix}.restartPolicy"),
            rp,
            "supported values: \"Always\", \"OnFailure\", \"Never\"",
        ));
    }
}

/// Update rules: immutable fields (pod spec, immutable ConfigMaps/Secrets, runtime class handler).
pub fn validate_update(info: &ResourceInfo, old: &Value, new: &Value) -> ApiResult<()> {
    let name = str_at(new, "/metadata/name");
    let mut causes = Vec::new();
    match (info.group, info.resource) {
        ("", "pods") => {
            let mask = |spec: &Value| {
                let mut s = spec.clone();
                for list in ["containers", "initContainers"] {
                    for c in s.get_mut(list).and_then(Value::as_array_mut).into_iter().flatten() {
                        c.as_object_mut().map(|c| c.remove("image"));
                    }
                }
                if let Some(m) = s.as_object_mut() {
                    for f in ["activeDeadlineSeconds", "tolerations", "terminationGracePeriodSeconds"] {
                        m.remove(f);
                    }
                }
                s
            };
            if mask(&old["spec"]) != mask(&new["spec"]) {
                causes.push(Cause::forbidden("spec", "pod updates may not change fields other than `spec.containers[*].image`,`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,`spec.tolerations` (only additions to existing tolerations),`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was previously negative)"));
            }
            let old_t = old
                .pointer("/spec/tolerations")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let new_t = new
                .pointer("/spec/tolerations")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            if !old_t.iter().all(|t| new_t.contains(t)) {
                causes.push(Cause::forbidden(
                    "spec.tolerations",
                    "existing toleration can not be modified except its tolerationSeconds",
                ));
            }
        }
        ("", "configmaps") | ("", "secrets") => {
            if old.get("immutable") == Some(&Value::Bool(true)) {
                for f in ["data", "binaryData", "immutable"] {
                    if old.get(f) != new.get(f) {
                        causes.push(Cause::forbidden(f, "field is immutable when `immutable` is set"));
                    }
                }
            }
            if info.resource == "secrets" && old.get("type") != new.get("type") {
                causes.push(Cause::invalid("type", str_at(new, "/type"), "field is immutable"));
            }
        }
        ("apps", "deployments" | "replicasets" | "daemonsets" | "statefulsets")
            if old.pointer("/spec/selector") != new.pointer("/spec/selector") =>
        {
            let sel = new.pointer("/spec/selector").cloned().unwrap_or(Value::Null);
            causes.push(Cause::invalid("spec.selector", &sel.to_string(), "field is immutable"));
        }
        ("node.k8s.io", "runtimeclasses") if old.get("handler") != new.get("handler") => {
            causes.push(Cause::invalid("handler", str_at(new, "/handler"), "field is immutable"));
        }
        _ => {}
    }
    if causes.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid(info.kind, info.group, name, causes))
    }
}

#[cfg(test)]
mod tests {
    use super::super::registry::lookup;
    use super::*;

    #[test]
    fn secrets_merge_string_data_into_data() {
        let secrets = crate::cluster::apiserver::registry::lookup("", "v1", "secrets").unwrap();
        let mut secret =
            json!({"metadata": {"name": "s"}, "data": {"a": "eA==", "b": "eA=="}, "stringData": {"b": "hi"}});
        apply_defaults(secrets, &mut secret);
        assert_eq!(secret["data"], json!({"a": "eA==", "b": "aGk="}));
        assert_eq!(secret.get("stringData"), None);
        assert_eq!(secret["type"], json!("Opaque"));
    }

    #[test]
    fn strict_names_unknown_field_and_prunes() {
        let pods = lookup("", "v1", "pods").unwrap();
        let mut p = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
                           "spec": {"containers": [{"name": "c", "image": "i", "imagee": "x"}]}});
        let e = decode(pods, &mut p.clone(), FieldValidation::Strict).unwrap_err();
        assert_eq!(e.code, 422);
        assert!(e.message.contains("spec.containers[0].imagee"), "{}", e.message);
        let w = decode(pods, &mut p, FieldValidation::Warn).unwrap();
        assert_eq!(w, vec!["unknown field \"spec.containers[0].imagee\"".to_string()]);
        assert!(p["spec"]["containers"][0].get("imagee").is_none());
        let mut bad = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": 5}});
        assert_eq!(decode(pods, &mut bad, FieldValidation::Ignore).unwrap_err().code, 400);
    }

    #[test]
    fn pod_validation_names_fields() {
        let pods = lookup("", "v1", "pods").unwrap();
        let mut p = json!({"metadata": {"name": "Bad_Name"}, "spec": {"containers": [{"name": "c"}, {"name": "c", "image": "i"}]}});
        apply_defaults(pods, &mut p);
        let e = validate(pods, &p).unwrap_err();
        let fields: Vec<_> = e.details["causes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["field"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(
            fields,
            ["metadata.name", "spec.containers[0].image", "spec.containers[1].name"]
        );
        let mut q = json!({"metadata": {"name": "ok"}, "spec": {}});
        apply_defaults(pods, &mut q);
        assert!(
            validate(pods, &q)
                .unwrap_err()
                .message
                .contains("spec.containers: Required value")
        );
    }

    #[test]
    fn workload_selector_and_strategy() {
        let deployments = lookup("apps", "v1", "deployments").unwrap();
        let d = |selector: Value, strategy: Value| {
            let mut d = json!({"metadata": {"name": "web"},
                               "spec": {"selector": selector, "strategy": strategy,
                                        "template": {"metadata": {"labels": {"app": "web"}},
                                                     "spec": {"containers": [{"name": "c", "image": "i"}]}}}});
            apply_defaults(deployments, &mut d);
            d
        };
        let fields = |v: &Value| -> Vec<String> {
            match validate(deployments, v) {
                Ok(()) => Vec::new(),
                Err(e) => e.details["causes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|c| c["field"].as_str().unwrap().to_string())
                    .collect(),
            }
        };
        let ok = d(json!({"matchLabels": {"app": "web"}}), json!({}));
        assert!(fields(&ok).is_empty());
        assert_eq!(ok["spec"]["strategy"]["rollingUpdate"]["maxSurge"], "25%");
        assert_eq!(fields(&d(json!({}), json!({}))), ["spec.selector"]);
        assert_eq!(
            fields(&d(json!({"matchLabels": {"app": "db"}}), json!({}))),
            ["spec.template.metadata.labels"]
        );
        let both_zero = json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": "0%"}});
        assert_eq!(
            fields(&d(json!({"matchLabels": {"app": "web"}}), both_zero)),
            ["spec.strategy.rollingUpdate.maxUnavailable"]
        );
        let mut changed = ok.clone();
        changed["spec"]["selector"]["matchLabels"]["tier"] = json!("x");
        assert!(
            validate_update(deployments, &ok, &changed)
                .unwrap_err()
                .message
                .contains("field is immutable")
        );
    }

    #[test]
    fn pod_spec_immutable_except_image() {
        let pods = lookup("", "v1", "pods").unwrap();
        let old = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "a"}]}});
        let img = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "b"}]}});
        let cmd =
            json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "a", "command": ["x"]}]}});
        assert!(validate_update(pods, &old, &img).is_ok());
        assert_eq!(validate_update(pods, &old, &cmd).unwrap_err().code, 422);
    }
}
