//! `/version`, discovery (aggregated v2 and legacy) and the OpenAPI v3 documents kubectl needs.

use serde_json::{Value, json};

use super::registry::{RESOURCES, ResourceInfo, Sub, group_versions};

/// Kubernetes version this server models; the kubectl wrapper picks a client by the minor.
pub const GIT_VERSION: &str = "v1.32.5+podvisor";

pub fn version() -> Value {
    json!({
        "major": "1", "minor": "32", "gitVersion": GIT_VERSION, "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.23.8",
        "compiler": "gc", "platform": "linux/amd64",
    })
}

fn sub_kind<'a>(r: &'a ResourceInfo, s: &'a Sub) -> (&'a str, &'a str, &'a str) {
    if s.kind.2.is_empty() {
        (r.group, r.version, r.kind)
    } else {
        s.kind
    }
}

fn aggregated_resource(r: &ResourceInfo) -> Value {
    let subs: Vec<Value> = r
        .subresources
        .iter()
        .map(|s| {
            let (g, v, k) = sub_kind(r, s);
            json!({"subresource": s.name, "responseKind": {"group": g, "version": v, "kind": k}, "verbs": s.verbs})
        })
        .collect();
    let mut v = json!({
        "resource": r.resource,
        "responseKind": {"group": r.group, "version": r.version, "kind": r.kind},
        "scope": if r.namespaced { "Namespaced" } else { "Cluster" },
        "singularResource": r.singular,
        "verbs": r.verbs,
    });
    if !r.short_names.is_empty() {
        v["shortNames"] = json!(r.short_names);
    }
    if !r.categories.is_empty() {
        v["categories"] = json!(r.categories);
    }
    if !subs.is_empty() {
        v["subresources"] = json!(subs);
    }
    v
}

/// `APIGroupDiscoveryList` for `/api` (core = true) or `/apis`.
pub fn aggregated(core: bool) -> Value {
    let mut items = Vec::new();
    for (g, ver) in group_versions() {
        if g.is_empty() != core {
            continue;
        }
        let resources: Vec<Value> = RESOURCES
            .iter()
            .filter(|r| r.group == g && r.version == ver)
            .map(aggregated_resource)
            .collect();
        items.push(json!({
            "metadata": {"name": g},
            "versions": [{"version": ver, "resources": resources, "freshness": "Current"}],
        }));
    }
    json!({"kind": "APIGroupDiscoveryList", "apiVersion": "apidiscovery.k8s.io/v2", "metadata": {}, "items": items})
}

pub fn legacy_api() -> Value {
    json!({"kind": "APIVersions", "versions": ["v1"],
           "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]})
}

pub fn legacy_apis() -> Value {
    let groups: Vec<Value> = group_versions()
        .into_iter()
        .filter(|(g, _)| !g.is_empty())
        .map(|(g, v)| {
            let gv = json!({"groupVersion": format!("{g}/{v}"), "version": v});
            json!({"name": g, "versions": [gv.clone()], "preferredVersion": gv})
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// `APIResourceList` for one group-version, or None if not served.
pub fn resource_list(group: &str, version: &str) -> Option<Value> {
    let mut resources = Vec::new();
    for r in RESOURCES.iter().filter(|r| r.group == group && r.version == version) {
        let mut v = json!({
            "name": r.resource, "singularName": r.singular, "namespaced": r.namespaced, "kind": r.kind,
            "verbs": r.verbs,
        });
        if !r.short_names.is_empty() {
            v["shortNames"] = json!(r.short_names);
        }
        if !r.categories.is_empty() {
            v["categories"] = json!(r.categories);
        }
        resources.push(v);
        for s in r.subresources {
            let (g, ver, k) = sub_kind(r, s);
            let mut sv = json!({"name": format!("{}/{}", r.resource, s.name), "singularName": "",
                                "namespaced": r.namespaced, "kind": k, "verbs": s.verbs});
            if !g.is_empty() && g != group {
                sv["group"] = json!(g);
                sv["version"] = json!(ver);
            }
            resources.push(sv);
        }
    }
    if resources.is_empty() {
        return None;
    }
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Some(json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}))
}

fn gv_path(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

/// `/openapi/v3`: one entry per group-version.
pub fn openapi_index() -> Value {
    let mut paths = serde_json::Map::new();
    for (g, v) in group_versions() {
        let p = gv_path(g, v);
        paths.insert(
            p.clone(),
            json!({"serverRelativeURL": format!("/openapi/v3/{p}?hash={}", HASH)}),
        );
    }
    json!({"paths": paths})
}

const HASH: &str = "0123456789ABCDEF";

/// Per group-version document: PATCH operations carry the GVK and the `fieldValidation` parameter, which tells
/// kubectl that the server validates fields itself. Schemas are left empty.
pub fn openapi_gv(path: &str) -> Option<Value> {
    let (g, v) = group_versions().into_iter().find(|(g, v)| gv_path(g, v) == path)?;
    let mut paths = serde_json::Map::new();
    let params = json!([
        {"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
        {"name": "fieldManager", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
        {"name": "dryRun", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
    ]);
    for r in RESOURCES.iter().filter(|r| r.group == g && r.version == v) {
        let gvk = json!({"group": r.group, "version": r.version, "kind": r.kind});
        let op = |verb: &str| {
            json!({"x-kubernetes-action": verb, "x-kubernetes-group-version-kind": gvk, "parameters": params,
                   "responses": {"200": {"description": "OK"}}})
        };
        let base = format!("/{}", gv_path(g, v));
        let (coll, item) = if r.namespaced {
            (
                format!("{base}/namespaces/{{namespace}}/{}", r.resource),
                format!("{base}/namespaces/{{namespace}}/{}/{{name}}", r.resource),
            )
        } else {
            (
                format!("{base}/{}", r.resource),
                format!("{base}/{}/{{name}}", r.resource),
            )
        };
        paths.insert(coll, json!({"post": op("post"), "get": op("list")}));
        paths.insert(
            item,
            json!({"patch": op("patch"), "put": op("put"), "get": op("get"), "delete": op("delete")}),
        );
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": GIT_VERSION},
        "paths": paths,
        "components": {"schemas": {}},
    }))
}
