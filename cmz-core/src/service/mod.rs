//! The turn engine: everything that happens between a child's message and the stored reply.
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! use std::sync::Arc;
//! use cmz_core::prelude::*;
//! use cmz_core::testing::ScriptedModel;
//!
//! let personas = InMemoryPersonaDirectory::with_personas([Persona {
//!     personality: "proud and sleepy".into(),
//!     facts: vec!["I sleep up to 20 hours a day.".into()],
//!     guidelines: vec![],
//!     ..Persona::new(AnimalId::new("lion")?, "Leo")
//! }]);
//! let service = ConversationService::new(
//!     Arc::new(InMemoryConversationStore::new()),
//!     Arc::new(personas),
//!     Arc::new(ScriptedModel::always("Roar! Hello there!")),
//! );
//! let kid = Principal::new(UserId::new("kid1")?, UserRole::Student);
//! let reply = service.turn(&kid, TurnRequest::new(AnimalId::new("lion")?, "Hi Leo!")).await?;
//! assert_eq!(reply.reply, "Roar! Hello there!");
//! assert_eq!(reply.turn, 1);
//! # Ok::<_, cmz_core::Error>(())
//! # }).unwrap();
//! ```

mod config;
mod external;
mod limit;
mod locks;
pub mod prompt;
mod tombstones;

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use futures::stream::BoxStream;
use futures::{Stream, StreamExt as _};
use tokio::sync::mpsc;
use tracing::Instrument as _;

pub use config::{ConversationConfig, ModelFailurePolicy};
pub use external::ExternalTurn;
use limit::TurnLimit;
pub use limit::{TURN_LIMIT_MESSAGE, TurnLimitStatus};
use locks::{SessionLease, SessionLocks};
use tombstones::Tombstones;

use crate::access::{Action, DynAccessPolicy, OwnerOrAdminPolicy, Principal};
use crate::auth::{AuditEvent, AuditKind, AuditOutcome, DynAuditSink, DynRateLimitStore};
use crate::chat::{ChatChunk, ChatMessage, ChatRequest, DynChatModel};
use crate::error::{Error, Result};
use crate::ids::{AnimalId, SessionId, UserId};
use crate::moderation::DynModerator;
use crate::persona::DynPersonaDirectory;
use crate::store::{
    AppendOutcome, DeleteReport, DeleteScope, DynConversationStore, Page, PageRequest,
    SessionScope, TurnAppend,
};
use crate::types::{MAX_CONTENT_BYTES, Message, NewMessage, Persona, Role, Session, Usage};

/// The longest turn key accepted, in bytes.
pub const MAX_TURN_KEY_LEN: usize = 128;

/// One message from a user to an animal.
#[derive(Debug, Clone, PartialEq)]
pub struct TurnRequest {
    /// The animal spoken to.
    pub animal_id: AnimalId,
    /// What the user said.
    pub message: String,
    /// The session to continue; `None` starts a new one.
    pub session_id: Option<SessionId>,
    /// A client-chosen idempotency key: a retried request with the same key returns the
    /// stored reply without calling the model again or storing anything twice.
    pub turn_key: Option<String>,
    /// How many earlier turns the model sees (overrides the configured default).
    pub context_window: Option<usize>,
    /// Reply-token limit for this turn (overrides the configured default).
    pub max_tokens: Option<u32>,
    /// Sampling temperature for this turn (overrides the configured default).
    pub temperature: Option<f32>,
}

impl TurnRequest {
    /// A message to `animal_id` in a new session.
    pub fn new(animal_id: AnimalId, message: impl Into<String>) -> Self {
        Self {
            animal_id,
            message: message.into(),
            session_id: None,
            turn_key: None,
            context_window: None,
            max_tokens: None,
            temperature: None,
        }
    }

    /// Continues `session_id`.
    pub fn in_session(mut self, session_id: SessionId) -> Self {
        self.session_id = Some(session_id);
        self
    }

    /// Sets the idempotency key.
    pub fn with_turn_key(mut self, key: impl Into<String>) -> Self {
        self.turn_key = Some(key.into());
        self
    }

    /// Sets how many earlier turns the model sees.
    pub fn with_context_window(mut self, turns: usize) -> Self {
        self.context_window = Some(turns);
        self
    }
}

/// The outcome of a turn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TurnReply {
    /// The animal's reply.
    pub reply: String,
    /// The session, new or continued.
    pub session_id: SessionId,
    /// Whether this turn created the session.
    pub session_created: bool,
    /// The turn's ordinal in the session: `ceil(seq of the user message / 2)`, which counts
    /// turns exactly while every turn stores a reply.
    pub turn: u64,
    /// The stored user message.
    pub user_message: Message,
    /// The stored reply.
    pub assistant_message: Message,
    /// The model's token usage, when it reported any.
    pub usage: Option<Usage>,
    /// The reply is the fallback because the model failed.
    pub fallback: bool,
    /// The reply was cut short (the model failed mid-stream, the client went away, or it
    /// reached the size limit).
    pub interrupted: bool,
    /// This is the stored result of an earlier request with the same turn key.
    pub replayed: bool,
}

impl TurnReply {
    fn new(session_created: bool, user: Message, assistant: Message, replayed: bool) -> Self {
        Self {
            reply: assistant.content.clone(),
            session_id: user.session_id.clone(),
            session_created,
            turn: user.seq.div_ceil(2),
            usage: assistant.metadata.usage(),
            fallback: assistant.metadata.fallback,
            interrupted: assistant.metadata.interrupted,
            user_message: user,
            assistant_message: assistant,
            replayed,
        }
    }
}

/// An item of a streamed turn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TurnEvent {
    /// A piece of the reply, as the model produced it.
    Delta(String),
    /// The turn is stored; the last item.
    Complete(Box<TurnReply>),
}

/// A streamed turn: deltas, then the stored result.
///
/// Dropping it before the end cancels the model call; the partial reply is then stored,
/// marked `interrupted`, in the background.
pub struct TurnStream {
    /// The session, new or continued.
    pub session_id: SessionId,
    /// Whether this turn created the session.
    pub session_created: bool,
    events: BoxStream<'static, Result<TurnEvent>>,
}

impl std::fmt::Debug for TurnStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TurnStream")
            .field("session_id", &self.session_id)
            .field("session_created", &self.session_created)
            .finish_non_exhaustive()
    }
}

impl Stream for TurnStream {
    type Item = Result<TurnEvent>;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.events.poll_next_unpin(cx)
    }
}

/// A stored summary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// The summary text, now also on the session.
    pub text: String,
    /// Made without the model, because it was unavailable.
    pub fallback: bool,
}

/// Runs turns and serves conversations, enforcing the access policy on every read and write.
///
/// Cheap to clone (one `Arc`). Concurrent turns on one session run one after another in
/// this process (a per-session queue); across processes the store's sequence guard makes
/// a losing append re-read and retry, so no message is lost or interleaved either way.
#[derive(Debug, Clone)]
pub struct ConversationService {
    inner: Arc<Inner>,
}

#[derive(Debug, Clone)]
struct Inner {
    store: DynConversationStore,
    personas: DynPersonaDirectory,
    model: DynChatModel,
    policy: DynAccessPolicy,
    config: ConversationConfig,
    locks: Arc<SessionLocks>,
    tombstones: Arc<Tombstones>,
    moderator: Option<DynModerator>,
    audit: Option<DynAuditSink>,
    turn_limit: Option<TurnLimit>,
}

/// What a turn's message is, before the model runs.
#[derive(Debug)]
enum UserPart {
    /// Not stored yet.
    New(NewMessage),
    /// Stored by an earlier attempt with the same turn key that got no reply.
    Stored(Message),
}

/// A turn ready for the model.
#[derive(Debug)]
struct Prepared {
    _lease: SessionLease,
    session: Session,
    created: bool,
    persona: Persona,
    user: UserPart,
    prompt: ChatRequest,
    turn_key: Option<String>,
    /// Deletes after this generation refuse the turn's write.
    since: u64,
}

enum Prepare {
    Replay(Box<TurnReply>),
    Run(Box<Prepared>),
}

fn span(kind: &'static str, op: &'static str, session: &SessionId) -> tracing::Span {
    tracing::debug_span!("cmz.backend", kind, op, session = %session)
}

/// A 32-bit FNV-1a hash (stable across builds) of the parts, for derived session ids.
fn stable_hash(parts: &[&str]) -> u32 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for byte in part.bytes().chain(std::iter::once(0)) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    (hash ^ (hash >> 32)) as u32
}

fn reply_key(turn_key: &str) -> String {
    format!("{turn_key}#reply")
}

impl ConversationService {
    /// A service over these backends with the default config and [`OwnerOrAdminPolicy`].
    pub fn new(
        store: DynConversationStore,
        personas: DynPersonaDirectory,
        model: DynChatModel,
    ) -> Self {
        Self::with(
            store,
            personas,
            model,
            Arc::new(OwnerOrAdminPolicy),
            ConversationConfig::default(),
        )
    }

    /// A service with an explicit access policy and config.
    pub fn with(
        store: DynConversationStore,
        personas: DynPersonaDirectory,
        model: DynChatModel,
        policy: DynAccessPolicy,
        config: ConversationConfig,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                personas,
                model,
                policy,
                config,
                locks: Arc::default(),
                tombstones: Arc::default(),
                moderator: None,
                audit: None,
                turn_limit: None,
            }),
        }
    }

    /// Checks every user message with `moderator` before the model sees it. A flagged
    /// message gets a kind, in-character refusal (stored, marked `moderated`) instead of a
    /// model call, and an audit event in `audit`. When the check itself fails, the turn
    /// goes as if the model had failed (fallback or error): no unchecked message reaches
    /// the model.
    pub fn with_moderation(self, moderator: DynModerator, audit: DynAuditSink) -> Self {
        self.rebuilt(|inner| {
            inner.moderator = Some(moderator);
            inner.audit = Some(audit);
        })
    }

    /// Records bulk deletes (and moderation flags) in `audit`.
    pub fn with_audit(self, audit: DynAuditSink) -> Self {
        self.rebuilt(|inner| inner.audit = Some(audit))
    }

    /// Limits each user to `limit` model calls (turns, streamed turns and summaries) per
    /// `window`, counted in `store` so the limit holds across processes sharing it. A call
    /// over the limit fails with `rate_limit_exceeded` (and the wait until the window ends)
    /// before anything is read or stored. A `limit` of 0 counts as 1.
    pub fn with_turn_limit(self, store: DynRateLimitStore, limit: u32, window: Duration) -> Self {
        self.rebuilt(|inner| {
            inner.turn_limit = Some(TurnLimit {
                store,
                limit: limit.max(1),
                window: window.max(Duration::from_secs(1)),
            });
        })
    }

    fn rebuilt(self, change: impl FnOnce(&mut Inner)) -> Self {
        let mut inner = Arc::unwrap_or_clone(self.inner);
        change(&mut inner);
        Self {
            inner: Arc::new(inner),
        }
    }

    /// Where `principal` stands against the turn limit (read without counting), or None
    /// when there is no limit.
    pub async fn turn_limit_status(
        &self,
        principal: &Principal,
    ) -> Result<Option<TurnLimitStatus>> {
        match &self.inner.turn_limit {
            Some(limit) => Ok(Some(limit.status(principal).await?)),
            None => Ok(None),
        }
    }

    async fn count_model_call(&self, principal: &Principal) -> Result<()> {
        match &self.inner.turn_limit {
            Some(limit) => limit.hit(principal).await,
            None => Ok(()),
        }
    }

    /// The config in force.
    pub fn config(&self) -> &ConversationConfig {
        &self.inner.config
    }

    /// Runs one turn: authorize, load or create the session, build the prompt from the
    /// persona and the last turns, call the model, store both messages atomically.
    ///
    /// Errors: `validation_error` (empty or oversized message, bad turn key, window out of
    /// range, session of another animal), `not_found` (unknown animal or session),
    /// `forbidden` (another user's session), `unavailable` (store down: nothing is
    /// half-written), and the model's own error when the config says
    /// [`ModelFailurePolicy::Error`] (the user message is then kept).
    #[tracing::instrument(name = "cmz.turn", skip_all, fields(user = %principal.user_id, animal = %request.animal_id))]
    pub async fn turn(&self, principal: &Principal, request: TurnRequest) -> Result<TurnReply> {
        require_runtime()?;
        self.count_model_call(principal).await?;
        let prepared = match self.prepare(principal, request).await? {
            Prepare::Replay(reply) => return Ok(*reply),
            Prepare::Run(prepared) => *prepared,
        };
        // The model call and the write must not be cancelled by a caller that goes away
        // (a closed HTTP connection): that would lose the accepted message. A turn that
        // finishes at its first poll (an in-process model and store) is done at once;
        // anything that waits moves, already started, into its own task.
        let mut turn = Box::pin(self.clone().run_turn(prepared));
        if let std::task::Poll::Ready(result) = futures::poll!(turn.as_mut()) {
            return result;
        }
        tokio::spawn(turn.in_current_span())
            .await
            .map_err(|e| Error::Internal {
                message: "the turn task failed".into(),
                source: Some(Box::new(e)),
            })?
    }

    async fn run_turn(self, mut prepared: Prepared) -> Result<TurnReply> {
        let inner = &self.inner;
        let started = Instant::now();
        match self.moderate(&prepared).await {
            Ok(None) => {}
            Ok(Some(refusal)) => return self.persist(prepared, Some(refusal)).await,
            Err(error) => {
                tracing::warn!(code = error.code(), error = %error, "moderation failed");
                return match inner.config.on_model_failure {
                    ModelFailurePolicy::Fallback => {
                        let fallback = self.fallback_message(&prepared.persona, started.elapsed());
                        self.persist(prepared, Some(fallback)).await
                    }
                    ModelFailurePolicy::Error => {
                        self.keep_user_message(prepared).await?;
                        Err(error)
                    }
                };
            }
        }
        let result = tokio::time::timeout(
            inner.config.model_timeout,
            inner.model.complete(std::mem::take(&mut prepared.prompt)),
        )
        .instrument(span("model", "complete", &prepared.session.id))
        .await
        .unwrap_or_else(|_| Err(self.model_timeout()))
        .and_then(|completion| {
            if completion.content.trim().is_empty() {
                Err(Error::Unavailable {
                    message: format!("model {} returned an empty reply", inner.model.name()),
                    source: None,
                })
            } else {
                Ok(completion)
            }
        });
        let latency = started.elapsed();
        let assistant = match result {
            Ok(completion) => {
                let mut message = NewMessage::new(Role::Assistant, completion.content);
                message.metadata.interrupted = truncate_to_limit(&mut message.content);
                message.metadata.set_usage(completion.usage);
                message.metadata.model = completion
                    .model
                    .or_else(|| Some(inner.model.name().to_owned()));
                message.metadata.latency_ms = Some(millis(latency));
                message
            }
            Err(error) => {
                tracing::warn!(code = error.code(), error = %error, "model call failed");
                match inner.config.on_model_failure {
                    ModelFailurePolicy::Fallback => {
                        self.fallback_message(&prepared.persona, latency)
                    }
                    ModelFailurePolicy::Error => {
                        self.keep_user_message(prepared).await?;
                        return Err(error);
                    }
                }
            }
        };
        self.persist(prepared, Some(assistant)).await
    }

    /// Runs one turn, yielding the reply as the model produces it.
    ///
    /// Request errors (validation, access, unknown animal or session) come back at once.
    /// Then the stream yields [`TurnEvent::Delta`]s and ends with [`TurnEvent::Complete`]
    /// once the turn is stored. Dropping the stream early cancels the model call and stores
    /// the partial reply marked `interrupted`. Needs a tokio runtime (it spawns the task
    /// that drives the model).
    #[tracing::instrument(name = "cmz.stream_turn", skip_all, fields(user = %principal.user_id, animal = %request.animal_id))]
    pub async fn stream_turn(
        &self,
        principal: &Principal,
        request: TurnRequest,
    ) -> Result<TurnStream> {
        require_runtime()?;
        self.count_model_call(principal).await?;
        match self.prepare(principal, request).await? {
            Prepare::Replay(reply) => Ok(TurnStream {
                session_id: reply.session_id.clone(),
                session_created: false,
                events: futures::stream::iter([
                    Ok(TurnEvent::Delta(reply.reply.clone())),
                    Ok(TurnEvent::Complete(reply)),
                ])
                .boxed(),
            }),
            Prepare::Run(prepared) => {
                let session_id = prepared.session.id.clone();
                let session_created = prepared.created;
                let (tx, rx) = mpsc::channel(self.inner.config.stream_buffer.max(1));
                let service = self.clone();
                tokio::spawn(
                    async move { service.drive_stream(*prepared, tx).await }.in_current_span(),
                );
                let events = futures::stream::unfold(rx, |mut rx| async move {
                    rx.recv().await.map(|event| (event, rx))
                })
                .boxed();
                Ok(TurnStream {
                    session_id,
                    session_created,
                    events,
                })
            }
        }
    }

    async fn drive_stream(self, mut prepared: Prepared, tx: mpsc::Sender<Result<TurnEvent>>) {
        enum End {
            Completed(Option<Usage>, Option<String>),
            Failed(Error),
            Interrupted,
        }
        let inner = &self.inner;
        let timeout = inner.config.model_timeout;
        let started = Instant::now();
        let mut text = String::new();
        let model_span = span("model", "stream", &prepared.session.id);
        let moderation_failure = match self.moderate(&prepared).await {
            Ok(None) => None,
            Ok(Some(refusal)) => {
                let _ = tx.send(Ok(TurnEvent::Delta(refusal.content.clone()))).await;
                let event = self
                    .persist(prepared, Some(refusal))
                    .await
                    .map(|reply| TurnEvent::Complete(Box::new(reply)));
                let _ = tx.send(event).await;
                return;
            }
            Err(error) => Some(error),
        };
        let opened = match moderation_failure {
            // Treated like a model that failed before its first chunk.
            Some(error) => Some(Ok(Err(error))),
            None => tokio::select! {
                biased;
                () = tx.closed() => None,
                opened = tokio::time::timeout(timeout, inner.model.stream(std::mem::take(&mut prepared.prompt))).instrument(model_span.clone()) => Some(opened),
            },
        };
        let end = match opened {
            None => End::Interrupted,
            Some(Err(_)) => End::Failed(self.model_timeout()),
            Some(Ok(Err(error))) => End::Failed(error),
            Some(Ok(Ok(mut chunks))) => loop {
                let next = tokio::select! {
                    biased;
                    () = tx.closed() => break End::Interrupted,
                    next = tokio::time::timeout(timeout, chunks.next()).instrument(model_span.clone()) => next,
                };
                match next {
                    Err(_) => break End::Failed(self.model_timeout()),
                    Ok(None) => {
                        break End::Failed(Error::Unavailable {
                            message: "the model's stream ended before the reply was complete"
                                .into(),
                            source: None,
                        });
                    }
                    Ok(Some(Err(error))) => break End::Failed(error),
                    Ok(Some(Ok(ChatChunk::Done { usage, model }))) => {
                        break End::Completed(usage, model);
                    }
                    Ok(Some(Ok(ChatChunk::Delta(delta)))) => {
                        if delta.is_empty() {
                            continue;
                        }
                        let mut delta = delta;
                        let room = MAX_CONTENT_BYTES.saturating_sub(text.len());
                        let full = delta.len() >= room;
                        if full {
                            let mut cut = room;
                            while !delta.is_char_boundary(cut) {
                                cut -= 1;
                            }
                            delta.truncate(cut);
                        }
                        text.push_str(&delta);
                        // A consumer that stops reading for as long as the model may take
                        // counts as gone, so it cannot hold the session's queue forever.
                        let sent =
                            tokio::time::timeout(timeout, tx.send(Ok(TurnEvent::Delta(delta))))
                                .await;
                        if !matches!(sent, Ok(Ok(()))) {
                            break End::Interrupted;
                        }
                        if full {
                            tracing::warn!(
                                "model reply reached the stored-message size limit; cut"
                            );
                            break End::Interrupted;
                        }
                    }
                }
            },
        };
        // The model stream is dropped here (cancelling the call) before anything is stored.
        let latency = started.elapsed();
        let mut assistant = NewMessage::new(Role::Assistant, text);
        assistant.metadata.latency_ms = Some(millis(latency));
        assistant.metadata.model = Some(inner.model.name().to_owned());
        let end = match end {
            End::Completed(..) if assistant.content.trim().is_empty() => {
                End::Failed(Error::Unavailable {
                    message: format!("model {} returned an empty reply", inner.model.name()),
                    source: None,
                })
            }
            other => other,
        };
        match end {
            End::Completed(usage, model) => {
                assistant.metadata.set_usage(usage);
                if model.is_some() {
                    assistant.metadata.model = model;
                }
            }
            End::Interrupted => {
                tracing::info!("stream consumer went away; storing the partial reply");
                assistant.metadata.interrupted = true;
            }
            End::Failed(error) => {
                tracing::warn!(code = error.code(), error = %error, "model stream failed");
                match inner.config.on_model_failure {
                    // The child saw part of a reply: keep exactly that, marked as cut short.
                    ModelFailurePolicy::Fallback if !assistant.content.is_empty() => {
                        assistant.metadata.interrupted = true;
                    }
                    ModelFailurePolicy::Fallback => {
                        assistant = self.fallback_message(&prepared.persona, latency);
                        let _ = tx
                            .send(Ok(TurnEvent::Delta(assistant.content.clone())))
                            .await;
                    }
                    // Keep the user message only, so a retry with the turn key completes
                    // the turn instead of replaying a broken reply.
                    ModelFailurePolicy::Error => {
                        if let Err(store_error) = self.keep_user_message(prepared).await {
                            tracing::error!(code = store_error.code(), error = %store_error, "storing the user message failed");
                        }
                        let _ = tx.send(Err(error)).await;
                        return;
                    }
                }
            }
        }
        let event = match self.persist(prepared, Some(assistant)).await {
            Ok(reply) => Ok(TurnEvent::Complete(Box::new(reply))),
            Err(error) => {
                tracing::error!(code = error.code(), error = %error, "storing the streamed turn failed");
                Err(error)
            }
        };
        let _ = tx.send(event).await;
    }

    /// Runs the moderator, if any, on the turn's user message: `Ok(Some(refusal))` when it
    /// is flagged, `Ok(None)` when it may go to the model.
    async fn moderate(&self, prepared: &Prepared) -> Result<Option<NewMessage>> {
        let Some(moderator) = &self.inner.moderator else {
            return Ok(None);
        };
        let text = match &prepared.user {
            UserPart::New(message) => &message.content,
            UserPart::Stored(message) => &message.content,
        };
        let verdict = tokio::time::timeout(self.inner.config.model_timeout, moderator.check(text))
            .instrument(span("moderator", "check", &prepared.session.id))
            .await
            .unwrap_or_else(|_| {
                Err(Error::Timeout {
                    what: "moderation".into(),
                    after: self.inner.config.model_timeout,
                })
            })?;
        if !verdict.flagged {
            return Ok(None);
        }
        if let Some(audit) = &self.inner.audit {
            let mut event = AuditEvent::new(
                AuditKind::ContentFlagged,
                AuditOutcome::Denied,
                format!("message flagged: {}", verdict.categories.join(", ")),
            );
            event.actor = Some(prepared.session.user_id.clone());
            event.subject = Some(prepared.session.user_id.clone());
            audit.record(event).await;
        }
        let mut refusal = NewMessage::new(
            Role::Assistant,
            prompt::moderation_refusal(&prepared.persona),
        );
        refusal.metadata.moderated = true;
        Ok(Some(refusal))
    }

    fn model_timeout(&self) -> Error {
        Error::Timeout {
            what: format!("model {}", self.inner.model.name()),
            after: self.inner.config.model_timeout,
        }
    }

    fn fallback_message(&self, persona: &Persona, latency: Duration) -> NewMessage {
        let mut message = NewMessage::new(Role::Assistant, prompt::fallback_reply(persona));
        message.metadata.fallback = true;
        message.metadata.latency_ms = Some(millis(latency));
        message
    }

    fn validate(&self, request: &TurnRequest) -> Result<usize> {
        let config = &self.inner.config;
        if request.message.trim().is_empty() {
            return Err(Error::validation("message", "message must not be empty"));
        }
        let chars = request.message.chars().count();
        if chars > config.max_message_chars {
            return Err(Error::validation(
                "message",
                format!(
                    "message is {chars} characters; the limit is {}",
                    config.max_message_chars
                ),
            ));
        }
        if let Some(key) = &request.turn_key {
            if key.is_empty()
                || key.len() > MAX_TURN_KEY_LEN
                || !key
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
            {
                return Err(Error::validation(
                    "turnKey",
                    format!(
                        "turn key must be 1 to {MAX_TURN_KEY_LEN} characters of A-Z, a-z, 0-9, '-', '_', '.' and ':'"
                    ),
                ));
            }
        }
        // The bounds of the legacy API, enforced here for every front end.
        if let Some(window) = request.context_window {
            if !(1..=config.max_context_window).contains(&window) {
                return Err(Error::validation(
                    "contextWindow",
                    format!(
                        "contextWindow must be between 1 and {}",
                        config.max_context_window
                    ),
                ));
            }
        }
        if let Some(tokens) = request.max_tokens {
            if !(10..=config.max_reply_tokens).contains(&tokens) {
                return Err(Error::validation(
                    "maxTokens",
                    format!(
                        "maxTokens must be between 10 and {}",
                        config.max_reply_tokens
                    ),
                ));
            }
        }
        if let Some(temperature) = request.temperature {
            if !(0.0..=2.0).contains(&temperature) {
                return Err(Error::validation(
                    "temperature",
                    "temperature must be between 0 and 2",
                ));
            }
        }
        Ok(request.context_window.unwrap_or(config.context_window))
    }

    async fn prepare(&self, principal: &Principal, request: TurnRequest) -> Result<Prepare> {
        let inner = &self.inner;
        let since = inner.tombstones.generation();
        let window = self.validate(&request)?;
        let animal = &request.animal_id;
        let persona = inner
            .personas
            .persona(animal)
            .instrument(tracing::debug_span!("cmz.backend", kind = "personas", op = "persona", animal = %animal))
            .await?
            .filter(Persona::is_offered)
            .ok_or_else(|| Error::not_found(format!("animal {animal}")))?;

        let requested = request.session_id.is_some();
        let mut id = match (&request.session_id, &request.turn_key) {
            (Some(id), _) => id.clone(),
            // The same key finds the same session again, so a retried first turn does not
            // start a second session.
            (None, Some(key)) => SessionId::with_suffix(
                animal,
                &principal.user_id,
                stable_hash(&[principal.user_id.as_str(), animal.as_str(), key]),
            )?,
            (None, None) => SessionId::generate(animal, &principal.user_id)?,
        };
        let mut attempts = 0;
        let (lease, session, created) = loop {
            attempts += 1;
            let lease = self.lock_session(&id).await?;
            match self.get_session(&id).await? {
                Some(session) if requested || request.turn_key.is_some() => {
                    inner
                        .policy
                        .authorize(principal, Action::Write, &session.user_id)
                        .await?;
                    if &session.animal_id != animal {
                        // The legacy page keeps one session id while the child moves to
                        // another animal: that is a new conversation with this animal, under
                        // a new id (the reply's `sessionId`, which the page adopts).
                        drop(lease);
                        id = SessionId::generate(animal, &principal.user_id)?;
                        continue;
                    }
                    break (lease, session, false);
                }
                // A new random id that is already taken: draw another.
                Some(_) if attempts < 4 => id = SessionId::generate(animal, &principal.user_id)?,
                Some(_) => return Err(Error::internal("could not draw an unused session id")),
                // An unknown id is a new conversation under that id, as the legacy
                // backend did for the ids the frontend makes up (`session_<ms>`); the
                // store's guarded create keeps two callers from sharing one.
                None => {
                    inner
                        .policy
                        .authorize(principal, Action::Write, &principal.user_id)
                        .await?;
                    // Stored together with the first message, so a failed first turn
                    // leaves no empty session behind.
                    let session = Session::new(
                        id.clone(),
                        principal.user_id.clone(),
                        animal.clone(),
                        persona.name.clone(),
                    );
                    break (lease, session, true);
                }
            }
        };

        let mut user = UserPart::New({
            let mut message = NewMessage::new(Role::User, request.message);
            message.metadata.turn_key = request.turn_key.clone();
            message
        });
        if let (Some(key), false) = (&request.turn_key, created) {
            if let Some(found) = self.find_turn(&id, key).await? {
                match found.as_slice() {
                    [user_message, assistant, ..] => {
                        return Ok(Prepare::Replay(Box::new(TurnReply::new(
                            false,
                            user_message.clone(),
                            assistant.clone(),
                            true,
                        ))));
                    }
                    [user_message] => {
                        if let Some(reply) = self.find_turn(&id, &reply_key(key)).await? {
                            if let Some(assistant) = reply.into_iter().next() {
                                return Ok(Prepare::Replay(Box::new(TurnReply::new(
                                    false,
                                    user_message.clone(),
                                    assistant,
                                    true,
                                ))));
                            }
                        }
                        user = UserPart::Stored(user_message.clone());
                    }
                    [] => {}
                }
            }
        }

        let mut history = if window == 0 || created {
            Vec::new()
        } else {
            inner
                .store
                .recent_messages(&id, window * 2)
                .instrument(span("store", "recent_messages", &id))
                .await?
        };
        let content = match &user {
            UserPart::New(message) => message.content.clone(),
            UserPart::Stored(message) => {
                history.retain(|m| m.seq < message.seq);
                message.content.clone()
            }
        };
        let mut messages = Vec::with_capacity(history.len() + 2);
        messages.push(ChatMessage::new(
            Role::System,
            prompt::system_prompt(&persona),
        ));
        // Empty replies (a stream dropped before any text) carry nothing for the model,
        // and some providers reject empty assistant messages.
        messages.extend(
            history
                .into_iter()
                .filter(|m| !m.content.trim().is_empty())
                .map(|m| ChatMessage::new(m.role, m.content)),
        );
        messages.push(ChatMessage::new(Role::User, content));
        let prompt = ChatRequest {
            messages,
            max_tokens: request.max_tokens.or(inner.config.max_tokens),
            temperature: request
                .temperature
                .or(persona.temperature)
                .or(inner.config.temperature),
            model: persona.model.clone(),
        };
        Ok(Prepare::Run(Box::new(Prepared {
            _lease: lease,
            session,
            created,
            persona,
            user,
            prompt,
            turn_key: request.turn_key,
            since,
        })))
    }

    /// Stores the user message alone (unless an earlier attempt already did), so a failed
    /// turn loses nothing the user said.
    async fn keep_user_message(&self, prepared: Prepared) -> Result<()> {
        match prepared.user {
            UserPart::Stored(_) => Ok(()),
            UserPart::New(_) => self.persist(prepared, None).await.map(drop),
        }
    }

    /// Stores the turn: the user message (unless an earlier attempt stored it) and the
    /// reply, in one guarded append, re-reading and retrying when another writer won.
    async fn persist(
        &self,
        prepared: Prepared,
        assistant: Option<NewMessage>,
    ) -> Result<TurnReply> {
        let Prepared {
            session,
            created,
            user,
            turn_key,
            since,
            ..
        } = prepared;
        let (messages, key, stored_user) = match user {
            UserPart::New(user) => {
                let mut messages = vec![user];
                messages.extend(assistant);
                (messages, turn_key, None)
            }
            UserPart::Stored(user) => match assistant {
                Some(assistant) => (
                    vec![assistant],
                    turn_key.as_deref().map(reply_key),
                    Some(user),
                ),
                None => return Err(Error::internal("nothing to store for a resumed turn")),
            },
        };
        // A delete of this session or its user since the turn began wins: store nothing.
        let not_deleted = self.inner.tombstones.write_guard(since, &session).await?;
        let appended = self.append_guarded(&session, created, messages, key).await;
        drop(not_deleted);
        let stored = match appended? {
            AppendOutcome::Appended(stored) => stored,
            AppendOutcome::Duplicate(stored) => {
                // Another server stored this turn key first; answer with its turn.
                return match (stored_user, stored.as_slice()) {
                    (Some(user), [assistant, ..]) => {
                        Ok(TurnReply::new(created, user, assistant.clone(), true))
                    }
                    (None, [user, assistant, ..]) => Ok(TurnReply::new(
                        created,
                        user.clone(),
                        assistant.clone(),
                        true,
                    )),
                    _ => Err(Error::conflict(
                        "this turn is being stored by another request; retry it",
                    )),
                };
            }
        };
        let mut stored = stored.into_iter();
        let (user, assistant) = match stored_user {
            Some(user) => (Some(user), stored.next()),
            None => (stored.next(), stored.next()),
        };
        match (user, assistant) {
            (Some(user), Some(assistant)) => Ok(TurnReply::new(created, user, assistant, false)),
            // Only the user message was stored (model error mode); the caller returns the error.
            (Some(user), None) => Ok(TurnReply::new(created, user.clone(), user, false)),
            _ => Err(Error::internal(
                "the store returned fewer messages than were appended",
            )),
        }
    }

    /// Appends `messages` to `session` under the store's sequence guard, creating the
    /// session in the same step when `created`; on a lost race re-reads the session and
    /// tries again (up to `max_append_attempts`). The one retry loop for every write.
    async fn append_guarded(
        &self,
        session: &Session,
        created: bool,
        messages: Vec<NewMessage>,
        key: Option<String>,
    ) -> Result<AppendOutcome> {
        let inner = &self.inner;
        let mut expected = session.message_count;
        let mut new_session = created.then(|| session.clone());
        let mut attempt = 0;
        loop {
            attempt += 1;
            let append = TurnAppend {
                session_id: session.id.clone(),
                expected_count: expected,
                messages: messages.clone(),
                turn_key: key.clone(),
                new_session: new_session.clone(),
            };
            match inner
                .store
                .append_turn(append)
                .instrument(span("store", "append_turn", &session.id))
                .await
            {
                Ok(outcome) => return Ok(outcome),
                Err(Error::Conflict { .. }) if attempt < inner.config.max_append_attempts => {
                    tracing::debug!(attempt, "sequence conflict; re-reading the session");
                    let backoff = Duration::from_millis(fastrand::u64(1..=5) * u64::from(attempt));
                    tokio::time::sleep(backoff).await;
                    // The session may have been created (or deleted) meanwhile.
                    match self.get_session(&session.id).await? {
                        // Someone else created the session this turn meant to create
                        // (another server, a client-chosen id): never write into theirs.
                        Some(current) if current.user_id != session.user_id => {
                            return Err(Error::forbidden(format!(
                                "session {} belongs to another user",
                                session.id
                            )));
                        }
                        Some(current) if current.animal_id != session.animal_id => {
                            return Err(Error::validation(
                                "animalId",
                                format!(
                                    "session {} is a conversation with another animal",
                                    session.id
                                ),
                            ));
                        }
                        Some(current) => {
                            expected = current.message_count;
                            new_session = None;
                        }
                        None if new_session.is_some() => {}
                        None => return Err(Error::not_found(format!("session {}", session.id))),
                    }
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// Waits for the session's in-process queue, bounded so a stuck turn cannot block the
    /// session forever.
    async fn lock_session(&self, id: &SessionId) -> Result<SessionLease> {
        let limit = self.inner.config.model_timeout.saturating_mul(2) + Duration::from_secs(5);
        tokio::time::timeout(limit, self.inner.locks.lock(id))
            .await
            .map_err(|_| {
                Error::conflict(format!(
                    "another turn in session {id} is still running; retry later"
                ))
            })
    }

    async fn get_session(&self, id: &SessionId) -> Result<Option<Session>> {
        self.inner
            .store
            .get_session(id)
            .instrument(span("store", "get_session", id))
            .await
    }

    async fn find_turn(&self, id: &SessionId, key: &str) -> Result<Option<Vec<Message>>> {
        self.inner
            .store
            .find_turn(id, key)
            .instrument(span("store", "find_turn", id))
            .await
    }

    /// Reads a session the principal may see; `not_found` if it does not exist.
    async fn readable_session(
        &self,
        principal: &Principal,
        id: &SessionId,
        action: Action,
    ) -> Result<Session> {
        let session = self
            .get_session(id)
            .await?
            .ok_or_else(|| Error::not_found(format!("session {id}")))?;
        self.inner
            .policy
            .authorize(principal, action, &session.user_id)
            .await?;
        Ok(session)
    }

    /// A session's details.
    #[tracing::instrument(name = "cmz.session", skip_all, fields(user = %principal.user_id, session = %id))]
    pub async fn session(&self, principal: &Principal, id: &SessionId) -> Result<Session> {
        self.readable_session(principal, id, Action::Read).await
    }

    /// Keeps an external thread id with a session (the legacy `store_thread_id`); the
    /// caller must be allowed to write to the session.
    #[tracing::instrument(name = "cmz.set_thread_id", skip_all, fields(user = %principal.user_id, session = %id))]
    pub async fn set_thread_id(
        &self,
        principal: &Principal,
        id: &SessionId,
        thread_id: &str,
    ) -> Result<()> {
        if thread_id.is_empty() || thread_id.len() > 256 || thread_id.chars().any(char::is_control)
        {
            return Err(Error::validation(
                "threadId",
                "threadId must be 1 to 256 characters without control characters",
            ));
        }
        self.readable_session(principal, id, Action::Write).await?;
        self.inner
            .store
            .set_thread_id(id, thread_id)
            .instrument(span("store", "set_thread_id", id))
            .await
    }

    /// A page of a session's messages, oldest first.
    #[tracing::instrument(name = "cmz.history", skip_all, fields(user = %principal.user_id, session = %id))]
    pub async fn history(
        &self,
        principal: &Principal,
        id: &SessionId,
        page: PageRequest,
    ) -> Result<Page<Message>> {
        self.readable_session(principal, id, Action::Read).await?;
        self.inner
            .store
            .history(id, page)
            .instrument(span("store", "history", id))
            .await
    }

    /// A page of sessions, newest activity first.
    ///
    /// A user's listing needs read access to that user; an animal's listing spans all users
    /// and needs [`AccessPolicy::authorize_all`](crate::access::AccessPolicy::authorize_all)
    /// (administrators).
    #[tracing::instrument(name = "cmz.list_sessions", skip_all, fields(user = %principal.user_id))]
    pub async fn list_sessions(
        &self,
        principal: &Principal,
        scope: SessionScope,
        page: PageRequest,
    ) -> Result<Page<Session>> {
        let inner = &self.inner;
        match &scope {
            SessionScope::User(owner) => {
                inner
                    .policy
                    .authorize(principal, Action::Read, owner)
                    .await?
            }
            // An animal's listing spans every user: only roles that may read everyone's.
            SessionScope::Animal(_) => inner.policy.authorize_all(principal, Action::Read).await?,
        }
        let listed = inner
            .store
            .list_sessions(scope, page)
            .instrument(tracing::debug_span!(
                "cmz.backend",
                kind = "store",
                op = "list_sessions"
            ))
            .await?;
        Ok(listed)
    }

    /// Deletes conversations. One session or one user's sessions need delete access to
    /// their owner; all of an animal's, or everything older than a date, need an admin-like
    /// role.
    pub async fn delete(&self, principal: &Principal, scope: DeleteScope) -> Result<DeleteReport> {
        self.delete_with_reason(principal, scope, None).await
    }

    /// [`delete`](Self::delete), recording `reason` (the caller's, for example a GDPR
    /// request number) in the audit event every delete writes.
    #[tracing::instrument(name = "cmz.delete", skip_all, fields(user = %principal.user_id, scope = ?scope))]
    pub async fn delete_with_reason(
        &self,
        principal: &Principal,
        scope: DeleteScope,
        reason: Option<&str>,
    ) -> Result<DeleteReport> {
        let inner = &self.inner;
        match &scope {
            DeleteScope::Session(id) => {
                self.readable_session(principal, id, Action::Delete).await?;
            }
            DeleteScope::User(owner) => {
                inner
                    .policy
                    .authorize(principal, Action::Delete, owner)
                    .await?
            }
            DeleteScope::Animal(_) | DeleteScope::OlderThan(_) => {
                inner
                    .policy
                    .authorize_all(principal, Action::Delete)
                    .await?;
            }
        }
        // Turns already running on these conversations must not write them back.
        inner.tombstones.record(&scope).await;
        let report = inner
            .store
            .delete(scope.clone())
            .instrument(tracing::debug_span!(
                "cmz.backend",
                kind = "store",
                op = "delete"
            ))
            .await?;
        tracing::info!(
            sessions = report.sessions,
            messages = report.messages,
            "conversations deleted"
        );
        if let Some(audit) = &inner.audit {
            let mut event = AuditEvent::new(
                AuditKind::BulkAccess(Action::Delete),
                AuditOutcome::Allowed,
                format!(
                    "delete {scope:?}: {} sessions, {} messages; reason: {}",
                    report.sessions,
                    report.messages,
                    reason.unwrap_or("(none given)")
                ),
            );
            event.actor = Some(principal.user_id.clone());
            event.actor_role = Some(principal.role);
            audit.record(event).await;
        }
        Ok(report)
    }

    /// Whether the conversation store answers (one cheap read), for health checks.
    pub async fn store_is_reachable(&self) -> bool {
        match SessionId::new("health_check") {
            Ok(probe) => self.get_session(&probe).await.is_ok(),
            Err(_) => false,
        }
    }

    /// Writes a summary of a session with the model and stores it on the session; when the
    /// model is unavailable, stores a deterministic summary instead (marked `fallback`).
    #[tracing::instrument(name = "cmz.summarize", skip_all, fields(user = %principal.user_id, session = %id))]
    pub async fn summarize(&self, principal: &Principal, id: &SessionId) -> Result<Summary> {
        self.count_model_call(principal).await?;
        let inner = &self.inner;
        let session = self.readable_session(principal, id, Action::Read).await?;
        let recent = inner
            .store
            .recent_messages(id, 40)
            .instrument(span("store", "recent_messages", id))
            .await?;
        let mut transcript = String::new();
        for message in &recent {
            let who = if message.role == Role::User {
                "Visitor"
            } else {
                session.animal_name.as_str()
            };
            transcript.push_str(&format!("{who}: {}\n", message.content));
        }
        let request = ChatRequest {
            messages: vec![
                ChatMessage::new(Role::System, prompt::summary_instruction(&session)),
                ChatMessage::new(Role::User, transcript),
            ],
            max_tokens: Some(150),
            temperature: Some(0.2),
            model: None,
        };
        let result = if recent.is_empty() {
            None
        } else {
            let called =
                tokio::time::timeout(inner.config.model_timeout, inner.model.complete(request))
                    .instrument(span("model", "complete", id))
                    .await;
            match called {
                Ok(Ok(completion)) if !completion.content.trim().is_empty() => {
                    Some(completion.content)
                }
                Ok(Ok(_)) => None,
                Ok(Err(error)) => {
                    tracing::warn!(code = error.code(), error = %error, "summary model call failed");
                    None
                }
                Err(_) => {
                    tracing::warn!("summary model call timed out");
                    None
                }
            }
        };
        let summary = match result {
            Some(text) => Summary {
                text,
                fallback: false,
            },
            None => {
                let first = inner
                    .store
                    .history(id, PageRequest::first(2))
                    .instrument(span("store", "history", id))
                    .await?;
                Summary {
                    text: prompt::fallback_summary(&session, &first.items),
                    fallback: true,
                }
            }
        };
        // Readers (a parent, an admin) get the summary; only the owner's is stored, as
        // nobody else writes into a conversation.
        if principal.user_id != session.user_id {
            return Ok(summary);
        }
        inner
            .store
            .set_summary(id, &summary.text)
            .instrument(span("store", "set_summary", id))
            .await?;
        Ok(summary)
    }

    /// The sessions of `owner` (a convenience over [`list_sessions`](Self::list_sessions)).
    pub async fn sessions_of(
        &self,
        principal: &Principal,
        owner: &UserId,
        page: PageRequest,
    ) -> Result<Page<Session>> {
        self.list_sessions(principal, SessionScope::User(owner.clone()), page)
            .await
    }
}

fn require_runtime() -> Result<()> {
    tokio::runtime::Handle::try_current()
        .map(drop)
        .map_err(|_| Error::internal("cmz turns need a tokio runtime"))
}

/// Cuts `text` to the stored-message limit at a character boundary; true if it was cut.
fn truncate_to_limit(text: &mut String) -> bool {
    if text.len() <= MAX_CONTENT_BYTES {
        return false;
    }
    let mut cut = MAX_CONTENT_BYTES;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    text.truncate(cut);
    true
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests;
