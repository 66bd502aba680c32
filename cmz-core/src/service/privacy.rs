//! Personal details in a turn's message: taken out before anything else sees it.

use super::*;
use crate::privacy::{PiiKind, RedactionMode};

/// The kinds' names, as stored in message metadata.
pub(super) fn kind_names(kinds: &[PiiKind]) -> Vec<String> {
    kinds.iter().map(|k| k.as_str().to_owned()).collect()
}

impl ConversationService {
    /// `text` with its personal details replaced (unless the deployment keeps them), and
    /// the kinds found.
    pub(super) fn redact(&self, text: String) -> (String, Vec<PiiKind>) {
        let config = &self.inner.config;
        if config.personal_details == RedactionMode::Off {
            return (text, Vec::new());
        }
        let redacted = config.redactor.redact(&text);
        if redacted.kinds.is_empty() {
            return (text, Vec::new());
        }
        (redacted.text.into_owned(), redacted.kinds)
    }

    /// A summary's text with personal details replaced (a model may repeat what it read).
    pub(super) fn redact_summary(&self, text: String) -> String {
        self.redact(text).0
    }

    /// Records that personal details were taken out of `principal`'s message: their kinds
    /// only.
    pub(super) async fn audit_redaction(&self, principal: &Principal, kinds: &[PiiKind]) {
        let Some(audit) = &self.inner.audit else {
            return;
        };
        let blocked = self.inner.config.personal_details == RedactionMode::Block;
        let mut event = AuditEvent::new(
            AuditKind::PersonalDetails,
            if blocked {
                AuditOutcome::Denied
            } else {
                AuditOutcome::Allowed
            },
            format!(
                "personal details taken out of a message{}: {}",
                if blocked { " (blocked)" } else { "" },
                kind_names(kinds).join(", ")
            ),
        );
        event.actor = Some(principal.user_id.clone());
        event.actor_role = Some(principal.role);
        event.subject = Some(principal.user_id.clone());
        audit.record(event).await;
    }
}
