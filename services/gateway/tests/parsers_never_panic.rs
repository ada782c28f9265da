//! No byte sequence crashes the gateway: arbitrary bytes, and the repository's fixtures with bytes
//! flipped, cut or inserted, with arbitrary header sets, go through the gateway's four parsers. Each
//! returns, an error with a message, and an event it accepts is one the gateway keeps: it passes
//! the gateway's checks before the answer (`admit::check`), and survives what happens next:
//! encoding for JetStream and decoding back (the trigger consumer's side) with every attribute.
//!
//! The stable-toolchain companion of the cargo-fuzz targets in `fuzz/` (see `fuzz/README.md`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use baton_core::binding::{self, Limits};
use baton_gateway::github::{self, Delivery};
use baton_gateway::{admit, alertmanager, ingress};
use cloudevents::Event;
use hmac::{Hmac, Mac};
use proptest::prelude::*;
use proptest::sample::{Index, select};
use sha2::Sha256;

const SECRET: &[u8] = b"It's a Secret to Everybody";

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// The files of a fixture folder whose names end with `suffix`, sorted.
fn files(dir: &str, suffix: &str) -> Vec<Vec<u8>> {
    let dir = fixtures_dir().join(dir);
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(suffix))
        .collect();
    paths.sort();
    assert!(
        !paths.is_empty(),
        "no {suffix} fixtures in {}",
        dir.display()
    );
    paths.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

static GITHUB: LazyLock<Vec<Vec<u8>>> = LazyLock::new(|| files("github/payloads", ".json"));
static ALERTMANAGER: LazyLock<Vec<Vec<u8>>> =
    LazyLock::new(|| files("alertmanager/webhooks", ".body.json"));
static CLOUDEVENTS: LazyLock<Vec<Vec<u8>>> = LazyLock::new(|| {
    let mut all = files("cloudevents/sdk-test-vectors/sdk-java-json/v1", ".json");
    all.extend(files(
        "cloudevents/sdk-test-vectors/sdk-java-json/v03",
        ".json",
    ));
    // A batch of the first three.
    let mut batch = b"[".to_vec();
    batch.extend(all[..3].join(&b","[..]));
    batch.push(b']');
    all.push(batch);
    all
});

/// One change to a byte string; positions are taken modulo its length.
#[derive(Debug, Clone)]
enum Mutation {
    Flip(Index, u8),
    Truncate(Index),
    Insert(Index, Vec<u8>),
    Remove(Index, usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<Index>(), 0..8u8).prop_map(|(at, bit)| Mutation::Flip(at, bit)),
        any::<Index>().prop_map(Mutation::Truncate),
        (
            any::<Index>(),
            prop_oneof![
                proptest::collection::vec(any::<u8>(), 1..8),
                // Bytes that mean something to JSON and to percent-decoding.
                select(vec![
                    "\"", "\\", "\\u", "\\ud800", "{", "}", "[", "]", ",", ":", "null", "-1e999",
                    "%", "%0A", "\n", "\u{0}", "\u{fffd}",
                    // Control characters a JSON string may hold (escaped, or a raw DEL).
                    "\\u0001", "\\u007f", "\\n", "\\t", "\u{7f}",
                ])
                .prop_map(|s| s.as_bytes().to_vec()),
            ]
        )
            .prop_map(|(at, bytes)| Mutation::Insert(at, bytes)),
        (any::<Index>(), 1..16usize).prop_map(|(at, n)| Mutation::Remove(at, n)),
    ]
}

fn apply(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        let len = bytes.len();
        match m {
            Mutation::Flip(at, bit) if len > 0 => bytes[at.index(len)] ^= 1 << bit,
            Mutation::Truncate(at) => bytes.truncate(at.index(len + 1)),
            Mutation::Insert(at, new) => {
                let at = at.index(len + 1);
                bytes.splice(at..at, new.iter().copied());
            }
            Mutation::Remove(at, n) if len > 0 => {
                let at = at.index(len);
                bytes.drain(at..(at + n).min(len));
            }
            _ => {}
        }
    }
    bytes
}

/// Arbitrary bytes, or a fixture with a few mutations.
fn body(fixtures: &'static LazyLock<Vec<Vec<u8>>>) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        1 => proptest::collection::vec(any::<u8>(), 0..256),
        3 => (
            select(fixtures.as_slice()),
            proptest::collection::vec(mutation(), 0..4)
        )
            .prop_map(|(base, mutations)| apply(base, &mutations)),
    ]
}

/// Header names and values as bytes: ones the parsers look at, and arbitrary ones (which may not
/// be valid header names or values at all; those are skipped, as a server would refuse them).
fn headers() -> impl Strategy<Value = Vec<(Vec<u8>, Vec<u8>)>> {
    let name = prop_oneof![
        3 => select(
            vec![
                "content-type", "ce-specversion", "ce-id", "ce-source", "ce-type", "ce-time",
                "ce-subject", "ce-dataschema", "ce-datacontenttype", "ce-ext", "CE-Ext", "ce-",
                "ce-a_b", "x-github-event", "x-github-delivery", "x-hub-signature-256",
            ]
        )
        .prop_map(|s| s.as_bytes().to_vec()),
        1 => "[a-zA-Z0-9-]{1,12}".prop_map(String::into_bytes),
        1 => proptest::collection::vec(any::<u8>(), 0..12),
    ];
    let value = prop_oneof![
        3 => select(
            vec![
                "1.0", "0.3", "", "1", "/s", "com.example.t", "2018-04-05T03:56:24Z",
                "2018-04-05T03:56:24.123456789+23:59", "http://example.com/schema", "not a uri",
                "application/cloudevents+json", "application/cloudevents-batch+json",
                "application/cloudevents+xml", "application/json; charset=utf-8", "text/plain",
                "%0A", "a%0D%0Ab", "%", "%4", "%zz", "%+A", "%C0%A0", "\"quoted \\\"x\\\"\"", "\"\\",
                "release", "push", "ping", "membership", "deployment_status", "marketplace_purchase",
                "commit_comment", "sha256=", "sha1=abc", "72d3162e\tcc78",
                "sha256=0000000000000000000000000000000000000000000000000000000000000000",
            ]
        )
        .prop_map(|s| s.as_bytes().to_vec()),
        1 => "[ -~]{0,24}".prop_map(String::into_bytes),
        1 => proptest::collection::vec(any::<u8>(), 0..24),
    ];
    proptest::collection::vec((name, value), 0..8)
}

fn http_headers(lines: &[(Vec<u8>, Vec<u8>)]) -> http::HeaderMap {
    let mut map = http::HeaderMap::new();
    for (name, value) in lines {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(name),
            http::HeaderValue::from_bytes(value),
        ) {
            map.append(name, value);
        }
    }
    map
}

fn nats_headers(lines: &[(Vec<u8>, Vec<u8>)]) -> async_nats::HeaderMap {
    let mut map = async_nats::HeaderMap::new();
    for (name, value) in lines {
        let (Ok(name), Ok(value)) = (std::str::from_utf8(name), std::str::from_utf8(value)) else {
            continue;
        };
        if let (Ok(name), Ok(value)) = (
            name.parse::<async_nats::header::HeaderName>(),
            value.parse::<async_nats::HeaderValue>(),
        ) {
            map.append(name, value);
        }
    }
    map
}

fn attributes(event: &Event) -> BTreeMap<String, String> {
    event
        .iter()
        .map(|(name, value)| (name.to_owned(), value.to_string()))
        .collect()
}

/// What the gateway does with an accepted event: checks it, encodes it for JetStream; the trigger
/// consumer decodes it back, with every attribute. Fixtures are far below these limits, so an event
/// a parser yields is one the gateway accepts.
fn store(event: &Event) -> Result<(), TestCaseError> {
    let limits = admit::Limits {
        max_event_bytes: 1 << 20,
        max_payload: 1 << 20,
    };
    if let Err(refused) = admit::check(event, &limits) {
        return Err(TestCaseError::fail(format!(
            "a parsed event is refused when it is stored: {}",
            refused.message
        )));
    }
    let (headers, body) = ingress::message(event);
    let unlimited = Limits {
        max_bytes: usize::MAX,
    };
    let back = binding::nats::decode_with(&unlimited, Some(&headers), &body)
        .map_err(|e| TestCaseError::fail(format!("stored event does not decode: {e}")))?;
    prop_assert_eq!(attributes(&back), attributes(event));
    binding::http::encode_binary(event);
    binding::http::encode_structured(event);
    Ok(())
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 512,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn cloudevents_http_decode_never_panics(
        lines in headers(),
        content_type in proptest::option::of(select(vec![
            binding::http::STRUCTURED,
            binding::http::BATCH,
        ])),
        body in body(&CLOUDEVENTS),
    ) {
        let mut headers = http_headers(&lines);
        // Often a structured event or a batch, so the JSON format is reached, not only binary mode.
        if let Some(content_type) = content_type {
            headers
                .entry(http::header::CONTENT_TYPE)
                .or_insert(http::HeaderValue::from_static(content_type));
        }
        match binding::http::decode(&Limits::default(), &headers, &body) {
            Ok(events) => {
                for event in &events {
                    store(event)?;
                }
            }
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }

    #[test]
    fn cloudevents_nats_decode_never_panics(
        lines in proptest::option::of(headers()),
        body in body(&CLOUDEVENTS),
    ) {
        let headers = lines.as_deref().map(nats_headers);
        match binding::nats::decode(headers.as_ref(), &body) {
            Ok(event) => store(&event)?,
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }

    #[test]
    fn github_verify_and_delivery_never_panic(
        lines in headers(),
        event in select(
            vec!["release", "push", "ping", "check_suite", "workflow_run", "deployment_status",
             "membership", "commit_comment", "marketplace_purchase", "fancy_new_event"]
        ),
        sign in any::<bool>(),
        body in body(&GITHUB),
    ) {
        let mut headers = http_headers(&lines);
        // Mostly a delivery's own headers, so the mapping is reached, not only its first checks.
        headers.entry("x-github-event").or_insert(http::HeaderValue::from_static(event));
        headers
            .entry("x-github-delivery")
            .or_insert(http::HeaderValue::from_static("72d3162e-cc78-11e3-81ab-4c9367dc0958"));
        if sign {
            let mut mac = Hmac::<Sha256>::new_from_slice(SECRET).unwrap();
            mac.update(&body);
            let hex: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
            headers.insert("x-hub-signature-256", format!("sha256={hex}").parse().unwrap());
        }
        let signature = headers.get("x-hub-signature-256").and_then(|v| v.to_str().ok());
        match github::verify(SECRET, &body, signature) {
            Ok(()) => {}
            Err(e) => prop_assert!(!e.message.is_empty()),
        }
        match github::delivery(&headers, &body) {
            Ok(Delivery::Event(event)) => store(&event)?,
            Ok(Delivery::Ping { .. }) => {}
            Ok(Delivery::Ignored(reason)) => prop_assert!(!reason.is_empty()),
            Err(e) => prop_assert!(!e.message.is_empty()),
        }
    }

    #[test]
    fn alertmanager_events_never_panic(body in body(&ALERTMANAGER)) {
        match alertmanager::events(&body) {
            Ok(events) => {
                for event in &events {
                    store(event)?;
                }
            }
            Err(e) => prop_assert!(!e.message.is_empty()),
        }
    }
}

/// The crashing input the fuzzer's `alertmanager` target was pointed at (see
/// `alertmanager::tests::a_fingerprint_with_a_line_break_is_stored`), through this file's checks.
#[test]
fn a_fingerprint_with_a_line_break_is_refused() {
    let body =
        br#"{"version":"4","alerts":[{"fingerprint":"a\nb","status":"firing","startsAt":"x"}]}"#;
    assert!(alertmanager::events(body).is_err());
}
