//! Preparing a turn: checking the request, loading or creating the session under the
//! policy, and building the prompt from the persona and the context window.

use super::*;
use crate::error::Code;
use crate::privacy::RedactionMode;

impl ConversationService {
    pub(super) fn validate(&self, request: &TurnRequest) -> Result<usize> {
        let config = &self.inner.config;
        if request.message.trim().is_empty() {
            return Err(Error::validation("message", "message must not be empty"));
        }
        check_length("message", &request.message, config.max_message_chars)?;
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
        if let Some(summary) = &request.context_summary {
            check_length("contextSummary", summary, config.max_context_summary_chars)?;
        }
        Ok(request.context_window.unwrap_or(config.context_window))
    }

    pub(super) async fn prepare(
        &self,
        principal: &Principal,
        request: TurnRequest,
    ) -> Result<TurnStart> {
        let inner = &self.inner;
        let since = inner.tombstones.generation();
        let began_at = chrono::Utc::now();
        let window = self.validate(&request)?;
        let animal = &request.animal_id;
        let persona = inner
            .personas
            .require(animal)
            .instrument(tracing::debug_span!("cmz.backend", kind = "personas", op = "persona", animal = %animal))
            .await?;

        let requested = request.session_id.is_some();
        let mut id = match (&request.session_id, &request.turn_key) {
            (Some(id), _) => id.clone(),
            (None, Some(key)) => keyed_session_id(principal, animal, key)?,
            (None, None) => SessionId::generate(animal, &principal.user_id)?,
        };
        let mut attempts = 0;
        let (lease, session, created) = loop {
            attempts += 1;
            let lease = self.lock_session(&id).await?;
            match self.get_session(&id).await? {
                Some(session) if requested || request.turn_key.is_some() => {
                    let own = match self
                        .authorize_session(principal, &session, Action::Write)
                        .await
                    {
                        Ok(()) => true,
                        // Someone else's conversation: a browser a family shares keeps the
                        // last child's session id after a logout, and the legacy page sends
                        // it with the next user's first message. That user gets a
                        // conversation of their own; the other one is neither read nor
                        // changed, and the reply says no more than any first reply does.
                        Err(error) if matches!(error.code(), Code::NotFound | Code::Forbidden) => {
                            false
                        }
                        Err(error) => return Err(error),
                    };
                    if !own || &session.animal_id != animal {
                        // The legacy page also keeps one session id while the child moves
                        // to another animal: a new conversation with this animal. Either
                        // way under a new id (the reply's `sessionId`, which the page
                        // adopts), drawn from the turn key when there is one, so a retried
                        // request finds the same new session.
                        drop(lease);
                        if attempts >= 4 {
                            return Err(Error::internal("could not draw an unused session id"));
                        }
                        id = match (&request.turn_key, attempts) {
                            (Some(key), 1) => keyed_session_id(principal, animal, key)?,
                            _ => SessionId::generate(animal, &principal.user_id)?,
                        };
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

        // Personal details never go further than this: not to the store, the model, the
        // moderator or a summary.
        let (text, mut redacted) = self.redact(request.message);
        let context_summary = request.context_summary.map(|summary| {
            let (summary, kinds) = self.redact(summary);
            redacted.extend(kinds);
            summary
        });
        redacted.sort();
        redacted.dedup();
        if !redacted.is_empty() {
            self.audit_redaction(principal, &redacted).await;
        }
        let mut user = UserPart::New({
            let mut message = NewMessage::new(Role::User, text);
            message.metadata.turn_key = request.turn_key.clone();
            message.metadata.redacted = privacy::kind_names(&redacted);
            message
        });
        if let (Some(key), false) = (&request.turn_key, created) {
            if let Some(found) = self.find_turn(&id, key).await? {
                match found.as_slice() {
                    [user_message, assistant, ..] => {
                        return Ok(TurnStart::Replay(Box::new(TurnReply::new(
                            false,
                            user_message.clone(),
                            assistant.clone(),
                            true,
                        ))));
                    }
                    [user_message] => {
                        if let Some(reply) = self.find_turn(&id, &reply_key(key)).await? {
                            if let Some(assistant) = reply.into_iter().next() {
                                return Ok(TurnStart::Replay(Box::new(TurnReply::new(
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
            inner.store.recent_messages(&id, window * 2).await?
        };
        let (content, content_tokens, stored_seq) = match &mut user {
            UserPart::New(message) => {
                let tokens = inner.config.tokenizer.count(&message.content);
                message.metadata.token_count = Some(tokens);
                (message.content.clone(), tokens, None)
            }
            UserPart::Stored(message) => (
                message.content.clone(),
                context::message_tokens(inner.config.tokenizer, message),
                Some(message.seq),
            ),
        };
        let context_summary = context_summary.filter(|summary| !summary.trim().is_empty());
        let mut messages = Vec::with_capacity(history.len() + 3);
        // The persona prompt first: a stable prefix for provider prompt caching.
        messages.push(ChatMessage::new(
            Role::System,
            prompt::system_prompt(&persona),
        ));
        if let Some(summary) = &context_summary {
            messages.push(ChatMessage::new(
                Role::System,
                prompt::client_context(summary),
            ));
        }
        if let Some(rolling) = &session.rolling_summary {
            let rolling = ChatMessage::new(Role::System, prompt::rolling_context(&rolling.text));
            // The running summary is help, not a requirement: a message that fits without
            // it is never refused because of it.
            if context::fits(
                &inner.config,
                &inner.counts,
                &messages,
                &rolling,
                content_tokens,
            ) {
                messages.insert(1, rolling);
            } else {
                tracing::debug!("running summary left out: no room beside the message");
            }
        }
        if let Some(seq) = stored_seq {
            history.retain(|m| m.seq < seq);
        }
        let next_seq = stored_seq.unwrap_or_else(|| {
            history
                .last()
                .map_or(session.message_count + 1, |m| m.seq + 1)
        });
        let privacy_block =
            !redacted.is_empty() && inner.config.personal_details == RedactionMode::Block;
        // Asked to remind the child; sent just before their message, counted in the budget.
        let note = (!redacted.is_empty() && !privacy_block)
            .then(|| ChatMessage::new(Role::System, prompt::privacy_note()));
        let mut fixed_with_note;
        let fixed = match &note {
            Some(note) => {
                fixed_with_note = messages.clone();
                fixed_with_note.push(note.clone());
                fixed_with_note.as_slice()
            }
            None => messages.as_slice(),
        };
        let window = context::choose_window(
            &inner.config,
            &inner.counts,
            fixed,
            content_tokens,
            history,
            next_seq,
        )?;

        let fold = context::fold_plan(&inner.config, &session, window.first_seq);
        messages.extend(window.messages);
        messages.extend(note);
        messages.push(ChatMessage::new(Role::User, content));
        let prompt = ChatRequest {
            messages,
            max_tokens: request.max_tokens.or(inner.config.max_tokens),
            temperature: request
                .temperature
                .or(persona.temperature)
                .or(inner.config.temperature),
            model: persona.model.clone(),
            priority: request.priority,
        };
        let moderation = request
            .moderation_level
            .map_or(inner.config.moderation_level, |level| {
                level.max(inner.config.moderation_level)
            });
        // The prompt is built: from here a turn needs only the persona's name (for an
        // in-character fallback or refusal), and a streamed turn holds this for as long
        // as the stream lasts, so the rest of the persona is let go.
        Ok(TurnStart::Run(Box::new(ReadyTurn {
            _lease: lease,
            session,
            created,
            persona_name: persona.name,
            user,
            prompt,
            turn_key: request.turn_key,
            since,
            context_summary,
            moderation,
            began_at,
            fold,
            redacted,
            privacy_block,
            costs: care::TurnCosts {
                budget: None,
                family: principal.family_id.clone(),
                turn_limit: None,
            },
        })))
    }
}

/// `validation_error` naming `field` when `text` is longer than `limit` characters.
fn check_length(field: &'static str, text: &str, limit: usize) -> Result<()> {
    let chars = text.chars().count();
    if chars > limit {
        return Err(Error::validation(
            field,
            format!("{field} is {chars} characters; the limit is {limit}"),
        ));
    }
    Ok(())
}

/// The id of the session a first turn with the turn key `key` starts: the same key finds
/// the same session again, so a retried first turn does not start a second session.
fn keyed_session_id(principal: &Principal, animal: &AnimalId, key: &str) -> Result<SessionId> {
    SessionId::with_suffix(
        animal,
        &principal.user_id,
        stable_hash(&[principal.user_id.as_str(), animal.as_str(), key]),
    )
}
