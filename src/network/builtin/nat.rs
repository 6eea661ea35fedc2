//! NAT through the `nft` CLI (tables `ip <name>` / `ip6 <name>`, owned entirely by us)
//! or the `iptables` CLI (chains `<NAME>-HOSTPORTS` and `<NAME>-POSTROUTING` in the nat
//! table, jumped to from the built-in chains).
//!
//! The base ruleset:
//! - hostports: jumped to from prerouting and output for locally destined packets
//!   (`fib daddr type local` / `addrtype LOCAL`); holds one DNAT rule per mapping and
//!   family, commented with the sandbox id.
//! - postrouting: masquerade what the pod subnet sends outside itself through anything
//!   but the bridge; what loopback sources send to pods (a hostPort reached via
//!   127.0.0.1, which `route_localnet` lets out); and DNAT'd pod-to-pod traffic
//!   (hairpin: a pod reaching a hostPort, possibly its own), so replies come back
//!   through the host. Matching addresses rather than only the output device keeps this
//!   right when br_netfilter shows bridged packets with their port as output device.
//!
//! Every change is one CLI call with a batched script (atomic in both backends).

use std::fmt::Write as _;
use std::net::IpAddr;
use std::process::Stdio;
use std::time::Duration;

use ipnet::{Ipv4Net, Ipv6Net};
use tokio::io::AsyncWriteExt;

use super::{NatBackend, NetError, Protocol, Result};

/// What the base ruleset is about.
pub(super) struct NatBase<'a> {
    pub bridge: &'a str,
    pub v4: Ipv4Net,
    pub v6: Option<Ipv6Net>,
    /// IPv4 destinations not masqueraded (other nodes' pod subnets).
    pub cluster: &'a [Ipv4Net],
}

/// One hostPort DNAT: `[daddr:]host_port/protocol -> to:to_port`. The family is `to`'s.
#[derive(Clone, Debug)]
pub(super) struct DnatRule {
    pub protocol: Protocol,
    pub host_port: u16,
    pub daddr: Option<IpAddr>,
    pub to: IpAddr,
    pub to_port: u16,
}

#[derive(Debug)]
pub(super) enum Nat {
    Nft { table: String },
    Iptables { prefix: String },
}

/// iptables-nft read-modify-write cycles (save, then restore) of this process are
/// serialized, so two attaches never both add a missing jump.
static IPTABLES_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const HOSTPORTS: &str = "hostports";

impl Nat {
    /// Picks the backend; `Auto` probes `nft list tables`, then `iptables --version`.
    pub(super) async fn detect(choice: NatBackend, name: &str) -> Result<Nat> {
        let nft = || Nat::Nft {
            table: name.to_string(),
        };
        let iptables = || Nat::Iptables {
            prefix: name.to_ascii_uppercase(),
        };
        match choice {
            NatBackend::Nft => Ok(nft()),
            NatBackend::Iptables => Ok(iptables()),
            NatBackend::Auto => {
                let nft_err = match run("nft", &["list", "tables"], None).await {
                    Ok(_) => return Ok(nft()),
                    Err(e) => e,
                };
                match run("iptables", &["--version"], None).await {
                    Ok(_) => Ok(iptables()),
                    Err(ipt_err) => Err(NetError::Nat {
                        backend: "auto",
                        op: "finding a NAT backend".into(),
                        detail: format!("nft does not work ({nft_err}), nor does iptables ({ipt_err})"),
                    }),
                }
            }
        }
    }

    pub(super) fn name(&self) -> &'static str {
        match self {
            Nat::Nft { .. } => "nftables",
            Nat::Iptables { .. } => "iptables",
        }
    }

    fn err(&self, op: &str) -> impl FnOnce(String) -> NetError {
        let (backend, op) = (self.name(), op.to_string());
        move |detail| NetError::Nat { backend, op, detail }
    }

    /// Adds `rules` tagged with `tag` and, if `with_base`, makes the base ruleset what it
    /// should be, in one transaction (per family for iptables).
    pub(super) async fn apply(&self, base: &NatBase<'_>, rules: &[DnatRule], tag: &str, with_base: bool) -> Result<()> {
        match self {
            Nat::Nft { table } => {
                let mut script = String::new();
                if with_base {
                    script.push_str(&nft_base(table, base, false));
                    if base.v6.is_some() {
                        script.push_str(&nft_base(table, base, true));
                    }
                }
                for rule in rules {
                    script.push_str(&nft_dnat(table, rule, tag));
                }
                run("nft", &["-f", "-"], Some(&script))
                    .await
                    .map(drop)
                    .map_err(self.err("applying rules"))
            }
            Nat::Iptables { prefix } => {
                let _serial = IPTABLES_LOCK.lock().await;
                for fam in ipt_families(base) {
                    let mut script = String::new();
                    if with_base {
                        let saved = run(fam.save, &["-t", "nat"], None)
                            .await
                            .map_err(self.err("reading the nat table"))?;
                        script = ipt_base_fixes(prefix, base, fam.v6, &saved);
                    }
                    for rule in rules.iter().filter(|r| r.to.is_ipv6() == fam.v6) {
                        script.push_str(&ipt_dnat(prefix, rule, tag));
                    }
                    if !script.is_empty() {
                        ipt_restore(fam, &script).await.map_err(self.err("applying rules"))?;
                    }
                }
                Ok(())
            }
        }
    }

    /// Deletes every hostPort rule tagged with `tag`; returns how many there were.
    pub(super) async fn remove_tagged(&self, base: &NatBase<'_>, tag: &str) -> Result<usize> {
        match self {
            Nat::Nft { table } => {
                let found = self.nft_tagged(table, base, Some(tag)).await?;
                if found.is_empty() {
                    return Ok(0);
                }
                let mut script = String::new();
                for (fam, handle) in &found {
                    let _ = writeln!(script, "delete rule {fam} {table} {HOSTPORTS} handle {handle}");
                }
                match run("nft", &["-f", "-"], Some(&script)).await {
                    Ok(_) => Ok(found.len()),
                    // A concurrent detach may have won; fine if nothing is left.
                    Err(e) if self.nft_tagged(table, base, Some(tag)).await?.is_empty() => {
                        tracing::debug!(error = %e, "rules already removed");
                        Ok(found.len())
                    }
                    Err(e) => Err(self.err("deleting rules")(e)),
                }
            }
            Nat::Iptables { prefix } => {
                let _serial = IPTABLES_LOCK.lock().await;
                let mut n = 0;
                for fam in ipt_families(base) {
                    let saved = run(fam.save, &["-t", "nat"], None)
                        .await
                        .map_err(self.err("reading the nat table"))?;
                    let mut script = String::new();
                    for line in ipt_tagged(prefix, &saved, Some(tag)) {
                        let _ = writeln!(script, "-D{}", &line[2..]);
                        n += 1;
                    }
                    if !script.is_empty() {
                        ipt_restore(fam, &script).await.map_err(self.err("deleting rules"))?;
                    }
                }
                Ok(n)
            }
        }
    }

    /// How many hostPort rules there are, only those tagged `tag` if given.
    #[cfg(test)]
    pub(super) async fn count_tagged(&self, base: &NatBase<'_>, tag: Option<&str>) -> Result<usize> {
        match self {
            Nat::Nft { table } => Ok(self.nft_tagged(table, base, tag).await?.len()),
            Nat::Iptables { prefix } => {
                let mut n = 0;
                for fam in ipt_families(base) {
                    let saved = run(fam.save, &["-t", "nat"], None)
                        .await
                        .map_err(self.err("reading the nat table"))?;
                    n += ipt_tagged(prefix, &saved, tag).count();
                }
                Ok(n)
            }
        }
    }

    /// Removes our tables (nft) or our chains and the jumps to them (iptables).
    pub(super) async fn teardown(&self, base: &NatBase<'_>) -> Result<()> {
        match self {
            Nat::Nft { table } => {
                // Adding first makes the delete succeed whether or not the table existed.
                let script = format!(
                    "add table ip {table}\ndelete table ip {table}\nadd table ip6 {table}\ndelete table ip6 {table}\n"
                );
                run("nft", &["-f", "-"], Some(&script))
                    .await
                    .map(drop)
                    .map_err(self.err("deleting tables"))
            }
            Nat::Iptables { prefix } => {
                let _serial = IPTABLES_LOCK.lock().await;
                let (hostports, postrouting) = ipt_chains(prefix);
                for fam in ipt_families(base) {
                    let saved = run(fam.save, &["-t", "nat"], None)
                        .await
                        .map_err(self.err("reading the nat table"))?;
                    let mut script = String::new();
                    for line in saved.lines() {
                        let builtin = ["-A PREROUTING ", "-A OUTPUT ", "-A POSTROUTING "]
                            .iter()
                            .any(|p| line.starts_with(p));
                        let ours = line.ends_with(&format!(" -j {hostports}"))
                            || line.ends_with(&format!(" -j {postrouting}"));
                        if builtin && ours {
                            let _ = writeln!(script, "-D{}", &line[2..]);
                        }
                    }
                    for chain in [&hostports, &postrouting] {
                        if ipt_declared(&saved, chain) {
                            let _ = writeln!(script, "-F {chain}\n-X {chain}");
                        }
                    }
                    if !script.is_empty() {
                        ipt_restore(fam, &script).await.map_err(self.err("deleting chains"))?;
                    }
                }
                Ok(())
            }
        }
    }

    /// Whether the base ruleset is in place, for NetworkReady.
    pub(super) async fn check(&self, base: &NatBase<'_>) -> Result<(), String> {
        match self {
            Nat::Nft { table } => {
                for fam in nft_families(base) {
                    let listed = run("nft", &["-j", "list", "table", fam, table], None)
                        .await
                        .map_err(|e| format!("nftables table {fam} {table} is not usable: {e}"))?;
                    let json: serde_json::Value =
                        serde_json::from_str(&listed).map_err(|e| format!("nft printed invalid JSON: {e}"))?;
                    let chains: Vec<&str> = nft_items(&json)
                        .filter_map(|item| item.get("chain")?.get("name")?.as_str())
                        .collect();
                    if !chains.contains(&HOSTPORTS) {
                        return Err(format!("nftables table {fam} {table} lacks chain {HOSTPORTS}"));
                    }
                    let postrouting = if fam == "ip" { 3 } else { 2 };
                    for (chain, want) in [("prerouting", 1), ("output", 1), ("postrouting", postrouting)] {
                        let have = nft_items(&json)
                            .filter_map(|item| item.get("rule")?.get("chain")?.as_str())
                            .filter(|c| *c == chain)
                            .count();
                        if !chains.contains(&chain) || have != want {
                            return Err(format!("nftables chain {fam} {table} {chain} is missing or altered"));
                        }
                    }
                }
                Ok(())
            }
            Nat::Iptables { prefix } => {
                for fam in ipt_families(base) {
                    let saved = run(fam.save, &["-t", "nat"], None).await?;
                    if !ipt_base_fixes(prefix, base, fam.v6, &saved).is_empty() {
                        return Err(format!("{} nat rules of {prefix} are missing or altered", fam.save));
                    }
                }
                Ok(())
            }
        }
    }

    /// `(family, handle)` of the hostPort rules, only those tagged `tag` if given.
    async fn nft_tagged(&self, table: &str, base: &NatBase<'_>, tag: Option<&str>) -> Result<Vec<(&'static str, u64)>> {
        let mut out = Vec::new();
        for fam in nft_families(base) {
            let listed = match run("nft", &["-j", "list", "chain", fam, table, HOSTPORTS], None).await {
                Ok(listed) => listed,
                Err(e) if e.contains("No such file or directory") => continue,
                Err(e) => return Err(self.err("listing rules")(e)),
            };
            let json: serde_json::Value =
                serde_json::from_str(&listed).map_err(|e| self.err("listing rules")(format!("invalid JSON: {e}")))?;
            for item in nft_items(&json) {
                let Some(rule) = item.get("rule") else { continue };
                let comment = rule.get("comment").and_then(|c| c.as_str());
                if let Some(handle) = rule.get("handle").and_then(|h| h.as_u64())
                    && tag.is_none_or(|t| comment == Some(t))
                {
                    out.push((fam, handle));
                }
            }
        }
        Ok(out)
    }
}

fn nft_families(base: &NatBase<'_>) -> Vec<&'static str> {
    if base.v6.is_some() {
        vec!["ip", "ip6"]
    } else {
        vec!["ip"]
    }
}

fn nft_items(json: &serde_json::Value) -> impl Iterator<Item = &serde_json::Value> {
    json.get("nftables").and_then(|v| v.as_array()).into_iter().flatten()
}

/// The base ruleset of one family, idempotent: the chains are added if missing and the
/// base chains refilled, atomically with whatever follows in the same script.
fn nft_base(table: &str, base: &NatBase<'_>, v6: bool) -> String {
    let (fam, ip, subnet) = match (v6, base.v6) {
        (true, Some(net)) => ("ip6", "ip6", net.to_string()),
        _ => ("ip", "ip", base.v4.to_string()),
    };
    let br = base.bridge;
    let mut s = String::new();
    let _ = writeln!(s, "add table {fam} {table}");
    let _ = writeln!(s, "add chain {fam} {table} {HOSTPORTS}");
    for (chain, hook, prio) in [
        ("prerouting", "prerouting", -100),
        ("output", "output", -100),
        ("postrouting", "postrouting", 100),
    ] {
        let _ = writeln!(
            s,
            "add chain {fam} {table} {chain} {{ type nat hook {hook} priority {prio}; policy accept; }}"
        );
        let _ = writeln!(s, "flush chain {fam} {table} {chain}");
    }
    let _ = writeln!(
        s,
        "add rule {fam} {table} prerouting fib daddr type local jump {HOSTPORTS}"
    );
    let _ = writeln!(s, "add rule {fam} {table} output fib daddr type local jump {HOSTPORTS}");
    let cluster = match base.cluster {
        [] => String::new(),
        _ if v6 => String::new(),
        nets => format!(
            " ip daddr != {{ {} }}",
            nets.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
        ),
    };
    let _ = writeln!(
        s,
        "add rule {fam} {table} postrouting {ip} saddr {subnet} {ip} daddr != {subnet}{cluster} oifname != \"{br}\" masquerade"
    );
    if !v6 {
        let _ = writeln!(
            s,
            "add rule {fam} {table} postrouting ip saddr 127.0.0.0/8 ip daddr {subnet} masquerade"
        );
    }
    let _ = writeln!(
        s,
        "add rule {fam} {table} postrouting ct status dnat {ip} saddr {subnet} {ip} daddr {subnet} masquerade"
    );
    s
}

fn nft_dnat(table: &str, rule: &DnatRule, tag: &str) -> String {
    let proto = rule.protocol.as_str();
    let (fam, daddr, to) = match rule.to {
        IpAddr::V4(to) => (
            "ip",
            rule.daddr.map(|d| format!("ip daddr {d} ")),
            format!("{to}:{}", rule.to_port),
        ),
        IpAddr::V6(to) => (
            "ip6",
            rule.daddr.map(|d| format!("ip6 daddr {d} ")),
            format!("[{to}]:{}", rule.to_port),
        ),
    };
    format!(
        "add rule {fam} {table} {HOSTPORTS} {}{proto} dport {} dnat to {to} comment \"{tag}\"\n",
        daddr.unwrap_or_default(),
        rule.host_port
    )
}

struct IptFamily {
    save: &'static str,
    restore: &'static str,
    v6: bool,
}

const IPT4: IptFamily = IptFamily {
    save: "iptables-save",
    restore: "iptables-restore",
    v6: false,
};
const IPT6: IptFamily = IptFamily {
    save: "ip6tables-save",
    restore: "ip6tables-restore",
    v6: true,
};

fn ipt_families(base: &NatBase<'_>) -> Vec<&'static IptFamily> {
    if base.v6.is_some() {
        vec![&IPT4, &IPT6]
    } else {
        vec![&IPT4]
    }
}

fn ipt_chains(prefix: &str) -> (String, String) {
    (format!("{prefix}-HOSTPORTS"), format!("{prefix}-POSTROUTING"))
}

fn ipt_declared(saved: &str, chain: &str) -> bool {
    let head = format!(":{chain} ");
    saved.lines().any(|l| l.starts_with(&head))
}

/// The `iptables-restore` lines (no `*nat`/`COMMIT`) that bring the base rules of one
/// family to what they should be; empty when they already are. The expected lines are
/// written the way `iptables-save` prints them, so they compare equal.
fn ipt_base_fixes(prefix: &str, base: &NatBase<'_>, v6: bool, saved: &str) -> String {
    let (hostports, postrouting) = ipt_chains(prefix);
    let br = base.bridge;
    let subnet = match (v6, base.v6) {
        (true, Some(net)) => net.to_string(),
        _ => base.v4.to_string(),
    };
    let mut want_post: Vec<String> = match v6 {
        true => Vec::new(),
        false => (base.cluster.iter())
            .map(|net| format!("-A {postrouting} -s {subnet} -d {net} -j RETURN"))
            .collect(),
    };
    want_post.push(format!(
        "-A {postrouting} -s {subnet} ! -d {subnet} ! -o {br} -j MASQUERADE"
    ));
    if !v6 {
        want_post.push(format!("-A {postrouting} -s 127.0.0.0/8 -d {subnet} -j MASQUERADE"));
    }
    want_post.push(format!(
        "-A {postrouting} -s {subnet} -d {subnet} -m conntrack --ctstate DNAT -j MASQUERADE"
    ));
    let post_head = format!("-A {postrouting} ");
    let have_post: Vec<&str> = saved.lines().filter(|l| l.starts_with(&post_head)).collect();

    let mut s = String::new();
    if !ipt_declared(saved, &hostports) {
        let _ = writeln!(s, ":{hostports} - [0:0]");
    }
    if !ipt_declared(saved, &postrouting) || have_post != want_post {
        // Declaring a chain in iptables-restore flushes it.
        let _ = writeln!(s, ":{postrouting} - [0:0]");
        for line in &want_post {
            let _ = writeln!(s, "{line}");
        }
    }
    for jump in [
        format!("-A PREROUTING -m addrtype --dst-type LOCAL -j {hostports}"),
        format!("-A OUTPUT -m addrtype --dst-type LOCAL -j {hostports}"),
        format!("-A POSTROUTING -j {postrouting}"),
    ] {
        if !saved.lines().any(|l| l == jump) {
            let _ = writeln!(s, "{jump}");
        }
    }
    s
}

fn ipt_dnat(prefix: &str, rule: &DnatRule, tag: &str) -> String {
    let (hostports, _) = ipt_chains(prefix);
    let proto = rule.protocol.as_str();
    let daddr = match rule.daddr {
        Some(IpAddr::V4(d)) => format!(" -d {d}/32"),
        Some(IpAddr::V6(d)) => format!(" -d {d}/128"),
        None => String::new(),
    };
    let to = match rule.to {
        IpAddr::V4(to) => format!("{to}:{}", rule.to_port),
        IpAddr::V6(to) => format!("[{to}]:{}", rule.to_port),
    };
    format!(
        "-A {hostports}{daddr} -p {proto} -m {proto} --dport {} -m comment --comment {tag} -j DNAT --to-destination {to}\n",
        rule.host_port
    )
}

/// The saved `-A <PREFIX>-HOSTPORTS` lines, only those commented `tag` if given.
fn ipt_tagged<'a>(prefix: &str, saved: &'a str, tag: Option<&'a str>) -> impl Iterator<Item = &'a str> {
    let head = format!("-A {}-HOSTPORTS ", prefix);
    saved.lines().filter(move |line| {
        if !line.starts_with(&head) {
            return false;
        }
        let mut words = line.split_whitespace();
        let comment = words.by_ref().find(|w| *w == "--comment").and(words.next());
        tag.is_none_or(|t| comment.map(|c| c.trim_matches('"')) == Some(t))
    })
}

async fn ipt_restore(fam: &IptFamily, lines: &str) -> Result<(), String> {
    let script = format!("*nat\n{lines}COMMIT\n");
    run(fam.restore, &["-w", "--noflush"], Some(&script)).await.map(drop)
}

/// Runs a command, feeding it `input`; its stdout, or an error naming it with its stderr.
async fn run(program: &str, args: &[&str], input: Option<&str>) -> Result<String, String> {
    let shown = || format!("{program} {}", args.join(" "));
    let mut command = tokio::process::Command::new(program);
    crate::sys::netns::enter_node(&mut command).map_err(|e| format!("cannot run {}: {e}", shown()))?;
    let mut child = command
        .args(args)
        .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", shown()))?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin
            .write_all(text.as_bytes())
            .await
            .map_err(|e| format!("writing to {}: {e}", shown()))?;
    }
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .map_err(|_| format!("{} timed out", shown()))?
        .map_err(|e| format!("waiting for {}: {e}", shown()))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr);
        Err(format!("{} failed ({}): {}", shown(), out.status, stderr.trim()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn other_nodes_pod_subnets_are_not_masqueraded() {
        let cluster: Vec<Ipv4Net> = vec!["10.89.0.0/16".parse().unwrap(), "10.90.0.0/16".parse().unwrap()];
        let base = NatBase {
            bridge: "br0",
            v4: "10.88.0.0/16".parse().unwrap(),
            v6: Some("fd88::/64".parse().unwrap()),
            cluster: &cluster,
        };
        let v4 = nft_base("t", &base, false);
        assert!(
            v4.contains("ip saddr 10.88.0.0/16 ip daddr != 10.88.0.0/16 ip daddr != { 10.89.0.0/16, 10.90.0.0/16 } oifname != \"br0\" masquerade"),
            "{v4}"
        );
        assert!(!nft_base("t", &base, true).contains("10.89.0.0/16"));
        let fixes = ipt_base_fixes("P", &base, false, "");
        let ret = fixes
            .find("-A P-POSTROUTING -s 10.88.0.0/16 -d 10.89.0.0/16 -j RETURN")
            .unwrap();
        let masq = fixes.find("-j MASQUERADE").unwrap();
        assert!(ret < masq, "{fixes}");
        // The kernel's own parser accepts the nftables text (check mode changes nothing).
        if let Ok(mut child) = std::process::Command::new("nft")
            .args(["-c", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
        {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(v4.as_bytes()).unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        }
    }
}
