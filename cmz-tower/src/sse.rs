//! `GET|POST /convo_turn/stream`: a turn as Server-Sent Events with the legacy event names.

use std::convert::Infallible;

use axum::Extension;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use cmz_core::access::Principal;
use cmz_core::ids::AnimalId;
use cmz_core::service::{ResumableStream, StreamItem, TurnEvent, TurnRequest};
use futures::{Stream, StreamExt as _};
use serde::Deserialize;
use serde_json::json;

use crate::animals::resolve_animal;
use crate::error::{ApiError, ApiJson, ApiQuery};
use crate::routes::{ConvoTurnRequest, model_call_error};
use crate::state::AppState;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct StreamQuery {
    message: String,
    animal_id: String,
    session_id: Option<String>,
    turn_key: Option<String>,
    context_window: Option<i64>,
    /// Read by the auth layer; accepted here so it is not an unknown parameter.
    #[allow(dead_code)]
    token: Option<String>,
}

pub(crate) async fn stream_get(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<StreamQuery>,
) -> Result<Response, ApiError> {
    if let Some(resumed) = resume(&state, &principal, &headers).await? {
        return Ok(resumed);
    }
    let request = ConvoTurnRequest {
        animal_id: resolve_animal(&state, q.animal_id).await?,
        message: q.message,
        session_id: q.session_id,
        context_summary: None,
        metadata: None,
        priority: None,
        max_tokens: None,
        temperature: None,
        context_window: q.context_window,
        moderation_level: None,
        turn_key: q.turn_key,
    };
    run(state, principal, request.into_turn()?).await
}

/// The same, with the request in a JSON body (for messages too long for a URL).
pub(crate) async fn stream_post(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    ApiJson(mut body): ApiJson<ConvoTurnRequest>,
) -> Result<Response, ApiError> {
    if let Some(resumed) = resume(&state, &principal, &headers).await? {
        return Ok(resumed);
    }
    body.animal_id = resolve_animal(&state, body.animal_id).await?;
    run(state, principal, body.into_turn()?).await
}

fn event(name: &str, data: serde_json::Value) -> Result<Event, Infallible> {
    Ok(Event::default().event(name).data(data.to_string()))
}

/// How long a browser waits before reconnecting a dropped stream (EventSource's `retry`).
const RECONNECT_AFTER: std::time::Duration = std::time::Duration::from_millis(1000);

/// An event's id: the stream and the event's number in it (`<streamId>.<n>`), what a
/// browser sends back as `Last-Event-ID` when it reconnects.
fn event_id(stream: &str, number: u64) -> String {
    format!("{stream}.{number}")
}

/// A reconnect (`Last-Event-ID: <streamId>.<n>`): the rest of that stream instead of a new
/// turn. `None` when the request is not one.
async fn resume(
    state: &AppState,
    principal: &Principal,
    headers: &HeaderMap,
) -> Result<Option<Response>, ApiError> {
    let Some(last) = headers.get("last-event-id") else {
        return Ok(None);
    };
    let parsed = last
        .to_str()
        .ok()
        .and_then(|v| v.trim().rsplit_once('.'))
        .and_then(|(stream, n)| Some((stream.to_owned(), n.parse::<u64>().ok()?)))
        .filter(|(stream, _)| !stream.is_empty() && stream.len() <= 64);
    // An id this server never sends names no stream of it: as an unknown stream.
    let Some((stream_id, seen)) = parsed else {
        return Err(cmz_core::Error::not_found(
            "the stream of that Last-Event-ID (not an event id this server sent); read the session's history",
        )
        .into());
    };
    let stream = state
        .conversations()
        .resume_stream(principal, &stream_id, seen)
        .await?;
    Ok(Some(respond(events(
        stream,
        None,
        std::time::Instant::now(),
    ))))
}

/// `POST /convo_turn/stream/{streamId}/stop`: cancels a running stream at once (the reply
/// so far is stored, marked interrupted).
pub(crate) async fn stop(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(stream_id): Path<String>,
) -> Result<Response, ApiError> {
    state
        .conversations()
        .stop_stream(&principal, &stream_id)
        .await?;
    Ok(axum::http::StatusCode::NO_CONTENT.into_response())
}
async fn run(
    state: AppState,
    principal: Principal,
    turn: TurnRequest,
) -> Result<Response, ApiError> {
    let animal = turn.animal_id.clone();
    // Request errors (validation, access, unknown session, the turn limit) are plain JSON
    // errors.
    let stream = match state
        .conversations()
        .stream_turn_resumable(&principal, turn)
        .await
    {
        Ok(stream) => stream,
        Err(error) => return Err(model_call_error(&state, &principal, error).await),
    };
    let started = std::time::Instant::now();
    Ok(respond(events(stream, Some(animal), started)))
}

type Events = std::pin::Pin<Box<dyn Stream<Item = Result<Event, Infallible>> + Send>>;

/// The SSE events of a stream: the legacy `session` and `metadata` events first (on a new
/// stream, not on a resumed one), then `message` per piece, then `complete` or `error`;
/// every one with its id.
fn events(
    stream: ResumableStream,
    animal: Option<AnimalId>,
    started: std::time::Instant,
) -> Events {
    let session_id = stream.session_id.clone();
    let stream_id = stream.stream_id.clone();
    let now = || Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let mut head = Vec::new();
    let animal_given = animal.is_some();
    if let Some(animal) = animal {
        let start = event_id(&stream_id, 0);
        if stream.session_created {
            head.push(
                event(
                    "session",
                    json!({ "type": "new_session", "sessionId": session_id, "timestamp": now() }),
                )
                .map(|e| e.id(start.clone())),
            );
        }
        head.push(
            event(
                "metadata",
                json!({ "type": "start", "sessionId": session_id, "animalId": animal, "streamId": stream_id, "timestamp": now() }),
            )
            .map(|e| e.id(start).retry(RECONNECT_AFTER)),
        );
    }
    // A replay of a finished turn is not another turn for the metrics.
    let counted = animal_given;
    let mut last = 0u64;
    let body = stream.map(move |item| match item {
        Ok(StreamItem { number, event: TurnEvent::Delta(content) }) => {
            last = number;
            event("message", json!({ "type": "content", "content": content, "chunkId": number }))
                .map(|e| e.id(event_id(&stream_id, number)))
        }
        Ok(StreamItem { number, event: TurnEvent::Complete(reply) }) => {
            last = number;
            if counted {
                crate::metrics::turn(&reply, started.elapsed());
            }
            event(
                "complete",
                json!({
                    "type": "complete",
                    "fullResponse": reply.reply,
                    "chunkCount": number.saturating_sub(1),
                    "timestamp": now(),
                    "sessionId": reply.session_id,
                    "turn": reply.turn,
                    "fallback": reply.fallback,
                    "interrupted": reply.interrupted,
                    "tokensPrompt": reply.usage.map(|u| u.prompt_tokens),
                    "tokensCompletion": reply.usage.map(|u| u.completion_tokens),
                    // The reply's id (for feedback on it).
                    "messageId": reply.assistant_message.id,
                }),
            )
            .map(|e| e.id(event_id(&stream_id, number)))
        }
        Err(error) => {
            // Masked like every JSON error: no backend details reach the client.
            let api = ApiError::from(error);
            event("error", json!({ "type": "error", "error": api.message, "code": api.code, "timestamp": now() }))
                .map(|e| e.id(event_id(&stream_id, last + 1)))
        }
    });
    futures::stream::iter(head).chain(body).boxed()
}

fn respond(events: Events) -> Response {
    let mut response = Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response();
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}
