//! A [`ConversationStore`] wrapper that puts every call in a `cmz.backend` span, so the
//! engine and any other caller get the same tracing without writing spans by hand.

use async_trait::async_trait;
use tracing::Instrument as _;

use crate::error::Result;
use crate::ids::SessionId;
use crate::store::{
    AppendOutcome, ConversationStore, DeleteReport, DeleteScope, DynConversationStore, Page,
    PageRequest, SessionScope, TurnAppend,
};
use crate::types::{Message, RollingSummary, Session};

/// Wraps a store: each call runs in a `debug` span named `cmz.backend` with `kind =
/// "store"`, `op` (the method) and `session` (when the call has one); a failure is recorded
/// on the span with its code. Ids only: never message text.
///
/// ```
/// use std::sync::Arc;
/// use cmz_core::memory::InMemoryConversationStore;
/// use cmz_core::traced::TracedStore;
/// let store = TracedStore::new(Arc::new(InMemoryConversationStore::new()));
/// # let _ = store;
/// ```
#[derive(Debug, Clone)]
pub struct TracedStore {
    inner: DynConversationStore,
}

impl TracedStore {
    /// Traces the calls to `inner`.
    pub fn new(inner: DynConversationStore) -> Self {
        Self { inner }
    }

    /// The wrapped store.
    pub fn into_inner(self) -> DynConversationStore {
        self.inner
    }
}

fn span(op: &'static str, session: Option<&SessionId>) -> tracing::Span {
    match session {
        Some(session) => {
            tracing::debug_span!("cmz.backend", kind = "store", op, session = %session, error = tracing::field::Empty)
        }
        None => tracing::debug_span!(
            "cmz.backend",
            kind = "store",
            op,
            error = tracing::field::Empty
        ),
    }
}

async fn traced<T>(
    op: &'static str,
    session: Option<&SessionId>,
    call: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    let span = span(op, session);
    let result = call.instrument(span.clone()).await;
    if let Err(error) = &result {
        span.record("error", error.code().as_str());
    }
    result
}

#[async_trait]
impl ConversationStore for TracedStore {
    async fn create_session(&self, session: &Session) -> Result<()> {
        traced(
            "create_session",
            Some(&session.id),
            self.inner.create_session(session),
        )
        .await
    }

    async fn get_session(&self, id: &SessionId) -> Result<Option<Session>> {
        traced("get_session", Some(id), self.inner.get_session(id)).await
    }

    async fn append_turn(&self, append: TurnAppend) -> Result<AppendOutcome> {
        let id = append.session_id.clone();
        traced("append_turn", Some(&id), self.inner.append_turn(append)).await
    }

    async fn find_turn(&self, id: &SessionId, turn_key: &str) -> Result<Option<Vec<Message>>> {
        traced("find_turn", Some(id), self.inner.find_turn(id, turn_key)).await
    }

    async fn recent_messages(&self, id: &SessionId, limit: usize) -> Result<Vec<Message>> {
        traced(
            "recent_messages",
            Some(id),
            self.inner.recent_messages(id, limit),
        )
        .await
    }

    async fn history(&self, id: &SessionId, page: PageRequest) -> Result<Page<Message>> {
        traced("history", Some(id), self.inner.history(id, page)).await
    }

    async fn list_sessions(&self, scope: SessionScope, page: PageRequest) -> Result<Page<Session>> {
        traced("list_sessions", None, self.inner.list_sessions(scope, page)).await
    }

    async fn messages_after(
        &self,
        id: &SessionId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Message>> {
        traced(
            "messages_after",
            Some(id),
            self.inner.messages_after(id, after, limit),
        )
        .await
    }

    async fn set_summary(&self, id: &SessionId, summary: &str) -> Result<()> {
        traced("set_summary", Some(id), self.inner.set_summary(id, summary)).await
    }

    async fn set_rolling_summary(&self, id: &SessionId, summary: &RollingSummary) -> Result<bool> {
        traced(
            "set_rolling_summary",
            Some(id),
            self.inner.set_rolling_summary(id, summary),
        )
        .await
    }

    async fn set_thread_id(&self, id: &SessionId, thread_id: &str) -> Result<()> {
        traced(
            "set_thread_id",
            Some(id),
            self.inner.set_thread_id(id, thread_id),
        )
        .await
    }

    async fn delete(&self, scope: DeleteScope) -> Result<DeleteReport> {
        let session = match &scope {
            DeleteScope::Session(id) => Some(id.clone()),
            _ => None,
        };
        traced("delete", session.as_ref(), self.inner.delete(scope)).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::memory::InMemoryConversationStore;
    use crate::testing::{SuiteOptions, run_conversation_store_suite};

    #[tokio::test]
    async fn a_traced_store_is_still_a_conforming_store() {
        let store: crate::store::DynConversationStore =
            Arc::new(TracedStore::new(Arc::new(InMemoryConversationStore::new())));
        let options = SuiteOptions {
            long_session_messages: 50,
            ..SuiteOptions::default()
        };
        run_conversation_store_suite(store, &options).await;
    }
}
