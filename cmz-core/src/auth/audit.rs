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

impl AuditEvent {
    /// An event stamped now.
    pub fn new(kind: AuditKind, outcome: AuditOutcome, reason: impl Into<String>) -> Self {
        Self {
            at: Utc::now(),
            kind,
            outcome,
            actor: None,
            actor_role: None,
            subject: None,
            reason: reason.into(),
        }
    }
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
#[derive(Debug, Default, Clone, Copy)]
pub struct TracingAuditSink;

#[async_trait]
impl AuditSink for TracingAuditSink {
    async fn record(&self, event: AuditEvent) {
        let actor = event.actor.as_ref().map(UserId::as_str);
        let subject = event.subject.as_ref().map(UserId::as_str);
        match event.outcome {
            AuditOutcome::Denied => tracing::warn!(
                target: "cmz::audit", kind = ?event.kind, actor, role = ?event.actor_role, subject, reason = %event.reason, "denied"
            ),
            AuditOutcome::Allowed => tracing::info!(
                target: "cmz::audit", kind = ?event.kind, actor, role = ?event.actor_role, subject, reason = %event.reason, "allowed"
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
