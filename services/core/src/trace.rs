//! W3C Trace Context: parsing `traceparent` and `tracestate` by the W3C rules, as carried by the
//! CloudEvents distributed-tracing extension. An invalid `traceparent` is never propagated: the run
//! starts a new trace instead (and drops the `tracestate` that went with it).

use std::fmt;

/// A valid trace context, always written back in version `00` form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trace {
    pub trace_id: String,
    pub parent_id: String,
    pub flags: u8,
    /// The vendor entries, normalized (members joined by `,`), if any.
    pub state: Option<String>,
}

impl Trace {
    /// A new trace (sampled), for runs that start without a valid context. Its parent id is no
    /// span's: it marks the run span of this trace as a root ([`crate::spans::is_root`]).
    pub fn new() -> Trace {
        let trace_id = format!("{:032x}", ulid::Ulid::generate().0);
        Trace {
            parent_id: crate::spans::root_parent(&trace_id),
            trace_id,
            flags: 1,
            state: None,
        }
    }

    /// Parses the values of every `traceparent` and `tracestate` header (or CloudEvent extension)
    /// received. `None` when `traceparent` is missing or invalid. An invalid `tracestate` is dropped
    /// while the valid `traceparent` is kept, as the W3C processing model says.
    pub fn parse(traceparents: &[&str], tracestates: &[&str]) -> Option<Trace> {
        let mut trace = parse_traceparent(traceparents)?;
        trace.state = parse_tracestate(tracestates).ok().flatten();
        Some(trace)
    }

    /// The `traceparent` value.
    pub fn traceparent(&self) -> String {
        format!("00-{}-{}-{:02x}", self.trace_id, self.parent_id, self.flags)
    }
}

impl Default for Trace {
    fn default() -> Self {
        Trace::new()
    }
}

impl fmt::Display for Trace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.traceparent())
    }
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// `traceparent`: exactly one header; `version-traceid-parentid-flags` in lower-case hex; version
/// `ff` is invalid; ids are not all zeros; a future version may append `-...` fields.
fn parse_traceparent(values: &[&str]) -> Option<Trace> {
    let [value] = values else { return None };
    let value = value
        .trim_end_matches([' ', '\t'])
        .trim_start_matches([' ', '\t']);
    let b = value.as_bytes();
    if b.len() < 55 || b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
        return None;
    }
    let (version, trace_id, parent_id, flags) =
        (&value[..2], &value[3..35], &value[36..52], &value[53..55]);
    if ![version, trace_id, parent_id, flags]
        .iter()
        .all(|p| is_lower_hex(p))
        || version == "ff"
    {
        return None;
    }
    // Version 00 has exactly these fields; a later version may add fields after a dash.
    if version == "00" && b.len() != 55 || b.len() > 55 && b[55] != b'-' {
        return None;
    }
    if trace_id.bytes().all(|c| c == b'0') || parent_id.bytes().all(|c| c == b'0') {
        return None;
    }
    Some(Trace {
        trace_id: trace_id.to_owned(),
        parent_id: parent_id.to_owned(),
        flags: u8::from_str_radix(flags, 16).ok()?,
        state: None,
    })
}

/// `tracestate`: every header joined by `,`; empty members (and spaces or tabs around members) are
/// ignored; each member is `key=value`, key `[a-z][a-z0-9_-*/@]{0,255}`, value 1 to 256 printable
/// ASCII characters other than `,` and `=`, not ending in a space. `Ok(None)` when there is none.
pub fn parse_tracestate(values: &[&str]) -> Result<Option<String>, String> {
    let mut members = Vec::new();
    for member in values.iter().flat_map(|v| v.split(',')) {
        let member = member.trim_matches([' ', '\t']);
        if member.is_empty() {
            continue;
        }
        let (key, value) = member
            .split_once('=')
            .ok_or_else(|| format!("member {member:?} has no `=`"))?;
        let key_ok = key.len() <= 256
            && key.bytes().next().is_some_and(|c| c.is_ascii_lowercase())
            && key
                .bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"_-*/@".contains(&c));
        if !key_ok {
            return Err(format!("key {key:?} is not a valid tracestate key"));
        }
        let value_ok = !value.is_empty()
            && value.len() <= 256
            && value
                .bytes()
                .all(|c| (0x20..=0x7e).contains(&c) && c != b',' && c != b'=')
            && !value.ends_with(' ');
        if !value_ok {
            return Err(format!("value of {key:?} is not a valid tracestate value"));
        }
        members.push(member);
    }
    Ok((!members.is_empty()).then(|| members.join(",")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rewrites_in_version_00() {
        let t = Trace::parse(
            &["cc-12345678901234567890123456789012-1234567890123456-01-future"],
            &["b=2 , a=1"],
        )
        .unwrap();
        assert_eq!(
            t.traceparent(),
            "00-12345678901234567890123456789012-1234567890123456-01"
        );
        assert_eq!(t.state.as_deref(), Some("b=2,a=1"));
        assert!(
            Trace::parse(
                &["00-ABCDEF78901234567890123456789012-1234567890123456-01"],
                &[]
            )
            .is_none(),
            "upper case"
        );
        let kept = Trace::parse(
            &["00-12345678901234567890123456789012-1234567890123456-01"],
            &["FOO=1"],
        )
        .unwrap();
        assert_eq!(
            kept.state, None,
            "an invalid tracestate is dropped, the traceparent kept"
        );
        let fresh = Trace::new();
        assert_eq!(
            Trace::parse(&[&fresh.traceparent()], &[]).unwrap().trace_id,
            fresh.trace_id
        );
    }

    /// Every header set the W3C test suite sends gets the reference implementation's verdict.
    #[test]
    fn w3c_reference_verdicts() {
        let cases: serde_json::Value = serde_json::from_str(include_str!(
            "../../../tests/fixtures/trace-context/reference-server-verdicts.generated.json"
        ))
        .unwrap();
        let cases = cases.as_array().unwrap();
        assert!(cases.len() > 80);
        for case in cases {
            let headers: Vec<(String, String)> =
                serde_json::from_value(case["headers"].clone()).unwrap();
            let values = |name: &str| -> Vec<&str> {
                headers
                    .iter()
                    .filter(|(n, _)| n.eq_ignore_ascii_case(name))
                    .map(|(_, v)| v.as_str())
                    .collect()
            };
            let parent = parse_traceparent(&values("traceparent"));
            assert_eq!(
                parent.is_some(),
                case["is_traceparent_valid"].as_bool().unwrap(),
                "traceparent verdict for {headers:?}"
            );
            if let Some(expected) = case.get("is_tracestate_valid").and_then(|v| v.as_bool()) {
                let state = parse_tracestate(&values("tracestate"));
                assert_eq!(
                    state.is_ok(),
                    expected,
                    "tracestate verdict for {headers:?}: {state:?}"
                );
            }
        }
    }
}
