//! The persisted form of a workflow state: a small head plus parts, so that
//! a write costs what the transition changed, not what the workflow holds.
//!
//! A state is stored as
//! - its **head**: status, times, failure, signals, parent, the number of
//!   steps (and the input, written once);
//! - one **part per step** (its status, attempts, output — without its
//!   fan-out branches) and one per **branch** of a fan-out;
//! - its **history**, appended to and never rewritten.
//!
//! [`Delta::between`] is what one write must store: the head, the steps and
//! branches that changed, and the history entries added. Chunks that the
//! new state still shares with the old one (see [`crate::chunked`]) are
//! skipped without being compared, so a step of a 10,000-step workflow
//! writes its own step and its history entries, and nothing of the others.
//! [`Delta::apply`] rebuilds the state from the one before (or, for a full
//! delta, from nothing); the property tests check that every transition
//! read back this way equals the state in memory.

use serde::{Deserialize, Serialize};

use super::state::{
    Failure, HistoryEntry, ParentLink, PendingSignal, Priority, StepState, WorkflowState,
    WorkflowStatus,
};
use crate::chunked::Chunked;
use crate::ids::{CorrelationId, TransactionId, WorkflowName};
use crate::payload::Payload;
use crate::time::Timestamp;

/// Everything of a state but its steps and history.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Head {
    /// The instance.
    pub transaction_id: TransactionId,
    /// The request chain.
    pub correlation_id: CorrelationId,
    /// The definition's name.
    pub workflow: WorkflowName,
    /// The definition's version.
    pub version: u32,
    /// Where it is.
    pub status: WorkflowStatus,
    /// The workflow input: present when written for the first time (or
    /// changed), absent when the stored one still holds.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::payload::deserialize_present"
    )]
    pub input: Option<Payload>,
    /// How many steps.
    pub steps: usize,
    /// The workflow's deadline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<Timestamp>,
    /// Signals kept for later steps.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub signals: Vec<PendingSignal>,
    /// The parent step, for a sub-workflow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<ParentLink>,
    /// Its priority.
    #[serde(default, skip_serializing_if = "Priority::is_normal")]
    pub priority: Priority,
    /// Why it compensates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<Failure>,
    /// When it started.
    pub started_at: Timestamp,
    /// When it last changed.
    pub updated_at: Timestamp,
    /// When it finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Timestamp>,
}

/// One step's own fields (its branches are parts of their own).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepPart {
    /// The step's index in the definition.
    pub i: usize,
    /// How many branches it has.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub n: usize,
    /// The step, with no branches.
    pub s: StepState,
    /// Where its output is when kept apart: its digest (see
    /// [`Changes::keep_apart`]); [`StepPart::resolve`] puts it back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_at: Option<String>,
    /// Where its input is when kept apart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_at: Option<String>,
}

impl StepPart {
    /// Puts back the payloads kept apart, found by digest with `find`;
    /// `Err` names the digest that was not found.
    pub fn resolve(&mut self, find: &mut dyn FnMut(&str) -> Option<Payload>) -> Result<(), String> {
        resolve(&mut self.s, &mut self.output_at, &mut self.input_at, find)
    }
}

impl ItemPart {
    /// Puts back the payloads kept apart (see [`StepPart::resolve`]).
    pub fn resolve(&mut self, find: &mut dyn FnMut(&str) -> Option<Payload>) -> Result<(), String> {
        resolve(&mut self.s, &mut self.output_at, &mut self.input_at, find)
    }
}

fn resolve(
    s: &mut StepState,
    output_at: &mut Option<String>,
    input_at: &mut Option<String>,
    find: &mut dyn FnMut(&str) -> Option<Payload>,
) -> Result<(), String> {
    for (at, slot) in [(output_at, &mut s.output), (input_at, &mut s.input)] {
        if let Some(digest) = at.take() {
            match find(&digest) {
                Some(p) => *slot = Some(p),
                None => return Err(digest),
            }
        }
    }
    Ok(())
}

/// One branch of a fan-out step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ItemPart {
    /// The step's index.
    pub i: usize,
    /// The branch's index.
    pub k: usize,
    /// The branch.
    pub s: StepState,
    /// Where its output is when kept apart (see [`StepPart::output_at`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_at: Option<String>,
    /// Where its item is when kept apart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_at: Option<String>,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// What one write of a state stores.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Delta {
    /// True when this is the whole state, to be stored in place of what was
    /// there (a new workflow, or a state not derived from the stored one).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub full: bool,
    /// The head.
    pub head: Head,
    /// Steps whose own fields changed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<StepPart>,
    /// Branches that changed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub items: Vec<ItemPart>,
    /// How many history entries the stored state has (the new ones go after).
    #[serde(default)]
    pub history_from: usize,
    /// The history entries added.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<HistoryEntry>,
}

/// Why a delta does not fit the state it is applied to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the stored parts of workflow {transaction_id} do not fit together: {reason}")]
pub struct DeltaError {
    /// The workflow.
    pub transaction_id: TransactionId,
    /// What did not fit.
    pub reason: String,
}

/// What one write stores, borrowed from the new state: a [`Delta`]
/// without a copy of any step or history entry. It serializes as the
/// `Delta` it stands for ([`Changes::to_delta`]), and its parts one by one
/// for stores that keep them apart.
#[derive(Clone, Debug)]
pub struct Changes<'a> {
    /// The whole state (see [`Delta::full`]).
    pub full: bool,
    /// The new state.
    pub state: &'a WorkflowState,
    /// True when the input is written.
    pub input: bool,
    /// Indexes of the steps whose own fields are written.
    pub steps: Vec<usize>,
    /// (step, branch) of the branches written.
    pub items: Vec<(usize, usize)>,
    /// How many history entries the stored state has; the new ones follow.
    pub history_from: usize,
    /// The payloads the parts name by digest (see [`Changes::keep_apart`]).
    pub apart: Apart<'a>,
}

/// The large payloads of one write, which a store keeps apart from the
/// parts that hold them, each under its digest ([`Payload::digest`]): a
/// part then names its output (or item) by digest, a payload is written
/// once however often its step's part is, and identical payloads are
/// stored once.
#[derive(Clone, Debug, Default)]
pub struct Apart<'a> {
    by_address: std::collections::HashMap<usize, usize>,
    list: Vec<(String, &'a Payload)>,
}

impl<'a> Apart<'a> {
    fn add(&mut self, p: &'a Payload) {
        if self.by_address.contains_key(&p.address()) {
            return;
        }
        let digest = p.digest();
        let at = match self.list.iter().position(|(d, _)| *d == digest) {
            Some(at) => at,
            None => {
                self.list.push((digest, p));
                self.list.len() - 1
            }
        };
        self.by_address.insert(p.address(), at);
    }

    /// The digest `p` is kept under, when it is kept apart.
    pub fn digest_of(&self, p: &Payload) -> Option<&str> {
        self.by_address
            .get(&p.address())
            .map(|&at| self.list[at].0.as_str())
    }

    /// Each payload kept apart once, with its digest.
    pub fn payloads(&self) -> impl Iterator<Item = (&str, &'a Payload)> + '_ {
        self.list.iter().map(|(d, p)| (d.as_str(), *p))
    }

    /// True when nothing is kept apart.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }
}

impl<'a> Changes<'a> {
    /// The whole of `state`.
    pub fn full(state: &'a WorkflowState) -> Self {
        let items = state
            .steps
            .iter()
            .enumerate()
            .flat_map(|(i, s)| (0..s.items.len()).map(move |k| (i, k)))
            .collect();
        Self {
            full: true,
            state,
            input: true,
            steps: (0..state.steps.len()).collect(),
            items,
            history_from: 0,
            apart: Apart::default(),
        }
    }

    /// What writing `after` over `before` stores (see [`Delta::between`]).
    pub fn between(before: &WorkflowState, after: &'a WorkflowState) -> Self {
        if before.transaction_id != after.transaction_id
            || !extends(&after.history, &before.history)
        {
            return Self::full(after);
        }
        let mut steps = Vec::new();
        let mut items = Vec::new();
        for range in after.steps.changed_since(&before.steps) {
            for i in range {
                let a = &after.steps[i];
                let Some(b) = before.steps.get(i) else {
                    steps.push(i);
                    items.extend((0..a.items.len()).map(|k| (i, k)));
                    continue;
                };
                if !same_fields(a, b) {
                    steps.push(i);
                }
                for r in a.items.changed_since(&b.items) {
                    for k in r {
                        if b.items.get(k) != a.items.get(k) {
                            items.push((i, k));
                        }
                    }
                }
            }
        }
        Self {
            full: false,
            state: after,
            input: before.input != after.input,
            steps,
            items,
            history_from: before.history.len(),
            apart: Apart::default(),
        }
    }

    /// Keeps the outputs and items of `from` bytes or more that this write
    /// stores apart (see [`Apart`]): the parts name them by digest, and the
    /// store writes [`Changes::apart`]'s payloads beside them.
    pub fn keep_apart(mut self, from: usize) -> Self {
        let mut apart = Apart::default();
        let state = self.state;
        let mut look = |s: &'a StepState| {
            for p in [&s.output, &s.input].into_iter().flatten() {
                if p.len() >= from {
                    apart.add(p);
                }
            }
        };
        for &i in &self.steps {
            look(&state.steps[i]);
        }
        for &(i, k) in &self.items {
            look(&state.steps[i].items[k]);
        }
        self.apart = apart;
        self
    }

    /// The head; with the input when it is written and `with_input`.
    pub fn head(&self, with_input: bool) -> impl Serialize + 'a {
        let s = self.state;
        HeadRef {
            transaction_id: s.transaction_id,
            correlation_id: s.correlation_id,
            workflow: &s.workflow,
            version: s.version,
            status: s.status,
            input: (with_input && self.input).then_some(&s.input),
            steps: s.steps.len(),
            deadline: s.deadline,
            signals: &s.signals,
            parent: s.parent.as_ref(),
            priority: s.priority,
            failure: s.failure.as_ref(),
            started_at: s.started_at,
            updated_at: s.updated_at,
            finished_at: s.finished_at,
        }
    }

    /// Step `i`'s part (as a [`StepPart`]).
    pub fn step(&self, i: usize) -> impl Serialize + 'a {
        let s = &self.state.steps[i];
        let (s, output_at, input_at) = self.own_fields(s);
        StepPartRef {
            i,
            n: self.state.steps[i].items.len(),
            s,
            output_at,
            input_at,
        }
    }

    /// Branch `k` of step `i` (as an [`ItemPart`]).
    pub fn item(&self, i: usize, k: usize) -> impl Serialize + 'a {
        let (s, output_at, input_at) = self.own_fields(&self.state.steps[i].items[k]);
        ItemPartRef {
            i,
            k,
            s,
            output_at,
            input_at,
        }
    }

    /// A step's own fields, borrowed, its payloads kept apart named by digest.
    fn own_fields(&self, s: &'a StepState) -> (BareStep<'a>, Option<String>, Option<String>) {
        let placed = |p: Option<&'a Payload>| match p.and_then(|p| self.apart.digest_of(p)) {
            Some(d) => (None, Some(d.to_string())),
            None => (p, None),
        };
        let (output, output_at) = placed(s.output.as_ref());
        let (input, input_at) = placed(s.input.as_ref());
        let bare = BareStep {
            name: &s.name,
            status: &s.status,
            attempts: s.attempts,
            compensation_attempts: s.compensation_attempts,
            output,
            last_error: s.last_error.as_deref(),
            input,
        };
        (bare, output_at, input_at)
    }

    /// The history entries added (a JSON array).
    pub fn history(&self) -> impl Serialize + 'a {
        Entries(self.state, self.history_from)
    }

    /// How many history entries are added.
    pub fn history_added(&self) -> usize {
        self.state.history.len().saturating_sub(self.history_from)
    }

    /// The name of step `i` (or branch `k` of it): what stores key parts by.
    pub fn name(&self, i: usize, k: Option<usize>) -> &'a str {
        let step = &self.state.steps[i];
        match k {
            None => step.name.as_str(),
            Some(k) => step.items[k].name.as_str(),
        }
    }

    /// The same, owned.
    pub fn to_delta(&self) -> Delta {
        let s = self.state;
        Delta {
            full: self.full,
            head: head(s, self.input.then(|| s.input.clone())),
            steps: self
                .steps
                .iter()
                .map(|&i| StepPart {
                    i,
                    n: s.steps[i].items.len(),
                    s: bare(&s.steps[i]),
                    output_at: None,
                    input_at: None,
                })
                .collect(),
            items: self
                .items
                .iter()
                .map(|&(i, k)| ItemPart {
                    i,
                    k,
                    s: s.steps[i].items[k].clone(),
                    output_at: None,
                    input_at: None,
                })
                .collect(),
            history_from: self.history_from,
            history: s.history.iter_from(self.history_from).cloned().collect(),
        }
    }
}

impl Serialize for Changes<'_> {
    /// As the [`Delta`] it stands for.
    fn serialize<S: serde::Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{SerializeMap, SerializeSeq};
        struct Steps<'b, 'a>(&'b Changes<'a>);
        impl Serialize for Steps<'_, '_> {
            fn serialize<S: serde::Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
                let mut seq = ser.serialize_seq(Some(self.0.steps.len()))?;
                for &i in &self.0.steps {
                    seq.serialize_element(&self.0.step(i))?;
                }
                seq.end()
            }
        }
        struct Items<'b, 'a>(&'b Changes<'a>);
        impl Serialize for Items<'_, '_> {
            fn serialize<S: serde::Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
                let mut seq = ser.serialize_seq(Some(self.0.items.len()))?;
                for &(i, k) in &self.0.items {
                    seq.serialize_element(&self.0.item(i, k))?;
                }
                seq.end()
            }
        }
        let mut m = ser.serialize_map(None)?;
        if self.full {
            m.serialize_entry("full", &true)?;
        }
        m.serialize_entry("head", &self.head(true))?;
        if !self.steps.is_empty() {
            m.serialize_entry("steps", &Steps(self))?;
        }
        if !self.items.is_empty() {
            m.serialize_entry("items", &Items(self))?;
        }
        m.serialize_entry("history_from", &self.history_from)?;
        if self.history_added() > 0 {
            m.serialize_entry("history", &self.history())?;
        }
        m.end()
    }
}

/// [`Head`], borrowed.
#[derive(Serialize)]
struct HeadRef<'a> {
    transaction_id: TransactionId,
    correlation_id: CorrelationId,
    workflow: &'a WorkflowName,
    version: u32,
    status: WorkflowStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    input: Option<&'a Payload>,
    steps: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    deadline: Option<Timestamp>,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    signals: &'a [PendingSignal],
    #[serde(skip_serializing_if = "Option::is_none")]
    parent: Option<&'a ParentLink>,
    #[serde(skip_serializing_if = "Priority::is_normal")]
    priority: Priority,
    #[serde(skip_serializing_if = "Option::is_none")]
    failure: Option<&'a Failure>,
    started_at: Timestamp,
    updated_at: Timestamp,
    #[serde(skip_serializing_if = "Option::is_none")]
    finished_at: Option<Timestamp>,
}

/// A [`StepState`] without its branches, borrowed: serializes as one.
#[derive(Serialize)]
struct BareStep<'a> {
    name: &'a crate::ids::StepName,
    status: &'a super::state::StepStatus,
    attempts: u32,
    compensation_attempts: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    output: Option<&'a Payload>,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_error: Option<&'a crate::event::StepError>,
    #[serde(skip_serializing_if = "Option::is_none")]
    input: Option<&'a Payload>,
}

/// [`StepPart`], borrowed.
#[derive(Serialize)]
struct StepPartRef<'a> {
    i: usize,
    #[serde(skip_serializing_if = "is_zero")]
    n: usize,
    s: BareStep<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    output_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    input_at: Option<String>,
}

/// [`ItemPart`], borrowed (a branch has no branches: its bare step is it).
#[derive(Serialize)]
struct ItemPartRef<'a> {
    i: usize,
    k: usize,
    s: BareStep<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    output_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    input_at: Option<String>,
}

/// History entries from an index on, as a JSON array.
struct Entries<'a>(&'a WorkflowState, usize);

impl Serialize for Entries<'_> {
    fn serialize<S: serde::Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let mut seq = ser.serialize_seq(None)?;
        for e in self.0.history.iter_from(self.1) {
            seq.serialize_element(e)?;
        }
        seq.end()
    }
}

/// A step without its branches.
fn bare(step: &StepState) -> StepState {
    StepState {
        items: Chunked::new(),
        ..step.clone()
    }
}

/// True when the step's own fields (not its branches) are equal.
fn same_fields(a: &StepState, b: &StepState) -> bool {
    a.name == b.name
        && a.status == b.status
        && a.attempts == b.attempts
        && a.compensation_attempts == b.compensation_attempts
        && a.output == b.output
        && a.last_error == b.last_error
        && a.input == b.input
        && a.items.len() == b.items.len()
}

fn head(state: &WorkflowState, input: Option<Payload>) -> Head {
    Head {
        transaction_id: state.transaction_id,
        correlation_id: state.correlation_id,
        workflow: state.workflow.clone(),
        version: state.version,
        status: state.status,
        input,
        steps: state.steps.len(),
        deadline: state.deadline,
        signals: state.signals.clone(),
        parent: state.parent.clone(),
        priority: state.priority,
        failure: state.failure.clone(),
        started_at: state.started_at,
        updated_at: state.updated_at,
        finished_at: state.finished_at,
    }
}

impl Delta {
    /// Puts back every payload its parts name by digest (see
    /// [`StepPart::resolve`]); `Err` names the digest not found.
    pub fn resolve(&mut self, find: &mut dyn FnMut(&str) -> Option<Payload>) -> Result<(), String> {
        for p in &mut self.steps {
            p.resolve(find)?;
        }
        for p in &mut self.items {
            p.resolve(find)?;
        }
        Ok(())
    }

    /// The whole of `state`.
    pub fn full(state: &WorkflowState) -> Self {
        Changes::full(state).to_delta()
    }

    /// What writing `after` over `before` stores. `after` is normally
    /// `before` with one transition applied; a state that is not (its
    /// history is not an extension of `before`'s) gives a full delta.
    pub fn between(before: &WorkflowState, after: &WorkflowState) -> Self {
        Changes::between(before, after).to_delta()
    }

    /// The state this delta makes of `base` (the stored state it was
    /// computed against; ignored, and may be `None`, for a full delta).
    pub fn apply(self, base: Option<WorkflowState>) -> Result<WorkflowState, DeltaError> {
        let tx = self.head.transaction_id;
        let err = |reason: String| DeltaError {
            transaction_id: tx,
            reason,
        };
        let Head {
            transaction_id,
            correlation_id,
            workflow,
            version,
            status,
            input,
            steps: steps_len,
            deadline,
            signals,
            parent,
            priority,
            failure,
            started_at,
            updated_at,
            finished_at,
        } = self.head;
        let (base_input, mut steps, mut history) = match (self.full, base) {
            (true, _) => (None, Chunked::new(), Chunked::new()),
            (false, Some(b)) => (Some(b.input), b.steps, b.history),
            (false, None) => {
                return Err(err("a change arrived for a state that is not stored".into()));
            }
        };
        let input = input
            .or(base_input)
            .ok_or_else(|| err("the workflow input is missing".into()))?;
        if history.len() != self.history_from {
            return Err(err(format!(
                "the history has {} entries where the change expects {}",
                history.len(),
                self.history_from
            )));
        }
        history.extend(self.history);
        let unresolved = |at: &Option<String>, a: &Option<String>| at.is_some() || a.is_some();
        if let Some(p) = self
            .steps
            .iter()
            .find(|p| unresolved(&p.output_at, &p.input_at))
        {
            return Err(err(format!(
                "step {} names a payload kept apart that was not put back",
                p.i
            )));
        }
        if let Some(p) = self
            .items
            .iter()
            .find(|p| unresolved(&p.output_at, &p.input_at))
        {
            return Err(err(format!(
                "branch {} of step {} names a payload kept apart that was not put back",
                p.k, p.i
            )));
        }
        for part in self.steps {
            let mut s = part.s;
            let len = steps.len();
            match steps.get_mut(part.i) {
                Some(old) => {
                    s.items = std::mem::take(&mut old.items);
                    *old = s;
                }
                None if part.i == len => steps.push(s),
                None => {
                    return Err(err(format!("step {} arrived before step {len}", part.i)));
                }
            }
            let step = &mut steps[part.i];
            if step.items.len() > part.n {
                step.items = step.items.iter().take(part.n).cloned().collect();
            }
        }
        if steps.len() != steps_len {
            return Err(err(format!(
                "{} steps are stored where the head says {steps_len}",
                steps.len()
            )));
        }
        for part in self.items {
            let step = steps
                .get_mut(part.i)
                .ok_or_else(|| err(format!("a branch of step {} that does not exist", part.i)))?;
            let len = step.items.len();
            match step.items.get_mut(part.k) {
                Some(old) => *old = part.s,
                None if part.k == len => step.items.push(part.s),
                None => {
                    return Err(err(format!(
                        "branch {} of step {} arrived before branch {len}",
                        part.k, part.i
                    )));
                }
            }
        }
        Ok(WorkflowState {
            transaction_id,
            correlation_id,
            workflow,
            version,
            status,
            input,
            steps,
            deadline,
            signals,
            parent,
            priority,
            failure,
            started_at,
            updated_at,
            finished_at,
            history,
        })
    }
}

/// True when `after` is `before` with entries appended: every chunk of
/// `after` that is not shared with `before` and overlaps its entries holds
/// the same entries there.
fn extends(after: &Chunked<HistoryEntry>, before: &Chunked<HistoryEntry>) -> bool {
    if after.len() < before.len() {
        return false;
    }
    after
        .changed_since(before)
        .all(|r| (r.start..r.end.min(before.len())).all(|i| after.get(i) == before.get(i)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Phase;
    use crate::ids::{CorrelationId, StepName, TransactionId};
    use crate::saga::{Input, apply, start};
    use crate::workflow::WorkflowBuilder;

    fn ok(step: &str, output: serde_json::Value) -> Input {
        Input::Succeeded {
            step: StepName::new(step),
            phase: Phase::Forward,
            attempt: 1,
            output: Payload::to_json(&output).expect("json"),
        }
    }

    /// A new instance of `def` with a `null` input, at time 1.
    fn started(def: &crate::workflow::WorkflowDefinition) -> WorkflowState {
        start(
            def,
            TransactionId::new(),
            CorrelationId::new(),
            Payload::null(),
            Timestamp(1),
        )
        .0
    }

    fn round_trip(delta: &Delta) -> Delta {
        serde_json::from_str(&serde_json::to_string(delta).expect("encode")).expect("decode")
    }

    #[test]
    fn a_step_of_a_long_chain_writes_its_own_step_and_history_only() {
        let mut b = WorkflowBuilder::new("long");
        for i in 0..200 {
            b = b.step(format!("s{i}"), "w");
        }
        let def = b.build().expect("valid");
        let input = Payload::to_json(&serde_json::json!({"big": "x".repeat(1000)})).expect("json");
        let (mut state, _) = start(
            &def,
            TransactionId::new(),
            CorrelationId::new(),
            input,
            Timestamp(1),
        );
        let mut stored = round_trip(&Delta::full(&state))
            .apply(None)
            .expect("applies");
        let mut sizes = Vec::new();
        for i in 0..200 {
            let before = state.clone();
            let out = apply(
                &def,
                &mut state,
                ok(&format!("s{i}"), serde_json::json!(i)),
                Timestamp(2 + i),
            );
            assert!(out.changed);
            let delta = Delta::between(&before, &state);
            assert!(!delta.full);
            // The step that completed and the one dispatched (the last has none).
            assert_eq!(delta.steps.len(), if i < 199 { 2 } else { 1 }, "step {i}");
            assert!(delta.head.input.is_none(), "the input is written once");
            sizes.push(serde_json::to_string(&delta).expect("encode").len());
            stored = round_trip(&delta).apply(Some(stored)).expect("applies");
            assert_eq!(stored, state, "after step {i}");
        }
        // What a step writes does not grow with the steps before it.
        assert!(
            sizes[150] <= sizes[10] + 16,
            "{} then {}",
            sizes[10],
            sizes[150]
        );
    }

    #[test]
    fn large_payloads_are_kept_apart_once_by_digest_and_put_back() {
        let def = WorkflowBuilder::new("apart")
            .step("a", "w")
            .step("b", "w")
            .step("c", "w")
            .build()
            .expect("valid");
        let mut state = started(&def);
        let prompt = serde_json::json!({"prompt": "p".repeat(5_000)});
        let stored = Delta::full(&state).apply(None).expect("applies");
        let before = state.clone();
        apply(&def, &mut state, ok("a", prompt.clone()), Timestamp(2));
        apply(&def, &mut state, ok("b", prompt.clone()), Timestamp(3));
        apply(
            &def,
            &mut state,
            ok("c", serde_json::json!("small")),
            Timestamp(4),
        );
        let changes = Changes::between(&before, &state).keep_apart(4096);
        // Two steps hold the same text (two copies in memory): kept once.
        let kept: Vec<(&str, &Payload)> = changes.apart.payloads().collect();
        assert_eq!(kept.len(), 1);
        let digest = state.output("a").expect("output").digest();
        assert_eq!(kept[0].0, digest);
        let text = serde_json::to_string(&changes).expect("encode");
        assert_eq!(
            text.matches("ppppp").count(),
            0,
            "no copy in the parts: {text}"
        );
        assert_eq!(text.matches(&digest).count(), 2, "{text}");
        assert!(text.contains("small"), "a small output stays in its part");
        // Read back: refused until the payloads are put back.
        let mut delta: Delta = serde_json::from_str(&text).expect("decode");
        let err = delta
            .clone()
            .apply(Some(stored.clone()))
            .expect_err("unresolved");
        assert!(err.reason.contains("kept apart"), "{err}");
        let missing = delta.clone().resolve(&mut |_| None).expect_err("not found");
        assert_eq!(missing, digest);
        let payload = kept[0].1.clone();
        delta
            .resolve(&mut |d| (d == digest).then(|| payload.clone()))
            .expect("found");
        let back = delta.apply(Some(stored)).expect("applies");
        assert_eq!(back, state);
        // Below the size, nothing is kept apart.
        assert!(Changes::full(&state).keep_apart(10_000).apart.is_empty());
    }

    #[test]
    fn a_branch_of_a_wide_fan_out_writes_that_branch_and_the_next() {
        let def = WorkflowBuilder::new("wide")
            .step("each", "w")
            .for_each("input.items")
            .max_concurrency(10)
            .build()
            .expect("valid");
        let input = Payload::to_json(&serde_json::json!({"items": (0..300).collect::<Vec<_>>()}))
            .expect("json");
        let (mut state, _) = start(
            &def,
            TransactionId::new(),
            CorrelationId::new(),
            input,
            Timestamp(1),
        );
        let mut stored = round_trip(&Delta::full(&state))
            .apply(None)
            .expect("applies");
        assert_eq!(stored.steps[0].items.len(), 300);
        for k in 0..300 {
            let before = state.clone();
            apply(
                &def,
                &mut state,
                ok(&format!("each[{k}]"), serde_json::json!(k)),
                Timestamp(2 + k as u64),
            );
            let delta = Delta::between(&before, &state);
            assert!(
                delta.items.len() <= 2,
                "branch {k} wrote {} branches",
                delta.items.len()
            );
            stored = round_trip(&delta).apply(Some(stored)).expect("applies");
            assert_eq!(stored, state, "after branch {k}");
        }
        assert!(state.is_terminal());
    }

    #[test]
    fn changes_serialize_as_the_delta_they_stand_for() {
        let def = WorkflowBuilder::new("wide")
            .step("first", "w")
            .step("each", "w")
            .for_each("input.items")
            .max_concurrency(2)
            .build()
            .expect("valid");
        let input = Payload::to_json(&serde_json::json!({"items": [1, 2, 3]})).expect("json");
        let (mut state, _) = start(
            &def,
            TransactionId::new(),
            CorrelationId::new(),
            input,
            Timestamp(1),
        );
        let full = Changes::full(&state);
        let text = serde_json::to_string(&full).expect("encode");
        assert_eq!(
            serde_json::from_str::<Delta>(&text).expect("decode"),
            full.to_delta()
        );
        for (n, step) in ["first", "each[0]", "each[1]", "each[2]"]
            .iter()
            .enumerate()
        {
            let before = state.clone();
            apply(
                &def,
                &mut state,
                ok(step, serde_json::json!(n)),
                Timestamp(2 + n as u64),
            );
            let c = Changes::between(&before, &state);
            let text = serde_json::to_string(&c).expect("encode");
            assert_eq!(
                serde_json::from_str::<Delta>(&text).expect("decode"),
                c.to_delta(),
                "{step}"
            );
            for &i in &c.steps {
                let part: StepPart =
                    serde_json::from_str(&serde_json::to_string(&c.step(i)).expect("encode"))
                        .expect("decode");
                assert_eq!(
                    part,
                    c.to_delta()
                        .steps
                        .into_iter()
                        .find(|p| p.i == i)
                        .expect("part")
                );
            }
        }
        assert!(state.is_terminal());
    }

    #[test]
    fn a_delta_that_does_not_fit_is_refused_naming_the_workflow() {
        let def = WorkflowBuilder::new("two")
            .step("a", "w")
            .step("b", "w")
            .build()
            .expect("valid");
        let mut state = started(&def);
        let before = state.clone();
        apply(
            &def,
            &mut state,
            ok("a", serde_json::json!(1)),
            Timestamp(2),
        );
        let delta = Delta::between(&before, &state);
        let e = delta.clone().apply(None).expect_err("no base");
        assert!(
            e.to_string().contains(&state.transaction_id.to_string()),
            "{e}"
        );
        // Applied twice, the history would not line up.
        let once = delta.clone().apply(Some(before)).expect("applies");
        let e = delta.apply(Some(once)).expect_err("applied twice");
        assert!(e.reason.contains("history"), "{e}");
    }

    #[test]
    fn a_state_not_derived_from_the_stored_one_is_written_whole() {
        let def = WorkflowBuilder::new("two")
            .step("a", "w")
            .step("b", "w")
            .build()
            .expect("valid");
        let (a, _) = start(
            &def,
            TransactionId::new(),
            CorrelationId::new(),
            Payload::null(),
            Timestamp(1),
        );
        let (b, _) = start(
            &def,
            TransactionId::new(),
            CorrelationId::new(),
            Payload::null(),
            Timestamp(1),
        );
        assert!(Delta::between(&a, &b).full);
        let mut shorter = a.clone();
        shorter.history = Chunked::new();
        assert!(Delta::between(&a, &shorter).full);
    }
}
