//! Storing a turn: the guarded append every write goes through, and the session queue.

use super::*;

impl ConversationService {
    /// Stores the user message alone (unless an earlier attempt already did), so a failed
    /// turn loses nothing the user said.
    pub(super) async fn keep_user_message(&self, prepared: Box<ReadyTurn>) -> Result<()> {
        match prepared.user {
            UserPart::Stored(_) => Ok(()),
            UserPart::New(_) => self.persist(prepared, None).await.map(drop),
        }
    }

    /// Stores the turn: the user message (unless an earlier attempt stored it) and the
    /// reply, in one guarded append, re-reading and retrying when another writer won.
    pub(super) async fn persist(
        &self,
        prepared: Box<ReadyTurn>,
        assistant: Option<NewMessage>,
    ) -> Result<TurnReply> {
        let ReadyTurn {
            session,
            created,
            user,
            turn_key,
            since,
            began_at,
            fold,
            costs,
            ..
        } = *prepared;
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
        let appended = self
            .append_guarded(&session, created, messages, key, began_at)
            .await;
        drop(not_deleted);
        let stored = match appended? {
            AppendOutcome::Appended(stored) => {
                if let Some(plan) = fold {
                    self.schedule_fold(&session.id, plan, costs.family.clone());
                }
                stored
            }
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
            (Some(user), Some(assistant)) => {
                let mut reply = TurnReply::new(created, user, assistant, false);
                self.account_turn(&session, costs, &mut reply).await;
                Ok(reply)
            }
            // Only the user message was stored (model error mode); the caller returns the error.
            (Some(user), None) => Ok(TurnReply::new(created, user.clone(), user, false)),
            _ => Err(Error::internal(
                "the store returned fewer messages than were appended",
            )),
        }
    }

    /// Appends `messages` to `session` under the store's sequence guard, creating the
    /// session in the same step when `created`; on a lost race re-reads the session and
    /// tries again (up to `max_append_attempts`). The one retry loop for every write. A
    /// delete of the session (or its user) at or after `began_at` refuses it in the store.
    pub(super) async fn append_guarded(
        &self,
        session: &Session,
        created: bool,
        messages: Vec<NewMessage>,
        key: Option<String>,
        began_at: chrono::DateTime<chrono::Utc>,
    ) -> Result<AppendOutcome> {
        let inner = &self.inner;
        let mut messages = messages;
        // Counted once, here, for every write: windows read the counts instead.
        for message in &mut messages {
            if message.metadata.token_count.is_none() {
                message.metadata.token_count = Some(inner.config.tokenizer.count(&message.content));
            }
        }
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
                began_at,
            };
            match inner.store.append_turn(append).await {
                Ok(outcome) => return Ok(outcome),
                Err(Error::Conflict { .. }) if attempt < inner.config.max_append_attempts => {
                    tracing::debug!(attempt, "sequence conflict; re-reading the session");
                    let backoff = Duration::from_millis(fastrand::u64(1..=5) * u64::from(attempt));
                    tokio::time::sleep(backoff).await;
                    // The session may have been created (or deleted) meanwhile.
                    match self.get_session(&session.id).await? {
                        // Someone else created the session this turn meant to create
                        // (another server, a client-chosen id): never write into theirs,
                        // and answer as for any session the caller may not read.
                        Some(current) if current.user_id != session.user_id => {
                            return Err(reads::session_not_found(&session.id));
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
    pub(super) async fn lock_session(&self, id: &SessionId) -> Result<SessionLease> {
        let limit = self.inner.config.model_timeout.saturating_mul(2) + Duration::from_secs(5);
        tokio::time::timeout(limit, self.inner.locks.lock(id))
            .await
            .map_err(|_| {
                Error::conflict(format!(
                    "another turn in session {id} is still running; retry later"
                ))
            })
    }

    pub(super) async fn get_session(&self, id: &SessionId) -> Result<Option<Session>> {
        self.inner.store.get_session(id).await
    }

    pub(super) async fn find_turn(
        &self,
        id: &SessionId,
        key: &str,
    ) -> Result<Option<Vec<Message>>> {
        self.inner.store.find_turn(id, key).await
    }
}
