//! YAML (and JSON, which is YAML) read into a tree of values that know where they are in the file,
//! so that every problem can be reported as `line:column`.
//!
//! The events come from `granit-parser`, the YAML 1.2 parser under `serde-saphyr`. Scalars are
//! resolved with the YAML 1.2 core schema: `true`/`false`, `null`/`~`/empty, integers and floats
//! unquoted; everything else, and everything quoted, is a string (so `on:` is the key "on").

use std::collections::HashMap;
use std::ops::Range;

use serde_json::Value;
use serde_saphyr::granit_parser::{Event, Parser, ScalarStyle, Span};

/// A position in a file: line and column, both from 1. Columns count characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Pos {
    pub line: u32,
    pub column: u32,
}

impl Pos {
    pub const START: Pos = Pos { line: 1, column: 1 };
}

/// A node of the document.
#[derive(Debug, Clone)]
pub struct Node {
    pub pos: Pos,
    pub value: Yaml,
    /// Byte range of a scalar's source text (with quotes or block indicators), to find positions
    /// inside strings.
    pub raw: Range<usize>,
}

#[derive(Debug, Clone)]
pub enum Yaml {
    Null,
    Bool(bool),
    Number(serde_json::Number),
    Str(String),
    Seq(Vec<Node>),
    Map(Vec<(Key, Node)>),
}

#[derive(Debug, Clone)]
pub struct Key {
    pub name: String,
    pub pos: Pos,
}

impl Node {
    /// What kind of value this is, for messages: "a string", "a list", ...
    pub fn kind(&self) -> &'static str {
        match &self.value {
            Yaml::Null => "null",
            Yaml::Bool(_) => "a boolean",
            Yaml::Number(_) => "a number",
            Yaml::Str(_) => "a string",
            Yaml::Seq(_) => "a list",
            Yaml::Map(_) => "a mapping",
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match &self.value {
            Yaml::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The node as JSON.
    pub fn to_json(&self) -> Value {
        match &self.value {
            Yaml::Null => Value::Null,
            Yaml::Bool(b) => Value::Bool(*b),
            Yaml::Number(n) => Value::Number(n.clone()),
            Yaml::Str(s) => Value::String(s.clone()),
            Yaml::Seq(items) => Value::Array(items.iter().map(Node::to_json).collect()),
            Yaml::Map(entries) => Value::Object(
                entries
                    .iter()
                    .map(|(k, v)| (k.name.clone(), v.to_json()))
                    .collect(),
            ),
        }
    }
}

/// A problem found while reading the YAML itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub pos: Pos,
    pub message: String,
    pub hint: Option<String>,
}

/// The most nodes a document may expand to (aliases included), against alias bombs.
const MAX_NODES: usize = 100_000;

/// A source file with a table of line starts.
pub struct Source<'a> {
    pub text: &'a str,
    line_starts: Vec<usize>,
}

impl<'a> Source<'a> {
    pub fn new(text: &'a str) -> Source<'a> {
        let line_starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Source { text, line_starts }
    }

    /// The position of a byte offset.
    pub fn pos(&self, byte: usize) -> Pos {
        let byte = byte.min(self.text.len());
        let line = self.line_starts.partition_point(|&s| s <= byte) - 1;
        let start = self.line_starts[line];
        let column = self.text[start..byte].chars().count();
        Pos {
            line: line as u32 + 1,
            column: column as u32 + 1,
        }
    }

    /// The byte offset of a parser marker (line from 1, column from 0, in characters).
    fn byte(&self, line: usize, col: usize) -> usize {
        let Some(&start) = self.line_starts.get(line.saturating_sub(1)) else {
            return self.text.len();
        };
        self.text[start..]
            .char_indices()
            .nth(col)
            .map_or(self.text.len(), |(i, _)| start + i)
    }

    fn span(&self, span: &Span) -> Range<usize> {
        let a = self.byte(span.start.line(), span.start.col());
        let b = self.byte(span.end.line(), span.end.col());
        a..b.max(a)
    }

    /// The position of byte `offset` of the string value of `node`, found in its source text. For
    /// an offset inside a `${{ }}`, the expression is looked up in the source (counting the
    /// `${{` before it), so positions are exact for plain, quoted and block strings alike unless
    /// the expression itself contains escapes or line folding; then the `${{` is pointed at.
    pub fn pos_in(&self, node: &Node, offset: usize) -> Pos {
        let Yaml::Str(value) = &node.value else {
            return node.pos;
        };
        let offset = offset.min(value.len());
        let raw = &self.text[node.raw.clone()];
        // The `${{` of the expression that holds `offset`.
        let Some(open) = value[..offset.saturating_add(3).min(value.len())]
            .rfind("${{")
            .filter(|&o| o <= offset)
        else {
            // Plain text: exact when the source spells the value out.
            let quote = usize::from(raw.starts_with(['"', '\'']));
            return match raw.get(quote..).filter(|r| r.starts_with(&value[..offset])) {
                Some(_) => self.pos(node.raw.start + quote + offset),
                None => node.pos,
            };
        };
        let nth = value[..open].matches("${{").count();
        let Some((raw_open, _)) = raw.match_indices("${{").nth(nth) else {
            return node.pos;
        };
        let within = &value[open..offset];
        if raw[raw_open..].starts_with(within) {
            self.pos(node.raw.start + raw_open + within.len())
        } else {
            self.pos(node.raw.start + raw_open)
        }
    }
}

/// Reads one YAML document. `Err` holds the problems that stopped reading (a syntax error, a
/// second document, too many nodes); problems that do not stop it (duplicate keys, values JSON
/// cannot hold) are added to `problems` and the tree is still returned.
pub fn parse(source: &Source<'_>, problems: &mut Vec<Diagnostic>) -> Result<Node, Diagnostic> {
    let mut builder = Builder {
        source,
        stack: Vec::new(),
        anchors: HashMap::new(),
        nodes: 0,
        root: None,
        documents: 0,
    };
    for item in Parser::new_from_str(source.text) {
        let (event, span) = item.map_err(|e| {
            let m = e.marker();
            Diagnostic {
                pos: source.pos(source.byte(m.line(), m.col())),
                message: format!("YAML syntax: {}", e.info()),
                hint: Some(
                    "check the indentation and quoting around here; strings with `: ` or a \
                     leading `{`, `[`, `*`, `&` or `!` need quotes"
                        .into(),
                ),
            }
        })?;
        builder.event(event, &span, problems)?;
    }
    Ok(builder.root.unwrap_or(Node {
        pos: Pos::START,
        value: Yaml::Null,
        raw: 0..0,
    }))
}

enum Frame {
    Seq {
        node: Node,
        anchor: usize,
        items: Vec<Node>,
    },
    Map {
        node: Node,
        anchor: usize,
        entries: Vec<(Key, Node)>,
        key: Option<Key>,
    },
}

struct Builder<'s, 'a> {
    source: &'s Source<'a>,
    stack: Vec<Frame>,
    anchors: HashMap<usize, Node>,
    nodes: usize,
    root: Option<Node>,
    documents: usize,
}

impl Builder<'_, '_> {
    fn event(
        &mut self,
        event: Event<'_>,
        span: &Span,
        problems: &mut Vec<Diagnostic>,
    ) -> Result<(), Diagnostic> {
        let range = self.source.span(span);
        let pos = self.source.pos(range.start);
        match event {
            Event::DocumentStart(..) => {
                self.documents += 1;
                if self.documents > 1 {
                    return Err(Diagnostic {
                        pos,
                        message: "a second YAML document in the file".into(),
                        hint: Some("put each workflow in its own file".into()),
                    });
                }
            }
            Event::Scalar(text, style, anchor, tag) => {
                let value = match tag.as_ref().and_then(|t| t.core_suffix()) {
                    Some("str") => Yaml::Str(text.into_owned()),
                    _ if tag.as_ref().is_some_and(|t| t.core_suffix().is_none()) => {
                        problems.push(Diagnostic {
                            pos,
                            message: "YAML tags other than the core ones (`!!str`, ...) are not \
                                      supported"
                                .into(),
                            hint: Some("remove the tag".into()),
                        });
                        Yaml::Str(text.into_owned())
                    }
                    _ if style != ScalarStyle::Plain => Yaml::Str(text.into_owned()),
                    _ => match resolve_plain(&text) {
                        Ok(v) => v,
                        Err(message) => {
                            problems.push(Diagnostic {
                                pos,
                                message,
                                hint: Some("quote it to make it a string".into()),
                            });
                            Yaml::Null
                        }
                    },
                };
                self.node(
                    Node {
                        pos,
                        value,
                        raw: range,
                    },
                    anchor,
                    problems,
                )?;
            }
            Event::SequenceStart(_, anchor, _) => self.stack.push(Frame::Seq {
                node: Node {
                    pos,
                    value: Yaml::Null,
                    raw: range,
                },
                anchor,
                items: Vec::new(),
            }),
            Event::MappingStart(_, anchor, _) => self.stack.push(Frame::Map {
                node: Node {
                    pos,
                    value: Yaml::Null,
                    raw: range,
                },
                anchor,
                entries: Vec::new(),
                key: None,
            }),
            Event::SequenceEnd => {
                if let Some(Frame::Seq {
                    mut node,
                    anchor,
                    items,
                }) = self.stack.pop()
                {
                    node.value = Yaml::Seq(items);
                    self.node(node, anchor, problems)?;
                }
            }
            Event::MappingEnd => {
                if let Some(Frame::Map {
                    mut node,
                    anchor,
                    entries,
                    ..
                }) = self.stack.pop()
                {
                    node.value = Yaml::Map(entries);
                    self.node(node, anchor, problems)?;
                }
            }
            Event::Alias(id) => {
                let Some(mut node) = self.anchors.get(&id).cloned() else {
                    return Err(Diagnostic {
                        pos,
                        message: "an alias to an anchor that is not defined".into(),
                        hint: Some("define the anchor (`&name`) before its alias (`*name`)".into()),
                    });
                };
                node.pos = pos;
                self.nodes += count(&node);
                self.node(node, 0, problems)?;
            }
            _ => {}
        }
        Ok(())
    }

    /// A complete node: it goes into its parent, or becomes the root.
    fn node(
        &mut self,
        node: Node,
        anchor: usize,
        problems: &mut Vec<Diagnostic>,
    ) -> Result<(), Diagnostic> {
        self.nodes += 1;
        if self.nodes > MAX_NODES {
            return Err(Diagnostic {
                pos: node.pos,
                message: format!("the document expands to more than {MAX_NODES} values"),
                hint: Some("use fewer aliases (`*name`)".into()),
            });
        }
        if anchor != 0 {
            self.anchors.insert(anchor, node.clone());
        }
        match self.stack.last_mut() {
            None => self.root = Some(node),
            Some(Frame::Seq { items, .. }) => items.push(node),
            Some(Frame::Map { entries, key, .. }) => match key.take() {
                None => {
                    let name = match &node.value {
                        Yaml::Str(s) => s.clone(),
                        Yaml::Null => "null".into(),
                        Yaml::Bool(b) => b.to_string(),
                        Yaml::Number(n) => n.to_string(),
                        Yaml::Seq(_) | Yaml::Map(_) => {
                            problems.push(Diagnostic {
                                pos: node.pos,
                                message: "a key that is a list or a mapping".into(),
                                hint: Some("keys are names, such as `id`".into()),
                            });
                            String::new()
                        }
                    };
                    if let Some((first, _)) = entries.iter().find(|(k, _)| k.name == name) {
                        problems.push(Diagnostic {
                            pos: node.pos,
                            message: format!(
                                "the key `{name}` appears twice in this mapping (first at line {})",
                                first.pos.line
                            ),
                            hint: Some("remove one of them".into()),
                        });
                    }
                    *key = Some(Key {
                        name,
                        pos: node.pos,
                    });
                }
                Some(k) => entries.push((k, node)),
            },
        }
        Ok(())
    }
}

fn count(node: &Node) -> usize {
    1 + match &node.value {
        Yaml::Seq(items) => items.iter().map(count).sum(),
        Yaml::Map(entries) => entries.iter().map(|(_, v)| count(v)).sum(),
        _ => 0,
    }
}

/// The YAML 1.2 core schema for plain scalars.
fn resolve_plain(text: &str) -> Result<Yaml, String> {
    Ok(match text {
        "" | "~" | "null" | "Null" | "NULL" => Yaml::Null,
        "true" | "True" | "TRUE" => Yaml::Bool(true),
        "false" | "False" | "FALSE" => Yaml::Bool(false),
        ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" | "-.inf" | "-.Inf" | "-.INF"
        | ".nan" | ".NaN" | ".NAN" => {
            return Err(format!("`{text}` is a number JSON cannot hold"));
        }
        _ => {
            let digits = text.strip_prefix(['-', '+']).unwrap_or(text);
            if let Some(hex) = text.strip_prefix("0x") {
                match i64::from_str_radix(hex, 16) {
                    Ok(n) => Yaml::Number(n.into()),
                    Err(_) => Yaml::Str(text.into()),
                }
            } else if let Some(oct) = text.strip_prefix("0o") {
                match i64::from_str_radix(oct, 8) {
                    Ok(n) => Yaml::Number(n.into()),
                    Err(_) => Yaml::Str(text.into()),
                }
            } else if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
                match text.parse::<i64>() {
                    Ok(n) => Yaml::Number(n.into()),
                    Err(_) => match text
                        .parse::<f64>()
                        .ok()
                        .and_then(serde_json::Number::from_f64)
                    {
                        Some(n) => Yaml::Number(n),
                        None => Yaml::Str(text.into()),
                    },
                }
            } else if is_float(digits) {
                match text
                    .parse::<f64>()
                    .ok()
                    .and_then(serde_json::Number::from_f64)
                {
                    Some(n) => Yaml::Number(n),
                    None => Yaml::Str(text.into()),
                }
            } else {
                Yaml::Str(text.into())
            }
        }
    })
}

/// `[0-9]*(\.[0-9]*)?([eE][-+]?[0-9]+)?` with at least one digit before the exponent.
fn is_float(s: &str) -> bool {
    let (mantissa, exponent) = match s.find(['e', 'E']) {
        Some(i) => (&s[..i], Some(&s[i + 1..])),
        None => (s, None),
    };
    let (int, frac) = match mantissa.split_once('.') {
        Some((i, f)) => (i, f),
        None => (mantissa, ""),
    };
    let digits = |t: &str| t.bytes().all(|b| b.is_ascii_digit());
    let mantissa_ok = digits(int) && digits(frac) && !(int.is_empty() && frac.is_empty());
    let exponent_ok = exponent.is_none_or(|e| {
        let e = e.strip_prefix(['-', '+']).unwrap_or(e);
        !e.is_empty() && digits(e)
    });
    mantissa_ok && exponent_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str) -> (Result<Node, Diagnostic>, Vec<Diagnostic>) {
        let source = Source::new(text);
        let mut problems = Vec::new();
        (parse(&source, &mut problems), problems)
    }

    #[test]
    fn nodes_know_their_positions_and_scalars_resolve_like_yaml_1_2() {
        let text = "on: x\nlist:\n  - 1\n  - 2.5\n  - 'q'\n  - true\n  - ~\n  - yes\n  - 0x1f\nflow: {a: [b, \"c\"]}\n";
        let (node, problems) = read(text);
        assert!(problems.is_empty(), "{problems:?}");
        let node = node.unwrap();
        let Yaml::Map(entries) = &node.value else {
            panic!()
        };
        assert_eq!(entries[0].0.name, "on");
        assert_eq!(entries[1].0.pos, Pos { line: 2, column: 1 });
        assert_eq!(entries[1].1.pos, Pos { line: 3, column: 3 });
        assert_eq!(
            node.to_json(),
            serde_json::json!({"on": "x", "list": [1, 2.5, "q", true, null, "yes", 31], "flow": {"a": ["b", "c"]}})
        );
        let Yaml::Map(flow) = &entries[2].1.value else {
            panic!()
        };
        assert_eq!(
            flow[0].1.pos,
            Pos {
                line: 10,
                column: 11
            }
        );
    }

    #[test]
    fn duplicate_keys_syntax_errors_and_second_documents_are_reported() {
        let (_, problems) = read("a: 1\nb: 2\na: 3\n");
        assert_eq!(problems[0].pos, Pos { line: 3, column: 1 });
        assert!(problems[0].message.contains("`a` appears twice"));
        let (err, _) = read("a: [1, 2\nb: 3\n");
        let err = err.unwrap_err();
        assert!(err.message.starts_with("YAML syntax"), "{err:?}");
        let (err, _) = read("a: 1\n---\nb: 2\n");
        assert_eq!(err.unwrap_err().pos.line, 2);
        let (node, _) = read("a: &x {k: 1}\nb: *x\n");
        assert_eq!(
            node.unwrap().to_json(),
            serde_json::json!({"a": {"k": 1}, "b": {"k": 1}})
        );
    }

    #[test]
    fn positions_inside_strings_point_at_the_expression() {
        let text = "a: \"x ${{ .b }}\"\nc: |\n  line\n  y ${{ .d | e }}\nf: plain ${{ .g }}\n";
        let source = Source::new(text);
        let node = parse(&source, &mut Vec::new()).unwrap();
        let Yaml::Map(e) = &node.value else { panic!() };
        // `.b` is at byte 6 of "x ${{ .b }}".
        assert_eq!(
            source.pos_in(&e[0].1, 6),
            Pos {
                line: 1,
                column: 11
            }
        );
        let block = e[1].1.as_str().unwrap();
        let at = block.find(".d").unwrap() + 5;
        assert_eq!(
            source.pos_in(&e[1].1, at),
            Pos {
                line: 4,
                column: 14
            }
        );
        assert_eq!(
            source.pos_in(&e[2].1, 10),
            Pos {
                line: 5,
                column: 14
            }
        );
    }
}
