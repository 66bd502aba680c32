//! `DynamoConversationStore`: sessions and messages on the v2 layout, with legacy reads.
//!
//! Layout:
//! - **messages table**: `conversationId` (hash) + `seq` (range). An item holds the
//!   messages of one turn (`messages`, a list, usually the question and the reply) and is
//!   keyed by the sequence number of its first message; `msgs` says how many it holds.
//!   A turn too large for one 400 KB item is written as one item per message in a
//!   transaction instead. A turn key is stored on the turn's first item (`turnKey`, with
//!   `turnMsgs`) and found through the local secondary index `turnKey-index`.
//! - **sessions table**: the legacy session item plus `animalName`, `summary`, `cmzV` (2 once
//!   cmz writes the session) and `legacyCount` (messages still in the legacy conversation
//!   item, which keep their positions 1..=legacyCount). GSIs list by user and by animal on
//!   `lastActivity`.
//! - **legacy conversations table**: read only. A legacy conversation keeps its messages
//!   where they are; its next turn goes to the messages table at `legacyCount + 1`.
//!
//! # A turn's writes, and why they are safe
//! 1. `PutItem` of the turn item at `expected + 1`, guarded by `attribute_not_exists(seq)`.
//!    This single-item write is the commit point: the turn is stored whole or not at all,
//!    and of two writers that read the same count exactly one gets the key.
//! 2. `UpdateItem` of the session (`messageCount`, `lastActivity`), guarded by
//!    `messageCount = expected`. If the process dies between 1 and 2 the turn is stored
//!    and readable (history and windows read the messages table) and only the session's
//!    count lags; the next writer's guard in step 1 fails, the store re-reads the newest
//!    item, repairs the count (monotonically) and the caller retries. If step 2 finds a
//!    count that is not `expected` for another reason (a caller's bogus count), the item
//!    of step 1 is deleted again and the append is a `conflict`.
//!
//! Plain conditional writes cost half of transactional ones, so a 90 + 600 character turn
//! costs 1 WCU for the item and 5 for the session update with its two GSIs: 6 WCU, at turn
//! 1 and at turn 10,000 alike.

use async_trait::async_trait;
use aws_sdk_dynamodb::error::SdkError;
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{
    AttributeValue, Put, ReturnConsumedCapacity, ReturnValuesOnConditionCheckFailure, Select,
    TransactWriteItem, Update,
};
use chrono::{DateTime, Utc};
use cmz_core::ids::{AnimalId, MessageId, SessionId, UserId};
use cmz_core::store::{
    AppendOutcome, ConversationStore, Cursor, DeleteReport, DeleteScope, Page, PageRequest,
    SessionScope, TurnAppend,
};
use cmz_core::types::{Message, MessageMetadata, NewMessage, Role, Session, SessionStatus};
use cmz_core::{Error, Result};

use crate::attr::{Item, Reader, from_json, n, s, time, time_string};
use crate::backend::Dynamo;
use crate::batch::delete_keys;
use crate::error::map_sdk;
use crate::tables::{ANIMAL_INDEX, TTL_ATTRIBUTE, TURN_KEY_INDEX, USER_INDEX};

/// The `cmzV` value of sessions cmz writes.
const SCHEMA_VERSION: &str = "2";
/// The most messages one append may carry (a transaction holds at most 100 items).
const MAX_APPEND_MESSAGES: usize = 64;
/// A turn whose item would be larger than this is written one item per message.
const MAX_TURN_ITEM_BYTES: usize = 380 * 1024;
const HISTORY_CURSOR: &str = "dh";
const SESSIONS_CURSOR: &str = "ds";

/// Sessions and messages in DynamoDB; implements [`ConversationStore`].
///
/// Per-turn cost does not depend on the conversation's length: a turn writes its own
/// item and updates the session item, and a context window is one descending `Query`
/// with a `Limit`. Legacy conversations (one item with a `messages` list) are read
/// transparently and continued in v2 items. See the module source for the write
/// protocol.
#[derive(Debug, Clone)]
pub struct DynamoConversationStore {
    db: Dynamo,
}

/// A session as stored, with where its messages live.
#[derive(Debug, Clone)]
pub(crate) struct Stored {
    pub(crate) session: Session,
    /// Messages 1..=legacy_count are in the legacy conversation item.
    pub(crate) legacy_count: u64,
    /// cmz has written this session (`cmzV` present).
    pub(crate) continued: bool,
    /// The sessions table has an item for it.
    pub(crate) has_item: bool,
}

/// How the session item changes in a turn.
#[derive(Clone, Copy)]
enum SessionWrite<'a> {
    Create(&'a Session),
    Advance,
    ContinueLegacy { stored: &'a Stored },
}

enum TxResult {
    Done,
    SessionCheckFailed(Option<Item>),
    ItemExists,
}

impl DynamoConversationStore {
    /// The store on `db`'s tables.
    pub fn new(db: Dynamo) -> Self {
        Self { db }
    }

    fn client(&self) -> &aws_sdk_dynamodb::Client {
        &self.db.inner.client
    }

    fn messages_table(&self) -> &str {
        &self.db.inner.tables.messages
    }

    fn sessions_table(&self) -> &str {
        &self.db.inner.tables.sessions
    }

    fn legacy_table(&self) -> &str {
        &self.db.inner.tables.conversations
    }

    /// Sets one text attribute of a session item. A legacy conversation without a session
    /// item gets one (still legacy: its messages stay where they are), built by `apply`.
    async fn set_session_text(
        &self,
        id: &SessionId,
        attribute: &str,
        value: &str,
        apply: impl FnOnce(&mut Session, String),
    ) -> Result<()> {
        let table = self.sessions_table();
        let result = self
            .client()
            .update_item()
            .table_name(table)
            .key("sessionId", s(id.as_str()))
            .update_expression("SET #a = :v")
            .condition_expression("attribute_exists(sessionId)")
            .expression_attribute_names("#a", attribute)
            .expression_attribute_values(":v", s(value))
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
            .send()
            .await;
        match result {
            Ok(out) => {
                self.db.inner.meter.record(out.consumed_capacity(), true);
                Ok(())
            }
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_conditional_check_failed_exception()) =>
            {
                let legacy = self
                    .legacy_item(id)
                    .await?
                    .ok_or_else(|| session_not_found(id))?;
                let mut session = legacy_session(&legacy)?;
                apply(&mut session, value.to_owned());
                let mut item = session_item(&session, 0, None);
                item.remove("cmzV");
                self.client()
                    .put_item()
                    .table_name(table)
                    .set_item(Some(item))
                    .condition_expression("attribute_not_exists(sessionId)")
                    .send()
                    .await
                    .map_err(|e| map_sdk("PutItem", table, e))?;
                Ok(())
            }
            Err(e) => Err(map_sdk("UpdateItem", table, e)),
        }
    }

    /// Reads a session and where its messages live: the session item, else a legacy
    /// conversation item.
    pub(crate) async fn load(&self, id: &SessionId) -> Result<Option<Stored>> {
        let item = self
            .get_item(self.sessions_table(), "sessionId", id.as_str())
            .await?;
        match item {
            Some(item) => {
                let continued = Reader::new(&item, "session").opt_str("cmzV").is_some();
                if continued {
                    let session = session_from_item(&item)?;
                    let legacy_count = Reader::new(&item, "session")
                        .opt_u64("legacyCount")
                        .unwrap_or(0);
                    return Ok(Some(Stored {
                        session,
                        legacy_count,
                        continued,
                        has_item: true,
                    }));
                }
                let mut session = session_from_item(&item)?;
                let legacy = self.legacy_item(id).await?;
                let legacy_count = legacy.as_ref().map_or(0, |l| legacy_messages_len(l) as u64);
                if let Some(legacy) = &legacy {
                    if session.animal_name.is_empty() {
                        session.animal_name = Reader::new(legacy, "conversation")
                            .opt_str("animalName")
                            .unwrap_or_default()
                            .to_owned();
                    }
                }
                session.message_count = legacy_count;
                Ok(Some(Stored {
                    session,
                    legacy_count,
                    continued: false,
                    has_item: true,
                }))
            }
            None => {
                let Some(legacy) = self.legacy_item(id).await? else {
                    return Ok(None);
                };
                let session = legacy_session(&legacy)?;
                let legacy_count = session.message_count;
                Ok(Some(Stored {
                    session,
                    legacy_count,
                    continued: false,
                    has_item: false,
                }))
            }
        }
    }

    async fn get_item(&self, table: &str, key: &str, value: &str) -> Result<Option<Item>> {
        self.db.get_item(table, key, value).await
    }

    /// The legacy conversation item, if there is one (an item with a `messages` list).
    pub(crate) async fn legacy_item(&self, id: &SessionId) -> Result<Option<Item>> {
        let item = self
            .get_item(self.legacy_table(), "conversationId", id.as_str())
            .await?;
        Ok(item.filter(|i| i.contains_key("messages") || i.contains_key("userId")))
    }

    async fn legacy_messages(&self, id: &SessionId) -> Result<Vec<Message>> {
        match self.legacy_item(id).await? {
            Some(item) => legacy_messages(id, &item),
            None => Ok(Vec::new()),
        }
    }

    fn record<'a>(
        &self,
        consumed: impl IntoIterator<Item = &'a aws_sdk_dynamodb::types::ConsumedCapacity>,
        write: bool,
    ) {
        self.db.inner.meter.record(consumed, write);
    }

    /// Turn items of a session in key order, from `from_key` (inclusive) up, or from the
    /// top down; stops once the items hold at least `want` messages, and says whether more
    /// items exist past the last one returned.
    async fn query_items(
        &self,
        id: &SessionId,
        range: KeyRange,
        want: usize,
    ) -> Result<(Vec<Item>, bool)> {
        let table = self.messages_table();
        let mut out: Vec<Item> = Vec::new();
        let mut held = 0usize;
        let mut start: Option<Item> = None;
        let (condition, descending) = match range {
            KeyRange::From(_) => ("conversationId = :c AND seq >= :lo", false),
            KeyRange::Between(..) => ("conversationId = :c AND seq BETWEEN :lo AND :hi", false),
            KeyRange::Below(_) => ("conversationId = :c AND seq BETWEEN :lo AND :hi", true),
            KeyRange::Top => ("conversationId = :c AND seq >= :lo", true),
        };
        loop {
            // Turns usually hold two messages: ask for enough items, plus one to learn
            // whether more exist.
            let items_wanted = (want.saturating_sub(held)).div_ceil(2) + 1;
            let mut query = self
                .client()
                .query()
                .table_name(table)
                .key_condition_expression(condition)
                .expression_attribute_values(":c", s(id.as_str()))
                .scan_index_forward(!descending)
                .consistent_read(true)
                .limit(items_wanted.clamp(1, 1000) as i32)
                .return_consumed_capacity(ReturnConsumedCapacity::Total)
                .set_exclusive_start_key(start.take());
            query = match range {
                KeyRange::From(lo) => query.expression_attribute_values(":lo", n(lo)),
                KeyRange::Between(lo, hi) => query
                    .expression_attribute_values(":lo", n(lo))
                    .expression_attribute_values(":hi", n(hi)),
                KeyRange::Below(hi) => query
                    .expression_attribute_values(":lo", n(1))
                    .expression_attribute_values(":hi", n(hi)),
                KeyRange::Top => query.expression_attribute_values(":lo", n(1)),
            };
            let page = query.send().await.map_err(|e| map_sdk("Query", table, e))?;
            self.record(page.consumed_capacity(), false);
            let more_pages = page
                .last_evaluated_key
                .as_ref()
                .is_some_and(|k| !k.is_empty());
            for item in page.items.unwrap_or_default() {
                if held >= want {
                    return Ok((out, true));
                }
                held += Reader::new(&item, "turn").opt_u64("msgs").unwrap_or(1) as usize;
                out.push(item);
            }
            if !more_pages {
                return Ok((out, false));
            }
            start = page.last_evaluated_key;
        }
    }

    /// The turn item holding the messages of `turn_key`, through the local index.
    async fn keyed_item(&self, id: &SessionId, turn_key: &str) -> Result<Option<Item>> {
        let table = self.messages_table();
        let page = self
            .client()
            .query()
            .table_name(table)
            .index_name(TURN_KEY_INDEX)
            .key_condition_expression("conversationId = :c AND turnKey = :k")
            .expression_attribute_values(":c", s(id.as_str()))
            .expression_attribute_values(":k", s(turn_key))
            .consistent_read(true)
            .limit(1)
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
            .send()
            .await
            .map_err(|e| map_sdk("Query", table, e))?;
        self.record(page.consumed_capacity(), false);
        Ok(page.items.unwrap_or_default().into_iter().next())
    }

    /// The messages of the turn whose first item is `keyed`.
    async fn turn_messages(&self, id: &SessionId, keyed: &Item) -> Result<Vec<Message>> {
        let reader = Reader::new(keyed, "turn");
        let first = reader.u64("seq")?;
        let total = reader
            .opt_u64("turnMsgs")
            .unwrap_or(reader.opt_u64("msgs").unwrap_or(1));
        let held = reader.opt_u64("msgs").unwrap_or(1);
        let mut messages = messages_from_item(id, keyed)?;
        if total > held {
            let (items, _) = self
                .query_items(
                    id,
                    KeyRange::Between(first + held, first + total - 1),
                    (total - held) as usize,
                )
                .await?;
            for item in &items {
                messages.extend(messages_from_item(id, item)?);
            }
        }
        messages.truncate(total as usize);
        Ok(messages)
    }

    /// Writes a turn as one conditional `PutItem` at `first_seq`. `false` if the key is
    /// taken.
    async fn put_turn(&self, item: Item) -> Result<bool> {
        let table = self.messages_table();
        let result = self
            .client()
            .put_item()
            .table_name(table)
            .set_item(Some(item))
            .condition_expression("attribute_not_exists(seq)")
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
            .send()
            .await;
        match result {
            Ok(out) => {
                self.record(out.consumed_capacity(), true);
                Ok(true)
            }
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_conditional_check_failed_exception()) =>
            {
                Ok(false)
            }
            Err(e) => Err(map_sdk("PutItem", table, e)),
        }
    }

    /// Deletes a turn item this append wrote, if it is still the one it wrote.
    async fn undo_turn(
        &self,
        id: &SessionId,
        first_seq: u64,
        first_message: &MessageId,
    ) -> Result<()> {
        let table = self.messages_table();
        let result = self
            .client()
            .delete_item()
            .table_name(table)
            .key("conversationId", s(id.as_str()))
            .key("seq", n(first_seq))
            .condition_expression("firstId = :m")
            .expression_attribute_values(":m", s(first_message.as_str()))
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
            .send()
            .await;
        match result {
            Ok(out) => {
                self.record(out.consumed_capacity(), true);
                Ok(())
            }
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_conditional_check_failed_exception()) =>
            {
                Ok(())
            }
            Err(e) => Err(map_sdk("DeleteItem", table, e)),
        }
    }

    /// The number of messages stored in the messages table up to the newest item below
    /// `key` (exclusive), or `floor` if there is none.
    async fn end_below(&self, id: &SessionId, key: u64, floor: u64) -> Result<u64> {
        if key <= 1 {
            return Ok(floor);
        }
        let (items, _) = self.query_items(id, KeyRange::Below(key - 1), 1).await?;
        Ok(match items.first() {
            Some(item) => item_end(item)?.max(floor),
            None => floor,
        })
    }

    /// Raises the session's count and activity to match a stored turn (never lowers them).
    async fn advance_session(
        &self,
        id: &SessionId,
        count: u64,
        at: DateTime<Utc>,
        extra: Option<&Stored>,
    ) -> Result<bool> {
        let table = self.sessions_table();
        let mut expression = String::from("SET messageCount = :count, lastActivity = :at");
        let mut update = self
            .client()
            .update_item()
            .table_name(table)
            .key("sessionId", s(id.as_str()))
            .expression_attribute_values(":count", n(count))
            .expression_attribute_values(":at", time(at))
            .return_consumed_capacity(ReturnConsumedCapacity::Total);
        match extra {
            Some(stored) => {
                expression.push_str(", cmzV = :v, legacyCount = :legacy, animalName = if_not_exists(animalName, :name)");
                update = update
                    .condition_expression(
                        "attribute_exists(sessionId) AND attribute_not_exists(cmzV)",
                    )
                    .expression_attribute_values(":v", s(SCHEMA_VERSION))
                    .expression_attribute_values(":legacy", n(stored.legacy_count))
                    .expression_attribute_values(":name", s(stored.session.animal_name.clone()));
            }
            None => {
                update = update
                    .condition_expression("cmzV = :v AND messageCount < :count")
                    .expression_attribute_values(":v", s(SCHEMA_VERSION));
            }
        }
        if let Some(ttl) = self.db.ttl() {
            expression.push_str(", #ttl = :ttl");
            update = update
                .expression_attribute_names("#ttl", TTL_ATTRIBUTE)
                .expression_attribute_values(":ttl", n(ttl));
        }
        match update.update_expression(expression).send().await {
            Ok(out) => {
                self.record(out.consumed_capacity(), true);
                Ok(true)
            }
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_conditional_check_failed_exception()) =>
            {
                Ok(false)
            }
            Err(e) => Err(map_sdk("UpdateItem", table, e)),
        }
    }

    /// After a lost race on a turn key: brings the session's count up to the newest stored
    /// turn, so a writer whose earlier step 2 never ran does not block the session.
    async fn repair_count(&self, id: &SessionId) -> Result<()> {
        let (items, _) = self.query_items(id, KeyRange::Top, 1).await?;
        if let Some(item) = items.first() {
            let end = item_end(item)?;
            let at = messages_from_item(id, item)?
                .iter()
                .map(|m| m.created_at)
                .max()
                .unwrap_or_else(Utc::now);
            self.advance_session(id, end, at, None).await?;
        }
        Ok(())
    }

    /// The one-item write path: steps 1 and 2 of the module docs.
    async fn append_single(&self, append: &TurnAppend) -> Result<AppendOutcome> {
        let id = &append.session_id;
        let ttl = self.db.ttl();
        let e = append.expected_count;
        let first_seq = e + 1;
        let count = e + append.messages.len() as u64;
        let last_at = append
            .messages
            .iter()
            .map(|m| m.created_at)
            .max()
            .unwrap_or_else(Utc::now);
        let item = turn_item(
            id,
            first_seq,
            &append.messages,
            append.messages.len(),
            append.turn_key.as_deref(),
            ttl,
        )?;
        let first_id = append.messages[0].id.clone();
        let stored = || stored_messages(id, first_seq, append.messages.clone());
        if let Some(session) = append.new_session.as_ref() {
            if !self.put_turn(item).await? {
                return self.after_taken_key(append, true).await;
            }
            let mut session = session.clone();
            session.message_count = count;
            session.last_activity = session.last_activity.max(last_at);
            let table = self.sessions_table();
            let result = self
                .client()
                .put_item()
                .table_name(table)
                .set_item(Some(session_item(&session, 0, ttl)))
                .condition_expression("attribute_not_exists(sessionId)")
                .return_consumed_capacity(ReturnConsumedCapacity::Total)
                .send()
                .await;
            return match result {
                Ok(out) => {
                    self.record(out.consumed_capacity(), true);
                    Ok(AppendOutcome::Appended(stored()))
                }
                Err(err) => {
                    self.undo_turn(id, first_seq, &first_id).await?;
                    if err
                        .as_service_error()
                        .is_some_and(|e| e.is_conditional_check_failed_exception())
                    {
                        Err(Error::conflict(format!("session {id} already exists")))
                    } else {
                        Err(map_sdk("PutItem", table, err))
                    }
                }
            };
        }
        if !self.put_turn(item).await? {
            return self.after_taken_key(append, false).await;
        }
        // Step 2: the session follows the stored turn.
        let table = self.sessions_table();
        let mut expression = String::from("SET messageCount = :count, lastActivity = :at");
        let mut update = self
            .client()
            .update_item()
            .table_name(table)
            .key("sessionId", s(id.as_str()))
            .condition_expression("cmzV = :v AND messageCount = :expected")
            .expression_attribute_values(":v", s(SCHEMA_VERSION))
            .expression_attribute_values(":expected", n(e))
            .expression_attribute_values(":count", n(count))
            .expression_attribute_values(":at", time(last_at))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .return_consumed_capacity(ReturnConsumedCapacity::Total);
        if let Some(ttl) = ttl {
            expression.push_str(", #ttl = :ttl");
            update = update
                .expression_attribute_names("#ttl", TTL_ATTRIBUTE)
                .expression_attribute_values(":ttl", n(ttl));
        }
        let old = match update.update_expression(expression).send().await {
            Ok(out) => {
                self.record(out.consumed_capacity(), true);
                return Ok(AppendOutcome::Appended(stored()));
            }
            Err(err) => match err.into_service_error() {
                aws_sdk_dynamodb::operation::update_item::UpdateItemError::ConditionalCheckFailedException(c) => {
                    c.item.filter(|i| !i.is_empty())
                }
                other => {
                    // The turn is stored; the session catches up on the next write.
                    tracing::warn!(session = %id, error = %other, "stored a turn but could not update its session");
                    return Err(crate::error::map_service("UpdateItem", table, other));
                }
            },
        };
        let legacy_or_missing = old
            .as_ref()
            .is_none_or(|i| Reader::new(i, "session").opt_str("cmzV").is_none());
        if legacy_or_missing {
            // A legacy conversation continues here, or there is no such session.
            let Some(stored_session) = self.load(id).await?.filter(|s| !s.continued) else {
                self.undo_turn(id, first_seq, &first_id).await?;
                return Err(session_not_found(id));
            };
            // Items below ours may only be a migration's copies of the legacy messages.
            let below = self.end_below(id, first_seq, 0).await?;
            if stored_session.legacy_count != e || (below != 0 && below != e) {
                self.undo_turn(id, first_seq, &first_id).await?;
                return Err(Error::conflict(format!(
                    "session {id} has {} messages, the append expected {e}",
                    stored_session.session.message_count
                )));
            }
            let continued = if stored_session.has_item {
                self.advance_session(id, count, last_at, Some(&stored_session))
                    .await?
            } else {
                let mut session = stored_session.session.clone();
                session.message_count = count;
                session.last_activity = session.last_activity.max(last_at);
                let put = self
                    .client()
                    .put_item()
                    .table_name(table)
                    .set_item(Some(session_item(
                        &session,
                        stored_session.legacy_count,
                        ttl,
                    )))
                    .condition_expression("attribute_not_exists(sessionId)")
                    .send()
                    .await;
                match put {
                    Ok(_) => true,
                    Err(err)
                        if err
                            .as_service_error()
                            .is_some_and(|e| e.is_conditional_check_failed_exception()) =>
                    {
                        false
                    }
                    Err(err) => return Err(map_sdk("PutItem", table, err)),
                }
            };
            if !continued {
                self.undo_turn(id, first_seq, &first_id).await?;
                return Err(Error::conflict(format!(
                    "session {id}: another writer continued this conversation first"
                )));
            }
            return Ok(AppendOutcome::Appended(stored()));
        }
        // A v2 session whose count is not `expected`: a count that lags a stored turn
        // (legitimate), or a caller's bogus count (undo).
        let legacy_count = old
            .as_ref()
            .and_then(|i| Reader::new(i, "session").opt_u64("legacyCount"))
            .unwrap_or(0);
        if self.end_below(id, first_seq, legacy_count).await? == e {
            self.advance_session(id, count, last_at, None).await?;
            return Ok(AppendOutcome::Appended(stored()));
        }
        self.undo_turn(id, first_seq, &first_id).await?;
        let current = old
            .as_ref()
            .and_then(|i| Reader::new(i, "session").opt_u64("messageCount"))
            .unwrap_or(0);
        Err(Error::conflict(format!(
            "session {id} has {current} messages, the append expected {e}"
        )))
    }

    /// The turn's key was taken: a duplicate of a keyed turn, or a lost race.
    async fn after_taken_key(&self, append: &TurnAppend, creating: bool) -> Result<AppendOutcome> {
        let id = &append.session_id;
        if let Some(key) = &append.turn_key {
            if let Some(keyed) = self.keyed_item(id, key).await? {
                return Ok(AppendOutcome::Duplicate(
                    self.turn_messages(id, &keyed).await?,
                ));
            }
        }
        if creating {
            return Err(Error::conflict(format!("session {id} already exists")));
        }
        self.repair_count(id).await?;
        Err(Error::conflict(format!(
            "session {id}: message {} is already stored; re-read the session",
            append.expected_count + 1
        )))
    }

    /// The path for turns too large for one item: one item per message and the session
    /// write in one `TransactWriteItems` (twice the write cost, so only when needed).
    async fn append_transaction(&self, append: &TurnAppend) -> Result<AppendOutcome> {
        let id = &append.session_id;
        let stored = |first: u64| stored_messages(id, first, append.messages.clone());
        if let Some(session) = &append.new_session {
            return match self.transact(append, SessionWrite::Create(session)).await? {
                TxResult::Done => Ok(AppendOutcome::Appended(stored(1))),
                TxResult::SessionCheckFailed(_) | TxResult::ItemExists => {
                    self.after_taken_key(append, true).await
                }
            };
        }
        match self.transact(append, SessionWrite::Advance).await? {
            TxResult::Done => {
                return Ok(AppendOutcome::Appended(stored(append.expected_count + 1)));
            }
            TxResult::ItemExists => return self.after_taken_key(append, false).await,
            TxResult::SessionCheckFailed(Some(item))
                if Reader::new(&item, "session").opt_str("cmzV").is_some() =>
            {
                let count = Reader::new(&item, "session")
                    .opt_u64("messageCount")
                    .unwrap_or(0);
                return Err(Error::conflict(format!(
                    "session {id} has {count} messages, the append expected {}",
                    append.expected_count
                )));
            }
            TxResult::SessionCheckFailed(_) => {}
        }
        let stored_session = self.load(id).await?.ok_or_else(|| session_not_found(id))?;
        if stored_session.continued || stored_session.session.message_count != append.expected_count
        {
            return Err(Error::conflict(format!(
                "session {id} has {} messages, the append expected {}",
                stored_session.session.message_count, append.expected_count
            )));
        }
        match self
            .transact(
                append,
                SessionWrite::ContinueLegacy {
                    stored: &stored_session,
                },
            )
            .await?
        {
            TxResult::Done => Ok(AppendOutcome::Appended(stored(
                stored_session.legacy_count + 1,
            ))),
            _ => Err(Error::conflict(format!(
                "session {id}: another writer continued this conversation first"
            ))),
        }
    }

    async fn transact(&self, append: &TurnAppend, write: SessionWrite<'_>) -> Result<TxResult> {
        let ttl = self.db.ttl();
        let id = &append.session_id;
        let first_seq = match write {
            SessionWrite::Create(_) => 1,
            SessionWrite::Advance => append.expected_count + 1,
            SessionWrite::ContinueLegacy { stored } => stored.legacy_count + 1,
        };
        let total = append.messages.len();
        let count = first_seq - 1 + total as u64;
        let last_at = append
            .messages
            .iter()
            .map(|m| m.created_at)
            .max()
            .unwrap_or_else(Utc::now);
        let mut items = Vec::with_capacity(total + 1);
        for (i, message) in append.messages.iter().enumerate() {
            let key = if i == 0 {
                append.turn_key.as_deref()
            } else {
                None
            };
            let item = turn_item(
                id,
                first_seq + i as u64,
                std::slice::from_ref(message),
                total,
                key,
                ttl,
            )?;
            items.push(put(
                self.messages_table(),
                item,
                "attribute_not_exists(seq)",
                false,
            )?);
        }
        let session_write = match write {
            SessionWrite::Create(session) => {
                let mut session = session.clone();
                session.message_count = count;
                session.last_activity = session.last_activity.max(last_at);
                put(
                    self.sessions_table(),
                    session_item(&session, 0, ttl),
                    "attribute_not_exists(sessionId)",
                    true,
                )?
            }
            SessionWrite::ContinueLegacy { stored } if !stored.has_item => {
                let mut session = stored.session.clone();
                session.message_count = count;
                session.last_activity = session.last_activity.max(last_at);
                put(
                    self.sessions_table(),
                    session_item(&session, stored.legacy_count, ttl),
                    "attribute_not_exists(sessionId)",
                    true,
                )?
            }
            write => {
                let mut expression = String::from("SET messageCount = :count, lastActivity = :at");
                let mut update = Update::builder()
                    .table_name(self.sessions_table())
                    .key("sessionId", s(id.as_str()))
                    .expression_attribute_values(":count", n(count))
                    .expression_attribute_values(":at", time(last_at))
                    .return_values_on_condition_check_failure(
                        ReturnValuesOnConditionCheckFailure::AllOld,
                    );
                match write {
                    SessionWrite::ContinueLegacy { stored } => {
                        expression.push_str(", cmzV = :v, legacyCount = :legacy, animalName = if_not_exists(animalName, :name)");
                        update = update
                            .condition_expression(
                                "attribute_exists(sessionId) AND attribute_not_exists(cmzV)",
                            )
                            .expression_attribute_values(":v", s(SCHEMA_VERSION))
                            .expression_attribute_values(":legacy", n(stored.legacy_count))
                            .expression_attribute_values(
                                ":name",
                                s(stored.session.animal_name.clone()),
                            );
                    }
                    _ => {
                        update = update
                            .condition_expression("cmzV = :v AND messageCount = :expected")
                            .expression_attribute_values(":v", s(SCHEMA_VERSION))
                            .expression_attribute_values(":expected", n(append.expected_count));
                    }
                }
                if let Some(ttl) = ttl {
                    expression.push_str(", #ttl = :ttl");
                    update = update
                        .expression_attribute_names("#ttl", TTL_ATTRIBUTE)
                        .expression_attribute_values(":ttl", n(ttl));
                }
                let update = update
                    .update_expression(expression)
                    .build()
                    .map_err(|e| Error::internal(format!("session update: {e}")))?;
                TransactWriteItem::builder().update(update).build()
            }
        };
        items.push(session_write);
        let session_index = items.len() - 1;
        let table = self.messages_table();
        let result = self
            .client()
            .transact_write_items()
            .set_transact_items(Some(items))
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
            .send()
            .await;
        let raw = match result {
            Ok(out) => {
                self.record(out.consumed_capacity(), true);
                return Ok(TxResult::Done);
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
        if (0..session_index).any(|i| code_at(i) == "ConditionalCheckFailed") {
            return Ok(TxResult::ItemExists);
        }
        if code_at(session_index) == "ConditionalCheckFailed" {
            let old = reasons[session_index]
                .item()
                .cloned()
                .filter(|i| !i.is_empty());
            return Ok(TxResult::SessionCheckFailed(old));
        }
        for reason in reasons {
            let code = reason.code().unwrap_or("None");
            let message = reason.message().unwrap_or_default();
            match code {
                "None" => {}
                "TransactionConflict" => {
                    return Err(Error::conflict(format!(
                        "session {id}: a concurrent transaction touched the same items"
                    )));
                }
                "ValidationError" if crate::error::is_size_error(message) => {
                    return Err(Error::validation(
                        "message",
                        format!("the message is too large for one DynamoDB item ({message})"),
                    ));
                }
                _ => {
                    return Err(Error::unavailable(
                        format!(
                            "dynamodb TransactWriteItems on {table} was cancelled ({code}: {message})"
                        ),
                        raw,
                    ));
                }
            }
        }
        Err(Error::unavailable(
            format!("dynamodb TransactWriteItems on {table} was cancelled"),
            raw,
        ))
    }

    async fn session_page(
        &self,
        index: &'static str,
        attribute: &'static str,
        value: &str,
        scope_tag: &str,
        page: PageRequest,
    ) -> Result<Page<Session>> {
        let after = match &page.cursor {
            None => None,
            Some(cursor) => {
                let parts = cursor.decode(SESSIONS_CURSOR, 4)?;
                if parts[0] != scope_tag
                    || !self.db.verify(
                        &[SESSIONS_CURSOR, &parts[0], &parts[1], &parts[2]],
                        &parts[3],
                    )
                {
                    return Err(Error::validation("cursor", "invalid or expired cursor"));
                }
                Some((parts[1].clone(), parts[2].clone()))
            }
        };
        let limit = page.effective_limit();
        let table = self.sessions_table();
        let mut out: Vec<(String, Session)> = Vec::new();
        let mut group: Vec<(String, Session)> = Vec::new();
        let mut group_key: Option<String> = None;
        let mut start: Option<Item> = None;
        let flush = |group: &mut Vec<(String, Session)>, out: &mut Vec<(String, Session)>| {
            group.sort_by(|a, b| b.1.id.cmp(&a.1.id));
            for (at, session) in group.drain(..) {
                let keep = match &after {
                    None => true,
                    Some((a_at, a_id)) => {
                        at < *a_at || (at == *a_at && session.id.as_str() < a_id.as_str())
                    }
                };
                if keep {
                    out.push((at, session));
                }
            }
        };
        'pages: loop {
            let mut query = self
                .client()
                .query()
                .table_name(table)
                .index_name(index)
                .expression_attribute_names("#k", attribute)
                .expression_attribute_values(":k", s(value))
                .scan_index_forward(false)
                .limit(((limit + 1) as i32).max(10))
                .return_consumed_capacity(ReturnConsumedCapacity::Total)
                .set_exclusive_start_key(start.take());
            query = match &after {
                Some((at, _)) => query
                    .key_condition_expression("#k = :k AND lastActivity <= :at")
                    .expression_attribute_values(":at", s(at.clone())),
                None => query.key_condition_expression("#k = :k"),
            };
            let result = query.send().await.map_err(|e| map_sdk("Query", table, e))?;
            self.db
                .inner
                .meter
                .record(result.consumed_capacity(), false);
            for item in result.items() {
                let at = Reader::new(item, "session").str("lastActivity")?.to_owned();
                if group_key.as_deref() != Some(at.as_str()) {
                    flush(&mut group, &mut out);
                    if out.len() > limit {
                        break 'pages;
                    }
                    group_key = Some(at.clone());
                }
                group.push((at, session_from_item(item)?));
            }
            match result.last_evaluated_key {
                Some(key) if !key.is_empty() => start = Some(key),
                _ => {
                    flush(&mut group, &mut out);
                    break;
                }
            }
        }
        let more = out.len() > limit;
        out.truncate(limit);
        let next = match (more, out.last()) {
            (true, Some((at, session))) => {
                let signature =
                    self.db
                        .sign(&[SESSIONS_CURSOR, scope_tag, at, session.id.as_str()])?;
                Some(Cursor::encode(
                    SESSIONS_CURSOR,
                    &[scope_tag, at, session.id.as_str(), &signature],
                ))
            }
            _ => None,
        };
        Ok(Page {
            items: out.into_iter().map(|(_, s)| s).collect(),
            next,
        })
    }

    /// Session ids from an index, for deletes.
    async fn index_ids(
        &self,
        index: &'static str,
        attribute: &'static str,
        value: &str,
    ) -> Result<Vec<SessionId>> {
        let table = self.sessions_table();
        let mut ids = Vec::new();
        let mut start: Option<Item> = None;
        loop {
            let page = self
                .client()
                .query()
                .table_name(table)
                .index_name(index)
                .key_condition_expression("#k = :k")
                .expression_attribute_names("#k", attribute)
                .expression_attribute_values(":k", s(value))
                .projection_expression("sessionId")
                .return_consumed_capacity(ReturnConsumedCapacity::Total)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| map_sdk("Query", table, e))?;
            self.db.inner.meter.record(page.consumed_capacity(), false);
            for item in page.items() {
                if let Ok(id) = SessionId::new(Reader::new(item, "session").str("sessionId")?) {
                    ids.push(id);
                }
            }
            match page.last_evaluated_key {
                Some(key) if !key.is_empty() => start = Some(key),
                _ => return Ok(ids),
            }
        }
    }

    /// Sessions whose last activity is before `before`: a parallel-free Scan of the
    /// sessions table. The one Scan of this store; it serves retention sweeps (an
    /// administrator's bulk delete), never a user's request.
    async fn older_ids(&self, before: DateTime<Utc>) -> Result<Vec<SessionId>> {
        let table = self.sessions_table();
        let mut ids = Vec::new();
        let mut start: Option<Item> = None;
        loop {
            let page = self
                .client()
                .scan()
                .table_name(table)
                .filter_expression("lastActivity < :t")
                .expression_attribute_values(":t", s(time_string(before)))
                .projection_expression("sessionId, lastActivity")
                .return_consumed_capacity(ReturnConsumedCapacity::Total)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| map_sdk("Scan", table, e))?;
            self.db.inner.meter.record(page.consumed_capacity(), false);
            for item in page.items() {
                let reader = Reader::new(item, "session");
                // Legacy timestamps may lack the zone or the fraction: compare as times.
                if reader.opt_time("lastActivity").is_some_and(|t| t < before) {
                    if let Ok(id) = SessionId::new(reader.str("sessionId")?) {
                        ids.push(id);
                    }
                }
            }
            match page.last_evaluated_key {
                Some(key) if !key.is_empty() => start = Some(key),
                _ => return Ok(ids),
            }
        }
    }

    async fn delete_session(&self, id: &SessionId) -> Result<DeleteReport> {
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

    async fn delete_all(&self, ids: Vec<SessionId>) -> Result<DeleteReport> {
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

fn put(table: &str, item: Item, condition: &str, return_old: bool) -> Result<TransactWriteItem> {
    let mut put = Put::builder()
        .table_name(table)
        .set_item(Some(item))
        .condition_expression(condition);
    if return_old {
        put = put
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld);
    }
    let put = put
        .build()
        .map_err(|e| Error::internal(format!("put: {e}")))?;
    Ok(TransactWriteItem::builder().put(put).build())
}

/// Which turn items to read.
#[derive(Debug, Clone, Copy)]
enum KeyRange {
    /// Keys `>= lo`, ascending.
    From(u64),
    /// Keys in `lo..=hi`, ascending.
    Between(u64, u64),
    /// Keys `<= hi`, descending.
    Below(u64),
    /// Every key, descending.
    Top,
}

/// One item holding the `messages` of a turn from `first_seq`; `turn_total` is the number
/// of messages in the whole turn (more than this item holds on the transaction path).
pub(crate) fn turn_item(
    id: &SessionId,
    first_seq: u64,
    messages: &[NewMessage],
    turn_total: usize,
    turn_key: Option<&str>,
    ttl: Option<i64>,
) -> Result<Item> {
    let mut item = Item::new();
    item.insert("conversationId".into(), s(id.as_str()));
    item.insert("seq".into(), n(first_seq));
    item.insert("msgs".into(), n(messages.len()));
    if let Some(first) = messages.first() {
        item.insert("firstId".into(), s(first.id.as_str()));
    }
    let mut list = Vec::with_capacity(messages.len());
    for message in messages {
        let mut map = Item::new();
        map.insert("messageId".into(), s(message.id.as_str()));
        map.insert("role".into(), s(message.role.as_str()));
        map.insert("text".into(), s(message.content.clone()));
        map.insert("timestamp".into(), time(message.created_at));
        let metadata = serde_json::to_value(&message.metadata)
            .map_err(|e| Error::internal(format!("metadata: {e}")))?;
        if metadata.as_object().is_some_and(|m| !m.is_empty()) {
            map.insert("metadata".into(), from_json(&metadata));
        }
        list.push(AttributeValue::M(map));
    }
    item.insert("messages".into(), AttributeValue::L(list));
    if let Some(key) = turn_key {
        item.insert("turnKey".into(), s(key));
        item.insert("turnMsgs".into(), n(turn_total));
    }
    if let Some(ttl) = ttl {
        item.insert(TTL_ATTRIBUTE.into(), n(ttl));
    }
    Ok(item)
}

/// The size a turn item will have, roughly (DynamoDB counts names and values in UTF-8).
fn turn_item_size(messages: &[NewMessage]) -> usize {
    messages
        .iter()
        .map(|m| m.content.len() + 400)
        .sum::<usize>()
        + 200
}

fn parse_role(value: &str) -> Role {
    match value {
        "user" => Role::User,
        _ => Role::Assistant,
    }
}

fn metadata_of(reader: &Reader<'_>) -> MessageMetadata {
    reader
        .json("metadata")
        .and_then(|v| serde_json::from_value(v).ok())
        .unwrap_or_default()
}

/// A legacy message's `metadata` is whatever the legacy caller passed: kept verbatim, with
/// the keys cmz knows read into the typed fields.
fn legacy_metadata_of(reader: &Reader<'_>) -> MessageMetadata {
    match reader.json("metadata") {
        Some(serde_json::Value::Object(map)) => MessageMetadata::from_caller(map),
        _ => MessageMetadata::default(),
    }
}

/// The sequence number of the last message a turn item holds.
fn item_end(item: &Item) -> Result<u64> {
    let reader = Reader::new(item, "turn");
    Ok(reader.u64("seq")? + reader.opt_u64("msgs").unwrap_or(1).max(1) - 1)
}

/// The messages of a turn item, numbered from its key.
pub(crate) fn messages_from_item(id: &SessionId, item: &Item) -> Result<Vec<Message>> {
    let reader = Reader::new(item, "turn");
    let first = reader.u64("seq")?;
    let Some(AttributeValue::L(list)) = reader.get("messages") else {
        return Err(Error::internal(format!(
            "turn item {id}/{first} has no messages"
        )));
    };
    list.iter()
        .enumerate()
        .map(|(i, value)| {
            let AttributeValue::M(map) = value else {
                return Err(Error::internal(format!(
                    "turn item {id}/{first} holds a non-map message"
                )));
            };
            let reader = Reader::new(map, "message");
            Ok(Message {
                id: MessageId::new(reader.str("messageId")?)
                    .unwrap_or_else(|_| MessageId::generate()),
                session_id: id.clone(),
                seq: first + i as u64,
                role: parse_role(reader.str("role")?),
                content: reader.opt_str("text").unwrap_or_default().to_owned(),
                created_at: reader.time("timestamp")?,
                metadata: metadata_of(&reader),
            })
        })
        .collect()
}

fn legacy_messages_len(item: &Item) -> usize {
    match item.get("messages") {
        Some(aws_sdk_dynamodb::types::AttributeValue::L(list)) => list.len(),
        _ => 0,
    }
}

/// The messages of a legacy conversation item, numbered 1.. in list order.
pub(crate) fn legacy_messages(id: &SessionId, item: &Item) -> Result<Vec<Message>> {
    let Some(aws_sdk_dynamodb::types::AttributeValue::L(list)) = item.get("messages") else {
        return Ok(Vec::new());
    };
    let fallback_time = Reader::new(item, "conversation")
        .opt_time("startTime")
        .unwrap_or_else(Utc::now);
    list.iter()
        .enumerate()
        .map(|(i, value)| {
            let seq = i as u64 + 1;
            let empty = Item::new();
            let map = match value {
                aws_sdk_dynamodb::types::AttributeValue::M(map) => map,
                _ => &empty,
            };
            let reader = Reader::new(map, "legacy message");
            Ok(Message {
                id: reader
                    .opt_str("messageId")
                    .and_then(|m| MessageId::new(m).ok())
                    .unwrap_or_else(|| {
                        MessageId::new(format!("legacy-{id}-{seq}"))
                            .unwrap_or_else(|_| MessageId::generate())
                    }),
                session_id: id.clone(),
                seq,
                role: parse_role(reader.opt_str("role").unwrap_or("assistant")),
                content: reader
                    .opt_str("text")
                    .or_else(|| reader.opt_str("content"))
                    .unwrap_or_default()
                    .to_owned(),
                created_at: reader.opt_time("timestamp").unwrap_or(fallback_time),
                metadata: legacy_metadata_of(&reader),
            })
        })
        .collect()
}

/// The session of a legacy conversation item that has no session item.
pub(crate) fn legacy_session(item: &Item) -> Result<Session> {
    let reader = Reader::new(item, "conversation");
    let id = SessionId::new(reader.str("conversationId")?)?;
    let started = reader.opt_time("startTime").unwrap_or_else(Utc::now);
    let count = legacy_messages_len(item) as u64;
    Ok(Session {
        id,
        user_id: UserId::new(reader.str("userId")?)?,
        animal_id: AnimalId::new(reader.str("animalId")?)?,
        animal_name: reader.opt_str("animalName").unwrap_or_default().to_owned(),
        started_at: started,
        last_activity: reader.opt_time("endTime").unwrap_or(started),
        message_count: count,
        status: status_of(reader.opt_str("status")),
        summary: reader.opt_str("summary").map(str::to_owned),
        thread_id: reader.opt_str("threadId").map(str::to_owned),
    })
}

fn status_of(value: Option<&str>) -> SessionStatus {
    match value {
        Some("ended") | Some("completed") | Some("closed") => SessionStatus::Ended,
        _ => SessionStatus::Active,
    }
}

pub(crate) fn session_item(session: &Session, legacy_count: u64, ttl: Option<i64>) -> Item {
    let mut item = Item::new();
    item.insert("sessionId".into(), s(session.id.as_str()));
    item.insert("userId".into(), s(session.user_id.as_str()));
    item.insert("animalId".into(), s(session.animal_id.as_str()));
    item.insert("animalName".into(), s(session.animal_name.clone()));
    item.insert("startTime".into(), time(session.started_at));
    item.insert("lastActivity".into(), time(session.last_activity));
    item.insert("messageCount".into(), n(session.message_count));
    let status = match session.status {
        SessionStatus::Ended => "ended",
        _ => "active",
    };
    item.insert("status".into(), s(status));
    if let Some(summary) = &session.summary {
        item.insert("summary".into(), s(summary.clone()));
    }
    if let Some(thread) = &session.thread_id {
        item.insert("threadId".into(), s(thread.clone()));
    }
    item.insert("cmzV".into(), s(SCHEMA_VERSION));
    if legacy_count > 0 {
        item.insert("legacyCount".into(), n(legacy_count));
    }
    if let Some(ttl) = ttl {
        item.insert(TTL_ATTRIBUTE.into(), n(ttl));
    }
    item
}

pub(crate) fn session_from_item(item: &Item) -> Result<Session> {
    let reader = Reader::new(item, "session");
    let started = reader.opt_time("startTime");
    let last = reader.opt_time("lastActivity");
    let started_at = started.or(last).unwrap_or_else(Utc::now);
    Ok(Session {
        id: SessionId::new(reader.str("sessionId")?)?,
        user_id: UserId::new(reader.str("userId")?)?,
        animal_id: AnimalId::new(reader.str("animalId")?)?,
        animal_name: reader.opt_str("animalName").unwrap_or_default().to_owned(),
        started_at,
        last_activity: last.unwrap_or(started_at),
        message_count: reader.opt_u64("messageCount").unwrap_or(0),
        status: status_of(reader.opt_str("status")),
        summary: reader.opt_str("summary").map(str::to_owned),
        thread_id: reader.opt_str("threadId").map(str::to_owned),
    })
}

fn session_not_found(id: &SessionId) -> Error {
    Error::not_found(format!("session {id}"))
}

#[async_trait]
impl ConversationStore for DynamoConversationStore {
    #[tracing::instrument(name = "dynamodb.create_session", skip_all, fields(session = %session.id))]
    async fn create_session(&self, session: &Session) -> Result<()> {
        if self.legacy_item(&session.id).await?.is_some() {
            return Err(Error::conflict(format!(
                "session {} already exists",
                session.id
            )));
        }
        let table = self.sessions_table();
        let item = session_item(session, 0, self.db.ttl());
        match self
            .client()
            .put_item()
            .table_name(table)
            .set_item(Some(item))
            .condition_expression("attribute_not_exists(sessionId)")
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
            .send()
            .await
        {
            Ok(out) => {
                self.db.inner.meter.record(out.consumed_capacity(), true);
                Ok(())
            }
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_conditional_check_failed_exception()) =>
            {
                Err(Error::conflict(format!(
                    "session {} already exists",
                    session.id
                )))
            }
            Err(e) => Err(map_sdk("PutItem", table, e)),
        }
    }

    #[tracing::instrument(name = "dynamodb.get_session", skip_all, fields(session = %id))]
    async fn get_session(&self, id: &SessionId) -> Result<Option<Session>> {
        Ok(self.load(id).await?.map(|s| s.session))
    }

    #[tracing::instrument(name = "dynamodb.append_turn", skip_all, fields(session = %append.session_id, expected = append.expected_count))]
    async fn append_turn(&self, append: TurnAppend) -> Result<AppendOutcome> {
        if append.messages.is_empty() {
            return Err(Error::validation(
                "messages",
                "an append needs at least one message",
            ));
        }
        if append.messages.len() > MAX_APPEND_MESSAGES {
            return Err(Error::validation(
                "messages",
                format!("an append holds at most {MAX_APPEND_MESSAGES} messages"),
            ));
        }
        for message in &append.messages {
            message.validate()?;
        }
        if let Some(session) = &append.new_session {
            if session.id != append.session_id
                || append.expected_count != 0
                || session.message_count != 0
            {
                return Err(Error::validation(
                    "session",
                    "a new session starts empty, with the append's id",
                ));
            }
        }
        if let Some(key) = &append.turn_key {
            if let Some(keyed) = self.keyed_item(&append.session_id, key).await? {
                return Ok(AppendOutcome::Duplicate(
                    self.turn_messages(&append.session_id, &keyed).await?,
                ));
            }
        }
        if turn_item_size(&append.messages) > MAX_TURN_ITEM_BYTES {
            self.append_transaction(&append).await
        } else {
            self.append_single(&append).await
        }
    }

    #[tracing::instrument(name = "dynamodb.find_turn", skip_all, fields(session = %id))]
    async fn find_turn(&self, id: &SessionId, turn_key: &str) -> Result<Option<Vec<Message>>> {
        match self.keyed_item(id, turn_key).await? {
            Some(keyed) => Ok(Some(self.turn_messages(id, &keyed).await?)),
            None => {
                if self.load(id).await?.is_none() {
                    return Err(session_not_found(id));
                }
                Ok(None)
            }
        }
    }

    #[tracing::instrument(name = "dynamodb.recent_messages", skip_all, fields(session = %id, limit))]
    async fn recent_messages(&self, id: &SessionId, limit: usize) -> Result<Vec<Message>> {
        let limit = limit.min(10_000);
        let mut recent = Vec::new();
        if limit > 0 {
            let (items, _) = self.query_items(id, KeyRange::Top, limit).await?;
            for item in items.iter().rev() {
                recent.extend(messages_from_item(id, item)?);
            }
            if recent.len() >= limit {
                return Ok(recent.split_off(recent.len() - limit));
            }
        }
        let stored = self.load(id).await?.ok_or_else(|| session_not_found(id))?;
        if stored.legacy_count > 0 && recent.len() < limit {
            let legacy = self.legacy_messages(id).await?;
            let legacy = &legacy[..legacy.len().min(stored.legacy_count as usize)];
            // A migration in progress may already have copied some of them.
            let oldest = recent.first().map_or(u64::MAX, |m| m.seq);
            let legacy: Vec<&Message> = legacy.iter().filter(|m| m.seq < oldest).collect();
            let take = (limit - recent.len()).min(legacy.len());
            let mut window: Vec<Message> = legacy[legacy.len() - take..]
                .iter()
                .map(|m| (*m).clone())
                .collect();
            window.extend(recent);
            return Ok(window);
        }
        Ok(recent)
    }

    #[tracing::instrument(name = "dynamodb.history", skip_all, fields(session = %id))]
    async fn history(&self, id: &SessionId, page: PageRequest) -> Result<Page<Message>> {
        let invalid = || Error::validation("cursor", "invalid or expired cursor");
        let (after, from_key) = match &page.cursor {
            None => (0, 1),
            Some(cursor) => {
                let parts = cursor.decode(HISTORY_CURSOR, 4)?;
                if parts[0] != id.as_str()
                    || !self.db.verify(
                        &[HISTORY_CURSOR, &parts[0], &parts[1], &parts[2]],
                        &parts[3],
                    )
                {
                    return Err(invalid());
                }
                let after = parts[1].parse::<u64>().map_err(|_| invalid())?;
                let key = parts[2].parse::<u64>().map_err(|_| invalid())?;
                if key == 0 || key > after + 1 {
                    return Err(invalid());
                }
                (after, key)
            }
        };
        let limit = page.effective_limit();
        let stored = self.load(id).await?.ok_or_else(|| session_not_found(id))?;
        let mut items: Vec<Message> = Vec::new();
        let mut more = false;
        // The key of the item holding the message after the page's last one.
        let mut next_key: Option<u64> = None;
        if after < stored.legacy_count {
            let legacy = self.legacy_messages(id).await?;
            let legacy = &legacy[..legacy.len().min(stored.legacy_count as usize)];
            let start = (after as usize).min(legacy.len());
            let end = (start + limit).min(legacy.len());
            items.extend_from_slice(&legacy[start..end]);
            more = end < legacy.len();
        }
        if !more && items.len() < limit {
            let after = items.last().map_or(after, |m| m.seq);
            let from_key = from_key.max(stored.legacy_count + 1);
            let skip = (after + 1).saturating_sub(from_key) as usize;
            let want = limit - items.len();
            let (turns, more_turns) = self
                .query_items(id, KeyRange::From(from_key), want + skip + 1)
                .await?;
            let mut flat: Vec<(u64, Message)> = Vec::new();
            for turn in &turns {
                let key = Reader::new(turn, "turn").u64("seq")?;
                flat.extend(
                    messages_from_item(id, turn)?
                        .into_iter()
                        .filter(|m| m.seq > after)
                        .map(|m| (key, m)),
                );
            }
            more = more_turns || flat.len() > want;
            if flat.len() > want {
                next_key = Some(flat[want].0);
            }
            items.extend(flat.into_iter().take(want).map(|(_, m)| m));
        } else if items.len() == limit && stored.session.message_count > stored.legacy_count {
            more = true;
        }
        let next = match (more, items.last()) {
            (true, Some(last)) => {
                let seq = last.seq.to_string();
                let key = next_key.unwrap_or(last.seq + 1).to_string();
                let signature = self.db.sign(&[HISTORY_CURSOR, id.as_str(), &seq, &key])?;
                Some(Cursor::encode(
                    HISTORY_CURSOR,
                    &[id.as_str(), &seq, &key, &signature],
                ))
            }
            _ => None,
        };
        Ok(Page { items, next })
    }

    #[tracing::instrument(name = "dynamodb.list_sessions", skip_all)]
    async fn list_sessions(&self, scope: SessionScope, page: PageRequest) -> Result<Page<Session>> {
        match &scope {
            SessionScope::User(user) => {
                self.session_page(
                    USER_INDEX,
                    "userId",
                    user.as_str(),
                    &format!("u:{user}"),
                    page,
                )
                .await
            }
            SessionScope::Animal(animal) => {
                self.session_page(
                    ANIMAL_INDEX,
                    "animalId",
                    animal.as_str(),
                    &format!("a:{animal}"),
                    page,
                )
                .await
            }
        }
    }

    #[tracing::instrument(name = "dynamodb.set_summary", skip_all, fields(session = %id))]
    async fn set_summary(&self, id: &SessionId, summary: &str) -> Result<()> {
        self.set_session_text(id, "summary", summary, |session, value| {
            session.summary = Some(value)
        })
        .await
    }

    #[tracing::instrument(name = "dynamodb.set_thread_id", skip_all, fields(session = %id))]
    async fn set_thread_id(&self, id: &SessionId, thread_id: &str) -> Result<()> {
        self.set_session_text(id, "threadId", thread_id, |session, value| {
            session.thread_id = Some(value)
        })
        .await
    }

    #[tracing::instrument(name = "dynamodb.delete", skip_all, fields(scope = ?scope))]
    async fn delete(&self, scope: DeleteScope) -> Result<DeleteReport> {
        let ids = match scope {
            DeleteScope::Session(id) => return self.delete_session(&id).await,
            DeleteScope::User(user) => self.index_ids(USER_INDEX, "userId", user.as_str()).await?,
            DeleteScope::Animal(animal) => {
                self.index_ids(ANIMAL_INDEX, "animalId", animal.as_str())
                    .await?
            }
            DeleteScope::OlderThan(before) => self.older_ids(before).await?,
        };
        let report = self.delete_all(ids).await?;
        tracing::info!(target: "cmz::audit", sessions = report.sessions, messages = report.messages, "dynamodb bulk delete");
        Ok(report)
    }
}

fn stored_messages(id: &SessionId, first_seq: u64, messages: Vec<NewMessage>) -> Vec<Message> {
    messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| m.into_message(id.clone(), first_seq + i as u64))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_round_trip() {
        let id = SessionId::new("conv_lion_u1_0a1b2c3d").unwrap();
        let mut m = NewMessage::new(Role::Assistant, "Roar! 🦁");
        m.metadata.latency_ms = Some(12);
        m.metadata.fallback = true;
        let q = NewMessage::new(Role::User, "Do lions nap?");
        let item = turn_item(&id, 7, &[q.clone(), m.clone()], 2, Some("k1"), Some(99)).unwrap();
        assert_eq!(item_end(&item).unwrap(), 8);
        let mut both = messages_from_item(&id, &item).unwrap();
        assert_eq!(
            (both[0].seq, both[0].content.as_str()),
            (7, "Do lions nap?")
        );
        let back = both.remove(1);
        assert_eq!(back.seq, 8);
        assert_eq!(back.content, m.content);
        assert_eq!(back.metadata, m.metadata);
        assert_eq!(back.created_at, m.created_at);
        let session = Session::new(
            id.clone(),
            UserId::new("u1").unwrap(),
            AnimalId::new("lion").unwrap(),
            "Leo",
        );
        let item = session_item(&session, 4, None);
        let back = session_from_item(&item).unwrap();
        assert_eq!(back.id, session.id);
        assert_eq!(back.animal_name, "Leo");
    }
}
