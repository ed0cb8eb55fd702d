//! The OpenAPI document: served at /openapi.json, every reference resolves,
//! every operation is unique and answers over HTTP (none falls through to
//! the "no such route" answer).

mod common;

use std::collections::BTreeSet;

use common::Api;
use hyper::Method;
use serde_json::Value;

fn refs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            if let Some(Value::String(r)) = m.get("$ref") {
                out.push(r.clone());
            }
            m.values().for_each(|x| refs(x, out));
        }
        Value::Array(a) => a.iter().for_each(|x| refs(x, out)),
        _ => {}
    }
}

fn resolve<'a>(doc: &'a Value, pointer: &str) -> Option<&'a Value> {
    doc.pointer(pointer.strip_prefix('#')?)
}

#[tokio::test]
async fn the_document_describes_every_route_and_every_reference_resolves() {
    let api = Api::start().await;
    let doc = api.get("/openapi.json").await;
    assert_eq!(doc["openapi"], "3.1.0");
    assert_eq!(doc, multiagents_server::openapi_document());
    let mut all = Vec::new();
    refs(&doc, &mut all);
    assert!(all.len() > 20, "{all:?}");
    for r in &all {
        assert!(resolve(&doc, r).is_some(), "{r} does not resolve");
    }
    let paths = doc["paths"].as_object().expect("paths");
    let mut ids = BTreeSet::new();
    for (path, item) in paths {
        for (method, op) in item.as_object().expect("path item") {
            let id = op["operationId"].as_str().expect("an operationId");
            assert!(ids.insert(id.to_string()), "{id} twice");
            let responses = op["responses"].as_object().expect("responses");
            assert!(
                responses.keys().any(|k| k.starts_with('2')),
                "{method} {path}: no 2xx"
            );
            assert!(
                responses.contains_key("default"),
                "{method} {path}: no default"
            );
            // Every path parameter is declared.
            let declared: BTreeSet<&str> = op["parameters"]
                .as_array()
                .map(|p| {
                    p.iter()
                        .filter(|x| x["in"] == "path")
                        .filter_map(|x| x["name"].as_str())
                        .collect()
                })
                .unwrap_or_default();
            let in_path: BTreeSet<&str> = path
                .split('/')
                .filter_map(|s| s.strip_prefix('{')?.strip_suffix('}'))
                .collect();
            assert_eq!(declared, in_path, "{method} {path}");
            // The route is served (the SSE streams are opened elsewhere).
            if path.ends_with("/events") {
                continue;
            }
            let concrete = path
                .replace("{id}", "01a23589-c601-7c83-89ce-e2571642d33d")
                .replace("{name}", "nothing")
                .replace("{token}", "nothing");
            let method: Method = method.to_uppercase().parse().expect("a method");
            let a = api.call(method.clone(), &concrete, &[], "").await;
            assert!(
                a.status < 500
                    && !a.body["detail"]
                        .as_str()
                        .is_some_and(|d| d.starts_with("no such route")),
                "{method} {concrete}: {} {:?}",
                a.status,
                a.body
            );
        }
    }
    assert!(ids.len() >= 30, "{ids:?}");
}
