use super::*;
use serde_json::json;
use std::time::Duration;

const HELLO: &str = r#"
name: hello
on:
  - type: com.example.greeting
inputs:
  name: { type: string, default: world }
steps:
  - id: greet
    uses: echo
    with: { message: "Hello, ${{ .inputs.name }}!" }
  - id: shout
    uses: echo
    with: { message: "${{ .steps.greet.outputs.message | ascii_upcase }}" }
  - id: side
    uses: echo
    needs: []
    if: ${{ .inputs.name != "world" }}
outputs:
  result: ${{ .steps.shout.outputs.message }}
"#;

#[test]
fn compiles_a_workflow_into_a_graph() {
    let wf = compile(HELLO).unwrap();
    assert_eq!(wf.name, "hello");
    assert_eq!(
        wf.triggers,
        vec![Trigger {
            ty: "com.example.greeting".into(),
            source: None,
            subject: None,
            filter: None,
            key: None,
            flow: None,
        }]
    );
    let needs: Vec<_> = wf
        .steps
        .iter()
        .map(|s| (s.id.as_str(), s.needs.clone()))
        .collect();
    assert_eq!(
        needs,
        vec![("greet", vec![]), ("shout", vec![0]), ("side", vec![])],
        "omitted needs = the step above"
    );
    assert!(wf.steps[2].condition.is_some());
    assert_eq!(
        wf.resolve_input(&json!(null)).unwrap(),
        json!({"name": "world"})
    );
    assert!(
        wf.resolve_input(&json!({"name": 3}))
            .unwrap_err()
            .contains("must be a string")
    );
    assert!(
        wf.resolve_input(&json!({"nme": "x"}))
            .unwrap_err()
            .contains("unknown input `nme`")
    );
}

#[test]
fn reports_every_problem_at_once() {
    let src = r#"
name: bad name
steps:
  - id: a
    uses: echo
    needs: [c]
  - id: a
    uses: echo
    with: { x: "${{ .a | nosuch }}" }
  - id: c
    uses: echo
    needs: [d]
  - id: d
    uses: echo
    needs: [c]
"#;
    let problems = compile(src).unwrap_err().0;
    let text: Vec<_> = problems.iter().map(ToString::to_string).collect();
    let has = |s: &str| text.iter().any(|t| t.contains(s));
    assert!(
        has("name: `bad name` is not a valid workflow name"),
        "{text:#?}"
    );
    assert!(has("steps[1].id: step id `a` is used twice"), "{text:#?}");
    assert!(
        has("steps[1].with.x: jq expression `.a | nosuch`"),
        "{text:#?}"
    );
    assert!(has("cycle: c -> d -> c"), "{text:#?}");
}

#[test]
fn unknown_keys_and_yaml_errors_are_problems() {
    let err = compile("name: x\nstepz: []\n").unwrap_err().to_string();
    assert!(err.contains("stepz"), "{err}");
    assert!(compile("name: [\n").is_err());
}

fn example(name: &str) -> Workflow {
    let path = format!(
        "{}/../../docs/examples/{name}.yaml",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(path).unwrap();
    compile(&text).unwrap_or_else(|p| panic!("{name}:\n{p}"))
}

/// (id, kind, needs) of every step.
fn shape(wf: &Workflow) -> Vec<(&str, &str, Vec<&str>)> {
    wf.steps
        .iter()
        .map(|s| {
            let needs = s.needs.iter().map(|&n| wf.steps[n].id.as_str()).collect();
            (s.id.as_str(), s.kind.as_str(), needs)
        })
        .collect()
}

#[test]
fn the_release_pipeline_compiles_to_its_graph() {
    let wf = example("release-pipeline");
    assert_eq!(
        shape(&wf),
        vec![
            ("build", "http", vec![]),
            ("deploy-canary", "deployer", vec!["build"]),
            ("verify", "wait", vec!["deploy-canary"]),
            ("promote", "deployer", vec!["verify"]),
            ("announce", "cloudevent", vec!["promote"]),
        ]
    );
    let t = &wf.triggers[0];
    assert_eq!(t.ty, "com.github.release.published");
    let release = json!({
        "type": "com.github.release.published",
        "source": "https://api.github.com/repos/baton-dev/baton",
        "data": {"release": {"prerelease": false}},
    });
    assert!(t.matches(&release).unwrap());
    let mut pre = release.clone();
    pre["data"]["release"]["prerelease"] = json!(true);
    assert!(!t.matches(&pre).unwrap(), "prereleases are filtered out");
    let mut other = release.clone();
    other["source"] = json!("https://gitlab.example.com/x");
    assert!(!t.matches(&other).unwrap(), "the source pattern applies");

    let build = &wf.steps[0];
    assert_eq!(build.uses, Uses::Builtin(Builtin::Http));
    assert_eq!(build.timeout, Some(Duration::from_secs(1800)));
    assert_eq!(build.retry.attempts, 3);
    assert_eq!(build.retry.backoff, Backoff::Exponential { factor: 2.0 });
    assert_eq!(build.retry.delay(1, 0.5), Duration::from_secs(10));
    assert_eq!(build.retry.delay(2, 0.5), Duration::from_secs(20));
    assert_eq!(
        build.retry.delay(9, 0.5),
        Duration::from_secs(120),
        "capped"
    );
    assert_eq!(
        build.retry.delay(1, 0.0),
        Duration::from_secs(8),
        "jitter 0.2"
    );
    assert!(build.retry.retries(&ErrorClass::Timeout));
    assert!(!build.retry.retries(&ErrorClass::Permanent { code: None }));
    let ctx = expr::to_val(&json!({"result": {"body": {"image": "img:1"}}}));
    assert_eq!(
        build.outputs.as_ref().unwrap().eval(&ctx).unwrap(),
        json!({"image": "img:1"})
    );

    let canary = &wf.steps[1];
    assert_eq!(canary.uses, Uses::Service);
    let undo = canary.compensate.as_ref().unwrap();
    assert_eq!((undo.kind.as_str(), undo.retry.attempts), ("deployer", 5));
    let Action::Wait(wait) = &wf.steps[2].action else {
        panic!("verify waits")
    };
    assert_eq!(wait.expect, Expect::Timeout);
    assert_eq!(wait.timeout, Duration::from_secs(900));
    assert_eq!(wait.event, "io.prometheus.alertmanager.alert.firing");
    let alert = expr::to_val(&json!({"data": {"labels": {"service": "baton"}}}));
    assert_eq!(wait.event_key.eval(&alert).unwrap(), json!("baton"));
    assert_eq!(wf.steps[4].on_failure, OnFailure::Continue);
    assert_eq!(wf.timeout, Some(Duration::from_secs(7200)));
    let c = wf.concurrency.as_ref().unwrap();
    assert_eq!((c.limit, c.on_conflict), (1, OnConflict::Queue));
    assert_eq!(
        wf.resolve_input(&json!({})).unwrap(),
        json!({"environment": "production", "canary_percent": 5})
    );
    let mermaid = graph::mermaid(&wf);
    assert!(mermaid.contains("s1 -.->|compensate| c1"), "{mermaid}");
    let dot = graph::dot(&wf);
    assert!(
        dot.starts_with("digraph \"release-pipeline\"") && dot.contains("s2 -> s3;"),
        "{dot}"
    );
}

#[test]
fn the_alert_remediation_compiles_to_its_graph() {
    let wf = example("alert-remediation");
    assert_eq!(
        shape(&wf),
        vec![
            ("diagnose", "http", vec![]),
            ("remediate", "exec", vec!["diagnose"]),
            ("resolved", "wait", vec!["remediate"]),
            ("escalate", "http", vec!["resolved"]),
        ]
    );
    let each = wf.steps[0].for_each.as_ref().unwrap();
    assert_eq!(each.parallelism, 4);
    let ctx = expr::to_val(
        &json!({"event": {"data": {"labels": {"instance": "a:1"}, "annotations": {}}}}),
    );
    assert_eq!(each.items.eval(&ctx).unwrap(), json!(["a:1"]));
    let Action::Wait(wait) = &wf.steps[2].action else {
        panic!("resolved waits")
    };
    assert_eq!(
        (wait.expect, wait.timeout),
        (Expect::Event, Duration::from_secs(1800))
    );
    assert_eq!(wf.steps[2].on_failure, OnFailure::Continue);
    let condition = wf.steps[3].condition.as_ref().unwrap();
    let ctx = |status: &str| expr::to_val(&json!({"steps": {"resolved": {"status": status}}}));
    assert!(condition.truthy(&ctx("failed")).unwrap());
    assert!(!condition.truthy(&ctx("completed")).unwrap());
    assert_eq!(wf.steps[3].retry.on, vec![RetryOn::Any]);
    let c = wf.concurrency.as_ref().unwrap();
    assert_eq!((c.limit, c.on_conflict), (1, OnConflict::Skip));
    let key = c.key.eval(&expr::to_val(
        &json!({"event": {"data": {"fingerprint": "cca51dbc6694a268"}}}),
    ));
    assert_eq!(key.unwrap(), json!("cca51dbc6694a268"));
    let critical = json!({"type": "io.prometheus.alertmanager.alert.firing", "source": "am", "data": {"labels": {"severity": "critical"}}});
    let warning = json!({"type": "io.prometheus.alertmanager.alert.firing", "source": "am", "data": {"labels": {"severity": "warning"}}});
    assert!(wf.triggers[0].matches(&critical).unwrap());
    assert!(!wf.triggers[0].matches(&warning).unwrap());
    assert_eq!(
        wf.triggers[0].flow,
        Some(Flow::Debounce(Duration::from_secs(10)))
    );
    let key = wf.triggers[0].key.as_ref().unwrap();
    assert_eq!(
        key.eval(&expr::to_val(&json!({"subject": "cca51dbc6694a268"})))
            .unwrap(),
        json!("cca51dbc6694a268")
    );
}

#[test]
fn triggers_take_one_flow_control_setting() {
    let on = |flow: &str| {
        compile(&format!(
            "name: x\non:\n  - type: t\n    key: ${{{{ .subject }}}}\n{flow}steps:\n  - id: a\n    uses: echo\n"
        ))
    };
    let flow = |text: &str| on(text).unwrap().triggers[0].flow;
    assert_eq!(
        flow("    dedup: 10m\n"),
        Some(Flow::Window {
            limit: 1,
            per: Duration::from_secs(600)
        })
    );
    assert_eq!(
        flow("    rate: { limit: 5, per: 1h }\n"),
        Some(Flow::Window {
            limit: 5,
            per: Duration::from_secs(3600)
        })
    );
    assert_eq!(
        flow("    debounce: 30s\n"),
        Some(Flow::Debounce(Duration::from_secs(30)))
    );
    assert_eq!(flow(""), None);
    let problem = |text: &str| on(text).unwrap_err().0.remove(0);
    let both = problem("    dedup: 1m\n    debounce: 30s\n");
    assert_eq!(both.at, "on[0].debounce");
    assert!(
        both.message
            .contains("one of `dedup`, `debounce` and `rate`"),
        "{both:?}"
    );
    let long = problem("    debounce: 8d\n");
    assert!(long.message.contains("at most 7 days"), "{long:?}");
    let rate = problem("    rate: { limit: 0, per: 1h }\n");
    assert_eq!(rate.at, "on[0].rate.limit");
    let missing = problem("    rate: { limit: 3 }\n");
    assert!(missing.message.contains("per"), "{missing:?}");
}

#[test]
fn the_order_saga_compiles_to_its_graph() {
    let wf = example("order-saga");
    assert_eq!(
        shape(&wf),
        vec![
            ("reserve", "inventory", vec![]),
            ("charge", "payments", vec!["reserve"]),
            ("ship", "shipping", vec!["charge"]),
            ("confirm", "emit", vec!["ship"]),
        ]
    );
    let undo: Vec<_> = wf
        .steps
        .iter()
        .map(|s| s.compensate.as_ref().map(|c| c.kind.as_str()))
        .collect();
    assert_eq!(
        undo,
        vec![Some("inventory"), Some("payments"), Some("shipping"), None]
    );
    let ctx = expr::to_val(&json!({
        "event": {"data": {"order_id": "o-1", "customer_id": "c", "items": [
            {"sku": "a", "quantity": 2, "price": 5}, {"sku": "b", "quantity": 1, "price": 7}]}},
        "steps": {"reserve": {"outputs": {"reservation_id": "r-1"}}}
    }));
    let charge = wf.steps[1].with.eval(&ctx).unwrap();
    assert_eq!(charge["amount"], json!(17));
    assert_eq!(charge["currency"], json!("EUR"));
    assert_eq!(charge["idempotency_key"], json!("order-o-1"));
    let release = wf.steps[0]
        .compensate
        .as_ref()
        .unwrap()
        .with
        .eval(&ctx)
        .unwrap();
    assert_eq!(
        release,
        json!({"action": "release", "reservation_id": "r-1"})
    );
    assert_eq!(wf.steps[1].retry.jitter, 0.1);
}

#[test]
fn the_bundled_examples_compile() {
    for (name, src) in [
        (
            "release",
            include_str!("../../../docs/examples/release.yaml"),
        ),
        ("hello", include_str!("../../../docs/examples/hello.yaml")),
    ] {
        let wf = compile(src).unwrap_or_else(|p| panic!("{name}: {p}"));
        assert_eq!(wf.name, name);
    }
}

#[test]
fn dashed_step_ids_in_jq_get_a_hint() {
    let src = "name: x\nsteps:\n  - id: deploy-canary\n    uses: echo\n  - id: b\n    uses: echo\n    with: { v: \"${{ .steps.deploy-canary.outputs }}\" }\n";
    let problems = compile(src).unwrap_err().0;
    assert!(
        problems[0]
            .hint
            .as_deref()
            .unwrap()
            .contains(r#".steps["deploy-canary"]"#),
        "{problems:?}"
    );
    assert!(
        !compile::has_dashed_key(".a - 1")
            && !compile::has_dashed_key("5-x")
            && compile::has_dashed_key(".steps.a-b")
    );
}

/// The problems of a file as `line:column: message`, in order.
fn problem_lines(src: &str) -> Vec<String> {
    match compile(src) {
        Ok(_) => vec![],
        Err(p) => {
            p.0.iter()
                .map(|p| format!("{}:{}: {}", p.line, p.column, p.message))
                .collect()
        }
    }
}

/// Every file in `tests/invalid/` says, in lines `# expect: LINE:COLUMN: MESSAGE` at its end, the
/// exact problems it has; the compiler must report exactly those, in that order, each with a hint.
#[test]
fn the_invalid_corpus_reports_exact_locations_and_messages() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/invalid");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(files.len() >= 30, "the corpus has {} files", files.len());
    let mut failures = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        // JSON has no comments: its expectations are in a sidecar file.
        let expectations = if file.extension().is_some_and(|e| e == "json") {
            std::fs::read_to_string(file.with_extension("expect")).unwrap()
        } else if file.extension().is_some_and(|e| e == "expect") {
            continue;
        } else {
            text.clone()
        };
        let expected: Vec<String> = expectations
            .lines()
            .filter_map(|l| l.strip_prefix("# expect: "))
            .map(str::to_owned)
            .collect();
        let name = file.file_name().unwrap().to_string_lossy();
        assert!(!expected.is_empty(), "{name} has no `# expect:` line");
        let actual = problem_lines(&text);
        if let Err(problems) = compile(&text)
            && let Some(p) = problems.0.iter().find(|p| p.hint.is_none())
        {
            failures.push(format!("{name}: no hint for {p}"));
        }
        if actual != expected {
            failures.push(format!(
                "{name}:\n  expected:\n    {}\n  actual:\n    {}",
                expected.join("\n    "),
                actual.join("\n    ")
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Prints the problems of every corpus file (for writing expectations): `cargo test -p
/// baton-workflow print_corpus -- --ignored --nocapture`.
#[test]
#[ignore = "a tool for writing the corpus, not a test"]
fn print_corpus() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/invalid");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for file in files {
        if file.extension().is_some_and(|e| e == "expect") {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        println!("== {}", file.file_name().unwrap().to_string_lossy());
        if let Err(p) = compile(&text) {
            for p in p.0 {
                println!("# expect: {}:{}: {}", p.line, p.column, p.message);
                println!("     hint: {:?}  at: {}", p.hint, p.at);
            }
        }
    }
}

/// `schemas/workflow.schema.json` (for editors) and the compiler know the same keys and names.
#[test]
fn the_json_schema_has_the_keys_the_compiler_knows() {
    use crate::compile::*;
    let schema: Value =
        serde_json::from_str(include_str!("../../../schemas/workflow.schema.json")).unwrap();
    let keys = |v: &Value| -> Vec<String> {
        let mut k: Vec<String> = v["properties"]
            .as_object()
            .unwrap_or_else(|| panic!("no properties in {v}"))
            .keys()
            .cloned()
            .collect();
        k.sort();
        k
    };
    let sorted = |k: &[&str]| -> Vec<String> {
        let mut k: Vec<String> = k.iter().map(|s| s.to_string()).collect();
        k.sort();
        k
    };
    let defs = &schema["$defs"];
    assert_eq!(keys(&schema), sorted(WORKFLOW_KEYS));
    assert_eq!(keys(&defs["step"]), sorted(STEP_KEYS));
    assert_eq!(keys(&defs["trigger"]["oneOf"][1]), sorted(TRIGGER_KEYS));
    assert_eq!(keys(&defs["input"]["oneOf"][1]), sorted(INPUT_KEYS));
    assert_eq!(keys(&defs["retry"]["oneOf"][1]), sorted(RETRY_KEYS));
    assert_eq!(keys(&defs["compensate"]), sorted(COMPENSATE_KEYS));
    assert_eq!(keys(&defs["for-each"]), sorted(FOR_EACH_KEYS));
    assert_eq!(
        keys(&schema["properties"]["concurrency"]),
        sorted(CONCURRENCY_KEYS)
    );
    for (kind, expected) in [
        ("sleep", SLEEP_KEYS),
        ("wait", WAIT_KEYS),
        ("approval", APPROVAL_KEYS),
        ("workflow", WORKFLOW_CALL_KEYS),
    ] {
        let rule = defs["step"]["allOf"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["if"]["properties"]["uses"]["const"] == kind)
            .unwrap_or_else(|| panic!("no rule for {kind}"));
        assert_eq!(
            keys(&rule["then"]["properties"]["with"]),
            sorted(expected),
            "{kind}"
        );
    }
    let kinds: Vec<&str> = defs["uses"]["anyOf"][0]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let builtins: Vec<&str> = Builtin::ALL.iter().map(|b| b.name()).collect();
    assert_eq!(kinds, builtins);
    let types: Vec<&str> = defs["input"]["oneOf"][1]["properties"]["type"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let known: Vec<&str> = InputType::ALL.iter().map(|(n, _)| *n).collect();
    assert_eq!(types, known);
}

#[test]
fn guesses_count_swapped_letters_as_one_typo() {
    use crate::compile::did_you_mean;
    let ids = ["build", "test", "deploy"];
    assert_eq!(did_you_mean("biuld", ids.into_iter()), Some("build"));
    assert_eq!(did_you_mean("depoly", ids.into_iter()), Some("deploy"));
    assert_eq!(did_you_mean("xyz", ids.into_iter()), None);
    let problems = compile("name: x\nsteps:\n  - id: build\n    uses: echo\n  - id: b\n    uses: echo\n    needs: [biuld]\n")
        .unwrap_err()
        .0;
    assert_eq!(problems[0].hint.as_deref(), Some("did you mean `build`?"));
}
