//! `DynamoConversationStore`: sessions and messages on the v2 layout, with legacy reads.
//!
//! Layout:
//! - **messages table**: `conversationId` (hash) + `seq` (range). An item holds the
//!   messages of one turn (`messages`, a list, usually the question and the reply) and is
//!   keyed by the sequence number of its first message; `msgs` says how many it holds.
//!   A turn too large for one 400 KB item is written as one item per message in a
//!   transaction instead. A turn key is stored on the turn's first item (`turnKey`, with
//!   `turnMsgs`) and found through the local secondary index `turnKey-index`.
//!   The session's running summary is the item at `seq` 0 (module `summary`): turn reads
//!   all start at 1, and a delete of the partition takes it too.
//! - **sessions table**: the legacy session item plus `animalName`, `summary`, `cmzV` (2 once
//!   cmz writes the session), `legacyCount` (messages still in the legacy conversation
//!   item, which keep their positions 1..=legacyCount) and `rsThrough` (how far the running
//!   summary goes, once there is one). GSIs list by user on `lastActivity` (every
//!   attribute projected) and by animal on `startTime` (keys only).
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
//!    of step 1 is deleted again and the append is a `conflict`. The guard also demands
//!    that the session id was not deleted since the turn began (`deletedAt < :began`, see
//!    below); a session deleted meanwhile fails it, and the item of step 1 is deleted.
//!
//! A first turn writes the turn item, then creates the session item (over nothing, or
//! over the tombstone of an earlier delete of that id), then
//! 3. reads its user's tombstone (one strongly consistent `GetItem`): if the user's
//!    sessions were deleted since the turn began, it replaces the session by a tombstone
//!    and deletes the turn item again (`not_found`). Reading after writing is what makes
//!    it safe: a user delete writes its tombstone before it lists the user's sessions, so
//!    a read that misses the tombstone came before the listing, which finds the session
//!    (the listing runs a second time a second later, for a GSI that lags).
//!
//! Plain conditional writes cost half of transactional ones, so a 90 + 600 character turn
//! costs 1 WCU for the item and 3 for the session update with the user index (whose entry
//! moves with `lastActivity`; the animal index is keyed by `startTime` and a turn never
//! writes it): 4 WCU, at turn 2 and at turn 10,000 alike, with a running summary or
//! without (it is not on the session item); the first turn costs no more and 1 RCU. Deletes leave
//! tombstones (module `tombstones`), and checking them adds no write: the checks are
//! conditions of writes the turn makes anyway, plus the first turn's read. (The same check
//! as a `ConditionCheck` in one `TransactWriteItems` with the first turn's writes measured
//! 20 WCU on DynamoDB Local instead of 4; turns too large for one item, already a
//! transaction, do it that way.)

mod append;
mod codec;
mod cursors;
mod deletes;
mod legacy;
mod listing;
mod summary;
mod tombstones;

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
    AppendOutcome, ConversationStore, Cursor, DeleteReport, DeleteScope, MAX_PAGE_SIZE, Page,
    PageRequest, SessionScope, TurnAppend,
};
use cmz_core::types::{
    Message, MessageMetadata, NewMessage, Role, RollingSummary, Session, SessionStatus,
};
use cmz_core::{Error, Result};

use crate::attr::{Item, Reader, from_json, n, s, time, time_string};
use crate::backend::Dynamo;
use crate::batch::delete_keys;
use crate::error::map_sdk;
use crate::tables::{ANIMAL_INDEX, TTL_ATTRIBUTE, TURN_KEY_INDEX, USER_INDEX};

use codec::*;
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) use codec::{item_end, legacy_messages_len, messages_from_item, session_from_item};
pub(crate) use codec::{legacy_messages, legacy_session, session_item, turn_item};
pub(crate) use cursors::{
    history_cursor, read_history_cursor, read_sessions_cursor, sessions_cursor,
};
use tombstones::{CreateSession, NOT_DELETED_SINCE, deleted_since, is_tombstone};

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
    /// Its running summary is kept beside its turns (see `summary`).
    summary_kept: bool,
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
    /// The session, or its user's sessions, were deleted after the turn began.
    Deleted,
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
            // A session, not a tombstone: nothing is written onto a deleted session.
            .condition_expression("attribute_exists(userId)")
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

    /// `update` with `, #ttl = :ttl` added to its `SET` `expression`, when the store keeps
    /// conversations for a limited time.
    fn with_ttl(
        &self,
        update: aws_sdk_dynamodb::operation::update_item::builders::UpdateItemFluentBuilder,
        expression: &mut String,
    ) -> aws_sdk_dynamodb::operation::update_item::builders::UpdateItemFluentBuilder {
        match self.db.ttl() {
            Some(ttl) => {
                expression.push_str(", #ttl = :ttl");
                update
                    .expression_attribute_names("#ttl", TTL_ATTRIBUTE)
                    .expression_attribute_values(":ttl", n(ttl))
            }
            None => update,
        }
    }

    /// Sends a conditional `UpdateItem` on `table`: `true` when it was written, `false`
    /// when its condition failed.
    async fn update_if(
        &self,
        table: &str,
        update: aws_sdk_dynamodb::operation::update_item::builders::UpdateItemFluentBuilder,
    ) -> Result<bool> {
        match update
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
            .send()
            .await
        {
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
}

impl DynamoConversationStore {
    /// Up to `limit` messages after `after`, reading turn items from the key `from_key`
    /// (at or before the item holding the message after `after`), with the cursor to go on.
    async fn history_from(
        &self,
        id: &SessionId,
        after: u64,
        from_key: u64,
        limit: usize,
    ) -> Result<Page<Message>> {
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
            (true, Some(last)) => Some(history_cursor(
                &self.db,
                id,
                last.seq,
                next_key.unwrap_or(last.seq.saturating_add(1)),
            )?),
            _ => None,
        };
        Ok(Page { items, next })
    }
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
        // Over nothing, or over the tombstone of a session deleted before now.
        self.create_session_item(session, self.db.ttl(), Utc::now())
            .await
    }

    #[tracing::instrument(name = "dynamodb.get_session", skip_all, fields(session = %id))]
    async fn get_session(&self, id: &SessionId) -> Result<Option<Session>> {
        let Some(stored) = self.load(id).await? else {
            return Ok(None);
        };
        let mut session = stored.session;
        if stored.summary_kept {
            self.attach_rolling_summary(&mut session).await?;
        }
        Ok(Some(session))
    }

    #[tracing::instrument(name = "dynamodb.append_turn", skip_all, fields(session = %append.session_id, expected = append.expected_count))]
    async fn append_turn(&self, append: TurnAppend) -> Result<AppendOutcome> {
        append.validate()?;
        if append.messages.len() > MAX_APPEND_MESSAGES {
            return Err(Error::validation(
                "messages",
                format!("an append holds at most {MAX_APPEND_MESSAGES} messages"),
            ));
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
        let (after, from_key) = match &page.cursor {
            None => (0, 1),
            Some(cursor) => read_history_cursor(&self.db, id, cursor)?,
        };
        self.history_from(id, after, from_key, page.effective_limit())
            .await
    }

    #[tracing::instrument(name = "dynamodb.messages_after", skip_all, fields(session = %id, after, limit))]
    async fn messages_after(
        &self,
        id: &SessionId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Message>> {
        let limit = limit.min(MAX_PAGE_SIZE);
        if limit == 0 {
            return Ok(Vec::new());
        }
        // A turn item usually holds a question and its reply, so the message after `after`
        // is in the item keyed `after` or `after + 1`; an item holding more starts earlier.
        let page = self.history_from(id, after, after.max(1), limit).await?;
        if page.items.first().is_some_and(|m| m.seq == after + 1) {
            return Ok(page.items);
        }
        let from = after.saturating_sub(MAX_APPEND_MESSAGES as u64).max(1);
        Ok(self.history_from(id, after, from, limit).await?.items)
    }

    #[tracing::instrument(name = "dynamodb.list_sessions", skip_all)]
    async fn list_sessions(&self, scope: SessionScope, page: PageRequest) -> Result<Page<Session>> {
        match &scope {
            SessionScope::User(user) => {
                self.session_page(listing::BY_USER, user.as_str(), &format!("u:{user}"), page)
                    .await
            }
            SessionScope::Animal(animal) => {
                let tag = format!("a:{animal}");
                self.session_page(listing::BY_ANIMAL, animal.as_str(), &tag, page)
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

    #[tracing::instrument(name = "dynamodb.set_rolling_summary", skip_all, fields(session = %id, through = summary.through))]
    async fn set_rolling_summary(&self, id: &SessionId, summary: &RollingSummary) -> Result<bool> {
        self.put_rolling_summary(id, summary).await
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
            DeleteScope::User(user) => return self.delete_user(&user).await,
            DeleteScope::Animal(animal) => self
                .index_ids(ANIMAL_INDEX, "animalId", animal.as_str())
                .await?
                .into_iter()
                .map(|(id, _)| id)
                .collect(),
            DeleteScope::OlderThan(before) => self.older_ids(before).await?,
        };
        let report = self.delete_all(ids).await?;
        tracing::info!(target: "cmz::audit", sessions = report.sessions, messages = report.messages, "dynamodb bulk delete");
        Ok(report)
    }
}

#[cfg(test)]
mod tests;
