//! `ReAct`: a program that may call typed tools (through the chat API's
//! tool calls) before it answers, with a bound on iterations and a guard
//! against calling the same tool with the same arguments again.

use std::sync::Arc;

use async_trait::async_trait;
use serde_json::{Map, Value};

use super::predict::parse_json_object;
use super::{ChatRequest, LlmClient, Message, PredictError, Prediction, Signature, Usage};

/// A tool a [`ReAct`] program may call. `#[tool]` on an `async fn`
/// implements it, with the JSON schema taken from the parameters' types.
#[async_trait]
pub trait Tool: Send + Sync + 'static {
    /// Its name, as the model calls it.
    fn name(&self) -> &str;
    /// What it does, for the model.
    fn description(&self) -> &str;
    /// The JSON schema of its arguments (an object).
    fn parameters(&self) -> Value;
    /// Runs it; an error is shown to the model.
    async fn call(&self, args: Value) -> Result<Value, String>;
}

/// One tool call made on the way to an answer.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolStep {
    /// The tool.
    pub tool: String,
    /// Its arguments.
    pub args: Value,
    /// What it returned, or its error.
    pub result: Result<Value, String>,
}

/// What a [`ReAct`] call produced.
#[derive(Clone, Debug, PartialEq)]
pub struct ReActOutcome {
    /// The answer.
    pub prediction: Prediction,
    /// The tool calls, in order.
    pub trajectory: Vec<ToolStep>,
}

/// A program that reasons and calls tools, then answers the signature.
#[derive(Clone)]
pub struct ReAct {
    signature: Signature,
    tools: Vec<Arc<dyn Tool>>,
    max_iterations: usize,
}

impl std::fmt::Debug for ReAct {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReAct")
            .field("signature", &self.signature)
            .field(
                "tools",
                &self
                    .tools
                    .iter()
                    .map(|t| t.name().to_string())
                    .collect::<Vec<_>>(),
            )
            .field("max_iterations", &self.max_iterations)
            .finish()
    }
}

/// How many times the same call may be asked for before the run stops.
const SAME_CALL_LIMIT: usize = 3;

impl ReAct {
    /// A program for `signature` with no tools yet, at most 6 iterations.
    pub fn new(signature: Signature) -> Self {
        Self {
            signature,
            tools: Vec::new(),
            max_iterations: 6,
        }
    }

    /// Adds a tool.
    pub fn tool(mut self, tool: impl Tool) -> Self {
        self.tools.push(Arc::new(tool));
        self
    }

    /// Model replies allowed before the run stops without an answer.
    pub fn max_iterations(mut self, n: usize) -> Self {
        self.max_iterations = n.max(1);
        self
    }

    /// Runs the loop for `inputs`.
    pub async fn call(
        &self,
        client: &LlmClient,
        inputs: &Map<String, Value>,
    ) -> Result<ReActOutcome, PredictError> {
        self.signature
            .check_inputs(inputs)
            .map_err(PredictError::Input)?;
        let names: Vec<String> = self
            .signature
            .outputs()
            .iter()
            .map(|f| format!("`{}` ({})", f.name, f.ty.describe()))
            .collect();
        let tools: Vec<String> = self
            .tools
            .iter()
            .map(|t| format!("- `{}`: {}", t.name(), t.description()))
            .collect();
        let mut system = String::new();
        if !self.signature.instructions_text().is_empty() {
            system.push_str(self.signature.instructions_text());
            system.push_str("\n\n");
        }
        system.push_str(&format!(
            "You may call these tools to find what you need:\n{}\n\nWhen you know the answer, reply with one JSON object with the keys {} and nothing else.",
            tools.join("\n"),
            names.join(", ")
        ));
        let user = self
            .signature
            .inputs()
            .iter()
            .map(|f| {
                let v = match inputs.get(&f.name) {
                    Some(Value::String(s)) => s.clone(),
                    Some(v) => v.to_string(),
                    None => String::new(),
                };
                format!("{}: {v}", f.name)
            })
            .collect::<Vec<_>>()
            .join("\n");
        let mut request = ChatRequest::new(vec![Message::system(system), Message::user(user)]);
        request.tools = self
            .tools
            .iter()
            .map(|t| {
                serde_json::json!({
                    "type": "function",
                    "function": {"name": t.name(), "description": t.description(), "parameters": t.parameters()},
                })
            })
            .collect();
        let mut usage = Usage::default();
        let mut trajectory: Vec<ToolStep> = Vec::new();
        let mut last = String::new();
        for iteration in 0..self.max_iterations {
            let reply = client.chat(&request).await?;
            let calls = iteration as u32 + 1;
            usage.prompt_tokens += reply.usage.prompt_tokens;
            usage.completion_tokens += reply.usage.completion_tokens;
            if reply.tool_calls.is_empty() {
                let parsed =
                    parse_json_object(&reply.content).and_then(|m| self.signature.check_outputs(m));
                match parsed {
                    Ok(outputs) => {
                        return Ok(ReActOutcome {
                            prediction: Prediction {
                                outputs,
                                usage,
                                calls,
                            },
                            trajectory,
                        });
                    }
                    Err(problem) => {
                        last = reply.content.chars().take(200).collect();
                        request
                            .messages
                            .push(Message::assistant(reply.content.clone()));
                        request.messages.push(Message::user(format!(
                            "Your answer could not be used: {problem}. Reply with one JSON object with the keys {} only.",
                            names.join(", ")
                        )));
                        continue;
                    }
                }
            }
            let mut assistant = Message::assistant(reply.content.clone());
            assistant.tool_calls = reply.tool_calls.clone();
            request.messages.push(assistant);
            for call in &reply.tool_calls {
                let name = &call.function.name;
                let args: Value = match serde_json::from_str(&call.function.arguments) {
                    Ok(v) => v,
                    Err(e) => {
                        request.messages.push(Message::tool(
                            &call.id,
                            format!("error: the arguments are not JSON: {e}"),
                        ));
                        continue;
                    }
                };
                let earlier: Vec<&ToolStep> = trajectory
                    .iter()
                    .filter(|s| &s.tool == name && s.args == args)
                    .collect();
                if earlier.len() + 1 >= SAME_CALL_LIMIT {
                    return Err(PredictError::BadOutput {
                        problem: format!(
                            "the model kept calling `{name}` with the same arguments ({args}), {SAME_CALL_LIMIT} times; stopped"
                        ),
                        start: last,
                    });
                }
                if let Some(previous) = earlier.first() {
                    // Do not run it again: remind the model what it returned.
                    let seen = match &previous.result {
                        Ok(v) => v.to_string(),
                        Err(e) => format!("error: {e}"),
                    };
                    request.messages.push(Message::tool(
                        &call.id,
                        format!("You already called `{name}` with these arguments; it returned {seen}. Do not repeat the call: use it, try something else, or answer."),
                    ));
                    trajectory.push(ToolStep {
                        tool: name.clone(),
                        args,
                        result: previous.result.clone(),
                    });
                    continue;
                }
                let result = match self.tools.iter().find(|t| t.name() == name) {
                    Some(tool) => tool.call(args.clone()).await,
                    None => Err(format!(
                        "there is no tool `{name}`; the tools are {}",
                        self.tools
                            .iter()
                            .map(|t| format!("`{}`", t.name()))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )),
                };
                request.messages.push(Message::tool(
                    &call.id,
                    match &result {
                        Ok(v) => v.to_string(),
                        Err(e) => format!("error: {e}"),
                    },
                ));
                trajectory.push(ToolStep {
                    tool: name.clone(),
                    args,
                    result,
                });
            }
        }
        Err(PredictError::BadOutput {
            problem: format!(
                "no answer after {} model replies ({} tool call(s)); raise max_iterations or simplify the task",
                self.max_iterations,
                trajectory.len()
            ),
            start: last,
        })
    }
}
