//! GitHub webhooks: the `X-Hub-Signature-256` check and the mapping of a delivery to a CloudEvent,
//! as the CloudEvents GitHub adapter specifies: `id` is `X-GitHub-Delivery`, `type` is
//! `com.github.<event>[.<action>]`, `source` and `subject` come from the payload. The data is the
//! request body, byte for byte.
//!
//! CloudEvents strings hold no control characters. One in a payload field that makes the `source`
//! or `subject` is percent-encoded (`%7F`), keeping the event; one in the delivery id or in a field
//! that makes the `type` refuses the delivery with `400`, naming the field.

use chrono::{DateTime, Utc};
use cloudevents::{Event, EventBuilder, EventBuilderV10};
use hmac::{Hmac, Mac};
use http::{HeaderMap, StatusCode};
use serde_json::Value;
use sha2::Sha256;

use crate::Rejection;
use crate::admit::{control_character, escape_controls};

/// What a delivery is, once checked.
#[derive(Debug)]
pub enum Delivery {
    Event(Box<Event>),
    /// GitHub's `ping`, sent when a hook is created: answered, not published.
    Ping {
        zen: String,
    },
    /// An event the adapter has no mapping for: answered 2xx, with the reason.
    Ignored(String),
}

/// How the CloudEvent `type` is completed after `com.github.<event>`.
#[derive(Clone, Copy)]
enum Suffix {
    None,
    /// `.` + the value at this path (`action`, `ref_type`, `deployment_status.state`).
    Field(&'static str),
    /// Membership: `.` + scope + `.` + action.
    ScopeAction,
}

/// How the CloudEvent `source` is found.
#[derive(Clone, Copy)]
enum Source {
    Path(&'static str),
    /// `comment.url` + `/` + `comment.commit_id`.
    CommitComment,
    /// `sender.url` without its last path segment (the user name).
    SenderParent,
    Fixed(&'static str),
}

use Source::Path;
use Suffix::{Field, ScopeAction};
const ACTION: Suffix = Field("action");
const REPO: Source = Path("repository.url");

/// One row of the adapter's table: event, type suffix, source, subject path, time paths (first
/// non-null wins; none: the current time).
type Mapping = (
    &'static str,
    Suffix,
    Source,
    Option<&'static str>,
    &'static [&'static str],
);

#[rustfmt::skip]
const EVENTS: &[Mapping] = &[
    ("branch_protection_configuration", ACTION, REPO, None, &[]),
    ("branch_protection_rule", ACTION, REPO, Some("rule.id"), &["rule.updated_at"]),
    ("check_run", ACTION, REPO, Some("check_run.id"), &["check_run.completed_at", "check_run.started_at"]),
    ("check_suite", ACTION, REPO, Some("check_suite.id"), &["check_suite.updated_at"]),
    ("code_scanning_alert", ACTION, REPO, Some("alert.number"), &[]),
    ("commit_comment", ACTION, Source::CommitComment, Some("comment.id"), &["comment.updated_at"]),
    ("content_reference", ACTION, REPO, Some("content_reference.id"), &[]),
    ("create", Field("ref_type"), REPO, Some("ref"), &[]),
    ("custom_property", ACTION, REPO, Some("definition.property_name"), &[]),
    ("custom_property_values", ACTION, REPO, None, &[]),
    ("delete", Field("ref_type"), REPO, Some("ref"), &[]),
    ("dependabot_alert", ACTION, REPO, Some("alert.id"), &[]),
    ("deploy_key", ACTION, REPO, Some("key.id"), &["key.deleted_at", "key.created_at"]),
    ("deployment", Suffix::None, REPO, Some("deployment.id"), &["deployment.updated_at"]),
    ("deployment_protection_rule", ACTION, Path("deployment.url"), Some("deployment.id"), &[]),
    ("deployment_review", ACTION, Path("deployment.url"), Some("workflow_run.id"), &[]),
    ("deployment_status", Field("deployment_status.state"), Path("deployment.url"), Some("deployment_status.url"), &["deployment_status.updated_at"]),
    ("discussion", ACTION, REPO, Some("discussion.id"), &[]),
    ("discussion_comment", ACTION, REPO, Some("discussion.id"), &["comment.updated_at"]),
    ("fork", Suffix::None, REPO, Some("forkee.url"), &["forkee.created_at"]),
    ("github_app_authorization", Suffix::None, Path("sender.url"), None, &[]),
    ("gollum", Suffix::None, REPO, None, &[]),
    ("installation", ACTION, Path("installation.account.url"), Some("installation.id"), &[]),
    ("installation_repositories", ACTION, Path("installation.account.url"), Some("installation.id"), &[]),
    ("installation_target", ACTION, Path("installation.account.url"), Some("installation.id"), &[]),
    ("issue_comment", ACTION, Path("issue.url"), Some("comment.id"), &["comment.updated_at"]),
    ("issues", ACTION, REPO, Some("issue.number"), &["issue.updated_at"]),
    ("label", ACTION, REPO, Some("label.name"), &[]),
    ("marketplace_purchase", ACTION, Source::SenderParent, Some("marketplace_purchase.account.login"), &["effective_date"]),
    ("member", ACTION, REPO, Some("member.login"), &[]),
    ("membership", ScopeAction, Path("team.url"), Some("member.login"), &[]),
    ("merge_group", ACTION, REPO, Some("merge_group.head_ref"), &[]),
    ("meta", ACTION, REPO, Some("hook_id"), &["hook.updated_at"]),
    ("milestone", ACTION, REPO, Some("milestone.number"), &["milestone.updated_at"]),
    ("organization", ACTION, Path("organization.url"), Some("membership.user.login"), &[]),
    ("org_block", ACTION, Path("organization.url"), Some("blocked_user.login"), &[]),
    ("package", ACTION, REPO, Some("package.id"), &["package.updated_at", "package.created_at"]),
    ("page_build", Suffix::None, REPO, Some("build.url"), &[]),
    ("project_card", ACTION, REPO, Some("project_card.id"), &["project_card.updated_at"]),
    ("project_column", ACTION, REPO, Some("project_column.id"), &["project_column.updated_at"]),
    ("project", ACTION, REPO, Some("project.id"), &["project.updated_at"]),
    ("projects_v2", ACTION, REPO, Some("projects_v2.id"), &["projects_v2.updated_at"]),
    ("projects_v2_item", ACTION, REPO, Some("projects_v2_item.id"), &["projects_v2_item.updated_at"]),
    ("projects_v2_status_update", ACTION, REPO, Some("projects_v2_status_update.id"), &["projects_v2_status_update.updated_at"]),
    ("public", Suffix::None, Path("repository.owner.url"), Some("repository.name"), &["repository.updated_at"]),
    ("pull_request", ACTION, REPO, Some("number"), &["pull_request.updated_at"]),
    ("pull_request_review", ACTION, Path("pull_request.url"), Some("review.id"), &["review.submitted_at"]),
    ("pull_request_review_comment", ACTION, Path("pull_request.url"), Some("comment.id"), &["pull_request.updated_at"]),
    ("pull_request_review_thread", ACTION, Path("pull_request.url"), Some("pull_request.id"), &[]),
    ("push", Suffix::None, REPO, Some("ref"), &[]),
    ("registry_package", ACTION, REPO, Some("registry_package.html_url"), &["registry_package.updated_at"]),
    ("release", ACTION, REPO, Some("release.id"), &["release.published_at", "release.created_at"]),
    ("repository", ACTION, Path("repository.owner.url"), Some("repository.name"), &["repository.updated_at"]),
    ("repository_advisory", ACTION, REPO, Some("repository_advisory.ghsa_id"), &["repository_advisory.updated_at"]),
    ("repository_dispatch", ACTION, Path("repository.owner.url"), None, &[]),
    ("repository_import", Suffix::None, Path("repository.owner.url"), Some("repository.name"), &["repository.updated_at"]),
    ("repository_ruleset", ACTION, Path("repository.owner.url"), Some("repository.name"), &["repository.updated_at"]),
    ("repository_vulnerability_alert", ACTION, REPO, Some("alert.id"), &[]),
    ("secret_scanning_alert", ACTION, REPO, Some("alert.number"), &["alert.updated_at", "alert.created_at"]),
    ("secret_scanning_alert_location", ACTION, REPO, Some("alert.number"), &["alert.updated_at", "alert.created_at"]),
    ("security_advisory", ACTION, Source::Fixed("github.com"), Some("security_advisory.ghsa_id"), &["security_advisory.updated_at"]),
    ("security_and_analysis", Suffix::None, REPO, None, &[]),
    ("sponsorship", ACTION, REPO, Some("sponsorship.sponsor.login"), &[]),
    ("star", ACTION, REPO, None, &["starred_at"]),
    ("status", Field("state"), REPO, Some("sha"), &["updated_at"]),
    ("team", ACTION, REPO, Some("team.id"), &["updated_at"]),
    ("team_add", ACTION, REPO, Some("team.id"), &[]),
    ("watch", ACTION, REPO, None, &[]),
    ("workflow_dispatch", Suffix::None, REPO, Some("workflow"), &[]),
    ("workflow_job", ACTION, REPO, Some("workflow_job.name"), &[]),
    ("workflow_run", ACTION, REPO, Some("workflow.name"), &[]),
];

/// Checks `X-Hub-Signature-256` (`sha256=<hex HMAC-SHA256(secret, body)>`) in constant time.
pub fn verify(secret: &[u8], body: &[u8], header: Option<&str>) -> Result<(), Rejection> {
    let unauthorized = |message: &str| Rejection::new(StatusCode::UNAUTHORIZED, message);
    let Some(header) = header else {
        return Err(unauthorized(
            "no X-Hub-Signature-256 header: set the same secret on the GitHub webhook and on the gateway (BATON_GITHUB_SECRET)",
        ));
    };
    let signature = header
        .strip_prefix("sha256=")
        .and_then(hex)
        .ok_or_else(|| unauthorized("X-Hub-Signature-256 is not `sha256=<64 hex digits>`"))?;
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(body);
    // `verify_slice` compares in constant time.
    mac.verify_slice(&signature).map_err(|_| {
        unauthorized(
            "X-Hub-Signature-256 does not match the body: the webhook's secret differs from the gateway's (BATON_GITHUB_SECRET), or the body was changed on the way",
        )
    })
}

fn hex(text: &str) -> Option<Vec<u8>> {
    // Hex digits only: `from_str_radix` alone would also take a sign (`+f`).
    if text.len() != 64 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok())
        .collect()
}

/// Maps a delivery (already verified) to what the gateway does with it.
pub fn delivery(headers: &HeaderMap, body: &[u8]) -> Result<Delivery, Rejection> {
    let bad = |message: String| Rejection::new(StatusCode::BAD_REQUEST, message);
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let event = header("x-github-event").ok_or_else(|| {
        bad("no X-GitHub-Event header: is this a GitHub webhook delivery?".into())
    })?;
    let id = header("x-github-delivery")
        .filter(|id| !id.is_empty())
        .ok_or_else(|| {
            bad("no X-GitHub-Delivery header: GitHub sends one with every delivery".into())
        })?;
    let payload: Value = serde_json::from_slice(body).map_err(|e| {
        bad(format!(
            "the body is not JSON ({e}): set the webhook's content type to application/json"
        ))
    })?;
    if !payload.is_object() {
        return Err(bad("the body is JSON but not an object".into()));
    }
    if event == "ping" {
        let zen = at(&payload, "zen").unwrap_or_default();
        return Ok(Delivery::Ping { zen });
    }
    let Some(&(_, suffix, source, subject, times)) = EVENTS.iter().find(|(e, ..)| *e == event)
    else {
        return Ok(Delivery::Ignored(format!(
            "GitHub event `{event}` has no CloudEvents mapping in the GitHub adapter; nothing was published"
        )));
    };
    if let Some(c) = control_character(id) {
        return Err(bad(format!(
            "X-GitHub-Delivery contains the control character {c}; GitHub sends a GUID, and a CloudEvent id may not hold one"
        )));
    }
    let missing = |path: &str, what: &str| {
        bad(format!(
            "the `{event}` delivery has no `{path}`, which the CloudEvent {what} is made of"
        ))
    };
    // A part of the type: a word GitHub chose (`published`, `tag`); refused, not encoded, as a
    // type with an escape in it would match no trigger.
    let part = |path: &str| {
        let value = at(&payload, path).ok_or_else(|| missing(path, "type"))?;
        match control_character(&value) {
            None => Ok(value),
            Some(c) => Err(bad(format!(
                "`{path}` of the `{event}` delivery contains the control character {c}; the CloudEvent type is made of it and may not hold one"
            ))),
        }
    };
    let ty = match suffix {
        Suffix::None => format!("com.github.{event}"),
        Field(path) => format!("com.github.{event}.{}", part(path)?),
        ScopeAction => format!("com.github.{event}.{}.{}", part("scope")?, part("action")?),
    };
    let source = match source {
        Path(path) => at(&payload, path).ok_or_else(|| missing(path, "source"))?,
        Source::CommitComment => format!(
            "{}/{}",
            at(&payload, "comment.url").ok_or_else(|| missing("comment.url", "source"))?,
            at(&payload, "comment.commit_id")
                .ok_or_else(|| missing("comment.commit_id", "source"))?
        ),
        Source::SenderParent => {
            let url = at(&payload, "sender.url").ok_or_else(|| missing("sender.url", "source"))?;
            url.rsplit_once('/')
                .map_or(url.clone(), |(p, _)| p.to_owned())
        }
        Source::Fixed(s) => s.to_owned(),
    };
    // Source (a URI) and subject are kept with their control characters percent-encoded.
    let source = escape_controls(&source);
    let time = times
        .iter()
        .find_map(|p| at(&payload, p))
        .and_then(|t| DateTime::parse_from_rfc3339(&t).ok())
        .map_or_else(Utc::now, |t| t.with_timezone(&Utc));
    let mut builder = EventBuilderV10::new()
        .id(id)
        .ty(ty)
        .source(source)
        .time(time)
        .data("application/json", body.to_vec());
    if let Some(subject) = subject.and_then(|p| at(&payload, p)) {
        builder = builder.subject(escape_controls(&subject));
    }
    let event = builder
        .build()
        .map_err(|e| bad(format!("cannot make a CloudEvent of the delivery: {e}")))?;
    Ok(Delivery::Event(Box::new(event)))
}

/// The value at a dotted path, as text (numbers too); `None` when absent, null or empty.
fn at(payload: &Value, path: &str) -> Option<String> {
    let value = path.split('.').try_fold(payload, |v, k| v.get(k))?;
    match value {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloudevents::AttributesReader;

    fn fixture(path: &str) -> Vec<u8> {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
        std::fs::read(root.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn headers(event: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("x-github-event", event.parse().unwrap());
        h.insert(
            "x-github-delivery",
            "72d3162e-cc78-11e3-81ab-4c9367dc0958".parse().unwrap(),
        );
        h
    }

    #[test]
    fn githubs_documented_signature_vector_verifies() {
        let vector: Value =
            serde_json::from_slice(&fixture("github/docs/signature-test-vector.json")).unwrap();
        let secret = vector["secret"].as_str().unwrap().as_bytes();
        let payload = vector["payload"].as_str().unwrap().as_bytes();
        let header = vector["header_value"].as_str().unwrap();
        verify(secret, payload, Some(header)).unwrap();
        let wrong = verify(b"another secret", payload, Some(header)).unwrap_err();
        assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
        assert!(wrong.message.contains("does not match"), "{wrong:?}");
        let changed = verify(secret, b"Hello, World?", Some(header)).unwrap_err();
        assert_eq!(changed.status, StatusCode::UNAUTHORIZED);
        for bad in [None, Some("sha1=abc"), Some("sha256=zz"), Some("sha256=")] {
            assert_eq!(
                verify(secret, payload, bad).unwrap_err().status,
                StatusCode::UNAUTHORIZED
            );
        }
    }

    #[test]
    fn a_signature_is_hex_digits_without_signs() {
        // A body whose HMAC starts with a byte below 0x10, so its first two digits are `0x`.
        let (body, digits) = (0..)
            .map(|i: u32| {
                let body = i.to_string();
                let mut mac = Hmac::<Sha256>::new_from_slice(b"secret").unwrap();
                mac.update(body.as_bytes());
                let digits: String = mac
                    .finalize()
                    .into_bytes()
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect();
                (body, digits)
            })
            .find(|(_, digits)| digits.starts_with('0'))
            .unwrap();
        let header = format!("sha256={digits}");
        verify(b"secret", body.as_bytes(), Some(&header)).unwrap();
        // `u8::from_str_radix("+a", 16)` is 10: the same byte, but not the header GitHub sends.
        let signed = format!("sha256=+{}", &digits[1..]);
        assert!(verify(b"secret", body.as_bytes(), Some(&signed)).is_err());
    }

    #[test]
    fn a_published_release_maps_as_the_adapter_specifies() {
        let body = fixture("github/payloads/release__published.json");
        let Delivery::Event(event) = delivery(&headers("release"), &body).unwrap() else {
            panic!("not an event")
        };
        assert_eq!(event.id(), "72d3162e-cc78-11e3-81ab-4c9367dc0958");
        assert_eq!(event.ty(), "com.github.release.published");
        let payload: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            event.source().as_str(),
            payload["repository"]["url"].as_str().unwrap()
        );
        assert_eq!(
            event.subject(),
            Some(payload["release"]["id"].to_string().as_str())
        );
        assert_eq!(
            event.time().unwrap().to_rfc3339(),
            DateTime::parse_from_rfc3339(payload["release"]["published_at"].as_str().unwrap())
                .unwrap()
                .with_timezone(&Utc)
                .to_rfc3339()
        );
        // The data is the body, byte for byte.
        assert_eq!(baton_core::binding::encode(&event).1.as_ref(), &body[..]);
    }

    #[test]
    fn push_ping_and_unknown_events() {
        let push = fixture("github/payloads/push__payload.json");
        let Delivery::Event(event) = delivery(&headers("push"), &push).unwrap() else {
            panic!("push is an event")
        };
        assert_eq!(event.ty(), "com.github.push");
        assert_eq!(event.subject(), Some("refs/tags/simple-tag"));
        let status = fixture("github/payloads/deployment_status__created.example0.json");
        let Delivery::Event(event) = delivery(&headers("deployment_status"), &status).unwrap()
        else {
            panic!("deployment_status is an event")
        };
        assert!(event.ty().starts_with("com.github.deployment_status."));
        let ping = fixture("github/payloads/ping__payload.json");
        assert!(matches!(
            delivery(&headers("ping"), &ping).unwrap(),
            Delivery::Ping { .. }
        ));
        let Delivery::Ignored(why) = delivery(&headers("fancy_new_event"), b"{}").unwrap() else {
            panic!("unknown events are ignored")
        };
        assert!(why.contains("fancy_new_event"), "{why}");
    }

    /// Found by the property test (`github_verify_and_delivery_never_panic`): deliveries with
    /// control characters in fields the event is made of were answered 202, then dead-lettered by
    /// the trigger consumer, whose binding refuses them.
    #[test]
    fn control_characters_are_encoded_in_source_and_subject_and_refused_elsewhere() {
        use crate::admit::{Limits, check};
        let limits = Limits {
            max_event_bytes: 1 << 20,
            max_payload: 1 << 20,
        };
        let with = |file: &str, path: &[&str], value: &str| {
            let mut payload: Value = serde_json::from_slice(&fixture(file)).unwrap();
            let (last, parents) = path.split_last().unwrap();
            let mut at = &mut payload;
            for p in parents {
                at = &mut at[*p];
            }
            at[*last] = Value::String(value.to_owned());
            serde_json::to_vec(&payload).unwrap()
        };
        let release = "github/payloads/release__published.json";
        // A DEL in repository.url: kept, percent-encoded as a URI carries it.
        let body = with(
            release,
            &["repository", "url"],
            "https://api.github.com/repos/a\u{7f}b",
        );
        let Delivery::Event(event) = delivery(&headers("release"), &body).unwrap() else {
            panic!("an event")
        };
        assert_eq!(
            event.source().as_str(),
            "https://api.github.com/repos/a%7Fb"
        );
        check(&event, &limits).unwrap();
        // U+0001 in a ref (the push subject): kept, percent-encoded.
        let push = with(
            "github/payloads/push__payload.json",
            &["ref"],
            "refs/heads/a\u{1}b",
        );
        let Delivery::Event(event) = delivery(&headers("push"), &push).unwrap() else {
            panic!("an event")
        };
        assert_eq!(event.subject(), Some("refs/heads/a%01b"));
        check(&event, &limits).unwrap();
        // A line break in the action, part of the type: refused, naming the field.
        let body = with(release, &["action"], "published\n");
        let refused = delivery(&headers("release"), &body).unwrap_err();
        assert_eq!(refused.status, StatusCode::BAD_REQUEST);
        assert!(
            refused.message.starts_with(
                "`action` of the `release` delivery contains the control character U+000A"
            ),
            "{refused:?}"
        );
        // A TAB in the delivery id (HTTP allows one in a header value): refused.
        let mut tabbed = headers("release");
        tabbed.insert("x-github-delivery", "72d3162e\tcc78".parse().unwrap());
        let refused = delivery(&tabbed, &fixture(release)).unwrap_err();
        assert!(
            refused
                .message
                .starts_with("X-GitHub-Delivery contains the control character U+0009"),
            "{refused:?}"
        );
    }

    #[test]
    fn broken_deliveries_say_what_is_wrong() {
        let release = fixture("github/payloads/release__published.json");
        let mut no_id = headers("release");
        no_id.remove("x-github-delivery");
        let e = delivery(&no_id, &release).unwrap_err();
        assert!(e.message.contains("X-GitHub-Delivery"), "{e:?}");
        let e = delivery(&headers("release"), b"payload=%7B%7D").unwrap_err();
        assert!(e.message.contains("application/json"), "{e:?}");
        let e = delivery(&headers("release"), br#"{"action": "published"}"#).unwrap_err();
        assert!(e.message.contains("repository.url"), "{e:?}");
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
    }
}
