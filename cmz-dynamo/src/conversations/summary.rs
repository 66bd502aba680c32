//! The running summary, kept beside the turns rather than on the session item.
//!
//! The session item is written on every turn, and the user index (which projects every
//! attribute) copies it on every turn: a summary of a few hundred tokens on it made each
//! turn of a summarized conversation cost about 10 WCU instead of 4. So the summary lives
//! in the conversation's partition of the messages table at `seq` 0 (turn items start at
//! 1, and every read of turns asks for `seq >= 1`), written only when it changes. The
//! session item carries only a marker (`rsThrough`, set at the first summary), which tells
//! a read of the session to fetch it. A delete of the conversation takes it with the turns: it is in
//! their partition, and counts no message (`msgs` 0).

use super::*;

/// The sort key of the summary item (turn items start at 1).
const SUMMARY_SEQ: u64 = 0;
/// The session item's attribute saying how far the stored summary goes.
pub(super) const SUMMARY_THROUGH: &str = "rsThrough";

impl DynamoConversationStore {
    /// Stores a running summary unless the stored one covers as much. `Ok(false)` when a
    /// summary covering as much is there; `not_found` when the session is not.
    ///
    /// Plain writes, not a transaction (which measured 16 WCU a fold on DynamoDB Local,
    /// against 2): the summary item first (conditional: only forward), then a strongly
    /// consistent read of the session item. A delete writes its tombstone before it
    /// empties the partition, so either this read sees the tombstone (and the item just
    /// written is deleted again) or the delete's emptying comes after the write and takes
    /// it. The session item gets its marker once, at the first summary.
    pub(super) async fn put_rolling_summary(
        &self,
        id: &SessionId,
        summary: &RollingSummary,
    ) -> Result<bool> {
        if !self.put_summary_item(id, summary).await? {
            return Ok(false);
        }
        let session = self
            .get_item(self.sessions_table(), "sessionId", id.as_str())
            .await?
            .filter(|item| item.contains_key("userId"));
        let marked = match session {
            None => false,
            Some(item) if item.contains_key(SUMMARY_THROUGH) => true,
            Some(_) => self.mark_summary_kept(id, summary).await?,
        };
        if !marked {
            self.delete_summary_item(id).await?;
            return Err(session_not_found(id));
        }
        Ok(true)
    }

    /// The summary item, only forward; `false` when the stored one covers as much.
    async fn put_summary_item(&self, id: &SessionId, summary: &RollingSummary) -> Result<bool> {
        let table = self.messages_table();
        let mut expression = String::from("SET #r = :r, msgs = :zero");
        let mut update = self
            .client()
            .update_item()
            .table_name(table)
            .key("conversationId", s(id.as_str()))
            .key("seq", n(SUMMARY_SEQ))
            .condition_expression("attribute_not_exists(#r) OR #r.#t < :t")
            .expression_attribute_names("#r", ROLLING_SUMMARY)
            .expression_attribute_names("#t", "through")
            .expression_attribute_values(":r", rolling_summary_value(summary))
            .expression_attribute_values(":t", n(summary.through))
            .expression_attribute_values(":zero", n(0));
        update = self.with_ttl(update, &mut expression);
        self.update_if(table, update.update_expression(expression))
            .await
    }

    /// Marks the session item as having a summary beside its turns (dropping one an earlier
    /// version kept on the item); `false` when the session is gone.
    async fn mark_summary_kept(&self, id: &SessionId, summary: &RollingSummary) -> Result<bool> {
        let table = self.sessions_table();
        let update = self
            .client()
            .update_item()
            .table_name(table)
            .key("sessionId", s(id.as_str()))
            .update_expression("SET #m = :t REMOVE #r")
            .condition_expression("attribute_exists(userId)")
            .expression_attribute_names("#m", SUMMARY_THROUGH)
            .expression_attribute_names("#r", ROLLING_SUMMARY)
            .expression_attribute_values(":t", n(summary.through));
        self.update_if(table, update).await
    }

    async fn delete_summary_item(&self, id: &SessionId) -> Result<()> {
        let table = self.messages_table();
        let out = self
            .client()
            .delete_item()
            .table_name(table)
            .key("conversationId", s(id.as_str()))
            .key("seq", n(SUMMARY_SEQ))
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
            .send()
            .await
            .map_err(|e| map_sdk("DeleteItem", table, e))?;
        self.record(out.consumed_capacity(), true);
        Ok(())
    }

    /// The session's running summary, read from its item beside the turns (for a session
    /// item that has the marker).
    pub(super) async fn attach_rolling_summary(&self, session: &mut Session) -> Result<()> {
        let table = self.messages_table();
        let out = self
            .client()
            .get_item()
            .table_name(table)
            .key("conversationId", s(session.id.as_str()))
            .key("seq", n(SUMMARY_SEQ))
            .consistent_read(true)
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
            .send()
            .await
            .map_err(|e| map_sdk("GetItem", table, e))?;
        self.record(out.consumed_capacity(), false);
        if let Some(item) = out.item() {
            if let Some(summary) = rolling_summary_of(&Reader::new(item, "summary")) {
                session.rolling_summary = Some(summary);
            }
        }
        Ok(())
    }
}
