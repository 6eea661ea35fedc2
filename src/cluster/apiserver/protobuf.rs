//! Minimal decoder for the Kubernetes protobuf request bodies kubectl sends from its typed clients
//! (`kubectl create configmap|secret|namespace|deployment|service`, DeleteOptions). Field numbers follow
//! k8s.io/api's generated.proto; fields kubectl does not send are skipped. Responses are always JSON.

use base64::Engine;
use serde_json::{Map, Value, json};

const MAGIC: &[u8] = b"k8s\0";

enum Wire<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
}

fn varint(buf: &[u8], pos: &mut usize) -> Result<u64, String> {
    let mut out = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*pos).ok_or("truncated varint")?;
        *pos += 1;
        out |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(out);
        }
    }
    Err("varint too long".into())
}

fn fields(buf: &[u8]) -> Result<Vec<(u64, Wire<'_>)>, String> {
    let mut pos = 0;
    let mut out = Vec::new();
    while pos < buf.len() {
        let tag = varint(buf, &mut pos)?;
        let (num, wt) = (tag >> 3, tag & 7);
        let v = match wt {
            0 => Wire::Varint(varint(buf, &mut pos)?),
            2 => {
                let len = usize::try_from(varint(buf, &mut pos)?).map_err(|_| "length overflow")?;
                let end = pos
                    .checked_add(len)
                    .filter(|e| *e <= buf.len())
                    .ok_or("truncated field")?;
                let b = &buf[pos..end];
                pos = end;
                Wire::Bytes(b)
            }
            1 => {
                pos += 8;
                continue;
            }
            5 => {
                pos += 4;
                continue;
            }
            _ => return Err(format!("unsupported wire type {wt}")),
        };
        out.push((num, v));
    }
    Ok(out)
}

fn string(b: &[u8]) -> Result<String, String> {
    String::from_utf8(b.to_vec()).map_err(|_| "invalid UTF-8".to_string())
}

/// A map<string, string|bytes> entry (key = 1, value = 2).
fn map_entry(b: &[u8], bytes_value: bool) -> Result<(String, Value), String> {
    let (mut k, mut v) = (String::new(), Value::String(String::new()));
    for (n, w) in fields(b)? {
        match (n, w) {
            (1, Wire::Bytes(x)) => k = string(x)?,
            (2, Wire::Bytes(x)) if bytes_value => v = json!(base64::engine::general_purpose::STANDARD.encode(x)),
            (2, Wire::Bytes(x)) => v = json!(string(x)?),
            _ => {}
        }
    }
    Ok((k, v))
}

fn insert_entry(m: &mut Map<String, Value>, field: &str, b: &[u8], bytes_value: bool) -> Result<(), String> {
    let (k, v) = map_entry(b, bytes_value)?;
    let e = m.entry(field).or_insert_with(|| json!({}));
    e.as_object_mut().expect("map field").insert(k, v);
    Ok(())
}

fn object_meta(b: &[u8]) -> Result<Value, String> {
    let mut m = Map::new();
    for (n, w) in fields(b)? {
        match (n, w) {
            // Go writes empty strings too; they mean "unset".
            (1..=6, Wire::Bytes([])) => {}
            (1, Wire::Bytes(x)) => _ = m.insert("name".into(), json!(string(x)?)),
            (2, Wire::Bytes(x)) => _ = m.insert("generateName".into(), json!(string(x)?)),
            (3, Wire::Bytes(x)) => _ = m.insert("namespace".into(), json!(string(x)?)),
            (5, Wire::Bytes(x)) => _ = m.insert("uid".into(), json!(string(x)?)),
            (6, Wire::Bytes(x)) => _ = m.insert("resourceVersion".into(), json!(string(x)?)),
            (11, Wire::Bytes(x)) => insert_entry(&mut m, "labels", x, false)?,
            (12, Wire::Bytes(x)) => insert_entry(&mut m, "annotations", x, false)?,
            // As `kubectl create job --from=cronjob/...` sends.
            (13, Wire::Bytes(x)) => {
                let reference = message(OWNER_REFERENCE, x)?;
                let refs = m.entry("ownerReferences").or_insert_with(|| json!([]));
                refs.as_array_mut().expect("list").push(reference);
            }
            (14, Wire::Bytes(x)) => {
                let f = m.entry("finalizers").or_insert_with(|| json!([]));
                f.as_array_mut().expect("list").push(json!(string(x)?));
            }
            _ => {}
        }
    }
    Ok(Value::Object(m))
}

/// How one protobuf field maps to JSON.
#[derive(Clone, Copy)]
enum Ty {
    Str,
    /// A plain int32/int64: Go always encodes it, so 0 means unset.
    Int,
    /// A pointer int (`*int32`): present only when set, 0 included.
    OptInt,
    Bool,
    /// A pointer bool (`*bool`): present only when set, false included.
    OptBool,
    /// `map<string, string>`.
    StrMap,
    /// `intstr.IntOrString` (type = 1, intVal = 2, strVal = 3).
    IntOrStr,
    /// `metav1.ObjectMeta`.
    Meta,
    Msg(&'static [Field]),
}

/// (field number, JSON name, type, repeated).
type Field = (u64, &'static str, Ty, bool);

const REQUIREMENT: &[Field] = &[
    (1, "key", Ty::Str, false),
    (2, "operator", Ty::Str, false),
    (3, "values", Ty::Str, true),
];
const LABEL_SELECTOR: &[Field] = &[
    (1, "matchLabels", Ty::StrMap, false),
    (2, "matchExpressions", Ty::Msg(REQUIREMENT), true),
];
const CONTAINER_PORT: &[Field] = &[
    (1, "name", Ty::Str, false),
    (2, "hostPort", Ty::Int, false),
    (3, "containerPort", Ty::Int, false),
    (4, "protocol", Ty::Str, false),
    (5, "hostIP", Ty::Str, false),
];
const ENV_VAR: &[Field] = &[(1, "name", Ty::Str, false), (2, "value", Ty::Str, false)];
const CONTAINER: &[Field] = &[
    (1, "name", Ty::Str, false),
    (2, "image", Ty::Str, false),
    (3, "command", Ty::Str, true),
    (4, "args", Ty::Str, true),
    (5, "workingDir", Ty::Str, false),
    (6, "ports", Ty::Msg(CONTAINER_PORT), true),
    (7, "env", Ty::Msg(ENV_VAR), true),
    (13, "terminationMessagePath", Ty::Str, false),
    (14, "imagePullPolicy", Ty::Str, false),
    (16, "stdin", Ty::Bool, false),
    (17, "stdinOnce", Ty::Bool, false),
    (18, "tty", Ty::Bool, false),
    (20, "terminationMessagePolicy", Ty::Str, false),
];
const POD_SPEC: &[Field] = &[
    (2, "containers", Ty::Msg(CONTAINER), true),
    (3, "restartPolicy", Ty::Str, false),
    (4, "terminationGracePeriodSeconds", Ty::OptInt, false),
    (6, "dnsPolicy", Ty::Str, false),
    (7, "nodeSelector", Ty::StrMap, false),
    (8, "serviceAccountName", Ty::Str, false),
    (10, "nodeName", Ty::Str, false),
    (11, "hostNetwork", Ty::Bool, false),
];
const POD_TEMPLATE: &[Field] = &[(1, "metadata", Ty::Meta, false), (2, "spec", Ty::Msg(POD_SPEC), false)];
const ROLLING_UPDATE: &[Field] = &[
    (1, "maxUnavailable", Ty::IntOrStr, false),
    (2, "maxSurge", Ty::IntOrStr, false),
];
const STRATEGY: &[Field] = &[
    (1, "type", Ty::Str, false),
    (2, "rollingUpdate", Ty::Msg(ROLLING_UPDATE), false),
];
const DEPLOYMENT_SPEC: &[Field] = &[
    (1, "replicas", Ty::OptInt, false),
    (2, "selector", Ty::Msg(LABEL_SELECTOR), false),
    (3, "template", Ty::Msg(POD_TEMPLATE), false),
    (4, "strategy", Ty::Msg(STRATEGY), false),
    (5, "minReadySeconds", Ty::Int, false),
    (6, "revisionHistoryLimit", Ty::OptInt, false),
    (7, "paused", Ty::Bool, false),
    (9, "progressDeadlineSeconds", Ty::OptInt, false),
];
const DEPLOYMENT: &[Field] = &[
    (1, "metadata", Ty::Meta, false),
    (2, "spec", Ty::Msg(DEPLOYMENT_SPEC), false),
];
const SERVICE_PORT: &[Field] = &[
    (1, "name", Ty::Str, false),
    (2, "protocol", Ty::Str, false),
    (3, "port", Ty::Int, false),
    (4, "targetPort", Ty::IntOrStr, false),
    (5, "nodePort", Ty::Int, false),
    (6, "appProtocol", Ty::Str, false),
];
const SERVICE_SPEC: &[Field] = &[
    (1, "ports", Ty::Msg(SERVICE_PORT), true),
    (2, "selector", Ty::StrMap, false),
    (3, "clusterIP", Ty::Str, false),
    (4, "type", Ty::Str, false),
    (5, "externalIPs", Ty::Str, true),
    (7, "sessionAffinity", Ty::Str, false),
    (10, "externalName", Ty::Str, false),
    (11, "externalTrafficPolicy", Ty::Str, false),
    (13, "publishNotReadyAddresses", Ty::Bool, false),
    (17, "ipFamilyPolicy", Ty::Str, false),
    (18, "clusterIPs", Ty::Str, true),
    (19, "ipFamilies", Ty::Str, true),
];
const SERVICE: &[Field] = &[
    (1, "metadata", Ty::Meta, false),
    (2, "spec", Ty::Msg(SERVICE_SPEC), false),
];

const OWNER_REFERENCE: &[Field] = &[
    (1, "kind", Ty::Str, false),
    (3, "name", Ty::Str, false),
    (4, "uid", Ty::Str, false),
    (5, "apiVersion", Ty::Str, false),
    (6, "controller", Ty::OptBool, false),
    (7, "blockOwnerDeletion", Ty::OptBool, false),
];
const PDB_SPEC: &[Field] = &[
    (1, "minAvailable", Ty::IntOrStr, false),
    (2, "selector", Ty::Msg(LABEL_SELECTOR), false),
    (3, "maxUnavailable", Ty::IntOrStr, false),
    (4, "unhealthyPodEvictionPolicy", Ty::Str, false),
];
const PDB: &[Field] = &[(1, "metadata", Ty::Meta, false), (2, "spec", Ty::Msg(PDB_SPEC), false)];
const JOB_SPEC: &[Field] = &[
    (1, "parallelism", Ty::OptInt, false),
    (2, "completions", Ty::OptInt, false),
    (3, "activeDeadlineSeconds", Ty::OptInt, false),
    (4, "selector", Ty::Msg(LABEL_SELECTOR), false),
    (5, "manualSelector", Ty::OptBool, false),
    (6, "template", Ty::Msg(POD_TEMPLATE), false),
    (7, "backoffLimit", Ty::OptInt, false),
    (8, "ttlSecondsAfterFinished", Ty::OptInt, false),
    (9, "completionMode", Ty::Str, false),
    (10, "suspend", Ty::OptBool, false),
];
const JOB: &[Field] = &[(1, "metadata", Ty::Meta, false), (2, "spec", Ty::Msg(JOB_SPEC), false)];
const CRON_JOB_SPEC: &[Field] = &[
    (1, "schedule", Ty::Str, false),
    (2, "startingDeadlineSeconds", Ty::OptInt, false),
    (3, "concurrencyPolicy", Ty::Str, false),
    (4, "suspend", Ty::OptBool, false),
    (5, "jobTemplate", Ty::Msg(JOB), false),
    (6, "successfulJobsHistoryLimit", Ty::OptInt, false),
    (7, "failedJobsHistoryLimit", Ty::OptInt, false),
    (8, "timeZone", Ty::Str, false),
];
const CRON_JOB: &[Field] = &[
    (1, "metadata", Ty::Meta, false),
    (2, "spec", Ty::Msg(CRON_JOB_SPEC), false),
];
const OBJECT_REFERENCE: &[Field] = &[
    (1, "kind", Ty::Str, false),
    (2, "namespace", Ty::Str, false),
    (3, "name", Ty::Str, false),
    (4, "uid", Ty::Str, false),
    (5, "apiVersion", Ty::Str, false),
    (6, "resourceVersion", Ty::Str, false),
    (7, "fieldPath", Ty::Str, false),
];
const LOCAL_OBJECT_REFERENCE: &[Field] = &[(1, "name", Ty::Str, false)];
const SERVICE_ACCOUNT: &[Field] = &[
    (1, "metadata", Ty::Meta, false),
    (2, "secrets", Ty::Msg(OBJECT_REFERENCE), true),
    (3, "imagePullSecrets", Ty::Msg(LOCAL_OBJECT_REFERENCE), true),
    (4, "automountServiceAccountToken", Ty::OptBool, false),
];
const POLICY_RULE: &[Field] = &[
    (1, "verbs", Ty::Str, true),
    (3, "apiGroups", Ty::Str, true),
    (4, "resources", Ty::Str, true),
    (5, "resourceNames", Ty::Str, true),
    (6, "nonResourceURLs", Ty::Str, true),
];
const AGGREGATION_RULE: &[Field] = &[(1, "clusterRoleSelectors", Ty::Msg(LABEL_SELECTOR), true)];
const ROLE: &[Field] = &[
    (1, "metadata", Ty::Meta, false),
    (2, "rules", Ty::Msg(POLICY_RULE), true),
    (3, "aggregationRule", Ty::Msg(AGGREGATION_RULE), false),
];
const SUBJECT: &[Field] = &[
    (1, "kind", Ty::Str, false),
    (2, "apiGroup", Ty::Str, false),
    (3, "name", Ty::Str, false),
    (4, "namespace", Ty::Str, false),
];
const ROLE_REF: &[Field] = &[
    (1, "apiGroup", Ty::Str, false),
    (2, "kind", Ty::Str, false),
    (3, "name", Ty::Str, false),
];
const ROLE_BINDING: &[Field] = &[
    (1, "metadata", Ty::Meta, false),
    (2, "subjects", Ty::Msg(SUBJECT), true),
    (3, "roleRef", Ty::Msg(ROLE_REF), false),
];

fn int_or_string(b: &[u8]) -> Result<Value, String> {
    let (mut is_str, mut int, mut text) = (false, 0i64, String::new());
    for (n, w) in fields(b)? {
        match (n, w) {
            (1, Wire::Varint(t)) => is_str = t == 1,
            (2, Wire::Varint(v)) => int = v as i64 as i32 as i64,
            (3, Wire::Bytes(x)) => text = string(x)?,
            _ => {}
        }
    }
    Ok(if is_str { json!(text) } else { json!(int) })
}

/// Decodes a message by its field table.
fn message(schema: &[Field], b: &[u8]) -> Result<Value, String> {
    let mut m = Map::new();
    for (n, w) in fields(b)? {
        let Some((_, name, ty, repeated)) = schema.iter().find(|f| f.0 == n) else {
            continue;
        };
        // Go's generated code writes every non-pointer field; zero values mean "not set" in JSON terms.
        let v = match (ty, w) {
            (Ty::Str, Wire::Bytes([])) if !repeated => continue,
            (Ty::Str, Wire::Bytes(x)) => json!(string(x)?),
            (Ty::Int | Ty::Bool, Wire::Varint(0)) => continue,
            (Ty::Int | Ty::OptInt, Wire::Varint(v)) => json!(v as i64),
            (Ty::Bool | Ty::OptBool, Wire::Varint(v)) => json!(v != 0),
            (Ty::StrMap, Wire::Bytes(x)) => {
                insert_entry(&mut m, name, x, false)?;
                continue;
            }
            (Ty::IntOrStr, Wire::Bytes(x)) => match int_or_string(x)? {
                v if v == json!(0) => continue,
                v => v,
            },
            (Ty::Meta, Wire::Bytes(x)) => object_meta(x)?,
            (Ty::Msg(inner), Wire::Bytes(x)) => message(inner, x)?,
            _ => return Err(format!("field {name} has the wrong wire type")),
        };
        if *repeated {
            let list = m.entry(*name).or_insert_with(|| json!([]));
            list.as_array_mut().ok_or("repeated field is not a list")?.push(v);
        } else {
            m.insert(name.to_string(), v);
        }
    }
    Ok(Value::Object(m))
}

fn decode_kind(kind: &str, raw: &[u8]) -> Result<Value, String> {
    match kind {
        "Deployment" => return message(DEPLOYMENT, raw),
        "Service" => return message(SERVICE, raw),
        "ServiceAccount" => return message(SERVICE_ACCOUNT, raw),
        "Job" => return message(JOB, raw),
        "CronJob" => return message(CRON_JOB, raw),
        "PodDisruptionBudget" => return message(PDB, raw),
        // (A Role has no field 3; ClusterRole's aggregationRule is its only addition.)
        "Role" | "ClusterRole" => return message(ROLE, raw),
        "RoleBinding" | "ClusterRoleBinding" => return message(ROLE_BINDING, raw),
        _ => {}
    }
    let mut m = Map::new();
    for (n, w) in fields(raw)? {
        match (kind, n, w) {
            (_, 1, Wire::Bytes(x)) if kind != "DeleteOptions" => _ = m.insert("metadata".into(), object_meta(x)?),
            ("ConfigMap", 2, Wire::Bytes(x)) => insert_entry(&mut m, "data", x, false)?,
            ("ConfigMap", 3, Wire::Bytes(x)) => insert_entry(&mut m, "binaryData", x, true)?,
            ("ConfigMap", 4, Wire::Varint(v)) | ("Secret", 5, Wire::Varint(v)) => {
                _ = m.insert("immutable".into(), json!(v != 0))
            }
            ("Secret", 2, Wire::Bytes(x)) => insert_entry(&mut m, "data", x, true)?,
            ("Secret", 3, Wire::Bytes(x)) => _ = m.insert("type".into(), json!(string(x)?)),
            ("Secret", 4, Wire::Bytes(x)) => insert_entry(&mut m, "stringData", x, false)?,
            ("Namespace", 2, Wire::Bytes(x)) => {
                let mut fin = Vec::new();
                for (n, w) in fields(x)? {
                    if let (1, Wire::Bytes(f)) = (n, w) {
                        fin.push(json!(string(f)?));
                    }
                }
                m.insert("spec".into(), json!({"finalizers": fin}));
            }
            ("DeleteOptions", 1, Wire::Varint(v)) => _ = m.insert("gracePeriodSeconds".into(), json!(v as i64)),
            ("DeleteOptions", 2, Wire::Bytes(x)) => {
                let mut p = Map::new();
                for (n, w) in fields(x)? {
                    match (n, w) {
                        (1, Wire::Bytes(s)) => _ = p.insert("uid".into(), json!(string(s)?)),
                        (2, Wire::Bytes(s)) => _ = p.insert("resourceVersion".into(), json!(string(s)?)),
                        _ => {}
                    }
                }
                m.insert("preconditions".into(), Value::Object(p));
            }
            ("DeleteOptions", 3, Wire::Varint(v)) => _ = m.insert("orphanDependents".into(), json!(v != 0)),
            ("DeleteOptions", 4, Wire::Bytes(x)) => _ = m.insert("propagationPolicy".into(), json!(string(x)?)),
            ("DeleteOptions", 5, Wire::Bytes(x)) => {
                let d = m.entry("dryRun").or_insert_with(|| json!([]));
                d.as_array_mut().expect("list").push(json!(string(x)?));
            }
            _ => {}
        }
    }
    Ok(Value::Object(m))
}

/// Decodes a `k8s\0` + runtime.Unknown envelope into JSON with apiVersion and kind set.
pub fn decode(body: &[u8]) -> Result<Value, String> {
    let env = body.strip_prefix(MAGIC).ok_or("missing protobuf magic prefix")?;
    let (mut api_version, mut kind, mut raw) = (String::new(), String::new(), &[][..]);
    for (n, w) in fields(env)? {
        match (n, w) {
            (1, Wire::Bytes(tm)) => {
                for (n, w) in fields(tm)? {
                    match (n, w) {
                        (1, Wire::Bytes(x)) => api_version = string(x)?,
                        (2, Wire::Bytes(x)) => kind = string(x)?,
                        _ => {}
                    }
                }
            }
            (2, Wire::Bytes(x)) => raw = x,
            _ => {}
        }
    }
    if !matches!(
        kind.as_str(),
        "ConfigMap"
            | "Secret"
            | "Namespace"
            | "DeleteOptions"
            | "Deployment"
            | "Service"
            | "ServiceAccount"
            | "Job"
            | "CronJob"
            | "PodDisruptionBudget"
            | "Role"
            | "ClusterRole"
            | "RoleBinding"
            | "ClusterRoleBinding"
    ) {
        return Err(format!(
            "protobuf decoding of {kind:?} is not supported; use JSON (e.g. kubectl apply -f)"
        ));
    }
    let mut v = decode_kind(&kind, raw)?;
    v["apiVersion"] = json!(api_version);
    v["kind"] = json!(kind);
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(n: u64, b: &[u8]) -> Vec<u8> {
        let mut out = vec![((n << 3) | 2) as u8, b.len() as u8];
        out.extend_from_slice(b);
        out
    }

    #[test]
    fn decodes_configmap() {
        let meta = [
            field(1, b"cm1"),
            field(11, &[field(1, b"app"), field(2, b"x")].concat()),
        ]
        .concat();
        let cm = [
            field(1, &meta),
            field(2, &[field(1, b"k"), field(2, b"v")].concat()),
            vec![4 << 3, 1],
        ]
        .concat();
        let tm = [field(1, b"v1"), field(2, b"ConfigMap")].concat();
        let body = [MAGIC.to_vec(), field(1, &tm), field(2, &cm)].concat();
        let v = decode(&body).unwrap();
        assert_eq!(
            v,
            json!({"metadata": {"name": "cm1", "labels": {"app": "x"}}, "data": {"k": "v"},
                             "immutable": true, "apiVersion": "v1", "kind": "ConfigMap"})
        );
        let tm = [field(1, b"apps/v1"), field(2, b"StatefulSet")].concat();
        assert!(decode(&[MAGIC.to_vec(), field(1, &tm)].concat()).is_err());
    }

    #[test]
    fn decodes_deployment_and_service() {
        let labels = field(11, &[field(1, b"app"), field(2, b"web")].concat());
        let meta = [field(1, b"web"), labels.clone()].concat();
        let port = [vec![3 << 3, 80]].concat();
        let container = [
            field(1, b"c"),
            field(2, b"busybox"),
            field(3, b"sleep"),
            field(6, &port),
        ]
        .concat();
        let template = [field(1, &labels), field(2, &field(2, &container))].concat();
        let selector = field(1, &[field(1, b"app"), field(2, b"web")].concat());
        let spec = [vec![1 << 3, 3], field(2, &selector), field(3, &template), field(4, b"")].concat();
        let tm = [field(1, b"apps/v1"), field(2, b"Deployment")].concat();
        let body = [
            MAGIC.to_vec(),
            field(1, &tm),
            field(2, &[field(1, &meta), field(2, &spec)].concat()),
        ]
        .concat();
        assert_eq!(
            decode(&body).unwrap(),
            json!({"apiVersion": "apps/v1", "kind": "Deployment",
                   "metadata": {"name": "web", "labels": {"app": "web"}},
                   "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "web"}}, "strategy": {},
                            "template": {"metadata": {"labels": {"app": "web"}},
                                         "spec": {"containers": [{"name": "c", "image": "busybox",
                                                                  "command": ["sleep"],
                                                                  "ports": [{"containerPort": 80}]}]}}}})
        );
        let target = [vec![1 << 3, 0], vec![2 << 3, 0x90, 0x3f]].concat();
        let svc_port = [
            field(1, b"80-8080"),
            field(2, b"TCP"),
            vec![3 << 3, 80],
            field(4, &target),
        ]
        .concat();
        let svc_spec = [
            field(1, &svc_port),
            field(2, &[field(1, b"app"), field(2, b"web")].concat()),
            field(4, b"ClusterIP"),
        ]
        .concat();
        let tm = [field(1, b"v1"), field(2, b"Service")].concat();
        let body = [
            MAGIC.to_vec(),
            field(1, &tm),
            field(2, &[field(1, &field(1, b"web")), field(2, &svc_spec)].concat()),
        ]
        .concat();
        assert_eq!(
            decode(&body).unwrap()["spec"],
            json!({"ports": [{"name": "80-8080", "protocol": "TCP", "port": 80, "targetPort": 8080}],
                   "selector": {"app": "web"}, "type": "ClusterIP"})
        );
    }
}
