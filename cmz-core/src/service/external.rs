//! Writes and reads the front ends need beside the turn itself: a turn whose reply was
//! produced elsewhere, an empty session, the last messages. Each applies the access policy
//! here, once, so no front end needs the raw store.

use futures::{StreamExt as _, TryStreamExt as _};

use super::{ConversationService, TurnReply};
use crate::access::{Action, Principal};
use crate::error::{Error, Result};
use crate::ids::{AnimalId, SessionId};
use crate::store::AppendOutcome;
use crate::types::{Message, MessageMetadata, NewMessage, Role, Session};

/// A turn whose reply was produced outside cmz (another model, a legacy service), to be
/// stored as it is: no model call.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct ExternalTurn {
    /// The animal the conversation is with.
    pub animal_id: AnimalId,
    /// The session to append to; `None` starts a new one for the caller.
    pub session_id: Option<SessionId>,
    /// What the user said.
    pub user_message: String,
    /// The reply.
    pub reply: String,
    /// Stored with the reply (see [`MessageMetadata::from_caller`] for free-form maps).
    pub metadata: MessageMetadata,
    /// An idempotency key: storing the same key twice stores the turn once.
    pub turn_key: Option<String>,
}

impl ExternalTurn {
    /// A turn with `animal_id`, in a new session.
    pub fn new(
        animal_id: AnimalId,
        user_message: impl Into<String>,
        reply: impl Into<String>,
    ) -> Self {
        Self {
            animal_id,
            session_id: None,
            user_message: user_message.into(),
            reply: reply.into(),
            metadata: MessageMetadata::default(),
            turn_key: None,
        }
    }

    /// Appends to session `id` instead of starting one.
    pub fn in_session(mut self, id: SessionId) -> Self {
        self.session_id = Some(id);
        self
    }

    /// Stores `metadata` with the reply.
    pub fn with_metadata(mut self, metadata: MessageMetadata) -> Self {
        self.metadata = metadata;
        self
    }

    /// Sets the idempotency key.
    pub fn with_turn_key(mut self, key: impl Into<String>) -> Self {
        self.turn_key = Some(key.into());
        self
    }
}

impl ConversationService {
    /// Stores a turn produced elsewhere: the user message and the reply, sharing one
    /// timestamp, atomically, in the turn's session (which the caller must be allowed to
    /// write to, and which must be with the same animal) or in a new session of the
    /// caller's. Races with other writers are retried like a turn's.
    #[tracing::instrument(name = "cmz.store_turn", skip_all, fields(user = %principal.user_id, animal = %turn.animal_id))]
    pub async fn store_turn(&self, principal: &Principal, turn: ExternalTurn) -> Result<TurnReply> {
        let began_at = chrono::Utc::now();
        let (session, created) = match &turn.session_id {
            Some(id) => {
                let session = self.readable_session(principal, id, Action::Write).await?;
                if session.animal_id != turn.animal_id {
                    return Err(Error::validation(
                        "animalId",
                        format!("session {id} is a conversation with another animal"),
                    ));
                }
                (session, false)
            }
            None => (
                self.new_session(principal, &turn.animal_id, None).await?,
                true,
            ),
        };
        let _lease = self.lock_session(&session.id).await?;
        // A turn made elsewhere is stored like one of ours: without personal details.
        let (text, redacted) = self.redact(turn.user_message);
        if !redacted.is_empty() {
            self.audit_redaction(principal, &redacted).await;
        }
        let mut user = NewMessage::new(Role::User, text);
        user.metadata.turn_key = turn.turn_key.clone();
        user.metadata.redacted = super::privacy::kind_names(&redacted);
        let mut assistant = NewMessage::new(Role::Assistant, turn.reply);
        assistant.created_at = user.created_at;
        assistant.metadata = turn.metadata;
        assistant.metadata.turn_key = turn.turn_key.clone();
        // The count read before the lock may be stale; the guard re-reads it on conflict.
        let outcome = self
            .append_guarded(
                &session,
                created,
                vec![user, assistant],
                turn.turn_key,
                began_at,
            )
            .await?;
        let (replayed, stored) = match outcome {
            AppendOutcome::Appended(stored) => (false, stored),
            AppendOutcome::Duplicate(stored) => (true, stored),
        };
        match <[Message; 2]>::try_from(stored) {
            Ok([user, assistant]) => Ok(TurnReply::new(created, user, assistant, replayed)),
            Err(_) => Err(Error::conflict(
                "this turn key belongs to a turn of another shape; use a new key",
            )),
        }
    }

    /// Creates an empty session of the caller's with `animal_id`. Its `animal_name` is
    /// `animal_name`, else the persona's name, else the animal id.
    #[tracing::instrument(name = "cmz.create_session", skip_all, fields(user = %principal.user_id, animal = %animal_id))]
    pub async fn create_session(
        &self,
        principal: &Principal,
        animal_id: &AnimalId,
        animal_name: Option<String>,
    ) -> Result<Session> {
        let session = self.new_session(principal, animal_id, animal_name).await?;
        self.inner.store.create_session(&session).await?;
        Ok(session)
    }

    /// A new session of the caller's (not stored yet), after the policy allowed the caller
    /// to write their own conversations.
    async fn new_session(
        &self,
        principal: &Principal,
        animal_id: &AnimalId,
        animal_name: Option<String>,
    ) -> Result<Session> {
        self.inner
            .policy
            .authorize(principal, Action::Write, &principal.user_id)
            .await?;
        let name = match animal_name {
            Some(name) => name,
            None => self
                .inner
                .personas
                .persona(animal_id)
                .await?
                .map_or_else(|| animal_id.to_string(), |p| p.name),
        };
        let id = SessionId::generate(animal_id, &principal.user_id)?;
        Ok(Session::new(
            id,
            principal.user_id.clone(),
            animal_id.clone(),
            name,
        ))
    }

    /// The last `limit` messages of a session the caller may read, oldest first.
    #[tracing::instrument(name = "cmz.recent", skip_all, fields(user = %principal.user_id, session = %id))]
    pub async fn recent(
        &self,
        principal: &Principal,
        id: &SessionId,
        limit: usize,
    ) -> Result<Vec<Message>> {
        self.readable_session(principal, id, Action::Read).await?;
        self.inner.store.recent_messages(id, limit).await
    }

    /// The last message of each of `sessions` (`None` for an empty one), for listings:
    /// the caller must be allowed to read every owner among them (checked once per owner,
    /// then one query per session, at most 8 at a time).
    pub async fn last_messages(
        &self,
        principal: &Principal,
        sessions: &[Session],
    ) -> Result<Vec<Option<Message>>> {
        let mut owners: Vec<&crate::ids::UserId> = sessions.iter().map(|s| &s.user_id).collect();
        owners.sort();
        owners.dedup();
        for owner in owners {
            self.inner
                .policy
                .authorize(principal, Action::Read, owner)
                .await?;
        }
        let store = self.inner.store.clone();
        let ids: Vec<SessionId> = sessions.iter().map(|s| s.id.clone()).collect();
        futures::stream::iter(ids)
            .map(move |id| {
                let store = store.clone();
                async move {
                    let mut recent = store.recent_messages(&id, 1).await?;
                    Ok::<_, Error>(recent.pop())
                }
            })
            .buffered(8)
            .try_collect()
            .await
    }
}
