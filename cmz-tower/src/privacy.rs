//! What parents ask for: `GET /conversations/export` (a family's or one user's
//! conversations, streamed as JSON or as a printable HTML page, by content negotiation) and
//! `DELETE /users/{userId}/data` (everything cmz holds about a user, erased) and
//! `PUT /families/{familyId}/retention` (how long a family's conversations are kept).

use axum::Extension;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use cmz_core::access::Principal;
use cmz_core::ids::UserId;
use cmz_core::service::{ExportFormat, ExportItem, ExportRange, ExportWriter};
use futures::StreamExt as _;
use serde::Deserialize;

use crate::error::{ApiError, ApiJson, ApiQuery};
use crate::routes::{id, parse_date};
use crate::state::AppState;

/// The page's own policy: its inline styles, nothing else.
const PAGE_POLICY: &str = "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'";

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ExportQuery {
    parent_user_id: Option<String>,
    user_id: Option<String>,
    start_date: Option<String>,
    end_date: Option<String>,
    format: Option<String>,
}

/// JSON unless the request asks for HTML (`format=html`, or an `Accept` that prefers
/// `text/html`, as a browser's does).
fn negotiate(format: Option<&str>, headers: &HeaderMap) -> Result<ExportFormat, ApiError> {
    match format.map(str::trim).filter(|f| !f.is_empty()) {
        Some("json") => return Ok(ExportFormat::Json),
        Some("html") => return Ok(ExportFormat::Html),
        Some(_) => {
            return Err(ApiError::validation(
                "format",
                "format must be json or html",
            ));
        }
        None => {}
    }
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let html = accept.find("text/html");
    let json = accept.find("application/json");
    Ok(match (html, json) {
        (Some(h), Some(j)) if h < j => ExportFormat::Html,
        (Some(_), None) => ExportFormat::Html,
        _ => ExportFormat::Json,
    })
}

/// `GET /conversations/export`.
pub(crate) async fn export(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<ExportQuery>,
) -> Result<Response, ApiError> {
    let format = negotiate(q.format.as_deref(), &headers)?;
    let range = ExportRange {
        from: parse_date("startDate", q.start_date)?,
        to: parse_date("endDate", q.end_date)?,
    };
    let parent = q
        .parent_user_id
        .filter(|p| !p.is_empty())
        .map(|p| id(UserId::new, p))
        .transpose()?;
    let user = q
        .user_id
        .filter(|u| !u.is_empty())
        .map(|u| id(UserId::new, u))
        .transpose()?;
    let items = state
        .inner
        .services
        .export(&principal, parent, user, range)
        .await?;
    let mut writer = ExportWriter::new(format, range);
    let begin = writer.begin();
    let body = futures::stream::once(async move { Ok::<_, std::io::Error>(Bytes::from(begin)) })
        .chain(
            items
                .map(Some)
                .chain(futures::stream::once(async { None }))
                .map(move |item: Option<cmz_core::Result<ExportItem>>| {
                    let text = match item {
                        Some(Ok(item)) => writer.item(&item),
                        Some(Err(error)) => {
                            // Headers are sent: the body ends early and incomplete, which
                            // a reader of the JSON notices; the log says why.
                            tracing::warn!(code = error.code().as_str(), "export ended early");
                            return Err(std::io::Error::other("the export ended early"));
                        }
                        None => writer.end(),
                    };
                    Ok(Bytes::from(text))
                }),
        );
    let mut response = Body::from_stream(body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(format.content_type()),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if format == ExportFormat::Html {
        headers.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(PAGE_POLICY),
        );
    } else {
        headers.insert(
            header::CONTENT_DISPOSITION,
            HeaderValue::from_static("attachment; filename=\"conversations.json\""),
        );
    }
    Ok(response)
}

#[derive(Debug, Deserialize)]
pub(crate) struct EraseQuery {
    reason: Option<String>,
}

/// `DELETE /users/{userId}/data`: the user's conversations, tokens, family places, account
/// and counters, for the user, their parent or an administrator.
pub(crate) async fn erase_user(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(user): Path<String>,
    ApiQuery(q): ApiQuery<EraseQuery>,
) -> Result<axum::Json<cmz_env::Erasure>, ApiError> {
    let user = id(UserId::new, user)?;
    let reason = q.reason.filter(|r| !r.trim().is_empty());
    if reason.as_ref().is_some_and(|r| r.chars().count() > 200) {
        return Err(ApiError::validation(
            "reason",
            "reason is at most 200 characters",
        ));
    }
    let erased = state
        .inner
        .services
        .erase_user(&principal, &user, reason.as_deref())
        .await?;
    Ok(axum::Json(erased))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RetentionBody {
    /// Days (0: until each conversation ends); null: as the deployment keeps them. Required
    /// (a `Value`, so that a missing field is an error and `null` is not).
    days: serde_json::Value,
}

/// `PUT /families/{familyId}/retention`: a parent of the family (or an administrator)
/// chooses how long its conversations are kept.
pub(crate) async fn set_retention(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(family): Path<String>,
    ApiJson(body): ApiJson<RetentionBody>,
) -> Result<axum::Json<cmz_core::auth::Family>, ApiError> {
    let family = id(cmz_core::ids::FamilyId::new, family)?;
    let days = match body.days {
        serde_json::Value::Null => None,
        value => Some(
            value
                .as_u64()
                .and_then(|d| u32::try_from(d).ok())
                .ok_or_else(|| {
                    ApiError::validation("days", "days must be a whole number from 0, or null")
                })?,
        ),
    };
    let updated = state
        .inner
        .services
        .auth()
        .set_family_retention(&principal, &family, days)
        .await?;
    Ok(axum::Json(updated))
}
