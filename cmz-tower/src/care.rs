//! Cost and care over HTTP: feedback on replies
//! (`POST|GET /conversations/sessions/{sessionId}/messages/{messageId}/feedback`), the
//! review queue for staff (`GET /review/queue`, `GET /review/queue/{itemId}`,
//! `POST /review/queue/{itemId}/reviewed`) and the usage report (`GET /usage`, JSON or CSV).

use axum::Extension;
use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use chrono::NaiveDate;
use cmz_core::access::Principal;
use cmz_core::care::{ReviewItem, ReviewState, Vote};
use cmz_core::ids::{MessageId, SessionId};
use cmz_core::service::UsageGrouping;
use cmz_core::store::{Cursor, PageRequest};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::error::{ApiError, ApiJson, ApiQuery};
use crate::routes::id;
use crate::state::AppState;

type ApiResult<T> = Result<T, ApiError>;

/// The body of a vote.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FeedbackRequest {
    vote: String,
    note: Option<String>,
}

/// `POST /conversations/sessions/{sessionId}/messages/{messageId}/feedback`.
pub(crate) async fn give_feedback(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path((session, message)): Path<(String, String)>,
    ApiJson(body): ApiJson<FeedbackRequest>,
) -> ApiResult<Response> {
    let vote: Vote = body.vote.parse()?;
    let feedback = state
        .conversations()
        .give_feedback(
            &principal,
            &id(SessionId::new, session)?,
            &id(MessageId::new, message)?,
            vote,
            body.note,
        )
        .await?;
    Ok(Json(feedback).into_response())
}

/// `GET /conversations/sessions/{sessionId}/messages/{messageId}/feedback`: the caller's
/// own vote, `404` when they gave none.
pub(crate) async fn my_feedback(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path((session, message)): Path<(String, String)>,
) -> ApiResult<Response> {
    let message = id(MessageId::new, message)?;
    let found = state
        .conversations()
        .my_feedback(&principal, &id(SessionId::new, session)?, &message)
        .await?
        .ok_or_else(|| cmz_core::Error::not_found(format!("your feedback on message {message}")))?;
    Ok(Json(found).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct QueueQuery {
    state: Option<String>,
    limit: Option<i64>,
    cursor: Option<String>,
}

/// `GET /review/queue`: newest first, `state` open (default) or reviewed.
pub(crate) async fn review_queue(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    ApiQuery(q): ApiQuery<QueueQuery>,
) -> ApiResult<Json<Value>> {
    let review_state = match q.state.as_deref() {
        Some(value) => value.parse()?,
        None => ReviewState::Open,
    };
    let limit = q.limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return Err(ApiError::validation(
            "limit",
            "limit must be between 1 and 100",
        ));
    }
    let page = PageRequest {
        limit: limit as usize,
        cursor: q.cursor.filter(|c| !c.is_empty()).map(Cursor::from_client),
    };
    let listed = state
        .conversations()
        .review_queue(&principal, review_state, page)
        .await?;
    let mut body = json!({ "items": listed.items });
    if let Some(next) = listed.next {
        body["nextCursor"] = next.as_str().into();
    }
    Ok(Json(body))
}

#[derive(Debug, Deserialize)]
pub(crate) struct ItemQuery {
    around: Option<i64>,
}

/// `GET /review/queue/{itemId}`: the item and the conversation around it.
pub(crate) async fn review_item(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(item): Path<String>,
    ApiQuery(q): ApiQuery<ItemQuery>,
) -> ApiResult<Json<Value>> {
    let around = q.around.unwrap_or(3);
    if !(0..=20).contains(&around) {
        return Err(ApiError::validation(
            "around",
            "around must be between 0 and 20",
        ));
    }
    ReviewItem::check_id(&item)?;
    let opened = state
        .conversations()
        .review_item(&principal, &item, around as usize)
        .await?;
    let messages: Vec<Value> = opened
        .messages
        .iter()
        .map(|m| {
            json!({
                "messageId": m.id,
                "seq": m.seq,
                "role": m.role,
                "content": m.content,
                "timestamp": m.created_at,
                "metadata": m.metadata.to_caller(),
            })
        })
        .collect();
    Ok(Json(json!({ "item": opened.item, "messages": messages })))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReviewedRequest {
    note: Option<String>,
}

/// `POST /review/queue/{itemId}/reviewed`.
pub(crate) async fn mark_reviewed(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(item): Path<String>,
    ApiJson(body): ApiJson<ReviewedRequest>,
) -> ApiResult<Json<ReviewItem>> {
    ReviewItem::check_id(&item)?;
    let marked = state
        .conversations()
        .mark_reviewed(&principal, &item, body.note)
        .await?;
    Ok(Json(marked))
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct UsageQuery {
    from: Option<String>,
    to: Option<String>,
    group_by: Option<String>,
    format: Option<String>,
}

fn day(field: &str, value: Option<String>, default: NaiveDate) -> ApiResult<NaiveDate> {
    match value {
        None => Ok(default),
        Some(v) => NaiveDate::parse_from_str(&v, "%Y-%m-%d").map_err(|_| {
            ApiError::validation(field, format!("{field} must be a date (YYYY-MM-DD)"))
        }),
    }
}

/// `GET /usage`: tokens, turns and fallbacks of the days `from..=to` (UTC; default today),
/// grouped by `groupBy`; CSV with `format=csv` or `Accept: text/csv`.
pub(crate) async fn usage(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<UsageQuery>,
) -> ApiResult<Response> {
    let today = chrono::Utc::now().date_naive();
    let to = day("to", q.to, today)?;
    let from = day("from", q.from, to)?;
    let grouping: UsageGrouping = q.group_by.as_deref().unwrap_or("day").parse()?;
    let csv = match q.format.as_deref().map(str::trim) {
        Some("csv") => true,
        Some("json") => false,
        Some(_) => return Err(ApiError::validation("format", "format must be json or csv")),
        None => headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|accept| accept.contains("text/csv")),
    };
    let report = state
        .conversations()
        .usage_report(&principal, from, to, grouping)
        .await?;
    if csv {
        let name = format!("attachment; filename=\"cmz-usage-{from}-{to}.csv\"");
        let mut response = report.to_csv().into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/csv; charset=utf-8"),
        );
        if let Ok(value) = HeaderValue::from_str(&name) {
            headers.insert(header::CONTENT_DISPOSITION, value);
        }
        return Ok(response);
    }
    Ok(Json(report).into_response())
}

/// `GET /me/limits`: where the caller stands against the turn limit and the daily token
/// budgets (read without counting), so a page can say why a turn was refused.
pub(crate) async fn my_limits(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
) -> ApiResult<Json<Value>> {
    let conversations = state.conversations();
    let turn_limit = conversations.turn_limit_status(&principal).await?;
    let budgets = conversations.budget_status(&principal).await?;
    let limited =
        turn_limit.is_some_and(|l| l.exceeded()) || budgets.iter().any(|b| b.used >= b.budget);
    Ok(Json(json!({
        "limited": limited,
        "turnLimit": turn_limit.map(|l| json!({
            "limit": l.limit,
            "used": l.used.min(l.limit),
            "window": l.window.as_secs(),
            "resetTime": l.resets_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        })),
        "tokenBudgets": budgets,
    })))
}
