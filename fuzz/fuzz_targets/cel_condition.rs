//! CEL conditions on arbitrary text, as a definition's checker meets them:
//! parsing, listing the references, and evaluating against an input and
//! step outputs never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use multiagents_core::workflow::expr::Expr;

fuzz_target!(|bytes: &[u8]| {
    let Ok(source) = std::str::from_utf8(bytes) else {
        return;
    };
    if source.len() > 512 {
        return;
    }
    let Ok(expr) = Expr::parse(source) else {
        return;
    };
    let _ = expr.references();
    let input = serde_json::json!({
        "amount": 120.5, "items": [1, 2, 3], "country": "NL",
        "gift_wrap": true, "nested": {"list": ["a", "b"], "n": -1}
    });
    let steps = serde_json::json!({
        "fraud": {"score": 0.3}, "validate": {"ok": true, "lines": [{"sku": "x", "qty": 2}]}
    });
    let _ = expr.eval_bool(&input, &steps);
    let _ = expr.eval_list(&input, &steps);
});
