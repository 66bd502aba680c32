//! Reads and deletes of conversations, each under the access policy.

use super::*;

/// The error for a session that does not exist, or that the caller may not read.
pub(super) fn session_not_found(id: &SessionId) -> Error {
    Error::not_found(format!("session {id}"))
}

impl ConversationService {
    /// Reads a session the principal may `action`; `not_found` if it does not exist or
    /// the principal may not read it (see [`authorize_session`](Self::authorize_session)).
    pub(super) async fn readable_session(
        &self,
        principal: &Principal,
        id: &SessionId,
        action: Action,
    ) -> Result<Session> {
        let session = self
            .get_session(id)
            .await?
            .ok_or_else(|| session_not_found(id))?;
        self.authorize_session(principal, &session, action).await?;
        Ok(session)
    }

    /// Whether `principal` may `action` on `session`. A session the principal may not
    /// read is `not_found`, word for word as a missing one, so nobody learns which ids
    /// other people's conversations have; the policy still records the denial. One they
    /// may read but not change (an administrator's or a parent's turn in a child's
    /// conversation) is `forbidden`.
    pub(super) async fn authorize_session(
        &self,
        principal: &Principal,
        session: &Session,
        action: Action,
    ) -> Result<()> {
        let policy = &self.inner.policy;
        match policy
            .authorize(principal, Action::Read, &session.user_id)
            .await
        {
            Err(error) if error.code() == "forbidden" => {
                return Err(session_not_found(&session.id));
            }
            other => other?,
        }
        if action == Action::Read {
            return Ok(());
        }
        policy.authorize(principal, action, &session.user_id).await
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
        self.inner.store.set_thread_id(id, thread_id).await
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
        self.inner.store.history(id, page).await
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
        // A user's delete also takes what cost and care keep of them: their feedback, the
        // queue items of their conversations, their usage counters.
        if let DeleteScope::User(owner) = &scope {
            self.forget_care(owner).await?;
        }
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

    /// Deletes `owner`'s sessions whose last activity is before `inactive_before`: what a
    /// retention job does (no principal: the deployment's own rule; audited). A turn
    /// running in one of them writes nothing back.
    #[tracing::instrument(name = "cmz.expire_sessions", skip_all, fields(owner = %owner))]
    pub async fn expire_sessions(
        &self,
        owner: &UserId,
        inactive_before: chrono::DateTime<chrono::Utc>,
    ) -> Result<DeleteReport> {
        let inner = &self.inner;
        let store = &inner.store;
        let mut expired = Vec::new();
        {
            let mut listing = crate::store::paged(|cursor| {
                store.list_sessions(
                    SessionScope::User(owner.clone()),
                    PageRequest { limit: 100, cursor },
                )
            });
            // Newest activity first: the old ones are at the end.
            while let Some(session) = listing.next().await {
                let session = session?;
                if session.last_activity < inactive_before {
                    expired.push(session.id);
                }
            }
        }
        let mut report = DeleteReport::default();
        for id in expired {
            let scope = DeleteScope::Session(id);
            inner.tombstones.record(&scope).await;
            let deleted = store.delete(scope).await?;
            report.sessions += deleted.sessions;
            report.messages += deleted.messages;
        }
        if report.sessions > 0 {
            if let Some(audit) = &inner.audit {
                let mut event = AuditEvent::new(
                    AuditKind::Retention,
                    AuditOutcome::Allowed,
                    format!(
                        "retention: {} sessions, {} messages inactive since before {inactive_before}",
                        report.sessions, report.messages
                    ),
                );
                event.subject = Some(owner.clone());
                audit.record(event).await;
            }
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
