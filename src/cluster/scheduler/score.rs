//! Scores for the nodes that passed the filters, each 0..=100, weighted as
//! kube-scheduler weighs its default plugins: resource fit ×1, preferred node
//! affinity ×2, PreferNoSchedule taints ×3.

use k8s_openapi::api::core::v1::Pod;

use super::Strategy;
use super::filter::{NodeState, PodInput, term_matches, tolerated};

const FIT_WEIGHT: i64 = 1;
const AFFINITY_WEIGHT: i64 = 2;
const TAINT_WEIGHT: i64 = 3;

/// How well the node fits by CPU and memory after adding the pod (with the
/// scoring defaults for pods without requests): free share for `Spread`
/// (least requested), used share for `Binpack` (most requested).
pub fn fit(strategy: Strategy, pod: &PodInput, node: &NodeState) -> i64 {
    let (pod_cpu, pod_memory) = super::resources::scoring_requests(&pod.requests);
    let share = |resource: &str, requested: i128| -> i64 {
        let capacity = node.allocatable.get(resource).copied().unwrap_or(0);
        if capacity <= 0 {
            return 0;
        }
        let used = (requested * 100 / capacity).clamp(0, 100) as i64;
        match strategy {
            Strategy::Spread => 100 - used,
            Strategy::Binpack => used,
        }
    };
    (share("cpu", node.scoring_requested.0 + pod_cpu) + share("memory", node.scoring_requested.1 + pod_memory)) / 2
}

/// The summed weights of the pod's preferred node affinity terms this node matches.
pub fn preferred_affinity(pod: &Pod, node: &NodeState) -> i64 {
    pod.spec
        .as_ref()
        .and_then(|s| s.affinity.as_ref())
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|n| n.preferred_during_scheduling_ignored_during_execution.as_ref())
        .into_iter()
        .flatten()
        .filter(|p| term_matches(&p.preference, &node.node, true))
        .map(|p| i64::from(p.weight))
        .sum()
}

/// How many PreferNoSchedule taints of the node the pod does not tolerate.
pub fn intolerable_soft_taints(pod: &PodInput, node: &NodeState) -> i64 {
    node.node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .into_iter()
        .flatten()
        .filter(|t| t.effect == "PreferNoSchedule" && !tolerated(&pod.tolerations, t))
        .count() as i64
}

/// Total weighted scores of `nodes`, in their order.
pub fn score(strategy: Strategy, pod: &Pod, input: &PodInput, nodes: &[&NodeState]) -> Vec<i64> {
    let affinity: Vec<i64> = nodes.iter().map(|n| preferred_affinity(pod, n)).collect();
    let taints: Vec<i64> = nodes.iter().map(|n| intolerable_soft_taints(input, n)).collect();
    let max_affinity = affinity.iter().copied().max().unwrap_or(0);
    let max_taints = taints.iter().copied().max().unwrap_or(0);
    nodes
        .iter()
        .enumerate()
        .map(|(i, node)| {
            let affinity = if max_affinity > 0 {
                affinity[i] * 100 / max_affinity
            } else {
                0
            };
            let taint = if max_taints > 0 {
                100 - taints[i] * 100 / max_taints
            } else {
                100
            };
            FIT_WEIGHT * fit(strategy, input, node) + AFFINITY_WEIGHT * affinity + TAINT_WEIGHT * taint
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::filter::tests::{node, requesting};
    use super::*;
    use k8s_openapi::api::core::v1::{
        Affinity, NodeAffinity, NodeSelectorRequirement, NodeSelectorTerm, PodSpec, PreferredSchedulingTerm, Taint,
    };

    #[test]
    fn spread_prefers_free_nodes_and_binpack_full_ones() {
        let empty = NodeState::new(node("a", "4", &[]));
        let mut busy = NodeState::new(node("b", "4", &[]));
        busy.add_pod(&requesting("2"));
        let pod = requesting("1");
        assert!(fit(Strategy::Spread, &pod, &empty) > fit(Strategy::Spread, &pod, &busy));
        assert!(fit(Strategy::Binpack, &pod, &empty) < fit(Strategy::Binpack, &pod, &busy));
        // cpu 1/4 used → 75 free; memory 200Mi/8Gi → 98 free (rounded down 2 used).
        assert_eq!(fit(Strategy::Spread, &pod, &empty), (75 + 98) / 2);
    }

    #[test]
    fn preferred_affinity_and_soft_taints_weigh_in() {
        let ssd = NodeState::new(node("a", "4", &[("disk", "ssd")]));
        let mut plain = NodeState::new(node("b", "4", &[]));
        let pod = Pod {
            spec: Some(PodSpec {
                affinity: Some(Affinity {
                    node_affinity: Some(NodeAffinity {
                        preferred_during_scheduling_ignored_during_execution: Some(vec![PreferredSchedulingTerm {
                            weight: 10,
                            preference: NodeSelectorTerm {
                                match_expressions: Some(vec![NodeSelectorRequirement {
                                    key: "disk".into(),
                                    operator: "In".into(),
                                    values: Some(vec!["ssd".into()]),
                                }]),
                                match_fields: None,
                            },
                        }]),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let input = PodInput::default();
        let scores = score(Strategy::Spread, &pod, &input, &[&ssd, &plain]);
        assert_eq!(scores[0] - scores[1], 200);
        plain.node.spec.as_mut().unwrap().taints = Some(vec![Taint {
            key: "k".into(),
            effect: "PreferNoSchedule".into(),
            ..Default::default()
        }]);
        let scores = score(Strategy::Spread, &Pod::default(), &input, &[&ssd, &plain]);
        assert_eq!(scores[0] - scores[1], 300);
    }
}
