//! Resource verbs: get, list, watch, create, update, patch, delete, deletecollection and subresources.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{HeaderValue, Method, StatusCode, header};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use serde_json::{Value, json};
use tokio_stream::wrappers::ReceiverStream;

use super::errors::{ApiError, ApiResult};
use super::hooks::DeleteDecision;
use super::node_proxy;
use super::patch::{self, PatchKind};
use super::registry::{RESOURCES, ResourceInfo, lookup};
use super::select::{FieldSelector, LabelSelector};
use super::table::{IncludeObject, now, rfc3339, table};
use super::validate::{self, FieldValidation};
use super::{Body, State, error_response, gc, json_response, protobuf, query_map};
use crate::cluster::store::{EventType, Key, Object, Scope, StoreError, WatchOptions};

const TABLE_CT: &str = "application/json;as=Table;v=v1;g=meta.k8s.io";
const MAX_BODY: usize = 3 * 1024 * 1024;
const PROXIED: &[&str] = &["log", "exec", "attach", "portforward"];

struct Target {
    info: &'static ResourceInfo,
    ns: Option<String>,
    name: Option<String>,
    sub: Option<String>,
}

/// What a node agent writes: its Node (and status), its Lease, pod status and
/// final pod deletion, events. Everything else is for the administrator.
pub(super) fn node_may_write(method: &http::Method, path: &str) -> bool {
    let Some(target) = parse_target(path) else {
        return false;
    };
    match (target.info.group, target.info.resource, target.sub.as_deref()) {
        ("", "nodes", None | Some("status")) => true,
        ("coordination.k8s.io", "leases", None) => target.ns.as_deref() == Some("kube-node-lease"),
        ("", "events", None) | ("events.k8s.io", "events", None) => true,
        ("", "pods", Some("status")) => true,
        ("", "pods", None) => *method == http::Method::DELETE && target.name.is_some(),
        _ => false,
    }
}

fn parse_target(path: &str) -> Option<Target> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return None,
    };
    let s = |i: usize| rest.get(i).map(|x| x.to_string());
    if rest.len() >= 3
        && rest[0] == "namespaces"
        && rest.len() <= 5
        && let Some(info) = lookup(group, version, rest[2]).filter(|i| i.namespaced)
    {
        return Some(Target {
            info,
            ns: s(1),
            name: s(3),
            sub: s(4),
        });
    }
    let info = lookup(group, version, rest.first()?)?;
    if rest.len() > 3 || rest.iter().any(|x| x.is_empty()) {
        return None;
    }
    Some(Target {
        info,
        ns: None,
        name: s(1),
        sub: s(2),
    })
}

struct Ctx {
    state: Arc<State>,
    info: &'static ResourceInfo,
    ns: String,
    name: String,
    sub: Option<String>,
    q: HashMap<String, String>,
    accept: String,
    ct: String,
    body: Bytes,
}

impl Ctx {
    fn key(&self) -> Key {
        Key::new(self.info.group, self.info.resource, &self.ns, &self.name)
    }
    fn scope(&self) -> Scope {
        let ns = (self.info.namespaced && !self.ns.is_empty()).then_some(self.ns.as_str());
        Scope::new(self.info.group, self.info.resource, ns)
    }
    fn table(&self) -> bool {
        self.accept.contains("as=Table")
    }
    fn dry_run(&self) -> bool {
        self.q.get("dryRun").is_some_and(|v| v == "All")
    }
    fn field_validation(&self) -> ApiResult<FieldValidation> {
        FieldValidation::parse(self.q.get("fieldValidation").map(String::as_str))
    }
    fn err(&self, e: StoreError) -> ApiError {
        ApiError::from_store(e, &self.info.qualified(), &self.name)
    }
}

pub(super) async fn resource_request(
    state: Arc<State>,
    req: hyper::Request<Incoming>,
    accept: &str,
) -> hyper::Response<Body> {
    let Some(t) = parse_target(req.uri().path()) else {
        return error_response(&ApiError::path_not_found());
    };
    if t.info.namespaced && t.ns.is_none() && (t.name.is_some() || req.method() != Method::GET) {
        return error_response(&ApiError::path_not_found());
    }
    if let (Some(sub), Some(name)) = (t.sub.as_deref(), t.name.as_deref())
        && t.info.resource == "pods"
        && PROXIED.contains(&sub)
    {
        return proxy(state, t.ns.as_deref().unwrap_or(""), name, sub, req).await;
    }
    let method = req.method().clone();
    let q = query_map(req.uri().query());
    let ct = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = match http_body_util::Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return error_response(&ApiError::bad_request(format!("reading body: {e}"))),
    };
    let ctx = Ctx {
        state,
        info: t.info,
        ns: t.ns.unwrap_or_default(),
        name: t.name.unwrap_or_default(),
        sub: t.sub,
        q,
        accept: accept.to_string(),
        ct,
        body,
    };
    if let Some(sub) = ctx.sub.as_deref()
        && ctx.info.sub(sub).is_none()
    {
        return error_response(&ApiError::path_not_found());
    }
    let item = !ctx.name.is_empty();
    let res = match (&method, item, ctx.sub.as_deref()) {
        (&Method::GET, false, _) if ctx.q.get("watch").is_some_and(|w| w == "true" || w == "1") => watch(ctx).await,
        (&Method::GET, false, _) => list(&ctx).await,
        (&Method::POST, false, _) => create(&ctx).await,
        (&Method::DELETE, false, _) => delete_collection(&ctx).await,
        (&Method::GET, true, Some("scale")) => get_scale(&ctx).await,
        (&Method::PUT | &Method::PATCH, true, Some("scale")) => update_scale(&ctx, method == Method::PATCH).await,
        (&Method::GET, true, None | Some("status")) => get(&ctx).await,
        (&Method::PUT, true, None | Some("status") | Some("finalize")) => update(&ctx).await,
        (&Method::PATCH, true, None | Some("status")) => patch(&ctx).await,
        (&Method::DELETE, true, None) => delete(&ctx).await,
        (&Method::POST, true, Some("binding")) => bind(&ctx).await,
        (&Method::POST, true, Some("eviction")) => evict(&ctx).await,
        (m, _, _) => Err(ApiError::method_not_allowed(format!(
            "{m} is not supported on this path"
        ))),
    };
    res.unwrap_or_else(|e| error_response(&e))
}

/// Reads an object body: JSON, YAML or (for a few kinds) Kubernetes protobuf.
fn decode_body(ct: &str, body: &[u8]) -> ApiResult<Value> {
    let media = ct.split(';').next().unwrap_or("").trim();
    match media {
        "application/vnd.kubernetes.protobuf" => protobuf::decode(body).map_err(|e| {
            let mut err = ApiError::unsupported_media(ct);
            err.message = format!("{}: {e}", err.message);
            err
        }),
        "application/yaml" => {
            let s = std::str::from_utf8(body).map_err(|e| ApiError::bad_request(e.to_string()))?;
            serde_saphyr::from_str(s).map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))
        }
        "" | "application/json" | "*/*" => {
            serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("error decoding JSON: {e}")))
        }
        _ => Err(ApiError::unsupported_media(ct)),
    }
}

fn with_warnings(mut r: hyper::Response<Body>, warnings: &[String]) -> hyper::Response<Body> {
    for w in warnings {
        if let Ok(v) = HeaderValue::from_str(&format!("299 - {:?}", w)) {
            r.headers_mut().append(header::WARNING, v);
        }
    }
    r
}

fn respond(ctx: &Ctx, code: StatusCode, obj: &Value) -> hyper::Response<Body> {
    if ctx.table() {
        let rv = obj
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            .unwrap_or("");
        let include = IncludeObject::parse(ctx.q.get("includeObject").map(String::as_str));
        return json_response(code, &table(ctx.info, &[obj], rv, include, true), TABLE_CT);
    }
    json_response(code, obj, "application/json")
}

fn selectors(q: &HashMap<String, String>) -> ApiResult<(LabelSelector, FieldSelector)> {
    let l = LabelSelector::parse(q.get("labelSelector").map_or("", String::as_str)).map_err(ApiError::bad_request)?;
    let f = FieldSelector::parse(q.get("fieldSelector").map_or("", String::as_str)).map_err(ApiError::bad_request)?;
    Ok((l, f))
}

async fn get(ctx: &Ctx) -> ApiResult<hyper::Response<Body>> {
    let obj = ctx.state.store.get(&ctx.key()).await.map_err(|e| ctx.err(e))?;
    Ok(respond(ctx, StatusCode::OK, &obj.value))
}

async fn list(ctx: &Ctx) -> ApiResult<hyper::Response<Body>> {
    let (l, f) = selectors(&ctx.q)?;
    let (items, rv) = ctx.state.store.list(&ctx.scope()).await.map_err(|e| ctx.err(e))?;
    let items: Vec<&Value> = items
        .iter()
        .map(|o| &o.value)
        .filter(|v| l.matches(v) && f.matches(v))
        .collect();
    let rv = rv.to_string();
    if ctx.table() {
        let include = IncludeObject::parse(ctx.q.get("includeObject").map(String::as_str));
        return Ok(json_response(
            StatusCode::OK,
            &table(ctx.info, &items, &rv, include, true),
            TABLE_CT,
        ));
    }
    let list = json!({"kind": format!("{}List", ctx.info.kind), "apiVersion": ctx.info.api_version(),
                      "metadata": {"resourceVersion": rv}, "items": items});
    Ok(json_response(StatusCode::OK, &list, "application/json"))
}

fn watch_line(kind: &str, object: Value) -> Bytes {
    let mut b = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap_or_default();
    b.push(b'\n');
    Bytes::from(b)
}

async fn watch(ctx: Ctx) -> ApiResult<hyper::Response<Body>> {
    let (l, f) = selectors(&ctx.q)?;
    let timeout = ctx
        .q
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .unwrap_or(1800)
        .min(3600);
    let bookmarks = ctx.q.get("allowWatchBookmarks").is_some_and(|b| b == "true");
    let scope = ctx.scope();
    let store = ctx.state.store.clone();
    let (initial, from) = match ctx.q.get("resourceVersion").map(String::as_str) {
        None | Some("") | Some("0") => {
            let (items, rv) = store.list(&scope).await.map_err(|e| ctx.err(e))?;
            (
                items
                    .into_iter()
                    .map(|o| o.value)
                    .filter(|v| l.matches(v) && f.matches(v))
                    .collect(),
                rv,
            )
        }
        Some(rv) => (
            Vec::new(),
            rv.parse()
                .map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {rv:?}")))?,
        ),
    };
    let opts = WatchOptions {
        bookmark_interval: bookmarks.then_some(Duration::from_secs(30)),
    };
    let stream = store.watch(&scope, from, opts);
    let info = ctx.info;
    let as_table = ctx.table();
    let include = IncludeObject::parse(ctx.q.get("includeObject").map(String::as_str));
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(64);
    tokio::spawn(async move {
        let mut first = true;
        let mut render = |v: &Value| {
            if !as_table {
                return v.clone();
            }
            let rv = v
                .pointer("/metadata/resourceVersion")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            let t = table(info, &[v], &rv, include, first);
            first = false;
            t
        };
        for v in &initial {
            if tx.send(Ok(Frame::data(watch_line("ADDED", render(v))))).await.is_err() {
                return;
            }
        }
        let mut stream = match stream {
            Ok(s) => s,
            Err(e) => {
                let err = ApiError::from_store(e, info.resource, "");
                let _ = tx.send(Ok(Frame::data(watch_line("ERROR", err.status())))).await;
                return;
            }
        };
        let deadline = tokio::time::sleep(Duration::from_secs(timeout));
        tokio::pin!(deadline);
        loop {
            let ev = tokio::select! {
                ev = stream.next() => ev,
                _ = &mut deadline => return,
                _ = tx.closed() => return,
            };
            let line = match ev {
                None => return,
                Some(Err(e)) => {
                    let err = ApiError::from_store(e, info.resource, "");
                    let _ = tx.send(Ok(Frame::data(watch_line("ERROR", err.status())))).await;
                    return;
                }
                Some(Ok(ev)) if ev.kind == EventType::Bookmark => {
                    let mut o = ev.object.clone();
                    o["kind"] = json!(info.kind);
                    o["apiVersion"] = json!(info.api_version());
                    watch_line("BOOKMARK", o)
                }
                Some(Ok(ev)) => {
                    let now_m = l.matches(&ev.object) && f.matches(&ev.object);
                    let was_m = ev.prev.as_ref().is_some_and(|p| l.matches(p) && f.matches(p));
                    let kind = match (ev.kind, was_m, now_m) {
                        (EventType::Deleted, _, true) => "DELETED",
                        (EventType::Added, _, true) | (EventType::Modified, false, true) => "ADDED",
                        (EventType::Modified, true, true) => "MODIFIED",
                        (EventType::Modified, true, false) => "DELETED",
                        _ => continue,
                    };
                    watch_line(kind, render(&ev.object))
                }
            };
            if tx.send(Ok(Frame::data(line))).await.is_err() {
                return;
            }
        }
    });
    let body = BodyExt::boxed(StreamBody::new(ReceiverStream::new(rx)));
    let mut r = hyper::Response::new(body);
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(r)
}

fn random_suffix() -> String {
    const ALPHA: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    (0..5)
        .map(|_| ALPHA[rand::random_range(0..ALPHA.len())] as char)
        .collect()
}

fn check_type(info: &ResourceInfo, obj: &mut Value) -> ApiResult<()> {
    if !obj.is_object() {
        return Err(ApiError::bad_request("the body must be an object"));
    }
    if let Some(k) = obj.get("kind").and_then(Value::as_str).filter(|k| !k.is_empty())
        && k != info.kind
    {
        return Err(ApiError::bad_request(format!(
            "the kind {k:?} does not match the resource {:?}",
            info.resource
        )));
    }
    let av = info.api_version();
    if let Some(a) = obj.get("apiVersion").and_then(Value::as_str).filter(|a| !a.is_empty())
        && a != av
    {
        return Err(ApiError::bad_request(format!(
            "the apiVersion {a:?} does not match {av:?}"
        )));
    }
    obj["kind"] = json!(info.kind);
    obj["apiVersion"] = json!(av);
    if !obj.get("metadata").is_some_and(Value::is_object) {
        obj["metadata"] = json!({});
    }
    Ok(())
}

/// Validates and stores a new object. Used by POST, server-side apply of a missing object and bootstrap.
async fn create_object(
    state: &State,
    info: &'static ResourceInfo,
    ns: &str,
    mut obj: Value,
    fv: FieldValidation,
    dry_run: bool,
) -> ApiResult<(Value, Vec<String>)> {
    check_type(info, &mut obj)?;
    let meta = obj["metadata"].as_object_mut().expect("metadata object");
    if info.namespaced {
        match meta.get("namespace").and_then(Value::as_str) {
            Some(n) if !n.is_empty() && n != ns => {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
            _ => _ = meta.insert("namespace".into(), json!(ns)),
        }
    } else {
        meta.remove("namespace");
    }
    let name = meta.get("name").and_then(Value::as_str).unwrap_or("").to_string();
    let gen_name = meta
        .get("generateName")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    if name.is_empty() && !gen_name.is_empty() {
        meta.insert("name".into(), json!(format!("{gen_name}{}", random_suffix())));
    }
    for f in [
        "resourceVersion",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "managedFields",
        "selfLink",
    ] {
        meta.remove(f);
    }
    meta.insert("uid".into(), json!(uuid::Uuid::new_v4().to_string()));
    meta.insert("creationTimestamp".into(), json!(rfc3339(now())));
    if tracks_generation(info) {
        meta.insert("generation".into(), json!(1));
        // Status belongs to the controller: a new workload starts without one.
        obj.as_object_mut().map(|o| o.remove("status"));
    }
    let warnings = validate::decode(info, &mut obj, fv)?;
    validate::apply_defaults(info, &mut obj);
    validate::validate(info, &obj)?;
    let name = obj["metadata"]["name"].as_str().unwrap_or("").to_string();
    let _allocating = match (info.group, info.resource) {
        ("", "services") => {
            let guard = state.service_allocation.lock().await;
            super::services::allocate(state, &mut obj).await?;
            Some(guard)
        }
        _ => None,
    };
    if info.namespaced {
        let nskey = Key::new("", "namespaces", "", ns);
        match state.store.get(&nskey).await {
            Ok(n) if n.value.pointer("/metadata/deletionTimestamp").is_some() => {
                return Err(ApiError::forbidden(format!(
                    "{} {name:?} is forbidden: unable to create new content in namespace {ns} because it is being terminated",
                    info.qualified()
                )));
            }
            Ok(_) => {}
            Err(StoreError::NotFound) => return Err(ApiError::not_found("namespaces", ns)),
            Err(e) => return Err(ApiError::from_store(e, "namespaces", ns)),
        }
    }
    if (info.group, info.resource) == ("", "pods") {
        check_service_account(state, ns, &obj, &name).await?;
    }
    if dry_run {
        return Ok((obj, warnings));
    }
    let key = Key::new(info.group, info.resource, if info.namespaced { ns } else { "" }, &name);
    let stored = state
        .store
        .create(&key, obj)
        .await
        .map_err(|e| ApiError::from_store(e, &info.qualified(), &name))?;
    if (info.group, info.resource) == ("", "namespaces") {
        ensure_namespace_defaults(state, &name).await;
    }
    Ok((stored.value, warnings))
}

/// A pod runs as an existing ServiceAccount (the ServiceAccount admission
/// check); a missing `default` one is made, as in a namespace from before it existed.
async fn check_service_account(state: &State, ns: &str, pod: &Value, name: &str) -> ApiResult<()> {
    let account = pod
        .pointer("/spec/serviceAccountName")
        .and_then(Value::as_str)
        .unwrap_or("default");
    match state.store.get(&Key::new("", "serviceaccounts", ns, account)).await {
        Ok(_) => Ok(()),
        Err(StoreError::NotFound) if account == "default" => {
            ensure_namespace_defaults(state, ns).await;
            Ok(())
        }
        Err(StoreError::NotFound) => Err(ApiError::forbidden(format!(
            "pods {name:?} is forbidden: error looking up service account {ns}/{account}: serviceaccount {account:?} not found"
        ))),
        Err(e) => Err(ApiError::from_store(e, "serviceaccounts", account)),
    }
}

/// What Kubernetes' controllers put in every namespace: the `default`
/// ServiceAccount and the `kube-root-ca.crt` ConfigMap (the cluster's CA).
async fn ensure_namespace_defaults(state: &State, ns: &str) {
    let meta = |name: &str| {
        json!({"name": name, "namespace": ns, "uid": uuid::Uuid::new_v4().to_string(),
               "creationTimestamp": rfc3339(now())})
    };
    let objects = [
        (
            "serviceaccounts",
            "default",
            json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta("default")}),
        ),
        (
            "configmaps",
            "kube-root-ca.crt",
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta("kube-root-ca.crt"),
                   "data": {"ca.crt": state.ca_pem}}),
        ),
    ];
    for (resource, name, obj) in objects {
        match state.store.create(&Key::new("", resource, ns, name), obj).await {
            Ok(_) | Err(StoreError::AlreadyExists) => {}
            Err(e) => tracing::warn!(namespace = ns, resource, error = %e, "creating a namespace default"),
        }
    }
}

async fn create(ctx: &Ctx) -> ApiResult<hyper::Response<Body>> {
    let obj = decode_body(&ctx.ct, &ctx.body)?;
    let (v, w) = create_object(
        &ctx.state,
        ctx.info,
        &ctx.ns,
        obj,
        ctx.field_validation()?,
        ctx.dry_run(),
    )
    .await?;
    Ok(with_warnings(respond(ctx, StatusCode::CREATED, &v), &w))
}

/// Merges an incoming full object with the stored one: system metadata and (unless `status_only`) status are
/// kept from `old`; for the status subresource only `status` changes. Then decode, default and validate.
fn prepare_update(ctx: &Ctx, old: &Value, mut new: Value, fv: FieldValidation) -> ApiResult<(Value, Vec<String>)> {
    let info = ctx.info;
    check_type(info, &mut new)?;
    let status_only = ctx.sub.as_deref() == Some("status");
    if status_only {
        let mut out = old.clone();
        out["status"] = new.get("status").cloned().unwrap_or(Value::Null);
        new = out;
    } else if info.has_status() && info.resource != "namespaces" {
        match old.get("status") {
            Some(s) => new["status"] = s.clone(),
            None => _ = new.as_object_mut().map(|m| m.remove("status")),
        }
    }
    let name = new.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("");
    if !name.is_empty() && name != ctx.name {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({name}) does not match the name on the URL ({})",
            ctx.name
        )));
    }
    let meta = new["metadata"].as_object_mut().expect("metadata object");
    for f in [
        "name",
        "namespace",
        "uid",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "generation",
    ] {
        match old["metadata"].get(f) {
            Some(v) => _ = meta.insert(f.into(), v.clone()),
            None => _ = meta.remove(f),
        }
    }
    meta.remove("managedFields");
    let warnings = validate::decode(info, &mut new, fv)?;
    validate::apply_defaults(info, &mut new);
    if (info.group, info.resource) == ("", "services") && !status_only {
        super::services::keep_addresses(old, &mut new)?;
    }
    validate::validate(info, &new)?;
    validate::validate_update(info, old, &new)?;
    if !status_only {
        bump_generation(info, old, &mut new);
    }
    Ok((new, warnings))
}

/// Workloads count spec changes in `metadata.generation`; their controllers report `status.observedGeneration`.
fn tracks_generation(info: &ResourceInfo) -> bool {
    info.group == "apps"
}

fn bump_generation(info: &ResourceInfo, old: &Value, new: &mut Value) {
    if tracks_generation(info) && old.get("spec") != new.get("spec") {
        let generation = old.pointer("/metadata/generation").and_then(Value::as_i64).unwrap_or(1);
        new["metadata"]["generation"] = json!(generation + 1);
    }
}

/// The `autoscaling/v1` Scale view of a workload.
fn scale_of(obj: &Value) -> Value {
    let m = &obj["metadata"];
    let selector = obj
        .pointer("/spec/selector")
        .map(super::select::selector_string)
        .unwrap_or_default();
    json!({
        "kind": "Scale", "apiVersion": "autoscaling/v1",
        "metadata": {"name": m["name"], "namespace": m["namespace"], "uid": m["uid"],
                     "resourceVersion": m["resourceVersion"], "creationTimestamp": m["creationTimestamp"]},
        "spec": {"replicas": obj.pointer("/spec/replicas").and_then(Value::as_i64).unwrap_or(0)},
        "status": {"replicas": obj.pointer("/status/replicas").and_then(Value::as_i64).unwrap_or(0),
                   "selector": selector},
    })
}

async fn get_scale(ctx: &Ctx) -> ApiResult<hyper::Response<Body>> {
    let obj = ctx.state.store.get(&ctx.key()).await.map_err(|e| ctx.err(e))?;
    Ok(json_response(StatusCode::OK, &scale_of(&obj.value), "application/json"))
}

/// PUT or PATCH of `scale`: only `spec.replicas` of the workload changes.
async fn update_scale(ctx: &Ctx, is_patch: bool) -> ApiResult<hyper::Response<Body>> {
    let (kind, body) = if is_patch {
        let kind = PatchKind::from_content_type(&ctx.ct).ok_or_else(|| ApiError::unsupported_media(&ctx.ct))?;
        (Some(kind), patch::parse_body(kind, &ctx.body)?)
    } else {
        (None, decode_body(&ctx.ct, &ctx.body)?)
    };
    for _ in 0..8 {
        let old = ctx.state.store.get(&ctx.key()).await.map_err(|e| ctx.err(e))?;
        let current = scale_of(&old.value);
        let wanted = match kind {
            Some(kind) => patch::apply(kind, &current, &body)?,
            None => body.clone(),
        };
        if let Some(rv) = wanted.pointer("/metadata/resourceVersion").and_then(Value::as_str)
            && !rv.is_empty()
            && rv != old.rv.to_string()
        {
            return Err(ApiError::conflict(&ctx.info.qualified(), &ctx.name));
        }
        let replicas = match wanted.pointer("/spec/replicas") {
            Some(Value::Number(n)) if n.as_i64().is_some_and(|n| (0..=i32::MAX as i64).contains(&n)) => n.clone(),
            other => {
                let value = other.map(Value::to_string).unwrap_or_default();
                let c = super::errors::Cause::invalid("spec.replicas", &value, "must be greater than or equal to 0");
                return Err(ApiError::invalid("Scale", "autoscaling", &ctx.name, vec![c]));
            }
        };
        let mut new = old.value.clone();
        new["spec"]["replicas"] = Value::Number(replicas);
        bump_generation(ctx.info, &old.value, &mut new);
        if ctx.dry_run() {
            return Ok(json_response(StatusCode::OK, &scale_of(&new), "application/json"));
        }
        match ctx.state.store.update(&ctx.key(), new, Some(old.rv)).await {
            Ok(stored) => {
                return Ok(json_response(
                    StatusCode::OK,
                    &scale_of(&stored.value),
                    "application/json",
                ));
            }
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(ctx.err(e)),
        }
    }
    Err(ApiError::conflict(&ctx.info.qualified(), &ctx.name))
}

fn same_ignoring_rv(a: &Value, b: &Value) -> bool {
    let strip = |v: &Value| {
        let mut v = v.clone();
        if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
            m.remove("resourceVersion");
        }
        v
    };
    strip(a) == strip(b)
}

/// Writes an updated object with CAS on `old`'s resourceVersion; finishes deletion when the last finalizer goes.
async fn commit_update(ctx: &Ctx, old: &Object, new: Value, expected: u64) -> ApiResult<Value> {
    if same_ignoring_rv(&old.value, &new) {
        return Ok(old.value.clone());
    }
    if ctx.dry_run() {
        return Ok(new);
    }
    let deleting = new.pointer("/metadata/deletionTimestamp").is_some()
        && new
            .pointer("/metadata/finalizers")
            .and_then(Value::as_array)
            .is_none_or(|f| f.is_empty())
        && new
            .pointer("/metadata/deletionGracePeriodSeconds")
            .and_then(Value::as_i64)
            .unwrap_or(0)
            == 0;
    let stored = ctx
        .state
        .store
        .update(&ctx.key(), new, Some(expected))
        .await
        .map_err(|e| ctx.err(e))?;
    if deleting {
        let gone = ctx
            .state
            .store
            .delete(&ctx.key(), Some(stored.rv))
            .await
            .map_err(|e| ctx.err(e))?;
        return Ok(gone.value);
    }
    Ok(stored.value)
}

async fn update(ctx: &Ctx) -> ApiResult<hyper::Response<Body>> {
    let new = decode_body(&ctx.ct, &ctx.body)?;
    let old = ctx.state.store.get(&ctx.key()).await.map_err(|e| ctx.err(e))?;
    let expected = match new.pointer("/metadata/resourceVersion").and_then(Value::as_str) {
        Some(rv) if !rv.is_empty() => rv
            .parse()
            .map_err(|_| ApiError::bad_request("invalid resourceVersion"))?,
        _ => old.rv,
    };
    if expected != old.rv {
        return Err(ApiError::conflict(&ctx.info.qualified(), &ctx.name));
    }
    let (new, w) = prepare_update(ctx, &old.value, new, ctx.field_validation()?)?;
    let v = commit_update(ctx, &old, new, expected).await?;
    Ok(with_warnings(respond(ctx, StatusCode::OK, &v), &w))
}

async fn patch(ctx: &Ctx) -> ApiResult<hyper::Response<Body>> {
    let kind = PatchKind::from_content_type(&ctx.ct).ok_or_else(|| ApiError::unsupported_media(&ctx.ct))?;
    let body = patch::parse_body(kind, &ctx.body)?;
    let fv = ctx.field_validation()?;
    for _ in 0..8 {
        let old = match ctx.state.store.get(&ctx.key()).await {
            Ok(o) => o,
            Err(StoreError::NotFound) if kind == PatchKind::Apply && ctx.sub.is_none() => {
                let mut obj = body.clone();
                if obj.is_object() && !obj.get("metadata").is_some_and(Value::is_object) {
                    obj["metadata"] = json!({});
                }
                if let Some(m) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
                    m.insert("name".into(), json!(ctx.name));
                }
                let (v, w) = create_object(&ctx.state, ctx.info, &ctx.ns, obj, fv, ctx.dry_run()).await?;
                return Ok(with_warnings(respond(ctx, StatusCode::CREATED, &v), &w));
            }
            Err(e) => return Err(ctx.err(e)),
        };
        let patched = patch::apply(kind, &old.value, &body)?;
        if let Some(rv) = patched.pointer("/metadata/resourceVersion").and_then(Value::as_str)
            && rv != old.rv.to_string()
        {
            return Err(ApiError::conflict(&ctx.info.qualified(), &ctx.name));
        }
        let (new, w) = prepare_update(ctx, &old.value, patched, fv)?;
        match commit_update(ctx, &old, new, old.rv).await {
            Ok(v) => return Ok(with_warnings(respond(ctx, StatusCode::OK, &v), &w)),
            Err(e) if e.reason == "Conflict" => continue,
            Err(e) => return Err(e),
        }
    }
    Err(ApiError::conflict(&ctx.info.qualified(), &ctx.name))
}

/// What happens to an object's dependents (objects naming it in `ownerReferences`) when it is deleted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) enum Propagation {
    /// The owner goes now; the garbage collector deletes the dependents afterwards.
    #[default]
    Background,
    /// The owner stays (with the `foregroundDeletion` finalizer) until its dependents are gone.
    Foreground,
    /// The dependents lose their reference to the owner and stay.
    Orphan,
}

impl Propagation {
    fn parse(s: &str) -> ApiResult<Self> {
        match s {
            "Background" => Ok(Propagation::Background),
            "Foreground" => Ok(Propagation::Foreground),
            "Orphan" => Ok(Propagation::Orphan),
            o => Err(ApiError::bad_request(format!(
                "propagationPolicy must be Background, Foreground or Orphan, got {o:?}"
            ))),
        }
    }
}

#[derive(Default)]
pub(super) struct DeleteOpts {
    pub propagation: Propagation,
    pub grace: Option<i64>,
    pub uid: Option<String>,
    pub rv: Option<u64>,
    pub dry_run: bool,
}

fn delete_opts(ctx: &Ctx) -> ApiResult<DeleteOpts> {
    let mut o = DeleteOpts {
        dry_run: ctx.dry_run(),
        ..Default::default()
    };
    if !ctx.body.is_empty() {
        let v = decode_body(&ctx.ct, &ctx.body)?;
        o.grace = v.get("gracePeriodSeconds").and_then(Value::as_i64);
        o.uid = v.pointer("/preconditions/uid").and_then(Value::as_str).map(Into::into);
        o.rv = v
            .pointer("/preconditions/resourceVersion")
            .and_then(Value::as_str)
            .and_then(|s| s.parse().ok());
        if v.get("orphanDependents") == Some(&json!(true)) {
            o.propagation = Propagation::Orphan;
        }
        if let Some(p) = v.get("propagationPolicy").and_then(Value::as_str) {
            o.propagation = Propagation::parse(p)?;
        }
        o.dry_run |= v
            .get("dryRun")
            .and_then(Value::as_array)
            .is_some_and(|a| a.iter().any(|x| x == "All"));
    }
    if let Some(p) = ctx.q.get("propagationPolicy") {
        o.propagation = Propagation::parse(p)?;
    }
    if let Some(g) = ctx.q.get("gracePeriodSeconds") {
        o.grace = Some(
            g.parse()
                .map_err(|_| ApiError::bad_request("invalid gracePeriodSeconds"))?,
        );
    }
    Ok(o)
}

const IMMORTAL: &[&str] = &["default", "kube-system", "kube-public"];

/// Deletes one object, honouring the delete policy (graceful pods), finalizers and the propagation policy towards
/// its dependents. Returns its last state. Without a resourceVersion precondition a concurrent write does not fail
/// the delete: it is tried again on the object as it now is.
pub(super) async fn delete_object(
    state: &Arc<State>,
    info: &'static ResourceInfo,
    old: &Object,
    opts: &DeleteOpts,
) -> ApiResult<Value> {
    let mut current = old.clone();
    for _ in 0..8 {
        match delete_object_once(state, info, &current, opts).await {
            Err(e) if e.code == StatusCode::CONFLICT && opts.rv.is_none() => {
                match state.store.get(&current.key).await {
                    Ok(latest) if latest.rv != current.rv => current = latest,
                    _ => return Err(e),
                }
            }
            result => return result,
        }
    }
    Err(ApiError::conflict(&info.qualified(), &old.key.name))
}

async fn delete_object_once(
    state: &Arc<State>,
    info: &'static ResourceInfo,
    old: &Object,
    opts: &DeleteOpts,
) -> ApiResult<Value> {
    let name = old.key.name.clone();
    let err = |e| ApiError::from_store(e, &info.qualified(), &name);
    if opts
        .uid
        .as_deref()
        .is_some_and(|u| Some(u) != old.value.pointer("/metadata/uid").and_then(Value::as_str))
        || opts.rv.is_some_and(|rv| rv != old.rv)
    {
        return Err(ApiError::conflict(&info.qualified(), &name));
    }
    if info.resource == "namespaces" && info.group.is_empty() {
        if IMMORTAL.contains(&name.as_str()) {
            return Err(ApiError::forbidden(format!(
                "namespaces {name:?} is forbidden: this namespace may not be deleted"
            )));
        }
        if old.value.pointer("/metadata/deletionTimestamp").is_some() || opts.dry_run {
            return Ok(old.value.clone());
        }
        let mut v = old.value.clone();
        v["metadata"]["deletionTimestamp"] = json!(rfc3339(now()));
        v["status"]["phase"] = json!("Terminating");
        let stored = state.store.update(&old.key, v, Some(old.rv)).await.map_err(err)?;
        tokio::spawn(finalize_namespace(state.clone(), name));
        return Ok(stored.value);
    }
    if !opts.dry_run {
        match opts.propagation {
            Propagation::Orphan => gc::orphan_dependents(state, &old.value).await,
            Propagation::Foreground if gc::has_dependents(state, &old.value).await => {
                return gc::start_foreground(state, old).await.map_err(err);
            }
            _ => {}
        }
        state.gc.notify_one();
    }
    let decision = state.hooks.delete.decide(info.resource, &old.value, opts.grace);
    let has_finalizers = old
        .value
        .pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .is_some_and(|f| !f.is_empty());
    let (deadline_secs, grace) = match decision {
        DeleteDecision::Graceful { grace_seconds } => (grace_seconds, grace_seconds),
        DeleteDecision::Immediate if has_finalizers => (0, 0),
        DeleteDecision::Immediate => {
            if opts.dry_run {
                return Ok(old.value.clone());
            }
            return Ok(state.store.delete(&old.key, Some(old.rv)).await.map_err(err)?.value);
        }
    };
    let cur_grace = old
        .value
        .pointer("/metadata/deletionGracePeriodSeconds")
        .and_then(Value::as_i64);
    if old.value.pointer("/metadata/deletionTimestamp").is_some() && cur_grace.is_some_and(|c| c <= grace) {
        return Ok(old.value.clone());
    }
    let mut v = old.value.clone();
    let at = k8s_openapi::jiff::Timestamp::from_second(now().as_second() + deadline_secs).unwrap_or(now());
    v["metadata"]["deletionTimestamp"] = json!(rfc3339(at));
    v["metadata"]["deletionGracePeriodSeconds"] = json!(grace);
    if opts.dry_run {
        return Ok(v);
    }
    Ok(state.store.update(&old.key, v, Some(old.rv)).await.map_err(err)?.value)
}

/// Removes everything in a terminating namespace, then the namespace itself.
fn finalize_namespace(state: Arc<State>, ns: String) -> futures_util::future::BoxFuture<'static, ()> {
    Box::pin(finalize_namespace_inner(state, ns))
}

async fn finalize_namespace_inner(state: Arc<State>, ns: String) {
    loop {
        let mut remaining = 0;
        for info in RESOURCES.iter().filter(|r| r.namespaced) {
            let scope = Scope::new(info.group, info.resource, Some(&ns));
            let Ok((items, _)) = state.store.list(&scope).await else {
                continue;
            };
            for o in &items {
                if delete_object(&state, info, o, &DeleteOpts::default()).await.is_err()
                    || state.store.get(&o.key).await.is_ok()
                {
                    remaining += 1;
                }
            }
        }
        if remaining == 0 {
            let _ = state.store.delete(&Key::new("", "namespaces", "", &ns), None).await;
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn delete(ctx: &Ctx) -> ApiResult<hyper::Response<Body>> {
    let opts = delete_opts(ctx)?;
    let old = ctx.state.store.get(&ctx.key()).await.map_err(|e| ctx.err(e))?;
    let v = delete_object(&ctx.state, ctx.info, &old, &opts).await?;
    Ok(respond(ctx, StatusCode::OK, &v))
}

async fn delete_collection(ctx: &Ctx) -> ApiResult<hyper::Response<Body>> {
    if !ctx.info.verbs.contains(&"deletecollection") {
        return Err(ApiError::method_not_allowed(format!(
            "deletecollection is not supported on {}",
            ctx.info.resource
        )));
    }
    let opts = delete_opts(ctx)?;
    let (l, f) = selectors(&ctx.q)?;
    let (items, _) = ctx.state.store.list(&ctx.scope()).await.map_err(|e| ctx.err(e))?;
    let mut out = Vec::new();
    for o in items.iter().filter(|o| l.matches(&o.value) && f.matches(&o.value)) {
        match delete_object(&ctx.state, ctx.info, o, &opts).await {
            Ok(v) => out.push(v),
            Err(e) if e.code == StatusCode::NOT_FOUND => {}
            Err(e) => return Err(e),
        }
    }
    let rv = ctx.state.store.current_rv().to_string();
    let list = json!({"kind": format!("{}List", ctx.info.kind), "apiVersion": ctx.info.api_version(),
                      "metadata": {"resourceVersion": rv}, "items": out});
    Ok(json_response(StatusCode::OK, &list, "application/json"))
}

fn success() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201})
}

/// `pods/binding`: what a scheduler calls to assign a node.
async fn bind(ctx: &Ctx) -> ApiResult<hyper::Response<Body>> {
    let b = decode_body(&ctx.ct, &ctx.body)?;
    let node = b
        .pointer("/target/name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    if node.is_empty() {
        let c = super::errors::Cause::required("target.name", "");
        return Err(ApiError::invalid("Binding", "", &ctx.name, vec![c]));
    }
    for _ in 0..8 {
        let old = ctx.state.store.get(&ctx.key()).await.map_err(|e| ctx.err(e))?;
        if let Some(n) = old
            .value
            .pointer("/spec/nodeName")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
        {
            let mut e = ApiError::conflict("pods", &ctx.name);
            e.message = format!("pod {} is already assigned to node {n:?}", ctx.name);
            return Err(e);
        }
        if old.value.pointer("/metadata/deletionTimestamp").is_some() {
            return Err(ApiError::conflict("pods", &ctx.name));
        }
        let mut v = old.value.clone();
        v["spec"]["nodeName"] = json!(node);
        let conds = v["status"]
            .as_object_mut()
            .map(|s| s.entry("conditions").or_insert(json!([])));
        if let Some(Value::Array(c)) = conds {
            c.retain(|x| x["type"] != "PodScheduled");
            c.push(json!({"type": "PodScheduled", "status": "True", "lastProbeTime": null,
                          "lastTransitionTime": rfc3339(now())}));
        }
        match ctx.state.store.update(&ctx.key(), v, Some(old.rv)).await {
            Ok(_) => return Ok(json_response(StatusCode::CREATED, &success(), "application/json")),
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(ctx.err(e)),
        }
    }
    Err(ApiError::conflict("pods", &ctx.name))
}

/// `pods/eviction`: a delete with the given options, unless it would take a
/// healthy pod from a PodDisruptionBudget with no disruptions left (429, which
/// `kubectl drain` retries).
async fn evict(ctx: &Ctx) -> ApiResult<hyper::Response<Body>> {
    let b = decode_body(&ctx.ct, &ctx.body)?;
    let opts = DeleteOpts {
        grace: b.pointer("/deleteOptions/gracePeriodSeconds").and_then(Value::as_i64),
        ..Default::default()
    };
    let _serial = ctx.state.evictions.lock().await;
    let old = ctx.state.store.get(&ctx.key()).await.map_err(|e| ctx.err(e))?;
    if crate::cluster::disruption::healthy(&old.value) {
        let ns = Some(ctx.ns.as_str());
        let (budgets, _) = ctx
            .state
            .store
            .list(&Scope::new("policy", "poddisruptionbudgets", ns))
            .await
            .map_err(|e| ctx.err(e))?;
        let covering: Vec<Value> = budgets
            .into_iter()
            .map(|o| o.value)
            .filter(|pdb| crate::cluster::disruption::selects(pdb, &old.value))
            .collect();
        if !covering.is_empty() {
            let (pods, _) = ctx
                .state
                .store
                .list(&Scope::new("", "pods", ns))
                .await
                .map_err(|e| ctx.err(e))?;
            let pods: Vec<Value> = pods.into_iter().map(|o| o.value).collect();
            for pdb in &covering {
                let budget = crate::cluster::disruption::budget(pdb, &pods);
                if budget.allowed == 0 {
                    let pdb_name = pdb.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("");
                    let mut err = ApiError::new(
                        StatusCode::TOO_MANY_REQUESTS,
                        "TooManyRequests",
                        "Cannot evict pod as it would violate the pod's disruption budget.",
                    );
                    err.details = json!({"causes": [{"reason": "DisruptionBudget",
                        "message": format!("The disruption budget {pdb_name} needs {} healthy pods and has {} currently",
                                           budget.desired_healthy, budget.current_healthy)}]});
                    return Err(err);
                }
            }
        }
    }
    delete_object(&ctx.state, ctx.info, &old, &opts).await?;
    Ok(json_response(StatusCode::CREATED, &success(), "application/json"))
}

async fn proxy(
    state: Arc<State>,
    ns: &str,
    name: &str,
    sub: &str,
    req: hyper::Request<Incoming>,
) -> hyper::Response<Body> {
    let pod = match state.store.get(&Key::new("", "pods", ns, name)).await {
        Ok(p) => p,
        Err(e) => return error_response(&ApiError::from_store(e, "pods", name)),
    };
    let mut target = match node_proxy::node_request(&pod.value, sub, req.method(), req.uri().query()) {
        Ok(t) => t,
        Err(e) => return error_response(&e),
    };
    let Some(proxy) = &state.hooks.node_proxy else {
        return error_response(&ApiError::not_implemented(format!(
            "pods/{sub} is served by the node agent, which is not running in this server"
        )));
    };
    target.node = match state.store.get(&Key::new("", "nodes", "", &target.node_name)).await {
        Ok(node) => Some(node.value),
        Err(StoreError::NotFound) => None,
        Err(e) => return error_response(&ApiError::from_store(e, "nodes", &target.node_name)),
    };
    proxy.serve(target, req).await
}

/// Creates the built-in namespaces and runtime class and resumes interrupted namespace deletions.
pub(super) async fn bootstrap(state: &Arc<State>) -> anyhow::Result<()> {
    let ns_info = lookup("", "v1", "namespaces").expect("namespaces registered");
    for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        let obj = json!({"metadata": {"name": ns}});
        match create_object(state, ns_info, "", obj, FieldValidation::Strict, false).await {
            Ok(_) => {}
            Err(e) if e.reason == "AlreadyExists" => ensure_namespace_defaults(state, ns).await,
            Err(e) => anyhow::bail!("creating namespace {ns}: {}", e.message),
        }
    }
    let seeds = [
        (
            lookup("node.k8s.io", "v1", "runtimeclasses"),
            "",
            json!({"metadata": {"name": "vm"}, "handler": "vm"}),
        ),
        (
            lookup("", "v1", "services"),
            "default",
            json!({"metadata": {"name": "kubernetes", "labels": {"component": "apiserver", "provider": "kubernetes"}},
                   "spec": {"type": "ClusterIP", "clusterIP": super::services::first_ip(&state.service_cidr).to_string(),
                            "ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": 6443}]}}),
        ),
    ];
    for (info, ns, obj) in seeds {
        let info = info.expect("registered");
        match create_object(state, info, ns, obj, FieldValidation::Strict, false).await {
            Ok(_) => {}
            Err(e) if e.reason == "AlreadyExists" => {}
            Err(e) => anyhow::bail!("creating {}: {}", info.resource, e.message),
        }
    }
    let (nss, _) = state.store.list(&Scope::new("", "namespaces", None)).await?;
    for ns in nss
        .into_iter()
        .filter(|n| n.value.pointer("/metadata/deletionTimestamp").is_some())
    {
        tokio::spawn(finalize_namespace(state.clone(), ns.key.name));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_writes_only_where_agents_write() {
        let (post, delete, patch) = (http::Method::POST, http::Method::DELETE, http::Method::PATCH);
        assert!(node_may_write(&post, "/api/v1/nodes"));
        assert!(node_may_write(&patch, "/api/v1/nodes/n1/status"));
        assert!(node_may_write(&patch, "/api/v1/namespaces/default/pods/p/status"));
        assert!(node_may_write(&delete, "/api/v1/namespaces/default/pods/p"));
        assert!(node_may_write(&post, "/api/v1/namespaces/default/events"));
        let lease = "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases";
        assert!(node_may_write(&post, lease));
        assert!(!node_may_write(
            &post,
            "/apis/coordination.k8s.io/v1/namespaces/default/leases"
        ));
        assert!(!node_may_write(&post, "/api/v1/namespaces/default/pods"));
        assert!(!node_may_write(&patch, "/api/v1/namespaces/default/pods/p"));
        assert!(!node_may_write(&delete, "/api/v1/namespaces/default/pods"));
        assert!(!node_may_write(&post, "/api/v1/namespaces/default/pods/p/exec"));
        assert!(!node_may_write(&post, "/api/v1/namespaces/default/secrets"));
        assert!(!node_may_write(&delete, "/api/v1/namespaces/default"));
        assert!(!node_may_write(&post, "/apis/apps/v1/namespaces/default/deployments"));
        assert!(!node_may_write(&post, "/unknown"));
    }

    #[test]
    fn targets() {
        let t = parse_target("/api/v1/namespaces/default/pods/p/status").unwrap();
        assert_eq!(
            (t.info.resource, t.ns.as_deref(), t.name.as_deref(), t.sub.as_deref()),
            ("pods", Some("default"), Some("p"), Some("status"))
        );
        let t = parse_target("/api/v1/namespaces/x/status").unwrap();
        assert_eq!(
            (t.info.resource, t.name.as_deref(), t.sub.as_deref()),
            ("namespaces", Some("x"), Some("status"))
        );
        let t = parse_target("/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases").unwrap();
        assert_eq!(
            (t.info.resource, t.ns.as_deref(), t.name),
            ("leases", Some("kube-node-lease"), None)
        );
        assert_eq!(parse_target("/api/v1/pods").unwrap().ns, None);
        assert!(parse_target("/api/v1/nodes/a/b/c").is_none());
        assert!(parse_target("/apis/apps/v1/cronjobs").is_none());
        let t = parse_target("/apis/apps/v1/namespaces/default/deployments/web/scale").unwrap();
        assert_eq!((t.info.kind, t.sub.as_deref()), ("Deployment", Some("scale")));
    }
}
