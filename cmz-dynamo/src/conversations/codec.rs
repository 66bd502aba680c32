//! Items to and from domain types: turn items, session items, legacy conversations.

use super::*;

pub(super) fn put(
    table: &str,
    item: Item,
    condition: &str,
    return_old: bool,
) -> Result<TransactWriteItem> {
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
        .map_err(|e| Error::internal("put").with_source(e))?;
    Ok(TransactWriteItem::builder().put(put).build())
}

/// Which turn items to read.
#[derive(Debug, Clone, Copy)]
pub(super) enum KeyRange {
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
            .map_err(|e| Error::internal("metadata").with_source(e))?;
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
pub(super) fn turn_item_size(messages: &[NewMessage]) -> usize {
    messages
        .iter()
        .map(|m| m.content.len() + 400)
        .sum::<usize>()
        + 200
}

pub(super) fn parse_role(value: &str) -> Role {
    match value {
        "user" => Role::User,
        _ => Role::Assistant,
    }
}

pub(super) fn metadata_of(reader: &Reader<'_>) -> MessageMetadata {
    reader
        .json("metadata")
        .and_then(|v| serde_json::from_value(v).ok())
        .unwrap_or_default()
}

/// A legacy message's `metadata` is whatever the legacy caller passed: kept verbatim, with
/// the keys cmz knows read into the typed fields.
pub(super) fn legacy_metadata_of(reader: &Reader<'_>) -> MessageMetadata {
    match reader.json("metadata") {
        Some(serde_json::Value::Object(map)) => MessageMetadata::from_caller(map),
        _ => MessageMetadata::default(),
    }
}

/// The sequence number of the last message a turn item holds.
pub(crate) fn item_end(item: &Item) -> Result<u64> {
    let reader = Reader::new(item, "turn");
    let first = reader.u64("seq")?;
    let count = reader.opt_u64("msgs").unwrap_or(1).max(1);
    first.checked_add(count - 1).ok_or_else(|| {
        Error::internal(format!(
            "turn item {first} holds {count} messages: past the last sequence number"
        ))
    })
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
            let seq = first.checked_add(i as u64).ok_or_else(|| {
                Error::internal(format!(
                    "turn item {id}/{first} holds messages past the last sequence number"
                ))
            })?;
            Ok(Message {
                id: MessageId::new(reader.str("messageId")?)
                    .unwrap_or_else(|_| MessageId::generate()),
                session_id: id.clone(),
                seq,
                role: parse_role(reader.str("role")?),
                content: reader.opt_str("text").unwrap_or_default().to_owned(),
                created_at: reader.time("timestamp")?,
                metadata: metadata_of(&reader),
            })
        })
        .collect()
}

pub(crate) fn legacy_messages_len(item: &Item) -> usize {
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
        rolling_summary: rolling_summary_of(&reader),
    })
}

/// The session item's attribute holding the rolling summary (a map).
pub(super) const ROLLING_SUMMARY: &str = "rollingSummary";

pub(super) fn rolling_summary_value(summary: &RollingSummary) -> AttributeValue {
    let mut map = Item::new();
    map.insert("text".into(), s(summary.text.clone()));
    map.insert("through".into(), n(summary.through));
    map.insert("tokens".into(), n(summary.tokens));
    map.insert("updatedAt".into(), time(summary.updated_at));
    map.insert("folds".into(), n(summary.folds));
    map.insert("tokensSpent".into(), n(summary.tokens_spent));
    if summary.fallback {
        map.insert("fallback".into(), AttributeValue::Bool(true));
    }
    AttributeValue::M(map)
}

/// The rolling summary of a session item; `None` when it has none or it is unreadable
/// (the next fold writes a new one).
pub(super) fn rolling_summary_of(reader: &Reader<'_>) -> Option<RollingSummary> {
    let AttributeValue::M(map) = reader.get(ROLLING_SUMMARY)? else {
        return None;
    };
    let r = Reader::new(map, "rolling summary");
    Some(RollingSummary {
        text: r.opt_str("text")?.to_owned(),
        through: r.opt_u64("through")?,
        tokens: u32::try_from(r.opt_u64("tokens").unwrap_or(0)).unwrap_or(u32::MAX),
        updated_at: r.opt_time("updatedAt").unwrap_or_else(Utc::now),
        folds: u32::try_from(r.opt_u64("folds").unwrap_or(0)).unwrap_or(u32::MAX),
        tokens_spent: r.opt_u64("tokensSpent").unwrap_or(0),
        fallback: r.bool("fallback"),
    })
}

pub(super) fn status_of(value: Option<&str>) -> SessionStatus {
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
    if let Some(summary) = &session.rolling_summary {
        item.insert(ROLLING_SUMMARY.into(), rolling_summary_value(summary));
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
        rolling_summary: rolling_summary_of(&reader),
    })
}

pub(super) fn session_not_found(id: &SessionId) -> Error {
    Error::not_found(format!("session {id}"))
}

pub(super) fn stored_messages(
    id: &SessionId,
    first_seq: u64,
    messages: Vec<NewMessage>,
) -> Vec<Message> {
    messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| m.into_message(id.clone(), first_seq + i as u64))
        .collect()
}
