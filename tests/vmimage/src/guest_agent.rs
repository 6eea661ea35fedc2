//! A minimal QEMU guest agent: the QGA JSON protocol (one JSON object per
//! request, `{"return": ...}` or `{"error": {"class", "desc"}}` per reply) for
//! guest-sync, guest-sync-delimited, guest-ping, guest-info, guest-exec,
//! guest-exec-status and guest-shutdown.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::{Map, Value, json};

/// Agent version reported by guest-info.
pub const VERSION: &str = concat!("podvisor-test-agent ", env!("CARGO_PKG_VERSION"));
/// Per-stream output cap, as in QEMU's agent; beyond it `*-truncated` is set.
pub const MAX_OUTPUT: usize = 16 << 20;
/// Longest request accepted before the parser resets.
const MAX_REQUEST: usize = 64 << 20;

/// (name, sends a reply on success)
const COMMANDS: &[(&str, bool)] = &[
    ("guest-sync", true),
    ("guest-sync-delimited", true),
    ("guest-ping", true),
    ("guest-info", true),
    ("guest-exec", true),
    ("guest-exec-status", true),
    ("guest-shutdown", false),
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShutdownMode {
    Powerdown,
    Halt,
    Reboot,
}

/// What to send back for one request.
#[derive(Debug, PartialEq)]
pub enum Reply {
    Json(Value),
    /// guest-sync-delimited: a 0xFF byte, then the JSON.
    Delimited(Value),
    /// guest-shutdown succeeded: no reply; the caller shuts down.
    Shutdown(ShutdownMode),
}

struct QgaError {
    class: &'static str,
    desc: String,
}

fn generic(desc: impl Into<String>) -> QgaError {
    QgaError {
        class: "GenericError",
        desc: desc.into(),
    }
}

fn invalid_param(name: &str) -> QgaError {
    generic(format!("Parameter '{name}' is missing or invalid"))
}

#[derive(Default)]
struct Stream {
    data: Vec<u8>,
    truncated: bool,
    open: bool,
}

#[derive(Default)]
struct ExecState {
    status: Option<ExitStatus>,
    out: Stream,
    err: Stream,
}

/// The agent's state: running and finished guest-exec processes by PID.
#[derive(Default)]
pub struct Agent {
    execs: Mutex<HashMap<u32, Arc<Mutex<ExecState>>>>,
}

impl Agent {
    pub fn new() -> Agent {
        Agent::default()
    }

    /// Answers one parsed request.
    pub fn handle(&self, request: &Value) -> Reply {
        let id = request.get("id").cloned();
        let with_id = |mut reply: Value| {
            if let Some(id) = &id {
                reply["id"] = id.clone();
            }
            reply
        };
        let Some(command) = request.get("execute").and_then(Value::as_str) else {
            return Reply::Json(with_id(error_json(&generic("Expected 'execute' in QMP input"))));
        };
        let empty = Value::Object(Map::new());
        let args = request.get("arguments").unwrap_or(&empty);
        let result = match command {
            "guest-sync" | "guest-sync-delimited" => match args.get("id") {
                Some(sync_id) if sync_id.is_i64() || sync_id.is_u64() => {
                    let reply = with_id(json!({"return": sync_id}));
                    return if command == "guest-sync" {
                        Reply::Json(reply)
                    } else {
                        Reply::Delimited(reply)
                    };
                }
                _ => Err(invalid_param("id")),
            },
            "guest-ping" => Ok(json!({})),
            "guest-info" => Ok(info()),
            "guest-exec" => self.exec(args),
            "guest-exec-status" => self.exec_status(args),
            "guest-shutdown" => match args.get("mode").and_then(Value::as_str).unwrap_or("powerdown") {
                "powerdown" => return Reply::Shutdown(ShutdownMode::Powerdown),
                "halt" => return Reply::Shutdown(ShutdownMode::Halt),
                "reboot" => return Reply::Shutdown(ShutdownMode::Reboot),
                other => Err(generic(format!(
                    "Parameter 'mode' expects 'halt', 'powerdown' or 'reboot', got '{other}'"
                ))),
            },
            other => Err(QgaError {
                class: "CommandNotFound",
                desc: format!("The command {other} has not been found"),
            }),
        };
        Reply::Json(with_id(match result {
            Ok(value) => json!({ "return": value }),
            Err(e) => error_json(&e),
        }))
    }

    fn exec(&self, args: &Value) -> Result<Value, QgaError> {
        let path = args
            .get("path")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid_param("path"))?;
        let strings = |name: &str| -> Result<Vec<String>, QgaError> {
            match args.get(name) {
                None | Some(Value::Null) => Ok(Vec::new()),
                Some(Value::Array(items)) => items
                    .iter()
                    .map(|v| v.as_str().map(String::from).ok_or_else(|| invalid_param(name)))
                    .collect(),
                Some(_) => Err(invalid_param(name)),
            }
        };
        let argv = strings("arg")?;
        let env = args.get("env").is_some().then(|| strings("env")).transpose()?;
        let input = match args.get("input-data").and_then(Value::as_str) {
            Some(b64) => Some(
                BASE64
                    .decode(b64)
                    .map_err(|_| generic("Invalid base64 in 'input-data'"))?,
            ),
            None => None,
        };
        // QEMU >= 8.1 also accepts an enum; a bool means none/separated.
        let capture = match args.get("capture-output") {
            None | Some(Value::Bool(false)) => "none",
            Some(Value::Bool(true)) => "separated",
            Some(Value::String(mode)) => mode.as_str(),
            Some(_) => return Err(invalid_param("capture-output")),
        };
        let (out_piped, err_piped, merged) = match capture {
            "none" => (false, false, false),
            "stdout" => (true, false, false),
            "stderr" => (false, true, false),
            "separated" => (true, true, false),
            "merged" => (true, false, true),
            _ => return Err(invalid_param("capture-output")),
        };

        let mut cmd = Command::new(path);
        cmd.args(&argv);
        if let Some(env) = env {
            cmd.env_clear();
            for var in env {
                match var.split_once('=') {
                    Some((k, v)) => cmd.env(k, v),
                    None => cmd.env(var, ""),
                };
            }
        }
        cmd.stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() });
        let mut merged_reader = None;
        if merged {
            let (reader, writer) = io::pipe().map_err(|e| generic(format!("pipe: {e}")))?;
            let writer2 = writer.try_clone().map_err(|e| generic(format!("pipe: {e}")))?;
            cmd.stdout(writer).stderr(writer2);
            merged_reader = Some(reader);
        } else {
            cmd.stdout(if out_piped { Stdio::piped() } else { Stdio::null() });
            cmd.stderr(if err_piped { Stdio::piped() } else { Stdio::null() });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| generic(format!("Failed to execute child process \u{201c}{path}\u{201d} ({e})")))?;
        // The Command still holds the merged pipe's write ends: drop them so EOF arrives.
        drop(cmd);
        let pid = child.id();
        let state = Arc::new(Mutex::new(ExecState::default()));
        if let (Some(data), Some(mut stdin)) = (input, child.stdin.take()) {
            thread::spawn(move || {
                let _ = stdin.write_all(&data);
            });
        }
        if let Some(reader) = merged_reader {
            spawn_reader(reader, &state, true);
        }
        if let Some(out) = child.stdout.take() {
            spawn_reader(out, &state, true);
        }
        if let Some(err) = child.stderr.take() {
            spawn_reader(err, &state, false);
        }
        spawn_waiter(child, &state);
        self.execs.lock().unwrap().insert(pid, state);
        Ok(json!({ "pid": pid }))
    }

    fn exec_status(&self, args: &Value) -> Result<Value, QgaError> {
        let pid = args
            .get("pid")
            .and_then(Value::as_u64)
            .and_then(|p| u32::try_from(p).ok())
            .ok_or_else(|| invalid_param("pid"))?;
        let mut execs = self.execs.lock().unwrap();
        let state = execs
            .get(&pid)
            .ok_or_else(|| generic("Invalid parameter 'pid'"))?
            .clone();
        let state = state.lock().unwrap();
        let Some(status) = state.status.filter(|_| !state.out.open && !state.err.open) else {
            return Ok(json!({"exited": false}));
        };
        let mut reply = json!({"exited": true});
        if let Some(code) = status.code() {
            reply["exitcode"] = json!(code);
        } else if let Some(signal) = status.signal() {
            reply["signal"] = json!(signal);
        }
        for (stream, data, truncated) in [
            (&state.out, "out-data", "out-truncated"),
            (&state.err, "err-data", "err-truncated"),
        ] {
            // Like qemu-ga: data and its truncation flag only for non-empty output.
            if !stream.data.is_empty() {
                reply[data] = json!(BASE64.encode(&stream.data));
                reply[truncated] = json!(stream.truncated);
            }
        }
        // Reported once, then forgotten (as QEMU does).
        execs.remove(&pid);
        Ok(reply)
    }
}

fn spawn_reader(mut pipe: impl Read + Send + 'static, state: &Arc<Mutex<ExecState>>, stdout: bool) {
    fn stream(s: &mut ExecState, stdout: bool) -> &mut Stream {
        if stdout { &mut s.out } else { &mut s.err }
    }
    let state = state.clone();
    stream(&mut state.lock().unwrap(), stdout).open = true;
    thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match pipe.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            };
            let mut s = state.lock().unwrap();
            let stream = stream(&mut s, stdout);
            let room = MAX_OUTPUT.saturating_sub(stream.data.len());
            stream.data.extend_from_slice(&buf[..n.min(room)]);
            stream.truncated |= n > room;
        }
        stream(&mut state.lock().unwrap(), stdout).open = false;
    });
}

fn spawn_waiter(mut child: Child, state: &Arc<Mutex<ExecState>>) {
    let state = state.clone();
    thread::spawn(move || {
        let status = loop {
            match child.wait() {
                Ok(status) => break status,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // Not ours to wait for any more (reaped elsewhere): report a failure.
                Err(_) => break ExitStatus::from_raw(255 << 8),
            }
        };
        state.lock().unwrap().status = Some(status);
    });
}

fn error_json(e: &QgaError) -> Value {
    json!({"error": {"class": e.class, "desc": e.desc}})
}

fn info() -> Value {
    let commands: Vec<Value> = COMMANDS
        .iter()
        .map(|(name, success_response)| json!({"name": name, "enabled": true, "success-response": success_response}))
        .collect();
    json!({"version": VERSION, "supported_commands": commands})
}

/// Splits a byte stream into top-level JSON objects. 0xFF bytes (QGA's
/// resync delimiter) and anything outside an object are skipped.
#[derive(Default)]
pub struct Splitter {
    buf: Vec<u8>,
    depth: usize,
    in_string: bool,
    escaped: bool,
}

impl Splitter {
    /// Feeds `bytes`; returns the objects completed by them.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<Vec<u8>> {
        let mut done = Vec::new();
        for &b in bytes {
            if b == 0xFF {
                // A client resync: drop any partial request.
                self.reset();
                continue;
            }
            if self.depth == 0 {
                if b == b'{' {
                    self.depth = 1;
                    self.buf.push(b);
                }
                continue;
            }
            self.buf.push(b);
            if self.in_string {
                match (self.escaped, b) {
                    (true, _) => self.escaped = false,
                    (false, b'\\') => self.escaped = true,
                    (false, b'"') => self.in_string = false,
                    _ => {}
                }
                continue;
            }
            match b {
                b'"' => self.in_string = true,
                b'{' | b'[' => self.depth += 1,
                b'}' | b']' => {
                    self.depth -= 1;
                    if self.depth == 0 {
                        done.push(std::mem::take(&mut self.buf));
                    }
                }
                _ => {}
            }
            if self.buf.len() > MAX_REQUEST {
                self.reset();
            }
        }
        done
    }

    pub fn reset(&mut self) {
        *self = Splitter::default();
    }
}

/// Reads requests from `input` and writes replies to `output` until EOF.
/// Returns the shutdown mode if guest-shutdown was requested.
pub fn serve(agent: &Agent, mut input: impl Read, mut output: impl Write) -> io::Result<Option<ShutdownMode>> {
    let mut splitter = Splitter::default();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => return Ok(None),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        for request in splitter.push(&buf[..n]) {
            let reply = match serde_json::from_slice::<Value>(&request) {
                Ok(request) => agent.handle(&request),
                Err(e) => Reply::Json(error_json(&generic(format!("JSON parse error: {e}")))),
            };
            match reply {
                Reply::Json(value) => write_reply(&mut output, &[], &value)?,
                Reply::Delimited(value) => write_reply(&mut output, &[0xFF], &value)?,
                Reply::Shutdown(mode) => return Ok(Some(mode)),
            }
        }
    }
}

fn write_reply(output: &mut impl Write, prefix: &[u8], value: &Value) -> io::Result<()> {
    let mut bytes = prefix.to_vec();
    bytes.extend_from_slice(value.to_string().as_bytes());
    bytes.push(b'\n');
    output.write_all(&bytes)?;
    output.flush()
}

/// Serves a virtio-serial port forever. While no host client is connected the
/// port reads EOF immediately, so EOF means: wait, then read again.
pub fn serve_port(path: &str, on_shutdown: impl Fn(ShutdownMode)) -> io::Result<()> {
    let agent = Agent::new();
    let port = std::fs::OpenOptions::new().read(true).write(true).open(path)?;
    loop {
        match serve(&agent, &port, &port) {
            Ok(Some(mode)) => on_shutdown(mode),
            Ok(None) => thread::sleep(Duration::from_millis(50)),
            // Host went away mid-write and similar: keep serving.
            Err(e) => {
                eprintln!("podvisor-test-agent: {path}: {e}");
                thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn call(agent: &Agent, request: Value) -> Value {
        match agent.handle(&request) {
            Reply::Json(v) | Reply::Delimited(v) => v,
            other => panic!("unexpected {other:?}"),
        }
    }

    fn wait_exit(agent: &Agent, pid: &Value) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let status = call(
                agent,
                json!({"execute": "guest-exec-status", "arguments": {"pid": pid}}),
            );
            if status["return"]["exited"] == json!(true) {
                return status["return"].clone();
            }
            assert!(Instant::now() < deadline, "never exited: {status}");
            thread::sleep(Duration::from_millis(10));
        }
    }

    fn decode(v: &Value) -> String {
        String::from_utf8(BASE64.decode(v.as_str().unwrap_or_default()).unwrap()).unwrap()
    }

    #[test]
    fn sync_ping_info_and_errors() {
        let agent = Agent::new();
        assert_eq!(
            call(&agent, json!({"execute": "guest-sync", "arguments": {"id": 1234}})),
            json!({"return": 1234})
        );
        assert_eq!(
            agent.handle(&json!({"execute": "guest-sync-delimited", "arguments": {"id": 7}})),
            Reply::Delimited(json!({"return": 7}))
        );
        assert_eq!(
            call(&agent, json!({"execute": "guest-ping", "id": "x"})),
            json!({"return": {}, "id": "x"})
        );
        let info = call(&agent, json!({"execute": "guest-info"}));
        let names: Vec<_> = info["return"]["supported_commands"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert!(names.contains(&"guest-exec-status"));
        let err = call(&agent, json!({"execute": "guest-fsfreeze-freeze"}));
        assert_eq!(err["error"]["class"], "CommandNotFound");
        let err = call(&agent, json!({"execute": "guest-exec-status", "arguments": {"pid": 1}}));
        assert_eq!(err["error"]["class"], "GenericError");
        assert_eq!(
            agent.handle(&json!({"execute": "guest-shutdown", "arguments": {"mode": "reboot"}})),
            Reply::Shutdown(ShutdownMode::Reboot)
        );
    }

    #[test]
    fn exec_captures_output_exit_code_and_stdin() {
        let agent = Agent::new();
        let started = call(
            &agent,
            json!({"execute": "guest-exec", "arguments": {
                "path": "/bin/sh", "arg": ["-c", "cat; echo hi; echo oops >&2; exit 3"],
                "input-data": BASE64.encode("from stdin\n"), "capture-output": true}}),
        );
        let status = wait_exit(&agent, &started["return"]["pid"]);
        assert_eq!(status["exitcode"], 3);
        assert_eq!(decode(&status["out-data"]), "from stdin\nhi\n");
        assert_eq!(decode(&status["err-data"]), "oops\n");
        assert_eq!(status["out-truncated"], false);
        // Reported once.
        let again = call(
            &agent,
            json!({"execute": "guest-exec-status", "arguments": {"pid": started["return"]["pid"]}}),
        );
        assert!(again.get("error").is_some());
    }

    #[test]
    fn exec_env_merged_signal_and_missing_binary() {
        let agent = Agent::new();
        let started = call(
            &agent,
            json!({"execute": "guest-exec", "arguments": {
                "path": "sh", "arg": ["-c", "echo $FOO; echo $HOME >&2"], "env": ["FOO=bar", "PATH=/bin:/usr/bin"],
                "capture-output": "merged"}}),
        );
        let status = wait_exit(&agent, &started["return"]["pid"]);
        assert_eq!(decode(&status["out-data"]), "bar\n\n");
        assert!(status.get("err-data").is_none());

        let started = call(
            &agent,
            json!({"execute": "guest-exec", "arguments": {"path": "/bin/sh", "arg": ["-c", "kill -9 $$"]}}),
        );
        let status = wait_exit(&agent, &started["return"]["pid"]);
        assert_eq!(status["signal"], 9);
        assert!(status.get("exitcode").is_none());

        let err = call(
            &agent,
            json!({"execute": "guest-exec", "arguments": {"path": "/nonexistent"}}),
        );
        assert!(err["error"]["desc"].as_str().unwrap().contains("/nonexistent"), "{err}");
    }

    #[test]
    fn exec_output_is_truncated() {
        let agent = Agent::new();
        let started = call(
            &agent,
            json!({"execute": "guest-exec", "arguments": {
                "path": "/bin/sh", "arg": ["-c", format!("head -c {} /dev/zero", MAX_OUTPUT + 10)],
                "capture-output": true}}),
        );
        let status = wait_exit(&agent, &started["return"]["pid"]);
        assert_eq!(status["out-truncated"], true);
        assert_eq!(
            BASE64.decode(status["out-data"].as_str().unwrap()).unwrap().len(),
            MAX_OUTPUT
        );
    }

    #[test]
    fn splitter_and_serve() {
        let mut s = Splitter::default();
        assert!(s.push(b"\xff\n{\"a\": \"}{\\\"\"").is_empty());
        let done = s.push(b", \"b\": [{}]}{\"c\":1}");
        assert_eq!(
            done,
            [b"{\"a\": \"}{\\\"\", \"b\": [{}]}".to_vec(), b"{\"c\":1}".to_vec()]
        );

        let input = b"{\"execute\":\"guest-sync-delimited\",\"arguments\":{\"id\":5}}\xff{\"execute\":\"guest-ping\"}nonsense{bad}";
        let mut out = Vec::new();
        assert_eq!(serve(&Agent::new(), &input[..], &mut out).unwrap(), None);
        let text = String::from_utf8_lossy(&out);
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines[0], "\u{fffd}{\"return\":5}");
        assert_eq!(lines[1], "{\"return\":{}}");
        assert!(lines[2].contains("JSON parse error"), "{text}");
        let input = b"{\"execute\":\"guest-shutdown\"}{\"execute\":\"guest-ping\"}";
        let mut out = Vec::new();
        assert_eq!(
            serve(&Agent::new(), &input[..], &mut out).unwrap(),
            Some(ShutdownMode::Powerdown)
        );
        assert!(out.is_empty());
    }
}
