//! Durable records of sandboxes and containers, with their state machines.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::backend::BackendKind;
use crate::backend::linux::{ContainerRuntime, SandboxRuntime};
use crate::spec::{ContainerSpec, SandboxSpec};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SandboxState {
    Ready,
    NotReady,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SandboxRecord {
    pub id: String,
    pub spec: SandboxSpec,
    pub state: SandboxState,
    /// Unix nanoseconds.
    pub created_at: i64,
    pub backend: BackendKind,
    pub runtime: SandboxRuntime,
    /// How the pod is attached to the network, until it is detached.
    #[serde(default)]
    pub network: Option<crate::network::NetworkAttachment>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ContainerState {
    Created,
    Running,
    Exited,
    Unknown,
}

impl ContainerState {
    /// The transitions a container may make.
    pub fn can_become(self, next: ContainerState) -> bool {
        use ContainerState::*;
        matches!(
            (self, next),
            (Created, Running) | (Created, Exited) | (Running, Exited) | (Unknown, Exited) | (Running, Unknown)
        )
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ContainerRecord {
    pub id: String,
    pub sandbox_id: String,
    pub spec: ContainerSpec,
    /// The image id (config digest).
    pub image_id: String,
    /// A digest reference of the image, for `image_ref`.
    pub image_ref: String,
    pub state: ContainerState,
    pub created_at: i64,
    pub started_at: i64,
    pub finished_at: i64,
    pub exit_code: i32,
    pub reason: String,
    pub message: String,
    pub pid: Option<i32>,
    pub monitor_pid: Option<i32>,
    /// `/proc/PID/stat` start time of the monitor, to tell it from a reused PID.
    pub monitor_start_time: Option<u64>,
    pub runtime: ContainerRuntime,
    /// Image content the container's rootfs is made of, kept while it exists.
    #[serde(default)]
    pub image_content: Vec<String>,
    /// The VM of a VM pod's container (then `runtime` only holds its log path).
    #[serde(default)]
    pub vm: Option<crate::backend::vm::runtime::VmContainer>,
}

/// Where records live: one JSON file each, written atomically.
#[derive(Clone, Debug)]
pub struct RecordStore {
    sandboxes: PathBuf,
    containers: PathBuf,
}

impl RecordStore {
    pub fn open(root: &Path) -> std::io::Result<RecordStore> {
        let store = RecordStore {
            sandboxes: root.join("records").join("sandboxes"),
            containers: root.join("records").join("containers"),
        };
        crate::sys::fs::ensure_dir(&store.sandboxes, 0o700)?;
        crate::sys::fs::ensure_dir(&store.containers, 0o700)?;
        Ok(store)
    }

    pub fn save_sandbox(&self, record: &SandboxRecord) -> std::io::Result<()> {
        crate::sys::fs::atomic_write_json(&self.sandboxes.join(format!("{}.json", record.id)), record)
    }

    pub fn save_container(&self, record: &ContainerRecord) -> std::io::Result<()> {
        crate::sys::fs::atomic_write_json(&self.containers.join(format!("{}.json", record.id)), record)
    }

    pub fn delete_sandbox(&self, id: &str) -> std::io::Result<()> {
        remove_if_present(&self.sandboxes.join(format!("{id}.json")))
    }

    pub fn delete_container(&self, id: &str) -> std::io::Result<()> {
        remove_if_present(&self.containers.join(format!("{id}.json")))
    }

    pub fn load_sandboxes(&self) -> Vec<SandboxRecord> {
        load_all(&self.sandboxes)
    }

    pub fn load_containers(&self) -> Vec<ContainerRecord> {
        load_all(&self.containers)
    }
}

fn remove_if_present(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => Err(err),
        _ => Ok(()),
    }
}

fn load_all<T: serde::de::DeserializeOwned>(dir: &Path) -> Vec<T> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "json") {
            let _ = std::fs::remove_file(&path); // an interrupted atomic write
            continue;
        }
        match std::fs::read(&path).map(|bytes| serde_json::from_slice::<T>(&bytes)) {
            Ok(Ok(record)) => out.push(record),
            _ => tracing::warn!(path = %path.display(), "ignoring unreadable record"),
        }
    }
    out
}

/// Whether the process with this PID and start time has ended (gone, a
/// zombie, or the PID now belongs to another process).
pub fn process_ended(pid: i32, start_time: Option<u64>) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return true;
    };
    let Some(after) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
        return true;
    };
    let mut fields = after.split(' ');
    let state = fields.next().unwrap_or("Z");
    let started = fields.nth(18).and_then(|f| f.parse::<u64>().ok());
    state == "Z" || state == "X" || start_time.is_none() || started != start_time
}

/// The start time of a process (field 22 of /proc/PID/stat), in clock ticks.
pub fn process_start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let after = &stat[stat.rfind(')')? + 2..];
    after.split(' ').nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_allowed_transitions() {
        use ContainerState::*;
        assert!(Created.can_become(Running));
        assert!(Running.can_become(Exited));
        assert!(!Exited.can_become(Running));
        assert!(!Running.can_become(Created));
    }

    #[test]
    fn start_time_of_this_process() {
        let own = process_start_time(std::process::id() as i32);
        assert!(own.is_some());
        assert_eq!(own, process_start_time(std::process::id() as i32));
        assert_eq!(process_start_time(-5), None);
        assert!(!process_ended(std::process::id() as i32, own));
        assert!(process_ended(std::process::id() as i32, own.map(|t| t + 1)));
        assert!(process_ended(-5, own));
    }
}
