//! Network configuration: loading the chosen file from the CNI config
//! directory, and building each plugin's stdin from it.

use std::cmp::Ordering;
use std::ffi::OsString;
use std::fmt;
use std::io::ErrorKind;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde_json::{Map, Value};

use super::capabilities::CapabilityArgs;
use super::error::CniError;

/// File name extensions the config directory is scanned for.
pub const CONFIG_EXTENSIONS: &[&str] = &["conflist", "conf", "json"];

/// A network configuration list: the plugins run, in order, for every pod.
#[derive(Clone, Debug, PartialEq)]
pub struct NetworkConfigList {
    pub name: String,
    /// The spec version every plugin is spoken to in (`cniVersion`).
    pub cni_version: String,
    /// Skip CHECK for this network (`disableCheck`).
    pub disable_check: bool,
    /// The plugin configs as written, each with at least a `type`; unknown
    /// fields pass through to the plugin untouched.
    pub plugins: Vec<Map<String, Value>>,
    /// The file it was loaded from.
    pub path: PathBuf,
}

impl NetworkConfigList {
    /// Parses a `.conflist` (an object with `plugins`) or a single-plugin
    /// `.conf`/`.json` (an object with `type`), which is wrapped into a list.
    /// `path` is only used for error messages and kept in the result.
    pub fn parse(bytes: &[u8], path: &Path) -> Result<Self, CniError> {
        let invalid = |reason: String| CniError::InvalidConfig {
            path: path.to_path_buf(),
            reason,
        };
        let value: Value = serde_json::from_slice(bytes).map_err(|e| invalid(format!("not valid JSON: {e}")))?;
        let Value::Object(top) = value else {
            return Err(invalid("not a JSON object".to_string()));
        };
        let name = required_string(&top, "name").map_err(&invalid)?;
        validate_network_name(&name).map_err(&invalid)?;
        let cni_version = required_string(&top, "cniVersion").map_err(&invalid)?;
        cni_version
            .parse::<CniVersion>()
            .map_err(|e| invalid(format!("cniVersion: {e}")))?;
        let (disable_check, plugins) = match top.get("plugins") {
            Some(Value::Array(items)) => {
                let disable_check = match top.get("disableCheck") {
                    None | Some(Value::Null) => false,
                    Some(Value::Bool(b)) => *b,
                    Some(Value::String(s)) if s.eq_ignore_ascii_case("true") => true,
                    Some(Value::String(s)) if s.eq_ignore_ascii_case("false") => false,
                    Some(other) => return Err(invalid(format!("disableCheck must be a boolean, not {other}"))),
                };
                let mut plugins = Vec::with_capacity(items.len());
                for (index, item) in items.iter().enumerate() {
                    let Value::Object(plugin) = item else {
                        return Err(invalid(format!("plugins[{index}] is not a JSON object")));
                    };
                    let plugin_type =
                        required_string(plugin, "type").map_err(|e| invalid(format!("plugins[{index}]: {e}")))?;
                    validate_plugin_type(&plugin_type).map_err(|e| invalid(format!("plugins[{index}]: {e}")))?;
                    plugins.push(plugin.clone());
                }
                if plugins.is_empty() {
                    return Err(invalid("\"plugins\" is empty".to_string()));
                }
                (disable_check, plugins)
            }
            Some(_) => return Err(invalid("\"plugins\" must be an array".to_string())),
            None => {
                let plugin_type = required_string(&top, "type").map_err(&invalid)?;
                validate_plugin_type(&plugin_type).map_err(&invalid)?;
                (false, vec![top.clone()])
            }
        };
        Ok(NetworkConfigList {
            name,
            cni_version,
            disable_check,
            plugins,
            path: path.to_path_buf(),
        })
    }

    /// The parsed `cniVersion`.
    pub fn version(&self) -> Result<CniVersion, CniError> {
        self.cni_version.parse().map_err(|reason| CniError::InvalidConfig {
            path: self.path.clone(),
            reason: format!("cniVersion: {reason}"),
        })
    }

    /// The plugin types, in chain order.
    pub fn plugin_types(&self) -> impl DoubleEndedIterator<Item = &str> {
        self.plugins.iter().map(plugin_type)
    }

    /// The stdin of one plugin: its config with the list's `name` and
    /// `cniVersion`, the `prevResult` (raw, in the format the plugin chain
    /// produced it) and a `runtimeConfig` holding only the capabilities the
    /// plugin declares.
    pub(super) fn plugin_stdin(
        &self,
        plugin: &Map<String, Value>,
        prev_result: Option<&Value>,
        capabilities: Option<&CapabilityArgs>,
    ) -> Vec<u8> {
        let mut conf = plugin.clone();
        conf.insert("name".to_string(), Value::String(self.name.clone()));
        conf.insert("cniVersion".to_string(), Value::String(self.cni_version.clone()));
        if let Some(prev) = prev_result {
            conf.insert("prevResult".to_string(), prev.clone());
        }
        if let Some(capabilities) = capabilities {
            let runtime_config = capabilities.runtime_config_for(plugin);
            if !runtime_config.is_empty() {
                conf.insert("runtimeConfig".to_string(), Value::Object(runtime_config));
            }
        }
        Value::Object(conf).to_string().into_bytes()
    }
}

/// A plugin config's `type` (empty if missing, which no lookup accepts).
pub(super) fn plugin_type(plugin: &Map<String, Value>) -> &str {
    plugin.get("type").and_then(Value::as_str).unwrap_or_default()
}

fn required_string(object: &Map<String, Value>, key: &str) -> Result<String, String> {
    match object.get(key) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        Some(Value::String(_)) => Err(format!("{key:?} is empty")),
        Some(other) => Err(format!("{key:?} must be a string, not {other}")),
        None => Err(format!("{key:?} is missing")),
    }
}

/// The spec's rule: an alphanumeric, then alphanumerics, `_`, `.` or `-`.
fn validate_network_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let valid = chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if valid {
        Ok(())
    } else {
        Err(format!("invalid network name {name:?}"))
    }
}

/// A plugin type is looked up as a file name, so it must not be a path.
pub(super) fn validate_plugin_type(plugin_type: &str) -> Result<(), String> {
    if plugin_type.is_empty() || plugin_type == "." || plugin_type == ".." || plugin_type.contains(['/', '\0']) {
        return Err(format!("invalid plugin type {plugin_type:?}"));
    }
    Ok(())
}

/// A CNI spec version, e.g. `1.0.0`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CniVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl CniVersion {
    /// CHECK, and the cached result passed to DEL, start here.
    pub const V0_4_0: CniVersion = CniVersion::new(0, 4, 0);
    pub const V1_0_0: CniVersion = CniVersion::new(1, 0, 0);
    /// STATUS (and GC) start here.
    pub const V1_1_0: CniVersion = CniVersion::new(1, 1, 0);

    pub const fn new(major: u32, minor: u32, patch: u32) -> Self {
        CniVersion { major, minor, patch }
    }
}

impl Ord for CniVersion {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.major, self.minor, self.patch).cmp(&(other.major, other.minor, other.patch))
    }
}

impl PartialOrd for CniVersion {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl FromStr for CniVersion {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.split('.').map(|part| part.parse::<u32>().ok());
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some(Some(major)), Some(Some(minor)), Some(Some(patch)), None) => Ok(CniVersion::new(major, minor, patch)),
            _ => Err(format!("invalid version {s:?} (expected MAJOR.MINOR.PATCH)")),
        }
    }
}

impl fmt::Display for CniVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// The config files of `conf_dir`, sorted by file name.
fn config_files(conf_dir: &Path) -> Result<Vec<(OsString, std::fs::Metadata)>, CniError> {
    let read_dir_error = |source| CniError::ReadDir {
        path: conf_dir.to_path_buf(),
        source,
    };
    let entries = match std::fs::read_dir(conf_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(read_dir_error(e)),
    };
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(read_dir_error)?;
        let path = entry.path();
        let wanted = path
            .extension()
            .and_then(|ext| ext.to_str())
            .is_some_and(|ext| CONFIG_EXTENSIONS.contains(&ext));
        if !wanted {
            continue;
        }
        // Follows symlinks; dangling links and directories are not configs.
        match std::fs::metadata(&path) {
            Ok(metadata) if metadata.is_file() => files.push((entry.file_name(), metadata)),
            _ => continue,
        }
    }
    files.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(files)
}

/// Loads the network from `conf_dir` as containerd does: the first
/// `*.conflist`, `*.conf` or `*.json` by file name is the network. If that
/// file is broken the error names it; a missing or empty directory is
/// `Ok(None)` (networking not configured yet). Reads a few small files
/// synchronously.
pub fn load_network(conf_dir: &Path) -> Result<Option<NetworkConfigList>, CniError> {
    let Some((name, _)) = config_files(conf_dir)?.into_iter().next() else {
        return Ok(None);
    };
    let path = conf_dir.join(name);
    let bytes = std::fs::read(&path).map_err(|e| CniError::InvalidConfig {
        path: path.clone(),
        reason: format!("cannot read: {e}"),
    })?;
    NetworkConfigList::parse(&bytes, &path).map(Some)
}

/// A cheap summary of the config directory (name, size, mtime and inode of
/// every config file): when it changes, [`load_network`] may pick another
/// network and should be called again.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fingerprint(Vec<FileStamp>);

#[derive(Clone, Debug, PartialEq, Eq)]
struct FileStamp {
    name: OsString,
    size: u64,
    mtime: (i64, i64),
    inode: u64,
}

/// The current [`Fingerprint`] of `conf_dir` (empty when it does not exist).
pub fn fingerprint(conf_dir: &Path) -> Result<Fingerprint, CniError> {
    let files = config_files(conf_dir)?;
    Ok(Fingerprint(
        files
            .into_iter()
            .map(|(name, m)| FileStamp {
                name,
                size: m.size(),
                mtime: (m.mtime(), m.mtime_nsec()),
                inode: m.ino(),
            })
            .collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, body: &str) {
        std::fs::write(dir.join(name), body).expect("write config");
    }

    const LIST: &str = r#"{"cniVersion":"1.0.0","name":"net-a","plugins":[{"type":"bridge","bridge":"cni0","x-extra":{"k":1}},{"type":"portmap","capabilities":{"portMappings":true}}]}"#;

    #[test]
    fn first_file_by_name_wins() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "20-b.conflist", &LIST.replace("net-a", "net-b"));
        write(dir.path(), "10-a.conflist", LIST);
        write(dir.path(), "05-ignored.txt", "not a config");
        std::fs::create_dir(dir.path().join("00-dir.conf")).expect("mkdir");
        let net = load_network(dir.path()).expect("load").expect("some network");
        assert_eq!(net.name, "net-a");
        assert_eq!(net.cni_version, "1.0.0");
        assert_eq!(net.path, dir.path().join("10-a.conflist"));
        assert_eq!(net.plugin_types().collect::<Vec<_>>(), ["bridge", "portmap"]);
        // Unknown fields are kept.
        assert_eq!(net.plugins[0]["x-extra"]["k"], 1);
    }

    #[test]
    fn broken_first_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "10-broken.conflist", "{\"name\": ");
        write(dir.path(), "20-good.conflist", LIST);
        let err = load_network(dir.path()).expect_err("broken file");
        let text = err.to_string();
        assert!(
            text.contains("10-broken.conflist") && text.contains("not valid JSON"),
            "{text}"
        );
    }

    #[test]
    fn missing_or_empty_dir_is_none() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(load_network(dir.path()).expect("empty dir").is_none());
        assert!(load_network(&dir.path().join("absent")).expect("absent dir").is_none());
    }

    #[test]
    fn single_plugin_conf_is_wrapped() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(
            dir.path(),
            "10-single.conf",
            r#"{"cniVersion":"0.4.0","name":"single","type":"bridge","ipam":{"type":"host-local"}}"#,
        );
        let net = load_network(dir.path()).expect("load").expect("some network");
        assert_eq!((net.name.as_str(), net.cni_version.as_str()), ("single", "0.4.0"));
        assert_eq!(net.plugins.len(), 1);
        assert_eq!(net.plugins[0]["ipam"]["type"], "host-local");
        assert!(!net.disable_check);
    }

    #[test]
    fn invalid_configs_are_rejected() {
        let path = Path::new("/x.conflist");
        for (body, expected) in [
            (r#"{"cniVersion":"1.0.0","name":"n","plugins":[]}"#, "empty"),
            (
                r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"bridge":"x"}]}"#,
                "\"type\" is missing",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"../sh"}]}"#,
                "invalid plugin type",
            ),
            (
                r#"{"cniVersion":"1.0","name":"n","plugins":[{"type":"a"}]}"#,
                "cniVersion",
            ),
            (r#"{"name":"n","plugins":[{"type":"a"}]}"#, "cniVersion"),
            (r#"{"cniVersion":"1.0.0","name":"-n","type":"a"}"#, "network name"),
            (r#"[1]"#, "object"),
        ] {
            let err = NetworkConfigList::parse(body.as_bytes(), path).expect_err(body);
            assert!(err.to_string().contains(expected), "{body}: {err}");
        }
        let net = NetworkConfigList::parse(
            br#"{"cniVersion":"0.3.1","name":"n","disableCheck":"true","plugins":[{"type":"a"}]}"#,
            path,
        )
        .expect("string disableCheck");
        assert!(net.disable_check);
    }

    #[test]
    fn versions_compare() {
        let v = |s: &str| s.parse::<CniVersion>().expect(s);
        assert!(v("0.3.1") < CniVersion::V0_4_0);
        assert!(v("1.0.0") < CniVersion::V1_1_0);
        assert!(v("1.1.0") >= CniVersion::V1_1_0);
        assert!(v("0.10.0") > v("0.4.0"));
        assert_eq!(v("1.1.0").to_string(), "1.1.0");
        assert!("1.0.0.0".parse::<CniVersion>().is_err());
    }

    #[test]
    fn fingerprint_tracks_changes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let empty = fingerprint(dir.path()).expect("fingerprint");
        write(dir.path(), "10-a.conflist", LIST);
        let one = fingerprint(dir.path()).expect("fingerprint");
        assert_ne!(empty, one);
        assert_eq!(one, fingerprint(dir.path()).expect("fingerprint"));
        write(dir.path(), "10-a.conflist", &LIST.replace("net-a", "net-aa"));
        assert_ne!(one, fingerprint(dir.path()).expect("fingerprint"));
    }

    #[test]
    fn stdin_injects_name_version_prev_result() {
        let net = NetworkConfigList::parse(LIST.as_bytes(), Path::new("/x")).expect("parse");
        let prev = serde_json::json!({"cniVersion":"1.0.0","ips":[{"address":"10.0.0.2/24"}]});
        let bytes = net.plugin_stdin(&net.plugins[1], Some(&prev), None);
        let conf: Value = serde_json::from_slice(&bytes).expect("json");
        assert_eq!(conf["name"], "net-a");
        assert_eq!(conf["cniVersion"], "1.0.0");
        assert_eq!(conf["type"], "portmap");
        assert_eq!(conf["prevResult"], prev);
        assert!(conf.get("runtimeConfig").is_none());
    }
}
