//! `exec`: runs a program (`command: [argv...]`, no shell) or a shell script (`shell: "..."`, run
//! by `/bin/sh -c`) on the runner's machine.
//!
//! - The program gets a clean environment: `PATH`, `HOME` and `LANG` (from the runner, or defaults),
//!   the step's `env`, and `BATON_RUN_ID`, `BATON_STEP`, `BATON_ATTEMPT`, `BATON_IDEMPOTENCY_KEY`.
//!   Nothing else of the runner's environment (its credentials, say) is passed on.
//! - It runs in its own process group. When it times out or the step is cancelled (or the handler
//!   is dropped), the whole group gets SIGTERM, then SIGKILL 5 s later, so the processes it started
//!   die with it. Processes it leaves behind in its group when it exits are stopped the same way;
//!   a process meant to outlive the step must leave the group (`setsid`).
//! - stdout and stderr are read concurrently while it runs; the last `max_output` bytes of each are
//!   kept (the end of the output is what explains a failure).
//!
//! Failures: a non-zero exit is `exit-<N>` (permanent: a retry policy can still name the code or
//! `any`), a signal is `signal-<N>`, the timeout is `timeout` (retryable), a program that cannot be
//! started is `not-found`, and input that cannot make a command is `bad-input`.

use std::collections::VecDeque;
use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use baton_core::event::StepError;
use baton_core::shutdown::CancellationToken;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::{Map, Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

use super::{
    bad_input, duration_field, given, input_object, json_type, scalar_text, show_duration,
    tail_lines,
};
use crate::{Handler, StepContext};

const KEYS: &[&str] = &[
    "command",
    "shell",
    "env",
    "dir",
    "timeout",
    "stdin",
    "max_output",
];
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);
/// Bytes kept of stdout and of stderr, each, unless `max_output` says otherwise.
pub const DEFAULT_MAX_OUTPUT: usize = 64 * 1024;
/// The largest `max_output`: a step's outputs travel in one NATS message (1 MiB by default).
pub const MAX_MAX_OUTPUT: usize = 256 * 1024;
/// Between SIGTERM and SIGKILL.
const GRACE: Duration = Duration::from_secs(5);
/// How long to keep reading output after the process group is gone (a process that left the group
/// may hold the pipes open).
const DRAIN: Duration = Duration::from_secs(2);
const SHELL: &str = "/bin/sh";
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Lines of stderr quoted by the message of a failure.
const ERROR_LINES: usize = 20;
const ERROR_BYTES: usize = 4096;

/// The `exec` kind.
pub fn exec() -> Handler {
    Arc::new(|input: Value, ctx: StepContext| {
        Box::pin(async move {
            let spec = Spec::parse(&input)?;
            spec.check_dir().await?;
            // The process is owned by a task of its own, so that it is stopped properly (SIGTERM,
            // then SIGKILL) even when the runner drops this future on a step timeout or shutdown.
            let stop = ctx.cancel.child_token();
            let _stop_when_dropped = stop.clone().drop_guard();
            match tokio::spawn(run(spec, ctx, stop)).await {
                Ok(result) => result,
                Err(e) => Err(StepError {
                    message: format!("the exec task failed: {e}"),
                    retryable: true,
                    code: Some("runner".into()),
                }),
            }
        })
    })
}

/// A command, checked and ready to start.
#[derive(Debug)]
struct Spec {
    argv: Vec<String>,
    /// User variables (the base and Baton's are added when it starts).
    env: Vec<(String, String)>,
    dir: Option<String>,
    timeout: Duration,
    stdin: Option<Vec<u8>>,
    max_output: usize,
}

const COMMAND_FIX: &str = "write `command: [program, arg, ...]` (no shell), or `shell: \"a script\"` for a shell command line";
const ENV_FIX: &str =
    "write `env: {NAME: value}` with names of letters, digits and `_`, and string values";

impl Spec {
    fn parse(input: &Value) -> Result<Spec, StepError> {
        let object = input_object(input, "exec", KEYS)?;
        let argv = match (given(object, "command"), given(object, "shell")) {
            (Some(_), Some(_)) => {
                return Err(bad_input(
                    "command",
                    "and `with.shell` are both given",
                    "give exactly one: `command` runs a program with arguments, `shell` runs a script with /bin/sh",
                ));
            }
            (None, None) => {
                return Err(bad_input("command", "is missing", COMMAND_FIX));
            }
            (Some(Value::Array(list)), None) => {
                if list.is_empty() {
                    return Err(bad_input("command", "is an empty list", COMMAND_FIX));
                }
                let mut argv = Vec::with_capacity(list.len());
                for (i, v) in list.iter().enumerate() {
                    let field = format!("command[{i}]");
                    let arg = scalar_text(v).ok_or_else(|| {
                        bad_input(
                            &field,
                            format!("is {}", json_type(v)),
                            "arguments are strings (use `tojson` to pass a JSON value)",
                        )
                    })?;
                    if arg.contains('\0') {
                        return Err(bad_input(&field, "contains a NUL character", "remove it"));
                    }
                    argv.push(arg);
                }
                if argv[0].is_empty() {
                    return Err(bad_input(
                        "command[0]",
                        "is empty",
                        "give the program's name or path",
                    ));
                }
                argv
            }
            (Some(Value::String(_)), None) => {
                return Err(bad_input(
                    "command",
                    "is a string, not a list",
                    "write `command: [ls, -la]` (each argument an item, no shell), or `shell: \"ls -la\"` for a shell command line",
                ));
            }
            (Some(other), None) => {
                return Err(bad_input(
                    "command",
                    format!("must be a list, not {}", json_type(other)),
                    COMMAND_FIX,
                ));
            }
            (None, Some(Value::String(script))) => {
                if script.trim().is_empty() {
                    return Err(bad_input("shell", "is empty", "give the script to run"));
                }
                if script.contains('\0') {
                    return Err(bad_input("shell", "contains a NUL character", "remove it"));
                }
                vec![SHELL.to_owned(), "-c".to_owned(), script.clone()]
            }
            (None, Some(other)) => {
                return Err(bad_input(
                    "shell",
                    format!("must be a string, not {}", json_type(other)),
                    "write the script as one string (a YAML `|` block for several lines)",
                ));
            }
        };
        let mut env = Vec::new();
        match given(object, "env") {
            None => {}
            Some(Value::Object(vars)) => {
                for (name, value) in vars {
                    let field = format!("env.{name}");
                    if name.is_empty() || name.contains(['=', '\0']) {
                        return Err(bad_input(&field, "is not a valid variable name", ENV_FIX));
                    }
                    if name.starts_with("BATON_") {
                        return Err(bad_input(
                            &field,
                            "is a name Baton sets itself",
                            "use another name: BATON_RUN_ID, BATON_STEP, BATON_ATTEMPT and BATON_IDEMPOTENCY_KEY are always set",
                        ));
                    }
                    if value.is_null() {
                        continue;
                    }
                    let text = scalar_text(value).ok_or_else(|| {
                        bad_input(
                            &field,
                            format!("is {}", json_type(value)),
                            "give a string (use `tojson` to pass a JSON value)",
                        )
                    })?;
                    if text.contains('\0') {
                        return Err(bad_input(&field, "contains a NUL character", "remove it"));
                    }
                    env.push((name.clone(), text));
                }
            }
            Some(other) => {
                return Err(bad_input(
                    "env",
                    format!("must be a mapping, not {}", json_type(other)),
                    ENV_FIX,
                ));
            }
        }
        let dir = match given(object, "dir") {
            None => None,
            Some(Value::String(d)) if !d.is_empty() => Some(d.clone()),
            Some(other) => {
                return Err(bad_input(
                    "dir",
                    format!("must be a directory path, not {}", json_type(other)),
                    "give the working directory, such as `/srv/app`",
                ));
            }
        };
        let stdin = match given(object, "stdin") {
            None => None,
            Some(Value::String(s)) => Some(s.clone().into_bytes()),
            Some(other) => Some(other.to_string().into_bytes()),
        };
        let max_output = match given(object, "max_output") {
            None => DEFAULT_MAX_OUTPUT,
            Some(v) => v
                .as_u64()
                .filter(|n| *n <= MAX_MAX_OUTPUT as u64)
                .map(|n| n as usize)
                .ok_or_else(|| {
                    bad_input(
                        "max_output",
                        format!("is `{v}`"),
                        &format!(
                            "give the bytes to keep of stdout and of stderr, from 0 to {MAX_MAX_OUTPUT} (default {DEFAULT_MAX_OUTPUT})"
                        ),
                    )
                })?,
        };
        Ok(Spec {
            argv,
            env,
            dir,
            timeout: duration_field(object, "timeout", DEFAULT_TIMEOUT)?,
            stdin,
            max_output,
        })
    }

    async fn check_dir(&self) -> Result<(), StepError> {
        let Some(dir) = &self.dir else {
            return Ok(());
        };
        match tokio::fs::metadata(dir).await {
            Ok(m) if m.is_dir() => Ok(()),
            Ok(_) => Err(bad_input(
                "dir",
                format!("`{dir}` is not a directory"),
                "give the working directory of the command",
            )),
            Err(e) => Err(bad_input(
                "dir",
                format!("`{dir}` cannot be used ({e})"),
                "give a directory that exists on the runner's machine",
            )),
        }
    }

    fn program(&self) -> &str {
        &self.argv[0]
    }
}

/// The environment of the process: nothing of the runner's but `PATH`, `HOME` and `LANG`.
fn environment(spec: &Spec, ctx: &StepContext) -> Vec<(String, String)> {
    let inherited = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let mut env = vec![(
        "PATH".to_owned(),
        inherited("PATH").unwrap_or_else(|| DEFAULT_PATH.to_owned()),
    )];
    if let Some(home) = inherited("HOME") {
        env.push(("HOME".to_owned(), home));
    }
    env.push((
        "LANG".to_owned(),
        inherited("LANG").unwrap_or_else(|| "C.UTF-8".to_owned()),
    ));
    env.extend(spec.env.iter().cloned());
    env.extend([
        ("BATON_RUN_ID".to_owned(), ctx.run_id.clone()),
        ("BATON_STEP".to_owned(), ctx.step.clone()),
        ("BATON_ATTEMPT".to_owned(), ctx.attempt.to_string()),
        (
            "BATON_IDEMPOTENCY_KEY".to_owned(),
            ctx.idempotency_key.clone(),
        ),
    ]);
    if ctx.compensation {
        env.push(("BATON_COMPENSATION".to_owned(), "true".to_owned()));
    }
    env
}

/// How the wait for the process ended.
enum End {
    Exited(ExitStatus),
    TimedOut,
    Cancelled,
    WaitFailed(std::io::Error),
}

async fn run(spec: Spec, ctx: StepContext, stop: CancellationToken) -> Result<Value, StepError> {
    if stop.is_cancelled() {
        return Err(StepError {
            message: format!(
                "`{}` was not started: the step was cancelled",
                spec.program()
            ),
            retryable: true,
            code: Some("cancelled".into()),
        });
    }
    let env = environment(&spec, &ctx);
    let mut command = Command::new(spec.program());
    command
        .args(&spec.argv[1..])
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(if spec.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so that everything it starts can be signalled at once.
        .process_group(0);
    if let Some(dir) = &spec.dir {
        command.current_dir(dir);
    }
    let started = Instant::now();
    let mut child = command.spawn().map_err(|e| spawn_error(&spec, &env, e))?;
    let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) else {
        return Err(StepError {
            message: format!(
                "`{}` exited before its process id was known",
                spec.program()
            ),
            retryable: true,
            code: Some("runner".into()),
        });
    };
    let group = Pid::from_raw(pid);
    tracing::info!(
        run = %ctx.run_id, step = %ctx.step, attempt = ctx.attempt, program = %spec.program(),
        args = spec.argv.len() - 1, pid, "exec: started"
    );
    let stdout = Arc::new(Mutex::new(Tail::new(spec.max_output)));
    let stderr = Arc::new(Mutex::new(Tail::new(spec.max_output)));
    let mut readers = Vec::new();
    if let Some(pipe) = child.stdout.take() {
        readers.push(tokio::spawn(read_into(pipe, stdout.clone())));
    }
    if let Some(pipe) = child.stderr.take() {
        readers.push(tokio::spawn(read_into(pipe, stderr.clone())));
    }
    if let (Some(mut pipe), Some(data)) = (child.stdin.take(), spec.stdin.clone()) {
        // A program that does not read its input gets EPIPE here, which is not an error.
        tokio::spawn(async move {
            let _ = pipe.write_all(&data).await;
        });
    }
    let end = tokio::select! {
        status = child.wait() => match status {
            Ok(status) => End::Exited(status),
            Err(e) => End::WaitFailed(e),
        },
        _ = tokio::time::sleep(spec.timeout) => End::TimedOut,
        _ = stop.cancelled() => End::Cancelled,
    };
    // Whatever happened, nothing of the process group outlives the step.
    terminate(group, &mut child).await;
    let drain_until = tokio::time::Instant::now() + DRAIN;
    for mut reader in readers {
        if tokio::time::timeout_at(drain_until, &mut reader)
            .await
            .is_err()
        {
            reader.abort();
        }
    }
    let duration_ms = started.elapsed().as_millis() as u64;
    let (stdout, stdout_truncated) = take(&stdout);
    let (stderr, stderr_truncated) = take(&stderr);
    let program = spec.program();
    let quoted = || {
        let (stream, text) = if stderr.trim().is_empty() {
            ("stdout", &stdout)
        } else {
            ("stderr", &stderr)
        };
        let tail = tail_lines(text, ERROR_LINES, ERROR_BYTES);
        if tail.is_empty() {
            " (no output)".to_owned()
        } else if stream == "stderr" {
            format!(": {tail}")
        } else {
            format!(": (stdout) {tail}")
        }
    };
    let fail = |message: String, retryable: bool, code: String| {
        tracing::info!(
            run = %ctx.run_id, step = %ctx.step, attempt = ctx.attempt, program = %program,
            duration_ms, code = %code, "exec: failed"
        );
        Err(StepError {
            message,
            retryable,
            code: Some(code),
        })
    };
    let status = match end {
        End::Exited(status) => status,
        End::TimedOut => {
            return fail(
                format!(
                    "`{program}` timed out after {}; its process group was killed{}",
                    show_duration(spec.timeout),
                    quoted()
                ),
                true,
                "timeout".into(),
            );
        }
        End::Cancelled => {
            return fail(
                format!("`{program}` was stopped: the step was cancelled"),
                true,
                "cancelled".into(),
            );
        }
        End::WaitFailed(e) => {
            return fail(
                format!("cannot wait for `{program}`: {e}"),
                true,
                "runner".into(),
            );
        }
    };
    if let Some(signal) = status.signal() {
        let name = Signal::try_from(signal)
            .map(|s| format!(" ({})", s.as_str()))
            .unwrap_or_default();
        return fail(
            format!("{program} was killed by signal {signal}{name}{}", quoted()),
            false,
            format!("signal-{signal}"),
        );
    }
    let exit_code = status.code().unwrap_or(-1);
    if exit_code != 0 {
        return fail(
            format!("{program} exited with status {exit_code}{}", quoted()),
            false,
            format!("exit-{exit_code}"),
        );
    }
    tracing::info!(
        run = %ctx.run_id, step = %ctx.step, attempt = ctx.attempt, program = %program,
        duration_ms, "exec: succeeded"
    );
    let mut outputs = Map::new();
    outputs.insert("exit_code".into(), json!(exit_code));
    if !stdout_truncated
        && !stdout.trim().is_empty()
        && let Ok(parsed) = serde_json::from_str::<Value>(&stdout)
    {
        outputs.insert("json".into(), parsed);
    }
    outputs.insert("stdout".into(), Value::String(stdout));
    outputs.insert("stderr".into(), Value::String(stderr));
    outputs.insert("stdout_truncated".into(), Value::Bool(stdout_truncated));
    outputs.insert("stderr_truncated".into(), Value::Bool(stderr_truncated));
    outputs.insert("duration_ms".into(), json!(duration_ms));
    Ok(Value::Object(outputs))
}

fn spawn_error(spec: &Spec, env: &[(String, String)], e: std::io::Error) -> StepError {
    let program = spec.program();
    let path = env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map_or("", |(_, v)| v.as_str());
    let where_ = if program.contains('/') {
        "check the path".to_owned()
    } else {
        format!(
            "check that it is installed on the runner's machine and on PATH ({path}), or give its full path"
        )
    };
    let (problem, code, retryable) = match e.kind() {
        std::io::ErrorKind::NotFound => ("was not found", "not-found", false),
        std::io::ErrorKind::PermissionDenied => {
            ("is not executable (permission denied)", "not-found", false)
        }
        _ if e.raw_os_error() == Some(nix::libc::ENOEXEC) => (
            "is not a program this machine can run (exec format error; a script needs a `#!` line)",
            "not-found",
            false,
        ),
        _ => ("could not be started", "spawn", true),
    };
    StepError {
        message: format!("`{program}` {problem}: {where_} ({e})"),
        retryable,
        code: Some(code.into()),
    }
}

/// Stops every process of the group: SIGTERM, then SIGKILL after [`GRACE`]. Returns at once when
/// the leader has exited and nothing else of its group is left.
async fn terminate(group: Pid, child: &mut Child) {
    let mut leader_done = matches!(child.try_wait(), Ok(Some(_)));
    if leader_done && !group_alive(group).await {
        return;
    }
    let _ = killpg(group, Signal::SIGTERM);
    let deadline = Instant::now() + GRACE;
    loop {
        if !leader_done {
            leader_done = matches!(child.try_wait(), Ok(Some(_)));
        }
        if leader_done && !group_alive(group).await {
            return;
        }
        if Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tracing::debug!(
        pgid = group.as_raw(),
        "process group still alive after SIGTERM: SIGKILL"
    );
    let _ = killpg(group, Signal::SIGKILL);
    if !leader_done {
        let _ = tokio::time::timeout(GRACE, child.wait()).await;
    }
}

/// Whether a process of the group is alive. Zombies do not count: where PID 1 does not reap
/// orphans (some containers), they stay in the group after they died.
async fn group_alive(group: Pid) -> bool {
    if killpg(group, None).is_err() {
        return false;
    }
    let pgid = group.as_raw().to_string();
    tokio::task::spawn_blocking(move || {
        let Ok(entries) = std::fs::read_dir("/proc") else {
            // No /proc: the signal check above is all there is.
            return true;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pid) = name.to_str() else { continue };
            if !pid.bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            // `pid (comm) state ppid pgrp ...`; comm may hold spaces and parentheses.
            let Some((_, rest)) = stat.rsplit_once(')') else {
                continue;
            };
            let mut fields = rest.split_whitespace();
            let state = fields.next().unwrap_or("");
            let pgrp = fields.nth(1).unwrap_or("");
            if pgrp == pgid && state != "Z" && state != "X" {
                return true;
            }
        }
        false
    })
    .await
    .unwrap_or(true)
}

async fn read_into(mut pipe: impl AsyncRead + Unpin, tail: Arc<Mutex<Tail>>) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => tail
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(&buf[..n]),
        }
    }
}

fn take(tail: &Mutex<Tail>) -> (String, bool) {
    let tail = tail.lock().unwrap_or_else(|e| e.into_inner());
    (tail.text(), tail.truncated())
}

/// The last `max` bytes of a stream.
#[derive(Debug)]
struct Tail {
    buf: VecDeque<u8>,
    max: usize,
    total: u64,
}

impl Tail {
    fn new(max: usize) -> Tail {
        Tail {
            buf: VecDeque::new(),
            max,
            total: 0,
        }
    }

    fn push(&mut self, data: &[u8]) {
        self.total += data.len() as u64;
        let data = &data[data.len().saturating_sub(self.max)..];
        self.buf.extend(data);
        let excess = self.buf.len().saturating_sub(self.max);
        self.buf.drain(..excess);
    }

    fn truncated(&self) -> bool {
        self.total > self.max as u64
    }

    /// The kept bytes as text; a character cut at the start is dropped.
    fn text(&self) -> String {
        let bytes: Vec<u8> = self.buf.iter().copied().collect();
        let mut start = 0;
        if self.truncated() {
            while start < bytes.len().min(3) && bytes[start] & 0b1100_0000 == 0b1000_0000 {
                start += 1;
            }
        }
        String::from_utf8_lossy(&bytes[start..]).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_the_last_bytes() {
        let mut t = Tail::new(5);
        t.push(b"abc");
        assert_eq!((t.text(), t.truncated()), ("abc".to_owned(), false));
        t.push(b"de");
        assert_eq!((t.text(), t.truncated()), ("abcde".to_owned(), false));
        t.push(b"f");
        assert_eq!((t.text(), t.truncated()), ("bcdef".to_owned(), true));
        t.push(b"0123456789");
        assert_eq!(t.text(), "56789");
        let mut t = Tail::new(3);
        t.push("xé!".as_bytes()); // x, é (2 bytes), !
        assert_eq!(t.text(), "é!");
        let mut t = Tail::new(2);
        t.push("xé!".as_bytes()); // the first byte of é is cut: the rest of it is dropped
        assert_eq!(t.text(), "!");
        let mut t = Tail::new(0);
        t.push(b"abc");
        assert_eq!((t.text(), t.truncated()), (String::new(), true));
    }

    #[test]
    fn bad_input_names_the_field() {
        let cases = [
            (json!({}), "`with.command` is missing"),
            (json!({"command": []}), "`with.command`"),
            (json!({"command": "ls -la"}), "`shell: \"ls -la\"`"),
            (json!({"command": ["ls", {}]}), "`with.command[1]`"),
            (json!({"command": [""]}), "`with.command[0]`"),
            (json!({"command": ["ls"], "shell": "ls"}), "exactly one"),
            (json!({"shell": 3}), "`with.shell`"),
            (
                json!({"command": ["ls"], "env": {"A=B": "x"}}),
                "`with.env.A=B`",
            ),
            (
                json!({"command": ["ls"], "env": {"A": [1]}}),
                "`with.env.A`",
            ),
            (
                json!({"command": ["ls"], "env": {"BATON_STEP": "x"}}),
                "`with.env.BATON_STEP`",
            ),
            (
                json!({"command": ["ls"], "timeout": "soon"}),
                "`with.timeout`",
            ),
            (
                json!({"command": ["ls"], "max_output": -1}),
                "`with.max_output`",
            ),
            (
                json!({"command": ["ls"], "max_output": 100_000_000}),
                "`with.max_output`",
            ),
            (json!({"command": ["ls"], "dir": 1}), "`with.dir`"),
            (json!({"command": ["ls"], "cmd": 1}), "`with.cmd`"),
        ];
        for (input, expected) in cases {
            let err = Spec::parse(&input).unwrap_err();
            assert_eq!(err.code.as_deref(), Some("bad-input"), "{input}");
            assert!(
                err.message.contains(expected),
                "{input}: `{}` does not contain {expected}",
                err.message
            );
        }
    }

    #[test]
    fn numbers_are_arguments_too() {
        let spec = Spec::parse(&json!({"command": ["sleep", 5], "stdin": {"a": 1}})).unwrap();
        assert_eq!(spec.argv, ["sleep", "5"]);
        assert_eq!(spec.stdin.as_deref(), Some(&b"{\"a\":1}"[..]));
        assert_eq!(spec.timeout, DEFAULT_TIMEOUT);
        assert_eq!(spec.max_output, DEFAULT_MAX_OUTPUT);
    }
}
