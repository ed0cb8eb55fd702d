//! A workflow state as named fields: the layout the Redis hash and the
//! PostgreSQL `parts` table share (see [parts](crate::core::saga::parts)).
//!
//! | field | holds |
//! | --- | --- |
//! | `h` | the head (JSON) |
//! | `in` | the workflow input, written once |
//! | `s:<step>` | a step's part, by name (one read for `step_output`) |
//! | `i:<step>[k]` | a fan-out branch's part |
//! | `h:<n>` | the history entries one write added, from entry *n* on |
//! | `p:<sha256>` | a payload kept apart, named by the parts that hold it |
//!
//! How many history entries were written (`hn`) is kept beside the fields:
//! reading checks that the batches add up to it.

use std::collections::HashMap;

use crate::core::Payload;
use crate::core::saga::parts::{Changes, Delta, Head, ItemPart, StepPart};
use crate::core::{TransactionId, WorkflowState};
use crate::store::StoreError;

/// The fields one write of `delta` sets: the head's JSON, then the other
/// fields (input, steps, branches, history) as (name, JSON) pairs. The
/// payloads kept apart are in `delta.apart`, named `p:<digest>`.
pub(crate) fn write_fields(
    delta: &Changes<'_>,
    state: &WorkflowState,
) -> Result<(String, Vec<(String, String)>), serde_json::Error> {
    let head = serde_json::to_string(&delta.head(false))?;
    let mut fields: Vec<(String, String)> =
        Vec::with_capacity(delta.steps.len() + delta.items.len() + 2);
    if delta.input {
        fields.push(("in".into(), state.input.as_str().to_string()));
    }
    // By name, so that one output is one read (`step_output`).
    for &i in &delta.steps {
        fields.push((
            format!("s:{}", delta.name(i, None)),
            serde_json::to_string(&delta.step(i))?,
        ));
    }
    for &(i, k) in &delta.items {
        fields.push((
            format!("i:{}", delta.name(i, Some(k))),
            serde_json::to_string(&delta.item(i, k))?,
        ));
    }
    // The entries this write adds: one field.
    if delta.history_added() > 0 {
        fields.push((
            format!("h:{}", delta.history_from),
            serde_json::to_string(&delta.history())?,
        ));
    }
    Ok((head, fields))
}

/// The field holding a step's (`name`) or a branch's (`name[k]`) part.
pub(crate) fn part_field(step: &str) -> String {
    match step.ends_with(']') {
        true => format!("i:{step}"),
        false => format!("s:{step}"),
    }
}

/// A part's output: inline, or the digest of the payload kept apart.
pub(crate) fn part_output(text: &str) -> Result<(Option<Payload>, Option<String>), String> {
    #[derive(serde::Deserialize)]
    struct Part {
        s: crate::core::saga::StepState,
        #[serde(default)]
        output_at: Option<String>,
    }
    let part: Part = serde_json::from_str(text).map_err(|e| e.to_string())?;
    Ok((part.s.output, part.output_at))
}

/// A state from its fields; `history_len` is how many history entries
/// were written. `corrupt` says where, given what is wrong.
pub(crate) fn assemble(
    tx: TransactionId,
    fields: &HashMap<String, String>,
    history_len: Option<usize>,
    corrupt: &dyn Fn(String) -> StoreError,
) -> Result<WorkflowState, StoreError> {
    let bad =
        |what: &str, e: &dyn std::fmt::Display| corrupt(format!("workflow {tx}: {what}: {e}"));
    let mut head: Head = match fields.get("h") {
        Some(h) => serde_json::from_str(h).map_err(|e| bad("its head", &e))?,
        None => return Err(corrupt(format!("workflow {tx} has no head"))),
    };
    head.input = match fields.get("in") {
        Some(text) => {
            Some(Payload::from_json_str(text.as_str()).map_err(|e| bad("its input", &e))?)
        }
        None => return Err(corrupt(format!("workflow {tx} has no input"))),
    };
    let mut steps = Vec::with_capacity(head.steps);
    let mut items = Vec::new();
    // A payload kept apart is read once, and shared by every part naming it.
    let mut found: HashMap<&str, Payload> = HashMap::new();
    let mut find = |digest: &str| -> Option<Payload> {
        if let Some(p) = found.get(digest) {
            return Some(p.clone());
        }
        let (key, text) = fields.get_key_value(&format!("p:{digest}"))?;
        let p = Payload::from_json_str(text.as_str()).ok()?;
        found.insert(&key[2..], p.clone());
        Some(p)
    };
    let lost = |field: &str, digest: String| {
        corrupt(format!(
            "workflow {tx}: `{field}` names a payload `p:{digest}` that is not stored (or is not JSON)"
        ))
    };
    for (field, value) in fields {
        if field.starts_with("s:") {
            let mut p: StepPart = serde_json::from_str(value).map_err(|e| bad(field, &e))?;
            p.resolve(&mut find).map_err(|d| lost(field, d))?;
            steps.push(p);
        } else if field.starts_with("i:") {
            let mut p: ItemPart = serde_json::from_str(value).map_err(|e| bad(field, &e))?;
            p.resolve(&mut find).map_err(|d| lost(field, d))?;
            items.push(p);
        }
    }
    steps.sort_by_key(|p| p.i);
    items.sort_by_key(|p| (p.i, p.k));
    // Branches beyond a step's count are left from an earlier fan-out.
    let counts: HashMap<usize, usize> = steps.iter().map(|p| (p.i, p.n)).collect();
    items.retain(|p| counts.get(&p.i).is_some_and(|n| p.k < *n));
    // The history, write by write, each from where the one before ended.
    let mut batches: Vec<(usize, &String)> = Vec::new();
    for (field, value) in fields {
        if let Some(from) = field.strip_prefix("h:") {
            let from = from
                .parse()
                .map_err(|_| corrupt(format!("workflow {tx}: a field `{field}`")))?;
            batches.push((from, value));
        }
    }
    batches.sort_by_key(|(from, _)| *from);
    let mut entries = Vec::new();
    for (from, batch) in batches {
        if from != entries.len() {
            return Err(corrupt(format!(
                "workflow {tx}: history entries from {from} follow {} entries",
                entries.len()
            )));
        }
        let mut added: Vec<crate::core::saga::HistoryEntry> =
            serde_json::from_str(batch).map_err(|e| bad("its history", &e))?;
        entries.append(&mut added);
    }
    if history_len != Some(entries.len()) {
        return Err(corrupt(format!(
            "workflow {tx}: its history has {} entries where {history_len:?} were written",
            entries.len()
        )));
    }
    Delta {
        full: true,
        head,
        steps,
        items,
        history_from: 0,
        history: entries,
    }
    .apply(None)
    .map_err(|e| corrupt(e.to_string()))
}
