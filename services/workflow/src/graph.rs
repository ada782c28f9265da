//! The step graph: cycles, what runs before what, and drawings of it (Mermaid and Graphviz DOT).

use std::collections::BTreeSet;
use std::fmt::Write;

use crate::{Action, OnFailure, Step, Uses, Workflow};

/// A dependency cycle, as the list of steps around it (the first repeated at the end), if there
/// is one. `needs[i]` are the steps that step `i` waits for.
pub fn find_cycle(needs: &[Vec<usize>]) -> Option<Vec<usize>> {
    // 0 = unvisited, 1 = on the current path, 2 = done. Iterative, so deep graphs cannot overflow
    // the stack.
    let mut state = vec![0u8; needs.len()];
    for start in 0..needs.len() {
        if state[start] != 0 {
            continue;
        }
        let mut path: Vec<(usize, usize)> = vec![(start, 0)];
        state[start] = 1;
        while let Some(&mut (node, ref mut next)) = path.last_mut() {
            if let Some(&n) = needs[node].get(*next) {
                *next += 1;
                match state[n] {
                    1 => {
                        let from = path.iter().position(|&(p, _)| p == n).unwrap_or(0);
                        let mut cycle: Vec<usize> = path[from..].iter().map(|&(p, _)| p).collect();
                        cycle.push(n);
                        // Print the cycle in the order the steps run in: `a -> b` means b needs a.
                        cycle.reverse();
                        return Some(cycle);
                    }
                    0 => {
                        state[n] = 1;
                        path.push((n, 0));
                    }
                    _ => {}
                }
            } else {
                state[node] = 2;
                path.pop();
            }
        }
    }
    None
}

/// For each step, every step that completes (or is skipped) before it starts: its `needs`,
/// transitively. The graph must have no cycle.
pub fn ancestors(needs: &[Vec<usize>]) -> Vec<BTreeSet<usize>> {
    let mut memo: Vec<Option<BTreeSet<usize>>> = vec![None; needs.len()];
    fn visit(i: usize, needs: &[Vec<usize>], memo: &mut Vec<Option<BTreeSet<usize>>>) {
        if memo[i].is_some() {
            return;
        }
        let mut set = BTreeSet::new();
        for &n in &needs[i] {
            visit(n, needs, memo);
            set.insert(n);
            set.extend(memo[n].iter().flatten().copied());
        }
        memo[i] = Some(set);
    }
    // Visit in an order where needs come first when steps are in file order (the usual case),
    // which keeps the recursion shallow.
    for i in 0..needs.len() {
        visit(i, needs, &mut memo);
    }
    memo.into_iter().map(Option::unwrap_or_default).collect()
}

/// A short label for a step: id, kind and what is special about it.
fn label(step: &Step) -> String {
    let mut label = format!("{}\\n{}", step.id, describe_uses(step));
    if step.for_each.is_some() {
        label.push_str("\\nfor each");
    }
    if step.retry.attempts > 1 {
        let _ = write!(label, "\\nretry x{}", step.retry.attempts);
    }
    if step.on_failure == OnFailure::Continue {
        label.push_str("\\ncontinue on failure");
    }
    label
}

fn describe_uses(step: &Step) -> String {
    match (&step.uses, &step.action) {
        (Uses::Service, _) => format!("service/{}", step.kind),
        (_, Action::Wait(w)) => format!("wait for {}", w.event),
        (_, Action::Workflow(c)) => format!("workflow {}", c.workflow),
        _ => step.kind.clone(),
    }
}

fn describe_compensation(c: &crate::Compensation) -> String {
    match c.uses {
        Uses::Service => format!("service/{}", c.kind),
        Uses::Builtin(_) => c.kind.clone(),
    }
}

/// The workflow as a Mermaid flowchart: steps, `needs` as arrows, `if` on the arrows into a
/// conditional step, compensations as dotted arrows.
pub fn mermaid(wf: &Workflow) -> String {
    let mut out = String::from("flowchart TD\n");
    let node = |i: usize| format!("s{i}");
    for (i, step) in wf.steps.iter().enumerate() {
        let text = label(step).replace("\\n", "<br/>").replace('"', "#quot;");
        let _ = writeln!(out, "  {}[\"{text}\"]", node(i));
    }
    for (i, step) in wf.steps.iter().enumerate() {
        for &n in &step.needs {
            match &step.condition {
                Some(c) => {
                    let text = c.source().replace('"', "#quot;").replace('|', "#124;");
                    let _ = writeln!(out, "  {} -->|\"if {text}\"| {}", node(n), node(i));
                }
                None => {
                    let _ = writeln!(out, "  {} --> {}", node(n), node(i));
                }
            }
        }
        if let Some(c) = &step.compensate {
            let text = format!("undo {}<br/>{}", step.id, describe_compensation(c));
            let _ = writeln!(out, "  c{i}[/\"{text}\"/]");
            let _ = writeln!(out, "  {} -.->|compensate| c{i}", node(i));
        }
    }
    out
}

/// The workflow as a Graphviz DOT digraph.
pub fn dot(wf: &Workflow) -> String {
    let esc = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
    let mut out = format!(
        "digraph \"{}\" {{\n  rankdir=TB;\n  node [shape=box];\n",
        esc(&wf.name)
    );
    for (i, step) in wf.steps.iter().enumerate() {
        // Labels keep their `\n` line breaks, which DOT understands.
        let text = label(step).replace('"', "\\\"");
        let _ = writeln!(out, "  s{i} [label=\"{text}\"];");
    }
    for (i, step) in wf.steps.iter().enumerate() {
        for &n in &step.needs {
            match &step.condition {
                Some(c) => {
                    let _ = writeln!(out, "  s{n} -> s{i} [label=\"if {}\"];", esc(c.source()));
                }
                None => {
                    let _ = writeln!(out, "  s{n} -> s{i};");
                }
            }
        }
        if let Some(c) = &step.compensate {
            let _ = writeln!(
                out,
                "  c{i} [label=\"undo {}\\n{}\", shape=parallelogram];",
                esc(&step.id),
                esc(&describe_compensation(c))
            );
            let _ = writeln!(out, "  s{i} -> c{i} [style=dashed, label=\"compensate\"];");
        }
    }
    out.push_str("}\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cycles_are_found_and_printed_in_running_order() {
        // 0 <- 1 <- 2 <- 1: steps 1 and 2 need each other.
        let needs = vec![vec![], vec![0, 2], vec![1]];
        assert_eq!(find_cycle(&needs), Some(vec![1, 2, 1]));
        assert_eq!(find_cycle(&[vec![], vec![0], vec![0, 1]]), None);
        assert_eq!(find_cycle(&[vec![0]]), Some(vec![0, 0]));
        let anc = ancestors(&[vec![], vec![0], vec![1], vec![]]);
        assert_eq!(anc[2], BTreeSet::from([0, 1]));
        assert!(anc[3].is_empty());
    }

    #[test]
    fn long_chains_do_not_overflow() {
        let n: usize = 20_000;
        let needs: Vec<Vec<usize>> = (0..n)
            .map(|i| i.checked_sub(1).into_iter().collect())
            .collect();
        assert_eq!(find_cycle(&needs), None);
    }
}
