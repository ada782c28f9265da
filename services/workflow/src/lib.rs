//! The Baton workflow language: YAML (or JSON) files, validated and compiled into a [`Workflow`],
//! the graph that the coordinator executes and nothing else.
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

pub mod expr;
mod format;

use std::collections::HashMap;
use std::fmt;

use serde_json::Value;

pub use expr::{Expr, Template};
use format::{File, InputType};

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
}

/// A CloudEvent that starts a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trigger {
    /// The CloudEvent `type`, matched exactly.
    pub ty: String,
}

#[derive(Debug, Clone)]
pub struct Input {
    pub name: String,
    pub ty: InputType,
    pub default: Option<Value>,
    pub required: bool,
}

#[derive(Debug, Clone)]
pub struct Step {
    pub id: String,
    /// The step kind: a built-in runner or a custom step service.
    pub kind: String,
    pub with: Template,
    /// Indices of the steps this one waits for.
    pub needs: Vec<usize>,
    /// When it evaluates to false or null the step is skipped.
    pub condition: Option<Expr>,
}

/// One problem in a workflow file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Where: a path such as `steps[1].needs[0]`.
    pub at: String,
    pub message: String,
    pub hint: Option<String>,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.at, self.message)?;
        if let Some(hint) = &self.hint {
            write!(f, " (hint: {hint})")?;
        }
        Ok(())
    }
}

/// All problems found in a workflow file.
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

/// Parses and compiles a workflow from YAML (JSON is YAML too). Reports every problem at once.
pub fn compile(source: &str) -> Result<Workflow, Problems> {
    let file: File = serde_saphyr::from_str(source).map_err(|e| {
        Problems(vec![Problem {
            at: "file".into(),
            message: e.to_string(),
            hint: None,
        }])
    })?;
    Compiler::default().compile(file)
}

#[derive(Default)]
struct Compiler {
    problems: Vec<Problem>,
}

impl Compiler {
    fn problem(&mut self, at: impl Into<String>, message: impl Into<String>, hint: Option<&str>) {
        self.problems.push(Problem {
            at: at.into(),
            message: message.into(),
            hint: hint.map(str::to_owned),
        });
    }

    fn template(&mut self, value: &Value, at: &str) -> Template {
        let mut errors = Vec::new();
        let t = Template::parse(value, at, &mut errors);
        for (at, e) in errors {
            let hint = if has_dashed_key(&e.expr) {
                "jq reads `.a-b` as `.a - b`: write keys with `-` as `.steps[\"deploy-canary\"]`"
            } else {
                "see https://jqlang.org/manual for jq syntax"
            };
            self.problem(at, e.to_string(), Some(hint));
        }
        t
    }

    fn compile(mut self, file: File) -> Result<Workflow, Problems> {
        if !is_name(&file.name) {
            self.problem(
                "name",
                format!("`{}` is not a valid workflow name", file.name),
                Some(NAME_HINT),
            );
        }
        let triggers = file.on.into_iter().map(|t| Trigger { ty: t.ty }).collect();
        let inputs = file
            .inputs
            .into_iter()
            .map(|(name, spec)| Input {
                required: spec.default.is_none() && spec.required,
                name,
                ty: spec.ty,
                default: spec.default,
            })
            .collect();

        let mut index = HashMap::new();
        for (i, step) in file.steps.iter().enumerate() {
            if !is_name(&step.id) {
                self.problem(
                    format!("steps[{i}].id"),
                    format!("`{}` is not a valid step id", step.id),
                    Some(NAME_HINT),
                );
            }
            if index.insert(step.id.as_str(), i).is_some() {
                self.problem(
                    format!("steps[{i}].id"),
                    format!("step id `{}` is used twice", step.id),
                    Some("give every step its own id"),
                );
            }
        }
        if file.steps.is_empty() {
            self.problem("steps", "a workflow needs at least one step", None);
        }

        let mut steps = Vec::with_capacity(file.steps.len());
        for (i, spec) in file.steps.iter().enumerate() {
            if !baton_core_token(&spec.uses) {
                self.problem(
                    format!("steps[{i}].uses"),
                    format!("`{}` is not a valid step kind", spec.uses),
                    Some(NAME_HINT),
                );
            }
            let needs = match &spec.needs {
                // Without `needs`, a step runs after the one above it.
                None => i.checked_sub(1).into_iter().collect(),
                Some(names) => names
                    .iter()
                    .enumerate()
                    .filter_map(|(j, name)| {
                        let found = index.get(name.as_str()).copied();
                        if found.is_none() {
                            self.problem(
                                format!("steps[{i}].needs[{j}]"),
                                format!("no step has the id `{name}`"),
                                None,
                            );
                        }
                        found
                    })
                    .collect(),
            };
            let with = self.template(&spec.with, &format!("steps[{i}].with"));
            let condition =
                spec.condition
                    .as_deref()
                    .and_then(|c| match Expr::compile(strip_braces(c)) {
                        Ok(e) => Some(e),
                        Err(e) => {
                            self.problem(format!("steps[{i}].if"), e.to_string(), None);
                            None
                        }
                    });
            steps.push(Step {
                id: spec.id.clone(),
                kind: spec.uses.clone(),
                with,
                needs,
                condition,
            });
        }
        if let Some(cycle) = find_cycle(&steps) {
            let names: Vec<_> = cycle.iter().map(|&i| steps[i].id.as_str()).collect();
            self.problem(
                "steps",
                format!(
                    "the steps depend on each other in a cycle: {}",
                    names.join(" -> ")
                ),
                Some("remove one of these `needs`"),
            );
        }
        let outputs = self.template(
            &Value::Object(file.outputs.into_iter().collect()),
            "outputs",
        );
        if !self.problems.is_empty() {
            return Err(Problems(self.problems));
        }
        Ok(Workflow {
            name: file.name,
            description: file.description,
            triggers,
            inputs,
            steps,
            outputs,
        })
    }
}

const NAME_HINT: &str = "use letters, digits, `-` and `_`";

fn is_name(s: &str) -> bool {
    baton_core_token(s)
}

// Mirrors `baton_core::subjects::is_token`: names become NATS subject tokens and KV keys.
fn baton_core_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Whether `expr` has a path like `.steps.deploy-canary`, which jq parses as a subtraction.
fn has_dashed_key(expr: &str) -> bool {
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

/// `if:` may be written with or without `${{ }}`.
fn strip_braces(s: &str) -> &str {
    let t = s.trim();
    t.strip_prefix("${{")
        .and_then(|t| t.strip_suffix("}}"))
        .map_or(t, str::trim)
}

/// A dependency cycle, as the list of steps around it, if there is one.
fn find_cycle(steps: &[Step]) -> Option<Vec<usize>> {
    // 0 = unvisited, 1 = on the current path, 2 = done.
    fn visit(
        i: usize,
        steps: &[Step],
        state: &mut [u8],
        path: &mut Vec<usize>,
    ) -> Option<Vec<usize>> {
        state[i] = 1;
        path.push(i);
        for &n in &steps[i].needs {
            if state[n] == 1 {
                let start = path.iter().position(|&p| p == n).unwrap_or(0);
                let mut cycle = path[start..].to_vec();
                cycle.push(n);
                return Some(cycle);
            }
            if state[n] == 0
                && let Some(c) = visit(n, steps, state, path)
            {
                return Some(c);
            }
        }
        path.pop();
        state[i] = 2;
        None
    }
    let mut state = vec![0u8; steps.len()];
    (0..steps.len()).find_map(|i| {
        if state[i] == 0 {
            visit(i, steps, &mut state, &mut Vec::new())
        } else {
            None
        }
    })
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
                return Err(format!(
                    "unknown input `{key}`; this workflow takes: {}",
                    known.join(", ")
                ));
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
                        "input `{}` must be a {}, got {v}",
                        input.name, input.ty
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
}

#[cfg(test)]
mod tests;
