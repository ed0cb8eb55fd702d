//! Signatures: what goes into an LLM call and what must come out, with
//! types. Written as a string, `"question, context -> answer: String,
//! confidence: f64"`, or built field by field.
//!
//! ```
//! use multiagents::llm::Signature;
//!
//! let sig = Signature::parse("ticket -> category: String, urgent: bool, score: f64")?
//!     .instructions("Classify a support ticket.")
//!     .describe("category", "one of billing, bug, question");
//! assert_eq!(sig.outputs().len(), 3);
//! # Ok::<(), multiagents::llm::SignatureError>(())
//! ```

use serde_json::{Map, Value, json};

/// The type of a field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FieldType {
    /// Text.
    String,
    /// A whole number.
    Integer,
    /// A number.
    Number,
    /// true or false.
    Boolean,
    /// A list of values of one type.
    List(Box<FieldType>),
    /// Any JSON value.
    Json,
}

impl FieldType {
    fn parse(text: &str) -> Option<Self> {
        let t = text.trim();
        let inner = |prefix: &str, suffix: &str| {
            t.strip_prefix(prefix)
                .and_then(|r| r.strip_suffix(suffix))
                .and_then(FieldType::parse)
        };
        Some(match t {
            "String" | "str" | "string" | "&str" => FieldType::String,
            "i32" | "i64" | "u32" | "u64" | "usize" | "int" | "integer" => FieldType::Integer,
            "f32" | "f64" | "float" | "number" => FieldType::Number,
            "bool" | "boolean" => FieldType::Boolean,
            "json" | "Value" | "serde_json::Value" => FieldType::Json,
            _ => FieldType::List(Box::new(
                inner("Vec<", ">").or_else(|| inner("list[", "]"))?,
            )),
        })
    }

    /// Its JSON schema.
    pub fn schema(&self) -> Value {
        match self {
            FieldType::String => json!({"type": "string"}),
            FieldType::Integer => json!({"type": "integer"}),
            FieldType::Number => json!({"type": "number"}),
            FieldType::Boolean => json!({"type": "boolean"}),
            FieldType::List(t) => json!({"type": "array", "items": t.schema()}),
            FieldType::Json => json!({}),
        }
    }

    /// A short name for prompts and errors.
    pub fn describe(&self) -> String {
        match self {
            FieldType::String => "text".into(),
            FieldType::Integer => "an integer".into(),
            FieldType::Number => "a number".into(),
            FieldType::Boolean => "true or false".into(),
            FieldType::List(t) => format!("a JSON list of {}", t.describe()),
            FieldType::Json => "JSON".into(),
        }
    }

    /// Checks (and, from text, converts) a value to this type.
    pub fn coerce(&self, value: Value) -> Result<Value, String> {
        match (self, value) {
            (FieldType::Json, v) => Ok(v),
            (FieldType::String, Value::String(s)) => Ok(Value::String(s)),
            (FieldType::String, v @ (Value::Number(_) | Value::Bool(_))) => {
                Ok(Value::String(v.to_string()))
            }
            (FieldType::Integer, Value::Number(n)) if n.is_i64() || n.is_u64() => {
                Ok(Value::Number(n))
            }
            (FieldType::Integer, Value::String(s)) => s
                .trim()
                .parse::<i64>()
                .map(Value::from)
                .map_err(|_| format!("`{s}` is not an integer")),
            (FieldType::Number, Value::Number(n)) => Ok(Value::Number(n)),
            (FieldType::Number, Value::String(s)) => s
                .trim()
                .parse::<f64>()
                .ok()
                .and_then(serde_json::Number::from_f64)
                .map(Value::Number)
                .ok_or_else(|| format!("`{s}` is not a number")),
            (FieldType::Boolean, Value::Bool(b)) => Ok(Value::Bool(b)),
            (FieldType::Boolean, Value::String(s)) => match s.trim().to_lowercase().as_str() {
                "true" | "yes" => Ok(Value::Bool(true)),
                "false" | "no" => Ok(Value::Bool(false)),
                _ => Err(format!("`{s}` is not true or false")),
            },
            (FieldType::List(t), Value::Array(items)) => items
                .into_iter()
                .map(|i| t.coerce(i))
                .collect::<Result<Vec<_>, _>>()
                .map(Value::Array),
            (FieldType::List(t), Value::String(s)) => match serde_json::from_str::<Value>(&s) {
                Ok(v @ Value::Array(_)) => FieldType::List(t.clone()).coerce(v),
                _ => Err(format!("`{s}` is not a JSON list")),
            },
            (t, v) => Err(format!("{v} is not {}", t.describe())),
        }
    }
}

/// One input or output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Field {
    /// Its name.
    pub name: String,
    /// Its type.
    pub ty: FieldType,
    /// What it means, for the prompt.
    pub description: Option<String>,
}

/// Why a signature was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("signature `{text}`: {problem}")]
pub struct SignatureError {
    /// The signature.
    pub text: String,
    /// What is wrong.
    pub problem: String,
}

/// A struct that describes a signature: derive it with
/// `#[derive(Signature)]` (fields marked `#[input]` or `#[output]`; doc
/// comments become the instructions and descriptions).
///
/// ```
/// use multiagents::llm::{Signature, TypedSignature};
///
/// /// Triage a customer support ticket.
/// #[derive(Signature)]
/// struct Triage {
///     /// The customer's message.
///     #[input]
///     ticket: String,
///     /// One of billing, bug, account, question.
///     #[output]
///     category: String,
///     #[output]
///     urgent: bool,
///     #[output]
///     tags: Vec<String>,
/// }
///
/// let sig = Triage::signature();
/// assert_eq!(sig.instructions_text(), "Triage a customer support ticket.");
/// assert_eq!(sig.outputs().len(), 3);
/// assert_eq!(
///     sig.outputs()[0].description.as_deref(),
///     Some("One of billing, bug, account, question.")
/// );
/// ```
pub trait TypedSignature {
    /// The signature.
    fn signature() -> Signature;
}

/// Inputs, outputs and instructions of an LLM call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Signature {
    instructions: String,
    inputs: Vec<Field>,
    outputs: Vec<Field>,
}

impl Signature {
    /// Parses `"a, b: String -> c: f64, d: Vec<String>"`. A field without a
    /// type is text.
    pub fn parse(text: &str) -> Result<Self, SignatureError> {
        let err = |problem: String| SignatureError {
            text: text.to_string(),
            problem,
        };
        let (ins, outs) = text
            .split_once("->")
            .ok_or_else(|| err("it has no `->` between inputs and outputs".into()))?;
        let fields = |part: &str, side: &str| -> Result<Vec<Field>, SignatureError> {
            let mut out: Vec<Field> = Vec::new();
            for raw in split_fields(part) {
                let raw = raw.trim();
                if raw.is_empty() {
                    continue;
                }
                let (name, ty) = match raw.split_once(':') {
                    Some((n, t)) => (
                        n.trim(),
                        FieldType::parse(t).ok_or_else(|| {
                            err(format!(
                                "{side} `{}` has unknown type `{}`; use String, i64, f64, bool, Vec<…> or json",
                                n.trim(),
                                t.trim()
                            ))
                        })?,
                    ),
                    None => (raw, FieldType::String),
                };
                if name.is_empty() || !name.chars().all(|c| c.is_alphanumeric() || c == '_') {
                    return Err(err(format!(
                        "{side} name `{name}` is not a name (letters, digits, _)"
                    )));
                }
                if out.iter().any(|f| f.name == name) {
                    return Err(err(format!("{side} `{name}` is named twice")));
                }
                out.push(Field {
                    name: name.to_string(),
                    ty,
                    description: None,
                });
            }
            if out.is_empty() {
                return Err(err(format!("it has no {side}s")));
            }
            Ok(out)
        };
        let inputs = fields(ins, "input")?;
        let outputs = fields(outs, "output")?;
        if let Some(f) = outputs
            .iter()
            .find(|o| inputs.iter().any(|i| i.name == o.name))
        {
            return Err(err(format!("`{}` is both an input and an output", f.name)));
        }
        Ok(Self {
            instructions: String::new(),
            inputs,
            outputs,
        })
    }

    /// Sets the instructions (the task, in words).
    pub fn instructions(mut self, text: impl Into<String>) -> Self {
        self.instructions = text.into();
        self
    }

    /// Describes a field (input or output) for the prompt.
    pub fn describe(mut self, field: &str, text: impl Into<String>) -> Self {
        let text = text.into();
        if let Some(f) = self
            .inputs
            .iter_mut()
            .chain(self.outputs.iter_mut())
            .find(|f| f.name == field)
        {
            f.description = Some(text);
        }
        self
    }

    /// Adds an output in front of the others (`ChainOfThought` adds its
    /// reasoning this way).
    pub fn prepend_output(mut self, name: &str, description: &str) -> Self {
        if !self.outputs.iter().any(|f| f.name == name) {
            self.outputs.insert(
                0,
                Field {
                    name: name.into(),
                    ty: FieldType::String,
                    description: Some(description.into()),
                },
            );
        }
        self
    }

    /// The instructions.
    pub fn instructions_text(&self) -> &str {
        &self.instructions
    }

    /// The inputs.
    pub fn inputs(&self) -> &[Field] {
        &self.inputs
    }

    /// The outputs.
    pub fn outputs(&self) -> &[Field] {
        &self.outputs
    }

    /// The JSON schema of the outputs, for `response_format`.
    pub fn output_schema(&self) -> Value {
        let properties: Map<String, Value> = self
            .outputs
            .iter()
            .map(|f| {
                let mut s = f.ty.schema();
                if let (Some(d), Value::Object(m)) = (&f.description, &mut s) {
                    m.insert("description".into(), Value::String(d.clone()));
                }
                (f.name.clone(), s)
            })
            .collect();
        json!({
            "type": "object",
            "properties": properties,
            "required": self.outputs.iter().map(|f| f.name.clone()).collect::<Vec<_>>(),
            "additionalProperties": false,
        })
    }

    /// Checks that `values` has every input.
    pub fn check_inputs(&self, values: &Map<String, Value>) -> Result<(), String> {
        match self.inputs.iter().find(|f| !values.contains_key(&f.name)) {
            Some(f) => Err(format!(
                "input `{}` is missing (the signature needs {})",
                f.name,
                self.inputs
                    .iter()
                    .map(|f| format!("`{}`", f.name))
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
            None => Ok(()),
        }
    }

    /// Validates and converts outputs: every output present, of its type.
    pub fn check_outputs(
        &self,
        mut values: Map<String, Value>,
    ) -> Result<Map<String, Value>, String> {
        let mut out = Map::new();
        for f in &self.outputs {
            let v = values
                .remove(&f.name)
                .ok_or_else(|| format!("output `{}` is missing", f.name))?;
            let v =
                f.ty.coerce(v)
                    .map_err(|e| format!("output `{}`: {e}", f.name))?;
            out.insert(f.name.clone(), v);
        }
        Ok(out)
    }
}

/// Splits on commas outside `<…>` and `[…]`.
fn split_fields(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    for (i, c) in text.char_indices() {
        match c {
            '<' | '[' => depth += 1,
            '>' | ']' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&text[start..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_and_types() {
        let s = Signature::parse(
            "question, context: String -> answer, confidence: f64, tags: Vec<String>",
        )
        .expect("parses");
        assert_eq!(s.inputs().len(), 2);
        assert_eq!(s.outputs()[1].ty, FieldType::Number);
        assert_eq!(
            s.outputs()[2].ty,
            FieldType::List(Box::new(FieldType::String))
        );
        assert_eq!(
            s.output_schema()["properties"]["tags"],
            json!({"type": "array", "items": {"type": "string"}})
        );
    }

    #[test]
    fn refuses_bad_signatures_saying_why() {
        let e = Signature::parse("a b").expect_err("no arrow");
        assert!(e.to_string().contains("no `->`"), "{e}");
        let e = Signature::parse("a -> b: decimal").expect_err("type");
        assert!(
            e.to_string()
                .contains("output `b` has unknown type `decimal`"),
            "{e}"
        );
        let e = Signature::parse("a -> a").expect_err("both");
        assert!(
            e.to_string().contains("`a` is both an input and an output"),
            "{e}"
        );
        let e = Signature::parse("a -> ").expect_err("no outputs");
        assert!(e.to_string().contains("no outputs"), "{e}");
        let e = Signature::parse("a, a -> b").expect_err("twice");
        assert!(e.to_string().contains("named twice"), "{e}");
    }

    #[test]
    fn outputs_are_checked_and_converted() {
        let s = Signature::parse("q -> n: i64, ok: bool, p: f64").expect("parses");
        let mut m = Map::new();
        m.insert("n".into(), json!("42"));
        m.insert("ok".into(), json!("yes"));
        m.insert("p".into(), json!(0.5));
        let out = s.check_outputs(m).expect("valid");
        assert_eq!(out["n"], 42);
        assert_eq!(out["ok"], true);
        let mut m = Map::new();
        m.insert("n".into(), json!("many"));
        let e = s.check_outputs(m).expect_err("bad");
        assert!(e.contains("output `n`: `many` is not an integer"), "{e}");
    }
}
