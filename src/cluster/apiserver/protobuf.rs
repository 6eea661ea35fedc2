//! Minimal decoder for the Kubernetes protobuf request bodies kubectl sends from its typed clients
//! (`kubectl create configmap|secret|namespace`, DeleteOptions). Field numbers follow k8s.io/api's
//! generated.proto. Responses are always JSON.

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
            (1, Wire::Bytes(x)) => _ = m.insert("name".into(), json!(string(x)?)),
            (2, Wire::Bytes(x)) => _ = m.insert("generateName".into(), json!(string(x)?)),
            (3, Wire::Bytes(x)) => _ = m.insert("namespace".into(), json!(string(x)?)),
            (5, Wire::Bytes(x)) => _ = m.insert("uid".into(), json!(string(x)?)),
            (6, Wire::Bytes(x)) => _ = m.insert("resourceVersion".into(), json!(string(x)?)),
            (11, Wire::Bytes(x)) => insert_entry(&mut m, "labels", x, false)?,
            (12, Wire::Bytes(x)) => insert_entry(&mut m, "annotations", x, false)?,
            (14, Wire::Bytes(x)) => {
                let f = m.entry("finalizers").or_insert_with(|| json!([]));
                f.as_array_mut().expect("list").push(json!(string(x)?));
            }
            _ => {}
        }
    }
    Ok(Value::Object(m))
}

fn decode_kind(kind: &str, raw: &[u8]) -> Result<Value, String> {
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
    if !matches!(kind.as_str(), "ConfigMap" | "Secret" | "Namespace" | "DeleteOptions") {
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
        let tm = [field(1, b"apps/v1"), field(2, b"Deployment")].concat();
        assert!(decode(&[MAGIC.to_vec(), field(1, &tm)].concat()).is_err());
    }
}
