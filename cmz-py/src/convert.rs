//! Conversions shared by the Python classes: ids, limits, pages and result dicts.

use cmz_core::service::TurnReply;
use cmz_core::store::{Cursor, PageRequest};
use cmz_core::types::Message;
use cmz_core::{Error, Result};
use pyo3::prelude::*;
use serde_json::{Value, json};

use crate::runtime::{block_on, to_python};

pub(crate) fn to_json<T: serde::Serialize>(value: &T) -> Result<Value> {
    serde_json::to_value(value).map_err(|e| Error::internal("serialize").with_source(e))
}

pub(crate) fn id<T>(make: fn(String) -> Result<T>, value: String) -> PyResult<T> {
    make(value).map_err(crate::errors::to_py)
}

/// A message as Python sees it: `metadata` is the caller's own map when one was stored
/// (verbatim), else cmz's typed fields; `tokenCount` (the content's tokens, counted when
/// it was stored; `None` for legacy items) and `redacted` (the kinds of personal details
/// taken out of it) sit beside it.
pub(crate) fn message_json(message: &Message) -> Result<Value> {
    let mut value = to_json(message)?;
    if let Some(object) = value.as_object_mut() {
        object.insert(
            "metadata".into(),
            Value::Object(message.metadata.to_caller()),
        );
        object.insert("tokenCount".into(), message.metadata.token_count.into());
        object.insert("redacted".into(), message.metadata.redacted.clone().into());
    }
    Ok(value)
}

pub(crate) fn reply_json(reply: &TurnReply) -> Result<Value> {
    Ok(json!({
        "reply": reply.reply,
        "sessionId": reply.session_id,
        "sessionCreated": reply.session_created,
        "turn": reply.turn,
        "userMessage": message_json(&reply.user_message)?,
        "assistantMessage": message_json(&reply.assistant_message)?,
        "usage": reply.usage.map(|u| to_json(&u)).transpose()?,
        "fallback": reply.fallback,
        "interrupted": reply.interrupted,
        "replayed": reply.replayed,
        "moderation": {
            "flagged": reply.moderation.flagged,
            "categories": reply.moderation.categories,
        },
        "rateLimit": reply.quota.as_ref().map(|quota| {
            let limit = quota.turn_limit.as_ref();
            json!({
                "remaining": limit.map(|l| l.limit.saturating_sub(l.used)),
                "resetTime": limit.map(|l| l.resets_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
                "dailyUsage": quota.calls_today,
                "tokenBudgets": quota.budgets,
            })
        }),
    }))
}

/// A limit from Python: 1 to `max`, else a `ValidationError` naming the argument.
pub(crate) fn limit(name: &'static str, value: i128, max: usize) -> PyResult<usize> {
    usize::try_from(value)
        .ok()
        .filter(|v| (1..=max).contains(v))
        .ok_or_else(|| {
            crate::errors::to_py(Error::validation(
                name,
                format!("{name} must be from 1 to {max}, got {value}"),
            ))
        })
}

pub(crate) fn page(value: i128, cursor: Option<String>) -> PyResult<PageRequest> {
    Ok(PageRequest {
        limit: limit("limit", value, cmz_core::store::MAX_PAGE_SIZE)?,
        cursor: cursor.map(Cursor::from_client),
    })
}

/// Runs a JSON-returning operation synchronously (GIL released) and converts its result.
pub(crate) fn sync_value<F>(py: Python<'_>, future: F) -> PyResult<Py<PyAny>>
where
    F: std::future::Future<Output = Result<Value>> + Send,
{
    let value = block_on(py, future)?;
    Ok(to_python(py, &value)?.unbind())
}
