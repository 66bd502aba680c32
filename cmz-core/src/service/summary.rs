//! Summaries of a session, by the model or a deterministic fallback.

use super::*;

impl ConversationService {
    /// Writes a summary of a session with the model and stores it on the session; when the
    /// model is unavailable, stores a deterministic summary instead (marked `fallback`).
    #[tracing::instrument(name = "cmz.summarize", skip_all, fields(user = %principal.user_id, session = %id))]
    pub async fn summarize(&self, principal: &Principal, id: &SessionId) -> Result<Summary> {
        self.count_model_call(principal).await?;
        let inner = &self.inner;
        let session = self.readable_session(principal, id, Action::Read).await?;
        let recent = inner.store.recent_messages(id, 40).await?;
        let mut transcript = String::new();
        prompt::push_transcript(&mut transcript, &session, &recent);
        let request = ChatRequest {
            messages: vec![
                ChatMessage::new(Role::System, prompt::summary_instruction(&session)),
                ChatMessage::new(Role::User, self.redact_summary(transcript)),
            ],
            max_tokens: Some(150),
            temperature: Some(0.2),
            model: None,
            priority: Default::default(),
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
                    tracing::warn!(code = error.code().as_str(), error = %error, "summary model call failed");
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
                text: self.redact_summary(text),
                fallback: false,
            },
            None => {
                let first = inner.store.history(id, PageRequest::first(2)).await?;
                Summary {
                    text: self.redact_summary(prompt::fallback_summary(&session, &first.items)),
                    fallback: true,
                }
            }
        };
        // Readers (a parent, an admin) get the summary; only the owner's is stored, as
        // nobody else writes into a conversation.
        if principal.user_id != session.user_id {
            return Ok(summary);
        }
        inner.store.set_summary(id, &summary.text).await?;
        Ok(summary)
    }
}
