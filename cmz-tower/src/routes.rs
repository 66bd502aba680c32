//! The handlers of the legacy HTTP contract.

use std::net::SocketAddr;

use crate::wire::Rfc3339;
use axum::extract::{ConnectInfo, FromRequestParts, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use chrono::{DateTime, Utc};
use cmz_core::access::Principal;
use cmz_core::auth::{Family, PublicUser};
use cmz_core::ids::{AnimalId, MessageId, SessionId, UserId};
use cmz_core::service::{TurnReply, TurnRequest};
use cmz_core::store::{DeleteScope, PageRequest, SessionScope};
use cmz_core::types::{Message, Session};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::animals::resolve_animal;
use crate::auth_layer::AccessToken;
use crate::error::{ApiError, ApiJson, ApiQuery};
use crate::state::AppState;

type ApiResult<T> = Result<T, ApiError>;

/// The client key for login throttling: the client's address when the server knows it
/// (the peer, or behind trusted proxies the address they forwarded for).
pub(crate) struct ClientKey(Option<String>);

impl FromRequestParts<AppState> for ClientKey {
    type Rejection = std::convert::Infallible;
    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        Ok(Self(parts.extensions.get::<ConnectInfo<SocketAddr>>().map(
            |c| {
                state
                    .settings()
                    .trusted_proxies
                    .client_address(c.0.ip(), &parts.headers)
                    .to_string()
            },
        )))
    }
}

pub(crate) fn id<T>(
    parse: impl FnOnce(String) -> cmz_core::Result<T>,
    value: String,
) -> ApiResult<T> {
    parse(value).map_err(ApiError::from)
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct AuthRequest {
    username: Option<String>,
    email: Option<String>,
    password: String,
    #[serde(default)]
    register: bool,
    display_name: Option<String>,
}

pub(crate) async fn login(
    State(state): State<AppState>,
    ClientKey(client): ClientKey,
    ApiJson(body): ApiJson<AuthRequest>,
) -> ApiResult<Response> {
    let auth = &state.inner.services.auth();
    let email = body
        .email
        .or(body.username)
        .ok_or_else(|| ApiError::validation("username", "username (or email) is required"))?;
    let response = if body.register {
        // Each registration hashes a password: bounded per client address.
        auth.limit_client(
            "register",
            client.as_deref(),
            20,
            std::time::Duration::from_secs(3600),
            "too many registrations from this address; try again later",
        )
        .await?;
        auth.register(
            &email,
            &body.password,
            body.display_name.as_deref().unwrap_or(""),
        )
        .await?
    } else {
        auth.login(&email, &body.password, client.as_deref())
            .await?
    };
    let mut body = to_json(&response)?;
    body["user"]["name"] = display_name(&response.user).into();
    Ok(Json(body).into_response())
}

fn to_json(value: &impl Serialize) -> ApiResult<Value> {
    serde_json::to_value(value).map_err(|e| {
        ApiError::from(cmz_core::Error::internal("a response did not serialize").with_source(e))
    })
}

/// The user's name as the legacy pages read it (`user.name`): the display name, or the
/// part of the email before `@` when there is none.
fn display_name(user: &PublicUser) -> &str {
    if user.display_name.is_empty() {
        user.email.split('@').next().unwrap_or_default()
    } else {
        &user.display_name
    }
}

/// A user with the legacy `name` beside cmz's fields.
fn user_json(user: &PublicUser) -> ApiResult<Value> {
    let mut body = to_json(user)?;
    body["name"] = display_name(user).into();
    Ok(body)
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct RefreshRequest {
    refresh_token: String,
}

/// The window of the refresh throttle (`HttpSettings::refresh_limit`).
pub(crate) const REFRESH_WINDOW: std::time::Duration = std::time::Duration::from_secs(15 * 60);

pub(crate) async fn refresh(
    State(state): State<AppState>,
    ClientKey(client): ClientKey,
    body: Result<ApiJson<RefreshRequest>, ApiError>,
) -> ApiResult<Response> {
    // Counted per client address before anything else, malformed attempts included.
    state
        .auth()
        .limit_client(
            "refresh",
            client.as_deref(),
            state.settings().refresh_limit,
            REFRESH_WINDOW,
            "too many token refreshes from this address; try again later",
        )
        .await?;
    let ApiJson(body) = body?;
    Ok(Json(
        state
            .inner
            .services
            .auth()
            .refresh(&body.refresh_token)
            .await?,
    )
    .into_response())
}

pub(crate) async fn logout(
    State(state): State<AppState>,
    Extension(token): Extension<AccessToken>,
) -> ApiResult<StatusCode> {
    state.inner.services.auth().logout(&token.0).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(crate) async fn me(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
) -> ApiResult<Json<Value>> {
    let user = state.inner.services.auth().me(&principal).await?;
    Ok(Json(user_json(&PublicUser::from(&user))?))
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ConvoTurnRequest {
    pub(crate) animal_id: String,
    pub(crate) message: String,
    pub(crate) session_id: Option<String>,
    pub(crate) context_summary: Option<String>,
    #[allow(dead_code)]
    pub(crate) metadata: Option<Value>,
    pub(crate) priority: Option<String>,
    pub(crate) max_tokens: Option<i64>,
    pub(crate) temperature: Option<f64>,
    pub(crate) context_window: Option<i64>,
    pub(crate) moderation_level: Option<String>,
    pub(crate) turn_key: Option<String>,
}

impl ConvoTurnRequest {
    /// Checks the legacy bounds and builds the engine's request.
    pub(crate) fn into_turn(self) -> ApiResult<TurnRequest> {
        // Defaults and bounds are the engine's (`ConversationConfig`), the same for every
        // front end; out-of-range numbers only need to survive the conversion.
        let mut turn = TurnRequest::new(id(AnimalId::new, self.animal_id)?, self.message);
        if let Some(priority) = &self.priority {
            turn = turn.with_priority(priority.parse()?);
        }
        if let Some(level) = &self.moderation_level {
            turn = turn.with_moderation_level(level.parse()?);
        }
        turn.context_summary = self.context_summary;
        turn.context_window = self.context_window.map(|w| usize::try_from(w).unwrap_or(0));
        turn.max_tokens = self.max_tokens.map(|t| u32::try_from(t).unwrap_or(0));
        turn.temperature = self.temperature.map(|t| t as f32);
        if let Some(session) = self.session_id.filter(|s| !s.is_empty()) {
            turn = turn.in_session(id(SessionId::new, session)?);
        }
        if let Some(key) = self.turn_key.filter(|k| !k.is_empty()) {
            turn = turn.with_turn_key(key);
        }
        Ok(turn)
    }
}

/// The error of a model call (turn, streamed turn, summary). A call the service's turn
/// limit refused keeps the legacy 429 body: details `limit`, `window` and `resetTime`.
pub(crate) async fn model_call_error(
    state: &AppState,
    principal: &Principal,
    error: cmz_core::Error,
) -> ApiError {
    let cmz_core::Error::RateLimited { retry_after, .. } = &error else {
        return error.into();
    };
    let retry_after = retry_after.map(|wait| wait.as_secs().max(1));
    // A token budget: which, how large, how much is used and when it resets.
    if let Some(exceeded) = error.budget_exceeded() {
        let status = exceeded.0;
        return ApiError {
            retry_after,
            ..ApiError::new("rate_limit_exceeded", error.to_string()).with_details(json!({
                "budget": status.scope.as_str(),
                "limit": status.budget,
                "used": status.used,
                "resetTime": status.resets_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            }))
        };
    }
    // A refused call is counted too, so the counter is past the limit only when the turn
    // limit refused it (not when the model provider answered 429).
    let status = match state.conversations().turn_limit_status(principal).await {
        Ok(Some(status)) if status.used > status.limit => status,
        _ => return error.into(),
    };
    ApiError {
        retry_after,
        ..ApiError::new("rate_limit_exceeded", error.to_string()).with_details(json!({
            "limit": status.limit,
            "window": status.window.as_secs(),
            "resetTime": status.resets_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        }))
    }
}

pub(crate) async fn convo_turn(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    ApiJson(mut body): ApiJson<ConvoTurnRequest>,
) -> ApiResult<Response> {
    body.animal_id = resolve_animal(&state, body.animal_id).await?;
    let turn = body.into_turn()?;
    let animal = turn.animal_id.clone();
    let started = std::time::Instant::now();
    let reply = match state.conversations().turn(&principal, turn).await {
        Ok(reply) => reply,
        Err(error) => return Err(model_call_error(&state, &principal, error).await),
    };
    crate::metrics::turn(&reply, started.elapsed());
    Ok(crate::wire::json_response(
        &TurnResponse::of(&reply, &animal),
        TURN_RESPONSE_CAPACITY,
    ))
}

/// Room for a typical `POST /convo_turn` body (about 700 bytes), so it is written once.
const TURN_RESPONSE_CAPACITY: usize = 1024;

/// The body of `POST /convo_turn` (typed: it is built on every turn).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct TurnResponse<'a> {
    reply: &'a str,
    session_id: &'a SessionId,
    /// The legacy page's names: the reply's message id, its time and the animal (a
    /// `default` request names the animal it was mapped to).
    turn_id: &'a MessageId,
    timestamp: Rfc3339<'a>,
    animal_id: &'a AnimalId,
    turn_number: u64,
    fallback: bool,
    interrupted: bool,
    replayed: bool,
    turn: TurnMeta<'a>,
    moderation: Moderation<'a>,
    /// The legacy block (remaining calls in the turn limit's window, when it resets, the
    /// calls made today) and the token budgets; absent for a replayed turn.
    #[serde(skip_serializing_if = "Option::is_none")]
    rate_limit: Option<RateLimitBlock<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RateLimitBlock<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    remaining: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reset_time: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    daily_usage: Option<u64>,
    token_budgets: &'a [cmz_core::service::BudgetStatus],
}

impl<'a> RateLimitBlock<'a> {
    fn of(quota: &'a cmz_core::service::Quota) -> Self {
        let limit = quota.turn_limit.as_ref();
        Self {
            remaining: limit.map(|l| l.limit.saturating_sub(l.used)),
            reset_time: limit.map(|l| {
                l.resets_at
                    .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            }),
            daily_usage: quota.calls_today,
            token_budgets: &quota.budgets,
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct TurnMeta<'a> {
    convo_turn_id: &'a MessageId,
    timestamp: Rfc3339<'a>,
    tokens_prompt: Option<u32>,
    tokens_completion: Option<u32>,
    latency_ms: Option<u64>,
}

#[derive(Serialize)]
struct Moderation<'a> {
    flagged: bool,
    categories: &'a [String],
}

impl<'a> TurnResponse<'a> {
    fn of(reply: &'a TurnReply, animal_id: &'a AnimalId) -> Self {
        let message = &reply.assistant_message;
        Self {
            reply: &reply.reply,
            session_id: &reply.session_id,
            turn_id: &message.id,
            timestamp: Rfc3339(&message.created_at),
            animal_id,
            turn_number: reply.turn,
            fallback: reply.fallback,
            interrupted: reply.interrupted,
            replayed: reply.replayed,
            turn: TurnMeta {
                convo_turn_id: &message.id,
                timestamp: Rfc3339(&message.created_at),
                tokens_prompt: message.metadata.tokens_prompt,
                tokens_completion: message.metadata.tokens_completion,
                latency_ms: message.metadata.latency_ms,
            },
            moderation: Moderation {
                flagged: reply.moderation.flagged,
                categories: &reply.moderation.categories,
            },
            rate_limit: reply.quota.as_ref().map(RateLimitBlock::of),
        }
    }
}

fn turn_json(message: &Message, include_metadata: bool) -> Value {
    let mut turn = json!({ "role": message.role, "content": message.content, "timestamp": message.created_at, "messageId": message.id });
    if include_metadata {
        turn["metadata"] = serde_json::to_value(&message.metadata).unwrap_or(Value::Null);
    }
    turn
}

pub(crate) fn history_json(
    session: &Session,
    messages: &[Message],
    include_metadata: bool,
) -> Value {
    json!({
        "sessionId": session.id,
        "animalId": session.animal_id,
        "animalName": session.animal_name,
        "userId": session.user_id,
        "totalTurns": session.message_count,
        "summary": session.summary,
        "turns": messages.iter().map(|m| turn_json(m, include_metadata)).collect::<Vec<_>>(),
    })
}

pub(crate) fn parse_date(field: &str, value: Option<String>) -> ApiResult<Option<DateTime<Utc>>> {
    value
        .filter(|v| !v.is_empty())
        .map(|v| {
            DateTime::parse_from_rfc3339(&v)
                .map(|d| d.with_timezone(&Utc))
                .map_err(|_| {
                    ApiError::validation(field, format!("{field} must be an RFC 3339 date-time"))
                })
        })
        .transpose()
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct HistoryQuery {
    animal_id: Option<String>,
    user_id: Option<String>,
    session_id: Option<String>,
    start_date: Option<String>,
    end_date: Option<String>,
    limit: Option<i64>,
    offset: Option<i64>,
    include_metadata: Option<bool>,
    parent_user_id: Option<String>,
}

/// The most offset honoured (offsets page through the store from the start).
const MAX_OFFSET: i64 = 100_000;

pub(crate) async fn convo_history(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    ApiQuery(q): ApiQuery<HistoryQuery>,
) -> ApiResult<Json<Value>> {
    let conversations = &state.inner.services.conversations();
    let limit = q.limit.unwrap_or(100);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::validation(
            "limit",
            "limit must be between 1 and 500",
        ));
    }
    let offset = q.offset.unwrap_or(0);
    if !(0..=MAX_OFFSET).contains(&offset) {
        return Err(ApiError::validation(
            "offset",
            format!("offset must be between 0 and {MAX_OFFSET}"),
        ));
    }
    let (start, end) = (
        parse_date("startDate", q.start_date)?,
        parse_date("endDate", q.end_date)?,
    );
    // Ids are checked whichever listing answers: a malformed one is a 400 even where the
    // family listing does not use it.
    let session_id = q
        .session_id
        .filter(|s| !s.is_empty())
        .map(|s| id(SessionId::new, s))
        .transpose()?;
    let owner = q
        .user_id
        .filter(|u| !u.is_empty())
        .map(|u| id(UserId::new, u))
        .transpose()?;
    if let Some(parent) = q.parent_user_id.filter(|p| !p.is_empty()) {
        let query = crate::sessions::FamilyQuery {
            parent,
            animal: q.animal_id,
            start,
            end,
            limit: limit as usize,
        };
        return crate::sessions::family_sessions(&state, &principal, query).await;
    }
    let animal = q
        .animal_id
        .filter(|a| !a.is_empty())
        .map(|a| id(AnimalId::new, a))
        .transpose()?;
    // One session: the one asked for, or else the user's most recent (with that animal).
    let session = match session_id {
        Some(session) => conversations.session(&principal, &session).await?,
        None => {
            let owner = owner.unwrap_or_else(|| principal.user_id.clone());
            let mut cursor = None;
            let found = loop {
                let page = conversations
                    .list_sessions(
                        &principal,
                        SessionScope::User(owner.clone()),
                        PageRequest {
                            limit: 100,
                            cursor: cursor.take(),
                        },
                    )
                    .await?;
                if let Some(found) = page
                    .items
                    .into_iter()
                    .find(|s| animal.as_ref().is_none_or(|a| &s.animal_id == a))
                {
                    break Some(found);
                }
                match page.next {
                    Some(next) => cursor = Some(next),
                    None => break None,
                }
            };
            found.ok_or_else(|| ApiError::new("not_found", "no conversation found"))?
        }
    };
    let mut skipped = 0i64;
    let mut turns = Vec::new();
    let mut cursor = None;
    loop {
        let page = conversations
            .history(
                &principal,
                &session.id,
                PageRequest {
                    limit: 500,
                    cursor: cursor.take(),
                },
            )
            .await?;
        for message in page.items {
            if start.is_some_and(|s| message.created_at < s)
                || end.is_some_and(|e| message.created_at > e)
            {
                continue;
            }
            if skipped < offset {
                skipped += 1;
                continue;
            }
            if turns.len() < limit as usize {
                turns.push(message);
            }
        }
        match page.next {
            Some(next) if turns.len() < limit as usize => cursor = Some(next),
            _ => break,
        }
    }
    Ok(Json(history_json(
        &session,
        &turns,
        q.include_metadata.unwrap_or(false),
    )))
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct DeleteQuery {
    session_id: Option<String>,
    user_id: Option<String>,
    animal_id: Option<String>,
    older_than: Option<String>,
    confirm_gdpr: Option<bool>,
    #[serde(rename = "confirmGDPR")]
    confirm_gdpr_legacy: Option<bool>,
    audit_reason: Option<String>,
}

pub(crate) async fn delete_history(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    ApiQuery(q): ApiQuery<DeleteQuery>,
) -> ApiResult<Response> {
    if let Some(reason) = &q.audit_reason {
        if reason.chars().count() > 500 {
            return Err(ApiError::validation(
                "auditReason",
                "auditReason is at most 500 characters",
            ));
        }
    }
    let nonempty = |v: Option<String>| v.filter(|s| !s.is_empty());
    let scope = match (
        nonempty(q.session_id),
        nonempty(q.user_id),
        nonempty(q.animal_id),
        parse_date("olderThan", q.older_than)?,
    ) {
        (Some(session), None, None, None) => DeleteScope::Session(id(SessionId::new, session)?),
        (None, Some(user), None, None) => DeleteScope::User(id(UserId::new, user)?),
        (None, None, Some(animal), None) => DeleteScope::Animal(id(AnimalId::new, animal)?),
        (None, None, None, Some(date)) => DeleteScope::OlderThan(date),
        (None, None, None, None) => {
            return Err(ApiError::validation(
                "sessionId",
                "give one of sessionId, userId, animalId or olderThan",
            ));
        }
        _ => {
            return Err(ApiError::validation(
                "sessionId",
                "give only one of sessionId, userId, animalId or olderThan",
            ));
        }
    };
    let bulk = !matches!(scope, DeleteScope::Session(_));
    if bulk && !(q.confirm_gdpr.unwrap_or(false) || q.confirm_gdpr_legacy.unwrap_or(false)) {
        return Err(ApiError::new(
            "gdpr_confirmation_required",
            "GDPR confirmation required for bulk user data deletion",
        )
        .with_details(json!({ "required_parameter": "confirmGDPR" })));
    }
    state
        .inner
        .services
        .conversations()
        .delete_with_reason(&principal, scope, q.audit_reason.as_deref())
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SummarizeRequest {
    session_id: String,
    summary_type: Option<String>,
}

pub(crate) async fn summarize(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    ApiJson(body): ApiJson<SummarizeRequest>,
) -> ApiResult<Json<Value>> {
    let summary_type = body.summary_type.unwrap_or_else(|| "brief".into());
    if !matches!(
        summary_type.as_str(),
        "brief"
            | "detailed"
            | "educational"
            | "parent_report"
            | "full"
            | "behavioral"
            | "personalization"
    ) {
        return Err(ApiError::validation("summaryType", "unknown summaryType"));
    }
    let session_id = id(SessionId::new, body.session_id)?;
    // A summary is a model call: the service counts it against the turn limit.
    let summary = match state
        .conversations()
        .summarize(&principal, &session_id)
        .await
    {
        Ok(summary) => summary,
        Err(error) => return Err(model_call_error(&state, &principal, error).await),
    };
    Ok(Json(json!({
        "sessionId": session_id,
        "summaryType": summary_type,
        "summary": summary.text,
        "fallback": summary.fallback,
        "generatedAt": Utc::now(),
    })))
}

pub(crate) async fn family_list(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
) -> ApiResult<Json<Vec<Family>>> {
    Ok(Json(
        state
            .inner
            .services
            .auth()
            .visible_families(&principal)
            .await?,
    ))
}
