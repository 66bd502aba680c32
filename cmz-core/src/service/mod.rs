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

mod animals;
mod budget;
mod care;
mod config;
mod context;
mod export;
mod external;
mod limit;
mod locks;
mod persist;
mod prepare;
mod privacy;
pub mod prompt;
mod reads;
mod request;
mod resume;
mod rolling;
mod stream;
mod summary;
mod tombstones;

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use futures::stream::BoxStream;
use futures::{Stream, StreamExt as _};
use tokio::sync::mpsc;
use tracing::Instrument as _;

pub use budget::{BUDGET_MESSAGE, BudgetExceeded, BudgetScope, BudgetStatus, Budgets};
pub use care::{
    MAX_REPORT_DAYS, NO_MODEL, Quota, ReviewContext, USAGE_FORGET_DAYS, UsageGrouping, UsageReport,
    UsageReportRow,
};
pub use config::{ConversationConfig, ModelFailurePolicy};
pub use export::{ExportFormat, ExportItem, ExportRange, ExportWriter};
pub use external::ExternalTurn;
use limit::TurnLimit;
pub use limit::{TURN_LIMIT_MESSAGE, TurnLimitStatus, turn_limit_key};
use locks::{SessionLease, SessionLocks};
pub use request::{MAX_TURN_KEY_LEN, Summary, TurnEvent, TurnReply, TurnRequest, TurnStream};
pub use resume::{EventNumber, ResumableStream, StreamItem};
use tombstones::Tombstones;

use crate::access::{Action, DynAccessPolicy, OwnerOrAdminPolicy, Principal};
use crate::auth::{AuditEvent, AuditKind, AuditOutcome, DynAuditSink, DynRateLimitStore};
use crate::chat::{ChatChunk, ChatMessage, ChatRequest, DynChatModel, Priority};
use crate::error::{Error, Result};
use crate::ids::{AnimalId, SessionId, UserId};
use crate::moderation::{DynModerator, ModerationLevel, ModerationVerdict};
use crate::persona::{DynPersonaDirectory, PersonaDirectoryExt as _};
use crate::store::{
    AppendOutcome, DeleteReport, DeleteScope, DynConversationStore, Page, PageRequest,
    SessionScope, TurnAppend,
};
use crate::types::{MAX_CONTENT_BYTES, Message, NewMessage, Persona, Role, Session, Usage};

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
    budgets: Option<budget::BudgetLimits>,
    care: Option<crate::care::DynCareStore>,
    folds: Arc<rolling::Folds>,
    counts: Arc<context::TokenCounts>,
    streams: Arc<resume::Streams>,
    mirror: Option<crate::relay::DynStreamMirror>,
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
struct ReadyTurn {
    _lease: SessionLease,
    session: Session,
    created: bool,
    /// The persona's name (its prompt is built; fallbacks and refusals need the name).
    persona_name: String,
    user: UserPart,
    prompt: ChatRequest,
    turn_key: Option<String>,
    /// Deletes after this generation refuse the turn's write (in this process).
    since: u64,
    /// The client's context summary, moderated with the message.
    context_summary: Option<String>,
    /// The moderation this turn gets (the request's, never below the configured level).
    moderation: ModerationLevel,
    /// Deletes at or after this instant refuse the turn's write (in the store, across
    /// processes).
    began_at: chrono::DateTime<chrono::Utc>,
    /// The turns to fold into the running summary once this turn is stored.
    fold: Option<context::FoldPlan>,
    /// The kinds of personal details taken out of the message (and context summary).
    redacted: Vec<crate::privacy::PiiKind>,
    /// The deployment blocks such messages: the reply is the persona's reminder.
    privacy_block: bool,
    /// The budget reservation, the caller's family and turn-limit standing.
    costs: care::TurnCosts,
}

enum TurnStart {
    Replay(Box<TurnReply>),
    Run(Box<ReadyTurn>),
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
                // Every store call is traced in one place (`cmz.backend`, kind "store").
                store: Arc::new(crate::traced::TracedStore::new(store)),
                personas,
                model,
                policy,
                locks: Arc::default(),
                tombstones: Arc::default(),
                moderator: None,
                audit: None,
                turn_limit: None,
                budgets: None,
                care: None,
                folds: Arc::default(),
                streams: Arc::default(),
                mirror: None,
                counts: Arc::new(context::TokenCounts::new(config.tokenizer)),
                config,
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

    async fn count_model_call(&self, principal: &Principal) -> Result<Option<TurnLimitStatus>> {
        match &self.inner.turn_limit {
            Some(limit) => limit.hit(principal).await.map(Some),
            None => Ok(None),
        }
    }

    /// Prepares a turn that counted against the turn limit (`standing`), and reserves its
    /// tokens in the budgets before anything calls the model.
    async fn start(
        &self,
        principal: &Principal,
        request: TurnRequest,
        standing: Option<TurnLimitStatus>,
    ) -> Result<TurnStart> {
        let mut prepared = match self.prepare(principal, request).await? {
            TurnStart::Run(prepared) => prepared,
            replay => return Ok(replay),
        };
        prepared.costs.turn_limit = standing;
        self.reserve_budget(principal, &mut prepared).await?;
        Ok(TurnStart::Run(prepared))
    }

    /// The config in force.
    pub fn config(&self) -> &ConversationConfig {
        &self.inner.config
    }

    /// Runs one turn: authorize, load or create the session, build the prompt from the
    /// persona and the last turns, call the model, store both messages atomically.
    ///
    /// The session is `request.session_id`'s when the caller owns it and it is with the
    /// same animal; an id nobody has used starts a session under that id (the legacy
    /// frontend makes them up); someone else's session, or the caller's own with another
    /// animal, starts a new session under a new id and leaves that one unread and
    /// unchanged. The reply's `session_id` and `session_created` say which happened.
    ///
    /// Errors: `validation_error` (empty or oversized message, bad turn key, window out of
    /// range), `not_found` (unknown animal), `forbidden` (a caller who may not start
    /// conversations), `unavailable` (store down: nothing is half-written), and the
    /// model's own error when the config says [`ModelFailurePolicy::Error`] (the user
    /// message is then kept).
    #[tracing::instrument(name = "cmz.turn", skip_all, fields(user = %principal.user_id, animal = %request.animal_id))]
    pub async fn turn(&self, principal: &Principal, request: TurnRequest) -> Result<TurnReply> {
        require_runtime()?;
        let standing = self.count_model_call(principal).await?;
        let prepared = match self.start(principal, request, standing).await? {
            TurnStart::Replay(reply) => return Ok(*reply),
            TurnStart::Run(prepared) => prepared,
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
            .map_err(|e| Error::internal("the turn task failed").with_source(e))?
    }

    async fn run_turn(self, mut prepared: Box<ReadyTurn>) -> Result<TurnReply> {
        let inner = &self.inner;
        let started = Instant::now();
        // The refused and failed endings are boxed where they are awaited: they are rare,
        // and inline they would size this future (moved whole into its box on every
        // turn) by their own larger state.
        match self.moderate(&prepared).await {
            Ok(None) => {}
            Ok(Some(refusal)) => return Box::pin(self.finish_refused(prepared, refusal)).await,
            Err(error) => {
                return Box::pin(self.finish_failed(prepared, error, None, started)).await;
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
                Err(self.empty_reply())
            } else {
                Ok(completion)
            }
        });
        let completion = match result {
            Ok(completion) => completion,
            Err(error) => {
                return Box::pin(self.finish_failed(prepared, error, None, started)).await;
            }
        };
        let mut message = NewMessage::new(Role::Assistant, completion.content);
        message.metadata.interrupted = truncate_to_limit(&mut message.content);
        message.metadata.set_usage(completion.usage);
        message.metadata.model = completion
            .model
            .or_else(|| Some(inner.model.name().to_owned()));
        message.metadata.latency_ms = Some(millis(started.elapsed()));
        self.finish(prepared, message, started).await
    }

    /// Stores a reply the model produced, after the strict level's check of it: the one
    /// way a turn that reached the model ends well.
    async fn finish(
        &self,
        prepared: Box<ReadyTurn>,
        reply: NewMessage,
        started: Instant,
    ) -> Result<TurnReply> {
        match self.screen_reply(&prepared, &reply.content).await {
            Ok(None) => self.persist(prepared, Some(reply)).await,
            Ok(Some((mut refusal, verdict))) => {
                // The model did produce the refused reply: what it reported spending
                // counts in the usage counters and the budgets.
                refusal.metadata.set_usage(reply.metadata.usage());
                refusal.metadata.model = reply.metadata.model;
                Box::pin(self.finish_refused(prepared, (refusal, verdict))).await
            }
            Err(error) => Box::pin(self.finish_failed(prepared, error, None, started)).await,
        }
    }

    /// The one failure policy, for a model or moderation call that failed: with
    /// [`ModelFailurePolicy::Fallback`] the in-character fallback is stored (or, when the
    /// child already saw part of a streamed reply, exactly that part, marked interrupted);
    /// with [`ModelFailurePolicy::Error`] the user message is kept alone (so a retry with
    /// the turn key completes the turn) and the error returned.
    async fn finish_failed(
        &self,
        prepared: Box<ReadyTurn>,
        error: Error,
        seen: Option<NewMessage>,
        started: Instant,
    ) -> Result<TurnReply> {
        tracing::warn!(code = error.code().as_str(), error = %error.report(), "model call failed");
        match self.inner.config.on_model_failure {
            ModelFailurePolicy::Fallback => {
                let reply = match seen {
                    Some(mut seen) if !seen.content.is_empty() => {
                        seen.metadata.interrupted = true;
                        seen
                    }
                    _ => self.fallback_message(&prepared.persona_name, started.elapsed()),
                };
                self.persist(prepared, Some(reply)).await
            }
            ModelFailurePolicy::Error => {
                self.keep_user_message(prepared).await?;
                Err(error)
            }
        }
    }

    /// Stores the persona's refusal in place of a flagged message or reply, with the
    /// verdict in the answer.
    async fn finish_refused(
        &self,
        prepared: Box<ReadyTurn>,
        (refusal, verdict): (NewMessage, ModerationVerdict),
    ) -> Result<TurnReply> {
        let mut reply = self.persist(prepared, Some(refusal)).await?;
        reply.moderation = verdict;
        Ok(reply)
    }

    /// Runs the moderator, if any, on the turn's user message and the client's context
    /// summary: `Ok(Some(refusal))` when either is flagged, `Ok(None)` when they may go to
    /// the model.
    async fn moderate(
        &self,
        prepared: &ReadyTurn,
    ) -> Result<Option<(NewMessage, ModerationVerdict)>> {
        if prepared.privacy_block {
            let mut reminder = NewMessage::new(
                Role::Assistant,
                prompt::privacy_reminder_from(&prepared.persona_name),
            );
            reminder.metadata.redacted = privacy::kind_names(&prepared.redacted);
            return Ok(Some((reminder, ModerationVerdict::default())));
        }
        let message = match &prepared.user {
            UserPart::New(message) => &message.content,
            UserPart::Stored(message) => &message.content,
        };
        let texts = std::iter::once(message.as_str()).chain(prepared.context_summary.as_deref());
        for text in texts {
            if let Some(refusal) = self.check(prepared, text, "message flagged").await? {
                return Ok(Some(refusal));
            }
        }
        Ok(None)
    }

    /// At the strict level, checks the model's reply before anyone sees it.
    async fn screen_reply(
        &self,
        prepared: &ReadyTurn,
        reply: &str,
    ) -> Result<Option<(NewMessage, ModerationVerdict)>> {
        if !prepared.moderation.checks_replies() || reply.trim().is_empty() {
            return Ok(None);
        }
        self.check(prepared, reply, "reply flagged").await
    }

    async fn check(
        &self,
        prepared: &ReadyTurn,
        text: &str,
        what: &str,
    ) -> Result<Option<(NewMessage, ModerationVerdict)>> {
        let Some(moderator) = &self.inner.moderator else {
            return Ok(None);
        };
        let timeout = self.inner.config.model_timeout;
        let verdict = tokio::time::timeout(timeout, moderator.check(text))
            .instrument(span("moderator", "check", &prepared.session.id))
            .await
            .unwrap_or_else(|_| Err(Error::timeout("moderation", timeout)))?;
        if !verdict.flagged {
            return Ok(None);
        }
        if let Some(audit) = &self.inner.audit {
            let mut event = AuditEvent::new(
                AuditKind::ContentFlagged,
                AuditOutcome::Denied,
                format!("{what}: {}", verdict.categories.join(", ")),
            );
            event.actor = Some(prepared.session.user_id.clone());
            event.subject = Some(prepared.session.user_id.clone());
            audit.record(event).await;
        }
        let mut refusal = NewMessage::new(
            Role::Assistant,
            prompt::moderation_refusal_from(&prepared.persona_name),
        );
        refusal.metadata.moderated = true;
        Ok(Some((refusal, verdict)))
    }

    fn empty_reply(&self) -> Error {
        Error::Unavailable {
            message: format!("model {} returned an empty reply", self.inner.model.name()),
            source: None,
        }
    }

    fn model_timeout(&self) -> Error {
        Error::timeout(
            format!("model {}", self.inner.model.name()),
            self.inner.config.model_timeout,
        )
    }

    fn fallback_message(&self, persona_name: &str, latency: Duration) -> NewMessage {
        let mut message =
            NewMessage::new(Role::Assistant, prompt::fallback_reply_from(persona_name));
        message.metadata.fallback = true;
        message.metadata.latency_ms = Some(millis(latency));
        message
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
mod care_tests;
#[cfg(test)]
mod resume_tests;
#[cfg(test)]
mod tests;
