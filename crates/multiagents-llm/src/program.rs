//! Programs: anything that turns inputs into outputs with LLM calls —
//! `Predict`, `ChainOfThought`, `ReAct`, your own types — and `Then`, which
//! composes two: the first's outputs join the inputs of the second.

use async_trait::async_trait;
use serde_json::{Map, Value};

use super::{ChainOfThought, LlmClient, Predict, PredictError, Prediction, ReAct};

/// An LLM program. Implement it for your own type to compose modules in
/// code; `multiagents::llm::LlmWorker` runs any program as a saga step.
///
/// ```
/// use multiagents::llm::{LlmClient, Predict, PredictError, Prediction, Program, Signature};
/// use serde_json::{Map, Value};
///
/// /// Summarise, then classify the summary.
/// struct SummariseThenClassify {
///     summarise: Predict,
///     classify: Predict,
/// }
///
/// #[multiagents::async_trait]
/// impl Program for SummariseThenClassify {
///     async fn run(&self, client: &LlmClient, inputs: &Map<String, Value>) -> Result<Prediction, PredictError> {
///         let summary = self.summarise.run(client, inputs).await?;
///         self.classify.run(client, &summary.outputs).await
///     }
/// }
///
/// # fn build() -> Result<SummariseThenClassify, multiagents::llm::SignatureError> {
/// let program = SummariseThenClassify {
///     summarise: Predict::new(Signature::parse("document -> summary")?),
///     classify: Predict::new(Signature::parse("summary -> topic")?),
/// };
/// # Ok(program) }
/// ```
#[async_trait]
pub trait Program: Send + Sync + 'static {
    /// Fills the outputs for `inputs`.
    async fn run(
        &self,
        client: &LlmClient,
        inputs: &Map<String, Value>,
    ) -> Result<Prediction, PredictError>;

    /// This program, then `next` with the inputs and this program's outputs.
    fn then<P: Program>(self, next: P) -> Then<Self, P>
    where
        Self: Sized,
    {
        Then { first: self, next }
    }
}

#[async_trait]
impl Program for Predict {
    async fn run(
        &self,
        client: &LlmClient,
        inputs: &Map<String, Value>,
    ) -> Result<Prediction, PredictError> {
        self.call(client, inputs).await
    }
}

#[async_trait]
impl Program for ChainOfThought {
    async fn run(
        &self,
        client: &LlmClient,
        inputs: &Map<String, Value>,
    ) -> Result<Prediction, PredictError> {
        self.call(client, inputs).await
    }
}

#[async_trait]
impl Program for ReAct {
    async fn run(
        &self,
        client: &LlmClient,
        inputs: &Map<String, Value>,
    ) -> Result<Prediction, PredictError> {
        self.call(client, inputs).await.map(|o| o.prediction)
    }
}

/// Two programs in a row: the second sees the inputs and the first's
/// outputs; the result holds both programs' outputs and their summed usage.
#[derive(Clone, Debug)]
pub struct Then<A, B> {
    first: A,
    next: B,
}

#[async_trait]
impl<A: Program, B: Program> Program for Then<A, B> {
    async fn run(
        &self,
        client: &LlmClient,
        inputs: &Map<String, Value>,
    ) -> Result<Prediction, PredictError> {
        let first = self.first.run(client, inputs).await?;
        let mut joined = inputs.clone();
        joined.extend(first.outputs.clone());
        let second = self.next.run(client, &joined).await?;
        let mut outputs = first.outputs;
        outputs.extend(second.outputs);
        let mut usage = first.usage;
        usage.prompt_tokens += second.usage.prompt_tokens;
        usage.completion_tokens += second.usage.completion_tokens;
        Ok(Prediction {
            outputs,
            usage,
            calls: first.calls + second.calls,
        })
    }
}
