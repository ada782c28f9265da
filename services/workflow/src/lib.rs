//! The Baton workflow language: YAML (or JSON) files, validated and compiled into a [`Workflow`],
//! the graph that the coordinator executes and nothing else. `docs/workflows.md` is the reference.
//!
//! ```yaml
//! name: hello
//! on:
//!   - type: com.example.greeting.requested
//! inputs:
//!   name: { type: string, default: world }
//! steps:
//!   - id: greet
//!     uses: echo
//!     with: { message: "Hello, ${{ .inputs.name }}!" }
//!   - id: shout                      # no `needs`: runs after the step above it
//!     uses: echo
//!     with: { message: "${{ .steps.greet.outputs.message | ascii_upcase }}" }
//! outputs:
//!   result: ${{ .steps.shout.outputs.message }}
//! ```
//!
//! [`compile`] reads, checks and compiles a file in one go and reports every problem it finds,
//! each with its line and column. The compiled [`Workflow`] holds pre-compiled expressions,
//! durations and step indices, so that the engine never looks at names or text again.

mod compile;
pub mod expr;
pub mod graph;
mod yaml;

use std::fmt;
use std::time::Duration;

use serde_json::Value;

pub use compile::parse_duration;
pub use expr::{Expr, Template};
pub use yaml::Pos;

/// A compiled workflow.
#[derive(Debug, Clone)]
pub struct Workflow {
    pub name: String,
    pub description: String,
    pub triggers: Vec<Trigger>,
    pub inputs: Vec<Input>,
    /// Steps in file order; `needs` refers to indices in this list.
    pub steps: Vec<Step>,
    pub outputs: Template,
    /// The run fails (and compensates) when it has not ended after this long.
    pub timeout: Option<Duration>,
    /// How many runs may be active at once, per key.
    pub concurrency: Option<Concurrency>,
    /// The secrets that steps' `with` read (`.secrets.NAME`), resolved by the runner only.
    pub secrets: Vec<String>,
}

/// A CloudEvent that starts a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trigger {
    /// The CloudEvent `type`, matched exactly.
    pub ty: String,
    /// A pattern the CloudEvent `source` must match.
    pub source: Option<Pattern>,
    /// A pattern the CloudEvent `subject` must match (an event without a subject does not).
    pub subject: Option<Pattern>,
    /// A jq condition over the event (`.id`, `.source`, `.type`, `.subject`, `.time`, `.data`
    /// and extensions); the run starts only when it is true.
    pub filter: Option<Expr>,
    /// A jq expression over the event that names its flow-control key: events with equal keys are
    /// deduplicated, debounced and rate-limited together. Without it, all events of the trigger
    /// share one key.
    pub key: Option<Expr>,
    /// How a burst of matching events with one key becomes runs.
    pub flow: Option<Flow>,
}

/// Flow control of a trigger, per key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// At most `limit` runs per key in a window of `per` that opens with the key's first run;
    /// further events in the window start nothing. `dedup: 10m` is `limit: 1, per: 10m`.
    Window { limit: u32, per: Duration },
    /// A run starts once the key has been quiet for this long, with the last event of the burst:
    /// 500 events inside the window coalesce into one run.
    Debounce(Duration),
}

impl Flow {
    /// The longest window or debounce a trigger may have: flow-control state is kept this long.
    pub const MAX: Duration = Duration::from_secs(7 * 24 * 3600);
}

impl Trigger {
    /// Whether `event` (a CloudEvent as JSON, attributes at the top and `data`) starts a run.
    pub fn matches(&self, event: &Value) -> Result<bool, expr::EvalError> {
        let attr = |name: &str| event.get(name).and_then(Value::as_str);
        if attr("type") != Some(self.ty.as_str()) {
            return Ok(false);
        }
        let fits = |pattern: &Option<Pattern>, name: &str| match pattern {
            None => true,
            Some(p) => attr(name).is_some_and(|v| p.matches(v)),
        };
        if !fits(&self.source, "source") || !fits(&self.subject, "subject") {
            return Ok(false);
        }
        match &self.filter {
            None => Ok(true),
            Some(f) => f.truthy(&expr::to_val(event)),
        }
    }
}

/// A glob over a CloudEvent attribute: `*` matches any run of characters (`/` included), `?` one
/// character; everything else matches itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern(pub String);

impl Pattern {
    pub fn matches(&self, text: &str) -> bool {
        fn go(p: &[char], t: &[char]) -> bool {
            // Iterative glob matching with one backtrack point: linear for these patterns.
            let (mut pi, mut ti, mut star, mut mark) = (0, 0, None, 0);
            while ti < t.len() {
                if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
                    pi += 1;
                    ti += 1;
                } else if pi < p.len() && p[pi] == '*' {
                    star = Some(pi);
                    mark = ti;
                    pi += 1;
                } else if let Some(s) = star {
                    pi = s + 1;
                    mark += 1;
                    ti = mark;
                } else {
                    return false;
                }
            }
            p[pi..].iter().all(|&c| c == '*')
        }
        let p: Vec<char> = self.0.chars().collect();
        let t: Vec<char> = text.chars().collect();
        go(&p, &t)
    }
}

/// A typed input of a run.
#[derive(Debug, Clone)]
pub struct Input {
    pub name: String,
    pub ty: InputType,
    pub default: Option<Value>,
    pub required: bool,
    pub description: String,
}

/// The type of a workflow input.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum InputType {
    #[default]
    Any,
    String,
    Number,
    Integer,
    Boolean,
    Object,
    Array,
}

impl InputType {
    pub const ALL: &[(&str, InputType)] = &[
        ("any", InputType::Any),
        ("string", InputType::String),
        ("number", InputType::Number),
        ("integer", InputType::Integer),
        ("boolean", InputType::Boolean),
        ("object", InputType::Object),
        ("array", InputType::Array),
    ];

    pub fn accepts(self, v: &Value) -> bool {
        match self {
            InputType::Any => true,
            InputType::String => v.is_string(),
            InputType::Number => v.is_number(),
            InputType::Integer => v.is_i64() || v.is_u64(),
            InputType::Boolean => v.is_boolean(),
            InputType::Object => v.is_object(),
            InputType::Array => v.is_array(),
        }
    }
}

impl InputType {
    /// "a string", "an integer", "any value".
    pub fn with_article(self) -> String {
        match self {
            InputType::Any => "any value".into(),
            InputType::Integer | InputType::Object | InputType::Array => format!("an {self}"),
            _ => format!("a {self}"),
        }
    }
}

impl fmt::Display for InputType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            InputType::Any => "any value",
            InputType::String => "string",
            InputType::Number => "number",
            InputType::Integer => "integer",
            InputType::Boolean => "boolean",
            InputType::Object => "object",
            InputType::Array => "array",
        })
    }
}

/// One step of the graph.
#[derive(Debug, Clone)]
pub struct Step {
    pub id: String,
    /// The step kind as it appears in subjects: a built-in's name, or a custom service's name.
    pub kind: String,
    /// The step's input (for coordinator kinds, their parameters, also compiled into `action`).
    pub with: Template,
    /// Indices of the steps this one waits for.
    pub needs: Vec<usize>,
    /// When it evaluates to false or null the step is skipped.
    pub condition: Option<Expr>,
    /// A display name.
    pub name: Option<String>,
    pub uses: Uses,
    /// What the coordinator does to execute the step.
    pub action: Action,
    /// Named outputs computed from the kind's result (`.result`); `None`: the result as is.
    pub outputs: Option<Template>,
    pub retry: Retry,
    /// Each attempt fails with a `timeout` error after this long.
    pub timeout: Option<Duration>,
    pub on_failure: OnFailure,
    /// The step that undoes this one when the run fails after it completed.
    pub compensate: Option<Compensation>,
    /// Run the step once per item of a list.
    pub for_each: Option<ForEach>,
}

/// What a step uses: a built-in kind or a custom step service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Uses {
    Builtin(Builtin),
    /// `service/<name>`: the kind token is the name.
    Service,
}

/// The built-in step kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Builtin {
    Echo,
    Http,
    Cloudevent,
    Exec,
    Nats,
    Emit,
    Sleep,
    Wait,
    Approval,
    Workflow,
}

impl Builtin {
    pub const ALL: &[Builtin] = &[
        Builtin::Echo,
        Builtin::Http,
        Builtin::Cloudevent,
        Builtin::Exec,
        Builtin::Nats,
        Builtin::Emit,
        Builtin::Sleep,
        Builtin::Wait,
        Builtin::Approval,
        Builtin::Workflow,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Builtin::Echo => "echo",
            Builtin::Http => "http",
            Builtin::Cloudevent => "cloudevent",
            Builtin::Exec => "exec",
            Builtin::Nats => "nats",
            Builtin::Emit => "emit",
            Builtin::Sleep => "sleep",
            Builtin::Wait => "wait",
            Builtin::Approval => "approval",
            Builtin::Workflow => "workflow",
        }
    }

    pub fn from_name(name: &str) -> Option<Builtin> {
        Builtin::ALL.iter().copied().find(|b| b.name() == name)
    }

    /// Kinds the coordinator executes itself (timers, waiting, sub-runs); the rest go to runners.
    pub fn runs_in_coordinator(self) -> bool {
        matches!(
            self,
            Builtin::Sleep | Builtin::Wait | Builtin::Approval | Builtin::Workflow
        )
    }
}

/// How the coordinator executes a step.
#[derive(Debug, Clone)]
pub enum Action {
    /// Publish `step.requested` for a runner of the step's kind, with `with` evaluated.
    Run,
    /// Schedule a timer.
    Sleep(Duration),
    /// Wait for a correlated CloudEvent.
    Wait(Wait),
    /// Wait for a person's decision.
    Approval(Approval),
    /// Start a run of another workflow and wait for it to end.
    Workflow(Call),
}

/// Waiting for a CloudEvent: one of type `event` (and matching `source` and `subject`) whose
/// `event_key` equals the value of `key`, evaluated when the wait starts. What counts as success is
/// `expect`.
#[derive(Debug, Clone)]
pub struct Wait {
    pub expect: Expect,
    pub event: String,
    pub source: Option<Pattern>,
    pub subject: Option<Pattern>,
    /// Over the run's context, when the wait starts.
    pub key: Template,
    /// Over each candidate event (a CloudEvent as JSON).
    pub event_key: Expr,
    pub timeout: Duration,
}

/// The outcome a wait hopes for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Expect {
    /// The event: the step completes with outputs `{"event": <the CloudEvent>}`; when `timeout`
    /// passes first, it fails with a `timeout` error.
    #[default]
    Event,
    /// No event: the step completes with outputs `{"event": null}` when `timeout` passes; an event
    /// that arrives first fails it with the error code `event-received`.
    Timeout,
}

#[derive(Debug, Clone)]
pub struct Approval {
    pub message: Template,
    /// Who may decide; empty: anyone who can signal the run.
    pub approvers: Vec<String>,
    /// Rejected when nobody decides in this time; `None`: wait until the run's timeout.
    pub timeout: Option<Duration>,
}

#[derive(Debug, Clone)]
pub struct Call {
    pub workflow: String,
    /// `None`: the version that is the head when the sub-run starts (then pinned like any run).
    pub version: Option<u64>,
    pub inputs: Template,
}

/// Retry policy of a step (or of a compensation).
#[derive(Debug, Clone, PartialEq)]
pub struct Retry {
    /// Attempts in all, the first one included; 1 means no retry.
    pub attempts: u32,
    pub backoff: Backoff,
    pub initial_delay: Duration,
    pub max_delay: Duration,
    /// Each delay is varied at random by up to this fraction of it (0 to 1).
    pub jitter: f64,
    /// Which errors are retried.
    pub on: Vec<RetryOn>,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            attempts: 1,
            backoff: Backoff::Exponential { factor: 2.0 },
            initial_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(60),
            jitter: 0.0,
            on: vec![RetryOn::Transient, RetryOn::Timeout],
        }
    }
}

impl Retry {
    /// The delay before attempt `failed + 1`, after attempt `failed` (from 1) failed. `random` is
    /// a number in [0, 1) that the caller draws (and records, so that a replay waits the same).
    pub fn delay(&self, failed: u32, random: f64) -> Duration {
        let base = match self.backoff {
            Backoff::Constant => self.initial_delay.as_secs_f64(),
            Backoff::Exponential { factor } => {
                let exponent = failed.saturating_sub(1).min(1000) as i32;
                self.initial_delay.as_secs_f64() * factor.powi(exponent)
            }
        };
        let capped = base.min(self.max_delay.as_secs_f64());
        let jittered = capped * (1.0 + self.jitter * (2.0 * random.clamp(0.0, 1.0) - 1.0));
        Duration::from_secs_f64(jittered.clamp(0.0, self.max_delay.as_secs_f64()))
    }

    /// Whether an error of this class is retried (attempts left aside).
    pub fn retries(&self, error: &ErrorClass<'_>) -> bool {
        self.on.iter().any(|on| match (on, error) {
            (RetryOn::Any, _) => true,
            (RetryOn::Timeout, ErrorClass::Timeout) => true,
            (RetryOn::Transient, ErrorClass::Transient { .. }) => true,
            (
                RetryOn::Code(c),
                ErrorClass::Transient { code: Some(code) }
                | ErrorClass::Permanent { code: Some(code) },
            ) => c == code,
            _ => false,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Backoff {
    Constant,
    Exponential { factor: f64 },
}

/// A class of errors that a retry policy names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RetryOn {
    /// Every error.
    Any,
    /// Errors the step marked as retryable.
    Transient,
    /// The attempt timed out.
    Timeout,
    /// Errors with this code, retryable or not.
    Code(String),
}

/// An error as the retry policy sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrorClass<'a> {
    Timeout,
    Transient { code: Option<&'a str> },
    Permanent { code: Option<&'a str> },
}

/// What a step's failure (after its retries) does to the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnFailure {
    /// The run fails, and completed steps are compensated.
    #[default]
    Fail,
    /// The step counts as done with status `failed`; the steps that need it run.
    Continue,
}

/// The step that undoes a completed step.
#[derive(Debug, Clone)]
pub struct Compensation {
    pub kind: String,
    pub uses: Uses,
    /// Sees the run's context; `.steps.<this step>.outputs` are the outputs being undone.
    pub with: Template,
    pub retry: Retry,
    pub timeout: Option<Duration>,
}

/// Run a step once per item of a list: `with` sees `.item` and `.index`; the step's outputs are
/// the list of each item's outputs, in order. The step fails when an item fails for good; no new
/// items are started then.
#[derive(Debug, Clone)]
pub struct ForEach {
    /// Evaluates to an array.
    pub items: Template,
    /// Items run at once, at most.
    pub parallelism: u32,
}

/// At most `limit` active runs per value of `key`.
#[derive(Debug, Clone)]
pub struct Concurrency {
    /// Over `.event`, `.inputs` and `.run`, when the run is requested.
    pub key: Template,
    pub limit: u32,
    pub on_conflict: OnConflict,
}

/// What happens to a run that would exceed the concurrency limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnConflict {
    /// It waits until a run with the same key ends.
    Queue,
    /// It ends at once as skipped.
    Skip,
    /// The oldest active run with the same key is cancelled (and compensated); this one starts.
    CancelPrevious,
}

/// One problem in a workflow file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Where, as a path such as `steps[1].needs[0]`.
    pub at: String,
    /// Where, in the file (from 1).
    pub line: u32,
    pub column: u32,
    pub message: String,
    pub hint: Option<String>,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}: {}: {}",
            self.line, self.column, self.at, self.message
        )?;
        if let Some(hint) = &self.hint {
            write!(f, " (hint: {hint})")?;
        }
        Ok(())
    }
}

/// All problems found in a workflow file, in the order of their position.
#[derive(Debug, Clone, thiserror::Error)]
pub struct Problems(pub Vec<Problem>);

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

/// Parses and compiles a workflow from YAML (JSON is YAML too). Reports every problem at once,
/// sorted by position.
pub fn compile(source: &str) -> Result<Workflow, Problems> {
    compile::compile(source)
}

impl Workflow {
    /// The run's input: the given values, with defaults filled in and types checked.
    pub fn resolve_input(&self, given: &Value) -> Result<Value, String> {
        let given = match given {
            Value::Null => serde_json::Map::new(),
            Value::Object(m) => m.clone(),
            other => return Err(format!("the input must be a JSON object, not {other}")),
        };
        for key in given.keys() {
            if !self.inputs.iter().any(|i| &i.name == key) {
                let known: Vec<_> = self.inputs.iter().map(|i| i.name.as_str()).collect();
                return Err(if known.is_empty() {
                    format!("unknown input `{key}`; this workflow takes no inputs")
                } else {
                    format!(
                        "unknown input `{key}`; this workflow takes: {}",
                        known.join(", ")
                    )
                });
            }
        }
        let mut out = serde_json::Map::new();
        for input in &self.inputs {
            match given.get(&input.name).or(input.default.as_ref()) {
                Some(v) if input.ty.accepts(v) => {
                    out.insert(input.name.clone(), v.clone());
                }
                Some(v) => {
                    return Err(format!(
                        "input `{}` must be {}, got {v}",
                        input.name,
                        input.ty.with_article()
                    ));
                }
                None if input.required => {
                    return Err(format!("input `{}` is required", input.name));
                }
                None => {}
            }
        }
        Ok(Value::Object(out))
    }

    /// The index of the step with this id.
    pub fn step(&self, id: &str) -> Option<usize> {
        self.steps.iter().position(|s| s.id == id)
    }
}

#[cfg(test)]
mod tests;
