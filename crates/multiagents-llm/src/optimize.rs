//! Improving a program from examples: `LabeledFewShot` (use labelled
//! examples as demos), `BootstrapFewShot` (run the program on a train set
//! and keep, as demos, the runs a metric accepts), `evaluate` (score a
//! program on a dev set), and saving a compiled program to JSON.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{Example, LlmClient, Predict, PredictError, Signature};

/// A metric: does a prediction match the example's expected outputs?
pub type Metric = dyn Fn(&Example, &Map<String, Value>) -> bool + Send + Sync;

/// The metric that wants every expected output equal.
pub fn exact_match(example: &Example, predicted: &Map<String, Value>) -> bool {
    example
        .outputs
        .iter()
        .all(|(k, v)| predicted.get(k) == Some(v))
}

/// A score on a dev set.
#[derive(Clone, Debug, PartialEq)]
pub struct Evaluation {
    /// Examples the metric accepted.
    pub passed: usize,
    /// Examples scored.
    pub total: usize,
    /// Calls that failed (counted as not passed).
    pub errors: usize,
}

impl Evaluation {
    /// Passed over total, 0 for an empty set.
    pub fn score(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.passed as f64 / self.total as f64
        }
    }
}

/// Runs `program` on every example of `dev` and scores it with `metric`.
pub async fn evaluate(
    program: &Predict,
    client: &LlmClient,
    dev: &[Example],
    metric: &Metric,
) -> Evaluation {
    let mut e = Evaluation {
        passed: 0,
        total: dev.len(),
        errors: 0,
    };
    for example in dev {
        match program.call(client, &example.inputs).await {
            Ok(p) if metric(example, &p.outputs) => e.passed += 1,
            Ok(_) => {}
            Err(_) => e.errors += 1,
        }
    }
    e
}

/// Uses up to `k` labelled examples as demos.
#[derive(Clone, Copy, Debug)]
pub struct LabeledFewShot {
    /// Demos to keep.
    pub k: usize,
}

impl LabeledFewShot {
    /// Compiles `program` with the first `k` examples of `train` as demos.
    pub fn compile(&self, program: &Predict, train: &[Example]) -> Predict {
        program
            .clone()
            .with_demos(train.iter().take(self.k).cloned().collect())
    }
}

/// Runs the program on a train set and keeps, as demos, the runs the metric
/// accepts (their inputs and the program's own outputs), up to `max_demos`.
#[derive(Clone, Copy, Debug)]
pub struct BootstrapFewShot {
    /// Demos to keep.
    pub max_demos: usize,
}

impl BootstrapFewShot {
    /// Compiles `program` on `train`.
    pub async fn compile(
        &self,
        program: &Predict,
        client: &LlmClient,
        train: &[Example],
        metric: &Metric,
    ) -> Result<Predict, PredictError> {
        let mut demos = Vec::new();
        let mut first_error = None;
        for example in train {
            if demos.len() >= self.max_demos {
                break;
            }
            match program.call(client, &example.inputs).await {
                Ok(p) if metric(example, &p.outputs) => demos.push(Example {
                    inputs: example.inputs.clone(),
                    outputs: p.outputs,
                }),
                Ok(_) => {}
                Err(e) if first_error.is_none() && !e.is_transient() => first_error = Some(e),
                Err(e) => tracing::debug!(error = %e, "bootstrapping: a train example failed"),
            }
        }
        if demos.is_empty()
            && let Some(e) = first_error
        {
            return Err(e);
        }
        Ok(program.clone().with_demos(demos))
    }
}

/// A compiled program as JSON: its signature (as text, instructions and
/// descriptions) and its demos.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SavedProgram {
    /// `"a, b -> c: f64"`.
    pub signature: String,
    /// The instructions.
    #[serde(default)]
    pub instructions: String,
    /// Field descriptions by name.
    #[serde(default)]
    pub descriptions: Map<String, Value>,
    /// The demos.
    #[serde(default)]
    pub demos: Vec<Example>,
}

impl SavedProgram {
    /// The saved form of `program`.
    pub fn of(program: &Predict) -> Self {
        let sig = program.signature();
        let field = |f: &super::Field| {
            let ty = match &f.ty {
                super::FieldType::String => "String".to_string(),
                other => type_name(other),
            };
            format!("{}: {ty}", f.name)
        };
        let join =
            |fields: &[super::Field]| fields.iter().map(field).collect::<Vec<_>>().join(", ");
        Self {
            signature: format!("{} -> {}", join(sig.inputs()), join(sig.outputs())),
            instructions: sig.instructions_text().to_string(),
            descriptions: sig
                .inputs()
                .iter()
                .chain(sig.outputs())
                .filter_map(|f| {
                    f.description
                        .as_ref()
                        .map(|d| (f.name.clone(), Value::String(d.clone())))
                })
                .collect(),
            demos: program.demos().to_vec(),
        }
    }

    /// Rebuilds the program.
    pub fn load(&self) -> Result<Predict, super::SignatureError> {
        let mut sig = Signature::parse(&self.signature)?.instructions(self.instructions.clone());
        for (name, d) in &self.descriptions {
            if let Some(d) = d.as_str() {
                sig = sig.describe(name, d);
            }
        }
        Ok(Predict::new(sig).with_demos(self.demos.clone()))
    }
}

fn type_name(t: &super::FieldType) -> String {
    match t {
        super::FieldType::String => "String".into(),
        super::FieldType::Integer => "i64".into(),
        super::FieldType::Number => "f64".into(),
        super::FieldType::Boolean => "bool".into(),
        super::FieldType::List(inner) => format!("Vec<{}>", type_name(inner)),
        super::FieldType::Json => "json".into(),
    }
}

impl Predict {
    /// The program as JSON (signature and demos).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(&SavedProgram::of(self)).unwrap_or_default()
    }

    /// A program saved with [`Predict::to_json`].
    pub fn from_json(text: &str) -> Result<Self, String> {
        let saved: SavedProgram =
            serde_json::from_str(text).map_err(|e| format!("not a saved program: {e}"))?;
        saved.load().map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_program_round_trips_through_json() {
        let sig = Signature::parse("q -> a: String, n: i64, tags: Vec<String>")
            .expect("sig")
            .instructions("Answer.")
            .describe("q", "the question");
        let mut inputs = Map::new();
        inputs.insert("q".into(), json!("2+2?"));
        let mut outputs = Map::new();
        outputs.insert("a".into(), json!("four"));
        let p = Predict::new(sig).with_demos(vec![Example { inputs, outputs }]);
        let back = Predict::from_json(&p.to_json()).expect("loads");
        assert_eq!(back.signature(), p.signature());
        assert_eq!(back.demos(), p.demos());
        assert!(Predict::from_json("{}").is_err());
    }
}
