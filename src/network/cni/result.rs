//! The result of ADD, read from any result format (0.1.0 through 1.1.0).
//!
//! [`CniResult`] serializes as the plugin's raw JSON, unchanged, so the
//! caller can store it with the sandbox and hand it back to DEL/CHECK (as
//! `prevResult`, in the format of the config's own version) after a restart.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

/// Why a result could not be read.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ResultParseError(String);

/// An address with its prefix length, e.g. `10.88.0.5/16`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix_len: u8,
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || format!("invalid CIDR {s:?}");
        let (addr, prefix) = s.split_once('/').ok_or_else(invalid)?;
        let addr: IpAddr = addr.parse().map_err(|_| invalid())?;
        let prefix_len: u8 = prefix.parse().map_err(|_| invalid())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix_len > max {
            return Err(invalid());
        }
        Ok(Cidr { addr, prefix_len })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// An interface the plugins created or configured.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub mac: Option<String>,
    pub mtu: Option<u32>,
    /// The netns path for interfaces inside the sandbox; `None` on the host.
    pub sandbox: Option<String>,
}

/// An address assigned to an interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpConfig {
    pub address: Cidr,
    pub gateway: Option<IpAddr>,
    /// Index into [`CniResult::interfaces`].
    pub interface: Option<usize>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub dst: Cidr,
    pub gw: Option<IpAddr>,
}

/// The DNS settings the plugins suggest for the pod.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct ResultDns {
    pub nameservers: Vec<String>,
    pub domain: String,
    pub search: Vec<String>,
    pub options: Vec<String>,
}

/// A parsed ADD result plus the JSON it was parsed from.
#[derive(Clone, Debug, PartialEq)]
pub struct CniResult {
    cni_version: String,
    interfaces: Vec<Interface>,
    ips: Vec<IpConfig>,
    routes: Vec<Route>,
    dns: ResultDns,
    raw: Value,
}

/// Result fields of every format; `ip4`/`ip6` are the 0.1.0/0.2.0 layout.
#[derive(Deserialize)]
struct WireResult {
    #[serde(rename = "cniVersion", default)]
    cni_version: Option<String>,
    #[serde(default)]
    interfaces: Option<Vec<WireInterface>>,
    #[serde(default)]
    ips: Option<Vec<WireIp>>,
    #[serde(default)]
    routes: Option<Vec<WireRoute>>,
    #[serde(default)]
    dns: Option<ResultDns>,
    #[serde(default)]
    ip4: Option<LegacyIp>,
    #[serde(default)]
    ip6: Option<LegacyIp>,
}

#[derive(Deserialize)]
struct WireInterface {
    #[serde(default)]
    name: String,
    #[serde(default)]
    mac: Option<String>,
    #[serde(default)]
    mtu: Option<u32>,
    #[serde(default)]
    sandbox: Option<String>,
}

/// 0.3.x/0.4.0 entries also carry `"version": "4"|"6"`, which the address implies.
#[derive(Deserialize)]
struct WireIp {
    address: String,
    #[serde(default)]
    gateway: Option<String>,
    #[serde(default)]
    interface: Option<usize>,
}

#[derive(Deserialize)]
struct WireRoute {
    dst: String,
    #[serde(default)]
    gw: Option<String>,
}

#[derive(Deserialize)]
struct LegacyIp {
    ip: String,
    #[serde(default)]
    gateway: Option<String>,
    #[serde(default)]
    routes: Option<Vec<WireRoute>>,
}

fn parse_gateway(gateway: Option<String>) -> Result<Option<IpAddr>, ResultParseError> {
    match gateway.as_deref() {
        None | Some("") => Ok(None),
        Some(gw) => gw
            .parse()
            .map(Some)
            .map_err(|_| ResultParseError(format!("invalid gateway {gw:?}"))),
    }
}

fn parse_cidr(s: &str) -> Result<Cidr, ResultParseError> {
    s.parse().map_err(ResultParseError)
}

fn parse_routes(routes: Option<Vec<WireRoute>>) -> Result<Vec<Route>, ResultParseError> {
    routes
        .unwrap_or_default()
        .into_iter()
        .map(|r| {
            Ok(Route {
                dst: parse_cidr(&r.dst)?,
                gw: parse_gateway(r.gw)?,
            })
        })
        .collect()
}

impl CniResult {
    /// Reads a result of any version from its JSON.
    pub fn from_value(raw: Value) -> Result<Self, ResultParseError> {
        let wire = WireResult::deserialize(&raw).map_err(|e| ResultParseError(e.to_string()))?;
        let interfaces: Vec<Interface> = wire
            .interfaces
            .unwrap_or_default()
            .into_iter()
            .map(|i| Interface {
                name: i.name,
                mac: i.mac.filter(|m| !m.is_empty()),
                mtu: i.mtu.filter(|&m| m != 0),
                sandbox: i.sandbox.filter(|s| !s.is_empty()),
            })
            .collect();
        let mut ips = Vec::new();
        for ip in wire.ips.unwrap_or_default() {
            if ip.interface.is_some_and(|i| i >= interfaces.len()) {
                return Err(ResultParseError(format!(
                    "ip {} refers to interface {:?} of {}",
                    ip.address,
                    ip.interface,
                    interfaces.len()
                )));
            }
            ips.push(IpConfig {
                address: parse_cidr(&ip.address)?,
                gateway: parse_gateway(ip.gateway)?,
                interface: ip.interface,
            });
        }
        let mut routes = parse_routes(wire.routes)?;
        for legacy in [wire.ip4, wire.ip6].into_iter().flatten() {
            ips.push(IpConfig {
                address: parse_cidr(&legacy.ip)?,
                gateway: parse_gateway(legacy.gateway)?,
                interface: None,
            });
            routes.extend(parse_routes(legacy.routes)?);
        }
        Ok(CniResult {
            cni_version: wire.cni_version.unwrap_or_default(),
            interfaces,
            ips,
            routes,
            dns: wire.dns.unwrap_or_default(),
            raw,
        })
    }

    /// Reads a result from a plugin's stdout.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, ResultParseError> {
        let raw: Value = serde_json::from_slice(bytes).map_err(|e| ResultParseError(format!("not valid JSON: {e}")))?;
        if !raw.is_object() {
            return Err(ResultParseError("not a JSON object".to_string()));
        }
        Self::from_value(raw)
    }

    /// The `cniVersion` the result is written in.
    pub fn cni_version(&self) -> &str {
        &self.cni_version
    }

    pub fn interfaces(&self) -> &[Interface] {
        &self.interfaces
    }

    pub fn ips(&self) -> &[IpConfig] {
        &self.ips
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    pub fn dns(&self) -> &ResultDns {
        &self.dns
    }

    /// The JSON exactly as the plugin printed it.
    pub fn raw(&self) -> &Value {
        &self.raw
    }

    /// The index of the pod's interface: the one inside the sandbox (the one
    /// named `eth0` when several are), else any interface named `eth0`.
    pub fn sandbox_interface(&self) -> Option<usize> {
        let named_eth0 = |&(_, i): &(usize, &Interface)| i.name == "eth0";
        let in_sandbox: Vec<(usize, &Interface)> = self
            .interfaces
            .iter()
            .enumerate()
            .filter(|(_, i)| i.sandbox.is_some())
            .collect();
        match in_sandbox.as_slice() {
            [] => self.interfaces.iter().enumerate().find(named_eth0),
            [only] => Some(*only),
            several => several.iter().copied().find(named_eth0).or(several.first().copied()),
        }
        .map(|(index, _)| index)
    }

    /// The pod's addresses without prefix length, IPv4 first then IPv6:
    /// those of [`Self::sandbox_interface`] plus those not tied to an
    /// interface (or all of them when no interface is known).
    pub fn pod_ips(&self) -> Vec<String> {
        let sandbox = self.sandbox_interface();
        let mine = |ip: &&IpConfig| sandbox.is_none() || ip.interface.is_none() || ip.interface == sandbox;
        let v4 = self.ips.iter().filter(mine).filter(|ip| ip.address.addr.is_ipv4());
        let v6 = self.ips.iter().filter(mine).filter(|ip| ip.address.addr.is_ipv6());
        let mut out: Vec<String> = Vec::new();
        for ip in v4.chain(v6) {
            let text = ip.address.addr.to_string();
            if !out.contains(&text) {
                out.push(text);
            }
        }
        out
    }
}

impl Serialize for CniResult {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.raw.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for CniResult {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = Value::deserialize(deserializer)?;
        CniResult::from_value(raw).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// As bridge + host-local + portmap print it for cniVersion 1.0.0.
    const RESULT_1_0: &str = r#"{"cniVersion":"1.0.0","interfaces":[{"name":"cni0","mac":"aa:bb:cc:00:00:01"},{"name":"veth1234","mac":"aa:bb:cc:00:00:02"},{"name":"eth0","mac":"aa:bb:cc:00:00:03","sandbox":"/run/netns/pod"}],"ips":[{"interface":2,"address":"fd00:10::5/64","gateway":"fd00:10::1"},{"interface":2,"address":"10.88.0.5/16","gateway":"10.88.0.1"}],"routes":[{"dst":"0.0.0.0/0"},{"dst":"::/0","gw":"fd00:10::1"}],"dns":{"nameservers":["10.96.0.10"],"search":["svc"]}}"#;

    const RESULT_0_4: &str = r#"{"cniVersion":"0.4.0","interfaces":[{"name":"cni0","mac":"aa:bb:cc:00:00:01"},{"name":"eth0","sandbox":"/proc/1/ns/net"}],"ips":[{"version":"4","interface":1,"address":"10.22.0.9/24","gateway":"10.22.0.1"}],"dns":{}}"#;

    #[test]
    fn parses_1_0_and_picks_the_sandbox_interface() {
        let result = CniResult::from_slice(RESULT_1_0.as_bytes()).expect("parse");
        assert_eq!(result.cni_version(), "1.0.0");
        assert_eq!(result.interfaces().len(), 3);
        assert_eq!(result.sandbox_interface(), Some(2));
        assert_eq!(result.pod_ips(), ["10.88.0.5", "fd00:10::5"]);
        assert_eq!(result.ips()[1].gateway, Some("10.88.0.1".parse().expect("ip")));
        assert_eq!(result.routes()[0].dst.to_string(), "0.0.0.0/0");
        assert_eq!(result.routes()[1].gw, Some("fd00:10::1".parse().expect("ip")));
        assert_eq!(result.dns().nameservers, ["10.96.0.10"]);
    }

    #[test]
    fn parses_0_4_and_keeps_the_version_field() {
        let result = CniResult::from_slice(RESULT_0_4.as_bytes()).expect("parse");
        assert_eq!(result.pod_ips(), ["10.22.0.9"]);
        assert_eq!(result.ips()[0].address.prefix_len, 24);
        let stored = serde_json::to_string(&result).expect("serialize");
        let back: CniResult = serde_json::from_str(&stored).expect("deserialize");
        assert_eq!(back, result);
        // The raw form (with ips[].version) is what goes into prevResult.
        assert_eq!(back.raw()["ips"][0]["version"], "4");
        assert_eq!(back.raw(), &serde_json::from_str::<Value>(RESULT_0_4).expect("json"));
    }

    #[test]
    fn round_trips_inside_a_record() {
        #[derive(Serialize, Deserialize)]
        struct SandboxRecord {
            id: String,
            network: Option<CniResult>,
        }
        let record = SandboxRecord {
            id: "abc".into(),
            network: Some(CniResult::from_slice(RESULT_1_0.as_bytes()).expect("parse")),
        };
        let text = serde_json::to_string(&record).expect("serialize");
        let back: SandboxRecord = serde_json::from_str(&text).expect("deserialize");
        assert_eq!(back.network, record.network);
    }

    #[test]
    fn legacy_0_2_layout() {
        let result = CniResult::from_value(json!({
            "cniVersion": "0.2.0",
            "ip4": {"ip": "10.1.0.2/24", "gateway": "10.1.0.1", "routes": [{"dst": "0.0.0.0/0"}]},
            "ip6": {"ip": "fd00::2/64"}
        }))
        .expect("parse");
        assert_eq!(result.pod_ips(), ["10.1.0.2", "fd00::2"]);
        assert_eq!(result.routes().len(), 1);
    }

    #[test]
    fn pod_ips_without_sandbox_field() {
        let result = CniResult::from_value(json!({
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "veth0"}, {"name": "eth0"}],
            "ips": [{"address": "10.0.0.3/24", "interface": 0}, {"address": "10.0.1.3/24", "interface": 1}]
        }))
        .expect("parse");
        assert_eq!(result.pod_ips(), ["10.0.1.3"]);
        let bare = CniResult::from_value(
            json!({"cniVersion": "1.0.0", "ips": [{"address": "2001:db8::1/64"}, {"address": "10.0.0.3/24"}]}),
        )
        .expect("parse");
        assert_eq!(bare.pod_ips(), ["10.0.0.3", "2001:db8::1"]);
    }

    #[test]
    fn rejects_bad_results() {
        for bad in [
            json!({"ips": [{"address": "10.0.0.300/24"}]}),
            json!({"ips": [{"address": "10.0.0.3/33"}]}),
            json!({"ips": [{"address": "10.0.0.3"}]}),
            json!({"ips": [{"address": "10.0.0.3/24", "interface": 1}]}),
            json!({"ips": [{"address": "10.0.0.3/24", "gateway": "x"}]}),
            json!({"interfaces": "eth0"}),
        ] {
            assert!(CniResult::from_value(bad.clone()).is_err(), "{bad}");
        }
        assert!(CniResult::from_slice(b"[]").is_err());
        assert!(serde_json::from_str::<CniResult>(r#"{"ips":[{"address":"bad"}]}"#).is_err());
    }
}
