//! `GET|POST /convo_turn/stream`: a turn as Server-Sent Events with the legacy event names.

use std::convert::Infallible;

use axum::Extension;
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use cmz_core::access::Principal;
use cmz_core::service::{TurnEvent, TurnRequest};
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
    ApiQuery(q): ApiQuery<StreamQuery>,
) -> Result<Response, ApiError> {
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
    ApiJson(mut body): ApiJson<ConvoTurnRequest>,
) -> Result<Response, ApiError> {
    body.animal_id = resolve_animal(&state, body.animal_id).await?;
    run(state, principal, body.into_turn()?).await
}

fn event(name: &str, data: serde_json::Value) -> Result<Event, Infallible> {
    Ok(Event::default().event(name).data(data.to_string()))
}

async fn run(
    state: AppState,
    principal: Principal,
    turn: TurnRequest,
) -> Result<Response, ApiError> {
    let animal = turn.animal_id.clone();
    // Request errors (validation, access, unknown session, the turn limit) are plain JSON
    // errors.
    let stream = match state.conversations().stream_turn(&principal, turn).await {
        Ok(stream) => stream,
        Err(error) => return Err(model_call_error(&state, &principal, error).await),
    };
    let session_id = stream.session_id.clone();
    let now = || Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let mut head = Vec::new();
    if stream.session_created {
        head.push(event(
            "session",
            json!({ "type": "new_session", "sessionId": session_id, "timestamp": now() }),
        ));
    }
    head.push(event(
        "metadata",
        json!({ "type": "start", "sessionId": session_id, "animalId": animal, "timestamp": now() }),
    ));
    let mut chunk_id = 0u64;
    let started = std::time::Instant::now();
    let body = stream.map(move |item| match item {
        Ok(TurnEvent::Delta(content)) => {
            chunk_id += 1;
            event("message", json!({ "type": "content", "content": content, "chunkId": chunk_id }))
        }
        Ok(TurnEvent::Complete(reply)) => {
            crate::metrics::turn(&reply, started.elapsed());
            event(
            "complete",
            json!({
                "type": "complete",
                "fullResponse": reply.reply,
                "chunkCount": chunk_id,
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
        }
        Err(error) => {
            // Masked like every JSON error: no backend details reach the client.
            let api = ApiError::from(error);
            event("error", json!({ "type": "error", "error": api.message, "code": api.code, "timestamp": now() }))
        }
    });
    let events: std::pin::Pin<Box<dyn Stream<Item = Result<Event, Infallible>> + Send>> =
        futures::stream::iter(head).chain(body).boxed();
    let mut response = Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response();
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}
