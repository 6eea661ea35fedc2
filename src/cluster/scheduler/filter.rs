//! Filters: can this pod run on this node? Each returns the reason it cannot,
//! worded as kube-scheduler words it, so that the summary message reads
//! "0/3 nodes are available: 1 Insufficient cpu, 2 node(s) were unschedulable."

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, NodeSelectorRequirement, NodeSelectorTerm, Pod, Taint, Toleration};

use super::resources::Amounts;

/// Nodes list the runtime handlers they support here (comma-separated) when
/// they do not fill `status.runtimeHandlers`. A node with neither supports all.
pub const RUNTIME_HANDLERS_ANNOTATION: &str = "podvisor.io/runtime-handlers";
pub const TAINT_UNSCHEDULABLE: &str = "node.kubernetes.io/unschedulable";
pub const TAINT_NOT_READY: &str = "node.kubernetes.io/not-ready";
pub const TAINT_UNREACHABLE: &str = "node.kubernetes.io/unreachable";

/// A host port a pod holds: (protocol, hostIP, port).
pub type HostPort = (String, String, i32);

/// A node and what the pods bound to it already take.
#[derive(Clone, Debug)]
pub struct NodeState {
    pub node: Node,
    pub name: String,
    pub allocatable: Amounts,
    pub requested: Amounts,
    /// CPU and memory requested, counting pods without requests at the scoring defaults.
    pub scoring_requested: (i128, i128),
    pub pod_count: usize,
    pub host_ports: Vec<HostPort>,
}

impl NodeState {
    pub fn new(node: Node) -> Self {
        NodeState {
            name: node.metadata.name.clone().unwrap_or_default(),
            allocatable: super::resources::node_allocatable(&node),
            node,
            requested: Amounts::new(),
            scoring_requested: (0, 0),
            pod_count: 0,
            host_ports: Vec::new(),
        }
    }

    /// Counts `pod` as running here.
    pub fn add_pod(&mut self, pod: &PodInput) {
        for (name, value) in &pod.requests {
            *self.requested.entry(name.clone()).or_default() += value;
        }
        let (cpu, memory) = super::resources::scoring_requests(&pod.requests);
        self.scoring_requested.0 += cpu;
        self.scoring_requested.1 += memory;
        self.pod_count += 1;
        self.host_ports.extend(pod.host_ports.iter().cloned());
    }

    fn labels(&self) -> &BTreeMap<String, String> {
        static EMPTY: BTreeMap<String, String> = BTreeMap::new();
        self.node.metadata.labels.as_ref().unwrap_or(&EMPTY)
    }
}

/// What scheduling needs to know about a pod, with its RuntimeClass folded in.
#[derive(Clone, Debug, Default)]
pub struct PodInput {
    pub requests: Amounts,
    pub tolerations: Vec<Toleration>,
    /// `spec.nodeSelector` plus the RuntimeClass's `scheduling.nodeSelector`.
    pub node_selector: BTreeMap<String, String>,
    pub required_terms: Option<Vec<NodeSelectorTerm>>,
    pub host_ports: Vec<HostPort>,
    pub runtime_handler: Option<String>,
}

impl PodInput {
    /// `class` is the pod's RuntimeClass (the caller checks that a named class exists).
    pub fn new(pod: &Pod, class: Option<&k8s_openapi::api::node::v1::RuntimeClass>) -> Self {
        let spec = pod.spec.clone().unwrap_or_default();
        let scheduling = class.and_then(|c| c.scheduling.as_ref());
        let mut node_selector = spec.node_selector.clone().unwrap_or_default();
        node_selector.extend(scheduling.and_then(|s| s.node_selector.clone()).unwrap_or_default());
        let mut tolerations = spec.tolerations.clone().unwrap_or_default();
        tolerations.extend(scheduling.and_then(|s| s.tolerations.clone()).unwrap_or_default());
        let overhead = class
            .and_then(|c| c.overhead.as_ref())
            .and_then(|o| o.pod_fixed.as_ref());
        PodInput {
            requests: super::resources::pod_requests(pod, overhead),
            tolerations,
            node_selector,
            required_terms: spec
                .affinity
                .as_ref()
                .and_then(|a| a.node_affinity.as_ref())
                .and_then(|n| n.required_during_scheduling_ignored_during_execution.as_ref())
                .map(|r| r.node_selector_terms.clone()),
            host_ports: host_ports(pod),
            runtime_handler: class.map(|c| c.handler.clone()),
        }
    }
}

/// The host ports of all of a pod's containers.
pub fn host_ports(pod: &Pod) -> Vec<HostPort> {
    let Some(spec) = pod.spec.as_ref() else {
        return Vec::new();
    };
    spec.init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| {
            let port = p.host_port.filter(|port| *port > 0)?;
            let ip = p
                .host_ip
                .clone()
                .filter(|ip| !ip.is_empty())
                .unwrap_or_else(|| "0.0.0.0".into());
            Some((p.protocol.clone().unwrap_or_else(|| "TCP".into()), ip, port))
        })
        .collect()
}

/// Runs every filter in kube-scheduler's order and returns the first failure's reasons.
pub fn check(pod: &PodInput, node: &NodeState) -> Result<(), Vec<String>> {
    let one = |r: Option<String>| r.map_or(Ok(()), |r| Err(vec![r]));
    one(unschedulable(pod, node))?;
    one(untolerated_taint(pod, node))?;
    one(affinity_mismatch(pod, node))?;
    one(port_conflict(pod, node))?;
    insufficient_resources(pod, node)?;
    one(unsupported_handler(pod, node))
}

/// `spec.unschedulable` (cordon), unless the pod tolerates the unschedulable taint.
pub fn unschedulable(pod: &PodInput, node: &NodeState) -> Option<String> {
    let cordoned = node.node.spec.as_ref().and_then(|s| s.unschedulable).unwrap_or(false);
    let taint = Taint {
        key: TAINT_UNSCHEDULABLE.into(),
        effect: "NoSchedule".into(),
        ..Default::default()
    };
    (cordoned && !tolerated(&pod.tolerations, &taint)).then(|| "node(s) were unschedulable".into())
}

/// The node's Ready condition status: "True", "False" or "Unknown" (also when absent).
pub fn ready_status(node: &Node) -> &str {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .map_or("Unknown", |c| c.status.as_str())
}

/// The node's NoSchedule/NoExecute taints, plus the taint the node lifecycle
/// controller will add when the node is not Ready (it may not have yet).
fn hard_taints(node: &Node) -> Vec<Taint> {
    let mut taints: Vec<Taint> = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default()
        .into_iter()
        .filter(|t| t.effect == "NoSchedule" || t.effect == "NoExecute")
        .collect();
    let implied = match ready_status(node) {
        "True" => None,
        "False" => Some(TAINT_NOT_READY),
        _ => Some(TAINT_UNREACHABLE),
    };
    if let Some(key) = implied
        && !taints.iter().any(|t| t.key == key)
    {
        taints.push(Taint {
            key: key.into(),
            effect: "NoSchedule".into(),
            ..Default::default()
        });
    }
    taints
}

pub fn untolerated_taint(pod: &PodInput, node: &NodeState) -> Option<String> {
    let taint = hard_taints(&node.node)
        .into_iter()
        .find(|t| !tolerated(&pod.tolerations, t))?;
    Some(format!(
        "node(s) had untolerated taint {{{}: {}}}",
        taint.key,
        taint.value.unwrap_or_default()
    ))
}

/// Kubernetes' toleration matching: the effect and key match when set (an
/// empty key tolerates every key), then `Exists`, or `Equal` on the value.
pub fn tolerates(toleration: &Toleration, taint: &Taint) -> bool {
    fn set(s: &Option<String>) -> Option<&str> {
        s.as_deref().filter(|s| !s.is_empty())
    }
    if set(&toleration.effect).is_some_and(|e| e != taint.effect) {
        return false;
    }
    if set(&toleration.key).is_some_and(|k| k != taint.key) {
        return false;
    }
    match toleration.operator.as_deref() {
        Some("Exists") => true,
        None | Some("") | Some("Equal") => {
            toleration.value.as_deref().unwrap_or("") == taint.value.as_deref().unwrap_or("")
        }
        Some(_) => false,
    }
}

pub fn tolerated(tolerations: &[Toleration], taint: &Taint) -> bool {
    tolerations.iter().any(|t| tolerates(t, taint))
}

pub fn affinity_mismatch(pod: &PodInput, node: &NodeState) -> Option<String> {
    let labels = node.labels();
    let selector_ok = pod.node_selector.iter().all(|(k, v)| labels.get(k) == Some(v));
    let terms_ok = pod
        .required_terms
        .as_ref()
        .is_none_or(|terms| terms.iter().any(|t| term_matches(t, &node.node, false)));
    (!(selector_ok && terms_ok)).then(|| "node(s) didn't match Pod's node affinity/selector".into())
}

/// A node selector term: all its expressions and fields match. An empty term
/// matches no node in required affinity and every node in preferred affinity.
pub fn term_matches(term: &NodeSelectorTerm, node: &Node, empty_matches: bool) -> bool {
    let expressions = term.match_expressions.as_deref().unwrap_or_default();
    let fields = term.match_fields.as_deref().unwrap_or_default();
    if expressions.is_empty() && fields.is_empty() {
        return empty_matches;
    }
    let labels = node.metadata.labels.clone().unwrap_or_default();
    let name = node.metadata.name.clone().unwrap_or_default();
    expressions
        .iter()
        .all(|e| requirement_matches(e, labels.get(&e.key).map(String::as_str)))
        && fields.iter().all(|f| {
            f.key == "metadata.name"
                && matches!(f.operator.as_str(), "In" | "NotIn")
                && requirement_matches(f, Some(&name))
        })
}

fn requirement_matches(requirement: &NodeSelectorRequirement, value: Option<&str>) -> bool {
    let values = requirement.values.as_deref().unwrap_or_default();
    let compare = |ordering: std::cmp::Ordering| {
        let (Some(value), [bound]) = (value, values) else {
            return false;
        };
        match (value.parse::<i64>(), bound.parse::<i64>()) {
            (Ok(v), Ok(b)) => v.cmp(&b) == ordering,
            _ => false,
        }
    };
    match requirement.operator.as_str() {
        "In" => value.is_some_and(|v| values.iter().any(|x| x == v)),
        "NotIn" => value.is_none_or(|v| !values.iter().any(|x| x == v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        "Gt" => compare(std::cmp::Ordering::Greater),
        "Lt" => compare(std::cmp::Ordering::Less),
        _ => false,
    }
}

pub fn port_conflict(pod: &PodInput, node: &NodeState) -> Option<String> {
    let wildcard = |ip: &str| ip == "0.0.0.0" || ip == "::";
    let conflict = pod.host_ports.iter().any(|(protocol, ip, port)| {
        node.host_ports
            .iter()
            .any(|(p, i, n)| p == protocol && n == port && (i == ip || wildcard(i) || wildcard(ip)))
    });
    conflict.then(|| "node(s) didn't have free ports for the requested pod ports".into())
}

/// Requests against allocatable minus what bound pods request. A resource the
/// node does not list counts as none, except `pods`, which is then unlimited.
pub fn insufficient_resources(pod: &PodInput, node: &NodeState) -> Result<(), Vec<String>> {
    let mut reasons = Vec::new();
    if let Some(max_pods) = node.allocatable.get("pods")
        && (node.pod_count as i128 + 1) * 1000 > *max_pods
    {
        reasons.push("Too many pods".to_string());
    }
    for (name, wanted) in pod.requests.iter().filter(|(name, v)| **v > 0 && *name != "pods") {
        let free = node.allocatable.get(name).copied().unwrap_or(0) - node.requested.get(name).copied().unwrap_or(0);
        if *wanted > free {
            reasons.push(format!("Insufficient {name}"));
        }
    }
    if reasons.is_empty() { Ok(()) } else { Err(reasons) }
}

/// The RuntimeClass handler must be one the node lists (when it lists any).
pub fn unsupported_handler(pod: &PodInput, node: &NodeState) -> Option<String> {
    let handler = pod.runtime_handler.as_deref()?;
    let mut listed: Vec<String> = node
        .node
        .status
        .as_ref()
        .and_then(|s| s.runtime_handlers.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|h| h.name.clone())
        .collect();
    if let Some(annotation) = node
        .node
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(RUNTIME_HANDLERS_ANNOTATION))
    {
        listed.extend(
            annotation
                .split(',')
                .map(|h| h.trim().to_string())
                .filter(|h| !h.is_empty()),
        );
    }
    (!listed.is_empty() && !listed.iter().any(|h| h == handler))
        .then(|| format!("node(s) didn't support the runtime handler {handler:?}"))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeCondition, NodeSpec, NodeStatus};
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    pub fn node(name: &str, cpu: &str, labels: &[(&str, &str)]) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: Some(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
                ..Default::default()
            },
            spec: Some(NodeSpec::default()),
            status: Some(NodeStatus {
                allocatable: Some(BTreeMap::from([
                    ("cpu".to_string(), Quantity(cpu.into())),
                    ("memory".to_string(), Quantity("8Gi".into())),
                    ("pods".to_string(), Quantity("110".into())),
                ])),
                conditions: Some(vec![NodeCondition {
                    type_: "Ready".into(),
                    status: "True".into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        }
    }

    pub fn requesting(cpu: &str) -> PodInput {
        PodInput {
            requests: Amounts::from([("cpu".to_string(), super::super::resources::parse_milli(cpu).unwrap())]),
            ..Default::default()
        }
    }

    fn toleration(key: &str, operator: &str, value: &str, effect: &str) -> Toleration {
        let opt = |s: &str| (!s.is_empty()).then(|| s.to_string());
        Toleration {
            key: opt(key),
            operator: opt(operator),
            value: opt(value),
            effect: opt(effect),
            ..Default::default()
        }
    }

    fn taint(key: &str, value: &str, effect: &str) -> Taint {
        Taint {
            key: key.into(),
            value: (!value.is_empty()).then(|| value.to_string()),
            effect: effect.into(),
            ..Default::default()
        }
    }

    #[test]
    fn toleration_matching() {
        let t = taint("dedicated", "gpu", "NoSchedule");
        assert!(tolerates(&toleration("dedicated", "Equal", "gpu", "NoSchedule"), &t));
        assert!(tolerates(&toleration("dedicated", "", "gpu", ""), &t));
        assert!(!tolerates(&toleration("dedicated", "Equal", "cpu", ""), &t));
        assert!(tolerates(&toleration("dedicated", "Exists", "", ""), &t));
        assert!(!tolerates(&toleration("dedicated", "Exists", "", "NoExecute"), &t));
        assert!(tolerates(&toleration("", "Exists", "", ""), &t));
        assert!(!tolerates(&toleration("other", "Exists", "", ""), &t));
    }

    #[test]
    fn taints_cordon_and_readiness() {
        let mut n = NodeState::new(node("a", "2", &[]));
        let pod = requesting("1");
        assert_eq!(check(&pod, &n), Ok(()));
        n.node.spec.as_mut().unwrap().taints = Some(vec![
            taint("soft", "", "PreferNoSchedule"),
            taint("dedicated", "gpu", "NoSchedule"),
        ]);
        assert_eq!(
            check(&pod, &n),
            Err(vec!["node(s) had untolerated taint {dedicated: gpu}".to_string()])
        );
        let mut tolerant = pod.clone();
        tolerant.tolerations = vec![toleration("dedicated", "Equal", "gpu", "NoSchedule")];
        assert_eq!(check(&tolerant, &n), Ok(()));

        n.node.spec.as_mut().unwrap().unschedulable = Some(true);
        assert_eq!(
            check(&tolerant, &n),
            Err(vec!["node(s) were unschedulable".to_string()])
        );
        tolerant
            .tolerations
            .push(toleration(TAINT_UNSCHEDULABLE, "Exists", "", "NoSchedule"));
        assert_eq!(check(&tolerant, &n), Ok(()));

        n.node.status.as_mut().unwrap().conditions.as_mut().unwrap()[0].status = "Unknown".into();
        assert_eq!(
            untolerated_taint(&tolerant, &n).as_deref(),
            Some("node(s) had untolerated taint {node.kubernetes.io/unreachable: }")
        );
        n.node.status.as_mut().unwrap().conditions.as_mut().unwrap()[0].status = "False".into();
        assert!(untolerated_taint(&tolerant, &n).unwrap().contains(TAINT_NOT_READY));
        tolerant.tolerations.push(toleration("", "Exists", "", ""));
        assert_eq!(check(&tolerant, &n), Ok(()));
    }

    #[test]
    fn resources_count_bound_pods() {
        let mut n = NodeState::new(node("a", "2", &[]));
        assert_eq!(check(&requesting("2"), &n), Ok(()));
        n.add_pod(&requesting("1500m"));
        assert_eq!(check(&requesting("500m"), &n), Ok(()));
        assert_eq!(
            check(&requesting("501m"), &n),
            Err(vec!["Insufficient cpu".to_string()])
        );
        let mut memory = requesting("1m");
        memory.requests.insert("memory".into(), 9 * (1 << 30) * 1000);
        memory.requests.insert("example.com/gpu".into(), 1000);
        assert_eq!(
            check(&memory, &n),
            Err(vec![
                "Insufficient example.com/gpu".to_string(),
                "Insufficient memory".to_string()
            ])
        );
        n.allocatable.insert("pods".into(), 1000);
        assert_eq!(check(&requesting("1m"), &n), Err(vec!["Too many pods".to_string()]));
        n.allocatable.remove("pods");
        assert_eq!(check(&requesting("1m"), &n), Ok(()));
    }

    fn requirement(key: &str, operator: &str, values: &[&str]) -> NodeSelectorRequirement {
        NodeSelectorRequirement {
            key: key.into(),
            operator: operator.into(),
            values: (!values.is_empty()).then(|| values.iter().map(|v| v.to_string()).collect()),
        }
    }

    #[test]
    fn selectors_and_required_affinity() {
        let n = NodeState::new(node("a", "2", &[("zone", "x"), ("cores", "16")]));
        let mut pod = requesting("1");
        pod.node_selector.insert("zone".into(), "x".into());
        assert_eq!(check(&pod, &n), Ok(()));
        pod.node_selector.insert("zone".into(), "y".into());
        assert!(affinity_mismatch(&pod, &n).is_some());
        pod.node_selector.clear();

        let cases: &[(&[NodeSelectorRequirement], bool)] = &[
            (&[requirement("zone", "In", &["x", "y"])], true),
            (&[requirement("zone", "NotIn", &["x"])], false),
            (&[requirement("absent", "NotIn", &["x"])], true),
            (&[requirement("zone", "Exists", &[])], true),
            (&[requirement("zone", "DoesNotExist", &[])], false),
            (&[requirement("cores", "Gt", &["8"])], true),
            (&[requirement("cores", "Lt", &["8"])], false),
            (&[requirement("zone", "Gt", &["8"])], false),
            (
                &[requirement("zone", "In", &["x"]), requirement("cores", "Lt", &["8"])],
                false,
            ),
            (&[], false),
        ];
        for (expressions, want) in cases {
            let term = NodeSelectorTerm {
                match_expressions: Some(expressions.to_vec()),
                match_fields: None,
            };
            assert_eq!(term_matches(&term, &n.node, false), *want, "{expressions:?}");
        }
        let by_name = |op: &str| NodeSelectorTerm {
            match_expressions: None,
            match_fields: Some(vec![requirement("metadata.name", op, &["a"])]),
        };
        assert!(term_matches(&by_name("In"), &n.node, false));
        assert!(!term_matches(&by_name("NotIn"), &n.node, false));
        // Terms are ORed.
        pod.required_terms = Some(vec![by_name("NotIn"), by_name("In")]);
        assert_eq!(check(&pod, &n), Ok(()));
        pod.required_terms = Some(vec![by_name("NotIn")]);
        assert!(affinity_mismatch(&pod, &n).is_some());
    }

    #[test]
    fn host_ports_conflict_on_overlapping_addresses() {
        let mut n = NodeState::new(node("a", "2", &[]));
        let with_port = |ip: &str, port: i32| PodInput {
            host_ports: vec![("TCP".into(), ip.into(), port)],
            ..Default::default()
        };
        n.add_pod(&with_port("10.0.0.1", 80));
        assert!(port_conflict(&with_port("10.0.0.1", 80), &n).is_some());
        assert!(port_conflict(&with_port("0.0.0.0", 80), &n).is_some());
        assert!(port_conflict(&with_port("10.0.0.2", 80), &n).is_none());
        assert!(port_conflict(&with_port("10.0.0.1", 81), &n).is_none());
        let mut udp = with_port("10.0.0.1", 80);
        udp.host_ports[0].0 = "UDP".into();
        assert!(port_conflict(&udp, &n).is_none());
    }

    #[test]
    fn runtime_handlers() {
        let mut n = NodeState::new(node("a", "2", &[]));
        let mut pod = requesting("1");
        pod.runtime_handler = Some("vm".into());
        assert_eq!(check(&pod, &n), Ok(()), "a node that lists nothing supports everything");
        n.node.metadata.annotations = Some(BTreeMap::from([(
            RUNTIME_HANDLERS_ANNOTATION.to_string(),
            "runc, kata".to_string(),
        )]));
        assert_eq!(
            unsupported_handler(&pod, &n).as_deref(),
            Some("node(s) didn't support the runtime handler \"vm\"")
        );
        n.node.status.as_mut().unwrap().runtime_handlers = Some(vec![k8s_openapi::api::core::v1::NodeRuntimeHandler {
            name: Some("vm".into()),
            features: None,
        }]);
        assert_eq!(check(&pod, &n), Ok(()));
    }
}
