//! `DynamoConversationStore`: sessions and messages on the v2 layout, with legacy reads.
//!
//! Layout:
//! - **messages table**: one item per message, `conversationId` (hash) + `seq` (range, from
//!   1). Turn-key markers live in the same partition at negative `seq`s, so a window or
//!   history query (`seq > 0`) never sees them and a delete finds them.
//! - **sessions table**: the legacy session item plus `animalName`, `summary`, `cmzV` (2 once
//!   cmz writes the session) and `legacyCount` (messages still in the legacy conversation
//!   item, which keep their positions 1..=legacyCount). GSIs list by user and by animal on
//!   `lastActivity`.
//! - **legacy conversations table**: read only. A legacy conversation keeps its messages
//!   where they are; its next turn goes to the messages table at `legacyCount + 1`.
//!
//! A turn is ONE `TransactWriteItems`: each message `Put` guarded by
//! `attribute_not_exists(seq)`, the session `Update` guarded by `messageCount = expected`
//! (or a `Put` guarded by `attribute_not_exists(sessionId)` for a new session), and, with
//! a turn key, the marker `Put` guarded by `attribute_not_exists(seq)`.

use async_trait::async_trait;
use aws_sdk_dynamodb::error::SdkError;
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{
    Put, ReturnConsumedCapacity, ReturnValue, ReturnValuesOnConditionCheckFailure, Select,
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
use sha2::{Digest, Sha256};

use crate::attr::{Item, Reader, from_json, n, s, time, time_string};
use crate::backend::Dynamo;
use crate::batch::delete_keys;
use crate::error::map_sdk;
use crate::tables::{ANIMAL_INDEX, TTL_ATTRIBUTE, USER_INDEX};

/// The `cmzV` value of sessions cmz writes.
const SCHEMA_VERSION: &str = "2";
/// The most messages one append may carry (a transaction holds at most 100 items).
const MAX_APPEND_MESSAGES: usize = 64;
const HISTORY_CURSOR: &str = "dh";
const SESSIONS_CURSOR: &str = "ds";

/// Sessions and messages in DynamoDB, one item per message; implements
/// [`ConversationStore`].
///
/// Per-turn cost does not depend on the conversation's length: a turn writes its own
/// message items and updates the session item, and a context window is one descending
/// `Query` with a `Limit`. Legacy conversations (one item with a `messages` list) are read
/// transparently and continued in v2 items.
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

/// How the session item changes in a turn's transaction.
enum SessionWrite<'a> {
    Create(&'a Session),
    Advance,
    ContinueLegacy { stored: &'a Stored },
}

enum TxResult {
    Done,
    Duplicate(Item),
    SessionCheckFailed(Option<Item>),
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
        let out = self
            .client()
            .get_item()
            .table_name(table)
            .key(key, s(value))
            .consistent_read(true)
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
            .send()
            .await
            .map_err(|e| map_sdk("GetItem", table, e))?;
        self.db.inner.meter.record(out.consumed_capacity(), false);
        Ok(out.item)
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

    /// Messages with `after < seq`, ascending, at most `limit` (plus whether more exist).
    async fn query_messages(
        &self,
        id: &SessionId,
        after: u64,
        until: Option<u64>,
        limit: usize,
        descending: bool,
    ) -> Result<(Vec<Message>, bool)> {
        let table = self.messages_table();
        let mut out = Vec::new();
        let mut start: Option<Item> = None;
        let condition = if until.is_some() {
            "conversationId = :c AND seq BETWEEN :lo AND :hi"
        } else {
            "conversationId = :c AND seq > :lo"
        };
        loop {
            let want = limit + 1 - out.len();
            let mut query = self
                .client()
                .query()
                .table_name(table)
                .key_condition_expression(condition)
                .expression_attribute_values(":c", s(id.as_str()))
                .expression_attribute_values(
                    ":lo",
                    n(if until.is_some() { after + 1 } else { after }),
                )
                .scan_index_forward(!descending)
                .consistent_read(true)
                .limit(want.min(1000) as i32)
                .return_consumed_capacity(ReturnConsumedCapacity::Total)
                .set_exclusive_start_key(start.take());
            if let Some(hi) = until {
                query = query.expression_attribute_values(":hi", n(hi));
            }
            let page = query.send().await.map_err(|e| map_sdk("Query", table, e))?;
            self.db.inner.meter.record(page.consumed_capacity(), false);
            for item in page.items() {
                out.push(message_from_item(id, item)?);
            }
            if out.len() > limit {
                out.truncate(limit);
                return Ok((out, true));
            }
            match page.last_evaluated_key {
                Some(key) if !key.is_empty() => start = Some(key),
                _ => return Ok((out, false)),
            }
        }
    }

    async fn transact(&self, append: &TurnAppend, write: SessionWrite<'_>) -> Result<TxResult> {
        let ttl = self.db.ttl();
        let id = &append.session_id;
        let first_seq = match &write {
            SessionWrite::Create(_) => 1,
            SessionWrite::Advance => append.expected_count + 1,
            SessionWrite::ContinueLegacy { stored } => stored.legacy_count + 1,
        };
        let count = first_seq - 1 + append.messages.len() as u64;
        let last_at = append
            .messages
            .iter()
            .map(|m| m.created_at)
            .max()
            .unwrap_or_else(Utc::now);
        let mut items = Vec::with_capacity(append.messages.len() + 2);
        for (i, message) in append.messages.iter().enumerate() {
            let item = message_item(id, first_seq + i as u64, message, ttl)?;
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
                let item = session_item(&session, 0, ttl);
                put(
                    self.sessions_table(),
                    item,
                    "attribute_not_exists(sessionId)",
                    true,
                )?
            }
            SessionWrite::ContinueLegacy { stored } if !stored.has_item => {
                let mut session = stored.session.clone();
                session.message_count = count;
                session.last_activity = session.last_activity.max(last_at);
                let item = session_item(&session, stored.legacy_count, ttl);
                put(
                    self.sessions_table(),
                    item,
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
        let marker_index = if let Some(key) = &append.turn_key {
            let mut item = Item::new();
            item.insert("conversationId".into(), s(id.as_str()));
            item.insert("seq".into(), n(marker_seq(key)));
            item.insert("turnKey".into(), s(key.clone()));
            item.insert("first".into(), n(first_seq));
            item.insert("last".into(), n(count));
            if let Some(ttl) = ttl {
                item.insert(TTL_ATTRIBUTE.into(), n(ttl));
            }
            items.push(put(
                self.messages_table(),
                item,
                "attribute_not_exists(seq)",
                true,
            )?);
            Some(items.len() - 1)
        } else {
            None
        };
        let table = self.messages_table();
        let result = self
            .client()
            .transact_write_items()
            .set_transact_items(Some(items))
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
            .send()
            .await;
        match result {
            Ok(out) => {
                self.db.inner.meter.record(out.consumed_capacity(), true);
                Ok(TxResult::Done)
            }
            Err(SdkError::ServiceError(service)) => {
                self.db.inner.meter.record(None, true);
                let raw = service.into_err();
                let TransactWriteItemsError::TransactionCanceledException(cancelled) = &raw else {
                    return Err(crate::error::map_service("TransactWriteItems", table, raw));
                };
                let reasons = cancelled.cancellation_reasons();
                let code_at = |i: usize| reasons.get(i).and_then(|r| r.code()).unwrap_or("None");
                if let Some(i) = marker_index {
                    if code_at(i) == "ConditionalCheckFailed" {
                        let old = reasons[i].item().cloned().unwrap_or_default();
                        return Ok(TxResult::Duplicate(old));
                    }
                }
                if code_at(session_index) == "ConditionalCheckFailed" {
                    return Ok(TxResult::SessionCheckFailed(
                        reasons[session_index]
                            .item()
                            .cloned()
                            .filter(|i| !i.is_empty()),
                    ));
                }
                for (i, reason) in reasons.iter().enumerate() {
                    let code = reason.code().unwrap_or("None");
                    let message = reason.message().unwrap_or_default();
                    match code {
                        "None" => {}
                        "ConditionalCheckFailed" if i < session_index => {
                            return Err(Error::conflict(format!(
                                "session {id}: message {} is already stored (the session item is behind its messages)",
                                first_seq + i as u64
                            )));
                        }
                        "TransactionConflict" => {
                            return Err(Error::conflict(format!(
                                "session {id}: a concurrent transaction touched the same items"
                            )));
                        }
                        "ValidationError" if crate::error::is_size_error(message) => {
                            return Err(Error::validation(
                                "message",
                                format!(
                                    "the message is too large for one DynamoDB item ({message})"
                                ),
                            ));
                        }
                        "ThrottlingError"
                        | "ProvisionedThroughputExceeded"
                        | "RequestLimitExceeded" => {
                            return Err(Error::unavailable(
                                format!(
                                    "dynamodb TransactWriteItems on {table} was throttled ({code})"
                                ),
                                raw,
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
            Err(other) => Err(map_sdk("TransactWriteItems", table, other)),
        }
    }

    async fn duplicate(&self, id: &SessionId, marker: &Item) -> Result<AppendOutcome> {
        Ok(AppendOutcome::Duplicate(
            self.marker_messages(id, marker).await?,
        ))
    }

    async fn marker_messages(&self, id: &SessionId, marker: &Item) -> Result<Vec<Message>> {
        let reader = Reader::new(marker, "turn marker");
        let (first, last) = (reader.u64("first")?, reader.u64("last")?);
        if last < first {
            return Ok(Vec::new());
        }
        let (messages, _) = self
            .query_messages(
                id,
                first - 1,
                Some(last),
                (last - first + 1) as usize,
                false,
            )
            .await?;
        Ok(messages)
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
                        .sign(&[SESSIONS_CURSOR, scope_tag, at, session.id.as_str()]);
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
        let sessions = self.sessions_table();
        let old = self
            .client()
            .delete_item()
            .table_name(sessions)
            .key("sessionId", s(id.as_str()))
            .return_values(ReturnValue::AllOld)
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
            .send()
            .await
            .map_err(|e| map_sdk("DeleteItem", sessions, e))?;
        self.db.inner.meter.record(old.consumed_capacity(), true);
        if old.attributes.is_some_and(|a| !a.is_empty()) {
            report.sessions = 1;
        }
        // Every item of the conversation's partition: messages and turn markers.
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
                .projection_expression("conversationId, seq")
                .select(Select::SpecificAttributes)
                .consistent_read(true)
                .return_consumed_capacity(ReturnConsumedCapacity::Total)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| map_sdk("Query", table, e))?;
            self.db.inner.meter.record(page.consumed_capacity(), false);
            for item in page.items() {
                if Reader::new(item, "message")
                    .opt_i64("seq")
                    .is_some_and(|seq| seq > 0)
                {
                    report.messages += 1;
                }
                keys.push(item.clone());
            }
            match page.last_evaluated_key {
                Some(key) if !key.is_empty() => start = Some(key),
                _ => break,
            }
        }
        delete_keys(&self.db, table, keys).await?;
        let legacy_table = self.legacy_table();
        let legacy = self
            .client()
            .delete_item()
            .table_name(legacy_table)
            .key("conversationId", s(id.as_str()))
            .return_values(ReturnValue::AllOld)
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
            .send()
            .await
            .map_err(|e| map_sdk("DeleteItem", legacy_table, e))?;
        self.db.inner.meter.record(legacy.consumed_capacity(), true);
        if let Some(old) = legacy.attributes.filter(|a| !a.is_empty()) {
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

/// The sort key of a turn-key marker: negative, so `seq > 0` queries never see it.
pub(crate) fn marker_seq(turn_key: &str) -> i64 {
    let digest = Sha256::digest(turn_key.as_bytes());
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest[..8]);
    // 52 bits keep the number exact in every client's floating point.
    -1 - (u64::from_be_bytes(bytes) >> 12) as i64
}

pub(crate) fn message_item(
    id: &SessionId,
    seq: u64,
    message: &NewMessage,
    ttl: Option<i64>,
) -> Result<Item> {
    let mut item = Item::new();
    item.insert("conversationId".into(), s(id.as_str()));
    item.insert("seq".into(), n(seq));
    item.insert("messageId".into(), s(message.id.as_str()));
    item.insert("role".into(), s(message.role.as_str()));
    item.insert("text".into(), s(message.content.clone()));
    item.insert("timestamp".into(), time(message.created_at));
    let metadata = serde_json::to_value(&message.metadata)
        .map_err(|e| Error::internal(format!("metadata: {e}")))?;
    if metadata.as_object().is_some_and(|m| !m.is_empty()) {
        item.insert("metadata".into(), from_json(&metadata));
    }
    if let Some(ttl) = ttl {
        item.insert(TTL_ATTRIBUTE.into(), n(ttl));
    }
    Ok(item)
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

pub(crate) fn message_from_item(id: &SessionId, item: &Item) -> Result<Message> {
    let reader = Reader::new(item, "message");
    let seq = reader.u64("seq")?;
    Ok(Message {
        id: MessageId::new(reader.str("messageId")?).unwrap_or_else(|_| MessageId::generate()),
        session_id: id.clone(),
        seq,
        role: parse_role(reader.str("role")?),
        content: reader.opt_str("text").unwrap_or_default().to_owned(),
        created_at: reader.time("timestamp")?,
        metadata: metadata_of(&reader),
    })
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
                metadata: metadata_of(&reader),
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
        let id = append.session_id.clone();
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
            if self.legacy_item(&id).await?.is_some() {
                return Err(Error::conflict(format!("session {id} already exists")));
            }
            let messages = append.messages.clone();
            return match self
                .transact(&append, SessionWrite::Create(session))
                .await?
            {
                TxResult::Done => Ok(AppendOutcome::Appended(stored_messages(&id, 1, messages))),
                TxResult::Duplicate(marker) => self.duplicate(&id, &marker).await,
                TxResult::SessionCheckFailed(_) => {
                    Err(Error::conflict(format!("session {id} already exists")))
                }
            };
        }
        let messages = append.messages.clone();
        match self.transact(&append, SessionWrite::Advance).await? {
            TxResult::Done => {
                return Ok(AppendOutcome::Appended(stored_messages(
                    &id,
                    append.expected_count + 1,
                    messages,
                )));
            }
            TxResult::Duplicate(marker) => return self.duplicate(&id, &marker).await,
            TxResult::SessionCheckFailed(Some(item))
                if Reader::new(&item, "session").opt_str("cmzV").is_some() =>
            {
                if let Some(key) = &append.turn_key {
                    if let Some(previous) = self.find_turn(&id, key).await? {
                        return Ok(AppendOutcome::Duplicate(previous));
                    }
                }
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
        // Not a v2 session: a legacy conversation, or nothing at all.
        let stored = self
            .load(&id)
            .await?
            .ok_or_else(|| session_not_found(&id))?;
        if stored.continued {
            return Err(Error::conflict(format!(
                "session {id} has {} messages, the append expected {}",
                stored.session.message_count, append.expected_count
            )));
        }
        if stored.session.message_count != append.expected_count {
            return Err(Error::conflict(format!(
                "session {id} has {} messages, the append expected {}",
                stored.session.message_count, append.expected_count
            )));
        }
        match self
            .transact(&append, SessionWrite::ContinueLegacy { stored: &stored })
            .await?
        {
            TxResult::Done => Ok(AppendOutcome::Appended(stored_messages(
                &id,
                stored.legacy_count + 1,
                messages,
            ))),
            TxResult::Duplicate(marker) => self.duplicate(&id, &marker).await,
            TxResult::SessionCheckFailed(_) => Err(Error::conflict(format!(
                "session {id}: another writer continued this legacy conversation first"
            ))),
        }
    }

    #[tracing::instrument(name = "dynamodb.find_turn", skip_all, fields(session = %id))]
    async fn find_turn(&self, id: &SessionId, turn_key: &str) -> Result<Option<Vec<Message>>> {
        let table = self.messages_table();
        let out = self
            .client()
            .get_item()
            .table_name(table)
            .key("conversationId", s(id.as_str()))
            .key("seq", n(marker_seq(turn_key)))
            .consistent_read(true)
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
            .send()
            .await
            .map_err(|e| map_sdk("GetItem", table, e))?;
        self.db.inner.meter.record(out.consumed_capacity(), false);
        match out.item {
            Some(marker)
                if Reader::new(&marker, "turn marker").opt_str("turnKey") == Some(turn_key) =>
            {
                Ok(Some(self.marker_messages(id, &marker).await?))
            }
            _ => {
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
        let (mut recent, _) = if limit == 0 {
            (Vec::new(), false)
        } else {
            self.query_messages(id, 0, None, limit, true).await?
        };
        recent.reverse();
        if recent.len() == limit && limit > 0 {
            return Ok(recent);
        }
        let stored = self.load(id).await?.ok_or_else(|| session_not_found(id))?;
        if stored.legacy_count > 0 && recent.len() < limit {
            let legacy = self.legacy_messages(id).await?;
            let take = (limit - recent.len()).min(legacy.len());
            let mut window: Vec<Message> = legacy[legacy.len() - take..].to_vec();
            window.extend(recent);
            return Ok(window);
        }
        Ok(recent)
    }

    #[tracing::instrument(name = "dynamodb.history", skip_all, fields(session = %id))]
    async fn history(&self, id: &SessionId, page: PageRequest) -> Result<Page<Message>> {
        let after = match &page.cursor {
            None => 0,
            Some(cursor) => {
                let parts = cursor.decode(HISTORY_CURSOR, 3)?;
                if parts[0] != id.as_str()
                    || !self
                        .db
                        .verify(&[HISTORY_CURSOR, &parts[0], &parts[1]], &parts[2])
                {
                    return Err(Error::validation("cursor", "invalid or expired cursor"));
                }
                parts[1]
                    .parse::<u64>()
                    .map_err(|_| Error::validation("cursor", "invalid or expired cursor"))?
            }
        };
        let limit = page.effective_limit();
        let stored = self.load(id).await?.ok_or_else(|| session_not_found(id))?;
        let mut items = Vec::new();
        let mut more = false;
        if after < stored.legacy_count {
            let legacy = self.legacy_messages(id).await?;
            let legacy: Vec<Message> = legacy
                .into_iter()
                .take(stored.legacy_count as usize)
                .collect();
            let start = after as usize;
            let end = (start + limit).min(legacy.len());
            items.extend_from_slice(&legacy[start.min(end)..end]);
            more = end < legacy.len();
        }
        if !more && items.len() < limit {
            let from = after.max(stored.legacy_count);
            let (v2, v2_more) = self
                .query_messages(id, from, None, limit - items.len(), false)
                .await?;
            items.extend(v2);
            more = v2_more;
        } else if items.len() == limit {
            more = more || stored.session.message_count > stored.legacy_count;
        }
        let next = match (more, items.last()) {
            (true, Some(last)) => {
                let seq = last.seq.to_string();
                let signature = self.db.sign(&[HISTORY_CURSOR, id.as_str(), &seq]);
                Some(Cursor::encode(
                    HISTORY_CURSOR,
                    &[id.as_str(), &seq, &signature],
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
        let table = self.sessions_table();
        let result = self
            .client()
            .update_item()
            .table_name(table)
            .key("sessionId", s(id.as_str()))
            .update_expression("SET summary = :s")
            .condition_expression("attribute_exists(sessionId)")
            .expression_attribute_values(":s", s(summary))
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
                // A legacy conversation without a session item gets one (still legacy).
                let legacy = self
                    .legacy_item(id)
                    .await?
                    .ok_or_else(|| session_not_found(id))?;
                let mut session = legacy_session(&legacy)?;
                session.summary = Some(summary.to_owned());
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
        self.delete_all(ids).await
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
    fn markers_are_negative_and_stable() {
        let a = marker_seq("turn-1");
        assert!(a < 0 && a > -(1i64 << 53));
        assert_eq!(a, marker_seq("turn-1"));
        assert_ne!(a, marker_seq("turn-2"));
    }

    #[test]
    fn items_round_trip() {
        let id = SessionId::new("conv_lion_u1_0a1b2c3d").unwrap();
        let mut m = NewMessage::new(Role::Assistant, "Roar! 🦁");
        m.metadata.latency_ms = Some(12);
        m.metadata.fallback = true;
        let item = message_item(&id, 7, &m, Some(99)).unwrap();
        let back = message_from_item(&id, &item).unwrap();
        assert_eq!(back.seq, 7);
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
