use super::*;
use serde_json::json;

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
