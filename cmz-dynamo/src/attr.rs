//! Reading and writing DynamoDB attribute values.

use std::collections::HashMap;

use aws_sdk_dynamodb::types::AttributeValue;
use chrono::{DateTime, SecondsFormat, Utc};
use cmz_core::{Error, Result};

/// One DynamoDB item.
pub(crate) type Item = HashMap<String, AttributeValue>;

pub(crate) fn s(value: impl Into<String>) -> AttributeValue {
    AttributeValue::S(value.into())
}

pub(crate) fn n(value: impl ToString) -> AttributeValue {
    AttributeValue::N(value.to_string())
}

/// A timestamp as the legacy code writes it: ISO-8601 UTC with a trailing `Z`; always nine
/// fraction digits, so strings sort in time order and times read back exactly.
pub(crate) fn time(at: DateTime<Utc>) -> AttributeValue {
    AttributeValue::S(time_string(at))
}

pub(crate) fn time_string(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Nanos, true)
}

fn corrupt(table_hint: &str, what: &str) -> Error {
    Error::internal(format!(
        "stored {table_hint} item has a bad or missing `{what}`"
    ))
}

/// Typed reads from an item, with errors that name the attribute.
pub(crate) struct Reader<'a> {
    item: &'a Item,
    kind: &'static str,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(item: &'a Item, kind: &'static str) -> Self {
        Self { item, kind }
    }

    pub(crate) fn get(&self, key: &str) -> Option<&'a AttributeValue> {
        self.item
            .get(key)
            .filter(|v| !matches!(v, AttributeValue::Null(_)))
    }

    pub(crate) fn str(&self, key: &str) -> Result<&'a str> {
        self.opt_str(key).ok_or_else(|| corrupt(self.kind, key))
    }

    pub(crate) fn opt_str(&self, key: &str) -> Option<&'a str> {
        match self.get(key) {
            Some(AttributeValue::S(v)) => Some(v.as_str()),
            _ => None,
        }
    }

    pub(crate) fn u64(&self, key: &str) -> Result<u64> {
        self.opt_u64(key).ok_or_else(|| corrupt(self.kind, key))
    }

    pub(crate) fn opt_u64(&self, key: &str) -> Option<u64> {
        match self.get(key) {
            Some(AttributeValue::N(v)) => v.parse::<u64>().ok().or_else(|| {
                v.parse::<f64>()
                    .ok()
                    .filter(|f| f.is_finite() && *f >= 0.0)
                    .map(|f| f as u64)
            }),
            _ => None,
        }
    }

    pub(crate) fn opt_i64(&self, key: &str) -> Option<i64> {
        match self.get(key) {
            Some(AttributeValue::N(v)) => v.parse::<i64>().ok(),
            _ => None,
        }
    }

    pub(crate) fn bool(&self, key: &str) -> bool {
        match self.get(key) {
            Some(AttributeValue::Bool(b)) => *b,
            Some(AttributeValue::S(v)) => v.eq_ignore_ascii_case("true"),
            Some(AttributeValue::N(v)) => v != "0",
            _ => false,
        }
    }

    pub(crate) fn time(&self, key: &str) -> Result<DateTime<Utc>> {
        self.opt_time(key).ok_or_else(|| corrupt(self.kind, key))
    }

    pub(crate) fn opt_time(&self, key: &str) -> Option<DateTime<Utc>> {
        self.opt_str(key).and_then(parse_time)
    }

    pub(crate) fn str_list(&self, key: &str) -> Vec<String> {
        match self.get(key) {
            Some(AttributeValue::L(values)) => values
                .iter()
                .filter_map(|v| match v {
                    AttributeValue::S(s) => Some(s.clone()),
                    _ => None,
                })
                .collect(),
            Some(AttributeValue::Ss(values)) => values.clone(),
            Some(AttributeValue::S(v)) if !v.is_empty() => vec![v.clone()],
            _ => Vec::new(),
        }
    }

    pub(crate) fn json(&self, key: &str) -> Option<serde_json::Value> {
        self.get(key).map(to_json)
    }
}

/// Parses the timestamps the legacy code and cmz write (`…Z`, `…+00:00`, or no zone at all,
/// which Python's `datetime.utcnow().isoformat()` produces).
pub(crate) fn parse_time(value: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(value)
        .map(|t| t.with_timezone(&Utc))
        .ok()
        .or_else(|| {
            chrono::NaiveDateTime::parse_from_str(value, "%Y-%m-%dT%H:%M:%S%.f")
                .ok()
                .map(|t| t.and_utc())
        })
}

/// A JSON value as a DynamoDB attribute (numbers as `N`, objects as `M`, arrays as `L`).
pub(crate) fn from_json(value: &serde_json::Value) -> AttributeValue {
    use serde_json::Value;
    match value {
        Value::Null => AttributeValue::Null(true),
        Value::Bool(b) => AttributeValue::Bool(*b),
        Value::Number(num) => AttributeValue::N(num.to_string()),
        Value::String(text) => AttributeValue::S(text.clone()),
        Value::Array(values) => AttributeValue::L(values.iter().map(from_json).collect()),
        Value::Object(map) => {
            AttributeValue::M(map.iter().map(|(k, v)| (k.clone(), from_json(v))).collect())
        }
    }
}

/// A DynamoDB attribute as JSON (sets become arrays, binary becomes null).
pub(crate) fn to_json(value: &AttributeValue) -> serde_json::Value {
    use serde_json::Value;
    match value {
        AttributeValue::S(text) => Value::String(text.clone()),
        AttributeValue::N(num) => num
            .parse::<i64>()
            .map(Value::from)
            .or_else(|_| num.parse::<u64>().map(Value::from))
            .ok()
            .or_else(|| {
                num.parse::<f64>()
                    .ok()
                    .and_then(|f| serde_json::Number::from_f64(f).map(Value::Number))
            })
            .unwrap_or(Value::Null),
        AttributeValue::Bool(b) => Value::Bool(*b),
        AttributeValue::L(values) => Value::Array(values.iter().map(to_json).collect()),
        AttributeValue::M(map) => {
            Value::Object(map.iter().map(|(k, v)| (k.clone(), to_json(v))).collect())
        }
        AttributeValue::Ss(values) => {
            Value::Array(values.iter().cloned().map(Value::String).collect())
        }
        AttributeValue::Ns(values) => Value::Array(
            values
                .iter()
                .map(|v| to_json(&AttributeValue::N(v.clone())))
                .collect(),
        ),
        _ => Value::Null,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trip() {
        let value = serde_json::json!({
            "tokensPrompt": 12, "latencyMs": 340, "model": "gpt-4o-mini",
            "fallback": true, "score": 0.25, "tags": ["a", "b"], "nested": {"x": null}
        });
        assert_eq!(to_json(&from_json(&value)), value);
    }

    #[test]
    fn times_sort_as_strings_and_parse_legacy_forms() {
        let a = parse_time("2024-05-01T10:00:00Z").unwrap();
        let b = parse_time("2024-05-01T10:00:00.5").unwrap();
        let c = parse_time("2024-05-01T10:00:01+00:00").unwrap();
        assert!(a < b && b < c);
        assert!(time_string(a) < time_string(b) && time_string(b) < time_string(c));
        assert_eq!(time_string(a), "2024-05-01T10:00:00.000000000Z");
        assert!(parse_time("yesterday").is_none());
    }
}
