//! The metrics LLM calls record, through the `metrics` crate: exported
//! wherever the process installs a recorder (`multiagents` lists them with
//! its own in `monitoring::metrics`).

/// LLM tokens, by `model` and `direction` (`in` for the prompt, `out` for
/// the completion).
pub const LLM_TOKENS: &str = "multiagents_llm_tokens_total";
/// LLM calls, by `model` and `outcome`.
pub const LLM_CALLS: &str = "multiagents_llm_calls_total";
/// What LLM calls cost, in the configured currency, by `model` (only when a
/// price is configured).
pub const LLM_COST: &str = "multiagents_llm_cost_total";

/// Every LLM metric: name, kind and what it means.
pub const CATALOGUE: &[(&str, &str, &str)] = &[
    (
        LLM_TOKENS,
        "counter",
        "LLM tokens, by model and direction (in, out).",
    ),
    (LLM_CALLS, "counter", "LLM calls, by model and outcome."),
    (
        LLM_COST,
        "counter",
        "What LLM calls cost, when a price is configured.",
    ),
];
