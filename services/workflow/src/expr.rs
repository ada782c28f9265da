//! jq expressions (the jaq crates): compiled once when a workflow is loaded, evaluated many times.
//!
//! In workflow files expressions appear as `${{ <jq> }}` inside strings. A string that is exactly one
//! expression evaluates to the expression's JSON value; otherwise each expression is interpolated as
//! text (strings as is, other values as JSON).

use std::fmt;
use std::sync::Arc;

use jaq_core::load::{Arena, File, Loader};
use jaq_core::{Compiler, Ctx, Vars, data};
use jaq_json::Val;
use serde_json::Value;

type Filter = jaq_core::compile::Filter<jaq_core::Native<data::JustLut<Val>>>;

/// A compiled jq expression and its source text.
#[derive(Clone)]
pub struct Expr {
    source: Arc<str>,
    filter: Arc<Filter>,
}

impl fmt::Debug for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "${{{{ {} }}}}", self.source)
    }
}

/// A jq expression that does not compile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("jq expression `{expr}`: {message} at character {offset}")]
pub struct CompileError {
    pub expr: String,
    pub message: String,
    /// Byte offset in `source` where the problem is.
    pub offset: usize,
}

/// An expression that failed when evaluated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("jq expression `{expr}` failed: {message}")]
pub struct EvalError {
    pub expr: String,
    pub message: String,
}

impl Expr {
    /// Compiles `source` with jq's standard library.
    pub fn compile(source: &str) -> Result<Expr, CompileError> {
        let defs = jaq_core::defs()
            .chain(jaq_std::defs())
            .chain(jaq_json::defs());
        let funs = jaq_core::funs()
            .chain(jaq_std::funs())
            .chain(jaq_json::funs());
        let loader = Loader::new(defs);
        let arena = Arena::default();
        let fail = |part: &str, message: String| CompileError {
            expr: source.to_owned(),
            message,
            offset: jaq_core::load::span(source, part).start.min(source.len()),
        };
        let modules = loader
            .load(
                &arena,
                File {
                    code: source,
                    path: (),
                },
            )
            .map_err(|errors| {
                let (_, error) = errors
                    .into_iter()
                    .next()
                    .expect("a failed load has an error");
                match error {
                    jaq_core::load::Error::Lex(errs) => {
                        let (expect, at) = &errs[0];
                        fail(at, format!("expected {}", expect.as_str()))
                    }
                    jaq_core::load::Error::Parse(errs) => {
                        let (expect, at) = &errs[0];
                        let found = if at.is_empty() {
                            "end of expression"
                        } else {
                            at
                        };
                        fail(at, format!("expected {}, found `{found}`", expect.as_str()))
                    }
                    jaq_core::load::Error::Io(errs) => {
                        fail("", format!("cannot load module: {}", errs[0].1))
                    }
                }
            })?;
        let filter = Compiler::default()
            .with_funs(funs)
            .compile(modules)
            .map_err(|errors| {
                let (_, errs) = errors
                    .into_iter()
                    .next()
                    .expect("a failed compile has an error");
                let (name, undefined) = &errs[0];
                fail(name, format!("undefined {} `{name}`", undefined.as_str()))
            })?;
        Ok(Expr {
            source: source.into(),
            filter: Arc::new(filter),
        })
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
        let ctx = Ctx::<data::JustLut<Val>>::new(&self.filter.lut, Vars::new([]));
        let mut outputs = self
            .filter
            .id
            .run((ctx, input.clone()))
            .map(jaq_core::unwrap_valr);
        match outputs.next() {
            None => Err(fail("it produced no value".to_owned())),
            Some(Err(e)) => Err(fail(e.to_string())),
            Some(Ok(v)) => to_json(&v).map_err(fail),
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

fn to_json(val: &Val) -> Result<Value, String> {
    serde_json::from_str(&val.to_string()).map_err(|e| format!("its value is not JSON: {e}"))
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

impl Template {
    /// Parses every string of `value`. Problems are reported with the JSON path of the string.
    pub fn parse(
        value: &Value,
        path: &str,
        problems: &mut Vec<(String, CompileError)>,
    ) -> Template {
        let t = match value {
            Value::String(s) => Self::parse_str(s, path, problems),
            Value::Array(items) => Template::Array(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, v)| Self::parse(v, &format!("{path}[{i}]"), problems))
                    .collect(),
            ),
            Value::Object(map) => Template::Object(
                map.iter()
                    .map(|(k, v)| (k.clone(), Self::parse(v, &format!("{path}.{k}"), problems)))
                    .collect(),
            ),
            other => Template::Literal(other.clone()),
        };
        t.fold_literals()
    }

    fn parse_str(s: &str, path: &str, problems: &mut Vec<(String, CompileError)>) -> Template {
        let mut pieces = Vec::new();
        let mut rest = s;
        while let Some(start) = rest.find("${{") {
            if start > 0 {
                pieces.push(Piece::Text(rest[..start].to_owned()));
            }
            let body = &rest[start + 3..];
            let Some(end) = expression_end(body) else {
                problems.push((
                    path.to_owned(),
                    CompileError {
                        expr: body.to_owned(),
                        message: "`${{` without a closing `}}`".into(),
                        offset: 0,
                    },
                ));
                return Template::Literal(Value::String(s.to_owned()));
            };
            match Expr::compile(body[..end].trim()) {
                Ok(expr) => pieces.push(Piece::Expr(expr)),
                Err(e) => problems.push((path.to_owned(), e)),
            }
            rest = &body[end + 2..];
        }
        if !rest.is_empty() {
            pieces.push(Piece::Text(rest.to_owned()));
        }
        match pieces.as_slice() {
            [] => Template::Literal(Value::String(String::new())),
            [Piece::Text(t)] => Template::Literal(Value::String(t.clone())),
            [Piece::Expr(e)] => Template::Expr(e.clone()),
            _ => Template::Interpolated(pieces),
        }
    }

    /// Turns containers without any expression back into one literal value.
    fn fold_literals(self) -> Template {
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
        }));
        assert_eq!(
            t.eval(&ctx).unwrap(),
            json!({"greeting": "Hello, world! n=2", "list": [10, 20], "obj": {"a": {"b": 2}}, "plain": ["x", 1, true]})
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
        assert!(err.to_string().contains("nosuchfn"), "{err}");
        let err = Expr::compile(".a | (").unwrap_err();
        assert!(
            err.to_string().starts_with("jq expression `.a | (`"),
            "{err}"
        );
        let mut problems = Vec::new();
        Template::parse(&json!("${{ .a "), "with.x", &mut problems);
        assert_eq!(problems[0].0, "with.x");
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
}
