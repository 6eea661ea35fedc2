//! Kubernetes resource quantities ("100m", "1.5", "128Mi", "1e3") as numbers.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

/// The value of a quantity, e.g. "100m" -> 0.1, "1Ki" -> 1024.
pub fn parse(text: &str) -> Option<f64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    let factor = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        exponent if exponent.starts_with(['e', 'E']) => 10f64.powi(exponent[1..].parse().ok()?),
        _ => return None,
    };
    Some(number * factor)
}

/// CPU in millicores ("250m" -> 250, "2" -> 2000), rounded up.
pub fn millicores(q: &Quantity) -> Option<i64> {
    parse(&q.0).map(|v| (v * 1000.0).ceil() as i64)
}

/// Bytes ("128Mi" -> 134217728), rounded up.
pub fn bytes(q: &Quantity) -> Option<i64> {
    parse(&q.0).map(|v| v.ceil() as i64)
}

type Resources = BTreeMap<String, Quantity>;

/// A resource's limit, else its request (Kubernetes defaults requests to limits).
pub fn limit(resources: Option<&ResourceRequirements>, name: &str) -> Option<Quantity> {
    resources
        .and_then(|r| r.limits.as_ref())
        .and_then(|l: &Resources| l.get(name).cloned())
}

/// A resource's request, else its limit.
pub fn request(resources: Option<&ResourceRequirements>, name: &str) -> Option<Quantity> {
    let resources = resources?;
    let requests: Option<&Resources> = resources.requests.as_ref();
    requests
        .and_then(|r| r.get(name).cloned())
        .or_else(|| resources.limits.as_ref().and_then(|l| l.get(name).cloned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities() {
        assert_eq!(parse("100m"), Some(0.1));
        assert_eq!(parse("2"), Some(2.0));
        assert_eq!(parse("1Ki"), Some(1024.0));
        assert_eq!(parse("1.5Gi"), Some(1.5 * 1024.0 * 1024.0 * 1024.0));
        assert_eq!(parse("1e3"), Some(1000.0));
        assert_eq!(parse("5M"), Some(5e6));
        assert_eq!(parse("x"), None);
        assert_eq!(parse("1Qi"), None);
        assert_eq!(millicores(&Quantity("250m".into())), Some(250));
        assert_eq!(millicores(&Quantity("0.5".into())), Some(500));
        assert_eq!(bytes(&Quantity("64Mi".into())), Some(64 << 20));
    }
}
