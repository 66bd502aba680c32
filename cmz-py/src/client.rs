//! `Client`, `Conversations`, `Auth`, `Principal` and `TurnStream`.

// Python methods take their keyword arguments one by one.
#![allow(clippy::too_many_arguments)]

use std::collections::HashMap;
use std::sync::Arc;

use cmz_core::access::UserRole;
use cmz_core::auth::TokenRequest;
use cmz_core::ids::{AnimalId, FamilyId, SessionId, UserId};
use cmz_core::service::{ExternalTurn, TurnEvent, TurnReply, TurnRequest};
use cmz_core::store::{Cursor, DeleteScope, PageRequest, SessionScope};
use cmz_core::types::{Message, MessageMetadata};
use cmz_core::{Error, Result};
use cmz_env::Services;
use futures::StreamExt as _;
use pyo3::exceptions::PyStopAsyncIteration;
use pyo3::prelude::*;
use serde_json::{Value, json};
use tokio::sync::Mutex;

use crate::runtime::{awaitable, block_on, from_python, runtime, to_python};

fn to_json<T: serde::Serialize>(value: &T) -> Result<Value> {
    serde_json::to_value(value).map_err(|e| Error::internal(format!("serialize: {e}")))
}

/// A random 48-character secret from the OS CSPRNG (for clients made without one).
fn random_secret() -> PyResult<String> {
    cmz_core::random::secret_hex(24).map_err(crate::errors::to_py)
}

/// A cmz instance: the conversation and auth services over one set of stores.
///
/// `Client.from_env()` reads the legacy variables (DynamoDB when `DYNAMODB_ENDPOINT_URL`
/// or a table variable is set, else in memory; OpenAI when `OPENAI_API_KEY` /
/// `OPENAI_BASE_URL` is set, else the offline persona model). Thread-safe: share one.
#[pyclass(frozen, module = "cmz._cmz")]
pub(crate) struct Client {
    state: Services,
}

fn build(py: Python<'_>, env: HashMap<String, String>, use_process_env: bool) -> PyResult<Client> {
    let lookup = move |name: &str| -> Option<String> {
        env.get(name).cloned().or_else(|| {
            if use_process_env {
                std::env::var(name).ok()
            } else {
                None
            }
        })
    };
    let state = block_on(py, async move { cmz_env::services_from_env(&lookup).await })?;
    Ok(Client { state })
}

#[pymethods]
impl Client {
    /// A client configured from environment variables: the process environment, or
    /// `env` (a dict of the same names) when given.
    #[staticmethod]
    #[pyo3(signature = (env=None))]
    fn from_env(py: Python<'_>, env: Option<HashMap<String, String>>) -> PyResult<Self> {
        match env {
            Some(env) => build(py, env, false),
            None => build(py, HashMap::new(), true),
        }
    }

    /// An in-memory client (nothing persists). `dev_users` seeds the development users
    /// (`admin@cmz.org` / `admin123`, ...); without `jwt_secret` a random one is used.
    #[staticmethod]
    #[pyo3(signature = (*, jwt_secret=None, dev_users=true))]
    fn in_memory(py: Python<'_>, jwt_secret: Option<String>, dev_users: bool) -> PyResult<Self> {
        let mut env = HashMap::new();
        env.insert(
            "JWT_SECRET".to_owned(),
            match jwt_secret {
                Some(secret) => secret,
                None => random_secret()?,
            },
        );
        if dev_users {
            env.insert("CMZ_DEV_USERS".to_owned(), "embedded".to_owned());
        }
        build(py, env, false)
    }

    /// A client on DynamoDB. `tables` maps the legacy variable names
    /// (`CONVERSATION_SESSION_TABLE_NAME`, ...) to table names; `create_tables` creates
    /// missing ones (development).
    #[staticmethod]
    #[pyo3(signature = (*, endpoint_url=None, region=None, tables=None, create_tables=false, jwt_secret=None, dev_users=false))]
    fn dynamodb(
        py: Python<'_>,
        endpoint_url: Option<String>,
        region: Option<String>,
        tables: Option<HashMap<String, String>>,
        create_tables: bool,
        jwt_secret: Option<String>,
        dev_users: bool,
    ) -> PyResult<Self> {
        let mut env = tables.unwrap_or_default();
        for name in env.keys() {
            if !cmz_dynamo::TABLE_VARIABLES.contains(&name.as_str()) {
                return Err(pyo3::exceptions::PyValueError::new_err(format!(
                    "unknown table variable {name:?}; expected one of {:?}",
                    cmz_dynamo::TABLE_VARIABLES
                )));
            }
        }
        // Make sure DynamoDB is selected even with default table names.
        env.entry("CONVERSATION_SESSION_TABLE_NAME".to_owned())
            .or_insert_with(|| "quest-dev-session".to_owned());
        if let Some(url) = endpoint_url {
            env.insert("DYNAMODB_ENDPOINT_URL".to_owned(), url);
        }
        if let Some(region) = region {
            env.insert("AWS_REGION".to_owned(), region);
        }
        if create_tables {
            env.insert("CMZ_DYNAMODB_CREATE_TABLES".to_owned(), "1".to_owned());
        }
        env.insert(
            "JWT_SECRET".to_owned(),
            match jwt_secret {
                Some(secret) => secret,
                None => random_secret()?,
            },
        );
        if dev_users {
            env.insert("CMZ_DEV_USERS".to_owned(), "embedded".to_owned());
        }
        build(py, env, false)
    }

    /// Turns, history, sessions, deletes and summaries.
    #[getter]
    fn conversations(&self) -> Conversations {
        Conversations {
            state: self.state.clone(),
        }
    }

    /// Logins, tokens and passwords.
    #[getter]
    fn auth(&self) -> Auth {
        Auth {
            state: self.state.clone(),
        }
    }

    /// Capacity DynamoDB reported for this client's calls so far (`readUnits`,
    /// `writeUnits`, `requests`), or None when the stores are in memory.
    fn capacity(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let value = match self.state.capacity() {
            Some(c) => {
                json!({"readUnits": c.read_units, "writeUnits": c.write_units, "requests": c.requests})
            }
            None => Value::Null,
        };
        Ok(to_python(py, &value)?.unbind())
    }

    fn __repr__(&self) -> String {
        "cmz.Client()".to_owned()
    }
}

/// Who is asking: made by `Auth.authenticate(token)`, or by trusted server code with
/// `Principal(user_id, role)`.
#[pyclass(frozen, module = "cmz._cmz")]
#[derive(Clone)]
pub(crate) struct Principal {
    pub(crate) inner: cmz_core::access::Principal,
}

#[pymethods]
impl Principal {
    #[new]
    #[pyo3(signature = (user_id, role="user", family_id=None))]
    fn new(user_id: String, role: &str, family_id: Option<String>) -> PyResult<Self> {
        let user_id = UserId::new(user_id).map_err(crate::errors::to_py)?;
        let role: UserRole = role.parse().map_err(crate::errors::to_py)?;
        let family_id = family_id
            .map(FamilyId::new)
            .transpose()
            .map_err(crate::errors::to_py)?;
        Ok(Self {
            inner: cmz_core::access::Principal {
                user_id,
                role,
                family_id,
            },
        })
    }

    /// The user id.
    #[getter]
    fn user_id(&self) -> &str {
        self.inner.user_id.as_str()
    }

    /// The role (`admin`, `parent`, `student`, ...).
    #[getter]
    fn role(&self) -> &'static str {
        self.inner.role.as_str()
    }

    /// The family id, if any.
    #[getter]
    fn family_id(&self) -> Option<&str> {
        self.inner.family_id.as_ref().map(|f| f.as_str())
    }

    fn __repr__(&self) -> String {
        format!(
            "cmz.Principal({:?}, role={:?})",
            self.inner.user_id.as_str(),
            self.inner.role.as_str()
        )
    }
}

fn id<T>(make: fn(String) -> Result<T>, value: String) -> PyResult<T> {
    make(value).map_err(crate::errors::to_py)
}

/// A message as Python sees it: `metadata` is the caller's own map when one was stored
/// (verbatim), else cmz's typed fields.
fn message_json(message: &Message) -> Result<Value> {
    let mut value = to_json(message)?;
    if let Some(object) = value.as_object_mut() {
        object.insert(
            "metadata".into(),
            Value::Object(message.metadata.to_caller()),
        );
    }
    Ok(value)
}

fn reply_json(reply: &TurnReply) -> Result<Value> {
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
    }))
}

/// A limit from Python: 1 to `max`, else a `ValidationError` naming the argument.
fn limit(name: &'static str, value: i128, max: usize) -> PyResult<usize> {
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

fn page(value: i128, cursor: Option<String>) -> PyResult<PageRequest> {
    Ok(PageRequest {
        limit: limit("limit", value, cmz_core::store::MAX_PAGE_SIZE)?,
        cursor: cursor.map(Cursor::from_client),
    })
}

/// Conversations: every call checks the principal's access (owners, their parents,
/// administrators), as the HTTP API does.
#[pyclass(frozen, module = "cmz._cmz")]
pub(crate) struct Conversations {
    state: Services,
}

struct TurnArgs {
    principal: cmz_core::access::Principal,
    request: TurnRequest,
}

fn turn_args(
    principal: &Principal,
    animal_id: String,
    message: String,
    session_id: Option<String>,
    context_window: Option<i128>,
    turn_key: Option<String>,
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
    Ok(TurnArgs {
        principal: principal.inner.clone(),
        request,
    })
}

async fn store_turn(
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
    /// (`reply`, `sessionId`, `userMessage`, `assistantMessage`, `usage`, ...).
    #[pyo3(signature = (principal, animal_id, message, *, session_id=None, context_window=None, turn_key=None))]
    fn turn(
        &self,
        py: Python<'_>,
        principal: &Principal,
        animal_id: String,
        message: String,
        session_id: Option<String>,
        context_window: Option<i128>,
        turn_key: Option<String>,
    ) -> PyResult<Py<PyAny>> {
        let args = turn_args(
            principal,
            animal_id,
            message,
            session_id,
            context_window,
            turn_key,
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
    #[pyo3(signature = (principal, animal_id, message, *, session_id=None, context_window=None, turn_key=None))]
    fn aturn<'py>(
        &self,
        py: Python<'py>,
        principal: &Principal,
        animal_id: String,
        message: String,
        session_id: Option<String>,
        context_window: Option<i128>,
        turn_key: Option<String>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let args = turn_args(
            principal,
            animal_id,
            message,
            session_id,
            context_window,
            turn_key,
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

    /// Streams a turn: iterate (or `async for`) to get `{"type": "delta", "content": ...}`
    /// dicts, then one `{"type": "complete", ...}` with the stored turn. Abandoning it
    /// (or `close()`) cancels the model call and stores the partial reply, marked
    /// interrupted.
    #[pyo3(signature = (principal, animal_id, message, *, session_id=None, context_window=None, turn_key=None))]
    fn stream_turn(
        &self,
        py: Python<'_>,
        principal: &Principal,
        animal_id: String,
        message: String,
        session_id: Option<String>,
        context_window: Option<i128>,
        turn_key: Option<String>,
    ) -> PyResult<TurnStream> {
        let args = turn_args(
            principal,
            animal_id,
            message,
            session_id,
            context_window,
            turn_key,
        )?;
        let state = self.state.clone();
        let stream = block_on(py, async move {
            state
                .conversations()
                .stream_turn(&args.principal, args.request)
                .await
        })?;
        Ok(TurnStream {
            session_id: stream.session_id.to_string(),
            session_created: stream.session_created,
            inner: Arc::new(Mutex::new(Some(stream))),
        })
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

/// Runs a JSON-returning operation synchronously (GIL released) and converts its result.
fn sync_value<F>(py: Python<'_>, future: F) -> PyResult<Py<PyAny>>
where
    F: std::future::Future<Output = Result<Value>> + Send,
{
    let value = block_on(py, future)?;
    Ok(to_python(py, &value)?.unbind())
}

fn sessions(
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

async fn delete(
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

async fn summarize(
    state: Services,
    principal: cmz_core::access::Principal,
    id: SessionId,
) -> Result<Value> {
    let summary = state.conversations().summarize(&principal, &id).await?;
    Ok(json!({"summary": summary.text, "fallback": summary.fallback}))
}

async fn history(
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

/// A streamed turn (see `Conversations.stream_turn`).
#[pyclass(frozen, module = "cmz._cmz")]
pub(crate) struct TurnStream {
    inner: Arc<Mutex<Option<cmz_core::service::TurnStream>>>,
    /// The session, new or continued.
    #[pyo3(get)]
    session_id: String,
    /// Whether this turn created the session.
    #[pyo3(get)]
    session_created: bool,
}

async fn next_event(
    inner: Arc<Mutex<Option<cmz_core::service::TurnStream>>>,
) -> Result<Option<Value>> {
    let mut guard = inner.lock().await;
    let Some(stream) = guard.as_mut() else {
        return Ok(None);
    };
    match stream.next().await {
        None => {
            *guard = None;
            Ok(None)
        }
        Some(Err(e)) => {
            *guard = None;
            Err(e)
        }
        Some(Ok(TurnEvent::Delta(text))) => Ok(Some(json!({"type": "delta", "content": text}))),
        Some(Ok(TurnEvent::Complete(reply))) => {
            *guard = None;
            let mut value = reply_json(&reply)?;
            value["type"] = json!("complete");
            Ok(Some(value))
        }
    }
}

#[pymethods]
impl TurnStream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        let inner = self.inner.clone();
        match block_on(py, next_event(inner))? {
            Some(value) => Ok(Some(to_python(py, &value)?.unbind())),
            None => Ok(None),
        }
    }

    fn __aiter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __anext__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let inner = self.inner.clone();
        let _ = pyo3_async_runtimes::tokio::init_with_runtime(runtime());
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            match next_event(inner).await.map_err(crate::errors::to_py)? {
                Some(value) => Python::attach(|py| to_python(py, &value).map(Bound::unbind)),
                None => Err(PyStopAsyncIteration::new_err(())),
            }
        })
    }

    /// Stops the turn: the model call is cancelled and the partial reply is stored,
    /// marked interrupted.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let inner = self.inner.clone();
        block_on(py, async move {
            inner.lock().await.take();
            Ok(())
        })
    }
}

/// Logins, tokens and passwords.
#[pyclass(frozen, module = "cmz._cmz")]
pub(crate) struct Auth {
    state: Services,
}

#[pymethods]
impl Auth {
    /// Logs in: `{"token", "refreshToken", "expiresIn", "user": {...}}`. `client` (an IP
    /// address) gets its own failed-login limit.
    #[pyo3(signature = (email, password, *, client=None))]
    fn login(
        &self,
        py: Python<'_>,
        email: String,
        password: String,
        client: Option<String>,
    ) -> PyResult<Py<PyAny>> {
        let state = self.state.clone();
        let value = block_on(py, async move {
            to_json(
                &state
                    .auth()
                    .login(&email, &password, client.as_deref())
                    .await?,
            )
        })?;
        Ok(to_python(py, &value)?.unbind())
    }

    /// `login` as an asyncio coroutine.
    #[pyo3(signature = (email, password, *, client=None))]
    fn alogin<'py>(
        &self,
        py: Python<'py>,
        email: String,
        password: String,
        client: Option<String>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let state = self.state.clone();
        awaitable(py, async move {
            to_json(
                &state
                    .auth()
                    .login(&email, &password, client.as_deref())
                    .await?,
            )
        })
    }

    /// Exchanges a refresh token (single use) for new tokens.
    fn refresh(&self, py: Python<'_>, refresh_token: String) -> PyResult<Py<PyAny>> {
        let state = self.state.clone();
        sync_value(py, async move {
            to_json(&state.auth().refresh(&refresh_token).await?)
        })
    }

    /// `refresh` as an asyncio coroutine.
    fn arefresh<'py>(&self, py: Python<'py>, refresh_token: String) -> PyResult<Bound<'py, PyAny>> {
        let state = self.state.clone();
        awaitable(py, async move {
            to_json(&state.auth().refresh(&refresh_token).await?)
        })
    }

    /// Revokes an access token and its refresh family.
    fn logout(&self, py: Python<'_>, token: String) -> PyResult<()> {
        let state = self.state.clone();
        block_on(py, async move { state.auth().logout(&token).await })
    }

    /// `logout` as an asyncio coroutine (resolves to None).
    fn alogout<'py>(&self, py: Python<'py>, token: String) -> PyResult<Bound<'py, PyAny>> {
        let state = self.state.clone();
        awaitable(py, async move {
            state.auth().logout(&token).await?;
            Ok(Value::Null)
        })
    }

    /// Verifies an access token (signature, expiry, issuer, revocation): the caller.
    fn authenticate(&self, py: Python<'_>, token: String) -> PyResult<Principal> {
        let state = self.state.clone();
        let inner = block_on(py, async move { state.auth().authenticate(&token).await })?;
        Ok(Principal { inner })
    }

    /// `authenticate` as an asyncio coroutine.
    fn aauthenticate<'py>(&self, py: Python<'py>, token: String) -> PyResult<Bound<'py, PyAny>> {
        let state = self.state.clone();
        let _ = pyo3_async_runtimes::tokio::init_with_runtime(runtime());
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            let inner = state
                .auth()
                .authenticate(&token)
                .await
                .map_err(crate::errors::to_py)?;
            Ok(Principal { inner })
        })
    }

    /// Verifies an access token and returns its claims (a dict with the legacy names).
    fn verify_token(&self, py: Python<'_>, token: String) -> PyResult<Py<PyAny>> {
        let state = self.state.clone();
        sync_value(
            py,
            async move { to_json(&state.auth().verify(&token).await?.1) },
        )
    }

    /// `verify_token` as an asyncio coroutine.
    fn averify_token<'py>(&self, py: Python<'py>, token: String) -> PyResult<Bound<'py, PyAny>> {
        let state = self.state.clone();
        awaitable(
            py,
            async move { to_json(&state.auth().verify(&token).await?.1) },
        )
    }

    /// Issues an access token with the legacy claims for a user described by the
    /// arguments (trusted server code; the user need not be stored). `expires_in` (seconds)
    /// replaces the configured lifetime; `claims` (a dict) adds claims, as the legacy
    /// `generate_jwt_token` copies extra user fields (those that decide validity or
    /// identity, such as `exp`, `iss`, `sub`, `role`, are ignored there).
    #[pyo3(signature = (user_id, email, role, *, family_id=None, expires_in=None, claims=None))]
    fn issue_token(
        &self,
        user_id: String,
        email: String,
        role: &str,
        family_id: Option<String>,
        expires_in: Option<i128>,
        claims: Option<Bound<'_, PyAny>>,
    ) -> PyResult<String> {
        let ttl = expires_in
            .map(|seconds| {
                u64::try_from(seconds)
                    .ok()
                    .filter(|s| (1..=10 * 365 * 86_400).contains(s))
                    .map(std::time::Duration::from_secs)
                    .ok_or_else(|| {
                        crate::errors::to_py(Error::validation(
                            "expires_in",
                            "expires_in must be 1 second to 10 years",
                        ))
                    })
            })
            .transpose()?;
        let extra = match claims {
            Some(c) if !c.is_none() => match from_python(&c)? {
                Value::Object(map) => map,
                _ => {
                    return Err(crate::errors::to_py(Error::validation(
                        "claims",
                        "claims must be a dict",
                    )));
                }
            },
            _ => serde_json::Map::new(),
        };
        let role: UserRole = role.parse().map_err(crate::errors::to_py)?;
        let mut request = TokenRequest::new(id(UserId::new, user_id)?, email, role);
        request.family_id = family_id.map(|f| id(FamilyId::new, f)).transpose()?;
        request.expires_in = ttl;
        request.claims = extra;
        let issued = self
            .state
            .auth()
            .issue_token(request)
            .map_err(crate::errors::to_py)?;
        Ok(issued.token)
    }

    /// Hashes a password with argon2id.
    fn hash_password(&self, py: Python<'_>, password: String) -> PyResult<String> {
        let state = self.state.clone();
        block_on(
            py,
            async move { state.auth().hash_password(&password).await },
        )
    }

    /// Checks a password against an argon2id hash or a legacy `salt:pbkdf2` hash.
    fn verify_password(
        &self,
        py: Python<'_>,
        password: String,
        stored_hash: String,
    ) -> PyResult<bool> {
        let state = self.state.clone();
        block_on(py, async move {
            state.auth().verify_password(&password, &stored_hash).await
        })
    }
}
