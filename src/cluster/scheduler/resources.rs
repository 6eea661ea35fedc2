//! Resource quantities and what a pod asks of a node: the sum of its
//! containers' requests, at least the peak of its init phase, plus overhead.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, Pod};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

/// Amounts by resource name (`cpu`, `memory`, `ephemeral-storage`, extended
/// resources), in thousandths of the unit: millicores for CPU, millibytes for
/// memory. One scale for every resource keeps the arithmetic uniform.
pub type Amounts = BTreeMap<String, i128>;

/// Requests assumed for scoring (not filtering) when a pod asks for nothing,
/// so that pods without requests still spread: 100m CPU and 200 MiB.
const SCORING_DEFAULT_CPU_MILLI: i128 = 100;
const SCORING_DEFAULT_MEMORY_MILLI: i128 = 200 * 1024 * 1024 * 1000;

/// Parses a Kubernetes quantity (`250m`, `1.5`, `2Gi`, `1e3`, `512M`) into
/// thousandths of its unit, rounded up. None when it is not a quantity.
pub fn parse_milli(text: &str) -> Option<i128> {
    let text = text.trim();
    let number_end = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(number_end);
    let (negative, number) = match number.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, number.strip_prefix('+').unwrap_or(number)),
    };
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if (whole.is_empty() && fraction.is_empty()) || !(whole.chars().chain(fraction.chars()).all(|c| c.is_ascii_digit()))
    {
        return None;
    }
    // value = digits * 10^exponent10 * 2^exponent2
    let digits: i128 = format!("{whole}{fraction}").parse().ok()?;
    let mut exponent10 = -(fraction.len() as i32) + 3;
    let mut exponent2 = 0u32;
    match suffix {
        "" => {}
        "n" => exponent10 -= 9,
        "u" => exponent10 -= 6,
        "m" => exponent10 -= 3,
        "k" => exponent10 += 3,
        "M" => exponent10 += 6,
        "G" => exponent10 += 9,
        "T" => exponent10 += 12,
        "P" => exponent10 += 15,
        "E" => exponent10 += 18,
        "Ki" => exponent2 = 10,
        "Mi" => exponent2 = 20,
        "Gi" => exponent2 = 30,
        "Ti" => exponent2 = 40,
        "Pi" => exponent2 = 50,
        "Ei" => exponent2 = 60,
        _ => {
            let exponent = suffix.strip_prefix(['e', 'E'])?;
            exponent10 += exponent.parse::<i32>().ok()?;
        }
    }
    let mut value = digits.checked_mul(1i128.checked_shl(exponent2)?)?;
    if exponent10 >= 0 {
        value = value.checked_mul(10i128.checked_pow(exponent10 as u32)?)?;
    } else {
        let divisor = 10i128.checked_pow(exponent10.unsigned_abs())?;
        value = value.div_euclid(divisor) + i128::from(value.rem_euclid(divisor) != 0);
    }
    Some(if negative { -value } else { value })
}

fn amounts(map: Option<&BTreeMap<String, Quantity>>) -> Amounts {
    map.into_iter()
        .flatten()
        .filter_map(|(name, q)| Some((name.clone(), parse_milli(&q.0)?)))
        .collect()
}

/// A container's requests; a resource with a limit but no request requests its
/// limit (the API server's defaulting in Kubernetes).
fn container_requests(container: &Container) -> Amounts {
    let resources = container.resources.as_ref();
    let mut out = amounts(resources.and_then(|r| r.limits.as_ref()));
    out.extend(amounts(resources.and_then(|r| r.requests.as_ref())));
    out
}

fn add(into: &mut Amounts, other: &Amounts) {
    for (name, value) in other {
        *into.entry(name.clone()).or_default() += value;
    }
}

fn max_into(into: &mut Amounts, other: &Amounts) {
    for (name, value) in other {
        let slot = into.entry(name.clone()).or_default();
        *slot = (*slot).max(*value);
    }
}

/// What `pod` needs on a node: max(init phase peak, containers + sidecars) plus
/// overhead. Sidecars (init containers with restartPolicy Always) keep running,
/// so they add to every later init container and to the app containers.
/// `overhead` is the pod's `spec.overhead`, or its RuntimeClass's when unset.
pub fn pod_requests(pod: &Pod, runtime_class_overhead: Option<&BTreeMap<String, Quantity>>) -> Amounts {
    let Some(spec) = pod.spec.as_ref() else {
        return Amounts::new();
    };
    let mut sidecars = Amounts::new();
    let mut init_peak = Amounts::new();
    for init in spec.init_containers.iter().flatten() {
        let requests = container_requests(init);
        if init.restart_policy.as_deref() == Some("Always") {
            add(&mut sidecars, &requests);
            max_into(&mut init_peak, &sidecars);
        } else {
            let mut during = sidecars.clone();
            add(&mut during, &requests);
            max_into(&mut init_peak, &during);
        }
    }
    let mut total = sidecars;
    for container in &spec.containers {
        add(&mut total, &container_requests(container));
    }
    max_into(&mut total, &init_peak);
    add(&mut total, &amounts(spec.overhead.as_ref().or(runtime_class_overhead)));
    total.retain(|_, v| *v != 0);
    total
}

/// `requests` with CPU and memory defaulted for scoring when absent.
pub fn scoring_requests(requests: &Amounts) -> (i128, i128) {
    let cpu = requests.get("cpu").copied().filter(|v| *v > 0);
    let memory = requests.get("memory").copied().filter(|v| *v > 0);
    (
        cpu.unwrap_or(SCORING_DEFAULT_CPU_MILLI),
        memory.unwrap_or(SCORING_DEFAULT_MEMORY_MILLI),
    )
}

/// What a node offers: `status.allocatable`, else `status.capacity`.
pub fn node_allocatable(node: &k8s_openapi::api::core::v1::Node) -> Amounts {
    let status = node.status.as_ref();
    let allocatable = status.and_then(|s| s.allocatable.as_ref()).filter(|a| !a.is_empty());
    amounts(allocatable.or(status.and_then(|s| s.capacity.as_ref())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PodSpec, ResourceRequirements};

    #[test]
    fn quantities() {
        let cases = [
            ("1", 1000),
            ("250m", 250),
            ("1.5", 1500),
            ("0.1", 100),
            ("2Ki", 2048 * 1000),
            ("1Gi", (1 << 30) * 1000),
            ("512M", 512_000_000_000),
            ("1e3", 1_000_000),
            ("1E-3", 1),
            ("100n", 1),
            ("1k", 1_000_000),
            ("+3", 3000),
            ("-2", -2000),
            (".5", 500),
        ];
        for (text, want) in cases {
            assert_eq!(parse_milli(text), Some(want), "{text}");
        }
        for bad in ["", "m", "1x", "1.2.3", "Gi", "1e"] {
            assert_eq!(parse_milli(bad), None, "{bad}");
        }
    }

    fn container(name: &str, cpu: &str, memory: Option<&str>, restart: Option<&str>) -> Container {
        let mut requests = BTreeMap::from([("cpu".to_string(), Quantity(cpu.into()))]);
        if let Some(m) = memory {
            requests.insert("memory".into(), Quantity(m.into()));
        }
        Container {
            name: name.into(),
            resources: Some(ResourceRequirements {
                requests: Some(requests),
                ..Default::default()
            }),
            restart_policy: restart.map(str::to_string),
            ..Default::default()
        }
    }

    #[test]
    fn pod_requests_take_the_init_peak_sidecars_and_overhead() {
        let pod = Pod {
            spec: Some(PodSpec {
                containers: vec![
                    container("a", "100m", Some("64Mi"), None),
                    container("b", "200m", None, None),
                ],
                init_containers: Some(vec![
                    container("setup", "1", None, None),
                    container("sidecar", "50m", None, Some("Always")),
                    container("late", "100m", Some("1Gi"), None),
                ]),
                overhead: Some(BTreeMap::from([("cpu".to_string(), Quantity("10m".into()))])),
                ..Default::default()
            }),
            ..Default::default()
        };
        let requests = pod_requests(&pod, None);
        // cpu: max(1000 init, 50+100 during "late", 300+50 running) + 10 overhead
        assert_eq!(requests["cpu"], 1010);
        // memory: max(1Gi during "late", 64Mi running)
        assert_eq!(requests["memory"], (1 << 30) * 1000);
    }

    #[test]
    fn limits_stand_in_for_missing_requests_and_class_overhead_applies() {
        let mut c = Container {
            name: "c".into(),
            ..Default::default()
        };
        c.resources = Some(ResourceRequirements {
            limits: Some(BTreeMap::from([("cpu".to_string(), Quantity("2".into()))])),
            ..Default::default()
        });
        let pod = Pod {
            spec: Some(PodSpec {
                containers: vec![c],
                ..Default::default()
            }),
            ..Default::default()
        };
        let overhead = BTreeMap::from([("memory".to_string(), Quantity("1Ki".into()))]);
        let requests = pod_requests(&pod, Some(&overhead));
        assert_eq!(requests["cpu"], 2000);
        assert_eq!(requests["memory"], 1024 * 1000);
        assert_eq!(scoring_requests(&Amounts::new()), (100, 200 * 1024 * 1024 * 1000));
    }
}
