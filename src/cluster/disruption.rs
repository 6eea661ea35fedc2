//! PodDisruptionBudgets: how many of the pods a budget selects may be evicted
//! now. The API server checks it on each eviction (429 when the budget is
//! spent, so `kubectl drain` waits and retries); the disruption controller
//! publishes it as the budget's status (`get pdb`).

use serde_json::{Value, json};

use crate::cluster::apiserver::select::selector_matches;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    pub expected: i64,
    pub current_healthy: i64,
    pub desired_healthy: i64,
    pub allowed: i64,
}

/// An int, or a percentage of `total` rounded up.
fn scaled(v: &Value, total: i64) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => {
            let percent: i64 = s.strip_suffix('%')?.parse().ok()?;
            Some((percent * total + 99) / 100)
        }
        _ => None,
    }
}

/// Ready and not being deleted.
pub fn healthy(pod: &Value) -> bool {
    pod.pointer("/metadata/deletionTimestamp").is_none()
        && pod
            .pointer("/status/conditions")
            .and_then(Value::as_array)
            .is_some_and(|c| c.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"))
}

/// Whether the budget selects `pod` (same namespace, matching labels).
pub fn selects(pdb: &Value, pod: &Value) -> bool {
    pdb.pointer("/metadata/namespace") == pod.pointer("/metadata/namespace")
        && pdb
            .pointer("/spec/selector")
            .is_some_and(|sel| selector_matches(sel, pod))
}

/// The budget over `pods` (any pods; those it selects and that have not finished count).
pub fn budget(pdb: &Value, pods: &[Value]) -> Budget {
    let selected: Vec<&Value> = pods
        .iter()
        .filter(|p| selects(pdb, p))
        .filter(|p| {
            !matches!(
                p.pointer("/status/phase").and_then(Value::as_str),
                Some("Succeeded" | "Failed")
            )
        })
        .collect();
    let expected = selected.len() as i64;
    let current_healthy = selected.iter().filter(|p| healthy(p)).count() as i64;
    let desired_healthy = match (pdb.pointer("/spec/minAvailable"), pdb.pointer("/spec/maxUnavailable")) {
        (Some(min), _) => scaled(min, expected).unwrap_or(0),
        (None, Some(max)) => expected - scaled(max, expected).unwrap_or(0),
        (None, None) => 0,
    }
    .max(0);
    Budget {
        expected,
        current_healthy,
        desired_healthy,
        allowed: (current_healthy - desired_healthy).max(0),
    }
}

/// The budget's status as the disruption controller writes it.
pub fn status(pdb: &Value, b: Budget, stamp: &Value) -> Value {
    let (status, reason, message) = if b.allowed > 0 {
        ("True", "SufficientPods", "")
    } else {
        ("False", "InsufficientPods", "")
    };
    let old = pdb
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .and_then(|c| c.iter().find(|c| c["type"] == "DisruptionAllowed"));
    let transition = old
        .filter(|c| c["status"] == status)
        .map(|c| c["lastTransitionTime"].clone())
        .unwrap_or(stamp.clone());
    json!({
        "observedGeneration": pdb.pointer("/metadata/generation").cloned().unwrap_or(json!(1)),
        "currentHealthy": b.current_healthy,
        "desiredHealthy": b.desired_healthy,
        "expectedPods": b.expected,
        "disruptionsAllowed": b.allowed,
        "conditions": [{"type": "DisruptionAllowed", "status": status, "reason": reason, "message": message,
                        "lastTransitionTime": transition, "observedGeneration": pdb.pointer("/metadata/generation").cloned().unwrap_or(json!(1))}],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, ready: bool) -> Value {
        json!({"metadata": {"name": name, "namespace": "d", "labels": {"app": "web"}},
               "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]}})
    }

    #[test]
    fn budgets() {
        let pods = [pod("a", true), pod("b", true), pod("c", false)];
        let pdb = |spec: Value| {
            let mut spec = spec;
            spec["selector"] = json!({"matchLabels": {"app": "web"}});
            json!({"metadata": {"name": "p", "namespace": "d"}, "spec": spec})
        };
        let b = budget(&pdb(json!({"minAvailable": 2})), &pods);
        assert_eq!(
            (b.expected, b.current_healthy, b.desired_healthy, b.allowed),
            (3, 2, 2, 0)
        );
        let b = budget(&pdb(json!({"maxUnavailable": "50%"})), &pods);
        assert_eq!((b.desired_healthy, b.allowed), (1, 1));
        let b = budget(&pdb(json!({"minAvailable": "50%"})), &pods);
        assert_eq!((b.desired_healthy, b.allowed), (2, 0));
        let other_ns =
            json!({"metadata": {"name": "p", "namespace": "e"}, "spec": {"selector": {"matchLabels": {"app": "web"}}}});
        assert_eq!(budget(&other_ns, &pods).expected, 0);
    }
}
