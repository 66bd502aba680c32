//! `Conversations`: turns, history, sessions, deletes and summaries (feedback, the review
//! queue, usage and exports are in `care`).

// Python methods take their keyword arguments one by one.
#![allow(clippy::too_many_arguments)]

use cmz_core::ids::{AnimalId, SessionId, UserId};
use cmz_core::service::{ExternalTurn, TurnRequest};
use cmz_core::store::{DeleteScope, PageRequest, SessionScope};
use cmz_core::types::MessageMetadata;
use cmz_core::{Error, Result};
use cmz_env::Services;
use pyo3::prelude::*;
use serde_json::{Value, json};

use crate::convert::*;
use crate::principal::Principal;
use crate::runtime::{awaitable, block_on, from_python, to_python};
use crate::stream::TurnStream;

/// Conversations: every call checks the principal's access (owners, their parents,
/// administrators), as the HTTP API does.
#[pyclass(frozen, module = "cmz._cmz")]
pub(crate) struct Conversations {
    pub(crate) state: Services,
}

pub(crate) struct TurnArgs {
    principal: cmz_core::access::Principal,
    request: TurnRequest,
}

/// The keyword arguments of a turn beyond its message and session, as over HTTP.
pub(crate) struct TurnOptions {
    pub(crate) max_tokens: Option<i128>,
    pub(crate) temperature: Option<f64>,
    pub(crate) context_summary: Option<String>,
    pub(crate) moderation_level: Option<String>,
    pub(crate) priority: Option<String>,
}

pub(crate) fn turn_args(
    principal: &Principal,
    animal_id: String,
    message: String,
    session_id: Option<String>,
    context_window: Option<i128>,
    turn_key: Option<String>,
    options: TurnOptions,
) -> PyResult<TurnArgs> {
    let mut request = TurnRequest::new(id(AnimalId::new, animal_id)?, message);
    if let Some(session) = session_id {
        request = request.in_session(id(SessionId::new, session)?);
    }
    if let Some(window) = context_window {
        // Bounds are the engine's, the same as over HTTP.
        request = request.with_context_window(usize::try_from(window).unwrap_or(0));
    }
    if let Some(key) = turn_key {
        request = request.with_turn_key(key);
    }
    // Bounds are the engine's, the same as over HTTP: out-of-range numbers only need to
    // survive the conversion to be refused there with the same message.
    request.max_tokens = options
        .max_tokens
        .map(|tokens| u32::try_from(tokens).unwrap_or(0));
    request.temperature = options.temperature.map(|t| t as f32);
    request.context_summary = options.context_summary;
    if let Some(level) = options.moderation_level {
        request = request.with_moderation_level(level.parse().map_err(crate::errors::to_py)?);
    }
    if let Some(priority) = options.priority {
        request = request.with_priority(priority.parse().map_err(crate::errors::to_py)?);
    }
    Ok(TurnArgs {
        principal: principal.inner.clone(),
        request,
    })
}

pub(crate) async fn store_turn(
    state: Services,
    principal: cmz_core::access::Principal,
    turn: ExternalTurn,
) -> Result<Value> {
    let stored = state.conversations().store_turn(&principal, turn).await?;
    let messages = [&stored.user_message, &stored.assistant_message];
    Ok(json!({
        "sessionId": stored.session_id,
        "messages": messages.into_iter().map(message_json).collect::<Result<Vec<_>>>()?,
        "messageCount": stored.assistant_message.seq,
    }))
}

#[pymethods]
impl Conversations {
    /// Runs a turn: persona prompt, context window, model, atomic persist. Returns a dict
    /// (`reply`, `sessionId`, `userMessage`, `assistantMessage`, `usage`, `moderation`,
    /// ...). The keyword arguments are the HTTP API's, with its defaults and bounds:
    /// `context_window` (1-20), `max_tokens` (10-1000), `temperature` (0-2),
    /// `context_summary` (the client's summary of earlier turns, moderated, 2,000
    /// characters at most), `moderation_level` (`permissive`, `standard`, `strict`; never
    /// below the deployment's), `priority` (`low`, `normal`, `high`) and `turn_key`.
    /// A `session_id` nobody has used starts a session under that id; someone else's
    /// session, or one with another animal, starts one under a new id (the reply's
    /// `sessionId`, with `sessionCreated` true).
    #[pyo3(signature = (principal, animal_id, message, *, session_id=None, context_window=None, turn_key=None, max_tokens=None, temperature=None, context_summary=None, moderation_level=None, priority=None))]
    fn turn(
        &self,
        py: Python<'_>,
        principal: &Principal,
        animal_id: String,
        message: String,
        session_id: Option<String>,
        context_window: Option<i128>,
        turn_key: Option<String>,
        max_tokens: Option<i128>,
        temperature: Option<f64>,
        context_summary: Option<String>,
        moderation_level: Option<String>,
        priority: Option<String>,
    ) -> PyResult<Py<PyAny>> {
        let args = turn_args(
            principal,
            animal_id,
            message,
            session_id,
            context_window,
            turn_key,
            TurnOptions {
                max_tokens,
                temperature,
                context_summary,
                moderation_level,
                priority,
            },
        )?;
        let state = self.state.clone();
        let value = block_on(py, async move {
            let reply = state
                .conversations()
                .turn(&args.principal, args.request)
                .await?;
            reply_json(&reply)
        })?;
        Ok(to_python(py, &value)?.unbind())
    }

    /// `turn` as an asyncio coroutine.
    #[pyo3(signature = (principal, animal_id, message, *, session_id=None, context_window=None, turn_key=None, max_tokens=None, temperature=None, context_summary=None, moderation_level=None, priority=None))]
    fn aturn<'py>(
        &self,
        py: Python<'py>,
        principal: &Principal,
        animal_id: String,
        message: String,
        session_id: Option<String>,
        context_window: Option<i128>,
        turn_key: Option<String>,
        max_tokens: Option<i128>,
        temperature: Option<f64>,
        context_summary: Option<String>,
        moderation_level: Option<String>,
        priority: Option<String>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let args = turn_args(
            principal,
            animal_id,
            message,
            session_id,
            context_window,
            turn_key,
            TurnOptions {
                max_tokens,
                temperature,
                context_summary,
                moderation_level,
                priority,
            },
        )?;
        let state = self.state.clone();
        awaitable(py, async move {
            let reply = state
                .conversations()
                .turn(&args.principal, args.request)
                .await?;
            reply_json(&reply)
        })
    }

    /// Streams a turn: iterate (or `async for`) to get `{"type": "delta", "content": ...,
    /// "id": n}` dicts, then one `{"type": "complete", "id": n, ...}` with the stored turn.
    /// `close()` cancels the model call at once and stores the partial reply, marked
    /// interrupted; a stream abandoned without `close()` keeps running for the resume grace
    /// period (`CMZ_STREAM_RESUME_GRACE_MS`, default 20 s) so `resume_stream` can pick it up,
    /// then is cancelled the same way.
    #[pyo3(signature = (principal, animal_id, message, *, session_id=None, context_window=None, turn_key=None, max_tokens=None, temperature=None, context_summary=None, moderation_level=None, priority=None))]
    fn stream_turn(
        &self,
        py: Python<'_>,
        principal: &Principal,
        animal_id: String,
        message: String,
        session_id: Option<String>,
        context_window: Option<i128>,
        turn_key: Option<String>,
        max_tokens: Option<i128>,
        temperature: Option<f64>,
        context_summary: Option<String>,
        moderation_level: Option<String>,
        priority: Option<String>,
    ) -> PyResult<TurnStream> {
        let args = turn_args(
            principal,
            animal_id,
            message,
            session_id,
            context_window,
            turn_key,
            TurnOptions {
                max_tokens,
                temperature,
                context_summary,
                moderation_level,
                priority,
            },
        )?;
        let state = self.state.clone();
        let owner = args.principal.clone();
        let stream = block_on(py, async move {
            state
                .conversations()
                .stream_turn_resumable(&args.principal, args.request)
                .await
        })?;
        Ok(TurnStream::new(stream, self.state.clone(), owner))
    }

    /// Picks up a stream (of this principal) after event `after` (the `id` of the last
    /// event received; 0: from the start): the events missed, exactly once, then the live
    /// rest. `NotFound` once it ended more than the grace period ago.
    #[pyo3(signature = (principal, stream_id, *, after=0))]
    fn resume_stream(
        &self,
        py: Python<'_>,
        principal: &Principal,
        stream_id: String,
        after: u64,
    ) -> PyResult<TurnStream> {
        let (state, owner) = (self.state.clone(), principal.inner.clone());
        let stream = block_on(py, async move {
            state
                .conversations()
                .resume_stream(&owner, &stream_id, after)
                .await
        })?;
        Ok(TurnStream::new(
            stream,
            self.state.clone(),
            principal.inner.clone(),
        ))
    }

    /// Stores a turn whose reply was produced elsewhere (no model call): the user message
    /// and the reply, atomically, in `session_id` or in a new session of the principal.
    /// `metadata` (a dict, any keys, JSON values) is stored with the reply verbatim; the
    /// keys cmz knows (`tokensPrompt`, `tokensCompletion`, `latencyMs`, `model`, ...) also
    /// fill its usage fields. Returns `sessionId`, `messages` and `messageCount`.
    #[pyo3(signature = (principal, animal_id, user_message, assistant_reply, *, session_id=None, metadata=None))]
    fn store_turn(
        &self,
        py: Python<'_>,
        principal: &Principal,
        animal_id: String,
        user_message: String,
        assistant_reply: String,
        session_id: Option<String>,
        metadata: Option<Bound<'_, PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let metadata = match metadata {
            Some(m) if !m.is_none() => match from_python(&m)? {
                Value::Object(map) => MessageMetadata::from_caller(map),
                _ => {
                    return Err(crate::errors::to_py(Error::validation(
                        "metadata",
                        "metadata must be a dict",
                    )));
                }
            },
            _ => MessageMetadata::default(),
        };
        let mut turn =
            ExternalTurn::new(id(AnimalId::new, animal_id)?, user_message, assistant_reply)
                .with_metadata(metadata);
        if let Some(session) = session_id {
            turn = turn.in_session(id(SessionId::new, session)?);
        }
        let (state, principal) = (self.state.clone(), principal.inner.clone());
        let value = block_on(py, store_turn(state, principal, turn))?;
        Ok(to_python(py, &value)?.unbind())
    }

    /// Creates an empty session with `animal_id` for the principal; returns it.
    #[pyo3(signature = (principal, animal_id, *, animal_name=None))]
    fn create_session(
        &self,
        py: Python<'_>,
        principal: &Principal,
        animal_id: String,
        animal_name: Option<String>,
    ) -> PyResult<Py<PyAny>> {
        let animal_id = id(AnimalId::new, animal_id)?;
        let (state, principal) = (self.state.clone(), principal.inner.clone());
        let value = block_on(py, async move {
            to_json(
                &state
                    .conversations()
                    .create_session(&principal, &animal_id, animal_name)
                    .await?,
            )
        })?;
        Ok(to_python(py, &value)?.unbind())
    }

    /// Keeps an external thread id (an OpenAI Assistants thread, say) with a session; the
    /// principal must be allowed to write to it. Read it back as the session's `threadId`.
    fn set_thread_id(
        &self,
        py: Python<'_>,
        principal: &Principal,
        session_id: String,
        thread_id: String,
    ) -> PyResult<()> {
        let id = id(SessionId::new, session_id)?;
        let (state, principal) = (self.state.clone(), principal.inner.clone());
        block_on(py, async move {
            state
                .conversations()
                .set_thread_id(&principal, &id, &thread_id)
                .await
        })
    }

    /// One session (`sessionId`, `userId`, `animalId`, `messageCount`, ...).
    fn session(
        &self,
        py: Python<'_>,
        principal: &Principal,
        session_id: String,
    ) -> PyResult<Py<PyAny>> {
        let id = id(SessionId::new, session_id)?;
        let (state, principal) = (self.state.clone(), principal.inner.clone());
        let value = block_on(py, async move {
            to_json(&state.conversations().session(&principal, &id).await?)
        })?;
        Ok(to_python(py, &value)?.unbind())
    }

    /// The last `limit` messages of a session, oldest first (a list of message dicts).
    #[pyo3(signature = (principal, session_id, *, limit=20))]
    fn recent(
        &self,
        py: Python<'_>,
        principal: &Principal,
        session_id: String,
        limit: i128,
    ) -> PyResult<Py<PyAny>> {
        let limit = self::limit("limit", limit, 10_000)?;
        let id = id(SessionId::new, session_id)?;
        let (state, principal) = (self.state.clone(), principal.inner.clone());
        let value = block_on(py, async move {
            let messages = state.conversations().recent(&principal, &id, limit).await?;
            Ok(Value::Array(
                messages
                    .iter()
                    .map(message_json)
                    .collect::<Result<Vec<_>>>()?,
            ))
        })?;
        Ok(to_python(py, &value)?.unbind())
    }

    /// A page of a session's messages, oldest first: `{"messages": [...], "nextCursor": str | None}`.
    #[pyo3(signature = (principal, session_id, *, limit=50, cursor=None))]
    fn history(
        &self,
        py: Python<'_>,
        principal: &Principal,
        session_id: String,
        limit: i128,
        cursor: Option<String>,
    ) -> PyResult<Py<PyAny>> {
        let future = history(
            self.state.clone(),
            principal.inner.clone(),
            id(SessionId::new, session_id)?,
            page(limit, cursor)?,
        );
        let value = block_on(py, future)?;
        Ok(to_python(py, &value)?.unbind())
    }

    /// `history` as an asyncio coroutine.
    #[pyo3(signature = (principal, session_id, *, limit=50, cursor=None))]
    fn ahistory<'py>(
        &self,
        py: Python<'py>,
        principal: &Principal,
        session_id: String,
        limit: i128,
        cursor: Option<String>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let future = history(
            self.state.clone(),
            principal.inner.clone(),
            id(SessionId::new, session_id)?,
            page(limit, cursor)?,
        );
        awaitable(py, future)
    }

    /// A page of sessions, newest activity first: the principal's own, or `user_id`'s
    /// (a parent's student, or anyone for administrators). `{"sessions": [...], "nextCursor": ...}`.
    #[pyo3(signature = (principal, *, user_id=None, limit=20, cursor=None))]
    fn sessions(
        &self,
        py: Python<'_>,
        principal: &Principal,
        user_id: Option<String>,
        limit: i128,
        cursor: Option<String>,
    ) -> PyResult<Py<PyAny>> {
        let future = sessions(self.state.clone(), principal, user_id, page(limit, cursor)?)?;
        sync_value(py, future)
    }

    /// `sessions` as an asyncio coroutine.
    #[pyo3(signature = (principal, *, user_id=None, limit=20, cursor=None))]
    fn asessions<'py>(
        &self,
        py: Python<'py>,
        principal: &Principal,
        user_id: Option<String>,
        limit: i128,
        cursor: Option<String>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let future = sessions(self.state.clone(), principal, user_id, page(limit, cursor)?)?;
        awaitable(py, future)
    }

    /// Deletes a session and its messages: `{"sessions": n, "messages": n}`.
    fn delete(
        &self,
        py: Python<'_>,
        principal: &Principal,
        session_id: String,
    ) -> PyResult<Py<PyAny>> {
        sync_value(
            py,
            delete(
                self.state.clone(),
                principal.inner.clone(),
                id(SessionId::new, session_id)?,
            ),
        )
    }

    /// `delete` as an asyncio coroutine.
    fn adelete<'py>(
        &self,
        py: Python<'py>,
        principal: &Principal,
        session_id: String,
    ) -> PyResult<Bound<'py, PyAny>> {
        awaitable(
            py,
            delete(
                self.state.clone(),
                principal.inner.clone(),
                id(SessionId::new, session_id)?,
            ),
        )
    }

    /// Summarizes a session with the model (a deterministic one when the model is down):
    /// `{"summary": str, "fallback": bool}`.
    fn summarize(
        &self,
        py: Python<'_>,
        principal: &Principal,
        session_id: String,
    ) -> PyResult<Py<PyAny>> {
        sync_value(
            py,
            summarize(
                self.state.clone(),
                principal.inner.clone(),
                id(SessionId::new, session_id)?,
            ),
        )
    }

    /// `summarize` as an asyncio coroutine.
    fn asummarize<'py>(
        &self,
        py: Python<'py>,
        principal: &Principal,
        session_id: String,
    ) -> PyResult<Bound<'py, PyAny>> {
        awaitable(
            py,
            summarize(
                self.state.clone(),
                principal.inner.clone(),
                id(SessionId::new, session_id)?,
            ),
        )
    }
}

pub(crate) fn sessions(
    state: Services,
    principal: &Principal,
    user_id: Option<String>,
    request: PageRequest,
) -> PyResult<impl std::future::Future<Output = Result<Value>> + Send + 'static> {
    let owner = match user_id {
        Some(user) => id(UserId::new, user)?,
        None => principal.inner.user_id.clone(),
    };
    let principal = principal.inner.clone();
    Ok(async move {
        let listed = state
            .conversations()
            .list_sessions(&principal, SessionScope::User(owner), request)
            .await?;
        Ok(json!({
            "sessions": listed.items.iter().map(to_json).collect::<Result<Vec<_>>>()?,
            "nextCursor": listed.next.map(|c| c.as_str().to_owned()),
        }))
    })
}

pub(crate) async fn delete(
    state: Services,
    principal: cmz_core::access::Principal,
    id: SessionId,
) -> Result<Value> {
    let report = state
        .conversations()
        .delete(&principal, DeleteScope::Session(id))
        .await?;
    Ok(json!({"sessions": report.sessions, "messages": report.messages}))
}

pub(crate) async fn summarize(
    state: Services,
    principal: cmz_core::access::Principal,
    id: SessionId,
) -> Result<Value> {
    let summary = state.conversations().summarize(&principal, &id).await?;
    Ok(json!({"summary": summary.text, "fallback": summary.fallback}))
}

pub(crate) async fn history(
    state: Services,
    principal: cmz_core::access::Principal,
    id: SessionId,
    page: PageRequest,
) -> Result<Value> {
    let read = state.conversations().history(&principal, &id, page).await?;
    Ok(json!({
        "messages": read.items.iter().map(message_json).collect::<Result<Vec<_>>>()?,
        "nextCursor": read.next.map(|c| c.as_str().to_owned()),
    }))
}
