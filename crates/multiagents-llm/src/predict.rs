//! Modules: `Predict` (one call that fills a signature's outputs) and
//! `ChainOfThought` (the same, with a `reasoning` output first).
//!
//! A call asks for structured output through the API's `response_format`
//! JSON schema; a server that refuses it gets the same request as plain text
//! with `[[ ## field ## ]]` markers instead, and the client remembers. A
//! reply that does not parse, or whose fields are missing or of the wrong
//! type, gets one repair attempt (the model is shown what was wrong); then
//! the call fails with an error that quotes the bad part.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::{Map, Value};

use super::{ChatRequest, LlmClient, LlmError, Message, Signature, Usage};

/// A worked example: inputs and the outputs wanted for them.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Example {
    /// Input values by name.
    pub inputs: Map<String, Value>,
    /// Output values by name.
    pub outputs: Map<String, Value>,
}

/// The outputs of a call, and what it cost.
#[derive(Clone, Debug, PartialEq)]
pub struct Prediction {
    /// Output values by name, checked against the signature.
    pub outputs: Map<String, Value>,
    /// Tokens used, repair included.
    pub usage: Usage,
    /// Calls made (2 when the reply was repaired).
    pub calls: u32,
}

/// Why a module call failed.
#[derive(Debug, thiserror::Error)]
pub enum PredictError {
    /// The model could not be reached or refused.
    #[error(transparent)]
    Llm(#[from] LlmError),
    /// The inputs do not fit the signature.
    #[error("bad inputs: {0}")]
    Input(String),
    /// The reply could not be used, even after one repair attempt.
    #[error(
        "the model's reply could not be used after a repair attempt: {problem}; the reply began: {start}"
    )]
    BadOutput {
        /// What was wrong.
        problem: String,
        /// The start of the last reply.
        start: String,
    },
}

impl PredictError {
    /// True when another attempt may succeed (a transient LLM error, or a
    /// reply that did not parse: a new sample may).
    pub fn is_transient(&self) -> bool {
        match self {
            PredictError::Llm(e) => e.is_transient(),
            PredictError::BadOutput { .. } => true,
            PredictError::Input(_) => false,
        }
    }
}

/// One LLM call that fills a signature.
#[derive(Debug)]
pub struct Predict {
    signature: Signature,
    demos: Vec<Example>,
    /// Set once a server refused `response_format`: use text markers.
    text_mode: Arc<AtomicBool>,
}

impl Clone for Predict {
    fn clone(&self) -> Self {
        Self {
            signature: self.signature.clone(),
            demos: self.demos.clone(),
            text_mode: Arc::new(AtomicBool::new(self.text_mode.load(Ordering::Relaxed))),
        }
    }
}

impl Predict {
    /// A module for `signature`.
    pub fn new(signature: Signature) -> Self {
        Self {
            signature,
            demos: Vec::new(),
            text_mode: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Worked examples shown before each call (few-shot).
    pub fn with_demos(mut self, demos: Vec<Example>) -> Self {
        self.demos = demos;
        self
    }

    /// Its signature.
    pub fn signature(&self) -> &Signature {
        &self.signature
    }

    /// Its demos.
    pub fn demos(&self) -> &[Example] {
        &self.demos
    }

    /// True once the server refused structured output.
    pub fn uses_text_markers(&self) -> bool {
        self.text_mode.load(Ordering::Relaxed)
    }

    /// Fills the outputs for `inputs`.
    pub async fn call(
        &self,
        client: &LlmClient,
        inputs: &Map<String, Value>,
    ) -> Result<Prediction, PredictError> {
        self.signature
            .check_inputs(inputs)
            .map_err(PredictError::Input)?;
        loop {
            let text = self.text_mode.load(Ordering::Relaxed);
            let request = self.request(inputs, text);
            match client.chat(&request).await {
                Ok(reply) => return self.finish(client, request, reply, text).await,
                Err(LlmError::Status { status, body, .. })
                    if !text && (status == 400 || status == 422) && mentions_format(&body) =>
                {
                    tracing::info!(
                        status,
                        "the server refused structured output; using text markers from now on"
                    );
                    self.text_mode.store(true, Ordering::Relaxed);
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    async fn finish(
        &self,
        client: &LlmClient,
        mut request: ChatRequest,
        reply: super::ChatResponse,
        text: bool,
    ) -> Result<Prediction, PredictError> {
        let mut usage = reply.usage;
        let first = self.parse(&reply.content, reply.finish_reason.as_deref(), text);
        let problem = match first {
            Ok(outputs) => {
                return Ok(Prediction {
                    outputs,
                    usage,
                    calls: 1,
                });
            }
            Err(problem) => problem,
        };
        tracing::debug!(problem = %problem, "the model's reply could not be used; asking once for a repair");
        request
            .messages
            .push(Message::assistant(reply.content.clone()));
        request.messages.push(Message::user(format!(
            "Your reply could not be used: {problem}. Reply again, with {} only.",
            self.format_hint(text)
        )));
        let repaired = client.chat(&request).await?;
        usage.prompt_tokens += repaired.usage.prompt_tokens;
        usage.completion_tokens += repaired.usage.completion_tokens;
        match self.parse(&repaired.content, repaired.finish_reason.as_deref(), text) {
            Ok(outputs) => Ok(Prediction {
                outputs,
                usage,
                calls: 2,
            }),
            Err(problem) => Err(PredictError::BadOutput {
                problem,
                start: repaired.content.chars().take(200).collect(),
            }),
        }
    }

    fn format_hint(&self, text: bool) -> String {
        let names: Vec<String> = self
            .signature
            .outputs()
            .iter()
            .map(|f| format!("`{}`", f.name))
            .collect();
        if text {
            format!(
                "the fields {} each after its `[[ ## name ## ]]` marker, then `[[ ## completed ## ]]`",
                names.join(", ")
            )
        } else {
            format!("one JSON object with the keys {}", names.join(", "))
        }
    }

    /// The messages for a call.
    fn request(&self, inputs: &Map<String, Value>, text: bool) -> ChatRequest {
        let sig = &self.signature;
        let mut system = String::new();
        if !sig.instructions_text().is_empty() {
            system.push_str(sig.instructions_text());
            system.push_str("\n\n");
        }
        let list = |fields: &[super::signature::Field]| {
            fields
                .iter()
                .enumerate()
                .map(|(i, f)| {
                    format!(
                        "{}. `{}` ({}){}",
                        i + 1,
                        f.name,
                        f.ty.describe(),
                        f.description
                            .as_deref()
                            .map(|d| format!(": {d}"))
                            .unwrap_or_default()
                    )
                })
                .collect::<Vec<_>>()
                .join("\n")
        };
        system.push_str(&format!(
            "Your input fields are:\n{}\n\nYour output fields are:\n{}\n\nReply with {}.",
            list(sig.inputs()),
            list(sig.outputs()),
            self.format_hint(text)
        ));
        let mut messages = vec![Message::system(system)];
        for demo in &self.demos {
            messages.push(Message::user(render_fields(
                sig.inputs().iter().map(|f| f.name.as_str()),
                &demo.inputs,
            )));
            messages.push(Message::assistant(if text {
                let mut t =
                    render_fields(sig.outputs().iter().map(|f| f.name.as_str()), &demo.outputs);
                t.push_str("\n\n[[ ## completed ## ]]");
                t
            } else {
                Value::Object(demo.outputs.clone()).to_string()
            }));
        }
        messages.push(Message::user(render_fields(
            sig.inputs().iter().map(|f| f.name.as_str()),
            inputs,
        )));
        let mut request = ChatRequest::new(messages);
        if !text {
            request.response_format = Some(serde_json::json!({
                "type": "json_schema",
                "json_schema": {"name": "outputs", "strict": true, "schema": sig.output_schema()},
            }));
        }
        request
    }

    /// Reads and checks the outputs from a reply.
    fn parse(
        &self,
        content: &str,
        finish_reason: Option<&str>,
        text: bool,
    ) -> Result<Map<String, Value>, String> {
        let cut = finish_reason == Some("length");
        let values = if text {
            parse_markers(content)
        } else {
            parse_json_object(content)
        };
        let values = match values {
            Ok(v) => v,
            Err(e) if cut => {
                return Err(format!(
                    "the reply was cut off (finish_reason `length`) and {e}; raise max_tokens"
                ));
            }
            Err(e) => return Err(e),
        };
        self.signature.check_outputs(values)
    }
}

/// `[[ ## name ## ]]\nvalue` blocks; strings as they are, others as JSON.
fn render_fields<'a>(names: impl Iterator<Item = &'a str>, values: &Map<String, Value>) -> String {
    names
        .map(|n| {
            let v = match values.get(n) {
                Some(Value::String(s)) => s.clone(),
                Some(v) => v.to_string(),
                None => String::new(),
            };
            format!("[[ ## {n} ## ]]\n{v}")
        })
        .collect::<Vec<_>>()
        .join("\n\n")
}

fn mentions_format(body: &str) -> bool {
    let b = body.to_lowercase();
    b.contains("response_format") || b.contains("json_schema") || b.contains("structured")
}

/// A JSON object, possibly in a Markdown code fence.
pub(super) fn parse_json_object(content: &str) -> Result<Map<String, Value>, String> {
    let trimmed = content.trim();
    let body = trimmed
        .strip_prefix("```json")
        .or_else(|| trimmed.strip_prefix("```"))
        .and_then(|r| r.trim_end().strip_suffix("```"))
        .unwrap_or(trimmed)
        .trim();
    match serde_json::from_str::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(other) => Err(format!(
            "it is JSON but not an object: {}",
            quote(&other.to_string())
        )),
        Err(e) => {
            let at = body
                .lines()
                .nth(e.line().saturating_sub(1))
                .map(|l| {
                    l.chars()
                        .skip(e.column().saturating_sub(20))
                        .take(40)
                        .collect::<String>()
                })
                .unwrap_or_default();
            Err(format!("it is not valid JSON ({e}) near {}", quote(&at)))
        }
    }
}

/// `[[ ## name ## ]]` sections.
fn parse_markers(content: &str) -> Result<Map<String, Value>, String> {
    let mut out = Map::new();
    let mut current: Option<(String, String)> = None;
    for line in content.lines() {
        let t = line.trim();
        if let Some(name) = t
            .strip_prefix("[[ ## ")
            .and_then(|r| r.strip_suffix(" ## ]]"))
        {
            if let Some((n, v)) = current.take() {
                out.insert(n, Value::String(v.trim().to_string()));
            }
            if name != "completed" {
                current = Some((name.trim().to_string(), String::new()));
            }
        } else if let Some((_, v)) = &mut current {
            v.push_str(line);
            v.push('\n');
        }
    }
    if let Some((n, v)) = current.take() {
        out.insert(n, Value::String(v.trim().to_string()));
    }
    if out.is_empty() {
        return Err(format!(
            "it has no `[[ ## field ## ]]` markers: {}",
            quote(content)
        ));
    }
    Ok(out)
}

fn quote(text: &str) -> String {
    let mut s: String = text.chars().take(80).collect();
    if text.chars().count() > 80 {
        s.push('…');
    }
    format!("`{s}`")
}

/// `Predict` with a `reasoning` output first: the model thinks, then
/// answers.
#[derive(Clone, Debug)]
pub struct ChainOfThought {
    predict: Predict,
}

impl ChainOfThought {
    /// A module for `signature`, with `reasoning` added.
    pub fn new(signature: Signature) -> Self {
        Self {
            predict: Predict::new(signature.prepend_output(
                "reasoning",
                "think step by step about the inputs before giving the other outputs",
            )),
        }
    }

    /// Worked examples (they need a `reasoning` output too).
    pub fn with_demos(mut self, demos: Vec<Example>) -> Self {
        self.predict = self.predict.with_demos(demos);
        self
    }

    /// The inner `Predict`.
    pub fn predict(&self) -> &Predict {
        &self.predict
    }

    /// Fills the outputs (with `reasoning`) for `inputs`.
    pub async fn call(
        &self,
        client: &LlmClient,
        inputs: &Map<String, Value>,
    ) -> Result<Prediction, PredictError> {
        self.predict.call(client, inputs).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_json_in_a_fence_and_markers() {
        let m = parse_json_object("```json\n{\"a\": 1}\n```").expect("fenced");
        assert_eq!(m["a"], 1);
        let e = parse_json_object("{\"a\": 1,,}").expect_err("bad");
        assert!(e.contains("not valid JSON"), "{e}");
        let m = parse_markers(
            "[[ ## answer ## ]]\nParis\n\n[[ ## confidence ## ]]\n0.9\n\n[[ ## completed ## ]]",
        )
        .expect("markers");
        assert_eq!(m["answer"], "Paris");
        assert_eq!(m["confidence"], "0.9");
        assert!(parse_markers("just text").is_err());
    }
}
