//! Tombstones: what a delete leaves behind so that a turn that began before it, on any
//! server, cannot write back what it removed (the store contract's *Deletes are final*).
//!
//! - A deleted session's item is replaced by a tombstone under the same key:
//!   `{sessionId, deletedAt, ttl}`. It has no `userId`, `animalId` or `lastActivity`, so
//!   the GSIs do not list it and every read treats it as no session. A turn continuing the
//!   session updates the session item under a guard (`messageCount = :expected`), which a
//!   tombstone fails: the turn stores nothing, at no extra cost.
//! - A session created again under that id keeps the tombstone's `deletedAt` (the create
//!   is an update of the tombstone), and every later append's guard also demands
//!   `deletedAt < :began`: a turn that began before the delete cannot join the new
//!   conversation even when the counts happen to match. Still a condition, still free.
//! - A user delete first writes `{pk: "deleted-user#<userId>", deletedAt, ttl}` to the
//!   meta table. A first turn creates its session in one `TransactWriteItems` with a
//!   `ConditionCheck` that this item is absent or older than the turn: the only place the
//!   check costs anything, once per conversation.
//!
//! Tombstones expire through the tables' TTL after [`TOMBSTONE_TTL`], long after any turn
//! that began before them has ended; until DynamoDB removes them they are only compared
//! by time, so a late removal changes nothing. Times are RFC 3339 strings with
//! nanoseconds and `Z`, which sort as they compare.

use std::collections::HashMap;

use aws_sdk_dynamodb::types::ConditionCheck;
use cmz_core::store::TOMBSTONE_TTL;

use super::*;

/// When a session or a user's sessions were deleted.
pub(super) const DELETED_AT: &str = "deletedAt";

/// The meta-table key of a user's tombstone.
fn user_key(user: &UserId) -> String {
    format!("deleted-user#{user}")
}

/// The TTL (epoch seconds) of a tombstone written now.
fn expiry() -> i64 {
    Utc::now().timestamp() + TOMBSTONE_TTL.as_secs() as i64
}

/// Whether a sessions-table item is a tombstone (no session).
pub(super) fn is_tombstone(item: &Item) -> bool {
    !item.contains_key("userId") && item.contains_key(DELETED_AT)
}

/// Whether `item` (a session or its tombstone) records a delete at or after `began`.
pub(super) fn deleted_since(item: &Item, began: DateTime<Utc>) -> bool {
    Reader::new(item, "session")
        .opt_time(DELETED_AT)
        .is_some_and(|at| at >= began)
}

/// The guard every append's session write adds: no delete of this id at or after the turn
/// began (`:began`).
pub(super) const NOT_DELETED_SINCE: &str =
    "(attribute_not_exists(deletedAt) OR deletedAt < :began)";

/// An update that creates a session item from `item`, over nothing or over a tombstone
/// older than `began` (whose `deletedAt` it keeps), never over a session.
pub(super) struct CreateSession {
    pub(super) update_expression: String,
    pub(super) condition: &'static str,
    pub(super) names: HashMap<String, String>,
    pub(super) values: HashMap<String, AttributeValue>,
}

impl CreateSession {
    pub(super) fn new(item: Item, began: DateTime<Utc>) -> Self {
        let mut names = HashMap::new();
        let mut values = HashMap::new();
        let mut sets = Vec::new();
        let mut has_ttl = false;
        for (i, (name, value)) in item.into_iter().enumerate() {
            if name == "sessionId" {
                continue;
            }
            has_ttl |= name == TTL_ATTRIBUTE;
            sets.push(format!("#a{i} = :a{i}"));
            names.insert(format!("#a{i}"), name);
            values.insert(format!(":a{i}"), value);
        }
        let mut update_expression = format!("SET {}", sets.join(", "));
        if !has_ttl {
            // A tombstone's expiry must not delete the session made over it.
            update_expression.push_str(" REMOVE #ttl");
            names.insert("#ttl".into(), TTL_ATTRIBUTE.into());
        }
        values.insert(":began".into(), time(began));
        Self {
            update_expression,
            condition: "attribute_not_exists(sessionId) OR \
                        (attribute_not_exists(userId) AND deletedAt < :began)",
            names,
            values,
        }
    }
}

impl DynamoConversationStore {
    /// Replaces session `id`'s item with a tombstone; whether a session was there.
    pub(super) async fn put_session_tombstone(
        &self,
        id: &SessionId,
        at: DateTime<Utc>,
    ) -> Result<bool> {
        let table = self.sessions_table();
        let out = self
            .client()
            .put_item()
            .table_name(table)
            .item("sessionId", s(id.as_str()))
            .item(DELETED_AT, time(at))
            .item(TTL_ATTRIBUTE, n(expiry()))
            .return_values(aws_sdk_dynamodb::types::ReturnValue::AllOld)
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
            .send()
            .await
            .map_err(|e| map_sdk("PutItem", table, e))?;
        self.record(out.consumed_capacity(), true);
        Ok(out.attributes.is_some_and(|old| old.contains_key("userId")))
    }

    /// Records that `user`'s sessions are deleted from `at` on (before any is deleted).
    pub(super) async fn put_user_tombstone(&self, user: &UserId, at: DateTime<Utc>) -> Result<()> {
        let table = &self.db.inner.tables.meta;
        let out = self
            .client()
            .put_item()
            .table_name(table)
            .item("pk", s(user_key(user)))
            .item(DELETED_AT, time(at))
            .item(TTL_ATTRIBUTE, n(expiry()))
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
            .send()
            .await
            .map_err(|e| map_sdk("PutItem", table, e))?;
        self.record(out.consumed_capacity(), true);
        Ok(())
    }

    /// Writes `session`'s item, over nothing or over the tombstone of a delete before
    /// `began`: `not_found` over a newer tombstone (the id was deleted after the turn
    /// began), `conflict` over a session.
    pub(super) async fn create_session_item(
        &self,
        session: &Session,
        ttl: Option<i64>,
        began: DateTime<Utc>,
    ) -> Result<()> {
        let table = self.sessions_table();
        let create = CreateSession::new(session_item(session, 0, ttl), began);
        let result = self
            .client()
            .update_item()
            .table_name(table)
            .key("sessionId", s(session.id.as_str()))
            .update_expression(create.update_expression)
            .condition_expression(create.condition)
            .set_expression_attribute_names(Some(create.names))
            .set_expression_attribute_values(Some(create.values))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
            .send()
            .await;
        match result {
            Ok(out) => {
                self.record(out.consumed_capacity(), true);
                Ok(())
            }
            Err(error) => match error.into_service_error() {
                aws_sdk_dynamodb::operation::update_item::UpdateItemError::ConditionalCheckFailedException(failed) => {
                    match failed.item {
                        Some(old) if is_tombstone(&old) && deleted_since(&old, began) => {
                            Err(session_not_found(&session.id))
                        }
                        _ => Err(Error::conflict(format!(
                            "session {} already exists",
                            session.id
                        ))),
                    }
                }
                other => Err(crate::error::map_service("UpdateItem", table, other)),
            },
        }
    }

    /// When `user`'s sessions were deleted, if that was at or after `began` (one strongly
    /// consistent read of the user's tombstone).
    pub(super) async fn user_deleted_since(
        &self,
        user: &UserId,
        began: DateTime<Utc>,
    ) -> Result<Option<DateTime<Utc>>> {
        let tombstone = self
            .db
            .get_item(&self.db.inner.tables.meta, "pk", &user_key(user))
            .await?;
        Ok(tombstone
            .and_then(|item| Reader::new(&item, "tombstone").opt_time(DELETED_AT))
            .filter(|at| *at >= began))
    }

    /// The transaction item checking that `user`'s sessions were not deleted at or after
    /// `began`.
    pub(super) fn user_not_deleted_since(
        &self,
        user: &UserId,
        began: DateTime<Utc>,
    ) -> Result<TransactWriteItem> {
        let check = ConditionCheck::builder()
            .table_name(&self.db.inner.tables.meta)
            .key("pk", s(user_key(user)))
            .condition_expression("attribute_not_exists(pk) OR deletedAt < :began")
            .expression_attribute_values(":began", time(began))
            .build()
            .map_err(|e| Error::internal(format!("condition check: {e}")))?;
        Ok(TransactWriteItem::builder().condition_check(check).build())
    }
}
