//! jq expressions (the jaq crates): compiled once when a workflow is loaded, evaluated many times.
//!
//! In workflow files expressions appear as `${{ <jq> }}` inside strings. A string that is exactly one
//! expression evaluates to the expression's JSON value; otherwise each expression is interpolated as
//! text (strings as is, other values as JSON).
//!
//! All expressions of one workflow are compiled together into one jaq program (jaq compiles its
//! standard library with every program, which costs about 0.3 ms; once per workflow instead of once
//! per expression). Each [`Expr`] is an index into that program.
//!
//! # Bounds
//!
//! jaq has no fuel counter, so evaluation is bounded by what an expression may contain, checked
//! when it is compiled ([`FORBIDDEN`]): no `def` (the only way to write recursion), none of the
//! standard filters that recurse or generate without end (`repeat`, `while`, `until`, `recurse(f)`),
//! `range` only with literal bounds of at most [`MAX_RANGE`] values, and nothing that reads the
//! process (`env`, `$ENV`, `input`, `debug`, `halt`, ...). Only the first output of an expression is
//! computed. An expression can therefore only take time polynomial in the size of its input (the
//! run's context), and the result is refused when its JSON is larger than [`MAX_OUTPUT_BYTES`].
//! Not bounded: an expression *written* to blow up, such as `"x" * 1e9` or many nested cartesian
//! products; expressions come only from workflow files, never from event data, so that is in the
//! hands of the workflow's author and its review.

use std::fmt;
use std::sync::{Arc, OnceLock};

use jaq_core::load::lex::{StrPart, Token};
use jaq_core::load::parse::{BinaryOp, Parser, Pattern, Term};
use jaq_core::load::{Arena, File, Lexer, Loader};
use jaq_core::path::Part;
use jaq_core::{Compiler, Ctx, Vars, data};
use jaq_json::{Num, Val};
use serde_json::Value;

type Filter = jaq_core::compile::Filter<jaq_core::Native<data::JustLut<Val>>>;

/// The largest result an expression may produce, in bytes of JSON.
pub const MAX_OUTPUT_BYTES: usize = 1 << 20;
/// The most values a literal `range` may produce.
pub const MAX_RANGE: f64 = 100_000.0;

/// Filters and variables that expressions may not use, with the reason given to the author.
pub const FORBIDDEN: &[(&str, &str)] = &[
    ("repeat", "it generates values without end"),
    ("while", "it can loop without end"),
    ("until", "it can loop without end"),
    (
        "recurse/1",
        "with an argument it can recurse without end; `..` walks a value",
    ),
    (
        "recurse/2",
        "with arguments it can recurse without end; `..` walks a value",
    ),
    (
        "env",
        "workflows do not read the environment of Baton's processes; use secrets",
    ),
    (
        "$ENV",
        "workflows do not read the environment of Baton's processes; use secrets",
    ),
    ("input", "there is one input: the run's context"),
    ("inputs", "there is one input: the run's context"),
    ("input_filename", "there is no input file"),
    ("debug", "expressions have no side effects"),
    ("stderr", "expressions have no side effects"),
    ("halt", "expressions cannot stop the process"),
    (
        "halt_error",
        "expressions cannot stop the process; use `error(\"...\")`",
    ),
];

/// The name of the global variable that selects an expression in a workflow's program.
const SELECTOR: &str = "$__baton_expr";

/// A compiled jq expression and its source text.
#[derive(Clone)]
pub struct Expr {
    source: Arc<str>,
    program: Arc<OnceLock<Filter>>,
    index: usize,
}

impl fmt::Debug for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "${{{{ {} }}}}", self.source)
    }
}

/// Two expressions are equal when their source text is.
impl PartialEq for Expr {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl Eq for Expr {}

/// A jq expression that does not compile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("jq expression `{expr}`: {message} at character {offset}")]
pub struct CompileError {
    pub expr: String,
    pub message: String,
    /// Byte offset in `expr` where the problem is.
    pub offset: usize,
}

/// An expression that failed when evaluated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("jq expression `{expr}` failed: {message}")]
pub struct EvalError {
    pub expr: String,
    pub message: String,
}

/// A path into the run's context that an expression reads: `.steps.build.outputs` is root
/// `steps`, key `build`, field `outputs`. Only paths read from the context itself are listed (not
/// those inside `map(...)` and the like, where `.` is something else).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    pub root: (String, usize),
    pub key: Option<(String, usize)>,
    pub field: Option<(String, usize)>,
}

/// The expressions of one workflow, compiled together.
pub struct Batch {
    sources: Vec<Arc<str>>,
    program: Arc<OnceLock<Filter>>,
}

impl Default for Batch {
    fn default() -> Self {
        Batch {
            sources: Vec::new(),
            program: Arc::new(OnceLock::new()),
        }
    }
}

impl Batch {
    /// Checks the syntax of `source` and what it uses, and adds it to the batch. The expression can
    /// be evaluated once [`Batch::finish`] succeeded. Returns the expression and the context paths
    /// it reads, or every problem found.
    pub fn add(&mut self, source: &str) -> Result<(Expr, Vec<Reference>), Vec<CompileError>> {
        let fail = |at: &str, message: String| CompileError {
            expr: source.to_owned(),
            message,
            offset: jaq_core::load::span(source, at).start.min(source.len()),
        };
        let tokens = Lexer::new(source).lex().map_err(|errs| {
            errs.iter()
                .take(1)
                .map(|(expect, at)| fail(at, format!("expected {}", expect.as_str())))
                .collect::<Vec<_>>()
        })?;
        let term = Parser::new(&tokens).parse(|p| p.term()).map_err(|errs| {
            errs.iter()
                .take(1)
                .map(|(expect, found)| {
                    let at = Token::opt_as_str(*found, source);
                    let found = if at.is_empty() {
                        "end of expression"
                    } else {
                        at
                    };
                    fail(at, format!("expected {}, found `{found}`", expect.as_str()))
                })
                .collect::<Vec<_>>()
        })?;
        let mut walk = Walk {
            source,
            refs: Vec::new(),
            errors: Vec::new(),
        };
        walk.term(&term, true);
        if !walk.errors.is_empty() {
            return Err(walk.errors);
        }
        let index = self.sources.len();
        let source: Arc<str> = source.into();
        self.sources.push(source.clone());
        Ok((
            Expr {
                source,
                program: self.program.clone(),
                index,
            },
            walk.refs,
        ))
    }

    /// Compiles every expression added. Errors name the index of the expression (in the order of
    /// [`Batch::add`]) and the problem; names that are not defined are the only errors possible
    /// here, the syntax having been checked by `add`.
    pub fn finish(self) -> Result<(), Vec<(usize, CompileError)>> {
        if self.sources.is_empty() {
            return Ok(());
        }
        // One program: a binary tree of `if` on the selector, the expressions at its leaves.
        let mut code = String::new();
        let mut ranges = Vec::with_capacity(self.sources.len());
        fn tree(code: &mut String, ranges: &mut Vec<(usize, usize)>, srcs: &[Arc<str>], lo: usize) {
            if srcs.len() == 1 {
                // Newlines, so that a `#` comment in an expression cannot swallow the `)`.
                code.push_str("(\n");
                ranges.push((code.len(), lo));
                code.push_str(&srcs[0]);
                code.push_str("\n)");
                return;
            }
            let mid = srcs.len() / 2;
            code.push_str(&format!("if {SELECTOR} < {} then ", lo + mid));
            tree(code, ranges, &srcs[..mid], lo);
            code.push_str(" else ");
            tree(code, ranges, &srcs[mid..], lo + mid);
            code.push_str(" end");
        }
        tree(&mut code, &mut ranges, &self.sources, 0);
        let locate = |at: &str| -> (usize, CompileError) {
            let offset = jaq_core::load::span(&code, at).start;
            let (start, index) = ranges
                .iter()
                .rev()
                .find(|(start, _)| *start <= offset)
                .copied()
                .unwrap_or((0, 0));
            let source = &self.sources[index];
            (
                index,
                CompileError {
                    expr: source.to_string(),
                    message: String::new(),
                    offset: (offset - start).min(source.len()),
                },
            )
        };
        let arena = Arena::default();
        let loader = Loader::new(std_defs().iter().cloned());
        let modules = loader
            .load(
                &arena,
                File {
                    code: code.as_str(),
                    path: (),
                },
            )
            .map_err(|errors| {
                // Every expression parsed on its own; report whatever the loader says.
                errors
                    .into_iter()
                    .map(|(_, e)| {
                        let (i, mut err) = locate(&code[code.len()..]);
                        err.message = format!("cannot be loaded: {e:?}");
                        (i, err)
                    })
                    .collect::<Vec<_>>()
            })?;
        let funs = jaq_core::funs()
            .chain(jaq_std::funs())
            .chain(jaq_json::funs());
        let filter = Compiler::default()
            .with_funs(funs)
            .with_global_vars([SELECTOR])
            .compile(modules)
            .map_err(|errors| {
                errors
                    .into_iter()
                    .flat_map(|(_, errs)| errs)
                    .map(|(name, undefined)| {
                        let (i, mut err) = locate(name);
                        err.message = format!("undefined {} `{name}`", undefined.as_str());
                        (i, err)
                    })
                    .collect::<Vec<_>>()
            })?;
        self.program
            .set(filter)
            .unwrap_or_else(|_| unreachable!("a batch is finished once"));
        Ok(())
    }
}

/// jq's standard definitions, parsed once per process.
fn std_defs() -> &'static [jaq_core::load::parse::Def<&'static str>] {
    static DEFS: OnceLock<Vec<jaq_core::load::parse::Def<&'static str>>> = OnceLock::new();
    DEFS.get_or_init(|| {
        jaq_core::defs()
            .chain(jaq_std::defs())
            .chain(jaq_json::defs())
            .collect()
    })
}

/// Filters whose arguments see the same `.` as the call itself.
const SAME_INPUT: &[&str] = &[
    "select",
    "has",
    "contains",
    "inside",
    "startswith",
    "endswith",
    "ltrimstr",
    "rtrimstr",
    "test",
    "match",
    "capture",
    "split",
    "splits",
    "join",
    "sub",
    "gsub",
    "index",
    "rindex",
    "indices",
    "error",
    "first",
    "last",
    "isempty",
    "limit",
    "getpath",
    "del",
    "tojson",
    "ascii_downcase",
    "ascii_upcase",
    "not",
    "length",
    "empty",
];

/// Walks a parsed expression: collects the context paths it reads and what it may not use.
struct Walk<'s> {
    source: &'s str,
    refs: Vec<Reference>,
    errors: Vec<CompileError>,
}

impl<'s> Walk<'s> {
    fn offset(&self, part: &str) -> usize {
        jaq_core::load::span(self.source, part).start
    }

    fn forbid(&mut self, at: &str, name: &str, why: &str) {
        self.errors.push(CompileError {
            expr: self.source.to_owned(),
            message: format!("`{name}` is not allowed in workflow expressions: {why}"),
            offset: self.offset(at),
        });
    }

    /// `root`: whether `.` here is the run's context.
    fn term(&mut self, term: &Term<&'s str>, root: bool) {
        match term {
            Term::Id | Term::Recurse | Term::Num(_) | Term::Break(_) => {}
            Term::Str(_, parts) => self.str_parts(parts, root),
            Term::Arr(t) => {
                if let Some(t) = t {
                    self.term(t, root);
                }
            }
            Term::Obj(fields) => {
                for (k, v) in fields {
                    self.term(k, root);
                    if let Some(v) = v {
                        self.term(v, root);
                    }
                }
            }
            Term::Neg(t) => self.term(t, root),
            Term::BinOp(l, op, r) => {
                self.term(l, root);
                let right_root = match op {
                    BinaryOp::Pipe(None) => false,
                    BinaryOp::Pipe(Some(pattern)) => {
                        self.pattern(pattern, root);
                        root
                    }
                    BinaryOp::Update | BinaryOp::UpdateMath(_) | BinaryOp::UpdateAlt => false,
                    _ => root,
                };
                self.term(r, right_root);
            }
            Term::Label(_, t) => self.term(t, root),
            Term::Fold(_, xs, pattern, args) => {
                self.term(xs, root);
                self.pattern(pattern, root);
                for a in args {
                    self.term(a, false);
                }
            }
            Term::TryCatch(t, c) => {
                self.term(t, root);
                if let Some(c) = c {
                    self.term(c, false);
                }
            }
            Term::IfThenElse(branches, otherwise) => {
                for (cond, then) in branches {
                    self.term(cond, root);
                    self.term(then, root);
                }
                if let Some(t) = otherwise {
                    self.term(t, root);
                }
            }
            Term::Def(defs, body) => {
                let at = defs.first().map_or(self.source, |d| d.name);
                self.forbid(
                    at,
                    "def",
                    "definitions can recurse without bound; write the expression inline",
                );
                self.term(body, root);
            }
            Term::Call(name, args) => {
                let arity = format!("{name}/{}", args.len());
                if let Some((_, why)) = FORBIDDEN.iter().find(|(n, _)| *n == *name || *n == arity) {
                    self.forbid(name, name, why);
                }
                if *name == "range" {
                    self.check_range(name, args);
                }
                let same = SAME_INPUT.contains(name);
                for a in args {
                    self.term(a, root && same);
                }
            }
            Term::Var(name) => {
                if let Some((_, why)) = FORBIDDEN.iter().find(|(n, _)| n == name) {
                    self.forbid(name, name, why);
                }
            }
            Term::Path(head, path) => {
                self.term(head, root);
                if root && matches!(**head, Term::Id) {
                    let key = |i: usize| -> Option<(String, usize)> {
                        match path.0.get(i) {
                            Some((Part::Index(Term::Str(None, parts)), _)) => {
                                match parts.as_slice() {
                                    [StrPart::Str(s)] => Some((s.to_string(), self.offset(s))),
                                    _ => None,
                                }
                            }
                            _ => None,
                        }
                    };
                    if let Some(root_key) = key(0) {
                        let k = key(1);
                        let field = k.as_ref().and_then(|_| key(2));
                        self.refs.push(Reference {
                            root: root_key,
                            key: k,
                            field,
                        });
                    }
                }
                for (part, _) in &path.0 {
                    match part {
                        Part::Index(t) => self.term(t, root),
                        Part::Range(a, b) => {
                            for t in [a, b].into_iter().flatten() {
                                self.term(t, root);
                            }
                        }
                    }
                }
            }
        }
    }

    fn str_parts(&mut self, parts: &[StrPart<&'s str, Term<&'s str>>], root: bool) {
        for part in parts {
            if let StrPart::Term(t) = part {
                self.term(t, root);
            }
        }
    }

    fn pattern(&mut self, pattern: &Pattern<&'s str>, root: bool) {
        match pattern {
            Pattern::Var(_) => {}
            Pattern::Arr(ps) => ps.iter().for_each(|p| self.pattern(p, root)),
            Pattern::Obj(entries) => {
                for (k, p) in entries {
                    self.term(k, root);
                    self.pattern(p, root);
                }
            }
        }
    }

    /// `range` with literal bounds of at most `MAX_RANGE` values, nothing else.
    fn check_range(&mut self, at: &'s str, args: &[Term<&'s str>]) {
        let num = |t: &Term<&str>| -> Option<f64> {
            match t {
                Term::Num(n) => n.parse().ok(),
                Term::Neg(t) => match &**t {
                    Term::Num(n) => n.parse::<f64>().ok().map(|x| -x),
                    _ => None,
                },
                _ => None,
            }
        };
        let values: Option<Vec<f64>> = args.iter().map(num).collect();
        let count = match values.as_deref() {
            Some([to]) => Some(*to),
            Some([from, to]) => Some(to - from),
            Some([from, to, by]) if *by != 0.0 => Some((to - from) / by),
            _ => None,
        };
        match count {
            Some(n) if n <= MAX_RANGE => {}
            Some(_) => self.forbid(
                at,
                "range",
                &format!("a range may produce at most {MAX_RANGE} values"),
            ),
            None => self.forbid(
                at,
                "range",
                "only with literal numbers as bounds, so that its size is known; slice an array \
                 instead (`.[:n]`)",
            ),
        }
    }
}

impl Expr {
    /// Compiles one expression with jq's standard library. A workflow compiles all its expressions
    /// at once with a [`Batch`], which is much faster.
    pub fn compile(source: &str) -> Result<Expr, CompileError> {
        let mut batch = Batch::default();
        let (expr, _) = batch.add(source).map_err(|mut e| e.swap_remove(0))?;
        batch.finish().map_err(|mut e| e.swap_remove(0).1)?;
        Ok(expr)
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Evaluates the expression on `input` and returns its first output.
    pub fn eval(&self, input: &Val) -> Result<Value, EvalError> {
        let fail = |message: String| EvalError {
            expr: self.source.to_string(),
            message,
        };
        let filter = self
            .program
            .get()
            .ok_or_else(|| fail("it was never compiled (its workflow has problems)".into()))?;
        let selector = Val::Num(Num::Int(self.index as isize));
        let ctx = Ctx::<data::JustLut<Val>>::new(&filter.lut, Vars::new([selector]));
        let mut outputs = filter
            .id
            .run((ctx, input.clone()))
            .map(jaq_core::unwrap_valr);
        match outputs.next() {
            None => Err(fail("it produced no value".to_owned())),
            Some(Err(e)) => Err(fail(e.to_string())),
            Some(Ok(v)) => {
                let mut budget = MAX_OUTPUT_BYTES;
                to_json(&v, &mut budget).ok_or_else(|| {
                    fail(format!(
                        "its result is larger than {MAX_OUTPUT_BYTES} bytes of JSON"
                    ))
                })
            }
        }
    }

    /// Evaluates the expression as a condition: jq truthiness (everything but `false` and `null`).
    pub fn truthy(&self, input: &Val) -> Result<bool, EvalError> {
        Ok(!matches!(
            self.eval(input)?,
            Value::Null | Value::Bool(false)
        ))
    }
}

/// Converts a JSON value into jq's value type, once per evaluation context.
pub fn to_val(value: &Value) -> Val {
    serde::Deserialize::deserialize(value).unwrap_or(Val::Null)
}

/// Converts a jq value to JSON, spending `budget` (approximate bytes of JSON); `None` when the
/// budget runs out.
fn to_json(val: &Val, budget: &mut usize) -> Option<Value> {
    let spend = |budget: &mut usize, n: usize| -> Option<()> {
        *budget = budget.checked_sub(n)?;
        Some(())
    };
    Some(match val {
        Val::Null => {
            spend(budget, 4)?;
            Value::Null
        }
        Val::Bool(b) => {
            spend(budget, 5)?;
            Value::Bool(*b)
        }
        Val::Num(n) => {
            spend(budget, 8)?;
            match n {
                Num::Int(i) => Value::from(*i as i64),
                Num::Float(f) => {
                    serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number)
                }
                other => {
                    let text = other.to_string();
                    text.parse::<serde_json::Number>()
                        .ok()
                        .or_else(|| {
                            text.parse::<f64>()
                                .ok()
                                .and_then(serde_json::Number::from_f64)
                        })
                        .map_or(Value::Null, Value::Number)
                }
            }
        }
        Val::TStr(b) | Val::BStr(b) => {
            spend(budget, b.len() + 2)?;
            Value::String(String::from_utf8_lossy(b).into_owned())
        }
        Val::Arr(items) => {
            spend(budget, 2)?;
            Value::Array(
                items
                    .iter()
                    .map(|v| {
                        spend(budget, 1)?;
                        to_json(v, budget)
                    })
                    .collect::<Option<_>>()?,
            )
        }
        Val::Obj(map) => {
            spend(budget, 2)?;
            let mut out = serde_json::Map::with_capacity(map.len());
            for (k, v) in map.iter() {
                let key = match k {
                    Val::TStr(b) | Val::BStr(b) => String::from_utf8_lossy(b).into_owned(),
                    other => other.to_string(),
                };
                spend(budget, key.len() + 4)?;
                out.insert(key, to_json(v, budget)?);
            }
            Value::Object(out)
        }
    })
}

/// A JSON value whose strings may contain `${{ }}` expressions.
#[derive(Debug, Clone)]
pub enum Template {
    /// No expression anywhere inside.
    Literal(Value),
    /// A string that is exactly one expression: its JSON value.
    Expr(Expr),
    /// A string with text and expressions.
    Interpolated(Vec<Piece>),
    Array(Vec<Template>),
    Object(Vec<(String, Template)>),
}

#[derive(Debug, Clone)]
pub enum Piece {
    Text(String),
    Expr(Expr),
}

/// What [`Template::from_str_with_refs`] reports about each expression in a string: `Ok((offset
/// in the string, context paths read))` or `Err((offset in the string, error))`.
pub type Found = Result<(usize, Vec<Reference>), (usize, CompileError)>;

/// One `${{ }}` found in a string: where its body starts in the string, and its trimmed text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Embedded<'a> {
    /// Byte offset of the trimmed expression in the string.
    pub offset: usize,
    pub source: &'a str,
}

/// Splits a string into text and `${{ }}` expressions. `Err` holds the byte offset of a `${{`
/// without its closing `}}`.
pub fn split_template(s: &str) -> Result<Vec<Result<&str, Embedded<'_>>>, usize> {
    let mut pieces = Vec::new();
    let mut pos = 0;
    while let Some(found) = s[pos..].find("${{") {
        let start = pos + found;
        if start > pos {
            pieces.push(Ok(&s[pos..start]));
        }
        let body_start = start + 3;
        let Some(end) = expression_end(&s[body_start..]) else {
            return Err(start);
        };
        let body = &s[body_start..body_start + end];
        let trimmed = body.trim_start();
        let offset = body_start + (body.len() - trimmed.len());
        pieces.push(Err(Embedded {
            offset,
            source: trimmed.trim_end(),
        }));
        pos = body_start + end + 2;
    }
    if pos < s.len() {
        pieces.push(Ok(&s[pos..]));
    }
    Ok(pieces)
}

impl Template {
    /// Parses and compiles every string of `value`. Problems are reported with the JSON path of
    /// the string.
    pub fn parse(
        value: &Value,
        path: &str,
        problems: &mut Vec<(String, CompileError)>,
    ) -> Template {
        let mut batch = Batch::default();
        let mut paths = Vec::new();
        let t = Self::parse_in(value, path, &mut batch, &mut paths, problems);
        if let Err(errors) = batch.finish() {
            for (i, e) in errors {
                problems.push((paths[i].clone(), e));
            }
        }
        t
    }

    fn parse_in(
        value: &Value,
        path: &str,
        batch: &mut Batch,
        paths: &mut Vec<String>,
        problems: &mut Vec<(String, CompileError)>,
    ) -> Template {
        let t = match value {
            Value::String(s) => Self::from_str(s, batch, &mut |e: Result<
                usize,
                (usize, CompileError),
            >| match e {
                Ok(_) => paths.push(path.to_owned()),
                Err((_, e)) => problems.push((path.to_owned(), e)),
            }),
            Value::Array(items) => Template::Array(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, v)| {
                        Self::parse_in(v, &format!("{path}[{i}]"), batch, paths, problems)
                    })
                    .collect(),
            ),
            Value::Object(map) => Template::Object(
                map.iter()
                    .map(|(k, v)| {
                        let p = format!("{path}.{k}");
                        (k.clone(), Self::parse_in(v, &p, batch, paths, problems))
                    })
                    .collect(),
            ),
            other => Template::Literal(other.clone()),
        };
        t.fold_literals()
    }

    /// Parses one string into a template, adding its expressions to `batch`. `report` hears of
    /// every expression: `Ok(offset in s)` when it was added, `Err((offset in s, error))` when
    /// not.
    pub fn from_str(
        s: &str,
        batch: &mut Batch,
        report: &mut dyn FnMut(Result<usize, (usize, CompileError)>),
    ) -> Template {
        Self::from_str_with_refs(s, batch, &mut |r| {
            report(r.map(|(offset, _)| offset));
        })
    }

    /// [`Template::from_str`] that also hands over the context paths each expression reads.
    pub fn from_str_with_refs(
        s: &str,
        batch: &mut Batch,
        report: &mut dyn FnMut(Found),
    ) -> Template {
        let pieces = match split_template(s) {
            Ok(pieces) => pieces,
            Err(at) => {
                report(Err((
                    at,
                    CompileError {
                        expr: s[at + 3..].trim().to_owned(),
                        message: "`${{` without a closing `}}`".into(),
                        offset: 0,
                    },
                )));
                return Template::Literal(Value::String(s.to_owned()));
            }
        };
        let mut out = Vec::with_capacity(pieces.len());
        for piece in pieces {
            match piece {
                Ok(text) => out.push(Piece::Text(text.to_owned())),
                Err(embedded) => match batch.add(embedded.source) {
                    Ok((expr, refs)) => {
                        report(Ok((embedded.offset, refs)));
                        out.push(Piece::Expr(expr));
                    }
                    Err(errors) => {
                        for e in errors {
                            report(Err((embedded.offset, e)));
                        }
                    }
                },
            }
        }
        match out.as_slice() {
            [] => Template::Literal(Value::String(String::new())),
            [Piece::Text(t)] => Template::Literal(Value::String(t.clone())),
            [Piece::Expr(e)] => Template::Expr(e.clone()),
            _ => Template::Interpolated(out),
        }
    }

    /// Turns containers without any expression back into one literal value.
    pub fn fold_literals(self) -> Template {
        let literal = |t: &Template| match t {
            Template::Literal(v) => Some(v.clone()),
            _ => None,
        };
        match self {
            Template::Array(items) => match items.iter().map(literal).collect::<Option<Vec<_>>>() {
                Some(values) => Template::Literal(Value::Array(values)),
                None => Template::Array(items),
            },
            Template::Object(fields) => {
                match fields
                    .iter()
                    .map(|(k, t)| literal(t).map(|v| (k.clone(), v)))
                    .collect::<Option<_>>()
                {
                    Some(map) => Template::Literal(Value::Object(map)),
                    None => Template::Object(fields),
                }
            }
            other => other,
        }
    }

    /// Every expression in the template.
    pub fn exprs(&self) -> Vec<&Expr> {
        match self {
            Template::Literal(_) => vec![],
            Template::Expr(e) => vec![e],
            Template::Interpolated(pieces) => pieces
                .iter()
                .filter_map(|p| match p {
                    Piece::Expr(e) => Some(e),
                    Piece::Text(_) => None,
                })
                .collect(),
            Template::Array(items) => items.iter().flat_map(Template::exprs).collect(),
            Template::Object(fields) => fields.iter().flat_map(|(_, t)| t.exprs()).collect(),
        }
    }

    /// Evaluates every expression against `context`.
    pub fn eval(&self, context: &Val) -> Result<Value, EvalError> {
        Ok(match self {
            Template::Literal(v) => v.clone(),
            Template::Expr(e) => e.eval(context)?,
            Template::Interpolated(pieces) => {
                let mut out = String::new();
                for piece in pieces {
                    match piece {
                        Piece::Text(t) => out.push_str(t),
                        Piece::Expr(e) => match e.eval(context)? {
                            Value::String(s) => out.push_str(&s),
                            other => out.push_str(&other.to_string()),
                        },
                    }
                }
                Value::String(out)
            }
            Template::Array(items) => Value::Array(
                items
                    .iter()
                    .map(|t| t.eval(context))
                    .collect::<Result<_, _>>()?,
            ),
            Template::Object(fields) => Value::Object(
                fields
                    .iter()
                    .map(|(k, t)| Ok((k.clone(), t.eval(context)?)))
                    .collect::<Result<_, _>>()?,
            ),
        })
    }
}

/// Byte offset of the `}}` that closes an expression, skipping braces of jq objects and strings.
fn expression_end(body: &str) -> Option<usize> {
    let bytes = body.as_bytes();
    let (mut depth, mut in_string, mut i) = (0usize, false, 0);
    while i < bytes.len() {
        match bytes[i] {
            b'\\' if in_string => i += 1,
            b'"' => in_string = !in_string,
            b'{' if !in_string => depth += 1,
            b'}' if !in_string && depth > 0 => depth -= 1,
            b'}' if !in_string && bytes.get(i + 1) == Some(&b'}') => return Some(i),
            _ => {}
        }
        i += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn template(v: Value) -> Template {
        let mut problems = Vec::new();
        let t = Template::parse(&v, "with", &mut problems);
        assert!(problems.is_empty(), "{problems:?}");
        t
    }

    #[test]
    fn templates_evaluate_values_and_interpolate_text() {
        let ctx = to_val(
            &json!({"inputs": {"name": "world", "n": 2}, "steps": {"a": {"outputs": {"x": [1, 2]}}}}),
        );
        let t = template(json!({
            "greeting": "Hello, ${{ .inputs.name }}! n=${{ .inputs.n }}",
            "list": "${{ .steps.a.outputs.x | map(. * 10) }}",
            "obj": "${{ {a: {b: .inputs.n}} }}",
            "plain": ["x", 1, true],
            "float": "${{ 1.5 }}",
        }));
        assert_eq!(
            t.eval(&ctx).unwrap(),
            json!({"greeting": "Hello, world! n=2", "list": [10, 20], "obj": {"a": {"b": 2}}, "plain": ["x", 1, true], "float": 1.5})
        );
        assert!(matches!(
            template(json!({"a": [1, "b"]})),
            Template::Literal(_)
        ));
    }

    #[test]
    fn compile_errors_name_the_expression_and_position() {
        let err = Expr::compile(".a | nosuchfn").unwrap_err();
        assert_eq!(err.offset, 5, "{err}");
        assert!(
            err.to_string().contains("undefined filter `nosuchfn`"),
            "{err}"
        );
        let err = Expr::compile(".a | (").unwrap_err();
        assert!(
            err.to_string().starts_with("jq expression `.a | (`"),
            "{err}"
        );
        let mut problems = Vec::new();
        Template::parse(&json!("${{ .a "), "with.x", &mut problems);
        assert_eq!(problems[0].0, "with.x");
        // In a batch, each error names its own expression and offset.
        let mut batch = Batch::default();
        batch.add(".a").unwrap();
        batch.add("1 + nope(2)").unwrap();
        batch.add(".b").unwrap();
        let errors = batch.finish().unwrap_err();
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].0, 1);
        assert_eq!(errors[0].1.offset, 4);
        assert_eq!(errors[0].1.message, "undefined filter `nope`");
    }

    #[test]
    fn batches_evaluate_each_expression_on_its_own() {
        let mut batch = Batch::default();
        let exprs: Vec<Expr> = (0..37)
            .map(|i| batch.add(&format!(".n + {i} # comment")).unwrap().0)
            .collect();
        batch.finish().unwrap();
        let ctx = to_val(&json!({"n": 100}));
        for (i, e) in exprs.iter().enumerate() {
            assert_eq!(e.eval(&ctx).unwrap(), json!(100 + i));
        }
    }

    #[test]
    fn evaluation_errors_and_truthiness() {
        let ctx = to_val(&json!({"n": 1}));
        let err = Expr::compile(".n | error(\"boom\")")
            .unwrap()
            .eval(&ctx)
            .unwrap_err();
        assert!(err.message.contains("boom"), "{err}");
        assert!(Expr::compile("empty").unwrap().eval(&ctx).is_err());
        assert!(Expr::compile(".n == 1").unwrap().truthy(&ctx).unwrap());
        assert!(!Expr::compile(".missing").unwrap().truthy(&ctx).unwrap());
    }

    #[test]
    fn unbounded_and_impure_filters_are_refused_when_compiled() {
        for (src, bad) in [
            ("def f: f; f", "`def`"),
            ("repeat(1)", "`repeat`"),
            ("[.[] | recurse(. + 1)]", "`recurse`"),
            ("env.HOME", "`env`"),
            ("$ENV.PATH", "`$ENV`"),
            ("[range(.n)]", "`range`"),
            ("[range(0; 1e9)]", "`range`"),
            ("1 as $x | while(. < 10; . + 1)", "`while`"),
        ] {
            let err = Expr::compile(src).unwrap_err();
            assert!(
                err.message.contains(bad) && err.message.contains("not allowed"),
                "{src}: {err}"
            );
        }
        assert!(Expr::compile("[range(3)] | .. | numbers").is_ok());
        assert!(Expr::compile("recurse | numbers").is_ok());
        // The output is bounded.
        let big = Expr::compile(r#""x" * 2000000"#).unwrap();
        let err = big.eval(&Val::Null).unwrap_err();
        assert!(err.message.contains("larger than"), "{err}");
    }

    #[test]
    fn references_are_the_context_paths_read() {
        let mut batch = Batch::default();
        let (_, refs) = batch
            .add(r#".steps.build.outputs.image + (.steps["deploy-canary"].status) + (.inputs | keys[0]) + ([.x[]] | map(.steps.not_a_ref) | tostring) + (select(.event.data) | tostring)"#)
            .unwrap();
        let names: Vec<_> = refs
            .iter()
            .map(|r| {
                (
                    r.root.0.as_str(),
                    r.key.as_ref().map(|k| k.0.as_str()),
                    r.field.as_ref().map(|f| f.0.as_str()),
                )
            })
            .collect();
        assert_eq!(
            names,
            vec![
                ("steps", Some("build"), Some("outputs")),
                ("steps", Some("deploy-canary"), Some("status")),
                ("inputs", None, None),
                ("x", None, None),
                ("event", Some("data"), None),
            ]
        );
        assert_eq!(refs[0].key.as_ref().unwrap().1, 7);
    }

    #[test]
    fn split_template_finds_expressions_and_offsets() {
        let parts = split_template("a ${{ .x }} b ${{{a: 1} | .a}}").unwrap();
        assert_eq!(
            parts,
            vec![
                Ok("a "),
                Err(Embedded {
                    offset: 6,
                    source: ".x"
                }),
                Ok(" b "),
                Err(Embedded {
                    offset: 17,
                    source: "{a: 1} | .a"
                }),
            ]
        );
        assert_eq!(split_template("x ${{ .a").unwrap_err(), 2);
    }
}
