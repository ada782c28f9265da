//! From the YAML tree to the [`Workflow`] graph: checks the shape of the file (the same rules as
//! `schemas/workflow.schema.json`, with better messages), then the meaning (kinds, ids, `needs`,
//! cycles, expressions and what they read), and reports every problem with its position.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::Value;

use crate::expr::{Batch, CompileError, Expr, Reference, Template, split_template};
use crate::graph;
use crate::yaml::{self, Key, Node, Pos, Source, Yaml};
use crate::{
    Action, Approval, Backoff, Builtin, Call, Compensation, Concurrency, Expect, Flow, ForEach,
    Input, InputType, OnConflict, OnFailure, Pattern, Problem, Problems, Retry, RetryOn, Step,
    Trigger, Uses, Wait, Workflow,
};

/// The keys of each mapping in the format. `schemas/workflow.schema.json` has the same lists (a
/// test checks it).
pub(crate) const WORKFLOW_KEYS: &[&str] = &[
    "name",
    "description",
    "on",
    "inputs",
    "steps",
    "outputs",
    "timeout",
    "concurrency",
];
pub(crate) const TRIGGER_KEYS: &[&str] = &[
    "type", "source", "subject", "filter", "key", "dedup", "debounce", "rate",
];
pub(crate) const RATE_KEYS: &[&str] = &["limit", "per"];
pub(crate) const INPUT_KEYS: &[&str] = &["type", "default", "required", "description"];
pub(crate) const STEP_KEYS: &[&str] = &[
    "id",
    "name",
    "uses",
    "with",
    "needs",
    "if",
    "outputs",
    "retry",
    "timeout",
    "on-failure",
    "compensate",
    "for-each",
];
pub(crate) const RETRY_KEYS: &[&str] = &[
    "attempts",
    "backoff",
    "factor",
    "initial-delay",
    "max-delay",
    "jitter",
    "on",
];
pub(crate) const COMPENSATE_KEYS: &[&str] = &["uses", "with", "retry", "timeout"];
pub(crate) const FOR_EACH_KEYS: &[&str] = &["items", "parallelism"];
pub(crate) const CONCURRENCY_KEYS: &[&str] = &["key", "limit", "on-conflict"];
pub(crate) const SLEEP_KEYS: &[&str] = &["duration"];
pub(crate) const WAIT_KEYS: &[&str] = &[
    "event",
    "source",
    "subject",
    "key",
    "event-key",
    "timeout",
    "expect",
];
pub(crate) const APPROVAL_KEYS: &[&str] = &["message", "approvers", "timeout"];
pub(crate) const WORKFLOW_CALL_KEYS: &[&str] = &["name", "version", "inputs"];

/// What `.steps.<id>` holds.
const STEP_FIELDS: &[&str] = &["outputs", "status", "error"];
const RUN_ROOTS: &[&str] = &["event", "inputs", "steps", "run"];
const ITEM_ROOTS: &[&str] = &["event", "inputs", "steps", "run", "item", "index"];
const OUTPUT_ROOTS: &[&str] = &["event", "inputs", "steps", "run", "result"];
const ITEM_OUTPUT_ROOTS: &[&str] = &["event", "inputs", "steps", "run", "item", "index", "result"];
const START_ROOTS: &[&str] = &["event", "inputs", "run"];
/// The `with` of a step (or compensation) run by a runner: secrets are resolved there.
const WITH_ROOTS: &[&str] = &["event", "inputs", "steps", "run", "secrets"];
const ITEM_WITH_ROOTS: &[&str] = &[
    "event", "inputs", "steps", "run", "item", "index", "secrets",
];

const NAME_HINT: &str = "use letters, digits, `-` and `_`";
const DURATION_HINT: &str = "write a duration such as `500ms`, `30s`, `5m`, `2h`, `1d` or `1h30m`";
const MAX_PARALLELISM: u64 = 1000;
const MAX_ATTEMPTS: u64 = 100;

pub(crate) fn compile(text: &str) -> Result<Workflow, Problems> {
    let source = Source::new(text);
    let mut diagnostics = Vec::new();
    let root = yaml::parse(&source, &mut diagnostics);
    let mut c = Compiler {
        source: &source,
        problems: Vec::new(),
        batch: Batch::default(),
        sites: Vec::new(),
        refs: Vec::new(),
        ids: HashMap::new(),
        inputs: Vec::new(),
        secrets: Default::default(),
    };
    for d in diagnostics {
        c.problem_at(d.pos, "", d.message, d.hint);
    }
    let workflow = match root {
        Ok(root) => c.workflow(&root),
        Err(d) => {
            c.problem_at(d.pos, "", d.message, d.hint);
            None
        }
    };
    c.finish(workflow)
}

/// Where an expression came from, to place the errors the batch reports later.
struct Site {
    at: String,
    node: Node,
    base: usize,
}

/// Who may read what: checked once the graph is known.
#[derive(Clone, Copy)]
struct Scope {
    /// The step whose expression this is (`None`: run level).
    step: Option<usize>,
    /// The top-level keys of the context; empty: do not check (expressions over an event).
    roots: &'static [&'static str],
    /// Whether the step's own outputs may be read (its compensation).
    own: bool,
    /// The `with` of an `emit` step: its event is stored in clear, so it may not read secrets.
    emit: bool,
}

struct RefSite {
    scope: Scope,
    refs: Vec<Reference>,
    site: Site,
}

struct Compiler<'s> {
    source: &'s Source<'s>,
    problems: Vec<Problem>,
    batch: Batch,
    /// By expression index in `batch`.
    sites: Vec<Site>,
    refs: Vec<RefSite>,
    /// Step id -> index (the first step with the id).
    ids: HashMap<String, usize>,
    inputs: Vec<String>,
    /// Secret names that `with` reads.
    secrets: std::collections::BTreeSet<String>,
}

/// A mapping of the file, checked for unknown and missing keys.
struct Obj<'n> {
    node: &'n Node,
    path: String,
}

impl<'n> Obj<'n> {
    fn entries(&self) -> &'n [(Key, Node)] {
        match &self.node.value {
            Yaml::Map(entries) => entries,
            _ => &[],
        }
    }

    fn get(&self, key: &str) -> Option<&'n Node> {
        self.entries()
            .iter()
            .find(|(k, _)| k.name == key)
            .map(|(_, v)| v)
    }

    fn key_pos(&self, key: &str) -> Pos {
        self.entries()
            .iter()
            .find(|(k, _)| k.name == key)
            .map_or(self.node.pos, |(k, _)| k.pos)
    }

    fn path(&self, key: &str) -> String {
        join(&self.path, key)
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

impl<'s> Compiler<'s> {
    fn problem_at(&mut self, pos: Pos, at: &str, message: String, hint: Option<String>) {
        self.problems.push(Problem {
            at: at.to_owned(),
            line: pos.line,
            column: pos.column,
            message,
            hint,
        });
    }

    fn problem(&mut self, node: &Node, at: &str, message: impl Into<String>, hint: Option<&str>) {
        self.problem_at(node.pos, at, message.into(), hint.map(str::to_owned));
    }

    /// A mapping with these keys; reports unknown keys (with a guess) and missing required ones.
    fn object<'n>(
        &mut self,
        node: &'n Node,
        path: &str,
        what: &str,
        keys: &[&str],
        required: &[&str],
    ) -> Option<Obj<'n>> {
        let Yaml::Map(entries) = &node.value else {
            self.problem(
                node,
                path,
                format!("{what} must be a mapping, not {}", node.kind()),
                Some(&format!("its keys are: {}", keys.join(", "))),
            );
            return None;
        };
        for (key, _) in entries {
            if !keys.contains(&key.name.as_str()) {
                let hint = match did_you_mean(&key.name, keys.iter().copied()) {
                    Some(guess) => format!("did you mean `{guess}`?"),
                    None => format!("the keys of {what} are: {}", keys.join(", ")),
                };
                self.problem_at(
                    key.pos,
                    &join(path, &key.name),
                    format!("unknown key `{}` in {what}", key.name),
                    Some(hint),
                );
            }
        }
        for key in required {
            if !entries.iter().any(|(k, _)| k.name == *key) {
                self.problem(
                    node,
                    path,
                    format!("{what} has no `{key}`"),
                    Some(&format!("add `{key}:`")),
                );
            }
        }
        Some(Obj {
            node,
            path: path.to_owned(),
        })
    }

    /// Whether `node` is a mapping (of names chosen by the author); reports it when not.
    fn mapping(&mut self, node: &Node, at: &str, what: &str) -> bool {
        if matches!(node.value, Yaml::Map(_)) {
            return true;
        }
        self.problem(
            node,
            at,
            format!(
                "{what} must be a mapping of names to values, not {}",
                node.kind()
            ),
            Some("write `name: value` lines, indented under the key"),
        );
        false
    }

    fn string<'n>(&mut self, node: &'n Node, at: &str, what: &str) -> Option<&'n str> {
        match &node.value {
            Yaml::Str(s) => Some(s),
            _ => {
                self.problem(
                    node,
                    at,
                    format!("{what} must be a string, not {}", node.kind()),
                    Some("quote the value to make it a string"),
                );
                None
            }
        }
    }

    fn name(&mut self, node: &Node, at: &str, what: &str) -> Option<String> {
        let s = self.string(node, at, what)?;
        if !is_name(s) {
            self.problem(
                node,
                at,
                format!("`{s}` is not a valid {what}"),
                Some(NAME_HINT),
            );
            return None;
        }
        Some(s.to_owned())
    }

    fn duration(&mut self, node: &Node, at: &str) -> Option<Duration> {
        let parsed = match &node.value {
            Yaml::Str(s) => parse_duration(s),
            _ => None,
        };
        if parsed.is_none() {
            let shown = match &node.value {
                Yaml::Str(s) => format!("`{s}`"),
                _ => node.kind().to_owned(),
            };
            self.problem(
                node,
                at,
                format!("{shown} is not a duration"),
                Some(DURATION_HINT),
            );
        }
        parsed
    }

    fn integer(&mut self, node: &Node, at: &str, min: u64, max: u64) -> Option<u64> {
        let n = match &node.value {
            Yaml::Number(n) => n.as_u64(),
            _ => None,
        };
        match n {
            Some(n) if (min..=max).contains(&n) => Some(n),
            _ => {
                let shown = match &node.value {
                    Yaml::Number(n) => format!("`{n}`"),
                    _ => node.kind().to_owned(),
                };
                self.problem(
                    node,
                    at,
                    format!("{shown} is not a whole number from {min} to {max}"),
                    Some(&format!("write a number such as `{}`", min.max(1))),
                );
                None
            }
        }
    }

    fn boolean(&mut self, node: &Node, at: &str) -> Option<bool> {
        match node.value {
            Yaml::Bool(b) => Some(b),
            _ => {
                self.problem(
                    node,
                    at,
                    format!("must be true or false, not {}", node.kind()),
                    Some("write `true` or `false`, without quotes"),
                );
                None
            }
        }
    }

    fn choice<T: Copy>(
        &mut self,
        node: &Node,
        at: &str,
        what: &str,
        choices: &[(&str, T)],
    ) -> Option<T> {
        let names: Vec<&str> = choices.iter().map(|(n, _)| *n).collect();
        let s = self.string(node, at, what)?;
        if let Some((_, v)) = choices.iter().find(|(n, _)| *n == s) {
            return Some(*v);
        }
        let hint = match did_you_mean(s, names.iter().copied()) {
            Some(guess) => format!("did you mean `{guess}`?"),
            None => format!("one of: {}", names.join(", ")),
        };
        self.problem_at(
            node.pos,
            at,
            format!("`{s}` is not a valid {what}"),
            Some(hint),
        );
        None
    }

    fn list<'n>(&mut self, node: &'n Node, at: &str, what: &str) -> &'n [Node] {
        match &node.value {
            Yaml::Seq(items) => items,
            _ => {
                self.problem(
                    node,
                    at,
                    format!("{what} must be a list, not {}", node.kind()),
                    Some("write `[a, b]`, or one `- item` per line"),
                );
                &[]
            }
        }
    }

    /// Compiles every string of `node` as a template.
    fn template(&mut self, node: &Node, at: &str, scope: Scope) -> Template {
        let t = match &node.value {
            Yaml::Str(s) => {
                let mut reported = Vec::new();
                let t = Template::from_str_with_refs(s, &mut self.batch, &mut |r| reported.push(r));
                for r in reported {
                    match r {
                        Ok((offset, refs)) => self.expression_added(node, at, offset, refs, scope),
                        Err((offset, e)) => self.expression_error(node, at, offset, &e),
                    }
                }
                t
            }
            Yaml::Seq(items) => Template::Array(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, n)| self.template(n, &format!("{at}[{i}]"), scope))
                    .collect(),
            ),
            Yaml::Map(entries) => Template::Object(
                entries
                    .iter()
                    .map(|(k, n)| (k.name.clone(), self.template(n, &join(at, &k.name), scope)))
                    .collect(),
            ),
            _ => Template::Literal(node.to_json()),
        };
        t.fold_literals()
    }

    /// A field that is one jq expression, written with or without `${{ }}`.
    fn expression(&mut self, node: &Node, at: &str, scope: Scope) -> Option<Expr> {
        let s = self.string(node, at, "an expression")?;
        let (offset, text) = match split_template(s) {
            Ok(pieces) => match pieces.as_slice() {
                [Err(e)] => (e.offset, e.source),
                pieces if pieces.iter().all(Result::is_ok) => {
                    let trimmed = s.trim_start();
                    (s.len() - trimmed.len(), trimmed.trim_end())
                }
                _ => {
                    self.problem(
                        node,
                        at,
                        "this must be one jq expression, not text with expressions in it",
                        Some("write the whole value as one `${{ }}`"),
                    );
                    return None;
                }
            },
            Err(open) => {
                let pos = self.source.pos_in(node, open);
                self.problem_at(
                    pos,
                    at,
                    "`${{` without a closing `}}`".into(),
                    Some("close the expression with `}}`".into()),
                );
                return None;
            }
        };
        if text.is_empty() {
            self.problem(
                node,
                at,
                "the expression is empty",
                Some("write a jq expression, such as `.inputs.ready`"),
            );
            return None;
        }
        match self.batch.add(text) {
            Ok((expr, refs)) => {
                self.expression_added(node, at, offset, refs, scope);
                Some(expr)
            }
            Err(errors) => {
                for e in errors {
                    self.expression_error(node, at, offset, &e);
                }
                None
            }
        }
    }

    fn expression_added(
        &mut self,
        node: &Node,
        at: &str,
        base: usize,
        refs: Vec<Reference>,
        scope: Scope,
    ) {
        let site = || Site {
            at: at.to_owned(),
            node: node.clone(),
            base,
        };
        self.sites.push(site());
        if !refs.is_empty() && !scope.roots.is_empty() {
            self.refs.push(RefSite {
                scope,
                refs,
                site: site(),
            });
        }
    }

    fn expression_error(&mut self, node: &Node, at: &str, base: usize, e: &CompileError) {
        let pos = self.source.pos_in(node, base + e.offset);
        self.problem_at(pos, at, e.to_string(), Some(jq_hint(e)));
    }

    fn workflow(&mut self, root: &Node) -> Option<Workflow> {
        let obj = self.object(root, "", "a workflow", WORKFLOW_KEYS, &["name", "steps"])?;
        let name = obj
            .get("name")
            .and_then(|n| self.name(n, "name", "workflow name"));
        let description = obj
            .get("description")
            .and_then(|n| self.string(n, "description", "`description`"))
            .unwrap_or_default()
            .to_owned();
        let triggers = obj.get("on").map(|n| self.triggers(n)).unwrap_or_default();
        let inputs = obj
            .get("inputs")
            .map(|n| self.inputs(n))
            .unwrap_or_default();
        self.inputs = inputs.iter().map(|i| i.name.clone()).collect();
        let step_nodes: &[Node] = match obj.get("steps") {
            Some(n) => self.list(n, "steps", "`steps`"),
            None => &[],
        };
        if obj.get("steps").is_some() && step_nodes.is_empty() {
            let at = obj.key_pos("steps");
            self.problem_at(
                at,
                "steps",
                "a workflow needs at least one step".into(),
                Some("add a step such as `- id: hello` with `uses: echo`".into()),
            );
        }
        // Ids first: `needs` and expressions may name steps further down.
        let mut id_nodes = Vec::with_capacity(step_nodes.len());
        for (i, node) in step_nodes.iter().enumerate() {
            let id_node = match &node.value {
                Yaml::Map(entries) => entries.iter().find(|(k, _)| k.name == "id").map(|(_, v)| v),
                _ => None,
            };
            let id = id_node
                .and_then(Node::as_str)
                .unwrap_or_default()
                .to_owned();
            if let Some(n) = id_node {
                if let Some(&first) = self.ids.get(&id) {
                    self.problem(
                        n,
                        &format!("steps[{i}].id"),
                        format!(
                            "step id `{id}` is used twice (first by steps[{first}], line {})",
                            step_nodes[first].pos.line
                        ),
                        Some("give every step its own id"),
                    );
                } else if !id.is_empty() {
                    self.ids.insert(id.clone(), i);
                }
            }
            id_nodes.push(id);
        }
        let steps: Vec<Option<Step>> = step_nodes
            .iter()
            .enumerate()
            .map(|(i, n)| self.step(i, n, name.as_deref()))
            .collect();
        let outputs = match obj.get("outputs") {
            Some(n) => {
                if !self.mapping(n, "outputs", "`outputs`") {
                    Template::Literal(Value::Object(Default::default()))
                } else {
                    self.template(n, "outputs", self.run_scope())
                }
            }
            None => Template::Literal(Value::Object(Default::default())),
        };
        let timeout = obj.get("timeout").and_then(|n| self.duration(n, "timeout"));
        let concurrency = obj.get("concurrency").and_then(|n| self.concurrency(n));

        let steps: Vec<Step> = steps.into_iter().collect::<Option<_>>()?;
        let needs: Vec<Vec<usize>> = steps.iter().map(|s| s.needs.clone()).collect();
        if let Some(cycle) = graph::find_cycle(&needs) {
            let names: Vec<_> = cycle.iter().map(|&i| steps[i].id.as_str()).collect();
            let first = cycle[0];
            let node = &step_nodes[first];
            let pos = match &node.value {
                Yaml::Map(e) => e
                    .iter()
                    .find(|(k, _)| k.name == "needs")
                    .map_or(node.pos, |(k, _)| k.pos),
                _ => node.pos,
            };
            self.problem_at(
                pos,
                &format!("steps[{first}].needs"),
                format!(
                    "the steps depend on each other in a cycle: {}",
                    names.join(" -> ")
                ),
                Some("remove one of these `needs`".into()),
            );
        } else {
            self.check_references(&steps, &needs);
        }
        Some(Workflow {
            name: name?,
            description,
            triggers,
            inputs,
            steps,
            outputs,
            timeout,
            concurrency,
            secrets: std::mem::take(&mut self.secrets).into_iter().collect(),
        })
    }

    /// Step ids in file order.
    fn sorted_ids(&self) -> Vec<&str> {
        let mut ids: Vec<(&str, usize)> = self.ids.iter().map(|(k, &v)| (k.as_str(), v)).collect();
        ids.sort_by_key(|&(_, i)| i);
        ids.into_iter().map(|(k, _)| k).collect()
    }

    fn run_scope(&self) -> Scope {
        Scope {
            step: None,
            roots: RUN_ROOTS,
            own: false,
            emit: false,
        }
    }

    fn triggers(&mut self, node: &Node) -> Vec<Trigger> {
        let items: Vec<(String, &Node)> = match &node.value {
            Yaml::Seq(items) => items
                .iter()
                .enumerate()
                .map(|(i, n)| (format!("on[{i}]"), n))
                .collect(),
            _ => vec![("on".to_owned(), node)],
        };
        let mut triggers = Vec::new();
        for (at, n) in items {
            if let Yaml::Str(ty) = &n.value {
                if let Some(ty) = self.event_type(n, &at) {
                    triggers.push(Trigger {
                        ty,
                        source: None,
                        subject: None,
                        filter: None,
                        key: None,
                        flow: None,
                    });
                } else {
                    let _ = ty;
                }
                continue;
            }
            let Some(obj) = self.object(n, &at, "a trigger", TRIGGER_KEYS, &["type"]) else {
                continue;
            };
            let ty = obj
                .get("type")
                .and_then(|n| self.event_type(n, &obj.path("type")));
            let source = self.pattern(&obj, "source");
            let subject = self.pattern(&obj, "subject");
            let event_scope = Scope {
                step: None,
                roots: &[],
                own: false,
                emit: false,
            };
            let filter = obj
                .get("filter")
                .and_then(|n| self.expression(n, &obj.path("filter"), event_scope));
            let key = obj
                .get("key")
                .and_then(|n| self.expression(n, &obj.path("key"), event_scope));
            let flow = self.flow(&obj);
            if let Some(ty) = ty {
                triggers.push(Trigger {
                    ty,
                    source,
                    subject,
                    filter,
                    key,
                    flow: flow.unwrap_or_default(),
                });
            }
        }
        triggers
    }

    /// A trigger's `dedup`, `debounce` or `rate`: at most one of them. `None` when one is invalid.
    fn flow(&mut self, obj: &Obj<'_>) -> Option<Option<Flow>> {
        let given: Vec<(&str, &Node)> = ["dedup", "debounce", "rate"]
            .into_iter()
            .filter_map(|k| obj.get(k).map(|n| (k, n)))
            .collect();
        let (name, node) = match given.as_slice() {
            [] => return Some(None),
            [one] => *one,
            [_, (second, node), ..] => {
                self.problem(
                    node,
                    &obj.path(second),
                    format!(
                        "a trigger takes one of `dedup`, `debounce` and `rate`, not {}",
                        given.iter().map(|(k, _)| format!("`{k}`")).collect::<Vec<_>>().join(" and ")
                    ),
                    Some("dedup starts the first run of a burst at once, debounce starts one run after the burst, rate allows N runs per period: choose one"),
                );
                return None;
            }
        };
        let at = obj.path(name);
        let flow = match name {
            "dedup" => Flow::Window {
                limit: 1,
                per: self.duration(node, &at)?,
            },
            "debounce" => Flow::Debounce(self.duration(node, &at)?),
            _ => {
                let rate = self.object(node, &at, "`rate`", RATE_KEYS, &["limit", "per"])?;
                let limit = rate
                    .get("limit")
                    .and_then(|n| self.integer(n, &rate.path("limit"), 1, 1_000_000));
                let per = rate
                    .get("per")
                    .and_then(|n| self.duration(n, &rate.path("per")));
                Flow::Window {
                    limit: limit? as u32,
                    per: per?,
                }
            }
        };
        let length = match flow {
            Flow::Window { per, .. } => per,
            Flow::Debounce(d) => d,
        };
        if length.is_zero() || length > Flow::MAX {
            self.problem(
                node,
                &at,
                format!("`{name}` must be longer than 0 and at most 7 days"),
                Some(DURATION_HINT),
            );
            return None;
        }
        Some(Some(flow))
    }

    /// A glob on a CloudEvent attribute (`source`, `subject`), if given.
    fn pattern(&mut self, obj: &Obj<'_>, key: &str) -> Option<Pattern> {
        let node = obj.get(key)?;
        self.string(node, &obj.path(key), &format!("`{key}`"))
            .map(|s| Pattern(s.to_owned()))
    }

    fn event_type(&mut self, node: &Node, at: &str) -> Option<String> {
        let s = self.string(node, at, "an event type")?;
        if s.is_empty() || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            self.problem(
                node,
                at,
                format!("`{s}` is not a CloudEvent type"),
                Some("a type is a non-empty string without spaces, such as `com.github.release.published`"),
            );
            return None;
        }
        Some(s.to_owned())
    }

    fn inputs(&mut self, node: &Node) -> Vec<Input> {
        if !self.mapping(node, "inputs", "`inputs`") {
            return Vec::new();
        }
        let obj = Obj {
            node,
            path: "inputs".into(),
        };
        let mut inputs = Vec::new();
        for (key, spec) in obj.entries() {
            let at = format!("inputs.{}", key.name);
            if !is_name(&key.name) {
                self.problem_at(
                    key.pos,
                    &at,
                    format!("`{}` is not a valid input name", key.name),
                    Some(NAME_HINT.into()),
                );
            }
            if matches!(spec.value, Yaml::Null) {
                inputs.push(Input {
                    name: key.name.clone(),
                    ty: InputType::Any,
                    default: None,
                    required: true,
                    description: String::new(),
                });
                continue;
            }
            let Some(spec_obj) = self.object(spec, &at, "an input", INPUT_KEYS, &[]) else {
                continue;
            };
            let ty = spec_obj
                .get("type")
                .and_then(|n| self.choice(n, &spec_obj.path("type"), "input type", InputType::ALL))
                .unwrap_or_default();
            let default = spec_obj.get("default").map(|n| {
                let v = n.to_json();
                if !ty.accepts(&v) {
                    self.problem(
                        n,
                        &spec_obj.path("default"),
                        format!(
                            "the default of input `{}` must be {}, not {}",
                            key.name,
                            ty.with_article(),
                            n.kind()
                        ),
                        Some("change the default, or the input's `type`"),
                    );
                }
                v
            });
            let required = spec_obj
                .get("required")
                .and_then(|n| self.boolean(n, &spec_obj.path("required")))
                .unwrap_or(true);
            let description = spec_obj
                .get("description")
                .and_then(|n| self.string(n, &spec_obj.path("description"), "`description`"))
                .unwrap_or_default()
                .to_owned();
            inputs.push(Input {
                name: key.name.clone(),
                ty,
                required: required && default.is_none(),
                default,
                description,
            });
        }
        inputs
    }

    fn concurrency(&mut self, node: &Node) -> Option<Concurrency> {
        let obj = self.object(
            node,
            "concurrency",
            "`concurrency`",
            CONCURRENCY_KEYS,
            &["key"],
        )?;
        let scope = Scope {
            step: None,
            roots: START_ROOTS,
            own: false,
            emit: false,
        };
        let key = obj
            .get("key")
            .map(|n| self.template(n, "concurrency.key", scope));
        let limit = match obj.get("limit") {
            Some(n) => self
                .integer(n, "concurrency.limit", 1, 10_000)
                .map(|n| n as u32),
            None => Some(1),
        };
        let on_conflict = match obj.get("on-conflict") {
            Some(n) => self.choice(
                n,
                "concurrency.on-conflict",
                "`on-conflict`",
                &[
                    ("queue", OnConflict::Queue),
                    ("skip", OnConflict::Skip),
                    ("cancel-previous", OnConflict::CancelPrevious),
                ],
            ),
            None => Some(OnConflict::Queue),
        };
        Some(Concurrency {
            key: key?,
            limit: limit?,
            on_conflict: on_conflict?,
        })
    }

    /// `uses`: a built-in kind or `service/<name>`. Returns the kind token too.
    fn uses(&mut self, node: &Node, at: &str) -> Option<(Uses, String)> {
        let s = self.string(node, at, "`uses`")?;
        if let Some(service) = s.strip_prefix("service/") {
            if !is_name(service) {
                self.problem(
                    node,
                    at,
                    format!("`{service}` is not a valid step service name"),
                    Some(NAME_HINT),
                );
                return None;
            }
            if Builtin::from_name(service).is_some() {
                self.problem(
                    node,
                    at,
                    format!("the step service name `{service}` is the name of a built-in kind"),
                    Some(&format!(
                        "write `uses: {service}` for the built-in, or give your service another name"
                    )),
                );
                return None;
            }
            return Some((Uses::Service, service.to_owned()));
        }
        if let Some(b) = Builtin::from_name(s) {
            return Some((Uses::Builtin(b), s.to_owned()));
        }
        let names: Vec<&str> = Builtin::ALL.iter().map(|b| b.name()).collect();
        let hint = match did_you_mean(s, names.iter().copied()) {
            Some(guess) => format!("did you mean `{guess}`?"),
            None => format!(
                "built-in kinds: {}; a custom step service is written `service/{s}`",
                names.join(", ")
            ),
        };
        self.problem_at(node.pos, at, format!("unknown step kind `{s}`"), Some(hint));
        None
    }

    fn step(&mut self, i: usize, node: &Node, workflow: Option<&str>) -> Option<Step> {
        let path = format!("steps[{i}]");
        let obj = self.object(node, &path, "a step", STEP_KEYS, &["id", "uses"])?;
        let id = obj
            .get("id")
            .and_then(|n| self.name(n, &obj.path("id"), "step id"));
        let display = obj
            .get("name")
            .and_then(|n| self.string(n, &obj.path("name"), "`name`"))
            .map(str::to_owned);
        let uses = obj
            .get("uses")
            .and_then(|n| self.uses(n, &obj.path("uses")));
        let for_each_node = obj.get("for-each");
        let (roots, output_roots) = if for_each_node.is_some() {
            (ITEM_ROOTS, ITEM_OUTPUT_ROOTS)
        } else {
            (RUN_ROOTS, OUTPUT_ROOTS)
        };
        let scope = Scope {
            step: Some(i),
            roots,
            own: false,
            emit: false,
        };
        let run_scope = Scope {
            step: Some(i),
            roots: RUN_ROOTS,
            own: false,
            emit: false,
        };
        let needs = match obj.get("needs") {
            // Without `needs`, a step runs after the one above it.
            None => i.checked_sub(1).into_iter().collect(),
            Some(n) => self.needs(n, &obj.path("needs"), i),
        };
        let condition = obj
            .get("if")
            .and_then(|n| self.expression(n, &obj.path("if"), run_scope));
        let with_node = obj.get("with");
        let with_at = obj.path("with");
        let (with, action) = match (&uses, with_node) {
            (Some((Uses::Builtin(b), _)), _) if b.runs_in_coordinator() => {
                let b = *b;
                let empty = Node {
                    pos: obj.key_pos("uses"),
                    value: Yaml::Map(Vec::new()),
                    raw: 0..0,
                };
                let with_node = with_node.unwrap_or(&empty);
                let action = self.coordinator_action(b, with_node, &with_at, scope, workflow);
                (Template::Literal(with_node.to_json()), action)
            }
            (_, Some(n)) => {
                if !matches!(n.value, Yaml::Map(_) | Yaml::Null) {
                    self.problem(
                        n,
                        &with_at,
                        format!("`with` must be a mapping of inputs, not {}", n.kind()),
                        Some("write `with:` followed by `name: value` lines"),
                    );
                }
                let with_scope = Scope {
                    roots: if for_each_node.is_some() {
                        ITEM_WITH_ROOTS
                    } else {
                        WITH_ROOTS
                    },
                    emit: matches!(uses, Some((Uses::Builtin(Builtin::Emit), _))),
                    ..scope
                };
                (self.template(n, &with_at, with_scope), Some(Action::Run))
            }
            (_, None) => (
                Template::Literal(Value::Object(Default::default())),
                Some(Action::Run),
            ),
        };
        let outputs = obj.get("outputs").and_then(|n| {
            if !self.mapping(n, &obj.path("outputs"), "`outputs`") {
                return None;
            }
            Some(self.template(
                n,
                &obj.path("outputs"),
                Scope {
                    step: Some(i),
                    roots: output_roots,
                    own: false,
                    emit: false,
                },
            ))
        });
        let retry = match obj.get("retry") {
            Some(n) => self.retry(n, &obj.path("retry")),
            None => Some(Retry::default()),
        };
        let timeout = obj
            .get("timeout")
            .and_then(|n| self.duration(n, &obj.path("timeout")));
        let on_failure = match obj.get("on-failure") {
            Some(n) => self.choice(
                n,
                &obj.path("on-failure"),
                "`on-failure`",
                &[("fail", OnFailure::Fail), ("continue", OnFailure::Continue)],
            ),
            None => Some(OnFailure::Fail),
        };
        let compensate = obj
            .get("compensate")
            .map(|n| self.compensation(n, &obj.path("compensate"), i, for_each_node.is_some()));
        let for_each = for_each_node.map(|n| self.for_each(n, &obj.path("for-each"), i));
        let (uses, kind) = uses?;
        Some(Step {
            id: id?,
            kind,
            with,
            needs,
            condition,
            name: display,
            uses,
            action: action?,
            outputs,
            retry: retry?,
            timeout,
            on_failure: on_failure?,
            compensate: compensate.map_or(Some(None), |c| c.map(Some))?,
            for_each: for_each.map_or(Some(None), |f| f.map(Some))?,
        })
    }

    fn needs(&mut self, node: &Node, at: &str, i: usize) -> Vec<usize> {
        let items: Vec<(String, &Node)> = match &node.value {
            Yaml::Str(_) => vec![(at.to_owned(), node)],
            Yaml::Seq(items) => items
                .iter()
                .enumerate()
                .map(|(j, n)| (format!("{at}[{j}]"), n))
                .collect(),
            _ => {
                self.problem(
                    node,
                    at,
                    format!("`needs` must be a list of step ids, not {}", node.kind()),
                    Some("write `needs: [build, test]`, or `needs: []` to start at once"),
                );
                return Vec::new();
            }
        };
        let mut needs = Vec::new();
        for (at, n) in items {
            let Some(name) = self.string(n, &at, "a step id") else {
                continue;
            };
            match self.ids.get(name) {
                Some(&j) if j == i => self.problem(
                    n,
                    &at,
                    format!("step `{name}` needs itself"),
                    Some("remove it from its own `needs`"),
                ),
                Some(&j) => {
                    if !needs.contains(&j) {
                        needs.push(j);
                    }
                }
                None => {
                    let hint = match did_you_mean(name, self.ids.keys().map(String::as_str)) {
                        Some(g) => format!("did you mean `{g}`?"),
                        None => format!("the step ids are: {}", self.sorted_ids().join(", ")),
                    };
                    self.problem_at(
                        n.pos,
                        &at,
                        format!("`needs` names `{name}`, but no step has that id"),
                        Some(hint),
                    );
                }
            }
        }
        needs
    }

    fn retry(&mut self, node: &Node, at: &str) -> Option<Retry> {
        let mut retry = Retry::default();
        if let Yaml::Number(_) = node.value {
            retry.attempts = self.integer(node, at, 1, MAX_ATTEMPTS)? as u32;
            return Some(retry);
        }
        let obj = self.object(node, at, "`retry`", RETRY_KEYS, &["attempts"])?;
        let mut ok = true;
        if let Some(n) = obj.get("attempts") {
            match self.integer(n, &obj.path("attempts"), 1, MAX_ATTEMPTS) {
                Some(a) => retry.attempts = a as u32,
                None => ok = false,
            }
        }
        let factor = match obj.get("factor") {
            Some(n) => match &n.value {
                Yaml::Number(f) if f.as_f64().is_some_and(|f| (1.0..=10.0).contains(&f)) => {
                    f.as_f64()
                }
                _ => {
                    self.problem(
                        n,
                        &obj.path("factor"),
                        "`factor` must be a number from 1 to 10",
                        Some("each delay is the previous one times `factor`; 2 is usual"),
                    );
                    None
                }
            },
            None => Some(2.0),
        };
        match obj.get("backoff") {
            Some(n) => match self.choice(
                n,
                &obj.path("backoff"),
                "backoff",
                &[("constant", false), ("exponential", true)],
            ) {
                Some(true) => {
                    retry.backoff = Backoff::Exponential {
                        factor: factor.unwrap_or(2.0),
                    }
                }
                Some(false) => {
                    retry.backoff = Backoff::Constant;
                    if let Some(f) = obj.get("factor") {
                        self.problem(
                            f,
                            &obj.path("factor"),
                            "`factor` applies only to `backoff: exponential`",
                            Some("remove `factor`, or use exponential backoff"),
                        );
                    }
                }
                None => ok = false,
            },
            None => {
                retry.backoff = Backoff::Exponential {
                    factor: factor.unwrap_or(2.0),
                }
            }
        }
        ok &= factor.is_some();
        if let Some(n) = obj.get("initial-delay") {
            match self.duration(n, &obj.path("initial-delay")) {
                Some(d) => retry.initial_delay = d,
                None => ok = false,
            }
        }
        if let Some(n) = obj.get("max-delay") {
            match self.duration(n, &obj.path("max-delay")) {
                Some(d) if d < retry.initial_delay => {
                    self.problem(
                        n,
                        &obj.path("max-delay"),
                        "`max-delay` is shorter than `initial-delay`",
                        Some("make `max-delay` at least `initial-delay`"),
                    );
                    ok = false;
                }
                Some(d) => retry.max_delay = d,
                None => ok = false,
            }
        } else {
            retry.max_delay = retry.max_delay.max(retry.initial_delay);
        }
        if let Some(n) = obj.get("jitter") {
            match n.value {
                Yaml::Number(ref j) if j.as_f64().is_some_and(|j| (0.0..=1.0).contains(&j)) => {
                    retry.jitter = j.as_f64().unwrap_or(0.0);
                }
                _ => {
                    self.problem(
                        n,
                        &obj.path("jitter"),
                        "`jitter` must be a number from 0 to 1 (a fraction of the delay)",
                        Some("`jitter: 0.2` varies each delay by up to 20% either way"),
                    );
                    ok = false;
                }
            }
        }
        if let Some(n) = obj.get("on") {
            let at = obj.path("on");
            let mut on = Vec::new();
            for (j, item) in self.list(n, &at, "`on`").iter().enumerate() {
                let Some(s) = self.string(item, &format!("{at}[{j}]"), "an error class") else {
                    ok = false;
                    continue;
                };
                on.push(match s {
                    "any" => RetryOn::Any,
                    "transient" => RetryOn::Transient,
                    "timeout" => RetryOn::Timeout,
                    code if is_name(code) => RetryOn::Code(code.to_owned()),
                    other => {
                        self.problem(
                            item,
                            &format!("{at}[{j}]"),
                            format!("`{other}` is not an error class or code"),
                            Some("use `transient`, `timeout`, `any`, or an error code made of letters, digits, `-` and `_`"),
                        );
                        ok = false;
                        continue;
                    }
                });
            }
            retry.on = on;
        }
        ok.then_some(retry)
    }

    fn compensation(
        &mut self,
        node: &Node,
        at: &str,
        step: usize,
        for_each: bool,
    ) -> Option<Compensation> {
        let obj = self.object(node, at, "`compensate`", COMPENSATE_KEYS, &["uses"])?;
        let uses = obj.get("uses").and_then(|n| {
            let (u, kind) = self.uses(n, &obj.path("uses"))?;
            if let Uses::Builtin(b) = u
                && b.runs_in_coordinator()
            {
                self.problem(
                    n,
                    &obj.path("uses"),
                    format!("a compensation cannot use `{}`", b.name()),
                    Some("compensate with a kind that does something: `http`, `exec`, a step service, ..."),
                );
                return None;
            }
            Some((u, kind))
        });
        let scope = Scope {
            step: Some(step),
            roots: if for_each {
                ITEM_WITH_ROOTS
            } else {
                WITH_ROOTS
            },
            own: true,
            emit: matches!(uses, Some((Uses::Builtin(Builtin::Emit), _))),
        };
        let with = match obj.get("with") {
            Some(n) => self.template(n, &obj.path("with"), scope),
            None => Template::Literal(Value::Object(Default::default())),
        };
        let retry = match obj.get("retry") {
            Some(n) => self.retry(n, &obj.path("retry")),
            None => Some(Retry::default()),
        };
        let timeout = obj
            .get("timeout")
            .and_then(|n| self.duration(n, &obj.path("timeout")));
        let (uses, kind) = uses?;
        Some(Compensation {
            kind,
            uses,
            with,
            retry: retry?,
            timeout,
        })
    }

    fn for_each(&mut self, node: &Node, at: &str, step: usize) -> Option<ForEach> {
        let obj = self.object(node, at, "`for-each`", FOR_EACH_KEYS, &["items"])?;
        let items = obj.get("items").map(|n| {
            if !matches!(n.value, Yaml::Str(_) | Yaml::Seq(_)) {
                self.problem(
                    n,
                    &obj.path("items"),
                    format!("`items` must be a list or an expression, not {}", n.kind()),
                    Some("write a list, or an expression such as `${{ .inputs.hosts }}`"),
                );
            }
            self.template(
                n,
                &obj.path("items"),
                Scope {
                    step: Some(step),
                    roots: RUN_ROOTS,
                    own: false,
                    emit: false,
                },
            )
        });
        if let Some(Template::Literal(v)) = &items
            && !v.is_array()
            && let Some(n) = obj.get("items")
            && matches!(n.value, Yaml::Str(_))
        {
            self.problem(
                n,
                &obj.path("items"),
                "`items` is a string without an expression",
                Some("write a list, or an expression such as `${{ .inputs.hosts }}`"),
            );
        }
        let parallelism = match obj.get("parallelism") {
            Some(n) => self
                .integer(n, &obj.path("parallelism"), 1, MAX_PARALLELISM)
                .map(|p| p as u32),
            None => Some(10),
        };
        Some(ForEach {
            items: items?,
            parallelism: parallelism?,
        })
    }

    fn coordinator_action(
        &mut self,
        kind: Builtin,
        with: &Node,
        at: &str,
        scope: Scope,
        workflow: Option<&str>,
    ) -> Option<Action> {
        let what = format!("`with` of `{}`", kind.name());
        match kind {
            Builtin::Sleep => {
                let obj = self.object(with, at, &what, SLEEP_KEYS, &["duration"])?;
                let d = self.duration(obj.get("duration")?, &obj.path("duration"))?;
                Some(Action::Sleep(d))
            }
            Builtin::Wait => {
                let obj = self.object(
                    with,
                    at,
                    &what,
                    WAIT_KEYS,
                    &["event", "key", "event-key", "timeout"],
                )?;
                let event = obj
                    .get("event")
                    .and_then(|n| self.event_type(n, &obj.path("event")));
                let source = self.pattern(&obj, "source");
                let subject = self.pattern(&obj, "subject");
                let key = obj
                    .get("key")
                    .map(|n| self.template(n, &obj.path("key"), scope));
                let event_scope = Scope {
                    step: None,
                    roots: &[],
                    own: false,
                    emit: false,
                };
                let event_key = obj
                    .get("event-key")
                    .and_then(|n| self.expression(n, &obj.path("event-key"), event_scope));
                let timeout = obj
                    .get("timeout")
                    .and_then(|n| self.duration(n, &obj.path("timeout")));
                let expect = match obj.get("expect") {
                    Some(n) => self.choice(
                        n,
                        &obj.path("expect"),
                        "`expect`",
                        &[("event", Expect::Event), ("timeout", Expect::Timeout)],
                    ),
                    None => Some(Expect::Event),
                };
                Some(Action::Wait(Wait {
                    expect: expect?,
                    event: event?,
                    source,
                    subject,
                    key: key?,
                    event_key: event_key?,
                    timeout: timeout?,
                }))
            }
            Builtin::Approval => {
                let obj = self.object(with, at, &what, APPROVAL_KEYS, &["message"])?;
                let message = obj
                    .get("message")
                    .map(|n| self.template(n, &obj.path("message"), scope));
                let mut approvers = Vec::new();
                if let Some(n) = obj.get("approvers") {
                    let at = obj.path("approvers");
                    for (j, item) in self.list(n, &at, "`approvers`").iter().enumerate() {
                        if let Some(s) = self.string(item, &format!("{at}[{j}]"), "an approver") {
                            approvers.push(s.to_owned());
                        }
                    }
                }
                let timeout = obj
                    .get("timeout")
                    .and_then(|n| self.duration(n, &obj.path("timeout")));
                Some(Action::Approval(Approval {
                    message: message?,
                    approvers,
                    timeout,
                }))
            }
            Builtin::Workflow => {
                let obj = self.object(with, at, &what, WORKFLOW_CALL_KEYS, &["name"])?;
                let name_node = obj.get("name")?;
                let name = self.name(name_node, &obj.path("name"), "workflow name")?;
                if Some(name.as_str()) == workflow {
                    self.problem(
                        name_node,
                        &obj.path("name"),
                        format!("workflow `{name}` calls itself"),
                        Some("a workflow cannot start a run of itself: that could never end"),
                    );
                    return None;
                }
                let version = match obj.get("version") {
                    Some(n) => Some(self.integer(n, &obj.path("version"), 1, u64::MAX >> 1)?),
                    None => None,
                };
                let inputs = match obj.get("inputs") {
                    Some(n) => {
                        self.mapping(n, &obj.path("inputs"), "`inputs`");
                        self.template(n, &obj.path("inputs"), scope)
                    }
                    None => Template::Literal(Value::Object(Default::default())),
                };
                Some(Action::Workflow(Call {
                    workflow: name,
                    version,
                    inputs,
                }))
            }
            _ => Some(Action::Run),
        }
    }

    /// Checks every context path that expressions read, now that the graph is known.
    fn check_references(&mut self, steps: &[Step], needs: &[Vec<usize>]) {
        let upstream = graph::ancestors(needs);
        let ids: Vec<&str> = steps.iter().map(|s| s.id.as_str()).collect();
        for site in std::mem::take(&mut self.refs) {
            for r in &site.refs {
                let pos = |c: &Self, offset: usize| {
                    c.source.pos_in(&site.site.node, site.site.base + offset)
                };
                let (root, root_at) = (&r.root.0, r.root.1);
                if !site.scope.roots.contains(&root.as_str()) {
                    let hint = match root.as_str() {
                        "item" | "index" => {
                            "`.item` and `.index` exist only in a step with `for-each`".to_owned()
                        }
                        "result" => "`.result` exists only in a step's `outputs`".to_owned(),
                        "steps" if site.scope.roots == START_ROOTS => {
                            "no step has run when the concurrency key is evaluated".to_owned()
                        }
                        _ => match did_you_mean(root, site.scope.roots.iter().copied()) {
                            Some(g) => format!("did you mean `.{g}`?"),
                            None => format!(
                                "the context here has: {}",
                                site.scope
                                    .roots
                                    .iter()
                                    .map(|r| format!(".{r}"))
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            ),
                        },
                    };
                    let p = pos(self, root_at);
                    self.problem_at(
                        p,
                        &site.site.at,
                        format!("`.{root}` is not in the context of this expression"),
                        Some(hint),
                    );
                    continue;
                }
                if root == "secrets" && site.scope.emit {
                    let p = pos(self, root_at);
                    self.problem_at(
                        p,
                        &site.site.at,
                        "an `emit` step cannot read secrets: its event is stored in clear in \
                         BATON_EVENTS and handed to every workflow it starts"
                            .into(),
                        Some(
                            "send what the receiver needs to know, not the secret: the step that \
                             uses the secret (`http`, `exec`, a step service) reads `.secrets.<name>` \
                             in its own `with`"
                                .into(),
                        ),
                    );
                    continue;
                }
                if root == "secrets" {
                    match &r.key {
                        Some((name, _))
                            if name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') =>
                        {
                            self.secrets.insert(name.clone());
                        }
                        Some((name, at)) => {
                            let p = pos(self, *at);
                            self.problem_at(
                                p,
                                &site.site.at,
                                format!("`{name}` is not a secret name"),
                                Some("secret names are letters, digits and `_`".into()),
                            );
                        }
                        None => {
                            let p = pos(self, root_at);
                            self.problem_at(
                                p,
                                &site.site.at,
                                "`.secrets` is read without naming a secret".into(),
                                Some("name the secret: `.secrets.api_token`".into()),
                            );
                        }
                    }
                    continue;
                }
                let Some((key, key_at)) = &r.key else {
                    continue;
                };
                match root.as_str() {
                    "inputs" if !self.inputs.contains(key) => {
                        let hint = match did_you_mean(key, self.inputs.iter().map(String::as_str)) {
                            Some(g) => format!("did you mean `{g}`?"),
                            None => "declare it under `inputs:`".to_owned(),
                        };
                        let p = pos(self, *key_at);
                        self.problem_at(
                            p,
                            &site.site.at,
                            format!("the workflow has no input `{key}`"),
                            Some(hint),
                        );
                    }
                    "steps" => {
                        let p = pos(self, *key_at);
                        let Some(k) = ids.iter().position(|id| id == key) else {
                            let dashed = ids.iter().find(|id| id.starts_with(&format!("{key}-")));
                            let hint = match (did_you_mean(key, ids.iter().copied()), dashed) {
                                (Some(g), _) => Some(format!("did you mean `{g}`?")),
                                (None, Some(id)) => Some(format!(
                                    "jq reads `.steps.{id}` as `.steps.{key} - ...`: write `.steps[\"{id}\"]`"
                                )),
                                (None, None) => {
                                    Some(format!("the step ids are: {}", ids.join(", ")))
                                }
                            };
                            self.problem_at(
                                p,
                                &site.site.at,
                                format!("no step has the id `{key}`"),
                                hint,
                            );
                            continue;
                        };
                        if let Some(s) = site.scope.step {
                            let ok = upstream[s].contains(&k) || (site.scope.own && k == s);
                            if !ok {
                                let (message, hint) = if k == s {
                                    (
                                        format!("step `{key}` reads its own outputs"),
                                        "its outputs exist only once it completed: use `outputs:` with `.result`".to_owned(),
                                    )
                                } else {
                                    (
                                        format!(
                                            "step `{}` reads `.steps.{key}`, but `{key}` does not run before it",
                                            ids[s]
                                        ),
                                        format!(
                                            "add `{key}` to the `needs` of `{}` (or of a step it needs)",
                                            ids[s]
                                        ),
                                    )
                                };
                                self.problem_at(p, &site.site.at, message, Some(hint));
                                continue;
                            }
                        }
                        if let Some((field, field_at)) = &r.field
                            && !STEP_FIELDS.contains(&field.as_str())
                        {
                            let hint = match did_you_mean(field, STEP_FIELDS.iter().copied()) {
                                Some(g) => format!("did you mean `{g}`?"),
                                None => "a step has `outputs`, `status` and `error`".to_owned(),
                            };
                            let p = pos(self, *field_at);
                            self.problem_at(
                                p,
                                &site.site.at,
                                format!("`.steps.{key}.{field}` does not exist"),
                                Some(hint),
                            );
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    fn finish(mut self, workflow: Option<Workflow>) -> Result<Workflow, Problems> {
        let batch = std::mem::take(&mut self.batch);
        if let Err(errors) = batch.finish() {
            for (i, e) in errors {
                let site = &self.sites[i];
                let pos = self.source.pos_in(&site.node, site.base + e.offset);
                let at = site.at.clone();
                self.problem_at(pos, &at, e.to_string(), Some(jq_hint(&e)));
            }
        }
        let mut problems = self.problems;
        problems.sort_by_key(|p| (p.line, p.column));
        problems.dedup();
        match workflow {
            Some(wf) if problems.is_empty() => Ok(wf),
            _ if problems.is_empty() => Err(Problems(vec![Problem {
                at: String::new(),
                line: 1,
                column: 1,
                message: "the workflow could not be compiled".into(),
                hint: None,
            }])),
            _ => Err(Problems(problems)),
        }
    }
}

/// What to do about an expression that does not compile.
fn jq_hint(e: &CompileError) -> String {
    if e.message.contains("without a closing") {
        "close the expression with `}}`".into()
    } else if has_dashed_key(&e.expr) {
        "jq reads `.a-b` as `.a - b`: write keys with `-` as `.steps[\"deploy-canary\"]`".into()
    } else if e.message.contains("not allowed") {
        "see \"Expressions\" in docs/workflows.md for what expressions may use".into()
    } else if e.message.starts_with("undefined") {
        "see https://jqlang.org/manual for the filters jq has".into()
    } else {
        "see https://jqlang.org/manual for jq syntax".into()
    }
}

/// Names become NATS subject tokens and KV keys (mirrors `baton_core::subjects::is_token`).
pub(crate) fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// `500ms`, `30s`, `5m`, `2h`, `1d`, and sums such as `1h30m`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let unit = match &rest[..unit_len] {
            "ms" => Duration::from_millis(1),
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            "d" => Duration::from_secs(86_400),
            _ => return None,
        };
        rest = &rest[unit_len..];
        total = total.checked_add(unit.checked_mul(u32::try_from(n).ok()?)?)?;
    }
    Some(total)
}

/// The closest of `candidates` to `word`, if one is close enough to be a typo.
pub(crate) fn did_you_mean<'a>(
    word: &str,
    candidates: impl Iterator<Item = &'a str>,
) -> Option<&'a str> {
    let limit = (word.chars().count() / 3).max(1);
    candidates
        .map(|c| (levenshtein(word, c), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Edit distance counting a swap of two neighbours as one edit (optimal string alignment).
fn levenshtein(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.to_lowercase().chars().collect();
    let b: Vec<char> = b.to_lowercase().chars().collect();
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            d[i][j] = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d[i][j] = d[i][j].min(d[i - 2][j - 2] + 1);
            }
        }
    }
    d[a.len()][b.len()]
}

/// Whether `expr` has a path like `.steps.deploy-canary`, which jq parses as a subtraction.
pub(crate) fn has_dashed_key(expr: &str) -> bool {
    let b = expr.as_bytes();
    (1..b.len().saturating_sub(1)).any(|i| {
        b[i] == b'-' && b[i + 1].is_ascii_alphabetic() && b[i - 1].is_ascii_alphanumeric() && {
            let word_start = expr[..i]
                .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(0);
            b.get(word_start) == Some(&b'.')
        }
    })
}
