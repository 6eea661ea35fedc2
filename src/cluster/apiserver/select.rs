//! Label and field selectors (`labelSelector=`, `fieldSelector=` query parameters).

use serde_json::Value;

#[derive(Clone, Debug, PartialEq)]
enum LabelReq {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct LabelSelector(Vec<LabelReq>);

/// Splits on commas outside parentheses.
fn split_terms(s: &str) -> Vec<&str> {
    let (mut out, mut depth, mut start) = (Vec::new(), 0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out.into_iter().map(str::trim).filter(|t| !t.is_empty()).collect()
}

fn set_values(rest: &str) -> Option<Vec<String>> {
    let rest = rest.trim();
    let inner = rest.strip_prefix('(')?.strip_suffix(')')?;
    Some(
        inner
            .split(',')
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
            .collect(),
    )
}

impl LabelSelector {
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut reqs = Vec::new();
        for term in split_terms(s) {
            let req = if let Some(k) = term.strip_prefix('!') {
                LabelReq::NotExists(k.trim().to_string())
            } else if let Some((k, v)) = term.split_once("!=") {
                LabelReq::NotEq(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                LabelReq::Eq(k.trim().into(), v.trim().into())
            } else if let Some((k, rest)) = term.split_once(" notin ") {
                LabelReq::NotIn(
                    k.trim().into(),
                    set_values(rest).ok_or_else(|| format!("invalid selector {term:?}"))?,
                )
            } else if let Some((k, rest)) = term.split_once(" in ") {
                LabelReq::In(
                    k.trim().into(),
                    set_values(rest).ok_or_else(|| format!("invalid selector {term:?}"))?,
                )
            } else if term.chars().all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c)) {
                LabelReq::Exists(term.to_string())
            } else {
                return Err(format!("unable to parse requirement: {term:?}"));
            };
            reqs.push(req);
        }
        Ok(LabelSelector(reqs))
    }

    pub fn matches(&self, obj: &Value) -> bool {
        let labels = obj.pointer("/metadata/labels").and_then(Value::as_object);
        let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        self.0.iter().all(|r| match r {
            LabelReq::Eq(k, v) => get(k) == Some(v.as_str()),
            LabelReq::NotEq(k, v) => get(k) != Some(v.as_str()),
            LabelReq::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            LabelReq::NotIn(k, vs) => get(k).is_none_or(|x| !vs.iter().any(|v| v == x)),
            LabelReq::Exists(k) => get(k).is_some(),
            LabelReq::NotExists(k) => get(k).is_none(),
        })
    }
}

/// The string form of a structured `metav1.LabelSelector` (`matchLabels` + `matchExpressions`), as
/// `kubectl` prints it and as the `labelSelector=` query parameter takes it.
pub fn selector_string(sel: &Value) -> String {
    let mut terms: Vec<String> = sel
        .get("matchLabels")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
        .collect();
    for e in sel
        .get("matchExpressions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let key = e["key"].as_str().unwrap_or("");
        let values: Vec<&str> = e["values"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        terms.push(match e["operator"].as_str().unwrap_or("") {
            "In" => format!("{key} in ({})", values.join(",")),
            "NotIn" => format!("{key} notin ({})", values.join(",")),
            "DoesNotExist" => format!("!{key}"),
            _ => key.to_string(),
        });
    }
    terms.join(",")
}

/// Whether a structured label selector matches the object's labels. An empty selector matches everything.
pub fn selector_matches(sel: &Value, obj: &Value) -> bool {
    LabelSelector::parse(&selector_string(sel)).is_ok_and(|s| s.matches(obj))
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct FieldSelector(Vec<(String, bool, String)>);

/// Fields kubectl and the node components select on; any other dotted path into the object is allowed too.
impl FieldSelector {
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut reqs = Vec::new();
        for term in split_terms(s) {
            let (k, eq, v) = if let Some((k, v)) = term.split_once("!=") {
                (k, false, v)
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                (k, true, v)
            } else {
                return Err(format!("invalid field selector: {term:?}"));
            };
            let k = k.trim();
            if k.is_empty() || !k.chars().all(|c| c.is_ascii_alphanumeric() || c == '.') {
                return Err(format!("field label not supported: {k}"));
            }
            reqs.push((k.to_string(), eq, v.trim().to_string()));
        }
        Ok(FieldSelector(reqs))
    }

    pub fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|(k, eq, v)| (field_value(obj, k) == *v) == *eq)
    }
}

/// A field's value as the string a selector compares against ("" when absent).
pub fn field_value(obj: &Value, path: &str) -> String {
    let ptr: String = path.split('.').map(|p| format!("/{p}")).collect();
    match obj.pointer(&ptr) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Bool(b)) => b.to_string(),
        Some(Value::Number(n)) => n.to_string(),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn label_selectors() {
        let o = json!({"metadata": {"labels": {"app": "web", "tier": "fe"}}});
        let m = |s: &str| LabelSelector::parse(s).unwrap().matches(&o);
        assert!(m("app=web") && m("app==web") && m("app!=db") && m("app in (web, db)") && m("tier notin (be)"));
        assert!(m("app") && m("!missing") && m("app=web,tier=fe") && m(""));
        assert!(!m("app=db") && !m("app!=web") && !m("app in (db)") && !m("app notin (web)") && !m("!app"));
        assert!(!m("missing") && !m("missing in (x)") && m("missing notin (x)") && m("missing!=x"));
        assert!(LabelSelector::parse("a=b,c in (d").is_err() || LabelSelector::parse("a>>").is_err());
    }

    #[test]
    fn structured_selectors() {
        let sel = json!({"matchLabels": {"app": "web"},
                         "matchExpressions": [{"key": "tier", "operator": "In", "values": ["fe", "be"]},
                                              {"key": "old", "operator": "DoesNotExist"}]});
        assert_eq!(selector_string(&sel), "app=web,tier in (fe,be),!old");
        assert!(selector_matches(
            &sel,
            &json!({"metadata": {"labels": {"app": "web", "tier": "fe"}}})
        ));
        assert!(!selector_matches(
            &sel,
            &json!({"metadata": {"labels": {"app": "web", "tier": "db"}}})
        ));
    }

    #[test]
    fn field_selectors() {
        let o = json!({"metadata": {"name": "p", "namespace": "d"}, "spec": {"nodeName": "n1"},
                       "status": {"phase": "Running"}, "involvedObject": {"kind": "Pod", "uid": "u"}});
        let m = |s: &str| FieldSelector::parse(s).unwrap().matches(&o);
        assert!(m("metadata.name=p") && m("metadata.namespace==d") && m("spec.nodeName=n1"));
        assert!(m("spec.nodeName=n1,status.phase!=Succeeded,status.phase!=Failed"));
        assert!(m("involvedObject.kind=Pod,involvedObject.uid=u") && m("involvedObject.namespace="));
        assert!(!m("metadata.name=q") && !m("status.phase!=Running"));
        assert!(FieldSelector::parse("bad").is_err());
    }
}
