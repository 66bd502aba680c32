//! The decoders of stored DynamoDB items (turn items, legacy conversations, sessions,
//! personas, users, families, refresh tokens, rate counters): an item written by anyone,
//! the legacy services included, is read or refused with an error, never a panic.
//!
//! The input is an item in DynamoDB's JSON form (`{"seq": {"N": "1"}, "messages": {"L":
//! [...]}}`, as the AWS CLI prints it), so the seeds are items the tests and the legacy
//! fixture write. A value that is not one of DynamoDB's types becomes `NULL`.

#![no_main]

use std::collections::HashMap;

use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::AttributeValue;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fn strings(value: &Value) -> Vec<String> {
    match value {
        Value::Array(items) => items
            .iter()
            .map(|v| match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .collect(),
        _ => Vec::new(),
    }
}

fn attribute(value: &Value) -> AttributeValue {
    let Value::Object(typed) = value else {
        return AttributeValue::Null(true);
    };
    let Some((kind, inner)) = typed.iter().next() else {
        return AttributeValue::Null(true);
    };
    let text = || match inner {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    match kind.as_str() {
        "S" => AttributeValue::S(text()),
        "N" => AttributeValue::N(text()),
        "B" => AttributeValue::B(Blob::new(text().into_bytes())),
        "BOOL" => AttributeValue::Bool(inner.as_bool().unwrap_or(false)),
        "SS" => AttributeValue::Ss(strings(inner)),
        "NS" => AttributeValue::Ns(strings(inner)),
        "BS" => AttributeValue::Bs(
            strings(inner)
                .into_iter()
                .map(|s| Blob::new(s.into_bytes()))
                .collect(),
        ),
        "L" => AttributeValue::L(match inner {
            Value::Array(items) => items.iter().map(attribute).collect(),
            _ => Vec::new(),
        }),
        "M" => AttributeValue::M(item(inner)),
        _ => AttributeValue::Null(true),
    }
}

fn item(value: &Value) -> HashMap<String, AttributeValue> {
    match value {
        Value::Object(map) => map.iter().map(|(k, v)| (k.clone(), attribute(v))).collect(),
        _ => HashMap::new(),
    }
}

fuzz_target!(|data: &[u8]| {
    // serde_json's recursion limit keeps nesting within DynamoDB's own 32 levels or so.
    let Ok(value) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    cmz_dynamo::fuzzing::decode_item(&item(&value));
});
