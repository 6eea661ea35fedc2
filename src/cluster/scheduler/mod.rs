//! `default-scheduler`: places pods that have no node, filter then score, as
//! kube-scheduler does with its default plugins, and binds them through the
//! `pods/binding` subresource.
//!
//! - Filters ([`filter`]): cordon (`spec.unschedulable`, unless the
//!   `node.kubernetes.io/unschedulable` taint is tolerated), NoSchedule and
//!   NoExecute taints (a node that is not Ready counts as tainted
//!   `not-ready`/`unreachable` even before the node lifecycle controller adds
//!   the taint), `nodeSelector` and required node affinity, host ports,
//!   requests against allocatable (see [`resources`]), and the RuntimeClass
//!   handler: a node lists the handlers it runs in `status.runtimeHandlers` or
//!   in the annotation `podvisor.io/runtime-handlers` (`runc,vm`); a node that
//!   lists none is taken to run them all. A RuntimeClass also adds its
//!   `overhead.podFixed`, `scheduling.nodeSelector` and `scheduling.tolerations`.
//! - Scores ([`score`]): least requested (`spread`, the default) or most
//!   requested (`binpack`), preferred node affinity and PreferNoSchedule
//!   taints. Ties go to the first node by name.
//! - A pod no node fits gets `PodScheduled=False` (reason `Unschedulable`) and
//!   a `FailedScheduling` event with kube-scheduler's message, and is tried
//!   again when nodes, pods or RuntimeClasses change, and every 15 s.

use std::collections::BTreeMap;

pub mod filter;
pub mod resources;
pub mod score;
mod worker;

pub use worker::{is_terminal, spawn, wants_scheduling};

pub const SCHEDULER_NAME: &str = "default-scheduler";

/// How nodes are ranked by their resources.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Strategy {
    /// Least requested first: pods spread over nodes.
    #[default]
    Spread,
    /// Most requested first: pods fill one node before the next.
    Binpack,
}

/// Picks the best node for the pod: the index into `nodes`, or kube-scheduler's
/// explanation of why none fits.
pub fn place(
    strategy: Strategy,
    pod: &k8s_openapi::api::core::v1::Pod,
    input: &filter::PodInput,
    nodes: &[filter::NodeState],
) -> Result<usize, String> {
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    let mut feasible = Vec::new();
    for (index, node) in nodes.iter().enumerate() {
        match filter::check(input, node) {
            Ok(()) => feasible.push(index),
            Err(why) => why.into_iter().for_each(|r| *reasons.entry(r).or_default() += 1),
        }
    }
    if feasible.is_empty() {
        return Err(unschedulable_message(nodes.len(), &reasons));
    }
    let candidates: Vec<&filter::NodeState> = feasible.iter().map(|i| &nodes[*i]).collect();
    let scores = score::score(strategy, pod, input, &candidates);
    let best = (0..feasible.len())
        .max_by(|a, b| {
            scores[*a]
                .cmp(&scores[*b])
                .then_with(|| candidates[*b].name.cmp(&candidates[*a].name))
        })
        .expect("at least one feasible node");
    Ok(feasible[best])
}

/// "0/3 nodes are available: 1 Insufficient cpu, 2 node(s) were unschedulable."
/// with the "count reason" parts sorted as kube-scheduler sorts them.
pub fn unschedulable_message(node_count: usize, reasons: &BTreeMap<String, usize>) -> String {
    if node_count == 0 {
        return "no nodes available to schedule pods".into();
    }
    let mut parts: Vec<String> = reasons.iter().map(|(reason, n)| format!("{n} {reason}")).collect();
    parts.sort();
    format!("0/{node_count} nodes are available: {}.", parts.join(", "))
}

#[cfg(test)]
mod tests {
    use super::filter::tests::{node, requesting};
    use super::filter::{NodeState, PodInput};
    use super::*;
    use k8s_openapi::api::core::v1::Pod;

    #[test]
    fn messages_count_reasons_per_node() {
        let mut nodes = vec![
            NodeState::new(node("a", "1", &[])),
            NodeState::new(node("b", "1", &[])),
            NodeState::new(node("c", "8", &[])),
        ];
        nodes[2].node.spec.as_mut().unwrap().unschedulable = Some(true);
        let err = place(Strategy::Spread, &Pod::default(), &requesting("2"), &nodes).unwrap_err();
        assert_eq!(
            err,
            "0/3 nodes are available: 1 node(s) were unschedulable, 2 Insufficient cpu."
        );
        assert_eq!(
            unschedulable_message(0, &BTreeMap::new()),
            "no nodes available to schedule pods"
        );
    }

    #[test]
    fn spread_and_binpack_choose_differently() {
        let mut nodes = vec![NodeState::new(node("a", "4", &[])), NodeState::new(node("b", "4", &[]))];
        let pod = requesting("1");
        assert_eq!(
            place(Strategy::Spread, &Pod::default(), &pod, &nodes),
            Ok(0),
            "ties go by name"
        );
        nodes[0].add_pod(&pod);
        assert_eq!(place(Strategy::Spread, &Pod::default(), &pod, &nodes), Ok(1));
        assert_eq!(place(Strategy::Binpack, &Pod::default(), &pod, &nodes), Ok(0));
        nodes[0].add_pod(&requesting("3"));
        assert_eq!(
            place(Strategy::Binpack, &Pod::default(), &pod, &nodes),
            Ok(1),
            "a full node is filtered out"
        );
        assert_eq!(
            place(Strategy::Binpack, &Pod::default(), &PodInput::default(), &[]).unwrap_err(),
            "no nodes available to schedule pods"
        );
    }
}
