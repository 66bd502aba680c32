//! Session listings and details: cmz's fields plus the ones the legacy history pages read
//! (`timestamp`, `createdAt`, `lastMessage`, `userName`, a legacy `status`; `messages` and
//! `sessionInfo` on a detail), and a parent's family listing for `GET /convo_history`.

use axum::Extension;
use axum::Json;
use axum::extract::{Path, State};
use chrono::{DateTime, Utc};
use cmz_core::access::Principal;
use cmz_core::ids::{AnimalId, SessionId, UserId};
use cmz_core::store::{Cursor, PageRequest, SessionScope};
use cmz_core::types::{Message, Session, SessionStatus};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::error::{ApiError, ApiQuery};
use crate::routes::{history_json, id, parse_date};
use crate::state::AppState;

type ApiResult<T> = Result<T, ApiError>;

/// The longest `lastMessage` in a listing, in characters (longer ones end with `…`).
const LAST_MESSAGE_CHARS: usize = 200;

/// The legacy session status: `active`, `completed` or `archived` (the history page knows
/// no other value).
fn legacy_status(status: SessionStatus) -> &'static str {
    match status {
        SessionStatus::Active => "active",
        SessionStatus::Ended => "completed",
        _ => "archived",
    }
}

fn cut(text: &str) -> String {
    match text.char_indices().nth(LAST_MESSAGE_CHARS) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_owned(),
    }
}

fn session_json(session: &Session, user_name: Option<&str>, last: Option<&Message>) -> Value {
    let mut body = json!({
        "sessionId": session.id,
        "userId": session.user_id,
        "animalId": session.animal_id,
        "animalName": session.animal_name,
        "startTime": session.started_at,
        "lastMessageTime": session.last_activity,
        "messageCount": session.message_count,
        "duration": (session.last_activity - session.started_at).num_seconds().max(0),
        "status": legacy_status(session.status),
        "summary": session.summary,
        "timestamp": session.last_activity,
        "createdAt": session.started_at,
    });
    if let Some(name) = user_name {
        body["userName"] = name.into();
    }
    if let Some(last) = last {
        body["lastMessage"] = cut(&last.content).into();
    }
    body
}

/// The listing entries of `sessions`, which the caller was authorized to list: each with
/// its owner's display name (when the user store knows one) and its last message.
async fn entries(
    state: &AppState,
    principal: &Principal,
    sessions: &[Session],
) -> ApiResult<Vec<Value>> {
    let mut owners: Vec<UserId> = sessions.iter().map(|s| s.user_id.clone()).collect();
    owners.sort();
    owners.dedup();
    let names = state.inner.services.auth().display_names(&owners).await?;
    let lasts = state
        .inner
        .services
        .conversations()
        .last_messages(principal, sessions)
        .await?;
    Ok(sessions
        .iter()
        .zip(&lasts)
        .map(|(session, last)| {
            session_json(
                session,
                names.get(&session.user_id).map(String::as_str),
                last.as_ref(),
            )
        })
        .collect())
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SessionsQuery {
    user_id: Option<String>,
    animal_id: Option<String>,
    start_date: Option<String>,
    end_date: Option<String>,
    limit: Option<i64>,
    last_evaluated_key: Option<String>,
    sort_by: Option<String>,
    sort_order: Option<String>,
}

fn optional_animal(value: Option<String>) -> ApiResult<Option<AnimalId>> {
    value
        .filter(|a| !a.is_empty())
        .map(|a| id(AnimalId::new, a))
        .transpose()
}

fn in_range(session: &Session, start: Option<DateTime<Utc>>, end: Option<DateTime<Utc>>) -> bool {
    start.is_none_or(|d| session.last_activity >= d) && end.is_none_or(|d| session.started_at <= d)
}

/// `GET /conversations/sessions`.
pub(crate) async fn list_sessions(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    ApiQuery(q): ApiQuery<SessionsQuery>,
) -> ApiResult<Json<Value>> {
    let limit = q.limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return Err(ApiError::validation(
            "limit",
            "limit must be between 1 and 100",
        ));
    }
    let sort_by = q.sort_by.as_deref().unwrap_or("timestamp");
    if !matches!(sort_by, "timestamp" | "messageCount" | "duration") {
        return Err(ApiError::validation(
            "sortBy",
            "sortBy must be timestamp, messageCount or duration",
        ));
    }
    let descending = match q.sort_order.as_deref().unwrap_or("desc") {
        "desc" => true,
        "asc" => false,
        _ => {
            return Err(ApiError::validation(
                "sortOrder",
                "sortOrder must be asc or desc",
            ));
        }
    };
    let (start, end) = (
        parse_date("startDate", q.start_date)?,
        parse_date("endDate", q.end_date)?,
    );
    let animal = optional_animal(q.animal_id)?;
    let user = q
        .user_id
        .filter(|u| !u.is_empty())
        .map(|u| id(UserId::new, u))
        .transpose()?;
    let scope = match (&user, &animal) {
        (Some(user), _) => SessionScope::User(user.clone()),
        (None, Some(animal)) if principal.role.sees_everything() => {
            SessionScope::Animal(animal.clone())
        }
        (None, _) => SessionScope::User(principal.user_id.clone()),
    };
    let cursor = q
        .last_evaluated_key
        .filter(|k| !k.is_empty())
        .map(Cursor::from_client);
    let page = state
        .inner
        .services
        .conversations()
        .list_sessions(
            &principal,
            scope,
            PageRequest {
                limit: limit as usize,
                cursor,
            },
        )
        .await?;
    let mut sessions: Vec<Session> = page
        .items
        .into_iter()
        .filter(|s| animal.as_ref().is_none_or(|a| &s.animal_id == a))
        .filter(|s| in_range(s, start, end))
        .collect();
    // The store pages by activity, newest first; other orders apply within the page.
    match sort_by {
        "messageCount" => sessions.sort_by_key(|s| s.message_count),
        "duration" => sessions.sort_by_key(|s| s.last_activity - s.started_at),
        _ => sessions.sort_by_key(|s| s.last_activity),
    }
    if descending {
        sessions.reverse();
    }
    let listed = entries(&state, &principal, &sessions).await?;
    let mut body = json!({ "sessions": listed, "totalCount": sessions.len() });
    if let Some(next) = page.next {
        body["lastEvaluatedKey"] = next.as_str().into();
    }
    Ok(Json(body))
}

/// The JSON of one message as the legacy conversation viewer reads it.
fn viewer_message(message: &Message) -> Value {
    let usage = &message.metadata;
    let tokens = match (usage.tokens_prompt, usage.tokens_completion) {
        (None, None) => None,
        (prompt, completion) => {
            Some(u64::from(prompt.unwrap_or(0)) + u64::from(completion.unwrap_or(0)))
        }
    };
    json!({
        "messageId": message.id,
        "role": message.role,
        "content": message.content,
        "timestamp": message.created_at,
        "tokensUsed": tokens,
    })
}

/// `GET /conversations/sessions/{sessionId}`.
pub(crate) async fn session_detail(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(session_id): Path<String>,
) -> ApiResult<Json<Value>> {
    let conversations = &state.inner.services.conversations();
    let session = conversations
        .session(&principal, &id(SessionId::new, session_id)?)
        .await?;
    let page = conversations
        .history(&principal, &session.id, PageRequest::first(500))
        .await?;
    let mut body = history_json(&session, &page.items, true);
    body["messages"] = page.items.iter().map(viewer_message).collect();
    body["sessionInfo"] = json!({
        "sessionId": session.id,
        "userId": session.user_id,
        "animalId": session.animal_id,
        "animalName": session.animal_name,
        "createdAt": session.started_at,
        "updatedAt": session.last_activity,
        "messageCount": session.message_count,
        "status": legacy_status(session.status),
    });
    body["rollingSummary"] = session.rolling_summary.as_ref().map_or(Value::Null, |r| {
        json!({
            "text": r.text,
            "coversThrough": r.through,
            "tokens": r.tokens,
            "updatedAt": r.updated_at,
            "folds": r.folds,
            "tokensSpent": r.tokens_spent,
            "fallback": r.fallback,
        })
    });
    if let Some(next) = page.next {
        body["nextCursor"] = next.as_str().into();
    }
    Ok(Json(body))
}

/// The filters of a family listing (`GET /convo_history?parentUserId=`).
pub(crate) struct FamilyQuery {
    pub(crate) parent: String,
    pub(crate) animal: Option<String>,
    pub(crate) start: Option<DateTime<Utc>>,
    pub(crate) end: Option<DateTime<Utc>>,
    pub(crate) limit: usize,
}

/// The sessions of a parent's students, newest activity first, at most `limit`: a parent
/// asks for their own family only (`403` for anyone else's); admin-like roles for any.
pub(crate) async fn family_sessions(
    state: &AppState,
    principal: &Principal,
    query: FamilyQuery,
) -> ApiResult<Json<Value>> {
    let parent = id(UserId::new, query.parent)?;
    let animal = optional_animal(query.animal)?;
    let students = state
        .inner
        .services
        .auth()
        .students_of(principal, &parent)
        .await?;
    let mut sessions = Vec::new();
    for student in students {
        // Each student's listing passes the access policy again.
        let mut found = 0;
        let mut cursor = None;
        loop {
            let page = state
                .inner
                .services
                .conversations()
                .list_sessions(
                    principal,
                    SessionScope::User(student.clone()),
                    PageRequest {
                        limit: query.limit.min(100),
                        cursor: cursor.take(),
                    },
                )
                .await?;
            for session in page.items {
                if animal.as_ref().is_none_or(|a| &session.animal_id == a)
                    && in_range(&session, query.start, query.end)
                {
                    found += 1;
                    sessions.push(session);
                }
            }
            match page.next {
                Some(next) if found < query.limit => cursor = Some(next),
                _ => break,
            }
        }
    }
    sessions.sort_by_key(|s| std::cmp::Reverse(s.last_activity));
    sessions.truncate(query.limit);
    let listed = entries(state, principal, &sessions).await?;
    Ok(Json(json!({
        "parentUserId": parent,
        "sessions": listed,
        "totalCount": sessions.len(),
    })))
}
