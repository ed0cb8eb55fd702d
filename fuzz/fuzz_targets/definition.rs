//! The workflow-definition parser on arbitrary text, as JSON or as YAML
//! (the first byte chooses): it never panics, and a definition it accepts
//! survives a round trip through both formats unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use multiagents_core::workflow::WorkflowDefinition;

fuzz_target!(|bytes: &[u8]| {
    let Some((&format, rest)) = bytes.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let parsed = if format % 2 == 0 {
        WorkflowDefinition::from_json(text)
    } else {
        WorkflowDefinition::from_yaml(text)
    };
    if let Ok(definition) = parsed {
        let json = WorkflowDefinition::from_json(&definition.to_json())
            .expect("a valid definition's JSON parses");
        assert_eq!(definition, json, "the definition changed through JSON");
        let yaml = WorkflowDefinition::from_yaml(&definition.to_yaml())
            .expect("a valid definition's YAML parses");
        assert_eq!(definition, yaml, "the definition changed through YAML");
    }
});
