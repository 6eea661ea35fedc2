//! The wire protocol, with shell-script plugins that record what they get:
//! environment, stdin, chaining, error reporting, STATUS, VERSION, timeouts
//! and cancellation.

#[path = "cni_common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Netns, TestNet};
use podvisor::network::cni::{
    Bandwidth, CniError, Command, Dns, NetworkConfigList, PortMapping, Protocol, StatusOutcome,
};
use serde_json::{Value, json};

/// Records env and stdin per command, logs the call, and prints the canned
/// `<name>.result` for ADD.
const RECORDER: &str = r#"name=$(basename "$0")
rec="$(dirname "$0")/../rec"
cat > "$rec/$name.$CNI_COMMAND.stdin"
env > "$rec/$name.$CNI_COMMAND.env"
echo "$name $CNI_COMMAND" >> "$rec/log"
[ "$CNI_COMMAND" = ADD ] && cat "$rec/$name.result"
exit 0"#;

struct Recorded {
    dir: PathBuf,
}

impl Recorded {
    fn new(net: &TestNet) -> Recorded {
        let dir = net.dir.path().join("rec");
        std::fs::create_dir_all(&dir).expect("mkdir rec");
        Recorded { dir }
    }

    fn set_result(&self, plugin: &str, result: &Value) {
        std::fs::write(self.dir.join(format!("{plugin}.result")), result.to_string()).expect("write result");
    }

    fn stdin(&self, plugin: &str, command: &str) -> Value {
        let path = self.dir.join(format!("{plugin}.{command}.stdin"));
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        serde_json::from_str(&text).expect("stdin is JSON")
    }

    fn env(&self, plugin: &str, command: &str) -> BTreeMap<String, String> {
        let text = std::fs::read_to_string(self.dir.join(format!("{plugin}.{command}.env"))).expect("env recorded");
        text.lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            // Set by the shell itself.
            .filter(|(k, _)| !matches!(k.as_str(), "PWD" | "SHLVL" | "_" | "OLDPWD"))
            .collect()
    }

    fn log(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.join("log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

fn recorder_net(version: &str) -> (TestNet, Recorded, NetworkConfigList) {
    let net = TestNet::new();
    net.script_plugin("rec-a", RECORDER);
    net.script_plugin("rec-b", RECORDER);
    let config = net.conflist(
        version,
        vec![
            json!({"type": "rec-a", "capabilities": {"portMappings": true, "bandwidth": true, "dns": false}, "custom": {"keep": [1, 2]}}),
            json!({"type": "rec-b", "capabilities": {"dns": true}, "name": "overridden", "cniVersion": "9.9.9"}),
        ],
    );
    let recorded = Recorded::new(&net);
    (net, recorded, config)
}

#[tokio::test]
async fn environment_stdin_and_chaining_1_0() {
    let (net, rec, config) = recorder_net("1.0.0");
    let result_a = json!({"cniVersion": "1.0.0", "interfaces": [{"name": "eth0", "sandbox": "/x"}], "ips": [{"address": "10.9.0.2/24", "interface": 0}]});
    let result_b = json!({"cniVersion": "1.0.0", "interfaces": [{"name": "eth0", "sandbox": "/x"}], "ips": [{"address": "10.9.0.2/24", "interface": 0}, {"address": "fd00::2/64", "interface": 0}], "x-extra": true});
    rec.set_result("rec-a", &result_a);
    rec.set_result("rec-b", &result_b);
    let runtime = net.runtime();
    let ns = Netns::new();
    let mut at = net.attachment(&ns);
    at.capabilities.port_mappings = vec![PortMapping {
        host_port: 8080,
        container_port: 80,
        protocol: Protocol::Udp,
        host_ip: "192.0.2.2".into(),
    }];
    at.capabilities.bandwidth = Some(Bandwidth {
        ingress_rate: 1000,
        ingress_burst: 2000,
        egress_rate: 3000,
        egress_burst: 4000,
    });
    at.capabilities.dns = Some(Dns {
        servers: vec!["10.96.0.10".into()],
        searches: vec![],
        options: vec![],
    });

    let result = runtime.add(&config, &at).await.expect("ADD");
    assert_eq!(result.raw(), &result_b, "the last plugin's result, unchanged");
    assert_eq!(result.pod_ips(), ["10.9.0.2", "fd00::2"]);

    // Environment: exactly the CNI variables and PATH.
    let env = rec.env("rec-a", "ADD");
    let cni_path = runtime
        .plugin_dirs
        .iter()
        .map(|d| d.to_string_lossy())
        .collect::<Vec<_>>()
        .join(":");
    let expected_args = format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
        at.pod_name, at.container_id, at.pod_uid
    );
    let expected: BTreeMap<String, String> = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", at.container_id.as_str()),
        ("CNI_NETNS", &*ns.path.to_string_lossy()),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", &cni_path),
        ("CNI_ARGS", &expected_args),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .chain(env.get("PATH").map(|p| ("PATH".to_string(), p.clone())))
    .collect();
    assert!(env.contains_key("PATH"));
    assert_eq!(env, expected);

    // Stdin: name and version from the list, unknown fields kept, runtimeConfig filtered.
    let a = rec.stdin("rec-a", "ADD");
    assert_eq!(a["name"], json!(net.name));
    assert_eq!(a["cniVersion"], "1.0.0");
    assert_eq!(a["custom"], json!({"keep": [1, 2]}));
    assert!(a.get("prevResult").is_none());
    assert_eq!(
        a["runtimeConfig"],
        json!({
            "portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "udp", "hostIP": "192.0.2.2"}],
            "bandwidth": {"ingressRate": 1000, "ingressBurst": 2000, "egressRate": 3000, "egressBurst": 4000},
        })
    );
    let b = rec.stdin("rec-b", "ADD");
    assert_eq!(
        (b["name"].clone(), b["cniVersion"].clone()),
        (json!(net.name), json!("1.0.0"))
    );
    assert_eq!(b["prevResult"], result_a);
    assert_eq!(
        b["runtimeConfig"],
        json!({"dns": {"servers": ["10.96.0.10"], "searches": [], "options": []}})
    );

    // CHECK in order with the stored result; DEL in reverse order with it.
    runtime.check(&config, &at, &result).await.expect("CHECK");
    assert_eq!(rec.stdin("rec-a", "CHECK")["prevResult"], result_b);
    runtime.del(&config, &at, Some(&result)).await.expect("DEL");
    assert_eq!(
        rec.log(),
        [
            "rec-a ADD",
            "rec-b ADD",
            "rec-a CHECK",
            "rec-b CHECK",
            "rec-b DEL",
            "rec-a DEL"
        ]
    );
    assert_eq!(rec.stdin("rec-a", "DEL")["prevResult"], result_b);
    assert_eq!(rec.stdin("rec-b", "DEL")["prevResult"], result_b);
    assert_eq!(rec.env("rec-a", "DEL")["CNI_COMMAND"], "DEL");
    assert_eq!(
        rec.stdin("rec-a", "DEL")["runtimeConfig"]["portMappings"][0]["hostPort"],
        8080
    );

    // DEL without a stored result and without a namespace still runs every plugin.
    let mut no_netns = at.clone();
    no_netns.netns = PathBuf::new();
    runtime.del(&config, &no_netns, None).await.expect("DEL");
    assert!(rec.stdin("rec-a", "DEL").get("prevResult").is_none());
    assert!(!rec.env("rec-a", "DEL").contains_key("CNI_NETNS"));
}

#[tokio::test]
async fn chaining_0_3_1_passes_the_raw_result_and_no_del_prev_result() {
    let (net, rec, config) = recorder_net("0.3.1");
    let result_a = json!({"cniVersion": "0.3.1", "interfaces": [{"name": "eth0", "sandbox": "/x"}], "ips": [{"version": "4", "address": "10.9.0.2/24", "gateway": "10.9.0.1", "interface": 0}], "dns": {}});
    rec.set_result("rec-a", &result_a);
    rec.set_result("rec-b", &result_a);
    let runtime = net.runtime();
    let ns = Netns::new();
    let at = net.attachment(&ns);
    let result = runtime.add(&config, &at).await.expect("ADD");
    assert_eq!(
        rec.stdin("rec-b", "ADD")["prevResult"],
        result_a,
        "0.3.1 layout passed unchanged"
    );
    let stored: podvisor::network::cni::CniResult =
        serde_json::from_str(&serde_json::to_string(&result).expect("store")).expect("load");
    assert_eq!(stored.raw()["ips"][0]["version"], "4");
    runtime.del(&config, &at, Some(&stored)).await.expect("DEL");
    // Spec 0.3.x has no prevResult on DEL.
    assert!(rec.stdin("rec-a", "DEL").get("prevResult").is_none());
    let check = runtime.check(&config, &at, &stored).await;
    assert!(
        matches!(
            check,
            Err(CniError::Unsupported {
                command: Command::Check,
                ..
            })
        ),
        "{check:?}"
    );
}

#[tokio::test]
async fn invalid_add_result_is_an_error_and_rolls_back() {
    let (net, rec, config) = recorder_net("1.0.0");
    rec.set_result(
        "rec-a",
        &json!({"cniVersion": "1.0.0", "ips": [{"address": "10.9.0.2/24"}]}),
    );
    std::fs::write(rec.dir.join("rec-b.result"), "this is not JSON").expect("write");
    let runtime = net.runtime();
    let ns = Netns::new();
    let at = net.attachment(&ns);
    let err = runtime.add(&config, &at).await.expect_err("invalid result");
    assert!(matches!(err, CniError::InvalidResult { .. }), "{err:?}");
    assert!(err.to_string().contains("rec-b"), "{err}");
    assert_eq!(rec.log(), ["rec-a ADD", "rec-b ADD", "rec-b DEL", "rec-a DEL"]);
    // The rollback passes the last result known.
    assert_eq!(
        rec.stdin("rec-a", "DEL")["prevResult"]["ips"][0]["address"],
        "10.9.0.2/24"
    );
}

#[tokio::test]
async fn del_continues_past_failures_and_returns_the_first() {
    let (net, rec, _) = recorder_net("1.0.0");
    for name in ["pv-del-fail-1", "pv-del-fail-2"] {
        net.script_plugin(
            name,
            &format!(
                r#"cat >/dev/null
echo '{{"cniVersion":"1.0.0","code":11,"msg":"{name} is busy"}}'
exit 1"#
            ),
        );
    }
    let config = net.conflist(
        "1.0.0",
        vec![
            json!({"type": "rec-a"}),
            json!({"type": "pv-del-fail-1"}),
            json!({"type": "pv-del-fail-2"}),
            json!({"type": "rec-b"}),
        ],
    );
    let ns = Netns::new();
    let err = net
        .runtime()
        .del(&config, &net.attachment(&ns), None)
        .await
        .expect_err("DEL fails");
    assert_eq!(err.code(), Some(podvisor::network::cni::codes::TRY_AGAIN_LATER));
    assert!(err.to_string().contains("pv-del-fail-2 is busy"), "{err}");
    assert_eq!(rec.log(), ["rec-b DEL", "rec-a DEL"]);
}

#[tokio::test]
async fn plugin_without_error_object_reports_exit_and_stderr() {
    let net = TestNet::new();
    net.script_plugin("pv-crash", "cat >/dev/null\necho 'something broke' >&2\nexit 3");
    let config = net.conflist("1.0.0", vec![json!({"type": "pv-crash"})]);
    let ns = Netns::new();
    let err = net
        .runtime()
        .add(&config, &net.attachment(&ns))
        .await
        .expect_err("crash");
    let text = err.to_string();
    assert!(
        text.contains("\"pv-crash\" ADD failed (exit status: 3)") && text.contains("something broke"),
        "{text}"
    );
    let CniError::Plugin(failure) = &err else {
        panic!("{err:?}")
    };
    assert_eq!(failure.stderr, "something broke");
}

#[tokio::test]
async fn status_1_1_runs_plugins_and_older_versions_are_not_supported() {
    let net = TestNet::new();
    net.script_plugin("rec-a", RECORDER);
    let rec = Recorded::new(&net);
    let runtime = net.runtime();
    let ready = net.conflist("1.1.0", vec![json!({"type": "rec-a"})]);
    assert_eq!(runtime.status(&ready).await.expect("STATUS"), StatusOutcome::Ready);
    let env = rec.env("rec-a", "STATUS");
    assert_eq!(env.keys().collect::<Vec<_>>(), ["CNI_COMMAND", "CNI_PATH", "PATH"]);
    assert_eq!(rec.stdin("rec-a", "STATUS")["cniVersion"], "1.1.0");

    net.script_plugin(
        "pv-not-ready",
        r#"cat >/dev/null
echo '{"cniVersion":"1.1.0","code":50,"msg":"no IP ranges left","details":"pool empty"}'
exit 1"#,
    );
    let not_ready = net.conflist("1.1.0", vec![json!({"type": "rec-a"}), json!({"type": "pv-not-ready"})]);
    let err = runtime.status(&not_ready).await.expect_err("not ready");
    assert_eq!(err.code(), Some(podvisor::network::cni::codes::PLUGIN_NOT_AVAILABLE));
    assert!(err.to_string().contains("no IP ranges left"), "{err}");

    let old = net.conflist("1.0.0", vec![json!({"type": "pv-not-ready"})]);
    assert_eq!(
        runtime.status(&old).await.expect("STATUS"),
        StatusOutcome::NotSupported {
            cni_version: "1.0.0".into()
        }
    );
    let missing = net.conflist("1.1.0", vec![json!({"type": "pv-absent"})]);
    assert!(matches!(
        runtime.status(&missing).await,
        Err(CniError::PluginNotFound { .. })
    ));
}

#[tokio::test]
async fn version_of_a_real_plugin() {
    let runtime = podvisor::network::cni::CniRuntime::default();
    let info = runtime.version("bridge", "1.0.0").await.expect("VERSION");
    assert_eq!(info.cni_version, "1.0.0");
    assert!(info.supported_versions.iter().any(|v| v == "0.4.0"), "{info:?}");
}

/// A plugin that starts a background `sleep` and waits for it on ADD,
/// writing both pids to `rec/pids`.
fn sleeper(net: &TestNet) -> PathBuf {
    net.script_plugin(
        "pv-sleep",
        r#"rec="$(dirname "$0")/../rec"
cat >/dev/null
[ "$CNI_COMMAND" = ADD ] || exit 0
echo $$ >> "$rec/pids"
sleep 30 &
echo $! >> "$rec/pids"
wait"#,
    );
    let dir = net.dir.path().join("rec");
    std::fs::create_dir_all(&dir).expect("mkdir rec");
    dir.join("pids")
}

/// Waits until every pid in `pids_file` is gone (or a zombie nobody reaps).
fn assert_all_dead(pids_file: &Path) {
    let pids: Vec<String> = std::fs::read_to_string(pids_file)
        .expect("pids written")
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(pids.len(), 2, "shell and sleep: {pids:?}");
    let deadline = Instant::now() + Duration::from_secs(5);
    for pid in pids {
        loop {
            let alive = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|stat| stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')))
                .unwrap_or(false);
            if !alive {
                break;
            }
            assert!(Instant::now() < deadline, "pid {pid} still running");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[tokio::test]
async fn timeout_kills_the_plugin_and_what_it_started() {
    let net = TestNet::new();
    let pids = sleeper(&net);
    let config = net.conflist("1.0.0", vec![json!({"type": "pv-sleep"})]);
    let mut runtime = net.runtime();
    runtime.timeout = Duration::from_millis(500);
    let ns = Netns::new();
    let started = Instant::now();
    let err = runtime.add(&config, &net.attachment(&ns)).await.expect_err("timeout");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        matches!(&err, CniError::Timeout { plugin, command: Command::Add, .. } if plugin == "pv-sleep"),
        "{err:?}"
    );
    assert!(err.to_string().contains("timed out after 500ms"), "{err}");
    assert_all_dead(&pids);
}

#[tokio::test]
async fn dropping_the_future_kills_the_plugin() {
    let net = TestNet::new();
    let pids = sleeper(&net);
    let config = net.conflist("1.0.0", vec![json!({"type": "pv-sleep"})]);
    let runtime = net.runtime();
    let ns = Netns::new();
    let at = net.attachment(&ns);
    let cancelled = tokio::time::timeout(Duration::from_millis(500), runtime.add(&config, &at)).await;
    assert!(cancelled.is_err(), "ADD should still be running");
    assert_all_dead(&pids);
}
