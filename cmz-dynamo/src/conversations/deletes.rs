//! Deletes of sessions with their messages, batched.

use super::*;

impl DynamoConversationStore {
    pub(super) async fn delete_session(&self, id: &SessionId) -> Result<DeleteReport> {
        let mut report = DeleteReport::default();
        // The session item first: from then on no append can succeed on it.
        if self
            .db
            .delete_item(self.sessions_table(), "sessionId", id.as_str())
            .await?
            .is_some()
        {
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
