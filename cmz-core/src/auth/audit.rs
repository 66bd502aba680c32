//! Audit events: denials, reads of other users' data, token theft, logins.

use std::fmt::Debug;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::access::{Action, UserRole};
use crate::ids::UserId;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum AuditKind {
    /// An access decision about conversations.
    Access(Action),
    /// A bulk operation over many users' conversations.
    BulkAccess(Action),
    /// A failed login.
    LoginFailed,
    /// A rotated refresh token was presented again; its family was revoked.
    RefreshReuse,
    /// A logout.
    Logout,
    /// The moderator flagged a user's message; it did not reach the model.
    ContentFlagged,
    /// Personal details were taken out of a child's message before it was stored or sent
    /// (the reason names their types only, never the text).
    PersonalDetails,
    /// A family chose how long its conversations are kept.
    Retention,
    /// A user's data was erased (the subject is whose; the reason holds the counts, never
    /// content).
    Erasure,
    /// A user's conversations were exported (the subject is whose; the reason holds the
    /// counts).
    Export,
    /// Staff opened a review-queue item or marked it reviewed (the subject is whose
    /// conversation; the reason names the item, never content).
    Review,
}

/// Whether it was allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuditOutcome {
    /// Allowed.
    Allowed,
    /// Denied.
    Denied,
}

/// One audit record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEvent {
    /// When.
    pub at: DateTime<Utc>,
    /// What.
    pub kind: AuditKind,
    /// Allowed or denied.
    pub outcome: AuditOutcome,
    /// Who acted (when known).
    pub actor: Option<UserId>,
    /// In which role.
    pub actor_role: Option<UserRole>,
    /// Whose data (when it is one user's).
    pub subject: Option<UserId>,
    /// Why, for auditors (never a secret).
    pub reason: String,
}

/// The longest audit reason kept, in characters; longer text is cut and marked.
pub const MAX_AUDIT_REASON_CHARS: usize = 500;

impl AuditEvent {
    /// An event stamped now. The reason may carry text a caller supplied (a delete's
    /// reason), so it is made safe here for every sink: control characters (newlines,
    /// terminal escapes) are written as `\u{..}` escapes and the text is cut at
    /// [`MAX_AUDIT_REASON_CHARS`].
    pub fn new(kind: AuditKind, outcome: AuditOutcome, reason: impl Into<String>) -> Self {
        Self {
            at: Utc::now(),
            kind,
            outcome,
            actor: None,
            actor_role: None,
            subject: None,
            reason: audit_text(&reason.into()),
        }
    }
}

/// `text` with control characters escaped and cut at [`MAX_AUDIT_REASON_CHARS`], so it
/// reads as one field of one line wherever it is written.
pub fn audit_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(MAX_AUDIT_REASON_CHARS));
    for (count, c) in text.chars().enumerate() {
        if count == MAX_AUDIT_REASON_CHARS {
            out.push_str("…(cut)");
            break;
        }
        if c.is_control()
            || matches!(c, '\u{2028}' | '\u{2029}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
        {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    out
}

/// Where audit events go.
///
/// # Contract
/// Recording never fails the request that caused it: a sink that cannot write logs the
/// problem itself.
#[async_trait]
pub trait AuditSink: Debug + Send + Sync + 'static {
    /// Records one event.
    async fn record(&self, event: AuditEvent);
}

/// A shared, type-erased audit sink.
pub type DynAuditSink = Arc<dyn AuditSink>;

/// Writes audit events as `tracing` events on the `cmz::audit` target.
///
/// Each field is its own structured field; the reason is written quoted and escaped (its
/// `Debug` form), so text inside it cannot end the field or start a new one
/// (`actor="user_admin"` inside a reason stays inside the quotes).
#[derive(Debug, Default, Clone, Copy)]
pub struct TracingAuditSink;

#[async_trait]
impl AuditSink for TracingAuditSink {
    async fn record(&self, event: AuditEvent) {
        let actor = event.actor.as_ref().map(UserId::as_str);
        let subject = event.subject.as_ref().map(UserId::as_str);
        match event.outcome {
            AuditOutcome::Denied => tracing::warn!(
                target: "cmz::audit", kind = ?event.kind, actor, role = ?event.actor_role, subject, reason = ?event.reason, "denied"
            ),
            AuditOutcome::Allowed => tracing::info!(
                target: "cmz::audit", kind = ?event.kind, actor, role = ?event.actor_role, subject, reason = ?event.reason, "allowed"
            ),
        }
    }
}

/// Keeps audit events in memory (for tests and small deployments), and passes them on to
/// `tracing` too.
#[derive(Debug, Default)]
pub struct InMemoryAuditSink {
    events: Mutex<Vec<AuditEvent>>,
}

impl InMemoryAuditSink {
    /// An empty sink.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every event recorded so far.
    pub fn events(&self) -> Vec<AuditEvent> {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Removes and returns every event recorded so far.
    pub fn take(&self) -> Vec<AuditEvent> {
        std::mem::take(&mut *self.events.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

#[async_trait]
impl AuditSink for InMemoryAuditSink {
    async fn record(&self, event: AuditEvent) {
        TracingAuditSink.record(event.clone()).await;
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forged_lines_and_terminal_escapes_stay_inside_the_reason() {
        let forged = "GDPR-1\n2024-01-01T00:00:00Z  INFO cmz::audit: kind=Logout actor=\"user_admin\" reason=\"ok\" allowed\x1b[2K\x1b[1A\r\u{202e}";
        let event = AuditEvent::new(
            AuditKind::BulkAccess(Action::Delete),
            AuditOutcome::Allowed,
            forged,
        );
        assert!(
            !event.reason.chars().any(char::is_control),
            "{:?}",
            event.reason
        );
        assert!(!event.reason.contains('\u{202e}'));
        assert!(event.reason.contains("\\u{1b}[2K"), "{}", event.reason);
        assert!(event.reason.contains("\\u{a}2024"), "{}", event.reason);
        // Written as a field, the quotes are escaped: no second `actor=` field appears.
        let written = format!("reason={:?}", event.reason);
        assert!(written.contains(r#"actor=\"user_admin\""#), "{written}");
        assert!(!written.contains(r#" actor="user_admin""#), "{written}");
        assert_eq!(written.lines().count(), 1);

        let long = AuditEvent::new(AuditKind::Logout, AuditOutcome::Allowed, "x".repeat(10_000));
        assert!(long.reason.chars().count() <= MAX_AUDIT_REASON_CHARS + 6);
        assert!(long.reason.ends_with("…(cut)"));
        assert_eq!(audit_text("plain reason"), "plain reason");
    }
}
