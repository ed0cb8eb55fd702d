//! Drawings of a definition: Mermaid (for docs and dashboards) and plain
//! text (for a terminal). Both show the step graph, each step's worker,
//! retry policy and timeout, and its compensation.

use std::fmt::Write as _;

use super::WorkflowDefinition;
use crate::time::format_duration;

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
    for (i, step) in def.steps().iter().enumerate() {
        let mut label = format!("<b>{}</b><br/>{}", step.name, step.worker);
        if step.retry.max_attempts > 1 {
            let _ = write!(label, "<br/>retry ×{}", step.retry.max_attempts);
        }
        let _ = write!(label, ", timeout {}", format_duration(step.timeout));
        let _ = writeln!(out, "  s{i}[\"{}\"]", mermaid_text(&label));
        if let Some(c) = &step.compensation {
            let _ = writeln!(
                out,
                "  u{i}[/\"undo: {}\"/]",
                mermaid_text(c.worker.as_str())
            );
        }
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
        if step.compensation.is_some() {
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
                step.worker
            );
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
            if step.retry.max_attempts > 1 {
                let _ = write!(line, "  retry ×{}", step.retry.max_attempts);
            }
            let _ = write!(line, "  timeout {}", format_duration(step.timeout));
            if let Some(c) = &step.compensation {
                let _ = write!(line, "  ↺ undo: {}", c.worker);
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
}
