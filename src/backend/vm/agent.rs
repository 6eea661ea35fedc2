//! Commands in the guest through the QEMU guest agent: `guest-exec`, then
//! `guest-exec-status` until the process exited.
//!
//! Commands go through libvirt (`virDomainQemuAgentCommand`, libvirt-qemu):
//! libvirt owns the agent channel's socket (it connects to every
//! `org.qemu.guest_agent.0` channel and does the `guest-sync` handshake), so
//! nobody else may talk on it.

use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::{Value, json};
use virt::error::ErrorNumber;

use super::VmError;
use super::domain::VmDomain;

/// Sends one agent command (a QMP-style JSON object) and returns the reply.
pub trait AgentTransport {
    fn command(&self, json: &str, timeout: Duration) -> Result<String, VmError>;
}

/// Maps libvirt's agent errors: no channel, no agent listening, or the domain
/// not running are [`VmError::NoAgent`].
fn agent_error(name: &str, err: virt::error::Error) -> VmError {
    match err.code() {
        ErrorNumber::ArgumentUnsupported | ErrorNumber::AgentUnresponsive | ErrorNumber::OperationInvalid => {
            VmError::NoAgent(format!("{name}: {}", err.message()))
        }
        ErrorNumber::AgentCommandTimeout | ErrorNumber::OperationTimeout => {
            VmError::Agent(format!("{name}: agent did not answer in time: {}", err.message()))
        }
        ErrorNumber::NoDomain => VmError::NotFound(name.to_string()),
        _ => VmError::Agent(format!("{name}: {}", err.message())),
    }
}

impl AgentTransport for VmDomain {
    fn command(&self, json: &str, timeout: Duration) -> Result<String, VmError> {
        let seconds = timeout.as_secs_f64().ceil().clamp(1.0, i32::MAX as f64) as i32;
        self.raw()
            .qemu_agent_command(json, seconds, 0)
            .map_err(|err| agent_error(self.name(), err))
    }
}

/// A command to run in the guest.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExecRequest {
    /// `argv[0]`; looked up in the agent's `PATH`.
    pub path: String,
    pub args: Vec<String>,
    /// `NAME=value` entries; replace the agent's environment when given.
    pub env: Vec<String>,
    pub stdin: Option<Vec<u8>>,
    pub timeout: Duration,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExecOutput {
    pub exit_code: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// The agent caps captured output (16 MiB in QEMU's agent).
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
}

/// The `guest-exec` command.
pub fn exec_command(req: &ExecRequest) -> String {
    let mut arguments = json!({
        "path": req.path,
        "arg": req.args,
        "capture-output": true,
    });
    if !req.env.is_empty() {
        arguments["env"] = json!(req.env);
    }
    if let Some(stdin) = &req.stdin {
        arguments["input-data"] = json!(BASE64.encode(stdin));
    }
    json!({"execute": "guest-exec", "arguments": arguments}).to_string()
}

/// The `guest-exec-status` command.
pub fn status_command(pid: i64) -> String {
    json!({"execute": "guest-exec-status", "arguments": {"pid": pid}}).to_string()
}

/// The `return` member of a reply; an `error` member becomes [`VmError::Agent`].
fn reply_return(reply: &str) -> Result<Value, VmError> {
    let mut value: Value =
        serde_json::from_str(reply).map_err(|e| VmError::Agent(format!("unreadable reply {reply:?}: {e}")))?;
    if let Some(error) = value.get("error") {
        let class = error["class"].as_str().unwrap_or("Error");
        let desc = error["desc"].as_str().unwrap_or("");
        return Err(VmError::Agent(format!("{class}: {desc}")));
    }
    match value.get_mut("return") {
        Some(ret) => Ok(ret.take()),
        None => Err(VmError::Agent(format!("reply without return: {reply}"))),
    }
}

/// The PID from a `guest-exec` reply.
pub fn parse_exec_reply(reply: &str) -> Result<i64, VmError> {
    reply_return(reply)?["pid"]
        .as_i64()
        .ok_or_else(|| VmError::Agent(format!("guest-exec reply without pid: {reply}")))
}

/// A `guest-exec-status` reply: `None` while the process runs.
pub fn parse_status_reply(reply: &str) -> Result<Option<ExecOutput>, VmError> {
    let ret = reply_return(reply)?;
    if !ret["exited"]
        .as_bool()
        .ok_or_else(|| VmError::Agent(format!("guest-exec-status reply without exited: {reply}")))?
    {
        return Ok(None);
    }
    let data = |key: &str| -> Result<Vec<u8>, VmError> {
        match ret[key].as_str() {
            Some(b64) => BASE64
                .decode(b64)
                .map_err(|e| VmError::Agent(format!("bad base64 in {key}: {e}"))),
            None => Ok(Vec::new()),
        }
    };
    // Killed by a signal: the shell convention, 128 + signal.
    let exit_code = match ret["signal"].as_i64() {
        Some(signal) => 128 + signal as i32,
        None => ret["exitcode"].as_i64().unwrap_or(-1) as i32,
    };
    Ok(Some(ExecOutput {
        exit_code,
        stdout: data("out-data")?,
        stderr: data("err-data")?,
        stdout_truncated: ret["out-truncated"].as_bool().unwrap_or(false),
        stderr_truncated: ret["err-truncated"].as_bool().unwrap_or(false),
    }))
}

/// How long one agent round trip may take at most.
const ROUND_TRIP: Duration = Duration::from_secs(10);
/// libvirt counts agent timeouts in whole seconds.
const MIN_ROUND_TRIP: Duration = Duration::from_secs(1);

/// Runs a command in the guest and waits for it, up to `req.timeout`
/// (zero: no limit). On timeout the guest process keeps running: the agent
/// has no way to kill it.
pub fn exec(agent: &dyn AgentTransport, req: &ExecRequest) -> Result<ExecOutput, VmError> {
    let started = Instant::now();
    let deadline = (!req.timeout.is_zero()).then(|| started + req.timeout);
    let budget = || match deadline {
        Some(deadline) => deadline
            .saturating_duration_since(Instant::now())
            .clamp(MIN_ROUND_TRIP, ROUND_TRIP),
        None => ROUND_TRIP,
    };
    let pid = parse_exec_reply(&agent.command(&exec_command(req), budget())?)?;
    let mut pause = Duration::from_millis(10);
    loop {
        if let Some(output) = parse_status_reply(&agent.command(&status_command(pid), budget())?)? {
            return Ok(output);
        }
        if deadline.is_some_and(|deadline| Instant::now() + pause > deadline) {
            return Err(VmError::Timeout(req.timeout));
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

/// `guest-ping`: whether an agent answers.
pub fn ping(agent: &dyn AgentTransport, timeout: Duration) -> Result<(), VmError> {
    reply_return(&agent.command(r#"{"execute":"guest-ping"}"#, timeout)?).map(|_| ())
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::collections::VecDeque;

    use super::*;

    /// Replays canned replies and records the commands.
    struct Script {
        replies: RefCell<VecDeque<Result<String, VmError>>>,
        sent: RefCell<Vec<Value>>,
    }

    impl Script {
        fn new(replies: Vec<Result<&str, VmError>>) -> Script {
            Script {
                replies: RefCell::new(replies.into_iter().map(|r| r.map(str::to_string)).collect()),
                sent: RefCell::new(Vec::new()),
            }
        }
    }

    impl AgentTransport for Script {
        fn command(&self, json: &str, timeout: Duration) -> Result<String, VmError> {
            assert!(timeout > Duration::ZERO);
            self.sent.borrow_mut().push(serde_json::from_str(json).unwrap());
            self.replies
                .borrow_mut()
                .pop_front()
                .unwrap_or_else(|| Ok(r#"{"return":{"exited":false}}"#.into()))
        }
    }

    fn request() -> ExecRequest {
        ExecRequest {
            path: "sh".into(),
            args: vec!["-c".into(), "echo \"hi\"; exit 3".into()],
            env: vec!["A=1".into()],
            stdin: Some(b"in\0put".to_vec()),
            timeout: Duration::from_secs(5),
        }
    }

    #[test]
    fn encodes_guest_exec() {
        let cmd: Value = serde_json::from_str(&exec_command(&request())).unwrap();
        assert_eq!(cmd["execute"], "guest-exec");
        assert_eq!(cmd["arguments"]["path"], "sh");
        assert_eq!(cmd["arguments"]["arg"], json!(["-c", "echo \"hi\"; exit 3"]));
        assert_eq!(cmd["arguments"]["env"], json!(["A=1"]));
        assert_eq!(cmd["arguments"]["capture-output"], true);
        assert_eq!(cmd["arguments"]["input-data"], BASE64.encode(b"in\0put"));
        let bare: Value = serde_json::from_str(&exec_command(&ExecRequest {
            path: "true".into(),
            ..ExecRequest::default()
        }))
        .unwrap();
        assert!(bare["arguments"].get("env").is_none() && bare["arguments"].get("input-data").is_none());
        assert_eq!(
            serde_json::from_str::<Value>(&status_command(42)).unwrap(),
            json!({"execute": "guest-exec-status", "arguments": {"pid": 42}})
        );
    }

    #[test]
    fn decodes_replies() {
        assert_eq!(parse_exec_reply(r#"{"return":{"pid":1234}}"#).unwrap(), 1234);
        assert!(matches!(parse_exec_reply(r#"{"return":{}}"#), Err(VmError::Agent(_))));
        let err = parse_exec_reply(r#"{"error":{"class":"GenericError","desc":"Guest agent command failed"}}"#);
        assert!(matches!(err, Err(VmError::Agent(m)) if m.contains("Guest agent command failed")));
        assert_eq!(parse_status_reply(r#"{"return":{"exited":false}}"#).unwrap(), None);
        let done = parse_status_reply(
            r#"{"return":{"exitcode":3,"out-data":"aGkK","err-data":"ZXJy","exited":true,"out-truncated":true}}"#,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            done,
            ExecOutput {
                exit_code: 3,
                stdout: b"hi\n".to_vec(),
                stderr: b"err".to_vec(),
                stdout_truncated: true,
                stderr_truncated: false,
            }
        );
        let killed = parse_status_reply(r#"{"return":{"exited":true,"signal":9}}"#)
            .unwrap()
            .unwrap();
        assert_eq!(killed.exit_code, 137);
        assert!(parse_status_reply(r#"{"return":{"exited":true,"out-data":"!!"}}"#).is_err());
        assert!(parse_status_reply("not json").is_err());
    }

    #[test]
    fn polls_until_exit() {
        let agent = Script::new(vec![
            Ok(r#"{"return":{"pid":7}}"#),
            Ok(r#"{"return":{"exited":false}}"#),
            Ok(r#"{"return":{"exited":false}}"#),
            Ok(r#"{"return":{"exited":true,"exitcode":0,"out-data":"b2sK"}}"#),
        ]);
        let output = exec(&agent, &request()).unwrap();
        assert_eq!(output.stdout, b"ok\n");
        let sent = agent.sent.borrow();
        assert_eq!(sent.len(), 4);
        assert!(sent[1..].iter().all(|c| c["arguments"]["pid"] == 7));
    }

    #[test]
    fn times_out() {
        let agent = Script::new(vec![Ok(r#"{"return":{"pid":7}}"#)]);
        let mut req = request();
        req.timeout = Duration::from_millis(150);
        let started = Instant::now();
        assert!(matches!(exec(&agent, &req), Err(VmError::Timeout(t)) if t == req.timeout));
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn no_agent_is_its_own_error() {
        let agent = Script::new(vec![Err(VmError::NoAgent("not connected".into()))]);
        assert!(matches!(exec(&agent, &request()), Err(VmError::NoAgent(_))));
        let agent = Script::new(vec![Ok(r#"{"return":{}}"#)]);
        assert!(ping(&agent, Duration::from_secs(1)).is_ok());
    }
}
