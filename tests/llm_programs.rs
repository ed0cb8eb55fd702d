//! Signatures and modules against a real local HTTP server that speaks the
//! OpenAI chat API: structured output, the text-marker fallback for servers
//! without `response_format`, a repaired reply, replies that cannot be used
//! (malformed, wrongly typed, truncated), chain of thought, and an LLM step
//! in a saga that compensates.
#![cfg(feature = "llm")]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use multiagents::llm::{
    ChainOfThought, LlmClient, LlmConfig, LlmWorker, Predict, PredictError, Signature,
};
use multiagents::worker::{WorkerContext, WorkerError, from_fn};
use multiagents::{Runtime, WorkflowBuilder, WorkflowStatus};
use serde_json::{Map, Value, json};

type Handler = Arc<dyn Fn(&Value, usize) -> (u16, String) + Send + Sync>;

#[derive(Clone)]
struct Fake {
    handler: Handler,
    seen: Arc<Mutex<Vec<Value>>>,
}

async fn completions(State(fake): State<Fake>, body: String) -> (StatusCode, String) {
    let request: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    let n = {
        let mut seen = fake.seen.lock().expect("lock");
        seen.push(request.clone());
        seen.len()
    };
    let (status, body) = (fake.handler)(&request, n);
    (StatusCode::from_u16(status).expect("status"), body)
}

async fn serve(handler: Handler) -> (LlmClient, Arc<Mutex<Vec<Value>>>) {
    let fake = Fake {
        handler,
        seen: Arc::new(Mutex::new(Vec::new())),
    };
    let seen = fake.seen.clone();
    let app = Router::new()
        .route("/v1/chat/completions", post(completions))
        .with_state(fake);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    let client = LlmClient::new(
        LlmConfig::new(format!("http://{addr}/v1"))
            .model("fake")
            .retries(2, Duration::from_millis(10)),
    );
    (client, seen)
}

/// A chat completion whose message is `content`.
fn completion(content: &str, finish: &str) -> (u16, String) {
    (
        200,
        json!({
            "model": "fake",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}],
            "usage": {"prompt_tokens": 30, "completion_tokens": 8}
        })
        .to_string(),
    )
}

fn classify() -> Signature {
    Signature::parse("ticket -> category: String, urgent: bool")
        .expect("signature")
        .instructions("Classify a support ticket.")
        .describe("category", "billing, bug or question")
}

fn ticket(text: &str) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("ticket".into(), json!(text));
    m
}

#[tokio::test]
async fn structured_output_is_asked_for_with_the_schema_and_typed() {
    let (client, seen) = serve(Arc::new(|_req, _n| {
        completion(r#"{"category": "billing", "urgent": true}"#, "stop")
    }))
    .await;
    let p = Predict::new(classify());
    let out = p
        .call(&client, &ticket("I was charged twice!"))
        .await
        .expect("prediction");
    assert_eq!(out.outputs["category"], "billing");
    assert_eq!(out.outputs["urgent"], true);
    assert_eq!(out.usage.total(), 38);
    let req = &seen.lock().expect("lock")[0];
    let schema = &req["response_format"]["json_schema"]["schema"];
    assert_eq!(schema["required"], json!(["category", "urgent"]));
    assert_eq!(schema["properties"]["urgent"]["type"], "boolean");
    let system = req["messages"][0]["content"].as_str().expect("system");
    assert!(system.starts_with("Classify a support ticket."), "{system}");
    assert!(
        system.contains("`category` (text): billing, bug or question"),
        "{system}"
    );
    assert!(
        req["messages"][1]["content"]
            .as_str()
            .expect("user")
            .contains("I was charged twice!")
    );
}

#[tokio::test]
async fn a_server_without_structured_output_gets_text_markers_and_is_remembered() {
    let (client, seen) = serve(Arc::new(|req, _n| {
        if req.get("response_format").is_some() {
            (
                400,
                r#"{"error": {"message": "response_format is not supported by this model"}}"#
                    .into(),
            )
        } else {
            completion(
                "[[ ## category ## ]]\nbug\n\n[[ ## urgent ## ]]\nfalse\n\n[[ ## completed ## ]]",
                "stop",
            )
        }
    }))
    .await;
    let p = Predict::new(classify());
    for _ in 0..2 {
        let out = p
            .call(&client, &ticket("The app crashes."))
            .await
            .expect("prediction");
        assert_eq!(out.outputs["category"], "bug");
        assert_eq!(out.outputs["urgent"], false);
    }
    assert!(p.uses_text_markers());
    let seen = seen.lock().expect("lock");
    // One refused structured request, then two text requests.
    assert_eq!(seen.len(), 3);
    assert!(seen[2].get("response_format").is_none());
    assert!(
        seen[2]["messages"][0]["content"]
            .as_str()
            .expect("system")
            .contains("[[ ## name ## ]]")
    );
}

#[tokio::test]
async fn a_malformed_reply_gets_one_repair_attempt() {
    let (client, seen) = serve(Arc::new(|_req, n| {
        if n == 1 {
            completion(r#"{"category": "billing", "urgent": tru"#, "stop")
        } else {
            completion(r#"{"category": "billing", "urgent": true}"#, "stop")
        }
    }))
    .await;
    let out = Predict::new(classify())
        .call(&client, &ticket("Refund please"))
        .await
        .expect("repaired");
    assert_eq!(out.calls, 2);
    assert_eq!(out.usage.total(), 76);
    let seen = seen.lock().expect("lock");
    let messages = seen[1]["messages"].as_array().expect("messages");
    let last = messages.last().expect("last")["content"]
        .as_str()
        .expect("text");
    assert!(
        last.contains("could not be used: it is not valid JSON"),
        "{last}"
    );
    assert_eq!(messages[messages.len() - 2]["role"], "assistant");
}

#[tokio::test]
async fn replies_that_stay_unusable_fail_with_the_bad_part_quoted() {
    // Wrongly typed, twice.
    let (client, _) = serve(Arc::new(|_req, _n| {
        completion(r#"{"category": "bug", "urgent": "maybe"}"#, "stop")
    }))
    .await;
    let err = Predict::new(classify())
        .call(&client, &ticket("hmm"))
        .await
        .expect_err("unusable");
    assert!(matches!(err, PredictError::BadOutput { .. }));
    assert!(err.is_transient());
    let text = err.to_string();
    assert!(
        text.contains("output `urgent`: `maybe` is not true or false"),
        "{text}"
    );
    assert!(
        text.contains(r#"the reply began: {"category": "bug", "urgent": "maybe"}"#),
        "{text}"
    );

    // Truncated, twice.
    let (client, _) = serve(Arc::new(|_req, _n| {
        completion(r#"{"category": "bug", "urg"#, "length")
    }))
    .await;
    let err = Predict::new(classify())
        .call(&client, &ticket("long"))
        .await
        .expect_err("truncated");
    assert!(
        err.to_string().contains("cut off (finish_reason `length`)"),
        "{err}"
    );

    // Inputs that do not fit the signature are refused before any call.
    let (client, seen) = serve(Arc::new(|_req, _n| completion("{}", "stop"))).await;
    let err = Predict::new(classify())
        .call(&client, &Map::new())
        .await
        .expect_err("no input");
    assert!(
        err.to_string().contains("input `ticket` is missing"),
        "{err}"
    );
    assert!(seen.lock().expect("lock").is_empty());
}

#[tokio::test]
async fn chain_of_thought_asks_for_reasoning_first() {
    let (client, seen) = serve(Arc::new(|_req, _n| {
        completion(
            r#"{"reasoning": "Charged twice means billing.", "category": "billing", "urgent": true}"#,
            "stop",
        )
    }))
    .await;
    let out = ChainOfThought::new(classify())
        .call(&client, &ticket("Charged twice"))
        .await
        .expect("prediction");
    assert_eq!(out.outputs["reasoning"], "Charged twice means billing.");
    let req = &seen.lock().expect("lock")[0];
    assert_eq!(
        req["response_format"]["json_schema"]["schema"]["required"],
        json!(["reasoning", "category", "urgent"])
    );
}

#[tokio::test]
async fn an_llm_step_sits_in_a_saga_with_retries_and_compensation() {
    // The endpoint is rate-limited once, then classifies by the ticket text.
    let (client, _) = serve(Arc::new(|req, n| {
        if n == 1 {
            return (429, r#"{"error": "slow down"}"#.into());
        }
        let user = req["messages"]
            .as_array()
            .and_then(|m| m.last())
            .and_then(|m| m["content"].as_str())
            .unwrap_or_default()
            .to_string();
        if user.contains("crash") {
            completion(r#"{"category": "bug", "urgent": true}"#, "stop")
        } else {
            completion(r#"{"category": "question", "urgent": false}"#, "stop")
        }
    }))
    .await;
    let undone = Arc::new(Mutex::new(Vec::<String>::new()));
    let u = undone.clone();
    let rt = Runtime::builder()
        .workflow(
            WorkflowBuilder::new("support")
                .step("classify", "classify_ticket")
                .step("open_case", "open_case")
                .compensate_with("close_case")
                .step("page", "page_on_call")
                .build()
                .expect("valid"),
        )
        .worker(LlmWorker::predict(
            "classify_ticket",
            client,
            Predict::new(classify()),
        ))
        .worker(from_fn(
            "open_case",
            |_i: Value, ctx: WorkerContext| async move {
                let c: Value = ctx.output("classify").await?;
                Ok::<_, WorkerError>(
                    json!({"case": format!("CASE-{}", c["category"].as_str().unwrap_or("?"))}),
                )
            },
        ))
        .worker(from_fn(
            "close_case",
            move |_i: Value, ctx: WorkerContext| {
                let u = u.clone();
                async move {
                    let case: Value = ctx.output("open_case").await?;
                    u.lock().expect("lock").push(case["case"].to_string());
                    Ok::<_, WorkerError>(json!(null))
                }
            },
        ))
        .worker(from_fn(
            "page_on_call",
            |_i: Value, ctx: WorkerContext| async move {
                let c: Value = ctx.output("classify").await?;
                if c["urgent"] == true {
                    return Err(WorkerError::fatal("nobody is on call"));
                }
                Ok(json!("no page needed"))
            },
        ))
        .start()
        .await
        .expect("runtime");
    let client = rt.client();
    let calm = client
        .start("support", &json!({"ticket": "How do I export my data?"}))
        .await
        .expect("start");
    let state = client
        .wait(calm, Duration::from_secs(10))
        .await
        .expect("ends");
    assert_eq!(state.status, WorkflowStatus::Completed, "{state:?}");
    let urgent = client
        .start("support", &json!({"ticket": "The app crashes on start"}))
        .await
        .expect("start");
    let state = client
        .wait(urgent, Duration::from_secs(10))
        .await
        .expect("ends");
    assert_eq!(state.status, WorkflowStatus::Compensated, "{state:?}");
    assert_eq!(
        undone.lock().expect("lock").clone(),
        vec![r#""CASE-bug""#.to_string()]
    );
    rt.shutdown().await;
}

/// A fake model that knows each ticket's right category, but without demos
/// in the prompt gets every ticket that mentions "invoice" wrong.
fn few_shot_model() -> Handler {
    Arc::new(|req, _n| {
        let messages = req["messages"].as_array().cloned().unwrap_or_default();
        let has_demos = messages.len() > 2;
        let user = messages
            .last()
            .and_then(|m| m["content"].as_str())
            .unwrap_or_default()
            .to_string();
        let category = if user.contains("crash") {
            "bug"
        } else if user.contains("invoice") {
            if has_demos { "billing" } else { "question" }
        } else if user.contains("charged") {
            "billing"
        } else {
            "question"
        };
        completion(
            &json!({"category": category, "urgent": user.contains("crash")}).to_string(),
            "stop",
        )
    })
}

fn example(text: &str, category: &str, urgent: bool) -> multiagents::llm::Example {
    let mut outputs = Map::new();
    outputs.insert("category".into(), json!(category));
    outputs.insert("urgent".into(), json!(urgent));
    multiagents::llm::Example {
        inputs: ticket(text),
        outputs,
    }
}

#[tokio::test]
async fn bootstrap_few_shot_raises_the_dev_score_and_the_compiled_program_saves() {
    use multiagents::llm::{BootstrapFewShot, LabeledFewShot, evaluate, exact_match};
    let (client, _) = serve(few_shot_model()).await;
    let train = vec![
        example("I was charged twice", "billing", false),
        example("The app crashes on login", "bug", true),
        example("Where is my invoice for May?", "billing", false),
        example("How do I export data?", "question", false),
    ];
    let dev = vec![
        example("Please resend the invoice", "billing", false),
        example("The invoice total is wrong", "billing", false),
        example("It crashes when I upload", "bug", true),
        example("Can I change my email?", "question", false),
    ];
    let program = Predict::new(classify());
    let before = evaluate(&program, &client, &dev, &exact_match).await;
    assert_eq!(before.score(), 0.5, "{before:?}");

    let compiled = BootstrapFewShot { max_demos: 4 }
        .compile(&program, &client, &train, &exact_match)
        .await
        .expect("compiles");
    // The invoice example was answered wrongly while bootstrapping: not kept.
    assert_eq!(compiled.demos().len(), 3);
    let after = evaluate(&compiled, &client, &dev, &exact_match).await;
    assert_eq!(after.score(), 1.0, "{after:?}");
    assert!(after.score() > before.score());

    // Saved and loaded, it scores the same.
    let loaded = Predict::from_json(&compiled.to_json()).expect("loads");
    assert_eq!(loaded.demos(), compiled.demos());
    assert_eq!(
        evaluate(&loaded, &client, &dev, &exact_match).await.score(),
        1.0
    );

    // Labelled examples as demos work too.
    let labeled = LabeledFewShot { k: 2 }.compile(&program, &train);
    assert_eq!(labeled.demos().len(), 2);
    assert_eq!(
        evaluate(&labeled, &client, &dev, &exact_match)
            .await
            .score(),
        1.0
    );
}

#[tokio::test]
async fn replies_are_recorded_to_a_file_and_played_back_without_a_server() {
    use multiagents::llm::Replay;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("replies.jsonl");
    let (client, seen) = serve(Arc::new(|_req, _n| {
        completion(r#"{"category": "billing", "urgent": false}"#, "stop")
    }))
    .await;
    let recording = client.with_replay(Replay::record(&file).expect("record"));
    let p = Predict::new(classify());
    let live = p.call(&recording, &ticket("Refund?")).await.expect("live");
    // Asked again: served from the recording, not the server.
    p.call(&recording, &ticket("Refund?")).await.expect("again");
    assert_eq!(seen.lock().expect("lock").len(), 1);

    // Playback: an endpoint that does not exist is never called.
    let offline = LlmClient::new(LlmConfig::new("http://127.0.0.1:1/v1").model("fake"))
        .with_replay(Replay::playback(&file).expect("playback"));
    let replayed = p
        .call(&offline, &ticket("Refund?"))
        .await
        .expect("replayed");
    assert_eq!(replayed.outputs, live.outputs);
    // A request that was never recorded says so.
    let err = p
        .call(&offline, &ticket("Something new"))
        .await
        .expect_err("not recorded");
    assert!(
        err.to_string().contains("has no reply for this request"),
        "{err}"
    );

    // The in-memory cache: the second identical call does not reach the server.
    let (client, seen) = serve(Arc::new(|_req, _n| {
        completion(r#"{"category": "bug", "urgent": true}"#, "stop")
    }))
    .await;
    let cached = client.with_replay(Replay::cache());
    for _ in 0..3 {
        p.call(&cached, &ticket("crash")).await.expect("cached");
    }
    assert_eq!(seen.lock().expect("lock").len(), 1);
}

mod tools {
    use multiagents::llm::{ReAct, Tool, tool};

    /// Looks up an order by its number.
    #[tool]
    pub async fn lookup_order(
        order_id: u64,
        with_items: Option<bool>,
    ) -> Result<serde_json::Value, String> {
        if order_id == 404 {
            return Err(format!("no order {order_id}"));
        }
        Ok(
            serde_json::json!({"order_id": order_id, "status": "shipped", "items": with_items.unwrap_or(false)}),
        )
    }

    #[test]
    fn the_schema_comes_from_the_types_and_the_doc() {
        assert_eq!(lookup_order.name(), "lookup_order");
        assert_eq!(
            lookup_order.description(),
            "Looks up an order by its number."
        );
        assert_eq!(
            lookup_order.parameters(),
            serde_json::json!({
                "type": "object",
                "properties": {"order_id": {"type": "integer"}, "with_items": {"type": "boolean"}},
                "required": ["order_id"],
            })
        );
        let _ = ReAct::new(super::classify()).tool(lookup_order);
    }
}

fn tool_call(id: &str, name: &str, args: &str) -> (u16, String) {
    (
        200,
        json!({
            "model": "fake",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": null,
                "tool_calls": [{"id": id, "type": "function", "function": {"name": name, "arguments": args}}]},
                "finish_reason": "tool_calls"}],
            "usage": {"prompt_tokens": 50, "completion_tokens": 10}
        })
        .to_string(),
    )
}

fn order_signature() -> Signature {
    Signature::parse("question -> status: String").expect("signature")
}

#[tokio::test]
async fn react_calls_a_tool_then_answers_from_its_result() {
    use multiagents::llm::ReAct;
    let (client, seen) = serve(Arc::new(|req, _n| {
        let messages = req["messages"].as_array().cloned().unwrap_or_default();
        match messages.iter().rev().find(|m| m["role"] == "tool") {
            None => tool_call("call_1", "lookup_order", r#"{"order_id": 42}"#),
            Some(result) => {
                let r: Value = serde_json::from_str(result["content"].as_str().unwrap_or("{}"))
                    .unwrap_or(Value::Null);
                completion(&json!({"status": r["status"]}).to_string(), "stop")
            }
        }
    }))
    .await;
    let mut q = Map::new();
    q.insert("question".into(), json!("Where is order 42?"));
    let out = ReAct::new(order_signature())
        .tool(tools::lookup_order)
        .call(&client, &q)
        .await
        .expect("answer");
    assert_eq!(out.prediction.outputs["status"], "shipped");
    assert_eq!(out.trajectory.len(), 1);
    assert_eq!(out.trajectory[0].args, json!({"order_id": 42}));
    let seen = seen.lock().expect("lock");
    assert_eq!(seen[0]["tools"][0]["function"]["name"], "lookup_order");
    assert_eq!(seen[1]["messages"][3]["tool_call_id"], "call_1");
}

#[tokio::test]
async fn react_stops_a_model_that_repeats_the_same_call_and_bounds_iterations() {
    use multiagents::llm::ReAct;
    // Always the same call: the repeat is not run again, then the run stops.
    let (client, _) = serve(Arc::new(|_req, n| {
        tool_call(&format!("c{n}"), "lookup_order", r#"{"order_id": 7}"#)
    }))
    .await;
    let mut q = Map::new();
    q.insert("question".into(), json!("?"));
    let err = ReAct::new(order_signature())
        .tool(tools::lookup_order)
        .call(&client, &q)
        .await
        .expect_err("stopped");
    assert!(
        err.to_string()
            .contains("kept calling `lookup_order` with the same arguments"),
        "{err}"
    );

    // New calls each time (a tool that does not exist, then others): bounded.
    let (client, seen) = serve(Arc::new(|_req, n| {
        tool_call(&format!("c{n}"), "teleport", &format!(r#"{{"n": {n}}}"#))
    }))
    .await;
    let err = ReAct::new(order_signature())
        .tool(tools::lookup_order)
        .max_iterations(3)
        .call(&client, &q)
        .await
        .expect_err("bounded");
    assert!(
        err.to_string().contains("no answer after 3 model replies"),
        "{err}"
    );
    let seen = seen.lock().expect("lock");
    let told = seen[1]["messages"]
        .as_array()
        .expect("messages")
        .last()
        .expect("last")["content"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(told.contains("there is no tool `teleport`"), "{told}");
}

#[tokio::test]
async fn a_workflow_token_budget_fails_the_step_that_exceeds_it_and_compensates() {
    // Every reply costs 38 tokens (30 in, 8 out).
    let (client, _) = serve(Arc::new(|_req, _n| {
        completion(r#"{"category": "billing", "urgent": false}"#, "stop")
    }))
    .await;
    let run = |budget: u64| {
        let client = client.clone();
        async move {
            let undone = Arc::new(Mutex::new(0u32));
            let u = undone.clone();
            let rt = Runtime::builder()
                .workflow(
                    WorkflowBuilder::new("two_llm_steps")
                        .step("first", "first_llm")
                        .step("act", "act")
                        .compensate_with("undo_act")
                        .step("second", "second_llm")
                        .build()
                        .expect("valid"),
                )
                .worker(
                    LlmWorker::predict("first_llm", client.clone(), Predict::new(classify()))
                        .token_budget(budget),
                )
                .worker(
                    LlmWorker::predict("second_llm", client, Predict::new(classify()))
                        .token_budget(budget),
                )
                .worker(from_fn("act", |_i: Value, _ctx: WorkerContext| async {
                    Ok::<_, WorkerError>(json!("done"))
                }))
                .worker(from_fn(
                    "undo_act",
                    move |_i: Value, _ctx: WorkerContext| {
                        let u = u.clone();
                        async move {
                            *u.lock().expect("lock") += 1;
                            Ok::<_, WorkerError>(json!(null))
                        }
                    },
                ))
                .start()
                .await
                .expect("runtime");
            let c = rt.client();
            let tx = c
                .start("two_llm_steps", &json!({"ticket": "refund"}))
                .await
                .expect("start");
            let state = c.wait(tx, Duration::from_secs(10)).await.expect("ends");
            rt.shutdown().await;
            let undone = *undone.lock().expect("lock");
            (state, undone)
        }
    };
    let (state, undone) = run(100).await;
    assert_eq!(state.status, WorkflowStatus::Completed);
    assert_eq!(undone, 0);
    let first: Value = state.output("first").expect("first").parse().expect("json");
    assert_eq!(
        first["_usage"],
        json!({"prompt_tokens": 30, "completion_tokens": 8})
    );

    // 38 + 38 > 50: the second LLM step fails for good and `act` is undone.
    let (state, undone) = run(50).await;
    assert_eq!(state.status, WorkflowStatus::Compensated, "{state:?}");
    assert_eq!(undone, 1);
    let error = state
        .step("second")
        .and_then(|s| s.last_error.clone())
        .expect("error");
    assert_eq!(
        error.kind.as_ref().map(|k| k.as_str()),
        Some("token_budget")
    );
    assert!(
        error
            .message
            .contains("token budget of 50 is exceeded: 76 used"),
        "{error}"
    );
}

#[tokio::test]
async fn modules_compose_into_a_program_that_runs_as_a_step() {
    use multiagents::llm::Program;
    let (client, seen) = serve(Arc::new(|req, _n| {
        let required = req["response_format"]["json_schema"]["schema"]["required"].clone();
        if required == json!(["summary"]) {
            completion(r#"{"summary": "customer double-charged"}"#, "stop")
        } else {
            completion(r#"{"topic": "billing"}"#, "stop")
        }
    }))
    .await;
    let program = Predict::new(Signature::parse("document -> summary").expect("sig")).then(
        Predict::new(Signature::parse("summary -> topic").expect("sig")),
    );
    let mut inputs = Map::new();
    inputs.insert(
        "document".into(),
        json!("A long email about being charged twice."),
    );
    let out = program.run(&client, &inputs).await.expect("runs");
    assert_eq!(out.outputs["summary"], "customer double-charged");
    assert_eq!(out.outputs["topic"], "billing");
    assert_eq!(out.calls, 2);
    let second_user = seen.lock().expect("lock")[1]["messages"][1]["content"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        second_user.contains("customer double-charged"),
        "{second_user}"
    );

    // The same program as a saga step.
    let rt = Runtime::builder()
        .workflow(
            WorkflowBuilder::new("triage_doc")
                .step("read", "read_document")
                .build()
                .expect("valid"),
        )
        .worker(LlmWorker::new("read_document", client, program))
        .start()
        .await
        .expect("runtime");
    let c = rt.client();
    let tx = c.start("triage_doc", &inputs).await.expect("start");
    let state = c.wait(tx, Duration::from_secs(10)).await.expect("ends");
    assert_eq!(state.status, WorkflowStatus::Completed);
    let read: Value = state.output("read").expect("read").parse().expect("json");
    assert_eq!(read["topic"], "billing");
    rt.shutdown().await;
}

#[tokio::test]
async fn with_prices_set_an_llm_step_reports_what_it_cost_beside_its_tokens() {
    // 30 tokens in, 8 out; $2 and $10 per million.
    let (client, _) = serve(Arc::new(|_req, _n| {
        completion(r#"{"category": "billing", "urgent": false}"#, "stop")
    }))
    .await;
    let priced = LlmClient::new(client.config().clone().prices(2.0, 10.0));
    let rt = Runtime::builder()
        .workflow(
            WorkflowBuilder::new("priced")
                .step("classify", "priced_llm")
                .build()
                .expect("valid"),
        )
        .worker(LlmWorker::predict(
            "priced_llm",
            priced,
            Predict::new(classify()),
        ))
        .start()
        .await
        .expect("runtime");
    let c = rt.client();
    let tx = c
        .start("priced", &json!({"ticket": "refund"}))
        .await
        .expect("start");
    let state = c.wait(tx, Duration::from_secs(10)).await.expect("ends");
    rt.shutdown().await;
    let out: Value = state
        .output("classify")
        .expect("output")
        .parse()
        .expect("json");
    let usage = &out["_usage"];
    assert_eq!(usage["prompt_tokens"], 30);
    assert_eq!(usage["completion_tokens"], 8);
    let cost = usage["cost_usd"].as_f64().expect("a cost");
    assert!((cost - 0.000_14).abs() < 1e-12, "{cost}");
}
