//! The running summary: turns that left the context window, folded into a summary kept
//! with the session, after the reply is delivered.

use std::collections::HashSet;
use std::sync::Mutex;

use super::context::{FoldPlan, MAX_FOLD_MESSAGES};
use super::*;
use crate::types::RollingSummary;

/// The folds running in this process: one per session at a time.
#[derive(Debug, Default)]
pub(super) struct Folds {
    running: Mutex<HashSet<SessionId>>,
    idle: tokio::sync::Notify,
}

impl Folds {
    fn start(&self, id: &SessionId) -> bool {
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone())
    }

    fn finish(&self, id: &SessionId) {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        running.remove(id);
        if running.is_empty() {
            self.idle.notify_waiters();
        }
    }

    fn is_idle(&self) -> bool {
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }
}

impl ConversationService {
    /// Waits until the running summaries this service started have been written (or have
    /// failed). Turns never wait for them; call this before shutting down, or in tests.
    pub async fn summaries_settled(&self) {
        let folds = &self.inner.folds;
        loop {
            let notified = folds.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if folds.is_idle() {
                return;
            }
            notified.await;
        }
    }

    /// Starts folding `plan` into the session's running summary in the background, unless
    /// a fold of that session is already running here.
    /// `family` is the family of the caller whose turn scheduled it: the summary's tokens
    /// count in their budgets and usage.
    pub(super) fn schedule_fold(
        &self,
        id: &SessionId,
        plan: FoldPlan,
        family: Option<crate::ids::FamilyId>,
    ) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if !self.inner.folds.start(id) {
            return;
        }
        let service = self.clone();
        let id = id.clone();
        let span = tracing::info_span!("cmz.rolling_summary", session = %id, through = plan.through, up_to = plan.up_to);
        runtime.spawn(
            async move {
                if let Err(error) = service.fold(&id, plan, family).await {
                    // Only the code: never the conversation's text.
                    tracing::warn!(code = error.code().as_str(), "running summary not written");
                }
                service.inner.folds.finish(&id);
            }
            .instrument(span),
        );
    }

    /// Reads the uncovered turns, asks the model for the new summary (a deterministic one
    /// when it cannot answer), and stores it if it still covers more than the stored one.
    async fn fold(
        &self,
        id: &SessionId,
        plan: FoldPlan,
        family: Option<crate::ids::FamilyId>,
    ) -> Result<()> {
        let inner = &self.inner;
        let config = &inner.config;
        let Some(session) = inner.store.get_session(id).await? else {
            return Ok(());
        };
        let previous = session.rolling_summary.as_ref();
        let through = previous.map_or(0, |p| p.through);
        if through >= plan.up_to {
            return Ok(());
        }
        // A backlog longer than one fold (a long conversation from before cmz, or folds
        // that kept failing) is summarized from its newest part: one fold a turn at most,
        // never a catch-up through thousands of messages.
        let from = through.max(plan.up_to.saturating_sub(MAX_FOLD_MESSAGES as u64));
        let want = usize::try_from(plan.up_to - from).unwrap_or(MAX_FOLD_MESSAGES);
        let mut turns = inner.store.messages_after(id, from, want).await?;
        // Start at a question, never at a reply whose question is not included.
        if turns.first().is_some_and(|m| m.role == Role::Assistant) && from > through {
            turns.remove(0);
        }
        turns.retain(|m| m.seq <= plan.up_to);
        // Never end inside a turn: a question goes in with its answer.
        if turns.len() > 1
            && turns.last().is_some_and(|m| m.role == Role::User)
            && turns.last().map(|m| m.seq) != Some(plan.up_to)
        {
            turns.pop();
        }
        let Some(last) = turns.last().map(|m| m.seq) else {
            return Ok(());
        };
        let previous_text = previous.map(|p| p.text.as_str());
        let request = ChatRequest {
            messages: vec![
                ChatMessage::new(
                    Role::System,
                    prompt::rolling_summary_instruction(&session, config.summary_max_tokens),
                ),
                // Messages from before cmz (legacy items) were never redacted.
                ChatMessage::new(
                    Role::User,
                    self.redact_summary(prompt::rolling_summary_input(
                        &session,
                        previous_text,
                        &turns,
                    )),
                ),
            ],
            max_tokens: Some(config.summary_max_tokens),
            temperature: Some(0.2),
            model: None,
            // Nobody waits for it: shed first when the model is busy.
            priority: Priority::Low,
        };
        let prompt_tokens = config.tokenizer.count_request(&request);
        let called = tokio::time::timeout(config.model_timeout, inner.model.complete(request))
            .instrument(span("model", "complete", id))
            .await;
        let (text, spent, fallback) = match called {
            Ok(Ok(completion)) if !completion.content.trim().is_empty() => {
                let text = completion.content.trim().to_owned();
                let (prompt, reply) = completion.usage.map_or_else(
                    || {
                        (
                            u64::from(prompt_tokens),
                            u64::from(config.tokenizer.count(&text)),
                        )
                    },
                    |u| (u64::from(u.prompt_tokens), u64::from(u.completion_tokens)),
                );
                let model = completion
                    .model
                    .unwrap_or_else(|| inner.model.name().to_owned());
                self.account_summary(&session, family, model, prompt, reply)
                    .await;
                (text, prompt + reply, false)
            }
            other => {
                let code = match &other {
                    Ok(Ok(_)) => "empty_reply",
                    Ok(Err(error)) => error.code().as_str(),
                    Err(_) => "timeout",
                };
                tracing::info!(code, "running summary written without the model");
                let text = prompt::fallback_rolling_summary(
                    &session,
                    previous_text,
                    &turns,
                    config.summary_max_tokens,
                    config.tokenizer,
                );
                (text, 0, true)
            }
        };
        // A model may repeat what it read: the summary is screened like a message.
        let text = self.redact_summary(text);
        let summary = RollingSummary {
            tokens: config.tokenizer.count(&text),
            text,
            through: last,
            updated_at: chrono::Utc::now(),
            folds: previous.map_or(0, |p| p.folds).saturating_add(1),
            tokens_spent: previous.map_or(0, |p| p.tokens_spent).saturating_add(spent),
            fallback,
        };
        let stored = inner.store.set_rolling_summary(id, &summary).await?;
        tracing::debug!(
            stored,
            through = last,
            tokens = summary.tokens,
            "running summary folded"
        );
        Ok(())
    }
}
