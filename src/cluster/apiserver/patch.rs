//! PATCH bodies: RFC 6902 JSON patch, RFC 7386 merge patch, strategic merge patch and a create-or-merge
//! server-side apply.

use serde_json::{Map, Value};

use super::errors::{ApiError, ApiResult};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchKind {
    Json,
    Merge,
    Strategic,
    Apply,
}

impl PatchKind {
    pub fn from_content_type(ct: &str) -> Option<Self> {
        match ct.split(';').next().unwrap_or("").trim() {
            "application/json-patch+json" => Some(PatchKind::Json),
            "application/merge-patch+json" => Some(PatchKind::Merge),
            "application/strategic-merge-patch+json" => Some(PatchKind::Strategic),
            "application/apply-patch+yaml" | "application/apply-patch+cbor" => Some(PatchKind::Apply),
            _ => None,
        }
    }
}

/// Parses a patch body: JSON, or YAML for apply patches.
pub fn parse_body(kind: PatchKind, body: &[u8]) -> ApiResult<Value> {
    match serde_json::from_slice(body) {
        Ok(v) => Ok(v),
        Err(e) if kind == PatchKind::Apply => {
            let s = std::str::from_utf8(body).map_err(|_| ApiError::bad_request(e.to_string()))?;
            serde_saphyr::from_str(s).map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))
        }
        Err(e) => Err(ApiError::bad_request(format!("error decoding patch: {e}"))),
    }
}

/// Applies `patch` to `live`, returning the new object.
pub fn apply(kind: PatchKind, live: &Value, patch: &Value) -> ApiResult<Value> {
    let mut out = live.clone();
    match kind {
        PatchKind::Json => {
            let ops: json_patch::Patch = serde_json::from_value(patch.clone())
                .map_err(|e| ApiError::bad_request(format!("invalid JSON patch: {e}")))?;
            json_patch::patch(&mut out, &ops)
                .map_err(|e| ApiError::new(http::StatusCode::UNPROCESSABLE_ENTITY, "Invalid", e.to_string()))?;
        }
        PatchKind::Merge => json_patch::merge(&mut out, patch),
        PatchKind::Strategic | PatchKind::Apply => {
            if !patch.is_object() {
                return Err(ApiError::bad_request("strategic merge patch must be a JSON object"));
            }
            out = strategic_merge(live, patch, &[]);
        }
    }
    Ok(out)
}

/// Merge key for a list field, from the Kubernetes `patchMergeKey` tags of the built-in types. `path` is the
/// chain of field names leading to the list (list indices omitted).
fn merge_key(path: &[&str], field: &str) -> Option<&'static str> {
    let parent = path.last().copied().unwrap_or("");
    Some(match field {
        "containers" | "initContainers" | "ephemeralContainers" | "env" | "volumes" | "imagePullSecrets" => "name",
        "volumeMounts" => "mountPath",
        "volumeDevices" => "devicePath",
        "hostAliases" => "ip",
        "ownerReferences" => "uid",
        "conditions" | "addresses" => "type",
        "topologySpreadConstraints" => "topologyKey",
        "resourceClaims" | "schedulingGates" => "name",
        "ports" if path.iter().any(|p| p.ends_with("ontainers")) => "containerPort",
        "ports" if parent == "spec" => "port",
        _ => return None,
    })
}

/// Lists of scalars merged as sets (`patchStrategy: merge` on primitive lists).
fn merges_primitives(field: &str) -> bool {
    field == "finalizers"
}

fn strip_directives(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| !k.starts_with('$'))
                .map(|(k, v)| (k.clone(), strip_directives(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(strip_directives).collect()),
        other => other.clone(),
    }
}

/// Strategic merge of `patch` into `orig` (both objects).
pub fn strategic_merge(orig: &Value, patch: &Value, path: &[&str]) -> Value {
    let Some(pm) = patch.as_object() else {
        return patch.clone();
    };
    if pm.get("$patch").and_then(Value::as_str) == Some("replace") {
        return strip_directives(patch);
    }
    let mut out: Map<String, Value> = orig.as_object().cloned().unwrap_or_default();
    let mut orders: Vec<(&str, &Vec<Value>)> = Vec::new();
    for (k, pv) in pm {
        if let Some(field) = k.strip_prefix("$setElementOrder/") {
            if let Some(order) = pv.as_array() {
                orders.push((field, order));
            }
            continue;
        }
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(list)), Some(del)) = (out.get_mut(field), pv.as_array()) {
                list.retain(|x| !del.contains(x));
            }
            continue;
        }
        if k.starts_with('$') {
            continue;
        }
        match pv {
            Value::Null => {
                out.remove(k);
            }
            Value::Object(po) => {
                if po.get("$patch").and_then(Value::as_str) == Some("delete") {
                    out.remove(k);
                    continue;
                }
                let mut sub: Vec<&str> = path.to_vec();
                sub.push(k);
                let merged = strategic_merge(out.get(k).unwrap_or(&Value::Null), pv, &sub);
                out.insert(k.clone(), merged);
            }
            Value::Array(pa) => {
                let cur = out.get(k).and_then(Value::as_array).cloned().unwrap_or_default();
                let mut sub: Vec<&str> = path.to_vec();
                sub.push(k);
                let merged = if let Some(mk) = merge_key(path, k) {
                    merge_list(&cur, pa, mk, &sub)
                } else if merges_primitives(k) {
                    let mut l = cur;
                    for x in pa {
                        if !l.contains(x) {
                            l.push(x.clone());
                        }
                    }
                    l
                } else {
                    pa.iter().map(strip_directives).collect()
                };
                out.insert(k.clone(), Value::Array(merged));
            }
            other => {
                out.insert(k.clone(), other.clone());
            }
        }
    }
    if let Some(Value::Array(keep)) = pm.get("$retainKeys") {
        out.retain(|k, _| keep.iter().any(|x| x.as_str() == Some(k)));
    }
    for (field, order) in orders {
        if let (Some(Value::Array(list)), Some(mk)) = (out.get_mut(field), merge_key(path, field)) {
            let pos = |x: &Value| order.iter().position(|o| o.get(mk) == x.get(mk)).unwrap_or(usize::MAX);
            list.sort_by_key(pos);
        }
    }
    Value::Object(out)
}

fn merge_list(cur: &[Value], patch: &[Value], mk: &str, path: &[&str]) -> Vec<Value> {
    if patch
        .iter()
        .any(|p| p.get("$patch").and_then(Value::as_str) == Some("replace"))
    {
        return patch
            .iter()
            .filter(|p| p.get("$patch").is_none())
            .map(strip_directives)
            .collect();
    }
    let mut out = cur.to_vec();
    for p in patch {
        let Some(key) = p.get(mk) else {
            out.push(strip_directives(p));
            continue;
        };
        let idx = out.iter().position(|x| x.get(mk) == Some(key));
        let delete = p.get("$patch").and_then(Value::as_str) == Some("delete");
        match (idx, delete) {
            (Some(i), true) => {
                out.remove(i);
            }
            (None, true) => {}
            (Some(i), false) => out[i] = strategic_merge(&out[i], p, path),
            (None, false) => out.push(strip_directives(p)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn smp_merges_containers_env_ports_by_key() {
        let live = json!({"spec": {"containers": [
            {"name": "a", "image": "x:1", "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}],
             "ports": [{"containerPort": 80, "protocol": "TCP"}], "args": ["1", "2"]},
            {"name": "b", "image": "y:1"}]}});
        let patch = json!({"spec": {"$setElementOrder/containers": [{"name": "b"}, {"name": "a"}], "containers": [
            {"name": "a", "image": "x:2", "env": [{"name": "B", "$patch": "delete"}, {"name": "C", "value": "3"}],
             "ports": [{"containerPort": 80, "name": "http"}], "args": ["3"]}]}});
        let out = apply(PatchKind::Strategic, &live, &patch).unwrap();
        let c = &out["spec"]["containers"];
        assert_eq!(c[0]["name"], "b");
        assert_eq!(c[1]["image"], "x:2");
        assert_eq!(
            c[1]["env"],
            json!([{"name": "A", "value": "1"}, {"name": "C", "value": "3"}])
        );
        assert_eq!(
            c[1]["ports"],
            json!([{"containerPort": 80, "protocol": "TCP", "name": "http"}])
        );
        assert_eq!(c[1]["args"], json!(["3"]));
    }

    #[test]
    fn smp_deletes_and_replaces() {
        let live = json!({"metadata": {"labels": {"a": "1", "b": "2"}, "finalizers": ["x"]},
                          "spec": {"volumes": [{"name": "v", "emptyDir": {}}], "tolerations": [{"key": "k"}]}});
        let patch = json!({"metadata": {"labels": {"a": null}, "finalizers": ["y"]},
                           "spec": {"volumes": [{"$patch": "replace"}, {"name": "w", "emptyDir": {}}],
                                    "tolerations": [{"key": "j"}]}});
        let out = apply(PatchKind::Strategic, &live, &patch).unwrap();
        assert_eq!(out["metadata"]["labels"], json!({"b": "2"}));
        assert_eq!(out["metadata"]["finalizers"], json!(["x", "y"]));
        assert_eq!(out["spec"]["volumes"], json!([{"name": "w", "emptyDir": {}}]));
        assert_eq!(out["spec"]["tolerations"], json!([{"key": "j"}]));
        let gone = apply(PatchKind::Strategic, &out, &json!({"spec": {"$patch": "delete"}})).unwrap();
        assert!(gone.get("spec").is_none());
    }

    #[test]
    fn merge_and_json_patch() {
        let live = json!({"metadata": {"labels": {"a": "1"}}, "spec": {"replicas": 1}});
        let m = apply(
            PatchKind::Merge,
            &live,
            &json!({"metadata": {"labels": {"a": null, "b": "2"}}}),
        )
        .unwrap();
        assert_eq!(m["metadata"]["labels"], json!({"b": "2"}));
        let ops = json!([{"op": "replace", "path": "/spec/replicas", "value": 3}, {"op": "test", "path": "/spec/replicas", "value": 3}]);
        assert_eq!(apply(PatchKind::Json, &live, &ops).unwrap()["spec"]["replicas"], 3);
        let bad = json!([{"op": "test", "path": "/spec/replicas", "value": 9}]);
        assert_eq!(apply(PatchKind::Json, &live, &bad).unwrap_err().code, 422);
        assert_eq!(
            parse_body(PatchKind::Apply, b"a: 1\nb: [x]\n").unwrap(),
            json!({"a": 1, "b": ["x"]})
        );
    }
}
