//! Drawings of a definition: Mermaid (for docs and dashboards) and plain
//! text (for a terminal). Both show the step graph, what each step does (its
//! worker, a sleep, a signal wait, a sub-workflow, a fan-out), its condition,
//! retry policy and timeout, its compensation, and parallel groups.

use std::fmt::Write as _;

use super::{OnTimeout, StepDefinition, StepKind, WorkflowDefinition};
use crate::time::format_duration;

/// What a step does, in words.
fn what(step: &StepDefinition) -> String {
    let mut text = match &step.kind {
        StepKind::Task { worker } => worker.to_string(),
        StepKind::Sleep { duration } => format!("sleep {}", format_duration(*duration)),
        StepKind::Signal(w) => {
            let mut t = format!("wait for signal `{}`", w.name);
            if let Some(timeout) = w.timeout {
                let then = match &w.on_timeout {
                    OnTimeout::Fail => "fail".to_string(),
                    OnTimeout::Default(v) => format!("use {v}"),
                };
                let _ = write!(t, " ≤ {}, then {then}", format_duration(timeout));
            }
            t
        }
        StepKind::Workflow(c) => match c.version {
            Some(v) => format!("sub-workflow {} v{v}", c.workflow),
            None => format!("sub-workflow {}", c.workflow),
        },
    };
    if let Some(f) = &step.for_each {
        let _ = write!(
            text,
            " for each in {} (≤{} at once)",
            f.items, f.max_concurrency
        );
    }
    text
}

/// Retry and timeout, where they mean something for the step's kind.
fn limits(step: &StepDefinition) -> Option<String> {
    match step.kind {
        StepKind::Task { .. } => {
            let mut t = String::new();
            if step.retry.max_attempts > 1 {
                let _ = write!(t, "retry ×{}, ", step.retry.max_attempts);
            }
            let _ = write!(t, "timeout {}", format_duration(step.timeout));
            Some(t)
        }
        StepKind::Workflow(_) => Some(format!("timeout {}", format_duration(step.timeout))),
        _ => None,
    }
}

/// Depth of each step: 0 for steps that come after none, else one more than
/// the deepest step it comes after. Definitions are acyclic, so this ends.
fn levels(def: &WorkflowDefinition) -> Vec<usize> {
    let n = def.steps().len();
    let mut level = vec![0usize; n];
    // Steps are validated acyclic; n passes settle every depth.
    for _ in 0..n {
        let mut changed = false;
        for i in 0..n {
            let l = def
                .dependencies(i)
                .iter()
                .map(|d| level[*d] + 1)
                .max()
                .unwrap_or(0);
            if l != level[i] {
                level[i] = l;
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    level
}

fn mermaid_text(text: &str) -> String {
    text.replace('"', "#quot;")
}

/// A Mermaid `flowchart`: steps as boxes from `start` to `end`, compensations
/// as dotted edges to their undo boxes.
///
/// ```
/// use multiagents_core::WorkflowBuilder;
/// use multiagents_core::workflow::diagram;
///
/// let def = WorkflowBuilder::new("orders")
///     .step("reserve", "reserve_inventory").compensate_with("release_inventory")
///     .step("charge", "charge_payment")
///     .build()?;
/// let text = diagram::mermaid(&def);
/// assert!(text.starts_with("flowchart TD"));
/// assert!(text.contains("s0 --> s1"));
/// assert!(text.contains("s0 -. on failure .-> u0"));
/// # Ok::<(), multiagents_core::DefinitionError>(())
/// ```
pub fn mermaid(def: &WorkflowDefinition) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "flowchart TD");
    let _ = writeln!(
        out,
        "  start((\"{} v{}\"))",
        mermaid_text(def.name().as_str()),
        def.version()
    );
    let _ = writeln!(out, "  done((end))");
    if let Some(d) = def.deadline() {
        let _ = writeln!(
            out,
            "  deadline>\"deadline {}\"] -.- start",
            format_duration(d)
        );
    }
    let mut open_group: Option<&str> = None;
    for (i, step) in def.steps().iter().enumerate() {
        let group = step.group.as_deref();
        if group != open_group {
            if open_group.is_some() {
                let _ = writeln!(out, "  end");
            }
            if let Some(g) = group {
                let _ = writeln!(out, "  subgraph g{i}[\"parallel: {}\"]", mermaid_text(g));
            }
            open_group = group;
        }
        let mut label = format!("<b>{}</b><br/>{}", step.name, what(step));
        if let Some(when) = &step.when {
            let _ = write!(label, "<br/>if {when}");
        }
        if let Some(l) = limits(step) {
            let _ = write!(label, "<br/>{l}");
        }
        let label = mermaid_text(&label);
        let _ = match (&step.kind, &step.for_each) {
            (StepKind::Workflow(_), _) => writeln!(out, "  s{i}[[\"{label}\"]]"),
            (StepKind::Sleep { .. } | StepKind::Signal(_), _) => {
                writeln!(out, "  s{i}{{{{\"{label}\"}}}}")
            }
            (_, Some(_)) => writeln!(out, "  s{i}[/\"{label}\"\\]"),
            _ => writeln!(out, "  s{i}[\"{label}\"]"),
        };
        if let StepKind::Workflow(c) = &step.kind {
            let _ = writeln!(
                out,
                "  u{i}[/\"undo: compensate {}\"/]",
                mermaid_text(c.workflow.as_str())
            );
        }
        if let Some(c) = &step.compensation {
            let _ = writeln!(
                out,
                "  u{i}[/\"undo: {}\"/]",
                mermaid_text(c.worker.as_str())
            );
        }
    }
    if open_group.is_some() {
        let _ = writeln!(out, "  end");
    }
    for (i, step) in def.steps().iter().enumerate() {
        let deps = def.dependencies(i);
        if deps.is_empty() {
            let _ = writeln!(out, "  start --> s{i}");
        }
        for d in deps {
            let _ = writeln!(out, "  s{d} --> s{i}");
        }
        if def.dependents(i).is_empty() {
            let _ = writeln!(out, "  s{i} --> done");
        }
        if step.compensation.is_some() || matches!(step.kind, StepKind::Workflow(_)) {
            let _ = writeln!(out, "  s{i} -. on failure .-> u{i}");
        }
    }
    out
}

/// Plain text: one line per step, grouped by depth; steps at the same depth
/// run at once once their predecessors are done.
///
/// ```
/// use multiagents_core::WorkflowBuilder;
/// use multiagents_core::workflow::diagram;
///
/// let def = WorkflowBuilder::new("orders")
///     .step("reserve", "reserve_inventory").compensate_with("release_inventory")
///     .step("charge", "charge_payment")
///     .build()?;
/// let text = diagram::ascii(&def);
/// assert!(text.contains("reserve  [reserve_inventory]"));
/// assert!(text.contains("undo: release_inventory"));
/// # Ok::<(), multiagents_core::DefinitionError>(())
/// ```
pub fn ascii(def: &WorkflowDefinition) -> String {
    let level = levels(def);
    let depth = level.iter().copied().max().unwrap_or(0);
    let width = def
        .steps()
        .iter()
        .map(|s| s.name.as_str().chars().count())
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    let _ = writeln!(out, "{} v{}", def.name(), def.version());
    if let Some(d) = def.description() {
        let _ = writeln!(out, "{d}");
    }
    if let Some(d) = def.deadline() {
        let _ = writeln!(out, "deadline {}", format_duration(d));
    }
    for l in 0..=depth {
        let at: Vec<usize> = (0..def.steps().len()).filter(|i| level[*i] == l).collect();
        if at.is_empty() {
            continue;
        }
        let _ = writeln!(out, "  │");
        let parallel = at.len() > 1;
        for (k, &i) in at.iter().enumerate() {
            let step = &def.steps()[i];
            let branch = match (parallel, k + 1 == at.len()) {
                (false, _) => "●",
                (true, false) => "├",
                (true, true) => "└",
            };
            let mut line = format!(
                "  {branch} {:<width$}  [{}]",
                step.name.as_str(),
                what(step)
            );
            if let Some(g) = &step.group {
                let _ = write!(line, "  (group {g})");
            }
            if let Some(when) = &step.when {
                let _ = write!(line, "  if {when}");
            }
            let after: Vec<&str> = def
                .dependencies(i)
                .iter()
                .map(|d| def.steps()[*d].name.as_str())
                .collect();
            if !after.is_empty()
                && (parallel || after.len() > 1 || l > 0 && !follows_previous(def, &level, i))
            {
                let _ = write!(line, "  after {}", after.join(", "));
            }
            if let Some(l) = limits(step) {
                let _ = write!(line, "  {}", l.replace(", ", "  "));
            }
            if let Some(c) = &step.compensation {
                let _ = write!(line, "  ↺ undo: {}", c.worker);
            }
            if let StepKind::Workflow(c) = &step.kind {
                let _ = write!(line, "  ↺ undo: compensate {}", c.workflow);
            }
            let _ = writeln!(out, "{}", line.trim_end());
        }
        if parallel {
            let _ = writeln!(out, "  ┆ ({} at once)", at.len());
        }
    }
    let _ = writeln!(out, "  │");
    let _ = writeln!(out, "  ■ end");
    out
}

/// True when step `i` comes after exactly the single step of the level above.
fn follows_previous(def: &WorkflowDefinition, level: &[usize], i: usize) -> bool {
    let above: Vec<usize> = (0..level.len())
        .filter(|j| level[*j] + 1 == level[i])
        .collect();
    above.len() == 1 && def.dependencies(i) == above.as_slice()
}

#[cfg(test)]
mod tests {
    use crate::WorkflowBuilder;

    use super::*;

    fn fan_out() -> WorkflowDefinition {
        WorkflowBuilder::new("orders")
            .step("validate", "validate_order")
            .step("fraud", "fraud_check")
            .after(["validate"])
            .step("address", "address_check")
            .after(["validate"])
            .step("charge", "charge_payment")
            .after(["fraud", "address"])
            .compensate_with("refund_payment")
            .build()
            .expect("valid")
    }

    #[test]
    fn mermaid_draws_every_edge_and_compensation() {
        let text = mermaid(&fan_out());
        for edge in [
            "start --> s0",
            "s0 --> s1",
            "s0 --> s2",
            "s1 --> s3",
            "s2 --> s3",
            "s3 --> done",
            "s3 -. on failure .-> u3",
            "u3[/\"undo: refund_payment\"/]",
        ] {
            assert!(text.contains(edge), "`{edge}` missing:\n{text}");
        }
        assert!(!text.contains("s1 --> done"), "{text}");
    }

    #[test]
    fn ascii_groups_steps_that_run_at_once() {
        let text = ascii(&fan_out());
        let lines: Vec<&str> = text.lines().collect();
        let fraud = lines
            .iter()
            .position(|l| l.contains("fraud "))
            .expect("fraud");
        let address = lines
            .iter()
            .position(|l| l.contains("address "))
            .expect("address");
        assert_eq!(address, fraud + 1, "{text}");
        assert!(lines[fraud].trim_start().starts_with('├'), "{text}");
        assert!(lines[address].trim_start().starts_with('└'), "{text}");
        assert!(text.contains("(2 at once)"), "{text}");
        assert!(text.contains("after fraud, address"), "{text}");
        assert!(text.contains("↺ undo: refund_payment"), "{text}");
    }

    fn constructs() -> WorkflowDefinition {
        WorkflowBuilder::new("order")
            .deadline(std::time::Duration::from_secs(3600))
            .step("validate", "validate_order")
            .parallel("checks", |g| {
                g.step("fraud", "fraud_check")
                    .step("address", "address_check")
            })
            .step("wrap", "gift_wrap")
            .when("input.gift_wrap == true")
            .step("pack", "pack_item")
            .for_each("input.items")
            .max_concurrency(3)
            .wait_for_signal("approval", "approve")
            .signal_timeout(std::time::Duration::from_secs(60), OnTimeout::Fail)
            .sleep("cool_off", std::time::Duration::from_secs(5))
            .sub_workflow("ship", "shipping")
            .build()
            .expect("valid")
    }

    #[test]
    fn mermaid_draws_groups_conditions_and_sub_workflows() {
        let text = mermaid(&constructs());
        for part in [
            "subgraph g1[\"parallel: checks\"]",
            "s0 --> s1",
            "s0 --> s2",
            "s1 --> s3",
            "s2 --> s3",
            "if input.gift_wrap == true",
            "for each in input.items (≤3 at once)",
            "wait for signal `approve` ≤ 1m, then fail",
            "sleep 5s",
            "s7[[\"<b>ship</b><br/>sub-workflow shipping",
            "u7[/\"undo: compensate shipping\"/]",
            "deadline 1h",
        ] {
            assert!(text.contains(part), "`{part}` missing:\n{text}");
        }
        assert_eq!(text.matches("subgraph").count(), 1, "{text}");
        assert_eq!(text.matches("\n  end\n").count(), 1, "{text}");
    }

    #[test]
    fn ascii_shows_the_new_constructs() {
        let text = ascii(&constructs());
        for part in [
            "deadline 1h",
            "(group checks)",
            "if input.gift_wrap == true",
            "[pack_item for each in input.items (≤3 at once)]",
            "[wait for signal `approve` ≤ 1m, then fail]",
            "[sleep 5s]",
            "[sub-workflow shipping]",
            "↺ undo: compensate shipping",
        ] {
            assert!(text.contains(part), "`{part}` missing:\n{text}");
        }
    }
}
