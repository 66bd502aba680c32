//! Deletes of sessions with their messages, batched.

use super::*;

/// How long a user delete waits before it looks at the user index a second time: a
/// global secondary index is updated asynchronously (usually well within a second), so a
/// session stored just before the delete may be missing from the first listing.
const LATE_INDEX_PASS: std::time::Duration = std::time::Duration::from_secs(1);

impl DynamoConversationStore {
    pub(super) async fn delete_session(&self, id: &SessionId) -> Result<DeleteReport> {
        let mut report = DeleteReport::default();
        // The session item first, replaced by its tombstone: from then on no append that
        // began before now can succeed on it (see `tombstones`).
        if self.put_session_tombstone(id, Utc::now()).await? {
            report.sessions = 1;
        }
        // Every turn item of the conversation's partition.
        let table = self.messages_table();
        let mut keys = Vec::new();
        let mut start: Option<Item> = None;
        loop {
            let page = self
                .client()
                .query()
                .table_name(table)
                .key_condition_expression("conversationId = :c")
                .expression_attribute_values(":c", s(id.as_str()))
                .projection_expression("conversationId, seq, msgs")
                .select(Select::SpecificAttributes)
                .consistent_read(true)
                .return_consumed_capacity(ReturnConsumedCapacity::Total)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| map_sdk("Query", table, e))?;
            self.db.inner.meter.record(page.consumed_capacity(), false);
            for item in page.items() {
                report.messages += Reader::new(item, "turn").opt_u64("msgs").unwrap_or(1);
                let key: Item = item
                    .iter()
                    .filter(|(name, _)| name.as_str() == "conversationId" || name.as_str() == "seq")
                    .map(|(name, value)| (name.clone(), value.clone()))
                    .collect();
                keys.push(key);
            }
            match page.last_evaluated_key {
                Some(key) if !key.is_empty() => start = Some(key),
                _ => break,
            }
        }
        delete_keys(&self.db, table, keys).await?;
        let legacy = self
            .db
            .delete_item(self.legacy_table(), "conversationId", id.as_str())
            .await?;
        if let Some(old) = legacy {
            report.sessions = 1;
            report.messages += legacy_messages_len(&old) as u64;
        }
        if report.messages > 0 {
            report.sessions = 1;
        }
        Ok(report)
    }

    /// A user's sessions: the user's tombstone first (first turns that began before it
    /// cannot store a session any more), then every session the user index lists, then,
    /// once the index has had time to settle, those it did not list yet (stored just
    /// before the delete; sessions started after it are new conversations and stay).
    pub(super) async fn delete_user(&self, user: &UserId) -> Result<DeleteReport> {
        let deleted_at = Utc::now();
        self.put_user_tombstone(user, deleted_at).await?;
        let listed = self.index_ids(USER_INDEX, "userId", user.as_str()).await?;
        let mut report = self
            .delete_all(listed.into_iter().map(|(id, _)| id).collect())
            .await?;
        tokio::time::sleep(LATE_INDEX_PASS).await;
        // Deleted sessions are tombstones now, which the index does not list.
        let late: Vec<SessionId> = self
            .index_ids(USER_INDEX, "userId", user.as_str())
            .await?
            .into_iter()
            .filter(|(_, started)| started.is_none_or(|at| at < deleted_at))
            .map(|(id, _)| id)
            .collect();
        if !late.is_empty() {
            tracing::info!(
                sessions = late.len(),
                "a user delete found sessions the index had not listed yet"
            );
            let more = self.delete_all(late).await?;
            report.sessions += more.sessions;
            report.messages += more.messages;
        }
        Ok(report)
    }

    pub(super) async fn delete_all(&self, ids: Vec<SessionId>) -> Result<DeleteReport> {
        use futures::StreamExt as _;
        let mut total = DeleteReport::default();
        let mut results = futures::stream::iter(
            ids.into_iter()
                .map(|id| async move { self.delete_session(&id).await }),
        )
        .buffer_unordered(4);
        while let Some(result) = results.next().await {
            let report = result?;
            total.sessions += report.sessions;
            total.messages += report.messages;
        }
        Ok(total)
    }
}
