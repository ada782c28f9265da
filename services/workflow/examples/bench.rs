//! Compile and evaluation figures of the workflow language (a program, not a test):
//!
//! ```sh
//! cargo run --release -p baton-workflow --example bench
//! ```
//!
//! Targets (issue 4): compiling a 200-step workflow in under 50 ms, evaluating a typical template
//! expression in under 20 microseconds.

use std::time::{Duration, Instant};

use baton_workflow::expr::{Template, to_val};

/// A 200-step workflow in the style of the examples: each step has a templated `with` of four
/// values reading the event, the inputs and an earlier step, a retry policy and a timeout; every
/// tenth step fans in from two others and has an `if`.
fn big_workflow(steps: usize) -> String {
    let mut y = String::from(
        "name: big\non:\n  - type: com.github.release.published\n    filter: ${{ .data.release.prerelease | not }}\ninputs:\n  environment: { type: string, default: production }\nsteps:\n",
    );
    for i in 0..steps {
        y.push_str(&format!(
            "  - id: step-{i}\n    uses: {}\n",
            if i % 3 == 0 {
                "http"
            } else {
                "service/deployer"
            }
        ));
        if i > 0 && i % 10 == 0 {
            y.push_str(&format!(
                "    needs: [step-{}, step-{}]\n    if: ${{{{ .steps[\"step-{}\"].status == \"completed\" }}}}\n",
                i - 1,
                i - 5,
                i - 5
            ));
        }
        y.push_str("    with:\n");
        y.push_str("      repository: ${{ .event.data.repository.full_name }}\n");
        y.push_str("      image: \"registry.example.com/${{ .event.data.repository.name | ascii_downcase }}:${{ .event.data.release.tag_name }}\"\n");
        y.push_str("      environment: ${{ .inputs.environment }}\n");
        if i > 0 {
            y.push_str(&format!(
                "      previous: ${{{{ .steps[\"step-{}\"].outputs.id // null }}}}\n",
                i - 1
            ));
        }
        y.push_str(
            "    timeout: 5m\n    retry: { attempts: 3, initial-delay: 1s, max-delay: 30s }\n",
        );
    }
    y.push_str("outputs:\n  last: ${{ .steps[\"step-199\"].outputs }}\n");
    y
}

fn summary(mut samples: Vec<Duration>) -> (Duration, Duration, Duration) {
    samples.sort();
    let n = samples.len();
    (samples[0], samples[n / 2], samples[n * 99 / 100])
}

fn main() {
    let source = big_workflow(200);
    // Warm up: the first compile also parses jq's standard library once per process.
    let first = Instant::now();
    let wf = baton_workflow::compile(&source).expect("the benchmark workflow compiles");
    let first = first.elapsed();
    let exprs: usize = wf.steps.iter().map(|s| s.with.exprs().len()).sum();
    let runs = 30;
    let samples: Vec<Duration> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(baton_workflow::compile(&source).unwrap());
            t.elapsed()
        })
        .collect();
    let (min, median, _) = summary(samples);
    println!(
        "compile a {}-step workflow ({} lines, {exprs} expressions in `with`): median {:.1} ms, min {:.1} ms over {runs} runs (first, with jq's library parse: {:.1} ms); target < 50 ms",
        wf.steps.len(),
        source.lines().count(),
        median.as_secs_f64() * 1e3,
        min.as_secs_f64() * 1e3,
        first.as_secs_f64() * 1e3,
    );

    // A typical template: text with two expressions over a real GitHub release delivery.
    let release: serde_json::Value = serde_json::from_str(include_str!(
        "../../../tests/fixtures/github/payloads/release__published.json"
    ))
    .unwrap();
    let context = serde_json::json!({
        "event": {"type": "com.github.release.published", "source": "https://api.github.com/repos/x/y", "data": release},
        "inputs": {"environment": "production"},
        "steps": {"build": {"status": "completed", "outputs": {"image": "registry.example.com/x:v1"}}},
        "run": {"id": "01J", "workflow": "big", "version": 1},
    });
    let t = Instant::now();
    let val = to_val(&context);
    let convert = t.elapsed();
    let mut problems = Vec::new();
    let template = Template::parse(
        &serde_json::json!(
            "registry.example.com/${{ .event.data.repository.name | ascii_downcase }}:${{ .event.data.release.tag_name }}"
        ),
        "with.image",
        &mut problems,
    );
    assert!(problems.is_empty(), "{problems:?}");
    let single = Template::parse(
        &serde_json::json!("${{ .steps.build.outputs.image }}"),
        "x",
        &mut problems,
    );
    for (what, template) in [
        ("text with 2 expressions", &template),
        ("one path expression", &single),
    ] {
        let n = 20_000;
        for _ in 0..1000 {
            std::hint::black_box(template.eval(&val).unwrap());
        }
        let samples: Vec<Duration> = (0..n)
            .map(|_| {
                let t = Instant::now();
                std::hint::black_box(template.eval(&val).unwrap());
                t.elapsed()
            })
            .collect();
        let (min, median, p99) = summary(samples);
        println!(
            "evaluate a template ({what}): median {:.2} µs, min {:.2} µs, p99 {:.2} µs over {n} runs; target < 20 µs",
            median.as_secs_f64() * 1e6,
            min.as_secs_f64() * 1e6,
            p99.as_secs_f64() * 1e6,
        );
    }
    println!(
        "(converting the run's context to jq values, once per evaluation context, not per expression: {:.1} µs for a {}-byte context)",
        convert.as_secs_f64() * 1e6,
        context.to_string().len()
    );
}
