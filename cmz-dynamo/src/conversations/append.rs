//! The append protocol: one guarded item write plus the session update (see the parent
//! module), or one transaction for turns too large for one item.

use super::*;

impl DynamoConversationStore {
    /// Writes a turn as one conditional `PutItem` at `first_seq`. `false` if the key is
    /// taken.
    pub(super) async fn put_turn(&self, item: Item) -> Result<bool> {
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
    pub(super) async fn undo_turn(
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
    pub(super) async fn end_below(&self, id: &SessionId, key: u64, floor: u64) -> Result<u64> {
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
    pub(super) async fn advance_session(
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
            .expression_attribute_values(":at", time(at));
        match extra {
            Some(stored) => {
                expression.push_str(", cmzV = :v, legacyCount = :legacy, animalName = if_not_exists(animalName, :name)");
                update = update
                    .condition_expression("attribute_exists(userId) AND attribute_not_exists(cmzV)")
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
        update = self.with_ttl(update, &mut expression);
        self.update_if(table, update.update_expression(expression))
            .await
    }

    /// After a lost race on a turn key: brings the session's count up to the newest stored
    /// turn, so a writer whose earlier step 2 never ran does not block the session.
    pub(super) async fn repair_count(&self, id: &SessionId) -> Result<()> {
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
    pub(super) async fn append_single(&self, append: &TurnAppend) -> Result<AppendOutcome> {
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
        let first_id = append.messages[0].id.clone();
        let stored = || stored_messages(id, first_seq, append.messages.clone());
        let item = turn_item(
            id,
            first_seq,
            &append.messages,
            append.messages.len(),
            append.turn_key.as_deref(),
            ttl,
        )?;
        if let Some(session) = append.new_session.as_ref() {
            if !self.put_turn(item).await? {
                return self.after_taken_key(append, true).await;
            }
            let mut session = session.clone();
            session.message_count = count;
            session.last_activity = session.last_activity.max(last_at);
            if let Err(error) = self
                .create_session_item(&session, ttl, append.began_at)
                .await
            {
                self.undo_turn(id, first_seq, &first_id).await?;
                return Err(error);
            }
            // Step 3, first turns only: the user's sessions were not deleted since the
            // turn began. Read after the writes, so a delete that the read does not see
            // began after them and lists the session itself.
            if let Some(deleted_at) = self
                .user_deleted_since(&session.user_id, append.began_at)
                .await?
            {
                self.put_session_tombstone(id, deleted_at).await?;
                self.undo_turn(id, first_seq, &first_id).await?;
                return Err(session_not_found(id));
            }
            return Ok(AppendOutcome::Appended(stored()));
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
            .condition_expression(format!(
                "cmzV = :v AND messageCount = :expected AND {NOT_DELETED_SINCE}"
            ))
            .expression_attribute_values(":v", s(SCHEMA_VERSION))
            .expression_attribute_values(":expected", n(e))
            .expression_attribute_values(":began", time(append.began_at))
            .expression_attribute_values(":count", n(count))
            .expression_attribute_values(":at", time(last_at))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .return_consumed_capacity(ReturnConsumedCapacity::Total);
        update = self.with_ttl(update, &mut expression);
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
        if old
            .as_ref()
            .is_some_and(|i| deleted_since(i, append.began_at))
        {
            // Deleted after this turn began (and perhaps made again since): not this
            // turn's conversation any more.
            self.undo_turn(id, first_seq, &first_id).await?;
            return Err(session_not_found(id));
        }
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
    pub(super) async fn after_taken_key(
        &self,
        append: &TurnAppend,
        creating: bool,
    ) -> Result<AppendOutcome> {
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
    pub(super) async fn append_transaction(&self, append: &TurnAppend) -> Result<AppendOutcome> {
        let id = &append.session_id;
        let stored = |first: u64| stored_messages(id, first, append.messages.clone());
        if let Some(session) = &append.new_session {
            // Already a transaction: the user's tombstone check joins it.
            return match self.transact(append, SessionWrite::Create(session)).await? {
                TxResult::Done => Ok(AppendOutcome::Appended(stored(1))),
                TxResult::Deleted => Err(session_not_found(id)),
                TxResult::SessionCheckFailed(_) | TxResult::ItemExists => {
                    self.after_taken_key(append, true).await
                }
            };
        }
        match self.transact(append, SessionWrite::Advance).await? {
            TxResult::Done => {
                return Ok(AppendOutcome::Appended(stored(append.expected_count + 1)));
            }
            TxResult::Deleted => return Err(session_not_found(id)),
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

    pub(super) async fn transact(
        &self,
        append: &TurnAppend,
        write: SessionWrite<'_>,
    ) -> Result<TxResult> {
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
        let mut items = Vec::with_capacity(total + 2);
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
                let create = CreateSession::new(session_item(&session, 0, ttl), append.began_at);
                let update = Update::builder()
                    .table_name(self.sessions_table())
                    .key("sessionId", s(id.as_str()))
                    .update_expression(create.update_expression)
                    .condition_expression(create.condition)
                    .set_expression_attribute_names(Some(create.names))
                    .set_expression_attribute_values(Some(create.values))
                    .return_values_on_condition_check_failure(
                        ReturnValuesOnConditionCheckFailure::AllOld,
                    )
                    .build()
                    .map_err(|e| Error::internal(format!("session create: {e}")))?;
                TransactWriteItem::builder().update(update).build()
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
                                "attribute_exists(userId) AND attribute_not_exists(cmzV)",
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
                            .condition_expression(format!(
                                "cmzV = :v AND messageCount = :expected AND {NOT_DELETED_SINCE}"
                            ))
                            .expression_attribute_values(":v", s(SCHEMA_VERSION))
                            .expression_attribute_values(":expected", n(append.expected_count))
                            .expression_attribute_values(":began", time(append.began_at));
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
                    .map_err(|e| Error::internal("session update").with_source(e))?;
                TransactWriteItem::builder().update(update).build()
            }
        };
        items.push(session_write);
        let session_index = items.len() - 1;
        // A first turn also checks that its user's sessions were not deleted since it began.
        let user_check = match write {
            SessionWrite::Create(session) => {
                items.push(self.user_not_deleted_since(&session.user_id, append.began_at)?);
                Some(items.len() - 1)
            }
            _ => None,
        };
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
        if user_check.is_some_and(|i| code_at(i) == "ConditionalCheckFailed") {
            return Ok(TxResult::Deleted);
        }
        if (0..session_index).any(|i| code_at(i) == "ConditionalCheckFailed") {
            return Ok(TxResult::ItemExists);
        }
        if code_at(session_index) == "ConditionalCheckFailed" {
            let old = reasons[session_index]
                .item()
                .cloned()
                .filter(|i| !i.is_empty());
            if old
                .as_ref()
                .is_some_and(|i| deleted_since(i, append.began_at))
            {
                return Ok(TxResult::Deleted);
            }
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
}
