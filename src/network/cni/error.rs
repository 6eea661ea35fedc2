//! The error type of every CNI operation.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// The CNI operations a runtime asks a plugin for (`CNI_COMMAND`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Command {
    Add,
    Del,
    Check,
    Status,
    Version,
}

impl Command {
    /// The value of `CNI_COMMAND`.
    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Status => "STATUS",
            Command::Version => "VERSION",
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Well-known error codes of the CNI spec.
pub mod codes {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENVIRONMENT: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODE_FAILURE: u32 = 6;
    pub const INVALID_NETWORK_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// STATUS: the plugin is not available (the network is not ready).
    pub const PLUGIN_NOT_AVAILABLE: u32 = 50;
    /// STATUS: the plugin is not available and existing containers may lose connectivity.
    pub const PLUGIN_NOT_AVAILABLE_LIMITED: u32 = 51;
}

/// What went wrong in a CNI operation. The `Display` text is meant for the
/// user (it ends up in the RunPodSandbox error), so it names the file or
/// plugin at fault.
#[derive(Debug, thiserror::Error)]
pub enum CniError {
    #[error("cannot read CNI config directory {path}: {source}")]
    ReadDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid CNI config {path}: {reason}")]
    InvalidConfig { path: PathBuf, reason: String },
    #[error("CNI plugin {plugin:?} not found in {searched}")]
    PluginNotFound { plugin: String, searched: String },
    #[error("invalid CNI request: {0}")]
    InvalidArgument(String),
    #[error("CNI {command} is not supported by cniVersion {version}")]
    Unsupported { command: Command, version: String },
    #[error("cannot run CNI plugin {plugin:?} ({command}): {source}")]
    Spawn {
        plugin: String,
        command: Command,
        #[source]
        source: std::io::Error,
    },
    #[error("CNI plugin {plugin:?} {command} timed out after {timeout:?} and was killed")]
    Timeout {
        plugin: String,
        command: Command,
        timeout: Duration,
    },
    #[error("{0}")]
    Plugin(Box<PluginFailure>),
    #[error("CNI plugin {plugin:?} {command} returned an invalid result: {reason}")]
    InvalidResult {
        plugin: String,
        command: Command,
        reason: String,
    },
}

impl CniError {
    /// The CNI error code of a plugin failure.
    pub fn code(&self) -> Option<u32> {
        match self {
            CniError::Plugin(failure) => failure.code,
            _ => None,
        }
    }
}

/// A plugin that exited unsuccessfully, with what it said about it.
#[derive(Debug)]
pub struct PluginFailure {
    pub plugin: String,
    pub command: Command,
    /// The CNI error code, when the plugin printed an error object.
    pub code: Option<u32>,
    /// The error object's `msg`, or the plugin's stdout when it printed none.
    pub msg: String,
    pub details: String,
    /// The exit status, e.g. "exit status: 1" or "signal: 9 (SIGKILL)".
    pub exit: String,
    /// The tail of the plugin's stderr (bounded).
    pub stderr: String,
}

/// Plugin, command, code, msg and details; the exit status and stderr when
/// the plugin printed no error object.
impl fmt::Display for PluginFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CNI plugin {:?} {} failed", self.plugin, self.command)?;
        match self.code {
            Some(code) => write!(f, " (code {code}): {}", self.msg)?,
            None => write!(f, " ({})", self.exit)?,
        }
        if self.code.is_none() && !self.msg.is_empty() {
            write!(f, ": {}", self.msg)?;
        }
        if !self.details.is_empty() {
            write!(f, "; details: {}", self.details)?;
        }
        if self.code.is_none() && !self.stderr.is_empty() {
            write!(f, "; stderr: {}", self.stderr.trim())?;
        }
        Ok(())
    }
}
