//! The running summary, kept beside the turns rather than on the session item.
//!
//! The session item is written on every turn, and the user index (which projects every
//! attribute) copies it on every turn: a summary of a few hundred tokens on it made each
//! turn of a summarized conversation cost about 10 WCU instead of 4. So the summary lives
//! in the conversation's partition of the messages table at `seq` 0 (turn items start at
//! 1, and every read of turns asks for `seq >= 1`), written only when it changes. The
//! session item carries only how far it goes (`rsThrough`), which tells a read of the
//! session to fetch it. A delete of the conversation takes it with the turns: it is in
//! their partition, and counts no message (`msgs` 0).

use super::*;

/// The sort key of the summary item (turn items start at 1).
const SUMMARY_SEQ: u64 = 0;
/// The session item's attribute saying how far the stored summary goes.
pub(super) const SUMMARY_THROUGH: &str = "rsThrough";

impl DynamoConversationStore {
    /// Stores a running summary unless the stored one covers as much: the summary item and
    /// the session's marker in one transaction (so a summary is never kept for a session
    /// that is gone, and never goes backwards). `Ok(false)` when a summary covering as
    /// much is there; `not_found` when the session is not.
    pub(super) async fn put_rolling_summary(
        &self,
        id: &SessionId,
        summary: &RollingSummary,
    ) -> Result<bool> {
        let marker = Update::builder()
            .table_name(self.sessions_table())
            .key("sessionId", s(id.as_str()))
            // A summary an earlier version kept on the item goes with this one.
            .update_expression("SET #m = :t REMOVE #r")
            // A session, not a tombstone; and only forward.
            .condition_expression(
                "attribute_exists(userId) AND (attribute_not_exists(#m) OR #m < :t) \
                 AND (attribute_not_exists(#r) OR #r.#t < :t)",
            )
            .expression_attribute_names("#m", SUMMARY_THROUGH)
            .expression_attribute_names("#r", ROLLING_SUMMARY)
            .expression_attribute_names("#t", "through")
            .expression_attribute_values(":t", n(summary.through))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .build()
            .map_err(|e| Error::internal("summary marker").with_source(e))?;
        let mut expression = String::from("SET #r = :r, msgs = :zero");
        let mut item = Update::builder()
            .table_name(self.messages_table())
            .key("conversationId", s(id.as_str()))
            .key("seq", n(SUMMARY_SEQ))
            .condition_expression("attribute_not_exists(#r) OR #r.#t < :t")
            .expression_attribute_names("#r", ROLLING_SUMMARY)
            .expression_attribute_names("#t", "through")
            .expression_attribute_values(":r", rolling_summary_value(summary))
            .expression_attribute_values(":t", n(summary.through))
            .expression_attribute_values(":zero", n(0));
        if let Some(ttl) = self.db.ttl() {
            expression.push_str(", #ttl = :ttl");
            item = item
                .expression_attribute_names("#ttl", TTL_ATTRIBUTE)
                .expression_attribute_values(":ttl", n(ttl));
        }
        let item = item
            .update_expression(expression)
            .build()
            .map_err(|e| Error::internal("summary item").with_source(e))?;
        let table = self.messages_table();
        let result = self
            .client()
            .transact_write_items()
            .transact_items(TransactWriteItem::builder().update(marker).build())
            .transact_items(TransactWriteItem::builder().update(item).build())
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
            .send()
            .await;
        let raw = match result {
            Ok(out) => {
                self.record(out.consumed_capacity(), true);
                return Ok(true);
            }
            Err(SdkError::ServiceError(service)) => service.into_err(),
            Err(other) => return Err(map_sdk("TransactWriteItems", table, other)),
        };
        self.record(None, true);
        let TransactWriteItemsError::TransactionCanceledException(cancelled) = &raw else {
            return Err(crate::error::map_service("TransactWriteItems", table, raw));
        };
        let reasons = cancelled.cancellation_reasons();
        let code_at = |i: usize| reasons.get(i).and_then(|r| r.code()).unwrap_or("None");
        if code_at(0) == "ConditionalCheckFailed" {
            let session_there = reasons[0]
                .item()
                .is_some_and(|item| item.contains_key("userId"));
            return if session_there {
                Ok(false)
            } else {
                Err(session_not_found(id))
            };
        }
        if code_at(1) == "ConditionalCheckFailed" {
            return Ok(false);
        }
        if (0..2).any(|i| code_at(i) == "TransactionConflict") {
            return Err(Error::conflict(format!(
                "session {id}: a concurrent transaction touched its summary"
            )));
        }
        Err(Error::unavailable(
            format!("dynamodb TransactWriteItems on {table} was cancelled"),
            raw,
        ))
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
